//! The router against real PostgreSQL: psql, tokio-postgres and sqlx through it, in session and
//! transaction mode; refusals with the right SQLSTATE; live reload; cancel; half-open clients.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use silo_e2e::PgServer;
use silo_e2e::postgres::free_port;

/// Two tenants on one real server, and a router process in front of them.
struct Setup {
    pg: PgServer,
    port: u16,
    http: u16,
    file: std::path::PathBuf,
    router: Child,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.router.kill();
        let _ = self.router.wait();
        let _ = std::fs::remove_file(&self.file);
        if std::env::var_os("SILO_KEEP_ROUTER_LOG").is_none() {
            let _ = std::fs::remove_file(
                std::env::temp_dir().join(format!("silo-router-{}.log", self.port)),
            );
        }
    }
}

fn tenants_yaml(pg: &PgServer, beta_state: &str) -> String {
    format!(
        "tenants:\n\
         - {{name: acme, host: 127.0.0.1, port: {p}, database: t_acme, user: t_acme, password: pw-acme, connectionLimit: 4, hosts: [acme.example.com]}}\n\
         - {{name: beta, host: 127.0.0.1, port: {p}, database: t_beta, user: t_beta, password: pw-beta, state: {beta_state}}}\n",
        p = pg.port
    )
}

async fn setup(mode: &str) -> anyhow::Result<Setup> {
    setup_with(mode, &[]).await
}

async fn setup_with(mode: &str, extra: &[&str]) -> anyhow::Result<Setup> {
    let pg = PgServer::start()?;
    let admin = pg.admin_pool().await?;
    for (name, password) in [("t_acme", "pw-acme"), ("t_beta", "pw-beta")] {
        sqlx::raw_sql(&format!("CREATE ROLE {name} LOGIN PASSWORD '{password}'"))
            .execute(&admin)
            .await?;
        sqlx::raw_sql(&format!("CREATE DATABASE {name} OWNER {name}"))
            .execute(&admin)
            .await?;
        sqlx::raw_sql(&format!("REVOKE ALL ON DATABASE {name} FROM PUBLIC"))
            .execute(&admin)
            .await?;
    }
    let port = free_port()?;
    let http = free_port()?;
    let file = std::env::temp_dir().join(format!("silo-router-{port}.yaml"));
    std::fs::write(&file, tenants_yaml(&pg, "Ready"))?;
    let log = std::fs::File::create(std::env::temp_dir().join(format!("silo-router-{port}.log")))?;
    let router = Command::new(env!("CARGO_BIN_EXE_silo-router"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--pool-mode",
            mode,
        ])
        // Generous, so that logins on a loaded machine do not time out; the test of the
        // timeout itself sets its own.
        .args(if extra.contains(&"--startup-timeout") {
            &[][..]
        } else {
            &["--startup-timeout", "10"][..]
        })
        .arg("--config")
        .arg(&file)
        .args([
            "--checkout-timeout",
            "1",
            "--http-addr",
            &format!("127.0.0.1:{http}"),
        ])
        .args(extra)
        .args(["--log-filter", "debug"])
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(Instant::now() < deadline, "router did not start listening");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Setup {
        pg,
        port,
        http,
        file,
        router,
    })
}

fn dsn(port: u16, user: &str, password: &str, tenant: &str) -> String {
    format!("host=127.0.0.1 port={port} user={user} password={password} dbname={tenant}")
}

async fn pg_connect(dsn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no SQLSTATE: {e}"))
}

async fn exercise_tokio_postgres(port: u16) -> anyhow::Result<()> {
    let client = pg_connect(&dsn(port, "t_acme", "pw-acme", "acme")).await?;
    let db: String = client
        .query_one("SELECT current_database()", &[])
        .await?
        .get(0);
    ensure!(db == "t_acme", "routed to {db}");
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS items (id int, name text); TRUNCATE items")
        .await?;
    for i in 0..20 {
        client
            .execute(
                "INSERT INTO items VALUES ($1, $2)",
                &[&i, &format!("item {i}")],
            )
            .await?;
    }
    let n: i64 = client
        .query_one("SELECT count(*) FROM items WHERE id >= $1", &[&0i32])
        .await?
        .get(0);
    ensure!(n == 20);
    // A large result is streamed through.
    let rows = client
        .query(
            "SELECT g, repeat('x', 1000) FROM generate_series(1, 20000) g",
            &[],
        )
        .await?;
    ensure!(rows.len() == 20000);
    // Errors pass through, and the session goes on.
    let err = client
        .batch_execute("SELECT * FROM no_such_table")
        .await
        .err()
        .context("expected an error")?;
    ensure!(sqlstate(&err) == "42P01");
    let one: i32 = client.query_one("SELECT 1", &[]).await?.get(0);
    ensure!(one == 1);
    Ok(())
}

