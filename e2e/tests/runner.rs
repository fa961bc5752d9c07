//! The `silo` job runner, run as a process on this machine against a real PostgreSQL and (when
//! `e2e/run-tests.sh` started one) a real S3-compatible store, versitygw: backups to file:// and
//! s3:// restore every row; a corrupted object or a wrong sha256 changes nothing; a dump that dies
//! midway or a destination that cannot be reached leaves no object and no manifest; a verified
//! backup compares row counts; passwords never show. What the runner wrote is read back with the
//! tests' own clients (the filesystem, object_store's S3 client), not with the runner's code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;
use sha2::{Digest, Sha256};
use silo_crds::backup::{BackupManifest, RunnerReport};
use silo_e2e::PgServer;
use silo_e2e::postgres::{ADMIN_USER, free_port, pg_bin_dir, random_password};
use silo_e2e::s3::S3Store;
use sqlx::{Connection, Executor, PgConnection};

const RUN_TIMEOUT: Duration = Duration::from_secs(180);
/// Set in the runner's environment and never to appear in anything it prints.
const AWS_SECRET_CANARY: &str = "aws-secret-canary-6f1d";

/// Files versitygw still stages for multipart uploads to `key` (its POSIX backend keeps them
/// under `.sgwtmp/multipart/<sha256 of the key>`): an aborted upload leaves none.
fn staged_parts(s3: &S3Store, key: &str) -> Vec<PathBuf> {
    let dir = s3
        .data
        .join(&s3.bucket)
        .join(".sgwtmp/multipart")
        .join(sha256_hex(key.as_bytes()));
    walk_files(&dir)
}

/// The source database, its PostgreSQL server, and a folder for the test's files.
struct Fixture {
    pg: PgServer,
    dir: PathBuf,
}

impl Fixture {
    async fn start(name: &str) -> anyhow::Result<Fixture> {
        let pg = PgServer::start()?;
        let root = std::env::var_os("SILO_E2E_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = root.join(format!("runner-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let fixture = Fixture { pg, dir };
        fixture.sql("postgres", "CREATE DATABASE src").await?;
        fixture
            .sql(
                "src",
                r#"
                CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL);
                INSERT INTO customers SELECT g, 'customer ' || g FROM generate_series(1, 1000) g;
                CREATE TABLE orders (id bigserial PRIMARY KEY, customer int REFERENCES customers,
                                     amount numeric(10,2), note text);
                INSERT INTO orders (customer, amount, note)
                  SELECT 1 + g % 1000, g / 7.0, md5(g::text) FROM generate_series(1, 5000) g;
                CREATE SCHEMA "Billing";
                CREATE TABLE "Billing"."Invoice Lines" (id int, data jsonb);
                INSERT INTO "Billing"."Invoice Lines"
                  SELECT g, jsonb_build_object('n', g, 's', repeat('x', g % 50)) FROM generate_series(1, 100) g;
                CREATE TABLE empty_table (x int);
                "#,
            )
            .await?;
        Ok(fixture)
    }

    async fn connect(&self, db: &str) -> anyhow::Result<PgConnection> {
        Ok(
            PgConnection::connect_with(&self.pg.options(ADMIN_USER, &self.pg.admin_password, db))
                .await?,
        )
    }

    async fn sql(&self, db: &str, sql: &str) -> anyhow::Result<()> {
        let mut conn = self.connect(db).await?;
        conn.execute(sql).await?;
        Ok(())
    }

    /// Adds `rows` rows of 1 KiB of random bytes (about as large compressed as raw).
    async fn add_bulk(&self, rows: u32) -> anyhow::Result<()> {
        self.sql(
            "src",
            &format!(
                "CREATE EXTENSION IF NOT EXISTS pgcrypto; \
                 CREATE TABLE bulk (id int, payload bytea); \
                 INSERT INTO bulk SELECT g, gen_random_bytes(1024) FROM generate_series(1, {rows}) g"
            ),
        )
        .await
    }

    /// Changes the source after a backup: a table dropped, rows changed, deleted and added.
    async fn damage(&self, db: &str) -> anyhow::Result<()> {
        self.sql(
            db,
            r#"DROP TABLE orders;
               UPDATE customers SET name = 'changed' WHERE id <= 10;
               DELETE FROM "Billing"."Invoice Lines" WHERE id > 50;
               INSERT INTO empty_table VALUES (1), (2)"#,
        )
        .await
    }

