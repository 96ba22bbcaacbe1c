//! The segment model: how a scanned tree becomes segments. Pure: the scanner feeds items in, the
//! planner hands finished segments out.
//!
//! A file of at least `segment_size` bytes is split into `ceil(size / segment_size)` chunk segments
//! of its own. Smaller files, empty files, directories and symlinks are packed in scan order into
//! bundle segments of at most [`BUNDLE_BYTES`] (or `segment_size`, if smaller) and
//! [`BUNDLE_ENTRIES`] entries: a tree of small files becomes enough segments to keep every
//! transfer slot of a source busy (a 555 MB tree of 50,000 files is ~70 bundles, not 9), while
//! each bundle still amortises its round trips and its one durability barrier over many files.
//! A file between [`BUNDLE_BYTES`] and `segment_size` travels alone in its bundle.

use std::path::{Path, PathBuf};

/// What kind of thing an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file (or a piece of one).
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// A further name of a regular file whose content travels under another name (a hardlink):
    /// `link_target` is that other name, relative to the root. Carries no bytes.
    Hardlink,
    /// A name removed at the source since the previous round (sync rounds): the target removes
    /// what is there, a directory with everything in it. Carries no bytes.
    Delete,
}

/// One item of a segment, as the source scanned it. `path` is relative, '/'-separated, and may be
/// any bytes (names that are not UTF-8 are kept as they are).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Kind of item.
    pub kind: EntryKind,
    /// Relative path (validated with [`ferry_common::path::validate_relative`]).
    pub path: PathBuf,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds.
    pub mtime_nsec: u32,
    /// Files: total size.
    pub file_size: u64,
    /// Files: offset of this piece.
    pub offset: u64,
    /// Files: bytes of this piece carried by the segment.
    pub len: u64,
    /// Files: index of this piece.
    pub chunk_index: u32,
    /// Files: number of pieces (1 for a whole file).
    pub chunk_count: u32,
    /// Symlinks: where the link points.
    pub link_target: PathBuf,
    /// Inode at scan time (0 for non-files); the source uses it to notice replaced files.
    pub inode: u64,
    /// Status change time at scan time (`(0, 0)` where not known): with the inode, size and
    /// mtime, how a sync round tells a changed file (also one whose mtime was set back, or
    /// whose attributes changed). Never sent.
    pub ctime: (i64, u32),
    /// Numeric owner, applied when the target agent runs as root.
    pub uid: u32,
    /// Numeric group, applied when the target agent runs as root.
    pub gid: u32,
    /// Files: where this piece's data lies, as `(offset, len)` runs inside `offset..offset+len`
    /// in increasing order, when the file is sparse; `None` for a dense piece. Only the runs'
    /// bytes cross the wire and are hashed; the rest are holes at both ends.
    pub data_runs: Option<Vec<(u64, u64)>>,
    /// Extended attributes `(name, value)`, when the migration carries them (read at send
    /// time, never kept in the manifest).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Pieces of a file a sync round sends as a delta: the version the target holds (size,
    /// mtime), which the new one is built on. `data_runs` are then the changed bytes, and the
    /// rest of the piece is the old version's.
    pub delta_base: Option<(u64, i64, u32)>,
}

/// Farthest a modification time may lie from 1970, in seconds (~146 billion years): any time
/// a file system holds, and far from where turning it into a clock time overflows.
pub const MAX_MTIME_SECS: i64 = 1 << 62;

/// Whether `(sec, nsec)` is a time a file can have: nanoseconds below one second, seconds
/// within [`MAX_MTIME_SECS`] of 1970.
pub fn mtime_is_valid(sec: i64, nsec: u32) -> bool {
    nsec < 1_000_000_000 && (-MAX_MTIME_SECS..=MAX_MTIME_SECS).contains(&sec)
}

impl Entry {
    /// A directory entry.
    pub fn dir(path: impl AsRef<Path>, mode: u32, mtime: (i64, u32)) -> Self {
        Entry::base(EntryKind::Dir, path, mode, mtime)
    }

