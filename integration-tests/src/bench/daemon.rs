//! What the benchmarks that run ferry's daemons as processes share: the `[tls]` block of a
//! daemon's config, starting one with its log in a file, and reading what a process costs from
//! `/proc` (resident memory, CPU time) and what a state directory holds on disk.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use ferry_common::pki::{Ca, Identity};

/// The `[tls]` section of a config for `who`, its certificate issued by `ca` into `pki` (once).
pub fn tls_toml(ca: &Ca, pki: &Path, who: Identity) -> anyhow::Result<String> {
    let p = ca.issue_if_missing(&who, pki)?;
    Ok(format!(
        "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        p.ca.display(),
        p.cert.display(),
        p.key.display()
    ))
}

/// Starts `bin run --config cfg`, logging at `level` (or `FERRY_BENCH_LOG`) into `log`.
pub fn spawn(bin: &Path, cfg: &Path, log: &Path, level: &str) -> anyhow::Result<Child> {
    let log = std::fs::File::create(log)?;
    Ok(Command::new(bin)
        .args(["run", "--config"])
        .arg(cfg)
        .env(
            "RUST_LOG",
            std::env::var("FERRY_BENCH_LOG").unwrap_or_else(|_| level.into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?)
}

/// Starts `bin` (a `ferry-coordinator`) as node 1 bootstrapping a single-node cluster, its
/// state in `<work>/coordinator` and its log in `<work>/coordinator.log`; returns the process
/// and where it serves (read from its log: it binds port 0).
pub fn start_coordinator(
    bin: &Path,
    work: &Path,
    ca: &Ca,
    pki: &Path,
) -> anyhow::Result<(Child, String)> {
    let cfg = work.join("coordinator.toml");
    std::fs::write(
        &cfg,
        format!(
            "node_id = 1\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nbootstrap = true\n{}",
            work.join("coordinator").display(),
            tls_toml(ca, pki, Identity::Coordinator(1))?
        ),
    )?;
    let log = work.join("coordinator.log");
    // Info: it says where it listens.
    let mut child = spawn(bin, &cfg, &log, "info")?;
    match crate::process::coordinator_addr(&mut child, &log) {
        Ok(addr) => Ok((child, addr.to_string())),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// A memory field of `/proc/<pid>/status` (`VmRSS:` now, `VmHWM:` the peak), in MiB; 0 when
/// the process is gone.
pub fn status_mib(pid: u32, field: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// CPU time (user + system, all threads) process `pid` has used, in seconds; 0 when gone.
pub fn cpu_secs(pid: u32) -> f64 {
    super::measure::cpu_secs_in(&format!("/proc/{pid}/stat"))
}

/// Bytes in the files below `dir` (their lengths, not their blocks); 0 when absent.
pub fn du_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => du_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
