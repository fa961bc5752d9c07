//! The TenantRestore reconciler: a backup streamed back into a tenant's database by the `silo`
//! runner, while the tenant is locked.
//!
//! The steps: the source resolved (a Succeeded TenantBackup, or a URI with its sha256) and the
//! target Tenant found, the restore turns Running, which locks the tenant (its reconciler makes
//! the role NOLOGIN, ends its sessions and reports phase `Restoring`, which the router refuses
//! with 57P03); once locked, a temporary login that is a member of the tenant's role is created,
//! and the Job restores as the tenant (`pg_restore --role`), touching nothing else; when the Job
//! ends, the login is dropped and the restore's end unlocks the tenant, success or not.

pub mod job;

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use silo_crds::conditions::{self, COMPLETE, Desired};
use silo_crds::{JobPhase, Tenant, TenantPhase, TenantRestore, TenantRestoreStatus};
use tracing::{info, warn};

use crate::backup::report;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::schema_rollout::outcome::{self, Outcome};
use crate::sql::{TenantNames, restore as login, scram};

pub const KIND: &str = "tenantrestore";
const WAIT: Duration = Duration::from_secs(2);

/// The restore that locks `tenant` now: one of its namespace, naming it, Running.
pub fn active_for(tenant: &Tenant, ctx: &Context) -> Option<String> {
    let mut active: Vec<String> = ctx
        .restores
        .state()
        .iter()
        .filter(|r| {
            r.namespace() == tenant.namespace()
                && Some(&r.spec.tenant) == tenant.metadata.name.as_ref()
        })
        .filter(|r| r.status.as_ref().and_then(|s| s.phase) == Some(JobPhase::Running))
        .map(|r| r.name_any())
        .collect();
    active.sort();
    active.into_iter().next()
}

pub fn reconcile(
    restore: Arc<TenantRestore>,
    ctx: Arc<Context>,
) -> BoxFuture<'static, Result<Action>> {
    reconcile_restore(restore, ctx).boxed()
}

pub fn error_policy(restore: Arc<TenantRestore>, error: &Error, _ctx: Arc<Context>) -> Action {
    if error.reason() == "Conflict" {
        return Action::requeue(Duration::from_millis(200));
    }
    warn!(restore = %key(&restore), reason = error.reason(), error = %error, "restore reconcile failed");
    Action::requeue(Duration::from_secs(10))
}

