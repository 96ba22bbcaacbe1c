//! The agent's client of the coordinator's control API.

use std::future::Future;
use std::time::Duration;

use ferry_common::tls::TlsMaterial;
use ferry_proto::control::{self as pb, agent_control_client::AgentControlClient};
use tonic::transport::{Channel, Endpoint};

/// A call to the coordinator failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The coordinator address is not usable.
    #[error("bad coordinator address {addr}: {reason}")]
    Address {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The coordinator could not be reached or refused the call.
    #[error("coordinator at {addr}: {status}")]
    Call {
        /// The address.
        addr: String,
        /// What it said (or the transport error).
        status: tonic::Status,
    },
}

impl ControlError {
    /// Whether retrying later may succeed (the coordinator is down or electing a leader).
    pub fn is_transient(&self) -> bool {
        match self {
            ControlError::Address { .. } => false,
            ControlError::Call { status, .. } => matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
            ),
        }
    }
}

/// Why a transfer failed, as one end reports it to the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What failed, where, and what to do.
    pub error: String,
    /// The failure is not the segment's (this agent shuts down, the peer cannot be reached, a
    /// hardlink waits for its first name): the coordinator retries it after a backoff without
    /// counting one of its attempts.
    pub retry_later: bool,
    /// A file of the segment changed after the scan so that the segment can never be sent as
    /// planned (a piece of a split file): the next round sends the file as it is then.
    pub stale: bool,
    /// Retrying cannot help: the target refuses the segment for what it holds (an entry it
    /// cannot write as it is). The coordinator gives it up at once.
    pub permanent: bool,
}

impl Failure {
    /// A failure of the segment itself: it counts toward the migration's `max_attempts`.
    pub fn counted(error: impl Into<String>) -> Self {
        Failure {
            error: error.into(),
            retry_later: false,
            stale: false,
            permanent: false,
        }
    }

    /// A failure that is not the segment's: retried later, not counted.
    pub fn later(error: impl Into<String>) -> Self {
        Failure {
            error: error.into(),
            retry_later: true,
            stale: false,
            permanent: false,
        }
    }

    /// The segment's file changed after the scan: left to the next round.
    pub fn stale(error: impl Into<String>) -> Self {
        Failure {
            error: error.into(),
            retry_later: false,
            stale: true,
            permanent: false,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.error)
    }
}

/// A cheap-to-clone handle on the control API, acting as one agent.
#[derive(Clone)]
pub struct Control {
    agent: String,
    addr: String,
    /// This process's session, sent with every call: the coordinator serves only the process
    /// that registered last, and refuses a second process while this one's session is live.
    session: u64,
    /// The session of the process that ran before this one from the same state directory.
    previous_session: u64,
    /// The last conflict the coordinator reported (logged once each).
    conflict: std::sync::Arc<std::sync::Mutex<String>>,
    /// The id of the cluster this agent registered with (empty before): local state is kept
    /// per cluster, so state of another cluster is never taken for this one's.
    cluster: std::sync::Arc<std::sync::Mutex<String>>,
    /// One client per coordinator listed; calls start at `current` and move on when a node is
    /// unavailable.
    /// Revoked agents as the last heartbeat said: name → the first second not revoked.
    revoked: std::sync::Arc<std::sync::RwLock<std::collections::BTreeMap<String, i64>>>,
    /// The TLS material that trusts the CAs the coordinators trust ([`Control::follow_ca`]),
    /// the file they are written to, and the last set refused (warned about once).
    follows: std::sync::Arc<std::sync::Mutex<Option<FollowCa>>>,
    /// Replaced when the agent's certificate is renewed ([`Control::present`]).
    clients: std::sync::Arc<std::sync::RwLock<Clients>>,
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The report coalescer: started on the first report, ended by [`Control::close_reports`].
    reports: std::sync::Arc<std::sync::Mutex<Reports>>,
    /// The digest of the last heartbeat answer: the next heartbeat waits at the coordinator
    /// while the answer is still this one (a long poll).
    known: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    /// How long a heartbeat may be held ([`crate::schedule::HEARTBEAT_WAIT`]; zero: answered at
    /// once).
    heartbeat_wait: Duration,
}

/// Where the report coalescer stands.
#[derive(Default)]
enum Reports {
    /// Not started.
    #[default]
    Idle,
    /// Running: its queue, and the task, owned here so a stopping agent waits for it.
    Running(ReportQueue, tokio::task::JoinHandle<()>),
    /// Closed: the agent stops; reports are refused.
    Closed,
}

type ReportReply = tokio::sync::oneshot::Sender<Result<pb::ReportSegmentResponse, ControlError>>;
type ReportQueue = tokio::sync::mpsc::UnboundedSender<(pb::ReportSegmentRequest, ReportReply)>;

/// Most reports in one `ReportSegments` call (the coordinator accepts up to 4096).
pub const MAX_REPORTS_PER_CALL: usize = 512;
/// Most `ReportSegments` calls on their way at once; reports made while all are queue for the
/// next (so under load they still travel many to a call).
const REPORT_CALLS_IN_FLIGHT: usize = 4;

