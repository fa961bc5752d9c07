//! The DDL that turns a tenant's declared state into a role and a database, and back.
//!
//! Every function here is idempotent: it reads the catalog, changes only what differs, and reports
//! what it changed, so a reconcile after a crash, or a resync after someone edited the server by
//! hand, converges on the declared state.

use sqlx::{PgPool, Row};

use super::identity::{
    COMMENT_RETAINED, COMMENT_TOMBSTONE, Claimant, Conflict, Identity, Observed, verdict,
};
use super::{quote_ident, quote_literal, scram};

/// The declared state of a tenant's role.
pub struct RoleSpec<'a> {
    pub role: &'a str,
    /// `None` once its password was rotated away: logins are the login roles', the owner's
    /// password is left as rotation set it.
    pub password: Option<&'a str>,
    pub connection_limit: i32,
    pub login: bool,
}

/// A change made to bring the server back to the declared state; reported in logs and Events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    RoleCreated,
    PasswordReset,
    LoginChanged,
    ConnectionLimitChanged,
    /// A login role made a member of the owner again, switching to it at login.
    LoginSwitchRestored,
    DatabaseCreated,
    PublicAccessRevoked,
    ConnectGranted,
    OwnerRestored,
    Unretained,
    /// A database kept under a tombstone (policy `Snapshot`) taken back within its grace period.
    Undeleted,
}

impl Change {
    /// Whether this change repaired drift (as opposed to first-time provisioning).
    pub fn is_repair(self) -> bool {
        !matches!(
            self,
            Change::RoleCreated | Change::DatabaseCreated | Change::Undeleted
        )
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Change::RoleCreated => "role created",
            Change::PasswordReset => "password reset to the Secret's",
            Change::LoginChanged => "login switched",
            Change::ConnectionLimitChanged => "connection limit restored",
            Change::LoginSwitchRestored => "login role switches to the tenant role again",
            Change::DatabaseCreated => "database created",
            Change::PublicAccessRevoked => "PUBLIC access revoked",
            Change::ConnectGranted => "CONNECT granted to the tenant role",
            Change::OwnerRestored => "database ownership given back to the tenant role",
            Change::Unretained => "retained database taken back into use",
            Change::Undeleted => "deleted database taken back from its tombstone",
        })
    }
}

/// What taking over an object with this comment is: a retained one taken back into use, or a
/// tombstoned one undeleted; nothing for a live one.
fn taken_back(comment: Option<&str>) -> Option<Change> {
    let identity = Identity::parse(comment).filter(|id| id.retained)?;
    Some(match identity.tombstone {
        Some(_) => Change::Undeleted,
        None => Change::Unretained,
    })
}

/// Whether `database` on this server lies under a tombstone of the Tenant `key`: where that
/// Tenant, applied again, must be placed to take its database back.
pub async fn has_tombstone_of(
    pool: &PgPool,
    database: &str,
    key: &str,
) -> Result<bool, sqlx::Error> {
    let comment: Option<Option<String>> = sqlx::query_scalar(
        "SELECT pg_catalog.shobj_description(oid, 'pg_database') FROM pg_catalog.pg_database
          WHERE datname = $1",
    )
    .bind(database)
    .fetch_optional(pool)
    .await?;
    Ok(Identity::parse(comment.flatten().as_deref())
        .is_some_and(|id| id.tombstone.is_some() && id.tenant == key))
}

/// Reads what the catalog holds under the tenant's role and database names, and whether the
/// tenant may use them ([`verdict`]). Nothing is changed before this says yes.
pub async fn claim(
    pool: &PgPool,
    role: &str,
    database: &str,
    tenant: &Claimant<'_>,
) -> Result<Result<(), Conflict>, sqlx::Error> {
    let role_row = sqlx::query_scalar::<_, Option<String>>(
        "SELECT pg_catalog.shobj_description(oid, 'pg_authid') FROM pg_catalog.pg_roles
          WHERE rolname = $1",
    )
    .bind(role)
    .fetch_optional(pool)
    .await?;
    let db_row = sqlx::query(
        "SELECT pg_catalog.pg_get_userbyid(datdba) AS owner,
                pg_catalog.shobj_description(oid, 'pg_database') AS comment
           FROM pg_catalog.pg_database WHERE datname = $1",
    )
    .bind(database)
    .fetch_optional(pool)
    .await?;
    let database_row = match db_row {
        Some(row) => Some((row.try_get("owner")?, row.try_get("comment")?)),
        None => None,
    };
    let observed = Observed {
        role: role_row,
        database: database_row,
    };
    Ok(verdict(&observed, role, database, tenant))
}

