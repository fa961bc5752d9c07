//! Deletion policy `Snapshot`: the tenant is locked, a Job of the `silo` runner takes its final
//! backup, and a tombstone is written beside the database on its server; then the finalizer goes,
//! and the DatabaseServer reconciler purges the database when the grace period ends.
//!
//! The final backup is a TenantBackup in the controller's final-backup namespace, not in the
//! tenant's: a namespace being deleted accepts no new object, and its TenantBackups would go
//! with it. Its Job logs in as `<role>_final`, a temporary member of the locked tenant role with a
//! CONNECT of its own, from a Secret beside it. Every step is idempotent: a controller killed
//! anywhere picks up where the objects and the catalog say it was.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde_json::json;
use silo_crds::contract::{self, keys};
use silo_crds::{JobPhase, TenantBackup, TenantBackupSpec};
use tracing::info;

use super::Pass;
use crate::backup::{self, settings::parse_duration};
use crate::error::{Error, Result};
use crate::jobs::{fit_job_name, short_hash};
use crate::schema_rollout::outcome::{self, Outcome};
use crate::sql::identity::{Claimant, Conflict, Tombstone};
use crate::sql::pools::ServerHandle;
use crate::sql::{ddl, restore as logins, scram};

/// How often a running final backup is looked at.
pub const POLL: Duration = Duration::from_secs(2);
/// How soon a failed final backup is tried again.
pub const RETRY: Duration = Duration::from_secs(30);

pub(super) enum Snapshot {
    /// Locked, backed up and tombstoned: the finalizer may go.
    Done { backup: String },
    /// The role or database of the tenant's names is not the tenant's: nothing was touched.
    NotOurs(Conflict),
}

/// The final TenantBackup's name: one per deleted Tenant (its uid), cut to fit.
pub fn backup_name(namespace: &str, name: &str, uid: &str) -> String {
    fit_job_name(
        &format!("final-{namespace}-{name}"),
        &format!("-{}", short_hash(uid, 4)),
    )
}

