//! The DDL that turns a tenant's declared state into a role and a database, and back.
//!
//! Every function here is idempotent: it reads the catalog, changes only what differs, and reports
//! what it changed, so a reconcile after a crash, or a resync after someone edited the server by
//! hand, converges on the declared state.

use sqlx::{PgPool, Row};

use super::{quote_ident, quote_literal, scram};

/// Prefix of the comment Silo puts on every tenant database; it marks the database as Silo's.
pub const COMMENT_ACTIVE: &str = "silo: tenant";
/// Prefix of the comment on a database whose Tenant was deleted with policy `Retain`.
pub const COMMENT_RETAINED: &str = "silo: retained";

/// The declared state of a tenant's role.
pub struct RoleSpec<'a> {
    pub role: &'a str,
    pub password: &'a str,
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
    DatabaseCreated,
    PublicAccessRevoked,
    ConnectGranted,
    OwnerRestored,
    Unretained,
}

impl Change {
    /// Whether this change repaired drift (as opposed to first-time provisioning).
    pub fn is_repair(self) -> bool {
        !matches!(self, Change::RoleCreated | Change::DatabaseCreated)
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Change::RoleCreated => "role created",
            Change::PasswordReset => "password reset to the Secret's",
            Change::LoginChanged => "login switched",
            Change::ConnectionLimitChanged => "connection limit restored",
            Change::DatabaseCreated => "database created",
            Change::PublicAccessRevoked => "PUBLIC access revoked",
            Change::ConnectGranted => "CONNECT granted to the tenant role",
            Change::OwnerRestored => "database ownership given back to the tenant role",
            Change::Unretained => "retained database taken back into use",
        })
    }
}

/// Makes the role exist with the declared password, LOGIN and CONNECTION LIMIT.
pub async fn ensure_role(
    pool: &PgPool,
    spec: &RoleSpec<'_>,
    verified: &scram::VerifiedPasswords,
) -> Result<Vec<Change>, sqlx::Error> {
    let role = quote_ident(spec.role);
    let login = if spec.login { "LOGIN" } else { "NOLOGIN" };
    let existing = sqlx::query("SELECT rolcanlogin, rolconnlimit FROM pg_roles WHERE rolname = $1")
        .bind(spec.role)
        .fetch_optional(pool)
        .await?;
    let Some(row) = existing else {
        let verifier = quote_literal(&scram::verifier(spec.password));
        let create = format!(
            "CREATE ROLE {role} {login} CONNECTION LIMIT {} PASSWORD {verifier}",
            spec.connection_limit
        );
        sqlx::raw_sql(&create).execute(pool).await?;
        return Ok(vec![Change::RoleCreated]);
    };

    let mut changes = Vec::new();
    let can_login: bool = row.try_get("rolcanlogin")?;
    let conn_limit: i32 = row.try_get("rolconnlimit")?;
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
    if !password_matches(pool, spec.role, spec.password, verified).await? {
        let verifier = quote_literal(&scram::verifier(spec.password));
        sqlx::raw_sql(&format!("ALTER ROLE {role} PASSWORD {verifier}"))
            .execute(pool)
            .await?;
        changes.push(Change::PasswordReset);
    }
    Ok(changes)
}

