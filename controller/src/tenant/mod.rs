//! The Tenant reconciler: placement, credentials, role and database, suspension and deletion,
//! in the order of DESIGN.md's provisioning steps.

pub mod placement;
pub mod secret;

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use silo_crds::conditions::{self, DATABASE_READY, Desired, READY, ROUTED};
use silo_crds::contract;
use silo_crds::routing;
use silo_crds::{DeletionPolicy, FINALIZER, Tenant, TenantPhase, TenantStatus};
use tracing::{info, warn};

use crate::context::{Context, lock_placements, tenant_key};
use crate::error::{Error, Result};
use crate::sql::ddl::{self, Change, RoleSpec};
use crate::sql::identity::Claimant;
use crate::sql::{ServerHandle, TenantNames, scram};
use placement::{Candidate, Unplaceable, place_tenant};
use secret::{Endpoint, build_secret, secret_data, secret_name, stored_password};

pub const KIND: &str = "tenant";
const FIELD_MANAGER: &str = "silo-controller";
/// How soon a tenant waiting for a server looks again (server changes also wake it at once).
const PENDING_RETRY: Duration = Duration::from_secs(30);

pub fn reconcile(tenant: Arc<Tenant>, ctx: Arc<Context>) -> BoxFuture<'static, Result<Action>> {
    // Boxed so that the future's Send-ness is checked here, with concrete lifetimes, rather than
    // inside the controller's higher-ranked bounds.
    reconcile_tenant(tenant, ctx).boxed()
}

