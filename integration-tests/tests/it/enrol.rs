//! Enrolment, renewal and revocation (issue 14) with real processes: a coordinator with a join
//! listener, agents that join with a token, renew their certificates while they transfer, and
//! are cut off when revoked.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use ferry_common::pki::Identity;

use crate::harness::{
    agent_bin, assert_same_tree, make_files, wait_for, CoordinatorProcess, TestEnv,
};
use crate::processes::{ferryctl, json, spawn_agent, terminate, wait_registered};

/// Writes the config of agent `name` whose TLS files go to their own directory (nothing issued
/// there: it joins), and returns its path.
fn joining_config(env: &TestEnv, name: &str, coord: &str, top: &str) -> PathBuf {
    let pki = env.path(&format!("{name}-pki"));
    let cfg = format!(
        "name = \"{name}\"\ncoordinator = \"{coord}\"\nstate_dir = \"{}\"\n{top}[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        env.path(&format!("agent-{name}")).display(),
        pki.join("ca.pem").display(),
        pki.join(format!("agent-{name}.pem")).display(),
        pki.join(format!("agent-{name}.key")).display(),
    );
    let path = env.path(&format!("agent-{name}.toml"));
    std::fs::write(&path, cfg).unwrap();
    path
}

fn join(config: &Path, token: &str, join_addr: &str, extra: &[&str]) -> Output {
    Command::new(agent_bin())
        .args(["join", "--coordinator", join_addr, "--config"])
        .arg(config)
        .args(extra)
        .env("FERRY_JOIN_TOKEN", token)
        .output()
        .unwrap()
}

