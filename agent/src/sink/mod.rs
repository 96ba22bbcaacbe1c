//! The filesystem sink: where a target writes what it receives.
//!
//! Every path comes from a peer, so every path is checked (invariant 4): it must pass
//! [`validate_relative`], its last component must not be in ferry's own `.ferry-` namespace, and no
//! existing component between the root and the file may be a symlink. Files ferry creates itself
//! are opened with `O_NOFOLLOW` (and `O_EXCL` for temporaries, mode 0600), so a symlink planted
//! under one of their names is never followed.
//!
//! A whole file goes to a temporary `.ferry-s<segment>-e<epoch>-<pid>.<transfer>.<n>.tmp` beside
//! its destination (unique per transfer, so two streams of the same segment and epoch never
//! share one) and is renamed into place only after its bytes are fsynced, the segment's hashes
//! agree, and its owner, mode and mtime are set; the directory is then fsynced. A file split over
//! several segments is assembled in `.ferry-part-<id>` beside its destination; which pieces are
//! durable is recorded in a sidecar in the agent's state directory (never in the target tree),
//! marked complete before the part is renamed into place. A piece that arrives again after that
//! (a resend whose first report was lost) is compared with the finished file, never written
//! into it: the file is visible, and only bytes that verified may be there.
//!
//! Sparse pieces carry only their data runs: a whole file is written run by run into its fresh
//! temporary and sized, so the holes stay holes; a piece written into a part punches its holes.
//! A hardlink entry links to the file carried under its first name, once that file is in place
//! (or staged by the same segment); until then the segment is refused, to be sent again.
//! Ownership (numeric uid and gid) is applied when the agent runs as root; otherwise files keep
//! the agent's owner, and set-id bits are dropped.
//!
//! A delta of a split file (a sync round's changed blocks) is not assembled in a part: its pieces
//! are journalled and applied to the file in place once all are durable (`redo`).
//!
//! `resolve` checks where a peer's path lands, `writer` stages, checks and publishes one
//! segment's entries, `part` is the protocol for files split over segments, `redo` patches them
//! in place, `dirmeta` restores
//! directories' metadata; this file holds `FsSink` and its errors.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use crate::segment::{Entry, EntryKind};
use ferry_common::hash::hex;
use ferry_common::path::{bytes, display, validate_relative, validate_subdir, PathError};
use filetime::FileTime;
use serde::{Deserialize, Serialize};

mod beneath;
mod dirmeta;
#[cfg(test)]
pub mod mem;
pub mod object;
mod part;
mod redo;
mod resolve;
mod writer;

use dirmeta::*;
use part::*;
use resolve::*;
pub use writer::SegmentWriter;

/// Prefix of every name ferry creates in a target tree; peers may not use it.
pub const RESERVED_PREFIX: &str = ".ferry-";
/// How the temporaries of whole files, symlinks and hardlinks end.
const TMP_SUFFIX: &str = ".tmp";

/// A random token naming this process's temporaries (`.ferry-s<segment>-e<epoch>-<token>.…`):
/// temporaries with any other token were left by a process that died, and are swept at start.
/// Not the pid, which a later process may have again.
pub fn process_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| ferry_common::hash::hex(&ferry_common::ids::random_bytes::<8>()))
}

/// Whether `name` is a temporary of a segment transfer made by another process than the one
/// whose temporaries contain `ours` (`-<its token>.`).
fn stale_temporary(name: &[u8], ours: &[u8]) -> bool {
    let Some(rest) = name.strip_prefix(RESERVED_PREFIX.as_bytes()) else {
        return false;
    };
    rest.starts_with(b"s")
        && rest.ends_with(TMP_SUFFIX.as_bytes())
        && !rest.windows(ours.len()).any(|w| w == ours)
}

