//! `Tenant`: one customer's isolated PostgreSQL database, role and credentials (namespaced).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One customer's isolated PostgreSQL database. Silo places it on a DatabaseServer, creates a role
/// and a database that only that role can connect to, and writes the credentials to the Secret
/// `<name>-db`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "silo.dev",
    version = "v1alpha1",
    kind = "Tenant",
    namespaced,
    shortname = "tn",
    category = "silo",
    status = "TenantStatus",
    doc = "One customer's isolated PostgreSQL database, role and credentials Secret.",
    validation = Rule::new("self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && self.metadata.name.size() <= 60").message("metadata.name must be a DNS label of at most 60 characters (lowercase letters, digits and '-'), so that its Secret `<name>-db` is a valid name"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Lifecycle phase"),
    printcolumn(name = "Server", type_ = "string", json_path = ".status.server", description = "DatabaseServer the tenant is placed on"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status", description = "Database reachable with the tenant's credentials"),
    printcolumn(name = "Schema", type_ = "string", json_path = ".status.schemaVersion", description = "Schema version the tenant was last migrated to"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("has(self.serverSelector) == has(oldSelf.serverSelector) && (!has(self.serverSelector) || self.serverSelector == oldSelf.serverSelector)").message("serverSelector is immutable: a tenant is never moved implicitly"))]
#[serde(rename_all = "camelCase")]
pub struct TenantSpec {
    /// `Shared` places the tenant on the least-loaded matching server of the pool; `Dedicated`
    /// takes a free server marked `dedicated: true` for this tenant alone.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("isolation is immutable"))]
    pub isolation: Isolation,

    /// Restricts placement to DatabaseServers whose labels match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_selector: Option<LabelSelector>,

    /// Most concurrent connections the tenant's role may open (its PostgreSQL CONNECTION LIMIT).
    #[serde(default = "default_connection_limit")]
    #[schemars(range(min = 1, max = 10000))]
    pub connection_limit: i32,

    /// A suspended tenant cannot log in (its role is NOLOGIN) and its sessions are ended; set it
    /// back to false to restore access. Nothing is deleted.
    #[serde(default)]
    pub suspended: bool,

    /// What happens to the database when the Tenant is deleted.
    #[serde(default)]
    pub deletion: DeletionSpec,

    /// How the router's HTTP resolve API (`GET /v1/resolve?host=&path=`) recognises this tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingSpec>,

    /// This tenant's scheduled backups, where they differ from the fleet's (the chart's
    /// `backups` values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupPolicy>,
    /// Password rotation: every `rotateEvery`, and whenever the annotation `silo.dev/rotate`
    /// takes a new value; both passwords work for `overlap`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CredentialsPolicy>,
}

/// When the tenant's password is rotated, and how long the old one keeps working.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsPolicy {
    /// A new password this often (e.g. `30d`); none: only on request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{1,6}(s|m|h|d)$"))]
    pub rotate_every: Option<String>,
    /// How long the previous password keeps working after the Secret changed: long enough for a
    /// mounted Secret to reach every pod (about a minute) and for clients to reconnect.
    #[serde(default = "default_overlap")]
    #[schemars(regex(pattern = r"^[0-9]{1,6}(s|m|h|d)$"))]
    pub overlap: String,
}

fn default_overlap() -> String {
    "10m".into()
}

/// A tenant's own scheduled backups.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupPolicy {
    /// `false`: no scheduled backups for this tenant (a TenantBackup still works).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// A five-field cron pattern (UTC) instead of the fleet's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 9, max = 100))]
    pub schedule: Option<String>,
    /// How many scheduled backups are kept instead of the fleet's `keepLast`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep_last: Option<i32>,
}

/// Requests the router's resolve API attributes to a tenant.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoutingSpec {
    /// Host names of the tenant, e.g. `acme.example.com`.
    #[serde(default)]
    #[schemars(
        length(max = 32),
        inner(
            regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
            length(max = 253)
        )
    )]
    pub hosts: Vec<String>,
    /// URL path prefixes of the tenant, e.g. `/t/acme`.
    #[serde(default)]
    #[schemars(length(max = 32), inner(regex(pattern = r"^/"), length(max = 1024)))]
    pub path_prefixes: Vec<String>,
}

fn default_connection_limit() -> i32 {
    20
}

/// The spec of `spec: {}`: every field at the default the schema gives it.
impl Default for TenantSpec {
    fn default() -> Self {
        TenantSpec {
            isolation: Isolation::default(),
            server_selector: None,
            connection_limit: default_connection_limit(),
            backup: None,
            credentials: None,
            suspended: false,
            deletion: DeletionSpec::default(),
            routing: None,
        }
    }
}

