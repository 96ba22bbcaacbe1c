//! The commands Raft commits, and how each is applied.

use super::*;

/// A state change, as proposed to Raft. Times are the leader's clock when it proposed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// An agent process announces itself (or its new data address) and starts its session.
    /// Refused while another session of the same agent is live, unless it names that session as
    /// its `previous` one: a restarted process that holds the agent's state directory lock
    /// knows its predecessor ended.
    RegisterAgent {
        /// Name from its certificate.
        name: String,
        /// Its QUIC endpoint.
        data_addr: String,
        /// The process's session (non-zero).
        session: u64,
        /// The session of the process that ran before it from the same state directory (0:
        /// none known).
        previous: u64,
        /// A fresh random id, which becomes the cluster's id if it has none yet (the first
        /// registration names the cluster; later ones leave the id as it is).
        new_cluster_id: String,
        /// Whether, as a target, it applies files' owners (it runs as root).
        applies_owners: bool,
        /// Its data connections' congestion controller.
        congestion: String,
        /// The bytes one of its data connections may have in flight.
        window_bytes: u64,
        /// The directory it writes below as a target (empty: none).
        target_root: String,
        /// Leader time.
        now_ms: u64,
    },
    /// An operator sets what a migration's source, or an agent as a source, may send per
    /// second ([`ferry_common::throttle`] text; empty or `off`: no limit).
    SetThrottle {
        /// What it limits.
        scope: ThrottleScope,
        /// The throttle.
        throttle: String,
    },
    /// An agent is alive.
    Heartbeat {
        /// Name.
        name: String,
        /// Its session.
        session: u64,
        /// Leader time.
        now_ms: u64,
    },
    /// An agent process stops (clean shutdown): its session ends, so a new process may take
    /// the identity at once, and no segment is sent to it meanwhile.
    EndSession {
        /// Name.
        name: String,
        /// The session that ends.
        session: u64,
    },
    /// An operator creates a migration.
    CreateMigration {
        /// Its name (unique).
        name: String,
        /// The client's key for this request (empty: none). The same key again answers the
        /// migration it created: a retried request whose first answer was lost does not make
        /// a duplicate.
        idempotency_key: String,
        /// What to move.
        spec: MigrationSpec,
        /// A fresh random id for the migration: agents key their local state by cluster id and
        /// this, which no later migration or cluster can reuse (ids restart at 1 in a new
        /// cluster).
        uuid: String,
        /// Its throttle from the start ([`ferry_common::throttle`] text; empty: none), in force
        /// before its source sends a byte.
        throttle: String,
        /// Leader time.
        now_ms: u64,
    },
    /// A source registers segments it planned (idempotent per segment id).
    RegisterSegments {
        /// The source agent.
        agent: String,
        /// Migration.
        migration_id: u64,
        /// The segments.
        segments: Vec<SegmentReg>,
    },
    /// A source finished scanning.
    CompleteScan {
        /// The source agent.
        agent: String,
        /// Migration.
        migration_id: u64,
        /// How many segments the scan produced.
        segments_total: u64,
        /// Paths it could not copy.
        issues: Vec<(String, String)>,
        /// All issues, including those not listed.
        issues_total: u64,
        /// Names the scan found to be further names of a file it carries (hardlinks).
        hardlinks: u64,
        /// Paths the scan skipped because they match the spec's excludes.
        excluded: u64,
        /// Why the source root itself cannot be scanned (empty: it was scanned). The
        /// migration then fails with it.
        root_error: String,
        /// Names the round deletes at the target.
        deleted: u64,
        /// Leader time.
        now_ms: u64,
    },
    /// A source asks for up to `max` segments to send.
    LeaseSegments {
        /// The source agent.
        agent: String,
        /// Its session.
        session: u64,
        /// Most segments wanted.
        max: u32,
        /// Leader time.
        now_ms: u64,
        /// Lease duration.
        ttl_ms: u64,
    },
    /// An operator starts a cutover of a migration whose last round is done.
    StartCutover {
        /// Migration.
        migration_id: u64,
        /// Leader time.
        now_ms: u64,
    },
    /// An operator aborts a running cutover: the source rolls back.
    AbortCutover {
        /// Migration.
        migration_id: u64,
    },
    /// An agent reports a step of a cutover (a hook it ran, or its tree's digest).
    CutoverStep {
        /// The reporting agent.
        agent: String,
        /// Its session.
        session: u64,
        /// Migration.
        migration_id: u64,
        /// The cutover attempt.
        attempt: u32,
        /// What it did.
        run: StepRun,
        /// Leader time.
        now_ms: u64,
    },
    /// An operator opens the fallback window of a migration that was cut over: a migration in
    /// reverse, from the target's copy to the old source.
    StartFallback {
        /// The migration that was cut over.
        migration_id: u64,
        /// A fresh uuid for the reverse migration.
        uuid: String,
        /// Leader time.
        now_ms: u64,
    },
    /// An operator closes the fallback window of a migration that was cut over.
    Finalize {
        /// The migration that was cut over.
        migration_id: u64,
        /// Leader time.
        now_ms: u64,
    },
    /// An operator asks for a full verification of a migration whose last round is done.
    StartVerification {
        /// Migration.
        migration_id: u64,
        /// Leader time.
        now_ms: u64,
    },
    /// An agent reports its pass of a full verification (its tree's digest).
    VerificationStep {
        /// The reporting agent.
        agent: String,
        /// Its session.
        session: u64,
        /// Migration.
        migration_id: u64,
        /// The verification's number.
        number: u32,
        /// What it did.
        run: StepRun,
        /// Leader time.
        now_ms: u64,
    },
    /// An operator's call, applied and recorded in the audit log with its outcome, in one
    /// entry: no change is visible before its record.
    Audited {
        /// Who called what.
        note: AuditNote,
        /// The change.
        cmd: Box<Command>,
    },
    /// A record of an operator's call that changes nothing here (refused for its role, or a
    /// membership change whose own entries follow).
    Audit {
        /// Who called what.
        note: AuditNote,
        /// What became of it.
        decision: String,
    },
    /// An operator deletes a migration: it is gone from the state with its segments, its name
    /// is free again, and its agents are told to remove what they keep of it (a target aborts
    /// its unfinished uploads). Refused during a cutover, and while it runs unless `force`.
    DeleteMigration {
        /// Migration.
        migration_id: u64,
        /// Also while its source is sending or a verification runs.
        force: bool,
    },
    /// An operator asks for a sync round of a migration whose current round has ended.
    StartRound {
        /// Migration.
        migration_id: u64,
        /// Leader time.
        now_ms: u64,
    },
    /// A source reports a problem the operator must see: an error that stops it from working on
    /// the migration, and/or paths it could not copy after the scan (e.g. deleted meanwhile).
    SourceProblem {
        /// The source agent.
        agent: String,
        /// Migration.
        migration_id: u64,
        /// The error (empty if only issues are reported).
        error: String,
        /// Paths not copied, with the reason.
        issues: Vec<(String, String)>,
    },
    /// One end reports the outcome of a transfer.
    ReportSegment {
        /// Reporting agent.
        agent: String,
        /// Its session.
        session: u64,
        /// Which end it is.
        role: Role,
        /// Migration.
        migration_id: u64,
        /// Segment.
        segment_id: u64,
        /// The lease's fencing token.
        epoch: u64,
        /// The hash, or the error.
        result: Result<Digest, String>,
        /// A target's successful report only: the hash the source sent with the bytes, which
        /// the target found equal to its own. Recorded as the source's hash, so the segment
        /// is verified without waiting for the source's report.
        source_hash: Option<Digest>,
        /// With an error: the failure is not the segment's (the source shut down, the target
        /// could not be reached, a hardlink waits for its first name). The segment is retried
        /// after a backoff without counting an attempt.
        retry_later: bool,
        /// With an error: retrying cannot help (the target refuses the segment for what it
        /// holds): it is given up on at once.
        permanent: bool,
        /// With an error from the source: a file of the segment changed after the scan so that
        /// the segment can never be sent as planned; the next round sends the file.
        stale: bool,
        /// Leader time.
        now_ms: u64,
    },
    /// A source extends leases it is still sending (each `(migration, segment, epoch)`), to
    /// `now_ms + ttl_ms`. A lease that is no longer current is left alone.
    RenewLeases {
        /// The source agent.
        agent: String,
        /// Its session.
        session: u64,
        /// The leases.
        leases: Vec<(u64, u64, u64)>,
        /// Leader time.
        now_ms: u64,
        /// Lease duration.
        ttl_ms: u64,
    },
    /// Several commands committed as one entry (group commit), applied in order. Each gets its
    /// own response; one refused command does not affect the others.
    Batch(Vec<Command>),
    /// An operator starts a job on an agent (an assessment, a probe).
    StartJob {
        /// The agent that runs it.
        agent: String,
        /// What it does.
        kind: JobKind,
        /// Leader time.
        now_ms: u64,
    },
    /// An admin makes a join token.
    CreateJoinToken {
        /// Its id.
        id: String,
        /// The digest of its secret.
        digest: Digest,
        /// `agent`.
        role: String,
        /// The only agent name it allows (empty: any not in use).
        name: String,
        /// How long it is valid.
        ttl_ms: u64,
        /// The admin.
        by: String,
        /// Leader time.
        now_ms: u64,
    },
    /// An agent joins with a token; the certificate a node signed for it is recorded (and
    /// given to it only once this is applied).
    UseJoinToken {
        /// The token's id.
        id: String,
        /// The digest of the secret the agent sent.
        digest: Digest,
        /// The agent's name.
        agent: String,
        /// Its address.
        from: String,
        /// The certificate signed for it.
        cert: IssuedCert,
        /// Leader time.
        now_ms: u64,
    },
    /// A node signed a renewed certificate for an agent.
    RecordCert {
        /// The agent.
        agent: String,
        /// When the certificate it renewed with became valid (unix seconds).
        previous_not_before_s: i64,
        /// The new certificate.
        cert: IssuedCert,
        /// Leader time.
        now_ms: u64,
    },
    /// A node signed an operator's certificate (a new operator, or a renewal) or a coordinator
    /// node's (a renewal).
    RecordIssuedCert {
        /// The certificate.
        cert: IssuedCert,
        /// Leader time.
        now_ms: u64,
    },
    /// An admin revokes an agent.
    RevokeAgent {
        /// The agent.
        agent: String,
        /// The admin.
        by: String,
        /// Leader time.
        now_ms: u64,
    },
    /// An agent reports on a job it runs.
    ReportJob {
        /// The agent.
        agent: String,
        /// Its session.
        session: u64,
        /// The job.
        id: u64,
        /// Progress, result or failure.
        update: JobUpdate,
        /// Leader time.
        now_ms: u64,
    },
    /// An operator adds a target agent to a migration's pool ([`super::pool`]), or makes a
    /// removed one active again.
    AddTarget {
        /// Migration.
        migration_id: u64,
        /// The target agent.
        agent: String,
    },
    /// An operator takes a target agent out of a migration's pool: no new files go to it.
    RemoveTarget {
        /// Migration.
        migration_id: u64,
        /// The target agent.
        agent: String,
    },
}

