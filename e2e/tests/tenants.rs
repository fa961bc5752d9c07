//! End-to-end scenarios for Tenants and DatabaseServers: a real kube-apiserver, real PostgreSQL
//! servers, the controller as a process. Each test has its own namespace, servers and controller.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use silo_crds::{DatabaseServer, TenantPhase};
use silo_e2e::controller::metric_sum;
use silo_e2e::kube_env::with_temp_ns;
use silo_e2e::postgres::Catalog;
use silo_e2e::{PgServer, TestNs, tenant_yaml, wait_for};
use sqlx::{Connection, PgConnection, Row};

const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The Ready condition of a Tenant or DatabaseServer status.
fn ready_of(
    conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
) -> anyhow::Result<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .context("no Ready condition")
}

fn ready_condition(
    tenant: &silo_crds::Tenant,
) -> anyhow::Result<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    ready_of(tenant.status.clone().context("no status")?.conditions)
}

/// Connects with the tenant's own credentials from its Secret.
async fn connect_as_tenant(ns: &TestNs, tenant: &str) -> anyhow::Result<PgConnection> {
    let uri = ns.secret_value(tenant, "uri").await?;
    Ok(PgConnection::connect(&uri).await?)
}

async fn server_condition(
    ns: &TestNs,
    server: &str,
    status: &str,
) -> anyhow::Result<DatabaseServer> {
    wait_for(
        &format!("server {server} Ready={status}"),
        READY_TIMEOUT,
        || async {
            let s = ns.servers().get(server).await.ok()?;
            let ready = s
                .status
                .as_ref()?
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")?;
            (ready.status == status).then_some(s.clone())
        },
    )
    .await
}

