//! `silo`, the job runner that Silo's backup and restore Jobs run: `pg_dump -Fc` streamed to an
//! object store with its sha256, a manifest and an optional verifying restore; and a restore that
//! checks the dump's sha256 before pg_restore may commit. It reports through one JSON object
//! ([`silo_crds::backup::RunnerReport`]) on stdout and in the Job's termination message.

pub mod backup;
pub mod location;
pub mod pg;
pub mod redact;
pub mod restore;
pub mod tail;
pub mod upload;

use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser, Subcommand};
use silo_crds::backup::RunnerReport;
use tokio_util::sync::CancellationToken;

use self::location::LocationError;
use self::redact::Redactor;

/// Environment variables whose values are secrets, masked in everything the runner prints.
pub const SECRET_ENV: &[&str] = &["PGPASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"];

/// Silo's job runner: backs up and restores tenant databases.
///
/// The database comes from the libpq environment (PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD)
/// or a postgres:// URL. S3 destinations (s3://bucket/prefix) are configured by AWS_ENDPOINT,
/// AWS_REGION (or AWS_DEFAULT_REGION), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
/// AWS_ALLOW_HTTP=true (a plain-HTTP endpoint) and AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true (default:
/// path-style requests, as most S3-compatible stores want).
#[derive(Parser, Debug)]
#[command(name = "silo", version)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
    /// Where the JSON report goes (besides stdout); a Job reads it as its termination message.
    #[arg(
        long,
        global = true,
        env = "SILO_REPORT",
        default_value = "/dev/termination-log"
    )]
    pub report: PathBuf,
    /// The pg_dump to run.
    #[arg(long, global = true, env = "SILO_PG_DUMP", default_value = "pg_dump")]
    pub pg_dump: PathBuf,
    /// The pg_restore to run.
    #[arg(
        long,
        global = true,
        env = "SILO_PG_RESTORE",
        default_value = "pg_restore"
    )]
    pub pg_restore: PathBuf,
    /// Log filter (tracing's EnvFilter syntax); logs go to stderr.
    #[arg(long, global = true, env = "SILO_LOG", default_value = "info")]
    pub log_filter: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Dump the database (libpq environment) to DESTINATION/NAME.dump, then write NAME.json.
    Backup(BackupArgs),
    /// Restore a dump into a database, checking its sha256 before anything commits.
    Restore(RestoreArgs),
}

#[derive(ClapArgs, Debug, Clone)]
pub struct BackupArgs {
    /// file:///dir (created if missing) or s3://bucket/prefix.
    #[arg(long, env = "SILO_BACKUP_DESTINATION")]
    pub destination: String,
    /// The backup's name: the object is NAME.dump and the manifest NAME.json.
    #[arg(long, env = "SILO_BACKUP_NAME")]
    pub name: String,
    /// The Tenant, NAMESPACE/NAME (recorded in the manifest).
    #[arg(long, env = "SILO_TENANT")]
    pub tenant: String,
    /// The DatabaseServer the tenant lives on (recorded in the manifest).
    #[arg(long, env = "SILO_SERVER")]
    pub server: String,
    /// The tenant's schema version (recorded in the manifest).
    #[arg(long, env = "SILO_SCHEMA_VERSION")]
    pub schema_version: Option<String>,
    /// Restore the dump into this scratch database (postgres:// URL; it must exist and may be
    /// overwritten) and compare every table's rows with the source's in the dump's snapshot.
    #[arg(long, env = "SILO_VERIFY_INTO", hide_env_values = true)]
    pub verify_into: Option<String>,
    /// Multipart upload part size in MiB (S3 allows 10,000 parts: 8 MiB parts fit a 78 GiB dump).
    #[arg(long, env = "SILO_PART_SIZE_MIB", default_value_t = 8, value_parser = clap::value_parser!(u16).range(5..=512))]
    pub part_size_mib: u16,
}

#[derive(ClapArgs, Debug, Clone)]
pub struct RestoreArgs {
    /// The dump: file:///dir/NAME.dump or s3://bucket/prefix/NAME.dump.
    #[arg(long, env = "SILO_RESTORE_SOURCE")]
    pub source: String,
    /// The dump's expected sha256 (hex); on a mismatch nothing is restored.
    #[arg(long, env = "SILO_RESTORE_SHA256")]
    pub sha256: String,
    /// The target database as a postgres:// URL; without it, the libpq environment.
    #[arg(long, env = "SILO_RESTORE_INTO", hide_env_values = true)]
    pub into: Option<String>,
    /// pg_restore --role: the role that owns what is restored (e.g. the tenant's owner role).
    #[arg(long, env = "SILO_RESTORE_ROLE")]
    pub role: Option<String>,
}

