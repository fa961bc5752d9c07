//! The migration Job of one tenant for one rollout (pure): the rollout's image and command, the
//! tenant's connection from its Secret, a lock timeout, the strategy's deadline and retries, and
//! the chart's `jobs.*` settings where the rollout's template says nothing.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, PodSpec, PodTemplateSpec, SecretKeySelector,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use silo_crds::SchemaRollout;
use silo_crds::contract::{self, keys, migration_env};

use crate::jobs::{JobSettings, fit_job_name, short_hash};

/// The label value for a schema version.
pub fn version_hash(version: &str) -> String {
    short_hash(version, 5)
}

/// The one Job name for (tenant, version): `<tenant>-migrate-<version hash>`, the tenant's name
/// cut and hashed when that would be too long. The same for every rollout of that version, so a
/// controller that restarts, or a second rollout of the same version, finds the Job rather than
/// creating another.
pub fn job_name(tenant: &str, version: &str) -> String {
    fit_job_name(tenant, &format!("-migrate-{}", version_hash(version)))
}

/// The attempt a rollout's Jobs are started with: a hash of its template and `retry`. Changing
/// either retries the failed tenants.
pub fn attempt(rollout: &SchemaRollout) -> String {
    let template = serde_json::to_string(&rollout.spec.template).unwrap_or_default();
    short_hash(&format!("{template}/{}", rollout.spec.retry), 5)
}

/// The environment the migration gets from Silo; a template's own entries of these names are
/// dropped.
const CONNECTION: [(&str, &str); 6] = [
    ("DATABASE_URL", keys::URI),
    ("PGHOST", keys::HOST),
    ("PGPORT", keys::PORT),
    ("PGDATABASE", keys::DBNAME),
    ("PGUSER", keys::USER),
    ("PGPASSWORD", keys::PASSWORD),
];

fn value(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn from_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
    }
}

