//! What a TenantBackup's status says at each step, and what its success or failure writes on the
//! Tenant (pure).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use silo_crds::conditions::{self, BACKED_UP, COMPLETE, Desired};
use silo_crds::{JobPhase, LastBackup, TenantBackupStatus};

use super::report::Report;

/// Waiting: for the tenant to be Ready, for a place under the server's cap, for its server.
pub fn pending(
    current: &TenantBackupStatus,
    reason: &str,
    message: &str,
    now: Time,
) -> TenantBackupStatus {
    TenantBackupStatus {
        phase: Some(JobPhase::Pending),
        conditions: conditions::merge(
            &current.conditions,
            &[Desired::new(COMPLETE, false, reason, message)],
            None,
            now,
        ),
        ..current.clone()
    }
}

/// Its Job was created on `server`.
pub fn running(current: &TenantBackupStatus, server: &str, now: Time) -> TenantBackupStatus {
    let message = format!("pg_dump of the tenant's database on {server} is running");
    TenantBackupStatus {
        phase: Some(JobPhase::Running),
        server: Some(server.to_string()),
        start_time: current.start_time.clone().or(Some(now.clone())),
        conditions: conditions::merge(
            &current.conditions,
            &[Desired::new(COMPLETE, false, "Running", message)],
            None,
            now,
        ),
        ..current.clone()
    }
}

/// Failed before or without a report: `error` says why.
pub fn failed(
    current: &TenantBackupStatus,
    reason: &str,
    error: &str,
    now: Time,
) -> TenantBackupStatus {
    TenantBackupStatus {
        phase: Some(JobPhase::Failed),
        completion_time: Some(now.clone()),
        error: Some(error.to_string()),
        conditions: conditions::merge(
            &current.conditions,
            &[Desired::new(COMPLETE, false, reason, error)],
            None,
            now,
        ),
        ..current.clone()
    }
}

/// Its Job ended with `report`. A backup succeeds only with an object, its size and its sha256,
/// and (when verified) matching row counts.
pub fn finished(current: &TenantBackupStatus, report: &Report, now: Time) -> TenantBackupStatus {
    let complete = report.ok && report.uri.is_some() && report.sha256.is_some();
    if !complete {
        let error = match (&report.error, report.verified) {
            (Some(error), _) => error.clone(),
            (None, Some(false)) => not_verified(report),
            (None, _) => "the runner reported no object".to_string(),
        };
        let reason = if report.verified == Some(false) {
            "NotVerified"
        } else {
            "BackupFailed"
        };
        let mut status = failed(current, reason, &error, now);
        // An object that failed verification exists: say where, so it can be inspected.
        status.uri = report.uri.clone();
        status.sha256 = report.sha256.clone();
        status.bytes = report.bytes.and_then(|b| i64::try_from(b).ok());
        status.verified = report.verified;
        return status;
    }
    let bytes = report.bytes.and_then(|b| i64::try_from(b).ok());
    let message = match report.verified {
        Some(true) => "dumped, stored and verified: every table's rows restored",
        _ => "dumped and stored",
    };
    TenantBackupStatus {
        phase: Some(JobPhase::Succeeded),
        completion_time: Some(now.clone()),
        uri: report.uri.clone(),
        bytes,
        sha256: report.sha256.clone(),
        verified: report.verified,
        error: None,
        conditions: conditions::merge(
            &current.conditions,
            &[Desired::new(COMPLETE, true, "Succeeded", message)],
            None,
            now,
        ),
        ..current.clone()
    }
}

