//! Raft log and state machine in sled 0.34 (openraft's storage-v2 traits).
//!
//! One sled database per node, three trees:
//! - `log`: entry index (u64 big-endian) → JSON entry; `meta` holds the vote, the last purged log
//!   id and the format version. Appends and votes are flushed before openraft is told they are
//!   durable.
//! - `sm`: the applied state — one record per agent (`a/<name>`), migration (`m/<id>`) and segment
//!   (`s/<mig><seg>`), plus `applied` and `membership`. Each apply batch, including the new
//!   `applied`, is one atomic sled batch, so an entry is never applied twice.
//! - `snap`: the current snapshot (meta + data), flushed before logs are purged.
//!
//! The live [`State`] is also kept in memory (shared with the gRPC services for reads).

// openraft's trait methods return its `StorageError` (224 bytes); our helpers return the same type.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};

use crate::raft_types::{NodeId, StorageError, TypeConfig};
use crate::state::{Agent, Migration, Segment, State};

/// Version of the on-disk layout; a node refuses to open a directory of another version.
pub const FORMAT_VERSION: u64 = 1;

type Membership = StoredMembership<NodeId, openraft::BasicNode>;
type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;
type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Opening the store failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// sled could not open the directory.
    #[error("cannot open sled database {path}: {source}")]
    Sled {
        /// The directory.
        path: std::path::PathBuf,
        /// sled's error.
        source: sled::Error,
    },
    /// The directory was written by another format version.
    #[error("{path} holds format version {found}, this binary reads {FORMAT_VERSION}; use a matching ferry-coordinator")]
    Version {
        /// The directory.
        path: std::path::PathBuf,
        /// The version found.
        found: u64,
    },
    /// Stored state could not be read back.
    #[error("cannot load state from {path}: {message}")]
    Corrupt {
        /// The directory.
        path: std::path::PathBuf,
        /// What failed.
        message: String,
    },
}

fn io_err(e: impl std::error::Error + Send + Sync + 'static) -> std::io::Error {
    std::io::Error::other(e)
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write(&e).into()
}

/// Opens (or creates) the node's sled database and returns its log store and state machine.
pub fn open(path: &std::path::Path) -> Result<(LogStore, StateMachine), OpenError> {
    let db = sled::open(path).map_err(|source| OpenError::Sled {
        path: path.to_path_buf(),
        source,
    })?;
    let sled_err = |source| OpenError::Sled {
        path: path.to_path_buf(),
        source,
    };
    let meta = db.open_tree("meta").map_err(sled_err)?;
    match meta.get("format_version").map_err(sled_err)? {
        None => {
            meta.insert("format_version", &FORMAT_VERSION.to_be_bytes())
                .map_err(sled_err)?;
            meta.flush().map_err(sled_err)?;
        }
        Some(v) => {
            let found = u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0xff; 8]));
            if found != FORMAT_VERSION {
                return Err(OpenError::Version {
                    path: path.to_path_buf(),
                    found,
                });
            }
        }
    }
    let log = LogStore {
        log: db.open_tree("log").map_err(sled_err)?,
        meta,
    };
    let sm = StateMachine::load(
        db.open_tree("sm").map_err(sled_err)?,
        db.open_tree("snap").map_err(sled_err)?,
    )
    .map_err(|message| OpenError::Corrupt {
        path: path.to_path_buf(),
        message,
    })?;
    Ok((log, sm))
}

/// The Raft log, in sled.
#[derive(Clone)]
pub struct LogStore {
    log: sled::Tree,
    meta: sled::Tree,
}

impl LogStore {
    fn get_meta<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>, StorageError> {
        match self.meta.get(key).map_err(read_err)? {
            None => Ok(None),
            Some(v) => Ok(Some(serde_json::from_slice(&v).map_err(read_err)?)),
        }
    }

