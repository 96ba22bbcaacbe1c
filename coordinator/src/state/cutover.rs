//! The cutover: the source application is frozen (the source agent runs its `pre_freeze`
//! hook), a final sync round sends the last changes, both trees are verified in full (each
//! agent reads every file back and reports a digest of its tree), and the target agent runs
//! its `switch` hook — or, on any failure or an operator's abort, the source agent runs its
//! `rollback` hook and the source is live again:
//!
//! ```text
//! Freezing ─▶ FinalSync ─▶ Verifying ─▶ Switching ─▶ Done
//!     └──────────┴────────────┴────────────┴──▶ RollingBack ─▶ Aborted
//! ```
//!
//! Every step is done by an agent, which reports it ([`Command::CutoverStep`]); the phase moves
//! only when the report is applied, so a leader change or an agent restart continues from the
//! recorded phase. A step's report is accepted once: a repeated one is answered `Ok` and
//! changes nothing, which is what makes each hook run once per cutover attempt (the agents keep
//! their own record of the hooks they ran, and report that record again instead of running a
//! hook twice).

use super::*;

/// Most output kept of one step (the tail).
pub const MAX_STEP_OUTPUT: usize = 4096;

/// Where a cutover is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CutoverPhase {
    /// The source agent runs `pre_freeze`.
    Freezing,
    /// The final sync round runs (the source is frozen).
    FinalSync,
    /// Both agents read their trees back and report digests.
    Verifying,
    /// The target agent runs `switch`.
    Switching,
    /// Switched: the target is live.
    Done,
    /// The source agent runs `rollback`.
    RollingBack,
    /// Rolled back: the source is live again.
    Aborted,
}

impl CutoverPhase {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            CutoverPhase::Freezing => "freezing",
            CutoverPhase::FinalSync => "final-sync",
            CutoverPhase::Verifying => "verifying",
            CutoverPhase::Switching => "switching",
            CutoverPhase::Done => "done",
            CutoverPhase::RollingBack => "rolling-back",
            CutoverPhase::Aborted => "aborted",
        }
    }

    /// Whether the cutover has ended (done or aborted).
    pub fn ended(self) -> bool {
        matches!(self, CutoverPhase::Done | CutoverPhase::Aborted)
    }
}

/// What an agent does for a cutover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Step {
    /// The source agent's `pre_freeze` hook.
    PreFreeze,
    /// The source agent reads its tree and reports its digest (and that nothing changed since
    /// the final round's scan).
    VerifySource,
    /// The target agent reads its tree back and reports its digest.
    VerifyTarget,
    /// The target agent's `switch` hook.
    Switch,
    /// The source agent's `rollback` hook.
    Rollback,
}

impl Step {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::PreFreeze => "pre_freeze",
            Step::VerifySource => "verify_source",
            Step::VerifyTarget => "verify_target",
            Step::Switch => "switch",
            Step::Rollback => "rollback",
        }
    }

    /// Whether the target agent does it (else the source agent).
    pub fn on_target(self) -> bool {
        matches!(self, Step::VerifyTarget | Step::Switch)
    }
}

/// A tree as an agent read it for the full verification.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeDigest {
    /// BLAKE3 over every name's path, kind, mode, size, mtime, link target and content hash,
    /// in walk order.
    pub digest: Digest,
    /// Regular files (each name of a hardlinked file counts).
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Directories.
    pub dirs: u64,
    /// Symlinks.
    pub symlinks: u64,
    /// Why the tree could not be verified (empty: it was); e.g. a file changed after the
    /// freeze.
    pub error: String,
    /// Files the agent read for this digest (the others' hashes it had from an earlier
    /// verification: unchanged since).
    pub files_read: u64,
    /// Their bytes.
    pub bytes_read: u64,
    /// The digest per class of name ([`CLASSES`] order; empty from an agent that sent none).
    pub classes: Vec<Digest>,
}

/// The classes of names an agent's tree digest is also made per.
pub const CLASSES: [&str; 4] = ["regular files", "directories", "symlinks", "hardlinks"];

