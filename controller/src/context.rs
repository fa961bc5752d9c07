//! State shared by every reconcile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use kube::Client;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use silo_crds::{DatabaseServer, SchemaRollout, Tenant};

use crate::metrics::Metrics;
use crate::sql::ServerPools;

pub struct Context {
    pub client: Client,
    pub pools: ServerPools,
    pub servers: Store<DatabaseServer>,
    pub tenants: Store<Tenant>,
    pub rollouts: Store<SchemaRollout>,
    /// The controller's Jobs (migrations, backups), by the managed-by label.
    pub jobs: Store<Job>,
    pub backups: Store<silo_crds::TenantBackup>,
    pub restores: Store<silo_crds::TenantRestore>,
    /// Held while a rollout plans and starts Jobs: the per-server cap counts every rollout's.
    pub rollout_starts: tokio::sync::Mutex<()>,
    /// Failed migrations' outcomes by Job uid, so their pods are read once.
    pub failures: std::sync::Mutex<HashMap<String, crate::schema_rollout::outcome::Outcome>>,
    /// Placements made by this process, by `namespace/name`. Held while choosing a server, so two
    /// tenants reconciled at once never both take the last slot; it also covers placements whose
    /// status write has not reached the cache yet.
    pub placements: Placements,
    /// Asks the DatabaseServer reconciler to refresh a server's status (its tenant count changed).
    pub server_changed: tokio::sync::mpsc::UnboundedSender<String>,
    /// Asks the Tenant reconciler to look at another tenant (a route it claims is contested).
    pub tenant_changed:
        tokio::sync::mpsc::UnboundedSender<kube::runtime::reflector::ObjectRef<Tenant>>,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub resync: Duration,
    /// The router's `host:port` for the Secrets' `router-uri`, when a router is deployed.
    pub router_address: Option<String>,
    /// `--server-selector`: the DatabaseServers of this install (all when unset).
    pub server_selector: Option<String>,
    /// Namespaces an `adminSecretRef` may name; empty means any.
    pub admin_secret_namespaces: Vec<String>,
    /// Applied to every Job the controller creates.
    pub job_settings: crate::jobs::JobSettings,
    /// Where and how backups are taken.
    pub backup_settings: crate::backup::settings::BackupSettings,
    /// Held while a backup counts its server's running backups and starts its Job.
    pub backup_starts: tokio::sync::Mutex<()>,
    /// Where the final backups of Snapshot deletions go.
    pub final_backup_namespace: String,
    /// The one namespace this install watches, or all (`None`).
    pub watch_namespace: Option<String>,
    /// Consecutive failures per DatabaseServer, for capped exponential backoff.
    pub server_failures: std::sync::Mutex<HashMap<String, u32>>,
}

impl Context {
    /// Whether this install watches `namespace` (and so reconciles what is created there).
    pub fn watches(&self, namespace: &str) -> bool {
        self.watch_namespace
            .as_deref()
            .is_none_or(|ns| ns == namespace)
    }

    /// Waits until every cache holds what the API server had at startup. A reconcile reads one
    /// kind's cache while running for the other: before this, "no such DatabaseServer" could
    /// mean "not listed yet", and a deletion policy must never be decided on that.
    pub async fn caches_filled(&self) -> bool {
        let (tenants, servers, rollouts, jobs, backups, restores) = tokio::join!(
            store_ready(&self.tenants),
            store_ready(&self.servers),
            store_ready(&self.rollouts),
            store_ready(&self.jobs),
            store_ready(&self.backups),
            store_ready(&self.restores)
        );
        tenants && servers && rollouts && jobs && backups && restores
    }

    pub fn lock_failures(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, crate::schema_rollout::outcome::Outcome>> {
        self.failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Tenants placed on each server: those the cache knows, plus this process's recent placements.
    pub fn tenants_by_server(
        &self,
        placements: &HashMap<String, String>,
    ) -> HashMap<String, usize> {
        let mut by_tenant: HashMap<String, String> = placements.clone();
        for tenant in self.tenants.state() {
            let key = tenant_key(&tenant);
            if let Some(server) = tenant.status.as_ref().and_then(|s| s.server.clone()) {
                by_tenant.insert(key, server);
            }
        }
        let mut counts = HashMap::new();
        for server in by_tenant.into_values() {
            *counts.entry(server).or_insert(0) += 1;
        }
        counts
    }
}

/// Placements made by this process, shared with the watch mappers. A std mutex: it is never held
/// across an await.
pub type Placements = Arc<std::sync::Mutex<HashMap<String, String>>>;

pub fn lock_placements(p: &Placements) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
    p.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `namespace/name` of a tenant.
pub fn tenant_key(tenant: &Tenant) -> String {
    format!(
        "{}/{}",
        tenant.metadata.namespace.as_deref().unwrap_or_default(),
        tenant.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Whether the store was filled. `Store::wait_until_ready` wakes only the last task that polled it
/// (the controller's own runner polls it too), so poll it again on a short timer.
pub async fn store_ready<K>(store: &Store<K>) -> bool
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        match tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready()).await {
            Ok(result) => return result.is_ok(),
            Err(_) => continue,
        }
    }
}
