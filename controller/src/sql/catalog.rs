//! The drift check of a resync, for a whole server at once: what the catalog holds for every
//! tenant of the server, read in one round trip and kept for a short while. A tenant whose roles
//! and database are all as declared in it needs no query of its own; anything else (a difference,
//! a tenant this process changed since the read, a catalog the admin may not read in full) takes
//! the per-tenant path in `ddl`, which reads again and repairs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{PgPool, Row};

use super::rotation::login_comment;
use super::scram::VerifiedPasswords;

/// One role as the catalog holds it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoleRow {
    pub can_login: bool,
    pub connection_limit: i32,
    pub comment: Option<String>,
    /// The SCRAM verifier; `None` when it has none, or when it cannot be read (see
    /// [`Snapshot::passwords_readable`]).
    pub password: Option<String>,
    /// The roles it is a direct member of.
    pub member_of: Vec<String>,
    /// Its settings for every database (`ALTER ROLE ... SET`), as `name=value`.
    pub settings: Vec<String>,
}

/// One database as the catalog holds it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DatabaseRow {
    pub owner: String,
    pub comment: Option<String>,
    /// Whether PUBLIC holds any privilege on it.
    pub public_access: bool,
    /// Whether its owner may connect.
    pub owner_connects: bool,
}

/// The roles and databases of a server that carry a silo comment, read at `taken`.
#[derive(Debug)]
pub struct Snapshot {
    pub taken: Instant,
    /// Whether the admin could read the password verifiers (`pg_authid`: superusers only).
    pub passwords_readable: bool,
    pub roles: HashMap<String, RoleRow>,
    pub databases: HashMap<String, DatabaseRow>,
}

/// What a tenant's pass declares for its roles and database (see `tenant::actions::provision`).
pub struct Declared<'a> {
    pub role: &'a str,
    pub database: &'a str,
    /// The identity comment its role and database carry.
    pub comment: &'a str,
    pub connection_limit: i32,
    /// Whether the owner role logs in.
    pub owner_logs_in: bool,
    /// The owner's password, while the owner is the Secret's user (before any rotation).
    pub owner_password: Option<&'a str>,
    /// The Secret's login role and its password, once rotated.
    pub login: Option<(&'a str, &'a str)>,
    /// Other login roles that may log in (a rotation's previous and next ones).
    pub also_logging_in: Vec<&'a str>,
}

impl Snapshot {
    /// Whether the tenant is exactly as declared, so that its pass need not look itself. False
    /// whenever in doubt.
    pub fn in_order(&self, declared: &Declared<'_>, verified: &VerifiedPasswords) -> bool {
        if !self.passwords_readable {
            return false;
        }
        let matches = |role: &str, row: &RoleRow, password: &str| {
            row.password
                .as_deref()
                .is_some_and(|stored| verified.matches(role, stored, password))
        };
        let Some(owner) = self.roles.get(declared.role) else {
            return false;
        };
        let owner_ok = owner.comment.as_deref() == Some(declared.comment)
            && owner.can_login == declared.owner_logs_in
            && owner.connection_limit == declared.connection_limit
            && declared
                .owner_password
                .is_none_or(|password| matches(declared.role, owner, password));
        let database_ok = self.databases.get(declared.database).is_some_and(|db| {
            db.owner == declared.role
                && db.comment.as_deref() == Some(declared.comment)
                && !db.public_access
                && db.owner_connects
        });
        if !owner_ok || !database_ok {
            return false;
        }
        // Every login role of the owner: the Secret's as declared, a previous or next one able
        // to log in, any other retired (no login, no password).
        let of_owner = login_comment(declared.role);
        let switch = [
            format!("role={}", declared.role),
            format!("role={}", super::quote_ident(declared.role)),
        ];
        let logins = self
            .roles
            .iter()
            .filter(|(_, row)| row.comment.as_deref() == Some(of_owner.as_str()));
        let mut current_seen = false;
        for (name, row) in logins {
            let ok = match declared.login {
                Some((login, password)) if name == login => {
                    current_seen = true;
                    row.can_login
                        && row.connection_limit == declared.connection_limit
                        && row.member_of.iter().any(|m| m == declared.role)
                        && row.settings.iter().any(|s| switch.contains(s))
                        && matches(name, row, password)
                }
                _ if declared.also_logging_in.contains(&name.as_str()) => row.can_login,
                _ => !row.can_login && row.password.is_none(),
            };
            if !ok {
                return false;
            }
        }
        declared.login.is_none() || current_seen
    }
}

/// A server's last [`Snapshot`], and which tenants this process changed since.
#[derive(Default)]
pub struct CatalogCache {
    last: tokio::sync::Mutex<Option<Arc<Snapshot>>>,
    /// When this process last sent a tenant's role (by owner role name) anything that may change it.
    touched: std::sync::Mutex<HashMap<String, Instant>>,
}

