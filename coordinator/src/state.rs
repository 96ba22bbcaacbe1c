//! The replicated state and the rules that change it. Pure: no I/O and no clock — every time value
//! arrives inside a [`Command`] (the leader stamps it when proposing), and the log index of the entry
//! is passed in by the store. Given the same entries, every node computes the same state.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Default lease time: how long a source may hold a segment before it returns to `Pending`.
pub const DEFAULT_LEASE_TTL_MS: u64 = 120_000;
/// Most segments one source agent may hold at once, whatever it asks for.
pub const MAX_LEASES_PER_AGENT: usize = 64;
/// Failed attempts after which a segment fails for good when the spec does not say.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
/// Most attempts a spec may allow (the backoff is capped, so more only delays the verdict).
pub const MAX_MAX_ATTEMPTS: u32 = 1000;
/// Delay before the first retry of a failed segment; it doubles with each further failure.
pub const RETRY_BASE_MS: u64 = 1_000;
/// Longest delay between two tries of a segment: with the default of 10 attempts a segment that
/// always fails is given up on after about 2 to 4 minutes, long enough to ride out a target
/// restart, short enough that an operator hears of a broken file the same hour.
pub const RETRY_CAP_MS: u64 = 60_000;

/// How long a segment waits before its next try after its `n`-th failure (`n` from 1):
/// `RETRY_BASE_MS · 2^(n-1)`, capped at [`RETRY_CAP_MS`], with "equal jitter" — half of it
/// fixed, the other half drawn from a hash of `(migration, segment, n)`. The jitter spreads
/// segments that failed together (a full disk fails them all at once) so they do not come back
/// together; it is derived, not random, because every replica must apply the same state.
pub fn retry_delay_ms(mid: u64, sid: u64, n: u32) -> u64 {
    let full = RETRY_BASE_MS
        .saturating_mul(1u64 << n.saturating_sub(1).min(32))
        .min(RETRY_CAP_MS);
    let half = full / 2;
    half + mix(mid, sid, n as u64) % (full - half + 1)
}

/// splitmix64 of the three values: a well-spread deterministic hash.
fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut z = a
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(b.rotate_left(21))
        .wrapping_add(c.rotate_left(42))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Scan issues kept per migration (the total is always counted).
pub const MAX_SCAN_ISSUES_KEPT: usize = 1000;
/// Most commands in one [`Command::Batch`]: the position in the batch is the low 16 bits of the
/// fencing token.
pub const MAX_BATCH_COMMANDS: usize = 1 << 16;

/// The fencing token of a lease granted by the command at `position` of the entry at log
/// `index`: unique per grant and increasing in log order.
pub fn fencing_token(index: u64, position: usize) -> u64 {
    (index << 16) | position as u64
}

/// A 32-byte BLAKE3 digest.
pub type Digest = [u8; 32];

/// A segment as the source registers it. The fingerprint (BLAKE3 of the source's manifest record:
/// paths, offsets, sizes, mtimes, inodes) tells a replanned segment from the one already known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentReg {
    /// Segment id.
    pub id: u64,
    /// File bytes it carries.
    pub bytes: u64,
    /// Files it accounts for.
    pub files: u32,
    /// Fingerprint of its description.
    pub fingerprint: Digest,
}

/// How long an agent's session stays live after its last committed heartbeat. Heartbeats are
/// committed at least every `grpc::agent::LAST_SEEN_EVERY_MS` (10 s), so a running agent is
/// never taken for dead; a process that died without ending its session (SIGKILL, a crash, a
/// lost host) frees its identity for another process after this long.
pub const SESSION_TIMEOUT_MS: u64 = 30_000;

/// An agent the cluster knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    /// Name, as in its certificate.
    pub name: String,
    /// Its QUIC data endpoint (`host:port`), empty if it cannot receive.
    pub data_addr: String,
    /// When it first registered (unix ms, leader's clock).
    pub registered_ms: u64,
    /// When its session last registered or sent a committed heartbeat.
    pub last_seen_ms: u64,
    /// The session of the process that runs as this agent (random, chosen by the process at
    /// start); 0 once that process ended its session (a clean shutdown). Only the current
    /// session's calls are accepted.
    pub session: u64,
    /// The last registration refused because this session was live (empty: none): another
    /// process with the same identity. Shown to the operator and to the running agent.
    pub conflict: String,
    /// Whether, as a target, it applies files' owners (it runs as root).
    pub applies_owners: bool,
}

impl Agent {
    /// Whether a process runs as this agent: it has a session, heard from within
    /// [`SESSION_TIMEOUT_MS`] of `now_ms`.
    pub fn live(&self, now_ms: u64) -> bool {
        self.session != 0 && now_ms.saturating_sub(self.last_seen_ms) < SESSION_TIMEOUT_MS
    }

    /// Why sources cannot send to this agent, if they cannot: no data address, one nobody can
    /// dial, or the agent shut down.
    pub fn undialable(&self) -> Option<String> {
        let name = &self.name;
        if self.data_addr.is_empty() {
            return Some(format!(
                "agent {name} registered without a data address, so it cannot receive: set \
                 data_listen (and advertise_addr if sources reach it at another address) in its \
                 config and restart it"
            ));
        }
        match self.data_addr.parse::<std::net::SocketAddr>() {
            Ok(a) if a.ip().is_unspecified() || a.port() == 0 => Some(format!(
                "agent {name} advertises {}, which no source can dial: set advertise_addr in its \
                 config to the address sources reach it at, and restart it",
                self.data_addr
            )),
            Ok(_) => {
                if self.session == 0 {
                    Some(format!("agent {name} was shut down; start it again"))
                } else {
                    None
                }
            }
            Err(_) => Some(format!(
                "agent {name} advertises {:?}, which is not an IP address and port",
                self.data_addr
            )),
        }
    }

    /// Why a call of `session` is not this agent's current process's, if it is not.
    pub fn session_error(&self, session: u64) -> Option<String> {
        if session == self.session {
            return None;
        }
        let name = &self.name;
        Some(if self.session == 0 {
            format!(
                "agent {name}: session {session:016x} has ended; this process must register again"
            )
        } else {
            format!(
                "agent {name}: session {session:016x} is not current: another process registered \
                 as this agent (session {:016x}); this process must stop",
                self.session
            )
        })
    }
}

/// What an operator asked to move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationSpec {
    /// The agent that reads.
    pub source_agent: String,
    /// Absolute directory on the source agent.
    pub source_path: String,
    /// The agent that writes.
    pub target_agent: String,
    /// Directory under the target's root (relative; empty = the root).
    pub target_path: String,
    /// Segment size in bytes.
    pub segment_size: u64,
    /// Carry extended attributes.
    pub xattrs: bool,
    /// Glob patterns of paths not to copy ([`ferry_common::exclude`]).
    pub excludes: Vec<String>,
    /// Failed attempts after which a segment is given up on ([`SegState::Failed`]).
    pub max_attempts: u32,
}

/// Where a migration is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Created; the source has not registered segments yet.
    Planned,
    /// Bulk copy (round 0) in progress.
    Copying,
    /// Every segment is verified and the scan is complete.
    Done,
    /// The scan is complete and every segment is verified or failed, at least one failed
    /// (the failed ones name their files and errors).
    Failed,
}