/// One step of a Snapshot deletion; `Err(Error::FinalBackup…)` while the backup runs or after
/// it failed (the reconcile comes back and the finalizer stays).
pub(super) async fn snapshot(
    pass: &Pass<'_>,
    handle: &ServerHandle,
    server: &str,
) -> Result<Snapshot> {
    let Pass { tenant, facts, ctx } = pass;
    let names = &facts.names;
    let claimant = Claimant {
        key: &facts.key,
        uid: &facts.uid,
    };
    let login = logins::final_login_name(&names.role);
    let pool = &handle.pool;
    {
        let _permit = handle.ddl_permit().await;
        let claimed = ddl::claim(pool, &names.role, &names.database, &claimant)
            .await
            .map_err(|e| Error::sql("checking names", server, e))?;
        if let Err(conflict) = claimed {
            return Ok(Snapshot::NotOurs(conflict));
        }
        ddl::lock(pool, &names.database, &names.role, Some(&login))
            .await
            .map_err(|e| Error::sql("locking the deleted tenant", server, e))?;
    }

    // Nothing is dropped until a backup is kept somewhere: a dump no volume keeps is none.
    let destination = ctx.backup_settings.destination.clone();
    if let Err(error) = ctx.backup_settings.check_kept(&destination) {
        return Err(Error::FinalBackupFailed {
            message: format!("destination {error}"),
        });
    }
    let namespace = ctx.final_backup_namespace.as_str();
    let name = backup_name(&facts.namespace, &facts.name, &facts.uid);
    let backups: Api<TenantBackup> = Api::namespaced(ctx.client.clone(), namespace);
    let record = match backups.get_opt(&name).await? {
        Some(record) => record,
        None => create_record(pass, &backups, &name).await?,
    };
    let current = record.status.clone().unwrap_or_default();
    if current.phase == Some(JobPhase::Succeeded)
        && let Some(uri) = current.uri.clone()
    {
        tombstone(pass, handle, server, &login, &uri).await?;
        return Ok(Snapshot::Done { backup: uri });
    }

    let attempt = attempt_of(&record);
    let job_name = fit_job_name(&name, &format!("-{attempt}"));
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(job) = jobs.get_opt(&job_name).await? else {
        // A place under the server's cap, counted with the other backups; held until the Job
        // exists, so that two deletions never take the last place both.
        let _starting = ctx.backup_starts.lock().await;
        let cap = ctx.backup_settings.max_concurrent_per_server.max(1);
        let running =
            backup::running_on(ctx, server, false) + final_backups_on(&jobs, server).await?;
        if running >= cap {
            return Err(Error::FinalBackupWaiting {
                message: format!(
                    "{running} backups run on {server} (backups.maxConcurrentPerServer {cap}); the final backup waits for a place"
                ),
            });
        }
        // The login and its Secret: the password is in the Secret before the role has it.
        let secret = format!("{name}-login");
        let password = ensure_login_secret(pass, &record, &secret, &login, server).await?;
        {
            let _permit = handle.ddl_permit().await;
            logins::create_login(pool, &login, &names.role, &scram::verifier(&password))
                .await
                .map_err(|e| Error::sql("creating the final backup's login", server, e))?;
            logins::grant_connect(pool, &login, &names.database)
                .await
                .map_err(|e| Error::sql("granting the final backup's login CONNECT", server, e))?;
        }
        let source = backup::job::Source {
            namespace: &facts.namespace,
            tenant: &facts.name,
            secret: secret.clone(),
            server,
            schema_version: tenant
                .status
                .as_ref()
                .and_then(|s| s.schema_version.as_deref()),
            verify_into: None,
        };
        let mut job = backup::job::backup_job(
            &record,
            &destination,
            &source,
            &ctx.backup_settings,
            &ctx.job_settings,
        );
        job.metadata.name = Some(job_name.clone());
        job.metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(contract::FINAL_BACKUP_LABEL.into(), facts.uid.clone());
        match jobs.create(&PostParams::default(), &job).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        info!(tenant = %facts.key, job = %job_name, "final backup started");
        let running = backup::status::running(&current, server, now());
        crate::jobs::apply_status(&backups, &name, &current, &running).await?;
        return Err(Error::FinalBackupRunning);
    };
    match outcome::outcome(&job, &[]) {
        Outcome::Running => Err(Error::FinalBackupRunning),
        Outcome::Succeeded | Outcome::Failed { .. } => {
            let report = backup::read_report(ctx, namespace, &job).await?;
            let done = backup::status::finished(&current, &report, now());
            crate::jobs::apply_status(&backups, &name, &current, &done).await?;
            if done.phase == Some(JobPhase::Succeeded)
                && let Some(uri) = done.uri.clone()
            {
                tombstone(pass, handle, server, &login, &uri).await?;
                return Ok(Snapshot::Done { backup: uri });
            }
            // The next attempt is a new Job; the failed one goes once the record says why.
            let error = done.error.unwrap_or_else(|| "the backup Job failed".into());
            let patch = json!({ "metadata": { "annotations": {
                contract::ATTEMPT_ANNOTATION: (attempt + 1).to_string() } } });
            backups
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            crate::jobs::delete_job(&jobs, &job).await?;
            Err(Error::FinalBackupFailed { message: error })
        }
    }
}

/// Final backup Jobs running against `server`, asked of the API server (the final-backup
/// namespace may be outside the Job cache, and a Job created a moment ago must count).
async fn final_backups_on(jobs: &Api<Job>, server: &str) -> Result<usize> {
    let selector = format!(
        "{},{}={}",
        contract::FINAL_BACKUP_LABEL,
        contract::SERVER_LABEL,
        crate::jobs::label_value(server)
    );
    let listed = jobs
        .list(&kube::api::ListParams::default().labels(&selector))
        .await?;
    Ok(listed
        .items
        .iter()
        .filter(|job| outcome::outcome(job, &[]) == Outcome::Running)
        .count())
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

fn attempt_of(record: &TenantBackup) -> u32 {
    record
        .annotations()
        .get(contract::ATTEMPT_ANNOTATION)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1)
}

/// The final TenantBackup, labelled with the deleted Tenant and annotated with the end of its
/// retention. It carries the object finalizer only where this controller watches (elsewhere no
/// one would remove it).
async fn create_record(
    pass: &Pass<'_>,
    backups: &Api<TenantBackup>,
    name: &str,
) -> Result<TenantBackup> {
    let Pass { tenant, facts, ctx } = pass;
    let retention = parse_duration(&tenant.spec.deletion.final_backup_retention)
        .unwrap_or(Duration::from_secs(30 * 86400));
    let expires = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::try_from(retention).unwrap_or_default())
        .unwrap_or(jiff::Timestamp::MAX);
    let mut record = TenantBackup::new(
        name,
        TenantBackupSpec {
            tenant: facts.name.clone(),
            destination: Some(ctx.backup_settings.destination.clone()),
            verify: false,
        },
    );
    record.metadata.labels = Some(BTreeMap::from([
        (
            contract::MANAGED_BY_LABEL.into(),
            contract::MANAGED_BY.into(),
        ),
        (contract::FINAL_BACKUP_LABEL.into(), facts.uid.clone()),
        (contract::TENANT_LABEL.into(), facts.name.clone()),
        (
            contract::TENANT_NAMESPACE_LABEL.into(),
            facts.namespace.clone(),
        ),
    ]));
    record.metadata.annotations = Some(BTreeMap::from([(
        contract::EXPIRES_ANNOTATION.into(),
        expires.to_string(),
    )]));
    if ctx.watches(&ctx.final_backup_namespace) {
        record.metadata.finalizers = Some(vec![backup::FINALIZER.into()]);
    }
    match backups.create(&PostParams::default(), &record).await {
        Ok(created) => Ok(created),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(backups.get(name).await?),
        Err(e) => Err(e.into()),
    }
}

