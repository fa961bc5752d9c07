//! The security regression suite for tenant isolation on the database servers: no tenant reaches
//! another tenant's role or database, by its name or through the controller's admin sessions.
//! Each scenario reproduces an attack a review found, against a real control plane and real
//! PostgreSQL servers.

use std::time::Duration;

use anyhow::{Context, ensure};
use silo_crds::TenantPhase;
use silo_e2e::kube_env::{TEST_LABEL, with_temp_ns};
use silo_e2e::postgres::Catalog;
use silo_e2e::{ControllerProcess, PgServer, TestNs, tenant_yaml, wait_for};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The tenant's own credentials, aimed at `database` on `pg`.
async fn tenant_options(
    ns: &TestNs,
    pg: &PgServer,
    tenant: &str,
    database: Option<&str>,
) -> anyhow::Result<PgConnectOptions> {
    let [user, password, dbname] = ns
        .secret_values(tenant, ["user", "password", "dbname"])
        .await?;
    Ok(pg.options(&user, &password, database.unwrap_or(&dbname)))
}

async fn ready_reason(ns: &TestNs, tenant: &str) -> anyhow::Result<(String, String)> {
    let t = ns.tenants().get(tenant).await?;
    let ready = t
        .status
        .context("no status")?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .context("no Ready condition")?;
    Ok((ready.reason, ready.message))
}

/// A namespace equal to the first 50 characters of a victim's long namespace, and a Tenant named
/// like the hash suffix of the victim's shortened name, derived exactly the victim's role and
/// database name: the second tenant reset the victim's password to its own Secret's and, with
/// policy Delete, dropped the victim's database on deletion.
#[tokio::test]
async fn a_long_namespace_cannot_derive_another_tenants_names() {
    // 8 + 47 + 1 + 6 = 62 characters: the victim's `t_<ns>_acme` is past 63 bytes.
    let prefix = format!("collide-{}", "v".repeat(47));
    with_temp_ns(&prefix, |victim_ns| async move {
        let pg = PgServer::start()?;
        // `<namespace>-pg` would be past 63 characters.
        let server = format!("collide-{}", &victim_ns.name[victim_ns.name.len() - 6..]);
        victim_ns.add_server(&server, &pg, "").await?;
        let _victim_ctl = victim_ns.start_controller(&[])?;
        victim_ns.apply_ok(&tenant_yaml("acme", "  {}")).await?;
        victim_ns
            .wait_phase("acme", TenantPhase::Ready, READY_TIMEOUT)
            .await?;
        let victim = tenant_options(&victim_ns, &pg, "acme", None).await?;
        let mut conn = PgConnection::connect_with(&victim).await?;
        sqlx::raw_sql("CREATE TABLE ledger (v text); INSERT INTO ledger VALUES ('victim data')")
            .execute(&mut conn)
            .await?;
        conn.close().await?;

        // The attacker: the victim namespace's first 50 characters, and a Tenant named like the
        // 10-hex suffix the old derivation gave the victim.
        let attacker_ns = TestNs::create(&victim_ns.name[..50]).await?;
        let outcome = async {
            use sha2::Digest;
            let full = format!("t_{}_acme", victim_ns.name);
            let suffix: String = sha2::Sha256::digest(full.as_bytes())[..5]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            // Same server: the attacker's controller selects the victim's server.
            let selector = format!("{TEST_LABEL}={}", victim_ns.name);
            let _attacker_ctl = ControllerProcess::start_with_env(
                &attacker_ns,
                None,
                &[],
                &[
                    ("SILO_SERVER_SELECTOR", &selector),
                    ("SILO_ADMIN_SECRET_NAMESPACES", &victim_ns.name),
                ],
            )?;
            attacker_ns
                .apply_ok(&tenant_yaml(&suffix, "  deletion: {policy: Delete}"))
                .await?;
            attacker_ns
                .wait_phase(&suffix, TenantPhase::Ready, READY_TIMEOUT)
                .await?;
            let attacker_db = attacker_ns.secret_value(&suffix, "dbname").await?;
            let victim_db = victim_ns.secret_value("acme", "dbname").await?;
            ensure!(
                attacker_db != victim_db,
                "both tenants got database {victim_db}"
            );

            // The victim's password still works, and the attacker's does not open its database.
            let conn = PgConnection::connect_with(&victim)
                .await
                .context("the victim's own credentials no longer log in")?;
            conn.close().await?;
            let stolen = tenant_options(&attacker_ns, &pg, &suffix, Some(&victim_db)).await?;
            ensure!(
                PgConnection::connect_with(&stolen).await.is_err(),
                "the attacker's credentials open the victim's database"
            );

            // Deleting the attacker (policy Delete) drops the attacker's database, not the victim's.
            let out = attacker_ns
                .kubectl(&[
                    "delete",
                    "tenant",
                    &suffix,
                    "-n",
                    &attacker_ns.name,
                    "--timeout=60s",
                ])
                .await?;
            ensure!(out.success, "{}", out.stderr);
            ensure!(
                !pg.exists(Catalog::Database, &attacker_db).await?,
                "attacker's database kept"
            );
            let mut conn = PgConnection::connect_with(&victim).await?;
            let v: String = sqlx::query_scalar("SELECT v FROM ledger")
                .fetch_one(&mut conn)
                .await?;
            ensure!(v == "victim data");
            Ok(())
        }
        .await;
        attacker_ns.cleanup().await;
        outcome
    })
    .await;
}

