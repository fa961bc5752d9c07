//! The e2e cluster's node: a Job's pod really runs (`psql` against a tenant database, with the
//! tenant Secret's credentials), and nothing the cluster sends can leave the machine.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use silo_crds::TenantPhase;
use silo_e2e::kube_env::with_temp_ns;
use silo_e2e::node::{self, EnvFrom, JobOutcome};
use silo_e2e::{PgServer, TestNs};
use sqlx::{Connection, PgConnection};

const TIMEOUT: Duration = Duration::from_secs(120);

/// The tenant's connection settings from its credentials Secret, as libpq's variables.
const TENANT_ENV: [(&str, EnvFrom<'static>); 5] = [
    ("PGHOST", EnvFrom::Secret("acme-db", "host")),
    ("PGPORT", EnvFrom::Secret("acme-db", "port")),
    ("PGDATABASE", EnvFrom::Secret("acme-db", "dbname")),
    ("PGUSER", EnvFrom::Secret("acme-db", "user")),
    ("PGPASSWORD", EnvFrom::Secret("acme-db", "password")),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_pod_runs_psql_against_a_tenant_database() {
    with_temp_ns("node-job", |ns: TestNs| async move {
        node::image()?; // no node, no test: say so before starting anything
        let pg = PgServer::start()?;
        let server = ns.server_name("pg");
        ns.add_server(&server, &pg, "").await?;
        let _controller = ns.start_controller(&[])?;
        ns.apply_ok(
            "apiVersion: silo.dev/v1alpha1\nkind: Tenant\nmetadata: {name: acme}\nspec: {}\n",
        )
        .await?;
        ns.wait_phase("acme", TenantPhase::Ready, TIMEOUT).await?;

        let started = Instant::now();
        let sql = "CREATE TABLE job_proof (note text); \
                   INSERT INTO job_proof SELECT current_user || '@' || current_database()";
        let (outcome, logs) = node::run_job(
            &ns,
            "psql-proof",
            &["psql", "-v", "ON_ERROR_STOP=1", "-c", sql],
            &TENANT_ENV,
        )
        .await?;
        ensure!(
            outcome == JobOutcome::Complete,
            "the Job did not complete: {outcome:?}; its log:\n{logs}"
        );
        eprintln!("psql Job completed in {:?}", started.elapsed());
        ensure!(logs.contains("INSERT 0 1"), "psql's output: {logs}");

        // Its effect, seen with the tenant's own credentials from outside the cluster.
        let [user, database, uri] = ns.secret_values("acme", ["user", "dbname", "uri"]).await?;
        let mut conn = PgConnection::connect(&uri).await?;
        let note: String = sqlx::query_scalar("SELECT note FROM job_proof")
            .fetch_one(&mut conn)
            .await
            .context("the Job's table")?;
        ensure!(
            note == format!("{user}@{database}"),
            "job_proof holds {note:?}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_leaves_the_machine() {
    if !node::guard_up("nothing_leaves_the_machine") {
        return;
    }
    with_temp_ns("node-guard", |ns: TestNs| async move {
        node::image()?; // no node, no test: say so before probing anything
        // From this machine: the service and pod ranges are rejected at once by the guard, on
        // whatever interface the routing table would have used (a silent drop would time out).
        for address in ["198.19.255.254:443", "198.18.200.1:5432"] {
            let started = Instant::now();
            let result = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::TcpStream::connect(address),
            )
            .await
            .with_context(|| format!("{address}: no answer within 5 s; is the guard up?"))?;
            let err = match result {
                Ok(_) => anyhow::bail!("{address} answered: it must be rejected"),
                Err(e) => e,
            };
            ensure!(
                err.kind() == std::io::ErrorKind::ConnectionRefused,
                "{address}: {err} (expected a rejection)"
            );
            ensure!(started.elapsed() < Duration::from_secs(1));
        }

        // From a pod: the node's namespace has no route off the machine at all.
        let probe = "psql -h 203.0.113.1 -c 'SELECT 1' 2>&1; echo exit=$?";
        let (outcome, logs) = node::run_job(&ns, "egress", &["sh", "-c", probe], &[]).await?;
        ensure!(outcome == JobOutcome::Complete, "{outcome:?}: {logs}");
        ensure!(
            logs.contains("Network is unreachable") && logs.contains("exit=2"),
            "a pod connecting to 203.0.113.1 printed: {logs}"
        );
        Ok(())
    })
    .await;
}
