//! The Helm chart, `charts/silo`: it lints, what it renders is accepted by the real API server,
//! its schema rejects bad values, its RBAC grants least privilege and lets releases share a
//! cluster, and it installs, upgrades and uninstalls Silo on the e2e node (the controller and
//! router really run in pods, with the chart's RBAC and nothing more), also as two releases of
//! one name side by side.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams};
use serde_yaml::Value;
use silo_crds::{Tenant, TenantPhase};
use silo_e2e::kube_env::{TEST_LABEL, with_temp_ns};
use silo_e2e::node::{self, EnvFrom, JobOutcome};
use silo_e2e::{PgServer, TestNs, tenant_yaml, wait_for};
use sqlx::{Connection, PgConnection, PgPool};

const TIMEOUT: Duration = Duration::from_secs(180);
/// Every CRD the chart carries, from the types (`silo_crds::all`), so that a new kind is never
/// missed.
fn crds() -> Vec<String> {
    silo_crds::all()
        .into_iter()
        .filter_map(|crd| crd.metadata.name)
        .collect()
}

/// The CRDs belong to one release at a time: the tests that put them under a release of their
/// own take turns.
static CRD_OWNER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The chart under test: `charts/silo`, or `SILO_E2E_CHART` (e.g. an older version of it, unpacked
/// with `git archive`, to see a test fail on it).
fn chart() -> String {
    std::env::var("SILO_E2E_CHART").unwrap_or_else(|_| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../charts/silo")
            .display()
            .to_string()
    })
}

/// Writes a values file for a release in `ns`: the node's image, then `rest`; returns its path.
fn values_file(ns: &TestNs, rest: &str) -> anyhow::Result<String> {
    let image = node::image()?;
    let (repository, tag) = image.rsplit_once(':').context("image without a tag")?;
    let dir = std::env::var_os("SILO_E2E_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("silo-chart-values-{}.yaml", ns.name));
    std::fs::write(
        &path,
        format!("image: {{repository: {repository}, tag: {tag}, pullPolicy: Never}}\n{rest}"),
    )?;
    Ok(path.display().to_string())
}

/// Values for a release in the test namespace: a controller that sees only this test's namespace
/// and servers (other tests run side by side with their own controllers), and Job settings, which
/// the controller must accept at start.
fn e2e_values(ns: &TestNs) -> anyhow::Result<String> {
    values_file(
        ns,
        &format!(
            "controller:\n  logFormat: plain\n  resyncInterval: 5\n  watchNamespace: {ns}\n  \
             serverSelector: \"{TEST_LABEL}={ns}\"\n\
             router:\n  replicas: 1\n\
             jobs:\n  nodeSelector: {{pool: jobs}}\n  podLabels: {{team: db}}\n  \
             tolerations: [{{key: dedicated, operator: Exists, effect: NoSchedule}}]\n  \
             resources: {{limits: {{memory: 256Mi}}}}\n",
            ns = ns.name
        ),
    )
}

/// Puts the CRDs, which the harness applied, under the release `silo` in `ns`, as a cluster
/// moving its CRDs under Helm does; the release's install then adopts them. Hold `CRD_OWNER`.
async fn adopt_crds(ns: &TestNs) -> anyhow::Result<()> {
    let release = format!("meta.helm.sh/release-namespace={}", ns.name);
    for crd in crds() {
        let crd = crd.as_str();
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
    Ok(())
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

/// `helm uninstall` of the release `silo` in `ns`, waiting for its objects to go.
fn uninstall_args(ns: &TestNs) -> [&str; 7] {
    [
        "uninstall",
        "silo",
        "--namespace",
        &ns.name,
        "--wait",
        "--timeout",
        "120s",
    ]
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
                "--set", "controller.adminSecretNamespaces={default},controller.tenantSelector=silo.dev/install=acme",
            ])
            .await?;
        ensure!(rendered.success, "helm template: {}", rendered.stderr);
        for kind in [
            "kind: CustomResourceDefinition", "kind: Deployment", "kind: ClusterRole",
            "kind: Role", "kind: PodDisruptionBudget", "kind: Service", "kind: ConfigMap",
        ] {
            ensure!(rendered.stdout.contains(kind), "the chart renders no {kind}");
        }
        // Each object goes to the namespace it names: the test's, and `default` (admin Secrets).
        let dry_run = ns
            .kubectl_stdin(
                &["apply", "--dry-run=server", "-f", "-"],
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
        for crd in crds() {
            let crd = crd.as_str();
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
            ("router.namespaces=apps", "namespaces"),
            ("controller.adminSecretNamespaces={Databases}", "adminSecretNamespaces"),
        ] {
            let out = ns.helm(&["template", "silo", &chart, "--set", set]).await?;
            ensure!(!out.success, "--set {set} was accepted");
            ensure!(out.stderr.contains(key), "--set {set}: {}", out.stderr);
        }
        Ok(())
    })
    .await;
}

