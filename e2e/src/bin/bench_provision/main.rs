//! Provisioning benchmark: N Tenants applied at once across two PostgreSQL servers, against the
//! raw SQL floor (the same statements sent straight to the same servers with the same per-server
//! concurrency) and the API writes alone (the controller's creates and patches, replayed), in one
//! run; then a controller restart with the fleet Ready. Run through `e2e/bench.sh`.

mod replay;
mod restart;
mod summary;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures::{StreamExt, TryStreamExt, stream};
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};
use silo_crds::{Tenant, TenantPhase, TenantSpec};
use silo_e2e::apiserver::RequestCounts;
use silo_e2e::{Env, PgServer, TestNs, wait_for};
use sqlx::postgres::PgPoolOptions;
use tokio::sync::Mutex;

use summary::Figures;

#[derive(Parser)]
struct Args {
    /// Tenants to provision.
    #[arg(long, default_value_t = 500)]
    tenants: usize,
    /// Concurrent DDL per server, for the controller and for the raw SQL floor alike.
    #[arg(long, default_value_t = 4)]
    ddl_concurrency: usize,
    /// Tenants the controller reconciles in parallel (its `--tenant-concurrency`, default 64),
    /// and the API-writes baseline replays in parallel.
    #[arg(long, default_value_t = 64)]
    tenant_concurrency: usize,
    /// Writes this run's figures as JSON to this file, for `--summary`.
    #[arg(long)]
    results: Option<PathBuf>,
    /// Prints the per-tenant comparison of earlier runs (their `--results` files) and exits.
    #[arg(long, num_args = 1.., conflicts_with = "results")]
    summary: Vec<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.summary.is_empty() {
        return summary::print(&args.summary);
    }
    Env::from_env()?; // an incomplete environment fails here, before any server starts
    let n = args.tenants;
    let per = n as f64;
    let servers = [PgServer::start()?, PgServer::start()?];

    // 1. The floor: the controller's statements, straight to the servers (after a warm-up, so that
    //    neither side pays for a cold server).
    raw_sql_floor(&servers, 20, args.ddl_concurrency).await?;
    let floor_before = raw_sql_floor(&servers, n, args.ddl_concurrency).await?;

    // 2. The controller: N Tenants created at once, until all are Ready.
    let ns = TestNs::create("bench").await?;
    ns.add_server(&ns.server_name("one"), &servers[0], "  maxTenants: 100000")
        .await?;
    ns.add_server(&ns.server_name("two"), &servers[1], "  maxTenants: 100000")
        .await?;
    let ddl = args.ddl_concurrency.to_string();
    let tenant_concurrency = args.tenant_concurrency.to_string();
    let controller_args = [
        "--ddl-concurrency",
        &ddl,
        "--tenant-concurrency",
        &tenant_concurrency,
        "--resync-interval",
        "600",
        "--log-filter",
        "warn",
    ];
    let mut ctl = ns.start_controller(&controller_args)?;
    for s in ["one", "two"] {
        let name = ns.server_name(s);
        wait_for("servers ready", Duration::from_secs(60), || async {
            let st = ns.servers().get(&name).await.ok()?.status?;
            st.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        })
        .await?;
    }

