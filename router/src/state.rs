//! State shared by every client session: the routing table, the pools, the settings, the login
//! slots and SCRAM salts, the cancel keys handed out, the other replicas, and a token per tenant that ends its
//! sessions when it stops being Ready.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::accept::admission::LoginSlots;
use crate::login::auth::Scram;
use crate::peers::Peers;
use crate::pools::Pools;
use crate::routing::{RouteChange, RoutingTable, TenantRoute, TenantState};

/// When a server connection goes back to the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PoolMode {
    /// At the end of the client's session, after `DISCARD ALL`.
    Session,
    /// Whenever the server is idle between transactions.
    Transaction,
}

#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) mode: PoolMode,
    pub(crate) checkout_timeout: Duration,
    pub(crate) startup_timeout: Duration,
    /// TLS toward clients, when a certificate is configured.
    pub(crate) tls: Option<tokio_rustls::TlsAcceptor>,
    /// With TLS, SNI `tenant.<domain>` names the tenant.
    pub(crate) sni_domain: Option<String>,
    /// Refuse clients that do not ask for TLS (28000). Cancel requests may still come in
    /// plaintext, as PostgreSQL takes them: their random key is their credential, and libpq
    /// before version 17 sends them unencrypted.
    pub(crate) require_tls: bool,
    /// How many connections may be logging in at once (see [`crate::accept::admission`]).
    pub(crate) max_logins: usize,
}

/// State shared by every client session.
pub struct Shared {
    pub(crate) table: Arc<ArcSwap<RoutingTable>>,
    pub(crate) pools: Pools,
    pub(crate) settings: Settings,
    pub(crate) metrics: crate::metrics::Metrics,
    pub(crate) scram: Scram,
    pub(crate) login_slots: Arc<LoginSlots>,
    pub(crate) cancels: Cancels,
    /// The router's other replicas, for cancel requests and server budgets.
    pub(crate) peers: Arc<Peers>,
    /// Per tenant, a token its sessions watch: cancelled when the tenant stops being Ready.
    tenant_sessions: Mutex<HashMap<String, CancellationToken>>,
}

