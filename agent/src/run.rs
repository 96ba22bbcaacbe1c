//! A running agent: config, start-up, and shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_common::config::TlsPaths;
use ferry_common::rate::Rate;
use ferry_common::tls::TlsMaterial;
use ferry_common::transport::{Congestion, Transport};
use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use backon::Retryable;

use crate::control::Control;
use crate::dial::QuicDialer;
use crate::sink::object::ObjectSink;
use crate::sink::FsSink;
use crate::source::Source;
use crate::stats::Stats;
use crate::target::Target;
use crate::throttle::Throttles;

/// An agent's configuration (`/etc/ferry/agent.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Name; must match its certificate.
    pub name: String,
    /// What is logged: a level (`info`, `debug`) or `RUST_LOG`-style directives
    /// (`info,ferry_agent=debug`); default `info`. `RUST_LOG` overrides it. Changed by SIGHUP
    /// (`systemctl reload ferry-agent`) without a restart.
    #[serde(default)]
    pub log_level: Option<String>,
    /// Coordinator gRPC address (`host:port`).
    pub coordinator: String,
    /// QUIC listen address when this agent can be a target.
    #[serde(default)]
    pub data_listen: Option<SocketAddr>,
    /// Address sources dial (`ip:port`), when it differs from the bound one (NAT, 0.0.0.0).
    /// Absent or empty: the bound address, or when that is a wildcard, the address this host
    /// uses to reach the coordinator with the bound port (logged at start).
    #[serde(default)]
    pub advertise_addr: Option<String>,
    /// Root below which a target writes.
    #[serde(default)]
    pub root: Option<PathBuf>,
    /// A target that writes into an object store instead of below `root` (`[target_store]`:
    /// `url`, `options`).
    #[serde(default)]
    pub target_store: Option<crate::sink::object::StoreConfig>,
    /// Settings for the object stores migrations read from (a source path that is a URL,
    /// `s3://bucket/prefix`): `[source_store]` `options`, `retry_timeout_secs`.
    #[serde(default)]
    pub source_store: Option<crate::objsource::SourceStoreSettings>,
    /// Local state (source manifests).
    pub state_dir: PathBuf,
    /// Segments sent concurrently.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: u32,
    /// How long to keep trying to register at start-up before giving up.
    #[serde(default = "default_register_timeout")]
    pub register_timeout_secs: u64,
    /// How data connections are tuned (`[transport]`).
    #[serde(default)]
    pub transport: TransportSettings,
    /// TLS files.
    pub tls: TlsPaths,
    /// HTTP address serving `/metrics` (Prometheus), `/livez` and `/readyz` (plain HTTP: bind
    /// it to a management network or loopback). Absent: not served.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Commands this agent runs for cutovers (`[hooks]`: `pre_freeze` and `rollback` on a
    /// source, `switch` on a target, `timeout_secs`).
    #[serde(default)]
    pub hooks: crate::cutover::Hooks,
}

impl ferry_common::config::DaemonConfig for AgentConfig {
    const ENV_PREFIX: &'static str = "FERRY_AGENT_";
    const ENV_SECTIONS: &'static [&'static str] = &["tls", "transport", "hooks", "target_store"];
    fn log_level(&self) -> Option<&str> {
        self.log_level.as_deref()
    }
}

/// The `[transport]` section: the congestion controller this agent's data connections run
/// (it decides at the sending end, so a source's choice is the one that counts) and, when the
/// path is known, its bandwidth and round-trip time, from which the windows are sized.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportSettings {
    /// `bbr` (default), `cubic` or `newreno`.
    #[serde(default)]
    pub congestion: Congestion,
    /// The path's bottleneck bandwidth, e.g. `1gbit`.
    #[serde(default)]
    pub path_bandwidth: Option<Rate>,
    /// The path's round-trip time in milliseconds.
    #[serde(default)]
    pub path_rtt_ms: Option<u64>,
}

