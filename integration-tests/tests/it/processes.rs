//! Everything as real processes, driven through the `ferryctl` command line an operator uses:
//! a coordinator process, two agent processes, and SIGTERM shutdown of each.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use ferry_common::pki::Identity;

use ferry_proto::admin::Phase;

use crate::harness::{
    agent_bin, assert_same_tree, ferryctl_bin, finished, make_files, wait_for, CoordinatorProcess,
    TestEnv,
};

/// Runs `ferryctl` as admin "ops" (issue its certificate first) against `addr`.
pub fn ferryctl(env: &TestEnv, addr: &str, args: &[&str]) -> Output {
    Command::new(ferryctl_bin())
        .args(["--coordinator", addr, "--pki-dir"])
        .arg(env.pki())
        .args(["--admin", "ops"])
        .args(args)
        .output()
        .expect("run ferryctl")
}

pub fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "ferryctl failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ferryctl -o json prints JSON")
}

/// Starts `ferry-agent` as a process (config and log in the test directory); `root` makes it a
/// target.
pub fn spawn_agent(env: &TestEnv, name: &str, coord: &str, root: Option<&Path>) -> Child {
    spawn_agent_with(env, name, coord, root, "")
}

/// [`spawn_agent`] with `extra` appended to its config (a `[hooks]` section, say).
pub fn spawn_agent_with(
    env: &TestEnv,
    name: &str,
    coord: &str,
    root: Option<&Path>,
    extra: &str,
) -> Child {
    let top = match root {
        Some(root) => format!(
            "data_listen = \"127.0.0.1:0\"\nroot = \"{}\"\n",
            root.display()
        ),
        None => String::new(),
    };
    spawn_agent_toml(env, name, coord, &top, extra)
}

/// An agent process whose config has `top` among its top-level keys and `extra` (sections)
/// after its `[tls]` section.
pub fn spawn_agent_toml(env: &TestEnv, name: &str, coord: &str, top: &str, extra: &str) -> Child {
    spawn_agent_toml_env(env, name, coord, top, extra, &[])
}

