//! A hostile source with a valid certificate, as the target's file-system sink sees it:
//! segments of arbitrary entries (any kind, any path bytes, `..`, absolute, NUL, overlong names,
//! symlinks out of the root and files "inside" them, lying sizes, pieces and data runs,
//! deletions, hardlinks, extended attributes), streams cut short, segments committed or dropped.
//!
//! The root holds a symlink to a directory outside it (relative and absolute) from the start,
//! and a segment can plant more. Whatever happens, nothing outside the root (and the sink's
//! state directory) is created, changed or removed, and nothing panics.
#![no_main]

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};

use arbitrary::Arbitrary;
use ferry_agent::segment::Entry;
use ferry_agent::sink::{FsSink, Sink};
use ferry_proto::data as pb;
use libfuzzer_sys::fuzz_target;

/// Names a hostile peer would try, beside raw bytes.
const KNOWN: &[&[u8]] = &[
    b"a",
    b"b",
    b"out",
    b"abs",
    b"inside",
    b"f",
    b"..",
    b".",
    b"",
    b".ferry-part-1",
    b"outside",
    b"canary",
    b"a\0b",
    b"state",
];

#[derive(Arbitrary, Debug)]
enum Comp {
    Known(u8),
    Long(u16),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct PathSpec {
    absolute: bool,
    comps: Vec<Comp>,
    trailing_slash: bool,
}

impl PathSpec {
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.absolute {
            out.push(b'/');
        }
        for (i, c) in self.comps.iter().take(8).enumerate() {
            if i > 0 {
                out.push(b'/');
            }
            match c {
                Comp::Known(k) => out.extend_from_slice(KNOWN[*k as usize % KNOWN.len()]),
                Comp::Long(n) => out.extend(std::iter::repeat_n(b'x', *n as usize % 5000)),
                Comp::Raw(b) => out.extend_from_slice(b),
            }
        }
        if self.trailing_slash {
            out.push(b'/');
        }
        out
    }
}

#[derive(Arbitrary, Debug)]
enum Size {
    Small(u16),
    Any(u64),
}

impl Size {
    fn get(&self) -> u64 {
        match self {
            Size::Small(n) => u64::from(*n),
            Size::Any(n) => *n,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct FuzzEntry {
    kind: i32,
    path: PathSpec,
    link_target: PathSpec,
    mode: u32,
    mtime: (i64, u32),
    file_size: Size,
    offset: Size,
    len: Size,
    chunk_index: u32,
    chunk_count: u32,
    uid: u16,
    gid: u16,
    data_runs: Option<Vec<Size>>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    delta: Option<(Size, i64, u32)>,
}

impl FuzzEntry {
    /// As it crosses the wire, so the target's own conversion runs.
    fn wire(&self) -> pb::Entry {
        let runs = self.data_runs.as_ref();
        pb::Entry {
            kind: self.kind % 6,
            path: self.path.bytes(),
            mode: self.mode,
            mtime_sec: self.mtime.0,
            mtime_nsec: self.mtime.1,
            file_size: self.file_size.get(),
            offset: self.offset.get(),
            len: self.len.get(),
            chunk_index: self.chunk_index % 4,
            chunk_count: self.chunk_count % 5,
            link_target: self.link_target.bytes(),
            uid: u32::from(self.uid),
            gid: u32::from(self.gid),
            sparse: runs.is_some(),
            data_runs: runs.into_iter().flatten().map(Size::get).collect(),
            xattrs: self
                .xattrs
                .iter()
                .take(4)
                .map(|(name, value)| pb::Xattr {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            delta: self.delta.is_some(),
            base_size: self.delta.as_ref().map_or(0, |d| d.0.get()),
            base_mtime_sec: self.delta.as_ref().map_or(0, |d| d.1),
            base_mtime_nsec: self.delta.as_ref().map_or(0, |d| d.2),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Segment {
    target_path: PathSpec,
    id: u8,
    epoch: u8,
    entries: Vec<FuzzEntry>,
    data: Vec<u8>,
    commit: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    segments: Vec<Segment>,
}

/// Everything below `base` but the root and the state directory: type, bytes or link target,
/// mode, owner and mtime.
fn outside_snapshot(base: &Path) -> BTreeMap<PathBuf, String> {
    let mut seen = BTreeMap::new();
    let mut todo = vec![base.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).expect("readable") {
            let p = e.expect("entry").path();
            if p == base.join("root") || p == base.join("state") {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).expect("stat");
            let what = if m.file_type().is_symlink() {
                format!("link {:?}", std::fs::read_link(&p).expect("link"))
            } else if m.is_dir() {
                todo.push(p.clone());
                "dir".to_string()
            } else {
                format!("file {:?}", std::fs::read(&p).expect("read"))
            };
            seen.insert(
                p,
                format!(
                    "{what} mode {:o} owner {}:{} mtime {}.{}",
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    m.mtime(),
                    m.mtime_nsec()
                ),
            );
        }
    }
    seen
}

fn run(input: &Input) {
    let base = tempfile::tempdir().expect("a temporary directory");
    let b = base.path();
    let root = b.join("root");
    std::fs::create_dir_all(root.join("inside")).unwrap();
    std::fs::write(root.join("inside/f"), b"inside").unwrap();
    std::fs::create_dir_all(b.join("outside/dir")).unwrap();
    std::fs::write(b.join("outside/canary"), b"canary").unwrap();
    symlink("../outside", root.join("out")).unwrap();
    symlink(b.join("outside"), root.join("abs")).unwrap();
    symlink("../outside/canary", root.join("canary")).unwrap();
    let before = outside_snapshot(b);

    if let Ok(sink) = FsSink::new(&root, &b.join("state")) {
        for seg in input.segments.iter().take(4) {
            let target_path = String::from_utf8_lossy(&seg.target_path.bytes()).into_owned();
            let Ok(mut w) = sink.begin(
                &target_path,
                "c/m1",
                u64::from(seg.id % 4),
                u64::from(seg.epoch),
            ) else {
                continue;
            };
            let mut data: &[u8] = &seg.data;
            let mut whole = true;
            'entries: for fe in seg.entries.iter().take(16) {
                let Ok(e) = Entry::try_from(fe.wire()) else {
                    whole = false;
                    break;
                };
                if w.start_entry(&e).is_err() {
                    whole = false;
                    break;
                }
                let mut left = e.wire_len();
                while left > 0 {
                    if data.is_empty() {
                        // The stream ends before the entry's bytes did.
                        whole = false;
                        break 'entries;
                    }
                    let n = left.min(data.len() as u64).min(4096) as usize;
                    if w.write(&data[..n]).is_err() {
                        whole = false;
                        break 'entries;
                    }
                    data = &data[n..];
                    left -= n as u64;
                }
            }
            if whole && w.finish().is_ok() && seg.commit {
                let _ = w.commit();
            }
        }
    }

    let after = outside_snapshot(b);
    assert_eq!(
        before,
        after,
        "something outside the target root changed: {:?}",
        root.join("").as_os_str().as_bytes()
    );
}

fuzz_target!(|input: Input| run(&input));
