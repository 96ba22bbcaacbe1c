//! Split files patched in place: a delta of a large file is applied to the file where it lies,
//! behind a redo journal, instead of being built on a full copy of the old version (on a file
//! system without reflinks that copy is the whole file written and fsynced again for a 1 %
//! change).
//!
//! Each piece of such a version is written to its own journal beside the file
//! (`.ferry-redo-<id>.<piece>.<transfer>`: where its bytes go, where it has holes, then the
//! bytes) and fsynced, and recorded in the file's sidecar; the file itself is not touched and still holds the old version. When the last piece
//! is durable, the sidecar is marked complete, every journal is applied in place, the file gets
//! the new size and mtime and is fsynced, and only then are the journals removed. A crash while
//! applying leaves a torn file and a complete sidecar with its journals: whatever touches the
//! file next ([`SegmentWriter::open_piece`]) first applies them again — applying a journal twice
//! writes the same bytes — so no delta against the old version is ever applied to a torn file
//! (the old version's size and mtime are still on it until the journals are applied).

use super::*;

/// What starts every journal.
const MAGIC: &[u8; 8] = b"FRYREDO1";

/// A new journal's name for piece `chunk` of the file at `dest`, unique to one transfer
/// (`tag`), so that two transfers of the same piece never write into each other's journal.
pub(super) fn redo_name(dest: &Path, chunk: u32, tag: &str) -> String {
    format!("{}{chunk}.{tag}", journal_prefix(dest))
}

/// How the names of the journals of the file at `dest` start.
fn journal_prefix(dest: &Path) -> String {
    let name = dest.file_name().unwrap_or_default();
    let id = hex(&blake3::hash(name.as_encoded_bytes()).as_bytes()[..16]);
    format!("{RESERVED_PREFIX}redo-{id}.")
}

/// Where the journal named `name` of the file at `dest` is.
pub(super) fn journal_path(dest: &Path, name: &str) -> PathBuf {
    dest.with_file_name(name)
}

/// A piece's journal: the version it belongs to, where its bytes go (`runs`, in order) and the
/// ranges that must read as zeros (`zeros`: the holes of a sparse piece sent whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Header {
    pub(super) file_size: u64,
    pub(super) mtime: (i64, u32),
    pub(super) chunk: u32,
    pub(super) runs: Vec<(u64, u64)>,
    pub(super) zeros: Vec<(u64, u64)>,
}

impl Header {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(40 + 16 * (self.runs.len() + self.zeros.len()));
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.file_size.to_le_bytes());
        b.extend_from_slice(&self.mtime.0.to_le_bytes());
        b.extend_from_slice(&self.mtime.1.to_le_bytes());
        b.extend_from_slice(&self.chunk.to_le_bytes());
        b.extend_from_slice(&(self.runs.len() as u32).to_le_bytes());
        b.extend_from_slice(&(self.zeros.len() as u32).to_le_bytes());
        for (o, l) in self.runs.iter().chain(&self.zeros) {
            b.extend_from_slice(&o.to_le_bytes());
            b.extend_from_slice(&l.to_le_bytes());
        }
        b
    }

    /// Reads the header at the start of `f`; returns it and where the bytes start.
    fn decode(f: &File) -> io::Result<(Header, u64)> {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "not a ferry redo journal");
        let mut fixed = [0u8; 40];
        f.read_exact_at(&mut fixed, 0)?;
        if &fixed[..8] != MAGIC {
            return Err(bad());
        }
        let u64_at = |a: &[u8], i: usize| u64::from_le_bytes(a[i..i + 8].try_into().expect("8"));
        let u32_at = |a: &[u8], i: usize| u32::from_le_bytes(a[i..i + 4].try_into().expect("4"));
        let (nruns, nzeros) = (u32_at(&fixed, 32) as usize, u32_at(&fixed, 36) as usize);
        // A piece is at most a segment; a run per 4 KiB of 1 GiB is far more than any has.
        if nruns + nzeros > 1 << 18 {
            return Err(bad());
        }
        let mut pairs = vec![0u8; 16 * (nruns + nzeros)];
        f.read_exact_at(&mut pairs, 40)?;
        let mut all = pairs.chunks_exact(16).map(|p| (u64_at(p, 0), u64_at(p, 8)));
        let runs: Vec<_> = all.by_ref().take(nruns).collect();
        let zeros: Vec<_> = all.collect();
        let h = Header {
            file_size: u64_at(&fixed, 8),
            mtime: (u64_at(&fixed, 16) as i64, u32_at(&fixed, 24)),
            chunk: u32_at(&fixed, 28),
            runs,
            zeros,
        };
        Ok((h, 40 + pairs.len() as u64))
    }
}

