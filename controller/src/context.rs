//! State shared by every reconcile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use silo_crds::{DatabaseServer, SchemaRollout, Tenant};

use crate::metrics::Metrics;
use crate::sql::ServerPools;

pub struct Context {
    pub client: Client,
    pub pools: ServerPools,
    pub servers: Store<DatabaseServer>,
    pub tenants: Store<Tenant>,
    /// Each cached tenant's server, and the tenants per server (see [`TenantServers`]).
    pub tenant_servers: TenantServers,
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
        self.tenant_servers.count(placements)
    }
}

/// Each cached tenant's server (`status.server`) and the number of tenants per server, kept up
/// to date from the Tenant watch's events as the cache is: every placement counts the tenants on
/// each server, and this answers without a pass over the cache (which, at 2,000 tenants, was a
/// seventh of the controller's CPU while a fleet was provisioned).
///
/// A placement of this process is dropped as soon as the watch shows the tenant's server: the
/// records left are the placements whose status write has not come back yet, which stay few.
#[derive(Clone, Default)]
pub struct TenantServers {
    index: Arc<std::sync::Mutex<ServerIndex>>,
    placements: Placements,
}

#[derive(Default)]
struct ServerIndex {
    /// Every cached tenant, by `namespace/name`, and its server if its status names one.
    by_tenant: HashMap<String, Option<String>>,
    /// Tenants per server, over `by_tenant`.
    counts: HashMap<String, usize>,
    /// A re-list under way: what it has listed so far, which replaces `by_tenant` when it ends
    /// (as the cache does: it shows the old list until the new one is whole).
    relisting: Option<HashMap<String, Option<String>>>,
}

impl ServerIndex {
    fn set(&mut self, key: String, server: Option<String>) {
        let old = self.by_tenant.insert(key, server.clone());
        if old.as_ref() == Some(&server) {
            return;
        }
        if let Some(Some(old)) = old {
            self.uncount(&old);
        }
        if let Some(server) = server {
            *self.counts.entry(server).or_default() += 1;
        }
    }

    fn remove(&mut self, key: &str) {
        if let Some(Some(old)) = self.by_tenant.remove(key) {
            self.uncount(&old);
        }
    }

    fn uncount(&mut self, server: &str) {
        if let Some(n) = self.counts.get_mut(server) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(server);
            }
        }
    }
}

fn server_of(tenant: &Tenant) -> Option<String> {
    tenant.status.as_ref().and_then(|s| s.server.clone())
}

impl TenantServers {
    /// Counts from the Tenant watch, and drops from `placements` what the watch shows placed.
    pub fn new(placements: Placements) -> Self {
        TenantServers {
            index: Default::default(),
            placements,
        }
    }

    /// Follows one event of the Tenant watch (the one the cache is filled from).
    pub fn observe(&self, event: &watcher::Event<Tenant>) {
        if let watcher::Event::Apply(tenant) = event
            && tenant.status.as_ref().is_some_and(|s| s.server.is_some())
        {
            // Not under the index's lock: a placement takes this lock, then the index's.
            lock_placements(&self.placements).remove(&tenant_key(tenant));
        }
        let mut index = self.lock();
        match event {
            watcher::Event::Apply(tenant) => index.set(tenant_key(tenant), server_of(tenant)),
            watcher::Event::Delete(tenant) => index.remove(&tenant_key(tenant)),
            watcher::Event::Init => index.relisting = Some(HashMap::new()),
            watcher::Event::InitApply(tenant) => {
                index
                    .relisting
                    .get_or_insert_default()
                    .insert(tenant_key(tenant), server_of(tenant));
            }
            watcher::Event::InitDone => {
                let listed = index.relisting.take().unwrap_or_default();
                let mut counts = HashMap::new();
                for server in listed.values().flatten() {
                    *counts.entry(server.clone()).or_default() += 1;
                }
                index.by_tenant = listed;
                index.counts = counts;
            }
        }
    }

    /// Tenants per server: each cached tenant's `status.server`, and, for a tenant the cache
    /// shows without one yet, where this process placed it; a placement whose tenant left the
    /// cache counts no more. Only the placements are looked up one by one, which are few: an
    /// entry goes once the watch shows the tenant's server.
    fn count(&self, placements: &HashMap<String, String>) -> HashMap<String, usize> {
        let index = self.lock();
        let mut counts = index.counts.clone();
        for (key, server) in placements {
            if let Some(None) = index.by_tenant.get(key) {
                *counts.entry(server.clone()).or_default() += 1;
            }
        }
        counts
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ServerIndex> {
        self.index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
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

    fn placements_of(entries: &[(&str, &str)]) -> HashMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn servers_count_status_first_then_this_process_placements() {
        let index = TenantServers::default();
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
            index.observe(&watcher::Event::Apply(t));
        }
        let placed = placements_of(&[
            ("shop/placed", "two"),
            ("shop/moved", "two"),
            ("shop/gone", "two"),
        ]);
        // "gone" left the cache: its placement counts no more.
        let expected: HashMap<String, usize> = [("one".to_string(), 3), ("two".to_string(), 1)]
            .into_iter()
            .collect();
        assert_eq!(index.count(&placed), expected);
    }

    #[test]
    fn a_placement_is_dropped_once_the_watch_shows_the_server() {
        let placements = Placements::default();
        lock_placements(&placements).extend(
            [("shop/a", "one"), ("shop/b", "two")].map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let index = TenantServers::new(placements.clone());
        // The status write has not come back: the record stays, and counts.
        index.observe(&watcher::Event::Apply(tenant("a", None)));
        index.observe(&watcher::Event::Apply(tenant("b", Some("two"))));
        let left = lock_placements(&placements).clone();
        assert_eq!(left, placements_of(&[("shop/a", "one")]));
        let expected: HashMap<String, usize> = [("one".to_string(), 1), ("two".to_string(), 1)]
            .into_iter()
            .collect();
        assert_eq!(index.count(&left), expected);
    }

    /// What the index answers is what a pass over the cache would count, over a random walk of
    /// watch events (tenants placed, moved, deleted, re-listed) applied to both.
    #[test]
    fn the_index_counts_what_a_pass_over_the_cache_would() {
        use kube::runtime::watcher::Event;
        let (store, mut writer) = kube::runtime::reflector::store::<Tenant>();
        let index = TenantServers::default();
        let servers = [None, Some("one"), Some("two"), Some("three")];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let placed = placements_of(&[("shop/t3", "two"), ("shop/t7", "one"), ("shop/t40", "one")]);
        for step in 0..3_000 {
            let t = tenant(&format!("t{}", next(50)), servers[next(servers.len())]);
            let events = match next(20) {
                0..=12 => vec![Event::Apply(t)],
                13..=18 => vec![Event::Delete(t)],
                // A re-list: the tenants it finds replace the ones known.
                _ => {
                    let mut events = vec![Event::Init];
                    for i in 0..next(50) {
                        let server = servers[next(servers.len())];
                        events.push(Event::InitApply(tenant(&format!("t{i}"), server)));
                    }
                    events.push(Event::InitDone);
                    events
                }
            };
            for event in events {
                writer.apply_watcher_event(&event);
                index.observe(&event);
            }
            let mut expected: HashMap<String, usize> = HashMap::new();
            for tenant in store.state() {
                let server =
                    server_of(&tenant).or_else(|| placed.get(&tenant_key(&tenant)).cloned());
                if let Some(server) = server {
                    *expected.entry(server).or_default() += 1;
                }
            }
            assert_eq!(index.count(&placed), expected, "after step {step}");
        }
    }
}
