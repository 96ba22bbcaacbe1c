//! What a benchmark run costs the machine, measured the same way for every tool:
//!
//! - **CPU seconds**: all CPU time the machine spent during the run (`/proc/stat`), minus the
//!   harness's own (the WAN emulator's forwarding threads live in the harness). Both ends of
//!   every tool run on this machine, so this is sender + receiver (+ sshd, + ferry's
//!   coordinator).
//! - **Peak RSS**: the largest sum, sampled every 50 ms, of the resident memory of the processes
//!   in the emulated path's two network namespaces, except the idle daemons of the other tools.

use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Linux reports `/proc` CPU times in USER_HZ, which is 100 on every architecture Linux runs.
const USER_HZ: f64 = 100.0;

/// Busy CPU time of the whole machine so far, in seconds.
pub fn machine_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    // cpu user nice system idle iowait irq softirq steal ...
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let busy = [0usize, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| f.get(i))
        .sum::<u64>();
    busy as f64 / USER_HZ
}

/// CPU time of this process so far (all threads), in seconds.
pub fn own_cpu_secs() -> f64 {
    cpu_secs_in("/proc/self/stat")
}

/// CPU time (user + system, all threads) in a `/proc/<pid>/stat` file, in seconds; 0 when it
/// cannot be read (the process is gone).
pub fn cpu_secs_in(stat_file: &str) -> f64 {
    let stat = std::fs::read_to_string(stat_file).unwrap_or_default();
    // The command name may hold spaces: fields after the last ')' start at field 3.
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the ')'.
    (ticks(11) + ticks(12)) as f64 / USER_HZ
}

/// Samples the memory of the processes in some network namespaces until stopped.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    peak_kib: Arc<AtomicU64>,
    peak_agent_kib: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Peak resident memory seen while sampling, in MiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peaks {
    /// Of all the tool's processes together.
    pub all_mib: f64,
    /// Of the largest single ferry agent process (0 for other tools).
    pub agent_mib: f64,
}

fn ns_inode(ns: &str) -> Option<u64> {
    std::fs::metadata(format!("/run/netns/{ns}"))
        .ok()
        .map(|m| m.ino())
}

/// The summed RSS (KiB) of the processes in the namespaces `inodes`, and the largest of a ferry
/// agent among them.
fn rss_in(inodes: &[u64], exclude: &[u32]) -> (u64, u64) {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return (0, 0);
    };
    let (mut sum, mut agent) = (0, 0);
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if pid.parse().is_ok_and(|p: u32| exclude.contains(&p)) {
            continue;
        }
        let Ok(ns) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if !inodes.contains(&ns.ino()) {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        sum += rss;
        let is_agent = status
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .is_some_and(|n| matches!(n.trim(), "it-agent" | "ferry-agent"));
        if is_agent {
            agent = agent.max(rss);
        }
    }
    (sum, agent)
}

impl RssSampler {
    /// Starts sampling the processes of namespaces `ns`, leaving out the pids in `exclude`.
    pub fn start(ns: &[&str], exclude: Vec<u32>) -> RssSampler {
        let inodes: Vec<u64> = ns.iter().filter_map(|n| ns_inode(n)).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let peak_kib = Arc::new(AtomicU64::new(0));
        let peak_agent_kib = Arc::new(AtomicU64::new(0));
        let (s, p, pa) = (stop.clone(), peak_kib.clone(), peak_agent_kib.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let (all, agent) = rss_in(&inodes, &exclude);
                p.fetch_max(all, Ordering::Relaxed);
                pa.fetch_max(agent, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        RssSampler {
            stop,
            peak_kib,
            peak_agent_kib,
            thread: Some(thread),
        }
    }

    /// Stops and returns the peaks.
    pub fn finish(mut self) -> Peaks {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        Peaks {
            all_mib: self.peak_kib.load(Ordering::Relaxed) as f64 / 1024.0,
            agent_mib: self.peak_agent_kib.load(Ordering::Relaxed) as f64 / 1024.0,
        }
    }
}
