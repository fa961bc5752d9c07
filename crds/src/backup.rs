//! What the `silo` job runner reports when it ends: one JSON object, written to the Job's
//! termination message (and stdout), which the controller parses into a TenantBackup's or
//! TenantRestore's status.

use serde::{Deserialize, Serialize};

/// Kubernetes keeps at most 4096 bytes of a container's termination message.
pub const TERMINATION_MESSAGE_LIMIT: usize = 4096;

/// The outcome of one `silo backup` or `silo restore` run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunnerReport {
    /// Whether the run did everything it was asked to (for a verified backup: the check passed).
    pub ok: bool,
    /// Size of the dump in bytes (written, or read back by a restore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Lowercase hex SHA-256 of the dump.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Where the dump is (`file:///...` or `s3://bucket/...`); set once the object exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Where the backup's manifest is; set once it was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// Set when verification was asked for: whether the restored copy had the source's row counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// The tables whose row counts differed after a verifying restore.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mismatches: Vec<TableMismatch>,
    /// How many mismatches were left out to keep the report within the termination-message limit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub mismatches_omitted: usize,
    /// Why the run failed, for a person; never holds a password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One table whose row count in the restored copy differs from the source's in the dump's snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TableMismatch {
    /// `schema.table`, quoted where PostgreSQL would need quotes.
    pub table: String,
    /// Rows in the source, in the dump's snapshot; `None` when the table was missing there.
    pub source: Option<i64>,
    /// Rows in the restored copy; `None` when the table was missing there.
    pub restored: Option<i64>,
}

/// The manifest written next to a backup's object (`<name>.json`), after the object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupManifest {
    /// `namespace/name` of the Tenant.
    pub tenant: String,
    /// The DatabaseServer the dump was taken from.
    pub server: String,
    /// The PostgreSQL server's version (`server_version`).
    pub postgres_version: String,
    /// The pg_dump that wrote the object (`pg_dump --version`).
    pub pg_dump_version: String,
    /// The tenant's schema version at the time, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<String>,
    /// The object's name next to this manifest.
    pub object: String,
    pub bytes: u64,
    pub sha256: String,
    /// RFC 3339 times the dump started and the upload completed.
    pub start: String,
    pub end: String,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl RunnerReport {
    /// The report as one line of JSON of at most `limit` bytes: mismatches that do not fit are
    /// counted in `mismatchesOmitted`, and a long error keeps its beginning and its end.
    pub fn to_json_within(&self, limit: usize) -> String {
        let mut report = self.clone();
        loop {
            let json = serde_json::to_string(&report).unwrap_or_else(|_| fallback(&report));
            if json.len() <= limit {
                return json;
            }
            if report.mismatches.pop().is_some() {
                report.mismatches_omitted += 1;
                continue;
            }
            match &report.error {
                Some(error) if error.len() > 64 => {
                    let excess = json.len() - limit;
                    report.error = Some(shorten(error, error.len().saturating_sub(excess + 8)));
                }
                _ => return fallback(&report),
            }
        }
    }
}

/// A report too large in ways that cannot be cut (it never is in practice): just the verdict.
fn fallback(report: &RunnerReport) -> String {
    if report.ok {
        r#"{"ok":true}"#.to_string()
    } else {
        r#"{"ok":false,"error":"the report did not fit the termination message"}"#.to_string()
    }
}

/// `text` cut to about `max` bytes, keeping its head and its tail (the cause is often at the end).
fn shorten(text: &str, max: usize) -> String {
    const MARK: &str = " … ";
    if text.len() <= max {
        return text.to_string();
    }
    let keep = max.saturating_sub(MARK.len()) / 2;
    let mut head = keep;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len() - keep;
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{}{MARK}{}", &text[..head], &text[tail..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_round_trips_in_camel_case_without_empty_fields() {
        let report = RunnerReport {
            ok: true,
            bytes: Some(42),
            sha256: Some("ab".into()),
            uri: Some("s3://b/p/x.dump".into()),
            manifest: Some("s3://b/p/x.json".into()),
            verified: Some(true),
            ..Default::default()
        };
        let json = report.to_json_within(TERMINATION_MESSAGE_LIMIT);
        assert_eq!(
            json,
            r#"{"ok":true,"bytes":42,"sha256":"ab","uri":"s3://b/p/x.dump","manifest":"s3://b/p/x.json","verified":true}"#
        );
        assert_eq!(
            serde_json::from_str::<RunnerReport>(&json).expect("parses"),
            report
        );
    }

    #[test]
    fn a_report_with_many_mismatches_and_a_long_error_stays_within_the_limit() {
        let report = RunnerReport {
            ok: false,
            verified: Some(false),
            mismatches: (0..500)
                .map(|i| TableMismatch {
                    table: format!("public.table_number_{i}"),
                    source: Some(i),
                    restored: None,
                })
                .collect(),
            error: Some(format!("start {} the cause", "x".repeat(10_000))),
            ..Default::default()
        };
        let json = report.to_json_within(TERMINATION_MESSAGE_LIMIT);
        assert!(json.len() <= TERMINATION_MESSAGE_LIMIT, "{}", json.len());
        let back: RunnerReport = serde_json::from_str(&json).expect("parses");
        assert_eq!(back.mismatches.len() + back.mismatches_omitted, 500);
        let error = back.error.expect("error kept");
        assert!(error.starts_with("start "), "{error}");
        assert!(error.ends_with(" the cause"), "{error}");
    }

    #[test]
    fn shorten_respects_char_boundaries() {
        let text = "é".repeat(100);
        let short = shorten(&text, 51);
        assert!(short.len() <= 51 + 2, "{}", short.len());
        assert!(short.contains('…'));
    }
}