/// A role or database that carries a tenant's name but not its identity belongs to someone else:
/// the tenant fails with NameConflict, and nothing of it is adopted, given a new password, or
/// dropped - not even with policy Delete.
#[tokio::test]
async fn a_role_or_database_of_another_owner_is_never_adopted() {
    with_temp_ns("squat", |ns| async move {
        let pg = PgServer::start()?;
        ns.add_server(&ns.server_name("pg"), &pg, "").await?;
        let admin = pg.admin_pool().await?;
        // A role made by hand under the name the tenant will derive.
        let role = format!("t_{}_squatter", ns.name);
        sqlx::raw_sql(&format!(
            "CREATE ROLE \"{role}\" LOGIN PASSWORD 'made-by-hand'"
        ))
        .execute(&admin)
        .await?;
        // A database that another Silo tenant's identity marks as its own.
        let other_db = format!("t_{}_claimed", ns.name);
        sqlx::raw_sql(&format!("CREATE DATABASE \"{other_db}\""))
            .execute(&admin)
            .await?;
        sqlx::raw_sql(&format!(
            "COMMENT ON DATABASE \"{other_db}\" IS 'silo: tenant elsewhere/claimed uid 0000'"
        ))
        .execute(&admin)
        .await?;
        let _ctl = ns.start_controller(&[])?;
        ns.apply_ok(
            &[
                tenant_yaml("squatter", "  deletion: {policy: Delete}"),
                tenant_yaml("claimed", "  deletion: {policy: Delete}"),
            ]
            .join("---\n"),
        )
        .await?;
        for (tenant, object) in [("squatter", "role"), ("claimed", "database")] {
            ns.wait_phase(tenant, TenantPhase::Failed, READY_TIMEOUT)
                .await?;
            let (reason, message) = ready_reason(&ns, tenant).await?;
            ensure!(reason == "NameConflict", "{tenant}: {reason}: {message}");
            ensure!(message.starts_with(object), "{tenant}: {message}");
        }
        let (_, message) = ready_reason(&ns, "claimed").await?;
        ensure!(message.contains("elsewhere/claimed"), "{message}");

        // The hand-made role keeps its own password; the tenant's Secret does not log in as it.
        let by_hand = pg.options(&role, "made-by-hand", "postgres");
        PgConnection::connect_with(&by_hand)
            .await
            .context("the hand-made role's password was changed")?
            .close()
            .await?;
        let secret_password = ns.secret_value("squatter", "password").await?;
        ensure!(
            PgConnection::connect_with(&pg.options(&role, &secret_password, "postgres"))
                .await
                .is_err(),
            "the tenant's Secret logs in as a role that is not the tenant's"
        );

        // Deleting the tenants (policy Delete) leaves both alone.
        let out = ns
            .kubectl(&[
                "delete",
                "tenant",
                "squatter",
                "claimed",
                "-n",
                &ns.name,
                "--timeout=60s",
            ])
            .await?;
        ensure!(out.success, "{}", out.stderr);
        ensure!(
            pg.exists(Catalog::Role, &role).await?,
            "a foreign role was dropped"
        );
        ensure!(
            pg.exists(Catalog::Database, &other_db).await?,
            "a foreign database was dropped"
        );
        ensure!(
            !pg.exists(Catalog::Database, &role).await?,
            "a database was created for a tenant whose role name is taken"
        );
        Ok(())
    })
    .await;
}

