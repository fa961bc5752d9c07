//! How a migration Job ended, read from the Job and its pods (pure): still running, succeeded, or
//! failed with a reason and what the migration printed last (the container's termination
//! message, which `FallbackToLogsOnError` fills with the end of its log), bounded.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;

/// The most of a failed migration's words kept for status: its last lines matter most.
pub const MAX_MESSAGE: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Running,
    Succeeded,
    Failed { reason: String, message: String },
}

/// The Job's outcome: its `Complete` or `Failed` condition; the message from the newest pod that
/// terminated with one.
pub fn outcome(job: &Job, pods: &[Pod]) -> Outcome {
    let conditions = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let holds = |type_: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == "True")
    };
    if holds("Complete").is_some() {
        return Outcome::Succeeded;
    }
    let Some(failed) = holds("Failed") else {
        return Outcome::Running;
    };
    // `activeDeadlineSeconds` passed; else the retries were spent (BackoffLimitExceeded).
    let reason = if failed.reason.as_deref() == Some("DeadlineExceeded") {
        "DeadlineExceeded"
    } else {
        "MigrationFailed"
    };
    let said = last_words(pods)
        .or_else(|| failed.message.clone())
        .unwrap_or_else(|| "the migration failed without a message".into());
    Outcome::Failed {
        reason: reason.into(),
        message: tail(&said, MAX_MESSAGE),
    }
}

/// The termination message of the newest pod whose container ended with one.
pub fn last_words(pods: &[Pod]) -> Option<String> {
    let mut ended: Vec<(&Pod, String)> = pods
        .iter()
        .filter_map(|pod| {
            let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
            let message = statuses
                .iter()
                .find_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())?;
            let message = message.trim().to_string();
            (!message.is_empty()).then_some((pod, message))
        })
        .collect();
    ended.sort_by_key(|(pod, _)| pod.metadata.creation_timestamp.clone());
    ended.pop().map(|(_, message)| message)
}

/// The first `max` bytes of `text`, cut at a character boundary, marked when cut.
pub fn head(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The last `max` bytes of `text`, cut at a character boundary, marked when cut.
fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStatus, PodStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn job(condition: Option<(&str, &str)>) -> Job {
        Job {
            status: Some(JobStatus {
                conditions: condition.map(|(type_, reason)| {
                    vec![JobCondition {
                        type_: type_.into(),
                        status: "True".into(),
                        reason: Some(reason.into()),
                        message: Some(format!("Job has reached the specified {reason}")),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pod(second: i64, message: &str) -> Pod {
        let mut pod = Pod {
            status: Some(PodStatus {
                container_statuses: Some(vec![ContainerStatus {
                    name: "migrate".into(),
                    state: Some(ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            exit_code: 1,
                            message: Some(message.into()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        pod.metadata.creation_timestamp = Some(Time(
            jiff::Timestamp::from_second(second).unwrap_or_else(|e| panic!("{e}")),
        ));
        pod
    }

    fn failed(reason: &str, message: &str) -> Outcome {
        Outcome::Failed {
            reason: reason.into(),
            message: message.into(),
        }
    }

    #[test]
    fn outcomes() {
        let violated = "django.db.utils.IntegrityError: check constraint \"price_positive\" is violated by some row";
        let cases: [(&str, Job, Vec<Pod>, Outcome); 6] = [
            ("no condition yet", job(None), vec![], Outcome::Running),
            (
                "complete",
                job(Some(("Complete", ""))),
                vec![],
                Outcome::Succeeded,
            ),
            (
                "failed: the newest pod's last words",
                job(Some(("Failed", "BackoffLimitExceeded"))),
                vec![pod(2, violated), pod(1, "first try")],
                failed("MigrationFailed", violated),
            ),
            (
                "timed out",
                job(Some(("Failed", "DeadlineExceeded"))),
                vec![pod(1, "still waiting")],
                failed("DeadlineExceeded", "still waiting"),
            ),
            (
                "no pod left: the Job's own message",
                job(Some(("Failed", "BackoffLimitExceeded"))),
                vec![],
                failed(
                    "MigrationFailed",
                    "Job has reached the specified BackoffLimitExceeded",
                ),
            ),
            (
                "an empty termination message is no message",
                job(Some(("Failed", "BackoffLimitExceeded"))),
                vec![pod(1, "  \n")],
                failed(
                    "MigrationFailed",
                    "Job has reached the specified BackoffLimitExceeded",
                ),
            ),
        ];
        for (what, job, pods, expected) in cases {
            assert_eq!(outcome(&job, &pods), expected, "{what}");
        }
    }

    #[test]
    fn heads_are_cut_at_a_character() {
        assert_eq!(head("short", 10), "short");
        assert_eq!(head("ééé", 3), "é…");
    }

    #[test]
    fn long_messages_keep_their_end() {
        let log = format!("{}ERROR: lock timeout", "é".repeat(2000));
        let Outcome::Failed { message, .. } = outcome(
            &job(Some(("Failed", "BackoffLimitExceeded"))),
            &[pod(1, &log)],
        ) else {
            panic!("failed");
        };
        assert!(
            message.len() <= MAX_MESSAGE + "…".len(),
            "{}",
            message.len()
        );
        assert!(message.starts_with('…') && message.ends_with("ERROR: lock timeout"));
    }
}
