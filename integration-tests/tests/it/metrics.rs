//! Issue 15 (observability): every daemon's `/metrics`, `/livez` and `/readyz`, scraped over
//! HTTP from real processes during a real migration, and the coordinator's gRPC reflection.
//! The dashboard and alert rules shipped in `deploy/monitoring/` refer only to metrics the
//! daemons export.

use std::net::SocketAddr;
use std::process::Child;
use std::time::Duration;

use ferry_common::pki::Identity;
use ferry_integration_tests::process::logged_addr;
use ferry_integration_tests::scrape::{self, metric_names_in};
use ferry_proto::admin::Phase;

use crate::harness::{
    assert_same_tree, finished, make_files, wait_for, CoordinatorProcess, TestEnv,
};
use crate::processes::{ferryctl, json, spawn_agent_toml, terminate, wait_registered};

/// An agent process serving its metrics on a port of its own, and where.
fn agent_with_metrics(
    env: &TestEnv,
    name: &str,
    coord: &str,
    root: Option<&std::path::Path>,
) -> (Child, SocketAddr) {
    let mut top = String::from("metrics_listen = \"127.0.0.1:0\"\n");
    if let Some(root) = root {
        top.push_str(&format!(
            "data_listen = \"127.0.0.1:0\"\nroot = \"{}\"\n",
            root.display()
        ));
    }
    let mut child = spawn_agent_toml(env, name, coord, &top, "");
    let log = env.path(&format!("agent-{name}.log"));
    let addr = logged_addr(&log, "Metrics serving.", Duration::from_secs(30), || {
        !matches!(child.try_wait(), Ok(None))
    })
    .unwrap();
    (child, addr)
}

