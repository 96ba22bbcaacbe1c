//! Conversions between the data-plane protobuf types and the domain types of [`crate::segment`].
//! The only place that knows both.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use ferry_proto::data as pb;

use ferry_common::path::{bytes, escape};

use crate::segment::{Entry, EntryKind};

impl From<&Entry> for pb::Entry {
    fn from(e: &Entry) -> Self {
        pb::Entry {
            kind: match e.kind {
                EntryKind::File => pb::EntryKind::File,
                EntryKind::Dir => pb::EntryKind::Dir,
                EntryKind::Symlink => pb::EntryKind::Symlink,
                EntryKind::Hardlink => pb::EntryKind::Hardlink,
                EntryKind::Delete => pb::EntryKind::Delete,
            } as i32,
            path: bytes(&e.path).to_vec(),
            mode: e.mode,
            mtime_sec: e.mtime_sec,
            mtime_nsec: e.mtime_nsec,
            file_size: e.file_size,
            offset: e.offset,
            len: e.len,
            chunk_index: e.chunk_index,
            chunk_count: e.chunk_count,
            link_target: bytes(&e.link_target).to_vec(),
            uid: e.uid,
            gid: e.gid,
            sparse: e.data_runs.is_some(),
            data_runs: e
                .data_runs
                .iter()
                .flatten()
                .flat_map(|&(o, l)| [o, l])
                .collect(),
            xattrs: e
                .xattrs
                .iter()
                .map(|(name, value)| pb::Xattr {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            delta: e.delta_base.is_some(),
            base_size: e.delta_base.map_or(0, |b| b.0),
            base_mtime_sec: e.delta_base.map_or(0, |b| b.1),
            base_mtime_nsec: e.delta_base.map_or(0, |b| b.2),
        }
    }
}

/// A data-plane entry that cannot describe anything.
#[derive(Debug, thiserror::Error)]
#[error("entry \"{path}\" is malformed: {reason}")]
pub struct MalformedEntry {
    /// The entry's path, escaped.
    pub path: String,
    /// What is wrong (an unknown kind, an odd number of data-run bounds).
    pub reason: String,
}

impl TryFrom<pb::Entry> for Entry {
    type Error = MalformedEntry;

    fn try_from(e: pb::Entry) -> Result<Self, MalformedEntry> {
        let kind = match pb::EntryKind::try_from(e.kind) {
            Ok(pb::EntryKind::File) => EntryKind::File,
            Ok(pb::EntryKind::Dir) => EntryKind::Dir,
            Ok(pb::EntryKind::Symlink) => EntryKind::Symlink,
            Ok(pb::EntryKind::Hardlink) => EntryKind::Hardlink,
            Ok(pb::EntryKind::Delete) => EntryKind::Delete,
            _ => {
                return Err(MalformedEntry {
                    path: escape(&e.path),
                    reason: format!("unknown kind {}", e.kind),
                })
            }
        };
        if !e.data_runs.len().is_multiple_of(2) {
            return Err(MalformedEntry {
                path: escape(&e.path),
                reason: "data runs must come in (offset, len) pairs".into(),
            });
        }
        if !crate::segment::mtime_is_valid(e.mtime_sec, e.mtime_nsec)
            || (e.delta && !crate::segment::mtime_is_valid(e.base_mtime_sec, e.base_mtime_nsec))
        {
            return Err(MalformedEntry {
                path: escape(&e.path),
                reason: format!(
                    "modification time {}.{} s is no time a file can have",
                    e.mtime_sec, e.mtime_nsec
                ),
            });
        }
        let data_runs = e
            .sparse
            .then(|| e.data_runs.chunks(2).map(|p| (p[0], p[1])).collect());
        Ok(Entry {
            kind,
            path: path_of(e.path),
            mode: e.mode,
            mtime_sec: e.mtime_sec,
            mtime_nsec: e.mtime_nsec,
            file_size: e.file_size,
            offset: e.offset,
            len: e.len,
            chunk_index: e.chunk_index,
            chunk_count: e.chunk_count,
            link_target: path_of(e.link_target),
            inode: 0,
            ctime: (0, 0),
            uid: e.uid,
            gid: e.gid,
            data_runs,
            xattrs: e.xattrs.into_iter().map(|x| (x.name, x.value)).collect(),
            delta_base: e
                .delta
                .then_some((e.base_size, e.base_mtime_sec, e.base_mtime_nsec)),
        })
    }
}

fn path_of(b: Vec<u8>) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let e = Entry::symlink("a/b", "../c", (5, 6));
        let back = Entry::try_from(pb::Entry::from(&e)).unwrap();
        assert_eq!(back, e);
        let latin1 = Entry::symlink(
            OsStr::from_bytes(b"latin1-\xe9"),
            OsStr::from_bytes(b"\xff"),
            (5, 6),
        );
        let back = Entry::try_from(pb::Entry::from(&latin1)).unwrap();
        assert_eq!(back, latin1);
        let mut sparse = Entry::file("s", 100, 0o600, (1, 2), 0).owned_by(7, 8);
        sparse.xattrs = vec![(b"user.a".to_vec(), vec![0, 1, 255])];
        sparse.data_runs = Some(vec![(10, 5), (90, 10)]);
        let back = Entry::try_from(pb::Entry::from(&sparse)).unwrap();
        assert_eq!(back, sparse);
        let empty_sparse = Entry {
            data_runs: Some(vec![]),
            ..sparse
        };
        let back = Entry::try_from(pb::Entry::from(&empty_sparse)).unwrap();
        assert_eq!(back, empty_sparse, "an all-hole piece stays sparse");
        let link = Entry::hardlink("b", "a", 5, (1, 2));
        assert_eq!(Entry::try_from(pb::Entry::from(&link)).unwrap(), link);
        let bad = pb::Entry {
            kind: 99,
            ..Default::default()
        };
        assert!(Entry::try_from(bad).is_err());
        let odd = pb::Entry {
            kind: pb::EntryKind::File as i32,
            sparse: true,
            data_runs: vec![1, 2, 3],
            ..Default::default()
        };
        assert!(Entry::try_from(odd).is_err());
    }

    /// Found by the `sink_segments` fuzz target: a time no clock can hold (`i64::MIN`
    /// seconds, a nanosecond count of a second or more) made the target panic when it set the
    /// file's mtime. Refused where it enters, as a malformed entry.
    #[test]
    fn a_time_no_clock_can_hold_is_refused_where_it_enters() {
        let file = |mtime_sec, mtime_nsec| pb::Entry {
            kind: pb::EntryKind::File as i32,
            path: b"f".to_vec(),
            mtime_sec,
            mtime_nsec,
            ..Default::default()
        };
        for (sec, nsec) in [(i64::MIN, 0), (i64::MAX, 999_999_999), (0, 1_000_000_000)] {
            let e = Entry::try_from(file(sec, nsec));
            assert!(e.is_err(), "{sec}.{nsec} taken: {e:?}");
        }
        let delta = pb::Entry {
            delta: true,
            base_mtime_nsec: u32::MAX,
            ..file(1, 0)
        };
        assert!(Entry::try_from(delta).is_err());
        for (sec, nsec) in [
            (-1, 999_999_999),
            (-86_400 * 365 * 100, 0),
            (1_700_000_000, 5),
        ] {
            assert!(Entry::try_from(file(sec, nsec)).is_ok(), "{sec}.{nsec}");
        }
    }
}
