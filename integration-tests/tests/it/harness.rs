//! Helpers: a test PKI, coordinators in-process or as real processes, agents, independent tree
//! comparison, and polling with deadlines.

use ferry_proto::admin::{Phase, SegmentStatus};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_agent::run::{AgentConfig, RunningAgent};
use ferry_common::config::TlsPaths;
use ferry_common::pki::{Ca, Identity};
use ferry_common::tls::TlsMaterial;
use ferry_coordinator::node::{CoordinatorConfig, RunningNode};
use ferry_integration_tests::process::coordinator_addr;
pub use ferry_integration_tests::process::DeadAddr;
use ferryctl::ctl::Ctl;

/// A test cluster's PKI and working directory.
pub struct TestEnv {
    /// Root of everything the test writes.
    pub dir: tempfile::TempDir,
    ca: Ca,
}

impl TestEnv {
    /// A new directory with a fresh CA.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = Ca::init(&dir.path().join("pki")).expect("CA");
        TestEnv { dir, ca }
    }

    /// A path below the test directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The PKI directory.
    pub fn pki(&self) -> PathBuf {
        self.path("pki")
    }

    /// Issues a certificate, or takes the one issued before for the same identity.
    pub fn issue(&self, who: Identity) -> TlsPaths {
        self.ca
            .issue_if_missing(&who, &self.pki())
            .expect("issue certificate")
    }

    /// Issues a certificate for `who` into `dir` (which gets the CA certificate too) as if
    /// signed at `signed_at`, valid for `lifetime` from then: one already partly through its
    /// life, or short-lived. Returns its files.
    pub fn issue_signed_at(
        &self,
        who: &Identity,
        dir: &Path,
        signed_at: std::time::SystemTime,
        lifetime: Duration,
    ) -> TlsPaths {
        std::fs::create_dir_all(dir).unwrap();
        if !dir.join("ca.pem").exists() {
            std::fs::copy(self.pki().join("ca.pem"), dir.join("ca.pem")).unwrap();
        }
        let (key, csr) = ferry_common::pki::request(who).unwrap();
        let (cert, _) = self
            .ca
            .sign_request(&csr, who, signed_at, lifetime)
            .unwrap();
        let paths = TlsPaths::in_dir(dir, &who.file_stem());
        ferry_common::pki::replace_file(&paths.key, key.as_bytes(), 0o600).unwrap();
        ferry_common::pki::replace_file(&paths.cert, cert.as_bytes(), 0o644).unwrap();
        paths
    }

    /// Coordinator config for node 1 on `listen`.
    pub fn coordinator_config(&self, listen: std::net::SocketAddr) -> CoordinatorConfig {
        self.node_config(1, listen, true)
    }

    /// Coordinator config for node `id`; `bootstrap` for the node that starts the cluster.
    pub fn node_config(
        &self,
        id: u64,
        listen: std::net::SocketAddr,
        bootstrap: bool,
    ) -> CoordinatorConfig {
        CoordinatorConfig {
            log_level: None,
            node_id: id,
            listen,
            data_dir: self.path(&format!("coordinator-{id}")),
            lease_ttl_secs: 30,
            bootstrap,
            // Snapshot and compact often, so that tests exercise both.
            snapshot_every: 100,
            keep_logs_after_snapshot: 10,
            metrics_listen: None,
            tls: self.issue(Identity::Coordinator(id)),
            join_listen: None,
            ca_key: None,
            agent_cert_secs: ferry_common::pki::AGENT_LIFETIME.as_secs(),
            operator_cert_secs: ferry_common::pki::OPERATOR_LIFETIME.as_secs(),
            coordinator_cert_secs: ferry_common::pki::COORDINATOR_LIFETIME.as_secs(),
        }
    }

    /// Starts a coordinator in this process on a free port.
    pub async fn coordinator(&self) -> RunningNode {
        ferry_coordinator::node::start(self.coordinator_config("127.0.0.1:0".parse().unwrap()))
            .await
            .expect("coordinator starts")
    }

    /// Agent config; `root` makes it a target.
    pub fn agent_config(
        &self,
        name: &str,
        coordinator: &str,
        root: Option<PathBuf>,
    ) -> AgentConfig {
        AgentConfig {
            log_level: None,
            name: name.to_string(),
            coordinator: coordinator.to_string(),
            data_listen: root.as_ref().map(|_| "127.0.0.1:0".parse().unwrap()),
            advertise_addr: None,
            root,
            state_dir: self.path(&format!("agent-{name}")),
            max_in_flight: 4,
            register_timeout_secs: 20,
            transport: Default::default(),
            tls: self.issue(Identity::Agent(name.to_string())),
            hooks: Default::default(),
            metrics_listen: None,
            target_store: None,
            source_store: None,
        }
    }

    /// Starts an agent in this process.
    pub async fn agent(
        &self,
        name: &str,
        coordinator: &str,
        root: Option<PathBuf>,
    ) -> RunningAgent {
        ferry_agent::run::start(self.agent_config(name, coordinator, root))
            .await
            .expect("agent starts")
    }

    /// An admin client.
    pub async fn ctl(&self, coordinator: &str) -> Ctl {
        let tls = TlsMaterial::load(&self.issue(Identity::Admin("test".into()))).unwrap();
        Ctl::connect(coordinator, &tls)
            .await
            .expect("admin connects")
    }
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