/// How a tenant is placed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Isolation {
    /// A database on a shared server, beside other tenants' databases.
    #[default]
    Shared,
    /// A server of its own: a DatabaseServer with `dedicated: true` that admits only this tenant.
    Dedicated,
}

/// What happens to the tenant's database when the Tenant is deleted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeletionSpec {
    /// `Snapshot` (the default) locks the database, takes a final backup and keeps the database
    /// for `gracePeriod` before purging it; `Retain` locks the database and keeps it; `Delete`
    /// drops the database and role. Changes take effect at deletion.
    #[serde(default)]
    pub policy: DeletionPolicy,
    /// `Snapshot`: how long the locked database is kept, and can be taken back by applying the
    /// Tenant again, before it is purged (e.g. `7d`, `12h`).
    #[serde(default = "default_grace_period")]
    #[schemars(regex(pattern = r"^[0-9]{1,6}(s|m|h|d)$"))]
    pub grace_period: String,
    /// `Snapshot`: how long the final backup is kept after the deletion (e.g. `30d`).
    #[serde(default = "default_final_backup_retention")]
    #[schemars(regex(pattern = r"^[0-9]{1,6}(s|m|h|d)$"))]
    pub final_backup_retention: String,
}

fn default_grace_period() -> String {
    "7d".into()
}

fn default_final_backup_retention() -> String {
    "30d".into()
}

impl Default for DeletionSpec {
    fn default() -> Self {
        DeletionSpec {
            policy: DeletionPolicy::default(),
            grace_period: default_grace_period(),
            final_backup_retention: default_final_backup_retention(),
        }
    }
}

/// The fate of a deleted tenant's database.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Lock the database (role NOLOGIN, CONNECT revoked, sessions ended), take a final backup,
    /// and keep the database with a tombstone on its server for the grace period; then purge it.
    #[default]
    Snapshot,
    /// Lock the database (role NOLOGIN, CONNECT revoked) and keep it, recorded on its server as retained.
    Retain,
    /// Terminate sessions, drop the database and the role. The data is gone.
    Delete,
}

/// The tenant's logins: the one the Secret names, the previous one while the overlap lasts.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsStatus {
    /// The login role the Secret names (a member of the tenant's owner role).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<String>,
    /// The login of the previous password, which works until `overlapUntil`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_login: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap_until: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation: Option<Time>,
    /// The value of the `silo.dev/rotate` annotation last honoured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested: Option<String>,
}

/// Lifecycle phase of a tenant.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TenantPhase {
    /// Waiting for a server to place it on; the Ready condition says why.
    Pending,
    /// Placed; role, database and Secret are being created.
    Provisioning,
    /// Provisioned, and being migrated to the namespace's target SchemaRollout before it turns
    /// Ready.
    Migrating,
    /// The database is ready for use with the Secret's credentials.
    Ready,
    /// Access is switched off by `suspended: true`.
    Suspended,
    /// A TenantRestore is restoring its database: its role cannot log in, its sessions were
    /// ended, and the router refuses it, until the restore ends.
    Restoring,
    /// The Tenant is being deleted according to its deletion policy.
    Deleting,
    /// Provisioning failed in a way that needs attention; the Ready condition says why.
    Failed,
}

impl std::fmt::Display for TenantPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Observed state of a Tenant.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantStatus {
    /// The generation of the spec this status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Lifecycle phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<TenantPhase>,
    /// Standard conditions: `Ready` (summary), `DatabaseReady`, and `Routed` (whether the routes of
    /// `spec.routing` are this tenant's, or claimed first by another Tenant).
    #[serde(default)]
    #[schemars(schema_with = "crate::conditions::schema")]
    pub conditions: Vec<Condition>,
    /// The DatabaseServer the tenant is placed on; set once, before any SQL, and never changed implicitly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Name of the tenant's PostgreSQL database.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    /// Name of the tenant's PostgreSQL role.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Name of the Secret holding the tenant's credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// The schema version of the last SchemaRollout whose migration succeeded on this tenant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<String>,
    /// The newest successful TenantBackup of this tenant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<LastBackup>,
    /// Where the tenant's password rotation stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<CredentialsStatus>,
}

/// A tenant's newest successful backup.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastBackup {
    /// The TenantBackup.
    pub name: String,
    /// When its dump completed.
    pub time: Time,
    /// The dump object.
    pub uri: String,
    /// Its size.
    pub bytes: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_spec_is_what_an_empty_spec_reads_as() {
        let empty: TenantSpec = serde_json::from_str("{}").expect("an empty spec is valid");
        assert_eq!(empty, TenantSpec::default());
        assert_eq!(TenantSpec::default().connection_limit, 20);
    }
}
