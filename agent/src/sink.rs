//! The filesystem sink: where a target writes what it receives.
//!
//! Every path comes from a peer, so every path is checked (invariant 4): it must pass
//! [`validate_relative`], and no existing component between the root and the file may be a
//! symlink, so nothing can be written outside the root. Data goes to a temporary file beside its
//! destination; a whole file is renamed into place only after its bytes are fsynced, the segment's
//! hashes agree, and its mode and mtime are set; the parent directory is then fsynced. A file split
//! over several segments is assembled in `.<name>.ferry-part`, with a sidecar recording which
//! pieces are durable, and renamed into place when the last piece lands.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferry_common::path::{validate_relative, validate_subdir, PathError};
use ferry_common::segment::{Entry, EntryKind};
use filetime::FileTime;
use serde::{Deserialize, Serialize};

/// A write could not be done.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The peer named a path that is not allowed.
    #[error(transparent)]
    Path(#[from] PathError),
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
    /// One lock per split file, so that pieces landing at once update its sidecar in turn.
    part_locks: Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>,
}

/// What a `.ferry-part` sidecar records: which pieces of the file are durable.
#[derive(Debug, Default, Serialize, Deserialize)]
struct PartState {
    file_size: u64,
    chunk_count: u32,
    done: Vec<u32>,
}

impl FsSink {
    /// Opens `root` (created if missing) and checks that files can be created in it.
    pub fn new(root: &Path) -> Result<Self, SinkError> {
        let err = |reason: String| SinkError::Root {
            root: root.to_path_buf(),
            reason,
        };
        fs::create_dir_all(root).map_err(|e| err(format!("cannot create it: {e}")))?;
        let root = fs::canonicalize(root).map_err(|e| err(e.to_string()))?;
        if !root.is_dir() {
            return Err(err("not a directory".into()));
        }
        let probe = root.join(format!(".ferry-probe-{}", std::process::id()));
        File::create(&probe).map_err(|e| err(format!("not writable: {e}")))?;
        let _ = fs::remove_file(&probe);
        Ok(FsSink {
            root,
            part_locks: Mutex::new(HashMap::new()),
        })
    }

    /// The canonical root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves `base/rel` below the root, creating missing directories, refusing symlinks.
    /// Returns the parent directory and the final path.
    fn resolve(&self, base: &Path, rel: &str) -> Result<(PathBuf, PathBuf), SinkError> {
        let rel_path = validate_relative(rel)?;
        let full_rel = base.join(&rel_path);
        let mut dir = self.root.clone();
        let comps: Vec<_> = full_rel.components().collect();
        let (last, parents) = comps.split_last().ok_or(PathError::Empty)?;
        for c in parents {
            dir.push(c);
            match fs::symlink_metadata(&dir) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(_) => {
                    return Err(SinkError::Escape {
                        path: rel.to_string(),
                        component: dir,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => match fs::create_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        // Created concurrently by another segment; re-check what it is.
                        if !fs::symlink_metadata(&dir)
                            .map(|m| m.file_type().is_dir())
                            .unwrap_or(false)
                        {
                            return Err(SinkError::Escape {
                                path: rel.to_string(),
                                component: dir,
                            });
                        }
                    }
                    Err(e) => return Err(io_at("cannot create directory", &dir)(e)),
                },
                Err(e) => return Err(io_at("cannot inspect", &dir)(e)),
            }
        }
        let path = dir.join(last);
        Ok((dir, path))
    }

    /// Starts receiving segment `segment_id` into `target_path` (relative to the root).
    pub fn begin(
        &self,
        target_path: &str,
        segment_id: u64,
    ) -> Result<SegmentWriter<'_>, SinkError> {
        let base = validate_subdir(target_path)?;
        Ok(SegmentWriter {
            sink: self,
            base,
            segment_id,
            hasher: blake3::Hasher::new(),
            current: None,
            staged: Vec::new(),
        })
    }

    fn part_lock(&self, path: &Path) -> Arc<Mutex<()>> {
        self.part_locks
            .lock()
            .expect("not poisoned")
            .entry(path.to_path_buf())
            .or_default()
            .clone()
    }
}

/// What a segment has written but not yet made visible.
enum Staged {
    /// A whole file or symlink written to `tmp`, to be renamed to `dest`.
    Rename {
        tmp: PathBuf,
        dest: PathBuf,
        dir: PathBuf,
    },
    /// A piece of a split file, to be recorded in its sidecar.
    Piece {
        entry: Entry,
        part: PathBuf,
        dest: PathBuf,
        dir: PathBuf,
    },
    /// A directory (already created; mode set).
    Dir,
}

