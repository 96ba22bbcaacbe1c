//! Transfer reports from both ends: verified when the hashes agree, otherwise a failed
//! attempt with its cost and backoff.

use super::*;

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
    /// A file of the segment changed after the scan: the segment is left to the next round.
    Stale,
}

/// What a failed transfer costs its segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cost {
    /// One of its `max_attempts`: the failure is the segment's (unreadable file, full disk,
    /// hashes that differ).
    Attempt,
    /// Its last: retrying cannot help (the target refuses it for what it holds), so it is
    /// given up on now, whatever attempts are left.
    Final,
    /// Nothing: the failure is not the segment's (the source shut down, the target could not be
    /// reached, a hardlink waits for its first name).
    Nothing,
    /// The segment: its file changed after the scan, so it can never be sent as planned; it is
    /// left to the next round ([`SegState::Stale`]), which sends the file as it is then.
    Stale,
}

impl State {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn report(
        &mut self,
        agent: &str,
        role: Role,
        mid: u64,
        sid: u64,
        epoch: u64,
        result: Result<Digest, String>,
        source_hash: Option<Digest>,
        cost: Cost,
        now_ms: u64,
    ) -> (ReportOutcome, String) {
        let Some(m) = self.migrations.get_mut(&mid) else {
            return (
                ReportOutcome::Rejected,
                format!("migration {mid} does not exist"),
            );
        };
        let member = match role {
            Role::Source => (m.spec.source_agent == agent).then_some(None),
            Role::Target => m.member(agent).map(Some),
        };
        let Some(member) = member else {
            return (
                ReportOutcome::Rejected,
                format!("agent {agent} is not the {role:?} of migration {mid}"),
            );
        };
        let Some(seg) = self.segments.get_mut(&(mid, sid)) else {
            return (
                ReportOutcome::Rejected,
                format!("segment {sid} does not exist"),
            );
        };
        // A target reports only what was leased to it.
        if member.is_some_and(|i| i != seg.target) {
            return (
                ReportOutcome::Rejected,
                format!("segment {sid}'s lease {epoch} was not granted to target {agent}"),
            );
        }
        match seg.state {
            SegState::Leased { epoch: e, .. } if e == epoch => {}
            // A report repeated after its answer was lost (a timeout, a leader change): the
            // segment is already verified with the hash this end reports, so say so.
            SegState::Verified
                if result.as_ref().ok().copied()
                    == match role {
                        Role::Source => seg.source_hash(),
                        Role::Target => seg.target_hash(),
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
                let o = Self::failed(seg, m, sid, &why, cost, now_ms, &mut self.waiting);
                return (o, why);
            }
        };
        let (mut source, mut target) = seg.hashes.pair();
        match role {
            Role::Source => source = Some(hash),
            Role::Target => {
                target = Some(hash);
                // The source's hash as it came with the bytes, unless the source reported
                // its own already (then that one is compared).
                if source.is_none() {
                    source = source_hash;
                }
            }
        }
        seg.hashes = Hashes::of(source, target);
        match (source, target) {
            (Some(s), Some(t)) if s == t => {
                seg.verify();
                self.leased.entry(mid).or_default().remove(&sid);
                // Never more than the registered totals, which are checked when registered.
                let c = &mut m.counters;
                c.verified_segments = c.verified_segments.saturating_add(1);
                c.verified_bytes = c.verified_bytes.saturating_add(seg.bytes);
                c.verified_files = c.verified_files.saturating_add(seg.files as u64);
                if let Some(t) = m.targets.get_mut(seg.target as usize) {
                    t.verified_segments = t.verified_segments.saturating_add(1);
                    t.verified_bytes = t.verified_bytes.saturating_add(seg.bytes);
                }
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
    pub(super) fn failed(
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
            Cost::Stale => {
                seg.go_stale();
                let c = &mut m.counters;
                c.stale_segments = c.stale_segments.saturating_add(1);
                Self::maybe_done(m, now_ms);
                return ReportOutcome::Stale;
            }
            Cost::Nothing => seg.leases.max(1),
            Cost::Attempt | Cost::Final => {
                seg.attempts = seg.attempts.saturating_add(1);
                m.counters.failed_attempts = m.counters.failed_attempts.saturating_add(1);
                if cost == Cost::Final || seg.attempts >= m.spec.max_attempts.max(1) {
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