/// The final backup's login Secret, under the tenant Secret's keys and owned by the final
/// TenantBackup (the login is dropped once the backup is done, so the password is worth nothing
/// after); returns its password (the one already there, so that a restart does not race the Job
/// for it).
async fn ensure_login_secret(
    pass: &Pass<'_>,
    record: &TenantBackup,
    name: &str,
    login: &str,
    server: &str,
) -> Result<String> {
    let Pass { facts, ctx, .. } = pass;
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.final_backup_namespace);
    if let Some(existing) = api.get_opt(name).await?
        && let Some(password) = existing
            .data
            .as_ref()
            .and_then(|d| d.get(keys::PASSWORD))
            .and_then(|p| String::from_utf8(p.0.clone()).ok())
    {
        return Ok(password);
    }
    let dbs = ctx
        .servers
        .get(&kube::runtime::reflector::ObjectRef::new(server))
        .ok_or_else(|| Error::ServerGone {
            server: server.to_string(),
        })?;
    let password = scram::generate_password();
    let data = [
        (keys::HOST, dbs.spec.host.clone()),
        (keys::PORT, dbs.spec.port.to_string()),
        (keys::DBNAME, facts.names.database.clone()),
        (keys::USER, login.to_string()),
        (keys::PASSWORD, password.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
    .collect();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(BTreeMap::from([
                (
                    contract::MANAGED_BY_LABEL.into(),
                    contract::MANAGED_BY.into(),
                ),
                (contract::FINAL_BACKUP_LABEL.into(), facts.uid.clone()),
            ])),
            owner_references: record.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(password),
        // Created meanwhile by an earlier pass: its password stands.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            Box::pin(ensure_login_secret(pass, record, name, login, server)).await
        }
        Err(e) => Err(e.into()),
    }
}

/// The end of a Snapshot deletion on the server: the tombstone on the role and the database
/// (deleted at the Tenant's deletion time, purged a grace period later, with the final backup's
/// URI); the login and the Jobs go (the login's Secret goes with the final TenantBackup).
async fn tombstone(
    pass: &Pass<'_>,
    handle: &ServerHandle,
    server: &str,
    login: &str,
    uri: &str,
) -> Result<()> {
    let Pass { tenant, facts, ctx } = pass;
    let deleted = tenant
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| t.0)
        .unwrap_or_else(jiff::Timestamp::now);
    let grace = parse_duration(&tenant.spec.deletion.grace_period)
        .unwrap_or(Duration::from_secs(7 * 86400));
    let purge_after = deleted
        .checked_add(jiff::SignedDuration::try_from(grace).unwrap_or_default())
        .unwrap_or(jiff::Timestamp::MAX);
    let comment = Claimant {
        key: &facts.key,
        uid: &facts.uid,
    }
    .tombstone_comment(&Tombstone {
        deleted: deleted.to_string(),
        purge_after: purge_after.to_string(),
        backup: uri.to_string(),
    });
    {
        let _permit = handle.ddl_permit().await;
        ddl::mark(
            &handle.pool,
            &facts.names.database,
            &facts.names.role,
            &comment,
        )
        .await
        .map_err(|e| Error::sql("writing the tombstone", server, e))?;
        logins::revoke_connect(&handle.pool, login, &facts.names.database)
            .await
            .map_err(|e| Error::sql("revoking the final backup's login", server, e))?;
        logins::drop_login(&handle.pool, login)
            .await
            .map_err(|e| Error::sql("dropping the final backup's login", server, e))?;
    }
    let selector = format!("{}={}", contract::FINAL_BACKUP_LABEL, facts.uid);
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ctx.final_backup_namespace);
    for job in jobs
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
    {
        crate::jobs::delete_job(&jobs, &job).await?;
    }
    let _ = ctx.server_changed.send(server.to_string());
    Ok(())
}
