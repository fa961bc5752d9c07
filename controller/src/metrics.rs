//! Prometheus metrics. Label sets are bounded: kinds, results, reasons and phases are fixed words.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub kind: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub kind: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    /// `catalog`: settled by the server's shared catalog read; `tenant`: the tenant's own queries.
    pub by: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

pub struct Metrics {
    pub registry: Registry,
    reconciles: Family<ResultLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    durations: Family<KindLabels, Histogram>,
    drift_checks: Family<CheckLabels, Counter>,
    pub tenants: Family<PhaseLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("silo");
        let reconciles = Family::<ResultLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let durations = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        let tenants = Family::<PhaseLabels, Gauge>::default();
        let drift_checks = Family::<CheckLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles by kind and result",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Failed reconciles by kind and reason",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration by kind",
            durations.clone(),
        );
        registry.register("tenants", "Tenants by phase", tenants.clone());
        registry.register(
            "drift_checks",
            "Tenant drift checks, by what settled them (catalog: the server's shared read)",
            drift_checks.clone(),
        );
        Metrics {
            registry,
            reconciles,
            failures,
            durations,
            drift_checks,
            tenants,
        }
    }
}

impl Metrics {
    /// Starts timing one reconcile of `kind`; the returned guard records its duration when dropped.
    pub fn reconcile_started(&self, kind: &'static str) -> ReconcileTimer<'_> {
        ReconcileTimer {
            metrics: self,
            kind,
            start: Instant::now(),
        }
    }

    pub fn reconcile_succeeded(&self, kind: &'static str) {
        self.reconciles
            .get_or_create(&ResultLabels { kind, result: "ok" })
            .inc();
    }

    pub fn reconcile_failed(&self, kind: &'static str, reason: &'static str) {
        self.reconciles
            .get_or_create(&ResultLabels {
                kind,
                result: "error",
            })
            .inc();
        self.failures
            .get_or_create(&FailureLabels { kind, reason })
            .inc();
    }

    /// One tenant's roles and database checked, `by` the shared catalog read or its own queries.
    pub fn drift_checked(&self, by: &'static str) {
        self.drift_checks.get_or_create(&CheckLabels { by }).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    kind: &'static str,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .durations
            .get_or_create(&KindLabels { kind: self.kind })
            .observe(self.start.elapsed().as_secs_f64());
    }
}
