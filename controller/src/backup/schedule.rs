//! Scheduled backups (pure): when each tenant's backup of a cron slot starts (spread over the
//! window by the tenant's uid, the same on every restart), its TenantBackup's name (one per
//! slot, so a restarted controller never takes two), which backups retention removes, and whether
//! the tenant is backed up recently enough.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::Cron;

use crate::jobs::short_hash;

/// A parsed schedule: the cron pattern, and the window its backups are spread over.
#[derive(Clone, Debug)]
pub struct Schedule {
    cron: Cron,
    window: Duration,
}

impl Schedule {
    /// `pattern` is a five-field cron pattern (UTC); `window` how long after each occurrence the
    /// fleet's backups may start.
    pub fn parse(pattern: &str, window: Duration) -> Result<Schedule, String> {
        let cron = Cron::from_str(pattern).map_err(|e| format!("schedule {pattern:?}: {e}"))?;
        Ok(Schedule { cron, window })
    }

    /// The tenant's place in the window: the same for the same uid.
    pub fn offset(&self, uid: &str) -> Duration {
        let window = self.window.as_secs().max(1);
        let hash = u64::from_str_radix(&short_hash(uid, 8), 16).unwrap_or(0);
        Duration::from_secs(hash % window)
    }

    /// The slot whose backup of this tenant is due at `now`: the latest occurrence that, plus
    /// the tenant's offset, is not after `now`.
    pub fn due(&self, uid: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let offset = chrono::Duration::from_std(self.offset(uid)).ok()?;
        self.cron
            .find_previous_occurrence(&(now - offset), true)
            .ok()
    }

    /// The interval between two occurrences around `now` (for "recently enough").
    pub fn interval(&self, now: DateTime<Utc>) -> Option<Duration> {
        let next = self.cron.find_next_occurrence(&now, false).ok()?;
        let after = self.cron.find_next_occurrence(&next, false).ok()?;
        (after - next).to_std().ok()
    }
}

/// The TenantBackup of `tenant` for `slot`: `<tenant>-<yyyymmddhhmm>` (a Tenant name is at most
/// 63 characters, so this fits any object name).
pub fn backup_name(tenant: &str, slot: DateTime<Utc>) -> String {
    format!("{tenant}-{}", slot.format("%Y%m%d%H%M"))
}

/// A finished scheduled backup, as retention sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finished {
    pub name: String,
    pub created: DateTime<Utc>,
    pub succeeded: bool,
}

/// The backups retention deletes: beyond the newest `keep_last`, or older than `max_age`; never
/// the newest successful one.
pub fn expired(
    backups: &[Finished],
    keep_last: usize,
    max_age: Option<Duration>,
    now: DateTime<Utc>,
) -> Vec<String> {
    let mut newest_first: Vec<&Finished> = backups.iter().collect();
    newest_first.sort_by(|a, b| b.created.cmp(&a.created).then(b.name.cmp(&a.name)));
    let newest_good = newest_first
        .iter()
        .find(|b| b.succeeded)
        .map(|b| b.name.clone());
    newest_first
        .iter()
        .enumerate()
        .filter(|(i, b)| {
            let too_many = *i >= keep_last;
            let too_old = max_age.is_some_and(|age| {
                (now - b.created)
                    .to_std()
                    .is_ok_and(|elapsed| elapsed > age)
            });
            (too_many || too_old) && Some(&b.name) != newest_good.as_ref()
        })
        .map(|(_, b)| b.name.clone())
        .collect()
}