/// Polls `f` every 20 ms until it returns `Some`, or fails after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A coordinator running as a real `ferry-coordinator` process.
pub struct CoordinatorProcess {
    child: Child,
    config: PathBuf,
    log: PathBuf,
    /// Its gRPC address.
    pub addr: String,
}

impl CoordinatorProcess {
    /// Starts node 1 of `env`, bootstrapping a single-node cluster.
    pub fn start(env: &TestEnv) -> anyhow::Result<Self> {
        Self::start_node(env, 1, true)
    }

    /// Writes a config for node `id` on port 0, starts the process and reads back where it
    /// listens; the config is then pinned to that port, so a restart comes back at the address
    /// the cluster knows.
    pub fn start_node(env: &TestEnv, id: u64, bootstrap: bool) -> anyhow::Result<Self> {
        Self::start_node_with(env, id, bootstrap, "")
    }

    /// [`CoordinatorProcess::start`] with `extra` top-level keys in its config
    /// (`join_listen = "127.0.0.1:0"`).
    pub fn start_with(env: &TestEnv, extra: &str) -> anyhow::Result<Self> {
        Self::start_node_with(env, 1, true, extra)
    }

    fn start_node_with(
        env: &TestEnv,
        id: u64,
        bootstrap: bool,
        extra: &str,
    ) -> anyhow::Result<Self> {
        Self::start_node_tls(env, id, bootstrap, extra, None)
    }

    /// [`CoordinatorProcess::start_node`] with `extra` top-level config keys and, when given,
    /// other TLS files than those `env` issues (a node whose `tls.ca` has no CA key beside it
    /// signs nothing).
    pub fn start_node_tls(
        env: &TestEnv,
        id: u64,
        bootstrap: bool,
        extra: &str,
        tls: Option<TlsPaths>,
    ) -> anyhow::Result<Self> {
        let mut cfg = env.node_config(id, "127.0.0.1:0".parse()?, bootstrap);
        if let Some(tls) = tls {
            cfg.tls = tls;
        }
        let config = env.path(&format!("coordinator-{id}.toml"));
        let write = |listen: std::net::SocketAddr| {
            std::fs::write(
                &config,
                format!(
                    "node_id = {id}\nlisten = \"{listen}\"\ndata_dir = \"{}\"\nlease_ttl_secs = {}\nbootstrap = {bootstrap}\nsnapshot_every = {}\nkeep_logs_after_snapshot = {}\nmetrics_listen = \"127.0.0.1:0\"\n{extra}\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                    cfg.data_dir.display(),
                    cfg.lease_ttl_secs,
                    cfg.snapshot_every,
                    cfg.keep_logs_after_snapshot,
                    cfg.tls.ca.display(),
                    cfg.tls.cert.display(),
                    cfg.tls.key.display()
                ),
            )
        };
        write(cfg.listen)?;
        let log = env.path(&format!("coordinator-{id}.log"));
        let mut child = spawn_coordinator(&config, &log, &[])?;
        let addr = coordinator_addr(&mut child, &log)?;
        write(addr)?;
        Ok(CoordinatorProcess {
            child,
            config,
            log,
            addr: addr.to_string(),
        })
    }

