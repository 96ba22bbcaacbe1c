//! What the target relies on from any [`Sink`], checked against the real [`FsSink`] and the
//! in-memory [`MemSink`] alike, so that tests through the fake prove something about the real
//! thing.

use super::mem::MemSink;
use super::*;

fn file(path: &str, data: &[u8]) -> Entry {
    Entry::file(path, data.len() as u64, 0o640, (1_600_000_000, 0), 0)
}

/// Writes `items` as segment `id`; commits it if `commit`. Returns the writer's hash.
fn write<S: Sink>(sink: &S, id: u64, items: &[(Entry, &[u8])], commit: bool) -> [u8; 32] {
    let mut w = sink.begin("", "c/m1", id, 1).unwrap();
    for (e, data) in items {
        w.start_entry(e).unwrap();
        for c in data.chunks(5) {
            w.write(c).unwrap();
        }
    }
    let h = w.finish().unwrap();
    if commit {
        w.commit().unwrap();
    }
    h
}

/// The contract, for a sink whose committed files `read` returns.
fn contract<S: Sink>(sink: &S, read: impl Fn(&str) -> Option<Vec<u8>>) {
    // A committed segment's files are there with their bytes, and the hash is the BLAKE3 of
    // every byte written, in order.
    let items = [
        (file("a.bin", b"hello world"), &b"hello world"[..]),
        (file("d/b", b"xy"), b"xy"),
    ];
    let h = write(sink, 1, &items, true);
    assert_eq!(h, *blake3::hash(b"hello worldxy").as_bytes());
    assert_eq!(read("a.bin").as_deref(), Some(&b"hello world"[..]));
    assert_eq!(read("d/b").as_deref(), Some(&b"xy"[..]));
    // A segment finished but never committed (its hash did not match, its lease was lost)
    // publishes nothing.
    write(sink, 2, &[(file("c.bin", b"never"), b"never")], false);
    assert_eq!(read("c.bin"), None);
    // A path that leaves the root is refused before a byte is written.
    let mut w = sink.begin("", "c/m1", 3, 1).unwrap();
    assert!(w.start_entry(&file("../escape", b"x")).is_err());
    // Bytes beyond what the entry announced are refused.
    let mut w = sink.begin("", "c/m1", 4, 1).unwrap();
    w.start_entry(&file("e", b"ab")).unwrap();
    assert!(w.write(b"abc").is_err());
}

#[test]
fn the_filesystem_sink_keeps_the_contract() {
    let (root, state) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sink = FsSink::new(root.path(), state.path()).unwrap();
    contract(&sink, |p| std::fs::read(root.path().join(p)).ok());
}

#[test]
fn the_memory_sink_keeps_the_contract() {
    let sink = MemSink::default();
    contract(&sink, |p| sink.file(p));
}

#[test]
fn the_memory_sink_fails_on_demand_as_a_full_disk_does() {
    let sink = MemSink::default();
    *sink.fail_after_writes.lock().unwrap() = Some(1);
    let mut w = sink.begin("", "c/m1", 1, 1).unwrap();
    w.start_entry(&file("f", b"abcd")).unwrap();
    w.write(b"ab").unwrap();
    let e = w.write(b"cd").unwrap_err();
    assert!(
        matches!(e, SinkError::Io { ref source, .. } if source.raw_os_error() == Some(libc::ENOSPC)),
        "{e}"
    );
}

#[test]
fn the_object_sink_keeps_the_contract() {
    use object_store::ObjectStoreExt;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let state = tempfile::tempdir().unwrap();
    let store = Arc::new(object_store::memory::InMemory::new());
    let sink = super::object::ObjectSink::new(
        store.clone(),
        object_store::path::Path::from("pre"),
        state.path(),
        rt.handle().clone(),
    )
    .unwrap();
    contract(&sink, |p| {
        let key = object_store::path::Path::parse(format!("pre/{p}")).unwrap();
        rt.block_on(async { store.get(&key).await.ok()?.bytes().await.ok() })
            .map(|b| b.to_vec())
    });
}
