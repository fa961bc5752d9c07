//! Settings for every Job the controller creates (migrations, backups, restores): where its pods
//! may run, as whom, with what resources and limits. The Helm chart renders its `jobs` values to a
//! JSON file (`--job-settings`); they are checked at start, so a bad file stops the controller with
//! a message instead of producing broken Jobs later.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, PodSpec, ResourceRequirements, Toleration,
};
use serde::Deserialize;

/// The chart's `jobs` values. Empty strings and empty objects mean "not set".
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobSettings {
    /// Image of the `silo` job runner (backup, restore); migrations bring their own image.
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub image_pull_policy: String,
    #[serde(default)]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    #[serde(default)]
    pub service_account_name: String,
    #[serde(default)]
    pub host_network: bool,
    pub ttl_seconds_after_finished: Option<i32>,
    pub active_deadline_seconds: Option<i64>,
    pub backoff_limit: Option<i32>,
    #[serde(default)]
    pub resources: ResourceRequirements,
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    #[serde(default)]
    pub affinity: Affinity,
    #[serde(default)]
    pub pod_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub pod_annotations: BTreeMap<String, String>,
}

/// Kubernetes names a Job's pods after it, in a label value: at most 63 characters.
pub const MAX_JOB_NAME: usize = 63;

/// Hex of the first `bytes` of SHA-256 of `text`.
pub fn short_hash(text: &str, bytes: usize) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes())[..bytes]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `<name><suffix>`, with `name` cut and hashed when that would pass 63 characters: one name per
/// (name, suffix), so a restarted controller finds its Job rather than creating another.
pub fn fit_job_name(name: &str, suffix: &str) -> String {
    if name.len() + suffix.len() <= MAX_JOB_NAME {
        return format!("{name}{suffix}");
    }
    let hash = short_hash(name, 4);
    let keep = MAX_JOB_NAME.saturating_sub(suffix.len() + hash.len() + 1);
    let cut = name[..keep.min(name.len())].trim_end_matches(['-', '.']);
    format!("{cut}-{hash}{suffix}")
}

/// `text` as a label value: itself up to 63 characters, else cut and ended with a hash of it.
pub fn label_value(text: &str) -> String {
    fit_job_name(text, "")
}

