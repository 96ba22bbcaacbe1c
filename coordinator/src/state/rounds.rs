//! Rounds: round 0 is the bulk copy; each sync round after it has the source rescan its tree
//! and send only what changed since the previous round's scan (and what that round did not
//! copy). A round's segments take the ids after the previous round's, so segment ids stay
//! unique in a migration and every round's are one range.

use super::*;

/// Rounds kept in a migration's record (the oldest are dropped; `Round::number` keeps
/// counting).
pub const MAX_ROUNDS_KEPT: usize = 64;

/// One round of a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Round {
    /// 0 for the bulk copy, then 1, 2, ...
    pub number: u32,
    /// Its first segment id; its segments are `first_segment..first_segment + segments`.
    pub first_segment: u64,
    /// Segments its scan produced (known once the scan is complete).
    pub segments: u64,
    /// Names it deletes at the target (removed at the source since the previous round).
    pub deleted: u64,
    /// When it started (unix ms).
    pub started_ms: u64,
    /// When it ended (unix ms; 0 while it runs).
    pub finished_ms: u64,
    /// How it ended: `Done`, `Failed`, or `Syncing` when files changed during it and the next
    /// round followed at once (`Copying` / `Syncing` while it runs).
    pub outcome: Phase,
    /// The migration's counters when it started: what it did is the difference.
    pub at_start: Counters,
    /// The counters when it ended (equal to `at_start` until then).
    pub at_end: Counters,
}

impl Round {
    pub(super) fn new(number: u32, first_segment: u64, now_ms: u64, at_start: Counters) -> Self {
        Round {
            number,
            first_segment,
            segments: 0,
            deleted: 0,
            started_ms: now_ms,
            finished_ms: 0,
            outcome: if number == 0 {
                Phase::Copying
            } else {
                Phase::Syncing
            },
            at_end: at_start.clone(),
            at_start,
        }
    }

    pub(super) fn end(&mut self, outcome: Phase, now_ms: u64, counters: &Counters) {
        self.outcome = outcome;
        self.finished_ms = now_ms;
        self.at_end = counters.clone();
    }

    /// What the round did: the counters' growth while it ran (to now, while it runs).
    pub fn delta(&self, now: &Counters) -> Counters {
        let end = if self.finished_ms == 0 {
            now
        } else {
            &self.at_end
        };
        let s = &self.at_start;
        Counters {
            segments: end.segments.saturating_sub(s.segments),
            bytes: end.bytes.saturating_sub(s.bytes),
            files: end.files.saturating_sub(s.files),
            verified_segments: end.verified_segments.saturating_sub(s.verified_segments),
            verified_bytes: end.verified_bytes.saturating_sub(s.verified_bytes),
            verified_files: end.verified_files.saturating_sub(s.verified_files),
            leases_granted: end.leases_granted.saturating_sub(s.leases_granted),
            failed_attempts: end.failed_attempts.saturating_sub(s.failed_attempts),
            failed_segments: end.failed_segments.saturating_sub(s.failed_segments),
            stale_segments: end.stale_segments.saturating_sub(s.stale_segments),
            failed_bytes: end.failed_bytes.saturating_sub(s.failed_bytes),
            failed_files: end.failed_files.saturating_sub(s.failed_files),
        }
    }
}

impl Migration {
    /// The current (last) round.
    pub fn round(&self) -> &Round {
        self.rounds
            .last()
            .expect("a migration has round 0 from its creation")
    }

    pub(super) fn round_mut(&mut self) -> &mut Round {
        self.rounds
            .last_mut()
            .expect("a migration has round 0 from its creation")
    }

    /// Ends the current round with `outcome` at `now_ms`.
    pub(super) fn end_round(&mut self, outcome: Phase, now_ms: u64) {
        let counters = self.counters.clone();
        self.round_mut().end(outcome, now_ms, &counters);
    }

