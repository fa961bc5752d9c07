//! The TenantBackup reconciler: one backup Job per TenantBackup, started when its tenant is Ready
//! and its server has room (`maxConcurrentPerServer`), its report recorded on the TenantBackup
//! and the Tenant before the Job goes; deleting a TenantBackup deletes its object.
//!
//! The Job is [`job`], the words of each step [`status`] (pure), the fleet's settings
//! [`settings`], the runner's report [`report`].

pub mod job;
pub mod report;
pub mod schedule;
pub mod scheduler;
pub mod settings;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use object_store::ObjectStoreExt;
use serde_json::json;
use silo_crds::contract::{BACKUP_LABEL, FINAL_BACKUP_LABEL, SERVER_LABEL};
use silo_crds::{JobPhase, Tenant, TenantBackup, TenantBackupStatus, TenantPhase};
use tracing::{info, warn};

use crate::context::Context;
use crate::error::{Error, Result};
use crate::runner::location::Location;
use crate::schema_rollout::outcome::{self, Outcome};
use crate::sql::{TenantNames, scratch};

pub const KIND: &str = "tenantbackup";
/// Held until the backup's object is deleted.
pub const FINALIZER: &str = "silo.dev/backup-object";
/// The Tenant's `lastBackup` and `BackedUp`.
const FIELD_MANAGER: &str = "silo-backups";
/// How soon a backup waiting for its tenant or its server looks again.
const WAIT: Duration = Duration::from_secs(5);

pub fn reconcile(
    backup: Arc<TenantBackup>,
    ctx: Arc<Context>,
) -> BoxFuture<'static, Result<Action>> {
    reconcile_backup(backup, ctx).boxed()
}

pub fn error_policy(backup: Arc<TenantBackup>, error: &Error, _ctx: Arc<Context>) -> Action {
    if error.reason() == "Conflict" {
        return Action::requeue(Duration::from_millis(200));
    }
    warn!(backup = %key(&backup), reason = error.reason(), error = %error, "backup reconcile failed");
    Action::requeue(Duration::from_secs(10))
}

fn key(backup: &TenantBackup) -> String {
    format!(
        "{}/{}",
        backup.namespace().unwrap_or_default(),
        backup.name_any()
    )
}

