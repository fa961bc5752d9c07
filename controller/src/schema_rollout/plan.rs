//! What a rollout does next, from what it sees (pure): which tenants' migrations start now, and
//! the rollout's phase and counts. The reconcile gathers the facts (Tenants, their Jobs, the
//! other Jobs running against each server) and acts on the plan.

use std::collections::{BTreeMap, HashMap};

use silo_crds::{RolloutPhase, SchemaRollout};

/// Where one selected tenant stands with this rollout's version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Its `status.schemaVersion` is this version.
    AtVersion,
    /// Its migration Job runs.
    Running,
    /// Its migration failed (retries spent); the reason and what the migration said.
    Failed { reason: String, message: String },
    /// Not started, and Ready: it may start.
    Waiting,
    /// Not started, and not Ready (suspended, provisioning, ...): left out until it is.
    Skipped,
}

/// A selected tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantFacts {
    pub name: String,
    /// The DatabaseServer it is placed on.
    pub server: Option<String>,
    pub progress: Progress,
}

/// The strategy's numbers, and the switches that stop a rollout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub canary: usize,
    pub max_concurrent: usize,
    pub max_concurrent_per_server: usize,
    pub max_failures: usize,
    pub paused: bool,
    /// A newer rollout in the namespace is the target.
    pub superseded: bool,
}

/// The counts of a rollout's status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub running: usize,
    pub pending: usize,
    pub skipped: usize,
}

/// What to do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub phase: RolloutPhase,
    /// Why, in a word, when the phase is not Progressing or Complete: `Paused`, `Superseded`,
    /// `CanaryFailed`, `TooManyFailures`, `Failures`.
    pub reason: Option<&'static str>,
    pub counts: Counts,
    /// Tenants whose migration starts now, in order.
    pub start: Vec<String>,
}

/// The plan for `tenants` under `limits`, with `busy` Jobs already running against each server
/// for other reasons (onboarding, other rollouts), which count against the per-server cap.
pub fn plan(tenants: &[TenantFacts], limits: &Limits, busy: &HashMap<String, usize>) -> Plan {
    let mut counts = Counts {
        total: tenants.len(),
        ..Counts::default()
    };
    let mut running_on: BTreeMap<&str, usize> = BTreeMap::new();
    for tenant in tenants {
        match &tenant.progress {
            Progress::AtVersion => counts.succeeded += 1,
            Progress::Running => {
                counts.running += 1;
                if let Some(server) = &tenant.server {
                    *running_on.entry(server).or_default() += 1;
                }
            }
            Progress::Failed { .. } => counts.failed += 1,
            Progress::Waiting => counts.pending += 1,
            Progress::Skipped => counts.skipped += 1,
        }
    }
    // The canary stage lasts until `canary` tenants (or all there are) have succeeded: a tenant
    // added later never becomes a new canary, and a failure before then stops everything.
    let canaries = limits.canary.min(counts.total - counts.skipped);
    let canaries_done = counts.succeeded >= canaries;
    let canary_failed = !canaries_done && counts.failed > 0;

    let stopped = if limits.superseded {
        Some((RolloutPhase::Superseded, "Superseded"))
    } else if canary_failed {
        Some((RolloutPhase::Halted, "CanaryFailed"))
    } else if counts.failed >= limits.max_failures {
        Some((RolloutPhase::Halted, "TooManyFailures"))
    } else if limits.paused {
        Some((RolloutPhase::Paused, "Paused"))
    } else {
        None
    };
    if let Some((phase, reason)) = stopped {
        return Plan {
            phase,
            reason: Some(reason),
            counts,
            start: Vec::new(),
        };
    }
    if counts.pending == 0 && counts.running == 0 {
        // Nothing left to start or wait for: done, unless some failed (below maxFailures).
        let (phase, reason) = if counts.failed == 0 {
            (RolloutPhase::Complete, None)
        } else {
            (RolloutPhase::Halted, Some("Failures"))
        };
        return Plan {
            phase,
            reason,
            counts,
            start: Vec::new(),
        };
    }

    // Canaries first, alone (the first waiting by name); then everyone else waiting, by name.
    let mut candidates: Vec<&TenantFacts> = tenants
        .iter()
        .filter(|t| t.progress == Progress::Waiting)
        .collect();
    candidates.sort_by(|a, b| a.name.cmp(&b.name));
    let max_concurrent = if canaries_done {
        limits.max_concurrent
    } else {
        canaries - counts.succeeded
    };
    let mut running = counts.running;
    let mut start = Vec::new();
    for tenant in candidates {
        if running >= max_concurrent {
            break;
        }
        let server = tenant.server.as_deref().unwrap_or_default();
        let on_server =
            running_on.get(server).copied().unwrap_or(0) + busy.get(server).copied().unwrap_or(0);
        if on_server >= limits.max_concurrent_per_server {
            continue;
        }
        *running_on.entry(server).or_default() += 1;
        running += 1;
        start.push(tenant.name.clone());
    }
    // The counts say what holds once these have started.
    counts.pending -= start.len();
    counts.running += start.len();
    Plan {
        phase: RolloutPhase::Progressing,
        reason: None,
        counts,
        start,
    }
}

