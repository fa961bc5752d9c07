//! The login roles of password rotation (see `tenant::rotation` for the plan): members of the
//! tenant's owner role that switch to it at login (`ALTER ROLE ... SET role`), so that what any
//! of them creates belongs to the owner. Like the rest of the DDL, each function reads the
//! catalog first and changes only what differs: a resync of a converged tenant sends no DDL.

use sqlx::{PgPool, Row};

use super::ddl::{Change, password_matches};
use super::{quote_ident, quote_literal, scram};

/// The comment on a login role: whose it is (never parsed as a tenant identity).
pub fn login_comment(owner: &str) -> String {
    format!("silo: login of role {owner}")
}

/// The declared state of one login role.
pub struct LoginSpec<'a> {
    pub login: &'a str,
    pub owner: &'a str,
    pub password: &'a str,
    pub connection_limit: i32,
    pub can_login: bool,
}

/// A role of a login's name that is not that login (its comment says otherwise): never taken over.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("role {login} exists and is not a login of role {owner}; it is left alone")]
    NotOurs { login: String, owner: String },
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// Makes `login` exist as declared: a member of the owner that switches to it at login, with the
/// password, connection limit and LOGIN declared. One implicit transaction when it is created:
/// the role never exists without its membership, its `SET role` and its comment.
pub async fn ensure_login(
    pool: &PgPool,
    spec: &LoginSpec<'_>,
    verified: &scram::VerifiedPasswords,
) -> Result<Vec<Change>, LoginError> {
    let (login, owner) = (quote_ident(spec.login), quote_ident(spec.owner));
    let comment = quote_literal(&login_comment(spec.owner));
    let can_login = if spec.can_login { "LOGIN" } else { "NOLOGIN" };
    let row = sqlx::query(
        "SELECT r.rolcanlogin, r.rolconnlimit,
                pg_catalog.shobj_description(r.oid, 'pg_authid') AS comment,
                pg_catalog.pg_has_role(r.oid, o.oid, 'MEMBER') AS member,
                EXISTS (SELECT 1 FROM pg_catalog.pg_db_role_setting s
                         WHERE s.setrole = r.oid AND s.setdatabase = 0
                           AND EXISTS (SELECT 1 FROM unnest(s.setconfig) c
                                        WHERE c IN ('role=' || o.rolname,
                                                    'role=' || pg_catalog.quote_ident(o.rolname))))
                  AS switches
           FROM pg_catalog.pg_roles r, pg_catalog.pg_roles o
          WHERE r.rolname = $1 AND o.rolname = $2",
    )
    .bind(spec.login)
    .bind(spec.owner)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else {
        let verifier = quote_literal(&scram::verifier(spec.password));
        sqlx::raw_sql(&format!(
            "CREATE ROLE {login} {can_login} CONNECTION LIMIT {} PASSWORD {verifier} IN ROLE {owner};
             ALTER ROLE {login} SET role = {owner};
             COMMENT ON ROLE {login} IS {comment}",
            spec.connection_limit
        ))
        .execute(pool)
        .await?;
        return Ok(vec![Change::RoleCreated]);
    };
    if row.try_get::<Option<String>, _>("comment")?.as_deref()
        != Some(login_comment(spec.owner).as_str())
    {
        return Err(LoginError::NotOurs {
            login: spec.login.to_string(),
            owner: spec.owner.to_string(),
        });
    }
    let mut changes = Vec::new();
    let mut sql = Vec::new();
    if !row.try_get::<bool, _>("member")? || !row.try_get::<bool, _>("switches")? {
        sql.push(format!(
            "GRANT {owner} TO {login}; ALTER ROLE {login} SET role = {owner}"
        ));
        changes.push(Change::LoginSwitchRestored);
    }
    if row.try_get::<bool, _>("rolcanlogin")? != spec.can_login {
        sql.push(format!("ALTER ROLE {login} {can_login}"));
        changes.push(Change::LoginChanged);
    }
    if row.try_get::<i32, _>("rolconnlimit")? != spec.connection_limit {
        sql.push(format!(
            "ALTER ROLE {login} CONNECTION LIMIT {}",
            spec.connection_limit
        ));
        changes.push(Change::ConnectionLimitChanged);
    }
    if !password_matches(pool, spec.login, spec.password, verified).await? {
        let verifier = quote_literal(&scram::verifier(spec.password));
        sql.push(format!("ALTER ROLE {login} PASSWORD {verifier}"));
        changes.push(Change::PasswordReset);
    }
    if !sql.is_empty() {
        sqlx::raw_sql(&sql.join(";\n")).execute(pool).await?;
    }
    Ok(changes)
}