impl Shared {
    pub(crate) fn new(
        table: Arc<ArcSwap<RoutingTable>>,
        settings: Settings,
        peers: Arc<Peers>,
    ) -> Self {
        Shared {
            table,
            pools: Pools::new(peers.clone()),
            peers,
            login_slots: LoginSlots::new(settings.max_logins),
            settings,
            metrics: Default::default(),
            scram: Scram::default(),
            cancels: Cancels::default(),
            tenant_sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Puts a new routing table in force, and ends the sessions of tenants that were Ready and
    /// no longer are (suspended, being deleted, gone).
    pub(crate) fn set_table(&self, table: RoutingTable) {
        // New credentials reach the pools before any login can read them from the table.
        self.pools.refresh_credentials(&table);
        let old = self.table.swap(Arc::new(table));
        let new = self.table.load();
        let live: HashSet<String> = new.routes().map(|r| r.key()).collect();
        self.pools.set_limits(
            new.routes()
                .filter_map(|r| r.server.as_ref())
                .map(|(server, limit)| (server.as_str(), *limit)),
        );
        // Keys of a tenant's other passwords are cached as `<key> <n>` (see login).
        self.scram
            .retain(|tenant| live.contains(tenant.split(' ').next().unwrap_or(tenant)));
        self.end_sessions_no_longer_ready(old.routes(), &new);
    }

    /// `set_table` for some tenants only: puts their new routes in force (`None`: the tenant is
    /// gone) with the same effects on pools, SCRAM keys and sessions, and leaves every other
    /// route as it is. The table has one writer, the tenant source, so load-change-store is safe.
    pub(crate) fn update_routes(&self, changes: Vec<RouteChange>) {
        let mut table = RoutingTable::clone(&self.table.load());
        let changed = table.apply(changes);
        if changed.is_empty() {
            return;
        }
        let now = || changed.iter().filter_map(|(key, _)| table.get(key));
        for route in now() {
            self.pools.refresh_credentials_of(route);
        }
        self.pools.set_limits(
            now()
                .filter_map(|r| r.server.as_ref())
                .map(|(server, limit)| (server.as_str(), *limit)),
        );
        let gone: HashSet<&str> = changed
            .iter()
            .map(|(key, _)| key.as_str())
            .filter(|key| table.get(key).is_none())
            .collect();
        self.table.store(Arc::new(table));
        if !gone.is_empty() {
            self.scram
                .retain(|tenant| !gone.contains(tenant.split(' ').next().unwrap_or(tenant)));
        }
        let new = self.table.load();
        self.end_sessions_no_longer_ready(changed.iter().filter_map(|(_, r)| r.as_ref()), &new);
    }

    /// Of the routes `before`, ends the sessions of those that were Ready and are not in `now`.
    fn end_sessions_no_longer_ready<'a>(
        &self,
        before: impl Iterator<Item = &'a Arc<TenantRoute>>,
        now: &RoutingTable,
    ) {
        let mut sessions = lock(&self.tenant_sessions);
        for route in before.filter(|r| r.state == TenantState::Ready) {
            let key = route.key();
            let still_ready = now.get(&key).is_some_and(|r| r.state == TenantState::Ready);
            if !still_ready && let Some(token) = sessions.remove(&key) {
                info!(tenant = %key, "tenant no longer ready; ending its sessions");
                token.cancel();
            }
        }
    }

    /// A token for a session of the tenant, cancelled when the tenant stops being Ready.
    pub(crate) fn sessions_of(&self, route: &TenantRoute) -> CancellationToken {
        lock(&self.tenant_sessions)
            .entry(route.key())
            .or_default()
            .child_token()
    }
}

/// A server backend's cancel key: its address, and the pid and key from its BackendKeyData.
type ServerKey = (SocketAddr, i32, i32);

/// Where one client's cancel requests go: the server running its query, if any.
#[derive(Clone, Default)]
pub(crate) struct CancelTarget(Arc<Mutex<Option<ServerKey>>>);

impl CancelTarget {
    /// The client's queries run on this server backend from now on.
    pub(crate) fn set(&self, addr: SocketAddr, pid: i32, key: i32) {
        *lock(&self.0) = Some((addr, pid, key));
    }

    /// The client holds no server.
    pub(crate) fn clear(&self) {
        *lock(&self.0) = None;
    }

    fn get(&self) -> Option<ServerKey> {
        *lock(&self.0)
    }
}

/// The cancel keys handed to clients (the router's own, in their BackendKeyData), each with where
/// its client's cancel requests go.
#[derive(Default)]
pub(crate) struct Cancels(Mutex<HashMap<(i32, i32), CancelTarget>>);

impl Cancels {
    /// A new key (pid, key) from `new_key`, unlike any in use, and its target: no server yet.
    /// The key is forgotten when the registration is dropped.
    pub(crate) fn register(&self, new_key: impl Fn() -> (i32, i32)) -> Registered<'_> {
        let target = CancelTarget::default();
        let mut cancels = lock(&self.0);
        loop {
            let (pid, key) = new_key();
            if let std::collections::hash_map::Entry::Vacant(e) = cancels.entry((pid, key)) {
                e.insert(target.clone());
                return Registered {
                    cancels: self,
                    pid,
                    key,
                    target,
                };
            }
        }
    }

    /// The server backend running the query of the client with this key, if any.
    pub(crate) fn lookup(&self, pid: i32, key: i32) -> Option<ServerKey> {
        lock(&self.0).get(&(pid, key)).and_then(CancelTarget::get)
    }
}

