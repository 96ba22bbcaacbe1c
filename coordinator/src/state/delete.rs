//! Deleting a migration: it leaves the state with its segments (its name and idempotency key
//! are free again), and its source and target agents are told to forget it
//! ([`Agent::forget`]): each removes what it keeps of the migration, and a target writing to an
//! object store aborts the multipart uploads it had open for it.

use super::*;

impl State {
    /// An operator deletes migration `mid` (`force`: also while it runs).
    pub(super) fn delete_migration(&mut self, mid: u64, force: bool) -> Response {
        let Some(m) = self.migrations.get(&mid) else {
            return refused(format!("migration {mid} does not exist"));
        };
        if m.cutover_running() {
            return refused(format!(
                "a cutover of migration {} is running: deleting it now could leave the source \
                 frozen; abort the cutover (`ferryctl migration cutover {} --abort`) and \
                 delete it once it rolled back",
                m.name, m.name
            ));
        }
        if m.fallback != 0 && self.migrations.contains_key(&m.fallback) {
            return refused(format!(
                "migration {} has a fallback, migration {}, that sends its copy back: delete \
                 that one first",
                m.name, m.fallback
            ));
        }
        if !force {
            if !m.phase.finished() {
                return refused(format!(
                    "migration {} is {}: its source is still scanning or sending; delete it \
                     anyway with --force (what is already at the target stays there)",
                    m.name,
                    m.phase.as_str()
                ));
            }
            if m.verification.as_ref().is_some_and(|v| v.running()) {
                return refused(format!(
                    "a full verification of migration {} is running: wait for it, or delete \
                     anyway with --force",
                    m.name
                ));
            }
        }
        let m = self.migrations.remove(&mid).expect("looked up above");
        self.dirty.migrations.insert(mid);
        if mid > self.deleted_up_to {
            self.deleted_up_to = mid;
            self.dirty.deleted_up_to = true;
        }
        for id in self.segments.remove_migration(mid) {
            self.dirty.segments.insert((mid, id));
        }
        self.pending.remove(&mid);
        self.waiting.remove(&mid);
        self.leased.remove(&mid);
        self.by_name.remove(&m.name);
        self.unindex_agents(mid, &m.spec);
        if !m.idempotency_key.is_empty() {
            self.by_key.remove(&m.idempotency_key);
        }
        // A deleted fallback closes nothing: the migration it reversed may open another.
        if let Some(original) = self.migrations.get_mut(&m.spec.fallback_of) {
            if original.fallback == mid {
                original.fallback = 0;
                self.dirty.migrations.insert(m.spec.fallback_of);
            }
        }
        let members = m.targets.iter().map(|t| &t.agent);
        for name in std::iter::once(&m.spec.source_agent).chain(members) {
            if let Some(a) = self.agents.get_mut(name) {
                a.forget.retain(|u| *u != m.uuid);
                a.forget.push(m.uuid.clone());
                let over = a.forget.len().saturating_sub(FORGET_MAX);
                a.forget.drain(..over);
                self.dirty.agents.insert(name.clone());
            }
        }
        Response::Ok
    }
}
