//! One pool of server connections per tenant: created on first use, capped by the tenant's
//! connection limit and by its server's budget ([`budget`]), with a checkout queue that times out.
//! The relay stage checks a connection out (opened by [`crate::backend`] when none is idle) and
//! releases it when the client is done with it. A checkout prefers an idle connection whose
//! session parameters already match the client's.

mod budget;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::backend::{ServerConn, ServerError};
use crate::peers::Peers;
use crate::routing::TenantRoute;
use crate::session::params::{ClientParams, Setting};
use budget::{ServerBudget, Slot};

#[derive(thiserror::Error, Debug)]
pub(crate) enum PoolError {
    #[error(
        "all {limit} connections of tenant \"{tenant}\" stayed busy for {waited:?} (its connection limit)"
    )]
    Exhausted {
        tenant: String,
        limit: usize,
        waited: Duration,
    },
    #[error(
        "DatabaseServer \"{server}\" has no connection to spare: this router replica holds its share, {share} of the server's {limit} (maxConnections, divided among the router's replicas and shared with the server's other tenants); waited {waited:?}"
    )]
    ServerBudget {
        server: String,
        share: usize,
        limit: usize,
        waited: Duration,
    },
    #[error(transparent)]
    Server(#[from] ServerError),
}

pub(crate) struct TenantPool {
    pub(crate) route: Arc<TenantRoute>,
    /// `route.key()`, made once: the budget asks by it on every release.
    key: String,
    /// The route with the routing table's latest credentials, which new server connections log
    /// in with (a rotated password changes only this: the pool and its connections stay). Set
    /// from the table alone ([`Pools::refresh_credentials`]), never from a login, whose route
    /// may be older.
    latest: ArcSwap<TenantRoute>,
    budget: Option<Arc<ServerBudget>>,
    /// Replaced by a pool for a changed route: its sessions go on, but what they release is
    /// closed (no one could use it, nor make room by closing it).
    retired: AtomicBool,
    idle: Mutex<Vec<Idle>>,
    permits: Arc<Semaphore>,
    /// What clients were told at login for the startup settings they sent, once a server took
    /// them: in transaction pooling, a client asking the same again needs no server to log in.
    established: Mutex<HashMap<Vec<Setting>, ClientParams>>,
}

/// An idle connection, with its place in the server's budget.
struct Idle {
    conn: ServerConn,
    _slot: Option<Slot>,
}

/// Distinct startup settings remembered per tenant; past this the memory starts over.
const MAX_ESTABLISHED: usize = 64;

