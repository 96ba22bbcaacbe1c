//! The sink against a real temporary directory.

use std::os::unix::fs::MetadataExt;

use super::*;

struct Fixture {
    dir: tempfile::TempDir,
    state: tempfile::TempDir,
    sink: FsSink,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let sink = FsSink::new(dir.path(), state.path()).unwrap();
        Fixture { dir, state, sink }
    }

    /// A new sink on the same directories, as after a target restart.
    fn restart(self) -> Self {
        let sink = FsSink::new(self.dir.path(), self.state.path()).unwrap();
        Fixture { sink, ..self }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn names(&self, rel: &str) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.path(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

fn file(path: &str, data: &[u8]) -> Entry {
    Entry::file(path, data.len() as u64, 0o640, (1_600_000_000, 123), 0)
}

fn write_segment(sink: &FsSink, id: u64, items: &[(Entry, &[u8])]) -> Result<[u8; 32], SinkError> {
    let mut w = sink.begin("", 1, id, 10 + id)?;
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
    let f = Fixture::new();
    let h = write_segment(
        &f.sink,
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
    let a = f.path("d/a.txt");
    assert_eq!(fs::read(&a).unwrap(), b"hello");
    let m = fs::metadata(&a).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o640);
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_600_000_000, 123));
    assert_eq!(
        fs::read_link(f.path("d/link")).unwrap(),
        PathBuf::from("a.txt")
    );
    assert_eq!(fs::metadata(f.path("d/empty")).unwrap().len(), 0);
    assert_eq!(fs::metadata(f.path("d")).unwrap().mode() & 0o7777, 0o750);
    assert_eq!(
        f.names("d"),
        vec!["a.txt", "empty", "link"],
        "no temporaries left"
    );
}

fn piece(i: u32) -> Entry {
    let mut e = Entry::file("big.bin", 250, 0o600, (9, 9), 0);
    e.offset = i as u64 * 100;
    e.len = (250 - e.offset).min(100);
    e.chunk_index = i;
    e.chunk_count = 3;
    e
}

fn data() -> Vec<u8> {
    (0..250u32).map(|i| i as u8).collect()
}

fn send_piece(sink: &FsSink, i: u32, bytes: &[u8]) -> Result<[u8; 32], SinkError> {
    let e = piece(i);
    write_segment(
        sink,
        i as u64,
        &[(
            e.clone(),
            &bytes[e.offset as usize..(e.offset + e.len) as usize],
        )],
    )
}

#[test]
fn split_file_is_visible_only_when_every_piece_landed() {
    let f = Fixture::new();
    let dest = f.path("big.bin");
    for i in [2u32, 0] {
        send_piece(&f.sink, i, &data()).unwrap();
        assert!(!dest.exists(), "visible before all pieces");
    }
    // Recorded pieces survive a restart of the target (the sidecar is on disk).
    let f = f.restart();
    send_piece(&f.sink, 1, &data()).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), data());
    assert_eq!(fs::metadata(&dest).unwrap().mode() & 0o7777, 0o600);
    assert_eq!(
        f.names(""),
        vec!["big.bin"],
        "part file renamed, no sidecar in the tree"
    );
}

#[test]
fn piece_resent_after_completion_is_written_in_place() {
    let f = Fixture::new();
    for i in 0..3 {
        send_piece(&f.sink, i, &data()).unwrap();
    }
    // The report of piece 1 was lost: it is sent again, after the file was finished.
    send_piece(&f.sink, 1, &data()).unwrap();
    let dest = f.path("big.bin");
    assert_eq!(fs::read(&dest).unwrap(), data());
    assert_eq!(
        fs::metadata(&dest).unwrap().mtime(),
        9,
        "mtime restored after the rewrite"
    );
    assert_eq!(f.names(""), vec!["big.bin"], "no stray part file");
}

#[test]
fn restart_between_completion_mark_and_rename_finishes_the_rename() {
    let f = Fixture::new();
    for i in 0..3 {
        send_piece(&f.sink, i, &data()).unwrap();
    }
    // Put the tree back where a crash right before the rename would have left it.
    let dest = f.path("big.bin");
    fs::rename(&dest, part_name(&dest)).unwrap();
    let f = f.restart();
    send_piece(&f.sink, 2, &data()).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), data());
    assert_eq!(f.names(""), vec!["big.bin"]);
}

