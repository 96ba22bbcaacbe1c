//! The side-by-side benchmark harness (`wan-bench`): ferry, rsync, scp, rclone and a raw QUIC
//! blast copy the same data over the same emulated path, interleaved, each copy checked by
//! [`crate::tree`] and measured (wall, CPU, peak memory of the tool's processes).
//!
//! [`run`] is the whole benchmark; the binary only parses its arguments.

pub mod daemon;
pub mod dataset;
pub mod ferry;
pub mod freshfs;
pub mod measure;
pub mod peers;
pub mod quic;
pub mod relay;
pub mod report;
pub mod runs;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use ferry_common::pki::Ca;

use crate::wan::{path, Profile, WanPath};
use dataset::{Kind, Size};
use peers::{Ctx, Daemons, SSH_TOOLS};
use report::{Machine, Report};

/// What to measure.
pub struct Options {
    /// The emulated path.
    pub profile: Profile,
    /// Send `lan` through the user-space emulator too, not a bare veth pair.
    pub lan_through_emulator: bool,
    /// The data set.
    pub kind: Kind,
    /// Its size.
    pub size: Size,
    /// The size as asked for (for the report).
    pub size_text: String,
    /// The tools, in order.
    pub tools: Vec<String>,
    /// Runs of each tool (interleaved).
    pub runs: usize,
    /// Seed of the data set and of the emulator's draws.
    pub seed: u64,
    /// Also time a re-sync after changing 1 % of the data.
    pub incremental: bool,
    /// The peers' starting copy for the incremental scenario is made locally (`cp -a`), not
    /// by the tool over the path.
    pub local_start: bool,
    /// Working directory (data sets are kept there and reused).
    pub workdir: PathBuf,
    /// Where the JSON results go (default: in `workdir`).
    pub json: Option<PathBuf>,
    /// How long one copy may take.
    pub timeout: Duration,
    /// ferry's coordinator `lease_ttl_secs`.
    pub lease_ttl_secs: u64,
    /// Write the copies to a fresh ext4 made for this invocation ([`freshfs`]), not to the
    /// working directory's file system.
    pub fresh_fs: bool,
    /// The fresh file system's kind: ext4 or xfs.
    pub fs: String,
}

/// The data set for `kind`, `size` and `seed` under `work`, generated on first use and reused
/// after; with its file and byte counts.
pub fn cached_dataset(
    work: &Path,
    kind: Kind,
    size: Size,
    seed: u64,
) -> anyhow::Result<(PathBuf, u64, u64)> {
    let src = work.join(format!(
        "src-{}-{}mib-{}files-seed{}",
        kind.name(),
        size.checkpoint_bytes >> 20,
        size.small_files,
        seed
    ));
    let done_marker = src.with_extension("done");
    if !done_marker.exists() {
        let _ = std::fs::remove_dir_all(&src);
        eprintln!(
            "generating {} data set in {} ...",
            kind.name(),
            src.display()
        );
        let t = Instant::now();
        let s = dataset::generate(kind, size, seed, &src)?;
        std::fs::write(&done_marker, format!("{} {}\n", s.files, s.bytes))?;
        eprintln!(
            "  {} files, {} bytes in {:.1} s",
            s.files,
            s.bytes,
            t.elapsed().as_secs_f64()
        );
    }
    let text = std::fs::read_to_string(&done_marker)?;
    let mut it = text
        .split_whitespace()
        .map(|x| x.parse::<u64>().unwrap_or(0));
    let (files, bytes) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    Ok((src, files, bytes))
}

/// On SIGINT or SIGTERM, stops every process in the bench's namespaces and deletes them (no
/// destructors run on such an exit).
fn clean_up_when_interrupted() {
    std::thread::spawn(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("signal runtime");
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        });
        eprintln!("interrupted: removing the emulated path and its processes");
        path::remove_all();
        std::process::exit(130);
    });
}

