//! Cutovers through the whole system: a live writer changes the source during the bulk copy
//! and a sync round, the source agent's `pre_freeze` hook stops it, the final round and the
//! full verification run over real QUIC and the agents' real trees, and the target agent's
//! `switch` hook runs — or the source agent's `rollback` hook when anything fails. Hooks count
//! their runs in a file, so "exactly once" is checked, not assumed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_agent::cutover::Hooks;
use ferry_proto::admin::{CutoverPhase, MigrationProgress, Phase};

use crate::harness::{assert_same_tree, finished, make_files, migration_spec, TestEnv};

const LIMIT: Duration = Duration::from_secs(120);

/// A writer that keeps changing the tree under `src` — rewriting, appending, truncating,
/// creating, renaming and deleting files — until `stop` appears (then it writes `stopped`
/// and ends), or until the flag is set.
struct Writer {
    done: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(src: &Path, stop: PathBuf, every: Duration) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let (src, d, w) = (src.to_path_buf(), done.clone(), writes.clone());
        let thread = std::thread::spawn(move || {
            let live = src.join("live");
            std::fs::create_dir_all(&live).unwrap();
            let mut i = 0u64;
            while !d.load(Ordering::Relaxed) {
                if stop.exists() {
                    std::fs::write(stop.with_extension("stopped"), b"").unwrap();
                    break;
                }
                let n = i % 7;
                let f = live.join(format!("f{n}"));
                let _ = match i % 5 {
                    0 => std::fs::write(&f, format!("version {i}").repeat(1 + (i % 13) as usize)),
                    1 => std::fs::OpenOptions::new()
                        .append(true)
                        .create(true)
                        .open(&f)
                        .and_then(|mut h| std::io::Write::write_all(&mut h, b" appended")),
                    2 => std::fs::File::options()
                        .write(true)
                        .open(&f)
                        .and_then(|h| h.set_len(3)),
                    3 => std::fs::rename(&f, live.join(format!("moved{}", i % 3))),
                    _ => std::fs::remove_file(live.join(format!("moved{}", i % 3))),
                };
                w.fetch_add(1, Ordering::Relaxed);
                i += 1;
                std::thread::sleep(every);
            }
        });
        Writer {
            done,
            writes,
            thread: Some(thread),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Hooks that append their name to `log` (and do `extra` first).
fn counting(log: &Path, pre_freeze_extra: &str, switch_exit: i32) -> (Hooks, Hooks) {
    let log = log.display();
    let source = Hooks {
        pre_freeze: Some(format!(
            "{pre_freeze_extra} echo pre_freeze $FERRY_CUTOVER_ATTEMPT >> {log}"
        )),
        rollback: Some(format!(
            "echo rollback $FERRY_CUTOVER_ATTEMPT >> {log}; echo source live again"
        )),
        ..Hooks::default()
    };
    let target = Hooks {
        switch: Some(format!(
            "echo switch $FERRY_CUTOVER_ATTEMPT >> {log}; echo 'app started'; exit {switch_exit}"
        )),
        ..Hooks::default()
    };
    (source, target)
}

struct Rig {
    env: TestEnv,
    _node: ferry_coordinator::node::RunningNode,
    ctl: ferryctl::ctl::Ctl,
    src: PathBuf,
    root: PathBuf,
    log: PathBuf,
    _agents: Vec<ferry_agent::run::RunningAgent>,
}

async fn rig(pre_freeze_extra: impl Fn(&Path) -> String, switch_exit: i32) -> Rig {
    rig_with(pre_freeze_extra, switch_exit, false).await
}

/// With `source_receives`, the source agent can also be a target: its root is the directory
/// that holds the source tree (a fallback sends the copy back there).
async fn rig_with(
    pre_freeze_extra: impl Fn(&Path) -> String,
    switch_exit: i32,
    source_receives: bool,
) -> Rig {
    let env = TestEnv::new();
    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    let src = env.path("site/src");
    make_files(&src, 60, 4096);
    let root = env.path("dst");
    let log = env.path("hooks.log");
    let (source_hooks, target_hooks) =
        counting(&log, &pre_freeze_extra(&env.path("")), switch_exit);
    let mut t = env.agent_config("target", &coord, Some(root.clone()));
    t.hooks = target_hooks;
    let mut s = env.agent_config("source", &coord, source_receives.then(|| env.path("site")));
    s.hooks = source_hooks;
    let agents = vec![
        ferry_agent::run::start(t).await.unwrap(),
        ferry_agent::run::start(s).await.unwrap(),
    ];
    let ctl = env.ctl(&coord).await;
    Rig {
        env,
        _node: node,
        ctl,
        src,
        root,
        log,
        _agents: agents,
    }
}

fn hook_runs(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn cutover(p: &MigrationProgress) -> &ferry_proto::admin::CutoverInfo {
    p.cutover.as_ref().expect("a cutover")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_source_is_synced_frozen_verified_and_switched_each_hook_once() {
    // pre_freeze stops the writer and waits until it has.
    let r = rig(
        |dir| {
            let stop = dir.join("stop");
            format!(
                "touch {s}; while [ ! -e {s}.stopped ]; do sleep 0.02; done;",
                s = stop.display()
            )
        },
        0,
    )
    .await;
    let writer = Writer::start(&r.src, r.env.path("stop"), Duration::from_millis(5));
    let id = r.ctl.create(migration_spec(&r.src, "")).await.unwrap();
    let p = r.ctl.watch(id, LIMIT, |_, _| {}).await.unwrap();
    assert_eq!(p.phase(), Phase::Done, "{p:?}");
    // A sync round while the writer goes on.
    r.ctl.sync(id).await.unwrap();
    let p = r.ctl.watch(id, LIMIT, |_, _| {}).await.unwrap();
    assert_eq!(p.phase(), Phase::Done, "{p:?}");
    assert!(writer.writes.load(Ordering::Relaxed) > 0);

    assert_eq!(r.ctl.cutover(id, false).await.unwrap(), 1);
    let p = r.ctl.watch_cutover(id, LIMIT, |_| {}).await.unwrap();
    let c = cutover(&p);
    assert_eq!(c.phase(), CutoverPhase::Done, "{c:#?}");
    assert!(
        r.env.path("stop.stopped").exists(),
        "the writer was stopped by the hook"
    );
    drop(writer);
    // The target equals the source as it was frozen (the writer stopped before the final
    // round), checked independently of ferry's own verification.
    assert_same_tree(&r.src, &r.root);
    assert_eq!(hook_runs(&r.log), vec!["pre_freeze 1", "switch 1"]);
    let steps: Vec<&str> = c.runs.iter().map(|s| s.step.as_str()).collect();
    assert_eq!(steps.len(), 4);
    assert_eq!((steps[0], steps[3]), ("pre_freeze", "switch"), "{steps:?}");
    let source_tree = c.runs.iter().find(|s| s.step == "verify_source").unwrap();
    let target_tree = c.runs.iter().find(|s| s.step == "verify_target").unwrap();
    assert_eq!(
        source_tree.tree.as_ref().unwrap().digest,
        target_tree.tree.as_ref().unwrap().digest
    );
    assert!(source_tree.tree.as_ref().unwrap().files >= 60);
    assert!(c.freeze_window_ms > 0 && c.frozen_ms > 0 && c.switched_ms >= c.frozen_ms);
    assert_eq!(c.freeze_window_ms, c.switched_ms - c.frozen_ms);
    assert_eq!(p.round, c.final_round);
    // Cut over: no more rounds, no second cutover.
    assert!(r.ctl.sync(id).await.is_err());
    assert!(r.ctl.cutover(id, false).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_switch_hook_rolls_back_and_the_report_says_why() {
    let r = rig(|_| String::new(), 7).await;
    let id = r.ctl.create(migration_spec(&r.src, "")).await.unwrap();
    finished(&r.ctl, id, LIMIT, &String::new).await;
    r.ctl.cutover(id, false).await.unwrap();
    let p = r.ctl.watch_cutover(id, LIMIT, |_| {}).await.unwrap();
    let c = cutover(&p);
    assert_eq!(c.phase(), CutoverPhase::Aborted, "{c:#?}");
    assert!(c.error.contains("switch on target exited 7"), "{}", c.error);
    assert!(
        c.error.contains("app started"),
        "the hook's output: {}",
        c.error
    );
    assert_eq!(
        hook_runs(&r.log),
        vec!["pre_freeze 1", "switch 1", "rollback 1"]
    );
    let rollback = c.runs.iter().find(|s| s.step == "rollback").unwrap();
    assert_eq!(rollback.exit_code, 0);
    assert!(rollback.output.contains("source live again"));
    // The source is writable and a new attempt may follow after a sync.
    std::fs::write(r.src.join("after-rollback"), b"written").unwrap();
    r.ctl.sync(id).await.unwrap();
    finished(&r.ctl, id, LIMIT, &String::new).await;
    assert_eq!(r.ctl.cutover(id, false).await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_written_after_the_freeze_refuses_the_switch_and_rolls_back() {
    // pre_freeze succeeds but stops nothing.
    let r = rig(|_| String::new(), 0).await;
    let id = r.ctl.create(migration_spec(&r.src, "")).await.unwrap();
    finished(&r.ctl, id, LIMIT, &String::new).await;
    let writer = Writer::start(&r.src, r.env.path("never"), Duration::from_millis(2));
    r.ctl.cutover(id, false).await.unwrap();
    let p = r.ctl.watch_cutover(id, LIMIT, |_| {}).await.unwrap();
    drop(writer);
    let c = cutover(&p);
    assert_eq!(c.phase(), CutoverPhase::Aborted, "{c:#?}");
    assert!(c.error.contains("after the freeze"), "{}", c.error);
    assert!(
        c.runs.iter().all(|s| s.step != "switch"),
        "the switch never ran: {:?}",
        c.runs
    );
    assert_eq!(hook_runs(&r.log), vec!["pre_freeze 1", "rollback 1"]);
}

/// The coordinator leader dies (SIGKILL) while both agents read their trees for the full
/// verification: a new leader takes the agents' reports, and the cutover switches, each hook
/// having run once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_killed_during_the_verification_the_cutover_still_switches_each_hook_once() {
    let env = TestEnv::new();
    let (mut nodes, addrs, ctl) = crate::cluster::form(&env, 3).await;
    let all = addrs.join(",");
    let src = env.path("src");
    make_files(&src, 40, 4096);
    // Enough bytes that reading both trees takes a while to catch.
    let mut big = vec![0u8; 384 << 20];
    blake3::Hasher::new_derive_key("ferry cutover test")
        .finalize_xof()
        .fill(&mut big);
    std::fs::write(src.join("model.bin"), &big).unwrap();
    drop(big);
    let root = env.path("dst");
    let log = env.path("hooks.log");
    let (source_hooks, target_hooks) = counting(&log, "", 0);
    let mut t = env.agent_config("target", &all, Some(root.clone()));
    t.hooks = target_hooks;
    let mut s = env.agent_config("source", &all, None);
    s.hooks = source_hooks;
    let _target = ferry_agent::run::start(t).await.unwrap();
    let _source = ferry_agent::run::start(s).await.unwrap();
    let id = ctl.create(migration_spec(&src, "")).await.unwrap();
    finished(&ctl, id, LIMIT, &String::new).await;

    ctl.cutover(id, false).await.unwrap();
    let mut seen = CutoverPhase::Freezing;
    for _ in 0..12_000 {
        let p = ctl.status(id).await.unwrap();
        seen = cutover(&p).phase();
        if !matches!(seen, CutoverPhase::Freezing | CutoverPhase::FinalSync) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(seen, CutoverPhase::Verifying, "caught it verifying");
    let leader_id = ctl.cluster_status().await.unwrap().leader_id;
    nodes[leader_id as usize - 1].kill9();

    let others: Vec<String> = addrs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i as u64 + 1 != leader_id)
        .map(|(_, a)| a.clone())
        .collect();
    let (ctl, new_leader) = crate::cluster::leader(&env, &others, Some(leader_id)).await;
    assert_ne!(new_leader, leader_id);
    let p = ctl.watch_cutover(id, LIMIT, |_| {}).await.unwrap();
    let c = cutover(&p);
    assert_eq!(c.phase(), CutoverPhase::Done, "{c:#?}");
    assert_same_tree(&src, &root);
    assert_eq!(hook_runs(&log), vec!["pre_freeze 1", "switch 1"]);
    assert_eq!(c.runs.len(), 4, "each step recorded once: {:?}", c.runs);
}

/// The target agent's process is killed (SIGKILL) in the middle of the final round, and
/// started again: the round resumes, the cutover verifies and switches, each hook once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_killed_during_the_final_round_the_cutover_still_switches_each_hook_once() {
    let env = TestEnv::new();
    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    let src = env.path("src");
    make_files(&src, 40, 4096);
    let mut data = vec![0u8; 24 << 20];
    blake3::Hasher::new_derive_key("ferry final round")
        .finalize_xof()
        .fill(&mut data);
    std::fs::write(src.join("state.db"), &data).unwrap();
    let root = env.path("dst");
    let log = env.path("hooks.log");
    let (source_hooks, _) = counting(&log, "", 0);
    let target_hooks = format!(
        "[hooks]\nswitch = \"echo switch $FERRY_CUTOVER_ATTEMPT >> {}\"\n",
        log.display()
    );
    let spawn_target =
        || crate::processes::spawn_agent_with(&env, "target", &coord, Some(&root), &target_hooks);
    let mut target = spawn_target();
    let mut s = env.agent_config("source", &coord, None);
    s.hooks = source_hooks;
    let _source = ferry_agent::run::start(s).await.unwrap();
    let ctl = env.ctl(&coord).await;
    // The target is a process: a migration naming it before it registered is refused.
    crate::processes::wait_registered(&ctl, "target", true).await;
    let id = ctl
        .create_named("db", migration_spec(&src, ""))
        .await
        .unwrap();
    finished(&ctl, id, LIMIT, &String::new).await;

    // The database is rewritten whole before the freeze, and the final round is slowed down
    // so that it is still sending when the target dies.
    for b in data.iter_mut() {
        *b = b.wrapping_add(1);
    }
    std::fs::write(src.join("state.db"), &data).unwrap();
    ctl.set_throttle("db", "", "16mbit").await.unwrap();
    ctl.cutover(id, false).await.unwrap();
    crate::harness::wait_for("the final round to send", LIMIT, || async {
        let p = ctl.status(id).await.ok()?;
        let c = p.cutover.as_ref()?;
        let sending = c.phase() == CutoverPhase::FinalSync
            && p.round == c.final_round
            && p.scan_complete
            && p.segments_leased > 0;
        sending.then_some(())
    })
    .await;
    target.kill().unwrap();
    let _ = target.wait();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let p = ctl.status(id).await.unwrap();
    assert_eq!(
        cutover(&p).phase(),
        CutoverPhase::FinalSync,
        "killed in the final round"
    );
    let mut target = spawn_target();
    ctl.set_throttle("db", "", "off").await.unwrap();
    let p = ctl.watch_cutover(id, LIMIT, |_| {}).await.unwrap();
    let c = cutover(&p);
    assert_eq!(c.phase(), CutoverPhase::Done, "{c:#?}");
    assert_same_tree(&src, &root);
    assert_eq!(hook_runs(&log), vec!["pre_freeze 1", "switch 1"]);
    let _ = target.kill();
    let _ = target.wait();
}

/// Runs a full verification of migration `id` to its end.
async fn verify_full(
    ctl: &ferryctl::ctl::Ctl,
    id: u64,
) -> ferry_proto::admin::FullVerificationInfo {
    let (n, _) = ctl.verify_full(id).await.unwrap();
    ctl.watch_verification(id, n, LIMIT).await.unwrap()
}

fn tree_of<'a>(
    v: &'a ferry_proto::admin::FullVerificationInfo,
    side: &str,
) -> &'a ferry_proto::admin::TreeDigestInfo {
    let run = if side == "source" {
        &v.source
    } else {
        &v.target
    };
    run.as_ref()
        .and_then(|r| r.tree.as_ref())
        .expect("a pass with its tree")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_verification_finds_a_damaged_target_and_leaves_the_freeze_only_the_changes_to_read()
{
    let r = rig(|_| String::new(), 0).await;
    let id = r.ctl.create(migration_spec(&r.src, "")).await.unwrap();
    finished(&r.ctl, id, LIMIT, &String::new).await;
    // An agent caches the hash of a file it read only when the file's ctime is at least a
    // second older than the read (a write in the same clock tick could hide behind it): the
    // copy's files must be that old for the next pass to take their hashes. This is that rule,
    // not a wait for something to happen.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let v = verify_full(&r.ctl, id).await;
    assert_eq!((v.number, v.round), (1, 0));
    assert!(v.equal, "{v:#?}");
    let files = tree_of(&v, "source").files;
    assert_eq!(files, 60);
    assert_eq!(tree_of(&v, "source").digest, tree_of(&v, "target").digest);
    assert_eq!(
        tree_of(&v, "source").files_read,
        files,
        "the first pass reads all"
    );
    assert_eq!(tree_of(&v, "target").files_read, files);

    // A damaged copy: same size and mtime, other bytes — only ferry's reading it back shows it.
    let victim = r.root.join("d03/f00020.bin");
    let good = std::fs::read(&victim).unwrap();
    let mtime =
        filetime::FileTime::from_last_modification_time(&std::fs::metadata(&victim).unwrap());
    let mut bad = good.clone();
    bad[100] ^= 0xff;
    std::fs::write(&victim, &bad).unwrap();
    filetime::set_file_mtime(&victim, mtime).unwrap();
    let v = verify_full(&r.ctl, id).await;
    assert!(!v.equal);
    assert!(
        v.error.contains("target differs from the source")
            && v.error
                .ends_with("differ: regular files; equal: directories, symlinks, hardlinks"),
        "the difference is placed: {}",
        v.error
    );
    assert_eq!(
        tree_of(&v, "source").files_read,
        0,
        "nothing changed at the source"
    );
    assert_eq!(
        tree_of(&v, "target").files_read,
        1,
        "only the damaged file is read again"
    );
    std::fs::write(&victim, &good).unwrap();
    filetime::set_file_mtime(&victim, mtime).unwrap();
    // Settled before it is read, as above, so the cutover need not read it again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let v = verify_full(&r.ctl, id).await;
    assert!(v.equal, "{v:#?}");

    // One source file changes; the cutover's final round sends it, and its full verification
    // reads only that file at each end (the rest were read before the freeze).
    std::fs::write(r.src.join("d05/f00022.bin"), b"changed before the cutover").unwrap();
    r.ctl.cutover(id, false).await.unwrap();
    let p = r.ctl.watch_cutover(id, LIMIT, |_| {}).await.unwrap();
    let c = cutover(&p);
    assert_eq!(c.phase(), CutoverPhase::Done, "{c:#?}");
    for step in ["verify_source", "verify_target"] {
        let t = c
            .runs
            .iter()
            .find(|s| s.step == step)
            .unwrap()
            .tree
            .clone()
            .unwrap();
        assert_eq!((t.files, t.files_read), (60, 1), "{step}: {t:?}");
        assert_eq!(t.bytes_read, 26, "{step}");
    }
    assert_same_tree(&r.src, &r.root);
    // Cut over: the target is live, and a verification against the source is refused.
    let refused = r.ctl.verify_full(id).await.unwrap_err().to_string();
    assert!(refused.contains("cut over"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_rounds_and_an_auto_cutover_threshold_cut_over_with_no_operator() {
    let r = rig(|_| String::new(), 0).await;
    let spec = ferry_proto::admin::MigrationSpec {
        sync_every_secs: 1,
        auto_cutover_below_ms: 60_000,
        ..migration_spec(&r.src, "")
    };
    let id = r.ctl.create(spec).await.unwrap();
    // Round 0, then a periodic round 1 a second later; it finds nothing to send, so it ends
    // well under the threshold and the cutover starts by itself.
    let p = r.ctl.watch_cutover(id, LIMIT, |_| {}).await.unwrap();
    let c = cutover(&p);
    assert_eq!(c.phase(), CutoverPhase::Done, "{c:#?}");
    assert!(c.trigger.contains("round 1 took"), "{}", c.trigger);
    assert_eq!(c.final_round, 2);
    assert_eq!(hook_runs(&r.log), vec!["pre_freeze 1", "switch 1"]);
    assert_same_tree(&r.src, &r.root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_syncs_the_old_source_from_the_switched_target_and_a_reverse_cutover_brings_it_back(
) {
    let r = rig_with(|_| String::new(), 0, true).await;
    let id = r.ctl.create(migration_spec(&r.src, "")).await.unwrap();
    finished(&r.ctl, id, LIMIT, &String::new).await;
    r.ctl.cutover(id, false).await.unwrap();
    let p = r.ctl.watch_cutover(id, LIMIT, |_| {}).await.unwrap();
    assert_eq!(cutover(&p).phase(), CutoverPhase::Done);

    // The application now runs on the target and changes it.
    std::fs::write(
        r.root.join("d01/f00001.bin"),
        b"written by the app after the switch",
    )
    .unwrap();
    std::fs::write(r.root.join("new.txt"), b"new").unwrap();
    std::fs::remove_file(r.root.join("d02/f00002.bin")).unwrap();

    let (rid, name) = r.ctl.fallback(id).await.unwrap();
    assert!(name.ends_with("-fallback"), "{name}");
    let p = r.ctl.watch(rid, LIMIT, |_, _| {}).await.unwrap();
    assert_eq!(p.phase(), Phase::Done, "{p:#?}");
    assert_eq!(p.fallback_of, id);
    // Round 0 sent what changed since the switch, not the tree (60 files of 4 KiB).
    let round0 = &p.rounds[0];
    assert_eq!(round0.deleted, 1, "{round0:?}");
    assert!(round0.bytes < 100, "{round0:?}");
    assert_same_tree(&r.root, &r.src);
    assert_eq!(r.ctl.status(id).await.unwrap().fallback, rid);

    // More changes at the new site, then the cutover in reverse: the old site is live again.
    std::fs::write(r.root.join("later.txt"), b"later").unwrap();
    r.ctl.cutover(rid, false).await.unwrap();
    let p = r.ctl.watch_cutover(rid, LIMIT, |_| {}).await.unwrap();
    let c = cutover(&p);
    assert_eq!(c.phase(), CutoverPhase::Done, "{c:#?}");
    assert_same_tree(&r.root, &r.src);
    assert!(r.src.join("later.txt").exists());
    let refused = r.ctl.finalize(id).await.unwrap_err().to_string();
    assert!(
        refused.contains("switched back to the old site"),
        "{refused}"
    );
}
