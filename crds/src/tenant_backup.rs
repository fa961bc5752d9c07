//! `TenantBackup` and `TenantRestore`: one tenant database's logical backup (`pg_dump -Fc`, taken
//! by the `silo` job runner as a Job), and its restore, in place or into another tenant (namespaced).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A backup destination: `file:///path` (a volume mounted into the backup Jobs) or
/// `s3://bucket/prefix` (any S3-compatible store).
pub const DESTINATION_PATTERN: &str = r"^(file:///|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/|$))";

/// One logical backup of a tenant's database: `pg_dump -Fc` streamed to the destination, with
/// its size and sha256, and a manifest written after it. It exists only once the dump completed.
/// Deleting a TenantBackup deletes its object.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[expect(
    clippy::duplicated_attributes,
    reason = "printer columns of the same type repeat `type_`"
)]
#[kube(
    group = "silo.dev",
    version = "v1alpha1",
    kind = "TenantBackup",
    namespaced,
    shortname = "tb",
    category = "silo",
    status = "TenantBackupStatus",
    doc = "A logical backup of one tenant's database (pg_dump), taken by a Job.",
    printcolumn(
        name = "Tenant",
        type_ = "string",
        json_path = ".spec.tenant",
        description = "The Tenant backed up"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Running, Succeeded or Failed"
    ),
    printcolumn(
        name = "Bytes",
        type_ = "integer",
        json_path = ".status.bytes",
        description = "Size of the dump"
    ),
    printcolumn(
        name = "Verified",
        type_ = "boolean",
        json_path = ".status.verified",
        description = "Restored into a scratch database and every table's rows counted equal"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TenantBackupSpec {
    /// The Tenant (of this namespace) to back up.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("tenant is immutable"))]
    pub tenant: String,
    /// Where the dump goes: `file:///path` or `s3://bucket/prefix`; the fleet's default
    /// destination when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(file:///|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/|$))"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("destination is immutable"))]
    pub destination: Option<String>,
    /// Restore the dump into a scratch database and compare every table's row count with the
    /// counts taken in the dump's own snapshot.
    #[serde(default)]
    pub verify: bool,
}

/// Where a backup or a restore stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum JobPhase {
    /// Waiting for its turn (the per-server cap) or for its Job to start.
    Pending,
    /// Its Job runs.
    Running,
    /// Done: for a backup, the object and its manifest are stored.
    Succeeded,
    /// Failed; `error` says why.
    Failed,
}

impl std::fmt::Display for JobPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Observed state of a TenantBackup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantBackupStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,
    /// The DatabaseServer the tenant was on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The dump object.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Its size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<i64>,
    /// Its SHA-256, hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Set when `verify` ran: whether every table's row count matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// Why it failed, or which tables did not verify.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    #[schemars(schema_with = "crate::conditions::schema")]
    pub conditions: Vec<Condition>,
}

/// A restore of a tenant's database from a backup: in place (the tenant is locked meanwhile and
/// unlocked after, success or not) or into another existing Tenant of the namespace.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[expect(
    clippy::duplicated_attributes,
    reason = "printer columns of the same type repeat `type_`"
)]
#[kube(
    group = "silo.dev",
    version = "v1alpha1",
    kind = "TenantRestore",
    namespaced,
    shortname = "tr",
    category = "silo",
    status = "TenantRestoreStatus",
    doc = "A restore of a tenant's database from a TenantBackup or a backup object's URI.",
    printcolumn(
        name = "Tenant",
        type_ = "string",
        json_path = ".spec.tenant",
        description = "The Tenant whose database is restored into"
    ),
    printcolumn(
        name = "Backup",
        type_ = "string",
        json_path = ".spec.from.backup",
        description = "The TenantBackup restored"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Running, Succeeded or Failed"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TenantRestoreSpec {
    /// The Tenant (of this namespace) whose database is restored into: the backed-up tenant
    /// itself (in place), or another one.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("tenant is immutable"))]
    pub tenant: String,
    /// The backup to restore.
    #[x_kube(validation = Rule::new("self == oldSelf").message("from is immutable"))]
    pub from: RestoreSource,
}

/// A TenantBackup of the namespace, or a backup object's URI with its sha256.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.backup) != has(self.uri)").message("from needs exactly one of backup or uri"))]
#[x_kube(validation = Rule::new("!has(self.uri) || has(self.sha256)").message("from.uri needs from.sha256"))]
pub struct RestoreSource {
    /// A Succeeded TenantBackup of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub backup: Option<String>,
    /// A backup object (`file:///...` or `s3://...`), e.g. one whose TenantBackup was deleted
    /// with its object kept elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(file:///|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/)"))]
    pub uri: Option<String>,
    /// The object's SHA-256 (hex), checked while it streams into pg_restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
}

/// Observed state of a TenantRestore.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantRestoreStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The object restored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    #[schemars(schema_with = "crate::conditions::schema")]
    pub conditions: Vec<Condition>,
}
