//! What the controller, the router and the tests agree on outside the API types: the tenant
//! credentials Secret (name, keys, labels) and the annotations and labels Silo puts on objects.

/// The tenant credentials Secret: `<tenant>-db` in the Tenant's namespace.
pub fn secret_name(tenant_name: &str) -> String {
    format!("{tenant_name}-db")
}

/// Keys of the tenant credentials Secret.
pub mod keys {
    /// Host of the tenant's PostgreSQL server, for clients that connect directly.
    pub const HOST: &str = "host";
    /// Port of the tenant's PostgreSQL server.
    pub const PORT: &str = "port";
    /// The tenant's database.
    pub const DBNAME: &str = "dbname";
    /// The tenant's login role.
    pub const USER: &str = "user";
    /// The tenant role's password: the one key the router reads.
    pub const PASSWORD: &str = "password";
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
/// Label naming the TenantRestore a restore Job runs for.
pub const RESTORE_LABEL: &str = "silo.dev/restore";
/// On the final TenantBackup of a Tenant deleted with policy `Snapshot` (in the controller's
/// final-backup namespace), and on its Job and login Secret: the deleted Tenant's uid.
pub const FINAL_BACKUP_LABEL: &str = "silo.dev/final-backup-of";
/// On a final TenantBackup: the deleted Tenant's namespace (its name is in [`TENANT_LABEL`]).
pub const TENANT_NAMESPACE_LABEL: &str = "silo.dev/tenant-namespace";
/// On a Tenant: a new value asks for one password rotation.
pub const ROTATE_ANNOTATION: &str = "silo.dev/rotate";
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
        assert_eq!(MANAGED_SELECTOR, format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    }
}