/// Opens `dest` for patching if it is still the version a delta is against (`base`: size and
/// mtime of a regular file); refused with [`SinkError::BaseGone`] otherwise: someone changed the
/// target's copy, and the next round sends the file whole.
pub(super) fn check_base(
    dest: &Path,
    base: (u64, i64, u32),
    write: bool,
) -> Result<File, SinkError> {
    let gone = |reason: String| SinkError::BaseGone {
        path: dest.display().to_string(),
        reason: format!(
            "a delta against the version of {} bytes, mtime {}.{:09}, but {reason}; was it \
             changed at the target? The next round sends the file whole",
            base.0, base.1, base.2
        ),
    };
    let opened = if write {
        open_rw_nofollow(dest)
    } else {
        open_read_nofollow(dest)
    };
    let f = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(gone("the file is not here".into()))
        }
        Err(e) => return Err(io_at("cannot open the version in place", dest)(e)),
    };
    let m = f
        .metadata()
        .map_err(io_at("cannot stat the version in place", dest))?;
    if !m.is_file() || (m.len(), m.mtime(), m.mtime_nsec() as u32) != base {
        return Err(gone(format!(
            "the file here is another ({} bytes, mtime {}.{:09})",
            m.len(),
            m.mtime(),
            m.mtime_nsec()
        )));
    }
    Ok(f)
}

/// Removes every journal of the file at `dest` — those of its pieces recorded in the sidecar
/// and any a killed transfer left unrecorded — and makes that durable.
pub(super) fn remove_journals(dest: &Path) -> Result<(), SinkError> {
    let dir = dest.parent().expect("has a parent");
    let prefix = journal_prefix(dest);
    let names = match beneath::read_dir(dir) {
        Ok(names) => names,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_at("cannot list", dir)(e)),
    };
    let mut removed = false;
    for name in names {
        if name.as_bytes().starts_with(prefix.as_bytes()) {
            let j = dir.join(name);
            match beneath::remove_file(&j) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_at("cannot remove journal", &j)(e)),
            }
        }
    }
    if removed {
        fsync_dir(dir)?;
    }
    Ok(())
}

/// Applies the journals of the complete version `st` to `file` (open on `dest`), gives it the
/// version's size and mtime, makes it durable and removes the journals. Used both right after
/// the last piece landed and to finish after a crash: when only some journals are left, the
/// crash came while removing them, after the file was durable, so they are only removed.
pub(super) fn apply(dest: &Path, file: &File, st: &PartState) -> Result<(), SinkError> {
    let present = st
        .journals
        .iter()
        .filter(|(_, name)| beneath::symlink_metadata(&journal_path(dest, name)).is_ok())
        .count();
    if present == st.journals.len() {
        let mut buf = vec![0u8; 1 << 20];
        for (i, name) in &st.journals {
            let (i, j) = (*i, journal_path(dest, name));
            let lost = |reason: String| SinkError::BaseGone {
                path: dest.display().to_string(),
                reason: format!(
                    "the journal of piece {i} ({}) {reason}; the next round sends the file whole",
                    j.display()
                ),
            };
            let jf = open_read_nofollow(&j).map_err(|e| lost(format!("cannot be opened: {e}")))?;
            let (h, mut at) =
                Header::decode(&jf).map_err(|e| lost(format!("is unreadable: {e}")))?;
            if (h.file_size, h.mtime, h.chunk) != (st.file_size, st.mtime, i) {
                return Err(lost("is of another version".into()));
            }
            for (start, len) in h.runs {
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(buf.len() as u64) as usize;
                    jf.read_exact_at(&mut buf[..n], at)
                        .map_err(|e| lost(format!("is cut short: {e}")))?;
                    file.write_all_at(&buf[..n], start + done)
                        .map_err(io_at("cannot patch", dest))?;
                    done += n as u64;
                    at += n as u64;
                }
            }
            for (start, len) in h.zeros {
                crate::holes::make_hole(file, start, len)
                    .map_err(io_at("cannot punch a hole in", dest))?;
            }
        }
        file.set_len(st.file_size)
            .map_err(io_at("cannot size", dest))?;
        let t = FileTime::from_unix_time(st.mtime.0, st.mtime.1);
        filetime::set_file_handle_times(file, Some(t), Some(t))
            .map_err(io_at("cannot set mtime of", dest))?;
        file.sync_all().map_err(io_at("cannot fsync", dest))?;
    }
    remove_journals(dest)
}

/// Finishes a version marked complete whose journals may not all have been applied (a crash
/// while patching): applies them again. Nothing to do when none is left.
pub(super) fn recover(dest: &Path, st: &PartState) -> Result<(), SinkError> {
    if !st.complete
        || st.base.is_none()
        || !st
            .journals
            .iter()
            .any(|(_, name)| beneath::symlink_metadata(&journal_path(dest, name)).is_ok())
    {
        return Ok(());
    }
    tracing::info!(message = "Finishing a file patched in place when the agent stopped.", path = %dest.display());
    let f = open_nofollow(dest).map_err(io_at("cannot open to finish patching", dest))?;
    apply(dest, &f, st)
}