/// Makes the role exist with the declared password, LOGIN and CONNECTION LIMIT, and with the
/// tenant's identity as its comment. Call only after [`claim`] said the name is the tenant's.
pub async fn ensure_role(
    pool: &PgPool,
    spec: &RoleSpec<'_>,
    tenant: &Claimant<'_>,
    verified: &scram::VerifiedPasswords,
) -> Result<Vec<Change>, sqlx::Error> {
    let role = quote_ident(spec.role);
    let login = if spec.login { "LOGIN" } else { "NOLOGIN" };
    let comment = quote_literal(&tenant.active_comment());
    let existing = sqlx::query(
        "SELECT rolcanlogin, rolconnlimit,
                pg_catalog.shobj_description(oid, 'pg_authid') AS comment
           FROM pg_catalog.pg_roles WHERE rolname = $1",
    )
    .bind(spec.role)
    .fetch_optional(pool)
    .await?;
    let Some(row) = existing else {
        let password = spec
            .password
            .map_or("NULL".to_string(), |p| quote_literal(&scram::verifier(p)));
        // One implicit transaction: the role never exists without its identity.
        let create = format!(
            "CREATE ROLE {role} {login} CONNECTION LIMIT {} PASSWORD {password};
             COMMENT ON ROLE {role} IS {comment}",
            spec.connection_limit
        );
        sqlx::raw_sql(&create).execute(pool).await?;
        return Ok(vec![Change::RoleCreated]);
    };

    let mut changes = Vec::new();
    let can_login: bool = row.try_get("rolcanlogin")?;
    let conn_limit: i32 = row.try_get("rolconnlimit")?;
    let current_comment: Option<String> = row.try_get("comment")?;
    if current_comment.as_deref() != Some(tenant.active_comment().as_str()) {
        sqlx::raw_sql(&format!("COMMENT ON ROLE {role} IS {comment}"))
            .execute(pool)
            .await?;
        changes.extend(taken_back(current_comment.as_deref()));
    }
    if can_login != spec.login {
        sqlx::raw_sql(&format!("ALTER ROLE {role} {login}"))
            .execute(pool)
            .await?;
        changes.push(Change::LoginChanged);
    }
    if conn_limit != spec.connection_limit {
        sqlx::raw_sql(&format!(
            "ALTER ROLE {role} CONNECTION LIMIT {}",
            spec.connection_limit
        ))
        .execute(pool)
        .await?;
        changes.push(Change::ConnectionLimitChanged);
    }
    if let Some(password) = spec.password
        && !password_matches(pool, spec.role, password, verified).await?
    {
        let verifier = quote_literal(&scram::verifier(password));
        sqlx::raw_sql(&format!("ALTER ROLE {role} PASSWORD {verifier}"))
            .execute(pool)
            .await?;
        changes.push(Change::PasswordReset);
    }
    Ok(changes)
}

/// Whether the role's stored verifier matches `password`. Without the right to read `pg_authid`
/// (an admin that is not superuser) the answer is "no", so the password is simply set again.
pub(crate) async fn password_matches(
    pool: &PgPool,
    role: &str,
    password: &str,
    verified: &scram::VerifiedPasswords,
) -> Result<bool, sqlx::Error> {
    let stored = sqlx::query_scalar::<_, Option<String>>(
        "SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = $1",
    )
    .bind(role)
    .fetch_optional(pool)
    .await;
    match stored {
        Ok(stored) => Ok(stored
            .flatten()
            .is_some_and(|v| verified.matches(role, &v, password))),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => Ok(false),
        Err(e) => Err(e),
    }
}

