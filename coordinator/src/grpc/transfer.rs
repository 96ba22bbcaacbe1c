//! Moving leadership to a chosen voter (`ferryctl cluster transfer-leader`).
//!
//! openraft 0.9 has no leader transfer, so the leader runs one itself, in the order of the Raft
//! thesis (§3.10): it stops proposing (queued commands wait), waits until the chosen node's log
//! matches its own, holds every other voter's election timer, and has the chosen node campaign
//! until it leads. The pause is what makes it work under load: a node one entry behind can never
//! win, and a campaign it loses has already made the old leader step down — with the other
//! voters held, nothing would lead until the holds ended.
//!
//! A node that does not lead forwards the request to the leader ([`Core::transfer_leader`]).

use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use super::Core;

/// How long a leader transfer may take, over however many campaigns.
const TRANSFER_WITHIN: Duration = Duration::from_secs(20);
/// How long one campaign of a leader transfer is waited for before the node campaigns again.
const TRANSFER_CAMPAIGN: Duration = Duration::from_secs(3);
/// How long a node is waited for to hold or resume its election timer.
const HOLD_CALL: Duration = Duration::from_secs(2);
/// How long the entries being committed when the transfer starts may take to be answered.
const DRAIN_WITHIN: Duration = Duration::from_secs(10);
/// How long the chosen node may take to replicate the leader's whole log, writes paused.
const CATCH_UP_WITHIN: Duration = Duration::from_secs(10);
/// How long the chosen node may take to answer the call that starts its campaign.
const ELECT_CALL: Duration = Duration::from_secs(5);

impl Core {
    /// Makes voter `to` the leader: here if this node leads, else through the leader (which
    /// checks that `to` is a voter: its membership is the one that counts).
    pub async fn transfer_leader(self: &Arc<Self>, to: u64) -> Result<(), Status> {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        match metrics.current_leader {
            Some(leader) if leader == to => Ok(()),
            Some(leader) if leader == self.node_id => self.transfer_leader_here(to).await,
            Some(leader) => {
                let addr = membership
                    .get_node(&leader)
                    .map(|n| n.addr.clone())
                    .ok_or_else(|| {
                        Status::unavailable(format!("leader {leader} has no address"))
                    })?;
                let mut client = self
                    .peers
                    .client(&addr)
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                client
                    .transfer_leader(ferry_proto::raft::TransferLeaderRequest { node_id: to })
                    .await
                    .map_err(|s| {
                        Status::new(s.code(), format!("via leader {leader}: {}", s.message()))
                    })?;
                Ok(())
            }
            None => Err(Status::unavailable(
                "no coordinator leader is elected right now; retry in a moment",
            )),
        }
    }

    /// [`Core::transfer_leader`] on the leader, in a task of its own: a caller that gives up
    /// (a client's deadline) does not stop it half-way, with proposals paused or voters held.
    pub async fn transfer_leader_here(self: &Arc<Self>, to: u64) -> Result<(), Status> {
        let core = self.clone();
        tokio::spawn(async move { core.run_transfer(to).await })
            .await
            .map_err(|e| Status::internal(format!("the leader transfer failed: {e}")))?
    }

