//! One segment's writer: each entry staged in a temporary (or a part), made durable, checked
//! against the segment's hash, then published; nothing is left behind if it is dropped.
//!
//! Whole files are made durable together, once per segment ([`Pending`]): a bundle of 5,000
//! small files costs one `syncfs` per file system it touches, not 5,000 `fsync`s. Nothing is
//! renamed into place before that barrier, and the target reports a segment only after it, so
//! no file is visible or verified before its bytes are durable.

use super::*;

/// How the current file entry is being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// A whole file into its own temporary.
    Temp,
    /// A piece into the shared part file.
    Part,
    /// A piece of an already finished file (a resend after completion): compared with the file,
    /// never written into it.
    Compare,
    /// A piece of a version patched in place: its bytes go, in order, into its journal from
    /// offset `body` on.
    Journal { body: u64 },
}

/// What a segment has written but not yet made visible.
pub(super) enum Staged {
    /// A whole file or symlink written to `tmp`, to be renamed to `dest`.
    Rename {
        tmp: PathBuf,
        dest: PathBuf,
        dir: PathBuf,
    },
    /// A piece of a split file, to be recorded in its sidecar (unless it was compared with the
    /// finished file), with the journal it was written to, if any.
    Piece {
        entry: Box<Entry>,
        dest: PathBuf,
        dir: PathBuf,
        compared: bool,
        journal: Option<PathBuf>,
    },
}

pub(super) struct Open {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) dest: PathBuf,
    pub(super) dir: PathBuf,
    pub(super) entry: Entry,
    /// Where the entry's bytes go: its data runs, or the whole piece.
    pub(super) runs: Vec<(u64, u64)>,
    /// Run being filled, and bytes of it done.
    pub(super) run: usize,
    pub(super) run_done: u64,
    /// Bytes received for this entry.
    pub(super) written: u64,
    pub(super) mode: Mode,
    /// A piece written into a part: the part's gate (see `FsSink::part_gates`).
    pub(super) gate: Option<PartGate>,
}

/// Whole files written but not yet durable, and the handles that make them durable together.
#[derive(Default)]
pub(super) struct Pending {
    /// Temporaries written since the last barrier.
    count: usize,
    /// The last of them: a lone file is fsynced on its own (cheaper than a file system's sync
    /// while other segments are being written).
    last: Option<(File, PathBuf)>,
    /// One handle per file system the temporaries are on (by device): the first temporary
    /// created there, opened before any of the segment's bytes on it were written, so a
    /// `syncfs` through it reports every writeback error since (Linux ≥ 5.8).
    filesystems: Vec<(u64, File, PathBuf)>,
}

impl Pending {
    /// Adds a written temporary.
    fn add(&mut self, file: File, path: &Path) -> Result<(), SinkError> {
        let dev = file.metadata().map_err(io_at("cannot stat", path))?.dev();
        if !self.filesystems.iter().any(|(d, ..)| *d == dev) {
            let handle = file.try_clone().map_err(io_at("cannot duplicate", path))?;
            self.filesystems.push((dev, handle, path.to_path_buf()));
        }
        self.count += 1;
        self.last = Some((file, path.to_path_buf()));
        Ok(())
    }

    /// Makes every temporary added so far durable: one `fsync` for a lone file, else one
    /// `syncfs` per file system (each call counted in `counts`).
    fn barrier(&mut self, counts: &SyncCounts) -> Result<(), SinkError> {
        match self.count {
            0 => {}
            1 => {
                let (f, path) = self.last.as_ref().expect("one file added");
                f.sync_all().map_err(io_at("cannot fsync", path))?;
                counts.add(&counts.file_syncs);
            }
            _ => {
                for (_, f, path) in &self.filesystems {
                    rustix::fs::syncfs(f).map_err(|e| {
                        io_at("cannot sync the file system of", path)(io::Error::from(e))
                    })?;
                    counts.add(&counts.fs_syncs);
                }
            }
        }
        *self = Pending::default();
        Ok(())
    }
}

