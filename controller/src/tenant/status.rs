//! What a Tenant's status says in each situation, and the Event a phase change announces (pure).
//! The reconciler decides which situation it is in; the words and reasons are all here.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::events::EventType;
use silo_crds::conditions::{self, DATABASE_READY, Desired, READY, ROUTED};
use silo_crds::routing;
use silo_crds::{CredentialsStatus, DeletionPolicy, FINALIZER, Tenant, TenantPhase, TenantStatus};

use super::secret::secret_name;
use crate::error::Error;
use crate::sql::TenantNames;
use crate::sql::ddl::Change;

/// The status a reconcile step wants to show.
#[derive(Clone, Debug)]
pub struct Report {
    /// Write only if the Tenant is still at this resourceVersion.
    pub precondition: Option<String>,
    pub phase: TenantPhase,
    pub server: Option<String>,
    pub database: Option<String>,
    pub role: Option<String>,
    pub secret_name: Option<String>,
    pub conditions: Vec<Desired>,
    /// Where password rotation stands, once a pass has read the Secret.
    pub credentials: Option<CredentialsStatus>,
}

impl Report {
    pub fn new(phase: TenantPhase) -> Self {
        Report {
            precondition: None,
            phase,
            server: None,
            database: None,
            role: None,
            secret_name: None,
            conditions: Vec::new(),
            credentials: None,
        }
    }

    pub fn credentials(mut self, credentials: CredentialsStatus) -> Self {
        self.credentials = Some(credentials);
        self
    }

    /// Placed on `server`; the phase stays what it was once provisioning has completed.
    pub fn placed(
        previous: Option<TenantPhase>,
        server: &str,
        names: &TenantNames,
        tenant_name: &str,
    ) -> Self {
        let phase = match previous {
            None | Some(TenantPhase::Pending) => TenantPhase::Provisioning,
            Some(phase) => phase,
        };
        Report {
            precondition: None,
            phase,
            server: Some(server.to_string()),
            database: Some(names.database.clone()),
            role: Some(names.role.clone()),
            secret_name: Some(secret_name(tenant_name)),
            conditions: Vec::new(),
            credentials: None,
        }
    }

    /// The write fails with a conflict if the Tenant changed since `tenant` was read: for the
    /// writes made while it is unplaced, which another install may be placing at the same time.
    pub fn unless_changed_since(mut self, tenant: &Tenant) -> Self {
        self.precondition = tenant.metadata.resource_version.clone();
        self
    }

    pub fn phase(mut self, phase: TenantPhase) -> Self {
        self.phase = phase;
        self
    }

    pub fn condition(mut self, condition: Desired) -> Self {
        self.conditions.retain(|c| c.type_ != condition.type_);
        self.conditions.push(condition);
        self
    }

    pub fn failing(&self, reason: &str, message: &str) -> Self {
        self.clone()
            .condition(Desired::new(DATABASE_READY, false, reason, message))
            .condition(Desired::new(READY, false, reason, message))
    }

    /// The status to store: this report merged into `current` (equal to `current` when nothing
    /// changed, and then not written).
    pub fn status(
        &self,
        current: &TenantStatus,
        generation: Option<i64>,
        now: Time,
    ) -> TenantStatus {
        TenantStatus {
            observed_generation: generation,
            phase: Some(self.phase),
            conditions: conditions::merge(&current.conditions, &self.conditions, generation, now),
            server: self.server.clone().or(current.server.clone()),
            database: self.database.clone().or(current.database.clone()),
            role: self.role.clone().or(current.role.clone()),
            secret_name: self.secret_name.clone().or(current.secret_name.clone()),
            // The SchemaRollout reconciler's field: kept for the comparison, left out of the
            // write (see `Pass::write`).
            schema_version: current.schema_version.clone(),
            last_backup: current.last_backup.clone(),
            credentials: self
                .credentials
                .clone()
                .or_else(|| current.credentials.clone()),
        }
    }

    /// The Event announcing a phase change from `previous`, if this report changes the phase.
    pub fn phase_event(&self, previous: Option<TenantPhase>) -> Option<PhaseEvent> {
        // Provisioning is announced by its end (Ready names the server), not by its start.
        if previous == Some(self.phase) || self.phase == TenantPhase::Provisioning {
            return None;
        }
        let message = self
            .conditions
            .iter()
            .find(|c| c.type_ == READY)
            .map(|c| c.message.clone());
        let (type_, reason) = match self.phase {
            TenantPhase::Pending => (EventType::Warning, "Pending"),
            TenantPhase::Failed => (EventType::Warning, "Failed"),
            phase => (EventType::Normal, phase_reason(phase)),
        };
        Some(PhaseEvent {
            type_,
            reason,
            note: message.unwrap_or_else(|| format!("phase {}", self.phase)),
        })
    }
}