struct Open {
    file: File,
    path: PathBuf,
    entry: Entry,
    written: u64,
}

/// Receives one segment's entries and bytes.
pub struct SegmentWriter<'a> {
    sink: &'a FsSink,
    base: PathBuf,
    segment_id: u64,
    hasher: blake3::Hasher,
    current: Option<Open>,
    staged: Vec<Staged>,
}

fn mtime_of(e: &Entry) -> FileTime {
    FileTime::from_unix_time(e.mtime_sec, e.mtime_nsec)
}

fn fsync_dir(dir: &Path) -> Result<(), SinkError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at("cannot fsync directory", dir))
}

fn hidden_name(dest: &Path, suffix: &str) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.{suffix}"))
}

impl SegmentWriter<'_> {
    /// Prepares for `entry`'s bytes (`entry.len` of them follow through [`Self::write`]).
    pub fn start_entry(&mut self, entry: &Entry) -> Result<(), SinkError> {
        self.finish_entry()?;
        let (dir, dest) = self.sink.resolve(&self.base, &entry.path)?;
        let bad = |reason: &str| SinkError::BadEntry {
            path: entry.path.clone(),
            reason: reason.to_string(),
        };
        match entry.kind {
            EntryKind::Dir => {
                if entry.len != 0 {
                    return Err(bad("a directory carries no bytes"));
                }
                match fs::symlink_metadata(&dest) {
                    Ok(m) if m.file_type().is_dir() => {}
                    Ok(_) => {
                        return Err(SinkError::Escape {
                            path: entry.path.clone(),
                            component: dest,
                        })
                    }
                    Err(_) => match fs::create_dir(&dest) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(io_at("cannot create directory", &dest)(e)),
                    },
                }
                fs::set_permissions(&dest, Permissions::from_mode(entry.mode & 0o7777))
                    .map_err(io_at("cannot set mode of", &dest))?;
                self.staged.push(Staged::Dir);
            }
            EntryKind::Symlink => {
                if entry.len != 0 || entry.link_target.is_empty() {
                    return Err(bad("a symlink needs a target and carries no bytes"));
                }
                let tmp = hidden_name(&dest, &format!("ferry-{}.tmp", self.segment_id));
                let _ = fs::remove_file(&tmp);
                std::os::unix::fs::symlink(&entry.link_target, &tmp)
                    .map_err(io_at("cannot create symlink", &tmp))?;
                let t = mtime_of(entry);
                filetime::set_symlink_file_times(&tmp, t, t)
                    .map_err(io_at("cannot set mtime of", &tmp))?;
                self.staged.push(Staged::Rename { tmp, dest, dir });
            }
            EntryKind::File => {
                let whole = entry.chunk_count <= 1;
                if whole && (entry.offset != 0 || entry.len != entry.file_size) {
                    return Err(bad("a whole file must start at 0 and carry all its bytes"));
                }
                if !whole
                    && (entry.chunk_index >= entry.chunk_count
                        || entry
                            .offset
                            .checked_add(entry.len)
                            .is_none_or(|end| end > entry.file_size))
                {
                    return Err(bad("piece lies outside the file"));
                }
                let (path, file) = if whole {
                    let tmp = hidden_name(&dest, &format!("ferry-{}.tmp", self.segment_id));
                    let f = File::create(&tmp).map_err(io_at("cannot create", &tmp))?;
                    (tmp, f)
                } else {
                    let part = hidden_name(&dest, "ferry-part");
                    let f = OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(&part)
                        .map_err(io_at("cannot open", &part))?;
                    (part, f)
                };
                self.current = Some(Open {
                    file,
                    path,
                    entry: entry.clone(),
                    written: 0,
                });
                let _ = dir;
            }
        }
        Ok(())
    }

    /// Writes the next bytes of the current entry and hashes them.
    pub fn write(&mut self, data: &[u8]) -> Result<(), SinkError> {
        let Some(open) = self.current.as_mut() else {
            return Err(SinkError::BadEntry {
                path: String::new(),
                reason: "bytes arrived for no file".into(),
            });
        };
        if open.written + data.len() as u64 > open.entry.len {
            return Err(SinkError::BadEntry {
                path: open.entry.path.clone(),
                reason: "more bytes than announced".into(),
            });
        }
        open.file
            .write_all_at(data, open.entry.offset + open.written)
            .map_err(io_at("cannot write", &open.path))?;
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
        if open.written != e.len {
            return Err(SinkError::BadEntry {
                path: e.path.clone(),
                reason: format!("{} of {} bytes arrived", open.written, e.len),
            });
        }
        let (dir, dest) = self.sink.resolve(&self.base, &e.path)?;
        if e.chunk_count <= 1 {
            open.file
                .set_permissions(Permissions::from_mode(e.mode & 0o7777))
                .map_err(io_at("cannot set mode of", &open.path))?;
            let t = mtime_of(e);
            filetime::set_file_handle_times(&open.file, Some(t), Some(t))
                .map_err(io_at("cannot set mtime of", &open.path))?;
            open.file
                .sync_all()
                .map_err(io_at("cannot fsync", &open.path))?;
            self.staged.push(Staged::Rename {
                tmp: open.path,
                dest,
                dir,
            });
        } else {
            open.file
                .sync_data()
                .map_err(io_at("cannot fsync", &open.path))?;
            self.staged.push(Staged::Piece {
                entry: open.entry,
                part: open.path,
                dest,
                dir,
            });
        }
        Ok(())
    }

    /// Ends the byte stream; returns the BLAKE3 of all bytes written.
    pub fn finish(&mut self) -> Result<[u8; 32], SinkError> {
        self.finish_entry()?;
        Ok(*self.hasher.finalize().as_bytes())
    }

    /// Makes the segment visible: renames whole files into place, records pieces of split files
    /// (assembling a file when its last piece lands) and fsyncs the directories touched. Call only
    /// after [`Self::finish`] and the hash check.
    pub fn commit(mut self) -> Result<(), SinkError> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for s in std::mem::take(&mut self.staged) {
            match s {
                Staged::Dir => {}
                Staged::Rename { tmp, dest, dir } => {
                    fs::rename(&tmp, &dest).map_err(io_at("cannot rename into place", &dest))?;
                    dirs.push(dir);
                }
                Staged::Piece {
                    entry,
                    part,
                    dest,
                    dir,
                } => {
                    if self.sink.record_piece(&entry, &part, &dest)? {
                        dirs.push(dir);
                    }
                }
            }
        }
        dirs.sort();
        dirs.dedup();
        for d in dirs {
            fsync_dir(&d)?;
        }
        Ok(())
    }
}

