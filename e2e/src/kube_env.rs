//! The cluster the tests run against, and a namespace per test.

use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use silo_crds::{DatabaseServer, Tenant, TenantPhase};
use tokio::io::AsyncWriteExt;

use crate::controller::ControllerProcess;
use crate::postgres::{ADMIN_USER, PgServer};
use crate::wait_for;

/// Label put on every DatabaseServer a test creates; the test's controller selects on it.
pub const TEST_LABEL: &str = "silo.dev/e2e-ns";

/// Paths the harness needs, from the environment `e2e/run-tests.sh` sets up.
#[derive(Clone, Debug)]
pub struct Env {
    /// Cluster admin, for the tests themselves.
    pub kubeconfig: PathBuf,
    /// What the local controller and router run as: the chart's ServiceAccounts (their tokens, as
    /// `e2e/run-tests.sh` sets them up), so a permission the chart lacks fails a test.
    pub controller_kubeconfig: PathBuf,
    pub router_kubeconfig: PathBuf,
    /// The leader-election Lease the chart's RBAC lets the controller use (it names one Lease).
    pub lease_namespace: String,
    pub lease_name: String,
    pub kubectl: PathBuf,
    pub helm: PathBuf,
    pub controller_bin: PathBuf,
    pub router_bin: PathBuf,
}

impl Env {
    pub fn from_env() -> anyhow::Result<Env> {
        let var = |name: &str| {
            std::env::var_os(name).map(PathBuf::from).with_context(|| {
                format!("{name} is not set: run the end-to-end tests with `e2e/run-tests.sh` (see README.md)")
            })
        };
        let kubeconfig = var("KUBECONFIG")?;
        Ok(Env {
            controller_kubeconfig: var("SILO_CONTROLLER_KUBECONFIG")?,
            router_kubeconfig: var("SILO_ROUTER_KUBECONFIG")?,
            lease_namespace: std::env::var("SILO_E2E_LEASE_NAMESPACE")
                .context("SILO_E2E_LEASE_NAMESPACE is not set: run `e2e/run-tests.sh`")?,
            lease_name: std::env::var("SILO_E2E_LEASE_NAME")
                .context("SILO_E2E_LEASE_NAME is not set: run `e2e/run-tests.sh`")?,
            kubeconfig,
            kubectl: var("SILO_KUBECTL")?,
            helm: var("SILO_HELM")?,
            controller_bin: var("SILO_CONTROLLER_BIN")?,
            router_bin: var("SILO_ROUTER_BIN")?,
        })
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        let config =
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }
}

/// A namespace for one test, with the helpers the scenarios share.
#[derive(Clone)]
pub struct TestNs {
    pub env: Env,
    pub client: Client,
    pub name: String,
}

/// Runs `test` in a fresh namespace; on failure, prints the namespace's Silo objects and events;
/// afterwards deletes the test's DatabaseServers and the namespace.
pub async fn with_temp_ns<F, Fut>(prefix: &str, test: F)
where
    F: FnOnce(TestNs) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let name = format!(
        "{prefix}-{}",
        crate::postgres::random_password()[..6].to_lowercase()
    );
    let test_ns = TestNs::create(&name).await.expect("a test namespace");
    let result = test(test_ns.clone()).await;
    if let Err(e) = &result {
        eprintln!("--- e2e failure in namespace {name}: {e:#}");
        for args in [
            vec!["get", "tenants", "-n", &name, "-o", "yaml"],
            vec!["get", "schemarollouts", "-n", &name, "-o", "yaml"],
            // Names only: a failure report never prints a password.
            vec!["get", "secrets,jobs,pods", "-n", &name],
            vec![
                "get",
                "databaseservers",
                "-l",
                &format!("{TEST_LABEL}={name}"),
                "-o",
                "yaml",
            ],
            vec!["get", "events", "-n", &name],
        ] {
            if let Ok(out) = test_ns.kubectl(&args).await {
                eprintln!("$ kubectl {}\n{}{}", args.join(" "), out.stdout, out.stderr);
            }
        }
    }
    test_ns.cleanup().await;
    if let Err(e) = result {
        panic!("{e:?}");
    }
}

/// The output of a kubectl run.
pub struct KubectlOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl TestNs {
    /// Creates the namespace `name` in the cluster of the e2e environment.
    pub async fn create(name: &str) -> anyhow::Result<TestNs> {
        let env = Env::from_env()?;
        let client = env.client().await?;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let ns = Namespace {
            metadata: kube::api::ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(TestNs {
            env,
            client,
            name: name.to_string(),
        })
    }

    pub fn tenants(&self) -> Api<Tenant> {
        Api::namespaced(self.client.clone(), &self.name)
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.name)
    }

    pub fn servers(&self) -> Api<DatabaseServer> {
        Api::all(self.client.clone())
    }

    /// Runs kubectl against the test cluster.
    pub async fn kubectl(&self, args: &[&str]) -> anyhow::Result<KubectlOutput> {
        self.kubectl_stdin(args, None).await
    }

    /// Runs helm against the test cluster (as cluster admin).
    pub async fn helm(&self, args: &[&str]) -> anyhow::Result<KubectlOutput> {
        run_tool(&self.env.helm, &self.env.kubeconfig, args, None).await
    }

    pub async fn kubectl_stdin(
        &self,
        args: &[&str],
        stdin: Option<&str>,
    ) -> anyhow::Result<KubectlOutput> {
        run_tool(&self.env.kubectl, &self.env.kubeconfig, args, stdin).await
    }

