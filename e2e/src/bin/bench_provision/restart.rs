//! A controller restart with the fleet Ready: a full resync. Measures how soon the new process is
//! ready and has reconciled every tenant once, what that pass costs (API writes, SQL statements,
//! CPU, memory), and how long one tenant whose password was changed by hand just before takes to
//! be repaired meanwhile.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use silo_e2e::apiserver::RequestCounts;
use silo_e2e::{PgServer, TestNs};
use sqlx::{ConnectOptions, Connection};

/// What a statement's first word says it is (DDL, as the issue counts it, or anything else).
const DDL: [&str; 6] = ["CREATE", "ALTER", "DROP", "GRANT", "REVOKE", "COMMENT"];

pub struct Restart {
    /// From starting the process until /readyz answered 200.
    pub ready: Duration,
    /// From starting the process until `silo_reconciles_total{kind="tenant"}` reached the fleet.
    pub full_pass: Duration,
    /// From starting the process until the drifted tenant's Secret password logged in again.
    pub drift_repaired: Duration,
    /// The API requests counted from the start until the pass ended (and a second more).
    pub requests: RequestCounts,
    /// Statements the servers received meanwhile, by first keyword.
    pub statements: BTreeMap<String, u64>,
    pub cpu_seconds: f64,
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
}

impl Restart {
    pub fn ddl_statements(&self) -> u64 {
        self.statements
            .iter()
            .filter(|(k, _)| DDL.contains(&k.as_str()))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn other_statements(&self) -> u64 {
        self.statements.values().sum::<u64>() - self.ddl_statements()
    }
}

/// Drifts `drifted`'s password, then starts the controller with `args` and measures until every
/// one of `tenants` was reconciled and the drift repaired. The previous controller must be
/// stopped already.
pub async fn run(
    ns: &TestNs,
    servers: &[PgServer; 2],
    args: &[&str],
    tenants: usize,
    drifted: &str,
) -> anyhow::Result<Restart> {
    // The drift: the tenant's login gets a password its Secret does not hold.
    let [user, password, dbname, port] = ns
        .secret_values(drifted, ["user", "password", "dbname", "port"])
        .await?;
    let server = servers
        .iter()
        .find(|s| s.port.to_string() == port)
        .with_context(|| format!("no server on port {port} for {drifted}"))?;
    let admin = server.admin_pool().await?;
    sqlx::raw_sql(&format!(
        "ALTER ROLE \"{}\" PASSWORD 'drifted'",
        user.replace('"', "\"\"")
    ))
    .execute(&admin)
    .await?;
    admin.close().await;
    let login = server.options(&user, &password, &dbname);
    anyhow::ensure!(
        login.connect().await.is_err(),
        "the drifted password still logs in"
    );

    // Every statement the servers receive from here on is logged.
    let mut offsets = Vec::new();
    for server in servers {
        server.set_log_statement("all").await?;
        offsets.push(std::fs::metadata(server.log_path())?.len());
    }
    // The postmaster passes the reload on to new backends asynchronously.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = RequestCounts::read(&ns.client).await?;

    let start = Instant::now();
    let mut ctl = ns.start_controller(args)?;
    let repaired = tokio::spawn(async move {
        loop {
            if let Ok(conn) = login.connect().await {
                let elapsed = start.elapsed();
                let _ = conn.close().await;
                return elapsed;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let deadline = Duration::from_secs(1800);
    let ready = loop {
        if let Ok((200, _)) = ctl.http_get("/readyz").await {
            break start.elapsed();
        }
        anyhow::ensure!(ctl.is_running(), "the restarted controller exited");
        anyhow::ensure!(start.elapsed() < deadline, "not ready within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let full_pass = loop {
        let (_, metrics) = ctl.http_get("/metrics").await?;
        if super::tenant_reconciles(&metrics) >= tenants as f64 {
            break start.elapsed();
        }
        anyhow::ensure!(
            start.elapsed() < deadline,
            "not every tenant reconciled within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let drift_repaired = tokio::time::timeout(deadline, repaired)
        .await
        .context("the drifted password was not repaired")??;
    let cpu_seconds = ctl.cpu_seconds()?;
    let rss_kib = ctl.rss_kib().context("reading the controller's RSS")?;
    let peak_rss_kib = ctl.peak_rss_kib().context("reading the controller's RSS")?;
    // Writes that trail the last reconcile count too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let requests = RequestCounts::read(&ns.client).await?.since(&before);
    ctl.terminate()?;

    let mut statements = BTreeMap::new();
    for (server, offset) in servers.iter().zip(offsets) {
        server.set_log_statement("none").await?;
        let log = std::fs::read(server.log_path())?;
        let new = log.get(offset as usize..).unwrap_or_default();
        for (keyword, n) in count_statements(&String::from_utf8_lossy(new)) {
            *statements.entry(keyword).or_insert(0) += n;
        }
    }
    Ok(Restart {
        ready,
        full_pass,
        drift_repaired,
        requests,
        statements,
        cpu_seconds,
        rss_kib,
        peak_rss_kib,
    })
}

/// Statements in a PostgreSQL log written with `log_statement = all`, by first keyword: the simple
/// protocol's `statement: ...` lines and the extended protocol's `execute <name>: ...` lines.
/// The benchmark's own switching of `log_statement` is left out.
fn count_statements(log: &str) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    let mut lines = log.lines().peekable();
    while let Some(line) = lines.next() {
        let sql = if let Some((_, sql)) = line.split_once("LOG:  statement: ") {
            sql
        } else if let Some((_, rest)) = line.split_once("LOG:  execute ") {
            match rest.split_once(": ") {
                Some((_, sql)) => sql,
                None => continue,
            }
        } else {
            continue;
        };
        if sql.contains("log_statement") || sql.contains("pg_reload_conf") {
            continue;
        }
        // A statement that starts with a line break has its first word on the next line.
        let first = match sql.split_whitespace().next() {
            Some(word) => word,
            None => lines
                .peek()
                .and_then(|next| next.split_whitespace().next())
                .unwrap_or_default(),
        };
        let keyword = first.to_uppercase();
        *counts.entry(keyword).or_insert(0) += 1;
    }
    counts
}
