//! The Tenant reconciler: placement, credentials, role and database, suspension and deletion,
//! in the order of DESIGN.md's provisioning steps.
//!
//! One pass per reconcile, top to bottom: derive the tenant's [`Facts`] once, decide (placement.rs,
//! status.rs: pure), act (actions.rs: the API server and the database server), report.

mod actions;
pub mod placement;
pub mod rotation;
pub mod secret;
pub mod snapshot;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use silo_crds::{DeletionPolicy, FINALIZER, Tenant, TenantPhase};
use tracing::{info, warn};

use crate::context::{Context, lock_placements, tenant_key};
use crate::error::{Error, Result};
use crate::schema_rollout::{
    self,
    onboarding::{SchemaFacts, waits_in_migrating},
};
use crate::sql::TenantNames;
use crate::sql::ddl::{self, Change};
use placement::Unplaceable;
use secret::Endpoint;
use status::Report;

pub const KIND: &str = "tenant";
pub(crate) const FIELD_MANAGER: &str = "silo-controller";
/// How soon a tenant waiting for a server looks again (server changes also wake it at once).
const PENDING_RETRY: Duration = Duration::from_secs(30);

pub fn reconcile(tenant: Arc<Tenant>, ctx: Arc<Context>) -> BoxFuture<'static, Result<Action>> {
    // Boxed so that the future's Send-ness is checked here, with concrete lifetimes, rather than
    // inside the controller's higher-ranked bounds.
    reconcile_tenant(tenant, ctx).boxed()
}

/// What a tenant reconcile reacts to: a new generation (spec or deletion), changed finalizers,
/// or a rotation asked for.
pub fn spec_changed(tenant: &Tenant) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    tenant.metadata.generation.hash(&mut hasher);
    tenant.metadata.finalizers.hash(&mut hasher);
    // A new value asks for a password rotation now.
    tenant
        .annotations()
        .get(silo_crds::contract::ROTATE_ANNOTATION)
        .hash(&mut hasher);
    tenant
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .hash(&mut hasher);
    Some(hasher.finish())
}

pub fn error_policy(tenant: Arc<Tenant>, error: &Error, _ctx: Arc<Context>) -> Action {
    if error.reason() == "Conflict" {
        tracing::debug!(tenant = %tenant_key(&tenant), error = %error, "stale object; retrying");
        return Action::requeue(Duration::from_millis(200));
    }
    match error.reason() {
        "FinalBackupRunning" => return Action::requeue(snapshot::POLL),
        "FinalBackupFailed" => return Action::requeue(snapshot::RETRY),
        "FinalBackupWaiting" => return Action::requeue(snapshot::POLL),
        _ => {}
    }
    warn!(tenant = %tenant_key(&tenant), reason = error.reason(), error = %error, "tenant reconcile failed");
    Action::requeue(match error.reason() {
        "ServerNotConnected" => Duration::from_secs(3),
        "ServerGone" => PENDING_RETRY,
        _ => Duration::from_secs(10),
    })
}

/// What one reconcile knows about its tenant, derived once when it starts.
struct Facts {
    /// `namespace/name`.
    key: String,
    namespace: String,
    name: String,
    /// The database and role names (as recorded in status, else derived).
    names: TenantNames,
    uid: String,
    /// The server it is placed on, from its status or from a placement this process made whose
    /// status write the cache has not shown yet.
    server: Option<String>,
    policy: DeletionPolicy,
    /// The phase last reported.
    phase: Option<TenantPhase>,
    /// A TenantRestore restoring into its database, not finished: the tenant stays locked.
    restoring: Option<String>,
}

