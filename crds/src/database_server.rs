//! `DatabaseServer`: a PostgreSQL server that tenants can be placed on (cluster-scoped).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A PostgreSQL server that Silo places tenant databases on. Silo connects with the admin
/// credentials in `adminSecretRef`, creates one database and one role per tenant, and reports
/// reachability, version and the number of tenants placed here in `status`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "silo.dev",
    version = "v1alpha1",
    kind = "DatabaseServer",
    shortname = "dbs",
    category = "silo",
    status = "DatabaseServerStatus",
    doc = "A PostgreSQL server that Silo places tenant databases on.",
    validation = Rule::new("self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && self.metadata.name.size() <= 63").message("metadata.name must be a DNS label: lowercase letters, digits and '-', at most 63 characters"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status", description = "Reachable with admin rights"),
    printcolumn(name = "Tenants", type_ = "integer", json_path = ".status.tenants", description = "Tenants placed on this server"),
    printcolumn(name = "Max", type_ = "integer", json_path = ".spec.maxTenants", description = "Most tenants this server admits"),
    printcolumn(name = "Tombstones", type_ = "integer", json_path = ".status.tombstones.count", description = "Deleted tenants' databases kept here until their purge"),
    printcolumn(name = "Version", type_ = "string", json_path = ".status.version", description = "PostgreSQL server version"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseServerSpec {
    /// Host name or IP address of the PostgreSQL server, as the controller (and tenants' clients) reach it.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,

    /// TCP port of the PostgreSQL server.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// Secret holding the admin credentials (keys `username` and `password`). The admin role needs
    /// CREATEDB and CREATEROLE (or superuser).
    pub admin_secret_ref: SecretRef,

    /// TLS mode for the controller's admin connections: Disable, Prefer or Require.
    #[serde(default)]
    pub ssl_mode: SslMode,

    /// Most tenants this server admits; placement skips a full server.
    #[serde(default = "default_max_tenants")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_tenants: i32,

    /// Connections the router may open to this server in all, shared fairly among its tenants: a
    /// busy tenant cannot starve the others.
    #[serde(default = "default_max_connections")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_connections: i32,

    /// A dedicated server admits exactly one tenant, of isolation `Dedicated`; shared tenants are never placed on it.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("dedicated is immutable"))]
    pub dedicated: bool,

    /// A cordoned server keeps its tenants but receives no new placements.
    #[serde(default)]
    pub cordoned: bool,

    /// Revoke what PostgreSQL grants to PUBLIC by default in the maintenance databases
    /// `postgres` and `template1`: CONNECT to them, and CREATE in their schemas (PostgreSQL 14 and
    /// older, or servers upgraded from them). Every tenant role is a member of PUBLIC; with these
    /// grants it can log in there and plant objects. Off by default because other users of the
    /// server (monitoring, say) may rely on them; the `Hardened` condition reports them either way.
    #[serde(default)]
    pub revoke_public_access: bool,
}

fn default_port() -> i32 {
    5432
}

fn default_max_connections() -> i32 {
    100
}

fn default_max_tenants() -> i32 {
    100
}

/// A reference to a Secret in a given namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Namespace of the Secret.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub namespace: String,
    /// Name of the Secret.
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
        length(max = 253)
    )]
    pub name: String,
}

/// TLS mode of the controller's admin connections, as libpq's `sslmode`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Use TLS when the server offers it.
    #[default]
    Prefer,
    /// Always use TLS (the certificate is not verified).
    Require,
}

/// Observed state of a DatabaseServer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseServerStatus {
    /// The generation of the spec this status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions: `Ready` means reachable with admin rights; `Hardened` says whether
    /// PUBLIC (every tenant role) can connect to or create in the maintenance databases.
    #[serde(default)]
    #[schemars(schema_with = "crate::conditions::schema")]
    pub conditions: Vec<Condition>,
    /// PostgreSQL server version, e.g. `15.18`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Number of tenants placed on this server.
    #[serde(default)]
    pub tenants: i32,
    /// Databases of deleted tenants kept here by their `Retain` policy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retained: Vec<String>,
    /// Databases of tenants deleted with policy `Snapshot`, kept here until their purge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tombstones: Option<Tombstones>,
}

/// The tombstones on a server: how many, and the first few to be purged.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tombstones {
    pub count: i32,
    /// Ordered by purge time, at most [`Tombstones::LISTED`] of them.
    #[serde(default)]
    pub items: Vec<TombstoneEntry>,
}

impl Tombstones {
    /// How many tombstones the status lists; `count` counts them all.
    pub const LISTED: usize = 20;
}

/// A deleted tenant's database awaiting its purge.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TombstoneEntry {
    /// `namespace/name` of the deleted Tenant.
    pub tenant: String,
    pub database: String,
    /// When the Tenant was deleted and when its database is purged (RFC 3339).
    pub deleted: String,
    pub purge_after: String,
    /// The final backup's URI.
    pub backup: String,
}
