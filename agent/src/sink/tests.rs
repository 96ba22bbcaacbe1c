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
    let mut w = sink.begin("", "c/m1", id, 10 + id)?;
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
fn a_deleted_migration_leaves_no_unfinished_split_file_behind() {
    let f = Fixture::new();
    send_piece(&f.sink, 0, &data()).unwrap();
    assert_eq!(f.names("").len(), 1, "a part file beside the destination");
    assert!(f.names("")[0].starts_with(RESERVED_PREFIX));
    let sidecars = f.state.path().join("parts").join("c").join("m1");
    assert_eq!(fs::read_dir(&sidecars).unwrap().count(), 1);
    // Another migration's key forgets nothing of this one.
    assert_eq!(f.sink.forget("c/m2").unwrap(), 0);
    assert_eq!(f.names("").len(), 1);
    assert_eq!(f.sink.forget("c/m1").unwrap(), 1);
    assert!(f.names("").is_empty(), "the part file is gone");
    assert!(!sidecars.exists(), "and its sidecar");
    assert_eq!(f.sink.forget("c/m1").unwrap(), 0, "once is enough");
    assert!(f.sink.forget("../m1").is_err(), "keys are checked");
}

#[test]
fn piece_resent_after_completion_is_checked_against_the_file_never_written_into_it() {
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
        "mtime untouched by the resend"
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
        let mut w = f.sink.begin("", "c/m1", 3, 1).unwrap();
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
    assert!(sink.begin("../up", "c/m1", 0, 1).is_err());
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
fn setuid_and_setgid_bits_are_dropped_when_owners_are_not_applied() {
    let mut f = Fixture::new();
    f.sink.apply_owner = false;
    let mut e = file("tool", b"x");
    e.mode = 0o6755;
    write_segment(&f.sink, 0, &[(e, b"x")]).unwrap();
    assert_eq!(fs::metadata(f.path("tool")).unwrap().mode() & 0o7777, 0o755);
}

#[test]
fn owners_and_set_id_bits_are_kept_when_running_as_root() {
    let f = Fixture::new();
    if !crate::holes::running_as_root() {
        assert!(!f.sink.applies_owner());
        crate::skip("ownership is applied only by an agent running as root");
        return;
    }
    let mut e = file("d/tool", b"x").owned_by(1234, 5678);
    e.mode = 0o6755;
    let mut big = file("d/big", &[5u8; 10]).owned_by(4321, 8765);
    big.len = 5;
    big.chunk_count = 2;
    let mut big2 = big.clone();
    big2.offset = 5;
    big2.chunk_index = 1;
    write_segment(
        &f.sink,
        0,
        &[
            (Entry::dir("d", 0o750, (5, 0)).owned_by(11, 12), b""),
            (e, b"x"),
            (Entry::symlink("d/l", "tool", (5, 0)).owned_by(13, 14), b""),
        ],
    )
    .unwrap();
    write_segment(&f.sink, 1, &[(big, &[5u8; 5])]).unwrap();
    write_segment(&f.sink, 2, &[(big2, &[5u8; 5])]).unwrap();
    let owner = |p: &str| {
        let m = fs::symlink_metadata(f.path(p)).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777)
    };
    assert_eq!(owner("d"), (11, 12, 0o750));
    assert_eq!(owner("d/tool"), (1234, 5678, 0o6755));
    assert_eq!(owner("d/l").0, 13);
    assert_eq!(owner("d/big"), (4321, 8765, 0o640));
}

#[test]
fn lying_lengths_are_refused() {
    let f = Fixture::new();
    let mut w = f.sink.begin("", "c/m1", 0, 1).unwrap();
    w.start_entry(&file("x", b"abc")).unwrap();
    assert!(w.write(b"abcd").is_err());
    drop(w);
    let mut w = f.sink.begin("", "c/m1", 0, 1).unwrap();
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

#[test]
fn a_directory_never_received_keeps_the_mtime_it_had_when_files_land_in_it() {
    // A fallback writes into the old source's own tree: its directories were never sent to
    // this sink, and writing a file or deleting one must not move their mtimes.
    let f = Fixture::new();
    fs::create_dir_all(f.path("old/sub")).unwrap();
    fs::write(f.path("old/gone"), b"x").unwrap();
    let t = filetime::FileTime::from_unix_time(1_400_000_000, 9);
    for d in ["old", "old/sub"] {
        filetime::set_file_mtime(f.path(d), t).unwrap();
    }
    write_segment(
        &f.sink,
        0,
        &[
            (file("old/sub/new", b"new"), b"new"),
            (Entry::delete("old/gone"), b""),
        ],
    )
    .unwrap();
    for d in ["old", "old/sub"] {
        let m = fs::metadata(f.path(d)).unwrap();
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_400_000_000, 9), "{d}");
    }
    assert!(!f.path("old/gone").exists());
}

#[test]
fn the_start_up_probe_never_follows_a_planted_symlink() {
    let outer = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let root = outer.path().join("root");
    fs::create_dir(&root).unwrap();
    let victim = outer.path().join("victim");
    fs::write(&victim, b"precious").unwrap();
    let probe = root.join(format!("{RESERVED_PREFIX}probe-{}", std::process::id()));
    std::os::unix::fs::symlink(&victim, &probe).unwrap();
    FsSink::new(&root, state.path()).unwrap();
    assert_eq!(
        fs::read(&victim).unwrap(),
        b"precious",
        "probe truncated the link's target"
    );
    assert!(fs::symlink_metadata(&probe).is_err(), "probe left behind");
}

