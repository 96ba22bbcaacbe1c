//! What a tree holds, before anything moves (`ferry-agent assess PATH`): bytes, files,
//! directories, a size histogram, the largest files, the small-file share, hardlinks, sparse
//! files, names that are not UTF-8, what cannot be copied, and how much changed lately (by
//! mtime). The tree is walked by the migration's own walk ([`crate::scan::walk`]), so the figures
//! are what a migration of it would move; memory stays bounded (one directory listing per
//! level, the largest files in a fixed-size heap, hardlinked inodes only).
//!
//! [`Assessor`] is the pure part: it folds what the walk found, with the current time an
//! argument.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::scan::{RootError, Walked};
use crate::segment::{Entry, EntryKind};
use ferry_common::exclude::Excludes;

/// Upper bounds of the size histogram's buckets (a file of exactly a bound falls in the next);
/// the last bucket has none.
pub const BUCKETS: [u64; 7] = [1, 4 << 10, 64 << 10, 1 << 20, 16 << 20, 256 << 20, 4 << 30];

/// A file is small below this size (the files bundles carry many of per segment).
pub const SMALL: u64 = 64 << 10;

/// How many of the largest files are listed.
pub const LARGEST: usize = 10;

/// How many of the paths that cannot be copied are listed.
pub const ISSUES_LISTED: usize = 20;

/// The windows the change rate is given for: the last hour, day and week.
pub const WINDOWS: [(&str, i64); 3] = [("hour", 3600), ("day", 86_400), ("week", 604_800)];

/// One bucket of the size histogram.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Files below this size (`None`: the last bucket, no bound).
    pub below: Option<u64>,
    /// Files.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Files whose mtime is within a window before the assessment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changed {
    /// `hour`, `day` or `week`.
    pub within: String,
    /// Files.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// What a tree holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assessment {
    /// Regular files (each inode once: further names are hardlinks).
    pub files: u64,
    /// Their bytes (file sizes, holes included).
    pub bytes: u64,
    /// Directories (the root not counted).
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Further names of files already counted (their bytes travel once).
    pub hardlinks: u64,
    /// Files smaller than [`SMALL`].
    pub small_files: u64,
    /// Their bytes.
    pub small_bytes: u64,
    /// Files with holes (fewer blocks allocated than their size).
    pub sparse_files: u64,
    /// Bytes in those holes (they do not cross the wire).
    pub hole_bytes: u64,
    /// Names that are not UTF-8 (ferry moves them as bytes).
    pub non_utf8_names: u64,
    /// Excluded names (by the excludes given).
    pub excluded: u64,
    /// Paths that cannot be copied (unreadable, sockets, devices, ...).
    pub issues: u64,
    /// The first [`ISSUES_LISTED`] of them, with the reason.
    pub issue_examples: Vec<(String, String)>,
    /// The size histogram (see [`BUCKETS`]).
    pub histogram: Vec<Bucket>,
    /// The largest files, largest first: `(path, size)`.
    pub largest: Vec<(String, u64)>,
    /// Files changed lately (mtime within the last hour, day, week).
    pub changed: Vec<Changed>,
}

/// Folds what a walk finds into an [`Assessment`].
#[derive(Debug)]
pub struct Assessor {
    now: i64,
    a: Assessment,
    largest: BinaryHeap<Reverse<(u64, String)>>,
}

impl Assessor {
    /// An empty assessment at `now` (Unix seconds; the change windows end there).
    pub fn new(now: i64) -> Self {
        let histogram = BUCKETS
            .iter()
            .map(|b| Bucket {
                below: Some(*b),
                ..Bucket::default()
            })
            .chain([Bucket::default()])
            .collect();
        let changed = WINDOWS
            .iter()
            .map(|(w, _)| Changed {
                within: (*w).to_string(),
                ..Changed::default()
            })
            .collect();
        Assessor {
            now,
            a: Assessment {
                histogram,
                changed,
                ..Assessment::default()
            },
            largest: BinaryHeap::new(),
        }
    }

