//! The object-store sink: a target agent that writes into S3, Google Cloud Storage or Azure Blob
//! storage (one code path, the `object_store` crate) instead of a directory.
//!
//! Keys are `<prefix>/<target path>/<path>`, names as they are (UTF-8 only: a store's keys are
//! text, so a name that is not UTF-8 is refused with its reason, never changed). What a segment
//! carries becomes visible only at its commit, after its hashes agreed and its lease still held,
//! and the target reports only after the commit returned: a segment is verified only when the
//! store holds its bytes.
//!
//! - Every object carries its file's mtime, mode and owner as user metadata (`ferry-mtime`,
//!   `ferry-mode`, `ferry-owner`; `ferry_…` on Azure, whose metadata names are identifiers),
//!   but a split file on Azure, whose uploads take no metadata through `object_store`.
//! - A whole file of at most [`PART_BYTES`] is buffered and stored with one PUT at commit (a
//!   bundle's PUTs run [`PUTS_AT_ONCE`] at a time), with its content BLAKE3 as `ferry-blake3`.
//!   Until the commit such files wait in memory within [`MEMORY_BUDGET`] over all segments,
//!   else in an unlinked spill file in the agent's state directory (on top of the budget: the
//!   file each stream is receiving, up to 8 MiB, and a commit's read-back, up to 16 MiB).
//!   A larger whole file streams into a multipart upload as it arrives (its metadata is set when
//!   the upload starts, before its hash is known: no `ferry-blake3`), completed at commit,
//!   aborted if the segment is dropped.
//! - A file split over several segments is one multipart upload: each piece uploads its own
//!   parts (numbered from the piece's index, so pieces arrive in any order, on any stream); the
//!   upload's id and every durable piece's parts are recorded in a sidecar in the agent's state
//!   directory (`object-parts/<cluster>/<uuid>/<hash of key>.json`, fsynced at commit, before the
//!   report), and the last piece completes the upload. A target that restarts reuses the upload
//!   and the parts its sidecar lists: verified pieces are never sent again.
//! - A symlink is a marker object (empty, `ferry-symlink` = its target); a hardlink is a
//!   server-side copy of its first name (refused until that name is stored); a sparse file's
//!   holes are stored as zeros; a deletion removes the key and every key below it. Directories
//!   are implicit in keys: an empty directory, and a directory's own mode and mtime, are not
//!   kept.
//! - Deltas of sync rounds are refused as stale (`BaseGone`): the next round sends the file whole.
//!
//! The store's own integrity check: S3 uploads carry `x-amz-checksum-sha256` unless the operator
//! chose otherwise, so the store refuses a body that was damaged on its way.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;
use object_store::{
    Attribute, Attributes, ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutMultipartOptions,
    PutOptions, PutPayload, WriteMultipart,
};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use super::{save_json, SegmentWrite, Sink, SinkError};
use crate::segment::{Entry, EntryKind};
use ferry_common::hash::hex;
use ferry_common::path::{display, validate_relative, validate_subdir};

/// The size of an upload part, and the largest whole file stored with a single PUT.
pub const PART_BYTES: u64 = 8 * 1024 * 1024;
/// The smallest part a store accepts (S3's limit; every part but an upload's last).
const MIN_PART: u64 = 5 * 1024 * 1024;
/// The most parts an upload may have (S3's limit).
const MAX_PARTS: u64 = 10_000;
/// Parts a large file is planned in at most, leaving room under [`MAX_PARTS`] for the shorter
/// parts at the ends of pieces.
const PART_BUDGET: u64 = 9_000;
/// Part uploads one stream keeps in flight.
const PARTS_IN_FLIGHT: usize = 2;
/// PUTs of one bundle's small files run this many at once.
pub const PUTS_AT_ONCE: usize = 16;
/// Small files a sink holds in memory, over all the segments it is writing, until their
/// commits store them (nothing is visible before its segment's commit). Past it, a segment's
/// small files wait in a spill file in the agent's state directory instead: what waits for
/// commits stays bounded however many segments arrive at once, and no writer ever waits for
/// another.
pub const MEMORY_BUDGET: u64 = 64 * 1024 * 1024;
/// Spilled bytes a commit reads back at once (a group of PUTs).
const SPILL_READ_AT_ONCE: u64 = 16 * 1024 * 1024;

/// A store the sink can write to: objects, and multipart uploads it can resume by id.
pub trait Store: ObjectStore + MultipartStore {}
impl<T: ObjectStore + MultipartStore> Store for T {}

/// The `[target_store]` section of an agent's config: where a target writes when it writes to
/// an object store instead of a directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix` (or the stores'
    /// https URLs).
    pub url: String,
    /// The store's own settings, by the names `object_store` gives them (`endpoint`, `region`,
    /// `allow_http`, `checksum_algorithm`, ...). Credentials come from the environment as each
    /// cloud's tools read them (`AWS_ACCESS_KEY_ID`, `GOOGLE_SERVICE_ACCOUNT`,
    /// `AZURE_STORAGE_ACCOUNT_KEY`, ...) or from instance metadata; they may be given here too.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// How long one call to the store keeps retrying (exponential backoff from 100 ms, at most
    /// 15 s apart) before the segment fails and the coordinator's own backoff and
    /// `max_attempts` take over; default 60.
    #[serde(default = "default_retry_secs")]
    pub retry_timeout_secs: u64,
}

fn default_retry_secs() -> u64 {
    60
}

impl StoreConfig {
    /// A store at `url` with `options`, other settings at their defaults.
    pub fn new(url: impl Into<String>, options: BTreeMap<String, String>) -> Self {
        StoreConfig {
            url: url.into(),
            options,
            retry_timeout_secs: default_retry_secs(),
        }
    }

    fn retry(&self) -> object_store::RetryConfig {
        object_store::RetryConfig {
            backoff: object_store::BackoffConfig {
                init_backoff: std::time::Duration::from_millis(100),
                max_backoff: std::time::Duration::from_secs(15),
                base: 2.0,
            },
            max_retries: 10,
            retry_timeout: std::time::Duration::from_secs(self.retry_timeout_secs),
        }
    }
}

