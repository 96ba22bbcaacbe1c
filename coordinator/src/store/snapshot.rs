//! The snapshot file: a sealed (checksummed) body, written atomically beside the trees, built
//! from the in-memory state and persisted before openraft is handed it.

// openraft's trait methods return its `StorageError` (224 bytes); our helpers return the same type.
#![allow(clippy::result_large_err)]

use super::*;

/// Snapshot bytes (what follows the meta in the snapshot file, and what is sent to a follower):
/// a 32-byte BLAKE3 of the body, then the body (the encoded [`SnapshotData`]). The checksum is
/// verified before a snapshot is installed or loaded, so a snapshot damaged in transit or on disk
/// is refused instead of becoming the state. A node builds it straight from the live state into
/// the file under the state's read lock ([`build_into_file`]): no clone (a clone of millions of
/// segments doubled the memory), no buffer (a buffer of millions of segments is ~0.5 GiB).
const DIGEST_LEN: usize = 32;

/// A snapshot could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Its checksum does not match its bytes.
    #[error("snapshot checksum mismatch ({0} bytes): refusing a damaged snapshot")]
    Checksum(usize),
    /// Its body does not decode.
    #[error("snapshot body is not valid: {0}")]
    Body(#[from] crate::codec::CodecError),
}

pub(super) fn open_snapshot(bytes: &[u8]) -> Result<SnapshotData, SnapshotError> {
    if bytes.len() < DIGEST_LEN
        || blake3::hash(&bytes[DIGEST_LEN..]).as_bytes() != &bytes[..DIGEST_LEN]
    {
        return Err(SnapshotError::Checksum(bytes.len()));
    }
    Ok(decode(&bytes[DIGEST_LEN..])?)
}

/// The serialised form of a snapshot.
#[derive(Deserialize)]
pub(super) struct SnapshotData {
    pub(super) last_applied: Option<LogId<NodeId>>,
    pub(super) membership: Membership,
    pub(super) state: State,
}

/// [`SnapshotData`] by reference, for encoding (same fields, same order, same encoding).
#[derive(Serialize)]
pub(super) struct SnapshotRef<'a> {
    pub(super) last_applied: &'a Option<LogId<NodeId>>,
    pub(super) membership: &'a Membership,
    pub(super) state: &'a State,
}

/// Name of the snapshot file in the snapshot directory.
pub(super) const SNAPSHOT_FILE: &str = "current";