impl TransportSettings {
    /// The transport: windows from the bandwidth-delay product when both are given, else the
    /// defaults.
    pub fn transport(&self) -> Result<Transport, StartError> {
        match (self.path_bandwidth, self.path_rtt_ms) {
            (Some(bw), Some(rtt)) => Ok(Transport::for_path(
                self.congestion,
                bw.0,
                Duration::from_millis(rtt),
            )),
            (None, None) => Ok(Transport {
                congestion: self.congestion,
                ..Transport::default()
            }),
            _ => Err(StartError::Config(
                "[transport] path_bandwidth and path_rtt_ms size the windows together: give both or neither".into(),
            )),
        }
    }
}

fn default_in_flight() -> u32 {
    16
}

fn default_register_timeout() -> u64 {
    60
}

/// Serves segments into `sink` on `endpoint` until `stop`.
fn serve<S: crate::sink::Sink>(
    sink: Arc<S>,
    control: &Control,
    stats: &Arc<Stats>,
    endpoint: quinn::Endpoint,
    probes: &Arc<crate::probe::Answerer>,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let target = Arc::new(Target {
        probes: Some(probes.clone()),
        headers: tokio::sync::Semaphore::new(32),
        sink,
        control: control.clone(),
        stats: stats.clone(),
        header_timeout: crate::target::HEADER_TIMEOUT,
        stall_timeout: crate::target::STALL_TIMEOUT,
    });
    tokio::spawn(target.serve(endpoint, stop))
}

/// The UDP receive buffer a data endpoint asks for: at a gigabit per second, a process
/// descheduled for a few milliseconds must find its datagrams waiting, not dropped (a drop is a
/// loss to QUIC: a retransmission, and a congestion controller backing off). Linux's default
/// (about 200 KiB) overflows within 2 ms at 1 Gbit/s.
pub const UDP_RECV_BUFFER: usize = 8 << 20;

/// A QUIC endpoint on `addr` (a server when `server` is given), its socket's receive buffer
/// raised to [`UDP_RECV_BUFFER`]: forced when the agent may (root), else as far as
/// `net.core.rmem_max` allows, which is said once in the log when it is less.
fn data_endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    use rustix::net::sockopt;
    let socket = std::net::UdpSocket::bind(addr)?;
    if sockopt::set_socket_recv_buffer_size_force(&socket, UDP_RECV_BUFFER).is_err() {
        sockopt::set_socket_recv_buffer_size(&socket, UDP_RECV_BUFFER)?;
    }
    // Linux reports twice what was set (its own bookkeeping included).
    let got = sockopt::socket_recv_buffer_size(&socket)? / 2;
    if got < UDP_RECV_BUFFER {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            tracing::info!(
                message = "The UDP receive buffer is smaller than asked: datagrams may be dropped on fast paths. Raise net.core.rmem_max (sysctl) to at least the asked size.",
                bytes = got,
                asked = UDP_RECV_BUFFER
            )
        });
    }
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)
}

/// Where a target writes.
enum TargetSink {
    Fs(Arc<FsSink>),
    Object(Arc<ObjectSink>),
}

