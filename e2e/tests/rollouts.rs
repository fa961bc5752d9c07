//! End-to-end scenarios for SchemaRollouts: the application's migration tool as one Job per
//! tenant, on a real kube-apiserver with real PostgreSQL servers.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams};
use silo_crds::conditions;
use silo_crds::{RolloutPhase, TenantPhase};
use silo_e2e::kube_env::with_temp_ns;
use silo_e2e::rollouts::{JobLog, in_phase, most_at_once, shop_image, shop_rollout, wait_rollout};
use silo_e2e::{PgServer, TestNs, tenant_yaml, wait_for};
use sqlx::{Connection, PgConnection};

/// A SchemaRollout manifest named `name` with `spec` (indented by two spaces).
fn rollout_yaml(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: silo.dev/v1alpha1\nkind: SchemaRollout\nmetadata:\n  name: {name}\nspec:\n{spec}\n"
    )
}

/// Bad input is rejected by `kubectl apply`, naming the field, before any controller sees it.
#[tokio::test]
async fn bad_rollouts_are_rejected_naming_the_field() {
    with_temp_ns("sr-input", |ns| async move {
        let image = "  template: {image: app:1}";
        let cases = [
            (
                "no-image",
                "  version: v1\n  template: {command: [migrate]}".to_string(),
                "spec.template.image",
            ),
            (
                "empty-image",
                "  version: v1\n  template: {image: \"\"}".to_string(),
                "spec.template.image",
            ),
            ("no-version", image.to_string(), "spec.version"),
            (
                "empty-version",
                format!("  version: \"\"\n{image}"),
                "spec.version",
            ),
            (
                "zero-concurrent",
                format!("  version: v1\n{image}\n  strategy: {{maxConcurrent: 0}}"),
                "spec.strategy.maxConcurrent",
            ),
            (
                "negative-per-server",
                format!("  version: v1\n{image}\n  strategy: {{maxConcurrentPerServer: -1}}"),
                "spec.strategy.maxConcurrentPerServer",
            ),
            (
                "zero-failures",
                format!("  version: v1\n{image}\n  strategy: {{maxFailures: 0}}"),
                "spec.strategy.maxFailures",
            ),
            (
                "negative-canary",
                format!("  version: v1\n{image}\n  strategy: {{canary: -1}}"),
                "spec.strategy.canary",
            ),
            (
                "lock-timeout",
                format!("  version: v1\n{image}\n  strategy: {{lockTimeout: \"10\"}}"),
                "spec.strategy.lockTimeout",
            ),
            (
                "zero-timeout",
                format!("  version: v1\n{image}\n  strategy: {{timeoutSeconds: 0}}"),
                "spec.strategy.timeoutSeconds",
            ),
        ];
        for (name, spec, field) in &cases {
            let out = ns.apply(&rollout_yaml(name, spec)).await?;
            ensure!(!out.success, "{name} was accepted");
            ensure!(
                out.stderr.contains(field),
                "{name}: expected `{field}` in: {}",
                out.stderr
            );
        }

        // A version is for good: a new version is a new SchemaRollout.
        ns.apply_ok(&rollout_yaml("v1", &format!("  version: v1\n{image}")))
            .await?;
        let out = ns
            .apply(&rollout_yaml("v1", &format!("  version: v2\n{image}")))
            .await?;
        ensure!(!out.success, "a changed version was accepted");
        ensure!(
            out.stderr.contains("version is immutable"),
            "{}",
            out.stderr
        );
        // The defaults a user did not write are the safe ones.
        let out = ns
            .kubectl(&[
                "get",
                "sr",
                "v1",
                "-n",
                &ns.name,
                "-o",
                "jsonpath={.spec.strategy}",
            ])
            .await?;
        ensure!(out.success, "{}", out.stderr);
        for default in [
            "\"canary\":1",
            "\"maxConcurrent\":10",
            "\"maxConcurrentPerServer\":2",
            "\"maxFailures\":1",
            "\"lockTimeout\":\"10s\"",
        ] {
            ensure!(
                out.stdout.contains(default),
                "{default} not in {}",
                out.stdout
            );
        }
        Ok(())
    })
    .await;
}

const TIMEOUT: Duration = Duration::from_secs(300);

