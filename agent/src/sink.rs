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

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::segment::{Entry, EntryKind};
use ferry_common::hash::hex;
use ferry_common::path::{bytes, display, validate_relative, validate_subdir, PathError};
use filetime::FileTime;
use serde::{Deserialize, Serialize};

/// Prefix of every name ferry creates in a target tree; peers may not use it.
pub const RESERVED_PREFIX: &str = ".ferry-";

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
    /// A partial copy that verified pieces live in was removed or replaced behind ferry's back.
    #[error("the partial copy of {path} ({part}) was removed or replaced; pieces already verified are lost — start a new migration")]
    PartLost {
        /// The file.
        path: String,
        /// The part file.
        part: PathBuf,
    },
}

fn io_at<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SinkError + 'a {
    move |source| SinkError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes segments below one root directory.
pub struct FsSink {
    root: PathBuf,
    /// Sidecars of split files: `<state_dir>/parts/m<migration>/<hash of path>.json`.
    parts_dir: PathBuf,
    /// One lock per split file, so that pieces landing at once update its sidecar in turn.
    /// Entries are never removed: there is one per large file, and removing one while another
    /// thread holds it would hand out a second lock for the same file.
    part_locks: Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>,
    /// Source mtimes of directories received so far. Adding anything to a directory changes its
    /// mtime, so every commit that touches a known directory sets it back. Kept in memory and in
    /// `<state_dir>/dir-mtimes.jsonl` (fsynced before the segment is reported).
    dir_times: Mutex<DirTimes>,
    /// Whether owners are applied (the agent runs as root).
    apply_owner: bool,
}

struct DirTimes {
    /// Per (migration key, directory).
    known: HashMap<(String, PathBuf), (i64, u32)>,
    log: File,
    log_path: PathBuf,
}

/// What a sidecar records about a split file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
struct PartState {
    file_size: u64,
    chunk_count: u32,
    mtime: (i64, u32),
    /// Inode of the part file the pieces were written into.
    part_ino: u64,
    /// Pieces durable in the part file.
    done: Vec<u32>,
    /// The part was (or is being) renamed into place.
    complete: bool,
}

