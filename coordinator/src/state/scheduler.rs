//! Which segment goes where: leases granted within each source's budget, renewed while
//! a transfer runs, taken back when they expire; segments backing off wait their turn.

use super::pool::{decide, Decision, MemberNow, MAX_LOOKED_AT};
use super::*;

/// A granted lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Migration.
    pub migration_id: u64,
    /// Segment.
    pub segment_id: u64,
    /// Fencing token.
    pub epoch: u64,
    /// Expiry (unix ms).
    pub expires_ms: u64,
    /// Failed attempts of the segment before this lease (0: its first try, or none failed):
    /// agents log the first failure loudly and repeats quietly.
    pub attempts: u32,
    /// The target agent.
    pub target_agent: String,
    /// Its data address.
    pub target_addr: String,
}

impl Lease {
    /// Lease `epoch` (until `expires_ms`) on segment `id` of migration `m`, naming the pool
    /// member it went to and that agent's data address.
    pub(super) fn of(
        agents: &BTreeMap<String, Agent>,
        m: &Migration,
        id: u64,
        seg: &Segment,
        epoch: u64,
        expires_ms: u64,
    ) -> Lease {
        let target = m.member_agent(seg.target);
        Lease {
            migration_id: m.id,
            segment_id: id,
            epoch,
            expires_ms,
            attempts: seg.attempts,
            target_agent: target.to_string(),
            target_addr: agents
                .get(target)
                .map(|a| a.data_addr.clone())
                .unwrap_or_default(),
        }
    }
}

impl State {
    /// The scheduler: grants `agent` up to `max` pending segments of migrations it is the source
    /// of, lowest ids first, round-robin across migrations, after returning expired leases;
    /// each to a member of its migration's target pool ([`super::pool`]).
    pub(super) fn lease(
        &mut self,
        token: u64,
        agent: &str,
        max: u32,
        now_ms: u64,
        ttl_ms: u64,
    ) -> Vec<Lease> {
        let mids: Vec<u64> = self
            .sourced_by(agent)
            .filter(|m| m.phase.sending())
            .map(|m| m.id)
            .collect();
        let mut held = 0usize;
        for &mid in &mids {
            self.expire_leases(mid, now_ms);
            held += self.leased.get(&mid).map_or(0, |s| s.len());
        }
        let mut budget = (max as usize).min(MAX_LEASES_PER_AGENT.saturating_sub(held));
        let mut pools: BTreeMap<u64, Vec<MemberNow>> = mids
            .iter()
            .map(|&mid| (mid, self.pool_now(mid, now_ms)))
            .collect();
        let mut out = Vec::new();
        let mut progress = true;
        while budget > 0 && progress {
            progress = false;
            for &mid in &mids {
                if budget == 0 {
                    break;
                }
                let pool = pools.get_mut(&mid).expect("made above");
                // Never schedule to a target no source can reach: the segment would only fail
                // (`blocker` tells the operator why nothing moves).
                let Some((id, member)) = Self::next_ready(
                    &mut self.pending,
                    &mut self.waiting,
                    &self.segments,
                    mid,
                    now_ms,
                    pool,
                ) else {
                    continue;
                };
                let m = self.migrations.get_mut(&mid).expect("listed above");
                let seg = self
                    .segments
                    .get_mut(&(mid, id))
                    .expect("indexed segment exists");
                let expires_ms = now_ms.saturating_add(ttl_ms);
                seg.grant(token, expires_ms, member);
                pool[member as usize].inflight =
                    pool[member as usize].inflight.saturating_add(seg.bytes);
                self.leased.entry(mid).or_default().insert(id);
                self.dirty.segments.insert((mid, id));
                out.push(Lease::of(&self.agents, m, id, seg, token, expires_ms));
                m.counters.leases_granted = m.counters.leases_granted.saturating_add(1);
                self.dirty.migrations.insert(mid);
                budget -= 1;
                progress = true;
            }
        }
        out
    }

