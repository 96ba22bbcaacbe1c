//! Scale (issue 17): one migration of a synthetic tree of millions of tiny files, with what each
//! of ferry's processes costs while it runs. Run as root (it mounts a file system) from a
//! release build:
//!
//! ```sh
//! cargo build --release -p ferry-integration-tests --bins
//! target/release/scale-bench --files 10000000
//! ```
//!
//! Both trees live on a fresh ext4 made for the run on a sparse image (`FreshFs`; room for
//! twice the files in inodes, tiny files inline in them), since ten million files on each side
//! would take more inodes than most root file systems have free. The tree: `--per-dir` files
//! per directory, two levels of directories; three files in four are empty, most others hold
//! 1–64 bytes, one in 64 up to 4 KiB (sizes and contents derive from the file's number, so
//! every run makes the same tree). The page cache is dropped after generating it, so the scan
//! reads a cold tree, as a migration's first does.
//!
//! A coordinator and two agents run as processes (`it-coordinator`, `it-agent`) on 127.0.0.1;
//! their state directories sit on the root file system. While the migration runs the bench
//! polls its status once a second and checks that progress is honest (verified counts never
//! fall and never pass the totals; at the end every file is verified and the totals are the
//! tree's), and samples each process's resident memory; at the end it reads each one's peak
//! (`VmHWM`) and CPU time, and the size of each state directory. Then it compares the copy with
//! the source by itself (names, types, sizes and the bytes of every file), unless `--no-check`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use ferry_common::pki::{Ca, Identity};
use ferry_common::tls::TlsMaterial;
use ferry_integration_tests::bench::daemon;
use ferry_integration_tests::bench::freshfs::FreshFs;
use ferry_integration_tests::bench::peers::sibling;
use ferry_proto::admin as pb;

#[derive(Parser)]
#[command(about = "ferry migrating a synthetic tree of millions of tiny files, with its costs")]
struct Args {
    /// Files in the tree.
    #[arg(long, default_value_t = 10_000_000)]
    files: u64,
    /// Files per directory.
    #[arg(long, default_value_t = 1000)]
    per_dir: u64,
    /// Working directory (wiped); the trees' file system is mounted at `<workdir>/fs`.
    #[arg(long, default_value = "/var/tmp/ferry-scale")]
    workdir: PathBuf,
    /// Size of the sparse image holding both trees, in GiB (only what is written takes space).
    #[arg(long, default_value_t = 96)]
    image_gib: u64,
    /// Do not compare the copy with the source afterwards.
    #[arg(long)]
    no_check: bool,
    /// Keep the page cache after generating the tree (a warm scan).
    #[arg(long)]
    warm: bool,
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// File `i`'s contents: empty for 48 in 64, 1–64 bytes for 15, 65–4096 bytes for one.
fn contents(i: u64) -> Vec<u8> {
    let h = splitmix(i);
    let len = match h % 64 {
        0..=47 => 0,
        48..=62 => 1 + (h >> 8) % 64,
        _ => 65 + (h >> 8) % 4032,
    } as usize;
    let mut v = Vec::with_capacity(len);
    let mut k = 0u64;
    while v.len() < len {
        v.extend_from_slice(&splitmix(h ^ k).to_le_bytes());
        k += 1;
    }
    v.truncate(len);
    v
}

/// File `i`'s directory, relative to the root.
fn dir_of(i: u64, per_dir: u64) -> PathBuf {
    let d = i / per_dir;
    PathBuf::from(format!("t{:03}/d{:02}", d / 100, d % 100))
}

/// Runs `work(t, threads)` on one thread per core, `t` = 0, 1, …; the first error, if any.
fn on_every_core<F>(work: F) -> anyhow::Result<()>
where
    F: Fn(usize, usize) -> anyhow::Result<()> + Sync,
{
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let work = &work;
                s.spawn(move || work(t, threads))
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("a worker thread panicked"))
    })
}

/// Writes the tree below `root`, one directory at a time, on every core.
fn generate(root: &Path, files: u64, per_dir: u64) -> anyhow::Result<u64> {
    let dirs = files.div_ceil(per_dir);
    let bytes = AtomicU64::new(0);
    let made = AtomicU64::new(0);
    let started = Instant::now();
    on_every_core(|t, threads| {
        for d in (t as u64..dirs).step_by(threads) {
            let first = d * per_dir;
            let dir = root.join(dir_of(first, per_dir));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for i in first..(first + per_dir).min(files) {
                let data = contents(i);
                let p = dir.join(format!("f{i:08}"));
                std::fs::write(&p, &data).with_context(|| format!("writing {}", p.display()))?;
                bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            let n = made.fetch_add(per_dir, Ordering::Relaxed) + per_dir;
            if n % 1_000_000 < per_dir {
                eprintln!(
                    "generated {n} files in {:.0} s",
                    started.elapsed().as_secs_f64()
                );
            }
        }
        Ok(())
    })?;
    Ok(bytes.into_inner())
}

/// Names in `dir`, sorted.
fn names(dir: &Path) -> anyhow::Result<Vec<OsString>> {
    let mut v = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    v.sort();
    Ok(v)
}

fn hash_file(p: &Path) -> anyhow::Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?)
        .with_context(|| format!("reading {}", p.display()))?;
    Ok(h.finalize())
}

