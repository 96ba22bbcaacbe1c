//! The coordinator-to-coordinator service: Raft RPCs, forwarded proposals, read index, elect.

use std::sync::Arc;

use ferry_proto::raft::{self as pb, raft_peer_server::RaftPeer};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use super::{authorize_coordinator, Core, Proposal};
use crate::raft_types::{NodeId, TypeConfig};

/// Serves [`RaftPeer`].
pub struct PeerService(pub Arc<Core>);

fn decode<T: DeserializeOwned>(p: &pb::RaftPayload) -> Result<T, Status> {
    crate::codec::decode(&p.payload)
        .map_err(|e| Status::invalid_argument(format!("malformed Raft payload: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<Response<pb::RaftPayload>, Status> {
    Ok(Response::new(pb::RaftPayload {
        payload: crate::codec::encode(v).map_err(|e| Status::internal(e.to_string()))?,
        data: Vec::new(),
    }))
}

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append_entries(&self, req: Request<pb::RaftPayload>) -> R<pb::RaftPayload> {
        authorize_coordinator(&req)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req.get_ref())?;
        encode(&self.0.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<pb::RaftPayload>) -> R<pb::RaftPayload> {
        authorize_coordinator(&req)?;
        let rpc: VoteRequest<NodeId> = decode(req.get_ref())?;
        encode(&self.0.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<pb::RaftPayload>) -> R<pb::RaftPayload> {
        authorize_coordinator(&req)?;
        let mut rpc: InstallSnapshotRequest<TypeConfig> = decode(req.get_ref())?;
        rpc.data = req.into_inner().data;
        encode(&self.0.raft.install_snapshot(rpc).await)
    }

    async fn propose(&self, req: Request<pb::RaftPayload>) -> R<pb::RaftPayload> {
        authorize_coordinator(&req)?;
        let p: Proposal = decode(req.get_ref())?;
        // Only the leader executes forwarded proposals; it never forwards them again.
        let resp = self.0.execute_here(p).await?;
        encode(&resp)
    }

    async fn read_index(&self, req: Request<pb::ReadIndexRequest>) -> R<pb::ReadIndexReply> {
        authorize_coordinator(&req)?;
        let (read, _applied) = self.0.raft.get_read_log_id().await.map_err(|e| {
            Status::unavailable(format!("cannot confirm leadership for a read: {e}"))
        })?;
        Ok(Response::new(pb::ReadIndexReply {
            index: read.map(|l| l.index).unwrap_or(0),
            present: read.is_some(),
        }))
    }

    async fn elect(&self, req: Request<pb::ElectRequest>) -> R<pb::ElectReply> {
        authorize_coordinator(&req)?;
        self.0
            .raft
            .trigger()
            .elect()
            .await
            .map_err(|e| Status::unavailable(format!("cannot start an election: {e}")))?;
        Ok(Response::new(pb::ElectReply {}))
    }

    async fn hold_elections(
        &self,
        req: Request<pb::HoldElectionsRequest>,
    ) -> R<pb::HoldElectionsReply> {
        authorize_coordinator(&req)?;
        let millis = req.into_inner().millis;
        self.0
            .hold_elections(std::time::Duration::from_millis(millis));
        Ok(Response::new(pb::HoldElectionsReply {}))
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> R<pb::TransferLeaderReply> {
        authorize_coordinator(&req)?;
        // Only the leader runs a transfer; it never forwards one again.
        self.0
            .transfer_leader_here(req.into_inner().node_id)
            .await?;
        Ok(Response::new(pb::TransferLeaderReply {}))
    }

    async fn renew_node_certificate(
        &self,
        req: Request<pb::RenewNodeCertificateRequest>,
    ) -> R<pb::RenewNodeCertificateReply> {
        authorize_coordinator(&req)?;
        let current = req
            .peer_certs()
            .and_then(|c| c.first().cloned())
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let id = ferry_common::tls::coordinator_node(&current).ok_or_else(|| {
            Status::permission_denied(
                "this coordinator certificate names no node id (node-<id>.coordinator.ferry): \
                 renew it by hand (`ferry-coordinator pki request` and `pki sign`)",
            )
        })?;
        let from = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let csr = req.into_inner().csr_der;
        let cert_pem = super::enrol::renew_node(&self.0, id, &current, &csr, from).await?;
        Ok(Response::new(pb::RenewNodeCertificateReply { cert_pem }))
    }
}
