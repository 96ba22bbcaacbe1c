//! What one coordinator node decodes from another (Raft RPCs and forwarded proposals, postcard
//! encoded) and from its own log (commands): any bytes are decoded or refused, never a panic,
//! never an allocation a length prefix asked for without the bytes behind it.
#![no_main]

use ferry_coordinator::codec::decode;
use ferry_coordinator::grpc::Proposal;
use ferry_coordinator::raft_types::{NodeId, TypeConfig};
use ferry_coordinator::state::Command;
use libfuzzer_sys::fuzz_target;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 5 {
        0 => drop(decode::<AppendEntriesRequest<TypeConfig>>(bytes)),
        1 => drop(decode::<VoteRequest<NodeId>>(bytes)),
        2 => drop(decode::<InstallSnapshotRequest<TypeConfig>>(bytes)),
        3 => drop(decode::<Proposal>(bytes)),
        _ => drop(decode::<Command>(bytes)),
    }
});