/// Deletes `job` (its pods in the background), only if it is still the Job that was read.
pub async fn delete_job(jobs: &kube::Api<Job>, job: &Job) -> Result<(), kube::Error> {
    use kube::ResourceExt;
    let params = kube::api::DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: job.uid(),
            resource_version: None,
        }),
        ..kube::api::DeleteParams::background()
    };
    match jobs.delete(&job.name_any(), &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// A Job of the `silo` runner (backup, restore): one pod, never restarted and never retried (a
/// failed dump is a failed backup, a failed restore changed nothing and is not repeated behind
/// the user's back), owned by `owner`, with the chart's `jobs.*` applied. No TTL: the controller
/// deletes it once its outcome is recorded.
pub fn runner_job<K>(
    owner: &K,
    name: String,
    labels: BTreeMap<String, String>,
    container: k8s_openapi::api::core::v1::Container,
    volumes: Option<Vec<k8s_openapi::api::core::v1::Volume>>,
    settings: &JobSettings,
) -> Job
where
    K: kube::Resource<DynamicType = ()>,
{
    use k8s_openapi::api::batch::v1::JobSpec;
    use k8s_openapi::api::core::v1::PodTemplateSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    let mut job = Job {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: owner.meta().namespace.clone(),
            labels: Some(labels.clone()),
            owner_references: owner.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    restart_policy: Some("Never".into()),
                    volumes,
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    };
    settings.apply(&mut job);
    if let Some(spec) = job.spec.as_mut() {
        spec.ttl_seconds_after_finished = None;
    }
    job
}

/// Writes `next` as the status of the object `name` of `api` (server-side apply, the tenant
/// controller's field manager), unless it equals `current`.
pub async fn apply_status<K, S>(
    api: &kube::Api<K>,
    name: &str,
    current: &S,
    next: &S,
) -> Result<(), kube::Error>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: serde::Serialize + PartialEq,
{
    if next == current {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": next,
    });
    api.patch_status(
        name,
        &kube::api::PatchParams::apply(crate::tenant::FIELD_MANAGER).force(),
        &kube::api::Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum JobSettingsError {
    #[error("reading job settings {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("job settings {path} are not valid: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("job settings {path}: {message}")]
    Invalid { path: String, message: String },
}

impl JobSettings {
    /// Reads and checks the settings file.
    pub fn load(path: &Path) -> Result<JobSettings, JobSettingsError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| JobSettingsError::Read {
            path: shown.clone(),
            source,
        })?;
        let settings: JobSettings =
            serde_json::from_str(&text).map_err(|source| JobSettingsError::Parse {
                path: shown.clone(),
                source,
            })?;
        settings
            .check()
            .map_err(|message| JobSettingsError::Invalid {
                path: shown,
                message,
            })?;
        Ok(settings)
    }

    fn check(&self) -> Result<(), String> {
        if !matches!(
            self.image_pull_policy.as_str(),
            "" | "Always" | "IfNotPresent" | "Never"
        ) {
            return Err(format!(
                "imagePullPolicy {:?} is not Always, IfNotPresent or Never",
                self.image_pull_policy
            ));
        }
        for (name, value) in [
            (
                "ttlSecondsAfterFinished",
                self.ttl_seconds_after_finished.map(i64::from),
            ),
            ("backoffLimit", self.backoff_limit.map(i64::from)),
        ] {
            if value.is_some_and(|v| v < 0) {
                return Err(format!("{name} must not be negative"));
            }
        }
        // Kubernetes refuses a Job whose deadline is not positive.
        if self.active_deadline_seconds.is_some_and(|v| v < 1) {
            return Err("activeDeadlineSeconds must be at least 1".into());
        }
        Ok(())
    }

    /// Applies the settings to a Job the controller built. What the Job sets itself wins where
    /// both set something (its own labels, a migration's image, a container's resources): these
    /// are defaults and additions, never overrides of what makes the Job work.
    pub fn apply(&self, job: &mut Job) {
        let spec = job.spec.get_or_insert_with(Default::default);
        spec.ttl_seconds_after_finished = spec
            .ttl_seconds_after_finished
            .or(self.ttl_seconds_after_finished);
        spec.active_deadline_seconds = spec
            .active_deadline_seconds
            .or(self.active_deadline_seconds);
        spec.backoff_limit = spec.backoff_limit.or(self.backoff_limit);

        let meta = spec.template.metadata.get_or_insert_with(Default::default);
        add_missing(&mut meta.labels, &self.pod_labels);
        add_missing(&mut meta.annotations, &self.pod_annotations);

        let pod = spec.template.spec.get_or_insert_with(PodSpec::default);
        if pod.service_account_name.is_some() {
            // The Job's own account (a migration's template names one).
        } else if !self.service_account_name.is_empty() {
            pod.service_account_name = Some(self.service_account_name.clone());
        } else {
            // The namespace's default account, without an API token: a Job needs only its
            // tenant's database.
            pod.automount_service_account_token = Some(false);
        }
        if self.host_network {
            pod.host_network = Some(true);
        }
        add_missing(&mut pod.node_selector, &self.node_selector);
        if !self.tolerations.is_empty() {
            pod.tolerations
                .get_or_insert_with(Vec::new)
                .extend(self.tolerations.iter().cloned());
        }
        if pod.affinity.is_none() && self.affinity != Affinity::default() {
            pod.affinity = Some(self.affinity.clone());
        }
        if !self.image_pull_secrets.is_empty() {
            pod.image_pull_secrets
                .get_or_insert_with(Vec::new)
                .extend(self.image_pull_secrets.iter().cloned());
        }
        for container in &mut pod.containers {
            if container.image.as_deref().unwrap_or("").is_empty() && !self.image.is_empty() {
                container.image = Some(self.image.clone());
            }
            if container.image_pull_policy.is_none() && !self.image_pull_policy.is_empty() {
                container.image_pull_policy = Some(self.image_pull_policy.clone());
            }
            if container.resources.is_none() && self.resources != ResourceRequirements::default() {
                container.resources = Some(self.resources.clone());
            }
        }
    }
}

