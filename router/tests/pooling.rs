//! Pooling that keeps its promises, against real PostgreSQL: each client sees the parameters it
//! asked for and never another client's session state, in either pool mode; a server's own
//! errors reach the client; prepared statements survive other clients' DEALLOCATE ALL.

mod common;

use anyhow::{Context, ensure};
use common::{DbError, Router};

/// What a session's parameters are, as the server has them.
const SHOW: &str = "SELECT current_setting('application_name'), current_setting('client_encoding'), \
    current_setting('TimeZone'), current_setting('DateStyle'), current_setting('IntervalStyle'), \
    current_setting('standard_conforming_strings'), current_setting('search_path'), \
    current_setting('statement_timeout'), current_setting('lock_timeout'), pg_backend_pid()::text";

/// The parameters of [`SHOW`] that the server reports in ParameterStatus.
const REPORTED: [&str; 6] = [
    "application_name",
    "client_encoding",
    "TimeZone",
    "DateStyle",
    "IntervalStyle",
    "standard_conforming_strings",
];

async fn show(client: &mut common::RawClient) -> anyhow::Result<Vec<String>> {
    let rows = client.query(SHOW).await?;
    let row = rows.into_iter().next().context("no row")?;
    Ok(row.into_iter().map(Option::unwrap_or_default).collect())
}