impl PartState {
    fn describes(&self, e: &Entry) -> bool {
        self.file_size == e.file_size
            && self.chunk_count == e.chunk_count
            && self.mtime == (e.mtime_sec, e.mtime_nsec)
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
            dir_times: Mutex::new(DirTimes {
                known,
                log,
                log_path,
            }),
            apply_owner: crate::holes::running_as_root(),
        })
    }

    /// Whether this sink applies owners (uid and gid) to what it writes.
    pub fn applies_owner(&self) -> bool {
        self.apply_owner
    }

    /// The owner to apply to an entry, if owners are applied.
    fn owner(&self, e: &Entry) -> Option<(u32, u32)> {
        self.apply_owner.then_some((e.uid, e.gid))
    }

    /// The mode bits to apply to an entry.
    fn mode(&self, e: &Entry) -> u32 {
        if self.apply_owner {
            e.mode & 0o7777
        } else {
            e.mode & MODE_MASK_UNOWNED
        }
    }

    /// Resolves `base/rel` below the root, creating missing directories (recorded in `created`),
    /// refusing symlinks. Returns the parent directory and the final path.
    fn resolve(
        &self,
        base: &Path,
        rel: &Path,
        created: &mut Vec<PathBuf>,
    ) -> Result<(PathBuf, PathBuf), SinkError> {
        let rel_path = validate_relative(bytes(rel))?;
        let full_rel = base.join(&rel_path);
        let comps: Vec<_> = full_rel.components().collect();
        let (last, parents) = comps.split_last().ok_or(PathError::Empty)?;
        if last
            .as_os_str()
            .as_encoded_bytes()
            .starts_with(RESERVED_PREFIX.as_bytes())
        {
            return Err(SinkError::Reserved(display(rel)));
        }
        let mut dir = self.root.clone();
        for c in parents {
            dir.push(c);
            match fs::symlink_metadata(&dir) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(_) => {
                    return Err(SinkError::Escape {
                        path: display(rel),
                        component: dir,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    match fs::DirBuilder::new().mode(0o755).create(&dir) {
                        Ok(()) => created.push(dir.clone()),
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                            // Created concurrently by another segment; re-check what it is.
                            if !fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_dir()) {
                                return Err(SinkError::Escape {
                                    path: display(rel),
                                    component: dir,
                                });
                            }
                        }
                        Err(e) => return Err(io_at("cannot create directory", &dir)(e)),
                    }
                }
                Err(e) => return Err(io_at("cannot inspect", &dir)(e)),
            }
        }
        let path = dir.join(last);
        Ok((dir, path))
    }

    /// Starts receiving segment `segment_id` of the migration keyed `migration` (its cluster id
    /// and uuid, `<cluster>/<uuid>`: what the target remembers of a migration is kept under
    /// that key, never under an id a new cluster could reuse), under lease `epoch`, into
    /// `target_path` (relative to the root).
    pub fn begin(
        &self,
        target_path: &str,
        migration: &str,
        segment_id: u64,
        epoch: u64,
    ) -> Result<SegmentWriter<'_>, SinkError> {
        let base = validate_subdir(target_path)?;
        let key_ok = migration.split('/').count() == 2
            && migration.split('/').all(|c| {
                !c.is_empty() && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !key_ok {
            return Err(SinkError::BadEntry {
                path: String::new(),
                reason: format!("migration key {migration:?} is not <cluster id>/<uuid>"),
            });
        }
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
            dirs: Vec::new(),
        })
    }

    fn part_lock(&self, dest: &Path) -> Arc<Mutex<()>> {
        self.part_locks
            .lock()
            .expect("not poisoned")
            .entry(dest.to_path_buf())
            .or_default()
            .clone()
    }

    fn sidecar_path(&self, migration: &str, dest: &Path) -> PathBuf {
        let key = hex(blake3::hash(dest.as_os_str().as_encoded_bytes()).as_bytes());
        self.parts_dir.join(migration).join(format!("{key}.json"))
    }

    fn load_sidecar(&self, path: &Path) -> Result<Option<PartState>, SinkError> {
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

    fn save_sidecar(&self, path: &Path, st: &PartState) -> Result<(), SinkError> {
        let dir = path.parent().expect("sidecars live in a directory");
        fs::create_dir_all(dir).map_err(io_at("cannot create", dir))?;
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(st).expect("plain struct serialises");
        let f = File::create(&tmp).map_err(io_at("cannot create", &tmp))?;
        f.write_all_at(&bytes, 0)
            .map_err(io_at("cannot write", &tmp))?;
        f.sync_all().map_err(io_at("cannot fsync", &tmp))?;
        fs::rename(&tmp, path).map_err(io_at("cannot rename", path))?;
        fsync_dir(dir)
    }
}

/// How the current file entry is being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A whole file into its own temporary.
    Temp,
    /// A piece into the shared part file.
    Part,
    /// A piece of an already finished file (a resend after completion): compared with the file,
    /// never written into it.
    Compare,
}

/// What a segment has written but not yet made visible.
enum Staged {
    /// A whole file or symlink written to `tmp`, to be renamed to `dest`.
    Rename {
        tmp: PathBuf,
        dest: PathBuf,
        dir: PathBuf,
    },
    /// A piece of a split file, to be recorded in its sidecar (unless it was compared with the
    /// finished file).
    Piece {
        entry: Entry,
        dest: PathBuf,
        dir: PathBuf,
        compared: bool,
    },
}

struct Open {
    file: File,
    path: PathBuf,
    dest: PathBuf,
    dir: PathBuf,
    entry: Entry,
    /// Where the entry's bytes go: its data runs, or the whole piece.
    runs: Vec<(u64, u64)>,
    /// Run being filled, and bytes of it done.
    run: usize,
    run_done: u64,
    /// Bytes received for this entry.
    written: u64,
    mode: Mode,
}

/// Receives one segment's entries and bytes.
pub struct SegmentWriter<'a> {
    sink: &'a FsSink,
    base: PathBuf,
    /// `<cluster id>/<migration uuid>`.
    migration: String,
    segment_id: u64,
    epoch: u64,
    /// This transfer's number in this process: part of its temporaries' names.
    transfer: u64,
    next: usize,
    hasher: blake3::Hasher,
    current: Option<Open>,
    staged: Vec<Staged>,
    /// Directories this segment created; their parents are fsynced at commit.
    created: Vec<PathBuf>,
    /// Directory entries this segment carries, with their source mtimes.
    dirs: Vec<(PathBuf, (i64, u32))>,
}