fn config_error(url: &str, reason: impl std::fmt::Display) -> SinkError {
    SinkError::Root {
        root: PathBuf::from(url),
        reason: reason.to_string(),
    }
}

fn apply_options<K, B>(
    url: &str,
    mut builder: B,
    options: &BTreeMap<String, String>,
    with: impl Fn(B, K, &str) -> B,
) -> Result<B, SinkError>
where
    K: std::str::FromStr,
{
    for (k, v) in options {
        let key = k.parse::<K>().map_err(|_| {
            config_error(
                url,
                format!("[target_store] option {k:?} is not a setting of this store"),
            )
        })?;
        builder = with(builder, key, v);
    }
    Ok(builder)
}

impl StoreConfig {
    /// The store, the prefix below which this agent writes, and whether it is Azure (whose
    /// metadata names are identifiers). Nothing is contacted yet.
    pub fn open(&self) -> Result<(Arc<dyn Store>, Key, bool), SinkError> {
        // The stores' HTTPS client (reqwest, rustls without a provider of its own) takes the
        // process's: ring, as everywhere else in ferry. Already installed is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let url = url::Url::parse(&self.url)
            .map_err(|e| config_error(&self.url, format!("not a URL: {e}")))?;
        let (scheme, prefix) = ObjectStoreScheme::parse(&url)
            .map_err(|e| config_error(&self.url, format!("not an object-store URL: {e}")))?;
        let azure = scheme == ObjectStoreScheme::MicrosoftAzure;
        let store: Arc<dyn Store> = match scheme {
            ObjectStoreScheme::AmazonS3 => {
                use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, Checksum};
                let mut b = AmazonS3Builder::from_env()
                    .with_url(self.url.clone())
                    .with_retry(self.retry());
                if !self
                    .options
                    .keys()
                    .any(|k| k.ends_with("checksum_algorithm"))
                {
                    b = b.with_checksum_algorithm(Checksum::SHA256);
                }
                let b =
                    apply_options(&self.url, b, &self.options, |b, k: AmazonS3ConfigKey, v| {
                        b.with_config(k, v)
                    })?;
                Arc::new(b.build().map_err(|e| config_error(&self.url, e))?)
            }
            ObjectStoreScheme::GoogleCloudStorage => {
                use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
                let b = GoogleCloudStorageBuilder::from_env()
                    .with_url(self.url.clone())
                    .with_retry(self.retry());
                let b = apply_options(&self.url, b, &self.options, |b, k: GoogleConfigKey, v| {
                    b.with_config(k, v)
                })?;
                Arc::new(b.build().map_err(|e| config_error(&self.url, e))?)
            }
            ObjectStoreScheme::MicrosoftAzure => {
                use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
                let b = MicrosoftAzureBuilder::from_env()
                    .with_url(self.url.clone())
                    .with_retry(self.retry());
                let b = apply_options(&self.url, b, &self.options, |b, k: AzureConfigKey, v| {
                    b.with_config(k, v)
                })?;
                Arc::new(b.build().map_err(|e| config_error(&self.url, e))?)
            }
            other => {
                return Err(config_error(
                    &self.url,
                    format!(
                    "{other:?} is not an object store a target can write to (s3://, gs://, az://)"
                ),
                ))
            }
        };
        Ok((store, prefix, azure))
    }
}

/// What an object sink has done, for tests and the agent's status.
#[derive(Debug, Default)]
pub struct ObjectCounters {
    /// Objects stored with one PUT (small files, symlink markers).
    pub puts: AtomicU64,
    /// Parts uploaded (of large whole files and of split files).
    pub parts: AtomicU64,
    /// Multipart uploads started for split files.
    pub uploads_created: AtomicU64,
    /// Multipart uploads completed (objects made visible from parts).
    pub uploads_completed: AtomicU64,
    /// Server-side copies (hardlinks).
    pub copies: AtomicU64,
    /// Objects deleted.
    pub deletes: AtomicU64,
    /// Bytes of small files that waited for their commit in a spill file, past
    /// [`MEMORY_BUDGET`].
    pub spilled: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Writes segments into an object store below one prefix.
pub struct ObjectSink {
    store: Arc<dyn Store>,
    prefix: Key,
    /// `<state_dir>/object-parts`: the sidecars of split files' uploads.
    parts_dir: PathBuf,
    /// One lock per split file's key, so that pieces landing at once update its sidecar in turn.
    locks: Mutex<std::collections::HashMap<String, Arc<Mutex<()>>>>,
    handle: tokio::runtime::Handle,
    /// Between `ferry` and a metadata field's name: `-`, or `_` on Azure.
    meta_sep: char,
    /// `<state_dir>/object-spill`: where small files past the memory budget wait (files
    /// unlinked at creation: nothing is left there by a crash).
    spill_dir: PathBuf,
    /// Bytes of small files held in memory for commits, over all writers.
    held: AtomicU64,
    /// [`MEMORY_BUDGET`], or a test's.
    budget: u64,
    /// What it has done.
    pub counters: ObjectCounters,
}

impl ObjectSink {
    /// A sink writing below `prefix` of `store`; sidecars under `state_dir`. Its calls run on
    /// `handle`'s runtime (the writer's methods block: the target calls them in
    /// `block_in_place`).
    pub fn new(
        store: Arc<dyn Store>,
        prefix: Key,
        state_dir: &std::path::Path,
        handle: tokio::runtime::Handle,
    ) -> Result<Self, SinkError> {
        let parts_dir = state_dir.join("object-parts");
        std::fs::create_dir_all(&parts_dir).map_err(super::io_at("cannot create", &parts_dir))?;
        let spill_dir = state_dir.join("object-spill");
        std::fs::create_dir_all(&spill_dir).map_err(super::io_at("cannot create", &spill_dir))?;
        Ok(ObjectSink {
            store,
            prefix,
            parts_dir,
            locks: Default::default(),
            handle,
            meta_sep: '-',
            spill_dir,
            held: AtomicU64::new(0),
            budget: MEMORY_BUDGET,
            counters: ObjectCounters::default(),
        })
    }

    /// The same sink holding at most `bytes` of small files in memory (tests).
    pub fn with_memory_budget(mut self, bytes: u64) -> Self {
        self.budget = bytes;
        self
    }

