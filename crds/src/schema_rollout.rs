//! `SchemaRollout`: the fleet's schema version, reached by running the application's own migration
//! tool as one Job per tenant, in waves (namespaced).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    EnvFromSource, EnvVar, LocalObjectReference, ResourceRequirements, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A schema version for the Tenants of a namespace. Silo runs the migration command of
/// `template` as one Job per tenant with the tenant's credentials in its environment: canary
/// tenants first, then the rest in waves bounded overall and per DatabaseServer, halting when
/// failures reach `strategy.maxFailures`. The newest SchemaRollout of a namespace is its target:
/// new Tenants are migrated to it before they turn Ready, and older rollouts stop.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[expect(
    clippy::duplicated_attributes,
    reason = "printer columns of the same type repeat `type_`"
)]
#[kube(
    group = "silo.dev",
    version = "v1alpha1",
    kind = "SchemaRollout",
    namespaced,
    shortname = "sr",
    category = "silo",
    status = "SchemaRolloutStatus",
    doc = "A schema version for the Tenants of a namespace, reached by one migration Job per tenant.",
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".spec.version",
        description = "The schema version this rollout migrates to"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Progressing, Paused, Halted, Complete or Superseded"
    ),
    printcolumn(
        name = "Succeeded",
        type_ = "integer",
        json_path = ".status.succeeded",
        description = "Tenants migrated"
    ),
    printcolumn(
        name = "Failed",
        type_ = "integer",
        json_path = ".status.failed",
        description = "Tenants whose migration failed"
    ),
    printcolumn(
        name = "Total",
        type_ = "integer",
        json_path = ".status.total",
        description = "Tenants the rollout selects"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SchemaRolloutSpec {
    /// The schema version, as the application names it (a release, a migration id): opaque to
    /// Silo, recorded in each migrated Tenant's `status.schemaVersion`. Immutable: a new version
    /// is a new SchemaRollout.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("version is immutable: create a new SchemaRollout for a new version"))]
    pub version: String,

    /// The Tenants of this namespace to migrate; empty selects them all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,

    /// The migration Job's container and pod settings.
    pub template: MigrationTemplate,

    /// How many Jobs run at once, and when the rollout stops.
    #[serde(default)]
    pub strategy: RolloutStrategy,

    /// Starts no new Job while true; running ones finish.
    #[serde(default)]
    pub paused: bool,

    /// Raise it to run the failed tenants' migrations again (a halted rollout resumes).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub retry: i32,
}

/// The migration Job's container and pod: the application's own image and tool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationTemplate {
    /// The image holding the application's migration tool.
    #[schemars(length(min = 1))]
    pub image: String,
    /// The entrypoint, e.g. `[python3, manage.py, migrate, --noinput]`; the image's when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Arguments to the entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// More environment variables; Silo sets the tenant's connection (`DATABASE_URL`, `PGHOST`,
    /// `PGPORT`, `PGDATABASE`, `PGUSER`, `PGPASSWORD`), `PGOPTIONS`, `SILO_TENANT` and
    /// `SILO_SCHEMA_VERSION`, which these cannot override.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "list_of::<EnvVar>")]
    pub env: Vec<EnvVar>,
    /// Environment variables from ConfigMaps and Secrets of the namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "list_of::<EnvFromSource>")]
    pub env_from: Vec<EnvFromSource>,
    /// CPU and memory of the migration container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The ServiceAccount the Job's pod runs as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Node labels the Job's pod must be scheduled on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the Job's pod tolerates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "list_of::<Toleration>")]
    pub tolerations: Vec<Toleration>,
    /// Secrets for pulling `image` from a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "list_of::<LocalObjectReference>")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
}

/// A list of `T` without the `x-kubernetes-list-*` extensions k8s-openapi puts on some lists,
/// which a CRD schema would then require to hold merge keys.
fn list_of<T: JsonSchema>(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": generator.subschema_for::<T>(),
    })
}

