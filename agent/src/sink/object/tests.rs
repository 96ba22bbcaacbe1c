//! The object sink against `object_store`'s own in-memory store (the integration tests run it
//! against a real S3 server).

use super::*;
use crate::sink::{SegmentWrite, Sink};
use object_store::memory::InMemory;

const MIB: u64 = 1024 * 1024;

struct Rig {
    rt: tokio::runtime::Runtime,
    store: Arc<InMemory>,
    state: tempfile::TempDir,
}

impl Rig {
    fn new() -> Self {
        Rig {
            rt: tokio::runtime::Runtime::new().unwrap(),
            store: Arc::new(InMemory::new()),
            state: tempfile::tempdir().unwrap(),
        }
    }

    /// A sink over the rig's store and state directory: a new one is a restarted agent.
    fn sink(&self) -> ObjectSink {
        ObjectSink::new(
            self.store.clone(),
            Key::from("bucket-prefix"),
            self.state.path(),
            self.rt.handle().clone(),
        )
        .unwrap()
    }

    fn get(&self, key: &str) -> Option<(Vec<u8>, Attributes)> {
        let key = Key::parse(format!("bucket-prefix/{key}")).unwrap();
        self.rt.block_on(async {
            let r = self.store.get(&key).await.ok()?;
            let attrs = r.attributes.clone();
            Some((r.bytes().await.ok()?.to_vec(), attrs))
        })
    }

    fn keys(&self) -> Vec<String> {
        self.rt.block_on(async {
            let mut k: Vec<String> = self
                .store
                .list(None)
                .map_ok(|m| m.location.to_string())
                .try_collect()
                .await
                .unwrap();
            k.sort();
            k
        })
    }
}

fn meta(a: &Attributes, k: &'static str) -> Option<String> {
    a.get(&Attribute::Metadata(k.into()))
        .map(|v| v.as_ref().to_string())
}

/// Writes `items` as one segment (in pieces of 7 bytes, as a stream would) and commits it.
fn put(sink: &ObjectSink, items: &[(Entry, &[u8])]) -> Result<[u8; 32], SinkError> {
    let mut w = sink.begin("t", "c/m1", 1, 1)?;
    for (e, data) in items {
        w.start_entry(e)?;
        for c in data.chunks(7 * 1024) {
            w.write(c)?;
        }
    }
    let h = w.finish()?;
    w.commit()?;
    Ok(h)
}

fn file(path: &str, data: &[u8]) -> Entry {
    Entry::file(path, data.len() as u64, 0o640, (1_600_000_000, 5), 0).owned_by(7, 8)
}

/// Piece `i` of a file of `data`, cut in pieces of `piece` bytes.
fn piece(path: &str, data: &[u8], piece: u64, i: u32) -> (Entry, Vec<u8>) {
    let size = data.len() as u64;
    let off = u64::from(i) * piece;
    let len = piece.min(size - off);
    let e = Entry {
        offset: off,
        len,
        chunk_index: i,
        chunk_count: size.div_ceil(piece) as u32,
        ..file(path, data)
    };
    (e, data[off as usize..(off + len) as usize].to_vec())
}

