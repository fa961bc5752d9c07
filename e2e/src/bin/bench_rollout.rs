//! SchemaRollout benchmark: N Ready tenants on two PostgreSQL servers, then one SchemaRollout whose
//! "migration" only sleeps T seconds, with no canary and at most `maxConcurrent` Jobs at once. The
//! wall time from apply to Complete is set against the ideal, `ceil(N / maxConcurrent) * T`; the
//! difference is what the controller, the Job controller and the node add per wave, which the
//! figures break down from watches of the Jobs and their pods. Also the controller's CPU time per
//! tenant and its peak memory. Needs the e2e node; run through `e2e/bench-rollout.sh`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use silo_crds::contract::ROLLOUT_LABEL;
use silo_crds::{RolloutPhase, SchemaRollout, Tenant, TenantPhase, TenantSpec};
use silo_e2e::rollouts::shop_image;
use silo_e2e::{ControllerProcess, Env, PgServer, TestNs, wait_for};

#[derive(Parser)]
struct Args {
    /// Tenants to migrate.
    #[arg(long, default_value_t = 200)]
    tenants: usize,
    /// How long each tenant's "migration" (`sleep`) runs, in seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The rollout's `maxConcurrent`.
    #[arg(long, default_value_t = 10)]
    max_concurrent: usize,
    /// The rollout's `maxConcurrentPerServer`.
    #[arg(long, default_value_t = 10)]
    max_concurrent_per_server: usize,
}