impl TenantPool {
    fn new(route: Arc<TenantRoute>, budget: Option<Arc<ServerBudget>>) -> Self {
        let cap = route.connection_limit.max(1);
        TenantPool {
            key: route.key(),
            latest: ArcSwap::new(route.clone()),
            route,
            budget,
            retired: AtomicBool::new(false),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(cap)),
            established: Mutex::new(HashMap::new()),
        }
    }

    /// A connection for exclusive use until the guard is released or dropped: the most recently
    /// used idle one whose parameters' fingerprint is `prefer`, else the most recently used.
    /// Opens a new one when none is idle and both the tenant's cap and the server's budget allow
    /// (taking another tenant's idle connection's place if need be), so that a burst on a cold
    /// tenant connects in parallel.
    pub(crate) async fn checkout(
        self: &Arc<Self>,
        timeout: Duration,
        prefer: Option<u64>,
    ) -> Result<PooledConn, PoolError> {
        // Most checkouts find a permit free: no clock read, no timer. The clock starts when one
        // has to wait, for the permit or for the server's budget.
        let mut waiting_since = None;
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let started = *waiting_since.insert(tokio::time::Instant::now());
                let acquire = self.permits.clone().acquire_owned();
                match tokio::time::timeout_at(started + timeout, acquire).await {
                    Ok(Ok(permit)) => permit,
                    _ => {
                        return Err(PoolError::Exhausted {
                            tenant: self.key.clone(),
                            limit: self.route.connection_limit,
                            waited: started.elapsed(),
                        });
                    }
                }
            }
        };
        let Some(budget) = &self.budget else {
            let (conn, slot) = match self.take_idle(prefer) {
                Some(idle) => (idle.conn, idle._slot),
                None => (ServerConn::connect(&self.latest.load()).await?, None),
            };
            return Ok(self.checked_out(conn, slot, permit));
        };
        // An idle connection of this tenant, or a slot of the server's budget for a new one,
        // whichever comes first. Counted as waiting (for the others' fair shares) only once it
        // has to wait: a checkout that finds a connection touches the budget not at all.
        let tenant = &self.key;
        let mut waiting = None;
        loop {
            let changed = budget.changed.notified();
            if let Some(idle) = self.take_idle(prefer) {
                return Ok(self.checked_out(idle.conn, idle._slot, permit));
            }
            if let Some(slot) = budget.try_take(tenant) {
                let conn = ServerConn::connect(&self.latest.load()).await?;
                return Ok(self.checked_out(conn, Some(slot), permit));
            }
            waiting.get_or_insert_with(|| budget.wait_as(tenant));
            let started = *waiting_since.get_or_insert_with(tokio::time::Instant::now);
            if tokio::time::timeout_at(started + timeout, changed)
                .await
                .is_err()
            {
                return Err(PoolError::ServerBudget {
                    server: self
                        .route
                        .server
                        .as_ref()
                        .map(|(s, _)| s.clone())
                        .unwrap_or_default(),
                    share: budget.share(),
                    limit: budget.limit(),
                    waited: started.elapsed(),
                });
            }
        }
    }

    fn take_idle(&self, prefer: Option<u64>) -> Option<Idle> {
        let mut idle = lock(&self.idle);
        let matching =
            prefer.and_then(|f| idle.iter().rposition(|c| c.conn.params.fingerprint() == f));
        match matching {
            Some(i) => Some(idle.remove(i)),
            None => idle.pop(),
        }
    }

    fn checked_out(
        self: &Arc<Self>,
        conn: ServerConn,
        slot: Option<Slot>,
        permit: OwnedSemaphorePermit,
    ) -> PooledConn {
        PooledConn {
            conn: Some(conn),
            slot,
            _permit: permit,
            pool: self.clone(),
        }
    }

    /// Closes the idle connection unused the longest, making room on the server for another
    /// tenant. False when none is idle.
    fn close_oldest_idle(&self) -> bool {
        let oldest = {
            let mut idle = lock(&self.idle);
            (!idle.is_empty()).then(|| idle.remove(0))
        };
        // Dropped outside the lock: its slot goes back to the budget.
        oldest.is_some()
    }

    /// What a client sending these startup settings was told, if one did.
    /// Takes `route`'s credentials for the connections opened from now on, if it leads where
    /// this pool does.
    fn refresh_credentials(&self, route: &Arc<TenantRoute>) {
        if self.route.same_but_credentials(route) && **self.latest.load() != **route {
            self.latest.store(route.clone());
        }
    }

    pub(crate) fn established(&self, settings: &[Setting]) -> Option<ClientParams> {
        lock(&self.established).get(settings).cloned()
    }

    pub(crate) fn remember(&self, settings: Vec<Setting>, client: &ClientParams) {
        let mut established = lock(&self.established);
        if established.len() >= MAX_ESTABLISHED {
            established.clear();
        }
        established.insert(settings, client.clone());
    }

    pub(crate) fn idle_count(&self) -> usize {
        lock(&self.idle).len()
    }

    pub(crate) fn in_use(&self) -> usize {
        self.route.connection_limit.max(1) - self.permits.available_permits()
    }

    /// Its route changed: idle connections are closed now, released ones as they come back.
    fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        let idle = std::mem::take(&mut *lock(&self.idle));
        drop(idle);
    }

    /// Closes idle connections unused for longer than `max_idle`.
    fn evict_idle(&self, max_idle: Duration) {
        let expired: Vec<Idle> = {
            let mut idle = lock(&self.idle);
            let (keep, expired) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|c| c.conn.last_used.elapsed() < max_idle);
            *idle = keep;
            expired
        };
        drop(expired);
    }
}

/// A checked-out connection. `release` returns it to the pool; dropping it closes it.
pub(crate) struct PooledConn {
    conn: Option<ServerConn>,
    slot: Option<Slot>,
    _permit: OwnedSemaphorePermit,
    pool: Arc<TenantPool>,
}

impl PooledConn {
    pub(crate) fn conn(&mut self) -> &mut ServerConn {
        // Present until release consumes the guard.
        self.conn
            .as_mut()
            .unwrap_or_else(|| unreachable!("connection taken before release"))
    }

    /// Back to the pool, idle; or closed, when the pool was replaced, or when its server's budget
    /// needs the place (this replica is over its share, or other tenants wait while this one
    /// holds its fair share).
    pub(crate) fn release(mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let pool = &self.pool;
        if pool.retired.load(Ordering::Relaxed)
            || pool
                .budget
                .as_ref()
                .is_some_and(|b| b.keeps_no_idle(&pool.key))
        {
            return;
        }
        conn.last_used = Instant::now();
        lock(&self.pool.idle).push(Idle {
            conn,
            _slot: self.slot.take(),
        });
        if let Some(budget) = &self.pool.budget {
            // A checkout of this tenant, or of another that may close it, may be waiting.
            budget.changed.notify_waiters();
        }
    }
}

/// Pools by tenant key. A pool whose route changed (server, limit, state) is replaced; one whose
/// credentials alone changed is kept, and opens its next connections with the new ones.
pub(crate) struct Pools {
    pools: Mutex<HashMap<String, Arc<TenantPool>>>,
    budgets: Mutex<HashMap<String, Arc<ServerBudget>>>,
    peers: Arc<Peers>,
}

impl Pools {
    pub(crate) fn new(peers: Arc<Peers>) -> Self {
        Pools {
            pools: Mutex::default(),
            budgets: Mutex::default(),
            peers,
        }
    }

