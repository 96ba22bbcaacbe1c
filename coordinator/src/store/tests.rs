//! openraft's storage suite on the sled store, plus ferry's own crash-recovery checks.

use openraft::storage::RaftStateMachine;
use openraft::testing::{StoreBuilder, Suite};
use openraft::RaftSnapshotBuilder;

use super::*;
use state_machine::sm_tree_name;

thread_local! {
    /// Fault point in `StateMachine::apply`: fail after applying in memory, before the sled batch
    /// that records the changes and `applied` together.
    pub(super) static CRASH_BEFORE_RECORD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for SledBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = open(dir.path()).expect("open store");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(SledBuilder).expect("openraft storage suite");
}

#[test]
fn refuses_other_format_versions() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()).unwrap());
    {
        // Through `open_db`: sled's threads can hold the directory's lock a moment after the
        // store above is dropped (a bare `sled::open` failed so under load).
        let db = open_db(dir.path()).unwrap();
        let meta = db.open_tree("meta").unwrap();
        meta.insert("format_version", &99u64.to_be_bytes()).unwrap();
        meta.flush().unwrap();
    }
    let err = open(dir.path()).err().expect("must refuse").to_string();
    assert!(err.contains("format version 99"), "{err}");
}

fn entry(index: u64, cmd: crate::state::Command) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(cmd),
    }
}

/// A state with agents, a migration and segments in every lifecycle state.
fn busy_entries() -> Vec<Entry<TypeConfig>> {
    use crate::state::{Command, MigrationSpec, SegmentReg};
    let mut cmds = vec![
        Command::RegisterAgent {
            name: "src".into(),
            session: 1,
            previous: 0,
            data_addr: String::new(),
            new_cluster_id: "cluster-1".into(),
            applies_owners: true,
            congestion: "bbr".into(),
            window_bytes: 64 << 20,
            target_root: String::new(),
            now_ms: 1,
        },
        Command::RegisterAgent {
            name: "dst".into(),
            session: 1,
            previous: 0,
            data_addr: "127.0.0.1:9".into(),
            new_cluster_id: "cluster-1".into(),
            applies_owners: true,
            congestion: "bbr".into(),
            window_bytes: 64 << 20,
            target_root: String::new(),
            now_ms: 1,
        },
        Command::CreateMigration {
            name: "m1".into(),
            idempotency_key: "k1".into(),
            spec: MigrationSpec::for_tests("/d", 10),
            uuid: ferry_common::ids::random_id(),
            throttle: String::new(),
            now_ms: 2,
        },
        Command::RegisterSegments {
            agent: "src".into(),
            migration_id: 1,
            segments: (0..5)
                .map(|id| SegmentReg {
                    id,
                    bytes: 10,
                    files: 1,
                    fingerprint: [id as u8; 32],
                    piece_index: 0,
                    piece_count: 0,
                })
                .collect(),
        },
        Command::LeaseSegments {
            agent: "src".into(),
            session: 1,
            max: 2,
            now_ms: 3,
            ttl_ms: 1000,
        },
    ];
    // Segment 0 was leased by entry 5: verify it.
    for role in [crate::state::Role::Target, crate::state::Role::Source] {
        cmds.push(Command::ReportSegment {
            agent: if role == crate::state::Role::Source {
                "src"
            } else {
                "dst"
            }
            .into(),
            session: 1,
            role,
            migration_id: 1,
            segment_id: 0,
            epoch: crate::state::fencing_token(5, 0),
            result: Ok([9; 32]),
            source_hash: None,
            retry_later: false,
            stale: false,
            permanent: false,
            now_ms: 4,
        });
    }
    // Throttles on the migration and an agent (entries 8 and 9).
    cmds.push(Command::SetThrottle {
        scope: crate::state::ThrottleScope::Migration(1),
        throttle: "09:00-18:00 100mbit, else off".into(),
    });
    cmds.push(Command::SetThrottle {
        scope: crate::state::ThrottleScope::Agent("src".into()),
        throttle: "1gbit".into(),
    });
    cmds.into_iter()
        .enumerate()
        .map(|(i, c)| entry(i as u64 + 1, c))
        .collect()
}