impl Facts {
    fn derive(tenant: &Tenant, ctx: &Context) -> Self {
        let key = tenant_key(tenant);
        let status = tenant.status.as_ref();
        let server = match status.and_then(|s| s.server.clone()) {
            // The cache shows where the tenant is: this process's own record of it has done its
            // work (and each placement counts the records left, so they stay few).
            Some(server) => {
                lock_placements(&ctx.placements).remove(&key);
                Some(server)
            }
            None => lock_placements(&ctx.placements).get(&key).cloned(),
        };
        Facts {
            namespace: tenant.namespace().unwrap_or_default(),
            name: tenant.name_any(),
            names: TenantNames::of(tenant),
            uid: tenant.uid().unwrap_or_default(),
            server,
            policy: tenant.spec.deletion.policy,
            phase: status.and_then(|s| s.phase),
            restoring: crate::restore::active_for(tenant, ctx),
            key,
        }
    }
}

/// One reconcile of one tenant: the object as read, its facts, and the shared state.
struct Pass<'a> {
    tenant: &'a Tenant,
    facts: Facts,
    ctx: &'a Context,
}

async fn reconcile_tenant(tenant: Arc<Tenant>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    if !ctx.caches_filled().await {
        return Ok(Action::await_change()); // shutting down
    }
    let facts = Facts::derive(&tenant, &ctx);
    // Another install's tenant is not touched at all: no status, no finalizer, no policy.
    if let Some(server) = actions::foreign_server(facts.server.as_deref(), &ctx).await? {
        tracing::debug!(tenant = %facts.key, server = %server, "placed on another install's server; left alone");
        ctx.metrics.reconcile_succeeded(KIND);
        return Ok(Action::await_change());
    }
    let api: Api<Tenant> = Api::namespaced(ctx.client.clone(), &facts.namespace);
    let result = finalizer(&api, FINALIZER, tenant, |event| {
        let ctx = ctx.clone();
        async move {
            match event {
                FinalizerEvent::Apply(tenant) => {
                    let pass = Pass {
                        tenant: &tenant,
                        facts,
                        ctx: &ctx,
                    };
                    apply(&pass).await
                }
                FinalizerEvent::Cleanup(tenant) => {
                    let pass = Pass {
                        tenant: &tenant,
                        facts,
                        ctx: &ctx,
                    };
                    cleanup(&pass).await
                }
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

async fn apply(pass: &Pass<'_>) -> Result<Action> {
    let Pass { tenant, facts, ctx } = pass;

    // 1. Placement, written to status before any SQL and never changed afterwards.
    let server = match &facts.server {
        Some(server) => server.clone(),
        None => match pass.place().await? {
            Ok(server) => server,
            Err(Unplaceable { reason, message }) => {
                let report = status::unplaceable(reason, &message).unless_changed_since(tenant);
                pass.write(&report).await?;
                return Ok(Action::requeue(PENDING_RETRY));
            }
        },
    };
    let placed = Report::placed(facts.phase, &server, &facts.names, &facts.name);

    // 2. The server's pool, which the DatabaseServer reconciler connects.
    let Some(dbs) = ctx.servers.get(&ObjectRef::new(&server)) else {
        pass.write(&status::server_gone(&placed, &server)).await?;
        return Ok(Action::requeue(PENDING_RETRY));
    };
    let Some(handle) = ctx.pools.get(&server) else {
        if !ctx.server_failing(&server) {
            // Not tried yet by this process (it has just started): nothing to tell in status,
            // which would otherwise flap for a tenant that is fine.
            tracing::debug!(tenant = %facts.key, server = %server, "server not connected yet; waiting");
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        let err = Error::ServerNotConnected {
            server: server.clone(),
        };
        return pass.reported(&placed, Err(err)).await;
    };

    // 3. Credentials: the Secret holds the password before the role has it.
    let endpoint = Endpoint {
        host: &dbs.spec.host,
        port: dbs.spec.port,
        router: ctx
            .router_address
            .as_deref()
            .map(|address| (address, format!("{}.{}", facts.namespace, facts.name))),
    };
    let stored = pass.ensure_secret(&endpoint).await;
    let (credentials, annotations) = pass.reported(&placed, stored).await?;

    // 4. Role, logins, database, grants; all idempotent, repairing drift.
    let changes = pass.provision(&handle, &credentials, &server).await;
    let changes = pass.reported(&placed, changes).await?;
    if let Some(repairs) = status::drift_repaired(facts.phase, &changes) {
        info!(tenant = %facts.key, server = %server, repairs = %repairs, "drift repaired");
        let note = status::drift_note(&server, &repairs);
        pass.publish(EventType::Warning, "DriftRepaired", note)
            .await;
    }
    if changes.contains(&Change::Undeleted) {
        info!(tenant = %facts.key, server = %server, database = %facts.names.database, "deleted tenant taken back within its grace period");
        let note = format!(
            "database {} on {server} taken back from its tombstone, data as it was at the deletion; new credentials in Secret {}",
            facts.names.database,
            silo_crds::contract::secret_name(&facts.name)
        );
        pass.publish(EventType::Normal, "Undeleted", note).await;
    }
    if changes.contains(&Change::DatabaseCreated) {
        info!(tenant = %facts.key, server = %server, database = %facts.names.database, "database created");
    }

    // 5. Password rotation: one step when due or asked (see rotation.rs).
    let (rotation_state, next_step) = pass
        .rotation_step(&handle, &server, &endpoint, credentials, &annotations)
        .await;

    // 6. Report: Ready (or Suspended), and whether the routes are this tenant's.
    let done = status::provisioned(
        placed,
        tenant.spec.suspended,
        &facts.names.database,
        &server,
        &facts.name,
    );
    // A new tenant is migrated to its namespace's target schema before it turns Ready.
    let target = schema_rollout::target_of(tenant, ctx);
    let schema = SchemaFacts {
        target: target.as_deref().map(|r| r.spec.version.as_str()),
        at: tenant
            .status
            .as_ref()
            .and_then(|s| s.schema_version.as_deref()),
        job: None,
        suspended: tenant.spec.suspended,
    };
    let done = match &target {
        Some(rollout) if waits_in_migrating(facts.phase, &schema) => {
            status::migrating(done, &rollout.spec.version, &rollout.name_any())
        }
        _ => done,
    };
    let done = match &facts.restoring {
        Some(restore) => status::restoring(done, restore),
        None => done,
    };
    let routed = pass.routes().await;
    pass.write(&done.condition(routed).credentials(rotation_state))
        .await?;
    if facts.restoring.is_some() {
        // Unlocked as soon as the restore ends, whichever watch tells first.
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    // Back when the next rotation step is due, if that comes before the resync.
    let until_step = next_step.map(|at| {
        Duration::try_from(at.duration_since(jiff::Timestamp::now())).unwrap_or_default()
    });
    Ok(Action::requeue(match until_step {
        Some(wait) => wait.clamp(Duration::from_millis(100), ctx.resync),
        None => ctx.resync,
    }))
}

async fn cleanup(pass: &Pass<'_>) -> Result<Action> {
    let Pass { facts, ctx, .. } = pass;
    let Some(server) = facts.server.clone() else {
        // Never placed: there is nothing on any server to clean up.
        return Ok(Action::await_change());
    };
    let policy = facts.policy;
    let placed = Report::placed(facts.phase, &server, &facts.names, &facts.name);
    let deleting = status::deleting(placed, policy);
    pass.write(&deleting).await?;

    // The policy is carried out, never skipped: the finalizer stays until the server is back,
    // or until a person removes it, knowing the database stays as it is.
    if ctx.servers.get(&ObjectRef::new(&server)).is_none() {
        warn!(tenant = %facts.key, server = %server, "tenant deleted while its server is gone; waiting");
        let database = &facts.names.database;
        let waiting = status::deletion_waits_for_server(&deleting, &server, policy, database);
        pass.write(&waiting).await?;
        return Err(Error::ServerGone { server });
    }
    let Some(handle) = ctx.pools.get(&server) else {
        return Err(Error::ServerNotConnected { server });
    };
    if policy == DeletionPolicy::Snapshot {
        return snapshot_deletion(pass, &deleting, &handle, server).await;
    }
    if let ddl::Cleanup::NotOurs(conflict) = pass.carry_out_policy(&handle, &server).await? {
        let note =
            format!("{conflict} on {server}, not to this tenant; nothing was changed or dropped");
        warn!(tenant = %facts.key, server = %server, conflict = %conflict, "deletion left a foreign role or database alone");
        pass.publish(EventType::Warning, "NotOurs", note).await;
        pass.forget_placement(server);
        return Ok(Action::await_change());
    }
    match policy {
        DeletionPolicy::Delete => {
            // The Secret is owned by the Tenant: garbage collection removes it with the Tenant,
            // so the controller needs no right to delete Secrets.
            info!(tenant = %facts.key, server = %server, database = %facts.names.database, "tenant database and role dropped");
            let note = format!("database {} dropped from {server}", facts.names.database);
            pass.publish(EventType::Normal, "Deleted", note).await;
        }
        DeletionPolicy::Retain | DeletionPolicy::Snapshot => {
            // Keep the credentials with the data: the Secret outlives the Tenant, marked retained.
            pass.retain_secret().await?;
            info!(tenant = %facts.key, server = %server, database = %facts.names.database, "tenant database locked and retained");
            let note = format!(
                "database {} locked and retained on {server}",
                facts.names.database
            );
            pass.publish(EventType::Normal, "Retained", note).await;
        }
    }
    pass.forget_placement(server);
    Ok(Action::await_change())
}

/// Policy `Snapshot`: the finalizer goes once the tenant is locked, backed up and tombstoned;
/// while the final backup runs or after it failed, it stays, and the status says why.
async fn snapshot_deletion(
    pass: &Pass<'_>,
    deleting: &Report,
    handle: &crate::sql::pools::ServerHandle,
    server: String,
) -> Result<Action> {
    let Pass { tenant, facts, .. } = pass;
    match snapshot::snapshot(pass, handle, &server).await {
        Ok(snapshot::Snapshot::Done { backup }) => {
            info!(tenant = %facts.key, server = %server, database = %facts.names.database, backup = %backup, "tenant locked, backed up and tombstoned");
            let note = format!(
                "database {} locked on {server} and backed up to {backup}; kept for {} (apply the Tenant again to take it back), then purged",
                facts.names.database, tenant.spec.deletion.grace_period
            );
            pass.publish(EventType::Normal, "Snapshotted", note).await;
            pass.forget_placement(server);
            Ok(Action::await_change())
        }
        Ok(snapshot::Snapshot::NotOurs(conflict)) => {
            let note = format!(
                "{conflict} on {server}, not to this tenant; nothing was changed or dropped"
            );
            warn!(tenant = %facts.key, server = %server, conflict = %conflict, "deletion left a foreign role or database alone");
            pass.publish(EventType::Warning, "NotOurs", note).await;
            pass.forget_placement(server);
            Ok(Action::await_change())
        }
        Err(Error::FinalBackupWaiting { message }) => {
            pass.write(&deleting.failing("WaitingForServer", &message))
                .await?;
            Err(Error::FinalBackupWaiting { message })
        }
        Err(Error::FinalBackupFailed { message }) => {
            warn!(tenant = %facts.key, server = %server, error = %message, "final backup failed; nothing dropped, retrying");
            let message = format!(
                "the final backup failed, so the database is kept locked and nothing is dropped; retrying every {}s: {message}",
                snapshot::RETRY.as_secs()
            );
            pass.write(&deleting.failing("FinalBackupFailed", &message))
                .await?;
            pass.publish(EventType::Warning, "FinalBackupFailed", message.clone())
                .await;
            Err(Error::FinalBackupFailed { message })
        }
        Err(e) => Err(e),
    }
}
