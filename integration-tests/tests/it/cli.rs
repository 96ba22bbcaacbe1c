//! Issue 16 (ferryctl as operators expect): each documented exit code produced by a real
//! failure, a closed pipe ends it quietly with 0, completions and the man page.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use ferry_common::names::Role;
use ferry_common::pki::Identity;
use ferry_integration_tests::process::DeadAddr;

use crate::harness::{ferryctl_bin, wait_for, TestEnv};

fn catalog() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/plan/catalog.example.toml"
    )
    .to_string()
}

/// `ferryctl` as admin `admin` of `env` against `coord`.
fn run(env: &TestEnv, coord: &str, admin: &str, args: &[&str]) -> Output {
    Command::new(ferryctl_bin())
        .args(["--coordinator", coord, "--pki-dir"])
        .arg(env.pki())
        .args(["--admin", admin])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ferryctl")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_exit_code_comes_from_a_real_failure() {
    let env = TestEnv::new();
    env.issue(Identity::Admin("ops".into()));
    env.issue(Identity::User("vera".into(), Role::Viewer));
    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    let ctl = env.ctl(&coord).await;
    let _source = env.agent("source", &coord, None).await;
    let _target = env.agent("target", &coord, Some(env.path("dst"))).await;

    // 0: done.
    let o = run(&env, &coord, "ops", &["agents", "list"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // 1: a local problem (a catalog that is not there).
    let o = run(
        &env,
        &coord,
        "ops",
        &[
            "plan",
            "--data",
            "1TB",
            "--deadline",
            "1h",
            "--catalog",
            "/nonexistent.toml",
        ],
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot read the catalog"),
        "{}",
        stderr(&o)
    );
    // 2: usage; a coordinator address without a port is one too (not a dial to 443).
    let o = run(&env, &coord, "ops", &["migration", "status"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    let o = run(&env, "localhost", "ops", &["agents", "list"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("no port"), "{}", stderr(&o));
    // 3: unreachable.
    let dead = DeadAddr::new().unwrap();
    let o = run(&env, &dead.addr.to_string(), "ops", &["agents", "list"]);
    assert_eq!(code(&o), 3, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot reach the coordinator"),
        "{}",
        stderr(&o)
    );
    // 4: not found.
    let o = run(
        &env,
        &coord,
        "ops",
        &["migration", "status", "no-such-migration"],
    );
    assert_eq!(code(&o), 4, "{}", stderr(&o));
    // 5: refused for the certificate's role.
    let o = run(
        &env,
        &coord,
        "vera",
        &[
            "migration",
            "create",
            "--source",
            "source:/tmp",
            "--target",
            "target:x",
        ],
    );
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    // 6: no admin certificate, and one of another cluster's CA: each named as such, not as
    // an unreachable coordinator.
    let o = run(&env, &coord, "nobody", &["agents", "list"]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot load admin certificate"),
        "{}",
        stderr(&o)
    );
    let other = TestEnv::new();
    other.issue(Identity::Admin("ops".into()));
    let o = run(&other, &coord, "ops", &["agents", "list"]);
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    assert!(stderr(&o).contains("TLS handshake"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("is it running"), "{}", stderr(&o));
    // 7: what was checked failed: a migration whose source root does not exist ends failed,
    // and its verification says so.
    let o = run(
        &env,
        &coord,
        "ops",
        &[
            "migration",
            "create",
            "--name",
            "lost",
            "--source",
            "source:/nonexistent/ferry-src",
            "--target",
            "target:lost",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    wait_for(
        "the migration to end failed",
        Duration::from_secs(30),
        || async {
            let p = ctl.status_of("lost").await.ok()?;
            (p.phase() == ferry_proto::admin::Phase::Failed).then_some(())
        },
    )
    .await;
    let o = run(&env, &coord, "ops", &["migration", "verify", "lost"]);
    assert_eq!(
        code(&o),
        7,
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
}

/// `ferryctl … | head -1`: once the reader has gone, ferryctl ends with 0 instead of
/// panicking on the closed pipe (here the pipe is closed before it writes anything).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_pipe_ends_ferryctl_quietly() {
    let env = TestEnv::new();
    env.issue(Identity::Admin("ops".into()));
    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    let _target = env.agent("target", &coord, Some(env.path("dst"))).await;
    for args in [
        vec![
            "plan",
            "--data",
            "200TB",
            "--deadline",
            "72h",
            "--catalog",
            &catalog(),
        ],
        vec!["agents", "list"],
        vec!["completions", "bash"],
    ] {
        let mut child = Command::new(ferryctl_bin())
            .args(["--coordinator", &coord, "--pki-dir"])
            .arg(env.pki())
            .args(["--admin", "ops"])
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
}

#[test]
fn completions_and_the_man_page_are_generated() {
    let env = TestEnv::new();
    for shell in ["bash", "zsh", "fish"] {
        let o = run(&env, "127.0.0.1:1", "ops", &["completions", shell]);
        assert_eq!(code(&o), 0, "{shell}: {}", stderr(&o));
        let text = String::from_utf8(o.stdout).unwrap();
        for word in ["migration", "plan", "cutover", "coordinator"] {
            assert!(text.contains(word), "{shell} completions lack {word}");
        }
    }
    let o = run(&env, "127.0.0.1:1", "ops", &["man"]);
    let page = String::from_utf8(o.stdout).unwrap();
    assert!(page.contains(".TH ferryctl 1"), "{page}");
    assert!(
        page.contains("Exit codes"),
        "the man page documents the exit codes"
    );
}

/// Contexts: `config set-context` and `use-context` write the config file; a command without
/// `--coordinator`, `--pki-dir` or `--admin` then connects with the current context, and
/// `--context` picks another for one command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_names_where_and_as_whom_to_connect() {
    let env = TestEnv::new();
    env.issue(Identity::Admin("ops".into()));
    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    let config = env.path("ferry-config.toml");
    let ctl = |args: &[&str]| {
        Command::new(ferryctl_bin())
            .env("FERRY_CONFIG", &config)
            .env_remove("FERRY_COORDINATOR")
            .env_remove("FERRY_PKI_DIR")
            .env_remove("FERRY_ADMIN")
            .env_remove("FERRY_CONTEXT")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let pki = env.pki().display().to_string();
    let o = ctl(&[
        "config",
        "set-context",
        "lab",
        "--coordinator",
        &coord,
        "--pki-dir",
        &pki,
        "--admin",
        "ops",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let dead = DeadAddr::new().unwrap();
    let o = ctl(&[
        "config",
        "set-context",
        "gone",
        "--coordinator",
        &dead.addr.to_string(),
        "--pki-dir",
        &pki,
        "--admin",
        "ops",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // No current context yet: the default address, where nothing listens for this test.
    let o = ctl(&["config", "use-context", "nope"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no context \"nope\" (known: gone, lab)"),
        "{}",
        stderr(&o)
    );
    let o = ctl(&["config", "use-context", "lab"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = ctl(&["agents", "list"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = ctl(&["--context", "gone", "agents", "list"]);
    assert_eq!(code(&o), 3, "--context picks the other one: {}", stderr(&o));
    let o = ctl(&["config", "get-contexts"]);
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("*") && l.contains("lab")),
        "{text}"
    );
    assert!(std::fs::read_to_string(&config)
        .unwrap()
        .contains("current = \"lab\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exclude_file_leaves_out_what_gitignore_would() {
    let env = TestEnv::new();
    env.issue(Identity::Admin("admin".into()));
    let src = env.path("src");
    for (path, body) in [
        ("model/weights.bin", "w"),
        ("model/run.tmp", "t"),
        ("build/out.o", "o"),
        ("src/build/gen.rs", "g"),
        ("notes/build", "a file named build"),
        ("logs/app.log", "l"),
        ("logs/keep.log", "k"),
        ("logs/old/app.log", "deep"),
        ("top.log", "anchored"),
        ("sub/top.log", "not anchored here"),
    ] {
        let p = src.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    let rules = env.path("exclude.txt");
    std::fs::write(
        &rules,
        "# what a build leaves\nbuild/\n*.tmp\n\n/top.log\nlogs/*.log\n!logs/keep.log\n",
    )
    .unwrap();
    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    let target = env.agent("target", &coord, Some(env.path("dst"))).await;
    let source = env.agent("source", &coord, None).await;
    let ctl = env.ctl(&coord).await;
    let source_arg = format!("source:{}", src.display());
    let rules_arg = rules.display().to_string();
    let create = [
        "migration",
        "create",
        "--name",
        "filtered",
        "--source",
        &source_arg,
        "--target",
        "target:copy",
        "--exclude-from",
        &rules_arg,
    ];
    // A dry run says what the copy below will move, and creates nothing.
    let mut dry = create.to_vec();
    dry.extend(["--dry-run", "-o", "json"]);
    let out = run(&env, &coord, "admin", &dry);
    assert!(out.status.success(), "{}", stderr(&out));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["would_copy"]["files"], 5, "{plan}");
    assert_eq!(plan["excluded"], 5, "{plan}");
    assert_eq!(plan["would_delete"], 0);
    assert!(
        ctl.migrations().await.unwrap().is_empty(),
        "a dry run creates nothing"
    );
    // A dry run is checked as a create is: an unknown agent is refused (exit 5).
    let mut unknown = dry.clone();
    unknown[7] = "nobody:copy";
    assert_eq!(code(&run(&env, &coord, "admin", &unknown)), 5);

    let out = run(&env, &coord, "admin", &create);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = ctl.resolve("filtered").await.unwrap();
    let p = ctl
        .watch(id, Duration::from_secs(60), |_, _| {})
        .await
        .unwrap();
    assert_eq!(
        p.phase(),
        ferry_proto::admin::Phase::Done,
        "{}",
        p.last_error
    );
    let mut copied: Vec<String> = Vec::new();
    let root = env.path("dst/copy");
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                copied.push(p.strip_prefix(&root).unwrap().display().to_string());
            }
        }
    }
    copied.sort();
    assert_eq!(
        copied,
        [
            "logs/keep.log",
            "logs/old/app.log",
            "model/weights.bin",
            "notes/build",
            "sub/top.log"
        ]
    );
    // Two directories named build, run.tmp, app.log and top.log.
    assert_eq!(p.excluded, 5);
    // A file over the bounds (the rules travel with the spec) is refused before anything is
    // sent.
    std::fs::write(&rules, "x\n".repeat(2000)).unwrap();
    let bad = run(
        &env,
        &coord,
        "admin",
        &[
            "migration",
            "create",
            "--source",
            &format!("source:{}", src.display()),
            "--target",
            "target:bad",
            "--exclude-from",
            &rules.display().to_string(),
        ],
    );
    assert_eq!(code(&bad), 1, "{}", stderr(&bad));
    assert!(stderr(&bad).contains("at most 1024"), "{}", stderr(&bad));
    source.shutdown().await;
    target.shutdown().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_runs_of_a_sync_round_and_a_cutover_say_what_they_would_do() {
    let env = TestEnv::new();
    env.issue(Identity::Admin("admin".into()));
    let src = env.path("src");
    for (path, body) in [
        ("a/one.txt", "1"),
        ("a/two.txt", "2"),
        ("b/old/x.txt", "x"),
        ("b/old/y.txt", "y"),
        ("keep.txt", "k"),
    ] {
        let p = src.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    let target = env.agent("target", &coord, Some(env.path("dst"))).await;
    let source = env.agent("source", &coord, None).await;
    let ctl = env.ctl(&coord).await;
    let id = ctl
        .create_named("live", crate::harness::migration_spec(&src, "copy"))
        .await
        .unwrap();
    let p = ctl
        .watch(id, Duration::from_secs(60), |_, _| {})
        .await
        .unwrap();
    assert_eq!(p.phase(), ferry_proto::admin::Phase::Done);

    // The source changes: one file rewritten (another size), one new, one directory gone.
    std::fs::write(src.join("a/one.txt"), "one, longer now").unwrap();
    std::fs::write(src.join("a/three.txt"), "3").unwrap();
    std::fs::remove_dir_all(src.join("b/old")).unwrap();

    let out = run(
        &env,
        &coord,
        "admin",
        &["migration", "sync", "live", "--dry-run", "-o", "json"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let preview = &v["preview"];
    assert_eq!(preview["round"], 1, "{v}");
    assert_eq!(preview["send_files"], 2, "{v}");
    assert_eq!(preview["send_bytes"], 16, "{v}");
    assert_eq!(
        preview["deleted"], 3,
        "the directory and its two files: {v}"
    );
    assert_eq!(preview["deleted_examples"], serde_json::json!(["b/old"]));
    // The preview is kept as a job, shown as the dry run shows it.
    let job = v["job"].as_u64().unwrap().to_string();
    let kept = run(&env, &coord, "admin", &["jobs", &job]);
    let kept = String::from_utf8_lossy(&kept.stdout).to_string();
    assert!(
        kept.contains("Sync preview") && kept.contains("would delete 3 names"),
        "{kept}"
    );
    // `a` changed too: its mtime moved when a file was added.
    assert!(
        preview["send_examples"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "a/three.txt"),
        "{v}"
    );
    assert_eq!(
        ctl.status(id).await.unwrap().rounds.len(),
        1,
        "no round was started"
    );
    let shown = run(
        &env,
        &coord,
        "admin",
        &["migration", "sync", "live", "--dry-run"],
    );
    assert!(String::from_utf8_lossy(&shown.stdout).contains("would delete 3 names"));

    // A cutover's dry run: it could start (attempt 1), its final round is that preview, and
    // nothing started.
    let out = run(
        &env,
        &coord,
        "admin",
        &["migration", "cutover", "live", "--dry-run", "-o", "json"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(c["attempt"], 1, "{c}");
    assert_eq!(c["final_round"]["send_files"], 2, "{c}");
    assert_eq!(
        c["final_round"]["pre_freeze"], false,
        "no hook configured: {c}"
    );
    let shown = run(
        &env,
        &coord,
        "admin",
        &["migration", "cutover", "live", "--dry-run"],
    );
    let text = String::from_utf8_lossy(&shown.stdout).to_string();
    assert!(
        text.contains("pre_freeze hook (none configured)") && text.contains("delete 3"),
        "{text}"
    );
    assert!(
        ctl.status(id).await.unwrap().cutover.is_none(),
        "no cutover was started"
    );

    // The round itself does what the preview said.
    let round = ctl.sync(id).await.unwrap();
    let p = ctl
        .watch(id, Duration::from_secs(60), |_, _| {})
        .await
        .unwrap();
    let r = p.rounds.iter().find(|r| r.number == round).unwrap();
    assert_eq!((r.files, r.bytes, r.deleted), (2, 16, 3), "{r:?}");
    source.shutdown().await;
    target.shutdown().await;
    node.shutdown().await;
}