    let api = ns.tenants();
    // Watch (rather than poll) for readiness, so that measuring does not load the API server.
    let watch_api = api.clone();
    let all_ready = tokio::spawn(async move {
        let mut ready = std::collections::HashSet::new();
        let mut events =
            std::pin::pin!(watcher(watch_api, watcher::Config::default()).applied_objects());
        while let Some(tenant) = events.try_next().await? {
            let name = tenant.metadata.name.clone().unwrap_or_default();
            if tenant.status.and_then(|s| s.phase) == Some(TenantPhase::Ready) {
                ready.insert(name);
            } else {
                ready.remove(&name);
            }
            if ready.len() == n {
                return Ok(());
            }
        }
        anyhow::bail!("the tenant watch ended")
    });
    // Requests counted by the API server from here until all are Ready: the benchmark's own
    // (one POST per Tenant, one watch) and the controller's.
    let requests_before = RequestCounts::read(&ns.client).await?;
    let cpu_before = ctl.cpu_seconds()?;
    let start = Instant::now();
    stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let tenant = Tenant::new(&format!("tenant-{i:05}"), TenantSpec::default());
                api.create(&PostParams::default(), &tenant).await
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    let created = start.elapsed();
    tokio::time::timeout(Duration::from_secs(1800), all_ready)
        .await
        .context("tenants not all Ready within 30 minutes")???;
    let all_ready = start.elapsed();
    let cpu = ctl.cpu_seconds()? - cpu_before;
    let mut requests = RequestCounts::read(&ns.client)
        .await?
        .since(&requests_before);
    if let Some(own) = requests.0.get_mut(&("POST".into(), "tenants".into())) {
        *own -= per;
    }
    requests.0.retain(|_, n| *n > 0.0);
    let (requests, upkeep) = requests.split_upkeep();
    let rss = ctl
        .peak_rss_kib()
        .context("reading the controller's peak RSS")?;
    let (_, metrics) = ctl.http_get("/metrics").await?;
    let reconciles = tenant_reconciles(&metrics);
    let mut databases = 0;
    let mut database_bytes = 0;
    for server in &servers {
        let pool = server.admin_pool().await?;
        let (count, bytes): (i64, Option<i64>) = sqlx::query_as(
            "SELECT count(*), sum(pg_database_size(datname))::bigint FROM pg_database \
             WHERE datname LIKE 't\\_bench\\_%'",
        )
        .fetch_one(&pool)
        .await?;
        databases += count;
        database_bytes += bytes.unwrap_or(0);
    }
    anyhow::ensure!(
        databases as usize == n,
        "{databases} tenant databases on the servers"
    );
    // Stopped gracefully: the restart below starts from here.
    ctl.terminate()?;

    // The floor again, now that the servers hold the tenants too (when the disk has room for a
    // second set of databases); the faster of the two counts.
    let needed = (database_bytes as f64 * 1.2) as u64 + (2 << 30);
    let free = free_bytes(servers[0].data_dir())?;
    let floor_after = if free > needed {
        Some(raw_sql_floor(&servers, n, args.ddl_concurrency).await?)
    } else {
        None
    };
    let floor = floor_after.map_or(floor_before, |after| floor_before.min(after));

    // 3. A restart with the fleet Ready, one tenant drifted.
    let drifted = format!("tenant-{:05}", n - 1);
    let restarted = restart::run(&ns, &servers, &controller_args, n, &drifted).await?;
    let (restart_requests, restart_upkeep) = restarted.requests.split_upkeep();

    // 4. The API writes alone, with the controller stopped (last: the deletion of its namespace
    //    is left to the control plane, after everything was measured).
    let writes = requests.only_writes();
    let replayed = replay::run(&ns, &writes, n, args.tenant_concurrency).await?;
    let combined = floor + replayed.elapsed;

