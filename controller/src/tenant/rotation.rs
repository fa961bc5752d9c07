//! Password rotation without a failed login (pure): what the next step is, from the tenant's
//! policy, its `silo.dev/rotate` annotation and where its rotation stands.
//!
//! The tenant's owner role (the role named in its status) owns the database and every object in
//! it and never logs in once converted. Two login roles, `<owner>_a` and `<owner>_b`, are members
//! of it with `ALTER ROLE ... SET role = <owner>`, so whatever a session creates belongs to the
//! owner whichever login opened it. A rotation gives the login not in use a new password, proves
//! it by logging in, and only then points the Secret at it; the previous login keeps working for
//! the overlap (sessions it opened keep running after), then it can no longer log in.
//!
//! Its state lives on the Secret, written in the same patch as the credentials it describes
//! (annotations `silo.dev/previous-until`, `rotated-at`, `rotate-honoured`), so a crash between
//! steps leaves nothing half-said; the status shows it.

use std::time::Duration;

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use silo_crds::CredentialsStatus;
use silo_crds::contract;

use super::secret::Credentials;

/// How long the next login is in the Secret before the Secret switches to it: the router's
/// watch has seen it by then, so no client can read a password the router does not accept.
pub const PROPAGATION: Duration = Duration::from_secs(2);

/// How long the previous password works when the Tenant does not say.
pub const DEFAULT_OVERLAP: Duration = Duration::from_secs(600);

/// What the tenant's credentials need now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing, until `next` (then look again), or for good.
    Idle { next: Option<Timestamp> },
    /// Give `to` a new password, prove it, and put it in the Secret as the next login (which the
    /// router accepts at once).
    Rotate { to: String },
    /// [`PROPAGATION`] after `Rotate`: point the Secret at the next login; the current one
    /// becomes the previous one until the overlap ends.
    Promote,
    /// The overlap is over: `login` can no longer log in (its open sessions keep running).
    Retire { login: String },
}

/// The login roles of the owner role `owner` (see [`contract::login_roles`]).
pub fn logins(owner: &str) -> [String; 2] {
    contract::login_roles(owner)
}

/// The login a rotation moves to: the one of the pair not in use (from the owner itself, as a
/// tenant made before rotation existed logs in: the first).
pub fn next_login(owner: &str, current: Option<&str>) -> String {
    let [a, b] = logins(owner);
    if current == Some(a.as_str()) { b } else { a }
}

/// Where rotation stands, from the Secret's credentials and annotations (an annotation that does
/// not parse counts as absent).
pub fn state(
    credentials: &Credentials,
    annotations: &BTreeMap<String, String>,
    overlap: Duration,
) -> CredentialsStatus {
    let time = |key: &str| {
        annotations
            .get(key)
            .and_then(|t| t.parse::<Timestamp>().ok())
            .map(Time)
    };
    let rotated_at = time(contract::ROTATED_AT_ANNOTATION);
    // Without its end written (an annotation stripped by hand or by a tool), an overlap ends
    // `overlap` after the rotation; without either, at once.
    let overlap_until = time(contract::PREVIOUS_UNTIL_ANNOTATION).or_else(|| {
        let overlap = jiff::SignedDuration::try_from(overlap).ok()?;
        Some(Time(rotated_at.as_ref()?.0.checked_add(overlap).ok()?))
    });
    CredentialsStatus {
        login: Some(credentials.user.clone()),
        previous_login: credentials.previous.as_ref().map(|(user, _)| user.clone()),
        overlap_until: credentials.previous.as_ref().and(overlap_until),
        rotated_at,
        next_rotation: None,
        requested: annotations
            .get(contract::ROTATE_HONOURED_ANNOTATION)
            .cloned(),
    }
}

/// When the next scheduled rotation is due, if the tenant has a schedule.
pub fn next_rotation(
    every: Option<Duration>,
    status: &CredentialsStatus,
    created: Timestamp,
) -> Option<Timestamp> {
    let every = jiff::SignedDuration::try_from(every?).ok()?;
    let since = status.rotated_at.as_ref().map_or(created, |t| t.0);
    Some(since.checked_add(every).unwrap_or(Timestamp::MAX))
}

