//! The source side: scans assigned migrations into a local manifest, registers segments, leases
//! them and streams each to its target, hashing while it reads.
//!
//! What to do when is decided by [`SourceSchedule`] (pure); [`Source::run`] performs it through
//! two seams, the coordinator ([`Coordinator`]) and the dialer of targets ([`Dialer`]), so the
//! whole source runs in tests against in-memory fakes.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::segment::{Entry, EntryKind, SegmentPlanner};
use backon::Retryable;
use ferry_common::path::display;
use ferry_common::retry;
use ferry_proto::control::{Lease, ReportOutcome, Role, SourceWork};
use ferry_proto::data as pb;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::task::{block_in_place, JoinSet};

use crate::blocks::{self, BlockStore};
use crate::catalog::{CatalogReader, CatalogWriter, Change, Differ};
use crate::control::{Assigned, ControlError, Coordinator, Failure};
use crate::cutover::CutoverRunner;
use crate::dial::{Connection, DialError, Dialer, SendHalf};
use crate::frame::{self, FrameError, MAX_SMALL_FRAME};
use crate::manifest::{
    self, Manifest, ManifestError, ManifestWriter, ScanSummary, SegmentSummary, MAX_ISSUES_KEPT,
};
use crate::objsource::{is_store_url, Opened, StoreSources};
use crate::scan::{walk, Walked};
use crate::schedule::{Action, LeaseKey, SourceSchedule, TICK};
use crate::stats::Stats;
use crate::throttle::{Scope, Throttles};
use futures::TryStreamExt;
use object_store::ObjectStore;

/// Segments registered with the coordinator per call, at most.
const REGISTER_BATCH: usize = 1000;

/// A scan registers the segments it has planned at least this often, so that transfers start
/// while a long scan goes on: a tree of a million small files is about a thousand bundles, one
/// batch, which would otherwise wait for the end of a scan of many seconds.
const REGISTER_EVERY: Duration = Duration::from_millis(500);

/// Whether a scan holding `pending` planned segments, the last registered `since` ago,
/// registers them now.
fn register_now(pending: usize, since: Duration) -> bool {
    pending >= REGISTER_BATCH || (pending > 0 && since >= REGISTER_EVERY)
}
/// Read buffer per segment in flight: bounds memory whatever the file sizes.
const BUF: usize = 1024 * 1024;
/// How long a source keeps retrying a segment report the coordinator did not answer.
const REPORT_RETRY_FOR: Duration = Duration::from_secs(60);
/// How long a source waits for the target's ack after its stream to the target failed: the
/// target sends why (a full disk) before it stops reading.
const ACK_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// How long a stopping source waits for its leases to be released and its scans to notice the
/// stop: within systemd's stop timeout.
const STOP_WITHIN: Duration = Duration::from_secs(5);

/// Why a migration's manifest could not be prepared (loaded, or scanned and registered). The
/// source tries again after [`crate::schedule::PREPARE_RETRY`], and shows the error in the
/// migration's status.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The coordinator sent an id that cannot name a directory: upgrade the coordinator.
    #[error("the coordinator gave no usable {what} ({id:?}); upgrade the coordinator")]
    BadId {
        /// Which id.
        what: &'static str,
        /// What it was.
        id: String,
    },
    /// The state directory cannot be written.
    #[error("cannot create {}: {source}", path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The manifest or the scan summary cannot be read or written.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The coordinator holds a complete scan that this agent has lost: start a new migration.
    #[error(
        "the coordinator has a complete scan of migration {mid} but {} holds none; this agent's \
         state directory was lost — start a new migration",
        dir.display()
    )]
    Lost {
        /// The migration.
        mid: u64,
        /// Where its manifest should be.
        dir: PathBuf,
    },
    /// A sync round needs the previous round's catalog, and this agent has none.
    #[error(
        "round {round} of migration {mid} compares with the previous round's catalog {}, which \
         is missing (this agent's state directory was lost or is older than sync rounds); start \
         a new migration",
        path.display()
    )]
    NoCatalog {
        /// The migration.
        mid: u64,
        /// The round that needs it.
        round: u32,
        /// Where it should be.
        path: PathBuf,
    },
    /// A fallback's first round needs the tree the target held at the switch, and this agent
    /// has not recorded it.
    #[error(
        "migration {mid} is a fallback: its first round compares with the tree this agent held \
         when the migration it falls back from switched ({}), which is missing (its state \
         directory was lost, or the switch predates this version); create a plain migration \
         in reverse instead, which copies everything",
        path.display()
    )]
    NoBaseline {
        /// The migration.
        mid: u64,
        /// Where the catalog should be.
        path: PathBuf,
    },
    /// The migration's excludes are not valid patterns.
    #[error("cannot use the migration's excludes: {0}")]
    Excludes(#[from] ferry_common::exclude::ExcludeError),
    /// A coordinator call failed for good (or while the agent stops).
    #[error(transparent)]
    Coordinator(#[from] ControlError),
    /// The agent stops.
    #[error("agent shutting down")]
    Stopping,
}

/// Reading a segment's files failed: the segment's own failure, counted toward its attempts.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    /// A file cannot be opened.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file cannot be stat'ed.
    #[error("cannot stat {}: {source}", path.display())]
    Stat {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file became something else since the scan.
    #[error(
        "{} is no longer a regular file (it was when scanned); restore it, or copy it in a later \
         sync round",
        path.display()
    )]
    NotAFile { path: PathBuf },
    /// A file split over several segments changed: its pieces would not fit together.
    #[error(
        "{} changed since it was scanned; its pieces would not fit together, so the next round \
         sends it again as it is then",
        path.display()
    )]
    SplitChanged { path: PathBuf },
    /// A whole file changed while being read: sent again in its new version.
    #[error("{} changed while being read; it will be resent", path.display())]
    Changed { path: PathBuf },
    /// The data runs of a sparse file cannot be found.
    #[error("cannot find the holes of {}: {source}", path.display())]
    Holes {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Extended attributes cannot be read.
    #[error("cannot read the extended attributes of {}: {source}", display(path))]
    Xattrs {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The extended attributes of a segment's files are too large to carry.
    #[error(
        "extended attributes of the files of this segment exceed {limit} bytes (the last read: \
         {}); ferry cannot carry them",
        display(path)
    )]
    XattrsTooLarge { limit: usize, path: PathBuf },
    /// An object of a store source cannot be read.
    #[error("cannot read {key} from the object store: {source}")]
    Store {
        key: String,
        source: object_store::Error,
    },
    /// An object of a store source is not the one scanned (size or last-modified differ), or
    /// is gone.
    #[error("{key} changed in the store since it was scanned ({why}); nothing of it was sent")]
    ObjectChanged { key: String, why: String },
}