    /// Bytes of small files held in memory for commits right now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// A new spill file, already unlinked.
    fn spill_file(&self) -> Result<std::fs::File, SinkError> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = &self.spill_dir;
        let tmpfile = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(dir);
        match tmpfile {
            Ok(f) => Ok(f),
            // A file system without O_TMPFILE: a named file, unlinked at once.
            Err(_) => {
                static NEXT: AtomicU64 = AtomicU64::new(0);
                let path = dir.join(format!(
                    "spill-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                ));
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(super::io_at("cannot create", &path))?;
                std::fs::remove_file(&path).map_err(super::io_at("cannot remove", &path))?;
                Ok(f)
            }
        }
    }

    /// The same sink naming its metadata `ferry_<field>` (Azure: metadata names are
    /// identifiers, no `-`).
    pub fn with_underscored_metadata(mut self) -> Self {
        self.meta_sep = '_';
        self
    }

    /// Opens the configured store and checks that it answers (one listing below the prefix),
    /// so that a wrong endpoint, bucket or credential stops the agent at start with the store's
    /// own words.
    pub async fn open(cfg: &StoreConfig, state_dir: &std::path::Path) -> Result<Self, SinkError> {
        let (store, prefix, azure) = cfg.open()?;
        store
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(|e| config_error(&cfg.url, format!("the store does not answer: {e}")))?;
        let sink = Self::new(store, prefix, state_dir, tokio::runtime::Handle::current())?;
        Ok(if azure {
            sink.with_underscored_metadata()
        } else {
            sink
        })
    }

    fn lock(&self, key: &Key) -> Arc<Mutex<()>> {
        self.locks
            .lock()
            .expect("not poisoned")
            .entry(key.to_string())
            .or_default()
            .clone()
    }

    /// Forgets a deleted migration (`cluster/uuid`): aborts the multipart uploads its split
    /// files left open (completed ones are objects, and stay) and removes their sidecars.
    /// Returns how many uploads it aborted. A failed abort keeps its sidecar: the next call
    /// tries again.
    pub async fn forget(&self, migration: &str) -> Result<u64, SinkError> {
        super::check_migration_key(migration)?;
        let dir = self.parts_dir.join(migration);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(super::io_at("cannot list", &dir)(e)),
        };
        let mut aborted = 0;
        for e in entries {
            let path = e.map_err(super::io_at("cannot list", &dir))?.path();
            let Some(u) = super::load_json::<Upload>(&path)? else {
                continue;
            };
            if !u.complete {
                let key = Key::parse(&u.key).map_err(|err| SinkError::BadEntry {
                    path: u.key.clone(),
                    reason: format!("a sidecar names no valid key: {err}"),
                })?;
                match self.store.abort_multipart(&key, &u.id).await {
                    Ok(()) => aborted += 1,
                    // Gone already (aborted, or expired by the store's lifecycle rules).
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(err) => return Err(store_error("abort the upload of", &key)(err)),
                }
            }
            std::fs::remove_file(&path).map_err(super::io_at("cannot remove", &path))?;
        }
        let _ = std::fs::remove_dir(&dir);
        Ok(aborted)
    }

    fn sidecar_path(&self, migration: &str, key: &Key) -> PathBuf {
        let h = hex(blake3::hash(key.as_ref().as_bytes()).as_bytes());
        self.parts_dir.join(migration).join(format!("{h}.json"))
    }

    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.handle.block_on(f)
    }
}

fn store_error<'a>(
    op: &'static str,
    key: &'a Key,
) -> impl FnOnce(object_store::Error) -> SinkError + 'a {
    move |source| SinkError::Store {
        op,
        key: key.to_string(),
        source,
    }
}

/// The parts of piece `index` of a file of `file_size` bytes cut into pieces of `piece` bytes:
/// `(part index, offset in the piece, length)`. Every piece but the last has the same number of
/// parts, so part indexes are contiguous over the file whatever order pieces arrive in; every
/// part but the file's last is at least [`MIN_PART`]; a file has at most [`MAX_PARTS`].
pub fn piece_parts(
    file_size: u64,
    piece: u64,
    index: u32,
) -> Result<Vec<(usize, u64, u64)>, String> {
    if piece == 0 || file_size == 0 {
        return Err("a split file of no bytes or with pieces of no bytes".into());
    }
    let pieces = file_size.div_ceil(piece);
    if u64::from(index) >= pieces {
        return Err(format!("piece {index} of a file of {pieces} pieces"));
    }
    if pieces > 1 && piece < MIN_PART {
        return Err(format!(
            "pieces of {piece} bytes are below the object store's smallest upload part \
             ({MIN_PART} bytes): create the migration with --segment-size of at least 8MiB"
        ));
    }
    let target = PART_BYTES.max(file_size.div_ceil(PART_BUDGET));
    let per_piece = (piece / target).max(1);
    let start = u64::from(index) * piece;
    let len = piece.min(file_size - start);
    let count = if len == piece {
        per_piece
    } else {
        (len / target).clamp(1, per_piece)
    };
    let total = (pieces - 1) * per_piece + {
        let last = file_size - (pieces - 1) * piece;
        if last == piece {
            per_piece
        } else {
            (last / target).clamp(1, per_piece)
        }
    };
    if total > MAX_PARTS {
        return Err(format!(
            "a file of {file_size} bytes in pieces of {piece} bytes needs {total} upload parts, \
             more than the store's {MAX_PARTS}: create the migration with a larger --segment-size"
        ));
    }
    let each = len / count;
    Ok((0..count)
        .map(|j| {
            let n = if j + 1 == count {
                len - (count - 1) * each
            } else {
                each
            };
            ((u64::from(index) * per_piece + j) as usize, j * each, n)
        })
        .collect())
}

/// A split file's multipart upload, as its sidecar records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Upload {
    key: String,
    id: String,
    file_size: u64,
    mtime: (i64, u32),
    chunk_count: u32,
    piece: u64,
    /// Durable pieces: their parts (index, store's id) and the BLAKE3 of what they carried.
    pieces: BTreeMap<u32, DurablePiece>,
    /// The upload was completed: the object is in place.
    complete: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DurablePiece {
    parts: Vec<(usize, String)>,
    blake3: String,
}