impl TreeDigest {
    /// Why a source's and a target's tree do not verify, if they do not.
    pub fn mismatch(source: &TreeDigest, target: &TreeDigest) -> Option<String> {
        let (s, t) = (source, target);
        if !s.error.is_empty() {
            Some(format!("source verification failed: {}", s.error))
        } else if !t.error.is_empty() {
            Some(format!("target verification failed: {}", t.error))
        } else if s.digest != t.digest {
            let placed = if s.classes.len() == CLASSES.len() && t.classes.len() == CLASSES.len() {
                let (differ, equal): (Vec<_>, Vec<_>) = CLASSES
                    .iter()
                    .zip(s.classes.iter().zip(&t.classes))
                    .partition(|(_, (a, b))| a != b);
                let names =
                    |v: Vec<(&&str, _)>| v.iter().map(|(n, _)| **n).collect::<Vec<_>>().join(", ");
                format!("; differ: {}; equal: {}", names(differ), names(equal))
            } else {
                String::new()
            };
            Some(format!(
                "the target differs from the source: source {} files, {} bytes, {} \
                 directories, {} symlinks; target {} files, {} bytes, {} directories, {} \
                 symlinks{placed}",
                s.files, s.bytes, s.dirs, s.symlinks, t.files, t.bytes, t.dirs, t.symlinks
            ))
        } else {
            None
        }
    }
}

/// One step as an agent did it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRun {
    /// What.
    pub step: Step,
    /// Which agent.
    pub agent: String,
    /// The command it ran (empty: none configured, or not a hook).
    pub command: String,
    /// Its exit status (0: success; -1: killed or not started).
    pub exit_code: i32,
    /// The tail of its output (at most [`MAX_STEP_OUTPUT`] bytes), or what went wrong.
    pub output: String,
    /// When it started (the agent's clock, unix ms).
    pub started_ms: u64,
    /// How long it took.
    pub duration_ms: u64,
    /// When the report was applied (leader time).
    pub recorded_ms: u64,
    /// For a verification: the tree.
    pub tree: Option<TreeDigest>,
}

/// A migration's cutover (its latest attempt).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cutover {
    /// 1 for the first cutover of the migration, then one more after each abort.
    pub attempt: u32,
    /// Where it is.
    pub phase: CutoverPhase,
    /// When it started.
    pub started_ms: u64,
    /// When `pre_freeze` ended: writes stopped (0 before).
    pub frozen_ms: u64,
    /// When `switch` ended (0 before).
    pub switched_ms: u64,
    /// When it ended, done or aborted (0 before).
    pub ended_ms: u64,
    /// The final sync round (0 before it starts).
    pub final_round: u32,
    /// Steps as the agents reported them, in order.
    pub runs: Vec<StepRun>,
    /// Why it rolled back (empty: it did not).
    pub error: String,
    /// Why it started by itself (empty: an operator started it).
    pub trigger: String,
}

impl Cutover {
    /// How long writes were frozen: from the end of `pre_freeze` to the end of `switch` (or
    /// to `now_ms` while frozen, or to the end of the rollback).
    pub fn freeze_window_ms(&self, now_ms: u64) -> u64 {
        if self.frozen_ms == 0 {
            return 0;
        }
        let end = match (self.switched_ms, self.ended_ms) {
            (s, _) if s > 0 => s,
            (_, e) if e > 0 => e,
            _ => now_ms,
        };
        end.saturating_sub(self.frozen_ms)
    }

    /// The recorded run of `step`, if any.
    pub fn run(&self, step: Step) -> Option<&StepRun> {
        self.runs.iter().find(|r| r.step == step)
    }

    /// The steps agents must do now (those of the current phase not yet reported).
    pub fn pending_steps(&self) -> Vec<Step> {
        let wanted: &[Step] = match self.phase {
            CutoverPhase::Freezing => &[Step::PreFreeze],
            CutoverPhase::Verifying => &[Step::VerifySource, Step::VerifyTarget],
            CutoverPhase::Switching => &[Step::Switch],
            CutoverPhase::RollingBack => &[Step::Rollback],
            _ => &[],
        };
        wanted
            .iter()
            .copied()
            .filter(|s| self.run(*s).is_none())
            .collect()
    }

    fn roll_back(&mut self, why: String) {
        self.phase = CutoverPhase::RollingBack;
        self.error = why;
    }
}

impl State {
    /// An operator starts a cutover: allowed once the source was scanned, not while another
    /// cutover runs or after one switched. A round that runs meanwhile (a hot file keeps a
    /// live source from converging) goes on, and the final round follows it once the source is
    /// frozen.
    pub(super) fn start_cutover(&mut self, mid: u64, now_ms: u64) -> Response {
        let Some(m) = self.migrations.get_mut(&mid) else {
            return refused(format!("migration {mid} does not exist"));
        };
        let attempt = match next_cutover_attempt(m) {
            Ok(a) => a,
            Err(why) => return refused(why),
        };
        m.start_cutover_attempt(attempt, now_ms, String::new());
        self.dirty.migrations.insert(mid);
        Response::Ok
    }