/// On a server where PUBLIC may create in `postgres.public` (PostgreSQL 14's default, kept by
/// upgrades), a tenant connects to `postgres` and plants functions that match the controller's
/// catalog calls better than the catalog's own (`shobj_description(oid, text)` for an untyped
/// literal, `has_database_privilege(text, oid, text)` for a text parameter). The admin must never
/// run them; the server reports the risky grants, and revokes them when asked to.
#[tokio::test]
async fn admin_sessions_never_run_a_tenants_functions() {
    with_temp_ns("planted", |ns| async move {
        let pg = PgServer::start()?;
        let admin = pg.admin_pool().await?;
        sqlx::raw_sql("GRANT CREATE ON SCHEMA public TO PUBLIC")
            .execute(&admin)
            .await?;
        let server = ns.server_name("pg");
        ns.add_server(&server, &pg, "").await?;
        let ctl = ns.start_controller(&[])?;
        ns.apply_ok(&tenant_yaml("acme", "  {}")).await?;
        ns.wait_phase("acme", TenantPhase::Ready, READY_TIMEOUT)
            .await?;

        let in_postgres = tenant_options(&ns, &pg, "acme", Some("postgres")).await?;
        let mut tenant = PgConnection::connect_with(&in_postgres)
            .await
            .context("a tenant role can connect to `postgres` on a default server")?;
        sqlx::raw_sql(
            "CREATE TABLE public.calls (who text, what text);
             GRANT INSERT ON public.calls TO PUBLIC;
             CREATE FUNCTION public.shobj_description(oid, text) RETURNS text LANGUAGE sql AS
               $$ INSERT INTO public.calls VALUES (current_user, 'shobj_description');
                  SELECT 'planted'::text $$;
             CREATE FUNCTION public.has_database_privilege(text, oid, text) RETURNS boolean
               LANGUAGE sql AS
               $$ INSERT INTO public.calls VALUES (current_user, 'has_database_privilege');
                  SELECT true $$;",
        )
        .execute(&mut tenant)
        .await?;

        // A controller that starts after the planting (as on any upgrade or failover) opens fresh
        // admin sessions, which resolve function names anew; then a full provisioning pass (a new
        // connection limit) and a server check run.
        drop(ctl);
        let _ctl = ns.start_controller(&[])?;
        ns.apply_ok(&tenant_yaml("acme", "  connectionLimit: 7"))
            .await?;
        let role = ns.secret_value("acme", "user").await?;
        // The whole pass has run once the status reports the new generation.
        wait_for(
            "the pass for the new connection limit",
            READY_TIMEOUT,
            || async {
                let t = ns.tenants().get("acme").await.ok()?;
                let observed = t.status?.observed_generation;
                let limit: i32 =
                    sqlx::query_scalar("SELECT rolconnlimit FROM pg_roles WHERE rolname = $1")
                        .bind(&role)
                        .fetch_one(&admin)
                        .await
                        .ok()?;
                (limit == 7 && observed == t.metadata.generation).then_some(())
            },
        )
        .await?;
        let calls: Vec<(String, String)> = sqlx::query_as("SELECT who, what FROM public.calls")
            .fetch_all(&mut tenant)
            .await?;
        ensure!(
            calls.is_empty(),
            "the controller ran a tenant's function: {calls:?}"
        );

        // One more full pass: the resync repairs a dropped grant.
        sqlx::raw_sql(&format!(
            "REVOKE CONNECT ON DATABASE \"{}\" FROM \"{role}\"",
            ns.secret_value("acme", "dbname").await?
        ))
        .execute(&admin)
        .await?;
        let own_db = tenant_options(&ns, &pg, "acme", None).await?;
        wait_for("the CONNECT grant repaired", READY_TIMEOUT, || async {
            PgConnection::connect_with(&own_db).await.ok().map(|_| ())
        })
        .await?;

        let hardened = wait_for("the server's Hardened condition", READY_TIMEOUT, || async {
            let s = ns.servers().get(&server).await.ok()?;
            s.status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Hardened")
        })
        .await?;

        ensure!(
            hardened.status == "False" && hardened.reason == "PublicAccess",
            "{} {}: {}",
            hardened.status,
            hardened.reason,
            hardened.message
        );
        for grant in [
            "CONNECT to database postgres",
            "CONNECT to database template1",
            "CREATE in schema public of database postgres",
        ] {
            ensure!(
                hardened.message.contains(grant),
                "{grant} not reported: {}",
                hardened.message
            );
        }
        tenant.close().await?;

        // Asked to, the controller revokes them: the tenant can no longer get in.
        let out = ns
            .kubectl(&[
                "patch",
                "databaseserver",
                &server,
                "--type=merge",
                "-p",
                r#"{"spec":{"revokePublicAccess":true}}"#,
            ])
            .await?;
        ensure!(out.success, "{}", out.stderr);
        wait_for("Hardened=True", READY_TIMEOUT, || async {
            let s = ns.servers().get(&server).await.ok()?;
            let c = s
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Hardened")?;
            (c.status == "True").then_some(())
        })
        .await?;
        ensure!(
            PgConnection::connect_with(&in_postgres).await.is_err(),
            "a tenant role still connects to `postgres`"
        );
        let public_create: bool =
            sqlx::query_scalar("SELECT has_schema_privilege('public', 'public', 'CREATE')")
                .fetch_one(&admin)
                .await?;
        ensure!(!public_create, "PUBLIC may still create in postgres.public");
        let calls: i64 = sqlx::query_scalar("SELECT count(*) FROM public.calls")
            .fetch_one(&admin)
            .await?;
        ensure!(calls == 0, "the controller ran a tenant's function");
        // The tenant's own database is unaffected.
        PgConnection::connect_with(&own_db).await?.close().await?;
        Ok(())
    })
    .await;
}

