//! ferry's coordinator: the replicated migration state (openraft on sled), the gRPC services that
//! agents and operators use. (The `ferryctl` client is its own crate.)

pub mod certs;
pub mod cli;
pub mod codec;
pub mod grpc;
pub mod metrics;
pub mod network;
pub mod node;
pub mod raft_types;
pub mod state;
pub mod store;
