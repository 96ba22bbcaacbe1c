//! The generations of the state machine's records tree (`sm-<generation>`), and the switch from
//! one to the next.
//!
//! The records of the current generation laid over the snapshot file are the state. A new
//! generation starts whenever the snapshot file is replaced, so the tree holds only what changed
//! since the snapshot, not everything ever written:
//! - a snapshot installed from the leader: the new generation starts empty
//!   ([`Records::switch_to`]);
//! - a snapshot this node built: the state keeps changing while the file is written, so the next
//!   generation is started, under the state's read lock, at the snapshot's `applied`
//!   ([`Records::begin_next`]). Every batch applied after it goes to both trees until the file is
//!   durable; then the next generation becomes current ([`Records::finish_next`]). A crash before
//!   that leaves `meta/sm_generation` on the old generation, which still holds every record.
//!
//! Old generations are dropped on a background thread. Generation numbers are never reused, so
//! a tree being dropped is never one being written.

// openraft's trait methods return its `StorageError` (224 bytes); our helpers return the same type.
#![allow(clippy::result_large_err)]

use super::*;

/// The records trees of a node's state machine.
pub(crate) struct Records {
    db: sled::Db,
    meta: sled::Tree,
    /// The current generation and its tree.
    generation: u64,
    tree: sled::Tree,
    /// While a snapshot this node built is being saved: the generation that replaces the
    /// current one once the snapshot file is durable. It holds the snapshot's `applied` and
    /// membership and every batch applied since.
    next: Option<(u64, sled::Tree)>,
    /// The highest generation number used (dropped trees included).
    highest: u64,
    /// The thread dropping old generations, joined before the next one and on drop.
    dropper: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Records {
    fn drop(&mut self) {
        if let Some(t) = self.dropper.take() {
            let _ = t.join();
        }
    }
}

pub(super) fn sm_tree_name(generation: u64) -> String {
    format!("sm-{generation}")
}

/// The generation of a records tree's name (`None` for other trees).
fn generation_of(name: &[u8]) -> Option<u64> {
    std::str::from_utf8(name.strip_prefix(b"sm-")?)
        .ok()?
        .parse()
        .ok()
}

impl Records {
    /// The current generation (`meta/sm_generation`); the others are dropped.
    pub(super) fn open(db: sled::Db, meta: sled::Tree) -> Result<Self, StoreError> {
        let generation = match meta.get("sm_generation")? {
            Some(v) => be_u64(&v, 0..8)?,
            None => 0,
        };
        let tree = db.open_tree(sm_tree_name(generation))?;
        let highest = db
            .tree_names()
            .iter()
            .filter_map(|n| generation_of(n))
            .fold(generation, u64::max);
        let mut records = Records {
            db,
            meta,
            generation,
            tree,
            next: None,
            highest,
            dropper: None,
        };
        records.drop_old_generations();
        Ok(records)
    }

    /// The current generation's tree.
    pub(super) fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// The current generation's number.
    #[cfg(test)]
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// The generations of the records trees in the database, once the old ones are dropped.
    #[cfg(test)]
    pub(super) fn generations(&mut self) -> Vec<u64> {
        if let Some(t) = self.dropper.take() {
            t.join().expect("the dropper ends");
        }
        self.db
            .tree_names()
            .iter()
            .filter_map(|n| generation_of(n))
            .collect()
    }

    /// Records one apply's batch: in the current generation and, while a snapshot is being
    /// saved, in the next one too.
    pub(super) fn apply(&self, batch: sled::Batch) -> sled::Result<()> {
        match &self.next {
            Some((_, next)) => {
                self.tree.apply_batch(batch.clone())?;
                next.apply_batch(batch)
            }
            None => self.tree.apply_batch(batch),
        }
    }

    /// A new, empty tree holding only `applied` and `membership`, with its generation number.
    fn fresh(
        &mut self,
        applied: &Option<LogId<NodeId>>,
        membership: &Membership,
    ) -> Result<(u64, sled::Tree), StoreError> {
        let generation = self.highest + 1;
        self.highest = generation;
        let tree = self.db.open_tree(sm_tree_name(generation))?;
        tree.clear()?;
        let mut batch = sled::Batch::default();
        batch.insert("applied", encode(applied)?);
        batch.insert("membership", encode(membership)?);
        tree.apply_batch(batch)?;
        Ok((generation, tree))
    }

    /// Starts the generation that follows a snapshot of the state at `applied`, which this node
    /// is building. Called under the state's read lock, so no batch is applied between the
    /// snapshot and the start. An earlier next generation whose snapshot was never finished is
    /// abandoned. Returns the generation, for [`Records::finish_next`].
    pub(super) fn begin_next(
        &mut self,
        applied: &Option<LogId<NodeId>>,
        membership: &Membership,
    ) -> Result<u64, StoreError> {
        let (generation, tree) = self.fresh(applied, membership)?;
        self.next = Some((generation, tree));
        Ok(generation)
    }

    /// The snapshot `generation` was begun for is durable in the snapshot file: that generation
    /// becomes current and the old one is dropped. Returns false, doing nothing, when it is no
    /// longer the next generation (an install or a later build replaced it).
    pub(super) fn finish_next(&mut self, generation: u64) -> Result<bool, StoreError> {
        if !matches!(&self.next, Some((g, _)) if *g == generation) {
            return Ok(false);
        }
        let (generation, tree) = self.next.take().expect("checked above");
        tree.flush()?;
        self.make_current(generation, tree)?;
        Ok(true)
    }

    /// The snapshot `generation` was begun for was not saved (a newer one is in the file, or
    /// building it failed): that generation is forgotten, and dropped with the old ones.
    pub(super) fn abandon_next(&mut self, generation: u64) {
        if matches!(&self.next, Some((g, _)) if *g == generation) {
            self.next = None;
        }
    }

    /// Makes a snapshot just saved to the snapshot file (installed from the leader, or found at
    /// start-up newer than the records) the whole state: a new, empty generation holding only
    /// its `applied` and `membership` becomes current.
    pub(super) fn switch_to(
        &mut self,
        applied: &Option<LogId<NodeId>>,
        membership: &Membership,
    ) -> Result<(), StoreError> {
        self.next = None;
        let (generation, tree) = self.fresh(applied, membership)?;
        tree.flush()?;
        self.make_current(generation, tree)
    }

    fn make_current(&mut self, generation: u64, tree: sled::Tree) -> Result<(), StoreError> {
        self.meta
            .insert("sm_generation", &generation.to_be_bytes())?;
        self.meta.flush()?;
        self.tree = tree;
        self.generation = generation;
        self.drop_old_generations();
        Ok(())
    }

    /// Drops the records trees that are neither current nor next (in the background: it takes
    /// time per record).
    fn drop_old_generations(&mut self) {
        if let Some(t) = self.dropper.take() {
            let _ = t.join();
        }
        let keep = [Some(self.generation), self.next.as_ref().map(|(g, _)| *g)];
        let old: Vec<_> = self
            .db
            .tree_names()
            .into_iter()
            .filter(|n| generation_of(n).is_some_and(|g| !keep.contains(&Some(g))))
            .collect();
        if old.is_empty() {
            return;
        }
        let db = self.db.clone();
        self.dropper = Some(std::thread::spawn(move || {
            for name in old {
                if let Err(e) = db.drop_tree(&name) {
                    tracing::warn!(message = "Could not drop an old state tree; it is retried at the next start.", error = %e);
                }
            }
        }));
    }
}
