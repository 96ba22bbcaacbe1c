//! A round's catalog: every name the source's scan found, in walk order, with what identifies
//! its version (size, mtime, ctime, inode, mode, owner, link target). The next round walks the
//! tree again and compares, name by name, with this file ([`Differ`]): both are in walk order
//! (depth first, names in byte order — which is how [`Path`]'s ordering compares paths,
//! component by component), so the comparison is one streaming merge and memory stays flat
//! however large the tree.
//!
//! Layout: records of `u32-BE length + CatalogRecord (protobuf)`; written during the scan and
//! fsynced before the scan is reported complete.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use ferry_proto::data as pb;
use prost::Message;

use crate::manifest::ManifestError;
use crate::segment::{Entry, EntryKind};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ManifestError + '_ {
    move |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Appends a round's scanned entries.
pub struct CatalogWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl CatalogWriter {
    /// Creates (or truncates) the catalog at `path`.
    pub fn create(path: &Path) -> Result<Self, ManifestError> {
        let f = File::create(path).map_err(io(path))?;
        Ok(CatalogWriter {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 20, f),
        })
    }

    /// Appends one scanned entry (a whole file, directory, symlink or hardlink).
    pub fn append(&mut self, e: &Entry) -> Result<(), ManifestError> {
        let rec = pb::CatalogRecord {
            entry: Some(pb::Entry::from(e)),
            inode: e.inode,
            ctime_sec: e.ctime.0,
            ctime_nsec: e.ctime.1,
        };
        let body = rec.encode_to_vec();
        self.out
            .write_all(&(body.len() as u32).to_be_bytes())
            .and_then(|()| self.out.write_all(&body))
            .map_err(io(&self.path))
    }

    /// Makes the catalog durable.
    pub fn finish(mut self) -> Result<(), ManifestError> {
        self.out.flush().map_err(io(&self.path))?;
        self.out.get_ref().sync_all().map_err(io(&self.path))
    }
}

/// Reads a catalog back, one record at a time.
pub struct CatalogReader {
    path: PathBuf,
    input: BufReader<File>,
}

impl CatalogReader {
    /// Opens the catalog at `path`.
    pub fn open(path: &Path) -> Result<Self, ManifestError> {
        let f = File::open(path).map_err(io(path))?;
        Ok(CatalogReader {
            path: path.to_path_buf(),
            input: BufReader::with_capacity(1 << 20, f),
        })
    }
}

impl Iterator for CatalogReader {
    type Item = Result<Entry, ManifestError>;

    fn next(&mut self) -> Option<Self::Item> {
        let damaged = |reason: String| ManifestError::Damaged {
            path: self.path.clone(),
            reason,
        };
        let mut len = [0u8; 4];
        match self.input.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(e) => return Some(Err(io(&self.path)(e))),
        }
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        if let Err(e) = self.input.read_exact(&mut body) {
            return Some(Err(damaged(format!("truncated record: {e}"))));
        }
        let rec = match pb::CatalogRecord::decode(body.as_slice()) {
            Ok(r) => r,
            Err(e) => return Some(Err(damaged(e.to_string()))),
        };
        let Some(entry) = rec.entry else {
            return Some(Err(damaged("a record without its entry".into())));
        };
        Some(
            Entry::try_from(entry)
                .map(|e| Entry {
                    inode: rec.inode,
                    ctime: (rec.ctime_sec, rec.ctime_nsec),
                    ..e
                })
                .map_err(|e| damaged(e.to_string())),
        )
    }
}

/// What a name found by this round's scan needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Nothing: the target has it as it is (it was verified in an earlier round and has not
    /// changed since).
    Same,
    /// Send it: new, or changed since the previous round.
    Send(Entry),
    /// Send it whole: the previous round carried it in a segment that was not verified, so
    /// what the target holds of it is not known.
    Resend(Entry),
    /// Its kind changed (a file became a directory, ...): remove what the target has at that
    /// name, then send it — in this order, in one segment.
    Replace(Entry),
}

/// Compares a round's scan, name by name in walk order, with the previous round's catalog.
/// Pure: the catalog arrives as an iterator, the scan as calls.
pub struct Differ<I: Iterator<Item = Result<Entry, ManifestError>>> {
    old: std::iter::Peekable<I>,
    /// Names the previous round carried but did not verify: sent again even if unchanged.
    dirty: HashSet<PathBuf>,
    /// Deletions the previous round did not verify: made again unless the name is back.
    dirty_deletes: HashSet<PathBuf>,
    /// Names gone since the previous round (only the topmost of a removed directory).
    deleted: Vec<PathBuf>,
    /// Every name gone since the previous round, counting those inside removed directories.
    deleted_names: u64,
    /// The last directory removed (or replaced), and whether the names under it count as
    /// deleted (not for a replaced one, whose removal is not a deletion of its name): the
    /// catalog's names under it go with it.
    gone_dir: Option<(PathBuf, bool)>,
}

