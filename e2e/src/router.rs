//! The router as a local process, reading tenants from the test cluster; killed on drop.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::kube_env::TestNs;
use crate::postgres::free_port;

pub struct RouterProcess {
    child: Child,
    pub port: u16,
    pub http_port: u16,
    pub log: std::path::PathBuf,
}

impl RouterProcess {
    /// Starts `silo-router` against the test cluster and waits until it accepts clients (which it
    /// does only once it knows every tenant).
    pub fn start(ns: &TestNs, mode: &str) -> anyhow::Result<RouterProcess> {
        Self::start_with(ns, mode, &ns.env.router_kubeconfig, &[])
    }

    /// `start`, authenticating with `kubeconfig` and passing `extra` flags.
    pub fn start_with(
        ns: &TestNs,
        mode: &str,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> anyhow::Result<RouterProcess> {
        Self::start_bin(ns, &ns.env.router_bin, mode, kubeconfig, extra)
    }

    /// `start_with`, running the router binary `bin` (another build, for a comparison).
    pub fn start_bin(
        ns: &TestNs,
        bin: &Path,
        mode: &str,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> anyhow::Result<RouterProcess> {
        let port = free_port()?;
        let http_port = free_port()?;
        let dir = std::env::var_os("SILO_E2E_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let log = dir.join(format!("silo-router-{}-{port}.log", ns.name));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(bin)
            .env("KUBECONFIG", kubeconfig)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--http-addr",
                &format!("127.0.0.1:{http_port}"),
                "--pool-mode",
                mode,
                "--log-filter",
                "info",
            ])
            .args(extra)
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut router = RouterProcess {
            child,
            port,
            http_port,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || !matches!(router.child.try_wait(), Ok(None)) {
                bail!(
                    "router did not start: {}",
                    std::fs::read_to_string(&router.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(router)
    }

    /// Its resident memory now, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// GET a path on its HTTP server, returning (status, body).
    pub async fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        crate::http_get(self.http_port, path).await
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
