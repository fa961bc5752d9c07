//! The logins Jobs run as while their tenant is locked: temporary roles that are members of the
//! tenant's role, dropped when the Job ends. A restore's (`<role>_restore`): `pg_restore --role`
//! makes the tenant the owner of what it creates, and CONNECT comes with the membership. A final
//! backup's (`<role>_final`): reads everything the tenant owns, with a CONNECT of its own, since a
//! deleted tenant's role has lost its CONNECT.

use sqlx::PgPool;

use super::{quote_ident, quote_literal};

/// The restore login of the tenant role `role`: `<role>_restore`, cut to fit.
pub fn login_name(role: &str) -> String {
    with_suffix(role, "_restore")
}

/// The final backup's login of the tenant role `role`: `<role>_final`, cut to fit.
pub fn final_login_name(role: &str) -> String {
    with_suffix(role, "_final")
}

fn with_suffix(role: &str, suffix: &str) -> String {
    let keep = 63 - suffix.len();
    let mut end = role.len().min(keep);
    while !role.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{suffix}", &role[..end])
}

/// Gives `login` CONNECT on `database` in its own right.
pub async fn grant_connect(pool: &PgPool, login: &str, database: &str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(&format!(
        "GRANT CONNECT ON DATABASE {} TO {}",
        quote_ident(database),
        quote_ident(login)
    ))
    .execute(pool)
    .await?;
    Ok(())
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

/// Takes back what [`grant_connect`] gave (a grant the role could not be dropped with), if the
/// login still exists.
pub async fn revoke_connect(pool: &PgPool, login: &str, database: &str) -> Result<(), sqlx::Error> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)")
            .bind(login)
            .fetch_one(pool)
            .await?;
    if exists {
        sqlx::raw_sql(&format!(
            "REVOKE ALL ON DATABASE {} FROM {}",
            quote_ident(database),
            quote_ident(login)
        ))
        .execute(pool)
        .await?;
    }
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
        assert_eq!(final_login_name("t_shop_acme"), "t_shop_acme_final");
        assert_eq!(final_login_name(&"x".repeat(63)).len(), 63);
    }
}
