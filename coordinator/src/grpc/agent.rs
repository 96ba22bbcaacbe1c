//! The agent control service.

use std::sync::Arc;
use std::time::Duration;

use ferry_proto::control::{self as pb, agent_control_server::AgentControl};
use tonic::{Request, Response as GrpcResponse, Status};

use super::{authorize_agent, now_ms, refused, Core};
use crate::state::{
    Command, JobKind, JobPart, JobUpdate, Response, Role, SegmentReg, Step, StepRun, TreeDigest,
    CLASSES, MAX_STEP_OUTPUT,
};
use ferry_common::text::head;

fn lease_pb(l: crate::state::Lease, ttl_ms: u64) -> pb::Lease {
    pb::Lease {
        ttl_ms,
        migration_id: l.migration_id,
        segment_id: l.segment_id,
        epoch: l.epoch,
        expires_ms: l.expires_ms,
        attempts: l.attempts,
        target_agent: l.target_agent,
        target_addr: l.target_addr,
    }
}

/// The cutover steps and full verification passes `agent` must do now, in the migrations it
/// is the source or target of.
fn cutover_work(s: &crate::state::State, agent: &str) -> Vec<pb::CutoverWork> {
    let mut out = Vec::new();
    for m in s.sourced_or_targeted_by(agent) {
        // (step, cutover attempt, verification number, round)
        let mut steps: Vec<(Step, u32, u32, u32)> = Vec::new();
        if let Some(c) = &m.cutover {
            steps.extend(
                c.pending_steps()
                    .into_iter()
                    .map(|st| (st, c.attempt, 0, c.final_round)),
            );
        }
        if let Some(v) = &m.verification {
            steps.extend(
                v.pending_steps()
                    .into_iter()
                    .map(|st| (st, 0, v.number, v.round)),
            );
        }
        for (step, attempt, verification, round) in steps {
            let who = if step.on_target() {
                &m.spec.target_agent
            } else {
                &m.spec.source_agent
            };
            if who != agent {
                continue;
            }
            out.push(pb::CutoverWork {
                migration_id: m.id,
                migration_uuid: m.uuid.clone(),
                migration_name: m.name.clone(),
                attempt,
                step: step_pb(step).into(),
                source_path: m.spec.source_path.clone(),
                target_path: m.spec.target_path.clone(),
                excludes: m.spec.excludes.clone(),
                final_round: round,
                verification,
                target_is_store: s
                    .agents
                    .get(&m.spec.target_agent)
                    .is_some_and(|a| a.writes_to_store()),
            });
        }
    }
    out
}

/// The jobs `agent` must run or answer now.
fn job_work(s: &crate::state::State, agent: &str, now_ms: u64) -> Vec<pb::JobWork> {
    s.jobs_for(agent, now_ms)
        .into_iter()
        .filter_map(|(j, part)| {
            let mut w = pb::JobWork {
                id: j.id,
                ..Default::default()
            };
            match (&j.kind, part) {
                (JobKind::Assess { paths, excludes }, _) => {
                    w.assess = Some(pb::AssessJob {
                        paths: paths.clone(),
                        excludes: excludes.clone(),
                    })
                }
                (JobKind::SyncPreview { migration_id }, _) => {
                    // A migration deleted since: nothing to preview, the job ends at its
                    // deadline.
                    let m = s.migrations.get(migration_id)?;
                    w.sync_preview = Some(pb::SyncPreviewJob {
                        migration_id: *migration_id,
                        migration_uuid: m.uuid.clone(),
                        source_path: m.spec.source_path.clone(),
                        excludes: m.spec.excludes.clone(),
                        round: m.round().number,
                        keep_deleted: m.spec.keep_deleted,
                        max_delete: m.spec.max_delete,
                    });
                }
                (JobKind::Probe { .. }, JobPart::Answer) => {
                    w.answer = Some(pb::ProbeAnswer {
                        peer: j.agent.clone(),
                    })
                }
                (
                    JobKind::Probe {
                        peer,
                        seconds,
                        streams,
                        congestions,
                    },
                    JobPart::Run,
                ) => {
                    w.probe = Some(pb::ProbeJob {
                        peer: peer.clone(),
                        peer_addr: s
                            .agents
                            .get(peer)
                            .map(|a| a.data_addr.clone())
                            .unwrap_or_default(),
                        seconds: *seconds,
                        streams: *streams,
                        congestions: congestions.clone(),
                    })
                }
            }
            Some(w)
        })
        .collect()
}