/// Adds the entries of `extra` that `map` does not have.
fn add_missing(map: &mut Option<BTreeMap<String, String>>, extra: &BTreeMap<String, String>) {
    if extra.is_empty() {
        return;
    }
    let map = map.get_or_insert_with(BTreeMap::new);
    for (k, v) in extra {
        map.entry(k.clone()).or_insert_with(|| v.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::JobSpec;
    use k8s_openapi::api::core::v1::{Container, PodTemplateSpec};

    /// What the chart renders by default, and with values set.
    const CHART_DEFAULTS: &str = r#"{
      "activeDeadlineSeconds": 3600, "affinity": {}, "backoffLimit": 2, "hostNetwork": false,
      "image": "ghcr.io/silo-dev/silo:0.1.0", "imagePullPolicy": "IfNotPresent",
      "imagePullSecrets": [], "nodeSelector": {}, "podAnnotations": {}, "podLabels": {},
      "resources": {}, "serviceAccountName": "", "tolerations": [], "ttlSecondsAfterFinished": 86400
    }"#;

    fn job_with(container: Container) -> Job {
        Job {
            spec: Some(JobSpec {
                template: PodTemplateSpec {
                    metadata: Some(Default::default()),
                    spec: Some(PodSpec {
                        containers: vec![container],
                        ..Default::default()
                    }),
                },
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn chart_defaults_give_a_tokenless_job_with_limits() {
        let settings: JobSettings = serde_json::from_str(CHART_DEFAULTS).expect("set in this test");
        settings.check().expect("set in this test");
        let mut job = job_with(Container {
            name: "backup".into(),
            ..Default::default()
        });
        settings.apply(&mut job);
        let spec = job.spec.expect("set in this test");
        assert_eq!(spec.backoff_limit, Some(2));
        assert_eq!(spec.active_deadline_seconds, Some(3600));
        assert_eq!(spec.ttl_seconds_after_finished, Some(86400));
        let pod = spec.template.spec.expect("set in this test");
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.service_account_name, None);
        assert_eq!(pod.host_network, None);
        assert_eq!(pod.affinity, None);
        assert_eq!(
            pod.containers[0].image.as_deref(),
            Some("ghcr.io/silo-dev/silo:0.1.0")
        );
        assert_eq!(pod.containers[0].resources, None);
    }

    #[test]
    fn user_values_reach_the_pod_but_never_override_the_job() {
        let settings: JobSettings = serde_json::from_value(serde_json::json!({
            "serviceAccountName": "migrator", "hostNetwork": true, "backoffLimit": 5,
            "nodeSelector": {"pool": "jobs"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "jobs", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                {"nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
            "resources": {"limits": {"memory": "256Mi"}},
            "podLabels": {"team": "db", "silo.dev/tenant": "spoofed"},
            "podAnnotations": {"sidecar.istio.io/inject": "false"},
            "imagePullSecrets": [{"name": "regcred"}],
            "image": "runner:1"
        }))
        .expect("set in this test");
        let mut job = job_with(Container {
            name: "migrate".into(),
            image: Some("app:2".into()),
            ..Default::default()
        });
        let job_spec = job.spec.get_or_insert_with(Default::default);
        job_spec.backoff_limit = Some(0);
        let meta = job_spec
            .template
            .metadata
            .get_or_insert_with(Default::default);
        meta.labels = Some([("silo.dev/tenant".to_string(), "acme".to_string())].into());
        settings.apply(&mut job);

        let spec = job.spec.expect("set in this test");
        assert_eq!(spec.backoff_limit, Some(0), "the Job's own value wins");
        let labels = spec
            .template
            .metadata
            .expect("set in this test")
            .labels
            .expect("set in this test");
        assert_eq!(labels["silo.dev/tenant"], "acme", "Silo's labels win");
        assert_eq!(labels["team"], "db");
        let pod = spec.template.spec.expect("set in this test");
        assert_eq!(pod.service_account_name.as_deref(), Some("migrator"));
        assert_eq!(pod.automount_service_account_token, None);
        assert_eq!(pod.host_network, Some(true));
        assert_eq!(pod.node_selector.expect("set in this test")["pool"], "jobs");
        assert_eq!(
            pod.tolerations.expect("set in this test")[0].key.as_deref(),
            Some("dedicated")
        );
        assert!(
            pod.affinity
                .expect("set in this test")
                .node_affinity
                .is_some()
        );
        assert_eq!(
            pod.image_pull_secrets.expect("set in this test")[0].name,
            "regcred"
        );
        let container = &pod.containers[0];
        assert_eq!(
            container.image.as_deref(),
            Some("app:2"),
            "a migration keeps its image"
        );
        assert!(
            container
                .resources
                .as_ref()
                .expect("set in this test")
                .limits
                .is_some()
        );
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let dir = std::env::temp_dir().join(format!("silo-jobs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("set in this test");
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("set in this test");
            path
        };
        let unknown = write("unknown.json", r#"{"hostNetwrk": true}"#);
        let err = JobSettings::load(&unknown)
            .expect_err("must be refused")
            .to_string();
        assert!(err.contains("unknown field `hostNetwrk`"), "{err}");
        let wrong_type = write("type.json", r#"{"hostNetwork": "yes"}"#);
        let err = JobSettings::load(&wrong_type)
            .expect_err("must be refused")
            .to_string();
        assert!(err.contains("invalid type"), "{err}");
        let policy = write("policy.json", r#"{"imagePullPolicy": "Sometimes"}"#);
        let err = JobSettings::load(&policy)
            .expect_err("must be refused")
            .to_string();
        assert!(err.contains("Sometimes"), "{err}");
        let zero = write("zero.json", r#"{"activeDeadlineSeconds": 0}"#);
        let err = JobSettings::load(&zero)
            .expect_err("must be refused")
            .to_string();
        assert!(
            err.contains("activeDeadlineSeconds must be at least 1"),
            "{err}"
        );
        let negative = write("negative.json", r#"{"backoffLimit": -1}"#);
        let err = JobSettings::load(&negative)
            .expect_err("must be refused")
            .to_string();
        assert!(err.contains("backoffLimit must not be negative"), "{err}");
        let err = JobSettings::load(&dir.join("missing.json"))
            .expect_err("must be refused")
            .to_string();
        assert!(err.contains("missing.json"), "{err}");
        let ok = write("ok.json", CHART_DEFAULTS);
        assert_eq!(
            JobSettings::load(&ok)
                .expect("set in this test")
                .backoff_limit,
            Some(2)
        );
        std::fs::remove_dir_all(&dir).expect("set in this test");
    }
}