impl Control {
    /// Prepares a connection to `addr` (`host:port`); it is established on first use, so an agent
    /// starts even while the coordinator is down.
    pub fn new(agent: &str, addr: &str, tls: &TlsMaterial) -> Result<Self, ControlError> {
        Ok(Control {
            agent: agent.to_string(),
            addr: addr.to_string(),
            session: new_session(),
            previous_session: 0,
            conflict: Default::default(),
            cluster: Default::default(),
            clients: std::sync::Arc::new(std::sync::RwLock::new(clients(addr, tls)?)),
            revoked: Default::default(),
            follows: Default::default(),
            current: Default::default(),
            reports: Default::default(),
            known: Default::default(),
            heartbeat_wait: crate::schedule::HEARTBEAT_WAIT,
        })
    }

    /// Has `tls`'s data connections (a target's server, a source's client) refuse peers whose
    /// certificates the coordinator revoked, as its heartbeats report them.
    pub fn check_revocations(&self, tls: &TlsMaterial) {
        let revoked = self.revoked.clone();
        tls.check_revocations(std::sync::Arc::new(move |agent: &str, not_before: i64| {
            revoked
                .read()
                .expect("not poisoned")
                .get(agent)
                .is_some_and(|&at| {
                    not_before.saturating_add(ferry_common::pki::CLOCK_SKEW.as_secs() as i64) < at
                })
        }));
    }

    /// Has `tls` trust the CA certificates the coordinators' heartbeats carry (two during a CA
    /// rotation, then the new one alone), without a restart, and write them to `ca_path`
    /// (`tls.ca`) so the next start trusts the same.
    pub fn follow_ca(&self, tls: &TlsMaterial, ca_path: std::path::PathBuf) {
        *self.follows.lock().expect("not poisoned") = Some(FollowCa {
            tls: tls.clone(),
            path: ca_path,
            refused: String::new(),
        });
    }

    /// Trusts `ca_pem` (from a heartbeat) if it is new; see [`Control::follow_ca`].
    fn learn_ca(&self, ca_pem: &str) {
        let mut follows = self.follows.lock().expect("not poisoned");
        let Some(f) = follows.as_mut() else { return };
        if ca_pem.is_empty() || f.tls.trusted_ca_pem() == ca_pem.as_bytes() {
            return;
        }
        match f.tls.trust(ca_pem.as_bytes()) {
            Ok(false) => {}
            Ok(true) => {
                let count =
                    ferry_common::pki::ca_public_keys(ca_pem.as_bytes()).map_or(0, |k| k.len());
                tracing::info!(message = "Now trusting the CA certificates the coordinators trust (a CA rotation).", count, file = %f.path.display());
                if let Err(e) = ferry_common::pki::replace_file(&f.path, ca_pem.as_bytes(), 0o644) {
                    tracing::warn!(message = "Cannot write the CA certificates the coordinators trust; this process trusts them, a restart would not until the next heartbeat.", error = %e);
                }
                let tls = f.tls.clone();
                drop(follows);
                if let Err(e) = self.present(&tls) {
                    tracing::warn!(message = "Cannot reconnect to the coordinators with the new CA certificates.", error = %e);
                }
            }
            Err(e) if f.refused != ca_pem => {
                tracing::warn!(message = "The coordinators trust CA certificates that do not include this agent's own CA; kept the CAs trusted before. Renew or re-join this agent before the old CA is retired.", error = %e);
                f.refused = ca_pem.to_string();
            }
            Err(_) => {}
        }
    }

    /// Presents `tls`'s current certificate from the next call on (a renewed one): new
    /// connections to the coordinators; calls under way finish on the old ones.
    pub fn present(&self, tls: &TlsMaterial) -> Result<(), ControlError> {
        let fresh = clients(&self.addr, tls)?;
        *self.clients.write().expect("not poisoned") = fresh;
        Ok(())
    }

    /// Asks a coordinator to certify the key of `csr` (DER) for this agent, authenticated by
    /// its current certificate.
    pub async fn renew_certificate(
        &self,
        csr: Vec<u8>,
    ) -> Result<pb::CertificateResponse, ControlError> {
        self.call(
            pb::RenewCertificateRequest {
                agent: self.agent.clone(),
                csr_der: csr,
            },
            |mut c, r| async move { c.renew_certificate(r).await },
        )
        .await
    }
}

/// See [`Control::follow_ca`].
struct FollowCa {
    tls: TlsMaterial,
    path: std::path::PathBuf,
    refused: String,
}

/// One client per coordinator listed.
type Clients = std::sync::Arc<Vec<AgentControlClient<Channel>>>;

/// Clients for the coordinators listed in `addr`, presenting `tls`'s current identity.
fn clients(addr: &str, tls: &TlsMaterial) -> Result<Clients, ControlError> {
    {
        let bad = |reason: String| ControlError::Address {
            addr: addr.to_string(),
            reason,
        };
        // Several coordinators may be listed ("a:7400,b:7400,c:7400"): any of them serves every
        // call (each forwards writes to the leader); a node that is unavailable is skipped.
        let mut endpoints = Vec::new();
        for one in addr.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            endpoints.push(
                Endpoint::from_shared(format!("https://{one}"))
                    .map_err(|e| bad(e.to_string()))?
                    .tls_config(tls.grpc_client())
                    .map_err(|e| bad(e.to_string()))?
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(Duration::from_secs(30))
                    .tcp_nodelay(true)
                    // Notice a coordinator that vanished without closing (a partition) within
                    // seconds, so calls fail over instead of waiting out their timeout.
                    .http2_keep_alive_interval(Duration::from_secs(2))
                    .keep_alive_timeout(Duration::from_secs(3))
                    .keep_alive_while_idle(true),
            );
        }
        if endpoints.is_empty() {
            return Err(bad("no address given".into()));
        }
        let clients = endpoints
            .into_iter()
            .map(|e| {
                AgentControlClient::new(e.connect_lazy())
                    .max_decoding_message_size(64 * 1024 * 1024)
            })
            .collect();
        Ok(std::sync::Arc::new(clients))
    }
}