/// `helm template silo <chart> --namespace <namespace> --set …`, parsed: one value per object.
/// Needs helm only (`SILO_HELM`, else `helm` on the PATH), no cluster.
fn render(namespace: &str, sets: &[&str]) -> anyhow::Result<Vec<Value>> {
    let helm = std::env::var_os("SILO_HELM").unwrap_or_else(|| "helm".into());
    let chart = chart();
    let mut args = vec!["template", "silo", &chart, "--namespace", namespace];
    for set in sets {
        args.extend(["--set", set]);
    }
    let out = Command::new(&helm)
        .args(&args)
        .output()
        .with_context(|| format!("running {}", helm.to_string_lossy()))?;
    ensure!(
        out.status.success(),
        "helm template --namespace {namespace}, {}: {}",
        described(sets),
        String::from_utf8_lossy(&out.stderr)
    );
    let documents: Vec<Value> = serde_yaml::Deserializer::from_slice(&out.stdout)
        .map(serde::Deserialize::deserialize)
        .collect::<Result<_, _>>()?;
    Ok(documents.into_iter().filter(|d| !d.is_null()).collect())
}

/// How a render was made, for messages: `--set a --set b`, or `default values`.
fn described(sets: &[&str]) -> String {
    if sets.is_empty() {
        "default values".to_string()
    } else {
        format!("--set {}", sets.join(" --set "))
    }
}

fn str_of<'a>(value: &'a Value, path: &[&str]) -> &'a str {
    path.iter()
        .fold(value, |v, key| &v[*key])
        .as_str()
        .unwrap_or("")
}

fn kind(object: &Value) -> &str {
    str_of(object, &["kind"])
}

fn name(object: &Value) -> &str {
    str_of(object, &["metadata", "name"])
}

/// The namespace an object names; empty for a cluster-scoped one.
fn namespace(object: &Value) -> &str {
    str_of(object, &["metadata", "namespace"])
}

/// `controller` or `router`.
fn component(object: &Value) -> &str {
    str_of(
        object,
        &["metadata", "labels", "app.kubernetes.io/component"],
    )
}

/// Whether a role's rule lets its subject use `verb` on `resource` (wildcards included).
fn grants(rule: &Value, resource: &str, verb: &str) -> bool {
    let has = |key: &str, wanted: &str| {
        rule[key]
            .as_sequence()
            .is_some_and(|items| items.iter().any(|i| i == wanted || i == "*"))
    };
    has("resources", resource) && has("verbs", verb)
}

/// The (kind, namespace, name) of every role of `component` with a rule granting `verb` on
/// `resource`; the namespace is empty for a ClusterRole.
fn roles_granting(
    objects: &[Value],
    component_: &str,
    resource: &str,
    verb: &str,
) -> BTreeSet<(String, String, String)> {
    objects
        .iter()
        .filter(|o| matches!(kind(o), "Role" | "ClusterRole") && component(o) == component_)
        .filter(|o| {
            o["rules"]
                .as_sequence()
                .is_some_and(|rules| rules.iter().any(|r| grants(r, resource, verb)))
        })
        .map(|o| {
            (
                kind(o).to_string(),
                namespace(o).to_string(),
                name(o).to_string(),
            )
        })
        .collect()
}

/// Fails unless a binding of the same kind, namespace and name binds `role` to the ServiceAccount
/// `account` of the release namespace.
fn ensure_bound(
    objects: &[Value],
    (role_kind, role_ns, role_name): &(String, String, String),
    account: &str,
    release_ns: &str,
) -> anyhow::Result<()> {
    let binding_kind = format!("{role_kind}Binding");
    let bound = objects.iter().any(|o| {
        kind(o) == binding_kind
            && namespace(o) == role_ns
            && name(o) == role_name
            && str_of(o, &["roleRef", "kind"]) == role_kind
            && str_of(o, &["roleRef", "name"]) == role_name
            && o["subjects"].as_sequence().is_some_and(|subjects| {
                subjects.iter().any(|s| {
                    str_of(s, &["kind"]) == "ServiceAccount"
                        && str_of(s, &["name"]) == account
                        && str_of(s, &["namespace"]) == release_ns
                })
            })
    });
    ensure!(
        bound,
        "no {binding_kind} binds {role_kind} {role_ns}/{role_name} to {release_ns}/{account}"
    );
    Ok(())
}