fn step_pb(s: Step) -> pb::CutoverStep {
    match s {
        Step::PreFreeze => pb::CutoverStep::PreFreeze,
        Step::VerifySource => pb::CutoverStep::VerifySource,
        Step::VerifyTarget => pb::CutoverStep::VerifyTarget,
        Step::Switch => pb::CutoverStep::Switch,
        Step::Rollback => pb::CutoverStep::Rollback,
    }
}

/// The state machine's step run from an agent's report (checked: step, digest, output size).
fn step_run(r: &pb::CutoverStepRequest) -> Result<StepRun, Status> {
    let step = match pb::CutoverStep::try_from(r.step) {
        Ok(pb::CutoverStep::PreFreeze) => Step::PreFreeze,
        Ok(pb::CutoverStep::VerifySource) => Step::VerifySource,
        Ok(pb::CutoverStep::VerifyTarget) => Step::VerifyTarget,
        Ok(pb::CutoverStep::Switch) => Step::Switch,
        Ok(pb::CutoverStep::Rollback) => Step::Rollback,
        _ => {
            return Err(Status::invalid_argument(format!(
                "unknown cutover step {}",
                r.step
            )))
        }
    };
    let tree = match (&r.tree, step) {
        (Some(t), Step::VerifySource | Step::VerifyTarget) => Some(TreeDigest {
            digest: ferry_common::hash::digest_from_slice(&t.digest)
                .ok_or_else(|| Status::invalid_argument("a tree digest must be 32 bytes"))?,
            files: t.files,
            bytes: t.bytes,
            dirs: t.dirs,
            symlinks: t.symlinks,
            error: head(&t.error, MAX_STEP_OUTPUT).to_string(),
            files_read: t.files_read,
            bytes_read: t.bytes_read,
            classes: t
                .class_digests
                .iter()
                .take(CLASSES.len())
                .map(|d| {
                    ferry_common::hash::digest_from_slice(d)
                        .ok_or_else(|| Status::invalid_argument("a class digest must be 32 bytes"))
                })
                .collect::<Result<_, _>>()?,
        }),
        (None, Step::VerifySource | Step::VerifyTarget) => {
            return Err(Status::invalid_argument("a verification reports its tree"))
        }
        _ => None,
    };
    Ok(StepRun {
        step,
        agent: r.agent.clone(),
        command: head(&r.command, MAX_STEP_OUTPUT).to_string(),
        exit_code: r.exit_code,
        output: r.output.clone(),
        started_ms: r.started_ms,
        duration_ms: r.duration_ms,
        recorded_ms: 0,
        tree,
    })
}

/// Most reports (or leases) one `ReportSegments` (or `RenewLeases`) call may carry.
pub const MAX_ITEMS_PER_CALL: usize = 4096;

/// The state machine command for one report (checked: role and digest).
fn report_command(
    r: pb::ReportSegmentRequest,
    session: u64,
    now_ms: u64,
) -> Result<Command, Status> {
    let role = match pb::Role::try_from(r.role) {
        Ok(pb::Role::Source) => Role::Source,
        Ok(pb::Role::Target) => Role::Target,
        _ => return Err(Status::invalid_argument("role must be source or target")),
    };
    let result = if r.ok {
        Ok(ferry_common::hash::digest_from_slice(&r.blake3)
            .ok_or_else(|| Status::invalid_argument("blake3 must be 32 bytes"))?)
    } else {
        Err(r.error)
    };
    let source_hash = match (&role, &result, r.source_blake3.is_empty()) {
        (_, _, true) => None,
        (Role::Target, Ok(_), false) => Some(
            ferry_common::hash::digest_from_slice(&r.source_blake3)
                .ok_or_else(|| Status::invalid_argument("source_blake3 must be 32 bytes"))?,
        ),
        _ => {
            return Err(Status::invalid_argument(
                "source_blake3 is given by a target reporting success only",
            ))
        }
    };
    Ok(Command::ReportSegment {
        agent: r.agent,
        session,
        role,
        migration_id: r.migration_id,
        segment_id: r.segment_id,
        epoch: r.epoch,
        result,
        source_hash,
        retry_later: r.retry_later,
        stale: r.stale,
        permanent: r.permanent,
        now_ms,
    })
}