    /// Where the process first started lets agents join (its config sets `join_listen`).
    pub fn join_addr(&mut self) -> anyhow::Result<std::net::SocketAddr> {
        let child = &mut self.child;
        ferry_integration_tests::process::logged_addr(
            &self.log,
            "Agents may join here.",
            Duration::from_secs(30),
            || !matches!(child.try_wait(), Ok(None)),
        )
    }

    /// Where the process first started serves `/metrics`, `/livez` and `/readyz` (read from its
    /// log; the test configs bind port 0).
    pub fn metrics_addr(&mut self) -> anyhow::Result<std::net::SocketAddr> {
        let child = &mut self.child;
        ferry_integration_tests::process::logged_addr(
            &self.log,
            "Metrics serving.",
            Duration::from_secs(30),
            || !matches!(child.try_wait(), Ok(None)),
        )
    }

    /// `kill -9`, then waits for the process to be gone.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the process again from the same config and data directory.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.restart_with_env(&[])
    }

    /// [`CoordinatorProcess::restart`] with environment variables `vars` (`FAILPOINTS`).
    pub fn restart_with_env(&mut self, vars: &[(&str, &str)]) -> anyhow::Result<()> {
        self.child = spawn_coordinator(&self.config, &self.log, vars)?;
        Ok(())
    }

    /// The child process.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_coordinator(config: &Path, log: &Path, vars: &[(&str, &str)]) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Command::new(env!("CARGO_BIN_EXE_it-coordinator"))
        .args(["run", "--config"])
        .arg(config)
        .envs(vars.iter().copied())
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("spawn coordinator")
}

/// Path of the `ferryctl` binary built for tests.
pub fn ferryctl_bin() -> &'static str {
    env!("CARGO_BIN_EXE_it-ferryctl")
}

/// Path of the `ferry-agent` binary built for tests.
pub fn agent_bin() -> &'static str {
    env!("CARGO_BIN_EXE_it-agent")
}

pub use ferry_integration_tests::tree::{
    assert_same as assert_same_tree, describe as describe_tree, Node,
};

/// Writes `count` files of `size` bytes (deterministic contents) under `dir`, spread over
/// subdirectories.
pub fn make_files(dir: &Path, count: usize, size: usize) {
    let mut rng = blake3::Hasher::new_derive_key("ferry integration test data").finalize_xof();
    for i in 0..count {
        let p = dir.join(format!("d{:02}/f{i:05}.bin", i % 17));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let mut data = vec![0u8; size];
        rng.fill(&mut data);
        std::fs::write(p, data).unwrap();
    }
}

impl TestEnv {
    /// An admin client, or `None` while the coordinator is unreachable.
    pub async fn ctl_try(&self, coordinator: &str) -> Option<Ctl> {
        let tls = TlsMaterial::load(&self.issue(Identity::Admin("test".into()))).ok()?;
        Ctl::connect(coordinator, &tls).await.ok()
    }

    /// A raw gRPC channel to the coordinator at `addr` as `who` (for calls ferryctl does not
    /// make: health, reflection, hostile requests).
    pub async fn channel(
        &self,
        addr: &str,
        who: Identity,
    ) -> anyhow::Result<tonic::transport::Channel> {
        let tls = TlsMaterial::load(&self.issue(who))?;
        Ok(
            tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
                .tls_config(tls.grpc_client())?
                .connect()
                .await?,
        )
    }
}

/// The migration the tests run: agent "source" to agent "target", 256 KiB segments.
pub fn migration_spec(src: &Path, target_path: &str) -> ferry_proto::admin::MigrationSpec {
    ferry_proto::admin::MigrationSpec {
        source_agent: "source".into(),
        source_path: src.to_string_lossy().into_owned(),
        target_agent: "target".into(),
        target_path: target_path.into(),
        segment_size: 256 * 1024,
        xattrs: false,
        max_attempts: 0,
        excludes: Vec::new(),
        ..Default::default()
    }
}