    let ratio = all_ready.as_secs_f64() / floor.as_secs_f64();
    let combined_ratio = all_ready.as_secs_f64() / combined.as_secs_f64();
    let secs = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    let rows: Vec<(&str, String)> = vec![
        ("raw SQL floor, before silo", secs(floor_before)),
        (
            "raw SQL floor, after silo",
            match floor_after {
                Some(after) => secs(after),
                None => format!(
                    "skipped: {:.1} GB free, a second set of databases needs {:.1} GB",
                    free as f64 / 1e9,
                    needed as f64 / 1e9
                ),
            },
        ),
        ("silo: Tenants created (API)", secs(created)),
        ("silo: all Tenants Ready", secs(all_ready)),
        (
            "silo: tenants per second",
            format!("{:.0} /s", per / all_ready.as_secs_f64()),
        ),
        (
            "ratio silo / faster raw SQL floor",
            format!("{ratio:.2}   (target <= 1.2)"),
        ),
        (
            "API writes alone (replayed)",
            format!(
                "{}   ({:.0} writes, {} tenants at a time)",
                secs(replayed.elapsed),
                replayed.counted.writes(),
                args.tenant_concurrency
            ),
        ),
        ("combined floor (SQL + API writes)", secs(combined)),
        (
            "ratio silo / combined floor",
            format!("{combined_ratio:.2}   (target <= 1.1)"),
        ),
        (
            "silo: tenant reconciles",
            format!("{reconciles:.0} ({:.1} per tenant)", reconciles / per),
        ),
        (
            "controller CPU",
            format!("{cpu:.2} s ({:.2} ms per tenant)", cpu * 1000.0 / per),
        ),
        (
            "controller peak RSS",
            format!("{:.1} MiB", rss as f64 / 1024.0),
        ),
    ];
    println!();
    println!(
        "provisioning benchmark: {n} tenants on 2 servers, {ddl} concurrent DDL per server, \
         {tenant_concurrency} tenants reconciled in parallel"
    );
    for (what, value) in rows {
        println!("  {what:<40} {value}");
    }
    println!(
        "  ({databases} tenant databases verified on the servers, {:.1} MB each)",
        database_bytes as f64 / per / 1e6
    );
    println!();
    println!(
        "API requests of the controller until all Ready (the API server's apiserver_request_total, \
         less the benchmark's own Tenant creates): {:.2} writes per tenant (target <= 4)",
        requests.writes() / per
    );
    println!(
        "  {:<8} {:<32} {:>8} {:>8}",
        "verb", "resource", "total", "/tenant"
    );
    for line in requests.table(per) {
        println!("  {line}");
    }
    for line in upkeep.table(per) {
        println!("  left out, the control plane's own upkeep: {line}");
    }
    println!("  replayed as the API-writes baseline (counted by the API server):");
    for line in replayed.counted.table(per) {
        println!("  {line}");
    }
    for line in replayed.not_replayed.table(per) {
        println!("  not replayed: {line}");
    }