/// The migration Job of `tenant` for `rollout`. The password is never in it: the Job's pod reads
/// the tenant's Secret.
pub fn migration_job(rollout: &SchemaRollout, tenant: &str, settings: &JobSettings) -> Job {
    let spec = &rollout.spec;
    let template = &spec.template;
    let secret = contract::secret_name(tenant);
    let mut env: Vec<EnvVar> = CONNECTION
        .iter()
        .map(|(name, key)| from_secret(name, &secret, key))
        .collect();
    env.push(value(
        "PGOPTIONS",
        format!("-c lock_timeout={}", spec.strategy.lock_timeout),
    ));
    env.push(value(migration_env::TENANT, tenant));
    env.push(value(migration_env::SCHEMA_VERSION, &spec.version));
    let reserved: Vec<String> = env.iter().map(|e| e.name.clone()).collect();
    let own = template
        .env
        .iter()
        .filter(|e| !reserved.contains(&e.name))
        .cloned();
    let env: Vec<EnvVar> = own.chain(env).collect();

    let labels = BTreeMap::from([
        (
            contract::MANAGED_BY_LABEL.to_string(),
            contract::MANAGED_BY.to_string(),
        ),
        (contract::TENANT_LABEL.to_string(), tenant.to_string()),
        (contract::ROLLOUT_LABEL.to_string(), rollout.name_any()),
        (
            contract::SCHEMA_VERSION_LABEL.to_string(),
            version_hash(&spec.version),
        ),
    ]);
    let container = Container {
        name: "migrate".into(),
        image: Some(template.image.clone()),
        command: (!template.command.is_empty()).then(|| template.command.clone()),
        args: (!template.args.is_empty()).then(|| template.args.clone()),
        env: Some(env),
        env_from: (!template.env_from.is_empty()).then(|| template.env_from.clone()),
        resources: template.resources.clone(),
        // The end of a failed migration's log reaches the rollout's status without reading logs.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        restart_policy: Some("Never".into()),
        service_account_name: template.service_account_name.clone(),
        node_selector: (!template.node_selector.is_empty()).then(|| template.node_selector.clone()),
        tolerations: (!template.tolerations.is_empty()).then(|| template.tolerations.clone()),
        image_pull_secrets: (!template.image_pull_secrets.is_empty())
            .then(|| template.image_pull_secrets.clone()),
        ..Default::default()
    };
    let mut job = Job {
        metadata: ObjectMeta {
            name: Some(job_name(tenant, &spec.version)),
            namespace: rollout.namespace(),
            labels: Some(labels.clone()),
            annotations: Some(BTreeMap::from([(
                contract::ATTEMPT_ANNOTATION.to_string(),
                attempt(rollout),
            )])),
            owner_references: rollout.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(spec.strategy.retries),
            active_deadline_seconds: spec.strategy.timeout_seconds,
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            ..Default::default()
        }),
        status: None,
    };
    settings.apply(&mut job);
    // The controller deletes the Job once its outcome is on the Tenant; a TTL could delete it
    // before, while the controller is down, and the result would be lost.
    if let Some(spec) = job.spec.as_mut() {
        spec.ttl_seconds_after_finished = None;
    }
    job
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::MAX_JOB_NAME;
    use silo_crds::{MigrationTemplate, RolloutStrategy, SchemaRolloutSpec};

    fn rollout(template: MigrationTemplate, strategy: RolloutStrategy) -> SchemaRollout {
        let mut rollout = SchemaRollout::new(
            "release-42",
            SchemaRolloutSpec {
                version: "2026.12.1".into(),
                selector: None,
                template,
                strategy,
                paused: false,
                retry: 0,
            },
        );
        rollout.metadata.namespace = Some("apps".into());
        rollout.metadata.uid = Some("uid-1".into());
        rollout
    }

    fn django() -> MigrationTemplate {
        MigrationTemplate {
            image: "registry.example/app:42".into(),
            command: vec!["python3".into(), "manage.py".into(), "migrate".into()],
            env: vec![
                value("DJANGO_SETTINGS_MODULE", "app.settings"),
                value("PGPASSWORD", "overridden?"),
            ],
            ..Default::default()
        }
    }

    fn env_of(job: &Job) -> Vec<EnvVar> {
        job.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers[0].env.clone())
            .unwrap_or_default()
    }

    #[test]
    fn names_fit_and_are_one_per_tenant_and_version() {
        let short = job_name("acme", "v1");
        assert!(short.starts_with("acme-migrate-") && short.len() <= MAX_JOB_NAME);
        assert_eq!(short, job_name("acme", "v1"));
        assert_ne!(short, job_name("acme", "v2"));
        let long = "a".repeat(60);
        let (one, other) = (job_name(&long, "v1"), job_name(&format!("{long}b"), "v1"));
        assert!(
            one.len() <= MAX_JOB_NAME && other.len() <= MAX_JOB_NAME,
            "{one}"
        );
        assert_ne!(one, other, "cut names stay apart by their hash");
    }

    #[test]
    fn the_job_carries_the_tenants_connection_and_the_strategy() {
        let strategy = RolloutStrategy {
            timeout_seconds: Some(600),
            retries: 2,
            lock_timeout: "3s".into(),
            ..Default::default()
        };
        let job = migration_job(
            &rollout(django(), strategy),
            "acme",
            &JobSettings::default(),
        );
        assert_eq!(job.metadata.namespace.as_deref(), Some("apps"));
        let owner = job.metadata.owner_references.clone().unwrap_or_default();
        assert!(
            owner.len() == 1 && owner[0].name == "release-42" && owner[0].controller == Some(true)
        );
        let spec = job.spec.clone().unwrap_or_default();
        assert_eq!(
            (spec.backoff_limit, spec.active_deadline_seconds),
            (Some(2), Some(600))
        );
        let env = env_of(&job);
        let find = |name: &str| env.iter().filter(|e| e.name == name).collect::<Vec<_>>();
        for (name, key) in CONNECTION {
            let found = find(name);
            assert_eq!(found.len(), 1, "{name} once");
            let source = found[0]
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref());
            assert_eq!(
                source.map(|s| (s.name.as_str(), s.key.as_str())),
                Some(("acme-db", key))
            );
            assert!(
                found[0].value.is_none(),
                "{name}: no value in the Job itself"
            );
        }
        assert_eq!(
            find("PGOPTIONS")[0].value.as_deref(),
            Some("-c lock_timeout=3s")
        );
        assert_eq!(find("SILO_TENANT")[0].value.as_deref(), Some("acme"));
        assert_eq!(
            find("SILO_SCHEMA_VERSION")[0].value.as_deref(),
            Some("2026.12.1")
        );
        assert_eq!(
            find("DJANGO_SETTINGS_MODULE").len(),
            1,
            "the template's own env stays"
        );
        let pod = spec.template.spec.unwrap_or_default();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(
            pod.containers[0].termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
    }

    #[test]
    fn a_new_template_or_retry_is_a_new_attempt() {
        let base = rollout(django(), RolloutStrategy::default());
        let job = migration_job(&base, "acme", &JobSettings::default());
        let annotations = job.metadata.annotations.unwrap_or_default();
        assert_eq!(
            annotations.get(contract::ATTEMPT_ANNOTATION),
            Some(&attempt(&base)),
            "a Job carries the attempt it was started with"
        );
        let mut paused = base.clone();
        paused.spec.paused = true;
        paused.spec.strategy.max_concurrent = 3;
        assert_eq!(
            attempt(&paused),
            attempt(&base),
            "strategy and pause retry nothing"
        );
        let mut retried = base.clone();
        retried.spec.retry = 1;
        let mut fixed = base.clone();
        fixed.spec.template.image = "registry.example/app:43".into();
        for (what, other) in [("retry", &retried), ("template", &fixed)] {
            assert_ne!(
                attempt(other),
                attempt(&base),
                "a new {what} retries the failed"
            );
        }
    }

    #[test]
    fn the_template_wins_over_the_charts_job_settings() {
        let settings = JobSettings {
            service_account_name: "silo-jobs".into(),
            node_selector: [("pool".to_string(), "jobs".to_string())].into(),
            backoff_limit: Some(6),
            ttl_seconds_after_finished: Some(3600),
            ..Default::default()
        };
        let mut template = django();
        template.service_account_name = Some("app-migrations".into());
        template.node_selector = [("pool".to_string(), "app".to_string())].into();
        let job = migration_job(
            &rollout(template, RolloutStrategy::default()),
            "acme",
            &settings,
        );
        let spec = job.spec.unwrap_or_default();
        assert_eq!(
            spec.backoff_limit,
            Some(0),
            "retries: 0 is the rollout's word"
        );
        assert_eq!(
            spec.ttl_seconds_after_finished, None,
            "the controller deletes a migration Job once its outcome is recorded, never a TTL"
        );
        assert_eq!(
            spec.template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.clone())
                .unwrap_or_default()
                .get(contract::TENANT_LABEL)
                .map(String::as_str),
            Some("acme"),
        );
        let pod = spec.template.spec.unwrap_or_default();
        assert_eq!(pod.service_account_name.as_deref(), Some("app-migrations"));
        assert_eq!(
            pod.node_selector
                .unwrap_or_default()
                .get("pool")
                .map(String::as_str),
            Some("app")
        );
    }
}