    /// `kubectl apply -n <ns> -f -`; the output, successful or not.
    pub async fn apply(&self, yaml: &str) -> anyhow::Result<KubectlOutput> {
        self.kubectl_stdin(&["apply", "-n", &self.name, "-f", "-"], Some(yaml))
            .await
    }

    /// `kubectl apply`, failing the test if kubectl refuses.
    pub async fn apply_ok(&self, yaml: &str) -> anyhow::Result<()> {
        let out = self.apply(yaml).await?;
        if !out.success {
            bail!("kubectl apply failed: {}", out.stderr);
        }
        Ok(())
    }

    /// Registers `pg` as a DatabaseServer named `name`, labelled for this test.
    pub async fn add_server(
        &self,
        name: &str,
        pg: &PgServer,
        extra_spec: &str,
    ) -> anyhow::Result<()> {
        self.add_server_with_password(name, pg, &pg.admin_password, extra_spec)
            .await
    }

    pub async fn add_server_with_password(
        &self,
        name: &str,
        pg: &PgServer,
        password: &str,
        extra_spec: &str,
    ) -> anyhow::Result<()> {
        let yaml = format!(
            r#"apiVersion: v1
kind: Secret
metadata: {{name: {name}-admin, namespace: {ns}}}
stringData: {{username: {ADMIN_USER}, password: "{password}"}}
---
apiVersion: silo.dev/v1alpha1
kind: DatabaseServer
metadata:
  name: {name}
  labels: {{{TEST_LABEL}: {ns}}}
spec:
  host: {host}
  port: {port}
  adminSecretRef: {{namespace: {ns}, name: {name}-admin}}
{extra_spec}"#,
            ns = self.name,
            host = pg.host,
            port = pg.port,
        );
        self.apply_ok(&yaml).await
    }

    /// A name for a cluster-scoped DatabaseServer that no other test uses.
    pub fn server_name(&self, base: &str) -> String {
        format!("{}-{base}", self.name)
    }

    /// Starts this test's controller: it sees only this namespace and this test's servers. It
    /// runs without leader election, so that tests running side by side don't wait on each other.
    pub fn start_controller(&self, extra: &[&str]) -> anyhow::Result<ControllerProcess> {
        ControllerProcess::start(self, None, extra)
    }

    /// Starts a controller replica that takes part in leader election on the chart's Lease, as
    /// `identity`. One test at a time may use this.
    pub fn start_elected_controller(&self, identity: &str) -> anyhow::Result<ControllerProcess> {
        ControllerProcess::start(self, Some(identity), &[])
    }

    /// Waits until the tenant reaches `phase`, returning it.
    pub async fn wait_phase(
        &self,
        tenant: &str,
        phase: TenantPhase,
        timeout: Duration,
    ) -> anyhow::Result<Tenant> {
        let api = self.tenants();
        wait_for(
            &format!("tenant {tenant} to be {phase}"),
            timeout,
            || async {
                let t = api.get_opt(tenant).await.ok().flatten()?;
                (t.status.as_ref()?.phase? == phase).then_some(t)
            },
        )
        .await
    }

    /// The value of `key` in the tenant's credentials Secret.
    pub async fn secret_value(&self, tenant: &str, key: &str) -> anyhow::Result<String> {
        let [value] = self.secret_values(tenant, [key]).await?;
        Ok(value)
    }

    /// Several values of the tenant's credentials Secret, read at once.
    pub async fn secret_values<const N: usize>(
        &self,
        tenant: &str,
        keys: [&str; N],
    ) -> anyhow::Result<[String; N]> {
        let secret = self
            .secrets()
            .get(&silo_crds::contract::secret_name(tenant))
            .await?;
        let data = secret.data.unwrap_or_default();
        let mut values = Vec::with_capacity(N);
        for key in keys {
            let bytes = data
                .get(key)
                .with_context(|| format!("secret has no {key}"))?;
            values.push(String::from_utf8(bytes.0.clone())?);
        }
        values
            .try_into()
            .map_err(|_| anyhow::anyhow!("one value per key"))
    }

    /// Deletes the namespace and its DatabaseServers (for namespaces made with `TestNs::create`).
    pub async fn cleanup(&self) {
        let servers = self.servers();
        let _ = servers
            .delete_collection(
                &DeleteParams::default(),
                &ListParams::default().labels(&format!("{TEST_LABEL}={}", self.name)),
            )
            .await;
        // Tenants keep a finalizer while no controller runs; drop it so the namespace can go.
        if let Ok(list) = self.tenants().list(&ListParams::default()).await {
            for t in list {
                if let Some(name) = t.metadata.name {
                    let patch = serde_json::json!({ "metadata": { "finalizers": null } });
                    let _ = self
                        .tenants()
                        .patch(
                            &name,
                            &kube::api::PatchParams::default(),
                            &kube::api::Patch::Merge(&patch),
                        )
                        .await;
                }
            }
        }
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let _ = namespaces
            .delete(&self.name, &DeleteParams::default())
            .await;
    }
}

/// Runs kubectl or helm with the given kubeconfig, feeding `stdin` if any.
async fn run_tool(
    tool: &std::path::Path,
    kubeconfig: &std::path::Path,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<KubectlOutput> {
    let mut child = tokio::process::Command::new(tool)
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", tool.display()))?;
    // The pipe is dropped (closed) here, so a tool reading stdin sees its end.
    if let (Some(mut pipe), Some(input)) = (child.stdin.take(), stdin) {
        pipe.write_all(input.as_bytes()).await?;
    }
    let out = child.wait_with_output().await?;
    Ok(KubectlOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
