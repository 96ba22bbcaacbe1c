//! A split file is written by one target: every piece ever leased went to the member its
//! first piece went to, and no target wrote a piece of it while another held its sidecar.

use crate::state::sim::{Sim, SPLIT_FILE};

pub fn check(sim: &Sim) -> Result<(), String> {
    if let Some(why) = &sim.pieces_split {
        return Err(why.clone());
    }
    let (first, count) = SPLIT_FILE;
    let Some(head) = sim.state.segments.get(&(sim.mid, first)) else {
        return Ok(());
    };
    if head.leases == 0 {
        return Ok(());
    }
    for id in first..first + u64::from(count) {
        let Some(seg) = sim.state.segments.get(&(sim.mid, id)) else {
            continue;
        };
        if seg.leases > 0 && seg.target != head.target {
            return Err(format!(
                "piece {id} of the split file was leased to member {} of the pool, its first \
                 piece to member {}",
                seg.target, head.target
            ));
        }
    }
    Ok(())
}
