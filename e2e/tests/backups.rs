//! End-to-end scenarios for TenantBackups and TenantRestores: the `silo` runner as a Job on the node, dumping a real
//! tenant database to a `file://` volume (a hostPath on the node, which shares this machine's
//! disk), verified, recorded on the Tenant, and deleted with its TenantBackup.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, ensure};
use kube::api::{Api, DeleteParams};
use sha2::{Digest, Sha256};
use silo_crds::{JobPhase, TenantBackup, TenantPhase};
use silo_e2e::kube_env::with_temp_ns;
use silo_e2e::{ControllerProcess, PgServer, TestNs, node, tenant_yaml, wait_for};
use sqlx::{Connection, PgConnection};

const TIMEOUT: Duration = Duration::from_secs(180);

/// A controller whose Jobs run the harness's silo image, and whose backups go to a fresh
/// directory of this machine mounted into the Jobs as a hostPath.
fn start_controller(ns: &TestNs) -> anyhow::Result<(ControllerProcess, PathBuf)> {
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
    std::fs::write(
        &backups,
        serde_json::json!({
            "destination": format!("file://{}", dir.display()),
            "volume": { "hostPath": { "path": dir, "type": "Directory" } },
            "maxConcurrentPerServer": 1,
        })
        .to_string(),
    )?;
    let controller = ControllerProcess::start_with_env(
        ns,
        None,
        &[],
        &[
            ("SILO_JOB_SETTINGS", jobs.to_str().context("a path")?),
            ("SILO_BACKUP_SETTINGS", backups.to_str().context("a path")?),
        ],
    )?;
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
        let jobs: Api<k8s_openapi::api::batch::v1::Job> =
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