/// A registered segment, checked: a segment carries at most the migration's segment size in
/// bytes (the planner cuts larger files) and at most a bundle's entries in files.
fn check_segment(
    mid: u64,
    segment_size: Option<u64>,
    s: pb::SegmentInfo,
) -> Result<SegmentReg, Status> {
    let max_files = ferry_common::MAX_BUNDLE_ENTRIES as u64;
    if segment_size.is_some_and(|max| s.bytes > max) || s.files as u64 > max_files {
        return Err(Status::invalid_argument(format!(
            "migration {mid}: segment {} claims {} bytes in {} files, more than a segment holds \
             ({} bytes, {max_files} files); the source agent's manifest is corrupt or the agent \
             is not a ferry agent of this version",
            s.segment_id,
            s.bytes,
            s.files,
            segment_size.unwrap_or(u64::MAX)
        )));
    }
    Ok(SegmentReg {
        id: s.segment_id,
        bytes: s.bytes,
        files: s.files,
        fingerprint: ferry_common::hash::digest_from_slice(&s.fingerprint)
            .ok_or_else(|| Status::invalid_argument("fingerprint must be 32 bytes"))?,
        piece_index: s.piece_index,
        piece_count: s.piece_count,
    })
}

/// How stale an agent's committed `last_seen` may get before a heartbeat writes it again: well
/// within [`crate::state::SESSION_TIMEOUT_MS`], so a running agent's session stays live.
pub const LAST_SEEN_EVERY_MS: u64 = 10_000;

/// Serves [`AgentControl`].
pub struct AgentService(pub Arc<Core>);

type R<T> = Result<GrpcResponse<T>, Status>;

fn expect_ok(r: Response) -> Result<(), Status> {
    match r {
        Response::Ok => Ok(()),
        other => Err(refused(other)),
    }
}

impl AgentService {
    /// Fails unless `session` is `agent`'s current session, as this node knows it. Calls that
    /// change leases are checked again by the state machine; this answers the others, and a
    /// stale process early.
    fn check_session(&self, agent: &str, session: u64) -> Result<(), Status> {
        self.0.read_local(|s| match s.agents.get(agent) {
            None => Err(Status::failed_precondition(format!(
                "agent {agent} is not registered; register first"
            ))),
            Some(a) => a
                .session_error(session)
                .map_or(Ok(()), |why| Err(Status::failed_precondition(why))),
        })
    }
}

/// The longest a heartbeat is held while its answer does not change.
const MAX_HEARTBEAT_WAIT_MS: u64 = 5000;
/// The least time between two looks at a held heartbeat's answer: a busy cluster applies
/// entries all the time (leases, reports), and each look walks the migrations, so a held
/// heartbeat costs at most as much as polling at this interval would.
const HEARTBEAT_RECHECK: Duration = Duration::from_millis(250);