impl Phase {
    /// Lower-case name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Planned => "planned",
            Phase::Copying => "copying",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }

    /// Whether the migration has ended (done or failed): nothing more is sent.
    pub fn finished(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed)
    }
}

/// Running totals of a migration, kept up to date on every change so status reads are O(1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Segments registered.
    pub segments: u64,
    /// Bytes in registered segments.
    pub bytes: u64,
    /// Files in registered segments.
    pub files: u64,
    /// Segments verified.
    pub verified_segments: u64,
    /// Bytes verified.
    pub verified_bytes: u64,
    /// Files verified.
    pub verified_files: u64,
    /// Leases granted over all segments (equals `segments` when nothing was ever resent).
    pub leases_granted: u64,
    /// Failed transfer attempts (errors and hash mismatches).
    pub failed_attempts: u64,
    /// Segments given up on after their last allowed attempt.
    pub failed_segments: u64,
    /// Bytes in failed segments.
    pub failed_bytes: u64,
    /// Files in failed segments.
    pub failed_files: u64,
}

/// A migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// Id, from 1.
    pub id: u64,
    /// Name, unique in the cluster (operators refer to a migration by it).
    pub name: String,
    /// Random id, unique across clusters: agents key their local state by it.
    pub uuid: String,
    /// The idempotency key it was created with (empty: none): a create repeated with this key
    /// answers this migration instead of making another.
    pub idempotency_key: String,
    /// What to move.
    pub spec: MigrationSpec,
    /// Where it is.
    pub phase: Phase,
    /// The source has registered all segments.
    pub scan_complete: bool,
    /// Totals.
    pub counters: Counters,
    /// Paths the source could not copy, with the reason (at most [`MAX_SCAN_ISSUES_KEPT`]).
    pub scan_issues: Vec<(String, String)>,
    /// All scan issues, including those not kept.
    pub scan_issues_total: u64,
    /// Names the scan found to be hardlinks to a file it carries: linked at the target, not
    /// copied.
    pub hardlinks: u64,
    /// Paths the scan skipped because they match the spec's excludes (the operator's choice:
    /// they do not fail the migration).
    pub excluded: u64,
    /// The last transfer error seen.
    pub last_error: String,
    /// Creation time (unix ms).
    pub created_ms: u64,
    /// When it reached `Done` or `Failed` (0 before).
    pub finished_ms: u64,
}

/// Where a segment is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SegState {
    /// Waiting for a lease.
    Pending,
    /// Held by the source until `expires_ms`; `epoch` is the fencing token ([`fencing_token`] of
    /// the granting command).
    Leased {
        /// Fencing token.
        epoch: u64,
        /// Expiry (unix ms).
        expires_ms: u64,
    },
    /// Target holds the bytes durably and both ends computed the same hash.
    Verified,
    /// Given up on: it failed `spec.max_attempts` times (`last_error` says why). Terminal.
    Failed,
}

/// A segment, as the coordinator tracks it (its contents are described by the source's manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Bytes of file data.
    pub bytes: u64,
    /// Files it accounts for.
    pub files: u32,
    /// Fingerprint of the source's description of it.
    pub fingerprint: Digest,
    /// Lifecycle state.
    pub state: SegState,
    /// Leases granted for it.
    pub leases: u32,
    /// Failed attempts.
    pub attempts: u32,
    /// While `Pending` after a failure: not leased again before this time (unix ms; 0: at
    /// once). Set by the backoff ([`retry_delay_ms`]), cleared when leased.
    pub not_before_ms: u64,
    /// Hash the source reported under the current lease (or the verified one).
    pub source_hash: Option<Digest>,
    /// Hash the target reported under the current lease (or the verified one).
    pub target_hash: Option<Digest>,
    /// Last failure.
    pub last_error: String,
}

/// A segment's transitions: every change of its lifecycle state goes through one of these.
impl Segment {
    /// Leased to the holder of fencing token `epoch` until `expires_ms`: a fresh attempt, with
    /// no hashes yet and no backoff left.
    fn grant(&mut self, epoch: u64, expires_ms: u64) {
        self.state = SegState::Leased { epoch, expires_ms };
        self.leases = self.leases.saturating_add(1);
        self.not_before_ms = 0;
        self.source_hash = None;
        self.target_hash = None;
    }

    /// Extends lease `epoch` to at least `expires_ms` if it is current at `now_ms`; whether
    /// it was.
    fn extend(&mut self, epoch: u64, now_ms: u64, expires_ms: u64) -> bool {
        match self.state {
            SegState::Leased {
                epoch: e,
                expires_ms: old,
            } if e == epoch && old > now_ms => {
                self.state = SegState::Leased {
                    epoch,
                    expires_ms: old.max(expires_ms),
                };
                true
            }
            _ => false,
        }
    }

    /// Its lease ran out: pending again at once (the holder may simply be slow; no attempt is
    /// counted).
    fn expire(&mut self) {
        self.state = SegState::Pending;
        self.last_error = "lease expired".into();
    }

    /// Both ends reported the same hash.
    fn verify(&mut self) {
        self.state = SegState::Verified;
        self.last_error.clear();
    }

    /// What every failed attempt leaves: no hashes of it, and why it failed.
    fn forget_attempt(&mut self, why: &str) {
        self.source_hash = None;
        self.target_hash = None;
        self.last_error = why.to_string();
    }

    /// Given up on. Terminal.
    fn give_up(&mut self) {
        self.state = SegState::Failed;
        self.not_before_ms = 0;
    }

    /// Pending again, not to be leased before `not_before_ms`; returns that time, never 0 (0
    /// means "no backoff" in the stored record).
    fn wait_until(&mut self, not_before_ms: u64) -> u64 {
        let not_before_ms = not_before_ms.max(1);
        self.state = SegState::Pending;
        self.not_before_ms = not_before_ms;
        not_before_ms
    }
}

/// Which end reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The reading end.
    Source,
    /// The writing end.
    Target,
}

