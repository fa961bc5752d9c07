//! Command-line flags, each with a `SILO_ROUTER_` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::state::PoolMode;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "silo-router",
    version,
    about = "Silo's tenant-aware PostgreSQL router"
)]
pub struct Args {
    /// Address for PostgreSQL clients.
    #[arg(long, env = "SILO_ROUTER_LISTEN", default_value = "0.0.0.0:6432")]
    pub listen: SocketAddr,

    /// Address of the HTTP API (/v1/resolve, /v1/tenants, /metrics, /healthz, /readyz).
    #[arg(long, env = "SILO_ROUTER_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Static tenant file (YAML), reloaded when it changes. Without it, tenants come from
    /// Kubernetes (Tenants, their DatabaseServers and the passwords in their Secrets, watched live).
    #[arg(long, env = "SILO_ROUTER_CONFIG")]
    pub config: Option<PathBuf>,

    /// Namespaces whose Tenants and Secrets the router serves, comma-separated; the router then
    /// needs read access to Secrets in these namespaces only. Empty: every namespace.
    #[arg(
        long,
        env = "SILO_ROUTER_NAMESPACES",
        value_delimiter = ',',
        value_parser = namespace_name
    )]
    pub namespaces: Vec<String>,

    /// When a server connection goes back to the pool.
    #[arg(long, env = "SILO_ROUTER_POOL_MODE", value_enum, default_value_t = PoolMode::Transaction)]
    pub pool_mode: PoolMode,

    /// Connection cap for tenants that do not set one.
    #[arg(long, env = "SILO_ROUTER_DEFAULT_POOL_SIZE", default_value_t = 20)]
    pub default_pool_size: usize,

    /// How long a client waits for a server connection before 53300, in seconds.
    #[arg(long, env = "SILO_ROUTER_CHECKOUT_TIMEOUT", default_value_t = 5.0)]
    pub checkout_timeout: f64,

    /// How long a client may take to start up and log in, in seconds.
    #[arg(long, env = "SILO_ROUTER_STARTUP_TIMEOUT", default_value_t = 10.0)]
    pub startup_timeout: f64,

    /// Idle server connections are closed after this many seconds.
    #[arg(long, env = "SILO_ROUTER_IDLE_TIMEOUT", default_value_t = 300.0)]
    pub idle_timeout: f64,

    /// PEM certificate chain for TLS toward clients; with `--tls-key`, SSLRequest is answered `S`.
    #[arg(long, env = "SILO_ROUTER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for `--tls-cert`.
    #[arg(long, env = "SILO_ROUTER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Refuse clients that do not ask for TLS (FATAL 28000 "TLS is required"), as a `hostssl`
    /// line does in PostgreSQL. Needs `--tls-cert`.
    #[arg(long, env = "SILO_ROUTER_REQUIRE_TLS")]
    pub require_tls: bool,

    /// Connections that may be logging in at once. Over the cap, the connection that has been
    /// logging in the longest is closed (53300 "too many connections logging in") to make room:
    /// idle sockets cannot lock out clients that log in promptly, and memory stays bounded.
    #[arg(
        long,
        env = "SILO_ROUTER_MAX_LOGINS",
        default_value_t = 256,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000)
    )]
    pub max_logins_in_progress: usize,

    /// With TLS, a client's SNI host name `tenant.<this domain>` names its tenant.
    #[arg(long, env = "SILO_ROUTER_SNI_DOMAIN")]
    pub sni_domain: Option<String>,

    /// The router's own Service: its replicas find each other through the Service's
    /// EndpointSlices, to pass cancel requests on to the replica holding the client and to
    /// divide each server's `maxConnections` among themselves. Needs `--pod-ip` and
    /// `--pod-namespace`. Unset: the router counts itself alone.
    #[arg(long, env = "SILO_ROUTER_PEERS_SERVICE", requires_all = ["pod_ip", "pod_namespace"])]
    pub peers_service: Option<String>,

    /// This replica's pod IP (the downward API's `status.podIP`).
    #[arg(long, env = "SILO_ROUTER_POD_IP")]
    pub pod_ip: Option<std::net::IpAddr>,

    /// The namespace of this replica and its Service.
    #[arg(long, env = "SILO_ROUTER_POD_NAMESPACE")]
    pub pod_namespace: Option<String>,

    /// Threads serving clients (default: one per core).
    #[arg(long, env = "SILO_ROUTER_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    /// Log filter, in `tracing` EnvFilter syntax.
    #[arg(long, env = "SILO_ROUTER_LOG", default_value = "info")]
    pub log_filter: String,
}

/// A positive number of seconds as a Duration.
pub fn seconds(value: f64, flag: &str) -> Result<Duration, String> {
    if value.is_finite() && value > 0.0 && value < 86_400.0 {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(format!(
            "--{flag} must be between 0 and 86400 seconds, not {value}"
        ))
    }
}

/// A namespace name (an RFC 1123 label), so that a typo fails at startup rather than leaving
/// the router waiting forever on a watch the API server refuses. Blank items are kept as ""
/// (see [`served_namespaces`]) so that `SILO_ROUTER_NAMESPACES=""` means every namespace.
fn namespace_name(value: &str) -> Result<String, String> {
    let name = value.trim();
    let valid = name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(name.to_string())
    } else {
        Err(format!(
            "\"{name}\" is not a namespace name (lowercase letters, digits and '-', at most 63)"
        ))
    }
}

/// The namespaces `--namespaces` names, without blank items; empty for every namespace.
pub fn served_namespaces(namespaces: Vec<String>) -> Vec<String> {
    let mut namespaces: Vec<String> = namespaces.into_iter().filter(|n| !n.is_empty()).collect();
    namespaces.sort();
    namespaces.dedup();
    namespaces
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
    fn namespaces_are_a_comma_separated_list() {
        let parse = |args: &[&str]| {
            Args::try_parse_from(["silo-router"].iter().chain(args))
                .map(|a| served_namespaces(a.namespaces))
                .map_err(|e| e.kind())
        };
        assert_eq!(parse(&[]), Ok(vec![]), "absent: every namespace");
        assert_eq!(
            parse(&["--namespaces", ""]),
            Ok(vec![]),
            "empty: every namespace"
        );
        assert_eq!(
            parse(&["--namespaces", "shop-us, shop-eu,,shop-us,"]),
            Ok(vec!["shop-eu".to_string(), "shop-us".to_string()])
        );
        for bad in ["Shop", "shop_eu", "-shop", "shop-", &"a".repeat(64)] {
            assert!(parse(&["--namespaces", bad]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn require_tls_and_the_login_cap_are_flags_and_variables() {
        let parse = |args: &[&str]| {
            Args::try_parse_from(["silo-router"].iter().chain(args))
                .map(|a| (a.require_tls, a.max_logins_in_progress))
                .map_err(|e| e.kind())
        };
        assert_eq!(parse(&[]), Ok((false, 256)));
        assert_eq!(
            parse(&["--require-tls", "--max-logins-in-progress", "10"]),
            Ok((true, 10))
        );
        assert!(parse(&["--max-logins-in-progress", "0"]).is_err());
    }

    #[test]
    fn seconds_are_checked() {
        assert!(seconds(0.5, "x").is_ok());
        assert!(seconds(0.0, "x").is_err());
        assert!(seconds(f64::NAN, "x").is_err());
    }
}
