//! A store target's side of the full verification (a cutover's, or `ferryctl migration verify
//! NAME --mode full`): the agent lists the migration's keys and reads every object back from the
//! store, and digests them as the source digests its tree for a store target
//! ([`crate::cutover::Pass::store`]): keys in the store's listing order, each a file (its size
//! and the BLAKE3 of the bytes read back) or a symlink's marker (its target). Directories,
//! modes and mtimes are not compared: a store keeps no directories, and keeps modes and mtimes
//! only as metadata (not on Azure's multipart uploads).
//!
//! An object that carries `ferry-blake3` (what the target hashed when it stored it) must read
//! back with that hash, or the verification fails naming it: the store's copy was damaged or
//! replaced. An object whose size, ETag and last-modified time are as an earlier verification
//! read them is not read again: its hash comes from the agent's cache ([`crate::hashcache`], in
//! key order), as for files on disk.

use std::path::Path;

use futures::TryStreamExt;
use object_store::path::Path as Key;
use object_store::{GetOptions, ObjectMeta};

use crate::cutover::{Fold, Tree, KIND_FILE, KIND_SYMLINK};
use crate::hashcache::{HashCache, HashCacheWriter, Identity};
use crate::scan::Order;
use crate::sink::object::{percent_decode, ObjectSink};

/// Objects read back at once.
const READS_AT_ONCE: usize = 16;

/// One object as the verification read it.
struct Read {
    rel: String,
    id: Option<Identity>,
    size: u64,
    what: What,
    /// Read now (not from the cache).
    read: bool,
}

/// What an object holds for ferry.
enum What {
    /// A file's bytes, by their BLAKE3.
    File([u8; 32]),
    /// A symlink's marker, with the link's target.
    Symlink(Vec<u8>),
}

/// What identifies a version of an object: size, last-modified time and ETag (hashed into the
/// place a file's inode has). `None` without an ETag: such an object is always read.
fn identity(meta: &ObjectMeta) -> Option<Identity> {
    let etag = meta.e_tag.as_deref()?.trim_matches('"');
    let tag = blake3::hash(etag.as_bytes());
    Some(Identity {
        size: meta.size,
        mtime: (
            meta.last_modified.timestamp(),
            meta.last_modified.timestamp_subsec_nanos(),
        ),
        ctime: (0, 0),
        inode: u64::from_le_bytes(tag.as_bytes()[..8].try_into().expect("8 bytes")),
    })
}

/// Reads the object `meta` lists back from the store.
async fn read_back(
    sink: &ObjectSink,
    meta: ObjectMeta,
    rel: String,
    id: Option<Identity>,
) -> Result<Read, String> {
    let key = &meta.location;
    let r = sink
        .store()
        .get_opts(key, GetOptions::default())
        .await
        .map_err(|e| format!("cannot read {key} back from the store: {e}"))?;
    // (Azure lists ETags bare and answers a GET with them quoted.)
    let tag = |m: &ObjectMeta| m.e_tag.as_deref().map(|t| t.trim_matches('"').to_string());
    let changed = r.meta.size != meta.size
        || matches!((tag(&r.meta), tag(&meta)), (Some(a), Some(b)) if a != b);
    if changed {
        return Err(format!(
            "{key} changed while it was verified (listed with {} bytes and ETag {:?}, read with \
             {} and {:?}): is something else writing below the migration's prefix?",
            meta.size,
            meta.e_tag.as_deref().unwrap_or(""),
            r.meta.size,
            r.meta.e_tag.as_deref().unwrap_or("")
        ));
    }
    let text = |field: &str| {
        r.attributes
            .get(&sink.meta(field))
            .map(|v| v.as_ref().to_string())
    };
    let stored_hash = text("blake3");
    let symlink = match text("symlink") {
        Some(t) => Some(percent_decode(&t).ok_or_else(|| {
            format!("{key} is a symlink marker whose target is not as ferry writes it: {t:?}")
        })?),
        None => None,
    };
    let mut hasher = blake3::Hasher::new();
    let mut n = 0u64;
    let mut body = r.into_stream();
    while let Some(chunk) = body
        .try_next()
        .await
        .map_err(|e| format!("cannot read {key} back from the store: {e}"))?
    {
        n += chunk.len() as u64;
        hasher.update(&chunk);
    }
    if n != meta.size {
        return Err(format!(
            "{key} read back with {n} bytes, listed with {}",
            meta.size
        ));
    }
    let content = *hasher.finalize().as_bytes();
    if let Some(h) = stored_hash {
        if h != ferry_common::hash::hex(&content) {
            return Err(format!(
                "{key} reads back with BLAKE3 {}, not the {h} it was stored with: the store's \
                 copy is damaged or was replaced (the next round sends it again)",
                ferry_common::hash::hex(&content)
            ));
        }
    }
    Ok(Read {
        rel,
        id,
        size: meta.size,
        what: match symlink {
            Some(link) => What::Symlink(link),
            None => What::File(content),
        },
        read: true,
    })
}