/// The client tools the runner runs, and the signal to stop.
#[derive(Clone, Debug)]
pub struct Tools {
    pub pg_dump: PathBuf,
    pub pg_restore: PathBuf,
    /// Cancelled on SIGTERM/SIGINT (a Job deleted or past its deadline): an upload in progress
    /// is aborted and pg_restore killed, as on any other failure.
    pub stop: CancellationToken,
}

#[derive(thiserror::Error, Debug)]
pub enum RunnerError {
    #[error(transparent)]
    Location(#[from] LocationError),
    #[error("invalid database URL {url}: {why}")]
    DatabaseUrl { url: String, why: String },
    #[error("{op} {uri}: {source}")]
    Store {
        op: &'static str,
        uri: String,
        #[source]
        source: object_store::Error,
    },
    #[error("connecting to the {what} database: {source}")]
    Connect {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("{what}: {source}")]
    Query {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("starting {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot tell the version of {tool} from {output:?}")]
    ToolVersion { tool: String, output: String },
    #[error(
        "the server runs PostgreSQL {server}, newer than pg_dump {pg_dump}: pg_dump cannot dump a newer server (use a runner image with pg_dump {server_major} or later)"
    )]
    ServerTooNew {
        server: String,
        server_major: u32,
        pg_dump: String,
    },
    #[error("pg_dump failed ({status}): {stderr}")]
    PgDump { status: String, stderr: String },
    #[error("pg_dump wrote nothing")]
    EmptyDump,
    #[error("pg_restore failed ({status}): {stderr}")]
    PgRestore { status: String, stderr: String },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("--sha256 {0:?} is not 64 hex digits")]
    BadSha256(String),
    #[error(
        "sha256 mismatch: expected {expected}, the object has {actual}; pg_restore was stopped before it had all its input, nothing was restored"
    )]
    Sha256Mismatch { expected: String, actual: String },
    #[error("verification failed: {0} table(s) differ between the source and the restored copy")]
    Verification(usize),
    #[error("interrupted by SIGTERM or SIGINT")]
    Interrupted,
    #[error("verifying restore into the scratch database: {0}")]
    VerifyRestore(Box<RunnerError>),
}

impl RunnerError {
    /// A short PascalCase reason, for the controller's conditions and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            RunnerError::Location(_) => "InvalidLocation",
            RunnerError::DatabaseUrl { .. } => "InvalidDatabaseUrl",
            RunnerError::Store { .. } => "StoreFailed",
            RunnerError::Connect { .. } => "ConnectFailed",
            RunnerError::Query { .. } => "QueryFailed",
            RunnerError::Spawn { .. } | RunnerError::ToolVersion { .. } => "ToolMissing",
            RunnerError::ServerTooNew { .. } => "ServerTooNew",
            RunnerError::PgDump { .. } | RunnerError::EmptyDump => "DumpFailed",
            RunnerError::PgRestore { .. } => "RestoreFailed",
            RunnerError::Io { .. } => "IoFailed",
            RunnerError::BadSha256(_) => "InvalidSha256",
            RunnerError::Sha256Mismatch { .. } => "Sha256Mismatch",
            RunnerError::Verification(_) | RunnerError::VerifyRestore(_) => "VerificationFailed",
            RunnerError::Interrupted => "Interrupted",
        }
    }
}

/// Runs one command and returns its report, passwords masked; `secrets` are values to mask
/// (the environment's passwords), to which the passwords of URLs in the arguments are added.
pub async fn run(command: Command, tools: &Tools, secrets: Vec<String>) -> RunnerReport {
    let mut redactor = Redactor::new(secrets);
    let mut report = RunnerReport::default();
    let result = match command {
        Command::Backup(args) => backup::backup(&args, tools, &mut redactor, &mut report).await,
        Command::Restore(args) => restore::run(&args, tools, &mut redactor, &mut report).await,
    };
    match result {
        Ok(()) => report.ok = true,
        Err(error) => {
            report.ok = false;
            let message = redactor.redact(&error_chain(&error));
            tracing::error!(reason = error.reason(), error = %message, "failed");
            report.error = Some(message);
        }
    }
    report
}

/// An error and its sources, one after the other (sqlx and object_store keep the cause there).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn verify_cli() {
        Args::command().debug_assert();
    }

    #[test]
    fn errors_show_their_causes_once() {
        let error = RunnerError::Io {
            what: "reading the dump",
            source: std::io::Error::other("disk on fire"),
        };
        assert_eq!(error_chain(&error), "reading the dump: disk on fire");
    }
}