#[test]
fn directory_modes_are_never_set_through_a_symlink() {
    let outer = tempfile::tempdir().unwrap();
    let victim = outer.path().join("victim-dir");
    fs::create_dir(&victim).unwrap();
    fs::set_permissions(&victim, Permissions::from_mode(0o700)).unwrap();
    let link = outer.path().join("d");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    // What a directory entry meets if a symlink replaced the directory after it was checked.
    assert!(set_dir_meta(&link, 0o1777, None, &Vec::new()).is_err());
    assert_eq!(fs::metadata(&victim).unwrap().mode() & 0o7777, 0o700);
    set_dir_meta(&victim, 0o750, None, &Vec::new()).unwrap();
    assert_eq!(fs::metadata(&victim).unwrap().mode() & 0o7777, 0o750);
}

#[test]
fn resent_bytes_that_differ_never_reach_the_finished_file() {
    let f = Fixture::new();
    for i in 0..3 {
        send_piece(&f.sink, i, &data()).unwrap();
    }
    let dest = f.path("big.bin");
    let mut other = data();
    other[150] ^= 0xff;
    let e = piece(1);
    let mut w = f.sink.begin("", "c/m1", 1, 99).unwrap();
    w.start_entry(&e).unwrap();
    let err = w.write(&other[100..200]).unwrap_err();
    assert!(
        matches!(err, SinkError::ResentDiffers { offset: 150, .. }),
        "{err}"
    );
    drop(w);
    assert_eq!(fs::read(&dest).unwrap(), data(), "visible file changed");
    // And a resend whose hash check fails (dropped before commit) changes nothing either.
    let mut w = f.sink.begin("", "c/m1", 1, 100).unwrap();
    w.start_entry(&e).unwrap();
    w.write(&data()[100..200]).unwrap();
    w.finish().unwrap();
    drop(w);
    assert_eq!(fs::read(&dest).unwrap(), data());
}

#[test]
fn two_transfers_of_the_same_segment_and_epoch_never_publish_each_others_bytes() {
    let f = Fixture::new();
    // Two streams of the same (segment, epoch), as two agents with one identity could send.
    let e = file("x", b"AAAA");
    let mut a = f.sink.begin("", "c/m1", 7, 70).unwrap();
    let mut b = f.sink.begin("", "c/m1", 7, 70).unwrap();
    a.start_entry(&e).unwrap();
    b.start_entry(&e).unwrap();
    a.write(b"AAAA").unwrap();
    b.write(b"BBBB").unwrap();
    let ha = a.finish().unwrap();
    let hb = b.finish().unwrap();
    a.commit().unwrap();
    assert_eq!(
        *blake3::hash(&fs::read(f.path("x")).unwrap()).as_bytes(),
        ha,
        "published bytes are not the ones the committer hashed"
    );
    b.commit().unwrap();
    assert_eq!(
        *blake3::hash(&fs::read(f.path("x")).unwrap()).as_bytes(),
        hb
    );
    assert_eq!(f.names(""), vec!["x"], "no temporaries left");
}

#[test]
fn names_that_are_not_utf8_land_as_the_same_bytes() {
    use std::os::unix::ffi::OsStrExt;
    let f = Fixture::new();
    let dir = std::ffi::OsStr::from_bytes(b"d\xe9");
    let name = std::ffi::OsStr::from_bytes(b"d\xe9/latin1-\xe9.bin");
    write_segment(
        &f.sink,
        1,
        &[
            (Entry::dir(dir, 0o755, (5, 0)), b""),
            (Entry::file(Path::new(name), 2, 0o644, (5, 0), 0), b"hi"),
            (Entry::symlink("link", Path::new(name), (5, 0)), b""),
        ],
    )
    .unwrap();
    assert_eq!(fs::read(f.dir.path().join(name)).unwrap(), b"hi");
    // The directory's mtime is remembered across a restart (its log holds names as bytes).
    let f = f.restart();
    write_segment(
        &f.sink,
        2,
        &[(
            Entry::file(Path::new(name).with_extension("2"), 0, 0o644, (5, 0), 0),
            b"",
        )],
    )
    .unwrap();
    assert_eq!(fs::metadata(f.dir.path().join(dir)).unwrap().mtime(), 5);
    assert_eq!(
        fs::read_link(f.path("link"))
            .unwrap()
            .as_os_str()
            .as_bytes(),
        name.as_bytes()
    );
}

const MIB: u64 = 1024 * 1024;

fn sparse_entry(path: &str, size: u64, runs: Vec<(u64, u64)>) -> Entry {
    let mut e = Entry::file(path, size, 0o644, (5, 0), 0);
    e.data_runs = Some(runs);
    e
}

#[test]
fn sparse_whole_files_keep_their_holes() {
    let f = Fixture::new();
    let runs = vec![(MIB, 4096), (40 * MIB, 8192)];
    let e = sparse_entry("s", 64 * MIB, runs);
    let data = vec![9u8; 4096 + 8192];
    let h = write_segment(&f.sink, 0, &[(e, &data)]).unwrap();
    assert_eq!(h, *blake3::hash(&data).as_bytes(), "hash covers the runs");
    let m = fs::metadata(f.path("s")).unwrap();
    assert_eq!(m.len(), 64 * MIB);
    assert!(
        m.blocks() * 512 <= 64 * 1024,
        "{} bytes allocated for 12 KiB of data",
        m.blocks() * 512
    );
    let all = fs::read(f.path("s")).unwrap();
    assert!(all[..MIB as usize].iter().all(|&b| b == 0));
    assert!(all[MIB as usize..(MIB + 4096) as usize]
        .iter()
        .all(|&b| b == 9));
    assert!(all[(40 * MIB + 8192) as usize..].iter().all(|&b| b == 0));
}

