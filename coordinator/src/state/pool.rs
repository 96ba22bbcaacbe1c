//! A migration's pool of target agents: who may receive its segments, which member each
//! segment goes to, and how members join and leave.
//!
//! Every migration has its `spec.target_agent` as member 0, the one that also runs the
//! target's verification and cutover steps. More members may join while it runs
//! ([`Command::AddTarget`]) when they write to the same object store as member 0, so that all
//! of them build one tree. A segment goes to the active, dialable member with the fewest
//! bytes leased (live ones first); every piece of a split file goes to the member its first
//! piece went to, because the file's sidecar (its part file or multipart upload) lives in
//! that agent's state directory. A member that leaves ([`Command::RemoveTarget`]) gets no new
//! files, but the pieces of split files it began still go to it.

use super::*;

/// Most members a pool may have (ever: removed members keep their index).
pub const MAX_TARGETS: usize = 64;

/// Most pending segments the scheduler looks at per migration and lease call before it gives
/// up on finding one it can send now (pieces pinned to an unreachable member are skipped a
/// whole file at a time).
pub(super) const MAX_LOOKED_AT: usize = 1024;

/// A member of a migration's target pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolMember {
    /// The target agent.
    pub agent: String,
    /// Whether it gets new files (a removed member still gets the pieces of the split files
    /// it began).
    pub active: bool,
    /// Segments verified at it.
    pub verified_segments: u64,
    /// Bytes verified at it.
    pub verified_bytes: u64,
}

impl PoolMember {
    /// A new, active member.
    pub fn new(agent: String) -> Self {
        PoolMember {
            agent,
            active: true,
            verified_segments: 0,
            verified_bytes: 0,
        }
    }
}

impl Migration {
    /// The index of `agent` in the pool, if it is a member (active or not).
    pub fn member(&self, agent: &str) -> Option<u16> {
        self.targets
            .iter()
            .position(|t| t.agent == agent)
            .map(|i| i as u16)
    }

    /// The agent of member `index` (member 0 when there is no such member).
    pub fn member_agent(&self, index: u16) -> &str {
        self.targets
            .get(index as usize)
            .map_or(self.spec.target_agent.as_str(), |t| t.agent.as_str())
    }
}

/// A pool member as the scheduler sees it during one lease call.
#[derive(Debug, Clone)]
pub(super) struct MemberNow {
    /// Sources can reach it (registered, a data address, a session).
    pub(super) dialable: bool,
    /// Heard from within the session timeout.
    pub(super) live: bool,
    /// It gets new files.
    pub(super) active: bool,
    /// Bytes of segments leased to it now.
    pub(super) inflight: u64,
}

/// What the scheduler may do with a pending segment now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    /// Lease it to this member.
    Lease(u16),
    /// Not now; the next segment worth looking at has this id or a higher one.
    Skip(u64),
}

/// The member a segment that may go anywhere goes to: among the active, dialable ones, live
/// before silent, then the fewest bytes leased, then the lowest index.
pub(super) fn free_choice(pool: &[MemberNow]) -> Option<u16> {
    pool.iter()
        .enumerate()
        .filter(|(_, m)| m.active && m.dialable)
        .min_by_key(|(i, m)| (!m.live, m.inflight, *i))
        .map(|(i, _)| i as u16)
}

/// Where segment `id` of migration `mid` may go now, given the pool.
pub(super) fn decide(segments: &SegmentMap, mid: u64, id: u64, pool: &[MemberNow]) -> Decision {
    // Ids come from a source: `u64::MAX` is one.
    let next = id.saturating_add(1);
    let Some(seg) = segments.get(&(mid, id)) else {
        return Decision::Skip(next);
    };
    let free = |next: u64| free_choice(pool).map_or(Decision::Skip(next), Decision::Lease);
    if !seg.is_piece() {
        return free(next);
    }
    let first = id - u64::from(seg.piece_index);
    let after = first.saturating_add(u64::from(seg.piece_count));
    match segments.get(&(mid, first)) {
        // The file's first piece was leased: the file is that member's.
        Some(f) if f.leases > 0 => match pool.get(f.target as usize) {
            Some(m) if m.dialable => Decision::Lease(f.target),
            _ => Decision::Skip(after),
        },
        // The first piece chooses (it has the lowest id, so it comes first).
        Some(_) if id == first => free(after),
        Some(_) => Decision::Skip(after),
        // Registration refuses a piece without its first (`register_segments`); a first piece
        // gone since (a rescan that replanned it) leaves the piece to wait for nothing: it may
        // go anywhere.
        None => free(next),
    }
}

