//! Tenants from a static YAML file, reloaded when it changes, for running without Kubernetes.
//!
//! ```yaml
//! tenants:
//!   - name: acme
//!     namespace: default        # optional, default "default"
//!     host: 127.0.0.1
//!     port: 5432
//!     database: t_default_acme
//!     user: t_default_acme
//!     password: ...
//!     connectionLimit: 20       # optional
//!     state: Ready              # optional: Ready | Suspended | Deleting | Pending
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::routing::{RoutingTable, TenantRoute, TenantState};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    /// Connection budgets of servers, by name (optional).
    #[serde(default)]
    servers: std::collections::HashMap<String, FileServer>,
    tenants: Vec<FileTenant>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileServer {
    max_connections: usize,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileTenant {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    host: String,
    #[serde(default = "default_port")]
    port: u16,
    database: String,
    user: String,
    password: String,
    connection_limit: Option<usize>,
    #[serde(default = "default_state")]
    state: TenantState,
    /// A key of `servers`.
    server: Option<String>,
    /// TLS toward the server: Disable, Prefer (default) or Require.
    #[serde(default)]
    ssl_mode: crate::backend::UpstreamTls,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    path_prefixes: Vec<String>,
}

fn default_namespace() -> String {
    "default".into()
}
fn default_port() -> u16 {
    5432
}
fn default_state() -> TenantState {
    TenantState::Ready
}

#[derive(thiserror::Error, Debug)]
pub enum FileError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
}

/// Parses the file's YAML into a table; tenants without a connection limit get `default_limit`.
pub fn parse(yaml: &str, default_limit: usize) -> Result<RoutingTable, serde_yaml::Error> {
    let config: FileConfig = serde_yaml::from_str(yaml)?;
    let servers = config.servers;
    Ok(RoutingTable::new(config.tenants.into_iter().map(|t| {
        TenantRoute {
            namespace: t.namespace,
            name: t.name,
            host: t.host,
            port: t.port,
            database: t.database,
            user: t.user,
            password: t.password,
            other_passwords: Vec::new(),
            connection_limit: t.connection_limit.unwrap_or(default_limit),
            state: t.state,
            server: t.server.map(|s| {
                let budget = servers
                    .get(&s)
                    .map_or(usize::MAX / 2, |c| c.max_connections);
                (s, budget)
            }),
            upstream_tls: t.ssl_mode,
            hosts: t.hosts,
            path_prefixes: t.path_prefixes,
            // A file has no creation times: contested routes go by namespace and name.
            created: i64::MAX,
        }
    })))
}

pub fn load(path: &Path, default_limit: usize) -> Result<RoutingTable, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.into(),
        source,
    })?;
    parse(&text, default_limit).map_err(|source| FileError::Parse {
        path: path.into(),
        source,
    })
}

/// Reloads `path` into `table` whenever its modification time changes; a file that fails to
/// parse is reported and the previous table stays in force.
pub async fn watch(
    path: PathBuf,
    default_limit: usize,
    shared: Arc<crate::state::Shared>,
    shutdown: CancellationToken,
) {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen: Option<SystemTime> = modified(&path);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let now = modified(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match load(&path, default_limit) {
            Ok(new) => {
                tracing::info!(path = %path.display(), tenants = new.len(), "tenant file reloaded");
                shared.set_table(new);
            }
            Err(e) => {
                tracing::warn!(error = %e, "tenant file not reloaded; keeping the previous tenants")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::Lookup;

    #[test]
    fn parses_with_defaults() {
        let table = parse(
            "tenants:\n- {name: acme, host: h, database: d, user: u, password: p}\n\
             - {name: beta, namespace: x, host: h, port: 6000, database: d2, user: u2, password: p2, connectionLimit: 3, state: Suspended}\n",
            7,
        )
        .unwrap_or_default();
        let Lookup::Found(acme) = table.lookup("acme") else {
            panic!("acme")
        };
        assert_eq!(
            (acme.port, acme.connection_limit, acme.state),
            (5432, 7, TenantState::Ready)
        );
        let Lookup::Found(beta) = table.lookup("x.beta") else {
            panic!("beta")
        };
        assert_eq!(
            (beta.port, beta.connection_limit, beta.state),
            (6000, 3, TenantState::Suspended)
        );
    }

    #[test]
    fn unknown_fields_are_errors() {
        assert!(
            parse(
                "tenants:\n- {name: a, host: h, database: d, user: u, password: p, pasword: x}\n",
                1
            )
            .is_err()
        );
    }
}
