//! Router benchmark, the Kubernetes part at fleet size: silo-router learning 2,000 live tenants
//! from Kubernetes. Prints its RSS once it knows them all, and how long after a Tenant's change
//! the router acts on it (suspended: refused with 57P03; a new password in its Secret: accepted)
//! while 100 other tenants change at the same moment. No controller runs: Tenants (with a Ready
//! status) and their Secrets are written straight to the API server, as the controller would
//! leave them; only the measured tenant has a real database. With `--baseline` another router
//! binary is measured too, in the order router baseline baseline router.
//! Run through `e2e/bench-router.sh` (case `fleet`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use silo_crds::contract;
use silo_crds::{Tenant, TenantSpec};
use silo_e2e::postgres::random_password;
use silo_e2e::{PgServer, RouterProcess, TestNs};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};

#[derive(Parser)]
struct Args {
    /// Tenants the router learns, the measured one included.
    #[arg(long, default_value_t = 2000)]
    tenants: usize,
    /// Other tenants changing at the moment the measured one does.
    #[arg(long, default_value_t = 100)]
    others: usize,
    /// Measurements of each kind, per router run.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Another silo-router binary to measure the same way (e.g. the previous release).
    #[arg(long, env = "SILO_BENCH_BASELINE_ROUTER")]
    baseline: Option<PathBuf>,
}

/// The measured tenant; the others are `f0001`...
const PROBE: &str = "probe";
const PROBE_ROLE: &str = "r_probe";
const PROBE_DB: &str = "d_probe";

/// What one router run measured.
#[derive(Default)]
struct Figures {
    /// Once it knows every tenant, and after the rounds of changes.
    rss_loaded_kib: Vec<u64>,
    rss_after_kib: Vec<u64>,
    suspend: Vec<Duration>,
    password: Vec<Duration>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.others < args.tenants,
        "--others must be fewer than --tenants"
    );
    let ns = TestNs::create("bench-fleet").await?;
    let pg = PgServer::start()?;
    let server = ns.server_name("pg");
    ns.add_server(&server, &pg, "").await?;
    let mut password = random_password();
    let admin = pg.admin_pool().await?;
    sqlx::query(&format!(
        "CREATE ROLE {PROBE_ROLE} LOGIN PASSWORD '{password}'"
    ))
    .execute(&admin)
    .await?;
    sqlx::query(&format!("CREATE DATABASE {PROBE_DB} OWNER {PROBE_ROLE}"))
        .execute(&admin)
        .await?;

    let started = Instant::now();
    let others: Vec<String> = (1..args.tenants).map(|i| format!("f{i:04}")).collect();
    create_tenant(&ns, &server, PROBE, &password).await?;
    stream::iter(others.iter())
        .map(|name| create_tenant(&ns, &server, name, "unused"))
        .buffer_unordered(16)
        .try_collect::<()>()
        .await?;
    eprintln!(
        "bench_router_fleet: {} tenants and Secrets written in {:.0?}",
        args.tenants,
        started.elapsed()
    );

    let mut runs: Vec<(String, PathBuf)> = vec![("router".into(), ns.env.router_bin.clone())];
    if let Some(baseline) = &args.baseline {
        runs.push(("baseline".into(), baseline.clone()));
        runs.push(("baseline".into(), baseline.clone()));
        runs.push(("router".into(), ns.env.router_bin.clone()));
    }
    let mut figures: Vec<(String, Figures)> = Vec::new();
    let mut wave = 0;
    for (label, bin) in &runs {
        eprintln!("bench_router_fleet: {label} ({})", bin.display());
        let router = start_router(&ns, bin, args.tenants).await?;
        let entry = match figures.iter_mut().position(|(l, _)| l == label) {
            Some(at) => &mut figures[at].1,
            None => {
                figures.push((label.clone(), Figures::default()));
                &mut figures.last_mut().context("just pushed")?.1
            }
        };
        // Settled: the first table and the watches' initial lists are behind it.
        tokio::time::sleep(Duration::from_secs(3)).await;
        entry.rss_loaded_kib.extend(router.rss_kib());
        for _ in 0..args.rounds {
            let changing =
                &others[(wave * args.others) % (others.len() - args.others)..][..args.others];
            wave += 1;
            entry
                .suspend
                .push(time_suspension(&ns, &router, changing, &password).await?);
            let new = random_password();
            sqlx::query(&format!("ALTER ROLE {PROBE_ROLE} PASSWORD '{new}'"))
                .execute(&admin)
                .await?;
            entry
                .password
                .push(time_new_password(&ns, &router, changing, &new).await?);
            password = new;
        }
        entry.rss_after_kib.extend(router.rss_kib());
    }

    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let spread = |mut v: Vec<Duration>| {
        v.sort();
        let median = v.get(v.len() / 2).map_or(0.0, ms);
        let max = v.last().map_or(0.0, ms);
        format!("median {median:.0} ms, max {max:.0} ms")
    };
    for (label, f) in figures {
        let mib = |kib: &[u64]| kib.iter().max().copied().unwrap_or(0) / 1024;
        println!(
            "{label} with {} live tenants from kubernetes: RSS {} MiB loaded, {} MiB after the \
             changes; while {} other tenants change at once ({} rounds): suspend -> refused {}; \
             new password -> accepted {}",
            args.tenants,
            mib(&f.rss_loaded_kib),
            mib(&f.rss_after_kib),
            args.others,
            f.suspend.len(),
            spread(f.suspend),
            spread(f.password),
        );
    }
    ns.cleanup().await;
    Ok(())
}

