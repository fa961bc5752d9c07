//! What a DatabaseServer's status says after a health check, and what is announced about it (pure).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use silo_crds::conditions::{self, Desired, HARDENED, READY};
use silo_crds::{DatabaseServerStatus, TombstoneEntry, Tombstones};

use crate::sql::ddl;

/// A health check that failed: the condition reason and the message a person reads.
#[derive(Clone, Debug)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

/// A health check that passed.
#[derive(Clone, Debug)]
pub struct Healthy {
    pub version: String,
    pub retained: Vec<String>,
    /// Soonest purge first.
    pub tombstones: Vec<ddl::TombstoneRow>,
    pub username: String,
    pub hardened: Desired,
}

/// The status after a check: conditions merged into `current`; a failed check keeps the last
/// known version and retained databases. Equal to `current` when nothing changed.
pub fn status(
    check: &Result<Healthy, Problem>,
    current: &DatabaseServerStatus,
    tenants: usize,
    generation: Option<i64>,
    now: Time,
) -> DatabaseServerStatus {
    let (desired, version, retained, tombstones) = match check {
        Ok(h) => (
            vec![
                Desired::new(
                    READY,
                    true,
                    "Connected",
                    format!("connected as {} to PostgreSQL {}", h.username, h.version),
                ),
                h.hardened.clone(),
            ],
            Some(h.version.clone()),
            h.retained.clone(),
            listed(&h.tombstones),
        ),
        Err(p) => (
            vec![Desired::new(READY, false, p.reason, &p.message)],
            current.version.clone(),
            current.retained.clone(),
            current.tombstones.clone(),
        ),
    };
    DatabaseServerStatus {
        observed_generation: generation,
        conditions: conditions::merge(&current.conditions, &desired, generation, now),
        version,
        tenants: i32::try_from(tenants).unwrap_or(i32::MAX),
        retained,
        tombstones,
    }
}

/// The tombstones as status shows them: all counted, the first [`Tombstones::LISTED`] listed.
pub fn listed(rows: &[ddl::TombstoneRow]) -> Option<Tombstones> {
    if rows.is_empty() {
        return None;
    }
    let items = rows
        .iter()
        .filter_map(|row| {
            let tombstone = row.identity.tombstone.as_ref()?;
            Some(TombstoneEntry {
                tenant: row.identity.tenant.clone(),
                database: row.database.clone(),
                deleted: tombstone.deleted.clone(),
                purge_after: tombstone.purge_after.clone(),
                backup: tombstone.backup.clone(),
            })
        })
        .take(Tombstones::LISTED)
        .collect();
    Some(Tombstones {
        count: i32::try_from(rows.len()).unwrap_or(i32::MAX),
        items,
    })
}

/// Whether a tombstone's grace period has ended at `now` (an unreadable time never ends: a
/// database is never dropped on a guess).
pub fn purge_due(row: &ddl::TombstoneRow, now: jiff::Timestamp) -> bool {
    row.identity
        .tombstone
        .as_ref()
        .and_then(|t| t.purge_after.parse::<jiff::Timestamp>().ok())
        .is_some_and(|at| at <= now)
}

/// What a changed status is announced with (a log line and an Event each), in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Announcement {
    /// PUBLIC may use the maintenance databases, newly or for a new reason.
    Exposed { reason: String, message: String },
    /// Ready after not being ready.
    Connected { version: String },
    /// Not ready, for a reason no condition shows yet.
    NotReady {
        reason: &'static str,
        message: String,
    },
}

/// The announcements of a check whose status differs from `current`.
pub fn announcements(
    check: &Result<Healthy, Problem>,
    current: &DatabaseServerStatus,
) -> Vec<Announcement> {
    let mut out = Vec::new();
    let was_ready = conditions::is_true(&current.conditions, READY);
    if let Ok(h) = check {
        let hardened = &h.hardened;
        let known = current.conditions.iter().find(|c| c.type_ == HARDENED);
        if !hardened.status && known.is_none_or(|c| c.reason != hardened.reason) {
            out.push(Announcement::Exposed {
                reason: hardened.reason.clone(),
                message: hardened.message.clone(),
            });
        }
    }
    match (check, was_ready) {
        (Ok(h), false) => out.push(Announcement::Connected {
            version: h.version.clone(),
        }),
        (Err(p), _) if current.conditions.iter().all(|c| c.reason != p.reason) => {
            out.push(Announcement::NotReady {
                reason: p.reason,
                message: p.message.clone(),
            });
        }
        _ => {}
    }
    out
}

