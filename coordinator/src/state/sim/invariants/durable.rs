//! Nothing is verified that the target does not hold durably as the source has it: a
//! verified segment's two hashes are equal, equal to the source's content, and the target's
//! disk (what survives its crash) holds that content.

use crate::state::sim::Sim;
use crate::state::SegState;

pub fn check(sim: &Sim) -> Result<(), String> {
    for ((_, id), seg) in sim.state.segments.iter() {
        if seg.state != SegState::Verified {
            continue;
        }
        let (Some(s), Some(t)) = (seg.source_hash(), seg.target_hash()) else {
            return Err(format!(
                "segment {id} is verified without both ends' hashes"
            ));
        };
        if s != t {
            return Err(format!("segment {id} is verified with differing hashes"));
        }
        let content = sim.content.get(&id);
        if content != Some(&s) {
            return Err(format!(
                "segment {id} is verified with a hash that is not the source's content"
            ));
        }
        if sim.disk.get(&id) != content {
            return Err(format!(
                "segment {id} is verified, but the target does not hold it durably (what it \
                 holds would not survive a crash)"
            ));
        }
    }
    Ok(())
}
