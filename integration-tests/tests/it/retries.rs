//! Segments that fail every time: they are retried with backoff a bounded number of times, then
//! given up on with their real cause, and the migration ends failed with the rest verified.

use ferry_proto::admin::{Phase, SegmentStatus};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use ferry_common::pki::Identity;
use ferry_proto::admin as pb;

use crate::harness::{make_files, migration_spec, wait_for, CoordinatorProcess, TestEnv};
use crate::processes::{ferryctl, spawn_agent};

/// A `tmpfs` of a fixed size mounted on a directory, unmounted when dropped (also when the test
/// panics).
struct SmallFs {
    dir: PathBuf,
}

impl SmallFs {
    /// Mounts a `tmpfs` of `size` (as `mount -o size=` takes it) on `dir`, or says why not.
    fn mount(dir: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "ferry-test",
            ])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(SmallFs {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazy: an agent process that still holds a file there does not keep it mounted.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// A child process killed when dropped, so a failing test leaves no agent behind.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of a log at WARN level.
fn warn_lines(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("WARN"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_target_disk_fails_the_file_with_its_cause_after_bounded_attempts() {
    let env = TestEnv::new();
    let root = env.path("dst");
    // Declared after `env`, so it is unmounted before the directory is removed.
    let _fs = match SmallFs::mount(&root, "1m") {
        Ok(fs) => fs,
        Err(e) => {
            crate::harness::skip(&format!(
                "cannot mount a 1 MiB tmpfs here ({e}); run as root"
            ));
            return;
        }
    };
    env.issue(Identity::Admin("ops".into()));
    let src = env.path("src");
    make_files(&src, 10, 4 * 1024);
    // 3 MiB cannot fit on a 1 MiB file system: pieces of it fail with ENOSPC, every time.
    std::fs::write(src.join("zz-big.bin"), vec![5u8; 3 * 1024 * 1024]).unwrap();
    let coord = CoordinatorProcess::start(&env).unwrap();
    let addr = coord.addr.clone();
    let _target = Killed(spawn_agent(&env, "dst-01", &addr, Some(&root)));
    let _source = Killed(spawn_agent(&env, "src-01", &addr, None));
    wait_for("both agents registered", Duration::from_secs(30), || {
        let out = ferryctl(&env, &addr, &["agents", "list", "-o", "json"]);
        async move {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (v.as_array()?.len() == 2).then_some(())
        }
    })
    .await;

    let source_arg = format!("src-01:{}", src.display());
    let out = ferryctl(
        &env,
        &addr,
        &[
            "migration",
            "create",
            "--source",
            &source_arg,
            "--target",
            "dst-01",
            "--segment-size",
            "262144",
            "--max-attempts",
            "3",
            "-o",
            "json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = created["migration_id"].as_u64().unwrap().to_string();
    let id = id.as_str();

    let status = wait_for(
        "the migration to end failed",
        Duration::from_secs(120),
        || {
            let out = ferryctl(&env, &addr, &["migration", "status", id, "-o", "json"]);
            async move {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
                (v["phase"] == "failed").then_some(v)
            }
        },
    )
    .await;
    let total = status["segments_total"].as_u64().unwrap();
    let failed = status["segments_failed"].as_u64().unwrap();
    assert!(failed >= 1, "{status:#}");
    assert_eq!(
        status["segments_verified"].as_u64().unwrap() + failed,
        total,
        "{status:#}"
    );
    // Bounded: at most 3 counted attempts per segment, and each failed one used all 3.
    let attempts = status["failed_attempts"].as_u64().unwrap();
    assert!(
        attempts <= total * 3,
        "{attempts} attempts for {total} segments"
    );
    let listed = status["failed"].as_array().unwrap();
    assert!(!listed.is_empty());
    for s in listed {
        assert_eq!(s["state"], "failed");
        assert_eq!(s["attempts"], 3, "{s:#}");
        let e = s["last_error"].as_str().unwrap();
        // The target's cause, in plain words, not the source's "stream stopped by peer".
        assert!(
            e.contains("no space left on the target's device"),
            "failed segment's error is not the cause: {e}"
        );
        assert!(!e.contains("stopped by peer"), "{e}");
    }
    assert!(
        listed
            .iter()
            .any(|s| s["last_error"].as_str().unwrap().contains("zz-big.bin")),
        "no failed segment names the file: {status:#}"
    );
    assert!(status["last_error"]
        .as_str()
        .unwrap()
        .contains("no space left on the target's device"));

    // What an operator reads: the table names the file and the cause; verify fails, listing it.
    let table = ferryctl(&env, &addr, &["migration", "status", id]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("FAILED"), "{table}");
    assert!(table.contains("zz-big.bin"), "{table}");
    let verify = ferryctl(&env, &addr, &["migration", "verify", id]);
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(
        !verify.status.success(),
        "verify passed a failed migration: {text}"
    );
    assert!(text.contains("NOT VERIFIED"), "{text}");
    assert!(
        text.contains("no space left on the target's device"),
        "{text}"
    );
    // Logs: a warning for a segment's first failure and one when it is given up on, not one
    // per retry.
    for agent in ["src-01", "dst-01"] {
        let n = warn_lines(&env.path(&format!("agent-{agent}.log")));
        assert!(
            n as u64 <= 2 * total + 2,
            "{agent} logged {n} warnings for {total} segments"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_the_source_cannot_read_fails_alone_and_everything_else_is_verified() {
    let env = TestEnv::new();
    let src = env.path("src");
    make_files(&src, 30, 8 * 1024);
    let big = src.join("model.bin");
    std::fs::write(&big, vec![9u8; 3 * 256 * 1024 + 100]).unwrap();
    let root = env.path("dst");
    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    // A target that has shut down cleanly receives nothing: the scan completes before any
    // byte is sent, so the file is broken after the scan and before its first piece goes.
    let target = env.agent("target", &coord, Some(root.clone())).await;
    target.shutdown().await;
    let source = env.agent("source", &coord, None).await;
    let ctl = env.ctl(&coord).await;
    let id = ctl
        .create(pb::MigrationSpec {
            max_attempts: 2,
            excludes: Vec::new(),
            ..migration_spec(&src, "copy")
        })
        .await
        .unwrap();
    let scanned = wait_for("the scan", Duration::from_secs(60), || async {
        let p = ctl.status(id).await.ok()?;
        p.scan_complete.then_some(p)
    })
    .await;
    assert_eq!(scanned.segments_verified, 0);
    assert!(!scanned.blocked.is_empty(), "nothing may be sent yet");
    // The file cannot be opened any more (even by root): a socket now stands in its place. (A
    // file that became a directory or vanished is not a failure: it changed, and the next
    // round sends what is there then.)
    std::fs::remove_file(&big).unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(&big).unwrap();
    let target = env.agent("target", &coord, Some(root.clone())).await;

    let done = ctl
        .watch(id, Duration::from_secs(120), |_, _| {})
        .await
        .unwrap();
    assert_eq!(done.phase(), Phase::Failed);
    // The file's 4 pieces failed; every other segment (the small files) is verified.
    assert_eq!(done.segments_failed, 4, "{done:#?}");
    assert_eq!(
        done.files_failed, 1,
        "one file (counted with its first piece)"
    );
    assert_eq!(done.segments_verified + 4, done.segments_total);
    assert_eq!(done.files_verified + 1, done.files_total);
    for s in &done.failed {
        assert_eq!(s.attempts, 2);
        assert!(
            s.last_error.contains("cannot open") && s.last_error.contains("model.bin"),
            "{}",
            s.last_error
        );
    }
    let v = ctl.verify(id, 0).await.unwrap();
    assert!(!v.all_verified);
    assert_eq!(v.segments_failed, 4);
    assert_eq!(
        v.unverified[0].state(),
        SegmentStatus::Failed,
        "failed segments are listed first"
    );
    // The small files arrived intact.
    for entry in std::fs::read_dir(src.join("d00")).unwrap() {
        let p = entry.unwrap().path();
        let copy = root.join("copy/d00").join(p.file_name().unwrap());
        assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(&copy).unwrap());
    }
    assert!(!root.join("copy/model.bin").exists());

    source.shutdown().await;
    target.shutdown().await;
    node.shutdown().await;
}