#[test]
fn sparse_pieces_punch_their_holes_in_the_part() {
    let f = Fixture::new();
    let size = 4 * MIB;
    let mut p0 = sparse_entry("big", size, vec![(0, 4096)]);
    p0.len = 2 * MIB;
    p0.chunk_count = 2;
    let mut p1 = sparse_entry("big", size, vec![]);
    p1.offset = 2 * MIB;
    p1.len = 2 * MIB;
    p1.chunk_index = 1;
    p1.chunk_count = 2;
    // An earlier, dense attempt of piece 1 left bytes in the part; the sparse resend says
    // that range is a hole.
    let mut dense1 = p1.clone();
    dense1.data_runs = None;
    {
        let mut w = f.sink.begin("", "c/m1", 1, 1).unwrap();
        w.start_entry(&dense1).unwrap();
        w.write(&vec![7u8; 2 * MIB as usize]).unwrap();
        // never committed
    }
    write_segment(&f.sink, 0, &[(p0, &[1u8; 4096])]).unwrap();
    write_segment(&f.sink, 1, &[(p1, &[])]).unwrap();
    let all = fs::read(f.path("big")).unwrap();
    assert_eq!(all.len() as u64, size);
    assert!(all[..4096].iter().all(|&b| b == 1));
    assert!(all[4096..].iter().all(|&b| b == 0), "old bytes in a hole");
    let m = fs::metadata(f.path("big")).unwrap();
    assert!(
        m.blocks() * 512 < MIB,
        "{} bytes allocated",
        m.blocks() * 512
    );
}

#[test]
fn bad_data_runs_are_refused() {
    let f = Fixture::new();
    for runs in [vec![(10, 0)], vec![(50, 10), (10, 5)], vec![(95, 10)]] {
        let e = sparse_entry("s", 100, runs.clone());
        let mut w = f.sink.begin("", "c/m1", 0, 1).unwrap();
        let err = w.start_entry(&e).unwrap_err();
        assert!(matches!(err, SinkError::BadEntry { .. }), "{runs:?}: {err}");
    }
}

#[test]
fn hardlinks_link_to_the_first_name_in_the_same_segment_or_once_it_arrived() {
    let f = Fixture::new();
    let a = file("a", b"shared");
    // In one segment: linked to the staged temporary, both renamed at commit.
    write_segment(
        &f.sink,
        0,
        &[
            (a.clone(), b"shared"),
            (Entry::hardlink("b", "a", 6, (1_600_000_000, 123)), b""),
        ],
    )
    .unwrap();
    let ino = fs::metadata(f.path("a")).unwrap().ino();
    assert_eq!(fs::metadata(f.path("b")).unwrap().ino(), ino);
    // In a later segment: linked to the file in place.
    write_segment(
        &f.sink,
        1,
        &[(Entry::hardlink("c/d", "a", 6, (1_600_000_000, 123)), b"")],
    )
    .unwrap();
    assert_eq!(fs::metadata(f.path("c/d")).unwrap().ino(), ino);
    assert_eq!(fs::metadata(f.path("a")).unwrap().nlink(), 3);
    // Before its first name arrived, or to a different file: refused, nothing created.
    let err = write_segment(
        &f.sink,
        2,
        &[(Entry::hardlink("e", "later", 6, (1_600_000_000, 123)), b"")],
    )
    .unwrap_err();
    assert!(matches!(err, SinkError::LinkPending { .. }), "{err}");
    let err = write_segment(
        &f.sink,
        3,
        &[(Entry::hardlink("e", "a", 7, (1_600_000_000, 123)), b"")],
    )
    .unwrap_err();
    assert!(matches!(err, SinkError::LinkPending { .. }), "{err}");
    // A link may not be made to a path outside the root either.
    let err = write_segment(
        &f.sink,
        4,
        &[(Entry::hardlink("e", "../x", 6, (1_600_000_000, 123)), b"")],
    )
    .unwrap_err();
    assert!(matches!(err, SinkError::Path(_)), "{err}");
    assert_eq!(f.names(""), vec!["a", "b", "c"]);
}

#[test]
fn what_a_target_remembers_of_a_migration_is_keyed_by_cluster_and_uuid() {
    let f = Fixture::new();
    // Migration 1 of a cluster that was wiped left pieces 0 and 2 of big.bin.
    for i in [0u32, 2] {
        let e = piece(i);
        let mut w = f.sink.begin("", "old-cluster/u1", i as u64, 1).unwrap();
        w.start_entry(&e).unwrap();
        w.write(&data()[e.offset as usize..(e.offset + e.len) as usize])
            .unwrap();
        w.finish().unwrap();
        w.commit().unwrap();
    }
    // Migration 1 of the new cluster sends a file of the same name, size and mtime: its one
    // piece must not complete a file with the old migration's bytes.
    let other: Vec<u8> = data().iter().map(|b| b ^ 0x55).collect();
    let e = piece(1);
    let mut w = f.sink.begin("", "new-cluster/u2", 1, 1).unwrap();
    w.start_entry(&e).unwrap();
    w.write(&other[100..200]).unwrap();
    w.finish().unwrap();
    w.commit().unwrap();
    assert!(
        !f.path("big.bin").exists(),
        "a file was assembled from two clusters' pieces"
    );
    for i in [0u32, 2] {
        let e = piece(i);
        let mut w = f.sink.begin("", "new-cluster/u2", i as u64, 1).unwrap();
        w.start_entry(&e).unwrap();
        w.write(&other[e.offset as usize..(e.offset + e.len) as usize])
            .unwrap();
        w.finish().unwrap();
        w.commit().unwrap();
    }
    assert_eq!(fs::read(f.path("big.bin")).unwrap(), other);
    assert!(f.sink.begin("", "no-slash", 0, 1).is_err());
    assert!(f.sink.begin("", "../x/y", 0, 1).is_err());
}

