//! The backup Job of one TenantBackup (pure): the `silo` job runner streaming `pg_dump` of the
//! tenant's database to the destination, with the tenant's connection from its Secret, the
//! store's credentials from the Secret the settings name, and the volume of a `file://`
//! destination mounted at its path.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, SecretKeySelector, Volume, VolumeMount,
};
use kube::ResourceExt;
use silo_crds::TenantBackup;
use silo_crds::contract::{self, keys};

use super::settings::{BackupSettings, file_path};
use crate::jobs::{JobSettings, fit_job_name, runner_job};

/// What the runner needs to know of the tenant.
pub struct Source<'a> {
    /// The tenant's namespace and name.
    pub namespace: &'a str,
    pub tenant: &'a str,
    /// The Secret (in the Job's namespace) with the connection under the tenant Secret's keys:
    /// the tenant Secret itself, or a locked tenant's temporary login.
    pub secret: String,
    pub server: &'a str,
    pub schema_version: Option<&'a str>,
    /// The scratch database a verifying backup restores into (created and dropped by the
    /// controller, owned by the tenant's role), as `postgres://host:port/database`: the runner
    /// logs in with the tenant's user and password from its environment.
    pub verify_into: Option<String>,
}

/// The Job's name: one per TenantBackup.
pub fn job_name(backup: &str) -> String {
    fit_job_name(backup, "-backup")
}

/// Where the dumps of `namespace/tenant` go under `destination`.
pub fn tenant_prefix(destination: &str, namespace: &str, tenant: &str) -> String {
    format!("{}/{namespace}/{tenant}", destination.trim_end_matches('/'))
}

pub fn from_secret(name: &str, secret: &str, key: &str, optional: bool) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(optional),
            }),
            ..Default::default()
        }),
    }
}

pub fn value(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

/// What a Job needs to reach the store at `url` (a destination or an object in it): the S3
/// settings and credentials in its environment, or the volume of a `file://` destination mounted
/// at the path of the fleet's destination.
pub fn store_access(
    url: &str,
    backups: &BackupSettings,
) -> (Vec<EnvVar>, Option<(Volume, VolumeMount)>) {
    let mut env = Vec::new();
    if url.starts_with("s3://") {
        let s3 = &backups.s3;
        if !s3.credentials_secret.is_empty() {
            for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
                env.push(from_secret(key, &s3.credentials_secret, key, false));
            }
        }
        if !s3.endpoint.is_empty() {
            env.push(value("AWS_ENDPOINT", &s3.endpoint));
            env.push(value(
                "AWS_ALLOW_HTTP",
                s3.endpoint.starts_with("http://").to_string(),
            ));
        }
        if !s3.region.is_empty() {
            env.push(value("AWS_REGION", &s3.region));
        }
        env.push(value(
            "AWS_VIRTUAL_HOSTED_STYLE_REQUEST",
            (!s3.path_style).to_string(),
        ));
        return (env, None);
    }
    let volume = match (file_path(&backups.destination), &backups.volume) {
        (Some(path), Some(volume))
            if file_path(url).is_some_and(|p| std::path::Path::new(p).starts_with(path)) =>
        {
            Some((
                Volume {
                    name: "backups".into(),
                    ..volume.clone()
                },
                VolumeMount {
                    name: "backups".into(),
                    mount_path: path.into(),
                    ..Default::default()
                },
            ))
        }
        _ => None,
    };
    (env, volume)
}