    /// Gives each pool whose tenant's credentials alone changed in `table` the new ones, for
    /// the connections it opens from now on.
    pub(crate) fn refresh_credentials(&self, table: &crate::routing::RoutingTable) {
        for pool in lock(&self.pools).values() {
            if let Some(route) = table.get(&pool.key) {
                pool.refresh_credentials(route);
            }
        }
    }

    /// `refresh_credentials` for one tenant's new route.
    pub(crate) fn refresh_credentials_of(&self, route: &Arc<TenantRoute>) {
        if let Some(pool) = lock(&self.pools).get(&route.key()) {
            pool.refresh_credentials(route);
        }
    }

    pub(crate) fn get(&self, route: &Arc<TenantRoute>) -> Arc<TenantPool> {
        let mut pools = lock(&self.pools);
        match pools.get(&route.key()) {
            Some(pool) if pool.route == *route || *pool.latest.load() == *route => pool.clone(),
            Some(pool) if pool.route.same_but_credentials(route) => pool.clone(),
            _ => {
                let budget = route.server.as_ref().map(|(server, limit)| {
                    let budget = lock(&self.budgets)
                        .entry(server.clone())
                        .or_insert_with(|| Arc::new(ServerBudget::new(*limit, self.peers.clone())))
                        .clone();
                    budget.set_limit(*limit);
                    budget
                });
                let pool = Arc::new(TenantPool::new(route.clone(), budget.clone()));
                if let Some(budget) = budget {
                    budget.join(&route.key(), Arc::downgrade(&pool));
                }
                if let Some(old) = pools.insert(route.key(), pool.clone()) {
                    old.retire();
                }
                pool
            }
        }
    }

    /// Closes idle connections past `max_idle` and those over a server's share (the replicas
    /// became more), and forgets pools with nothing open.
    pub(crate) fn evict(&self, max_idle: Duration) {
        {
            let mut pools = lock(&self.pools);
            for pool in pools.values() {
                pool.evict_idle(max_idle);
            }
            pools.retain(|_, p| p.idle_count() > 0 || p.in_use() > 0 || Arc::strong_count(p) > 1);
        }
        let budgets: Vec<Arc<ServerBudget>> = lock(&self.budgets).values().cloned().collect();
        for budget in budgets {
            budget.trim();
        }
    }

    /// Puts each server's `maxConnections` from a new routing table in force.
    pub(crate) fn set_limits<'a>(&self, servers: impl Iterator<Item = (&'a str, usize)>) {
        let budgets = lock(&self.budgets);
        for (server, limit) in servers {
            if let Some(budget) = budgets.get(server) {
                budget.set_limit(limit);
            }
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<Arc<TenantPool>> {
        lock(&self.pools).values().cloned().collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{RoutingTable, TenantState};

    fn route(user: &str, password: &str) -> TenantRoute {
        TenantRoute {
            namespace: "prod".into(),
            name: "acme".into(),
            host: "127.0.0.1".into(),
            port: 5432,
            database: "t_prod_acme".into(),
            user: user.into(),
            password: password.into(),
            other_passwords: Vec::new(),
            connection_limit: 5,
            state: TenantState::Ready,
            upstream_tls: Default::default(),
            server: None,
            hosts: vec![],
            path_prefixes: vec![],
            created: 0,
        }
    }

    /// A rotation keeps the pool (and so its server connections); the connections it opens next
    /// log in with what the table says, never with an older route a login still holds.
    #[test]
    fn new_credentials_keep_the_pool_and_reach_it_from_the_table() {
        let pools = Pools::new(Arc::new(Peers::alone()));
        let old = Arc::new(route("t_prod_acme", "old"));
        let pool = pools.get(&old);

        let rotated = route("t_prod_acme_a", "new");
        pools.refresh_credentials(&RoutingTable::new([rotated.clone()]));
        assert_eq!(pool.latest.load().user, "t_prod_acme_a");
        // A login that read the table before the rotation gets the same pool, and changes nothing.
        assert!(Arc::ptr_eq(&pools.get(&old), &pool));
        assert_eq!(pool.latest.load().password, "new");
        assert!(Arc::ptr_eq(&pools.get(&Arc::new(rotated)), &pool));

        // Anything else that changes is a new pool.
        let moved = TenantRoute {
            port: 5433,
            ..route("t_prod_acme_a", "new")
        };
        pools.refresh_credentials(&RoutingTable::new([moved.clone()]));
        assert_eq!(pool.latest.load().port, 5432);
        assert!(!Arc::ptr_eq(&pools.get(&Arc::new(moved)), &pool));
    }

    #[test]
    fn one_tenants_new_credentials_reach_its_pool() {
        let pools = Pools::new(Arc::new(Peers::alone()));
        let pool = pools.get(&Arc::new(route("t_prod_acme", "old")));
        pools.refresh_credentials_of(&Arc::new(route("t_prod_acme_a", "new")));
        assert_eq!(pool.latest.load().password, "new");
        let moved = TenantRoute {
            port: 5433,
            ..route("t_prod_acme_a", "newer")
        };
        pools.refresh_credentials_of(&Arc::new(moved));
        assert_eq!(pool.latest.load().password, "new");
    }
}