/// Whether the role's stored verifier matches `password`. Without the right to read `pg_authid`
/// (an admin that is not superuser) the answer is "no", so the password is simply set again.
async fn password_matches(
    pool: &PgPool,
    role: &str,
    password: &str,
    verified: &scram::VerifiedPasswords,
) -> Result<bool, sqlx::Error> {
    let stored = sqlx::query_scalar::<_, Option<String>>(
        "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
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

/// The outcome of [`ensure_database`] when the name is taken by a database Silo did not create
/// for this tenant.
#[derive(Debug)]
pub struct OwnedByOther {
    pub owner: String,
}

/// Makes the database exist, owned by the tenant role, with CONNECT for that role only.
/// `tenant` (`namespace/name`) is recorded in the database's comment.
pub async fn ensure_database(
    pool: &PgPool,
    database: &str,
    role: &str,
    tenant: &str,
) -> Result<Result<Vec<Change>, OwnedByOther>, sqlx::Error> {
    let db = quote_ident(database);
    let role_q = quote_ident(role);
    let existing = sqlx::query(
        "SELECT pg_get_userbyid(d.datdba) AS owner,
                shobj_description(d.oid, 'pg_database') AS comment,
                EXISTS (SELECT 1 FROM aclexplode(COALESCE(d.datacl, acldefault('d', d.datdba))) a
                        WHERE a.grantee = 0) AS public_access,
                has_database_privilege($2, d.oid, 'CONNECT') AS role_connect
           FROM pg_database d WHERE d.datname = $1",
    )
    .bind(database)
    .bind(role)
    .fetch_optional(pool)
    .await?;

    let mut changes = Vec::new();
    let (public_access, role_connect, comment) = match existing {
        None => {
            // CREATE DATABASE cannot run in a transaction block, so it goes alone.
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
            let comment: Option<String> = row.try_get("comment")?;
            if owner != role {
                // Ours by its comment (e.g. an admin reassigned it to drop the role): take it back.
                // Anyone else's database is never touched.
                if !is_silo_comment_for(comment.as_deref(), tenant) {
                    return Ok(Err(OwnedByOther { owner }));
                }
                sqlx::raw_sql(&format!("ALTER DATABASE {db} OWNER TO {role_q}"))
                    .execute(pool)
                    .await?;
                changes.push(Change::OwnerRestored);
            }
            (
                row.try_get("public_access")?,
                row.try_get("role_connect")?,
                comment,
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
    let active = format!("{COMMENT_ACTIVE} {tenant}");
    if comment.as_deref() != Some(active.as_str()) {
        if comment
            .as_deref()
            .is_some_and(|c| c.starts_with(COMMENT_RETAINED))
        {
            changes.push(Change::Unretained);
        }
        sqlx::raw_sql(&format!(
            "COMMENT ON DATABASE {db} IS {}",
            quote_literal(&active)
        ))
        .execute(pool)
        .await?;
    }
    Ok(Ok(changes))
}

/// Whether a database comment marks the database as this tenant's (active or retained).
fn is_silo_comment_for(comment: Option<&str>, tenant: &str) -> bool {
    let Some(comment) = comment else { return false };
    [COMMENT_ACTIVE, COMMENT_RETAINED].iter().any(|prefix| {
        comment
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix(' '))
            .is_some_and(|rest| rest == tenant || rest.starts_with(&format!("{tenant} ")))
    })
}

async fn server_version_num(pool: &PgPool) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
        .fetch_one(pool)
        .await
}

async fn own_public_schema(pool: &PgPool, database: &str, role: &str) -> Result<(), sqlx::Error> {
    // A one-off pool on the tenant database: this runs once per database, and only on PostgreSQL < 15.
    let options = pool.connect_options().as_ref().clone().database(database);
    let tenant_db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(options);
    let result = sqlx::raw_sql(&format!(
        "ALTER SCHEMA public OWNER TO {}",
        quote_ident(role)
    ))
    .execute(&tenant_db)
    .await;
    tenant_db.close().await;
    result.map(|_| ())
}

/// Whether `catalog` has a row whose `column` is `name`; catalog and column are constants here.
async fn exists(
    pool: &PgPool,
    catalog: &str,
    column: &str,
    name: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM {catalog} WHERE {column} = $1)"
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
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
          WHERE (datname = $1 OR usename = $2) AND pid <> pg_backend_pid()",
    )
    .bind(database)
    .bind(role)
    .fetch_one(pool)
    .await
}

/// Whether the database is this tenant's: owned by its role, or marked with its comment.
/// `None` when there is no such database.
async fn database_is_ours(
    pool: &PgPool,
    database: &str,
    role: &str,
    tenant: &str,
) -> Result<Option<(bool, String)>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT pg_get_userbyid(datdba) AS owner, shobj_description(oid, 'pg_database') AS comment
           FROM pg_database WHERE datname = $1",
    )
    .bind(database)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let owner: String = row.try_get("owner")?;
    let comment: Option<String> = row.try_get("comment")?;
    Ok(Some((
        owner == role || is_silo_comment_for(comment.as_deref(), tenant),
        owner,
    )))
}