fn pattern(n: u64, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn parts_of_pieces_are_contiguous_large_enough_and_within_the_stores_limit() {
    for (size, piece) in [
        (64 * MIB * 3 + 123, 64 * MIB),
        (20 * MIB, 8 * MIB),
        (17 * MIB, 5 * MIB),
        (300 * 1024 * MIB, 64 * MIB),
        (64 * MIB, 64 * MIB),
        (640 * 1024 * MIB, 256 * MIB),
    ] {
        let pieces = size.div_ceil(piece) as u32;
        let mut next = 0;
        let mut covered = 0;
        for i in 0..pieces {
            let parts = piece_parts(size, piece, i).unwrap();
            let mut off = 0;
            for (idx, at, len) in parts {
                assert_eq!((idx, at), (next, off), "{size} {piece} piece {i}");
                let last = u64::from(i) * piece + at + len == size;
                assert!(
                    last || len >= MIN_PART,
                    "{size} {piece}: part of {len} bytes"
                );
                next += 1;
                off += len;
            }
            covered += off;
        }
        assert_eq!(covered, size);
        assert!(next as u64 <= MAX_PARTS, "{size} {piece}: {next} parts");
    }
    let e = piece_parts(20 * MIB, MIB, 0).unwrap_err();
    assert!(e.contains("--segment-size"), "{e}");
    let e = piece_parts(1024 * 1024 * MIB, 5 * MIB, 0).unwrap_err();
    assert!(e.contains("more than the store's 10000"), "{e}");
}

#[test]
fn small_files_symlinks_and_sparse_files_become_objects_with_their_metadata() {
    let rig = Rig::new();
    let sink = rig.sink();
    let sparse = Entry {
        data_runs: Some(vec![(10, 3), (20, 2)]),
        ..file("holes", &[0; 30])
    };
    let link = Entry::symlink("d/link", "../a b/caf\u{e9}", (1_600_000_000, 0));
    put(
        &sink,
        &[
            (Entry::dir("d", 0o755, (1, 0)), b""),
            (file("d/a.txt", b"hello"), b"hello"),
            (file("empty", b""), b""),
            (sparse, b"abcde"),
            (link, b""),
        ],
    )
    .unwrap();
    let (data, a) = rig.get("t/d/a.txt").unwrap();
    assert_eq!(data, b"hello");
    assert_eq!(
        meta(&a, "ferry-blake3").unwrap(),
        hex(blake3::hash(b"hello").as_bytes())
    );
    assert_eq!(meta(&a, "ferry-mtime").unwrap(), "1600000000.000000005");
    assert_eq!(meta(&a, "ferry-mode").unwrap(), "640");
    assert_eq!(meta(&a, "ferry-owner").unwrap(), "7:8");
    assert_eq!(rig.get("t/empty").unwrap().0, b"");
    let mut want = vec![0u8; 30];
    want[10..13].copy_from_slice(b"abc");
    want[20..22].copy_from_slice(b"de");
    assert_eq!(rig.get("t/holes").unwrap().0, want);
    let (data, a) = rig.get("t/d/link").unwrap();
    assert!(data.is_empty());
    assert_eq!(meta(&a, "ferry-symlink").unwrap(), "../a%20b/caf%C3%A9");
    // Directories are implicit: no object of their own.
    assert_eq!(
        rig.keys(),
        [
            "bucket-prefix/t/d/a.txt",
            "bucket-prefix/t/d/link",
            "bucket-prefix/t/empty",
            "bucket-prefix/t/holes"
        ]
    );
    assert_eq!(sink.counters.puts.load(Ordering::Relaxed), 4);
}

#[test]
fn nothing_is_visible_before_the_commit_and_a_dropped_segment_leaves_nothing() {
    let rig = Rig::new();
    let sink = rig.sink();
    let big = pattern(PART_BYTES * 2 + 5, 1);
    let mut w = sink.begin("t", "c/m1", 1, 1).unwrap();
    for (e, d) in [
        (file("small", b"abc"), &b"abc"[..]),
        (file("big", &big), &big[..]),
    ] {
        w.start_entry(&e).unwrap();
        for c in d.chunks(64 * 1024) {
            w.write(c).unwrap();
        }
    }
    let h = w.finish().unwrap();
    let mut all = b"abc".to_vec();
    all.extend_from_slice(&big);
    assert_eq!(h, *blake3::hash(&all).as_bytes());
    assert!(
        rig.keys().is_empty(),
        "visible before commit: {:?}",
        rig.keys()
    );
    drop(w);
    assert!(rig.keys().is_empty());
    // The same committed: both there, the large one through a multipart upload.
    put(
        &sink,
        &[(file("small", b"abc"), b"abc"), (file("big", &big), &big)],
    )
    .unwrap();
    assert_eq!(rig.get("t/big").unwrap().0, big);
    assert_eq!(rig.get("t/small").unwrap().0, b"abc");
    assert_eq!(sink.counters.uploads_completed.load(Ordering::Relaxed), 1);
}

#[test]
fn a_split_file_resumes_after_a_restart_without_uploading_its_durable_pieces_again() {
    let rig = Rig::new();
    let step = 8 * MIB;
    let data = pattern(step * 3 + 1000, 9);
    let (e2, d2) = piece("model.bin", &data, step, 2);
    let (e0, d0) = piece("model.bin", &data, step, 0);
    let first = rig.sink();
    // Pieces arrive in any order; the file is not visible until every one is durable.
    put(&first, &[(e2, &d2)]).unwrap();
    put(&first, &[(e0, &d0)]).unwrap();
    assert!(rig.get("t/model.bin").is_none());
    let parts_before = first.counters.parts.load(Ordering::Relaxed);
    assert_eq!(first.counters.uploads_created.load(Ordering::Relaxed), 1);
    drop(first);
    // A restarted agent: the same upload, only the missing pieces' parts.
    let second = rig.sink();
    let (e1, d1) = piece("model.bin", &data, step, 1);
    let (e3, d3) = piece("model.bin", &data, step, 3);
    put(&second, &[(e3, &d3)]).unwrap();
    put(&second, &[(e1, &d1)]).unwrap();
    let (got, a) = rig.get("t/model.bin").unwrap();
    assert!(got == data, "the assembled object differs");
    assert_eq!(meta(&a, "ferry-mtime").unwrap(), "1600000000.000000005");
    let c = &second.counters;
    assert_eq!(
        c.uploads_created.load(Ordering::Relaxed),
        0,
        "the upload was reused"
    );
    assert_eq!(c.uploads_completed.load(Ordering::Relaxed), 1);
    assert_eq!(
        c.parts.load(Ordering::Relaxed),
        2,
        "one part for each missing piece"
    );
    assert_eq!(parts_before, 2);
    // A piece sent again after the file is complete is compared, never written.
    let (e1, d1) = piece("model.bin", &data, step, 1);
    put(&second, &[(e1.clone(), &d1)]).unwrap();
    let mut other = d1.clone();
    other[5] ^= 1;
    let e = put(&second, &[(e1, &other)]).unwrap_err();
    assert!(matches!(e, SinkError::ResentDiffers { .. }), "{e}");
    assert_eq!(rig.get("t/model.bin").unwrap().0, data);
    assert_eq!(c.parts.load(Ordering::Relaxed), 2);
}

#[test]
fn a_new_version_of_a_split_file_starts_a_new_upload() {
    let rig = Rig::new();
    let sink = rig.sink();
    let step = 8 * MIB;
    let old = pattern(step + 10, 1);
    put(
        &sink,
        &[piece("f", &old, step, 0)].map(|(e, d)| (e, d.leak() as &[u8])),
    )
    .unwrap();
    let new = pattern(step + 10, 2);
    let bump_mtime = |(e, d): (Entry, Vec<u8>)| {
        (
            Entry {
                mtime_sec: e.mtime_sec + 1,
                ..e
            },
            d,
        )
    };
    let (a, da) = bump_mtime(piece("f", &new, step, 0));
    let (b, db) = bump_mtime(piece("f", &new, step, 1));
    put(&sink, &[(a, &da)]).unwrap();
    put(&sink, &[(b, &db)]).unwrap();
    assert_eq!(rig.get("t/f").unwrap().0, new);
    assert_eq!(sink.counters.uploads_created.load(Ordering::Relaxed), 2);
}

#[test]
fn hardlinks_are_copies_deletions_remove_what_lies_below_and_bad_entries_are_refused() {
    let rig = Rig::new();
    let sink = rig.sink();
    let link = Entry::hardlink("d/second", "first", 3, (1_600_000_000, 5));
    let e = put(&sink, &[(link.clone(), b"")]).unwrap_err();
    assert!(matches!(e, SinkError::LinkPending { .. }), "{e}");
    put(&sink, &[(file("first", b"abc"), b"abc"), (link, b"")]).unwrap();
    assert_eq!(rig.get("t/d/second").unwrap().0, b"abc");
    put(&sink, &[(file("d/x/y", b"1"), b"1")]).unwrap();
    put(&sink, &[(Entry::delete("d"), b"")]).unwrap();
    assert_eq!(rig.keys(), ["bucket-prefix/t/first"]);

    let mut w = sink.begin("t", "c/m1", 1, 1).unwrap();
    let latin1 = std::path::Path::new("ok")
        .join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"caf\xe9"));
    let e = w
        .start_entry(&Entry {
            path: latin1,
            ..file("x", b"")
        })
        .unwrap_err();
    assert!(e.to_string().contains("not UTF-8"), "{e}");
    let e = w.start_entry(&file("../up", b"")).unwrap_err();
    assert!(matches!(e, SinkError::Path(_)), "{e}");
    let e = w
        .start_entry(&Entry {
            xattrs: vec![(b"user.a".to_vec(), b"1".to_vec())],
            ..file("x", b"")
        })
        .unwrap_err();
    assert!(e.to_string().contains("without --xattrs"), "{e}");
    let e = w
        .start_entry(&Entry {
            delta_base: Some((3, 1, 0)),
            ..file("x", b"abc")
        })
        .unwrap_err();
    assert!(matches!(e, SinkError::BaseGone { .. }), "{e}");
}

