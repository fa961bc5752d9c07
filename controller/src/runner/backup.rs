//! `silo backup`: pg_dump of an exported snapshot, streamed to the destination with its size and
//! sha256, then the manifest; with `--verify-into`, a restore into a scratch database and a
//! comparison of every table's rows with the source's in that same snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::Duration;

use object_store::{ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};
use silo_crds::backup::{BackupManifest, RunnerReport, TableMismatch};
use sqlx::Executor;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tracing::{info, warn};

use super::location::{Location, Object};
use super::pg::{self, DbTarget};
use super::redact::Redactor;
use super::upload::Upload;
use super::{BackupArgs, RunnerError, Tools, hex};

/// Parts uploading at once (besides the one being filled): with 8 MiB parts, about 24 MiB of
/// buffers in all.
const PARTS_IN_FLIGHT: usize = 2;
/// What is read from pg_dump at a time.
const READ_BUFFER: usize = 256 * 1024;
/// How much of a failing tool's stderr an error keeps.
pub const STDERR_TAIL: usize = 1500;

pub async fn backup(
    args: &BackupArgs,
    tools: &Tools,
    redactor: &mut Redactor,
    report: &mut RunnerReport,
) -> Result<(), RunnerError> {
    let verify = match &args.verify_into {
        Some(url) => {
            let target = DbTarget::from_url(url)?;
            redactor.add(target.secret());
            Some(target)
        }
        None => None,
    };
    let location = Location::parse(&args.destination)?;
    let object_name = format!("{}.dump", args.name);
    let manifest_name = format!("{}.json", args.name);
    let object = location.open(&object_name, true)?;
    let manifest = location.open(&manifest_name, false)?;
    let start = jiff::Timestamp::now();

    // The source, from the libpq environment: its version first, so that a server newer than
    // pg_dump fails before anything is written.
    let source = DbTarget::Env;
    let mut conn = source.connect("source").await?;
    let (server_version, server_major) = pg::server_version(&mut conn).await?;
    let (pg_dump_version, pg_dump_major) = pg::tool_version(&tools.pg_dump).await?;
    if server_major > pg_dump_major {
        return Err(RunnerError::ServerTooNew {
            server: server_version,
            server_major,
            pg_dump: pg_dump_version,
        });
    }

    // One snapshot for the dump and the row counts: exported by a transaction that stays open
    // until both are done.
    // The transaction idles while pg_dump runs: a role's idle_in_transaction_session_timeout
    // must not end it before the row counts are taken.
    conn.execute(
        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; \
         SET LOCAL idle_in_transaction_session_timeout = 0",
    )
    .await
    .map_err(|source| RunnerError::Query {
        what: "starting the snapshot transaction",
        source,
    })?;
    let snapshot: String = sqlx::query_scalar("SELECT pg_catalog.pg_export_snapshot()")
        .fetch_one(&mut conn)
        .await
        .map_err(|source| RunnerError::Query {
            what: "exporting a snapshot",
            source,
        })?;
    info!(
        destination = %object.uri,
        server_version = %server_version,
        pg_dump = %pg_dump_version,
        "backup started"
    );

    let part_size = usize::from(args.part_size_mib) * 1024 * 1024;
    let (bytes, sha256) = dump_to(&object, &snapshot, tools, part_size, redactor).await?;
    report.bytes = Some(bytes);
    report.sha256 = Some(sha256.clone());
    report.uri = Some(object.uri.clone());
    let end = jiff::Timestamp::now();
    info!(uri = %object.uri, bytes, sha256 = %sha256, "dump uploaded");

    let source_counts = match verify {
        Some(_) => Some(pg::count_rows(&mut conn).await?),
        None => None,
    };
    if let Err(error) = conn.execute("COMMIT").await {
        warn!(error = %error, "ending the snapshot transaction");
    }
    drop(conn);

    let body = BackupManifest {
        tenant: args.tenant.clone(),
        server: args.server.clone(),
        postgres_version: server_version,
        pg_dump_version,
        schema_version: args.schema_version.clone(),
        object: object_name,
        bytes,
        sha256: sha256.clone(),
        start: start.to_string(),
        end: end.to_string(),
    };
    let json = serde_json::to_vec_pretty(&body).map_err(|e| RunnerError::Io {
        what: "encoding the manifest",
        source: e.into(),
    })?;
    manifest
        .store
        .put(&manifest.path, PutPayload::from(json))
        .await
        .map_err(|source| RunnerError::Store {
            op: "writing the manifest",
            uri: manifest.uri.clone(),
            source,
        })?;
    report.manifest = Some(manifest.uri.clone());
    info!(manifest = %manifest.uri, "manifest written");

    if let (Some(target), Some(source_counts)) = (verify, source_counts) {
        report.verified = Some(false);
        let restore_report = &mut RunnerReport::default();
        super::restore::restore(
            &object,
            &sha256,
            &target,
            None,
            tools,
            redactor,
            restore_report,
        )
        .await
        .map_err(|e| RunnerError::VerifyRestore(Box::new(e)))?;
        let mut scratch = target.connect("scratch").await?;
        let restored = pg::count_rows(&mut scratch).await?;
        let mismatches = compare_counts(&source_counts, &restored);
        info!(
            tables = source_counts.len(),
            mismatches = mismatches.len(),
            "verification done"
        );
        if !mismatches.is_empty() {
            let count = mismatches.len();
            report.mismatches = mismatches;
            return Err(RunnerError::Verification(count));
        }
        report.verified = Some(true);
    }
    Ok(())
}

