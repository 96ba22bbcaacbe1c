//! The state machine: the applied state in memory, its records in the current generation of
//! the `sm` tree, each apply one atomic batch; snapshot installs switch generations.

// openraft's trait methods return its `StorageError` (224 bytes); our helpers return the same type.
#![allow(clippy::result_large_err)]

use super::*;

/// The state machine: in-memory [`State`]; durably, the snapshot file plus the sled records
/// written since it was installed.
pub struct StateMachine {
    pub(super) db: sled::Db,
    pub(super) meta: sled::Tree,
    /// The current generation of the records tree.
    pub(super) tree: sled::Tree,
    pub(super) generation: u64,
    pub(super) snap_dir: PathBuf,
    /// Held while the snapshot file is replaced, so an older snapshot never replaces a newer one.
    pub(super) snap_lock: Arc<std::sync::Mutex<()>>,
    pub(super) shared: Arc<RwLock<Applied>>,
    /// The thread dropping old generations, joined before the next one and on drop.
    pub(super) dropper: Option<std::thread::JoinHandle<()>>,
}

impl Drop for StateMachine {
    fn drop(&mut self) {
        if let Some(t) = self.dropper.take() {
            let _ = t.join();
        }
    }
}

pub(super) fn sm_tree_name(generation: u64) -> String {
    format!("sm-{generation}")
}

/// What the state machine has applied; shared read-only with the services.
#[derive(Debug, Default)]
pub struct Applied {
    /// The state.
    pub state: State,
    /// Last applied log id.
    pub last_applied: Option<LogId<NodeId>>,
    /// Last applied membership.
    pub membership: Membership,
}

pub(super) fn agent_key(name: &str) -> Vec<u8> {
    [b"a/".as_slice(), name.as_bytes()].concat()
}

pub(super) fn migration_key(id: u64) -> Vec<u8> {
    [b"m/".as_slice(), &id.to_be_bytes()].concat()
}

pub(super) fn segment_key(m: u64, s: u64) -> Vec<u8> {
    [b"s/".as_slice(), &m.to_be_bytes(), &s.to_be_bytes()].concat()
}

pub(super) fn audit_key(seq: u64) -> Vec<u8> {
    [b"u/".as_slice(), &seq.to_be_bytes()].concat()
}

pub(super) fn job_key(id: u64) -> Vec<u8> {
    [b"j/".as_slice(), &id.to_be_bytes()].concat()
}

impl StateMachine {
    pub(super) fn load(
        db: sled::Db,
        meta: sled::Tree,
        snap_dir: PathBuf,
    ) -> Result<Self, StoreError> {
        let generation = match meta.get("sm_generation")? {
            Some(v) => be_u64(&v, 0..8)?,
            None => 0,
        };
        let tree = db.open_tree(sm_tree_name(generation))?;
        let mut sm = StateMachine {
            db,
            meta,
            tree,
            generation,
            snap_dir,
            snap_lock: Arc::default(),
            shared: Arc::default(),
            dropper: None,
        };
        sm.drop_old_generations();
        let snapshot = read_snapshot_file(&sm.snap_dir)?;
        let tree_applied: Option<LogId<NodeId>> = match sm.tree.get("applied")? {
            Some(v) => decode(&v)?,
            None => None,
        };
        let applied = match snapshot {
            None => sm.read_tree(State::default(), None)?,
            Some((smeta, data)) => {
                let d = open_snapshot(&data).map_err(|source| StoreError::BaseSnapshot {
                    dir: sm.snap_dir.clone(),
                    source,
                })?;
                if smeta.last_log_id > tree_applied {
                    // An install was interrupted before the switch to a new generation.
                    sm.switch_generation(&d)?;
                    let mut state = d.state;
                    state.rebuild_indexes();
                    Applied {
                        state,
                        last_applied: d.last_applied,
                        membership: d.membership,
                    }
                } else {
                    sm.read_tree(d.state, Some(d.membership))?
                }
            }
        };
        *sm.shared.write().expect("not poisoned") = applied;
        Ok(sm)
    }

