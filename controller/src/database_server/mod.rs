//! The DatabaseServer reconciler: connects the admin pool, reports readiness, version, tenant count
//! and retained databases; never crashes on an unreachable server or a wrong password, it reports
//! them and retries with capped backoff. What the status says is decided in status.rs (pure).

pub mod status;

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;
use silo_crds::DatabaseServer;
use silo_crds::conditions::{Desired, HARDENED};
use tracing::{info, warn};

use crate::context::{Context, lock_placements};
use crate::error::{Error, Result, sql_reason};
use crate::sql::ddl;
use crate::sql::pools::AdminTarget;
use status::{Announcement, Healthy, Problem, hardened_condition};

pub const KIND: &str = "databaseserver";
const FIELD_MANAGER: &str = "silo-controller";
/// Longest wait between two checks of a failing server.
const MAX_BACKOFF: Duration = Duration::from_secs(120);
/// Tombstones purged per server and pass at most, so that a fleet's purges are spread out.
const PURGES_PER_PASS: usize = 5;
/// How long a health check may take before the server counts as unreachable.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

pub fn reconcile(
    server: Arc<DatabaseServer>,
    ctx: Arc<Context>,
) -> BoxFuture<'static, Result<Action>> {
    // Boxed so that Send-ness is checked with concrete lifetimes (see tenant::reconcile).
    reconcile_server(server, ctx).boxed()
}

async fn reconcile_server(server: Arc<DatabaseServer>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    if !ctx.caches_filled().await {
        return Ok(Action::await_change()); // shutting down
    }
    let name = server.name_any();
    ctx.pools
        .retain(|known| ctx.servers.state().iter().any(|s| s.name_any() == known));

    let check = check(&server, &ctx).await;
    let placed = {
        let placements = lock_placements(&ctx.placements);
        ctx.tenants_by_server(&placements)
            .get(&name)
            .copied()
            .unwrap_or(0)
    };
    let current = server.status.clone().unwrap_or_default();
    let now = Time(jiff::Timestamp::now());
    let status = status::status(&check, &current, placed, server.metadata.generation, now);
    if status != current {
        let api: Api<DatabaseServer> = Api::all(ctx.client.clone());
        let patch = json!({ "apiVersion": "silo.dev/v1alpha1", "kind": "DatabaseServer", "status": status });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        for announcement in status::announcements(&check, &current) {
            announce(&ctx, &server, &name, announcement).await;
        }
    }

    let mut failures = ctx
        .server_failures
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let next = match check {
        Ok(_) => {
            failures.remove(&name);
            ctx.metrics.reconcile_succeeded(KIND);
            ctx.resync.min(Duration::from_secs(60))
        }
        Err(p) => {
            let n = failures.entry(name).or_insert(0);
            *n = n.saturating_add(1);
            ctx.metrics.reconcile_failed(KIND, p.reason);
            backoff(*n)
        }
    };
    Ok(Action::requeue(next))
}

/// What a server reconcile reacts to besides its timer: a new generation or new labels.
pub fn spec_changed(server: &DatabaseServer) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    server.metadata.generation.hash(&mut hasher);
    server.metadata.labels.hash(&mut hasher);
    Some(hasher.finish())
}

pub fn error_policy(server: Arc<DatabaseServer>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(server = %server.name_any(), reason = error.reason(), error = %error, "database server reconcile failed");
    ctx.metrics.reconcile_failed(KIND, error.reason());
    Action::requeue(Duration::from_secs(5))
}

/// 2 s, 4 s, 8 s ... capped at [`MAX_BACKOFF`].
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(16)).min(MAX_BACKOFF)
}

