//! Conversions between the data-plane protobuf types and the domain types of [`crate::segment`].
//! The only place that knows both.

use ferry_proto::data as pb;

use crate::segment::{Entry, EntryKind};

impl From<&Entry> for pb::Entry {
    fn from(e: &Entry) -> Self {
        pb::Entry {
            kind: match e.kind {
                EntryKind::File => pb::EntryKind::File,
                EntryKind::Dir => pb::EntryKind::Dir,
                EntryKind::Symlink => pb::EntryKind::Symlink,
            } as i32,
            path: e.path.clone(),
            mode: e.mode,
            mtime_sec: e.mtime_sec,
            mtime_nsec: e.mtime_nsec,
            file_size: e.file_size,
            offset: e.offset,
            len: e.len,
            chunk_index: e.chunk_index,
            chunk_count: e.chunk_count,
            link_target: e.link_target.clone(),
        }
    }
}

/// A data-plane entry that cannot describe anything (unknown kind).
#[derive(Debug, thiserror::Error)]
#[error("entry {path:?} has unknown kind {kind}")]
pub struct UnknownKind {
    /// The entry's path.
    pub path: String,
    /// The kind number received.
    pub kind: i32,
}

impl TryFrom<pb::Entry> for Entry {
    type Error = UnknownKind;

    fn try_from(e: pb::Entry) -> Result<Self, UnknownKind> {
        let kind = match pb::EntryKind::try_from(e.kind) {
            Ok(pb::EntryKind::File) => EntryKind::File,
            Ok(pb::EntryKind::Dir) => EntryKind::Dir,
            Ok(pb::EntryKind::Symlink) => EntryKind::Symlink,
            _ => {
                return Err(UnknownKind {
                    path: e.path,
                    kind: e.kind,
                })
            }
        };
        Ok(Entry {
            kind,
            path: e.path,
            mode: e.mode,
            mtime_sec: e.mtime_sec,
            mtime_nsec: e.mtime_nsec,
            file_size: e.file_size,
            offset: e.offset,
            len: e.len,
            chunk_index: e.chunk_index,
            chunk_count: e.chunk_count,
            link_target: e.link_target,
            inode: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let e = Entry::symlink("a/b", "../c", (5, 6));
        let back = Entry::try_from(pb::Entry::from(&e)).unwrap();
        assert_eq!(back, e);
        let bad = pb::Entry {
            kind: 99,
            ..Default::default()
        };
        assert!(Entry::try_from(bad).is_err());
    }
}
