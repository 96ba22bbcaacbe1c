//! The admin service (ferryctl).

use std::sync::Arc;

use ferry_proto::admin::{self as pb, admin_server::Admin};
use tonic::{Request, Response as GrpcResponse, Status};

use super::{authorize_role, convert, now_ms, refused, Core, Proposal};
use crate::state::{
    AuditNote, Command, JobKind, MigrationSpec, Response, SegState, ThrottleScope,
    DEFAULT_MAX_ATTEMPTS, MAX_MAX_ATTEMPTS,
};
use ferry_common::names::Role;
use ferry_common::throttle::{Throttle, ThrottleError};

/// Serves [`Admin`].
pub struct AdminService(pub Arc<Core>);

type R<T> = Result<GrpcResponse<T>, Status>;

/// How long a joining node may take to catch up when the request does not say: enough for a
/// snapshot of a few GiB on a LAN, short enough that an operator's typo is answered soon.
pub const DEFAULT_CATCH_UP_SECS: u32 = 60;
/// The longest catch-up a request may ask for.
pub const MAX_CATCH_UP_SECS: u32 = 24 * 3600;

/// The smallest segment a migration into an object store may have (a store's smallest upload
/// part, as the agent's object sink checks it).
const STORE_MIN_SEGMENT: u64 = 5 * 1024 * 1024;

fn validate_spec(s: pb::MigrationSpec) -> Result<MigrationSpec, Status> {
    let bad = |m: String| Err(Status::invalid_argument(m));
    for (what, name) in [
        ("source agent", &s.source_agent),
        ("target agent", &s.target_agent),
    ] {
        if let Err(e) = ferry_common::names::validate_name(name) {
            return bad(format!("{what}: {e}"));
        }
    }
    let store_source = ["s3://", "s3a://", "gs://", "az://", "abfs://", "abfss://"]
        .iter()
        .any(|p| s.source_path.starts_with(p));
    if !s.source_path.starts_with('/') && !store_source {
        return bad(format!(
            "source path {:?} must be absolute (a directory on the source agent) or an object \
             store's URL (s3://bucket/prefix, gs://…, az://…)",
            s.source_path
        ));
    }
    if store_source && s.sync_every_secs > 0 {
        return bad(format!(
            "source {} is an object store: sync rounds from a store are not supported yet, so \
             --sync-every cannot be set (its bulk copy is)",
            s.source_path
        ));
    }
    if let Err(e) = ferry_common::path::validate_subdir(&s.target_path) {
        return bad(format!("target path: {e}"));
    }
    if let Err(e) = ferry_common::exclude::Excludes::new(&s.excludes) {
        return bad(e.to_string());
    }
    const MIN_SEGMENT: u64 = 64 * 1024;
    const MAX_SEGMENT: u64 = 4 * 1024 * 1024 * 1024;
    if s.segment_size != 0 && !(MIN_SEGMENT..=MAX_SEGMENT).contains(&s.segment_size) {
        return bad(format!(
            "segment size {} is out of range: use {MIN_SEGMENT} bytes to 4 GiB (0 = 64 MiB)",
            s.segment_size
        ));
    }
    const MAX_SYNC_EVERY_SECS: u64 = 7 * 24 * 3600;
    if s.sync_every_secs > MAX_SYNC_EVERY_SECS {
        return bad(format!(
            "sync every {} s is over the limit of {MAX_SYNC_EVERY_SECS} s (7 days)",
            s.sync_every_secs
        ));
    }
    if s.auto_cutover_below_ms > MAX_SYNC_EVERY_SECS * 1000 {
        return bad(format!(
            "auto cutover below {} ms is over the limit of 7 days",
            s.auto_cutover_below_ms
        ));
    }
    if s.max_attempts > MAX_MAX_ATTEMPTS {
        return bad(format!(
            "max attempts {} is over the limit of {MAX_MAX_ATTEMPTS} (0 = {DEFAULT_MAX_ATTEMPTS})",
            s.max_attempts
        ));
    }
    Ok(MigrationSpec {
        source_agent: s.source_agent,
        source_path: s.source_path,
        target_agent: s.target_agent,
        target_path: s.target_path,
        segment_size: if s.segment_size == 0 {
            ferry_common::DEFAULT_SEGMENT_SIZE
        } else {
            s.segment_size
        },
        xattrs: s.xattrs,
        excludes: s.excludes,
        max_attempts: if s.max_attempts == 0 {
            DEFAULT_MAX_ATTEMPTS
        } else {
            s.max_attempts
        },
        keep_deleted: s.keep_deleted,
        max_delete: s.max_delete,
        sync_every_ms: s.sync_every_secs.saturating_mul(1000),
        auto_cutover_below_ms: s.auto_cutover_below_ms,
        // Set only by a fallback, never by a client.
        baseline: String::new(),
        fallback_of: 0,
    })
}

/// Failed segments `MigrationStatus` lists with their errors (the counts are always complete).
pub const FAILED_LISTED: usize = 20;

/// Longest migration name and idempotency key.
pub const MAX_NAME_LEN: usize = 128;

/// A migration name: what `ferryctl` accepts wherever it takes NAME or an id.
fn validate_migration_name(name: &str) -> Result<(), Status> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !ok_chars
        || !first_ok
        || name.chars().all(|c| c.is_ascii_digit())
    {
        return Err(Status::invalid_argument(format!(
            "migration name {name:?} is not valid: use 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 . _ -, \
             starting with a letter or digit, not all digits"
        )));
    }
    Ok(())
}

fn validate_idempotency_key(key: &str) -> Result<(), Status> {
    if key.len() > MAX_NAME_LEN || !key.chars().all(|c| c.is_ascii_graphic()) {
        return Err(Status::invalid_argument(format!(
            "idempotency key {key:?} is not valid: use up to {MAX_NAME_LEN} printable ASCII \
             characters"
        )));
    }
    Ok(())
}