const ROLLOUT: &str = "bench-sleep";
const VERSION: &str = "v1";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Args {
        tenants,
        seconds,
        max_concurrent,
        max_concurrent_per_server,
    } = Args::parse();
    ensure!(
        tenants > 0 && seconds > 0 && max_concurrent > 0,
        "--tenants, --seconds and --max-concurrent must be positive"
    );
    Env::from_env()?; // an incomplete environment fails here, before any server starts
    let image = shop_image(VERSION)?; // and so does a cluster without a node
    let servers = [PgServer::start()?, PgServer::start()?];
    let ns = TestNs::create("bench-rollout").await?;
    for (name, server) in ["one", "two"].iter().zip(&servers) {
        ns.add_server(&ns.server_name(name), server, "  maxTenants: 100000")
            .await?;
    }
    let mut ctl = ns.start_controller(&["--resync-interval", "600", "--log-filter", "info"])?;
    eprintln!("bench_rollout: controller log {}", ctl.log.display());
    for name in ["one", "two"] {
        let name = ns.server_name(name);
        wait_for("servers ready", Duration::from_secs(60), || async {
            let st = ns.servers().get(&name).await.ok()?.status?;
            st.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        })
        .await?;
    }

    // 1. The fleet: N tenants, all Ready, spread over the two servers.
    let provisioning = Instant::now();
    create_ready_tenants(&ns, tenants).await?;
    let provisioned = provisioning.elapsed();
    let mut per_server: HashMap<String, usize> = HashMap::new();
    for tenant in ns.tenants().list(&ListParams::default()).await? {
        let server = tenant.status.and_then(|s| s.server).unwrap_or_default();
        *per_server.entry(server).or_default() += 1;
    }
    let mut spread: Vec<usize> = per_server.values().copied().collect();
    spread.sort_unstable();
    eprintln!(
        "bench_rollout: {tenants} tenants Ready in {:.1} s, per server {spread:?}",
        provisioned.as_secs_f64()
    );

    // 2. The rollout, watched from before it exists: Jobs and pods as the API server shows them
    //    (succeeded Jobs and their pods are deleted once recorded, so only a watch sees them all).
    let jobs: Recorder<JobTimes> =
        Recorder::start(Api::namespaced(ns.client.clone(), &ns.name), JobTimes::see).await?;
    let pods: Recorder<PodTimes> =
        Recorder::start(Api::namespaced(ns.client.clone(), &ns.name), PodTimes::see).await?;
    let cpu_before = cpu_seconds(&ctl)?;
    let metrics_before = ctl.http_get("/metrics").await?.1;
    let peak_reset = reset_peak_rss(&ctl);
    let rollouts: Api<SchemaRollout> = Api::namespaced(ns.client.clone(), &ns.name);
    let manifest = format!(
        "apiVersion: silo.dev/v1alpha1
kind: SchemaRollout
metadata: {{name: {ROLLOUT}}}
spec:
  version: {VERSION}
  template:
    image: {image}
    command: [sleep, \"{seconds}\"]
  strategy: {{canary: 0, maxConcurrent: {max_concurrent}, maxConcurrentPerServer: {max_concurrent_per_server}, maxFailures: 1}}
"
    );
    let rollout: SchemaRollout = serde_yaml::from_str(&manifest)?;
    let waves = tenants.div_ceil(max_concurrent);
    let ideal = Duration::from_secs(waves as u64 * seconds);
    let complete = tokio::spawn(wait_complete(
        rollouts.clone(),
        ideal * 3 + Duration::from_secs(300),
    ));
    let applied = Instant::now();
    rollouts.create(&PostParams::default(), &rollout).await?;
    let completed_at = complete.await??;
    let wall = completed_at.saturating_duration_since(applied);
    let cpu = cpu_seconds(&ctl)? - cpu_before;
    let metrics_after = ctl.http_get("/metrics").await?.1;
    let peak_rss = ctl
        .peak_rss_kib()
        .context("reading the controller's peak RSS")?;
    ensure!(ctl.is_running(), "the controller exited during the rollout");

    // Every tenant at the version, one Job each, none failed.
    let at_version = ns
        .tenants()
        .list(&ListParams::default())
        .await?
        .into_iter()
        .filter(|t| t.status.as_ref().and_then(|s| s.schema_version.as_deref()) == Some(VERSION))
        .count();
    ensure!(
        at_version == tenants,
        "Complete with {at_version} of {tenants} tenants at {VERSION}"
    );
    // A Job goes once its outcome is on the Tenant: all of them, soon after Complete.
    let cleaned = wait_for(
        "the Jobs to be deleted",
        Duration::from_secs(120),
        || async {
            let seen = jobs.seen();
            (seen.len() == tenants && seen.iter().all(|j| j.deleted_seen.is_some())).then_some(())
        },
    )
    .await;
    if let Err(e) = cleaned {
        eprintln!("bench_rollout: {e}");
    }
    let jobs = jobs.stop();
    let pods = pods.stop();
    ensure!(
        jobs.len() == tenants,
        "{} migration Jobs for {tenants} tenants",
        jobs.len()
    );
    ensure!(jobs.iter().all(|j| !j.failed), "a migration Job failed");

    // 3. The figures.
    let since = |t: Instant| t.saturating_duration_since(applied);
    let job_of: HashMap<&str, &JobTimes> = jobs.iter().map(|j| (j.uid.as_str(), j)).collect();
    let gap =
        |from: Option<Instant>, to: Option<Instant>| Some(to?.saturating_duration_since(from?));
    // Pod-start latency: Job created -> its container running, as the watches saw them (ms), and
    // from the API server's timestamps (creationTimestamp -> startedAt, whole seconds).
    let mut start_watch = Vec::new();
    let mut start_api = Vec::new();
    // One place's cycle, stage by stage, as the watches saw the API server's writes.
    let mut stages: [(&str, Vec<Duration>); 5] = [
        ("  Job created -> pod created (Job ctl)", vec![]),
        ("  pod created -> bound (scheduler)", vec![]),
        ("  bound -> running (kubelet)", vec![]),
        ("  running -> pod Succeeded (T + kubelet)", vec![]),
        ("  pod Succeeded -> Job Complete (Job ctl)", vec![]),
    ];
    // The Job controller's steps between the pod's success and `Complete`.
    let mut counted = Vec::new();
    let mut criteria = Vec::new();
    for pod in &pods {
        let Some(job) = job_of.get(pod.job_uid.as_str()) else {
            continue;
        };
        counted.extend(gap(pod.succeeded_seen, job.counted_seen));
        criteria.extend(gap(pod.succeeded_seen, job.criteria_seen));
        start_watch.extend(gap(job.seen, pod.running_seen));
        if let (Some(created), Some(started)) = (job.created_ms, pod.started_ms) {
            start_api.push(Duration::from_millis((started - created).max(0) as u64));
        }
        let times = [
            job.seen,
            pod.seen,
            pod.bound_seen,
            pod.running_seen,
            pod.succeeded_seen,
            job.ended_seen,
        ];
        for (i, (_, values)) in stages.iter_mut().enumerate() {
            values.extend(gap(times[i], times[i + 1]));
        }
    }
    // A Job seen Complete -> the next Job seen created: how fast a freed place is refilled. The
    // i-th end frees the place the (maxConcurrent + i)-th Job takes.
    let mut ends: Vec<Instant> = jobs.iter().filter_map(|j| j.ended_seen).collect();
    let mut creations: Vec<Instant> = jobs.iter().filter_map(|j| j.seen).collect();
    ends.sort();
    creations.sort();
    let mut refill: Vec<Duration> = ends
        .iter()
        .zip(creations.iter().skip(max_concurrent))
        .map(|(end, next)| next.saturating_duration_since(*end))
        .collect();
    // Job lifetimes (created -> Complete, as seen): the most at once, and the mean in flight.
    let lifetimes: Vec<(Instant, Instant)> = jobs
        .iter()
        .filter_map(|j| Some((j.seen?, j.ended_seen?)))
        .collect();
    let most_at_once = most_at_once(&lifetimes);
    let busy: Duration = lifetimes
        .iter()
        .map(|(a, b)| b.saturating_duration_since(*a))
        .sum();
    let mean_in_flight = busy.as_secs_f64() / wall.as_secs_f64();
    // What a controller that refilled every place at once would take, given how long the Jobs
    // took on this node: their total time spread over maxConcurrent places.
    let floor = busy.as_secs_f64() / max_concurrent as f64;
    let mut deleted: Vec<Duration> = jobs
        .iter()
        .filter_map(|j| gap(j.ended_seen, j.deleted_seen))
        .collect();
    let first_job = creations.first().map(|t| since(*t)).unwrap_or_default();
    let last_end = ends.last().map(|t| since(*t)).unwrap_or_default();

    let reconciles = metric(
        &metrics_after,
        "silo_reconciles_total{kind=\"schemarollout\"",
    ) - metric(
        &metrics_before,
        "silo_reconciles_total{kind=\"schemarollout\"",
    );
    let reconcile_secs = metric(
        &metrics_after,
        "silo_reconcile_duration_seconds_sum{kind=\"schemarollout\"",
    ) - metric(
        &metrics_before,
        "silo_reconcile_duration_seconds_sum{kind=\"schemarollout\"",
    );
    let ratio = wall.as_secs_f64() / ideal.as_secs_f64();
    let secs = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    let mut rows: Vec<(&str, String)> = vec![
        ("wall: apply -> phase Complete", secs(wall)),
        (
            "ideal: ceil(N / maxConcurrent) * T",
            format!("{} s   ({waves} waves of {seconds} s)", ideal.as_secs()),
        ),
        (
            "ratio wall / ideal",
            format!("{ratio:.2}   (target <= 1.3)"),
        ),
        ("apply -> first Job created", secs(first_job)),
        ("apply -> last Job Complete", secs(last_end)),
        (
            "Jobs in flight: most / mean",
            format!("{most_at_once} / {mean_in_flight:.1}   (maxConcurrent {max_concurrent})"),
        ),
        (
            "floor: total Job time / maxConcurrent",
            format!(
                "{floor:.2} s   (wall / floor {:.2}: refill gaps + last wave's tail)",
                wall.as_secs_f64() / floor
            ),
        ),
        (
            "overhead per wave: (wall - ideal) / waves",
            format!(
                "{:.2} s",
                (wall.as_secs_f64() - ideal.as_secs_f64()) / waves as f64
            ),
        ),
        (
            "pod start: Job -> running (watch)",
            percentiles(&mut start_watch),
        ),
        (
            "pod start: Job -> startedAt (API, 1 s)",
            percentiles(&mut start_api),
        ),
        ("a place's cycle, by stage:", String::new()),
    ];
    for (what, values) in &mut stages {
        rows.push((what, percentiles(values)));
    }
    rows.extend([
        (
            "    of which: -> Job status.succeeded 1",
            percentiles(&mut counted),
        ),
        (
            "    of which: -> SuccessCriteriaMet",
            percentiles(&mut criteria),
        ),
        (
            "  Job Complete -> next Job created (silo)",
            percentiles(&mut refill),
        ),
        (
            "Job Complete -> Job deleted (silo)",
            percentiles(&mut deleted),
        ),
        (
            "controller CPU, apply -> Complete",
            format!(
                "{cpu:.2} s = {:.1} ms per tenant",
                cpu * 1000.0 / tenants as f64
            ),
        ),
        (
            "controller rollout reconciles",
            format!(
                "{reconciles:.0} ({:.1} per tenant, mean {:.0} ms)",
                reconciles / tenants as f64,
                reconcile_secs * 1000.0 / reconciles.max(1.0)
            ),
        ),
        (
            if peak_reset {
                "controller peak RSS during the rollout"
            } else {
                "controller peak RSS (whole run)"
            },
            format!("{:.1} MiB", peak_rss as f64 / 1024.0),
        ),
    ]);
    println!();
    println!(
        "SchemaRollout benchmark: {tenants} tenants on 2 servers {spread:?}, `sleep {seconds}`, \
         canary 0, maxConcurrent {max_concurrent}, maxConcurrentPerServer {max_concurrent_per_server}"
    );
    for (what, value) in rows {
        if value.is_empty() {
            println!("  {what}");
        } else {
            println!("  {what:<42} {value}");
        }
    }
    println!(
        "  ({tenants} tenants at {VERSION}, {} Jobs, {} pods watched; provisioning took {:.1} s)",
        jobs.len(),
        pods.len(),
        provisioned.as_secs_f64()
    );
    drop(ctl);
    Ok(())
}