/// Issue 15's done-when: `/metrics` of a running coordinator and both agents, scraped during a
/// real migration, show the counters moving, and at the end equal to the migration's report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_during_a_migration_and_end_equal_to_its_report() {
    let env = TestEnv::new();
    env.issue(Identity::Admin("ops".into()));
    let src = env.path("src");
    make_files(&src, 8, 512 * 1024);
    let root = env.path("dst");
    let mut coord = CoordinatorProcess::start(&env).unwrap();
    let coord_metrics = coord.metrics_addr().unwrap();
    let ctl = env.ctl(&coord.addr).await;
    let (mut target, target_metrics) = agent_with_metrics(&env, "dst-h", &coord.addr, Some(&root));
    let (mut source, source_metrics) = agent_with_metrics(&env, "src-h", &coord.addr, None);
    wait_registered(&ctl, "dst-h", true).await;
    wait_registered(&ctl, "src-h", false).await;
    for addr in [coord_metrics, target_metrics, source_metrics] {
        assert_eq!(
            scrape::get(addr, "/livez").await.unwrap(),
            (200, "ok\n".into())
        );
        assert_eq!(
            scrape::get(addr, "/readyz").await.unwrap(),
            (200, "ok\n".into())
        );
    }

    // 4 MiB in segments of 512 KiB at 8 Mbit/s: about 4 s of transfer, a segment every half
    // second.
    let source_arg = format!("src-h:{}", src.display());
    let out = ferryctl(
        &env,
        &coord.addr,
        &[
            "migration",
            "create",
            "--name",
            "metered",
            "--source",
            &source_arg,
            "--target",
            "dst-h:copy",
            "--segment-size",
            "524288",
            "--throttle",
            "8mbit",
            "-o",
            "json",
        ],
    );
    let id = json(&out)["migration_id"].as_u64().unwrap();

    // Mid-transfer: each daemon's counter is seen to grow between two scrapes while the
    // migration still runs.
    let verified = "ferry_bytes_verified_total{migration=\"metered\"}";
    for (addr, series) in [
        (source_metrics, "ferry_bytes_sent_total"),
        (target_metrics, "ferry_bytes_received_total"),
        (coord_metrics, verified),
    ] {
        let first = wait_for(
            &format!("{series} to start counting"),
            Duration::from_secs(30),
            || async {
                scrape::metrics(addr)
                    .await
                    .ok()?
                    .get(series)
                    .filter(|v| *v > 0.0)
            },
        )
        .await;
        let later = wait_for(
            &format!("{series} to grow"),
            Duration::from_secs(30),
            || async {
                scrape::metrics(addr)
                    .await
                    .ok()?
                    .get(series)
                    .filter(|v| *v > first)
            },
        )
        .await;
        let p = ctl.status(id).await.unwrap();
        assert!(
            later < p.bytes_total as f64 || p.phase() != Phase::Done,
            "{series} grew from {first} to {later}, but not mid-transfer: {p:?}"
        );
    }
    // A segment is leased (in flight) at some scrape while the copy runs.
    let leased = "ferry_segments{migration=\"metered\",state=\"leased\"}";
    wait_for("a segment seen leased", Duration::from_secs(30), || async {
        (scrape::metrics(coord_metrics).await.ok()?.value(leased) >= 1.0).then_some(())
    })
    .await;

    let log = || std::fs::read_to_string(env.path("agent-src-h.log")).unwrap_or_default();
    finished(&ctl, id, Duration::from_secs(60), &log).await;
    assert_same_tree(&src, &root.join("copy"));
    let p = ctl.status(id).await.unwrap();
    assert_eq!(p.failed_attempts, 0, "{p:?}");
    assert_eq!(
        p.leases_granted, p.segments_total,
        "nothing sent twice: {p:?}"
    );
    assert_eq!(p.bytes_verified, 4 * 1024 * 1024);
    assert!(p.segments_verified >= 8, "{p:?}");

    let c = scrape::metrics(coord_metrics).await.unwrap();
    let s = scrape::metrics(source_metrics).await.unwrap();
    let t = scrape::metrics(target_metrics).await.unwrap();
    let m = |k: &str| format!("{{migration=\"metered\"{k}}}");
    // The coordinator's figures are the report's.
    assert_eq!(c.get(verified), Some(p.bytes_verified as f64));
    assert_eq!(
        c.get(&format!("ferry_files_verified_total{}", m(""))),
        Some(p.files_verified as f64)
    );
    assert_eq!(
        c.get(&format!("ferry_migration_bytes{}", m(""))),
        Some(p.bytes_total as f64)
    );
    assert_eq!(
        c.get(&format!("ferry_segments{}", m(",state=\"verified\""))),
        Some(p.segments_verified as f64)
    );
    for state in ["pending", "leased", "failed", "stale"] {
        assert_eq!(
            c.get(&format!(
                "ferry_segments{}",
                m(&format!(",state=\"{state}\""))
            )),
            Some(0.0),
            "{state}"
        );
    }
    assert_eq!(
        c.get(&format!("ferry_migration_phase{}", m(",phase=\"done\""))),
        Some(1.0)
    );
    assert_eq!(
        c.get(&format!("ferry_migration_phase{}", m(",phase=\"copying\""))),
        Some(0.0)
    );
    assert_eq!(
        c.get(&format!("ferry_segment_failures_total{}", m(""))),
        Some(0.0)
    );
    assert_eq!(c.get("ferry_raft_is_leader"), Some(1.0));
    assert_eq!(c.get("ferry_raft_has_leader"), Some(1.0));
    assert_eq!(c.get("ferry_raft_voters"), Some(1.0));
    let applied = c.value("ferry_raft_applied_index");
    assert!(
        applied > 0.0 && c.value("ferry_raft_commit_index") >= applied,
        "{c:?}"
    );
    assert!(c.value("ferry_raft_last_log_index") >= applied);
    assert!(
        c.value("ferry_raft_leader_changes_total") >= 1.0,
        "it became leader"
    );
    for agent in ["src-h", "dst-h"] {
        assert_eq!(
            c.get(&format!("ferry_agent_up{{agent=\"{agent}\"}}")),
            Some(1.0)
        );
    }
    // The agents' counters are the same bytes and segments, counted at each end.
    assert_eq!(
        s.get("ferry_bytes_sent_total"),
        Some(p.bytes_verified as f64)
    );
    assert_eq!(
        s.get("ferry_segments_sent_total{outcome=\"verified\"}"),
        Some(p.segments_verified as f64)
    );
    assert_eq!(
        s.get("ferry_segments_sent_total{outcome=\"failed\"}"),
        Some(0.0)
    );
    assert_eq!(
        s.get("ferry_segment_seconds_count"),
        Some(p.segments_verified as f64)
    );
    assert!(s.value("ferry_segment_seconds_sum") > 0.0);
    assert!(
        s.value("ferry_peer_rtt_seconds{peer=\"dst-h\"}") > 0.0,
        "{s:?}"
    );
    assert!(s.value("ferry_congestion_window_bytes{peer=\"dst-h\"}") > 0.0);
    assert_eq!(
        t.get("ferry_bytes_received_total"),
        Some(p.bytes_verified as f64)
    );
    assert_eq!(
        t.get("ferry_segments_received_total{outcome=\"committed\"}"),
        Some(p.segments_verified as f64)
    );
    assert_eq!(t.get("ferry_bytes_sent_total"), Some(0.0));
    for x in [&c, &s, &t] {
        assert!(x.value("process_resident_memory_bytes") > 1e6, "{x:?}");
    }

    // What the shipped dashboard and alert rules query is what the daemons export.
    let exported: std::collections::BTreeSet<String> = [&c, &s, &t]
        .iter()
        .flat_map(|x| x.names.iter().cloned())
        .collect();
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring");
    for file in ["ferry-dashboard.json", "ferry-alerts.yml"] {
        let text = std::fs::read_to_string(deploy.join(file)).unwrap();
        let used = metric_names_in(&text);
        assert!(used.len() >= 8, "{file} queries ferry's metrics: {used:?}");
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} queries metrics no daemon exports: {unknown:?}"
        );
    }

    terminate(&mut source, "source agent");
    terminate(&mut target, "target agent");
}

