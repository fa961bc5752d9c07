//! Scheduled backups: every few seconds, each Ready tenant whose slot has come gets its
//! TenantBackup (one name per slot: a restarted controller finds it rather than taking another),
//! retention deletes the expired ones (their objects go with them), and `BackedUp` goes False on
//! a tenant whose last success is too old. The rules are in [`super::schedule`] (pure).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use silo_crds::conditions::{self, BACKED_UP, Desired};
use silo_crds::contract::{EXPIRES_ANNOTATION, FINAL_BACKUP_LABEL, SCHEDULED_LABEL, TENANT_LABEL};
use silo_crds::{JobPhase, Tenant, TenantBackup, TenantBackupSpec, TenantPhase};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::schedule::{self, Finished, Schedule};
use super::settings::parse_duration;
use crate::context::Context;

const TICK: Duration = Duration::from_secs(5);
/// Every this many ticks (a minute), the final backups in a namespace outside the caches are
/// listed for expiry.
const UNWATCHED_EVERY: u64 = 12;

/// Runs until shutdown; does nothing without a fleet schedule and without tenant schedules.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    if !ctx.caches_filled().await {
        return;
    }
    let mut ticks: u64 = 0;
    loop {
        tick(&ctx).await;
        if ticks.is_multiple_of(UNWATCHED_EVERY) {
            expire_unwatched_final_backups(&ctx).await;
        }
        ticks += 1;
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

fn to_chrono(time: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> DateTime<Utc> {
    DateTime::from_timestamp(time.0.as_second(), 0).unwrap_or_default()
}

/// A tenant's schedule and how many backups it keeps, or none (no scheduled backups).
fn policy(tenant: &Tenant, ctx: &Context) -> Option<(Schedule, usize)> {
    let settings = &ctx.backup_settings;
    let own = tenant.spec.backup.clone().unwrap_or_default();
    if own.enabled == Some(false) {
        return None;
    }
    let pattern = own.schedule.unwrap_or_else(|| settings.schedule.clone());
    if pattern.is_empty() {
        return None;
    }
    let window = parse_duration(&settings.window).unwrap_or(Duration::from_secs(3600));
    let keep_last = own
        .keep_last
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(settings.retention.keep_last)
        .max(1);
    match Schedule::parse(&pattern, window) {
        Ok(schedule) => Some((schedule, keep_last)),
        Err(e) => {
            warn!(tenant = %tenant.name_any(), error = %e, "the tenant's backup schedule is not valid");
            None
        }
    }
}

async fn tick(ctx: &Context) {
    let now = Utc::now();
    let backups = ctx.backups.state();
    // The scheduled backups of each tenant, by `namespace/tenant`.
    let mut scheduled: HashMap<String, Vec<Arc<TenantBackup>>> = HashMap::new();
    for backup in &backups {
        if final_backup_expired(backup, now) {
            expire_final_backup(ctx, backup).await;
        }
        if backup.labels().contains_key(SCHEDULED_LABEL) {
            let key = format!(
                "{}/{}",
                backup.namespace().unwrap_or_default(),
                backup.spec.tenant
            );
            scheduled.entry(key).or_default().push(backup.clone());
        }
    }
    for tenant in ctx.tenants.state() {
        let Some((schedule, keep_last)) = policy(&tenant, ctx) else {
            continue;
        };
        let key = crate::context::tenant_key(&tenant);
        let mine = scheduled.remove(&key).unwrap_or_default();
        let ready = tenant.metadata.deletion_timestamp.is_none()
            && tenant.status.as_ref().and_then(|s| s.phase) == Some(TenantPhase::Ready);
        if ready && let Err(e) = take_due(ctx, &tenant, &schedule, now).await {
            warn!(tenant = %key, error = %e, "creating a scheduled backup failed");
        }
        if let Err(e) = retain(ctx, &tenant, &mine, keep_last, now).await {
            warn!(tenant = %key, error = %e, "retention failed");
        }
        if let Err(e) = freshness(ctx, &tenant, &mine, &schedule, now).await {
            warn!(tenant = %key, error = %e, "writing BackedUp failed");
        }
    }
}

/// Whether `backup` is the final backup of a deleted tenant whose retention has ended (an
/// unreadable time never ends: a backup is never deleted on a guess).
fn final_backup_expired(backup: &TenantBackup, now: DateTime<Utc>) -> bool {
    backup.labels().contains_key(FINAL_BACKUP_LABEL)
        && backup.metadata.deletion_timestamp.is_none()
        && backup
            .annotations()
            .get(EXPIRES_ANNOTATION)
            .and_then(|t| t.parse::<DateTime<Utc>>().ok())
            .is_some_and(|expires| expires <= now)
}

/// Final backups kept in a namespace this controller does not watch (the release namespace,
/// with `controller.watchNamespace` elsewhere): listed now and then, and the expired ones deleted,
/// object first (they carry no object finalizer there).
async fn expire_unwatched_final_backups(ctx: &Context) {
    let namespace = &ctx.final_backup_namespace;
    if ctx.watches(namespace) {
        return;
    }
    let api: Api<TenantBackup> = Api::namespaced(ctx.client.clone(), namespace);
    let listed = match api
        .list(&kube::api::ListParams::default().labels(FINAL_BACKUP_LABEL))
        .await
    {
        Ok(listed) => listed,
        Err(e) => {
            warn!(namespace = %namespace, error = %e, "listing final backups for expiry failed");
            return;
        }
    };
    let now = Utc::now();
    for backup in listed.items.iter().filter(|b| final_backup_expired(b, now)) {
        match super::delete_object(backup).await {
            Ok(()) => expire_final_backup(ctx, backup).await,
            Err(e) => {
                warn!(backup = %backup.name_any(), error = %e, "deleting an expired final backup's object failed")
            }
        }
    }
}

/// Deletes an expired final backup (its finalizer deletes the object).
async fn expire_final_backup(ctx: &Context, backup: &TenantBackup) {
    let api: Api<TenantBackup> =
        Api::namespaced(ctx.client.clone(), &backup.namespace().unwrap_or_default());
    info!(backup = %backup.name_any(), "a deleted tenant's final backup reached the end of its retention");
    match api
        .delete(&backup.name_any(), &DeleteParams::default())
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => {
            warn!(backup = %backup.name_any(), error = %e, "deleting an expired final backup failed")
        }
    }
}

/// Creates the TenantBackup of the tenant's due slot, unless it exists.
async fn take_due(
    ctx: &Context,
    tenant: &Tenant,
    schedule: &Schedule,
    now: DateTime<Utc>,
) -> Result<(), kube::Error> {
    let uid = tenant.uid().unwrap_or_default();
    let Some(slot) = schedule.due(&uid, now) else {
        return Ok(());
    };
    let created = tenant
        .metadata
        .creation_timestamp
        .as_ref()
        .map(to_chrono)
        .unwrap_or(now);
    if slot < created {
        return Ok(()); // its first slot is still to come
    }
    let namespace = tenant.namespace().unwrap_or_default();
    let name = schedule::backup_name(&tenant.name_any(), slot);
    if ctx
        .backups
        .get(&ObjectRef::new(&name).within(&namespace))
        .is_some()
    {
        return Ok(());
    }
    let every = ctx.backup_settings.verify_every;
    let verify = every > 0 && (slot.timestamp() / 60) % i64::from(every) == 0;
    let backup = TenantBackup {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.clone()),
            labels: Some(
                [
                    (TENANT_LABEL.to_string(), tenant.name_any()),
                    (SCHEDULED_LABEL.to_string(), "true".to_string()),
                ]
                .into(),
            ),
            ..Default::default()
        },
        spec: TenantBackupSpec {
            tenant: tenant.name_any(),
            destination: None,
            verify,
        },
        status: None,
    };
    let api: Api<TenantBackup> = Api::namespaced(ctx.client.clone(), &namespace);
    match api.create(&PostParams::default(), &backup).await {
        Ok(_) => {
            info!(tenant = %crate::context::tenant_key(tenant), backup = %name, slot = %slot, "scheduled backup created");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletes the tenant's expired scheduled backups (their objects go with them).
async fn retain(
    ctx: &Context,
    tenant: &Tenant,
    mine: &[Arc<TenantBackup>],
    keep_last: usize,
    now: DateTime<Utc>,
) -> Result<(), kube::Error> {
    let finished: Vec<Finished> = mine
        .iter()
        .filter(|b| b.metadata.deletion_timestamp.is_none())
        .filter_map(|b| {
            let phase = b.status.as_ref()?.phase?;
            matches!(phase, JobPhase::Succeeded | JobPhase::Failed).then(|| Finished {
                name: b.name_any(),
                created: b
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(to_chrono)
                    .unwrap_or(now),
                succeeded: phase == JobPhase::Succeeded,
            })
        })
        .collect();
    let max_age = parse_duration(&ctx.backup_settings.retention.max_age).ok();
    let api: Api<TenantBackup> =
        Api::namespaced(ctx.client.clone(), &tenant.namespace().unwrap_or_default());
    for name in schedule::expired(&finished, keep_last, max_age, now) {
        info!(tenant = %crate::context::tenant_key(tenant), backup = %name, "retention deletes a backup");
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `BackedUp` from the tenant's scheduled backups: False when its last success is older than
/// twice the schedule's interval, or its last attempt failed.
async fn freshness(
    ctx: &Context,
    tenant: &Tenant,
    mine: &[Arc<TenantBackup>],
    schedule: &Schedule,
    now: DateTime<Utc>,
) -> Result<(), kube::Error> {
    let Some(interval) = schedule.interval(now) else {
        return Ok(());
    };
    let status = tenant.status.clone().unwrap_or_default();
    let last_success = status.last_backup.as_ref().map(|l| to_chrono(&l.time));
    let last_failure = mine
        .iter()
        .filter_map(|b| {
            let s = b.status.as_ref()?;
            (s.phase? == JobPhase::Failed).then(|| {
                (
                    s.completion_time.as_ref().map(to_chrono).unwrap_or(now),
                    s.error.clone().unwrap_or_default(),
                )
            })
        })
        .max_by_key(|(time, _)| *time);
    let created = tenant
        .metadata
        .creation_timestamp
        .as_ref()
        .map(to_chrono)
        .unwrap_or(now);
    let Some((ok, reason, message)) =
        schedule::backed_up(last_success, last_failure, interval, created, now)
    else {
        return Ok(());
    };
    let current = status.conditions.iter().find(|c| c.type_ == BACKED_UP);
    if current.is_some_and(|c| (c.status == "True") == ok && c.reason == reason) {
        return Ok(());
    }
    let merged = conditions::merge(
        &status.conditions,
        &[Desired::new(BACKED_UP, ok, reason, message)],
        tenant.metadata.generation,
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
    );
    let condition = merged.into_iter().find(|c| c.type_ == BACKED_UP);
    let mut body = json!({ "conditions": condition.into_iter().collect::<Vec<_>>() });
    if let Some(last) = &status.last_backup {
        body["lastBackup"] = json!(last);
    }
    let patch = json!({
        "apiVersion": "silo.dev/v1alpha1",
        "kind": "Tenant",
        "metadata": { "resourceVersion": tenant.resource_version() },
        "status": body,
    });
    let api: Api<Tenant> =
        Api::namespaced(ctx.client.clone(), &tenant.namespace().unwrap_or_default());
    match api
        .patch_status(
            &tenant.name_any(),
            &PatchParams::apply(super::FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        // Changed meanwhile: the next tick looks again.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}
