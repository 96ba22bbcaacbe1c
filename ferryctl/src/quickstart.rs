//! `ferryctl quickstart`: a real migration on one machine. It creates a CA, starts a single-node
//! coordinator and a source and a target agent on 127.0.0.1 (in this process, over real sockets
//! with mutual TLS), migrates a directory (or a generated sample), watches it and reports.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_agent::run::AgentConfig;
use ferry_agent::stats::Stats;
use ferry_common::config::TlsPaths;
use ferry_common::pki::{Ca, Identity};
use ferry_common::tls::TlsMaterial;
use ferry_proto::admin as pb;
use serde::Serialize;

use crate::ctl::{human_bytes, progress_line, Ctl};
use ferry_coordinator::node::CoordinatorConfig;

/// What to migrate and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory to migrate; `None` generates a sample.
    pub source: Option<PathBuf>,
    /// Where to write; `None` uses `<workdir>/target`. Must be empty or absent.
    pub target: Option<PathBuf>,
    /// Where the CA, coordinator state and agent state live; `None` uses a temporary directory
    /// that is removed afterwards.
    pub workdir: Option<PathBuf>,
    /// Segment size in bytes.
    pub segment_size: u64,
    /// Carry extended attributes.
    pub xattrs: bool,
    /// Sample: size of each large file.
    pub sample_big_file_bytes: u64,
    /// Sample: number of small files.
    pub sample_small_files: u32,
    /// Print progress lines.
    pub progress: bool,
    /// Write into this object store instead of a directory (then `target` must be `None`).
    pub target_store: Option<ferry_agent::sink::object::StoreConfig>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            source: None,
            target: None,
            workdir: None,
            segment_size: ferry_common::DEFAULT_SEGMENT_SIZE,
            xattrs: false,
            sample_big_file_bytes: 128 * 1024 * 1024,
            sample_small_files: 3000,
            progress: true,
            target_store: None,
        }
    }
}

/// What the quick start did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The migrated directory.
    pub source: PathBuf,
    /// Where it was written.
    pub target: PathBuf,
    /// Migration id.
    pub migration_id: u64,
    /// Files (and symlinks) copied.
    pub files: u64,
    /// File bytes copied.
    pub bytes: u64,
    /// Segments.
    pub segments: u64,
    /// Seconds from the migration's creation to its last verified segment, by the coordinator's
    /// clock (scan included).
    pub seconds: f64,
    /// Throughput over that time, in MB/s (10^6 bytes) of data: holes of sparse files, which
    /// are not sent, do not count.
    pub mb_per_sec: f64,
    /// Every segment verified with matching source and target BLAKE3.
    pub all_verified: bool,
    /// Verified segments whose recorded hashes differ (must be 0).
    pub hash_mismatches: u64,
    /// Bytes the source sent, including resends.
    pub bytes_sent: u64,
    /// The source's congestion controller, as it registered it with the coordinator.
    pub congestion: String,
    /// The bytes one of its connections may have in flight (its window), as registered.
    pub window_bytes: u64,
    /// The largest congestion window seen on its data connection: the most bytes its
    /// congestion controller let be in flight (sampled as each segment's last byte was sent).
    pub peak_in_flight: u64,
    /// Bytes in holes of sparse files, which were not sent (counted per attempt, like
    /// `bytes_sent`).
    pub hole_bytes: u64,
    /// Paths that could not be copied.
    pub issues: Vec<(String, String)>,
    /// Number of such paths.
    pub issues_total: u64,
    /// Names kept as hardlinks (linked at the target, content sent once).
    pub hardlinks: u64,
    /// How the copy differs from the source though nothing is lost (owners not applied, ...).
    pub notes: Vec<String>,
    /// Segments given up on after their last allowed attempt.
    pub failed_segments: u64,
    /// The first failed segments' last errors (each names its file and the cause).
    pub failed: Vec<String>,
}

