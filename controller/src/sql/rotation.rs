//! The login roles of password rotation (see `tenant::rotation` for the plan): members of the
//! tenant's owner role that switch to it at login (`ALTER ROLE ... SET role`), so that what any
//! of them creates belongs to the owner. Not wired in yet.

use sqlx::PgPool;

use super::{quote_ident, quote_literal};

/// Creates `login` (LOGIN, the password of `verifier`, member of `owner`, switching to it at
/// login, commented with the tenant's identity `comment`), or gives an existing one that password
/// and LOGIN back. One implicit transaction each way: the role never exists without its identity
/// and its `SET role`.
pub async fn ensure_login(
    pool: &PgPool,
    login: &str,
    owner: &str,
    verifier: &str,
    comment: &str,
) -> Result<(), sqlx::Error> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)")
            .bind(login)
            .fetch_one(pool)
            .await?;
    let (login_q, owner_q) = (quote_ident(login), quote_ident(owner));
    let (password, comment) = (quote_literal(verifier), quote_literal(comment));
    let sql = if exists {
        format!(
            "ALTER ROLE {login_q} LOGIN PASSWORD {password}; GRANT {owner_q} TO {login_q};
             ALTER ROLE {login_q} SET role = {owner_q}; COMMENT ON ROLE {login_q} IS {comment}"
        )
    } else {
        format!(
            "CREATE ROLE {login_q} LOGIN PASSWORD {password} IN ROLE {owner_q};
             ALTER ROLE {login_q} SET role = {owner_q}; COMMENT ON ROLE {login_q} IS {comment}"
        )
    };
    sqlx::raw_sql(&sql).execute(pool).await?;
    Ok(())
}

/// The end of an overlap: `login` can no longer log in, and its password is gone; the sessions
/// it opened keep running.
pub async fn retire_login(pool: &PgPool, login: &str) -> Result<(), sqlx::Error> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)")
            .bind(login)
            .fetch_one(pool)
            .await?;
    if exists {
        sqlx::raw_sql(&format!(
            "ALTER ROLE {} NOLOGIN PASSWORD NULL",
            quote_ident(login)
        ))
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Drops the login roles (with the tenant: policy Delete, or a purge), ending their sessions.
pub async fn drop_logins(pool: &PgPool, logins: &[String]) -> Result<(), sqlx::Error> {
    for login in logins {
        sqlx::query(
            "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity
              WHERE usename = $1 AND pid <> pg_catalog.pg_backend_pid()",
        )
        .bind(login)
        .execute(pool)
        .await?;
        sqlx::raw_sql(&format!("DROP ROLE IF EXISTS {}", quote_ident(login)))
            .execute(pool)
            .await?;
    }
    Ok(())
}