    /// An operator aborts a running cutover: the source agent rolls back.
    pub(super) fn abort_cutover(&mut self, mid: u64) -> Response {
        let Some(m) = self.migrations.get_mut(&mid) else {
            return refused(format!("migration {mid} does not exist"));
        };
        match &mut m.cutover {
            Some(c) if !c.phase.ended() && c.phase != CutoverPhase::RollingBack => {
                c.roll_back("aborted by the operator".into());
                self.dirty.migrations.insert(mid);
                Response::Ok
            }
            Some(c) if c.phase == CutoverPhase::RollingBack => Response::Ok,
            Some(c) => refused(format!(
                "the cutover of migration {} has ended ({}); nothing to abort",
                m.name,
                c.phase.as_str()
            )),
            None => refused(format!("migration {} has no cutover to abort", m.name)),
        }
    }

    /// An agent reports a step of cutover `attempt`.
    pub(super) fn cutover_step(
        &mut self,
        agent: &str,
        mid: u64,
        attempt: u32,
        mut run: StepRun,
        now_ms: u64,
    ) -> Response {
        let Some(m) = self.migrations.get_mut(&mid) else {
            return refused(format!("migration {mid} does not exist"));
        };
        let expected = if run.step.on_target() {
            &m.spec.target_agent
        } else {
            &m.spec.source_agent
        };
        if expected != agent {
            return refused(format!(
                "agent {agent} does not do {} for migration {mid}",
                run.step.as_str()
            ));
        }
        let Some(c) = m.cutover.as_mut().filter(|c| c.attempt == attempt) else {
            return refused(format!(
                "migration {mid} has no cutover attempt {attempt} (a later one replaced it)"
            ));
        };
        if c.run(run.step).is_some() {
            // Reported before (the answer was lost, or the agent restarted): once only.
            return Response::Ok;
        }
        if !c.pending_steps().contains(&run.step) {
            return refused(format!(
                "the cutover of migration {mid} is {}: {} is not expected",
                c.phase.as_str(),
                run.step.as_str()
            ));
        }
        run.agent = agent.to_string();
        run.recorded_ms = now_ms;
        run.output = ferry_common::text::tail(&run.output, MAX_STEP_OUTPUT).to_string();
        let failed = |r: &StepRun| {
            format!(
                "{} on {} exited {}: {}",
                r.step.as_str(),
                r.agent,
                r.exit_code,
                r.output.trim()
            )
        };
        self.dirty.migrations.insert(mid);
        match run.step {
            Step::PreFreeze if run.exit_code == 0 => {
                c.frozen_ms = now_ms;
                c.phase = CutoverPhase::FinalSync;
                c.runs.push(run);
                // The final round starts now, or when the round that runs ends (its scan may
                // predate the freeze).
                if m.phase.finished() {
                    m.next_round(now_ms);
                    let final_round = m.round().number;
                    m.cutover.as_mut().expect("checked above").final_round = final_round;
                }
            }
            Step::Switch if run.exit_code == 0 => {
                c.switched_ms = now_ms;
                c.ended_ms = now_ms;
                c.phase = CutoverPhase::Done;
                c.runs.push(run);
            }
            Step::PreFreeze | Step::Switch => {
                let why = failed(&run);
                c.runs.push(run);
                c.roll_back(why);
            }
            Step::Rollback => {
                if run.exit_code != 0 {
                    let why = failed(&run);
                    c.error = format!(
                        "{}; then {why} — the source may still be frozen: restart it by hand",
                        c.error
                    );
                }
                c.ended_ms = now_ms;
                c.phase = CutoverPhase::Aborted;
                c.runs.push(run);
            }
            Step::VerifySource | Step::VerifyTarget => {
                c.runs.push(run);
                let (Some(s), Some(t)) = (c.run(Step::VerifySource), c.run(Step::VerifyTarget))
                else {
                    return Response::Ok;
                };
                let (s, t) = (
                    s.tree.clone().unwrap_or_default(),
                    t.tree.clone().unwrap_or_default(),
                );
                let why = TreeDigest::mismatch(&s, &t).map(|w| {
                    w.replace("differs from the source", "differs from the frozen source")
                });
                match why {
                    Some(why) => c.roll_back(why),
                    None => c.phase = CutoverPhase::Switching,
                }
            }
        }
        Response::Ok
    }
}