/// Mode bits applied when ownership is not: setuid and setgid are dropped, because a set-id file
/// must not end up owned by whoever runs the agent.
const MODE_MASK_UNOWNED: u32 = 0o1777;
/// Transfers started by this process, so that every transfer's temporaries have their own names.
static TRANSFERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A write could not be done.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The peer named a path that is not allowed.
    #[error(transparent)]
    Path(#[from] PathError),
    /// The peer named a path in ferry's own namespace.
    #[error("path \"{0}\" refused: names starting with '.ferry-' are reserved for ferry's temporary files")]
    Reserved(String),
    /// A component of the destination is a symlink (or not a directory).
    #[error("refusing {path}: component {component} is a symlink or not a directory")]
    Escape {
        /// The requested path.
        path: String,
        /// The offending component.
        component: PathBuf,
    },
    /// The target root is unusable.
    #[error("target root {root} is not usable: {reason}")]
    Root {
        /// The root.
        root: PathBuf,
        /// Why.
        reason: String,
    },
    /// A file system call failed (full disk, permissions, ...).
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The segment's description is inconsistent.
    #[error("bad entry {path}: {reason}")]
    BadEntry {
        /// The entry's path.
        path: String,
        /// Why.
        reason: String,
    },
    /// A delta is against a version of the file the target no longer holds (changed or removed
    /// at the target): it can never be applied; the next round sends the file whole.
    #[error("{path}: {reason}")]
    BaseGone {
        /// The file.
        path: String,
        /// What the target holds instead.
        reason: String,
    },
    /// A hardlink's first name has not arrived yet (or is not the expected file).
    #[error("hardlink \"{path}\" waits for \"{first}\": {reason}; the segment will be sent again")]
    LinkPending {
        /// The link's path.
        path: String,
        /// The name the file travels under.
        first: String,
        /// What is missing.
        reason: String,
    },
    /// A piece resent after its file was finished differs from the finished file.
    #[error("resent piece of finished file {path} differs from it at byte {offset}; the file is left as it was")]
    ResentDiffers {
        /// The file.
        path: String,
        /// First differing byte.
        offset: u64,
    },
    /// The object store refused or failed a call (after its own retries).
    #[error(
        "object store: {op} {key}: {source} (the call was retried for the target's \
             retry_timeout_secs; ferry retries the segment with backoff up to the migration's \
             max attempts: check the store's endpoint, bucket and credentials)"
    )]
    Store {
        /// What was being done.
        op: &'static str,
        /// On which key.
        key: String,
        /// The store's error.
        source: object_store::Error,
    },
    /// The multipart upload that verified pieces of a split file live in is gone from the store
    /// (aborted by a lifecycle rule or by hand).
    #[error("the multipart upload of {path} ({upload}) is gone from the store; pieces already verified are lost — start a new migration")]
    UploadLost {
        /// The file.
        path: String,
        /// The upload's id.
        upload: String,
    },
    /// A partial copy that verified pieces live in was removed or replaced behind ferry's back.
    #[error("the partial copy of {path} ({part}) was removed or replaced; pieces already verified are lost — start a new migration")]
    PartLost {
        /// The file.
        path: String,
        /// The part file.
        part: PathBuf,
    },
}

pub(super) fn io_at<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> SinkError + 'a {
    move |source| SinkError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Tests: see [`FsSink::after_check`].
#[cfg(test)]
type CheckHook = Box<dyn Fn(&Path) + Send>;

