//! Files split over several segments: assembled in `.ferry-part-<id>` beside the destination,
//! with a sidecar in the state directory recording which pieces are durable; published when
//! complete, compared (never rewritten) when a piece comes again after that.

use super::*;

/// What a sidecar records about a split file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct PartState {
    pub(super) file_size: u64,
    pub(super) chunk_count: u32,
    pub(super) mtime: (i64, u32),
    /// Inode of the part file the pieces were written into.
    pub(super) part_ino: u64,
    /// Pieces durable in the part file.
    pub(super) done: Vec<u32>,
    /// The part was (or is being) renamed into place — for a version patched in place, its
    /// journals are being applied.
    pub(super) complete: bool,
    /// A version patched in place (`redo`): the version of the file in place its deltas are
    /// against. Its pieces are journalled beside the file, not written into a part.
    #[serde(default)]
    pub(super) base: Option<(u64, i64, u32)>,
    /// A version patched in place: the pieces recorded with a journal and its file name beside
    /// the file (a delta piece with no changed block has none).
    #[serde(default)]
    pub(super) journals: Vec<(u32, String)>,
    /// The destination's path as bytes (empty in sidecars of earlier versions): what a deleted
    /// migration's leftovers are found by.
    #[serde(default)]
    pub(super) dest: Vec<u8>,
}

impl PartState {
    pub(super) fn describes(&self, e: &Entry) -> bool {
        self.file_size == e.file_size
            && self.chunk_count == e.chunk_count
            && self.mtime == (e.mtime_sec, e.mtime_nsec)
    }
}

/// See `FsSink::part_gates`.
pub(super) type PartGate = Arc<std::sync::RwLock<Gate>>;

/// Who may still write into a part.
#[derive(Debug, Default)]
pub(super) struct Gate {
    /// The file was completed: nobody.
    pub(super) closed: bool,
    /// Each piece's writer: the fencing token (lease epoch, only ever growing) of the newest
    /// transfer that opened it. An older transfer of the same piece, still streaming after its
    /// lease was lost and the piece leased again, writes nothing more into it: two transfers
    /// interleaving their writes could leave bytes of the older in the piece the newer verified.
    pub(super) writers: HashMap<u32, u64>,
}

impl Gate {
    /// Whether the transfer holding lease `epoch` may write piece `chunk` (it must have opened
    /// it, [`Gate::open`]), else why not.
    pub(super) fn check(&self, chunk: u32, epoch: u64, path: &Path) -> Result<(), SinkError> {
        if self.closed {
            return Err(completed(path));
        }
        match self.writers.get(&chunk) {
            Some(&newest) if newest > epoch => Err(superseded(path, chunk)),
            _ => Ok(()),
        }
    }

    /// Registers the transfer holding lease `epoch` as piece `chunk`'s writer, unless a newer
    /// one has it or the file is complete.
    pub(super) fn open(&mut self, chunk: u32, epoch: u64, path: &Path) -> Result<(), SinkError> {
        self.check(chunk, epoch, path)?;
        self.writers.insert(chunk, epoch);
        Ok(())
    }
}

/// What a transfer writing a piece gets once a newer transfer of the same piece opened it.
fn superseded(path: &Path, chunk: u32) -> SinkError {
    SinkError::BadEntry {
        path: display(path),
        reason: format!(
            "piece {chunk} is being written by a newer transfer (its lease was granted again); \
             this one writes nothing more into it"
        ),
    }
}

/// What a transfer writing into a part gets once the part became the finished file.
pub(super) fn completed(path: &Path) -> SinkError {
    SinkError::BadEntry {
        path: display(path),
        reason: "the file was completed by another transfer of this piece while this one \
                 streamed; nothing more is written into it (this transfer is sent again and \
                 compared)"
            .into(),
    }
}

impl FsSink {
    /// The gate of the part with inode `ino` of the file at `dest`.
    pub(super) fn part_gate(&self, dest: &Path, ino: u64) -> PartGate {
        self.part_gates
            .lock()
            .expect("not poisoned")
            .entry((dest.to_path_buf(), ino))
            .or_default()
            .clone()
    }

    pub(super) fn part_lock(&self, dest: &Path) -> Arc<Mutex<()>> {
        self.part_locks
            .lock()
            .expect("not poisoned")
            .entry(dest.to_path_buf())
            .or_default()
            .clone()
    }

    pub(super) fn sidecar_path(&self, migration: &str, dest: &Path) -> PathBuf {
        let key = hex(blake3::hash(dest.as_os_str().as_encoded_bytes()).as_bytes());
        self.parts_dir.join(migration).join(format!("{key}.json"))
    }