impl Control {
    /// This agent's name.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// This process's session id.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// Registers as the successor of `previous`, the session of the process that ran from the
    /// same state directory before (it has ended: this process holds the directory's lock), so
    /// the coordinator accepts this one without waiting for that session to expire.
    pub fn succeeding(mut self, previous: u64) -> Self {
        self.previous_session = previous;
        self
    }

    /// Sends `req` to the current coordinator, moving on to the next listed one while a node
    /// answers `Unavailable` (down, or without a leader). Such a request was not executed, so
    /// sending it elsewhere is safe; any other error (a timeout is one) is returned as is.
    async fn call<Req, Resp, F, Fut>(&self, req: Req, f: F) -> Result<Resp, ControlError>
    where
        Req: Clone,
        F: Fn(AgentControlClient<Channel>, Req) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        use std::sync::atomic::Ordering;
        let clients = self.clients.read().expect("not poisoned").clone();
        let n = clients.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let idx = (start + i) % n;
            match f(clients[idx].clone(), req.clone()).await {
                Ok(r) => {
                    if i > 0 {
                        self.current.store(idx, Ordering::Relaxed);
                    }
                    return Ok(r.into_inner());
                }
                Err(s) if s.code() == tonic::Code::Unavailable => last = Some(s),
                Err(s) => {
                    if s.code() == tonic::Code::DeadlineExceeded && n > 1 {
                        // The node may be cut off: its outcome is unknown, so this call is not
                        // resent, but the next calls start at the next node.
                        self.current.store((idx + 1) % n, Ordering::Relaxed);
                    }
                    return Err(self.err(s));
                }
            }
        }
        Err(self.err(last.expect("at least one coordinator is listed")))
    }

    fn err(&self, status: tonic::Status) -> ControlError {
        ControlError::Call {
            addr: self.addr.clone(),
            status,
        }
    }

    /// Heartbeats answered at once instead of held while nothing changes (a load generator's
    /// fixed-rate polls).
    pub fn without_long_poll(mut self) -> Self {
        self.heartbeat_wait = Duration::ZERO;
        self
    }

    /// Registers this agent and its data address; returns the cluster's id.
    /// `applies_owners`: whether, as a target, it applies files' owners (it runs as root);
    /// `transport`: how its data connections are tuned (shown to operators); `target_root`: the
    /// directory it writes below as a target (empty: none).
    pub async fn register(
        &self,
        data_addr: &str,
        applies_owners: bool,
        transport: &ferry_common::transport::Transport,
        target_root: &str,
    ) -> Result<String, ControlError> {
        let r = self
            .call(
                pb::RegisterRequest {
                    agent: self.agent.clone(),
                    data_addr: data_addr.to_string(),
                    session: self.session,
                    previous_session: self.previous_session,
                    applies_owners,
                    congestion: transport.congestion.name().to_string(),
                    window_bytes: transport.window,
                    target_root: target_root.to_string(),
                },
                |mut c, r| async move { c.register(r).await },
            )
            .await?;
        self.learn_cluster(&r.cluster_id);
        Ok(r.cluster_id)
    }

    /// The id of the cluster this agent works for (empty until it registered).
    pub fn cluster_id(&self) -> String {
        self.cluster.lock().expect("not poisoned").clone()
    }

    /// Records the cluster id a coordinator answered with; says so when it changed (the
    /// coordinators' data was replaced by a new cluster while this agent ran).
    fn learn_cluster(&self, id: &str) {
        if id.is_empty() {
            return;
        }
        let mut known = self.cluster.lock().expect("not poisoned");
        if *known != id {
            if !known.is_empty() {
                tracing::warn!(
                    message = "The coordinator now belongs to another cluster; this agent's state of the old cluster is no longer used.",
                    old_cluster = %known,
                    cluster = %id
                );
            }
            *known = id.to_string();
        }
    }

    /// Ends this process's session (a clean shutdown): a new process may register at once.
    pub async fn end_session(&self) -> Result<(), ControlError> {
        self.call(
            pb::EndSessionRequest {
                agent: self.agent.clone(),
                session: self.session,
            },
            |mut c, r| async move { c.end_session(r).await },
        )
        .await?;
        Ok(())
    }

    /// Stops the report coalescer once the reports queued are sent; later reports are refused.
    /// Called by a stopping agent after its source and target have ended.
    pub async fn close_reports(&self) {
        let was = std::mem::replace(
            &mut *self.reports.lock().expect("not poisoned"),
            Reports::Closed,
        );
        if let Reports::Running(queue, task) = was {
            drop(queue);
            if let Err(e) = task.await {
                tracing::warn!(message = "The report sender failed.", error = %e);
            }
        }
    }

    /// The report coalescer: up to [`REPORT_CALLS_IN_FLIGHT`] calls at a time, each carrying
    /// every report queued when it starts. (One call at a time made a report that found one on
    /// its way wait for that call's round trip and then its own: 300 ms and more on an
    /// intercontinental path, at the end of every round.)
    async fn send_reports(
        self,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<(pb::ReportSegmentRequest, ReportReply)>,
    ) {
        let mut calls = tokio::task::JoinSet::new();
        loop {
            while calls.len() >= REPORT_CALLS_IN_FLIGHT {
                calls.join_next().await;
            }
            let first = tokio::select! {
                r = rx.recv() => match r {
                    Some(first) => first,
                    None => break,
                },
                Some(_) = calls.join_next(), if !calls.is_empty() => continue,
            };
            let mut batch = vec![first];
            while batch.len() < MAX_REPORTS_PER_CALL {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            calls.spawn(self.clone().send_report_batch(batch));
        }
        while calls.join_next().await.is_some() {}
    }

    /// One `ReportSegments` call; each report's answer goes to its caller.
    async fn send_report_batch(self, batch: Vec<(pb::ReportSegmentRequest, ReportReply)>) {
        let (reports, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let n = reports.len();
        let res = self
            .call(
                pb::ReportSegmentsRequest {
                    agent: self.agent.clone(),
                    session: self.session,
                    reports,
                },
                |mut c, r| async move { c.report_segments(r).await },
            )
            .await;
        match res {
            Ok(r) if r.results.len() == n => {
                for (reply, one) in replies.into_iter().zip(r.results) {
                    let out = match one.outcome() {
                        pb::ReportOutcome::Refused => {
                            Err(self.err(tonic::Status::failed_precondition(one.reason)))
                        }
                        pb::ReportOutcome::Unavailable => {
                            Err(self.err(tonic::Status::unavailable(one.reason)))
                        }
                        _ => Ok(one),
                    };
                    let _ = reply.send(out);
                }
            }
            Ok(r) => {
                let why = format!("{} results for {n} reports", r.results.len());
                for reply in replies {
                    let _ = reply.send(Err(self.err(tonic::Status::internal(why.clone()))));
                }
            }
            Err(e) => {
                let status = match &e {
                    ControlError::Call { status, .. } => status.clone(),
                    ControlError::Address { reason, .. } => {
                        tonic::Status::invalid_argument(reason.clone())
                    }
                };
                for reply in replies {
                    let _ = reply.send(Err(self.err(status.clone())));
                }
            }
        }
    }
}

/// A session id no other process has: 64 bits from the OS's random source, mixed with the
/// process id and the time in case it is unavailable; never 0 (0 means "no session").
fn new_session() -> u64 {
    u64::from_le_bytes(ferry_common::ids::random_bytes::<8>()).max(1)
}

/// What a heartbeat answers: the source work assigned to this agent, and its own throttle.
#[derive(Debug, Clone, Default)]
pub struct Assigned {
    /// Migrations this agent is the source of.
    pub work: Vec<pb::SourceWork>,
    /// The agent's throttle (`ferry_common::throttle` text; empty: none).
    pub throttle: String,
    /// Cutover steps this agent must do now (as a source or as a target).
    pub cutover: Vec<pb::CutoverWork>,
    /// Uuids of deleted migrations this agent was part of ([`crate::forget`]).
    pub forget: Vec<String>,
    /// Jobs to run or answer ([`crate::jobs`]).
    pub jobs: Vec<pb::JobWork>,
}

/// What the source and target ask of the coordinator. Trait modelling the control API, so the
/// agent's logic tests without a coordinator: [`Control`] is the real one (gRPC), and
/// [`testing::FakeCoordinator`] an in-memory one that records what it is told.
/// A planned segment as the coordinator registers it.
fn segment_info(s: &crate::manifest::SegmentSummary) -> pb::SegmentInfo {
    pb::SegmentInfo {
        segment_id: s.id,
        bytes: s.bytes,
        files: s.files,
        fingerprint: s.fingerprint.to_vec(),
        piece_index: s.piece.0,
        piece_count: s.piece.1,
    }
}

pub trait Coordinator: Clone + Send + Sync + 'static {
    /// This agent's name.
    fn agent(&self) -> &str;
    /// The cluster's id (empty until this agent registered).
    fn cluster_id(&self) -> String;
    /// Heartbeat; returns the source work assigned to this agent and its own throttle.
    fn heartbeat(&self) -> impl Future<Output = Result<Assigned, ControlError>> + Send;
    /// Registers planned segments.
    fn register_segments(
        &self,
        migration_id: u64,
        segments: &[crate::manifest::SegmentSummary],
    ) -> impl Future<Output = Result<(), ControlError>> + Send;
    /// Completes a scan, registering its `last` segments with it and leasing up to
    /// `lease_max` segments after it (in one entry); returns the leases granted.
    fn complete_scan(
        &self,
        migration_id: u64,
        summary: &crate::manifest::ScanSummary,
        last: &[crate::manifest::SegmentSummary],
        lease_max: u32,
    ) -> impl Future<Output = Result<Vec<pb::Lease>, ControlError>> + Send;
    /// Tells the operator about a problem at this source.
    fn report_problem(
        &self,
        migration_id: u64,
        error: &str,
        issues: &[(String, String)],
    ) -> impl Future<Output = Result<(), ControlError>> + Send;
    /// Asks for up to `max` segments to send.
    fn lease(&self, max: u32) -> impl Future<Output = Result<Vec<pb::Lease>, ControlError>> + Send;
    /// The leases this agent holds, as committed.
    fn list_leases(&self) -> impl Future<Output = Result<Vec<pb::Lease>, ControlError>> + Send;
    /// Reports on a job (`agent` and `session` are filled in).
    fn report_job(
        &self,
        report: pb::JobReport,
    ) -> impl Future<Output = Result<(), ControlError>> + Send;
    /// Reports a cutover step (`agent` and `session` are filled in).
    fn report_cutover_step(
        &self,
        step: pb::CutoverStepRequest,
    ) -> impl Future<Output = Result<(), ControlError>> + Send;
    /// The segments of a migration (this agent's as a source) in `from..to` that are not
    /// verified.
    fn list_unverified(
        &self,
        migration_id: u64,
        from: u64,
        to: u64,
    ) -> impl Future<Output = Result<Vec<u64>, ControlError>> + Send;
    /// Extends leases; one answer per lease (false: no longer ours).
    fn renew_leases(
        &self,
        leases: &[crate::schedule::LeaseKey],
    ) -> impl Future<Output = Result<Vec<bool>, ControlError>> + Send;
    /// Whether a lease is current (as a target).
    fn check_lease(
        &self,
        migration_id: u64,
        segment_id: u64,
        epoch: u64,
    ) -> impl Future<Output = Result<pb::CheckLeaseResponse, ControlError>> + Send;
    /// Reports, as the target, a segment it holds durably whose BLAKE3 `hash` equals the one
    /// the source sent with the bytes: the coordinator records both ends' hashes from this
    /// one report, so the segment is verified without waiting for the source's.
    fn report_received(
        &self,
        migration_id: u64,
        segment_id: u64,
        epoch: u64,
        hash: [u8; 32],
    ) -> impl Future<Output = Result<pb::ReportSegmentResponse, ControlError>> + Send;
    /// Reports a transfer's outcome from this end.
    fn report(
        &self,
        role: pb::Role,
        migration_id: u64,
        segment_id: u64,
        epoch: u64,
        result: Result<[u8; 32], Failure>,
    ) -> impl Future<Output = Result<pb::ReportSegmentResponse, ControlError>> + Send;
}

