//! What the `silo` job runner reports through its termination message (JSON), as the controller
//! reads it.

pub use silo_crds::backup::RunnerReport as Report;

/// The report in a termination message; a message that is no report (the container died before
/// writing one, or a log tail) becomes a failure that quotes it.
pub fn parse(message: Option<&str>) -> Report {
    let Some(message) = message.map(str::trim).filter(|m| !m.is_empty()) else {
        return Report {
            error: Some("the runner ended without a report".into()),
            ..Report::default()
        };
    };
    serde_json::from_str(message).unwrap_or_else(|_| Report {
        error: Some(format!("the runner ended without a report: {message}")),
        ..Report::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports() {
        let ok = parse(Some(
            r#"{"ok":true,"bytes":1234,"sha256":"ab","uri":"file:///b/x.dump","verified":true}"#,
        ));
        assert!(ok.ok && ok.bytes == Some(1234) && ok.verified == Some(true));
        let failed = parse(Some(r#"{"ok":false,"error":"pg_dump exited 1"}"#));
        assert_eq!(
            (failed.ok, failed.error.as_deref()),
            (false, Some("pg_dump exited 1"))
        );
        let crashed = parse(Some("Segmentation fault"));
        assert!(!crashed.ok);
        assert!(
            crashed
                .error
                .unwrap_or_default()
                .contains("Segmentation fault")
        );
        assert!(!parse(None).ok);
    }
}