/// Runs pg_dump on the snapshot and streams its output into a multipart upload of `object`.
/// The object exists only if pg_dump exited 0 and the upload completed; otherwise the upload is
/// aborted. Returns the size and sha256.
async fn dump_to(
    object: &Object,
    snapshot: &str,
    tools: &Tools,
    part_size: usize,
    redactor: &Redactor,
) -> Result<(u64, String), RunnerError> {
    let store_error = |op| {
        move |source| RunnerError::Store {
            op,
            uri: object.uri.clone(),
            source,
        }
    };
    // Started before pg_dump: an unreachable destination fails before any dumping.
    let multipart = object
        .store
        .put_multipart(&object.path)
        .await
        .map_err(store_error("starting the upload to"))?;
    let mut upload = Upload::new(multipart, part_size, PARTS_IN_FLIGHT);

    let mut child = match Command::new(&tools.pg_dump)
        .args(["--format=custom", "--no-password"])
        .arg(format!("--snapshot={snapshot}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(source) => {
            abort(upload, &object.uri).await;
            return Err(RunnerError::Spawn {
                tool: tools.pg_dump.display().to_string(),
                source,
            });
        }
    };
    let stderr = child
        .stderr
        .take()
        .map(|pipe| tokio::spawn(pg::read_tail(pipe, STDERR_TAIL)));
    let Some(mut stdout) = child.stdout.take() else {
        abort(upload, &object.uri).await;
        return Err(RunnerError::Io {
            what: "reading pg_dump's output",
            source: std::io::Error::other("no stdout pipe"),
        });
    };

    let mut hasher = Sha256::new();
    let mut bytes: u64 = 0;
    let mut buf = vec![0u8; READ_BUFFER];
    let stream = async {
        loop {
            let n = stdout
                .read(&mut buf)
                .await
                .map_err(|source| RunnerError::Io {
                    what: "reading pg_dump's output",
                    source,
                })?;
            if n == 0 {
                return Ok(());
            }
            hasher.update(&buf[..n]);
            bytes += n as u64;
            upload
                .write(&buf[..n])
                .await
                .map_err(store_error("uploading to"))?;
        }
    };
    let streamed: Result<(), RunnerError> = tokio::select! {
        streamed = stream => streamed,
        () = tools.stop.cancelled() => Err(RunnerError::Interrupted),
    };
    // Closing our end makes whatever still writes to it (pg_dump, or the children of a wrapper
    // script) fail instead of blocking.
    drop(stdout);
    if streamed.is_err() {
        let _ = child.start_kill();
    }
    let status = child.wait().await.map_err(|source| RunnerError::Io {
        what: "waiting for pg_dump",
        source,
    });
    // Bounded: a grandchild that outlived a killed pg_dump may hold its stderr open.
    let stderr_tail = match stderr {
        Some(task) => tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default(),
        None => String::new(),
    };
    let outcome = match (streamed, status) {
        (Err(error), _) | (Ok(()), Err(error)) => Err(error),
        (Ok(()), Ok(status)) if !status.success() => Err(RunnerError::PgDump {
            status: status.to_string(),
            stderr: redactor.redact(&stderr_tail),
        }),
        (Ok(()), Ok(_)) if bytes == 0 => Err(RunnerError::EmptyDump),
        (Ok(()), Ok(_)) => Ok(()),
    };
    if let Err(error) = outcome {
        abort(upload, &object.uri).await;
        return Err(error);
    }
    if !stderr_tail.is_empty() {
        warn!(stderr = %redactor.redact(&stderr_tail), "pg_dump succeeded with messages");
    }
    if let Err(source) = upload.finish().await {
        abort(upload, &object.uri).await;
        return Err(store_error("completing the upload to")(source));
    }
    Ok((bytes, hex(&hasher.finalize())))
}

async fn abort(upload: Upload, uri: &str) {
    if let Err(error) = upload.abort().await {
        warn!(uri = %uri, error = %error, "aborting the upload");
    }
}

/// The tables whose row counts differ, or that exist on one side only.
pub fn compare_counts(
    source: &BTreeMap<String, i64>,
    restored: &BTreeMap<String, i64>,
) -> Vec<TableMismatch> {
    let tables: BTreeSet<&String> = source.keys().chain(restored.keys()).collect();
    tables
        .into_iter()
        .filter_map(|table| {
            let (s, r) = (source.get(table).copied(), restored.get(table).copied());
            (s != r).then(|| TableMismatch {
                table: table.clone(),
                source: s,
                restored: r,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_compare_table_by_table() {
        let source = BTreeMap::from([
            ("public.a".to_string(), 3),
            ("public.b".to_string(), 0),
            ("public.c".to_string(), 7),
        ]);
        let restored = BTreeMap::from([
            ("public.a".to_string(), 3),
            ("public.c".to_string(), 6),
            ("public.d".to_string(), 1),
        ]);
        let got = compare_counts(&source, &restored);
        let want = vec![
            TableMismatch {
                table: "public.b".into(),
                source: Some(0),
                restored: None,
            },
            TableMismatch {
                table: "public.c".into(),
                source: Some(7),
                restored: Some(6),
            },
            TableMismatch {
                table: "public.d".into(),
                source: None,
                restored: Some(1),
            },
        ];
        assert_eq!(got, want);
        assert!(compare_counts(&source, &source).is_empty());
    }
}