async fn reconcile_tenant(tenant: Arc<Tenant>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    if !ctx.caches_filled().await {
        return Ok(Action::await_change()); // shutting down
    }
    // Another install's tenant is not touched at all: no status, no finalizer, no policy.
    if let Some(server) = foreign_server(&tenant, &ctx).await? {
        tracing::debug!(tenant = %tenant_key(&tenant), server = %server, "placed on another install's server; left alone");
        ctx.metrics.reconcile_succeeded(KIND);
        return Ok(Action::await_change());
    }
    let api: Api<Tenant> =
        Api::namespaced(ctx.client.clone(), &tenant.namespace().unwrap_or_default());
    let result = finalizer(&api, FINALIZER, tenant, |event| {
        let ctx = ctx.clone();
        async move {
            match event {
                FinalizerEvent::Apply(tenant) => apply(&tenant, &ctx).await,
                FinalizerEvent::Cleanup(tenant) => cleanup(&tenant, &ctx).await,
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

/// The server the tenant is placed on, when that server exists but is not one of this
/// controller's (`--server-selector`): the tenant belongs to another install sharing the cluster.
/// A server that does not exist at all is this controller's concern (it reports it). Asked of the
/// API server rather than the cache, which may not be filled yet when a reconcile starts.
async fn foreign_server(tenant: &Tenant, ctx: &Context) -> Result<Option<String>> {
    let (Some(server), Some(selector)) = (known_server(tenant, ctx), &ctx.server_selector) else {
        return Ok(None);
    };
    if ctx.servers.get(&ObjectRef::new(&server)).is_some() {
        return Ok(None);
    }
    let api: Api<silo_crds::DatabaseServer> = Api::all(ctx.client.clone());
    let by_name = ListParams::default().fields(&format!("metadata.name={server}"));
    if !api
        .list_metadata(&by_name.clone().labels(selector))
        .await?
        .items
        .is_empty()
    {
        return Ok(None);
    }
    let exists = !api.list_metadata(&by_name).await?.items.is_empty();
    Ok(exists.then_some(server))
}

/// What a tenant reconcile reacts to: a new generation (spec or deletion), or changed finalizers.
pub fn spec_changed(tenant: &Tenant) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    tenant.metadata.generation.hash(&mut hasher);
    tenant.metadata.finalizers.hash(&mut hasher);
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
    warn!(tenant = %tenant_key(&tenant), reason = error.reason(), error = %error, "tenant reconcile failed");
    Action::requeue(match error.reason() {
        "ServerNotConnected" => Duration::from_secs(3),
        "ServerGone" => PENDING_RETRY,
        _ => Duration::from_secs(10),
    })
}

async fn apply(tenant: &Tenant, ctx: &Context) -> Result<Action> {
    let key = tenant_key(tenant);
    let namespace = tenant.namespace().unwrap_or_default();
    let name = tenant.name_any();
    let names = TenantNames::of(tenant);
    let status = tenant.status.clone().unwrap_or_default();

    // 1. Placement, written to status before any SQL and never changed afterwards.
    let server = match known_server(tenant, ctx) {
        Some(server) => server,
        None => match place(tenant, ctx).await? {
            Ok(server) => server,
            Err(Unplaceable { reason, message }) => {
                let report = Report::new(TenantPhase::Pending)
                    .unless_changed_since(tenant)
                    .condition(Desired::new(READY, false, reason, &message))
                    .condition(Desired::new(DATABASE_READY, false, reason, &message));
                report.write(tenant, ctx).await?;
                return Ok(Action::requeue(PENDING_RETRY));
            }
        },
    };
    let placed = Report::placed(status.phase, &server, &names, &name);

    // 2. The server's pool, which the DatabaseServer reconciler connects.
    let Some(dbs) = ctx.servers.get(&ObjectRef::new(&server)) else {
        let message = format!(
            "DatabaseServer {server} does not exist; the tenant stays placed on it until it returns"
        );
        placed
            .failing("ServerGone", &message)
            .write(tenant, ctx)
            .await?;
        return Ok(Action::requeue(PENDING_RETRY));
    };
    let Some(handle) = ctx.pools.get(&server) else {
        let err = Error::ServerNotConnected {
            server: server.clone(),
        };
        placed
            .failing(err.reason(), &err.to_string())
            .write(tenant, ctx)
            .await?;
        return Err(err);
    };

    // 3. Credentials: the Secret holds the password before the role has it.
    let endpoint = Endpoint {
        host: &dbs.spec.host,
        port: dbs.spec.port,
        router: ctx
            .router_address
            .as_deref()
            .map(|address| (address, format!("{namespace}.{name}"))),
    };
    let password = match ensure_secret(tenant, ctx, &names, &endpoint).await {
        Ok(password) => password,
        Err(err) => {
            placed
                .failing(err.reason(), &err.to_string())
                .write(tenant, ctx)
                .await?;
            return Err(err);
        }
    };

    // 4. Role, database, grants; all idempotent, repairing drift.
    let suspended = tenant.spec.suspended;
    let sql = provision(&handle, tenant, &names, &password, &server);
    let changes = match sql.await {
        Ok(changes) => changes,
        Err(err) => {
            let failing = placed.failing(err.reason(), &err.to_string());
            let failing = if matches!(err, Error::NameConflict { .. }) {
                failing.phase(TenantPhase::Failed)
            } else {
                failing
            };
            failing.write(tenant, ctx).await?;
            return Err(err);
        }
    };

    let repairs: Vec<String> = changes
        .iter()
        .filter(|c| c.is_repair())
        .map(|c| c.to_string())
        .collect();
    if !repairs.is_empty()
        && status
            .phase
            .is_some_and(|p| p != TenantPhase::Provisioning && p != TenantPhase::Pending)
    {
        let note = format!("repaired on {server}: {}", repairs.join(", "));
        info!(tenant = %key, server = %server, repairs = %repairs.join(", "), "drift repaired");
        publish(ctx, tenant, EventType::Warning, "DriftRepaired", note).await;
    }
    if changes.contains(&Change::DatabaseCreated) {
        info!(tenant = %key, server = %server, database = %names.database, "database created");
    }

    let provisioned = Desired::new(
        DATABASE_READY,
        true,
        "Provisioned",
        "role and database exist as declared",
    );
    let done = if suspended {
        placed
            .phase(TenantPhase::Suspended)
            .condition(provisioned)
            .condition(Desired::new(
                READY,
                false,
                "Suspended",
                "the tenant is suspended: its role cannot log in",
            ))
    } else {
        let message = format!(
            "database {} on {server} accepts the credentials in Secret {}",
            names.database,
            secret_name(&name)
        );
        placed
            .phase(TenantPhase::Ready)
            .condition(provisioned)
            .condition(Desired::new(READY, true, "Ready", message))
    };
    let routed = routes(tenant, ctx).await;
    done.condition(routed).write(tenant, ctx).await?;
    Ok(Action::requeue(ctx.resync))
}

/// The `Routed` condition: whether the routes of `spec.routing` are this tenant's alone. A route
/// another Tenant claimed first stays theirs (the router agrees, by the same rule); a contest is
/// shown on both Tenants, with an Event when it appears.
async fn routes(tenant: &Tenant, ctx: &Context) -> Desired {
    let others = ctx.tenants.state();
    let contests = routing::contests(tenant, others.iter().map(|t| t.as_ref()));
    let condition = routed_condition(&contests);
    let known = tenant
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == ROUTED));
    if !contests.is_empty() && known.is_none_or(|c| c.message != condition.message) {
        publish(
            ctx,
            tenant,
            EventType::Warning,
            "RouteConflict",
            condition.message.clone(),
        )
        .await;
        // The other side learns of it now, not at its next resync.
        let mine = tenant_key(tenant);
        for contest in &contests {
            let Some((namespace, name)) = contest.other.split_once('/') else {
                continue;
            };
            let other = ObjectRef::new(name).within(namespace);
            let told = ctx.tenants.get(&other).is_some_and(|t| {
                t.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == ROUTED && c.message.contains(&mine))
                })
            });
            if !told {
                let _ = ctx.tenant_changed.send(other);
            }
        }
    }
    condition
}

