//! Jobs through the operator's command line, against real processes: `ferryctl assess` (the
//! agent walks its host's tree), `ferryctl probe` (two agents measure the path between them,
//! over loopback and over the WAN emulator, whose round-trip time and loss it must find), and
//! `ferryctl plan` reading both results.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use ferry_common::pki::Identity;
use ferry_integration_tests::wan::{path, Profile, WanPath};

use crate::harness::{agent_bin, ferryctl_bin, CoordinatorProcess, TestEnv};
use crate::processes::{ferryctl, json, spawn_agent, terminate, wait_registered};

/// What an independent walk of `root` counts: (files, bytes, dirs, hardlinks, hole bytes).
fn walk(root: &Path) -> (u64, u64, u64, u64, u64) {
    let mut seen = std::collections::BTreeSet::new();
    let (mut files, mut bytes, mut dirs, mut links, mut holes) = (0, 0, 0, 0, 0);
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                dirs += 1;
                stack.push(p);
            } else if m.is_file() {
                if !seen.insert((m.dev(), m.ino())) {
                    links += 1;
                    continue;
                }
                files += 1;
                bytes += m.len();
                holes += m.len().saturating_sub(m.blocks() * 512);
            }
        }
    }
    (files, bytes, dirs, links, holes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assess_and_probe_run_on_agent_processes_and_plan_reads_their_results() {
    let env = TestEnv::new();
    env.issue(Identity::Admin("ops".into()));
    let src = env.path("src");
    std::fs::create_dir_all(src.join("shards/a")).unwrap();
    for i in 0..40u64 {
        std::fs::write(
            src.join(format!("shards/a/{i}.bin")),
            vec![i as u8; 1000 + i as usize],
        )
        .unwrap();
    }
    std::fs::write(src.join("model.ckpt"), vec![7u8; 3 << 20]).unwrap();
    std::fs::hard_link(src.join("model.ckpt"), src.join("model-latest.ckpt")).unwrap();
    // A sparse file: 8 MiB long, 4 KiB written.
    let sparse = std::fs::File::create(src.join("sparse.img")).unwrap();
    sparse.set_len(8 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&sparse, &[1u8; 4096], 1 << 20).unwrap();
    drop(sparse);
    let (files, bytes, dirs, hardlinks, holes) = walk(&src);

    let root = env.path("dst");
    let coord = CoordinatorProcess::start(&env).unwrap();
    let addr = coord.addr.clone();
    let mut target = spawn_agent(&env, "dst", &addr, Some(&root));
    let mut source = spawn_agent(&env, "src", &addr, None);
    let ctl = env.ctl(&addr).await;
    wait_registered(&ctl, "dst", true).await;
    wait_registered(&ctl, "src", false).await;

    // Assess: the agent's totals are those of an independent walk.
    let path = src.display().to_string();
    let a = json(&ferryctl(
        &env,
        &addr,
        &["assess", "src", &path, "-o", "json"],
    ));
    assert_eq!(a["state"], "done", "{a}");
    let r = &a["result"];
    assert_eq!(r["files"], files);
    assert_eq!(r["bytes"], bytes);
    assert_eq!(r["dirs"], dirs);
    assert_eq!(r["hardlinks"], hardlinks);
    assert_eq!(r["hole_bytes"], holes);
    assert_eq!(r["sparse_files"], 1);
    let largest = r["largest"][0][0].as_str().unwrap();
    assert!(
        largest.ends_with("/sparse.img"),
        "absolute paths: {largest}"
    );
    let assess_id = a["id"].as_u64().unwrap().to_string();
    // The table form of the same job.
    let shown = ferryctl(&env, &addr, &["jobs", &assess_id]);
    assert!(shown.status.success());
    assert!(String::from_utf8_lossy(&shown.stdout).contains("Assessment (job"));

    // Probe over loopback: every run moved bytes, the round trip is short.
    let p = json(&ferryctl(
        &env,
        &addr,
        &[
            "probe",
            "src",
            "dst",
            "--seconds",
            "2",
            "--streams",
            "2",
            "--congestion",
            "bbr",
            "-o",
            "json",
        ],
    ));
    assert_eq!(p["state"], "done", "{p}");
    let runs = p["result"]["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "streams 1 and 2 with bbr: {p}");
    assert!(runs.iter().all(|r| r["bytes"].as_u64().unwrap() > 0), "{p}");
    assert!(p["result"]["rtt_ms"].as_f64().unwrap() < 50.0, "{p}");
    let probe_id = p["id"].as_u64().unwrap().to_string();

    // Both are kept, newest first.
    let jobs = json(&ferryctl(&env, &addr, &["jobs", "-o", "json"]));
    let kinds: Vec<_> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["probe", "assess"]);
    assert_eq!(
        jobs[0]["result"], "",
        "the list leaves results to `jobs ID`"
    );

    // Plan from them: the data is what the assessment found to cross the wire.
    let catalog = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/plan/catalog.example.toml"
    );
    let plan = json(&ferryctl(
        &env,
        &addr,
        &[
            "plan",
            "--assessed",
            &assess_id,
            "--probed",
            &probe_id,
            "--deadline",
            "1h",
            "--catalog",
            catalog,
            "-o",
            "json",
        ],
    ));
    assert!(
        plan.to_string().contains(&(bytes - holes).to_string()),
        "{plan}"
    );

    // The same list as YAML reads back (by PyYAML) as the JSON.
    let yaml = ferryctl(&env, &addr, &["jobs", "-o", "yaml"]);
    assert!(yaml.status.success());
    match yaml_to_json(&yaml.stdout) {
        Some(v) => assert_eq!(v, jobs),
        None => crate::harness::skip("python3 with PyYAML is not installed"),
    }

    // The migration the plan was for; `--watch -o json` prints one JSON object per look.
    let create = [
        "migration",
        "create",
        "--name",
        "planned",
        "--source",
        &format!("src:{path}"),
        "--target",
        "dst:copy",
    ];
    assert!(ferryctl(&env, &addr, &create).status.success());
    let watched = ferryctl(
        &env,
        &addr,
        &["migration", "status", "planned", "--watch", "-o", "json"],
    );
    assert!(
        watched.status.success(),
        "{}",
        String::from_utf8_lossy(&watched.stderr)
    );
    let looks: Vec<serde_json::Value> = String::from_utf8_lossy(&watched.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert!(!looks.is_empty());
    assert_eq!(looks.last().unwrap()["phase"], "done");

    // Refusals with their exit codes: an unknown agent is not found (4); an agent that cannot
    // receive cannot be probed (5); a result asked of the wrong kind of job is an error.
    let unknown = ferryctl(&env, &addr, &["assess", "nobody", "/data"]);
    assert_eq!(
        unknown.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
    let cannot = ferryctl(&env, &addr, &["probe", "dst", "src", "--seconds", "1"]);
    assert_eq!(cannot.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&cannot.stderr).contains("cannot receive"));
    let wrong = ferryctl(
        &env,
        &addr,
        &[
            "plan",
            "--assessed",
            &probe_id,
            "--deadline",
            "1h",
            "--catalog",
            catalog,
        ],
    );
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("not assess job"));
    // A path that does not exist: the job fails with the reason, exit 7.
    let missing = ferryctl(&env, &addr, &["assess", "src", "/no/such/ferry/dir"]);
    assert_eq!(missing.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/no/such/ferry/dir"));

    terminate(&mut source, "source agent");
    terminate(&mut target, "target agent");
}

/// YAML read by PyYAML and written back as JSON (None without python3 and PyYAML; YAML it
/// cannot read fails the test).
fn yaml_to_json(yaml: &[u8]) -> Option<serde_json::Value> {
    use std::io::Write;
    let has_pyyaml = std::process::Command::new("python3")
        .args(["-c", "import yaml"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_pyyaml {
        return None;
    }
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(yaml).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "PyYAML cannot read: {}",
        String::from_utf8_lossy(yaml)
    );
    Some(serde_json::from_slice(&out.stdout).expect("python prints JSON"))
}

/// Spawns `bin run --config <cfg>` in namespace `ns`, logging to `log`.
fn spawn_in(ns: &str, bin: &str, cfg: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    WanPath::command(ns, bin)
        .args(["run", "--config"])
        .arg(cfg)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn a_probe_over_the_emulated_wan_finds_its_round_trip_time_and_loss() {
    if let Some(why) = path::unavailable() {
        crate::harness::skip(&format!("the WAN emulator cannot run here: {why}"));
        return;
    }
    const RTT_MS: f64 = 60.0;
    const LOSS: f64 = 0.01;
    let profile = Profile {
        name: "probe",
        rtt: Duration::from_millis(RTT_MS as u64),
        jitter: Duration::ZERO,
        loss: LOSS,
        rate_bps: None,
    };
    let wan = WanPath::create(profile, 7).expect("create the emulated path");
    let env = TestEnv::new();
    env.issue(Identity::Admin("ops".into()));
    let b = wan.addr_b;
    let tls = |who: Identity| {
        let p = env.issue(who);
        format!(
            "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            p.ca.display(),
            p.cert.display(),
            p.key.display()
        )
    };
    let write = |name: &str, text: String| {
        let p = env.path(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let coord_cfg = write(
        "coordinator.toml",
        format!(
            "node_id = 1\nlisten = \"{b}:7400\"\ndata_dir = \"{}\"\nbootstrap = true\n{}",
            env.path("coordinator").display(),
            tls(Identity::Coordinator(1))
        ),
    );
    let dst_cfg = write(
        "dst.toml",
        format!(
            "name = \"dst\"\ncoordinator = \"{b}:7400\"\ndata_listen = \"{b}:7401\"\nroot = \"{}\"\nstate_dir = \"{}\"\n{}",
            env.path("dst-root").display(),
            env.path("dst-state").display(),
            tls(Identity::Agent("dst".into()))
        ),
    );
    let src_cfg = write(
        "src.toml",
        format!(
            "name = \"src\"\ncoordinator = \"{b}:7400\"\nstate_dir = \"{}\"\n{}",
            env.path("src-state").display(),
            tls(Identity::Agent("src".into()))
        ),
    );
    std::fs::create_dir_all(env.path("dst-root")).unwrap();
    let coordinator = env!("CARGO_BIN_EXE_it-coordinator");
    let _procs = Killed(vec![
        spawn_in(
            &wan.ns_b,
            coordinator,
            &coord_cfg,
            &env.path("coordinator.log"),
        ),
        spawn_in(&wan.ns_b, agent_bin(), &dst_cfg, &env.path("dst.log")),
        spawn_in(&wan.ns_a, agent_bin(), &src_cfg, &env.path("src.log")),
    ]);
    let ctl = |args: &[&str]| {
        WanPath::command(&wan.ns_b, ferryctl_bin())
            .args(["--coordinator", &format!("{b}:7400"), "--pki-dir"])
            .arg(env.pki())
            .args(["--admin", "ops"])
            .args(args)
            .output()
            .unwrap()
    };
    // Both agents registered (the source's registration crossed the emulated path).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = ctl(&["agents", "list", "-o", "json"]);
        let live = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| {
                v.as_array()
                    .map(|a| a.iter().filter(|x| x["status"] == "live").count())
            });
        if live == Some(2) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "agents did not register: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(env.path("src.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = ctl(&[
        "probe",
        "src",
        "dst",
        "--seconds",
        "8",
        "--streams",
        "4",
        "--congestion",
        "bbr",
        "-o",
        "json",
    ]);
    let p = json(&out);
    let r = &p["result"];
    let rtt = r["rtt_ms"].as_f64().unwrap();
    let loss = r["loss"].as_f64().unwrap();
    let [a_to_b, _] = wan.stats();
    let line_loss = a_to_b.lost as f64 / a_to_b.packets.max(1) as f64;
    eprintln!(
        "probe over {RTT_MS} ms, {LOSS} loss: rtt {rtt:.2} ms, loss {loss:.4} ({} of {} packets), \
         under load {} of {}; the emulator dropped {} of {} ({line_loss:.4}) from src to dst",
        r["packets_lost"],
        r["packets_sent"],
        r["load_loss"],
        r["load_packets_sent"],
        a_to_b.lost,
        a_to_b.packets
    );
    assert!((rtt - RTT_MS).abs() <= RTT_MS * 0.2, "rtt {rtt} ms: {p}");
    assert!((loss - LOSS).abs() <= LOSS * 0.2, "loss {loss}: {p}");
    assert!(r["best"]["bytes_per_sec"].as_f64().unwrap() > 0.0, "{p}");
}
