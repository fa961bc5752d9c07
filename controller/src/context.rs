//! State shared by every reconcile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use silo_crds::{DatabaseServer, SchemaRollout, Tenant};

use crate::metrics::Metrics;
use crate::sql::ServerPools;

pub struct Context {
    pub client: Client,
    pub pools: ServerPools,
    pub servers: Store<DatabaseServer>,
    pub tenants: Store<Tenant>,
    /// The tenants' credentials Secrets (the ones labelled managed-by silo).
    pub secrets: Store<Secret>,
    /// Secrets this process wrote that the cache has not shown back yet.
    pub secret_writes: SecretWrites,
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
    /// status write has not reached the cache yet (an entry is dropped once the cache shows it).
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
        let (tenants, secrets, servers, rollouts, jobs, backups, restores) = tokio::join!(
            store_ready(&self.tenants),
            store_ready(&self.secrets),
            store_ready(&self.servers),
            store_ready(&self.rollouts),
            store_ready(&self.jobs),
            store_ready(&self.backups),
            store_ready(&self.restores)
        );
        tenants && secrets && servers && rollouts && jobs && backups && restores
    }

    /// Whether this process tried `server` and its last check failed.
    pub fn server_failing(&self, server: &str) -> bool {
        self.server_failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains_key(server)
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
        count_by_server(&self.tenants, placements)
    }
}

/// Tenants per server: each cached tenant's `status.server`, and, for a tenant the cache shows
/// without one yet, where this process placed it; a placement whose tenant left the cache counts
/// no more. This runs on every placement: the cache is read in one pass under its read lock,
/// cloning nothing (`find` with a predicate that never matches visits every tenant), and only
/// the placements are looked up one by one, which are few: an entry goes once the cache shows
/// the tenant's server (a tenant's next reconcile drops it).
fn count_by_server(
    tenants: &Store<Tenant>,
    placements: &HashMap<String, String>,
) -> HashMap<String, usize> {
    fn add(counts: &mut HashMap<String, usize>, server: &str) {
        match counts.get_mut(server) {
            Some(n) => *n += 1,
            None => {
                counts.insert(server.to_string(), 1);
            }
        }
    }
    fn server_of(tenant: &Tenant) -> Option<&str> {
        tenant.status.as_ref().and_then(|s| s.server.as_deref())
    }
    let counts = std::cell::RefCell::new(HashMap::new());
    let _ = tenants.find(|tenant| {
        if let Some(server) = server_of(tenant) {
            add(&mut counts.borrow_mut(), server);
        }
        false
    });
    let mut counts = counts.into_inner();
    for (key, server) in placements {
        let Some((namespace, name)) = key.split_once('/') else {
            continue;
        };
        let cached = tenants.get(&ObjectRef::new(name).within(namespace));
        if cached.is_some_and(|t| server_of(&t).is_none()) {
            add(&mut counts, server);
        }
    }
    counts
}

/// Placements made by this process, shared with the watch mappers. A std mutex: it is never held
/// across an await.
pub type Placements = Arc<std::sync::Mutex<HashMap<String, String>>>;

pub fn lock_placements(p: &Placements) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
    p.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The resourceVersion of each Secret this process last wrote, by `namespace/name`, until the
/// watch brings that version back. Meanwhile the cache may hold an older version, so a reconcile
/// reads that Secret from the API server; and the write coming back through the watch is not a
/// change to react to (which, for a Secret just created, woke a third reconcile of every new tenant).
#[derive(Clone, Default)]
pub struct SecretWrites(Arc<std::sync::Mutex<HashMap<String, String>>>);

impl SecretWrites {
    /// Remembers `secret` as written by this process.
    pub fn wrote(&self, secret: &Secret) {
        if let Some(version) = &secret.metadata.resource_version {
            self.lock().insert(object_key(secret), version.clone());
        }
    }

    /// Whether the watch's `secret` is this process's own last write; it is forgotten then.
    pub fn came_back(&self, secret: &Secret) -> bool {
        let mut writes = self.lock();
        let key = object_key(secret);
        let ours = writes
            .get(&key)
            .is_some_and(|version| secret.metadata.resource_version.as_ref() == Some(version));
        if ours {
            writes.remove(&key);
        }
        ours
    }

    /// Whether a write of this process to the Secret `key` may not be in the cache yet.
    pub fn unseen(&self, key: &str) -> bool {
        self.lock().contains_key(key)
    }

    /// The cache holds what the API server holds for `key`: nothing of this process's is pending.
    pub fn settled(&self, key: &str) {
        self.lock().remove(key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// `namespace/name` of any namespaced object.
pub fn object_key<K: kube::Resource>(object: &K) -> String {
    let meta = object.meta();
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// `namespace/name` of a tenant.
pub fn tenant_key(tenant: &Tenant) -> String {
    object_key(tenant)
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

#[cfg(test)]
mod tests {
    use super::*;
    use silo_crds::{TenantSpec, TenantStatus};

    fn tenant(name: &str, server: Option<&str>) -> Tenant {
        let mut t = Tenant::new(name, TenantSpec::default());
        t.metadata.namespace = Some("shop".into());
        t.status = server.map(|s| TenantStatus {
            server: Some(s.into()),
            ..TenantStatus::default()
        });
        t
    }

    #[test]
    fn servers_count_status_first_then_this_process_placements() {
        let placements: HashMap<String, String> = [
            ("shop/placed", "two"),
            ("shop/moved", "two"),
            ("shop/gone", "two"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let (store, mut writer) = kube::runtime::reflector::store::<Tenant>();
        for t in [
            tenant("a", Some("one")),
            tenant("b", Some("one")),
            // Placed here, the status write not in the cache yet.
            tenant("placed", None),
            // The status, once there, is the truth.
            tenant("moved", Some("one")),
            // Not placed at all.
            tenant("pending", None),
        ] {
            writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(t));
        }
        // "gone" left the cache: its placement counts no more.
        let expected: HashMap<String, usize> = [("one".to_string(), 3), ("two".to_string(), 1)]
            .into_iter()
            .collect();
        assert_eq!(count_by_server(&store, &placements), expected);
    }
}