#[tokio::test]
async fn snapshot_of_a_busy_state_builds_installs_and_survives_reopen() {
    let a = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(a.path()).unwrap();
    let responses = sm.apply(busy_entries()).await.unwrap();
    assert!(
        responses
            .iter()
            .all(|r| !matches!(r, crate::state::Response::Refused(_))),
        "{responses:?}"
    );
    let original = sm.shared().read().unwrap().state.clone();
    assert_eq!(original.segments.len(), 5);
    assert_eq!(
        original.cluster_id, "cluster-1",
        "compared below: snapshots carry it"
    );
    assert_eq!(original.migrations[&1].counters.verified_segments, 1);

    let snap = snapshot(&mut sm).await;
    let b = tempfile::tempdir().unwrap();
    {
        let (_log, mut other) = open(b.path()).unwrap();
        install(&mut other, &snap).await;
        assert_eq!(other.shared().read().unwrap().state, original);
        let current = other.get_current_snapshot().await.unwrap().expect("kept");
        assert_eq!(current.meta, snap.meta);
    }
    // Reopened from disk, the installed state is all there, derived indexes included.
    let (_log, mut reopened) = open(b.path()).unwrap();
    let (applied, _) = reopened.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(9));
    let mut state = reopened.shared().read().unwrap().state.clone();
    assert_eq!(state, original);
    // The two leased-and-pending segments are leasable exactly as before.
    let r = state.apply(
        8,
        crate::state::Command::LeaseSegments {
            agent: "src".into(),
            session: 1,
            max: 10,
            now_ms: 5000,
            ttl_ms: 1,
        },
    );
    let crate::state::Response::Leases(l) = r else {
        panic!("{r:?}")
    };
    assert_eq!(l.len(), 4, "1 expired lease and 3 pending segments");
}

#[tokio::test]
async fn applied_state_is_recorded_with_the_data_so_a_restart_does_not_reapply() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut sm) = open(dir.path()).unwrap();
        sm.apply(busy_entries()).await.unwrap();
    }
    let (_log, mut sm) = open(dir.path()).unwrap();
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(9));
    let m = sm.shared().read().unwrap().state.migrations[&1].clone();
    assert_eq!(m.counters.leases_granted, 2, "counters as applied once");
    assert_eq!(
        sm.shared().read().unwrap().state.cluster_id,
        "cluster-1",
        "the cluster id is a record of its own"
    );
    assert_eq!(m.uuid.len(), 32);
    assert_eq!(m.counters.verified_segments, 1);
}

#[tokio::test]
async fn a_damaged_snapshot_is_refused() {
    let a = tempfile::tempdir().unwrap();
    let (_log, mut sm) = open(a.path()).unwrap();
    sm.apply(busy_entries()).await.unwrap();
    let snap = snapshot(&mut sm).await;
    let mut bytes = snap.snapshot.get_ref().clone();
    let last = bytes.len() - 2;
    bytes[last] ^= 1;
    let b = tempfile::tempdir().unwrap();
    let (_log, mut other) = open(b.path()).unwrap();
    let err = other
        .install_snapshot(&snap.meta, Box::new(Cursor::new(bytes)))
        .await
        .expect_err("damaged snapshot installed");
    assert!(err.to_string().contains("checksum"), "{err}");
    assert!(
        other.shared().read().unwrap().state.segments.is_empty(),
        "state unchanged"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn crash_between_apply_and_record_never_applies_twice() {
    let entries = busy_entries();
    // Reference: everything applied once.
    let r = tempfile::tempdir().unwrap();
    let (_log, mut reference) = open(r.path()).unwrap();
    reference.apply(entries.clone()).await.unwrap();
    let want = reference.shared().read().unwrap().state.clone();

    let dir = tempfile::tempdir().unwrap();
    {
        let (_log, mut sm) = open(dir.path()).unwrap();
        sm.apply(entries[..4].to_vec()).await.unwrap();
        CRASH_BEFORE_RECORD.with(|c| c.set(true));
        let crashed = sm.apply(entries[4..].to_vec()).await;
        CRASH_BEFORE_RECORD.with(|c| c.set(false));
        assert!(crashed.is_err(), "the fault point must fire");
        // The process dies here: memory is lost, only sled remains.
    }
    let (_log, mut sm) = open(dir.path()).unwrap();
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(
        applied.map(|l| l.index),
        Some(4),
        "nothing of the crashed batch was recorded"
    );
    // openraft re-applies from the last recorded index; the result equals applying once.
    sm.apply(entries[4..].to_vec()).await.unwrap();
    assert_eq!(sm.shared().read().unwrap().state, want);
    let m = &want.migrations[&1];
    assert_eq!(
        (m.counters.leases_granted, m.counters.verified_segments),
        (2, 1)
    );
}

/// Entries that register a second migration's agents on top of `busy_entries` (indexes 8..).
fn more_entries() -> Vec<Entry<TypeConfig>> {
    use crate::state::Command;
    vec![
        entry(
            8,
            Command::RegisterAgent {
                name: "late".into(),
                session: 1,
                previous: 0,
                data_addr: String::new(),
                new_cluster_id: "cluster-1".into(),
                applies_owners: true,
                congestion: "bbr".into(),
                window_bytes: 64 << 20,
                target_root: String::new(),
                now_ms: 9,
            },
        ),
        entry(
            9,
            Command::Heartbeat {
                name: "src".into(),
                session: 1,
                now_ms: 10,
            },
        ),
    ]
}

#[tokio::test]
async fn records_applied_after_a_built_snapshot_are_laid_over_it_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let want = {
        let (_log, mut sm) = open(dir.path()).unwrap();
        sm.apply(busy_entries()).await.unwrap();
        snapshot(&mut sm).await;
        sm.apply(more_entries()).await.unwrap();
        let s = sm.shared().read().unwrap().state.clone();
        assert!(s.agents.contains_key("late"));
        s
    };
    let (_log, mut sm) = open(dir.path()).unwrap();
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|l| l.index), Some(9));
    assert_eq!(sm.shared().read().unwrap().state, want);
}

