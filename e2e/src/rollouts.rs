//! SchemaRollouts in the e2e tests: the example shop's image, manifests, and a log of the
//! migration Jobs as the API server showed them, in the order it did.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use silo_crds::contract::{ROLLOUT_LABEL, TENANT_LABEL};
use silo_crds::{RolloutPhase, SchemaRollout};

use crate::{TestNs, wait_for};

/// The example shop (examples/django) at `version` (v1, v2, v3), which the harness imported into
/// the node.
pub fn shop_image(version: &str) -> anyhow::Result<String> {
    let base = std::env::var("SILO_E2E_SHOP_IMAGE").context(
        "SILO_E2E_SHOP_IMAGE is not set: the e2e cluster has no node (run `e2e/run-tests.sh` as root)",
    )?;
    Ok(format!("{base}:{version}"))
}

/// A SchemaRollout named `name` running the shop's `manage.py migrate` at `version`, with the
/// `strategy` given (flow-style YAML, e.g. `{maxConcurrent: 3}`) and `extra` spec lines.
pub fn shop_rollout(
    name: &str,
    version: &str,
    strategy: &str,
    extra: &str,
) -> anyhow::Result<String> {
    Ok(format!(
        "apiVersion: silo.dev/v1alpha1
kind: SchemaRollout
metadata: {{name: {name}}}
spec:
  version: {version}
  template:
    image: {image}
    command: [python3, manage.py, migrate, --noinput]
  strategy: {strategy}
{extra}",
        image = shop_image(version)?,
    ))
}

/// One migration Job, as the watch showed it: `created` and `ended` are positions in the watch's
/// stream of events, which follows the order of the API server's writes.
#[derive(Clone, Debug, Default)]
pub struct JobRecord {
    pub name: String,
    pub uid: String,
    pub tenant: String,
    pub rollout: String,
    pub created: u64,
    pub ended: Option<u64>,
    pub failed: bool,
}

/// Every migration Job of a namespace, recorded by a watch that runs until dropped.
pub struct JobLog {
    jobs: Arc<Mutex<Vec<JobRecord>>>,
    seq: Arc<Mutex<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl JobLog {
    /// Starts watching; returns once the watch has listed (nothing before is missed after).
    pub async fn start(ns: &TestNs) -> anyhow::Result<JobLog> {
        Self::start_with(ns, ROLLOUT_LABEL).await
    }

    /// Watches the Jobs that match `selector` (e.g. the backup label).
    pub async fn start_with(ns: &TestNs, selector: &str) -> anyhow::Result<JobLog> {
        let api: Api<Job> = Api::namespaced(ns.client.clone(), &ns.name);
        let selector = selector.to_string();
        let jobs: Arc<Mutex<Vec<JobRecord>>> = Default::default();
        let seq: Arc<Mutex<u64>> = Default::default();
        let (listed_tx, listed_rx) = tokio::sync::oneshot::channel();
        let task = {
            let (jobs, seq) = (jobs.clone(), seq.clone());
            tokio::spawn(async move {
                let mut listed = Some(listed_tx);
                let mut events = watcher(api, watcher::Config::default().labels(&selector))
                    .default_backoff()
                    .boxed();
                while let Some(event) = events.next().await {
                    let job = match event {
                        Ok(watcher::Event::InitDone) => {
                            if let Some(tx) = listed.take() {
                                let _ = tx.send(());
                            }
                            continue;
                        }
                        Ok(watcher::Event::Apply(job) | watcher::Event::InitApply(job)) => job,
                        _ => continue,
                    };
                    let n = {
                        let mut s = seq.lock().unwrap_or_else(|p| p.into_inner());
                        *s += 1;
                        *s
                    };
                    record(&mut jobs.lock().unwrap_or_else(|p| p.into_inner()), &job, n);
                }
            })
        };
        tokio::time::timeout(Duration::from_secs(30), listed_rx)
            .await
            .context("the Job watch did not list within 30 s")??;
        Ok(JobLog { jobs, seq, task })
    }

    /// The Jobs seen so far.
    pub fn jobs(&self) -> Vec<JobRecord> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The position of the latest event seen.
    pub fn now(&self) -> u64 {
        *self.seq.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The Jobs of `rollout`.
    pub fn of(&self, rollout: &str) -> Vec<JobRecord> {
        self.jobs()
            .into_iter()
            .filter(|j| j.rollout == rollout)
            .collect()
    }
}

impl Drop for JobLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn record(jobs: &mut Vec<JobRecord>, job: &Job, n: u64) {
    let uid = job.uid().unwrap_or_default();
    let index = match jobs.iter().position(|r| r.uid == uid) {
        Some(i) => i,
        None => {
            jobs.push(JobRecord {
                name: job.name_any(),
                uid,
                tenant: job.labels().get(TENANT_LABEL).cloned().unwrap_or_default(),
                rollout: job.labels().get(ROLLOUT_LABEL).cloned().unwrap_or_default(),
                created: n,
                ..JobRecord::default()
            });
            jobs.len() - 1
        }
    };
    let conditions = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let holds = |t: &str| {
        conditions
            .iter()
            .any(|c| c.type_ == t && c.status == "True")
    };
    let entry = &mut jobs[index];
    if entry.ended.is_none() && (holds("Complete") || holds("Failed")) {
        entry.ended = Some(n);
        entry.failed = holds("Failed");
    }
}

/// The most Jobs that ran at once, overall and on any one server (`server_of` maps a tenant to
/// its server), from the order of their creations and ends.
pub fn most_at_once(
    jobs: &[JobRecord],
    server_of: &HashMap<String, String>,
) -> (usize, HashMap<String, usize>) {
    let mut events: Vec<(u64, bool, &JobRecord)> = Vec::new();
    for job in jobs {
        events.push((job.created, true, job));
        events.push((job.ended.unwrap_or(u64::MAX), false, job));
    }
    events.sort_by_key(|(n, _, _)| *n);
    let (mut running, mut most) = (0usize, 0usize);
    let mut on: HashMap<String, usize> = HashMap::new();
    let mut most_on: HashMap<String, usize> = HashMap::new();
    for (_, starts, job) in events {
        let server = server_of.get(&job.tenant).cloned().unwrap_or_default();
        let count = on.entry(server.clone()).or_default();
        if starts {
            running += 1;
            *count += 1;
        } else {
            running -= 1;
            *count -= 1;
        }
        most = most.max(running);
        let most_here = most_on.entry(server).or_default();
        *most_here = (*most_here).max(*count);
    }
    (most, most_on)
}

/// Waits until the rollout's status satisfies `check`, returning it.
pub async fn wait_rollout(
    ns: &TestNs,
    name: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&SchemaRollout) -> bool,
) -> anyhow::Result<SchemaRollout> {
    let api: Api<SchemaRollout> = Api::namespaced(ns.client.clone(), &ns.name);
    let found = wait_for(&format!("rollout {name}: {what}"), timeout, || async {
        let rollout = api.get_opt(name).await.ok().flatten()?;
        check(&rollout).then_some(rollout)
    })
    .await;
    match found {
        Ok(rollout) => Ok(rollout),
        Err(e) => {
            let status = api
                .get_opt(name)
                .await
                .ok()
                .flatten()
                .and_then(|r| r.status)
                .map(|s| serde_json::to_string(&s).unwrap_or_default());
            bail!("{e}; its status: {status:?}")
        }
    }
}

/// Whether the rollout is in `phase`.
pub fn in_phase(rollout: &SchemaRollout, phase: RolloutPhase) -> bool {
    rollout.status.as_ref().and_then(|s| s.phase) == Some(phase)
}
