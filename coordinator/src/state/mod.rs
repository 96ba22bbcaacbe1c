//! The replicated state and the rules that change it. Pure: no I/O and no clock — every time value
//! arrives inside a [`Command`] (the leader stamps it when proposing), and the log index of the entry
//! is passed in by the store. Given the same entries, every node computes the same state.
//!
//! `commands` dispatches each committed [`Command`]; the rules live by subject: `segment` (a
//! segment's states and transitions, the retry backoff), `agents` (registration, sessions),
//! `phases` (a migration from creation through scanning to done or failed), `scheduler`
//! (leases: granting, renewing, expiring), `reports` (verification, failed attempts), `delete`
//! (a migration removed, its agents told to forget it) and `reads` (what operators and targets
//! ask without changing anything).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

mod agents;
mod audit;
mod commands;
mod cutover;
mod delete;
mod fallback;
mod jobs;
mod phases;
mod pki;
mod pool;
mod reads;
mod reports;
mod rounds;
mod scheduler;
mod segmap;
mod segment;
mod throttles;
mod verification;

pub use agents::{Agent, FORGET_MAX, SESSION_TIMEOUT_MS};
pub use audit::{record_hash, verify_chain, AuditNote, AuditRecord, AUDIT_KEPT};
pub use commands::{Command, ThrottleScope};
pub use cutover::{
    next_cutover_attempt, Cutover, CutoverPhase, Step, StepRun, TreeDigest, CLASSES,
    MAX_STEP_OUTPUT,
};
pub use jobs::{
    Job, JobKind, JobPart, JobState, JobUpdate, MAX_JOBS_KEPT, MAX_JOB_TEXT, MAX_PROBE_SECONDS,
    MAX_PROBE_STREAMS,
};
use phases::ScanEnd;
pub use phases::{Counters, Migration, MigrationSpec, Phase};
pub use pki::{
    agent_identity, operator_identity, IssuedCert, JoinTokenRecord, Pki, Revocation, TokenUse,
    MAX_TOKEN_TTL_MS,
};
pub use pool::{PoolMember, MAX_TARGETS};
pub use reads::LeaseRefusal;
use reports::Cost;
pub use reports::ReportOutcome;
pub use rounds::{Round, MAX_ROUNDS_KEPT};
pub use scheduler::Lease;
pub use segmap::{IdSet, SegmentMap};
pub use segment::{retry_delay_ms, Hashes, Reason, SegState, Segment, SegmentReg};
pub use verification::FullVerification;

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

/// Which end reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The reading end.
    Source,
    /// The writing end.
    Target,
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
    /// A job was started with this id.
    JobStarted(u64),
}

/// A counter kept by each node for itself, not part of the replicated state: two states are
/// equal whatever their counts.
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalCount(pub u64);

impl PartialEq for LocalCount {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for LocalCount {}

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
    /// [`State::deleted_up_to`] changed.
    pub deleted_up_to: bool,
    /// Audit records appended.
    pub audit: BTreeSet<u64>,
    /// Jobs started, changed or dropped.
    pub jobs: BTreeSet<u64>,
    /// Tokens, certificates or revocations changed.
    pub pki: bool,
}

