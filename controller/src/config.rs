//! Command-line flags, each with a `SILO_` environment variable.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "silo-controller",
    version,
    about = "Silo's Kubernetes operator for database-per-tenant PostgreSQL fleets"
)]
pub struct Args {
    /// Address of the HTTP server for /metrics, /healthz and /readyz.
    #[arg(long, env = "SILO_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Log format.
    #[arg(long, env = "SILO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,

    /// Log filter, in `tracing` EnvFilter syntax.
    #[arg(long, env = "SILO_LOG", default_value = "info")]
    pub log_filter: String,

    /// How often every Tenant and DatabaseServer is re-checked against PostgreSQL to repair drift.
    #[arg(long, env = "SILO_RESYNC_INTERVAL", value_parser = humantime_secs, default_value = "300")]
    pub resync_interval: Duration,

    /// Concurrent DDL statements per DatabaseServer.
    #[arg(long, env = "SILO_DDL_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub ddl_concurrency: u16,

    /// Tenants reconciled in parallel (their DDL is still bounded per server).
    #[arg(long, env = "SILO_TENANT_CONCURRENCY", default_value_t = 64)]
    pub tenant_concurrency: u16,

    /// Only reconcile Tenants in this namespace (default: all namespaces).
    #[arg(long = "namespace", env = "SILO_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// Only use DatabaseServers whose labels match this selector, e.g. `pool=eu` (default: all).
    /// Lets several controllers share a cluster, each with its own servers.
    #[arg(long, env = "SILO_SERVER_SELECTOR")]
    pub server_selector: Option<String>,

    /// Only reconcile Tenants whose labels match this selector, e.g. `silo.dev/install=acme`
    /// (default: all). With `--server-selector`, lets several installs share a cluster: give each
    /// its own servers and a tenant selector disjoint from the others'.
    #[arg(long, env = "SILO_TENANT_SELECTOR")]
    pub tenant_selector: Option<String>,

    /// Namespaces a DatabaseServer's `adminSecretRef` may name, comma-separated; the chart sets
    /// the release namespace (plus `controller.adminSecretNamespaces`). Without it, any namespace
    /// (for running the controller outside a cluster).
    #[arg(long, env = "SILO_ADMIN_SECRET_NAMESPACES", value_delimiter = ',')]
    pub admin_secret_namespaces: Vec<String>,

    /// The router's `host:port` as applications reach it; adds `router-uri` to every tenant Secret.
    #[arg(long, env = "SILO_ROUTER_ADDRESS")]
    pub router_address: Option<String>,

    /// Run leader election, so that only one of several replicas reconciles.
    #[arg(long, env = "SILO_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,

    /// Namespace of the leader-election Lease.
    #[arg(long, env = "SILO_LEASE_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,

    /// Name of the leader-election Lease.
    #[arg(long, env = "SILO_LEASE_NAME", default_value = "silo-controller")]
    pub lease_name: String,

    /// How long a leader's Lease lasts without renewal, in seconds; a standby takes over after it.
    #[arg(long, env = "SILO_LEASE_DURATION", default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=300))]
    pub lease_duration: u64,

    /// This replica's identity in the Lease (the pod name in a cluster).
    #[arg(long, env = "SILO_POD_NAME")]
    pub identity: Option<String>,

    /// JSON file with the settings of every Job the controller creates (the chart's `jobs`
    /// values): scheduling, ServiceAccount, resources, limits, extra labels and annotations.
    #[arg(long, env = "SILO_JOB_SETTINGS")]
    pub job_settings: Option<std::path::PathBuf>,

    /// JSON file with the fleet's backup settings (the chart's `backups` values): the default
    /// destination, the volume of a `file://` destination, the S3 store, the per-server cap.
    #[arg(long, env = "SILO_BACKUP_SETTINGS")]
    pub backup_settings: Option<std::path::PathBuf>,

    /// Where the final backups of Tenants deleted with policy `Snapshot` go (their TenantBackup,
    /// Job and temporary login Secret): a namespace that outlives tenant namespaces, by default
    /// the lease's (the controller's own).
    #[arg(long, env = "SILO_FINAL_BACKUP_NAMESPACE")]
    pub final_backup_namespace: Option<String>,
}

/// Log output format.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(0.1..=86_400.0).contains(&secs) {
        return Err(format!("`{s}` must be between 0.1 and 86400 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn verify_cli() {
        Args::command().debug_assert();
    }

    #[test]
    fn durations_parse_with_or_without_unit() {
        assert_eq!(humantime_secs("30").ok(), Some(Duration::from_secs(30)));
        assert_eq!(
            humantime_secs("2.5s").ok(),
            Some(Duration::from_millis(2500))
        );
        assert!(humantime_secs("0").is_err());
        assert!(humantime_secs("soon").is_err());
    }
}
