//! A Tenant's side of the fleet's schema (pure): its `SchemaReady` condition, and whether a new
//! tenant waits in phase `Migrating` before it turns Ready.

use silo_crds::TenantPhase;
use silo_crds::conditions::{Desired, SCHEMA_READY};

use super::outcome::Outcome;

/// What the tenant reconciler knows of the tenant's schema.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchemaFacts<'a> {
    /// The version of the namespace's target SchemaRollout (its newest), if there is one that
    /// selects this tenant.
    pub target: Option<&'a str>,
    /// The tenant's `status.schemaVersion`.
    pub at: Option<&'a str>,
    /// The outcome of its migration Job to the target, if one exists.
    pub job: Option<&'a Outcome>,
    /// Suspended tenants are not migrated until resumed.
    pub suspended: bool,
}

/// The tenant's `SchemaReady` condition; none while no rollout targets it (Ready as without
/// rollouts).
pub fn schema_ready(facts: &SchemaFacts) -> Option<Desired> {
    let target = facts.target?;
    let condition = |status, reason: &str, message: String| {
        Some(Desired::new(SCHEMA_READY, status, reason, message))
    };
    if facts.at == Some(target) {
        return condition(true, "AtTarget", format!("at schema version {target}"));
    }
    let from = facts
        .at
        .map_or("no schema version yet".to_string(), |at| format!("at {at}"));
    match facts.job {
        Some(Outcome::Running) => {
            condition(false, "Migrating", format!("{from}; migrating to {target}"))
        }
        Some(Outcome::Failed { reason, message }) => condition(
            false,
            reason,
            format!("{from}; the migration to {target} failed: {message}"),
        ),
        // Its success is being recorded: still behind until then.
        Some(Outcome::Succeeded) | None if facts.suspended => condition(
            false,
            "Suspended",
            format!("{from}; migrates to {target} once resumed"),
        ),
        Some(Outcome::Succeeded) | None => condition(
            false,
            "Behind",
            format!("{from}; {target} is the target, and its migration waits for its turn"),
        ),
    }
}

/// Whether a tenant that has its database and credentials turns Ready now, or waits in
/// `Migrating`: a tenant that was never Ready waits until it is at the target version; a tenant
/// that was Ready stays Ready while a rollout migrates it (the application keeps running on it).
pub fn waits_in_migrating(phase: Option<TenantPhase>, facts: &SchemaFacts) -> bool {
    let never_ready = matches!(
        phase,
        None | Some(TenantPhase::Pending | TenantPhase::Provisioning | TenantPhase::Migrating)
    );
    never_ready && facts.target.is_some_and(|target| facts.at != Some(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(
        target: Option<&'a str>,
        at: Option<&'a str>,
        job: Option<&'a Outcome>,
    ) -> SchemaFacts<'a> {
        SchemaFacts {
            target,
            at,
            job,
            suspended: false,
        }
    }

    #[test]
    fn schema_ready_says_where_the_tenant_stands() {
        let failed = Outcome::Failed {
            reason: "MigrationFailed".into(),
            message: "check constraint \"price_positive\" is violated by some row".into(),
        };
        let running = Outcome::Running;
        /// The condition's status and reason, or no condition.
        type Expected = Option<(bool, &'static str)>;
        // (what, facts, expected)
        let cases: [(&str, SchemaFacts, Expected); 7] = [
            ("no rollout", facts(None, Some("v1"), None), None),
            (
                "at the target",
                facts(Some("v2"), Some("v2"), None),
                Some((true, "AtTarget")),
            ),
            (
                "behind, waiting",
                facts(Some("v2"), Some("v1"), None),
                Some((false, "Behind")),
            ),
            (
                "never migrated",
                facts(Some("v2"), None, None),
                Some((false, "Behind")),
            ),
            (
                "migrating",
                facts(Some("v2"), Some("v1"), Some(&running)),
                Some((false, "Migrating")),
            ),
            (
                "failed",
                facts(Some("v2"), Some("v1"), Some(&failed)),
                Some((false, "MigrationFailed")),
            ),
            (
                "suspended",
                SchemaFacts {
                    suspended: true,
                    ..facts(Some("v2"), Some("v1"), None)
                },
                Some((false, "Suspended")),
            ),
        ];
        for (what, facts, expected) in cases {
            let got = schema_ready(&facts);
            assert_eq!(
                got.as_ref().map(|c| (c.status, c.reason.as_str())),
                expected,
                "{what}: {got:?}"
            );
        }
        let message = schema_ready(&facts(Some("v2"), Some("v1"), Some(&failed)))
            .map(|c| c.message)
            .unwrap_or_default();
        assert!(
            message.contains("at v1") && message.contains("price_positive"),
            "{message}"
        );
    }

    #[test]
    fn only_a_tenant_never_ready_waits_for_its_migration() {
        use TenantPhase::*;
        let behind = facts(Some("v2"), Some("v1"), None);
        let new = facts(Some("v2"), None, None);
        let at_target = facts(Some("v2"), Some("v2"), None);
        let no_rollout = facts(None, None, None);
        let cases: [(&str, Option<TenantPhase>, &SchemaFacts, bool); 7] = [
            ("new, a target exists", Some(Provisioning), &new, true),
            ("first reconcile", None, &new, true),
            ("still migrating", Some(Migrating), &new, true),
            ("migrated", Some(Migrating), &at_target, false),
            (
                "no rollout: Ready as before",
                Some(Provisioning),
                &no_rollout,
                false,
            ),
            (
                "Ready, a new rollout: stays Ready",
                Some(Ready),
                &behind,
                false,
            ),
            ("suspended stays as it is", Some(Suspended), &behind, false),
        ];
        for (what, phase, facts, expected) in cases {
            assert_eq!(waits_in_migrating(phase, facts), expected, "{what}");
        }
    }
}
