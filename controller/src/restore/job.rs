//! The restore Job of one TenantRestore (pure): the `silo` runner streaming the object into
//! `pg_restore --single-transaction --role <tenant role>` on the tenant's database, logged in as
//! the restore's temporary login, checking the object's sha256 before anything commits.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Container;
use kube::ResourceExt;
use silo_crds::TenantRestore;
use silo_crds::contract;

use crate::backup::job::{from_secret, store_access};
use crate::backup::settings::BackupSettings;
use crate::jobs::{JobSettings, fit_job_name, runner_job};

/// Where the restore goes, and as whom.
pub struct Target {
    /// `postgres://host:port/database` of the tenant's database, without credentials.
    pub database_url: String,
    /// The tenant's role: what is restored belongs to it.
    pub role: String,
    /// The Secret with the restore login's `user` and `password`.
    pub login_secret: String,
}

pub fn job_name(restore: &str) -> String {
    fit_job_name(restore, "-restore")
}

/// The Secret holding the restore login's credentials.
pub fn secret_name(restore: &str) -> String {
    fit_job_name(restore, "-restore-login")
}

pub fn restore_job(
    restore: &TenantRestore,
    uri: &str,
    sha256: &str,
    target: &Target,
    backups: &BackupSettings,
    settings: &JobSettings,
) -> Job {
    let (mut env, volume) = store_access(uri, backups);
    env.push(from_secret("PGUSER", &target.login_secret, "user", false));
    env.push(from_secret(
        "PGPASSWORD",
        &target.login_secret,
        "password",
        false,
    ));
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
            restore.spec.tenant.clone(),
        ),
        (contract::RESTORE_LABEL.to_string(), restore.name_any()),
    ]);
    let container = Container {
        name: "restore".into(),
        image: Some(settings.image.clone()),
        command: Some(vec!["silo".into()]),
        args: Some(vec![
            "restore".into(),
            "--source".into(),
            uri.into(),
            "--sha256".into(),
            sha256.into(),
            "--into".into(),
            target.database_url.clone(),
            "--role".into(),
            target.role.clone(),
        ]),
        env: Some(env),
        volume_mounts: mounts,
        termination_message_policy: Some("File".into()),
        ..Default::default()
    };
    runner_job(
        restore,
        job_name(&restore.name_any()),
        labels,
        container,
        volumes,
        settings,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use silo_crds::{RestoreSource, TenantRestoreSpec};

    #[test]
    fn a_restore_logs_in_as_its_login_and_restores_as_the_tenant() {
        let mut restore = TenantRestore::new(
            "acme-back",
            TenantRestoreSpec {
                tenant: "acme".into(),
                from: RestoreSource {
                    backup: Some("acme-1".into()),
                    ..Default::default()
                },
            },
        );
        restore.metadata.namespace = Some("shop".into());
        let target = Target {
            database_url: "postgres://pg:5432/t_shop_acme".into(),
            role: "t_shop_acme".into(),
            login_secret: secret_name("acme-back"),
        };
        let job = restore_job(
            &restore,
            "s3://backups/shop/acme/acme-1.dump",
            &"ab".repeat(32),
            &target,
            &BackupSettings::default(),
            &JobSettings::default(),
        );
        let pod = job.spec.and_then(|s| s.template.spec).unwrap_or_default();
        let c = &pod.containers[0];
        let args = c.args.clone().unwrap_or_default();
        assert_eq!(args[args.len() - 2..], ["--role", "t_shop_acme"]);
        let env: Vec<String> = c
            .env
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert!(env.contains(&"PGPASSWORD".to_string()));
        assert!(env.contains(&"AWS_VIRTUAL_HOSTED_STYLE_REQUEST".to_string()));
        assert_eq!(job.metadata.name.as_deref(), Some("acme-back-restore"));
    }
}