/// A DatabaseServer is cluster-scoped: whoever may create one must not be able to make the
/// controller read a Secret of any namespace. Admin Secrets are read only from the namespaces
/// the controller is given (the chart: its own, plus `controller.adminSecretNamespaces`).
#[tokio::test]
async fn admin_secrets_are_read_only_from_allowed_namespaces() {
    with_temp_ns("adminref", |ns| async move {
        let pg = PgServer::start()?;
        let elsewhere = TestNs::create(&format!("{}-other", ns.name)).await?;
        let outcome = async {
            let server = ns.server_name("pg");
            elsewhere
                .apply_ok(&format!(
                    "apiVersion: v1\nkind: Secret\nmetadata: {{name: admin}}\n\
                     stringData: {{username: {}, password: \"{}\"}}\n",
                    silo_e2e::postgres::ADMIN_USER,
                    pg.admin_password
                ))
                .await?;
            let yaml = format!(
                r#"apiVersion: silo.dev/v1alpha1
kind: DatabaseServer
metadata:
  name: {server}
  labels: {{{TEST_LABEL}: {ns}}}
spec:
  host: {host}
  port: {port}
  adminSecretRef: {{namespace: {other}, name: admin}}
"#,
                other = elsewhere.name,
                ns = ns.name,
                host = pg.host,
                port = pg.port,
            );
            ns.apply_ok(&yaml).await?;
            let _ctl = ns.start_controller(&[])?;
            let ready = wait_for("the server's Ready condition", READY_TIMEOUT, || async {
                let s = ns.servers().get(&server).await.ok()?;
                s.status?
                    .conditions
                    .into_iter()
                    .find(|c| c.type_ == "Ready")
            })
            .await?;
            ensure!(
                ready.status == "False" && ready.reason == "AdminSecretNotAllowed",
                "{} {}: {}",
                ready.status,
                ready.reason,
                ready.message
            );
            ensure!(
                ready.message.contains(&elsewhere.name) && ready.message.contains(&ns.name),
                "{}",
                ready.message
            );
            Ok(())
        }
        .await;
        elsewhere.cleanup().await;
        outcome
    })
    .await;
}

