//! The migration's counters equal a recount of its segments, and the derived indexes equal a
//! rebuild: no report, duplicated or not, is counted twice or lost.

use crate::state::{SegState, State};

pub fn check(state: &State) -> Result<(), String> {
    for (&mid, m) in &state.migrations {
        let segs = state.segments.range((mid, 0)..(mid, u64::MAX));
        let (mut verified, mut verified_bytes) = (0u64, 0u64);
        let (mut failed, mut failed_bytes) = (0u64, 0u64);
        let mut total = 0u64;
        for (_, s) in segs {
            total += 1;
            match s.state {
                SegState::Verified => {
                    verified += 1;
                    verified_bytes += s.bytes;
                }
                SegState::Failed => {
                    failed += 1;
                    failed_bytes += s.bytes;
                }
                _ => {}
            }
        }
        let c = &m.counters;
        let pairs = [
            ("segments", c.segments, total),
            ("verified segments", c.verified_segments, verified),
            ("verified bytes", c.verified_bytes, verified_bytes),
            ("failed segments", c.failed_segments, failed),
            ("failed bytes", c.failed_bytes, failed_bytes),
        ];
        for (what, counted, recounted) in pairs {
            if counted != recounted {
                return Err(format!(
                    "migration {mid}: {what} counted {counted}, recounted {recounted}"
                ));
            }
        }
    }
    let mut rebuilt = state.clone();
    rebuilt.rebuild_indexes();
    let (kept, rebuilt) = (super::indexes(state), super::indexes(&rebuilt));
    if kept != rebuilt {
        return Err(format!(
            "the derived indexes differ from a rebuild: kept {kept:?}, rebuilt {rebuilt:?}"
        ));
    }
    Ok(())
}