/// A Tenant as the controller leaves a Ready one on `server`, and its credentials Secret.
async fn create_tenant(
    ns: &TestNs,
    server: &str,
    name: &str,
    password: &str,
) -> anyhow::Result<()> {
    let (role, database) = if name == PROBE {
        (PROBE_ROLE.to_string(), PROBE_DB.to_string())
    } else {
        (format!("r_{name}"), format!("d_{name}"))
    };
    let tenants = ns.tenants();
    tenants
        .create(
            &PostParams::default(),
            &Tenant::new(name, TenantSpec::default()),
        )
        .await
        .with_context(|| format!("creating tenant {name}"))?;
    let status = serde_json::json!({"status": {
        "phase": "Ready",
        "server": server,
        "database": database,
        "role": role,
        "secretName": contract::secret_name(name),
    }});
    tenants
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("writing tenant {name}'s status"))?;
    let mut secret = Secret {
        data: Some(
            [
                (contract::keys::USER, role.as_str()),
                (contract::keys::PASSWORD, password),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect(),
        ),
        ..Default::default()
    };
    secret.metadata.name = Some(contract::secret_name(name));
    secret.metadata.labels = Some(
        [(
            contract::MANAGED_BY_LABEL.to_string(),
            contract::MANAGED_BY.to_string(),
        )]
        .into(),
    );
    ns.secrets()
        .create(&PostParams::default(), &secret)
        .await
        .with_context(|| format!("creating tenant {name}'s Secret"))?;
    Ok(())
}

/// Starts `bin` and waits until it routes the probe.
async fn start_router(ns: &TestNs, bin: &Path, tenants: usize) -> anyhow::Result<RouterProcess> {
    let router = RouterProcess::start_bin(ns, bin, "transaction", &ns.env.router_kubeconfig, &[])?;
    let (_, body) = router.http_get("/v1/tenants").await?;
    let listed: serde_json::Value = serde_json::from_str(&body)?;
    let known = listed["tenants"].as_array().map_or(0, Vec::len);
    anyhow::ensure!(
        known >= tenants,
        "the router knows {known} tenants of {tenants}"
    );
    Ok(router)
}

/// What a client logging in to the probe through the router gets.
#[derive(Debug, PartialEq)]
enum Outcome {
    Served,
    /// Refused with this SQLSTATE (or the error's text when it has none).
    Refused(String),
}

