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
//!
//! `log` is the Raft log, `state_machine` the applied state and its records, `snapshot` the
//! snapshot file and its builder; this file opens the database and names the errors.

// openraft's trait methods return its `StorageError` (224 bytes); our helpers return the same type.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::{Cursor, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};

use crate::codec::{decode, encode};
use crate::raft_types::{NodeId, StorageError, TypeConfig};
use crate::state::{Migration, Segment, State};

mod log;
mod snapshot;
mod state_machine;

pub use log::LogStore;
use snapshot::*;
pub use snapshot::{SnapshotBuilder, SnapshotError};
pub use state_machine::{Applied, StateMachine};

/// Version of the on-disk layout; a node refuses to open a directory of another version.
/// 1: JSON records, snapshot in sled. 2: binary records ([`crate::codec`]), snapshot in a file.
/// 3: migrations have a name and an idempotency key; agents have a session and a conflict
/// record; lease, renewal, report and heartbeat commands carry the agent's session.
/// 4: retries are bounded: specs carry `max_attempts`, segments a backoff time
/// (`not_before_ms`) and a terminal `Failed` state, migrations a `Failed` phase and failed
/// counts; reports say whether a failure counts (`retry_later`).
/// 5: the state has a cluster id (record `cluster`); migrations a uuid, a hardlink count and
/// an xattrs option; agents whether they apply owners.
/// 6–8: throttles, sync rounds and cutover, the verification cache.
/// 9: a target's report carries the hash the source sent with the bytes (`source_hash`).
/// 10: migrations can be deleted (`DeleteMigration`): agents carry `forget`, the state
/// `deleted_up_to` (record `deleted_up_to`); the audit log (`Audited`, `Audit`; records
/// `u/<seq>`).
/// 11: agents' jobs (`StartJob`, `ReportJob`; records `j/<id>`, the state's `jobs`).
/// 12: enrolment: join tokens, signed certificates, revoked agents (record `pki`, the state's
/// `pki`).
/// 13: target pools: migrations carry `targets`, segments which piece of a split file they
/// are and the member their lease went to (`AddTarget`, `RemoveTarget`).
pub const FORMAT_VERSION: u64 = 13;

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

/// The file holding the node's latest snapshot in its data directory `data_dir` (its mtime is
/// when the snapshot was built or installed).
pub fn snapshot_file(data_dir: &Path) -> PathBuf {
    data_dir.join(SNAPSHOT_DIR).join(snapshot::SNAPSHOT_FILE)
}

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
    /// A stored key or number is not of the shape its place promises.
    #[error("malformed stored bytes {0:?}")]
    Malformed(Vec<u8>),
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

/// The big-endian `u64` at `range` of stored bytes (a key, a counter), or
/// [`StoreError::Malformed`].
fn be_u64(k: &[u8], range: std::ops::Range<usize>) -> Result<u64, StoreError> {
    k.get(range)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Malformed(k.to_vec()))
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
    let committed: Option<Option<LogId<NodeId>>> = meta
        .get("committed")
        .map_err(sled_err)?
        .and_then(|v| decode(&v).ok());
    let log = LogStore {
        log: db.open_tree("log").map_err(sled_err)?,
        meta,
        committed: Arc::new(std::sync::atomic::AtomicU64::new(
            committed.flatten().map_or(0, |c| c.index),
        )),
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

#[cfg(test)]
mod tests;