    /// The round before the current one (`None` in round 0).
    pub fn previous_round(&self) -> Option<&Round> {
        self.rounds.len().checked_sub(2).map(|i| &self.rounds[i])
    }

    /// Starts the round after the current, ended one: the source scans again.
    pub(super) fn next_round(&mut self, now_ms: u64) {
        let last = self.round();
        let number = last.number.saturating_add(1);
        let first = last.first_segment.saturating_add(last.segments);
        let why = format!("interrupted by round {number}, which changes the target");
        self.interrupt_verification(&why, now_ms);
        self.rounds
            .push(Round::new(number, first, now_ms, self.counters.clone()));
        if self.rounds.len() > MAX_ROUNDS_KEPT {
            self.rounds.remove(0);
        }
        self.phase = Phase::Syncing;
        self.scan_complete = false;
        self.scan_issues.clear();
        self.scan_issues_total = 0;
        self.hardlinks = 0;
        self.excluded = 0;
        self.last_error.clear();
        self.finished_ms = 0;
    }
}

impl State {
    /// An operator asks for a sync round: allowed once the current round has ended.
    pub(super) fn start_round(&mut self, mid: u64, now_ms: u64) -> Response {
        let Some(m) = self.migrations.get_mut(&mid) else {
            return refused(format!("migration {mid} does not exist"));
        };
        if let Some(why) = sync_refusal(m) {
            return refused(why);
        }
        m.next_round(now_ms);
        self.dirty.migrations.insert(mid);
        Response::Ok
    }

    /// The migrations whose next periodic sync round is due at `now_ms` (`sync_every_ms` after
    /// their last round ended, no cutover running or done, not finalized). The leader proposes a
    /// [`Command::StartRound`] for each.
    pub fn rounds_due(&self, now_ms: u64) -> Vec<u64> {
        self.migrations
            .values()
            .filter(|m| {
                let r = m.round();
                m.spec.sync_every_ms > 0
                    && m.finalized_ms == 0
                    && m.phase.finished()
                    && m.cutover
                        .as_ref()
                        .is_none_or(|c| c.phase == CutoverPhase::Aborted)
                    && r.finished_ms > 0
                    && now_ms >= r.finished_ms.saturating_add(m.spec.sync_every_ms)
            })
            .map(|m| m.id)
            .collect()
    }

    /// The segments of migration `mid` in `from..to` that are not verified (failed, stale):
    /// the next round sends their files again.
    pub fn unverified(&self, mid: u64, from: u64, to: u64) -> Vec<u64> {
        if from >= to {
            return Vec::new();
        }
        self.segments
            .range((mid, from)..(mid, to))
            .filter(|(_, s)| s.state != SegState::Verified)
            .map(|((_, id), _)| id)
            .collect()
    }
}

/// Why a sync round of `m` cannot start now, if it cannot (a preview of one asks the same).
pub(super) fn sync_refusal(m: &Migration) -> Option<String> {
    if m.spec.source_is_store() {
        return Some(super::phases::store_source_refusal(&m.name, "a sync round"));
    }
    if let Some(c) = &m.cutover {
        if c.phase == CutoverPhase::Done {
            return Some(format!(
                "migration {} was cut over: its target is live, and nothing is synced to it any \
                 more",
                m.name
            ));
        }
        if !c.phase.ended() {
            return Some(format!(
                "a cutover of migration {} is running ({}); its final round is its own",
                m.name,
                c.phase.as_str()
            ));
        }
    }
    if m.finalized_ms > 0 {
        return Some(format!(
            "migration {} was finalized: its fallback window is closed and nothing is synced any \
             more",
            m.name
        ));
    }
    if !m.phase.finished() {
        return Some(format!(
            "migration {} is in round {} ({}); a sync round starts once it has ended — see \
             `ferryctl migration status {}`",
            m.name,
            m.round().number,
            m.phase.as_str(),
            m.name
        ));
    }
    None
}