    /// A symlink entry.
    pub fn symlink(path: impl AsRef<Path>, target: impl AsRef<Path>, mtime: (i64, u32)) -> Self {
        Entry {
            link_target: target.as_ref().to_path_buf(),
            ..Entry::base(EntryKind::Symlink, path, 0o777, mtime)
        }
    }

    /// A further name (`path`) of the file carried as `first` (a hardlink). `file_size` and
    /// `mtime` are the file's, so the target can check it links to the right file.
    pub fn hardlink(
        path: impl AsRef<Path>,
        first: impl AsRef<Path>,
        file_size: u64,
        mtime: (i64, u32),
    ) -> Self {
        Entry {
            link_target: first.as_ref().to_path_buf(),
            file_size,
            ..Entry::base(EntryKind::Hardlink, path, 0, mtime)
        }
    }

    /// A deletion of `path` at the target.
    pub fn delete(path: impl AsRef<Path>) -> Self {
        Entry::base(EntryKind::Delete, path, 0, (0, 0))
    }

    /// The same entry with status change time `ctime`.
    pub fn changed_at(self, ctime: (i64, u32)) -> Self {
        Entry { ctime, ..self }
    }

    /// The same entry owned by `uid`:`gid`.
    pub fn owned_by(self, uid: u32, gid: u32) -> Self {
        Entry { uid, gid, ..self }
    }

    /// Bytes of this entry that cross the wire: the data runs of a sparse piece, else `len`.
    pub fn wire_len(&self) -> u64 {
        match &self.data_runs {
            Some(runs) => runs.iter().map(|r| r.1).fold(0, u64::saturating_add),
            None => self.len,
        }
    }

    /// A whole-file entry (before the planner decides whether to split it).
    pub fn file(
        path: impl AsRef<Path>,
        size: u64,
        mode: u32,
        mtime: (i64, u32),
        inode: u64,
    ) -> Self {
        Entry {
            file_size: size,
            len: size,
            chunk_count: 1,
            inode,
            ..Entry::base(EntryKind::File, path, mode, mtime)
        }
    }

    fn base(kind: EntryKind, path: impl AsRef<Path>, mode: u32, mtime: (i64, u32)) -> Self {
        Entry {
            kind,
            path: path.as_ref().to_path_buf(),
            mode,
            mtime_sec: mtime.0,
            mtime_nsec: mtime.1,
            file_size: 0,
            offset: 0,
            len: 0,
            chunk_index: 0,
            chunk_count: 0,
            link_target: PathBuf::new(),
            inode: 0,
            ctime: (0, 0),
            uid: 0,
            gid: 0,
            data_runs: None,
            xattrs: Vec::new(),
            delta_base: None,
        }
    }
}

/// A segment as planned by the source: its id and the entries whose bytes it carries, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedSegment {
    /// Id, dense from 0 within a migration, in scan order.
    pub id: u64,
    /// Entries, in the order their bytes are streamed.
    pub entries: Vec<Entry>,
}

impl PlannedSegment {
    /// Bytes of file data the segment carries.
    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.len).sum()
    }

    /// Which piece of a file split into several this segment is, and of how many; `(0, 0)` for
    /// a bundle or a file that fits one segment.
    pub fn piece(&self) -> (u32, u32) {
        match self.entries.as_slice() {
            [e] if e.kind == EntryKind::File && e.chunk_count > 1 => (e.chunk_index, e.chunk_count),
            _ => (0, 0),
        }
    }

    /// Number of whole files (or first pieces of split files) the segment accounts for, so that
    /// summing over segments counts every file once.
    pub fn files(&self) -> u32 {
        self.entries
            .iter()
            .filter(|e| !matches!(e.kind, EntryKind::Dir | EntryKind::Delete) && e.chunk_index == 0)
            .count() as u32
    }
}