/// The plain `value`s of the environment of a component's Deployment.
fn deployment_env(objects: &[Value], component_: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let deployment = objects
        .iter()
        .find(|o| kind(o) == "Deployment" && component(o) == component_)
        .with_context(|| format!("no {component_} Deployment rendered"))?;
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_sequence()
        .cloned()
        .unwrap_or_default();
    Ok(env
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["value"].as_str()?.to_string(),
            ))
        })
        .collect())
}

#[test]
fn two_releases_of_one_name_in_two_namespaces_claim_no_object_twice() -> anyhow::Result<()> {
    // Two ways of sharing a cluster: controllers over all namespaces, told apart by selectors;
    // and controllers that also share the namespaces they watch and read Secrets in.
    let shared = [
        "controller.watchNamespace=apps",
        "controller.adminSecretNamespaces={databases}",
        "router.namespaces={apps,web}",
    ];
    for sets in [&[][..], &shared[..]] {
        let keys = |release_ns: &str| -> anyhow::Result<BTreeSet<(String, String, String)>> {
            Ok(render(release_ns, sets)?
                .iter()
                // The CRDs are shared on purpose: only one release installs them.
                .filter(|o| kind(o) != "CustomResourceDefinition")
                .map(|o| {
                    (
                        kind(o).to_string(),
                        namespace(o).to_string(),
                        name(o).to_string(),
                    )
                })
                .collect())
        };
        let (a, b) = (keys("team-a")?, keys("team-b")?);
        let cluster_scoped: Vec<_> = a.iter().filter(|(_, ns, _)| ns.is_empty()).collect();
        ensure!(
            cluster_scoped.len() >= 4,
            "ClusterRoles and ClusterRoleBindings of both components: {cluster_scoped:?}"
        );
        let both: Vec<_> = a.intersection(&b).collect();
        ensure!(
            both.is_empty(),
            "releases `silo` in team-a and team-b ({}) both claim {both:?}: the second \
             install would fail",
            described(sets)
        );
    }
    Ok(())
}

#[test]
fn the_router_reads_tenants_and_secrets_only_in_its_namespaces() -> anyhow::Result<()> {
    let release_ns = "silo";
    let account = "silo-router";
    for (sets, namespaces) in [
        (&["controller.watchNamespace=w"][..], "w"),
        (&["router.namespaces={x,y}"][..], "x,y"),
        (
            &["controller.watchNamespace=w", "router.namespaces={x,y}"][..],
            "x,y",
        ),
    ] {
        let objects = render(release_ns, sets)?;
        let context = described(sets);
        let cluster_wide: Vec<_> = ["secrets", "tenants"]
            .into_iter()
            .flat_map(|resource| {
                ["get", "list", "watch"].map(|verb| {
                    (
                        resource,
                        verb,
                        roles_granting(&objects, "router", resource, verb),
                    )
                })
            })
            .filter(|(_, _, roles)| roles.iter().any(|(kind, _, _)| kind == "ClusterRole"))
            .map(|(resource, verb, _)| format!("{verb} {resource}"))
            .collect();
        ensure!(
            cluster_wide.is_empty(),
            "{context}: the router's ClusterRole grants {cluster_wide:?} in every namespace"
        );
        let servers = roles_granting(&objects, "router", "databaseservers", "watch");
        ensure!(
            servers.iter().any(|(kind, _, _)| kind == "ClusterRole"),
            "{context}: the router cannot watch DatabaseServers"
        );
        for resource in ["secrets", "tenants"] {
            for verb in ["list", "watch"] {
                let roles = roles_granting(&objects, "router", resource, verb);
                let in_namespaces: BTreeSet<&str> =
                    roles.iter().map(|(_, ns, _)| ns.as_str()).collect();
                ensure!(
                    in_namespaces == namespaces.split(',').collect(),
                    "{context}: the router may {verb} {resource} in {in_namespaces:?}, \
                     not in exactly {namespaces}"
                );
                for role in &roles {
                    ensure_bound(&objects, role, account, release_ns)?;
                }
            }
        }
        let env = deployment_env(&objects, "router")?;
        ensure!(
            env.get("SILO_ROUTER_NAMESPACES").map(String::as_str) == Some(namespaces),
            "{context}: SILO_ROUTER_NAMESPACES is {:?}",
            env.get("SILO_ROUTER_NAMESPACES")
        );
    }

    // Without namespaces the router serves every namespace, and its ClusterRole says so.
    let objects = render(release_ns, &[])?;
    ensure!(!deployment_env(&objects, "router")?.contains_key("SILO_ROUTER_NAMESPACES"));
    let secrets = roles_granting(&objects, "router", "secrets", "watch");
    ensure!(
        secrets.iter().any(|(kind, _, _)| kind == "ClusterRole"),
        "by default the router watches Secrets in every namespace: {secrets:?}"
    );
    Ok(())
}

