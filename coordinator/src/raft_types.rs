//! openraft type configuration for ferry's coordinator.

use std::io::Cursor;

use crate::state::{Command, Response};

openraft::declare_raft_types!(
    /// ferry's Raft types: commands are [`Command`], responses [`Response`].
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A Raft node handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// Node id.
pub type NodeId = u64;
/// A storage error.
pub type StorageError = openraft::StorageError<NodeId>;
/// A node's Raft metrics.
pub type Metrics = openraft::RaftMetrics<NodeId, openraft::BasicNode>;
