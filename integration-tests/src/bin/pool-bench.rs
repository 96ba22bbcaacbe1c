//! Elastic target agents (issue 17): what adding target agents mid-migration does to the time a
//! migration into an object store takes, when each target sits behind its own capped link (as
//! each cloud VM has its own bandwidth). Run from a release build:
//!
//! ```sh
//! pip install 'moto[server]'
//! cargo build --release -p ferry-integration-tests --bins
//! target/release/pool-bench --targets 4 --rate 100mbit
//! ```
//!
//! Everything runs on 127.0.0.1: a coordinator and agent processes (`it-coordinator`,
//! `it-agent`), the S3 server (moto) and one relay per target ([`relay::Relay`]: the WAN
//! emulator's link model, rate cap and delay, each direction). The source agent dials each
//! target at its relay's address. Three migrations of the same files, one after another:
//! with one target throughout; with all targets from the start; and with one target until
//! half the bytes are verified, then the others added (`ferryctl migration targets add`).
//! Each migration's files are checked in the store by the store's own client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use ferry_common::pki::{Ca, Identity};
use ferry_common::tls::TlsMaterial;
use ferry_integration_tests::bench::daemon;
use ferry_integration_tests::bench::peers::sibling;
use ferry_integration_tests::bench::relay::Relay;
use ferry_integration_tests::stores::Server;
use ferry_integration_tests::wan::{self, Profile};
use ferry_proto::admin as pb;

#[derive(Parser)]
#[command(
    about = "ferry's migration time into S3 with 1 and N target agents, each behind its own link"
)]
struct Args {
    /// Target agents in the pool.
    #[arg(long, default_value_t = 4)]
    targets: usize,
    /// Each target's link: rate cap each direction.
    #[arg(long, default_value = "100mbit")]
    rate: String,
    /// Each target's link: round-trip time in ms.
    #[arg(long, default_value_t = 5)]
    rtt_ms: u64,
    /// Files of the data set.
    #[arg(long, default_value_t = 64)]
    files: usize,
    /// The source agent's `max_in_flight` (it leases half as many again ahead). Leases held by
    /// the source stay with the target they name, so the source should hold a small share of
    /// the segments, as it does of a real migration's thousands: 8 (12 leases) of 64 here.
    #[arg(long, default_value_t = 8)]
    source_in_flight: u32,
    /// MiB per file (each file is one segment: under the 64 MiB segment size).
    #[arg(long, default_value_t = 8)]
    file_mib: usize,
    /// Working directory (wiped).
    #[arg(long, default_value = "/var/tmp/ferry-pool-bench")]
    workdir: PathBuf,
}

const BUCKET: &str = "pool";

struct Cluster {
    procs: Vec<Child>,
    coord: String,
    admin: TlsMaterial,
    _relays: Vec<Relay>,
    names: Vec<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

fn free_udp_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

fn start(args: &Args, s3: &Server, profile: Profile) -> anyhow::Result<Cluster> {
    let work = &args.workdir;
    let pki = work.join("pki");
    let ca = Ca::init(&pki)?;
    let tls = |who: Identity| daemon::tls_toml(&ca, &pki, who);
    let coord_bin = sibling("it-coordinator")?;
    let agent_bin = sibling("it-agent")?;
    let mut procs = Vec::new();
    let (child, coord) = daemon::start_coordinator(&coord_bin, work, &ca, &pki)?;
    procs.push(child);
    let (store, _) = s3.target_store_toml(BUCKET, "ferry");
    let mut relays = Vec::new();
    let mut names = Vec::new();
    for i in 0..args.targets {
        let name = format!("dst-{i}");
        let listen = free_udp_port()?;
        let relay = Relay::start(listen, profile.impairment(), 7 + i as u64)?;
        let cfg = work.join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "name = \"{name}\"\ncoordinator = \"{coord}\"\ndata_listen = \"{listen}\"\n\
                 advertise_addr = \"{}\"\nstate_dir = \"{}\"\n{}{store}",
                relay.addr,
                work.join(format!("{name}-state")).display(),
                tls(Identity::Agent(name.clone()))?
            ),
        )?;
        procs.push(daemon::spawn(
            &agent_bin,
            &cfg,
            &work.join(format!("{name}.log")),
            "warn",
        )?);
        relays.push(relay);
        names.push(name);
    }
    let cfg = work.join("src.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"src\"\ncoordinator = \"{coord}\"\nstate_dir = \"{}\"\nmax_in_flight = {}\n{}",
            work.join("src-state").display(),
            args.source_in_flight,
            tls(Identity::Agent("src".into()))?
        ),
    )?;
    procs.push(daemon::spawn(
        &agent_bin,
        &cfg,
        &work.join("src.log"),
        "warn",
    )?);
    let admin = TlsMaterial::load(&ca.issue_if_missing(&Identity::Admin("bench".into()), &pki)?)?;
    Ok(Cluster {
        procs,
        coord,
        admin,
        _relays: relays,
        names,
    })
}

/// How one migration went.
struct Run {
    what: String,
    seconds: f64,
    /// Seconds until half the bytes were verified, and from then to the end.
    half: f64,
    /// Segments verified per target.
    per_target: Vec<(String, u64)>,
}