/// `role` can no longer log in, and its password is gone (the end of an overlap, or a login
/// not in use); the sessions it opened keep running. Nothing is sent when it already is so.
/// Returns whether it changed.
pub async fn retire(pool: &PgPool, role: &str) -> Result<bool, sqlx::Error> {
    let authid = sqlx::query_scalar(
        "SELECT NOT rolcanlogin AND rolpassword IS NULL FROM pg_catalog.pg_authid WHERE rolname = $1",
    )
    .bind(role)
    .fetch_optional(pool)
    .await;
    let retired: Option<bool> = match authid {
        Ok(retired) => retired,
        // An admin that may not read pg_authid: NOLOGIN is all it can see (and its password
        // went with the NOLOGIN this function gave).
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => {
            sqlx::query_scalar("SELECT NOT rolcanlogin FROM pg_catalog.pg_roles WHERE rolname = $1")
                .bind(role)
                .fetch_optional(pool)
                .await?
        }
        Err(e) => return Err(e),
    };
    if retired == Some(false) {
        sqlx::raw_sql(&format!(
            "ALTER ROLE {} NOLOGIN PASSWORD NULL",
            quote_ident(role)
        ))
        .execute(pool)
        .await?;
        return Ok(true);
    }
    Ok(false)
}

/// Gives `role` LOGIN or takes it away, unless it already is so. Returns whether it changed.
pub async fn set_can_login(
    pool: &PgPool,
    role: &str,
    can_login: bool,
) -> Result<bool, sqlx::Error> {
    let current: Option<bool> =
        sqlx::query_scalar("SELECT rolcanlogin FROM pg_catalog.pg_roles WHERE rolname = $1")
            .bind(role)
            .fetch_optional(pool)
            .await?;
    if current.is_some_and(|c| c != can_login) {
        let login = if can_login { "LOGIN" } else { "NOLOGIN" };
        sqlx::raw_sql(&format!("ALTER ROLE {} {login}", quote_ident(role)))
            .execute(pool)
            .await?;
        return Ok(true);
    }
    Ok(false)
}

/// The login roles of `owner` that exist on the server (by name and comment: a role of such a
/// name that is not one is never touched).
pub async fn existing_logins(pool: &PgPool, owner: &str) -> Result<Vec<String>, sqlx::Error> {
    let logins = silo_crds::contract::login_roles(owner);
    sqlx::query_scalar(
        "SELECT rolname FROM pg_catalog.pg_roles
          WHERE rolname = ANY($1) AND pg_catalog.shobj_description(oid, 'pg_authid') = $2
          ORDER BY rolname",
    )
    .bind(&logins[..])
    .bind(login_comment(owner))
    .fetch_all(pool)
    .await
}

/// Locks the login roles of `owner` (NOLOGIN) with it; their sessions are ended with the
/// database's.
pub async fn lock_logins(pool: &PgPool, owner: &str) -> Result<(), sqlx::Error> {
    for login in existing_logins(pool, owner).await? {
        sqlx::raw_sql(&format!("ALTER ROLE {} NOLOGIN", quote_ident(&login)))
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Drops the login roles of `owner` (with the tenant: policy Delete, or a purge), ending their
/// sessions. They own nothing: what they created belongs to the owner.
pub async fn drop_logins(pool: &PgPool, owner: &str) -> Result<(), sqlx::Error> {
    for login in existing_logins(pool, owner).await? {
        sqlx::query(
            "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity
              WHERE usename = $1 AND pid <> pg_catalog.pg_backend_pid()",
        )
        .bind(&login)
        .execute(pool)
        .await?;
        sqlx::raw_sql(&format!("DROP ROLE IF EXISTS {}", quote_ident(&login)))
            .execute(pool)
            .await?;
    }
    Ok(())
}