impl Coordinator for Control {
    fn agent(&self) -> &str {
        Control::agent(self)
    }
    fn cluster_id(&self) -> String {
        Control::cluster_id(self)
    }

    async fn heartbeat(&self) -> Result<Assigned, ControlError> {
        let known = self.known.lock().expect("not poisoned").clone();
        let r = self
            .call(
                pb::HeartbeatRequest {
                    agent: self.agent.clone(),
                    session: self.session,
                    wait_ms: self.heartbeat_wait.as_millis() as u32,
                    known,
                },
                |mut c, r| async move { c.heartbeat(r).await },
            )
            .await?;
        if !r.conflict.is_empty() {
            let mut last = self.conflict.lock().expect("not poisoned");
            if *last != r.conflict {
                tracing::error!(
                    message = "Another process tried to run as this agent and was refused; stop one of them.",
                    agent = %self.agent,
                    conflict = %r.conflict
                );
                *last = r.conflict.clone();
            }
        }
        self.learn_cluster(&r.cluster_id);
        self.learn_ca(&r.ca_pem);
        {
            let now: std::collections::BTreeMap<String, i64> =
                r.revoked.iter().map(|v| (v.agent.clone(), v.at)).collect();
            let mut revoked = self.revoked.write().expect("not poisoned");
            if *revoked != now {
                for (agent, at) in &now {
                    if revoked.get(agent) != Some(at) {
                        tracing::warn!(message = "An agent was revoked: its connections are refused from now on.", %agent);
                    }
                }
                *revoked = now;
            }
        }
        *self.known.lock().expect("not poisoned") = r.digest.clone();
        Ok(Assigned {
            work: r.source_work,
            throttle: r.agent_throttle,
            cutover: r.cutover_work,
            forget: r.forget,
            jobs: r.jobs,
        })
    }