#[test]
fn extended_attributes_land_on_files_directories_and_split_files() {
    let f = Fixture::new();
    let attrs = vec![(b"user.ferry.label".to_vec(), b"train".to_vec())];
    let with = |mut e: Entry| {
        e.xattrs = attrs.clone();
        e
    };
    let probe = f.path("probe");
    fs::write(&probe, b"").unwrap();
    if crate::xattr::apply_nofollow(&probe, &attrs).is_err() {
        crate::skip("this file system keeps no user extended attributes");
        return;
    }
    fs::remove_file(&probe).unwrap();
    write_segment(
        &f.sink,
        0,
        &[
            (with(Entry::dir("d", 0o755, (5, 0))), b""),
            (with(file("d/a", b"abc")), b"abc"),
        ],
    )
    .unwrap();
    for i in 0..3 {
        let e = with(piece(i));
        write_segment(
            &f.sink,
            10 + i as u64,
            &[(
                e.clone(),
                &data()[e.offset as usize..(e.offset + e.len) as usize],
            )],
        )
        .unwrap();
    }
    for p in ["d", "d/a", "big.bin"] {
        assert_eq!(crate::xattr::read(&f.path(p)).unwrap(), attrs, "{p}");
    }
}

#[test]
fn resent_segments_never_split_a_hardlink_group_or_leave_temporaries() {
    let f = Fixture::new();
    let a = file("a", b"shared");
    let link = Entry::hardlink("b", "a", 6, (1_600_000_000, 123));
    write_segment(&f.sink, 0, &[(a.clone(), b"shared")]).unwrap();
    write_segment(&f.sink, 1, &[(link.clone(), b"")]).unwrap();
    // Both segments again (their first reports were lost), the link first: no temporary is
    // left behind, and the group stays one file.
    write_segment(&f.sink, 1, &[(link, b"")]).unwrap();
    assert_eq!(f.names(""), vec!["a", "b"], "a temporary was left behind");
    write_segment(&f.sink, 0, &[(a, b"shared")]).unwrap();
    let (ma, mb) = (
        fs::metadata(f.path("a")).unwrap(),
        fs::metadata(f.path("b")).unwrap(),
    );
    assert_eq!(ma.ino(), mb.ino(), "the resend split the group");
    assert_eq!(ma.nlink(), 2);
    assert_eq!((ma.mtime(), ma.mode() & 0o7777), (1_600_000_000, 0o640));
    assert_eq!(f.names(""), vec!["a", "b"], "a temporary was left behind");
    // A new version of the first name (other bytes) replaces it as a whole, as any file.
    write_segment(&f.sink, 0, &[(file("a", b"SHARED"), b"SHARED")]).unwrap();
    assert_eq!(fs::read(f.path("a")).unwrap(), b"SHARED");
}

#[test]
fn a_bundle_is_made_durable_by_one_barrier_before_anything_is_visible() {
    let f = Fixture::new();
    let data: Vec<Vec<u8>> = (0..50).map(|i| vec![i as u8; 100 + i]).collect();
    let mut w = f.sink.begin("", "c/m1", 1, 11).unwrap();
    for (i, d) in data.iter().enumerate() {
        w.start_entry(&file(&format!("f{i:02}"), d)).unwrap();
        w.write(d).unwrap();
    }
    let count = |c: &AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    // Written, not durable yet: no file was synced one by one, and none is visible.
    assert_eq!(count(&f.sink.syncs.file_syncs), 0);
    assert_eq!(count(&f.sink.syncs.fs_syncs), 0);
    assert!(f.names("").iter().all(|n| n.starts_with(RESERVED_PREFIX)));
    w.finish().unwrap();
    // One barrier for the 50 files (one file system), before the commit makes them visible.
    assert_eq!(count(&f.sink.syncs.fs_syncs), 1);
    assert_eq!(count(&f.sink.syncs.file_syncs), 0);
    assert!(f.names("").iter().all(|n| n.starts_with(RESERVED_PREFIX)));
    w.commit().unwrap();
    for (i, d) in data.iter().enumerate() {
        assert_eq!(&fs::read(f.path(&format!("f{i:02}"))).unwrap(), d);
    }

    // A lone file is fsynced on its own.
    write_segment(&f.sink, 2, &[(file("lone", b"x"), b"x")]).unwrap();
    assert_eq!(count(&f.sink.syncs.file_syncs), 1);
    assert_eq!(count(&f.sink.syncs.fs_syncs), 1);
}

#[test]
fn temporaries_of_dead_processes_are_swept_and_nothing_else() {
    let f = Fixture::new();
    fs::create_dir_all(f.path("d/e")).unwrap();
    let dead = [
        ".ferry-s3-e7-0123456789abcdef.4.1.tmp",
        "d/.ferry-s0-e1-fedcba9876543210.0.12.tmp",
        "d/e/.ferry-s9-e9-00000000000000ff.2.3.tmp",
    ];
    let kept = [
        "user-file.tmp".to_string(),
        "d/.ferry-part-abc".to_string(),
        format!("d/.ferry-s1-e2-{}.0.1.tmp", process_token()),
    ];
    for p in dead
        .iter()
        .map(|s| s.to_string())
        .chain(kept.iter().cloned())
    {
        fs::write(f.path(&p), b"x").unwrap();
    }
    // A symlink to a directory is not followed.
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join(".ferry-s1-e1-0000000000000000.0.1.tmp");
    fs::write(&victim, b"x").unwrap();
    std::os::unix::fs::symlink(outside.path(), f.path("d/link")).unwrap();

    assert_eq!(f.sink.sweep_stale_temporaries(), 3);
    for p in dead {
        assert!(!f.path(p).exists(), "{p} was left");
    }
    for p in &kept {
        assert!(f.path(p).exists(), "{p} was removed");
    }
    assert!(victim.exists());
}

