//! The router against the real control plane: tenants applied with kubectl become routable within
//! a second of Ready, suspension and deletion refuse, and credentials reach only their own tenant.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use kube::api::{Patch, PatchParams};
use silo_crds::TenantPhase;
use silo_e2e::kube_env::with_temp_ns;
use silo_e2e::{PgServer, RouterProcess, TestNs, tenant_yaml, wait_for};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Connects through the router with `who`'s credentials, naming tenant `tenant`.
async fn via_router(
    ns: &TestNs,
    router: &RouterProcess,
    who: &str,
    tenant: &str,
) -> anyhow::Result<PgConnection> {
    let [user, password] = ns.secret_values(who, ["user", "password"]).await?;
    connect(router, &user, &password, &format!("{}.{tenant}", ns.name)).await
}

/// Connects through the router as `user`, naming tenant `tenant` (`namespace.name`).
async fn connect(
    router: &RouterProcess,
    user: &str,
    password: &str,
    tenant: &str,
) -> anyhow::Result<PgConnection> {
    let options = PgConnectOptions::new()
        .host("127.0.0.1")
        .port(router.port)
        .username(user)
        .password(password)
        .database(tenant);
    Ok(PgConnection::connect_with(&options).await?)
}

async fn current_database(conn: &mut PgConnection) -> anyhow::Result<String> {
    Ok(sqlx::query_scalar("SELECT current_database()")
        .fetch_one(conn)
        .await?)
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

        // Deleted: refused, even with the tenant's own credentials (read before the Secret goes
        // with its Tenant): 57P03 while it is being deleted, then the 28P01 every unknown name gets.
        let [user, password] = ns.secret_values("r4", ["user", "password"]).await?;
        let own = PgConnectOptions::new()
            .host("127.0.0.1")
            .port(router.port)
            .username(&user)
            .password(&password)
            .database(&format!("{}.r4", ns.name));
        let out = ns
            .kubectl(&["delete", "tenant", "r4", "-n", &ns.name, "--wait=false"])
            .await?;
        ensure!(out.success, "{}", out.stderr);
        let refusal = wait_for("deletion refused", Duration::from_secs(5), || async {
            match PgConnection::connect_with(&own)
                .await
                .map_err(anyhow::Error::from)
            {
                Err(e) if code(&e) == "57P03" || code(&e) == "28P01" => Some(e.to_string()),
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

/// A listener on loopback that counts the connections it is offered and closes them at once.
struct Decoy {
    port: u16,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Decoy {
    async fn bind() -> anyhow::Result<Decoy> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Ok(Decoy {
            port,
            connections,
            task,
        })
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Decoy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Anyone who may edit Secrets in a tenant's namespace may edit its credentials Secret. Pointing
/// its host, port, dbname and user elsewhere must not move where the router connects: that comes
/// from the DatabaseServer and the Tenant's status, and the Secret gives the password only.
#[tokio::test]
async fn router_ignores_where_a_tenant_secret_points() {
    with_temp_ns("router-steer", |ns| async move {
        let pg = PgServer::start()?;
        ns.add_server(&ns.server_name("pg"), &pg, "").await?;
        // Session mode: a client holds its own server connection, so the login after the
        // tampering below needs a new one, opened wherever the router now believes the tenant is.
        let router = RouterProcess::start(&ns, "session")?;
        let mut ctl = ns.start_controller(&[])?;
        ns.apply_ok(&tenant_yaml("steer", "  routing: {hosts: [steer.test]}"))
            .await?;
        let tenant = ns
            .wait_phase("steer", TenantPhase::Ready, READY_TIMEOUT)
            .await?;
        let database = tenant
            .status
            .and_then(|s| s.database)
            .context("a Ready tenant has status.database")?;
        let [user, password] = ns.secret_values("steer", ["user", "password"]).await?;
        let name = format!("{}.steer", ns.name);
        let mut held = wait_for("routable", Duration::from_secs(5), || async {
            connect(&router, &user, &password, &name).await.ok()
        })
        .await?;
        ensure!(current_database(&mut held).await? == database);

        // The controller repairs a drifted Secret on its next resync; stopped, it leaves the
        // tampered one in place for as long as the test needs.
        ctl.kill9();
        let decoy = Decoy::bind().await?;
        let tampered = serde_json::json!({ "stringData": {
            "host": "127.0.0.1",
            "port": decoy.port.to_string(),
            "dbname": "postgres",
            "user": "postgres",
        }});
        ns.secrets()
            .patch(
                "steer-db",
                &PatchParams::default(),
                &Patch::Merge(&tampered),
            )
            .await?;
        ensure!(
            ns.secret_value("steer", "port").await? == decoy.port.to_string(),
            "the Secret was not patched"
        );
        // A change made after the Secret's, which the router shows: once it is seen, the
        // Secret's change has reached the router too (separate watches, hence the extra second).
        let moved = serde_json::json!({ "spec": { "routing": { "hosts": ["steer-moved.test"] } } });
        ns.tenants()
            .patch("steer", &PatchParams::default(), &Patch::Merge(&moved))
            .await?;
        let resolved = wait_for(
            "the router to see the changes",
            Duration::from_secs(10),
            || async {
                match router.http_get("/v1/resolve?host=steer-moved.test").await {
                    Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body).ok(),
                    _ => None,
                }
            },
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        ensure!(
            resolved["server"] == format!("{}:{}", pg.host, pg.port).as_str()
                && resolved["database"] == database.as_str(),
            "the HTTP API follows the Secret: {resolved}"
        );

        let login = tokio::time::timeout(
            Duration::from_secs(15),
            connect(&router, &user, &password, &name),
        )
        .await;
        ensure!(
            decoy.connections() == 0,
            "the router connected to the host and port written into the tenant's Secret"
        );
        let mut conn = login
            .context("login timed out")?
            .context("login after the Secret was tampered with")?;
        let reached = current_database(&mut conn).await?;
        ensure!(reached == database, "routed to {reached}, not {database}");
        ensure!(
            current_database(&mut held).await? == database,
            "the session open before the change"
        );
        Ok(())
    })
    .await;
}

/// With `--namespaces`, the router reads Tenants and Secrets only in those namespaces: it routes
/// their tenants, does not know the tenants of other namespaces, and runs as an identity that has
/// no right on Secrets anywhere else.
#[tokio::test]
async fn router_limited_to_namespaces_routes_only_theirs() {
    with_temp_ns("router-nsa", |ns| async move {
        let other = format!("{}-other", ns.name);
        let limited = format!("{}-router", ns.name);
        let result = limited_router_scenario(&ns, &other, &limited).await;
        for args in [
            ["delete", "namespace", other.as_str(), "--wait=false"],
            [
                "delete",
                "clusterrole",
                limited.as_str(),
                "--ignore-not-found",
            ],
            [
                "delete",
                "clusterrolebinding",
                limited.as_str(),
                "--ignore-not-found",
            ],
        ] {
            let _ = ns.kubectl(&args).await;
        }
        result
    })
    .await;
}

/// `router_limited_to_namespaces_routes_only_theirs`, with a second namespace `other` and a
/// ServiceAccount, ClusterRole and ClusterRoleBinding named `limited`, which the caller deletes.
async fn limited_router_scenario(ns: &TestNs, other: &str, limited: &str) -> anyhow::Result<()> {
    let pg = PgServer::start()?;
    ns.add_server(&ns.server_name("pg"), &pg, "").await?;
    let _ctl = ns.start_controller(&[])?;
    ns.apply_ok(&tenant_yaml("mine", "  {}")).await?;
    ns.wait_phase("mine", TenantPhase::Ready, READY_TIMEOUT)
        .await?;
    // A tenant elsewhere; no controller serves that namespace, so it stays without status.
    let out = ns.kubectl(&["create", "namespace", other]).await?;
    ensure!(out.success, "{}", out.stderr);
    let out = ns
        .kubectl_stdin(
            &["apply", "-n", other, "-f", "-"],
            Some(&tenant_yaml("theirs", "  {}")),
        )
        .await?;
    ensure!(out.success, "{}", out.stderr);

    // What the chart grants a router limited to namespaces: Tenants and Secrets through a Role
    // in each, DatabaseServers cluster-wide.
    let ns_name = &ns.name;
    ns.apply_ok(&format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: {limited}, namespace: {ns_name}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: {limited}, namespace: {ns_name}}}
rules:
  - {{apiGroups: [silo.dev], resources: [tenants], verbs: [list, watch]}}
  - {{apiGroups: [""], resources: [secrets], verbs: [list, watch]}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: {limited}, namespace: {ns_name}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {limited}}}
subjects: [{{kind: ServiceAccount, name: {limited}, namespace: {ns_name}}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: {limited}}}
rules:
  - {{apiGroups: [silo.dev], resources: [databaseservers], verbs: [list, watch]}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: {limited}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {limited}}}
subjects: [{{kind: ServiceAccount, name: {limited}, namespace: {ns_name}}}]
"#
    ))
    .await?;
    let kubeconfig = kubeconfig_for(ns, limited).await?;
    let account = format!("system:serviceaccount:{ns_name}:{limited}");
    // The identity is as narrow as meant, so a router that reads Secrets elsewhere fails to start.
    for (scope, allowed) in [
        (vec!["-n", ns_name], "yes"),
        (vec!["-n", other], "no"),
        (vec!["--all-namespaces"], "no"),
    ] {
        let mut args = vec!["auth", "can-i", "list", "secrets", "--as", &account];
        args.extend(scope);
        let out = ns.kubectl(&args).await?;
        ensure!(
            out.stdout.trim() == allowed,
            "kubectl {}: {}{}",
            args.join(" "),
            out.stdout,
            out.stderr
        );
    }

    let router =
        RouterProcess::start_with(ns, "transaction", &kubeconfig, &["--namespaces", ns_name])?;
    let mut conn = wait_for("routable", Duration::from_secs(5), || async {
        via_router(ns, &router, "mine", "mine").await.ok()
    })
    .await?;
    ensure!(current_database(&mut conn).await? == ns.secret_value("mine", "dbname").await?);
    // It knows no tenant of another namespace; a router serving every namespace does know
    // `theirs`, so the absence comes from the limit.
    let theirs = format!("{other}.theirs");
    ensure!(
        !known_tenants(&router).await?.contains(&theirs),
        "a tenant outside --namespaces is known"
    );
    let everywhere = RouterProcess::start(ns, "transaction")?;
    ensure!(
        known_tenants(&everywhere).await?.contains(&theirs),
        "{theirs} is unknown even to a router serving every namespace"
    );
    Ok(())
}

/// The tenants (`namespace.name`) in the router's table, from `/v1/tenants`.
async fn known_tenants(router: &RouterProcess) -> anyhow::Result<Vec<String>> {
    let (status, body) = router.http_get("/v1/tenants").await?;
    ensure!(status == 200, "/v1/tenants: {status} {body}");
    let list: serde_json::Value = serde_json::from_str(&body)?;
    Ok(list["tenants"]
        .as_array()
        .context("/v1/tenants lists tenants")?
        .iter()
        .filter_map(|t| t["tenant"].as_str().map(str::to_string))
        .collect())
}

/// A kubeconfig for ServiceAccount `account` of the test namespace: the router's kubeconfig with
/// that account's token.
async fn kubeconfig_for(ns: &TestNs, account: &str) -> anyhow::Result<std::path::PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let out = ns
        .kubectl(&[
            "create",
            "token",
            account,
            "-n",
            &ns.name,
            "--duration",
            "1h",
        ])
        .await?;
    ensure!(out.success, "{}", out.stderr);
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&ns.env.router_kubeconfig)?)?;
    let users = config["users"]
        .as_sequence_mut()
        .context("a kubeconfig with users")?;
    for user in users {
        user["user"] = serde_yaml::to_value(
            [("token", out.stdout.trim())]
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>(),
        )?;
    }
    let dir = std::env::var_os("SILO_E2E_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("{}-{account}.kubeconfig", ns.name));
    // It holds a token: readable by this user only.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    file.write_all(serde_yaml::to_string(&config)?.as_bytes())?;
    Ok(path)
}