impl Upload {
    fn describes(&self, e: &Entry, piece: u64) -> bool {
        self.file_size == e.file_size
            && self.chunk_count == e.chunk_count
            && self.mtime == (e.mtime_sec, e.mtime_nsec)
            && self.piece == piece
    }
}

/// Walks a piece's wire bytes onto its logical bytes: a sparse piece's holes become zeros.
struct Fill {
    runs: Option<Vec<(u64, u64)>>,
    run: usize,
    /// Logical position (file offset) reached.
    pos: u64,
    end: u64,
    wire_left: u64,
}

static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

impl Fill {
    fn new(e: &Entry) -> Self {
        Fill {
            runs: e.data_runs.clone(),
            run: 0,
            pos: e.offset,
            end: e.offset.saturating_add(e.len),
            wire_left: e.wire_len(),
        }
    }

    fn zeros(
        &mut self,
        upto: u64,
        out: &mut dyn FnMut(&[u8]) -> Result<(), SinkError>,
    ) -> Result<(), SinkError> {
        while self.pos < upto {
            let n = (upto - self.pos).min(ZEROS.len() as u64) as usize;
            out(&ZEROS[..n])?;
            self.pos += n as u64;
        }
        Ok(())
    }

    fn feed(
        &mut self,
        e: &Entry,
        mut data: &[u8],
        out: &mut dyn FnMut(&[u8]) -> Result<(), SinkError>,
    ) -> Result<(), SinkError> {
        if data.len() as u64 > self.wire_left {
            return Err(bad(e, "more bytes than the entry announced"));
        }
        self.wire_left -= data.len() as u64;
        if self.runs.is_none() {
            self.pos += data.len() as u64;
            return out(data);
        }
        while !data.is_empty() {
            let Some(&(start, len)) = self.runs.as_deref().and_then(|r| r.get(self.run)) else {
                return Err(bad(e, "bytes beyond its data runs"));
            };
            if start < self.pos || start.saturating_add(len) > self.end {
                return Err(bad(e, "data runs out of order or outside the piece"));
            }
            self.zeros(start, out)?;
            let n = (start + len - self.pos).min(data.len() as u64) as usize;
            out(&data[..n])?;
            self.pos += n as u64;
            data = &data[n..];
            if self.pos == start + len {
                self.run += 1;
            }
        }
        Ok(())
    }

    fn close(
        &mut self,
        e: &Entry,
        out: &mut dyn FnMut(&[u8]) -> Result<(), SinkError>,
    ) -> Result<(), SinkError> {
        if self.wire_left != 0 {
            return Err(bad(e, "fewer bytes than the entry announced"));
        }
        let end = self.end;
        self.zeros(end, out)
    }
}

fn bad(e: &Entry, reason: &str) -> SinkError {
    SinkError::BadEntry {
        path: display(&e.path),
        reason: reason.into(),
    }
}

impl ObjectSink {
    /// The store written to.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The key below which a migration with `target_path` writes (without a trailing `/`;
    /// empty: the bucket's top).
    pub fn base(&self, target_path: &str) -> Result<String, SinkError> {
        let sub = validate_subdir(target_path)?;
        let sub = sub.to_str().ok_or_else(|| SinkError::BadEntry {
            path: target_path.into(),
            reason: "an object store's keys are UTF-8".into(),
        })?;
        Ok([self.prefix.as_ref(), sub.trim_matches('/')]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("/"))
    }

    /// The metadata attribute ferry names `field` (`ferry-field`, `ferry_field` on Azure).
    pub fn meta(&self, field: &str) -> Attribute {
        Attribute::Metadata(format!("ferry{}{field}", self.meta_sep).into())
    }

    /// The metadata a store keeps with an object: what a file system would keep in its inode,
    /// as `ferry-mtime`, `ferry-mode`, `ferry-owner`, `ferry-blake3`, `ferry-symlink` (with `_`
    /// on Azure, whose metadata names are identifiers; `-` elsewhere, because HTTP servers and
    /// proxies may drop headers with underscores).
    fn attributes(&self, e: &Entry, blake3: Option<&[u8; 32]>) -> Attributes {
        let mut a = Attributes::new();
        let sep = self.meta_sep;
        let mut meta = |k: &str, v: String| {
            a.insert(
                Attribute::Metadata(format!("ferry{sep}{k}").into()),
                v.into(),
            );
        };
        meta("mtime", format!("{}.{:09}", e.mtime_sec, e.mtime_nsec));
        meta("mode", format!("{:o}", e.mode & 0o7777));
        meta("owner", format!("{}:{}", e.uid, e.gid));
        if let Some(h) = blake3 {
            meta("blake3", hex(h));
        }
        if e.kind == EntryKind::Symlink {
            meta(
                "symlink",
                percent_encode(e.link_target.as_os_str().as_encoded_bytes()),
            );
        }
        a
    }
}

/// `bytes` as header-safe text: visible ASCII but `%` as it is, every other byte `%HH` (a
/// symlink's target may be any bytes; a metadata value travels as an HTTP header).
pub fn percent_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The bytes [`percent_encode`] encoded; `None` if `text` is not its output.
pub fn percent_decode(text: &str) -> Option<Vec<u8>> {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// What a commit does, in the order of the segment's entries.
enum Op {
    Put {
        key: Key,
        data: Body,
        attrs: Attributes,
    },
    Finish {
        key: Key,
        upload: WriteMultipart,
    },
    Copy {
        from: Key,
        to: Key,
        entry: Entry,
    },
    Delete {
        key: Key,
    },
    Piece(PieceDone),
}

/// A small file's bytes, waiting for its segment's commit.
enum Body {
    /// In memory (counted in the sink's `held`).
    Held(Bytes),
    /// In the writer's spill file.
    Spilled { at: u64, len: u64 },
}

impl Body {
    fn spilled_len(&self) -> u64 {
        match self {
            Body::Held(_) => 0,
            Body::Spilled { len, .. } => *len,
        }
    }
}

struct PieceDone {
    key: Key,
    entry: Entry,
    upload: String,
    parts: Vec<(usize, PartId)>,
    /// Only compared: the file was complete in the store before this piece came again.
    resent: bool,
}

/// The entry being written (one per stream: the BLAKE3 state's size does not matter).
#[allow(clippy::large_enum_variant)]
enum Current {
    Whole {
        key: Key,
        entry: Entry,
        fill: Fill,
        buf: Vec<u8>,
        hasher: blake3::Hasher,
        upload: Option<WriteMultipart>,
    },
    Piece {
        key: Key,
        entry: Entry,
        fill: Fill,
        plan: Vec<(usize, u64, u64)>,
        next: usize,
        buf: Vec<u8>,
        upload: String,
        running: JoinSet<Result<(usize, PartId), SinkError>>,
        parts: Vec<(usize, PartId)>,
        resent: bool,
    },
    Nothing {
        entry: Entry,
    },
}

/// One segment being written into the store.
pub struct ObjectWriter<'a> {
    sink: &'a ObjectSink,
    base: String,
    migration: String,
    hasher: blake3::Hasher,
    current: Option<Current>,
    ops: std::collections::VecDeque<Op>,
    hash: Option<[u8; 32]>,
    /// Bytes this writer holds in memory, counted in the sink's `held`.
    held: u64,
    /// Its spill file and the bytes in it.
    spill: Option<(std::fs::File, u64)>,
}