/// Makes the database exist, owned by the tenant role, with CONNECT for that role only, and
/// with the tenant's identity as its comment. Call only after [`claim`] said the name is the
/// tenant's.
pub async fn ensure_database(
    pool: &PgPool,
    database: &str,
    role: &str,
    tenant: &Claimant<'_>,
) -> Result<Vec<Change>, sqlx::Error> {
    let db = quote_ident(database);
    let role_q = quote_ident(role);
    let existing = sqlx::query(
        "SELECT pg_catalog.pg_get_userbyid(d.datdba) AS owner,
                pg_catalog.shobj_description(d.oid, 'pg_database') AS comment,
                EXISTS (SELECT 1 FROM pg_catalog.aclexplode(
                            COALESCE(d.datacl, pg_catalog.acldefault('d', d.datdba))) a
                        WHERE a.grantee = 0) AS public_access,
                pg_catalog.has_database_privilege($2, d.oid, 'CONNECT') AS role_connect
           FROM pg_catalog.pg_database d WHERE d.datname = $1",
    )
    .bind(database)
    .bind(role)
    .fetch_optional(pool)
    .await?;

    let mut changes = Vec::new();
    let (public_access, role_connect, comment) = match existing {
        None => {
            // CREATE DATABASE cannot run in a transaction block, so it goes alone; until the
            // comment below lands, its owner (the tenant's role) is what makes it the tenant's.
            sqlx::raw_sql(&format!("CREATE DATABASE {db} OWNER {role_q}"))
                .execute(pool)
                .await?;
            changes.push(Change::DatabaseCreated);
            if server_version_num(pool).await? < 150000 {
                // Before PostgreSQL 15 the public schema belongs to the bootstrap superuser; from 15
                // on it belongs to pg_database_owner, i.e. to the tenant role already.
                own_public_schema(pool, database, role).await?;
            }
            (true, true, None)
        }
        Some(row) => {
            let owner: String = row.try_get("owner")?;
            if owner != role {
                // Ours by its identity (e.g. an admin reassigned it to drop the role): take it back.
                sqlx::raw_sql(&format!("ALTER DATABASE {db} OWNER TO {role_q}"))
                    .execute(pool)
                    .await?;
                changes.push(Change::OwnerRestored);
            }
            (
                row.try_get("public_access")?,
                row.try_get("role_connect")?,
                row.try_get::<Option<String>, _>("comment")?,
            )
        }
    };

    if public_access {
        sqlx::raw_sql(&format!("REVOKE ALL ON DATABASE {db} FROM PUBLIC"))
            .execute(pool)
            .await?;
        if !changes.contains(&Change::DatabaseCreated) {
            changes.push(Change::PublicAccessRevoked);
        }
    }
    if !role_connect || changes.contains(&Change::DatabaseCreated) {
        sqlx::raw_sql(&format!(
            "GRANT CONNECT, TEMPORARY ON DATABASE {db} TO {role_q}"
        ))
        .execute(pool)
        .await?;
        if !changes.contains(&Change::DatabaseCreated) {
            changes.push(Change::ConnectGranted);
        }
    }
    let active = tenant.active_comment();
    if comment.as_deref() != Some(active.as_str()) {
        changes.extend(taken_back(comment.as_deref()));
        sqlx::raw_sql(&format!(
            "COMMENT ON DATABASE {db} IS {}",
            quote_literal(&active)
        ))
        .execute(pool)
        .await?;
    }
    changes.dedup();
    Ok(changes)
}

async fn server_version_num(pool: &PgPool) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_catalog.current_setting('server_version_num')::int")
        .fetch_one(pool)
        .await
}

async fn own_public_schema(pool: &PgPool, database: &str, role: &str) -> Result<(), sqlx::Error> {
    // Runs once per database, and only on PostgreSQL < 15.
    let sql = format!("ALTER SCHEMA public OWNER TO {}", quote_ident(role));
    execute_on(pool, database, &sql).await
}

/// Whether `catalog` has a row whose `column` is `name`; catalog and column are constants here.
async fn exists(
    pool: &PgPool,
    catalog: &str,
    column: &str,
    name: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.{catalog} WHERE {column} = $1)"
    ))
    .bind(name)
    .fetch_one(pool)
    .await
}

/// Ends every session of the tenant's role or in its database. Returns how many were ended.
pub async fn terminate_sessions(
    pool: &PgPool,
    database: &str,
    role: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(pg_catalog.pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity
          WHERE (datname = $1 OR usename = $2) AND pid <> pg_catalog.pg_backend_pid()",
    )
    .bind(database)
    .bind(role)
    .fetch_one(pool)
    .await
}