/// Small files wait in memory for their segment's commit only within the sink's budget, over
/// every segment it is writing at once; past it they wait in a spill file, and every object
/// lands whole at its commit. A segment dropped before its commit gives its share back.
#[test]
fn small_files_past_the_memory_budget_wait_in_a_spill_file_and_land_whole() {
    let rig = Rig::new();
    let sink = rig.sink().with_memory_budget(1000);
    let files: Vec<(Entry, Vec<u8>)> = (0..10u8)
        .map(|i| (file(&format!("f{i}"), &[i; 300]), vec![i; 300]))
        .collect();
    // Another segment holds 300 bytes of the budget meanwhile, then is dropped.
    let mut other = sink.begin("t", "c/m1", 2, 2).unwrap();
    other.start_entry(&file("other", &[9; 300])).unwrap();
    other.write(&[9; 300]).unwrap();
    other.finish().unwrap();
    assert_eq!(sink.held(), 300);

    let mut w = sink.begin("t", "c/m1", 1, 1).unwrap();
    for (e, data) in &files {
        w.start_entry(e).unwrap();
        w.write(data).unwrap();
    }
    w.finish().unwrap();
    // 700 bytes were left: two files held, eight spilled; nothing visible before the commit.
    assert_eq!(sink.held(), 900);
    assert_eq!(sink.counters.spilled.load(Ordering::Relaxed), 8 * 300);
    assert!(rig.keys().is_empty());
    assert!(
        std::fs::read_dir(rig.state.path().join("object-spill"))
            .unwrap()
            .next()
            .is_none(),
        "spill files are unlinked at creation"
    );
    w.commit().unwrap();
    assert_eq!(
        sink.held(),
        300,
        "the committed segment gave its share back"
    );
    for (e, data) in &files {
        let (got, _) = rig.get(&format!("t/{}", e.path.display())).unwrap();
        assert_eq!(&got, data, "{}", e.path.display());
    }
    drop(other);
    assert_eq!(sink.held(), 0, "and so did the dropped one");
    assert!(rig.get("t/other").is_none());
}
