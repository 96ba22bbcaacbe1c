//! Scale benchmark of a 3-node coordinator cluster on this machine: registers many segments and
//! drives many simulated agents' heartbeats, leases and segment reports, then measures memory,
//! disk, snapshot build and snapshot install. Run it from a release build:
//!
//! ```sh
//! cargo build --release -p ferry-integration-tests --bins
//! target/release/bench-cluster --segments 2000000 --agents 1000 --seconds 30
//! ```
//!
//! The simulated agents are real clients (mutual TLS, one certificate each) of the real
//! coordinator processes; only the data plane is left out.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use ferry_agent::control::{Control, Coordinator};
use ferry_agent::manifest::{ScanSummary, SegmentSummary};
use ferry_common::config::TlsPaths;
use ferry_common::pki::{Ca, Identity};
use ferry_common::tls::TlsMaterial;
use ferry_integration_tests::bench::daemon;
use ferry_integration_tests::process::{coordinator_addr, strip_ansi};
use ferry_proto::admin as pb;
use ferry_proto::control::Role;
use ferryctl::ctl::Ctl;
use futures::StreamExt;

#[derive(Parser)]
#[command(about = "Scale benchmark of a 3-node ferry coordinator cluster")]
struct Args {
    /// Segments to register in total.
    #[arg(long, default_value_t = 2_000_000)]
    segments: u64,
    /// Simulated agents (half sources, half targets; one migration per pair).
    #[arg(long, default_value_t = 1000)]
    agents: u32,
    /// Seconds to drive heartbeats, leases and reports.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Segments per RegisterSegments call.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Concurrent registration calls.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// Keep the cluster's files here (default: a temporary directory).
    #[arg(long)]
    workdir: Option<PathBuf>,
}

