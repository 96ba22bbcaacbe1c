//! The source side: scans assigned migrations into a local manifest, registers segments, leases
//! them and streams each to its target over QUIC, hashing while it reads.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_common::names::agent_dns;
use ferry_common::segment::{Entry, EntryKind, SegmentPlanner};
use ferry_proto::control::{Lease, Role, SourceWork};
use ferry_proto::data as pb;
use tokio::sync::watch;
use tokio::task::{block_in_place, JoinSet};

use crate::control::Control;
use crate::frame::{self, MAX_SMALL_FRAME};
use crate::manifest::{self, Manifest, ManifestWriter, ScanSummary, MAX_ISSUES_KEPT};
use crate::scan::{walk, Walked};
use crate::stats::Stats;

/// Segments registered with the coordinator per call.
const REGISTER_BATCH: usize = 1000;
/// Read buffer per segment in flight: bounds memory whatever the file sizes.
const BUF: usize = 1024 * 1024;
/// How often to ask for work and leases when idle.
const TICK: Duration = Duration::from_millis(250);
/// How often to send a heartbeat (and learn of new migrations).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// A source agent.
pub struct Source {
    control: Control,
    endpoint: quinn::Endpoint,
    client_cfg: quinn::ClientConfig,
    state_dir: PathBuf,
    max_in_flight: u32,
    stats: Arc<Stats>,
    /// Source root per migration.
    roots: Mutex<HashMap<u64, PathBuf>>,
    /// Manifests being written or complete, per migration.
    manifests: Mutex<HashMap<u64, Arc<Manifest>>>,
    /// Open connections per (target name, address).
    conns: Mutex<HashMap<(String, String), quinn::Connection>>,
}

impl Source {
    /// A source using `endpoint` to dial targets.
    pub fn new(
        control: Control,
        endpoint: quinn::Endpoint,
        client_cfg: quinn::ClientConfig,
        state_dir: PathBuf,
        max_in_flight: u32,
        stats: Arc<Stats>,
    ) -> Self {
        Source {
            control,
            endpoint,
            client_cfg,
            state_dir,
            max_in_flight: max_in_flight.max(1),
            stats,
            roots: Mutex::default(),
            manifests: Mutex::default(),
            conns: Mutex::default(),
        }
    }

