//! Silo's end-to-end harness: a real control plane (started by `e2e/scripts/cluster.sh`, or any
//! cluster given by `KUBECONFIG`), real PostgreSQL servers started here with `initdb`/`pg_ctl`,
//! and the controller as a local process. Each test gets its own namespace, servers and controller.
//! With a node (`e2e/scripts/node.sh`), Jobs and the Helm chart's pods run for real.

pub mod apiserver;
pub mod controller;
pub mod kube_env;
pub mod node;
pub mod postgres;
pub mod rollouts;
pub mod router;
pub mod s3;
pub mod wait;

pub use controller::ControllerProcess;
pub use kube_env::{Env, TestNs};
pub use postgres::PgServer;
pub use router::RouterProcess;
pub use wait::wait_for;

/// A Tenant manifest: `spec` is the body of `spec:`, indented by two spaces.
pub fn tenant_yaml(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: silo.dev/v1alpha1\nkind: Tenant\nmetadata:\n  name: {name}\nspec:\n{spec}\n"
    )
}

/// GET `path` from an HTTP server on 127.0.0.1:`port` (the controller's or the router's),
/// returning (status, body).
pub async fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    http_get_at(([127, 0, 0, 1], port).into(), path).await
}

/// GET `path` from the HTTP server at `addr` (a pod's, say): (status, body).
pub async fn http_get_at(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use anyhow::Context;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("not an HTTP response: {response}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head}"))?;
    Ok((status, body.to_string()))
}