impl CatalogCache {
    /// A snapshot no older than `max_age` (read now if the last one is older; one read at a
    /// time), if it was taken after this process last touched `role`.
    pub async fn for_role(
        &self,
        pool: &PgPool,
        role: &str,
        max_age: Duration,
    ) -> Result<Option<Arc<Snapshot>>, sqlx::Error> {
        let snapshot = {
            let mut last = self.last.lock().await;
            match &*last {
                Some(s) if s.taken.elapsed() <= max_age => s.clone(),
                _ => {
                    let fresh = Arc::new(read(pool).await?);
                    *last = Some(fresh.clone());
                    fresh
                }
            }
        };
        let touched = self.lock_touched().get(role).copied();
        Ok(touched
            .is_none_or(|at| snapshot.taken > at)
            .then_some(snapshot))
    }

    /// Remembers that `role` may have changed just now: the snapshots taken before do not count
    /// for it.
    pub fn touched(&self, role: &str) {
        self.lock_touched().insert(role.to_string(), Instant::now());
    }

    fn lock_touched(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.touched
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Reads every role and database with a silo comment: two queries, whatever the number of tenants.
async fn read(pool: &PgPool) -> Result<Snapshot, sqlx::Error> {
    let taken = Instant::now();
    const ROLES: &str = "
        SELECT r.rolname::text AS name, r.rolcanlogin, r.rolconnlimit, d.description AS comment,
               {password} AS password,
               ARRAY(SELECT g.rolname::text FROM pg_catalog.pg_auth_members m
                       JOIN pg_catalog.pg_roles g ON g.oid = m.roleid
                      WHERE m.member = r.oid) AS member_of,
               COALESCE((SELECT s.setconfig FROM pg_catalog.pg_db_role_setting s
                          WHERE s.setrole = r.oid AND s.setdatabase = 0), '{}') AS settings
          FROM {table} r
          JOIN pg_catalog.pg_shdescription d
            ON d.objoid = r.oid AND d.classoid = 'pg_catalog.pg_authid'::pg_catalog.regclass
         WHERE d.description LIKE 'silo: %'";
    let with_passwords = ROLES
        .replace("{password}", "r.rolpassword")
        .replace("{table}", "pg_catalog.pg_authid");
    let (rows, passwords_readable) = match sqlx::query(&with_passwords).fetch_all(pool).await {
        Ok(rows) => (rows, true),
        // An admin that is not superuser may not read pg_authid.
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => {
            let without = ROLES
                .replace("{password}", "NULL::text")
                .replace("{table}", "pg_catalog.pg_roles");
            (sqlx::query(&without).fetch_all(pool).await?, false)
        }
        Err(e) => return Err(e),
    };
    let mut roles = HashMap::with_capacity(rows.len());
    for row in rows {
        roles.insert(
            row.try_get("name")?,
            RoleRow {
                can_login: row.try_get("rolcanlogin")?,
                connection_limit: row.try_get("rolconnlimit")?,
                comment: row.try_get("comment")?,
                password: row.try_get("password")?,
                member_of: row.try_get("member_of")?,
                settings: row.try_get("settings")?,
            },
        );
    }
    let rows = sqlx::query(
        "SELECT d.datname::text AS name, pg_catalog.pg_get_userbyid(d.datdba) AS owner,
                c.description AS comment,
                EXISTS (SELECT 1 FROM pg_catalog.aclexplode(
                            COALESCE(d.datacl, pg_catalog.acldefault('d', d.datdba))) a
                        WHERE a.grantee = 0) AS public_access,
                pg_catalog.has_database_privilege(d.datdba, d.oid, 'CONNECT') AS owner_connects
           FROM pg_catalog.pg_database d
           JOIN pg_catalog.pg_shdescription c
             ON c.objoid = d.oid AND c.classoid = 'pg_catalog.pg_database'::pg_catalog.regclass
          WHERE c.description LIKE 'silo: %'",
    )
    .fetch_all(pool)
    .await?;
    let mut databases = HashMap::with_capacity(rows.len());
    for row in rows {
        databases.insert(
            row.try_get("name")?,
            DatabaseRow {
                owner: row.try_get("owner")?,
                comment: row.try_get("comment")?,
                public_access: row.try_get("public_access")?,
                owner_connects: row.try_get("owner_connects")?,
            },
        );
    }
    Ok(Snapshot {
        taken,
        passwords_readable,
        roles,
        databases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::scram;

    const COMMENT: &str = "silo: tenant prod/acme uid u1";

    fn role(comment: &str, password: Option<&str>) -> RoleRow {
        RoleRow {
            can_login: true,
            connection_limit: 20,
            comment: Some(comment.into()),
            password: password.map(scram::verifier),
            member_of: Vec::new(),
            settings: Vec::new(),
        }
    }

    fn login(password: Option<&str>) -> RoleRow {
        RoleRow {
            member_of: vec!["t_acme".into()],
            settings: vec!["role=t_acme".into()],
            ..role(&login_comment("t_acme"), password)
        }
    }

    /// A tenant never rotated, as declared: its owner logs in with `pw`.
    fn converged() -> Snapshot {
        Snapshot {
            taken: Instant::now(),
            passwords_readable: true,
            roles: HashMap::from([("t_acme".into(), role(COMMENT, Some("pw")))]),
            databases: HashMap::from([(
                "t_acme".into(),
                DatabaseRow {
                    owner: "t_acme".into(),
                    comment: Some(COMMENT.into()),
                    public_access: false,
                    owner_connects: true,
                },
            )]),
        }
    }

    fn declared() -> Declared<'static> {
        Declared {
            role: "t_acme",
            database: "t_acme",
            comment: COMMENT,
            connection_limit: 20,
            owner_logs_in: true,
            owner_password: Some("pw"),
            login: None,
            also_logging_in: Vec::new(),
        }
    }

    fn in_order(snapshot: &Snapshot, declared: &Declared<'_>) -> bool {
        snapshot.in_order(declared, &VerifiedPasswords::default())
    }

    #[test]
    fn a_converged_tenant_is_in_order() {
        assert!(in_order(&converged(), &declared()));
    }

    #[test]
    fn any_drift_or_doubt_sends_the_tenant_down_its_own_path() {
        type Drift = fn(&mut Snapshot);
        let drifts: [(&str, Drift); 10] = [
            ("password set by hand", |s| {
                s.roles.get_mut("t_acme").expect("in the fixture").password =
                    Some(scram::verifier("by-hand"))
            }),
            ("no password", |s| {
                s.roles.get_mut("t_acme").expect("in the fixture").password = None
            }),
            ("connection limit", |s| {
                s.roles
                    .get_mut("t_acme")
                    .expect("in the fixture")
                    .connection_limit = 99
            }),
            ("login taken away", |s| {
                s.roles.get_mut("t_acme").expect("in the fixture").can_login = false
            }),
            ("role dropped", |s| {
                s.roles.remove("t_acme");
            }),
            ("role comment", |s| {
                s.roles.get_mut("t_acme").expect("in the fixture").comment =
                    Some("silo: tenant x/y uid u2".into())
            }),
            ("database owner", |s| {
                s.databases.get_mut("t_acme").expect("in the fixture").owner = "silo_admin".into()
            }),
            ("PUBLIC granted", |s| {
                s.databases
                    .get_mut("t_acme")
                    .expect("in the fixture")
                    .public_access = true
            }),
            ("database dropped", |s| {
                s.databases.remove("t_acme");
            }),
            ("verifiers unreadable", |s| s.passwords_readable = false),
        ];
        for (what, drift) in drifts {
            let mut snapshot = converged();
            drift(&mut snapshot);
            assert!(!in_order(&snapshot, &declared()), "{what}");
        }
    }

    #[test]
    fn a_rotated_tenant_checks_its_login_roles() {
        let mut snapshot = converged();
        snapshot
            .roles
            .get_mut("t_acme")
            .expect("in the fixture")
            .can_login = false;
        snapshot.roles.insert("t_acme_b".into(), login(Some("new")));
        snapshot.roles.insert(
            "t_acme_a".into(),
            RoleRow {
                can_login: false,
                ..login(None)
            },
        );
        let rotated = Declared {
            owner_logs_in: false,
            owner_password: None,
            login: Some(("t_acme_b", "new")),
            ..declared()
        };
        assert!(in_order(&snapshot, &rotated));

        // The retired login logs in again, by hand.
        let mut revived = snapshot.roles.clone();
        revived
            .get_mut("t_acme_a")
            .expect("in the fixture")
            .can_login = true;
        let drifted = Snapshot {
            roles: revived,
            ..converged()
        };
        assert!(!in_order(&drifted, &rotated));
        // ... unless it is the previous login, within its overlap.
        let overlap = Declared {
            also_logging_in: vec!["t_acme_a"],
            ..rotated
        };
        let mut in_overlap = drifted;
        in_overlap
            .roles
            .get_mut("t_acme")
            .expect("in the fixture")
            .can_login = false;
        assert!(in_order(&in_overlap, &overlap));

        // The login no longer switches to the owner, or lost its membership, or its password.
        type Drift = fn(&mut RoleRow);
        let drifts: [Drift; 3] = [
            |r| r.settings.clear(),
            |r| r.member_of.clear(),
            |r| r.password = Some(scram::verifier("by-hand")),
        ];
        let rotated = Declared {
            owner_logs_in: false,
            owner_password: None,
            login: Some(("t_acme_b", "new")),
            ..declared()
        };
        for drift in drifts {
            let mut s = Snapshot {
                roles: snapshot.roles.clone(),
                ..converged()
            };
            drift(s.roles.get_mut("t_acme_b").expect("in the fixture"));
            assert!(!in_order(&s, &rotated));
        }
        // The Secret's login is missing altogether.
        let mut s = Snapshot {
            roles: snapshot.roles.clone(),
            ..converged()
        };
        s.roles.remove("t_acme_b");
        assert!(!in_order(&s, &rotated));
    }
}
