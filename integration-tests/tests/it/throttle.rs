//! Throttling through the whole system: `ferryctl`'s calls set limits in Raft, the source learns
//! them from its heartbeats and paces its bytes, over real QUIC to a real target. Checked by
//! bytes over time from the source's own counter (`bytes_sent`, counted after each paced
//! write): at every sample, what was sent since a limit took effect is at most the limit times
//! the time since, plus one bucket. No timing is asserted the other way (a slow machine only
//! sends less).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ferry_agent::throttle::{Scope, BURST_TIME};
use ferry_common::rate::Rate;
use ferry_proto::admin::Phase;

use crate::harness::{finished, make_files, migration_spec, wait_for, TestEnv};

/// The most a bucket for `bps` lets through at once, plus one 1 MiB read in flight between
/// the take and the counter.
fn slack(bps: u64) -> f64 {
    (bps as f64 / 8.0 * BURST_TIME.as_secs_f64()).max(16.0 * 1024.0) + 1024.0 * 1024.0
}

/// Samples `sent` every 50 ms for `span` and checks that since `(t0, b0)` no more than `bps`
/// went out (plus [`slack`]); returns how much went out.
async fn paced(
    what: &str,
    sent: &dyn Fn() -> u64,
    t0: Instant,
    b0: u64,
    bps: u64,
    span: Duration,
) -> u64 {
    let rate = bps as f64 / 8.0;
    let mut samples = 0;
    let mut last = b0;
    while t0.elapsed() < span {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (t, b) = (t0.elapsed().as_secs_f64(), sent());
        let allowed = rate * t + slack(bps);
        assert!(
            (b - b0) as f64 <= allowed,
            "{what}: {} bytes sent {t:.2} s after the {bps} bit/s limit took effect; at most \
             {allowed:.0} may be",
            b - b0
        );
        samples += 1;
        last = b;
    }
    assert!(samples >= 10, "{what}: too few samples");
    last - b0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_list_their_congestion_control_and_throttles_pace_the_source_live() {
    let env = TestEnv::new();
    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    let src = env.path("src");
    make_files(&src, 64, 256 * 1024); // 16 MiB
    let root = env.path("dst");
    // The target runs CUBIC, configured; the source BBR, by default. Each registers its own.
    let mut cfg = env.agent_config("target", &coord, Some(root.clone()));
    cfg.transport.congestion = ferry_common::transport::Congestion::Cubic;
    cfg.transport.path_bandwidth = Some(Rate(1_000_000_000));
    cfg.transport.path_rtt_ms = Some(250);
    let target = ferry_agent::run::start(cfg).await.unwrap();
    let source = env.agent("source", &coord, None).await;
    let sent = || source.stats.bytes_sent.load(Ordering::Relaxed);
    let ctl = env.ctl(&coord).await;

    // 1. The agent's limit is in force before the migration exists, so it paces every byte.
    let now = ctl.set_throttle("", "source", "16 Mbit").await.unwrap();
    assert_eq!(now, "16mbit");
    wait_for(
        "the source to learn its throttle",
        Duration::from_secs(20),
        || async {
            (source.throttles.rate_at(Scope::Agent, 0) == Some(Rate(16_000_000))).then_some(())
        },
    )
    .await;
    let agents = ctl.agents().await.unwrap();
    let a = agents.iter().find(|a| a.name == "source").unwrap();
    assert_eq!(
        (a.throttle.as_str(), a.congestion.as_str()),
        ("16mbit", "bbr")
    );
    assert_eq!(
        a.window_bytes,
        ferry_common::transport::DEFAULT_WINDOW,
        "{a:?}"
    );
    let t = agents.iter().find(|a| a.name == "target").unwrap();
    assert_eq!(
        (t.throttle.as_str(), t.congestion.as_str()),
        ("off", "cubic")
    );
    // Twice the bandwidth-delay product of 1 Gbit/s at 250 ms.
    assert_eq!(t.window_bytes, 62_500_000, "{t:?}");

    let id = ctl.create(migration_spec(&src, "")).await.unwrap();
    // The source scans, registers and leases first: pace from its first bytes on (a token
    // bucket bounds what goes out in any span, wherever it starts).
    let (t0, b0) = wait_for("the first bytes", Duration::from_secs(30), || async {
        let b = sent();
        (b > 0).then(|| (Instant::now(), b))
    })
    .await;
    let during = paced(
        "agent limit",
        &sent,
        t0,
        b0,
        16_000_000,
        Duration::from_millis(1500),
    )
    .await;
    assert!(during > 0, "nothing was sent under the agent's limit");

    // 2. A lower limit on the migration, the agent's lifted: from the moment the source has
    //    learnt both, the migration's limit binds.
    let m = ctl
        .set_throttle(&id.to_string(), "", "4mbit")
        .await
        .unwrap();
    assert_eq!(m, "4mbit");
    assert_eq!(ctl.set_throttle("", "source", "off").await.unwrap(), "off");
    wait_for(
        "the source to learn the new limits",
        Duration::from_secs(20),
        || async {
            (source.throttles.rate_at(Scope::Migration(id), 0) == Some(Rate(4_000_000))
                && source.throttles.rate_at(Scope::Agent, 0).is_none())
            .then_some(())
        },
    )
    .await;
    let status = ctl.status(id).await.unwrap();
    assert_eq!(status.throttle, "4mbit");
    assert_ne!(status.phase(), Phase::Done, "sent faster than its limits");
    let (t1, b1) = (Instant::now(), sent());
    let during = paced(
        "migration limit",
        &sent,
        t1,
        b1,
        4_000_000,
        Duration::from_millis(1500),
    )
    .await;
    assert!(during > 0, "nothing was sent under the migration's limit");

    // 3. Off lifts it: the rest goes unthrottled and the migration completes, verified.
    assert!(ctl.set_throttle("no-such", "", "1mbit").await.is_err());
    assert!(ctl.set_throttle(&id.to_string(), "", "fast").await.is_err());
    ctl.set_throttle(&id.to_string(), "", "off").await.unwrap();
    finished(&ctl, id, Duration::from_secs(120), &|| String::new()).await;
    assert_eq!(ctl.status(id).await.unwrap().throttle, "off");
    // Between rounds the throttle is kept for the next sync round.
    ctl.set_throttle(&id.to_string(), "", "1mbit")
        .await
        .unwrap();
    assert_eq!(ctl.status(id).await.unwrap().throttle, "1mbit");
    source.shutdown().await;
    target.shutdown().await;
    node.shutdown().await;
}