/// The `Routed` condition for a tenant's contested routes (pure).
fn routed_condition(contests: &[routing::Contest]) -> Desired {
    let describe = |kept: bool| -> Vec<String> {
        contests
            .iter()
            .filter(|c| c.kept == kept)
            .map(|c| format!("{} (also claimed by {})", c.route, c.other))
            .collect()
    };
    let (lost, kept) = (describe(false), describe(true));
    if !lost.is_empty() {
        let mut message = format!(
            "claimed first by another Tenant, so not routed here: {}",
            lost.join(", ")
        );
        if !kept.is_empty() {
            message.push_str(&format!("; kept: {}", kept.join(", ")));
        }
        return Desired::new(ROUTED, false, "RouteConflict", message);
    }
    if !kept.is_empty() {
        return Desired::new(
            ROUTED,
            true,
            "RouteContested",
            format!(
                "routed here, as the first claim; later claims are refused: {}",
                kept.join(", ")
            ),
        );
    }
    Desired::new(
        ROUTED,
        true,
        "Routed",
        "no other Tenant claims these routes",
    )
}

/// Role, database and grants as declared; sessions ended while suspended. Returns what changed.
async fn provision(
    handle: &ServerHandle,
    tenant: &Tenant,
    names: &TenantNames,
    password: &str,
    server: &str,
) -> Result<Vec<Change>> {
    let key = tenant_key(tenant);
    let uid = tenant.uid().unwrap_or_default();
    let claimant = Claimant {
        key: &key,
        uid: &uid,
    };
    let suspended = tenant.spec.suspended;
    let _permit = handle.ddl_permit().await;
    let pool = &handle.pool;
    // Nothing is created, changed or given a password before the names are known to be ours.
    ddl::claim(pool, &names.role, &names.database, &claimant)
        .await
        .map_err(|e| Error::sql("checking names", server, e))?
        .map_err(|conflict| Error::NameConflict {
            conflict,
            server: server.to_string(),
        })?;
    let role = RoleSpec {
        role: &names.role,
        password,
        connection_limit: tenant.spec.connection_limit,
        login: !suspended,
    };
    let mut changes = ddl::ensure_role(pool, &role, &claimant, &handle.verified)
        .await
        .map_err(|e| Error::sql("ensuring role", server, e))?;
    let more = ddl::ensure_database(pool, &names.database, &names.role, &claimant)
        .await
        .map_err(|e| Error::sql("ensuring database", server, e))?;
    for change in more {
        if !changes.contains(&change) {
            changes.push(change);
        }
    }
    if suspended {
        let ended = ddl::terminate_sessions(pool, &names.database, &names.role)
            .await
            .map_err(|e| Error::sql("ending sessions", server, e))?;
        if ended > 0 {
            info!(tenant = %key, sessions = ended, "sessions of suspended tenant ended");
        }
    }
    Ok(changes)
}