fn run_agent(env: &TestEnv, name: &str, config: &Path) -> Child {
    let log = std::fs::File::create(env.path(&format!("agent-{name}.log"))).unwrap();
    Command::new(agent_bin())
        .args(["run", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn join_records(env: &TestEnv, addr: &str) -> Vec<String> {
    let out = ferryctl(env, addr, &["audit", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<serde_json::Value>()
        .map(|r| r.unwrap())
        .filter(|r| r["call"] == "Join")
        .map(|r| r["decision"].as_str().unwrap().to_string())
        .collect()
}

fn certs_of(env: &TestEnv, addr: &str, identity: &str) -> Vec<serde_json::Value> {
    json(&ferryctl(env, addr, &["certs", "list", "-o", "json"]))
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["identity"] == identity)
        .cloned()
        .collect()
}

/// Creates the migration of `src` on agent gpu-src to `dst:copy`, with `extra` arguments.
fn gpu_src_to_dst(env: &TestEnv, addr: &str, src: &Path, extra: &[&str]) -> u64 {
    let from = format!("gpu-src:{}", src.display());
    let mut args = vec!["migration", "create", "--source", from.as_str()];
    args.extend_from_slice(&["--target", "dst:copy", "-o", "json"]);
    args.extend_from_slice(extra);
    json(&ferryctl(env, addr, &args))["migration_id"]
        .as_u64()
        .unwrap()
}

/// A coordinator process that lets agents join and signs agent certificates valid 30 s
/// (renewed 20 s after signing), its address, its join address, and a join token.
fn short_lived_certificates(env: &TestEnv) -> (CoordinatorProcess, String, String, String) {
    env.issue(Identity::Admin("ops".into()));
    let mut coord =
        CoordinatorProcess::start_with(env, "join_listen = \"127.0.0.1:0\"\nagent_cert_secs = 30")
            .unwrap();
    let addr = coord.addr.clone();
    let join_addr = coord.join_addr().unwrap().to_string();
    let token = json(&ferryctl(
        env,
        &addr,
        &["token", "create", "--ttl", "10m", "-o", "json"],
    ));
    let token = token["token"].as_str().unwrap().to_string();
    (coord, addr, join_addr, token)
}

/// An agent with no certificate joins with a one-time token: its key is made on its host, the
/// coordinator's CA is checked against the token's pin before the token is sent, a replayed
/// or tampered token gets nothing (and every attempt that reached the coordinator is
/// audited). The joined agent then moves data, and its short-lived certificate is renewed
/// while a throttled transfer runs — the transfer is not dropped or resent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_joins_with_a_token_and_renews_its_certificate_without_dropping_a_transfer() {
    let env = TestEnv::new();
    let (mut coord, addr, join_addr, token) = short_lived_certificates(&env);
    let src_cfg = joining_config(&env, "gpu-src", &addr, "");

    // Tampered pin: refused in the TLS handshake, before anything of the token left.
    let pin_at = "ferry-join-v1:".len();
    let flipped = if &token[pin_at..pin_at + 1] == "0" {
        "1"
    } else {
        "0"
    };
    let bad_pin = format!("{}{flipped}{}", &token[..pin_at], &token[pin_at + 1..]);
    let out = join(&src_cfg, &bad_pin, &join_addr, &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not the one the join token names"),
        "{}",
        stderr(&out)
    );
    assert!(
        join_records(&env, &addr).is_empty(),
        "the coordinator heard nothing"
    );
    assert!(!env.path("gpu-src-pki/agent-gpu-src.key").exists());

    // The real token: a key made here (0600), the CA written, a certificate for this agent.
    let out = join(&src_cfg, &token, &join_addr, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let key = env.path("gpu-src-pki/agent-gpu-src.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read(env.path("gpu-src-pki/ca.pem")).unwrap(),
        std::fs::read(env.pki().join("ca.pem")).unwrap()
    );
    // Replayed, as another agent: refused, audited, nothing written.
    let other_cfg = joining_config(&env, "gpu-other", &addr, "");
    let out = join(&other_cfg, &token, &join_addr, &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("was used already"),
        "{}",
        stderr(&out)
    );
    assert!(!env.path("gpu-other-pki/agent-gpu-other.key").exists());
    let decisions = join_records(&env, &addr);
    assert_eq!(decisions.len(), 2, "{decisions:?}");
    assert_eq!(decisions[0], "ok");
    assert!(decisions[1].contains("was used already"), "{decisions:?}");
    let tokens = json(&ferryctl(&env, &addr, &["token", "list", "-o", "json"]));
    assert_eq!(tokens[0]["used_by"], "gpu-src");
    let first = certs_of(&env, &addr, "agent gpu-src");
    assert_eq!(first.len(), 1);
    let first_serial = first[0]["serial"].as_str().unwrap().to_string();

    // The joined agent sends to a target whose identity was issued offline.
    let src = env.path("src");
    make_files(&src, 4, 4 << 20);
    let root = env.path("dst");
    let mut target = spawn_agent(&env, "dst", &addr, Some(&root));
    let mut source = run_agent(&env, "gpu-src", &src_cfg);
    let ctl = env.ctl(&addr).await;
    wait_registered(&ctl, "dst", true).await;
    wait_registered(&ctl, "gpu-src", false).await;
    let id = gpu_src_to_dst(&env, &addr, &src, &["--throttle", "4mbit"]);

    // 16 MiB at 4 Mbit/s: about 34 s. The certificate is renewed about 20 s after the join.
    let renewed = wait_for("the certificate renewed", Duration::from_secs(60), || {
        let certs = certs_of(&env, &addr, "agent gpu-src");
        async move { (certs.len() >= 2).then_some(certs) }
    })
    .await;
    assert_eq!(
        renewed[1]["via"].as_str().unwrap(),
        format!("renewal of {first_serial}")
    );
    let during = ctl.status(id).await.unwrap();
    assert!(
        during.bytes_verified < during.bytes_total,
        "renewed while the transfer ran: {during:?}"
    );
    let done = wait_for("migration done", Duration::from_secs(90), || async {
        let p = ctl.status(id).await.ok()?;
        (p.phase == ferry_proto::admin::Phase::Done as i32).then_some(p)
    })
    .await;
    assert_eq!(done.failed_attempts, 0, "{done:?}");
    assert_eq!(
        done.leases_granted, done.segments_total,
        "no segment was sent twice: {done:?}"
    );
    assert_same_tree(&src, &root.join("copy"));
    // The files on disk are the renewed ones: a restart presents them.
    let on_disk = ferry_common::pki::CertInfo::from_pem(
        &std::fs::read(env.path("gpu-src-pki/agent-gpu-src.pem")).unwrap(),
    )
    .unwrap();
    assert_ne!(on_disk.serial, first_serial);
    let log = std::fs::read_to_string(env.path("agent-gpu-src.log")).unwrap();
    assert!(log.contains("Renewed this agent's certificate."), "{log}");
    terminate(&mut source, "source agent");
    terminate(&mut target, "target agent");
    terminate(coord.child_mut(), "coordinator");
}

/// Revoking an agent cuts it off everywhere at once: its leases end (the target refuses the
/// bytes of the segment it was sending), its calls on connections it already had are refused,
/// and new TLS handshakes with its certificate fail — to the coordinator and to another
/// agent's data endpoint — before any application byte. It joins again with a new token, and
/// the migration finishes with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_is_refused_everywhere_and_comes_back_only_with_a_new_token() {
    let env = TestEnv::new();
    env.issue(Identity::Admin("ops".into()));
    let mut coord = CoordinatorProcess::start_with(&env, "join_listen = \"127.0.0.1:0\"").unwrap();
    let addr = coord.addr.clone();
    let join_addr = coord.join_addr().unwrap().to_string();
    let src = env.path("src");
    make_files(&src, 4, 1 << 20);
    let root = env.path("dst");
    let mut target = spawn_agent(&env, "dst", &addr, Some(&root));
    let mut source = spawn_agent(&env, "src", &addr, None);
    let ctl = env.ctl(&addr).await;
    wait_registered(&ctl, "dst", true).await;
    wait_registered(&ctl, "src", false).await;
    let created = json(&ferryctl(
        &env,
        &addr,
        &[
            "migration",
            "create",
            "--source",
            &format!("src:{}", src.display()),
            "--target",
            "dst:copy",
            "--segment-size",
            "1048576",
            "--throttle",
            "2mbit",
            "-o",
            "json",
        ],
    ));
    let id = created["migration_id"].as_u64().unwrap();
    wait_for("a segment leased", Duration::from_secs(30), || async {
        let p = ctl.status(id).await.ok()?;
        (p.segments_leased > 0).then_some(())
    })
    .await;

    let out = ferryctl(&env, &addr, &["agents", "revoke", "src"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let p = ctl.status(id).await.unwrap();
    assert_eq!(p.segments_leased, 0, "its leases ended at once: {p:?}");

    // New handshakes with its certificate: refused by the coordinator...
    let src_tls =
        ferry_common::tls::TlsMaterial::load(&env.issue(Identity::Agent("src".into()))).unwrap();
    let control = ferry_agent::control::Control::new("src", &addr, &src_tls).unwrap();
    let e = control.end_session().await.unwrap_err().to_string();
    assert!(
        !e.contains("revoked; join again"),
        "refused in the handshake, not by a call: {e}"
    );
    let coord_log = || std::fs::read_to_string(env.path("coordinator-1.log")).unwrap_or_default();
    wait_for(
        "the coordinator's handshake refusal",
        Duration::from_secs(10),
        || {
            let log = coord_log();
            async move {
                log.contains("invalid peer certificate: Revoked")
                    .then_some(())
            }
        },
    )
    .await;
    // ... and by the target's data endpoint, once its heartbeat brought the revocation.
    let dst_addr: std::net::SocketAddr = ctl
        .agents()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.name == "dst")
        .unwrap()
        .data_addr
        .parse()
        .unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let client = src_tls.quic_client().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut attempts = Vec::new();
    loop {
        let c = ep
            .connect_with(
                client.clone(),
                dst_addr,
                &ferry_common::names::agent_dns("dst"),
            )
            .unwrap()
            .await;
        let refused = match c {
            Err(e) => Some(e),
            // The server may refuse just after the client finished its side; a connection
            // still up after a moment was accepted (the target has not heard of the
            // revocation yet): try again.
            Ok(c) => match tokio::time::timeout(Duration::from_secs(2), c.accept_uni()).await {
                Ok(Err(e)) => Some(e),
                other => {
                    attempts.push(format!("{other:?}"));
                    c.close(0u32.into(), b"again");
                    None
                }
            },
        };
        if let Some(e) = refused {
            assert!(e.to_string().contains("certificate"), "{e}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the target still accepts the revoked source after 30 s ({attempts:?}); its log:\n{}",
            std::fs::read_to_string(env.path("agent-dst.log")).unwrap_or_default()
        );
    }
    // The running process's calls on connections it had are refused too; nothing more is
    // verified meanwhile.
    let verified = ctl.status(id).await.unwrap().segments_verified;
    let src_log = || std::fs::read_to_string(env.path("agent-src.log")).unwrap_or_default();
    wait_for(
        "the source told it is cut off",
        Duration::from_secs(30),
        || {
            let log = src_log();
            async move { (log.contains("revoked") || log.contains("Revoked")).then_some(()) }
        },
    )
    .await;
    assert_eq!(ctl.status(id).await.unwrap().segments_verified, verified);
    terminate(&mut source, "revoked source");

    // A new token for that name: it joins again (replacing its identity) and finishes.
    let token = json(&ferryctl(
        &env,
        &addr,
        &[
            "token", "create", "--agent", "src", "--ttl", "5m", "-o", "json",
        ],
    ));
    let cfg = env.path("agent-src.toml");
    let out = join(&cfg, token["token"].as_str().unwrap(), &join_addr, &[]);
    assert!(
        !out.status.success(),
        "an identity is never replaced silently"
    );
    assert!(stderr(&out).contains("--replace"), "{}", stderr(&out));
    let out = join(
        &cfg,
        token["token"].as_str().unwrap(),
        &join_addr,
        &["--replace"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let certs = certs_of(&env, &addr, "agent src");
    assert_eq!(certs.len(), 1);
    assert_eq!(certs[0]["revoked"], false);
    let mut source = run_agent(&env, "src", &cfg);
    wait_registered(&ctl, "src", false).await;
    let out = ferryctl(
        &env,
        &addr,
        &["migration", "throttle", &id.to_string(), "off"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("migration done", Duration::from_secs(90), || async {
        let p = ctl.status(id).await.ok()?;
        (p.phase == ferry_proto::admin::Phase::Done as i32).then_some(())
    })
    .await;
    assert_same_tree(&src, &root.join("copy"));
    // The audit log holds the revocation and the join.
    let audit = String::from_utf8_lossy(&ferryctl(&env, &addr, &["audit"]).stdout).into_owned();
    assert!(audit.contains("RevokeAgent"), "{audit}");
    assert_eq!(join_records(&env, &addr), ["ok"]);
    terminate(&mut source, "source agent");
    terminate(&mut target, "target agent");
    terminate(coord.child_mut(), "coordinator");
}

fn ferryctl_as(pki: &Path, admin: &str, addr: &str, args: &[&str]) -> Output {
    Command::new(crate::harness::ferryctl_bin())
        .args(["--coordinator", addr, "--pki-dir"])
        .arg(pki)
        .args(["--admin", admin])
        .args(args)
        .output()
        .unwrap()
}

/// An operator's key is made where the operator works (`user request`) and an admin has it
/// certified with a role (`user create --csr`): the role is the admin's choice, the key never
/// moves, files are never replaced, and a viewer may not make users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_is_certified_for_a_key_made_where_it_works_with_the_role_an_admin_gives() {
    let env = TestEnv::new();
    env.issue(Identity::Admin("ops".into()));
    let coord = CoordinatorProcess::start(&env).unwrap();
    let addr = coord.addr.clone();
    let home = env.path("vic-home");
    let home_s = home.display().to_string();
    let out = ferryctl(&env, &addr, &["user", "request", "vic", "--dir", &home_s]);
    assert!(out.status.success(), "{}", stderr(&out));
    use std::os::unix::fs::PermissionsExt;
    let key = home.join("admin-vic.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let key_before = std::fs::read(&key).unwrap();
    let csr = home.join("admin-vic.csr").display().to_string();
    let out = ferryctl(
        &env,
        &addr,
        &["user", "create", "vic", "--role", "viewer", "--csr", &csr],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(&key).unwrap(),
        key_before,
        "the key stayed as it was"
    );
    // vic reads with its own key and certificate, and may change nothing.
    let listed = ferryctl_as(&home, "vic", &addr, &["agents", "list"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    let denied = ferryctl_as(&home, "vic", &addr, &["token", "create"]);
    assert!(!denied.status.success());
    assert!(
        stderr(&denied).contains("needs the admin role"),
        "{}",
        stderr(&denied)
    );
    let denied = ferryctl_as(
        &home,
        "vic",
        &addr,
        &["user", "create", "eve", "--role", "admin"],
    );
    assert!(!denied.status.success());
    assert!(!home.join("admin-eve.pem").exists());

    // An operator working from this host: the key is made here, in the PKI directory.
    let out = ferryctl(
        &env,
        &addr,
        &["user", "create", "olga", "--role", "operator"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let olga = ferry_common::tls::TlsMaterial::load(&ferry_common::config::TlsPaths::in_dir(
        &env.pki(),
        "admin-olga",
    ))
    .unwrap();
    assert_eq!(
        ferry_common::tls::role_of(&olga.cert_der().unwrap()),
        Some(ferry_common::names::Role::Operator)
    );
    // Again: refused before anything is asked of the coordinator.
    let again = ferryctl(&env, &addr, &["user", "create", "olga", "--role", "admin"]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("exists already"),
        "{}",
        stderr(&again)
    );
    let certs = json(&ferryctl(&env, &addr, &["certs", "list", "-o", "json"]));
    let ids: Vec<&str> = certs
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["identity"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["operator olga (operator)", "operator vic (viewer)"]);
    let audit = String::from_utf8_lossy(&ferryctl(&env, &addr, &["audit"]).stdout).into_owned();
    assert_eq!(
        audit.matches("CreateUser").count(),
        3,
        "two made, one denied: {audit}"
    );
}

/// Runs `ferry-coordinator pki rotate-ca STEP --dir PKI`.
fn rotate_ca(env: &TestEnv, step: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_it-coordinator"))
        .args(["pki", "rotate-ca", step, "--dir"])
        .arg(env.pki())
        .output()
        .unwrap();
    assert!(out.status.success(), "rotate-ca {step}: {}", stderr(&out));
}

/// How many CA certificates a PEM file holds.
fn cas_in(path: &Path) -> usize {
    ferry_common::pki::ca_public_keys(&std::fs::read(path).unwrap()).map_or(0, |k| k.len())
}

/// The cluster CA is replaced while everything runs: `rotate-ca begin` puts a new CA beside the
/// old one, and once the coordinator has it the running agents trust both from their next
/// heartbeat (no restart; the joined agent's own ca.pem is rewritten); after `switch` the
/// coordinator signs with the new CA, the joined agent's next renewal gets a certificate of
/// the new CA, and it moves data to a target whose certificate is still the old CA's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_ca_is_rotated_while_agents_run_and_certificates_of_both_work_together() {
    let env = TestEnv::new();
    let (mut coord, addr, join_addr, token) = short_lived_certificates(&env);
    let src_cfg = joining_config(&env, "gpu-src", &addr, "");
    let out = join(&src_cfg, &token, &join_addr, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let src_ca = env.path("gpu-src-pki/ca.pem");
    assert_eq!(cas_in(&src_ca), 1);

    let root = env.path("dst");
    let mut target = spawn_agent(&env, "dst", &addr, Some(&root));
    let mut source = run_agent(&env, "gpu-src", &src_cfg);
    let ctl = env.ctl(&addr).await;
    wait_registered(&ctl, "dst", true).await;
    wait_registered(&ctl, "gpu-src", false).await;

    // Begin: the coordinator restarted with both CAs; the agents learn them as they run.
    rotate_ca(&env, "begin");
    assert_eq!(cas_in(&env.pki().join("ca.pem")), 2);
    terminate(coord.child_mut(), "coordinator");
    coord.restart().unwrap();
    wait_for(
        "the joined agent trusts both CAs",
        Duration::from_secs(60),
        || {
            let n = cas_in(&src_ca);
            async move { (n == 2).then_some(()) }
        },
    )
    .await;
    for name in ["gpu-src", "dst"] {
        let log = env.path(&format!("agent-{name}.log"));
        wait_for("the agent's log says so", Duration::from_secs(60), || {
            let said = std::fs::read_to_string(&log)
                .is_ok_and(|l| l.contains("Now trusting the CA certificates"));
            async move { said.then_some(()) }
        })
        .await;
    }

    // Switch: the new CA signs; the joined agent's next renewal is the new CA's.
    rotate_ca(&env, "switch");
    let switched = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    terminate(coord.child_mut(), "coordinator");
    coord.restart().unwrap();
    let ctl = wait_for("coordinator back", Duration::from_secs(30), || {
        env.ctl_try(&addr)
    })
    .await;
    let new_ca = {
        use rustls::pki_types::pem::PemObject;
        let pem = std::fs::read(env.pki().join("ca.pem")).unwrap();
        let all: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
            .map(|c| c.unwrap())
            .collect();
        all[1].clone()
    };
    let src_tls = ferry_common::config::TlsPaths {
        ca: src_ca.clone(),
        cert: env.path("gpu-src-pki/agent-gpu-src.pem"),
        key: env.path("gpu-src-pki/agent-gpu-src.key"),
    };
    wait_for(
        "a certificate of the new CA",
        Duration::from_secs(90),
        || {
            let signed_by_new = ferry_common::tls::TlsMaterial::load(&src_tls)
                .ok()
                .and_then(|m| m.own_ca().ok())
                .is_some_and(|ca| ca == new_ca);
            async move { signed_by_new.then_some(()) }
        },
    )
    .await;
    let renewed =
        ferry_common::pki::CertInfo::from_pem(&std::fs::read(&src_tls.cert).unwrap()).unwrap();
    assert!(
        renewed.not_before + ferry_common::pki::CLOCK_SKEW.as_secs() as i64 >= switched,
        "signed after the switch: {renewed:?}"
    );
    let listed = certs_of(&env, &addr, "agent gpu-src");
    assert!(
        listed
            .iter()
            .any(|c| c["serial"] == renewed.serial.as_str()),
        "{listed:?}"
    );

    // The source (new CA) sends to the target (old CA): both trust both.
    let src = env.path("src");
    make_files(&src, 3, 1 << 20);
    let id = gpu_src_to_dst(&env, &addr, &src, &[]);
    let done = wait_for("migration done", Duration::from_secs(90), || async {
        let p = ctl.status(id).await.ok()?;
        (p.phase == ferry_proto::admin::Phase::Done as i32).then_some(p)
    })
    .await;
    assert_eq!(done.failed_attempts, 0, "{done:?}");
    assert_same_tree(&src, &root.join("copy"));
    terminate(&mut source, "source agent");
    terminate(&mut target, "target agent");
    terminate(coord.child_mut(), "coordinator");
}

/// Runs `ferry-coordinator ARGS`.
fn coordinator_cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_it-coordinator"))
        .args(args)
        .output()
        .unwrap()
}

/// A coordinator's key is made on its own host (`pki request`), only the request goes to the
/// CA's host (`pki sign`), and the node serves with the certificate that comes back; neither
/// command replaces a file, and a request is certified only as the identity `sign` names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_key_is_made_on_its_host_and_only_its_request_is_signed() {
    let env = TestEnv::new();
    let host = env.path("coordinator-host");
    let host_s = host.to_str().unwrap();
    let out = coordinator_cli(&["pki", "request", "--coordinator", "1", "--dir", host_s]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (key, csr) = (
        host.join("coordinator-1.key"),
        host.join("coordinator-1.csr"),
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = coordinator_cli(&["pki", "request", "--coordinator", "1", "--dir", host_s]);
    assert!(!again.status.success(), "a second request replaces nothing");
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );

    let pki = env.pki();
    let sign = |who: &[&str]| {
        let mut args = vec!["pki", "sign", "--dir", pki.to_str().unwrap(), "--csr"];
        args.push(csr.to_str().unwrap());
        args.extend_from_slice(who);
        coordinator_cli(&args)
    };
    let out = sign(&["--coordinator", "1", "--days", "0"]);
    assert!(!out.status.success(), "a lifetime of nothing is refused");
    let out = sign(&["--coordinator", "1", "--days", "200"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cert = host.join("coordinator-1.pem");
    let info = ferry_common::pki::CertInfo::from_pem(&std::fs::read(&cert).unwrap()).unwrap();
    assert!(
        info.names
            .iter()
            .any(|n| n == ferry_common::names::COORDINATOR_DNS),
        "{info:?}"
    );
    let skew = ferry_common::pki::CLOCK_SKEW.as_secs() as i64;
    assert_eq!(info.not_after - info.not_before - skew, 200 * 86_400);
    let out = sign(&["--coordinator", "1"]);
    assert!(!out.status.success(), "the certificate is not replaced");
    assert!(
        !host.join("ca.key").exists() && !pki.join("coordinator-1.key").exists(),
        "no key travelled"
    );

    // The node runs with that identity (moved into the layout its config names).
    std::fs::copy(&key, pki.join("coordinator-1.key")).unwrap();
    std::fs::copy(&cert, pki.join("coordinator-1.pem")).unwrap();
    let mut coord = CoordinatorProcess::start(&env).unwrap();
    let served = wait_for("the node serves", Duration::from_secs(30), || {
        env.ctl_try(&coord.addr)
    })
    .await;
    drop(served);
    let on_disk = std::fs::read(pki.join("coordinator-1.pem")).unwrap();
    assert_eq!(
        on_disk,
        std::fs::read(&cert).unwrap(),
        "the node kept the signed certificate (nothing re-issued it)"
    );
    terminate(coord.child_mut(), "coordinator");

    // A CA of the lifetime asked for.
    let other = env.path("other-ca");
    let out = coordinator_cli(&[
        "pki",
        "init",
        "--dir",
        other.to_str().unwrap(),
        "--ca-days",
        "400",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ca = ferry_common::pki::CertInfo::from_pem(&std::fs::read(other.join("ca.pem")).unwrap())
        .unwrap();
    assert_eq!(ca.not_after - ca.not_before - skew, 400 * 86_400);
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn cert_in(paths: &ferry_common::config::TlsPaths) -> ferry_common::pki::CertInfo {
    ferry_common::pki::CertInfo::from_pem(&std::fs::read(&paths.cert).unwrap()).unwrap()
}

/// The audit records of `call`, as JSON.
fn audit_of(env: &TestEnv, addr: &str, call: &str) -> Vec<serde_json::Value> {
    let out = ferryctl(env, addr, &["audit", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<serde_json::Value>()
        .map(|r| r.unwrap())
        .filter(|r| r["call"] == call)
        .collect()
}

/// An operator renews its own certificate when ferryctl says it is due: a new key made where it
/// works, the same name and role (a viewer gains nothing), the old serial named in the
/// record, the call audited; renewals one identity asks for are limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_renews_its_own_certificate_and_keeps_its_role() {
    let env = TestEnv::new();
    env.issue(Identity::Admin("ops".into()));
    let coord = CoordinatorProcess::start_with(&env, "operator_cert_secs = 600").unwrap();
    let addr = coord.addr.clone();
    // vera's certificate (a viewer's) was signed 250 s ago for 300 s: two thirds are behind it.
    let home = env.path("vera-home");
    let vera = Identity::User("vera".into(), ferry_common::names::Role::Viewer);
    let signed = std::time::SystemTime::now() - Duration::from_secs(250);
    let paths = env.issue_signed_at(&vera, &home, signed, Duration::from_secs(300));
    let old = cert_in(&paths);
    let old_key = std::fs::read(&paths.key).unwrap();

    let listed = ferryctl_as(&home, "vera", &addr, &["agents", "list"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(
        stderr(&listed).contains("renew it now with `ferryctl certs renew`"),
        "{}",
        stderr(&listed)
    );

    let out = ferryctl_as(&home, "vera", &addr, &["certs", "renew", "-o", "json"]);
    let answer = json(&out);
    let new = cert_in(&paths);
    assert_eq!(answer["serial"], new.serial.as_str());
    assert_eq!(answer["previous"], old.serial.as_str());
    assert_ne!(new.serial, old.serial);
    assert_ne!(std::fs::read(&paths.key).unwrap(), old_key, "a new key");
    let tls = ferry_common::tls::TlsMaterial::load(&paths)
        .expect("the key and certificate belong together");
    assert_eq!(
        ferry_common::tls::role_of(&tls.cert_der().unwrap()),
        Some(ferry_common::names::Role::Viewer),
        "the role is the one the certificate had"
    );
    // Valid for the configured operators' lifetime (600 s), from its signing.
    let life = new.not_after - new.not_before - ferry_common::pki::CLOCK_SKEW.as_secs() as i64;
    assert!((595..=605).contains(&life), "lifetime {life}");

    // The renewed certificate works, is not due, and allows what a viewer's does, no more.
    let listed = ferryctl_as(&home, "vera", &addr, &["agents", "list"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(!stderr(&listed).contains("renew"), "{}", stderr(&listed));
    let denied = ferryctl_as(&home, "vera", &addr, &["token", "create"]);
    assert!(!denied.status.success());
    assert!(
        stderr(&denied).contains("needs the admin role"),
        "{}",
        stderr(&denied)
    );

    let certs = certs_of(&env, &addr, "operator vera (viewer)");
    assert_eq!(certs.len(), 1, "{certs:?}");
    assert_eq!(certs[0]["serial"], new.serial.as_str());
    assert_eq!(
        certs[0]["via"],
        format!("renewal of {}", old.serial).as_str()
    );
    let audited = audit_of(&env, &addr, "RenewOperatorCertificate");
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert_eq!(audited[0]["who"], "vera");
    assert_eq!(audited[0]["decision"], "ok");

    // Six renewals per identity per minute: the seventh within it is refused, and the files
    // stay as the sixth left them.
    for _ in 2..=6 {
        let out = ferryctl_as(&home, "vera", &addr, &["certs", "renew"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let sixth = cert_in(&paths);
    let refused = ferryctl_as(&home, "vera", &addr, &["certs", "renew"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("asked for more than 6 certificates"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(cert_in(&paths), sixth);
    ferry_common::tls::TlsMaterial::load(&paths).unwrap();
}

/// Coordinator nodes renew their own certificates while they run: node 1 signs its own (it
/// holds the CA key), node 2 (no CA key) has node 1 sign it. After the old certificates
/// expired, node 1 restarts: node 2 reaches it again only with its renewed certificate, node
/// 1 serves with the renewed one from its files, and the two-node cluster commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_nodes_renew_their_own_certificates_with_or_without_the_ca_key() {
    let env = TestEnv::new();
    env.issue(Identity::Admin("ops".into()));
    let now = std::time::SystemTime::now();
    let life = Duration::from_secs(45);
    let one = env.issue_signed_at(
        &Identity::Coordinator(1),
        &env.path("node-1-pki"),
        now,
        life,
    );
    let two = env.issue_signed_at(
        &Identity::Coordinator(2),
        &env.path("node-2-pki"),
        now,
        life,
    );
    assert!(!env.path("node-2-pki/ca.key").exists());
    let signs = format!(
        "ca_key = \"{}\"\ncoordinator_cert_secs = 3600",
        env.pki().join("ca.key").display()
    );
    let mut node1 =
        CoordinatorProcess::start_node_tls(&env, 1, true, &signs, Some(one.clone())).unwrap();
    let node2 = CoordinatorProcess::start_node_tls(&env, 2, false, "", Some(two.clone())).unwrap();
    let (ctl, _) = crate::cluster::leader(&env, &[node1.addr.clone()], None).await;
    ctl.add_node(2, &node2.addr)
        .await
        .unwrap_or_else(|e| panic!("add node 2: {e}\n{}", node2.log()));
    let old = [cert_in(&one), cert_in(&two)];

    // Each renews once two thirds of its 45 s are behind it.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let renewed = loop {
        let new = [cert_in(&one), cert_in(&two)];
        if new[0].serial != old[0].serial && new[1].serial != old[1].serial {
            break new;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not renewed within 2 minutes\nnode 1:\n{}\nnode 2:\n{}",
            node1.log(),
            node2.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for (paths, new) in [(&one, &renewed[0]), (&two, &renewed[1])] {
        ferry_common::tls::TlsMaterial::load(paths).expect("key and certificate belong together");
        assert!(
            new.not_after > now_s() + 3000,
            "signed for an hour: {new:?}"
        );
    }
    assert!(
        node2.log().contains("Renewed this node's certificate."),
        "{}",
        node2.log()
    );

    // The old certificates expire; node 1 restarts.
    let expired = old[0].not_after.max(old[1].not_after);
    wait_for(
        "the old certificates expired",
        Duration::from_secs(60),
        || async { (now_s() > expired + 1).then_some(()) },
    )
    .await;
    node1.kill9();
    node1.restart().unwrap();
    let addrs = [node1.addr.clone(), node2.addr.clone()];
    let (_ctl, _) = crate::cluster::leader(&env, &addrs, None).await;
    // Both serve operators (new connections), and a write commits (it needs both nodes).
    // (A write may meet the election the restart started: it is retried until it commits,
    // which it can only do with both renewed certificates in use.)
    for a in &addrs {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let out = ferryctl(&env, a, &["token", "create", "--ttl", "10m"]);
            if out.status.success() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node at {a}: {}\nnode 1:\n{}\nnode 2:\n{}",
                stderr(&out),
                node1.log(),
                node2.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for (id, old) in [(1, &old[0]), (2, &old[1])] {
        let certs = certs_of(&env, &addrs[0], &format!("coordinator {id}"));
        assert!(
            certs
                .iter()
                .any(|c| c["via"] == format!("renewal of {}", old.serial).as_str()),
            "node {id}: {certs:?}"
        );
    }
    let audited = audit_of(&env, &addrs[0], "RenewNodeCertificate");
    let who: std::collections::BTreeSet<&str> =
        audited.iter().map(|r| r["who"].as_str().unwrap()).collect();
    assert_eq!(who, ["node-1", "node-2"].into(), "{audited:?}");
}