/// Receives one segment's entries and bytes.
pub struct SegmentWriter<'a> {
    pub(super) sink: &'a FsSink,
    pub(super) base: PathBuf,
    /// `<cluster id>/<migration uuid>`.
    pub(super) migration: String,
    pub(super) segment_id: u64,
    pub(super) epoch: u64,
    /// This transfer's number in this process: part of its temporaries' names.
    pub(super) transfer: u64,
    pub(super) next: usize,
    pub(super) hasher: blake3::Hasher,
    pub(super) current: Option<Open>,
    pub(super) staged: Vec<Staged>,
    /// Directories this segment created; their parents are fsynced at commit.
    pub(super) created: Vec<PathBuf>,
    /// Directories a deletion removed something from; fsynced at commit.
    pub(super) touched: Vec<PathBuf>,
    /// Directory entries this segment carries, with their source mtimes.
    pub(super) dirs: Vec<(PathBuf, (i64, u32))>,
    /// The mtime each existing directory had before this segment first wrote into it: set back
    /// at commit when the sink knows no source mtime for it (a directory it never received —
    /// a fallback writes into the old source's own tree).
    pub(super) before: HashMap<PathBuf, (i64, u32)>,
    /// Whole files written, not yet durable.
    pub(super) pending: Pending,
}

