//! What a SchemaRollout's status says after a plan, and the Event a phase change announces (pure).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::events::EventType;
use silo_crds::conditions::{self, COMPLETE, Desired, PROGRESSING};
use silo_crds::{FailedTenant, RolloutPhase, SchemaRolloutStatus};

use super::plan::Plan;

/// `failedTenants` lists at most this many (the counts stay exact).
pub const MAX_FAILED_TENANTS: usize = 20;

/// The status after `plan`, merged into `current`: equal to `current` when nothing changed.
/// `failed` is every failed tenant, by name.
pub fn status(
    current: &SchemaRolloutStatus,
    plan: &Plan,
    failed: &[FailedTenant],
    version: &str,
    generation: Option<i64>,
    now: Time,
) -> SchemaRolloutStatus {
    let counts = &plan.counts;
    let at = format!(
        "{} of {} tenants at {version}; {} running, {} pending, {} failed, {} skipped",
        counts.succeeded,
        counts.total,
        counts.running,
        counts.pending,
        counts.failed,
        counts.skipped
    );
    let reason = plan.reason.unwrap_or(match plan.phase {
        RolloutPhase::Complete => "Complete",
        _ => "Progressing",
    });
    let stopped_because = match plan.reason {
        Some("Paused") => "paused: nothing new starts".to_string(),
        Some("Superseded") => "a newer SchemaRollout is the namespace's target".to_string(),
        Some("CanaryFailed") => format!("halted: the canary failed ({})", names(failed)),
        Some("TooManyFailures") => format!("halted: maxFailures reached ({})", names(failed)),
        Some("Failures") => format!("done, but some failed ({})", names(failed)),
        _ => String::new(),
    };
    let message = if stopped_because.is_empty() {
        at
    } else {
        format!("{stopped_because}; {at}")
    };
    let progressing = plan.phase == RolloutPhase::Progressing;
    let complete = plan.phase == RolloutPhase::Complete;
    let desired = [
        Desired::new(PROGRESSING, progressing, reason, message.clone()),
        Desired::new(COMPLETE, complete, reason, message),
    ];
    let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    SchemaRolloutStatus {
        observed_generation: generation,
        phase: Some(plan.phase),
        conditions: conditions::merge(&current.conditions, &desired, generation, now.clone()),
        total: count(counts.total),
        succeeded: count(counts.succeeded),
        failed: count(counts.failed),
        running: count(counts.running),
        pending: count(counts.pending),
        skipped: count(counts.skipped),
        failed_tenants: failed.iter().take(MAX_FAILED_TENANTS).cloned().collect(),
        start_time: current.start_time.clone().or_else(|| Some(now.clone())),
        completion_time: complete.then(|| current.completion_time.clone().unwrap_or(now)),
    }
}

/// The failed tenants' names, the first few.
fn names(failed: &[FailedTenant]) -> String {
    let mut names: Vec<&str> = failed.iter().take(5).map(|f| f.tenant.as_str()).collect();
    if failed.len() > names.len() {
        names.push("...");
    }
    names.join(", ")
}

