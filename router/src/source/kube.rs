//! Tenants from Kubernetes: Tenants, their credentials Secrets and DatabaseServers, watched live.
//! Every change rebuilds the routing table and swaps it in at once; a tenant that stops being
//! Ready has its sessions ended.
//!
//! Where a tenant's connections go is decided only by what the tenant's own users cannot write:
//! the cluster-scoped DatabaseServer the tenant is placed on (host, port, TLS, connection budget)
//! and the Tenant's status (database and role names, written by the controller through the status
//! subresource). The tenant's Secret, which anyone allowed to edit Secrets in its namespace can
//! change, gives the password, and which of the tenant's own roles logs in (its owner role or one
//! of its two login roles, see `contract::login_roles`; any other name counts as the owner); a
//! Secret naming another host or another tenant's role cannot send the router there.

use std::fmt::Debug;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::{self, BoxStream, SelectAll};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use silo_crds::contract;
use silo_crds::{DatabaseServer, SslMode, Tenant, TenantPhase};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backend::UpstreamTls;
use crate::routing::{RoutingTable, TenantRoute, TenantState};
use crate::state::Shared;

/// The only key of a tenant's Secret the router reads.
const PASSWORD_KEY: &str = contract::keys::PASSWORD;

/// The controller labels the Secrets it writes; the router reads no other Secret.
const SECRET_SELECTOR: &str = contract::MANAGED_SELECTOR;

/// Watches until `shutdown`: Tenants and their Secrets in `namespaces` (every namespace when it is
/// empty), DatabaseServers cluster-wide. `ready` is cancelled once the first full table is in place.
pub async fn run(
    client: Client,
    namespaces: Vec<String>,
    default_limit: usize,
    shared: Arc<Shared>,
    ready: CancellationToken,
    shutdown: CancellationToken,
) {
    let (stores, events) = Stores::watch(&client, &namespaces);
    let mut events = std::pin::pin!(events.ready_chunks(4096));
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
        if stores.are_ready() {
            let table = build_table(&stores, default_limit);
            if !announced {
                info!(
                    tenants = table.len(),
                    namespaces = %scope_description(&namespaces),
                    "tenants loaded from kubernetes"
                );
                announced = true;
                ready.cancel();
            }
            shared.set_table(table);
        }
    }
}

fn scope_description(namespaces: &[String]) -> String {
    if namespaces.is_empty() {
        "all".to_string()
    } else {
        namespaces.join(",")
    }
}

/// What the watches have seen. Tenants and Secrets have one store per watched namespace (or one
/// for the whole cluster): a reflector store is replaced wholesale each time its watch (re)lists,
/// so watches of several namespaces cannot share a store without erasing each other.
pub struct Stores {
    tenants: Vec<Store<Tenant>>,
    secrets: Vec<Store<Secret>>,
    servers: Store<DatabaseServer>,
}

type WatchEvents = BoxStream<'static, Result<(), watcher::Error>>;

impl Stores {
    /// The stores, and the merged watch events that fill them as they are polled.
    fn watch(client: &Client, namespaces: &[String]) -> (Stores, SelectAll<WatchEvents>) {
        let scopes: Vec<Option<&str>> = if namespaces.is_empty() {
            vec![None]
        } else {
            namespaces.iter().map(|ns| Some(ns.as_str())).collect()
        };
        let mut events = Vec::new();
        let mut tenants = Vec::new();
        let mut secrets = Vec::new();
        for scope in scopes {
            let (store, watch) = reflected(scoped(client, scope), watcher::Config::default());
            tenants.push(store);
            events.push(watch);
            let config = watcher::Config::default().labels(SECRET_SELECTOR);
            let (store, watch) = reflected(scoped(client, scope), config);
            secrets.push(store);
            events.push(watch);
        }
        let (servers, watch) = reflected(Api::all(client.clone()), watcher::Config::default());
        events.push(watch);
        let stores = Stores {
            tenants,
            secrets,
            servers,
        };
        (stores, stream::select_all(events))
    }

