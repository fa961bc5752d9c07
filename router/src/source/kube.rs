//! Tenants from Kubernetes: Tenants, their credentials Secrets and DatabaseServers, watched live.
//! Every change rebuilds the routing table and swaps it in at once; a tenant that stops being
//! Ready has its sessions ended.

use std::sync::Arc;

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use silo_crds::{DatabaseServer, Tenant, TenantPhase};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::frontend::Shared;
use crate::routing::{RoutingTable, TenantRoute, TenantState};

/// Watches until `shutdown`. `ready` is cancelled once the first full table is in place.
pub async fn run(
    client: Client,
    default_limit: usize,
    shared: Arc<Shared>,
    ready: CancellationToken,
    shutdown: CancellationToken,
) {
    let (tenants, tenant_writer) = reflector::store::<Tenant>();
    let (secrets, secret_writer) = reflector::store::<Secret>();
    let tenant_events = watcher(
        Api::<Tenant>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(tenant_writer)
    .map(|e| e.map(|_| ()));
    let secret_events = watcher(
        Api::<Secret>::all(client.clone()),
        watcher::Config::default().labels("app.kubernetes.io/managed-by=silo"),
    )
    .default_backoff()
    .reflect(secret_writer)
    .map(|e| e.map(|_| ()));
    let (servers, server_writer) = reflector::store::<DatabaseServer>();
    let server_events = watcher(
        Api::<DatabaseServer>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(server_writer)
    .map(|e| e.map(|_| ()));
    let all = stream::select(stream::select(tenant_events, secret_events), server_events);
    let mut events = std::pin::pin!(all.ready_chunks(4096));
    let mut announced = false;
    loop {
        let batch = tokio::select! {
            _ = shutdown.cancelled() => return,
            batch = events.next() => match batch {
                Some(batch) => batch,
                None => return,
            },
        };
        for e in batch.iter().filter_map(|r| r.as_ref().err()) {
            warn!(error = %e, "kubernetes watch error; retrying");
        }
        if tenants.wait_until_ready().now_or_never_ready()
            && secrets.wait_until_ready().now_or_never_ready()
            && servers.wait_until_ready().now_or_never_ready()
        {
            let table = build_table(&tenants, &secrets, &servers, default_limit);
            if !announced {
                info!(tenants = table.len(), "tenants loaded from kubernetes");
                announced = true;
                ready.cancel();
            }
            shared.set_table(table);
        }
    }
}

/// `Future::now_or_never` for the store's readiness, spelled for the reader.
trait NowOrNever {
    fn now_or_never_ready(self) -> bool;
}

impl<F: std::future::Future<Output = Result<(), reflector::store::WriterDropped>>> NowOrNever
    for F
{
    fn now_or_never_ready(self) -> bool {
        matches!(futures::FutureExt::now_or_never(self), Some(Ok(())))
    }
}

/// The routing table for the tenants and Secrets in the stores (pure over their contents).
pub fn build_table(
    tenants: &Store<Tenant>,
    secrets: &Store<Secret>,
    servers: &Store<DatabaseServer>,
    default_limit: usize,
) -> RoutingTable {
    RoutingTable::new(tenants.state().iter().filter_map(|tenant| {
        let namespace = tenant.namespace()?;
        let name = tenant.name_any();
        let secret = secrets.get(&ObjectRef::new(&format!("{name}-db")).within(&namespace));
        let mut route = route_for(tenant, secret.as_deref(), default_limit)?;
        let server = tenant.status.as_ref().and_then(|s| s.server.clone());
        route.server = server.and_then(|name| {
            let dbs = servers.get(&ObjectRef::new(&name))?;
            route.upstream_tls = match dbs.spec.ssl_mode {
                silo_crds::SslMode::Disable => crate::server::UpstreamTls::Disable,
                silo_crds::SslMode::Prefer => crate::server::UpstreamTls::Prefer,
                silo_crds::SslMode::Require => crate::server::UpstreamTls::Require,
            };
            Some((
                name,
                usize::try_from(dbs.spec.max_connections)
                    .unwrap_or(1)
                    .max(1),
            ))
        });
        Some(route)
    }))
}

/// One tenant's route. Without its Secret a tenant cannot be logged into, so it is Pending.
pub fn route_for(
    tenant: &Tenant,
    secret: Option<&Secret>,
    default_limit: usize,
) -> Option<TenantRoute> {
    let phase = tenant.status.as_ref().and_then(|s| s.phase);
    let value = |key: &str| -> Option<String> {
        let bytes = secret?.data.as_ref()?.get(key)?;
        String::from_utf8(bytes.0.clone()).ok()
    };
    let mut state =
        if tenant.metadata.deletion_timestamp.is_some() || phase == Some(TenantPhase::Deleting) {
            TenantState::Deleting
        } else if tenant.spec.suspended || phase == Some(TenantPhase::Suspended) {
            TenantState::Suspended
        } else if phase == Some(TenantPhase::Ready) {
            TenantState::Ready
        } else {
            TenantState::Pending
        };
    let credentials = (|| {
        Some((
            value("host")?,
            value("port")?.parse().ok()?,
            value("dbname")?,
            value("user")?,
            value("password")?,
        ))
    })();
    let (host, port, database, user, password) = match credentials {
        Some(c) => c,
        None => {
            if state == TenantState::Ready {
                state = TenantState::Pending;
            }
            (
                String::new(),
                0,
                String::new(),
                String::new(),
                String::new(),
            )
        }
    };
    Some(TenantRoute {
        namespace: tenant.namespace()?,
        name: tenant.name_any(),
        host,
        port,
        database,
        user,
        password,
        connection_limit: usize::try_from(tenant.spec.connection_limit)
            .unwrap_or(default_limit)
            .max(1),
        state,
        upstream_tls: Default::default(),
        server: None,
        hosts: tenant
            .spec
            .routing
            .as_ref()
            .map(|r| r.hosts.clone())
            .unwrap_or_default(),
        path_prefixes: tenant
            .spec
            .routing
            .as_ref()
            .map(|r| r.path_prefixes.clone())
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use silo_crds::{TenantSpec, TenantStatus};

    fn tenant(phase: Option<TenantPhase>, suspended: bool) -> Tenant {
        let mut t = Tenant::new(
            "acme",
            TenantSpec {
                isolation: Default::default(),
                server_selector: None,
                connection_limit: 7,
                suspended,
                deletion: Default::default(),
                routing: None,
            },
        );
        t.metadata.namespace = Some("prod".into());
        t.status = Some(TenantStatus {
            phase,
            ..Default::default()
        });
        t
    }

    fn secret() -> Secret {
        let data = [
            ("host", "10.0.0.1"),
            ("port", "5433"),
            ("dbname", "t_prod_acme"),
            ("user", "t_prod_acme"),
            ("password", "pw"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect();
        Secret {
            data: Some(data),
            ..Default::default()
        }
    }

    #[test]
    fn ready_tenant_with_secret_routes() {
        let r = route_for(
            &tenant(Some(TenantPhase::Ready), false),
            Some(&secret()),
            20,
        )
        .unwrap_or_else(|| unreachable!());
        assert_eq!(
            (r.key().as_str(), r.port, r.connection_limit, r.state),
            ("prod.acme", 5433, 7, TenantState::Ready)
        );
        assert_eq!(r.password, "pw");
    }

    #[test]
    fn states_follow_spec_status_and_deletion() {
        let state = |t: &Tenant, s: Option<&Secret>| route_for(t, s, 20).map(|r| r.state);
        assert_eq!(
            state(&tenant(Some(TenantPhase::Ready), true), Some(&secret())),
            Some(TenantState::Suspended),
            "spec wins at once"
        );
        assert_eq!(
            state(&tenant(Some(TenantPhase::Ready), false), None),
            Some(TenantState::Pending),
            "no secret"
        );
        assert_eq!(
            state(
                &tenant(Some(TenantPhase::Provisioning), false),
                Some(&secret())
            ),
            Some(TenantState::Pending)
        );
        let mut deleting = tenant(Some(TenantPhase::Ready), false);
        deleting.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff_now()),
        );
        assert_eq!(
            state(&deleting, Some(&secret())),
            Some(TenantState::Deleting)
        );
    }

    fn jiff_now() -> k8s_openapi::jiff::Timestamp {
        k8s_openapi::jiff::Timestamp::now()
    }
}
