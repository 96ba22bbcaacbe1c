//! Sync rounds through the whole system: after the bulk copy, `ferryctl migration sync` has the
//! source rescan and send only what changed — new, modified, renamed, re-typed and deleted
//! names — over real QUIC to a real target, and the target ends equal to the source (checked
//! by the independent tree comparison, which also finds anything extra in the copy).

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use ferry_proto::admin::{MigrationProgress, Phase};

use crate::harness::{assert_same_tree, finished, make_files, migration_spec, wait_for, TestEnv};

const FINISH: Duration = Duration::from_secs(120);

/// A coordinator, a target agent writing to `root` and a source agent, in this process.
struct Rig {
    env: TestEnv,
    node: ferry_coordinator::node::RunningNode,
    src: std::path::PathBuf,
    root: std::path::PathBuf,
    source: ferry_agent::run::RunningAgent,
    target: ferry_agent::run::RunningAgent,
    ctl: ferryctl::ctl::Ctl,
}

async fn rig() -> Rig {
    let env = TestEnv::new();
    let node = env.coordinator().await;
    let coord = node.addr.to_string();
    let (src, root) = (env.path("src"), env.path("dst"));
    let target = env.agent("target", &coord, Some(root.clone())).await;
    let source = env.agent("source", &coord, None).await;
    let ctl = env.ctl(&coord).await;
    Rig {
        env,
        node,
        src,
        root,
        source,
        target,
        ctl,
    }
}

fn round(p: &MigrationProgress, n: u32) -> &ferry_proto::admin::RoundInfo {
    p.rounds
        .iter()
        .find(|r| r.number == n)
        .unwrap_or_else(|| panic!("no round {n} in {:?}", p.rounds))
}

fn write(path: &std::path::Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

/// Writes `size` bytes drawn from `key` at `path`.
fn random_file(path: &std::path::Path, size: u64, key: &str) {
    let mut data = vec![0u8; size as usize];
    blake3::Hasher::new_derive_key(key)
        .finalize_xof()
        .fill(&mut data);
    write(path, &data);
}

/// Overwrites the file at `path` with `bytes` at `offset`, in place.
fn patch(path: &std::path::Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, bytes, offset).unwrap();
}