    let restart_writes = restart_requests.writes();
    println!();
    println!(
        "controller restart with {n} Ready tenants (SIGTERM, started again; {drifted}'s password \
         changed by hand just before), times from the start of the new process:"
    );
    let rows: Vec<(&str, String)> = vec![
        ("/readyz answers 200", secs(restarted.ready)),
        (
            "every tenant reconciled once",
            format!(
                "{}   (silo_reconciles_total{{kind=\"tenant\"}} >= {n})",
                secs(restarted.full_pass)
            ),
        ),
        (
            "drifted password repaired",
            format!(
                "{}   (a login with the Secret's works)",
                secs(restarted.drift_repaired)
            ),
        ),
        ("API writes", format!("{restart_writes:.0}   (target 0)")),
        (
            "SQL statements: DDL / other",
            format!(
                "{} / {}   ({})",
                restarted.ddl_statements(),
                restarted.other_statements(),
                restarted
                    .statements
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        (
            "controller CPU",
            format!(
                "{:.2} s ({:.2} ms per tenant)",
                restarted.cpu_seconds,
                restarted.cpu_seconds * 1000.0 / per
            ),
        ),
        (
            "controller RSS after (peak)",
            format!(
                "{:.1} MiB ({:.1} MiB)",
                restarted.rss_kib as f64 / 1024.0,
                restarted.peak_rss_kib as f64 / 1024.0
            ),
        ),
    ];
    for (what, value) in rows {
        println!("  {what:<40} {value}");
    }
    println!("  API requests of the restart:");
    for line in restart_requests.table(per) {
        println!("  {line}");
    }
    for line in restart_upkeep.table(per) {
        println!("  left out, the control plane's own upkeep: {line}");
    }

    if let Some(path) = &args.results {
        Figures {
            tenants: n,
            all_ready_s: all_ready.as_secs_f64(),
            sql_floor_s: floor.as_secs_f64(),
            api_writes_s: replayed.elapsed.as_secs_f64(),
            api_writes: requests.writes(),
            cpu_s: cpu,
            peak_rss_mib: rss as f64 / 1024.0,
            restart_ready_s: restarted.ready.as_secs_f64(),
            restart_pass_s: restarted.full_pass.as_secs_f64(),
            restart_writes,
            restart_ddl: restarted.ddl_statements(),
            restart_other_sql: restarted.other_statements(),
            restart_cpu_s: restarted.cpu_seconds,
            restart_rss_mib: restarted.rss_kib as f64 / 1024.0,
            drift_repaired_s: restarted.drift_repaired.as_secs_f64(),
        }
        .write(path)?;
    }
    Ok(())
}

/// `silo_reconciles_total{kind="tenant",...}` summed over its other labels.
fn tenant_reconciles(metrics: &str) -> f64 {
    silo_e2e::controller::metric_sum(metrics, "silo_reconciles_total{kind=\"tenant\"")
}

/// Bytes free for an unprivileged user on the file system holding `path` (`df`).
fn free_bytes(path: &std::path::Path) -> anyhow::Result<u64> {
    let out = std::process::Command::new("df")
        .args(["-Pk", "--"])
        .arg(path)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let kib: u64 = text
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("df {}: {text}", path.display()))?;
    Ok(kib * 1024)
}

/// Sends, per tenant, what the controller sends for a new tenant (role with a SCRAM verifier,
/// database, REVOKE/GRANT, comment), half the tenants per server, `concurrency` connections per
/// server. Returns the wall time; the databases are dropped again afterwards, untimed.
async fn raw_sql_floor(
    servers: &[PgServer; 2],
    tenants: usize,
    concurrency: usize,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (s, server) in servers.iter().enumerate() {
        let pool = PgPoolOptions::new()
            .max_connections(concurrency as u32)
            .connect_with(server.admin_options())
            .await?;
        let queue: Arc<Mutex<Vec<usize>>> =
            Arc::new(Mutex::new((0..tenants).filter(|i| i % 2 == s).collect()));
        for _ in 0..concurrency {
            let pool = pool.clone();
            let queue = queue.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let Some(i) = queue.lock().await.pop() else {
                        return Ok::<_, sqlx::Error>(());
                    };
                    let name = format!("raw_{i:05}");
                    let verifier =
                        postgres_protocol::password::scram_sha_256(b"benchmark-password");
                    sqlx::raw_sql(&format!(
                        "CREATE ROLE \"{name}\" LOGIN CONNECTION LIMIT 20 PASSWORD '{verifier}'"
                    ))
                    .execute(&pool)
                    .await?;
                    sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\" OWNER \"{name}\""))
                        .execute(&pool)
                        .await?;
                    sqlx::raw_sql(&format!("REVOKE ALL ON DATABASE \"{name}\" FROM PUBLIC"))
                        .execute(&pool)
                        .await?;
                    sqlx::raw_sql(&format!(
                        "GRANT CONNECT, TEMPORARY ON DATABASE \"{name}\" TO \"{name}\""
                    ))
                    .execute(&pool)
                    .await?;
                    sqlx::raw_sql(&format!(
                        "COMMENT ON DATABASE \"{name}\" IS 'silo: tenant bench/{name}'"
                    ))
                    .execute(&pool)
                    .await?;
                }
            }));
        }
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = start.elapsed();
    for server in servers {
        let pool = server.admin_pool().await?;
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT datname::text FROM pg_database WHERE datname LIKE 'raw\\_%'",
        )
        .fetch_all(&pool)
        .await?;
        for name in names {
            sqlx::raw_sql(&format!("DROP DATABASE \"{name}\""))
                .execute(&pool)
                .await?;
            sqlx::raw_sql(&format!("DROP ROLE \"{name}\""))
                .execute(&pool)
                .await?;
        }
    }
    Ok(elapsed)
}