impl AgentService {
    /// Segments a source registers, checked: at most [`MAX_ITEMS_PER_CALL`], each plausible.
    /// The state machine refuses totals that overflow whatever arrives; this refuses implausible
    /// segments early, with the segment named. A node that does not know the migration yet (a
    /// lagging follower) leaves the size check to the state machine.
    fn checked_segments(
        &self,
        mid: u64,
        segments: Vec<pb::SegmentInfo>,
    ) -> Result<Vec<SegmentReg>, Status> {
        if segments.len() > MAX_ITEMS_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "{} segments in one call; send at most {MAX_ITEMS_PER_CALL}",
                segments.len()
            )));
        }
        let segment_size = self
            .0
            .read_local(|s| s.migrations.get(&mid).map(|m| m.spec.segment_size));
        segments
            .into_iter()
            .map(|s| check_segment(mid, segment_size, s))
            .collect()
    }

    /// What a heartbeat of `agent`'s `session` answers now (with its digest), and whether the
    /// agent's `last_seen` is stale. A local read: a lagging follower tells the agent about new
    /// work a moment later, and a `last_seen` it believes stale costs one extra commit (a
    /// linearizable read per heartbeat, a quorum round each, was most of a loaded cluster's
    /// traffic).
    fn heartbeat_answer(
        &self,
        agent: &str,
        session: u64,
    ) -> Result<(pb::HeartbeatResponse, bool), Status> {
        let now = now_ms();
        let ca_pem = &self.0.ca_pem;
        self.0.read_local(|s| {
            let a = s.agents.get(agent);
            if let Some(why) = a.and_then(|a| a.session_error(session)) {
                return Err(Status::failed_precondition(why));
            }
            let stale = a.is_none_or(|a| now.saturating_sub(a.last_seen_ms) >= LAST_SEEN_EVERY_MS);
            let mut answer = pb::HeartbeatResponse {
                source_work: s
                    .sourced_by(agent)
                    .map(|m| pb::SourceWork {
                        migration_id: m.id,
                        source_path: m.spec.source_path.clone(),
                        segment_size: m.spec.segment_size,
                        scan_complete: m.scan_complete,
                        finished: m.phase.finished(),
                        migration_uuid: m.uuid.clone(),
                        xattrs: m.spec.xattrs,
                        excludes: m.spec.excludes.clone(),
                        throttle: m.throttle.clone(),
                        round: m.round().number,
                        round_first_segment: m.round().first_segment,
                        previous_round_first_segment: m
                            .previous_round()
                            .unwrap_or(m.round())
                            .first_segment,
                        keep_deleted: m.spec.keep_deleted,
                        max_delete: m.spec.max_delete,
                        previous_round_done: m
                            .previous_round()
                            .is_some_and(|r| r.outcome == crate::state::Phase::Done),
                        baseline_uuid: if m.round().number == 0 {
                            m.spec.baseline.clone()
                        } else {
                            String::new()
                        },
                        target_is_store: s
                            .agents
                            .get(&m.spec.target_agent)
                            .is_some_and(|a| a.writes_to_store()),
                    })
                    .collect(),
                cutover_work: cutover_work(s, agent),
                jobs: job_work(s, agent, now),
                forget: a.map(|a| a.forget.clone()).unwrap_or_default(),
                conflict: a.map(|a| a.conflict.clone()).unwrap_or_default(),
                cluster_id: s.cluster_id.clone(),
                agent_throttle: a.map(|a| a.throttle.clone()).unwrap_or_default(),
                revoked: s
                    .pki
                    .revoked
                    .iter()
                    .map(|(agent, r)| pb::Revocation {
                        agent: agent.clone(),
                        at: r.at_s,
                    })
                    .collect(),
                ca_pem: ca_pem.clone(),
                digest: Vec::new(),
            };
            answer.digest = blake3::hash(&prost::Message::encode_to_vec(&answer))
                .as_bytes()
                .to_vec();
            Ok((answer, stale))
        })
    }
}

