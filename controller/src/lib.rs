//! Silo's operator: reconcilers for DatabaseServer, Tenant and SchemaRollout, leader election, metrics and probes.

pub mod backup;
pub mod config;
pub mod context;
pub mod database_server;
pub mod error;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod restore;
pub mod runner;
pub mod schema_rollout;
pub mod sql;
pub mod telemetry;
pub mod tenant;
mod wiring;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use silo_crds::{DatabaseServer, SchemaRollout, Tenant, TenantBackup, TenantRestore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Args;
use crate::context::Context;
use crate::http::Health;
use crate::metrics::Metrics;
use crate::sql::ServerPools;
use crate::sql::pools::PoolLimits;
use crate::wiring::{Election, Leadership};

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
    #[error(transparent)]
    BackupSettings(#[from] backup::settings::BackupSettingsError),
}

/// An API of `namespace`'s objects, or of every namespace's.
fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
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
        backup_settings,
        final_backup_namespace,
    } = args;
    let final_backup_namespace = final_backup_namespace.unwrap_or_else(|| lease_namespace.clone());
    let job_settings = match job_settings {
        Some(path) => jobs::JobSettings::load(&path)?,
        None => jobs::JobSettings::default(),
    };
    let backup_settings = match backup_settings {
        Some(path) => backup::settings::BackupSettings::load(&path)?,
        None => backup::settings::BackupSettings::default(),
    };
    let identity = identity.unwrap_or_else(|| format!("silo-controller-{}", std::process::id()));
    let client = Client::try_default().await?;
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let shutdown = CancellationToken::new();
    tokio::spawn(wiring::shutdown_on_signal(shutdown.clone()));

    // What this install watches: one namespace or all, and the servers and tenants its selectors pick.
    let ns = watch_namespace.as_deref();
    let tenant_api: Api<Tenant> = scoped(&client, ns);
    let secret_api: Api<Secret> = scoped(&client, ns);
    let rollout_api: Api<SchemaRollout> = scoped(&client, ns);
    let job_api: Api<Job> = scoped(&client, ns);
    let backup_api: Api<TenantBackup> = scoped(&client, ns);
    let restore_api: Api<TenantRestore> = scoped(&client, ns);
    let server_api: Api<DatabaseServer> = Api::all(client.clone());
    let server_watch = wiring::selected(server_selector.as_deref());
    let tenant_watch = wiring::selected(tenant_selector.as_deref());
    let placements = context::Placements::default();
    let wiring::TenantWatch {
        controller: tenant_controller,
        servers: tenant_servers,
        for_rollouts,
        for_backups,
    } = wiring::tenant_controller(
        tenant_api,
        tenant_watch,
        tenant_concurrency,
        placements.clone(),
    );
    let (rollout_controller, jobs, job_changes) =
        wiring::rollout_controller(rollout_api.clone(), job_api.clone());
    let server_controller = wiring::server_controller(server_api.clone(), server_watch.clone());
    let (server_changed, server_changed_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let (tenant_changed, tenant_changed_rx) = tokio::sync::mpsc::unbounded_channel();
    let tenants = tenant_controller.store();
    let secret_writes = context::SecretWrites::default();
    let (secrets, secret_changes) = wiring::tenant_secrets(secret_api, secret_writes.clone());
    let servers = server_controller.store();
    let rollouts = rollout_controller.store();
    let backup_controller = wiring::backup_controller(backup_api);
    let backups = backup_controller.store();
    let restore_controller = wiring::restore_controller(restore_api.clone());
    let restores = restore_controller.store();

    let before_scrape = wiring::count_tenants_by_phase(tenants.clone(), metrics.clone());
    let http = tokio::spawn(http::serve(
        http_addr,
        metrics.clone(),
        health.clone(),
        before_scrape,
        shutdown.clone(),
    ));

    let election = leader_election.then(|| Election {
        namespace: lease_namespace,
        name: lease_name,
        duration: lease_duration,
        identity: identity.clone(),
    });
    let mut leader = match wiring::lead(&client, election.as_ref(), &health, &shutdown).await? {
        Leadership::Alone => None,
        Leadership::Leading(leader) => Some(leader),
        Leadership::Stopped => return Ok(()),
    };
    health.ready.store(false, Ordering::Relaxed);

    let ctx = Arc::new(Context {
        client: client.clone(),
        pools: ServerPools::new(PoolLimits {
            ddl_concurrency: usize::from(ddl_concurrency),
            acquire_timeout: std::time::Duration::from_secs(30),
        }),
        servers,
        tenants,
        tenant_servers,
        secrets,
        secret_writes,
        rollouts,
        jobs,
        backups,
        restores,
        rollout_starts: Default::default(),
        backup_settings,
        backup_starts: Default::default(),
        final_backup_namespace,
        watch_namespace: watch_namespace.clone(),
        failures: Default::default(),
        placements,
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
        server_selector,
        admin_secret_namespaces,
        job_settings,
        server_failures: Default::default(),
    });
    let tenant_loop = wiring::run_tenants(
        tenant_controller,
        secret_changes,
        server_api,
        server_watch,
        rollout_api.clone(),
        restore_api,
        tenant_changed_rx,
        ctx.clone(),
        shutdown.clone(),
    );
    let server_loop = wiring::run_servers(
        server_controller,
        server_changed_rx,
        ctx.clone(),
        shutdown.clone(),
    );
    let rollout_loop = wiring::run_rollouts(
        rollout_controller,
        job_changes,
        rollout_api,
        for_rollouts,
        ctx.clone(),
        shutdown.clone(),
    );
    let restore_loop = wiring::run_restores(
        restore_controller,
        job_api.clone(),
        ctx.clone(),
        shutdown.clone(),
    );
    let backup_loop = wiring::run_backups(
        backup_controller,
        job_api.clone(),
        for_backups,
        ctx.clone(),
        shutdown.clone(),
    );
    tokio::spawn(wiring::ready_when_caches_filled(
        ctx.clone(),
        health.clone(),
    ));

    let controllers = async {
        tokio::join!(
            backup::scheduler::run(ctx.clone(), shutdown.clone()),
            tenant_loop,
            server_loop,
            rollout_loop,
            backup_loop,
            restore_loop
        );
    };
    let result = wiring::while_leading(controllers, leader.as_mut()).await;

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