/// Two installs side by side that both see every Tenant (here: two controllers on one namespace,
/// each with its own server): each acts only on the Tenants placed on its own servers, and a
/// deletion policy is never skipped - the other install's controller used to take its "server
/// gone" path and drop the finalizer without dropping the database.
#[tokio::test]
async fn two_installs_each_act_only_on_their_own_tenants() {
    with_temp_ns("installs", |ns| async move {
        let (pg_a, pg_b) = (PgServer::start()?, PgServer::start()?);
        for (pool, pg) in [("a", &pg_a), ("b", &pg_b)] {
            let server = format!("{}-{pool}", ns.name);
            ns.add_server(&server, pg, "").await?;
            let out = ns
                .kubectl(&["label", "databaseserver", &server, &format!("pool={pool}")])
                .await?;
            ensure!(out.success, "{}", out.stderr);
        }
        let selector = |pool: &str| format!("{TEST_LABEL}={},pool={pool}", ns.name);
        let ctl_a = ns.start_controller(&["--server-selector", &selector("a")])?;
        let ctl_b = ns.start_controller(&["--server-selector", &selector("b")])?;
        let tenant = |name: &str, pool: &str| {
            tenant_yaml(
                name,
                &format!(
                    "  serverSelector: {{matchLabels: {{pool: {pool}}}}}\n  deletion: {{policy: Delete}}"
                ),
            )
        };
        ns.apply_ok(&[tenant("on-a", "a"), tenant("on-b", "b")].join("---\n"))
            .await?;
        let mut databases = Vec::new();
        for (name, pool, pg) in [("on-a", "a", &pg_a), ("on-b", "b", &pg_b)] {
            let t = ns.wait_phase(name, TenantPhase::Ready, READY_TIMEOUT).await?;
            let server = t.status.and_then(|s| s.server).unwrap_or_default();
            ensure!(server == format!("{}-{pool}", ns.name), "{name} placed on {server}");
            let db = ns.secret_value(name, "dbname").await?;
            ensure!(pg.exists(Catalog::Database, &db).await?);
            databases.push((pg, db));
        }

        // With install a's controller down, install b must not carry out - or skip - a's policy.
        let mut ctl_a = ctl_a;
        ctl_a.kill9();
        let left_alone = |log: String| log.matches("left alone").count();
        let before = left_alone(ctl_b.log_text());
        let out = ns
            .kubectl(&["delete", "tenant", "on-a", "on-b", "-n", &ns.name, "--wait=false"])
            .await?;
        ensure!(out.success, "{}", out.stderr);
        wait_for("install b to see on-a deleted", READY_TIMEOUT, || async {
            (left_alone(ctl_b.log_text()) > before).then_some(())
        })
        .await?;
        let on_a = ns.tenants().get("on-a").await?;
        ensure!(
            on_a.metadata.finalizers.is_some_and(|f| !f.is_empty()),
            "install b removed install a's finalizer"
        );
        let ctl_a = ns.start_controller(&["--server-selector", &selector("a")])?;
        for name in ["on-a", "on-b"] {
            wait_for(&format!("{name} to go"), READY_TIMEOUT, || async {
                ns.tenants().get_opt(name).await.ok()?.is_none().then_some(())
            })
            .await?;
        }
        for (pg, db) in databases {
            ensure!(
                !pg.exists(Catalog::Database, &db).await?,
                "database {db} survived its Tenant's policy Delete"
            );
        }
        // Each controller told the other's tenants apart with the rights the chart gives it
        // (reading a DatabaseServer by name).
        for ctl in [&ctl_a, &ctl_b] {
            let log = ctl.log_text();
            ensure!(!log.contains("forbidden"), "a controller lacked a right: {log}");
        }
        Ok(())
    })
    .await;
}

