//! Hooks run exactly once: no hook ever runs twice in one cutover attempt (an agent that
//! restarted reports its record instead), every hook the coordinator recorded ran once, a
//! switch happens only after both trees were read back equal, and an aborted cutover rolled
//! the source back once.

use crate::state::sim::Sim;
use crate::state::{CutoverPhase, Step};

pub fn check(sim: &Sim) -> Result<(), String> {
    if let Some((&(attempt, step), n)) = sim.hooks_ran.iter().find(|(_, &n)| n > 1) {
        return Err(format!(
            "hook {} of cutover attempt {attempt} ran {n} times",
            step.as_str()
        ));
    }
    let Some(c) = &sim.migration().cutover else {
        return Ok(());
    };
    for run in &c.runs {
        if matches!(run.step, Step::PreFreeze | Step::Switch | Step::Rollback)
            && sim.hooks_ran.get(&(c.attempt, run.step)) != Some(&1)
        {
            return Err(format!(
                "cutover attempt {}: {} is recorded but the hook did not run once",
                c.attempt,
                run.step.as_str()
            ));
        }
    }
    if c.phase == CutoverPhase::Done {
        let tree = |s| c.run(s).and_then(|r| r.tree.clone());
        match (tree(Step::VerifySource), tree(Step::VerifyTarget)) {
            (Some(s), Some(t)) if s.digest == t.digest && s.error.is_empty() => {}
            _ => {
                return Err(format!(
                    "cutover attempt {} switched without both trees read back equal",
                    c.attempt
                ))
            }
        }
    }
    if c.phase == CutoverPhase::Aborted
        && sim.hooks_ran.get(&(c.attempt, Step::Rollback)) != Some(&1)
    {
        return Err(format!(
            "cutover attempt {} ended aborted without its rollback hook run once",
            c.attempt
        ));
    }
    Ok(())
}
