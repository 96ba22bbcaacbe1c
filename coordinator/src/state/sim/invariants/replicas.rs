//! Every replica applies the same state: a node that applies the whole log from the start, a
//! new leader that starts from the old one's snapshot, and the leader itself agree byte for
//! byte (apply reads no clock, no randomness, no local state), and so do their indexes.

use crate::state::sim::Sim;
use crate::state::State;

pub fn check(sim: &Sim, snapshot: &State) -> Result<(), String> {
    let mut replayed = State::default();
    for (index, cmd) in &sim.log {
        replayed.apply(*index, cmd.clone());
    }
    let bytes = |s: &State| postcard::to_allocvec(s).map_err(|e| e.to_string());
    let leader = bytes(&sim.state)?;
    if bytes(&replayed)? != leader {
        return Err("a replica that applied the whole log differs from the leader".into());
    }
    if bytes(snapshot)? != leader {
        return Err("the state rebuilt from a snapshot differs from the leader's".into());
    }
    replayed.rebuild_indexes();
    let leader = super::indexes(&sim.state);
    for (what, s) in [("replayed", &replayed), ("snapshot", snapshot)] {
        if super::indexes(s) != leader {
            return Err(format!(
                "the {what} state's indexes differ from the leader's"
            ));
        }
    }
    Ok(())
}