impl Drop for SegmentWriter<'_> {
    /// An uncommitted segment leaves nothing visible: its temporary whole files are removed.
    /// Pieces of split files stay in `.ferry-part` (unrecorded), to be overwritten by the resend.
    fn drop(&mut self) {
        if let Some(open) = self.current.take() {
            if open.entry.chunk_count <= 1 {
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

impl FsSink {
    /// Records a durable piece; when all pieces are there, finalises the file. Returns whether the
    /// file was renamed into place.
    fn record_piece(&self, e: &Entry, part: &Path, dest: &Path) -> Result<bool, SinkError> {
        let lock = self.part_lock(dest);
        let _guard = lock.lock().expect("not poisoned");
        let sidecar = hidden_name(dest, "ferry-part.json");
        let mut st: PartState = match fs::read(&sidecar) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
            Err(_) => PartState::default(),
        };
        if st.file_size != e.file_size || st.chunk_count != e.chunk_count {
            // A different version of the file (or none yet): start the record afresh.
            st = PartState {
                file_size: e.file_size,
                chunk_count: e.chunk_count,
                done: Vec::new(),
            };
        }
        if !st.done.contains(&e.chunk_index) {
            st.done.push(e.chunk_index);
            st.done.sort_unstable();
        }
        if st.done.len() as u32 == st.chunk_count {
            let f = OpenOptions::new()
                .write(true)
                .open(part)
                .map_err(io_at("cannot open", part))?;
            f.set_len(e.file_size).map_err(io_at("cannot size", part))?;
            f.set_permissions(Permissions::from_mode(e.mode & 0o7777))
                .map_err(io_at("cannot set mode of", part))?;
            let t = mtime_of(e);
            filetime::set_file_handle_times(&f, Some(t), Some(t))
                .map_err(io_at("cannot set mtime of", part))?;
            f.sync_all().map_err(io_at("cannot fsync", part))?;
            fs::rename(part, dest).map_err(io_at("cannot rename into place", dest))?;
            let _ = fs::remove_file(&sidecar);
            self.part_locks.lock().expect("not poisoned").remove(dest);
            return Ok(true);
        }
        let tmp = hidden_name(dest, "ferry-part.json.tmp");
        let bytes = serde_json::to_vec(&st).expect("plain struct serialises");
        let f = File::create(&tmp).map_err(io_at("cannot create", &tmp))?;
        f.write_all_at(&bytes, 0)
            .map_err(io_at("cannot write", &tmp))?;
        f.sync_all().map_err(io_at("cannot fsync", &tmp))?;
        fs::rename(&tmp, &sidecar).map_err(io_at("cannot rename", &sidecar))?;
        if let Some(dir) = dest.parent() {
            fsync_dir(dir)?;
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests;
