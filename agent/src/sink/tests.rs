//! The sink against a real temporary directory.

use std::os::unix::fs::MetadataExt;

use super::*;

fn file(path: &str, data: &[u8]) -> Entry {
    Entry::file(path, data.len() as u64, 0o640, (1_600_000_000, 123), 0)
}

fn write_segment(sink: &FsSink, id: u64, items: &[(Entry, &[u8])]) -> Result<[u8; 32], SinkError> {
    let mut w = sink.begin("", id)?;
    for (e, data) in items {
        w.start_entry(e)?;
        for c in data.chunks(3) {
            w.write(c)?;
        }
    }
    let h = w.finish()?;
    w.commit()?;
    Ok(h)
}

#[test]
fn whole_files_land_with_mode_mtime_and_hash() {
    let dir = tempfile::tempdir().unwrap();
    let sink = FsSink::new(dir.path()).unwrap();
    let h = write_segment(
        &sink,
        0,
        &[
            (Entry::dir("d", 0o750, (5, 0)), b""),
            (file("d/a.txt", b"hello"), b"hello"),
            (file("d/empty", b""), b""),
            (Entry::symlink("d/link", "a.txt", (7, 0)), b""),
        ],
    )
    .unwrap();
    assert_eq!(h, *blake3::hash(b"hello").as_bytes());
    let a = dir.path().join("d/a.txt");
    assert_eq!(fs::read(&a).unwrap(), b"hello");
    let m = fs::metadata(&a).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o640);
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_600_000_000, 123));
    assert_eq!(
        fs::read_link(dir.path().join("d/link")).unwrap(),
        PathBuf::from("a.txt")
    );
    assert_eq!(fs::metadata(dir.path().join("d/empty")).unwrap().len(), 0);
    assert_eq!(
        fs::metadata(dir.path().join("d")).unwrap().mode() & 0o7777,
        0o750
    );
    // No temporary files are left.
    let names: Vec<_> = fs::read_dir(dir.path().join("d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

#[test]
fn split_file_is_visible_only_when_every_piece_landed() {
    let dir = tempfile::tempdir().unwrap();
    let sink = FsSink::new(dir.path()).unwrap();
    let data: Vec<u8> = (0..250u32).map(|i| i as u8).collect();
    let piece = |i: u32| {
        let mut e = Entry::file("big.bin", 250, 0o600, (9, 9), 0);
        e.offset = i as u64 * 100;
        e.len = (250 - e.offset).min(100);
        e.chunk_index = i;
        e.chunk_count = 3;
        e
    };
    let dest = dir.path().join("big.bin");
    for i in [2u32, 0] {
        let e = piece(i);
        let bytes = &data[e.offset as usize..(e.offset + e.len) as usize];
        write_segment(&sink, i as u64, &[(e.clone(), bytes)]).unwrap();
        assert!(!dest.exists(), "visible before all pieces");
    }
    // Recorded pieces survive a restart of the sink (the sidecar is on disk).
    drop(sink);
    let sink = FsSink::new(dir.path()).unwrap();
    let e = piece(1);
    write_segment(&sink, 1, &[(e, &data[100..200])]).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), data);
    assert_eq!(fs::metadata(&dest).unwrap().mode() & 0o7777, 0o600);
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        1,
        "sidecar and part removed"
    );
}

#[test]
fn uncommitted_segment_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sink = FsSink::new(dir.path()).unwrap();
    {
        let mut w = sink.begin("", 3).unwrap();
        w.start_entry(&file("x", b"abc")).unwrap();
        w.write(b"abc").unwrap();
        w.finish().unwrap();
        // dropped without commit: the hash check failed, say
    }
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn hostile_paths_write_nothing_outside_the_root() {
    let outer = tempfile::tempdir().unwrap();
    let root = outer.path().join("root");
    fs::create_dir(&root).unwrap();
    let sink = FsSink::new(&root).unwrap();
    for bad in ["../escape", "/etc/x", "a/../../escape", "a//b", ""] {
        let err = write_segment(&sink, 0, &[(file(bad, b"x"), b"x")]).unwrap_err();
        assert!(matches!(err, SinkError::Path(_)), "{bad}: {err}");
    }
    // A symlink planted inside the root that points outside it is not followed.
    std::os::unix::fs::symlink(outer.path(), root.join("link")).unwrap();
    let err = write_segment(&sink, 0, &[(file("link/escape", b"x"), b"x")]).unwrap_err();
    assert!(matches!(err, SinkError::Escape { .. }), "{err}");
    // The target path of a migration is checked the same way.
    assert!(sink.begin("../up", 0).is_err());
    let left: Vec<_> = fs::read_dir(outer.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("root")]);
}

#[test]
fn lying_lengths_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sink = FsSink::new(dir.path()).unwrap();
    let mut w = sink.begin("", 0).unwrap();
    w.start_entry(&file("x", b"abc")).unwrap();
    assert!(w.write(b"abcd").is_err());
    let mut w = sink.begin("", 0).unwrap();
    w.start_entry(&file("y", b"abc")).unwrap();
    w.write(b"ab").unwrap();
    assert!(w.finish().is_err(), "short file accepted");
}

#[test]
fn unusable_roots_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("plain-file");
    fs::write(&f, b"").unwrap();
    let err = FsSink::new(&f).err().unwrap().to_string();
    assert!(err.contains("not usable"), "{err}");
    let err = FsSink::new(&f.join("below")).err().unwrap().to_string();
    assert!(err.contains("cannot create"), "{err}");
}
