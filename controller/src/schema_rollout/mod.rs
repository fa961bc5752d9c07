//! The SchemaRollout reconciler: one migration Job per selected tenant, canary first, then waves
//! under the caps, halting on failures.
//!
//! One pass per reconcile: gather what the caches say (the selected tenants, their Jobs and how
//! each ended), decide ([`plan`], pure), start Jobs, record outcomes on the Tenants (and only
//! then delete those Jobs), report ([`status`], pure). The Job is [`job`], its outcome
//! [`outcome`], the Tenant's side [`onboarding`].

mod actions;
pub mod job;
pub mod onboarding;
pub mod outcome;
pub mod plan;
pub mod status;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use silo_crds::{FailedTenant, SchemaRollout, Tenant, TenantPhase};
use tracing::warn;

use crate::context::{Context, tenant_key};
use crate::error::{Error, Result};
use outcome::Outcome;
use plan::{Limits, Progress, TenantFacts};

pub const KIND: &str = "schemarollout";
/// Tenant status fields this reconciler owns: `schemaVersion` and the `SchemaReady` condition.
const FIELD_MANAGER: &str = "silo-rollouts";

pub fn reconcile(
    rollout: Arc<SchemaRollout>,
    ctx: Arc<Context>,
) -> BoxFuture<'static, Result<Action>> {
    reconcile_rollout(rollout, ctx).boxed()
}

pub fn error_policy(rollout: Arc<SchemaRollout>, error: &Error, _ctx: Arc<Context>) -> Action {
    let key = format!(
        "{}/{}",
        rollout.namespace().unwrap_or_default(),
        rollout.name_any()
    );
    if error.reason() == "Conflict" {
        tracing::debug!(rollout = %key, error = %error, "stale object; retrying");
        return Action::requeue(Duration::from_millis(200));
    }
    warn!(rollout = %key, reason = error.reason(), error = %error, "rollout reconcile failed");
    Action::requeue(Duration::from_secs(10))
}

/// The target rollout of `tenant`: its namespace's newest, if it selects the tenant.
pub fn target_of(tenant: &Tenant, ctx: &Context) -> Option<Arc<SchemaRollout>> {
    let namespace = tenant.namespace();
    let rollouts = ctx.rollouts.state();
    let target = plan::target(
        rollouts
            .iter()
            .map(Arc::as_ref)
            .filter(|r| r.namespace() == namespace),
    )?;
    selects(target, tenant)
        .then(|| rollouts.iter().find(|r| r.uid() == target.uid()).cloned())
        .flatten()
}

/// Whether `rollout`'s selector picks `tenant` (an empty selector picks every tenant; one that
/// does not parse picks none).
fn selects(rollout: &SchemaRollout, tenant: &Tenant) -> bool {
    match &rollout.spec.selector {
        None => true,
        Some(selector) => Selector::try_from(selector.clone()).is_ok_and(|s| {
            s.matches(
                tenant
                    .metadata
                    .labels
                    .as_ref()
                    .unwrap_or(&Default::default()),
            )
        }),
    }
}

/// One selected tenant, its migration Job to this version and how it stands.
struct Selected {
    tenant: Arc<Tenant>,
    job: Option<Arc<Job>>,
    outcome: Option<Outcome>,
}

impl Selected {
    fn at(&self) -> Option<&str> {
        self.tenant.status.as_ref()?.schema_version.as_deref()
    }

    fn server(&self) -> Option<String> {
        self.tenant.status.as_ref()?.server.clone()
    }

    fn progress(&self, version: &str) -> Progress {
        if self.at() == Some(version) {
            return Progress::AtVersion;
        }
        match &self.outcome {
            // Recorded in this pass (its Job goes once the cache shows it).
            Some(Outcome::Succeeded) => Progress::AtVersion,
            Some(Outcome::Running) => Progress::Running,
            Some(Outcome::Failed { reason, message }) => Progress::Failed {
                reason: reason.clone(),
                message: message.clone(),
            },
            None => {
                let phase = self.tenant.status.as_ref().and_then(|s| s.phase);
                // Ready tenants, and new ones waiting to be migrated before they turn Ready.
                let ready = matches!(phase, Some(TenantPhase::Ready | TenantPhase::Migrating));
                if ready && !self.tenant.spec.suspended {
                    Progress::Waiting
                } else {
                    Progress::Skipped
                }
            }
        }
    }
}

/// One reconcile of one rollout.
struct Pass<'a> {
    rollout: &'a SchemaRollout,
    ctx: &'a Context,
    namespace: String,
    name: String,
    version: &'a str,
    /// The template and `retry` this pass starts Jobs with (`job::attempt`): a failed Job of
    /// another attempt is retried.
    attempt: String,
}

async fn reconcile_rollout(rollout: Arc<SchemaRollout>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    if !ctx.caches_filled().await {
        return Ok(Action::await_change()); // shutting down
    }
    let result = run(&rollout, &ctx).await;
    match &result {
        Ok(_) => ctx.metrics.reconcile_succeeded(KIND),
        Err(e) => ctx.metrics.reconcile_failed(KIND, e.reason()),
    }
    result
}

