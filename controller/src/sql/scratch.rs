//! Scratch databases: where a verifying backup restores its dump to count rows, owned by the
//! tenant's role (the runner restores as the tenant), marked so that one left behind by a crash
//! is recognised and dropped.

use sqlx::PgPool;

use super::{quote_ident, quote_literal};

/// The comment that marks a scratch database.
const MARK: &str = "silo scratch database of ";

/// The scratch database of a backup of `database`: `<database>_verify`, cut to fit.
pub fn scratch_name(database: &str) -> String {
    const SUFFIX: &str = "_verify";
    let keep = 63 - SUFFIX.len();
    let mut end = database.len().min(keep);
    while !database.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{SUFFIX}", &database[..end])
}

/// Creates the scratch database `name` owned by `role`, empty; one left from an earlier attempt
/// is dropped first. Only the owner may connect.
pub async fn create(
    pool: &PgPool,
    name: &str,
    role: &str,
    backup: &str,
) -> Result<(), sqlx::Error> {
    drop_scratch(pool, name).await?;
    let db = quote_ident(name);
    sqlx::raw_sql(&format!("CREATE DATABASE {db} OWNER {}", quote_ident(role)))
        .execute(pool)
        .await?;
    sqlx::raw_sql(&format!(
        "REVOKE ALL ON DATABASE {db} FROM PUBLIC; COMMENT ON DATABASE {db} IS {}",
        quote_literal(&format!("{MARK}{backup}"))
    ))
    .execute(pool)
    .await?;
    Ok(())
}

/// Drops the scratch database `name`, if it is one (a database of that name without the mark is
/// never touched).
pub async fn drop_scratch(pool: &PgPool, name: &str) -> Result<(), sqlx::Error> {
    let marked: Option<bool> = sqlx::query_scalar(
        "SELECT coalesce(pg_catalog.shobj_description(oid, 'pg_database'), '') LIKE $2 || '%'
           FROM pg_catalog.pg_database WHERE datname = $1",
    )
    .bind(name)
    .bind(MARK)
    .fetch_optional(pool)
    .await?;
    if marked == Some(true) {
        sqlx::raw_sql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            quote_ident(name)
        ))
        .execute(pool)
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_names_fit() {
        assert_eq!(scratch_name("t_shop_acme"), "t_shop_acme_verify");
        let long = "t_".to_string() + &"x".repeat(61);
        assert_eq!(scratch_name(&long).len(), 63);
    }
}
