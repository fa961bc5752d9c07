//! The router against the real control plane: tenants applied with kubectl become routable within
//! a second of Ready, suspension and deletion refuse, and credentials reach only their own tenant.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use silo_crds::TenantPhase;
use silo_e2e::kube_env::with_temp_ns;
use silo_e2e::{PgServer, RouterProcess, TestNs, wait_for};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

const READY_TIMEOUT: Duration = Duration::from_secs(90);

fn tenant_yaml(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: silo.dev/v1alpha1\nkind: Tenant\nmetadata:\n  name: {name}\nspec:\n{spec}\n"
    )
}

/// Connects through the router with `who`'s credentials, naming tenant `tenant`.
async fn via_router(
    ns: &TestNs,
    router: &RouterProcess,
    who: &str,
    tenant: &str,
) -> anyhow::Result<PgConnection> {
    let [user, password] = ns.secret_values(who, ["user", "password"]).await?;
    let options = PgConnectOptions::new()
        .host("127.0.0.1")
        .port(router.port)
        .username(&user)
        .password(&password)
        .database(&format!("{}.{tenant}", ns.name));
    Ok(PgConnection::connect_with(&options).await?)
}

fn code(e: &anyhow::Error) -> String {
    match e.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(db)) => db.code().unwrap_or_default().to_string(),
        _ => format!("not a database error: {e}"),
    }
}

#[tokio::test]
async fn router_follows_tenants_live() {
    with_temp_ns("router", |ns| async move {
        let pg = PgServer::start()?;
        ns.add_server(&ns.server_name("pg"), &pg, "").await?;
        let router = RouterProcess::start(&ns, "transaction")?;
        let address = format!("127.0.0.1:{}", router.port);
        let _ctl = ns.start_controller(&["--router-address", &address])?;

        // Applied with kubectl, routable within a second of Ready.
        let names: Vec<String> = (1..=5).map(|i| format!("r{i}")).collect();
        let yaml: Vec<String> = names
            .iter()
            .map(|n| tenant_yaml(n, "  deletion: {policy: Delete}"))
            .collect();
        ns.apply_ok(&yaml.join("---\n")).await?;
        let mut worst = Duration::ZERO;
        for n in &names {
            ns.wait_phase(n, TenantPhase::Ready, READY_TIMEOUT).await?;
            let ready_seen = Instant::now();
            let mut conn = wait_for("routable", Duration::from_secs(5), || async {
                via_router(&ns, &router, n, n).await.ok()
            })
            .await?;
            worst = worst.max(ready_seen.elapsed());
            let db: String = sqlx::query_scalar("SELECT current_database()")
                .fetch_one(&mut conn)
                .await?;
            ensure!(
                db == ns.secret_value(n, "dbname").await?,
                "{n} routed to {db}"
            );
        }
        ensure!(
            worst < Duration::from_secs(1),
            "a Ready tenant took {worst:?} to become routable"
        );
        eprintln!("router: slowest tenant routable {worst:?} after Ready was observed");

        // The Secret's router-uri works as it is.
        let uri = ns.secret_value("r1", "router-uri").await?;
        ensure!(uri.contains(&address), "{uri}");
        let mut conn = PgConnection::connect(&uri).await?;
        let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut conn).await?;
        ensure!(one == 1);

        // Each tenant's credentials reach only its own database.
        for who in &names {
            for target in &names {
                let result = via_router(&ns, &router, who, target).await;
                match (who == target, result) {
                    (true, Ok(_)) => {}
                    (true, Err(e)) => anyhow::bail!("{who} cannot reach its own tenant: {e}"),
                    (false, Ok(_)) => anyhow::bail!("{who}'s credentials reached tenant {target}"),
                    (false, Err(e)) => ensure!(code(&e) == "28P01", "{who} -> {target}: {e}"),
                }
            }
        }

        // Suspended: refused within a second; the open session ends.
        let mut open = via_router(&ns, &router, "r3", "r3").await?;
        let out = ns
            .kubectl(&[
                "patch",
                "tenant",
                "r3",
                "-n",
                &ns.name,
                "--type=merge",
                "-p",
                r#"{"spec":{"suspended":true}}"#,
            ])
            .await?;
        ensure!(out.success, "{}", out.stderr);
        let patched = Instant::now();
        let refusal = wait_for("suspension refused", Duration::from_secs(5), || async {
            match via_router(&ns, &router, "r3", "r3").await {
                Err(e) if code(&e) == "57P03" => Some(e.to_string()),
                _ => None,
            }
        })
        .await?;
        ensure!(
            patched.elapsed() < Duration::from_secs(1),
            "suspension took {:?} to apply",
            patched.elapsed()
        );
        ensure!(refusal.contains("suspended"), "{refusal}");
        ensure!(
            sqlx::query("SELECT 1").execute(&mut open).await.is_err(),
            "open session survived suspension"
        );

        // Deleted: refused.
        let out = ns
            .kubectl(&["delete", "tenant", "r4", "-n", &ns.name, "--wait=false"])
            .await?;
        ensure!(out.success, "{}", out.stderr);
        let refusal = wait_for("deletion refused", Duration::from_secs(5), || async {
            match via_router(&ns, &router, "r5", "r4").await {
                Err(e) if code(&e) == "57P03" || code(&e) == "3D000" => Some(e.to_string()),
                _ => None,
            }
        })
        .await;
        refusal.context("a deleted tenant is still routable")?;
        Ok(())
    })
    .await;
}

