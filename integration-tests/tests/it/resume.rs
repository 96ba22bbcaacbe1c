//! Restarts mid-migration: the migration completes with identical data, and no segment that was
//! verified before the restart is sent again (asserted on lease counts and bytes-sent counters).

use ferry_proto::admin::SegmentStatus;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ferry_proto::admin as pb;

use crate::harness::{
    assert_not_resent, assert_same_tree, finished, make_files, migration_spec, wait_for,
    wait_verified, CoordinatorProcess, Finished, TestEnv,
};

/// Upper bound on bytes a source may send after `before`: only segments not yet verified then,
/// once per new lease plus one lease possibly in flight at the snapshot.
fn resend_bound(before: &pb::VerifyMigrationResponse, after: &pb::VerifyMigrationResponse) -> u64 {
    let after: HashMap<u64, &pb::SegmentState> =
        after.segments.iter().map(|s| (s.segment_id, s)).collect();
    before
        .segments
        .iter()
        .filter(|s| s.state() != SegmentStatus::Verified)
        .map(|s| s.bytes * (after[&s.segment_id].leases - s.leases + 1) as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn target_restart_mid_migration_resumes_without_resending_verified_segments() {
    let env = TestEnv::new();
    let src = env.path("src");
    make_files(&src, 400, 48 * 1024);
    let root = env.path("dst");
    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    let target = env.agent("target", &coord, Some(root.clone())).await;
    let mut cfg = env.agent_config("source", &coord, None);
    cfg.max_in_flight = 1;
    let source = ferry_agent::run::start(cfg).await.unwrap();
    let ctl = env.ctl(&coord).await;
    let id = ctl.create(migration_spec(&src, "restored")).await.unwrap();

    wait_verified(&ctl, id, 5).await;
    target.shutdown().await;
    let sent_before = source.stats.bytes_sent.load(Ordering::Relaxed);
    let before = ctl.verify(id, u32::MAX).await.unwrap();
    assert!(
        before.segments_verified < before.segments_total,
        "the migration finished before the target stopped; the test would prove nothing"
    );

    let target = env.agent("target", &coord, Some(root.clone())).await;
    let Finished {
        progress: done,
        verify: after,
    } = finished(&ctl, id, Duration::from_secs(60), &String::new).await;
    assert_not_resent(&before, &after);
    let sent_after = source.stats.bytes_sent.load(Ordering::Relaxed) - sent_before;
    assert!(
        sent_after <= resend_bound(&before, &after),
        "sent {sent_after} bytes after the restart, more than the unverified segments account for"
    );
    assert!(source.stats.bytes_sent.load(Ordering::Relaxed) >= done.bytes_total);
    assert_same_tree(&src, &root.join("restored"));

    source.shutdown().await;
    target.shutdown().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_kill9_mid_migration_resumes_from_its_sled_directory() {
    let env = TestEnv::new();
    let src = env.path("src");
    make_files(&src, 400, 48 * 1024);
    // A split file too, so pieces verified before the crash must be kept by the target.
    std::fs::write(src.join("big.bin"), vec![7u8; 3 * 256 * 1024 + 1000]).unwrap();
    let root = env.path("dst");
    let mut coord = CoordinatorProcess::start(&env).unwrap();
    let addr = coord.addr.clone();
    let ctl = wait_for("coordinator to serve", Duration::from_secs(30), || async {
        let ctl = env.ctl_try(&addr).await?;
        ctl.cluster_status()
            .await
            .ok()
            .filter(|s| s.leader_id == 1)
            .map(|_| ctl)
    })
    .await;
    let target = env.agent("target", &addr, Some(root.clone())).await;
    let mut cfg = env.agent_config("source", &addr, None);
    cfg.max_in_flight = 1;
    let source = ferry_agent::run::start(cfg).await.unwrap();
    let id = ctl.create(migration_spec(&src, "restored")).await.unwrap();

    wait_verified(&ctl, id, 5).await;
    let before = ctl.verify(id, u32::MAX).await.unwrap();
    coord.kill9();
    assert!(
        before.segments_verified < before.segments_total,
        "the migration finished before the kill; the test would prove nothing"
    );
    coord.restart().unwrap();
    let ctl = wait_for(
        "coordinator to come back",
        Duration::from_secs(30),
        || async {
            let ctl = env.ctl_try(&addr).await?;
            ctl.cluster_status()
                .await
                .ok()
                .filter(|s| s.leader_id == 1)
                .map(|_| ctl)
        },
    )
    .await;
    let log = || format!("coordinator log:\n{}", coord.log());
    let after = finished(&ctl, id, Duration::from_secs(60), &log)
        .await
        .verify;
    assert_not_resent(&before, &after);
    assert_same_tree(&src, &root.join("restored"));
    assert!(
        coord.log().contains("Resuming an initialised cluster"),
        "{}",
        coord.log()
    );

    source.shutdown().await;
    target.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn source_restart_mid_migration_continues_from_its_manifest() {
    let env = TestEnv::new();
    let src = env.path("src");
    make_files(&src, 400, 48 * 1024);
    let root = env.path("dst");
    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    let target = env.agent("target", &coord, Some(root.clone())).await;
    let mut cfg = env.agent_config("source", &coord, None);
    cfg.max_in_flight = 1;
    let source = ferry_agent::run::start(cfg.clone()).await.unwrap();
    let ctl = env.ctl(&coord).await;
    let id = ctl.create(migration_spec(&src, "restored")).await.unwrap();

    wait_for(
        "scan complete and some verified",
        Duration::from_secs(120),
        || async {
            let p = ctl.status(id).await.ok()?;
            (p.scan_complete && p.segments_verified >= 5).then_some(())
        },
    )
    .await;
    source.shutdown().await;
    let before = ctl.verify(id, u32::MAX).await.unwrap();
    assert!(
        before.segments_verified < before.segments_total,
        "finished too early to prove anything"
    );
    // The shut-down source released its in-flight lease instead of letting it expire.
    assert!(
        before
            .segments
            .iter()
            .all(|s| s.state() != SegmentStatus::Leased),
        "a lease was left behind"
    );

    let source = ferry_agent::run::start(cfg).await.unwrap();
    let after = finished(&ctl, id, Duration::from_secs(60), &String::new)
        .await
        .verify;
    assert_not_resent(&before, &after);
    let unverified: u64 = before
        .segments
        .iter()
        .filter(|s| s.state() != SegmentStatus::Verified)
        .map(|s| s.bytes)
        .sum();
    assert_eq!(
        source.stats.bytes_sent.load(Ordering::Relaxed),
        unverified,
        "the restarted source sends exactly the segments not yet verified, once"
    );
    assert_same_tree(&src, &root.join("restored"));
    source.shutdown().await;
    target.shutdown().await;
    node.shutdown().await;
}

/// The coordinators' data is wiped and a new cluster made, while the agents keep their state
/// directories: the new cluster's migration 1 must copy its own tree, not the old migration 1's
/// manifest (agent state is keyed by cluster id and migration uuid).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_cluster_never_takes_an_old_clusters_agent_state_for_its_own() {
    let env = TestEnv::new();
    let old_src = env.path("old-src");
    make_files(&old_src, 30, 8 * 1024);
    let new_src = env.path("new-src");
    for i in 0..5 {
        let p = new_src.join(format!("new/n{i}.txt"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, format!("new tree, file {i}")).unwrap();
    }
    let root = env.path("dst");

    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    let target = env.agent("target", &coord, Some(root.clone())).await;
    let source = env.agent("source", &coord, None).await;
    let ctl = env.ctl(&coord).await;
    let old = ctl.create(migration_spec(&old_src, "same")).await.unwrap();
    finished(&ctl, old, Duration::from_secs(60), &String::new).await;
    assert_same_tree(&old_src, &root.join("same"));
    source.shutdown().await;
    target.shutdown().await;
    node.shutdown().await;

    // A new cluster on the wiped data directory; the agents come back with their state.
    std::fs::remove_dir_all(env.path("coordinator-1")).unwrap();
    std::fs::remove_dir_all(root.join("same")).unwrap();
    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    let target = env.agent("target", &coord, Some(root.clone())).await;
    let source = env.agent("source", &coord, None).await;
    let ctl = env.ctl(&coord).await;
    let new = ctl.create(migration_spec(&new_src, "same")).await.unwrap();
    assert_eq!(
        new, old,
        "ids restart in a new cluster: that is what could collide"
    );
    let done = finished(&ctl, new, Duration::from_secs(60), &String::new)
        .await
        .progress;
    assert_eq!(
        done.files_total, 5,
        "the new tree's files, not the old manifest's"
    );
    assert_same_tree(&new_src, &root.join("same"));

    source.shutdown().await;
    target.shutdown().await;
    node.shutdown().await;
}

/// Files below `root` by kind: (published names, temporaries of transfers).
fn published_and_staged(root: &std::path::Path) -> (Vec<String>, usize) {
    let (mut published, mut staged) = (Vec::new(), 0);
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else if name.starts_with(ferry_agent::sink::RESERVED_PREFIX) {
                staged += 1;
            } else {
                published.push(e.path().display().to_string());
            }
        }
    }
    (published, staged)
}

/// Issue 11: a bundle's files are made durable together, by one barrier before the target
/// reports. A target killed (SIGKILL) mid-bundle must have published none of the bundle's
/// files and the coordinator verified none; the restarted target sweeps what the dead process
/// staged, the bundle is sent again, and the tree arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_killed_mid_bundle_publishes_nothing_and_the_resent_bundle_completes() {
    let env = TestEnv::new();
    let src = env.path("src");
    make_files(&src, 300, 8 * 1024);
    let root = env.path("dst");
    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    let ctl = env.ctl(&coord).await;
    let source = env.agent("source", &coord, None).await;
    // Slow the source down (2.4 MB at 0.5 MB/s) so that the target can be killed mid-bundle.
    crate::harness::throttle_agent(&ctl, &source, "source", "4mbit").await;
    let mut target = crate::processes::spawn_agent(&env, "target", &coord, Some(&root));
    crate::processes::wait_registered(&ctl, "target", true).await;
    let spec = pb::MigrationSpec {
        segment_size: 4 << 20, // one bundle of all 300 files
        ..migration_spec(&src, "")
    };
    let id = ctl.create(spec).await.unwrap();
    wait_for(
        "the bundle to be half staged",
        Duration::from_secs(60),
        || async { (published_and_staged(&root).1 >= 100).then_some(()) },
    )
    .await;
    target.kill().unwrap();
    target.wait().unwrap();

    let (published, staged) = published_and_staged(&root);
    assert!(staged > 0);
    assert!(
        published.is_empty(),
        "files published before their bundle was durable: {published:?}"
    );
    let status = ctl.status(id).await.unwrap();
    assert_eq!(status.segments_total, 1, "{status:?}");
    assert_eq!(status.segments_verified, 0, "{status:?}");

    ctl.set_throttle("", "source", "off").await.unwrap();
    let mut target = crate::processes::spawn_agent(&env, "target", &coord, Some(&root));
    let log = || std::fs::read_to_string(env.path("agent-target.log")).unwrap_or_default();
    finished(&ctl, id, Duration::from_secs(120), &log).await;
    wait_for(
        "the dead process's temporaries to be swept",
        Duration::from_secs(30),
        || async { (published_and_staged(&root).1 == 0).then_some(()) },
    )
    .await;
    assert_same_tree(&src, &root);
    crate::processes::terminate(&mut target, "target");
    source.shutdown().await;
    node.shutdown().await;
}