/// A client's cancel key, in force until dropped (the client is gone).
pub(crate) struct Registered<'a> {
    cancels: &'a Cancels,
    pub(crate) pid: i32,
    pub(crate) key: i32,
    pub(crate) target: CancelTarget,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        lock(&self.cancels.0).remove(&(self.pid, self.key));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::Peers;

    fn shared(routes: impl IntoIterator<Item = TenantRoute>) -> Shared {
        let settings = Settings {
            mode: PoolMode::Transaction,
            checkout_timeout: Duration::from_secs(1),
            startup_timeout: Duration::from_secs(1),
            tls: None,
            sni_domain: None,
            require_tls: false,
            max_logins: 8,
        };
        let table = Arc::new(ArcSwap::from_pointee(RoutingTable::new(routes)));
        Shared::new(table, settings, Arc::new(Peers::alone()))
    }

    fn route(name: &str, state: TenantState) -> TenantRoute {
        TenantRoute {
            namespace: "prod".into(),
            name: name.into(),
            host: "127.0.0.1".into(),
            port: 5432,
            database: format!("t_{name}"),
            user: format!("r_{name}"),
            password: "pw".into(),
            other_passwords: Vec::new(),
            connection_limit: 5,
            state,
            upstream_tls: Default::default(),
            server: Some(("pg-1".into(), 50)),
            hosts: vec![],
            path_prefixes: vec![],
            created: 0,
        }
    }

    /// Tenant by tenant, as with a whole table: one no longer Ready, or gone, has its sessions
    /// ended; a new password keeps the pool; every route not named stays as it was.
    #[test]
    fn updated_routes_end_sessions_and_keep_pools_as_a_new_table_does() {
        use crate::routing::Lookup;
        let names = ["acme", "beta", "gamma"];
        let shared = shared(names.map(|n| route(n, TenantState::Ready)));
        let routes = names.map(|n| match shared.table.load().lookup(n) {
            Lookup::Found(route) => route,
            other => panic!("{n}: {other:?}"),
        });
        let sessions = routes.clone().map(|r| shared.sessions_of(&r));
        let pool = shared.pools.get(&routes[2]);

        let rotated = TenantRoute {
            password: "new".into(),
            ..route("gamma", TenantState::Ready)
        };
        shared.update_routes(vec![
            (
                "prod.acme".into(),
                Some(route("acme", TenantState::Suspended)),
            ),
            ("prod.beta".into(), None),
            ("prod.gamma".into(), Some(rotated.clone())),
        ]);
        let cancelled = sessions.each_ref().map(|s| s.is_cancelled());
        assert_eq!(cancelled, [true, true, false]);
        let table = shared.table.load();
        assert!(table.get("prod.beta").is_none());
        assert_eq!(table.lookup("beta"), Lookup::Unknown);
        assert!(Arc::ptr_eq(&shared.pools.get(&Arc::new(rotated)), &pool));

        // A route equal to the one in force is left as it is.
        shared.update_routes(vec![(
            "prod.gamma".into(),
            table.get("prod.gamma").map(|r| TenantRoute::clone(r)),
        )]);
        let after = shared.table.load();
        assert!(Arc::ptr_eq(&after, &table), "nothing changed, no new table");
    }

    #[test]
    fn cancel_keys_lead_to_the_server_running_the_query() {
        let cancels = Cancels::default();
        let peers = Peers::alone();
        let client = cancels.register(|| peers.cancel_key());
        let other = cancels.register(|| peers.cancel_key());
        let (pid, key) = (client.pid, client.key);
        assert_ne!((pid, key), (other.pid, other.key));
        assert!(pid > 0 && peers.is_own(pid));
        assert_eq!(cancels.lookup(pid, key), None, "no server yet");

        let server: SocketAddr = ([127, 0, 0, 1], 5432).into();
        client.target.set(server, 42, 7);
        assert_eq!(cancels.lookup(pid, key), Some((server, 42, 7)));
        assert_eq!(cancels.lookup(other.pid, other.key), None);

        client.target.clear();
        assert_eq!(cancels.lookup(pid, key), None, "between transactions");
        client.target.set(server, 43, 8);
        drop(client);
        assert_eq!(cancels.lookup(pid, key), None, "the client is gone");
    }

    #[test]
    fn a_taken_key_is_never_handed_out_twice() {
        let cancels = Cancels::default();
        let keys = std::cell::Cell::new(0);
        // The first two draws are the same key; the second registration draws again.
        let draw = || {
            keys.set(keys.get() + 1);
            (1, if keys.get() <= 2 { 1 } else { 2 })
        };
        let first = cancels.register(draw);
        let second = cancels.register(draw);
        assert_eq!((first.key, second.key), (1, 2));
    }
}