impl<I: Iterator<Item = Result<Entry, ManifestError>>> Differ<I> {
    /// A comparison with the previous round's catalog `old`; `dirty` and `dirty_deletes` are
    /// what that round carried in segments that were not verified (failed, or left stale).
    pub fn new(old: I, dirty: HashSet<PathBuf>, dirty_deletes: HashSet<PathBuf>) -> Self {
        Differ {
            old: old.peekable(),
            dirty,
            dirty_deletes,
            deleted: Vec::new(),
            deleted_names: 0,
            gone_dir: None,
        }
    }

    /// Takes the catalog's names before `path` in walk order: they are gone.
    fn gone_before(&mut self, path: &Path) -> Result<(), ManifestError> {
        while let Some(next) = self.old.peek() {
            match next {
                Err(_) => return Err(self.old.next().expect("peeked").unwrap_err()),
                Ok(e) if e.path.as_path() < path => {
                    let e = self.old.next().expect("peeked")?;
                    self.gone(e);
                }
                Ok(_) => break,
            }
        }
        Ok(())
    }

    fn gone(&mut self, e: Entry) {
        if let Some((d, counts)) = &self.gone_dir {
            if e.path.starts_with(d) {
                self.deleted_names += u64::from(*counts);
                return;
            }
        }
        self.deleted_names += 1;
        if e.kind == EntryKind::Dir {
            self.gone_dir = Some((e.path.clone(), true));
        }
        self.deleted.push(e.path);
    }

    /// The catalog's entry at exactly `path`, if any (everything before it is gone).
    fn take(&mut self, path: &Path) -> Result<Option<Entry>, ManifestError> {
        self.gone_before(path)?;
        match self.old.peek() {
            Some(Ok(e)) if e.path == path => Ok(Some(self.old.next().expect("peeked")?)),
            _ => Ok(None),
        }
    }

    /// What this round does with `new`, the next name its scan found.
    pub fn entry(&mut self, new: &Entry) -> Result<Change, ManifestError> {
        self.dirty_deletes.remove(&new.path);
        let old = self.take(&new.path)?;
        let dirty = self.dirty.remove(&new.path);
        Ok(match old {
            None => Change::Send(new.clone()),
            Some(old) if old.kind != new.kind => {
                if old.kind == EntryKind::Dir {
                    // The replacement removes the directory with all it held.
                    self.gone_dir = Some((old.path, false));
                }
                Change::Replace(new.clone())
            }
            Some(_) if dirty => Change::Resend(new.clone()),
            Some(old) if old == *new => Change::Same,
            Some(_) => Change::Send(new.clone()),
        })
    }

    /// The scan could not read `path` this round (an issue it reports): what the target has
    /// there and below stays as it is.
    pub fn unreadable(&mut self, path: &Path) -> Result<(), ManifestError> {
        self.dirty_deletes.remove(path);
        self.gone_before(path)?;
        while let Some(Ok(e)) = self.old.peek() {
            if !e.path.starts_with(path) {
                break;
            }
            self.old.next();
        }
        Ok(())
    }

