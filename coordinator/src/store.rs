//! Raft log and state machine in sled 0.34 (openraft's storage-v2 traits).
//!
//! One sled database per node (the node's data directory), three trees, every value in the
//! binary encoding of [`crate::codec`]:
//! - `log`: entry index (u64 big-endian) → entry; `meta` holds the vote, the last purged log id
//!   and the format version. Appends and votes are flushed before openraft is told they are
//!   durable.
//! - `sm-<generation>`: the applied state's records written since the last snapshot install —
//!   one per agent (`a/<name>`), migration (`m/<id>`) and segment (`s/<mig><seg>`; an empty value
//!   is a tombstone), plus `applied` and `membership`. Each apply batch, including the new
//!   `applied`, is one atomic sled batch, so an entry is never applied twice.
//!
//! The current snapshot is a file beside the trees (`ferry-snapshot/current`: meta, then the
//! sealed body), written to a temporary name, fsynced and renamed before logs are purged. It is
//! also the base of the state machine: the state is the snapshot with the `sm` records laid over
//! it. That overlay is always right because every record in the tree is the latest value of its
//! key and the tree's `applied` is at or past the snapshot. Installing a snapshot from the leader
//! therefore writes one file and switches to a new, empty generation of the tree (the number is
//! in `meta/sm_generation`), instead of rewriting millions of records; the old generation is
//! dropped afterwards. A snapshot newer than the tree's `applied` found at start-up is an install
//! that was interrupted before the switch: the switch is finished then.
//!
//! The live [`State`] is also kept in memory (shared with the gRPC services for reads). sled's
//! own cache is bounded by [`SLED_CACHE_BYTES`]: the state is served from memory, so sled's
//! cache only has to hold what is being written.

// openraft's trait methods return its `StorageError` (224 bytes); our helpers return the same type.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::{Cursor, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};

use crate::codec::{decode, encode};
use crate::raft_types::{NodeId, StorageError, TypeConfig};
use crate::state::{Migration, Segment, State};

/// Version of the on-disk layout; a node refuses to open a directory of another version.
/// 1: JSON records, snapshot in sled. 2: binary records ([`crate::codec`]), snapshot in a file.
/// 3: migrations have a name and an idempotency key; agents have a session and a conflict
/// record; lease, renewal, report and heartbeat commands carry the agent's session.
/// 4: retries are bounded: specs carry `max_attempts`, segments a backoff time
/// (`not_before_ms`) and a terminal `Failed` state, migrations a `Failed` phase and failed
/// counts; reports say whether a failure counts (`retry_later`).
/// 5: the state has a cluster id (record `cluster`); migrations a uuid, a hardlink count and
/// an xattrs option; agents whether they apply owners.
pub const FORMAT_VERSION: u64 = 5;

/// How long `open` waits for sled's file lock. sled finishes writing its buffers on background
/// threads after the last handle is dropped, so a node reopened at once in the same process
/// (a restart in a test, or an in-process restart) can find the lock still held for a moment.
/// Another process holding the directory keeps it longer, and `open` then fails.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

fn open_db(path: &Path) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let mut delay = std::time::Duration::from_millis(10);
    loop {
        match sled::Config::new()
            .path(path)
            .cache_capacity(SLED_CACHE_BYTES)
            .open()
        {
            // sled reports a held lock only in its message.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() + delay < deadline =>
            {
                std::thread::sleep(delay);
                delay = (delay * 2).min(std::time::Duration::from_millis(500));
            }
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                return Err(sled::Error::Io(std::io::Error::new(
                    e.kind(),
                    format!(
                        "{e}; another ferry-coordinator (or another program) holds this data \
                         directory: stop it, or give this node its own data_dir"
                    ),
                )))
            }
            other => return other,
        }
    }
}

/// sled's page cache per node (its default is 1 GiB, which alone broke the RSS budget).
pub const SLED_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Directory of the snapshot file, inside the node's data directory.
const SNAPSHOT_DIR: &str = "ferry-snapshot";

type Membership = StoredMembership<NodeId, openraft::BasicNode>;
type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

/// Reading or writing the node's stored state (records tree, snapshot file) failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// A file could not be read or written.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A stored record could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] crate::codec::CodecError),
    /// A key of the records tree is not of the shape its prefix promises.
    #[error("malformed record key {0:?}")]
    BadKey(Vec<u8>),
    /// The snapshot file is shorter than its header says.
    #[error("snapshot file of {0} bytes is truncated")]
    Truncated(u64),
    /// The snapshot file this node's state is built on is damaged.
    #[error(
        "{source}; the snapshot file in {dir} is the base of this node's state: remove the node's \
         data directory and add it to the cluster again"
    )]
    BaseSnapshot {
        /// The snapshot directory.
        dir: PathBuf,
        /// What is wrong with it.
        source: SnapshotError,
    },
    /// The task writing the snapshot file did not finish.
    #[error("the snapshot write did not finish: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A test's injected crash.
    #[cfg(test)]
    #[error("injected crash")]
    Injected,
}

