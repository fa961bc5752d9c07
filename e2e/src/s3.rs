//! S3-compatible stores for the tests: versitygw with its POSIX backend, run by
//! `e2e/scripts/s3.sh`. The harness starts one on loopback for the runner tests
//! ([`S3Store::shared`]); a test that must take its store down starts its own
//! ([`S3Store::start`]) on the node's link address, so that Jobs reach it too. What is stored is
//! read back with the tests' own client (object_store's), never with silo's code.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, ensure};
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;

/// An S3 test server and its credentials.
pub struct S3Store {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    /// versitygw's POSIX backend folder: `data/<bucket>/<key>` is the object's bytes.
    pub data: PathBuf,
    /// The folder `s3.sh` runs this store from, when the test owns it (stopped on drop).
    own: Option<PathBuf>,
}

impl S3Store {
    /// The harness's store, or `None` after saying loudly why `test`, which needs it, is skipped.
    pub fn shared(test: &str) -> Option<S3Store> {
        let store = from_vars(|name| std::env::var(name).ok().filter(|v| !v.is_empty()));
        if store.is_none() {
            eprintln!(
                "SKIPPED {test}: no S3 test server (SILO_E2E_S3_ENDPOINT and its credentials \
                 unset; e2e/run-tests.sh starts one with e2e/scripts/s3.sh)"
            );
        }
        store
    }

    /// A store of the test's own, in `$SILO_E2E_DIR/s3-<name>`, listening where pods reach it
    /// (the node's link address) when there is a node, else on loopback.
    pub fn start(name: &str) -> anyhow::Result<S3Store> {
        let dir = std::env::var_os("SILO_E2E_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join(format!("s3-{name}-{}", std::process::id()));
        let host = std::env::var("SILO_E2E_NODE_HOST").unwrap_or_else(|_| "127.0.0.1".into());
        s3_sh("up", &dir, &[("SILO_E2E_S3_HOST", host.as_str())])?;
        let env = std::fs::read_to_string(dir.join("env"))
            .with_context(|| format!("s3.sh wrote no {}/env", dir.display()))?;
        let vars: Vec<(String, String)> = env
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut store =
            from_vars(|name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
                .context("s3.sh's env lacks the store's settings")?;
        store.own = Some(dir);
        Ok(store)
    }

    /// Stops the store, keeping its objects: it refuses connections until [`S3Store::resume`].
    pub fn stop(&self) -> anyhow::Result<()> {
        s3_sh("stop", self.own_dir()?, &[])
    }

    /// Starts a stopped store again, at the same address and with the same objects.
    pub fn resume(&self) -> anyhow::Result<()> {
        s3_sh("start", self.own_dir()?, &[])
    }

    fn own_dir(&self) -> anyhow::Result<&Path> {
        self.own
            .as_deref()
            .context("only a store the test started itself can be stopped")
    }

    /// The `AWS_*` variables that point an S3 client (the runner, the controller) at this store.
    pub fn aws_env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT".into(), self.endpoint.clone()),
            ("AWS_REGION".into(), self.region.clone()),
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
        ]
    }

    /// The test's own client.
    pub fn client(&self) -> anyhow::Result<Arc<dyn ObjectStore>> {
        Ok(Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(&self.endpoint)
                .with_region(&self.region)
                .with_bucket_name(&self.bucket)
                .with_access_key_id(&self.access_key)
                .with_secret_access_key(&self.secret_key)
                .with_allow_http(true)
                .build()?,
        ))
    }

    /// Keys under `prefix`.
    pub async fn keys(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        use futures::TryStreamExt;
        let prefix = ObjectPath::from(prefix);
        let objects: Vec<_> = self.client()?.list(Some(&prefix)).try_collect().await?;
        Ok(objects
            .into_iter()
            .map(|o| o.location.to_string())
            .collect())
    }

    /// The object at `key`, read with the test's own client.
    pub async fn get(&self, key: &str) -> anyhow::Result<Vec<u8>> {
        use object_store::ObjectStoreExt;
        let object = self.client()?.get(&ObjectPath::from(key)).await?;
        Ok(object.bytes().await?.to_vec())
    }

    /// Where the POSIX backend keeps the bytes of `key`: what a test corrupts by hand.
    pub fn object_file(&self, key: &str) -> PathBuf {
        self.data.join(&self.bucket).join(key)
    }
}

impl Drop for S3Store {
    fn drop(&mut self) {
        if let Some(dir) = &self.own {
            let _ = s3_sh("down", dir, &[]);
        }
    }
}

fn from_vars(var: impl Fn(&str) -> Option<String>) -> Option<S3Store> {
    Some(S3Store {
        endpoint: var("SILO_E2E_S3_ENDPOINT")?,
        region: var("SILO_E2E_S3_REGION").unwrap_or_else(|| "us-east-1".into()),
        bucket: var("SILO_E2E_S3_BUCKET")?,
        access_key: var("SILO_E2E_S3_ACCESS_KEY")?,
        secret_key: var("SILO_E2E_S3_SECRET_KEY")?,
        data: var("SILO_E2E_S3_DATA")
            .map(PathBuf::from)
            .unwrap_or_default(),
        own: None,
    })
}

fn s3_sh(command: &str, dir: &Path, env: &[(&str, &str)]) -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/s3.sh");
    let status = Command::new(&script)
        .arg(command)
        .arg(dir)
        .envs(env.iter().copied())
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    ensure!(
        status.success(),
        "s3.sh {command} {}: {status}",
        dir.display()
    );
    Ok(())
}