impl ReadError {
    /// Whether the segment can never be sent as planned (its file changed or went since the
    /// scan): the next round sends what is there then, so retrying this one is pointless.
    fn is_stale(&self) -> bool {
        match self {
            ReadError::SplitChanged { .. }
            | ReadError::NotAFile { .. }
            | ReadError::ObjectChanged { .. } => true,
            ReadError::Open { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            _ => false,
        }
    }
}

impl From<ReadError> for Failure {
    fn from(e: ReadError) -> Self {
        if e.is_stale() {
            Failure::stale(e.to_string())
        } else {
            Failure::counted(e.to_string())
        }
    }
}

/// How writing a segment to its stream failed.
#[derive(Debug, thiserror::Error)]
enum SendFail {
    /// Reading the source failed, or a file changed: the segment's own failure.
    #[error(transparent)]
    Segment(#[from] ReadError),
    /// The stream to the target failed: the target may say why in its ack.
    #[error(transparent)]
    Stream(#[from] FrameError),
}

/// A source agent: `C` is its coordinator, `D` its dialer of targets.
pub struct Source<C: Coordinator, D: Dialer> {
    control: C,
    dialer: D,
    state_dir: PathBuf,
    max_in_flight: u32,
    stats: Arc<Stats>,
    /// Source root per migration.
    roots: Mutex<HashMap<u64, PathBuf>>,
    /// Migrations that carry extended attributes.
    with_xattrs: Mutex<HashSet<u64>>,
    /// Block hashes of each migration's large files, and their block size.
    blocks: Mutex<HashMap<u64, (BlockStore, u64)>>,
    /// Manifests being written or complete, per migration id.
    manifests: Mutex<HashMap<u64, Arc<Manifest>>>,
    /// The agent's and each migration's limits on what is sent.
    throttles: Arc<Throttles>,
    /// Does the cutover steps heartbeats hand out (as a source or a target).
    cutover: Option<Arc<CutoverRunner<C>>>,
    forgetter: Option<Arc<crate::forget::Forgetter>>,
    jobs: Option<Arc<crate::jobs::JobRunner<C>>>,
    /// What is left of [`PREFETCH_TOTAL`], in KiB.
    prefetch_room: Arc<tokio::sync::Semaphore>,
    /// The object stores migrations read from (source paths that are URLs).
    store_sources: StoreSources,
}

/// What the driver's background tasks end with.
enum Done {
    /// A preparation ended, with what its scan's completion leased.
    Prepared(u64, Completed, Result<(), PrepareError>),
    /// A renewal call ended.
    Renewed,
    /// A heartbeat ended.
    Heartbeat(Result<Assigned, ControlError>),
    /// A transfer's report ended.
    Reported,
}

/// How a completing scan asks the driver how many leases to take with its completion: the
/// driver answers with the room the lease calls out leave and counts the completion as a lease
/// call out ([`SourceSchedule::lease_with_scan`]).
type LeaseRoom = tokio::sync::mpsc::UnboundedSender<tokio::sync::oneshot::Sender<u32>>;

/// What a scan's completion leased besides completing.
#[derive(Debug, Default)]
struct Completed {
    /// How many leases it asked for (when more than 0, the driver counted it as a lease call).
    asked: u32,
    /// The leases granted with it.
    leases: Vec<Lease>,
    /// An attempt's answer was lost: the leases it may have granted are not known here.
    lost: bool,
}

/// The leases a source holds: those being sent (one task each) and those leased ahead,
/// waiting for a transfer to end. Leasing ahead ([`lease_ahead`]) hides the lease call's
/// round trip: a transfer that ends hands its slot to a lease already here. With several
/// targets (a migration's pool), a free slot goes to the waiting lease whose target has the
/// fewest transfers running, so no target idles while another's leases wait.
#[derive(Default)]
struct Slots {
    sends: JoinSet<Sent>,
    sending: HashMap<tokio::task::Id, LeaseKey>,
    /// The target of each transfer started (entries of ended ones are dropped at `fill`).
    targets: HashMap<tokio::task::Id, String>,
    queued: std::collections::VecDeque<Lease>,
}

impl Slots {
    /// The waiting lease to start next: the oldest of those whose target has the fewest
    /// transfers running.
    fn next_queued(&mut self) -> Option<Lease> {
        let sending = &self.sending;
        self.targets.retain(|id, _| sending.contains_key(id));
        let mut running: HashMap<&str, usize> = HashMap::new();
        for t in self.targets.values() {
            *running.entry(t.as_str()).or_default() += 1;
        }
        let i = (0..self.queued.len()).min_by_key(|&i| {
            let t = self.queued[i].target_agent.as_str();
            (running.get(t).copied().unwrap_or(0), i)
        })?;
        self.queued.remove(i)
    }
}

/// Leases held beyond `max_in_flight`, waiting for a slot (see [`Slots`]): half as many as
/// the slots, at most 8. A lease names its target's address as it was when granted: one
/// waiting while its target restarts elsewhere fails its dial and is leased again, so few wait.
fn lease_ahead(max_in_flight: u32) -> u32 {
    (max_in_flight / 2).min(8)
}

/// A transfer whose bytes are done (acknowledged by the target, or failed): what its report
/// says. The report is made after its slot is free: a slot is for moving bytes.
struct Sent {
    lease: Lease,
    result: Result<[u8; 32], Failure>,
    /// The target's report verified the segment (it carried this end's hash, sent with the
    /// bytes): nothing is left to report.
    verified: bool,
    started: std::time::Instant,
    sent_ms: u64,
}

impl<C: Coordinator, D: Dialer> Source<C, D> {
    /// A source using `dialer` to reach targets.
    pub fn new(
        control: C,
        dialer: D,
        state_dir: PathBuf,
        max_in_flight: u32,
        stats: Arc<Stats>,
        throttles: Arc<Throttles>,
    ) -> Self {
        Source {
            control,
            dialer,
            state_dir,
            max_in_flight: max_in_flight.max(1),
            stats,
            roots: Mutex::default(),
            with_xattrs: Mutex::default(),
            blocks: Mutex::default(),
            manifests: Mutex::default(),
            throttles,
            cutover: None,
            forgetter: None,
            jobs: None,
            prefetch_room: Arc::new(tokio::sync::Semaphore::new(
                (PREFETCH_TOTAL / 1024) as usize,
            )),
            store_sources: StoreSources::default(),
        }
    }

    /// The same source, reading object-store sources with `settings`.
    pub fn with_store_sources(self, settings: crate::objsource::SourceStoreSettings) -> Self {
        Source {
            store_sources: StoreSources::new(settings),
            ..self
        }
    }

    /// The store a migration's source root names, when it names one.
    fn store_of(&self, root: &Path) -> Result<Option<Arc<Opened>>, String> {
        match root.to_str() {
            Some(url) if is_store_url(url) => self.store_sources.open(url).map(Some),
            _ => Ok(None),
        }
    }

    /// The same source, doing the cutover steps heartbeats hand this agent with `runner`.
    pub fn with_cutover(self, runner: Arc<CutoverRunner<C>>) -> Self {
        Source {
            cutover: Some(runner),
            ..self
        }
    }

    /// The same source, running the jobs heartbeats hand this agent with `runner`.
    pub fn with_jobs(self, runner: Arc<crate::jobs::JobRunner<C>>) -> Self {
        Source {
            jobs: Some(runner),
            ..self
        }
    }

    /// The same source, removing what it keeps of deleted migrations with `forgetter`.
    pub fn with_forgetter(self, forgetter: Arc<crate::forget::Forgetter>) -> Self {
        Source {
            forgetter: Some(forgetter),
            ..self
        }
    }

    /// Heartbeats, scans and sends until `stop` turns true, as [`SourceSchedule`] decides.
    /// In-flight segments are then abandoned and reported as failed (not counted), so their
    /// leases return at once instead of at expiry; every task it started has ended when it
    /// returns (a scan that does not notice the stop within [`STOP_WITHIN`] is left to end).
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let now = || tokio::time::Instant::now().into_std();
        // The schedule asks for leases up to the transfers plus those leased ahead.
        let mut schedule =
            SourceSchedule::new(now(), self.max_in_flight + lease_ahead(self.max_in_flight));
        // Transfers, by task, so one that panics still frees its place; leases leased ahead.
        let mut slots = Slots::default();
        // Scans (blocking threads), renewal calls, heartbeats and reports.
        let mut background: JoinSet<Done> = JoinSet::new();
        // The lease call out, if any.
        let mut lease_calls: JoinSet<Result<(u32, Vec<Lease>), ControlError>> = JoinSet::new();
        let mut tick = tokio::time::interval(TICK);
        // Completing scans ask here how many leases to take with them.
        let (room, mut room_asked): (LeaseRoom, _) = tokio::sync::mpsc::unbounded_channel();
        // Heartbeats failed in a row: the first is a warning, the rest debug until one succeeds
        // (a coordinator that is down for a minute is one warning, not 120).
        let mut heartbeats_failed = 0u64;
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                Some(done) = slots.sends.join_next_with_id() => {
                    let ended = reap(done, &mut slots.sends, &mut slots.sending, &mut schedule);
                    self.fill(&mut slots);
                    for sent in ended {
                        let me = self.clone();
                        background.spawn(async move {
                            me.report_sent(sent).await;
                            Done::Reported
                        });
                    }
                    // Slots are free: the round below asks for leases at once, not a tick
                    // later.
                }
                Some(done) = background.join_next() => {
                    match done {
                        Ok(Done::Renewed) => schedule.renewal_ended(),
                        Ok(Done::Reported) => {}
                        Ok(Done::Heartbeat(Ok(a))) => {
                            if heartbeats_failed > 0 {
                                tracing::info!(message = "Coordinator answers again.", heartbeats_failed);
                                heartbeats_failed = 0;
                            }
                            tracing::debug!(message = "Heartbeat answered.", rounds = ?a.work.iter().map(|w| (w.migration_id, w.round, w.finished)).collect::<Vec<_>>());
                            self.learn(&a);
                            if let Some(runner) = &self.cutover {
                                runner.handle(&a.cutover);
                            }
                            if let Some(f) = &self.forgetter {
                                f.start(self.control.cluster_id(), a.forget.clone());
                            }
                            if let Some(j) = &self.jobs {
                                j.handle(&a.jobs);
                            }
                            schedule.heartbeat_answered(a.work);
                        }
                        Ok(Done::Heartbeat(Err(e))) => {
                            schedule.heartbeat_failed();
                            heartbeats_failed += 1;
                            if heartbeats_failed == 1 {
                                tracing::warn!(message = "Heartbeat failed; retrying (further failures are logged at debug level until one succeeds).", error = %e);
                            } else {
                                tracing::debug!(message = "Heartbeat failed again.", heartbeats_failed, error = %e);
                            }
                        }
                        Ok(Done::Prepared(mid, completed, Ok(()))) => {
                            schedule.prepared(mid);
                            self.leased_with_scan(&mut schedule, &mut slots, completed, true, now());
                        }
                        Ok(Done::Prepared(mid, completed, Err(e))) => {
                            self.leased_with_scan(&mut schedule, &mut slots, completed, false, now());
                            self.manifests.lock().expect("not poisoned").remove(&mid);
                            schedule.prepare_failed(now(), mid);
                            self.prepare_failed(mid, &e).await;
                        }
                        Err(e) => tracing::error!(message = "A source task failed.", error = %e),
                    }
                    // A migration just prepared is leased from at once.
                }
                Some(leased) = lease_calls.join_next() => match leased {
                    Ok(Ok((asked, leases))) => {
                        schedule.lease_answered(asked, leases.len(), now());
                        self.start_new(&mut schedule, &mut slots, leases);
                    }
                    Ok(Err(e)) => {
                        let (first, delay) = schedule.lease_failed(now());
                        if first {
                            tracing::warn!(message = "Lease request failed; retrying with backoff.", error = %e);
                        } else {
                            tracing::debug!(message = "Lease request failed again.", retry_in_ms = delay.as_millis() as u64, error = %e);
                        }
                    }
                    Err(e) => {
                        schedule.lease_failed(now());
                        tracing::error!(message = "A lease call failed.", error = %e);
                    }
                },
                Some(reply) = room_asked.recv() => {
                    let n = schedule.lease_with_scan(now());
                    if reply.send(n).is_err() && n > 0 {
                        schedule.lease_not_asked(n);
                    }
                }
                _ = tick.tick() => {}
            }
            schedule.start_round();
            while let Some(action) = schedule.next(now()) {
                match action {
                    Action::Heartbeat => {
                        tracing::debug!(message = "Heartbeat sent.");
                        let control = self.control.clone();
                        background.spawn(async move { Done::Heartbeat(control.heartbeat().await) });
                    }
                    Action::Renew(keys) => {
                        let control = self.control.clone();
                        background.spawn(async move {
                            renew(&control, &keys).await;
                            Done::Renewed
                        });
                    }
                    Action::Forget(mid) => {
                        self.manifests.lock().expect("not poisoned").remove(&mid);
                    }
                    Action::Prepare(w) => {
                        let me = self.clone();
                        let stop = stop.clone();
                        let room = room.clone();
                        background.spawn_blocking(move || {
                            let mid = w.migration_id;
                            let mut completed = Completed::default();
                            let r = me.prepare(&w, &stop, &room, &mut completed);
                            Done::Prepared(mid, completed, r)
                        });
                    }
                    Action::ListLeases => match self.control.list_leases().await {
                        Ok(held) => {
                            schedule.listed();
                            for l in held {
                                let key = LeaseKey::from(&l);
                                if schedule.holds(&key) {
                                    continue;
                                }
                                tracing::info!(
                                    message = "Adopting a lease granted earlier.",
                                    migration = l.migration_id,
                                    segment = l.segment_id
                                );
                                self.start(&mut schedule, &mut slots, l);
                            }
                        }
                        Err(e) => tracing::warn!(message = "Cannot list held leases.", error = %e),
                    },
                    // In the background, one at a time: the driver goes on (heartbeats,
                    // transfers ending) while it is out.
                    Action::Lease(n) => {
                        let control = self.control.clone();
                        lease_calls.spawn(async move { control.lease(n).await.map(|l| (n, l)) });
                    }
                }
            }
        }
        // A scan asking for room from here on takes none.
        drop(room_asked);
        slots.sends.shutdown().await;
        // Leases the coordinator granted must be known here, to be released, or they would sit
        // until they expire: a lease call still out is waited for.
        let mut granted: Vec<LeaseKey> = schedule.in_flight().collect();
        if let Ok(Some(Ok(Ok((_, leases))))) =
            tokio::time::timeout(STOP_WITHIN, lease_calls.join_next()).await
        {
            granted.extend(leases.iter().map(LeaseKey::from));
        }
        // Scans check `stop` before each entry; renewals are short calls. A scan that completed
        // meanwhile may have brought leases: they are released with the rest.
        let joined = tokio::time::timeout(STOP_WITHIN, async {
            while let Some(done) = background.join_next().await {
                if let Ok(Done::Prepared(_, completed, _)) = done {
                    granted.extend(completed.leases.iter().map(LeaseKey::from));
                }
            }
        })
        .await;
        if joined.is_err() {
            tracing::warn!(message = "A scan did not stop in time; it ends on its own.");
            background.detach_all();
        }
        // Release the abandoned leases together, within a bound that fits systemd's stop timeout.
        let releases = granted.into_iter().map(|l| {
            self.control.report(
                Role::Source,
                l.migration_id,
                l.segment_id,
                l.epoch,
                Err(Failure::later("source agent shut down")),
            )
        });
        let released = tokio::time::timeout(STOP_WITHIN, futures::future::join_all(releases)).await;
        if !matches!(&released, Ok(r) if r.iter().all(|r| r.is_ok())) {
            tracing::info!(
                message = "Some leases could not be released at shutdown; they will expire."
            );
        }
        self.dialer.close();
    }

