//! One timed, checked copy by one tool, and the incremental scenario.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::bail;
use ferry_common::tls::TlsMaterial;

use super::dataset::{self, Kind};
use super::ferry::{ferry_copy, ferry_copy_s3};
use super::measure::{machine_cpu_secs, own_cpu_secs, RssSampler};
use super::peers::{run_logged, Ctx, Daemons, QUIC_SINK_PORT, S3_BUCKET, SSH_PORT};
use crate::tree::{self, Fidelity};

/// One timed copy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Run {
    /// The tool.
    pub tool: String,
    /// Which run of it.
    pub run: usize,
    /// Whether it finished and its copy equals the source.
    pub ok: bool,
    /// Why not.
    pub error: String,
    /// Wall-clock seconds.
    pub wall_secs: f64,
    /// CPU seconds of the whole machine, less this harness's own.
    pub cpu_secs: f64,
    /// Peak resident memory of the tool's processes.
    pub peak_rss_mib: f64,
    /// ferry only: peak resident memory of its largest agent process.
    pub peak_agent_rss_mib: f64,
    /// ferry only: leases granted beyond one per segment (segments sent again).
    pub resent_segments: u64,
}

/// Times one copy by `tool` into a fresh destination and checks it.
pub fn one_run(
    ctx: &Ctx,
    tool: &str,
    run: usize,
    admin: Option<&TlsMaterial>,
    daemons: &Daemons,
) -> Run {
    let name = format!("{tool}-{run}");
    let dst_root = ctx.work.join("dst");
    let dst = dst_root.join(&name);
    let _ = std::fs::remove_dir_all(&dst);
    let _ = std::fs::create_dir_all(&dst_root);
    let log = ctx.work.join(format!("{name}.log"));
    let remote = |p: &Path| format!("root@{}:{}", ctx.wan.addr_b, p.display());
    let sampler = RssSampler::start(&[&ctx.wan.ns_a, &ctx.wan.ns_b], daemons.others(tool));
    let (cpu0, own0) = (machine_cpu_secs(), own_cpu_secs());
    let t = Instant::now();
    let mut resent_segments = 0;
    let result: Result<(PathBuf, Fidelity), String> = match tool {
        "rsync" | "rsync-fsync" => run_logged(
            ctx.rsync(&ctx.src, &dst, tool == "rsync-fsync"),
            &log,
            ctx.timeout,
        )
        .map(|_| (dst.clone(), Fidelity::Full)),
        "scp" => {
            // scp -r follows symlinks and keeps no empty-file distinctions: contents only.
            let mut c = ctx.in_a("scp");
            c.args(["-r", "-p", "-q", "-P", &SSH_PORT.to_string()])
                .args(ctx.ssh_opts())
                .arg(&ctx.src)
                .arg(remote(&dst));
            run_logged(c, &log, ctx.timeout).map(|_| (dst.clone(), Fidelity::Contents))
        }
        "rclone" => run_logged(ctx.rclone(&ctx.src, &dst), &log, ctx.timeout)
            .map(|_| (dst.clone(), Fidelity::Contents)),
        // Into the S3 server: ferry through its target agent beside the server (over QUIC
        // across the path), rclone straight to the server (HTTP across the path).
        "ferry-s3" => match admin {
            Some(a) => ferry_copy_s3(ctx, a, &name).map(|resent| {
                resent_segments = resent;
                (PathBuf::from(format!("ferry/{name}")), Fidelity::Contents)
            }),
            None => Err("ferry daemons did not start".into()),
        },
        "rclone-s3" => {
            let prefix = format!("rclone/{name}");
            run_logged(ctx.rclone_s3(&ctx.src, &prefix), &log, ctx.timeout)
                .map(|_| (PathBuf::from(prefix), Fidelity::Contents))
        }
        "ferry" => match admin {
            Some(a) => ferry_copy(ctx, a, &name).map(|(p, resent)| {
                resent_segments = resent;
                (p, Fidelity::Full)
            }),
            None => Err("ferry daemons did not start".into()),
        },
        "quic-raw" | "quic-raw-bbr" => {
            let mut c = ctx.in_a(&std::env::current_exe().unwrap().display().to_string());
            if tool == "quic-raw-bbr" {
                c.args(["quic-blast", "--cc", "bbr"]);
            } else {
                c.arg("quic-blast");
            }
            c.arg("--connect")
                .arg(format!("{}:{QUIC_SINK_PORT}", ctx.wan.addr_b))
                .arg("--pki")
                .arg(&ctx.pki)
                .args(["--bytes", &ctx.bytes.to_string()]);
            // Bytes only: nothing to check on disk.
            run_logged(c, &log, ctx.timeout).map(|_| (PathBuf::new(), Fidelity::Contents))
        }
        other => Err(format!("unknown tool {other}")),
    };
    let wall = t.elapsed().as_secs_f64();
    let cpu = (machine_cpu_secs() - cpu0) - (own_cpu_secs() - own0);
    let peak = sampler.finish();
    let checked = result.and_then(|(copy, fidelity)| {
        if tool.starts_with("quic-raw") {
            return Ok(copy);
        }
        if tool.ends_with("-s3") {
            return s3_compare(ctx, &copy.display().to_string()).map(|_| copy);
        }
        tree::compare(&ctx.src, &copy, fidelity)
            .map(|_| copy)
            .map_err(|e| format!("copy differs from the source: {e}"))
    });
    let (ok, error) = match &checked {
        Ok(copy) => {
            let _ = std::fs::remove_dir_all(copy);
            (true, String::new())
        }
        Err(e) => (false, e.clone()),
    };
    if tool.ends_with("-s3") {
        // The server keeps objects in memory: each copy goes once checked.
        let prefix = if tool == "ferry-s3" {
            "ferry"
        } else {
            "rclone"
        };
        let _ = ctx.s3_tool(&["delete", S3_BUCKET, &format!("{prefix}/{name}")]);
    }
    let _ = std::fs::remove_dir_all(&dst);
    Run {
        tool: tool.into(),
        run,
        ok,
        error,
        wall_secs: wall,
        cpu_secs: cpu.max(0.0),
        peak_rss_mib: peak.all_mib,
        peak_agent_rss_mib: peak.agent_mib,
        resent_segments,
    }
}