async fn clients_get_the_parameters_they_asked_for(mode: &str) -> anyhow::Result<()> {
    // One server connection for the tenant: every client below uses the same one.
    let router = Router::start(mode, 1).await?;
    let asked = [
        ("application_name", "app-1"),
        ("client_encoding", "EUC_JP"),
        ("TimeZone", "Asia/Tokyo"),
        ("DateStyle", "SQL, DMY"),
        ("IntervalStyle", "iso_8601"),
        ("standard_conforming_strings", "off"),
        ("search_path", "app, public"),
        ("options", "-c statement_timeout=4321 -c lock_timeout=1234"),
    ];
    let mut a = router.raw(&asked).await?;
    // Told at login, as PostgreSQL tells a direct client...
    for (name, value) in &asked[..REPORTED.len()] {
        ensure!(
            a.params.get(*name).map(String::as_str) == Some(*value),
            "{mode}: ParameterStatus {name} = {:?} after asking for {value:?}",
            a.params.get(*name)
        );
    }
    // ...and so they are.
    let mine = [
        "app-1",
        "EUC_JP",
        "Asia/Tokyo",
        "SQL, DMY",
        "iso_8601",
        "off",
        "app, public",
        "4321ms",
        "1234ms",
    ];
    let a_shows = show(&mut a).await?;
    ensure!(a_shows[..9] == mine, "{mode}: the session has {a_shows:?}");

    // In session mode the server connection is the first client's until it leaves.
    let a = (mode == "transaction").then_some(a);
    // Another client, on the same server connection, asking for nothing: the defaults, as it
    // was told them.
    let mut b = router.raw(&[]).await?;
    let b_shows = show(&mut b).await?;
    for (i, name) in REPORTED.iter().enumerate() {
        ensure!(
            b.params.get(*name) == Some(&b_shows[i]) && b_shows[i] != mine[i],
            "{mode}: a client asking for nothing has {name} = {:?}, was told {:?}",
            b_shows[i],
            b.params.get(*name)
        );
    }
    ensure!(
        b_shows[6..9] == ["\"$user\", public", "0", "0"],
        "{mode}: a client asking for nothing has {b_shows:?}"
    );
    ensure!(b_shows[9] == a_shows[9], "not the same server connection");
    if let Some(mut a) = a {
        // The first client gets its own back.
        let again = show(&mut a).await?;
        ensure!(
            again == a_shows,
            "{mode}: back to the first client: {again:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn clients_get_the_parameters_they_asked_for_in_session_mode() -> anyhow::Result<()> {
    clients_get_the_parameters_they_asked_for("session").await
}

#[tokio::test]
async fn clients_get_the_parameters_they_asked_for_in_transaction_mode() -> anyhow::Result<()> {
    clients_get_the_parameters_they_asked_for("transaction").await
}

#[tokio::test]
async fn startup_settings_the_server_refuses_refuse_the_login() -> anyhow::Result<()> {
    let router = Router::start("transaction", 1).await?;
    for (params, code, names) in [
        (
            [("options", "-c statement_timeout=soon")],
            "22023",
            "statement_timeout",
        ),
        ([("no_such_setting", "1")], "42704", "no_such_setting"),
        ([("options", "-e")], "0A000", "-e"),
    ] {
        let err = router
            .raw(&params)
            .await
            .err()
            .with_context(|| format!("{params:?} was accepted"))?;
        let db = err.downcast_ref::<DbError>();
        ensure!(
            db.is_some_and(|e| e.code == code
                && e.severity == "FATAL"
                && e.message.contains(names)),
            "{params:?}: {err:#}"
        );
    }
    // The server connection that refused them serves the next client as before.
    let mut ok = router.raw(&[("application_name", "fine")]).await?;
    ensure!(
        ok.value("SELECT current_setting('statement_timeout')")
            .await?
            == "0"
    );
    Ok(())
}

#[tokio::test]
async fn parameters_a_client_sets_stay_with_it() -> anyhow::Result<()> {
    let router = Router::start("transaction", 1).await?;
    let mut a = router.raw(&[]).await?;
    a.query(
        "SET standard_conforming_strings = off; SET TimeZone = 'America/New_York'; \
         SET DateStyle = 'German'; SET client_encoding = 'LATIN1'; SET application_name = 'set-by-a'; \
         SET IntervalStyle = sql_standard",
    )
    .await?;
    let a_shows = show(&mut a).await?;
    ensure!(
        a_shows[..6]
            == [
                "set-by-a",
                "LATIN1",
                "America/New_York",
                "German, DMY",
                "sql_standard",
                "off"
            ],
        "{a_shows:?}"
    );
    for (i, name) in REPORTED.iter().enumerate() {
        ensure!(
            a.params.get(*name) == Some(&a_shows[i]),
            "told {name} = {:?}",
            a.params.get(*name)
        );
    }
    // The next client of the same server connection has none of it.
    let (b, _) = router.connect().await?;
    let row = b.query_one(SHOW, &[]).await?;
    let b_shows: Vec<String> = (0..10).map(|i| row.get(i)).collect();
    ensure!(b_shows[9] == a_shows[9], "not the same server connection");
    for (i, name) in REPORTED.iter().enumerate() {
        ensure!(
            b_shows[i] != a_shows[i],
            "{name} = {:?} passed to the next client",
            a_shows[i]
        );
    }
    // And the first client still has all of it.
    let again = show(&mut a).await?;
    ensure!(again == a_shows, "{again:?}");

    // A startup setting the server does not report, then a RESET of something else: the router
    // no longer knows what the session holds, and resets it for the next client.
    let mut c = router
        .raw(&[("options", "-c statement_timeout=4321")])
        .await?;
    c.query("RESET lock_timeout").await?;
    let timeout: String = b
        .query_one("SELECT current_setting('statement_timeout')", &[])
        .await?
        .get(0);
    ensure!(
        timeout == "0",
        "statement_timeout {timeout} passed to the next client"
    );
    ensure!(c.value("SHOW statement_timeout").await? == "4321ms");
    Ok(())
}

#[tokio::test]
async fn state_that_cannot_move_keeps_its_server() -> anyhow::Result<()> {
    let router = Router::start("transaction", 2).await?;
    // What a client leaves in its session, and a query that sees it there.
    let cases = [
        (
            "CREATE TEMP TABLE mine (x int)",
            "SELECT to_regclass('pg_temp.mine') IS NOT NULL",
        ),
        (
            "SELECT pg_advisory_lock(42)",
            "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
        ),
        (
            "LISTEN news",
            "SELECT count(*) > 0 FROM pg_listening_channels()",
        ),
        (
            "PREPARE mine AS SELECT 1",
            "SELECT count(*) > 0 FROM pg_prepared_statements WHERE from_sql",
        ),
        (
            "DECLARE mine CURSOR WITH HOLD FOR SELECT 1",
            "SELECT count(*) > 0 FROM pg_cursors WHERE name = 'mine'",
        ),
        (
            "SET statement_timeout = '7s'",
            "SELECT current_setting('statement_timeout') = '7s'",
        ),
    ];
    for (extended, (setup, probe)) in [false, true]
        .into_iter()
        .flat_map(|e| cases.map(|c| (e, c)))
    {
        let (a, _) = router.connect().await?;
        // As a simple query, and as a prepared statement (tokio-postgres's execute).
        if extended {
            a.execute(setup, &[]).await?;
        } else {
            a.batch_execute(setup).await?;
        }
        let (b, _) = router.connect().await?;
        let seen: bool = b.query_one(probe, &[]).await?.get(0);
        ensure!(
            !seen,
            "after another client's {setup:?} (extended: {extended}), {probe:?}"
        );
        let kept: bool = a.query_one(probe, &[]).await?.get(0);
        ensure!(
            kept,
            "{setup:?} (extended: {extended}) was lost to its own client"
        );
    }
    // The lock is really held by the client that took it, not just hidden from the other.
    let (a, _) = router.connect().await?;
    a.batch_execute("SELECT pg_advisory_lock(7)").await?;
    let (b, _) = router.connect().await?;
    let got: bool = b
        .query_one("SELECT pg_try_advisory_lock(7)", &[])
        .await?
        .get(0);
    ensure!(!got, "two clients hold the same advisory lock");
    drop((a, b));

    // Pinned server connections are reset when their client leaves: two clients, one on each,
    // see nothing of what came before.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let (c1, _) = router.connect().await?;
    let (c2, _) = router.connect().await?;
    c1.batch_execute("BEGIN").await?;
    c2.batch_execute("BEGIN").await?;
    for (_, probe) in cases {
        for c in [&c1, &c2] {
            let seen: bool = c.query_one(probe, &[]).await?.get(0);
            ensure!(!seen, "left behind: {probe:?}");
        }
    }
    Ok(())
}

/// A server that ends a client's backend: the client hears the server's own error, and nothing
/// of the router's after it.
async fn terminated_while_held(mode: &str, in_transaction: bool) -> anyhow::Result<()> {
    let router = Router::start(mode, 1).await?;
    let mut a = router.raw(&[]).await?;
    if in_transaction {
        a.query("BEGIN").await?;
    }
    a.query("SELECT 1").await?;
    router.terminate_backends().await?;
    let first = a
        .next_error()
        .await?
        .context("no error before the connection closed")?;
    ensure!(
        first.code == "57P01"
            && first.severity == "FATAL"
            && first.message == "terminating connection due to administrator command",
        "{mode}: {first}"
    );
    let after = a.next_error().await?;
    ensure!(after.is_none(), "{mode}: then {after:?}");
    Ok(())
}

#[tokio::test]
async fn a_terminated_backend_reports_the_servers_error() -> anyhow::Result<()> {
    terminated_while_held("session", false).await?;
    terminated_while_held("transaction", true).await
}

#[tokio::test]
async fn idle_server_connections_the_server_ended_are_replaced() -> anyhow::Result<()> {
    let router = Router::start("transaction", 2).await?;
    let (a, a_ended) = router.connect().await?;
    let (b, _) = router.connect().await?;
    let before: i32 = a.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    // Both idle, between transactions: nothing of theirs is on the server connections.
    ensure!(router.terminate_backends().await? >= 1);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    for client in [&a, &b] {
        let after: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .context("a client whose server connection ended while it was not using it")?
            .get(0);
        ensure!(after != before);
    }
    ensure!(!a_ended.is_finished(), "the client's connection ended");
    Ok(())
}

#[tokio::test]
async fn prepared_statements_survive_another_clients_deallocate_all() -> anyhow::Result<()> {
    // One server connection: every client's statements live on it.
    let router = Router::start("transaction", 1).await?;
    let (a, _) = router.connect().await?;
    let plus_one = a.prepare("SELECT $1::int + 1").await?;
    let two: i32 = a.query_one(&plus_one, &[&1i32]).await?.get(0);
    ensure!(two == 2);
    for (i, drop_all) in ["DEALLOCATE ALL", "DISCARD ALL", "deallocate prepare all"]
        .into_iter()
        .enumerate()
    {
        let (b, _) = router.connect().await?;
        b.batch_execute(drop_all).await?;
        // The same as a statement of its own (Parse, Bind, Execute), as psycopg and sqlx send it.
        b.execute(drop_all, &[]).await?;
        let n = i as i32;
        let got: i32 = a
            .query_one(&plus_one, &[&n])
            .await
            .with_context(|| format!("after another client's {drop_all}"))?
            .get(0);
        ensure!(got == n + 1);
    }
    // The client's own DEALLOCATE ALL, then the same statement prepared again (psycopg 3 does
    // this after a ROLLBACK while it holds prepared statements).
    a.batch_execute("DEALLOCATE ALL").await?;
    let again = a.prepare("SELECT $1::int + 1").await?;
    let three: i32 = a.query_one(&again, &[&2i32]).await?.get(0);
    ensure!(three == 3);
    ensure!(
        router.backends().await?.len() == 1,
        "more than one server connection"
    );
    Ok(())
}