    /// The state: `base` with the tree's records laid over it.
    pub(super) fn read_tree(
        &self,
        base: State,
        membership: Option<Membership>,
    ) -> Result<Applied, StoreError> {
        let base_cluster = base.cluster_id.clone();
        let base_deleted = base.deleted_up_to;
        let mut audit = base.audit.clone();
        let mut jobs = base.jobs.clone();
        let base_pki = base.pki.clone();
        let (mut agents, mut migrations, mut segments) = base.into_parts();
        for kv in self.tree.scan_prefix(b"a/") {
            let (k, v) = kv?;
            let name = String::from_utf8(k[2..].to_vec())
                .map_err(|_| StoreError::Malformed(k.to_vec()))?;
            if v.is_empty() {
                agents.remove(&name);
            } else {
                agents.insert(name, decode(&v)?);
            }
        }
        for kv in self.tree.scan_prefix(b"m/") {
            let (k, v) = kv?;
            let id = be_u64(&k, 2..10)?;
            if v.is_empty() {
                migrations.remove(&id);
            } else {
                migrations.insert(id, decode::<Migration>(&v)?);
            }
        }
        for kv in self.tree.scan_prefix(b"s/") {
            let (k, v) = kv?;
            let (m, s) = (be_u64(&k, 2..10)?, be_u64(&k, 10..18)?);
            if v.is_empty() {
                segments.remove(&(m, s));
            } else {
                segments.insert((m, s), decode::<Segment>(&v)?);
            }
        }
        let last_applied = match self.tree.get("applied")? {
            Some(v) => decode(&v)?,
            None => None,
        };
        let membership = match self.tree.get("membership")? {
            Some(v) => decode(&v)?,
            None => membership.unwrap_or_default(),
        };
        let mut state = State::from_parts(agents, migrations, segments);
        state.cluster_id = match self.tree.get("cluster")? {
            Some(v) => decode(&v)?,
            None => base_cluster,
        };
        state.deleted_up_to = match self.tree.get("deleted_up_to")? {
            Some(v) => decode(&v)?,
            None => base_deleted,
        };
        for kv in self.tree.scan_prefix(b"u/") {
            let (k, v) = kv?;
            let seq = be_u64(&k, 2..10)?;
            if v.is_empty() {
                audit.remove(&seq);
            } else {
                audit.insert(seq, decode(&v)?);
            }
        }
        state.audit = audit;
        for kv in self.tree.scan_prefix(b"j/") {
            let (k, v) = kv?;
            let id = be_u64(&k, 2..10)?;
            if v.is_empty() {
                jobs.remove(&id);
            } else {
                jobs.insert(id, decode(&v)?);
            }
        }
        state.jobs = jobs;
        state.pki = match self.tree.get("pki")? {
            Some(v) => decode(&v)?,
            None => base_pki,
        };
        Ok(Applied {
            state,
            last_applied,
            membership,
        })
    }

    /// Makes `d` (just saved as the snapshot file) the whole state: a new, empty generation of
    /// the records tree holding only `applied` and `membership` becomes current; the old one is
    /// dropped in the background.
    pub(super) fn switch_generation(&mut self, d: &SnapshotData) -> Result<(), StoreError> {
        // The dropper may be emptying a tree of this number left by a crash (`load` starts it).
        if let Some(t) = self.dropper.take() {
            let _ = t.join();
        }
        let next = self.generation + 1;
        let tree = self.db.open_tree(sm_tree_name(next))?;
        tree.clear()?;
        let mut batch = sled::Batch::default();
        batch.insert("applied", encode(&d.last_applied)?);
        batch.insert("membership", encode(&d.membership)?);
        tree.apply_batch(batch)?;
        tree.flush()?;
        self.meta.insert("sm_generation", &next.to_be_bytes())?;
        self.meta.flush()?;
        self.tree = tree;
        self.generation = next;
        self.drop_old_generations();
        Ok(())
    }

    /// Drops record trees of earlier generations (in the background: it takes time per record).
    pub(super) fn drop_old_generations(&mut self) {
        if let Some(t) = self.dropper.take() {
            let _ = t.join();
        }
        let current = sm_tree_name(self.generation);
        let old: Vec<_> = self
            .db
            .tree_names()
            .into_iter()
            .filter(|n| n.starts_with(b"sm-") && n.as_ref() != current.as_bytes())
            .collect();
        if old.is_empty() {
            return;
        }
        let db = self.db.clone();
        self.dropper = Some(std::thread::spawn(move || {
            for name in old {
                // Emptied key by key first: sled's `drop_tree` walks every page of the tree
                // under one epoch guard, so nothing it reads is freed before it ends, and a tree
                // of 10 million records took ~2.5 GiB more (bench-cluster, 2026-12-06). Each
                // `remove` pins on its own.
                let dropped = db
                    .open_tree(&name)
                    .and_then(|t| t.clear())
                    .and_then(|()| db.drop_tree(&name));
                if let Err(e) = dropped {
                    tracing::warn!(message = "Could not drop an old state tree; it is retried at the next start.", error = %e);
                }
            }
        }));
    }