fn key(restore: &TenantRestore) -> String {
    format!(
        "{}/{}",
        restore.namespace().unwrap_or_default(),
        restore.name_any()
    )
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

async fn reconcile_restore(restore: Arc<TenantRestore>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    if !ctx.caches_filled().await {
        return Ok(Action::await_change());
    }
    let result = apply(&restore, &ctx).await;
    match &result {
        Ok(_) => ctx.metrics.reconcile_succeeded(KIND),
        Err(e) => ctx.metrics.reconcile_failed(KIND, e.reason()),
    }
    result
}

/// A status with `phase`, and the `Complete` condition saying why.
fn step(
    current: &TenantRestoreStatus,
    phase: JobPhase,
    reason: &str,
    message: &str,
) -> TenantRestoreStatus {
    let done = matches!(phase, JobPhase::Succeeded | JobPhase::Failed);
    TenantRestoreStatus {
        phase: Some(phase),
        start_time: match phase {
            JobPhase::Pending => current.start_time.clone(),
            _ => current.start_time.clone().or(Some(now())),
        },
        completion_time: done.then(now),
        error: (phase == JobPhase::Failed).then(|| message.to_string()),
        conditions: conditions::merge(
            &current.conditions,
            &[Desired::new(
                COMPLETE,
                phase == JobPhase::Succeeded,
                reason,
                message,
            )],
            None,
            now(),
        ),
        ..current.clone()
    }
}

async fn apply(restore: &TenantRestore, ctx: &Context) -> Result<Action> {
    let namespace = restore.namespace().unwrap_or_default();
    let current = restore.status.clone().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let job_ref = ObjectRef::new(&job::job_name(&restore.name_any())).within(&namespace);
    let existing = ctx.jobs.get(&job_ref);
    if matches!(current.phase, Some(JobPhase::Succeeded | JobPhase::Failed)) {
        if let Some(job) = existing {
            crate::jobs::delete_job(&jobs, &job).await?;
        }
        return Ok(Action::await_change());
    }
    let tenant_ref = ObjectRef::new(&restore.spec.tenant).within(&namespace);
    let Some(tenant) = ctx.tenants.get(&tenant_ref) else {
        let message = format!(
            "Tenant {} does not exist in namespace {namespace}",
            restore.spec.tenant
        );
        return finish(
            restore,
            ctx,
            &current,
            JobPhase::Failed,
            "TenantNotFound",
            &message,
            None,
        )
        .await;
    };
    let names = TenantNames::of(&tenant);
    let restore_login = login::login_name(&names.role);

    // The Job ended: the login goes, then the restore's end unlocks the tenant.
    if let Some(job) = existing {
        if outcome::outcome(&job, &[]) == Outcome::Running {
            return Ok(Action::requeue(Duration::from_secs(60)));
        }
        let report = read_report(ctx, &namespace, &job).await?;
        if let Some(handle) = server_of(&tenant).and_then(|s| ctx.pools.get(&s)) {
            let _ddl = handle.ddl_permit().await;
            login::drop_login(&handle.pool, &restore_login)
                .await
                .map_err(|e| Error::sql("dropping the restore login", &handle.name, e))?;
        }
        let (phase, reason, message) = if report.ok {
            (
                JobPhase::Succeeded,
                "Restored",
                format!(
                    "{} restored into the database of Tenant {}",
                    current.uri.clone().unwrap_or_default(),
                    restore.spec.tenant
                ),
            )
        } else {
            (
                JobPhase::Failed,
                "RestoreFailed",
                report
                    .error
                    .clone()
                    .unwrap_or_else(|| "the restore failed".into()),
            )
        };
        return finish(
            restore,
            ctx,
            &current,
            phase,
            reason,
            &message,
            Some(&tenant),
        )
        .await;
    }

    // The source: a Succeeded TenantBackup, or a URI with its sha256.
    let (uri, sha256) = match (&restore.spec.from.backup, &restore.spec.from.uri) {
        (Some(name), _) => {
            let backup = ctx.backups.get(&ObjectRef::new(name).within(&namespace));
            let status = backup
                .as_ref()
                .and_then(|b| b.status.clone())
                .unwrap_or_default();
            match (backup.is_some(), status.phase, status.uri, status.sha256) {
                (false, ..) => {
                    let message =
                        format!("TenantBackup {name} does not exist in namespace {namespace}");
                    return finish(
                        restore,
                        ctx,
                        &current,
                        JobPhase::Failed,
                        "BackupNotFound",
                        &message,
                        None,
                    )
                    .await;
                }
                (_, Some(JobPhase::Succeeded), Some(uri), Some(sha)) => (uri, sha),
                (_, Some(JobPhase::Failed), ..) => {
                    let message =
                        format!("TenantBackup {name} failed; there is nothing to restore");
                    return finish(
                        restore,
                        ctx,
                        &current,
                        JobPhase::Failed,
                        "BackupFailed",
                        &message,
                        None,
                    )
                    .await;
                }
                _ => {
                    let message = format!("waiting for TenantBackup {name} to succeed");
                    write(
                        restore,
                        ctx,
                        &current,
                        step(&current, JobPhase::Pending, "WaitingForBackup", &message),
                    )
                    .await?;
                    return Ok(Action::requeue(Duration::from_secs(5)));
                }
            }
        }
        (None, Some(uri)) => (
            uri.clone(),
            restore.spec.from.sha256.clone().unwrap_or_default(),
        ),
        (None, None) => {
            let message = "from names neither a backup nor a uri";
            return finish(
                restore,
                ctx,
                &current,
                JobPhase::Failed,
                "NoSource",
                message,
                None,
            )
            .await;
        }
    };
    if let Err(error) = ctx.backup_settings.check_kept(&uri) {
        let message = format!("source {error}");
        return finish(
            restore,
            ctx,
            &current,
            JobPhase::Failed,
            "BadSource",
            &message,
            None,
        )
        .await;
    }
    let Some(server) = server_of(&tenant) else {
        let message = format!("Tenant {} has no database yet", restore.spec.tenant);
        write(
            restore,
            ctx,
            &current,
            step(&current, JobPhase::Pending, "TenantNotReady", &message),
        )
        .await?;
        return Ok(Action::requeue(Duration::from_secs(5)));
    };

    // Running locks the tenant; the Job starts once its reconciler reports it locked.
    if current.phase != Some(JobPhase::Running) {
        let message = format!("locking Tenant {} for the restore", restore.spec.tenant);
        let mut running = step(&current, JobPhase::Running, "Locking", &message);
        running.uri = Some(uri.clone());
        write(restore, ctx, &current, running).await?;
        let _ = ctx
            .tenant_changed
            .send(ObjectRef::from_obj(tenant.as_ref()));
        info!(restore = %key(restore), tenant = %restore.spec.tenant, uri = %uri, "restore started: locking the tenant");
        return Ok(Action::requeue(WAIT));
    }
    let phase = tenant.status.as_ref().and_then(|s| s.phase);
    if phase != Some(TenantPhase::Restoring) {
        let _ = ctx
            .tenant_changed
            .send(ObjectRef::from_obj(tenant.as_ref()));
        return Ok(Action::requeue(WAIT));
    }
    let (Some(handle), Some(dbs)) = (
        ctx.pools.get(&server),
        ctx.servers.get(&ObjectRef::new(&server)),
    ) else {
        return Err(Error::ServerNotConnected { server });
    };
    let password = scram::generate_password();
    {
        let _ddl = handle.ddl_permit().await;
        login::create_login(
            &handle.pool,
            &restore_login,
            &names.role,
            &scram::verifier(&password),
        )
        .await
        .map_err(|e| Error::sql("creating the restore login", &server, e))?;
    }
    let secret_name = job::secret_name(&restore.name_any());
    ensure_login_secret(ctx, restore, &secret_name, &restore_login, &password).await?;
    let target = job::Target {
        database_url: crate::backup::database_url(&dbs.spec.host, dbs.spec.port, &names.database),
        role: names.role.clone(),
        login_secret: secret_name,
    };
    let new_job = job::restore_job(
        restore,
        &uri,
        &sha256,
        &target,
        &ctx.backup_settings,
        &ctx.job_settings,
    );
    match jobs.create(&PostParams::default(), &new_job).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    let message = format!(
        "restoring {uri} into the database of Tenant {}",
        restore.spec.tenant
    );
    write(
        restore,
        ctx,
        &current,
        step(&current, JobPhase::Running, "Restoring", &message),
    )
    .await?;
    Ok(Action::requeue(Duration::from_secs(60)))
}

fn server_of(tenant: &Tenant) -> Option<String> {
    tenant.status.as_ref()?.server.clone()
}

/// The restore login's credentials, for the Job; owned by the TenantRestore. The login is
/// dropped when the restore ends, so they are worth nothing after.
async fn ensure_login_secret(
    ctx: &Context,
    restore: &TenantRestore,
    name: &str,
    user: &str,
    password: &str,
) -> Result<()> {
    let api: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &restore.namespace().unwrap_or_default());
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            owner_references: restore.controller_owner_ref(&()).map(|o| vec![o]),
            labels: Some(
                [(
                    silo_crds::contract::MANAGED_BY_LABEL.to_string(),
                    silo_crds::contract::MANAGED_BY.to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        data: Some(
            [
                ("user".to_string(), ByteString(user.as_bytes().to_vec())),
                (
                    "password".to_string(),
                    ByteString(password.as_bytes().to_vec()),
                ),
            ]
            .into(),
        ),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            // A restart between the login and the Job: the login got a new password.
            api.patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "data": secret.data })),
            )
            .await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