#[test]
fn deletions_remove_names_trees_and_links_never_what_a_link_points_to() {
    let f = Fixture::new();
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("precious"), b"keep").unwrap();
    write_segment(
        &f.sink,
        0,
        &[
            (Entry::dir("d", 0o755, (5, 0)), b""),
            (Entry::dir("d/sub", 0o755, (5, 0)), b""),
            (file("d/sub/x", b"x"), b"x"),
            (file("d/gone", b"g"), b"g"),
            (file("d/kept", b"k"), b"k"),
            (Entry::symlink("d/out", outside.path(), (7, 0)), b""),
            (file("was-file", b"f"), b"f"),
        ],
    )
    .unwrap();
    // A later round: names removed at the source, one replaced by a directory in the same
    // segment, and deletions sent again (of names already gone, and below a missing parent).
    write_segment(
        &f.sink,
        1,
        &[
            (Entry::delete("d/gone"), b""),
            (Entry::delete("d/sub"), b""),
            (Entry::delete("d/out"), b""),
            (Entry::delete("d/gone"), b""),
            (Entry::delete("nowhere/deep/name"), b""),
            (Entry::delete("was-file"), b""),
            (Entry::dir("was-file", 0o700, (9, 0)), b""),
            (file("was-file/in", b"new"), b"new"),
        ],
    )
    .unwrap();
    assert_eq!(f.names("d"), vec!["kept"]);
    assert_eq!(fs::read(f.path("was-file/in")).unwrap(), b"new");
    assert!(!f.path("nowhere").exists(), "a deletion creates nothing");
    assert_eq!(
        fs::read(outside.path().join("precious")).unwrap(),
        b"keep",
        "the symlink went, not what it points to"
    );
    let d = fs::metadata(f.path("d")).unwrap();
    assert_eq!(
        (d.mtime(), d.mtime_nsec()),
        (5, 0),
        "the directory's source mtime is set back after the deletions"
    );
    // Deletions are checked like every path a peer names.
    for bad in ["../x", ".ferry-part-1", "/abs"] {
        let err = write_segment(&f.sink, 2, &[(Entry::delete(bad), b"")]).unwrap_err();
        assert!(
            matches!(err, SinkError::Path(_) | SinkError::Reserved(_)),
            "{bad}: {err}"
        );
    }
    // Not through a symlink in the path either.
    write_segment(
        &f.sink,
        3,
        &[(Entry::symlink("d/link", outside.path(), (7, 0)), b"")],
    )
    .unwrap();
    let err = write_segment(&f.sink, 4, &[(Entry::delete("d/link/precious"), b"")]);
    assert!(matches!(err, Err(SinkError::Escape { .. })), "{err:?}");
    assert!(outside.path().join("precious").exists());
}

/// The version after `data()`: 10 bytes changed in piece 1 and 50 more bytes at the end, mtime
/// 20.
fn new_version() -> Vec<u8> {
    let mut new = data();
    new[120..130].copy_from_slice(&[0xEE; 10]);
    new.extend_from_slice(&[0xAB; 50]);
    new
}

/// Piece `i` of [`new_version`], sent as a delta against the version `base` carrying `runs`.
fn delta_piece(i: u32, runs: Vec<(u64, u64)>, base: (u64, i64, u32)) -> Entry {
    let mut e = Entry::file("big.bin", 300, 0o600, (20, 0), 0);
    e.offset = i as u64 * 100;
    e.len = 100;
    e.chunk_index = i;
    e.chunk_count = 3;
    e.data_runs = Some(runs);
    e.delta_base = Some(base);
    e
}

/// The three pieces of [`new_version`] as deltas against `data()`, with their bytes.
fn delta_pieces() -> Vec<(Entry, Vec<u8>)> {
    let new = new_version();
    let base = (250, 9, 9);
    vec![
        (delta_piece(0, vec![], base), Vec::new()),
        (
            delta_piece(1, vec![(120, 10)], base),
            new[120..130].to_vec(),
        ),
        (
            delta_piece(2, vec![(250, 50)], base),
            new[250..300].to_vec(),
        ),
    ]
}

/// Piece `i` of [`new_version`] sent whole.
fn whole_piece(i: u32) -> (Entry, Vec<u8>) {
    let (mut e, _) = delta_pieces().swap_remove(i as usize);
    e.data_runs = None;
    e.delta_base = None;
    let at = e.offset as usize;
    (e, new_version()[at..at + 100].to_vec())
}

fn ferry_names(f: &Fixture) -> Vec<String> {
    f.names("")
        .into_iter()
        .filter(|n| n.starts_with(RESERVED_PREFIX))
        .collect()
}

#[test]
fn a_delta_of_a_split_file_is_patched_in_place_once_every_piece_landed_and_refused_on_another_version(
) {
    let f = Fixture::new();
    let old = data();
    for i in 0..3 {
        send_piece(&f.sink, i, &old).unwrap();
    }
    assert_eq!(fs::read(f.path("big.bin")).unwrap(), old);
    let ino = fs::metadata(f.path("big.bin")).unwrap().ino();
    let new = new_version();
    let segs = delta_pieces();
    // Against another version than the one in place: refused, nothing changes.
    let (wrong, bytes) = &segs[1];
    let wrong = Entry {
        delta_base: Some((250, 8, 0)),
        ..wrong.clone()
    };
    let err = write_segment(&f.sink, 20, &[(wrong, bytes)]).unwrap_err();
    assert!(err.to_string().contains("changed at the target"), "{err}");
    assert_eq!(fs::read(f.path("big.bin")).unwrap(), old);
    // A piece that never commits leaves no journal behind.
    {
        let mut w = f.sink.begin("", "c/m1", 21, 1).unwrap();
        w.start_entry(&segs[2].0).unwrap();
        w.write(&segs[2].1).unwrap();
    }
    assert_eq!(ferry_names(&f), Vec::<String>::new());
    // A transfer killed mid-piece (no Drop) leaves its journal, unrecorded.
    {
        let mut w = f.sink.begin("", "c/m1", 22, 1).unwrap();
        w.start_entry(&segs[2].0).unwrap();
        w.write(&segs[2].1[..10]).unwrap();
        std::mem::forget(w);
    }
    assert_eq!(ferry_names(&f).len(), 1);
    for (i, (e, bytes)) in segs.iter().enumerate() {
        assert_eq!(
            fs::read(f.path("big.bin")).unwrap(),
            old,
            "not before the last piece"
        );
        write_segment(&f.sink, 30 + i as u64, &[(e.clone(), bytes)]).unwrap();
        if i == 1 {
            // Piece 0 changed nothing (no journal), piece 1 waits in its journal, beside the
            // killed transfer's.
            assert_eq!(ferry_names(&f).len(), 2, "{:?}", f.names(""));
        }
    }
    assert_eq!(fs::read(f.path("big.bin")).unwrap(), new);
    let m = fs::metadata(f.path("big.bin")).unwrap();
    assert_eq!((m.mtime(), m.len()), (20, 300));
    assert_eq!(m.ino(), ino, "patched in place, not replaced by a copy");
    assert_eq!(
        ferry_names(&f),
        Vec::<String>::new(),
        "journals removed, the unrecorded one too"
    );
    // A resend of a piece after that is compared with the file, and agrees.
    let (e, bytes) = &segs[1];
    write_segment(&f.sink, 40, &[(e.clone(), bytes)]).unwrap();
    assert_eq!(fs::read(f.path("big.bin")).unwrap(), new);
}

