//! `metav1.Condition` helpers: conditions are computed, then merged so that `lastTransitionTime`
//! moves only when a condition's status flips.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::{Schema, SchemaGenerator, json_schema};

pub const READY: &str = "Ready";
pub const DATABASE_READY: &str = "DatabaseReady";
/// DatabaseServer: PUBLIC can neither connect to nor create in the maintenance databases.
pub const HARDENED: &str = "Hardened";
/// Tenant: the routes of `spec.routing` are this tenant's alone.
pub const ROUTED: &str = "Routed";
/// Tenant: at the schema version of its namespace's target SchemaRollout.
pub const SCHEMA_READY: &str = "SchemaReady";
/// Tenant: its last backup succeeded, recently enough for its schedule.
pub const BACKED_UP: &str = "BackedUp";
/// SchemaRollout: Jobs are running or about to start.
pub const PROGRESSING: &str = "Progressing";
/// SchemaRollout: every selected Ready tenant is at its version (`kubectl wait` waits for this).
pub const COMPLETE: &str = "Complete";

/// A condition as a reconciler computes it, before it is merged into the stored list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Desired {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Desired {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Merges `desired` into `current`: each condition keeps its `lastTransitionTime` unless its status
/// changed; conditions of other types are kept as they are.
pub fn merge(
    current: &[Condition],
    desired: &[Desired],
    generation: Option<i64>,
    now: Time,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = current.to_vec();
    for d in desired {
        let status = if d.status { "True" } else { "False" }.to_string();
        let previous = out.iter().position(|c| c.type_ == d.type_);
        let last_transition_time = match previous {
            Some(i) if out[i].status == status => out[i].last_transition_time.clone(),
            _ => now.clone(),
        };
        let condition = Condition {
            type_: d.type_.to_string(),
            status,
            reason: d.reason.clone(),
            message: d.message.clone(),
            observed_generation: generation,
            last_transition_time,
        };
        match previous {
            Some(i) => out[i] = condition,
            None => out.push(condition),
        }
    }
    out
}

/// Whether the condition of `type_` is present and True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

/// The schema of a `conditions` list: standard `metav1.Condition`s, a list-map keyed by `type`.
pub fn schema(generator: &mut SchemaGenerator) -> Schema {
    let item = generator.subschema_for::<Condition>();
    json_schema!({
        "description": "Standard conditions; `Ready` summarises the others.",
        "type": "array",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Time {
        Time(jiff::Timestamp::from_second(seconds).unwrap_or_default())
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let first = merge(
            &[],
            &[Desired::new(READY, false, "Provisioning", "creating")],
            Some(1),
            at(10),
        );
        assert_eq!(first[0].last_transition_time, at(10));

        let same = merge(
            &first,
            &[Desired::new(READY, false, "Provisioning", "still creating")],
            Some(1),
            at(20),
        );
        assert_eq!(
            same[0].last_transition_time,
            at(10),
            "same status keeps the time"
        );
        assert_eq!(same[0].message, "still creating", "message is updated");

        let flipped = merge(
            &same,
            &[Desired::new(READY, true, "Ready", "ready")],
            Some(2),
            at(30),
        );
        assert_eq!(flipped[0].last_transition_time, at(30));
        assert_eq!(flipped[0].status, "True");
        assert_eq!(flipped[0].observed_generation, Some(2));
    }

    #[test]
    fn other_condition_types_are_kept() {
        let a = merge(
            &[],
            &[Desired::new(DATABASE_READY, true, "Created", "ok")],
            None,
            at(1),
        );
        let b = merge(&a, &[Desired::new(READY, true, "Ready", "ok")], None, at(2));
        assert_eq!(b.len(), 2);
        assert!(is_true(&b, DATABASE_READY));
        assert!(is_true(&b, READY));
        assert!(!is_true(&b, "Other"));
    }
}
