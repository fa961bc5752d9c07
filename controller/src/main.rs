use clap::Parser;
use silo_controller::{config::Args, run, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(args.log_format, &args.log_filter).map_err(anyhow::Error::msg)?;
    run(args).await?;
    Ok(())
}
