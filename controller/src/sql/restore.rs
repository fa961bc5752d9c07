//! The login a restore runs as while its tenant is locked: a temporary role that is a member of
//! the tenant's role (so `pg_restore --role` makes the tenant the owner of what it creates, and
//! CONNECT on the tenant's database comes with the membership), dropped when the restore ends.

use sqlx::PgPool;

use super::{quote_ident, quote_literal};

/// The restore login of the tenant role `role`: `<role>_restore`, cut to fit.
pub fn login_name(role: &str) -> String {
    const SUFFIX: &str = "_restore";
    let keep = 63 - SUFFIX.len();
    let mut end = role.len().min(keep);
    while !role.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{SUFFIX}", &role[..end])
}

/// Creates (or resets) the restore login `login` of `role` with the password of `verifier`.
pub async fn create_login(
    pool: &PgPool,
    login: &str,
    role: &str,
    verifier: &str,
) -> Result<(), sqlx::Error> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)")
            .bind(login)
            .fetch_one(pool)
            .await?;
    let (login_q, role_q, password) = (
        quote_ident(login),
        quote_ident(role),
        quote_literal(verifier),
    );
    let sql = if exists {
        format!("ALTER ROLE {login_q} LOGIN PASSWORD {password}; GRANT {role_q} TO {login_q}")
    } else {
        format!("CREATE ROLE {login_q} LOGIN PASSWORD {password} IN ROLE {role_q}")
    };
    sqlx::raw_sql(&sql).execute(pool).await?;
    Ok(())
}

/// Ends the restore login's sessions and drops it.
pub async fn drop_login(pool: &PgPool, login: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity
          WHERE usename = $1",
    )
    .bind(login)
    .execute(pool)
    .await?;
    sqlx::raw_sql(&format!("DROP ROLE IF EXISTS {}", quote_ident(login)))
        .execute(pool)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_names_fit() {
        assert_eq!(login_name("t_shop_acme"), "t_shop_acme_restore");
        assert_eq!(login_name(&"x".repeat(63)).len(), 63);
    }
}