pub use ferry_common::MAX_BUNDLE_ENTRIES;
/// Bytes at which a bundle is closed (when the segment size is larger).
pub const BUNDLE_BYTES: u64 = 8 * 1024 * 1024;
/// Entries at which a bundle is closed (at most [`MAX_BUNDLE_ENTRIES`], what a target accepts).
pub const BUNDLE_ENTRIES: usize = 1024;
const _: () = assert!(BUNDLE_ENTRIES <= MAX_BUNDLE_ENTRIES);
/// Most header bytes in one bundle (estimated per entry as its path and link lengths plus 64),
/// so that long paths cannot push a header past the receiver's frame limit (4 MiB).
pub const MAX_BUNDLE_HEADER_BYTES: usize = 2 * 1024 * 1024;

fn header_cost(e: &Entry) -> usize {
    // Extended attributes are added at send time, within their own budget (the agent's
    // `xattr::MAX_PER_SEGMENT`), so they are not counted here.
    e.path.as_os_str().len() + e.link_target.as_os_str().len() + 64
}

/// Turns a stream of scanned entries into segments.
#[derive(Debug)]
pub struct SegmentPlanner {
    segment_size: u64,
    next_id: u64,
    bundle: Vec<Entry>,
    bundle_bytes: u64,
    bundle_header: usize,
}

impl SegmentPlanner {
    /// A planner cutting segments of `segment_size` bytes (at least 1), with ids from 0.
    pub fn new(segment_size: u64) -> Self {
        Self::starting_at(segment_size, 0)
    }

    /// A planner whose first segment is `first_id` (a sync round's segments follow the previous
    /// round's).
    pub fn starting_at(segment_size: u64, first_id: u64) -> Self {
        SegmentPlanner {
            segment_size: segment_size.max(1),
            next_id: first_id,
            bundle: Vec::new(),
            bundle_bytes: 0,
            bundle_header: 0,
        }
    }

    /// Adds one scanned entry; returns the segments it completed (possibly none).
    pub fn push(&mut self, entry: Entry) -> Vec<PlannedSegment> {
        let mut out = Vec::new();
        if entry.kind == EntryKind::File && entry.file_size >= self.segment_size {
            let size = entry.file_size;
            let count = size.div_ceil(self.segment_size);
            for i in 0..count {
                let offset = i * self.segment_size;
                let piece = Entry {
                    offset,
                    len: (size - offset).min(self.segment_size),
                    chunk_index: i as u32,
                    chunk_count: count as u32,
                    ..entry.clone()
                };
                out.push(self.cut(vec![piece]));
            }
            return out;
        }
        if self.bundle_bytes + entry.len > self.segment_size.min(BUNDLE_BYTES)
            || self.bundle.len() >= BUNDLE_ENTRIES
            || self.bundle_header + header_cost(&entry) > MAX_BUNDLE_HEADER_BYTES
        {
            if let Some(s) = self.flush() {
                out.push(s);
            }
        }
        self.bundle_bytes += entry.len;
        self.bundle_header += header_cost(&entry);
        self.bundle.push(entry);
        out
    }

    /// Ends the scan: returns the last, partly filled bundle, if any.
    pub fn finish(&mut self) -> Option<PlannedSegment> {
        self.flush()
    }

    fn flush(&mut self) -> Option<PlannedSegment> {
        if self.bundle.is_empty() {
            return None;
        }
        self.bundle_bytes = 0;
        self.bundle_header = 0;
        let entries = std::mem::take(&mut self.bundle);
        Some(self.cut(entries))
    }

