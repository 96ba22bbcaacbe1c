//! Generated protobuf and gRPC types. Nothing but generated code lives here, and how its enums
//! are named to people (`json`): each crate converts these to its own domain types in one module
//! at its edge.
#![allow(clippy::all, missing_docs)]

/// The encoded `FileDescriptorSet` of every ferry `.proto` file (for gRPC server reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ferry_descriptor.bin"));

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

/// The names of enums as people read them (JSON output, tables): lower case, without the type's
/// prefix (`PHASE_DONE` is `done`).
pub mod json {
    use super::admin::{CutoverPhase, JobState, Phase, SegmentStatus};

    /// A job state's name.
    pub fn job_state_name(s: JobState) -> &'static str {
        match s {
            JobState::Unspecified => "unspecified",
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
        }
    }

    /// Serialises a `JobState` field by name.
    pub fn job_state<S: serde::Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(job_state_name(JobState::try_from(*v).unwrap_or_default()))
    }

    /// A cutover phase's name.
    pub fn cutover_phase_name(p: CutoverPhase) -> &'static str {
        match p {
            CutoverPhase::Unspecified => "none",
            CutoverPhase::Freezing => "freezing",
            CutoverPhase::FinalSync => "final-sync",
            CutoverPhase::Verifying => "verifying",
            CutoverPhase::Switching => "switching",
            CutoverPhase::Done => "done",
            CutoverPhase::RollingBack => "rolling-back",
            CutoverPhase::Aborted => "aborted",
        }
    }

    /// Serialises a `CutoverPhase` field by name.
    pub fn cutover_phase<S: serde::Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(cutover_phase_name(
            CutoverPhase::try_from(*v).unwrap_or_default(),
        ))
    }

    /// A migration phase's name.
    pub fn phase_name(p: Phase) -> &'static str {
        match p {
            Phase::Unspecified => "unspecified",
            Phase::Planned => "planned",
            Phase::Copying => "copying",
            Phase::Syncing => "syncing",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }

    /// A segment status's name.
    pub fn segment_status_name(s: SegmentStatus) -> &'static str {
        match s {
            SegmentStatus::Unspecified => "unspecified",
            SegmentStatus::Pending => "pending",
            SegmentStatus::Leased => "leased",
            SegmentStatus::Verified => "verified",
            SegmentStatus::Failed => "failed",
            SegmentStatus::Stale => "stale",
        }
    }

    /// Serialises a `Phase` field by name.
    pub fn phase<S: serde::Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(phase_name(Phase::try_from(*v).unwrap_or_default()))
    }

    /// Serialises a `SegmentStatus` field by name.
    pub fn segment_status<S: serde::Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(segment_status_name(
            SegmentStatus::try_from(*v).unwrap_or_default(),
        ))
    }
}
