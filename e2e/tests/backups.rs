//! End-to-end scenarios for TenantBackups and TenantRestores: the `silo` runner as a Job on the node, dumping a real
//! tenant database to a `file://` volume (a hostPath on the node, which shares this machine's
//! disk) or to an S3-compatible store, verified, recorded on the Tenant, and deleted with its
//! TenantBackup; failures that store nothing, restores that change nothing unless they succeed.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use sha2::{Digest, Sha256};
use silo_crds::{JobPhase, TenantBackup, TenantPhase};
use silo_e2e::kube_env::with_temp_ns;
use silo_e2e::s3::S3Store;
use silo_e2e::{ControllerProcess, PgServer, RouterProcess, TestNs, node, tenant_yaml, wait_for};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

const TIMEOUT: Duration = Duration::from_secs(180);

/// A controller whose Jobs run the harness's silo image, and whose backups go to a fresh
/// directory of this machine mounted into the Jobs as a hostPath.
fn start_controller(ns: &TestNs) -> anyhow::Result<(ControllerProcess, PathBuf)> {
    start_controller_with(ns, &serde_json::json!({ "maxConcurrentPerServer": 1 }), &[])
}

/// As [`start_controller`], with more backup settings (`extra`, merged over the destination and
/// the volume) and more environment for the controller.
fn start_controller_with(
    ns: &TestNs,
    extra: &serde_json::Value,
    env: &[(String, String)],
) -> anyhow::Result<(ControllerProcess, PathBuf)> {
    let image = node::image()?;
    let dir = std::env::var_os("SILO_E2E_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("backups-{}", ns.name));
    std::fs::create_dir_all(&dir)?;
    // The runner runs as a non-root user.
    std::process::Command::new("chmod")
        .arg("0777")
        .arg(&dir)
        .status()?;
    let settings = dir.with_extension("settings");
    std::fs::create_dir_all(&settings)?;
    let jobs = settings.join("jobs.json");
    std::fs::write(
        &jobs,
        serde_json::json!({ "image": image, "imagePullPolicy": "Never" }).to_string(),
    )?;
    let backups = settings.join("backups.json");
    let mut settings_json = serde_json::json!({
        "destination": format!("file://{}", dir.display()),
        "volume": { "hostPath": { "path": dir, "type": "Directory" } },
    });
    if let (Some(base), Some(more)) = (settings_json.as_object_mut(), extra.as_object()) {
        base.extend(more.clone());
    }
    std::fs::write(&backups, settings_json.to_string())?;
    let mut all_env = vec![
        ("SILO_JOB_SETTINGS", jobs.to_str().context("a path")?),
        ("SILO_BACKUP_SETTINGS", backups.to_str().context("a path")?),
    ];
    all_env.extend(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let controller = ControllerProcess::start_with_env(ns, None, &[], &all_env)?;
    Ok((controller, dir))
}

async fn wait_backup(ns: &TestNs, name: &str) -> anyhow::Result<TenantBackup> {
    let api: Api<TenantBackup> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_for(
        &format!("TenantBackup {name} to finish"),
        TIMEOUT,
        || async {
            let b = api.get_opt(name).await.ok().flatten()?;
            let phase = b.status.as_ref()?.phase?;
            matches!(phase, JobPhase::Succeeded | JobPhase::Failed).then_some(b)
        },
    )
    .await
}

/// Every row of the test's tables, as text, in order.
async fn contents(conn: &mut PgConnection) -> anyhow::Result<(String, String)> {
    let orders: Option<String> =
        sqlx::query_scalar("SELECT string_agg(o::text, ',' ORDER BY id) FROM orders o")
            .fetch_one(&mut *conn)
            .await?;
    let customers: Option<String> =
        sqlx::query_scalar("SELECT string_agg(c::text, ',' ORDER BY id) FROM customers c")
            .fetch_one(&mut *conn)
            .await?;
    Ok((orders.unwrap_or_default(), customers.unwrap_or_default()))
}

async fn wait_restore(ns: &TestNs, name: &str) -> anyhow::Result<silo_crds::TenantRestoreStatus> {
    let api: Api<silo_crds::TenantRestore> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_for(
        &format!("TenantRestore {name} to finish"),
        TIMEOUT,
        || async {
            let status = api.get_opt(name).await.ok().flatten()?.status?;
            matches!(status.phase?, JobPhase::Succeeded | JobPhase::Failed).then_some(status)
        },
    )
    .await
}

fn restore_yaml(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: silo.dev/v1alpha1\nkind: TenantRestore\nmetadata: {{name: {name}}}\nspec: {spec}\n"
    )
}

fn backup_yaml(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: silo.dev/v1alpha1\nkind: TenantBackup\nmetadata: {{name: {name}}}\nspec: {spec}\n"
    )
}