/// The next step for a tenant whose owner role is `owner`; `next_since` is when a rotation put
/// its next login in the Secret, if one did (`Some(None)`: a time that does not parse).
pub fn next_step(
    owner: &str,
    every: Option<Duration>,
    requested: Option<&str>,
    status: &CredentialsStatus,
    next_since: Option<Option<Timestamp>>,
    created: Timestamp,
    now: Timestamp,
) -> Step {
    let overlap_until = status.overlap_until.as_ref().map(|t| t.0);
    if let Some(previous) = &status.previous_login {
        return match overlap_until {
            Some(until) if now < until => Step::Idle { next: Some(until) },
            _ => Step::Retire {
                login: previous.clone(),
            },
        };
    }
    if let Some(since) = next_since {
        let due = since.and_then(|since| {
            let wait = jiff::SignedDuration::try_from(PROPAGATION).ok()?;
            since.checked_add(wait).ok()
        });
        return match due {
            Some(due) if now < due => Step::Idle { next: Some(due) },
            _ => Step::Promote,
        };
    }
    let rotate = || Step::Rotate {
        to: next_login(owner, status.login.as_deref()),
    };
    let asked = requested.filter(|r| !r.is_empty());
    if asked.is_some() && asked != status.requested.as_deref() {
        return rotate();
    }
    match next_rotation(every, status, created) {
        Some(due) if now >= due => rotate(),
        next => Step::Idle { next },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: &str = "t_shop_acme";

    fn at(text: &str) -> Timestamp {
        text.parse().expect("a time")
    }

    fn day() -> Option<Duration> {
        Some(Duration::from_secs(86400))
    }

    #[test]
    fn a_next_login_is_promoted_once_the_router_has_seen_it() {
        let created = at("2026-12-01T00:00:00Z");
        let state = CredentialsStatus {
            login: Some(OWNER.into()),
            ..Default::default()
        };
        let since = at("2026-12-02T00:00:00Z");
        let step = |next, now| next_step(OWNER, None, Some("1"), &state, next, created, now);
        assert_eq!(
            step(Some(Some(since)), at("2026-12-02T00:00:01Z")),
            Step::Idle {
                next: Some(at("2026-12-02T00:00:02Z"))
            }
        );
        assert_eq!(
            step(Some(Some(since)), at("2026-12-02T00:00:02Z")),
            Step::Promote
        );
        assert_eq!(step(Some(None), since), Step::Promote);
        assert_eq!(
            step(None, since),
            Step::Rotate {
                to: "t_shop_acme_a".into()
            }
        );
    }

    #[test]
    fn logins_alternate_and_fit() {
        assert_eq!(next_login(OWNER, None), "t_shop_acme_a");
        assert_eq!(next_login(OWNER, Some(OWNER)), "t_shop_acme_a");
        assert_eq!(next_login(OWNER, Some("t_shop_acme_a")), "t_shop_acme_b");
        assert_eq!(next_login(OWNER, Some("t_shop_acme_b")), "t_shop_acme_a");
        let long = "x".repeat(63);
        assert!(logins(&long).iter().all(|l| l.len() == 63));
        assert_ne!(logins(&long)[0], logins(&long)[1]);
    }

    #[test]
    fn rotations_come_when_due_or_asked_and_never_during_an_overlap() {
        let created = at("2026-12-01T00:00:00Z");
        let fresh = CredentialsStatus::default();
        // Without a policy or a request: never.
        assert_eq!(
            next_step(
                OWNER,
                None,
                None,
                &fresh,
                None,
                created,
                at("2027-06-01T00:00:00Z")
            ),
            Step::Idle { next: None }
        );
        // Every day: due a day after creation, then a day after each rotation.
        assert_eq!(
            next_step(
                OWNER,
                day(),
                None,
                &fresh,
                None,
                created,
                at("2026-12-01T12:00:00Z")
            ),
            Step::Idle {
                next: Some(at("2026-12-02T00:00:00Z"))
            }
        );
        assert_eq!(
            next_step(
                OWNER,
                day(),
                None,
                &fresh,
                None,
                created,
                at("2026-12-02T00:00:00Z")
            ),
            Step::Rotate {
                to: "t_shop_acme_a".into()
            }
        );
        // Asked with a new annotation value: at once; the same value again: no.
        let asked = CredentialsStatus {
            login: Some("t_shop_acme_a".into()),
            rotated_at: Some(Time(at("2026-12-02T00:00:00Z"))),
            requested: Some("1".into()),
            ..Default::default()
        };
        let now = at("2026-12-02T01:00:00Z");
        assert_eq!(
            next_step(OWNER, None, Some("2"), &asked, None, created, now),
            Step::Rotate {
                to: "t_shop_acme_b".into()
            }
        );
        assert_eq!(
            next_step(OWNER, None, Some("1"), &asked, None, created, now),
            Step::Idle { next: None }
        );
        assert_eq!(
            next_step(OWNER, None, Some(""), &asked, None, created, now),
            Step::Idle { next: None },
            "an empty annotation asks for nothing"
        );
        // During the overlap nothing else starts; after it the previous login is retired.
        let overlapping = CredentialsStatus {
            previous_login: Some("t_shop_acme_a".into()),
            overlap_until: Some(Time(at("2026-12-02T01:10:00Z"))),
            ..asked.clone()
        };
        assert_eq!(
            next_step(OWNER, day(), Some("3"), &overlapping, None, created, now),
            Step::Idle {
                next: Some(at("2026-12-02T01:10:00Z"))
            }
        );
        assert_eq!(
            next_step(
                OWNER,
                day(),
                Some("3"),
                &overlapping,
                None,
                created,
                at("2026-12-02T01:10:00Z")
            ),
            Step::Retire {
                login: "t_shop_acme_a".into()
            }
        );
    }
}