/// [`spawn_agent_toml`] with environment variables `vars` set for the process.
pub fn spawn_agent_toml_env(
    env: &TestEnv,
    name: &str,
    coord: &str,
    top: &str,
    extra: &str,
    vars: &[(String, String)],
) -> Child {
    let tls = env.issue(Identity::Agent(name.into()));
    let mut cfg = format!(
        "name = \"{name}\"\ncoordinator = \"{coord}\"\nstate_dir = \"{}\"\n",
        env.path(&format!("agent-{name}")).display()
    );
    cfg.push_str(top);
    cfg.push_str(&format!(
        "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        tls.ca.display(),
        tls.cert.display(),
        tls.key.display()
    ));
    cfg.push_str(extra);
    let path = env.path(&format!("agent-{name}.toml"));
    std::fs::write(&path, cfg).unwrap();
    let log = std::fs::File::create(env.path(&format!("agent-{name}.log"))).unwrap();
    Command::new(agent_bin())
        .args(["run", "--config"])
        .arg(&path)
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Waits until the agent `name` (a process just spawned) is registered and live, with a data
/// address when it is a target: a migration naming it is refused before.
pub async fn wait_registered(ctl: &ferryctl::ctl::Ctl, name: &str, target: bool) {
    wait_for(
        &format!("agent {name} to register"),
        Duration::from_secs(30),
        || async {
            let agents = ctl.agents().await.ok()?;
            agents
                .iter()
                .any(|a| {
                    a.name == name && a.status == "live" && (!target || !a.data_addr.is_empty())
                })
                .then_some(())
        },
    )
    .await;
}

/// Sends SIGTERM and waits (bounded) for a clean exit.
pub fn terminate(child: &mut Child, what: &str) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            assert!(s.success(), "{what} exited with {s} after SIGTERM");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not stop within 20 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_drives_a_migration_between_agent_processes_with_ferryctl() {
    let env = TestEnv::new();
    env.issue(Identity::Admin("ops".into()));
    let src = env.path("src");
    make_files(&src, 120, 20 * 1024);
    std::fs::write(src.join("weights.bin"), vec![3u8; 700 * 1024]).unwrap();
    let root = env.path("dst");
    let mut coord = CoordinatorProcess::start(&env).unwrap();
    let addr = coord.addr.clone();
    let mut target = spawn_agent(&env, "dst-01", &addr, Some(&root));
    let mut source = spawn_agent(&env, "src-01", &addr, None);

    let agents = wait_for("both agents registered", Duration::from_secs(30), || {
        let out = ferryctl(&env, &addr, &["agents", "list", "-o", "json"]);
        let ok = out.status.success();
        async move {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok().filter(|_| ok)?;
            (v.as_array()?.len() == 2).then_some(v)
        }
    })
    .await;
    assert_eq!(agents[0]["name"], "dst-01");

    let status = json(&ferryctl(&env, &addr, &["cluster", "status", "-o", "json"]));
    assert_eq!(status["leader_id"], 1);
    assert_eq!(status["members"].as_array().unwrap().len(), 1);

    let source_arg = format!("src-01:{}", src.display());
    let create = [
        "migration",
        "create",
        "--source",
        &source_arg,
        "--target",
        "dst-01:copy",
        "--segment-size",
        "262144",
        "-o",
        "json",
    ];
    let created = json(&ferryctl(&env, &addr, &create));
    let id = created["migration_id"].as_u64().unwrap().to_string();
    let name = created["name"].as_str().unwrap().to_string();
    // The same command run again is refused (its default name is taken), not a second copy.
    let again = ferryctl(&env, &addr, &create);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains(&format!(
            "a migration named {name} already exists (id {id})"
        )),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    // Watched by name.
    let watched = ferryctl(&env, &addr, &["migration", "status", &name, "--watch"]);
    assert!(
        watched.status.success(),
        "{}",
        String::from_utf8_lossy(&watched.stderr)
    );
    assert!(String::from_utf8_lossy(&watched.stderr).contains("done"));

    let verify = ferryctl(&env, &addr, &["migration", "verify", &id]);
    assert!(
        verify.status.success(),
        "verify exits 0 when verified: {}",
        String::from_utf8_lossy(&verify.stdout)
    );
    assert!(String::from_utf8_lossy(&verify.stdout).contains("VERIFIED"));
    let list = json(&ferryctl(&env, &addr, &["migration", "list", "-o", "json"]));
    assert_eq!(list[0]["phase"], "done");
    assert_same_tree(&src, &root.join("copy"));

    // An unknown migration is a clear error and a non-zero exit.
    let missing = ferryctl(&env, &addr, &["migration", "verify", "99"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("migration 99 does not exist"));

    terminate(&mut source, "source agent");
    terminate(&mut target, "target agent");
    // The coordinator stops cleanly on SIGTERM and its sled directory opens again.
    terminate(coord.child_mut(), "coordinator");
    coord.restart().unwrap();
    let again = wait_for("coordinator back", Duration::from_secs(30), || {
        let out = ferryctl(&env, &addr, &["migration", "list", "-o", "json"]);
        async move {
            out.status
                .success()
                .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap())
        }
    })
    .await;
    assert_eq!(again[0]["phase"], "done", "state survived the restart");
}

/// Sends SIGHUP to `child`.
fn hang_up(child: &Child) {
    let status = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Issue 15 (daemon behaviour): SIGHUP used to kill a daemon. Now a running agent reads its
/// config again: the log level changes without a restart, keys that need one are named, and a
/// config that does not parse changes nothing. Logs written to a file carry no terminal
/// colours, `FERRY_JSON_LOGS=1` (not only `true`) gives one JSON object per line, and a
/// config key can come from the environment (`FERRY_AGENT_LOG_LEVEL`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_log_level_and_logs_are_plain_or_json_as_asked() {
    let env = TestEnv::new();
    let coord = CoordinatorProcess::start(&env).unwrap();
    let ctl = env.ctl(&coord.addr).await;
    let mut agent = spawn_agent(&env, "hup", &coord.addr, None);
    wait_registered(&ctl, "hup", false).await;
    let log = env.path("agent-hup.log");
    let config = env.path("agent-hup.toml");
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    assert!(
        !read(&log).contains('\u{1b}'),
        "colour codes in a file:\n{}",
        read(&log)
    );
    assert!(
        !read(&log).contains("DEBUG"),
        "info by default:\n{}",
        read(&log)
    );

    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!(
            "log_level = \"info,ferry_agent=debug\"\nmax_in_flight = 3\n{original}\n[hooks]\npre_freeze = \"systemctl stop app\"\n"
        ),
    )
    .unwrap();
    hang_up(&agent);
    wait_for(
        "debug lines after SIGHUP",
        Duration::from_secs(30),
        || async { read(&log).contains("DEBUG").then_some(()) },
    )
    .await;
    let text = read(&log);
    assert!(text.contains("Log level set from the config."), "{text}");
    let restart = text
        .lines()
        .find(|l| l.contains("take effect only when the daemon restarts"))
        .unwrap_or_else(|| panic!("no restart warning:\n{text}"));
    // The hooks are applied at once; max_in_flight waits for a restart.
    assert!(restart.contains("max_in_flight"), "{restart}");
    assert!(!restart.contains("hooks"), "{restart}");
    assert!(text.contains("Cutover hooks set from the config"), "{text}");

    std::fs::write(&config, "name = [").unwrap();
    hang_up(&agent);
    wait_for("the refused reload", Duration::from_secs(30), || async {
        read(&log).contains("Config not reloaded").then_some(())
    })
    .await;
    assert!(agent.try_wait().unwrap().is_none(), "the agent still runs");
    wait_registered(&ctl, "hup", false).await;
    terminate(&mut agent, "agent");

    std::fs::write(&config, &original).unwrap();
    let json_log = env.path("agent-hup-json.log");
    let out = std::fs::File::create(&json_log).unwrap();
    let mut json_agent = Command::new(agent_bin())
        .env("FERRY_JSON_LOGS", "1")
        // Any config key from the environment (EnvironmentFile=).
        .env("FERRY_AGENT_LOG_LEVEL", "info,ferry_agent=debug")
        .args(["run", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    wait_for(
        "the JSON agent's debug lines",
        Duration::from_secs(30),
        || async { read(&json_log).contains("\"DEBUG\"").then_some(()) },
    )
    .await;
    terminate(&mut json_agent, "agent with JSON logs");
    let mut levels = Vec::new();
    for line in read(&json_log).lines().filter(|l| !l.trim().is_empty()) {
        let v = serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        levels.push(v["level"].as_str().unwrap_or_default().to_string());
    }
    assert!(
        levels.iter().any(|l| l == "DEBUG"),
        "FERRY_AGENT_LOG_LEVEL set the level: {levels:?}"
    );
}

/// Reads what the daemon told systemd on `sock` until `done` holds for what arrived (or 30 s).
fn notifications(
    sock: &std::os::unix::net::UnixDatagram,
    got: &mut Vec<String>,
    what: &str,
    done: impl Fn(&[String]) -> bool,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 4096];
    while !done(got) {
        assert!(
            std::time::Instant::now() < deadline,
            "no {what} within 30 s; got {got:?}"
        );
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
}

/// Issue 15: what `systemctl status` and `systemctl reload` see of a running agent, through
/// its `$NOTIFY_SOCKET`: READY=1 once it serves, STATUS= lines with its counters, RELOADING=1
/// then READY=1 around a SIGHUP, STOPPING=1 at SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_tells_systemd_its_readiness_status_and_reloads() {
    let env = TestEnv::new();
    let coord = CoordinatorProcess::start(&env).unwrap();
    let ctl = env.ctl(&coord.addr).await;
    // The config and identity spawn_agent writes, then the same agent with a notify socket.
    let mut first = spawn_agent(&env, "notified", &coord.addr, None);
    wait_registered(&ctl, "notified", false).await;
    terminate(&mut first, "agent");
    let socket_path = env.path("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let out = std::fs::File::create(env.path("agent-notified-2.log")).unwrap();
    let mut agent = Command::new(agent_bin())
        .env("NOTIFY_SOCKET", &socket_path)
        .args(["run", "--config"])
        .arg(env.path("agent-notified.toml"))
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let mut got = Vec::new();
    notifications(&sock, &mut got, "READY=1 and a status line", |g| {
        g.iter().any(|m| m == "READY=1") && g.iter().any(|m| m.starts_with("STATUS=sent "))
    });
    let status = got.iter().find(|m| m.starts_with("STATUS=")).unwrap();
    assert!(
        status.contains("segments verified") && status.contains("received"),
        "{status}"
    );
    got.clear();
    hang_up(&agent);
    notifications(&sock, &mut got, "RELOADING=1 then READY=1", |g| {
        let reloading = g.iter().position(|m| m == "RELOADING=1");
        let ready = g.iter().rposition(|m| m == "READY=1");
        matches!((reloading, ready), (Some(a), Some(b)) if a < b)
    });
    got.clear();
    let status = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    notifications(&sock, &mut got, "STOPPING=1", |g| {
        g.iter().any(|m| m == "STOPPING=1")
    });
    assert!(agent.wait().unwrap().success());
}

/// Issue 15's done-when: SIGHUP changes the log level of a running agent without dropping its
/// transfer. A throttled migration is mid-transfer when both agents get SIGHUP with a new log
/// level: the migration finishes with each segment leased once and nothing failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_mid_transfer_changes_the_log_level_and_drops_nothing() {
    let env = TestEnv::new();
    env.issue(Identity::Admin("ops".into()));
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let bytes: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(src.join("model.bin"), &bytes).unwrap();
    let root = env.path("dst");
    let coord = CoordinatorProcess::start(&env).unwrap();
    let ctl = env.ctl(&coord.addr).await;
    let mut target = spawn_agent(&env, "dst-h", &coord.addr, Some(&root));
    let mut source = spawn_agent(&env, "src-h", &coord.addr, None);
    wait_registered(&ctl, "dst-h", true).await;
    wait_registered(&ctl, "src-h", false).await;
    let source_arg = format!("src-h:{}", src.display());
    let created = json(&ferryctl(
        &env,
        &coord.addr,
        &[
            "migration",
            "create",
            "--source",
            &source_arg,
            "--target",
            "dst-h:copy",
            "--throttle",
            "4mbit",
            "-o",
            "json",
        ],
    ));
    let id = created["migration_id"].as_u64().unwrap();
    // 3 MiB at 4 Mbit/s: about 6 s of transfer once leased.
    wait_for(
        "the segment to be leased",
        Duration::from_secs(30),
        || async { (ctl.status(id).await.ok()?.leases_granted >= 1).then_some(()) },
    )
    .await;
    for name in ["src-h", "dst-h"] {
        let config = env.path(&format!("agent-{name}.toml"));
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(&config, format!("log_level = \"debug\"\n{text}")).unwrap();
    }
    hang_up(&source);
    hang_up(&target);
    let p = ctl.status(id).await.unwrap();
    assert_ne!(p.phase(), Phase::Done, "the SIGHUPs came mid-transfer");
    let log = |name: &str| {
        std::fs::read_to_string(env.path(&format!("agent-{name}.log"))).unwrap_or_default()
    };
    finished(&ctl, id, Duration::from_secs(60), &|| log("src-h")).await;
    let p = ctl.status(id).await.unwrap();
    assert_eq!(
        p.leases_granted, p.segments_total,
        "no segment leased twice: {p:?}"
    );
    assert_eq!(p.failed_attempts, 0, "{p:?}");
    for name in ["src-h", "dst-h"] {
        assert!(
            log(name).contains("Log level set from the config."),
            "{}",
            log(name)
        );
    }
    assert_same_tree(&src, &root.join("copy"));
    terminate(&mut source, "source agent");
    terminate(&mut target, "target agent");
}

/// Issue 15 (quiet logs): a peer that fails its QUIC handshake again and again (here: a
/// certificate of another CA, as fast as it can dial) costs the target one warning per
/// `LOG_EVERY`, the next one saying how many it held back, not a line per attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_failing_its_handshake_again_and_again_is_logged_once_per_period() {
    let env = TestEnv::new();
    let coord = CoordinatorProcess::start(&env).unwrap();
    let ctl = env.ctl(&coord.addr).await;
    let root = env.path("dst");
    let mut target = spawn_agent(&env, "dst-h", &coord.addr, Some(&root));
    wait_registered(&ctl, "dst-h", true).await;
    let addr: std::net::SocketAddr = ctl
        .agents()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.name == "dst-h")
        .unwrap()
        .data_addr
        .parse()
        .unwrap();
    let other = TestEnv::new();
    let foreign =
        ferry_common::tls::TlsMaterial::load(&other.issue(Identity::Agent("src-h".into())))
            .unwrap()
            .quic_client()
            .unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let log = || std::fs::read_to_string(env.path("agent-dst-h.log")).unwrap_or_default();
    let warned = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.contains("QUIC handshake failed."))
            .map(String::from)
            .collect()
    };
    let mut failures = 0u64;
    let fail_once = || {
        let (ep, foreign) = (ep.clone(), foreign.clone());
        async move {
            let r = ep
                .connect_with(foreign, addr, &ferry_common::names::agent_dns("dst-h"))
                .unwrap()
                .await;
            assert!(r.is_err(), "a certificate of another CA was accepted");
        }
    };
    let started = std::time::Instant::now();
    for _ in 0..100 {
        fail_once().await;
        failures += 1;
    }
    let elapsed = started.elapsed();
    let first = wait_for("the first warning", Duration::from_secs(10), || async {
        let w = warned(&log());
        (!w.is_empty()).then_some(w)
    })
    .await;
    let bound = 1 + (elapsed.as_secs() / ferry_agent::target::LOG_EVERY.as_secs()) as usize;
    assert!(
        first.len() <= bound,
        "{} warnings for {failures} failed handshakes in {elapsed:?}:\n{}",
        first.len(),
        first.join("\n")
    );
    // The peer keeps failing: once the period is over, one more line tells how many were held.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let lines = loop {
        let w = warned(&log());
        if w.len() > first.len() {
            break w;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no second warning:\n{}",
            log()
        );
        fail_once().await;
        failures += 1;
    };
    let held: u64 = lines
        .last()
        .unwrap()
        .split_whitespace()
        .find_map(|w| w.strip_prefix("held_back="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(held > 0, "{lines:?}");
    assert!(
        (lines.len() as u64) * 10 < failures,
        "{} lines for {failures} failures",
        lines.len()
    );
    terminate(&mut target, "target agent");
}