impl AdminService {
    /// The migration a request names: by `name` when it gives one, else by `id`.
    async fn id_or_name(&self, id: u64, name: &str) -> Result<u64, Status> {
        if name.is_empty() {
            Ok(id)
        } else {
            self.migration_id(name).await
        }
    }

    /// The id of the migration `name_or_id` names (names are never all digits).
    async fn migration_id(&self, name_or_id: &str) -> Result<u64, Status> {
        if let Ok(id) = name_or_id.parse::<u64>() {
            return Ok(id);
        }
        let name = name_or_id.to_string();
        self.0
            .read(move |s| s.migration_named(&name))
            .await?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no migration is named {name_or_id} (ferryctl migration list shows them)"
                ))
            })
    }
}

/// An operator allowed to make a call, and what its audit records say of it.
struct Caller {
    note: AuditNote,
}

impl Caller {
    /// `cmd`, to be applied and recorded with its outcome in one entry.
    fn audited(&self, cmd: Command) -> Command {
        let what = format!("{cmd:?}");
        self.audited_as(cmd, what)
    }

    /// [`Caller::audited`], the record saying `what` instead of the command itself.
    fn audited_as(&self, cmd: Command, what: String) -> Command {
        let note = AuditNote {
            at_ms: now_ms(),
            what: ferry_common::text::head(&what, 512).to_string(),
            ..self.note.clone()
        };
        Command::Audited {
            note,
            cmd: Box::new(cmd),
        }
    }
}

impl AdminService {
    /// Checks that the caller's role allows what `need` allows; a refusal of an operator's
    /// certificate is recorded in the audit log.
    async fn authorized<T>(
        &self,
        req: &Request<T>,
        need: Role,
        call: &str,
    ) -> Result<Caller, Status> {
        let cert = req.peer_certs().and_then(|c| c.first().cloned());
        let note = AuditNote {
            at_ms: now_ms(),
            who: cert
                .as_ref()
                .and_then(ferry_common::tls::operator_name)
                .unwrap_or_default(),
            role: String::new(),
            from: req.remote_addr().map(|a| a.to_string()).unwrap_or_default(),
            call: call.to_string(),
            what: String::new(),
        };
        match authorize_role(req, need) {
            Ok(role) => Ok(Caller {
                note: AuditNote {
                    role: role.to_string(),
                    ..note
                },
            }),
            Err(status) => {
                let role = cert.as_ref().and_then(ferry_common::tls::role_of);
                let recorded = role.is_some()
                    && self
                        .0
                        .denials
                        .admit(note.who.clone(), std::time::Instant::now())
                        .is_ok();
                if !recorded && role.is_some() {
                    tracing::warn!(
                        target: "ferry_audit",
                        who = %note.who,
                        from = %note.from,
                        call = %note.call,
                        "A call refused for its role, not recorded: this operator's refusals are \
                         recorded at most {} a minute.",
                        crate::grpc::DENIALS_RECORDED_PER_WINDOW
                    );
                }
                if let Some(role) = role.filter(|_| recorded) {
                    let denied = Command::Audit {
                        note: AuditNote {
                            role: role.to_string(),
                            what: format!("needs the {need} role"),
                            ..note
                        },
                        decision: format!("denied: {}", status.message()),
                    };
                    if let Err(e) = self.0.write(denied).await {
                        tracing::warn!(message = "Cannot record a refused call in the audit log.", error = %e);
                    }
                }
                Err(status)
            }
        }
    }

    /// Records the outcome of a call recorded as `requested` before, and returns it. Best
    /// effort: a membership change may leave no leader to take the record at once.
    async fn outcome<T>(&self, caller: &Caller, what: String, result: R<T>) -> R<T> {
        let decision = match &result {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("failed: {}", e.message()),
        };
        if let Err(e) = self.record(caller, what, &decision).await {
            tracing::warn!(message = "Cannot record a call's outcome in the audit log.", error = %e);
        }
        result
    }

    /// Records `what` the caller asked for and `decision` (a call whose changes are not
    /// commands: membership, leadership, snapshots).
    async fn record(&self, caller: &Caller, what: String, decision: &str) -> Result<(), Status> {
        let cmd = Command::Audit {
            note: AuditNote {
                at_ms: now_ms(),
                what: ferry_common::text::head(&what, 512).to_string(),
                ..caller.note.clone()
            },
            decision: decision.to_string(),
        };
        self.0.write(cmd).await.map(|_| ())
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn audit(&self, req: Request<pb::AuditRequest>) -> R<pb::AuditResponse> {
        authorize_role(&req, Role::Admin)?;
        let r = req.into_inner();
        let limit = match r.limit {
            0 => 1000,
            n => (n as usize).min(10_000),
        };
        let resp = self
            .0
            .read(move |s| {
                let mut records = s
                    .audit
                    .range(r.after_seq.saturating_add(1)..)
                    .map(|(_, a)| pb::AuditRecordInfo {
                        seq: a.seq,
                        at_ms: a.note.at_ms,
                        who: a.note.who.clone(),
                        role: a.note.role.clone(),
                        from: a.note.from.clone(),
                        call: a.note.call.clone(),
                        what: a.note.what.clone(),
                        decision: a.decision.clone(),
                        prev: a.prev.to_vec(),
                        hash: a.hash.to_vec(),
                    });
                let page: Vec<_> = records.by_ref().take(limit).collect();
                pb::AuditResponse {
                    more: records.next().is_some(),
                    records: page,
                }
            })
            .await?;
        Ok(GrpcResponse::new(resp))
    }

    async fn add_node(&self, req: Request<pb::AddNodeRequest>) -> R<pb::AddNodeResponse> {
        let caller = self.authorized(&req, Role::Admin, "AddNode").await?;
        let what = format!("{:?}", req.get_ref());
        self.record(&caller, what.clone(), "requested").await?;
        let result: R<_> = async move {
            let r = req.into_inner();
            if r.node_id == 0 {
                return Err(Status::invalid_argument("node ids start at 1"));
            }
            if r.addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(Status::invalid_argument(format!(
                    "node address {:?} is not host:port",
                    r.addr
                )));
            }
            let secs = match r.catch_up_timeout_secs {
                0 => DEFAULT_CATCH_UP_SECS,
                s if s > MAX_CATCH_UP_SECS => {
                    return Err(Status::invalid_argument(format!(
                        "catch-up timeout {s}s is over the limit of {MAX_CATCH_UP_SECS}s"
                    )))
                }
                s => s,
            };
            match self
                .0
                .propose(Proposal::AddNode {
                    node_id: r.node_id,
                    addr: r.addr,
                    catch_up_ms: u64::from(secs) * 1000,
                })
                .await?
            {
                Response::Ok => Ok(GrpcResponse::new(pb::AddNodeResponse {})),
                other => Err(refused(other)),
            }
        }
        .await;
        self.outcome(&caller, what, result).await
    }

