//! Tenants from Kubernetes: Tenants, their credentials Secrets and DatabaseServers, watched live.
//! The first full list builds the whole routing table; after that each batch of watch events
//! recomputes the routes of the tenants it touches only (a Tenant, the tenant owning a Secret, the
//! tenants on a DatabaseServer) and puts them in force. A tenant that stops being Ready has its
//! sessions ended.
//!
//! Where a tenant's connections go is decided only by what the tenant's own users cannot write:
//! the cluster-scoped DatabaseServer the tenant is placed on (host, port, TLS, connection budget)
//! and the Tenant's status (database and role names, written by the controller through the status
//! subresource). The tenant's Secret, which anyone allowed to edit Secrets in its namespace can
//! change, gives the password, and which of the tenant's own roles logs in (its owner role or one
//! of its two login roles, see `contract::login_roles`; any other name counts as the owner); a
//! Secret naming another host or another tenant's role cannot send the router there.

use std::collections::{BTreeSet, HashMap};
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
use crate::routing::{RouteChange, RoutingTable, TenantRoute, TenantState};
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
    let mut routes = Routes::new(default_limit);
    let mut loaded = false;
    loop {
        let batch = tokio::select! {
            _ = shutdown.cancelled() => return,
            batch = events.next() => match batch {
                Some(batch) => batch,
                None => return,
            },
        };
        let mut touched = Vec::with_capacity(batch.len());
        for event in batch {
            match event {
                Ok(t) => touched.push(t),
                Err(e) => warn!(error = %e, "kubernetes watch error; retrying"),
            }
        }
        if !stores.are_ready() {
            continue;
        }
        // A relist replaces a store wholesale, and what vanished meanwhile sent no event of its
        // own: the whole table then, as for the first load.
        if !loaded || touched.contains(&Touched::Relisted) {
            let table = routes.full(&stores);
            if !loaded {
                info!(
                    tenants = table.len(),
                    namespaces = %scope_description(&namespaces),
                    "tenants loaded from kubernetes"
                );
                loaded = true;
                ready.cancel();
            }
            shared.set_table(table);
        } else {
            shared.update_routes(routes.changes(&stores, &touched));
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

/// A Tenant, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct TenantId {
    namespace: String,
    name: String,
}

impl TenantId {
    fn of(tenant: &Tenant) -> Option<TenantId> {
        Some(TenantId {
            namespace: tenant.namespace()?,
            name: tenant.name_any(),
        })
    }

    /// Its key in the routing table.
    fn key(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }
}

/// What one watch event touched.
#[derive(Debug, PartialEq, Eq)]
enum Touched {
    Tenant(TenantId),
    /// The credentials Secret of this tenant (by the Secret's name, see `contract::secret_name`).
    Secret(TenantId),
    Server(String),
    /// A watch listed everything anew, and its store was replaced.
    Relisted,
    Nothing,
}

impl Touched {
    fn tenant(tenant: &Tenant) -> Touched {
        TenantId::of(tenant).map_or(Touched::Nothing, Touched::Tenant)
    }

    fn secret(secret: &Secret) -> Touched {
        let name = secret.name_any();
        match (secret.namespace(), contract::secret_tenant(&name)) {
            (Some(namespace), Some(tenant)) => Touched::Secret(TenantId {
                namespace,
                name: tenant.to_string(),
            }),
            _ => Touched::Nothing,
        }
    }

    fn server(server: &DatabaseServer) -> Touched {
        Touched::Server(server.name_any())
    }
}

/// Keeps the routing table in step with the stores, tenant by tenant: from the watch events of a
/// batch, the tenants they touch, and only those tenants' routes recomputed.
struct Routes {
    default_limit: usize,
    /// The tenants on each DatabaseServer (by the server their status names), so that a change to
    /// a server reaches its tenants.
    on_server: HashMap<String, BTreeSet<TenantId>>,
}

impl Routes {
    fn new(default_limit: usize) -> Self {
        Routes {
            default_limit,
            on_server: HashMap::new(),
        }
    }

    /// The whole table, as on the first load.
    fn full(&mut self, stores: &Stores) -> RoutingTable {
        self.on_server.clear();
        for tenant in stores.tenants() {
            if let (Some(id), Some(server)) = (TenantId::of(&tenant), server_of(&tenant)) {
                self.on_server
                    .entry(server.to_string())
                    .or_default()
                    .insert(id);
            }
        }
        build_table(stores, self.default_limit)
    }

    /// The new routes of the tenants `touched` names, from the stores as they are now (the
    /// tenant gone: `None`); unchanged ones too, which the table leaves as they are.
    fn changes(&mut self, stores: &Stores, touched: &[Touched]) -> Vec<RouteChange> {
        let mut tenants = BTreeSet::new();
        for t in touched {
            match t {
                Touched::Tenant(id) | Touched::Secret(id) => {
                    tenants.insert(id.clone());
                }
                Touched::Server(server) => {
                    tenants.extend(self.on_server.get(server).into_iter().flatten().cloned());
                }
                Touched::Relisted | Touched::Nothing => {}
            }
        }
        tenants
            .into_iter()
            .map(|id| {
                let tenant = stores.tenant(&id);
                self.place(&id, tenant.as_deref().and_then(server_of));
                let route = tenant.and_then(|t| route_in(stores, &t, self.default_limit));
                (id.key(), route)
            })
            .collect()
    }

    /// Records which server the tenant is on now, if any.
    fn place(&mut self, id: &TenantId, server: Option<&str>) {
        self.on_server.retain(|s, tenants| {
            if Some(s.as_str()) != server {
                tenants.remove(id);
            }
            !tenants.is_empty()
        });
        if let Some(server) = server {
            self.on_server
                .entry(server.to_string())
                .or_default()
                .insert(id.clone());
        }
    }
}

/// The DatabaseServer the tenant's status names.
fn server_of(tenant: &Tenant) -> Option<&str> {
    tenant.status.as_ref()?.server.as_deref()
}

/// What the watches have seen. Tenants and Secrets have one store per watched namespace (or one
/// for the whole cluster): a reflector store is replaced wholesale each time its watch (re)lists,
/// so watches of several namespaces cannot share a store without erasing each other.
pub struct Stores {
    tenants: Vec<Store<Tenant>>,
    secrets: Vec<Store<Secret>>,
    servers: Store<DatabaseServer>,
}

type WatchEvents = BoxStream<'static, Result<Touched, watcher::Error>>;

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
            let config = watcher::Config::default();
            let (store, watch) = reflected(scoped(client, scope), config, Touched::tenant);
            tenants.push(store);
            events.push(watch);
            let config = watcher::Config::default().labels(SECRET_SELECTOR);
            let (store, watch) = reflected(scoped(client, scope), config, Touched::secret);
            secrets.push(store);
            events.push(watch);
        }
        let config = watcher::Config::default();
        let (servers, watch) = reflected(Api::all(client.clone()), config, Touched::server);
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

    fn tenant(&self, id: &TenantId) -> Option<Arc<Tenant>> {
        let key = ObjectRef::new(&id.name).within(&id.namespace);
        self.tenants.iter().find_map(|store| store.get(&key))
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

/// A store, and what each watch event that fills it touched (`touched` of the object).
fn reflected<K>(
    api: Api<K>,
    config: watcher::Config,
    touched: fn(&K) -> Touched,
) -> (Store<K>, WatchEvents)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let events = watcher(api, config)
        .default_backoff()
        // What each cached object costs: its managed fields are never read.
        .modify(|object| object.managed_fields_mut().clear())
        .reflect(writer)
        .map(move |e| e.map(|event| touched_by(&event, touched)))
        .boxed();
    (store, events)
}

