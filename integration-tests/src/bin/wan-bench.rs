//! ferry side by side with rsync, scp and rclone (and a raw QUIC blast, the transport ceiling) on
//! the same data over the same emulated WAN path. Run it from a release build, as root:
//!
//! ```sh
//! apt-get install -y rsync openssh-server openssh-client rclone   # the peers
//! cargo build --release -p ferry-integration-tests --bins
//! target/release/wan-bench --profile lan --dataset checkpoint --size quick
//! ```
//!
//! Side A of the path (a network namespace) is the source host, side B the target host: sshd,
//! ferry's coordinator and target agent, and the QUIC sink run in B; rsync, scp, rclone, ferry's
//! source agent and the QUIC blaster in A. Every copy is checked against the source
//! independently (a copy that differs is reported as failed, not timed). Runs are interleaved
//! (tool A, tool B, …, then again) and each figure is the median of the successful runs.

use ferry_proto::admin::Phase;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use ferry_common::names;
use ferry_common::pki::{Ca, Identity};
use ferry_common::tls::TlsMaterial;
use ferry_integration_tests::bench::dataset::{self, Kind, Size};
use ferry_integration_tests::bench::measure::{machine_cpu_secs, own_cpu_secs, RssSampler};
use ferry_integration_tests::tree::{self, Fidelity};
use ferry_integration_tests::wan::{self, path, Profile, WanPath};

#[derive(Parser)]
#[command(about = "ferry against rsync, scp and rclone over an emulated WAN path")]
struct Args {
    /// Path profile: lan, metro, continental, intercontinental.
    #[arg(long, default_value = "lan")]
    profile: String,
    /// Rate cap each direction (e.g. 1gbit, 200mbit); none by default.
    #[arg(long)]
    rate: Option<String>,
    /// Data set: checkpoint, dataset, mixed.
    #[arg(long, default_value = "checkpoint")]
    dataset: String,
    /// quick, full, or <MiB>x<files> (checkpoint bytes x small files).
    #[arg(long, default_value = "quick")]
    size: String,
    /// Tools, comma-separated: ferry, rsync, rsync-fsync (rsync --fsync: durable like ferry),
    /// scp, rclone, quic-raw (quinn with ferry's TLS and transport settings, bytes only: the
    /// transport ceiling), quic-raw-bbr (the same with BBR).
    #[arg(long, default_value = "ferry,rsync,scp,rclone,quic-raw")]
    tools: String,
    /// Runs of each tool (interleaved); figures are medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Send `lan` through the user-space emulator too (by default `lan` is a veth pair: the
    /// emulator's forwarding, one copy per packet, would cap every tool near 1.5 Gbit/s).
    #[arg(long)]
    lan_through_emulator: bool,
    /// Seed of the data set and of the emulator's random draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also time a re-sync after changing 1 % of the data (rsync, rclone; ferry has no sync
    /// rounds yet and is reported as such).
    #[arg(long)]
    incremental: bool,
    /// Working directory (data sets are kept there and reused); default /var/tmp/ferry-wan-bench.
    #[arg(long, default_value = "/var/tmp/ferry-wan-bench")]
    workdir: PathBuf,
    /// Write the results as JSON here (default: <workdir>/results-<profile>-<dataset>.json).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Give up on one copy after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    /// ferry's lease time (coordinator `lease_ttl_secs`). Leases are not renewed yet, so a
    /// segment whose transfer takes longer than this is re-leased and starts over: on slow paths
    /// raise it (the default is the coordinator's, 120 s).
    #[arg(long, default_value_t = 120)]
    lease_ttl_secs: u64,
    #[command(subcommand)]
    helper: Option<Helper>,
}

/// Internal: the two ends of the raw QUIC blast, run inside the namespaces.
#[derive(clap::Subcommand)]
enum Helper {
    /// Accept connections and read every stream to its end, acknowledging each.
    QuicSink {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        pki: PathBuf,
    },
    /// Send `bytes` over `streams` streams to the sink, then exit.
    QuicBlast {
        #[arg(long)]
        connect: std::net::SocketAddr,
        #[arg(long)]
        pki: PathBuf,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 8)]
        streams: u64,
        /// Congestion controller: cubic (ferry's, quinn's default) or bbr.
        #[arg(long, default_value = "cubic")]
        cc: String,
    },
}

/// One timed copy.
#[derive(Debug, Clone, serde::Serialize)]
struct Run {
    tool: String,
    run: usize,
    ok: bool,
    error: String,
    wall_secs: f64,
    cpu_secs: f64,
    peak_rss_mib: f64,
    /// ferry only: leases granted beyond one per segment (segments sent again).
    resent_segments: u64,
}

fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Path::new(name).exists().then(|| PathBuf::from(name));
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{name} is not built next to this binary in {}: run `cargo build --release -p ferry-integration-tests --bins`",
            dir.display()
        );
    }
    Ok(p)
}

/// Runs `cmd` to completion within `timeout`, its output going to `log`.
fn run_logged(mut cmd: Command, log: &Path, timeout: Duration) -> Result<(), String> {
    let out = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let t = Instant::now();
    loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(s) if s.success() => return Ok(()),
            Some(s) => {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(5).collect();
                return Err(format!(
                    "exited with {s}: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                ));
            }
            None if t.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("timed out after {} s", timeout.as_secs()));
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Processes to stop when the harness ends, each with the tools it serves.
struct Daemons(Vec<(&'static [&'static str], Child)>);

impl Daemons {
    /// Pids of the daemons that do not serve `tool` (left out of its memory figure).
    fn others(&self, tool: &str) -> Vec<u32> {
        self.0
            .iter()
            .filter(|(tools, _)| !tools.contains(&tool))
            .map(|(_, c)| c.id())
            .collect()
    }
}

const SSH_TOOLS: &[&str] = &["rsync", "rsync-fsync", "scp", "rclone"];

impl Drop for Daemons {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Everything a tool needs.
struct Ctx {
    wan: WanPath,
    work: PathBuf,
    src: PathBuf,
    ssh_key: PathBuf,
    pki: PathBuf,
    bytes: u64,
    timeout: Duration,
}

impl Ctx {
    fn ssh_opts(&self) -> Vec<String> {
        [
            "-i",
            &self.ssh_key.display().to_string(),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn in_a(&self, program: &str) -> Command {
        WanPath::command(&self.wan.ns_a, program)
    }

    /// `rsync -a` over ssh of `src`'s contents into `dst` on side B (`--fsync` if asked).
    fn rsync(&self, src: &Path, dst: &Path, fsync: bool) -> Command {
        let mut c = self.in_a("rsync");
        if fsync {
            // rsync >= 3.2.4: fsync every file it writes, as ferry does before it counts a
            // segment (plain rsync leaves the data in the page cache).
            c.arg("--fsync");
        }
        c.arg("-a")
            .arg("-e")
            .arg(format!("ssh -p {SSH_PORT} {}", self.ssh_opts().join(" ")))
            .arg(format!("{}/", src.display()))
            .arg(format!("root@{}:{}/", self.wan.addr_b, dst.display()));
        c
    }

    /// `rclone copy` over sftp of `src` into `dst` on side B.
    fn rclone(&self, src: &Path, dst: &Path) -> Command {
        let conf = self.work.join("rclone.conf");
        let _ = std::fs::write(&conf, "");
        let mut c = self.in_a("rclone");
        c.arg("copy")
            .arg(src)
            .arg(format!(":sftp:{}", dst.display()))
            .arg("--config")
            .arg(&conf)
            .args(["--sftp-host", &self.wan.addr_b.to_string()])
            .args(["--sftp-port", &SSH_PORT.to_string()])
            .args(["--sftp-user", "root"])
            .arg("--sftp-key-file")
            .arg(&self.ssh_key)
            .args(["--sftp-shell-type", "unix"])
            .args(["--sftp-md5sum-command", "none"])
            .args(["--sftp-sha1sum-command", "none"]);
        c
    }
}

const SSH_PORT: u16 = 2222;
const COORD_PORT: u16 = 7400;
const DATA_PORT: u16 = 7401;
const QUIC_SINK_PORT: u16 = 7500;

/// Starts sshd in namespace B with a fresh host key and a client key.
fn start_sshd(ctx: &Ctx, daemons: &mut Daemons) -> anyhow::Result<()> {
    let sshd = find_program("/usr/sbin/sshd").context("sshd missing")?;
    let dir = ctx.work.join("ssh");
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all("/run/sshd")?;
    for (f, kind) in [("host", "ed25519"), ("id", "ed25519")] {
        if !dir.join(f).exists() {
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", kind, "-N", "", "-f"])
                .arg(dir.join(f))
                .status()?;
            if !st.success() {
                bail!("ssh-keygen failed");
            }
        }
    }
    std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys"))?;
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {SSH_PORT}\nListenAddress {}\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\nSubsystem sftp internal-sftp\n",
            ctx.wan.addr_b,
            dir.join("host").display(),
            dir.join("authorized_keys").display()
        ),
    )?;
    let log = std::fs::File::create(ctx.work.join("sshd.log"))?;
    daemons.0.push((
        SSH_TOOLS,
        WanPath::command(&ctx.wan.ns_b, &sshd.display().to_string())
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    ));
    // Ready when a login works across the path.
    for _ in 0..100 {
        let ok = ctx
            .in_a("ssh")
            .args(ctx.ssh_opts())
            .args(["-p", &SSH_PORT.to_string()])
            .arg(format!("root@{}", ctx.wan.addr_b))
            .arg("true")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success();
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "sshd did not accept a login; see {}",
        ctx.work.join("sshd.log").display()
    )
}

/// ferry's daemons: coordinator and target agent in B, source agent in A.
fn start_ferry(
    ctx: &Ctx,
    daemons: &mut Daemons,
    lease_ttl_secs: u64,
) -> anyhow::Result<TlsMaterial> {
    let ca = Ca::load(&ctx.pki)?;
    let dir = ctx.work.join("ferry");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("root"))?;
    let b = ctx.wan.addr_b;
    let tls = |who: Identity| -> anyhow::Result<String> {
        let p = ca.issue(&who, &ctx.pki)?;
        Ok(format!(
            "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            p.ca.display(),
            p.cert.display(),
            p.key.display()
        ))
    };
    std::fs::write(
        dir.join("coordinator.toml"),
        format!(
            "node_id = 1\nlisten = \"{b}:{COORD_PORT}\"\ndata_dir = \"{}\"\nbootstrap = true\nlease_ttl_secs = {lease_ttl_secs}\n{}",
            dir.join("coordinator").display(),
            tls(Identity::Coordinator(1))?
        ),
    )?;
    std::fs::write(
        dir.join("dst.toml"),
        format!(
            "name = \"dst\"\ncoordinator = \"{b}:{COORD_PORT}\"\ndata_listen = \"{b}:{DATA_PORT}\"\nroot = \"{}\"\nstate_dir = \"{}\"\n{}",
            dir.join("root").display(),
            dir.join("dst-state").display(),
            tls(Identity::Agent("dst".into()))?
        ),
    )?;
    std::fs::write(
        dir.join("src.toml"),
        format!(
            "name = \"src\"\ncoordinator = \"{b}:{COORD_PORT}\"\nstate_dir = \"{}\"\n{}",
            dir.join("src-state").display(),
            tls(Identity::Agent("src".into()))?
        ),
    )?;
    let admin = TlsMaterial::load(&ca.issue(&Identity::Admin("bench".into()), &ctx.pki)?)?;
    let coord = sibling("it-coordinator")?;
    let agent = sibling("it-agent")?;
    for (ns, bin, cfg, name) in [
        (&ctx.wan.ns_b, &coord, "coordinator.toml", "coordinator"),
        (&ctx.wan.ns_b, &agent, "dst.toml", "dst"),
        (&ctx.wan.ns_a, &agent, "src.toml", "src"),
    ] {
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        daemons.0.push((
            &["ferry"],
            WanPath::command(ns, &bin.display().to_string())
                .args(["run", "--config"])
                .arg(dir.join(cfg))
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?,
        ));
        std::thread::sleep(Duration::from_millis(300));
    }
    // Ready when both agents are registered.
    let addr = format!("{b}:{COORD_PORT}");
    let (ns, a2) = (ctx.wan.ns_b.clone(), admin.clone());
    wan::sys::in_netns(&ns, move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let t = Instant::now();
            loop {
                if let Ok(ctl) = ferryctl::ctl::Ctl::connect(&addr, &a2).await {
                    if let Ok(agents) = ctl.agents().await {
                        if agents.len() >= 2 {
                            return Ok(());
                        }
                    }
                }
                if t.elapsed() > Duration::from_secs(30) {
                    bail!("ferry agents did not register within 30 s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    })??;
    Ok(admin)
}

/// One ferry migration of the source into `root/<name>`; returns once it is done, with the
/// number of segments that were leased more than once.
fn ferry_copy(ctx: &Ctx, admin: &TlsMaterial, name: &str) -> Result<(PathBuf, u64), String> {
    let addr = format!("{}:{COORD_PORT}", ctx.wan.addr_b);
    let (admin, src, tp, timeout) = (
        admin.clone(),
        ctx.src.display().to_string(),
        name.to_string(),
        ctx.timeout,
    );
    let resent = wan::sys::in_netns(&ctx.wan.ns_b, move || -> Result<u64, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let ctl = ferryctl::ctl::Ctl::connect(&addr, &admin)
                .await
                .map_err(|e| e.to_string())?;
            let id = ctl
                .create(ferry_proto::admin::MigrationSpec {
                    source_agent: "src".into(),
                    source_path: src,
                    target_agent: "dst".into(),
                    target_path: tp,
                    segment_size: 0,
                    xattrs: false,
                    max_attempts: 0,
                    excludes: Vec::new(),
                })
                .await
                .map_err(|e| e.to_string())?;
            let t = Instant::now();
            loop {
                let p = ctl.status(id).await.map_err(|e| e.to_string())?;
                if p.phase() == Phase::Done {
                    return Ok(p.leases_granted.saturating_sub(p.segments_total));
                }
                if !p.last_error.is_empty() && p.failed_attempts > 50 {
                    return Err(format!("migration {id} keeps failing: {}", p.last_error));
                }
                if t.elapsed() > timeout {
                    return Err(format!("migration {id} not done after {timeout:?}"));
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    })
    .map_err(|e| e.to_string())??;
    Ok((ctx.work.join("ferry/root").join(name), resent))
}

fn quic_helper(h: Helper) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match h {
            Helper::QuicSink { listen, pki } => {
                let ca = Ca::load(&pki)?;
                let tls = TlsMaterial::load(&ca.issue(&Identity::Agent("sink".into()), &pki)?)?;
                let ep = quinn::Endpoint::server(tls.quic_server()?, listen)?;
                while let Some(inc) = ep.accept().await {
                    tokio::spawn(async move {
                        let Ok(conn) = inc.await else { return };
                        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                            tokio::spawn(async move {
                                let mut buf = vec![0u8; 1 << 20];
                                while let Ok(Some(_)) = recv.read(&mut buf).await {}
                                let _ = send.write_all(b"k").await;
                                let _ = send.finish();
                                let _ = send.stopped().await;
                            });
                        }
                    });
                }
                Ok(())
            }
            Helper::QuicBlast {
                connect,
                pki,
                bytes,
                streams,
                cc,
            } => {
                let ca = Ca::load(&pki)?;
                let tls = TlsMaterial::load(&ca.issue(&Identity::Agent("blast".into()), &pki)?)?;
                let mut ep = quinn::Endpoint::client("0.0.0.0:0".parse()?)?;
                let mut client = tls.quic_client()?;
                if cc == "bbr" {
                    let mut t = ferry_common::tls::transport_config();
                    t.congestion_controller_factory(std::sync::Arc::new(
                        quinn::congestion::BbrConfig::default(),
                    ));
                    client.transport_config(std::sync::Arc::new(t));
                } else if cc != "cubic" {
                    bail!("unknown congestion controller {cc}: cubic or bbr");
                }
                ep.set_default_client_config(client);
                let conn = ep.connect(connect, &names::agent_dns("sink"))?.await?;
                let per = bytes.div_ceil(streams.max(1));
                let mut tasks = Vec::new();
                for i in 0..streams.max(1) {
                    let conn = conn.clone();
                    let len = per.min(bytes.saturating_sub(i * per));
                    tasks.push(tokio::spawn(async move {
                        let (mut send, mut recv) = conn.open_bi().await?;
                        let chunk = vec![0x5au8; 1 << 20];
                        let mut left = len;
                        while left > 0 {
                            let n = left.min(chunk.len() as u64) as usize;
                            send.write_all(&chunk[..n]).await?;
                            left -= n as u64;
                        }
                        send.finish()?;
                        let mut ack = [0u8; 1];
                        recv.read_exact(&mut ack).await?;
                        anyhow::Ok(())
                    }));
                }
                for t in tasks {
                    t.await??;
                }
                conn.close(0u32.into(), b"done");
                ep.wait_idle().await;
                Ok(())
            }
        }
    })
}

/// Times one copy by `tool` into a fresh destination and checks it.
fn one_run(
    ctx: &Ctx,
    tool: &str,
    run: usize,
    admin: Option<&TlsMaterial>,
    daemons: &Daemons,
) -> Run {
    let name = format!("{tool}-{run}");
    let dst_root = ctx.work.join("dst");
    let dst = dst_root.join(&name);
    let _ = std::fs::remove_dir_all(&dst);
    let _ = std::fs::create_dir_all(&dst_root);
    let log = ctx.work.join(format!("{name}.log"));
    let remote = |p: &Path| format!("root@{}:{}", ctx.wan.addr_b, p.display());
    let sampler = RssSampler::start(&[&ctx.wan.ns_a, &ctx.wan.ns_b], daemons.others(tool));
    let (cpu0, own0) = (machine_cpu_secs(), own_cpu_secs());
    let t = Instant::now();
    let mut resent_segments = 0;
    let result: Result<(PathBuf, Fidelity), String> = match tool {
        "rsync" | "rsync-fsync" => run_logged(
            ctx.rsync(&ctx.src, &dst, tool == "rsync-fsync"),
            &log,
            ctx.timeout,
        )
        .map(|_| (dst.clone(), Fidelity::Full)),
        "scp" => {
            // scp -r follows symlinks and keeps no empty-file distinctions: contents only.
            let mut c = ctx.in_a("scp");
            c.args(["-r", "-p", "-q", "-P", &SSH_PORT.to_string()])
                .args(ctx.ssh_opts())
                .arg(&ctx.src)
                .arg(remote(&dst));
            run_logged(c, &log, ctx.timeout).map(|_| (dst.clone(), Fidelity::Contents))
        }
        "rclone" => run_logged(ctx.rclone(&ctx.src, &dst), &log, ctx.timeout)
            .map(|_| (dst.clone(), Fidelity::Contents)),
        "ferry" => match admin {
            Some(a) => ferry_copy(ctx, a, &name).map(|(p, resent)| {
                resent_segments = resent;
                (p, Fidelity::Full)
            }),
            None => Err("ferry daemons did not start".into()),
        },
        "quic-raw" | "quic-raw-bbr" => {
            let mut c = ctx.in_a(&std::env::current_exe().unwrap().display().to_string());
            if tool == "quic-raw-bbr" {
                c.args(["quic-blast", "--cc", "bbr"]);
            } else {
                c.arg("quic-blast");
            }
            c.arg("--connect")
                .arg(format!("{}:{QUIC_SINK_PORT}", ctx.wan.addr_b))
                .arg("--pki")
                .arg(&ctx.pki)
                .args(["--bytes", &ctx.bytes.to_string()]);
            // Bytes only: nothing to check on disk.
            run_logged(c, &log, ctx.timeout).map(|_| (PathBuf::new(), Fidelity::Contents))
        }
        other => Err(format!("unknown tool {other}")),
    };
    let wall = t.elapsed().as_secs_f64();
    let cpu = (machine_cpu_secs() - cpu0) - (own_cpu_secs() - own0);
    let peak = sampler.finish();
    let checked = result.and_then(|(copy, fidelity)| {
        if tool.starts_with("quic-raw") {
            return Ok(copy);
        }
        tree::compare(&ctx.src, &copy, fidelity)
            .map(|_| copy)
            .map_err(|e| format!("copy differs from the source: {e}"))
    });
    let (ok, error) = match &checked {
        Ok(copy) => {
            let _ = std::fs::remove_dir_all(copy);
            (true, String::new())
        }
        Err(e) => (false, e.clone()),
    };
    let _ = std::fs::remove_dir_all(&dst);
    Run {
        tool: tool.into(),
        run,
        ok,
        error,
        wall_secs: wall,
        cpu_secs: cpu.max(0.0),
        peak_rss_mib: peak,
        resent_segments,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Local ceilings: disk write + fsync and BLAKE3 hashing, single-threaded.
fn ceilings(work: &Path) -> anyhow::Result<(f64, f64)> {
    use std::io::Write;
    let len = 512usize << 20;
    let buf = vec![0xa5u8; 8 << 20];
    let p = work.join("ceiling.tmp");
    let t = Instant::now();
    let mut f = std::fs::File::create(&p)?;
    for _ in 0..len / buf.len() {
        f.write_all(&buf)?;
    }
    f.sync_all()?;
    let disk = len as f64 / t.elapsed().as_secs_f64() / 1e6;
    drop(f);
    std::fs::remove_file(&p)?;
    let data = vec![0x3cu8; 256 << 20];
    let t = Instant::now();
    let mut h = blake3::Hasher::new();
    for _ in 0..4 {
        h.update(&data);
    }
    std::hint::black_box(h.finalize());
    let hash = (4 * data.len()) as f64 / t.elapsed().as_secs_f64() / 1e6;
    Ok((disk, hash))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(h) = args.helper {
        return quic_helper(h);
    }
    if let Some(why) = path::unavailable() {
        bail!("the WAN emulator cannot run here: {why}. Run as root on Linux with iproute2.");
    }
    path::remove_stale();
    // Interrupted: stop every process in our namespaces and delete them (no destructors run).
    std::thread::spawn(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("signal runtime");
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        });
        eprintln!("interrupted: removing the emulated path and its processes");
        path::remove_all();
        std::process::exit(130);
    });
    let mut profile = Profile::named(&args.profile).map_err(anyhow::Error::msg)?;
    if let Some(r) = &args.rate {
        profile = profile.with_rate(Some(wan::parse_rate(r).map_err(anyhow::Error::msg)?));
    }
    let kind = Kind::parse(&args.dataset).map_err(anyhow::Error::msg)?;
    let size = Size::parse(&args.size).map_err(anyhow::Error::msg)?;
    let mut tools: Vec<String> = args
        .tools
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();

    // Which peers are installed.
    let needs: &[(&str, &[&str], &str)] = &[
        (
            "rsync",
            &["rsync", "ssh", "/usr/sbin/sshd"],
            "rsync openssh-client openssh-server",
        ),
        (
            "rsync-fsync",
            &["rsync", "ssh", "/usr/sbin/sshd"],
            "rsync openssh-client openssh-server",
        ),
        (
            "scp",
            &["scp", "ssh", "/usr/sbin/sshd"],
            "openssh-client openssh-server",
        ),
        (
            "rclone",
            &["rclone", "/usr/sbin/sshd"],
            "rclone openssh-server",
        ),
    ];
    let mut missing = Vec::new();
    tools.retain(|t| {
        let Some((_, progs, pkgs)) = needs.iter().find(|(n, _, _)| n == t) else {
            return true;
        };
        let absent: Vec<&str> = progs
            .iter()
            .copied()
            .filter(|p| find_program(p).is_none())
            .collect();
        if absent.is_empty() {
            true
        } else {
            let msg = format!(
                "{t}: skipped, {} not installed (apt-get install -y {pkgs})",
                absent.join(", ")
            );
            eprintln!("{msg}");
            missing.push(msg);
            false
        }
    });

    let work = args.workdir.clone();
    std::fs::create_dir_all(&work)?;
    let src = work.join(format!(
        "src-{}-{}mib-{}files-seed{}",
        kind.name(),
        size.checkpoint_bytes >> 20,
        size.small_files,
        args.seed
    ));
    let done_marker = src.with_extension("done");
    if !done_marker.exists() {
        let _ = std::fs::remove_dir_all(&src);
        eprintln!(
            "generating {} data set in {} ...",
            kind.name(),
            src.display()
        );
        let t = Instant::now();
        let s = dataset::generate(kind, size, args.seed, &src)?;
        std::fs::write(&done_marker, format!("{} {}\n", s.files, s.bytes))?;
        eprintln!(
            "  {} files, {} bytes in {:.1} s",
            s.files,
            s.bytes,
            t.elapsed().as_secs_f64()
        );
    }
    let (files, bytes): (u64, u64) = {
        let text = std::fs::read_to_string(&done_marker)?;
        let mut it = text
            .split_whitespace()
            .map(|x| x.parse::<u64>().unwrap_or(0));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    };

    let pki = work.join("pki");
    let _ = std::fs::remove_dir_all(&pki);
    Ca::init(&pki)?;
    let direct = profile.name == "lan" && profile.rate_bps.is_none() && !args.lan_through_emulator;
    let wan = if direct {
        WanPath::direct(profile)
    } else {
        WanPath::create(profile, args.seed)
    }
    .map_err(anyhow::Error::msg)?;
    let path_text = format!(
        "{}{}",
        profile.describe(),
        if direct {
            " (veth pair, no emulator)"
        } else {
            " (through the user-space emulator)"
        }
    );
    eprintln!("path: {path_text}");
    let ctx = Ctx {
        wan,
        ssh_key: work.join("ssh/id"),
        src: src.clone(),
        work: work.clone(),
        pki,
        bytes,
        timeout: Duration::from_secs(args.timeout_secs),
    };
    let mut daemons = Daemons(Vec::new());
    if tools
        .iter()
        .any(|t| t == "rsync" || t == "scp" || t == "rclone")
    {
        start_sshd(&ctx, &mut daemons)?;
    }
    let admin = if tools.iter().any(|t| t == "ferry") {
        Some(start_ferry(&ctx, &mut daemons, args.lease_ttl_secs)?)
    } else {
        None
    };
    if tools.iter().any(|t| t.starts_with("quic-raw")) {
        let log = std::fs::File::create(work.join("quic-sink.log"))?;
        let sink = WanPath::command(
            &ctx.wan.ns_b,
            &std::env::current_exe()?.display().to_string(),
        )
        .args(["quic-sink", "--listen"])
        .arg(format!("{}:{QUIC_SINK_PORT}", ctx.wan.addr_b))
        .arg("--pki")
        .arg(&ctx.pki)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
        daemons.0.push((&["quic-raw", "quic-raw-bbr"], sink));
        std::thread::sleep(Duration::from_millis(300));
    }

    let mut runs = Vec::new();
    for r in 0..args.runs {
        for tool in &tools {
            let one = one_run(&ctx, tool, r, admin.as_ref(), &daemons);
            eprintln!(
                "run {r} {tool:>8}: {} {:.2} s, {:.1} CPU s, {:.0} MiB{} {}",
                if one.ok { "ok    " } else { "FAILED" },
                one.wall_secs,
                one.cpu_secs,
                one.peak_rss_mib,
                if one.resent_segments > 0 {
                    format!(", {} segments resent", one.resent_segments)
                } else {
                    String::new()
                },
                one.error
            );
            runs.push(one);
        }
    }

    let mut incremental = Vec::new();
    if args.incremental {
        incremental = run_incremental(&ctx, &tools, kind, args.seed, admin.as_ref())?;
    }

    let (disk, hash) = ceilings(&work)?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
        / 1024.0;

    // Medians per tool.
    struct Row {
        tool: String,
        ok: usize,
        wall: f64,
        cpu: f64,
        rss: f64,
        error: String,
    }
    let rows: Vec<Row> = tools
        .iter()
        .map(|t| {
            let mine: Vec<&Run> = runs.iter().filter(|r| &r.tool == t).collect();
            let good: Vec<&&Run> = mine.iter().filter(|r| r.ok).collect();
            Row {
                tool: t.clone(),
                ok: good.len(),
                wall: median(good.iter().map(|r| r.wall_secs).collect()),
                cpu: median(good.iter().map(|r| r.cpu_secs).collect()),
                rss: median(good.iter().map(|r| r.peak_rss_mib).collect()),
                error: mine
                    .iter()
                    .find(|r| !r.ok)
                    .map(|r| r.error.clone())
                    .unwrap_or_default(),
            }
        })
        .collect();
    let ferry_wall = rows
        .iter()
        .find(|r| r.tool == "ferry" && r.ok > 0)
        .map(|r| r.wall);

    println!("## {} / {} ({})", profile.name, kind.name(), args.size);
    println!();
    println!(
        "{} files, {:.1} MiB; {}; {cores} cores, {mem_gib:.0} GiB RAM; median of {} interleaved runs.",
        files,
        bytes as f64 / 1048576.0,
        path_text,
        args.runs
    );
    println!("Local ceilings: disk write+fsync {disk:.0} MB/s, BLAKE3 (one core) {hash:.0} MB/s.");
    println!();
    println!(
        "| tool | wall s | MB/s | files/s | CPU s | peak RSS MiB | time ÷ ferry's | runs ok |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        if r.ok == 0 {
            println!(
                "| {} | FAILED | | | | | | 0/{} — {} |",
                r.tool, args.runs, r.error
            );
            continue;
        }
        let files_s = if r.tool.starts_with("quic-raw") {
            "—".to_string()
        } else {
            format!("{:.0}", files as f64 / r.wall)
        };
        let ratio = ferry_wall.map_or("—".into(), |f| format!("{:.2}", r.wall / f));
        let mb_s = bytes as f64 / r.wall / 1e6;
        println!(
            "| {} | {:.2} | {} | {} | {:.1} | {:.0} | {} | {}/{} |",
            r.tool,
            r.wall,
            if mb_s < 10.0 {
                format!("{mb_s:.2}")
            } else {
                format!("{mb_s:.1}")
            },
            files_s,
            r.cpu,
            r.rss,
            ratio,
            r.ok,
            args.runs
        );
    }
    for m in &missing {
        println!("| {m} | | | | | | | |");
    }
    if !incremental.is_empty() {
        println!();
        println!("Incremental re-sync (after changing 1 % of small files and 1 % of large files' bytes):");
        println!();
        println!("| tool | change re-sync s | no-change re-run s |");
        println!("|---|---|---|");
        for (t, a, b) in &incremental {
            println!("| {t} | {a} | {b} |");
        }
    }

    let json = serde_json::json!({
        "profile": profile.name,
        "rtt_ms": profile.rtt.as_millis() as u64,
        "loss": profile.loss,
        "rate_bps": profile.rate_bps,
        "dataset": kind.name(),
        "size": args.size,
        "files": files,
        "bytes": bytes,
        "cores": cores,
        "mem_gib": mem_gib,
        "disk_write_fsync_mb_s": disk,
        "blake3_mb_s": hash,
        "runs": runs,
        "missing": missing,
        "median": rows.iter().map(|r| serde_json::json!({
            "tool": r.tool, "ok_runs": r.ok, "wall_secs": r.wall, "mb_s": bytes as f64 / r.wall / 1e6,
            "files_s": files as f64 / r.wall, "cpu_secs": r.cpu, "peak_rss_mib": r.rss,
            "time_over_ferry": ferry_wall.map(|f| r.wall / f),
        })).collect::<Vec<_>>(),
        "incremental": incremental.iter().map(|(t, a, b)| serde_json::json!({"tool": t, "change": a, "no_change": b})).collect::<Vec<_>>(),
    });
    let out = args
        .json
        .clone()
        .unwrap_or_else(|| work.join(format!("results-{}-{}.json", profile.name, kind.name())));
    std::fs::write(&out, serde_json::to_vec_pretty(&json)?)?;
    eprintln!("results written to {}", out.display());
    drop(daemons);
    Ok(())
}

