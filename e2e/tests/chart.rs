//! The Helm chart, `charts/silo`: it lints, what it renders is accepted by the real API server,
//! its schema rejects bad values, and it installs, upgrades and uninstalls Silo on the e2e node
//! (the controller and router really run in pods, with the chart's RBAC and nothing more).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams};
use silo_crds::TenantPhase;
use silo_e2e::kube_env::with_temp_ns;
use silo_e2e::node::{self, EnvFrom, JobOutcome};
use silo_e2e::{PgServer, TestNs, wait_for};
use sqlx::{Connection, PgConnection};

const TIMEOUT: Duration = Duration::from_secs(180);
const CRDS: [&str; 2] = ["tenants.silo.dev", "databaseservers.silo.dev"];

fn chart() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/silo")
        .display()
        .to_string()
}

fn tenant_yaml(name: &str) -> String {
    format!("apiVersion: silo.dev/v1alpha1\nkind: Tenant\nmetadata: {{name: {name}}}\nspec: {{}}\n")
}

/// Values for a release in the test namespace: the node's image, a controller that sees only this
/// test's namespace and servers (other tests run side by side with their own controllers), and Job
/// settings, which the controller must accept at start.
fn e2e_values(ns: &TestNs) -> anyhow::Result<String> {
    let image = node::image()?;
    let (repository, tag) = image.rsplit_once(':').context("image without a tag")?;
    let dir = std::env::var_os("SILO_E2E_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("silo-chart-values-{}.yaml", ns.name));
    std::fs::write(
        &path,
        format!(
            "image: {{repository: {repository}, tag: {tag}, pullPolicy: Never}}\n\
             controller:\n  logFormat: plain\n  resyncInterval: 5\n  watchNamespace: {ns}\n  \
             serverSelector: \"silo.dev/e2e-ns={ns}\"\n\
             router:\n  replicas: 1\n\
             jobs:\n  nodeSelector: {{pool: jobs}}\n  podLabels: {{team: db}}\n  \
             tolerations: [{{key: dedicated, operator: Exists, effect: NoSchedule}}]\n  \
             resources: {{limits: {{memory: 256Mi}}}}\n",
            ns = ns.name
        ),
    )?;
    Ok(path.display().to_string())
}

/// Names of the release's pods of one component.
async fn pods(ns: &TestNs, component: &str) -> anyhow::Result<Vec<Pod>> {
    let api: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let selector =
        format!("app.kubernetes.io/instance=silo,app.kubernetes.io/component={component}");
    Ok(api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items)
}

/// Equal as YAML data: numbers compare by value (Helm's `toYaml` writes `10000.0` as `10000`).
fn same_yaml(a: &serde_yaml::Value, b: &serde_yaml::Value) -> bool {
    use serde_yaml::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Sequence(x), Value::Sequence(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_yaml(x, y))
        }
        (Value::Mapping(x), Value::Mapping(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_yaml(v, w)))
        }
        _ => a == b,
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_names(pods: &[Pod]) -> BTreeSet<String> {
    pods.iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_lints_and_the_api_server_accepts_what_it_renders() {
    with_temp_ns("chart-render", |ns: TestNs| async move {
        let chart = chart();
        let lint = ns.helm(&["lint", "--strict", &chart]).await?;
        ensure!(lint.success, "helm lint: {}{}", lint.stdout, lint.stderr);

        // Everything on that this cluster can take (it has no ServiceMonitor CRD).
        let rendered = ns
            .helm(&[
                "template", "silo", &chart, "--namespace", &ns.name,
                "--set", "router.replicas=2,router.tls.secretName=router-tls,router.tls.sniDomain=db.example.com",
                "--set", "jobs.hostNetwork=true,jobs.nodeSelector.pool=jobs,controller.replicas=2",
                "--set",
                &format!("controller.watchNamespace={}", ns.name),
            ])
            .await?;
        ensure!(rendered.success, "helm template: {}", rendered.stderr);
        for kind in [
            "kind: CustomResourceDefinition", "kind: Deployment", "kind: ClusterRole",
            "kind: Role", "kind: PodDisruptionBudget", "kind: Service", "kind: ConfigMap",
        ] {
            ensure!(rendered.stdout.contains(kind), "the chart renders no {kind}");
        }
        let dry_run = ns
            .kubectl_stdin(
                &["apply", "--dry-run=server", "-n", &ns.name, "-f", "-"],
                Some(&rendered.stdout),
            )
            .await?;
        ensure!(dry_run.success, "server-side dry run: {}", dry_run.stderr);
        ensure!(
            dry_run.stdout.contains("deployment.apps/silo-controller")
                && dry_run.stdout.contains("(server dry run)"),
            "{}",
            dry_run.stdout
        );

        // The CRDs are the generated ones, not copies that could drift.
        let documents: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&rendered.stdout)
            .map(serde::Deserialize::deserialize)
            .collect::<Result<_, _>>()?;
        for crd in CRDS {
            let file = std::fs::read_to_string(format!("{}/files/crds/{crd}.yaml", chart))?;
            let generated: serde_yaml::Value = serde_yaml::from_str(&file)?;
            let rendered = documents
                .iter()
                .find(|d| d["kind"] == "CustomResourceDefinition" && d["metadata"]["name"] == crd)
                .with_context(|| format!("{crd} not rendered"))?;
            ensure!(
                same_yaml(&rendered["spec"], &generated["spec"]),
                "{crd} differs from files/crds"
            );
            ensure!(
                rendered["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep",
                "{crd} must survive helm uninstall"
            );
        }
        let without = ns
            .helm(&["template", "silo", &chart, "--set", "crds.create=false"])
            .await?;
        ensure!(without.success && !without.stdout.contains("CustomResourceDefinition"));

        // Wrong values are refused, naming the key.
        for (set, key) in [
            ("controller.replicas=-1", "replicas"),
            ("controller.replicas=two", "replicas"),
            ("jobs.hostNetwork=yes", "hostNetwork"),
            ("controler.replicas=1", "controler"),
            ("router.poolMode=statement", "poolMode"),
        ] {
            let out = ns.helm(&["template", "silo", &chart, "--set", set]).await?;
            ensure!(!out.success, "--set {set} was accepted");
            ensure!(out.stderr.contains(key), "--set {set}: {}", out.stderr);
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_installs_upgrades_and_uninstalls_silo() {
    if !node::own_cluster("the_chart_installs_upgrades_and_uninstalls_silo") {
        return;
    }
    with_temp_ns("chart-install", |ns: TestNs| async move {
        let chart = chart();
        let values = e2e_values(&ns)?;
        let pg = PgServer::start()?;
        ns.add_server(&ns.server_name("pg"), &pg, "").await?;

        // The CRDs exist already (the harness applied them); the release adopts them, as a
        // cluster moving its CRDs under Helm does.
        for crd in CRDS {
            let release = format!("meta.helm.sh/release-namespace={}", ns.name);
            for args in [
                vec![
                    "annotate",
                    "--overwrite",
                    "crd",
                    crd,
                    "meta.helm.sh/release-name=silo",
                    &release,
                ],
                vec![
                    "label",
                    "--overwrite",
                    "crd",
                    crd,
                    "app.kubernetes.io/managed-by=Helm",
                ],
            ] {
                let out = ns.kubectl(&args).await?;
                ensure!(out.success, "kubectl {}: {}", args.join(" "), out.stderr);
            }
        }

        let install = ns
            .helm(&[
                "install",
                "silo",
                &chart,
                "--namespace",
                &ns.name,
                "-f",
                &values,
                "--wait",
                "--timeout",
                "180s",
            ])
            .await?;
        ensure!(
            install.success,
            "helm install: {}{}",
            install.stdout,
            install.stderr
        );
        ensure!(
            install.stdout.contains("kind: Tenant"),
            "NOTES.txt: {}",
            install.stdout
        );
        let controllers = pods(&ns, "controller").await?;
        ensure!(
            controllers.len() == 1 && is_ready(&controllers[0]),
            "one Ready controller pod: {:?}",
            pod_names(&controllers)
        );
        let routers = pods(&ns, "router").await?;
        ensure!(
            routers.len() == 1 && is_ready(&routers[0]),
            "one Ready router pod: {:?}",
            pod_names(&routers)
        );

        // The controller in its pod, with the chart's RBAC, provisions a tenant.
        ns.apply_ok(&tenant_yaml("acme")).await?;
        ns.wait_phase("acme", TenantPhase::Ready, TIMEOUT).await?;
        let router_uri = ns.secret_value("acme", "router-uri").await?;
        let (_, router_address) = router_uri.split_once('@').context("router-uri")?;
        ensure!(
            router_address == format!("silo-router.{ns}.svc:6432/{ns}.acme", ns = ns.name),
            "router-uri points at {router_address}"
        );
        let mut conn = PgConnection::connect(&ns.secret_value("acme", "uri").await?).await?;
        sqlx::raw_sql("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('before uninstall')")
            .execute(&mut conn)
            .await?;
        conn.close().await?;

        // A pod reaches acme through the router's Service (ClusterIP, kube-proxy, router pod).
        let services: Api<Service> = Api::namespaced(ns.client.clone(), &ns.name);
        let router_ip = services
            .get("silo-router")
            .await?
            .spec
            .and_then(|s| s.cluster_ip)
            .context("router Service without a ClusterIP")?;
        let database = format!("{}.acme", ns.name);
        let (outcome, logs) = node::run_job(
            &ns,
            "via-router",
            &[
                "psql",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                "SELECT v FROM kept",
            ],
            &[
                ("PGHOST", EnvFrom::Value(&router_ip)),
                ("PGPORT", EnvFrom::Value("6432")),
                ("PGDATABASE", EnvFrom::Value(&database)),
                ("PGUSER", EnvFrom::Secret("acme-db", "user")),
                ("PGPASSWORD", EnvFrom::Secret("acme-db", "password")),
            ],
        )
        .await?;
        ensure!(outcome == JobOutcome::Complete, "{outcome:?}: {logs}");
        ensure!(
            logs.trim() == "before uninstall",
            "through the router: {logs}"
        );

        // An upgrade with a changed value rolls the controller pod; the new one works.
        let before = pod_names(&pods(&ns, "controller").await?);
        let upgrade = ns
            .helm(&[
                "upgrade",
                "silo",
                &chart,
                "--namespace",
                &ns.name,
                "-f",
                &values,
                "--set",
                "controller.logLevel=info\\,silo_controller=debug",
                "--wait",
                "--timeout",
                "180s",
            ])
            .await?;
        ensure!(upgrade.success, "helm upgrade: {}", upgrade.stderr);
        wait_for(
            "the upgraded controller pod alone, Ready",
            TIMEOUT,
            || async {
                let now = pods(&ns, "controller").await.ok()?;
                let names = pod_names(&now);
                (now.len() == 1 && is_ready(&now[0]) && names.is_disjoint(&before)).then_some(())
            },
        )
        .await?;
        let env = pods(&ns, "controller").await?[0]
            .spec
            .as_ref()
            .map(|s| s.containers[0].env.clone());
        ensure!(
            format!("{env:?}").contains("silo_controller=debug"),
            "the new pod runs with the new value"
        );
        ns.apply_ok(&tenant_yaml("globex")).await?;
        ns.wait_phase("globex", TenantPhase::Ready, TIMEOUT).await?;

        // Uninstall: Silo's pods go; CRDs, Tenants, databases and data stay.
        let uninstall = ns
            .helm(&[
                "uninstall",
                "silo",
                "--namespace",
                &ns.name,
                "--wait",
                "--timeout",
                "120s",
            ])
            .await?;
        ensure!(uninstall.success, "helm uninstall: {}", uninstall.stderr);
        wait_for("the release's pods to go", TIMEOUT, || async {
            let left =
                pods(&ns, "controller").await.ok()?.len() + pods(&ns, "router").await.ok()?.len();
            (left == 0).then_some(())
        })
        .await?;
        for crd in CRDS {
            let out = ns.kubectl(&["get", "crd", crd]).await?;
            ensure!(out.success, "CRD {crd} was removed by helm uninstall");
        }
        for tenant in ["acme", "globex"] {
            ensure!(
                ns.tenants().get_opt(tenant).await?.is_some(),
                "Tenant {tenant} is gone"
            );
        }
        let mut conn = PgConnection::connect(&ns.secret_value("acme", "uri").await?).await?;
        let kept: String = sqlx::query_scalar("SELECT v FROM kept")
            .fetch_one(&mut conn)
            .await?;
        ensure!(kept == "before uninstall");
        let names = vec![
            ns.secret_value("acme", "dbname").await?,
            ns.secret_value("globex", "dbname").await?,
        ];
        let admin = pg.admin_pool().await?;
        let databases: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = ANY($1)")
                .bind(&names)
                .fetch_one(&admin)
                .await?;
        if databases != 2 {
            bail!("expected both tenant databases after uninstall, found {databases}");
        }
        Ok(())
    })
    .await;
}