/// Django (psycopg 3) runs `migrate` and prepared queries for two tenants through the router, in
/// session and in transaction mode.
#[tokio::test]
async fn django_migrates_two_tenants_through_the_router() {
    with_temp_ns("django", |ns| async move {
        let python = std::env::var("SILO_PYTHON")
            .context("SILO_PYTHON: a Python with Django and psycopg (e2e/run-tests.sh sets it)")?;
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("django/check_tenant.py");
        let pg = PgServer::start()?;
        ns.add_server(&ns.server_name("pg"), &pg, "").await?;
        let _ctl = ns.start_controller(&[])?;
        ns.apply_ok(&[tenant_yaml("dj1", "  {}"), tenant_yaml("dj2", "  {}")].join("---\n"))
            .await?;
        for t in ["dj1", "dj2"] {
            ns.wait_phase(t, TenantPhase::Ready, READY_TIMEOUT).await?;
        }
        for mode in ["session", "transaction"] {
            let router = RouterProcess::start(&ns, mode)?;
            for t in ["dj1", "dj2"] {
                let out = tokio::process::Command::new(&python)
                    .arg(&script)
                    .env("PGHOST", "127.0.0.1")
                    .env("PGPORT", router.port.to_string())
                    .env("PGDATABASE", format!("{}.{t}", ns.name))
                    .env("PGUSER", ns.secret_value(t, "user").await?)
                    .env("PGPASSWORD", ns.secret_value(t, "password").await?)
                    .output()
                    .await?;
                let stdout = String::from_utf8_lossy(&out.stdout);
                ensure!(
                    out.status.success(),
                    "django on {t} ({mode}): {}{stdout}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let seen: serde_json::Value = serde_json::from_str(stdout.trim())?;
                ensure!(
                    seen["database"] == ns.secret_value(t, "dbname").await?.as_str(),
                    "{t} ({mode}): {seen}"
                );
                ensure!(
                    seen["migrations"].as_i64().unwrap_or(0) > 10,
                    "{t} ({mode}): {seen}"
                );
                ensure!(
                    seen["counts"]
                        .as_array()
                        .is_some_and(|c| c.len() == 20 && c.iter().all(|n| n == 1)),
                    "{seen}"
                );
            }
        }
        Ok(())
    })
    .await;
}