impl Sink for ObjectSink {
    type Writer<'a> = ObjectWriter<'a>;

    fn begin(
        &self,
        target_path: &str,
        migration: &str,
        _segment_id: u64,
        _epoch: u64,
    ) -> Result<ObjectWriter<'_>, SinkError> {
        let base = self.base(target_path)?;
        super::check_migration_key(migration)?;
        Ok(ObjectWriter {
            sink: self,
            base,
            migration: migration.to_string(),
            hasher: blake3::Hasher::new(),
            current: None,
            ops: Default::default(),
            hash: None,
            held: 0,
            spill: None,
        })
    }
}

/// Why a name cannot be an object's key, if it cannot: keys are text (UTF-8) without control
/// characters. Sources check it at scan time (such a name is an issue, not sent) and the sink
/// again.
pub fn key_refusal(path: &std::path::Path) -> Option<&'static str> {
    match path.to_str() {
        None => Some(
            "its name is not UTF-8 and an object store's keys are text: rename it at the source \
             or copy this tree to a file-system target",
        ),
        Some(s) if s.chars().any(|c| c.is_ascii_control()) => Some(
            "its name holds a control character, which an object store's keys may not: rename \
             it at the source or copy this tree to a file-system target",
        ),
        Some(_) => None,
    }
}

