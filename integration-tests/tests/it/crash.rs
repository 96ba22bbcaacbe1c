//! The crash matrix (issue 17): a process is aborted at a fault point
//! (`ferry_common::fault_point!`, `FAILPOINTS` in its environment) in the middle of a
//! migration and started again; the migration must end with every segment verified and the
//! target tree equal to the source by independent hashing, no temporary left behind. Target
//! cells: each point of the write path; a source cell: a segment sent, not yet accounted for.
//! Coordinator cells (the only node, so the leader): each
//! point of the Raft log and state machine. One named test per cell, so a failure says where.
//! The points are listed in docs/reliability.md.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use ferry_common::pki::Identity;

use crate::harness::{assert_same_tree, make_files, wait_for, CoordinatorProcess, TestEnv};
use crate::processes::{
    ferryctl, json, spawn_agent, spawn_agent_toml_env, terminate, wait_registered,
};

/// Names ferry keeps for itself that are left in `dir` (temporaries, parts, journals).
fn leftovers(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else if e.file_name().to_string_lossy().starts_with(".ferry-") {
                found.push(e.path().display().to_string());
            }
        }
    }
    found
}

/// Aborts the target at fault point `point` during its first segment, restarts it, and checks
/// that the migration ends done with the same tree as the source.
async fn target_crashes_at(point: &str) {
    let env = TestEnv::new();
    env.issue(Identity::Admin("ops".into()));
    let src = env.path("src");
    make_files(&src, 8, 96 * 1024);
    std::fs::write(src.join("large.bin"), vec![7u8; 700 * 1024]).unwrap();
    let root = env.path("dst");
    let mut coord = CoordinatorProcess::start(&env).unwrap();
    let addr = coord.addr.clone();
    let top = format!(
        "data_listen = \"127.0.0.1:0\"\nroot = \"{}\"\n",
        root.display()
    );
    let faults = [("FAILPOINTS".to_string(), format!("{point}=return"))];
    let mut target = spawn_agent_toml_env(&env, "dst", &addr, &top, "", &faults);
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
            "262144",
            "-o",
            "json",
        ],
    ));
    let id = created["migration_id"].as_u64().unwrap();

    // The target dies at the point, as a crash would stop it (SIGABRT, nothing cleaned up).
    aborted_at(&mut target, &env.path("agent-dst.log"), point).await;

    // Started again (same state directory and identity), without the fault.
    let mut target = spawn_agent(&env, "dst", &addr, Some(&root));
    started(&env, "dst").await;
    let done = wait_for("migration done", Duration::from_secs(120), || async {
        let p = ctl.status(id).await.ok()?;
        (p.phase == ferry_proto::admin::Phase::Done as i32).then_some(p)
    })
    .await;
    assert_eq!(done.segments_verified, done.segments_total, "{done:?}");
    assert_eq!(done.segments_failed, 0, "{done:?}");
    settled(&src, &root).await;
    terminate(&mut source, "source agent");
    terminate(&mut target, "target agent");
    terminate(coord.child_mut(), "coordinator");
}

/// Waits until nothing of ferry's own is left below `root` (a transfer from a process that
/// died ends when its connection times out, and removes its temporaries then), and checks the
/// tree is the source's.
async fn settled(src: &Path, root: &Path) {
    wait_for("no temporaries left", Duration::from_secs(60), || {
        let left = leftovers(root);
        async move { left.is_empty().then_some(()) }
    })
    .await;
    assert_same_tree(src, &root.join("copy"));
}

/// Waits until the agent `name` started again has registered (its new log says so), so that it
/// handles SIGTERM (the old registration may still look live to the coordinator).
async fn started(env: &TestEnv, name: &str) {
    let log = env.path(&format!("agent-{name}.log"));
    wait_for(
        "the agent registered again",
        Duration::from_secs(30),
        || {
            let ok = std::fs::read_to_string(&log).is_ok_and(|l| l.contains("Agent registered."));
            async move { ok.then_some(()) }
        },
    )
    .await;
}

/// Waits for `child` to die of SIGABRT (a fault point reached) and checks its log says which.
async fn aborted_at(child: &mut std::process::Child, log: &Path, point: &str) {
    let status = wait_for("the process to crash", Duration::from_secs(60), || {
        let s = child.try_wait().unwrap();
        async move { s }
    })
    .await;
    assert_eq!(
        status.signal(),
        Some(libc::SIGABRT),
        "stopped at {point}: {status}"
    );
    let log = std::fs::read_to_string(log).unwrap();
    assert!(
        log.contains(&format!("fault point {point} reached")),
        "{log}"
    );
}

