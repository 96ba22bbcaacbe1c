//! A running coordinator node: Raft on the sled store plus the gRPC services, until shut down.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;

use ferry_common::config::TlsPaths;
use ferry_common::telemetry::LogLimit;
use ferry_common::tls::TlsMaterial;
use serde::Deserialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::grpc::{admin::AdminService, agent::AgentService, Core};
use crate::network::{PeerNetworkFactory, Peers};
use crate::raft_types::Raft;
use crate::store::Applied;

/// A coordinator node's configuration (`/etc/ferry/coordinator.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Unique node id (≥ 1).
    pub node_id: u64,
    /// What is logged: a level (`info`, `debug`) or `RUST_LOG`-style directives
    /// (`info,openraft=warn`); default `info,openraft=warn`. `RUST_LOG` overrides it. Changed by
    /// SIGHUP (`systemctl reload ferry-coordinator`) without a restart.
    #[serde(default)]
    pub log_level: Option<String>,
    /// gRPC listen address for agents and ferryctl.
    pub listen: SocketAddr,
    /// sled database directory.
    pub data_dir: PathBuf,
    /// Segment lease duration.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_secs: u64,
    /// On first start with an empty data directory, initialise a new one-node cluster (the
    /// first node of a cluster). Nodes that will join an existing cluster set this to false and
    /// wait to be added with `ferryctl cluster add-node`.
    #[serde(default = "default_bootstrap")]
    pub bootstrap: bool,
    /// Build a snapshot (and compact the log) after this many new log entries.
    #[serde(default = "default_snapshot_every")]
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot, so that lagging followers catch up from the log.
    #[serde(default = "default_keep_logs")]
    pub keep_logs_after_snapshot: u64,
    /// HTTP address serving `/metrics` (Prometheus), `/livez` and `/readyz` (plain HTTP: bind
    /// it to a management network or loopback). Absent: not served.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// TLS files.
    pub tls: TlsPaths,
    /// Where agents join with a token (`ferry-agent join`): TLS 1.3 without a client
    /// certificate, serving the join call only. Absent: agents cannot join through this node.
    #[serde(default)]
    pub join_listen: Option<SocketAddr>,
    /// The cluster CA's key, to sign the certificates of agents that join or renew. Default:
    /// `ca.key` beside `tls.ca`, if it is there. Without it this node signs nothing (an agent
    /// that reaches it to renew is told to reach another).
    #[serde(default)]
    pub ca_key: Option<PathBuf>,
    /// How long an agent certificate this node signs is valid, in seconds (default 7 days;
    /// at least 30 s). An agent renews it when a third is left.
    #[serde(default = "default_agent_cert_secs")]
    pub agent_cert_secs: u64,
    /// How long an operator certificate this node signs (`ferryctl user create`, `ferryctl
    /// certs renew`) is valid, in seconds (default 90 days; at least 30 s).
    #[serde(default = "default_operator_cert_secs")]
    pub operator_cert_secs: u64,
    /// How long a coordinator certificate this node signs is valid, in seconds (default 365
    /// days; at least 30 s). Every node renews its own when a third of its life is left.
    #[serde(default = "default_coordinator_cert_secs")]
    pub coordinator_cert_secs: u64,
}

fn default_agent_cert_secs() -> u64 {
    ferry_common::pki::AGENT_LIFETIME.as_secs()
}

fn default_operator_cert_secs() -> u64 {
    ferry_common::pki::OPERATOR_LIFETIME.as_secs()
}

fn default_coordinator_cert_secs() -> u64 {
    ferry_common::pki::COORDINATOR_LIFETIME.as_secs()
}

impl ferry_common::config::DaemonConfig for CoordinatorConfig {
    const ENV_PREFIX: &'static str = "FERRY_COORDINATOR_";
    const ENV_SECTIONS: &'static [&'static str] = &["tls"];
    fn log_level(&self) -> Option<&str> {
        self.log_level.as_deref()
    }
}

fn default_snapshot_every() -> u64 {
    20_000
}

fn default_keep_logs() -> u64 {
    1_000
}

fn default_bootstrap() -> bool {
    true
}

fn default_lease_ttl() -> u64 {
    crate::state::DEFAULT_LEASE_TTL_MS / 1000
}