fn mtime_of(e: &Entry) -> FileTime {
    FileTime::from_unix_time(e.mtime_sec, e.mtime_nsec)
}

fn fsync_dir(dir: &Path) -> Result<(), SinkError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at("cannot fsync directory", dir))
}

/// Removes whatever non-directory sits at `path` (never following a symlink).
fn clear(path: &Path) -> Result<(), SinkError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(SinkError::Escape {
            path: path.display().to_string(),
            component: path.to_path_buf(),
        }),
        Ok(_) => fs::remove_file(path).map_err(io_at("cannot remove", path)),
        Err(_) => Ok(()),
    }
}

/// Creates a new private file, refusing to follow or reuse anything already there.
fn create_private(path: &Path) -> Result<File, SinkError> {
    clear(path)?;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_at("cannot create", path))
}

/// Sets a directory's owner (if given) and mode through a handle opened with
/// `O_NOFOLLOW|O_DIRECTORY`: if something swapped the directory for a symlink after it was
/// checked, the open fails instead of changing whatever the link points to.
fn set_dir_meta(
    path: &Path,
    mode: u32,
    owner: Option<(u32, u32)>,
    xattrs: &crate::xattr::Xattrs,
) -> Result<(), SinkError> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(path)
        .map_err(io_at("cannot open directory (is it a symlink?)", path))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&dir, Some(uid), Some(gid))
            .map_err(io_at("cannot set owner of", path))?;
    }
    crate::xattr::apply_to(&dir, xattrs).map_err(io_at("cannot set attributes of", path))?;
    dir.set_permissions(Permissions::from_mode(mode))
        .map_err(io_at("cannot set mode of", path))
}

fn open_read_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

fn part_name(dest: &Path) -> PathBuf {
    let name = dest.file_name().unwrap_or_default();
    let id = hex(&blake3::hash(name.as_encoded_bytes()).as_bytes()[..16]);
    dest.with_file_name(format!("{RESERVED_PREFIX}part-{id}"))
}

/// Puts a staged temporary in place of `dest`, which it replaces atomically (rename), except
/// where that would split a hardlink group:
/// - `dest` is already the same file (a resent hardlink entry): rename(2) would do nothing and
///   leave the temporary behind, so the temporary is removed;
/// - `dest` is a regular file with several names holding the same bytes (a resent first name of
///   a group linked meanwhile): it is kept, with the temporary's mode, owner and mtime, so its
///   other names still name the same file.
fn publish(tmp: &Path, dest: &Path) -> Result<(), SinkError> {
    // Both cases need a destination with several names; the usual one (nothing there yet, or a
    // file with one name) costs one lstat.
    let linked = fs::symlink_metadata(dest)
        .ok()
        .filter(|d| d.is_file() && d.nlink() > 1);
    if let (Some(d), Ok(t)) = (linked, fs::symlink_metadata(tmp)) {
        if (t.dev(), t.ino()) == (d.dev(), d.ino()) {
            return fs::remove_file(tmp).map_err(io_at("cannot remove", tmp));
        }
        if t.is_file() && t.len() == d.len() && same_bytes(tmp, dest)? {
            let f = open_nofollow(dest).map_err(io_at("cannot open", dest))?;
            if (t.uid(), t.gid()) != (d.uid(), d.gid()) {
                std::os::unix::fs::fchown(&f, Some(t.uid()), Some(t.gid()))
                    .map_err(io_at("cannot set owner of", dest))?;
            }
            f.set_permissions(t.permissions())
                .map_err(io_at("cannot set mode of", dest))?;
            let mtime = FileTime::from_last_modification_time(&t);
            filetime::set_file_handle_times(&f, Some(mtime), Some(mtime))
                .map_err(io_at("cannot set mtime of", dest))?;
            f.sync_all().map_err(io_at("cannot fsync", dest))?;
            return fs::remove_file(tmp).map_err(io_at("cannot remove", tmp));
        }
    }
    fs::rename(tmp, dest).map_err(io_at("cannot rename into place", dest))
}