async fn run(rollout: &SchemaRollout, ctx: &Context) -> Result<Action> {
    let pass = Pass {
        rollout,
        ctx,
        namespace: rollout.namespace().unwrap_or_default(),
        name: rollout.name_any(),
        version: &rollout.spec.version,
        attempt: job::attempt(rollout),
    };
    let superseded = {
        let rollouts = ctx.rollouts.state();
        let target = plan::target(
            rollouts
                .iter()
                .map(Arc::as_ref)
                .filter(|r| r.namespace() == rollout.namespace()),
        );
        target.is_some_and(|t| t.uid() != rollout.uid())
    };

    // 1. The selected tenants (not those being deleted), their Jobs, and how each ended.
    let mut selected = pass.selected();
    for s in &mut selected {
        if let Some(job) = &s.job {
            s.outcome = Some(pass.outcome(job).await);
        }
    }

    // 2. A failed Job of an earlier attempt (another template, a lower `retry`) goes, and its
    //    tenant waits for its turn again.
    if !superseded {
        pass.retry_earlier_attempts(&mut selected).await?;
    }

    // 3. Decide and start, one rollout at a time: the per-server cap counts every rollout's Jobs.
    let plan = {
        let _starting = ctx.rollout_starts.lock().await;
        let facts: Vec<TenantFacts> = selected
            .iter()
            .map(|s| TenantFacts {
                name: s.tenant.name_any(),
                server: s.server(),
                progress: s.progress(pass.version),
            })
            .collect();
        let plan = plan::plan(&facts, &pass.limits(superseded), &pass.busy(&selected));
        pass.start(&plan.start, &selected).await?;
        plan
    };

    // 4. Record on the Tenants (versions, SchemaReady); delete the Jobs whose success they show.
    if !superseded {
        for s in &mut selected {
            if plan.start.contains(&s.tenant.name_any()) {
                s.outcome = Some(Outcome::Running);
            }
        }
        pass.record(&selected).await?;
    }

    // 5. The rollout's status, and an Event when its phase changes.
    let failed: Vec<FailedTenant> = selected
        .iter()
        .filter_map(|s| match s.progress(pass.version) {
            Progress::Failed { reason, message } => Some(FailedTenant {
                tenant: s.tenant.name_any(),
                reason,
                message,
            }),
            _ => None,
        })
        .collect();
    pass.write_status(&plan, &failed).await?;
    Ok(match plan.phase {
        // Job changes wake it; the timer is a safety net.
        silo_crds::RolloutPhase::Progressing => Action::requeue(Duration::from_secs(60)),
        _ => Action::requeue(ctx.resync),
    })
}

impl Pass<'_> {
    fn limits(&self, superseded: bool) -> Limits {
        let strategy = &self.rollout.spec.strategy;
        let count = |n: i32| usize::try_from(n).unwrap_or(0);
        Limits {
            canary: count(strategy.canary),
            max_concurrent: count(strategy.max_concurrent).max(1),
            max_concurrent_per_server: count(strategy.max_concurrent_per_server).max(1),
            max_failures: count(strategy.max_failures).max(1),
            paused: self.rollout.spec.paused,
            superseded,
        }
    }

    /// The tenants of the namespace the selector picks, by name, and their Jobs to this version.
    fn selected(&self) -> Vec<Selected> {
        let mut selected: Vec<Selected> = self
            .ctx
            .tenants
            .state()
            .into_iter()
            .filter(|t| t.namespace().as_deref() == Some(self.namespace.as_str()))
            .filter(|t| t.metadata.deletion_timestamp.is_none())
            .filter(|t| selects(self.rollout, t))
            .map(|tenant| {
                let job_ref = ObjectRef::new(&job::job_name(&tenant.name_any(), self.version))
                    .within(&self.namespace);
                Selected {
                    job: self.ctx.jobs.get(&job_ref),
                    tenant,
                    outcome: None,
                }
            })
            .collect();
        selected.sort_by_key(|s| s.tenant.name_any());
        selected
    }

    /// Migration Jobs running on each server for anything but this rollout's selected tenants
    /// (other namespaces' rollouts, other versions): they count against the per-server cap.
    fn busy(&self, selected: &[Selected]) -> HashMap<String, usize> {
        let mine: Vec<String> = selected
            .iter()
            .filter_map(|s| s.job.as_ref().and_then(|j| j.uid()))
            .collect();
        let mut busy = HashMap::new();
        for job in self.ctx.jobs.state() {
            if !job
                .labels()
                .contains_key(silo_crds::contract::ROLLOUT_LABEL)
                || job.uid().is_some_and(|uid| mine.contains(&uid))
                || outcome::outcome(&job, &[]) != Outcome::Running
            {
                continue;
            }
            let Some(tenant) = job.labels().get(silo_crds::contract::TENANT_LABEL) else {
                continue;
            };
            let tenant_ref = ObjectRef::new(tenant).within(&job.namespace().unwrap_or_default());
            let server = self
                .ctx
                .tenants
                .get(&tenant_ref)
                .and_then(|t| t.status.as_ref()?.server.clone());
            if let Some(server) = server {
                *busy.entry(server).or_default() += 1;
            }
        }
        busy
    }

    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// `namespace/name` of the tenant, for logs.
fn key_of(s: &Selected) -> String {
    tenant_key(&s.tenant)
}