/// What the incremental scenario measured: (tool, change, no-change) as printable cells, and
/// ferry's cutover as (what, figure) rows.
pub type Incremental = (Vec<(String, String, String)>, Vec<(String, String)>);

/// The incremental scenario: a full copy per tool into a kept destination (for rsync and
/// rclone made locally with `cp -a` when `local_start`), then 1 % of the data changed, a timed
/// re-sync, and a timed re-run with nothing changed; for ferry, then a full verification,
/// another 1 % changed, and a cutover.
pub fn run_incremental(
    ctx: &Ctx,
    tools: &[String],
    kind: Kind,
    seed: u64,
    admin: Option<&TlsMaterial>,
    local_start: bool,
) -> anyhow::Result<Incremental> {
    // The source is changed in a copy, so the cached data set stays as generated.
    let src = ctx.work.join("incremental-src");
    fresh_copy(&ctx.src, &src)?;
    let mut out = Vec::new();
    let mut cutover = Vec::new();
    for tool in tools {
        if tool == "ferry" {
            let Some(admin) = admin else {
                out.push((
                    tool.clone(),
                    "FAILED: ferry daemons did not start".into(),
                    String::new(),
                ));
                continue;
            };
            let (row, c) = ferry_incremental(ctx, admin, &src, kind, seed);
            out.push(row);
            cutover = c;
            fresh_copy(&ctx.src, &src)?;
            continue;
        }
        if tool != "rsync" && tool != "rclone" {
            continue;
        }
        let dst = ctx.work.join(format!("dst/incremental-{tool}"));
        let _ = std::fs::remove_dir_all(&dst);
        std::fs::create_dir_all(dst.parent().unwrap_or(Path::new("/")))?;
        let sync = |log: &str| -> Result<f64, String> {
            let c = if tool == "rsync" {
                ctx.rsync(&src, &dst, false)
            } else {
                ctx.rclone(&src, &dst)
            };
            let t = Instant::now();
            run_logged(c, &ctx.work.join(log), ctx.timeout)?;
            Ok(t.elapsed().as_secs_f64())
        };
        let cell = |r: Result<f64, String>| match r {
            Ok(s) => format!("{s:.2}"),
            Err(e) => format!("FAILED: {e}"),
        };
        // Full copy, then change, then re-sync, then re-run.
        let start = match local_start {
            true => fresh_copy(&src, &dst).map_err(|e| e.to_string()),
            false => sync(&format!("incremental-{tool}-full.log")).map(|_| ()),
        };
        if let Err(e) = start {
            out.push((tool.clone(), format!("FAILED: {e}"), String::new()));
            continue;
        }
        // Same bytes changed for every tool: mutate a fresh copy each time.
        fresh_copy(&ctx.src, &src)?;
        let changed = dataset::mutate(kind, &src, seed)?;
        eprintln!("{tool}: {changed} bytes changed");
        let change = sync(&format!("incremental-{tool}-change.log"));
        let fidelity = if tool == "rsync" {
            Fidelity::Full
        } else {
            Fidelity::Contents
        };
        let change = change.and_then(|s| {
            tree::compare(&src, &dst, fidelity)
                .map(|_| s)
                .map_err(|e| format!("copy differs after re-sync: {e}"))
        });
        let none = sync(&format!("incremental-{tool}-nochange.log"));
        out.push((tool.clone(), cell(change), cell(none)));
        let _ = std::fs::remove_dir_all(&dst);
        fresh_copy(&ctx.src, &src)?;
    }
    let _ = std::fs::remove_dir_all(&src);
    Ok((out, cutover))
}