/// Logins made by a client loop: one new connection every 50 ms with whatever the Secret says
/// at that moment, directly or through the router; every failure is kept.
struct LoginLoop {
    attempts: Arc<AtomicUsize>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl LoginLoop {
    fn start(ns: &TestNs, tenant: &str, router_port: Option<u16>) -> LoginLoop {
        let attempts = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let started = Instant::now();
        let (ns, tenant) = (ns.clone(), tenant.to_string());
        let task = tokio::spawn({
            let (attempts, failures, stop) = (attempts.clone(), failures.clone(), stop.clone());
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let login = async {
                        let [host, port, dbname, user, password] = ns
                            .secret_values(&tenant, ["host", "port", "dbname", "user", "password"])
                            .await?;
                        let options = match router_port {
                            Some(port) => PgConnectOptions::new()
                                .host("127.0.0.1")
                                .port(port)
                                .database(&format!("{}.{tenant}", ns.name)),
                            None => PgConnectOptions::new()
                                .host(&host)
                                .port(port.parse()?)
                                .database(&dbname),
                        };
                        let options = options.username(&user).password(&password);
                        let mut conn = PgConnection::connect_with(&options).await?;
                        sqlx::query("SELECT 1").execute(&mut conn).await?;
                        conn.close().await?;
                        anyhow::Ok(())
                    };
                    attempts.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = login.await {
                        let at = started.elapsed();
                        failures
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(format!("after {at:?}: {e:#}"));
                    }
                }
            }
        });
        LoginLoop {
            attempts,
            failures,
            stop,
            task,
        }
    }

    /// Stops the loop: (attempts, failures).
    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let failures = self
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        (self.attempts.load(Ordering::Relaxed), failures)
    }
}

