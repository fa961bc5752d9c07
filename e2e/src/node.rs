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

/// How a Job ended.
#[derive(Debug, PartialEq, Eq)]
pub enum JobOutcome {
    Complete,
    Failed(String),
}

/// Waits until the Job in the test namespace is Complete or Failed.
pub async fn wait_job(ns: &TestNs, name: &str, timeout: Duration) -> anyhow::Result<JobOutcome> {
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
pub async fn job_logs(ns: &TestNs, name: &str) -> anyhow::Result<String> {
    let out = ns
        .kubectl(&["logs", "-n", &ns.name, &format!("job/{name}")])
        .await?;
    if !out.success {
        bail!("kubectl logs job/{name}: {}", out.stderr.trim());
    }
    Ok(out.stdout)
}