    /// Adds what the walk found; `allocated` is a regular file's allocated bytes (`st_blocks`
    /// × 512), when known.
    pub fn add(&mut self, w: &Walked, allocated: Option<u64>) {
        let a = &mut self.a;
        match w {
            Walked::Excluded => a.excluded += 1,
            Walked::Issue { path, reason, at } => {
                a.issues += 1;
                if std::str::from_utf8(at.as_os_str().as_bytes()).is_err() {
                    a.non_utf8_names += 1;
                }
                if a.issue_examples.len() < ISSUES_LISTED {
                    a.issue_examples.push((path.clone(), reason.clone()));
                }
            }
            Walked::Entry(e) => {
                if std::str::from_utf8(e.path.as_os_str().as_bytes()).is_err() {
                    a.non_utf8_names += 1;
                }
                match e.kind {
                    EntryKind::Dir => a.dirs += 1,
                    EntryKind::Symlink => a.symlinks += 1,
                    EntryKind::Hardlink => a.hardlinks += 1,
                    EntryKind::Delete => {}
                    EntryKind::File => self.file(e, allocated),
                }
            }
        }
    }

    fn file(&mut self, e: &Entry, allocated: Option<u64>) {
        let a = &mut self.a;
        let size = e.file_size;
        a.files += 1;
        a.bytes += size;
        if size < SMALL {
            a.small_files += 1;
            a.small_bytes += size;
        }
        if let Some(alloc) = allocated {
            if alloc < size {
                a.sparse_files += 1;
                a.hole_bytes += size - alloc;
            }
        }
        let b = BUCKETS
            .iter()
            .position(|&bound| size < bound)
            .unwrap_or(BUCKETS.len());
        a.histogram[b].files += 1;
        a.histogram[b].bytes += size;
        let age = self.now.saturating_sub(e.mtime_sec);
        for (i, (_, secs)) in WINDOWS.iter().enumerate() {
            if age < *secs {
                a.changed[i].files += 1;
                a.changed[i].bytes += size;
            }
        }
        let smallest_kept = self.largest.peek().map(|Reverse((s, _))| *s);
        if self.largest.len() < LARGEST || smallest_kept.is_some_and(|s| size > s) {
            self.largest
                .push(Reverse((size, ferry_common::path::display(&e.path))));
            if self.largest.len() > LARGEST {
                self.largest.pop();
            }
        }
    }

    /// The assessment so far.
    pub fn snapshot(&self) -> Assessment {
        let mut a = self.a.clone();
        let mut largest: Vec<(u64, String)> =
            self.largest.iter().map(|Reverse(x)| x.clone()).collect();
        largest.sort_by(|x, y| y.0.cmp(&x.0).then_with(|| x.1.cmp(&y.1)));
        a.largest = largest.into_iter().map(|(s, p)| (p, s)).collect();
        a
    }
}