impl SegmentWriter<'_> {
    /// Notes `dir`'s mtime before this segment first changes it.
    fn remember(&mut self, dir: &Path) {
        if !self.before.contains_key(dir) {
            if let Ok(m) = beneath::symlink_metadata(dir) {
                if m.is_dir() {
                    self.before
                        .insert(dir.to_path_buf(), (m.mtime(), m.mtime_nsec() as u32));
                }
            }
        }
    }

    pub(super) fn tmp_name(&mut self, dir: &Path) -> PathBuf {
        self.remember(dir);
        self.next += 1;
        dir.join(format!(
            "{RESERVED_PREFIX}s{}-e{}-{}.{}.{}{TMP_SUFFIX}",
            self.segment_id,
            self.epoch,
            process_token(),
            self.transfer,
            self.next
        ))
    }

    /// Prepares for `entry`'s bytes (`entry.wire_len()` of them follow through [`Self::write`]).
    pub fn start_entry(&mut self, entry: &Entry) -> Result<(), SinkError> {
        self.finish_entry()?;
        if entry.kind == EntryKind::Delete {
            return self.delete(entry);
        }
        let (dir, dest) = self
            .sink
            .resolve(&self.base, &entry.path, &mut self.created)?;
        let bad = |reason: &str| SinkError::BadEntry {
            path: display(&entry.path),
            reason: reason.to_string(),
        };
        if !crate::segment::mtime_is_valid(entry.mtime_sec, entry.mtime_nsec) {
            return Err(bad("its modification time is no time a file can have"));
        }
        if entry.kind != EntryKind::File && (entry.len != 0 || entry.data_runs.is_some()) {
            return Err(bad("only files carry bytes"));
        }
        match entry.kind {
            EntryKind::Dir => {
                match beneath::symlink_metadata(&dest) {
                    Ok(m) if m.file_type().is_dir() => {}
                    Ok(_) => {
                        return Err(SinkError::Escape {
                            path: display(&entry.path),
                            component: dest,
                        })
                    }
                    Err(_) => match beneath::create_dir(&dest, 0o700) {
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
                beneath::symlink(&entry.link_target, &tmp)
                    .map_err(io_at("cannot create symlink", &tmp))?;
                if let Some((uid, gid)) = self.sink.owner(entry) {
                    beneath::lchown(&tmp, uid, gid).map_err(io_at("cannot set owner of", &tmp))?;
                }
                beneath::set_xattrs_nofollow(&tmp, &entry.xattrs)
                    .map_err(io_at("cannot set attributes of", &tmp))?;
                let t = mtime_of(entry);
                beneath::set_symlink_file_times(&tmp, t)
                    .map_err(io_at("cannot set mtime of", &tmp))?;
                self.staged.push(Staged::Rename { tmp, dest, dir });
            }
            EntryKind::Hardlink => {
                let tmp = self.link(entry, &dir)?;
                self.staged.push(Staged::Rename { tmp, dest, dir });
            }
            EntryKind::Delete => unreachable!("handled above"),
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
                    // A delta of a whole file: its new version is built on a copy of the one
                    // in place, which must be the version the delta is against.
                    if let Some(base) = entry.delta_base {
                        if let Err(err) = copy_base(&dest, base, &f, entry.file_size) {
                            drop(f);
                            let _ = beneath::remove_file(&tmp);
                            return Err(err);
                        }
                    }
                    (Mode::Temp, tmp, f)
                } else {
                    self.remember(&dir);
                    match self.open_piece(entry, &dest, &runs)? {
                        Some(opened) => opened,
                        None => {
                            self.staged.push(Staged::Piece {
                                entry: Box::new(entry.clone()),
                                dest,
                                dir,
                                compared: false,
                                journal: None,
                            });
                            return Ok(());
                        }
                    }
                };
                let gate = match mode {
                    Mode::Part => {
                        // `open_piece` made this transfer the piece's writer.
                        let ino = file.metadata().map_err(io_at("cannot stat", &path))?.ino();
                        Some(self.sink.part_gate(&dest, ino))
                    }
                    _ => None,
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
                    gate,
                });
            }
        }
        Ok(())
    }

    /// Removes what is at a deleted name (a directory with all it holds), at once: the entries
    /// after it in the segment may put something of another kind there. Removing nothing is
    /// fine (a deletion sent again). Never follows a symlink: the name's parents are checked
    /// like every path, a symlink at the name is removed itself, and a directory's contents are
    /// removed without following the symlinks in it.
    fn delete(&mut self, entry: &Entry) -> Result<(), SinkError> {
        if entry.len != 0 || entry.data_runs.is_some() {
            return Err(SinkError::BadEntry {
                path: display(&entry.path),
                reason: "only files carry bytes".into(),
            });
        }
        let Some((dir, dest)) = self.sink.locate(&self.base, &entry.path)? else {
            return Ok(());
        };
        self.remember(&dir);
        let removed = match beneath::symlink_metadata(&dest) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_at("cannot inspect", &dest)(e)),
            Ok(m) if m.file_type().is_dir() => beneath::remove_dir_all(&dest),
            Ok(_) => beneath::remove_file(&dest),
        };
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at("cannot delete", &dest)(e)),
        }
        // The parent is fsynced at commit, and its source mtime set back.
        self.touched.push(dir);
        Ok(())
    }

    /// Links a new temporary in `dir` to the file a hardlink entry names as its first name: the
    /// temporary a whole file of this same segment is staged in, or the file in place. Checks
    /// that it is the file the source linked (a regular file of the entry's size and mtime).
    pub(super) fn link(&mut self, entry: &Entry, dir: &Path) -> Result<PathBuf, SinkError> {
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
        let m =
            beneath::symlink_metadata(&source).map_err(|_| pending("it has not arrived yet"))?;
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
        beneath::hard_link(&source, &tmp).map_err(io_at("cannot create hardlink", &tmp))?;
        if inode(&tmp) != Some(m.ino()) {
            let _ = beneath::remove_file(&tmp);
            return Err(pending("it was replaced while being linked"));
        }
        Ok(tmp)
    }

    /// Opens the file a piece of a split file goes into, after consulting its sidecar: the
    /// version's part, its journal when the version is patched in place (`redo`), or the
    /// finished file to compare a resent piece with. `None`: a piece of a version patched in
    /// place that changes nothing (a delta piece with no changed block), recorded as it is.
    pub(super) fn open_piece(
        &mut self,
        e: &Entry,
        dest: &Path,
        runs: &[(u64, u64)],
    ) -> Result<Option<(Mode, PathBuf, File)>, SinkError> {
        let lock = self.sink.part_lock(dest);
        let _guard = lock.lock().expect("not poisoned");
        let sidecar = self.sink.sidecar_path(&self.migration, dest);
        let part = part_name(dest);
        let found = self.sink.load_sidecar(&sidecar)?;
        // A version patched in place that a crash stopped while its journals were applied is
        // finished before anything else reads or replaces the file.
        if let Some(st) = &found {
            redo::recover(dest, st)?;
        }
        match found {
            Some(st) if st.complete && st.describes(e) => {
                if st.base.is_none() && inode(dest).is_none() && inode(&part) == Some(st.part_ino) {
                    // We stopped between marking it complete and renaming it: finish that.
                    beneath::rename(&part, dest)
                        .map_err(io_at("cannot rename into place", dest))?;
                    fsync_dir(dest.parent().expect("has a parent"))?;
                }
                let f =
                    open_read_nofollow(dest).map_err(io_at("cannot open finished file", dest))?;
                Ok(Some((Mode::Compare, dest.to_path_buf(), f)))
            }
            Some(mut st) if st.describes(e) && st.base.is_some() && !st.complete => {
                // A piece of a version patched in place, delta or not: journalled.
                if let Some(i) = st.done.iter().position(|&d| d == e.chunk_index) {
                    st.done.remove(i);
                    let old: Vec<_> = st
                        .journals
                        .iter()
                        .filter(|(c, _)| *c == e.chunk_index)
                        .cloned()
                        .collect();
                    st.journals.retain(|(c, _)| *c != e.chunk_index);
                    self.sink.save_sidecar(&sidecar, &st)?;
                    for (_, name) in old {
                        let _ = beneath::remove_file(&redo::journal_path(dest, &name));
                    }
                }
                self.open_journal(e, dest, runs)
            }
            Some(mut st) if st.describes(e) && inode(&part) == Some(st.part_ino) => {
                // Before anything is touched: an older transfer of a piece a newer one opened
                // must not un-record it below.
                self.claim_piece(dest, st.part_ino, e)?;
                if let Some(i) = st.done.iter().position(|&d| d == e.chunk_index) {
                    // Rewriting a recorded range: un-record it first, so that a failed rewrite
                    // can never leave a range marked durable that is not.
                    st.done.remove(i);
                    self.sink.save_sidecar(&sidecar, &st)?;
                }
                let f = open_nofollow(&part).map_err(io_at("cannot open", &part))?;
                // A delta piece of a version whose part a piece sent whole started: the bytes
                // of its range that it does not carry are the old version's.
                if let Some(base) = e.delta_base {
                    copy_base_range(dest, base, &f, e.offset, e.len)?;
                }
                Ok(Some((Mode::Part, part, f)))
            }
            Some(st) if st.describes(e) && st.base.is_none() && !st.done.is_empty() => {
                Err(SinkError::PartLost {
                    path: display(&e.path),
                    part,
                })
            }
            found => {
                // First piece of this version of the file. What an unfinished version patched
                // in place journalled is dropped (the file itself was not touched), with what
                // killed transfers left unrecorded.
                if e.delta_base.is_some() || found.is_some_and(|st| st.base.is_some()) {
                    redo::remove_journals(dest)?;
                }
                let mut st = PartState {
                    file_size: e.file_size,
                    chunk_count: e.chunk_count,
                    mtime: (e.mtime_sec, e.mtime_nsec),
                    part_ino: 0,
                    done: Vec::new(),
                    complete: false,
                    base: None,
                    journals: Vec::new(),
                    dest: dest.as_os_str().as_bytes().to_vec(),
                };
                if let Some(base) = e.delta_base {
                    // A delta: patched in place, once every piece is journalled — if the file
                    // in place is the version it is against.
                    redo::check_base(dest, base, false)?;
                    st.base = Some(base);
                    self.sink.save_sidecar(&sidecar, &st)?;
                    return self.open_journal(e, dest, runs);
                }
                let f = create_private(&part)?;
                st.part_ino = f.metadata().map_err(io_at("cannot stat", &part))?.ino();
                self.claim_piece(dest, st.part_ino, e)?;
                self.sink.save_sidecar(&sidecar, &st)?;
                fsync_dir(dest.parent().expect("has a parent"))?;
                Ok(Some((Mode::Part, part, f)))
            }
        }
    }

    /// Makes this transfer the writer of piece `e` of the part with inode `ino`, unless a
    /// newer transfer of it is (see `part::Gate`). Called with the part's lock held: recording
    /// a piece checks its writer under the same lock.
    fn claim_piece(&self, dest: &Path, ino: u64, e: &Entry) -> Result<(), SinkError> {
        self.sink
            .part_gate(dest, ino)
            .write()
            .expect("not poisoned")
            .open(e.chunk_index, self.epoch, &e.path)
    }

    /// Starts the journal of a piece of a version patched in place: its header says where the
    /// bytes that follow go and which ranges must read as zeros. `None` when there is neither.
    fn open_journal(
        &mut self,
        e: &Entry,
        dest: &Path,
        runs: &[(u64, u64)],
    ) -> Result<Option<(Mode, PathBuf, File)>, SinkError> {
        let zeros = holes(e, runs);
        if runs.is_empty() && zeros.is_empty() {
            return Ok(None);
        }
        self.next += 1;
        let tag = format!("{}.{}.{}", process_token(), self.transfer, self.next);
        let path = redo::journal_path(dest, &redo::redo_name(dest, e.chunk_index, &tag));
        let f = create_private(&path)?;
        let header = redo::Header {
            file_size: e.file_size,
            mtime: (e.mtime_sec, e.mtime_nsec),
            chunk: e.chunk_index,
            runs: runs.to_vec(),
            zeros,
        }
        .encode();
        f.write_all_at(&header, 0)
            .map_err(io_at("cannot write", &path))?;
        Ok(Some((
            Mode::Journal {
                body: header.len() as u64,
            },
            path,
            f,
        )))
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
                Mode::Temp => open
                    .file
                    .write_all_at(&rest[..n], at)
                    .map_err(io_at("cannot write", &open.path))?,
                Mode::Part => {
                    let gate = open.gate.as_ref().expect("a part has its gate");
                    // Held across the write: completing the file, or a newer transfer of this
                    // piece opening it, waits for the write under way.
                    let gate = gate.read().expect("not poisoned");
                    gate.check(open.entry.chunk_index, self.epoch, &open.entry.path)?;
                    open.file
                        .write_all_at(&rest[..n], at)
                        .map_err(io_at("cannot write", &open.path))?
                }
                Mode::Compare => compare_at(&open.file, &rest[..n], at, &open.entry)?,
                // In order, after the header: the journal's header says where they go.
                Mode::Journal { body } => open
                    .file
                    .write_all_at(
                        &rest[..n],
                        body + open.written + (data.len() - rest.len()) as u64,
                    )
                    .map_err(io_at("cannot write", &open.path))?,
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
    pub(super) fn finish_entry(&mut self) -> Result<(), SinkError> {
        let Some(open) = self.current.take() else {
            return Ok(());
        };
        let e = &open.entry;
        if open.written != e.wire_len() {
            if open.mode == Mode::Temp {
                let _ = beneath::remove_file(&open.path);
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
                // Durable at the segment's barrier (`finish`), with the others.
                self.pending.add(open.file, &open.path)?;
            }
            Mode::Part => {
                let gate = open.gate.as_ref().expect("a part has its gate");
                let gate = gate.read().expect("not poisoned");
                gate.check(e.chunk_index, self.epoch, &e.path)?;
                // The part may hold bytes of an earlier attempt where this piece has holes.
                for (start, len) in holes(e, &open.runs) {
                    crate::holes::make_hole(&open.file, start, len)
                        .map_err(io_at("cannot punch a hole in", &open.path))?;
                }
                open.file
                    .sync_data()
                    .map_err(io_at("cannot fsync", &open.path))?;
                self.sink.syncs.add(&self.sink.syncs.file_syncs);
                self.staged.push(Staged::Piece {
                    entry: Box::new(open.entry),
                    dest: open.dest,
                    dir: open.dir,
                    compared: false,
                    journal: None,
                });
            }
            Mode::Journal { .. } => {
                // Durable, and its name too, before the piece is recorded.
                open.file
                    .sync_data()
                    .map_err(io_at("cannot fsync", &open.path))?;
                self.sink.syncs.add(&self.sink.syncs.file_syncs);
                fsync_dir(&open.dir)?;
                self.staged.push(Staged::Piece {
                    entry: Box::new(open.entry),
                    dest: open.dest,
                    dir: open.dir,
                    compared: false,
                    journal: Some(open.path),
                });
            }
            Mode::Compare => {
                // The finished file must read as zeros where the resent piece has holes.
                let zeros = vec![0u8; 1 << 16];
                for (start, len) in holes(e, &open.runs) {
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
                    entry: Box::new(open.entry),
                    dest: open.dest,
                    dir: open.dir,
                    compared: true,
                    journal: None,
                });
            }
        }
        Ok(())
    }

    /// Ends the byte stream and makes every byte of it durable; returns the BLAKE3 of all
    /// bytes written.
    pub fn finish(&mut self) -> Result<[u8; 32], SinkError> {
        self.finish_entry()?;
        ferry_common::fault_point!("sink::before_fsync");
        self.pending.barrier(&self.sink.syncs)?;
        Ok(*self.hasher.finalize().as_bytes())
    }

    /// Makes the segment visible and durable: renames whole files into place, records pieces of
    /// split files (assembling a file when its last piece lands) and fsyncs every directory
    /// touched or created. Call only after [`Self::finish`] and the hash check.
    pub fn commit(mut self) -> Result<(), SinkError> {
        ferry_common::fault_point!("sink::before_rename");
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
                    journal,
                } => match *compared {
                    true => Ok(None),
                    false => {
                        let name = journal
                            .as_ref()
                            .and_then(|j| j.file_name())
                            .and_then(|n| n.to_str());
                        self.record_piece(entry, dest, name)
                            .map(|changed| changed.then(|| dir.clone()))
                    }
                },
            };
            match done {
                Ok(dir) => dirs.extend(dir),
                Err(e) => {
                    // Hand what is left back to Drop, which removes the temporaries — but not
                    // this piece's journal: record_piece has recorded it (a version marked
                    // complete finishes from its journals) or removed it.
                    let failed = match s {
                        Staged::Rename { .. } => Some(s),
                        Staged::Piece { .. } => None,
                    };
                    self.staged = failed.into_iter().chain(staged).collect();
                    return Err(e);
                }
            }
        }
        ferry_common::fault_point!("sink::after_rename");
        dirs.extend(self.dirs.iter().map(|(d, _)| d.clone()));
        dirs.extend(self.touched.iter().cloned());
        dirs.sort();
        dirs.dedup();
        self.sink
            .restore_dir_times(&self.migration, &self.dirs, &dirs, &self.before)?;
        for d in dirs {
            fsync_dir(&d)?;
        }
        // Set back already: nothing for Drop to do.
        self.before.clear();
        Ok(())
    }
}