/// The backup Job of `backup`, writing to `destination`.
pub fn backup_job(
    backup: &TenantBackup,
    destination: &str,
    source: &Source,
    backups: &BackupSettings,
    settings: &JobSettings,
) -> Job {
    let secret = &source.secret;
    let mut env: Vec<EnvVar> = [
        ("PGHOST", keys::HOST),
        ("PGPORT", keys::PORT),
        ("PGDATABASE", keys::DBNAME),
        ("PGUSER", keys::USER),
        ("PGPASSWORD", keys::PASSWORD),
    ]
    .iter()
    .map(|(name, key)| from_secret(name, secret, key, false))
    .collect();
    let (store_env, volume) = store_access(destination, backups);
    env.extend(store_env);

    let mut args: Vec<String> = vec![
        "backup".into(),
        "--destination".into(),
        tenant_prefix(destination, source.namespace, source.tenant),
        "--name".into(),
        backup.name_any(),
        "--tenant".into(),
        format!("{}/{}", source.namespace, source.tenant),
        "--server".into(),
        source.server.into(),
    ];
    if let Some(version) = source.schema_version {
        args.extend(["--schema-version".into(), version.into()]);
    }
    if let Some(url) = &source.verify_into {
        args.extend(["--verify-into".into(), url.clone()]);
    }

    let (volumes, mounts) = match volume {
        Some((volume, mount)) => (Some(vec![volume]), Some(vec![mount])),
        None => (None, None),
    };
    let labels = BTreeMap::from([
        (
            contract::MANAGED_BY_LABEL.to_string(),
            contract::MANAGED_BY.to_string(),
        ),
        (
            contract::TENANT_LABEL.to_string(),
            source.tenant.to_string(),
        ),
        (contract::BACKUP_LABEL.to_string(), backup.name_any()),
        (
            contract::SERVER_LABEL.to_string(),
            crate::jobs::label_value(source.server),
        ),
    ]);
    let container = Container {
        name: "backup".into(),
        image: Some(settings.image.clone()),
        command: Some(vec!["silo".into()]),
        args: Some(args),
        env: Some(env),
        volume_mounts: mounts,
        // The runner writes its report (JSON) there; the controller reads it from the pod.
        termination_message_policy: Some("File".into()),
        ..Default::default()
    };
    runner_job(
        backup,
        job_name(&backup.name_any()),
        labels,
        container,
        volumes,
        settings,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::HostPathVolumeSource;
    use silo_crds::TenantBackupSpec;

    use crate::backup::settings::S3Settings;

    fn backup(destination: Option<&str>) -> TenantBackup {
        let mut backup = TenantBackup::new(
            "acme-20261202",
            TenantBackupSpec {
                tenant: "acme".into(),
                destination: destination.map(Into::into),
                verify: false,
            },
        );
        backup.metadata.namespace = Some("shop".into());
        backup.metadata.uid = Some("uid-1".into());
        backup
    }

    fn source() -> Source<'static> {
        Source {
            namespace: "shop",
            tenant: "acme",
            secret: contract::secret_name("acme"),
            server: "pg-main",
            schema_version: Some("v3"),
            verify_into: Some("postgres://pg.example:5432/t_shop_acme_verify".into()),
        }
    }

    fn container(job: &Job) -> Container {
        job.spec
            .clone()
            .and_then(|s| s.template.spec)
            .map(|p| p.containers[0].clone())
            .unwrap_or_default()
    }

    fn env(job: &Job) -> BTreeMap<String, String> {
        container(job)
            .env
            .unwrap_or_default()
            .into_iter()
            .map(|e| {
                let from = e
                    .value_from
                    .and_then(|f| f.secret_key_ref)
                    .map(|r| format!("secret {}/{}", r.name, r.key));
                (e.name, e.value.or(from).unwrap_or_default())
            })
            .collect()
    }

    #[test]
    fn a_file_backup_mounts_its_volume_and_reads_the_tenant_secret() {
        let backups = BackupSettings {
            destination: "file:///backups".into(),
            volume: Some(Volume {
                host_path: Some(HostPathVolumeSource {
                    path: "/srv/backups".into(),
                    type_: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let settings = JobSettings {
            image: "registry.example/silo:1".into(),
            ttl_seconds_after_finished: Some(60),
            ..Default::default()
        };
        let job = backup_job(
            &backup(None),
            "file:///backups",
            &source(),
            &backups,
            &settings,
        );
        assert_eq!(job.metadata.name.as_deref(), Some("acme-20261202-backup"));
        let c = container(&job);
        assert_eq!(c.image.as_deref(), Some("registry.example/silo:1"));
        assert_eq!(
            c.args.unwrap_or_default(),
            [
                "backup",
                "--destination",
                "file:///backups/shop/acme",
                "--name",
                "acme-20261202",
                "--tenant",
                "shop/acme",
                "--server",
                "pg-main",
                "--schema-version",
                "v3",
                "--verify-into",
                "postgres://pg.example:5432/t_shop_acme_verify"
            ]
        );
        let mounts = c.volume_mounts.unwrap_or_default();
        assert_eq!(mounts[0].mount_path, "/backups");
        let env = env(&job);
        assert_eq!(env["PGPASSWORD"], "secret acme-db/password");
        assert!(!env.contains_key("AWS_ENDPOINT"), "{env:?}");
        let spec = job.spec.unwrap_or_default();
        assert_eq!(spec.ttl_seconds_after_finished, None);
        assert_eq!(spec.backoff_limit, Some(0));
        assert_eq!(
            job.metadata.owner_references.unwrap_or_default()[0].kind,
            "TenantBackup"
        );
    }

    #[test]
    fn an_s3_backup_gets_the_store_and_its_credentials() {
        let backups = BackupSettings {
            s3: S3Settings {
                endpoint: "http://198.18.0.1:7070".into(),
                region: "us-east-1".into(),
                path_style: true,
                credentials_secret: "backup-s3".into(),
            },
            ..Default::default()
        };
        let job = backup_job(
            &backup(Some("s3://backups/prod")),
            "s3://backups/prod",
            &source(),
            &backups,
            &JobSettings::default(),
        );
        let env = env(&job);
        assert_eq!(env["AWS_ENDPOINT"], "http://198.18.0.1:7070");
        assert_eq!(env["AWS_ALLOW_HTTP"], "true");
        assert_eq!(env["AWS_VIRTUAL_HOSTED_STYLE_REQUEST"], "false");
        assert_eq!(
            env["AWS_SECRET_ACCESS_KEY"],
            "secret backup-s3/AWS_SECRET_ACCESS_KEY"
        );
        assert!(container(&job).volume_mounts.is_none());
    }
}