/// Sharding a fleet past one controller: two controllers side by side, each owning the
/// DatabaseServers its `--server-selector` picks and holding its own Lease (as two releases of
/// the chart would). Tenants that either shard could take race for a placement; each is
/// provisioned exactly once, on one shard, and its deletion follows its policy there.
#[tokio::test]
async fn shards_provision_every_tenant_exactly_once() {
    with_temp_ns("shards", |ns| async move {
        let pgs = [PgServer::start()?, PgServer::start()?];
        let shards = ["a", "b"];
        let server = |shard: &str| format!("{}-{shard}", ns.name);
        for (shard, pg) in shards.iter().zip(&pgs) {
            ns.add_server(&server(shard), pg, "").await?;
            let label = format!("shard={shard}");
            let out = ns.kubectl(&["label", "databaseserver", &server(shard), &label]).await?;
            ensure!(out.success, "{}", out.stderr);
        }
        // Each release's chart gives its controller its own Lease; here one Role in the test
        // namespace lets the chart's controller identity hold the two shards' Leases.
        let kubeconfig: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(&ns.env.controller_kubeconfig)?)?;
        let account = kubeconfig["users"][0]["name"].as_str().context("controller identity")?;
        ns.apply_ok(&format!(
            "apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: shard-leases}}
rules:
  - {{apiGroups: [coordination.k8s.io], resources: [leases], verbs: [create]}}
  - {{apiGroups: [coordination.k8s.io], resources: [leases], resourceNames: [shard-a, shard-b], verbs: [get, patch]}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: shard-leases}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: shard-leases}}
subjects: [{{kind: ServiceAccount, name: {account}, namespace: {}}}]
",
            ns.env.lease_namespace
        ))
        .await?;
        let start_shard = |shard: &str| {
            let selector = format!("{TEST_LABEL}={},shard={shard}", ns.name);
            let lease = format!("shard-{shard}");
            let identity = format!("shard-{shard}-0");
            ControllerProcess::start_with_env(
                &ns,
                None,
                &["--server-selector", &selector],
                &[
                    ("SILO_LEADER_ELECTION", "true"),
                    ("SILO_POD_NAME", &identity),
                    ("SILO_LEASE_NAMESPACE", &ns.name),
                    ("SILO_LEASE_NAME", &lease),
                ],
            )
        };
        let controllers = [start_shard("a")?, start_shard("b")?];

        // Twelve tenants either shard may take; half deleted with policy Delete, half Retain.
        let policy = |i: usize| if i.is_multiple_of(2) { "Delete" } else { "Retain" };
        let yaml: Vec<String> = (0..12)
            .map(|i| tenant_yaml(&format!("t{i}"), &format!("  deletion: {{policy: {}}}", policy(i))))
            .collect();
        ns.apply_ok(&yaml.join("---\n")).await?;
        let mut placed = Vec::new();
        for i in 0..12 {
            let name = format!("t{i}");
            let t = ns.wait_phase(&name, TenantPhase::Ready, READY_TIMEOUT).await?;
            let on = t.status.and_then(|s| s.server).unwrap_or_default();
            let shard = shards
                .iter()
                .position(|s| server(s) == on)
                .with_context(|| format!("{name} placed on {on}"))?;
            let db = ns.secret_value(&name, "dbname").await?;
            ensure!(pgs[shard].exists(Catalog::Database, &db).await?, "{db} missing on {on}");
            ensure!(
                !pgs[1 - shard].exists(Catalog::Database, &db).await?
                    && !pgs[1 - shard].exists(Catalog::Role, &db).await?,
                "{name} was provisioned on both shards"
            );
            placed.push((name, shard, db, policy(i)));
        }
        // Each shard holds its own Lease.
        for shard in shards {
            let lease = ns
                .kubectl(&["get", "lease", &format!("shard-{shard}"), "-n", &ns.name, "-o", "jsonpath={.spec.holderIdentity}"])
                .await?;
            ensure!(lease.stdout.trim() == format!("shard-{shard}-0"), "lease of shard {shard}: {} {}", lease.stdout, lease.stderr);
        }

        let out = ns.kubectl(&["delete", "tenants", "--all", "-n", &ns.name, "--wait=false"]).await?;
        ensure!(out.success, "{}", out.stderr);
        for (name, shard, db, policy) in &placed {
            wait_for(&format!("{name} to go"), READY_TIMEOUT, || async {
                ns.tenants().get_opt(name).await.ok()?.is_none().then_some(())
            })
            .await?;
            let kept = pgs[*shard].exists(Catalog::Database, db).await?;
            ensure!(kept == (*policy == "Retain"), "{name} (policy {policy}): database kept = {kept}");
            ensure!(!pgs[1 - shard].exists(Catalog::Database, db).await?, "{db} on the other shard");
        }
        for ctl in &controllers {
            let log = ctl.log_text();
            ensure!(!log.contains("forbidden"), "a shard lacked a right: {log}");
        }
        Ok(())
    })
    .await;
}