/// What a [`Command::SetThrottle`] limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ThrottleScope {
    /// One migration (by id).
    Migration(u64),
    /// Everything an agent sends as a source.
    Agent(String),
}

impl Command {
    /// Roughly how much work and log space the command takes (for sizing batches).
    pub fn weight(&self) -> usize {
        match self {
            Command::RegisterSegments { segments, .. } => 1 + segments.len(),
            Command::RenewLeases { leases, .. } => 1 + leases.len(),
            Command::CompleteScan { issues, .. } | Command::SourceProblem { issues, .. } => {
                1 + issues.len()
            }
            Command::Batch(cmds) => cmds.iter().map(Command::weight).sum(),
            _ => 1,
        }
    }
}

impl State {
    /// Applies the command committed at log index `index` (a batch: each of its commands, in
    /// order).
    pub fn apply(&mut self, index: u64, cmd: Command) -> Response {
        match cmd {
            Command::Batch(cmds) if cmds.len() > MAX_BATCH_COMMANDS => refused(format!(
                "a batch of {} commands is over the limit of {MAX_BATCH_COMMANDS}",
                cmds.len()
            )),
            Command::Batch(cmds) => Response::Batch(
                cmds.into_iter()
                    .enumerate()
                    .map(|(pos, c)| match c {
                        Command::Batch(_) => refused("batches do not nest"),
                        c => self.apply_one(fencing_token(index, pos), c),
                    })
                    .collect(),
            ),
            c => self.apply_one(fencing_token(index, 0), c),
        }
    }

