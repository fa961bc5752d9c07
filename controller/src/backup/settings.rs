//! The fleet's backup settings (the chart's `backups` values, rendered to a JSON file and named
//! by `--backup-settings`): where dumps go, how the Job reaches the store, when and how often.
//! Checked at start, so that a bad file stops the controller with a message.

use std::path::Path;

use k8s_openapi::api::core::v1::Volume;
use serde::Deserialize;

/// The chart's `backups` values.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackupSettings {
    /// Where dumps go when a TenantBackup names no destination: `file:///path` or
    /// `s3://bucket/prefix`.
    #[serde(default = "default_destination")]
    pub destination: String,
    /// For `file://`: the volume mounted into backup and restore Jobs at the destination's path
    /// (a Volume without its name: `{persistentVolumeClaim: {claimName: backups}}`, `{hostPath: ...}`).
    #[serde(default)]
    pub volume: Option<Volume>,
    /// For `s3://`: the store's endpoint and the Secret with its credentials.
    #[serde(default)]
    pub s3: S3Settings,
    /// Backups running at once against one DatabaseServer.
    #[serde(default = "default_max_concurrent_per_server")]
    pub max_concurrent_per_server: usize,
    /// When every tenant is backed up: a five-field cron pattern (UTC); empty means no scheduled
    /// backups.
    #[serde(default)]
    pub schedule: String,
    /// How long after each occurrence the fleet's backups may start, each tenant at its own
    /// moment within it (e.g. `2h`).
    #[serde(default = "default_window")]
    pub window: String,
    /// Which scheduled backups are kept.
    #[serde(default)]
    pub retention: Retention,
    /// Verify every N-th scheduled backup of a tenant (0: never).
    #[serde(default)]
    pub verify_every: u32,
}

/// Which scheduled backups are kept; a tenant's newest successful backup always is.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retention {
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// E.g. `30d`; empty means no age limit.
    #[serde(default)]
    pub max_age: String,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            keep_last: default_keep_last(),
            max_age: String::new(),
        }
    }
}

fn default_keep_last() -> usize {
    7
}

fn default_window() -> String {
    "1h".into()
}

/// A duration such as `90s`, `2h` or `30d`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let (number, unit) = text.split_at(text.trim_end_matches(char::is_alphabetic).len());
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 90s, 15m, 2h or 30d"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => {
            return Err(format!(
                "{text:?} is not a duration such as 90s, 15m, 2h or 30d"
            ));
        }
    };
    Ok(std::time::Duration::from_secs(n * seconds))
}

fn default_max_concurrent_per_server() -> usize {
    2
}

/// How backup Jobs reach an S3-compatible store.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct S3Settings {
    /// The store's URL, e.g. `https://minio.storage.svc:9000`; empty means AWS.
    #[serde(default)]
    pub endpoint: String,
    #[serde(default)]
    pub region: String,
    /// Path-style requests (`endpoint/bucket/key`), which most S3-compatible stores need.
    #[serde(default)]
    pub path_style: bool,
    /// A Secret with keys `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`, looked up in each
    /// tenant's namespace (a Job reads Secrets of its own namespace only).
    #[serde(default)]
    pub credentials_secret: String,
}

fn default_destination() -> String {
    "file:///var/lib/silo/backups".into()
}