/// Asks for one rotation and waits until it is over: the Secret names another login, and once
/// the overlap has ended the status shows no previous login. Returns the credentials before.
async fn rotate(ns: &TestNs, tenant: &str, request: &str) -> anyhow::Result<[String; 2]> {
    let before = ns.secret_values(tenant, ["user", "password"]).await?;
    let out = ns
        .kubectl(&[
            "annotate",
            "--overwrite",
            "-n",
            &ns.name,
            "tenant",
            tenant,
            &format!("silo.dev/rotate={request}"),
        ])
        .await?;
    ensure!(out.success, "{}", out.stderr);
    wait_for(
        "the Secret to name the next login",
        READY_TIMEOUT,
        || async {
            let [user] = ns.secret_values(tenant, ["user"]).await.ok()?;
            (user != before[0]).then_some(())
        },
    )
    .await?;
    Ok(before)
}

/// The overlap of the rotation to `login` ends: the status shows that login and no previous one.
async fn overlap_ends(
    ns: &TestNs,
    tenant: &str,
    login: &str,
) -> anyhow::Result<silo_crds::CredentialsStatus> {
    wait_for("the overlap to end", READY_TIMEOUT, || async {
        let t = ns.tenants().get_opt(tenant).await.ok()??;
        let credentials = t.status?.credentials?;
        (credentials.login.as_deref() == Some(login) && credentials.previous_login.is_none())
            .then_some(credentials)
    })
    .await
}

