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
    #[arg(long, global = true, env = "FERRY_JSON_LOGS", value_parser = clap::builder::BoolishValueParser::new())]
    json_logs: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Assess a tree before migrating it, without moving anything: bytes, files, directories,
    /// a size histogram, the largest files, the small-file share, hardlinks, sparse files,
    /// names that are not UTF-8, paths that cannot be copied, and how much changed in the last
    /// hour, day and week. Walks it as a migration would; progress on stderr.
    Assess {
        /// The directory to assess.
        path: PathBuf,
        /// Leave out paths matching this glob (relative to PATH, as `migration create
        /// --exclude`); repeatable.
        #[arg(long)]
        exclude: Vec<String>,
        /// A gitignore-style file of paths to leave out (as `migration create
        /// --exclude-from`); repeatable.
        #[arg(long, value_name = "FILE")]
        exclude_from: Vec<PathBuf>,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Join a cluster with a one-time token (`ferryctl token create`): makes this agent's key
    /// here, has a coordinator sign a certificate for it, and writes the CA certificate, the key
    /// and the certificate where the config's [tls] section says. The coordinator's CA is
    /// checked against the token's pin before anything of the token is sent.
    Join {
        /// The token (or set FERRY_JOIN_TOKEN, which keeps it out of the process list).
        #[arg(long, env = "FERRY_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// A coordinator's join listener (its `join_listen`), host:port.
        #[arg(long)]
        coordinator: String,
        /// Config file: the agent's name and where its TLS files go.
        #[arg(
            long,
            env = "FERRY_AGENT_CONFIG",
            default_value = "/etc/ferry/agent.toml"
        )]
        config: PathBuf,
        /// Replace this agent's key and certificate if it has them (joining again after a
        /// revocation, or after its certificate expired while it was stopped).
        #[arg(long)]
        replace: bool,
    },
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
pub fn main() -> anyhow::Result<()> {
    limit_malloc_arenas();
    // Fault points named in FAILPOINTS (tests of crashes; see `fault_point!`).
    #[cfg(feature = "failpoints")]
    let _faults = fail::FailScenario::setup();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run())
}

/// glibc gives each thread that contends for the allocator an arena of its own (up to 8 per
/// core) and keeps what those arenas freed: an agent's transfers and scans move between many
/// threads, and its RSS grew with every migration it served (lan dataset, 5,000 files, three
/// migrations in a row: 118, 136, 135 MiB; with two arenas 91, 95, 96 MiB, as fast). Two
/// arenas, unless the operator set `MALLOC_ARENA_MAX`. Must run before any thread starts.
/// (glibc reads that variable once, before `main`: setting it from here would be too late, so
/// this is the one call the workspace's `unsafe_code = "deny"` lets through.)
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let logging = ferry_common::telemetry::init("info", cli.json_logs);
    match cli.cmd {
        Cmd::Assess {
            path,
            mut exclude,
            exclude_from,
            json,
        } => {
            for f in &exclude_from {
                let text = std::fs::read_to_string(f).map_err(|e| {
                    anyhow::anyhow!("--exclude-from: cannot read {}: {e}", f.display())
                })?;
                exclude.extend(ferry_common::exclude::rules_from(&text));
            }
            let excludes = ferry_common::exclude::Excludes::new(&exclude)
                .map_err(|e| anyhow::anyhow!("--exclude/--exclude-from: {e}"))?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let a = tokio::task::spawn_blocking(move || {
                crate::assess::assess(&path, &excludes, now, 100_000, |so_far| {
                    eprintln!(
                        "… {} files, {} so far",
                        so_far.files,
                        ferry_common::text::bytes(so_far.bytes as f64)
                    )
                })
            })
            .await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&a)?);
            } else {
                print!("{}", crate::assess::table(&a));
            }
            Ok(())
        }
        Cmd::Join {
            token,
            coordinator,
            config,
            replace,
        } => {
            let token: ferry_common::enrol::JoinToken = token.parse()?;
            let (cfg, _) = ferry_common::config::load_daemon::<crate::run::AgentConfig>(&config)?;
            let info = crate::enrol::join(&token, &coordinator, &cfg.name, &cfg.tls, replace)
                .await
                .with_context(|| {
                    format!("agent {} could not join through {coordinator}", cfg.name)
                })?;
            println!(
                "agent {} joined: wrote {} and {} (serial {}, valid until {}); start it with \
                 `systemctl start ferry-agent`",
                cfg.name,
                cfg.tls.key.display(),
                cfg.tls.cert.display(),
                info.serial,
                ferry_common::text::utc(info.not_after.max(0) as u64 * 1000)
            );
            Ok(())
        }
        Cmd::Run { config } => {
            let (cfg, started) =
                ferry_common::config::load_daemon::<crate::run::AgentConfig>(&config)?;
            logging
                .apply(cfg.log_level.as_deref())
                .with_context(|| format!("config {}", config.display()))?;
            let agent = crate::run::start(cfg)
                .await
                .with_context(|| format!("agent failed to start (config {})", config.display()))?;
            ferry_common::systemd::notify("READY=1");
            let stats = agent.stats.clone();
            let mut last = (stats.snapshot(), std::time::Instant::now());
            ferry_common::systemd::wait_for_signal(
                || {
                    logging.reload::<crate::run::AgentConfig>(&config, &started, |cfg| {
                        let mut hooks = agent.hooks.write().unwrap_or_else(|p| p.into_inner());
                        if *hooks != cfg.hooks {
                            *hooks = cfg.hooks.clone();
                            tracing::info!(message = "Cutover hooks set from the config (steps that start from now on run them).");
                        }
                        &["hooks"]
                    })
                },
                || {
                    let now = (stats.snapshot(), std::time::Instant::now());
                    let line = crate::stats::status_line(
                        now.0,
                        last.0,
                        now.1.duration_since(last.1).as_secs_f64(),
                    );
                    last = now;
                    line
                },
            )
            .await?;
            tracing::info!(message = "Stopping.");
            ferry_common::systemd::notify("STOPPING=1");
            agent.shutdown().await;
            Ok(())
        }
    }
}
