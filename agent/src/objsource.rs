//! Sources in an object store: a migration whose source path is a store's URL
//! (`s3://bucket/prefix`, `gs://…`, `az://…`) is scanned by listing the objects below the prefix
//! (a paginated stream: memory does not grow with the number of objects) and read by ranged
//! GETs, one per file or piece, streamed as they arrive.
//!
//! Every object is a regular file (mode 0644, mtime its last-modified time). An object is read
//! only as it was listed: a GET whose object has another size or last-modified time than the
//! scan's is refused as stale (the object changed; nothing of it is sent). Excludes apply to the
//! path below the prefix. Bulk copy only for now: the coordinator refuses sync rounds, cutovers
//! and full verifications of such a migration.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::TryStreamExt;
use object_store::path::Path as Key;
use serde::Deserialize;

use crate::scan::{RootError, Walked};
use crate::segment::Entry;
use crate::sink::object::{Store, StoreConfig};
use ferry_common::exclude::Excludes;

pub use ferry_common::path::is_store_url;

/// The `[source_store]` section of an agent's config: the settings it uses for every store a
/// migration asks it to read (credentials otherwise from the environment, as for targets).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceStoreSettings {
    /// object_store's settings (`endpoint`, `region`, `allow_http`, ...).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// How long one call keeps retrying; default 60.
    #[serde(default)]
    pub retry_timeout_secs: Option<u64>,
}

/// A store a source reads, with the prefix its migration names.
pub struct Opened {
    /// The store.
    pub store: Arc<dyn Store>,
    /// The prefix (the URL's path).
    pub prefix: Key,
}

impl Opened {
    /// The key of `rel` (a path below the prefix).
    pub fn key(&self, rel: &Path) -> Result<Key, String> {
        let rel = rel
            .to_str()
            .ok_or_else(|| format!("{} is not UTF-8", rel.display()))?;
        let full = if self.prefix.as_ref().is_empty() {
            rel.to_string()
        } else {
            format!("{}/{rel}", self.prefix.as_ref())
        };
        Key::parse(&full).map_err(|e| e.to_string())
    }
}

/// The stores this agent reads as a source, opened once per URL.
#[derive(Default)]
pub struct StoreSources {
    settings: SourceStoreSettings,
    opened: Mutex<HashMap<String, Arc<Opened>>>,
}

impl StoreSources {
    /// Sources read with `settings`.
    pub fn new(settings: SourceStoreSettings) -> Self {
        StoreSources {
            settings,
            opened: Mutex::default(),
        }
    }

    /// The store at `url` (opened now, or as before).
    pub fn open(&self, url: &str) -> Result<Arc<Opened>, String> {
        if let Some(o) = self.opened.lock().expect("not poisoned").get(url) {
            return Ok(o.clone());
        }
        let mut cfg = StoreConfig::new(url, self.settings.options.clone());
        if let Some(secs) = self.settings.retry_timeout_secs {
            cfg.retry_timeout_secs = secs;
        }
        let (store, prefix, _) = cfg.open().map_err(|e| e.to_string())?;
        let o = Arc::new(Opened { store, prefix });
        self.opened
            .lock()
            .expect("not poisoned")
            .insert(url.to_string(), o.clone());
        Ok(o)
    }
}

/// Lists every object below the store's prefix as [`crate::scan::walk`] walks a tree: each is
/// handed to `f` (as a file entry, or `Excluded`) in the store's listing order. A listing that
/// fails is the root's error. Blocks: call it on a blocking thread.
pub fn list<E>(
    rt: &tokio::runtime::Handle,
    url: &str,
    opened: &Opened,
    excludes: &Excludes,
    mut f: impl FnMut(Walked) -> Result<(), E>,
) -> Result<Result<(), E>, RootError> {
    let root_err = |reason: String| RootError {
        path: PathBuf::from(url),
        reason,
    };
    let prefix = opened.prefix.as_ref().to_string();
    let mut objects = opened.store.list(Some(&opened.prefix));
    // Keys have no directories: an exclude naming a directory excludes every key below it,
    // counted once (as a walk counts the directory it skips).
    let mut skipped_dir: Option<PathBuf> = None;
    loop {
        let next = rt
            .block_on(objects.try_next())
            .map_err(|e| root_err(format!("listing the store failed: {e}")))?;
        let Some(meta) = next else {
            return Ok(Ok(()));
        };
        let key = meta.location.as_ref();
        let rel = if prefix.is_empty() {
            key
        } else {
            match key.strip_prefix(&prefix).and_then(|r| r.strip_prefix('/')) {
                Some(r) => r,
                None => continue,
            }
        };
        let rel = Path::new(rel);
        if skipped_dir.as_deref().is_some_and(|d| rel.starts_with(d)) {
            continue;
        }
        let excluded = rel
            .ancestors()
            .filter(|a| !a.as_os_str().is_empty())
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .find(|a| excludes.matches_kind(a, *a != rel));
        let item = if let Some(a) = excluded {
            if a != rel {
                skipped_dir = Some(a.to_path_buf());
            }
            Walked::Excluded
        } else {
            let mtime = (
                meta.last_modified.timestamp(),
                meta.last_modified.timestamp_subsec_nanos(),
            );
            Walked::Entry(Entry::file(rel, meta.size, 0o644, mtime, 0))
        };
        if let Err(e) = f(item) {
            return Ok(Err(e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::ObjectStoreExt;

    #[test]
    fn a_listing_walks_the_objects_below_the_prefix_as_files_and_applies_excludes() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let store = Arc::new(InMemory::new());
        rt.block_on(async {
            for (k, v) in [
                ("data/a.txt", &b"aa"[..]),
                ("data/sub/b.bin", b"bbb"),
                ("data/tmp/x", b"x"),
                ("data/tmp/y", b"y"),
                ("datab/c", b"not below the prefix"),
                ("other/d", b"nor this"),
            ] {
                store.put(&Key::from(k), v.to_vec().into()).await.unwrap();
            }
        });
        let opened = Opened {
            store,
            prefix: Key::from("data"),
        };
        let excludes = Excludes::new(&["tmp".to_string()]).unwrap();
        let mut seen = Vec::new();
        let r = list(rt.handle(), "memory:///data", &opened, &excludes, |w| {
            seen.push(w);
            Ok::<(), ()>(())
        });
        assert!(matches!(r, Ok(Ok(()))));
        let files: Vec<(String, u64)> = seen
            .iter()
            .filter_map(|w| match w {
                Walked::Entry(e) => Some((e.path.to_str().unwrap().to_string(), e.file_size)),
                _ => None,
            })
            .collect();
        assert_eq!(files, [("a.txt".into(), 2), ("sub/b.bin".into(), 3)]);
        // The excluded directory is counted once, as a walk counts it.
        assert_eq!(seen.iter().filter(|w| **w == Walked::Excluded).count(), 1);
        assert_eq!(
            opened.key(Path::new("sub/b.bin")).unwrap().as_ref(),
            "data/sub/b.bin"
        );
    }
}
