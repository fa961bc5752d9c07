//! Provisioning benchmark: N Tenants applied at once across two PostgreSQL servers, against the
//! raw SQL floor (the same statements sent straight to the same servers with the same per-server
//! concurrency), in one run. Run through `e2e/bench.sh`.

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

#[derive(Parser)]
struct Args {
    /// Tenants to provision.
    #[arg(long, default_value_t = 500)]
    tenants: usize,
    /// Concurrent DDL per server, for the controller and for the raw SQL floor alike.
    #[arg(long, default_value_t = 4)]
    ddl_concurrency: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    Env::from_env()?; // an incomplete environment fails here, before any server starts
    let servers = [PgServer::start()?, PgServer::start()?];

    // 1. The floor: the controller's statements, straight to the servers (after a warm-up, so that
    //    neither side pays for a cold server).
    raw_sql_floor(&servers, 20, args.ddl_concurrency).await?;
    let floor_before = raw_sql_floor(&servers, args.tenants, args.ddl_concurrency).await?;

    // 2. The controller: N Tenants created at once, until all are Ready.
    let ns = TestNs::create("bench").await?;
    ns.add_server(&ns.server_name("one"), &servers[0], "  maxTenants: 100000")
        .await?;
    ns.add_server(&ns.server_name("two"), &servers[1], "  maxTenants: 100000")
        .await?;
    let ddl = args.ddl_concurrency.to_string();
    let ctl = ns.start_controller(&[
        "--ddl-concurrency",
        &ddl,
        "--resync-interval",
        "600",
        "--log-filter",
        "warn",
    ])?;
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
    let expected = args.tenants;
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
            if ready.len() == expected {
                return Ok(());
            }
        }
        anyhow::bail!("the tenant watch ended")
    });
    // Requests counted by the API server from here until all are Ready: the benchmark's own
    // (one POST per Tenant, one watch) and the controller's.
    let requests_before = RequestCounts::read(&ns.client).await?;
    let start = Instant::now();
    stream::iter(0..args.tenants)
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
    let mut requests = RequestCounts::read(&ns.client)
        .await?
        .since(&requests_before);
    if let Some(own) = requests.0.get_mut(&("POST".into(), "tenants".into())) {
        *own -= args.tenants as f64;
    }
    requests.0.retain(|_, n| *n > 0.0);
    let rss = ctl
        .peak_rss_kib()
        .context("reading the controller's peak RSS")?;
    let (_, metrics) = ctl.http_get("/metrics").await?;
    let reconciles: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("silo_reconciles_total{kind=\"tenant\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let mut databases = 0;
    for server in &servers {
        let pool = server.admin_pool().await?;
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 't\\_bench\\_%'",
        )
        .fetch_one(&pool)
        .await?;
        databases += n;
    }
    anyhow::ensure!(
        databases as usize == args.tenants,
        "{databases} tenant databases on the servers"
    );
    drop(ctl);
    // The floor again, now that the servers hold the tenants too; the faster of the two counts.
    let floor_after = raw_sql_floor(&servers, args.tenants, args.ddl_concurrency).await?;
    let floor = floor_before.min(floor_after);

    let ratio = all_ready.as_secs_f64() / floor.as_secs_f64();
    let rows: [(&str, String); 8] = [
        (
            "raw SQL floor, before silo",
            format!("{:.2} s", floor_before.as_secs_f64()),
        ),
        (
            "raw SQL floor, after silo",
            format!("{:.2} s", floor_after.as_secs_f64()),
        ),
        (
            "silo: Tenants created (API)",
            format!("{:.2} s", created.as_secs_f64()),
        ),
        (
            "silo: all Tenants Ready",
            format!("{:.2} s", all_ready.as_secs_f64()),
        ),
        (
            "silo: tenants per second",
            format!("{:.0} /s", args.tenants as f64 / all_ready.as_secs_f64()),
        ),
        (
            "ratio silo / faster raw SQL floor",
            format!("{ratio:.2}   (target <= 1.2)"),
        ),
        (
            "silo: tenant reconciles",
            format!(
                "{reconciles:.0} ({:.1} per tenant)",
                reconciles / args.tenants as f64
            ),
        ),
        (
            "controller peak RSS",
            format!("{:.1} MiB", rss as f64 / 1024.0),
        ),
    ];
    println!();
    println!(
        "provisioning benchmark: {} tenants on 2 servers, {ddl} concurrent DDL per server",
        args.tenants
    );
    for (what, value) in rows {
        println!("  {what:<40} {value}");
    }
    println!("  ({databases} tenant databases verified on the servers)");
    let per = args.tenants as f64;
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
    Ok(())
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