/// Waits until migration `id` has at least `n` verified segments.
pub async fn wait_verified(ctl: &Ctl, id: u64, n: u64) {
    wait_for(
        "segments to be verified",
        Duration::from_secs(120),
        || async { (ctl.status(id).await.ok()?.segments_verified >= n).then_some(()) },
    )
    .await;
}

/// How a migration ended.
pub struct Finished {
    /// Its progress when it ended.
    pub progress: ferry_proto::admin::MigrationProgress,
    /// Its verification, every segment listed.
    pub verify: ferry_proto::admin::VerifyMigrationResponse,
}

/// Waits up to `timeout` for migration `id` to end, and checks what every finished migration
/// must show: phase done, every segment verified, no hash mismatch. `log` says what to print
/// beside a failure (a process's log, say).
pub async fn finished(ctl: &Ctl, id: u64, timeout: Duration, log: &dyn Fn() -> String) -> Finished {
    let progress = ctl
        .watch(id, timeout, |_, _| {})
        .await
        .unwrap_or_else(|e| panic!("migration {id} did not finish: {e}\n{}", log()));
    assert_eq!(
        progress.phase(),
        Phase::Done,
        "migration {id} ended {progress:?}\n{}",
        log()
    );
    let verify = ctl.verify(id, u32::MAX).await.unwrap();
    assert!(
        verify.all_verified && verify.hash_mismatches == 0,
        "migration {id} is done but not all verified: {verify:?}"
    );
    Finished { progress, verify }
}

/// Every segment verified in `before` has the same lease count and hash in `after`: it was
/// not sent again.
pub fn assert_not_resent(
    before: &ferry_proto::admin::VerifyMigrationResponse,
    after: &ferry_proto::admin::VerifyMigrationResponse,
) {
    let after: std::collections::HashMap<u64, _> =
        after.segments.iter().map(|s| (s.segment_id, s)).collect();
    let mut checked = 0;
    for s in before
        .segments
        .iter()
        .filter(|s| s.state() == SegmentStatus::Verified)
    {
        let a = after[&s.segment_id];
        assert_eq!(
            a.leases, s.leases,
            "segment {} was verified before, but leased again",
            s.segment_id
        );
        assert_eq!(a.source_blake3, s.source_blake3);
        checked += 1;
    }
    assert!(checked > 0, "nothing was verified before");
}

/// A source tree of 300 files and a source and a target agent that know `coordinators`.
pub struct Agents {
    /// The source tree.
    pub src: PathBuf,
    /// The target agent's root.
    pub root: PathBuf,
    /// The source agent (two segments in flight).
    pub source: RunningAgent,
    /// The target agent.
    pub target: RunningAgent,
}

impl TestEnv {
    /// Starts [`Agents`].
    pub async fn agent_pair(&self, coordinators: &str) -> Agents {
        let src = self.path("src");
        make_files(&src, 300, 48 * 1024);
        let root = self.path("dst");
        let target = self.agent("target", coordinators, Some(root.clone())).await;
        let mut cfg = self.agent_config("source", coordinators, None);
        cfg.max_in_flight = 2;
        let source = ferry_agent::run::start(cfg).await.unwrap();
        Agents {
            src,
            root,
            source,
            target,
        }
    }
}

/// A test that needs what this machine lacks (root, network namespaces, a tmpfs mount) says
/// SKIPPED and passes, unless `FERRY_TESTS_REQUIRE_ALL=1` (set by `.ci/run`, which runs as
/// root): then a silent skip would hide a broken setup, so it fails.
pub fn skip(why: &str) {
    if std::env::var("FERRY_TESTS_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("{why}; FERRY_TESTS_REQUIRE_ALL=1 says this machine must be able to run it");
    }
    eprintln!("SKIPPED: {why}");
}

/// Sets the agent throttle of `agent` (running in this process as `running`) to `rate` and waits
/// until it applies it.
pub async fn throttle_agent(
    ctl: &Ctl,
    running: &ferry_agent::run::RunningAgent,
    agent: &str,
    rate: &str,
) {
    ctl.set_throttle("", agent, rate).await.unwrap();
    wait_for(
        "the agent to learn its throttle",
        Duration::from_secs(20),
        || async {
            running
                .throttles
                .rate_at(ferry_agent::throttle::Scope::Agent, 0)
                .is_some()
                .then_some(())
        },
    )
    .await;
}