#[tokio::test]
async fn session_mode_serves_psql_tokio_postgres_and_sqlx() -> anyhow::Result<()> {
    let s = setup("session").await?;
    exercise_tokio_postgres(s.port).await?;

    // sqlx, which prepares named statements.
    let url = format!("postgres://t_acme:pw-acme@127.0.0.1:{}/acme", s.port);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await?;
    for i in 0..5 {
        let v: i32 = sqlx::query_scalar("SELECT $1::int + 1")
            .bind(i)
            .fetch_one(&pool)
            .await?;
        ensure!(v == i + 1);
    }
    pool.close().await;

    // psql, with the URI form the README shows.
    let out = Command::new("psql")
        .arg(format!(
            "postgres://t_beta:pw-beta@127.0.0.1:{}/beta",
            s.port
        ))
        .args(["-XAtc", "SELECT current_user || '@' || current_database()"])
        .output()?;
    ensure!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(String::from_utf8_lossy(&out.stdout).trim() == "t_beta@t_beta");
    Ok(())
}

#[tokio::test]
async fn transaction_mode_shares_server_connections() -> anyhow::Result<()> {
    let s = setup("transaction").await?;
    exercise_tokio_postgres(s.port)
        .await
        .context("tokio-postgres through the router")?;
    // 12 clients on a tenant capped at 4 server connections, each running transactions.
    let mut tasks = Vec::new();
    for c in 0..12 {
        let dsn = dsn(s.port, "t_acme", "pw-acme", "acme");
        tasks.push(tokio::spawn(async move {
            let client = pg_connect(&dsn).await?;
            for _ in 0..10 {
                client
                    .batch_execute(&format!(
                        "BEGIN; INSERT INTO items VALUES ({c}, 'tx'); COMMIT"
                    ))
                    .await?;
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    for t in tasks {
        t.await?
            .context("one of 12 clients sharing 4 server connections")?;
    }
    let admin = s.pg.admin_pool().await?;
    let backends: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE usename = 't_acme'")
            .fetch_one(&admin)
            .await?;
    ensure!(
        backends <= 4,
        "{backends} server connections for a cap of 4"
    );
    Ok(())
}

#[tokio::test]
async fn refusals_carry_the_right_sqlstate() -> anyhow::Result<()> {
    let s = setup("transaction").await?;
    let cases = [
        (dsn(s.port, "t_acme", "wrong", "acme"), "28P01"),
        (dsn(s.port, "t_acme", "pw-acme", "beta"), "28P01"), // acme's password naming beta
        // No password opens an unknown name, and the router does not say it is unknown.
        (dsn(s.port, "t_acme", "pw-acme", "nosuch"), "28P01"),
    ];
    for (dsn, code) in cases {
        let err = pg_connect(&dsn).await.err().context("expected a refusal")?;
        ensure!(
            sqlstate(&err) == code,
            "{dsn}: got {} ({err})",
            sqlstate(&err)
        );
    }
    // `user.tenant` names the tenant too.
    let client = pg_connect(&format!(
        "host=127.0.0.1 port={} user=t_beta.beta password=pw-beta",
        s.port
    ))
    .await?;
    let db: String = client
        .query_one("SELECT current_database()", &[])
        .await?
        .get(0);
    ensure!(db == "t_beta");

    // Suspending in the file refuses new logins within a second or so, and ends open sessions.
    let open = pg_connect(&dsn(s.port, "t_beta", "pw-beta", "beta")).await?;
    open.batch_execute("SELECT 1").await?;
    std::fs::write(&s.file, tenants_yaml(&s.pg, "Suspended"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match pg_connect(&dsn(s.port, "t_beta", "pw-beta", "beta")).await {
            Err(e) if sqlstate(&e) == "57P03" => {
                ensure!(
                    e.to_string().contains("suspended") || format!("{e:?}").contains("suspended")
                );
                break;
            }
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => anyhow::bail!("still admitted after the reload: {:?}", other.err()),
        }
    }
    let ended = open
        .batch_execute("SELECT 1")
        .await
        .err()
        .context("the open session should have ended")?;
    ensure!(sqlstate(&ended) == "57P01" || ended.is_closed(), "{ended}");
    Ok(())
}

#[tokio::test]
async fn cancel_reaches_the_running_query() -> anyhow::Result<()> {
    let s = setup("transaction").await?;
    let client = pg_connect(&dsn(s.port, "t_acme", "pw-acme", "acme")).await?;
    let token = client.cancel_token();
    let started = Instant::now();
    let sleeper = tokio::spawn(async move { client.batch_execute("SELECT pg_sleep(20)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(tokio_postgres::NoTls).await?;
    let result = sleeper.await?;
    let err = result
        .err()
        .context("the query should have been cancelled")?;
    ensure!(sqlstate(&err) == "57014", "{err}");
    ensure!(started.elapsed() < Duration::from_secs(10));
    Ok(())
}

#[tokio::test]
async fn half_open_connections_do_not_stop_other_clients() -> anyhow::Result<()> {
    let s = setup_with("transaction", &["--startup-timeout", "2"]).await?;
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(tokio::net::TcpStream::connect(("127.0.0.1", s.port)).await?);
    }
    let started = Instant::now();
    let client = pg_connect(&dsn(s.port, "t_acme", "pw-acme", "acme")).await?;
    let one: i32 = client.query_one("SELECT 1", &[]).await?.get(0);
    ensure!(one == 1 && started.elapsed() < Duration::from_secs(2));
    // The oldest made room for newer ones (at most 256 log in at once)...
    let reply = reply_of(&mut idle[0]).await?;
    ensure!(
        reply.contains("53300") && reply.contains("too many connections logging in"),
        "the oldest half-open client got {reply:?}"
    );
    // ...and the startup timeout (2 s here) closes the rest.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let reply = reply_of(&mut idle[999]).await?;
    ensure!(
        reply.contains("08P01") && reply.contains("startup took too long"),
        "the newest half-open client got {reply:?}"
    );
    Ok(())
}

#[tokio::test]
async fn prepared_statements_survive_server_switches_in_transaction_mode() -> anyhow::Result<()> {
    let s = setup("transaction").await?;
    // 8 clients over 4 server connections: statements prepared on one server are used on others.
    let mut tasks = Vec::new();
    for c in 0..8i32 {
        let dsn = dsn(s.port, "t_acme", "pw-acme", "acme");
        tasks.push(tokio::spawn(async move {
            let client = pg_connect(&dsn).await?;
            let add = client.prepare("SELECT $1::int + $2::int").await?;
            for i in 0..30i32 {
                let sum: i32 = client.query_one(&add, &[&c, &i]).await?.get(0);
                assert_eq!(sum, c + i);
                // tokio-postgres prepares (and later closes) a named statement for each of these too.
                let echoed: String = client
                    .query_one("SELECT $1::text", &[&format!("{c}-{i}")])
                    .await?
                    .get(0);
                assert_eq!(echoed, format!("{c}-{i}"));
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    // sqlx caches named statements per connection.
    let url = format!("postgres://t_acme:pw-acme@127.0.0.1:{}/acme", s.port);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await?;
    let mut tasks = Vec::new();
    for i in 0..64i64 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let v: i64 = sqlx::query_scalar("SELECT $1::bigint * 2")
                .bind(i)
                .fetch_one(&pool)
                .await?;
            Ok::<_, sqlx::Error>(v == i * 2)
        }));
    }
    for t in tasks {
        ensure!(t.await??, "wrong result through a re-prepared statement");
    }
    pool.close().await;
    Ok(())
}

#[tokio::test]
async fn http_api_resolves_and_reports() -> anyhow::Result<()> {
    let s = setup("transaction").await?;
    let base = format!("http://127.0.0.1:{}", s.http);
    let client = pg_connect(&dsn(s.port, "t_acme", "pw-acme", "acme")).await?;
    client.batch_execute("SELECT 1").await?;
    let _ = pg_connect(&dsn(s.port, "t_acme", "nope", "acme")).await;

    let get = |path: &str| reqwest::get(format!("{base}{path}"));
    ensure!(get("/healthz").await?.status() == 200);
    ensure!(get("/readyz").await?.status() == 200);
    let resolved: serde_json::Value = get("/v1/resolve?host=acme.example.com&path=/x")
        .await?
        .json()
        .await?;
    ensure!(
        resolved["tenant"] == "acme" && resolved["database"] == "t_acme",
        "{resolved}"
    );
    ensure!(get("/v1/resolve?host=unknown.example.com").await?.status() == 404);
    let tenants: serde_json::Value = get("/v1/tenants").await?.json().await?;
    let acme = tenants["tenants"]
        .as_array()
        .and_then(|l| l.iter().find(|t| t["tenant"] == "default.acme").cloned());
    let acme = acme.context("acme in /v1/tenants")?;
    ensure!(
        acme["poolSize"] == 4 && acme["idle"].as_u64().unwrap_or(0) >= 1,
        "{acme}"
    );
    let metrics = get("/metrics").await?.text().await?;
    for needle in [
        "silo_router_logins_total{result=\"ok\"}",
        "silo_router_logins_total{result=\"28P01\"} 1",
        "silo_router_sessions 1",
        "silo_router_tenants{state=\"ready\"} 2",
        "silo_router_checkout_wait_seconds_bucket",
    ] {
        ensure!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    Ok(())
}

/// The tenant file with both tenants on one server, `pg`, whose budget is `max_connections`.
fn one_server_yaml(pg: &PgServer, max_connections: usize) -> String {
    let yaml = tenants_yaml(pg, "Ready").replace("}\n", ", server: pg}\n");
    format!("servers: {{pg: {{maxConnections: {max_connections}}}}}\n{yaml}")
}

/// Puts both tenants on one server, `pg`, with a budget of `max_connections`, and waits for the
/// router to reload its file.
async fn share_one_server(s: &Setup, max_connections: usize) -> anyhow::Result<()> {
    std::fs::write(&s.file, one_server_yaml(&s.pg, max_connections))?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    Ok(())
}

/// Server connections of the two tenants, as the server counts them.
async fn tenant_backends(admin: &sqlx::PgPool) -> anyhow::Result<i64> {
    let n = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE usename IN ('t_acme', 't_beta')",
    )
    .fetch_one(admin)
    .await?;
    Ok(n)
}

/// Waits for the server to count at most `budget` connections of the two tenants: a closed
/// connection's backend leaves pg_stat_activity a moment later.
async fn settles_within(admin: &sqlx::PgPool, budget: i64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let open = tenant_backends(admin).await?;
        if open <= budget {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{open} server connections on a server whose budget is {budget}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn server_budget_is_shared_and_named_when_spent() -> anyhow::Result<()> {
    let s = setup("session").await?;
    share_one_server(&s, 2).await?;
    let a1 = pg_connect(&dsn(s.port, "t_acme", "pw-acme", "acme")).await?;
    let a2 = pg_connect(&dsn(s.port, "t_acme", "pw-acme", "acme")).await?;
    let err = pg_connect(&dsn(s.port, "t_beta", "pw-beta", "beta"))
        .await
        .err()
        .context("budget spent")?;
    ensure!(sqlstate(&err) == "53300", "{err}");
    let text = format!("{err:?}");
    ensure!(
        text.contains("maxConnections") && text.contains("\\\"pg\\\""),
        "{text}"
    );
    drop(a1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = pg_connect(&dsn(s.port, "t_beta", "pw-beta", "beta")).await?;
    b.batch_execute("SELECT 1").await?;
    a2.batch_execute("SELECT 1").await?;
    Ok(())
}

/// Idle server connections count against their server's budget: a tenant that needs one when
/// the budget is spent by another tenant's idle connections takes the place of one of them. The
/// router used to count only connections in use, and opened past `maxConnections`.
#[tokio::test]
async fn idle_connections_count_and_make_room_for_another_tenant() -> anyhow::Result<()> {
    let s = setup("transaction").await?;
    share_one_server(&s, 2).await?;
    let admin = s.pg.admin_pool().await?;

    // Two transactions of acme at once: two server connections, idle once they end.
    let a1 = pg_connect(&dsn(s.port, "t_acme", "pw-acme", "acme")).await?;
    let a2 = pg_connect(&dsn(s.port, "t_acme", "pw-acme", "acme")).await?;
    a1.batch_execute("BEGIN; SELECT 1").await?;
    a2.batch_execute("BEGIN; SELECT 1").await?;
    a1.batch_execute("COMMIT").await?;
    a2.batch_execute("COMMIT").await?;
    ensure!(tenant_backends(&admin).await? == 2, "acme holds two, idle");

    // beta needs one: an idle one of acme makes room (acme's would stay idle for good, so
    // waiting would end in 53300).
    let b = pg_connect(&dsn(s.port, "t_beta", "pw-beta", "beta")).await?;
    b.batch_execute("SELECT 1").await?;
    settles_within(&admin, 2).await?;
    // acme still gets its work done, on what is left.
    a1.batch_execute("SELECT 1").await?;
    a2.batch_execute("SELECT 1").await?;
    settles_within(&admin, 2).await?;
    Ok(())
}

/// Waits until the router's table gives `tenant` a connection limit of `size`: the file reloaded.
async fn wait_for_pool_size(s: &Setup, tenant: &str, size: u64) -> anyhow::Result<()> {
    let url = format!("http://127.0.0.1:{}/v1/tenants", s.http);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let tenants: serde_json::Value = reqwest::get(&url).await?.json().await?;
        let now = tenants["tenants"]
            .as_array()
            .and_then(|l| l.iter().find(|t| t["tenant"] == tenant))
            .and_then(|t| t["poolSize"].as_u64());
        if now == Some(size) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{tenant}'s pool size is {now:?}, not {size}, after the reload"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A tenant whose route changes gets a new pool, and the old pool's server connections leave
/// the server's budget: the idle ones at once, the ones its sessions still hold as they are
/// released. Only a tenant's current pool can make room for another tenant, so connections kept
/// by the old pool would hold their places for good, and the server's other tenants would be
/// refused (53300) while the tenant uses none of them.
#[tokio::test]
async fn a_replaced_pool_gives_its_connections_back_to_the_server_budget() -> anyhow::Result<()> {
    let s = setup("transaction").await?;
    share_one_server(&s, 3).await?;
    let admin = s.pg.admin_pool().await?;
    let acme = dsn(s.port, "t_acme", "pw-acme", "acme");
    let beta = dsn(s.port, "t_beta", "pw-beta", "beta");

    // The budget spent: beta's login leaves it one idle connection; acme, from sessions opened
    // before its route changes, holds one in a transaction and one idle.
    let b1 = pg_connect(&beta).await?;
    let a1 = pg_connect(&acme).await?;
    let a2 = pg_connect(&acme).await?;
    a1.batch_execute("BEGIN; SELECT 1").await?;
    a2.batch_execute("BEGIN; SELECT 1; COMMIT").await?;
    ensure!(
        tenant_backends(&admin).await? == 3,
        "beta's idle, acme's busy and idle"
    );

    // acme's route changes (its connection limit); its open sessions go on, on the old pool.
    std::fs::write(
        &s.file,
        one_server_yaml(&s.pg, 3).replace("connectionLimit: 4", "connectionLimit: 3"),
    )?;
    wait_for_pool_size(&s, "default.acme", 3).await?;
    // A new session of acme gets the new pool, whose login takes a connection.
    let a3 = pg_connect(&acme)
        .await
        .context("a new session of acme after its route changed")?;
    a3.batch_execute("SELECT 1").await?;
    settles_within(&admin, 3).await?;
    // The transaction held across the change ends, and its server connection comes back.
    a1.batch_execute("COMMIT").await?;

    // acme is idle: beta may use the whole budget, taking the place of acme's new pool's idle
    // connection; none may be held by the old pool.
    let b2 = pg_connect(&beta).await?;
    let b3 = pg_connect(&beta).await?;
    for (b, n) in [&b1, &b2, &b3].into_iter().zip(1..) {
        b.batch_execute("BEGIN; SELECT 1")
            .await
            .with_context(|| format!("beta's transaction {n} of 3 on a server acme left idle"))?;
    }
    settles_within(&admin, 3).await?;
    for b in [&b1, &b2, &b3] {
        b.batch_execute("COMMIT").await?;
    }
    // acme's sessions, old and new, still get their work done.
    for a in [&a1, &a2, &a3] {
        a.batch_execute("SELECT 1").await?;
    }
    settles_within(&admin, 3).await?;
    Ok(())
}

#[tokio::test]
async fn tls_with_sni_names_the_tenant() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("silo-router-tls-{}", free_port()?));
    std::fs::create_dir_all(&dir)?;
    let (cert, key) =
        silo_e2e::postgres::self_signed_cert(&dir, "silo-router,*.tenants.test,localhost")?;
    let (cert_s, key_s) = (cert.display().to_string(), key.display().to_string());
    let s = setup_with(
        "transaction",
        &[
            "--tls-cert",
            &cert_s,
            "--tls-key",
            &key_s,
            "--sni-domain",
            "tenants.test",
        ],
    )
    .await?;

    let psql = |conninfo: String, sql: &str| {
        Command::new("psql")
            .arg(conninfo)
            .args(["-XAtc", sql])
            .env("PGSSLMODE", "require")
            .output()
    };
    // TLS on the client side.
    let out = psql(
        format!(
            "host=127.0.0.1 port={} user=t_acme password=pw-acme dbname=acme",
            s.port
        ),
        "\\conninfo",
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains("SSL connection"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The SNI host name names the tenant when the startup packet does not.
    let out = psql(
        format!(
            "host=beta.tenants.test hostaddr=127.0.0.1 port={} user=t_beta password=pw-beta",
            s.port
        ),
        "SELECT current_database()",
    )?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == "t_beta",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Whether the server connection behind this routed session uses TLS, as the server sees it.
async fn upstream_is_encrypted(client: &tokio_postgres::Client) -> anyhow::Result<bool> {
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn upstream_tls_follows_the_ssl_mode() -> anyhow::Result<()> {
    let tls_pg = PgServer::start_tls()?;
    let admin = tls_pg.admin_pool().await?;
    sqlx::raw_sql("CREATE ROLE t_sec LOGIN PASSWORD 'pw-sec'")
        .execute(&admin)
        .await?;
    sqlx::raw_sql("CREATE DATABASE t_sec OWNER t_sec")
        .execute(&admin)
        .await?;
    let s = setup("transaction").await?;
    let yaml = format!(
        "{}- {{name: sec, host: 127.0.0.1, port: {}, database: t_sec, user: t_sec, password: pw-sec, sslMode: Require}}\n\
         - {{name: plain, host: 127.0.0.1, port: {}, database: t_acme, user: t_acme, password: pw-acme, sslMode: Require}}\n",
        tenants_yaml(&s.pg, "Ready"),
        tls_pg.port,
        s.pg.port
    );
    std::fs::write(&s.file, yaml)?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let client = pg_connect(&dsn(s.port, "t_sec", "pw-sec", "sec")).await?;
    let ssl = upstream_is_encrypted(&client).await?;
    ensure!(
        ssl,
        "the router's connection to the server is not encrypted"
    );
    // Prefer against a server without TLS: plaintext; Require: refused with a clear error.
    let client = pg_connect(&dsn(s.port, "t_acme", "pw-acme", "acme")).await?;
    let ssl = upstream_is_encrypted(&client).await?;
    ensure!(!ssl);
    let err = pg_connect(&dsn(s.port, "t_acme", "pw-acme", "plain"))
        .await
        .err()
        .context("Require without TLS")?;
    ensure!(
        sqlstate(&err) == "08001" && format!("{err:?}").contains("sslMode is Require"),
        "{err:?}"
    );
    Ok(())
}

// Before login: what a client that has not proved a password can do to the router.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Whatever the router sends before closing (or in the next second).
async fn reply_of(stream: &mut tokio::net::TcpStream) -> anyhow::Result<String> {
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut reply)).await;
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

fn startup_packet(user: &str, database: &str) -> Vec<u8> {
    let mut body = 196_608i32.to_be_bytes().to_vec();
    for text in ["user", user, "database", database, ""] {
        body.extend_from_slice(text.as_bytes());
        body.push(0);
    }
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// One message from the router, whole.
async fn read_message(stream: &mut tokio::net::TcpStream) -> anyhow::Result<Vec<u8>> {
    let mut m = vec![0u8; 5];
    stream.read_exact(&mut m).await?;
    let len = i32::from_be_bytes([m[1], m[2], m[3], m[4]]);
    ensure!((4..65_536).contains(&len), "length {len}");
    m.resize(len as usize + 1, 0);
    stream.read_exact(&mut m[5..]).await?;
    Ok(m)
}

/// The peak resident memory of a process, in MiB.
fn peak_rss_mib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib / 1024)
}

/// Logs in to a real tenant as far as the SASL response, then sends a header claiming a 64 MiB
/// message and nothing more. Returns what the router answers.
async fn claim_a_huge_message(port: u16) -> anyhow::Result<String> {
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    c.write_all(&startup_packet("t_acme", "acme")).await?;
    let sasl = read_message(&mut c).await?;
    ensure!(sasl[0] == b'R', "expected a SASL request, got {sasl:?}");
    c.write_all(&[b'p', 0x04, 0, 0, 0]).await?;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_millis(500), c.read_to_end(&mut reply)).await;
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// A length header alone once made the router allocate and zero up to 64 MiB before login; a
/// handful of sockets could exhaust the pod's memory. Measured on the router process itself.
#[tokio::test]
async fn unauthenticated_clients_cost_bounded_memory() -> anyhow::Result<()> {
    const LIMIT_MIB: u64 = 64;
    let s = setup("transaction").await?;
    let pid = s.router.id();
    // 200 headers that each claim 64 MiB, 25 at a time; the router must not allocate for them.
    for batch in 0..8 {
        let claims = (0..25).map(|_| claim_a_huge_message(s.port));
        let replies = futures::future::join_all(claims).await;
        let peak = peak_rss_mib(pid)?;
        ensure!(
            peak < LIMIT_MIB,
            "after {} claimed 64 MiB messages the router's peak RSS is {peak} MiB",
            (batch + 1) * 25
        );
        for reply in replies {
            let reply = reply?;
            ensure!(
                reply.contains("08P01") && reply.contains("more than the 10000 accepted"),
                "a 64 MiB claim got {reply:?}"
            );
        }
    }
    // 1000 sockets that connect and say nothing.
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(tokio::net::TcpStream::connect(("127.0.0.1", s.port)).await?);
    }
    let client = tokio::time::timeout(
        Duration::from_secs(5),
        pg_connect(&dsn(s.port, "t_acme", "pw-acme", "acme")),
    )
    .await
    .context("a client logging in among 1000 idle sockets")??;
    let one: i32 = client.query_one("SELECT 1", &[]).await?.get(0);
    ensure!(one == 1);
    let peak = peak_rss_mib(pid)?;
    ensure!(
        peak < LIMIT_MIB,
        "with 1000 idle sockets the router's peak RSS is {peak} MiB"
    );
    Ok(())
}

/// Everything the router sends to a client that names `database` and proves a wrong password:
/// the SASL request, the server-first message, the final error (or an error at once).
async fn wrong_password_transcript(port: u16, database: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    c.write_all(&startup_packet("app", database)).await?;
    let sasl = read_message(&mut c).await?;
    if sasl[0] != b'R' {
        return Ok(vec![sasl]);
    }
    let mut scram = ScramSha256::new(b"wrong", ChannelBinding::unsupported());
    let mut initial = b"SCRAM-SHA-256\0".to_vec();
    initial.extend_from_slice(&(scram.message().len() as i32).to_be_bytes());
    initial.extend_from_slice(scram.message());
    c.write_all(&message(b'p', &initial)).await?;
    let server_first = read_message(&mut c).await?;
    ensure!(server_first.len() > 9, "{server_first:?}");
    scram.update(&server_first[9..])?;
    c.write_all(&message(b'p', scram.message())).await?;
    let error = read_message(&mut c).await?;
    Ok(vec![sasl, server_first, error])
}

/// Messages as text, for failure reports.
fn readable(messages: &[Vec<u8>]) -> Vec<String> {
    messages
        .iter()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect()
}

/// `r=<nonce>,s=<salt>,i=<iterations>` from an AuthenticationSASLContinue message.
fn server_first_fields(m: &[u8]) -> anyhow::Result<(usize, Vec<u8>, String)> {
    use base64::Engine;
    let text = std::str::from_utf8(&m[9..])?;
    let field = |name: &str| {
        text.split(',')
            .find_map(|f| f.strip_prefix(name))
            .with_context(|| format!("{name} in {text}"))
    };
    let salt = base64::engine::general_purpose::STANDARD.decode(field("s=")?)?;
    Ok((field("r=")?.len(), salt, field("i=")?.to_string()))
}

/// Before a password is proved, nothing tells an existing tenant (in any state) from a name that
/// leads nowhere: the same messages, a salt of the same length, the same error.
#[tokio::test]
async fn every_name_gets_the_same_exchange_until_a_password_is_proved() -> anyhow::Result<()> {
    let s = setup("transaction").await?;
    let p = s.pg.port;
    let yaml = format!(
        "{}- {{name: dup, host: 127.0.0.1, port: {p}, database: t_acme, user: t_acme, password: pw-dup1}}\n\
         - {{name: dup, namespace: other, host: 127.0.0.1, port: {p}, database: t_acme, user: t_acme, password: pw-acme}}\n",
        tenants_yaml(&s.pg, "Suspended")
    );
    std::fs::write(&s.file, yaml)?;
    // The reload: the suspended tenant's right password gets 57P03, with words a person understands.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match pg_connect(&dsn(s.port, "app", "pw-beta", "beta")).await {
            Err(e) if sqlstate(&e) == "57P03" => {
                ensure!(format!("{e:?}").contains("suspended"), "{e:?}");
                break;
            }
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => anyhow::bail!("the suspended tenant was not reported: {:?}", other.err()),
        }
    }

    // A wrong password: unknown, suspended, ambiguous and real names all see the same thing.
    let real = wrong_password_transcript(s.port, "acme").await?;
    let [sasl, first, error] = real.as_slice() else {
        anyhow::bail!("a real tenant: {:?}", readable(&real));
    };
    ensure!(sasl[0] == b'R' && error[0] == b'E', "{:?}", readable(&real));
    let (nonce_len, salt, iterations) = server_first_fields(first)?;
    ensure!(
        salt.len() == 16 && iterations == "4096",
        "{salt:?} {iterations}"
    );
    let mut salts = vec![salt];
    for name in ["nosuch", "beta", "dup", "default.nosuch", "nosuch"] {
        let other = wrong_password_transcript(s.port, name).await?;
        let [s2, f2, e2] = other.as_slice() else {
            anyhow::bail!("{name}: {:?}", readable(&other));
        };
        ensure!(s2 == sasl, "{name}: SASL request {s2:?}, not {sasl:?}");
        ensure!(f2.len() == first.len(), "{name}: server-first {f2:?}");
        let (n2, salt2, i2) = server_first_fields(f2)?;
        ensure!(
            (n2, salt2.len(), i2.as_str()) == (nonce_len, 16, "4096"),
            "{name}: server-first {f2:?}"
        );
        ensure!(
            e2 == error,
            "{name}: error {:?}",
            String::from_utf8_lossy(e2)
        );
        salts.push(salt2);
    }
    let text = String::from_utf8_lossy(error);
    ensure!(
        text.contains("28P01") && text.contains("password authentication failed for user \"app\""),
        "{text}"
    );
    // As PostgreSQL's mock authentication: a name keeps its salt, and names do not share one.
    ensure!(
        salts[1] == salts[5],
        "an unknown name's salt changed between tries"
    );
    let distinct: std::collections::HashSet<_> = salts[..5].iter().collect();
    ensure!(distinct.len() == 5, "salts shared between names: {salts:?}");

    // The right password learns what the name leads to.
    let err = pg_connect(&dsn(s.port, "app", "pw-acme", "dup"))
        .await
        .err()
        .context("an ambiguous name")?;
    ensure!(
        sqlstate(&err) == "3D000" && format!("{err:?}").contains("default.dup, other.dup"),
        "{err:?}"
    );
    let client = pg_connect(&dsn(s.port, "app", "pw-acme", "other.dup")).await?;
    let one: i32 = client.query_one("SELECT 1", &[]).await?.get(0);
    ensure!(one == 1);
    Ok(())
}

#[tokio::test]
async fn require_tls_refuses_plaintext_clients() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("silo-router-require-tls-{}", free_port()?));
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = silo_e2e::postgres::self_signed_cert(&dir, "localhost")?;
    let (cert, key) = (cert.display().to_string(), key.display().to_string());

    // Not without a certificate.
    let out = Command::new(env!("CARGO_BIN_EXE_silo-router"))
        .args(["--require-tls", "--config", "/nonexistent.yaml"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("--require-tls needs a certificate"),
        "{stderr}"
    );

    let s = setup_with(
        "transaction",
        &["--tls-cert", &cert, "--tls-key", &key, "--require-tls"],
    )
    .await?;
    let err = pg_connect(&dsn(s.port, "t_acme", "pw-acme", "acme"))
        .await
        .err()
        .context("a plaintext client was let in")?;
    ensure!(
        sqlstate(&err) == "28000" && format!("{err:?}").contains("TLS is required"),
        "{err:?}"
    );
    let psql = |sslmode: &str| {
        Command::new("psql")
            .arg(format!(
                "host=127.0.0.1 port={} user=t_acme password=pw-acme dbname=acme",
                s.port
            ))
            .args(["-XAtc", "SELECT current_database()"])
            .env("PGSSLMODE", sslmode)
            .output()
    };
    let out = psql("disable")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("TLS is required"),
        "{stderr}"
    );
    let out = psql("require")?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "t_acme",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