/// Tenants `t00`..`t{n-1}`, created at once, waited for until Ready; each one's server.
async fn tenants(ns: &TestNs, names: &[String]) -> anyhow::Result<HashMap<String, String>> {
    let yaml: Vec<String> = names.iter().map(|n| tenant_yaml(n, "  {}")).collect();
    ns.apply_ok(&yaml.join("---\n")).await?;
    let mut servers = HashMap::new();
    for name in names {
        let tenant = ns.wait_phase(name, TenantPhase::Ready, TIMEOUT).await?;
        let server = tenant.status.and_then(|s| s.server).context("placed")?;
        servers.insert(name.clone(), server);
    }
    Ok(servers)
}

fn names(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("t{i:02}")).collect()
}

/// The tenant's `status.schemaVersion`.
async fn schema_version(ns: &TestNs, tenant: &str) -> anyhow::Result<Option<String>> {
    Ok(ns
        .tenants()
        .get(tenant)
        .await?
        .status
        .and_then(|s| s.schema_version))
}

/// A connection to the tenant's database with its own credentials.
async fn connect(ns: &TestNs, tenant: &str) -> anyhow::Result<PgConnection> {
    let uri = ns.secret_value(tenant, "uri").await?;
    Ok(PgConnection::connect(&uri).await?)
}

/// The migrations Django recorded in the tenant's database.
async fn applied(ns: &TestNs, tenant: &str) -> anyhow::Result<Vec<String>> {
    let mut conn = connect(ns, tenant).await?;
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM django_migrations WHERE app = 'catalog' ORDER BY name",
    )
    .fetch_all(&mut conn)
    .await
    .with_context(|| format!("{tenant}: django_migrations"))?;
    Ok(rows)
}

async fn kubectl_ok(ns: &TestNs, args: &[&str]) -> anyhow::Result<String> {
    let out = ns.kubectl(args).await?;
    ensure!(out.success, "kubectl {}: {}", args.join(" "), out.stderr);
    Ok(out.stdout)
}