    /// Records where each assigned migration reads from, whether it carries xattrs, and the
    /// throttles in force.
    fn learn(&self, assigned: &Assigned) {
        let throttle = |scope: Scope, text: &str| {
            if let Err(e) = self.throttles.set(scope, text) {
                tracing::warn!(message = "Throttle not understood; the previous one stays in force.", scope = ?scope, throttle = text, error = %e);
            }
        };
        throttle(Scope::Agent, &assigned.throttle);
        for w in &assigned.work {
            if w.finished {
                self.throttles.forget(w.migration_id);
                continue;
            }
            throttle(Scope::Migration(w.migration_id), &w.throttle);
            self.roots
                .lock()
                .expect("not poisoned")
                .insert(w.migration_id, PathBuf::from(&w.source_path));
            if let Ok(dir) = self.migration_dir(w) {
                self.blocks.lock().expect("not poisoned").insert(
                    w.migration_id,
                    (
                        BlockStore::new(&dir),
                        blocks::block_size(w.segment_size.max(1)),
                    ),
                );
            }
            if w.xattrs {
                self.with_xattrs
                    .lock()
                    .expect("not poisoned")
                    .insert(w.migration_id);
            }
        }
    }

    /// Accounts, at `now`, for the lease call a scan's completion made (if it asked for
    /// leases) and starts the leases it brought; `prepared`: the preparation succeeded.
    fn leased_with_scan(
        self: &Arc<Self>,
        schedule: &mut SourceSchedule,
        slots: &mut Slots,
        completed: Completed,
        prepared: bool,
        now: std::time::Instant,
    ) {
        if completed.asked == 0 {
            return;
        }
        if completed.lost || !prepared {
            // Leases may have been granted whose answer never came: list them first.
            schedule.scan_lease_failed(completed.asked, now);
            return;
        }
        schedule.scan_leased(completed.asked, completed.leases.len(), now);
        self.start_new(schedule, slots, completed.leases);
    }

    /// Takes on the leases of a call's answer that are not held already.
    fn start_new(
        self: &Arc<Self>,
        schedule: &mut SourceSchedule,
        slots: &mut Slots,
        leases: Vec<Lease>,
    ) {
        for l in leases {
            if !schedule.holds(&LeaseKey::from(&l)) {
                self.start(schedule, slots, l);
            }
        }
    }

    /// Takes on a lease: sends it now if fewer than `max_in_flight` transfers run, else queues
    /// it until one ends (the schedule holds and renews it either way).
    fn start(self: &Arc<Self>, schedule: &mut SourceSchedule, slots: &mut Slots, lease: Lease) {
        schedule.started(LeaseKey::from(&lease), lease.ttl_ms);
        slots.queued.push_back(lease);
        self.fill(slots);
    }

    /// Starts queued leases while fewer than `max_in_flight` transfers run.
    fn fill(self: &Arc<Self>, slots: &mut Slots) {
        while slots.sending.len() < self.max_in_flight as usize {
            let Some(lease) = slots.next_queued() else {
                break;
            };
            let key = LeaseKey::from(&lease);
            let target = lease.target_agent.clone();
            let me = self.clone();
            let h = slots.sends.spawn(async move { me.transfer(lease).await });
            slots.sending.insert(h.id(), key);
            slots.targets.insert(h.id(), target);
        }
    }

    /// Says why a migration cannot be prepared, in the log and in the migration's status.
    async fn prepare_failed(&self, mid: u64, e: &PrepareError) {
        tracing::error!(message = "Cannot prepare migration; will retry.", migration = mid, error = %e);
        let msg = format!("source {}: {e}", self.control.agent());
        if let Err(e) = self.control.report_problem(mid, &msg, &[]).await {
            tracing::warn!(message = "Could not report the problem to the coordinator.", error = %e);
        }
    }

    /// Where a migration's manifest lives: under the cluster's id and the migration's uuid,
    /// which no other cluster or migration shares (ids restart at 1 in a new cluster).
    fn migration_dir(&self, w: &SourceWork) -> Result<PathBuf, PrepareError> {
        migration_state_dir(
            &self.state_dir,
            &self.control.cluster_id(),
            &w.migration_uuid,
        )
        .map_err(|(what, id)| PrepareError::BadId { what, id })
    }

    /// Makes the current round's manifest available: loads a completed scan, or scans afresh.
    /// Runs on a blocking thread.
    fn prepare(
        &self,
        w: &SourceWork,
        stop: &watch::Receiver<bool>,
        room: &LeaseRoom,
        completed: &mut Completed,
    ) -> Result<(), PrepareError> {
        let rt = tokio::runtime::Handle::current();
        let mid = w.migration_id;
        let dir = self.migration_dir(w)?;
        let rdir = round_dir(&dir, w.round);
        std::fs::create_dir_all(&rdir).map_err(|source| PrepareError::StateDir {
            path: rdir.clone(),
            source,
        })?;
        let Some(summary) = manifest::read_summary(&rdir.join("scan.json"))? else {
            if w.scan_complete {
                return Err(PrepareError::Lost { mid, dir: rdir });
            }
            return self.scan(&rt, stop, w, &dir, room, completed);
        };
        let m = Arc::new(Manifest::open(
            &rdir.join("manifest"),
            w.round_first_segment,
        )?);
        self.manifests
            .lock()
            .expect("not poisoned")
            .insert(mid, m.clone());
        if !w.scan_complete {
            // We crashed between finishing the scan and telling the coordinator.
            for batch in m.summaries()?.chunks(REGISTER_BATCH) {
                call_blocking(&rt, stop, || self.control.register_segments(mid, batch))?;
            }
            call_blocking(&rt, stop, || {
                self.control.complete_scan(mid, &summary, &[], 0)
            })?;
        }
        tracing::info!(
            message = "Loaded manifest.",
            migration = mid,
            round = w.round,
            segments = m.len()
        );
        Ok(())
    }

    /// What a fallback's round 0 compares its scan with: the tree this agent held as the target
    /// of migration `baseline_uuid` when that migration switched (its cutover's verification
    /// wrote it), which the old source holds too.
    fn baseline(&self, w: &SourceWork) -> Result<Differ<CatalogReader>, PrepareError> {
        let base = SourceWork {
            migration_uuid: w.baseline_uuid.clone(),
            ..SourceWork::default()
        };
        let path = crate::cutover::switch_catalog(&self.migration_dir(&base)?);
        if !path.exists() {
            return Err(PrepareError::NoBaseline {
                mid: w.migration_id,
                path,
            });
        }
        Ok(Differ::new(
            CatalogReader::open(&path)?,
            HashSet::new(),
            HashSet::new(),
        ))
    }

    /// What a sync round compares its scan with: the previous round's catalog, and the names
    /// that round carried in segments that were not verified (sent again whatever their state).
    fn previous_round(
        &self,
        rt: &tokio::runtime::Handle,
        stop: &watch::Receiver<bool>,
        w: &SourceWork,
        dir: &Path,
    ) -> Result<Differ<CatalogReader>, PrepareError> {
        let mid = w.migration_id;
        let prev = round_dir(dir, w.round.saturating_sub(1));
        let path = prev.join("catalog");
        if !path.exists() {
            return Err(PrepareError::NoCatalog {
                mid,
                round: w.round,
                path,
            });
        }
        let (from, to) = (w.previous_round_first_segment, w.round_first_segment);
        // A round that ended done verified all its segments: one round trip saved.
        let ids = match w.previous_round_done {
            true => Vec::new(),
            false => call_blocking(rt, stop, || self.control.list_unverified(mid, from, to))?,
        };
        let (mut dirty, mut dirty_deletes) = (HashSet::new(), HashSet::new());
        if !ids.is_empty() {
            let m = Manifest::open(&prev.join("manifest"), from)?;
            for id in &ids {
                for e in m.read(*id)? {
                    match e.kind {
                        EntryKind::Delete => dirty_deletes.insert(e.path),
                        _ => dirty.insert(e.path),
                    };
                }
            }
            tracing::info!(
                message = "Sending again what the previous round did not verify.",
                migration = mid,
                segments = ids.len(),
                names = dirty.len() + dirty_deletes.len()
            );
        }
        Ok(Differ::new(
            CatalogReader::open(&path)?,
            dirty,
            dirty_deletes,
        ))
    }

