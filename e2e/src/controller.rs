//! The controller as a local process, one per test.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::kube_env::{TEST_LABEL, TestNs};
use crate::postgres::free_port;

/// A running `silo-controller`; killed on drop. Its log is kept for failure reports.
pub struct ControllerProcess {
    child: Child,
    pub log: PathBuf,
    pub http_port: u16,
}

impl ControllerProcess {
    /// Starts a controller for the test namespace; with `identity`, as a replica in leader
    /// election on the chart's Lease, else without leader election.
    pub fn start(
        ns: &TestNs,
        identity: Option<&str>,
        extra: &[&str],
    ) -> anyhow::Result<ControllerProcess> {
        Self::start_with_env(ns, identity, extra, &[])
    }

    /// As [`ControllerProcess::start`], with environment variables set after the harness's own
    /// (so they override them).
    pub fn start_with_env(
        ns: &TestNs,
        identity: Option<&str>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<ControllerProcess> {
        let http_port = free_port()?;
        let dir = std::env::var_os("SILO_E2E_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let log = dir.join(format!("silo-controller-{}-{http_port}.log", ns.name));
        let file = std::fs::File::create(&log)?;
        let mut command = Command::new(&ns.env.controller_bin);
        match identity {
            Some(identity) => command
                .env("SILO_LEADER_ELECTION", "true")
                .env("SILO_POD_NAME", identity)
                .env("SILO_LEASE_NAMESPACE", &ns.env.lease_namespace)
                .env("SILO_LEASE_NAME", &ns.env.lease_name),
            None => command.env("SILO_LEADER_ELECTION", "false"),
        };
        let child = command
            .env("KUBECONFIG", &ns.env.controller_kubeconfig)
            .env("SILO_HTTP_ADDR", format!("127.0.0.1:{http_port}"))
            .env("SILO_WATCH_NAMESPACE", &ns.name)
            .env("SILO_SERVER_SELECTOR", format!("{TEST_LABEL}={}", ns.name))
            // The tests keep their servers' admin Secrets in their own namespace.
            .env("SILO_ADMIN_SECRET_NAMESPACES", &ns.name)
            .env("SILO_RESYNC_INTERVAL", "5")
            .env("SILO_LEASE_DURATION", "6")
            .env("SILO_LOG", "info,silo_controller=debug")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .args(extra)
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()
            .with_context(|| format!("starting {}", ns.env.controller_bin.display()))?;
        Ok(ControllerProcess {
            child,
            log,
            http_port,
        })
    }

    /// `kill -9`: no chance to clean up, as in a node failure.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait: a graceful stop.
    pub fn terminate(&mut self) -> anyhow::Result<()> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        for _ in 0..100 {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        anyhow::bail!("controller did not stop within 10 s of SIGTERM")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident set size (VmHWM) in KiB, from /proc.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.proc_status_kib("VmHWM:")
    }

    /// Resident set size now (VmRSS) in KiB, from /proc.
    pub fn rss_kib(&self) -> Option<u64> {
        self.proc_status_kib("VmRSS:")
    }

    fn proc_status_kib(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with(field))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// CPU time used so far (user + system), from /proc/<pid>/stat.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        process_cpu_seconds(self.child.id())
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET a path on its HTTP server, returning (status, body).
    pub async fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        crate::http_get(self.http_port, path).await
    }
}

/// CPU time (utime + stime, in seconds) a running process has used, from /proc/<pid>/stat.
pub fn process_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; the fields after it are plain numbers, the
    // state (field 3) first, utime and stime fields 14 and 15.
    let (_, rest) = stat
        .rsplit_once(") ")
        .with_context(|| format!("unexpected /proc/{pid}/stat: {stat}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .with_context(|| format!("short /proc/{pid}/stat"))?
            .parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / clock_ticks_per_second()?)
}

/// `getconf CLK_TCK`: the unit of the CPU times in /proc.
fn clock_ticks_per_second() -> anyhow::Result<f64> {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    if let Some(ticks) = TICKS.get() {
        return Ok(*ticks);
    }
    let out = Command::new("getconf").arg("CLK_TCK").output()?;
    let ticks: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("getconf CLK_TCK")?;
    Ok(*TICKS.get_or_init(|| ticks))
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sum of a Prometheus text exposition's samples whose line starts with `series`, e.g.
/// `silo_reconciles_total{kind="tenant"` (all its other labels).
pub fn metric_sum(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
