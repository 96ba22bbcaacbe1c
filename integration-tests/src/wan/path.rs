//! An emulated path between two network namespaces: `<tag>a` holds `10.<n>.0.1`, `<tag>b` holds
//! `10.<n>.0.2`; each has one TUN device whose other end is this process, which forwards packets
//! through a [`Link`] per direction. Dropping the path stops the threads and deletes both
//! namespaces.
//!
//! [`WanPath::direct`] joins the same two namespaces with a veth pair instead: nothing but the
//! kernel between them, for an unimpaired LAN whose speed is not bounded by the forwarder (one
//! user-space copy per packet tops out near 1.5 Gbit/s here).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::link::{Fate, Link, LinkStats};
use super::sys;
use super::Profile;

/// MTU of the emulated path (an ordinary Ethernet WAN).
pub const MTU: usize = 1500;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Every namespace prefix this process created, for [`remove_all`] on a signal.
static CREATED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Kills every process in the namespaces this process created and deletes them. For signal
/// handlers: a process ended by a signal runs no destructors.
pub fn remove_all() {
    let created = CREATED.lock().map(|c| c.clone()).unwrap_or_default();
    for ns in created {
        kill_and_delete(&ns);
    }
}

fn kill_and_delete(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
    let _ = ip(&["netns", "del", ns]);
}

/// Removes namespaces left behind by emulators whose process is gone (killed by SIGKILL).
pub fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    let me = std::process::id() % 100_000;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("fw")
            .and_then(|r| r.split_once('x'))
            .and_then(|(p, _)| p.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
        if pid != me && !alive {
            kill_and_delete(name);
        }
    }
}

/// Runs `ip` (iproute2) with `args`; its error output if it fails.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether this machine lets us build a path (root, `ip`, /dev/net/tun); the reason if not.
pub fn unavailable() -> Option<String> {
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun does not exist".into());
    }
    let probe = format!("fwprobe{}", std::process::id() % 100_000);
    match ip(&["netns", "add", &probe]) {
        Ok(()) => {
            let _ = ip(&["netns", "del", &probe]);
            None
        }
        Err(e) => Some(format!(
            "cannot create network namespaces (needs root and iproute2): {e}"
        )),
    }
}

/// A running emulated path.
pub struct WanPath {
    /// Namespace of side A (the source side in benchmarks).
    pub ns_a: String,
    /// Namespace of side B.
    pub ns_b: String,
    /// Address of side A.
    pub addr_a: Ipv4Addr,
    /// Address of side B.
    pub addr_b: Ipv4Addr,
    /// The profile it emulates.
    pub profile: Profile,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    links: [Arc<Mutex<Link>>; 2],
}

type Queue = Arc<(Mutex<VecDeque<(Instant, Vec<u8>)>>, Condvar)>;

impl WanPath {
    /// Creates the namespaces and devices and starts forwarding with `profile`.
    pub fn create(profile: Profile, seed: u64) -> Result<WanPath, String> {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let tag = format!("fw{}x{n}", std::process::id() % 100_000);
        let subnet = 100 + ((std::process::id() + n * 37) % 150) as u8;
        let ns_a = format!("{tag}a");
        let ns_b = format!("{tag}b");
        let addr_a = Ipv4Addr::new(10, subnet, 0, 1);
        let addr_b = Ipv4Addr::new(10, subnet, 0, 2);
        let imp = profile.impairment();
        let links = [
            Arc::new(Mutex::new(Link::new(imp, seed))),
            Arc::new(Mutex::new(Link::new(imp, seed ^ 0x5eed))),
        ];
        let mut path = WanPath {
            ns_a: ns_a.clone(),
            ns_b: ns_b.clone(),
            addr_a,
            addr_b,
            profile,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            links,
        };
        let mut tuns = Vec::new();
        CREATED
            .lock()
            .expect("not poisoned")
            .extend([ns_a.clone(), ns_b.clone()]);
        for (ns, dev, me, peer) in [
            (&ns_a, format!("{tag}ta"), addr_a, addr_b),
            (&ns_b, format!("{tag}tb"), addr_b, addr_a),
        ] {
            ip(&["netns", "add", ns])?;
            let tun = sys::open_tun(&dev).map_err(|e| format!("cannot create TUN {dev}: {e}"))?;
            ip(&["link", "set", &dev, "netns", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &me.to_string(),
                "peer",
                &format!("{peer}/32"),
                "dev",
                &dev,
            ])?;
            ip(&["-n", ns, "link", "set", &dev, "mtu", &MTU.to_string(), "up"])?;
            tuns.push(Arc::new(tun));
        }
        for (dir, (from, to)) in [(0usize, (0usize, 1usize)), (1, (1, 0))] {
            let queue: Queue = Arc::default();
            let (input, output) = (tuns[from].clone(), tuns[to].clone());
            let (link, stop, q) = (path.links[dir].clone(), path.stop.clone(), queue.clone());
            path.threads.push(std::thread::spawn(move || {
                read_loop(&input, &link, &q, &stop)
            }));
            let (stop, q) = (path.stop.clone(), queue);
            path.threads
                .push(std::thread::spawn(move || write_loop(&output, &q, &stop)));
        }
        Ok(path)
    }