impl ObjectWriter<'_> {
    fn key_of(&self, e: &Entry, path: &std::path::Path) -> Result<Key, SinkError> {
        validate_relative(path.as_os_str().as_encoded_bytes())?;
        if let Some(why) = key_refusal(path) {
            return Err(bad(e, why));
        }
        let rel = path.to_str().expect("checked by key_refusal");
        let full = if self.base.is_empty() {
            rel.to_string()
        } else {
            format!("{}/{rel}", self.base)
        };
        Key::parse(&full).map_err(|err| bad(e, &format!("not a valid object key: {err}")))
    }

    /// Ends the current entry: its bytes all arrived; what it needs at commit is queued.
    fn end_entry(&mut self) -> Result<(), SinkError> {
        let Some(cur) = self.current.take() else {
            return Ok(());
        };
        let sink = self.sink;
        match cur {
            Current::Nothing { .. } => {}
            Current::Whole {
                key,
                entry,
                mut fill,
                mut buf,
                mut hasher,
                mut upload,
            } => {
                fill.close(&entry, &mut |d| {
                    write_whole(sink, &key, &entry, &mut buf, &mut hasher, &mut upload, d)
                })?;
                match upload {
                    Some(upload) => {
                        sink.counters
                            .parts
                            .fetch_add(entry.file_size.div_ceil(PART_BYTES), Ordering::Relaxed);
                        self.ops.push_back(Op::Finish { key, upload })
                    }
                    None => {
                        let h = *hasher.finalize().as_bytes();
                        let attrs = sink.attributes(&entry, Some(&h));
                        let data = self.keep(buf)?;
                        self.ops.push_back(Op::Put { key, data, attrs })
                    }
                }
            }
            Current::Piece {
                key,
                entry,
                mut fill,
                plan,
                mut next,
                mut buf,
                upload,
                mut running,
                mut parts,
                resent,
            } => {
                fill.close(&entry, &mut |d| {
                    piece_bytes(
                        sink,
                        &key,
                        &upload,
                        &plan,
                        &mut next,
                        &mut buf,
                        &mut running,
                        &mut parts,
                        resent,
                        d,
                    )
                })?;
                if !resent && (next != plan.len() || !buf.is_empty()) {
                    return Err(bad(&entry, "the piece's bytes do not fill its parts"));
                }
                while let Some(r) = sink.block(running.join_next()) {
                    parts.push(r.map_err(|e| bad(&entry, &format!("part upload panicked: {e}")))??);
                }
                parts.sort_by_key(|p| p.0);
                self.ops.push_back(Op::Piece(PieceDone {
                    key,
                    entry,
                    upload,
                    parts,
                    resent,
                }));
            }
        }
        Ok(())
    }

    /// The multipart upload of a split file, created (and recorded) by its first piece to
    /// arrive, or the one a sidecar records; `None` when the file is complete already.
    fn upload_for(&self, key: &Key, e: &Entry, piece: u64) -> Result<(String, bool), SinkError> {
        let sink = self.sink;
        let lock = sink.lock(key);
        let _guard = lock.lock().expect("not poisoned");
        let path = sink.sidecar_path(&self.migration, key);
        if let Some(mut up) = super::load_json::<Upload>(&path)? {
            if up.describes(e, piece) {
                if !up.complete && up.pieces.len() as u64 == u64::from(up.chunk_count) {
                    // Every piece was recorded, but the target stopped before recording the
                    // completion: complete it (or find it completed) before the piece sent
                    // again is checked against what the store holds.
                    self.complete(&mut up, key, &path, e)?;
                }
                return Ok((up.id, up.complete));
            }
            if !up.complete {
                // An older version's upload: its parts will never be completed.
                let old = Key::parse(&up.key).unwrap_or_else(|_| key.clone());
                if let Err(err) = sink.block(sink.store.abort_multipart(&old, &up.id)) {
                    tracing::warn!(message = "Cannot abort an older version's multipart upload; the store's lifecycle rules will remove it.", key = %up.key, error = %err);
                }
            }
        }
        let opts = PutMultipartOptions {
            attributes: sink.attributes(e, None),
            ..Default::default()
        };
        let id = match sink.block(sink.store.create_multipart_opts(key, opts)) {
            // Azure's uploads (blocks) take no metadata through object_store: the object is
            // stored without it.
            Err(object_store::Error::NotSupported { .. }) => {
                sink.block(sink.store.create_multipart(key))
            }
            other => other,
        }
        .map_err(store_error("cannot start a multipart upload of", key))?;
        bump(&sink.counters.uploads_created);
        let up = Upload {
            key: key.to_string(),
            id: id.clone(),
            file_size: e.file_size,
            mtime: (e.mtime_sec, e.mtime_nsec),
            chunk_count: e.chunk_count,
            piece,
            pieces: BTreeMap::new(),
            complete: false,
        };
        save_json(&path, &up)?;
        Ok((id, false))
    }

    /// Records a durable piece in its file's sidecar; the last completes the upload.
    fn record_piece(&self, p: PieceDone, hash: &[u8; 32]) -> Result<(), SinkError> {
        let sink = self.sink;
        let lock = sink.lock(&p.key);
        let _guard = lock.lock().expect("not poisoned");
        let path = sink.sidecar_path(&self.migration, &p.key);
        let lost = || SinkError::UploadLost {
            path: display(&p.entry.path),
            upload: p.upload.clone(),
        };
        let mut up = match super::load_json::<Upload>(&path)? {
            Some(up) if up.id == p.upload => up,
            _ => return Err(lost()),
        };
        // The piece's parts are in the store, its sidecar does not list them yet.
        ferry_common::fault_point!("object::piece_before_record");
        if p.resent || up.complete {
            // The file is in the store already: a piece sent again must be what it holds.
            return match up.pieces.get(&p.entry.chunk_index) {
                Some(d) if d.blake3 == hex(hash) => Ok(()),
                _ => Err(SinkError::ResentDiffers {
                    path: display(&p.entry.path),
                    offset: p.entry.offset,
                }),
            };
        }
        up.pieces.insert(
            p.entry.chunk_index,
            DurablePiece {
                parts: p
                    .parts
                    .iter()
                    .map(|(i, id)| (*i, id.content_id.clone()))
                    .collect(),
                blake3: hex(hash),
            },
        );
        save_json(&path, &up)?;
        if up.pieces.len() as u64 == u64::from(up.chunk_count) {
            ferry_common::fault_point!("object::last_piece_recorded_before_complete");
            self.complete(&mut up, &p.key, &path, &p.entry)?;
        }
        Ok(())
    }

    /// Completes `up`, every piece of which is recorded, and records that it is. A store that
    /// no longer knows the upload may have completed it just before this target stopped (the
    /// sidecar is saved after the completion): the object in place, of the file's size and, if
    /// the store keeps metadata, its mtime, is that completion.
    fn complete(
        &self,
        up: &mut Upload,
        key: &Key,
        path: &std::path::Path,
        e: &Entry,
    ) -> Result<(), SinkError> {
        let sink = self.sink;
        let mut parts: Vec<(usize, String)> = up
            .pieces
            .values()
            .flat_map(|d| d.parts.iter().cloned())
            .collect();
        parts.sort_by_key(|p| p.0);
        if parts.iter().enumerate().any(|(i, p)| p.0 != i) {
            return Err(bad(e, "the pieces' parts are not contiguous"));
        }
        let ids = parts
            .into_iter()
            .map(|(_, content_id)| PartId { content_id })
            .collect();
        match sink.block(sink.store.complete_multipart(key, &up.id, ids)) {
            Ok(_) => {}
            // The store no longer knows the upload: completed (by this target, before it
            // stopped) or aborted behind ferry's back.
            Err(object_store::Error::NotFound { .. }) => {
                if !self.completed_already(up, key)? {
                    return Err(SinkError::UploadLost {
                        path: display(&e.path),
                        upload: up.id.clone(),
                    });
                }
                tracing::info!(message = "A multipart upload was found completed before this target stopped.", key = %key, upload = %up.id);
            }
            Err(err) => return Err(store_error("cannot complete the upload of", key)(err)),
        }
        bump(&sink.counters.uploads_completed);
        // The object is in the store; its sidecar still says the upload is open.
        ferry_common::fault_point!("object::completed_before_record");
        up.complete = true;
        save_json(path, up)?;
        Ok(())
    }

    /// Whether the object `up` uploads is in the store: its size and its `ferry-mtime` are the
    /// file's. A store that keeps no metadata for uploads (Azure) cannot tell: no.
    fn completed_already(&self, up: &Upload, key: &Key) -> Result<bool, SinkError> {
        let sink = self.sink;
        let opts = object_store::GetOptions {
            head: true,
            ..Default::default()
        };
        match sink.block(sink.store.get_opts(key, opts)) {
            Ok(r) => {
                let name = Attribute::Metadata(format!("ferry{}mtime", sink.meta_sep).into());
                let want = format!("{}.{:09}", up.mtime.0, up.mtime.1);
                Ok(r.meta.size == up.file_size
                    && r.attributes.get(&name).is_some_and(|m| **m == *want))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(err) => Err(store_error("cannot look up", key)(err)),
        }
    }

    /// A small file's bytes until the commit: in memory within the sink's budget, else
    /// appended to this writer's spill file.
    fn keep(&mut self, buf: Vec<u8>) -> Result<Body, SinkError> {
        let sink = self.sink;
        let len = buf.len() as u64;
        // What the buffer takes, not what it holds.
        let takes = buf.capacity() as u64;
        let reserved = sink
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
                (h + takes <= sink.budget).then_some(h + takes)
            })
            .is_ok();
        if reserved {
            self.held += takes;
            return Ok(Body::Held(Bytes::from(buf)));
        }
        if self.spill.is_none() {
            self.spill = Some((sink.spill_file()?, 0));
        }
        let (file, end) = self.spill.as_mut().expect("just made");
        use std::os::unix::fs::FileExt;
        file.write_all_at(&buf, *end).map_err(super::io_at(
            "cannot write a spill file in",
            &sink.spill_dir,
        ))?;
        let at = *end;
        *end += len;
        sink.counters.spilled.fetch_add(len, Ordering::Relaxed);
        Ok(Body::Spilled { at, len })
    }

    /// Stores `puts`, in groups that read at most [`SPILL_READ_AT_ONCE`] spilled bytes back.
    fn run_puts(&self, puts: &mut Vec<(Key, Body, Attributes)>) -> Result<(), SinkError> {
        let mut group = Vec::new();
        let mut reading = 0;
        for (key, body, attrs) in std::mem::take(puts) {
            let len = body.spilled_len();
            if reading + len > SPILL_READ_AT_ONCE && !group.is_empty() {
                self.put_group(std::mem::take(&mut group))?;
                reading = 0;
            }
            reading += len;
            let data = match body {
                Body::Held(b) => b,
                Body::Spilled { at, len } => {
                    use std::os::unix::fs::FileExt;
                    let (file, _) = self.spill.as_ref().expect("a spilled body has its file");
                    let mut b = vec![0u8; len as usize];
                    file.read_exact_at(&mut b, at).map_err(super::io_at(
                        "cannot read a spill file in",
                        &self.sink.spill_dir,
                    ))?;
                    Bytes::from(b)
                }
            };
            group.push((key, data, attrs));
        }
        self.put_group(group)
    }

    fn put_group(&self, batch: Vec<(Key, Bytes, Attributes)>) -> Result<(), SinkError> {
        if batch.is_empty() {
            return Ok(());
        }
        let sink = self.sink;
        let store = &sink.store;
        sink.block(
            futures::stream::iter(batch.into_iter().map(|(key, data, attrs)| async move {
                let opts = PutOptions {
                    attributes: attrs,
                    ..Default::default()
                };
                store
                    .put_opts(&key, PutPayload::from_bytes(data), opts)
                    .await
                    .map_err(store_error("cannot store", &key))
                    .map(|_| ())
            }))
            .buffer_unordered(PUTS_AT_ONCE)
            .try_for_each(|()| {
                bump(&sink.counters.puts);
                async { Ok(()) }
            }),
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn write_whole(
    sink: &ObjectSink,
    key: &Key,
    entry: &Entry,
    buf: &mut Vec<u8>,
    hasher: &mut blake3::Hasher,
    upload: &mut Option<WriteMultipart>,
    data: &[u8],
) -> Result<(), SinkError> {
    match upload {
        None if (buf.len() + data.len()) as u64 <= PART_BYTES => {
            hasher.update(data);
            buf.extend_from_slice(data);
        }
        None => {
            // Too large for one PUT: a multipart upload, completed at commit. Its content
            // hash cannot be in its metadata (that is set when the upload starts).
            let opts = PutMultipartOptions {
                attributes: sink.attributes(entry, None),
                ..Default::default()
            };
            let up = sink
                .block(sink.store.put_multipart_opts(key, opts))
                .map_err(store_error("cannot start a multipart upload of", key))?;
            let mut w = WriteMultipart::new_with_chunk_size(up, PART_BYTES as usize);
            w.write(buf);
            w.write(data);
            buf.clear();
            buf.shrink_to_fit();
            *upload = Some(w);
        }
        Some(w) => {
            sink.block(w.wait_for_capacity(PARTS_IN_FLIGHT))
                .map_err(store_error("cannot upload a part of", key))?;
            w.write(data);
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn piece_bytes(
    sink: &ObjectSink,
    key: &Key,
    upload: &str,
    plan: &[(usize, u64, u64)],
    next: &mut usize,
    buf: &mut Vec<u8>,
    running: &mut JoinSet<Result<(usize, PartId), SinkError>>,
    parts: &mut Vec<(usize, PartId)>,
    resent: bool,
    mut data: &[u8],
) -> Result<(), SinkError> {
    if resent {
        return Ok(());
    }
    while !data.is_empty() {
        let Some(&(index, _, len)) = plan.get(*next) else {
            return Err(SinkError::BadEntry {
                path: key.to_string(),
                reason: "more bytes than the piece's parts".into(),
            });
        };
        let n = ((len as usize) - buf.len()).min(data.len());
        buf.extend_from_slice(&data[..n]);
        data = &data[n..];
        if buf.len() as u64 == len {
            *next += 1;
            while running.len() >= PARTS_IN_FLIGHT {
                if let Some(r) = sink.block(running.join_next()) {
                    parts.push(r.map_err(|e| SinkError::BadEntry {
                        path: key.to_string(),
                        reason: format!("part upload panicked: {e}"),
                    })??);
                }
            }
            let payload = PutPayload::from(Bytes::from(std::mem::take(buf)));
            let (store, key, id) = (sink.store.clone(), key.clone(), upload.to_string());
            let _g = sink.handle.enter();
            running.spawn(async move {
                store
                    .put_part(&key, &id, index, payload)
                    .await
                    .map(|p| (index, p))
                    .map_err(|source| SinkError::Store {
                        op: "cannot upload a part of",
                        key: key.to_string(),
                        source,
                    })
            });
            bump(&sink.counters.parts);
        }
    }
    Ok(())
}

impl SegmentWrite for ObjectWriter<'_> {
    fn start_entry(&mut self, e: &Entry) -> Result<(), SinkError> {
        let _rt = self.sink.handle.enter();
        self.end_entry()?;
        if !e.xattrs.is_empty() {
            return Err(bad(
                e,
                "extended attributes cannot be kept in an object store; create the migration \
                 without --xattrs",
            ));
        }
        let key = self.key_of(e, &e.path)?;
        self.current = Some(match e.kind {
            EntryKind::File if e.delta_base.is_some() => {
                return Err(SinkError::BaseGone {
                    path: display(&e.path),
                    reason: "an object store target takes whole files only; the next round \
                             sends this file whole"
                        .into(),
                })
            }
            EntryKind::File if e.chunk_count > 1 => {
                let piece = if e.chunk_index == 0 {
                    e.len
                } else {
                    e.offset / u64::from(e.chunk_index)
                };
                let plan =
                    piece_parts(e.file_size, piece, e.chunk_index).map_err(|r| bad(e, &r))?;
                let planned: u64 = plan.iter().map(|p| p.2).sum();
                if e.offset != u64::from(e.chunk_index) * piece || planned != e.len {
                    return Err(bad(e, "the piece's offset or length does not fit its file"));
                }
                let (upload, resent) = self.upload_for(&key, e, piece)?;
                Current::Piece {
                    key,
                    entry: e.clone(),
                    fill: Fill::new(e),
                    plan,
                    next: 0,
                    buf: Vec::new(),
                    upload,
                    running: JoinSet::new(),
                    parts: Vec::new(),
                    resent,
                }
            }
            EntryKind::File => {
                if e.offset != 0 || e.len != e.file_size {
                    return Err(bad(e, "a whole file's length is not its size"));
                }
                Current::Whole {
                    key,
                    entry: e.clone(),
                    fill: Fill::new(e),
                    buf: Vec::new(),
                    hasher: blake3::Hasher::new(),
                    upload: None,
                }
            }
            EntryKind::Symlink => {
                self.ops.push_back(Op::Put {
                    key,
                    data: Body::Held(Bytes::new()),
                    attrs: self.sink.attributes(e, None),
                });
                Current::Nothing { entry: e.clone() }
            }
            EntryKind::Hardlink => {
                let from = self.key_of(e, &e.link_target)?;
                self.ops.push_back(Op::Copy {
                    from,
                    to: key,
                    entry: e.clone(),
                });
                Current::Nothing { entry: e.clone() }
            }
            EntryKind::Delete => {
                self.ops.push_back(Op::Delete { key });
                Current::Nothing { entry: e.clone() }
            }
            EntryKind::Dir => Current::Nothing { entry: e.clone() },
        });
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> Result<(), SinkError> {
        let sink = self.sink;
        let _rt = sink.handle.enter();
        self.hasher.update(data);
        match self.current.as_mut() {
            None => Err(SinkError::BadEntry {
                path: String::new(),
                reason: "bytes before any entry".into(),
            }),
            Some(Current::Nothing { entry }) => {
                Err(bad(entry, "bytes for an entry that carries none"))
            }
            Some(Current::Whole {
                key,
                entry,
                fill,
                buf,
                hasher,
                upload,
            }) => fill.feed(entry, data, &mut |d| {
                write_whole(sink, key, entry, buf, hasher, upload, d)
            }),
            Some(Current::Piece {
                key,
                entry,
                fill,
                plan,
                next,
                buf,
                upload,
                running,
                parts,
                resent,
                ..
            }) => fill.feed(entry, data, &mut |d| {
                piece_bytes(
                    sink, key, upload, plan, next, buf, running, parts, *resent, d,
                )
            }),
        }
    }

    fn finish(&mut self) -> Result<[u8; 32], SinkError> {
        let _rt = self.sink.handle.enter();
        self.end_entry()?;
        let h = *self.hasher.finalize().as_bytes();
        self.hash = Some(h);
        Ok(h)
    }

    fn commit(mut self) -> Result<(), SinkError> {
        let hash = self.hash.ok_or_else(|| SinkError::BadEntry {
            path: String::new(),
            reason: "commit before finish".into(),
        })?;
        let sink = self.sink;
        let _rt = sink.handle.enter();
        let mut puts = Vec::new();
        // Ops left in `self.ops` when one fails are aborted by `drop`.
        while let Some(op) = self.ops.pop_front() {
            // Runs of PUTs go together; anything else waits for the PUTs before it.
            if let Op::Put { key, data, attrs } = op {
                puts.push((key, data, attrs));
                continue;
            }
            self.run_puts(&mut puts)?;
            match op {
                Op::Put { .. } => unreachable!("batched above"),
                Op::Finish { key, upload } => {
                    sink.block(upload.finish())
                        .map_err(store_error("cannot complete the upload of", &key))?;
                    bump(&sink.counters.uploads_completed);
                }
                Op::Copy { from, to, entry } => match sink.block(sink.store.copy(&from, &to)) {
                    Ok(()) => bump(&sink.counters.copies),
                    Err(object_store::Error::NotFound { .. }) => {
                        return Err(SinkError::LinkPending {
                            path: display(&entry.path),
                            first: display(&entry.link_target),
                            reason: "it is not in the store yet".into(),
                        })
                    }
                    Err(e) => return Err(store_error("cannot copy to", &to)(e)),
                },
                Op::Delete { key } => delete_below(sink, &key)?,
                Op::Piece(p) => self.record_piece(p, &hash)?,
            }
        }
        self.run_puts(&mut puts)
    }
}

/// Removes `key` and every key below it (a directory removed at the source).
fn delete_below(sink: &ObjectSink, key: &Key) -> Result<(), SinkError> {
    match sink.block(sink.store.delete(key)) {
        Ok(()) => bump(&sink.counters.deletes),
        Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(store_error("cannot delete", key)(e)),
    }
    let below: Vec<Key> = sink
        .block(
            sink.store
                .list(Some(key))
                .map_ok(|m| m.location)
                .try_collect(),
        )
        .map_err(store_error("cannot list", key))?;
    for k in below {
        match sink.block(sink.store.delete(&k)) {
            Ok(()) => bump(&sink.counters.deletes),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(store_error("cannot delete", &k)(e)),
        }
    }
    Ok(())
}

impl Drop for ObjectWriter<'_> {
    /// A segment dropped before its commit: whole files' multipart uploads are aborted (a split
    /// file's upload stays, for its other pieces).
    fn drop(&mut self) {
        // Its small files are stored or dropped: they no longer count against the budget.
        self.sink.held.fetch_sub(self.held, Ordering::AcqRel);
        let mut uploads = Vec::new();
        if let Some(Current::Whole {
            upload: Some(u), ..
        }) = self.current.take()
        {
            uploads.push(u);
        }
        for op in std::mem::take(&mut self.ops) {
            if let Op::Finish { upload, .. } = op {
                uploads.push(upload);
            }
        }
        for u in uploads {
            self.sink.handle.spawn(async move {
                if let Err(e) = u.abort().await {
                    tracing::warn!(message = "Cannot abort a dropped segment's multipart upload; the store's lifecycle rules will remove its parts.", error = %e);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests;