/// Why an assessment has no result.
#[derive(Debug, thiserror::Error)]
pub enum AssessError {
    /// A path cannot be walked at all.
    #[error(transparent)]
    Root(#[from] RootError),
    /// It was stopped (the agent shuts down).
    #[error("the assessment was stopped before it ended (the agent shuts down)")]
    Stopped,
}

/// Walks `root` (minus `excludes`) and assesses it at `now`, calling `progress` with the
/// assessment so far every `every` items. Paths in it are relative to `root`.
pub fn assess(
    root: &Path,
    excludes: &Excludes,
    now: i64,
    every: u64,
    mut progress: impl FnMut(&Assessment),
) -> Result<Assessment, AssessError> {
    let mut assessor = Assessor::new(now);
    walk_into(&mut assessor, root, false, excludes, every, &mut |a| {
        progress(a);
        true
    })?;
    Ok(assessor.snapshot())
}

/// Assesses several `roots` as one (what a job of `ferryctl assess` asks), with the paths it
/// names absolute. `keep_going` sees the assessment so far every `every` items and stops the
/// walk by returning false.
pub fn assess_roots(
    roots: &[PathBuf],
    excludes: &Excludes,
    now: i64,
    every: u64,
    mut keep_going: impl FnMut(&Assessment) -> bool,
) -> Result<Assessment, AssessError> {
    let mut assessor = Assessor::new(now);
    for root in roots {
        walk_into(&mut assessor, root, true, excludes, every, &mut keep_going)?;
    }
    Ok(assessor.snapshot())
}

fn walk_into(
    assessor: &mut Assessor,
    root: &Path,
    absolute: bool,
    excludes: &Excludes,
    every: u64,
    keep_going: &mut dyn FnMut(&Assessment) -> bool,
) -> Result<(), AssessError> {
    let mut seen = 0u64;
    crate::scan::walk(root, excludes, |mut w| {
        let allocated = match &w {
            Walked::Entry(e) if e.kind == EntryKind::File => {
                std::fs::symlink_metadata(root.join(&e.path))
                    .ok()
                    .map(|m| m.blocks() * 512)
            }
            _ => None,
        };
        if absolute {
            match &mut w {
                Walked::Entry(e) => e.path = root.join(&e.path),
                Walked::Issue { path, at, .. } => {
                    *at = root.join(&*at);
                    *path = ferry_common::path::display(at);
                }
                Walked::Excluded => {}
            }
        }
        assessor.add(&w, allocated);
        seen += 1;
        if every > 0 && seen.is_multiple_of(every) && !keep_going(&assessor.snapshot()) {
            return Err(AssessError::Stopped);
        }
        Ok(())
    })?
}

/// The assessment as `ferry-agent assess` prints it.
pub fn table(a: &Assessment) -> String {
    use std::fmt::Write;
    let size = |n: u64| ferry_common::text::bytes(n as f64);
    let pct = |part: u64, whole: u64| {
        if whole == 0 {
            0.0
        } else {
            100.0 * part as f64 / whole as f64
        }
    };
    // The buckets' bounds are powers of two: say them so.
    let bound = |n: u64| match n {
        0 => "0".to_string(),
        n if n >= 1 << 30 => format!("{} GiB", n >> 30),
        n if n >= 1 << 20 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    };
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{} in {} files, {} directories, {} symlinks",
        size(a.bytes),
        a.files,
        a.dirs,
        a.symlinks
    );
    let _ = writeln!(
        o,
        "small files (< {}): {} ({:.1} % of files, {:.1} % of bytes)",
        bound(SMALL),
        a.small_files,
        pct(a.small_files, a.files),
        pct(a.small_bytes, a.bytes)
    );
    let _ = writeln!(
        o,
        "hardlinks: {} further names; sparse files: {} ({} in holes); names not UTF-8: {}; excluded: {}",
        a.hardlinks,
        a.sparse_files,
        size(a.hole_bytes),
        a.non_utf8_names,
        a.excluded
    );
    let _ = writeln!(o, "\nSIZE                 FILES        BYTES");
    let mut from = 0;
    for b in &a.histogram {
        let range = match b.below {
            Some(1) => "empty".to_string(),
            Some(to) if from <= 1 => format!("1 B – {}", bound(to)),
            Some(to) => format!("{} – {}", bound(from), bound(to)),
            None => format!("{} and more", bound(from)),
        };
        let _ = writeln!(o, "{range:<18} {:>8} {:>12}", b.files, size(b.bytes));
        from = b.below.unwrap_or(from);
    }
    let _ = writeln!(o, "\nCHANGED IN THE LAST   FILES        BYTES");
    for c in &a.changed {
        let _ = writeln!(o, "{:<20} {:>6} {:>12}", c.within, c.files, size(c.bytes));
    }
    if !a.largest.is_empty() {
        let _ = writeln!(o, "\nLARGEST FILES");
        for (p, s) in &a.largest {
            let _ = writeln!(o, "{:>12}  {p}", size(*s));
        }
    }
    if a.issues > 0 {
        let _ = writeln!(o, "\n{} path(s) cannot be copied:", a.issues);
        for (p, why) in &a.issue_examples {
            let _ = writeln!(o, "  {p}: {why}");
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::path::PathBuf;

    /// An independent count of the tree (std only, no ferry code): regular files by inode,
    /// their sizes, further names, directories, symlinks, allocated bytes.
    #[derive(Debug, Default)]
    struct Count {
        files: u64,
        bytes: u64,
        dirs: u64,
        symlinks: u64,
        hardlinks: u64,
        sparse: u64,
        holes: u64,
        others: u64,
        non_utf8: u64,
        recent_day: u64,
    }

    fn count(dir: &Path, now: i64, c: &mut Count, inodes: &mut std::collections::HashSet<u64>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            if std::str::from_utf8(e.file_name().as_bytes()).is_err() {
                c.non_utf8 += 1;
            }
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                c.dirs += 1;
                count(&e.path(), now, c, inodes);
            } else if m.file_type().is_symlink() {
                c.symlinks += 1;
            } else if m.is_file() {
                if !inodes.insert(m.ino()) {
                    c.hardlinks += 1;
                    continue;
                }
                c.files += 1;
                c.bytes += m.len();
                if m.blocks() * 512 < m.len() {
                    c.sparse += 1;
                    c.holes += m.len() - m.blocks() * 512;
                }
                if now - m.mtime() < 86_400 {
                    c.recent_day += 1;
                }
            } else {
                c.others += 1;
            }
        }
    }

