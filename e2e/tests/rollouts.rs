//! End-to-end scenarios for SchemaRollouts: the application's migration tool as one Job per
//! tenant, on a real kube-apiserver with real PostgreSQL servers.

use anyhow::ensure;
use silo_e2e::kube_env::with_temp_ns;

/// A SchemaRollout manifest named `name` with `spec` (indented by two spaces).
fn rollout_yaml(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: silo.dev/v1alpha1\nkind: SchemaRollout\nmetadata:\n  name: {name}\nspec:\n{spec}\n"
    )
}

/// Bad input is rejected by `kubectl apply`, naming the field, before any controller sees it.
#[tokio::test]
async fn bad_rollouts_are_rejected_naming_the_field() {
    with_temp_ns("sr-input", |ns| async move {
        let image = "  template: {image: app:1}";
        let cases = [
            (
                "no-image",
                "  version: v1\n  template: {command: [migrate]}".to_string(),
                "spec.template.image",
            ),
            (
                "empty-image",
                "  version: v1\n  template: {image: \"\"}".to_string(),
                "spec.template.image",
            ),
            ("no-version", image.to_string(), "spec.version"),
            (
                "empty-version",
                format!("  version: \"\"\n{image}"),
                "spec.version",
            ),
            (
                "zero-concurrent",
                format!("  version: v1\n{image}\n  strategy: {{maxConcurrent: 0}}"),
                "spec.strategy.maxConcurrent",
            ),
            (
                "negative-per-server",
                format!("  version: v1\n{image}\n  strategy: {{maxConcurrentPerServer: -1}}"),
                "spec.strategy.maxConcurrentPerServer",
            ),
            (
                "zero-failures",
                format!("  version: v1\n{image}\n  strategy: {{maxFailures: 0}}"),
                "spec.strategy.maxFailures",
            ),
            (
                "negative-canary",
                format!("  version: v1\n{image}\n  strategy: {{canary: -1}}"),
                "spec.strategy.canary",
            ),
            (
                "lock-timeout",
                format!("  version: v1\n{image}\n  strategy: {{lockTimeout: \"10\"}}"),
                "spec.strategy.lockTimeout",
            ),
            (
                "zero-timeout",
                format!("  version: v1\n{image}\n  strategy: {{timeoutSeconds: 0}}"),
                "spec.strategy.timeoutSeconds",
            ),
        ];
        for (name, spec, field) in &cases {
            let out = ns.apply(&rollout_yaml(name, spec)).await?;
            ensure!(!out.success, "{name} was accepted");
            ensure!(
                out.stderr.contains(field),
                "{name}: expected `{field}` in: {}",
                out.stderr
            );
        }

        // A version is for good: a new version is a new SchemaRollout.
        ns.apply_ok(&rollout_yaml("v1", &format!("  version: v1\n{image}")))
            .await?;
        let out = ns
            .apply(&rollout_yaml("v1", &format!("  version: v2\n{image}")))
            .await?;
        ensure!(!out.success, "a changed version was accepted");
        ensure!(
            out.stderr.contains("version is immutable"),
            "{}",
            out.stderr
        );
        // The defaults a user did not write are the safe ones.
        let out = ns
            .kubectl(&[
                "get",
                "sr",
                "v1",
                "-n",
                &ns.name,
                "-o",
                "jsonpath={.spec.strategy}",
            ])
            .await?;
        ensure!(out.success, "{}", out.stderr);
        for default in [
            "\"canary\":1",
            "\"maxConcurrent\":10",
            "\"maxConcurrentPerServer\":2",
            "\"maxFailures\":1",
            "\"lockTimeout\":\"10s\"",
        ] {
            ensure!(
                out.stdout.contains(default),
                "{default} not in {}",
                out.stdout
            );
        }
        Ok(())
    })
    .await;
}
