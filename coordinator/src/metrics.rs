//! What a coordinator node's `/metrics` shows (see [`ferry_common::ops`]): its Raft figures, and
//! the migrations and agents as its applied state has them, read at each scrape.
//!
//! Every node exports the state it applied, so the figures of one migration appear once per
//! node: aggregate them with `max by (migration)` (a follower's may lag a moment behind).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use ferry_common::ops::{self, Collector, Encoder, Labels};

use crate::raft_types::Raft;
use crate::state::Phase;
use crate::store::Applied;

/// A coordinator node's collector.
pub struct NodeMetrics {
    /// Raft, for its metrics.
    pub raft: Raft,
    /// The applied state.
    pub applied: Arc<RwLock<Applied>>,
    /// The last committed index (the log store keeps it).
    pub committed: Arc<AtomicU64>,
    /// Leader changes this node saw (counted by `node::watch_leader`).
    pub leader_changes: Arc<AtomicU64>,
    /// The node's snapshot file (its age is its mtime's).
    pub snapshot_file: PathBuf,
}

impl std::fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeMetrics").finish_non_exhaustive()
    }
}

const PHASES: [Phase; 5] = [
    Phase::Planned,
    Phase::Copying,
    Phase::Syncing,
    Phase::Done,
    Phase::Failed,
];