async fn try_probe(router: &RouterProcess, ns: &TestNs, password: &str) -> Outcome {
    let options = PgConnectOptions::new()
        .host("127.0.0.1")
        .port(router.port)
        .username(PROBE_ROLE)
        .password(password)
        .database(&format!("{}.{PROBE}", ns.name));
    let served = async {
        let mut conn = PgConnection::connect_with(&options).await?;
        sqlx::query_scalar::<_, i32>("SELECT 1")
            .fetch_one(&mut conn)
            .await
    };
    match served.await {
        Ok(_) => Outcome::Served,
        Err(e) => Outcome::Refused(
            e.as_database_error()
                .and_then(|d| d.code().map(|c| c.into_owned()))
                .unwrap_or_else(|| e.to_string()),
        ),
    }
}

/// Tries the probe every few milliseconds until `done` says the outcome is the awaited one;
/// returns when that was first seen.
async fn until(
    what: &str,
    router: &RouterProcess,
    ns: &TestNs,
    password: &str,
    done: impl Fn(&Outcome) -> bool,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let outcome = try_probe(router, ns, password).await;
        if done(&outcome) {
            return Ok(Instant::now());
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: still {outcome:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Patches `spec.suspended` of the tenants `names`, all at once.
async fn suspend_all(ns: &TestNs, names: &[String], suspended: bool) -> anyhow::Result<()> {
    let tenants = ns.tenants();
    let patch = serde_json::json!({"spec": {"suspended": suspended}});
    stream::iter(names)
        .map(|name| {
            let (tenants, patch) = (&tenants, &patch);
            async move {
                tenants
                    .patch(name, &PatchParams::default(), &Patch::Merge(patch))
                    .await
            }
        })
        .buffer_unordered(names.len().max(1))
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// From the probe's suspension (sent while `others` are suspended at the same moment) to the
/// router refusing it.
async fn time_suspension(
    ns: &TestNs,
    router: &RouterProcess,
    others: &[String],
    password: &str,
) -> anyhow::Result<Duration> {
    until("served before", router, ns, password, |o| {
        *o == Outcome::Served
    })
    .await?;
    let others_change = suspend_all(ns, others, true);
    let probe = async {
        let sent = Instant::now();
        suspend_all(ns, &[PROBE.to_string()], true).await?;
        let refused = until("refused once suspended", router, ns, password, |o| {
            *o == Outcome::Refused("57P03".into())
        })
        .await?;
        anyhow::Ok(refused - sent)
    };
    let (others_done, took) = tokio::join!(others_change, probe);
    others_done?;
    let took = took?;
    let mut all = others.to_vec();
    all.push(PROBE.to_string());
    suspend_all(ns, &all, false).await?;
    Ok(took)
}

/// Writes `password` as the password of each tenant's Secret, all at once.
async fn set_passwords(ns: &TestNs, names: &[String], password: &str) -> anyhow::Result<()> {
    let secrets = ns.secrets();
    let patch = serde_json::json!({"stringData": {contract::keys::PASSWORD: password}});
    stream::iter(names)
        .map(|name| {
            let (secrets, patch) = (&secrets, &patch);
            async move {
                secrets
                    .patch(
                        &contract::secret_name(name),
                        &PatchParams::default(),
                        &Patch::Merge(patch),
                    )
                    .await
            }
        })
        .buffer_unordered(names.len().max(1))
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// From the probe's new password in its Secret (written while `others` get new ones at the same
/// moment) to the router accepting it.
async fn time_new_password(
    ns: &TestNs,
    router: &RouterProcess,
    others: &[String],
    password: &str,
) -> anyhow::Result<Duration> {
    let others_password = random_password();
    let others_change = set_passwords(ns, others, &others_password);
    let probe = async {
        let sent = Instant::now();
        set_passwords(ns, &[PROBE.to_string()], password).await?;
        let served = until("served with the new password", router, ns, password, |o| {
            *o == Outcome::Served
        })
        .await?;
        anyhow::Ok(served - sent)
    };
    let (others_done, took) = tokio::join!(others_change, probe);
    others_done?;
    took
}