    /// The next segment of migration `mid` to lease at `now_ms` and the pool member it goes
    /// to, taken out of its index: the lowest pending id that can go somewhere now, else the
    /// segment whose backoff ended first among those that can. At most [`MAX_LOOKED_AT`]
    /// segments are looked at.
    pub(super) fn next_ready(
        pending: &mut BTreeMap<u64, IdSet>,
        waiting: &mut BTreeMap<u64, BTreeSet<(u64, u64)>>,
        segments: &SegmentMap,
        mid: u64,
        now_ms: u64,
        pool: &[MemberNow],
    ) -> Option<(u64, u16)> {
        let mut looked = 0;
        if let Some(set) = pending.get_mut(&mid) {
            let mut from = 0;
            while looked < MAX_LOOKED_AT {
                let Some(id) = set.first_from(from) else {
                    break;
                };
                looked += 1;
                match decide(segments, mid, id, pool) {
                    Decision::Lease(member) => {
                        set.remove(&id);
                        return Some((id, member));
                    }
                    Decision::Skip(next) => from = next.max(id.saturating_add(1)),
                }
                if id == u64::MAX {
                    break;
                }
            }
        }
        let waiting = waiting.get_mut(&mid)?;
        let mut found = None;
        for &(not_before, id) in waiting.iter() {
            if not_before > now_ms || looked >= MAX_LOOKED_AT {
                break;
            }
            looked += 1;
            if let Decision::Lease(member) = decide(segments, mid, id, pool) {
                found = Some((not_before, id, member));
                break;
            }
        }
        let (not_before, id, member) = found?;
        waiting.remove(&(not_before, id));
        Some((id, member))
    }

    /// Extends lease `epoch` on segment `sid` of migration `mid` if `agent` is its source and
    /// the lease is still current (not expired, not replaced).
    pub(super) fn renew(
        &mut self,
        agent: &str,
        mid: u64,
        sid: u64,
        epoch: u64,
        now_ms: u64,
        ttl_ms: u64,
    ) -> bool {
        if self
            .migrations
            .get(&mid)
            .is_none_or(|m| m.spec.source_agent != agent)
        {
            return false;
        }
        let Some(seg) = self.segments.get_mut(&(mid, sid)) else {
            return false;
        };
        let renewed = seg.extend(epoch, now_ms, now_ms.saturating_add(ttl_ms));
        if renewed {
            self.dirty.segments.insert((mid, sid));
        }
        renewed
    }

    pub(super) fn expire_leases(&mut self, mid: u64, now_ms: u64) {
        let Some(leased) = self.leased.get_mut(&mid) else {
            return;
        };
        let expired: Vec<u64> = leased
            .iter()
            .copied()
            .filter(|id| {
                matches!(self.segments[&(mid, *id)].state,
                         SegState::Leased { expires_ms, .. } if expires_ms <= now_ms)
            })
            .collect();
        for id in expired {
            leased.remove(&id);
            let seg = self.segments.get_mut(&(mid, id)).expect("indexed");
            seg.expire();
            self.pending.entry(mid).or_default().insert(id);
            self.dirty.segments.insert((mid, id));
        }
    }

    /// Whether a lease request from `agent` at `now_ms` could grant anything: a pending segment, or
    /// an expired lease to take back, in a migration it is the source of. Lets the service answer
    /// "nothing" without writing a log entry.
    pub fn has_leasable(&self, agent: &str, now_ms: u64) -> bool {
        self.sourced_by(agent)
            .filter(|m| m.phase.sending())
            .filter(|m| {
                m.targets.iter().any(|t| {
                    self.agents
                        .get(&t.agent)
                        .is_some_and(|a| a.undialable().is_none())
                })
            })
            .any(|m| {
                self.pending.get(&m.id).is_some_and(|p| !p.is_empty())
                    || self
                        .waiting
                        .get(&m.id)
                        .and_then(|w| w.first())
                        .is_some_and(|&(not_before, _)| not_before <= now_ms)
                    || self.leased.get(&m.id).into_iter().flatten().any(|id| {
                        matches!(self.segments[&(m.id, *id)].state,
                                 SegState::Leased { expires_ms, .. } if expires_ms <= now_ms)
                    })
            })
    }
}