/// Any tenant may write any host into `spec.routing`: a second claim on a route used to win or
/// lose by name order, silently. The first claim (the older Tenant) keeps the route, in the
/// router's resolve API too, and both Tenants show the conflict (condition and Event).
#[tokio::test]
async fn a_claimed_route_stays_with_the_first_claim() {
    with_temp_ns("routes", |ns| async move {
        let pg = PgServer::start()?;
        ns.add_server(&ns.server_name("pg"), &pg, "").await?;
        let router = silo_e2e::RouterProcess::start(&ns, "transaction")?;
        let _ctl = ns.start_controller(&[])?;
        // "zeta" claims first; "alpha" comes later and would win by name.
        let routing = "  routing: {hosts: [shop.example.com]}";
        ns.apply_ok(&tenant_yaml("zeta", routing)).await?;
        ns.wait_phase("zeta", TenantPhase::Ready, READY_TIMEOUT)
            .await?;
        let zeta = ns.tenants().get("zeta").await?;
        // Creation times count in seconds: make the second claim a second later.
        wait_for("a new second", Duration::from_secs(5), || async {
            let now = k8s_openapi::jiff::Timestamp::now().as_second();
            let created = zeta.metadata.creation_timestamp.as_ref()?.0.as_second();
            (now > created).then_some(())
        })
        .await?;
        ns.apply_ok(&tenant_yaml("alpha", routing)).await?;
        ns.wait_phase("alpha", TenantPhase::Ready, READY_TIMEOUT)
            .await?;

        let routed = |tenant: &'static str, status: &'static str| {
            let ns = ns.clone();
            async move {
                wait_for(
                    &format!("{tenant} Routed={status}"),
                    READY_TIMEOUT,
                    || async {
                        let t = ns.tenants().get(tenant).await.ok()?;
                        let c = t
                            .status?
                            .conditions
                            .into_iter()
                            .find(|c| c.type_ == "Routed")?;
                        (c.status == status && c.reason != "Routed").then_some(c)
                    },
                )
                .await
            }
        };
        let lost = routed("alpha", "False").await?;
        ensure!(
            lost.reason == "RouteConflict",
            "{}: {}",
            lost.reason,
            lost.message
        );
        ensure!(
            lost.message.contains("host shop.example.com") && lost.message.contains("/zeta"),
            "{}",
            lost.message
        );
        let kept = routed("zeta", "True").await?;
        ensure!(
            kept.reason == "RouteContested",
            "{}: {}",
            kept.reason,
            kept.message
        );
        ensure!(kept.message.contains("/alpha"), "{}", kept.message);
        let events = ns
            .kubectl(&[
                "get",
                "events",
                "-n",
                &ns.name,
                "--field-selector",
                "reason=RouteConflict",
                "-o",
                "name",
            ])
            .await?;
        ensure!(
            events.stdout.lines().count() >= 2,
            "one RouteConflict Event per Tenant: {}",
            events.stdout
        );

        // The router agrees: the host resolves to the first claim.
        let body = wait_for("the router to resolve the host", READY_TIMEOUT, || async {
            let (code, body) = router
                .http_get("/v1/resolve?host=shop.example.com")
                .await
                .ok()?;
            (code == 200 && body.contains("\"tenant\"")).then_some(body)
        })
        .await?;
        let resolved: serde_json::Value = serde_json::from_str(&body)?;
        ensure!(
            resolved["tenant"]
                .as_str()
                .is_some_and(|t| t.ends_with("zeta")),
            "resolved to {body}"
        );
        Ok(())
    })
    .await;
}
