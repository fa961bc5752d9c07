//! Prometheus metrics. Labels are bounded: SQLSTATE codes the router itself sends, tenant states.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `ok`, the SQLSTATE of the router's refusal, or `server` when the server refused (the
    /// client's startup parameters, say) and the client got the server's own error.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PinReason {
    /// Why a client keeps its server connection: `session::inspect::Pin::reason`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub logins: Family<Outcome, Counter>,
    pub sessions: Gauge,
    pub checkout_wait: Histogram,
    /// Transaction-pooled sessions that kept their server connection, by the first reason.
    pub pinned: Family<PinReason, Counter>,
    pub server_connections: Family<StateLabel, Gauge>,
    pub tenants: Family<StateLabel, Gauge>,
    /// The router's replicas, this one included, as its Service's EndpointSlices list them.
    pub replicas: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("silo_router");
        let logins = Family::<Outcome, Counter>::default();
        let sessions = Gauge::default();
        let checkout_wait = Histogram::new(exponential_buckets(0.0001, 4.0, 10));
        let pinned = Family::<PinReason, Counter>::default();
        let server_connections = Family::<StateLabel, Gauge>::default();
        let tenants = Family::<StateLabel, Gauge>::default();
        let replicas = Gauge::default();
        registry.register(
            "logins",
            "Client logins by result (ok or SQLSTATE)",
            logins.clone(),
        );
        registry.register("sessions", "Client sessions open", sessions.clone());
        registry.register(
            "checkout_wait_seconds",
            "Time clients waited for a server connection",
            checkout_wait.clone(),
        );
        registry.register(
            "pinned_sessions",
            "Transaction-pooled sessions that kept their server connection until they ended, by reason",
            pinned.clone(),
        );
        registry.register(
            "server_connections",
            "Server connections by state (idle, in_use)",
            server_connections.clone(),
        );
        registry.register("tenants", "Known tenants by state", tenants.clone());
        registry.register(
            "replicas",
            "Router replicas sharing each server's budget, this one included",
            replicas.clone(),
        );
        Metrics {
            registry,
            logins,
            sessions,
            checkout_wait,
            pinned,
            server_connections,
            tenants,
            replicas,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