/// The target of a namespace: its newest rollout by creation (by name when created in the same
/// second). The others are superseded.
pub fn target<'a>(
    rollouts: impl IntoIterator<Item = &'a SchemaRollout>,
) -> Option<&'a SchemaRollout> {
    rollouts.into_iter().max_by(|a, b| {
        let created = |r: &SchemaRollout| r.metadata.creation_timestamp.as_ref().map(|t| t.0);
        created(a)
            .cmp(&created(b))
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use Progress::*;

    fn tenant(name: &str, server: &str, progress: Progress) -> TenantFacts {
        TenantFacts {
            name: name.into(),
            server: Some(server.into()),
            progress,
        }
    }

    fn failed() -> Progress {
        Failed {
            reason: "MigrationFailed".into(),
            message: "ERROR: check constraint".into(),
        }
    }

    fn limits() -> Limits {
        Limits {
            canary: 1,
            max_concurrent: 10,
            max_concurrent_per_server: 2,
            max_failures: 1,
            paused: false,
            superseded: false,
        }
    }

    /// Six waiting tenants, three on each of two servers.
    fn fleet() -> Vec<TenantFacts> {
        ["a", "b", "c", "d", "e", "f"]
            .iter()
            .enumerate()
            .map(|(i, n)| tenant(n, if i % 2 == 0 { "s1" } else { "s2" }, Waiting))
            .collect()
    }

    fn with(mut fleet: Vec<TenantFacts>, changes: &[(&str, Progress)]) -> Vec<TenantFacts> {
        for (name, progress) in changes {
            if let Some(t) = fleet.iter_mut().find(|t| t.name == *name) {
                t.progress = progress.clone();
            }
        }
        fleet
    }

    /// What, the tenants, the limits, other Jobs per server, and the phase, reason and starts
    /// expected.
    type Case<'a> = (
        &'a str,
        Vec<TenantFacts>,
        Limits,
        &'a HashMap<String, usize>,
        RolloutPhase,
        Option<&'a str>,
        Vec<&'a str>,
    );

    #[test]
    fn plans() {
        let no_busy = HashMap::new();
        let s1_busy: HashMap<String, usize> = [("s1".to_string(), 2)].into();
        // (what, tenants, limits, busy, phase, reason, starts)
        let cases: Vec<Case> = vec![
            (
                "the canary starts alone",
                fleet(),
                limits(),
                &no_busy,
                RolloutPhase::Progressing,
                None,
                vec!["a"],
            ),
            (
                "nothing else while the canary runs",
                with(fleet(), &[("a", Running)]),
                limits(),
                &no_busy,
                RolloutPhase::Progressing,
                None,
                vec![],
            ),
            (
                "after the canary, waves under the per-server cap",
                with(fleet(), &[("a", AtVersion)]),
                limits(),
                &no_busy,
                RolloutPhase::Progressing,
                None,
                vec!["b", "c", "d", "e"],
            ),
            (
                "under the overall cap",
                with(fleet(), &[("a", AtVersion)]),
                Limits {
                    max_concurrent: 3,
                    ..limits()
                },
                &no_busy,
                RolloutPhase::Progressing,
                None,
                vec!["b", "c", "d"],
            ),
            (
                "running Jobs count against both caps",
                with(fleet(), &[("a", AtVersion), ("b", Running), ("c", Running)]),
                Limits {
                    max_concurrent: 3,
                    ..limits()
                },
                &no_busy,
                RolloutPhase::Progressing,
                None,
                vec!["d"],
            ),
            (
                "other Jobs on a server count against its cap",
                with(fleet(), &[("a", AtVersion)]),
                limits(),
                &s1_busy,
                RolloutPhase::Progressing,
                None,
                vec!["b", "d"],
            ),
            (
                "a failed canary halts",
                with(fleet(), &[("a", failed())]),
                Limits {
                    max_failures: 3,
                    ..limits()
                },
                &no_busy,
                RolloutPhase::Halted,
                Some("CanaryFailed"),
                vec![],
            ),
            (
                "failures reaching maxFailures halt; running ones finish",
                with(
                    fleet(),
                    &[
                        ("a", AtVersion),
                        ("b", failed()),
                        ("c", failed()),
                        ("d", Running),
                    ],
                ),
                Limits {
                    max_failures: 2,
                    ..limits()
                },
                &no_busy,
                RolloutPhase::Halted,
                Some("TooManyFailures"),
                vec![],
            ),
            (
                "a failure below maxFailures goes on",
                with(fleet(), &[("a", AtVersion), ("b", failed())]),
                Limits {
                    max_failures: 2,
                    ..limits()
                },
                &no_busy,
                RolloutPhase::Progressing,
                None,
                vec!["c", "d", "e", "f"],
            ),
            (
                "paused starts nothing",
                fleet(),
                Limits {
                    paused: true,
                    ..limits()
                },
                &no_busy,
                RolloutPhase::Paused,
                Some("Paused"),
                vec![],
            ),
            (
                "superseded starts nothing",
                fleet(),
                Limits {
                    superseded: true,
                    ..limits()
                },
                &no_busy,
                RolloutPhase::Superseded,
                Some("Superseded"),
                vec![],
            ),
            (
                "all at the version, skipped ones aside: complete",
                with(
                    fleet(),
                    &[
                        ("a", AtVersion),
                        ("b", AtVersion),
                        ("c", AtVersion),
                        ("d", AtVersion),
                        ("e", AtVersion),
                        ("f", Skipped),
                    ],
                ),
                limits(),
                &no_busy,
                RolloutPhase::Complete,
                None,
                vec![],
            ),
            (
                "done but for failures below maxFailures: halted",
                with(
                    fleet(),
                    &[
                        ("a", AtVersion),
                        ("b", AtVersion),
                        ("c", AtVersion),
                        ("d", AtVersion),
                        ("e", AtVersion),
                        ("f", failed()),
                    ],
                ),
                Limits {
                    max_failures: 2,
                    ..limits()
                },
                &no_busy,
                RolloutPhase::Halted,
                Some("Failures"),
                vec![],
            ),
            (
                "a skipped tenant is no canary",
                with(fleet(), &[("a", Skipped)]),
                limits(),
                &no_busy,
                RolloutPhase::Progressing,
                None,
                vec!["b"],
            ),
            (
                "no canary: waves at once",
                fleet(),
                Limits {
                    canary: 0,
                    ..limits()
                },
                &no_busy,
                RolloutPhase::Progressing,
                None,
                vec!["a", "b", "c", "d"],
            ),
            (
                "a tenant added after the canary succeeded is no new canary",
                with(fleet(), &[("b", AtVersion)]),
                limits(),
                &no_busy,
                RolloutPhase::Progressing,
                None,
                vec!["a", "c", "d", "f"],
            ),
            (
                "two canaries start together",
                fleet(),
                Limits {
                    canary: 2,
                    ..limits()
                },
                &no_busy,
                RolloutPhase::Progressing,
                None,
                vec!["a", "b"],
            ),
            (
                "a failure before the canaries all succeeded halts",
                with(fleet(), &[("a", AtVersion), ("b", failed())]),
                Limits {
                    canary: 2,
                    max_failures: 5,
                    ..limits()
                },
                &no_busy,
                RolloutPhase::Halted,
                Some("CanaryFailed"),
                vec![],
            ),
            (
                "no tenants: complete",
                vec![],
                limits(),
                &no_busy,
                RolloutPhase::Complete,
                None,
                vec![],
            ),
        ];
        for (what, tenants, limits, busy, phase, reason, start) in cases {
            let plan = plan(&tenants, &limits, busy);
            assert_eq!((plan.phase, plan.reason), (phase, reason), "{what}");
            assert_eq!(plan.start, start, "{what}");
        }
    }

    #[test]
    fn the_counts_include_what_starts_now() {
        let plan = plan(&fleet(), &limits(), &HashMap::new());
        assert_eq!(plan.start, ["a"]);
        assert_eq!(
            (plan.counts.running, plan.counts.pending),
            (1, 5),
            "the canary runs, five wait"
        );
    }

    #[test]
    fn counts_are_exact() {
        let tenants = with(
            fleet(),
            &[
                ("a", AtVersion),
                ("b", Running),
                ("c", failed()),
                ("d", Skipped),
            ],
        );
        let plan = plan(
            &tenants,
            &Limits {
                max_failures: 5,
                ..limits()
            },
            &HashMap::new(),
        );
        assert_eq!(
            plan.counts,
            Counts {
                total: 6,
                succeeded: 1,
                failed: 1,
                // e and f start now: what the status says once they have.
                running: 3,
                pending: 0,
                skipped: 1
            }
        );
    }
}
