//! A running agent: config, start-up, and shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_common::config::TlsPaths;
use ferry_common::tls::TlsMaterial;
use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::control::Control;
use crate::sink::FsSink;
use crate::source::Source;
use crate::stats::Stats;
use crate::target::Target;

/// An agent's configuration (`/etc/ferry/agent.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Name; must match its certificate.
    pub name: String,
    /// Coordinator gRPC address (`host:port`).
    pub coordinator: String,
    /// QUIC listen address when this agent can be a target.
    #[serde(default)]
    pub data_listen: Option<SocketAddr>,
    /// Address sources dial, when it differs from the bound one (NAT, 0.0.0.0).
    #[serde(default)]
    pub advertise_addr: Option<String>,
    /// Root below which a target writes.
    #[serde(default)]
    pub root: Option<PathBuf>,
    /// Local state (source manifests).
    pub state_dir: PathBuf,
    /// Segments sent concurrently.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: u32,
    /// How long to keep trying to register at start-up before giving up.
    #[serde(default = "default_register_timeout")]
    pub register_timeout_secs: u64,
    /// TLS files.
    pub tls: TlsPaths,
}

fn default_in_flight() -> u32 {
    16
}

fn default_register_timeout() -> u64 {
    60
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
}

/// A running agent.
pub struct RunningAgent {
    /// The bound QUIC data address, if a target.
    pub data_addr: Option<SocketAddr>,
    /// Counters.
    pub stats: Arc<Stats>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningAgent {
    /// Stops the agent: in-flight segments are abandoned (never half-recorded: a segment is only
    /// recorded once its bytes are durable), leases are released, connections closed.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Starts an agent: registers with the coordinator, then runs the target server (if configured)
/// and the source loop.
pub async fn start(cfg: AgentConfig) -> Result<RunningAgent, StartError> {
    ferry_common::names::validate_name(&cfg.name).map_err(|e| StartError::Config(e.to_string()))?;
    let tls = TlsMaterial::load(&cfg.tls)?;
    std::fs::create_dir_all(&cfg.state_dir).map_err(|e| {
        StartError::Config(format!(
            "cannot create state_dir {}: {e}",
            cfg.state_dir.display()
        ))
    })?;
    let control = Control::new(&cfg.name, &cfg.coordinator, &tls)?;
    let stats = Arc::new(Stats::default());
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();

    let mut data_addr = None;
    let mut advertised = String::new();
    if let Some(listen) = cfg.data_listen {
        let root = cfg.root.as_ref().ok_or_else(|| {
            StartError::Config("data_listen is set but root is not: a target needs a root".into())
        })?;
        let sink = Arc::new(FsSink::new(root, &cfg.state_dir)?);
        let endpoint = quinn::Endpoint::server(tls.quic_server()?, listen).map_err(|source| {
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
        advertised = cfg
            .advertise_addr
            .clone()
            .unwrap_or_else(|| bound.to_string());
        let target = Arc::new(Target {
            headers: tokio::sync::Semaphore::new(32),
            sink,
            control: control.clone(),
            stats: stats.clone(),
        });
        tasks.push(tokio::spawn(target.serve(endpoint, stop_rx.clone())));
    }

    // Register, retrying while the coordinator is unreachable, up to the configured time.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(cfg.register_timeout_secs);
    let mut delay = Duration::from_millis(100);
    loop {
        match control.register(&advertised).await {
            Ok(()) => break,
            Err(e) if e.is_transient() && tokio::time::Instant::now() + delay < deadline => {
                tracing::warn!(message = "Coordinator not reachable yet; retrying.", coordinator = %cfg.coordinator, error = %e);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                let _ = stop.send(true);
                for t in tasks {
                    let _ = t.await;
                }
                return Err(StartError::Register(e));
            }
        }
    }
    tracing::info!(message = "Agent registered.", name = %cfg.name, data_addr = %advertised);

    let client_endpoint = quinn::Endpoint::client("0.0.0.0:0".parse().expect("valid address"))
        .map_err(|source| StartError::Bind {
            addr: "0.0.0.0:0".parse().expect("valid address"),
            source,
        })?;
    let source = Arc::new(Source::new(
        control,
        client_endpoint,
        tls.quic_client()?,
        cfg.state_dir.clone(),
        cfg.max_in_flight,
        stats.clone(),
    ));
    tasks.push(tokio::spawn(source.run(stop_rx)));
    Ok(RunningAgent {
        data_addr,
        stats,
        stop,
        tasks,
    })
}
