//! A full verification outside a cutover (`ferryctl migration verify NAME --mode full`): both
//! agents read their trees back and report digests, as in a cutover's `Verifying` phase, and
//! the coordinator compares them. It verifies the target against the source as the last round's
//! scan found it; the source agent says which names changed since (a live source), and then the
//! verification is not conclusive — the next round sends those names.
//!
//! Besides its verdict it is how an operator keeps a cutover's freeze short: each agent keeps the
//! content hashes it read, and the cutover's own full verification then reads only the files
//! that changed since (see the agent's `hashcache`).
//!
//! A round that starts, or a cutover, interrupts a running verification (the target changes
//! under it); a new request replaces a running one (an agent that died will not report).

use super::*;

/// A full verification of a migration (the latest one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FullVerification {
    /// 1 for the migration's first, then one more each time.
    pub number: u32,
    /// The round verified: the target against the source as that round's scan found it.
    pub round: u32,
    /// When it was asked for.
    pub started_ms: u64,
    /// When it ended (0 while it runs).
    pub ended_ms: u64,
    /// The source agent's pass, once reported.
    pub source: Option<StepRun>,
    /// The target agent's pass, once reported.
    pub target: Option<StepRun>,
    /// Why the trees do not verify (empty: equal, or still running).
    pub error: String,
}

impl FullVerification {
    /// Whether it still runs.
    pub fn running(&self) -> bool {
        self.ended_ms == 0
    }

    /// Whether it ended with both trees read and equal.
    pub fn equal(&self) -> bool {
        !self.running() && self.error.is_empty()
    }

    /// The passes agents must do now.
    pub fn pending_steps(&self) -> Vec<Step> {
        if !self.running() {
            return Vec::new();
        }
        let mut out = Vec::new();
        if self.source.is_none() {
            out.push(Step::VerifySource);
        }
        if self.target.is_none() {
            out.push(Step::VerifyTarget);
        }
        out
    }
}

impl Migration {
    /// Ends a running full verification without a verdict, saying why.
    pub(super) fn interrupt_verification(&mut self, why: &str, now_ms: u64) {
        if let Some(v) = self.verification.as_mut().filter(|v| v.running()) {
            v.error = why.to_string();
            v.ended_ms = now_ms.max(1);
        }
    }
}

impl State {
    /// An operator asks for a full verification: allowed when the last round is done and no
    /// cutover runs or switched.
    pub(super) fn start_verification(&mut self, mid: u64, now_ms: u64) -> Response {
        let Some(m) = self.migrations.get_mut(&mid) else {
            return refused(format!("migration {mid} does not exist"));
        };
        if m.spec.source_is_store() {
            return refused(super::phases::store_source_refusal(
                &m.name,
                "a full verification",
            ));
        }
        if let Some(c) = &m.cutover {
            if c.phase == CutoverPhase::Done {
                return refused(format!(
                    "migration {} was cut over: its target is live and changes on its own; the \
                     cutover's report has the verification made at the switch",
                    m.name
                ));
            }
            if !c.phase.ended() {
                return refused(format!(
                    "a cutover of migration {} is running ({}); it verifies both trees in full \
                     itself",
                    m.name,
                    c.phase.as_str()
                ));
            }
        }
        if m.phase != Phase::Done {
            let what = if m.phase.finished() {
                format!(
                    "round {} ended {}: it did not copy everything, so there is nothing to \
                     verify in full yet — see `ferryctl migration verify {}`, then run a sync round",
                    m.round().number,
                    m.phase.as_str(),
                    m.name
                )
            } else {
                format!(
                    "round {} is running ({}); verify once it is done",
                    m.round().number,
                    m.phase.as_str()
                )
            };
            return refused(format!("migration {}: {what}", m.name));
        }
        let number = m
            .verification
            .as_ref()
            .map_or(1, |v| v.number.saturating_add(1));
        m.interrupt_verification(&format!("replaced by verification {number}"), now_ms);
        m.verification = Some(FullVerification {
            number,
            round: m.round().number,
            started_ms: now_ms,
            ended_ms: 0,
            source: None,
            target: None,
            error: String::new(),
        });
        self.dirty.migrations.insert(mid);
        Response::Ok
    }

    /// An agent reports its pass of full verification `number`.
    pub(super) fn verification_step(
        &mut self,
        agent: &str,
        mid: u64,
        number: u32,
        mut run: StepRun,
        now_ms: u64,
    ) -> Response {
        let Some(m) = self.migrations.get_mut(&mid) else {
            return refused(format!("migration {mid} does not exist"));
        };
        let expected = match run.step {
            Step::VerifySource => &m.spec.source_agent,
            Step::VerifyTarget => &m.spec.target_agent,
            other => {
                return refused(format!(
                    "{} is not a step of a verification",
                    other.as_str()
                ))
            }
        };
        if expected != agent {
            return refused(format!(
                "agent {agent} does not do {} for migration {mid}",
                run.step.as_str()
            ));
        }
        let Some(v) = m.verification.as_mut().filter(|v| v.number == number) else {
            return refused(format!(
                "migration {mid} has no verification {number} (a later one replaced it)"
            ));
        };
        let reported = match run.step {
            Step::VerifySource => v.source.is_some(),
            _ => v.target.is_some(),
        };
        if reported {
            // Reported before (the answer was lost): once only.
            return Response::Ok;
        }
        if !v.running() {
            return refused(format!(
                "verification {number} of migration {mid} has ended: {}",
                v.error
            ));
        }
        run.agent = agent.to_string();
        run.recorded_ms = now_ms;
        run.output = ferry_common::text::tail(&run.output, MAX_STEP_OUTPUT).to_string();
        match run.step {
            Step::VerifySource => v.source = Some(run),
            _ => v.target = Some(run),
        }
        self.dirty.migrations.insert(mid);
        if let (Some(s), Some(t)) = (&v.source, &v.target) {
            let (s, t) = (
                s.tree.clone().unwrap_or_default(),
                t.tree.clone().unwrap_or_default(),
            );
            v.error = TreeDigest::mismatch(&s, &t).unwrap_or_default();
            v.ended_ms = now_ms.max(1);
        }
        Response::Ok
    }
}