    async fn put_meta<T: Serialize>(&self, key: &str, v: &T) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(v).map_err(write_err)?;
        self.meta.insert(key, bytes).map_err(write_err)?;
        self.meta.flush_async().await.map_err(write_err)?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for kv in self.log.range(start.to_be_bytes()..) {
            let (k, v) = kv.map_err(read_err)?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().expect("8-byte log key"));
            if !range.contains(&idx) {
                break;
            }
            out.push(serde_json::from_slice(&v).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId<NodeId>> = self.get_meta("last_purged")?;
        let last = match self.log.last().map_err(read_err)? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = serde_json::from_slice(&v).map_err(read_err)?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta("vote", vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta("vote")
    }

    async fn save_committed(&mut self, c: Option<LogId<NodeId>>) -> Result<(), StorageError> {
        self.put_meta("committed", &c).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError> {
        Ok(self
            .get_meta::<Option<LogId<NodeId>>>("committed")?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        for e in entries {
            let v = serde_json::to_vec(&e).map_err(write_err)?;
            batch.insert(&e.log_id.index.to_be_bytes(), v);
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        let res = self.log.flush_async().await.map(|_| ()).map_err(io_err);
        callback.log_io_completed(res);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for k in self.log.range(log_id.index.to_be_bytes()..) {
            batch.remove(k.map_err(write_err)?.0);
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        self.log.flush_async().await.map_err(write_err)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        // Record the purge point first: if we crash half-way the log state stays consistent.
        self.put_meta("last_purged", &log_id).await?;
        let mut batch = sled::Batch::default();
        for k in self.log.range(..=log_id.index.to_be_bytes()) {
            batch.remove(k.map_err(write_err)?.0);
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        self.log.flush_async().await.map_err(write_err)?;
        Ok(())
    }
}

/// The state machine: in-memory [`State`] plus its sled records.
pub struct StateMachine {
    tree: sled::Tree,
    snap: sled::Tree,
    shared: Arc<RwLock<Applied>>,
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

/// Snapshot bytes: a 32-byte BLAKE3 of the body, then the body (JSON of [`SnapshotData`]). The
/// checksum is verified before a snapshot is installed or loaded, so a snapshot damaged in
/// transit or on disk is refused instead of becoming the state.
fn seal_snapshot(d: &SnapshotData) -> Result<Vec<u8>, serde_json::Error> {
    let body = serde_json::to_vec(d)?;
    let mut out = Vec::with_capacity(32 + body.len());
    out.extend_from_slice(blake3::hash(&body).as_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// A snapshot could not be opened.
#[derive(Debug, thiserror::Error)]
enum SnapshotError {
    #[error("snapshot checksum mismatch ({0} bytes): refusing a damaged snapshot")]
    Checksum(usize),
    #[error("snapshot body is not valid: {0}")]
    Body(#[from] serde_json::Error),
}

fn open_snapshot(bytes: &[u8]) -> Result<SnapshotData, SnapshotError> {
    if bytes.len() < 32 || blake3::hash(&bytes[32..]).as_bytes() != &bytes[..32] {
        return Err(SnapshotError::Checksum(bytes.len()));
    }
    Ok(serde_json::from_slice(&bytes[32..])?)
}

/// The serialised form of a snapshot.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    state: State,
}

fn agent_key(name: &str) -> Vec<u8> {
    [b"a/".as_slice(), name.as_bytes()].concat()
}

fn migration_key(id: u64) -> Vec<u8> {
    [b"m/".as_slice(), &id.to_be_bytes()].concat()
}

fn segment_key(m: u64, s: u64) -> Vec<u8> {
    [b"s/".as_slice(), &m.to_be_bytes(), &s.to_be_bytes()].concat()
}

impl StateMachine {
    fn load(tree: sled::Tree, snap: sled::Tree) -> Result<Self, String> {
        let sm = StateMachine {
            tree,
            snap,
            shared: Arc::default(),
        };
        let from_tree = sm.read_tree().map_err(|e| e.to_string())?;
        // A snapshot newer than the tree means an install was interrupted: finish it.
        let snapshot = sm.read_snapshot().map_err(|e| e.to_string())?;
        let applied = match snapshot {
            Some((meta, data)) if meta.last_log_id > from_tree.last_applied => {
                let d = open_snapshot(&data).map_err(|e| e.to_string())?;
                sm.write_all(&d).map_err(|e| e.to_string())?;
                let mut state = d.state;
                state.rebuild_indexes();
                Applied {
                    state,
                    last_applied: d.last_applied,
                    membership: d.membership,
                }
            }
            _ => from_tree,
        };
        *sm.shared.write().expect("not poisoned") = applied;
        Ok(sm)
    }

    fn read_tree(&self) -> AnyResult<Applied> {
        let mut agents = BTreeMap::new();
        let mut migrations = BTreeMap::new();
        let mut segments = BTreeMap::new();
        for kv in self.tree.scan_prefix(b"a/") {
            let (_, v) = kv?;
            let a: Agent = serde_json::from_slice(&v)?;
            agents.insert(a.name.clone(), a);
        }
        for kv in self.tree.scan_prefix(b"m/") {
            let (_, v) = kv?;
            let m: Migration = serde_json::from_slice(&v)?;
            migrations.insert(m.id, m);
        }
        for kv in self.tree.scan_prefix(b"s/") {
            let (k, v) = kv?;
            let m = u64::from_be_bytes(k[2..10].try_into()?);
            let s = u64::from_be_bytes(k[10..18].try_into()?);
            let seg: Segment = serde_json::from_slice(&v)?;
            segments.insert((m, s), seg);
        }
        let last_applied = match self.tree.get("applied")? {
            Some(v) => serde_json::from_slice(&v)?,
            None => None,
        };
        let membership = match self.tree.get("membership")? {
            Some(v) => serde_json::from_slice(&v)?,
            None => Membership::default(),
        };
        Ok(Applied {
            state: State::from_parts(agents, migrations, segments),
            last_applied,
            membership,
        })
    }

    fn read_snapshot(&self) -> AnyResult<Option<(Meta, Vec<u8>)>> {
        let (Some(meta), Some(data)) = (self.snap.get("meta")?, self.snap.get("data")?) else {
            return Ok(None);
        };
        Ok(Some((serde_json::from_slice(&meta)?, data.to_vec())))
    }

    /// Replaces the whole tree with `d` (snapshot install).
    fn write_all(&self, d: &SnapshotData) -> AnyResult<()> {
        self.tree.clear()?;
        let mut batch = sled::Batch::default();
        for a in d.state.agents.values() {
            batch.insert(agent_key(&a.name), serde_json::to_vec(a)?);
        }
        for m in d.state.migrations.values() {
            batch.insert(migration_key(m.id), serde_json::to_vec(m)?);
        }
        for (&(m, s), seg) in &d.state.segments {
            batch.insert(segment_key(m, s), serde_json::to_vec(seg)?);
        }
        batch.insert("applied", serde_json::to_vec(&d.last_applied)?);
        batch.insert("membership", serde_json::to_vec(&d.membership)?);
        self.tree.apply_batch(batch)?;
        self.tree.flush()?;
        Ok(())
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
            v.to_json()
                .map_err(|e| StorageIOError::write_state_machine(&e))
        };
        for name in &dirty.agents {
            match a.state.agents.get(name) {
                Some(x) => batch.insert(agent_key(name), enc(x)?),
                None => batch.remove(agent_key(name)),
            }
        }
        for id in &dirty.migrations {
            match a.state.migrations.get(id) {
                Some(x) => batch.insert(migration_key(*id), enc(x)?),
                None => batch.remove(migration_key(*id)),
            }
        }
        for &(m, s) in &dirty.segments {
            match a.state.segments.get(&(m, s)) {
                Some(x) => batch.insert(segment_key(m, s), enc(x)?),
                None => batch.remove(segment_key(m, s)),
            }
        }
        batch.insert("applied", enc(&a.last_applied)?);
        if membership_changed {
            batch.insert("membership", enc(&a.membership)?);
        }
        // Fault point: a crash here loses the in-memory changes and writes nothing, so the
        // entries are applied again, once, after a restart (store::tests::crash_between_apply_and_record_never_applies_twice).
        #[cfg(test)]
        if tests::CRASH_BEFORE_RECORD.with(|c| c.get()) {
            return Err(
                StorageIOError::write_state_machine(&AnyErr("injected crash".into())).into(),
            );
        }
        self.tree
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            shared: self.shared.clone(),
            snap: self.snap.clone(),
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
        let data = snapshot.into_inner();
        let d = open_snapshot(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        save_snapshot(&self.snap, meta, &data).await?;
        self.write_all(&d).map_err(|e| {
            StorageIOError::write_snapshot(Some(meta.signature()), &AnyErr(e.to_string()))
        })?;
        let mut state = d.state;
        state.rebuild_indexes();
        *self.shared.write().expect("not poisoned") = Applied {
            state,
            last_applied: d.last_applied,
            membership: d.membership,
        };
        tracing::info!(message = "Installed snapshot.", id = %meta.snapshot_id, bytes = data.len());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let s = self
            .read_snapshot()
            .map_err(|e| StorageIOError::read_snapshot(None, &AnyErr(e.to_string())))?;
        Ok(s.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

/// Builds snapshots from the in-memory state and persists them before handing them to openraft.
pub struct SnapshotBuilder {
    shared: Arc<RwLock<Applied>>,
    snap: sled::Tree,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let snapshot = build_snapshot(&self.shared)?;
        save_snapshot(&self.snap, &snapshot.meta, snapshot.snapshot.get_ref()).await?;
        Ok(snapshot)
    }
}

fn build_snapshot(shared: &RwLock<Applied>) -> Result<Snapshot<TypeConfig>, StorageError> {
    let a = shared.read().expect("not poisoned");
    let d = SnapshotData {
        last_applied: a.last_applied,
        membership: a.membership.clone(),
        state: a.state.clone(),
    };
    let data = seal_snapshot(&d).map_err(|e| StorageIOError::read_state_machine(&e))?;
    let snapshot_id = match a.last_applied {
        Some(l) => format!("{}-{}-{}", l.leader_id, l.index, data.len()),
        None => format!("empty-{}", data.len()),
    };
    Ok(Snapshot {
        meta: SnapshotMeta {
            last_log_id: a.last_applied,
            last_membership: a.membership.clone(),
            snapshot_id,
        },
        snapshot: Box::new(Cursor::new(data)),
    })
}

async fn save_snapshot(
    snap: &sled::Tree,
    meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
    data: &[u8],
) -> Result<(), StorageError> {
    let err = |e: &dyn std::error::Error| {
        StorageIOError::write_snapshot(Some(meta.signature()), &AnyErr(e.to_string()))
    };
    let mut batch = sled::Batch::default();
    batch.insert("meta", serde_json::to_vec(meta).map_err(|e| err(&e))?);
    batch.insert("data", data);
    snap.apply_batch(batch).map_err(|e| err(&e))?;
    snap.flush_async().await.map_err(|e| err(&e))?;
    Ok(())
}

/// A plain error carrying a message (for errors that are not `'static` types).
#[derive(Debug)]
struct AnyErr(String);

impl std::fmt::Display for AnyErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AnyErr {}

mod erased {
    /// Object-safe JSON encoding, so one closure encodes every record type.
    pub trait Ser {
        fn to_json(&self) -> Result<Vec<u8>, serde_json::Error>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
            serde_json::to_vec(self)
        }
    }
}

#[cfg(test)]
mod tests;
