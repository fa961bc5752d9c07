//! The e2e cluster's node (`e2e/scripts/node.sh`): the image Jobs run, and waiting for Jobs.

use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::batch::v1::Job;
use kube::api::Api;

use crate::{TestNs, wait_for};

/// The silo image the harness built and imported into the node (`localhost/silo:<tag>`), or an
/// error saying why the cluster has none.
pub fn image() -> anyhow::Result<String> {
    std::env::var("SILO_E2E_IMAGE").context(
        "SILO_E2E_IMAGE is not set: the e2e cluster has no node (run `e2e/run-tests.sh` as root)",
    )
}

/// Whether this cluster is one the harness started itself (not the user's `KUBECONFIG`): tests
/// that change cluster-wide objects run only there. Prints why when not.
pub fn own_cluster(test: &str) -> bool {
    let own = std::env::var("SILO_E2E_OWN_CLUSTER").as_deref() == Ok("1");
    if !own {
        eprintln!("{test}: skipped: it runs only on the cluster e2e/run-tests.sh starts");
    }
    own
}

/// Whether the harness's egress guard is up on this machine (`e2e/scripts/node.sh`): probes that
/// would leave the machine without it are sent only then. Prints why when not.
pub fn guard_up(test: &str) -> bool {
    let up = std::process::Command::new("iptables")
        .args(["-C", "OUTPUT", "-j", "SILO-E2E-GUARD"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !up {
        eprintln!("{test}: skipped: the e2e node's egress guard is not up on this machine");
    }
    up
}

/// Where a Job container's environment variable comes from.
pub enum EnvFrom<'a> {
    Value(&'a str),
    /// A key of a Secret in the Job's namespace.
    Secret(&'a str, &'a str),
}

/// Runs `command` as a one-container Job `name` of the silo image in the test namespace (never
/// retried, non-root, read-only root filesystem, no capabilities), and waits for it: how it ended,
/// and its pod's log.
pub async fn run_job(
    ns: &TestNs,
    name: &str,
    command: &[&str],
    env: &[(&str, EnvFrom<'_>)],
) -> anyhow::Result<(JobOutcome, String)> {
    let env: Vec<serde_json::Value> = env
        .iter()
        .map(|(var, from)| match from {
            EnvFrom::Value(value) => serde_json::json!({ "name": var, "value": value }),
            EnvFrom::Secret(secret, key) => serde_json::json!({
                "name": var,
                "valueFrom": { "secretKeyRef": { "name": secret, "key": key } }
            }),
        })
        .collect();
    // JSON is YAML: kubectl takes it as it is.
    let job = serde_json::json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": { "name": name },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": 90,
            "template": { "spec": {
                "restartPolicy": "Never",
                "securityContext": { "runAsNonRoot": true, "seccompProfile": { "type": "RuntimeDefault" } },
                "containers": [{
                    "name": "main",
                    "image": image()?,
                    "imagePullPolicy": "Never",
                    "command": command,
                    "env": env,
                    "securityContext": {
                        "readOnlyRootFilesystem": true,
                        "allowPrivilegeEscalation": false,
                        "capabilities": { "drop": ["ALL"] }
                    }
                }]
            }}
        }
    });
    ns.apply_ok(&job.to_string()).await?;
    let outcome = wait_job(ns, name, Duration::from_secs(120)).await?;
    let logs = job_logs(ns, name).await.unwrap_or_default();
    Ok((outcome, logs))
}

/// How a Job ended.
#[derive(Debug, PartialEq, Eq)]
pub enum JobOutcome {
    Complete,
    Failed(String),
}

/// Waits until the Job in the test namespace is Complete or Failed.
async fn wait_job(ns: &TestNs, name: &str, timeout: Duration) -> anyhow::Result<JobOutcome> {
    let api: Api<Job> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_for(&format!("job {name} to finish"), timeout, || async {
        let job = api.get_opt(name).await.ok().flatten()?;
        let conditions = job.status?.conditions?;
        conditions
            .iter()
            .find_map(|c| match (c.type_.as_str(), c.status.as_str()) {
                ("Complete", "True") => Some(JobOutcome::Complete),
                ("Failed", "True") => Some(JobOutcome::Failed(format!(
                    "{}: {}",
                    c.reason.clone().unwrap_or_default(),
                    c.message.clone().unwrap_or_default()
                ))),
                _ => None,
            })
    })
    .await
}

/// The logs of a Job's pod.
async fn job_logs(ns: &TestNs, name: &str) -> anyhow::Result<String> {
    let out = ns
        .kubectl(&["logs", "-n", &ns.name, &format!("job/{name}")])
        .await?;
    if !out.success {
        bail!("kubectl logs job/{name}: {}", out.stderr.trim());
    }
    Ok(out.stdout)
}