impl Report {
    /// The quick start succeeded: everything verified and nothing left behind.
    pub fn ok(&self) -> bool {
        self.all_verified
            && self.hash_mismatches == 0
            && self.issues_total == 0
            && self.failed_segments == 0
    }

    /// Human-readable report.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("source      {}\n", self.source.display()));
        s.push_str(&format!("target      {}\n", self.target.display()));
        s.push_str(&format!("files       {}\n", self.files));
        s.push_str(&format!(
            "bytes       {} ({})\n",
            self.bytes,
            human_bytes(self.bytes)
        ));
        s.push_str(&format!("segments    {}\n", self.segments));
        s.push_str(&format!("time        {:.2} s\n", self.seconds));
        s.push_str(&format!(
            "throughput  {:.1} MB/s (data; holes not counted)\n",
            self.mb_per_sec
        ));
        s.push_str(&format!(
            "bytes sent  {} (resent: {}, holes not sent: {})\n",
            self.bytes_sent,
            (self.bytes_sent + self.hole_bytes).saturating_sub(self.bytes),
            self.hole_bytes
        ));
        s.push_str(&format!(
            "transport   QUIC, {} congestion control, window {}, peak in flight {} (congestion window)\n",
            self.congestion,
            human_bytes(self.window_bytes),
            human_bytes(self.peak_in_flight)
        ));
        s.push_str(&format!(
            "verified    {} (BLAKE3 of every segment equal at source and target, target {})\n",
            if self.all_verified && self.hash_mismatches == 0 {
                "yes"
            } else {
                "NO"
            },
            // An object store's URL, or a directory.
            if ferry_common::path::is_store_url(&self.target.to_string_lossy()) {
                "stored"
            } else {
                "fsynced"
            }
        ));
        if self.hardlinks > 0 {
            s.push_str(&format!(
                "hardlinks   {} kept (linked at the target, content sent once)\n",
                self.hardlinks
            ));
        }
        for n in &self.notes {
            s.push_str(&format!("note        {n}\n"));
        }
        if self.failed_segments > 0 {
            s.push_str(&format!(
                "FAILED      {} segment(s), given up on after the last allowed attempt:\n",
                self.failed_segments
            ));
            for e in &self.failed {
                s.push_str(&format!("  {e}\n"));
            }
        }
        if self.issues_total > 0 {
            s.push_str(&format!("NOT COPIED  {} path(s):\n", self.issues_total));
            for (p, r) in &self.issues {
                s.push_str(&format!("  {p}: {r}\n"));
            }
        }
        s
    }
}