#[test]
fn a_lost_part_file_is_reported_not_silently_restarted() {
    let f = Fixture::new();
    send_piece(&f.sink, 0, &data()).unwrap();
    fs::remove_file(part_name(&f.path("big.bin"))).unwrap();
    let err = send_piece(&f.sink, 1, &data()).unwrap_err();
    assert!(matches!(err, SinkError::PartLost { .. }), "{err}");
}

#[test]
fn uncommitted_segment_leaves_nothing() {
    let f = Fixture::new();
    {
        let mut w = f.sink.begin("", 1, 3, 1).unwrap();
        w.start_entry(&file("x", b"abc")).unwrap();
        w.write(b"abc").unwrap();
        w.finish().unwrap();
        // dropped without commit: the hash check failed, say
    }
    assert!(f.names("").is_empty());
}

#[test]
fn hostile_paths_write_nothing_outside_the_root() {
    let outer = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let root = outer.path().join("root");
    fs::create_dir(&root).unwrap();
    let sink = FsSink::new(&root, state.path()).unwrap();
    for bad in ["../escape", "/etc/x", "a/../../escape", "a//b", ""] {
        let err = write_segment(&sink, 0, &[(file(bad, b"x"), b"x")]).unwrap_err();
        assert!(matches!(err, SinkError::Path(_)), "{bad}: {err}");
    }
    // A symlink planted inside the root that points outside it is not followed.
    std::os::unix::fs::symlink(outer.path(), root.join("link")).unwrap();
    let err = write_segment(&sink, 0, &[(file("link/escape", b"x"), b"x")]).unwrap_err();
    assert!(matches!(err, SinkError::Escape { .. }), "{err}");
    // Nor is one planted under the exact name of the next temporary file.
    let victim = outer.path().join("victim");
    fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, root.join(".ferry-0-10-1.tmp")).unwrap();
    write_segment(&sink, 0, &[(file("ok", b"new"), b"new")]).unwrap();
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    assert_eq!(fs::read(root.join("ok")).unwrap(), b"new");
    // Peers cannot name ferry's own files.
    let err = write_segment(&sink, 0, &[(file(".ferry-part-x", b"x"), b"x")]).unwrap_err();
    assert!(matches!(err, SinkError::Reserved(_)), "{err}");
    // The target path of a migration is checked the same way.
    assert!(sink.begin("../up", 1, 0, 1).is_err());
    let mut left: Vec<_> = fs::read_dir(outer.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    left.sort();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("root"), "victim".into()]
    );
}

#[test]
fn setuid_and_setgid_bits_are_dropped() {
    let f = Fixture::new();
    let mut e = file("tool", b"x");
    e.mode = 0o6755;
    write_segment(&f.sink, 0, &[(e, b"x")]).unwrap();
    assert_eq!(fs::metadata(f.path("tool")).unwrap().mode() & 0o7777, 0o755);
}

#[test]
fn lying_lengths_are_refused() {
    let f = Fixture::new();
    let mut w = f.sink.begin("", 1, 0, 1).unwrap();
    w.start_entry(&file("x", b"abc")).unwrap();
    assert!(w.write(b"abcd").is_err());
    let mut w = f.sink.begin("", 1, 0, 1).unwrap();
    w.start_entry(&file("y", b"abc")).unwrap();
    w.write(b"ab").unwrap();
    assert!(w.finish().is_err(), "short file accepted");
    drop(w);
    assert!(f.names("").is_empty());
}

#[test]
fn unusable_roots_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("plain-file");
    fs::write(&f, b"").unwrap();
    let err = FsSink::new(&f, dir.path()).err().unwrap().to_string();
    assert!(err.contains("not usable"), "{err}");
    let err = FsSink::new(&f.join("below"), dir.path())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("cannot create"), "{err}");
}

#[test]
fn directory_mtimes_survive_later_children_and_restarts() {
    let f = Fixture::new();
    let dir_mtime = (1_500_000_000, 7);
    write_segment(&f.sink, 0, &[(Entry::dir("d", 0o755, dir_mtime), b"")]).unwrap();
    write_segment(&f.sink, 1, &[(file("d/a", b"a"), b"a")]).unwrap();
    let m = fs::metadata(f.path("d")).unwrap();
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_500_000_000, 7));
    // A restarted target still knows it: a child arriving later does not disturb it.
    let f = f.restart();
    write_segment(&f.sink, 2, &[(file("d/sub/b", b"b"), b"b")]).unwrap();
    let m = fs::metadata(f.path("d")).unwrap();
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_500_000_000, 7));
}
