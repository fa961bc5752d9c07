//! Router benchmark, the Kubernetes part: how long after a Tenant turns Ready its first query goes
//! through silo-router, which learns tenants from its watches. Tenants are applied one at a time;
//! a watch here sees each turn Ready while a client keeps trying to connect through the router.
//! Run through `e2e/bench-router.sh`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures::TryStreamExt;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};
use silo_crds::{Tenant, TenantPhase, TenantSpec};
use silo_e2e::{PgServer, RouterProcess, TestNs, wait_for};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};

#[derive(Parser)]
struct Args {
    /// Tenants to apply, one after the other.
    #[arg(long, default_value_t = 20)]
    tenants: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ns = TestNs::create("bench-ready").await?;
    let pg = PgServer::start()?;
    ns.add_server(&ns.server_name("pg"), &pg, "").await?;
    let router = RouterProcess::start(&ns, "transaction")?;
    let _controller = ns.start_controller(&["--log-filter", "warn"])?;

    // When this process first saw each tenant Ready.
    let ready_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let seen = ready_at.clone();
    let api = ns.tenants();
    let watch_api = api.clone();
    tokio::spawn(async move {
        let mut events =
            std::pin::pin!(watcher(watch_api, watcher::Config::default()).applied_objects());
        while let Ok(Some(tenant)) = events.try_next().await {
            if tenant.status.and_then(|s| s.phase) == Some(TenantPhase::Ready) {
                let name = tenant.metadata.name.unwrap_or_default();
                if let Ok(mut seen) = seen.lock() {
                    seen.entry(name).or_insert_with(Instant::now);
                }
            }
        }
    });

    let mut latencies = Vec::with_capacity(args.tenants);
    for i in 0..args.tenants {
        let name = format!("ready-{i:03}");
        let tenant = Tenant::new(&name, TenantSpec::default());
        api.create(&PostParams::default(), &tenant).await?;
        // Keep trying: first for the Secret (written before the tenant is Ready), then through
        // the router, a few milliseconds apart, so that the first success is seen when it happens.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut options: Option<PgConnectOptions> = None;
        let routed_at = loop {
            anyhow::ensure!(Instant::now() < deadline, "{name} never became routable");
            match &options {
                None => {
                    if let Ok([user, password]) =
                        ns.secret_values(&name, ["user", "password"]).await
                    {
                        options = Some(
                            PgConnectOptions::new()
                                .host("127.0.0.1")
                                .port(router.port)
                                .username(&user)
                                .password(&password)
                                .database(&format!("{}.{name}", ns.name)),
                        );
                        continue;
                    }
                }
                Some(options) => {
                    if let Ok(mut conn) = PgConnection::connect_with(options).await {
                        let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut conn).await?;
                        anyhow::ensure!(one == 1);
                        break Instant::now();
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let ready = wait_for("the Ready event", Duration::from_secs(10), || async {
            ready_at.lock().ok()?.get(&name).copied()
        })
        .await?;
        // A query can go through before this process's own watch delivers Ready: count it as 0.
        latencies.push(routed_at.saturating_duration_since(ready));
    }

    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    println!(
        "time from Tenant Ready to its first query through the router ({} tenants): \
         median {:.0} ms, p90 {:.0} ms, max {:.0} ms (target < 1000 ms)",
        latencies.len(),
        ms(at(0.5)),
        ms(at(0.9)),
        ms(*latencies.last().context("no tenants")?)
    );
    Ok(())
}