    fn cut(&mut self, entries: Vec<Entry>) -> PlannedSegment {
        let id = self.next_id;
        self.next_id += 1;
        PlannedSegment { id, entries }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(p: &str, size: u64) -> Entry {
        Entry::file(p, size, 0o644, (1, 0), 7)
    }

    fn plan(size: u64, entries: Vec<Entry>) -> Vec<PlannedSegment> {
        let mut p = SegmentPlanner::new(size);
        let mut out: Vec<_> = entries.into_iter().flat_map(|e| p.push(e)).collect();
        out.extend(p.finish());
        out
    }

    #[test]
    fn large_files_split_into_chunks_covering_every_byte() {
        let segs = plan(100, vec![file("big", 250)]);
        assert_eq!(segs.len(), 3);
        let pieces: Vec<_> = segs
            .iter()
            .map(|s| (s.entries[0].offset, s.entries[0].len))
            .collect();
        assert_eq!(pieces, vec![(0, 100), (100, 100), (200, 50)]);
        assert!(segs.iter().all(|s| s.entries[0].chunk_count == 3));
        assert_eq!(segs.iter().map(|s| s.files()).sum::<u32>(), 1);
        assert_eq!(segs.iter().map(|s| s.id).collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    #[test]
    fn exact_multiple_has_no_empty_tail() {
        let segs = plan(100, vec![file("big", 200)]);
        assert_eq!(segs.len(), 2);
        assert!(segs.iter().all(|s| s.bytes() == 100));
    }

    #[test]
    fn small_files_bundle_up_to_the_segment_size() {
        let entries = vec![
            Entry::dir("d", 0o755, (1, 0)),
            file("d/a", 40),
            file("d/b", 40),
            file("d/c", 40),
            file("d/empty", 0),
            Entry::symlink("d/l", "a", (1, 0)),
        ];
        let segs = plan(100, entries);
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[0].bytes(), 80);
        assert_eq!(segs[1].bytes(), 40);
        assert_eq!(segs[0].entries.len(), 3);
        assert_eq!(segs.iter().map(|s| s.files()).sum::<u32>(), 5);
        assert!(segs.iter().all(|s| s.bytes() <= 100));
    }

    #[test]
    fn bundles_are_capped_by_entry_count() {
        let entries: Vec<_> = (0..BUNDLE_ENTRIES + 1)
            .map(|i| file(&format!("f{i}"), 0))
            .collect();
        let segs = plan(100, entries);
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[0].entries.len(), BUNDLE_ENTRIES);
    }

    #[test]
    fn a_tree_of_small_files_is_cut_into_enough_bundles_to_send_in_parallel() {
        // /usr/share here: 50,000 files, 555 MB, at the default segment size.
        let tree: Vec<_> = (0..50_000)
            .map(|i| file(&format!("f{i}"), 11_100))
            .collect();
        let segs = plan(ferry_common::DEFAULT_SEGMENT_SIZE, tree);
        assert!(segs.len() >= 66, "{} bundles", segs.len());
        assert!(segs.iter().all(|s| s.bytes() <= BUNDLE_BYTES));
        // A file between the bundle size and the segment size travels whole, alone.
        let segs = plan(
            ferry_common::DEFAULT_SEGMENT_SIZE,
            vec![file("a", 10), file("mid", 20 << 20), file("b", 10)],
        );
        assert_eq!(segs.len(), 3);
        assert_eq!(segs[1].entries.len(), 1);
        assert_eq!(segs[1].bytes(), 20 << 20);
    }

    #[test]
    fn bundles_are_capped_by_header_bytes() {
        let long = "p/".repeat(1000) + "f";
        let entries: Vec<_> = (0..2000).map(|i| file(&format!("{long}{i}"), 0)).collect();
        let segs = plan(100, entries);
        assert!(segs.len() > 1);
        for s in &segs {
            let cost: usize = s.entries.iter().map(header_cost).sum();
            assert!(cost <= MAX_BUNDLE_HEADER_BYTES);
        }
    }

    #[test]
    fn big_file_between_small_ones_keeps_order_of_ids() {
        let segs = plan(100, vec![file("a", 10), file("big", 150), file("b", 10)]);
        // The big file's chunks are cut immediately; the open bundle keeps collecting.
        assert_eq!(segs.len(), 3);
        assert_eq!(segs[0].entries[0].path, Path::new("big"));
        assert_eq!(
            segs[2]
                .entries
                .iter()
                .map(|e| e.path.as_path())
                .collect::<Vec<_>>(),
            vec![Path::new("a"), Path::new("b")]
        );
    }
}