impl Migration {
    /// Starts cutover `attempt` (checked by the caller): the source freezes first.
    fn start_cutover_attempt(&mut self, attempt: u32, now_ms: u64, trigger: String) {
        self.interrupt_verification(
            &format!("interrupted by cutover attempt {attempt}, which verifies in full itself"),
            now_ms,
        );
        self.cutover = Some(Cutover {
            attempt,
            phase: CutoverPhase::Freezing,
            started_ms: now_ms,
            frozen_ms: 0,
            switched_ms: 0,
            ended_ms: 0,
            final_round: 0,
            runs: Vec::new(),
            error: String::new(),
            trigger,
        });
    }

    /// A sync round just ended done: if the spec asks for it and no cutover was tried yet, and
    /// the round took less than `auto_cutover_below_ms` (the freeze a final round would take at
    /// that pace), the cutover starts. Returns whether it did.
    pub(super) fn maybe_auto_cutover(&mut self, now_ms: u64) -> bool {
        let limit = self.spec.auto_cutover_below_ms;
        let r = self.round();
        if limit == 0 || self.cutover.is_some() || r.number == 0 || r.outcome != Phase::Done {
            return false;
        }
        let took = r.finished_ms.saturating_sub(r.started_ms);
        if took >= limit {
            return false;
        }
        let trigger = format!(
            "round {} took {:.1}s, below the auto-cutover limit of {:.1}s",
            r.number,
            took as f64 / 1000.0,
            limit as f64 / 1000.0
        );
        self.start_cutover_attempt(1, now_ms, trigger);
        true
    }

    /// A round ended with `outcome` (`Syncing`: files changed during it). Returns whether the
    /// round belongs to a cutover (its final sync), which then moves on: verification when the
    /// round is done, rollback otherwise — a file that changed after the freeze means the
    /// freeze did not hold.
    pub(super) fn cutover_round_ended(&mut self, outcome: Phase) -> bool {
        let number = self.round().number;
        let Some(c) = self
            .cutover
            .as_mut()
            .filter(|c| c.phase == CutoverPhase::FinalSync && c.final_round == number)
        else {
            return false;
        };
        match outcome {
            Phase::Done => c.phase = CutoverPhase::Verifying,
            Phase::Syncing => c.roll_back(format!(
                "files changed after the freeze (during the final round {number}): the \
                 pre_freeze hook did not stop every writer"
            )),
            _ => {
                let detail = match self.scan_issues.first() {
                    Some((path, reason)) => format!("{path}: {reason}"),
                    None if !self.last_error.is_empty() => self.last_error.clone(),
                    None => "see its failed segments".into(),
                };
                c.roll_back(format!(
                    "the final round {number} did not copy everything — was the source still \
                     written after the freeze? {detail}"
                ))
            }
        }
        true
    }

    /// Whether the source was frozen while a round ran: the final round waits for it to end.
    pub(super) fn frozen_awaiting_final_round(&self) -> bool {
        self.cutover
            .as_ref()
            .is_some_and(|c| c.phase == CutoverPhase::FinalSync && c.final_round == 0)
    }

    /// Whether a cutover switched: the target is live.
    pub fn switched(&self) -> bool {
        self.cutover
            .as_ref()
            .is_some_and(|c| c.phase == CutoverPhase::Done)
    }

    /// Whether a cutover runs (started, not ended): no sync round may start meanwhile.
    pub fn cutover_running(&self) -> bool {
        self.cutover.as_ref().is_some_and(|c| !c.phase.ended())
    }
}

/// The attempt a cutover of `m` started now would be, or why none can start (a dry run asks
/// the same).
pub fn next_cutover_attempt(m: &Migration) -> Result<u32, String> {
    if m.spec.source_is_store() {
        return Err(super::phases::store_source_refusal(&m.name, "a cutover"));
    }
    let attempt = match &m.cutover {
        Some(c) if c.phase == CutoverPhase::Done => {
            return Err(format!(
                "migration {} was cut over already (attempt {})",
                m.name, c.attempt
            ))
        }
        Some(c) if !c.phase.ended() => {
            return Err(format!(
                "a cutover of migration {} is running ({}); wait, or abort it with `ferryctl \
                 migration cutover {} --abort`",
                m.name,
                c.phase.as_str(),
                m.name
            ))
        }
        Some(c) => c.attempt.saturating_add(1),
        None => 1,
    };
    if m.finalized_ms > 0 {
        return Err(format!(
            "migration {} was finalized: its fallback window is closed",
            m.name
        ));
    }
    if m.phase == Phase::Planned {
        return Err(format!(
            "migration {} has not been scanned yet: there is nothing to cut over to",
            m.name
        ));
    }
    Ok(attempt)
}