/// Migrates the source into `ferry/<name>/` with `first` targets from the start and the rest
/// added once half the bytes are verified (`late` true) or never.
async fn migrate(
    ctl: &ferryctl::ctl::Ctl,
    c: &Cluster,
    src: &Path,
    name: &str,
    first: usize,
    late: bool,
) -> anyhow::Result<Run> {
    let spec = pb::MigrationSpec {
        source_agent: "src".into(),
        source_path: src.display().to_string(),
        target_agent: c.names[0].clone(),
        target_path: name.into(),
        ..Default::default()
    };
    let t = Instant::now();
    let id = ctl.create(spec).await?;
    for n in &c.names[1..first] {
        ctl.set_migration_target(&id.to_string(), n, true).await?;
    }
    let mut half = None;
    loop {
        let p = ctl.status(id).await?;
        if half.is_none() && p.scan_complete && p.bytes_verified * 2 >= p.bytes_total {
            half = Some(t.elapsed().as_secs_f64());
            if late {
                for n in &c.names[first..] {
                    ctl.set_migration_target(&id.to_string(), n, true).await?;
                }
            }
        }
        match p.phase() {
            pb::Phase::Done => {
                let seconds = t.elapsed().as_secs_f64();
                let what = match (first, late) {
                    (1, false) => "1 target throughout".to_string(),
                    (n, false) => format!("{n} targets from the start"),
                    (n, true) => format!("{n} target(s), {} more at half", c.names.len() - n),
                };
                return Ok(Run {
                    what,
                    seconds,
                    half: half.unwrap_or(seconds),
                    per_target: p
                        .targets
                        .iter()
                        .map(|t| (t.agent.clone(), t.segments_verified))
                        .collect(),
                });
            }
            pb::Phase::Failed => bail!("migration {name} failed: {}", p.last_error),
            _ => {}
        }
        if t.elapsed() > Duration::from_secs(1800) {
            bail!("migration {name} not done after 30 min");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn check_store(s3: &Server, src: &Path, name: &str, files: usize) -> anyhow::Result<()> {
    let held = s3.list(BUCKET, &format!("ferry/{name}/"))?;
    if held.len() != files {
        bail!("{name}: {} objects in the store, {files} files", held.len());
    }
    for (key, o) in &held {
        let rel = key.trim_start_matches(&format!("ferry/{name}/"));
        let data = std::fs::read(src.join(rel)).with_context(|| key.clone())?;
        let sha =
            ferry_common::hash::hex(ring::digest::digest(&ring::digest::SHA256, &data).as_ref());
        if o.sha256 != sha || o.size != data.len() as u64 {
            bail!("{key} differs from the source");
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.targets < 2 {
        bail!("--targets must be at least 2");
    }
    let profile = Profile {
        rtt: Duration::from_millis(args.rtt_ms),
        ..Profile::named("lan").map_err(anyhow::Error::msg)?
    }
    .with_rate(Some(
        wan::parse_rate(&args.rate).map_err(anyhow::Error::msg)?,
    ));
    let _ = std::fs::remove_dir_all(&args.workdir);
    std::fs::create_dir_all(&args.workdir)?;
    let src = args.workdir.join("src");
    let mut rng = blake3::Hasher::new_derive_key("ferry pool bench").finalize_xof();
    for i in 0..args.files {
        let mut data = vec![0u8; args.file_mib << 20];
        rng.fill(&mut data);
        let p = src.join(format!("shard-{:02}/part-{i:04}.bin", i % 8));
        std::fs::create_dir_all(p.parent().expect("has a parent"))?;
        std::fs::write(p, data)?;
    }
    let s3 = Server::moto()?.context("moto_server is not installed: pip install 'moto[server]'")?;
    s3.create_bucket(BUCKET)?;
    let cluster = start(&args, &s3, profile)?;
    let rt = tokio::runtime::Runtime::new()?;
    let runs = rt.block_on(async {
        let t = Instant::now();
        let ctl = loop {
            if let Ok(ctl) = ferryctl::ctl::Ctl::connect(&cluster.coord, &cluster.admin).await {
                if ctl.agents().await.is_ok_and(|a| a.len() > args.targets) {
                    break ctl;
                }
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!(
                    "the agents did not register within 60 s (logs in {})",
                    args.workdir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut runs = Vec::new();
        for (name, first, late) in [
            ("one", 1, false),
            ("all", args.targets, false),
            ("grow", 1, true),
        ] {
            let run = migrate(&ctl, &cluster, &src, name, first, late).await?;
            check_store(&s3, &src, name, args.files)?;
            runs.push(run);
        }
        anyhow::Ok(runs)
    })?;
    let mib = args.files * args.file_mib;
    println!(
        "\n{mib} MiB in {} files into S3 (moto) through target agents each behind {} ({} ms RTT); \
         source max_in_flight {}\n",
        args.files, args.rate, args.rtt_ms, args.source_in_flight
    );
    println!("| run | seconds | MiB/s | first half s | second half s | segments per target |");
    println!("|---|---|---|---|---|---|");
    for r in &runs {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            r.what,
            r.seconds,
            mib as f64 / r.seconds,
            r.half,
            r.seconds - r.half,
            r.per_target
                .iter()
                .map(|(n, s)| format!("{n} {s}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}