impl Default for BackupSettings {
    fn default() -> Self {
        BackupSettings {
            destination: default_destination(),
            volume: None,
            s3: S3Settings::default(),
            max_concurrent_per_server: default_max_concurrent_per_server(),
            schedule: String::new(),
            window: default_window(),
            retention: Retention::default(),
            verify_every: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackupSettingsError {
    #[error("reading backup settings {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("backup settings {path} are not valid: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("backup settings {path}: {message}")]
    Invalid { path: String, message: String },
}

impl BackupSettings {
    /// Reads and checks the settings file.
    pub fn load(path: &Path) -> Result<BackupSettings, BackupSettingsError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| BackupSettingsError::Read {
            path: shown.clone(),
            source,
        })?;
        let settings: BackupSettings =
            serde_json::from_str(&text).map_err(|source| BackupSettingsError::Parse {
                path: shown.clone(),
                source,
            })?;
        settings
            .check()
            .map_err(|message| BackupSettingsError::Invalid {
                path: shown,
                message,
            })?;
        Ok(settings)
    }

    fn check(&self) -> Result<(), String> {
        check_destination(&self.destination).map_err(|e| format!("destination: {e}"))?;
        let window = parse_duration(&self.window).map_err(|e| format!("window: {e}"))?;
        if !self.schedule.is_empty() {
            super::schedule::Schedule::parse(&self.schedule, window)?;
        }
        if !self.retention.max_age.is_empty() {
            parse_duration(&self.retention.max_age)
                .map_err(|e| format!("retention.maxAge: {e}"))?;
        }
        Ok(())
    }
}

impl BackupSettings {
    /// Whether a dump at `url` outlives the Job that writes or reads it: always for `s3://`; for
    /// `file://` only under the fleet's destination with a volume mounted there (otherwise the
    /// Job writes into its own pod's filesystem, reports success, and the dump goes with the pod).
    pub fn check_kept(&self, url: &str) -> Result<(), String> {
        let Some(path) = file_path(url) else {
            return Ok(());
        };
        match (file_path(&self.destination), &self.volume) {
            (Some(root), Some(_)) if Path::new(path).starts_with(root) => Ok(()),
            (Some(root), Some(_)) => Err(format!(
                "{url} is not under the backup volume, which is mounted at {root} \
                 (backups.destination)"
            )),
            _ => Err(format!(
                "{url} is on no volume: set the chart's backups.volume (a volume mounted at the \
                 destination's path) or an s3:// destination, or the dump would be lost with the \
                 Job's pod"
            )),
        }
    }
}

/// Whether `destination` is a URL Silo can write dumps to.
pub fn check_destination(destination: &str) -> Result<(), String> {
    match destination.split_once("://") {
        Some(("file", path)) if path.starts_with('/') && path.len() > 1 => Ok(()),
        Some(("s3", rest)) if !rest.is_empty() && !rest.starts_with('/') => Ok(()),
        Some((scheme, _)) if scheme != "file" && scheme != "s3" => Err(format!(
            "{destination:?}: unknown scheme {scheme:?} (file:///path or s3://bucket/prefix)"
        )),
        _ => Err(format!(
            "{destination:?} is not file:///path or s3://bucket/prefix"
        )),
    }
}

/// The path of a `file://` destination.
pub fn file_path(destination: &str) -> Option<&str> {
    destination.strip_prefix("file://")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_dump_is_kept_only_on_the_volume() {
        let bare = BackupSettings::default();
        assert_eq!(bare.check_kept("s3://bucket/x"), Ok(()));
        let error = bare
            .check_kept("file:///var/lib/silo/backups/ns/t")
            .expect_err("no volume keeps it");
        assert!(error.contains("backups.volume"), "{error}");

        let mounted = BackupSettings {
            volume: Some(Volume::default()),
            ..BackupSettings::default()
        };
        assert_eq!(
            mounted.check_kept("file:///var/lib/silo/backups/ns/t"),
            Ok(())
        );
        let error = mounted
            .check_kept("file:///var/lib/silo/backups2/ns/t")
            .expect_err("outside the volume");
        assert!(error.contains("not under the backup volume"), "{error}");
    }

    #[test]
    fn destinations() {
        for good in [
            "file:///var/lib/silo/backups",
            "s3://backups",
            "s3://backups/prod/eu",
        ] {
            assert_eq!(check_destination(good), Ok(()), "{good}");
        }
        for (bad, says) in [
            ("gs://bucket", "unknown scheme \"gs\""),
            ("file://relative", "is not file:///path"),
            ("file:///", "is not file:///path"),
            ("s3:///bucket", "is not file:///path"),
            ("/var/backups", "is not file:///path"),
        ] {
            let err = check_destination(bad).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn durations_and_schedules_are_checked() {
        assert_eq!(
            parse_duration("2h"),
            Ok(std::time::Duration::from_secs(7200))
        );
        assert_eq!(
            parse_duration("30d"),
            Ok(std::time::Duration::from_secs(30 * 86400))
        );
        assert!(parse_duration("2 hours").is_err());
        let bad: BackupSettings =
            serde_json::from_str(r#"{"schedule": "at three"}"#).expect("parses");
        assert!(bad.check().expect_err("not cron").contains("at three"));
        let bad: BackupSettings =
            serde_json::from_str(r#"{"retention": {"maxAge": "-3d"}}"#).expect("parses");
        assert!(
            bad.check()
                .expect_err("negative")
                .contains("retention.maxAge")
        );
    }

    #[test]
    fn the_defaults_need_nothing_else() {
        let settings: BackupSettings = serde_json::from_str("{}").expect("empty settings");
        assert_eq!(settings, BackupSettings::default());
        assert_eq!(settings.check(), Ok(()));
        let bad: Result<BackupSettings, _> = serde_json::from_str(r#"{"destnation": "x"}"#);
        assert!(bad.is_err(), "a misspelt key is refused");
    }
}
