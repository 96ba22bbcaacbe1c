//! The snapshot file: a sealed (checksummed) body, written atomically beside the trees, built
//! from the in-memory state and persisted before openraft is handed it.

// openraft's trait methods return its `StorageError` (224 bytes); our helpers return the same type.
#![allow(clippy::result_large_err)]

use super::*;

/// Snapshot bytes: a 32-byte BLAKE3 of the body, then the body (the encoded [`SnapshotData`]).
/// The checksum is verified before a snapshot is installed or loaded, so a snapshot damaged in
/// transit or on disk is refused instead of becoming the state. Encoded straight from the live
/// state under its read lock (no clone: a clone of millions of segments doubled the memory).
pub(super) fn seal_snapshot(a: &Applied) -> Result<Vec<u8>, crate::codec::CodecError> {
    let body = SnapshotRef {
        last_applied: &a.last_applied,
        membership: &a.membership,
        state: &a.state,
    };
    let mut out = crate::codec::encode_into(&body, vec![0; 32])?;
    let digest = blake3::hash(&out[32..]);
    out[..32].copy_from_slice(digest.as_bytes());
    Ok(out)
}

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
    if bytes.len() < 32 || blake3::hash(&bytes[32..]).as_bytes() != &bytes[..32] {
        return Err(SnapshotError::Checksum(bytes.len()));
    }
    Ok(decode(&bytes[32..])?)
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
    let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&(meta.len() as u64).to_be_bytes())?;
    f.write_all(&meta)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(SNAPSHOT_FILE))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Builds snapshots from the in-memory state and persists them before handing them to openraft.
pub struct SnapshotBuilder {
    pub(super) shared: Arc<RwLock<Applied>>,
    pub(super) snap_dir: PathBuf,
    pub(super) snap_lock: Arc<std::sync::Mutex<()>>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let started = std::time::Instant::now();
        let mut snapshot = build_snapshot(&self.shared)?;
        let data = std::mem::take(snapshot.snapshot.get_mut());
        let data = save_snapshot(&self.snap_dir, &self.snap_lock, &snapshot.meta, data).await?;
        *snapshot.snapshot.get_mut() = data;
        // The snapshot file is durable; openraft does not know of it yet.
        ferry_common::fault_point!("raft::snapshot_build_after_save");
        tracing::info!(
            message = "Built snapshot.",
            id = %snapshot.meta.snapshot_id,
            bytes = snapshot.snapshot.get_ref().len(),
            ms = started.elapsed().as_millis() as u64
        );
        Ok(snapshot)
    }
}

pub(super) fn build_snapshot(
    shared: &RwLock<Applied>,
) -> Result<Snapshot<TypeConfig>, StorageError> {
    let a = shared.read().expect("not poisoned");
    let data = seal_snapshot(&a).map_err(|e| StorageIOError::read_state_machine(&e))?;
    let snapshot_id = match a.last_applied {
        Some(l) => format!("{}-{}-{}", l.leader_id, l.index, data.len()),
        None => format!("empty-{}", data.len()),
    };
    Ok(Snapshot {
        meta: SnapshotMeta {
            last_log_id: a.last_applied,
            last_membership: a.membership.clone(),
            snapshot_id,
        },
        snapshot: Box::new(Cursor::new(data)),
    })
}

/// Persists a snapshot (off the async runtime: it is a large write plus fsyncs) unless the file
/// already holds a newer one (a build that started before an install finished). Hands `data`
/// back: a snapshot of millions of segments is hundreds of MiB, not to be copied to be written.
pub(super) async fn save_snapshot(
    dir: &Path,
    lock: &Arc<std::sync::Mutex<()>>,
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