    /// Heartbeats, scans and sends until `stop` turns true. In-flight segments are abandoned and
    /// reported as failed, so that their leases return at once instead of at expiry.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut sends: JoinSet<()> = JoinSet::new();
        let mut in_flight: HashMap<tokio::task::Id, Lease> = HashMap::new();
        let mut scans: HashMap<u64, tokio::task::JoinHandle<()>> = HashMap::new();
        let mut tick = tokio::time::interval(TICK);
        let mut last_heartbeat: Option<std::time::Instant> = None;
        let mut work: Vec<SourceWork> = Vec::new();
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                done = sends.join_next_with_id(), if !sends.is_empty() => {
                    match done {
                        Some(Ok((id, ()))) => { in_flight.remove(&id); }
                        Some(Err(e)) => { in_flight.remove(&e.id()); }
                        None => {}
                    }
                }
                _ = tick.tick() => {}
            }
            if last_heartbeat.is_none_or(|t| t.elapsed() >= HEARTBEAT_EVERY) {
                last_heartbeat = Some(std::time::Instant::now());
                match self.control.heartbeat().await {
                    Ok(w) => work = w,
                    Err(e) => tracing::warn!(message = "Heartbeat failed.", error = %e),
                }
            }
            scans.retain(|_, h| !h.is_finished());
            for w in work.iter().filter(|w| !w.finished) {
                self.roots
                    .lock()
                    .expect("not poisoned")
                    .insert(w.migration_id, PathBuf::from(&w.source_path));
                let known = self
                    .manifests
                    .lock()
                    .expect("not poisoned")
                    .contains_key(&w.migration_id);
                if !known && !scans.contains_key(&w.migration_id) {
                    let me = self.clone();
                    let w = w.clone();
                    let stop = stop.clone();
                    scans.insert(
                        w.migration_id,
                        tokio::task::spawn_blocking(move || me.prepare(&w, stop)),
                    );
                }
            }
            let free = self.max_in_flight.saturating_sub(sends.len() as u32);
            if free == 0 || work.iter().all(|w| w.finished) {
                continue;
            }
            match self.control.lease(free).await {
                Ok(leases) => {
                    for l in leases {
                        let me = self.clone();
                        let lease = l.clone();
                        let h = sends.spawn(async move { me.transfer(lease).await });
                        in_flight.insert(h.id(), l);
                    }
                }
                Err(e) => tracing::warn!(message = "Lease request failed.", error = %e),
            }
        }
        sends.shutdown().await;
        for h in scans.values() {
            h.abort();
        }
        for l in in_flight.values() {
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                self.control.report(
                    Role::Source,
                    l.migration_id,
                    l.segment_id,
                    l.epoch,
                    Err("source agent shut down".into()),
                ),
            )
            .await;
            if !matches!(r, Ok(Ok(_))) {
                tracing::debug!(
                    message = "Could not release lease at shutdown; it will expire.",
                    segment = l.segment_id
                );
            }
        }
        self.endpoint.close(0u32.into(), b"agent shutting down");
    }

    fn migration_dir(&self, mid: u64) -> PathBuf {
        self.state_dir.join(format!("migration-{mid}"))
    }

    /// Makes the migration's manifest available: loads a completed scan, or scans afresh.
    fn prepare(&self, w: &SourceWork, stop: watch::Receiver<bool>) {
        let rt = tokio::runtime::Handle::current();
        let mid = w.migration_id;
        let dir = self.migration_dir(mid);
        let result = (|| -> Result<(), String> {
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let summary_path = dir.join("scan.json");
            if let Some(summary) =
                manifest::read_summary(&summary_path).map_err(|e| e.to_string())?
            {
                let m = Arc::new(Manifest::open(&dir.join("manifest")).map_err(|e| e.to_string())?);
                self.manifests
                    .lock()
                    .expect("not poisoned")
                    .insert(mid, m.clone());
                if !w.scan_complete {
                    // We crashed between finishing the scan and telling the coordinator.
                    let all = m.summaries().map_err(|e| e.to_string())?;
                    for batch in all.chunks(REGISTER_BATCH) {
                        retry(&rt, &stop, || self.control.register_segments(mid, batch))?;
                    }
                    retry(&rt, &stop, || self.control.complete_scan(mid, &summary))?;
                }
                tracing::info!(
                    message = "Loaded manifest.",
                    migration = mid,
                    segments = m.len()
                );
                return Ok(());
            }
            if w.scan_complete {
                return Err(format!(
                    "the coordinator has a complete scan of migration {mid} but {} holds none; \
                     this agent's state directory was lost — start a new migration",
                    dir.display()
                ));
            }
            self.scan(&rt, &stop, w, &dir)
        })();
        if let Err(e) = result {
            tracing::error!(message = "Cannot prepare migration.", migration = mid, error = %e);
        }
    }

    fn scan(
        &self,
        rt: &tokio::runtime::Handle,
        stop: &watch::Receiver<bool>,
        w: &SourceWork,
        dir: &Path,
    ) -> Result<(), String> {
        let mid = w.migration_id;
        let root = PathBuf::from(&w.source_path);
        tracing::info!(message = "Scanning.", migration = mid, root = %root.display());
        let (mut writer, live) =
            ManifestWriter::create(&dir.join("manifest")).map_err(|e| e.to_string())?;
        self.manifests
            .lock()
            .expect("not poisoned")
            .insert(mid, live);
        let mut planner = SegmentPlanner::new(w.segment_size.max(1));
        let mut summary = ScanSummary::default();
        let mut batch: Vec<(u64, u64, u32)> = Vec::new();
        let flush =
            |writer: &mut ManifestWriter, batch: &mut Vec<(u64, u64, u32)>| -> Result<(), String> {
                writer.sync().map_err(|e| e.to_string())?;
                if !batch.is_empty() {
                    retry(rt, stop, || self.control.register_segments(mid, batch))?;
                    batch.clear();
                }
                Ok(())
            };
        let walked = walk(&root, |item| -> Result<(), String> {
            if *stop.borrow() {
                return Err("agent shutting down".into());
            }
            match item {
                Walked::Entry(e) => {
                    for seg in planner.push(e) {
                        writer.append(&seg).map_err(|e| e.to_string())?;
                        batch.push((seg.id, seg.bytes(), seg.files()));
                        summary.segments_total += 1;
                    }
                    if batch.len() >= REGISTER_BATCH {
                        flush(&mut writer, &mut batch)?;
                    }
                }
                Walked::Issue { path, reason } => {
                    tracing::warn!(message = "Cannot copy path.", migration = mid, path = %path, reason = %reason);
                    summary.issues_total += 1;
                    if summary.issues.len() < MAX_ISSUES_KEPT {
                        summary.issues.push((path, reason));
                    }
                }
            }
            Ok(())
        });
        match walked {
            Ok(r) => r?,
            Err(root_err) => {
                summary.issues_total += 1;
                summary
                    .issues
                    .push((w.source_path.clone(), root_err.reason.clone()));
                tracing::error!(message = "Source path cannot be scanned.", migration = mid, error = %root_err);
            }
        }
        if let Some(seg) = planner.finish() {
            writer.append(&seg).map_err(|e| e.to_string())?;
            batch.push((seg.id, seg.bytes(), seg.files()));
            summary.segments_total += 1;
        }
        flush(&mut writer, &mut batch)?;
        manifest::write_summary(&dir.join("scan.json"), &summary).map_err(|e| e.to_string())?;
        retry(rt, stop, || self.control.complete_scan(mid, &summary))?;
        tracing::info!(
            message = "Scan complete.",
            migration = mid,
            segments = summary.segments_total,
            issues = summary.issues_total
        );
        Ok(())
    }

    /// Sends one leased segment and reports the outcome.
    async fn transfer(self: Arc<Self>, lease: Lease) {
        let (mid, sid, epoch) = (lease.migration_id, lease.segment_id, lease.epoch);
        let result = self.send(&lease).await;
        if let Err(e) = &result {
            Stats::add(&self.stats.segments_failed, 1);
            tracing::warn!(message = "Segment transfer failed.", migration = mid, segment = sid, error = %e);
        }
        let outcome = self
            .control
            .report(Role::Source, mid, sid, epoch, result.clone())
            .await;
        match outcome {
            Ok(r) if r.outcome == "verified" => Stats::add(&self.stats.segments_verified, 1),
            Ok(r) => {
                tracing::debug!(message = "Segment not verified.", segment = sid, outcome = %r.outcome, reason = %r.reason)
            }
            Err(e) => {
                tracing::warn!(message = "Could not report segment; its lease will expire.", segment = sid, error = %e)
            }
        }
        if result.is_err() {
            // Back off a little so that an unreachable target is not hammered.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn connect(&self, target: &str, addr: &str) -> Result<quinn::Connection, String> {
        let key = (target.to_string(), addr.to_string());
        if let Some(c) = self.conns.lock().expect("not poisoned").get(&key) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let sock: std::net::SocketAddr = addr
            .parse()
            .map_err(|e| format!("target address {addr:?}: {e}"))?;
        let conn = self
            .endpoint
            .connect_with(self.client_cfg.clone(), sock, &agent_dns(target))
            .map_err(|e| format!("cannot dial {target} at {addr}: {e}"))?
            .await
            .map_err(|e| format!("cannot connect to {target} at {addr}: {e}"))?;
        self.conns
            .lock()
            .expect("not poisoned")
            .insert(key, conn.clone());
        Ok(conn)
    }

    async fn send(&self, lease: &Lease) -> Result<[u8; 32], String> {
        let (mid, sid) = (lease.migration_id, lease.segment_id);
        let manifest = self
            .manifests
            .lock()
            .expect("not poisoned")
            .get(&mid)
            .cloned()
            .ok_or_else(|| format!("manifest of migration {mid} is not loaded yet"))?;
        let root = self
            .roots
            .lock()
            .expect("not poisoned")
            .get(&mid)
            .cloned()
            .ok_or_else(|| format!("source root of migration {mid} unknown"))?;
        let entries = block_in_place(|| manifest.read(sid)).map_err(|e| e.to_string())?;
        let conn = self
            .connect(&lease.target_agent, &lease.target_addr)
            .await?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| format!("cannot open stream: {e}"))?;
        let header = pb::SegmentHeader {
            migration_id: mid,
            segment_id: sid,
            epoch: lease.epoch,
            entries: entries.iter().map(pb::Entry::from).collect(),
        };
        frame::write(&mut send, &header)
            .await
            .map_err(|e| e.to_string())?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; BUF];
        for e in entries
            .iter()
            .filter(|e| e.kind == EntryKind::File && e.len > 0)
        {
            if let Err(why) = self
                .stream_piece(&root, e, &mut hasher, &mut buf, &mut send)
                .await
            {
                let _ = send.reset(1u32.into());
                return Err(why);
            }
        }
        let hash = *hasher.finalize().as_bytes();
        frame::write(
            &mut send,
            &pb::SegmentTrailer {
                blake3: hash.to_vec(),
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        let ack: pb::SegmentAck = frame::read(&mut recv, MAX_SMALL_FRAME)
            .await
            .map_err(|e| format!("no ack from target: {e}"))?;
        if !ack.ok {
            return Err(format!("target refused segment: {}", ack.error));
        }
        Ok(hash)
    }

    /// Streams one file piece, checking that the file is the one scanned and did not change while
    /// being read (invariant 3: a torn read is never reported as a good hash).
    async fn stream_piece(
        &self,
        root: &Path,
        e: &Entry,
        hasher: &mut blake3::Hasher,
        buf: &mut [u8],
        send: &mut quinn::SendStream,
    ) -> Result<(), String> {
        let path = root.join(&e.path);
        let file = block_in_place(|| File::open(&path))
            .map_err(|err| format!("cannot open {}: {err}", path.display()))?;
        let unchanged = |f: &File| -> Result<(), String> {
            let m = f
                .metadata()
                .map_err(|err| format!("cannot stat {}: {err}", path.display()))?;
            if m.ino() != e.inode
                || m.len() != e.file_size
                || m.mtime() != e.mtime_sec
                || m.mtime_nsec() as u32 != e.mtime_nsec
            {
                return Err(format!(
                    "{} changed since it was scanned (or while being read); it will be resent",
                    path.display()
                ));
            }
            Ok(())
        };
        unchanged(&file)?;
        let mut off = e.offset;
        let end = e.offset + e.len;
        while off < end {
            let n = ((end - off) as usize).min(buf.len());
            block_in_place(|| file.read_exact_at(&mut buf[..n], off))
                .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
            hasher.update(&buf[..n]);
            send.write_all(&buf[..n])
                .await
                .map_err(|err| format!("stream write failed: {err}"))?;
            Stats::add(&self.stats.bytes_sent, n as u64);
            off += n as u64;
        }
        unchanged(&file)
    }
}

/// Runs a coordinator call from a blocking thread, retrying transient failures until it succeeds
/// or the agent stops.
fn retry<T, F, Fut>(
    rt: &tokio::runtime::Handle,
    stop: &watch::Receiver<bool>,
    f: F,
) -> Result<T, String>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::control::ControlError>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match rt.block_on(f()) {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && !*stop.borrow() => {
                tracing::warn!(message = "Coordinator call failed; retrying.", error = %e);
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}