/// Creates tenants `tenant-00000`.. at once and waits, watching, until all are Ready.
async fn create_ready_tenants(ns: &TestNs, count: usize) -> anyhow::Result<()> {
    let api = ns.tenants();
    let watch_api = api.clone();
    let all_ready = tokio::spawn(async move {
        let mut ready = std::collections::HashSet::new();
        let mut events =
            std::pin::pin!(watcher(watch_api, watcher::Config::default()).applied_objects());
        while let Some(tenant) = events.try_next().await? {
            let name = tenant.name_any();
            if tenant.status.and_then(|s| s.phase) == Some(TenantPhase::Ready) {
                ready.insert(name);
            } else {
                ready.remove(&name);
            }
            if ready.len() == count {
                return Ok(());
            }
        }
        bail!("the tenant watch ended")
    });
    stream::iter(0..count)
        .map(|i| {
            let api = api.clone();
            async move {
                let tenant = Tenant::new(&format!("tenant-{i:05}"), TenantSpec::default());
                api.create(&PostParams::default(), &tenant).await
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    tokio::time::timeout(Duration::from_secs(1800), all_ready)
        .await
        .context("tenants not all Ready within 30 minutes")??
}

/// Watches the rollout until its phase is Complete; when the watch saw that. Fails if it halts.
async fn wait_complete(api: Api<SchemaRollout>, timeout: Duration) -> anyhow::Result<Instant> {
    let watch = async {
        let config = watcher::Config::default().fields(&format!("metadata.name={ROLLOUT}"));
        let mut events = std::pin::pin!(watcher(api, config).default_backoff().applied_objects());
        while let Some(rollout) = events.try_next().await? {
            let status = rollout.status.unwrap_or_default();
            match status.phase {
                Some(RolloutPhase::Complete) => return Ok(Instant::now()),
                Some(RolloutPhase::Halted | RolloutPhase::Superseded) => {
                    bail!("the rollout stopped: {}", serde_json::to_string(&status)?)
                }
                _ => {}
            }
        }
        bail!("the rollout watch ended")
    };
    tokio::time::timeout(timeout, watch)
        .await
        .with_context(|| format!("the rollout not Complete within {timeout:?}"))?
}

/// A migration Job as the watch saw it.
#[derive(Clone, Debug, Default)]
struct JobTimes {
    uid: String,
    /// `metadata.creationTimestamp`, in ms (whole seconds).
    created_ms: Option<i64>,
    /// First seen.
    seen: Option<Instant>,
    /// First seen with `status.succeeded` 1, and with the condition `SuccessCriteriaMet`: the
    /// Job controller's steps before `Complete`.
    counted_seen: Option<Instant>,
    criteria_seen: Option<Instant>,
    /// First seen Complete or Failed.
    ended_seen: Option<Instant>,
    failed: bool,
    /// Seen deleted.
    deleted_seen: Option<Instant>,
}

impl JobTimes {
    fn see(&mut self, job: &Job, now: Instant, deleted: bool) {
        if deleted {
            self.deleted_seen.get_or_insert(now);
            return;
        }
        self.uid = job.uid().unwrap_or_default();
        self.created_ms = job
            .meta()
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_millisecond());
        self.seen.get_or_insert(now);
        let conditions = job
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_deref())
            .unwrap_or_default();
        let holds = |t: &str| {
            conditions
                .iter()
                .any(|c| c.type_ == t && c.status == "True")
        };
        if job.status.as_ref().and_then(|s| s.succeeded).unwrap_or(0) > 0 {
            self.counted_seen.get_or_insert(now);
        }
        if holds("SuccessCriteriaMet") {
            self.criteria_seen.get_or_insert(now);
        }
        if self.ended_seen.is_none() && (holds("Complete") || holds("Failed")) {
            self.ended_seen = Some(now);
            self.failed = holds("Failed");
        }
    }
}

/// A migration pod as the watch saw it.
#[derive(Clone, Debug, Default)]
struct PodTimes {
    job_uid: String,
    /// First seen.
    seen: Option<Instant>,
    /// First seen bound to the node.
    bound_seen: Option<Instant>,
    /// First seen with its container running (or already ended).
    running_seen: Option<Instant>,
    /// First seen in phase Succeeded.
    succeeded_seen: Option<Instant>,
    /// The container's `startedAt`, in ms (whole seconds).
    started_ms: Option<i64>,
}

impl PodTimes {
    fn see(&mut self, pod: &Pod, now: Instant, deleted: bool) {
        if deleted {
            return;
        }
        self.job_uid = pod
            .labels()
            .get("batch.kubernetes.io/controller-uid")
            .cloned()
            .unwrap_or_default();
        self.seen.get_or_insert(now);
        if pod.spec.as_ref().is_some_and(|s| s.node_name.is_some()) {
            self.bound_seen.get_or_insert(now);
        }
        let Some(status) = &pod.status else { return };
        for container in status.container_statuses.iter().flatten() {
            let Some(state) = &container.state else {
                continue;
            };
            let started = match (&state.running, &state.terminated) {
                (Some(running), _) => running.started_at.as_ref(),
                (None, Some(terminated)) => terminated.started_at.as_ref(),
                _ => continue,
            };
            self.running_seen.get_or_insert(now);
            if let Some(started) = started {
                self.started_ms = Some(started.0.as_millisecond());
            }
        }
        if status.phase.as_deref() == Some("Succeeded") {
            self.succeeded_seen.get_or_insert(now);
        }
    }
}

/// What a watch of a namespace's migration objects (those labelled with a rollout) recorded, by
/// uid, until stopped.
struct Recorder<R> {
    seen: Arc<Mutex<HashMap<String, R>>>,
    task: tokio::task::JoinHandle<()>,
}

impl<R: Default + Clone + Send + 'static> Recorder<R> {
    /// Starts watching; returns once the watch has listed.
    async fn start<K>(
        api: Api<K>,
        see: fn(&mut R, &K, Instant, bool),
    ) -> anyhow::Result<Recorder<R>>
    where
        K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        let seen: Arc<Mutex<HashMap<String, R>>> = Default::default();
        let (listed_tx, listed_rx) = tokio::sync::oneshot::channel();
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut listed = Some(listed_tx);
                let mut events = watcher(api, watcher::Config::default().labels(ROLLOUT_LABEL))
                    .default_backoff()
                    .boxed();
                while let Some(event) = events.next().await {
                    let now = Instant::now();
                    let (object, deleted) = match event {
                        Ok(watcher::Event::InitDone) => {
                            if let Some(tx) = listed.take() {
                                let _ = tx.send(());
                            }
                            continue;
                        }
                        Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => (o, false),
                        Ok(watcher::Event::Delete(o)) => (o, true),
                        _ => continue,
                    };
                    let uid = object.meta().uid.clone().unwrap_or_default();
                    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                    see(seen.entry(uid).or_default(), &object, now, deleted);
                }
            })
        };
        tokio::time::timeout(Duration::from_secs(30), listed_rx)
            .await
            .context("a watch did not list within 30 s")??;
        Ok(Recorder { seen, task })
    }

    /// What it saw so far.
    fn seen(&self) -> Vec<R> {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Stops watching; what it saw.
    fn stop(self) -> Vec<R> {
        self.task.abort();
        self.seen()
    }
}