    /// Whether every watch has listed once, so that no tenant is missing from a table built now.
    fn are_ready(&self) -> bool {
        self.tenants.iter().all(is_ready)
            && self.secrets.iter().all(is_ready)
            && is_ready(&self.servers)
    }

    fn tenants(&self) -> impl Iterator<Item = Arc<Tenant>> + '_ {
        self.tenants.iter().flat_map(Store::state)
    }

    fn secret(&self, namespace: &str, name: &str) -> Option<Arc<Secret>> {
        let key = ObjectRef::new(name).within(namespace);
        self.secrets.iter().find_map(|store| store.get(&key))
    }

    fn server(&self, name: &str) -> Option<Arc<DatabaseServer>> {
        self.servers.get(&ObjectRef::new(name))
    }
}

/// The whole cluster, or one namespace.
fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// A store, and the watch events that fill it.
fn reflected<K>(api: Api<K>, config: watcher::Config) -> (Store<K>, WatchEvents)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let events = watcher(api, config)
        .default_backoff()
        .reflect(writer)
        .map(|e| e.map(|_| ()))
        .boxed();
    (store, events)
}

fn is_ready<K>(store: &Store<K>) -> bool
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    matches!(
        futures::FutureExt::now_or_never(store.wait_until_ready()),
        Some(Ok(()))
    )
}

/// The routing table for the tenants in the stores (pure over their contents).
pub fn build_table(stores: &Stores, default_limit: usize) -> RoutingTable {
    RoutingTable::new(stores.tenants().filter_map(|tenant| {
        let namespace = tenant.namespace()?;
        let secret = stores.secret(&namespace, &contract::secret_name(&tenant.name_any()));
        let server = tenant
            .status
            .as_ref()
            .and_then(|s| s.server.as_deref())
            .and_then(|name| stores.server(name));
        route_for(&tenant, server.as_deref(), secret.as_deref(), default_limit)
    }))
}

/// One tenant's route: where to connect from `server` (the DatabaseServer its status names), the
/// database and role from its status, the password from its Secret. A tenant missing any of them
/// cannot be logged into, so a Ready one is Pending. `None` only for a Tenant without a namespace.
pub fn route_for(
    tenant: &Tenant,
    server: Option<&DatabaseServer>,
    secret: Option<&Secret>,
    default_limit: usize,
) -> Option<TenantRoute> {
    let upstream = Upstream::of(tenant, server, secret);
    let mut state = state_of(tenant);
    if upstream.is_none() && state == TenantState::Ready {
        state = TenantState::Pending;
    }
    let Upstream {
        host,
        port,
        database,
        user,
        password,
        other_passwords,
        tls,
        server,
    } = upstream.unwrap_or_default();
    let routing = tenant.spec.routing.as_ref();
    Some(TenantRoute {
        namespace: tenant.namespace()?,
        name: tenant.name_any(),
        host,
        port,
        database,
        user,
        password,
        other_passwords,
        connection_limit: usize::try_from(tenant.spec.connection_limit)
            .unwrap_or(default_limit)
            .max(1),
        state,
        upstream_tls: tls,
        server,
        hosts: routing.map(|r| r.hosts.clone()).unwrap_or_default(),
        path_prefixes: routing.map(|r| r.path_prefixes.clone()).unwrap_or_default(),
        created: silo_crds::routing::Precedence::of(tenant).created,
    })
}

/// Whether the tenant's connections are admitted, from its spec, status and deletion.
fn state_of(tenant: &Tenant) -> TenantState {
    let phase = tenant.status.as_ref().and_then(|s| s.phase);
    if tenant.metadata.deletion_timestamp.is_some() || phase == Some(TenantPhase::Deleting) {
        TenantState::Deleting
    } else if tenant.spec.suspended || phase == Some(TenantPhase::Suspended) {
        TenantState::Suspended
    } else if phase == Some(TenantPhase::Restoring) {
        TenantState::Restoring
    } else if phase == Some(TenantPhase::Ready) {
        TenantState::Ready
    } else {
        TenantState::Pending
    }
}