#[test]
fn the_controller_reads_secrets_only_where_it_must_and_deletes_none() -> anyhow::Result<()> {
    let release_ns = "silo";
    let account = "silo-controller";

    // No rule anywhere deletes a Secret: tenant Secrets go with their Tenant (garbage collection).
    for sets in [
        &[][..],
        &["controller.watchNamespace=w"][..],
        &[
            "controller.watchNamespace=w",
            "controller.adminSecretNamespaces={db}",
        ][..],
        &["router.namespaces={x}"][..],
    ] {
        let objects = render(release_ns, sets)?;
        for component_ in ["controller", "router"] {
            let deleting = roles_granting(&objects, component_, "secrets", "delete");
            ensure!(
                deleting.is_empty(),
                "{}: the {component_} may delete Secrets through {deleting:?}",
                described(sets)
            );
        }
    }

    // With a watched namespace, no ClusterRole reads a Secret: the tenant Secrets are read in the
    // watched namespace, the admin Secrets in the release namespace and the ones listed.
    let objects = render(release_ns, &["controller.watchNamespace=w"])?;
    let mut cluster_wide = BTreeSet::new();
    for component_ in ["controller", "router"] {
        for verb in ["get", "list", "watch", "create", "patch"] {
            for (kind, _, name) in roles_granting(&objects, component_, "secrets", verb) {
                if kind == "ClusterRole" {
                    cluster_wide.insert(format!("{verb} in ClusterRole {name}"));
                }
            }
        }
    }
    ensure!(
        cluster_wide.is_empty(),
        "with controller.watchNamespace, Secrets in every namespace: {cluster_wide:?}"
    );

    let objects = render(
        release_ns,
        &[
            "controller.watchNamespace=w",
            "controller.adminSecretNamespaces={db,silo,pg}",
        ],
    )?;
    let getting = roles_granting(&objects, "controller", "secrets", "get");
    let in_namespaces: BTreeSet<&str> = getting.iter().map(|(_, ns, _)| ns.as_str()).collect();
    ensure!(
        in_namespaces == BTreeSet::from(["w", "silo", "db", "pg"]),
        "the controller may get Secrets in {in_namespaces:?}"
    );
    for role in &getting {
        ensure!(role.0 == "Role", "{role:?} is cluster-wide");
        ensure_bound(&objects, role, account, release_ns)?;
    }
    // Only the tenants' namespace lets it write or list Secrets, and the release namespace
    // create the login Secrets of final backups.
    for (verb, expected) in [
        ("list", &["w"][..]),
        ("watch", &["w"]),
        ("create", &["silo", "w"]),
        ("patch", &["w"]),
    ] {
        let roles = roles_granting(&objects, "controller", "secrets", verb);
        let in_namespaces: Vec<&str> = roles.iter().map(|(_, ns, _)| ns.as_str()).collect();
        ensure!(
            in_namespaces == expected,
            "the controller may {verb} Secrets in {in_namespaces:?}"
        );
    }

    // All namespaces: the tenant Secrets may be in any, so the rights are cluster-wide.
    let objects = render(release_ns, &[])?;
    for verb in ["get", "list", "watch", "create", "patch"] {
        let roles = roles_granting(&objects, "controller", "secrets", verb);
        ensure!(
            roles.iter().any(|(kind, _, _)| kind == "ClusterRole"),
            "the controller of all namespaces cannot {verb} Secrets: {roles:?}"
        );
    }
    Ok(())
}

/// A Snapshot deletion keeps its final backup in the release namespace: with a watched
/// namespace elsewhere, a Role there grants what the final backup takes, bound to the controller.
#[test]
fn final_backups_may_be_made_in_the_release_namespace() -> anyhow::Result<()> {
    let (release_ns, account) = ("silo", "silo-controller");
    for sets in [&[][..], &["controller.watchNamespace=w"][..]] {
        let objects = render(release_ns, sets)?;
        for (resource, verb) in [
            ("tenantbackups", "get"),
            ("tenantbackups", "list"),
            ("tenantbackups", "delete"),
            ("tenantbackups", "create"),
            ("tenantbackups", "patch"),
            ("tenantbackups/status", "patch"),
            ("jobs", "get"),
            ("jobs", "list"),
            ("jobs", "create"),
            ("jobs", "delete"),
            ("secrets", "get"),
            ("secrets", "create"),
            ("pods", "list"),
        ] {
            let roles = roles_granting(&objects, "controller", resource, verb);
            let here: Vec<_> = roles
                .iter()
                .filter(|(kind, ns, _)| kind == "ClusterRole" || ns == release_ns)
                .collect();
            ensure!(
                !here.is_empty(),
                "{}: the controller may not {verb} {resource} in {release_ns}: {roles:?}",
                described(sets)
            );
            for role in here {
                ensure_bound(&objects, role, account, release_ns)?;
            }
        }
    }
    Ok(())
}