/// A disk that fills up while a snapshot is written: the error is the disk's, not postcard's
/// ("the serialize buffer is full", as it reports any writer's error).
#[test]
fn a_snapshot_written_to_a_full_disk_fails_saying_so() {
    struct Full(usize);
    impl std::io::Write for Full {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::from_raw_os_error(28));
            }
            let n = buf.len().min(self.0);
            self.0 -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    // More than the 1 MiB buffer, so postcard's writes meet the error.
    let body: Vec<u64> = (0..1_000_000u64).map(|i| i << 20).collect();
    let err = write_hashed(&body, Full(100 << 10)).err().expect("fails");
    assert!(err.to_string().contains("No space left on device"), "{err}");
    let (_, digest, len) = write_hashed(&body, Vec::new()).unwrap();
    let bytes = crate::codec::encode(&body).unwrap();
    assert_eq!((digest, len), (blake3::hash(&bytes), bytes.len() as u64));
}

/// A snapshot `sm` builds now, as openraft then reads it to send it (the built one carries
/// only its meta).
async fn snapshot(sm: &mut StateMachine) -> Snapshot<TypeConfig> {
    let built = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("snapshot builds");
    let current = sm
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("in the file");
    assert_eq!(current.meta, built.meta);
    let len = current.snapshot.get_ref().len();
    assert!(
        built.meta.snapshot_id.ends_with(&format!("-{len}")),
        "the id names the size measured before writing: {} for {len} bytes",
        built.meta.snapshot_id
    );
    current
}

/// Installs (a copy of) `snap` into `sm`.
async fn install(sm: &mut StateMachine, snap: &Snapshot<TypeConfig>) {
    sm.install_snapshot(
        &snap.meta,
        Box::new(Cursor::new(snap.snapshot.get_ref().clone())),
    )
    .await
    .expect("snapshot installs");
}

/// The busy state snapshotted at index 7 (the snapshot and the state it holds).
async fn leader_snapshot() -> (Snapshot<TypeConfig>, crate::state::State) {
    let a = tempfile::tempdir().unwrap();
    let (_log, mut leader) = open(a.path()).unwrap();
    leader.apply(busy_entries()).await.unwrap();
    let snap = snapshot(&mut leader).await;
    let state = leader.shared().read().unwrap().state.clone();
    (snap, state)
}

