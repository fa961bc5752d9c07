//! The e2e cluster's node: a Job's pod really runs (`psql` against a tenant database, with the
//! tenant Secret's credentials), and nothing the cluster sends can leave the machine.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use silo_crds::TenantPhase;
use silo_e2e::kube_env::with_temp_ns;
use silo_e2e::node::{self, JobOutcome};
use silo_e2e::{PgServer, TestNs};
use sqlx::{Connection, PgConnection};

const TIMEOUT: Duration = Duration::from_secs(120);

/// A Job running the silo image's `psql` with the tenant's connection settings from its Secret.
fn psql_job(name: &str, image: &str, secret: &str, sql: &str) -> String {
    let env: String = [
        ("PGHOST", "host"),
        ("PGPORT", "port"),
        ("PGDATABASE", "dbname"),
        ("PGUSER", "user"),
        ("PGPASSWORD", "password"),
    ]
    .iter()
    .map(|(var, key)| {
        format!(
            "        - {{name: {var}, valueFrom: {{secretKeyRef: {{name: {secret}, key: {key}}}}}}}\n"
        )
    })
    .collect();
    format!(
        r#"apiVersion: batch/v1
kind: Job
metadata: {{name: {name}}}
spec:
  backoffLimit: 0
  activeDeadlineSeconds: 90
  template:
    spec:
      restartPolicy: Never
      securityContext: {{runAsNonRoot: true, seccompProfile: {{type: RuntimeDefault}}}}
      containers:
      - name: psql
        image: {image}
        imagePullPolicy: Never
        command: [psql, -v, ON_ERROR_STOP=1, -c, "{sql}"]
        securityContext:
          readOnlyRootFilesystem: true
          allowPrivilegeEscalation: false
          capabilities: {{drop: [ALL]}}
        env:
{env}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_pod_runs_psql_against_a_tenant_database() {
    with_temp_ns("node-job", |ns: TestNs| async move {
        let image = node::image()?;
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
        ns.apply_ok(&psql_job("psql-proof", &image, "acme-db", sql))
            .await?;
        let outcome = node::wait_job(&ns, "psql-proof", TIMEOUT).await?;
        let logs = node::job_logs(&ns, "psql-proof").await.unwrap_or_default();
        ensure!(
            outcome == JobOutcome::Complete,
            "the Job did not complete: {outcome:?}; its log:\n{logs}"
        );
        eprintln!("psql Job completed in {:?}", started.elapsed());
        ensure!(logs.contains("INSERT 0 1"), "psql's output: {logs}");

        // Its effect, seen with the tenant's own credentials from outside the cluster.
        let user = ns.secret_value("acme", "user").await?;
        let database = ns.secret_value("acme", "dbname").await?;
        let mut conn = PgConnection::connect(&ns.secret_value("acme", "uri").await?).await?;
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
        let image = node::image()?;
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
        let job = format!(
            r#"apiVersion: batch/v1
kind: Job
metadata: {{name: egress}}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: probe
        image: {image}
        imagePullPolicy: Never
        command: [sh, -c, "psql -h 203.0.113.1 -c 'SELECT 1' 2>&1; echo exit=$?"]
"#
        );
        ns.apply_ok(&job).await?;
        let outcome = node::wait_job(&ns, "egress", TIMEOUT).await?;
        ensure!(outcome == JobOutcome::Complete, "{outcome:?}");
        let logs = node::job_logs(&ns, "egress").await?;
        ensure!(
            logs.contains("Network is unreachable") && logs.contains("exit=2"),
            "a pod connecting to 203.0.113.1 printed: {logs}"
        );
        Ok(())
    })
    .await;
}