    /// Two namespaces joined by a veth pair (no emulator, no impairment).
    pub fn direct(profile: Profile) -> Result<WanPath, String> {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let tag = format!("fw{}x{n}", std::process::id() % 100_000);
        let subnet = 100 + ((std::process::id() + n * 37) % 150) as u8;
        let (ns_a, ns_b) = (format!("{tag}a"), format!("{tag}b"));
        let addr_a = Ipv4Addr::new(10, subnet, 0, 1);
        let addr_b = Ipv4Addr::new(10, subnet, 0, 2);
        let imp = profile.impairment();
        let path = WanPath {
            ns_a: ns_a.clone(),
            ns_b: ns_b.clone(),
            addr_a,
            addr_b,
            profile,
            stop: Arc::new(AtomicBool::new(true)),
            threads: Vec::new(),
            links: [
                Arc::new(Mutex::new(Link::new(imp, 0))),
                Arc::new(Mutex::new(Link::new(imp, 0))),
            ],
        };
        CREATED
            .lock()
            .expect("not poisoned")
            .extend([ns_a.clone(), ns_b.clone()]);
        let (va, vb) = (format!("{tag}va"), format!("{tag}vb"));
        ip(&["netns", "add", &ns_a])?;
        ip(&["netns", "add", &ns_b])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        for (ns, dev, me) in [(&ns_a, &va, addr_a), (&ns_b, &vb, addr_b)] {
            ip(&["link", "set", dev, "netns", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "addr", "add", &format!("{me}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "mtu", &MTU.to_string(), "up"])?;
        }
        Ok(path)
    }

    /// Counters of the A→B and B→A directions.
    pub fn stats(&self) -> [LinkStats; 2] {
        [
            self.links[0].lock().expect("not poisoned").stats,
            self.links[1].lock().expect("not poisoned").stats,
        ]
    }

    /// A command that runs `program` in namespace `ns` (`ip netns exec`).
    pub fn command(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }
}

impl Drop for WanPath {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for ns in [&self.ns_a, &self.ns_b] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

fn read_loop(input: &File, link: &Mutex<Link>, q: &Queue, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65536];
    let mut f = input;
    while !stop.load(Ordering::Relaxed) {
        match sys::wait_readable(input, Duration::from_millis(100)) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => return,
        }
        let n = match f.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let fate = link.lock().expect("not poisoned").admit(Instant::now(), n);
        if let Fate::Deliver(at) = fate {
            let (lock, cv) = &**q;
            lock.lock()
                .expect("not poisoned")
                .push_back((at, buf[..n].to_vec()));
            cv.notify_one();
        }
    }
}

fn write_loop(output: &File, q: &Queue, stop: &AtomicBool) {
    let (lock, cv) = &**q;
    let mut f = output;
    let mut guard = lock.lock().expect("not poisoned");
    while !stop.load(Ordering::Relaxed) {
        let Some(&(at, _)) = guard.front() else {
            guard = cv
                .wait_timeout(guard, Duration::from_millis(100))
                .expect("not poisoned")
                .0;
            continue;
        };
        let now = Instant::now();
        if at > now {
            guard = cv.wait_timeout(guard, at - now).expect("not poisoned").0;
            continue;
        }
        let (_, pkt) = guard.pop_front().expect("front exists");
        drop(guard);
        // A packet the namespace's stack refuses (e.g. while it is torn down) is a lost packet.
        let _ = f.write(&pkt);
        guard = lock.lock().expect("not poisoned");
    }
}