/// Writes segments below one root directory.
pub struct FsSink {
    root: PathBuf,
    /// Sidecars of split files: `<state_dir>/parts/m<migration>/<hash of path>.json`.
    parts_dir: PathBuf,
    /// One lock per split file, so that pieces landing at once update its sidecar in turn.
    /// Entries are never removed: there is one per large file, and removing one while another
    /// thread holds it would hand out a second lock for the same file.
    part_locks: Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>,
    /// One gate per part file (its destination and inode): transfers writing pieces into it
    /// hold it shared for each write; completing the file holds it exclusively and closes it,
    /// so a transfer still streaming a piece (a resend's first try) never writes into the
    /// finished file. Never removed, like `part_locks`.
    part_gates: Mutex<HashMap<(PathBuf, u64), PartGate>>,
    /// Source mtimes of directories received so far. Adding anything to a directory changes its
    /// mtime, so every commit that touches a known directory sets it back. Kept in memory and in
    /// `<state_dir>/dir-mtimes.jsonl` (fsynced before the segment is reported).
    dir_times: Mutex<DirTimes>,
    /// Whether owners are applied (the agent runs as root).
    apply_owner: bool,
    /// Durability calls made for files.
    pub(super) syncs: SyncCounts,
    /// Tests: stop a version patched in place right after it is marked complete, before its
    /// journals are applied (where a crash leaves it).
    #[cfg(test)]
    pub(super) stop_before_patching: std::sync::atomic::AtomicBool,
    /// Tests: called with a path's parent directory once it has been checked, before it is
    /// used (where a racing process would swap a directory for a symlink).
    #[cfg(test)]
    pub(super) after_check: Mutex<Option<CheckHook>>,
}

/// How many durability calls a sink made for file data (not counting directories).
#[derive(Debug, Default)]
pub struct SyncCounts {
    /// `fsync`/`fdatasync` of one file (a lone whole file, a piece of a split file).
    pub file_syncs: AtomicU64,
    /// `syncfs` of a file system (the barrier of a segment of several whole files).
    pub fs_syncs: AtomicU64,
}