    /// Every user table's row count and a digest of all its rows.
    async fn fingerprint(&self, db: &str) -> anyhow::Result<BTreeMap<String, (i64, String)>> {
        let mut conn = self.connect(db).await?;
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname !~ '^pg_' ORDER BY 1",
        )
        .fetch_all(&mut conn)
        .await?;
        let mut out = BTreeMap::new();
        for table in tables {
            let row: (i64, String) = sqlx::query_as(&format!(
                "SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {table} t"
            ))
            .fetch_one(&mut conn)
            .await?;
            out.insert(table, row);
        }
        Ok(out)
    }

    /// The libpq environment of the source (as a Job gets it from the tenant Secret).
    fn libpq_env(&self, db: &str) -> Vec<(String, String)> {
        vec![
            ("PGHOST".into(), "127.0.0.1".into()),
            ("PGPORT".into(), self.pg.port.to_string()),
            ("PGDATABASE".into(), db.into()),
            ("PGUSER".into(), ADMIN_USER.into()),
            ("PGPASSWORD".into(), self.pg.admin_password.clone()),
        ]
    }

    fn url(&self, db: &str) -> String {
        format!(
            "postgres://{ADMIN_USER}:{}@127.0.0.1:{}/{db}",
            self.pg.admin_password, self.pg.port
        )
    }

    /// Runs `silo ARGS` with the source's libpq environment plus `env`.
    async fn silo(&self, args: &[&str], env: &[(String, String)]) -> anyhow::Result<Run> {
        self.silo_then(args, env, |_| async { Ok(()) }).await
    }

    /// Runs `silo ARGS` as [`Fixture::silo`] does, doing `meanwhile(pid)` while it runs.
    async fn silo_then<F, Fut>(
        &self,
        args: &[&str],
        env: &[(String, String)],
        meanwhile: F,
    ) -> anyhow::Result<Run>
    where
        F: FnOnce(u32) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let bin = runner_bin()?;
        let report_path = self.dir.join(format!("report-{}.json", random_password()));
        let path = format!(
            "{}:{}",
            pg_bin_dir()?.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut command = tokio::process::Command::new(&bin);
        command
            .args(args)
            .arg("--report")
            .arg(&report_path)
            .env("PATH", path)
            .env("SILO_LOG", "info")
            .env("AWS_SECRET_ACCESS_KEY", AWS_SECRET_CANARY)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for name in [
            "AWS_ENDPOINT",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ACCESS_KEY_ID",
            "AWS_SESSION_TOKEN",
            "AWS_ALLOW_HTTP",
        ] {
            command.env_remove(name);
        }
        for (k, v) in self.libpq_env("src").iter().chain(env) {
            command.env(k, v);
        }
        let child = command.spawn()?;
        meanwhile(child.id().context("the runner has no pid")?).await?;
        let output = tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
            .await
            .with_context(|| format!("silo {args:?} did not end within {RUN_TIMEOUT:?}"))??;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let written = std::fs::read_to_string(&report_path).with_context(|| {
            format!("no report at {}; stderr:\n{stderr}", report_path.display())
        })?;
        ensure!(
            written.len() <= 4096,
            "the report is {} bytes, over the termination-message limit",
            written.len()
        );
        ensure!(
            stdout.trim_end().ends_with(written.trim_end()),
            "stdout does not end with the report:\n{stdout}\nreport: {written}"
        );
        let report: RunnerReport = serde_json::from_str(&written)
            .with_context(|| format!("the report is not a RunnerReport: {written}"))?;
        let run = Run {
            success: output.status.success(),
            report,
            stdout,
            stderr,
        };
        ensure!(
            run.success == run.report.ok,
            "exit status {} disagrees with the report {:?}",
            output.status,
            run.report
        );
        // No password, whichever way it was given, in anything the runner printed.
        for secret in [self.pg.admin_password.as_str(), AWS_SECRET_CANARY]
            .into_iter()
            .chain(
                env.iter()
                    .filter(|(k, _)| k.contains("SECRET"))
                    .map(|(_, v)| v.as_str()),
            )
        {
            ensure!(
                !run.stdout.contains(secret)
                    && !run.stderr.contains(secret)
                    && !written.contains(secret),
                "a password shows in the runner's output:\nstdout: {}\nstderr: {}",
                run.stdout,
                run.stderr
            );
        }
        Ok(run)
    }

    async fn backup(
        &self,
        destination: &str,
        name: &str,
        env: &[(String, String)],
    ) -> anyhow::Result<Run> {
        self.silo(
            &[
                "backup",
                "--destination",
                destination,
                "--name",
                name,
                "--tenant",
                "shop/acme",
                "--server",
                "pg-shared",
                "--schema-version",
                "2026.12.01",
            ],
            env,
        )
        .await
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Run {
    success: bool,
    report: RunnerReport,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> anyhow::Result<RunnerReport> {
        if !self.success {
            bail!(
                "silo failed: {:?}\nstderr:\n{}",
                self.report.error,
                self.stderr
            );
        }
        Ok(self.report)
    }

    fn failed(self) -> anyhow::Result<String> {
        if self.success {
            bail!("silo succeeded where it must fail: {:?}", self.report);
        }
        self.report
            .error
            .context("a failed run's report has no error")
    }

    fn peak_rss_kib(&self) -> Option<u64> {
        let line = self
            .stderr
            .lines()
            .rev()
            .find(|l| l.contains("peak_rss_kib="))?;
        let value = line.split("peak_rss_kib=").nth(1)?;
        value.split_whitespace().next()?.parse().ok()
    }
}

fn runner_bin() -> anyhow::Result<PathBuf> {
    let bin = std::env::var_os("SILO_RUNNER_BIN")
        .map(PathBuf::from)
        .context("SILO_RUNNER_BIN is not set (e2e/run-tests.sh builds `silo` and sets it)")?;
    ensure!(
        bin.exists(),
        "SILO_RUNNER_BIN {} does not exist",
        bin.display()
    );
    Ok(bin)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk_files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_backup_to_a_file_restores_every_row() -> anyhow::Result<()> {
    let f = Fixture::start("file").await?;
    let original = f.fingerprint("src").await?;
    let dest = f.dir.join("backups/shop/acme");
    let report = f.backup(&file_url(&dest), "b1", &[]).await?.ok()?;

    // The object is where the report says, and its sha256 and size are the report's.
    let object = std::fs::read(dest.join("b1.dump"))?;
    assert_eq!(
        report.uri.as_deref(),
        Some(file_url(&dest.join("b1.dump")).as_str())
    );
    assert_eq!(report.bytes, Some(object.len() as u64));
    assert_eq!(report.sha256.as_deref(), Some(sha256_hex(&object).as_str()));
    assert_eq!(report.verified, None);
    let manifest: BackupManifest = serde_json::from_slice(&std::fs::read(dest.join("b1.json"))?)?;
    assert_eq!(manifest.tenant, "shop/acme");
    assert_eq!(manifest.server, "pg-shared");
    assert_eq!(manifest.schema_version.as_deref(), Some("2026.12.01"));
    assert_eq!(manifest.object, "b1.dump");
    assert_eq!(manifest.bytes, object.len() as u64);
    assert_eq!(Some(&manifest.sha256), report.sha256.as_ref());
    assert!(manifest.postgres_version.starts_with("15"), "{manifest:?}");
    assert!(manifest.start <= manifest.end, "{manifest:?}");
    assert_eq!(
        report.manifest.as_deref(),
        Some(file_url(&dest.join("b1.json")).as_str())
    );

    f.damage("src").await?;
    assert_ne!(f.fingerprint("src").await?, original);
    // Into the libpq environment's database (the tenant's own, as a Job gets it).
    let sha = report.sha256.clone().unwrap_or_default();
    let restored = f
        .silo(
            &[
                "restore",
                "--source",
                &file_url(&dest.join("b1.dump")),
                "--sha256",
                &sha,
            ],
            &[],
        )
        .await?
        .ok()?;
    assert_eq!(restored.sha256.as_deref(), Some(sha.as_str()));
    assert_eq!(restored.bytes, Some(object.len() as u64));
    assert_eq!(f.fingerprint("src").await?, original);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_backup_to_s3_restores_every_row() -> anyhow::Result<()> {
    let Some(s3) = S3Store::shared("runner_backup_to_s3_restores_every_row") else {
        return Ok(());
    };
    let f = Fixture::start("s3").await?;
    let original = f.fingerprint("src").await?;
    let prefix = format!("shop/acme-{}", random_password().to_lowercase());
    let destination = format!("s3://{}/{prefix}", s3.bucket);
    let report = f.backup(&destination, "b1", &s3.aws_env()).await?.ok()?;
    assert_eq!(report.uri, Some(format!("{destination}/b1.dump")));
    assert_eq!(report.manifest, Some(format!("{destination}/b1.json")));

    // Read back with the test's own client.
    let client = s3.client()?;
    let object = client
        .get(&ObjectPath::from(format!("{prefix}/b1.dump")))
        .await?
        .bytes()
        .await?;
    assert_eq!(report.sha256.as_deref(), Some(sha256_hex(&object).as_str()));
    assert_eq!(report.bytes, Some(object.len() as u64));
    let manifest = client
        .get(&ObjectPath::from(format!("{prefix}/b1.json")))
        .await?
        .bytes()
        .await?;
    let manifest: BackupManifest = serde_json::from_slice(&manifest)?;
    assert_eq!(Some(&manifest.sha256), report.sha256.as_ref());
    assert_eq!(manifest.bytes, object.len() as u64);

    // Restored into a database named by URL (password in it) on another server: a copy of the
    // tenant, with every row; and into the source itself after damage.
    let target = Fixture::start("s3-target").await?;
    target.sql("postgres", "CREATE DATABASE copy").await?;
    let sha = report.sha256.clone().unwrap_or_default();
    let source = format!("{destination}/b1.dump");
    let into = target.url("copy");
    let env = s3.aws_env();
    let run = f
        .silo(
            &[
                "restore", "--source", &source, "--sha256", &sha, "--into", &into,
            ],
            &env,
        )
        .await?;
    ensure!(
        !run.stdout.contains(&target.pg.admin_password)
            && !run.stderr.contains(&target.pg.admin_password),
        "the --into password shows in the output"
    );
    run.ok()?;
    assert_eq!(target.fingerprint("copy").await?, original);

    f.damage("src").await?;
    f.silo(
        &["restore", "--source", &source, "--sha256", &sha],
        &s3.aws_env(),
    )
    .await?
    .ok()?;
    assert_eq!(f.fingerprint("src").await?, original);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_corrupted_object_or_a_wrong_sha256_changes_nothing() -> anyhow::Result<()> {
    let f = Fixture::start("corrupt").await?;
    let dest = f.dir.join("backups");
    let report = f.backup(&file_url(&dest), "b1", &[]).await?.ok()?;
    let sha = report.sha256.clone().unwrap_or_default();
    let pristine = std::fs::read(dest.join("b1.dump"))?;
    f.damage("src").await?;
    let damaged = f.fingerprint("src").await?;

    let restore = |name: &'static str, sha: String| {
        let source = file_url(&dest.join(name));
        let f = &f;
        async move {
            f.silo(&["restore", "--source", &source, "--sha256", &sha], &[])
                .await?
                .failed()
        }
    };
    // Bytes flipped in the middle.
    let mut flipped = pristine.clone();
    let middle = flipped.len() / 2;
    for b in &mut flipped[middle..middle + 16] {
        *b ^= 0xff;
    }
    std::fs::write(dest.join("flipped.dump"), &flipped)?;
    // Bytes appended: pg_restore itself would accept this dump, only the sha256 tells.
    let mut appended = pristine.clone();
    appended.extend_from_slice(b"trailing garbage that pg_restore would ignore");
    std::fs::write(dest.join("appended.dump"), &appended)?;

    for (name, actual) in [
        ("flipped.dump", sha256_hex(&flipped)),
        ("appended.dump", sha256_hex(&appended)),
    ] {
        let error = restore(name, sha.clone()).await?;
        assert!(error.contains("sha256 mismatch"), "{name}: {error}");
        assert!(
            error.contains(&sha) && error.contains(&actual),
            "{name}: {error}"
        );
        assert_eq!(
            f.fingerprint("src").await?,
            damaged,
            "{name} changed the database"
        );
    }
    // The pristine object with a sha256 it does not have.
    let wrong = sha256_hex(b"another dump");
    let error = restore("b1.dump", wrong.clone()).await?;
    assert!(error.contains(&wrong) && error.contains(&sha), "{error}");
    assert_eq!(
        f.fingerprint("src").await?,
        damaged,
        "a wrong sha256 changed the database"
    );
    Ok(())
}

/// A pg_dump that writes the first 10 MB of a real dump and then dies of SIGKILL.
fn dying_pg_dump(dir: &Path) -> anyhow::Result<PathBuf> {
    let real = pg_bin_dir()?.join("pg_dump");
    let script = dir.join("dying-pg_dump");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             case \"$1\" in --version) exec {real} --version ;; esac\n\
             {real} \"$@\" | head -c 10000000\n\
             kill -9 $$\n",
            real = real.display()
        ),
    )?;
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()?;
    Ok(script)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_dump_killed_midway_leaves_no_object_and_no_manifest() -> anyhow::Result<()> {
    let f = Fixture::start("killed").await?;
    f.add_bulk(16_000).await?; // some 16 MB of dump: parts are uploaded before it dies
    let pg_dump = dying_pg_dump(&f.dir)?;
    let pg_dump = pg_dump.display().to_string();

    let dest = f.dir.join("backups");
    let error = f
        .silo(
            &[
                "--pg-dump",
                &pg_dump,
                "backup",
                "--destination",
                &file_url(&dest),
                "--name",
                "b1",
                "--tenant",
                "shop/acme",
                "--server",
                "pg-shared",
            ],
            &[],
        )
        .await?
        .failed()?;
    assert!(error.contains("pg_dump failed"), "{error}");
    let left = walk_files(&dest);
    assert!(left.is_empty(), "files left behind: {left:?}");

    let Some(s3) =
        S3Store::shared("runner_dump_killed_midway_leaves_no_object_and_no_manifest (s3 part)")
    else {
        return Ok(());
    };
    let prefix = format!("killed-{}", random_password().to_lowercase());
    let run = f
        .silo(
            &[
                "--pg-dump",
                &pg_dump,
                "backup",
                "--destination",
                &format!("s3://{}/{prefix}", s3.bucket),
                "--name",
                "b1",
                "--tenant",
                "shop/acme",
                "--server",
                "pg-shared",
            ],
            &s3.aws_env(),
        )
        .await?;
    let error = run.failed()?;
    assert!(error.contains("pg_dump failed"), "{error}");
    let keys = s3.keys(&prefix).await?;
    assert!(keys.is_empty(), "objects left behind: {keys:?}");
    // The check below can see staged parts: an upload the test leaves open has some.
    let open_key = format!("{prefix}/open.dump");
    let mut open = s3
        .client()?
        .put_multipart(&ObjectPath::from(open_key.as_str()))
        .await?;
    open.put_part(vec![7u8; 1024].into()).await?;
    ensure!(
        !staged_parts(&s3, &open_key).is_empty(),
        "versitygw stages parts elsewhere"
    );
    open.abort().await?;
    let staged = staged_parts(&s3, &format!("{prefix}/b1.dump"));
    assert!(
        staged.is_empty(),
        "the multipart upload was not aborted: {staged:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_unreachable_destination_fails_clearly_and_leaves_nothing() -> anyhow::Result<()> {
    let f = Fixture::start("unreachable").await?;
    // Nothing listens on this loopback port.
    let port = free_port()?;
    let env = vec![
        (
            "AWS_ENDPOINT".to_string(),
            format!("http://127.0.0.1:{port}"),
        ),
        ("AWS_REGION".to_string(), "us-east-1".to_string()),
        ("AWS_ACCESS_KEY_ID".to_string(), "silo-test".to_string()),
        ("AWS_ALLOW_HTTP".to_string(), "true".to_string()),
    ];
    let started = std::time::Instant::now();
    let error = f.backup("s3://nowhere/acme", "b1", &env).await?.failed()?;
    assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");
    assert!(error.contains("s3://nowhere/acme/b1.dump"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(90),
        "took {:?}",
        started.elapsed()
    );

    // A folder that cannot be created (a file is in the way).
    std::fs::write(f.dir.join("a-file"), b"x")?;
    let dest = f.dir.join("a-file/backups");
    let error = f.backup(&file_url(&dest), "b1", &[]).await?.failed()?;
    assert!(error.contains("a-file/backups"), "{error}");

    // An unknown scheme, with a password in the URL that must not show.
    let error = f
        .backup(
            &format!("ftp://u:{}@127.0.0.1/x", f.pg.admin_password),
            "b1",
            &[],
        )
        .await?
        .failed()?;
    assert!(error.contains("unsupported scheme \"ftp\""), "{error}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_verified_backup_has_the_source_row_counts_in_the_scratch_copy() -> anyhow::Result<()>
{
    let f = Fixture::start("verify").await?;
    f.sql("postgres", "CREATE DATABASE scratch").await?;
    let dest = f.dir.join("backups");
    let report = f
        .silo(
            &[
                "backup",
                "--destination",
                &file_url(&dest),
                "--name",
                "b1",
                "--tenant",
                "shop/acme",
                "--server",
                "pg-shared",
                "--verify-into",
                &f.url("scratch"),
            ],
            &[],
        )
        .await?
        .ok()?;
    assert_eq!(report.verified, Some(true), "{report:?}");
    assert!(report.mismatches.is_empty(), "{report:?}");
    assert_eq!(f.fingerprint("scratch").await?, f.fingerprint("src").await?);

    // A scratch database that does not exist: the backup stands, verification fails, clearly.
    let run = f
        .silo(
            &[
                "backup",
                "--destination",
                &file_url(&dest),
                "--name",
                "b2",
                "--tenant",
                "shop/acme",
                "--server",
                "pg-shared",
                "--verify-into",
                &f.url("no_such_scratch"),
            ],
            &[],
        )
        .await?;
    let report = run.report.clone();
    let error = run.failed()?;
    assert!(error.contains("no_such_scratch"), "{error}");
    assert_eq!(report.verified, Some(false), "{report:?}");
    assert!(
        report.uri.is_some() && report.manifest.is_some(),
        "{report:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_server_newer_than_pg_dump_is_refused_before_anything_is_written()
-> anyhow::Result<()> {
    let f = Fixture::start("newer").await?;
    let marker = f.dir.join("pg_dump-ran");
    let script = f.dir.join("old-pg_dump");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             case \"$1\" in --version) echo 'pg_dump (PostgreSQL) 14.11' ; exit 0 ;; esac\n\
             touch {}\nexit 1\n",
            marker.display()
        ),
    )?;
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()?;
    let dest = f.dir.join("backups");
    let error = f
        .silo(
            &[
                "--pg-dump",
                &script.display().to_string(),
                "backup",
                "--destination",
                &file_url(&dest),
                "--name",
                "b1",
                "--tenant",
                "shop/acme",
                "--server",
                "pg-shared",
            ],
            &[],
        )
        .await?
        .failed()?;
    assert!(error.contains("PostgreSQL 15."), "{error}");
    assert!(error.contains("pg_dump 14.11"), "{error}");
    assert!(!marker.exists(), "pg_dump ran");
    assert!(walk_files(&dest).is_empty(), "{:?}", walk_files(&dest));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_large_dump_streams_in_bounded_memory() -> anyhow::Result<()> {
    let f = Fixture::start("large").await?;
    f.add_bulk(100_000).await?; // some 100 MB of dump
    let s3 =
        S3Store::shared("runner_large_dump_streams_in_bounded_memory (to s3; file:// instead)");
    let (destination, env) = match &s3 {
        Some(s3) => (
            format!(
                "s3://{}/large-{}",
                s3.bucket,
                random_password().to_lowercase()
            ),
            s3.aws_env(),
        ),
        None => (file_url(&f.dir.join("backups")), Vec::new()),
    };
    let run = f.backup(&destination, "b1", &env).await?;
    let peak = run.peak_rss_kib();
    let report = run.ok()?;
    let bytes = report.bytes.unwrap_or(0);
    assert!(bytes > 90_000_000, "the dump is only {bytes} bytes");
    let peak = peak.context("no peak_rss_kib in the runner's log")?;
    assert!(
        peak < 64 * 1024,
        "peak RSS {peak} KiB for a {bytes}-byte dump, over 64 MiB"
    );
    eprintln!("runner peak RSS {peak} KiB for a {bytes}-byte dump to {destination}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_sigterm_mid_upload_aborts_it() -> anyhow::Result<()> {
    let f = Fixture::start("sigterm").await?;
    f.add_bulk(12_000).await?;
    // A pg_dump that writes 10 MB and then stalls, as a slow source would.
    let real = pg_bin_dir()?.join("pg_dump");
    let script = f.dir.join("stalling-pg_dump");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             case \"$1\" in --version) exec {real} --version ;; esac\n\
             {real} \"$@\" | head -c 10000000\n\
             exec sleep 120\n",
            real = real.display()
        ),
    )?;
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()?;
    let dest = f.dir.join("backups");
    let staging = dest.clone();
    let run = f
        .silo_then(
            &[
                "--pg-dump",
                &script.display().to_string(),
                "backup",
                "--destination",
                &file_url(&dest),
                "--name",
                "b1",
                "--tenant",
                "shop/acme",
                "--server",
                "pg-shared",
            ],
            &[],
            |pid| async move {
                // Once the upload has written its first part (a staging file), as a Job past its
                // deadline would be.
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while walk_files(&staging).is_empty() {
                    ensure!(
                        std::time::Instant::now() < deadline,
                        "no staging file appeared"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()?;
                Ok(())
            },
        )
        .await?;
    let error = run.failed()?;
    assert!(error.contains("interrupted"), "{error}");
    let left = walk_files(&dest);
    assert!(left.is_empty(), "files left behind: {left:?}");
    Ok(())
}