/// The most intervals that overlap at once.
fn most_at_once(intervals: &[(Instant, Instant)]) -> usize {
    // Ends sort before starts at the same instant: a place freed and taken is not two at once.
    let mut events: Vec<(Instant, i32)> = intervals
        .iter()
        .flat_map(|(start, end)| [(*start, 1), (*end, -1)])
        .collect();
    events.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, step) in events {
        now += step;
        most = most.max(now);
    }
    most as usize
}

/// `p50 / p95 / max` of `values`, in seconds.
fn percentiles(values: &mut [Duration]) -> String {
    if values.is_empty() {
        return "-".into();
    }
    values.sort();
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize].as_secs_f64();
    format!(
        "p50 {:.2} s   p95 {:.2} s   max {:.2} s   (n={})",
        at(0.5),
        at(0.95),
        at(1.0),
        values.len()
    )
}

/// The sum of the values of the samples in a Prometheus text exposition whose line starts with
/// `prefix` (a metric name and the start of its labels).
fn metric(exposition: &str, prefix: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The controller's CPU time so far (user + system), from /proc/PID/stat.
fn cpu_seconds(ctl: &ControllerProcess) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", ctl.pid()))?;
    // The fields after the command name (which may hold spaces), from field 3 (state) on.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("no command name in /proc/PID/stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |field: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(field - 3)
            .with_context(|| format!("no field {field} in /proc/PID/stat"))?
            .parse::<f64>()?)
    };
    Ok((ticks(14)? + ticks(15)?) / clock_ticks_per_second())
}

/// `getconf CLK_TCK`: the unit of /proc's CPU times (100 on Linux nearly always).
fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Resets the controller's peak RSS (VmHWM) to its current RSS, so that the peak read later is the
/// rollout's (`echo 5 > /proc/PID/clear_refs`); whether that worked.
fn reset_peak_rss(ctl: &ControllerProcess) -> bool {
    std::fs::write(format!("/proc/{}/clear_refs", ctl.pid()), "5").is_ok()
}
