//! The second baseline, the API writes alone: the creates and patches the controller made while
//! provisioning (as the API server counted them, by verb and resource), sent again by the
//! benchmark to the same API server, as many tenants at a time as the controller reconciles, with
//! no SQL. They go to Tenants, Secrets and Events of a namespace of their own that no controller
//! watches, shaped like the controller's (the real Tenants' statuses and Secrets' data as
//! templates), so that the restart measured afterwards sees the fleet exactly as silo left it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde_json::json;
use silo_crds::{Tenant, TenantSpec, contract};
use silo_e2e::TestNs;
use silo_e2e::apiserver::RequestCounts;

/// Field manager and reporting controller of the replayed writes (not the controller's).
const MANAGER: &str = "silo-bench-replay";

/// One replayed write, in the order they are sent for one tenant (a create before its patches).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    /// `PATCH tenants`: a merge patch of an annotation (the controller adds its finalizer).
    PatchTenant,
    /// `POST secrets`: the credentials Secret.
    CreateSecret,
    /// `PATCH secrets`: a merge patch of an annotation on it.
    PatchSecret,
    /// `APPLY tenants/status`: server-side apply of a status with conditions.
    ApplyStatus,
    /// `POST events` (events.k8s.io/v1, as kube's Recorder writes them).
    CreateEvent,
    /// `PATCH events`: the Recorder's series update of an Event it wrote before.
    PatchEvent,
}

impl Op {
    fn for_request(verb: &str, resource: &str) -> Option<Op> {
        Some(match (verb, resource) {
            ("PATCH", "tenants") => Op::PatchTenant,
            ("POST", "secrets") => Op::CreateSecret,
            ("PATCH", "secrets") => Op::PatchSecret,
            ("APPLY", "tenants/status") => Op::ApplyStatus,
            ("POST", "events") => Op::CreateEvent,
            ("PATCH", "events") => Op::PatchEvent,
            _ => return None,
        })
    }

    /// The write a patch needs to exist first, if any.
    fn needs(self) -> Option<Op> {
        match self {
            Op::PatchSecret => Some(Op::CreateSecret),
            Op::PatchEvent => Some(Op::CreateEvent),
            _ => None,
        }
    }
}

pub struct Replay {
    /// Wall time of the replayed writes.
    pub elapsed: Duration,
    /// The writes the API server counted during the replay (less its own upkeep).
    pub counted: RequestCounts,
    /// The controller's writes this replay has no equivalent for (none so far).
    pub not_replayed: RequestCounts,
}

/// Replays `writes` (the controller's, for `tenants` Tenants of namespace `bench`) with
/// `concurrency` tenants at a time. The namespace and Tenants it writes to are made first,
/// untimed.
pub async fn run(
    bench: &TestNs,
    writes: &RequestCounts,
    tenants: usize,
    concurrency: usize,
) -> anyhow::Result<Replay> {
    let ns = TestNs::create(&format!("{}-replay", bench.name)).await?;
    let result = replay_in(&ns, bench, writes, tenants, concurrency).await;
    ns.cleanup().await;
    result
}

