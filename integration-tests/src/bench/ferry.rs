//! ferry as one of the tools: its coordinator and target agent in side B, its source agent in
//! side A, and one migration per copy.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::bail;
use ferry_common::pki::{Ca, Identity};
use ferry_common::tls::TlsMaterial;
use ferry_proto::admin::Phase;

use super::peers::{sibling, Ctx, Daemons, COORD_PORT, DATA_PORT, DATA_PORT_S3, S3_BUCKET};
use crate::wan::{self, WanPath};

/// ferry's daemons: coordinator and target agent in B, source agent in A.
///
/// With `s3`, a second target agent, `dst-s3`, writes into the S3 server's bucket (below
/// `ferry/`), for the `ferry-s3` tool.
pub fn start_ferry(
    ctx: &Ctx,
    daemons: &mut Daemons,
    lease_ttl_secs: u64,
    s3: bool,
) -> anyhow::Result<TlsMaterial> {
    let ca = Ca::load(&ctx.pki)?;
    let dir = ctx.work.join("ferry");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // The target's root is where every tool writes its copy (one file system for all).
    std::fs::create_dir_all(ctx.work.join("dst"))?;
    let b = ctx.wan.addr_b;
    let tls = |who: Identity| -> anyhow::Result<String> {
        let p = ca.issue_if_missing(&who, &ctx.pki)?;
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
            ctx.work.join("dst").display(),
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
    let mut agents = vec![("dst.toml", "dst")];
    if s3 {
        std::fs::write(
            dir.join("dst-s3.toml"),
            format!(
                "name = \"dst-s3\"\ncoordinator = \"{b}:{COORD_PORT}\"\ndata_listen = \"{b}:{DATA_PORT_S3}\"\nstate_dir = \"{}\"\n{}\
                 [target_store]\nurl = \"s3://{S3_BUCKET}/ferry\"\n[target_store.options]\n\
                 endpoint = \"{}\"\nallow_http = \"true\"\nregion = \"us-east-1\"\n\
                 access_key_id = \"test\"\nsecret_access_key = \"test\"\n",
                dir.join("dst-s3-state").display(),
                tls(Identity::Agent("dst-s3".into()))?,
                ctx.s3_endpoint()
            ),
        )?;
        agents.push(("dst-s3.toml", "dst-s3"));
    }
    let admin =
        TlsMaterial::load(&ca.issue_if_missing(&Identity::Admin("bench".into()), &ctx.pki)?)?;
    let coord = sibling("it-coordinator")?;
    let agent = sibling("it-agent")?;
    let mut procs = vec![(&ctx.wan.ns_b, &coord, "coordinator.toml", "coordinator")];
    procs.extend(
        agents
            .iter()
            .map(|(cfg, name)| (&ctx.wan.ns_b, &agent, *cfg, *name)),
    );
    procs.push((&ctx.wan.ns_a, &agent, "src.toml", "src"));
    let want_agents = procs.len() - 1;
    for (ns, bin, cfg, name) in procs {
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        daemons.0.push((
            &["ferry", "ferry-s3"],
            WanPath::command(ns, &bin.display().to_string())
                .args(["run", "--config"])
                .arg(dir.join(cfg))
                // FERRY_BENCH_LOG=info (or a RUST_LOG filter) to see what the daemons did.
                .env(
                    "RUST_LOG",
                    std::env::var("FERRY_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
                )
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
                        if agents.len() >= want_agents {
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

/// One ferry migration of the source into `<work>/dst/<name>` (where the other tools write); returns once it is done, with the
/// number of segments that were leased more than once.
pub fn ferry_copy(ctx: &Ctx, admin: &TlsMaterial, name: &str) -> Result<(PathBuf, u64), String> {
    ferry_copy_from(ctx, admin, &ctx.src, name).map(|(p, resent, _)| (p, resent))
}

/// One ferry migration of the source into the S3 server's bucket, below `ferry/<name>/`;
/// returns the number of segments that were leased more than once.
pub fn ferry_copy_s3(ctx: &Ctx, admin: &TlsMaterial, name: &str) -> Result<u64, String> {
    migrate(ctx, admin, &ctx.src, "dst-s3", name).map(|(resent, _)| resent)
}

/// Runs `f` with an admin client of the coordinator, from side B's network namespace.
fn with_ctl<T, F>(ctx: &Ctx, admin: &TlsMaterial, f: F) -> Result<T, String>
where
    T: Send + 'static,
    F: AsyncFnOnce(ferryctl::ctl::Ctl) -> Result<T, String> + Send + 'static,
{
    let addr = format!("{}:{COORD_PORT}", ctx.wan.addr_b);
    let admin = admin.clone();
    wan::sys::in_netns(&ctx.wan.ns_b, move || -> Result<T, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let ctl = ferryctl::ctl::Ctl::connect(&addr, &admin)
                .await
                .map_err(|e| e.to_string())?;
            f(ctl).await
        })
    })
    .map_err(|e| e.to_string())?
}

/// Starts a sync round of migration `id` and waits until it is done; returns its seconds (from
/// the request to the round's end, as the operator waits for it).
pub fn ferry_sync(ctx: &Ctx, admin: &TlsMaterial, id: u64) -> Result<f64, String> {
    let timeout = ctx.timeout;
    with_ctl(ctx, admin, async move |ctl| {
        let t = Instant::now();
        let round = ctl.sync(id).await.map_err(|e| e.to_string())?;
        loop {
            let p = ctl.status(id).await.map_err(|e| e.to_string())?;
            if p.round == round && p.phase() == Phase::Done {
                return Ok(t.elapsed().as_secs_f64());
            }
            if p.phase() == Phase::Failed {
                return Err(format!("round {round} failed: {}", p.last_error));
            }
            if t.elapsed() > timeout {
                return Err(format!("round {round} not done after {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
}

/// Runs a full verification of migration `id` (`ferryctl migration verify --mode full`);
/// returns its seconds, or why the trees did not verify.
pub fn ferry_verify_full(ctx: &Ctx, admin: &TlsMaterial, id: u64) -> Result<f64, String> {
    let timeout = ctx.timeout;
    with_ctl(ctx, admin, async move |ctl| {
        let t = Instant::now();
        let (n, _) = ctl.verify_full(id).await.map_err(|e| e.to_string())?;
        let v = ctl
            .watch_verification(id, n, timeout)
            .await
            .map_err(|e| e.to_string())?;
        if !v.equal {
            return Err(format!("full verification {n}: {}", v.error));
        }
        Ok(t.elapsed().as_secs_f64())
    })
}

/// A cutover as the benchmark reports it.
pub struct CutoverFigures {
    /// From the request to `done`, seconds.
    pub total_s: f64,
    /// How long writes were frozen (end of pre_freeze to end of switch), seconds.
    pub freeze_s: f64,
    /// The final round's seconds.
    pub final_round_s: f64,
    /// Files and bytes each end read for the verification while frozen: (source, target).
    pub read: ((u64, u64), (u64, u64)),
}

/// Cuts migration `id` over (no hooks are configured on the benchmark's agents) and waits for
/// the switch.
pub fn ferry_cutover(ctx: &Ctx, admin: &TlsMaterial, id: u64) -> Result<CutoverFigures, String> {
    let timeout = ctx.timeout;
    with_ctl(ctx, admin, async move |ctl| {
        let t = Instant::now();
        ctl.cutover(id, false).await.map_err(|e| e.to_string())?;
        let p = ctl
            .watch_cutover(id, timeout, |_| {})
            .await
            .map_err(|e| e.to_string())?;
        let total_s = t.elapsed().as_secs_f64();
        let c = p.cutover.as_ref().ok_or("no cutover")?;
        if c.phase() != ferry_proto::admin::CutoverPhase::Done {
            return Err(format!("the cutover rolled back: {}", c.error));
        }
        let read = |step: &str| {
            c.runs
                .iter()
                .find(|r| r.step == step)
                .and_then(|r| r.tree.as_ref())
                .map_or((0, 0), |t| (t.files_read, t.bytes_read))
        };
        let final_round_s = p
            .rounds
            .iter()
            .find(|r| r.number == c.final_round)
            .map_or(0.0, |r| {
                r.finished_ms.saturating_sub(r.started_ms) as f64 / 1000.0
            });
        Ok(CutoverFigures {
            total_s,
            freeze_s: c.freeze_window_ms as f64 / 1000.0,
            final_round_s,
            read: (read("verify_source"), read("verify_target")),
        })
    })
}

/// [`ferry_copy`] of `src`; also returns the migration's id.
pub fn ferry_copy_from(
    ctx: &Ctx,
    admin: &TlsMaterial,
    src: &std::path::Path,
    name: &str,
) -> Result<(PathBuf, u64, u64), String> {
    let (resent, id) = migrate(ctx, admin, src, "dst", name)?;
    Ok((ctx.work.join("dst").join(name), resent, id))
}

/// Migrates `src` to `target_path` of agent `target`; the number of segments leased more than
/// once, and the migration's id.
fn migrate(
    ctx: &Ctx,
    admin: &TlsMaterial,
    src: &std::path::Path,
    target: &str,
    target_path: &str,
) -> Result<(u64, u64), String> {
    let (src, tp, timeout) = (
        src.display().to_string(),
        target_path.to_string(),
        ctx.timeout,
    );
    let target = target.to_string();
    with_ctl(ctx, admin, async move |ctl| {
        let id = ctl
            .create(ferry_proto::admin::MigrationSpec {
                source_agent: "src".into(),
                source_path: src,
                target_agent: target,
                target_path: tp,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let t = Instant::now();
        loop {
            let p = ctl.status(id).await.map_err(|e| e.to_string())?;
            if p.phase() == Phase::Done {
                return Ok((p.leases_granted.saturating_sub(p.segments_total), id));
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
}