/// ferry's incremental scenario: a migration (round 0) of `src`, the 1 % change made in place
/// (a fresh copy would give every file a new inode and ctime, which ferry rightly takes for a
/// change), a timed sync round, the copy checked, then a timed round with nothing changed. Then
/// the cutover as an operator runs it: a full verification while the source is live, another
/// 1 % changed, and a cutover (final round, full verification, switch) whose freeze window is
/// measured; the copy checked again.
fn ferry_incremental(
    ctx: &Ctx,
    admin: &TlsMaterial,
    src: &Path,
    kind: Kind,
    seed: u64,
) -> ((String, String, String), Vec<(String, String)>) {
    let tool = "ferry".to_string();
    let failed = |e: String| {
        (
            (tool.clone(), format!("FAILED: {e}"), String::new()),
            Vec::new(),
        )
    };
    let name = "incremental-ferry";
    let _ = std::fs::remove_dir_all(ctx.work.join("dst").join(name));
    let (dst, _, id) = match super::ferry::ferry_copy_from(ctx, admin, src, name) {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    match dataset::mutate(kind, src, seed) {
        Ok(changed) => eprintln!("ferry: {changed} bytes changed"),
        Err(e) => return failed(e.to_string()),
    }
    let change = super::ferry::ferry_sync(ctx, admin, id).and_then(|s| {
        tree::compare(src, &dst, Fidelity::Full)
            .map(|_| s)
            .map_err(|e| format!("copy differs after the sync round: {e}"))
    });
    let none = super::ferry::ferry_sync(ctx, admin, id);
    let cell = |r: Result<f64, String>| match r {
        Ok(s) => format!("{s:.2}"),
        Err(e) => format!("FAILED: {e}"),
    };
    let row = (tool, cell(change), cell(none));
    let cutover = ferry_cutover_rows(ctx, admin, src, &dst, id, kind, seed);
    let _ = std::fs::remove_dir_all(&dst);
    (row, cutover)
}

/// The cutover part of [`ferry_incremental`], as (what, figure) rows.
fn ferry_cutover_rows(
    ctx: &Ctx,
    admin: &TlsMaterial,
    src: &Path,
    dst: &Path,
    id: u64,
    kind: Kind,
    seed: u64,
) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    let mut row = |what: &str, v: String| rows.push((what.to_string(), v));
    match super::ferry::ferry_verify_full(ctx, admin, id) {
        Ok(s) => row(
            "full verification before the cutover (source live), s",
            format!("{s:.2}"),
        ),
        Err(e) => {
            row(
                "full verification before the cutover",
                format!("FAILED: {e}"),
            );
            return rows;
        }
    }
    match dataset::mutate(kind, src, seed ^ 0x5eed) {
        Ok(changed) => {
            eprintln!("ferry: {changed} bytes changed before the cutover");
            row("changed before the cutover", super::report::mib(changed));
        }
        Err(e) => {
            row("changed before the cutover", format!("FAILED: {e}"));
            return rows;
        }
    }
    match super::ferry::ferry_cutover(ctx, admin, id) {
        Ok(c) => {
            let checked = tree::compare(src, dst, Fidelity::Full);
            row("cutover, request to switch, s", format!("{:.2}", c.total_s));
            row(
                "writes frozen (end of pre_freeze to end of switch), s",
                format!("{:.2}", c.freeze_s),
            );
            row(
                "of which the final round, s",
                format!("{:.2}", c.final_round_s),
            );
            let ((sf, sb), (tf, tb)) = c.read;
            row(
                "read for the verification while frozen: source / target",
                format!(
                    "{sf} files, {} / {tf} files, {}",
                    super::report::mib(sb),
                    super::report::mib(tb)
                ),
            );
            row(
                "copy equal to the frozen source (independent check)",
                match checked {
                    Ok(()) => "yes".into(),
                    Err(e) => format!("NO: {e}"),
                },
            );
        }
        Err(e) => row("cutover", format!("FAILED: {e}")),
    }
    rows
}