struct Node {
    id: u64,
    addr: String,
    dir: PathBuf,
    log: PathBuf,
    child: Child,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn coordinator_bin() -> anyhow::Result<PathBuf> {
    let dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    // it-coordinator is built with this binary (same package), so it is never stale.
    for name in ["it-coordinator", "ferry-coordinator"] {
        if dir.join(name).exists() {
            return Ok(dir.join(name));
        }
    }
    bail!("ferry-coordinator is not built next to this binary in {}: run `cargo build --release -p ferry-integration-tests --bins`", dir.display())
}

fn spawn_node(work: &Path, ca: &Ca, id: u64, bootstrap: bool) -> anyhow::Result<Node> {
    let tls = ca.issue_if_missing(&Identity::Coordinator(id), &work.join("pki"))?;
    let dir = work.join(format!("node{id}"));
    let config = work.join(format!("node{id}.toml"));
    std::fs::write(
        &config,
        format!(
            "node_id = {id}\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nbootstrap = {bootstrap}\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            dir.display(),
            tls.ca.display(),
            tls.cert.display(),
            tls.key.display()
        ),
    )?;
    let log = work.join(format!("node{id}.log"));
    let out = std::fs::File::create(&log)?;
    let mut child = Command::new(coordinator_bin()?)
        .args(["run", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()?;
    // It binds port 0 and says where it listens: no port picked, released and raced for.
    let addr = coordinator_addr(&mut child, &log)?;
    Ok(Node {
        id,
        addr: addr.to_string(),
        dir,
        log,
        child,
    })
}

fn rss_mib(pid: u32, field: &str) -> f64 {
    daemon::status_mib(pid, field)
}

fn du_mib(dir: &Path) -> f64 {
    daemon::du_bytes(dir) as f64 / (1024.0 * 1024.0)
}

async fn connect_admin(addr: &str, tls: &TlsMaterial) -> anyhow::Result<Ctl> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Ctl::connect(addr, tls).await {
            Ok(c) if c.cluster_status().await.is_ok_and(|s| s.leader_id != 0) => return Ok(c),
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(_) => bail!("no leader at {addr}"),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Latencies of successful writes, in microseconds, and the counters the report needs.
#[derive(Default)]
struct Meter {
    latencies: Mutex<Vec<u32>>,
    writes: AtomicU64,
    segment_updates: AtomicU64,
    errors: AtomicU64,
    /// Failed calls by the start of their status: what failed, not only how often.
    why: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Meter {
    fn record<T, E: std::fmt::Display>(&self, started: Instant, r: &Result<T, E>, updates: u64) {
        match r {
            Ok(_) => {
                self.latencies
                    .lock()
                    .unwrap()
                    .push(started.elapsed().as_micros() as u32);
                self.writes.fetch_add(1, Ordering::Relaxed);
                self.segment_updates.fetch_add(updates, Ordering::Relaxed);
            }
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                // After the address list every message starts with, what the status says.
                let e = e.to_string();
                let at = e.find("code:").unwrap_or(0);
                let why: String = e[at..].chars().take(120).collect();
                *self.why.lock().unwrap().entry(why).or_default() += 1;
            }
        }
    }

    /// The most frequent errors, most frequent first.
    fn top_errors(&self, n: usize) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self.why.lock().unwrap().clone().into_iter().collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v.truncate(n);
        v
    }

    fn percentile(sorted: &[u32], p: f64) -> f64 {
        if sorted.is_empty() {
            return 0.0;
        }
        let i = ((sorted.len() - 1) as f64 * p).round() as usize;
        sorted[i] as f64 / 1000.0
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp;
    let work = match &args.workdir {
        Some(w) => {
            std::fs::create_dir_all(w)?;
            w.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let pki = work.join("pki");
    let ca = Ca::init(&pki).context("the work directory must be empty")?;
    let admin = TlsMaterial::load(&ca.issue_if_missing(&Identity::Admin("bench".into()), &pki)?)?;

    // 1. Three nodes.
    let mut nodes = vec![spawn_node(&work, &ca, 1, true)?];
    let ctl = connect_admin(&nodes[0].addr, &admin).await?;
    for id in 2..=3 {
        let n = spawn_node(&work, &ca, id, false)?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        ctl.add_node(id, &n.addr).await?;
        nodes.push(n);
    }
    let all = nodes
        .iter()
        .map(|n| n.addr.clone())
        .collect::<Vec<_>>()
        .join(",");
    eprintln!("cluster of 3 formed at {all}");

    // 2. Agents: certificates, clients, registration.
    let pairs = (args.agents / 2).max(1);
    let t = Instant::now();
    let mut sources = Vec::new();
    let mut targets = Vec::new();
    for i in 0..pairs {
        for (name, list) in [
            (format!("s{i:04}"), &mut sources),
            (format!("t{i:04}"), &mut targets),
        ] {
            let paths: TlsPaths = ca.issue_if_missing(&Identity::Agent(name.clone()), &pki)?;
            // Heartbeats as fixed-rate polls answered at once (the heavier load; real agents'
            // long polls are held while nothing changes).
            list.push(Control::new(&name, &all, &TlsMaterial::load(&paths)?)?.without_long_poll());
        }
    }
    let agents: Vec<Control> = sources.iter().chain(targets.iter()).cloned().collect();
    futures::stream::iter(agents.iter().map(|c| {
        let addr = if c.agent().starts_with('t') {
            "127.0.0.1:9"
        } else {
            ""
        };
        async move { c.register(addr, false, &Default::default(), "").await }
    }))
    .buffer_unordered(64)
    .collect::<Vec<_>>()
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    eprintln!(
        "{} agents registered in {:.1}s",
        agents.len(),
        t.elapsed().as_secs_f64()
    );

    // 3. One migration per pair; segments registered in batches.
    let mut mids = Vec::new();
    for i in 0..pairs as usize {
        mids.push(
            ctl.create(pb::MigrationSpec {
                source_agent: sources[i].agent().to_string(),
                source_path: "/bench".into(),
                target_agent: targets[i].agent().to_string(),
                target_path: String::new(),
                segment_size: 0,
                xattrs: false,
                max_attempts: 0,
                excludes: Vec::new(),
                ..Default::default()
            })
            .await?,
        );
    }
    let per = args.segments / pairs as u64;
    let t = Instant::now();
    let reg_meter = Arc::new(Meter::default());
    let calls: Vec<(usize, u64, u64)> = (0..pairs as usize)
        .flat_map(|i| {
            (0..per)
                .step_by(args.batch)
                .map(move |start| (i, start, (start + args.batch as u64).min(per)))
        })
        .collect();
    futures::stream::iter(calls.into_iter().map(|(i, start, end)| {
        let c = sources[i].clone();
        let mid = mids[i];
        let meter = reg_meter.clone();
        async move {
            let segs: Vec<SegmentSummary> = (start..end)
                .map(|id| SegmentSummary {
                    id,
                    bytes: 64 << 20,
                    files: 1,
                    fingerprint: [id as u8; 32],
                    piece: (0, 0),
                })
                .collect();
            let t = Instant::now();
            let r = c.register_segments(mid, &segs).await;
            meter.record(t, &r, segs.len() as u64);
        }
    }))
    .buffer_unordered(args.parallel)
    .collect::<Vec<_>>()
    .await;
    for (i, mid) in mids.iter().enumerate() {
        sources[i]
            .complete_scan(
                *mid,
                &ScanSummary {
                    segments_total: per,
                    ..Default::default()
                },
                &[],
                0,
            )
            .await?;
    }
    let reg_secs = t.elapsed().as_secs_f64();
    let registered = reg_meter.segment_updates.load(Ordering::Relaxed);
    eprintln!(
        "{registered} segments registered in {reg_secs:.1}s ({:.0} segments/s, {} errors)",
        registered as f64 / reg_secs,
        reg_meter.errors.load(Ordering::Relaxed)
    );
    let rss_after_register: Vec<f64> = nodes
        .iter()
        .map(|n| rss_mib(n.child.id(), "VmRSS"))
        .collect();
    // Said as soon as measured: a long run that fails later still leaves its figures.
    eprintln!("RSS after registration (MiB): {rss_after_register:.0?}");

    // 4. Drive: every agent heartbeats each second; every source leases and both ends report.
    let meter = Arc::new(Meter::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in agents.clone() {
        let (meter, stop) = (meter.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = c.heartbeat().await;
                meter.record(t, &r, 0);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
    }
    for i in 0..pairs as usize {
        let (src, dst) = (sources[i].clone(), targets[i].clone());
        let (meter, stop) = (meter.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let leases = src.lease(16).await;
                meter.record(t, &leases, leases.as_ref().map_or(0, |l| l.len() as u64));
                let Ok(leases) = leases else {
                    continue;
                };
                if leases.is_empty() {
                    break;
                }
                // Like real agents, both ends report each segment as its transfer ends, many
                // transfers at once: the reports made meanwhile travel in one call each way.
                let reports = leases.iter().flat_map(|l| {
                    let h = *blake3::hash(&l.segment_id.to_le_bytes()).as_bytes();
                    [(&dst, Role::Target), (&src, Role::Source)].map(|(c, role)| {
                        let meter = meter.clone();
                        async move {
                            let t = Instant::now();
                            let r = c
                                .report(role, l.migration_id, l.segment_id, l.epoch, Ok(h))
                                .await;
                            meter.record(t, &r, 1);
                        }
                    })
                });
                futures::future::join_all(reports).await;
            }
        }));
    }
    let index_before = ctl.cluster_status().await?.last_log_index;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let drive_secs = t.elapsed().as_secs_f64();
    let entries = ctl.cluster_status().await?.last_log_index - index_before;
    let mut lat = std::mem::take(&mut *meter.latencies.lock().unwrap());
    lat.sort_unstable();
    let writes = meter.writes.load(Ordering::Relaxed);
    let updates = meter.segment_updates.load(Ordering::Relaxed);

    // 5. Memory and disk, then snapshots on every node, then a fresh node installing one.
    let rss: Vec<f64> = nodes
        .iter()
        .map(|n| rss_mib(n.child.id(), "VmRSS"))
        .collect();
    eprintln!(
        "driven {drive_secs:.1}s: {updates} segment updates, {writes} calls, {} failed; RSS (MiB): {rss:.0?}",
        meter.errors.load(Ordering::Relaxed)
    );
    for (why, n) in meter.top_errors(5) {
        eprintln!("  failed {n}×: {why}");
    }
    let disk_before: Vec<f64> = nodes.iter().map(|n| du_mib(&n.dir)).collect();
    let mut builds = Vec::new();
    for n in &nodes {
        let c = connect_admin(&n.addr, &admin).await?;
        let (_, index, ms) = c.snapshot().await?;
        builds.push((n.id, index, ms));
    }
    let disk_after: Vec<f64> = nodes.iter().map(|n| du_mib(&n.dir)).collect();
    let peak: Vec<f64> = nodes
        .iter()
        .map(|n| rss_mib(n.child.id(), "VmHWM"))
        .collect();
    let fresh = spawn_node(&work, &ca, 4, false)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let target_index = ctl.cluster_status().await?.last_applied_index;
    let t = Instant::now();
    ctl.add_node(4, &fresh.addr).await?;
    let on4 = connect_admin(&fresh.addr, &admin).await?;
    loop {
        let s = on4.cluster_status().await?;
        if s.last_applied_index >= target_index {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("node 4 did not catch up in 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let install_secs = t.elapsed().as_secs_f64();
    let log4 = strip_ansi(&std::fs::read_to_string(&fresh.log).unwrap_or_default());
    let snap_bytes: u64 = log4
        .lines()
        .filter(|l| l.contains("Installed snapshot"))
        .filter_map(|l| l.split("bytes=").nth(1))
        .filter_map(|b| b.split_whitespace().next()?.parse().ok())
        .next_back()
        .unwrap_or(0);

    println!("## Coordinator scale benchmark");
    println!();
    println!(
        "3 nodes on one machine ({} cores); {} agents; {} migrations; {registered} segments.",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        agents.len(),
        pairs
    );
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| segment registration | {:.0} segments/s ({} segments in {reg_secs:.1} s, batches of {}) |", registered as f64 / reg_secs, registered, args.batch);
    println!(
        "| calls answered while driving | {:.0} /s ({writes} in {drive_secs:.1} s; {} failed) |",
        writes as f64 / drive_secs,
        meter.errors.load(Ordering::Relaxed)
    );
    println!(
        "| Raft log entries while driving | {:.0} /s ({entries} entries; group commit puts many commands in one) |",
        entries as f64 / drive_secs
    );
    println!(
        "| segment updates while driving | {:.0} /s (lease grants + reports) |",
        updates as f64 / drive_secs
    );
    println!(
        "| call latency (each report, lease or heartbeat as its caller sees it) | p50 {:.1} ms, p99 {:.1} ms |",
        Meter::percentile(&lat, 0.5),
        Meter::percentile(&lat, 0.99)
    );
    for (i, n) in nodes.iter().enumerate() {
        println!(
            "| node {} | RSS {:.0} MiB after registration, {:.0} MiB after driving, peak {:.0} MiB; sled dir {:.0} MiB → {:.0} MiB after snapshot+compaction; snapshot built in {} ms |",
            n.id, rss_after_register[i], rss[i], peak[i], disk_before[i], disk_after[i], builds[i].2
        );
    }
    println!("| snapshot | {:.1} MiB; a fresh node caught up (transfer + install) in {install_secs:.1} s |", snap_bytes as f64 / (1024.0 * 1024.0));
    drop(fresh);
    drop(nodes);
    Ok(())
}
