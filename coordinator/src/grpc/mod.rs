//! gRPC services. Writes go through Raft (`client_write`); reads wait for a linearizable read
//! point first, then read the applied state. Callers are identified by their TLS certificate.

pub mod admin;
pub mod agent;
mod convert;
pub mod enrol;
pub mod group_commit;
pub mod peer;
mod transfer;

use ferry_common::names::Role;
use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};

use ferry_common::names;
use tonic::{Request, Status};

use crate::raft_types::Raft;
use crate::state::{Command, Response, State};
use crate::store::Applied;

/// What the services share.
pub struct Core {
    /// Signs agents' certificates (joins, renewals), if this node holds the CA key.
    pub signer: Option<Arc<enrol::Signer>>,
    /// Renewals asked of this node, per identity ([`enrol::RENEWALS_PER_WINDOW`]).
    pub renewals: enrol::Limiter<String>,
    /// Calls refused for their certificate's role recorded in the audit log, per operator
    /// ([`DENIALS_RECORDED_PER_WINDOW`]): the log keeps its newest records only, and a
    /// certificate cannot push the others out by calling what it may not.
    pub denials: enrol::Limiter<String>,
    /// The pin of the cluster CA (join tokens carry it).
    pub ca_pin: [u8; 32],
    /// The CA certificates this node trusts (PEM, its `tls.ca`): heartbeats hand them to
    /// agents, so a CA rotation reaches them.
    pub ca_pem: String,
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
    /// Ends the current hold on this node's election timer ([`Core::hold_elections`]).
    pub election_hold: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
}

/// Calls refused for their role that one operator gets recorded per minute, per node; more
/// are refused just the same and only logged.
pub const DENIALS_RECORDED_PER_WINDOW: u32 = 10;

/// The longest a node holds its election timer for one request: a hold that outlived the
/// transfer that asked for it would leave the cluster slower to replace a dead leader.
pub const MAX_ELECTION_HOLD: Duration = Duration::from_secs(60);

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
    /// A state machine command (boxed: some commands carry a whole migration spec).
    Command(Box<Command>),
    /// Several independent state machine commands (committed with group commit; the answer is
    /// a [`Response::Batch`] with one response per command, [`Response::NotCommitted`] for any
    /// that could not be committed).
    Commands(Vec<Command>),
    /// Add a coordinator node: as a learner, then, once it has caught up, as a voter. If it has
    /// not caught up within `catch_up_ms`, it is removed again and the membership is as before.
    AddNode {
        /// Its id.
        node_id: u64,
        /// Its gRPC address.
        addr: String,
        /// How long it may take to catch up.
        catch_up_ms: u64,
    },
    /// Remove a coordinator node (voter or learner) from the membership.
    RemoveNode {
        /// Its id.
        node_id: u64,
    },
}

/// How long a follower waits to apply up to the leader's read index.
const READ_WAIT: Duration = Duration::from_secs(10);

impl Core {
    /// Holds this node's election timer for `hold` (at most [`MAX_ELECTION_HOLD`]), or resumes
    /// it at once when `hold` is zero. The node still grants votes while held; a newer call
    /// replaces the one before it, and a hold always ends by itself.
    pub fn hold_elections(&self, hold: Duration) {
        let mut current = self.election_hold.lock().expect("not poisoned");
        if let Some(end) = current.take() {
            end.abort();
        }
        let hold = hold.min(MAX_ELECTION_HOLD);
        if hold.is_zero() {
            self.raft.runtime_config().elect(true);
            tracing::info!("Election timer resumed.");
            return;
        }
        self.raft.runtime_config().elect(false);
        tracing::info!(
            message = "Election timer held (a leader transfer is under way).",
            hold_ms = hold.as_millis() as u64
        );
        let raft = self.raft.clone();
        *current = Some(
            tokio::spawn(async move {
                tokio::time::sleep(hold).await;
                raft.runtime_config().elect(true);
                tracing::info!("Election timer resumed: its hold ended.");
            })
            .abort_handle(),
        );
    }