/// Password rotation under load: a client loop opening a connection every 50 ms with whatever the
/// Secret says, directly and through the router, sees no failed login through two rotations
/// (the first converts the tenant: its owner role stops logging in); sessions opened before keep
/// running; after the overlap the old password fails, directly and through the router; tables
/// made with the new login belong to the same role as before.
#[tokio::test]
async fn passwords_rotate_under_load_with_no_failed_login() {
    with_temp_ns("rotation", |ns| async move {
        let pg = PgServer::start()?;
        ns.add_server(&ns.server_name("pg"), &pg, "").await?;
        let admin = pg.admin_pool().await?;
        let router = RouterProcess::start(&ns, "transaction")?;
        let address = format!("127.0.0.1:{}", router.port);
        let _ctl = ns.start_controller(&["--router-address", &address])?;
        ns.apply_ok(&tenant_yaml(
            "rot",
            "  credentials: {rotateEvery: 1h, overlap: 15s}\n  deletion: {policy: Delete}",
        ))
        .await?;
        let ready = ns
            .wait_phase("rot", TenantPhase::Ready, READY_TIMEOUT)
            .await?;
        let owner = ready.status.and_then(|s| s.role).context("status.role")?;
        let tenant_name = format!("{}.rot", ns.name);
        let [host, port, dbname] = ns.secret_values("rot", ["host", "port", "dbname"]).await?;
        let direct = |user: &str, password: &str| {
            PgConnectOptions::new()
                .host(&host)
                .port(port.parse().unwrap_or_default())
                .database(&dbname)
                .username(user)
                .password(password)
        };
        let owner_of = |table: &'static str| {
            let admin = admin.clone();
            let dbname = dbname.clone();
            async move {
                let mut conn = PgConnection::connect_with(
                    &admin.connect_options().as_ref().clone().database(&dbname),
                )
                .await?;
                let owner: String = sqlx::query_scalar(
                    "SELECT tableowner::text FROM pg_tables WHERE tablename = $1",
                )
                .bind(table)
                .fetch_one(&mut conn)
                .await?;
                anyhow::Ok(owner)
            }
        };

        let [user0, password0] = ns.secret_values("rot", ["user", "password"]).await?;
        ensure!(
            user0 == owner,
            "a new tenant logs in as its owner role, not {user0}"
        );
        let mut setup = PgConnection::connect_with(&direct(&user0, &password0)).await?;
        sqlx::query("CREATE TABLE before_rotation (id int)")
            .execute(&mut setup)
            .await?;
        let mut long_direct = setup;
        let mut long_router = wait_for("routable", Duration::from_secs(5), || async {
            connect(&router, &user0, &password0, &tenant_name)
                .await
                .ok()
        })
        .await?;

        let loops = [
            LoginLoop::start(&ns, "rot", None),
            LoginLoop::start(&ns, "rot", Some(router.port)),
        ];
        tokio::time::sleep(Duration::from_secs(1)).await;

        // The first rotation converts the tenant: login `_a`, the owner keeps its objects.
        let [old_user, old_password] = rotate(&ns, "rot", "1").await?;
        let [user1, password1] = ns.secret_values("rot", ["user", "password"]).await?;
        ensure!(user1 == format!("{owner}_a"), "the first login is {user1}");
        // Both work during the overlap, directly and through the router.
        PgConnection::connect_with(&direct(&old_user, &old_password)).await?;
        connect(&router, &old_user, &old_password, &tenant_name).await?;
        PgConnection::connect_with(&direct(&user1, &password1)).await?;
        let credentials = overlap_ends(&ns, "rot", &user1).await?;
        // The next scheduled one is an hour after this one.
        let seconds = |t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
            t.as_ref().map(|t| t.0.as_second())
        };
        let scheduled = seconds(&credentials.rotated_at).map(|at| at + 3600);
        ensure!(
            scheduled.is_some() && seconds(&credentials.next_rotation) == scheduled,
            "{credentials:?}"
        );
        ensure!(
            credentials.login.as_deref() == Some(user1.as_str()),
            "{credentials:?}"
        );

        // The old password fails now; the sessions opened with it go on.
        let refused = PgConnection::connect_with(&direct(&old_user, &old_password)).await;
        ensure!(
            refused.is_err(),
            "the owner role still logs in after the overlap"
        );
        // The router within a moment (its watch of the Secret).
        let refused = wait_for(
            "the router to refuse the old password",
            Duration::from_secs(5),
            || async {
                connect(&router, &old_user, &old_password, &tenant_name)
                    .await
                    .err()
            },
        )
        .await?;
        ensure!(code(&refused) == "28P01", "{refused}");
        for conn in [&mut long_direct, &mut long_router] {
            let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut *conn).await?;
            ensure!(one == 1);
        }
        let can_login: bool =
            sqlx::query_scalar("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1")
                .bind(&owner)
                .fetch_one(&admin)
                .await?;
        ensure!(!can_login, "the owner role logs in after its conversion");

        // A migration after the rotation, with the new login: its table is the owner's.
        let mut migration = PgConnection::connect_with(&direct(&user1, &password1)).await?;
        sqlx::query("CREATE TABLE after_rotation (id int)")
            .execute(&mut migration)
            .await?;
        let (before, after) = (
            owner_of("before_rotation").await?,
            owner_of("after_rotation").await?,
        );
        ensure!(
            before == owner && after == owner,
            "tables owned by {before} and {after}, not both by {owner}"
        );

        // The second rotation moves to `_b`; `_a` stops after its overlap.
        rotate(&ns, "rot", "2").await?;
        let [user2] = ns.secret_values("rot", ["user"]).await?;
        ensure!(user2 == format!("{owner}_b"), "the second login is {user2}");
        overlap_ends(&ns, "rot", &user2).await?;
        let refused = PgConnection::connect_with(&direct(&user1, &password1)).await;
        ensure!(
            refused.is_err(),
            "{user1} still logs in after the second overlap"
        );
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&mut migration)
            .await?;
        ensure!(one == 1, "a session of the retired login ended");

        for (name, login_loop) in ["direct", "router"].into_iter().zip(loops) {
            let (attempts, failures) = login_loop.finish().await;
            eprintln!(
                "rotation: {name} loop: {attempts} logins, {} failed",
                failures.len()
            );
            ensure!(attempts > 200, "{name}: only {attempts} logins");
            ensure!(failures.is_empty(), "{name}: failed logins: {failures:#?}");
        }
        let out = ns
            .kubectl(&[
                "get",
                "events",
                "-n",
                &ns.name,
                "-o",
                "name",
                "--field-selector",
                "reason=CredentialsRotated",
            ])
            .await?;
        ensure!(
            out.stdout.lines().count() >= 1,
            "no CredentialsRotated Event: {}",
            out.stdout
        );
        anyhow::Ok(())
    })
    .await;
}