async fn replay_in(
    ns: &TestNs,
    bench: &TestNs,
    writes: &RequestCounts,
    tenants: usize,
    concurrency: usize,
) -> anyhow::Result<Replay> {
    // Templates: what the controller wrote for each tenant.
    let statuses: BTreeMap<String, serde_json::Value> = bench
        .tenants()
        .list(&ListParams::default())
        .await?
        .into_iter()
        .map(|t| (t.name_any(), json!(t.status)))
        .collect();
    let secrets: BTreeMap<String, Secret> = bench
        .secrets()
        .list(&ListParams::default().labels(contract::MANAGED_SELECTOR))
        .await?
        .into_iter()
        .map(|s| (s.name_any(), s))
        .collect();

    let api = ns.tenants();
    let targets: Vec<Tenant> = stream::iter(0..tenants)
        .map(|i| {
            let api = api.clone();
            async move {
                let tenant = Tenant::new(&tenant_name(i), TenantSpec::default());
                api.create(&PostParams::default(), &tenant).await
            }
        })
        .buffered(32)
        .try_collect()
        .await?;

    let (plan, not_replayed) = plan(writes, tenants);
    let before = RequestCounts::read(&ns.client).await?;
    let start = Instant::now();
    stream::iter(targets.into_iter().zip(plan))
        .map(|(tenant, ops)| {
            let name = tenant.name_any();
            let status = statuses.get(&name).cloned().unwrap_or_default();
            let secret = secrets.get(&contract::secret_name(&name)).cloned();
            replay_tenant(ns, tenant, ops, status, secret)
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<()>>()
        .await?;
    let elapsed = start.elapsed();
    let counted = RequestCounts::read(&ns.client)
        .await?
        .since(&before)
        .only_writes()
        .split_upkeep()
        .0;
    Ok(Replay {
        elapsed,
        counted,
        not_replayed,
    })
}

fn tenant_name(i: usize) -> String {
    format!("tenant-{i:05}")
}

/// Spreads each counted write evenly over the tenants (a patch only onto a tenant that creates
/// what it patches); returns the writes per tenant, in order, and the writes it cannot replay.
fn plan(writes: &RequestCounts, tenants: usize) -> (Vec<Vec<Op>>, RequestCounts) {
    let mut plan = vec![Vec::new(); tenants];
    let mut not_replayed = RequestCounts::default();
    let mut wanted: Vec<(Op, usize)> = Vec::new();
    for ((verb, resource), n) in &writes.0 {
        match Op::for_request(verb, resource) {
            Some(op) => wanted.push((op, n.round() as usize)),
            None => {
                not_replayed.0.insert((verb.clone(), resource.clone()), *n);
            }
        }
    }
    // Creates first, so that patches can go where something was created.
    wanted.sort_by_key(|(op, _)| op.needs().is_some());
    for (op, count) in wanted {
        let eligible: Vec<usize> = match op.needs() {
            Some(needed) => (0..tenants)
                .filter(|&i| plan[i].contains(&needed))
                .collect(),
            None => (0..tenants).collect(),
        };
        // A patch with nothing to patch anywhere falls back to any tenant (it creates instead).
        let eligible = if eligible.is_empty() {
            (0..tenants).collect()
        } else {
            eligible
        };
        for j in 0..count {
            plan[eligible[j * eligible.len() / count]].push(op);
        }
    }
    for ops in &mut plan {
        ops.sort();
    }
    (plan, not_replayed)
}

/// One tenant's writes, one after the other, as one reconcile makes them.
async fn replay_tenant(
    ns: &TestNs,
    tenant: Tenant,
    ops: Vec<Op>,
    status: serde_json::Value,
    secret: Option<Secret>,
) -> anyhow::Result<()> {
    let name = tenant.name_any();
    let tenants = ns.tenants();
    let secrets = ns.secrets();
    let events: Api<Event> = Api::namespaced(ns.client.clone(), &ns.name);
    let secret_name = contract::secret_name(&name);
    let mut event: Option<Event> = None;
    let mut secret_created = false;
    for (k, op) in ops.into_iter().enumerate() {
        let annotation =
            json!({ "metadata": { "annotations": { "silo.dev/bench-replay": k.to_string() } } });
        match op {
            Op::PatchTenant => {
                tenants
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&annotation))
                    .await?;
            }
            Op::ApplyStatus => {
                // A status that differs from the last one (the API server skips no-op writes).
                let mut status = status.clone();
                if let Some(conditions) = status["conditions"].as_array_mut() {
                    for c in conditions {
                        let message = c["message"].as_str().unwrap_or_default().to_string();
                        c["message"] = json!(format!("{message} (replay {k})"));
                    }
                }
                if status.is_null() {
                    status = json!({ "phase": "Provisioning", "conditions": [] });
                }
                let patch = json!({
                    "apiVersion": "silo.dev/v1alpha1",
                    "kind": "Tenant",
                    "status": status,
                });
                tenants
                    .patch_status(
                        &name,
                        &PatchParams::apply(MANAGER).force(),
                        &Patch::Apply(&patch),
                    )
                    .await?;
            }
            Op::CreateSecret | Op::PatchSecret if !secret_created => {
                let mut copy = Secret {
                    metadata: ObjectMeta {
                        name: Some(secret_name.clone()),
                        labels: secret.as_ref().and_then(|s| s.metadata.labels.clone()),
                        owner_references: Some(vec![owner(&tenant)]),
                        ..Default::default()
                    },
                    data: secret.as_ref().and_then(|s| s.data.clone()),
                    type_: Some("Opaque".into()),
                    ..Default::default()
                };
                copy.metadata.annotations = None;
                let params = PostParams {
                    field_manager: Some(MANAGER.into()),
                    ..Default::default()
                };
                secrets.create(&params, &copy).await?;
                secret_created = true;
            }
            Op::CreateSecret | Op::PatchSecret => {
                secrets
                    .patch(
                        &secret_name,
                        &PatchParams::default(),
                        &Patch::Merge(&annotation),
                    )
                    .await?;
            }
            Op::CreateEvent | Op::PatchEvent => match event.as_mut() {
                Some(last) if op == Op::PatchEvent => {
                    let count = last.series.as_ref().map_or(2, |s| s.count + 1);
                    last.series = Some(EventSeries {
                        count,
                        last_observed_time: MicroTime(Timestamp::now()),
                    });
                    events
                        .patch(
                            &last.name_any(),
                            &PatchParams::default(),
                            &Patch::Merge(&*last),
                        )
                        .await?;
                }
                _ => {
                    let new = new_event(&tenant);
                    events.create(&PostParams::default(), &new).await?;
                    event = Some(new);
                }
            },
        }
    }
    Ok(())
}

fn owner(tenant: &Tenant) -> OwnerReference {
    OwnerReference {
        api_version: Tenant::api_version(&()).into_owned(),
        kind: Tenant::kind(&()).into_owned(),
        name: tenant.name_any(),
        uid: tenant.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// An Event like the one kube's Recorder writes when a tenant turns Ready.
fn new_event(tenant: &Tenant) -> Event {
    let now = Timestamp::now();
    let name = tenant.name_any();
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{name}.{:x}", now.as_nanosecond())),
            namespace: tenant.namespace(),
            ..Default::default()
        },
        action: Some("Reconcile".into()),
        reason: Some("Provisioned".into()),
        note: Some(format!(
            "database t_replay_{name} and role t_replay_{name} ready on server replay-one"
        )),
        event_time: Some(MicroTime(now)),
        regarding: Some(ObjectReference {
            api_version: Some(Tenant::api_version(&()).into_owned()),
            kind: Some(Tenant::kind(&()).into_owned()),
            name: Some(name),
            namespace: tenant.namespace(),
            uid: tenant.uid(),
            resource_version: tenant.resource_version(),
            ..Default::default()
        }),
        reporting_controller: Some(MANAGER.into()),
        reporting_instance: Some(MANAGER.into()),
        type_: Some("Normal".into()),
        ..Default::default()
    }
}