/// Starting the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad config value.
    #[error("invalid agent config: {0}")]
    Config(String),
    /// TLS material.
    #[error(transparent)]
    Tls(#[from] ferry_common::tls::TlsError),
    /// The target root is unusable.
    #[error(transparent)]
    Sink(#[from] crate::sink::SinkError),
    /// A socket could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Error.
        source: std::io::Error,
    },
    /// The coordinator could not be reached or refused registration.
    #[error("cannot register with the coordinator: {0}; check `coordinator` in the config and that the coordinator runs")]
    Register(#[from] crate::control::ControlError),
    /// Another process already runs as this agent.
    #[error("another process already runs as agent {name}: {reason}")]
    AlreadyRunning {
        /// The agent's name.
        name: String,
        /// What the coordinator or the state directory lock said.
        reason: String,
    },
}

/// In the state directory: held locked (flock) while a process runs from it, so two processes
/// never share manifests, part files or a session.
const LOCK_FILE: &str = "agent.lock";
/// In the state directory: the session of the process that runs (or ran last) from it. A
/// process that got the lock knows that one has ended and tells the coordinator, which then
/// accepts it at once instead of waiting for that session to expire (a restart after SIGKILL).
const SESSION_FILE: &str = "session";
/// In the state directory: the cluster it was last used for (informational: state is keyed by
/// cluster id, so another cluster's is never used).
const CLUSTER_FILE: &str = "cluster-id";

/// Locks `state_dir` for this process (released when the file is closed, also by the kernel
/// when the process dies).
fn lock_state_dir(name: &str, state_dir: &std::path::Path) -> Result<std::fs::File, StartError> {
    let path = state_dir.join(LOCK_FILE);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StartError::Config(format!("cannot open {}: {e}", path.display())))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(StartError::AlreadyRunning {
            name: name.to_string(),
            reason: format!(
                "another ferry-agent process runs from state_dir {} (it holds {}); stop it, or \
                 give this one its own state_dir and identity",
                state_dir.display(),
                path.display()
            ),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(StartError::Config(format!(
            "cannot lock {}: {e}",
            path.display()
        ))),
    }
}

/// Records in `state_dir` which cluster this agent works for, and says so when the state
/// directory belonged to another (the coordinators' data was wiped and a new cluster made):
/// that cluster's state stays where it is, keyed by its id, and is never used for this one.
fn note_cluster(state_dir: &std::path::Path, cluster: &str) {
    let path = state_dir.join(CLUSTER_FILE);
    let before = std::fs::read_to_string(&path).unwrap_or_default();
    let before = before.trim();
    if before == cluster {
        return;
    }
    if !before.is_empty() {
        tracing::warn!(
            message = "This agent's state directory holds state of another cluster; it is not used for this one (remove it to reclaim space).",
            old_cluster = %before,
            cluster = %cluster,
            old_state = %crate::source::cluster_dir(state_dir, before).display()
        );
    }
    let tmp = state_dir.join(format!("{CLUSTER_FILE}.tmp"));
    let written = std::fs::write(&tmp, cluster).and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::warn!(message = "Cannot record the cluster id.", path = %path.display(), error = %e);
    }
}

/// The session recorded in `state_dir` by the previous process, if any.
fn previous_session(state_dir: &std::path::Path) -> u64 {
    std::fs::read_to_string(state_dir.join(SESSION_FILE))
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
        .unwrap_or(0)
}

/// Records this process's session in `state_dir` (before registering: a process killed right
/// after registering must still be known to its successor).
fn record_session(state_dir: &std::path::Path, session: u64) -> std::io::Result<()> {
    let tmp = state_dir.join(format!("{SESSION_FILE}.tmp"));
    std::fs::write(&tmp, format!("{session:016x}\n"))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, state_dir.join(SESSION_FILE))
}

/// The address sources dial to reach a target bound to `bound`: `advertise` when set (it must be
/// an `ip:port` a peer can dial), the bound address when it is a specific one, else the address
/// this host uses to reach the coordinator, with the bound port.
async fn data_address(
    advertise: Option<&str>,
    bound: SocketAddr,
    coordinator: &str,
) -> Result<SocketAddr, StartError> {
    if let Some(a) = advertise.map(str::trim).filter(|a| !a.is_empty()) {
        return match a.parse::<SocketAddr>() {
            Ok(addr) if !addr.ip().is_unspecified() && addr.port() != 0 => Ok(addr),
            _ => Err(StartError::Config(format!(
                "advertise_addr {a:?} is not an address sources can dial: give the IP address \
                 and port they reach this agent at, e.g. \"10.0.0.21:{}\"",
                bound.port()
            ))),
        };
    }
    if !bound.ip().is_unspecified() {
        return Ok(bound);
    }
    let mut why = String::from("no coordinator address");
    for one in coordinator
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        match route_source_ip(one).await {
            Ok(ip) => return Ok(SocketAddr::new(ip, bound.port())),
            Err(e) => why = format!("route to the coordinator at {one}: {e}"),
        }
    }
    Err(StartError::Config(format!(
        "data_listen {bound} listens on every address and advertise_addr is empty, and no address \
         could be derived ({why}): set advertise_addr to the IP address and port sources reach \
         this agent at"
    )))
}

