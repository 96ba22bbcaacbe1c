//! gRPC services. Writes go through Raft (`client_write`); reads wait for a linearizable read
//! point first, then read the applied state. Callers are identified by their TLS certificate.

pub mod admin;
pub mod agent;
mod convert;
pub mod group_commit;
pub mod peer;

use std::sync::{Arc, RwLock};

use ferry_common::names;
use tonic::{Request, Status};

use crate::raft_types::Raft;
use crate::state::{Command, Response, State};
use crate::store::Applied;

/// What the services share.
pub struct Core {
    /// Raft handle.
    pub raft: Raft,
    /// Channels to the other coordinator nodes (forwarding).
    pub peers: crate::network::Peers,
    /// Applied state.
    pub applied: Arc<RwLock<Applied>>,
    /// This node.
    pub node_id: u64,
    /// Lease duration handed to the scheduler.
    pub lease_ttl_ms: u64,
    /// Batches state machine commands into entries.
    pub commits: group_commit::GroupCommit,
}

/// Wall-clock now in unix milliseconds. Only the leader reads it, when proposing a command.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A change only the leader can make. Followers forward it to the leader (`RaftPeer.Propose`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum Proposal {
    /// A state machine command.
    Command(Command),
    /// Several independent state machine commands (committed with group commit; the answer is
    /// a [`Response::Batch`] with one response per command, [`Response::NotCommitted`] for any
    /// that could not be committed).
    Commands(Vec<Command>),
    /// Add a coordinator node (learner, then voter).
    AddNode {
        /// Its id.
        node_id: u64,
        /// Its gRPC address.
        addr: String,
    },
    /// Remove a coordinator node from the membership.
    RemoveNode {
        /// Its id.
        node_id: u64,
    },
}

/// How long a follower waits to apply up to the leader's read index.
const READ_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Core {
    /// Proposes `cmd` (through the leader, wherever it is) and returns what applying it produced.
    pub async fn write(&self, cmd: Command) -> Result<Response, Status> {
        self.propose(Proposal::Command(cmd)).await
    }

    /// Proposes independent commands together; one answer per command, in order.
    pub async fn write_many(&self, cmds: Vec<Command>) -> Result<Vec<Response>, Status> {
        let n = cmds.len();
        match self.propose(Proposal::Commands(cmds)).await? {
            Response::Batch(rs) if rs.len() == n => Ok(rs),
            other => Err(Status::internal(format!("{n} commands answered {other:?}"))),
        }
    }

    /// Runs a proposal here if this node leads, else forwards it to the leader once.
    pub async fn propose(&self, p: Proposal) -> Result<Response, Status> {
        match self.execute_here(p.clone()).await {
            Err(NotLeader::Elsewhere(Some(addr))) => self.forward(&addr, &p).await,
            Err(e) => Err(e.into()),
            Ok(r) => Ok(r),
        }
    }

    async fn forward(&self, leader: &str, p: &Proposal) -> Result<Response, Status> {
        let payload = crate::codec::encode(p).map_err(|e| Status::internal(e.to_string()))?;
        let mut client = self.peers.client(leader).map_err(Status::unavailable)?;
        let reply = client
            .propose(ferry_proto::raft::RaftPayload {
                payload,
                data: Vec::new(),
            })
            .await
            .map_err(|s| Status::new(s.code(), format!("via leader {leader}: {}", s.message())))?;
        crate::codec::decode(&reply.into_inner().payload)
            .map_err(|e| Status::internal(format!("bad reply from leader {leader}: {e}")))
    }

    /// Reads the state at a linearizable point: on the leader after confirming leadership, on a
    /// follower after applying up to the leader's read index.
    pub async fn read<T>(&self, f: impl FnOnce(&State) -> T) -> Result<T, Status> {
        use openraft::error::{CheckIsLeaderError, RaftError};
        match self.raft.ensure_linearizable().await {
            Ok(_) => {}
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(fwd))) => {
                let Some(node) = fwd.leader_node else {
                    return Err(Status::unavailable(
                        "no coordinator leader is elected right now; retry in a moment",
                    ));
                };
                let mut client = self.peers.client(&node.addr).map_err(Status::unavailable)?;
                let idx = client
                    .read_index(ferry_proto::raft::ReadIndexRequest {})
                    .await
                    .map_err(|s| {
                        Status::unavailable(format!("read index from leader: {}", s.message()))
                    })?
                    .into_inner();
                if idx.present {
                    self.raft
                        .wait(Some(READ_WAIT))
                        .applied_index_at_least(Some(idx.index), "linearizable read")
                        .await
                        .map_err(|e| {
                            Status::unavailable(format!("this node lags the leader: {e}; retry"))
                        })?;
                }
            }
            Err(e) => {
                return Err(Status::unavailable(format!(
                    "coordinator cannot serve a current read: {e}; retry"
                )))
            }
        }
        let a = self.applied.read().expect("not poisoned");
        Ok(f(&a.state))
    }

    /// Reads this node's applied state as it is, without confirming it is current. Only for
    /// answers where being a moment behind is harmless because anything that matters is decided
    /// again by a committed command or a linearizable read (heartbeats, lease polls).
    pub fn read_local<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        let a = self.applied.read().expect("not poisoned");
        f(&a.state)
    }

    /// Executes a proposal on this node, which must be the leader.
    pub async fn execute_here(&self, p: Proposal) -> Result<Response, NotLeader> {
        use openraft::error::{ClientWriteError, RaftError};
        let result = match p {
            Proposal::Command(cmd) => return self.commits.write(cmd).await,
            Proposal::Commands(cmds) => {
                let results =
                    futures::future::join_all(cmds.into_iter().map(|c| self.commits.write(c)))
                        .await;
                // Not the leader for any of them: let the caller forward the whole proposal.
                if let Some(Err(NotLeader::Elsewhere(a))) = results.first() {
                    if results
                        .iter()
                        .all(|r| matches!(r, Err(NotLeader::Elsewhere(_))))
                    {
                        return Err(NotLeader::Elsewhere(a.clone()));
                    }
                }
                return Ok(Response::Batch(
                    results
                        .into_iter()
                        .map(|r| match r {
                            Ok(r) => r,
                            Err(e) => Response::NotCommitted(Status::from(e).message().to_string()),
                        })
                        .collect(),
                ));
            }
            Proposal::AddNode { node_id, addr } => {
                let node = openraft::BasicNode { addr };
                match self.raft.add_learner(node_id, node, true).await {
                    Ok(_) => {
                        let add = std::collections::BTreeSet::from([node_id]);
                        self.raft
                            .change_membership(openraft::ChangeMembers::AddVoterIds(add), false)
                            .await
                            .map(|_| Response::Ok)
                    }
                    Err(e) => Err(e),
                }
            }
            Proposal::RemoveNode { node_id } => {
                let rm = std::collections::BTreeSet::from([node_id]);
                self.raft
                    .change_membership(openraft::ChangeMembers::RemoveVoters(rm), false)
                    .await
                    .map(|_| Response::Ok)
            }
        };
        match result {
            Ok(r) => Ok(r),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(NotLeader::Elsewhere(f.leader_node.map(|n| n.addr)))
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Ok(Response::Refused(format!("membership change refused: {e}")))
            }
            Err(e) => Err(NotLeader::Failed(e.to_string())),
        }
    }
}