/// The server this tenant is placed on, from its status or from a placement this process made
/// whose status write the cache has not shown yet.
fn known_server(tenant: &Tenant, ctx: &Context) -> Option<String> {
    if let Some(server) = tenant.status.as_ref().and_then(|s| s.server.clone()) {
        return Some(server);
    }
    lock_placements(&ctx.placements)
        .get(&tenant_key(tenant))
        .cloned()
}

/// Chooses a server and records the choice in status.
async fn place(tenant: &Tenant, ctx: &Context) -> Result<Result<String, Unplaceable>> {
    let key = tenant_key(tenant);
    let chosen = {
        let mut placements = lock_placements(&ctx.placements);
        if let Some(server) = placements.get(&key) {
            return Ok(Ok(server.clone()));
        }
        let counts = ctx.tenants_by_server(&placements);
        let candidates: Vec<Candidate> = ctx
            .servers
            .state()
            .iter()
            .map(|s| Candidate {
                name: s.name_any(),
                labels: s.labels().clone(),
                dedicated: s.spec.dedicated,
                cordoned: s.spec.cordoned,
                ready: s
                    .status
                    .as_ref()
                    .is_some_and(|st| conditions::is_true(&st.conditions, READY)),
                max_tenants: usize::try_from(s.spec.max_tenants).unwrap_or(0),
                tenants: counts.get(&s.name_any()).copied().unwrap_or(0),
            })
            .collect();
        match place_tenant(
            tenant.spec.isolation,
            tenant.spec.server_selector.as_ref(),
            &candidates,
        ) {
            Ok(server) => {
                placements.insert(key.clone(), server.clone());
                server
            }
            Err(unplaceable) => return Ok(Err(unplaceable)),
        }
    };
    let names = TenantNames::of(tenant);
    // Written only if nobody placed the tenant meanwhile (another install sharing the cluster).
    let report =
        Report::placed(None, &chosen, &names, &tenant.name_any()).unless_changed_since(tenant);
    if let Err(e) = report.write(tenant, ctx).await {
        lock_placements(&ctx.placements).remove(&key);
        return Err(e);
    }
    info!(tenant = %key, server = %chosen, "tenant placed");
    let _ = ctx.server_changed.send(chosen.clone());
    publish(
        ctx,
        tenant,
        EventType::Normal,
        "Placed",
        format!("placed on DatabaseServer {chosen}"),
    )
    .await;
    Ok(Ok(chosen))
}