    pub(super) fn load_sidecar(&self, path: &Path) -> Result<Option<PartState>, SinkError> {
        load_json(path)
    }

    pub(super) fn save_sidecar(&self, path: &Path, st: &PartState) -> Result<(), SinkError> {
        save_json(path, st)
    }

    /// Forgets a deleted migration (`cluster/uuid`): removes the part files and journals of
    /// its split files that were never completed, and their sidecars. Returns how many
    /// unfinished files it removed.
    pub fn forget(&self, migration: &str) -> Result<u64, SinkError> {
        check_migration_key(migration)?;
        let dir = self.parts_dir.join(migration);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_at("cannot list", &dir)(e)),
        };
        let mut removed = 0;
        for e in entries {
            let path = e.map_err(io_at("cannot list", &dir))?.path();
            let Some(st) = self.load_sidecar(&path)? else {
                continue;
            };
            let dest = PathBuf::from(OsStr::from_bytes(&st.dest));
            // Only what lies below this sink's root is touched.
            let ours = !st.dest.is_empty() && dest.starts_with(&self.root);
            match (st.complete, st.base.is_some()) {
                // Its journals are being applied to the file in place: left to finish.
                (true, true) => continue,
                (true, false) => {}
                (false, _) if !ours => {}
                (false, true) => {
                    redo::remove_journals(&dest)?;
                    removed += 1;
                }
                (false, false) => {
                    let part = part_name(&dest);
                    if inode(&part) == Some(st.part_ino) {
                        beneath::remove_file(&part).map_err(io_at("cannot remove", &part))?;
                        removed += 1;
                    }
                }
            }
            fs::remove_file(&path).map_err(io_at("cannot remove", &path))?;
        }
        let _ = fs::remove_dir(&dir);
        Ok(removed)
    }
}

impl SegmentWriter<'_> {
    /// Records a durable piece (`journal`: the name of the journal it was written to); when all pieces
    /// are there, finalises the file. Returns whether its directory changed (the part renamed
    /// into place, or the journals removed).
    pub(super) fn record_piece(
        &self,
        e: &Entry,
        dest: &Path,
        journal: Option<&str>,
    ) -> Result<bool, SinkError> {
        let sink = self.sink;
        let lock = sink.part_lock(dest);
        let _guard = lock.lock().expect("not poisoned");
        let sidecar = sink.sidecar_path(&self.migration, dest);
        let part = part_name(dest);
        let found = sink.load_sidecar(&sidecar).and_then(|found| match found {
            Some(st) if st.describes(e) && st.base.is_some() => Ok(st),
            Some(st) if st.describes(e) && inode(&part) == Some(st.part_ino) => Ok(st),
            _ => Err(SinkError::PartLost {
                path: display(&e.path),
                part: part.clone(),
            }),
        });
        let mut st = match found {
            Ok(st) => st,
            Err(err) => {
                // Never recorded: nothing will apply it.
                if let Some(name) = journal {
                    let _ = beneath::remove_file(&redo::journal_path(dest, name));
                }
                return Err(err);
            }
        };
        if st.base.is_none() {
            // A newer transfer of this piece may have opened it after this one's last write:
            // then only the newer records it. (`claim_piece` registers under the same lock.)
            sink.part_gate(dest, st.part_ino)
                .read()
                .expect("not poisoned")
                .check(e.chunk_index, self.epoch, &e.path)?;
        }
        if !st.done.contains(&e.chunk_index) {
            st.done.push(e.chunk_index);
            st.done.sort_unstable();
        }
        if let Some(name) = journal {
            st.journals.retain(|(i, _)| *i != e.chunk_index);
            st.journals.push((e.chunk_index, name.to_string()));
            st.journals.sort_unstable();
        }
        if st.done.len() as u32 != st.chunk_count {
            sink.save_sidecar(&sidecar, &st)?;
            return Ok(false);
        }
        if let Some(base) = st.base {
            return self
                .patch_in_place(e, dest, &sidecar, st, base)
                .map(|()| true);
        }
        // Closed to every transfer still writing a piece into this part, before it becomes the
        // file: waits for a write under way, refuses the next. Opened again if the file is not
        // marked complete after all.
        let gate = sink.part_gate(dest, st.part_ino);
        let mut gate = gate.write().expect("not poisoned");
        gate.closed = true;
        let finished = (|| {
            let f = open_nofollow(&part).map_err(io_at("cannot open", &part))?;
            f.set_len(e.file_size)
                .map_err(io_at("cannot size", &part))?;
            if let Some((uid, gid)) = sink.owner(e) {
                std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
                    .map_err(io_at("cannot set owner of", &part))?;
            }
            // The piece that completes the file brings the attributes (read when it was sent).
            crate::xattr::apply_to(&f, &e.xattrs)
                .map_err(io_at("cannot set attributes of", &part))?;
            f.set_permissions(Permissions::from_mode(sink.mode(e)))
                .map_err(io_at("cannot set mode of", &part))?;
            let t = mtime_of(e);
            filetime::set_file_handle_times(&f, Some(t), Some(t))
                .map_err(io_at("cannot set mtime of", &part))?;
            f.sync_all().map_err(io_at("cannot fsync", &part))?;
            // Complete before the rename: a restart in between finishes the rename (open_piece).
            st.complete = true;
            sink.save_sidecar(&sidecar, &st)
        })();
        if let Err(err) = finished {
            gate.closed = false;
            return Err(err);
        }
        beneath::rename(&part, dest).map_err(io_at("cannot rename into place", dest))?;
        Ok(true)
    }
}