impl Drop for SegmentWriter<'_> {
    /// An uncommitted segment leaves nothing visible: its temporary whole files and the
    /// journals of its pieces are removed, and the directories it wrote into get their mtimes
    /// back (the source's, or what they had before): another transfer of the same files may
    /// have committed and set them meanwhile. Pieces of split files stay in the part file,
    /// unrecorded, to be overwritten by the resend.
    fn drop(&mut self) {
        if let Some(open) = self.current.take() {
            if matches!(open.mode, Mode::Temp | Mode::Journal { .. }) {
                let _ = beneath::remove_file(&open.path);
            }
        }
        for s in self.staged.drain(..) {
            match s {
                Staged::Rename { tmp, .. } => {
                    let _ = beneath::remove_file(&tmp);
                }
                Staged::Piece {
                    journal: Some(j), ..
                } => {
                    let _ = beneath::remove_file(&j);
                }
                Staged::Piece { .. } => {}
            }
        }
        if !self.before.is_empty() {
            let dirs: Vec<PathBuf> = self.before.keys().cloned().collect();
            if let Err(e) = self
                .sink
                .restore_dir_times(&self.migration, &[], &dirs, &self.before)
            {
                tracing::debug!(message = "Cannot set directory mtimes back after a failed segment; the resend sets them.", error = %e);
            }
        }
    }
}