    async fn remove_node(&self, req: Request<pb::RemoveNodeRequest>) -> R<pb::RemoveNodeResponse> {
        let caller = self.authorized(&req, Role::Admin, "RemoveNode").await?;
        let what = format!("{:?}", req.get_ref());
        self.record(&caller, what.clone(), "requested").await?;
        let result: R<_> = async move {
            let node_id = req.into_inner().node_id;
            match self.0.propose(Proposal::RemoveNode { node_id }).await? {
                Response::Ok => Ok(GrpcResponse::new(pb::RemoveNodeResponse {})),
                other => Err(refused(other)),
            }
        }
        .await;
        self.outcome(&caller, what, result).await
    }

    async fn snapshot(&self, req: Request<pb::SnapshotRequest>) -> R<pb::SnapshotResponse> {
        let caller = self.authorized(&req, Role::Admin, "Snapshot").await?;
        let what = format!("{:?}", req.get_ref());
        self.record(&caller, what.clone(), "requested").await?;
        let result: R<_> = async move {
            let raft = &self.0.raft;
            let want = raft.metrics().borrow().last_applied.map(|l| l.index);
            let started = std::time::Instant::now();
            raft.trigger()
                .snapshot()
                .await
                .map_err(|e| Status::unavailable(format!("cannot build a snapshot: {e}")))?;
            let m = raft
                .wait(Some(std::time::Duration::from_secs(600)))
                .metrics(
                    |m| m.snapshot.map(|l| l.index) >= want,
                    "snapshot covers what was applied",
                )
                .await
                .map_err(|e| Status::unavailable(format!("snapshot did not complete: {e}")))?;
            Ok(GrpcResponse::new(pb::SnapshotResponse {
                node_id: self.0.node_id,
                snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
                build_millis: started.elapsed().as_millis() as u64,
            }))
        }
        .await;
        self.outcome(&caller, what, result).await
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> R<pb::TransferLeaderResponse> {
        let caller = self.authorized(&req, Role::Admin, "TransferLeader").await?;
        let what = format!("{:?}", req.get_ref());
        self.record(&caller, what.clone(), "requested").await?;
        let result: R<_> = async move {
            let to = req.into_inner().node_id;
            self.0.transfer_leader(to).await?;
            Ok(GrpcResponse::new(pb::TransferLeaderResponse {
                leader_id: to,
            }))
        }
        .await;
        self.outcome(&caller, what, result).await
    }

    async fn cluster_status(
        &self,
        req: Request<pb::ClusterStatusRequest>,
    ) -> R<pb::ClusterStatusResponse> {
        authorize_role(&req, Role::Viewer)?;
        let m = self.0.raft.metrics().borrow().clone();
        let members = m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, node)| {
                let matched = m.replication.as_ref().and_then(|r| r.get(id));
                pb::ClusterMember {
                    node_id: *id,
                    addr: node.addr.clone(),
                    voter: m
                        .membership_config
                        .membership()
                        .voter_ids()
                        .any(|v| v == *id),
                    matched_known: matched.is_some(),
                    matched_index: matched.copied().flatten().map(|l| l.index).unwrap_or(0),
                }
            })
            .collect();
        Ok(GrpcResponse::new(pb::ClusterStatusResponse {
            node_id: self.0.node_id,
            leader_id: m.current_leader.unwrap_or(0),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            last_applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            members,
            state: format!("{:?}", m.state),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
        }))
    }

    async fn set_throttle(
        &self,
        req: Request<pb::SetThrottleRequest>,
    ) -> R<pb::SetThrottleResponse> {
        let caller = self.authorized(&req, Role::Operator, "SetThrottle").await?;
        let r = req.into_inner();
        let throttle: Throttle = r
            .throttle
            .parse()
            .map_err(|e: ThrottleError| Status::invalid_argument(e.to_string()))?;
        let scope = match (r.migration.is_empty(), r.agent.is_empty()) {
            (false, true) => {
                let id = self.migration_id(&r.migration).await?;
                ThrottleScope::Migration(id)
            }
            (true, false) => ThrottleScope::Agent(r.agent),
            _ => {
                return Err(Status::invalid_argument(
                    "name either a migration or an agent to throttle",
                ))
            }
        };
        match self
            .0
            .write(caller.audited(Command::SetThrottle {
                scope,
                throttle: throttle.to_string(),
            }))
            .await?
        {
            Response::Ok => Ok(GrpcResponse::new(pb::SetThrottleResponse {
                throttle: throttle.to_string(),
            })),
            other => Err(refused(other)),
        }
    }

    async fn set_migration_target(
        &self,
        req: Request<pb::SetMigrationTargetRequest>,
    ) -> R<pb::SetMigrationTargetResponse> {
        let caller = self
            .authorized(&req, Role::Operator, "SetMigrationTarget")
            .await?;
        let r = req.into_inner();
        if r.agent.is_empty() {
            return Err(Status::invalid_argument("name the target agent"));
        }
        let id = self.migration_id(&r.migration).await?;
        let cmd = if r.active {
            Command::AddTarget {
                migration_id: id,
                agent: r.agent.clone(),
            }
        } else {
            Command::RemoveTarget {
                migration_id: id,
                agent: r.agent.clone(),
            }
        };
        match self.0.write(caller.audited(cmd)).await? {
            Response::Ok => {
                tracing::info!(
                    message = "Target pool changed.",
                    migration = id,
                    agent = %r.agent,
                    active = r.active
                );
                let targets = self
                    .0
                    .read(|s| s.migrations.get(&id).map(convert::members))
                    .await?
                    .unwrap_or_default();
                Ok(GrpcResponse::new(pb::SetMigrationTargetResponse {
                    targets,
                }))
            }
            other => Err(refused(other)),
        }
    }

    async fn sync_migration(
        &self,
        req: Request<pb::SyncMigrationRequest>,
    ) -> R<pb::SyncMigrationResponse> {
        let caller = self
            .authorized(&req, Role::Operator, "SyncMigration")
            .await?;
        let r = req.into_inner();
        let id = self.id_or_name(r.migration_id, &r.name).await?;
        match self
            .0
            .write(caller.audited(Command::StartRound {
                migration_id: id,
                now_ms: now_ms(),
            }))
            .await?
        {
            Response::Ok => {
                let round = self
                    .0
                    .read(|s| s.migrations.get(&id).map(|m| m.round().number))
                    .await?
                    .unwrap_or_default();
                tracing::info!(message = "Sync round started.", migration = id, round);
                Ok(GrpcResponse::new(pb::SyncMigrationResponse { round }))
            }
            other => Err(refused(other)),
        }
    }

    async fn cutover(&self, req: Request<pb::CutoverRequest>) -> R<pb::CutoverResponse> {
        let caller = self.authorized(&req, Role::Operator, "Cutover").await?;
        let r = req.into_inner();
        let id = self.id_or_name(r.migration_id, &r.name).await?;
        if r.dry_run && !r.abort {
            let checked = self
                .0
                .read(move |s| match s.migrations.get(&id) {
                    Some(m) => crate::state::next_cutover_attempt(m),
                    None => Err(format!("migration {id} does not exist")),
                })
                .await?;
            return match checked {
                Ok(attempt) => Ok(GrpcResponse::new(pb::CutoverResponse { attempt })),
                Err(why) => Err(Status::failed_precondition(why)),
            };
        }
        let cmd = if r.abort {
            Command::AbortCutover { migration_id: id }
        } else {
            Command::StartCutover {
                migration_id: id,
                now_ms: now_ms(),
            }
        };
        match self.0.write(caller.audited(cmd)).await? {
            Response::Ok => {
                let attempt = self
                    .0
                    .read(|s| {
                        s.migrations
                            .get(&id)
                            .and_then(|m| m.cutover.as_ref())
                            .map(|c| c.attempt)
                    })
                    .await?
                    .unwrap_or_default();
                tracing::info!(
                    message = if r.abort {
                        "Cutover aborted."
                    } else {
                        "Cutover started."
                    },
                    migration = id,
                    attempt
                );
                Ok(GrpcResponse::new(pb::CutoverResponse { attempt }))
            }
            other => Err(refused(other)),
        }
    }

    async fn verify_full(&self, req: Request<pb::VerifyFullRequest>) -> R<pb::VerifyFullResponse> {
        let caller = self.authorized(&req, Role::Operator, "VerifyFull").await?;
        let r = req.into_inner();
        let id = self.id_or_name(r.migration_id, &r.name).await?;
        let cmd = Command::StartVerification {
            migration_id: id,
            now_ms: now_ms(),
        };
        match self.0.write(caller.audited(cmd)).await? {
            Response::Ok => {
                let (number, round) = self
                    .0
                    .read(|s| {
                        s.migrations
                            .get(&id)
                            .and_then(|m| m.verification.as_ref())
                            .map(|v| (v.number, v.round))
                    })
                    .await?
                    .unwrap_or_default();
                tracing::info!(
                    message = "Full verification started.",
                    migration = id,
                    number,
                    round
                );
                Ok(GrpcResponse::new(pb::VerifyFullResponse { number, round }))
            }
            other => Err(refused(other)),
        }
    }

    async fn fallback(&self, req: Request<pb::FallbackRequest>) -> R<pb::FallbackResponse> {
        let caller = self.authorized(&req, Role::Operator, "Fallback").await?;
        let r = req.into_inner();
        let id = self.id_or_name(r.migration_id, &r.name).await?;
        let cmd = Command::StartFallback {
            migration_id: id,
            uuid: ferry_common::ids::random_id(),
            now_ms: now_ms(),
        };
        match self.0.write(caller.audited(cmd)).await? {
            Response::MigrationCreated(rid) => {
                let name = self
                    .0
                    .read(|s| s.migrations.get(&rid).map(|m| m.name.clone()))
                    .await?
                    .unwrap_or_default();
                tracing::info!(
                    message = "Fallback window opened.",
                    migration = id,
                    fallback = rid
                );
                Ok(GrpcResponse::new(pb::FallbackResponse {
                    migration_id: rid,
                    name,
                }))
            }
            other => Err(refused(other)),
        }
    }

    async fn finalize(&self, req: Request<pb::FinalizeRequest>) -> R<pb::FinalizeResponse> {
        let caller = self.authorized(&req, Role::Operator, "Finalize").await?;
        let r = req.into_inner();
        let id = self.id_or_name(r.migration_id, &r.name).await?;
        let cmd = Command::Finalize {
            migration_id: id,
            now_ms: now_ms(),
        };
        match self.0.write(caller.audited(cmd)).await? {
            Response::Ok => {
                tracing::info!(message = "Fallback window closed.", migration = id);
                Ok(GrpcResponse::new(pb::FinalizeResponse {}))
            }
            other => Err(refused(other)),
        }
    }

    async fn delete_migration(
        &self,
        req: Request<pb::DeleteMigrationRequest>,
    ) -> R<pb::DeleteMigrationResponse> {
        let caller = self
            .authorized(&req, Role::Operator, "DeleteMigration")
            .await?;
        let r = req.into_inner();
        let id = self.id_or_name(r.migration_id, &r.name).await?;
        let cmd = Command::DeleteMigration {
            migration_id: id,
            force: r.force,
        };
        match self.0.write(caller.audited(cmd)).await? {
            Response::Ok => {
                tracing::info!(
                    message = "Migration deleted.",
                    migration = id,
                    force = r.force
                );
                Ok(GrpcResponse::new(pb::DeleteMigrationResponse {}))
            }
            other => Err(refused(other)),
        }
    }

    async fn start_job(&self, req: Request<pb::StartJobRequest>) -> R<pb::JobInfo> {
        let caller = self.authorized(&req, Role::Operator, "StartJob").await?;
        let r = req.into_inner();
        let kind = match (r.assess, r.probe, r.sync_preview) {
            (None, None, Some(p)) => JobKind::SyncPreview {
                migration_id: p.migration_id,
            },
            (Some(a), None, None) => JobKind::Assess {
                paths: a.paths,
                excludes: a.excludes,
            },
            (None, Some(p), None) => {
                let mut congestions = Vec::new();
                for c in &p.congestions {
                    let c: ferry_common::transport::Congestion =
                        c.parse()
                            .map_err(|e: ferry_common::transport::UnknownCongestion| {
                                Status::invalid_argument(e.to_string())
                            })?;
                    if !congestions.contains(&c.to_string()) {
                        congestions.push(c.to_string());
                    }
                }
                JobKind::Probe {
                    peer: p.peer,
                    seconds: p.seconds,
                    streams: p.streams,
                    congestions,
                }
            }
            _ => {
                return Err(Status::invalid_argument(
                    "a job is an assessment, a probe or a sync preview: give one of them",
                ))
            }
        };
        // An agent nobody registered is not found (the state machine refuses the rest).
        let unknown = {
            let named: Vec<String> = std::iter::once(r.agent.clone())
                .chain(match &kind {
                    JobKind::Probe { peer, .. } => Some(peer.clone()),
                    JobKind::Assess { .. } | JobKind::SyncPreview { .. } => None,
                })
                .collect();
            self.0
                .read(move |s| named.into_iter().find(|n| !s.agents.contains_key(n)))
                .await?
        };
        if let Some(name) = unknown {
            return Err(Status::not_found(format!(
                "no agent {name} is registered (`ferryctl agents list` shows those that are)"
            )));
        }
        let resp = self
            .0
            .write(caller.audited(Command::StartJob {
                agent: r.agent,
                kind,
                now_ms: now_ms(),
            }))
            .await?;
        let Response::JobStarted(id) = resp else {
            return Err(refused(resp));
        };
        let now = now_ms();
        let job = self
            .0
            .read(|s| s.jobs.get(&id).map(|j| convert::job(j, now)))
            .await?;
        job.map(GrpcResponse::new)
            .ok_or_else(|| Status::not_found(format!("job {id} is gone already")))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> R<pb::JobInfo> {
        authorize_role(&req, Role::Viewer)?;
        let id = req.get_ref().id;
        let now = now_ms();
        let job = self
            .0
            .read(|s| s.jobs.get(&id).map(|j| convert::job(j, now)))
            .await?;
        job.map(GrpcResponse::new).ok_or_else(|| {
            Status::not_found(format!(
                "no job {id}: the newest {} are kept (`ferryctl jobs` lists them)",
                crate::state::MAX_JOBS_KEPT
            ))
        })
    }

    async fn list_jobs(&self, req: Request<pb::ListJobsRequest>) -> R<pb::ListJobsResponse> {
        authorize_role(&req, Role::Viewer)?;
        let now = now_ms();
        let jobs = self
            .0
            .read(|s| {
                // Without their progress and results (up to 256 KiB each): GetJob has them.
                s.jobs
                    .values()
                    .rev()
                    .map(|j| pb::JobInfo {
                        progress: String::new(),
                        result: String::new(),
                        ..convert::job(j, now)
                    })
                    .collect()
            })
            .await?;
        Ok(GrpcResponse::new(pb::ListJobsResponse { jobs }))
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> R<pb::CreateJoinTokenResponse> {
        let caller = self
            .authorized(&req, Role::Admin, "CreateJoinToken")
            .await?;
        let r = req.into_inner();
        let token = ferry_common::enrol::JoinToken::generate(self.0.ca_pin)
            .map_err(|e| Status::internal(e.to_string()))?;
        let ttl_ms = r.ttl_secs.saturating_mul(1000);
        let now = now_ms();
        let what = format!(
            "join token {} for role {:?}, agent {:?}, valid {} s",
            token.id,
            r.role,
            if r.agent.is_empty() { "any" } else { &r.agent },
            r.ttl_secs
        );
        let cmd = Command::CreateJoinToken {
            id: token.id.clone(),
            digest: ferry_common::enrol::secret_digest(&token.secret),
            role: r.role,
            name: r.agent,
            ttl_ms,
            by: caller.note.who.clone(),
            now_ms: now,
        };
        // The record names the token's id, never its secret nor the digest of it.
        match self.0.write(caller.audited_as(cmd, what)).await? {
            Response::Ok => Ok(GrpcResponse::new(pb::CreateJoinTokenResponse {
                token: token.to_string(),
                id: token.id,
                expires_unix_ms: now.saturating_add(ttl_ms),
            })),
            other => Err(refused(other)),
        }
    }

    async fn list_join_tokens(
        &self,
        req: Request<pb::ListJoinTokensRequest>,
    ) -> R<pb::ListJoinTokensResponse> {
        authorize_role(&req, Role::Admin)?;
        let tokens = self
            .0
            .read(|s| {
                let mut t: Vec<_> = s.pki.tokens.values().cloned().collect();
                t.sort_by_key(|t| std::cmp::Reverse(t.created_ms));
                t
            })
            .await?
            .into_iter()
            .map(|t| {
                let used = t.used.unwrap_or(crate::state::TokenUse {
                    agent: String::new(),
                    at_ms: 0,
                    from: String::new(),
                });
                pb::JoinTokenInfo {
                    id: t.id,
                    role: t.role,
                    agent: t.name,
                    created_by: t.created_by,
                    created_unix_ms: t.created_ms,
                    expires_unix_ms: t.expires_ms,
                    used_by: used.agent,
                    used_unix_ms: used.at_ms,
                    used_from: used.from,
                }
            })
            .collect();
        Ok(GrpcResponse::new(pb::ListJoinTokensResponse { tokens }))
    }

    async fn list_certificates(
        &self,
        req: Request<pb::ListCertificatesRequest>,
    ) -> R<pb::ListCertificatesResponse> {
        authorize_role(&req, Role::Viewer)?;
        let certificates = self
            .0
            .read(|s| {
                let mut c: Vec<_> = s
                    .pki
                    .certs
                    .values()
                    .map(|c| pb::CertificateInfo {
                        serial: c.serial.clone(),
                        identity: c.identity.clone(),
                        not_before: c.not_before_s,
                        not_after: c.not_after_s,
                        via: c.via.clone(),
                        revoked: c
                            .identity
                            .strip_prefix("agent ")
                            .is_some_and(|n| s.pki.is_revoked(n, c.not_before_s)),
                    })
                    .collect();
                c.sort_by(|a, b| (&a.identity, a.not_before).cmp(&(&b.identity, b.not_before)));
                c
            })
            .await?;
        Ok(GrpcResponse::new(pb::ListCertificatesResponse {
            certificates,
        }))
    }

    async fn create_user(&self, req: Request<pb::CreateUserRequest>) -> R<pb::CreateUserResponse> {
        let caller = self.authorized(&req, Role::Admin, "CreateUser").await?;
        let r = req.into_inner();
        ferry_common::names::validate_name(&r.name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let role: Role = r.role.parse().map_err(Status::invalid_argument)?;
        let signer = self.0.signer.clone().ok_or_else(super::enrol::no_signer)?;
        let (pem, info) = signer.sign_user(&r.csr_der, &r.name, role)?;
        let cert = crate::state::IssuedCert {
            serial: info.serial.clone(),
            identity: crate::state::operator_identity(&r.name, role.as_str()),
            not_before_s: info.not_before,
            not_after_s: info.not_after,
            via: format!("created by {}", caller.note.who),
        };
        let what = format!(
            "certificate {} for operator {} with the {role} role",
            info.serial, r.name
        );
        let cmd = Command::RecordIssuedCert {
            cert,
            now_ms: now_ms(),
        };
        match self.0.write(caller.audited_as(cmd, what)).await? {
            Response::Ok => Ok(GrpcResponse::new(pb::CreateUserResponse {
                cert_pem: pem,
                ca_pem: signer.ca_pem().to_string(),
                serial: info.serial,
                not_after: info.not_after,
            })),
            other => Err(refused(other)),
        }
    }

    async fn renew_operator_certificate(
        &self,
        req: Request<pb::RenewOperatorCertificateRequest>,
    ) -> R<pb::CreateUserResponse> {
        let caller = self
            .authorized(&req, Role::Viewer, "RenewOperatorCertificate")
            .await?;
        let current = req
            .peer_certs()
            .and_then(|c| c.first().cloned())
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let name = ferry_common::tls::operator_name(&current).ok_or_else(|| {
            Status::permission_denied("this certificate names no operator: nothing to renew")
        })?;
        // What the certificate allows now, and nothing more (one issued before roles existed
        // had every right, and is renewed with the admin role, said explicitly).
        let role = ferry_common::tls::role_of(&current).unwrap_or(Role::Viewer);
        let old = ferry_common::pki::CertInfo::from_der(&current)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let signer = self.0.signer.clone().ok_or_else(super::enrol::no_signer)?;
        super::enrol::admit_renewal(
            &self.0,
            &crate::state::operator_identity(&name, role.as_str()),
        )?;
        let r = req.into_inner();
        let (pem, info) = signer.sign_user(&r.csr_der, &name, role)?;
        let cert = crate::state::IssuedCert {
            serial: info.serial.clone(),
            identity: crate::state::operator_identity(&name, role.as_str()),
            not_before_s: info.not_before,
            not_after_s: info.not_after,
            via: format!("renewal of {}", old.serial),
        };
        let what = format!(
            "certificate {} for operator {name} with the {role} role, renewing {}",
            info.serial, old.serial
        );
        let cmd = Command::RecordIssuedCert {
            cert,
            now_ms: now_ms(),
        };
        match self.0.write(caller.audited_as(cmd, what)).await? {
            Response::Ok => {
                tracing::info!(message = "Renewed an operator's certificate.", operator = %name, role = %role, serial = %info.serial, previous = %old.serial);
                Ok(GrpcResponse::new(pb::CreateUserResponse {
                    cert_pem: pem,
                    ca_pem: signer.ca_pem().to_string(),
                    serial: info.serial,
                    not_after: info.not_after,
                }))
            }
            other => Err(refused(other)),
        }
    }

    async fn revoke_agent(
        &self,
        req: Request<pb::RevokeAgentRequest>,
    ) -> R<pb::RevokeAgentResponse> {
        let caller = self.authorized(&req, Role::Admin, "RevokeAgent").await?;
        let agent = req.into_inner().agent;
        let cmd = Command::RevokeAgent {
            agent,
            by: caller.note.who.clone(),
            now_ms: now_ms(),
        };
        match self.0.write(caller.audited(cmd)).await? {
            Response::Ok => Ok(GrpcResponse::new(pb::RevokeAgentResponse {})),
            other => Err(refused(other)),
        }
    }

    async fn list_agents(&self, req: Request<pb::ListAgentsRequest>) -> R<pb::ListAgentsResponse> {
        authorize_role(&req, Role::Viewer)?;
        let now = now_ms();
        let agents = self
            .0
            .read(|s| {
                s.agents
                    .values()
                    .map(|a| pb::AgentInfo {
                        name: a.name.clone(),
                        data_addr: a.data_addr.clone(),
                        last_seen_ms: a.last_seen_ms,
                        registered_ms: a.registered_ms,
                        status: if a.session == 0 {
                            "shut down"
                        } else if a.live(now) {
                            "live"
                        } else {
                            "not seen"
                        }
                        .to_string(),
                        cannot_receive: a.undialable().unwrap_or_default(),
                        conflict: a.conflict.clone(),
                        congestion: a.congestion.clone(),
                        window_bytes: a.window_bytes,
                        throttle: convert::off_if_empty(&a.throttle),
                        target_root: a.target_root.clone(),
                    })
                    .collect()
            })
            .await?;
        Ok(GrpcResponse::new(pb::ListAgentsResponse { agents }))
    }

    async fn create_migration(
        &self,
        req: Request<pb::CreateMigrationRequest>,
    ) -> R<pb::CreateMigrationResponse> {
        let caller = self
            .authorized(&req, Role::Operator, "CreateMigration")
            .await?;
        let r = req.into_inner();
        let spec = r
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        let spec = validate_spec(spec)?;
        validate_migration_name(&r.name)?;
        validate_idempotency_key(&r.idempotency_key)?;
        let throttle: Throttle = r
            .throttle
            .parse()
            .map_err(|e: ThrottleError| Status::invalid_argument(e.to_string()))?;
        // A store target uploads a split file's pieces as parts of one upload, and a store
        // takes no part under 5 MiB but the last: refused now, not after every piece failed
        // its attempts.
        let into_store = self
            .0
            .read(|s| {
                s.agents
                    .get(&spec.target_agent)
                    .is_some_and(|a| a.writes_to_store())
            })
            .await?;
        if into_store && spec.segment_size < STORE_MIN_SEGMENT {
            return Err(Status::invalid_argument(format!(
                "target agent {} writes to an object store, which takes no upload part under 5 \
                 MiB: a segment size of {} bytes would cut large files into pieces it refuses; \
                 use --segment-size 8MiB or more",
                spec.target_agent, spec.segment_size
            )));
        }
        if r.dry_run {
            let name = r.name.clone();
            let checked = self
                .0
                .read(move |s| s.check_new_migration(&name, &spec))
                .await?;
            return match checked {
                Ok(()) => Ok(GrpcResponse::new(pb::CreateMigrationResponse {
                    migration_id: 0,
                })),
                Err(why) => Err(Status::failed_precondition(why)),
            };
        }
        match self
            .0
            .write(caller.audited(Command::CreateMigration {
                name: r.name,
                idempotency_key: r.idempotency_key,
                spec,
                uuid: ferry_common::ids::random_id(),
                throttle: throttle.stored(),
                now_ms: now_ms(),
            }))
            .await?
        {
            Response::MigrationCreated(id) => Ok(GrpcResponse::new(pb::CreateMigrationResponse {
                migration_id: id,
            })),
            other => Err(refused(other)),
        }
    }

    async fn list_migrations(
        &self,
        req: Request<pb::ListMigrationsRequest>,
    ) -> R<pb::ListMigrationsResponse> {
        authorize_role(&req, Role::Viewer)?;
        let now = now_ms();
        let migrations = self
            .0
            .read(|s| {
                s.migrations
                    .values()
                    .map(|m| pb::MigrationProgress {
                        blocked: s.blocker(m.id, now).unwrap_or_default(),
                        ..convert::progress(m)
                    })
                    .collect()
            })
            .await?;
        Ok(GrpcResponse::new(pb::ListMigrationsResponse { migrations }))
    }

    async fn migration_status(
        &self,
        req: Request<pb::MigrationStatusRequest>,
    ) -> R<pb::MigrationStatusResponse> {
        authorize_role(&req, Role::Viewer)?;
        let r = req.into_inner();
        let by_name = !r.name.is_empty();
        let now = now_ms();
        let progress = self
            .0
            .read(|s| {
                let id = if by_name {
                    s.migration_named(&r.name)?
                } else {
                    r.migration_id
                };
                s.migrations.get(&id).map(|m| {
                    let mut p = convert::progress(m);
                    p.blocked = s.blocker(id, now).unwrap_or_default();
                    p.notes = s.notes(id);
                    // Earlier rounds' failures were sent again by the rounds after them.
                    let first = m.round().first_segment;
                    for ((_, sid), seg) in s.segments.range((id, first)..=(id, u64::MAX)) {
                        match seg.state {
                            SegState::Leased { .. } => {
                                p.segments_leased += 1;
                                if let Some(t) = p.targets.get_mut(seg.target as usize) {
                                    t.segments_leased += 1;
                                }
                            }
                            SegState::Failed if p.failed.len() < FAILED_LISTED => {
                                p.failed.push(convert::segment(m, sid, seg))
                            }
                            _ => {}
                        }
                    }
                    p
                })
            })
            .await?
            .ok_or_else(|| {
                Status::not_found(if by_name {
                    format!(
                        "no migration is named {} (ferryctl migration list shows them)",
                        r.name
                    )
                } else {
                    format!("migration {} does not exist", r.migration_id)
                })
            })?;
        Ok(GrpcResponse::new(pb::MigrationStatusResponse {
            progress: Some(progress),
        }))
    }

    async fn verify_migration(
        &self,
        req: Request<pb::VerifyMigrationRequest>,
    ) -> R<pb::VerifyMigrationResponse> {
        authorize_role(&req, Role::Viewer)?;
        let r = req.into_inner();
        let id = r.migration_id;
        let resp = self
            .0
            .read(move |s| verification(s, &r, VERIFY_PAGE))
            .await?
            .ok_or_else(|| Status::not_found(format!("migration {id} does not exist")))?;
        Ok(GrpcResponse::new(resp))
    }
}

/// The most unverified segments, and the most segments of an audit page, one verification
/// answer lists: it stays a few MB whatever the migration's size.
const VERIFY_PAGE: usize = 10_000;

/// The answer to `VerifyMigration` for `r`, listing at most `page` segments (None: no such
/// migration).
fn verification(
    s: &crate::state::State,
    r: &pb::VerifyMigrationRequest,
    page: usize,
) -> Option<pb::VerifyMigrationResponse> {
    let id = r.migration_id;
    let max = match r.max_listed {
        0 => 100,
        n => (n as usize).min(page),
    };
    let m = s.migrations.get(&id)?;
    let mut out = pb::VerifyMigrationResponse {
        migration_id: id,
        segments_total: m.counters.segments,
        ..Default::default()
    };
    // A segment of an earlier round that was not verified (failed, or stale because
    // its file changed) was superseded: the round after it sent its files again.
    let first = m.round().first_segment;
    let superseded =
        |sid: u64, seg: &crate::state::Segment| sid < first && seg.state != SegState::Verified;
    // Failed segments first: they are what the operator must act on.
    let segs = || {
        s.segments
            .range((id, 0)..=(id, u64::MAX))
            .filter(|((_, sid), seg)| !superseded(*sid, seg))
    };
    out.segments_total -= s
        .segments
        .range((id, 0)..(id, first))
        .filter(|((_, sid), seg)| superseded(*sid, seg))
        .count() as u64;
    for ((_, sid), seg) in segs() {
        if seg.state == SegState::Failed {
            out.segments_failed += 1;
            if out.unverified.len() < max {
                out.unverified.push(convert::segment(m, sid, seg));
            }
        }
    }
    for ((_, sid), seg) in segs() {
        match seg.state {
            SegState::Verified => {
                out.segments_verified += 1;
                if seg.source_hash().is_none() || seg.source_hash() != seg.target_hash() {
                    out.hash_mismatches += 1;
                }
            }
            SegState::Failed => {}
            _ if out.unverified.len() < max => {
                out.unverified.push(convert::segment(m, sid, seg));
            }
            _ => {}
        }
        if r.max_listed == u32::MAX && sid >= r.segments_from {
            if out.segments.len() < page {
                out.segments.push(convert::segment(m, sid, seg));
            } else {
                out.segments_more = true;
            }
        }
    }
    // Nothing skipped either: a tree whose only entry was a FIFO, or a source root
    // that does not exist, is not a verified copy of anything.
    out.scan_issues_total = m.scan_issues_total;
    out.scan_issues = convert::progress(m).scan_issues;
    out.all_verified = m.scan_complete
        && out.hash_mismatches == 0
        && out.segments_failed == 0
        && out.segments_verified == out.segments_total
        && m.scan_issues_total == 0;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, Response, SegmentReg, State};

    #[test]
    fn a_verification_answer_lists_segments_a_page_at_a_time() {
        let mut s = State::default();
        let mut index = 0;
        let mut apply = |s: &mut State, c| {
            index += 1;
            s.apply(index, c)
        };
        for name in ["src", "dst"] {
            apply(
                &mut s,
                Command::RegisterAgent {
                    name: name.into(),
                    data_addr: "127.0.0.1:9".into(),
                    session: 1,
                    previous: 0,
                    new_cluster_id: "c".into(),
                    applies_owners: false,
                    congestion: "bbr".into(),
                    window_bytes: 1 << 20,
                    target_root: "/t".into(),
                    now_ms: 1,
                },
            );
        }
        let spec = crate::state::MigrationSpec::for_tests("/d", 100);
        let created = apply(
            &mut s,
            Command::CreateMigration {
                name: "m".into(),
                idempotency_key: String::new(),
                spec,
                uuid: "u1".into(),
                throttle: String::new(),
                now_ms: 2,
            },
        );
        assert_eq!(created, Response::MigrationCreated(1));
        let segments = (0..25)
            .map(|id| SegmentReg {
                id,
                bytes: 10,
                files: 1,
                fingerprint: [1; 32],
                piece_index: 0,
                piece_count: 0,
            })
            .collect();
        apply(
            &mut s,
            Command::RegisterSegments {
                agent: "src".into(),
                migration_id: 1,
                segments,
            },
        );
        let ask = |max_listed, segments_from| pb::VerifyMigrationRequest {
            migration_id: 1,
            max_listed,
            segments_from,
        };
        // Unverified segments are capped at the page, whatever is asked.
        let v = verification(&s, &ask(u32::MAX - 1, 0), 10).unwrap();
        assert_eq!(v.unverified.len(), 10);
        assert!(v.segments.is_empty() && !v.segments_more);
        // An audit lists every segment, a page at a time.
        let mut listed = Vec::new();
        let mut from = 0;
        loop {
            let v = verification(&s, &ask(u32::MAX, from), 10).unwrap();
            assert!(v.segments.len() <= 10);
            listed.extend(v.segments.iter().map(|x| x.segment_id));
            if !v.segments_more {
                break;
            }
            from = v.segments.last().unwrap().segment_id + 1;
        }
        assert_eq!(listed, (0..25).collect::<Vec<u64>>());
        assert!(verification(&s, &ask(0, 0), 10).is_some());
        assert!(verification(
            &s,
            &pb::VerifyMigrationRequest {
                migration_id: 2,
                ..ask(0, 0)
            },
            10
        )
        .is_none());
    }
}