impl SyncCounts {
    fn add(&self, c: &AtomicU64) {
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl FsSink {
    /// Opens `root` (created if missing) and checks that files can be created in it. Sidecars of
    /// split files live under `state_dir`.
    pub fn new(root: &Path, state_dir: &Path) -> Result<Self, SinkError> {
        let err = |reason: String| SinkError::Root {
            root: root.to_path_buf(),
            reason,
        };
        fs::create_dir_all(root).map_err(|e| err(format!("cannot create it: {e}")))?;
        let root = fs::canonicalize(root).map_err(|e| err(e.to_string()))?;
        if !root.is_dir() {
            return Err(err("not a directory".into()));
        }
        // Created with O_EXCL|O_NOFOLLOW: a symlink planted under the probe's name is removed,
        // never followed (File::create would truncate whatever it points to).
        let probe = root.join(format!("{RESERVED_PREFIX}probe-{}", std::process::id()));
        create_private(&probe).map_err(|e| err(format!("not writable: {e}")))?;
        let _ = fs::remove_file(&probe);
        let parts_dir = state_dir.join("parts");
        fs::create_dir_all(&parts_dir).map_err(io_at("cannot create", &parts_dir))?;
        let log_path = state_dir.join("dir-mtimes.jsonl");
        let mut known = HashMap::new();
        match fs::read(&log_path) {
            Ok(bytes) => {
                // A torn last line (crash while appending) is ignored: that segment was not
                // reported, so its directories arrive again.
                for line in bytes.split(|&b| b == b'\n') {
                    // (migration key, path as bytes — names need not be UTF-8, mtime).
                    if let Ok((m, p, t)) =
                        serde_json::from_slice::<(String, Vec<u8>, (i64, u32))>(line)
                    {
                        known.insert((m, PathBuf::from(OsStr::from_bytes(&p))), t);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at("cannot read", &log_path)(e)),
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_at("cannot open", &log_path))?;
        Ok(FsSink {
            root,
            parts_dir,
            part_locks: Mutex::new(HashMap::new()),
            part_gates: Mutex::new(HashMap::new()),
            dir_times: Mutex::new(DirTimes {
                known,
                log,
                log_path,
            }),
            apply_owner: crate::holes::running_as_root(),
            syncs: SyncCounts::default(),
            #[cfg(test)]
            stop_before_patching: Default::default(),
            #[cfg(test)]
            after_check: Mutex::new(None),
        })
    }

    /// Removes the temporaries that transfers of earlier processes left below the root (a
    /// target killed mid-segment leaves its staged files unpublished; their segment is sent
    /// again). Never follows symlinks; part files of split files (durable state) are kept.
    /// Walks the whole root: run it in the background. Returns how many it removed.
    pub fn sweep_stale_temporaries(&self) -> u64 {
        let ours = format!("-{}.", process_token());
        let mut removed = 0;
        let mut dirs = vec![self.root.clone()];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let Ok(t) = e.file_type() else { continue };
                if t.is_dir() {
                    dirs.push(e.path());
                } else if stale_temporary(e.file_name().as_bytes(), ours.as_bytes()) {
                    match fs::remove_file(e.path()) {
                        Ok(()) => removed += 1,
                        Err(err) => {
                            tracing::warn!(message = "Cannot remove a stale temporary.", path = %e.path().display(), error = %err)
                        }
                    }
                }
            }
        }
        removed
    }

    /// Whether this sink applies owners (uid and gid) to what it writes.
    pub fn applies_owner(&self) -> bool {
        self.apply_owner
    }

    /// The owner to apply to an entry, if owners are applied.
    pub(super) fn owner(&self, e: &Entry) -> Option<(u32, u32)> {
        self.apply_owner.then_some((e.uid, e.gid))
    }

    /// The mode bits to apply to an entry.
    pub(super) fn mode(&self, e: &Entry) -> u32 {
        if self.apply_owner {
            e.mode & 0o7777
        } else {
            e.mode & MODE_MASK_UNOWNED
        }
    }
}

pub(super) fn mtime_of(e: &Entry) -> FileTime {
    FileTime::from_unix_time(e.mtime_sec, e.mtime_nsec)
}

/// What a JSON sidecar at `path` holds, or `None` when there is none.
pub(super) fn load_json<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, SinkError> {
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| SinkError::Io {
                op: "corrupt sidecar",
                path: path.to_path_buf(),
                source: io::Error::other(e),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_at("cannot read", path)(e)),
    }
}

/// Writes `value` as JSON to `path` durably: a temporary beside it, fsynced, renamed over it,
/// the directory fsynced (created if missing).
pub(super) fn save_json<T: Serialize>(path: &Path, value: &T) -> Result<(), SinkError> {
    let dir = path.parent().expect("sidecars live in a directory");
    fs::create_dir_all(dir).map_err(io_at("cannot create", dir))?;
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec(value).expect("plain struct serialises");
    let f = File::create(&tmp).map_err(io_at("cannot create", &tmp))?;
    f.write_all_at(&bytes, 0)
        .map_err(io_at("cannot write", &tmp))?;
    f.sync_all().map_err(io_at("cannot fsync", &tmp))?;
    fs::rename(&tmp, path).map_err(io_at("cannot rename", path))?;
    // The state directory is the operator's: it may be reached through a symlink.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at("cannot fsync directory", dir))
}

/// Makes the entries of a directory below the root durable (no symlink followed on the way).
pub(super) fn fsync_dir(dir: &Path) -> Result<(), SinkError> {
    beneath::open_dir(dir)
        .and_then(|d| File::from(d).sync_all())
        .map_err(io_at("cannot fsync directory", dir))
}

/// Removes whatever non-directory sits at `path` (never following a symlink).
pub(super) fn clear(path: &Path) -> Result<(), SinkError> {
    match beneath::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(SinkError::Escape {
            path: path.display().to_string(),
            component: path.to_path_buf(),
        }),
        Ok(_) => beneath::remove_file(path).map_err(io_at("cannot remove", path)),
        Err(_) => Ok(()),
    }
}

/// Creates a new private file, refusing to follow or reuse anything already there.
pub(super) fn create_private(path: &Path) -> Result<File, SinkError> {
    use rustix::fs::OFlags;
    clear(path)?;
    beneath::open(path, OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL, 0o600)
        .map_err(io_at("cannot create", path))
}