#[test]
fn pieces_sent_whole_and_as_deltas_make_the_same_new_version_in_either_order() {
    // A piece sent whole first (a sparse piece is never a delta) starts a part: the delta
    // pieces after it bring the old bytes of their ranges they do not carry.
    let f = Fixture::new();
    for i in 0..3 {
        send_piece(&f.sink, i, &data()).unwrap();
    }
    let (e0, b0) = whole_piece(0);
    write_segment(&f.sink, 50, &[(e0, &b0)]).unwrap();
    for (e, bytes) in delta_pieces().into_iter().skip(1) {
        write_segment(&f.sink, 51 + e.chunk_index as u64, &[(e, &bytes)]).unwrap();
    }
    assert_eq!(fs::read(f.path("big.bin")).unwrap(), new_version());

    // A delta first: the version is patched in place, and a piece sent whole is journalled too.
    let f = Fixture::new();
    for i in 0..3 {
        send_piece(&f.sink, i, &data()).unwrap();
    }
    let ino = fs::metadata(f.path("big.bin")).unwrap().ino();
    let mut segs = delta_pieces();
    let (e1, b1) = segs.remove(1);
    write_segment(&f.sink, 60, &[(e1, &b1)]).unwrap();
    let (e0, b0) = whole_piece(0);
    write_segment(&f.sink, 61, &[(e0, &b0)]).unwrap();
    let (e2, b2) = segs.remove(1);
    write_segment(&f.sink, 62, &[(e2, &b2)]).unwrap();
    assert_eq!(fs::read(f.path("big.bin")).unwrap(), new_version());
    assert_eq!(fs::metadata(f.path("big.bin")).unwrap().ino(), ino);
    assert_eq!(ferry_names(&f), Vec::<String>::new());
}

#[test]
fn a_crash_while_patching_in_place_is_finished_before_anything_else_touches_the_file() {
    let f = Fixture::new();
    let old = data();
    for i in 0..3 {
        send_piece(&f.sink, i, &old).unwrap();
    }
    let segs = delta_pieces();
    f.sink
        .stop_before_patching
        .store(true, std::sync::atomic::Ordering::Relaxed);
    for (i, (e, bytes)) in segs.iter().enumerate() {
        let r = write_segment(&f.sink, 30 + i as u64, &[(e.clone(), bytes)]);
        assert_eq!(r.is_ok(), i < 2, "{r:?}");
    }
    // Marked complete, the journals durable, then the crash: half of piece 1's bytes were
    // written in place, the old size and mtime still on the file.
    let dest = f.path("big.bin");
    let torn = OpenOptions::new().write(true).open(&dest).unwrap();
    torn.write_all_at(&[0xEE; 5], 120).unwrap();
    drop(torn);
    // (Writing set its mtime to now; put back the old one, the worst case.)
    let t = FileTime::from_unix_time(9, 9);
    filetime::set_file_times(&dest, t, t).unwrap();
    let f = f.restart();
    let m = fs::metadata(&dest).unwrap();
    assert_eq!(
        (m.len(), m.mtime()),
        (250, 9),
        "still looks like the old version"
    );
    // A delta of another version against the old one must not be applied to the torn file:
    // the journals are applied first, and the file is no longer the old version.
    let mut other = delta_piece(1, vec![(100, 1)], (250, 9, 9));
    other.mtime_sec = 30;
    let err = write_segment(&f.sink, 70, &[(other, &[1])]).unwrap_err();
    assert!(matches!(err, SinkError::BaseGone { .. }), "{err}");
    assert_eq!(fs::read(&dest).unwrap(), new_version());
    let m = fs::metadata(&dest).unwrap();
    assert_eq!((m.len(), m.mtime()), (300, 20));
    assert_eq!(ferry_names(&f), Vec::<String>::new());
    // The last piece's segment, never reported, comes again: it agrees with the file.
    let (e, bytes) = &segs[2];
    write_segment(&f.sink, 71, &[(e.clone(), bytes)]).unwrap();
}

#[test]
fn a_lost_journal_refuses_the_delta_and_the_file_sent_whole_lands() {
    let f = Fixture::new();
    for i in 0..3 {
        send_piece(&f.sink, i, &data()).unwrap();
    }
    let segs = delta_pieces();
    let (e, bytes) = &segs[1];
    write_segment(&f.sink, 30, &[(e.clone(), bytes)]).unwrap();
    for n in ferry_names(&f) {
        fs::remove_file(f.path(&n)).unwrap();
    }
    for (i, (e, bytes)) in segs.iter().enumerate().filter(|(i, _)| *i != 1) {
        let r = write_segment(&f.sink, 31 + i as u64, &[(e.clone(), bytes)]);
        if i == 2 {
            let err = r.unwrap_err();
            assert!(matches!(err, SinkError::BaseGone { .. }), "{err}");
            assert!(err.to_string().contains("journal"), "{err}");
        } else {
            r.unwrap();
        }
    }
    assert_eq!(
        fs::read(f.path("big.bin")).unwrap(),
        data(),
        "left as it was"
    );
    for i in 0..3 {
        let (e, bytes) = whole_piece(i);
        write_segment(&f.sink, 40 + i as u64, &[(e, &bytes)]).unwrap();
    }
    assert_eq!(fs::read(f.path("big.bin")).unwrap(), new_version());
    assert_eq!(ferry_names(&f), Vec::<String>::new());
}

