//! `silo`, the job runner of Silo's backup and restore Jobs (see `silo_controller::runner`).

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;
use silo_controller::runner::{self, Args, SECRET_ENV, Tools};
use silo_crds::backup::{RunnerReport, TERMINATION_MESSAGE_LIMIT};

#[tokio::main]
async fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(error) => {
            if !matches!(
                error.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) {
                // Even bad arguments leave a report where the Job looks for one.
                let path = std::env::var_os("SILO_REPORT").unwrap_or("/dev/termination-log".into());
                let report = RunnerReport {
                    error: Some(format!("invalid arguments: {}", error.kind())),
                    ..Default::default()
                };
                let _ = std::fs::write(path, report.to_json_within(TERMINATION_MESSAGE_LIMIT));
            }
            error.exit();
        }
    };
    let Args {
        command,
        report: report_path,
        pg_dump,
        pg_restore,
        log_filter,
    } = args;
    let filter = tracing_subscriber::EnvFilter::try_new(&log_filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();

    let secrets = SECRET_ENV
        .iter()
        .filter_map(|name| std::env::var(name).ok())
        .collect();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(stop_on_signal(stop.clone()));
    let tools = Tools {
        pg_dump,
        pg_restore,
        stop,
    };
    let report = runner::run(command, &tools, secrets).await;
    tracing::info!(
        ok = report.ok,
        peak_rss_kib = peak_rss_kib().unwrap_or(0),
        "done"
    );
    let json = report.to_json_within(TERMINATION_MESSAGE_LIMIT);
    println!("{json}");
    if let Err(error) = std::fs::write(&report_path, &json) {
        tracing::warn!(path = %report_path.display(), error = %error, "writing the report");
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// This process's peak resident set size (VmHWM), which the tests hold to a bound.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Cancels `stop` on SIGTERM (what Kubernetes sends a Job's pod) or SIGINT.
async fn stop_on_signal(stop: tokio_util::sync::CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::warn!("signal received: stopping");
    stop.cancel();
}