/// A key's bytes `range` as a `u64`, or [`StoreError::BadKey`].
fn key_u64(k: &[u8], range: std::ops::Range<usize>) -> Result<u64, StoreError> {
    k.get(range)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::BadKey(k.to_vec()))
}

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
    #[error("cannot load state from {path}: {source}")]
    Corrupt {
        /// The directory.
        path: std::path::PathBuf,
        /// What failed.
        source: StoreError,
    },
    /// A directory could not be created.
    #[error("cannot create directory {path}: {source}")]
    Create {
        /// The directory.
        path: std::path::PathBuf,
        /// Why not.
        source: std::io::Error,
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
pub fn open(path: &Path) -> Result<(LogStore, StateMachine), OpenError> {
    let db = open_db(path).map_err(|source| OpenError::Sled {
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
    let meta_for_sm = meta.clone();
    let log = LogStore {
        log: db.open_tree("log").map_err(sled_err)?,
        meta,
    };
    let snap_dir = path.join(SNAPSHOT_DIR);
    std::fs::create_dir_all(&snap_dir).map_err(|source| OpenError::Create {
        path: snap_dir.clone(),
        source,
    })?;
    let sm =
        StateMachine::load(db, meta_for_sm, snap_dir).map_err(|source| OpenError::Corrupt {
            path: path.to_path_buf(),
            source,
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
            Some(v) => Ok(Some(decode(&v).map_err(read_err)?)),
        }
    }

    async fn put_meta<T: Serialize>(&self, key: &str, v: &T) -> Result<(), StorageError> {
        let bytes = encode(v).map_err(write_err)?;
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
            out.push(decode(&v).map_err(read_err)?);
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
                let e: Entry<TypeConfig> = decode(&v).map_err(read_err)?;
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
            let v = encode(&e).map_err(write_err)?;
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

/// The state machine: in-memory [`State`]; durably, the snapshot file plus the sled records
/// written since it was installed.
pub struct StateMachine {
    db: sled::Db,
    meta: sled::Tree,
    /// The current generation of the records tree.
    tree: sled::Tree,
    generation: u64,
    snap_dir: PathBuf,
    /// Held while the snapshot file is replaced, so an older snapshot never replaces a newer one.
    snap_lock: Arc<std::sync::Mutex<()>>,
    shared: Arc<RwLock<Applied>>,
    /// The thread dropping old generations, joined before the next one and on drop.
    dropper: Option<std::thread::JoinHandle<()>>,
}

impl Drop for StateMachine {
    fn drop(&mut self) {
        if let Some(t) = self.dropper.take() {
            let _ = t.join();
        }
    }
}

fn sm_tree_name(generation: u64) -> String {
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

/// Snapshot bytes: a 32-byte BLAKE3 of the body, then the body (the encoded [`SnapshotData`]).
/// The checksum is verified before a snapshot is installed or loaded, so a snapshot damaged in
/// transit or on disk is refused instead of becoming the state. Encoded straight from the live
/// state under its read lock (no clone: a clone of millions of segments doubled the memory).
fn seal_snapshot(a: &Applied) -> Result<Vec<u8>, crate::codec::CodecError> {
    let body = SnapshotRef {
        last_applied: &a.last_applied,
        membership: &a.membership,
        state: &a.state,
    };
    let mut out = crate::codec::encode_into(&body, vec![0; 32])?;
    let digest = blake3::hash(&out[32..]);
    out[..32].copy_from_slice(digest.as_bytes());
    Ok(out)
}

/// A snapshot could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Its checksum does not match its bytes.
    #[error("snapshot checksum mismatch ({0} bytes): refusing a damaged snapshot")]
    Checksum(usize),
    /// Its body does not decode.
    #[error("snapshot body is not valid: {0}")]
    Body(#[from] crate::codec::CodecError),
}

fn open_snapshot(bytes: &[u8]) -> Result<SnapshotData, SnapshotError> {
    if bytes.len() < 32 || blake3::hash(&bytes[32..]).as_bytes() != &bytes[..32] {
        return Err(SnapshotError::Checksum(bytes.len()));
    }
    Ok(decode(&bytes[32..])?)
}

/// The serialised form of a snapshot.
#[derive(Deserialize)]
struct SnapshotData {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    state: State,
}

/// [`SnapshotData`] by reference, for encoding (same fields, same order, same encoding).
#[derive(Serialize)]
struct SnapshotRef<'a> {
    last_applied: &'a Option<LogId<NodeId>>,
    membership: &'a Membership,
    state: &'a State,
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

/// Name of the snapshot file in the snapshot directory.
const SNAPSHOT_FILE: &str = "current";

/// Reads the snapshot file: `u64` (big-endian) length of the encoded meta, the meta, the data.
fn read_snapshot_file(dir: &Path) -> Result<Option<(Meta, Vec<u8>)>, StoreError> {
    let mut bytes = match std::fs::read(dir.join(SNAPSHOT_FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let truncated = StoreError::Truncated(bytes.len() as u64);
    let Ok(meta_len) = key_u64(&bytes, 0..8).map(|l| l as usize) else {
        return Err(truncated);
    };
    if bytes.len() < 8 + meta_len {
        return Err(truncated);
    }
    let meta = decode(&bytes[8..8 + meta_len])?;
    bytes.drain(..8 + meta_len);
    Ok(Some((meta, bytes)))
}

/// Reads only the meta of the snapshot file.
fn read_snapshot_meta(dir: &Path) -> Result<Option<Meta>, StoreError> {
    use std::io::Read;
    let mut f = match std::fs::File::open(dir.join(SNAPSHOT_FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let len = u64::from_be_bytes(len);
    let file_len = f.metadata()?.len();
    if len > file_len {
        return Err(StoreError::Truncated(file_len));
    }
    let mut meta = vec![0u8; len as usize];
    f.read_exact(&mut meta)?;
    Ok(Some(decode(&meta)?))
}

/// Writes the snapshot file atomically: a temporary file, fsync, rename, fsync of the directory.
fn write_snapshot_file(dir: &Path, meta: &Meta, data: &[u8]) -> Result<(), StoreError> {
    let meta = encode(meta)?;
    let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&(meta.len() as u64).to_be_bytes())?;
    f.write_all(&meta)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

impl StateMachine {
    fn load(db: sled::Db, meta: sled::Tree, snap_dir: PathBuf) -> Result<Self, StoreError> {
        let generation = match meta.get("sm_generation")? {
            Some(v) => key_u64(&v, 0..8)?,
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
    fn read_tree(
        &self,
        base: State,
        membership: Option<Membership>,
    ) -> Result<Applied, StoreError> {
        let base_cluster = base.cluster_id.clone();
        let (mut agents, mut migrations, mut segments) = base.into_parts();
        for kv in self.tree.scan_prefix(b"a/") {
            let (k, v) = kv?;
            let name =
                String::from_utf8(k[2..].to_vec()).map_err(|_| StoreError::BadKey(k.to_vec()))?;
            if v.is_empty() {
                agents.remove(&name);
            } else {
                agents.insert(name, decode(&v)?);
            }
        }
        for kv in self.tree.scan_prefix(b"m/") {
            let (k, v) = kv?;
            let id = key_u64(&k, 2..10)?;
            if v.is_empty() {
                migrations.remove(&id);
            } else {
                migrations.insert(id, decode::<Migration>(&v)?);
            }
        }
        for kv in self.tree.scan_prefix(b"s/") {
            let (k, v) = kv?;
            let (m, s) = (key_u64(&k, 2..10)?, key_u64(&k, 10..18)?);
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
        Ok(Applied {
            state,
            last_applied,
            membership,
        })
    }

    /// Makes `d` (just saved as the snapshot file) the whole state: a new, empty generation of
    /// the records tree holding only `applied` and `membership` becomes current; the old one is
    /// dropped in the background.
    fn switch_generation(&mut self, d: &SnapshotData) -> Result<(), StoreError> {
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
    fn drop_old_generations(&mut self) {
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
                if let Err(e) = db.drop_tree(&name) {
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
        self.tree
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
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
        save_snapshot(&self.snap_dir, &self.snap_lock, meta, data).await?;
        self.switch_generation(&d)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
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

/// Builds snapshots from the in-memory state and persists them before handing them to openraft.
pub struct SnapshotBuilder {
    shared: Arc<RwLock<Applied>>,
    snap_dir: PathBuf,
    snap_lock: Arc<std::sync::Mutex<()>>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let started = std::time::Instant::now();
        let snapshot = build_snapshot(&self.shared)?;
        let data = snapshot.snapshot.get_ref().clone();
        save_snapshot(&self.snap_dir, &self.snap_lock, &snapshot.meta, data).await?;
        tracing::info!(
            message = "Built snapshot.",
            id = %snapshot.meta.snapshot_id,
            bytes = snapshot.snapshot.get_ref().len(),
            ms = started.elapsed().as_millis() as u64
        );
        Ok(snapshot)
    }
}

fn build_snapshot(shared: &RwLock<Applied>) -> Result<Snapshot<TypeConfig>, StorageError> {
    let a = shared.read().expect("not poisoned");
    let data = seal_snapshot(&a).map_err(|e| StorageIOError::read_state_machine(&e))?;
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

/// Persists a snapshot (off the async runtime: it is a large write plus fsyncs) unless the file
/// already holds a newer one (a build that started before an install finished).
async fn save_snapshot(
    dir: &Path,
    lock: &Arc<std::sync::Mutex<()>>,
    meta: &Meta,
    data: Vec<u8>,
) -> Result<(), StorageError> {
    let (dir, m, lock) = (dir.to_path_buf(), meta.clone(), lock.clone());
    tokio::task::spawn_blocking(move || {
        let _held = lock.lock().expect("not poisoned");
        // An unreadable file is replaced.
        if let Some(existing) = read_snapshot_meta(&dir).ok().flatten() {
            if existing.last_log_id > m.last_log_id {
                return Ok(());
            }
        }
        write_snapshot_file(&dir, &m, &data)
    })
    .await
    .map_err(StoreError::from)
    .and_then(|r| r)
    .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e).into())
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

#[cfg(test)]
mod tests;