impl Rig {
    /// Bytes the source agent has sent so far.
    fn sent(&self) -> u64 {
        self.source
            .stats
            .bytes_sent
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_rounds_send_only_what_changed_and_delete_what_went() {
    let Rig {
        src,
        root,
        source: _source,
        ctl,
        env: _env,
        node: _node,
        target: _target,
    } = rig().await;
    make_files(&src, 120, 4096);
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 17).map(|i| (i % 251) as u8).collect();
    write(&src.join("big.bin"), &big);
    write(&src.join("tree/sub/a"), b"a");
    write(&src.join("tree/sub/b"), b"b");
    write(&src.join("becomes-dir"), b"a file, for now");
    write(&src.join("same-size"), b"version 1");
    write(&src.join("grows"), b"short");
    write(&src.join("shrinks"), b"a long line of text");
    write(&src.join("moves"), b"moving");
    std::os::unix::fs::symlink("grows", src.join("link")).unwrap();
    std::fs::hard_link(src.join("moves"), src.join("moves-too")).unwrap();
    let spec = ferry_proto::admin::MigrationSpec {
        segment_size: 1024 * 1024,
        ..migration_spec(&src, "")
    };
    let id = ctl.create(spec).await.unwrap();
    let bulk = finished(&ctl, id, FINISH, &String::new).await;
    assert_same_tree(&src, &root);
    assert_eq!(bulk.progress.round, 0);

    // Between rounds the source lives on.
    let same_size = src.join("same-size");
    let mtime =
        filetime::FileTime::from_last_modification_time(&std::fs::metadata(&same_size).unwrap());
    std::fs::write(&same_size, b"version 2").unwrap();
    // Its mtime set back: only the ctime tells.
    filetime::set_file_mtime(&same_size, mtime).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(src.join("grows"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b" and longer"))
        .unwrap();
    std::fs::write(src.join("shrinks"), b"short").unwrap();
    std::fs::rename(src.join("moves"), src.join("moved")).unwrap();
    std::fs::remove_dir_all(src.join("tree")).unwrap();
    std::fs::remove_file(src.join("becomes-dir")).unwrap();
    write(&src.join("becomes-dir/inside"), b"now a directory");
    write(&src.join("d03/new-file"), b"new");
    std::fs::set_permissions(src.join("d05"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::remove_file(src.join("link")).unwrap();
    std::os::unix::fs::symlink("shrinks", src.join("link")).unwrap();
    // One block of the big file rewritten in place.
    patch(&src.join("big.bin"), 2 * 1024 * 1024 + 5, b"changed");

    let r = ctl.sync(id).await.unwrap();
    assert_eq!(r, 1);
    let one = finished(&ctl, id, FINISH, &String::new).await;
    assert_same_tree(&src, &root);
    let r1 = round(&one.progress, 1);
    assert_eq!(r1.outcome(), Phase::Done);
    assert_eq!(
        r1.deleted, 5,
        "tree, tree/sub, its two files, and the old name of the moved file; {r1:?}"
    );
    // Sent again: the changed files, the moved name, the new ones, the link, the hardlinks of
    // the moved file, and the directories whose contents changed — not the 120 others.
    assert!(r1.files < 20, "round 1 sent {} files: {r1:?}", r1.files);
    assert!(
        r1.bytes < big.len() as u64 + 64 * 1024,
        "round 1 sent {} bytes",
        r1.bytes
    );

    // Nothing changed: the round finds nothing to send.
    assert_eq!(ctl.sync(id).await.unwrap(), 2);
    let two = finished(&ctl, id, FINISH, &String::new).await;
    let r2 = round(&two.progress, 2);
    assert_eq!((r2.files, r2.bytes, r2.deleted, r2.segments), (0, 0, 0, 0));
    assert_same_tree(&src, &root);
}

/// Before sync rounds, a piece of a split file rewritten during the bulk copy failed every
/// retry ("changed since it was scanned") until the migration was given up on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_file_rewritten_during_the_copy_is_sent_again_in_the_next_round() {
    let Rig {
        src,
        root,
        source: _source,
        ctl,
        env: _env,
        node: _node,
        target: _target,
    } = rig().await;
    let data = vec![1u8; 8 * 1024 * 1024];
    write(&src.join("big.bin"), &data);
    let spec = ferry_proto::admin::MigrationSpec {
        segment_size: 1024 * 1024,
        ..migration_spec(&src, "")
    };
    // Slow enough that most pieces are still to be sent when the file changes.
    let id = ctl
        .create_throttled(
            "rewritten",
            spec,
            &ferryctl::ctl::new_idempotency_key(),
            "16mbit",
        )
        .await
        .unwrap();
    wait_for(
        "a first piece to be verified",
        Duration::from_secs(60),
        || async { (ctl.status(id).await.ok()?.segments_verified >= 1).then_some(()) },
    )
    .await;
    let rewritten = vec![2u8; 8 * 1024 * 1024];
    std::fs::write(src.join("big.bin"), &rewritten).unwrap();
    ctl.set_throttle("rewritten", "", "off").await.unwrap();
    let end = finished(&ctl, id, FINISH, &String::new).await;
    assert_same_tree(&src, &root);
    assert_eq!(std::fs::read(root.join("big.bin")).unwrap(), rewritten);
    let r0 = round(&end.progress, 0);
    assert!(
        r0.segments_stale > 0 && r0.outcome() == Phase::Syncing,
        "round 0 left the changed file to the next round: {r0:?}"
    );
    assert_eq!(end.progress.failed_attempts, 0, "no attempt was counted");
    assert!(end.progress.round >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_that_would_delete_more_than_the_cap_deletes_nothing() {
    let Rig {
        src,
        root,
        source: _source,
        ctl,
        env: _env,
        node: _node,
        target: _target,
    } = rig().await;
    make_files(&src, 20, 1024);
    let spec = ferry_proto::admin::MigrationSpec {
        max_delete: Some(3),
        ..migration_spec(&src, "")
    };
    let id = ctl.create(spec).await.unwrap();
    finished(&ctl, id, FINISH, &String::new).await;
    let before = crate::harness::describe_tree(&root).unwrap();
    std::fs::remove_dir_all(src.join("d01")).unwrap();
    std::fs::remove_dir_all(src.join("d02")).unwrap();
    ctl.sync(id).await.unwrap();
    let p = ctl.watch(id, FINISH, |_, _| {}).await.unwrap();
    assert_eq!(p.phase(), Phase::Failed);
    assert!(
        p.scan_issues.iter().any(|i| i
            .reason
            .contains("more than the migration's --max-delete 3")),
        "{:?}",
        p.scan_issues
    );
    assert_eq!(round(&p, 1).deleted, 0);
    let after = crate::harness::describe_tree(&root).unwrap();
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "nothing was deleted at the target"
    );
}

/// A file smaller than a segment (sent whole) but of several blocks changed in one place: the
/// next round sends the changed block only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_in_a_file_sent_whole_sends_only_the_changed_block() {
    let r = rig().await;
    let (src, root, ctl) = (&r.src, &r.root, &r.ctl);
    const MIB: u64 = 1 << 20;
    let size = 6 * MIB + 4321;
    random_file(&src.join("shard.bin"), size, "ferry whole delta test");
    let spec = ferry_proto::admin::MigrationSpec {
        segment_size: 64 * MIB,
        ..migration_spec(src, "")
    };
    let id = ctl.create(spec).await.unwrap();
    finished(ctl, id, FINISH, &String::new).await;
    assert_same_tree(src, root);
    patch(&src.join("shard.bin"), 3 * MIB + 5, b"changed");
    let before = r.sent();
    ctl.sync(id).await.unwrap();
    finished(ctl, id, FINISH, &String::new).await;
    assert_same_tree(src, root);
    let delta = r.sent() - before;
    assert_eq!(delta, MIB, "one block of a {size}-byte file");
    // The file in place is not the version a delta is against (someone changed the target's
    // copy): the delta is refused at once, no attempt counted, and the round after sends the
    // file whole.
    std::fs::write(root.join("shard.bin"), b"tampered").unwrap();
    patch(&src.join("shard.bin"), 5, b"again");
    let before = r.sent();
    let round = ctl.sync(id).await.unwrap();
    finished(ctl, id, FINISH, &String::new).await;
    assert_same_tree(src, root);
    let p = ctl.status(id).await.unwrap();
    assert_eq!(
        p.round,
        round + 1,
        "the stale delta's round, then the whole file's"
    );
    assert_eq!(p.failed_attempts, 0);
    // The refused delta's block may be cut off in the stream when the target refuses (0 to
    // 1 MiB of it counted); then the whole file.
    let resent = r.sent() - before;
    assert!(
        (size..=size + MIB).contains(&resent),
        "the whole file after the refused delta: {resent}"
    );
}

/// A large file changed in a few places: the next round sends the changed blocks only (hashes
/// recorded when the file was sent), and the target builds the new version on a copy of the
/// old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scattered_change_in_a_large_file_sends_only_the_changed_blocks() {
    let r = rig().await;
    let (src, root, ctl) = (&r.src, &r.root, &r.ctl);
    const MIB: u64 = 1 << 20;
    let size = 128 * MIB;
    let model = src.join("model.ckpt");
    random_file(&model, size, "ferry delta test");
    write(&src.join("small"), b"small file");
    let spec = ferry_proto::admin::MigrationSpec {
        segment_size: 8 * MIB,
        ..migration_spec(src, "")
    };
    let id = ctl.create(spec).await.unwrap();
    finished(ctl, id, FINISH, &String::new).await;
    assert_same_tree(src, root);

    // 1 % of the file: one block rewritten, one changed by a few bytes, in two pieces.
    patch(&model, 37 * MIB, &vec![7u8; MIB as usize]);
    patch(&model, 100 * MIB + 12_345, b"tweak");
    let before = r.sent();
    ctl.sync(id).await.unwrap();
    finished(ctl, id, FINISH, &String::new).await;
    assert_same_tree(src, root);
    let delta = r.sent() - before;
    assert!(
        delta <= size / 50,
        "round 1 sent {delta} bytes of a {size}-byte file with 2 changed blocks"
    );
    assert!(
        delta >= 2 * MIB,
        "the two changed blocks were sent: {delta}"
    );

    // It grows by 3 MiB and one more block changes: the new tail and that block.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&model)
        .unwrap();
    std::io::Write::write_all(&mut f, &vec![9u8; 3 * MIB as usize]).unwrap();
    drop(f);
    patch(&model, 5 * MIB, &[1, 2, 3]);
    let before = r.sent();
    ctl.sync(id).await.unwrap();
    finished(ctl, id, FINISH, &String::new).await;
    assert_same_tree(src, root);
    let delta = r.sent() - before;
    assert!(delta <= 5 * MIB, "round 2 sent {delta} bytes");
}

/// A migration created with a sync interval picks up changes by itself, with no `sync`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_rounds_pick_up_changes_without_being_asked() {
    let Rig {
        src,
        root,
        source: _source,
        ctl,
        env: _env,
        node: _node,
        target: _target,
    } = rig().await;
    make_files(&src, 10, 1024);
    let spec = ferry_proto::admin::MigrationSpec {
        sync_every_secs: 1,
        ..migration_spec(&src, "")
    };
    let id = ctl.create(spec).await.unwrap();
    finished(&ctl, id, FINISH, &String::new).await;
    write(&src.join("later/news"), b"written after the bulk copy");
    crate::harness::wait_for("a periodic round to copy the new file", FINISH, || async {
        let p = ctl.status(id).await.ok()?;
        (p.round >= 1 && p.phase() == Phase::Done && root.join("later/news").exists()).then_some(())
    })
    .await;
    assert_eq!(
        std::fs::read(root.join("later/news")).unwrap(),
        b"written after the bulk copy"
    );
}
