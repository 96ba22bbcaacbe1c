//! Who an agent is and where it can be reached: one process per agent identity (issue 9, item
//! 10) and a data address sources can dial (item 9).

use std::time::Duration;

use ferry_agent::control::Control;
use ferry_common::pki::Identity;
use ferry_common::tls::TlsMaterial;
use ferryctl::ctl::Ctl;

use crate::harness::{migration_spec, wait_for, TestEnv};
use crate::processes::spawn_agent;

async fn agent_info(ctl: &Ctl, name: &str) -> ferry_proto::admin::AgentInfo {
    ctl.agents()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.name == name)
        .unwrap_or_else(|| panic!("agent {name} is not listed"))
}

/// Two agents started with the same identity: the second used to take over the first's leases
/// silently. It is refused with a clear error while the first runs, the refusal shows in
/// `agents list`, and after the first stops cleanly a new process is accepted at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_the_same_identity_is_refused_while_the_first_runs() {
    let env = TestEnv::new();
    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    let ctl = env.ctl(&coord).await;
    let first = env.agent("target", &coord, Some(env.path("dst"))).await;

    // Another host (another state directory) with the same certificate.
    let mut cfg = env.agent_config("target", &coord, Some(env.path("dst2")));
    cfg.state_dir = env.path("agent-target-elsewhere");
    let err = ferry_agent::run::start(cfg.clone())
        .await
        .err()
        .expect("a second process must be refused")
        .to_string();
    assert!(
        err.contains("another process already runs as agent target")
            && err.contains("agent target is already running")
            && err.contains("stop one of them"),
        "{err}"
    );
    let info = agent_info(&ctl, "target").await;
    assert_eq!(info.status, "live");
    assert!(info.conflict.contains("second process"), "{info:?}");
    assert_eq!(
        info.data_addr, first.advertised,
        "the running process keeps its registration"
    );

    // The same state directory: refused on the spot by its lock.
    let same = env.agent_config("target", &coord, Some(env.path("dst3")));
    let err = ferry_agent::run::start(same)
        .await
        .err()
        .expect("a second process on one state directory must be refused")
        .to_string();
    assert!(
        err.contains("another ferry-agent process runs from state_dir"),
        "{err}"
    );

    // A clean shutdown ends the session: the other process is accepted at once.
    first.shutdown().await;
    assert_eq!(agent_info(&ctl, "target").await.status, "shut down");
    let second = ferry_agent::run::start(cfg)
        .await
        .expect("accepted after a clean shutdown");
    let info = agent_info(&ctl, "target").await;
    assert_eq!(info.status, "live");
    assert!(info.conflict.is_empty(), "{info:?}");
    second.shutdown().await;
    node.shutdown().await;
}

/// A restart within seconds of a SIGKILL (the old session has not expired) is accepted: the
/// new process holds the state directory's lock, so it vouches that its predecessor is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_right_after_sigkill_is_accepted() {
    let env = TestEnv::new();
    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    let ctl = env.ctl(&coord).await;
    let mut first = spawn_agent(&env, "src-01", &coord, None);
    wait_for("the agent to register", Duration::from_secs(30), || async {
        let a = ctl.agents().await.ok()?;
        a.iter()
            .any(|a| a.name == "src-01" && a.status == "live")
            .then_some(())
    })
    .await;
    first.kill().unwrap();
    first.wait().unwrap();
    let mut second = spawn_agent(&env, "src-01", &coord, None);
    let log = env.path("agent-src-01.log");
    let registered = wait_for(
        "the restarted agent to register or exit",
        Duration::from_secs(60),
        || {
            let exited = second.try_wait().unwrap();
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            async move {
                if exited.is_some() {
                    Some(false)
                } else {
                    text.contains("Agent registered.").then_some(true)
                }
            }
        },
    )
    .await;
    assert!(
        registered,
        "the restarted agent was refused:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    crate::processes::terminate(&mut second, "restarted agent");
    assert_eq!(agent_info(&ctl, "src-01").await.status, "shut down");
    node.shutdown().await;
}

/// Issue 9, item 9: the shipped config (`data_listen = "0.0.0.0:…"`, `advertise_addr = ""`)
/// registered no address and migrations to it stalled silently. The agent now derives an
/// address sources can dial, refuses one they cannot, and the coordinator says why a target it
/// cannot dial gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_registers_a_dialable_address_or_the_migration_says_why_not() {
    let env = TestEnv::new();
    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    let ctl = env.ctl(&coord).await;

    let mut cfg = env.agent_config("target", &coord, Some(env.path("dst")));
    cfg.data_listen = Some("0.0.0.0:0".parse().unwrap());
    cfg.advertise_addr = Some(String::new());
    let target = ferry_agent::run::start(cfg.clone()).await.unwrap();
    let advertised: std::net::SocketAddr = target.advertised.parse().unwrap();
    assert!(!advertised.ip().is_unspecified(), "{advertised}");
    assert_eq!(advertised.port(), target.data_addr.unwrap().port());
    let info = agent_info(&ctl, "target").await;
    assert_eq!(info.data_addr, target.advertised);
    assert!(info.cannot_receive.is_empty(), "{info:?}");
    target.shutdown().await;

    // An address no source can dial is refused at start.
    cfg.advertise_addr = Some("0.0.0.0:7401".into());
    let err = ferry_agent::run::start(cfg)
        .await
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        err.contains("advertise_addr \"0.0.0.0:7401\" is not an address sources can dial"),
        "{err}"
    );

    // A target registered without an address (an older agent, or a source-only one named as
    // target): nothing is leased to it and `migration status` and `agents list` say why.
    for name in ["source", "target"] {
        let tls = TlsMaterial::load(&env.issue(Identity::Agent(name.into()))).unwrap();
        Control::new(name, &coord, &tls)
            .unwrap()
            .register("", false, &Default::default(), "")
            .await
            .unwrap();
    }
    let id = ctl
        .create(migration_spec(&env.path("src"), ""))
        .await
        .unwrap();
    let p = ctl.status(id).await.unwrap();
    assert!(
        p.blocked
            .contains("agent target registered without a data address"),
        "{p:?}"
    );
    let info = agent_info(&ctl, "target").await;
    assert!(
        info.cannot_receive.contains("without a data address"),
        "{info:?}"
    );
    // Through the CLI an operator uses.
    env.issue(Identity::Admin("ops".into()));
    let out = crate::processes::ferryctl(&env, &coord, &["migration", "status", &id.to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("blocked: nothing is sent to the target: agent target registered without"),
        "{text}"
    );
    let out = crate::processes::ferryctl(&env, &coord, &["agents", "list"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cannot receive: agent target registered"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    node.shutdown().await;
}
