//! `silo restore`: the dump streamed from the store into `pg_restore --single-transaction`, its
//! sha256 computed on the way. The last bytes are held back until the whole dump's sha256 is known
//! ([`HeldTail`]): on a mismatch pg_restore is killed before it had all its input, so its one
//! transaction never commits and the target is left exactly as it was.

use std::process::Stdio;

use futures::StreamExt;
use object_store::ObjectStoreExt;
use sha2::{Digest, Sha256};
use silo_crds::backup::RunnerReport;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};
use tracing::info;

use super::backup::STDERR_TAIL;
use super::location::{Location, Object};
use super::pg::{self, DbTarget};
use super::redact::Redactor;
use super::tail::{HELD_BACK, HeldTail};
use super::{RestoreArgs, RunnerError, Tools, hex};

pub async fn run(
    args: &RestoreArgs,
    tools: &Tools,
    redactor: &mut Redactor,
    report: &mut RunnerReport,
) -> Result<(), RunnerError> {
    let target = match &args.into {
        Some(url) => DbTarget::from_url(url)?,
        None => DbTarget::Env,
    };
    redactor.add(target.secret());
    let (location, name) = Location::parse_object(&args.source)?;
    let object = location.open(&name, false)?;
    restore(
        &object,
        &args.sha256,
        &target,
        args.role.as_deref(),
        tools,
        redactor,
        report,
    )
    .await
}

/// Restores `object` into `target` if, and only if, its sha256 is `expected`.
pub async fn restore(
    object: &Object,
    expected: &str,
    target: &DbTarget,
    role: Option<&str>,
    tools: &Tools,
    redactor: &Redactor,
    report: &mut RunnerReport,
) -> Result<(), RunnerError> {
    let expected = expected.trim().to_ascii_lowercase();
    if expected.len() != 64 || !expected.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(RunnerError::BadSha256(expected));
    }
    let store_error = |op| {
        move |source| RunnerError::Store {
            op,
            uri: object.uri.clone(),
            source,
        }
    };
    let mut stream = object
        .store
        .get(&object.path)
        .await
        .map_err(store_error("reading"))?
        .into_stream();
    report.uri = Some(object.uri.clone());
    info!(source = %object.uri, "restore started");

    let mut command = Command::new(&tools.pg_restore);
    command.args([
        "--single-transaction",
        "--exit-on-error",
        "--clean",
        "--if-exists",
        "--no-owner",
        "--no-password",
    ]);
    if let Some(role) = role {
        command.arg(format!("--role={role}"));
    }
    target.apply(&mut command);
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| RunnerError::Spawn {
            tool: tools.pg_restore.display().to_string(),
            source,
        })?;
    let stderr = child
        .stderr
        .take()
        .map(|pipe| tokio::spawn(pg::read_tail(pipe, STDERR_TAIL)));
    let mut stdin = child.stdin.take();

    let mut hasher = Sha256::new();
    let mut bytes: u64 = 0;
    let mut tail = HeldTail::new(HELD_BACK);
    // pg_restore may stop reading early (an error in its transaction): a failed write ends the
    // feeding, and its exit status and stderr tell why.
    let mut feeding = true;
    let feed = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(store_error("reading"))?;
            hasher.update(&chunk);
            bytes += chunk.len() as u64;
            let release = tail.push(&chunk);
            if let Some(pipe) = stdin.as_mut().filter(|_| feeding && !release.is_empty()) {
                feeding = pipe.write_all(&release).await.is_ok();
            }
        }
        Ok(())
    };
    let fed: Result<(), RunnerError> = tokio::select! {
        fed = feed => fed,
        () = tools.stop.cancelled() => Err(RunnerError::Interrupted),
    };
    if let Err(error) = fed {
        kill(&mut child).await;
        return Err(error);
    }
    let actual = hex(&hasher.finalize());
    report.bytes = Some(bytes);
    report.sha256 = Some(actual.clone());
    if actual != expected {
        kill(&mut child).await;
        return Err(RunnerError::Sha256Mismatch { expected, actual });
    }
    if let Some(mut pipe) = stdin.take() {
        if feeding {
            let _ = pipe.write_all(&tail.finish()).await;
            let _ = pipe.shutdown().await;
        }
        drop(pipe);
    }
    let status = child.wait().await.map_err(|source| RunnerError::Io {
        what: "waiting for pg_restore",
        source,
    })?;
    let stderr_tail = match stderr {
        Some(task) => task.await.unwrap_or_default(),
        None => String::new(),
    };
    if !status.success() {
        return Err(RunnerError::PgRestore {
            status: status.to_string(),
            stderr: redactor.redact(&stderr_tail),
        });
    }
    info!(bytes, sha256 = %actual, "restore done");
    Ok(())
}

/// Kills pg_restore and waits for it: its transaction is rolled back by the server.
async fn kill(child: &mut Child) {
    let _ = child.start_kill();
    let _ = child.wait().await;
}