    /// Ends the comparison: the names gone since the previous round (the topmost of each
    /// removed directory, in walk order) and how many names that is in all (those inside a
    /// directory that a name of another kind replaced are not counted: that removal is sent
    /// with the replacement).
    pub fn finish(mut self) -> Result<(Vec<PathBuf>, u64), ManifestError> {
        while let Some(e) = self.old.next() {
            let e = e?;
            self.gone(e);
        }
        let mut again: Vec<PathBuf> = self.dirty_deletes.into_iter().collect();
        again.retain(|p| !self.deleted.iter().any(|d| p.starts_with(d)));
        self.deleted_names += again.len() as u64;
        self.deleted.extend(again);
        self.deleted.sort();
        Ok((self.deleted, self.deleted_names))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(p: &str, size: u64, mtime: i64) -> Entry {
        Entry::file(p, size, 0o644, (mtime, 0), 1).changed_at((mtime, 0))
    }

    fn dir(p: &str) -> Entry {
        Entry::dir(p, 0o755, (1, 0))
    }

    fn differ(old: Vec<Entry>) -> Differ<std::vec::IntoIter<Result<Entry, ManifestError>>> {
        let old: Vec<_> = old.into_iter().map(Ok).collect();
        Differ::new(old.into_iter(), HashSet::new(), HashSet::new())
    }

    #[test]
    fn walk_order_is_paths_order() {
        // A directory comes before its contents, and its contents before its next sibling,
        // even when the sibling's name sorts between (b'.' < b'/').
        let mut v = vec![
            PathBuf::from("a.x"),
            PathBuf::from("a/b"),
            PathBuf::from("a"),
            PathBuf::from("a/b/c"),
            PathBuf::from("ab"),
        ];
        v.sort();
        assert_eq!(
            v,
            ["a", "a/b", "a/b/c", "a.x", "ab"]
                .map(PathBuf::from)
                .to_vec()
        );
    }

    #[test]
    fn unchanged_names_are_skipped_changed_and_new_sent_and_removed_ones_deleted() {
        let old = vec![
            dir("d"),
            file("d/gone", 1, 1),
            file("d/keep", 1, 1),
            file("d/touched", 1, 1),
            dir("old"),
            file("old/x", 1, 1),
            file("old/y", 1, 1),
            file("z", 1, 1),
        ];
        let mut d = differ(old);
        assert_eq!(d.entry(&dir("d")).unwrap(), Change::Same);
        assert_eq!(d.entry(&file("d/keep", 1, 1)).unwrap(), Change::Same);
        let touched = file("d/touched", 1, 2);
        assert_eq!(d.entry(&touched).unwrap(), Change::Send(touched.clone()));
        let new = file("new", 3, 1);
        assert_eq!(d.entry(&new).unwrap(), Change::Send(new.clone()));
        // A chmod shows in the mode and the ctime; a content change with the mtime set back
        // shows in the ctime.
        let set_back = file("z", 1, 1).changed_at((9, 0));
        assert_eq!(d.entry(&set_back).unwrap(), Change::Send(set_back.clone()));
        let (deleted, names) = d.finish().unwrap();
        assert_eq!(
            deleted,
            ["d/gone", "old"].map(PathBuf::from).to_vec(),
            "only the topmost name of a removed directory"
        );
        assert_eq!(names, 4, "every name removed counts toward the cap");
    }

    #[test]
    fn a_changed_kind_replaces_and_takes_the_old_directorys_contents_with_it() {
        let old = vec![
            dir("a"),
            file("a/in", 1, 1),
            file("b", 1, 1),
            file("c", 1, 1),
        ];
        let mut d = differ(old);
        let a = file("a", 5, 2);
        assert_eq!(d.entry(&a).unwrap(), Change::Replace(a.clone()));
        let b = dir("b");
        assert_eq!(d.entry(&b).unwrap(), Change::Replace(b.clone()));
        assert_eq!(d.entry(&file("c", 1, 1)).unwrap(), Change::Same);
        assert_eq!(d.finish().unwrap(), (vec![], 0));
    }

    #[test]
    fn names_not_verified_last_round_are_sent_and_deleted_again() {
        let old = vec![file("a", 1, 1), file("b", 1, 1)];
        let old: Vec<_> = old.into_iter().map(Ok).collect();
        let mut d = Differ::new(
            old.into_iter(),
            HashSet::from([PathBuf::from("a")]),
            HashSet::from([PathBuf::from("gone"), PathBuf::from("back")]),
        );
        assert_eq!(
            d.entry(&file("a", 1, 1)).unwrap(),
            Change::Resend(file("a", 1, 1))
        );
        assert_eq!(d.entry(&file("b", 1, 1)).unwrap(), Change::Same);
        let back = file("back", 1, 1);
        assert_eq!(d.entry(&back).unwrap(), Change::Send(back.clone()));
        let (deleted, names) = d.finish().unwrap();
        assert_eq!(deleted, vec![PathBuf::from("gone")]);
        assert_eq!(names, 1);
    }

    #[test]
    fn what_cannot_be_read_this_round_is_left_alone() {
        let old = vec![dir("locked"), file("locked/a", 1, 1), file("m", 1, 1)];
        let mut d = differ(old);
        d.unreadable(Path::new("locked")).unwrap();
        assert_eq!(d.entry(&file("m", 1, 1)).unwrap(), Change::Same);
        assert_eq!(d.finish().unwrap(), (vec![], 0));
    }

    #[test]
    fn a_catalog_reads_back_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("catalog");
        let mut w = CatalogWriter::create(&p).unwrap();
        let entries = vec![
            Entry::dir("d", 0o750, (1, 2)).changed_at((3, 4)),
            file("d/f", 10, 5),
            Entry::symlink("l", "d/f", (6, 7)),
            Entry::hardlink("h", "d/f", 10, (5, 0)),
        ];
        for e in &entries {
            w.append(e).unwrap();
        }
        w.finish().unwrap();
        let back: Vec<Entry> = CatalogReader::open(&p)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(back, entries);
    }
}