/// As [`terminate_sessions`], sparing the sessions of `keep` (a restore's login).
pub async fn terminate_sessions_but(
    pool: &PgPool,
    database: &str,
    role: &str,
    keep: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(pg_catalog.pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity
          WHERE (datname = $1 OR usename = $2) AND usename IS DISTINCT FROM $3
            AND pid <> pg_catalog.pg_backend_pid()",
    )
    .bind(database)
    .bind(role)
    .bind(keep)
    .fetch_one(pool)
    .await
}

/// The outcome of a deletion policy on the server.
#[derive(Debug, PartialEq, Eq)]
pub enum Cleanup {
    Done,
    /// The role or database of that name belongs to someone else: nothing was touched.
    NotOurs(Conflict),
}

/// Policy `Retain`: the role can no longer log in, CONNECT is revoked, sessions end, and the
/// role and database are marked as retained (with the tenant and time) for the DatabaseServer's
/// status - never a role or database that is not this tenant's, whatever its name.
pub async fn lock_and_retain(
    pool: &PgPool,
    database: &str,
    role: &str,
    tenant: &Claimant<'_>,
    at: &str,
) -> Result<Cleanup, sqlx::Error> {
    if let Err(conflict) = claim(pool, role, database, tenant).await? {
        return Ok(Cleanup::NotOurs(conflict));
    }
    lock(pool, database, role, None).await?;
    mark(pool, database, role, &tenant.retained_comment(at)).await?;
    Ok(Cleanup::Done)
}

/// Locks a tenant whose names were claimed: its role can no longer log in, CONNECT is revoked
/// from it and from PUBLIC, and its sessions end - but those of `spare` (the login a final
/// backup runs as), which keeps its own CONNECT.
pub async fn lock(
    pool: &PgPool,
    database: &str,
    role: &str,
    spare: Option<&str>,
) -> Result<(), sqlx::Error> {
    let db = quote_ident(database);
    let role_q = quote_ident(role);
    let role_exists = exists(pool, "pg_roles", "rolname", role).await?;
    if role_exists {
        sqlx::raw_sql(&format!("ALTER ROLE {role_q} NOLOGIN"))
            .execute(pool)
            .await?;
    }
    // Its login roles connect through its CONNECT, revoked below; and log in no more.
    super::rotation::lock_logins(pool, role).await?;
    if exists(pool, "pg_database", "datname", database).await? {
        sqlx::raw_sql(&format!("REVOKE ALL ON DATABASE {db} FROM PUBLIC"))
            .execute(pool)
            .await?;
        if role_exists {
            sqlx::raw_sql(&format!(
                "REVOKE CONNECT, TEMPORARY ON DATABASE {db} FROM {role_q}"
            ))
            .execute(pool)
            .await?;
        }
    }
    match spare {
        Some(login) => terminate_sessions_but(pool, database, role, login).await?,
        None => terminate_sessions(pool, database, role).await?,
    };
    Ok(())
}

/// Writes `comment` (a retained or tombstone identity) on the role and the database, where they
/// exist.
pub async fn mark(
    pool: &PgPool,
    database: &str,
    role: &str,
    comment: &str,
) -> Result<(), sqlx::Error> {
    let comment = quote_literal(comment);
    if exists(pool, "pg_roles", "rolname", role).await? {
        sqlx::raw_sql(&format!(
            "COMMENT ON ROLE {} IS {comment}",
            quote_ident(role)
        ))
        .execute(pool)
        .await?;
    }
    if exists(pool, "pg_database", "datname", database).await? {
        sqlx::raw_sql(&format!(
            "COMMENT ON DATABASE {} IS {comment}",
            quote_ident(database)
        ))
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Policy `Delete`: sessions end, the database and the role are dropped - never a role or
/// database that is not this tenant's, whatever its name.
pub async fn drop_tenant(
    pool: &PgPool,
    database: &str,
    role: &str,
    tenant: &Claimant<'_>,
) -> Result<Cleanup, sqlx::Error> {
    if let Err(conflict) = claim(pool, role, database, tenant).await? {
        return Ok(Cleanup::NotOurs(conflict));
    }
    let role_exists = exists(pool, "pg_roles", "rolname", role).await?;
    if role_exists {
        // No new sessions while the database goes away.
        sqlx::raw_sql(&format!("ALTER ROLE {} NOLOGIN", quote_ident(role)))
            .execute(pool)
            .await?;
    }
    super::rotation::lock_logins(pool, role).await?;
    terminate_sessions(pool, database, role).await?;
    sqlx::raw_sql(&format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        quote_ident(database)
    ))
    .execute(pool)
    .await?;
    super::rotation::drop_logins(pool, role).await?;
    sqlx::raw_sql(&format!("DROP ROLE IF EXISTS {}", quote_ident(role)))
        .execute(pool)
        .await?;
    Ok(Cleanup::Done)
}

/// Databases on this server that are retained after their Tenant was deleted.
pub async fn retained_databases(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT datname::text FROM pg_catalog.pg_database
          WHERE pg_catalog.shobj_description(oid, 'pg_database') LIKE $1 || '%' ORDER BY datname",
    )
    .bind(COMMENT_RETAINED)
    .fetch_all(pool)
    .await
}