/// How a rollout proceeds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStrategy {
    /// Tenants migrated first, alone; nothing else starts before they succeed. 0 for none.
    #[serde(default = "default_canary")]
    #[schemars(range(min = 0, max = 1000))]
    pub canary: i32,
    /// Most migration Jobs running at once.
    #[serde(default = "default_max_concurrent")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_concurrent: i32,
    /// Most migration Jobs running at once against one DatabaseServer.
    #[serde(default = "default_max_concurrent_per_server")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_concurrent_per_server: i32,
    /// Failed tenants at which the rollout halts: nothing new starts, running Jobs finish.
    #[serde(default = "default_max_failures")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_failures: i32,
    /// Longest a tenant's migration may run (the Job's `activeDeadlineSeconds`); none when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 604800))]
    pub timeout_seconds: Option<i64>,
    /// Times a failed migration is retried before its tenant counts as failed (the Job's
    /// `backoffLimit`).
    #[serde(default)]
    #[schemars(range(min = 0, max = 10))]
    pub retries: i32,
    /// How long a migration statement waits for a lock before it fails (PostgreSQL's
    /// `lock_timeout`, set through `PGOPTIONS`), so that a migration behind a long transaction
    /// fails fast instead of queueing and blocking the tenant's users. A number with a unit: `ms`,
    /// `s`, `min`.
    #[serde(default = "default_lock_timeout")]
    #[schemars(regex(pattern = r"^[1-9][0-9]{0,8}(ms|s|min)$"))]
    pub lock_timeout: String,
}

fn default_canary() -> i32 {
    1
}
fn default_max_concurrent() -> i32 {
    10
}
fn default_max_concurrent_per_server() -> i32 {
    2
}
fn default_max_failures() -> i32 {
    1
}
fn default_lock_timeout() -> String {
    "10s".into()
}

/// The strategy of `strategy: {}`: every field at the default the schema gives it.
impl Default for RolloutStrategy {
    fn default() -> Self {
        RolloutStrategy {
            canary: default_canary(),
            max_concurrent: default_max_concurrent(),
            max_concurrent_per_server: default_max_concurrent_per_server(),
            max_failures: default_max_failures(),
            timeout_seconds: None,
            retries: 0,
            lock_timeout: default_lock_timeout(),
        }
    }
}

/// Where a rollout stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RolloutPhase {
    /// Jobs are running or about to start.
    Progressing,
    /// `paused: true`: nothing new starts.
    Paused,
    /// Failures reached `maxFailures`: nothing new starts; change the spec (a new template, or a
    /// higher `retry`) to resume.
    Halted,
    /// Every selected tenant that is Ready is at this version.
    Complete,
    /// A newer SchemaRollout in the namespace is the target; this one starts nothing more.
    Superseded,
}

impl std::fmt::Display for RolloutPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// A tenant whose migration failed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailedTenant {
    /// The Tenant's name.
    pub tenant: String,
    /// Why, in a word: `MigrationFailed`, `DeadlineExceeded`, ...
    pub reason: String,
    /// What the migration printed last (its termination message or the end of its log), bounded.
    pub message: String,
}

/// Observed state of a SchemaRollout. The counts are exact; `failedTenants` lists at most the
/// first few.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchemaRolloutStatus {
    /// The generation of the spec this status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Where the rollout stands.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<RolloutPhase>,
    /// `Progressing` and `Complete` (for `kubectl wait --for=condition=Complete` in a deploy
    /// pipeline, before the application that needs the new schema rolls out).
    #[serde(default)]
    #[schemars(schema_with = "crate::conditions::schema")]
    pub conditions: Vec<Condition>,
    /// Tenants the rollout selects.
    #[serde(default)]
    pub total: i32,
    /// Tenants at this version.
    #[serde(default)]
    pub succeeded: i32,
    /// Tenants whose migration failed.
    #[serde(default)]
    pub failed: i32,
    /// Tenants whose migration Job runs now.
    #[serde(default)]
    pub running: i32,
    /// Tenants waiting for their turn.
    #[serde(default)]
    pub pending: i32,
    /// Tenants left out for now (suspended, not Ready); they catch up once Ready.
    #[serde(default)]
    pub skipped: i32,
    /// The first failed tenants, with what their migration said.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_tenants: Vec<FailedTenant>,
    /// When the first Job started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the rollout became Complete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_strategy_reads_as_the_safe_defaults() {
        let empty: RolloutStrategy = serde_json::from_str("{}").expect("an empty strategy");
        assert_eq!(empty, RolloutStrategy::default());
        assert_eq!(
            (
                empty.canary,
                empty.max_concurrent,
                empty.max_concurrent_per_server
            ),
            (1, 10, 2)
        );
        assert_eq!(
            (empty.max_failures, empty.lock_timeout.as_str()),
            (1, "10s")
        );
    }

    #[test]
    fn a_spec_needs_a_version_and_an_image() {
        let spec: Result<SchemaRolloutSpec, _> =
            serde_json::from_str(r#"{"version": "v1", "template": {"image": "app:1"}}"#);
        let spec = spec.expect("the least a spec says");
        assert_eq!(spec.strategy, RolloutStrategy::default());
        assert!(!spec.paused && spec.retry == 0 && spec.selector.is_none());
        assert!(serde_json::from_str::<SchemaRolloutSpec>(r#"{"version": "v1"}"#).is_err());
    }
}
