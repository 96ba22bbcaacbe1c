//! The source side: scans assigned migrations into a local manifest, registers segments, leases
//! them and streams each to its target over QUIC, hashing while it reads.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::segment::{Entry, EntryKind, SegmentPlanner};
use backon::Retryable;
use ferry_common::names::agent_dns;
use ferry_common::path::display;
use ferry_proto::control::{Lease, Role, SourceWork};
use ferry_proto::data as pb;
use tokio::sync::watch;
use tokio::task::{block_in_place, JoinSet};

use crate::control::{Control, Failure};
use crate::frame::{self, MAX_SMALL_FRAME};
use crate::manifest::{
    self, Manifest, ManifestWriter, ScanSummary, SegmentSummary, MAX_ISSUES_KEPT,
};
use crate::scan::{walk, Walked};
use crate::stats::Stats;

/// Segments registered with the coordinator per call.
const REGISTER_BATCH: usize = 1000;
/// Read buffer per segment in flight: bounds memory whatever the file sizes.
const BUF: usize = 1024 * 1024;
/// How long a source keeps retrying a segment report the coordinator did not answer.
const REPORT_RETRY_FOR: Duration = Duration::from_secs(60);
/// How long a source waits for the target's ack after its stream to the target failed: the
/// target sends why (a full disk) before it stops reading.
const ACK_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// How long to wait before preparing a migration again after a failure.
const PREPARE_RETRY: Duration = Duration::from_secs(5);
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
    /// Migrations that carry extended attributes.
    with_xattrs: Mutex<std::collections::HashSet<u64>>,
    /// Manifests being written or complete, per migration id, with the migration's uuid (a
    /// migration id of a new cluster may be an old one's: the uuid tells them apart).
    manifests: Mutex<HashMap<u64, (String, Arc<Manifest>)>>,
    /// When a migration whose preparation failed may be tried again.
    retry_at: Mutex<HashMap<u64, Instant>>,
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
            with_xattrs: Mutex::default(),
            manifests: Mutex::default(),
            retry_at: Mutex::default(),
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
        // Leases granted to this agent that it may not know of: from its previous run, or from a
        // lease request whose answer was lost. Resolved by reading the committed state.
        let mut reconcile = true;
        let mut last_renewal = Instant::now();
        let mut renewal: Option<tokio::task::JoinHandle<()>> = None;
        // While the coordinator refuses or cannot answer lease requests, ask less and less often
        // (from one tick up to 10 s) instead of every tick.
        let mut lease_backoff = Backoff::new(TICK, Duration::from_secs(10));
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
                last_heartbeat = Some(Instant::now());
                tokio::select! {
                    _ = stop.changed() => break,
                    r = self.control.heartbeat() => match r {
                        Ok(w) => work = w,
                        Err(e) => tracing::warn!(message = "Heartbeat failed.", error = %e),
                    },
                }
            }
            // Renew what is being sent at a third of the lease time, so a transfer slower than
            // the lease time is not taken away and restarted (one call at a time).
            let ttl = in_flight
                .values()
                .map(|l| l.ttl_ms)
                .filter(|t| *t > 0)
                .min();
            if let Some(ttl) = ttl {
                let every = Duration::from_millis(ttl / 3).max(Duration::from_secs(1));
                if last_renewal.elapsed() >= every
                    && renewal.as_ref().is_none_or(|h| h.is_finished())
                {
                    last_renewal = Instant::now();
                    renewal = Some(self.renew(in_flight.values().cloned().collect()));
                }
            } else {
                last_renewal = Instant::now();
            }
            scans.retain(|_, h| !h.is_finished());
            for w in work.iter().filter(|w| !w.finished) {
                self.roots
                    .lock()
                    .expect("not poisoned")
                    .insert(w.migration_id, PathBuf::from(&w.source_path));
                if w.xattrs {
                    self.with_xattrs
                        .lock()
                        .expect("not poisoned")
                        .insert(w.migration_id);
                }
                let known = {
                    let mut manifests = self.manifests.lock().expect("not poisoned");
                    match manifests.get(&w.migration_id) {
                        Some((uuid, _)) if *uuid == w.migration_uuid => true,
                        Some(_) => {
                            // Another cluster's migration of the same id: never send from it.
                            manifests.remove(&w.migration_id);
                            false
                        }
                        None => false,
                    }
                };
                let waiting = self
                    .retry_at
                    .lock()
                    .expect("not poisoned")
                    .get(&w.migration_id)
                    .is_some_and(|t| Instant::now() < *t);
                if !known && !waiting && !scans.contains_key(&w.migration_id) {
                    let me = self.clone();
                    let w = w.clone();
                    let stop = stop.clone();
                    scans.insert(
                        w.migration_id,
                        tokio::task::spawn_blocking(move || me.prepare(&w, stop)),
                    );
                }
            }
            if reconcile && !work.is_empty() {
                match self.control.list_leases().await {
                    Ok(held) => {
                        reconcile = false;
                        for l in held {
                            let known = in_flight.values().any(|k| {
                                (k.migration_id, k.segment_id, k.epoch)
                                    == (l.migration_id, l.segment_id, l.epoch)
                            });
                            if !known {
                                tracing::info!(
                                    message = "Adopting a lease granted earlier.",
                                    migration = l.migration_id,
                                    segment = l.segment_id
                                );
                                let me = self.clone();
                                let lease = l.clone();
                                let h = sends.spawn(async move { me.transfer(lease).await });
                                in_flight.insert(h.id(), l);
                            }
                        }
                    }
                    Err(e) => tracing::warn!(message = "Cannot list held leases.", error = %e),
                }
            }
            let free = self.max_in_flight.saturating_sub(sends.len() as u32);
            if free == 0 || work.iter().all(|w| w.finished) {
                continue;
            }
            if lease_backoff.waiting() {
                continue;
            }
            // Not interrupted by `stop`: leases the coordinator granted must be known here, to be
            // sent or released, or they would sit until they expire.
            let leased = self.control.lease(free).await;
            match leased {
                Ok(leases) => {
                    lease_backoff.succeeded();
                    for l in leases {
                        let me = self.clone();
                        let lease = l.clone();
                        let h = sends.spawn(async move { me.transfer(lease).await });
                        in_flight.insert(h.id(), l);
                    }
                }
                Err(e) => {
                    // The coordinator may have granted leases whose answer was lost.
                    reconcile = true;
                    let (first, delay) = lease_backoff.failed();
                    if first {
                        tracing::warn!(message = "Lease request failed; retrying with backoff.", error = %e);
                    } else {
                        tracing::debug!(message = "Lease request failed again.", retry_in_ms = delay.as_millis() as u64, error = %e);
                    }
                }
            }
        }
        sends.shutdown().await;
        for h in scans.values() {
            h.abort();
        }
        // Release the abandoned leases together, within a bound that fits systemd's stop timeout.
        let releases = in_flight.values().map(|l| {
            self.control.report(
                Role::Source,
                l.migration_id,
                l.segment_id,
                l.epoch,
                Err(Failure::later("source agent shut down")),
            )
        });
        let released =
            tokio::time::timeout(Duration::from_secs(5), futures::future::join_all(releases)).await;
        if !matches!(&released, Ok(r) if r.iter().all(|r| r.is_ok())) {
            tracing::info!(
                message = "Some leases could not be released at shutdown; they will expire."
            );
        }
        self.endpoint.close(0u32.into(), b"agent shutting down");
    }

    /// Where a migration's manifest lives: under the cluster's id and the migration's uuid,
    /// which no other cluster or migration shares (ids restart at 1 in a new cluster).
    fn migration_dir(&self, w: &SourceWork) -> Result<PathBuf, String> {
        let cluster = self.control.cluster_id();
        for (what, id) in [
            ("cluster id", &cluster),
            ("migration uuid", &w.migration_uuid),
        ] {
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(format!(
                    "the coordinator gave no usable {what} ({id:?}); upgrade the coordinator"
                ));
            }
        }
        Ok(cluster_dir(&self.state_dir, &cluster)
            .join("migrations")
            .join(&w.migration_uuid))
    }

    /// Makes the migration's manifest available: loads a completed scan, or scans afresh.
    fn prepare(&self, w: &SourceWork, stop: watch::Receiver<bool>) {
        let rt = tokio::runtime::Handle::current();
        let mid = w.migration_id;
        let result = (|| -> Result<(), String> {
            let dir = self.migration_dir(w)?;
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
                    .insert(mid, (w.migration_uuid.clone(), m.clone()));
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
            tracing::error!(message = "Cannot prepare migration; will retry.", migration = mid, error = %e);
            self.manifests.lock().expect("not poisoned").remove(&mid);
            self.retry_at
                .lock()
                .expect("not poisoned")
                .insert(mid, Instant::now() + PREPARE_RETRY);
            let msg = format!("source {}: {e}", self.control.agent());
            if let Err(e) = rt.block_on(self.control.report_problem(mid, &msg, &[])) {
                tracing::warn!(message = "Could not report the problem to the coordinator.", error = %e);
            }
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
            .insert(mid, (w.migration_uuid.clone(), live));
        let mut planner = SegmentPlanner::new(w.segment_size.max(1));
        let mut summary = ScanSummary::default();
        let mut batch: Vec<SegmentSummary> = Vec::new();
        let flush =
            |writer: &mut ManifestWriter, batch: &mut Vec<SegmentSummary>| -> Result<(), String> {
                writer.sync().map_err(|e| e.to_string())?;
                if !batch.is_empty() {
                    retry(rt, stop, || self.control.register_segments(mid, batch))?;
                    batch.clear();
                }
                Ok(())
            };
        let excludes = ferry_common::exclude::Excludes::new(&w.excludes)
            .map_err(|e| format!("cannot use the migration's excludes: {e}"))?;
        let walked = walk(&root, &excludes, |item| -> Result<(), String> {
            if *stop.borrow() {
                return Err("agent shutting down".into());
            }
            match item {
                Walked::Entry(e) => {
                    if e.kind == EntryKind::Hardlink {
                        summary.hardlinks += 1;
                    }
                    for seg in planner.push(e) {
                        batch.push(writer.append(&seg).map_err(|e| e.to_string())?);
                        summary.segments_total += 1;
                    }
                    if batch.len() >= REGISTER_BATCH {
                        flush(&mut writer, &mut batch)?;
                    }
                }
                Walked::Excluded => summary.excluded += 1,
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
                summary.root_error = root_err.reason.clone();
                tracing::error!(message = "Source path cannot be scanned.", migration = mid, error = %root_err);
            }
        }
        if let Some(seg) = planner.finish() {
            batch.push(writer.append(&seg).map_err(|e| e.to_string())?);
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

    /// Renews `leases` in the background (one `RenewLeases` call); a lease that is no longer
    /// ours is only logged: its transfer will be refused by the target.
    fn renew(&self, leases: Vec<Lease>) -> tokio::task::JoinHandle<()> {
        let control = self.control.clone();
        tokio::spawn(async move {
            match control.renew_leases(&leases).await {
                Ok(renewed) => {
                    for (l, ok) in leases.iter().zip(renewed) {
                        if !ok {
                            tracing::debug!(
                                message = "Lease no longer ours; its transfer will be refused.",
                                migration = l.migration_id,
                                segment = l.segment_id
                            );
                        }
                    }
                }
                Err(e) => tracing::warn!(message = "Lease renewal failed.", error = %e),
            }
        })
    }

    /// Sends one leased segment and reports the outcome. How soon a failed segment is tried
    /// again, and when it is given up on, is the coordinator's decision (its backoff and the
    /// migration's max attempts); this end only logs the first failure loudly.
    async fn transfer(self: Arc<Self>, lease: Lease) {
        let (mid, sid, epoch) = (lease.migration_id, lease.segment_id, lease.epoch);
        let result = self.send(&lease).await;
        if let Err(f) = &result {
            Stats::add(&self.stats.segments_failed, 1);
            if f.retry_later || lease.attempts > 0 {
                tracing::debug!(message = "Segment transfer failed.", migration = mid, segment = sid, attempts = lease.attempts, retry_later = f.retry_later, error = %f);
            } else {
                tracing::warn!(message = "Segment transfer failed.", migration = mid, segment = sid, error = %f);
            }
        }
        // A report lost to a coordinator restart or leader change is retried (with exponential
        // backoff and jitter, for up to REPORT_RETRY_FOR): the segment would otherwise sit
        // leased until its lease expires. Reports are idempotent per epoch.
        let backoff = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .with_jitter()
            .without_max_times()
            .with_total_delay(Some(REPORT_RETRY_FOR));
        let outcome = (|| {
            self.control
                .report(Role::Source, mid, sid, epoch, result.clone())
        })
        .retry(backoff)
        .when(|e| e.is_transient())
        .notify(|e, delay| {
            tracing::debug!(message = "Report failed; retrying.", segment = sid, delay_ms = delay.as_millis() as u64, error = %e)
        })
        .await;
        match outcome {
            Ok(r) if r.outcome == "verified" => Stats::add(&self.stats.segments_verified, 1),
            Ok(r) if r.outcome == "gave up" => {
                tracing::warn!(message = "Segment given up on after its last allowed attempt.", migration = mid, segment = sid, attempts = lease.attempts + 1, error = %r.reason)
            }
            Ok(r) => {
                tracing::debug!(message = "Segment not verified.", segment = sid, outcome = %r.outcome, reason = %r.reason)
            }
            Err(e) => {
                tracing::warn!(message = "Could not report segment; its lease will expire.", segment = sid, error = %e)
            }
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

    /// Sends one leased segment; returns its hash once the target acknowledged it. A failure
    /// says whether it is the segment's (its files cannot be read, the target cannot write
    /// them) or not (the manifest is not loaded yet, the target cannot be reached).
    async fn send(&self, lease: &Lease) -> Result<[u8; 32], Failure> {
        let (mid, sid) = (lease.migration_id, lease.segment_id);
        let manifest = self
            .manifests
            .lock()
            .expect("not poisoned")
            .get(&mid)
            .map(|(_, m)| m.clone())
            .ok_or_else(|| {
                Failure::later(format!("manifest of migration {mid} is not loaded yet"))
            })?;
        let root = self
            .roots
            .lock()
            .expect("not poisoned")
            .get(&mid)
            .cloned()
            .ok_or_else(|| Failure::later(format!("source root of migration {mid} unknown")))?;
        let scanned =
            block_in_place(|| manifest.read(sid)).map_err(|e| Failure::counted(e.to_string()))?;
        let (mut entries, expect, vanished) = block_in_place(|| current_entries(&root, scanned));
        block_in_place(|| find_holes(&root, &mut entries, &expect)).map_err(Failure::counted)?;
        if self
            .with_xattrs
            .lock()
            .expect("not poisoned")
            .contains(&mid)
        {
            block_in_place(|| read_xattrs(&root, &mut entries)).map_err(Failure::counted)?;
        }
        let conn = self
            .connect(&lease.target_agent, &lease.target_addr)
            .await
            .map_err(Failure::later)?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| {
            Failure::later(format!(
                "cannot open a stream to {}: {e}",
                lease.target_agent
            ))
        })?;
        let header = pb::SegmentHeader {
            migration_id: mid,
            segment_id: sid,
            epoch: lease.epoch,
            entries: entries.iter().map(pb::Entry::from).collect(),
        };
        let holes = entries.iter().map(|e| e.len - e.wire_len()).sum();
        Stats::add(&self.stats.hole_bytes, holes);
        let written = async {
            frame::write(&mut send, &header)
                .await
                .map_err(|e| SendFail::Stream(e.to_string()))?;
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; BUF];
            for (e, expect) in entries.iter().zip(&expect) {
                let Some(expect) = expect else { continue };
                self.stream_piece(&root, e, expect, &mut hasher, &mut buf, &mut send)
                    .await?;
            }
            let hash = *hasher.finalize().as_bytes();
            frame::write(
                &mut send,
                &pb::SegmentTrailer {
                    blake3: hash.to_vec(),
                },
            )
            .await
            .map_err(|e| SendFail::Stream(e.to_string()))?;
            send.finish().map_err(|e| SendFail::Stream(e.to_string()))?;
            Ok(hash)
        }
        .await;
        let hash = match written {
            Ok(h) => h,
            Err(SendFail::Segment(why)) => {
                let _ = send.reset(1u32.into());
                return Err(Failure::counted(why));
            }
            Err(SendFail::Stream(why)) => {
                // The target stopped reading, or the connection went: the target's ack says
                // why if it had a reason (a full disk); otherwise a lost connection is not the
                // segment's failure, and anything else is.
                let ack = tokio::time::timeout(
                    ACK_AFTER_FAILURE,
                    frame::read::<pb::SegmentAck>(&mut recv, MAX_SMALL_FRAME),
                )
                .await;
                return Err(match ack {
                    Ok(Ok(ack)) if !ack.ok => refused(&lease.target_agent, ack),
                    _ => stream_failure(&conn, &lease.target_agent, why),
                });
            }
        };
        let ack: pb::SegmentAck = frame::read(&mut recv, MAX_SMALL_FRAME).await.map_err(|e| {
            stream_failure(
                &conn,
                &lease.target_agent,
                format!("no ack from target: {e}"),
            )
        })?;
        if !ack.ok {
            return Err(refused(&lease.target_agent, ack));
        }
        if !vanished.is_empty() {
            // Files deleted since the scan are not at the target: the operator must see them.
            if let Err(e) = self.control.report_problem(mid, "", &vanished).await {
                tracing::warn!(message = "Could not report vanished files.", migration = mid, error = %e);
            }
        }
        Ok(hash)
    }

    /// Streams one file piece, checking that the file is the one expected and did not change while
    /// being read (invariant 3: a torn read is never reported as a good hash).
    async fn stream_piece(
        &self,
        root: &Path,
        e: &Entry,
        expect: &FileId,
        hasher: &mut blake3::Hasher,
        buf: &mut [u8],
        send: &mut quinn::SendStream,
    ) -> Result<(), SendFail> {
        let path = root.join(&e.path);
        let file = block_in_place(|| File::open(&path))
            .map_err(|err| format!("cannot open {}: {err}", path.display()))?;
        let unchanged = |f: &File| -> Result<(), String> {
            let m = f
                .metadata()
                .map_err(|err| format!("cannot stat {}: {err}", path.display()))?;
            if !m.is_file() {
                return Err(format!(
                    "{} is no longer a regular file (it was when scanned); restore it, or copy \
                     it in a later sync round",
                    path.display()
                ));
            }
            if !expect.matches(&m) {
                return Err(if e.chunk_count > 1 {
                    format!(
                        "{} changed since it was scanned; a file split over several segments must \
                         not change during the bulk copy (stop its writer, or copy it in a later \
                         sync round)",
                        path.display()
                    )
                } else {
                    format!(
                        "{} changed while being read; it will be resent",
                        path.display()
                    )
                });
            }
            Ok(())
        };
        unchanged(&file)?;
        // A sparse piece sends its data runs only; the holes between them never cross the wire.
        let dense = [(e.offset, e.len)];
        let runs = e.data_runs.as_deref().unwrap_or(&dense);
        for &(start, len) in runs {
            let mut off = start;
            let end = start + len;
            while off < end {
                let n = ((end - off) as usize).min(buf.len());
                block_in_place(|| file.read_exact_at(&mut buf[..n], off))
                    .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
                hasher.update(&buf[..n]);
                send.write_all(&buf[..n])
                    .await
                    .map_err(|err| SendFail::Stream(format!("stream write failed: {err}")))?;
                Stats::add(&self.stats.bytes_sent, n as u64);
                off += n as u64;
            }
        }
        Ok(unchanged(&file)?)
    }
}

/// When to try a failing call again: exponential backoff with jitter (backon), reset by a
/// success. For loops that must not block on the wait (the source's main loop ticks on).
struct Backoff {
    builder: backon::ExponentialBuilder,
    delays: Option<backon::ExponentialBackoff>,
    next_at: Option<Instant>,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            builder: backon::ExponentialBuilder::default()
                .with_min_delay(min)
                .with_max_delay(max)
                .with_jitter()
                .without_max_times(),
            delays: None,
            next_at: None,
        }
    }

    /// Whether the last failure's delay has not passed yet.
    fn waiting(&self) -> bool {
        self.next_at.is_some_and(|t| Instant::now() < t)
    }

    /// Records a failure; returns whether it is the first since the last success, and how long
    /// to wait before the next try.
    fn failed(&mut self) -> (bool, Duration) {
        use backon::BackoffBuilder;
        let first = self.delays.is_none();
        let delay = self
            .delays
            .get_or_insert_with(|| self.builder.build())
            .next()
            .unwrap_or(Duration::from_secs(10));
        self.next_at = Some(Instant::now() + delay);
        (first, delay)
    }

    /// Records a success: the next failure starts from the shortest delay again.
    fn succeeded(&mut self) {
        self.delays = None;
        self.next_at = None;
    }
}

/// How writing a segment to its stream failed.
enum SendFail {
    /// Reading the source failed, or a file changed: the segment's own failure.
    Segment(String),
    /// The stream to the target failed: the target may say why in its ack.
    Stream(String),
}

impl From<String> for SendFail {
    fn from(why: String) -> Self {
        SendFail::Segment(why)
    }
}

/// The failure a target's refusal stands for: the target's own words, and whether it counts.
fn refused(target: &str, ack: pb::SegmentAck) -> Failure {
    Failure {
        error: format!("target {target} refused the segment: {}", ack.error),
        retry_later: ack.retry_later,
    }
}

/// A stream to `target` failed without a reason from the target: not the segment's failure if
/// the connection is gone (the target restarted, the network failed), the segment's otherwise.
fn stream_failure(conn: &quinn::Connection, target: &str, why: String) -> Failure {
    match conn.close_reason() {
        Some(reason) => Failure::later(format!(
            "connection to target {target} lost ({reason}): {why}"
        )),
        None => Failure::counted(why),
    }
}

/// Where an agent keeps its state of one cluster (`<state_dir>/clusters/<cluster id>`).
pub fn cluster_dir(state_dir: &Path, cluster: &str) -> PathBuf {
    state_dir.join("clusters").join(cluster)
}

/// What a file must still look like for its bytes to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    /// Checked for whole files (stat'ed at send time); `None` for pieces, whose identity is the
    /// scan's (the manifest has no ctime).
    ctime: Option<(i64, i64)>,
    /// The file may have holes (fewer blocks allocated than its size; always assumed for
    /// pieces, which are not stat'ed here): only then are its data runs looked for, which
    /// saves an open per small file.
    may_be_sparse: bool,
}

impl FileId {
    fn of(m: &std::fs::Metadata) -> Self {
        FileId {
            ino: m.ino(),
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: Some((m.ctime(), m.ctime_nsec())),
            may_be_sparse: m.blocks().saturating_mul(512) < m.len(),
        }
    }

    fn matches(&self, m: &std::fs::Metadata) -> bool {
        let now = FileId::of(m);
        now.ino == self.ino
            && now.size == self.size
            && now.mtime == self.mtime
            && (self.ctime.is_none() || now.ctime == self.ctime)
    }
}

/// What to send for a segment: entries, what each file must look like (`None`: no bytes), and
/// paths left out because they vanished since the scan.
type SendPlan = (Vec<Entry>, Vec<Option<FileId>>, Vec<(String, String)>);

/// The entries to send for a scanned segment, with what each file must look like.
///
/// Whole files are described as they are now, not as scanned: a small file modified since the
/// scan is sent in its current version, and one deleted since is left out and returned as an
/// issue. Pieces of split files must still be the scanned file.
fn current_entries(root: &Path, scanned: Vec<Entry>) -> SendPlan {
    let mut entries = Vec::with_capacity(scanned.len());
    let mut expect = Vec::with_capacity(scanned.len());
    let mut vanished = Vec::new();
    for mut e in scanned {
        if e.kind != EntryKind::File {
            entries.push(e);
            expect.push(None);
            continue;
        }
        if e.chunk_count > 1 {
            expect.push((e.len > 0).then_some(FileId {
                ino: e.inode,
                size: e.file_size,
                mtime: (e.mtime_sec, e.mtime_nsec as i64),
                ctime: None,
                may_be_sparse: true,
            }));
            entries.push(e);
            continue;
        }
        match std::fs::symlink_metadata(root.join(&e.path)) {
            Ok(m) if m.is_file() => {
                e.file_size = m.len();
                e.len = m.len();
                e.mode = m.mode() & 0o7777;
                e.mtime_sec = m.mtime();
                e.mtime_nsec = m.mtime_nsec() as u32;
                e.inode = m.ino();
                e.uid = m.uid();
                e.gid = m.gid();
                expect.push((e.len > 0).then(|| FileId::of(&m)));
                entries.push(e);
            }
            Ok(_) => vanished.push((
                display(&e.path),
                "no longer a regular file at copy time".into(),
            )),
            Err(err) => vanished.push((display(&e.path), format!("gone at copy time: {err}"))),
        }
    }
    (entries, expect, vanished)
}

/// Finds the data runs of every sparse file piece about to be sent (`expect` is `Some` for the
/// entries whose bytes are read). The identity checks around the read catch a file that changes
/// after this.
fn find_holes(root: &Path, entries: &mut [Entry], expect: &[Option<FileId>]) -> Result<(), String> {
    for (e, expect) in entries.iter_mut().zip(expect) {
        if !expect.is_some_and(|x| x.may_be_sparse) {
            continue;
        }
        let path = root.join(&e.path);
        let file =
            File::open(&path).map_err(|err| format!("cannot open {}: {err}", path.display()))?;
        e.data_runs = crate::holes::data_runs(&file, e.offset, e.len)
            .map_err(|err| format!("cannot find the holes of {}: {err}", path.display()))?;
    }
    Ok(())
}

/// Reads the extended attributes of every entry but hardlinks (which share their file's), within
/// a budget per segment that keeps its header far below the receiver's frame limit.
fn read_xattrs(root: &Path, entries: &mut [Entry]) -> Result<(), String> {
    let mut total = 0;
    for e in entries.iter_mut().filter(|e| e.kind != EntryKind::Hardlink) {
        let path = root.join(&e.path);
        e.xattrs = crate::xattr::read(&path).map_err(|err| {
            format!(
                "cannot read the extended attributes of {}: {err}",
                display(&path)
            )
        })?;
        total += e
            .xattrs
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .sum::<usize>();
        if total > crate::xattr::MAX_PER_SEGMENT {
            return Err(format!(
                "extended attributes of the files of this segment exceed {} bytes (the last \
                 read: {}); ferry cannot carry them",
                crate::xattr::MAX_PER_SEGMENT,
                display(&path)
            ));
        }
    }
    Ok(())
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
    let mut first = true;
    loop {
        match rt.block_on(f()) {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && !*stop.borrow() => {
                if std::mem::take(&mut first) {
                    tracing::warn!(message = "Coordinator call failed; retrying.", error = %e);
                } else {
                    tracing::debug!(message = "Coordinator call failed again; retrying.", error = %e);
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scanned(root: &Path, rel: &str) -> Entry {
        let m = std::fs::metadata(root.join(rel)).unwrap();
        Entry::file(
            rel,
            m.len(),
            0o644,
            (m.mtime(), m.mtime_nsec() as u32),
            m.ino(),
        )
    }

    #[test]
    fn whole_files_are_sent_as_they_are_now_and_vanished_ones_reported() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), b"old").unwrap();
        std::fs::write(d.path().join("gone"), b"x").unwrap();
        let entries = vec![
            scanned(d.path(), "a"),
            scanned(d.path(), "gone"),
            Entry::dir("dir", 0o755, (1, 0)),
        ];
        std::fs::write(d.path().join("a"), b"newer").unwrap();
        std::fs::remove_file(d.path().join("gone")).unwrap();
        let (sent, expect, vanished) = current_entries(d.path(), entries);
        assert_eq!(sent.len(), 2);
        assert_eq!((sent[0].path.as_path(), sent[0].len), (Path::new("a"), 5));
        assert!(expect[0].is_some() && expect[1].is_none());
        assert_eq!(vanished.len(), 1);
        assert_eq!(vanished[0].0, "gone");
    }

    #[test]
    fn a_write_during_the_read_is_detected() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"0123456789").unwrap();
        let id = FileId::of(&std::fs::metadata(&p).unwrap());
        assert!(id.matches(&std::fs::metadata(&p).unwrap()));
        // Same size, same mtime restored by the writer: ctime still gives it away.
        let before = std::fs::metadata(&p).unwrap();
        std::fs::write(&p, b"9876543210").unwrap();
        let t = filetime::FileTime::from_last_modification_time(&before);
        filetime::set_file_mtime(&p, t).unwrap();
        let after = std::fs::metadata(&p).unwrap();
        assert_eq!(after.mtime_nsec(), before.mtime_nsec());
        assert!(
            !id.matches(&after),
            "rewrite with restored mtime not detected"
        );
    }

    #[test]
    fn the_lease_backoff_grows_to_its_cap_and_a_success_resets_it() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        assert!(!b.waiting());
        let (first, d1) = b.failed();
        assert!(first && d1 <= Duration::from_millis(200), "{d1:?}");
        assert!(b.waiting());
        let mut last = d1;
        for _ in 0..10 {
            let (first, d) = b.failed();
            assert!(!first);
            // Jitter adds up to one delay: never more than twice the cap.
            assert!(d <= Duration::from_secs(4), "{d:?}");
            last = d;
        }
        assert!(last >= Duration::from_secs(2), "grew to the cap: {last:?}");
        b.succeeded();
        assert!(!b.waiting());
        assert!(b.failed().0, "a success starts over");
    }

    #[test]
    fn pieces_of_split_files_must_be_the_scanned_file() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("big"), vec![1u8; 300]).unwrap();
        let mut e = scanned(d.path(), "big");
        e.len = 100;
        e.chunk_count = 3;
        let (_, expect, _) = current_entries(d.path(), vec![e]);
        let id = expect[0].expect("a piece with bytes has an identity");
        assert_eq!(id.ctime, None);
        std::fs::write(d.path().join("big"), vec![1u8; 301]).unwrap();
        assert!(!id.matches(&std::fs::metadata(d.path().join("big")).unwrap()));
    }
}