impl Collector for NodeMetrics {
    fn encode(&self, mut enc: Encoder) -> std::fmt::Result {
        let e = &mut enc;
        let m = self.raft.metrics().borrow().clone();
        ops::gauge(
            e,
            "ferry_raft_term",
            "Current Raft term.",
            m.current_term as f64,
        )?;
        ops::gauge(
            e,
            "ferry_raft_is_leader",
            "1 if this node is the Raft leader.",
            f64::from(u8::from(m.current_leader == Some(m.id))),
        )?;
        ops::gauge(
            e,
            "ferry_raft_has_leader",
            "1 if this node knows a leader (0 during an election, or when it is not a member).",
            f64::from(u8::from(m.current_leader.is_some())),
        )?;
        ops::counter(
            e,
            "ferry_raft_leader_changes",
            "Leader changes this node saw since it started (a new leader, or the leader lost).",
            self.leader_changes.load(Ordering::Relaxed),
        )?;
        let last_log = m.last_log_index.unwrap_or(0);
        ops::gauge(
            e,
            "ferry_raft_last_log_index",
            "Index of the last entry in this node's log.",
            last_log as f64,
        )?;
        ops::gauge(
            e,
            "ferry_raft_commit_index",
            "Index of the last entry this node knows committed.",
            self.committed.load(Ordering::Relaxed) as f64,
        )?;
        ops::gauge(
            e,
            "ferry_raft_applied_index",
            "Index of the last entry applied to this node's state.",
            m.last_applied.map_or(0, |l| l.index) as f64,
        )?;
        let purged = m.purged.map_or(0, |l| l.index);
        ops::gauge(
            e,
            "ferry_raft_log_entries",
            "Entries in this node's log (after the last compaction).",
            last_log.saturating_sub(purged) as f64,
        )?;
        ops::gauge(
            e,
            "ferry_raft_snapshot_index",
            "Last log index the node's latest snapshot covers (0: none).",
            m.snapshot.map_or(0, |l| l.index) as f64,
        )?;
        let age = std::fs::metadata(&self.snapshot_file)
            .and_then(|md| md.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        // Declared without a sample until the node has a snapshot.
        let (name, help) = (
            "ferry_raft_snapshot_age_seconds",
            "Seconds since this node's latest snapshot was built or installed (no sample: none yet).",
        );
        match age {
            Some(age) => ops::gauge(e, name, help, age.as_secs_f64())?,
            None => ops::gauges(e, name, help, std::iter::empty())?,
        }
        ops::gauge(
            e,
            "ferry_raft_voters",
            "Voting members of the cluster, as this node knows its membership.",
            m.membership_config.membership().voter_ids().count() as f64,
        )?;
        // Always declared (empty off the leader), so dashboards and rules find the family.
        let lag = m
            .replication
            .iter()
            .flat_map(|r| r.iter())
            .map(|(id, matched)| {
                let at = matched.map_or(0, |l| l.index);
                (
                    vec![("follower", id.to_string())],
                    last_log.saturating_sub(at) as f64,
                )
            });
        ops::gauges(
            e,
            "ferry_raft_follower_lag_entries",
            "On the leader: entries each follower has still to replicate.",
            lag,
        )?;

        let applied = self.applied.read().expect("not poisoned");
        let s = &applied.state;
        let now_ms = crate::grpc::now_ms();
        let by = |name: &str| -> Labels { vec![("migration", name.to_string())] };
        let migrations: Vec<_> = s.migrations.values().collect();
        ops::gauges(
            e,
            "ferry_migration_phase",
            "1 for the phase each migration is in (planned, copying, syncing, done, failed).",
            migrations.iter().flat_map(|m| {
                PHASES.iter().map(|p| {
                    (
                        vec![
                            ("migration", m.name.clone()),
                            ("phase", p.as_str().to_string()),
                        ],
                        f64::from(u8::from(m.phase == *p)),
                    )
                })
            }),
        )?;
        ops::gauges(
            e,
            "ferry_migration_scan_complete",
            "1 once the current round's scan is complete (until then the totals still grow).",
            migrations
                .iter()
                .map(|m| (by(&m.name), f64::from(u8::from(m.scan_complete)))),
        )?;
        ops::gauges(
            e,
            "ferry_migration_bytes",
            "File bytes registered for each migration (all rounds).",
            migrations
                .iter()
                .map(|m| (by(&m.name), m.counters.bytes as f64)),
        )?;
        ops::gauges(
            e,
            "ferry_migration_files",
            "Files registered for each migration (all rounds).",
            migrations
                .iter()
                .map(|m| (by(&m.name), m.counters.files as f64)),
        )?;
        ops::counters(
            e,
            "ferry_bytes_verified",
            "File bytes verified (durable at the target, equal BLAKE3 at both ends), per migration.",
            migrations
                .iter()
                .map(|m| (by(&m.name), m.counters.verified_bytes)),
        )?;
        ops::counters(
            e,
            "ferry_files_verified",
            "Files verified, per migration.",
            migrations
                .iter()
                .map(|m| (by(&m.name), m.counters.verified_files)),
        )?;
        ops::counters(
            e,
            "ferry_segment_failures",
            "Failed transfer attempts (errors and hash mismatches), per migration.",
            migrations
                .iter()
                .map(|m| (by(&m.name), m.counters.failed_attempts)),
        )?;
        ops::gauges(
            e,
            "ferry_segments",
            "Segments per migration by state: pending (waiting for a lease), leased, verified, failed (given up), stale (its file changed; the next round sends it).",
            migrations.iter().flat_map(|m| {
                let (pending, leased) = s.queued(m.id);
                let c = &m.counters;
                [
                    ("pending", pending),
                    ("leased", leased),
                    ("verified", c.verified_segments),
                    ("failed", c.failed_segments),
                    ("stale", c.stale_segments),
                ]
                .map(|(state, n)| {
                    (
                        vec![
                            ("migration", m.name.clone()),
                            ("state", state.to_string()),
                        ],
                        n as f64,
                    )
                })
            }),
        )?;
        ops::gauges(
            e,
            "ferry_agent_up",
            "1 while an agent's session is live (it registered and was heard from within the session timeout).",
            s.agents.values().map(|a| {
                (
                    vec![("agent", a.name.clone())],
                    f64::from(u8::from(a.live(now_ms))),
                )
            }),
        )?;
        ops::gauges(
            e,
            "ferry_agent_last_seen_timestamp_seconds",
            "When each agent was last heard from, as committed (Unix seconds; refreshed every few seconds while it heartbeats).",
            s.agents
                .values()
                .map(|a| (vec![("agent", a.name.clone())], a.last_seen_ms as f64 / 1000.0)),
        )
    }
}
