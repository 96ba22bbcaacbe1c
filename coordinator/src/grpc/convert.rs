//! Domain → protobuf conversions for the services: the one place that knows both.

use ferry_proto::admin as pb;

use crate::state::{
    Cutover, CutoverPhase, FullVerification, Job, JobKind, JobState, Migration, MigrationSpec,
    Phase, ReportOutcome, SegState, Segment, StepRun,
};

/// A report outcome on the wire.
pub fn outcome(o: ReportOutcome) -> ferry_proto::control::ReportOutcome {
    use ferry_proto::control::ReportOutcome as W;
    match o {
        ReportOutcome::Verified => W::Verified,
        ReportOutcome::Waiting => W::Waiting,
        ReportOutcome::Rejected => W::Rejected,
        ReportOutcome::Failed => W::Failed,
        ReportOutcome::GaveUp => W::GaveUp,
        ReportOutcome::Stale => W::Stale,
    }
}

/// A migration phase on the wire.
pub fn phase(p: Phase) -> pb::Phase {
    match p {
        Phase::Planned => pb::Phase::Planned,
        Phase::Copying => pb::Phase::Copying,
        Phase::Syncing => pb::Phase::Syncing,
        Phase::Done => pb::Phase::Done,
        Phase::Failed => pb::Phase::Failed,
    }
}

/// Admin spec from the domain spec.
pub fn spec(s: &MigrationSpec) -> pb::MigrationSpec {
    pb::MigrationSpec {
        source_agent: s.source_agent.clone(),
        source_path: s.source_path.clone(),
        target_agent: s.target_agent.clone(),
        target_path: s.target_path.clone(),
        segment_size: s.segment_size,
        xattrs: s.xattrs,
        excludes: s.excludes.clone(),
        max_attempts: s.max_attempts,
        keep_deleted: s.keep_deleted,
        max_delete: s.max_delete,
        sync_every_secs: s.sync_every_ms / 1000,
        auto_cutover_below_ms: s.auto_cutover_below_ms,
    }
}

/// A cutover phase on the wire.
pub fn cutover_phase(p: CutoverPhase) -> pb::CutoverPhase {
    match p {
        CutoverPhase::Freezing => pb::CutoverPhase::Freezing,
        CutoverPhase::FinalSync => pb::CutoverPhase::FinalSync,
        CutoverPhase::Verifying => pb::CutoverPhase::Verifying,
        CutoverPhase::Switching => pb::CutoverPhase::Switching,
        CutoverPhase::Done => pb::CutoverPhase::Done,
        CutoverPhase::RollingBack => pb::CutoverPhase::RollingBack,
        CutoverPhase::Aborted => pb::CutoverPhase::Aborted,
    }
}

/// A cutover, as operators see it; `now_ms` for the freeze window of one that runs.
pub fn cutover(c: &Cutover, now_ms: u64) -> pb::CutoverInfo {
    pb::CutoverInfo {
        attempt: c.attempt,
        phase: cutover_phase(c.phase).into(),
        started_ms: c.started_ms,
        frozen_ms: c.frozen_ms,
        switched_ms: c.switched_ms,
        ended_ms: c.ended_ms,
        freeze_window_ms: c.freeze_window_ms(now_ms),
        final_round: c.final_round,
        runs: c.runs.iter().map(step_run).collect(),
        error: c.error.clone(),
        trigger: c.trigger.clone(),
    }
}

/// A step as an agent did it, as operators see it.
pub fn step_run(r: &StepRun) -> pb::StepRunInfo {
    pb::StepRunInfo {
        step: r.step.as_str().into(),
        agent: r.agent.clone(),
        command: r.command.clone(),
        exit_code: r.exit_code,
        output: r.output.clone(),
        started_ms: r.started_ms,
        duration_ms: r.duration_ms,
        recorded_ms: r.recorded_ms,
        tree: r.tree.as_ref().map(|t| pb::TreeDigestInfo {
            digest: ferry_common::hash::hex(&t.digest),
            files: t.files,
            bytes: t.bytes,
            dirs: t.dirs,
            symlinks: t.symlinks,
            error: t.error.clone(),
            files_read: t.files_read,
            bytes_read: t.bytes_read,
            class_digests: t
                .classes
                .iter()
                .map(|d| ferry_common::hash::hex(d))
                .collect(),
        }),
    }
}

/// A full verification, as operators see it.
pub fn verification(v: &FullVerification) -> pb::FullVerificationInfo {
    pb::FullVerificationInfo {
        number: v.number,
        round: v.round,
        started_ms: v.started_ms,
        ended_ms: v.ended_ms,
        equal: v.equal(),
        error: v.error.clone(),
        source: v.source.as_ref().map(step_run),
        target: v.target.as_ref().map(step_run),
    }
}

/// A round, as operators see it; `now` is the migration's counters (for a round that runs).
pub fn round(r: &crate::state::Round, now: &crate::state::Counters) -> pb::RoundInfo {
    let d = r.delta(now);
    pb::RoundInfo {
        number: r.number,
        outcome: phase(r.outcome).into(),
        started_ms: r.started_ms,
        finished_ms: r.finished_ms,
        segments: d.segments,
        files: d.files,
        bytes: d.bytes,
        files_verified: d.verified_files,
        bytes_verified: d.verified_bytes,
        deleted: r.deleted,
        segments_failed: d.failed_segments,
        segments_stale: d.stale_segments,
    }
}