/// A state change, as proposed to Raft. Times are the leader's clock when it proposed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// An agent process announces itself (or its new data address) and starts its session.
    /// Refused while another session of the same agent is live, unless it names that session as
    /// its `previous` one: a restarted process that holds the agent's state directory lock
    /// knows its predecessor ended.
    RegisterAgent {
        /// Name from its certificate.
        name: String,
        /// Its QUIC endpoint.
        data_addr: String,
        /// The process's session (non-zero).
        session: u64,
        /// The session of the process that ran before it from the same state directory (0:
        /// none known).
        previous: u64,
        /// A fresh random id, which becomes the cluster's id if it has none yet (the first
        /// registration names the cluster; later ones leave the id as it is).
        new_cluster_id: String,
        /// Whether, as a target, it applies files' owners (it runs as root).
        applies_owners: bool,
        /// Leader time.
        now_ms: u64,
    },
    /// An agent is alive.
    Heartbeat {
        /// Name.
        name: String,
        /// Its session.
        session: u64,
        /// Leader time.
        now_ms: u64,
    },
    /// An agent process stops (clean shutdown): its session ends, so a new process may take
    /// the identity at once, and no segment is sent to it meanwhile.
    EndSession {
        /// Name.
        name: String,
        /// The session that ends.
        session: u64,
    },
    /// An operator creates a migration.
    CreateMigration {
        /// Its name (unique).
        name: String,
        /// The client's key for this request (empty: none). The same key again answers the
        /// migration it created: a retried request whose first answer was lost does not make
        /// a duplicate.
        idempotency_key: String,
        /// What to move.
        spec: MigrationSpec,
        /// A fresh random id for the migration: agents key their local state by cluster id and
        /// this, which no later migration or cluster can reuse (ids restart at 1 in a new
        /// cluster).
        uuid: String,
        /// Leader time.
        now_ms: u64,
    },
    /// A source registers segments it planned (idempotent per segment id).
    RegisterSegments {
        /// The source agent.
        agent: String,
        /// Migration.
        migration_id: u64,
        /// The segments.
        segments: Vec<SegmentReg>,
    },
    /// A source finished scanning.
    CompleteScan {
        /// The source agent.
        agent: String,
        /// Migration.
        migration_id: u64,
        /// How many segments the scan produced.
        segments_total: u64,
        /// Paths it could not copy.
        issues: Vec<(String, String)>,
        /// All issues, including those not listed.
        issues_total: u64,
        /// Names the scan found to be further names of a file it carries (hardlinks).
        hardlinks: u64,
        /// Paths the scan skipped because they match the spec's excludes.
        excluded: u64,
        /// Why the source root itself cannot be scanned (empty: it was scanned). The
        /// migration then fails with it.
        root_error: String,
        /// Leader time.
        now_ms: u64,
    },
    /// A source asks for up to `max` segments to send.
    LeaseSegments {
        /// The source agent.
        agent: String,
        /// Its session.
        session: u64,
        /// Most segments wanted.
        max: u32,
        /// Leader time.
        now_ms: u64,
        /// Lease duration.
        ttl_ms: u64,
    },
    /// A source reports a problem the operator must see: an error that stops it from working on
    /// the migration, and/or paths it could not copy after the scan (e.g. deleted meanwhile).
    SourceProblem {
        /// The source agent.
        agent: String,
        /// Migration.
        migration_id: u64,
        /// The error (empty if only issues are reported).
        error: String,
        /// Paths not copied, with the reason.
        issues: Vec<(String, String)>,
    },
    /// One end reports the outcome of a transfer.
    ReportSegment {
        /// Reporting agent.
        agent: String,
        /// Its session.
        session: u64,
        /// Which end it is.
        role: Role,
        /// Migration.
        migration_id: u64,
        /// Segment.
        segment_id: u64,
        /// The lease's fencing token.
        epoch: u64,
        /// The hash, or the error.
        result: Result<Digest, String>,
        /// With an error: the failure is not the segment's (the source shut down, the target
        /// could not be reached, a hardlink waits for its first name). The segment is retried
        /// after a backoff without counting an attempt.
        retry_later: bool,
        /// Leader time.
        now_ms: u64,
    },
    /// A source extends leases it is still sending (each `(migration, segment, epoch)`), to
    /// `now_ms + ttl_ms`. A lease that is no longer current is left alone.
    RenewLeases {
        /// The source agent.
        agent: String,
        /// Its session.
        session: u64,
        /// The leases.
        leases: Vec<(u64, u64, u64)>,
        /// Leader time.
        now_ms: u64,
        /// Lease duration.
        ttl_ms: u64,
    },
    /// Several commands committed as one entry (group commit), applied in order. Each gets its
    /// own response; one refused command does not affect the others.
    Batch(Vec<Command>),
}

impl Command {
    /// Roughly how much work and log space the command takes (for sizing batches).
    pub fn weight(&self) -> usize {
        match self {
            Command::RegisterSegments { segments, .. } => 1 + segments.len(),
            Command::RenewLeases { leases, .. } => 1 + leases.len(),
            Command::CompleteScan { issues, .. } | Command::SourceProblem { issues, .. } => {
                1 + issues.len()
            }
            Command::Batch(cmds) => cmds.iter().map(Command::weight).sum(),
            _ => 1,
        }
    }
}

/// What a [`Command::CompleteScan`] reports, as `complete_scan` takes it.
struct ScanEnd {
    total: u64,
    issues: Vec<(String, String)>,
    issues_total: u64,
    hardlinks: u64,
    excluded: u64,
    root_error: String,
}

/// A granted lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Migration.
    pub migration_id: u64,
    /// Segment.
    pub segment_id: u64,
    /// Fencing token.
    pub epoch: u64,
    /// Expiry (unix ms).
    pub expires_ms: u64,
    /// Failed attempts of the segment before this lease (0: its first try, or none failed):
    /// agents log the first failure loudly and repeats quietly.
    pub attempts: u32,
    /// The target agent.
    pub target_agent: String,
    /// Its data address.
    pub target_addr: String,
}

/// What a report led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportOutcome {
    /// Both ends agree: the segment is verified.
    Verified,
    /// Recorded; the other end has not reported yet.
    Waiting,
    /// The lease is not current (expired and re-leased, or never granted): nothing recorded.
    Rejected,
    /// The transfer failed or the hashes differ: the segment is pending again (after a
    /// backoff).
    Failed,
    /// The transfer failed for the last allowed time: the segment is given up on.
    GaveUp,
}

/// Why a target may not take a transfer under a lease ([`State::check_lease`]). Every variant
/// means the same to the target: refuse the stream, write nothing; the text tells its log why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseRefusal {
    /// The migration does not exist (deleted, or another cluster's).
    #[error("migration {0} does not exist")]
    NoMigration(u64),
    /// The asking agent is not the migration's target.
    #[error("agent {target} is not the target of migration {mid}")]
    NotTheTarget {
        /// The asking agent.
        target: String,
        /// The migration.
        mid: u64,
    },
    /// The segment does not exist.
    #[error("segment {sid} of migration {mid} does not exist")]
    NoSegment {
        /// The migration.
        mid: u64,
        /// The segment.
        sid: u64,
    },
    /// The lease ran out; the segment will be leased again.
    #[error("lease expired")]
    Expired,
    /// The segment is verified already: nothing more to write.
    #[error("segment already verified")]
    AlreadyVerified,
    /// The segment was given up on.
    #[error("segment was given up on after {attempts} failed attempts: {last_error}")]
    GivenUp {
        /// Failed attempts.
        attempts: u32,
        /// The last failure.
        last_error: String,
    },
    /// Another lease replaced this one, or it was never granted.
    #[error("lease {0} is not current")]
    NotCurrent(u64),
}

/// The result of applying a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Applied.
    Ok,
    /// A migration was created with this id.
    MigrationCreated(u64),
    /// Leases granted (maybe none).
    Leases(Vec<Lease>),
    /// A report was processed.
    Report(ReportOutcome, String),
    /// The command was refused; nothing changed. The text says why and what to do.
    Refused(String),
    /// An agent registered; the cluster's id.
    Registered(String),
    /// A registration was refused because another process of the same agent is live; the
    /// refusal is recorded on the agent (`Agent::conflict`), nothing else changed.
    Conflict(String),
    /// Per lease of a [`Command::RenewLeases`]: whether it was renewed.
    Renewed(Vec<bool>),
    /// The responses of a [`Command::Batch`], in order.
    Batch(Vec<Response>),
    /// Never produced by the state machine: in the answer to a multi-command proposal, a command
    /// that could not be committed (no leader, leadership moved). Nothing changed; retry it.
    NotCommitted(String),
}