/// A backup Job dumps the tenant's database to the volume, verifies it by restoring it into a
/// scratch database, records its size and sha256 (those of the stored file) on the TenantBackup
/// and on the Tenant; a restore in place brings a dropped table and changed rows back, a restore
/// into another tenant copies it; the object goes with the TenantBackup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_is_stored_verified_recorded_and_deleted_with_its_object() {
    with_temp_ns("backup-file", |ns: TestNs| async move {
        node::image()?; // no node, no test: say so before starting anything
        let pg = PgServer::start()?;
        ns.add_server(&ns.server_name("pg"), &pg, "").await?;
        let (_controller, dir) = start_controller(&ns)?;
        let admin = pg.admin_pool().await?;
        ns.apply_ok(&tenant_yaml("acme", "  {}")).await?;
        ns.wait_phase("acme", TenantPhase::Ready, TIMEOUT).await?;
        let uri = ns.secret_value("acme", "uri").await?;
        let mut conn = PgConnection::connect(&uri).await?;
        sqlx::raw_sql(
            "CREATE TABLE orders (id serial PRIMARY KEY, note text);
             INSERT INTO orders (note) SELECT 'order ' || i FROM generate_series(1, 500) i;
             CREATE TABLE customers (id int PRIMARY KEY, name text);
             INSERT INTO customers SELECT i, 'customer ' || i FROM generate_series(1, 20) i;",
        )
        .execute(&mut conn)
        .await?;
        let original = contents(&mut conn).await?;

        ns.apply_ok(&backup_yaml("acme-1", "{tenant: acme, verify: true}"))
            .await?;
        let backup = wait_backup(&ns, "acme-1").await?;
        let status = backup.status.unwrap_or_default();
        ensure!(status.phase == Some(JobPhase::Succeeded), "{status:?}");
        ensure!(status.verified == Some(true), "not verified: {status:?}");
        let file = dir.join(&ns.name).join("acme").join("acme-1.dump");
        let bytes = std::fs::read(&file).with_context(|| format!("{}", file.display()))?;
        let sha: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        ensure!(
            status.sha256.as_deref() == Some(sha.as_str()),
            "sha256 {:?} != the file's {sha}",
            status.sha256
        );
        ensure!(
            status.bytes == Some(bytes.len() as i64),
            "bytes {:?} != {}",
            status.bytes,
            bytes.len()
        );
        ensure!(
            file.with_extension("json").exists(),
            "no manifest next to the dump"
        );
        let tenant = ns.tenants().get("acme").await?.status.unwrap_or_default();
        let last = tenant.last_backup.context("no lastBackup on the Tenant")?;
        ensure!(
            last.name == "acme-1" && last.bytes == bytes.len() as i64,
            "{last:?}"
        );
        ensure!(
            silo_crds::conditions::is_true(&tenant.conditions, "BackedUp"),
            "{:?}",
            tenant.conditions
        );
        ensure!(
            tenant.phase == Some(TenantPhase::Ready),
            "the tenant's own reconciler keeps its phase: {:?}",
            tenant.phase
        );
        // The scratch database went, the Job too.
        let scratch: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname LIKE '%\\_verify'")
                .fetch_one(&admin)
                .await?;
        ensure!(scratch == 0, "a scratch database was left");
        let jobs: Api<Job> =
            Api::namespaced(ns.client.clone(), &ns.name);
        wait_for("the backup Job to go", TIMEOUT, || async {
            jobs.get_opt("acme-1-backup")
                .await
                .ok()?
                .is_none()
                .then_some(())
        })
        .await?;

        // A backup of a tenant that does not exist fails, saying so.
        ns.apply_ok(&backup_yaml("ghost-1", "{tenant: ghost}"))
            .await?;
        let ghost = wait_backup(&ns, "ghost-1")
            .await?
            .status
            .unwrap_or_default();
        ensure!(
            ghost.phase == Some(JobPhase::Failed)
                && ghost
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains("Tenant ghost does not exist")),
            "{ghost:?}"
        );
        // Bad input is refused by kubectl apply, naming the field.
        let out = ns
            .apply(&backup_yaml(
                "bad",
                "{tenant: acme, destination: \"gs://bucket\"}",
            ))
            .await?;
        ensure!(
            !out.success && out.stderr.contains("spec.destination"),
            "{}",
            out.stderr
        );

        // Restore in place: a dropped table and changed rows come back as they were.
        sqlx::raw_sql(
            "DROP TABLE orders; UPDATE customers SET name = 'renamed'; DELETE FROM customers WHERE id > 10;",
        )
        .execute(&mut conn)
        .await?;
        drop(conn);
        ns.apply_ok(&restore_yaml("acme-back", "{tenant: acme, from: {backup: acme-1}}")).await?;
        let restored = wait_restore(&ns, "acme-back").await?;
        ensure!(restored.phase == Some(JobPhase::Succeeded), "{restored:?}");
        ns.wait_phase("acme", TenantPhase::Ready, TIMEOUT).await?;
        let mut conn = PgConnection::connect(&uri).await?;
        ensure!(contents(&mut conn).await? == original, "the restored rows differ from the backup's");
        let logins: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname LIKE '%\\_restore'")
            .fetch_one(&admin)
            .await?;
        ensure!(logins == 0, "the restore's login was left behind");

        // Restore into another tenant: its database gets the backup's tables, nothing else moves.
        ns.apply_ok(&tenant_yaml("globex", "  {}")).await?;
        ns.wait_phase("globex", TenantPhase::Ready, TIMEOUT).await?;
        ns.apply_ok(&restore_yaml("globex-from-acme", "{tenant: globex, from: {backup: acme-1}}")).await?;
        let copied = wait_restore(&ns, "globex-from-acme").await?;
        ensure!(copied.phase == Some(JobPhase::Succeeded), "{copied:?}");
        ns.wait_phase("globex", TenantPhase::Ready, TIMEOUT).await?;
        let globex_uri = ns.secret_value("globex", "uri").await?;
        let mut globex = PgConnection::connect(&globex_uri).await?;
        ensure!(contents(&mut globex).await? == original, "globex did not get acme's backup");
        ensure!(contents(&mut conn).await? == original, "acme changed when globex was restored");

        // A negative retention is refused by kubectl apply, naming the field.
        let out = ns.apply(&tenant_yaml("neg", "  backup: {keepLast: -1}")).await?;
        ensure!(!out.success && out.stderr.contains("spec.backup.keepLast"), "{}", out.stderr);
        // A restore naming no backup is refused by kubectl apply.
        let out = ns.apply(&restore_yaml("nothing", "{tenant: acme, from: {}}")).await?;
        ensure!(!out.success && out.stderr.contains("exactly one of backup or uri"), "{}", out.stderr);

        // Deleting the TenantBackup deletes its object and manifest.
        let api: Api<TenantBackup> = Api::namespaced(ns.client.clone(), &ns.name);
        api.delete("acme-1", &DeleteParams::default()).await?;
        wait_for("the TenantBackup to go", TIMEOUT, || async {
            api.get_opt("acme-1").await.ok()?.is_none().then_some(())
        })
        .await?;
        ensure!(
            !file.exists(),
            "{} outlived its TenantBackup",
            file.display()
        );
        ensure!(
            !file.with_extension("json").exists(),
            "the manifest outlived its TenantBackup"
        );
        Ok(())
    })
    .await;
}