/// The local IP address this host sends from to reach `peer` (`host:port`): connecting a UDP
/// socket picks the route without sending anything.
async fn route_source_ip(peer: &str) -> std::io::Result<std::net::IpAddr> {
    let to = tokio::net::lookup_host(peer)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other("the name resolves to no address"))?;
    let any: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid")
    } else {
        "[::]:0".parse().expect("valid")
    };
    let sock = std::net::UdpSocket::bind(any)?;
    sock.connect(to)?;
    let ip = sock.local_addr()?.ip();
    if ip.is_unspecified() {
        return Err(std::io::Error::other("no route"));
    }
    Ok(ip)
}

/// A running agent.
pub struct RunningAgent {
    /// Where `/metrics`, `/livez` and `/readyz` are served, if they are.
    pub metrics_addr: Option<SocketAddr>,
    /// The cutover hooks in force (SIGHUP replaces them).
    pub hooks: crate::cutover::LiveHooks,
    /// The bound QUIC data address, if a target.
    pub data_addr: Option<SocketAddr>,
    /// The address it registered for sources to dial (empty if not a target).
    pub advertised: String,
    /// Counters.
    pub stats: Arc<Stats>,
    /// The throttles in force as a source (learnt from the coordinator).
    pub throttles: Arc<Throttles>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    control: Control,
    /// The state directory lock, held until the agent has stopped.
    _lock: std::fs::File,
    /// The metrics endpoint, if served (stops when the agent is dropped).
    _ops: Option<ferry_common::ops::OpsServer>,
}

impl RunningAgent {
    /// Stops the agent: in-flight segments are abandoned (never half-recorded: a segment is only
    /// recorded once its bytes are durable), leases are released, connections closed.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.control.close_reports().await;
        // Last: the leases above were released under this session.
        match tokio::time::timeout(Duration::from_secs(3), self.control.end_session()).await {
            Ok(Ok(())) => tracing::info!(message = "Session ended."),
            Ok(Err(e)) => {
                tracing::warn!(message = "Could not end the session; it expires by itself.", error = %e)
            }
            Err(_) => tracing::warn!(
                message =
                    "The coordinator did not answer the end of the session; it expires by itself."
            ),
        }
    }
}