async fn reconcile_backup(backup: Arc<TenantBackup>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    if !ctx.caches_filled().await {
        return Ok(Action::await_change());
    }
    let api: Api<TenantBackup> =
        Api::namespaced(ctx.client.clone(), &backup.namespace().unwrap_or_default());
    let result = finalizer(&api, FINALIZER, backup, |event| {
        let ctx = ctx.clone();
        async move {
            match event {
                FinalizerEvent::Apply(backup) => apply(&backup, &ctx).await,
                FinalizerEvent::Cleanup(backup) => cleanup(&backup, &ctx).await,
            }
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    match &result {
        Ok(_) => ctx.metrics.reconcile_succeeded(KIND),
        Err(e) => ctx.metrics.reconcile_failed(KIND, e.reason()),
    }
    result
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

fn finished(status: &TenantBackupStatus) -> bool {
    matches!(status.phase, Some(JobPhase::Succeeded | JobPhase::Failed))
}

async fn apply(backup: &TenantBackup, ctx: &Context) -> Result<Action> {
    // A deleted tenant's final backup is run by the Tenant's own deletion (tenant::snapshot);
    // here only its deletion (object included) is handled.
    if backup
        .labels()
        .contains_key(silo_crds::contract::FINAL_BACKUP_LABEL)
    {
        return Ok(Action::await_change());
    }
    let namespace = backup.namespace().unwrap_or_default();
    let current = backup.status.clone().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let job_ref = ObjectRef::new(&job::job_name(&backup.name_any())).within(&namespace);
    let job = ctx.jobs.get(&job_ref);

    // Done: its outcome is in the status read here, so its Job may go.
    if finished(&current) {
        if let Some(job) = job {
            crate::jobs::delete_job(&jobs, &job).await?;
        }
        return Ok(Action::await_change());
    }
    let tenant_ref = ObjectRef::new(&backup.spec.tenant).within(&namespace);
    let tenant = ctx.tenants.get(&tenant_ref);

    if let Some(job) = job {
        match outcome::outcome(&job, &[]) {
            Outcome::Running => {
                // The tenant's server, not the status's: the status read may predate the write
                // that recorded it.
                let server = tenant
                    .as_ref()
                    .and_then(|t| t.status.as_ref()?.server.clone())
                    .or_else(|| current.server.clone())
                    .unwrap_or_default();
                write(
                    backup,
                    ctx,
                    &current,
                    status::running(&current, &server, now()),
                )
                .await?;
                return Ok(Action::requeue(Duration::from_secs(60)));
            }
            Outcome::Succeeded | Outcome::Failed { .. } => {
                let report = read_report(ctx, &namespace, &job).await?;
                let done = status::finished(&current, &report, now());
                if backup.spec.verify {
                    drop_scratch(ctx, tenant.as_deref(), &done).await;
                }
                // The Tenant first: once the backup's status says it finished, its Job goes.
                if let Some(tenant) = &tenant {
                    record_on_tenant(ctx, tenant, &backup.name_any(), &done).await?;
                }
                write(backup, ctx, &current, done.clone()).await?;
                announce(backup, ctx, &done).await;
                return Ok(Action::await_change());
            }
        }
    }
    if current.phase == Some(JobPhase::Running) {
        let failed = status::failed(
            &current,
            "JobLost",
            "the backup Job was deleted before it reported; take a new backup",
            now(),
        );
        write(backup, ctx, &current, failed).await?;
        return Ok(Action::await_change());
    }

    // Not started: the tenant, its server, a place under the cap.
    let Some(tenant) = tenant else {
        let error = format!(
            "Tenant {} does not exist in namespace {namespace}",
            backup.spec.tenant
        );
        write(
            backup,
            ctx,
            &current,
            status::failed(&current, "TenantNotFound", &error, now()),
        )
        .await?;
        return Ok(Action::await_change());
    };
    let destination = backup
        .spec
        .destination
        .clone()
        .unwrap_or_else(|| ctx.backup_settings.destination.clone());
    let checked = settings::check_destination(&destination)
        .and_then(|()| ctx.backup_settings.check_kept(&destination));
    if let Err(error) = checked {
        let error = format!("destination {error}");
        write(
            backup,
            ctx,
            &current,
            status::failed(&current, "BadDestination", &error, now()),
        )
        .await?;
        return Ok(Action::await_change());
    }
    let tenant_status = tenant.status.clone().unwrap_or_default();
    let phase = tenant_status.phase;
    let (Some(server), true) = (
        tenant_status.server.clone(),
        matches!(phase, Some(TenantPhase::Ready | TenantPhase::Migrating)),
    ) else {
        let message = format!(
            "Tenant {} is {}; the backup starts once it is Ready",
            backup.spec.tenant,
            phase.map_or("not provisioned".to_string(), |p| p.to_string())
        );
        write(
            backup,
            ctx,
            &current,
            status::pending(&current, "TenantNotReady", &message, now()),
        )
        .await?;
        return Ok(Action::requeue(WAIT));
    };
    let cap = ctx.backup_settings.max_concurrent_per_server.max(1);
    let _starting = ctx.backup_starts.lock().await;
    let running = running_on(ctx, &server, true);
    if running >= cap {
        let message = format!(
            "{running} backups run on {server} (maxConcurrentPerServer {cap}); waiting for a place"
        );
        write(
            backup,
            ctx,
            &current,
            status::pending(&current, "WaitingForServer", &message, now()),
        )
        .await?;
        return Ok(Action::requeue(WAIT));
    }
    let names = TenantNames::of(&tenant);
    let scratch_db = scratch::scratch_name(&names.database);
    if backup.spec.verify {
        let Some(handle) = ctx.pools.get(&server) else {
            let message = format!("DatabaseServer {server} is not connected yet");
            write(
                backup,
                ctx,
                &current,
                status::pending(&current, "ServerNotConnected", &message, now()),
            )
            .await?;
            return Ok(Action::requeue(WAIT));
        };
        let _ddl = handle.ddl_permit().await;
        scratch::create(&handle.pool, &scratch_db, &names.role, &backup.name_any())
            .await
            .map_err(|e| Error::sql("creating the scratch database", &server, e))?;
    }
    let verify_into = match (
        backup.spec.verify,
        ctx.servers.get(&ObjectRef::new(&server)),
    ) {
        (true, Some(dbs)) => Some(database_url(&dbs.spec.host, dbs.spec.port, &scratch_db)),
        _ => None,
    };
    let source = job::Source {
        namespace: &namespace,
        tenant: &backup.spec.tenant,
        secret: silo_crds::contract::secret_name(&backup.spec.tenant),
        server: &server,
        schema_version: tenant_status.schema_version.as_deref(),
        verify_into,
    };
    let new_job = job::backup_job(
        backup,
        &destination,
        &source,
        &ctx.backup_settings,
        &ctx.job_settings,
    );
    match jobs.create(&PostParams::default(), &new_job).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    info!(backup = %key(backup), tenant = %backup.spec.tenant, server = %server, "backup started");
    // The next backup's count of this server's Jobs includes this one.
    let created = || ctx.jobs.get(&job_ref).is_some();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !created() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    write(
        backup,
        ctx,
        &current,
        status::running(&current, &server, now()),
    )
    .await?;
    Ok(Action::requeue(Duration::from_secs(60)))
}

/// `postgres://host:port/database`, without user or password (the runner's environment has them).
pub fn database_url(host: &str, port: i32, database: &str) -> String {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    format!("postgres://{host}:{port}/{database}")
}

/// Backup Jobs running against `server`.
/// Backup Jobs running against `server` that this controller's Job cache holds (final backups
/// too, where it watches their namespace; `final_backups: false` leaves them out).
pub(crate) fn running_on(ctx: &Context, server: &str, final_backups: bool) -> usize {
    let label = crate::jobs::label_value(server);
    ctx.jobs
        .state()
        .iter()
        .filter(|j| j.labels().contains_key(BACKUP_LABEL))
        .filter(|j| final_backups || !j.labels().contains_key(FINAL_BACKUP_LABEL))
        .filter(|j| outcome::outcome(j, &[]) == Outcome::Running)
        .filter(|j| {
            if let Some(on) = j.labels().get(SERVER_LABEL) {
                return *on == label;
            }
            // A Job from before the label: its tenant's server.
            let tenant = j
                .labels()
                .get(silo_crds::contract::TENANT_LABEL)
                .cloned()
                .unwrap_or_default();
            let tenant_ref = ObjectRef::new(&tenant).within(&j.namespace().unwrap_or_default());
            ctx.tenants
                .get(&tenant_ref)
                .and_then(|t| t.status.as_ref()?.server.clone())
                .as_deref()
                == Some(server)
        })
        .count()
}

/// The runner's report, from its pod's termination message.
pub(crate) async fn read_report(
    ctx: &Context,
    namespace: &str,
    job: &Job,
) -> Result<report::Report> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let selector = format!(
        "batch.kubernetes.io/controller-uid={}",
        job.uid().unwrap_or_default()
    );
    let pods = pods.list(&ListParams::default().labels(&selector)).await?;
    let message = outcome::last_words(&pods.items);
    let mut report = report::parse(message.as_deref());
    if !report.ok
        && report.error.is_none()
        && let Outcome::Failed { message, .. } = outcome::outcome(job, &pods.items)
    {
        report.error = Some(message);
    }
    Ok(report)
}

/// Drops a verifying backup's scratch database; a failure is logged (the next verify drops it).
async fn drop_scratch(ctx: &Context, tenant: Option<&Tenant>, done: &TenantBackupStatus) {
    let Some(tenant) = tenant else {
        return;
    };
    let Some(server) = tenant
        .status
        .as_ref()
        .and_then(|s| s.server.clone())
        .or_else(|| done.server.clone())
    else {
        return;
    };
    let server = server.as_str();
    let Some(handle) = ctx.pools.get(server) else {
        return;
    };
    let name = scratch::scratch_name(&TenantNames::of(tenant).database);
    let _ddl = handle.ddl_permit().await;
    if let Err(e) = scratch::drop_scratch(&handle.pool, &name).await {
        warn!(server = %server, database = %name, error = %e, "dropping a scratch database failed");
    }
}

/// Writes the backup's status if it changed.
async fn write(
    backup: &TenantBackup,
    ctx: &Context,
    current: &TenantBackupStatus,
    next: TenantBackupStatus,
) -> Result<()> {
    let api: Api<TenantBackup> =
        Api::namespaced(ctx.client.clone(), &backup.namespace().unwrap_or_default());
    crate::jobs::apply_status(&api, &backup.name_any(), current, &next).await?;
    Ok(())
}

/// The end of a backup, as an Event on it and on its Tenant.
async fn announce(backup: &TenantBackup, ctx: &Context, done: &TenantBackupStatus) {
    let (type_, reason, note) = match done.phase {
        Some(JobPhase::Succeeded) => (
            EventType::Normal,
            "BackedUp",
            format!(
                "{} bytes stored at {}",
                done.bytes.unwrap_or(0),
                done.uri.clone().unwrap_or_default()
            ),
        ),
        _ => (
            EventType::Warning,
            "BackupFailed",
            done.error.clone().unwrap_or_default(),
        ),
    };
    info!(backup = %key(backup), result = %reason, "{note}");
    let note = outcome::head(&note, 1000);
    let mut references = vec![backup.object_ref(&())];
    let tenant_ref = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("silo.dev/v1alpha1".into()),
        kind: Some("Tenant".into()),
        name: Some(backup.spec.tenant.clone()),
        namespace: backup.namespace(),
        ..Default::default()
    };
    references.push(tenant_ref);
    for reference in references {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(format!("TenantBackup {}: {note}", backup.name_any())),
            action: "Backup".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            warn!(backup = %key(backup), error = %e, "publishing event failed");
        }
    }
}

/// The Tenant's `lastBackup` and `BackedUp`, under this reconciler's field manager.
async fn record_on_tenant(
    ctx: &Context,
    tenant: &Tenant,
    name: &str,
    done: &TenantBackupStatus,
) -> Result<()> {
    let current = tenant.status.clone().unwrap_or_default();
    let (last, desired) = status::on_tenant(name, done, current.last_backup.as_ref());
    let merged = silo_crds::conditions::merge(
        &current.conditions,
        std::slice::from_ref(&desired),
        tenant.metadata.generation,
        now(),
    );
    let condition = merged.into_iter().find(|c| c.type_ == desired.type_);
    let mut status = json!({ "conditions": condition.into_iter().collect::<Vec<_>>() });
    if let Some(last) = last {
        status["lastBackup"] = json!(last);
    }
    let patch = json!({
        "apiVersion": "silo.dev/v1alpha1",
        "kind": "Tenant",
        "metadata": { "resourceVersion": tenant.resource_version() },
        "status": status,
    });
    let api: Api<Tenant> =
        Api::namespaced(ctx.client.clone(), &tenant.namespace().unwrap_or_default());
    api.patch_status(
        &tenant.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Deletes the backup's object and manifest (and its Job, if it still runs).
async fn cleanup(backup: &TenantBackup, ctx: &Context) -> Result<Action> {
    let namespace = backup.namespace().unwrap_or_default();
    let job_ref = ObjectRef::new(&job::job_name(&backup.name_any())).within(&namespace);
    if let Some(job) = ctx.jobs.get(&job_ref) {
        let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
        crate::jobs::delete_job(&jobs, &job).await?;
    }
    delete_object(backup).await?;
    Ok(Action::await_change())
}

/// Deletes the backup's object and manifest from the store, if it stored any.
pub(crate) async fn delete_object(backup: &TenantBackup) -> Result<()> {
    let Some(uri) = backup.status.as_ref().and_then(|s| s.uri.clone()) else {
        return Ok(());
    };
    let (location, name) = Location::parse_object(&uri).map_err(|e| Error::Backup {
        message: format!("the backup's object {uri}: {e}"),
    })?;
    let manifest = match name.strip_suffix(".dump") {
        Some(stem) => format!("{stem}.json"),
        None => format!("{name}.json"),
    };
    for object in [name.as_str(), manifest.as_str()] {
        let opened = location.open(object, false).map_err(|e| Error::Backup {
            message: format!("opening {uri}: {e}"),
        })?;
        match opened.store.delete(&opened.path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => {
                return Err(Error::Backup {
                    message: format!("deleting {}: {e}", opened.uri),
                });
            }
        }
    }
    info!(backup = %key(backup), uri = %uri, "backup object deleted");
    Ok(())
}