    /// Applies one command; `token` is the fencing token of any lease it grants.
    pub(super) fn apply_one(&mut self, token: u64, cmd: Command) -> Response {
        if !matches!(
            cmd,
            Command::LeaseSegments { .. }
                | Command::RenewLeases { .. }
                | Command::ReportSegment { .. }
                | Command::Heartbeat { .. }
                | Command::RegisterSegments { .. }
        ) {
            self.work_changes.0 += 1;
        }
        match cmd {
            Command::Batch(_) => refused("batches do not nest"),
            Command::CreateJoinToken {
                id,
                digest,
                role,
                name,
                ttl_ms,
                by,
                now_ms,
            } => self.create_token(id, digest, role, name, ttl_ms, by, now_ms),
            Command::UseJoinToken {
                id,
                digest,
                agent,
                from,
                cert,
                now_ms,
            } => self.use_token(&id, digest, &agent, from, cert, now_ms),
            Command::RecordCert {
                agent,
                previous_not_before_s,
                cert,
                now_ms,
            } => self.record_cert(&agent, previous_not_before_s, cert, now_ms),
            Command::RevokeAgent { agent, by, now_ms } => self.revoke_agent(&agent, by, now_ms),
            Command::RecordIssuedCert { cert, now_ms } => self.record_issued_cert(cert, now_ms),
            Command::StartJob {
                agent,
                kind,
                now_ms,
            } => self.start_job(&agent, kind, now_ms),
            Command::ReportJob {
                agent,
                session,
                id,
                update,
                now_ms,
            } => match self.check_session(&agent, session) {
                Err(r) => r,
                Ok(()) => self.report_job(&agent, id, update, now_ms),
            },
            Command::RegisterAgent {
                name,
                data_addr,
                session,
                previous,
                new_cluster_id,
                applies_owners,
                congestion,
                window_bytes,
                target_root,
                now_ms,
            } => {
                if self.cluster_id.is_empty() && !new_cluster_id.is_empty() {
                    self.cluster_id = new_cluster_id;
                    self.dirty.cluster = true;
                }
                match self.register_agent(name.clone(), data_addr, session, previous, now_ms) {
                    Response::Ok => {
                        if let Some(a) = self.agents.get_mut(&name) {
                            a.applies_owners = applies_owners;
                            a.congestion = congestion;
                            a.window_bytes = window_bytes;
                            a.target_root = target_root;
                        }
                        Response::Registered(self.cluster_id.clone())
                    }
                    other => other,
                }
            }
            Command::Heartbeat {
                name,
                session,
                now_ms,
            } => match self.agents.get_mut(&name) {
                Some(a) => match a.session_error(session) {
                    Some(why) => refused(why),
                    None => {
                        a.last_seen_ms = a.last_seen_ms.max(now_ms);
                        self.dirty.agents.insert(name);
                        Response::Ok
                    }
                },
                None => refused(format!("agent {name} is not registered; register first")),
            },
            Command::SetThrottle { scope, throttle } => self.set_throttle(scope, &throttle),
            Command::AddTarget {
                migration_id,
                agent,
            } => self.add_target(migration_id, &agent),
            Command::RemoveTarget {
                migration_id,
                agent,
            } => self.remove_target(migration_id, &agent),
            Command::StartRound {
                migration_id,
                now_ms,
            } => self.start_round(migration_id, now_ms),
            Command::StartCutover {
                migration_id,
                now_ms,
            } => self.start_cutover(migration_id, now_ms),
            Command::AbortCutover { migration_id } => self.abort_cutover(migration_id),
            Command::CutoverStep {
                agent,
                session,
                migration_id,
                attempt,
                run,
                now_ms,
            } => match self.check_session(&agent, session) {
                Err(r) => r,
                Ok(()) => self.cutover_step(&agent, migration_id, attempt, run, now_ms),
            },
            Command::StartVerification {
                migration_id,
                now_ms,
            } => self.start_verification(migration_id, now_ms),
            Command::StartFallback {
                migration_id,
                uuid,
                now_ms,
            } => self.start_fallback(migration_id, uuid, now_ms),
            Command::Finalize {
                migration_id,
                now_ms,
            } => self.finalize(migration_id, now_ms),
            Command::DeleteMigration {
                migration_id,
                force,
            } => self.delete_migration(migration_id, force),
            Command::Audited { note, cmd } => self.audited(token, note, *cmd),
            Command::Audit { note, decision } => {
                self.audit(note, decision);
                Response::Ok
            }
            Command::VerificationStep {
                agent,
                session,
                migration_id,
                number,
                run,
                now_ms,
            } => match self.check_session(&agent, session) {
                Err(r) => r,
                Ok(()) => self.verification_step(&agent, migration_id, number, run, now_ms),
            },
            Command::EndSession { name, session } => match self.agents.get_mut(&name) {
                // Ending a session that is not current changes nothing (a repeated request).
                Some(a) if a.session == session && session != 0 => {
                    a.session = 0;
                    self.dirty.agents.insert(name);
                    Response::Ok
                }
                _ => Response::Ok,
            },
            Command::CreateMigration {
                name,
                idempotency_key,
                spec,
                uuid,
                throttle,
                now_ms,
            } => self.create_migration(name, idempotency_key, spec, uuid, &throttle, now_ms),
            Command::RegisterSegments {
                agent,
                migration_id,
                segments,
            } => self.register_segments(&agent, migration_id, segments),
            Command::CompleteScan {
                agent,
                migration_id,
                segments_total,
                issues,
                issues_total,
                hardlinks,
                excluded,
                root_error,
                deleted,
                now_ms,
            } => self.complete_scan(
                &agent,
                migration_id,
                ScanEnd {
                    total: segments_total,
                    issues,
                    issues_total,
                    hardlinks,
                    excluded,
                    root_error,
                    deleted,
                },
                now_ms,
            ),
            Command::SourceProblem {
                agent,
                migration_id,
                error,
                issues,
            } => match self.source_migration(&agent, migration_id) {
                Err(r) => r,
                Ok(m) => {
                    if !error.is_empty() {
                        m.last_error = error;
                    }
                    // A resent segment may report the same path again: count each path once.
                    for issue in issues {
                        if m.scan_issues.iter().any(|(p, _)| *p == issue.0) {
                            continue;
                        }
                        m.scan_issues_total = m.scan_issues_total.saturating_add(1);
                        if m.scan_issues.len() < MAX_SCAN_ISSUES_KEPT {
                            m.scan_issues.push(issue);
                        }
                    }
                    // Left behind after it finished (a file vanished from its last segment):
                    // not done after all.
                    if m.phase == Phase::Done && m.scan_issues_total > 0 {
                        m.phase = Phase::Failed;
                        m.round_mut().outcome = Phase::Failed;
                    }
                    self.dirty.migrations.insert(migration_id);
                    Response::Ok
                }
            },
            Command::LeaseSegments {
                agent,
                session,
                max,
                now_ms,
                ttl_ms,
            } => match self.check_session(&agent, session) {
                Err(r) => r,
                Ok(()) => Response::Leases(self.lease(token, &agent, max, now_ms, ttl_ms)),
            },
            Command::RenewLeases {
                agent,
                session,
                leases,
                now_ms,
                ttl_ms,
            } => match self.check_session(&agent, session) {
                Err(r) => r,
                Ok(()) => Response::Renewed(
                    leases
                        .into_iter()
                        .map(|(m, s, e)| self.renew(&agent, m, s, e, now_ms, ttl_ms))
                        .collect(),
                ),
            },
            Command::ReportSegment {
                agent,
                session,
                role,
                migration_id,
                segment_id,
                epoch,
                result,
                source_hash,
                retry_later,
                stale,
                permanent,
                now_ms,
            } => {
                if let Err(r) = self.check_session(&agent, session) {
                    return r;
                }
                let failure = match (retry_later, stale && role == Role::Source) {
                    (_, true) => Cost::Stale,
                    (true, false) => Cost::Nothing,
                    (false, false) if permanent => Cost::Final,
                    (false, false) => Cost::Attempt,
                };
                let (o, why) = self.report(
                    &agent,
                    role,
                    migration_id,
                    segment_id,
                    epoch,
                    result,
                    source_hash,
                    failure,
                    now_ms,
                );
                Response::Report(o, why)
            }
        }
    }
}