#[test]
fn the_controller_is_told_its_tenant_selector_and_admin_secret_namespaces() -> anyhow::Result<()> {
    let env = deployment_env(&render("silo", &[])?, "controller")?;
    ensure!(
        env.get("SILO_ADMIN_SECRET_NAMESPACES").map(String::as_str) == Some("silo"),
        "admin Secrets only in the release namespace by default: {:?}",
        env.get("SILO_ADMIN_SECRET_NAMESPACES")
    );
    ensure!(
        !env.contains_key("SILO_TENANT_SELECTOR"),
        "no tenant selector by default: {:?}",
        env.get("SILO_TENANT_SELECTOR")
    );

    let env = deployment_env(
        &render(
            "silo",
            &[
                "controller.adminSecretNamespaces={db,silo,pg}",
                "controller.tenantSelector=silo.dev/install!=acme",
            ],
        )?,
        "controller",
    )?;
    ensure!(
        env.get("SILO_ADMIN_SECRET_NAMESPACES").map(String::as_str) == Some("silo,db,pg"),
        "SILO_ADMIN_SECRET_NAMESPACES: {:?}",
        env.get("SILO_ADMIN_SECRET_NAMESPACES")
    );
    ensure!(
        env.get("SILO_TENANT_SELECTOR").map(String::as_str) == Some("silo.dev/install!=acme"),
        "SILO_TENANT_SELECTOR: {:?}",
        env.get("SILO_TENANT_SELECTOR")
    );
    Ok(())
}