/// Whether two files hold the same bytes.
fn same_bytes(a: &Path, b: &Path) -> Result<bool, SinkError> {
    let fa = open_read_nofollow(a).map_err(io_at("cannot open", a))?;
    let fb = open_read_nofollow(b).map_err(io_at("cannot open", b))?;
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut at = 0u64;
    loop {
        let na = read_up_to(&fa, &mut ba, at).map_err(io_at("cannot read", a))?;
        let nb = read_up_to(&fb, &mut bb, at).map_err(io_at("cannot read", b))?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
        at += na as u64;
    }
}

/// The parts of a piece that none of its runs cover: its holes.
fn gaps(e: &Entry, runs: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = e.offset;
    for &(start, len) in runs {
        if start > at {
            out.push((at, start - at));
        }
        at = start + len;
    }
    if e.offset + e.len > at {
        out.push((at, e.offset + e.len - at));
    }
    out
}

/// Checks that `file` holds `data` at `at` (a resent piece against its finished file).
fn compare_at(file: &File, data: &[u8], at: u64, e: &Entry) -> Result<(), SinkError> {
    let mut have = vec![0u8; data.len()];
    let n = read_up_to(file, &mut have, at).map_err(|source| SinkError::Io {
        op: "cannot read finished file",
        path: e.path.clone(),
        source,
    })?;
    match have[..n].iter().zip(data).position(|(a, b)| a != b) {
        None if n == data.len() => Ok(()),
        None => Err(SinkError::ResentDiffers {
            path: display(&e.path),
            offset: at + n as u64,
        }),
        Some(i) => Err(SinkError::ResentDiffers {
            path: display(&e.path),
            offset: at + i as u64,
        }),
    }
}

fn read_up_to(file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], at + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn inode(path: &Path) -> Option<u64> {
    fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.ino())
}