/// Creates the credentials Secret, or brings an existing one back to the declared contents.
/// Returns the password.
async fn ensure_secret(
    tenant: &Tenant,
    ctx: &Context,
    names: &TenantNames,
    endpoint: &Endpoint<'_>,
) -> Result<String> {
    let namespace = tenant.namespace().unwrap_or_default();
    let name = secret_name(&tenant.name_any());
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let create = || async {
        let password = scram::generate_password();
        let secret = build_secret(tenant, secret_data(names, endpoint, &password));
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        api.create(&params, &secret).await.map(|_| password)
    };
    // A tenant still being provisioned most likely has no Secret yet: try to create it first.
    let fresh = tenant
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .is_none_or(|p| matches!(p, TenantPhase::Pending | TenantPhase::Provisioning));
    if fresh {
        match create().await {
            Ok(password) => return Ok(password),
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let Some(existing) = api.get_opt(&name).await? else {
        return Ok(create().await?);
    };

    let uid = tenant.uid().unwrap_or_default();
    let owners = existing
        .metadata
        .owner_references
        .clone()
        .unwrap_or_default();
    let owned = owners.iter().any(|o| o.uid == uid);
    let labels = existing.labels();
    let ours_unowned = owners.is_empty()
        && labels.get(contract::MANAGED_BY_LABEL).map(String::as_str) == Some(contract::MANAGED_BY)
        && labels.get(contract::TENANT_LABEL) == tenant.metadata.name.as_ref();
    if !owned && !ours_unowned {
        return Err(Error::Secret {
            namespace,
            name,
            message: "exists but does not belong to this tenant; delete or rename it".into(),
        });
    }
    let password = stored_password(&existing).unwrap_or_else(scram::generate_password);
    let wanted = build_secret(tenant, secret_data(names, endpoint, &password));
    let retained_label = labels.contains_key(contract::RETAINED_LABEL);
    if !owned || existing.data != wanted.data || retained_label {
        // A merge patch: `data` replaced as a whole, the retained mark dropped, ownership taken back.
        let patch = json!({
            "metadata": {
                "ownerReferences": wanted.metadata.owner_references,
                "labels": { contract::RETAINED_LABEL: null },
            },
            "data": wanted.data,
        });
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        if !owned {
            info!(tenant = %tenant_key(tenant), secret = %name, "retained credentials Secret adopted");
        }
    }
    Ok(password)
}

async fn cleanup(tenant: &Tenant, ctx: &Context) -> Result<Action> {
    let key = tenant_key(tenant);
    let Some(server) = known_server(tenant, ctx) else {
        // Never placed: there is nothing on any server to clean up.
        return Ok(Action::await_change());
    };
    let names = TenantNames::of(tenant);
    let uid = tenant.uid().unwrap_or_default();
    let claimant = Claimant {
        key: &key,
        uid: &uid,
    };
    let policy = tenant.spec.deletion.policy;
    let deleting = Report::placed(
        tenant.status.as_ref().and_then(|s| s.phase),
        &server,
        &names,
        &tenant.name_any(),
    )
    .phase(TenantPhase::Deleting)
    .condition(Desired::new(
        READY,
        false,
        "Deleting",
        format!("deleting with policy {policy:?}"),
    ));
    deleting.write(tenant, ctx).await?;

    // The policy is carried out, never skipped: the finalizer stays until the server is back,
    // or until a person removes it, knowing the database stays as it is.
    if ctx.servers.get(&ObjectRef::new(&server)).is_none() {
        let message = format!(
            "DatabaseServer {server} no longer exists, so deletion policy {policy:?} cannot be carried out; \
             re-create the DatabaseServer, or remove the finalizer {FINALIZER} to leave database {} as it is",
            names.database
        );
        warn!(tenant = %key, server = %server, "tenant deleted while its server is gone; waiting");
        deleting
            .failing("ServerGone", &message)
            .write(tenant, ctx)
            .await?;
        return Err(Error::ServerGone { server });
    }
    let Some(handle) = ctx.pools.get(&server) else {
        return Err(Error::ServerNotConnected { server });
    };
    let secrets: Api<Secret> =
        Api::namespaced(ctx.client.clone(), &tenant.namespace().unwrap_or_default());
    let secret = secret_name(&tenant.name_any());
    let outcome = {
        let _permit = handle.ddl_permit().await;
        match policy {
            DeletionPolicy::Delete => {
                ddl::drop_tenant(&handle.pool, &names.database, &names.role, &claimant)
                    .await
                    .map_err(|e| Error::sql("dropping tenant", &server, e))?
            }
            DeletionPolicy::Retain => {
                let at = jiff::Timestamp::now().to_string();
                ddl::lock_and_retain(&handle.pool, &names.database, &names.role, &claimant, &at)
                    .await
                    .map_err(|e| Error::sql("locking retained tenant", &server, e))?
            }
        }
    };
    if let ddl::Cleanup::NotOurs(conflict) = outcome {
        let note =
            format!("{conflict} on {server}, not to this tenant; nothing was changed or dropped");
        warn!(tenant = %key, server = %server, conflict = %conflict, "deletion left a foreign role or database alone");
        publish(ctx, tenant, EventType::Warning, "NotOurs", note).await;
        lock_placements(&ctx.placements).remove(&key);
        let _ = ctx.server_changed.send(server);
        return Ok(Action::await_change());
    }
    match policy {
        DeletionPolicy::Delete => {
            // The Secret is owned by the Tenant: garbage collection removes it with the Tenant,
            // so the controller needs no right to delete Secrets.
            info!(tenant = %key, server = %server, database = %names.database, "tenant database and role dropped");
            publish(
                ctx,
                tenant,
                EventType::Normal,
                "Deleted",
                format!("database {} dropped from {server}", names.database),
            )
            .await;
        }
        DeletionPolicy::Retain => {
            // Keep the credentials with the data: the Secret outlives the Tenant, marked retained.
            let patch = json!({ "metadata": { "ownerReferences": null, "labels": { contract::RETAINED_LABEL: "true" } } });
            match secrets
                .patch(&secret, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            info!(tenant = %key, server = %server, database = %names.database, "tenant database locked and retained");
            let note = format!(
                "database {} locked and retained on {server}",
                names.database
            );
            publish(ctx, tenant, EventType::Normal, "Retained", note).await;
        }
    }
    lock_placements(&ctx.placements).remove(&key);
    let _ = ctx.server_changed.send(server);
    Ok(Action::await_change())
}

/// The status a reconcile step wants to show.
#[derive(Clone)]
struct Report {
    /// Write only if the Tenant is still at this resourceVersion.
    precondition: Option<String>,
    phase: TenantPhase,
    server: Option<String>,
    database: Option<String>,
    role: Option<String>,
    secret_name: Option<String>,
    conditions: Vec<Desired>,
}

impl Report {
    fn new(phase: TenantPhase) -> Self {
        Report {
            precondition: None,
            phase,
            server: None,
            database: None,
            role: None,
            secret_name: None,
            conditions: Vec::new(),
        }
    }

    /// Placed on `server`; the phase stays what it was once provisioning has completed.
    fn placed(
        previous: Option<TenantPhase>,
        server: &str,
        names: &TenantNames,
        tenant_name: &str,
    ) -> Self {
        let phase = match previous {
            None | Some(TenantPhase::Pending) => TenantPhase::Provisioning,
            Some(phase) => phase,
        };
        Report {
            precondition: None,
            phase,
            server: Some(server.to_string()),
            database: Some(names.database.clone()),
            role: Some(names.role.clone()),
            secret_name: Some(secret_name(tenant_name)),
            conditions: Vec::new(),
        }
    }

    /// The write fails with a conflict if the Tenant changed since `tenant` was read: for the
    /// writes made while it is unplaced, which another install may be placing at the same time.
    fn unless_changed_since(mut self, tenant: &Tenant) -> Self {
        self.precondition = tenant.metadata.resource_version.clone();
        self
    }

    fn phase(mut self, phase: TenantPhase) -> Self {
        self.phase = phase;
        self
    }

    fn condition(mut self, condition: Desired) -> Self {
        self.conditions.retain(|c| c.type_ != condition.type_);
        self.conditions.push(condition);
        self
    }

    fn failing(&self, reason: &str, message: &str) -> Self {
        self.clone()
            .condition(Desired::new(DATABASE_READY, false, reason, message))
            .condition(Desired::new(READY, false, reason, message))
    }

    /// Writes the status if it differs from the stored one, and publishes an Event when the
    /// phase changes.
    async fn write(&self, tenant: &Tenant, ctx: &Context) -> Result<()> {
        let current = tenant.status.clone().unwrap_or_default();
        let generation = tenant.metadata.generation;
        let now = Time(jiff::Timestamp::now());
        let status = TenantStatus {
            observed_generation: generation,
            phase: Some(self.phase),
            conditions: conditions::merge(&current.conditions, &self.conditions, generation, now),
            server: self.server.clone().or(current.server.clone()),
            database: self.database.clone().or(current.database.clone()),
            role: self.role.clone().or(current.role.clone()),
            secret_name: self.secret_name.clone().or(current.secret_name.clone()),
        };
        if status == current {
            return Ok(());
        }
        let api: Api<Tenant> =
            Api::namespaced(ctx.client.clone(), &tenant.namespace().unwrap_or_default());
        let mut patch =
            json!({ "apiVersion": "silo.dev/v1alpha1", "kind": "Tenant", "status": status });
        if let Some(version) = &self.precondition {
            patch["metadata"] = json!({ "resourceVersion": version });
        }
        api.patch_status(
            &tenant.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        // "Placed" already announced provisioning.
        if current.phase != Some(self.phase) && self.phase != TenantPhase::Provisioning {
            let message = self
                .conditions
                .iter()
                .find(|c| c.type_ == READY)
                .map(|c| c.message.clone());
            let (type_, reason) = match self.phase {
                TenantPhase::Pending => (EventType::Warning, "Pending"),
                TenantPhase::Failed => (EventType::Warning, "Failed"),
                phase => (EventType::Normal, phase_reason(phase)),
            };
            publish(
                ctx,
                tenant,
                type_,
                reason,
                message.unwrap_or_else(|| format!("phase {}", self.phase)),
            )
            .await;
        }
        Ok(())
    }
}

fn phase_reason(phase: TenantPhase) -> &'static str {
    match phase {
        TenantPhase::Pending => "Pending",
        TenantPhase::Provisioning => "Provisioning",
        TenantPhase::Ready => "Ready",
        TenantPhase::Suspended => "Suspended",
        TenantPhase::Deleting => "Deleting",
        TenantPhase::Failed => "Failed",
    }
}

/// Publishes an Event; a failure to publish is logged, never fatal.
async fn publish(ctx: &Context, tenant: &Tenant, type_: EventType, reason: &str, note: String) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &tenant.object_ref(&())).await {
        warn!(tenant = %tenant_key(tenant), error = %e, "publishing event failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use silo_crds::routing::{Contest, Route};

    fn contest(host: &str, other: &str, kept: bool) -> Contest {
        Contest {
            route: Route {
                host: host.into(),
                path_prefix: String::new(),
            },
            other: other.into(),
            kept,
        }
    }

    #[test]
    fn routed_says_who_keeps_what() {
        let free = routed_condition(&[]);
        assert_eq!((free.status, free.reason.as_str()), (true, "Routed"));

        let kept = routed_condition(&[contest("a.example.com", "b/late", true)]);
        assert_eq!(
            (kept.status, kept.reason.as_str()),
            (true, "RouteContested")
        );
        assert!(
            kept.message
                .contains("host a.example.com (also claimed by b/late)")
        );

        let lost = routed_condition(&[
            contest("a.example.com", "b/early", false),
            contest("c.example.com", "d/late", true),
        ]);
        assert_eq!(
            (lost.status, lost.reason.as_str()),
            (false, "RouteConflict")
        );
        assert_eq!(
            lost.message,
            "claimed first by another Tenant, so not routed here: host a.example.com (also claimed by b/early); \
             kept: host c.example.com (also claimed by d/late)"
        );
    }
}