pub(super) fn inode(path: &Path) -> Option<u64> {
    beneath::symlink_metadata(path)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.ino())
}

/// Checks a migration's key, `<cluster id>/<uuid>` (what a target keeps of a migration is
/// kept under it).
pub(super) fn check_migration_key(migration: &str) -> Result<(), SinkError> {
    let key_ok =
        migration.split('/').count() == 2 && migration.split('/').all(ferry_common::ids::is_id);
    if key_ok {
        Ok(())
    } else {
        Err(SinkError::BadEntry {
            path: String::new(),
            reason: format!("migration key {migration:?} is not <cluster id>/<uuid>"),
        })
    }
}

/// Where a target writes what it receives. A trait so that the target's logic (lease checks,
/// hashes, refusals, reports) is tested without a disk: [`mem::MemSink`] is the in-memory
/// fake, [`FsSink`] the real sink, and both pass the same contract tests (`contract`).
pub trait Sink: Send + Sync + 'static {
    /// One segment being written.
    type Writer<'a>: SegmentWrite + Send
    where
        Self: 'a;

    /// Starts segment `segment_id` of the migration keyed `migration` (`<cluster>/<uuid>`)
    /// under lease `epoch`, into `target_path` below the root.
    fn begin(
        &self,
        target_path: &str,
        migration: &str,
        segment_id: u64,
        epoch: u64,
    ) -> Result<Self::Writer<'_>, SinkError>;
}

/// One segment being written: its entries in order, each followed by its bytes; then
/// [`SegmentWrite::finish`] (the bytes durable, their BLAKE3 returned) and, once the hashes
/// agree and the lease still holds, [`SegmentWrite::commit`] (the files visible). A writer
/// dropped before its commit publishes nothing.
pub trait SegmentWrite {
    /// Starts the next entry.
    fn start_entry(&mut self, entry: &Entry) -> Result<(), SinkError>;
    /// The next bytes of the current entry.
    fn write(&mut self, data: &[u8]) -> Result<(), SinkError>;
    /// Ends the byte stream; the BLAKE3 of every byte written.
    fn finish(&mut self) -> Result<[u8; 32], SinkError>;
    /// Makes the segment visible and durable.
    fn commit(self) -> Result<(), SinkError>;
}

impl Sink for FsSink {
    type Writer<'a> = SegmentWriter<'a>;

    /// Starts receiving segment `segment_id` of the migration keyed `migration` (its cluster id
    /// and uuid, `<cluster>/<uuid>`: what the target remembers of a migration is kept under
    /// that key, never under an id a new cluster could reuse), under lease `epoch`, into
    /// `target_path` (relative to the root).
    fn begin(
        &self,
        target_path: &str,
        migration: &str,
        segment_id: u64,
        epoch: u64,
    ) -> Result<SegmentWriter<'_>, SinkError> {
        let base = validate_subdir(target_path)?;
        check_migration_key(migration)?;
        Ok(SegmentWriter {
            sink: self,
            base,
            migration: migration.to_string(),
            segment_id,
            epoch,
            transfer: TRANSFERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            next: 0,
            hasher: blake3::Hasher::new(),
            current: None,
            staged: Vec::new(),
            created: Vec::new(),
            touched: Vec::new(),
            before: HashMap::new(),
            dirs: Vec::new(),
            pending: Default::default(),
        })
    }
}

impl SegmentWrite for SegmentWriter<'_> {
    fn start_entry(&mut self, entry: &Entry) -> Result<(), SinkError> {
        SegmentWriter::start_entry(self, entry)
    }
    fn write(&mut self, data: &[u8]) -> Result<(), SinkError> {
        SegmentWriter::write(self, data)
    }
    fn finish(&mut self) -> Result<[u8; 32], SinkError> {
        SegmentWriter::finish(self)
    }
    fn commit(self) -> Result<(), SinkError> {
        SegmentWriter::commit(self)
    }
}

#[cfg(test)]
mod contract;
#[cfg(test)]
mod tests;