#[test]
fn the_router_is_told_its_login_cap_and_whether_tls_is_required() -> anyhow::Result<()> {
    let env = deployment_env(&render("silo", &[])?, "router")?;
    ensure!(
        env.get("SILO_ROUTER_MAX_LOGINS").map(String::as_str) == Some("256")
            && !env.contains_key("SILO_ROUTER_REQUIRE_TLS"),
        "defaults: {env:?}"
    );
    let sets = [
        "router.maxLoginsInProgress=1000",
        "router.tls.secretName=router-tls,router.tls.require=true",
    ];
    let env = deployment_env(&render("silo", &sets)?, "router")?;
    ensure!(
        env.get("SILO_ROUTER_MAX_LOGINS").map(String::as_str) == Some("1000")
            && env.get("SILO_ROUTER_REQUIRE_TLS").map(String::as_str) == Some("true"),
        "{}: {env:?}",
        described(&sets)
    );
    let refused = render("silo", &["router.tls.require=true"]).err();
    ensure!(
        refused.is_some_and(|e| e.to_string().contains("needs router.tls.secretName")),
        "TLS required without a certificate was rendered"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_installs_upgrades_and_uninstalls_silo() {
    if !node::own_cluster("the_chart_installs_upgrades_and_uninstalls_silo") {
        return;
    }
    let _crds = CRD_OWNER.lock().await;
    with_temp_ns("chart-install", |ns: TestNs| async move {
        let chart = chart();
        let values = e2e_values(&ns)?;
        let pg = PgServer::start()?;
        ns.add_server(&ns.server_name("pg"), &pg, "").await?;

        // The CRDs exist already (the harness applied them); the release adopts them.
        adopt_crds(&ns).await?;

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
        ns.apply_ok(&tenant_yaml("acme", "  {}")).await?;
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
        ns.apply_ok(&tenant_yaml("globex", "  {}")).await?;
        ns.wait_phase("globex", TenantPhase::Ready, TIMEOUT).await?;

        // Uninstall: Silo's pods go; CRDs, Tenants, databases and data stay.
        let uninstall = ns.helm(&uninstall_args(&ns)).await?;
        ensure!(uninstall.success, "helm uninstall: {}", uninstall.stderr);
        wait_for("the release's pods to go", TIMEOUT, || async {
            let left =
                pods(&ns, "controller").await.ok()?.len() + pods(&ns, "router").await.ok()?.len();
            (left == 0).then_some(())
        })
        .await?;
        for crd in crds() {
            let out = ns.kubectl(&["get", "crd", &crd]).await?;
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

/// Label telling the two releases' Tenants apart in the shared-cluster test.
const INSTALL_LABEL: &str = "silo.dev/e2e-install";

/// Values for one of two releases sharing the cluster: a controller over all namespaces that
/// takes only the Tenants labelled for this release, and only this namespace's servers (so that it
/// never touches the Tenants and servers of tests running beside it); no router.
fn shared_cluster_values(ns: &TestNs, crds: bool) -> anyhow::Result<String> {
    values_file(
        ns,
        &format!(
            "crds: {{create: {crds}}}\n\
             controller:\n  logFormat: plain\n  resyncInterval: 5\n  \
             serverSelector: \"{TEST_LABEL}={ns}\"\n  tenantSelector: \"{INSTALL_LABEL}={ns}\"\n\
             router: {{enabled: false}}\n",
            ns = ns.name
        ),
    )
}

/// Databases on a server, but for `postgres` and the templates.
async fn databases(admin: &PgPool) -> anyhow::Result<BTreeSet<String>> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT datname FROM pg_database WHERE NOT datistemplate AND datname <> 'postgres'",
    )
    .fetch_all(admin)
    .await?;
    Ok(names.into_iter().collect())
}

async fn role_exists(admin: &PgPool, role: &str) -> anyhow::Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
            .bind(role)
            .fetch_one(admin)
            .await?,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_releases_of_one_name_share_a_cluster_each_with_its_tenants_and_servers() {
    if !node::own_cluster(
        "two_releases_of_one_name_share_a_cluster_each_with_its_tenants_and_servers",
    ) {
        return;
    }
    let _crds = CRD_OWNER.lock().await;
    with_temp_ns("chart-two", |a: TestNs| async move {
        let b = TestNs::create(&format!("{}-b", a.name)).await?;
        let result = two_releases_side_by_side(&a, &b).await;
        if result.is_err() {
            for ns in [&a, &b] {
                let args = [
                    "logs",
                    "-n",
                    &ns.name,
                    "deploy/silo-controller",
                    "--tail=40",
                ];
                if let Ok(out) = ns.kubectl(&args).await {
                    eprintln!("$ kubectl {}\n{}{}", args.join(" "), out.stdout, out.stderr);
                }
            }
        }
        // Whatever happened: no release outlives the test (the namespaces' deletion would leave
        // their ClusterRoles), and b goes with its server; with_temp_ns cleans a.
        for ns in [&b, &a] {
            let _ = ns.helm(&uninstall_args(ns)).await;
        }
        let _ = b
            .servers()
            .delete(&b.server_name("pg"), &DeleteParams::default())
            .await;
        let _ = Api::<Namespace>::all(b.client.clone())
            .delete(&b.name, &DeleteParams::default())
            .await;
        result
    })
    .await;
}

/// Releases `silo` in `a` (which owns the CRDs) and in `b` (`crds.create=false`), both over all
/// namespaces, each with its own server and its own Tenants, all of them in `a`.
async fn two_releases_side_by_side(a: &TestNs, b: &TestNs) -> anyhow::Result<()> {
    let chart = chart();
    let (pg_a, pg_b) = (PgServer::start()?, PgServer::start()?);
    let (server_a, server_b) = (a.server_name("pg"), b.server_name("pg"));
    a.add_server(&server_a, &pg_a, "").await?;
    // Its admin Secret is in b, the namespace of the release that uses it.
    b.add_server(&server_b, &pg_b, "").await?;

    adopt_crds(a).await?;
    for (ns, crds) in [(a, true), (b, false)] {
        let values = shared_cluster_values(ns, crds)?;
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
            "helm install silo in {} (crds.create={crds}): {}{}",
            ns.name,
            install.stdout,
            install.stderr
        );
    }

    // Four Tenants in one namespace, which both controllers watch: a Retain and a Delete one
    // for each release, told apart by a label only.
    let tenants = [
        ("a-kept", a, "Retain", &server_a),
        ("a-dropped", a, "Delete", &server_a),
        ("b-kept", b, "Retain", &server_b),
        ("b-dropped", b, "Delete", &server_b),
    ];
    let yaml: Vec<String> = tenants
        .iter()
        .map(|(tenant, release, policy, _)| {
            format!(
                "apiVersion: silo.dev/v1alpha1\nkind: Tenant\n\
                 metadata: {{name: {tenant}, labels: {{{INSTALL_LABEL}: {release}}}}}\n\
                 spec: {{deletion: {{policy: {policy}}}}}\n",
                release = release.name
            )
        })
        .collect();
    a.apply_ok(&yaml.join("---\n")).await?;
    let mut placed = BTreeMap::new();
    for (tenant, _, _, server) in &tenants {
        let ready: Tenant = a.wait_phase(tenant, TenantPhase::Ready, TIMEOUT).await?;
        let status = ready.status.unwrap_or_default();
        ensure!(
            status.server.as_deref() == Some(server.as_str()),
            "{tenant} is on {:?}, not on its release's server {server}",
            status.server
        );
        let database = status.database.context("no database in status")?;
        let role = status.role.context("no role in status")?;
        placed.insert(*tenant, (database, role));
    }
    let (admin_a, admin_b) = (pg_a.admin_pool().await?, pg_b.admin_pool().await?);
    for (admin, kept, dropped) in [
        (&admin_a, "a-kept", "a-dropped"),
        (&admin_b, "b-kept", "b-dropped"),
    ] {
        let expected = BTreeSet::from([placed[kept].0.clone(), placed[dropped].0.clone()]);
        let found = databases(admin).await?;
        ensure!(
            found == expected,
            "databases {found:?}, expected {expected:?}"
        );
    }

    let names: Vec<&str> = tenants.iter().map(|(tenant, ..)| *tenant).collect();
    let mut args = vec![
        "delete",
        "tenant",
        "-n",
        &a.name,
        "--wait=true",
        "--timeout=120s",
    ];
    args.extend(&names);
    let out = a.kubectl(&args).await?;
    ensure!(out.success, "kubectl delete: {}", out.stderr);
    for tenant in &names {
        ensure!(
            a.tenants().get_opt(tenant).await?.is_none(),
            "Tenant {tenant} is still there"
        );
    }

    // Each release applied its own Tenants' policies, on its own server, and touched nothing else.
    for (admin, server, kept, dropped) in [
        (&admin_a, &server_a, "a-kept", "a-dropped"),
        (&admin_b, &server_b, "b-kept", "b-dropped"),
    ] {
        let (kept_db, kept_role) = &placed[kept];
        let (_, dropped_role) = &placed[dropped];
        let found = databases(admin).await?;
        ensure!(
            found == BTreeSet::from([kept_db.clone()]),
            "on {server}: databases {found:?}, expected only {kept}'s {kept_db}"
        );
        ensure!(
            !role_exists(admin, dropped_role).await?,
            "on {server}: {dropped}'s role {dropped_role} is still there"
        );
        ensure!(
            role_exists(admin, kept_role).await?,
            "on {server}: {kept}'s role {kept_role} was dropped"
        );
        let retained = wait_for(
            &format!("{server} to list {kept}'s database as retained"),
            TIMEOUT,
            || async {
                let retained = a.servers().get(server).await.ok()?.status?.retained;
                retained.contains(kept_db).then_some(retained)
            },
        )
        .await?;
        ensure!(
            retained == [kept_db.clone()],
            "{server} lists {retained:?} as retained"
        );
    }
    // The Delete Tenants' Secrets go with them, by garbage collection: no controller deletes one.
    wait_for("the Delete tenants' Secrets to go", TIMEOUT, || async {
        let a_gone = a.secrets().get_opt("a-dropped-db").await.ok()?.is_none();
        let b_gone = a.secrets().get_opt("b-dropped-db").await.ok()?.is_none();
        (a_gone && b_gone).then_some(())
    })
    .await?;
    Ok(())
}

/// A client of the router, as an application connects: straight to one replica (a pod IP).
async fn connect_to_replica(
    ip: &str,
    user: &str,
    password: &str,
    database: &str,
) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::Config::new()
        .host(ip)
        .port(6432)
        .user(user)
        .password(password)
        .dbname(database)
        .connect_timeout(Duration::from_secs(10))
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Two router replicas behind one Service: a cancel request reaching the replica that does not
/// hold the client is passed on to the one that does (it used to be dropped: with two replicas
/// about half of all cancels were lost), and together they hold no more server connections
/// than the DatabaseServer's `maxConnections`, idle ones included (each used to apply the whole
/// budget, counting only connections in use).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_replicas_pass_cancels_on_and_share_a_server_budget() {
    if !node::own_cluster("router_replicas_pass_cancels_on_and_share_a_server_budget") {
        return;
    }
    with_temp_ns("chart-replicas", |ns: TestNs| async move {
        let result = two_router_replicas(&ns).await;
        if result.is_err()
            && let Ok(out) = ns
                .kubectl(&[
                    "logs",
                    "-n",
                    &ns.name,
                    "-l",
                    "app.kubernetes.io/component=router",
                    "--tail=30",
                ])
                .await
        {
            eprintln!("router logs:\n{}{}", out.stdout, out.stderr);
        }
        // The release goes with the test: the namespace's deletion would leave its ClusterRoles.
        let _ = ns.helm(&uninstall_args(&ns)).await;
        result
    })
    .await;
}

async fn two_router_replicas(ns: &TestNs) -> anyhow::Result<()> {
    let pg = PgServer::start()?;
    ns.add_server(&ns.server_name("pg"), &pg, "  maxConnections: 4")
        .await?;
    let values = e2e_values(ns)?;
    let install = ns
        .helm(&[
            "install",
            "silo",
            &chart(),
            "--namespace",
            &ns.name,
            "-f",
            &values,
            // The harness applied the CRDs; this release leaves them alone.
            "--set",
            "crds.create=false,router.replicas=2",
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
    ns.apply_ok(&[tenant_yaml("a", "  {}"), tenant_yaml("b", "  {}")].join("---\n"))
        .await?;
    for tenant in ["a", "b"] {
        ns.wait_phase(tenant, TenantPhase::Ready, TIMEOUT).await?;
    }
    let replicas: Vec<String> = wait_for(
        "two Ready router replicas, each counting both",
        TIMEOUT,
        || async {
            let pods = pods(ns, "router").await.ok()?;
            let ips: Vec<String> = pods
                .iter()
                .filter(|p| is_ready(p))
                .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
                .collect();
            if ips.len() != 2 {
                return None;
            }
            for ip in &ips {
                let addr = std::net::SocketAddr::new(ip.parse().ok()?, 8080);
                let (_, metrics) = silo_e2e::http_get_at(addr, "/metrics").await.ok()?;
                if !metrics.contains("silo_router_replicas 2") {
                    return None;
                }
            }
            Some(ips)
        },
    )
    .await?;
    let (user_a, password_a) = (
        ns.secret_value("a", "user").await?,
        ns.secret_value("a", "password").await?,
    );
    let (user_b, password_b) = (
        ns.secret_value("b", "user").await?,
        ns.secret_value("b", "password").await?,
    );
    let (db_a, db_b) = (format!("{}.a", ns.name), format!("{}.b", ns.name));
    let admin = pg.admin_pool().await?;
    let backends = || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE usename IN ($1, $2)")
                .bind(&user_a)
                .bind(&user_b)
                .fetch_one(&admin)
                .await?;
        anyhow::Ok(n)
    };

    // maxConnections 4 over two replicas: two each. A third transaction at once waits, and is
    // told 53300 when its checkout times out; the server never sees more than 4.
    let mut open = Vec::new();
    for ip in &replicas {
        for _ in 0..2 {
            let client = connect_to_replica(ip, &user_a, &password_a, &db_a).await?;
            client.batch_execute("BEGIN; SELECT 1").await?;
            open.push(client);
        }
        let third = connect_to_replica(ip, &user_a, &password_a, &db_a).await?;
        let refused = tokio::time::timeout(
            Duration::from_secs(30),
            third.batch_execute("BEGIN; SELECT 1"),
        )
        .await
        .context("the third transaction neither ran nor was refused")?
        .err()
        .with_context(|| {
            format!("replica {ip} opened a third server connection: its share of 4 is 2")
        })?;
        ensure!(
            refused.code() == Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS),
            "{refused}"
        );
        let n = backends().await?;
        ensure!(
            n <= 4,
            "{n} server connections on a server whose maxConnections is 4"
        );
    }
    for client in &open {
        client.batch_execute("COMMIT").await?;
    }
    // All four idle now, and counted: tenant b takes the place of one of them.
    ensure!(backends().await? == 4, "the idle connections stay open");
    let b = connect_to_replica(&replicas[0], &user_b, &password_b, &db_b).await?;
    b.batch_execute("SELECT 1").await?;
    // (A closed connection's backend leaves pg_stat_activity a moment later.)
    let mut n = backends().await?;
    for _ in 0..50 {
        if n <= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        n = backends().await?;
    }
    ensure!(
        n <= 4,
        "{n} server connections on a server whose maxConnections is 4"
    );
    drop((open, b));

    // A cancel sent to the replica that does not hold the client reaches the query.
    for (i, ip) in replicas.iter().enumerate() {
        let other = &replicas[1 - i];
        let client = connect_to_replica(ip, &user_a, &password_a, &db_a).await?;
        let cancel = client.cancel_token();
        let query = tokio::spawn(async move { client.batch_execute("SELECT pg_sleep(60)").await });
        wait_for("the query to run", TIMEOUT, || async {
            let running: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE usename = $1 AND state = 'active' AND query LIKE '%pg_sleep(60)%'",
            )
            .bind(&user_a)
            .fetch_one(&admin)
            .await
            .ok()?;
            (running == 1).then_some(())
        })
        .await?;
        let stream = tokio::net::TcpStream::connect((other.as_str(), 6432)).await?;
        cancel
            .cancel_query_raw(stream, tokio_postgres::NoTls)
            .await?;
        let ended = tokio::time::timeout(Duration::from_secs(20), query)
            .await
            .with_context(|| {
                format!(
                    "a cancel sent to replica {other} for a client of {ip} never reached the query"
                )
            })??;
        let err = ended.err().context("pg_sleep(60) ended without an error")?;
        ensure!(
            err.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
            "{err}"
        );
    }
    Ok(())
}