/// Keys changed since the last [`State::take_dirty`], so the store writes only those.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dirty {
    /// Changed agents.
    pub agents: BTreeSet<String>,
    /// Changed migrations.
    pub migrations: BTreeSet<u64>,
    /// Changed segments.
    pub segments: BTreeSet<(u64, u64)>,
    /// The cluster id was set.
    pub cluster: bool,
}

/// The whole replicated state.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Agents by name.
    pub agents: BTreeMap<String, Agent>,
    /// Migrations by id.
    pub migrations: BTreeMap<u64, Migration>,
    /// Segments by `(migration id, segment id)`. Serialised as a list of pairs: JSON maps need
    /// string keys.
    #[serde(with = "pairs")]
    pub segments: BTreeMap<(u64, u64), Segment>,
    /// Derived index: pending segment ids per migration (rebuilt on load, never persisted).
    #[serde(skip)]
    pending: BTreeMap<u64, BTreeSet<u64>>,
    /// Derived index: pending segments waiting out a backoff, per migration, as
    /// `(not_before_ms, segment id)`.
    #[serde(skip)]
    waiting: BTreeMap<u64, BTreeSet<(u64, u64)>>,
    /// Derived index: leased segment ids per migration.
    #[serde(skip)]
    leased: BTreeMap<u64, BTreeSet<u64>>,
    /// Derived index: migration id by name.
    #[serde(skip)]
    by_name: BTreeMap<String, u64>,
    /// Derived index: migration id by idempotency key.
    #[serde(skip)]
    by_key: BTreeMap<String, u64>,
    #[serde(skip)]
    dirty: Dirty,
    /// The cluster's random id, set by the first agent registration (empty before): agents
    /// key their local state by it, so a new cluster never meets an old one's state.
    pub cluster_id: String,
}