/// Starting a node failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS material is missing or bad.
    #[error(transparent)]
    Tls(#[from] ferry_common::tls::TlsError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] crate::store::OpenError),
    /// Raft refused to start.
    #[error("raft failed to start: {0}")]
    Raft(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// gRPC TLS setup failed.
    #[error("gRPC server setup failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The CA key cannot sign.
    #[error("ca_key: {0}")]
    Signer(#[from] crate::grpc::enrol::SignerError),
    /// Joining needs a CA key.
    #[error("join_listen is set but this node has no CA key ({0} is not there): set ca_key to the cluster CA's key, or leave join_listen out")]
    NoCaKey(String),
}

/// A node that is serving.
pub struct RunningNode {
    /// The bound gRPC address.
    pub addr: SocketAddr,
    /// The Raft handle.
    pub raft: Raft,
    /// Applied state, for in-process readers.
    pub applied: Arc<RwLock<Applied>>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    /// The group commit task (see `GroupCommit::start`).
    committer: JoinHandle<()>,
    /// Proposes the periodic sync rounds that are due, while this node leads.
    rounds: JoinHandle<()>,
    /// Keeps the gRPC health service's answer and the leader-change count current.
    health: JoinHandle<()>,
    /// Renews this node's certificate when it is due.
    renewal: JoinHandle<()>,
    /// Where `/metrics`, `/livez` and `/readyz` are served, if they are.
    pub metrics_addr: Option<SocketAddr>,
    ops: Option<ferry_common::ops::OpsServer>,
    /// Where agents join, if they may here.
    pub join_addr: Option<SocketAddr>,
    join_server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl RunningNode {
    /// Stops serving, shuts Raft down and flushes state. In-flight RPCs are abandoned; nothing
    /// half-applied can remain because every change is one committed entry applied atomically.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.rounds.abort();
        self.health.abort();
        self.renewal.abort();
        if let Some(j) = self.join_server.take() {
            j.abort();
        }
        drop(self.ops.take());
        // In-flight calls end first; a connection that never ends (a client that sent no
        // HTTP/2 preface) does not hold the shutdown up for longer than the grace.
        let mut server = self.server;
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut server)
            .await
            .is_err()
        {
            tracing::warn!(message = "Connections still open at shutdown; closing them.");
            server.abort();
        }
        // The services are gone, and with them the group commit's queue: its last entries are
        // answered before Raft stops.
        if tokio::time::timeout(Duration::from_secs(5), self.committer)
            .await
            .is_err()
        {
            tracing::warn!(message = "Group commit did not end in time.");
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(message = "Raft shutdown failed.", error = %e);
        }
    }
}

/// Starts a node: opens the store, starts Raft (initialising a single-node cluster on first start)
/// and serves gRPC on `cfg.listen`.
pub async fn start(cfg: CoordinatorConfig) -> Result<RunningNode, StartError> {
    ferry_common::renewal::finish_renewal(&cfg.tls);
    let tls = TlsMaterial::load(&cfg.tls)?;
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
        StartError::Store(crate::store::OpenError::Create {
            path: cfg.data_dir.clone(),
            source: e,
        })
    })?;
    let (log, sm) = crate::store::open(&cfg.data_dir)?;
    let applied = sm.shared();
    // Revoked agents are refused in the TLS handshake, from the applied state.
    {
        let applied = applied.clone();
        tls.check_revocations(Arc::new(move |agent: &str, not_before: i64| {
            applied
                .read()
                .expect("not poisoned")
                .state
                .pki
                .is_revoked(agent, not_before)
        }));
    }
    let committed = log.committed_index();
    let raft_cfg = openraft::Config {
        cluster_name: "ferry".into(),
        heartbeat_interval: 250,
        election_timeout_min: 1000,
        election_timeout_max: 2000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(cfg.snapshot_every.max(1)),
        max_in_snapshot_log_to_keep: cfg.keep_logs_after_snapshot,
        purge_batch_size: 1,
        // A chunk must be written and acknowledged within this time; 200 ms (the default) is
        // too short for a multi-MiB chunk on a loaded 2-core machine, and a timed-out chunk is
        // resent from the start, forever.
        install_snapshot_timeout: 10_000,
        snapshot_max_chunk_size: 4 * 1024 * 1024,
        ..Default::default()
    }
    .validate()
    .map_err(|e| StartError::Raft(e.to_string()))?;
    let peers = Peers::new(&tls);
    let raft = Raft::new(
        cfg.node_id,
        Arc::new(raft_cfg),
        PeerNetworkFactory(peers.clone()),
        log,
        sm,
    )
    .await
    .map_err(|e| StartError::Raft(e.to_string()))?;

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: cfg.listen,
        source,
    })?;

    let members = std::collections::BTreeMap::from([(
        cfg.node_id,
        openraft::BasicNode {
            addr: addr.to_string(),
        },
    )]);
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
    if initialized {
        tracing::info!(
            message = "Resuming an initialised cluster.",
            node_id = cfg.node_id
        );
    } else if cfg.bootstrap {
        raft.initialize(members)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        tracing::info!(
            message = "Initialised a new single-node cluster.",
            node_id = cfg.node_id
        );
    } else {
        tracing::info!(
            message = "Waiting to be added to a cluster (ferryctl cluster add-node).",
            node_id = cfg.node_id,
            %addr
        );
    }

    // The CA key: configured, or beside the CA certificate. Joining needs it; renewing too
    // (an agent asks another node when this one has none).
    let key_path = cfg
        .ca_key
        .clone()
        .unwrap_or_else(|| cfg.tls.ca.with_file_name("ca.key"));
    // A key found only by default that this node's user may not read (an operator who keeps
    // the CA key root-only, as the packages suggest) means "this node does not sign", unless
    // joining was asked for; a configured key must be readable.
    let defaulted_unreadable = cfg.ca_key.is_none()
        && cfg.join_listen.is_none()
        && key_path.is_file()
        && std::fs::File::open(&key_path).is_err();
    if defaulted_unreadable {
        tracing::warn!(
            message = "The CA key beside the CA certificate is not readable by this node; it signs no certificates (agents renew through a node that can, or set ca_key).",
            key = %key_path.display()
        );
    }
    let signer = if defaulted_unreadable {
        None
    } else if cfg.ca_key.is_some() || key_path.is_file() {
        Some(Arc::new(crate::grpc::enrol::Signer::load(
            &key_path,
            &cfg.tls.ca,
            &tls.ca_pem,
            crate::grpc::enrol::Lifetimes {
                agent: Duration::from_secs(cfg.agent_cert_secs),
                operator: Duration::from_secs(cfg.operator_cert_secs),
                coordinator: Duration::from_secs(cfg.coordinator_cert_secs),
            },
        )?))
    } else if cfg.join_listen.is_some() {
        return Err(StartError::NoCaKey(key_path.display().to_string()));
    } else {
        None
    };
    let (commits, committer) = crate::grpc::group_commit::GroupCommit::start(raft.clone());
    // Join tokens pin the CA that signed this node's own certificate (the one its join
    // listener presents): during a CA rotation tls.ca holds two.
    let ca_pin = {
        let der = tls.own_ca()?;
        ferry_common::pki::ca_pin(&der).map_err(|e| {
            StartError::Tls(ferry_common::tls::TlsError::Quic(format!(
                "CA certificate: {e}"
            )))
        })?
    };
    let core = Arc::new(Core {
        signer,
        renewals: crate::grpc::enrol::Limiter::new(crate::grpc::enrol::RENEWALS_PER_WINDOW, 4096),
        denials: crate::grpc::enrol::Limiter::new(crate::grpc::DENIALS_RECORDED_PER_WINDOW, 4096),
        ca_pin,
        ca_pem: String::from_utf8_lossy(&tls.ca_pem).into_owned(),
        raft: raft.clone(),
        peers,
        applied: applied.clone(),
        node_id: cfg.node_id,
        lease_ttl_ms: cfg.lease_ttl_secs.max(1) * 1000,
        commits,
        election_hold: std::sync::Mutex::new(None),
    });
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (health, health_service) = tonic_health::server::health_reporter();
    let leader_changes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let health = tokio::spawn(watch_leader(raft.clone(), health, leader_changes.clone()));
    let reflection = reflection()?;
    let limit = 64 * 1024 * 1024;
    // No time limit on requests as a whole: `cluster add-node` may wait hours for a large
    // state to reach a new node (and must then remove it again itself), and a snapshot up to
    // ten minutes.
    let router = tonic::transport::Server::builder()
        .add_service(
            ferry_proto::control::agent_control_server::AgentControlServer::new(AgentService(
                core.clone(),
            ))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit),
        )
        // The admin and Raft services check the caller's certificate before a request's body
        // is read (an interceptor sees its head only): a Raft message may be 1 GiB, and only
        // another coordinator may make this node read that much.
        .add_service(InterceptedService::new(
            ferry_proto::admin::admin_server::AdminServer::new(AdminService(core.clone()))
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            |req: tonic::Request<()>| crate::grpc::authorize_admin(&req).map(|()| req),
        ))
        .add_service(InterceptedService::new(
            ferry_proto::raft::raft_peer_server::RaftPeerServer::new(
                crate::grpc::peer::PeerService(core.clone()),
            )
            .max_decoding_message_size(1 << 30)
            .max_encoding_message_size(1 << 30),
            |req: tonic::Request<()>| crate::grpc::authorize_coordinator(&req).map(|()| req),
        ))
        .add_service(health_service)
        .add_service(reflection.0)
        .add_service(reflection.1);
    let connections = incoming(listener, tls.grpc_server_config()?);
    let server = tokio::spawn(
        router.serve_with_incoming_shutdown(connections, async move {
            let _ = stop_rx.await;
        }),
    );
    tracing::info!(message = "Coordinator serving.", %addr, node_id = cfg.node_id);
    let (join_addr, join_server) = match cfg.join_listen {
        None => (None, None),
        Some(listen) => {
            let l = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: listen,
                    source,
                })?;
            let join_addr = l.local_addr().map_err(|source| StartError::Bind {
                addr: listen,
                source,
            })?;
            let enrol = tonic::transport::Server::builder()
                .add_service(
                    ferry_proto::control::enrol_server::EnrolServer::new(
                        crate::grpc::enrol::EnrolService::new(core.clone()),
                    )
                    .max_decoding_message_size(64 * 1024)
                    .max_encoding_message_size(64 * 1024),
                )
                .serve_with_incoming(incoming(l, tls.join_server_config()?));
            tracing::info!(message = "Agents may join here.", addr = %join_addr);
            (Some(join_addr), Some(tokio::spawn(enrol)))
        }
    };
    let renewal = tokio::spawn(crate::certs::renew_own_certificate(
        core.clone(),
        tls.clone(),
        cfg.tls.clone(),
    ));
    let rounds = tokio::spawn(periodic_rounds(core));
    let ops = match cfg.metrics_listen {
        None => None,
        Some(listen) => {
            let mut registry = ferry_common::ops::prometheus_client::registry::Registry::default();
            registry.register_collector(Box::new(crate::metrics::NodeMetrics {
                raft: raft.clone(),
                applied: applied.clone(),
                committed,
                leader_changes,
                snapshot_file: crate::store::snapshot_file(&cfg.data_dir),
            }));
            let watched = raft.clone();
            // Ready: serving gRPC (it is, by now) and a leader known.
            let ready: ferry_common::ops::Readiness =
                Arc::new(move || match watched.metrics().borrow().current_leader {
                    Some(_) => Ok(()),
                    None => Err(
                        "no Raft leader known (an election runs, or this node is not a member yet)"
                            .into(),
                    ),
                });
            Some(
                ferry_common::ops::serve(listen, registry, ready)
                    .await
                    .map_err(|e| StartError::Bind {
                        addr: e.addr,
                        source: e.source,
                    })?,
            )
        }
    };
    Ok(RunningNode {
        addr,
        raft,
        applied,
        stop: Some(stop_tx),
        server,
        committer,
        rounds,
        health,
        renewal,
        metrics_addr: ops.as_ref().map(|o| o.addr),
        ops,
        join_addr,
        join_server,
    })
}

