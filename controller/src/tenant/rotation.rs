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
//! Not wired in yet: this is the plan the reconciler will follow.

use std::time::Duration;

use jiff::Timestamp;
use silo_crds::CredentialsStatus;

/// What the tenant's credentials need now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing, until `next` (then look again), or for good.
    Idle { next: Option<Timestamp> },
    /// Give `to` a new password, prove it, point the Secret at it; the current login becomes the
    /// previous one until the overlap ends.
    Rotate { to: String },
    /// The overlap is over: `login` can no longer log in (its open sessions keep running).
    Retire { login: String },
}

/// The login roles of the owner role `owner`: `<owner>_a` and `<owner>_b`, cut to fit 63 bytes.
pub fn logins(owner: &str) -> [String; 2] {
    ["_a", "_b"].map(|suffix| {
        let keep = 63 - suffix.len();
        let mut end = owner.len().min(keep);
        while !owner.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}{suffix}", &owner[..end])
    })
}

/// The login a rotation moves to: the one of the pair not in use (from the owner itself, as a
/// tenant made before rotation existed logs in: the first).
pub fn next_login(owner: &str, current: Option<&str>) -> String {
    let [a, b] = logins(owner);
    if current == Some(a.as_str()) { b } else { a }
}

/// The next step for a tenant whose owner role is `owner`.
pub fn next_step(
    owner: &str,
    every: Option<Duration>,
    requested: Option<&str>,
    status: &CredentialsStatus,
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
    let rotate = || Step::Rotate {
        to: next_login(owner, status.login.as_deref()),
    };
    let asked = requested.filter(|r| !r.is_empty());
    if asked.is_some() && asked != status.requested.as_deref() {
        return rotate();
    }
    let Some(every) = every else {
        return Step::Idle { next: None };
    };
    let since = status.rotated_at.as_ref().map_or(created, |t| t.0);
    let due = jiff::SignedDuration::try_from(every)
        .ok()
        .and_then(|every| since.checked_add(every).ok())
        .unwrap_or(Timestamp::MAX);
    if now >= due {
        rotate()
    } else {
        Step::Idle { next: Some(due) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const OWNER: &str = "t_shop_acme";

    fn at(text: &str) -> Timestamp {
        text.parse().expect("a time")
    }

    fn day() -> Option<Duration> {
        Some(Duration::from_secs(86400))
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
            next_step(OWNER, None, Some("2"), &asked, created, now),
            Step::Rotate {
                to: "t_shop_acme_b".into()
            }
        );
        assert_eq!(
            next_step(OWNER, None, Some("1"), &asked, created, now),
            Step::Idle { next: None }
        );
        assert_eq!(
            next_step(OWNER, None, Some(""), &asked, created, now),
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
            next_step(OWNER, day(), Some("3"), &overlapping, created, now),
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
                created,
                at("2026-12-02T01:10:00Z")
            ),
            Step::Retire {
                login: "t_shop_acme_a".into()
            }
        );
    }
}
