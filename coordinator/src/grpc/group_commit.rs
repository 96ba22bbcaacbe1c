//! Group commit: state machine commands that arrive together are proposed to Raft as one
//! [`Command::Batch`] entry, so a thousand agents reporting at once cost a few log entries (one
//! append, one fsync, one apply batch each) instead of a thousand.
//!
//! One task takes commands from a queue. It waits for the first, then for a free proposal slot
//! (at most [`IN_FLIGHT`] entries are being committed at once), then takes whatever else is
//! queued, up to [`MAX_WEIGHT`] — so batches grow exactly when the cluster is busy and a lone
//! command is proposed at once. Each caller gets its own command's response.
//!
//! A leader transfer pauses the queue ([`GroupCommit::pause`]): it takes every proposal slot,
//! so that the log stops growing while the new leader catches up and campaigns; commands queue
//! meanwhile and are proposed when the pause ends. If this node no longer leads then, the
//! commands its own services submitted are forwarded to the new leader; those another node
//! forwarded to it fail as not executed (`Unavailable`), which their callers retry.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::NotLeader;
use crate::raft_types::Raft;
use crate::state::{Command, Response, MAX_BATCH_COMMANDS};

/// Entries being committed at once.
pub const IN_FLIGHT: usize = 4;
/// Most work in one entry ([`Command::weight`]: one per command plus one per segment or issue it
/// carries), so an entry stays a few hundred KiB.
pub const MAX_WEIGHT: usize = 16_384;

type Reply = oneshot::Sender<Result<Response, NotLeader>>;

/// The queue in front of `Raft::client_write`.
#[derive(Clone)]
pub struct GroupCommit {
    tx: mpsc::UnboundedSender<(Command, Reply)>,
    slots: Arc<Semaphore>,
}

impl GroupCommit {
    /// Starts the batching task for `raft`. It ends when every handle is dropped, once the
    /// entries it proposed are answered: await the task it returns before shutting Raft down.
    pub fn start(raft: Raft) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let slots = Arc::new(Semaphore::new(IN_FLIGHT));
        let task = tokio::spawn(run(raft, rx, slots.clone()));
        (GroupCommit { tx, slots }, task)
    }

    /// Stops proposing until the returned guard is dropped. It returns once every entry
    /// proposed before it has been answered, so from then on this node appends nothing to the
    /// log of its own accord; commands keep queueing.
    pub async fn pause(&self) -> OwnedSemaphorePermit {
        self.slots
            .clone()
            .acquire_many_owned(IN_FLIGHT as u32)
            .await
            .expect("the proposal slots are never closed")
    }

    /// Commits `cmd` (in a batch with whatever else is waiting) and returns its response.
    pub async fn write(&self, cmd: Command) -> Result<Response, NotLeader> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((cmd, reply))
            .map_err(|_| NotLeader::Failed("the coordinator is shutting down".into()))?;
        rx.await
            .unwrap_or_else(|_| Err(NotLeader::Failed("the commit was abandoned".into())))
    }
}

async fn run(raft: Raft, mut rx: mpsc::UnboundedReceiver<(Command, Reply)>, slots: Arc<Semaphore>) {
    let mut carry: Option<(Command, Reply)> = None;
    // The entries being committed, owned here: the task ends after them.
    let mut commits = tokio::task::JoinSet::new();
    loop {
        while commits.try_join_next().is_some() {}
        let first = match carry.take() {
            Some(c) => c,
            None => match rx.recv().await {
                Some(c) => c,
                None => break,
            },
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let mut weight = first.0.weight();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_COMMANDS && weight < MAX_WEIGHT {
            match rx.try_recv() {
                Ok(c) if weight + c.0.weight() > MAX_WEIGHT => {
                    carry = Some(c);
                    break;
                }
                Ok(c) => {
                    weight += c.0.weight();
                    batch.push(c);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        commits.spawn(async move {
            commit(&raft, batch).await;
            drop(slot);
        });
    }
    while commits.join_next().await.is_some() {}
}

async fn commit(raft: &Raft, mut batch: Vec<(Command, Reply)>) {
    if batch.len() == 1 {
        let (cmd, reply) = batch.pop().expect("one");
        let _ = reply.send(write(raft, cmd).await);
        return;
    }
    let (cmds, replies): (Vec<Command>, Vec<Reply>) = batch.into_iter().unzip();
    let n = cmds.len();
    match write(raft, Command::Batch(cmds)).await {
        Ok(Response::Batch(responses)) if responses.len() == n => {
            for (reply, r) in replies.into_iter().zip(responses) {
                let _ = reply.send(Ok(r));
            }
        }
        Ok(other) => {
            let why = format!("batch of {n} commands answered {other:?}");
            for reply in replies {
                let _ = reply.send(Err(NotLeader::Failed(why.clone())));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

async fn write(raft: &Raft, cmd: Command) -> Result<Response, NotLeader> {
    use openraft::error::{ClientWriteError, RaftError};
    match raft.client_write(cmd).await {
        Ok(r) => {
            // Only a leader gets here: committed on a quorum and applied, not answered.
            ferry_common::fault_point!("raft::leader_committed_before_answer");
            Ok(r.data)
        }
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Err(NotLeader::Elsewhere(f.leader_node.map(|n| n.addr)))
        }
        Err(e) => Err(NotLeader::Failed(e.to_string())),
    }
}
