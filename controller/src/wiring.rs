//! The pieces `run` puts together: each kind's controller (its watches and triggers), leadership,
//! the metrics scrape hook and readiness.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{PredicateConfig, WatchStreamExt, reflector, watcher};
use kube::{Client, ResourceExt};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use silo_crds::{
    DatabaseServer, JobPhase, RolloutPhase, SchemaRollout, Tenant, TenantBackup, TenantPhase,
    TenantRestore,
};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::RunError;
use crate::context::{self, Context, SecretWrites, TenantServers};
use crate::http::Health;
use crate::metrics::{Metrics, PhaseLabels};
use crate::{backup, database_server, restore, schema_rollout, tenant};

/// A watch of everything, or of the objects whose labels match `selector`.
pub fn selected(selector: Option<&str>) -> watcher::Config {
    match selector {
        Some(selector) => watcher::Config::default().labels(selector),
        None => watcher::Config::default(),
    }
}

/// The Tenant controller, before its triggers are added. Tenants are reconciled when their spec,
/// finalizers or deletion change, not when the controller's own status writes come back through
/// the watch (resync covers the rest). The same watch counts the tenants per server, and tells
/// the SchemaRollout and TenantBackup controllers which tenants changed (one Tenant watch, not
/// three).
pub fn tenant_controller(
    api: Api<Tenant>,
    watch: watcher::Config,
    concurrency: u16,
    placements: context::Placements,
) -> TenantWatch {
    let (reader, writer) = reflector::store();
    let servers = TenantServers::new(placements);
    let index = servers.clone();
    let (to_rollouts, for_rollouts) = tokio::sync::mpsc::unbounded_channel();
    let (to_backups, for_backups) = tokio::sync::mpsc::unbounded_channel();
    let changes = watcher(api, watch)
        .default_backoff()
        // What each cached Tenant costs: its managed fields are never read.
        .modify(|tenant| tenant.managed_fields_mut().clear())
        .reflect(writer)
        .inspect_ok(move |event| {
            index.observe(event);
            tell_touched(event, &[&to_rollouts, &to_backups]);
        })
        .applied_objects()
        .predicate_filter(tenant::spec_changed, PredicateConfig::default());
    let controller = Controller::for_stream(changes, reader)
        .with_config(ControllerConfig::default().concurrency(concurrency));
    TenantWatch {
        controller,
        servers,
        for_rollouts,
        for_backups,
    }
}

/// Tells each listener which tenant the watch's `event` shows created, changed, deleted or
/// re-listed; the start and end of a re-list touch none. A listener that has stopped listening
/// (its controller ended) needs telling nothing.
fn tell_touched(event: &watcher::Event<Tenant>, listeners: &[&UnboundedSender<ObjectRef<Tenant>>]) {
    let tenant = match event {
        watcher::Event::Apply(t) | watcher::Event::Delete(t) | watcher::Event::InitApply(t) => t,
        watcher::Event::Init | watcher::Event::InitDone => return,
    };
    for listener in listeners {
        let _ = listener.send(ObjectRef::from_obj(tenant));
    }
}

/// The Tenant controller, and what its watch feeds besides its cache.
pub struct TenantWatch {
    pub controller: Controller<Tenant>,
    /// Tenants per server (see [`TenantServers`]).
    pub servers: TenantServers,
    /// Every tenant the watch shows changed, created, deleted or re-listed, for the
    /// SchemaRollout controller ([`run_rollouts`]) and the TenantBackup controller ([`run_backups`]).
    pub for_rollouts: UnboundedReceiver<ObjectRef<Tenant>>,
    pub for_backups: UnboundedReceiver<ObjectRef<Tenant>>,
}

/// The cache of the tenants' credentials Secrets, and the changes to them a tenant reconcile
/// reacts to: every change but this process's own writes coming back (see `SecretWrites`).
pub fn tenant_secrets(
    api: Api<Secret>,
    writes: SecretWrites,
) -> (
    Store<Secret>,
    impl futures::Stream<Item = Result<Secret, watcher::Error>> + Send + 'static,
) {
    let (reader, writer) = reflector::store();
    let changes = watcher(
        api,
        watcher::Config::default().labels(silo_crds::contract::MANAGED_SELECTOR),
    )
    .default_backoff()
    .modify(|secret| secret.managed_fields_mut().clear())
    .reflect(writer)
    .filter_map(move |event| {
        let changed = match event {
            Ok(watcher::Event::Apply(secret) | watcher::Event::InitApply(secret)) => {
                (!writes.came_back(&secret)).then_some(Ok(secret))
            }
            Ok(watcher::Event::Delete(secret)) => Some(Ok(secret)),
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
            Err(e) => Some(Err(e)),
        };
        std::future::ready(changed)
    });
    (reader, changes)
}