/// A lagging follower in `dir` that holds a record of its own from an earlier entry (an agent
/// the snapshot does not know, as if applied from a log the leader later overwrote).
async fn follower_with_a_ghost(dir: &std::path::Path) -> (LogStore, StateMachine) {
    let (log, mut follower) = open(dir).unwrap();
    follower
        .apply(vec![entry(
            1,
            crate::state::Command::RegisterAgent {
                name: "ghost".into(),
                session: 1,
                previous: 0,
                data_addr: String::new(),
                new_cluster_id: "cluster-1".into(),
                applies_owners: true,
                congestion: "bbr".into(),
                window_bytes: 64 << 20,
                target_root: String::new(),
                now_ms: 1,
            },
        )])
        .await
        .unwrap();
    (log, follower)
}

#[tokio::test]
async fn an_installed_snapshot_replaces_older_records_instead_of_mixing_with_them() {
    let (snap, want) = leader_snapshot().await;
    let b = tempfile::tempdir().unwrap();
    {
        let (_log, mut follower) = follower_with_a_ghost(b.path()).await;
        install(&mut follower, &snap).await;
        assert_eq!(follower.shared().read().unwrap().state, want);
        // The old generation (emptied, then dropped) is gone.
        follower.dropper.take().unwrap().join().unwrap();
        let trees: Vec<_> = follower
            .db
            .tree_names()
            .into_iter()
            .filter(|n| n.starts_with(b"sm-"))
            .collect();
        assert_eq!(trees, [sm_tree_name(follower.generation).as_bytes()]);
    }
    let (_log, reopened) = open(b.path()).unwrap();
    let state = reopened.shared().read().unwrap().state.clone();
    assert!(
        !state.agents.contains_key("ghost"),
        "stale record came back"
    );
    assert_eq!(state, want);
}

#[tokio::test]
async fn an_install_interrupted_before_the_switch_is_finished_at_start_up() {
    let (snap, want) = leader_snapshot().await;
    let b = tempfile::tempdir().unwrap();
    drop(follower_with_a_ghost(b.path()).await);
    // The crash: the snapshot file was written, the generation switch never happened.
    write_snapshot_file(
        &b.path().join(SNAPSHOT_DIR),
        &snap.meta,
        snap.snapshot.get_ref(),
    )
    .unwrap();
    {
        let (_log, mut reopened) = open(b.path()).unwrap();
        let (applied, _) = reopened.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(9));
        assert_eq!(reopened.shared().read().unwrap().state, want);
    }
    // And it stays switched.
    let (_log, again) = open(b.path()).unwrap();
    assert_eq!(again.shared().read().unwrap().state, want);
}

#[tokio::test]
async fn a_deletion_is_recorded_and_survives_reopen_and_snapshots_with_ids_never_reused() {
    use crate::state::{Command, Response};
    let dir = tempfile::tempdir().unwrap();
    let want = {
        let (_log, mut sm) = open(dir.path()).unwrap();
        sm.apply(busy_entries()).await.unwrap();
        let uuid = sm.shared().read().unwrap().state.migrations[&1]
            .uuid
            .clone();
        let r = sm
            .apply(vec![entry(
                10,
                Command::DeleteMigration {
                    migration_id: 1,
                    force: true,
                },
            )])
            .await
            .unwrap();
        assert_eq!(r, [Response::Ok]);
        let note = crate::state::AuditNote {
            at_ms: 30,
            who: "otto".into(),
            role: "operator".into(),
            from: "127.0.0.1:1".into(),
            call: "Test".into(),
            what: String::new(),
        };
        sm.apply(vec![entry(
            11,
            Command::Audit {
                note,
                decision: "ok".into(),
            },
        )])
        .await
        .unwrap();
        let s = sm.shared().read().unwrap().state.clone();
        assert_eq!(s.audit.len(), 1, "an audit record, recorded too");
        assert!(s.migrations.is_empty() && s.segments.is_empty());
        assert_eq!(s.deleted_up_to, 1);
        assert_eq!(s.agents["src"].forget, [uuid]);
        s
    };
    let (_log, mut sm) = open(dir.path()).unwrap();
    assert_eq!(sm.shared().read().unwrap().state, want, "as recorded");
    let snap = snapshot(&mut sm).await;
    let other_dir = tempfile::tempdir().unwrap();
    let (_log, mut other) = open(other_dir.path()).unwrap();
    install(&mut other, &snap).await;
    let mut state = other.shared().read().unwrap().state.clone();
    assert_eq!(state, want, "as a snapshot carries it");
    // The next migration does not take the deleted one's id.
    let spec = crate::state::MigrationSpec::for_tests("/d", 100);
    let r = state.apply(
        12,
        Command::CreateMigration {
            name: "again".into(),
            idempotency_key: String::new(),
            spec,
            uuid: ferry_common::ids::random_id(),
            throttle: String::new(),
            now_ms: 20,
        },
    );
    assert_eq!(r, Response::MigrationCreated(2));
}

