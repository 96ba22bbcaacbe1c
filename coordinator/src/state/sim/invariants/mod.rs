//! The simulation's invariants, one module each. [`each_step`] runs after every step;
//! [`replicas::check`] at every leader change; [`at_end`] once the migration settled.

mod accounting;
mod durable;
mod hooks;
mod monotone;
mod pinned;
pub mod replicas;

use std::collections::{BTreeMap, BTreeSet};

use super::Sim;

/// What the invariants saw at the previous step.
#[derive(Debug, Default)]
pub struct Seen {
    monotone: monotone::Seen,
}

/// A state's derived indexes, an emptied set dropped (a migration whose set emptied keeps
/// its empty entry: the same index).
#[allow(clippy::type_complexity)]
fn indexes(
    s: &crate::state::State,
) -> (
    BTreeMap<u64, crate::state::IdSet>,
    BTreeMap<u64, BTreeSet<(u64, u64)>>,
    BTreeMap<u64, BTreeSet<u64>>,
    BTreeMap<String, u64>,
    BTreeMap<String, u64>,
    BTreeMap<String, BTreeSet<u64>>,
    BTreeMap<String, BTreeSet<u64>>,
) {
    let mut i = (
        s.pending.clone(),
        s.waiting.clone(),
        s.leased.clone(),
        s.by_name.clone(),
        s.by_key.clone(),
        s.by_source.clone(),
        s.by_target.clone(),
    );
    i.0.retain(|_, v| !v.is_empty());
    i.1.retain(|_, v| !v.is_empty());
    i.2.retain(|_, v| !v.is_empty());
    i
}

/// Every invariant that must hold after any step.
pub fn each_step(sim: &mut Sim) -> Result<(), String> {
    durable::check(sim)?;
    accounting::check(&sim.state)?;
    hooks::check(sim)?;
    pinned::check(sim)?;
    sim.seen.monotone = monotone::check(&sim.seen.monotone, &sim.state)?;
    Ok(())
}

/// Once the migration settled: nothing is left half-done, and a switched target holds the
/// source's tree.
pub fn at_end(sim: &Sim) -> Result<(), String> {
    use crate::state::SegState;
    for ((_, id), seg) in sim.state.segments.iter() {
        if matches!(seg.state, SegState::Pending | SegState::Leased { .. }) {
            return Err(format!("settled, but segment {id} is {:?}", seg.state));
        }
    }
    if sim.migration().switched() {
        for (id, want) in &sim.content {
            if sim.disk.get(id) != Some(want) {
                return Err(format!(
                    "the cutover switched, but the target does not hold segment {id} as the \
                     source has it"
                ));
            }
        }
    }
    Ok(())
}