/// Found by the `sink_segments` fuzz target (an entry that reaches the sink without crossing
/// the wire must not panic it either): a time no clock can hold is a bad entry.
#[test]
fn a_time_no_clock_can_hold_is_refused_not_a_panic() {
    let f = Fixture::new();
    for (sec, nsec) in [(i64::MIN, 0), (0, 1_000_000_000)] {
        let e = Entry::file("t", 1, 0o644, (sec, nsec), 0);
        let r = write_segment(&f.sink, 1, &[(e, b"x")]);
        assert!(
            matches!(r, Err(SinkError::BadEntry { .. })),
            "{sec}.{nsec}: {r:?}"
        );
        assert!(fs::symlink_metadata(f.path("t")).is_err());
    }
    let dir = Entry::dir("d", 0o755, (i64::MIN, 0));
    assert!(matches!(
        write_segment(&f.sink, 2, &[(dir, b"")]),
        Err(SinkError::BadEntry { .. })
    ));
}

/// Swaps `dir` (below the root) for a symlink to `outside` the first time the sink has checked
/// a path's parent directory: what a local process, or a hostile peer's own concurrent segment
/// (a deletion of the directory, then a symlink entry under its name), can do between the
/// check and the use.
fn swap_for_symlink_after_check(sink: &FsSink, dir: PathBuf, outside: PathBuf) {
    let done = std::sync::atomic::AtomicBool::new(false);
    *sink.after_check.lock().unwrap() = Some(Box::new(move |_| {
        if !done.swap(true, std::sync::atomic::Ordering::SeqCst) {
            fs::rename(&dir, dir.with_extension("moved")).unwrap();
            std::os::unix::fs::symlink(&outside, &dir).unwrap();
        }
    }));
}

#[test]
fn a_directory_swapped_for_a_symlink_after_its_check_leads_nowhere_outside_the_root() {
    // Writing a file: before ferry opened every path through no symlink, the temporary was
    // created through the swapped-in link and renamed into place outside the root.
    let f = Fixture::new();
    let outside = tempfile::tempdir().unwrap();
    write_segment(&f.sink, 0, &[(Entry::dir("d", 0o755, (5, 0)), b"")]).unwrap();
    swap_for_symlink_after_check(&f.sink, f.path("d"), outside.path().to_path_buf());
    let err = write_segment(&f.sink, 1, &[(file("d/planted", b"evil"), b"evil")]).unwrap_err();
    assert!(matches!(err, SinkError::Io { .. }), "{err}");
    assert!(
        err.to_string().contains("is a symlink"),
        "the error says why: {err}"
    );
    assert_eq!(
        fs::read_dir(outside.path()).unwrap().count(),
        0,
        "nothing was written outside the root"
    );

    // Deleting: before, the name was removed from the directory the link points to.
    let f = Fixture::new();
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("precious"), b"keep").unwrap();
    write_segment(
        &f.sink,
        0,
        &[
            (Entry::dir("d", 0o755, (5, 0)), b""),
            (file("d/precious", b"old"), b"old"),
        ],
    )
    .unwrap();
    swap_for_symlink_after_check(&f.sink, f.path("d"), outside.path().to_path_buf());
    let err = write_segment(&f.sink, 1, &[(Entry::delete("d/precious"), b"")]).unwrap_err();
    assert!(err.to_string().contains("is a symlink"), "{err}");
    assert_eq!(fs::read(outside.path().join("precious")).unwrap(), b"keep");
    assert_eq!(fs::read(f.path("d.moved/precious")).unwrap(), b"old");

    // A directory entry's mode and owner: never set on what the link points to.
    let f = Fixture::new();
    let outside = tempfile::tempdir().unwrap();
    fs::create_dir(outside.path().join("sub")).unwrap();
    fs::set_permissions(outside.path().join("sub"), Permissions::from_mode(0o700)).unwrap();
    write_segment(&f.sink, 0, &[(Entry::dir("d/sub", 0o755, (5, 0)), b"")]).unwrap();
    swap_for_symlink_after_check(&f.sink, f.path("d"), outside.path().to_path_buf());
    assert!(write_segment(&f.sink, 1, &[(Entry::dir("d/sub", 0o777, (6, 0)), b"")]).is_err());
    let m = fs::metadata(outside.path().join("sub")).unwrap();
    assert_eq!(
        m.mode() & 0o7777,
        0o700,
        "the outside directory's mode is untouched"
    );
}