/// Stops the only coordinator node mid-migration, starts it with fault point `point` armed to
/// fire at its fourth hit (after the election's own entries, while the agents report), checks
/// that it aborted there, starts it again without, and checks the migration ends done and
/// equal.
async fn coordinator_crashes_at(point: &str) {
    let env = TestEnv::new();
    env.issue(Identity::Admin("ops".into()));
    let src = env.path("src");
    make_files(&src, 40, 16 * 1024);
    std::fs::write(src.join("large.bin"), vec![5u8; 300 * 1024]).unwrap();
    let root = env.path("dst");
    let mut coord = CoordinatorProcess::start(&env).unwrap();
    let addr = coord.addr.clone();
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
            "65536",
            "--throttle",
            "2mbit",
            "-o",
            "json",
        ],
    ));
    let id = created["migration_id"].as_u64().unwrap();
    wait_for("a segment verified", Duration::from_secs(60), || async {
        let p = ctl.status(id).await.ok()?;
        (p.segments_verified > 0).then_some(())
    })
    .await;

    terminate(coord.child_mut(), "coordinator");
    let armed = format!("{point}=3*off->return");
    coord
        .restart_with_env(&[("FAILPOINTS", armed.as_str())])
        .unwrap();
    aborted_at(coord.child_mut(), &env.path("coordinator-1.log"), point).await;
    coord.restart().unwrap();
    let ctl = wait_for("coordinator back", Duration::from_secs(30), || {
        env.ctl_try(&addr)
    })
    .await;
    let recovered = ctl.status(id).await.unwrap();
    assert_ne!(
        recovered.phase,
        ferry_proto::admin::Phase::Done as i32,
        "the crash came mid-migration: {recovered:?}"
    );
    let done = wait_for("migration done", Duration::from_secs(120), || async {
        let p = ctl.status(id).await.ok()?;
        (p.phase == ferry_proto::admin::Phase::Done as i32).then_some(p)
    })
    .await;
    assert_eq!(done.segments_verified, done.segments_total, "{done:?}");
    assert_eq!(done.segments_failed, 0, "{done:?}");
    settled(&src, &root).await;
    terminate(&mut source, "source agent");
    terminate(&mut target, "target agent");
    terminate(coord.child_mut(), "coordinator");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_crashes_after_appending_before_the_log_flush() {
    coordinator_crashes_at("raft::append_before_flush").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_crashes_after_the_log_flush_before_acknowledging_it() {
    coordinator_crashes_at("raft::append_after_flush").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_crashes_applying_before_recording_the_state() {
    coordinator_crashes_at("raft::apply_before_record").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_crashes_after_recording_the_state_before_answering() {
    coordinator_crashes_at("raft::apply_after_record").await;
}

/// The source dies right after a segment's transfer ended (verified by the target's report,
/// or to be reported by the source), is started again, and the migration ends done and equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_crashes_after_sending_a_segment_before_accounting_for_it() {
    let env = TestEnv::new();
    env.issue(Identity::Admin("ops".into()));
    let src = env.path("src");
    make_files(&src, 8, 96 * 1024);
    let root = env.path("dst");
    let mut coord = CoordinatorProcess::start(&env).unwrap();
    let addr = coord.addr.clone();
    let mut target = spawn_agent(&env, "dst", &addr, Some(&root));
    let point = "source::after_send";
    let faults = [("FAILPOINTS".to_string(), format!("{point}=return"))];
    let mut source = spawn_agent_toml_env(&env, "src", &addr, "", "", &faults);
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
            "262144",
            "-o",
            "json",
        ],
    ));
    let id = created["migration_id"].as_u64().unwrap();
    aborted_at(&mut source, &env.path("agent-src.log"), point).await;
    let mut source = spawn_agent(&env, "src", &addr, None);
    started(&env, "src").await;
    let done = wait_for("migration done", Duration::from_secs(120), || async {
        let p = ctl.status(id).await.ok()?;
        (p.phase == ferry_proto::admin::Phase::Done as i32).then_some(p)
    })
    .await;
    assert_eq!(done.segments_verified, done.segments_total, "{done:?}");
    assert_eq!(done.segments_failed, 0, "{done:?}");
    settled(&src, &root).await;
    terminate(&mut source, "source agent");
    terminate(&mut target, "target agent");
    terminate(coord.child_mut(), "coordinator");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_crashes_after_writing_before_fsync() {
    target_crashes_at("sink::before_fsync").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_crashes_after_fsync_before_rename_into_place() {
    target_crashes_at("sink::before_rename").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_crashes_after_rename_before_directory_fsync() {
    target_crashes_at("sink::after_rename").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_crashes_after_commit_before_its_report() {
    target_crashes_at("target::before_report").await;
}