    /// Scans the tree for the current round: everything in round 0, what changed since the
    /// previous round's scan after it. Writes the round's manifest and catalog, registers the
    /// segments as they are planned (sending starts while the scan goes on) and completes
    /// the scan.
    fn scan(
        &self,
        rt: &tokio::runtime::Handle,
        stop: &watch::Receiver<bool>,
        w: &SourceWork,
        dir: &Path,
        room: &LeaseRoom,
        completed: &mut Completed,
    ) -> Result<(), PrepareError> {
        let mid = w.migration_id;
        let root = PathBuf::from(&w.source_path);
        let rdir = round_dir(dir, w.round);
        tracing::info!(message = "Scanning.", migration = mid, round = w.round, root = %root.display());
        let mut differ = match w.round {
            0 if w.baseline_uuid.is_empty() => None,
            0 => Some(self.baseline(w)?),
            _ => Some(self.previous_round(rt, stop, w, dir)?),
        };
        let first = w.round_first_segment;
        let store = BlockStore::new(dir);
        let block_size = blocks::block_size(w.segment_size.max(1));
        let (mut writer, live) = ManifestWriter::create(&rdir.join("manifest"), first)?;
        let mut catalog = CatalogWriter::create(&rdir.join("catalog"))?;
        self.manifests
            .lock()
            .expect("not poisoned")
            .insert(mid, live);
        let mut planner = SegmentPlanner::starting_at(w.segment_size.max(1), first);
        let mut summary = ScanSummary {
            first_segment: first,
            ..ScanSummary::default()
        };
        let mut batch: Vec<SegmentSummary> = Vec::new();
        let registered = std::cell::Cell::new(Instant::now());
        let flush = |writer: &mut ManifestWriter,
                     batch: &mut Vec<SegmentSummary>|
         -> Result<(), PrepareError> {
            writer.sync()?;
            if !batch.is_empty() {
                call_blocking(rt, stop, || self.control.register_segments(mid, batch))?;
                batch.clear();
            }
            registered.set(Instant::now());
            Ok(())
        };
        let mut plan = |e: Entry,
                        writer: &mut ManifestWriter,
                        batch: &mut Vec<SegmentSummary>,
                        summary: &mut ScanSummary|
         -> Result<(), PrepareError> {
            let before = batch.len();
            for seg in planner.push(e) {
                batch.push(writer.append(&seg)?);
                summary.segments_total += 1;
            }
            // The clock is read only when a segment was planned, not for every entry.
            if batch.len() > before && register_now(batch.len(), registered.get().elapsed()) {
                flush(writer, batch)?;
            }
            Ok(())
        };
        let excludes = ferry_common::exclude::Excludes::new(&w.excludes)?;
        let opened = self.store_of(&root);
        let walked = {
            let on_item = |item| -> Result<(), PrepareError> {
                if *stop.borrow() {
                    return Err(PrepareError::Stopping);
                }
                // A name an object store cannot hold is an issue, reported, not a segment failed
                // again and again with everything bundled with it.
                let item = match item {
                    Walked::Entry(e) if w.target_is_store => {
                        let refused = crate::sink::object::key_refusal(&e.path).or_else(|| {
                            (e.kind == EntryKind::Hardlink)
                                .then(|| crate::sink::object::key_refusal(&e.link_target))
                                .flatten()
                        });
                        match refused {
                            Some(why) => Walked::Issue {
                                path: display(&e.path),
                                at: e.path,
                                reason: why.to_string(),
                            },
                            None => Walked::Entry(e),
                        }
                    }
                    other => other,
                };
                match item {
                    Walked::Entry(e) => {
                        if e.kind == EntryKind::Hardlink {
                            summary.hardlinks += 1;
                        }
                        catalog.append(&e)?;
                        let change = match &mut differ {
                            None => Change::Send(e),
                            Some(d) => d.entry(&e)?,
                        };
                        match change {
                            Change::Same => {}
                            Change::Resend(e) => plan(e, &mut writer, &mut batch, &mut summary)?,
                            Change::Send(mut e) => {
                                // A file of several blocks whose blocks were recorded when its
                                // version at the target was sent: only its changed blocks travel
                                // (objects in a store are written whole).
                                if e.kind == EntryKind::File
                                    && !w.target_is_store
                                    && blocks::worth_a_delta(e.file_size, block_size)
                                {
                                    e.delta_base = store
                                        .version(&e.path)
                                        .filter(|(_, bs)| *bs == block_size)
                                        .map(|(v, _)| v);
                                }
                                plan(e, &mut writer, &mut batch, &mut summary)?
                            }
                            Change::Replace(e) => {
                                // In one bundle, in this order: the target removes what it has
                                // there before it writes the new kind.
                                let gone = Entry::delete(&e.path);
                                plan(gone, &mut writer, &mut batch, &mut summary)?;
                                plan(e, &mut writer, &mut batch, &mut summary)?;
                            }
                        }
                    }
                    Walked::Excluded => summary.excluded += 1,
                    Walked::Issue { path, at, reason } => {
                        tracing::warn!(message = "Cannot copy path.", migration = mid, path = %path, reason = %reason);
                        if let Some(d) = &mut differ {
                            d.unreadable(&at)?;
                        }
                        summary.issues_total += 1;
                        if summary.issues.len() < MAX_ISSUES_KEPT {
                            summary.issues.push((path, reason));
                        }
                    }
                }
                Ok(())
            };
            match opened {
                Ok(None) => walk(&root, &excludes, on_item),
                Ok(Some(o)) => crate::objsource::list(rt, &w.source_path, &o, &excludes, on_item),
                Err(reason) => Err(crate::scan::RootError {
                    path: root.clone(),
                    reason: format!("the object store cannot be opened: {reason}"),
                }),
            }
        };
        match walked {
            Ok(r) => {
                r?;
                if let Some(d) = differ {
                    self.plan_deletions(w, d, &mut summary, |e, summary| {
                        plan(e, &mut writer, &mut batch, summary)
                    })?;
                }
            }
            Err(root_err) => {
                // Nothing is deleted: a source root that cannot be read says nothing about
                // what was removed from it.
                summary.issues_total += 1;
                summary
                    .issues
                    .push((w.source_path.clone(), root_err.reason.clone()));
                summary.root_error = root_err.reason.clone();
                tracing::error!(message = "Source path cannot be scanned.", migration = mid, error = %root_err);
            }
        }
        if let Some(seg) = planner.finish() {
            batch.push(writer.append(&seg)?);
            summary.segments_total += 1;
        }
        // The last segments are registered with the completion: one round trip, not two.
        writer.sync()?;
        catalog.finish()?;
        manifest::write_summary(&rdir.join("scan.json"), &summary)?;
        // The completion leases too (one round trip, not two, before the round's first
        // transfers), with the room the driver gives it; a retry asks for none, and
        // says the leases of an attempt whose answer was lost must be listed.
        completed.asked = lease_room(rt, room);
        let attempts = std::cell::Cell::new(0u32);
        let asked = completed.asked;
        let leases = call_blocking(rt, stop, || {
            attempts.set(attempts.get() + 1);
            let max = if attempts.get() == 1 { asked } else { 0 };
            self.control.complete_scan(mid, &summary, &batch, max)
        });
        completed.lost = attempts.get() > 1;
        completed.leases = leases?;
        tracing::info!(
            message = "Scan complete.",
            migration = mid,
            round = w.round,
            segments = summary.segments_total,
            deleted = summary.deleted,
            issues = summary.issues_total
        );
        Ok(())
    }

    /// Plans the deletions a sync round found, unless the migration keeps deleted files or
    /// they are more than its cap allows (then none is made, and the round fails saying so).
    fn plan_deletions(
        &self,
        w: &SourceWork,
        differ: Differ<CatalogReader>,
        summary: &mut ScanSummary,
        mut plan: impl FnMut(Entry, &mut ScanSummary) -> Result<(), PrepareError>,
    ) -> Result<(), PrepareError> {
        let (deleted, names) = differ.finish()?;
        if names == 0 {
            return Ok(());
        }
        if w.keep_deleted {
            tracing::info!(message = "Names removed at the source are kept at the target (the migration keeps deleted files).", migration = w.migration_id, names);
            return Ok(());
        }
        if let Some(cap) = w.max_delete.filter(|&cap| names > cap) {
            let why = format!(
                "round {} would delete {names} names at the target, more than the migration's \
                 --max-delete {cap}; nothing was deleted. Check the source (a missing mount?); \
                 if the deletions are meant, create the migration with a higher cap",
                w.round
            );
            tracing::error!(
                message = "Deletions refused by the cap.",
                migration = w.migration_id,
                names,
                cap
            );
            summary.issues_total += 1;
            summary.issues.push((w.source_path.clone(), why));
            return Ok(());
        }
        summary.deleted = names;
        for path in deleted {
            plan(Entry::delete(path), summary)?;
        }
        Ok(())
    }

    /// Sends one leased segment and reports the outcome. How soon a failed segment is tried
    /// again, and when it is given up on, is the coordinator's decision (its backoff and the
    /// migration's max attempts); this end only logs the first failure loudly.
    async fn transfer(self: Arc<Self>, lease: Lease) -> Sent {
        let (mid, sid) = (lease.migration_id, lease.segment_id);
        let started = std::time::Instant::now();
        let (result, verified) = match self.send(&lease).await {
            Ok((hash, verified)) => (Ok(hash), verified),
            Err(f) => (Err(f), false),
        };
        let sent_ms = started.elapsed().as_millis() as u64;
        if let Err(f) = &result {
            Stats::add(&self.stats.segments_failed, 1);
            if f.retry_later || lease.attempts > 0 {
                tracing::debug!(message = "Segment transfer failed.", migration = mid, segment = sid, attempts = lease.attempts, retry_later = f.retry_later, error = %f);
            } else {
                tracing::warn!(message = "Segment transfer failed.", migration = mid, segment = sid, error = %f);
            }
        }
        Sent {
            lease,
            result,
            verified,
            started,
            sent_ms,
        }
    }

    /// Reports a transfer's outcome to the coordinator.
    async fn report_sent(self: Arc<Self>, sent: Sent) {
        ferry_common::fault_point!("source::after_send");
        let Sent {
            lease,
            result,
            verified,
            started,
            sent_ms,
        } = sent;
        let (mid, sid, epoch) = (lease.migration_id, lease.segment_id, lease.epoch);
        if verified {
            // The target's report carried this end's hash: the coordinator verified the
            // segment before the target acknowledged it.
            Stats::add(&self.stats.segments_verified, 1);
            self.stats
                .segment_seconds
                .0
                .observe(started.elapsed().as_secs_f64());
            tracing::debug!(
                message = "Segment done; verified on the target's report.",
                migration = mid,
                segment = sid,
                sent_ms
            );
            return;
        }
        // A report lost to a coordinator restart or leader change is retried for up to
        // REPORT_RETRY_FOR: the segment would otherwise sit leased until its lease expires.
        // Reports are idempotent per epoch.
        let outcome = (|| {
            self.control
                .report(Role::Source, mid, sid, epoch, result.clone())
        })
        .retry(retry::policy_for(
            Duration::from_millis(100),
            Duration::from_secs(2),
            REPORT_RETRY_FOR,
        ))
        .when(|e| e.is_transient())
        .notify(|e, delay| {
            tracing::debug!(message = "Report failed; retrying.", segment = sid, delay_ms = delay.as_millis() as u64, error = %e)
        })
        .await;
        tracing::debug!(
            message = "Segment done.",
            migration = mid,
            segment = sid,
            sent_ms,
            reported_ms = started.elapsed().as_millis() as u64 - sent_ms,
            ok = result.is_ok()
        );
        match outcome {
            Ok(r) if r.outcome() == ReportOutcome::Verified => {
                Stats::add(&self.stats.segments_verified, 1);
                self.stats
                    .segment_seconds
                    .0
                    .observe(started.elapsed().as_secs_f64());
            }
            Ok(r) if r.outcome() == ReportOutcome::GaveUp => {
                tracing::warn!(message = "Segment given up on after its last allowed attempt.", migration = mid, segment = sid, attempts = lease.attempts + 1, error = %r.reason)
            }
            Ok(r) => {
                tracing::debug!(message = "Segment not verified.", segment = sid, outcome = r.outcome().as_str_name(), reason = %r.reason)
            }
            Err(e) => {
                tracing::warn!(message = "Could not report segment; its lease will expire.", segment = sid, error = %e)
            }
        }
    }