/// A proposal could not be executed on this node.
#[derive(Debug, Clone)]
pub enum NotLeader {
    /// Another node leads (its address, if known).
    Elsewhere(Option<String>),
    /// Raft failed (quorum lost, shutting down).
    Failed(String),
}

impl From<NotLeader> for Status {
    fn from(n: NotLeader) -> Status {
        Status::unavailable(match n {
            NotLeader::Elsewhere(Some(a)) => {
                format!("not the leader any more (leader is {a}); retry")
            }
            NotLeader::Elsewhere(None) => {
                "no coordinator leader is elected right now; retry in a moment".to_string()
            }
            NotLeader::Failed(e) => format!("coordinator could not commit the change: {e}; retry"),
        })
    }
}

/// Checks that the caller holds a coordinator certificate.
pub fn authorize_coordinator<T>(req: &Request<T>) -> Result<(), Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    if certs
        .first()
        .is_some_and(|c| ferry_common::tls::cert_is_for(c, names::COORDINATOR_DNS))
    {
        Ok(())
    } else {
        Err(Status::permission_denied(
            "only coordinator nodes may call this",
        ))
    }
}

/// Checks that the caller's certificate is the one of agent `claimed`.
pub fn authorize_agent<T>(req: &Request<T>, claimed: &str) -> Result<(), Status> {
    names::validate_name(claimed).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let ok = certs
        .first()
        .is_some_and(|c| ferry_common::tls::cert_is_for(c, &names::agent_dns(claimed)));
    if ok {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "client certificate is not agent {claimed}'s"
        )))
    }
}

/// Checks that the caller holds an admin certificate.
pub fn authorize_admin<T>(req: &Request<T>) -> Result<(), Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let ok = certs
        .first()
        .is_some_and(|c| ferry_common::tls::cert_is_for(c, names::ADMIN_DNS));
    if ok {
        Ok(())
    } else {
        Err(Status::permission_denied(
            "this call needs an admin certificate (ferry-coordinator pki issue --admin NAME)",
        ))
    }
}

/// Maps a refused command to a gRPC status.
pub fn refused(r: Response) -> Status {
    match r {
        Response::Refused(why) => Status::failed_precondition(why),
        other => Status::internal(format!("unexpected state machine response {other:?}")),
    }
}