/// The outcome of a deletion policy on the server.
#[derive(Debug, PartialEq, Eq)]
pub enum Cleanup {
    Done,
    /// The database of that name belongs to someone else (`owner`): nothing was touched.
    NotOurs {
        owner: String,
    },
}

/// Policy `Retain`: the role can no longer log in, CONNECT is revoked, sessions end, and the
/// database is marked as retained (with the tenant and time) for the DatabaseServer's status.
pub async fn lock_and_retain(
    pool: &PgPool,
    database: &str,
    role: &str,
    tenant: &str,
    at: &str,
) -> Result<Cleanup, sqlx::Error> {
    if let Some((false, owner)) = database_is_ours(pool, database, role, tenant).await? {
        return Ok(Cleanup::NotOurs { owner });
    }
    let db = quote_ident(database);
    let role_q = quote_ident(role);
    let role_exists = exists(pool, "pg_roles", "rolname", role).await?;
    if role_exists {
        sqlx::raw_sql(&format!("ALTER ROLE {role_q} NOLOGIN"))
            .execute(pool)
            .await?;
    }
    let db_exists = exists(pool, "pg_database", "datname", database).await?;
    if db_exists {
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
        let comment = format!("{COMMENT_RETAINED} {tenant} deleted {at}");
        sqlx::raw_sql(&format!(
            "COMMENT ON DATABASE {db} IS {}",
            quote_literal(&comment)
        ))
        .execute(pool)
        .await?;
    }
    terminate_sessions(pool, database, role).await?;
    Ok(Cleanup::Done)
}

/// Policy `Delete`: sessions end, the database and the role are dropped - never a database that
/// is not this tenant's, whatever its name.
pub async fn drop_tenant(
    pool: &PgPool,
    database: &str,
    role: &str,
    tenant: &str,
) -> Result<Cleanup, sqlx::Error> {
    if let Some((false, owner)) = database_is_ours(pool, database, role, tenant).await? {
        return Ok(Cleanup::NotOurs { owner });
    }
    let role_exists = exists(pool, "pg_roles", "rolname", role).await?;
    if role_exists {
        // No new sessions while the database goes away.
        sqlx::raw_sql(&format!("ALTER ROLE {} NOLOGIN", quote_ident(role)))
            .execute(pool)
            .await?;
    }
    terminate_sessions(pool, database, role).await?;
    sqlx::raw_sql(&format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        quote_ident(database)
    ))
    .execute(pool)
    .await?;
    sqlx::raw_sql(&format!("DROP ROLE IF EXISTS {}", quote_ident(role)))
        .execute(pool)
        .await?;
    Ok(Cleanup::Done)
}

/// Databases on this server that are retained after their Tenant was deleted.
pub async fn retained_databases(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT datname::text FROM pg_database
          WHERE shobj_description(oid, 'pg_database') LIKE $1 || '%' ORDER BY datname",
    )
    .bind(COMMENT_RETAINED)
    .fetch_all(pool)
    .await
}

/// What the DatabaseServer status reports about the server itself.
pub struct ServerFacts {
    pub version: String,
    pub can_provision: bool,
}

/// Version and whether the admin role may create roles and databases.
pub async fn server_facts(pool: &PgPool) -> Result<ServerFacts, sqlx::Error> {
    let row = sqlx::query(
        "SELECT current_setting('server_version') AS version,
                (rolsuper OR (rolcreatedb AND rolcreaterole)) AS can_provision
           FROM pg_roles WHERE rolname = current_user",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silo_comments_identify_their_tenant_exactly() {
        assert!(is_silo_comment_for(
            Some("silo: tenant prod/acme"),
            "prod/acme"
        ));
        assert!(is_silo_comment_for(
            Some("silo: retained prod/acme deleted 2026-01-01T00:00:00Z"),
            "prod/acme"
        ));
        assert!(!is_silo_comment_for(
            Some("silo: tenant prod/acme2"),
            "prod/acme"
        ));
        assert!(!is_silo_comment_for(Some("someone else's"), "prod/acme"));
        assert!(!is_silo_comment_for(None, "prod/acme"));
    }
}
