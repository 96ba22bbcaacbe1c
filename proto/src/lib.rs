//! Generated protobuf and gRPC types. Nothing but generated code lives here: each crate converts
//! these to its own domain types in one module at its edge.
#![allow(clippy::all, missing_docs)]

pub mod admin {
    tonic::include_proto!("ferry.admin.v1");
}

pub mod control {
    tonic::include_proto!("ferry.control.v1");
}

pub mod data {
    tonic::include_proto!("ferry.data.v1");
}

pub mod raft {
    tonic::include_proto!("ferry.raft.v1");
}