    async fn register_segments(
        &self,
        migration_id: u64,
        segments: &[crate::manifest::SegmentSummary],
    ) -> Result<(), ControlError> {
        self.call(
            pb::RegisterSegmentsRequest {
                agent: self.agent.clone(),
                session: self.session,
                migration_id,
                segments: segments.iter().map(segment_info).collect(),
            },
            |mut c, r| async move { c.register_segments(r).await },
        )
        .await?;
        Ok(())
    }

    async fn complete_scan(
        &self,
        migration_id: u64,
        summary: &crate::manifest::ScanSummary,
        last: &[crate::manifest::SegmentSummary],
        lease_max: u32,
    ) -> Result<Vec<pb::Lease>, ControlError> {
        let r = self
            .call(
                pb::CompleteScanRequest {
                    lease_max,
                    segments: last.iter().map(segment_info).collect(),
                    agent: self.agent.clone(),
                    session: self.session,
                    migration_id,
                    segments_total: summary.segments_total,
                    issues: summary
                        .issues
                        .iter()
                        .map(|(path, reason)| pb::ScanIssue {
                            path: path.clone(),
                            reason: reason.clone(),
                        })
                        .collect(),
                    issues_total: summary.issues_total,
                    hardlinks: summary.hardlinks,
                    excluded: summary.excluded,
                    root_error: summary.root_error.clone(),
                    deleted: summary.deleted,
                },
                |mut c, r| async move { c.complete_scan(r).await },
            )
            .await?;
        Ok(r.leases)
    }

