//! What the controller, the router and the tests agree on outside the API types: the tenant
//! credentials Secret (name, keys, labels) and the annotations and labels Silo puts on objects.

/// The tenant credentials Secret: `<tenant>-db` in the Tenant's namespace.
pub fn secret_name(tenant_name: &str) -> String {
    format!("{tenant_name}-db")
}

/// The tenant whose credentials Secret is named `secret_name`, by the rule of [`secret_name`].
pub fn secret_tenant(secret_name: &str) -> Option<&str> {
    secret_name.strip_suffix("-db").filter(|t| !t.is_empty())
}

/// Keys of the tenant credentials Secret.
pub mod keys {
    /// Host of the tenant's PostgreSQL server, for clients that connect directly.
    pub const HOST: &str = "host";
    /// Port of the tenant's PostgreSQL server.
    pub const PORT: &str = "port";
    /// The tenant's database.
    pub const DBNAME: &str = "dbname";
    /// The tenant's login role: its owner role, or one of its [`login_roles`](super::login_roles)
    /// once its password was rotated.
    pub const USER: &str = "user";
    /// The login's password.
    pub const PASSWORD: &str = "password";
    /// During a rotation's overlap: the previous login and its password, which still work (the
    /// router accepts both passwords until these keys go).
    pub const PREVIOUS_USER: &str = "previous-user";
    pub const PREVIOUS_PASSWORD: &str = "previous-password";
    /// For a moment before a rotation switches the Secret: the next login and its password,
    /// proved to work, which the router accepts before any client can read them as `password`.
    pub const NEXT_USER: &str = "next-user";
    pub const NEXT_PASSWORD: &str = "next-password";
    /// A `DATABASE_URL` to the server.
    pub const URI: &str = "uri";
    /// The same through the router, when one is deployed.
    pub const ROUTER_URI: &str = "router-uri";
}

/// Label on every object Silo manages (`app.kubernetes.io/managed-by=silo`).
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "silo";
/// The selector that finds Silo's tenant Secrets.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=silo";
/// Label naming the Tenant a Secret belongs to.
pub const TENANT_LABEL: &str = "silo.dev/tenant";
/// Label on the Secret of a deleted tenant whose database was retained.
pub const RETAINED_LABEL: &str = "silo.dev/retained";
/// Label naming the SchemaRollout a migration Job runs for.
pub const ROLLOUT_LABEL: &str = "silo.dev/rollout";
/// Label on a migration Job: a hash of the schema version it migrates to (versions are free text,
/// label values are not).
pub const SCHEMA_VERSION_LABEL: &str = "silo.dev/schema-version-hash";

/// Label naming the TenantBackup a backup Job runs for.
pub const BACKUP_LABEL: &str = "silo.dev/backup";
/// Label on a TenantBackup the controller created on its schedule (retention applies to those).
pub const SCHEDULED_LABEL: &str = "silo.dev/scheduled";
/// Label on a backup Job (final ones included): the DatabaseServer it dumps from, cut and hashed
/// past 63 characters; `backups.maxConcurrentPerServer` counts by it.
pub const SERVER_LABEL: &str = "silo.dev/server";
/// Label naming the TenantRestore a restore Job runs for.
pub const RESTORE_LABEL: &str = "silo.dev/restore";
/// On the final TenantBackup of a Tenant deleted with policy `Snapshot` (in the controller's
/// final-backup namespace), and on its Job and login Secret: the deleted Tenant's uid.
pub const FINAL_BACKUP_LABEL: &str = "silo.dev/final-backup-of";
/// On a final TenantBackup: the deleted Tenant's namespace (its name is in [`TENANT_LABEL`]).
pub const TENANT_NAMESPACE_LABEL: &str = "silo.dev/tenant-namespace";
/// On a Tenant: a new value asks for one password rotation.
pub const ROTATE_ANNOTATION: &str = "silo.dev/rotate";
/// On a tenant Secret, the state of password rotation, changed in the same write as the
/// credentials: when the previous password stops working, when the last rotation was, and the
/// value of [`ROTATE_ANNOTATION`] it honoured.
pub const PREVIOUS_UNTIL_ANNOTATION: &str = "silo.dev/previous-until";
/// When the next login was put in the Secret (see [`keys::NEXT_USER`]).
pub const NEXT_SINCE_ANNOTATION: &str = "silo.dev/next-since";
pub const ROTATED_AT_ANNOTATION: &str = "silo.dev/rotated-at";
pub const ROTATE_HONOURED_ANNOTATION: &str = "silo.dev/rotate-honoured";

/// The two login roles of a tenant whose owner role is `owner`, used in turn by password
/// rotation: `<owner>_a` and `<owner>_b`, cut to PostgreSQL's 63 bytes (a derived tenant name
/// never has a third single `_`, so no tenant's owner role can be one of them). They are members
/// of the owner and switch to it at login, so what they create belongs to the owner.
pub fn login_roles(owner: &str) -> [String; 2] {
    ["_a", "_b"].map(|suffix| {
        let mut end = owner.len().min(63 - suffix.len());
        while !owner.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}{suffix}", &owner[..end])
    })
}

/// On a final TenantBackup: when its retention ends and it may be deleted, object included.
pub const EXPIRES_ANNOTATION: &str = "silo.dev/expires";

/// Annotation on a migration Job: a hash of the rollout's template and `retry` it was started
/// with. A failed Job of another attempt is deleted and its tenant migrated again.
pub const ATTEMPT_ANNOTATION: &str = "silo.dev/attempt";

/// Environment of a migration Job, besides the tenant's connection (`DATABASE_URL`, `PG*`).
pub mod migration_env {
    /// The Tenant's name.
    pub const TENANT: &str = "SILO_TENANT";
    /// The SchemaRollout's `version`.
    pub const SCHEMA_VERSION: &str = "SILO_SCHEMA_VERSION";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_name_is_tenant_dash_db() {
        assert_eq!(secret_name("acme"), "acme-db");
        assert_eq!(secret_tenant(&secret_name("acme-db")), Some("acme-db"));
        assert_eq!(secret_tenant("acme"), None);
        assert_eq!(secret_tenant("-db"), None);
        assert_eq!(MANAGED_SELECTOR, format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    }
}