    /// Proposes `cmd` (through the leader, wherever it is) and returns what applying it produced.
    pub async fn write(&self, cmd: Command) -> Result<Response, Status> {
        self.propose(Proposal::Command(Box::new(cmd))).await
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
        let mut client = self
            .peers
            .client(leader)
            .map_err(|e| Status::unavailable(e.to_string()))?;
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
        use openraft::error::CheckIsLeaderError;
        match self.raft.ensure_linearizable().await {
            Ok(_) => {}
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(fwd))) => {
                let Some(node) = fwd.leader_node else {
                    return Err(Status::unavailable(
                        "no coordinator leader is elected right now; retry in a moment",
                    ));
                };
                let mut client = self
                    .peers
                    .client(&node.addr)
                    .map_err(|e| Status::unavailable(e.to_string()))?;
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
        let result = match p {
            Proposal::Command(cmd) => return self.commits.write(*cmd).await,
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
            Proposal::AddNode {
                node_id,
                addr,
                catch_up_ms,
            } => {
                self.add_node(node_id, addr, Duration::from_millis(catch_up_ms))
                    .await?
            }
            Proposal::RemoveNode { node_id } => self.remove_node(node_id).await?,
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

/// How often the leader logs a joining node's progress.
const CATCH_UP_LOG_EVERY: Duration = Duration::from_secs(5);

type MembershipResult =
    Result<Response, RaftError<u64, ClientWriteError<u64, openraft::BasicNode>>>;

impl Core {
    /// Whether this node leads (as far as its own metrics say).
    pub fn leads(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.node_id)
    }

    /// This node's metrics if it leads; else where the leader is. Membership decisions are
    /// taken on the leader's view (a follower's may lag).
    fn leader_metrics(&self) -> Result<crate::raft_types::Metrics, NotLeader> {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader == Some(self.node_id) {
            return Ok(m);
        }
        let addr = m.current_leader.and_then(|l| {
            m.membership_config
                .membership()
                .get_node(&l)
                .map(|n| n.addr.clone())
        });
        Err(NotLeader::Elsewhere(addr))
    }

    /// Adds `node_id` as a learner, waits (at most `catch_up`) until it holds the log up to its
    /// own membership entry, then makes it a voter. A node that never answers (a wrong address,
    /// not running, another cluster's certificate) is removed again when the time is up, so a
    /// mistake never costs a voter. Progress is logged.
    async fn add_node(
        &self,
        node_id: u64,
        addr: String,
        catch_up: Duration,
    ) -> Result<MembershipResult, NotLeader> {
        let metrics = self.leader_metrics()?;
        let membership = metrics.membership_config.membership();
        if let Some(known) = membership.get_node(&node_id) {
            let voter = membership.voter_ids().any(|v| v == node_id);
            let role = if voter { "voter" } else { "learner" };
            if known.addr != addr {
                return Ok(Ok(Response::Refused(format!(
                    "node {node_id} is already a {role} at {}; remove it first (ferryctl \
                     cluster remove-node --id {node_id}) to add it at {addr}",
                    known.addr
                ))));
            }
            if voter {
                return Ok(Ok(Response::Ok));
            }
            // A learner at the same address: an earlier add that was interrupted; wait again.
        }
        let started = tokio::time::Instant::now();
        let deadline = started + catch_up;
        let node = openraft::BasicNode { addr: addr.clone() };
        let added = match self.raft.add_learner(node_id, node, false).await {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let target = added.log_id.index;
        tracing::info!(
            message = "Added a node as a learner; waiting for it to catch up.",
            node_id,
            %addr,
            log_index = target,
            timeout_secs = catch_up.as_secs()
        );
        let mut rx = self.raft.metrics();
        let mut last_log = tokio::time::Instant::now();
        loop {
            let (member, leading, matched, last_index) = {
                let m = rx.borrow_and_update();
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&node_id).cloned().flatten())
                    .map(|l| l.index);
                (
                    m.membership_config
                        .membership()
                        .get_node(&node_id)
                        .is_some(),
                    m.current_leader == Some(self.node_id),
                    matched,
                    m.last_log_index.unwrap_or(0),
                )
            };
            if !member {
                return Ok(Ok(Response::Refused(format!(
                    "node {node_id} was removed while it was catching up; it was not made a voter"
                ))));
            }
            if !leading {
                return Ok(Ok(Response::Refused(format!(
                    "leadership moved while node {node_id} ({addr}) was catching up; it is still \
                     a learner and not a voter: run add-node again to finish, or remove-node \
                     --id {node_id} to drop it"
                ))));
            }
            if matched.is_some_and(|i| i >= target) {
                break;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                let progress = match matched {
                    None => "it never answered".to_string(),
                    Some(i) => format!("it holds the log up to {i} of {last_index}"),
                };
                tracing::warn!(
                    message = "A joining node did not catch up in time; removing it.",
                    node_id,
                    %addr,
                    matched = ?matched,
                    last_log_index = last_index
                );
                let rm = BTreeSet::from([node_id]);
                let undo = match self
                    .raft
                    .change_membership(openraft::ChangeMembers::RemoveNodes(rm), false)
                    .await
                {
                    Ok(_) => "it was removed again; the membership is unchanged".to_string(),
                    Err(e) => format!(
                        "removing it again failed ({e}): remove it with `ferryctl cluster \
                         remove-node --id {node_id}`"
                    ),
                };
                return Ok(Ok(Response::Refused(format!(
                    "node {node_id} at {addr} did not catch up within {}s ({progress}); {undo}. \
                     Check that ferry-coordinator runs there with node_id = {node_id} and \
                     bootstrap = false, that {addr} is its listen address and reachable from \
                     the leader, and that its certificate is from this cluster's CA (its log \
                     says why it refuses)",
                    catch_up.as_secs()
                ))));
            }
            if last_log.elapsed() >= CATCH_UP_LOG_EVERY {
                last_log = now;
                tracing::info!(
                    message = "A joining node is catching up.",
                    node_id,
                    %addr,
                    matched = ?matched,
                    needed = target,
                    last_log_index = last_index,
                    elapsed_secs = started.elapsed().as_secs()
                );
            }
            let wake = deadline.min(now + Duration::from_secs(1));
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
        tracing::info!(
            message = "A joining node caught up; making it a voter.",
            node_id,
            %addr,
            elapsed_secs = started.elapsed().as_secs()
        );
        let add = BTreeSet::from([node_id]);
        Ok(self
            .raft
            .change_membership(openraft::ChangeMembers::AddVoterIds(add), false)
            .await
            .map(|_| Response::Ok))
    }

    /// Removes `node_id`, a voter or a learner (a learner that never caught up included). A
    /// node that is not a member is an error: nothing would be removed.
    async fn remove_node(&self, node_id: u64) -> Result<MembershipResult, NotLeader> {
        let metrics = self.leader_metrics()?;
        let membership = metrics.membership_config.membership();
        if membership.get_node(&node_id).is_none() {
            let members: Vec<String> = membership.nodes().map(|(id, _)| id.to_string()).collect();
            return Ok(Ok(Response::Refused(format!(
                "node {node_id} is not a member of the cluster (members: {}); nothing was removed",
                members.join(", ")
            ))));
        }
        let rm = BTreeSet::from([node_id]);
        let change = if membership.voter_ids().any(|v| v == node_id) {
            openraft::ChangeMembers::RemoveVoters(rm)
        } else {
            // `RemoveVoters` does not touch learners: a learner is a node entry only.
            openraft::ChangeMembers::RemoveNodes(rm)
        };
        tracing::info!(message = "Removing a node.", node_id);
        Ok(self
            .raft
            .change_membership(change, false)
            .await
            .map(|_| Response::Ok))
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

/// Checks that the caller holds an operator's (ferryctl) certificate, of any role.
pub fn authorize_admin<T>(req: &Request<T>) -> Result<(), Status> {
    authorize_role(req, Role::Viewer).map(|_| ())
}

/// Checks that the caller holds an operator's certificate whose role allows what `need`
/// allows; returns the caller's role.
pub fn authorize_role<T>(req: &Request<T>, need: Role) -> Result<Role, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    match certs.first().and_then(ferry_common::tls::role_of) {
        None => Err(Status::permission_denied(
            "this call needs an admin certificate (ferry-coordinator pki issue --admin NAME)",
        )),
        Some(role) if role < need => Err(Status::permission_denied(format!(
            "this call needs the {need} role; this certificate has the {role} role (issue one \
             with `ferry-coordinator pki issue --admin NAME --role {need}`)"
        ))),
        Some(role) => Ok(role),
    }
}

/// Maps a refused command to a gRPC status.
pub fn refused(r: Response) -> Status {
    match r {
        Response::Refused(why) => Status::failed_precondition(why),
        other => Status::internal(format!("unexpected state machine response {other:?}")),
    }
}
