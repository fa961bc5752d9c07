//! One pool of server connections per tenant: created on first use, capped by the tenant's
//! connection limit and by its server's budget ([`budget`]), with a checkout queue that times out.
//! The relay stage checks a connection out (opened by [`crate::backend`] when none is idle) and
//! releases it when the client is done with it. A checkout prefers an idle connection whose
//! session parameters already match the client's.

mod budget;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::backend::{ServerConn, ServerError};
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
        "DatabaseServer \"{server}\" has used its budget of {budget} connections (maxConnections), shared with its other tenants; waited {waited:?}"
    )]
    ServerBudget {
        server: String,
        budget: usize,
        waited: Duration,
    },
    #[error(transparent)]
    Server(#[from] ServerError),
}

pub(crate) struct TenantPool {
    pub(crate) route: Arc<TenantRoute>,
    budget: Option<Arc<ServerBudget>>,
    idle: Mutex<Vec<ServerConn>>,
    permits: Arc<Semaphore>,
    /// What clients were told at login for the startup settings they sent, once a server took
    /// them: in transaction pooling, a client asking the same again needs no server to log in.
    established: Mutex<HashMap<Vec<Setting>, ClientParams>>,
}

/// Distinct startup settings remembered per tenant; past this the memory starts over.
const MAX_ESTABLISHED: usize = 64;

impl TenantPool {
    fn new(route: Arc<TenantRoute>, budget: Option<Arc<ServerBudget>>) -> Self {
        let cap = route.connection_limit.max(1);
        TenantPool {
            route,
            budget,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(cap)),
            established: Mutex::new(HashMap::new()),
        }
    }

    /// A connection for exclusive use until the guard is released or dropped: the most recently
    /// used idle one whose parameters' fingerprint is `prefer`, else the most recently used.
    /// Opens a new one when none is idle and the cap allows, so a burst on a cold tenant connects
    /// in parallel.
    pub(crate) async fn checkout(
        self: &Arc<Self>,
        timeout: Duration,
        prefer: Option<u64>,
    ) -> Result<PooledConn, PoolError> {
        let started = Instant::now();
        let permit = match tokio::time::timeout(timeout, self.permits.clone().acquire_owned()).await
        {
            Ok(Ok(permit)) => permit,
            _ => {
                return Err(PoolError::Exhausted {
                    tenant: self.route.key(),
                    limit: self.route.connection_limit,
                    waited: started.elapsed(),
                });
            }
        };
        // Then a slot of the server's budget, fairly shared with the server's other tenants.
        let slot = match &self.budget {
            Some(budget) => {
                let left = timeout.saturating_sub(started.elapsed());
                match budget.take(&self.route.key(), left).await {
                    Some(slot) => Some(slot),
                    None => {
                        return Err(PoolError::ServerBudget {
                            server: self
                                .route
                                .server
                                .as_ref()
                                .map(|(s, _)| s.clone())
                                .unwrap_or_default(),
                            budget: budget.budget,
                            waited: started.elapsed(),
                        });
                    }
                }
            }
            None => None,
        };
        let idle = {
            let mut idle = lock(&self.idle);
            let matching =
                prefer.and_then(|f| idle.iter().rposition(|c| c.params.fingerprint() == f));
            match matching {
                Some(i) => Some(idle.remove(i)),
                None => idle.pop(),
            }
        };
        let conn = match idle {
            Some(conn) => conn,
            None => ServerConn::connect(&self.route).await?,
        };
        Ok(PooledConn {
            conn: Some(conn),
            _permit: permit,
            _slot: slot,
            pool: self.clone(),
        })
    }

    /// What a client sending these startup settings was told, if one did.
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

    /// Closes idle connections unused for longer than `max_idle`.
    fn evict_idle(&self, max_idle: Duration) {
        lock(&self.idle).retain(|c| c.last_used.elapsed() < max_idle);
    }
}

/// A checked-out connection. `release` returns it to the pool; dropping it closes it.
pub(crate) struct PooledConn {
    conn: Option<ServerConn>,
    _permit: OwnedSemaphorePermit,
    _slot: Option<Slot>,
    pool: Arc<TenantPool>,
}

impl PooledConn {
    pub(crate) fn conn(&mut self) -> &mut ServerConn {
        // Present until release consumes the guard.
        self.conn
            .as_mut()
            .unwrap_or_else(|| unreachable!("connection taken before release"))
    }

    pub(crate) fn release(mut self) {
        if let Some(mut conn) = self.conn.take() {
            conn.last_used = Instant::now();
            lock(&self.pool.idle).push(conn);
        }
    }
}

/// Pools by tenant key. A pool whose route changed (password, server, limit) is replaced.
#[derive(Default)]
pub(crate) struct Pools {
    pools: Mutex<HashMap<String, Arc<TenantPool>>>,
    budgets: Mutex<HashMap<String, Arc<ServerBudget>>>,
}

impl Pools {
    pub(crate) fn get(&self, route: &Arc<TenantRoute>) -> Arc<TenantPool> {
        let mut pools = lock(&self.pools);
        match pools.get(&route.key()) {
            Some(pool) if pool.route == *route || *pool.route == **route => pool.clone(),
            _ => {
                let budget = route.server.as_ref().map(|(server, size)| {
                    let mut budgets = lock(&self.budgets);
                    match budgets.get(server) {
                        Some(b) if b.budget == *size => b.clone(),
                        _ => {
                            let b = Arc::new(ServerBudget::new(*size));
                            budgets.insert(server.clone(), b.clone());
                            b
                        }
                    }
                });
                let pool = Arc::new(TenantPool::new(route.clone(), budget));
                pools.insert(route.key(), pool.clone());
                pool
            }
        }
    }

    /// Closes idle connections past `max_idle`, and forgets pools with nothing open.
    pub(crate) fn evict(&self, max_idle: Duration) {
        let mut pools = lock(&self.pools);
        for pool in pools.values() {
            pool.evict_idle(max_idle);
        }
        pools.retain(|_, p| p.idle_count() > 0 || p.in_use() > 0 || Arc::strong_count(p) > 1);
    }

    pub(crate) fn snapshot(&self) -> Vec<Arc<TenantPool>> {
        lock(&self.pools).values().cloned().collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