    /// Sends one leased segment; returns its hash once the target acknowledged it, and whether
    /// the target's report (carrying this hash) verified it. A failure says whether it is the
    /// segment's (its files cannot be read, the target cannot write them) or not (the manifest
    /// is not loaded yet, the target cannot be reached).
    async fn send(&self, lease: &Lease) -> Result<([u8; 32], bool), Failure> {
        let (mid, sid) = (lease.migration_id, lease.segment_id);
        let manifest = self
            .manifests
            .lock()
            .expect("not poisoned")
            .get(&mid)
            .cloned()
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
        // A source in an object store: its objects are read as listed, by ranged GETs, with
        // nothing to stat, prefetch, look for holes in, diff or read attributes of.
        let opened = self.store_of(&root).map_err(|e| {
            Failure::counted(format!(
                "the object store {} cannot be opened: {e}",
                root.display()
            ))
        })?;
        let (mut entries, mut expect, vanished) = match &opened {
            None => block_in_place(|| current_entries(&root, scanned)),
            Some(_) => {
                let n = scanned.len();
                (scanned, vec![Some(FileId::LISTED); n], Vec::new())
            }
        };
        let (prefetched, _room, store) = if opened.is_some() {
            (vec![None; entries.len()], None, None)
        } else {
            block_in_place(|| find_holes(&root, &mut entries, &expect)).map_err(Failure::from)?;
            // Prefetched bytes come out of one budget shared by all transfers: a slot that
            // finds it spent streams its files as they are read.
            let wanted: u64 = entries
                .iter()
                .zip(&expect)
                .filter(|(e, x)| prefetchable(e, x, PREFETCH_MAX))
                .map(|(e, _)| e.len)
                .sum::<u64>()
                .min(PREFETCH_PER_SEGMENT);
            let kib = u32::try_from(wanted.div_ceil(1024)).unwrap_or(u32::MAX);
            let room = self.prefetch_room.clone().try_acquire_many_owned(kib).ok();
            let budget = if room.is_some() { wanted } else { 0 };
            let prefetched = block_in_place(|| prefetch(&root, &mut entries, &mut expect, budget));
            let store = self.blocks.lock().expect("not poisoned").get(&mid).cloned();
            (prefetched, room, store)
        };
        let block_size = store.as_ref().map_or(0, |(_, bs)| *bs);
        // Pieces sent as a delta: their blocks are hashed now, and only the changed ones sent.
        let mut piece_blocks: Vec<Vec<[u8; 32]>> = vec![Vec::new(); entries.len()];
        if let Some((store, bs)) = &store {
            block_in_place(|| {
                plan_deltas(&root, store, *bs, &mut entries, &expect, &mut piece_blocks)
            })
            .map_err(Failure::from)?;
        }
        if opened.is_none()
            && self
                .with_xattrs
                .lock()
                .expect("not poisoned")
                .contains(&mid)
        {
            block_in_place(|| read_xattrs(&root, &mut entries)).map_err(Failure::from)?;
        }
        let later = |e: DialError| Failure::later(e.to_string());
        let conn = self
            .dialer
            .connect(&lease.target_agent, &lease.target_addr)
            .await
            .map_err(later)?;
        let (mut send, mut recv) = conn.open().await.map_err(later)?;
        let header = pb::SegmentHeader {
            migration_id: mid,
            segment_id: sid,
            epoch: lease.epoch,
            entries: entries.iter().map(pb::Entry::from).collect(),
        };
        let holes = entries.iter().map(|e| e.len - e.wire_len()).sum();
        Stats::add(&self.stats.hole_bytes, holes);
        let written = async {
            frame::write(&mut send, &header).await?;
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; BUF];
            for (((e, expect), data), blocks) in entries
                .iter()
                .zip(&expect)
                .zip(prefetched)
                .zip(piece_blocks.iter_mut())
            {
                let Some(expect) = expect else { continue };
                match data {
                    Some(data) => {
                        for chunk in data.chunks(BUF) {
                            hasher.update(chunk);
                            self.throttles.take(mid, chunk.len() as u64).await;
                            send.write_all(chunk)
                                .await
                                .map_err(|e| SendFail::Stream(FrameError::Write(e)))?;
                            Stats::add(&self.stats.bytes_sent, chunk.len() as u64);
                        }
                    }
                    None if opened.is_some() => {
                        let o = opened.as_deref().expect("a store source");
                        self.stream_object(mid, o, e, &mut hasher, &mut send)
                            .await?;
                    }
                    None => {
                        let streamed = self
                            .stream_piece(
                                mid,
                                &root,
                                e,
                                expect,
                                &mut hasher,
                                &mut buf,
                                &mut send,
                                block_size,
                            )
                            .await?;
                        if !streamed.is_empty() {
                            *blocks = streamed;
                        }
                    }
                }
            }
            let hash = *hasher.finalize().as_bytes();
            frame::write(
                &mut send,
                &pb::SegmentTrailer {
                    blake3: hash.to_vec(),
                },
            )
            .await?;
            send.finish()
                .map_err(|e| SendFail::Stream(FrameError::Write(e)))?;
            Stats::peak(&self.stats.peak_window, conn.congestion_window());
            Ok::<_, SendFail>(hash)
        }
        .await;
        let hash = match written {
            Ok(h) => h,
            Err(SendFail::Segment(why)) => {
                send.reset(1);
                return Err(Failure::from(why));
            }
            Err(SendFail::Stream(why)) => {
                // The target stopped reading, or the connection went: the target's ack says
                // why if it had a reason (a full disk); otherwise a lost connection is not the
                // segment's failure, and anything else is.
                let ack = tokio::time::timeout(
                    ACK_AFTER_FAILURE,
                    frame::read::<pb::SegmentAck, _>(&mut recv, MAX_SMALL_FRAME),
                )
                .await;
                return Err(match ack {
                    Ok(Ok(ack)) if !ack.ok => refused(&lease.target_agent, ack),
                    _ => stream_failure(&conn, &lease.target_agent, why.to_string()),
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
        if let Some((store, bs)) = &store {
            record_blocks(store, *bs, &entries, &piece_blocks);
        }
        for (path, why) in &vanished {
            // Removed (or re-typed) since the scan: a live source changes, and the next round
            // deletes the name at the target or sends what stands there now.
            tracing::debug!(message = "Not sent: changed since the scan.", migration = mid, path = %path, reason = %why);
        }
        Ok((hash, ack.verified))
    }

    /// Streams one object (or a piece of one) of a store source with one ranged GET, refusing
    /// an object that is not the one listed (size or last-modified time differ).
    async fn stream_object(
        &self,
        mid: u64,
        opened: &Opened,
        e: &Entry,
        hasher: &mut blake3::Hasher,
        send: &mut <D::Conn as Connection>::Send,
    ) -> Result<(), SendFail> {
        if e.len == 0 {
            return Ok(());
        }
        let key = opened
            .key(&e.path)
            .map_err(|why| ReadError::ObjectChanged {
                key: display(&e.path),
                why,
            })?;
        let opts = object_store::GetOptions {
            range: Some(object_store::GetRange::Bounded(e.offset..e.offset + e.len)),
            ..Default::default()
        };
        let got = match opened.store.get_opts(&key, opts).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(ReadError::ObjectChanged {
                    key: key.to_string(),
                    why: "it is gone".into(),
                }
                .into())
            }
            Err(source) => {
                return Err(ReadError::Store {
                    key: key.to_string(),
                    source,
                }
                .into())
            }
        };
        let now = (
            got.meta.size,
            got.meta.last_modified.timestamp(),
            got.meta.last_modified.timestamp_subsec_nanos(),
        );
        if now != (e.file_size, e.mtime_sec, e.mtime_nsec) {
            return Err(ReadError::ObjectChanged {
                key: key.to_string(),
                why: format!(
                    "{} bytes modified at {}.{:09} now, {} bytes modified at {}.{:09} when listed",
                    now.0, now.1, now.2, e.file_size, e.mtime_sec, e.mtime_nsec
                ),
            }
            .into());
        }
        let mut body = got.into_stream();
        let mut read = 0u64;
        loop {
            let chunk = match body.try_next().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(source) => {
                    return Err(ReadError::Store {
                        key: key.to_string(),
                        source,
                    }
                    .into())
                }
            };
            read += chunk.len() as u64;
            if read > e.len {
                break;
            }
            hasher.update(&chunk);
            self.throttles.take(mid, chunk.len() as u64).await;
            send.write_all(&chunk)
                .await
                .map_err(|e| SendFail::Stream(FrameError::Write(e)))?;
            Stats::add(&self.stats.bytes_sent, chunk.len() as u64);
        }
        if read != e.len {
            return Err(ReadError::ObjectChanged {
                key: key.to_string(),
                why: format!("{read} bytes read of {}", e.len),
            }
            .into());
        }
        Ok(())
    }

    /// Streams one file piece, checking that the file is the one expected and did not change while
    /// being read (invariant 3: a torn read is never reported as a good hash).
    #[allow(clippy::too_many_arguments)]
    async fn stream_piece(
        &self,
        mid: u64,
        root: &Path,
        e: &Entry,
        expect: &FileId,
        hasher: &mut blake3::Hasher,
        buf: &mut [u8],
        send: &mut <D::Conn as Connection>::Send,
        block_size: u64,
    ) -> Result<Vec<[u8; 32]>, SendFail> {
        let path = root.join(&e.path);
        let file = block_in_place(|| File::open(&path)).map_err(|source| ReadError::Open {
            path: path.clone(),
            source,
        })?;
        let unchanged = |f: &File| still(f, &path, expect, e.chunk_count > 1);
        unchanged(&file)?;
        // A sparse piece sends its data runs only; the holes between them never cross the wire.
        let dense = [(e.offset, e.len)];
        let runs = e.data_runs.as_deref().unwrap_or(&dense);
        // The block hashes of a dense file of several blocks (or piece of one), for a later
        // round's delta (reads are at most one block and never straddle two: pieces start at
        // multiples of it).
        let mut blocks = (blocks::worth_a_delta(e.file_size, block_size) && e.data_runs.is_none())
            .then(|| (blake3::Hasher::new(), 0u64, Vec::new()));
        for &(start, len) in runs {
            let mut off = start;
            let end = start + len;
            while off < end {
                let n = ((end - off) as usize).min(buf.len());
                block_in_place(|| file.read_exact_at(&mut buf[..n], off)).map_err(|source| {
                    ReadError::Read {
                        path: path.clone(),
                        source,
                    }
                })?;
                hasher.update(&buf[..n]);
                if let Some((h, filled, out)) = &mut blocks {
                    h.update(&buf[..n]);
                    *filled += n as u64;
                    if *filled == block_size || off + n as u64 == end {
                        out.push(*h.finalize().as_bytes());
                        *h = blake3::Hasher::new();
                        *filled = 0;
                    }
                }
                self.throttles.take(mid, n as u64).await;
                send.write_all(&buf[..n])
                    .await
                    .map_err(|e| SendFail::Stream(FrameError::Write(e)))?;
                Stats::add(&self.stats.bytes_sent, n as u64);
                off += n as u64;
            }
        }
        unchanged(&file)?;
        Ok(blocks.map(|(_, _, out)| out).unwrap_or_default())
    }
}