async fn read_report(ctx: &Context, namespace: &str, job: &Job) -> Result<report::Report> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let selector = format!(
        "batch.kubernetes.io/controller-uid={}",
        job.uid().unwrap_or_default()
    );
    let pods = pods.list(&ListParams::default().labels(&selector)).await?;
    let mut report = report::parse(outcome::last_words(&pods.items).as_deref());
    if !report.ok
        && report.error.is_none()
        && let Outcome::Failed { message, .. } = outcome::outcome(job, &pods.items)
    {
        report.error = Some(message);
    }
    Ok(report)
}

/// Writes the restore's end, announces it, and asks the tenant's reconciler to unlock it.
#[allow(clippy::too_many_arguments)]
async fn finish(
    restore: &TenantRestore,
    ctx: &Context,
    current: &TenantRestoreStatus,
    phase: JobPhase,
    reason: &str,
    message: &str,
    tenant: Option<&Tenant>,
) -> Result<Action> {
    write(restore, ctx, current, step(current, phase, reason, message)).await?;
    let type_ = if phase == JobPhase::Succeeded {
        EventType::Normal
    } else {
        EventType::Warning
    };
    info!(restore = %key(restore), result = %reason, "{message}");
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(outcome::head(message, 1000)),
        action: "Restore".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &restore.object_ref(&())).await {
        warn!(restore = %key(restore), error = %e, "publishing event failed");
    }
    if let Some(tenant) = tenant {
        let _ = ctx.tenant_changed.send(ObjectRef::from_obj(tenant));
    }
    Ok(Action::await_change())
}

async fn write(
    restore: &TenantRestore,
    ctx: &Context,
    current: &TenantRestoreStatus,
    next: TenantRestoreStatus,
) -> Result<()> {
    let api: Api<TenantRestore> =
        Api::namespaced(ctx.client.clone(), &restore.namespace().unwrap_or_default());
    crate::jobs::apply_status(&api, &restore.name_any(), current, &next).await?;
    Ok(())
}
