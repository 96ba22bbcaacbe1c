//! Raft transport between coordinator nodes: openraft's RPCs in the binary encoding of [`crate::codec`] over gRPC with mutual TLS
//! (the `RaftPeer` service in `proto/raft.proto`). Each peer gets one lazily connected channel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_common::tls::TlsMaterial;
use ferry_proto::raft::{raft_peer_client::RaftPeerClient, RaftPayload};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::raft_types::{NodeId, TypeConfig};

/// gRPC channels to peers, shared by the Raft network and request forwarding.
#[derive(Clone)]
pub struct Peers {
    /// The TLS of channels made from now on, and the channels made.
    inner: Arc<Mutex<PeersInner>>,
}

struct PeersInner {
    tls: tonic::transport::ClientTlsConfig,
    channels: HashMap<String, Channel>,
}

impl Peers {
    /// Peers reached with this node's TLS identity.
    pub fn new(tls: &TlsMaterial) -> Self {
        Peers {
            inner: Arc::new(Mutex::new(PeersInner {
                tls: tls.grpc_client(),
                channels: HashMap::new(),
            })),
        }
    }

    /// Reaches peers with `tls`'s current identity from now on (a renewed certificate): the
    /// channels made so far are dropped once the calls that hold them end, so no connection
    /// goes on presenting the old certificate until it expires.
    pub fn refresh(&self, tls: &TlsMaterial) {
        let mut inner = self.inner.lock().expect("not poisoned");
        inner.tls = tls.grpc_client();
        inner.channels.clear();
    }

    /// A client for the peer at `addr` (`host:port`).
    pub fn client(&self, addr: &str) -> Result<RaftPeerClient<Channel>, PeerError> {
        let mut inner = self.inner.lock().expect("not poisoned");
        let ch = match inner.channels.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = Endpoint::from_shared(format!("https://{addr}"))
                    .map_err(|source| PeerError::BadAddress {
                        addr: addr.to_string(),
                        source,
                    })?
                    .tls_config(inner.tls.clone())
                    .map_err(|source| PeerError::Tls {
                        addr: addr.to_string(),
                        source,
                    })?
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(2))
                    .keep_alive_timeout(Duration::from_secs(3))
                    .keep_alive_while_idle(true)
                    .connect_lazy();
                inner.channels.insert(addr.to_string(), c.clone());
                c
            }
        };
        Ok(RaftPeerClient::new(ch)
            .max_decoding_message_size(1 << 30)
            .max_encoding_message_size(1 << 30))
    }
}

/// Creates [`PeerNetwork`] clients.
#[derive(Clone)]
pub struct PeerNetworkFactory(pub Peers);

/// The Raft connection to one peer.
pub struct PeerNetwork {
    target: NodeId,
    addr: String,
    peers: Peers,
}

impl RaftNetworkFactory<TypeConfig> for PeerNetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerNetwork {
        PeerNetwork {
            target,
            addr: node.addr.clone(),
            peers: self.0.clone(),
        }
    }
}

/// A peer could not be called.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// Its address is not a valid endpoint: fix the member's address (`cluster add-node`).
    #[error("bad peer address {addr}: {source}")]
    BadAddress {
        /// The address.
        addr: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// This node's TLS identity could not be applied to the channel.
    #[error("TLS for peer {addr}: {source}")]
    Tls {
        /// The address.
        addr: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The call failed (Unavailable or DeadlineExceeded: the peer is unreachable; anything
    /// else: the call itself failed).
    #[error("node {node} at {addr}: {message}")]
    Call {
        /// The peer's node id.
        node: NodeId,
        /// Its address.
        addr: String,
        /// gRPC's message.
        message: String,
    },
}

type Rpc =
    fn(
        RaftPeerClient<Channel>,
        tonic::Request<RaftPayload>,
    )
        -> futures::future::BoxFuture<'static, Result<tonic::Response<RaftPayload>, tonic::Status>>;

impl PeerNetwork {
    async fn call<Req, Resp, E>(
        &self,
        rpc: Rpc,
        req: &Req,
        data: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload =
            crate::codec::encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let client = self
            .peers
            .client(&self.addr)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let mut request = tonic::Request::new(RaftPayload { payload, data });
        request.set_timeout(option.hard_ttl());
        let reply = match rpc(client, request).await {
            Ok(r) => r.into_inner().payload,
            Err(s) => {
                let e = PeerError::Call {
                    node: self.target,
                    addr: self.addr.clone(),
                    message: s.message().to_string(),
                };
                return Err(match s.code() {
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                        RPCError::Unreachable(Unreachable::new(&e))
                    }
                    _ => RPCError::Network(NetworkError::new(&e)),
                });
            }
        };
        let result: Result<Resp, RaftError<NodeId, E>> =
            crate::codec::decode(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(
            |mut c, r| Box::pin(async move { c.append_entries(r).await }),
            &rpc,
            Vec::new(),
            &option,
        )
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let mut rpc = rpc;
        let data = std::mem::take(&mut rpc.data);
        self.call(
            |mut c, r| Box::pin(async move { c.install_snapshot(r).await }),
            &rpc,
            data,
            &option,
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(
            |mut c, r| Box::pin(async move { c.vote(r).await }),
            &rpc,
            Vec::new(),
            &option,
        )
        .await
    }
}
