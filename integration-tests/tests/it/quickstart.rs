//! The quick start, run as the real `ferryctl quickstart` command, and checked by independent
//! hashing and `stat` of both trees (not by ferry's own report).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use crate::harness::{assert_same_tree, describe_tree, ferryctl_bin, Node};

#[test]
fn quickstart_command_migrates_the_sample_exactly() {
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(ferryctl_bin())
        .args([
            "quickstart",
            "--sample-big-file-mib",
            "3",
            "--sample-small-files",
            "400",
            "--segment-size",
            "1048576",
            "--xattrs",
            "-o",
            "json",
            "--workdir",
        ])
        .arg(work.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "quickstart failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let source = work.path().join("sample-source");
    let target = work.path().join("target");
    assert_same_tree(&source, &target);

    let tree = describe_tree(&target).unwrap();
    // The sample has what a real migration meets: split files, bundles, empties, a symlink, modes.
    assert!(matches!(
        tree[Path::new("checkpoints/latest")],
        Node::Symlink { .. }
    ));
    assert!(matches!(
        tree[Path::new("datasets/empty-dir")],
        Node::Dir { .. }
    ));
    assert!(matches!(
        tree[Path::new("datasets/empty-labels.txt")],
        Node::File { size: 0, .. }
    ));
    assert!(matches!(
        tree[Path::new("scripts/train.sh")],
        Node::File { mode: 0o755, .. }
    ));
    assert!(matches!(
        tree[Path::new("secrets/wandb.key")],
        Node::File { mode: 0o600, .. }
    ));
    let Node::File { size, .. } = tree[Path::new("checkpoints/optimizer.bin")] else {
        panic!()
    };
    assert!(size > 2 * 1024 * 1024, "split over several 1 MiB segments");
    // ... and what a copier most often loses: names that are not UTF-8,
    let latin1 = Path::new(OsStr::from_bytes(
        b"datasets/legacy-share/r\xe9sum\xe9s/caf\xe9-menu.txt",
    ));
    assert!(matches!(tree[latin1], Node::File { size: 500, .. }));
    // a group of hardlinks (one inode, three names),
    let Node::File { names, .. } = &tree[Path::new("datasets/labels.csv")] else {
        panic!()
    };
    assert_eq!(names.len(), 3, "{names:?}");
    // a sparse file whose holes stay holes (4 runs of 64 KiB in 6 MiB),
    let Node::File {
        size, allocated, ..
    } = tree[Path::new("vm/scratch-disk.img")]
    else {
        panic!()
    };
    assert_eq!(size, 6 * 1024 * 1024);
    assert!(allocated <= 1024 * 1024, "{allocated} bytes allocated");
    // extended attributes (asked for with --xattrs; where the file system keeps user ones),
    let Node::File { xattrs, .. } = &tree[Path::new("datasets/README.txt")] else {
        panic!()
    };
    let probe = work.path().join("xattr-probe");
    std::fs::write(&probe, b"").unwrap();
    if ferry_agent::xattr::apply_nofollow(&probe, &vec![(b"user.p".to_vec(), b"1".to_vec())])
        .is_ok()
    {
        assert_eq!(
            xattrs,
            &vec![(b"user.ferry.dataset".to_vec(), b"images-v3".to_vec())]
        );
    }
    // and owners (given away only when the test runs as root).
    if ferry_agent::holes::running_as_root() {
        assert!(
            stdout.contains("\"notes\": []"),
            "a root target keeps owners:\n{stdout}"
        );
        assert!(matches!(
            tree[Path::new("datasets/README.txt")],
            Node::File {
                owner: (1001, 1002),
                ..
            }
        ));
        assert!(matches!(
            tree[Path::new("checkpoints/latest")],
            Node::Symlink {
                owner: (1005, 1006),
                ..
            }
        ));
    }

    // The JSON report agrees with what we measured ourselves.
    for key in [
        "\"all_verified\": true",
        "\"hash_mismatches\": 0",
        "\"issues_total\": 0",
        // Two of the three names of the labels file were linked, not copied.
        "\"hardlinks\": 2",
        // The congestion controller, as the source registered it (BBR by default).
        "\"congestion\": \"bbr\"",
    ] {
        assert!(stdout.contains(key), "{key} not in report:\n{stdout}");
    }
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(
        report["window_bytes"].as_u64().unwrap() >= 16 << 20,
        "{stdout}"
    );
    assert!(report["peak_in_flight"].as_u64().unwrap() > 0, "{stdout}");
    let files = tree
        .values()
        .filter(|n| !matches!(n, Node::Dir { .. }))
        .count();
    assert!(
        stdout.contains(&format!("\"files\": {files}")),
        "file count {files} not in report:\n{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quickstart_lists_what_it_cannot_copy_and_fails() {
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("ok.txt"), b"fine").unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(src.join("app.sock")).unwrap();
    let report = ferryctl::quickstart::run(ferryctl::quickstart::Options {
        source: Some(src.clone()),
        workdir: Some(work.path().join("qs")),
        progress: false,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(
        !report.ok(),
        "a socket cannot be copied: the quick start must fail"
    );
    assert_eq!(report.issues_total, 1);
    assert_eq!(report.issues[0].0, "app.sock");
    assert!(report.issues[0].1.contains("socket"), "{:?}", report.issues);
    assert!(report.render().contains("NOT COPIED"));
    assert_eq!(
        std::fs::read(report.target.join("ok.txt")).unwrap(),
        b"fine"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_refuses_a_missing_source() {
    let work = tempfile::tempdir().unwrap();
    let err = ferryctl::quickstart::run(ferryctl::quickstart::Options {
        source: Some(work.path().join("nope")),
        workdir: Some(work.path().join("qs")),
        progress: false,
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
}