    #[test]
    fn the_totals_are_those_of_an_independent_walk() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        let now = 1_800_000_000;
        let mut sizes = Vec::new();
        for i in 0..40u64 {
            let p = r.join(format!("d{}/f{i}", i % 4));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            let size = i * i * 997;
            std::fs::write(&p, vec![7u8; size as usize]).unwrap();
            // Every fifth file changed within the day, the others a month ago.
            let age = if i % 5 == 0 { 3_000 } else { 30 * 86_400 };
            filetime::set_file_mtime(&p, filetime::FileTime::from_unix_time(now - age, 0)).unwrap();
            sizes.push(size);
        }
        std::fs::hard_link(r.join("d1/f1"), r.join("d2/again")).unwrap();
        std::fs::hard_link(r.join("d1/f1"), r.join("again2")).unwrap();
        std::os::unix::fs::symlink("d1/f1", r.join("link")).unwrap();
        // A sparse file: 64 MiB with one 4 KiB block written in the middle.
        let sparse = std::fs::File::create(r.join("sparse.img")).unwrap();
        sparse.set_len(64 << 20).unwrap();
        std::os::unix::fs::FileExt::write_at(&sparse, &[1u8; 4096], 32 << 20).unwrap();
        drop(sparse);
        let odd = PathBuf::from(OsStr::from_bytes(b"caf\xe9.txt"));
        std::fs::write(r.join(&odd), b"latin-1 name").unwrap();
        // Something that cannot be copied.
        let fifo = r.join("pipe");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());

        let mut c = Count::default();
        count(r, now, &mut c, &mut Default::default());
        let mut reports = 0;
        let a = assess(r, &Excludes::new(&[]).unwrap(), now, 10, |_| reports += 1).unwrap();
        assert_eq!(a.files, c.files);
        assert_eq!(a.bytes, c.bytes);
        assert_eq!(a.dirs, c.dirs);
        assert_eq!(a.symlinks, c.symlinks);
        assert_eq!((a.hardlinks, c.hardlinks), (2, 2));
        assert_eq!(a.sparse_files, c.sparse);
        assert!(a.sparse_files >= 1, "the sparse file has holes: {a:?}");
        assert_eq!(a.hole_bytes, c.holes);
        assert_eq!((a.non_utf8_names, c.non_utf8), (1, 1));
        assert_eq!((a.issues, c.others), (1, 1));
        assert!(a.issue_examples[0].1.contains("named pipe"), "{a:?}");
        assert_eq!(a.changed[1].files, c.recent_day);
        assert!(reports >= 4, "progress every 10 items");
        // The histogram adds up, and puts each file in its bucket.
        assert_eq!(a.histogram.iter().map(|b| b.files).sum::<u64>(), a.files);
        assert_eq!(a.histogram.iter().map(|b| b.bytes).sum::<u64>(), a.bytes);
        assert_eq!(a.histogram[0].files, 1, "one empty file (f0)");
        // The largest: the sparse file, then f39, f38, ...
        assert_eq!(a.largest.len(), LARGEST);
        assert_eq!(a.largest[0], ("sparse.img".to_string(), 64 << 20));
        assert_eq!(a.largest[1], ("d3/f39".to_string(), 39 * 39 * 997));
        let small = sizes.iter().filter(|s| **s < SMALL).count() as u64 + 1; // + café
        assert_eq!(a.small_files, small);
        let text = table(&a);
        assert!(text.contains("names not UTF-8: 1"), "{text}");
        assert!(
            text.contains("pipe: unsupported file type: named pipe"),
            "{text}"
        );
    }

    #[test]
    fn the_largest_files_stay_a_bounded_list() {
        let mut s = Assessor::new(0);
        for i in 0..1000u64 {
            let e = Entry::file(format!("f{i}"), (i * 7919) % 1000, 0o644, (0, 0), i);
            s.add(&Walked::Entry(e), None);
        }
        let a = s.snapshot();
        assert_eq!(a.largest.len(), LARGEST);
        assert_eq!(a.largest[0].1, 999);
        assert!(a.largest.windows(2).all(|w| w[0].1 >= w[1].1));
        assert_eq!(s.largest.len(), LARGEST);
    }
}