/// Reads the snapshot file: `u64` (big-endian) length of the encoded meta, the meta, the data.
pub(super) fn read_snapshot_file(dir: &Path) -> Result<Option<(Meta, Vec<u8>)>, StoreError> {
    let mut bytes = match std::fs::read(dir.join(SNAPSHOT_FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let meta_len = match bytes.first_chunk::<8>() {
        Some(b) => u64::from_be_bytes(*b),
        None => return Err(StoreError::Truncated(bytes.len() as u64)),
    };
    let meta_len = match usize::try_from(meta_len) {
        Ok(l) if l <= bytes.len() - 8 => l,
        _ => return Err(StoreError::Truncated(bytes.len() as u64)),
    };
    let meta = decode(&bytes[8..8 + meta_len])?;
    bytes.drain(..8 + meta_len);
    Ok(Some((meta, bytes)))
}

/// Reads only the meta of the snapshot file.
pub(super) fn read_snapshot_meta(dir: &Path) -> Result<Option<Meta>, StoreError> {
    use std::io::Read;
    let mut f = match std::fs::File::open(dir.join(SNAPSHOT_FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let len = u64::from_be_bytes(len);
    let file_len = f.metadata()?.len();
    if len > file_len {
        return Err(StoreError::Truncated(file_len));
    }
    let mut meta = vec![0u8; len as usize];
    f.read_exact(&mut meta)?;
    Ok(Some(decode(&meta)?))
}

/// Writes the snapshot file atomically: a temporary file, fsync, rename, fsync of the directory.
pub(super) fn write_snapshot_file(dir: &Path, meta: &Meta, data: &[u8]) -> Result<(), StoreError> {
    let meta = encode(meta)?;
    let mut f = std::fs::File::create(dir.join(TMP_FILE))?;
    f.write_all(&(meta.len() as u64).to_be_bytes())?;
    f.write_all(&meta)?;
    f.write_all(data)?;
    put_in_place(dir, f)
}

/// Name of the snapshot file being written, in the snapshot directory.
const TMP_FILE: &str = "current.tmp";

/// Makes the temporary snapshot file `f` the snapshot file: fsync, rename, fsync of the
/// directory.
fn put_in_place(dir: &Path, f: std::fs::File) -> Result<(), StoreError> {
    f.sync_all()?;
    drop(f);
    std::fs::rename(dir.join(TMP_FILE), dir.join(SNAPSHOT_FILE))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// A writer that hashes and counts what goes through it, and keeps its first error (postcard
/// reports any writer's error as a full buffer; a full disk must say so).
struct Hashing<W> {
    inner: W,
    hasher: blake3::Hasher,
    written: u64,
    error: Option<std::io::Error>,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = match self.inner.write(buf) {
            Ok(n) => n,
            Err(e) => {
                if self.error.is_none() {
                    self.error = Some(std::io::Error::new(e.kind(), e.to_string()));
                }
                return Err(e);
            }
        };
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A snapshot this node built: its meta, its size, and whether it was saved (not when the
/// snapshot file already held a newer snapshot).
pub(super) struct Built {
    pub(super) meta: Meta,
    pub(super) bytes: usize,
    pub(super) saved: bool,
}

/// Builds a snapshot of the applied state into the snapshot file and makes it durable, unless
/// the file already holds a newer one (a build that started before an install finished).
/// Encodes under the state's read lock, straight into the temporary file (hashed on the way);
/// syncs and renames it after the lock is released. Blocking.
pub(super) fn build_into_file(
    dir: &Path,
    lock: &Mutex<()>,
    shared: &RwLock<Applied>,
) -> Result<Built, StoreError> {
    let _held = lock.lock().expect("not poisoned");
    let (built, file) = {
        let a = shared.read().expect("not poisoned");
        let body = SnapshotRef {
            last_applied: &a.last_applied,
            membership: &a.membership,
            state: &a.state,
        };
        let body_len = crate::codec::encoded_len(&body)?;
        let bytes = DIGEST_LEN + body_len;
        let meta = SnapshotMeta {
            last_log_id: a.last_applied,
            last_membership: a.membership.clone(),
            snapshot_id: match a.last_applied {
                Some(l) => format!("{}-{}-{bytes}", l.leader_id, l.index),
                None => format!("empty-{bytes}"),
            },
        };
        // An unreadable file is replaced.
        if let Some(existing) = read_snapshot_meta(dir).ok().flatten() {
            if existing.last_log_id > meta.last_log_id {
                return Ok(Built {
                    meta,
                    bytes,
                    saved: false,
                });
            }
        }
        let file = write_body(dir, &meta, &body, body_len).inspect_err(|_| remove_tmp(dir))?;
        let built = Built {
            meta,
            bytes,
            saved: true,
        };
        (built, file)
    };
    put_in_place(dir, file).inspect_err(|_| remove_tmp(dir))?;
    Ok(built)
}

/// Removes a temporary snapshot file left by a failed write (hundreds of MiB, perhaps on a full
/// disk).
fn remove_tmp(dir: &Path) {
    if let Err(e) = std::fs::remove_file(dir.join(TMP_FILE)) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(message = "Could not remove a partly written snapshot file.", dir = %dir.display(), error = %e);
        }
    }
}

/// Writes the temporary snapshot file: the meta's length and the meta, the body's digest, the
/// body (`body_len` bytes as measured). Not synced.
fn write_body(
    dir: &Path,
    meta: &Meta,
    body: &SnapshotRef<'_>,
    body_len: usize,
) -> Result<std::fs::File, StoreError> {
    use std::io::{Seek, SeekFrom};
    let meta = encode(meta)?;
    let mut f = std::fs::File::create(dir.join(TMP_FILE))?;
    f.write_all(&(meta.len() as u64).to_be_bytes())?;
    f.write_all(&meta)?;
    f.write_all(&[0; DIGEST_LEN])?;
    let (mut f, digest, written) = write_hashed(body, f)?;
    if written != body_len as u64 {
        return Err(std::io::Error::other(format!(
            "the snapshot body took {written} bytes, measured at {body_len}"
        ))
        .into());
    }
    f.seek(SeekFrom::Start(8 + meta.len() as u64))?;
    f.write_all(digest.as_bytes())?;
    Ok(f)
}

/// Encodes `body` into `inner` through a 1 MiB buffer; returns `inner`, the BLAKE3 of what was
/// written and its length. A write error is returned as itself (a full disk says so).
pub(super) fn write_hashed<T: Serialize + ?Sized, W: Write>(
    body: &T,
    inner: W,
) -> Result<(W, blake3::Hash, u64), StoreError> {
    let mut h = Hashing {
        inner,
        hasher: blake3::Hasher::new(),
        written: 0,
        error: None,
    };
    let w = std::io::BufWriter::with_capacity(1 << 20, &mut h);
    let encoded = crate::codec::encode_to(body, w)
        .map(|w| w.into_inner().map(drop).map_err(|e| e.into_error()));
    match encoded {
        Ok(flushed) => flushed?,
        Err(e) => return Err(h.error.take().map_or(e.into(), Into::into)),
    }
    Ok((h.inner, h.hasher.finalize(), h.written))
}

/// Builds snapshots from the in-memory state into the snapshot file, then hands openraft their
/// meta.
pub struct SnapshotBuilder {
    pub(super) shared: Arc<RwLock<Applied>>,
    pub(super) snap_dir: PathBuf,
    pub(super) snap_lock: Arc<Mutex<()>>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    /// The snapshot goes to the snapshot file ([`build_into_file`]); the returned one carries its
    /// meta and no bytes. openraft 0.9 keeps only the meta of a snapshot it had built
    /// (`core::sm::worker`) and reads the bytes back with `get_current_snapshot` when it sends
    /// one, as its storage suite checks.
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let started = std::time::Instant::now();
        let (dir, lock, shared) = (
            self.snap_dir.clone(),
            self.snap_lock.clone(),
            self.shared.clone(),
        );
        let built = tokio::task::spawn_blocking(move || build_into_file(&dir, &lock, &shared))
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &StoreError::from(e)))?
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        // The snapshot file is durable; openraft does not know of it yet.
        ferry_common::fault_point!("raft::snapshot_build_after_save");
        tracing::info!(
            message = "Built snapshot.",
            id = %built.meta.snapshot_id,
            bytes = built.bytes,
            saved = built.saved,
            ms = started.elapsed().as_millis() as u64
        );
        Ok(Snapshot {
            meta: built.meta,
            snapshot: Box::new(Cursor::new(Vec::new())),
        })
    }
}

/// Persists a snapshot received from the leader (off the async runtime: it is a large write
/// plus fsyncs) unless the file already holds a newer one. Hands `data` back: a snapshot of
/// millions of segments is hundreds of MiB, not to be copied to be written.
pub(super) async fn save_snapshot(
    dir: &Path,
    lock: &Arc<Mutex<()>>,
    meta: &Meta,
    data: Vec<u8>,
) -> Result<Vec<u8>, StorageError> {
    let (dir, m, lock) = (dir.to_path_buf(), meta.clone(), lock.clone());
    let (written, data) = tokio::task::spawn_blocking(move || {
        let _held = lock.lock().expect("not poisoned");
        // An unreadable file is replaced.
        if let Some(existing) = read_snapshot_meta(&dir).ok().flatten() {
            if existing.last_log_id > m.last_log_id {
                return (Ok(()), data);
            }
        }
        (write_snapshot_file(&dir, &m, &data), data)
    })
    .await
    .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &StoreError::from(e)))?;
    written.map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
    Ok(data)
}