/// Compares the tree at `copy` with the one at `src`: the same names, types, sizes, link
/// targets and file contents; counts the files into `files`.
fn compare(src: &Path, copy: &Path, files: &AtomicU64) -> anyhow::Result<()> {
    let (a, b) = (names(src)?, names(copy)?);
    if a != b {
        let missing: Vec<_> = a.iter().filter(|n| !b.contains(n)).take(5).collect();
        let extra: Vec<_> = b.iter().filter(|n| !a.contains(n)).take(5).collect();
        bail!(
            "{} differs from {}: missing {missing:?}, extra {extra:?}",
            copy.display(),
            src.display()
        );
    }
    for n in &a {
        let (s, c) = (src.join(n), copy.join(n));
        let (ms, mc) = (
            std::fs::symlink_metadata(&s)?,
            std::fs::symlink_metadata(&c)?,
        );
        if ms.file_type() != mc.file_type() {
            bail!("{} is not of the type of {}", c.display(), s.display());
        }
        if ms.is_dir() {
            compare(&s, &c, files)?;
        } else if ms.file_type().is_symlink() {
            if std::fs::read_link(&s)? != std::fs::read_link(&c)? {
                bail!("{} points elsewhere than {}", c.display(), s.display());
            }
            files.fetch_add(1, Ordering::Relaxed);
        } else {
            if ms.len() != mc.len() || (ms.len() > 0 && hash_file(&s)? != hash_file(&c)?) {
                bail!("{} differs from {}", c.display(), s.display());
            }
            files.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// [`compare`] with the top-level directories shared out over every core.
fn compare_tree(src: &Path, copy: &Path) -> anyhow::Result<u64> {
    let top = names(src)?;
    if top != names(copy)? {
        bail!("the copy's top level differs from the source's");
    }
    let files = AtomicU64::new(0);
    on_every_core(|t, threads| {
        for n in top.iter().skip(t).step_by(threads) {
            let (a, b) = (src.join(n), copy.join(n));
            if !std::fs::symlink_metadata(&a)?.is_dir() {
                bail!("{} is not a directory", a.display());
            }
            compare(&a, &b, &files)?;
        }
        Ok(())
    })?;
    Ok(files.into_inner())
}

/// The daemons, killed when dropped.
struct Daemons {
    procs: Vec<(&'static str, Child)>,
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for (_, p) in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

impl Daemons {
    fn pid(&self, who: &str) -> u32 {
        self.procs
            .iter()
            .find(|(n, _)| *n == who)
            .map_or(0, |(_, c)| c.id())
    }

    /// Fails if a daemon has exited.
    fn check_alive(&mut self, work: &Path) -> anyhow::Result<()> {
        for (n, c) in &mut self.procs {
            if let Some(status) = c.try_wait()? {
                bail!(
                    "{n} exited ({status}) during the run: see {}",
                    work.join(format!("{n}.log")).display()
                );
            }
        }
        Ok(())
    }
}

/// Starts a coordinator, a source agent and a target agent writing below `dst_root`.
fn start(work: &Path, dst_root: &Path) -> anyhow::Result<(Daemons, String, TlsMaterial)> {
    let pki = work.join("pki");
    let ca = Ca::init(&pki)?;
    let coord_bin = sibling("it-coordinator")?;
    let agent_bin = sibling("it-agent")?;
    let mut d = Daemons { procs: Vec::new() };
    let (child, coord) = daemon::start_coordinator(&coord_bin, work, &ca, &pki)?;
    d.procs.push(("coordinator", child));
    for (name, extra) in [
        (
            "dst",
            format!(
                "data_listen = \"127.0.0.1:0\"\nroot = \"{}\"\n",
                dst_root.display()
            ),
        ),
        ("src", String::new()),
    ] {
        let cfg = work.join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "name = \"{name}\"\ncoordinator = \"{coord}\"\nstate_dir = \"{}\"\n{extra}{}",
                work.join(format!("{name}-state")).display(),
                daemon::tls_toml(&ca, &pki, Identity::Agent(name.into()))?
            ),
        )?;
        let child = daemon::spawn(&agent_bin, &cfg, &work.join(format!("{name}.log")), "warn")?;
        d.procs.push((name, child));
    }
    let admin = TlsMaterial::load(&ca.issue_if_missing(&Identity::Admin("bench".into()), &pki)?)?;
    Ok((d, coord, admin))
}

/// What the status said, checked against what it said before.
#[derive(Default)]
struct Honesty {
    files: u64,
    bytes: u64,
    segments: u64,
    /// The totals once the scan was complete.
    totals: Option<(u64, u64, u64)>,
}

impl Honesty {
    fn check(&mut self, p: &pb::MigrationProgress) -> anyhow::Result<()> {
        let now = (p.files_verified, p.bytes_verified, p.segments_verified);
        if now.0 < self.files || now.1 < self.bytes || now.2 < self.segments {
            bail!(
                "progress went back: verified (files, bytes, segments) {:?} after {:?}",
                now,
                (self.files, self.bytes, self.segments)
            );
        }
        if now.0 > p.files_total || now.1 > p.bytes_total || now.2 > p.segments_total {
            bail!(
                "more verified than there is: {now:?} of {:?}",
                (p.files_total, p.bytes_total, p.segments_total)
            );
        }
        let totals = (p.files_total, p.bytes_total, p.segments_total);
        if let Some(t) = self.totals {
            if t != totals {
                bail!("the totals changed after the scan completed: {totals:?} after {t:?}");
            }
        } else if p.scan_complete {
            self.totals = Some(totals);
        }
        (self.files, self.bytes, self.segments) = now;
        Ok(())
    }
}

/// One process's costs.
#[derive(Default, Clone, Copy)]
struct Cost {
    peak_mib: f64,
    cpu_s: f64,
}

struct Outcome {
    seconds: f64,
    scan_done: f64,
    first_verified: f64,
    segments: u64,
    files: u64,
    bytes: u64,
    costs: Vec<(&'static str, Cost)>,
    /// Resident memory sampled once a second, per process: (seconds, MiB) at each tenth of
    /// the files verified.
    curve: Vec<(u64, f64, Vec<f64>)>,
}

async fn migrate(
    d: &mut Daemons,
    work: &Path,
    coord: &str,
    admin: &TlsMaterial,
    src: &Path,
    expect_files: u64,
    expect_bytes: u64,
) -> anyhow::Result<Outcome> {
    let t = Instant::now();
    let ctl = loop {
        if let Ok(ctl) = ferryctl::ctl::Ctl::connect(coord, admin).await {
            if ctl.agents().await.is_ok_and(|a| a.len() >= 2) {
                break ctl;
            }
        }
        d.check_alive(work)?;
        if t.elapsed() > Duration::from_secs(60) {
            bail!(
                "the agents did not register within 60 s (logs in {})",
                work.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let spec = pb::MigrationSpec {
        source_agent: "src".into(),
        source_path: src.display().to_string(),
        target_agent: "dst".into(),
        target_path: "copy".into(),
        ..Default::default()
    };
    let t = Instant::now();
    let id = ctl.create(spec).await?;
    let names = ["coordinator", "src", "dst"];
    let pids: Vec<u32> = names.iter().map(|n| d.pid(n)).collect();
    let mut honest = Honesty::default();
    let (mut scan_done, mut first_verified) = (None, None);
    let mut curve = Vec::new();
    let mut last_print = Instant::now();
    loop {
        d.check_alive(work)?;
        let p = ctl.status(id).await?;
        honest.check(&p)?;
        let secs = t.elapsed().as_secs_f64();
        if scan_done.is_none() && p.scan_complete {
            scan_done = Some(secs);
        }
        if first_verified.is_none() && p.files_verified > 0 {
            first_verified = Some(secs);
        }
        let rss: Vec<f64> = pids
            .iter()
            .map(|&pid| daemon::status_mib(pid, "VmRSS:"))
            .collect();
        let tenth = p.files_verified * 10 / expect_files.max(1);
        if curve.last().is_none_or(|(x, _, _)| *x < tenth) {
            curve.push((tenth, secs, rss.clone()));
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            last_print = Instant::now();
            eprintln!(
                "{secs:6.0} s: {} of {} files verified ({:.0} files/s), scan {}, RSS MiB: coordinator {:.0}, src {:.0}, dst {:.0}",
                p.files_verified,
                p.files_total,
                p.files_verified as f64 / secs,
                if p.scan_complete { "complete" } else { "running" },
                rss[0],
                rss[1],
                rss[2]
            );
        }
        match p.phase() {
            pb::Phase::Done => {
                if p.files_verified != expect_files
                    || p.files_total != expect_files
                    || p.bytes_verified != expect_bytes
                {
                    bail!(
                        "done with {} of {} files and {} bytes verified; the tree has {expect_files} files of {expect_bytes} bytes",
                        p.files_verified,
                        p.files_total,
                        p.bytes_verified
                    );
                }
                if p.segments_verified != p.segments_total || p.segments_failed > 0 {
                    bail!(
                        "done with {} of {} segments verified, {} failed",
                        p.segments_verified,
                        p.segments_total,
                        p.segments_failed
                    );
                }
                let costs = names
                    .iter()
                    .zip(&pids)
                    .map(|(n, &pid)| {
                        (
                            *n,
                            Cost {
                                peak_mib: daemon::status_mib(pid, "VmHWM:"),
                                cpu_s: daemon::cpu_secs(pid),
                            },
                        )
                    })
                    .collect();
                return Ok(Outcome {
                    seconds: secs,
                    scan_done: scan_done.unwrap_or(secs),
                    first_verified: first_verified.unwrap_or(secs),
                    segments: p.segments_total,
                    files: p.files_verified,
                    bytes: p.bytes_verified,
                    costs,
                    curve,
                });
            }
            pb::Phase::Failed => bail!("the migration failed: {}", p.last_error),
            _ => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.files == 0 || args.per_dir == 0 {
        bail!("--files and --per-dir must be positive");
    }
    let work = &args.workdir;
    let fs_dir = work.join("fs");
    let _ = std::process::Command::new("umount").arg(&fs_dir).output();
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work)?;
    let dirs = args.files.div_ceil(args.per_dir);
    // Both trees' files and directories, the target's temporaries, and a margin.
    let inodes = 2 * (args.files + dirs + dirs / 100) + 100_000;
    let _fs = FreshFs::create_with(work, &fs_dir, args.image_gib << 30, "ext4", Some(inodes))
        .map_err(|e| anyhow::anyhow!("{e} (scale-bench mounts a file system: run it as root)"))?;
    let src = fs_dir.join("src");
    let dst_root = fs_dir.join("dst");
    std::fs::create_dir_all(&dst_root)?;
    let t = Instant::now();
    let bytes = generate(&src, args.files, args.per_dir)?;
    let generated = t.elapsed().as_secs_f64();
    eprintln!(
        "generated {} files ({bytes} bytes) in {dirs} directories in {generated:.0} s",
        args.files
    );
    if !args.warm {
        std::process::Command::new("sync").status()?;
        std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache")?;
    }
    let (mut d, coord, admin) = start(work, &dst_root)?;
    let rt = tokio::runtime::Runtime::new()?;
    let out = rt.block_on(migrate(
        &mut d, work, &coord, &admin, &src, args.files, bytes,
    ))?;
    let state: Vec<(&str, u64)> = [
        ("coordinator", work.join("coordinator")),
        ("src", work.join("src-state")),
        ("dst", work.join("dst-state")),
    ]
    .iter()
    .map(|(n, p)| (*n, daemon::du_bytes(p)))
    .collect();
    drop(d);
    let checked = if args.no_check {
        None
    } else {
        let t = Instant::now();
        let n = compare_tree(&src, &dst_root.join("copy"))?;
        if n != args.files {
            bail!("the copy holds {n} files, the source {}", args.files);
        }
        Some(t.elapsed().as_secs_f64())
    };
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "\n{} files ({:.1} MiB) in {dirs} directories, {} per directory; {} segments; {} scan\n",
        out.files,
        mib(out.bytes),
        args.per_dir,
        out.segments,
        if args.warm { "warm" } else { "cold-cache" },
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| migration (create → last file verified) | {:.1} s = **{:.0} files/s** |",
        out.seconds,
        out.files as f64 / out.seconds
    );
    println!(
        "| scan complete at | {:.1} s (first file verified at {:.1} s) |",
        out.scan_done, out.first_verified
    );
    for (n, c) in &out.costs {
        let on_disk = state.iter().find(|(m, _)| m == n).map_or(0, |x| x.1);
        println!(
            "| {n} | peak RSS **{:.0} MiB**, CPU {:.0} s, state on disk {:.1} MiB |",
            c.peak_mib,
            c.cpu_s,
            mib(on_disk)
        );
    }
    println!(
        "| resident memory (MiB: coordinator / src / dst) by files verified | {} |",
        out.curve
            .iter()
            .map(|(tenth, s, r)| format!(
                "{} % at {s:.0} s: {:.0} / {:.0} / {:.0}",
                tenth * 10,
                r[0],
                r[1],
                r[2]
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    println!("| generating the tree | {generated:.0} s |");
    match checked {
        Some(s) => println!(
            "| independent comparison of the copy (names, types, sizes, bytes) | equal, {s:.0} s |"
        ),
        None => println!("| independent comparison | skipped (--no-check) |"),
    }
    Ok(())
}