/// The DatabaseServer controller, before its triggers are added. Servers are reconciled when their
/// spec or labels change, on a timer, and when a tenant is placed on or removed from them.
pub fn server_controller(
    api: Api<DatabaseServer>,
    watch: watcher::Config,
) -> Controller<DatabaseServer> {
    let (reader, writer) = reflector::store();
    let changes = watcher(api, watch)
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(database_server::spec_changed, PredicateConfig::default());
    Controller::for_stream(changes, reader)
        .with_config(ControllerConfig::default().debounce(std::time::Duration::from_millis(500)))
}

/// Runs the Tenant controller until shutdown. Besides its own watch, a tenant is reconciled when
/// its credentials Secret changes, when a server changes while it waits for a placement, when a
/// SchemaRollout of its namespace changes while it waits in `Migrating`, and when asked
/// (`Context::tenant_changed`: a route it claims is contested, its migration recorded).
#[allow(clippy::too_many_arguments)]
pub fn run_tenants(
    controller: Controller<Tenant>,
    secret_changes: impl futures::Stream<Item = Result<Secret, watcher::Error>> + Send + 'static,
    servers: Api<DatabaseServer>,
    server_watch: watcher::Config,
    rollouts: Api<SchemaRollout>,
    restores: Api<TenantRestore>,
    tenant_changed: UnboundedReceiver<ObjectRef<Tenant>>,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> {
    // A server change wakes the tenants waiting for a placement (phase Pending, not placed by
    // this process since). Tenants that are placed, or new, have their own triggers.
    let pending_tenants = ctx.tenants.clone();
    let placements = ctx.placements.clone();
    let tenants_on_server = move |_server: DatabaseServer| {
        let placed = context::lock_placements(&placements);
        pending_tenants
            .state()
            .into_iter()
            .filter(|t| {
                t.status.as_ref().and_then(|s| s.phase) == Some(silo_crds::TenantPhase::Pending)
            })
            .filter(|t| !placed.contains_key(&context::tenant_key(t)))
            .map(|t| ObjectRef::from_obj(t.as_ref()))
            .collect::<Vec<_>>()
    };
    // A rollout created, changed or deleted changes what a tenant in `Migrating` waits for.
    let migrating_tenants = ctx.tenants.clone();
    let tenants_migrating_in = move |rollout: SchemaRollout| {
        let namespace = rollout.metadata.namespace;
        migrating_tenants
            .state()
            .into_iter()
            .filter(|t| t.metadata.namespace == namespace)
            .filter(|t| t.status.as_ref().and_then(|s| s.phase) == Some(TenantPhase::Migrating))
            .map(|t| ObjectRef::from_obj(t.as_ref()))
            .collect::<Vec<_>>()
    };
    controller
        .owns_stream(secret_changes)
        .watches(servers, server_watch, tenants_on_server)
        .watches(rollouts, watcher::Config::default(), tenants_migrating_in)
        .watches(
            restores,
            watcher::Config::default(),
            |restore: TenantRestore| {
                // A restore locks its tenant while it runs, and unlocks it when it ends.
                let namespace = restore.metadata.namespace.unwrap_or_default();
                Some(ObjectRef::new(&restore.spec.tenant).within(&namespace))
            },
        )
        .reconcile_on(UnboundedReceiverStream::new(tenant_changed))
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(tenant::reconcile, tenant::error_policy, ctx)
        .for_each(|_| async {})
}

/// The SchemaRollout controller, before its triggers are added, and the cache of the controller's
/// Jobs (migrations, backups: labelled managed-by silo) with its stream of changes.
pub fn rollout_controller(
    rollouts: Api<SchemaRollout>,
    jobs: Api<Job>,
) -> (
    Controller<SchemaRollout>,
    Store<Job>,
    impl futures::Stream<Item = Result<Job, watcher::Error>> + Send + 'static,
) {
    let controller = Controller::new(rollouts, watcher::Config::default());
    let (reader, writer) = reflector::store();
    let job_changes = watcher(
        jobs,
        watcher::Config::default().labels(silo_crds::contract::MANAGED_SELECTOR),
    )
    .default_backoff()
    .reflect(writer)
    .touched_objects();
    (controller, reader, job_changes)
}

/// Runs the SchemaRollout controller until shutdown. A rollout is reconciled when it changes, when
/// one of its Jobs changes (a Job that ends frees a place under the caps: every Progressing
/// rollout looks), when a tenant of its namespace changes (it is the target), and when the
/// namespace's target changes (a rollout deleted).
pub fn run_rollouts(
    controller: Controller<SchemaRollout>,
    job_changes: impl futures::Stream<Item = Result<Job, watcher::Error>> + Send + 'static,
    rollouts: Api<SchemaRollout>,
    tenant_changes: UnboundedReceiver<ObjectRef<Tenant>>,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> {
    let store = ctx.rollouts.clone();
    let target_in = move |namespace: Option<String>| {
        let rollouts = store.state();
        schema_rollout::plan::target(
            rollouts
                .iter()
                .map(Arc::as_ref)
                .filter(|r| r.metadata.namespace == namespace),
        )
        .map(ObjectRef::from_obj)
    };
    let owner_and_progressing = {
        let store = ctx.rollouts.clone();
        move |job: Job| {
            if !job
                .labels()
                .contains_key(silo_crds::contract::ROLLOUT_LABEL)
            {
                return Vec::new();
            }
            let owner = job
                .metadata
                .owner_references
                .unwrap_or_default()
                .into_iter()
                .filter(|o| o.kind == "SchemaRollout")
                .map(|o| {
                    ObjectRef::new(&o.name)
                        .within(job.metadata.namespace.as_deref().unwrap_or_default())
                });
            let progressing = store
                .state()
                .into_iter()
                .filter(|r| {
                    r.status.as_ref().and_then(|s| s.phase) == Some(RolloutPhase::Progressing)
                })
                .map(|r| ObjectRef::from_obj(r.as_ref()));
            owner.chain(progressing).collect::<Vec<_>>()
        }
    };
    let targets_of_tenants = {
        let target_in = target_in.clone();
        UnboundedReceiverStream::new(tenant_changes)
            .filter_map(move |tenant| std::future::ready(target_in(tenant.namespace)))
    };
    let target_after = move |rollout: SchemaRollout| target_in(rollout.metadata.namespace);
    controller
        .watches_stream(job_changes, owner_and_progressing)
        .reconcile_on(targets_of_tenants)
        .watches(rollouts, watcher::Config::default(), target_after)
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(schema_rollout::reconcile, schema_rollout::error_policy, ctx)
        .for_each(|_| async {})
}

/// The TenantBackup controller, before it runs.
pub fn backup_controller(backups: Api<TenantBackup>) -> Controller<TenantBackup> {
    Controller::new(backups, watcher::Config::default())
}

/// Runs the TenantBackup controller until shutdown: a backup is reconciled when it changes, when
/// its Job changes, and when its tenant changes (it may wait for the tenant to be Ready).
pub fn run_backups(
    controller: Controller<TenantBackup>,
    jobs: Api<Job>,
    tenant_changes: UnboundedReceiver<ObjectRef<Tenant>>,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> {
    let store = ctx.backups.clone();
    let backups_of_tenant = move |tenant: ObjectRef<Tenant>| {
        let backups = store
            .state()
            .into_iter()
            .filter(|b| {
                b.metadata.namespace == tenant.namespace
                    && b.spec.tenant == tenant.name
                    && !matches!(
                        b.status.as_ref().and_then(|s| s.phase),
                        Some(JobPhase::Succeeded | JobPhase::Failed)
                    )
            })
            .map(|b| ObjectRef::from_obj(b.as_ref()))
            .collect::<Vec<_>>();
        futures::stream::iter(backups)
    };
    controller
        .owns(
            jobs,
            watcher::Config::default().labels(silo_crds::contract::BACKUP_LABEL),
        )
        .reconcile_on(UnboundedReceiverStream::new(tenant_changes).flat_map(backups_of_tenant))
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(backup::reconcile, backup::error_policy, ctx)
        .for_each(|_| async {})
}

/// The TenantRestore controller, before it runs.
pub fn restore_controller(restores: Api<TenantRestore>) -> Controller<TenantRestore> {
    Controller::new(restores, watcher::Config::default())
}

/// Runs the TenantRestore controller until shutdown: a restore is reconciled when it changes and
/// when its Job changes (it also looks again on a short timer while its tenant locks).
pub fn run_restores(
    controller: Controller<TenantRestore>,
    jobs: Api<Job>,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> {
    controller
        .owns(
            jobs,
            watcher::Config::default().labels(silo_crds::contract::RESTORE_LABEL),
        )
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(restore::reconcile, restore::error_policy, ctx)
        .for_each(|_| async {})
}

/// Runs the DatabaseServer controller until shutdown. A tenant placed or removed changes its
/// server's tenant count: the Tenant reconciler says so through `Context::server_changed`.
pub fn run_servers(
    controller: Controller<DatabaseServer>,
    server_changed: UnboundedReceiver<String>,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> {
    controller
        .reconcile_on(
            UnboundedReceiverStream::new(server_changed)
                .map(|name| ObjectRef::<DatabaseServer>::new(&name)),
        )
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(
            database_server::reconcile,
            database_server::error_policy,
            ctx,
        )
        .for_each(|_| async {})
}

/// Before each scrape: the number of tenants in each phase, from the cache.
pub fn count_tenants_by_phase(
    tenants: Store<Tenant>,
    metrics: Arc<Metrics>,
) -> Arc<dyn Fn() + Send + Sync> {
    Arc::new(move || {
        let mut by_phase: HashMap<String, i64> = HashMap::new();
        for tenant in tenants.state() {
            let phase = tenant
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .map_or("Unknown".into(), |p| p.to_string());
            *by_phase.entry(phase).or_default() += 1;
        }
        for phase in [
            "Pending",
            "Provisioning",
            "Migrating",
            "Ready",
            "Suspended",
            "Restoring",
            "Deleting",
            "Failed",
            "Unknown",
        ] {
            let count = by_phase.get(phase).copied().unwrap_or(0);
            metrics
                .tenants
                .get_or_create(&PhaseLabels {
                    phase: phase.into(),
                })
                .set(count);
        }
    })
}

/// The held Lease: leadership as it changes, and the task that renews the Lease.
pub type Leader = (
    tokio::sync::watch::Receiver<bool>,
    tokio::task::JoinHandle<kube_lease_manager::Result<LeaseManager>>,
);

/// Where waiting for leadership ended.
pub enum Leadership {
    /// No leader election: this replica runs alone.
    Alone,
    Leading(Leader),
    /// Shut down while waiting as a standby.
    Stopped,
}

/// The Lease `namespace/name`, held for `duration` seconds.
pub struct Election {
    pub namespace: String,
    pub name: String,
    pub duration: u64,
    pub identity: String,
}

/// Waits for leadership, unless there is no election. A standby is healthy and ready, and waits.
pub async fn lead(
    client: &Client,
    election: Option<&Election>,
    health: &Health,
    shutdown: &CancellationToken,
) -> Result<Leadership, RunError> {
    let Some(Election {
        namespace,
        name,
        duration,
        identity,
    }) = election
    else {
        return Ok(Leadership::Alone);
    };
    let manager = LeaseManagerBuilder::new(client.clone(), name)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(*duration)
        .with_grace((duration / 3).max(1))
        .build()
        .await?;
    let (mut rx, task) = manager.watch().await;
    health.ready.store(true, Ordering::Relaxed);
    info!(identity = %identity, lease = %name, "waiting for leadership");
    loop {
        if *rx.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return Err(RunError::LostLeadership) },
            _ = shutdown.cancelled() => {
                drop(rx);
                let _ = task.await;
                return Ok(Leadership::Stopped);
            }
        }
    }
    info!(identity = %identity, "leading");
    Ok(Leadership::Leading((rx, task)))
}

/// Runs `controllers` until they stop (at shutdown), or until leadership is lost.
pub async fn while_leading(
    controllers: impl Future<Output = ()>,
    leader: Option<&mut Leader>,
) -> Result<(), RunError> {
    match leader {
        Some((rx, _)) => {
            tokio::select! {
                _ = controllers => Ok(()),
                () = lost_leadership(rx) => {
                    warn!("leadership lost");
                    Err(RunError::LostLeadership)
                }
            }
        }
        None => {
            controllers.await;
            Ok(())
        }
    }
}

async fn lost_leadership(rx: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if rx.changed().await.is_err() || !*rx.borrow_and_update() {
            return;
        }
    }
}

/// Ready once both caches are filled.
pub async fn ready_when_caches_filled(ctx: Arc<Context>, health: Arc<Health>) {
    if ctx.caches_filled().await {
        health.ready.store(true, Ordering::Relaxed);
        info!("caches filled; ready");
    }
}

pub async fn shutdown_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    info!("shutdown signal received");
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;
    use silo_crds::TenantSpec;

    #[test]
    fn every_tenant_the_watch_touches_is_told_to_each_listener() {
        let tenant = |name: &str| {
            let mut t = Tenant::new(name, TenantSpec::default());
            t.metadata.namespace = Some("shop".into());
            t
        };
        let (rollouts, mut for_rollouts) = tokio::sync::mpsc::unbounded_channel();
        let (backups, mut for_backups) = tokio::sync::mpsc::unbounded_channel();
        let (gone, dropped) = tokio::sync::mpsc::unbounded_channel();
        drop(dropped);
        for event in [
            watcher::Event::Apply(tenant("a")),
            watcher::Event::Delete(tenant("b")),
            watcher::Event::Init,
            watcher::Event::InitApply(tenant("c")),
            watcher::Event::InitDone,
        ] {
            tell_touched(&event, &[&rollouts, &gone, &backups]);
        }
        for listener in [&mut for_rollouts, &mut for_backups] {
            let mut told = Vec::new();
            while let Ok(tenant) = listener.try_recv() {
                told.push(format!(
                    "{}/{}",
                    tenant.namespace.unwrap_or_default(),
                    tenant.name
                ));
            }
            assert_eq!(told, ["shop/a", "shop/b", "shop/c"]);
        }
    }
}
