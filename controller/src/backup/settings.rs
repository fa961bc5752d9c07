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
        check_destination(&self.destination).map_err(|e| format!("destination: {e}"))
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
    fn the_defaults_need_nothing_else() {
        let settings: BackupSettings = serde_json::from_str("{}").expect("empty settings");
        assert_eq!(settings, BackupSettings::default());
        assert_eq!(settings.check(), Ok(()));
        let bad: Result<BackupSettings, _> = serde_json::from_str(r#"{"destnation": "x"}"#);
        assert!(bad.is_err(), "a misspelt key is refused");
    }
}