/// A tenant created while `rollout` targets its namespace: it is migrated before it turns Ready.
/// Polls its phase from its creation: it must pass through Migrating, and be at `version` the
/// first time it is seen Ready.
async fn onboarded(ns: &TestNs, tenant: &str, version: &str) -> anyhow::Result<()> {
    ns.apply_ok(&tenant_yaml(tenant, "  {}")).await?;
    let mut seen = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        ensure!(
            Instant::now() < deadline,
            "{tenant} not Ready; phases seen: {seen:?}"
        );
        let t = ns.tenants().get(tenant).await?;
        let status = t.status.unwrap_or_default();
        if let Some(phase) = status.phase
            && seen.last() != Some(&phase)
        {
            seen.push(phase);
        }
        if status.phase == Some(TenantPhase::Ready) {
            ensure!(
                status.schema_version.as_deref() == Some(version),
                "{tenant} turned Ready at schema version {:?}, not {version}",
                status.schema_version
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        seen.contains(&TenantPhase::Migrating),
        "{tenant} never waited in Migrating: {seen:?}"
    );
    ensure!(
        applied(ns, tenant)
            .await?
            .contains(&"0002_price_positive".to_string()),
        "{tenant} Ready without the migration"
    );
    Ok(())
}

/// The fleet as a deploy pipeline drives it: v1 everywhere in waves under the caps with a canary
/// first; v2 halts on three tenants' data with their names and PostgreSQL's error; v3 fixes the
/// data and completes; tenants created during and after a rollout are migrated before Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_migrates_the_fleet_in_waves_halts_on_bad_data_and_resumes() {
    with_temp_ns("sr-fleet", |ns: TestNs| async move {
        shop_image("v1")?; // no node, no test: say so before starting anything
        let (pg1, pg2) = (PgServer::start()?, PgServer::start()?);
        ns.add_server(&ns.server_name("a"), &pg1, "").await?;
        ns.add_server(&ns.server_name("b"), &pg2, "").await?;
        let _controller = ns.start_controller(&[])?;
        for server in [ns.server_name("a"), ns.server_name("b")] {
            let server = format!("databaseserver/{server}");
            kubectl_ok(
                &ns,
                &["wait", "--for=condition=Ready", &server, "--timeout=60s"],
            )
            .await?;
        }
        let fleet = names(0..20);
        let server_of = tenants(&ns, &fleet).await?;
        let per_server: HashSet<&String> = server_of.values().collect();
        ensure!(
            per_server.len() == 2,
            "20 tenants on {} server(s)",
            per_server.len()
        );
        let log = JobLog::start(&ns).await?;

        // v1: a canary, then waves of at most 3, at most 2 on a server.
        let strategy = "{canary: 1, maxConcurrent: 3, maxConcurrentPerServer: 2}";
        ns.apply_ok(&shop_rollout("shop-v1", "v1", strategy, "")?)
            .await?;
        let wait = [
            "wait",
            "--for=condition=Complete",
            "sr/shop-v1",
            "-n",
            &ns.name,
            "--timeout=300s",
        ];
        kubectl_ok(&ns, &wait).await?;
        for tenant in &fleet {
            ensure!(
                schema_version(&ns, tenant).await?.as_deref() == Some("v1"),
                "{tenant} not at v1"
            );
            ensure!(
                applied(&ns, tenant).await? == ["0001_initial"],
                "{tenant}: not migrated to v1"
            );
        }
        let jobs = log.of("shop-v1");
        ensure!(
            jobs.len() == 20,
            "{} Jobs for 20 tenants: {jobs:?}",
            jobs.len()
        );
        let (most, most_on) = most_at_once(&jobs, &server_of);
        ensure!(most <= 3, "{most} migrations ran at once (maxConcurrent 3)");
        ensure!(
            most_on.values().all(|n| *n <= 2),
            "per server at once: {most_on:?} (maxConcurrentPerServer 2)"
        );
        ensure!(most >= 2, "the waves never ran side by side: {most}");
        let canary = jobs
            .iter()
            .min_by_key(|j| j.created)
            .context("a first Job")?;
        let canary_end = canary.ended.context("the canary ended")?;
        ensure!(canary.tenant == "t00", "the canary was {}", canary.tenant);
        ensure!(
            jobs.iter()
                .filter(|j| j.uid != canary.uid)
                .all(|j| j.created > canary_end),
            "a Job started before the canary succeeded"
        );
        let status = wait_rollout(&ns, "shop-v1", "counts", TIMEOUT, |r| {
            in_phase(r, RolloutPhase::Complete)
        })
        .await?
        .status
        .unwrap_or_default();
        ensure!(
            (
                status.total,
                status.succeeded,
                status.failed,
                status.running,
                status.pending
            ) == (20, 20, 0, 0, 0),
            "{status:?}"
        );
        let tenants_table = kubectl_ok(&ns, &["get", "tenants", "-n", &ns.name]).await?;
        ensure!(
            tenants_table.contains("SCHEMA") && tenants_table.contains("v1"),
            "{tenants_table}"
        );

        // Three tenants hold a free product, which v2's constraint refuses.
        for tenant in ["t01", "t02", "t03"] {
            let mut conn = connect(&ns, tenant).await?;
            sqlx::query(
                "INSERT INTO catalog_product (name, price_cents) VALUES ('free sample', 0)",
            )
            .execute(&mut conn)
            .await?;
        }
        let strategy = "{canary: 1, maxConcurrent: 2, maxFailures: 2}";
        ns.apply_ok(&shop_rollout("shop-v2", "v2", strategy, "")?)
            .await?;
        let halted = wait_rollout(&ns, "shop-v2", "Halted", TIMEOUT, |r| {
            in_phase(r, RolloutPhase::Halted)
        })
        .await?;
        let at_halt = log.of("shop-v2").len();
        let status = halted.status.unwrap_or_default();
        ensure!(status.failed >= 2, "halted with {} failures", status.failed);
        for failed in &status.failed_tenants {
            ensure!(
                ["t01", "t02", "t03"].contains(&failed.tenant.as_str()),
                "{} failed: {}",
                failed.tenant,
                failed.message
            );
            ensure!(failed.reason == "MigrationFailed", "{failed:?}");
            ensure!(
                failed.message.contains("price_positive") && failed.message.contains("violated"),
                "PostgreSQL's error is not in: {}",
                failed.message
            );
        }
        ensure!(
            !conditions::is_true(&status.conditions, "Progressing"),
            "a halted rollout is not Progressing"
        );
        // Running Jobs finish; nothing new starts.
        wait_for("the running migrations to end", TIMEOUT, || async {
            log.of("shop-v2")
                .iter()
                .all(|j| j.ended.is_some())
                .then_some(())
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let v2_jobs = log.of("shop-v2");
        ensure!(
            v2_jobs.len() == at_halt,
            "{} Jobs started after the halt",
            v2_jobs.len() - at_halt
        );
        let final_status = wait_rollout(&ns, "shop-v2", "settled", TIMEOUT, |r| {
            r.status.as_ref().is_some_and(|s| s.running == 0)
        })
        .await?
        .status
        .unwrap_or_default();
        ensure!(
            final_status.total == 20
                && final_status.succeeded + final_status.failed + final_status.pending == 20,
            "{final_status:?}"
        );
        for tenant in &fleet {
            let at = schema_version(&ns, tenant).await?;
            let succeeded = v2_jobs.iter().any(|j| &j.tenant == tenant && !j.failed);
            let want = if succeeded { "v2" } else { "v1" };
            ensure!(
                at.as_deref() == Some(want),
                "{tenant} at {at:?}, expected {want}"
            );
        }
        let t01 = ns.tenants().get("t01").await?.status.unwrap_or_default();
        let schema_ready = t01
            .conditions
            .iter()
            .find(|c| c.type_ == "SchemaReady")
            .context("SchemaReady")?;
        ensure!(
            schema_ready.status == "False" && schema_ready.reason == "MigrationFailed",
            "{schema_ready:?}"
        );
        let events = kubectl_ok(
            &ns,
            &[
                "get",
                "events",
                "-n",
                &ns.name,
                "--field-selector",
                "involvedObject.name=t01",
            ],
        )
        .await?;
        ensure!(
            events.contains("MigrationFailed"),
            "no MigrationFailed Event on t01: {events}"
        );

        // v3 fixes the data first: the whole fleet gets there, and v2's rollout is superseded.
        // A tenant created meanwhile is migrated before it turns Ready.
        ns.apply_ok(&shop_rollout("shop-v3", "v3", "{maxConcurrent: 4}", "")?)
            .await?;
        wait_rollout(&ns, "shop-v3", "under way", TIMEOUT, |r| {
            r.status.as_ref().is_some_and(|s| s.succeeded >= 1)
        })
        .await?;
        onboarded(&ns, "t20", "v3").await?;
        let wait = [
            "wait",
            "--for=condition=Complete",
            "sr/shop-v3",
            "-n",
            &ns.name,
            "--timeout=300s",
        ];
        kubectl_ok(&ns, &wait).await?;
        onboarded(&ns, "t21", "v3").await?;
        kubectl_ok(&ns, &wait).await?;
        for tenant in names(0..22) {
            ensure!(
                schema_version(&ns, &tenant).await?.as_deref() == Some("v3"),
                "{tenant} not at v3"
            );
            ensure!(
                applied(&ns, &tenant).await? == ["0001_initial", "0002_price_positive"],
                "{tenant}"
            );
        }
        let mut conn = connect(&ns, "t01").await?;
        let price: i32 = sqlx::query_scalar(
            "SELECT price_cents FROM catalog_product WHERE name = 'free sample'",
        )
        .fetch_one(&mut conn)
        .await?;
        ensure!(price == 1, "v3 fixed the data: {price}");
        for old in ["shop-v1", "shop-v2"] {
            wait_rollout(&ns, old, "Superseded", TIMEOUT, |r| {
                in_phase(r, RolloutPhase::Superseded)
            })
            .await?;
        }
        Ok(())
    })
    .await;
}

/// A migration behind a lock fails within lockTimeout with the lock error in status, and is
/// retried by `retry`; a controller killed mid-rollout creates no second Job and loses no count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_tenant_fails_fast_and_a_killed_controller_doubles_nothing() {
    with_temp_ns("sr-lock", |ns: TestNs| async move {
        shop_image("v1")?;
        let pg = PgServer::start()?;
        ns.add_server(&ns.server_name("a"), &pg, "").await?;
        let mut controller = ns.start_controller(&[])?;
        let fleet = names(0..6);
        tenants(&ns, &fleet).await?;
        let log = JobLog::start(&ns).await?;

        // kill -9 with migrations running, then a new controller: every tenant migrated once.
        let strategy = "{canary: 0, maxConcurrent: 2}";
        ns.apply_ok(&shop_rollout("shop-v1", "v1", strategy, "")?)
            .await?;
        wait_for("three migrations started", TIMEOUT, || async {
            (log.of("shop-v1").len() >= 3).then_some(())
        })
        .await?;
        controller.kill9();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let _controller = ns.start_controller(&[])?;
        let wait = [
            "wait",
            "--for=condition=Complete",
            "sr/shop-v1",
            "-n",
            &ns.name,
            "--timeout=300s",
        ];
        kubectl_ok(&ns, &wait).await?;
        let jobs = log.of("shop-v1");
        for tenant in &fleet {
            let n = jobs.iter().filter(|j| &j.tenant == tenant).count();
            ensure!(n == 1, "{tenant} had {n} migration Jobs");
            ensure!(
                schema_version(&ns, tenant).await?.as_deref() == Some("v1"),
                "{tenant}"
            );
        }
        let status = wait_rollout(&ns, "shop-v1", "exact counts", TIMEOUT, |r| {
            in_phase(r, RolloutPhase::Complete)
        })
        .await?
        .status
        .unwrap_or_default();
        ensure!(
            (
                status.total,
                status.succeeded,
                status.failed,
                status.running,
                status.pending,
                status.skipped
            ) == (6, 6, 0, 0, 0, 0),
            "{status:?}"
        );
        // A Job goes once its outcome is on the Tenant.
        let jobs_api: Api<Job> = Api::namespaced(ns.client.clone(), &ns.name);
        wait_for("the succeeded Jobs to be deleted", TIMEOUT, || async {
            jobs_api
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        })
        .await?;

        // A session holds a lock on t02's table: its migration fails within lockTimeout.
        let mut holder = connect(&ns, "t02").await?;
        sqlx::query("BEGIN").execute(&mut holder).await?;
        sqlx::query("SELECT count(*) FROM catalog_product")
            .execute(&mut holder)
            .await?;
        let strategy =
            "{canary: 0, maxConcurrent: 2, maxFailures: 6, lockTimeout: 2s, timeoutSeconds: 600}";
        ns.apply_ok(&shop_rollout("shop-v3", "v3", strategy, "")?)
            .await?;
        let halted = wait_rollout(&ns, "shop-v3", "done but for t02", TIMEOUT, |r| {
            in_phase(r, RolloutPhase::Halted)
        })
        .await?
        .status
        .unwrap_or_default();
        ensure!(halted.succeeded == 5 && halted.failed == 1, "{halted:?}");
        let failed = &halted.failed_tenants[..];
        ensure!(failed.len() == 1 && failed[0].tenant == "t02", "{failed:?}");
        ensure!(
            failed[0].message.contains("lock timeout"),
            "the lock error is not in: {}",
            failed[0].message
        );
        ensure!(
            schema_version(&ns, "t02").await?.as_deref() == Some("v1"),
            "t02 moved"
        );

        // The lock released, `retry` runs it again.
        sqlx::query("ROLLBACK").execute(&mut holder).await?;
        drop(holder);
        let patch = r#"{"spec":{"retry":1}}"#;
        kubectl_ok(
            &ns,
            &[
                "patch",
                "sr",
                "shop-v3",
                "-n",
                &ns.name,
                "--type=merge",
                "-p",
                patch,
            ],
        )
        .await?;
        let wait = [
            "wait",
            "--for=condition=Complete",
            "sr/shop-v3",
            "-n",
            &ns.name,
            "--timeout=300s",
        ];
        kubectl_ok(&ns, &wait).await?;
        ensure!(
            schema_version(&ns, "t02").await?.as_deref() == Some("v3"),
            "t02 not at v3"
        );
        let t02_jobs = log
            .of("shop-v3")
            .into_iter()
            .filter(|j| j.tenant == "t02")
            .count();
        ensure!(
            t02_jobs == 2,
            "t02 ran {t02_jobs} Jobs: its failure and its retry"
        );
        Ok(())
    })
    .await;
}