/// Digests the objects below the key of `target_path` in `sink`'s store, reading back those
/// the cache at `cache` has no hash of for their current version (and writing it anew).
pub async fn store_digest(
    sink: &ObjectSink,
    target_path: &str,
    cache: &Path,
) -> Result<Tree, String> {
    let base = sink.base(target_path).map_err(|e| e.to_string())?;
    let prefix = match base.as_str() {
        "" => None,
        b => Some(Key::parse(b).map_err(|e| format!("{b} is not a valid object key: {e}"))?),
    };
    let strip = if base.is_empty() {
        String::new()
    } else {
        format!("{base}/")
    };
    let mut old = HashCache::open_in(Order::Key, cache);
    let mut new = HashCacheWriter::create(cache).map_err(|e| {
        format!(
            "cannot write the verification hash cache {}: {e}",
            cache.display()
        )
    })?;
    let mut last: Option<String> = None;
    let reads = sink
        .store()
        .list(prefix.as_ref())
        .map_err(|e| format!("listing the store failed: {e}"))
        .and_then(|meta| {
            let key = meta.location.as_ref().to_string();
            let in_order = last.as_deref().is_none_or(|l| l < key.as_str());
            let rel = key.strip_prefix(&strip).map(str::to_string);
            let id = identity(&meta);
            let cached = match (&rel, &id) {
                // An empty object may be a symlink's marker: its metadata says, so it is read.
                (Some(rel), Some(id)) if meta.size > 0 => old.lookup(Path::new(rel), id),
                _ => None,
            };
            last = Some(key.clone());
            async move {
                if !in_order {
                    return Err(format!(
                        "the store listed {key} out of order: its listing is not sorted by \
                         key, and the verification needs it to be"
                    ));
                }
                let rel =
                    rel.ok_or_else(|| format!("the store listed {key} below another prefix"))?;
                Ok((meta, rel, id, cached))
            }
        })
        .map_ok(|(meta, rel, id, cached)| async move {
            match cached {
                Some(content) => Ok(Read {
                    rel,
                    id,
                    size: meta.size,
                    what: What::File(content),
                    read: false,
                }),
                None => read_back(sink, meta, rel, id).await,
            }
        })
        .try_buffered(READS_AT_ONCE);
    let mut reads = std::pin::pin!(reads);
    let mut t = Tree::default();
    let mut fold = Fold::default();
    while let Some(r) = reads.try_next().await? {
        match &r.what {
            What::Symlink(link) => {
                t.symlinks += 1;
                fold.name(KIND_SYMLINK, r.rel.as_bytes(), link, 0, 0, (0, 0), None);
            }
            What::File(content) => {
                t.files += 1;
                t.bytes += r.size;
                if r.read {
                    t.files_read += 1;
                    t.bytes_read += r.size;
                }
                if let Some(id) = &r.id {
                    new.append(Path::new(&r.rel), id, content)
                        .map_err(|e| format!("cannot write the verification hash cache: {e}"))?;
                }
                fold.name(
                    KIND_FILE,
                    r.rel.as_bytes(),
                    b"",
                    0,
                    r.size,
                    (0, 0),
                    Some(content),
                );
            }
        }
    }
    new.finish()
        .map_err(|e| format!("cannot write the verification hash cache: {e}"))?;
    fold.finish(&mut t);
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cutover::{tree_digest, Pass};
    use crate::scan::{walk, Walked};
    use crate::segment::EntryKind;
    use crate::sink::{SegmentWrite, Sink};
    use ferry_common::exclude::Excludes;
    use object_store::memory::InMemory;
    use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
    use std::sync::Arc;

    /// A tree whose names come in another order in a store's listing than in a walk.
    fn tree(root: &Path) {
        std::fs::create_dir_all(root.join("model/x")).unwrap();
        std::fs::create_dir(root.join("dir-empty")).unwrap();
        std::fs::write(root.join("model/x/w"), b"weights").unwrap();
        std::fs::write(root.join("model.bin"), b"the model's bytes").unwrap();
        std::fs::write(root.join("empty"), b"").unwrap();
        std::fs::write(root.join("a name"), b"spaces").unwrap();
        std::os::unix::fs::symlink("model.bin", root.join("model-a")).unwrap();
        std::fs::hard_link(root.join("model.bin"), root.join("zz-hardlink")).unwrap();
    }

    /// Stores the tree at `root` below `t` as one segment, as a target would.
    fn store_tree(sink: &ObjectSink, root: &Path) {
        let mut w = sink.begin("t", "c/m1", 1, 1).unwrap();
        walk::<()>(root, &Excludes::new(&[]).unwrap(), |item| {
            if let Walked::Entry(e) = item {
                w.start_entry(&e).unwrap();
                if e.kind == EntryKind::File {
                    w.write(&std::fs::read(root.join(&e.path)).unwrap())
                        .unwrap();
                }
            }
            Ok(())
        })
        .unwrap()
        .unwrap();
        w.finish().unwrap();
        w.commit().unwrap();
    }

    fn source_digest(root: &Path, cache: &Path) -> Tree {
        let pass = Pass {
            cache: Some(cache),
            store: true,
            ..Pass::default()
        };
        tree_digest(root, &Excludes::new(&[]).unwrap(), pass).unwrap()
    }

    #[test]
    fn a_tree_read_back_from_a_store_digests_as_the_source_and_damage_shows() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let store = Arc::new(InMemory::new());
        let dir = tempfile::tempdir().unwrap();
        let (src, state) = (dir.path().join("src"), dir.path().join("state"));
        tree(&src);
        let sink = ObjectSink::new(
            store.clone(),
            Key::from("bucket-prefix"),
            &state,
            rt.handle().clone(),
        )
        .unwrap();
        store_tree(&sink, &src);
        let source = source_digest(&src, &dir.path().join("source.hashes"));
        let cache = dir.path().join("target.hashes");
        let target = rt.block_on(store_digest(&sink, "t", &cache)).unwrap();
        assert_eq!(target.digest, source.digest);
        assert_eq!(target.classes, source.classes);
        // Each name of the hardlinked file is a file; no directories.
        assert_eq!((target.files, target.symlinks, target.dirs), (5, 1, 0));
        assert_eq!((source.files, source.symlinks, source.dirs), (5, 1, 0));
        assert_eq!(target.bytes, source.bytes);
        assert_eq!(target.files_read, 5);

        // A second pass reads again only the empty object (it might be a symlink's marker).
        let again = rt.block_on(store_digest(&sink, "t", &cache)).unwrap();
        assert_eq!(again.digest, source.digest);
        assert_eq!((again.files_read, again.bytes_read), (1, 0));

        // Modes and mtimes are not what a store keeps: changing them changes nothing here.
        std::fs::set_permissions(
            src.join("a name"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        assert_eq!(
            source_digest(&src, &dir.path().join("source.hashes")).digest,
            source.digest
        );

        // Bytes replaced under the metadata the target stored them with: named as damaged.
        let key = Key::from("bucket-prefix/t/model.bin");
        let attrs = rt.block_on(store.get(&key)).unwrap().attributes;
        let opts = object_store::PutOptions {
            attributes: attrs,
            ..Default::default()
        };
        let damaged = PutPayload::from_static(b"the model's BYTES");
        rt.block_on(store.put_opts(&key, damaged.clone(), opts))
            .unwrap();
        let e = rt.block_on(store_digest(&sink, "t", &cache)).unwrap_err();
        assert!(
            e.contains("bucket-prefix/t/model.bin") && e.contains("damaged"),
            "{e}"
        );
        // Replaced as a whole (no ferry metadata): the digests differ, in the files.
        rt.block_on(store.put(&key, damaged)).unwrap();
        let replaced = rt.block_on(store_digest(&sink, "t", &cache)).unwrap();
        assert_ne!(replaced.digest, source.digest);
        assert_ne!(replaced.classes[0], source.classes[0]);
        assert_eq!(replaced.classes[2], source.classes[2], "symlinks are equal");

        // An object missing: the digests differ.
        rt.block_on(store.put(&key, PutPayload::from_static(b"the model's bytes")))
            .unwrap();
        let restored = rt.block_on(store_digest(&sink, "t", &cache)).unwrap();
        assert_eq!(restored.digest, source.digest);
        rt.block_on(store.delete(&Key::from("bucket-prefix/t/a name")))
            .unwrap();
        let missing = rt.block_on(store_digest(&sink, "t", &cache)).unwrap();
        assert_ne!(missing.digest, source.digest);
        assert_eq!(missing.files, 4);
    }

    #[test]
    fn percent_decoding_undoes_the_encoding_and_refuses_what_it_did_not_write() {
        use crate::sink::object::percent_encode;
        for bytes in [&b"../a b/c%d"[..], b"\xff\x00\n", b""] {
            assert_eq!(percent_decode(&percent_encode(bytes)).unwrap(), bytes);
        }
        for bad in ["%", "%4", "%zz", "%+1"] {
            assert_eq!(percent_decode(bad), None, "{bad}");
        }
    }
}