/// The Event announcing a phase change from `previous`.
pub fn phase_event(
    previous: Option<RolloutPhase>,
    status: &SchemaRolloutStatus,
) -> Option<(EventType, &'static str, String)> {
    let phase = status.phase?;
    if previous == Some(phase) {
        return None;
    }
    let message = status
        .conditions
        .iter()
        .find(|c| c.type_ == PROGRESSING)
        .map(|c| c.message.clone())
        .unwrap_or_default();
    Some(match phase {
        RolloutPhase::Progressing => (EventType::Normal, "Progressing", message),
        RolloutPhase::Paused => (EventType::Normal, "Paused", message),
        RolloutPhase::Halted => (EventType::Warning, "Halted", message),
        RolloutPhase::Complete => (EventType::Normal, "Complete", message),
        RolloutPhase::Superseded => (EventType::Normal, "Superseded", message),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema_rollout::plan::Counts;

    fn now() -> Time {
        Time("2026-12-02T10:00:00Z".parse().expect("a timestamp"))
    }

    fn later() -> Time {
        Time("2026-12-02T10:05:00Z".parse().expect("a timestamp"))
    }

    fn plan(phase: RolloutPhase, reason: Option<&'static str>, counts: Counts) -> Plan {
        Plan {
            phase,
            reason,
            counts,
            start: Vec::new(),
        }
    }

    fn failed(n: usize) -> Vec<FailedTenant> {
        (0..n)
            .map(|i| FailedTenant {
                tenant: format!("t{i:02}"),
                reason: "MigrationFailed".into(),
                message: "ERROR: check constraint".into(),
            })
            .collect()
    }

    fn condition(status: &SchemaRolloutStatus, type_: &str) -> (String, String, String) {
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("the condition");
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    #[test]
    fn progressing_then_complete() {
        let counts = Counts {
            total: 20,
            succeeded: 5,
            running: 4,
            pending: 11,
            ..Counts::default()
        };
        let first = status(
            &SchemaRolloutStatus::default(),
            &plan(RolloutPhase::Progressing, None, counts),
            &[],
            "v1",
            Some(1),
            now(),
        );
        assert_eq!(first.phase, Some(RolloutPhase::Progressing));
        assert_eq!(
            condition(&first, PROGRESSING),
            (
                "True".into(),
                "Progressing".into(),
                "5 of 20 tenants at v1; 4 running, 11 pending, 0 failed, 0 skipped".into()
            )
        );
        assert_eq!(condition(&first, COMPLETE).0, "False");
        assert_eq!(first.start_time, Some(now()));
        assert_eq!(first.completion_time, None);

        let done = Counts {
            total: 20,
            succeeded: 20,
            ..Counts::default()
        };
        let second = status(
            &first,
            &plan(RolloutPhase::Complete, None, done),
            &[],
            "v1",
            Some(1),
            later(),
        );
        assert_eq!(condition(&second, COMPLETE).0, "True");
        assert_eq!(condition(&second, PROGRESSING).0, "False");
        assert_eq!(second.start_time, Some(now()), "the start stays");
        assert_eq!(second.completion_time, Some(later()));
        let event = phase_event(first.phase, &second).expect("an event");
        assert_eq!((event.0, event.1), (EventType::Normal, "Complete"));

        let again = status(
            &second,
            &plan(RolloutPhase::Complete, None, done_counts()),
            &[],
            "v1",
            Some(1),
            later(),
        );
        assert_eq!(again, second, "nothing changed: nothing to write");
        assert_eq!(phase_event(second.phase, &again), None);
    }

    fn done_counts() -> Counts {
        Counts {
            total: 20,
            succeeded: 20,
            ..Counts::default()
        }
    }

    #[test]
    fn halted_names_the_failed_tenants_and_bounds_the_list() {
        let counts = Counts {
            total: 40,
            succeeded: 10,
            failed: 25,
            pending: 5,
            ..Counts::default()
        };
        let halted = status(
            &SchemaRolloutStatus::default(),
            &plan(RolloutPhase::Halted, Some("TooManyFailures"), counts),
            &failed(25),
            "v2",
            Some(3),
            now(),
        );
        assert_eq!(halted.failed, 25, "the count stays exact");
        assert_eq!(halted.failed_tenants.len(), MAX_FAILED_TENANTS);
        let (status_, reason, message) = condition(&halted, PROGRESSING);
        assert_eq!(
            (status_.as_str(), reason.as_str()),
            ("False", "TooManyFailures")
        );
        assert!(
            message.starts_with("halted: maxFailures reached (t00, t01, t02, t03, t04, ...)"),
            "{message}"
        );
        let event = phase_event(None, &halted).expect("an event");
        assert_eq!((event.0, event.1), (EventType::Warning, "Halted"));
    }
}
