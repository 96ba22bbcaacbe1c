//! Forgetting deleted migrations (`ferryctl migration delete`): heartbeats list the uuids of
//! deleted migrations this agent was source or target of, and the agent removes what it keeps
//! of each — its directory under `<state_dir>/clusters/<cluster>/migrations/` (manifest,
//! catalogs, blocks, verification caches, cutover records), the unfinished split files of a
//! file-system target (part files, journals, sidecars), and, for a target writing to an object
//! store, the multipart uploads left open (aborted, so the store stops keeping and charging
//! for their parts). What was already written at the target stays.
//!
//! Idempotent: once removed there is nothing to do, so the same list on every heartbeat costs
//! a few `stat`s. A removal that fails (a store that does not answer) is tried again at the
//! next heartbeat.

use std::path::PathBuf;
use std::sync::Arc;

use crate::sink::object::ObjectSink;
use crate::sink::FsSink;
use crate::source::migration_state_dir;

/// Removes what this agent keeps of deleted migrations.
pub struct Forgetter {
    state_dir: PathBuf,
    fs: Option<Arc<FsSink>>,
    store: Option<Arc<ObjectSink>>,
    /// One pass at a time: a heartbeat during a pass starts none.
    busy: tokio::sync::Mutex<()>,
}

impl Forgetter {
    /// For an agent with `state_dir` and, as a target, one of the sinks.
    pub fn new(
        state_dir: PathBuf,
        fs: Option<Arc<FsSink>>,
        store: Option<Arc<ObjectSink>>,
    ) -> Self {
        Forgetter {
            state_dir,
            fs,
            store,
            busy: tokio::sync::Mutex::new(()),
        }
    }

    /// Starts a pass over `uuids` of `cluster` in the background, unless one runs.
    pub fn start(self: &Arc<Self>, cluster: String, uuids: Vec<String>) {
        if uuids.is_empty() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let Ok(_pass) = me.busy.try_lock() else {
                return;
            };
            me.forget(&cluster, &uuids).await;
        });
    }

    /// Removes what this agent keeps of migrations `uuids` of `cluster`; returns how many it
    /// found something of.
    pub async fn forget(&self, cluster: &str, uuids: &[String]) -> usize {
        let mut found = 0;
        for uuid in uuids {
            let dir = match migration_state_dir(&self.state_dir, cluster, uuid) {
                Ok(d) => d,
                Err((what, id)) => {
                    tracing::warn!(message = "Ignoring a deleted migration with an id that is not one.", what, id = %id);
                    continue;
                }
            };
            let key = format!("{cluster}/{uuid}");
            let mut any = false;
            if tokio::fs::symlink_metadata(&dir).await.is_ok() {
                any = true;
                match tokio::fs::remove_dir_all(&dir).await {
                    Ok(()) => {
                        tracing::info!(message = "Removed the local state of a deleted migration.", uuid = %uuid, dir = %dir.display())
                    }
                    Err(e) => {
                        tracing::warn!(message = "Cannot remove the local state of a deleted migration; trying again later.", dir = %dir.display(), error = %e)
                    }
                }
            }
            if let Some(fs) = &self.fs {
                let (fs, k) = (fs.clone(), key.clone());
                match tokio::task::spawn_blocking(move || fs.forget(&k)).await {
                    Ok(Ok(0)) => {}
                    Ok(Ok(n)) => {
                        any = true;
                        tracing::info!(message = "Removed the unfinished split files of a deleted migration.", uuid = %uuid, files = n);
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(message = "Cannot remove the unfinished split files of a deleted migration; trying again later.", uuid = %uuid, error = %e)
                    }
                    Err(e) => {
                        tracing::warn!(message = "Forgetting a deleted migration failed.", uuid = %uuid, error = %e)
                    }
                }
            }
            if let Some(store) = &self.store {
                match store.forget(&key).await {
                    Ok(0) => {}
                    Ok(n) => {
                        any = true;
                        tracing::info!(message = "Aborted the unfinished uploads of a deleted migration.", uuid = %uuid, uploads = n);
                    }
                    Err(e) => {
                        tracing::warn!(message = "Cannot abort the unfinished uploads of a deleted migration; trying again later.", uuid = %uuid, error = %e)
                    }
                }
            }
            found += usize::from(any);
        }
        found
    }
}
