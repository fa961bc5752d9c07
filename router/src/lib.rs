//! `silo-router`: one PostgreSQL address for every tenant. Clients name their tenant, log in with
//! SCRAM-SHA-256 against the tenant's credentials, and get a pooled connection to its database.

pub mod api;
pub mod config;
pub mod metrics;
pub mod protocol;
pub mod routing;
pub mod source;

// A client goes through accept, login, then relay, which carries its session; relay takes
// server connections (backend) from the pools; all share the state.
mod accept;
mod backend;
mod login;
mod peers;
mod pools;
mod relay;
mod session;
mod state;

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::{Args, seconds, served_namespaces};
use crate::state::{Settings, Shared};

#[derive(thiserror::Error, Debug)]
pub enum RunError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    File(#[from] source::file::FileError),
    #[error("connecting to Kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Runs until SIGTERM/SIGINT: stops accepting, lets sessions finish, then returns.
pub async fn run(args: Args) -> Result<(), RunError> {
    let Args {
        listen,
        http_addr,
        config,
        namespaces,
        pool_mode,
        default_pool_size,
        checkout_timeout,
        startup_timeout,
        idle_timeout,
        tls_cert,
        tls_key,
        require_tls,
        sni_domain,
        max_logins_in_progress,
        peers_service,
        pod_ip,
        pod_namespace,
        worker_threads: _,
        log_filter: _,
    } = args;
    let namespaces = served_namespaces(namespaces);
    if config.is_some() && !namespaces.is_empty() {
        return Err(RunError::Config(
            "--namespaces selects Tenants from Kubernetes; a --config file lists its own".into(),
        ));
    }
    let tls = match (tls_cert, tls_key) {
        (Some(cert), Some(key)) => Some(tls_acceptor(&cert, &key)?),
        _ => None,
    };
    if require_tls && tls.is_none() {
        return Err(RunError::Config(
            "--require-tls needs a certificate: --tls-cert and --tls-key".into(),
        ));
    }
    let settings = Settings {
        mode: pool_mode,
        checkout_timeout: seconds(checkout_timeout, "checkout-timeout")
            .map_err(RunError::Config)?,
        startup_timeout: seconds(startup_timeout, "startup-timeout").map_err(RunError::Config)?,
        tls,
        sni_domain,
        require_tls,
        max_logins: max_logins_in_progress,
    };
    let idle_timeout = seconds(idle_timeout, "idle-timeout").map_err(RunError::Config)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(shutdown.clone()));
    let table = Arc::new(ArcSwap::from_pointee(routing::RoutingTable::default()));
    let peers = Arc::new(pod_ip.map_or_else(peers::Peers::alone, peers::Peers::at));
    let shared = Arc::new(Shared::new(table, settings, peers.clone()));
    let ready = CancellationToken::new();
    let http = tokio::spawn(api::serve(
        http_addr,
        shared.clone(),
        ready.clone(),
        shutdown.clone(),
    ));
    let client = match (&config, &peers_service) {
        (Some(_), None) => None,
        _ => Some(kube::Client::try_default().await?),
    };
    // The other replicas, before any client: each server's budget is divided among them.
    let peers_listed = CancellationToken::new();
    match (peers_service, pod_namespace, &client) {
        (Some(service), Some(namespace), Some(client)) => {
            tokio::spawn(peers::watch(
                client.clone(),
                namespace,
                service,
                "postgres".into(),
                peers,
                peers_listed.clone(),
                shutdown.clone(),
            ));
        }
        _ => peers_listed.cancel(),
    }
    let tenants_known = CancellationToken::new();
    match (config, client) {
        (Some(path), _) => {
            let loaded = source::file::load(&path, default_pool_size)?;
            info!(tenants = loaded.len(), file = %path.display(), "tenants loaded");
            shared.set_table(loaded);
            tenants_known.cancel();
            tokio::spawn(source::file::watch(
                path,
                default_pool_size,
                shared.clone(),
                shutdown.clone(),
            ));
        }
        (None, client) => {
            let client = client.ok_or_else(|| RunError::Config("no Kubernetes client".into()))?;
            tokio::spawn(source::kube::run(
                client,
                namespaces,
                default_pool_size,
                shared.clone(),
                tenants_known.clone(),
                shutdown.clone(),
            ));
        }
    }
    // Accept clients only once every tenant is known, so that none is refused as unknown.
    tokio::select! {
        _ = async { tokio::join!(tenants_known.cancelled(), peers_listed.cancelled()) } => ready.cancel(),
        _ = shutdown.cancelled() => return Ok(()),
    }
    let evict = shared.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(idle_timeout.min(std::time::Duration::from_secs(10))) => evict.pools.evict(idle_timeout),
            }
        }
    });

    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: listen,
            source,
        })?;
    info!(addr = %listener.local_addr().map_err(|source| RunError::Listen { addr: listen, source })?, mode = ?pool_mode, "accepting PostgreSQL clients");
    accept::serve(listener, shared, shutdown).await;
    if let Ok(Err(e)) = http.await {
        tracing::warn!(error = %e, "http api stopped with an error");
    }
    info!("stopped");
    Ok(())
}

/// A TLS acceptor from PEM files.
fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, RunError> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| RunError::Tls(format!("reading {}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| RunError::Tls(format!("reading {}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|e| RunError::Tls(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

async fn shutdown_on_signal(shutdown: CancellationToken) {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    info!("shutdown signal received");
    shutdown.cancel();
}