/// `/readyz` of a coordinator says why it is not ready once it knows no leader: here the only
/// node left of three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_without_a_leader_is_live_but_not_ready() {
    let env = TestEnv::new();
    let (mut nodes, _addrs, ctl) = crate::cluster::form(&env, 3).await;
    let leader = ctl.cluster_status().await.unwrap().leader_id;
    let last = (1..=3u64).find(|id| *id != leader).unwrap();
    let metrics = nodes[last as usize - 1].metrics_addr().unwrap();
    assert_eq!(scrape::get(metrics, "/readyz").await.unwrap().0, 200);
    for id in 1..=3u64 {
        if id != last {
            nodes[id as usize - 1].kill9();
        }
    }
    let why = wait_for(
        "the node to be unready",
        Duration::from_secs(30),
        || async {
            let (status, body) = scrape::get(metrics, "/readyz").await.ok()?;
            (status == 503).then_some(body)
        },
    )
    .await;
    assert!(why.contains("no Raft leader known"), "{why}");
    assert_eq!(
        scrape::get(metrics, "/livez").await.unwrap(),
        (200, "ok\n".into())
    );
    let c = scrape::metrics(metrics).await.unwrap();
    assert_eq!(c.get("ferry_raft_has_leader"), Some(0.0), "{c:?}");
    assert_eq!(c.get("ferry_raft_voters"), Some(3.0));
}

/// gRPC server reflection answers, v1 and v1alpha, as grpcurl asks: the services listed, and a
/// service's file descriptor found by its symbol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_and_describes_them() {
    use futures::StreamExt;
    let env = TestEnv::new();
    let coord = CoordinatorProcess::start(&env).unwrap();
    let ch = env
        .channel(&coord.addr, Identity::Admin("probe".into()))
        .await
        .unwrap();

    {
        use tonic_reflection::pb::v1::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let ask = |m: MessageRequest| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(m),
        };
        let mut client = ServerReflectionClient::new(ch.clone());
        let answers: Vec<_> = client
            .server_reflection_info(futures::stream::iter([
                ask(MessageRequest::ListServices(String::new())),
                ask(MessageRequest::FileContainingSymbol(
                    "ferry.admin.v1.Admin".into(),
                )),
            ]))
            .await
            .unwrap()
            .into_inner()
            .collect()
            .await;
        let mut answers = answers
            .into_iter()
            .map(|a| a.unwrap().message_response.unwrap());
        let Some(MessageResponse::ListServicesResponse(list)) = answers.next() else {
            panic!("no service list");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        for want in [
            "ferry.admin.v1.Admin",
            "ferry.control.v1.AgentControl",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ] {
            assert!(names.contains(&want), "{want} not in {names:?}");
        }
        let Some(MessageResponse::FileDescriptorResponse(files)) = answers.next() else {
            panic!("no descriptor for the admin service");
        };
        let file = <prost_types::FileDescriptorProto as prost::Message>::decode(
            files.file_descriptor_proto[0].as_slice(),
        )
        .unwrap();
        assert_eq!(file.name(), "admin.proto");
        assert!(file.service.iter().any(|s| s.name() == "Admin"));
    }
    {
        use tonic_reflection::pb::v1alpha::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let mut client = ServerReflectionClient::new(ch);
        let answers: Vec<_> = client
            .server_reflection_info(futures::stream::iter([ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            }]))
            .await
            .unwrap()
            .into_inner()
            .collect()
            .await;
        let Some(MessageResponse::ListServicesResponse(list)) = answers
            .into_iter()
            .next()
            .unwrap()
            .unwrap()
            .message_response
        else {
            panic!("no v1alpha service list");
        };
        assert!(list
            .service
            .iter()
            .any(|s| s.name == "ferry.admin.v1.Admin"));
    }
}
