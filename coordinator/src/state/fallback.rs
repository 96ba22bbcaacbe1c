//! The fallback window: after a cutover switched, the old source is kept in sync from the new
//! target until an operator closes the window (`finalize`), so that a second cutover, in
//! reverse, can bring the old site back.
//!
//! A fallback is a migration in reverse — the target agent's copy is its source, the old source
//! path on the old source agent its target — with the same rounds, verification and cutover as
//! any other. Its round 0 does not copy everything back: it compares the copy with the tree
//! the target agent recorded while it verified the switch (`baseline`: that migration's uuid),
//! so it sends only what changed at the target since. The old source must be able to receive:
//! its agent needs `data_listen` and a `root` that holds the old source path.

use std::path::Path;

use super::*;

impl State {
    /// An operator opens the fallback window of migration `mid`: creates its reverse migration.
    pub(super) fn start_fallback(&mut self, mid: u64, uuid: String, now_ms: u64) -> Response {
        let Some(m) = self.migrations.get(&mid) else {
            return refused(format!("migration {mid} does not exist"));
        };
        if !m.switched() {
            return refused(format!(
                "migration {} has not been cut over: a fallback keeps the old source in sync \
                 after the switch (`ferryctl migration cutover {}` first)",
                m.name, m.name
            ));
        }
        if m.finalized_ms > 0 {
            return refused(format!(
                "migration {} was finalized: its fallback window is closed",
                m.name
            ));
        }
        if m.fallback != 0 {
            return refused(format!(
                "migration {} already has its fallback: migration {} (see `ferryctl migration \
                 status {}`)",
                m.name, m.fallback, m.fallback
            ));
        }
        let (to, from) = (&m.spec.source_agent, &m.spec.target_agent);
        let Some(copy_root) = self
            .agents
            .get(from)
            .map(|a| a.target_root.as_str())
            .filter(|r| !r.is_empty())
        else {
            return refused(format!(
                "agent {from} did not say where it writes (its registration has no root): \
                 restart it with this version of ferry-agent"
            ));
        };
        if m.spec.source_is_store() {
            return refused(super::phases::store_source_refusal(&m.name, "a fallback"));
        }
        if ferry_common::path::is_store_url(copy_root) {
            return refused(format!(
                "agent {from} writes to an object store ({copy_root}): a fallback from a store \
                 is not supported yet"
            ));
        }
        let back = self.agents.get(to);
        let Some(back_root) = back
            .filter(|a| !a.data_addr.is_empty())
            .map(|a| a.target_root.as_str())
            .filter(|r| !r.is_empty())
        else {
            return refused(format!(
                "agent {to} cannot receive: the fallback sends the copy back to it, so give its \
                 config `data_listen` and a `root` that holds {}, restart it, and run the \
                 fallback again",
                m.spec.source_path
            ));
        };
        let target_path = match Path::new(&m.spec.source_path).strip_prefix(back_root) {
            Ok(rel) => rel.to_string_lossy().into_owned(),
            Err(_) => {
                return refused(format!(
                    "the old source {} is not below agent {to}'s root {back_root}: set its \
                     `root` to a directory that holds it (e.g. {}), restart it, and run the \
                     fallback again",
                    m.spec.source_path,
                    Path::new(&m.spec.source_path)
                        .parent()
                        .map_or("/".into(), |p| p.display().to_string())
                ))
            }
        };
        if let Err(e) = ferry_common::path::validate_relative(target_path.as_bytes()) {
            if !target_path.is_empty() {
                return refused(format!(
                    "the old source {} gives no usable path below agent {to}'s root: {e}",
                    m.spec.source_path
                ));
            }
        }
        let source_path = match m.spec.target_path.as_str() {
            "" => copy_root.to_string(),
            rel => Path::new(copy_root)
                .join(rel)
                .to_string_lossy()
                .into_owned(),
        };
        let spec = MigrationSpec {
            source_agent: from.clone(),
            source_path,
            target_agent: to.clone(),
            target_path,
            segment_size: m.spec.segment_size,
            xattrs: m.spec.xattrs,
            // The copy holds no excluded names; those at the old source are left as they are.
            excludes: Vec::new(),
            max_attempts: m.spec.max_attempts,
            keep_deleted: m.spec.keep_deleted,
            max_delete: m.spec.max_delete,
            sync_every_ms: m.spec.sync_every_ms,
            auto_cutover_below_ms: 0,
            baseline: m.uuid.clone(),
            fallback_of: mid,
        };
        let name = format!("{}-fallback", m.name);
        let throttle = m.throttle.clone();
        match self.create_migration(name, String::new(), spec, uuid, &throttle, now_ms) {
            Response::MigrationCreated(rid) => {
                if let Some(m) = self.migrations.get_mut(&mid) {
                    m.fallback = rid;
                }
                self.dirty.migrations.insert(mid);
                Response::MigrationCreated(rid)
            }
            other => other,
        }
    }

    /// An operator closes the fallback window of migration `mid` (also when none was opened:
    /// then none may be).
    pub(super) fn finalize(&mut self, mid: u64, now_ms: u64) -> Response {
        let Some(m) = self.migrations.get(&mid) else {
            return refused(format!("migration {mid} does not exist"));
        };
        if !m.switched() {
            return refused(format!(
                "migration {} has not been cut over: there is no fallback window to close",
                m.name
            ));
        }
        if m.finalized_ms > 0 {
            return Response::Ok;
        }
        let rid = m.fallback;
        if let Some(r) = self.migrations.get(&rid) {
            if r.switched() {
                return refused(format!(
                    "its fallback, migration {}, switched back to the old site: that site is \
                     live again, and there is no window of {} to close",
                    r.name, self.migrations[&mid].name
                ));
            }
            if r.cutover_running() {
                return refused(format!(
                    "the cutover of its fallback, migration {}, is running: let it end, or \
                     abort it",
                    r.name
                ));
            }
            if !r.phase.finished() {
                return refused(format!(
                    "round {} of its fallback, migration {}, is running: finalize once it ended",
                    r.round().number,
                    r.name
                ));
            }
        }
        for id in [mid, rid] {
            if let Some(x) = self.migrations.get_mut(&id) {
                x.finalized_ms = now_ms.max(1);
                self.dirty.migrations.insert(id);
            }
        }
        Response::Ok
    }
}