/// Scheduled backups: 30 tenants on 2 servers, a slot every 2 minutes spread over a 2-minute
/// window, one backup at a time per server: every tenant is backed up in each slot, the starts
/// spread over the window, the cap holds (from the Jobs' order), a controller killed mid-round
/// loses and doubles nothing, and `keepLast: 2` leaves exactly two backups per tenant, objects
/// included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_backups_spread_over_their_window_under_the_cap_and_keep_the_last_two() {
    with_temp_ns("backup-sched", |ns: TestNs| async move {
        node::image()?;
        let (pg1, pg2) = (PgServer::start()?, PgServer::start()?);
        ns.add_server(&ns.server_name("a"), &pg1, "").await?;
        ns.add_server(&ns.server_name("b"), &pg2, "").await?;
        let schedule = serde_json::json!({
            "schedule": "*/2 * * * *",
            "window": "2m",
            "maxConcurrentPerServer": 1,
            "retention": { "keepLast": 2 },
        });
        let (mut controller, dir) = start_controller_with(&ns, &schedule, &[])?;
        for server in [ns.server_name("a"), ns.server_name("b")] {
            let server = format!("databaseserver/{server}");
            let out = ns
                .kubectl(&["wait", "--for=condition=Ready", &server, "--timeout=60s"])
                .await?;
            ensure!(out.success, "{}", out.stderr);
        }
        let names: Vec<String> = (0..30).map(|i| format!("s{i:02}")).collect();
        let yaml: Vec<String> = names.iter().map(|n| tenant_yaml(n, "  {}")).collect();
        ns.apply_ok(&yaml.join("---\n")).await?;
        let mut server_of = std::collections::HashMap::new();
        for name in &names {
            let t = ns.wait_phase(name, TenantPhase::Ready, TIMEOUT).await?;
            server_of.insert(
                name.clone(),
                t.status.and_then(|s| s.server).context("placed")?,
            );
        }
        let log =
            silo_e2e::rollouts::JobLog::start_with(&ns, silo_crds::contract::BACKUP_LABEL).await?;
        let api: Api<TenantBackup> = Api::namespaced(ns.client.clone(), &ns.name);
        let succeeded = || async {
            let list = api.list(&Default::default()).await.ok()?;
            Some(
                list.items
                    .into_iter()
                    .filter(|b| {
                        b.status.as_ref().and_then(|s| s.phase) == Some(JobPhase::Succeeded)
                    })
                    .collect::<Vec<_>>(),
            )
        };

        // A round gets under way; the controller is killed in the middle of it and restarted.
        // The first slot after the tenants' creation, plus each one's offset: up to 4 minutes.
        wait_for(
            "a few scheduled backups to start",
            Duration::from_secs(300),
            || async { (log.jobs().len() >= 5).then_some(()) },
        )
        .await?;
        controller.kill9();
        let (_controller, _) = start_controller_with(&ns, &schedule, &[])?;

        // Three slots: every tenant in each, then retention keeps two.
        let per_tenant = |backups: &[TenantBackup]| {
            let mut slots: std::collections::HashMap<String, Vec<String>> = Default::default();
            for b in backups {
                slots
                    .entry(b.spec.tenant.clone())
                    .or_default()
                    .push(b.metadata.name.clone().unwrap_or_default());
            }
            slots
        };
        let mut seen_slots: std::collections::HashMap<String, std::collections::BTreeSet<String>> =
            Default::default();
        let deadline = std::time::Instant::now() + Duration::from_secs(600);
        loop {
            for b in succeeded().await.unwrap_or_default() {
                seen_slots
                    .entry(b.spec.tenant.clone())
                    .or_default()
                    .insert(b.metadata.name.clone().unwrap_or_default());
            }
            if names
                .iter()
                .all(|n| seen_slots.get(n).is_some_and(|s| s.len() >= 3))
            {
                break;
            }
            let behind: Vec<(&String, usize)> = names
                .iter()
                .map(|n| (n, seen_slots.get(n).map_or(0, |s| s.len())))
                .filter(|(_, k)| *k < 3)
                .collect();
            ensure!(
                std::time::Instant::now() < deadline,
                "after 10 minutes, tenants with fewer than 3 rounds: {behind:?}"
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let (_, most_on) = silo_e2e::rollouts::most_at_once(&log.jobs(), &server_of);
        ensure!(
            most_on.values().all(|n| *n <= 1),
            "backups at once per server: {most_on:?} (maxConcurrentPerServer 1)"
        );
        // One backup per tenant per slot: each name is its slot, and each slot's backup has one Job.
        let jobs = log.jobs();
        let mut per_name: std::collections::HashMap<&str, usize> = Default::default();
        for j in &jobs {
            *per_name.entry(j.name.as_str()).or_default() += 1;
        }
        ensure!(
            per_name.values().all(|n| *n == 1),
            "a backup ran twice: {per_name:?}"
        );
        // The starts of one slot spread over its window.
        let first = api.list(&Default::default()).await?.items;
        let mut minutes: std::collections::BTreeSet<i64> = Default::default();
        for b in &first {
            if let Some(created) = &b.metadata.creation_timestamp {
                minutes.insert(created.0.as_second() / 30);
            }
        }
        ensure!(
            minutes.len() >= 3,
            "the backups were all created within a minute: {minutes:?}"
        );

        wait_for("retention to keep two per tenant", TIMEOUT, || async {
            let all = api.list(&Default::default()).await.ok()?.items;
            let finished: Vec<TenantBackup> = all
                .into_iter()
                .filter(|b| {
                    matches!(
                        b.status.as_ref().and_then(|s| s.phase),
                        Some(JobPhase::Succeeded)
                    )
                })
                .collect();
            per_tenant(&finished)
                .values()
                .all(|v| v.len() == 2)
                .then_some(())
        })
        .await?;
        for name in &names {
            let objects = std::fs::read_dir(dir.join(&ns.name).join(name))?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "dump"))
                .count();
            ensure!(
                objects <= 3,
                "{name}: {objects} dumps kept (keepLast 2, one round may be in flight)"
            );
        }
        let tenant = ns.tenants().get("s00").await?.status.unwrap_or_default();
        ensure!(
            silo_crds::conditions::is_true(&tenant.conditions, "BackedUp"),
            "{:?}",
            tenant.conditions
        );
        Ok(())
    })
    .await;
}

