//! ferry's coordinator: the replicated migration state (openraft on sled), the gRPC services that
//! agents and operators use, and the `ferryctl` client.

pub mod cli;
pub mod codec;
pub mod ctl;
pub mod grpc;
pub mod network;
pub mod node;
pub mod quickstart;
pub mod raft_types;
pub mod state;
pub mod store;
