//! State shared by every client session: the routing table, the pools, the settings, the login
//! slots and SCRAM salts, the cancel keys handed out, and a token per tenant that ends its
//! sessions when it stops being Ready.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::accept::admission::LoginSlots;
use crate::login::auth::Scram;
use crate::pools::Pools;
use crate::routing::{Lookup, RoutingTable, TenantRoute, TenantState};

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
    /// Per tenant, a token its sessions watch: cancelled when the tenant stops being Ready.
    tenant_sessions: Mutex<HashMap<String, CancellationToken>>,
}

impl Shared {
    pub(crate) fn new(table: Arc<ArcSwap<RoutingTable>>, settings: Settings) -> Self {
        Shared {
            table,
            pools: Pools::default(),
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
        let old = self.table.swap(Arc::new(table));
        let new = self.table.load();
        let live: std::collections::HashSet<String> = new.routes().map(|r| r.key()).collect();
        self.scram.retain(|tenant| live.contains(tenant));
        let mut sessions = lock(&self.tenant_sessions);
        for route in old.routes().filter(|r| r.state == TenantState::Ready) {
            let still_ready = matches!(new.lookup(&route.key()), Lookup::Found(r) if r.state == TenantState::Ready);
            if !still_ready && let Some(token) = sessions.remove(&route.key()) {
                info!(tenant = %route.key(), "tenant no longer ready; ending its sessions");
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
    /// A new key (pid, key), unlike any in use, and its target: no server yet.
    pub(crate) fn register(&self) -> (i32, i32, CancelTarget) {
        use rand::Rng;
        let target = CancelTarget::default();
        let mut cancels = lock(&self.0);
        loop {
            let (pid, key) = (rand::rng().random_range(1..i32::MAX), rand::rng().random());
            if let std::collections::hash_map::Entry::Vacant(e) = cancels.entry((pid, key)) {
                e.insert(target.clone());
                return (pid, key, target);
            }
        }
    }

    /// The server backend running the query of the client with this key, if any.
    pub(crate) fn lookup(&self, pid: i32, key: i32) -> Option<ServerKey> {
        lock(&self.0).get(&(pid, key)).and_then(CancelTarget::get)
    }

    /// The client is gone: its key no longer cancels anything.
    pub(crate) fn remove(&self, pid: i32, key: i32) {
        lock(&self.0).remove(&(pid, key));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_keys_lead_to_the_server_running_the_query() {
        let cancels = Cancels::default();
        let (pid, key, target) = cancels.register();
        let (other_pid, other_key, _) = cancels.register();
        assert_ne!((pid, key), (other_pid, other_key));
        assert!(pid > 0);
        assert_eq!(cancels.lookup(pid, key), None, "no server yet");

        let server: SocketAddr = ([127, 0, 0, 1], 5432).into();
        target.set(server, 42, 7);
        assert_eq!(cancels.lookup(pid, key), Some((server, 42, 7)));
        assert_eq!(cancels.lookup(other_pid, other_key), None);

        target.clear();
        assert_eq!(cancels.lookup(pid, key), None, "between transactions");
        target.set(server, 43, 8);
        cancels.remove(pid, key);
        assert_eq!(cancels.lookup(pid, key), None, "the client is gone");
    }
}