async fn check(server: &DatabaseServer, ctx: &Context) -> Result<Healthy, Problem> {
    let name = server.name_any();
    let target = admin_target(server, ctx).await?;
    let username = target.username.clone();
    let port = target.port;
    let handle = ctx.pools.ensure(&name, target);
    let query = async {
        let facts = ddl::server_facts(&handle.pool).await?;
        let retained = ddl::retained_databases(&handle.pool).await?;
        let tombstones = ddl::tombstones(&handle.pool).await?;
        Ok::<_, sqlx::Error>((facts, retained, tombstones))
    };
    let (facts, retained, tombstones) = match tokio::time::timeout(CHECK_TIMEOUT, query).await {
        Err(_) => {
            return Err(Problem {
                reason: "Unreachable",
                message: format!(
                    "no answer from {}:{port} within {}s",
                    server.spec.host,
                    CHECK_TIMEOUT.as_secs()
                ),
            });
        }
        Ok(Err(e)) => {
            return Err(Problem {
                reason: sql_reason(&e),
                message: format!(
                    "connecting to {}:{port} as {username}: {e}",
                    server.spec.host
                ),
            });
        }
        Ok(Ok(ok)) => ok,
    };
    if !facts.can_provision {
        return Err(Problem {
            reason: "InsufficientPrivilege",
            message: format!(
                "role {username} needs SUPERUSER, or CREATEDB and CREATEROLE, to provision tenants"
            ),
        });
    }
    let hardened = harden(server, &handle.pool).await;
    let tombstones = purge_expired(server, ctx, &handle, tombstones).await;
    Ok(Healthy {
        version: facts.version,
        retained,
        tombstones,
        username,
        hardened,
    })
}

/// Purges the tombstones whose grace period has ended, a few per pass and with the server's DDL
/// to itself, with an Event each; returns the tombstones that remain.
async fn purge_expired(
    server: &DatabaseServer,
    ctx: &Context,
    handle: &crate::sql::pools::ServerHandle,
    tombstones: Vec<ddl::TombstoneRow>,
) -> Vec<ddl::TombstoneRow> {
    let now = jiff::Timestamp::now();
    let mut remaining = Vec::with_capacity(tombstones.len());
    let mut purged = 0;
    for row in tombstones {
        if purged >= PURGES_PER_PASS || !status::purge_due(&row, now) {
            remaining.push(row);
            continue;
        }
        let outcome = {
            // No provisioning in between: a Tenant applied again takes its database back either
            // before the purge reads the tombstone (which the purge then leaves) or after the drop.
            let _exclusive = handle.ddl_exclusive().await;
            ddl::purge(&handle.pool, &row).await
        };
        let backup = row
            .identity
            .tombstone
            .as_ref()
            .map(|t| t.backup.clone())
            .unwrap_or_default();
        match outcome {
            Ok(ddl::Purge::Purged) => {
                purged += 1;
                info!(server = %server.name_any(), database = %row.database, tenant = %row.identity.tenant, "grace period over; database purged");
                let note = format!(
                    "database {} of deleted Tenant {} purged at the end of its grace period; its final backup is {backup}",
                    row.database, row.identity.tenant
                );
                publish(ctx, server, (EventType::Normal, "Purged", "Purge"), note).await;
            }
            Ok(ddl::Purge::TakenBack) => {
                info!(server = %server.name_any(), database = %row.database, "tombstone changed before its purge (taken back); kept");
            }
            Err(e) => {
                warn!(server = %server.name_any(), database = %row.database, error = %e, "purge failed; retried next pass");
                remaining.push(row);
            }
        }
    }
    remaining
}

/// The `Hardened` condition: what PUBLIC may do in the maintenance databases, after revoking it
/// when `spec.revokePublicAccess` asks for that.
async fn harden(server: &DatabaseServer, pool: &sqlx::PgPool) -> Desired {
    let failed = |action: &str, e: sqlx::Error| {
        Desired::new(
            HARDENED,
            false,
            "CheckFailed",
            format!("{action} PUBLIC's grants in the maintenance databases: {e}"),
        )
    };
    let mut grants = match ddl::public_grants(pool).await {
        Ok(grants) => grants,
        Err(e) => return failed("reading", e),
    };
    if server.spec.revoke_public_access && !grants.is_empty() {
        if let Err(e) = ddl::revoke_public_grants(pool, &grants).await {
            return failed("revoking", e);
        }
        info!(server = %server.name_any(), revoked = grants.len(), "PUBLIC's grants in the maintenance databases revoked");
        grants = match ddl::public_grants(pool).await {
            Ok(grants) => grants,
            Err(e) => return failed("reading", e),
        };
    }
    hardened_condition(&grants, server.spec.revoke_public_access)
}