/// Starts an agent: registers with the coordinator, then runs the target server (if configured)
/// and the source loop.
pub async fn start(cfg: AgentConfig) -> Result<RunningAgent, StartError> {
    ferry_common::names::validate_name(&cfg.name).map_err(|e| StartError::Config(e.to_string()))?;
    ferry_common::renewal::finish_renewal(&cfg.tls);
    let tls = TlsMaterial::load(&cfg.tls)?;
    let transport = cfg.transport.transport()?;
    tracing::info!(message = "Data transport.", congestion = %transport.congestion, window_bytes = transport.window);
    std::fs::create_dir_all(&cfg.state_dir).map_err(|e| {
        StartError::Config(format!(
            "cannot create state_dir {}: {e}",
            cfg.state_dir.display()
        ))
    })?;
    let lock = lock_state_dir(&cfg.name, &cfg.state_dir)?;
    let control = Control::new(&cfg.name, &cfg.coordinator, &tls)?
        .succeeding(previous_session(&cfg.state_dir));
    control.check_revocations(&tls);
    control.follow_ca(&tls, cfg.tls.ca.clone());
    record_session(&cfg.state_dir, control.session()).map_err(|e| {
        StartError::Config(format!(
            "cannot write {}: {e}",
            cfg.state_dir.join(SESSION_FILE).display()
        ))
    })?;
    let stats = Arc::new(Stats::default());
    let connections = crate::dial::Connections::default();
    // Ready once registered (and, for a target, listening): until then `/readyz` says why not.
    let is_registered = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ops = match cfg.metrics_listen {
        None => None,
        Some(listen) => {
            let mut registry = ferry_common::ops::prometheus_client::registry::Registry::default();
            registry.register_collector(Box::new(crate::metrics::AgentMetrics {
                stats: stats.clone(),
                connections: connections.clone(),
            }));
            let registered = is_registered.clone();
            let ready: ferry_common::ops::Readiness = Arc::new(move || {
                if registered.load(std::sync::atomic::Ordering::Relaxed) {
                    Ok(())
                } else {
                    Err("not registered with the coordinator yet".into())
                }
            });
            Some(
                ferry_common::ops::serve(listen, registry, ready)
                    .await
                    .map_err(|e| StartError::Config(e.to_string()))?,
            )
        }
    };
    let (stop, stop_rx) = watch::channel(false);
    // Probes this agent must answer as a target: the job runner learns them from heartbeats.
    let (expected_probes, expected_rx) = watch::channel(crate::probe::Expected::new());
    let answerer = Arc::new(crate::probe::Answerer::new(expected_rx));
    let mut tasks = Vec::new();

    // The certificate is renewed while the agent runs (a third of its lifetime left).
    tasks.push(tokio::spawn(crate::enrol::renew_certificates(
        control.clone(),
        tls.clone(),
        cfg.tls.clone(),
        stop_rx.clone(),
    )));

    let mut data_addr = None;
    let mut advertised = String::new();
    let mut applies_owners = false;
    // The target root as the sink resolved it (absolute, symlinks resolved), registered so a
    // fallback can tell where a migration's copy lies on this agent.
    let mut target_root = String::new();
    // A target writing into an object store verifies by reading it back.
    let mut store_sink: Option<Arc<ObjectSink>> = None;
    let mut fs_sink: Option<Arc<FsSink>> = None;
    if let Some(listen) = cfg.data_listen {
        let sink = match (&cfg.root, &cfg.target_store) {
            (Some(root), None) => {
                let sink = Arc::new(FsSink::new(root, &cfg.state_dir)?);
                target_root = std::fs::canonicalize(root)
                    .unwrap_or_else(|_| root.clone())
                    .to_string_lossy()
                    .into_owned();
                {
                    let sink = sink.clone();
                    tokio::task::spawn_blocking(move || {
                        let removed = sink.sweep_stale_temporaries();
                        if removed > 0 {
                            tracing::info!(
                                message = "Removed temporaries an earlier process left (their segments are sent again).",
                                removed
                            );
                        }
                    });
                }
                applies_owners = sink.applies_owner();
                fs_sink = Some(sink.clone());
                if !applies_owners {
                    tracing::warn!(
                        message = "Not running as root: files received keep this agent's user as owner (uid/gid not applied) and lose set-id bits."
                    );
                }
                TargetSink::Fs(sink)
            }
            (None, Some(store)) => {
                let sink = ObjectSink::open(store, &cfg.state_dir).await?;
                target_root = store.url.clone();
                tracing::info!(message = "Target writes to an object store.", url = %store.url);
                let sink = Arc::new(sink);
                store_sink = Some(sink.clone());
                TargetSink::Object(sink)
            }
            (Some(_), Some(_)) => {
                return Err(StartError::Config(
                    "root and [target_store] are both set: a target writes either below a directory or into an object store".into(),
                ))
            }
            (None, None) => {
                return Err(StartError::Config(
                    "data_listen is set but neither root nor [target_store] is: a target needs somewhere to write".into(),
                ))
            }
        };
        let endpoint =
            data_endpoint(listen, Some(tls.quic_server_with(&transport)?)).map_err(|source| {
                StartError::Bind {
                    addr: listen,
                    source,
                }
            })?;
        let bound = endpoint.local_addr().map_err(|source| StartError::Bind {
            addr: listen,
            source,
        })?;
        data_addr = Some(bound);
        let addr = data_address(cfg.advertise_addr.as_deref(), bound, &cfg.coordinator).await?;
        if cfg
            .advertise_addr
            .as_deref()
            .is_none_or(|a| a.trim().is_empty())
            && bound.ip().is_unspecified()
        {
            tracing::info!(
                message = "No advertise_addr: sources will dial the address this host reaches the coordinator from; set advertise_addr to override.",
                data_listen = %bound,
                advertised = %addr
            );
        }
        advertised = addr.to_string();
        let stop = stop_rx.clone();
        tasks.push(match sink {
            TargetSink::Fs(sink) => serve(sink, &control, &stats, endpoint, &answerer, stop),
            TargetSink::Object(sink) => serve(sink, &control, &stats, endpoint, &answerer, stop),
        });
    }

    // Register, retrying while the coordinator is unreachable, up to the configured time.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(cfg.register_timeout_secs);
    let registered = (|| control.register(&advertised, applies_owners, &transport, &target_root))
        .retry(ferry_common::retry::policy(
            Duration::from_millis(100),
            Duration::from_secs(5),
        ))
        .when(|e| e.is_transient() && tokio::time::Instant::now() < deadline)
        .notify(|e, _| {
            tracing::warn!(message = "Coordinator not reachable yet; retrying.", coordinator = %cfg.coordinator, error = %e)
        })
        .await;
    match registered {
        Ok(cluster) => note_cluster(&cfg.state_dir, &cluster),
        Err(e) => {
            let _ = stop.send(true);
            for t in tasks {
                let _ = t.await;
            }
            if let crate::control::ControlError::Call { status, .. } = &e {
                if status.code() == tonic::Code::AlreadyExists {
                    return Err(StartError::AlreadyRunning {
                        name: cfg.name.clone(),
                        reason: status.message().to_string(),
                    });
                }
            }
            return Err(StartError::Register(e));
        }
    }
    is_registered.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        message = "Agent registered.",
        name = %cfg.name,
        data_addr = %advertised,
        session = %format!("{:016x}", control.session())
    );

    let client_endpoint = data_endpoint("0.0.0.0:0".parse().expect("valid address"), None)
        .map_err(|source| StartError::Bind {
            addr: "0.0.0.0:0".parse().expect("valid address"),
            source,
        })?;
    let throttles = Arc::new(Throttles::default());
    let mut cutover = crate::cutover::CutoverRunner::new(
        control.clone(),
        cfg.hooks.clone(),
        cfg.state_dir.clone(),
        cfg.root.clone(),
    );
    let jobs = Arc::new(
        crate::jobs::JobRunner::new(
            control.clone(),
            Some(crate::jobs::Prober {
                endpoint: client_endpoint.clone(),
                tls: tls.clone(),
                window: transport.window,
            }),
            expected_probes,
        )
        .with_state_dir(cfg.state_dir.clone())
        .with_hooks(cutover.live_hooks()),
    );
    {
        let (jobs, mut stop) = (jobs.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let _ = stop.wait_for(|s| *s).await;
            jobs.stop();
        });
    }
    let forgetter = Arc::new(crate::forget::Forgetter::new(
        cfg.state_dir.clone(),
        fs_sink,
        store_sink.clone(),
    ));
    if let Some(sink) = store_sink {
        cutover = cutover.with_store(sink);
    }
    let hooks = cutover.live_hooks();
    let cutover = Arc::new(cutover);
    let source = Arc::new(
        Source::new(
            control.clone(),
            QuicDialer::new(
                client_endpoint,
                tls.quic_client_with(&transport)?,
                connections,
            ),
            cfg.state_dir.clone(),
            cfg.max_in_flight,
            stats.clone(),
            throttles.clone(),
        )
        .with_cutover(cutover)
        .with_forgetter(forgetter)
        .with_jobs(jobs)
        .with_store_sources(cfg.source_store.clone().unwrap_or_default()),
    );
    tasks.push(tokio::spawn(source.run(stop_rx)));
    Ok(RunningAgent {
        hooks,
        metrics_addr: ops.as_ref().map(|o| o.addr),
        _ops: ops,
        data_addr,
        advertised,
        stats,
        throttles,
        stop,
        tasks,
        control,
        _lock: lock,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml_text: &str) -> Result<TransportSettings, toml::de::Error> {
        toml::from_str(toml_text)
    }

    #[test]
    fn the_transport_section_chooses_the_controller_and_sizes_the_windows() {
        let t = settings("").unwrap().transport().unwrap();
        assert_eq!(t, Transport::default());
        assert_eq!(t.congestion, Congestion::Bbr);
        let t = settings("congestion = \"cubic\"\npath_bandwidth = \"1gbit\"\npath_rtt_ms = 250")
            .unwrap()
            .transport()
            .unwrap();
        assert_eq!((t.congestion, t.window), (Congestion::Cubic, 62_500_000));
        let half = settings("path_rtt_ms = 250").unwrap().transport();
        assert!(matches!(half, Err(StartError::Config(m)) if m.contains("give both or neither")));
        let e = settings("congestion = \"vegas\"").unwrap_err().to_string();
        assert!(e.contains("vegas"), "{e}");
        let e = settings("path_bandwidth = \"fast\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad rate"), "{e}");
    }
}