/// A database kept after its Tenant was deleted with policy `Snapshot`, and its tombstone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TombstoneRow {
    pub database: String,
    /// The database's owner: the deleted tenant's role.
    pub owner: String,
    pub identity: Identity,
    /// The comment as it stands, which a purge checks again before it drops anything.
    pub comment: String,
}

/// The tombstones on this server, soonest purge first.
pub async fn tombstones(pool: &PgPool) -> Result<Vec<TombstoneRow>, sqlx::Error> {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT d.datname::text, pg_catalog.pg_get_userbyid(d.datdba)::text,
                pg_catalog.shobj_description(d.oid, 'pg_database')
           FROM pg_catalog.pg_database d
          WHERE pg_catalog.shobj_description(d.oid, 'pg_database') LIKE $1 || ' %'",
    )
    .bind(COMMENT_TOMBSTONE)
    .fetch_all(pool)
    .await?;
    let mut out: Vec<TombstoneRow> = rows
        .into_iter()
        .filter_map(|(database, owner, comment)| {
            let identity = Identity::parse(Some(&comment)).filter(|i| i.tombstone.is_some())?;
            Some(TombstoneRow {
                database,
                owner,
                identity,
                comment,
            })
        })
        .collect();
    out.sort_by(|a, b| {
        let purge = |r: &TombstoneRow| r.identity.tombstone.as_ref().map(|t| t.purge_after.clone());
        purge(a)
            .cmp(&purge(b))
            .then_with(|| a.database.cmp(&b.database))
    });
    Ok(out)
}

/// Whether the purge dropped the database, or found that it had changed hands meanwhile.
#[derive(Debug, PartialEq, Eq)]
pub enum Purge {
    Purged,
    /// The comment is no longer this tombstone (the Tenant was applied again): nothing dropped.
    TakenBack,
}

/// The end of a grace period: the database and the role of `row` are dropped, if the database
/// still carries the very tombstone that was read (an undelete in between wins) and the role is
/// the same deleted tenant's.
pub async fn purge(pool: &PgPool, row: &TombstoneRow) -> Result<Purge, sqlx::Error> {
    let current: Option<Option<String>> = sqlx::query_scalar(
        "SELECT pg_catalog.shobj_description(oid, 'pg_database') FROM pg_catalog.pg_database
          WHERE datname = $1",
    )
    .bind(&row.database)
    .fetch_optional(pool)
    .await?;
    match current {
        None => return Ok(Purge::Purged),
        Some(comment) if comment.as_deref() != Some(row.comment.as_str()) => {
            return Ok(Purge::TakenBack);
        }
        Some(_) => {}
    }
    sqlx::raw_sql(&format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        quote_ident(&row.database)
    ))
    .execute(pool)
    .await?;
    let role_comment: Option<Option<String>> = sqlx::query_scalar(
        "SELECT pg_catalog.shobj_description(oid, 'pg_authid') FROM pg_catalog.pg_roles
          WHERE rolname = $1",
    )
    .bind(&row.owner)
    .fetch_optional(pool)
    .await?;
    let role_is_the_tenants = role_comment
        .flatten()
        .as_deref()
        .and_then(|c| Identity::parse(Some(c)))
        .is_some_and(|id| id.tombstone.is_some() && id.tenant == row.identity.tenant);
    if role_is_the_tenants {
        super::rotation::drop_logins(pool, &row.owner).await?;
        sqlx::raw_sql(&format!("DROP ROLE IF EXISTS {}", quote_ident(&row.owner)))
            .execute(pool)
            .await?;
    }
    Ok(Purge::Purged)
}