    /// Pauses proposals, waits until `to` holds the whole log, holds the other voters, has
    /// `to` campaign; then resumes everything.
    async fn run_transfer(&self, to: u64) -> Result<(), Status> {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.current_leader != Some(self.node_id) {
            return Err(Status::failed_precondition(format!(
                "node {} does not lead any more; ask again",
                self.node_id
            )));
        }
        if metrics.current_leader == Some(to) {
            return Ok(());
        }
        let membership = metrics.membership_config.membership().clone();
        if !membership.voter_ids().any(|v| v == to) {
            return Err(Status::failed_precondition(format!(
                "node {to} is not a voter"
            )));
        }
        let addr = membership
            .get_node(&to)
            .map(|n| n.addr.clone())
            .ok_or_else(|| Status::not_found(format!("node {to} has no address")))?;
        let mut client = self
            .peers
            .client(&addr)
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let others: Vec<(u64, String)> = membership
            .voter_ids()
            .filter(|id| *id != to)
            .filter_map(|id| membership.get_node(&id).map(|n| (id, n.addr.clone())))
            .collect();

        let paused = tokio::time::timeout(DRAIN_WITHIN, self.commits.pause())
            .await
            .map_err(|_| {
                Status::unavailable(format!(
                    "the entries being committed were not answered within {DRAIN_WITHIN:?}; \
                     leadership stays here (is a quorum up?)"
                ))
            })?;
        tracing::info!(
            message =
                "Leader transfer: proposals paused; waiting for the node to hold the whole log.",
            node = to
        );
        let me = self.node_id;
        let caught_up = self
            .raft
            .wait(Some(CATCH_UP_WITHIN))
            .metrics(
                |m| {
                    let last = m.last_log_index;
                    // Leadership lost meanwhile ends the wait too (checked below).
                    m.current_leader != Some(me)
                        || m.replication
                            .as_ref()
                            .and_then(|r| r.get(&to))
                            .is_some_and(|matched| matched.map(|l| l.index) >= last)
                },
                "leader transfer: the node holds the whole log",
            )
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "node {to} did not catch up with the leader's log within \
                     {CATCH_UP_WITHIN:?} ({e}); leadership stays here — retry once it is up \
                     and replicating"
                ))
            })?;
        if caught_up.current_leader != Some(me) {
            return Err(Status::unavailable(format!(
                "node {me} lost its leadership during the transfer; ask again"
            )));
        }
        // Each node draws its election timeout once, at start. Left alone, the election `to`
        // starts would be a race it loses every time against an old leader whose timeout is
        // the shorter: hold every other voter's election timer meanwhile. `to` campaigns again
        // by its own timer, if a transfer before this one left it held.
        self.hold_elections_of(&[(to, addr)], Duration::ZERO).await;
        self.hold_elections_of(&others, TRANSFER_WITHIN + TRANSFER_CAMPAIGN)
            .await;
        let moved = self.campaign(&mut client, to).await;
        self.hold_elections_of(&others, Duration::ZERO).await;
        // Queued commands go to the new leader (forwarded), or are proposed here again if the
        // transfer failed.
        drop(paused);
        moved
    }

    /// Holds (or with zero, resumes) the election timers of `nodes`, this one included if
    /// listed. Best effort: a node that cannot be reached cannot campaign either, and every
    /// hold ends by itself.
    async fn hold_elections_of(&self, nodes: &[(u64, String)], hold: Duration) {
        for (id, addr) in nodes {
            if *id == self.node_id {
                self.hold_elections(hold);
                continue;
            }
            let asked = async {
                let mut c = self.peers.client(addr).map_err(|e| e.to_string())?;
                let req = ferry_proto::raft::HoldElectionsRequest {
                    millis: hold.as_millis() as u64,
                };
                match tokio::time::timeout(HOLD_CALL, c.hold_elections(req)).await {
                    Ok(r) => r.map(|_| ()).map_err(|s| s.message().to_string()),
                    Err(_) => Err(format!("no answer within {HOLD_CALL:?}")),
                }
            };
            if let Err(error) = asked.await {
                tracing::warn!(message = "Leader transfer: could not hold or resume a node's election timer.", node = id, %addr, %error);
            }
        }
    }

    /// Has node `to` campaign until this node sees it lead, again when a campaign is lost,
    /// for at most [`TRANSFER_WITHIN`]. Its first campaign usually is lost: the voters still
    /// follow this leader's lease. It makes this node step down, though, and the next one,
    /// with this node's vote, wins.
    async fn campaign(
        &self,
        client: &mut ferry_proto::raft::raft_peer_client::RaftPeerClient<tonic::transport::Channel>,
        to: u64,
    ) -> Result<(), Status> {
        let deadline = tokio::time::Instant::now() + TRANSFER_WITHIN;
        loop {
            match tokio::time::timeout(ELECT_CALL, client.elect(ferry_proto::raft::ElectRequest {}))
                .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(s)) => {
                    return Err(Status::unavailable(format!("node {to}: {}", s.message())))
                }
                Err(_) => {
                    return Err(Status::unavailable(format!(
                        "node {to} did not answer within {ELECT_CALL:?}"
                    )))
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let won = self
                .raft
                .wait(Some(left.min(TRANSFER_CAMPAIGN)))
                .metrics(|m| m.current_leader == Some(to), "leader transfer")
                .await;
            match won {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(Status::unavailable(format!(
                        "node {to} did not become leader: {e}"
                    )))
                }
                Err(e) => {
                    tracing::info!(message = "Leader transfer: the campaign was lost; campaigning again.", node = to, error = %e)
                }
            }
        }
    }
}