/// Renews `leases` (one `RenewLeases` call); a lease that is no longer ours is only logged: its
/// transfer will be refused by the target.
async fn renew<C: Coordinator>(control: &C, leases: &[LeaseKey]) {
    match control.renew_leases(leases).await {
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
}

/// How many leases a completing scan may ask for (0 when the driver is gone).
fn lease_room(rt: &tokio::runtime::Handle, room: &LeaseRoom) -> u32 {
    let (reply, answer) = tokio::sync::oneshot::channel();
    if room.send(reply).is_err() {
        return 0;
    }
    rt.block_on(answer).unwrap_or(0)
}

/// Runs a coordinator call from a blocking thread, retrying transient failures (the one retry
/// policy) until it succeeds or the agent stops; a stop also ends the wait between tries.
fn call_blocking<T, F, Fut>(
    rt: &tokio::runtime::Handle,
    stop: &watch::Receiver<bool>,
    f: F,
) -> Result<T, PrepareError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ControlError>>,
{
    let mut first = true;
    let call = f
        .retry(retry::policy(
            Duration::from_millis(100),
            Duration::from_secs(5),
        ))
        .when(|e: &ControlError| e.is_transient())
        .notify(|e, _| {
            if std::mem::take(&mut first) {
                tracing::warn!(message = "Coordinator call failed; retrying.", error = %e);
            } else {
                tracing::debug!(message = "Coordinator call failed again; retrying.", error = %e);
            }
        });
    let mut stop = stop.clone();
    rt.block_on(async {
        tokio::select! {
            r = call => Ok(r?),
            _ = stop.wait_for(|stopping| *stopping) => Err(PrepareError::Stopping),
        }
    })
}

/// The failure a target's refusal stands for: the target's own words, and whether it counts.
fn refused(target: &str, ack: pb::SegmentAck) -> Failure {
    Failure {
        error: format!("target {target} refused the segment: {}", ack.error),
        retry_later: ack.retry_later,
        stale: ack.stale,
        permanent: ack.permanent,
    }
}

/// [`refused`], for the target's tests.
#[cfg(test)]
pub(crate) fn refused_for_tests(target: &str, ack: pb::SegmentAck) -> Failure {
    refused(target, ack)
}

/// A stream to `target` failed without a reason from the target: not the segment's failure if
/// the connection is gone (the target restarted, the network failed), the segment's otherwise.
fn stream_failure(conn: &impl Connection, target: &str, why: String) -> Failure {
    match conn.close_reason() {
        Some(reason) => Failure::later(format!(
            "connection to target {target} lost ({reason}): {why}"
        )),
        None => Failure::counted(why),
    }
}

/// Where a round's manifest, catalog and scan summary are kept: the migration's directory for
/// round 0 (the bulk copy), `round-<n>` inside it for sync rounds.
pub fn round_dir(migration_dir: &Path, round: u32) -> PathBuf {
    match round {
        0 => migration_dir.to_path_buf(),
        n => migration_dir.join(format!("round-{n}")),
    }
}

/// Where an agent keeps what it knows of one migration, as source, target or both
/// (`<state_dir>/clusters/<cluster id>/migrations/<uuid>`); ids that are not ids
/// ([`ferry_common::ids::is_id`]) are refused as `(which, what it was)`.
pub fn migration_state_dir(
    state_dir: &Path,
    cluster: &str,
    uuid: &str,
) -> Result<PathBuf, (&'static str, String)> {
    for (what, id) in [("cluster id", cluster), ("migration uuid", uuid)] {
        if !ferry_common::ids::is_id(id) {
            return Err((what, id.to_string()));
        }
    }
    Ok(cluster_dir(state_dir, cluster)
        .join("migrations")
        .join(uuid))
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
    /// An object of a store source: checked against the listing when it is read, not here.
    const LISTED: FileId = FileId {
        ino: 0,
        size: 0,
        mtime: (0, 0),
        ctime: None,
        may_be_sparse: false,
    };

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

/// Describes whole file `e` as `m` says it is now (size, mode, mtime, inode, owner).
fn as_it_is(e: &mut Entry, m: &std::fs::Metadata) {
    e.file_size = m.len();
    e.len = m.len();
    e.mode = m.mode() & 0o7777;
    e.mtime_sec = m.mtime();
    e.mtime_nsec = m.mtime_nsec() as u32;
    e.inode = m.ino();
    e.uid = m.uid();
    e.gid = m.gid();
}

/// What to send for a segment: entries, what each file must look like (`None`: no bytes), and
/// paths left out because they vanished (or are no longer files) since the scan: the next
/// round deals with them.
type SendPlan = (Vec<Entry>, Vec<Option<FileId>>, Vec<(String, String)>);

/// The entries to send for a scanned segment, with what each file must look like.
///
/// Whole files are described as they are now, not as scanned: a small file modified since the
/// scan is sent in its current version, and one deleted since is left out (and returned, to be
/// logged). Pieces of split files must still be the scanned file.
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
                as_it_is(&mut e, &m);
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

/// Checks that the open file at `path` is still the one expected (a regular file of the same
/// inode, size and mtime — and ctime for whole files): a torn read is never sent as good.
fn still(f: &File, path: &Path, expect: &FileId, piece: bool) -> Result<(), ReadError> {
    let m = f.metadata().map_err(|source| ReadError::Stat {
        path: path.to_path_buf(),
        source,
    })?;
    if !m.is_file() {
        return Err(ReadError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    if !expect.matches(&m) {
        let path = path.to_path_buf();
        return Err(if piece {
            ReadError::SplitChanged { path }
        } else {
            ReadError::Changed { path }
        });
    }
    Ok(())
}

/// Hashes the blocks of every piece to be sent as a delta and keeps only the changed ones as
/// its data runs (`hashes` gets all of its blocks' hashes, to be recorded once the target has
/// the piece). A piece whose record is of another version, or that is sparse, is sent whole.
fn plan_deltas(
    root: &Path,
    store: &BlockStore,
    block_size: u64,
    entries: &mut [Entry],
    expect: &[Option<FileId>],
    hashes: &mut [Vec<[u8; 32]>],
) -> Result<(), ReadError> {
    for ((e, x), out) in entries.iter_mut().zip(expect).zip(hashes.iter_mut()) {
        let (Some(base), Some(x)) = (e.delta_base, x) else {
            continue;
        };
        // The record is of the base, or already of this new version where other pieces of
        // this delta were acknowledged (each piece records its own blocks only, so the
        // blocks of the pieces still to send are still the base's).
        let new = (e.file_size, e.mtime_sec, e.mtime_nsec);
        let recorded = store.version(&e.path);
        if e.data_runs.is_some()
            || (recorded != Some((base, block_size)) && recorded != Some((new, block_size)))
        {
            e.delta_base = None;
            continue;
        }
        let path = root.join(&e.path);
        let f = File::open(&path).map_err(|source| ReadError::Open {
            path: path.clone(),
            source,
        })?;
        let same = |f: &File| still(f, &path, x, e.chunk_count > 1);
        same(&f)?;
        let mut buf = vec![0u8; block_size.min(BUF as u64) as usize];
        let mut now = Vec::new();
        let end = e.offset + e.len;
        let mut at = e.offset;
        while at < end {
            let block_end = (at + block_size).min(end);
            let mut h = blake3::Hasher::new();
            while at < block_end {
                let n = ((block_end - at) as usize).min(buf.len());
                f.read_exact_at(&mut buf[..n], at)
                    .map_err(|source| ReadError::Read {
                        path: path.clone(),
                        source,
                    })?;
                h.update(&buf[..n]);
                at += n as u64;
            }
            now.push(*h.finalize().as_bytes());
        }
        same(&f)?;
        let recorded = store.hashes(&e.path, e.offset / block_size, now.len());
        e.data_runs = Some(blocks::changed_runs(
            e.offset, e.len, block_size, &now, &recorded,
        ));
        *out = now;
    }
    Ok(())
}

/// Records the block hashes of the pieces the target acknowledged. A record that cannot be
/// written is removed, so that the next round sends the file whole rather than trust it.
fn record_blocks(store: &BlockStore, block_size: u64, entries: &[Entry], hashes: &[Vec<[u8; 32]>]) {
    for (e, h) in entries.iter().zip(hashes) {
        if h.is_empty() {
            continue;
        }
        let v = (e.file_size, e.mtime_sec, e.mtime_nsec);
        if let Err(err) = store.record(&e.path, v, block_size, e.offset / block_size, h) {
            let shown = display(&e.path);
            tracing::warn!(message = "Cannot record block hashes; the file is sent whole next time.", path = %shown, error = %err);
            store.forget(&e.path);
        }
    }
}

/// Frees the slot of the transfer that ended (`done`) and of every other that has ended
/// meanwhile, so that the next lease call asks for all of them; returns what they sent, to be
/// reported. (Freeing one per turn of the
/// driver made each lease call, a round trip, ask for one slot: on a 150 ms path a round of 64
/// small deltas leased one segment every 150 ms.)
fn reap(
    done: Result<(tokio::task::Id, Sent), tokio::task::JoinError>,
    sends: &mut JoinSet<Sent>,
    sending: &mut HashMap<tokio::task::Id, LeaseKey>,
    schedule: &mut SourceSchedule,
) -> Vec<Sent> {
    let mut out = Vec::new();
    let mut next = Some(done);
    while let Some(done) = next {
        let id = match done {
            Ok((id, sent)) => {
                out.push(sent);
                id
            }
            Err(e) => e.id(),
        };
        if let Some(key) = sending.remove(&id) {
            schedule.finished(&key);
        }
        next = sends.try_join_next_with_id();
    }
    out
}

/// Whole files at most this large are read into memory when their segment starts, each between
/// two `fstat`s: a small file a live application keeps writing (a log, a counter) is caught in
/// a consistent state, instead of changing between the segment's header and its turn in the
/// stream (which fails the whole segment).
const PREFETCH_MAX: u64 = 1024 * 1024;
/// Most bytes prefetched for one segment (a bundle holds at most `BUNDLE_BYTES` as scanned;
/// files may have grown since).
const PREFETCH_PER_SEGMENT: u64 = 2 * crate::segment::BUNDLE_BYTES;
/// Most bytes prefetched by all of a source's transfers at once (the agent's memory budget).
const PREFETCH_TOTAL: u64 = 16 * 1024 * 1024;
/// Reads of one file that changes while it is read before it is left to be streamed (and
/// probably fail the segment, to be retried).
const PREFETCH_TRIES: u32 = 3;

/// Whether `e` is read into memory when its segment starts: a whole, dense file (as its
/// identity `x` says) of at most `max` bytes.
fn prefetchable(e: &Entry, x: &Option<FileId>, max: u64) -> bool {
    e.chunk_count <= 1
        && e.data_runs.is_none()
        && x.is_some_and(|x| !x.may_be_sparse && x.size <= max)
}

/// Reads the small whole files of a segment into memory (see [`PREFETCH_MAX`]); each entry
/// and its expected identity are updated to the version read. `None` for an entry streamed from
/// the file as before (pieces, sparse or large files, files that cannot be read or keep
/// changing: streaming reports their error).
fn prefetch(
    root: &Path,
    entries: &mut [Entry],
    expect: &mut [Option<FileId>],
    mut budget: u64,
) -> Vec<Option<Vec<u8>>> {
    let mut out = Vec::with_capacity(entries.len());
    for (e, x) in entries.iter_mut().zip(expect.iter_mut()) {
        if !prefetchable(e, x, PREFETCH_MAX.min(budget)) {
            out.push(None);
            continue;
        }
        let path = root.join(&e.path);
        let read = (0..PREFETCH_TRIES).find_map(|_| {
            let mut f = File::open(&path).ok()?;
            let before = f.metadata().ok()?;
            if !before.is_file() || before.len() > PREFETCH_MAX.min(budget) {
                return None;
            }
            let mut data = Vec::with_capacity(before.len() as usize);
            std::io::Read::read_to_end(
                &mut std::io::Read::take(&mut f, PREFETCH_MAX + 1),
                &mut data,
            )
            .ok()?;
            let after = f.metadata().ok()?;
            let id = FileId::of(&before);
            (id.matches(&after) && data.len() as u64 == before.len()).then_some((data, after))
        });
        match read {
            Some((data, m)) => {
                budget -= data.len() as u64;
                as_it_is(e, &m);
                *x = Some(FileId::of(&m));
                out.push(Some(data));
            }
            None => out.push(None),
        }
    }
    out
}

/// Finds the data runs of every sparse file piece about to be sent (`expect` is `Some` for the
/// entries whose bytes are read). The identity checks around the read catch a file that changes
/// after this.
fn find_holes(
    root: &Path,
    entries: &mut [Entry],
    expect: &[Option<FileId>],
) -> Result<(), ReadError> {
    for (e, expect) in entries.iter_mut().zip(expect) {
        if !expect.is_some_and(|x| x.may_be_sparse) {
            continue;
        }
        let path = root.join(&e.path);
        let file = File::open(&path).map_err(|source| ReadError::Open {
            path: path.clone(),
            source,
        })?;
        e.data_runs = crate::holes::data_runs(&file, e.offset, e.len)
            .map_err(|source| ReadError::Holes { path, source })?;
    }
    Ok(())
}

/// Reads the extended attributes of every entry but hardlinks (which share their file's), within
/// a budget per segment that keeps its header far below the receiver's frame limit.
fn read_xattrs(root: &Path, entries: &mut [Entry]) -> Result<(), ReadError> {
    let mut total = 0;
    for e in entries.iter_mut().filter(|e| e.kind != EntryKind::Hardlink) {
        let path = root.join(&e.path);
        e.xattrs = crate::xattr::read(&path).map_err(|source| ReadError::Xattrs {
            path: path.clone(),
            source,
        })?;
        total += e
            .xattrs
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .sum::<usize>();
        if total > crate::xattr::MAX_PER_SEGMENT {
            return Err(ReadError::XattrsTooLarge {
                limit: crate::xattr::MAX_PER_SEGMENT,
                path,
            });
        }
    }
    Ok(())
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

    /// A scan registers a full batch at once, and what it has planned every half second, so a
    /// long scan of fewer segments than a batch (a million small files) does not hold back every
    /// transfer until it ends.
    #[test]
    fn a_long_scan_registers_what_it_planned_every_half_second() {
        let ms = Duration::from_millis;
        assert!(
            register_now(REGISTER_BATCH, ms(0)),
            "a full batch goes at once"
        );
        assert!(!register_now(REGISTER_BATCH - 1, ms(499)));
        assert!(
            register_now(1, REGISTER_EVERY),
            "a partial batch goes after 500 ms"
        );
        assert!(!register_now(0, ms(10_000)), "nothing to register, no call");
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
    fn small_files_are_read_whole_as_they_are_when_their_segment_starts() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("log"), b"line 1\n").unwrap();
        std::fs::write(d.path().join("big"), vec![1u8; PREFETCH_MAX as usize + 1]).unwrap();
        let entries = vec![scanned(d.path(), "log"), scanned(d.path(), "big")];
        let (mut sent, mut expect, _) = current_entries(d.path(), entries);
        // The application writes after the segment was described.
        std::fs::write(d.path().join("log"), b"line 1\nline 2\n").unwrap();
        let data = prefetch(d.path(), &mut sent, &mut expect, PREFETCH_PER_SEGMENT);
        assert_eq!(data[0].as_deref(), Some(&b"line 1\nline 2\n"[..]));
        assert_eq!(
            (sent[0].len, sent[0].file_size),
            (14, 14),
            "described as read"
        );
        let now = std::fs::metadata(d.path().join("log")).unwrap();
        assert!(expect[0].unwrap().matches(&now));
        assert!(data[1].is_none(), "a large file is streamed");
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

/// The source driven end to end through its seams: a fake coordinator and an in-memory dialer,
/// real files and a real scan, no sockets.
#[cfg(test)]
mod driven {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::control::testing::{FakeCoordinator, Report};
    use crate::dial::testing::{Accepted, MemDialer};

    /// A target that reads each segment, checks the source's hash and acknowledges it (with
    /// `verified`, its acks say its own report verified the segment): what it received is sent
    /// on the returned channel as (segment id, hash, bytes).
    fn acking_target(
        mut accepted: tokio::sync::mpsc::UnboundedReceiver<Accepted>,
        verified: bool,
    ) -> tokio::sync::mpsc::UnboundedReceiver<(u64, [u8; 32], Vec<u8>)> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(mut a) = accepted.recv().await {
                let header: pb::SegmentHeader =
                    frame::read(&mut a.recv, frame::MAX_HEADER).await.unwrap();
                let mut bytes = Vec::new();
                for e in header.entries {
                    let e = Entry::try_from(e).unwrap();
                    let mut piece = vec![0u8; e.wire_len() as usize];
                    tokio::io::AsyncReadExt::read_exact(&mut a.recv, &mut piece)
                        .await
                        .unwrap();
                    bytes.extend(piece);
                }
                let trailer: pb::SegmentTrailer =
                    frame::read(&mut a.recv, MAX_SMALL_FRAME).await.unwrap();
                let hash = *blake3::hash(&bytes).as_bytes();
                assert_eq!(
                    trailer.blake3,
                    hash.to_vec(),
                    "the source hashed what it sent"
                );
                let ack = pb::SegmentAck {
                    ok: true,
                    blake3: hash.to_vec(),
                    verified,
                    ..Default::default()
                };
                frame::write(&mut a.send, &ack).await.unwrap();
                a.send.flush().await.unwrap();
                let _ = tx.send((header.segment_id, hash, bytes));
            }
        });
        rx
    }

    struct Rig {
        coordinator: FakeCoordinator,
        source: Arc<Source<FakeCoordinator, MemDialer>>,
        stop: watch::Sender<bool>,
        _dirs: (tempfile::TempDir, tempfile::TempDir),
    }

    /// A source of migration 1 over a tree of `files` (name, bytes), granted its segments
    /// automatically with lease time `ttl_ms`.
    fn rig(
        files: &[(&str, Vec<u8>)],
        ttl_ms: u64,
    ) -> (Rig, tokio::sync::mpsc::UnboundedReceiver<Accepted>) {
        let src = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        for (name, bytes) in files {
            std::fs::write(src.path().join(name), bytes).unwrap();
        }
        let coordinator = FakeCoordinator::default();
        coordinator.with(|s| {
            s.work = vec![SourceWork {
                migration_id: 1,
                migration_uuid: "m-1".into(),
                source_path: src.path().to_str().unwrap().into(),
                segment_size: 64 * 1024,
                ..Default::default()
            }];
            s.auto_grant_ttl_ms = ttl_ms;
        });
        let (dialer, accepted) = MemDialer::new();
        let source = Arc::new(Source::new(
            coordinator.clone(),
            dialer,
            state.path().to_path_buf(),
            4,
            Arc::default(),
            Arc::default(),
        ));
        let (stop, _) = watch::channel(false);
        let rig = Rig {
            coordinator,
            source,
            stop,
            _dirs: (src, state),
        };
        (rig, accepted)
    }

    /// Waits (in steps of 10 ms, at most 10 s) until `f` holds of the fake's state.
    async fn until(
        c: &FakeCoordinator,
        what: &str,
        f: impl Fn(&crate::control::testing::FakeState) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !c.with(|s| f(s)) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting until {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scanned_segments_are_leased_streamed_and_reported_with_the_targets_hash() {
        let files: Vec<(&str, Vec<u8>)> = vec![
            ("a", vec![1u8; 100_000]),
            ("b", b"hello".to_vec()),
            ("c", vec![7u8; 30_000]),
        ];
        let (rig, accepted) = rig(&files, 120_000);
        let mut received = acking_target(accepted, false);
        let run = tokio::spawn(rig.source.clone().run(rig.stop.subscribe()));
        until(
            &rig.coordinator,
            "the scan is complete and every segment verified",
            |s| s.scans.contains_key(&1) && s.reports.len() as u64 == s.scans[&1].0,
        )
        .await;
        rig.stop.send(true).unwrap();
        run.await.unwrap();
        let (segments, issues) = rig.coordinator.with(|s| s.scans[&1]);
        assert_eq!(issues, 0);
        assert!(segments >= 2, "a is split: {segments} segments");
        let mut got = Vec::new();
        while let Ok(r) = received.try_recv() {
            got.push(r);
        }
        assert_eq!(got.len() as u64, segments);
        let reports = rig.coordinator.with(|s| s.reports.clone());
        for (sid, hash, _) in &got {
            let r = reports
                .iter()
                .find(|r| r.lease.segment_id == *sid)
                .expect("every segment sent is reported");
            assert_eq!(r.role, Role::Source);
            assert_eq!(
                r.result,
                Ok(*hash),
                "the source reports the hash of what it sent"
            );
        }
        let sent: usize = got.iter().map(|(_, _, b)| b.len()).sum();
        assert_eq!(sent, 100_000 + 5 + 30_000, "every byte once");
        assert!(
            rig.coordinator.with(|s| s.held.is_empty()),
            "no lease left when the source stops"
        );
    }

    /// For a target writing to an object store, a name a store cannot hold is an issue of
    /// the scan, not sent (it would fail its whole bundle at every attempt).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn names_an_object_store_cannot_hold_are_issues_when_the_target_is_a_store() {
        use std::os::unix::ffi::OsStrExt;
        let files: Vec<(&str, Vec<u8>)> = vec![("ok", b"fine".to_vec())];
        let (rig, accepted) = rig(&files, 120_000);
        let src = rig._dirs.0.path();
        std::fs::write(
            src.join(std::ffi::OsStr::from_bytes(b"caf\xe9")),
            b"latin-1",
        )
        .unwrap();
        rig.coordinator.with(|s| s.work[0].target_is_store = true);
        let mut received = acking_target(accepted, false);
        let run = tokio::spawn(rig.source.clone().run(rig.stop.subscribe()));
        until(
            &rig.coordinator,
            "the scan is complete and every segment reported",
            |s| s.scans.contains_key(&1) && s.reports.len() as u64 == s.scans[&1].0,
        )
        .await;
        rig.stop.send(true).unwrap();
        run.await.unwrap();
        let (_, issues) = rig.coordinator.with(|s| s.scans[&1]);
        assert_eq!(issues, 1, "the Latin-1 name is an issue");
        let mut sent = Vec::new();
        while let Ok((_, _, b)) = received.try_recv() {
            sent.extend(b);
        }
        assert_eq!(sent, b"fine", "only the UTF-8 name was sent");
    }

    /// A scan's completion leases too, with the room the driver gives it: a small
    /// tree's segments are granted with it and sent without a lease call of their own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scans_completion_brings_the_first_leases() {
        let files: Vec<(&str, Vec<u8>)> = vec![("a", vec![1u8; 10_000]), ("b", b"hi".to_vec())];
        let (rig, accepted) = rig(&files, 120_000);
        let _received = acking_target(accepted, false);
        let run = tokio::spawn(rig.source.clone().run(rig.stop.subscribe()));
        until(
            &rig.coordinator,
            "the scan is complete and every segment reported",
            |s| s.scans.contains_key(&1) && s.reports.len() as u64 == s.scans[&1].0,
        )
        .await;
        rig.stop.send(true).unwrap();
        run.await.unwrap();
        let (asked, segments) = rig
            .coordinator
            .with(|s| (s.scan_lease_requests.clone(), s.scans[&1].0));
        let max = rig.source.max_in_flight + lease_ahead(rig.source.max_in_flight);
        assert_eq!(
            asked,
            vec![(max, segments as usize)],
            "one completion, every segment"
        );
        assert!(rig
            .coordinator
            .with(|s| s.reports.iter().all(|r| r.result.is_ok())));
    }

    /// A target whose report verified the segment (it carried the source's hash) says so in
    /// its ack: the source makes no report of its own, and its slots and leases are free.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn segments_the_targets_report_verified_are_not_reported_again() {
        let files: Vec<(&str, Vec<u8>)> = vec![("a", vec![1u8; 100_000]), ("b", b"hi".to_vec())];
        let (rig, accepted) = rig(&files, 120_000);
        let mut received = acking_target(accepted, true);
        let run = tokio::spawn(rig.source.clone().run(rig.stop.subscribe()));
        until(&rig.coordinator, "the scan is complete", |s| {
            s.scans.contains_key(&1)
        })
        .await;
        let segments = rig.coordinator.with(|s| s.scans[&1].0);
        let mut got = 0;
        while got < segments {
            tokio::time::timeout(Duration::from_secs(20), received.recv())
                .await
                .expect("every segment reaches the target")
                .unwrap();
            got += 1;
        }
        let stats = rig.source.stats.clone();
        let verified = || {
            stats
                .segments_verified
                .load(std::sync::atomic::Ordering::SeqCst)
        };
        tokio::time::timeout(Duration::from_secs(20), async {
            while verified() < segments {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("each acknowledged segment counts as verified");
        rig.stop.send(true).unwrap();
        run.await.unwrap();
        assert_eq!(
            rig.coordinator.with(|s| s.reports.clone()),
            vec![],
            "no report from the source, not even a release at shutdown"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopping_abandons_transfers_releases_their_leases_and_joins_every_task() {
        let (rig, mut accepted) = rig(&[("a", vec![3u8; 10_000])], 120_000);
        let run = tokio::spawn(rig.source.clone().run(rig.stop.subscribe()));
        // The target takes the stream and never answers.
        let held = accepted.recv().await.expect("the source dials");
        until(&rig.coordinator, "the lease is granted", |s| {
            !s.held.is_empty()
        })
        .await;
        let lease = rig.coordinator.with(|s| LeaseKey::from(&s.held[0]));
        rig.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .expect("run returns once stopped")
            .unwrap();
        let reports = rig.coordinator.with(|s| s.reports.clone());
        assert_eq!(
            reports,
            vec![Report {
                role: Role::Source,
                lease,
                result: Err(Failure::later("source agent shut down")),
                source_hash: None,
            }],
            "the abandoned lease is released, not counted as an attempt"
        );
        assert!(rig.source.dialer.closed(), "connections are closed");
        drop(held);
    }

    /// With a pool of targets, a free slot goes to the waiting lease whose target has the
    /// fewest transfers running (the oldest of those); with one target, in lease order.
    #[tokio::test(flavor = "current_thread")]
    async fn a_free_slot_goes_to_the_waiting_lease_whose_target_is_least_busy() {
        let lease = |segment_id: u64, target: &str| Lease {
            migration_id: 1,
            segment_id,
            epoch: 1,
            target_agent: target.into(),
            ..Default::default()
        };
        let mut slots = Slots::default();
        // One transfer to "a" runs.
        let h = slots.sends.spawn(std::future::pending::<Sent>());
        slots.sending.insert(h.id(), LeaseKey::from(&lease(0, "a")));
        slots.targets.insert(h.id(), "a".into());
        slots
            .queued
            .extend([lease(1, "a"), lease(2, "a"), lease(3, "b"), lease(4, "b")]);
        let next = |slots: &mut Slots| slots.next_queued().map(|l| l.segment_id);
        assert_eq!(next(&mut slots), Some(3), "b runs nothing, a one transfer");
        // The transfer to "a" ended: both idle, the oldest goes.
        slots.sending.clear();
        assert_eq!(next(&mut slots), Some(1));
        assert_eq!(next(&mut slots), Some(2));
        assert_eq!(next(&mut slots), Some(4));
        assert_eq!(next(&mut slots), None);
        slots.sends.abort_all();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn every_transfer_that_has_ended_frees_its_slot_before_the_next_lease_call() {
        let now = std::time::Instant::now();
        let mut schedule = SourceSchedule::new(now, 4);
        schedule.heartbeat_answered(vec![SourceWork {
            migration_id: 1,
            ..Default::default()
        }]);
        let mut sends = JoinSet::new();
        let mut sending = HashMap::new();
        for segment_id in 0..4 {
            let key = LeaseKey {
                migration_id: 1,
                segment_id,
                epoch: 1,
            };
            schedule.started(key, 120_000);
            let lease = Lease {
                migration_id: 1,
                segment_id,
                epoch: 1,
                ..Default::default()
            };
            let h = sends.spawn(async move {
                Sent {
                    lease,
                    result: Ok([0; 32]),
                    verified: false,
                    started: std::time::Instant::now(),
                    sent_ms: 0,
                }
            });
            sending.insert(h.id(), key);
        }
        // All four end (the only thread runs them when this task yields).
        tokio::task::yield_now().await;
        let first = sends.join_next_with_id().await.expect("a transfer");
        let sent = reap(first, &mut sends, &mut sending, &mut schedule);
        assert_eq!(sent.len(), 4, "each to be reported");
        assert!(sending.is_empty());
        schedule.start_round();
        let leases: Vec<Action> =
            std::iter::from_fn(|| schedule.next(now + Duration::from_secs(1)))
                .filter(|a| matches!(a, Action::Lease(_)))
                .collect();
        assert_eq!(
            leases,
            vec![Action::Lease(4)],
            "one call for every free slot"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leases_are_taken_ahead_but_no_more_than_max_in_flight_transfers_run() {
        // Twelve segments (64 KiB each); the rig's source sends at most 4 at once.
        let files: Vec<(String, Vec<u8>)> = (0..12)
            .map(|i| (format!("f{i:02}"), vec![i as u8; 64 * 1024]))
            .collect();
        let files: Vec<(&str, Vec<u8>)> =
            files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
        let (rig, mut accepted) = rig(&files, 120_000);
        let run = tokio::spawn(rig.source.clone().run(rig.stop.subscribe()));
        // The target takes the streams and never answers.
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(accepted.recv().await.expect("the source dials"));
        }
        let handed_out = |s: &crate::control::testing::FakeState| s.granted.len() - s.grant.len();
        until(&rig.coordinator, "leases beyond the four transfers", |s| {
            handed_out(s) > 4
        })
        .await;
        let asked = rig.coordinator.with(|s| s.lease_requests.clone());
        assert_eq!(asked.first(), Some(&(4 + lease_ahead(4))), "{asked:?}");
        assert!(asked.iter().all(|&n| n <= 4 + lease_ahead(4)), "{asked:?}");
        rig.stop.send(true).unwrap();
        run.await.unwrap();
        assert!(
            accepted.try_recv().is_err(),
            "a fifth transfer ran while four were out"
        );
        let (released, granted) = rig.coordinator.with(|s| (s.reports.len(), handed_out(s)));
        assert_eq!(
            released, granted,
            "every lease held, sent or not, is released"
        );
        drop(held);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lease_requests_the_coordinator_cannot_answer_back_off() {
        let (rig, _accepted) = rig(&[("a", b"x".to_vec())], 120_000);
        rig.coordinator.with(|s| s.unavailable = true);
        let run = tokio::spawn(rig.source.clone().run(rig.stop.subscribe()));
        until(&rig.coordinator, "the first lease request", |s| {
            !s.lease_requests.is_empty()
        })
        .await;
        // Every tick (250 ms) would make 8 requests in 2 s; the backoff (250 ms, 500 ms, 1 s,
        // 2 s, each with up to as much again of jitter) allows at most 4 after the first.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let asked = rig.coordinator.with(|s| s.lease_requests.len());
        assert!((2..=5).contains(&asked), "{asked} lease requests in 2 s");
        rig.stop.send(true).unwrap();
        run.await.unwrap();
    }
}