/// Runs the quick start.
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    let tmp;
    let workdir = match &opts.workdir {
        Some(w) => {
            std::fs::create_dir_all(w).with_context(|| format!("cannot create {}", w.display()))?;
            w.clone()
        }
        None => {
            tmp = tempfile::Builder::new()
                .prefix("ferry-quickstart-")
                .tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let source = match &opts.source {
        Some(s) => std::fs::canonicalize(s)
            .with_context(|| format!("source directory {} does not exist", s.display()))?,
        None => {
            let s = workdir.join("sample-source");
            if opts.progress {
                eprintln!("generating a sample data set in {} ...", s.display());
            }
            let big = opts.sample_big_file_bytes;
            let small = opts.sample_small_files;
            let s2 = s.clone();
            // An object store's keys are text: the sample's Latin-1 names stay out of it.
            let any_bytes = opts.target_store.is_none();
            tokio::task::spawn_blocking(move || generate_sample(&s2, big, small, any_bytes))
                .await??;
            s
        }
    };
    if !source.is_dir() {
        bail!("source {} is not a directory", source.display());
    }
    if opts.target_store.is_some() && opts.target.is_some() {
        bail!("give either a target directory or a target store, not both");
    }
    let target = match &opts.target_store {
        Some(store) => PathBuf::from(&store.url),
        None => opts
            .target
            .clone()
            .unwrap_or_else(|| workdir.join("target")),
    };
    if opts.target_store.is_none()
        && target.exists()
        && std::fs::read_dir(&target)?.next().is_some()
    {
        bail!(
            "target {} is not empty; pick an empty or new directory",
            target.display()
        );
    }

    let pki = workdir.join("pki");
    let ca = match Ca::init(&pki) {
        Ok(ca) => ca,
        Err(ferry_common::pki::PkiError::CaExists(_)) => Ca::load(&pki)?,
        Err(e) => return Err(e.into()),
    };
    let coord_tls = ca.issue_if_missing(&Identity::Coordinator(1), &pki)?;
    let admin_tls = ca.issue_if_missing(&Identity::Admin("quickstart".into()), &pki)?;
    let src_tls = ca.issue_if_missing(&Identity::Agent("source".into()), &pki)?;
    let dst_tls = ca.issue_if_missing(&Identity::Agent("target".into()), &pki)?;

    let node = ferry_coordinator::node::start(CoordinatorConfig {
        log_level: None,
        node_id: 1,
        listen: "127.0.0.1:0".parse()?,
        data_dir: workdir.join("coordinator"),
        lease_ttl_secs: 120,
        bootstrap: true,
        snapshot_every: 20_000,
        keep_logs_after_snapshot: 1_000,
        metrics_listen: None,
        tls: coord_tls,
        join_listen: None,
        ca_key: None,
        agent_cert_secs: ferry_common::pki::AGENT_LIFETIME.as_secs(),
        operator_cert_secs: ferry_common::pki::OPERATOR_LIFETIME.as_secs(),
        coordinator_cert_secs: ferry_common::pki::COORDINATOR_LIFETIME.as_secs(),
    })
    .await
    .context("coordinator failed to start")?;
    let coord = node.addr.to_string();
    let agent_cfg = |name: &str,
                     tls: TlsPaths,
                     root: Option<PathBuf>,
                     store: Option<ferry_agent::sink::object::StoreConfig>|
     -> AgentConfig {
        AgentConfig {
            log_level: None,
            name: name.to_string(),
            coordinator: coord.clone(),
            data_listen: (root.is_some() || store.is_some())
                .then(|| "127.0.0.1:0".parse().expect("valid")),
            advertise_addr: None,
            root,
            state_dir: workdir.join(format!("agent-{name}")),
            max_in_flight: 16,
            register_timeout_secs: 10,
            transport: Default::default(),
            tls,
            hooks: Default::default(),
            metrics_listen: None,
            target_store: store,
            source_store: None,
        }
    };
    let target_agent = match &opts.target_store {
        Some(store) => {
            ferry_agent::run::start(agent_cfg("target", dst_tls, None, Some(store.clone()))).await
        }
        None => {
            ferry_agent::run::start(agent_cfg("target", dst_tls, Some(target.clone()), None)).await
        }
    }
    .context("target agent failed to start")?;
    let source_agent = ferry_agent::run::start(agent_cfg("source", src_tls, None, None))
        .await
        .context("source agent failed to start")?;
    let src_stats: Arc<Stats> = source_agent.stats.clone();

    let result = async {
        let ctl = Ctl::connect(&coord, &TlsMaterial::load(&admin_tls)?).await?;
        let id = ctl
            .create(pb::MigrationSpec {
                source_agent: "source".into(),
                source_path: source.to_string_lossy().into_owned(),
                target_agent: "target".into(),
                target_path: String::new(),
                segment_size: opts.segment_size,
                xattrs: opts.xattrs,
                max_attempts: 0,
                excludes: Vec::new(),
                ..Default::default()
            })
            .await?;
        let started = Instant::now();
        let tty = opts.progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
        let mut last_print = Instant::now() - Duration::from_secs(10);
        let done = ctl
            .watch(id, Duration::from_secs(120), |p, rate| {
                if !opts.progress {
                    return;
                }
                let line = progress_line(p, rate);
                if tty {
                    eprint!("\r{line}\x1b[K");
                } else if last_print.elapsed() >= Duration::from_secs(2)
                    || p.phase() == pb::Phase::Done
                    || p.phase() == pb::Phase::Failed
                {
                    eprintln!("{line}");
                    last_print = Instant::now();
                }
            })
            .await?;
        if tty {
            eprintln!();
        }
        // The coordinator's own timestamps: from the entry that created the migration to the one
        // that verified its last segment (scan included). The watch loop's clock only bounds it.
        let elapsed = if done.finished_ms >= done.created_ms && done.finished_ms > 0 {
            (done.finished_ms - done.created_ms) as f64 / 1000.0
        } else {
            started.elapsed().as_secs_f64()
        };
        let v = ctl.verify(id, 0).await?;
        let src_agent = ctl
            .agents()
            .await?
            .into_iter()
            .find(|a| a.name == "source")
            .unwrap_or_default();
        anyhow::Ok(Report {
            source: source.clone(),
            target: target.clone(),
            migration_id: id,
            files: done.files_total,
            bytes: done.bytes_total,
            segments: done.segments_total,
            seconds: elapsed,
            // Data bytes only: the holes of sparse files cost nothing to "copy".
            mb_per_sec: if elapsed > 0.0 {
                done.bytes_total
                    .saturating_sub(Stats::get(&src_stats.hole_bytes)) as f64
                    / elapsed
                    / 1e6
            } else {
                0.0
            },
            all_verified: v.all_verified,
            hash_mismatches: v.hash_mismatches,
            bytes_sent: Stats::get(&src_stats.bytes_sent),
            congestion: src_agent.congestion,
            window_bytes: src_agent.window_bytes,
            peak_in_flight: Stats::get(&src_stats.peak_window),
            hole_bytes: Stats::get(&src_stats.hole_bytes),
            issues: done
                .scan_issues
                .iter()
                .map(|i| (i.path.clone(), i.reason.clone()))
                .collect(),
            issues_total: done.scan_issues_total,
            hardlinks: done.hardlinks,
            notes: done.notes.clone(),
            failed_segments: done.segments_failed,
            failed: done.failed.iter().map(|s| s.last_error.clone()).collect(),
        })
    }
    .await;
    source_agent.shutdown().await;
    target_agent.shutdown().await;
    node.shutdown().await;
    result
}

/// Writes a sample data set shaped like an AI platform's: large checkpoints (split into
/// segments), thousands of small files in nested directories (bundled), empty files and
/// directories, a symlink, a few file modes, names that are not UTF-8, a group of hardlinks, a
/// sparse file and (when run as root) files owned by other users. Deterministic: the same
/// arguments give the same bytes.
///
/// `any_bytes`: include names that are not UTF-8 (leave them out for an object store).
pub fn generate_sample(
    dir: &Path,
    big_file_bytes: u64,
    small_files: u32,
    any_bytes: bool,
) -> anyhow::Result<()> {
    let mut rng = blake3::Hasher::new_derive_key("ferry quickstart sample v1").finalize_xof();
    let mut write = |path: &Path, len: u64| -> anyhow::Result<()> {
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p)?;
        }
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
        let mut buf = vec![0u8; 1 << 20];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            rng.read_exact(&mut buf[..n])?;
            f.write_all(&buf[..n])?;
            left -= n as u64;
        }
        f.flush()?;
        Ok(())
    };
    write(&dir.join("checkpoints/model-00001.bin"), big_file_bytes)?;
    write(&dir.join("checkpoints/model-00002.bin"), big_file_bytes)?;
    // Not a multiple of any segment size: exercises the short last piece.
    write(
        &dir.join("checkpoints/optimizer.bin"),
        big_file_bytes + big_file_bytes / 4 + 12_345,
    )?;
    let mut size_rng = blake3::Hasher::new_derive_key("ferry quickstart sizes v1").finalize_xof();
    for i in 0..small_files {
        let mut b = [0u8; 4];
        size_rng.read_exact(&mut b)?;
        let size = 1024 + u32::from_le_bytes(b) as u64 % (63 * 1024);
        let p = dir.join(format!(
            "datasets/images/shard-{:02}/class-{:02}/img-{i:06}.jpg",
            i % 10,
            (i / 10) % 10
        ));
        write(&p, size)?;
    }
    write(&dir.join("datasets/README.txt"), 1000)?;
    write(&dir.join("datasets/empty-labels.txt"), 0)?;
    std::fs::create_dir_all(dir.join("datasets/empty-dir"))?;
    std::fs::create_dir_all(dir.join("logs/2026/11/empty"))?;
    write(&dir.join("scripts/train.sh"), 300)?;
    std::fs::set_permissions(
        dir.join("scripts/train.sh"),
        std::fs::Permissions::from_mode(0o755),
    )?;
    write(&dir.join("secrets/wandb.key"), 40)?;
    std::fs::set_permissions(
        dir.join("secrets/wandb.key"),
        std::fs::Permissions::from_mode(0o600),
    )?;
    std::os::unix::fs::symlink("model-00002.bin", dir.join("checkpoints/latest"))?;

    // What real trees hold and a copier must keep. Names that are not UTF-8 (Latin-1, from an
    // old Samba share), and a symlink to one:
    if any_bytes {
        let legacy = dir.join("datasets/legacy-share");
        let latin1_dir = legacy.join(OsStr::from_bytes(b"r\xe9sum\xe9s"));
        write(
            &latin1_dir.join(OsStr::from_bytes(b"caf\xe9-menu.txt")),
            500,
        )?;
        write(&legacy.join(OsStr::from_bytes(b"na\xefve.csv")), 2000)?;
        std::os::unix::fs::symlink(
            OsStr::from_bytes(b"na\xefve.csv"),
            legacy.join("latest.csv"),
        )?;
    }
    // A group of hardlinks (one file, three names in two directories):
    write(&dir.join("datasets/labels/labels-v3.csv"), 3000)?;
    std::fs::hard_link(
        dir.join("datasets/labels/labels-v3.csv"),
        dir.join("datasets/labels/labels-latest.csv"),
    )?;
    std::fs::hard_link(
        dir.join("datasets/labels/labels-v3.csv"),
        dir.join("datasets/labels.csv"),
    )?;
    // A sparse disk image: twice a checkpoint's size, four small runs of data.
    let image = dir.join("vm/scratch-disk.img");
    std::fs::create_dir_all(image.parent().expect("has a parent"))?;
    let f = std::fs::File::create(&image)?;
    let size = 2 * big_file_bytes;
    f.set_len(size)?;
    let mut run = vec![0u8; 64 * 1024];
    for i in 0..4u64 {
        rng.read_exact(&mut run)?;
        f.write_all_at(&run, i * (size / 4) + 4096)?;
    }
    drop(f);
    // Extended attributes (carried with --xattrs), where the file system keeps user ones.
    let label = vec![(b"user.ferry.dataset".to_vec(), b"images-v3".to_vec())];
    for p in ["datasets/README.txt", "datasets/images"] {
        if let Err(e) = ferry_agent::xattr::apply_nofollow(&dir.join(p), &label) {
            tracing::debug!(message = "No extended attributes in the sample.", error = %e);
            break;
        }
    }
    // Owners other than the one running the quick start (only root can give files away).
    if ferry_agent::holes::running_as_root() {
        use std::os::unix::fs::{chown, lchown};
        chown(dir.join("datasets/README.txt"), Some(1001), Some(1002))?;
        chown(dir.join("logs"), Some(1003), Some(1004))?;
        lchown(dir.join("checkpoints/latest"), Some(1005), Some(1006))?;
    }
    Ok(())
}
