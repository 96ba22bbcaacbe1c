//! The Raft log in sled: entries by index, the vote and the last purged id in `meta`.

// openraft's trait methods return its `StorageError` (224 bytes); our helpers return the same type.
#![allow(clippy::result_large_err)]

use super::*;

/// The Raft log, in sled.
#[derive(Clone)]
pub struct LogStore {
    pub(super) log: sled::Tree,
    pub(super) meta: sled::Tree,
    /// The last committed index openraft saved (0: none yet), for the metrics.
    pub(super) committed: Arc<std::sync::atomic::AtomicU64>,
}

impl LogStore {
    /// The last committed log index as this node knows it (openraft's metrics do not carry
    /// it), kept current as openraft saves it.
    pub fn committed_index(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.committed.clone()
    }

    pub(super) fn get_meta<T: for<'de> Deserialize<'de>>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        match self.meta.get(key).map_err(read_err)? {
            None => Ok(None),
            Some(v) => Ok(Some(decode(&v).map_err(read_err)?)),
        }
    }

    pub(super) async fn put_meta<T: Serialize>(
        &self,
        key: &str,
        v: &T,
    ) -> Result<(), StorageError> {
        let bytes = encode(v).map_err(write_err)?;
        self.meta.insert(key, bytes).map_err(write_err)?;
        self.meta.flush_async().await.map_err(write_err)?;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for kv in self.log.range(start.to_be_bytes()..) {
            let (k, v) = kv.map_err(read_err)?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().expect("8-byte log key"));
            if !range.contains(&idx) {
                break;
            }
            out.push(decode(&v).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId<NodeId>> = self.get_meta("last_purged")?;
        let last = match self.log.last().map_err(read_err)? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = decode(&v).map_err(read_err)?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta("vote", vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta("vote")
    }

    async fn save_committed(&mut self, c: Option<LogId<NodeId>>) -> Result<(), StorageError> {
        self.put_meta("committed", &c).await?;
        self.committed.store(
            c.map_or(0, |c| c.index),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError> {
        Ok(self
            .get_meta::<Option<LogId<NodeId>>>("committed")?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        for e in entries {
            let v = encode(&e).map_err(write_err)?;
            batch.insert(&e.log_id.index.to_be_bytes(), v);
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        ferry_common::fault_point!("raft::append_before_flush");
        let res = self.log.flush_async().await.map(|_| ()).map_err(io_err);
        ferry_common::fault_point!("raft::append_after_flush");
        callback.log_io_completed(res);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for k in self.log.range(log_id.index.to_be_bytes()..) {
            batch.remove(k.map_err(write_err)?.0);
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        self.log.flush_async().await.map_err(write_err)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        // Record the purge point first: if we crash half-way the log state stays consistent.
        self.put_meta("last_purged", &log_id).await?;
        let mut batch = sled::Batch::default();
        for k in self.log.range(..=log_id.index.to_be_bytes()) {
            batch.remove(k.map_err(write_err)?.0);
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        self.log.flush_async().await.map_err(write_err)?;
        Ok(())
    }
}