/// The `Hardened` condition for what PUBLIC may still do.
pub fn hardened_condition(grants: &[ddl::PublicGrant], revoking: bool) -> Desired {
    if grants.is_empty() {
        return Desired::new(
            HARDENED,
            true,
            "NoPublicAccess",
            "PUBLIC can neither connect to nor create in the maintenance databases",
        );
    }
    let list: Vec<String> = grants.iter().map(ToString::to_string).collect();
    let advice = if revoking {
        "revoking them did not take: the admin role must own these databases and schemas or be superuser"
    } else {
        "every tenant role can use them; set spec.revokePublicAccess: true to have Silo revoke them, or revoke them by hand"
    };
    Desired::new(
        HARDENED,
        false,
        "PublicAccess",
        format!("PUBLIC may {}; {advice}", list.join(", ")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    type Check = Result<Healthy, Problem>;

    fn at(second: i64) -> Time {
        Time(jiff::Timestamp::from_second(second).expect("in range"))
    }

    fn healthy(hardened: Desired) -> Result<Healthy, Problem> {
        Ok(Healthy {
            version: "16.4".into(),
            retained: vec!["t_old_gone".into()],
            tombstones: Vec::new(),
            username: "silo_admin".into(),
            hardened,
        })
    }

    fn tombstone(n: usize, purge_after: &str) -> ddl::TombstoneRow {
        use crate::sql::identity::{Claimant, Identity, Tombstone};
        let key = format!("shop/t{n}");
        let comment = Claimant {
            key: &key,
            uid: "u",
        }
        .tombstone_comment(&Tombstone {
            deleted: "2026-12-01T00:00:00Z".into(),
            purge_after: purge_after.into(),
            backup: format!("s3://b/shop/t{n}/t{n}-final.dump"),
        });
        ddl::TombstoneRow {
            database: format!("t_shop_t{n}"),
            owner: format!("t_shop_t{n}"),
            identity: Identity::parse(Some(&comment)).expect("parses"),
            comment,
        }
    }

    #[test]
    fn tombstones_are_all_counted_and_the_first_listed() {
        assert_eq!(listed(&[]), None, "no tombstones, no field");
        let rows: Vec<_> = (0..25)
            .map(|n| tombstone(n, "2026-12-08T00:00:00Z"))
            .collect();
        let shown = listed(&rows).expect("some");
        assert_eq!(shown.count, 25);
        assert_eq!(shown.items.len(), silo_crds::Tombstones::LISTED);
        assert_eq!(shown.items[3].tenant, "shop/t3");
        assert_eq!(shown.items[3].backup, "s3://b/shop/t3/t3-final.dump");
        assert_eq!(shown.items[3].purge_after, "2026-12-08T00:00:00Z");
    }

    #[test]
    fn a_purge_is_due_only_once_its_time_has_come() {
        let now: jiff::Timestamp = "2026-12-08T00:00:00Z".parse().expect("time");
        assert!(purge_due(&tombstone(1, "2026-12-07T23:59:59Z"), now));
        assert!(purge_due(&tombstone(1, "2026-12-08T00:00:00Z"), now));
        assert!(!purge_due(&tombstone(1, "2026-12-08T00:00:01Z"), now));
        assert!(
            !purge_due(&tombstone(1, "soon"), now),
            "an unreadable time never purges"
        );
    }

    fn problem(reason: &'static str) -> Result<Healthy, Problem> {
        Err(Problem {
            reason,
            message: format!("{reason} happened"),
        })
    }

    fn grants() -> Vec<ddl::PublicGrant> {
        vec![ddl::PublicGrant::Connect {
            database: "postgres".into(),
        }]
    }

    fn hardened() -> Desired {
        hardened_condition(&[], false)
    }

    fn exposed() -> Desired {
        hardened_condition(&grants(), false)
    }

    /// The status a server has after `check` was its first.
    fn after(check: &Result<Healthy, Problem>) -> DatabaseServerStatus {
        status(check, &DatabaseServerStatus::default(), 0, Some(1), at(1))
    }

    #[test]
    fn a_check_sets_ready_and_keeps_what_a_failed_one_cannot_know() {
        let ok = after(&healthy(hardened()));
        assert!(conditions::is_true(&ok.conditions, READY));
        assert!(conditions::is_true(&ok.conditions, HARDENED));
        let ready = ok.conditions.iter().find(|c| c.type_ == READY);
        assert_eq!(
            ready.map(|c| (c.reason.as_str(), c.message.as_str())),
            Some(("Connected", "connected as silo_admin to PostgreSQL 16.4"))
        );
        assert_eq!(ok.version.as_deref(), Some("16.4"));
        assert_eq!(ok.retained, ["t_old_gone"]);

        // Then unreachable: Ready flips, the rest is what was last known.
        let down = status(&problem("Unreachable"), &ok, 3, Some(1), at(2));
        let ready = down.conditions.iter().find(|c| c.type_ == READY);
        assert_eq!(
            ready.map(|c| (c.status.as_str(), c.reason.as_str(), c.message.as_str())),
            Some(("False", "Unreachable", "Unreachable happened"))
        );
        assert!(conditions::is_true(&down.conditions, HARDENED));
        assert_eq!(down.version.as_deref(), Some("16.4"));
        assert_eq!(down.retained, ["t_old_gone"]);
        assert_eq!(down.tenants, 3);

        // The same check again changes nothing, so nothing is written.
        assert_eq!(status(&healthy(hardened()), &ok, 0, Some(1), at(5)), ok);
        assert_eq!(
            status(&problem("Unreachable"), &down, 3, Some(1), at(5)),
            down
        );
        assert_eq!(
            status(&healthy(hardened()), &ok, usize::MAX, Some(1), at(1)).tenants,
            i32::MAX
        );
    }

    #[test]
    fn changes_are_announced_once() {
        let connected = Announcement::Connected {
            version: "16.4".into(),
        };
        let exposed_now = Announcement::Exposed {
            reason: "PublicAccess".into(),
            message: exposed().message,
        };
        let not_ready = |reason: &'static str| Announcement::NotReady {
            reason,
            message: format!("{reason} happened"),
        };
        let never = DatabaseServerStatus::default();
        let ready = after(&healthy(hardened()));
        let ready_exposed = after(&healthy(exposed()));
        let unreachable = after(&problem("Unreachable"));
        #[rustfmt::skip]
        let cases: Vec<(&str, Check, &DatabaseServerStatus, Vec<Announcement>)> = vec![
            ("first connection", healthy(hardened()), &never, vec![connected.clone()]),
            ("first connection, exposed", healthy(exposed()), &never, vec![exposed_now.clone(), connected.clone()]),
            ("still ready", healthy(hardened()), &ready, vec![]),
            ("exposed since", healthy(exposed()), &ready, vec![exposed_now]),
            ("still exposed", healthy(exposed()), &ready_exposed, vec![]),
            ("back after a failure", healthy(hardened()), &unreachable, vec![connected]),
            ("fails", problem("Unreachable"), &ready, vec![not_ready("Unreachable")]),
            ("fails again the same way", problem("Unreachable"), &unreachable, vec![]),
            ("fails another way", problem("AdminSecretMissing"), &unreachable, vec![not_ready("AdminSecretMissing")]),
        ];
        for (situation, check, current, expected) in cases {
            assert_eq!(announcements(&check, current), expected, "{situation}");
        }
    }

    #[test]
    fn hardened_names_every_public_grant() {
        let grants = [
            ddl::PublicGrant::Connect {
                database: "postgres".into(),
            },
            ddl::PublicGrant::Create {
                database: "template1".into(),
                schema: "public".into(),
            },
        ];
        let c = hardened_condition(&grants, false);
        assert!(!c.status);
        assert_eq!(c.reason, "PublicAccess");
        assert!(
            c.message.starts_with(
                "PUBLIC may CONNECT to database postgres, CREATE in schema public of database template1;"
            ),
            "{}",
            c.message
        );
        assert!(c.message.contains("spec.revokePublicAccess"));
        assert!(hardened_condition(&[], false).status);
        assert!(
            hardened_condition(&grants, true)
                .message
                .contains("did not take")
        );
    }
}
