//! One run's figures as JSON (`--results`), and the table that compares several runs' figures
//! per tenant (`--summary`), so that `e2e/bench.sh --fleet` can run each N on a fresh control
//! plane and still end with one comparison.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// What one run measured (seconds, MiB, counts).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Figures {
    pub tenants: usize,
    pub all_ready_s: f64,
    pub sql_floor_s: f64,
    pub api_writes_s: f64,
    pub api_writes: f64,
    pub cpu_s: f64,
    pub peak_rss_mib: f64,
    pub restart_ready_s: f64,
    pub restart_pass_s: f64,
    pub restart_writes: f64,
    pub restart_ddl: u64,
    pub restart_other_sql: u64,
    pub restart_cpu_s: f64,
    pub restart_rss_mib: f64,
    pub drift_repaired_s: f64,
}

impl Figures {
    pub fn combined_floor_s(&self) -> f64 {
        self.sql_floor_s + self.api_writes_s
    }

    fn per_tenant(&self, value: f64) -> f64 {
        value / self.tenants as f64
    }

    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// Prints the comparison of the runs in `paths` (their `--results` files), smallest N first.
pub fn print(paths: &[PathBuf]) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    for path in paths {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let figures: Figures =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        runs.push(figures);
    }
    anyhow::ensure!(!runs.is_empty(), "no runs to summarise");
    runs.sort_by_key(|r| r.tenants);

    println!();
    println!("provisioning benchmark, per N (each on a fresh control plane and fresh servers):");
    println!(
        "  {:>6} {:>9} {:>7} {:>9} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>7} {:>13} {:>8}",
        "N",
        "all Ready",
        "/ SQL",
        "/ SQL+API",
        "writes/t",
        "CPU ms/t",
        "peak RSS",
        "restart:",
        "pass",
        "writes",
        "SQL DDL/other",
        "drift"
    );
    for r in &runs {
        println!(
            "  {:>6} {:>8.1}s {:>7.2} {:>9.2} {:>8.2} {:>8.2} {:>5.1}MiB | {:>7.2}s {:>7.1}s {:>7.0} {:>13} {:>7.2}s",
            r.tenants,
            r.all_ready_s,
            r.all_ready_s / r.sql_floor_s,
            r.all_ready_s / r.combined_floor_s(),
            r.per_tenant(r.api_writes),
            r.per_tenant(r.cpu_s * 1000.0),
            r.peak_rss_mib,
            r.restart_ready_s,
            r.restart_pass_s,
            r.restart_writes,
            format!("{} / {}", r.restart_ddl, r.restart_other_sql),
            r.drift_repaired_s,
        );
    }
    println!(
        "  (targets: all Ready / SQL+API floor <= 1.1; restart API writes 0; RSS at 10,000 tenants <= 150 MB)"
    );

    if runs.len() > 1 {
        println!();
        for pair in runs.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let growth = (b.peak_rss_mib - a.peak_rss_mib) / (b.tenants - a.tenants) as f64;
            println!(
                "  peak RSS growth {:>5} -> {:>5} tenants: {:>6.2} MiB per 1,000 tenants",
                a.tenants,
                b.tenants,
                growth * 1000.0
            );
        }
        let points: Vec<(f64, f64)> = runs
            .iter()
            .map(|r| (r.tenants as f64, r.peak_rss_mib))
            .collect();
        let (intercept, slope) = fit_line(&points);
        let at_10k = intercept + slope * 10_000.0;
        println!(
            "  peak RSS fitted by a straight line: {intercept:.1} MiB + {:.2} MiB per 1,000 tenants \
             -> {at_10k:.0} MiB ({:.0} MB) at 10,000 tenants (target <= 150 MB)",
            slope * 1000.0,
            at_10k * 1.048_576
        );
        let (small, large) = (&runs[0], &runs[runs.len() - 1]);
        let ratio = |f: fn(&Figures) -> f64| {
            large.per_tenant(f(large)) / small.per_tenant(f(small)).max(f64::MIN_POSITIVE)
        };
        println!(
            "  per-tenant cost at {} vs {} tenants (target within 1.2x): wall time {:.2}x, \
             controller CPU {:.2}x, API writes {:.2}x, restart pass {:.2}x",
            large.tenants,
            small.tenants,
            ratio(|r| r.all_ready_s),
            ratio(|r| r.cpu_s),
            ratio(|r| r.api_writes),
            ratio(|r| r.restart_pass_s),
        );
    }
    Ok(())
}

/// Least-squares line through `points`: (intercept, slope).
fn fit_line(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (mean_y - slope * mean_x, slope)
}
