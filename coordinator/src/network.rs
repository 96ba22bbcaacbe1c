//! Raft transport between coordinator nodes.
//!
//! This build runs single-node clusters: a lone voter never sends Raft RPCs, so the factory below is
//! never asked for a connection. Should it be (a membership change to several nodes), every RPC
//! fails with `Unreachable` and a message saying so, rather than pretending to deliver.

use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;

use crate::raft_types::{NodeId, TypeConfig};

/// Creates [`SingleNodeNetwork`] clients.
#[derive(Debug, Clone, Default)]
pub struct SingleNodeNetworkFactory;

/// A Raft peer connection that cannot exist in a single-node build.
#[derive(Debug)]
pub struct SingleNodeNetwork {
    target: NodeId,
}

#[derive(Debug, thiserror::Error)]
#[error("node {0} is not reachable: this coordinator build runs a single-node cluster; multi-node Raft transport is not available yet")]
struct NoPeers(NodeId);

impl RaftNetworkFactory<TypeConfig> for SingleNodeNetworkFactory {
    type Network = SingleNodeNetwork;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> SingleNodeNetwork {
        SingleNodeNetwork { target }
    }
}

impl SingleNodeNetwork {
    fn unreachable<E: std::error::Error>(&self) -> RPCError<NodeId, BasicNode, E> {
        RPCError::Unreachable(Unreachable::new(&NoPeers(self.target)))
    }
}

impl RaftNetwork<TypeConfig> for SingleNodeNetwork {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        Err(self.unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        Err(self.unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        Err(self.unreachable())
    }
}
