//! The crash matrix (issue 17): a process is aborted at a fault point
//! (`ferry_common::fault_point!`, `FAILPOINTS` in its environment) in the middle of a
//! migration and started again; the migration must end with every segment verified and the
//! target tree equal to the source by independent hashing, no temporary left behind. Target
//! cells: each point of the write path; a source cell: a segment sent, not yet accounted for;
//! coordinator cells (the only node, so the leader): each point of the Raft log and state
//! machine. One named test per cell, so a failure says where. The points are listed in
//! docs/reliability.md.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use ferry_common::pki::Identity;

use crate::harness::{
    assert_same_tree, finished, make_files, wait_for, CoordinatorProcess, TestEnv,
};
use crate::processes::{
    ferryctl, json, spawn_agent, spawn_agent_toml_env, terminate, wait_registered,
};

/// A coordinator process, a source and a target agent process, and a source tree.
struct Rig {
    env: TestEnv,
    coord: CoordinatorProcess,
    src: PathBuf,
    root: PathBuf,
    source: Child,
    target: Child,
}

/// `FAILPOINTS` armed at `point` with `actions` (`return`: at its first hit).
fn armed(point: &str, actions: &str) -> [(String, String); 1] {
    [("FAILPOINTS".to_string(), format!("{point}={actions}"))]
}

impl Rig {
    /// `files` files of `size` bytes and one split file of `large` bytes; the target and the
    /// source started with `target_env` and `source_env`.
    async fn start(
        (files, size, large): (usize, usize, usize),
        target_env: &[(String, String)],
        source_env: &[(String, String)],
    ) -> Rig {
        let env = TestEnv::new();
        env.issue(Identity::Admin("ops".into()));
        let src = env.path("src");
        make_files(&src, files, size);
        std::fs::write(src.join("large.bin"), vec![7u8; large]).unwrap();
        let root = env.path("dst");
        let coord = CoordinatorProcess::start(&env).unwrap();
        let top = format!(
            "data_listen = \"127.0.0.1:0\"\nroot = \"{}\"\n",
            root.display()
        );
        let target = spawn_agent_toml_env(&env, "dst", &coord.addr, &top, "", target_env);
        let source = spawn_agent_toml_env(&env, "src", &coord.addr, "", "", source_env);
        let ctl = env.ctl(&coord.addr).await;
        wait_registered(&ctl, "dst", true).await;
        wait_registered(&ctl, "src", false).await;
        Rig {
            env,
            coord,
            src,
            root,
            source,
            target,
        }
    }

    /// Creates the migration of the source tree to `dst:copy` with `extra` arguments.
    fn create(&self, extra: &[&str]) -> u64 {
        let from = format!("src:{}", self.src.display());
        let mut args: Vec<&str> = vec![
            "migration",
            "create",
            "--source",
            &from,
            "--target",
            "dst:copy",
            "-o",
            "json",
        ];
        args.extend_from_slice(extra);
        json(&ferryctl(&self.env, &self.coord.addr, &args))["migration_id"]
            .as_u64()
            .unwrap()
    }

    /// Starts agent `name` again (same state directory and identity), without any fault, and
    /// waits until it registered (its new log says so: the old registration may still look
    /// live to the coordinator), so that it handles SIGTERM.
    async fn restart_agent(&mut self, name: &str) {
        let root = (name == "dst").then_some(self.root.as_path());
        let child = spawn_agent(&self.env, name, &self.coord.addr, root);
        *match name {
            "dst" => &mut self.target,
            _ => &mut self.source,
        } = child;
        let log = self.env.path(&format!("agent-{name}.log"));
        wait_for(
            "the agent registered again",
            Duration::from_secs(30),
            || {
                let ok =
                    std::fs::read_to_string(&log).is_ok_and(|l| l.contains("Agent registered."));
                async move { ok.then_some(()) }
            },
        )
        .await;
    }

    /// Migration `id` ends done with every segment verified and none failed; once nothing of
    /// ferry's own is left below the root (a transfer from a process that died ends when its
    /// connection times out, and removes its temporaries then), the tree is the source's.
    /// Then everything stops cleanly.
    async fn ends_equal(mut self, id: u64) {
        let ctl = self.env.ctl(&self.coord.addr).await;
        let log = || std::fs::read_to_string(self.env.path("agent-dst.log")).unwrap_or_default();
        let done = finished(&ctl, id, Duration::from_secs(120), &log).await;
        assert_eq!(done.progress.segments_failed, 0, "{:?}", done.progress);
        wait_for("no temporaries left", Duration::from_secs(60), || {
            let left = leftovers(&self.root);
            async move { left.is_empty().then_some(()) }
        })
        .await;
        assert_same_tree(&self.src, &self.root.join("copy"));
        terminate(&mut self.source, "source agent");
        terminate(&mut self.target, "target agent");
        terminate(self.coord.child_mut(), "coordinator");
    }
}

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

/// Waits for `child` to die of SIGABRT (a fault point reached, as a crash would stop it:
/// nothing cleaned up) and checks its log says which.
async fn aborted_at(child: &mut Child, log: &Path, point: &str) {
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

/// Aborts the target at fault point `point` during its first segment, starts it again, and
/// checks that the migration ends done with the same tree as the source.
async fn target_crashes_at(point: &str) {
    let mut rig = Rig::start((8, 96 * 1024, 700 * 1024), &armed(point, "return"), &[]).await;
    let id = rig.create(&["--segment-size", "262144"]);
    let log = rig.env.path("agent-dst.log");
    aborted_at(&mut rig.target, &log, point).await;
    rig.restart_agent("dst").await;
    rig.ends_equal(id).await;
}

/// Stops the only coordinator node mid-migration, starts it with fault point `point` armed to
/// fire at its fourth hit (after the election's own entries, while the agents report), checks
/// that it aborted there, starts it again without, and checks the migration ends done and
/// equal.
async fn coordinator_crashes_at(point: &str) {
    let mut rig = Rig::start((40, 16 * 1024, 300 * 1024), &[], &[]).await;
    // Throttled, so that it still runs when the node comes back.
    let id = rig.create(&["--segment-size", "65536", "--throttle", "2mbit"]);
    let ctl = rig.env.ctl(&rig.coord.addr).await;
    wait_for("a segment verified", Duration::from_secs(60), || async {
        let p = ctl.status(id).await.ok()?;
        (p.segments_verified > 0).then_some(())
    })
    .await;

    terminate(rig.coord.child_mut(), "coordinator");
    let [(var, value)] = armed(point, "3*off->return");
    rig.coord
        .restart_with_env(&[(var.as_str(), value.as_str())])
        .unwrap();
    let log = rig.env.path("coordinator-1.log");
    aborted_at(rig.coord.child_mut(), &log, point).await;
    rig.coord.restart().unwrap();
    let addr = rig.coord.addr.clone();
    let ctl = wait_for("coordinator back", Duration::from_secs(30), || {
        rig.env.ctl_try(&addr)
    })
    .await;
    let recovered = ctl.status(id).await.unwrap();
    assert_ne!(
        recovered.phase,
        ferry_proto::admin::Phase::Done as i32,
        "the crash came mid-migration: {recovered:?}"
    );
    rig.ends_equal(id).await;
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
    let point = "source::after_send";
    let mut rig = Rig::start((8, 96 * 1024, 300 * 1024), &[], &armed(point, "return")).await;
    let id = rig.create(&["--segment-size", "262144"]);
    let log = rig.env.path("agent-src.log");
    aborted_at(&mut rig.source, &log, point).await;
    rig.restart_agent("src").await;
    rig.ends_equal(id).await;
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