    async fn report_problem(
        &self,
        migration_id: u64,
        error: &str,
        issues: &[(String, String)],
    ) -> Result<(), ControlError> {
        self.call(
            pb::SourceProblemRequest {
                agent: self.agent.clone(),
                session: self.session,
                migration_id,
                error: error.to_string(),
                issues: issues
                    .iter()
                    .map(|(path, reason)| pb::ScanIssue {
                        path: path.clone(),
                        reason: reason.clone(),
                    })
                    .collect(),
            },
            |mut c, r| async move { c.report_source_problem(r).await },
        )
        .await?;
        Ok(())
    }

    async fn lease(&self, max: u32) -> Result<Vec<pb::Lease>, ControlError> {
        let r = self
            .call(
                pb::LeaseSegmentsRequest {
                    agent: self.agent.clone(),
                    session: self.session,
                    max,
                },
                |mut c, r| async move { c.lease_segments(r).await },
            )
            .await?;
        Ok(r.leases)
    }

    async fn list_leases(&self) -> Result<Vec<pb::Lease>, ControlError> {
        let r = self
            .call(
                pb::ListLeasesRequest {
                    agent: self.agent.clone(),
                    session: self.session,
                },
                |mut c, r| async move { c.list_leases(r).await },
            )
            .await?;
        Ok(r.leases)
    }

    async fn report_job(&self, report: pb::JobReport) -> Result<(), ControlError> {
        self.call(
            pb::JobReport {
                agent: self.agent.clone(),
                session: self.session,
                ..report
            },
            |mut c, r| async move { c.report_job(r).await },
        )
        .await?;
        Ok(())
    }

    async fn report_cutover_step(&self, step: pb::CutoverStepRequest) -> Result<(), ControlError> {
        self.call(
            pb::CutoverStepRequest {
                agent: self.agent.clone(),
                session: self.session,
                ..step
            },
            |mut c, r| async move { c.report_cutover_step(r).await },
        )
        .await?;
        Ok(())
    }

    async fn list_unverified(
        &self,
        migration_id: u64,
        from: u64,
        to: u64,
    ) -> Result<Vec<u64>, ControlError> {
        let r = self
            .call(
                pb::ListUnverifiedRequest {
                    agent: self.agent.clone(),
                    session: self.session,
                    migration_id,
                    from,
                    to,
                },
                |mut c, r| async move { c.list_unverified(r).await },
            )
            .await?;
        Ok(r.segment_ids)
    }

    async fn renew_leases(
        &self,
        leases: &[crate::schedule::LeaseKey],
    ) -> Result<Vec<bool>, ControlError> {
        let r = self
            .call(
                pb::RenewLeasesRequest {
                    agent: self.agent.clone(),
                    session: self.session,
                    leases: leases
                        .iter()
                        .map(|l| pb::LeaseRef {
                            migration_id: l.migration_id,
                            segment_id: l.segment_id,
                            epoch: l.epoch,
                        })
                        .collect(),
                },
                |mut c, r| async move { c.renew_leases(r).await },
            )
            .await?;
        Ok(r.renewed)
    }

    async fn check_lease(
        &self,
        migration_id: u64,
        segment_id: u64,
        epoch: u64,
    ) -> Result<pb::CheckLeaseResponse, ControlError> {
        let r = self
            .call(
                pb::CheckLeaseRequest {
                    agent: self.agent.clone(),
                    session: self.session,
                    migration_id,
                    segment_id,
                    epoch,
                },
                |mut c, r| async move { c.check_lease(r).await },
            )
            .await?;
        Ok(r)
    }

    async fn report_received(
        &self,
        migration_id: u64,
        segment_id: u64,
        epoch: u64,
        hash: [u8; 32],
    ) -> Result<pb::ReportSegmentResponse, ControlError> {
        let mut req =
            self.report_request(pb::Role::Target, migration_id, segment_id, epoch, Ok(hash));
        req.source_blake3 = hash.to_vec();
        self.queue_report(req).await
    }

    async fn report(
        &self,
        role: pb::Role,
        migration_id: u64,
        segment_id: u64,
        epoch: u64,
        result: Result<[u8; 32], Failure>,
    ) -> Result<pb::ReportSegmentResponse, ControlError> {
        let req = self.report_request(role, migration_id, segment_id, epoch, result);
        self.queue_report(req).await
    }
}

impl Control {
    /// A report from this end (no source hash: see [`Coordinator::report_received`]).
    fn report_request(
        &self,
        role: pb::Role,
        migration_id: u64,
        segment_id: u64,
        epoch: u64,
        result: Result<[u8; 32], Failure>,
    ) -> pb::ReportSegmentRequest {
        let (ok, blake3, error, retry_later, stale, permanent) = match result {
            Ok(h) => (true, h.to_vec(), String::new(), false, false, false),
            Err(f) => (
                false,
                Vec::new(),
                f.error,
                f.retry_later,
                f.stale,
                f.permanent,
            ),
        };
        pb::ReportSegmentRequest {
            agent: self.agent.clone(),
            role: role as i32,
            migration_id,
            segment_id,
            epoch,
            ok,
            blake3,
            error,
            retry_later,
            stale,
            source_blake3: Vec::new(),
            permanent,
        }
    }