fn not_verified(report: &Report) -> String {
    let tables: Vec<String> = report
        .mismatches
        .iter()
        .map(|m| {
            let count = |n: Option<i64>| n.map_or("missing".to_string(), |n| n.to_string());
            format!(
                "{} ({} rows in the dump's snapshot, {} restored)",
                m.table,
                count(m.source),
                count(m.restored)
            )
        })
        .collect();
    let more = match report.mismatches_omitted {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    format!("verification failed: {}{more}", tables.join(", "))
}

/// What a finished backup writes on its Tenant: its newest success, if this one is newer, and the
/// `BackedUp` condition.
pub fn on_tenant(
    name: &str,
    status: &TenantBackupStatus,
    last: Option<&LastBackup>,
) -> (Option<LastBackup>, Desired) {
    match (status.phase, &status.uri, &status.completion_time) {
        (Some(JobPhase::Succeeded), Some(uri), Some(time)) => {
            let newer = last.is_none_or(|l| l.time.0 <= time.0);
            let backup = LastBackup {
                name: name.to_string(),
                time: time.clone(),
                uri: uri.clone(),
                bytes: status.bytes.unwrap_or(0),
            };
            let message = format!("TenantBackup {name} stored {uri}");
            (
                newer.then_some(backup).or_else(|| last.cloned()),
                Desired::new(BACKED_UP, true, "Succeeded", message),
            )
        }
        _ => {
            let error = status.error.clone().unwrap_or_default();
            let message = format!("TenantBackup {name} failed: {error}");
            (
                last.cloned(),
                Desired::new(BACKED_UP, false, "BackupFailed", message),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use silo_crds::backup::TableMismatch;

    fn at(s: &str) -> Time {
        Time(s.parse().expect("a timestamp"))
    }

    fn ok_report() -> Report {
        Report {
            ok: true,
            bytes: Some(4096),
            sha256: Some("ab".repeat(32)),
            uri: Some("file:///backups/shop/acme/acme-1.dump".into()),
            ..Report::default()
        }
    }

    #[test]
    fn a_backup_succeeds_only_with_its_object() {
        let now = at("2026-12-02T03:00:00Z");
        let running = running(&TenantBackupStatus::default(), "pg-main", now.clone());
        let done = finished(&running, &ok_report(), at("2026-12-02T03:01:00Z"));
        assert_eq!(done.phase, Some(JobPhase::Succeeded));
        assert_eq!(done.bytes, Some(4096));
        assert_eq!(done.start_time, Some(now));
        assert!(conditions::is_true(&done.conditions, COMPLETE));

        let no_object = Report {
            uri: None,
            ..ok_report()
        };
        let failed = finished(&running, &no_object, at("2026-12-02T03:01:00Z"));
        assert_eq!(failed.phase, Some(JobPhase::Failed));
        assert_eq!(
            failed.error.as_deref(),
            Some("the runner reported no object")
        );

        let pg_dump = Report {
            ok: false,
            error: Some("pg_dump exited with status 1: connection refused".into()),
            ..Report::default()
        };
        let failed = finished(&running, &pg_dump, at("2026-12-02T03:01:00Z"));
        assert_eq!(
            failed.error.as_deref(),
            Some("pg_dump exited with status 1: connection refused")
        );
        assert_eq!(failed.uri, None, "no object, no uri");
    }

    #[test]
    fn a_verification_that_fails_names_the_tables() {
        let report = Report {
            ok: false,
            verified: Some(false),
            mismatches: vec![TableMismatch {
                table: "public.orders".into(),
                source: Some(10),
                restored: Some(9),
            }],
            mismatches_omitted: 2,
            ..ok_report()
        };
        let status = finished(
            &TenantBackupStatus::default(),
            &report,
            at("2026-12-02T03:01:00Z"),
        );
        assert_eq!(status.phase, Some(JobPhase::Failed));
        assert_eq!(status.verified, Some(false));
        assert_eq!(
            status.error.as_deref(),
            Some(
                "verification failed: public.orders (10 rows in the dump's snapshot, 9 restored) and 2 more"
            )
        );
    }

    #[test]
    fn the_tenant_keeps_its_newest_success() {
        let older = LastBackup {
            name: "acme-1".into(),
            time: at("2026-12-01T03:00:00Z"),
            uri: "file:///b/acme-1.dump".into(),
            bytes: 1,
        };
        let done = finished(
            &TenantBackupStatus::default(),
            &ok_report(),
            at("2026-12-02T03:00:00Z"),
        );
        let (last, condition) = on_tenant("acme-2", &done, Some(&older));
        assert_eq!(last.map(|l| l.name), Some("acme-2".into()));
        assert!(condition.status);

        let late = finished(
            &TenantBackupStatus::default(),
            &ok_report(),
            at("2026-11-30T03:00:00Z"),
        );
        let (last, _) = on_tenant("acme-0", &late, Some(&older));
        assert_eq!(
            last.map(|l| l.name),
            Some("acme-1".into()),
            "an older one never replaces it"
        );

        let failed = failed(
            &TenantBackupStatus::default(),
            "BackupFailed",
            "pg_dump exited with status 1",
            at("2026-12-02T03:00:00Z"),
        );
        let (last, condition) = on_tenant("acme-3", &failed, Some(&older));
        assert_eq!(
            last.map(|l| l.name),
            Some("acme-1".into()),
            "a failure keeps the last success"
        );
        assert!(!condition.status);
        assert_eq!(condition.reason, "BackupFailed");
    }
}