/// Whether the tenant is backed up: its last success is at most two intervals old, and its last
/// attempt did not fail. None: nothing to say yet (never attempted, and new).
pub fn backed_up(
    last_success: Option<DateTime<Utc>>,
    last_failure: Option<(DateTime<Utc>, String)>,
    interval: Duration,
    created: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Option<(bool, &'static str, String)> {
    let limit = chrono::Duration::from_std(interval * 2).ok()?;
    if let Some((failed_at, error)) = &last_failure
        && last_success.is_none_or(|ok| *failed_at > ok)
    {
        return Some((
            false,
            "BackupFailed",
            format!("the last backup failed: {error}"),
        ));
    }
    match last_success {
        Some(ok) if now - ok > limit => Some((
            false,
            "Stale",
            format!(
                "the last successful backup is from {ok}, more than twice the schedule's interval ago"
            ),
        )),
        Some(ok) => Some((true, "BackedUp", format!("last successful backup at {ok}"))),
        None if now - created > limit => Some((
            false,
            "NeverBackedUp",
            "no backup has succeeded since the tenant was created".into(),
        )),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().expect("a timestamp")
    }

    #[test]
    fn starts_are_spread_over_the_window_and_stable() {
        let schedule = Schedule::parse("0 3 * * *", Duration::from_secs(2 * 3600)).expect("valid");
        let offsets: Vec<Duration> = (0..200)
            .map(|i| schedule.offset(&format!("uid-{i}")))
            .collect();
        assert!(offsets.iter().all(|o| *o < Duration::from_secs(7200)));
        let first_half = offsets
            .iter()
            .filter(|o| **o < Duration::from_secs(3600))
            .count();
        assert!(
            (70..=130).contains(&first_half),
            "{first_half} of 200 in the first hour"
        );
        assert_eq!(schedule.offset("uid-7"), schedule.offset("uid-7"));

        let uid = "uid-7";
        let start = at("2026-12-02T03:00:00Z")
            + chrono::Duration::from_std(schedule.offset(uid)).expect("small");
        let before = start - chrono::Duration::seconds(1);
        assert_eq!(
            schedule.due(uid, before),
            Some(at("2026-12-01T03:00:00Z")),
            "yesterday's slot until its start"
        );
        assert_eq!(schedule.due(uid, start), Some(at("2026-12-02T03:00:00Z")));
        assert_eq!(
            backup_name("acme", at("2026-12-02T03:00:00Z")),
            "acme-202612020300"
        );
        assert_eq!(
            schedule.interval(at("2026-12-02T10:00:00Z")),
            Some(Duration::from_secs(86400))
        );
    }

    #[test]
    fn a_bad_pattern_says_so() {
        let err = Schedule::parse("every night", Duration::ZERO).expect_err("not cron");
        assert!(err.contains("every night"), "{err}");
    }

    #[test]
    fn retention_never_deletes_the_newest_success() {
        let b = |name: &str, created: &str, succeeded: bool| Finished {
            name: name.into(),
            created: at(created),
            succeeded,
        };
        let now = at("2026-12-10T00:00:00Z");
        let backups = [
            b("d1", "2026-12-01T03:00:00Z", true),
            b("d2", "2026-12-02T03:00:00Z", true),
            b("d3", "2026-12-03T03:00:00Z", false),
            b("d4", "2026-12-04T03:00:00Z", false),
        ];
        assert_eq!(
            expired(&backups, 2, None, now),
            ["d1"],
            "d2 is the newest success"
        );
        assert_eq!(
            expired(&backups[..2], 1, None, now),
            ["d1"],
            "keepLast 1 keeps the newest"
        );
        let old = expired(&backups, 10, Some(Duration::from_secs(7 * 86400)), now);
        assert_eq!(old, ["d1"], "maxAge: d2 is old too, but the newest success");
    }

    #[test]
    fn backed_up_goes_false_when_stale_or_failed() {
        let day = Duration::from_secs(86400);
        let created = at("2026-11-01T00:00:00Z");
        let now = at("2026-12-10T12:00:00Z");
        let recent = Some(at("2026-12-10T03:00:00Z"));
        assert_eq!(
            backed_up(recent, None, day, created, now).map(|b| b.0),
            Some(true)
        );
        let stale = Some(at("2026-12-07T03:00:00Z"));
        assert_eq!(
            backed_up(stale, None, day, created, now).map(|b| b.1),
            Some("Stale")
        );
        let failed = Some((at("2026-12-10T04:00:00Z"), "pg_dump exited 1".to_string()));
        let (ok, reason, message) = backed_up(recent, failed, day, created, now).expect("said");
        assert_eq!((ok, reason), (false, "BackupFailed"));
        assert!(message.contains("pg_dump exited 1"));
        assert_eq!(
            backed_up(None, None, day, now, now),
            None,
            "a new tenant: nothing yet"
        );
    }
}