/// The key of an `s3://bucket/key` URI.
fn s3_key<'a>(uri: &'a str, bucket: &str) -> anyhow::Result<&'a str> {
    uri.strip_prefix(&format!("s3://{bucket}/"))
        .with_context(|| format!("{uri} is not in bucket {bucket}"))
}

/// Backups to an S3-compatible store (versitygw on the node's link address), from Jobs that take
/// their credentials from a Secret: the stored object, read back with the test's own client, has
/// the sha256 and size in status. With the store down a backup fails saying why, stores nothing,
/// keeps the previous one and turns `BackedUp` False. An object corrupted in the store fails its
/// restore on the sha256 and leaves the tenant's rows as they were, the tenant unlocked. Deleting
/// the TenantBackup deletes the object and its manifest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_backups_are_checked_against_the_store_and_a_failing_or_corrupted_store_changes_nothing()
{
    with_temp_ns("backup-s3", |ns: TestNs| async move {
        node::image()?;
        let store = S3Store::start(&ns.name)?;
        let pg = PgServer::start()?;
        ns.add_server(&ns.server_name("pg"), &pg, "").await?;
        let credentials: Secret = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "s3-credentials" },
            "stringData": {
                "AWS_ACCESS_KEY_ID": store.access_key,
                "AWS_SECRET_ACCESS_KEY": store.secret_key,
            },
        }))?;
        ns.secrets()
            .create(&PostParams::default(), &credentials)
            .await?;
        let settings = serde_json::json!({
            "destination": format!("s3://{}/fleet", store.bucket),
            "s3": {
                "endpoint": store.endpoint,
                "region": store.region,
                "pathStyle": true,
                "credentialsSecret": "s3-credentials",
            },
        });
        // The controller deletes objects itself, with the same store's credentials.
        let (_controller, _) = start_controller_with(&ns, &settings, &store.aws_env())?;
        ns.apply_ok(&tenant_yaml("acme", "  {}")).await?;
        ns.wait_phase("acme", TenantPhase::Ready, TIMEOUT).await?;
        let uri = ns.secret_value("acme", "uri").await?;
        let mut conn = PgConnection::connect(&uri).await?;
        sqlx::raw_sql(
            "CREATE TABLE orders (id serial PRIMARY KEY, note text);
             INSERT INTO orders (note) SELECT 'order ' || i FROM generate_series(1, 300) i;
             CREATE TABLE customers (id int PRIMARY KEY, name text);
             INSERT INTO customers SELECT i, 'customer ' || i FROM generate_series(1, 20) i;",
        )
        .execute(&mut conn)
        .await?;

        ns.apply_ok(&backup_yaml("acme-1", "{tenant: acme}"))
            .await?;
        let first = wait_backup(&ns, "acme-1").await?.status.unwrap_or_default();
        ensure!(first.phase == Some(JobPhase::Succeeded), "{first:?}");
        let first_uri = first.uri.clone().context("no uri")?;
        let key = s3_key(&first_uri, &store.bucket)?.to_string();
        ensure!(
            key == format!("fleet/{}/acme/acme-1.dump", ns.name),
            "unexpected key {key}"
        );
        let object = store.get(&key).await?;
        let sha: String = Sha256::digest(&object)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        ensure!(
            first.sha256.as_deref() == Some(sha.as_str())
                && first.bytes == Some(object.len() as i64),
            "status says {:?} / {:?} bytes, the stored object is {sha} / {} bytes",
            first.sha256,
            first.bytes,
            object.len()
        );
        let manifest = key.replace(".dump", ".json");
        ensure!(!store.get(&manifest).await?.is_empty(), "an empty manifest");

        // The store goes down: the next backup fails, saying where it could not write, and
        // stores nothing; the previous backup stays, and the Tenant says it is not backed up.
        store.stop()?;
        ns.apply_ok(&backup_yaml("acme-2", "{tenant: acme}"))
            .await?;
        let failed = wait_backup(&ns, "acme-2").await?.status.unwrap_or_default();
        ensure!(failed.phase == Some(JobPhase::Failed), "{failed:?}");
        let error = failed.error.clone().unwrap_or_default();
        ensure!(
            error.contains(&format!("fleet/{}/acme/acme-2.dump", ns.name)),
            "the error does not say where: {error}"
        );
        ensure!(!error.contains(&store.secret_key), "a secret in the error");
        let tenant = ns.tenants().get("acme").await?.status.unwrap_or_default();
        let backed_up = tenant
            .conditions
            .iter()
            .find(|c| c.type_ == "BackedUp")
            .context("no BackedUp condition")?;
        ensure!(
            backed_up.status == "False"
                && backed_up.reason == "BackupFailed"
                && backed_up.message.contains("acme-2"),
            "{backed_up:?}"
        );
        ensure!(
            tenant.last_backup.as_ref().map(|l| l.name.as_str()) == Some("acme-1"),
            "lastBackup moved: {:?}",
            tenant.last_backup
        );
        store.resume()?;
        let keys = store.keys(&format!("fleet/{}/acme", ns.name)).await?;
        ensure!(
            keys.iter().all(|k| !k.contains("acme-2")),
            "the failed backup left {keys:?}"
        );
        ensure!(
            keys.contains(&key) && store.get(&key).await? == object,
            "the previous backup's object changed: {keys:?}"
        );
        let backups: Api<TenantBackup> = Api::namespaced(ns.client.clone(), &ns.name);
        ensure!(
            backups.get_opt("acme-1").await?.is_some(),
            "the previous TenantBackup went"
        );

        // A byte flipped in the store: the restore fails on the sha256 and changes nothing.
        let file = store.object_file(&key);
        let mut bytes = std::fs::read(&file).with_context(|| format!("{}", file.display()))?;
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        std::fs::write(&file, &bytes)?;
        sqlx::raw_sql("UPDATE customers SET name = 'renamed'; DELETE FROM orders WHERE id > 100;")
            .execute(&mut conn)
            .await?;
        let before = contents(&mut conn).await?;
        drop(conn);
        ns.apply_ok(&restore_yaml(
            "acme-bad",
            "{tenant: acme, from: {backup: acme-1}}",
        ))
        .await?;
        let bad = wait_restore(&ns, "acme-bad").await?;
        ensure!(
            bad.phase == Some(JobPhase::Failed)
                && bad.error.as_deref().is_some_and(|e| e.contains("sha256")),
            "{bad:?}"
        );
        ns.wait_phase("acme", TenantPhase::Ready, TIMEOUT).await?;
        let mut conn = PgConnection::connect(&uri).await?;
        ensure!(
            contents(&mut conn).await? == before,
            "a failed restore changed the tenant's rows"
        );

        // Deleting the TenantBackups deletes the object and the manifest; the failed one had none.
        for name in ["acme-1", "acme-2"] {
            backups.delete(name, &DeleteParams::default()).await?;
        }
        wait_for("the TenantBackups to go", TIMEOUT, || async {
            backups
                .list(&Default::default())
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        })
        .await?;
        let keys = store.keys(&format!("fleet/{}", ns.name)).await?;
        ensure!(
            keys.is_empty(),
            "objects outlived their TenantBackups: {keys:?}"
        );
        Ok(())
    })
    .await;
}