/// What a watch event touched. The objects of a (re)list reach the store all at once, at its end.
fn touched_by<K>(event: &watcher::Event<K>, touched: fn(&K) -> Touched) -> Touched {
    match event {
        watcher::Event::Apply(object) | watcher::Event::Delete(object) => touched(object),
        watcher::Event::InitDone => Touched::Relisted,
        watcher::Event::Init | watcher::Event::InitApply(_) => Touched::Nothing,
    }
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
    RoutingTable::new(
        stores
            .tenants()
            .filter_map(|tenant| route_in(stores, &tenant, default_limit)),
    )
}

/// The tenant's route, with its Secret and server from the stores.
fn route_in(stores: &Stores, tenant: &Tenant, default_limit: usize) -> Option<TenantRoute> {
    let namespace = tenant.namespace()?;
    let secret = stores.secret(&namespace, &contract::secret_name(&tenant.name_any()));
    let server = server_of(tenant).and_then(|name| stores.server(name));
    route_for(tenant, server.as_deref(), secret.as_deref(), default_limit)
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

    /// Stores of one namespace fed watch events as the watches feed them, and the table kept
    /// from them tenant by tenant.
    struct Live {
        stores: Stores,
        tenants: reflector::store::Writer<Tenant>,
        secrets: reflector::store::Writer<Secret>,
        servers: reflector::store::Writer<DatabaseServer>,
        routes: Routes,
        table: RoutingTable,
        touched: Vec<Touched>,
    }

    fn listed<K>(objects: Vec<K>) -> (Store<K>, reflector::store::Writer<K>)
    where
        K: Resource<DynamicType = ()> + Clone + 'static,
    {
        let (store, mut writer) = reflector::store();
        writer.apply_watcher_event(&watcher::Event::Init);
        for object in objects {
            writer.apply_watcher_event(&watcher::Event::InitApply(object));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        (store, writer)
    }

    impl Live {
        fn new(tenants: Vec<Tenant>, secrets: Vec<Secret>, servers: Vec<DatabaseServer>) -> Live {
            let (tenant_store, tenants) = listed(tenants);
            let (secret_store, secrets) = listed(secrets);
            let (server_store, servers) = listed(servers);
            let stores = Stores {
                tenants: vec![tenant_store],
                secrets: vec![secret_store],
                servers: server_store,
            };
            assert!(stores.are_ready());
            let mut routes = Routes::new(20);
            let table = routes.full(&stores);
            Live {
                stores,
                tenants,
                secrets,
                servers,
                routes,
                table,
                touched: Vec::new(),
            }
        }

        fn tenant(&mut self, event: watcher::Event<Tenant>) {
            self.tenants.apply_watcher_event(&event);
            self.touched.push(touched_by(&event, Touched::tenant));
        }

        fn secret(&mut self, event: watcher::Event<Secret>) {
            self.secrets.apply_watcher_event(&event);
            self.touched.push(touched_by(&event, Touched::secret));
        }

        fn server(&mut self, event: watcher::Event<DatabaseServer>) {
            self.servers.apply_watcher_event(&event);
            self.touched.push(touched_by(&event, Touched::server));
        }

        /// The batch so far put in force; the keys of the tenants whose route changed.
        fn batch(&mut self) -> Vec<String> {
            let touched = std::mem::take(&mut self.touched);
            let changes = self.routes.changes(&self.stores, &touched);
            let mut changed: Vec<String> = self
                .table
                .apply(changes)
                .into_iter()
                .map(|(key, _)| key)
                .collect();
            changed.sort();
            changed
        }

        fn route(&self, key: &str) -> Arc<TenantRoute> {
            self.table
                .get(key)
                .cloned()
                .unwrap_or_else(|| panic!("{key} in the table"))
        }
    }

    fn fleet(n: usize) -> Live {
        let names: Vec<String> = (0..n).map(|i| format!("t{i:03}")).collect();
        Live::new(
            names
                .iter()
                .map(|n| tenant("prod", n, Some(TenantPhase::Ready)))
                .collect(),
            names
                .iter()
                .map(|n| secret("prod", n, &[("password", "pw")]))
                .collect(),
            vec![server(), server_named("pg-2", 10)],
        )
    }

    fn server_named(name: &str, max_connections: i32) -> DatabaseServer {
        let mut s = server();
        s.metadata.name = Some(name.into());
        s.spec.max_connections = max_connections;
        s
    }

    fn on_server(mut t: Tenant, server: &str) -> Tenant {
        if let Some(status) = t.status.as_mut() {
            status.server = Some(server.into());
        }
        t
    }

    #[test]
    fn a_secret_names_the_tenant_it_belongs_to() {
        let mut s = secret("prod", "acme-db", &[]);
        assert_eq!(
            Touched::secret(&s),
            Touched::Secret(TenantId {
                namespace: "prod".into(),
                name: "acme-db".into()
            })
        );
        s.metadata.name = Some("unrelated".into());
        assert_eq!(Touched::secret(&s), Touched::Nothing);
        assert_eq!(
            touched_by(&watcher::Event::InitDone, Touched::secret),
            Touched::Relisted
        );
    }

    #[test]
    fn one_tenant_changed_among_many_leaves_the_other_routes_alone() {
        let mut live = fleet(200);
        let before = live.table.clone();
        let mut suspended = tenant("prod", "t042", Some(TenantPhase::Ready));
        suspended.spec.suspended = true;
        live.tenant(watcher::Event::Apply(suspended));
        // An event that changes nothing the router reads changes no route.
        live.tenant(watcher::Event::Apply(tenant(
            "prod",
            "t007",
            Some(TenantPhase::Ready),
        )));
        assert_eq!(live.batch(), ["prod.t042"]);
        assert_eq!(live.route("prod.t042").state, TenantState::Suspended);
        for route in before.routes().filter(|r| r.name != "t042") {
            assert!(
                Arc::ptr_eq(route, &live.route(&route.key())),
                "{}",
                route.key()
            );
        }
    }

    #[test]
    fn a_server_change_updates_only_its_tenants() {
        let mut live = fleet(6);
        for name in ["t001", "t004"] {
            let moved = on_server(tenant("prod", name, Some(TenantPhase::Ready)), "pg-2");
            live.tenant(watcher::Event::Apply(moved));
        }
        assert_eq!(live.batch(), ["prod.t001", "prod.t004"]);
        let before = live.table.clone();

        live.server(watcher::Event::Apply(server_named("pg-2", 30)));
        assert_eq!(live.batch(), ["prod.t001", "prod.t004"]);
        assert_eq!(live.route("prod.t004").server, Some(("pg-2".into(), 30)));
        for route in before
            .routes()
            .filter(|r| r.name != "t001" && r.name != "t004")
        {
            assert!(
                Arc::ptr_eq(route, &live.route(&route.key())),
                "{}",
                route.key()
            );
        }

        // A server gone leaves its tenants pending; back, they are Ready again.
        live.server(watcher::Event::Delete(server_named("pg-2", 30)));
        assert_eq!(live.batch(), ["prod.t001", "prod.t004"]);
        assert_eq!(live.route("prod.t001").state, TenantState::Pending);
        // A tenant placed on a server not known yet is reached when the server comes.
        let waiting = on_server(tenant("prod", "t002", Some(TenantPhase::Ready)), "pg-3");
        live.tenant(watcher::Event::Apply(waiting));
        assert_eq!(live.batch(), ["prod.t002"]);
        live.server(watcher::Event::Apply(server_named("pg-3", 5)));
        assert_eq!(live.batch(), ["prod.t002"]);
        assert_eq!(live.route("prod.t002").state, TenantState::Ready);
    }

    #[test]
    fn a_deleted_secret_makes_its_tenant_pending() {
        let mut live = fleet(3);
        live.secret(watcher::Event::Delete(secret("prod", "t001", &[])));
        assert_eq!(live.batch(), ["prod.t001"]);
        assert_eq!(live.route("prod.t001").state, TenantState::Pending);
        live.secret(watcher::Event::Apply(secret(
            "prod",
            "t001",
            &[("password", "new")],
        )));
        assert_eq!(live.batch(), ["prod.t001"]);
        let r = live.route("prod.t001");
        assert_eq!((r.state, r.password.as_str()), (TenantState::Ready, "new"));

        live.tenant(watcher::Event::Delete(tenant("prod", "t002", None)));
        assert_eq!(live.batch(), ["prod.t002"]);
        assert!(live.table.get("prod.t002").is_none());
        assert_eq!(live.table.lookup("t002"), crate::routing::Lookup::Unknown);
    }

    /// Any sequence of watch events, put in force batch by batch tenant by tenant, leaves the
    /// table a full rebuild from the same stores gives, and the server index in step.
    #[test]
    fn the_table_kept_tenant_by_tenant_equals_a_full_rebuild() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let names = ["acme", "beta", "gamma", "delta", "eps"];
        let namespaces = ["prod", "dev"];
        let servers = ["pg-1", "pg-2", "pg-3"];
        let hosts = ["a.example.com", "b.example.com"];
        let mut live = Live::new(Vec::new(), Vec::new(), Vec::new());
        for round in 0..400 {
            for _ in 0..rng.random_range(1..6) {
                let ns = namespaces[rng.random_range(0..namespaces.len())];
                let name = names[rng.random_range(0..names.len())];
                let server_name = servers[rng.random_range(0..servers.len())];
                match rng.random_range(0..7) {
                    0 | 1 => {
                        let phases = [Some(TenantPhase::Ready), Some(TenantPhase::Suspended), None];
                        let phase = phases[rng.random_range(0..phases.len())];
                        let mut t = on_server(tenant(ns, name, phase), server_name);
                        t.spec.suspended = rng.random_bool(0.2);
                        t.spec.connection_limit = rng.random_range(1..4);
                        if rng.random_bool(0.5) {
                            t.spec.routing = Some(silo_crds::RoutingSpec {
                                hosts: vec![hosts[rng.random_range(0..hosts.len())].into()],
                                path_prefixes: Vec::new(),
                            });
                        }
                        t.metadata.creation_timestamp =
                            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                                k8s_openapi::jiff::Timestamp::from_second(rng.random_range(0..5))
                                    .unwrap_or_else(|e| panic!("{e}")),
                            ));
                        live.tenant(watcher::Event::Apply(t));
                    }
                    2 => live.tenant(watcher::Event::Delete(tenant(ns, name, None))),
                    3 => {
                        let password = format!("pw{}", rng.random_range(0..3));
                        live.secret(watcher::Event::Apply(secret(
                            ns,
                            name,
                            &[("password", &password)],
                        )));
                    }
                    4 => live.secret(watcher::Event::Delete(secret(ns, name, &[]))),
                    5 => live.server(watcher::Event::Apply(server_named(
                        server_name,
                        rng.random_range(1..4),
                    ))),
                    _ => live.server(watcher::Event::Delete(server_named(server_name, 1))),
                }
            }
            live.batch();
            assert_eq!(live.table, build_table(&live.stores, 20), "round {round}");
            let mut index = Routes::new(20);
            index.full(&live.stores);
            assert_eq!(live.routes.on_server, index.on_server, "round {round}");
            for host in hosts {
                assert_eq!(
                    live.table.resolve(Some(host), None),
                    build_table(&live.stores, 20).resolve(Some(host), None)
                );
            }
        }
        assert!(live.table.len() > 3, "the sequence made a fleet");
    }
}