/// Runs the whole benchmark: builds the path, starts the daemons, times and checks every copy,
/// prints the Markdown table and writes the JSON.
pub fn run(opts: Options) -> anyhow::Result<Report> {
    if let Some(why) = path::unavailable() {
        bail!("the WAN emulator cannot run here: {why}. Run as root on Linux with iproute2.");
    }
    path::remove_stale();
    clean_up_when_interrupted();
    let mut tools = opts.tools.clone();
    let missing = peers::installed(&mut tools);
    for m in &missing {
        eprintln!("{m}");
    }

    let work = opts.workdir.clone();
    std::fs::create_dir_all(&work)?;
    let (src, files, bytes) = cached_dataset(&work, opts.kind, opts.size, opts.seed)?;
    let pki = work.join("pki");
    let _ = std::fs::remove_dir_all(&pki);
    Ca::init(&pki)?;
    let profile = opts.profile;
    let direct = profile.name == "lan" && profile.rate_bps.is_none() && !opts.lan_through_emulator;
    let wan = if direct {
        WanPath::direct(profile)
    } else {
        WanPath::create(profile, opts.seed)
    }
    .map_err(anyhow::Error::msg)?;
    let path_text = format!(
        "{}{}",
        profile.describe(),
        if direct {
            " (veth pair, no emulator)"
        } else {
            " (through the user-space emulator)"
        }
    );
    // Every tool writes into <work>/dst.
    let dst = work.join("dst");
    let fresh = if opts.fresh_fs {
        let size = (bytes.saturating_mul(3) + (4 << 30)).max(8 << 30);
        Some(freshfs::FreshFs::create(&work, &dst, size, &opts.fs).map_err(anyhow::Error::msg)?)
    } else {
        std::fs::create_dir_all(&dst)?;
        None
    };
    let path_text = format!(
        "{path_text}; copies written to {}",
        if fresh.is_some() {
            format!("a fresh {} (loop device, direct I/O)", opts.fs)
        } else {
            "the working directory's file system".into()
        }
    );
    eprintln!("path: {path_text}");
    let ctx = Ctx {
        wan,
        ssh_key: work.join("ssh/id"),
        src,
        work: work.clone(),
        pki,
        bytes,
        timeout: opts.timeout,
    };
    let mut daemons = Daemons(Vec::new());
    if tools.iter().any(|t| SSH_TOOLS.contains(&t.as_str())) {
        peers::start_sshd(&ctx, &mut daemons)?;
    }
    if tools.iter().any(|t| peers::S3_TOOLS.contains(&t.as_str())) {
        peers::start_s3(&ctx, &mut daemons)?;
    }
    let admin = if tools.iter().any(|t| t == "ferry" || t == "ferry-s3") {
        let s3 = tools.iter().any(|t| t == "ferry-s3");
        Some(ferry::start_ferry(
            &ctx,
            &mut daemons,
            opts.lease_ttl_secs,
            s3,
        )?)
    } else {
        None
    };
    if tools.iter().any(|t| t.starts_with("quic-raw")) {
        peers::start_quic_sink(&ctx, &mut daemons)?;
    }

    let mut all = Vec::new();
    for r in 0..opts.runs {
        for tool in &tools {
            let one = runs::one_run(&ctx, tool, r, admin.as_ref(), &daemons);
            eprintln!(
                "run {r} {tool:>8}: {} {:.2} s, {:.1} CPU s, {:.0} MiB{}{} {}",
                if one.ok { "ok    " } else { "FAILED" },
                one.wall_secs,
                one.cpu_secs,
                one.peak_rss_mib,
                if one.peak_agent_rss_mib > 0.0 {
                    format!(" (largest agent {:.0} MiB)", one.peak_agent_rss_mib)
                } else {
                    String::new()
                },
                if one.resent_segments > 0 {
                    format!(", {} segments resent", one.resent_segments)
                } else {
                    String::new()
                },
                one.error
            );
            all.push(one);
        }
    }
    let (incremental, cutover) = if opts.incremental {
        runs::run_incremental(
            &ctx,
            &tools,
            opts.kind,
            opts.seed,
            admin.as_ref(),
            opts.local_start,
        )?
    } else {
        Default::default()
    };
    let report = Report {
        profile,
        path_text,
        kind: opts.kind,
        size: opts.size_text.clone(),
        files,
        bytes,
        tools,
        runs_per_tool: opts.runs,
        runs: all,
        missing,
        incremental,
        cutover,
        machine: Machine::measure(&dst)?,
    };
    print!("{}", report.markdown());
    let out = opts.json.clone().unwrap_or_else(|| {
        work.join(format!(
            "results-{}-{}.json",
            profile.name,
            opts.kind.name()
        ))
    });
    std::fs::write(&out, serde_json::to_vec_pretty(&report.json())?)?;
    eprintln!("results written to {}", out.display());
    drop(daemons);
    drop(fresh);
    Ok(report)
}