/// gRPC server reflection, v1 and v1alpha (`grpcurl` asks either), describing ferry's services
/// and the health service.
#[allow(clippy::type_complexity)]
fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    StartError,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ferry_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let bad = |e: tonic_reflection::server::Error| {
        StartError::Raft(format!("gRPC reflection cannot describe the services: {e}"))
    };
    Ok((
        builder().build_v1().map_err(bad)?,
        builder().build_v1alpha().map_err(bad)?,
    ))
}

/// Follows the leader this node knows, for two readers: the gRPC health service's answer
/// (`grpc.health.v1.Health`, for load balancers, probes and `grpcurl`: the node (service "")
/// and its Admin and AgentControl services serve while it knows a leader, not while an election
/// runs or it is not a member), and the metrics' count of leader changes (a new leader known,
/// or the leader lost; a node starts knowing none, so the first one it learns of counts).
async fn watch_leader(
    raft: Raft,
    reporter: tonic_health::server::HealthReporter,
    changes: Arc<std::sync::atomic::AtomicU64>,
) {
    use ferry_proto::admin::admin_server::AdminServer;
    use ferry_proto::control::agent_control_server::AgentControlServer;
    use tonic::server::NamedService;
    let mut metrics = raft.metrics();
    let mut leader = None;
    let mut serving = None;
    loop {
        let now = metrics.borrow_and_update().current_leader;
        if now != leader {
            changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            leader = now;
        }
        if serving != Some(now.is_some()) {
            let status = if now.is_some() {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for name in [
                "",
                <AdminServer<AdminService> as NamedService>::NAME,
                <AgentControlServer<AgentService> as NamedService>::NAME,
            ] {
                reporter.set_service_status(name, status).await;
            }
            serving = Some(now.is_some());
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Warnings a client can repeat as fast as it connects (or the kernel refuses accepts): one
/// line each per 30 s at most, with the number held back.
static ACCEPT_FAILED: LogLimit = LogLimit::new(Duration::from_secs(30));
static HANDSHAKE_FAILED: LogLimit = LogLimit::new(Duration::from_secs(30));
static HANDSHAKE_TIMED_OUT: LogLimit = LogLimit::new(Duration::from_secs(30));
/// How long a shutdown waits for calls in flight before it closes their connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most TLS handshakes in progress at once; further connections wait to be accepted.
const HANDSHAKES_AT_ONCE: usize = 256;

/// The connections `listener` accepts, each after its TLS handshake (TLS 1.3, a client
/// certificate from the cluster's CA) completed within [`HANDSHAKE_TIMEOUT`]; a client that
/// does not complete it is dropped without holding anything up.
///
/// Each with `TCP_NODELAY`: tonic applies its own `tcp_nodelay` default only to listeners it
/// binds itself. Without it every answer written in more than one segment (TLS records of
/// HTTP/2 headers, data, trailers) waited for the caller's ACK of the first (Nagle): a round
/// trip more per call, 150 ms and more on an intercontinental path.
fn incoming(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
) -> impl futures::Stream<
    Item = Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_AT_ONCE));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most likely: wait instead of spinning.
                    if let Some(held_back) = ACCEPT_FAILED.admit() {
                        tracing::warn!(message = "Cannot accept a connection.", error = %e, held_back);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        if let Some(held_back) = HANDSHAKE_FAILED.admit() {
                            tracing::warn!(message = "TLS handshake failed (a certificate of another CA, an expired one, or a client without TLS 1.3).", %remote, error = %e, held_back)
                        }
                    }
                    Err(_) => {
                        if let Some(held_back) = HANDSHAKE_TIMED_OUT.admit() {
                            tracing::warn!(message = "TLS handshake timed out.", %remote, held_back)
                        }
                    }
                }
            });
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
}