/// Serde for maps whose keys are not strings: a sequence of `(key, value)` pairs.
mod pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, K: Serialize, V: Serialize>(
        m: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    pub fn deserialize<'de, D, K, V>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        D: Deserializer<'de>,
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

fn refused(msg: impl Into<String>) -> Response {
    Response::Refused(msg.into())
}

impl State {
    /// Builds a state from stored records and rebuilds the derived indexes.
    pub fn from_parts(
        agents: BTreeMap<String, Agent>,
        migrations: BTreeMap<u64, Migration>,
        segments: BTreeMap<(u64, u64), Segment>,
    ) -> Self {
        let mut s = State {
            agents,
            migrations,
            segments,
            ..State::default()
        };
        s.rebuild_indexes();
        s
    }

    /// The stored parts (agents, migrations, segments), without the derived indexes.
    #[allow(clippy::type_complexity)]
    pub fn into_parts(
        self,
    ) -> (
        BTreeMap<String, Agent>,
        BTreeMap<u64, Migration>,
        BTreeMap<(u64, u64), Segment>,
    ) {
        (self.agents, self.migrations, self.segments)
    }

    /// Recomputes the derived indexes (pending and leased segments, names, keys).
    pub fn rebuild_indexes(&mut self) {
        self.pending.clear();
        self.waiting.clear();
        self.leased.clear();
        self.by_name.clear();
        self.by_key.clear();
        for m in self.migrations.values() {
            self.by_name.insert(m.name.clone(), m.id);
            if !m.idempotency_key.is_empty() {
                self.by_key.insert(m.idempotency_key.clone(), m.id);
            }
        }
        for (&(m, id), seg) in &self.segments {
            match seg.state {
                SegState::Pending if seg.not_before_ms > 0 => {
                    self.waiting
                        .entry(m)
                        .or_default()
                        .insert((seg.not_before_ms, id));
                }
                SegState::Pending => {
                    self.pending.entry(m).or_default().insert(id);
                }
                SegState::Leased { .. } => {
                    self.leased.entry(m).or_default().insert(id);
                }
                SegState::Verified | SegState::Failed => {}
            }
        }
    }

    /// Returns and clears the set of keys changed since the last call.
    pub fn take_dirty(&mut self) -> Dirty {
        std::mem::take(&mut self.dirty)
    }

    /// Applies the command committed at log index `index` (a batch: each of its commands, in
    /// order).
    pub fn apply(&mut self, index: u64, cmd: Command) -> Response {
        match cmd {
            Command::Batch(cmds) if cmds.len() > MAX_BATCH_COMMANDS => refused(format!(
                "a batch of {} commands is over the limit of {MAX_BATCH_COMMANDS}",
                cmds.len()
            )),
            Command::Batch(cmds) => Response::Batch(
                cmds.into_iter()
                    .enumerate()
                    .map(|(pos, c)| match c {
                        Command::Batch(_) => refused("batches do not nest"),
                        c => self.apply_one(fencing_token(index, pos), c),
                    })
                    .collect(),
            ),
            c => self.apply_one(fencing_token(index, 0), c),
        }
    }

    /// Applies one command; `token` is the fencing token of any lease it grants.
    fn apply_one(&mut self, token: u64, cmd: Command) -> Response {
        match cmd {
            Command::Batch(_) => refused("batches do not nest"),
            Command::RegisterAgent {
                name,
                data_addr,
                session,
                previous,
                new_cluster_id,
                applies_owners,
                now_ms,
            } => {
                if self.cluster_id.is_empty() && !new_cluster_id.is_empty() {
                    self.cluster_id = new_cluster_id;
                    self.dirty.cluster = true;
                }
                match self.register_agent(name.clone(), data_addr, session, previous, now_ms) {
                    Response::Ok => {
                        if let Some(a) = self.agents.get_mut(&name) {
                            a.applies_owners = applies_owners;
                        }
                        Response::Registered(self.cluster_id.clone())
                    }
                    other => other,
                }
            }
            Command::Heartbeat {
                name,
                session,
                now_ms,
            } => match self.agents.get_mut(&name) {
                Some(a) => match a.session_error(session) {
                    Some(why) => refused(why),
                    None => {
                        a.last_seen_ms = a.last_seen_ms.max(now_ms);
                        self.dirty.agents.insert(name);
                        Response::Ok
                    }
                },
                None => refused(format!("agent {name} is not registered; register first")),
            },
            Command::EndSession { name, session } => match self.agents.get_mut(&name) {
                // Ending a session that is not current changes nothing (a repeated request).
                Some(a) if a.session == session && session != 0 => {
                    a.session = 0;
                    self.dirty.agents.insert(name);
                    Response::Ok
                }
                _ => Response::Ok,
            },
            Command::CreateMigration {
                name,
                idempotency_key,
                spec,
                uuid,
                now_ms,
            } => self.create_migration(name, idempotency_key, spec, uuid, now_ms),
            Command::RegisterSegments {
                agent,
                migration_id,
                segments,
            } => self.register_segments(&agent, migration_id, segments),
            Command::CompleteScan {
                agent,
                migration_id,
                segments_total,
                issues,
                issues_total,
                hardlinks,
                excluded,
                root_error,
                now_ms,
            } => self.complete_scan(
                &agent,
                migration_id,
                ScanEnd {
                    total: segments_total,
                    issues,
                    issues_total,
                    hardlinks,
                    excluded,
                    root_error,
                },
                now_ms,
            ),
            Command::SourceProblem {
                agent,
                migration_id,
                error,
                issues,
            } => match self.source_migration(&agent, migration_id) {
                Err(r) => r,
                Ok(m) => {
                    if !error.is_empty() {
                        m.last_error = error;
                    }
                    // A resent segment may report the same path again: count each path once.
                    for issue in issues {
                        if m.scan_issues.iter().any(|(p, _)| *p == issue.0) {
                            continue;
                        }
                        m.scan_issues_total = m.scan_issues_total.saturating_add(1);
                        if m.scan_issues.len() < MAX_SCAN_ISSUES_KEPT {
                            m.scan_issues.push(issue);
                        }
                    }
                    // Left behind after it finished (a file vanished from its last segment):
                    // not done after all.
                    if m.phase == Phase::Done && m.scan_issues_total > 0 {
                        m.phase = Phase::Failed;
                    }
                    self.dirty.migrations.insert(migration_id);
                    Response::Ok
                }
            },
            Command::LeaseSegments {
                agent,
                session,
                max,
                now_ms,
                ttl_ms,
            } => match self.check_session(&agent, session) {
                Err(r) => r,
                Ok(()) => Response::Leases(self.lease(token, &agent, max, now_ms, ttl_ms)),
            },
            Command::RenewLeases {
                agent,
                session,
                leases,
                now_ms,
                ttl_ms,
            } => match self.check_session(&agent, session) {
                Err(r) => r,
                Ok(()) => Response::Renewed(
                    leases
                        .into_iter()
                        .map(|(m, s, e)| self.renew(&agent, m, s, e, now_ms, ttl_ms))
                        .collect(),
                ),
            },
            Command::ReportSegment {
                agent,
                session,
                role,
                migration_id,
                segment_id,
                epoch,
                result,
                retry_later,
                now_ms,
            } => {
                if let Err(r) = self.check_session(&agent, session) {
                    return r;
                }
                let (o, why) = self.report(
                    &agent,
                    role,
                    migration_id,
                    segment_id,
                    epoch,
                    result,
                    retry_later,
                    now_ms,
                );
                Response::Report(o, why)
            }
        }
    }

    fn register_agent(
        &mut self,
        name: String,
        data_addr: String,
        session: u64,
        previous: u64,
        now_ms: u64,
    ) -> Response {
        if session == 0 {
            return refused(format!(
                "agent {name} registered without a session; upgrade it to this coordinator's version"
            ));
        }
        if let Some(a) = self.agents.get_mut(&name) {
            let same = a.session == session;
            let succeeds = previous != 0 && a.session == previous;
            if !same && !succeeds && a.live(now_ms) {
                let seen = now_ms.saturating_sub(a.last_seen_ms) / 1000;
                let why = format!(
                    "agent {name} is already running: session {:016x} (data address {}) was \
                     heard from {seen} s ago, so a second process (session {session:016x}, data \
                     address {}) was refused. Two processes may not share an agent's identity: \
                     stop one of them. If the first one has died, start this one again after \
                     {} s (its session then expires)",
                    a.session,
                    if a.data_addr.is_empty() {
                        "none"
                    } else {
                        &a.data_addr
                    },
                    if data_addr.is_empty() {
                        "none"
                    } else {
                        &data_addr
                    },
                    SESSION_TIMEOUT_MS / 1000
                );
                a.conflict = format!("at {now_ms} (unix ms): {why}");
                self.dirty.agents.insert(name);
                return Response::Conflict(why);
            }
            if !same {
                // A new process: any earlier refusal is history.
                a.conflict.clear();
            }
            a.session = session;
            a.data_addr = data_addr;
            a.last_seen_ms = a.last_seen_ms.max(now_ms);
        } else {
            self.agents.insert(
                name.clone(),
                Agent {
                    name: name.clone(),
                    data_addr,
                    registered_ms: now_ms,
                    last_seen_ms: now_ms,
                    session,
                    conflict: String::new(),
                    applies_owners: false,
                },
            );
        }
        self.dirty.agents.insert(name);
        Response::Ok
    }

    /// Whether `session` is the current session of `agent`.
    fn check_session(&self, agent: &str, session: u64) -> Result<(), Response> {
        match self.agents.get(agent) {
            None => Err(refused(format!(
                "agent {agent} is not registered; register first"
            ))),
            Some(a) => a
                .session_error(session)
                .map_or(Ok(()), |why| Err(refused(why))),
        }
    }

    /// The id of the migration named `name`.
    pub fn migration_named(&self, name: &str) -> Option<u64> {
        self.by_name.get(name).copied()
    }

    fn create_migration(
        &mut self,
        name: String,
        key: String,
        spec: MigrationSpec,
        uuid: String,
        now_ms: u64,
    ) -> Response {
        if let Some(&id) = self.by_key.get(&key) {
            let m = &self.migrations[&id];
            if m.name == name && m.spec == spec {
                return Response::MigrationCreated(id);
            }
            return refused(format!(
                "idempotency key {key} already created migration {id} ({}) from a different \
                 request; a retry must repeat its request unchanged (a new request needs a new \
                 key)",
                m.name
            ));
        }
        if name.is_empty() {
            return refused("a migration needs a name");
        }
        if let Some(&id) = self.by_name.get(&name) {
            return refused(format!(
                "a migration named {name} already exists (id {id}); if it is the one you meant, \
                 see `ferryctl migration status {name}`, else choose another --name"
            ));
        }
        if spec.source_agent == spec.target_agent {
            return refused("source and target agent must differ");
        }
        for a in [&spec.source_agent, &spec.target_agent] {
            if !self.agents.contains_key(a) {
                return refused(format!(
                    "agent {a} is not registered; start it and check `ferryctl agents list`"
                ));
            }
        }
        if spec.segment_size == 0 {
            return refused("segment size must be at least 1 byte");
        }
        if uuid.is_empty() || self.migrations.values().any(|m| m.uuid == uuid) {
            return refused("a migration needs a fresh uuid");
        }
        let Some(id) = self
            .migrations
            .keys()
            .next_back()
            .map_or(Some(1), |last| last.checked_add(1))
        else {
            return refused("no migration id is left");
        };
        self.migrations.insert(
            id,
            Migration {
                id,
                name: name.clone(),
                uuid,
                idempotency_key: key.clone(),
                spec,
                phase: Phase::Planned,
                scan_complete: false,
                counters: Counters::default(),
                scan_issues: Vec::new(),
                scan_issues_total: 0,
                hardlinks: 0,
                excluded: 0,
                last_error: String::new(),
                created_ms: now_ms,
                finished_ms: 0,
            },
        );
        self.by_name.insert(name, id);
        if !key.is_empty() {
            self.by_key.insert(key, id);
        }
        self.dirty.migrations.insert(id);
        Response::MigrationCreated(id)
    }

    fn source_migration(&mut self, agent: &str, id: u64) -> Result<&mut Migration, Response> {
        match self.migrations.get_mut(&id) {
            None => Err(refused(format!("migration {id} does not exist"))),
            Some(m) if m.spec.source_agent != agent => Err(refused(format!(
                "agent {agent} is not the source of migration {id}"
            ))),
            Some(m) => Ok(m),
        }
    }

    fn register_segments(&mut self, agent: &str, mid: u64, segments: Vec<SegmentReg>) -> Response {
        let m = match self.source_migration(agent, mid) {
            Ok(m) => m,
            Err(r) => return r,
        };
        let complete = m.scan_complete;
        // Check the whole batch first: a refused command changes nothing.
        for r in &segments {
            match self.segments.get(&(mid, r.id)) {
                Some(s) if s.fingerprint == r.fingerprint => {}
                None if !complete => {}
                // A rescan after a source restart planned this segment differently; it may be
                // replaced only if no byte of it was ever sent.
                Some(s) if !complete && s.state == SegState::Pending && s.leases == 0 => {}
                _ => {
                    return refused(format!(
                        "migration {mid}: segment {} differs from the one already registered \
                         (the source tree changed between scans after a source restart); \
                         start a new migration",
                        r.id
                    ))
                }
            }
        }
        if complete {
            return Response::Ok;
        }
        // The totals after this batch, computed before anything changes: counts come from an
        // agent, and a sum that does not fit is a refused command, never a panic (which would
        // crash every node again on replay) nor a silent wrap.
        let Some((bytes, files)) = self.totals_after(mid, &segments) else {
            return refused(format!(
                "migration {mid}: registering these {} segments would overflow the migration's \
                 byte or file count; the source's segment sizes are not plausible (a corrupt \
                 manifest?) — check the source agent",
                segments.len()
            ));
        };
        let m = self.migrations.get_mut(&mid).expect("checked above");
        if m.phase == Phase::Planned {
            m.phase = Phase::Copying;
        }
        m.counters.bytes = bytes;
        m.counters.files = files;
        for r in segments {
            match self.segments.get_mut(&(mid, r.id)) {
                Some(s) if s.fingerprint == r.fingerprint => continue,
                Some(s) => {
                    s.bytes = r.bytes;
                    s.files = r.files;
                    s.fingerprint = r.fingerprint;
                }
                None => {
                    self.segments.insert(
                        (mid, r.id),
                        Segment {
                            bytes: r.bytes,
                            files: r.files,
                            fingerprint: r.fingerprint,
                            state: SegState::Pending,
                            leases: 0,
                            attempts: 0,
                            not_before_ms: 0,
                            source_hash: None,
                            target_hash: None,
                            last_error: String::new(),
                        },
                    );
                    self.pending.entry(mid).or_default().insert(r.id);
                    m.counters.segments = m.counters.segments.saturating_add(1);
                }
            }
            self.dirty.segments.insert((mid, r.id));
        }
        self.dirty.migrations.insert(mid);
        Response::Ok
    }

    /// The migration's byte and file totals once `segments` are registered (new ones added,
    /// replanned ones replacing their earlier size), or `None` if they do not fit in a `u64`.
    /// A segment listed twice in the batch counts as its last registration, as applying does.
    fn totals_after(&self, mid: u64, segments: &[SegmentReg]) -> Option<(u64, u64)> {
        let c = &self.migrations.get(&mid)?.counters;
        let (mut bytes, mut files) = (c.bytes, c.files);
        let mut seen: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for r in segments {
            let (old_bytes, old_files) = match seen.get(&r.id) {
                Some(&prev) => prev,
                None => match self.segments.get(&(mid, r.id)) {
                    Some(s) => (s.bytes, s.files as u64),
                    None => (0, 0),
                },
            };
            // Removing what is counted cannot underflow; saturate anyway rather than trust it.
            bytes = bytes.saturating_sub(old_bytes).checked_add(r.bytes)?;
            files = files
                .saturating_sub(old_files)
                .checked_add(r.files as u64)?;
            seen.insert(r.id, (r.bytes, r.files as u64));
        }
        Some((bytes, files))
    }

    fn complete_scan(&mut self, agent: &str, mid: u64, end: ScanEnd, now_ms: u64) -> Response {
        let ScanEnd {
            total,
            issues,
            issues_total,
            hardlinks,
            excluded,
            root_error,
        } = end;
        let m = match self.source_migration(agent, mid) {
            Ok(m) => m,
            Err(r) => return r,
        };
        if m.scan_complete {
            return Response::Ok;
        }
        // Segments past the end were planned by an earlier scan that a restarted source redid
        // with fewer segments: drop them if nothing of them was sent, else refuse.
        let stale: Vec<u64> = self
            .segments
            .range((mid, total)..=(mid, u64::MAX))
            .map(|(&(_, id), _)| id)
            .collect();
        if let Some(id) = stale.iter().find(|id| {
            let s = &self.segments[&(mid, **id)];
            s.state != SegState::Pending || s.leases > 0
        }) {
            return refused(format!(
                "migration {mid}: the rescan has {total} segments but segment {id} of an earlier \
                 scan was already sent; the source tree changed — start a new migration"
            ));
        }
        let registered = self.segments.range((mid, 0)..(mid, total)).count() as u64;
        if registered != total {
            return refused(format!(
                "migration {mid}: scan reports {total} segments but {registered} are registered; \
                 the source retries registration"
            ));
        }
        let m = self.migrations.get_mut(&mid).expect("checked above");
        for id in stale {
            let s = self.segments.remove(&(mid, id)).expect("listed above");
            self.pending.entry(mid).or_default().remove(&id);
            m.counters.segments = m.counters.segments.saturating_sub(1);
            m.counters.bytes = m.counters.bytes.saturating_sub(s.bytes);
            m.counters.files = m.counters.files.saturating_sub(s.files as u64);
            self.dirty.segments.insert((mid, id));
        }
        m.scan_complete = true;
        m.scan_issues = issues.into_iter().take(MAX_SCAN_ISSUES_KEPT).collect();
        m.scan_issues_total = issues_total;
        m.hardlinks = hardlinks;
        m.excluded = excluded;
        if !root_error.is_empty() {
            // Nothing was scanned: an empty copy of a tree that is not there must not end
            // "done" (0 of 0 segments verified).
            m.last_error = format!(
                "the source root {} on {} cannot be scanned: {root_error}; fix it (or the \
                 path) and create the migration again",
                m.spec.source_path, m.spec.source_agent
            );
            m.phase = Phase::Failed;
            m.finished_ms = now_ms;
            self.dirty.migrations.insert(mid);
            return Response::Ok;
        }
        if m.phase == Phase::Planned {
            m.phase = Phase::Copying;
        }
        Self::maybe_done(m, now_ms);
        self.dirty.migrations.insert(mid);
        Response::Ok
    }

    /// Ends the migration once its scan is complete and every segment is verified (`Done`) or
    /// verified or given up on, with at least one given up on (`Failed`).
    fn maybe_done(m: &mut Migration, now_ms: u64) {
        let c = &m.counters;
        if m.scan_complete
            && !m.phase.finished()
            && c.verified_segments.saturating_add(c.failed_segments) == c.segments
        {
            // Anything the scan could not copy (a FIFO, an unreadable file) fails the migration
            // too: a copy that left something behind is not done.
            m.phase = if c.failed_segments > 0 || m.scan_issues_total > 0 {
                Phase::Failed
            } else {
                Phase::Done
            };
            m.finished_ms = now_ms;
        }
    }

    /// The scheduler: grants `agent` up to `max` pending segments of migrations it is the source
    /// of, lowest ids first, round-robin across migrations, after returning expired leases.
    fn lease(&mut self, token: u64, agent: &str, max: u32, now_ms: u64, ttl_ms: u64) -> Vec<Lease> {
        let mids: Vec<u64> = self
            .migrations
            .values()
            .filter(|m| m.phase == Phase::Copying && m.spec.source_agent == agent)
            .map(|m| m.id)
            .collect();
        let mut held = 0usize;
        for &mid in &mids {
            self.expire_leases(mid, now_ms);
            held += self.leased.get(&mid).map_or(0, |s| s.len());
        }
        let mut budget = (max as usize).min(MAX_LEASES_PER_AGENT.saturating_sub(held));
        let mut out = Vec::new();
        let mut progress = true;
        while budget > 0 && progress {
            progress = false;
            for &mid in &mids {
                if budget == 0 {
                    break;
                }
                let m = &self.migrations[&mid];
                let Some(target) = self.agents.get(&m.spec.target_agent) else {
                    continue;
                };
                // Never schedule to a target no source can reach: the segment would only fail
                // (`blocker` tells the operator why nothing moves).
                if target.undialable().is_some() {
                    continue;
                }
                let Some(id) = Self::next_ready(&mut self.pending, &mut self.waiting, mid, now_ms)
                else {
                    continue;
                };
                let seg = self
                    .segments
                    .get_mut(&(mid, id))
                    .expect("indexed segment exists");
                let expires_ms = now_ms.saturating_add(ttl_ms);
                seg.grant(token, expires_ms);
                self.leased.entry(mid).or_default().insert(id);
                self.dirty.segments.insert((mid, id));
                out.push(Lease {
                    migration_id: mid,
                    segment_id: id,
                    epoch: token,
                    expires_ms,
                    attempts: seg.attempts,
                    target_agent: target.name.clone(),
                    target_addr: target.data_addr.clone(),
                });
                let m = self.migrations.get_mut(&mid).expect("listed above");
                m.counters.leases_granted = m.counters.leases_granted.saturating_add(1);
                self.dirty.migrations.insert(mid);
                budget -= 1;
                progress = true;
            }
        }
        out
    }

    /// The next segment of migration `mid` to lease at `now_ms`, taken out of its index: the
    /// lowest pending id, else the segment whose backoff ended first if it has ended.
    fn next_ready(
        pending: &mut BTreeMap<u64, BTreeSet<u64>>,
        waiting: &mut BTreeMap<u64, BTreeSet<(u64, u64)>>,
        mid: u64,
        now_ms: u64,
    ) -> Option<u64> {
        if let Some(id) = pending.get_mut(&mid).and_then(|p| p.pop_first()) {
            return Some(id);
        }
        let waiting = waiting.get_mut(&mid)?;
        match waiting.first() {
            Some(&(not_before, _)) if not_before <= now_ms => waiting.pop_first().map(|(_, id)| id),
            _ => None,
        }
    }

    /// Extends lease `epoch` on segment `sid` of migration `mid` if `agent` is its source and
    /// the lease is still current (not expired, not replaced).
    fn renew(
        &mut self,
        agent: &str,
        mid: u64,
        sid: u64,
        epoch: u64,
        now_ms: u64,
        ttl_ms: u64,
    ) -> bool {
        if self
            .migrations
            .get(&mid)
            .is_none_or(|m| m.spec.source_agent != agent)
        {
            return false;
        }
        let Some(seg) = self.segments.get_mut(&(mid, sid)) else {
            return false;
        };
        let renewed = seg.extend(epoch, now_ms, now_ms.saturating_add(ttl_ms));
        if renewed {
            self.dirty.segments.insert((mid, sid));
        }
        renewed
    }

    fn expire_leases(&mut self, mid: u64, now_ms: u64) {
        let Some(leased) = self.leased.get_mut(&mid) else {
            return;
        };
        let expired: Vec<u64> = leased
            .iter()
            .copied()
            .filter(|id| {
                matches!(self.segments[&(mid, *id)].state,
                         SegState::Leased { expires_ms, .. } if expires_ms <= now_ms)
            })
            .collect();
        for id in expired {
            leased.remove(&id);
            let seg = self.segments.get_mut(&(mid, id)).expect("indexed");
            seg.expire();
            self.pending.entry(mid).or_default().insert(id);
            self.dirty.segments.insert((mid, id));
        }
    }

    /// Whether a lease request from `agent` at `now_ms` could grant anything: a pending segment, or
    /// an expired lease to take back, in a migration it is the source of. Lets the service answer
    /// "nothing" without writing a log entry.
    pub fn has_leasable(&self, agent: &str, now_ms: u64) -> bool {
        self.migrations
            .values()
            .filter(|m| m.phase == Phase::Copying && m.spec.source_agent == agent)
            .filter(|m| {
                self.agents
                    .get(&m.spec.target_agent)
                    .is_some_and(|t| t.undialable().is_none())
            })
            .any(|m| {
                self.pending.get(&m.id).is_some_and(|p| !p.is_empty())
                    || self
                        .waiting
                        .get(&m.id)
                        .and_then(|w| w.first())
                        .is_some_and(|&(not_before, _)| not_before <= now_ms)
                    || self.leased.get(&m.id).into_iter().flatten().any(|id| {
                        matches!(self.segments[&(m.id, *id)].state,
                                 SegState::Leased { expires_ms, .. } if expires_ms <= now_ms)
                    })
            })
    }

    /// Why migration `mid` cannot make progress now, if something outside it stops it: its
    /// target cannot be sent to, or an agent has not been heard from for a session's timeout.
    /// What the operator should know about how the copy differs from the source, though nothing
    /// was lost (owners not applied by a target that does not run as root).
    pub fn notes(&self, mid: u64) -> Vec<String> {
        let mut out = Vec::new();
        let Some(m) = self.migrations.get(&mid) else {
            return out;
        };
        if let Some(t) = self.agents.get(&m.spec.target_agent) {
            if !t.applies_owners {
                out.push(format!(
                    "owners not kept: target agent {} does not run as root, so files belong to                      its user and set-id bits are dropped (run it as root to keep uid/gid)",
                    t.name
                ));
            }
        }
        out
    }

    pub fn blocker(&self, mid: u64, now_ms: u64) -> Option<String> {
        let m = self.migrations.get(&mid)?;
        if m.phase.finished() {
            return None;
        }
        let (src, dst) = (&m.spec.source_agent, &m.spec.target_agent);
        let Some(target) = self.agents.get(dst) else {
            return Some(format!("target agent {dst} is not registered; start it"));
        };
        if let Some(why) = target.undialable() {
            return Some(format!("nothing is sent to the target: {why}"));
        }
        for (role, a) in [("source", self.agents.get(src)), ("target", Some(target))] {
            match a {
                None => return Some(format!("{role} agent {src} is not registered; start it")),
                Some(a) if a.session == 0 => {
                    return Some(format!("{role} agent {} was shut down; start it", a.name))
                }
                Some(a) if !a.live(now_ms) => {
                    return Some(format!(
                        "{role} agent {} has not been heard from for {} s; is it running?",
                        a.name,
                        now_ms.saturating_sub(a.last_seen_ms) / 1000
                    ))
                }
                Some(_) => {}
            }
        }
        None
    }

    /// The unexpired leases `agent` holds as a source.
    pub fn leases_of(&self, agent: &str, now_ms: u64) -> Vec<Lease> {
        let mut out = Vec::new();
        for m in self
            .migrations
            .values()
            .filter(|m| m.spec.source_agent == agent)
        {
            let Some(target) = self.agents.get(&m.spec.target_agent) else {
                continue;
            };
            for &id in self.leased.get(&m.id).into_iter().flatten() {
                let seg = &self.segments[&(m.id, id)];
                if let SegState::Leased { epoch, expires_ms } = seg.state {
                    if expires_ms > now_ms {
                        out.push(Lease {
                            migration_id: m.id,
                            segment_id: id,
                            epoch,
                            expires_ms,
                            attempts: seg.attempts,
                            target_agent: target.name.clone(),
                            target_addr: target.data_addr.clone(),
                        });
                    }
                }
            }
        }
        out
    }

    /// Whether lease `epoch` on the segment is current and `target` is the migration's target.
    /// The caller must still check that its peer is `spec.source_agent`.
    pub fn check_lease(
        &self,
        target: &str,
        mid: u64,
        sid: u64,
        epoch: u64,
        now_ms: u64,
    ) -> Result<&Migration, LeaseRefusal> {
        let m = self
            .migrations
            .get(&mid)
            .ok_or(LeaseRefusal::NoMigration(mid))?;
        if m.spec.target_agent != target {
            return Err(LeaseRefusal::NotTheTarget {
                target: target.to_string(),
                mid,
            });
        }
        let seg = self
            .segments
            .get(&(mid, sid))
            .ok_or(LeaseRefusal::NoSegment { mid, sid })?;
        match seg.state {
            SegState::Leased {
                epoch: e,
                expires_ms,
            } if e == epoch && expires_ms > now_ms => Ok(m),
            SegState::Leased { epoch: e, .. } if e == epoch => Err(LeaseRefusal::Expired),
            SegState::Verified => Err(LeaseRefusal::AlreadyVerified),
            SegState::Failed => Err(LeaseRefusal::GivenUp {
                attempts: seg.attempts,
                last_error: seg.last_error.clone(),
            }),
            _ => Err(LeaseRefusal::NotCurrent(epoch)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn report(
        &mut self,
        agent: &str,
        role: Role,
        mid: u64,
        sid: u64,
        epoch: u64,
        result: Result<Digest, String>,
        retry_later: bool,
        now_ms: u64,
    ) -> (ReportOutcome, String) {
        let Some(m) = self.migrations.get_mut(&mid) else {
            return (
                ReportOutcome::Rejected,
                format!("migration {mid} does not exist"),
            );
        };
        let expected = match role {
            Role::Source => &m.spec.source_agent,
            Role::Target => &m.spec.target_agent,
        };
        if expected != agent {
            return (
                ReportOutcome::Rejected,
                format!("agent {agent} is not the {role:?} of migration {mid}"),
            );
        }
        let Some(seg) = self.segments.get_mut(&(mid, sid)) else {
            return (
                ReportOutcome::Rejected,
                format!("segment {sid} does not exist"),
            );
        };
        match seg.state {
            SegState::Leased { epoch: e, .. } if e == epoch => {}
            // A report repeated after its answer was lost (a timeout, a leader change): the
            // segment is already verified with the hash this end reports, so say so.
            SegState::Verified
                if result.as_ref().ok()
                    == match role {
                        Role::Source => seg.source_hash.as_ref(),
                        Role::Target => seg.target_hash.as_ref(),
                    } =>
            {
                return (ReportOutcome::Verified, String::new());
            }
            _ => {
                return (
                    ReportOutcome::Rejected,
                    format!("lease {epoch} is not current"),
                )
            }
        }
        self.dirty.segments.insert((mid, sid));
        self.dirty.migrations.insert(mid);
        let hash = match result {
            Ok(h) => h,
            Err(e) => {
                let why = format!("{role:?}: {e}");
                self.leased.entry(mid).or_default().remove(&sid);
                let cost = if retry_later {
                    Cost::Nothing
                } else {
                    Cost::Attempt
                };
                let o = Self::failed(seg, m, sid, &why, cost, now_ms, &mut self.waiting);
                return (o, why);
            }
        };
        match role {
            Role::Source => seg.source_hash = Some(hash),
            Role::Target => seg.target_hash = Some(hash),
        }
        match (seg.source_hash, seg.target_hash) {
            (Some(s), Some(t)) if s == t => {
                seg.verify();
                self.leased.entry(mid).or_default().remove(&sid);
                // Never more than the registered totals, which are checked when registered.
                let c = &mut m.counters;
                c.verified_segments = c.verified_segments.saturating_add(1);
                c.verified_bytes = c.verified_bytes.saturating_add(seg.bytes);
                c.verified_files = c.verified_files.saturating_add(seg.files as u64);
                Self::maybe_done(m, now_ms);
                (ReportOutcome::Verified, String::new())
            }
            (Some(_), Some(_)) => {
                let why = "source and target BLAKE3 differ".to_string();
                self.leased.entry(mid).or_default().remove(&sid);
                let o = Self::failed(seg, m, sid, &why, Cost::Attempt, now_ms, &mut self.waiting);
                (o, why)
            }
            _ => (ReportOutcome::Waiting, String::new()),
        }
    }

    /// Puts leased segment `sid` (already out of the leased index) back after a failed
    /// attempt, recording `why`. A counted failure ([`Cost::Attempt`]) backs off by the attempts
    /// so far, and at the migration's `max_attempts` the segment is given up on; one that is
    /// not the segment's own ([`Cost::Nothing`]) backs off by how often it was leased, so a
    /// target that stays unreachable is not retried in a tight loop.
    fn failed(
        seg: &mut Segment,
        m: &mut Migration,
        sid: u64,
        why: &str,
        cost: Cost,
        now_ms: u64,
        waiting: &mut BTreeMap<u64, BTreeSet<(u64, u64)>>,
    ) -> ReportOutcome {
        seg.forget_attempt(why);
        m.last_error = why.to_string();
        let n = match cost {
            Cost::Nothing => seg.leases.max(1),
            Cost::Attempt => {
                seg.attempts = seg.attempts.saturating_add(1);
                m.counters.failed_attempts = m.counters.failed_attempts.saturating_add(1);
                if seg.attempts >= m.spec.max_attempts.max(1) {
                    seg.give_up();
                    let c = &mut m.counters;
                    c.failed_segments = c.failed_segments.saturating_add(1);
                    c.failed_bytes = c.failed_bytes.saturating_add(seg.bytes);
                    c.failed_files = c.failed_files.saturating_add(seg.files as u64);
                    Self::maybe_done(m, now_ms);
                    return ReportOutcome::GaveUp;
                }
                seg.attempts
            }
        };
        let not_before = seg.wait_until(now_ms.saturating_add(retry_delay_ms(m.id, sid, n)));
        waiting.entry(m.id).or_default().insert((not_before, sid));
        ReportOutcome::Failed
    }
}

/// What a failed transfer costs its segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cost {
    /// One of its `max_attempts`: the failure is the segment's (unreadable file, full disk,
    /// hashes that differ).
    Attempt,
    /// Nothing: the failure is not the segment's (the source shut down, the target could not be
    /// reached, a hardlink waits for its first name).
    Nothing,
}

#[cfg(test)]
mod tests;
