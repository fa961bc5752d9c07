//! HTTP on `:8080`: `/v1/resolve`, `/v1/tenants`, `/metrics`, `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::metrics::StateLabel;
use crate::routing::TenantState;
use crate::state::Shared;

#[derive(Clone)]
struct Api {
    shared: Arc<Shared>,
    ready: CancellationToken,
}

/// Serves until `shutdown`. `/readyz` answers 200 once `ready` is cancelled (tenants loaded).
pub async fn serve(
    addr: SocketAddr,
    shared: Arc<Shared>,
    ready: CancellationToken,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/v1/resolve", get(resolve))
        .route("/v1/tenants", get(tenants))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(Api { shared, ready });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "http api listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

#[derive(Deserialize)]
struct ResolveQuery {
    host: Option<String>,
    path: Option<String>,
}

async fn resolve(State(api): State<Api>, Query(q): Query<ResolveQuery>) -> impl IntoResponse {
    match api
        .shared
        .table
        .load()
        .resolve(q.host.as_deref(), q.path.as_deref())
    {
        Some(route) => (
            StatusCode::OK,
            Json(json!({
                "tenant": route.name,
                "namespace": route.namespace,
                "database": route.database,
                "server": format!("{}:{}", route.host, route.port),
                "phase": format!("{:?}", route.state),
            })),
        ),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": "no tenant matches this host and path" })),
        ),
    }
}

async fn tenants(State(api): State<Api>) -> Json<serde_json::Value> {
    let table = api.shared.table.load();
    let pools = api.shared.pools.snapshot();
    let mut list: Vec<serde_json::Value> = table
        .routes()
        .map(|r| {
            let pool = pools.iter().find(|p| p.route.key() == r.key());
            json!({
                "tenant": r.key(),
                "phase": format!("{:?}", r.state),
                "poolSize": r.connection_limit,
                "inUse": pool.map_or(0, |p| p.in_use()),
                "idle": pool.map_or(0, |p| p.idle_count()),
            })
        })
        .collect();
    list.sort_by(|a, b| a["tenant"].as_str().cmp(&b["tenant"].as_str()));
    Json(json!({ "tenants": list }))
}

async fn metrics(State(api): State<Api>) -> impl IntoResponse {
    let m = &api.shared.metrics;
    let table = api.shared.table.load();
    for (state, label) in [
        (TenantState::Ready, "ready"),
        (TenantState::Suspended, "suspended"),
        (TenantState::Restoring, "restoring"),
        (TenantState::Deleting, "deleting"),
        (TenantState::Pending, "pending"),
    ] {
        let n = table.routes().filter(|r| r.state == state).count();
        m.tenants
            .get_or_create(&StateLabel { state: label })
            .set(n as i64);
    }
    let pools = api.shared.pools.snapshot();
    let idle: usize = pools.iter().map(|p| p.idle_count()).sum();
    let in_use: usize = pools.iter().map(|p| p.in_use()).sum();
    m.server_connections
        .get_or_create(&StateLabel { state: "idle" })
        .set(idle as i64);
    m.server_connections
        .get_or_create(&StateLabel { state: "in_use" })
        .set(in_use as i64);
    m.replicas.set(api.shared.peers.replicas() as i64);
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

async fn readyz(State(api): State<Api>) -> (StatusCode, &'static str) {
    if api.ready.is_cancelled() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading tenants")
    }
}