impl SegmentWriter<'_> {
    fn tmp_name(&mut self, dir: &Path) -> PathBuf {
        self.next += 1;
        dir.join(format!(
            "{RESERVED_PREFIX}s{}-e{}-{}.{}.{}.tmp",
            self.segment_id,
            self.epoch,
            std::process::id(),
            self.transfer,
            self.next
        ))
    }

    /// Prepares for `entry`'s bytes (`entry.wire_len()` of them follow through [`Self::write`]).
    pub fn start_entry(&mut self, entry: &Entry) -> Result<(), SinkError> {
        self.finish_entry()?;
        let (dir, dest) = self
            .sink
            .resolve(&self.base, &entry.path, &mut self.created)?;
        let bad = |reason: &str| SinkError::BadEntry {
            path: display(&entry.path),
            reason: reason.to_string(),
        };
        if entry.kind != EntryKind::File && (entry.len != 0 || entry.data_runs.is_some()) {
            return Err(bad("only files carry bytes"));
        }
        match entry.kind {
            EntryKind::Dir => {
                match fs::symlink_metadata(&dest) {
                    Ok(m) if m.file_type().is_dir() => {}
                    Ok(_) => {
                        return Err(SinkError::Escape {
                            path: display(&entry.path),
                            component: dest,
                        })
                    }
                    Err(_) => match fs::DirBuilder::new().mode(0o700).create(&dest) {
                        Ok(()) => self.created.push(dest.clone()),
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(io_at("cannot create directory", &dest)(e)),
                    },
                }
                set_dir_meta(
                    &dest,
                    self.sink.mode(entry),
                    self.sink.owner(entry),
                    &entry.xattrs,
                )?;
                self.dirs.push((dest, (entry.mtime_sec, entry.mtime_nsec)));
            }
            EntryKind::Symlink => {
                if entry.link_target.as_os_str().is_empty() {
                    return Err(bad("a symlink needs a target"));
                }
                let tmp = self.tmp_name(&dir);
                clear(&tmp)?;
                std::os::unix::fs::symlink(&entry.link_target, &tmp)
                    .map_err(io_at("cannot create symlink", &tmp))?;
                if let Some((uid, gid)) = self.sink.owner(entry) {
                    std::os::unix::fs::lchown(&tmp, Some(uid), Some(gid))
                        .map_err(io_at("cannot set owner of", &tmp))?;
                }
                crate::xattr::apply_nofollow(&tmp, &entry.xattrs)
                    .map_err(io_at("cannot set attributes of", &tmp))?;
                let t = mtime_of(entry);
                filetime::set_symlink_file_times(&tmp, t, t)
                    .map_err(io_at("cannot set mtime of", &tmp))?;
                self.staged.push(Staged::Rename { tmp, dest, dir });
            }
            EntryKind::Hardlink => {
                let tmp = self.link(entry, &dir)?;
                self.staged.push(Staged::Rename { tmp, dest, dir });
            }
            EntryKind::File => {
                let whole = entry.chunk_count <= 1;
                if whole && (entry.offset != 0 || entry.len != entry.file_size) {
                    return Err(bad("a whole file must start at 0 and carry all its bytes"));
                }
                let Some(end) = entry.offset.checked_add(entry.len) else {
                    return Err(bad("piece lies outside the file"));
                };
                if !whole && (entry.chunk_index >= entry.chunk_count || end > entry.file_size) {
                    return Err(bad("piece lies outside the file"));
                }
                let runs = match &entry.data_runs {
                    None => vec![(entry.offset, entry.len)],
                    Some(runs) => {
                        let mut at = entry.offset;
                        for &(o, l) in runs {
                            if o < at || l == 0 || o.checked_add(l).is_none_or(|e| e > end) {
                                return Err(bad(
                                    "data runs must be non-empty, in order, inside the piece",
                                ));
                            }
                            at = o + l;
                        }
                        runs.clone()
                    }
                };
                let (mode, path, file) = if whole {
                    let tmp = self.tmp_name(&dir);
                    let f = create_private(&tmp)?;
                    (Mode::Temp, tmp, f)
                } else {
                    self.open_piece(entry, &dest)?
                };
                self.current = Some(Open {
                    file,
                    path,
                    dest,
                    dir,
                    entry: entry.clone(),
                    runs,
                    run: 0,
                    run_done: 0,
                    written: 0,
                    mode,
                });
            }
        }
        Ok(())
    }

    /// Links a new temporary in `dir` to the file a hardlink entry names as its first name: the
    /// temporary a whole file of this same segment is staged in, or the file in place. Checks
    /// that it is the file the source linked (a regular file of the entry's size and mtime).
    fn link(&mut self, entry: &Entry, dir: &Path) -> Result<PathBuf, SinkError> {
        let (_, first) = self
            .sink
            .resolve(&self.base, &entry.link_target, &mut self.created)?;
        let pending = |reason: &str| SinkError::LinkPending {
            path: display(&entry.path),
            first: display(&entry.link_target),
            reason: reason.to_string(),
        };
        // Staged by this segment (bundles keep scan order, so the first name comes first)?
        let staged = self.staged.iter().find_map(|s| match s {
            Staged::Rename { tmp, dest, .. } if *dest == first => Some(tmp.clone()),
            _ => None,
        });
        let source = staged.unwrap_or(first);
        let m = fs::symlink_metadata(&source).map_err(|_| pending("it has not arrived yet"))?;
        if !m.is_file() {
            return Err(pending("it is not a regular file"));
        }
        if m.len() != entry.file_size
            || (m.mtime(), m.mtime_nsec() as u32) != (entry.mtime_sec, entry.mtime_nsec)
        {
            return Err(pending(
                "it is not yet the linked file (size or mtime differ)",
            ));
        }
        let tmp = self.tmp_name(dir);
        clear(&tmp)?;
        // link(2) never follows a symlink at `source`, and `source` was checked to be a file.
        fs::hard_link(&source, &tmp).map_err(io_at("cannot create hardlink", &tmp))?;
        if inode(&tmp) != Some(m.ino()) {
            let _ = fs::remove_file(&tmp);
            return Err(pending("it was replaced while being linked"));
        }
        Ok(tmp)
    }

    /// Opens the file a piece of a split file goes into, after consulting its sidecar.
    fn open_piece(&self, e: &Entry, dest: &Path) -> Result<(Mode, PathBuf, File), SinkError> {
        let lock = self.sink.part_lock(dest);
        let _guard = lock.lock().expect("not poisoned");
        let sidecar = self.sink.sidecar_path(&self.migration, dest);
        let part = part_name(dest);
        match self.sink.load_sidecar(&sidecar)? {
            Some(st) if st.complete && st.describes(e) => {
                if inode(dest).is_none() && inode(&part) == Some(st.part_ino) {
                    // We stopped between marking it complete and renaming it: finish that.
                    fs::rename(&part, dest).map_err(io_at("cannot rename into place", dest))?;
                    fsync_dir(dest.parent().expect("has a parent"))?;
                }
                let f =
                    open_read_nofollow(dest).map_err(io_at("cannot open finished file", dest))?;
                Ok((Mode::Compare, dest.to_path_buf(), f))
            }
            Some(mut st) if st.describes(e) && inode(&part) == Some(st.part_ino) => {
                if let Some(i) = st.done.iter().position(|&d| d == e.chunk_index) {
                    // Rewriting a recorded range: un-record it first, so that a failed rewrite
                    // can never leave a range marked durable that is not.
                    st.done.remove(i);
                    self.sink.save_sidecar(&sidecar, &st)?;
                }
                let f = open_nofollow(&part).map_err(io_at("cannot open", &part))?;
                Ok((Mode::Part, part, f))
            }
            Some(st) if st.describes(e) && !st.done.is_empty() => Err(SinkError::PartLost {
                path: display(&e.path),
                part,
            }),
            _ => {
                // First piece of this version of the file: start a fresh part.
                let f = create_private(&part)?;
                let ino = f.metadata().map_err(io_at("cannot stat", &part))?.ino();
                let st = PartState {
                    file_size: e.file_size,
                    chunk_count: e.chunk_count,
                    mtime: (e.mtime_sec, e.mtime_nsec),
                    part_ino: ino,
                    done: Vec::new(),
                    complete: false,
                };
                self.sink.save_sidecar(&sidecar, &st)?;
                fsync_dir(dest.parent().expect("has a parent"))?;
                Ok((Mode::Part, part, f))
            }
        }
    }

    /// Writes the next bytes of the current entry (the next bytes of its data runs) and hashes
    /// them. A resent piece of a finished file is compared with it instead.
    pub fn write(&mut self, data: &[u8]) -> Result<(), SinkError> {
        let Some(open) = self.current.as_mut() else {
            return Err(SinkError::BadEntry {
                path: String::new(),
                reason: "bytes arrived for no file".into(),
            });
        };
        if open.written + data.len() as u64 > open.entry.wire_len() {
            return Err(SinkError::BadEntry {
                path: display(&open.entry.path),
                reason: "more bytes than announced".into(),
            });
        }
        let mut rest = data;
        while !rest.is_empty() {
            let (start, len) = open.runs[open.run];
            let n = (len - open.run_done).min(rest.len() as u64) as usize;
            let at = start + open.run_done;
            match open.mode {
                Mode::Temp | Mode::Part => open
                    .file
                    .write_all_at(&rest[..n], at)
                    .map_err(io_at("cannot write", &open.path))?,
                Mode::Compare => compare_at(&open.file, &rest[..n], at, &open.entry)?,
            }
            open.run_done += n as u64;
            if open.run_done == len {
                open.run += 1;
                open.run_done = 0;
            }
            rest = &rest[n..];
        }
        open.written += data.len() as u64;
        self.hasher.update(data);
        Ok(())
    }

    /// Completes the current file entry: checks its length, fsyncs it, and stages it.
    fn finish_entry(&mut self) -> Result<(), SinkError> {
        let Some(open) = self.current.take() else {
            return Ok(());
        };
        let e = &open.entry;
        if open.written != e.wire_len() {
            if open.mode == Mode::Temp {
                let _ = fs::remove_file(&open.path);
            }
            return Err(SinkError::BadEntry {
                path: display(&e.path),
                reason: format!("{} of {} bytes arrived", open.written, e.wire_len()),
            });
        }
        let t = mtime_of(e);
        match open.mode {
            Mode::Temp => {
                let staged = Staged::Rename {
                    tmp: open.path.clone(),
                    dest: open.dest,
                    dir: open.dir,
                };
                // Staged first, so that Drop removes the temporary if the calls below fail.
                self.staged.push(staged);
                // A fresh file: what no run wrote stays a hole once the file is sized.
                if e.data_runs.is_some() {
                    open.file
                        .set_len(e.file_size)
                        .map_err(io_at("cannot size", &open.path))?;
                }
                if let Some((uid, gid)) = self.sink.owner(e) {
                    std::os::unix::fs::fchown(&open.file, Some(uid), Some(gid))
                        .map_err(io_at("cannot set owner of", &open.path))?;
                }
                crate::xattr::apply_to(&open.file, &e.xattrs)
                    .map_err(io_at("cannot set attributes of", &open.path))?;
                open.file
                    .set_permissions(Permissions::from_mode(self.sink.mode(e)))
                    .map_err(io_at("cannot set mode of", &open.path))?;
                filetime::set_file_handle_times(&open.file, Some(t), Some(t))
                    .map_err(io_at("cannot set mtime of", &open.path))?;
                open.file
                    .sync_all()
                    .map_err(io_at("cannot fsync", &open.path))?;
            }
            Mode::Part => {
                // The part may hold bytes of an earlier attempt where this piece has holes.
                for (start, len) in gaps(e, &open.runs) {
                    crate::holes::make_hole(&open.file, start, len)
                        .map_err(io_at("cannot punch a hole in", &open.path))?;
                }
                open.file
                    .sync_data()
                    .map_err(io_at("cannot fsync", &open.path))?;
                self.staged.push(Staged::Piece {
                    entry: open.entry,
                    dest: open.dest,
                    dir: open.dir,
                    compared: false,
                });
            }
            Mode::Compare => {
                // The finished file must read as zeros where the resent piece has holes.
                let zeros = vec![0u8; 1 << 16];
                for (start, len) in gaps(e, &open.runs) {
                    let mut at = start;
                    while at < start + len {
                        let n = (start + len - at).min(zeros.len() as u64) as usize;
                        compare_at(&open.file, &zeros[..n], at, e)?;
                        at += n as u64;
                    }
                }
                // Make sure what was compared is durable (an earlier run may have crashed
                // before its fsync reached the disk).
                open.file
                    .sync_all()
                    .map_err(io_at("cannot fsync", &open.path))?;
                self.staged.push(Staged::Piece {
                    entry: open.entry,
                    dest: open.dest,
                    dir: open.dir,
                    compared: true,
                });
            }
        }
        Ok(())
    }

    /// Ends the byte stream; returns the BLAKE3 of all bytes written.
    pub fn finish(&mut self) -> Result<[u8; 32], SinkError> {
        self.finish_entry()?;
        Ok(*self.hasher.finalize().as_bytes())
    }

    /// Makes the segment visible and durable: renames whole files into place, records pieces of
    /// split files (assembling a file when its last piece lands) and fsyncs every directory
    /// touched or created. Call only after [`Self::finish`] and the hash check.
    pub fn commit(mut self) -> Result<(), SinkError> {
        let mut dirs: Vec<PathBuf> = self
            .created
            .iter()
            .filter_map(|d| d.parent().map(Path::to_path_buf))
            .collect();
        let mut staged = std::mem::take(&mut self.staged).into_iter();
        while let Some(s) = staged.next() {
            let done = match &s {
                Staged::Rename { tmp, dest, dir } => publish(tmp, dest).map(|()| Some(dir.clone())),
                Staged::Piece {
                    entry,
                    dest,
                    dir,
                    compared,
                } => match *compared {
                    true => Ok(None),
                    false => self
                        .record_piece(entry, dest)
                        .map(|renamed| renamed.then(|| dir.clone())),
                },
            };
            match done {
                Ok(dir) => dirs.extend(dir),
                Err(e) => {
                    // Hand what is left back to Drop, which removes the temporaries.
                    self.staged = std::iter::once(s).chain(staged).collect();
                    return Err(e);
                }
            }
        }
        dirs.extend(self.dirs.iter().map(|(d, _)| d.clone()));
        dirs.sort();
        dirs.dedup();
        self.sink
            .restore_dir_times(&self.migration, &self.dirs, &dirs)?;
        for d in dirs {
            fsync_dir(&d)?;
        }
        Ok(())
    }

    /// Records a durable piece; when all pieces are there, finalises the file. Returns whether the
    /// file was renamed into place.
    fn record_piece(&self, e: &Entry, dest: &Path) -> Result<bool, SinkError> {
        let sink = self.sink;
        let lock = sink.part_lock(dest);
        let _guard = lock.lock().expect("not poisoned");
        let sidecar = sink.sidecar_path(&self.migration, dest);
        let part = part_name(dest);
        let mut st = match sink.load_sidecar(&sidecar)? {
            Some(st) if st.describes(e) && inode(&part) == Some(st.part_ino) => st,
            _ => {
                return Err(SinkError::PartLost {
                    path: display(&e.path),
                    part,
                })
            }
        };
        if !st.done.contains(&e.chunk_index) {
            st.done.push(e.chunk_index);
            st.done.sort_unstable();
        }
        if st.done.len() as u32 != st.chunk_count {
            sink.save_sidecar(&sidecar, &st)?;
            return Ok(false);
        }
        let f = open_nofollow(&part).map_err(io_at("cannot open", &part))?;
        f.set_len(e.file_size)
            .map_err(io_at("cannot size", &part))?;
        if let Some((uid, gid)) = sink.owner(e) {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
                .map_err(io_at("cannot set owner of", &part))?;
        }
        // The piece that completes the file brings the attributes (read when it was sent).
        crate::xattr::apply_to(&f, &e.xattrs).map_err(io_at("cannot set attributes of", &part))?;
        f.set_permissions(Permissions::from_mode(sink.mode(e)))
            .map_err(io_at("cannot set mode of", &part))?;
        let t = mtime_of(e);
        filetime::set_file_handle_times(&f, Some(t), Some(t))
            .map_err(io_at("cannot set mtime of", &part))?;
        f.sync_all().map_err(io_at("cannot fsync", &part))?;
        // Complete before the rename: a restart in between finishes the rename (open_piece).
        st.complete = true;
        sink.save_sidecar(&sidecar, &st)?;
        fs::rename(&part, dest).map_err(io_at("cannot rename into place", dest))?;
        Ok(true)
    }
}