/// An Event to publish about the tenant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseEvent {
    pub type_: EventType,
    pub reason: &'static str,
    pub note: String,
}

fn phase_reason(phase: TenantPhase) -> &'static str {
    match phase {
        TenantPhase::Pending => "Pending",
        TenantPhase::Provisioning => "Provisioning",
        TenantPhase::Migrating => "Migrating",
        TenantPhase::Ready => "Ready",
        TenantPhase::Suspended => "Suspended",
        TenantPhase::Restoring => "Restoring",
        TenantPhase::Deleting => "Deleting",
        TenantPhase::Failed => "Failed",
    }
}

/// No server can take the tenant (yet): it waits, Pending.
pub fn unplaceable(reason: &str, message: &str) -> Report {
    Report::new(TenantPhase::Pending)
        .condition(Desired::new(READY, false, reason, message))
        .condition(Desired::new(DATABASE_READY, false, reason, message))
}

/// The tenant's server is not (or no longer) a DatabaseServer: the tenant stays placed on it.
pub fn server_gone(placed: &Report, server: &str) -> Report {
    let message = format!(
        "DatabaseServer {server} does not exist; the tenant stays placed on it until it returns"
    );
    placed.failing("ServerGone", &message)
}

/// A step failed with `err`; a name held by something else is Failed, since retrying cannot help.
pub fn failed(placed: &Report, err: &Error) -> Report {
    let failing = placed.failing(err.reason(), &err.to_string());
    if matches!(err, Error::NameConflict { .. }) {
        failing.phase(TenantPhase::Failed)
    } else {
        failing
    }
}

/// Role and database exist as declared: Ready, or Suspended when the tenant is suspended.
pub fn provisioned(
    placed: Report,
    suspended: bool,
    database: &str,
    server: &str,
    tenant_name: &str,
) -> Report {
    let provisioned = Desired::new(
        DATABASE_READY,
        true,
        "Provisioned",
        "role and database exist as declared",
    );
    if suspended {
        placed
            .phase(TenantPhase::Suspended)
            .condition(provisioned)
            .condition(Desired::new(
                READY,
                false,
                "Suspended",
                "the tenant is suspended: its role cannot log in",
            ))
    } else {
        let message = format!(
            "database {database} on {server} accepts the credentials in Secret {}",
            secret_name(tenant_name)
        );
        placed
            .phase(TenantPhase::Ready)
            .condition(provisioned)
            .condition(Desired::new(READY, true, "Ready", message))
    }
}

/// A TenantRestore restores into the tenant's database: locked until it ends.
pub fn restoring(provisioned: Report, restore: &str) -> Report {
    let message = format!(
        "TenantRestore {restore} is restoring the database: logins are refused until it ends"
    );
    provisioned
        .phase(TenantPhase::Restoring)
        .condition(Desired::new(READY, false, "Restoring", message))
}

/// A provisioned tenant that was never Ready waits in `Migrating` until its namespace's target
/// SchemaRollout migrated it to `version`.
pub fn migrating(provisioned: Report, version: &str, rollout: &str) -> Report {
    let message = format!(
        "role and database exist; Ready once migrated to schema version {version} by SchemaRollout {rollout}"
    );
    provisioned
        .phase(TenantPhase::Migrating)
        .condition(Desired::new(READY, false, "Migrating", message))
}

/// The Tenant is being deleted: its deletion policy is being carried out.
pub fn deleting(placed: Report, policy: DeletionPolicy) -> Report {
    placed.phase(TenantPhase::Deleting).condition(Desired::new(
        READY,
        false,
        "Deleting",
        format!("deleting with policy {policy:?}"),
    ))
}

/// The Tenant is being deleted but its server is gone: the policy waits for it (or for a person).
pub fn deletion_waits_for_server(
    deleting: &Report,
    server: &str,
    policy: DeletionPolicy,
    database: &str,
) -> Report {
    let message = format!(
        "DatabaseServer {server} no longer exists, so deletion policy {policy:?} cannot be carried out; \
         re-create the DatabaseServer, or remove the finalizer {FINALIZER} to leave database {database} as it is"
    );
    deleting.failing("ServerGone", &message)
}