/// A namespace of the test's own for the final backups of Snapshot deletions (the controller's
/// namespace in a real install), and the controller environment that names it.
async fn final_namespace(ns: &TestNs) -> anyhow::Result<(String, Vec<(String, String)>)> {
    let name = format!("{}-final", ns.name);
    let out = ns.kubectl(&["create", "namespace", &name]).await?;
    ensure!(out.success, "{}", out.stderr);
    Ok((
        name.clone(),
        vec![("SILO_FINAL_BACKUP_NAMESPACE".to_string(), name)],
    ))
}

/// The final TenantBackups in `namespace`.
async fn final_backups(ns: &TestNs, namespace: &str) -> anyhow::Result<Vec<TenantBackup>> {
    let api: Api<TenantBackup> = Api::namespaced(ns.client.clone(), namespace);
    Ok(api.list(&Default::default()).await?.items)
}

async fn database_exists(admin: &sqlx::PgPool, name: &str) -> anyhow::Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(admin)
            .await?,
    )
}

async fn role_exists(admin: &sqlx::PgPool, name: &str) -> anyhow::Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(name)
            .fetch_one(admin)
            .await?,
    )
}

/// Policy `Snapshot`, the default: a deleted Tenant is locked and backed up, its finalizer goes,
/// and a tombstone on the server keeps its database for the grace period (a controller killed
/// during the final backup loses and doubles nothing). Applied again within the grace period,
/// it gets the same rows back with new credentials; once a grace period ends, the database and
/// role are purged, and the final backup restores into another Tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_deletion_keeps_the_data_locked_until_undelete_or_purge() {
    with_temp_ns("snapshot", |ns: TestNs| async move {
        node::image()?;
        let (final_ns, env) = final_namespace(&ns).await?;
        let result = async {
            let pg = PgServer::start()?;
            let server = ns.server_name("pg");
            ns.add_server(&server, &pg, "").await?;
            let admin = pg.admin_pool().await?;
            let (mut controller, dir) = start_controller_with(&ns, &serde_json::json!({}), &env)?;
            ns.apply_ok(&[
                tenant_yaml("acme", "  deletion: {gracePeriod: 1h}"),
                tenant_yaml("brief", "  deletion: {gracePeriod: 20s}"),
                tenant_yaml("heir", "  deletion: {policy: Delete}"),
                tenant_yaml("fleeting", "  deletion: {gracePeriod: 1h, finalBackupRetention: 20s}"),
            ].join("---\n")).await?;
            for t in ["acme", "brief", "heir", "fleeting"] {
                ns.wait_phase(t, TenantPhase::Ready, TIMEOUT).await?;
            }
            let mut originals = Vec::new();
            for t in ["acme", "brief"] {
                let mut conn = PgConnection::connect(&ns.secret_value(t, "uri").await?).await?;
                sqlx::raw_sql(&format!(
                    "CREATE TABLE orders (id serial PRIMARY KEY, note text);
                     INSERT INTO orders (note) SELECT '{t} ' || i FROM generate_series(1, 200) i;
                     CREATE TABLE customers (id int PRIMARY KEY, name text);
                     INSERT INTO customers SELECT i, '{t} customer ' || i FROM generate_series(1, 10) i;"
                ))
                .execute(&mut conn)
                .await?;
                originals.push(contents(&mut conn).await?);
            }
            let old_uri = ns.secret_value("acme", "uri").await?;
            let db = ns.secret_value("acme", "dbname").await?;
            let role = ns.secret_value("acme", "user").await?;
            let old_password = ns.secret_value("acme", "password").await?;
            let brief_db = ns.secret_value("brief", "dbname").await?;
            // Through the router too, until the deletion.
            let router = RouterProcess::start(&ns, "session")?;
            let via_router = |password: String| {
                let options = PgConnectOptions::new()
                    .host("127.0.0.1")
                    .port(router.port)
                    .username(&role)
                    .password(&password)
                    .database(&format!("{}.acme", ns.name));
                async move { PgConnection::connect_with(&options).await }
            };
            wait_for("acme to be routable", TIMEOUT, || async {
                via_router(old_password.clone()).await.ok()
            })
            .await?;

            // Deleted; the controller is killed while the final backup runs, and restarted.
            let out = ns.kubectl(&["delete", "tenant", "acme", "brief", "fleeting", "-n", &ns.name, "--wait=false"]).await?;
            ensure!(out.success, "{}", out.stderr);
            wait_for("a final backup to start", TIMEOUT, || async {
                (!final_backups(&ns, &final_ns).await.ok()?.is_empty()).then_some(())
            })
            .await?;
            controller.kill9();
            let (_controller, _) = start_controller_with(&ns, &serde_json::json!({}), &env)?;
            for t in ["acme", "brief", "fleeting"] {
                wait_for(&format!("Tenant {t} to go"), TIMEOUT, || async {
                    ns.tenants().get_opt(t).await.ok()?.is_none().then_some(())
                })
                .await?;
            }
            // (fleeting's may already have reached the end of its 20 s retention.)
            let finals: Vec<_> = final_backups(&ns, &final_ns)
                .await?
                .into_iter()
                .filter(|b| b.spec.tenant != "fleeting")
                .collect();
            ensure!(finals.len() == 2, "one final backup per tenant, not {}", finals.len());
            for b in &finals {
                let status = b.status.clone().unwrap_or_default();
                ensure!(status.phase == Some(JobPhase::Succeeded), "{status:?}");
            }
            // Locked: the old credentials no longer log in, directly or through the router; the
            // database and its rows are there.
            ensure!(PgConnection::connect(&old_uri).await.is_err(), "a deleted tenant's login works");
            ensure!(
                via_router(old_password.clone()).await.is_err(),
                "a deleted tenant's login works through the router"
            );
            ensure!(database_exists(&admin, &db).await?, "the database went with a Snapshot deletion");
            ensure!(
                !role_exists(&admin, &format!("{role}_final")).await?,
                "the final backup's login was left behind"
            );
            // The tombstone shows on the DatabaseServer.
            let servers = ns.servers();
            let tombstones = wait_for("the tombstones on the server's status", TIMEOUT, || async {
                let status = servers.get(&server).await.ok()?.status?;
                let t = status.tombstones?;
                (t.count >= 1 && t.items.iter().any(|i| i.tenant == format!("{}/acme", ns.name)))
                    .then_some(t)
            })
            .await?;
            let entry = tombstones
                .items
                .iter()
                .find(|i| i.tenant.ends_with("/acme"))
                .context("acme's tombstone")?;
            ensure!(entry.backup.ends_with(".dump") && entry.database == db, "{entry:?}");

            // Undelete: the same Tenant applied again gets the same rows and new credentials.
            ns.apply_ok(&tenant_yaml("acme", "  deletion: {gracePeriod: 1h}")).await?;
            ns.wait_phase("acme", TenantPhase::Ready, TIMEOUT).await?;
            let new_uri = ns.secret_value("acme", "uri").await?;
            ensure!(new_uri != old_uri, "the undeleted tenant kept its old password");
            let mut conn = PgConnection::connect(&new_uri).await?;
            ensure!(contents(&mut conn).await? == originals[0], "undelete lost rows");
            ensure!(PgConnection::connect(&old_uri).await.is_err(), "the old password still works");
            let events = ns
                .kubectl(&["get", "events", "-n", &ns.name, "--field-selector", "reason=Undeleted", "-o", "name"])
                .await?;
            ensure!(!events.stdout.trim().is_empty(), "no Undeleted event");

            // Purge: brief's 20 s are over: its database and role go, its final backup stays and
            // restores into another tenant.
            wait_for("brief's purge", TIMEOUT, || async {
                (!database_exists(&admin, &brief_db).await.ok()?).then_some(())
            })
            .await?;
            ensure!(!role_exists(&admin, &brief_db).await?, "the purged tenant's role is left");
            let brief_final = final_backups(&ns, &final_ns)
                .await?
                .into_iter()
                .find(|b| b.spec.tenant == "brief")
                .context("brief's final backup")?
                .status
                .unwrap_or_default();
            let uri = brief_final.uri.context("no uri")?;
            let sha = brief_final.sha256.context("no sha256")?;
            ns.apply_ok(&restore_yaml(
                "heir-from-brief",
                &format!("{{tenant: heir, from: {{uri: \"{uri}\", sha256: {sha}}}}}"),
            ))
            .await?;
            let restored = wait_restore(&ns, "heir-from-brief").await?;
            ensure!(restored.phase == Some(JobPhase::Succeeded), "{restored:?}");
            ns.wait_phase("heir", TenantPhase::Ready, TIMEOUT).await?;
            let mut heir = PgConnection::connect(&ns.secret_value("heir", "uri").await?).await?;
            ensure!(contents(&mut heir).await? == originals[1], "the final backup lost rows");

            // fleeting's final backup reaches the end of its retention (20 s) in a namespace the
            // controller does not watch: record and dump both go.
            wait_for("fleeting's final backup to expire", TIMEOUT, || async {
                let finals = final_backups(&ns, &final_ns).await.ok()?;
                (!finals.iter().any(|b| b.spec.tenant == "fleeting")).then_some(())
            })
            .await?;
            let fleeting_dir = dir.join(&ns.name).join("fleeting");
            let left: Vec<_> = std::fs::read_dir(&fleeting_dir)
                .map(|entries| entries.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            ensure!(left.is_empty(), "left in {}: {left:?}", fleeting_dir.display());
            Ok(())
        }
        .await;
        let _ = ns.kubectl(&["delete", "namespace", &final_ns, "--wait=false"]).await;
        result
    })
    .await;
}