#[tokio::test]
async fn jobs_are_recorded_and_survive_reopen_and_snapshots() {
    use crate::state::{Command, JobKind, JobState, JobUpdate, Response};
    let dir = tempfile::tempdir().unwrap();
    let want = {
        let (_log, mut sm) = open(dir.path()).unwrap();
        sm.apply(busy_entries()).await.unwrap();
        let start = |index| {
            entry(
                index,
                Command::StartJob {
                    agent: "src".into(),
                    kind: JobKind::Assess {
                        paths: vec!["/data".into()],
                        excludes: Vec::new(),
                    },
                    now_ms: 2,
                },
            )
        };
        let r = sm.apply(vec![start(10), start(11)]).await.unwrap();
        assert_eq!(r, [Response::JobStarted(1), Response::JobStarted(2)]);
        let done = entry(
            12,
            Command::ReportJob {
                agent: "src".into(),
                session: 1,
                id: 2,
                update: JobUpdate::Done("{\"files\":1}".into()),
                now_ms: 3,
            },
        );
        assert_eq!(sm.apply(vec![done]).await.unwrap(), [Response::Ok]);
        let s = sm.shared().read().unwrap().state.clone();
        assert_eq!(s.jobs.len(), 2);
        assert_eq!(s.jobs[&2].state, JobState::Done);
        s
    };
    let (_log, mut sm) = open(dir.path()).unwrap();
    assert_eq!(sm.shared().read().unwrap().state, want, "as recorded");
    let snap = snapshot(&mut sm).await;
    let other_dir = tempfile::tempdir().unwrap();
    let (_log, mut other) = open(other_dir.path()).unwrap();
    install(&mut other, &snap).await;
    assert_eq!(
        other.shared().read().unwrap().state,
        want,
        "as a snapshot carries it"
    );
}

/// The audit log keeps its newest `AUDIT_KEPT` records: older ones are dropped as new ones
/// come, from the state and from its records (a reopened node does not bring them back), and
/// what is kept still chains.
#[tokio::test]
async fn the_audit_log_keeps_its_newest_records_across_reopen() {
    use crate::state::{verify_chain, AuditNote, Command, AUDIT_KEPT};
    let dir = tempfile::tempdir().unwrap();
    let extra = 5u64;
    let records = |sm: &StateMachine| {
        let s = sm.shared().read().unwrap().state.clone();
        s.audit.values().cloned().collect::<Vec<_>>()
    };
    {
        let (_log, mut sm) = open(dir.path()).unwrap();
        let entries: Vec<_> = (0..AUDIT_KEPT as u64 + extra)
            .map(|i| {
                entry(
                    i + 1,
                    Command::Audit {
                        note: AuditNote {
                            at_ms: i,
                            who: "otto".into(),
                            role: "viewer".into(),
                            from: "10.0.0.1:5000".into(),
                            call: "AddNode".into(),
                            what: format!("call {i}"),
                        },
                        decision: "denied: this call needs the admin role".into(),
                    },
                )
            })
            .collect();
        for chunk in entries.chunks(1000) {
            sm.apply(chunk.to_vec()).await.unwrap();
        }
        let kept = records(&sm);
        assert_eq!(kept.len(), AUDIT_KEPT);
        assert_eq!(kept[0].seq, extra + 1, "the oldest went");
        assert_eq!(verify_chain(&kept, None), Ok(()));
    }
    let (_log, sm) = open(dir.path()).unwrap();
    let kept = records(&sm);
    assert_eq!(
        (kept.len(), kept[0].seq, kept.last().unwrap().seq),
        (AUDIT_KEPT, extra + 1, AUDIT_KEPT as u64 + extra),
        "as recorded"
    );
}