    /// Queues one report for the coalescer ([`Control::send_reports`]) and waits for its answer.
    async fn queue_report(
        &self,
        req: pb::ReportSegmentRequest,
    ) -> Result<pb::ReportSegmentResponse, ControlError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let queued = {
            let mut reports = self.reports.lock().expect("not poisoned");
            if matches!(*reports, Reports::Idle) {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                // The task's own handle has no queue: it ends once the queue is closed.
                let sender = Control {
                    reports: Default::default(),
                    ..self.clone()
                };
                *reports = Reports::Running(tx, tokio::spawn(sender.send_reports(rx)));
            }
            match &*reports {
                Reports::Running(queue, _) => queue.send((req, reply)).is_ok(),
                _ => false,
            }
        };
        if !queued {
            return Err(self.err(tonic::Status::unavailable("report queue closed")));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(self.err(tonic::Status::unavailable("report abandoned"))))
    }
}

/// An in-memory coordinator for tests of the agent's logic.
pub mod testing {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::schedule::LeaseKey;

    /// A report the fake received.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Report {
        /// Which end.
        pub role: pb::Role,
        /// The lease.
        pub lease: LeaseKey,
        /// The outcome.
        pub result: Result<[u8; 32], Failure>,
        /// A target's report only: the hash the source sent with the bytes.
        pub source_hash: Option<[u8; 32]>,
    }

    /// What the fake holds and was told.
    #[derive(Debug, Default)]
    pub struct FakeState {
        /// What heartbeats answer.
        pub work: Vec<pb::SourceWork>,
        /// The agent's throttle heartbeats answer.
        pub agent_throttle: String,
        /// Leases handed out by the next lease requests (at most the number asked for each).
        pub grant: Vec<pb::Lease>,
        /// Leases `list_leases` answers with.
        pub held: Vec<pb::Lease>,
        /// Lease requests fail while this is set (the coordinator is unavailable).
        pub unavailable: bool,
        /// When `grant` is empty, lease requests hand out registered segments not granted yet
        /// (epoch 1, to target `dst` at `mem`, with this lease time in ms); 0: they do not.
        pub auto_grant_ttl_ms: u64,
        /// Segments granted by `auto_grant_ttl_ms`.
        pub granted: std::collections::BTreeSet<(u64, u64)>,
        /// Segments registered, per migration, in order.
        pub registered: BTreeMap<u64, Vec<u64>>,
        /// Scans completed, per migration: (segments, issues).
        pub scans: BTreeMap<u64, (u64, u64)>,
        /// Lease requests made, with the number asked for.
        pub lease_requests: Vec<u32>,
        /// The leases asked for with each scan's completion (0: none), and how many it got.
        pub scan_lease_requests: Vec<(u32, usize)>,
        /// Segments not verified, per migration (what `list_unverified` answers from).
        pub unverified: BTreeMap<u64, Vec<u64>>,
        /// Cutover steps heartbeats hand out.
        pub cutover_work: Vec<pb::CutoverWork>,
        /// Deleted migrations' uuids its heartbeats answer.
        pub forget: Vec<String>,
        /// Jobs its heartbeats hand out.
        pub jobs: Vec<pb::JobWork>,
        /// Job reports received.
        pub job_reports: Vec<pb::JobReport>,
        /// Cutover steps reported.
        pub cutover_steps: Vec<pb::CutoverStepRequest>,
        /// Renewal calls made.
        pub renewals: Vec<Vec<LeaseKey>>,
        /// Reports received.
        pub reports: Vec<Report>,
        /// Problems reported.
        pub problems: Vec<String>,
        /// Lease checks asked (as a target).
        pub lease_checks: u32,
        /// Lease checks after this many are refused with `lease_refusal` (`Some(0)`: all).
        pub refuse_leases_after: Option<u32>,
        /// The reason a refused lease check gives.
        pub lease_refusal: String,
    }

    /// A fake coordinator (cheap to clone: clones share the state).
    #[derive(Clone, Default)]
    pub struct FakeCoordinator {
        /// Its state, for the test to set and read.
        pub state: Arc<Mutex<FakeState>>,
    }

    impl FakeCoordinator {
        /// Grants up to `max` leases (what a lease call gets).
        fn grant(&self, max: u32) -> Result<Vec<pb::Lease>, ControlError> {
            self.with(|s| {
                if s.unavailable {
                    return Err(Self::unavailable());
                }
                if s.grant.is_empty() && s.auto_grant_ttl_ms > 0 {
                    let ttl_ms = s.auto_grant_ttl_ms;
                    let fresh: Vec<(u64, u64)> = s
                        .registered
                        .iter()
                        .flat_map(|(m, ids)| ids.iter().map(move |i| (*m, *i)))
                        .filter(|k| !s.granted.contains(k))
                        .collect();
                    for (migration_id, segment_id) in fresh {
                        s.granted.insert((migration_id, segment_id));
                        s.grant.push(pb::Lease {
                            migration_id,
                            segment_id,
                            epoch: 1,
                            target_agent: "dst".into(),
                            target_addr: "mem".into(),
                            ttl_ms,
                            ..Default::default()
                        });
                    }
                }
                let n = (max as usize).min(s.grant.len());
                let granted: Vec<_> = s.grant.drain(..n).collect();
                s.held.extend(granted.iter().cloned());
                Ok(granted)
            })
        }

        /// Runs `f` on the state.
        pub fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
            f(&mut self.state.lock().expect("not poisoned"))
        }

        fn unavailable() -> ControlError {
            ControlError::Call {
                addr: "fake".into(),
                status: tonic::Status::unavailable("fake coordinator unavailable"),
            }
        }
    }

    impl Coordinator for FakeCoordinator {
        fn agent(&self) -> &str {
            "src"
        }
        fn cluster_id(&self) -> String {
            "fake-cluster".into()
        }
        async fn heartbeat(&self) -> Result<Assigned, ControlError> {
            Ok(self.with(|s| Assigned {
                work: s.work.clone(),
                throttle: s.agent_throttle.clone(),
                cutover: s.cutover_work.clone(),
                forget: s.forget.clone(),
                jobs: s.jobs.clone(),
            }))
        }
        async fn register_segments(
            &self,
            migration_id: u64,
            segments: &[crate::manifest::SegmentSummary],
        ) -> Result<(), ControlError> {
            self.with(|s| {
                s.registered
                    .entry(migration_id)
                    .or_default()
                    .extend(segments.iter().map(|g| g.id))
            });
            Ok(())
        }
        async fn complete_scan(
            &self,
            migration_id: u64,
            summary: &crate::manifest::ScanSummary,
            last: &[crate::manifest::SegmentSummary],
            lease_max: u32,
        ) -> Result<Vec<pb::Lease>, ControlError> {
            self.register_segments(migration_id, last).await?;
            self.with(|s| {
                s.scans
                    .insert(migration_id, (summary.segments_total, summary.issues_total))
            });
            let granted = match lease_max {
                0 => Vec::new(),
                n => self.grant(n)?,
            };
            self.with(|s| s.scan_lease_requests.push((lease_max, granted.len())));
            Ok(granted)
        }
        async fn report_problem(
            &self,
            _migration_id: u64,
            error: &str,
            _issues: &[(String, String)],
        ) -> Result<(), ControlError> {
            self.with(|s| s.problems.push(error.to_string()));
            Ok(())
        }
        async fn lease(&self, max: u32) -> Result<Vec<pb::Lease>, ControlError> {
            self.with(|s| s.lease_requests.push(max));
            self.grant(max)
        }
        async fn list_leases(&self) -> Result<Vec<pb::Lease>, ControlError> {
            self.with(|s| {
                if s.unavailable {
                    return Err(Self::unavailable());
                }
                Ok(s.held.clone())
            })
        }
        async fn report_cutover_step(
            &self,
            step: pb::CutoverStepRequest,
        ) -> Result<(), ControlError> {
            self.with(|s| s.cutover_steps.push(step));
            Ok(())
        }
        async fn report_job(&self, report: pb::JobReport) -> Result<(), ControlError> {
            self.with(|s| s.job_reports.push(report));
            Ok(())
        }
        async fn list_unverified(
            &self,
            migration_id: u64,
            from: u64,
            to: u64,
        ) -> Result<Vec<u64>, ControlError> {
            self.with(|s| {
                Ok(s.unverified
                    .get(&migration_id)
                    .into_iter()
                    .flatten()
                    .copied()
                    .filter(|id| (from..to).contains(id))
                    .collect())
            })
        }
        async fn renew_leases(&self, leases: &[LeaseKey]) -> Result<Vec<bool>, ControlError> {
            self.with(|s| s.renewals.push(leases.to_vec()));
            Ok(vec![true; leases.len()])
        }
        async fn check_lease(
            &self,
            _migration_id: u64,
            _segment_id: u64,
            _epoch: u64,
        ) -> Result<pb::CheckLeaseResponse, ControlError> {
            self.with(|s| {
                s.lease_checks += 1;
                if s.unavailable {
                    return Err(Self::unavailable());
                }
                let refusal = s
                    .refuse_leases_after
                    .filter(|n| s.lease_checks > *n)
                    .map(|_| s.lease_refusal.clone());
                Ok(match refusal {
                    Some(reason) => pb::CheckLeaseResponse {
                        ok: false,
                        reason,
                        ..Default::default()
                    },
                    None => pb::CheckLeaseResponse {
                        ok: true,
                        source_agent: "src".into(),
                        migration_uuid: "fake-migration".into(),
                        ..Default::default()
                    },
                })
            })
        }
        async fn report_received(
            &self,
            migration_id: u64,
            segment_id: u64,
            epoch: u64,
            hash: [u8; 32],
        ) -> Result<pb::ReportSegmentResponse, ControlError> {
            let lease = LeaseKey {
                migration_id,
                segment_id,
                epoch,
            };
            self.with(|s| {
                s.held.retain(|l| LeaseKey::from(l) != lease);
                s.reports.push(Report {
                    role: pb::Role::Target,
                    lease,
                    result: Ok(hash),
                    source_hash: Some(hash),
                })
            });
            Ok(pb::ReportSegmentResponse {
                outcome: pb::ReportOutcome::Verified.into(),
                reason: String::new(),
            })
        }

        async fn report(
            &self,
            role: pb::Role,
            migration_id: u64,
            segment_id: u64,
            epoch: u64,
            result: Result<[u8; 32], Failure>,
        ) -> Result<pb::ReportSegmentResponse, ControlError> {
            let lease = LeaseKey {
                migration_id,
                segment_id,
                epoch,
            };
            let verified = result.is_ok();
            self.with(|s| {
                s.held.retain(|l| LeaseKey::from(l) != lease);
                s.reports.push(Report {
                    role,
                    lease,
                    result,
                    source_hash: None,
                })
            });
            let outcome = if verified {
                pb::ReportOutcome::Verified
            } else {
                pb::ReportOutcome::Failed
            };
            Ok(pb::ReportSegmentResponse {
                outcome: outcome.into(),
                reason: String::new(),
            })
        }
    }
}