/// Progress of a migration.
/// A throttle as operators see it: "off" for none.
pub fn off_if_empty(throttle: &str) -> String {
    if throttle.is_empty() {
        "off".into()
    } else {
        throttle.into()
    }
}

/// A migration's progress, as far as the migration alone says.
pub fn progress(m: &Migration) -> pb::MigrationProgress {
    let c = &m.counters;
    // Failures are the current round's: an earlier round's were sent again by the next one.
    let this_round = m.round().delta(c);
    pb::MigrationProgress {
        migration_id: m.id,
        name: m.name.clone(),
        spec: Some(spec(&m.spec)),
        phase: phase(m.phase).into(),
        scan_complete: m.scan_complete,
        segments_total: c.segments,
        segments_verified: c.verified_segments,
        segments_leased: 0,
        bytes_total: c.bytes,
        bytes_verified: c.verified_bytes,
        files_total: c.files,
        files_verified: c.verified_files,
        leases_granted: c.leases_granted,
        failed_attempts: c.failed_attempts,
        last_error: m.last_error.clone(),
        scan_issues: m
            .scan_issues
            .iter()
            .map(|(path, reason)| pb::ScanIssue {
                path: path.clone(),
                reason: reason.clone(),
            })
            .collect(),
        scan_issues_total: m.scan_issues_total,
        created_ms: m.created_ms,
        finished_ms: m.finished_ms,
        hardlinks: m.hardlinks,
        excluded: m.excluded,
        notes: Vec::new(),
        segments_failed: this_round.failed_segments,
        files_failed: this_round.failed_files,
        bytes_failed: this_round.failed_bytes,
        // Filled by the status call, which knows the other agents and the time, and reads the
        // segments.
        blocked: String::new(),
        failed: Vec::new(),
        throttle: off_if_empty(&m.throttle),
        round: m.round().number,
        rounds: m.rounds.iter().map(|r| round(r, c)).collect(),
        segments_stale: c.stale_segments,
        cutover: m.cutover.as_ref().map(|c| cutover(c, super::now_ms())),
        verification: m.verification.as_ref().map(verification),
        fallback: m.fallback,
        fallback_of: m.spec.fallback_of,
        finalized_ms: m.finalized_ms,
        targets: members(m),
    }
}

/// A migration's pool of targets (leases per member are the status call's to count).
pub fn members(m: &Migration) -> Vec<pb::PoolMember> {
    m.targets
        .iter()
        .map(|t| pb::PoolMember {
            agent: t.agent.clone(),
            active: t.active,
            segments_verified: t.verified_segments,
            bytes_verified: t.verified_bytes,
            segments_leased: 0,
        })
        .collect()
}

/// One segment of migration `m`, as it stands.
pub fn segment(m: &Migration, id: u64, s: &Segment) -> pb::SegmentState {
    let hex = |h: &Option<[u8; 32]>| h.map(|h| ferry_common::hash::hex(&h)).unwrap_or_default();
    pb::SegmentState {
        segment_id: id,
        state: match s.state {
            SegState::Pending => pb::SegmentStatus::Pending,
            SegState::Leased { .. } => pb::SegmentStatus::Leased,
            SegState::Verified => pb::SegmentStatus::Verified,
            SegState::Failed => pb::SegmentStatus::Failed,
            SegState::Stale => pb::SegmentStatus::Stale,
        }
        .into(),
        bytes: s.bytes,
        leases: s.leases,
        attempts: s.attempts,
        source_blake3: hex(&s.source_hash()),
        target_blake3: hex(&s.target_hash()),
        last_error: s.last_error.to_string(),
        files: s.files,
        retry_at_ms: match s.state {
            SegState::Pending => s.not_before_ms,
            _ => 0,
        },
        target: if s.leases > 0 {
            m.member_agent(s.target).to_string()
        } else {
            String::new()
        },
    }
}

/// A job as operators read it, at `now_ms` (an open job past its deadline has failed).
pub fn job(j: &Job, now_ms: u64) -> pb::JobInfo {
    let mut info = pb::JobInfo {
        id: j.id,
        agent: j.agent.clone(),
        kind: j.kind.name().to_string(),
        state: match j.state_at(now_ms) {
            JobState::Pending => pb::JobState::Pending,
            JobState::Running => pb::JobState::Running,
            JobState::Done => pb::JobState::Done,
            JobState::Failed => pb::JobState::Failed,
        }
        .into(),
        progress: j.progress.clone(),
        result: j.result.clone(),
        error: j.error_at(now_ms),
        created_ms: j.created_ms,
        finished_ms: j.finished_ms,
        deadline_ms: j.deadline_ms,
        ..Default::default()
    };
    match &j.kind {
        JobKind::Assess { paths, excludes } => {
            info.assess = Some(pb::AssessSpec {
                paths: paths.clone(),
                excludes: excludes.clone(),
            })
        }
        JobKind::Probe {
            peer,
            seconds,
            streams,
            congestions,
        } => {
            info.probe = Some(pb::ProbeSpec {
                peer: peer.clone(),
                seconds: *seconds,
                streams: *streams,
                congestions: congestions.clone(),
            })
        }
        JobKind::SyncPreview { migration_id } => {
            info.sync_preview = Some(pb::SyncPreviewSpec {
                migration_id: *migration_id,
            })
        }
    }
    info
}