/// Replaces `to` with a `cp -a` of `from`.
fn fresh_copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(to);
    if !Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()?
        .success()
    {
        bail!("cp -a {} {} failed", from.display(), to.display());
    }
    Ok(())
}

/// Checks, through an S3 client independent of ferry (boto3, run beside the server), that every
/// regular file of the source is below `prefix/` of the bucket with its size and SHA-256.
fn s3_compare(ctx: &Ctx, prefix: &str) -> Result<(), String> {
    #[derive(serde::Deserialize)]
    struct Object {
        size: u64,
        sha256: String,
    }
    let listed = ctx.s3_tool(&["list", S3_BUCKET, &format!("{prefix}/")])?;
    let held: std::collections::HashMap<String, Object> =
        serde_json::from_slice(&listed).map_err(|e| e.to_string())?;
    let mut dirs = vec![ctx.src.clone()];
    let mut files = 0;
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| e.to_string())? {
            let e = e.map_err(|e| e.to_string())?;
            let t = e.file_type().map_err(|e| e.to_string())?;
            if t.is_dir() {
                dirs.push(e.path());
                continue;
            }
            if !t.is_file() {
                continue;
            }
            let rel = e
                .path()
                .strip_prefix(&ctx.src)
                .map_err(|e| e.to_string())?
                .display()
                .to_string();
            let key = format!("{prefix}/{rel}");
            let Some(o) = held.get(&key) else {
                return Err(format!("{key} is not in the bucket"));
            };
            let data = std::fs::read(e.path()).map_err(|e| e.to_string())?;
            let sha = ferry_common::hash::hex(
                ring::digest::digest(&ring::digest::SHA256, &data).as_ref(),
            );
            if o.size != data.len() as u64 || o.sha256 != sha {
                return Err(format!("{key} differs from the source"));
            }
            files += 1;
        }
    }
    if files == 0 {
        return Err("no file was checked".into());
    }
    Ok(())
}
