//! What only moves forward does: a verified segment stays verified, a segment's leases and
//! its lease's fencing token only grow, rounds and cutover attempts only grow, a cutover's
//! phase moves only along its edges (Freezing → FinalSync → Verifying → Switching → Done, or
//! to RollingBack → Aborted), and after a switch nothing more starts.

use std::collections::{BTreeMap, BTreeSet};

use crate::state::{CutoverPhase, SegState, State};

#[derive(Debug, Default, Clone)]
pub struct Seen {
    verified: BTreeSet<(u64, u64)>,
    leases: BTreeMap<(u64, u64), (u32, u64)>,
    rounds: BTreeMap<u64, u32>,
    cutovers: BTreeMap<u64, (u32, CutoverPhase)>,
}

fn rank(p: CutoverPhase) -> u8 {
    match p {
        CutoverPhase::Freezing => 0,
        CutoverPhase::FinalSync => 1,
        CutoverPhase::Verifying => 2,
        CutoverPhase::Switching => 3,
        CutoverPhase::Done => 4,
        CutoverPhase::RollingBack => 5,
        CutoverPhase::Aborted => 6,
    }
}

/// Whether a cutover may go from `a` to `b` in one step (or stay).
fn edge(a: CutoverPhase, b: CutoverPhase) -> bool {
    use CutoverPhase::*;
    if a == b {
        return true;
    }
    match (a, b) {
        (Done | Aborted, _) => false,
        (RollingBack, Aborted) => true,
        (RollingBack, _) => false,
        (_, RollingBack) => true,
        // A report applied may move a phase by one, or by two when a round ends at once.
        (_, Aborted) => false,
        (a, b) => rank(b) > rank(a),
    }
}

pub fn check(before: &Seen, state: &State) -> Result<Seen, String> {
    let mut now = Seen::default();
    for (key, seg) in state.segments.iter() {
        if seg.state == SegState::Verified {
            now.verified.insert(key);
        }
        let epoch = match seg.state {
            SegState::Leased { epoch, .. } => epoch,
            _ => before.leases.get(&key).map_or(0, |l| l.1),
        };
        if let Some(&(leases, last)) = before.leases.get(&key) {
            if seg.leases < leases || epoch < last {
                return Err(format!(
                    "segment {key:?}: leases {} after {leases}, fencing token {epoch} after {last}",
                    seg.leases
                ));
            }
        }
        now.leases.insert(key, (seg.leases, epoch));
    }
    if let Some(lost) = before.verified.difference(&now.verified).next() {
        return Err(format!("segment {lost:?} was verified and is not any more"));
    }
    for (&mid, m) in &state.migrations {
        let round = m.round().number;
        if let Some(&r) = before.rounds.get(&mid) {
            if round < r {
                return Err(format!("migration {mid}: round {round} after round {r}"));
            }
        }
        now.rounds.insert(mid, round);
        if let Some(c) = &m.cutover {
            if let Some(&(attempt, phase)) = before.cutovers.get(&mid) {
                if c.attempt < attempt {
                    return Err(format!(
                        "migration {mid}: cutover attempt {} after attempt {attempt}",
                        c.attempt
                    ));
                }
                if c.attempt == attempt && !edge(phase, c.phase) {
                    return Err(format!(
                        "migration {mid}: cutover attempt {attempt} went from {} to {}",
                        phase.as_str(),
                        c.phase.as_str()
                    ));
                }
                if c.attempt > attempt && phase != CutoverPhase::Aborted {
                    return Err(format!(
                        "migration {mid}: cutover attempt {} started while attempt {attempt} \
                         was {}",
                        c.attempt,
                        phase.as_str()
                    ));
                }
                if phase == CutoverPhase::Done && round > before.rounds[&mid] {
                    return Err(format!(
                        "migration {mid}: round {round} started after the cutover switched"
                    ));
                }
            }
            now.cutovers.insert(mid, (c.attempt, c.phase));
        }
    }
    Ok(now)
}