impl FsSink {
    /// Records the directory mtimes a segment carries (durably), then sets the source mtime back
    /// on every directory in `touched` that has one.
    fn restore_dir_times(
        &self,
        migration: &str,
        received: &[(PathBuf, (i64, u32))],
        touched: &[PathBuf],
    ) -> Result<(), SinkError> {
        let mut dt = self.dir_times.lock().expect("not poisoned");
        if !received.is_empty() {
            let mut lines = Vec::new();
            for (d, t) in received {
                lines.extend(
                    serde_json::to_vec(&(migration, bytes(d), t))
                        .expect("strings, bytes and numbers serialise"),
                );
                lines.push(b'\n');
                dt.known.insert((migration.to_string(), d.clone()), *t);
            }
            use std::io::Write;
            let DirTimes { log, log_path, .. } = &mut *dt;
            log.write_all(&lines)
                .and_then(|()| log.sync_data())
                .map_err(io_at("cannot append to", log_path))?;
        }
        for d in touched {
            if let Some(&(sec, nsec)) = dt.known.get(&(migration.to_string(), d.clone())) {
                let t = FileTime::from_unix_time(sec, nsec);
                filetime::set_symlink_file_times(d, t, t)
                    .map_err(io_at("cannot set mtime of", d))?;
            }
        }
        Ok(())
    }
}

impl Drop for SegmentWriter<'_> {
    /// An uncommitted segment leaves nothing visible: its temporary whole files are removed.
    /// Pieces of split files stay in the part file, unrecorded, to be overwritten by the resend.
    fn drop(&mut self) {
        if let Some(open) = self.current.take() {
            if open.mode == Mode::Temp {
                let _ = fs::remove_file(&open.path);
            }
        }
        for s in self.staged.drain(..) {
            if let Staged::Rename { tmp, .. } = s {
                let _ = fs::remove_file(tmp);
            }
        }
    }
}

#[cfg(test)]
mod tests;
