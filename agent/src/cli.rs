//! `ferry-agent`: the daemon installed on source hosts and target VMs.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferry-agent",
    version,
    about = "ferry agent: scans and sends data (source), receives and writes it (target)"
)]
struct Cli {
    /// Log one JSON object per line.
    #[arg(long, global = true, env = "FERRY_JSON_LOGS")]
    json_logs: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent until SIGTERM or SIGINT.
    Run {
        /// Config file.
        #[arg(
            long,
            env = "FERRY_AGENT_CONFIG",
            default_value = "/etc/ferry/agent.toml"
        )]
        config: PathBuf,
    },
}

/// The binary's entry point.
#[tokio::main]
pub async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    ferry_common::telemetry::init("info", cli.json_logs);
    match cli.cmd {
        Cmd::Run { config } => {
            let cfg: crate::run::AgentConfig = ferry_common::config::load_toml(&config)?;
            let agent = crate::run::start(cfg)
                .await
                .with_context(|| format!("agent failed to start (config {})", config.display()))?;
            ferry_common::systemd::notify("READY=1");
            ferry_common::systemd::wait_for_signal().await?;
            tracing::info!(message = "Stopping.");
            ferry_common::systemd::notify("STOPPING=1");
            agent.shutdown().await;
            Ok(())
        }
    }
}
