//! Silo's operator: reconcilers for DatabaseServer and Tenant, leader election, metrics and probes.

pub mod config;
pub mod context;
pub mod database_server;
pub mod error;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod sql;
pub mod telemetry;
pub mod tenant;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{PredicateConfig, WatchStreamExt, reflector, watcher};
use kube_lease_manager::LeaseManagerBuilder;
use silo_crds::{DatabaseServer, Tenant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Args;
use crate::context::Context;
use crate::http::Health;
use crate::metrics::{Metrics, PhaseLabels};
use crate::sql::ServerPools;
use crate::sql::pools::PoolLimits;

#[derive(thiserror::Error, Debug)]
pub enum RunError {
    #[error("connecting to Kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("leader election: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    #[error("lost leadership; exiting so that a fresh start rejoins the election")]
    LostLeadership,
    #[error("http server: {0}")]
    Http(#[from] std::io::Error),
    #[error(transparent)]
    JobSettings(#[from] jobs::JobSettingsError),
}

/// Runs until SIGTERM/SIGINT (Ok) or until leadership is lost (Err).
pub async fn run(args: Args) -> Result<(), RunError> {
    let Args {
        http_addr,
        log_format: _,
        log_filter: _,
        resync_interval,
        ddl_concurrency,
        tenant_concurrency,
        watch_namespace,
        server_selector,
        tenant_selector,
        admin_secret_namespaces,
        router_address,
        leader_election,
        lease_namespace,
        lease_name,
        lease_duration,
        identity,
        job_settings,
    } = args;
    let job_settings = match job_settings {
        Some(path) => jobs::JobSettings::load(&path)?,
        None => jobs::JobSettings::default(),
    };
    let identity = identity.unwrap_or_else(|| format!("silo-controller-{}", std::process::id()));
    let client = Client::try_default().await?;
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(shutdown.clone()));

    let (tenant_api, secret_api): (Api<Tenant>, Api<Secret>) = match &watch_namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let server_api: Api<DatabaseServer> = Api::all(client.clone());
    let server_watch = match &server_selector {
        Some(selector) => watcher::Config::default().labels(selector),
        None => watcher::Config::default(),
    };
    // Tenants are reconciled when their spec, finalizers or deletion change, not when the
    // controller's own status writes come back through the watch (resync covers the rest).
    let (tenant_reader, tenant_writer) = reflector::store();
    let tenant_watch = match &tenant_selector {
        Some(selector) => watcher::Config::default().labels(selector),
        None => watcher::Config::default(),
    };
    let tenant_changes = watcher(tenant_api.clone(), tenant_watch)
        .default_backoff()
        .reflect(tenant_writer)
        .applied_objects()
        .predicate_filter(tenant::spec_changed, PredicateConfig::default());
    let tenant_controller = Controller::for_stream(tenant_changes, tenant_reader)
        .with_config(ControllerConfig::default().concurrency(tenant_concurrency));
    // Servers are reconciled when their spec or labels change, on a timer, and when a tenant is
    // placed on or removed from them (the tenant reconciler says so through `server_changed`).
    let (server_reader, server_writer) = reflector::store();
    let server_changes = watcher(server_api.clone(), server_watch.clone())
        .default_backoff()
        .reflect(server_writer)
        .applied_objects()
        .predicate_filter(database_server::spec_changed, PredicateConfig::default());
    let (server_changed, server_changed_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (tenant_changed, tenant_changed_rx) = tokio::sync::mpsc::unbounded_channel();
    let server_controller = Controller::for_stream(server_changes, server_reader)
        .with_config(ControllerConfig::default().debounce(std::time::Duration::from_millis(500)));
    let tenants = tenant_controller.store();
    let servers = server_controller.store();

    let scrape_tenants = tenants.clone();
    let scrape_metrics = metrics.clone();
    let before_scrape: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
        let mut by_phase: HashMap<String, i64> = HashMap::new();
        for tenant in scrape_tenants.state() {
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
            "Ready",
            "Suspended",
            "Deleting",
            "Failed",
            "Unknown",
        ] {
            let count = by_phase.get(phase).copied().unwrap_or(0);
            scrape_metrics
                .tenants
                .get_or_create(&PhaseLabels {
                    phase: phase.into(),
                })
                .set(count);
        }
    });
    let http = tokio::spawn(http::serve(
        http_addr,
        metrics.clone(),
        health.clone(),
        before_scrape,
        shutdown.clone(),
    ));

    // Leadership: a standby is healthy and ready, and waits.
    let mut leader = if leader_election {
        let manager = LeaseManagerBuilder::new(client.clone(), &lease_name)
            .with_namespace(&lease_namespace)
            .with_identity(&identity)
            .with_duration(lease_duration)
            .with_grace((lease_duration / 3).max(1))
            .build()
            .await?;
        let (mut rx, task) = manager.watch().await;
        health.ready.store(true, Ordering::Relaxed);
        info!(identity = %identity, lease = %lease_name, "waiting for leadership");
        loop {
            if *rx.borrow_and_update() {
                break;
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return Err(RunError::LostLeadership) },
                _ = shutdown.cancelled() => {
                    drop(rx);
                    let _ = task.await;
                    return Ok(());
                }
            }
        }
        info!(identity = %identity, "leading");
        Some((rx, task))
    } else {
        None
    };
    health.ready.store(false, Ordering::Relaxed);

    let placements: context::Placements = Default::default();
    let ctx = Arc::new(Context {
        client: client.clone(),
        pools: ServerPools::new(PoolLimits {
            ddl_concurrency: usize::from(ddl_concurrency),
            acquire_timeout: std::time::Duration::from_secs(30),
        }),
        servers: servers.clone(),
        tenants: tenants.clone(),
        placements: placements.clone(),
        server_changed,
        tenant_changed,
        metrics: metrics.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "silo-controller".into(),
                instance: Some(identity),
            },
        ),
        resync: resync_interval,
        router_address,
        server_selector: server_selector.clone(),
        admin_secret_namespaces,
        job_settings,
        server_failures: Default::default(),
    });

    // A server change wakes the tenants waiting for a placement (phase Pending, not placed by
    // this process since). Tenants that are placed, or new, have their own triggers.
    let pending_tenants = tenants.clone();
    let mapper_placements = placements.clone();
    let tenants_on_server = move |_server: DatabaseServer| {
        let placed = context::lock_placements(&mapper_placements);
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
    // A tenant placed or removed changes its server's tenant count.
    let stop = shutdown.clone();
    let tenant_loop = tenant_controller
        .owns(
            secret_api,
            watcher::Config::default().labels(silo_crds::contract::MANAGED_SELECTOR),
        )
        .watches(server_api, server_watch, tenants_on_server)
        .reconcile_on(tokio_stream::wrappers::UnboundedReceiverStream::new(
            tenant_changed_rx,
        ))
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(tenant::reconcile, tenant::error_policy, ctx.clone())
        .for_each(|_| async {});
    let stop = shutdown.clone();
    let server_loop = server_controller
        .reconcile_on(
            tokio_stream::wrappers::UnboundedReceiverStream::new(server_changed_rx)
                .map(|name| ObjectRef::<DatabaseServer>::new(&name)),
        )
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(
            database_server::reconcile,
            database_server::error_policy,
            ctx.clone(),
        )
        .for_each(|_| async {});

    let ready = {
        let (ctx, health) = (ctx.clone(), health.clone());
        async move {
            if ctx.caches_filled().await {
                health.ready.store(true, Ordering::Relaxed);
                info!("caches filled; ready");
            }
        }
    };
    tokio::spawn(ready);

    let controllers = async {
        tokio::join!(tenant_loop, server_loop);
    };
    let result = match &mut leader {
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
    };
    shutdown.cancel();
    if let Some((rx, task)) = leader {
        // Closing the channel makes the lease manager release the Lease, so a standby takes over at once.
        drop(rx);
        let _ = task.await;
    }
    if let Ok(Err(e)) = http.await {
        warn!(error = %e, "http server stopped with an error");
    }
    info!("stopped");
    result
}

async fn lost_leadership(rx: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if rx.changed().await.is_err() || !*rx.borrow_and_update() {
            return;
        }
    }
}

async fn shutdown_on_signal(shutdown: CancellationToken) {
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