/// The incremental scenario: a full copy per tool into a kept destination, then 1 % of the data
/// changed, a timed re-sync, and a timed re-run with nothing changed. Returns (tool, change,
/// no-change) as printable cells.
fn run_incremental(
    ctx: &Ctx,
    tools: &[String],
    kind: Kind,
    seed: u64,
    admin: Option<&TlsMaterial>,
) -> anyhow::Result<Vec<(String, String, String)>> {
    let _ = admin;
    // The source is changed in a copy, so the cached data set stays as generated.
    let src = ctx.work.join("incremental-src");
    let _ = std::fs::remove_dir_all(&src);
    let st = Command::new("cp")
        .arg("-a")
        .arg(&ctx.src)
        .arg(&src)
        .status()?;
    if !st.success() {
        bail!("cp -a of the data set failed");
    }
    let mut out = Vec::new();
    for tool in tools {
        if tool == "ferry" {
            out.push((
                tool.clone(),
                "n/a — sync rounds are not built yet".into(),
                "n/a".into(),
            ));
            continue;
        }
        if tool != "rsync" && tool != "rclone" {
            continue;
        }
        let dst = ctx.work.join(format!("dst/incremental-{tool}"));
        let _ = std::fs::remove_dir_all(&dst);
        std::fs::create_dir_all(dst.parent().unwrap_or(Path::new("/")))?;
        let sync = |log: &str| -> Result<f64, String> {
            let c = if tool == "rsync" {
                ctx.rsync(&src, &dst, false)
            } else {
                ctx.rclone(&src, &dst)
            };
            let t = Instant::now();
            run_logged(c, &ctx.work.join(log), ctx.timeout)?;
            Ok(t.elapsed().as_secs_f64())
        };
        let cell = |r: Result<f64, String>| match r {
            Ok(s) => format!("{s:.2}"),
            Err(e) => format!("FAILED: {e}"),
        };
        // Full copy, then change, then re-sync, then re-run.
        if let Err(e) = sync(&format!("incremental-{tool}-full.log")) {
            out.push((tool.clone(), format!("FAILED: {e}"), String::new()));
            continue;
        }
        // Same bytes changed for every tool: mutate a fresh copy each time.
        let _ = std::fs::remove_dir_all(&src);
        Command::new("cp")
            .arg("-a")
            .arg(&ctx.src)
            .arg(&src)
            .status()?;
        let changed = dataset::mutate(kind, &src, seed)?;
        eprintln!("{tool}: {changed} bytes changed");
        let change = sync(&format!("incremental-{tool}-change.log"));
        let fidelity = if tool == "rsync" {
            Fidelity::Full
        } else {
            Fidelity::Contents
        };
        let change = change.and_then(|s| {
            tree::compare(&src, &dst, fidelity)
                .map(|_| s)
                .map_err(|e| format!("copy differs after re-sync: {e}"))
        });
        let none = sync(&format!("incremental-{tool}-nochange.log"));
        out.push((tool.clone(), cell(change), cell(none)));
        let _ = std::fs::remove_dir_all(&dst);
        let _ = std::fs::remove_dir_all(&src);
        Command::new("cp")
            .arg("-a")
            .arg(&ctx.src)
            .arg(&src)
            .status()?;
    }
    let _ = std::fs::remove_dir_all(&src);
    Ok(out)
}