/// Snapshot deletions with the store down wait, drop nothing and say why, and finish once it is
/// back; deleting a namespace of ten Snapshot tenants finishes and leaves ten tombstones and ten
/// final backups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_deletions_wait_out_a_failing_store_and_survive_their_namespace() {
    with_temp_ns("snapshot-s3", |ns: TestNs| async move {
        node::image()?;
        let (final_ns, mut env) = final_namespace(&ns).await?;
        let result = async {
            let store = S3Store::start(&ns.name)?;
            let pg = PgServer::start()?;
            let server = ns.server_name("pg");
            ns.add_server(&server, &pg, "").await?;
            let admin = pg.admin_pool().await?;
            for namespace in [ns.name.as_str(), final_ns.as_str()] {
                let credentials: Secret = serde_json::from_value(serde_json::json!({
                    "metadata": { "name": "s3-credentials" },
                    "stringData": {
                        "AWS_ACCESS_KEY_ID": store.access_key,
                        "AWS_SECRET_ACCESS_KEY": store.secret_key,
                    },
                }))?;
                let secrets: Api<Secret> = Api::namespaced(ns.client.clone(), namespace);
                secrets.create(&PostParams::default(), &credentials).await?;
            }
            let settings = serde_json::json!({
                "destination": format!("s3://{}/fleet", store.bucket),
                "s3": {
                    "endpoint": store.endpoint,
                    "region": store.region,
                    "pathStyle": true,
                    "credentialsSecret": "s3-credentials",
                },
            });
            env.extend(store.aws_env());
            let (_controller, _) = start_controller_with(&ns, &settings, &env)?;
            let names: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
            let yaml: Vec<String> = names.iter().map(|n| tenant_yaml(n, "  {}")).collect();
            ns.apply_ok(&yaml.join("---\n")).await?;
            for n in &names {
                ns.wait_phase(n, TenantPhase::Ready, TIMEOUT).await?;
            }
            let t0_db = ns.secret_value("t0", "dbname").await?;

            // The store is down: t0's deletion waits, saying why, and drops nothing.
            store.stop()?;
            let out = ns
                .kubectl(&["delete", "tenant", "t0", "-n", &ns.name, "--wait=false"])
                .await?;
            ensure!(out.success, "{}", out.stderr);
            let condition = wait_for("t0 to say its final backup failed", TIMEOUT, || async {
                let t = ns.tenants().get_opt("t0").await.ok()??;
                let status = t.status?;
                status
                    .conditions
                    .into_iter()
                    .find(|c| c.type_ == "Ready" && c.reason == "FinalBackupFailed")
            })
            .await?;
            ensure!(
                condition.message.contains("nothing is dropped"),
                "{}",
                condition.message
            );
            ensure!(
                database_exists(&admin, &t0_db).await?,
                "t0's database went without a backup"
            );
            // Back: the deletion completes.
            store.resume()?;
            wait_for("t0 to go once the store is back", TIMEOUT, || async {
                ns.tenants()
                    .get_opt("t0")
                    .await
                    .ok()?
                    .is_none()
                    .then_some(())
            })
            .await?;

            // The namespace goes, tenants and all: ten tombstones, ten final backups, never more
            // than backups.maxConcurrentPerServer (2) dumping from the server at once.
            let final_jobs: Api<Job> = Api::namespaced(ns.client.clone(), &final_ns);
            let watching = Arc::new(AtomicBool::new(true));
            let most = tokio::spawn({
                let watching = watching.clone();
                async move {
                    let mut most = 0;
                    while watching.load(Ordering::Relaxed) {
                        if let Ok(jobs) = final_jobs.list(&Default::default()).await {
                            let active = jobs
                                .items
                                .iter()
                                .filter(|j| j.status.as_ref().and_then(|s| s.active).unwrap_or(0) > 0)
                                .count();
                            most = most.max(active);
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    most
                }
            });
            let namespaces: Api<k8s_openapi::api::core::v1::Namespace> =
                Api::all(ns.client.clone());
            namespaces
                .delete(&ns.name, &DeleteParams::default())
                .await?;
            wait_for("the namespace to go", Duration::from_secs(300), || async {
                namespaces
                    .get_opt(&ns.name)
                    .await
                    .ok()?
                    .is_none()
                    .then_some(())
            })
            .await?;
            // On the server itself (the DatabaseServer's admin Secret went with the namespace, so
            // its status can no longer be refreshed here; the other Snapshot test reads it).
            let tombstones: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_database
                  WHERE shobj_description(oid, 'pg_database') LIKE 'silo: tombstone ' || $1 || '/%'",
            )
            .bind(&ns.name)
            .fetch_one(&admin)
            .await?;
            ensure!(tombstones == 10, "{tombstones} tombstones on the server");
            watching.store(false, Ordering::Relaxed);
            let most = most.await?;
            ensure!(most <= 2, "{most} final backups ran at once against one server (cap 2)");
            let finals = final_backups(&ns, &final_ns).await?;
            ensure!(finals.len() == 10, "{} final backups", finals.len());
            let keys = store.keys(&format!("fleet/{}", ns.name)).await?;
            let dumps = keys.iter().filter(|k| k.ends_with(".dump")).count();
            ensure!(dumps == 10, "{dumps} dumps in the store: {keys:?}");
            Ok(())
        }
        .await;
        let _ = ns
            .kubectl(&["delete", "namespace", &final_ns, "--wait=false"])
            .await;
        result
    })
    .await;
}

