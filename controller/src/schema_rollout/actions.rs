//! What a rollout pass does to the world: reads pods for a failure's last words, creates and
//! deletes Jobs, writes Tenant and rollout status, publishes Events.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use silo_crds::conditions::{self, SCHEMA_READY};
use silo_crds::contract::ATTEMPT_ANNOTATION;
use silo_crds::{FailedTenant, SchemaRollout, Tenant};
use tracing::{info, warn};

use super::onboarding::{self, SchemaFacts};
use super::outcome::{self, Outcome};
use super::plan::Plan;
use super::{FIELD_MANAGER, Pass, Selected, job, key_of, status};
use crate::error::Result;

/// The most an Event's note may hold (the API server refuses more than 1024 bytes).
const MAX_NOTE: usize = 1000;

/// How long a pass waits for the Job cache to show what it just created or deleted.
const CACHE_WAIT: Duration = Duration::from_secs(10);

impl Pass<'_> {
    /// How the Job ended. A failure's last words come from its pods, read once per Job.
    pub(super) async fn outcome(&self, job: &Job) -> Outcome {
        let ended = outcome::outcome(job, &[]);
        if !matches!(ended, Outcome::Failed { .. }) {
            return ended;
        }
        let uid = job.uid().unwrap_or_default();
        if let Some(known) = self.ctx.lock_failures().get(&uid) {
            return known.clone();
        }
        let pods: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let selector = format!("batch.kubernetes.io/controller-uid={uid}");
        let ended = match pods.list(&ListParams::default().labels(&selector)).await {
            Ok(pods) => outcome::outcome(job, &pods.items),
            Err(e) => {
                warn!(rollout = %self.key(), job = %job.name_any(), error = %e, "reading a failed migration's pods failed; its message is the Job's");
                return ended;
            }
        };
        self.ctx.lock_failures().insert(uid, ended.clone());
        ended
    }

    /// Deletes the failed Jobs of an earlier attempt (another template, a lower `retry`): their
    /// tenants wait for their turn again.
    pub(super) async fn retry_earlier_attempts(&self, selected: &mut [Selected]) -> Result<()> {
        let jobs: Api<Job> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let mut deleted = Vec::new();
        for s in selected.iter_mut() {
            let (Some(job), Some(Outcome::Failed { .. })) = (&s.job, &s.outcome) else {
                continue;
            };
            if job.annotations().get(ATTEMPT_ANNOTATION) == Some(&self.attempt) {
                continue;
            }
            let uid = job.uid().unwrap_or_default();
            crate::jobs::delete_job(&jobs, job).await?;
            info!(rollout = %self.key(), tenant = %key_of(s), "failed migration retried with a changed spec");
            self.ctx.lock_failures().remove(&uid);
            deleted.push(uid);
            s.job = None;
            s.outcome = None;
        }
        if !deleted.is_empty() {
            let gone = || {
                !self
                    .ctx
                    .jobs
                    .state()
                    .iter()
                    .any(|j| j.uid().is_some_and(|u| deleted.contains(&u)))
            };
            wait_for_cache(gone).await;
        }
        Ok(())
    }

    /// Creates the Jobs of `start` (one that exists already is taken as it is), then waits until
    /// the cache shows them, so that the next plan, this rollout's or another's, counts them.
    pub(super) async fn start(&self, start: &[String], selected: &[Selected]) -> Result<()> {
        if start.is_empty() {
            return Ok(());
        }
        let jobs: Api<Job> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let mut created = Vec::new();
        for tenant in start {
            let job = job::migration_job(self.rollout, tenant, &self.ctx.job_settings);
            match jobs.create(&PostParams::default(), &job).await {
                Ok(job) => created.push(job.uid().unwrap_or_default()),
                Err(kube::Error::Api(e)) if e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        let servers: Vec<String> = selected
            .iter()
            .filter(|s| start.contains(&s.tenant.name_any()))
            .map(|s| {
                format!(
                    "{} on {}",
                    s.tenant.name_any(),
                    s.server().unwrap_or_default()
                )
            })
            .collect();
        info!(rollout = %self.key(), version = %self.version, started = %servers.join(", "), "migrations started");
        let cached = || {
            let uids: Vec<String> = self
                .ctx
                .jobs
                .state()
                .iter()
                .filter_map(|j| j.uid())
                .collect();
            created.iter().all(|uid| uids.contains(uid))
        };
        wait_for_cache(cached).await;
        Ok(())
    }

    /// Each selected tenant's `schemaVersion` (moved only by a succeeded Job) and `SchemaReady`
    /// condition, written where they changed; then the Jobs whose success the cache shows on
    /// their Tenant are deleted: a Job goes only once its outcome is recorded.
    pub(super) async fn record(&self, selected: &[Selected]) -> Result<()> {
        let jobs: Api<Job> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        for s in selected {
            let succeeded = s.outcome == Some(Outcome::Succeeded);
            let at = if succeeded {
                Some(self.version)
            } else {
                s.at()
            };
            let facts = SchemaFacts {
                target: Some(self.version),
                at,
                job: s.outcome.as_ref(),
                suspended: s.tenant.spec.suspended,
            };
            let Some(desired) = onboarding::schema_ready(&facts) else {
                continue;
            };
            let current = s.tenant.status.clone().unwrap_or_default();
            let unchanged = current.conditions.iter().any(|c| {
                c.type_ == SCHEMA_READY
                    && (c.status == "True") == desired.status
                    && c.reason == desired.reason
                    && c.message == desired.message
            });
            if s.at() != at || !unchanged {
                let now = Time(jiff::Timestamp::now());
                let merged = conditions::merge(
                    &current.conditions,
                    std::slice::from_ref(&desired),
                    s.tenant.metadata.generation,
                    now,
                );
                let condition = merged.into_iter().find(|c| c.type_ == SCHEMA_READY);
                self.write_tenant(&s.tenant, at, condition).await?;
                if let Some(Outcome::Failed { reason, message }) = &s.outcome {
                    self.failed(s, reason, message).await;
                }
                if succeeded {
                    info!(rollout = %self.key(), tenant = %key_of(s), version = %self.version, "tenant migrated");
                    // A new tenant waiting in Migrating turns Ready now.
                    let _ = self
                        .ctx
                        .tenant_changed
                        .send(ObjectRef::from_obj(s.tenant.as_ref()));
                }
            }
            if s.at() == Some(self.version)
                && let Some(job) = &s.job
            {
                crate::jobs::delete_job(&jobs, job).await?;
            }
        }
        Ok(())
    }

    /// Applies the tenant's `schemaVersion` and `SchemaReady` under this reconciler's field
    /// manager, only if the Tenant is still as read: a stale read never sets the version back.
    async fn write_tenant(
        &self,
        tenant: &Tenant,
        version: Option<&str>,
        condition: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    ) -> Result<()> {
        let mut status = json!({ "conditions": condition.into_iter().collect::<Vec<_>>() });
        if let Some(version) = version {
            status["schemaVersion"] = json!(version);
        }
        let patch = json!({
            "apiVersion": "silo.dev/v1alpha1",
            "kind": "Tenant",
            "metadata": { "resourceVersion": tenant.resource_version() },
            "status": status,
        });
        let api: Api<Tenant> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        api.patch_status(
            &tenant.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        Ok(())
    }

    /// A failure, first recorded: Warning Events on the Tenant and on the rollout.
    async fn failed(&self, s: &Selected, reason: &str, message: &str) {
        warn!(rollout = %self.key(), tenant = %key_of(s), reason = %reason, "migration failed");
        let tenant = s.tenant.name_any();
        // An Event's note holds 1 KiB: the last line says what went wrong; status has the rest.
        let message = message
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default()
            .trim();
        let note = format!("the migration to {} failed: {message}", self.version);
        self.publish(s.tenant.object_ref(&()), EventType::Warning, reason, note)
            .await;
        let note = format!("{tenant}: {message}");
        self.publish(
            self.rollout.object_ref(&()),
            EventType::Warning,
            reason,
            note,
        )
        .await;
    }

    /// Writes the rollout's status if it changed, announcing a phase change.
    pub(super) async fn write_status(&self, plan: &Plan, failed: &[FailedTenant]) -> Result<()> {
        let current = self.rollout.status.clone().unwrap_or_default();
        let now = Time(jiff::Timestamp::now());
        let next = status::status(
            &current,
            plan,
            failed,
            self.version,
            self.rollout.metadata.generation,
            now,
        );
        if next == current {
            return Ok(());
        }
        let api: Api<SchemaRollout> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let patch = json!({
            "apiVersion": "silo.dev/v1alpha1",
            "kind": "SchemaRollout",
            "status": next,
        });
        api.patch_status(
            &self.name,
            &PatchParams::apply(crate::tenant::FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        if let Some((type_, reason, note)) = status::phase_event(current.phase, &next) {
            info!(rollout = %self.key(), phase = %reason, "{note}");
            self.publish(self.rollout.object_ref(&()), type_, reason, note)
                .await;
        }
        Ok(())
    }

    /// Publishes an Event; a failure to publish is logged, never fatal.
    async fn publish(
        &self,
        reference: k8s_openapi::api::core::v1::ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(outcome::head(&note, MAX_NOTE)),
            action: "Migrate".into(),
            secondary: None,
        };
        if let Err(e) = self.ctx.recorder.publish(&event, &reference).await {
            warn!(rollout = %self.key(), error = %e, "publishing event failed");
        }
    }
}

/// Polls until `done` or [`CACHE_WAIT`] passed (the next pass then sees what the cache shows).
async fn wait_for_cache(done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + CACHE_WAIT;
    while !done() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