/// The repairs worth a `DriftRepaired` Event, joined: only for a tenant past provisioning whose
/// role or database someone changed (first-time provisioning is not drift).
pub fn drift_repaired(previous: Option<TenantPhase>, changes: &[Change]) -> Option<String> {
    let repairs: Vec<String> = changes
        .iter()
        .filter(|c| c.is_repair())
        .map(|c| c.to_string())
        .collect();
    let provisioned =
        previous.is_some_and(|p| p != TenantPhase::Provisioning && p != TenantPhase::Pending);
    (!repairs.is_empty() && provisioned).then(|| repairs.join(", "))
}

/// The note of a `DriftRepaired` Event.
pub fn drift_note(server: &str, repairs: &str) -> String {
    format!("repaired on {server}: {repairs}")
}

/// The `Routed` condition for a tenant's contested routes.
pub fn routed_condition(contests: &[routing::Contest]) -> Desired {
    let describe = |kept: bool| -> Vec<String> {
        contests
            .iter()
            .filter(|c| c.kept == kept)
            .map(|c| format!("{} (also claimed by {})", c.route, c.other))
            .collect()
    };
    let (lost, kept) = (describe(false), describe(true));
    if !lost.is_empty() {
        let mut message = format!(
            "claimed first by another Tenant, so not routed here: {}",
            lost.join(", ")
        );
        if !kept.is_empty() {
            message.push_str(&format!("; kept: {}", kept.join(", ")));
        }
        return Desired::new(ROUTED, false, "RouteConflict", message);
    }
    if !kept.is_empty() {
        return Desired::new(
            ROUTED,
            true,
            "RouteContested",
            format!(
                "routed here, as the first claim; later claims are refused: {}",
                kept.join(", ")
            ),
        );
    }
    Desired::new(
        ROUTED,
        true,
        "Routed",
        "no other Tenant claims these routes",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::identity::Conflict;
    use silo_crds::routing::{Contest, Route};

    const SERVER: &str = "pg-1";

    fn names() -> TenantNames {
        TenantNames::derive("shop", "acme")
    }

    fn placed(previous: Option<TenantPhase>) -> Report {
        Report::placed(previous, SERVER, &names(), "acme")
    }

    fn name_conflict() -> Error {
        Error::NameConflict {
            conflict: Conflict {
                object: "role",
                name: "t_shop_acme".into(),
                holder: "nobody Silo knows".into(),
            },
            server: SERVER.into(),
        }
    }

    /// `(status, reason)` of the condition of `type_`, if the report sets it.
    fn condition(report: &Report, type_: &str) -> Option<(bool, String)> {
        report
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status, c.reason.clone()))
    }

    /// A condition as a table expects it: `(status, reason)`, or not set.
    type Shown<'a> = Option<(bool, &'a str)>;
    /// An Event as a table expects it: `(type, reason, note)`, or none.
    type Announced<'a> = Option<(EventType, &'a str, String)>;

    #[test]
    fn each_situation_shows_its_phase_and_conditions() {
        use TenantPhase::*;
        let deleting_delete = deleting(placed(Some(Ready)), DeletionPolicy::Delete);
        #[rustfmt::skip]
        let cases: Vec<(&str, Report, TenantPhase, Shown, Shown)> = vec![
            // situation, report, phase, Ready, DatabaseReady
            ("pending: no server fits",
                unplaceable("NoServer", "no DatabaseServer matches"),
                Pending, Some((false, "NoServer")), Some((false, "NoServer"))),
            ("placed and ready, first time",
                provisioned(placed(None), false, "t_shop_acme", SERVER, "acme"),
                Ready, Some((true, "Ready")), Some((true, "Provisioned"))),
            ("placed and ready, after a wait",
                provisioned(placed(Some(Pending)), false, "t_shop_acme", SERVER, "acme"),
                Ready, Some((true, "Ready")), Some((true, "Provisioned"))),
            ("suspended",
                provisioned(placed(Some(Ready)), true, "t_shop_acme", SERVER, "acme"),
                Suspended, Some((false, "Suspended")), Some((true, "Provisioned"))),
            ("resumed",
                provisioned(placed(Some(Suspended)), false, "t_shop_acme", SERVER, "acme"),
                Ready, Some((true, "Ready")), Some((true, "Provisioned"))),
            ("server gone while provisioning",
                server_gone(&placed(None), SERVER),
                Provisioning, Some((false, "ServerGone")), Some((false, "ServerGone"))),
            ("server gone once ready: the phase stays",
                server_gone(&placed(Some(Ready)), SERVER),
                Ready, Some((false, "ServerGone")), Some((false, "ServerGone"))),
            ("server not connected",
                failed(&placed(None), &Error::ServerNotConnected { server: SERVER.into() }),
                Provisioning, Some((false, "ServerNotConnected")), Some((false, "ServerNotConnected"))),
            ("secret belongs to someone else",
                failed(&placed(Some(Ready)), &Error::Secret {
                    namespace: "shop".into(), name: "acme-db".into(), message: "not ours".into(),
                }),
                Ready, Some((false, "SecretInvalid")), Some((false, "SecretInvalid"))),
            ("name conflict: Failed",
                failed(&placed(None), &name_conflict()),
                Failed, Some((false, "NameConflict")), Some((false, "NameConflict"))),
            ("name conflict once ready: Failed",
                failed(&placed(Some(Ready)), &name_conflict()),
                Failed, Some((false, "NameConflict")), Some((false, "NameConflict"))),
            ("deleting with policy Delete",
                deleting_delete.clone(),
                Deleting, Some((false, "Deleting")), None),
            ("deleting with policy Retain",
                deleting(placed(Some(Suspended)), DeletionPolicy::Retain),
                Deleting, Some((false, "Deleting")), None),
            ("deleting while the server is gone",
                deletion_waits_for_server(&deleting_delete, SERVER, DeletionPolicy::Delete, "t_shop_acme"),
                Deleting, Some((false, "ServerGone")), Some((false, "ServerGone"))),
        ];
        for (situation, report, phase, ready, database_ready) in cases {
            let own = |c: Option<(bool, &str)>| c.map(|(s, r)| (s, r.to_string()));
            assert_eq!(report.phase, phase, "{situation}: phase");
            assert_eq!(condition(&report, READY), own(ready), "{situation}: Ready");
            assert_eq!(
                condition(&report, DATABASE_READY),
                own(database_ready),
                "{situation}: DatabaseReady"
            );
        }
    }

    #[test]
    fn placed_reports_where_and_under_which_names() {
        let report = placed(None);
        assert_eq!(report.server.as_deref(), Some(SERVER));
        assert_eq!(report.database.as_deref(), Some("t_shop_acme"));
        assert_eq!(report.role.as_deref(), Some("t_shop_acme"));
        assert_eq!(report.secret_name.as_deref(), Some("acme-db"));
        let pending = unplaceable("NoServer", "none");
        assert_eq!((pending.server, pending.database), (None, None));
    }

    #[test]
    fn messages_say_what_to_do() {
        let message = |report: &Report| {
            report
                .conditions
                .iter()
                .find(|c| c.type_ == READY)
                .map(|c| c.message.clone())
                .unwrap_or_default()
        };
        let ready = provisioned(placed(None), false, "t_shop_acme", SERVER, "acme");
        assert_eq!(
            message(&ready),
            "database t_shop_acme on pg-1 accepts the credentials in Secret acme-db"
        );
        let suspended = provisioned(placed(None), true, "t_shop_acme", SERVER, "acme");
        assert_eq!(
            message(&suspended),
            "the tenant is suspended: its role cannot log in"
        );
        assert_eq!(
            message(&server_gone(&placed(None), SERVER)),
            "DatabaseServer pg-1 does not exist; the tenant stays placed on it until it returns"
        );
        assert_eq!(
            message(&failed(&placed(None), &name_conflict())),
            name_conflict().to_string()
        );
        let deleting = deleting(placed(Some(TenantPhase::Ready)), DeletionPolicy::Retain);
        assert_eq!(message(&deleting), "deleting with policy Retain");
        assert_eq!(
            message(&deletion_waits_for_server(
                &deleting,
                SERVER,
                DeletionPolicy::Retain,
                "t_shop_acme"
            )),
            format!(
                "DatabaseServer pg-1 no longer exists, so deletion policy Retain cannot be carried out; \
                 re-create the DatabaseServer, or remove the finalizer {FINALIZER} to leave database t_shop_acme as it is"
            )
        );
    }

    #[test]
    fn a_phase_change_is_announced_once() {
        use TenantPhase::*;
        let ready = provisioned(placed(None), false, "t_shop_acme", SERVER, "acme");
        let ready_note = "database t_shop_acme on pg-1 accepts the credentials in Secret acme-db";
        let pending = unplaceable("NoServer", "no DatabaseServer matches");
        let failed = failed(&placed(Some(Ready)), &name_conflict());
        let deleting = deleting(placed(Some(Ready)), DeletionPolicy::Delete);
        #[rustfmt::skip]
        let cases: Vec<(Option<TenantPhase>, Report, Announced)> = vec![
            (None, placed(None), None), // its end says it
            (Some(Pending), placed(Some(Pending)), None),
            (Some(Provisioning), ready.clone(), Some((EventType::Normal, "Ready", ready_note.into()))),
            (Some(Ready), ready.clone(), None),
            (None, pending.clone(), Some((EventType::Warning, "Pending", "no DatabaseServer matches".into()))),
            (Some(Pending), pending.clone(), None),
            (Some(Ready), failed, Some((EventType::Warning, "Failed", name_conflict().to_string()))),
            (Some(Ready), deleting.clone(), Some((EventType::Normal, "Deleting", "deleting with policy Delete".into()))),
            (Some(Deleting), deleting.clone(), None),
            // Without a Ready condition the note names the phase.
            (Some(Ready), Report::new(Suspended), Some((EventType::Normal, "Suspended", "phase Suspended".into()))),
        ];
        for (previous, report, expected) in cases {
            let event = report
                .phase_event(previous)
                .map(|e| (e.type_, e.reason, e.note));
            assert_eq!(event, expected, "{previous:?} -> {:?}", report.phase);
        }
    }

    #[test]
    fn status_keeps_what_the_report_leaves_out_and_is_unchanged_when_nothing_changed() {
        let now = Time(jiff::Timestamp::from_second(1_000).expect("in range"));
        let later = Time(jiff::Timestamp::from_second(2_000).expect("in range"));
        let ready = provisioned(placed(None), false, "t_shop_acme", SERVER, "acme");
        let first = ready.status(&TenantStatus::default(), Some(3), now.clone());
        assert_eq!(first.phase, Some(TenantPhase::Ready));
        assert_eq!(first.observed_generation, Some(3));
        assert_eq!(first.server.as_deref(), Some(SERVER));
        // The same report again: nothing to write, transition times kept.
        assert_eq!(ready.status(&first, Some(3), later.clone()), first);
        // A report without placement keeps the recorded one.
        let deleting = Report::new(TenantPhase::Deleting);
        let next = deleting.status(&first, Some(4), later);
        assert_eq!(next.server.as_deref(), Some(SERVER));
        assert_eq!(next.database.as_deref(), Some("t_shop_acme"));
        assert_eq!(next.secret_name.as_deref(), Some("acme-db"));
        assert_eq!(next.phase, Some(TenantPhase::Deleting));
        assert_eq!(next.conditions, first.conditions);
    }

    #[test]
    fn drift_is_announced_only_past_provisioning() {
        use TenantPhase::*;
        let repaired = [
            Change::RoleCreated,
            Change::PasswordReset,
            Change::LoginChanged,
        ];
        let fresh = [Change::RoleCreated, Change::DatabaseCreated];
        let announced = Some("password reset to the Secret's, login switched".to_string());
        #[rustfmt::skip]
        let cases: Vec<(Option<TenantPhase>, &[Change], Option<String>)> = vec![
            (None, &repaired, None),
            (Some(Pending), &repaired, None),
            (Some(Provisioning), &repaired, None),
            (Some(Ready), &repaired, announced.clone()),
            (Some(Suspended), &repaired, announced.clone()),
            (Some(Failed), &repaired, announced),
            (Some(Ready), &fresh, None),
            (Some(Ready), &[], None),
        ];
        for (previous, changes, expected) in cases {
            assert_eq!(
                drift_repaired(previous, changes),
                expected,
                "{previous:?} {changes:?}"
            );
        }
        assert_eq!(
            drift_note(SERVER, "login switched"),
            "repaired on pg-1: login switched"
        );
    }

    fn contest(host: &str, other: &str, kept: bool) -> Contest {
        Contest {
            route: Route {
                host: host.into(),
                path_prefix: String::new(),
            },
            other: other.into(),
            kept,
        }
    }

    #[test]
    fn routed_says_who_keeps_what() {
        let free = routed_condition(&[]);
        assert_eq!((free.status, free.reason.as_str()), (true, "Routed"));

        let kept = routed_condition(&[contest("a.example.com", "b/late", true)]);
        assert_eq!(
            (kept.status, kept.reason.as_str()),
            (true, "RouteContested")
        );
        assert!(
            kept.message
                .contains("host a.example.com (also claimed by b/late)")
        );

        let lost = routed_condition(&[
            contest("a.example.com", "b/early", false),
            contest("c.example.com", "d/late", true),
        ]);
        assert_eq!(
            (lost.status, lost.reason.as_str()),
            (false, "RouteConflict")
        );
        assert_eq!(
            lost.message,
            "claimed first by another Tenant, so not routed here: host a.example.com (also claimed by b/early); \
             kept: host c.example.com (also claimed by d/late)"
        );
    }
}