impl SegmentWriter<'_> {
    /// The last piece of a version patched in place is durable in its journal: checks that the
    /// file is still the version the deltas are against, gives it the new attributes, marks the
    /// version complete, then applies the journals ([`redo::apply`]). A file changed at the
    /// target meanwhile is refused ([`SinkError::BaseGone`]) and the journals dropped: the next
    /// round sends it whole.
    fn patch_in_place(
        &self,
        e: &Entry,
        dest: &Path,
        sidecar: &Path,
        mut st: PartState,
        base: (u64, i64, u32),
    ) -> Result<(), SinkError> {
        let sink = self.sink;
        let lost = st
            .journals
            .iter()
            .find(|(_, name)| beneath::symlink_metadata(&redo::journal_path(dest, name)).is_err());
        let checked = match lost {
            Some((i, name)) => Err(SinkError::BaseGone {
                path: dest.display().to_string(),
                reason: format!(
                    "the journal of piece {i} ({name}) was removed before it was applied; the \
                     next round sends the file whole"
                ),
            }),
            None => redo::check_base(dest, base, true),
        };
        let f = match checked {
            Ok(f) => f,
            Err(err) => {
                redo::remove_journals(dest)?;
                let _ = fs::remove_file(sidecar);
                return Err(err);
            }
        };
        // Attributes first: a crash before the complete mark leaves the old bytes with the new
        // mode, which the resend sets again; the mtime, set last, says the bytes are new.
        if let Some((uid, gid)) = sink.owner(e) {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
                .map_err(io_at("cannot set owner of", dest))?;
        }
        crate::xattr::apply_to(&f, &e.xattrs).map_err(io_at("cannot set attributes of", dest))?;
        f.set_permissions(Permissions::from_mode(sink.mode(e)))
            .map_err(io_at("cannot set mode of", dest))?;
        st.complete = true;
        sink.save_sidecar(sidecar, &st)?;
        #[cfg(test)]
        if sink
            .stop_before_patching
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(SinkError::BadEntry {
                path: display(&e.path),
                reason: "stopped before patching (test)".into(),
            });
        }
        redo::apply(dest, &f, &st)
    }
}

pub(super) fn part_name(dest: &Path) -> PathBuf {
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
pub(super) fn publish(tmp: &Path, dest: &Path) -> Result<(), SinkError> {
    // Both cases need a destination with several names; the usual one (nothing there yet, or a
    // file with one name) costs one lstat.
    let linked = beneath::symlink_metadata(dest)
        .ok()
        .filter(|d| d.is_file() && d.nlink() > 1);
    if let (Some(d), Ok(t)) = (linked, beneath::symlink_metadata(tmp)) {
        if (t.dev(), t.ino()) == (d.dev(), d.ino()) {
            return beneath::remove_file(tmp).map_err(io_at("cannot remove", tmp));
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
            return beneath::remove_file(tmp).map_err(io_at("cannot remove", tmp));
        }
    }
    beneath::rename(tmp, dest).map_err(io_at("cannot rename into place", dest))
}

/// Whether two files hold the same bytes.
pub(super) fn same_bytes(a: &Path, b: &Path) -> Result<bool, SinkError> {
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

/// The parts of a piece that none of its runs cover and that must read as zeros: its holes.
/// A delta has none: its gaps are the old version's bytes, which stay (and which its hash
/// does not cover).
pub(super) fn holes(e: &Entry, runs: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    if e.delta_base.is_some() {
        return out;
    }
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
pub(super) fn compare_at(file: &File, data: &[u8], at: u64, e: &Entry) -> Result<(), SinkError> {
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

pub(super) fn read_up_to(file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
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