impl AgentService {
    /// Checks that the caller's certificate is agent `claimed`'s and that it is not revoked
    /// (a revoked agent's connections made before its revocation are cut off here, call by
    /// call; new ones at the handshake).
    fn authorize<T>(&self, req: &Request<T>, claimed: &str) -> Result<(), Status> {
        authorize_agent(req, claimed)?;
        if self.0.read_local(|s| s.pki.revoked.contains_key(claimed)) {
            let cert = req.peer_certs().and_then(|c| c.first().cloned());
            let info = cert.and_then(|c| ferry_common::pki::CertInfo::from_der(&c).ok());
            let revoked = info.is_none_or(|i| {
                self.0
                    .read_local(|s| s.pki.is_revoked(claimed, i.not_before))
            });
            if revoked {
                return Err(Status::permission_denied(format!(
                    "agent {claimed}'s certificate is revoked; join again with a new token \
                     (`ferryctl token create`, `ferry-agent join`)"
                )));
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl AgentControl for AgentService {
    async fn renew_certificate(
        &self,
        req: Request<pb::RenewCertificateRequest>,
    ) -> R<pb::CertificateResponse> {
        self.authorize(&req, &req.get_ref().agent)?;
        let current = req
            .peer_certs()
            .and_then(|c| c.first().cloned())
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let r = req.into_inner();
        super::enrol::renew(&self.0, &r.agent, &current, &r.csr_der)
            .await
            .map(GrpcResponse::new)
    }

    async fn register(&self, req: Request<pb::RegisterRequest>) -> R<pb::RegisterResponse> {
        self.authorize(&req, &req.get_ref().agent)?;
        let r = req.into_inner();
        if !r.data_addr.is_empty() && r.data_addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(Status::invalid_argument(format!(
                "data address {:?} is not host:port",
                r.data_addr
            )));
        }
        if r.session == 0 {
            return Err(Status::invalid_argument(
                "registration without a session; upgrade the agent to this coordinator's version",
            ));
        }
        if !r.congestion.is_empty() {
            if let Err(e) = r.congestion.parse::<ferry_common::transport::Congestion>() {
                return Err(Status::invalid_argument(e.to_string()));
            }
        }
        let resp = self
            .0
            .write(Command::RegisterAgent {
                target_root: r.target_root.clone(),
                name: r.agent.clone(),
                data_addr: r.data_addr,
                session: r.session,
                previous: r.previous_session,
                new_cluster_id: ferry_common::ids::random_id(),
                applies_owners: r.applies_owners,
                congestion: r.congestion,
                window_bytes: r.window_bytes,
                now_ms: now_ms(),
            })
            .await?;
        if let Response::Conflict(why) = resp {
            tracing::warn!(
                message = "Refused a second process registering as a running agent.",
                agent = %r.agent,
                session = %format!("{:016x}", r.session),
                reason = %why
            );
            return Err(Status::already_exists(why));
        }
        let Response::Registered(cluster_id) = resp else {
            expect_ok(resp)?;
            return Err(Status::internal(
                "registration answered without a cluster id",
            ));
        };
        Ok(GrpcResponse::new(pb::RegisterResponse { cluster_id }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> R<pb::HeartbeatResponse> {
        self.authorize(&req, &req.get_ref().agent)?;
        let pb::HeartbeatRequest {
            agent,
            session,
            wait_ms,
            known,
        } = req.into_inner();
        let wait = Duration::from_millis(u64::from(wait_ms).min(MAX_HEARTBEAT_WAIT_MS));
        let deadline = tokio::time::Instant::now() + wait;
        // Any applied entry may change the answer: wait for one, then look again. (The metrics
        // change for other reasons too, many times a second: only a new applied index counts.)
        let mut metrics = self.0.raft.metrics();
        let applied_index = |m: &tokio::sync::watch::Receiver<crate::raft_types::Metrics>| {
            m.borrow().last_applied.map(|l| l.index)
        };
        let mut committed_last_seen = false;
        // When the last look after a wake-up was.
        let mut woken: Option<tokio::time::Instant> = None;
        let work_changes = || self.0.read_local(|s| s.work_changes.0);
        loop {
            // Taken before the look: a change applied from here on is looked at again.
            let looked_at = work_changes();
            let (answer, stale) = self.heartbeat_answer(&agent, session)?;
            // Agents call every second or so; `last_seen` is committed only when stale, so
            // heartbeats cost reads, not log entries.
            if stale && !committed_last_seen {
                let resp = self
                    .0
                    .write(Command::Heartbeat {
                        name: agent.clone(),
                        session,
                        now_ms: now_ms(),
                    })
                    .await?;
                expect_ok(resp)?;
                committed_last_seen = true;
            }
            if answer.digest != known || tokio::time::Instant::now() >= deadline {
                return Ok(GrpcResponse::new(answer));
            }
            let seen = applied_index(&metrics);
            let next_entry = async {
                while applied_index(&metrics) == seen {
                    if metrics.changed().await.is_err() {
                        return false;
                    }
                }
                true
            };
            tokio::select! {
                alive = next_entry => if !alive {
                    return Ok(GrpcResponse::new(answer));
                },
                _ = tokio::time::sleep_until(deadline) => {}
            }
            // The first change is looked at at once (a new migration starts without delay),
            // and so is any that may change what agents are asked to do (a sync round, a
            // cutover step); the data path's entries at most every HEARTBEAT_RECHECK.
            if let Some(at) = woken {
                let until = (at + HEARTBEAT_RECHECK).min(deadline);
                while work_changes() == looked_at {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => break,
                        changed = metrics.changed() => if changed.is_err() { break },
                    }
                }
            }
            woken = Some(tokio::time::Instant::now());
        }
    }

    async fn register_segments(
        &self,
        req: Request<pb::RegisterSegmentsRequest>,
    ) -> R<pb::RegisterSegmentsResponse> {
        self.authorize(&req, &req.get_ref().agent)?;
        let r = req.into_inner();
        self.check_session(&r.agent, r.session)?;
        let segments = self.checked_segments(r.migration_id, r.segments)?;
        let resp = self
            .0
            .write(Command::RegisterSegments {
                agent: r.agent,
                migration_id: r.migration_id,
                segments,
            })
            .await?;
        expect_ok(resp)?;
        Ok(GrpcResponse::new(pb::RegisterSegmentsResponse {}))
    }

    async fn complete_scan(
        &self,
        req: Request<pb::CompleteScanRequest>,
    ) -> R<pb::CompleteScanResponse> {
        self.authorize(&req, &req.get_ref().agent)?;
        let r = req.into_inner();
        self.check_session(&r.agent, r.session)?;
        let segments = self.checked_segments(r.migration_id, r.segments)?;
        let complete = Command::CompleteScan {
            agent: r.agent.clone(),
            migration_id: r.migration_id,
            segments_total: r.segments_total,
            issues: r.issues.into_iter().map(|i| (i.path, i.reason)).collect(),
            issues_total: r.issues_total,
            hardlinks: r.hardlinks,
            excluded: r.excluded,
            root_error: r.root_error,
            deleted: r.deleted,
            now_ms: now_ms(),
        };
        // The last segments, the completion and the first leases in one entry, in this order.
        let mut cmds = Vec::with_capacity(3);
        if !segments.is_empty() {
            cmds.push(Command::RegisterSegments {
                agent: r.agent.clone(),
                migration_id: r.migration_id,
                segments,
            });
        }
        cmds.push(complete);
        if r.lease_max > 0 {
            cmds.push(Command::LeaseSegments {
                agent: r.agent,
                session: r.session,
                max: r.lease_max,
                now_ms: now_ms(),
                ttl_ms: self.0.lease_ttl_ms,
            });
        }
        let mut leases = Vec::new();
        for resp in self.0.write_many(cmds).await? {
            match resp {
                Response::Leases(granted) => leases.extend(
                    granted
                        .into_iter()
                        .map(|l| lease_pb(l, self.0.lease_ttl_ms)),
                ),
                other => expect_ok(other)?,
            }
        }
        Ok(GrpcResponse::new(pb::CompleteScanResponse { leases }))
    }

    async fn lease_segments(
        &self,
        req: Request<pb::LeaseSegmentsRequest>,
    ) -> R<pb::LeaseSegmentsResponse> {
        self.authorize(&req, &req.get_ref().agent)?;
        let r = req.into_inner();
        self.check_session(&r.agent, r.session)?;
        let now = now_ms();
        // Most polls find nothing to lease: answer those from a local read instead of a log
        // entry. If this node lags, the agent polls again; the lease itself is a command.
        if !self.0.read_local(|s| s.has_leasable(&r.agent, now)) {
            return Ok(GrpcResponse::new(pb::LeaseSegmentsResponse {
                leases: Vec::new(),
            }));
        }
        let resp = self
            .0
            .write(Command::LeaseSegments {
                agent: r.agent,
                session: r.session,
                max: r.max,
                now_ms: now,
                ttl_ms: self.0.lease_ttl_ms,
            })
            .await?;
        let Response::Leases(leases) = resp else {
            return Err(refused(resp));
        };
        Ok(GrpcResponse::new(pb::LeaseSegmentsResponse {
            leases: leases
                .into_iter()
                .map(|l| lease_pb(l, self.0.lease_ttl_ms))
                .collect(),
        }))
    }

    async fn list_leases(
        &self,
        req: Request<pb::ListLeasesRequest>,
    ) -> R<pb::LeaseSegmentsResponse> {
        self.authorize(&req, &req.get_ref().agent)?;
        let pb::ListLeasesRequest { agent, session } = req.into_inner();
        let now = now_ms();
        // Decided on the linearizable read: a process that is not the current one must never
        // adopt (and send) the leases of the one that is.
        let leases = self
            .0
            .read(
                |s| match s.agents.get(&agent).map(|a| a.session_error(session)) {
                    Some(None) => Ok(s.leases_of(&agent, now)),
                    Some(Some(why)) => Err(Status::failed_precondition(why)),
                    None => Err(Status::failed_precondition(format!(
                        "agent {agent} is not registered; register first"
                    ))),
                },
            )
            .await??;
        Ok(GrpcResponse::new(pb::LeaseSegmentsResponse {
            leases: leases
                .into_iter()
                .map(|l| lease_pb(l, self.0.lease_ttl_ms))
                .collect(),
        }))
    }

    async fn check_lease(&self, req: Request<pb::CheckLeaseRequest>) -> R<pb::CheckLeaseResponse> {
        self.authorize(&req, &req.get_ref().agent)?;
        let r = req.into_inner();
        let now = now_ms();
        if let Some(why) = self
            .0
            .read(|s| {
                s.agents
                    .get(&r.agent)
                    .and_then(|a| a.session_error(r.session))
            })
            .await?
        {
            return Err(Status::failed_precondition(why));
        }
        let out = self
            .0
            .read(
                |s| match s.check_lease(&r.agent, r.migration_id, r.segment_id, r.epoch, now) {
                    Ok(m) => pb::CheckLeaseResponse {
                        ok: true,
                        reason: String::new(),
                        target_path: m.spec.target_path.clone(),
                        source_agent: m.spec.source_agent.clone(),
                        migration_uuid: m.uuid.clone(),
                        attempts: s
                            .segments
                            .get(&(r.migration_id, r.segment_id))
                            .map_or(0, |seg| seg.attempts),
                    },
                    Err(refusal) => pb::CheckLeaseResponse {
                        ok: false,
                        reason: refusal.to_string(),
                        ..Default::default()
                    },
                },
            )
            .await?;
        Ok(GrpcResponse::new(out))
    }

    async fn report_source_problem(
        &self,
        req: Request<pb::SourceProblemRequest>,
    ) -> R<pb::SourceProblemResponse> {
        self.authorize(&req, &req.get_ref().agent)?;
        let r = req.into_inner();
        self.check_session(&r.agent, r.session)?;
        let resp = self
            .0
            .write(Command::SourceProblem {
                agent: r.agent,
                migration_id: r.migration_id,
                error: r.error,
                issues: r.issues.into_iter().map(|i| (i.path, i.reason)).collect(),
            })
            .await?;
        expect_ok(resp)?;
        Ok(GrpcResponse::new(pb::SourceProblemResponse {}))
    }

    async fn renew_leases(
        &self,
        req: Request<pb::RenewLeasesRequest>,
    ) -> R<pb::RenewLeasesResponse> {
        self.authorize(&req, &req.get_ref().agent)?;
        let r = req.into_inner();
        if r.leases.len() > MAX_ITEMS_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "{} leases in one call; send at most {MAX_ITEMS_PER_CALL}",
                r.leases.len()
            )));
        }
        let n = r.leases.len();
        let resp = self
            .0
            .write(Command::RenewLeases {
                agent: r.agent,
                session: r.session,
                leases: r
                    .leases
                    .into_iter()
                    .map(|l| (l.migration_id, l.segment_id, l.epoch))
                    .collect(),
                now_ms: now_ms(),
                ttl_ms: self.0.lease_ttl_ms,
            })
            .await?;
        match resp {
            Response::Renewed(renewed) if renewed.len() == n => {
                Ok(GrpcResponse::new(pb::RenewLeasesResponse { renewed }))
            }
            other => Err(refused(other)),
        }
    }

    async fn report_segments(
        &self,
        req: Request<pb::ReportSegmentsRequest>,
    ) -> R<pb::ReportSegmentsResponse> {
        self.authorize(&req, &req.get_ref().agent)?;
        let r = req.into_inner();
        if r.reports.len() > MAX_ITEMS_PER_CALL {
            return Err(Status::invalid_argument(format!(
                "{} reports in one call; send at most {MAX_ITEMS_PER_CALL}",
                r.reports.len()
            )));
        }
        let now = now_ms();
        let mut results: Vec<Option<pb::ReportSegmentResponse>> = Vec::new();
        let mut cmds = Vec::new();
        for mut one in r.reports {
            if one.agent.is_empty() {
                one.agent = r.agent.clone();
            }
            let checked = if one.agent == r.agent {
                report_command(one, r.session, now)
            } else {
                Err(Status::permission_denied(format!(
                    "a report of agent {} inside a call of agent {}",
                    one.agent, r.agent
                )))
            };
            match checked {
                Ok(cmd) => {
                    cmds.push(cmd);
                    results.push(None);
                }
                Err(s) => results.push(Some(pb::ReportSegmentResponse {
                    outcome: pb::ReportOutcome::Refused.into(),
                    reason: s.message().to_string(),
                })),
            }
        }
        let mut answers = self.0.write_many(cmds).await?.into_iter();
        let results = results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    use pb::ReportOutcome as O;
                    let (outcome, reason) = match answers.next() {
                        Some(Response::Report(o, why)) => (super::convert::outcome(o), why),
                        Some(Response::NotCommitted(why)) => (O::Unavailable, why),
                        Some(Response::Refused(why)) => (O::Refused, why),
                        other => (O::Refused, format!("unexpected answer {other:?}")),
                    };
                    pb::ReportSegmentResponse {
                        outcome: outcome.into(),
                        reason,
                    }
                })
            })
            .collect();
        Ok(GrpcResponse::new(pb::ReportSegmentsResponse { results }))
    }

    async fn list_unverified(
        &self,
        req: Request<pb::ListUnverifiedRequest>,
    ) -> R<pb::ListUnverifiedResponse> {
        self.authorize(&req, &req.get_ref().agent)?;
        let r = req.into_inner();
        self.check_session(&r.agent, r.session)?;
        let ids = self
            .0
            .read(|s| match s.migrations.get(&r.migration_id) {
                Some(m) if m.spec.source_agent == r.agent => {
                    Ok(s.unverified(r.migration_id, r.from, r.to))
                }
                _ => Err(Status::not_found(format!(
                    "agent {} is the source of no migration {}",
                    r.agent, r.migration_id
                ))),
            })
            .await??;
        Ok(GrpcResponse::new(pb::ListUnverifiedResponse {
            segment_ids: ids,
        }))
    }

    async fn report_cutover_step(
        &self,
        req: Request<pb::CutoverStepRequest>,
    ) -> R<pb::CutoverStepResponse> {
        self.authorize(&req, &req.get_ref().agent)?;
        let r = req.into_inner();
        let run = step_run(&r)?;
        let cmd = if r.verification != 0 {
            Command::VerificationStep {
                agent: r.agent.clone(),
                session: r.session,
                migration_id: r.migration_id,
                number: r.verification,
                run,
                now_ms: now_ms(),
            }
        } else {
            Command::CutoverStep {
                agent: r.agent.clone(),
                session: r.session,
                migration_id: r.migration_id,
                attempt: r.attempt,
                run,
                now_ms: now_ms(),
            }
        };
        let resp = self.0.write(cmd).await?;
        expect_ok(resp)?;
        // A cutover's phase moved (or the step was taken again): committed, not answered.
        ferry_common::fault_point!("cutover::step_after_commit");
        tracing::info!(
            message = "Cutover step reported.",
            agent = %r.agent,
            migration = r.migration_id,
            attempt = r.attempt,
            verification = r.verification,
            step = r.step,
            exit_code = r.exit_code
        );
        Ok(GrpcResponse::new(pb::CutoverStepResponse {}))
    }

    async fn report_job(&self, req: Request<pb::JobReport>) -> R<pb::JobReportResponse> {
        self.authorize(&req, &req.get_ref().agent)?;
        let r = req.into_inner();
        let update = match (r.done, r.error.is_empty()) {
            (false, _) => JobUpdate::Progress(r.progress),
            (true, true) => JobUpdate::Done(r.result),
            (true, false) => JobUpdate::Failed(r.error.clone()),
        };
        let resp = self
            .0
            .write(Command::ReportJob {
                agent: r.agent.clone(),
                session: r.session,
                id: r.id,
                update,
                now_ms: now_ms(),
            })
            .await?;
        expect_ok(resp)?;
        if r.done {
            tracing::info!(message = "Job ended.", agent = %r.agent, job = r.id, error = %r.error);
        }
        Ok(GrpcResponse::new(pb::JobReportResponse {}))
    }

    async fn end_session(&self, req: Request<pb::EndSessionRequest>) -> R<pb::EndSessionResponse> {
        self.authorize(&req, &req.get_ref().agent)?;
        let r = req.into_inner();
        let resp = self
            .0
            .write(Command::EndSession {
                name: r.agent.clone(),
                session: r.session,
            })
            .await?;
        expect_ok(resp)?;
        tracing::info!(
            message = "An agent ended its session.",
            agent = %r.agent,
            session = %format!("{:016x}", r.session)
        );
        Ok(GrpcResponse::new(pb::EndSessionResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(role: pb::Role, ok: bool, source_blake3: Vec<u8>) -> pb::ReportSegmentRequest {
        pb::ReportSegmentRequest {
            agent: "a".into(),
            role: role as i32,
            ok,
            blake3: if ok { vec![1; 32] } else { Vec::new() },
            source_blake3,
            ..Default::default()
        }
    }

    /// Only a target reporting success may carry the source's hash, and only a whole one.
    #[test]
    fn the_sources_hash_comes_only_with_a_targets_good_report() {
        let cmd = report_command(request(pb::Role::Target, true, vec![1; 32]), 1, 0).unwrap();
        let Command::ReportSegment { source_hash, .. } = cmd else {
            panic!("{cmd:?}")
        };
        assert_eq!(source_hash, Some([1; 32]));
        let plain = report_command(request(pb::Role::Target, true, Vec::new()), 1, 0).unwrap();
        assert!(matches!(
            plain,
            Command::ReportSegment {
                source_hash: None,
                ..
            }
        ));
        for bad in [
            request(pb::Role::Source, true, vec![1; 32]),
            request(pb::Role::Target, false, vec![1; 32]),
            request(pb::Role::Target, true, vec![1; 31]),
        ] {
            let e = report_command(bad, 1, 0).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
        }
    }
}