/// Where and as whom the router logs in for a tenant.
#[derive(Default)]
struct Upstream {
    host: String,
    port: u16,
    database: String,
    user: String,
    password: String,
    other_passwords: Vec<String>,
    tls: UpstreamTls,
    /// The DatabaseServer's name and connection budget.
    server: Option<(String, usize)>,
}

impl Upstream {
    /// `None` until the server, the names in status and the password are all known.
    fn of(
        tenant: &Tenant,
        server: Option<&DatabaseServer>,
        secret: Option<&Secret>,
    ) -> Option<Upstream> {
        let status = tenant.status.as_ref()?;
        let server = server?;
        let data = secret?.data.as_ref()?;
        let text = |key: &str| {
            let bytes = data.get(key)?;
            String::from_utf8(bytes.0.clone())
                .ok()
                .filter(|s| !s.is_empty())
        };
        let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        let owner = nonempty(&status.role)?;
        let logins = contract::login_roles(&owner);
        let user = text(contract::keys::USER)
            .filter(|user| *user == owner || logins.contains(user))
            .unwrap_or_else(|| owner.clone());
        Some(Upstream {
            host: server.spec.host.clone(),
            port: u16::try_from(server.spec.port).ok().filter(|&p| p != 0)?,
            database: nonempty(&status.database)?,
            user,
            password: text(PASSWORD_KEY)?,
            // A rotation's previous password (during the overlap) and next one (a moment before
            // the Secret switches to it).
            other_passwords: [
                contract::keys::PREVIOUS_PASSWORD,
                contract::keys::NEXT_PASSWORD,
            ]
            .into_iter()
            .filter_map(text)
            .collect(),
            tls: match server.spec.ssl_mode {
                SslMode::Disable => UpstreamTls::Disable,
                SslMode::Prefer => UpstreamTls::Prefer,
                SslMode::Require => UpstreamTls::Require,
            },
            server: Some((
                server.name_any(),
                usize::try_from(server.spec.max_connections)
                    .unwrap_or(1)
                    .max(1),
            )),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use silo_crds::{TenantSpec, TenantStatus};

    fn tenant(namespace: &str, name: &str, phase: Option<TenantPhase>) -> Tenant {
        let mut t = Tenant::new(
            name,
            TenantSpec {
                connection_limit: 7,
                ..Default::default()
            },
        );
        t.metadata.namespace = Some(namespace.into());
        t.status = Some(TenantStatus {
            phase,
            server: Some("pg-1".into()),
            database: Some(format!("t_{namespace}_{name}")),
            role: Some(format!("r_{namespace}_{name}")),
            secret_name: Some(format!("{name}-db")),
            ..Default::default()
        });
        t
    }

    fn ready() -> Tenant {
        tenant("prod", "acme", Some(TenantPhase::Ready))
    }

    fn server() -> DatabaseServer {
        let spec = serde_json::from_value(serde_json::json!({
            "host": "pg-1.db.svc",
            "port": 5433,
            "adminSecretRef": {"namespace": "silo", "name": "pg-1-admin"},
            "sslMode": "Require",
            "maxConnections": 50,
        }))
        .unwrap_or_else(|e| panic!("a valid DatabaseServer spec: {e}"));
        DatabaseServer::new("pg-1", spec)
    }

    fn secret(namespace: &str, name: &str, data: &[(&str, &str)]) -> Secret {
        let data = data
            .iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect();
        let mut s = Secret {
            data: Some(data),
            ..Default::default()
        };
        s.metadata.namespace = Some(namespace.into());
        s.metadata.name = Some(format!("{name}-db"));
        s
    }

    /// What the controller writes, with host, port, dbname and user pointing elsewhere, as anyone
    /// allowed to edit the Secret could make them.
    fn tampered_secret() -> Secret {
        secret(
            "prod",
            "acme",
            &[
                ("host", "10.6.6.6"),
                ("port", "6666"),
                ("dbname", "postgres"),
                ("user", "postgres"),
                ("password", "pw"),
            ],
        )
    }

    fn route(tenant: &Tenant, secret: Option<&Secret>) -> Option<TenantRoute> {
        route_for(tenant, Some(&server()), secret, 20)
    }

    /// A rotated tenant logs in as the login role its Secret names, one of its own two; a role
    /// of anyone else's typed there counts as the owner. Its previous and next passwords are
    /// accepted from clients.
    #[test]
    fn a_rotated_tenant_logs_in_as_its_own_login_role_only() {
        let rotating = secret(
            "prod",
            "acme",
            &[
                ("user", "r_prod_acme_b"),
                ("password", "new"),
                ("previous-user", "r_prod_acme_a"),
                ("previous-password", "old"),
            ],
        );
        let r = route(&ready(), Some(&rotating)).unwrap_or_else(|| unreachable!());
        assert_eq!(
            (r.user.as_str(), r.password.as_str()),
            ("r_prod_acme_b", "new")
        );
        assert_eq!(r.passwords().collect::<Vec<_>>(), ["new", "old"]);

        let foreign = secret(
            "prod",
            "acme",
            &[
                ("user", "r_prod_other_a"),
                ("password", "pw"),
                ("next-password", "soon"),
            ],
        );
        let r = route(&ready(), Some(&foreign)).unwrap_or_else(|| unreachable!());
        assert_eq!(r.user, "r_prod_acme");
        assert_eq!(r.passwords().collect::<Vec<_>>(), ["pw", "soon"]);
        // Same place, other credentials: the same pool goes on.
        let plain = route(
            &ready(),
            Some(&secret("prod", "acme", &[("password", "pw")])),
        )
        .unwrap_or_else(|| unreachable!());
        assert!(plain.same_but_credentials(&r));
        assert!(!plain.same_but_credentials(
            &route(&tenant("prod", "acme", None), None).unwrap_or_else(|| unreachable!())
        ));
    }

    #[test]
    fn ready_tenant_routes_to_its_server_with_its_status_names() {
        let password_only = secret("prod", "acme", &[("password", "pw")]);
        let r = route(&ready(), Some(&password_only)).unwrap_or_else(|| unreachable!());
        assert_eq!(
            (r.key().as_str(), r.state, r.connection_limit),
            ("prod.acme", TenantState::Ready, 7)
        );
        assert_eq!(
            (r.host.as_str(), r.port, r.upstream_tls),
            ("pg-1.db.svc", 5433, UpstreamTls::Require)
        );
        assert_eq!(
            (r.database.as_str(), r.user.as_str(), r.password.as_str()),
            ("t_prod_acme", "r_prod_acme", "pw")
        );
        assert_eq!(r.server, Some(("pg-1".to_string(), 50)));
    }

    #[test]
    fn secret_cannot_steer_the_route() {
        let password_only = secret("prod", "acme", &[("password", "pw")]);
        assert_eq!(
            route(&ready(), Some(&tampered_secret())),
            route(&ready(), Some(&password_only)),
            "host, port, dbname and user in the Secret are ignored"
        );
    }

    #[test]
    fn ready_tenant_missing_a_piece_is_pending() {
        let full = || Some(tampered_secret());
        let with_status = |edit: fn(&mut TenantStatus)| {
            let mut t = ready();
            if let Some(status) = t.status.as_mut() {
                edit(status);
            }
            t
        };
        let with_port = |port: i32| {
            let mut s = server();
            s.spec.port = port;
            s
        };
        let cases: [(&str, Tenant, Option<DatabaseServer>, Option<Secret>); 9] = [
            ("no DatabaseServer", ready(), None, full()),
            (
                "no database in status",
                with_status(|s| s.database = None),
                Some(server()),
                full(),
            ),
            (
                "empty database in status",
                with_status(|s| s.database = Some(String::new())),
                Some(server()),
                full(),
            ),
            (
                "no role in status",
                with_status(|s| s.role = None),
                Some(server()),
                full(),
            ),
            ("no Secret", ready(), Some(server()), None),
            (
                "no password in the Secret",
                ready(),
                Some(server()),
                Some(secret("prod", "acme", &[("host", "h"), ("user", "u")])),
            ),
            (
                "empty password",
                ready(),
                Some(server()),
                Some(secret("prod", "acme", &[("password", "")])),
            ),
            (
                "password not UTF-8",
                ready(),
                Some(server()),
                Some({
                    let mut s = secret("prod", "acme", &[]);
                    s.data = Some([("password".to_string(), ByteString(vec![0xff]))].into());
                    s
                }),
            ),
            (
                "port out of range",
                ready(),
                Some(with_port(70_000)),
                full(),
            ),
        ];
        for (case, tenant, server, secret) in cases {
            let r = route_for(&tenant, server.as_ref(), secret.as_ref(), 20);
            assert_eq!(r.map(|r| r.state), Some(TenantState::Pending), "{case}");
        }
    }

    #[test]
    fn states_follow_spec_status_and_deletion() {
        let full = tampered_secret();
        let state = |t: &Tenant| route(t, Some(&full)).map(|r| r.state);
        let mut suspended = ready();
        suspended.spec.suspended = true;
        let mut deleting = ready();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        let cases = [
            ("ready", ready(), TenantState::Ready),
            ("spec wins at once", suspended, TenantState::Suspended),
            ("deleting", deleting, TenantState::Deleting),
            (
                "provisioning",
                tenant("prod", "acme", Some(TenantPhase::Provisioning)),
                TenantState::Pending,
            ),
            (
                "no status",
                {
                    let mut t = ready();
                    t.status = None;
                    t
                },
                TenantState::Pending,
            ),
        ];
        for (case, tenant, expected) in cases {
            assert_eq!(state(&tenant), Some(expected), "{case}");
        }
    }

    fn store<K>(objects: Vec<K>) -> Store<K>
    where
        K: Resource<DynamicType = ()> + Clone + 'static,
    {
        let (store, mut writer) = reflector::store();
        for object in objects {
            writer.apply_watcher_event(&watcher::Event::Apply(object));
        }
        store
    }

    #[test]
    fn table_spans_the_stores_of_every_namespace() {
        let stores = Stores {
            tenants: vec![
                store(vec![tenant("a", "one", Some(TenantPhase::Ready))]),
                store(vec![
                    tenant("b", "two", Some(TenantPhase::Ready)),
                    tenant("b", "three", Some(TenantPhase::Ready)),
                ]),
            ],
            secrets: vec![
                store(vec![secret("a", "one", &[("password", "p1")])]),
                // `three`'s Secret exists only in another namespace: it is not three's.
                store(vec![
                    secret("b", "two", &[("password", "p2")]),
                    secret("a", "three", &[("password", "p3")]),
                ]),
            ],
            servers: store(vec![server()]),
        };
        let table = build_table(&stores, 20);
        let mut seen: Vec<(String, TenantState, String)> = table
            .routes()
            .map(|r| (r.key(), r.state, r.password.clone()))
            .collect();
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            seen,
            [
                ("a.one".to_string(), TenantState::Ready, "p1".to_string()),
                ("b.three".to_string(), TenantState::Pending, String::new()),
                ("b.two".to_string(), TenantState::Ready, "p2".to_string()),
            ]
        );
    }

    #[test]
    fn tenant_placed_on_an_unknown_server_is_pending() {
        let mut t = ready();
        if let Some(status) = t.status.as_mut() {
            status.server = Some("pg-gone".into());
        }
        let stores = Stores {
            tenants: vec![store(vec![t])],
            secrets: vec![store(vec![tampered_secret()])],
            servers: store(vec![server()]),
        };
        let table = build_table(&stores, 20);
        let states: Vec<TenantState> = table.routes().map(|r| r.state).collect();
        assert_eq!(states, [TenantState::Pending]);
    }
}