/// How often the leader looks for periodic sync rounds that are due.
const ROUNDS_CHECK: Duration = Duration::from_secs(1);

/// Every [`ROUNDS_CHECK`], while this node leads: starts the sync rounds that are due
/// ([`crate::state::State::rounds_due`]). A round started meanwhile by an operator or another
/// leader only makes the command refused.
async fn periodic_rounds(core: Arc<crate::grpc::Core>) {
    let mut tick = tokio::time::interval(ROUNDS_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !core.leads() {
            continue;
        }
        let now = crate::grpc::now_ms();
        for id in core.read_local(|s| s.rounds_due(now)) {
            match core
                .write(crate::state::Command::StartRound {
                    migration_id: id,
                    now_ms: now,
                })
                .await
            {
                Ok(crate::state::Response::Ok) => {
                    tracing::info!(message = "Periodic sync round started.", migration = id)
                }
                Ok(other) => {
                    tracing::debug!(message = "Periodic sync round not started.", migration = id, answer = ?other)
                }
                Err(e) => {
                    tracing::debug!(message = "Periodic sync round not proposed.", migration = id, error = %e)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    #[tokio::test]
    async fn accepted_connections_do_not_wait_for_acks_to_send() {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use std::sync::Arc;
        let pki = tempfile::tempdir().unwrap();
        let ca = ferry_common::pki::Ca::init(pki.path()).unwrap();
        let load = |id| {
            let paths = ca.issue(&id, pki.path()).unwrap();
            ferry_common::tls::TlsMaterial::load(&paths).unwrap()
        };
        let server = load(ferry_common::pki::Identity::Coordinator(1));
        let client = load(ferry_common::pki::Identity::Admin("a".into()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(super::incoming(
            listener,
            server.grpc_server_config().unwrap(),
        ));
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(&client.ca_pem).unwrap())
            .unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(&client.cert_pem).unwrap()],
            PrivateKeyDer::from_pem_slice(&client.key_pem).unwrap(),
        )
        .unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name =
            rustls::pki_types::ServerName::try_from(ferry_common::names::COORDINATOR_DNS).unwrap();
        let connecting = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp);
        let (accepted, _client) = tokio::join!(incoming.next(), connecting);
        let accepted = accepted.unwrap().unwrap();
        assert!(
            accepted.get_ref().0.nodelay().unwrap(),
            "TCP_NODELAY not set"
        );
    }
}