/// The whole replicated state.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Agents by name.
    pub agents: BTreeMap<String, Agent>,
    /// Migrations by id.
    pub migrations: BTreeMap<u64, Migration>,
    /// Segments by `(migration id, segment id)` (serialised as a list of pairs).
    pub segments: SegmentMap,
    /// Derived index: pending segment ids per migration (rebuilt on load, never persisted).
    #[serde(skip)]
    pending: BTreeMap<u64, IdSet>,
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
    /// Derived index: the migrations each agent is the source of (a source's spec never
    /// changes), so that what one agent asks for — its heartbeat's work, its leases — costs its
    /// own migrations, not every migration (5,000 agents heartbeating against 2,500 migrations
    /// spent a fifth of the leader's CPU comparing agent names).
    #[serde(skip)]
    by_source: AgentIndex,
    /// Derived index: the migrations each agent is the (first) target of, by its spec.
    #[serde(skip)]
    by_target: AgentIndex,
    #[serde(skip)]
    dirty: Dirty,
    /// Derived, local: how many commands applied here that may change what agents are asked to
    /// do (all but the frequent ones of the data path: leases, renewals, reports, heartbeats,
    /// segment registrations). A held heartbeat looks at its answer at once after one of these,
    /// and at most every so often after the others ([`crate::grpc`]'s agent service).
    #[serde(skip)]
    pub work_changes: LocalCount,
    /// The cluster's random id, set by the first agent registration (empty before): agents
    /// key their local state by it, so a new cluster never meets an old one's state.
    pub cluster_id: String,
    /// The highest id of a deleted migration (0: none deleted): ids are never given again,
    /// also when the newest migrations were deleted (agents and operators know migrations by
    /// id). Record `deleted_up_to`.
    #[serde(default)]
    pub deleted_up_to: u64,
    /// The audit log by record number (records `u/<seq>`).
    #[serde(default)]
    pub audit: BTreeMap<u64, AuditRecord>,
    /// Agents' jobs by id (records `j/<id>`; the newest [`MAX_JOBS_KEPT`]).
    #[serde(default)]
    pub jobs: BTreeMap<u64, Job>,
    /// Join tokens, signed certificates, revoked agents (record `pki`).
    #[serde(default)]
    pub pki: Pki,
}

/// No migration ids.
static EMPTY_IDS: BTreeSet<u64> = BTreeSet::new();

/// Migration ids by agent name ([`State`]'s `by_source`, `by_target`).
type AgentIndex = BTreeMap<String, BTreeSet<u64>>;

/// Indexes migration `id` under its source and target agents (a function of the two indexes,
/// not of the state, so that a rebuild can call it while it walks the migrations).
fn index_agents(
    by_source: &mut AgentIndex,
    by_target: &mut AgentIndex,
    id: u64,
    spec: &MigrationSpec,
) {
    for (index, agent) in [
        (by_source, &spec.source_agent),
        (by_target, &spec.target_agent),
    ] {
        index.entry(agent.clone()).or_default().insert(id);
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
        segments: SegmentMap,
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
        SegmentMap,
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
        self.by_source.clear();
        self.by_target.clear();
        for m in self.migrations.values() {
            self.by_name.insert(m.name.clone(), m.id);
            index_agents(&mut self.by_source, &mut self.by_target, m.id, &m.spec);
            if !m.idempotency_key.is_empty() {
                self.by_key.insert(m.idempotency_key.clone(), m.id);
            }
        }
        for ((m, id), seg) in self.segments.iter() {
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
                SegState::Verified | SegState::Failed | SegState::Stale => {}
            }
        }
    }

    /// The migrations `agent` is the source of, in id order.
    pub fn sourced_by<'a>(&'a self, agent: &str) -> impl Iterator<Item = &'a Migration> + 'a {
        self.by_source
            .get(agent)
            .into_iter()
            .flatten()
            .map(|id| &self.migrations[id])
    }

    /// The migrations `agent` is the source or the spec's target of, in id order.
    pub fn sourced_or_targeted_by<'a>(
        &'a self,
        agent: &str,
    ) -> impl Iterator<Item = &'a Migration> + 'a {
        let empty = &EMPTY_IDS;
        let sourced = self.by_source.get(agent).unwrap_or(empty);
        let targeted = self.by_target.get(agent).unwrap_or(empty);
        sourced.union(targeted).map(|id| &self.migrations[id])
    }

    /// Drops migration `id` from the agent indexes (an agent left with none leaves no entry).
    fn unindex_agents(&mut self, id: u64, spec: &MigrationSpec) {
        for (index, agent) in [
            (&mut self.by_source, &spec.source_agent),
            (&mut self.by_target, &spec.target_agent),
        ] {
            if let Some(ids) = index.get_mut(agent) {
                ids.remove(&id);
                if ids.is_empty() {
                    index.remove(agent);
                }
            }
        }
    }

    /// Returns and clears the set of keys changed since the last call.
    pub fn take_dirty(&mut self) -> Dirty {
        std::mem::take(&mut self.dirty)
    }
}

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;