/// The databases every PostgreSQL server has, that no tenant needs: what PUBLIC may do there,
/// every tenant role may do.
pub const MAINTENANCE_DATABASES: [&str; 2] = ["postgres", "template1"];

/// A default grant to PUBLIC in a maintenance database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublicGrant {
    Connect { database: String },
    Create { database: String, schema: String },
}

impl std::fmt::Display for PublicGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublicGrant::Connect { database } => write!(f, "CONNECT to database {database}"),
            PublicGrant::Create { database, schema } => {
                write!(f, "CREATE in schema {schema} of database {database}")
            }
        }
    }
}

/// What PUBLIC may do in the maintenance databases. `pool` is an admin pool on `postgres`; the
/// other databases get a short connection of their own.
pub async fn public_grants(pool: &PgPool) -> Result<Vec<PublicGrant>, sqlx::Error> {
    let mut grants = Vec::new();
    for database in MAINTENANCE_DATABASES {
        let connect: Option<bool> = sqlx::query_scalar(
            "SELECT pg_catalog.has_database_privilege('public', oid, 'CONNECT')
               FROM pg_catalog.pg_database WHERE datname = $1 AND datallowconn",
        )
        .bind(database)
        .fetch_optional(pool)
        .await?;
        let Some(connect) = connect else { continue };
        if connect {
            grants.push(PublicGrant::Connect {
                database: database.to_string(),
            });
        }
        let other = pool_on(pool, database);
        let schemas: Result<Vec<String>, _> = sqlx::query_scalar(
            "SELECT nspname::text FROM pg_catalog.pg_namespace
              WHERE pg_catalog.has_schema_privilege('public', oid, 'CREATE')
              ORDER BY nspname",
        )
        .fetch_all(&other)
        .await;
        other.close().await;
        let schemas = schemas?;
        grants.extend(schemas.into_iter().map(|schema| PublicGrant::Create {
            database: database.to_string(),
            schema,
        }));
    }
    Ok(grants)
}

/// Revokes `grants` from PUBLIC (CREATE first, while the admin can still reach the database).
pub async fn revoke_public_grants(
    pool: &PgPool,
    grants: &[PublicGrant],
) -> Result<(), sqlx::Error> {
    for grant in grants {
        if let PublicGrant::Create { database, schema } = grant {
            let sql = format!(
                "REVOKE CREATE ON SCHEMA {} FROM PUBLIC",
                quote_ident(schema)
            );
            execute_on(pool, database, &sql).await?;
        }
    }
    for grant in grants {
        if let PublicGrant::Connect { database } = grant {
            sqlx::raw_sql(&format!(
                "REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC",
                quote_ident(database)
            ))
            .execute(pool)
            .await?;
        }
    }
    Ok(())
}

/// A one-connection admin pool on another database of the same server, with the same settings
/// (close it after use). A pool rather than a bare connection: sqlx's pool executor keeps the
/// reconcile futures `Send` where `&mut PgConnection` does not.
fn pool_on(pool: &PgPool, database: &str) -> PgPool {
    let options = pool.connect_options().as_ref().clone().database(database);
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(options)
}

/// Runs one statement on a one-off admin connection to `database`.
async fn execute_on(pool: &PgPool, database: &str, sql: &str) -> Result<(), sqlx::Error> {
    let other = pool_on(pool, database);
    let result = sqlx::raw_sql(sql).execute(&other).await;
    other.close().await;
    result.map(|_| ())
}

/// What the DatabaseServer status reports about the server itself.
pub struct ServerFacts {
    pub version: String,
    pub can_provision: bool,
}

/// Version and whether the admin role may create roles and databases.
pub async fn server_facts(pool: &PgPool) -> Result<ServerFacts, sqlx::Error> {
    let row = sqlx::query(
        "SELECT pg_catalog.current_setting('server_version') AS version,
                (rolsuper OR (rolcreatedb AND rolcreaterole)) AS can_provision
           FROM pg_catalog.pg_roles WHERE rolname = current_user",
    )
    .fetch_one(pool)
    .await?;
    let version: String = row.try_get("version")?;
    Ok(ServerFacts {
        // "15.18 (Debian 15.18-0+deb12u1)" -> "15.18"
        version: version
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string(),
        can_provision: row.try_get("can_provision")?,
    })
}