#[tokio::test]
async fn a_tenant_becomes_a_database_its_secret_can_use() {
    with_temp_ns("apply", |ns| async move {
        let pg = PgServer::start()?;
        let server = ns.server_name("pg");
        ns.add_server(&server, &pg, "").await?;
        let ctl = ns.start_controller(&[])?;
        ns.apply_ok(&tenant_yaml("acme", "  connectionLimit: 7")).await?;

        let tenant = ns.wait_phase("acme", TenantPhase::Ready, READY_TIMEOUT).await?;
        let status = tenant.status.context("status")?;
        ensure!(status.server.as_deref() == Some(server.as_str()), "placed on {:?}", status.server);
        let expected_db = format!("t_{}_acme", ns.name);
        ensure!(status.database.as_deref() == Some(expected_db.as_str()));
        ensure!(status.role.as_deref() == Some(expected_db.as_str()));
        ensure!(status.secret_name.as_deref() == Some("acme-db"));
        ensure!(status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        ensure!(status.conditions.iter().any(|c| c.type_ == "DatabaseReady" && c.status == "True"));

        // Every key of the Secret, and a working DATABASE_URL.
        for key in ["host", "port", "dbname", "user", "password", "uri"] {
            ensure!(!ns.secret_value("acme", key).await?.is_empty(), "secret key {key}");
        }
        let mut conn = connect_as_tenant(&ns, "acme").await?;
        sqlx::raw_sql("CREATE TABLE orders (id int primary key, item text); INSERT INTO orders VALUES (1, 'widget')")
            .execute(&mut conn)
            .await?;
        let item: String = sqlx::query_scalar("SELECT item FROM orders WHERE id = 1").fetch_one(&mut conn).await?;
        ensure!(item == "widget");
        let schema_owner: String = sqlx::query_scalar(
            "SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'public'",
        )
        .fetch_one(&mut conn)
        .await?;
        ensure!(schema_owner == expected_db || schema_owner == "pg_database_owner", "public owned by {schema_owner}");

        let admin = pg.admin_pool().await?;
        let limit: i32 = sqlx::query_scalar("SELECT rolconnlimit FROM pg_roles WHERE rolname = $1")
            .bind(&expected_db)
            .fetch_one(&admin)
            .await?;
        ensure!(limit == 7, "connection limit {limit}");

        // What a user sees.
        let table = ns.kubectl(&["get", "tenants", "-n", &ns.name]).await?;
        ensure!(table.stdout.contains("PHASE") && table.stdout.contains("Ready"), "{}", table.stdout);
        server_condition(&ns, &server, "True").await?;
        let dbs_status = wait_for("server counts its tenant", READY_TIMEOUT, || async {
            let status = ns.servers().get(&server).await.ok()?.status?;
            (status.tenants == 1).then_some(status)
        })
        .await?;
        ensure!(dbs_status.version.is_some_and(|v| v.starts_with(char::is_numeric)));
        let explain = ns.kubectl(&["explain", "tenant.spec.connectionLimit"]).await?;
        ensure!(explain.stdout.contains("CONNECTION LIMIT"), "{}", explain.stdout);

        // Probes and metrics.
        ensure!(ctl.http_get("/healthz").await?.0 == 200);
        ensure!(ctl.http_get("/readyz").await?.0 == 200);
        let (code, metrics) = ctl.http_get("/metrics").await?;
        ensure!(code == 200);
        ensure!(metrics.contains("silo_reconciles_total{kind=\"tenant\",result=\"ok\"}"), "{metrics}");
        ensure!(metrics.contains("silo_tenants{phase=\"Ready\"} 1"), "{metrics}");
        ensure!(metrics.contains("silo_reconcile_duration_seconds_bucket"), "{metrics}");

        // No password in logs, status or events.
        let password = ns.secret_value("acme", "password").await?;
        ensure!(!ctl.log_text().contains(&password), "password in controller log");
        let everything = ns.kubectl(&["get", "tenants,events", "-n", &ns.name, "-o", "yaml"]).await?;
        ensure!(!everything.stdout.contains(&password), "password in status or events");

        // Graceful shutdown on SIGTERM.
        let mut ctl = ctl;
        ctl.terminate()?;
        ensure!(ctl.log_text().contains("stopped"), "no orderly stop in the log");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn b_isolation_matrix_six_tenants_on_two_servers() {
    with_temp_ns("isolation", |ns| async move {
        let servers = [PgServer::start()?, PgServer::start()?];
        ns.add_server(&ns.server_name("one"), &servers[0], "").await?;
        ns.add_server(&ns.server_name("two"), &servers[1], "").await?;
        let _ctl = ns.start_controller(&[])?;
        server_condition(&ns, &ns.server_name("one"), "True").await?;
        server_condition(&ns, &ns.server_name("two"), "True").await?;
        let names: Vec<String> = (1..=6).map(|i| format!("t{i}")).collect();
        let yaml: Vec<String> = names.iter().map(|n| tenant_yaml(n, "  {}")).collect();
        ns.apply_ok(&yaml.join("---\n")).await?;
        for n in &names {
            ns.wait_phase(n, TenantPhase::Ready, READY_TIMEOUT).await?;
        }

        struct Creds {
            host: String,
            port: u16,
            db: String,
            user: String,
            password: String,
        }
        let mut creds = Vec::new();
        for n in &names {
            let [host, port, db, user, password] = ns
                .secret_values(n, ["host", "port", "dbname", "user", "password"])
                .await?;
            creds.push(Creds {
                host,
                port: port.parse()?,
                db,
                user,
                password,
            });
        }
        let ports: std::collections::HashSet<u16> = creds.iter().map(|c| c.port).collect();
        ensure!(ports.len() == 2, "tenants spread over both servers: {ports:?}");

        let mut tried = 0;
        for (i, who) in creds.iter().enumerate() {
            for (j, target) in creds.iter().enumerate() {
                let options = sqlx::postgres::PgConnectOptions::new()
                    .host(&target.host)
                    .port(target.port)
                    .database(&target.db)
                    .username(&who.user)
                    .password(&who.password);
                let result = PgConnection::connect_with(&options).await;
                tried += 1;
                match (i == j, result) {
                    (true, Ok(mut c)) => {
                        let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut c).await?;
                        ensure!(one == 1);
                    }
                    (true, Err(e)) => anyhow::bail!("tenant {} cannot reach its own database: {e}", names[i]),
                    (false, Ok(_)) => anyhow::bail!("tenant {} reached the database of {}", names[i], names[j]),
                    (false, Err(sqlx::Error::Database(e))) => {
                        // Same server: no CONNECT privilege; other server: the role does not exist.
                        let code = e.code().unwrap_or_default().to_string();
                        ensure!(code == "42501" || code == "28P01" || code == "28000", "refusal {code}: {e}");
                    }
                    (false, Err(e)) => anyhow::bail!("unexpected error kind {e}"),
                }
            }
        }
        ensure!(tried == 36);

        for pg in &servers {
            let admin = pg.admin_pool().await?;
            let public: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_database d, aclexplode(COALESCE(d.datacl, acldefault('d', d.datdba))) a
                  WHERE d.datname LIKE 't\\_%' AND a.grantee = 0",
            )
            .fetch_one(&admin)
            .await?;
            ensure!(public == 0, "PUBLIC has a privilege on {public} tenant databases");
        }
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn c_bad_input_is_rejected_or_explained() {
    with_temp_ns("badinput", |ns| async move {
        // Rejected by `kubectl apply`, naming the field.
        let cases = [
            (tenant_yaml("bad.name", "  {}"), "metadata.name must be a DNS label"),
            (tenant_yaml("solo", "  isolation: Solo"), "spec.isolation"),
            (tenant_yaml("negative", "  connectionLimit: -5"), "spec.connectionLimit"),
            (tenant_yaml("policy", "  deletion: {policy: Shred}"), "spec.deletion.policy"),
            (tenant_yaml("grace", "  deletion: {gracePeriod: -1d}"), "spec.deletion.gracePeriod"),
            (tenant_yaml("rotate", "  credentials: {rotateEvery: soon}"), "spec.credentials.rotateEvery"),
            (tenant_yaml("overlap", "  credentials: {overlap: -10m}"), "spec.credentials.overlap"),
        ];
        for (yaml, expected) in &cases {
            let out = ns.apply(yaml).await?;
            ensure!(!out.success, "accepted: {yaml}");
            ensure!(out.stderr.contains(expected), "expected `{expected}` in: {}", out.stderr);
        }

        // Unreachable server and wrong admin password: conditions that say so.
        let pg = PgServer::start()?;
        let closed_port = silo_e2e::postgres::free_port()?;
        let unreachable = ns.server_name("unreachable");
        ns.apply_ok(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: u-admin}}\nstringData: {{username: \"nobody\", password: \"wrong\"}}\n---\n\
             apiVersion: silo.dev/v1alpha1\nkind: DatabaseServer\nmetadata:\n  name: {unreachable}\n  labels: {{silo.dev/e2e-ns: {ns}}}\n\
             spec: {{host: 127.0.0.1, port: {closed_port}, adminSecretRef: {{namespace: {ns}, name: u-admin}}}}\n",
            ns = ns.name
        ))
        .await?;
        let wrong = ns.server_name("wrongpw");
        ns.add_server_with_password(&wrong, &pg, "not-the-password", "").await?;
        let ctl = ns.start_controller(&[])?;
        let s = server_condition(&ns, &unreachable, "False").await?;
        let c = ready_of(s.status.context("no status")?.conditions)?;
        ensure!(c.reason == "Unreachable", "reason {} ({})", c.reason, c.message);
        ensure!(c.message.contains(&closed_port.to_string()), "{}", c.message);
        let s = server_condition(&ns, &wrong, "False").await?;
        let c = ready_of(s.status.context("no status")?.conditions)?;
        ensure!(c.reason == "AuthenticationFailed", "reason {} ({})", c.reason, c.message);
        ensure!(!c.message.contains("not-the-password"));

        // No fitting server: Pending with the reason, then Ready once one is added.
        ns.apply_ok(&tenant_yaml("gold", "  serverSelector: {matchLabels: {tier: gold}}\n  deletion: {policy: Delete}")).await?;
        let t = ns.wait_phase("gold", TenantPhase::Pending, READY_TIMEOUT).await?;
        let c = ready_condition(&t)?;
        ensure!(c.reason == "NoMatchingServer" && c.message.contains("serverSelector"), "{} {}", c.reason, c.message);
        let other = PgServer::start()?;
        let gold = ns.server_name("gold");
        ns.add_server(&gold, &other, "").await?;
        ns.kubectl(&["label", "databaseserver", &gold, "tier=gold"]).await?;
        let t = ns.wait_phase("gold", TenantPhase::Ready, READY_TIMEOUT).await?;
        ensure!(t.status.and_then(|s| s.server).as_deref() == Some(gold.as_str()));

        // A full pool: Pending with ServersFull.
        ns.kubectl(&["patch", "databaseserver", &gold, "--type=merge", "-p", r#"{"spec":{"maxTenants":1}}"#]).await?;
        ns.apply_ok(&tenant_yaml("second", "  serverSelector: {matchLabels: {tier: gold}}")).await?;
        let t = ns.wait_phase("second", TenantPhase::Pending, READY_TIMEOUT).await?;
        let c = ready_condition(&t)?;
        ensure!(c.reason == "ServersFull", "{} {}", c.reason, c.message);
        // ... and placed by itself once the server frees up.
        let out = ns.kubectl(&["delete", "tenant", "gold", "-n", &ns.name, "--timeout=60s"]).await?;
        ensure!(out.success, "{}", out.stderr);
        let t = ns.wait_phase("second", TenantPhase::Ready, READY_TIMEOUT).await?;
        ensure!(t.status.and_then(|s| s.server).as_deref() == Some(gold.as_str()));

        // Immutable fields stay put.
        let out = ns.apply(&tenant_yaml("second", "  isolation: Dedicated\n  serverSelector: {matchLabels: {tier: gold}}")).await?;
        ensure!(!out.success && out.stderr.contains("isolation is immutable"), "{}", out.stderr);

        ensure!(ctl_alive(ctl), "controller crashed on bad input");
        Ok(())
    })
    .await;
}

fn ctl_alive(mut ctl: silo_e2e::ControllerProcess) -> bool {
    ctl.is_running()
}

#[tokio::test]
async fn d_crash_midway_through_fifty_tenants_converges() {
    with_temp_ns("crash", |ns| async move {
        let servers = [PgServer::start()?, PgServer::start()?];
        ns.add_server(&ns.server_name("one"), &servers[0], "")
            .await?;
        ns.add_server(&ns.server_name("two"), &servers[1], "")
            .await?;
        let mut ctl = ns.start_controller(&[])?;
        server_condition(&ns, &ns.server_name("one"), "True").await?;
        server_condition(&ns, &ns.server_name("two"), "True").await?;
        let names: Vec<String> = (0..50).map(|i| format!("c{i:02}")).collect();
        let yaml: Vec<String> = names.iter().map(|n| tenant_yaml(n, "  {}")).collect();
        ns.apply_ok(&yaml.join("---\n")).await?;

        let tenants = ns.tenants();
        let ready_count = || async {
            let list = tenants.list(&Default::default()).await.ok()?;
            Some(
                list.items
                    .iter()
                    .filter(|t| t.status.as_ref().and_then(|s| s.phase) == Some(TenantPhase::Ready))
                    .count(),
            )
        };
        wait_for("some tenants ready", READY_TIMEOUT, || async {
            ready_count().await.filter(|n| *n >= 10)
        })
        .await?;
        ctl.kill9();
        let at_kill = ready_count().await.unwrap_or(0);
        ensure!(
            at_kill < 50,
            "all 50 were ready before the kill; the crash proves nothing"
        );
        let _ctl = ns.start_controller(&[])?;
        wait_for("all 50 tenants ready", Duration::from_secs(180), || async {
            ready_count().await.filter(|n| *n == 50)
        })
        .await?;

        let prefix = format!("t\\_{}\\_%", ns.name);
        let mut roles = 0;
        let mut databases = 0;
        let mut by_port: HashMap<u16, Vec<String>> = HashMap::new();
        for pg in &servers {
            let admin = pg.admin_pool().await?;
            let r: Vec<String> =
                sqlx::query_scalar("SELECT rolname::text FROM pg_roles WHERE rolname LIKE $1")
                    .bind(&prefix)
                    .fetch_all(&admin)
                    .await?;
            let d: Vec<String> =
                sqlx::query_scalar("SELECT datname::text FROM pg_database WHERE datname LIKE $1")
                    .bind(&prefix)
                    .fetch_all(&admin)
                    .await?;
            roles += r.len();
            databases += d.len();
            by_port.insert(pg.port, d);
        }
        ensure!(
            roles == 50 && databases == 50,
            "found {roles} roles and {databases} databases, expected 50 each"
        );
        for n in &names {
            let port: u16 = ns.secret_value(n, "port").await?.parse()?;
            let db = ns.secret_value(n, "dbname").await?;
            ensure!(
                by_port.get(&port).is_some_and(|d| d.contains(&db)),
                "{n}'s database is not on its server"
            );
        }
        eprintln!("crash test: {at_kill} of 50 were Ready at the kill");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn e_drift_is_repaired() {
    with_temp_ns("drift", |ns| async move {
        let pg = PgServer::start()?;
        ns.add_server(&ns.server_name("pg"), &pg, "").await?;
        let ctl = ns.start_controller(&[])?;
        ns.apply_ok(&[tenant_yaml("pw", "  {}"), tenant_yaml("gone", "  {}")].join("---\n")).await?;
        ns.wait_phase("pw", TenantPhase::Ready, READY_TIMEOUT).await?;
        ns.wait_phase("gone", TenantPhase::Ready, READY_TIMEOUT).await?;
        // A resync of converged tenants is settled by the server's shared catalog read, without
        // queries of their own (the same read must see the drift below).
        wait_for("a resync settled by the catalog read", READY_TIMEOUT, || async {
            let (_, metrics) = ctl.http_get("/metrics").await.ok()?;
            let settled = metric_sum(&metrics, "silo_drift_checks_total{by=\"catalog\"}");
            (settled >= 2.0).then_some(())
        })
        .await?;
        let admin = pg.admin_pool().await?;
        let pw_role = ns.secret_value("pw", "user").await?;
        let gone_role = ns.secret_value("gone", "user").await?;

        // By hand: a new password, PUBLIC CONNECT granted back, another connection limit,
        // and a role dropped (its database reassigned first, as PostgreSQL requires).
        sqlx::raw_sql(&format!(
            "ALTER ROLE \"{pw_role}\" PASSWORD 'changed-by-hand' CONNECTION LIMIT 99;
             GRANT CONNECT ON DATABASE \"{pw_role}\" TO PUBLIC;
             ALTER DATABASE \"{gone_role}\" OWNER TO silo_admin;
             DROP ROLE \"{gone_role}\";"
        ))
        .execute(&admin)
        .await?;
        ensure!(connect_as_tenant(&ns, "pw").await.is_err(), "the hand-set password should lock the Secret out");

        wait_for("password repaired", READY_TIMEOUT, || async { connect_as_tenant(&ns, "pw").await.ok() }).await?;
        wait_for("dropped role repaired", READY_TIMEOUT, || async { connect_as_tenant(&ns, "gone").await.ok() }).await?;
        let row = sqlx::query(
            "SELECT r.rolconnlimit,
                    EXISTS (SELECT 1 FROM pg_database d, aclexplode(d.datacl) a WHERE d.datname = $1 AND a.grantee = 0) AS public,
                    (SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $2) AS gone_owner
               FROM pg_roles r WHERE r.rolname = $1",
        )
        .bind(&pw_role)
        .bind(&gone_role)
        .fetch_one(&admin)
        .await?;
        wait_for("limit and grants repaired", READY_TIMEOUT, || async {
            let row = sqlx::query(
                "SELECT r.rolconnlimit = 20 AND NOT EXISTS (SELECT 1 FROM pg_database d, aclexplode(d.datacl) a
                         WHERE d.datname = $1 AND a.grantee = 0) FROM pg_roles r WHERE r.rolname = $1",
            )
            .bind(&pw_role)
            .fetch_one(&admin)
            .await
            .ok()?;
            row.get::<bool, _>(0).then_some(())
        })
        .await?;
        let gone_owner: String = row.get("gone_owner");
        ensure!(gone_owner == gone_role, "database of the dropped role is owned by {gone_owner}");
        let events = ns.kubectl(&["get", "events", "-n", &ns.name]).await?;
        ensure!(events.stdout.contains("DriftRepaired"), "{}", events.stdout);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn f_suspend_and_resume() {
    with_temp_ns("suspend", |ns| async move {
        let pg = PgServer::start()?;
        ns.add_server(&ns.server_name("pg"), &pg, "").await?;
        let _ctl = ns.start_controller(&[])?;
        ns.apply_ok(&tenant_yaml("sleepy", "  {}")).await?;
        ns.wait_phase("sleepy", TenantPhase::Ready, READY_TIMEOUT)
            .await?;
        let mut session = connect_as_tenant(&ns, "sleepy").await?;
        sqlx::raw_sql("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
            .execute(&mut session)
            .await?;

        ns.apply_ok(&tenant_yaml("sleepy", "  suspended: true"))
            .await?;
        let t = ns
            .wait_phase("sleepy", TenantPhase::Suspended, READY_TIMEOUT)
            .await?;
        let ready = ready_condition(&t)?;
        ensure!(ready.status == "False" && ready.reason == "Suspended");
        ensure!(
            sqlx::query("SELECT 1").execute(&mut session).await.is_err(),
            "open session survived suspension"
        );
        match connect_as_tenant(&ns, "sleepy").await {
            Ok(_) => anyhow::bail!("a suspended tenant could log in"),
            Err(e) => ensure!(e.to_string().contains("not permitted to log in"), "{e}"),
        }

        ns.apply_ok(&tenant_yaml("sleepy", "  suspended: false"))
            .await?;
        ns.wait_phase("sleepy", TenantPhase::Ready, READY_TIMEOUT)
            .await?;
        let mut conn = connect_as_tenant(&ns, "sleepy").await?;
        let x: i32 = sqlx::query_scalar("SELECT x FROM t")
            .fetch_one(&mut conn)
            .await?;
        ensure!(x == 42, "data survived suspension");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn g_delete_with_delete_and_with_retain() {
    with_temp_ns("delete", |ns| async move {
        let pg = PgServer::start()?;
        let server = ns.server_name("pg");
        ns.add_server(&server, &pg, "").await?;
        let _ctl = ns.start_controller(&[])?;
        ns.apply_ok(
            &[
                tenant_yaml("doomed", "  deletion: {policy: Delete}"),
                tenant_yaml("kept", "  deletion: {policy: Retain}"),
                tenant_yaml("default", "  {}"),
            ]
            .join("---\n"),
        )
        .await?;
        ns.wait_phase("doomed", TenantPhase::Ready, READY_TIMEOUT)
            .await?;
        let kept = ns
            .wait_phase("kept", TenantPhase::Ready, READY_TIMEOUT)
            .await?;
        let default = ns
            .wait_phase("default", TenantPhase::Ready, READY_TIMEOUT)
            .await?;
        ensure!(
            kept.spec.deletion.policy == silo_crds::DeletionPolicy::Retain
                && default.spec.deletion.policy == silo_crds::DeletionPolicy::Snapshot
                && default.spec.deletion.grace_period == "7d"
                && default.spec.deletion.final_backup_retention == "30d",
            "a new Tenant's default is Snapshot, 7d, 30d: {:?}",
            default.spec.deletion
        );
        let doomed_db = ns.secret_value("doomed", "dbname").await?;
        let kept_db = ns.secret_value("kept", "dbname").await?;
        let mut conn = connect_as_tenant(&ns, "kept").await?;
        sqlx::raw_sql("CREATE TABLE precious (v text); INSERT INTO precious VALUES ('keep me')")
            .execute(&mut conn)
            .await?;

        let out = ns
            .kubectl(&[
                "delete",
                "tenant",
                "doomed",
                "kept",
                "-n",
                &ns.name,
                "--wait=true",
                "--timeout=60s",
            ])
            .await?;
        ensure!(out.success, "{}", out.stderr);
        ensure!(
            ns.tenants().get_opt("doomed").await?.is_none()
                && ns.tenants().get_opt("kept").await?.is_none()
        );

        let admin = pg.admin_pool().await?;
        // Delete: database, role and Secret gone.
        ensure!(
            !pg.exists(Catalog::Database, &doomed_db).await?,
            "database of Delete tenant still exists"
        );
        ensure!(
            !pg.exists(Catalog::Role, &doomed_db).await?,
            "role of Delete tenant still exists"
        );
        // The Secret goes with its owner, the Tenant (garbage collection; the controller has
        // no right to delete Secrets).
        wait_for(
            "the Delete tenant's Secret to go",
            READY_TIMEOUT,
            || async {
                ns.secrets()
                    .get_opt("doomed-db")
                    .await
                    .ok()
                    .flatten()
                    .is_none()
                    .then_some(())
            },
        )
        .await?;

        // Retain: data kept, locked, visible as retained.
        ensure!(
            pg.exists(Catalog::Database, &kept_db).await?,
            "retained database was dropped"
        );
        let can_login: bool =
            sqlx::query_scalar("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1")
                .bind(&kept_db)
                .fetch_one(&admin)
                .await?;
        ensure!(!can_login, "retained role can still log in");
        let data_pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with(pg.options(silo_e2e::postgres::ADMIN_USER, &pg.admin_password, &kept_db))
            .await?;
        let v: String = sqlx::query_scalar("SELECT v FROM precious")
            .fetch_one(&data_pool)
            .await?;
        ensure!(v == "keep me");
        data_pool.close().await;
        let retained = wait_for(
            "server lists the retained database",
            READY_TIMEOUT,
            || async {
                let s = ns.servers().get(&server).await.ok()?;
                let st = s.status?;
                st.retained.contains(&kept_db).then_some(st.retained)
            },
        )
        .await?;
        ensure!(!retained.contains(&doomed_db));
        let secret = ns.secrets().get("kept-db").await?;
        ensure!(
            secret
                .metadata
                .labels
                .unwrap_or_default()
                .get("silo.dev/retained")
                .map(String::as_str)
                == Some("true")
        );

        // A database that merely has a tenant's name is never touched: the tenant fails to
        // provision (NameConflict), and deleting it with policy Delete leaves the database alone.
        let squatted = format!("t_{}_squatter", ns.name);
        sqlx::raw_sql(&format!("CREATE DATABASE \"{squatted}\""))
            .execute(&admin)
            .await?;
        ns.apply_ok(&tenant_yaml("squatter", "  deletion: {policy: Delete}"))
            .await?;
        let t = ns
            .wait_phase("squatter", TenantPhase::Failed, READY_TIMEOUT)
            .await?;
        let ready = ready_condition(&t)?;
        ensure!(
            ready.reason == "NameConflict",
            "{} {}",
            ready.reason,
            ready.message
        );
        let out = ns
            .kubectl(&[
                "delete",
                "tenant",
                "squatter",
                "-n",
                &ns.name,
                "--timeout=60s",
            ])
            .await?;
        ensure!(out.success, "{}", out.stderr);
        ensure!(
            pg.exists(Catalog::Database, &squatted).await?,
            "a foreign database was dropped"
        );

        // Applying the same Tenant again takes the retained database back, data included.
        ns.apply_ok(&tenant_yaml("kept", "  {}")).await?;
        ns.wait_phase("kept", TenantPhase::Ready, READY_TIMEOUT)
            .await?;
        let mut conn = connect_as_tenant(&ns, "kept").await?;
        let v: String = sqlx::query_scalar("SELECT v FROM precious")
            .fetch_one(&mut conn)
            .await?;
        ensure!(v == "keep me");
        Ok(())
    })
    .await;
}

/// A Tenant deleted while its DatabaseServer is gone keeps its finalizer, says why, and carries
/// out its policy once the server is back. The controller used to report ServerGone and then let
/// the finalizer go (a cleanup that returns Ok is done, for kube's finalizer helper), leaving the
/// database behind; a controller that had just started took the same path for any server not
/// listed yet.
#[tokio::test]
async fn g_deletion_waits_for_a_deleted_server() {
    with_temp_ns("gone", |ns| async move {
        let pg = PgServer::start()?;
        let server = ns.server_name("pg");
        ns.add_server(&server, &pg, "").await?;
        let mut ctl = ns.start_controller(&[])?;
        ns.apply_ok(&tenant_yaml("orphan", "  deletion: {policy: Delete}"))
            .await?;
        ns.wait_phase("orphan", TenantPhase::Ready, READY_TIMEOUT)
            .await?;
        let db = ns.secret_value("orphan", "dbname").await?;

        // A fresh controller, so that no pool to the server outlives the DatabaseServer.
        ctl.kill9();
        let out = ns.kubectl(&["delete", "databaseserver", &server]).await?;
        ensure!(out.success, "{}", out.stderr);
        let out = ns
            .kubectl(&["delete", "tenant", "orphan", "-n", &ns.name, "--wait=false"])
            .await?;
        ensure!(out.success, "{}", out.stderr);
        let ctl = ns.start_controller(&[])?;
        let ready = wait_for("the tenant to say ServerGone", READY_TIMEOUT, || async {
            match ns.tenants().get_opt("orphan").await.ok()? {
                None => Some(Err(anyhow::anyhow!(
                    "the Tenant went while its server was gone: its policy Delete was skipped"
                ))),
                Some(t) => {
                    let ready = ready_condition(&t).ok()?;
                    (ready.reason == "ServerGone").then_some(Ok(ready))
                }
            }
        })
        .await??;
        ensure!(
            ready.message.contains(&server) && ready.message.contains("finalizer"),
            "{}",
            ready.message
        );
        // Several reconciles later, still waiting (the retry is 30 s; a restart reconciles now).
        let mut ctl = ctl;
        ctl.kill9();
        let ctl = ns.start_controller(&[])?;
        wait_for(
            "the restarted controller to look again",
            READY_TIMEOUT,
            || async {
                ctl.log_text()
                    .contains("tenant deleted while its server is gone")
                    .then_some(())
            },
        )
        .await?;
        let t =
            ns.tenants().get_opt("orphan").await?.context(
                "the Tenant went while its server was gone: its policy Delete was skipped",
            )?;
        ensure!(
            t.metadata.finalizers.is_some_and(|f| !f.is_empty()),
            "the finalizer went while the server was gone"
        );
        ensure!(
            pg.exists(Catalog::Database, &db).await?,
            "database {db} went"
        );

        // The server is back: the policy is carried out.
        ns.add_server(&server, &pg, "").await?;
        wait_for("the tenant to go", READY_TIMEOUT, || async {
            ns.tenants()
                .get_opt("orphan")
                .await
                .ok()?
                .is_none()
                .then_some(())
        })
        .await?;
        ensure!(
            !pg.exists(Catalog::Database, &db).await?,
            "database {db} survived its Tenant's policy Delete"
        );
        Ok(())
    })
    .await;
}

/// A restart writes nothing for tenants that did not change: no status, no Event. Tenants
/// reconciled before the new process had connected to their server used to say so in status for
/// a moment (Ready, then "not connected", then Ready again).
#[tokio::test]
async fn i_a_restart_rewrites_nothing() {
    with_temp_ns("restart", |ns| async move {
        let pg = PgServer::start()?;
        ns.add_server(&ns.server_name("pg"), &pg, "").await?;
        let mut ctl = ns.start_controller(&[])?;
        let names: Vec<String> = (0..40).map(|i| format!("r{i}")).collect();
        let yaml: Vec<String> = names.iter().map(|n| tenant_yaml(n, "  {}")).collect();
        ns.apply_ok(&yaml.join("---\n")).await?;
        for name in &names {
            ns.wait_phase(name, TenantPhase::Ready, READY_TIMEOUT)
                .await?;
        }
        ctl.terminate()?;
        let versions = |tenants: Vec<silo_crds::Tenant>| -> HashMap<String, String> {
            tenants
                .into_iter()
                .map(|t| {
                    (
                        t.metadata.name.unwrap_or_default(),
                        t.metadata.resource_version.unwrap_or_default(),
                    )
                })
                .collect()
        };
        let before = versions(ns.tenants().list(&Default::default()).await?.items);
        let ctl = ns.start_controller(&[])?;
        // Until every tenant was reconciled by the new process, and one resync more.
        wait_for(
            "every tenant reconciled after the restart",
            READY_TIMEOUT,
            || async {
                let (_, metrics) = ctl.http_get("/metrics").await.ok()?;
                let done = metric_sum(&metrics, "silo_reconciles_total{kind=\"tenant\"");
                (done >= 2.0 * names.len() as f64).then_some(())
            },
        )
        .await?;
        let after = versions(ns.tenants().list(&Default::default()).await?.items);
        let changed: Vec<&String> = names
            .iter()
            .filter(|n| before.get(*n) != after.get(*n))
            .collect();
        ensure!(
            changed.is_empty(),
            "the restart rewrote {} of {} tenants: {changed:?}",
            changed.len(),
            names.len()
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn h_leader_failover() {
    with_temp_ns("leader", |ns| async move {
        let pg = PgServer::start()?;
        ns.add_server(&ns.server_name("pg"), &pg, "").await?;
        let mut a = ns.start_elected_controller("replica-a")?;
        let mut b = ns.start_elected_controller("replica-b")?;
        ns.apply_ok(&tenant_yaml("first", "  {}")).await?;
        ns.wait_phase("first", TenantPhase::Ready, READY_TIMEOUT)
            .await?;

        let leader_is_a = wait_for("one leader", Duration::from_secs(30), || async {
            match (
                a.log_text().contains("leading"),
                b.log_text().contains("leading"),
            ) {
                (true, false) => Some(true),
                (false, true) => Some(false),
                _ => None,
            }
        })
        .await?;
        let (leader, standby) = if leader_is_a {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        ensure!(
            standby.http_get("/readyz").await?.0 == 200,
            "a standby is ready (it serves as a hot spare)"
        );
        leader.kill9();
        let killed = Instant::now();
        ns.apply_ok(&tenant_yaml("second", "  {}")).await?;
        wait_for("standby takes over", Duration::from_secs(30), || async {
            standby.log_text().contains("leading").then_some(())
        })
        .await?;
        let takeover = killed.elapsed();
        ns.wait_phase("second", TenantPhase::Ready, READY_TIMEOUT)
            .await?;
        // Lease duration is 6 s in tests; the standby retries within the same span.
        ensure!(
            takeover < Duration::from_secs(12),
            "takeover took {takeover:?}"
        );
        eprintln!("leader failover: standby led {takeover:?} after the kill");
        Ok(())
    })
    .await;
}