/// Found by the crash matrix (a coordinator crash lost a lease, the piece was leased and sent
/// again while its first transfer still streamed): a transfer still writing a piece into a
/// split file's part after another transfer of the same piece completed the file wrote into
/// the finished file — its mtime changed, and bytes that differ would have reached it. A
/// transfer that opened the part before the file was completed now fails at its next write.
#[test]
fn a_transfer_still_writing_when_its_file_is_completed_never_writes_into_it() {
    let f = Fixture::new();
    let dest = f.path("big.bin");
    // The stale transfer of piece 1: opened, some bytes written, still streaming.
    let mut stale = f.sink.begin("", "c/m1", 1, 1).unwrap();
    stale.start_entry(&piece(1)).unwrap();
    stale.write(&data()[100..150]).unwrap();
    // Meanwhile the other transfers (piece 1 again, under a new lease) complete the file.
    for i in [0u32, 1, 2] {
        send_piece(&f.sink, i, &data()).unwrap();
    }
    let finished = fs::metadata(&dest).unwrap();
    assert_eq!(fs::read(&dest).unwrap(), data());
    // The stale transfer goes on with other bytes (a source file changed without its mtime).
    let err = stale.write(&[0xEE; 50]).unwrap_err();
    assert!(err.to_string().contains("completed"), "{err}");
    drop(stale);
    assert_eq!(
        fs::read(&dest).unwrap(),
        data(),
        "the finished file is untouched"
    );
    let now = fs::metadata(&dest).unwrap();
    assert_eq!(
        (now.mtime(), now.mtime_nsec()),
        (finished.mtime(), finished.mtime_nsec())
    );
    assert_eq!((now.mtime(), now.mtime_nsec()), (9, 9));
}

/// Two transfers of one piece at once (its lease was lost while the first streamed, and the
/// piece was leased again): the older one, going on after the newer wrote the whole piece,
/// wrote into it, so the piece the newer verified held bytes it never hashed. Once a newer
/// transfer opened the piece, an older one writes nothing more into it and cannot open it.
#[test]
fn an_older_transfer_of_a_piece_writes_nothing_once_a_newer_one_opened_it() {
    let f = Fixture::new();
    let dest = f.path("big.bin");
    let mut stale = f.sink.begin("", "c/m1", 1, 1).unwrap();
    stale.start_entry(&piece(1)).unwrap();
    stale.write(&data()[100..150]).unwrap();
    let mut newer = f.sink.begin("", "c/m1", 1, 11).unwrap();
    newer.start_entry(&piece(1)).unwrap();
    newer.write(&data()[100..200]).unwrap();
    // The stale transfer goes on with other bytes (a source file changed without its mtime).
    let err = stale.write(&[0xEE; 50]).unwrap_err();
    assert!(err.to_string().contains("newer transfer"), "{err}");
    drop(stale);
    // A transfer older still cannot even open the piece.
    let mut late = f.sink.begin("", "c/m1", 1, 5).unwrap();
    let err = late.start_entry(&piece(1)).unwrap_err();
    assert!(err.to_string().contains("newer transfer"), "{err}");
    drop(late);
    newer.finish().unwrap();
    newer.commit().unwrap();
    for i in [0u32, 2] {
        send_piece(&f.sink, i, &data()).unwrap();
    }
    assert_eq!(
        fs::read(&dest).unwrap(),
        data(),
        "only the newer transfer's bytes"
    );
}

/// The same race one step later: the older transfer wrote its whole piece, then the newer one
/// opened it; the older cannot record it as durable (the newer's bytes are going in).
#[test]
fn an_older_transfer_of_a_piece_cannot_record_it_once_a_newer_one_opened_it() {
    let f = Fixture::new();
    let mut stale = f.sink.begin("", "c/m1", 1, 1).unwrap();
    stale.start_entry(&piece(1)).unwrap();
    stale.write(&data()[100..200]).unwrap();
    stale.finish().unwrap();
    let mut newer = f.sink.begin("", "c/m1", 1, 11).unwrap();
    newer.start_entry(&piece(1)).unwrap();
    let err = stale.commit().unwrap_err();
    assert!(err.to_string().contains("newer transfer"), "{err}");
    newer.write(&data()[100..200]).unwrap();
    newer.finish().unwrap();
    newer.commit().unwrap();
    for i in [0u32, 2] {
        send_piece(&f.sink, i, &data()).unwrap();
    }
    assert_eq!(fs::read(f.path("big.bin")).unwrap(), data());
}

/// An older transfer of a piece that opens it after a newer one recorded it is refused before
/// it touches anything: opening used to un-record the piece first (as a rewrite must), so the
/// refused transfer left a verified piece unrecorded and the file could never complete.
#[test]
fn an_older_transfer_opening_a_piece_a_newer_one_recorded_leaves_it_recorded() {
    let f = Fixture::new();
    let mut newer = f.sink.begin("", "c/m1", 1, 11).unwrap();
    newer.start_entry(&piece(1)).unwrap();
    newer.write(&data()[100..200]).unwrap();
    newer.finish().unwrap();
    newer.commit().unwrap();
    let mut late = f.sink.begin("", "c/m1", 1, 5).unwrap();
    let err = late.start_entry(&piece(1)).unwrap_err();
    assert!(err.to_string().contains("newer transfer"), "{err}");
    drop(late);
    for i in [0u32, 2] {
        send_piece(&f.sink, i, &data()).unwrap();
    }
    assert_eq!(fs::read(f.path("big.bin")).unwrap(), data());
}

/// Found by the crash matrix: a transfer that failed after another transfer of the same files
/// committed removed its temporaries and left their directory with the time of that removal.
#[test]
fn a_transfer_dropped_after_another_committed_leaves_the_directory_mtime_as_the_source_had_it() {
    let f = Fixture::new();
    let mut stale = f.sink.begin("", "c/m1", 1, 1).unwrap();
    stale.start_entry(&file("d/x", b"xx")).unwrap();
    stale.write(b"x").unwrap();
    write_segment(
        &f.sink,
        1,
        &[
            (Entry::dir("d", 0o755, (5, 0)), b""),
            (file("d/x", b"xx"), b"xx"),
        ],
    )
    .unwrap();
    let d = fs::metadata(f.path("d")).unwrap();
    assert_eq!((d.mtime(), d.mtime_nsec()), (5, 0));
    drop(stale);
    assert_eq!(f.names("d"), vec!["x"], "the temporary went");
    let d = fs::metadata(f.path("d")).unwrap();
    assert_eq!(
        (d.mtime(), d.mtime_nsec()),
        (5, 0),
        "set back after the temporary was removed"
    );
}