/// Fills a new temporary with the version of `dest` a delta of a whole file is against
/// (`base`: size and mtime), sized to the new version: the kernel copies it (`copy_file_range`,
/// a reflink where the file system shares blocks). Refused when the file in place is not that
/// version: someone changed the target's copy, and the next round sends the file whole.
fn copy_base(
    dest: &Path,
    base: (u64, i64, u32),
    tmp: &File,
    new_size: u64,
) -> Result<(), SinkError> {
    let mut from = redo::check_base(dest, base, false)?;
    let mut to = tmp;
    std::io::copy(&mut from, &mut to)
        .map_err(io_at("cannot copy the version in place of", dest))?;
    tmp.set_len(new_size)
        .map_err(io_at("cannot size the new version of", dest))
}

/// Copies the bytes `offset..offset + len` of the version of `dest` a delta piece is against
/// into the part at the same place (what of them the old version has): the piece's gaps, when
/// the part was started by a piece sent whole.
fn copy_base_range(
    dest: &Path,
    base: (u64, i64, u32),
    part: &File,
    offset: u64,
    len: u64,
) -> Result<(), SinkError> {
    let from = redo::check_base(dest, base, false)?;
    let end = (offset + len).min(base.0);
    let mut buf = vec![0u8; 1 << 20];
    let mut at = offset;
    while at < end {
        let n = ((end - at) as usize).min(buf.len());
        from.read_exact_at(&mut buf[..n], at)
            .map_err(io_at("cannot read the version in place of", dest))?;
        part.write_all_at(&buf[..n], at)
            .map_err(io_at("cannot copy the version in place of", dest))?;
        at += n as u64;
    }
    Ok(())
}