    /// A handle for readers (the gRPC services).
    pub fn shared(&self) -> Arc<RwLock<Applied>> {
        self.shared.clone()
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, Membership), StorageError> {
        let a = self.shared.read().expect("not poisoned");
        Ok((a.last_applied, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<crate::state::Response>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut responses = Vec::new();
        let mut batch = sled::Batch::default();
        let mut guard = self.shared.write().expect("not poisoned");
        let a = &mut *guard;
        let mut membership_changed = false;
        for e in entries {
            a.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => responses.push(crate::state::Response::Ok),
                EntryPayload::Normal(cmd) => responses.push(a.state.apply(e.log_id.index, cmd)),
                EntryPayload::Membership(m) => {
                    a.membership = StoredMembership::new(Some(e.log_id), m);
                    membership_changed = true;
                    responses.push(crate::state::Response::Ok);
                }
            }
        }
        let dirty = a.state.take_dirty();
        let enc = |v: &dyn erased::Ser| {
            v.encode()
                .map_err(|e| StorageIOError::write_state_machine(&e))
        };
        for name in &dirty.agents {
            match a.state.agents.get(name) {
                Some(x) => batch.insert(agent_key(name), enc(x)?),
                None => batch.insert(agent_key(name), Vec::new()),
            }
        }
        for id in &dirty.migrations {
            match a.state.migrations.get(id) {
                Some(x) => batch.insert(migration_key(*id), enc(x)?),
                None => batch.insert(migration_key(*id), Vec::new()),
            }
        }
        for &(m, s) in &dirty.segments {
            match a.state.segments.get(&(m, s)) {
                Some(x) => batch.insert(segment_key(m, s), enc(x)?),
                None => batch.insert(segment_key(m, s), Vec::new()),
            }
        }
        if dirty.cluster {
            batch.insert("cluster", enc(&a.state.cluster_id)?);
        }
        for &seq in &dirty.audit {
            match a.state.audit.get(&seq) {
                Some(r) => batch.insert(audit_key(seq), enc(r)?),
                // Dropped, the oldest beyond `AUDIT_KEPT`.
                None => batch.insert(audit_key(seq), Vec::new()),
            }
        }
        for &id in &dirty.jobs {
            match a.state.jobs.get(&id) {
                Some(j) => batch.insert(job_key(id), enc(j)?),
                None => batch.insert(job_key(id), Vec::new()),
            }
        }
        if dirty.pki {
            batch.insert("pki", enc(&a.state.pki)?);
        }
        if dirty.deleted_up_to {
            batch.insert("deleted_up_to", enc(&a.state.deleted_up_to)?);
        }
        batch.insert("applied", enc(&a.last_applied)?);
        if membership_changed {
            batch.insert("membership", enc(&a.membership)?);
        }
        // Fault point: a crash here loses the in-memory changes and writes nothing, so the
        // entries are applied again, once, after a restart (store::tests::crash_between_apply_and_record_never_applies_twice).
        #[cfg(test)]
        if tests::CRASH_BEFORE_RECORD.with(|c| c.get()) {
            return Err(StorageIOError::write_state_machine(&StoreError::Injected).into());
        }
        ferry_common::fault_point!("raft::apply_before_record");
        self.tree
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        ferry_common::fault_point!("raft::apply_after_record");
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            shared: self.shared.clone(),
            snap_dir: self.snap_dir.clone(),
            snap_lock: self.snap_lock.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let started = std::time::Instant::now();
        let data = snapshot.into_inner();
        let d = open_snapshot(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let len = data.len();
        drop(save_snapshot(&self.snap_dir, &self.snap_lock, meta, data).await?);
        // The received snapshot's file is durable; the records are still the old generation's.
        ferry_common::fault_point!("raft::snapshot_install_before_switch");
        self.switch_generation(&d)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        // The new generation is in place; openraft does not know the install ended.
        ferry_common::fault_point!("raft::snapshot_install_after_switch");
        let mut state = d.state;
        state.rebuild_indexes();
        *self.shared.write().expect("not poisoned") = Applied {
            state,
            last_applied: d.last_applied,
            membership: d.membership,
        };
        tracing::info!(
            message = "Installed snapshot.",
            id = %meta.snapshot_id,
            bytes = len,
            ms = started.elapsed().as_millis() as u64
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let s = read_snapshot_file(&self.snap_dir)
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(s.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

mod erased {
    /// Object-safe encoding, so one closure encodes every record type.
    pub trait Ser {
        fn encode(&self) -> Result<Vec<u8>, crate::codec::CodecError>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn encode(&self) -> Result<Vec<u8>, crate::codec::CodecError> {
            crate::codec::encode(self)
        }
    }
}