/// The chart's default destination, `file:///var/lib/silo/backups`, with no `backups.volume`:
/// a Job would write into its own pod and report success for a dump that goes with the pod.
/// Instead a backup fails naming the setting, and a Snapshot deletion holds (nothing dropped)
/// until there is somewhere to keep its backup, or until its policy is changed to Retain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_destination_without_a_volume_keeps_nothing_so_nothing_counts_on_it() {
    with_temp_ns("no-volume", |ns: TestNs| async move {
        node::image()?;
        let (final_ns, env) = final_namespace(&ns).await?;
        let result = async {
            let pg = PgServer::start()?;
            let server = ns.server_name("pg");
            ns.add_server(&server, &pg, "").await?;
            let admin = pg.admin_pool().await?;
            let settings = serde_json::json!({ "volume": null });
            let (_controller, _) = start_controller_with(&ns, &settings, &env)?;
            ns.apply_ok(&tenant_yaml("acme", "  {}")).await?;
            ns.wait_phase("acme", TenantPhase::Ready, TIMEOUT).await?;
            let database = ns.secret_value("acme", "dbname").await?;

            ns.apply_ok(&backup_yaml("b1", "{tenant: acme}")).await?;
            let status = wait_backup(&ns, "b1").await?.status.unwrap_or_default();
            ensure!(status.phase == Some(JobPhase::Failed), "{status:?}");
            let error = status.error.unwrap_or_default();
            ensure!(error.contains("backups.volume"), "{error}");
            let jobs: Api<Job> = Api::namespaced(ns.client.clone(), &ns.name);
            ensure!(
                jobs.list(&Default::default()).await?.items.is_empty(),
                "a backup Job ran with nowhere to keep its dump"
            );

            let out = ns
                .kubectl(&["delete", "tenant", "acme", "-n", &ns.name, "--wait=false"])
                .await?;
            ensure!(out.success, "{}", out.stderr);
            let condition = wait_for("acme to say its final backup failed", TIMEOUT, || async {
                let status = ns.tenants().get_opt("acme").await.ok()??.status?;
                status
                    .conditions
                    .into_iter()
                    .find(|c| c.type_ == "Ready" && c.reason == "FinalBackupFailed")
            })
            .await?;
            ensure!(
                condition.message.contains("backups.volume")
                    && condition.message.contains("nothing is dropped"),
                "{}",
                condition.message
            );
            ensure!(
                final_backups(&ns, &final_ns).await?.is_empty(),
                "a final backup was recorded with nowhere to keep it"
            );
            ensure!(
                database_exists(&admin, &database).await?,
                "acme's database went"
            );

            // The way out a person takes: keep the database as it is.
            let patch = serde_json::json!({ "spec": { "deletion": { "policy": "Retain" } } });
            ns.tenants()
                .patch("acme", &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            wait_for("acme to go once it is Retain", TIMEOUT, || async {
                ns.tenants()
                    .get_opt("acme")
                    .await
                    .ok()?
                    .is_none()
                    .then_some(())
            })
            .await?;
            ensure!(
                database_exists(&admin, &database).await?,
                "acme's database went"
            );
            anyhow::Ok(())
        }
        .await;
        let _ = ns
            .kubectl(&["delete", "namespace", &final_ns, "--wait=false"])
            .await;
        result
    })
    .await;
}