async fn admin_target(server: &DatabaseServer, ctx: &Context) -> Result<AdminTarget, Problem> {
    let secret_ref = &server.spec.admin_secret_ref;
    if let Err(message) = admin_secret_allowed(&secret_ref.namespace, &ctx.admin_secret_namespaces)
    {
        return Err(Problem {
            reason: "AdminSecretNotAllowed",
            message,
        });
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &secret_ref.namespace);
    let missing = |what: String| Problem {
        reason: "AdminSecretInvalid",
        message: what,
    };
    let secret = match api.get_opt(&secret_ref.name).await {
        Ok(Some(secret)) => secret,
        Ok(None) => {
            return Err(Problem {
                reason: "AdminSecretMissing",
                message: format!(
                    "Secret {}/{} does not exist",
                    secret_ref.namespace, secret_ref.name
                ),
            });
        }
        Err(e) => {
            return Err(Problem {
                reason: "AdminSecretUnreadable",
                message: format!(
                    "reading Secret {}/{}: {e}",
                    secret_ref.namespace, secret_ref.name
                ),
            });
        }
    };
    let field = |key: &str| -> Result<String, Problem> {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                missing(format!(
                    "Secret {}/{} has no key `{key}`",
                    secret_ref.namespace, secret_ref.name
                ))
            })
    };
    Ok(AdminTarget {
        host: server.spec.host.clone(),
        port: u16::try_from(server.spec.port).unwrap_or(5432),
        username: field("username")?,
        password: field("password")?,
        ssl_mode: server.spec.ssl_mode,
    })
}

/// Whether an admin Secret may live in `namespace` (pure): a DatabaseServer is cluster-scoped, so
/// whoever may create one must not be able to point the controller at any Secret of the cluster.
fn admin_secret_allowed(namespace: &str, allowed: &[String]) -> Result<(), String> {
    if allowed.is_empty() || allowed.iter().any(|n| n == namespace) {
        return Ok(());
    }
    Err(format!(
        "adminSecretRef names namespace {namespace}; this controller reads admin Secrets only in {} (the chart's controller.adminSecretNamespaces)",
        allowed.join(", ")
    ))
}

/// Logs a change of the server's state and publishes its Event.
async fn announce(ctx: &Context, server: &DatabaseServer, name: &str, announcement: Announcement) {
    match announcement {
        Announcement::Exposed { reason, message } => {
            warn!(server = %name, reason = %reason, message = %message, "database server exposes maintenance databases to PUBLIC");
            publish(
                ctx,
                server,
                (EventType::Warning, &reason, "Connect"),
                message,
            )
            .await;
        }
        Announcement::Connected { version } => {
            info!(server = %name, version = %version, "database server ready");
            let note = format!("PostgreSQL {version} reachable");
            publish(
                ctx,
                server,
                (EventType::Normal, "Connected", "Connect"),
                note,
            )
            .await;
        }
        Announcement::NotReady { reason, message } => {
            warn!(server = %name, reason = reason, message = %message, "database server not ready");
            publish(
                ctx,
                server,
                (EventType::Warning, reason, "Connect"),
                message,
            )
            .await;
        }
    }
}

/// An Event on the server: its (type, reason, action) and note.
async fn publish(
    ctx: &Context,
    server: &DatabaseServer,
    (type_, reason, action): (EventType, &str, &str),
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &server.object_ref(&())).await {
        warn!(server = %server.name_any(), error = %e, "publishing event failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_secrets_only_in_allowed_namespaces() {
        let allowed = ["silo-system".to_string(), "db-admins".to_string()];
        assert!(admin_secret_allowed("silo-system", &allowed).is_ok());
        assert!(admin_secret_allowed("db-admins", &allowed).is_ok());
        let refused = admin_secret_allowed("kube-system", &allowed)
            .err()
            .unwrap_or_default();
        assert!(refused.contains("kube-system") && refused.contains("silo-system, db-admins"));
        assert!(admin_secret_allowed("anywhere", &[]).is_ok());
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }
}