impl State {
    /// How each member of migration `mid`'s pool stands at `now_ms`.
    pub(super) fn pool_now(&self, mid: u64, now_ms: u64) -> Vec<MemberNow> {
        let Some(m) = self.migrations.get(&mid) else {
            return Vec::new();
        };
        let mut pool: Vec<MemberNow> = m
            .targets
            .iter()
            .map(|t| {
                let a = self.agents.get(&t.agent);
                MemberNow {
                    dialable: a.is_some_and(|a| a.undialable().is_none()),
                    live: a.is_some_and(|a| a.live(now_ms)),
                    active: t.active,
                    inflight: 0,
                }
            })
            .collect();
        for &id in self.leased.get(&mid).into_iter().flatten() {
            let seg = &self.segments[&(mid, id)];
            if let Some(p) = pool.get_mut(seg.target as usize) {
                p.inflight = p.inflight.saturating_add(seg.bytes);
            }
        }
        pool
    }

    /// Adds `agent` to the target pool of migration `mid` (or makes a removed member active
    /// again).
    pub(super) fn add_target(&mut self, mid: u64, agent: &str) -> Response {
        let Some(m) = self.migrations.get(&mid) else {
            return refused(format!("migration {mid} does not exist"));
        };
        let name = &m.name;
        let Some(a) = self.agents.get(agent) else {
            return refused(format!(
                "agent {agent} is not registered; start it and check `ferryctl agents list`"
            ));
        };
        if agent == m.spec.source_agent {
            return refused(format!(
                "agent {agent} is the source of migration {name}; it cannot also be a target"
            ));
        }
        let first = &m.spec.target_agent;
        let root = self
            .agents
            .get(first)
            .map(|f| f.target_root.clone())
            .unwrap_or_default();
        if !ferry_common::path::is_store_url(&root) {
            return refused(format!(
                "migration {name} writes through target {first} to {root:?}, a directory on its \
                 own host; several targets can only build one tree when they write to the same \
                 object store (ferry cannot tell that directories on two hosts are one shared \
                 file system), so its pool cannot grow"
            ));
        }
        if a.target_root != root {
            return refused(format!(
                "agent {agent} writes to {:?}, but migration {name}'s targets write to {root:?}; \
                 a pool's members must write to the same object store (set its [target] root \
                 to {root} and restart it)",
                a.target_root
            ));
        }
        if let Some(i) = m.member(agent) {
            let m = self.migrations.get_mut(&mid).expect("looked up above");
            m.targets[i as usize].active = true;
            self.dirty.migrations.insert(mid);
            return Response::Ok;
        }
        if m.targets.len() >= MAX_TARGETS {
            return refused(format!(
                "migration {name} has had {MAX_TARGETS} targets, the most a pool may have"
            ));
        }
        let m = self.migrations.get_mut(&mid).expect("looked up above");
        m.targets.push(PoolMember::new(agent.to_string()));
        self.dirty.migrations.insert(mid);
        Response::Ok
    }

    /// Takes `agent` out of migration `mid`'s pool: no new files go to it (the split files it
    /// began still do, as their sidecars are in its state directory).
    pub(super) fn remove_target(&mut self, mid: u64, agent: &str) -> Response {
        let Some(m) = self.migrations.get_mut(&mid) else {
            return refused(format!("migration {mid} does not exist"));
        };
        match m.member(agent) {
            None => refused(format!(
                "agent {agent} is not a target of migration {}",
                m.name
            )),
            Some(0) => refused(format!(
                "agent {agent} is migration {}'s first target, which runs its verification and \
                 cutover steps; it stays in the pool",
                m.name
            )),
            Some(i) => {
                m.targets[i as usize].active = false;
                self.dirty.migrations.insert(mid);
                Response::Ok
            }
        }
    }
}
