//! ferry side by side with rsync, scp and rclone (and a raw QUIC blast, the transport ceiling) on
//! the same data over the same emulated WAN path. Run it from a release build, as root:
//!
//! ```sh
//! apt-get install -y rsync openssh-server openssh-client rclone   # the peers
//! pip install 'moto[server]'                                       # the S3 server (-s3 tools)
//! cargo build --release -p ferry-integration-tests --bins
//! target/release/wan-bench --profile lan --dataset checkpoint --size quick
//! ```
//!
//! Side A of the path (a network namespace) is the source host, side B the target host: sshd,
//! ferry's coordinator and target agent, and the QUIC sink run in B; rsync, scp, rclone, ferry's
//! source agent and the QUIC blaster in A. Every copy is checked against the source
//! independently (a copy that differs is reported as failed, not timed). Runs are interleaved
//! (tool A, tool B, …, then again) and each figure is the median of the successful runs.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ferry_integration_tests::bench::dataset::{Kind, Size};
use ferry_integration_tests::bench::{self, quic, Options};
use ferry_integration_tests::wan::{self, Profile};

#[derive(Parser)]
#[command(about = "ferry against rsync, scp and rclone over an emulated WAN path")]
struct Args {
    /// Path profile: lan, metro, continental, intercontinental.
    #[arg(long, default_value = "lan")]
    profile: String,
    /// Rate cap each direction (e.g. 1gbit, 200mbit); none by default.
    #[arg(long)]
    rate: Option<String>,
    /// Data set: checkpoint, dataset, mixed.
    #[arg(long, default_value = "checkpoint")]
    dataset: String,
    /// quick, full, or <MiB>x<files> (checkpoint bytes x small files).
    #[arg(long, default_value = "quick")]
    size: String,
    /// Tools, comma-separated: ferry, rsync, rsync-fsync (rsync --fsync: durable like ferry),
    /// scp, rclone, quic-raw (quinn with ferry's TLS and windows and CUBIC, bytes only),
    /// quic-raw-bbr (the same with BBR, ferry's default controller: its transport ceiling);
    /// ferry-s3 and rclone-s3 copy into an S3 server (moto) beside the target, ferry through
    /// its target agent there, rclone straight over the path.
    #[arg(long, default_value = "ferry,rsync,scp,rclone,quic-raw")]
    tools: String,
    /// Runs of each tool (interleaved); figures are medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Send `lan` through the user-space emulator too (by default `lan` is a veth pair: the
    /// emulator's forwarding, one copy per packet, would cap every tool near 1.5 Gbit/s).
    #[arg(long)]
    lan_through_emulator: bool,
    /// Seed of the data set and of the emulator's random draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also time a re-sync after changing 1 % of the data, and a re-run with nothing changed
    /// (ferry: a sync round of the same migration; rsync, rclone: the same command again).
    #[arg(long)]
    incremental: bool,
    /// Only the incremental scenario, without the timed full copies: ferry's starting copy is
    /// its own round 0, rsync's and rclone's are made locally with `cp -a` (the same bytes and
    /// mtimes their own copy leaves; only their re-syncs are timed). For data sets whose full
    /// copy over a slow path would take an hour.
    #[arg(long)]
    incremental_only: bool,
    /// Working directory (data sets are kept there and reused); default /var/tmp/ferry-wan-bench.
    #[arg(long, default_value = "/var/tmp/ferry-wan-bench")]
    workdir: PathBuf,
    /// Write the results as JSON here (default: <workdir>/results-<profile>-<dataset>.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Give up on one copy after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    /// ferry's lease time (coordinator `lease_ttl_secs`; sources renew the leases they are
    /// sending at a third of it). The default is the coordinator's, 120 s.
    #[arg(long, default_value_t = 120)]
    lease_ttl_secs: u64,
    /// Write the copies to the working directory's file system instead of a fresh ext4 made
    /// for this invocation (on a long-lived file system, file creation slows down run after
    /// run as earlier copies are deleted, which skews small-file results).
    #[arg(long)]
    no_fresh_fs: bool,
    /// The fresh file system: ext4, or xfs (made with reflinks, as on many cloud images:
    /// copying a file's unchanged blocks costs nothing there).
    #[arg(long, default_value = "ext4")]
    fs: String,
    #[command(subcommand)]
    helper: Option<quic::Helper>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(h) = args.helper {
        return quic::run(h);
    }
    let mut profile = Profile::named(&args.profile).map_err(anyhow::Error::msg)?;
    if let Some(r) = &args.rate {
        profile = profile.with_rate(Some(wan::parse_rate(r).map_err(anyhow::Error::msg)?));
    }
    bench::run(Options {
        profile,
        lan_through_emulator: args.lan_through_emulator,
        kind: Kind::parse(&args.dataset).map_err(anyhow::Error::msg)?,
        size: Size::parse(&args.size).map_err(anyhow::Error::msg)?,
        size_text: args.size,
        tools: args
            .tools
            .split(',')
            .map(|s| s.trim().to_string())
            .collect(),
        runs: if args.incremental_only { 0 } else { args.runs },
        seed: args.seed,
        incremental: args.incremental || args.incremental_only,
        local_start: args.incremental_only,
        workdir: args.workdir,
        json: args.json,
        timeout: Duration::from_secs(args.timeout_secs),
        lease_ttl_secs: args.lease_ttl_secs,
        fresh_fs: !args.no_fresh_fs,
        fs: args.fs,
    })?;
    Ok(())
}
