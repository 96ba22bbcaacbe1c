//! Questions asked of the state without changing it: names, notes and blockers shown to the
//! operator, an agent's leases, whether a target may take a transfer.

use super::*;

/// Why a target may not take a transfer under a lease ([`State::check_lease`]). Every variant
/// means the same to the target: refuse the stream, write nothing; the text tells its log why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseRefusal {
    /// The migration does not exist (deleted, or another cluster's).
    #[error("migration {0} does not exist")]
    NoMigration(u64),
    /// The asking agent is not in the migration's target pool, or the lease was granted to
    /// another member.
    #[error("agent {target} is not the target of migration {mid} for this lease")]
    NotTheTarget {
        /// The asking agent.
        target: String,
        /// The migration.
        mid: u64,
    },
    /// The segment does not exist.
    #[error("segment {sid} of migration {mid} does not exist")]
    NoSegment {
        /// The migration.
        mid: u64,
        /// The segment.
        sid: u64,
    },
    /// The lease ran out; the segment will be leased again.
    #[error("lease expired")]
    Expired,
    /// The segment is verified already: nothing more to write.
    #[error("segment already verified")]
    AlreadyVerified,
    /// The segment was given up on.
    #[error("segment was given up on after {attempts} failed attempts: {last_error}")]
    GivenUp {
        /// Failed attempts.
        attempts: u32,
        /// The last failure.
        last_error: String,
    },
    /// Another lease replaced this one, or it was never granted.
    #[error("lease {0} is not current")]
    NotCurrent(u64),
}

impl State {
    /// How many segments of migration `mid` wait for a lease (backoffs included) and how many
    /// are leased now, from the indexes (no walk over the segments).
    pub fn queued(&self, mid: u64) -> (u64, u64) {
        let pending = self.pending.get(&mid).map_or(0, |s| s.len() as u64);
        let waiting = self.waiting.get(&mid).map_or(0, |s| s.len() as u64);
        let leased = self.leased.get(&mid).map_or(0, |s| s.len() as u64);
        (pending + waiting, leased)
    }

    /// The id of the migration named `name`.
    pub fn migration_named(&self, name: &str) -> Option<u64> {
        self.by_name.get(name).copied()
    }

    /// Why migration `mid` cannot make progress now, if something outside it stops it: its
    /// target cannot be sent to, or an agent has not been heard from for a session's timeout.
    /// What the operator should know about how the copy differs from the source, though nothing
    /// was lost (owners not applied by a target that does not run as root).
    pub fn notes(&self, mid: u64) -> Vec<String> {
        let mut out = Vec::new();
        let Some(m) = self.migrations.get(&mid) else {
            return out;
        };
        if let Some(t) = self.agents.get(&m.spec.target_agent) {
            if t.writes_to_store() {
                out.push(format!(
                    "target agent {} writes to an object store ({}): each file's mode, owner \
                     and mtime are kept as object metadata (ferry-mode, ferry-owner, \
                     ferry-mtime), symlinks as empty marker objects (ferry-symlink), further \
                     names of a file as copies; directories exist only in keys, so empty ones \
                     and their own metadata are not kept",
                    t.name, t.target_root
                ));
            } else if !t.applies_owners {
                out.push(format!(
                    "owners not kept: target agent {} does not run as root, so files belong to \
                     its user and set-id bits are dropped (run it as root to keep uid/gid)",
                    t.name
                ));
            }
        }
        out
    }

    pub fn blocker(&self, mid: u64, now_ms: u64) -> Option<String> {
        let m = self.migrations.get(&mid)?;
        if m.phase.finished() {
            return None;
        }
        // The pool is blocked only when no active member can take a file: name the first
        // member that can, else the first target.
        let usable = m.targets.iter().filter(|t| t.active).find(|t| {
            self.agents
                .get(&t.agent)
                .is_some_and(|a| a.undialable().is_none() && a.live(now_ms))
        });
        let src = &m.spec.source_agent;
        let dst = usable.map_or(&m.spec.target_agent, |t| &t.agent);
        let Some(target) = self.agents.get(dst) else {
            return Some(format!("target agent {dst} is not registered; start it"));
        };
        if let Some(why) = target.undialable() {
            return Some(format!("nothing is sent to the target: {why}"));
        }
        for (role, a) in [("source", self.agents.get(src)), ("target", Some(target))] {
            match a {
                None => return Some(format!("{role} agent {src} is not registered; start it")),
                Some(a) if a.session == 0 => {
                    return Some(format!("{role} agent {} was shut down; start it", a.name))
                }
                Some(a) if !a.live(now_ms) => {
                    return Some(format!(
                        "{role} agent {} has not been heard from for {} s; is it running?",
                        a.name,
                        now_ms.saturating_sub(a.last_seen_ms) / 1000
                    ))
                }
                Some(_) => {}
            }
        }
        None
    }

    /// The unexpired leases `agent` holds as a source.
    pub fn leases_of(&self, agent: &str, now_ms: u64) -> Vec<Lease> {
        let mut out = Vec::new();
        for m in self.sourced_by(agent) {
            for &id in self.leased.get(&m.id).into_iter().flatten() {
                let seg = &self.segments[&(m.id, id)];
                if let SegState::Leased { epoch, expires_ms } = seg.state {
                    if expires_ms > now_ms {
                        out.push(Lease::of(&self.agents, m, id, seg, epoch, expires_ms));
                    }
                }
            }
        }
        out
    }

    /// Whether lease `epoch` on the segment is current and was granted to `target`.
    /// The caller must still check that its peer is `spec.source_agent`.
    pub fn check_lease(
        &self,
        target: &str,
        mid: u64,
        sid: u64,
        epoch: u64,
        now_ms: u64,
    ) -> Result<&Migration, LeaseRefusal> {
        let m = self
            .migrations
            .get(&mid)
            .ok_or(LeaseRefusal::NoMigration(mid))?;
        let not_the_target = || LeaseRefusal::NotTheTarget {
            target: target.to_string(),
            mid,
        };
        let member = m.member(target).ok_or_else(not_the_target)?;
        let seg = self
            .segments
            .get(&(mid, sid))
            .ok_or(LeaseRefusal::NoSegment { mid, sid })?;
        match seg.state {
            SegState::Leased { epoch: e, .. } if e == epoch && seg.target != member => {
                Err(not_the_target())
            }
            SegState::Leased {
                epoch: e,
                expires_ms,
            } if e == epoch && expires_ms > now_ms => Ok(m),
            SegState::Leased { epoch: e, .. } if e == epoch => Err(LeaseRefusal::Expired),
            SegState::Verified => Err(LeaseRefusal::AlreadyVerified),
            SegState::Failed => Err(LeaseRefusal::GivenUp {
                attempts: seg.attempts,
                last_error: seg.last_error.to_string(),
            }),
            _ => Err(LeaseRefusal::NotCurrent(epoch)),
        }
    }
}
