//! One bounded admin pool per DatabaseServer, shared by every reconcile, plus the per-server limit
//! on concurrent DDL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use silo_crds::SslMode;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, PgPool};
use tokio::sync::{Semaphore, SemaphorePermit};

/// The `search_path` of every admin session.
pub const ADMIN_SEARCH_PATH: &str = "pg_catalog,pg_temp";

/// Where and how to reach a server as its admin.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminTarget {
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: String,
    pub ssl_mode: SslMode,
}

impl std::fmt::Debug for AdminTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl AdminTarget {
    fn connect_options(&self) -> PgConnectOptions {
        PgConnectOptions::new()
            .host(&self.host)
            .port(self.port)
            .username(&self.username)
            .password(&self.password)
            .database("postgres")
            .application_name("silo-controller")
            // Admin sessions resolve names in the system catalog alone: on a server where PUBLIC
            // may create in a schema of the search path (PostgreSQL 14 and older), a tenant could
            // otherwise plant a better-matching function for the admin to run. pg_temp last, so
            // that a temporary object never shadows a catalog one either. Sent at startup, it wins
            // over any ALTER DATABASE/ROLE ... SET search_path.
            .options([("search_path", ADMIN_SEARCH_PATH)])
            .ssl_mode(match self.ssl_mode {
                SslMode::Disable => PgSslMode::Disable,
                SslMode::Prefer => PgSslMode::Prefer,
                SslMode::Require => PgSslMode::Require,
            })
            // The few statements we send are cheap to parse; no need to keep them prepared.
            .statement_cache_capacity(16)
            // Statements carry password verifiers: never log them.
            .disable_statement_logging()
    }
}

/// A server's admin pool and its DDL limit.
pub struct ServerHandle {
    pub name: String,
    pub target: AdminTarget,
    pub pool: PgPool,
    pub verified: super::scram::VerifiedPasswords,
    /// The last read of every tenant's roles and database, for the drift check of a resync.
    pub catalog: super::catalog::CatalogCache,
    ddl: Semaphore,
    ddl_limit: u32,
}

impl ServerHandle {
    /// Waits for a DDL slot on this server; DDL beyond the limit queues here, not in PostgreSQL.
    pub async fn ddl_permit(&self) -> SemaphorePermit<'_> {
        // The semaphore is never closed, so acquire cannot fail.
        match self.ddl.acquire().await {
            Ok(permit) => permit,
            Err(_) => unreachable!("the DDL semaphore is never closed"),
        }
    }

    /// Waits until no other DDL runs on this server and holds every slot: a purge, which must
    /// not interleave with a tenant's provisioning taking the same database back.
    pub async fn ddl_exclusive(&self) -> SemaphorePermit<'_> {
        match self.ddl.acquire_many(self.ddl_limit).await {
            Ok(permit) => permit,
            Err(_) => unreachable!("the DDL semaphore is never closed"),
        }
    }
}

/// Limits of every server's pool.
#[derive(Clone, Copy, Debug)]
pub struct PoolLimits {
    /// Concurrent DDL statements per server.
    pub ddl_concurrency: usize,
    /// How long a statement waits for a pooled connection.
    pub acquire_timeout: Duration,
}

/// Admin pools by DatabaseServer name. A pool is created when a server is first seen and replaced
/// when its address or admin credentials change.
pub struct ServerPools {
    limits: PoolLimits,
    servers: Mutex<HashMap<String, Arc<ServerHandle>>>,
}

impl ServerPools {
    pub fn new(limits: PoolLimits) -> Self {
        ServerPools {
            limits,
            servers: Mutex::new(HashMap::new()),
        }
    }

    /// The pool for `name` if the DatabaseServer reconciler has connected it.
    pub fn get(&self, name: &str) -> Option<Arc<ServerHandle>> {
        self.lock().get(name).cloned()
    }

    /// The pool for `name` at `target`, created (lazily; no connection is opened here) or replaced
    /// when the target changed.
    pub fn ensure(&self, name: &str, target: AdminTarget) -> Arc<ServerHandle> {
        let mut servers = self.lock();
        if let Some(handle) = servers.get(name)
            && handle.target == target
        {
            return handle.clone();
        }
        let pool = PgPoolOptions::new()
            // DDL slots plus one for status queries, so a busy server still reports its health.
            .max_connections(self.limits.ddl_concurrency as u32 + 1)
            .min_connections(0)
            .acquire_timeout(self.limits.acquire_timeout)
            .idle_timeout(Duration::from_secs(300))
            .connect_lazy_with(target.connect_options());
        let handle = Arc::new(ServerHandle {
            name: name.to_string(),
            target,
            pool,
            verified: Default::default(),
            catalog: Default::default(),
            ddl: Semaphore::new(self.limits.ddl_concurrency),
            ddl_limit: u32::try_from(self.limits.ddl_concurrency).unwrap_or(u32::MAX),
        });
        if let Some(old) = servers.insert(name.to_string(), handle.clone()) {
            tokio::spawn(async move { old.pool.close().await });
        }
        handle
    }

    /// Closes and forgets the pools of servers for which `keep` is false (servers that were deleted).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock().retain(|name, handle| {
            let kept = keep(name);
            if !kept {
                let handle = handle.clone();
                tokio::spawn(async move { handle.pool.close().await });
            }
            kept
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<ServerHandle>>> {
        // A panic while holding this lock cannot leave the map half-updated, so recover from poison.
        self.servers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
