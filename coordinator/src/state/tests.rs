//! Deterministic tests of the segment lifecycle and the scheduler: no sockets, no clock.

use super::*;

const TTL: u64 = 1000;

/// A migration name no other test migration has.
fn unique_name() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    format!(
        "m{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

fn reg(id: u64, bytes: u64, files: u32) -> SegmentReg {
    SegmentReg {
        id,
        bytes,
        files,
        fingerprint: [bytes as u8; 32],
        piece_index: 0,
        piece_count: 0,
    }
}

/// A spec from "src" to "dst" with the defaults.
fn spec(source_path: &str, segment_size: u64) -> MigrationSpec {
    MigrationSpec::for_tests(source_path, segment_size)
}

struct World {
    s: State,
    index: u64,
}

impl World {
    fn new() -> Self {
        let mut w = World {
            s: State::default(),
            index: 0,
        };
        for (name, addr) in [("src", ""), ("dst", "127.0.0.1:9")] {
            let root = if addr.is_empty() { "" } else { "/cloud" };
            register_target(&mut w, name, addr, root, 0);
        }
        w
    }

    fn apply(&mut self, c: Command) -> Response {
        self.index += 1;
        self.s.apply(self.index, c)
    }

    fn migration(&mut self, segs: &[(u64, u64, u32)]) -> u64 {
        self.migration_with(segs, DEFAULT_MAX_ATTEMPTS)
    }

    /// A migration of `segs` (id, bytes, files) whose segments are given up on after
    /// `max_attempts` failures.
    fn migration_with(&mut self, segs: &[(u64, u64, u32)], max_attempts: u32) -> u64 {
        let spec = MigrationSpec {
            max_attempts,
            ..spec("/data", 100)
        };
        let id = self.create(spec);
        self.round_scan(id, segs, 0, 1);
        id
    }

    fn lease(&mut self, max: u32, now_ms: u64) -> Vec<Lease> {
        match self.apply(Command::LeaseSegments {
            agent: "src".into(),
            session: 1,
            max,
            now_ms,
            ttl_ms: TTL,
        }) {
            Response::Leases(l) => l,
            r => panic!("{r:?}"),
        }
    }

    fn report(&mut self, role: Role, l: &Lease, result: Result<Digest, String>) -> ReportOutcome {
        self.report_at(role, l, result, false, 2)
    }

    /// The target's report of a segment it holds, with the hash the source sent with the bytes.
    fn received(&mut self, l: &Lease, target: Digest, source: Digest) -> ReportOutcome {
        match self.apply(Command::ReportSegment {
            agent: "dst".into(),
            session: 1,
            role: Role::Target,
            migration_id: l.migration_id,
            segment_id: l.segment_id,
            epoch: l.epoch,
            result: Ok(target),
            source_hash: Some(source),
            retry_later: false,
            stale: false,
            permanent: false,
            now_ms: 2,
        }) {
            Response::Report(o, _) => o,
            r => panic!("{r:?}"),
        }
    }

    /// A report at `now_ms`; `retry_later` marks a failure that is not the segment's.
    fn report_at(
        &mut self,
        role: Role,
        l: &Lease,
        result: Result<Digest, String>,
        retry_later: bool,
        now_ms: u64,
    ) -> ReportOutcome {
        let agent = if role == Role::Source { "src" } else { "dst" };
        match self.apply(Command::ReportSegment {
            agent: agent.into(),
            session: 1,
            role,
            migration_id: l.migration_id,
            segment_id: l.segment_id,
            epoch: l.epoch,
            result,
            source_hash: None,
            retry_later,
            stale: false,
            permanent: false,
            now_ms,
        }) {
            Response::Report(o, _) => o,
            r => panic!("{r:?}"),
        }
    }
}

#[test]
fn segment_verifies_only_when_both_hashes_match() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 1)]);
    let l = w.lease(8, 10).pop().unwrap();
    assert_eq!(
        w.report(Role::Target, &l, Ok([1; 32])),
        ReportOutcome::Waiting
    );
    assert!(matches!(
        w.s.segments[&(mid, 0)].state,
        SegState::Leased { .. }
    ));
    assert_eq!(
        w.report(Role::Source, &l, Ok([1; 32])),
        ReportOutcome::Verified
    );
    assert_eq!(w.s.segments[&(mid, 0)].state, SegState::Verified);
    let m = &w.s.migrations[&mid];
    assert_eq!(m.phase, Phase::Done);
    assert_eq!(m.counters.verified_bytes, 10);
}

/// A target's report that carries the hash the source sent with the bytes (and the target
/// found equal to its own) verifies the segment on its own: the source's report is not
/// waited for, and when it comes it is answered verified and counts nothing twice.
#[test]
fn a_targets_report_with_the_sources_hash_verifies_the_segment() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 1), (1, 10, 1)]);
    let leases = w.lease(8, 10);
    let (a, b) = (&leases[0], &leases[1]);
    assert_eq!(w.received(a, [1; 32], [1; 32]), ReportOutcome::Verified);
    assert_eq!(w.s.segments[&(mid, a.segment_id)].state, SegState::Verified);
    assert_eq!(w.s.migrations[&mid].counters.verified_segments, 1);
    assert_eq!(
        w.report(Role::Source, a, Ok([1; 32])),
        ReportOutcome::Verified
    );
    assert_eq!(w.s.migrations[&mid].counters.verified_segments, 1);
    // A source that reported first keeps its own hash: the target's copy of it does not
    // overwrite it, and the two ends' hashes still have to agree.
    assert_eq!(
        w.report(Role::Source, b, Ok([2; 32])),
        ReportOutcome::Waiting
    );
    assert_eq!(w.received(b, [1; 32], [1; 32]), ReportOutcome::Failed);
    assert!(w.s.segments[&(mid, b.segment_id)]
        .last_error
        .contains("differ"));
    assert_eq!(w.s.migrations[&mid].phase, Phase::Copying);
}

#[test]
fn hash_mismatch_requeues_with_an_attempt() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 1)]);
    let l = w.lease(8, 10).pop().unwrap();
    w.report(Role::Target, &l, Ok([1; 32]));
    assert_eq!(
        w.report(Role::Source, &l, Ok([2; 32])),
        ReportOutcome::Failed
    );
    let seg = &w.s.segments[&(mid, 0)];
    assert_eq!(seg.state, SegState::Pending);
    assert_eq!(seg.attempts, 1);
    assert!(seg.last_error.contains("differ"));
    assert_eq!(w.s.migrations[&mid].phase, Phase::Copying);
    // It is leased again after its backoff, with a new epoch.
    let l2 = w.lease(8, 2 + RETRY_BASE_MS).pop().unwrap();
    assert!(l2.epoch > l.epoch);
    assert_eq!(l2.attempts, 1);
}

#[test]
fn stale_epoch_is_fenced_off() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 1)]);
    let old = w.lease(8, 10).pop().unwrap();
    // Lease expires; the segment is granted again.
    let new = w.lease(8, 10 + TTL).pop().unwrap();
    assert_eq!(new.segment_id, old.segment_id);
    assert_eq!(
        w.report(Role::Target, &old, Ok([1; 32])),
        ReportOutcome::Rejected
    );
    assert_eq!(
        w.report(Role::Source, &old, Ok([1; 32])),
        ReportOutcome::Rejected
    );
    assert!(w.s.check_lease("dst", mid, 0, old.epoch, 11 + TTL).is_err());
    assert!(w.s.check_lease("dst", mid, 0, new.epoch, 11 + TTL).is_ok());
    assert_eq!(w.s.segments[&(mid, 0)].leases, 2);
}

#[test]
fn check_lease_refuses_other_targets_and_expired_leases() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 1)]);
    let l = w.lease(1, 10).pop().unwrap();
    assert_eq!(
        w.s.check_lease("dst", mid, 0, l.epoch, 11)
            .unwrap()
            .spec
            .source_agent,
        "src"
    );
    let err =
        w.s.check_lease("src", mid, 0, l.epoch, 11)
            .unwrap_err()
            .to_string();
    assert!(err.contains("not the target"), "{err}");
    let err =
        w.s.check_lease("dst", mid, 0, l.epoch, 10 + TTL)
            .unwrap_err()
            .to_string();
    assert!(err.contains("expired"), "{err}");
}

#[test]
fn failure_report_requeues() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 1)]);
    let l = w.lease(1, 10).pop().unwrap();
    assert_eq!(
        w.report(Role::Source, &l, Err("connection lost".into())),
        ReportOutcome::Failed
    );
    assert_eq!(w.s.segments[&(mid, 0)].state, SegState::Pending);
    assert_eq!(w.s.migrations[&mid].counters.failed_attempts, 1);
}

#[test]
fn scheduler_respects_max_and_per_agent_cap() {
    let mut w = World::new();
    let segs: Vec<_> = (0..200).map(|i| (i, 1, 1)).collect();
    let mid = w.migration(&segs);
    assert_eq!(w.lease(3, 10).len(), 3);
    let more = w.lease(1000, 10);
    assert_eq!(more.len(), MAX_LEASES_PER_AGENT - 3);
    assert!(w.lease(10, 10).is_empty(), "cap reached");
    // Lowest ids first.
    assert_eq!(more[0].segment_id, 3);
    assert_eq!(
        w.s.migrations[&mid].counters.leases_granted,
        MAX_LEASES_PER_AGENT as u64
    );
}

#[test]
fn scheduler_round_robins_across_migrations() {
    let mut w = World::new();
    let a = w.migration(&[(0, 1, 1), (1, 1, 1)]);
    let b = w.migration(&[(0, 1, 1), (1, 1, 1)]);
    let got: Vec<u64> = w.lease(2, 10).iter().map(|l| l.migration_id).collect();
    assert_eq!(got, vec![a, b]);
}

#[test]
fn no_leases_until_target_has_an_address() {
    let mut w = World::new();
    w.apply(Command::RegisterAgent {
        name: "dst".into(),
        session: 1,
        previous: 0,
        data_addr: String::new(),
        new_cluster_id: "cluster-1".into(),
        applies_owners: true,
        congestion: "bbr".into(),
        window_bytes: 64 << 20,
        target_root: String::new(),
        now_ms: 3,
    });
    w.migration(&[(0, 1, 1)]);
    assert!(w.lease(1, 10).is_empty());
}

#[test]
fn register_is_idempotent_and_complete_scan_checks_count() {
    let mut w = World::new();
    let spec = spec("/d", 1);
    let Response::MigrationCreated(mid) = w.apply(Command::CreateMigration {
        name: unique_name(),
        idempotency_key: String::new(),
        spec,
        uuid: ferry_common::ids::random_id(),
        throttle: String::new(),
        now_ms: 0,
    }) else {
        panic!()
    };
    let reg = Command::RegisterSegments {
        agent: "src".into(),
        migration_id: mid,
        segments: vec![reg(0, 5, 1)],
    };
    w.apply(reg.clone());
    w.apply(reg);
    assert_eq!(w.s.migrations[&mid].counters.segments, 1);
    let r = w.apply(Command::CompleteScan {
        agent: "src".into(),
        migration_id: mid,
        segments_total: 2,
        issues: vec![],
        issues_total: 0,
        hardlinks: 0,
        excluded: 0,
        root_error: String::new(),
        deleted: 0,
        now_ms: 0,
    });
    assert!(matches!(r, Response::Refused(_)));
    // Only the source may register.
    let r = w.apply(Command::RegisterSegments {
        agent: "dst".into(),
        migration_id: mid,
        segments: vec![],
    });
    assert!(matches!(r, Response::Refused(_)));
}

#[test]
fn empty_migration_is_done_at_scan_completion() {
    let mut w = World::new();
    let mid = w.migration(&[]);
    assert_eq!(w.s.migrations[&mid].phase, Phase::Done);
}

#[test]
fn create_refuses_unknown_agents() {
    let mut w = World::new();
    let spec = MigrationSpec {
        source_agent: "nobody".into(),
        ..spec("/d", 1)
    };
    let r = w.apply(Command::CreateMigration {
        name: unique_name(),
        idempotency_key: String::new(),
        spec,
        uuid: ferry_common::ids::random_id(),
        throttle: String::new(),
        now_ms: 0,
    });
    assert!(
        matches!(r, Response::Refused(ref m) if m.contains("nobody")),
        "{r:?}"
    );
}

/// Attempts allowed in the random walk: low, so that some segments are given up on.
const MAX_WALK_ATTEMPTS: u32 = 3;

/// A seeded random walk over the lifecycle: after every step the counters equal a recount and the
/// derived indexes equal a rebuild. Reproduce a failure with its printed seed.
#[test]
fn random_walk_keeps_counters_and_indexes_consistent() {
    let mut gave_up = 0;
    for seed in 0..20u64 {
        let mut rng = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut w = World::new();
        let segs: Vec<_> = (0..30).map(|i| (i, i + 1, 1)).collect();
        let mid = w.migration_with(&segs, MAX_WALK_ATTEMPTS);
        let mut now = 10;
        let mut held: Vec<Lease> = Vec::new();
        for _ in 0..400 {
            now += next() % 300;
            match next() % 4 {
                0 => held.extend(w.lease((next() % 5) as u32, now)),
                _ if !held.is_empty() => {
                    let l = held.swap_remove((next() % held.len() as u64) as usize);
                    let h = if next() % 10 == 0 { [9; 32] } else { [1; 32] };
                    let ok = next() % 8 != 0;
                    let r = if ok { Ok(h) } else { Err("x".to_string()) };
                    let later = next() % 2 == 0;
                    let o = w.report_at(Role::Target, &l, r.clone(), later, now);
                    if o == ReportOutcome::Waiting {
                        w.report_at(Role::Source, &l, Ok([1; 32]), false, now);
                    }
                }
                _ => {}
            }
            let m = &w.s.migrations[&mid];
            let verified: Vec<_> =
                w.s.segments
                    .values()
                    .filter(|s| s.state == SegState::Verified)
                    .collect();
            assert_eq!(
                m.counters.verified_segments,
                verified.len() as u64,
                "seed {seed}"
            );
            assert_eq!(
                m.counters.verified_bytes,
                verified.iter().map(|s| s.bytes).sum::<u64>(),
                "seed {seed}"
            );
            assert!(
                verified
                    .iter()
                    .all(|s| s.source_hash() == s.target_hash() && s.source_hash().is_some()),
                "seed {seed}"
            );
            let mut rebuilt = w.s.clone();
            rebuilt.rebuild_indexes();
            let flat = |m: &BTreeMap<u64, BTreeSet<u64>>| -> Vec<(u64, u64)> {
                m.iter()
                    .flat_map(|(k, v)| v.iter().map(move |x| (*k, *x)))
                    .collect()
            };
            let flat_pending = |m: &BTreeMap<u64, IdSet>| -> Vec<(u64, u64)> {
                m.iter()
                    .flat_map(|(k, v)| v.iter().map(move |x| (*k, x)))
                    .collect()
            };
            assert_eq!(
                flat_pending(&rebuilt.pending),
                flat_pending(&w.s.pending),
                "seed {seed}"
            );
            assert_eq!(flat(&rebuilt.leased), flat(&w.s.leased), "seed {seed}");
            let flat_waiting = |m: &BTreeMap<u64, BTreeSet<(u64, u64)>>| -> Vec<(u64, u64, u64)> {
                m.iter()
                    .flat_map(|(k, v)| v.iter().map(move |(t, x)| (*k, *t, *x)))
                    .collect()
            };
            assert_eq!(
                flat_waiting(&rebuilt.waiting),
                flat_waiting(&w.s.waiting),
                "seed {seed}"
            );
            let failed: Vec<_> =
                w.s.segments
                    .values()
                    .filter(|s| s.state == SegState::Failed)
                    .collect();
            assert_eq!(
                m.counters.failed_segments,
                failed.len() as u64,
                "seed {seed}"
            );
            assert_eq!(
                m.counters.failed_bytes,
                failed.iter().map(|s| s.bytes).sum::<u64>(),
                "seed {seed}"
            );
            assert!(
                failed.iter().all(|s| s.attempts == MAX_WALK_ATTEMPTS),
                "seed {seed}"
            );
            assert_eq!(m.phase == Phase::Done, verified.len() == 30, "seed {seed}");
            assert_eq!(
                m.phase == Phase::Failed,
                !failed.is_empty() && verified.len() + failed.len() == 30,
                "seed {seed}"
            );
            // Nothing waits out a backoff unless it is pending, and nothing pending is in two
            // indexes.
            for (&mid, set) in &w.s.waiting {
                for &(nb, id) in set {
                    let seg = &w.s.segments[&(mid, id)];
                    assert_eq!(seg.state, SegState::Pending, "seed {seed}");
                    assert_eq!(seg.not_before_ms, nb, "seed {seed}");
                    assert!(!w.s.pending.get(&mid).is_some_and(|p| p.contains(&id)));
                }
            }
        }
        gave_up += w.s.migrations[&mid].counters.failed_segments;
    }
    assert!(gave_up > 0, "the walk never reached a given-up segment");
}

fn create(w: &mut World) -> u64 {
    let spec = spec("/d", 1);
    let Response::MigrationCreated(mid) = w.apply(Command::CreateMigration {
        name: unique_name(),
        idempotency_key: String::new(),
        spec,
        uuid: ferry_common::ids::random_id(),
        throttle: String::new(),
        now_ms: 0,
    }) else {
        panic!()
    };
    mid
}

fn register(w: &mut World, mid: u64, segs: Vec<SegmentReg>) -> Response {
    w.apply(Command::RegisterSegments {
        agent: "src".into(),
        migration_id: mid,
        segments: segs,
    })
}

fn complete(w: &mut World, mid: u64, total: u64) -> Response {
    w.apply(Command::CompleteScan {
        agent: "src".into(),
        migration_id: mid,
        segments_total: total,
        issues: vec![],
        issues_total: 0,
        hardlinks: 0,
        excluded: 0,
        root_error: String::new(),
        deleted: 0,
        now_ms: 0,
    })
}

#[test]
fn rescan_may_replace_unsent_segments_but_never_sent_ones() {
    let mut w = World::new();
    let mid = create(&mut w);
    assert_eq!(
        register(&mut w, mid, vec![reg(0, 10, 1), reg(1, 10, 1)]),
        Response::Ok
    );
    let l = w.lease(1, 10).pop().unwrap();
    assert_eq!(l.segment_id, 0);
    // Same sizes, other contents (another file shifted into id 0): refused, since 0 was sent.
    let moved = SegmentReg {
        fingerprint: [7; 32],
        ..reg(0, 10, 1)
    };
    let before = w.s.clone();
    let r = register(&mut w, mid, vec![reg(1, 10, 1), moved]);
    assert!(
        matches!(r, Response::Refused(ref m) if m.contains("segment 0 differs")),
        "{r:?}"
    );
    assert_eq!(w.s, before, "a refused batch changes nothing");
    // Segment 1 was never sent: a replan of it is accepted and the totals follow.
    let replanned = SegmentReg {
        fingerprint: [8; 32],
        ..reg(1, 30, 2)
    };
    assert_eq!(register(&mut w, mid, vec![replanned]), Response::Ok);
    let m = &w.s.migrations[&mid];
    assert_eq!((m.counters.bytes, m.counters.files), (40, 3));
    assert_eq!(w.s.segments[&(mid, 1)].fingerprint, [8; 32]);
}

#[test]
fn shorter_rescan_drops_the_unsent_tail() {
    let mut w = World::new();
    let mid = create(&mut w);
    register(&mut w, mid, vec![reg(0, 1, 1), reg(1, 2, 1), reg(2, 3, 1)]);
    assert_eq!(complete(&mut w, mid, 2), Response::Ok);
    let m = &w.s.migrations[&mid];
    assert_eq!((m.counters.segments, m.counters.bytes), (2, 3));
    assert!(!w.s.segments.contains_key(&(mid, 2)));
    assert_eq!(
        w.lease(10, 10).len(),
        2,
        "the dropped segment is not leased"
    );
}

#[test]
fn shorter_rescan_is_refused_when_the_tail_was_sent() {
    let mut w = World::new();
    let mid = create(&mut w);
    register(&mut w, mid, vec![reg(0, 1, 1), reg(1, 2, 1)]);
    w.lease(10, 10);
    let r = complete(&mut w, mid, 1);
    assert!(
        matches!(r, Response::Refused(ref m) if m.contains("already sent")),
        "{r:?}"
    );
}

#[test]
fn re_registration_after_a_complete_scan_must_match() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 1)]);
    assert_eq!(register(&mut w, mid, vec![reg(0, 10, 1)]), Response::Ok);
    let other = SegmentReg {
        fingerprint: [1; 32],
        ..reg(0, 10, 1)
    };
    assert!(matches!(
        register(&mut w, mid, vec![other]),
        Response::Refused(_)
    ));
    assert!(matches!(
        register(&mut w, mid, vec![reg(5, 1, 1)]),
        Response::Refused(_)
    ));
}

#[test]
fn source_problems_are_visible_on_the_migration() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 1)]);
    let r = w.apply(Command::SourceProblem {
        agent: "src".into(),
        migration_id: mid,
        error: "cannot write manifest: disk full".into(),
        issues: vec![("a/gone.txt".into(), "deleted after the scan".into())],
    });
    assert_eq!(r, Response::Ok);
    let m = &w.s.migrations[&mid];
    assert!(m.last_error.contains("disk full"));
    assert_eq!(m.scan_issues_total, 1);
    let r = w.apply(Command::SourceProblem {
        agent: "dst".into(),
        migration_id: mid,
        error: "x".into(),
        issues: vec![],
    });
    assert!(
        matches!(r, Response::Refused(_)),
        "only the source may report"
    );
}

#[test]
fn state_survives_json_and_binary_round_trips_with_segments() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 1), (1, 5, 2)]);
    w.lease(1, 10);
    let json = serde_json::to_vec(&w.s).expect("state with tuple-keyed segments serialises");
    let mut back: State = serde_json::from_slice(&json).unwrap();
    back.rebuild_indexes();
    assert_eq!(back.segments, w.s.segments);
    assert_eq!(back.migrations[&mid], w.s.migrations[&mid]);
    let bin = crate::codec::encode(&w.s).unwrap();
    let mut back: State = crate::codec::decode(&bin).unwrap();
    back.rebuild_indexes();
    w.s.take_dirty();
    assert_eq!(back, w.s);
    assert!(crate::codec::decode::<State>(&bin[..bin.len() - 1]).is_err());
}

#[test]
fn a_repeated_report_of_a_verified_segment_is_answered_verified() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 1)]);
    let l = w.lease(8, 10).pop().unwrap();
    w.report(Role::Target, &l, Ok([1; 32]));
    assert_eq!(
        w.report(Role::Source, &l, Ok([1; 32])),
        ReportOutcome::Verified
    );
    // The answer was lost and both ends report again: nothing changes, both hear "verified".
    assert_eq!(
        w.report(Role::Target, &l, Ok([1; 32])),
        ReportOutcome::Verified
    );
    assert_eq!(
        w.report(Role::Source, &l, Ok([1; 32])),
        ReportOutcome::Verified
    );
    assert_eq!(w.s.migrations[&mid].counters.verified_segments, 1);
    // A different hash for a verified segment is not.
    assert_eq!(
        w.report(Role::Target, &l, Ok([2; 32])),
        ReportOutcome::Rejected
    );
}

#[test]
fn a_batch_applies_each_command_in_order_with_its_own_response_and_token() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 1), (1, 10, 1), (2, 10, 1)]);
    let lease = |max| Command::LeaseSegments {
        agent: "src".into(),
        session: 1,
        max,
        now_ms: 10,
        ttl_ms: TTL,
    };
    let r = w.s.apply(
        1000,
        Command::Batch(vec![
            lease(1),
            Command::Heartbeat {
                name: "nobody".into(),
                session: 1,
                now_ms: 10,
            },
            lease(1),
        ]),
    );
    let Response::Batch(rs) = r else {
        panic!("{r:?}")
    };
    assert_eq!(rs.len(), 3);
    let (Response::Leases(a), Response::Leases(b)) = (&rs[0], &rs[2]) else {
        panic!("{rs:?}")
    };
    // One refused command does not stop the others.
    assert!(matches!(rs[1], Response::Refused(_)));
    assert_eq!((a[0].segment_id, b[0].segment_id), (0, 1));
    // Each grant has its own fencing token, increasing in log order.
    assert_eq!(a[0].epoch, fencing_token(1000, 0));
    assert_eq!(b[0].epoch, fencing_token(1000, 2));
    assert!(fencing_token(1000, 2) < fencing_token(1001, 0));
    assert_eq!(w.s.migrations[&mid].counters.leases_granted, 2);
    // Batches do not nest.
    let r =
        w.s.apply(1001, Command::Batch(vec![Command::Batch(vec![])]));
    assert!(
        matches!(&r, Response::Batch(v) if matches!(v[0], Response::Refused(_))),
        "{r:?}"
    );
}

#[test]
fn leases_of_lists_what_an_agent_holds() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 1, 1), (1, 1, 1), (2, 1, 1)]);
    let granted = w.lease(2, 10);
    let held = w.s.leases_of("src", 11);
    assert_eq!(held, granted);
    assert!(w.s.leases_of("dst", 11).is_empty());
    assert!(
        w.s.leases_of("src", 10 + TTL).is_empty(),
        "expired leases are not held"
    );
    let _ = mid;
}

#[test]
fn has_leasable_matches_what_a_lease_would_grant() {
    let mut w = World::new();
    w.migration(&[(0, 1, 1)]);
    assert!(w.s.has_leasable("src", 10));
    assert!(!w.s.has_leasable("dst", 10));
    let l = w.lease(1, 10);
    assert_eq!(l.len(), 1);
    assert!(!w.s.has_leasable("src", 11), "the only segment is leased");
    assert!(w.s.has_leasable("src", 10 + TTL), "its lease expired");
}

#[test]
fn a_source_renews_the_leases_it_still_holds_and_only_those() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 1), (1, 10, 1)]);
    let ls = w.lease(2, 10);
    let (a, b) = (&ls[0], &ls[1]);
    let renew = |agent: &str, now_ms, leases: Vec<(u64, u64, u64)>| Command::RenewLeases {
        agent: agent.into(),
        session: 1,
        leases,
        now_ms,
        ttl_ms: TTL,
    };
    // Half-way through its lease, the source renews segment 0 only.
    let r = w.apply(renew(
        "src",
        10 + TTL / 2,
        vec![(mid, a.segment_id, a.epoch)],
    ));
    assert_eq!(r, Response::Renewed(vec![true]));
    // Past the original expiry: segment 0 is still the source's, segment 1 is not.
    let later = 10 + TTL + 1;
    assert!(w
        .s
        .check_lease("dst", mid, a.segment_id, a.epoch, later)
        .is_ok());
    assert!(w
        .s
        .check_lease("dst", mid, b.segment_id, b.epoch, later)
        .is_err());
    // An expired lease, a wrong epoch, another agent, an unknown segment: not renewed.
    let r = w.apply(renew(
        "src",
        later,
        vec![
            (mid, b.segment_id, b.epoch),
            (mid, a.segment_id, a.epoch + 1),
            (mid, 99, a.epoch),
        ],
    ));
    assert_eq!(r, Response::Renewed(vec![false, false, false]));
    let r = w.apply(renew("dst", later, vec![(mid, a.segment_id, a.epoch)]));
    assert_eq!(r, Response::Renewed(vec![false]));
    // The expired one is leased again with a new epoch; the renewed one stays where it is.
    let again = w.lease(2, later);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].segment_id, b.segment_id);
    assert!(again[0].epoch > b.epoch);
    // The renewed lease still verifies.
    w.report(Role::Target, a, Ok([3; 32]));
    assert_eq!(
        w.report(Role::Source, a, Ok([3; 32])),
        ReportOutcome::Verified
    );
}

/// Issue 9, item 13: counts come from agents; no value of them may panic the state machine (a
/// panicking entry crashes every node again on replay) or wrap the totals.
#[test]
fn huge_segment_counts_are_refused_not_overflowed() {
    let mut w = World::new();
    let mid = create(&mut w);
    let big = |id: u64| SegmentReg {
        id,
        bytes: u64::MAX,
        files: u32::MAX,
        fingerprint: [id as u8; 32],
        piece_index: 0,
        piece_count: 0,
    };
    // One segment of u64::MAX bytes fits; a second one in the same batch does not: the whole
    // command is refused and nothing of it is applied.
    let r = register(&mut w, mid, vec![big(0), big(1)]);
    assert!(
        matches!(&r, Response::Refused(why) if why.contains("overflow")),
        "{r:?}"
    );
    assert_eq!(w.s.migrations[&mid].counters, Counters::default());
    assert!(w.s.segments.is_empty());
    // Alone it is accepted; then any further byte is refused.
    assert_eq!(register(&mut w, mid, vec![big(0)]), Response::Ok);
    assert_eq!(w.s.migrations[&mid].counters.bytes, u64::MAX);
    let r = register(&mut w, mid, vec![reg(1, 1, 1)]);
    assert!(matches!(r, Response::Refused(_)), "{r:?}");
    assert_eq!(w.s.migrations[&mid].counters.segments, 1);
    // Files: u32::MAX per segment cannot overflow u64 in any realistic batch, but saturate
    // regardless; replacing an unsent segment by a smaller one frees its count.
    let smaller = SegmentReg {
        fingerprint: [9; 32],
        ..reg(0, 5, 2)
    };
    assert_eq!(register(&mut w, mid, vec![smaller]), Response::Ok);
    assert_eq!(w.s.migrations[&mid].counters.bytes, 5);
    assert_eq!(w.s.migrations[&mid].counters.files, 2);
    // Filling the count exactly is fine.
    let rest = SegmentReg {
        bytes: u64::MAX - 5,
        ..big(1)
    };
    assert_eq!(register(&mut w, mid, vec![rest]), Response::Ok);
    assert_eq!(complete(&mut w, mid, 2), Response::Ok);

    // Leases and renewals at the end of time do not overflow their expiry.
    let ls = match w.apply(Command::LeaseSegments {
        agent: "src".into(),
        session: 1,
        max: 8,
        now_ms: u64::MAX - 1,
        ttl_ms: u64::MAX,
    }) {
        Response::Leases(l) => l,
        r => panic!("{r:?}"),
    };
    assert_eq!(ls.len(), 2);
    assert!(ls.iter().all(|l| l.expires_ms == u64::MAX));
    let r = w.apply(Command::RenewLeases {
        agent: "src".into(),
        session: 1,
        leases: vec![(mid, ls[0].segment_id, ls[0].epoch)],
        now_ms: u64::MAX - 1,
        ttl_ms: u64::MAX,
    });
    assert_eq!(r, Response::Renewed(vec![true]));
    // Verifying both segments reaches the totals exactly.
    for l in &ls {
        for role in [Role::Target, Role::Source] {
            w.report(role, l, Ok([7; 32]));
        }
    }
    let c = &w.s.migrations[&mid].counters;
    assert_eq!(c.verified_segments, 2);
    assert_eq!(c.verified_bytes, u64::MAX);
    assert_eq!(c.verified_files, 2 + u32::MAX as u64);
    assert_eq!(w.s.migrations[&mid].phase, Phase::Done);
}

/// Issue 9, item 12: a create whose answer was lost is retried with the same key; it must
/// answer the migration the first attempt made, not make a second. Names are unique.
#[test]
fn a_create_repeated_with_its_key_answers_the_same_migration_and_names_are_unique() {
    let mut w = World::new();
    let spec = spec("/d", 1);
    let create = |name: &str, key: &str, spec: &MigrationSpec| Command::CreateMigration {
        name: name.into(),
        idempotency_key: key.into(),
        spec: spec.clone(),
        uuid: ferry_common::ids::random_id(),
        throttle: String::new(),
        now_ms: 5,
    };
    let first = w.apply(create("nightly", "k-1", &spec));
    assert_eq!(first, Response::MigrationCreated(1));
    // The retry (same key, same request) is answered with the same migration.
    assert_eq!(w.apply(create("nightly", "k-1", &spec)), first);
    assert_eq!(w.s.migrations.len(), 1);
    // The same key with another request is an error, not a silent answer.
    let other = MigrationSpec {
        source_path: "/e".into(),
        ..spec.clone()
    };
    let r = w.apply(create("nightly-2", "k-1", &other));
    assert!(
        matches!(&r, Response::Refused(why) if why.contains("k-1") && why.contains("different")),
        "{r:?}"
    );
    // A new request (new key) with a name in use is refused, naming the existing migration.
    let r = w.apply(create("nightly", "k-2", &spec));
    assert!(
        matches!(&r, Response::Refused(why) if why.contains("named nightly already exists (id 1)")),
        "{r:?}"
    );
    assert_eq!(w.s.migrations.len(), 1);
    assert_eq!(
        w.apply(create("weekly", "k-2", &other)),
        Response::MigrationCreated(2)
    );
    assert_eq!(w.s.migration_named("weekly"), Some(2));
    // The indexes are derived: a state rebuilt from its records answers the same.
    let (a, m, s) = w.s.clone().into_parts();
    let mut rebuilt = State::from_parts(a, m, s);
    assert_eq!(rebuilt.migration_named("nightly"), Some(1));
    assert_eq!(
        rebuilt.apply(100, create("nightly", "k-1", &spec)),
        Response::MigrationCreated(1)
    );
    assert_eq!(rebuilt.migrations.len(), 2);
}

fn register_agent(
    w: &mut World,
    name: &str,
    addr: &str,
    session: u64,
    previous: u64,
    now_ms: u64,
) -> Response {
    w.apply(Command::RegisterAgent {
        name: name.into(),
        data_addr: addr.into(),
        session,
        previous,
        new_cluster_id: "cluster-1".into(),
        applies_owners: true,
        congestion: "bbr".into(),
        window_bytes: 64 << 20,
        target_root: String::new(),
        now_ms,
    })
}

/// Issue 9, item 10: a second process with the same identity used to take over the first's
/// leases silently. It is refused while the first one's session is live, and the refusal is
/// recorded for the operator and the running agent.
#[test]
fn a_second_process_is_refused_while_the_first_session_is_live() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 1), (1, 10, 1)]);
    // "src" runs with session 1 (registered at 0). Another process, session 2, at 1000.
    let r = register_agent(&mut w, "src", "", 2, 0, 1000);
    let Response::Conflict(why) = &r else {
        panic!("{r:?}")
    };
    assert!(why.contains("agent src is already running"), "{why}");
    let a = &w.s.agents["src"];
    assert_eq!(a.session, 1, "the running process keeps its session");
    assert!(a.conflict.contains("second process"), "{}", a.conflict);
    // The refused process gets nothing; the running one goes on.
    let stale_lease = |w: &mut World, session| {
        w.apply(Command::LeaseSegments {
            agent: "src".into(),
            session,
            max: 1,
            now_ms: 1000,
            ttl_ms: TTL,
        })
    };
    assert!(matches!(stale_lease(&mut w, 2), Response::Refused(_)));
    let Response::Leases(ls) = stale_lease(&mut w, 1) else {
        panic!()
    };
    let l = &ls[0];
    // Reports, renewals and heartbeats of a session that is not current are refused.
    let report = Command::ReportSegment {
        agent: "src".into(),
        session: 2,
        role: Role::Source,
        migration_id: mid,
        segment_id: l.segment_id,
        epoch: l.epoch,
        result: Ok([1; 32]),
        source_hash: None,
        retry_later: false,
        stale: false,
        permanent: false,
        now_ms: 1001,
    };
    assert!(matches!(w.apply(report), Response::Refused(_)));
    let renew = Command::RenewLeases {
        agent: "src".into(),
        session: 2,
        leases: vec![(mid, l.segment_id, l.epoch)],
        now_ms: 1001,
        ttl_ms: TTL,
    };
    assert!(matches!(w.apply(renew), Response::Refused(_)));
    let hb = |session, now_ms| Command::Heartbeat {
        name: "src".into(),
        session,
        now_ms,
    };
    assert!(matches!(w.apply(hb(2, 1001)), Response::Refused(_)));
    // The running one's heartbeats keep its session live past the timeout from its start.
    assert_eq!(w.apply(hb(1, SESSION_TIMEOUT_MS - 1)), Response::Ok);
    let r = register_agent(&mut w, "src", "", 2, 0, SESSION_TIMEOUT_MS + 5);
    assert!(matches!(r, Response::Conflict(_)), "{r:?}");

    // Once its heartbeats stop for the timeout (SIGKILL, a lost host), another process is
    // accepted and the old one's calls are refused from then on.
    let later = 2 * SESSION_TIMEOUT_MS;
    assert_eq!(
        register_agent(&mut w, "src", "", 2, 0, later),
        Response::Registered("cluster-1".into())
    );
    assert!(w.s.agents["src"].conflict.is_empty());
    assert!(matches!(w.apply(hb(1, later + 1)), Response::Refused(_)));
}

/// A restart within seconds of a SIGKILL: the new process holds the state directory's lock, so
/// it knows its predecessor's session ended and names it; it is accepted at once. A clean
/// shutdown ends the session, so any process is accepted at once after it.
#[test]
fn a_successor_or_a_process_after_a_clean_shutdown_is_accepted_at_once() {
    let mut w = World::new();
    // Session 1 of "src" is live at 10; process 3 names it as its predecessor.
    assert_eq!(
        register_agent(&mut w, "src", "", 3, 1, 10),
        Response::Registered("cluster-1".into())
    );
    assert_eq!(w.s.agents["src"].session, 3);
    // Naming a session that is not the current one proves nothing.
    let r = register_agent(&mut w, "src", "", 4, 1, 11);
    assert!(matches!(r, Response::Conflict(_)), "{r:?}");
    // The same process registering again (a retried call) is fine.
    assert_eq!(
        register_agent(&mut w, "src", "", 3, 1, 12),
        Response::Registered("cluster-1".into())
    );
    // Ending another session changes nothing; ending its own frees the name.
    let end = |session| Command::EndSession {
        name: "src".into(),
        session,
    };
    assert_eq!(w.apply(end(4)), Response::Ok);
    assert_eq!(w.s.agents["src"].session, 3);
    assert_eq!(w.apply(end(3)), Response::Ok);
    assert_eq!(w.s.agents["src"].session, 0);
    assert!(!w.s.agents["src"].live(13));
    assert_eq!(
        register_agent(&mut w, "src", "", 5, 0, 13),
        Response::Registered("cluster-1".into())
    );
    // A registration without a session is refused.
    assert!(matches!(
        register_agent(&mut w, "new", "", 0, 0, 14),
        Response::Refused(_)
    ));
}

/// Issue 9, item 9: a target that registered with no address (or one nobody can dial) is never
/// scheduled to, and the migration says why instead of stalling silently.
#[test]
fn nothing_is_scheduled_to_a_target_that_cannot_be_dialed_and_status_says_why() {
    for (addr, says) in [
        ("", "registered without a data address"),
        ("0.0.0.0:7401", "which no source can dial"),
        ("127.0.0.1:0", "which no source can dial"),
        ("dst.example:7401", "not an IP address and port"),
    ] {
        let mut w = World::new();
        assert_eq!(
            register_agent(&mut w, "dst", addr, 1, 0, 0),
            Response::Registered("cluster-1".into())
        );
        let mid = w.migration(&[(0, 10, 1)]);
        assert!(!w.s.has_leasable("src", 10), "{addr}");
        assert!(w.lease(8, 10).is_empty(), "{addr}");
        let why = w.s.blocker(mid, 10).expect("blocked");
        assert!(why.contains(says), "{addr}: {why}");
        assert!(w.s.agents["dst"].undialable().unwrap().contains(says));
    }
    // A target that shut down cleanly gets nothing until it is back.
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 1)]);
    assert_eq!(w.s.blocker(mid, 10), None);
    w.apply(Command::EndSession {
        name: "dst".into(),
        session: 1,
    });
    assert!(w.lease(8, 10).is_empty());
    assert!(w
        .s
        .blocker(mid, 10)
        .unwrap()
        .contains("agent dst was shut down"));
    assert_eq!(
        register_agent(&mut w, "dst", "127.0.0.1:9", 2, 0, 11),
        Response::Registered("cluster-1".into())
    );
    assert_eq!(w.lease(8, 12).len(), 1);
    // An agent not heard from for the session timeout is named in the status (but is still
    // scheduled to: it may only be slow to heartbeat).
    let why = w.s.blocker(mid, 12 + SESSION_TIMEOUT_MS).unwrap();
    assert!(why.contains("has not been heard from"), "{why}");
}

/// The first registration names the cluster; later ones (with other fresh ids) leave it, and
/// every registration answers it. A migration keeps the uuid it was created with; none is reused.
#[test]
fn the_first_registration_names_the_cluster_and_migrations_keep_their_uuid() {
    let mut w = World::new();
    assert_eq!(w.s.cluster_id, "cluster-1");
    let r = w.apply(Command::RegisterAgent {
        name: "late".into(),
        data_addr: String::new(),
        session: 9,
        previous: 0,
        new_cluster_id: "another".into(),
        applies_owners: true,
        congestion: "bbr".into(),
        window_bytes: 64 << 20,
        target_root: String::new(),
        now_ms: 5,
    });
    assert_eq!(r, Response::Registered("cluster-1".into()));
    assert_eq!(w.s.cluster_id, "cluster-1");
    let mid = w.migration(&[(0, 10, 1)]);
    let m = w.s.migrations[&mid].clone();
    assert_eq!(m.uuid.len(), 32);
    let r = w.apply(Command::CreateMigration {
        name: "other".into(),
        idempotency_key: String::new(),
        spec: m.spec,
        uuid: m.uuid,
        throttle: String::new(),
        now_ms: 6,
    });
    assert!(matches!(r, Response::Refused(_)), "{r:?}");
}

/// Issue 9, items 2 and 4: the scan's count of hardlinks is kept for the report, and a target
/// that cannot apply owners (not root) is named in the migration's notes.
#[test]
fn hardlinks_are_counted_and_owners_not_applied_are_noted() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 3)]);
    assert!(w.s.notes(mid).is_empty(), "World's target applies owners");
    w.apply(Command::RegisterAgent {
        name: "dst".into(),
        data_addr: "127.0.0.1:9".into(),
        session: 1,
        previous: 0,
        new_cluster_id: String::new(),
        applies_owners: false,
        congestion: "bbr".into(),
        window_bytes: 64 << 20,
        target_root: String::new(),
        now_ms: 2,
    });
    let notes = w.s.notes(mid);
    assert_eq!(notes.len(), 1);
    assert!(notes[0].contains("owners not kept"), "{notes:?}");
    assert!(!notes[0].contains("  "), "{notes:?}");
    // A target writing to an object store keeps owners as metadata, and says what it cannot
    // keep.
    w.apply(Command::RegisterAgent {
        name: "dst".into(),
        data_addr: "127.0.0.1:9".into(),
        session: 2,
        previous: 1,
        new_cluster_id: String::new(),
        applies_owners: false,
        congestion: "bbr".into(),
        window_bytes: 64 << 20,
        target_root: "s3://bucket/prefix".into(),
        now_ms: 3,
    });
    let notes = w.s.notes(mid);
    assert_eq!(notes.len(), 1);
    assert!(
        notes[0].contains("object store (s3://bucket/prefix)") && notes[0].contains("empty ones"),
        "{notes:?}"
    );

    let mut w = World::new();
    let spec = spec("/data", 100);
    let Response::MigrationCreated(mid) = w.apply(Command::CreateMigration {
        name: "links".into(),
        idempotency_key: String::new(),
        spec,
        uuid: ferry_common::ids::random_id(),
        throttle: String::new(),
        now_ms: 1,
    }) else {
        panic!()
    };
    let r = w.apply(Command::CompleteScan {
        agent: "src".into(),
        migration_id: mid,
        segments_total: 0,
        issues: vec![],
        issues_total: 0,
        hardlinks: 7,
        excluded: 0,
        root_error: String::new(),
        deleted: 0,
        now_ms: 2,
    });
    assert_eq!(r, Response::Ok);
    assert_eq!(w.s.migrations[&mid].hardlinks, 7);
}

/// Fails the lease `l` from the source at `now_ms` (an error that counts).
fn fail_at(w: &mut World, l: &Lease, now_ms: u64) -> ReportOutcome {
    w.report_at(
        Role::Source,
        l,
        Err("cannot read /data/f".into()),
        false,
        now_ms,
    )
}

#[test]
fn the_retry_delay_doubles_up_to_a_cap_with_a_jitter_every_replica_computes_alike() {
    let mut spread = BTreeSet::new();
    for n in 1..40u32 {
        let full = (RETRY_BASE_MS << (n - 1).min(20)).min(RETRY_CAP_MS);
        for sid in 0..50 {
            let d = retry_delay_ms(7, sid, n);
            assert!(
                (full / 2..=full).contains(&d),
                "attempt {n} segment {sid}: {d} ms is outside [{}, {full}]",
                full / 2
            );
            assert_eq!(
                d,
                retry_delay_ms(7, sid, n),
                "the same inputs, the same delay"
            );
            if n == 1 {
                spread.insert(d);
            }
        }
    }
    // Segments that failed together come back spread out, not all at once.
    assert!(spread.len() > 25, "only {} distinct delays", spread.len());
    assert!(retry_delay_ms(1, 1, u32::MAX) <= RETRY_CAP_MS);
}

#[test]
fn a_failed_segment_is_not_leased_again_before_its_backoff_ends() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 1)]);
    let l = w.lease(1, 10).pop().unwrap();
    assert_eq!(fail_at(&mut w, &l, 100), ReportOutcome::Failed);
    let seg = &w.s.segments[&(mid, 0)];
    assert_eq!(seg.state, SegState::Pending);
    let retry_at = seg.not_before_ms;
    assert_eq!(retry_at, 100 + retry_delay_ms(mid, 0, 1));
    // Polls before then find nothing (and so write no log entry), leases grant nothing.
    assert!(!w.s.has_leasable("src", retry_at - 1));
    assert!(w.lease(8, retry_at - 1).is_empty());
    assert!(w.s.has_leasable("src", retry_at));
    let again = w
        .lease(8, retry_at)
        .pop()
        .expect("leased once the backoff ended");
    assert_eq!((again.segment_id, again.attempts), (0, 1));
    assert_eq!(
        w.s.segments[&(mid, 0)].not_before_ms,
        0,
        "cleared when leased"
    );
    // The second failure waits longer (doubling, whatever the jitter).
    assert_eq!(fail_at(&mut w, &again, retry_at), ReportOutcome::Failed);
    let second = w.s.segments[&(mid, 0)].not_before_ms - retry_at;
    assert_eq!(second, retry_delay_ms(mid, 0, 2));
    assert!(second >= RETRY_BASE_MS);
}

#[test]
fn segments_in_backoff_do_not_hold_back_the_others() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 1, 1), (1, 1, 1), (2, 1, 1)]);
    let first = w.lease(1, 10).pop().unwrap();
    assert_eq!(first.segment_id, 0);
    fail_at(&mut w, &first, 10);
    let rest: Vec<u64> = w.lease(8, 11).iter().map(|l| l.segment_id).collect();
    assert_eq!(rest, vec![1, 2]);
    assert_eq!(w.s.segments[&(mid, 0)].state, SegState::Pending);
}

#[test]
fn a_segment_is_given_up_on_after_max_attempts_and_the_migration_ends_failed() {
    let mut w = World::new();
    let mid = w.migration_with(&[(0, 10, 1), (1, 20, 3)], 3);
    let mut now = 10;
    let leases = w.lease(8, now);
    let (good, bad) = (&leases[0], &leases[1]);
    w.report(Role::Target, good, Ok([1; 32]));
    assert_eq!(
        w.report(Role::Source, good, Ok([1; 32])),
        ReportOutcome::Verified
    );
    let mut l = bad.clone();
    for attempt in 1..=3u32 {
        assert_eq!(l.attempts, attempt - 1);
        let o = w.report_at(
            Role::Target,
            &l,
            Err(format!(
                "no space left on the target's device (try {attempt})"
            )),
            false,
            now,
        );
        if attempt < 3 {
            assert_eq!(o, ReportOutcome::Failed);
            assert_eq!(w.s.migrations[&mid].phase, Phase::Copying);
            now = w.s.segments[&(mid, 1)].not_before_ms;
            l = w.lease(8, now).pop().expect("retried after the backoff");
        } else {
            assert_eq!(o, ReportOutcome::GaveUp);
        }
    }
    let seg = &w.s.segments[&(mid, 1)];
    assert_eq!(seg.state, SegState::Failed);
    assert_eq!(seg.attempts, 3);
    assert_eq!(
        &*seg.last_error,
        "Target: no space left on the target's device (try 3)"
    );
    let m = &w.s.migrations[&mid];
    assert_eq!(m.phase, Phase::Failed);
    assert_eq!(m.finished_ms, now);
    let c = &m.counters;
    assert_eq!(
        (
            c.failed_segments,
            c.failed_bytes,
            c.failed_files,
            c.failed_attempts
        ),
        (1, 20, 3, 3)
    );
    assert_eq!((c.verified_segments, c.verified_files), (1, 1));
    // Terminal: nothing is leased or leasable any more, late reports are rejected, and the
    // migration is not "blocked" — it has ended.
    assert!(!w.s.has_leasable("src", u64::MAX / 2));
    assert!(w.lease(8, u64::MAX / 2).is_empty());
    assert_eq!(
        w.report(Role::Source, &l, Ok([1; 32])),
        ReportOutcome::Rejected
    );
    let err =
        w.s.check_lease("dst", mid, 1, l.epoch, now)
            .unwrap_err()
            .to_string();
    assert!(err.contains("given up on after 3 failed attempts"), "{err}");
    assert_eq!(w.s.blocker(mid, now), None);
    // It survives a reload: the state and its indexes come back the same.
    let (a, m, s) = w.s.clone().into_parts();
    let reloaded = State::from_parts(a, m, s);
    assert_eq!(reloaded.segments, w.s.segments);
    assert!(!reloaded.has_leasable("src", u64::MAX / 2));
}

#[test]
fn a_migration_ends_failed_only_once_its_scan_is_complete() {
    let mut w = World::new();
    let mid = create(&mut w);
    assert_eq!(register(&mut w, mid, vec![reg(0, 5, 1)]), Response::Ok);
    w.s.migrations.get_mut(&mid).unwrap().spec.max_attempts = 1;
    let l = w.lease(1, 10).pop().unwrap();
    assert_eq!(fail_at(&mut w, &l, 10), ReportOutcome::GaveUp);
    assert_eq!(w.s.migrations[&mid].phase, Phase::Copying, "more may come");
    assert_eq!(complete(&mut w, mid, 1), Response::Ok);
    assert_eq!(w.s.migrations[&mid].phase, Phase::Failed);
}

#[test]
fn failures_that_are_not_the_segments_back_off_without_counting() {
    let mut w = World::new();
    let mid = w.migration_with(&[(0, 10, 1)], 2);
    let mut now = 10;
    for round in 1..=20u32 {
        let l = w.lease(1, now).pop().expect("never given up on");
        assert_eq!(l.attempts, 0);
        let o = w.report_at(
            Role::Source,
            &l,
            Err("cannot connect to dst at 127.0.0.1:9: timed out".into()),
            true,
            now,
        );
        assert_eq!(o, ReportOutcome::Failed);
        let seg = &w.s.segments[&(mid, 0)];
        assert_eq!((seg.state, seg.attempts), (SegState::Pending, 0));
        // Backed off by how often it was leased: growing, and capped.
        let retry_at = seg.not_before_ms;
        assert_eq!(retry_at - now, retry_delay_ms(mid, 0, round));
        assert!(w.lease(1, retry_at - 1).is_empty());
        now = retry_at;
    }
    let m = &w.s.migrations[&mid];
    assert_eq!((m.phase, m.counters.failed_attempts), (Phase::Copying, 0));
    assert!(m.last_error.contains("cannot connect"));
}

/// Issue 9, item 5: a source root that cannot be scanned fails the migration with the reason
/// (it ended "done" with 0 of 0 segments), and so does anything the scan had to leave behind.
#[test]
fn a_missing_source_root_or_a_skipped_path_fails_the_migration() {
    let mut w = World::new();
    let complete = |mid, segments_total, issues: Vec<(String, String)>, root_error: &str| {
        Command::CompleteScan {
            agent: "src".into(),
            migration_id: mid,
            segments_total,
            issues_total: issues.len() as u64,
            issues,
            hardlinks: 0,
            excluded: 0,
            root_error: root_error.into(),
            deleted: 0,
            now_ms: 5,
        }
    };
    let create = |w: &mut World, name: &str| {
        let Response::MigrationCreated(mid) = w.apply(Command::CreateMigration {
            name: name.into(),
            idempotency_key: String::new(),
            spec: spec("/data", 100),
            uuid: ferry_common::ids::random_id(),
            throttle: String::new(),
            now_ms: 1,
        }) else {
            panic!()
        };
        mid
    };
    let missing = create(&mut w, "missing");
    let issue = vec![("/data".to_string(), "it does not exist".to_string())];
    assert_eq!(
        w.apply(complete(missing, 0, issue, "it does not exist")),
        Response::Ok
    );
    let m = &w.s.migrations[&missing];
    assert_eq!(m.phase, Phase::Failed);
    assert!(m.last_error.contains("/data") && m.last_error.contains("does not exist"));

    let fifo = create(&mut w, "fifo");
    let issue = vec![(
        "pipe".to_string(),
        "unsupported file type: named pipe".to_string(),
    )];
    w.apply(complete(fifo, 0, issue, ""));
    assert_eq!(w.s.migrations[&fifo].phase, Phase::Failed);

    // An empty tree that exists is a complete, verified copy of nothing.
    let empty = create(&mut w, "empty");
    w.apply(complete(empty, 0, vec![], ""));
    assert_eq!(w.s.migrations[&empty].phase, Phase::Done);
    // ... until a path it left behind is reported after all.
    w.apply(Command::SourceProblem {
        agent: "src".into(),
        migration_id: empty,
        error: String::new(),
        issues: vec![("gone".into(), "gone at copy time".into())],
    });
    assert_eq!(w.s.migrations[&empty].phase, Phase::Failed);
}

#[test]
fn throttles_are_kept_canonical_and_refused_when_unreadable_or_pointless() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 1, 1)]);
    let set = |w: &mut World, scope: ThrottleScope, t: &str| {
        w.apply(Command::SetThrottle {
            scope,
            throttle: t.into(),
        })
    };
    let m = ThrottleScope::Migration(mid);
    assert_eq!(set(&mut w, m.clone(), " 200 Mbit "), Response::Ok);
    assert_eq!(w.s.migrations[&mid].throttle, "200mbit");
    assert_eq!(
        set(&mut w, m.clone(), "else off, 09:00-18:00 100mbit"),
        Response::Ok
    );
    assert_eq!(
        w.s.migrations[&mid].throttle,
        "09:00-18:00 100mbit, else off"
    );
    assert_eq!(set(&mut w, m.clone(), "off"), Response::Ok);
    assert_eq!(w.s.migrations[&mid].throttle, "");
    assert!(matches!(set(&mut w, m, "fast"), Response::Refused(_)));
    assert!(matches!(
        set(&mut w, ThrottleScope::Migration(999), "1mbit"),
        Response::Refused(_)
    ));

    assert_eq!(
        set(&mut w, ThrottleScope::Agent("src".into()), "1gbit"),
        Response::Ok
    );
    assert_eq!(w.s.agents["src"].throttle, "1gbit");
    assert!(matches!(
        set(&mut w, ThrottleScope::Agent("nobody".into()), "1gbit"),
        Response::Refused(_)
    ));

    // Between rounds the throttle is kept for the next round; once cut over, there is
    // nothing left to throttle.
    let done = w.migration(&[]);
    assert!(w.s.migrations[&done].phase.finished());
    assert_eq!(
        set(&mut w, ThrottleScope::Migration(done), "1mbit"),
        Response::Ok
    );
    w.apply(Command::StartCutover {
        migration_id: done,
        now_ms: 5,
    });
    w.step(done, 1, step_run(Step::PreFreeze, 0, None), 6);
    w.round_scan(done, &[], 0, 7);
    w.step(done, 1, step_run(Step::VerifySource, 0, tree(1)), 8);
    w.step(done, 1, step_run(Step::VerifyTarget, 0, tree(1)), 9);
    w.step(done, 1, step_run(Step::Switch, 0, None), 10);
    assert_eq!(w.cutover(done).phase, CutoverPhase::Done);
    assert!(matches!(
        set(&mut w, ThrottleScope::Migration(done), "1mbit"),
        Response::Refused(why) if why.contains("cut over")
    ));
}

#[test]
fn a_migration_created_with_a_throttle_has_it_from_its_first_entry() {
    let mut w = World::new();
    let create = |w: &mut World, key: &str, throttle: &str| {
        w.apply(Command::CreateMigration {
            name: format!("m-{key}"),
            idempotency_key: key.into(),
            spec: spec("/d", 100),
            uuid: ferry_common::ids::random_id(),
            throttle: throttle.into(),
            now_ms: 1,
        })
    };
    let Response::MigrationCreated(id) = create(&mut w, "k1", "200 Mbit") else {
        panic!("not created")
    };
    assert_eq!(w.s.migrations[&id].throttle, "200mbit");
    // A repeated create answers the migration and leaves its throttle as it is now.
    w.apply(Command::SetThrottle {
        scope: ThrottleScope::Migration(id),
        throttle: "off".into(),
    });
    assert_eq!(
        create(&mut w, "k1", "200mbit"),
        Response::MigrationCreated(id)
    );
    assert_eq!(w.s.migrations[&id].throttle, "");
    // A throttle that does not parse creates nothing.
    let before = w.s.migrations.len();
    assert!(matches!(create(&mut w, "k2", "fast"), Response::Refused(_)));
    assert_eq!(w.s.migrations.len(), before);
}

impl World {
    /// The source's scan of the current round: `segs` (id, bytes, files), `deleted` names.
    fn round_scan(&mut self, mid: u64, segs: &[(u64, u64, u32)], deleted: u64, now_ms: u64) {
        let regs: Vec<SegmentReg> = segs.iter().map(|&(i, b, f)| reg(i, b, f)).collect();
        if !regs.is_empty() {
            assert_eq!(
                self.apply(Command::RegisterSegments {
                    agent: "src".into(),
                    migration_id: mid,
                    segments: regs,
                }),
                Response::Ok
            );
        }
        assert_eq!(
            self.apply(Command::CompleteScan {
                agent: "src".into(),
                migration_id: mid,
                segments_total: segs.len() as u64,
                issues: vec![],
                issues_total: 0,
                hardlinks: 0,
                excluded: 0,
                root_error: String::new(),
                deleted,
                now_ms,
            }),
            Response::Ok
        );
    }

    /// Leases and verifies everything leasable.
    fn verify_all(&mut self, now_ms: u64) {
        for l in self.lease(64, now_ms) {
            self.report_at(Role::Source, &l, Ok([3; 32]), false, now_ms);
            self.report_at(Role::Target, &l, Ok([3; 32]), false, now_ms);
        }
    }

    fn sync(&mut self, mid: u64, now_ms: u64) -> Response {
        self.apply(Command::StartRound {
            migration_id: mid,
            now_ms,
        })
    }
}

#[test]
fn sync_rounds_follow_an_ended_round_with_segment_ids_after_the_previous_rounds() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 1), (1, 20, 2)]);
    assert!(
        matches!(w.sync(mid, 2), Response::Refused(why) if why.contains("round 0")),
        "not while round 0 runs"
    );
    w.verify_all(3);
    assert_eq!(w.s.migrations[&mid].phase, Phase::Done);

    assert_eq!(w.sync(mid, 10), Response::Ok);
    let m = &w.s.migrations[&mid];
    assert_eq!((m.phase, m.scan_complete), (Phase::Syncing, false));
    assert_eq!((m.round().number, m.round().first_segment), (1, 2));
    assert!(
        matches!(w.sync(mid, 11), Response::Refused(_)),
        "one round at a time"
    );
    // Round 1 found one changed file and two deletions.
    w.round_scan(mid, &[(2, 5, 1)], 2, 12);
    assert_eq!(w.s.migrations[&mid].phase, Phase::Syncing);
    w.verify_all(13);
    let m = &w.s.migrations[&mid];
    assert_eq!(m.phase, Phase::Done);
    let r = m.round();
    assert_eq!(
        (r.outcome, r.started_ms, r.finished_ms, r.deleted),
        (Phase::Done, 10, 13, 2)
    );
    let d = r.delta(&m.counters);
    assert_eq!(
        (d.segments, d.bytes, d.files, d.verified_bytes),
        (1, 5, 1, 5)
    );
    assert_eq!(m.counters.verified_segments, 3, "totals count every round");

    // A round that finds nothing changed ends with its scan.
    assert_eq!(w.sync(mid, 20), Response::Ok);
    w.round_scan(mid, &[], 0, 21);
    let m = &w.s.migrations[&mid];
    assert_eq!(
        (m.phase, m.round().number, m.round().first_segment),
        (Phase::Done, 2, 3)
    );
    assert!(matches!(w.sync(4242, 22), Response::Refused(why) if why.contains("does not exist")));
}

#[test]
fn a_segment_whose_file_changed_is_left_to_the_next_round_which_starts_at_once() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 1), (1, 10, 1)]);
    let leases = w.lease(64, 2);
    let (a, b) = (&leases[0], &leases[1]);
    w.report_at(Role::Source, a, Ok([1; 32]), false, 3);
    w.report_at(Role::Target, a, Ok([1; 32]), false, 3);
    let stale = w.apply(Command::ReportSegment {
        agent: "src".into(),
        session: 1,
        role: Role::Source,
        migration_id: mid,
        segment_id: b.segment_id,
        epoch: b.epoch,
        result: Err("big changed since it was scanned".into()),
        source_hash: None,
        retry_later: false,
        stale: true,
        permanent: false,
        now_ms: 4,
    });
    assert!(matches!(stale, Response::Report(ReportOutcome::Stale, _)));
    let m = &w.s.migrations[&mid];
    assert_eq!(w.s.segments[&(mid, 1)].state, SegState::Stale);
    assert_eq!(m.counters.failed_attempts, 0, "not the segment's failure");
    assert_eq!(m.phase, Phase::Syncing, "the next round started by itself");
    assert_eq!(m.rounds[0].outcome, Phase::Syncing);
    assert_eq!((m.round().number, m.round().first_segment), (1, 2));
    // The source learns which segments of round 0 to send again.
    assert_eq!(w.s.unverified(mid, 0, 2), vec![1]);
    w.round_scan(mid, &[(2, 12, 1)], 0, 5);
    w.verify_all(6);
    assert_eq!(w.s.migrations[&mid].phase, Phase::Done);
}

#[test]
fn a_failed_round_is_followed_by_one_that_can_end_done() {
    let mut w = World::new();
    let mid = w.migration_with(&[(0, 10, 1)], 1);
    let l = w.lease(64, 2).pop().unwrap();
    assert_eq!(
        w.report_at(Role::Target, &l, Err("ENOSPC".into()), false, 3),
        ReportOutcome::GaveUp
    );
    assert_eq!(w.s.migrations[&mid].phase, Phase::Failed);
    assert_eq!(w.sync(mid, 10), Response::Ok);
    assert_eq!(w.s.unverified(mid, 0, 1), vec![0], "sent again by round 1");
    w.round_scan(mid, &[(1, 10, 1)], 0, 11);
    w.verify_all(12);
    let m = &w.s.migrations[&mid];
    assert_eq!(
        m.phase,
        Phase::Done,
        "round 0's failure is round 1's to send"
    );
    assert_eq!(m.round().delta(&m.counters).failed_segments, 0);
}

#[test]
fn only_the_most_recent_rounds_are_kept() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 1, 1)]);
    w.verify_all(2);
    for i in 0..(MAX_ROUNDS_KEPT as u64 + 5) {
        assert_eq!(w.sync(mid, 10 + i), Response::Ok);
        w.round_scan(mid, &[], 0, 10 + i);
    }
    let m = &w.s.migrations[&mid];
    assert_eq!(m.rounds.len(), MAX_ROUNDS_KEPT);
    assert_eq!(m.round().number as usize, MAX_ROUNDS_KEPT + 5);
    assert_eq!(m.phase, Phase::Done);
}

fn step_run(step: Step, exit_code: i32, tree: Option<TreeDigest>) -> StepRun {
    StepRun {
        step,
        agent: String::new(),
        command: format!("{} hook", step.as_str()),
        exit_code,
        output: "ok".into(),
        started_ms: 1,
        duration_ms: 2,
        recorded_ms: 0,
        tree,
    }
}

fn tree(digest: u8) -> Option<TreeDigest> {
    Some(TreeDigest {
        digest: [digest; 32],
        files: 3,
        bytes: 30,
        dirs: 1,
        symlinks: 0,
        error: String::new(),
        files_read: 3,
        bytes_read: 30,
        classes: vec![[digest; 32]; 4],
    })
}

impl World {
    fn step(&mut self, mid: u64, attempt: u32, run: StepRun, now_ms: u64) -> Response {
        let agent = if run.step.on_target() { "dst" } else { "src" };
        self.apply(Command::CutoverStep {
            agent: agent.into(),
            session: 1,
            migration_id: mid,
            attempt,
            run,
            now_ms,
        })
    }

    fn cutover(&self, mid: u64) -> &Cutover {
        self.s.migrations[&mid].cutover.as_ref().unwrap()
    }

    /// A migration whose bulk copy is done.
    fn done_migration(&mut self) -> u64 {
        let mid = self.migration(&[(0, 10, 1)]);
        self.verify_all(2);
        assert_eq!(self.s.migrations[&mid].phase, Phase::Done);
        mid
    }
}

#[test]
fn a_cutover_freezes_syncs_verifies_and_switches_each_step_once() {
    let mut w = World::new();
    let Response::MigrationCreated(planned) = w.apply(Command::CreateMigration {
        name: unique_name(),
        idempotency_key: String::new(),
        spec: spec("/data", 100),
        uuid: ferry_common::ids::random_id(),
        throttle: String::new(),
        now_ms: 1,
    }) else {
        panic!("not created")
    };
    assert!(
        matches!(w.apply(Command::StartCutover { migration_id: planned, now_ms: 2 }), Response::Refused(why) if why.contains("not been scanned")),
        "nothing to cut over to before a scan"
    );
    let mid = w.migration(&[(0, 10, 1)]);
    let start = |now_ms| Command::StartCutover {
        migration_id: mid,
        now_ms,
    };
    // Started while round 0 still runs: the freeze comes first, the final round after round 0.
    assert_eq!(w.apply(start(10)), Response::Ok);
    assert!(
        matches!(w.apply(start(10)), Response::Refused(_)),
        "one at a time"
    );
    assert_eq!(w.cutover(mid).phase, CutoverPhase::Freezing);
    assert_eq!(w.cutover(mid).pending_steps(), vec![Step::PreFreeze]);
    // Only the source freezes, and only once.
    let wrong = w.apply(Command::CutoverStep {
        agent: "dst".into(),
        session: 1,
        migration_id: mid,
        attempt: 1,
        run: step_run(Step::PreFreeze, 0, None),
        now_ms: 12,
    });
    assert!(matches!(wrong, Response::Refused(_)));
    assert_eq!(
        w.step(mid, 1, step_run(Step::PreFreeze, 0, None), 20),
        Response::Ok
    );
    assert_eq!(
        w.step(mid, 1, step_run(Step::PreFreeze, 0, None), 21),
        Response::Ok
    );
    let c = w.cutover(mid);
    assert_eq!(
        (c.phase, c.frozen_ms, c.final_round, c.runs.len()),
        (CutoverPhase::FinalSync, 20, 0, 1)
    );
    assert!(
        matches!(w.sync(mid, 21), Response::Refused(_)),
        "no round of its own"
    );
    w.verify_all(22);
    let m = &w.s.migrations[&mid];
    assert_eq!(
        (m.phase, m.round().number, w.cutover(mid).final_round),
        (Phase::Syncing, 1, 1)
    );
    // The final round: one changed file.
    w.round_scan(mid, &[(1, 5, 1)], 0, 22);
    w.verify_all(23);
    assert_eq!(w.cutover(mid).phase, CutoverPhase::Verifying);
    assert!(
        matches!(
            w.step(mid, 1, step_run(Step::Switch, 0, None), 24),
            Response::Refused(_)
        ),
        "no switch before the verification"
    );
    w.step(mid, 1, step_run(Step::VerifyTarget, 0, tree(7)), 25);
    assert_eq!(w.cutover(mid).pending_steps(), vec![Step::VerifySource]);
    w.step(mid, 1, step_run(Step::VerifySource, 0, tree(7)), 26);
    assert_eq!(w.cutover(mid).phase, CutoverPhase::Switching);
    w.step(mid, 1, step_run(Step::Switch, 0, None), 40);
    let c = w.cutover(mid);
    assert_eq!((c.phase, c.switched_ms), (CutoverPhase::Done, 40));
    assert_eq!(
        c.freeze_window_ms(99),
        20,
        "from the end of pre_freeze to the end of switch"
    );
    assert_eq!(c.runs.len(), 4);
    assert!(matches!(w.apply(start(50)), Response::Refused(why) if why.contains("cut over")));
    assert!(matches!(w.sync(mid, 50), Response::Refused(why) if why.contains("cut over")));
}

#[test]
fn a_failed_hook_a_changed_file_or_differing_trees_roll_back_and_a_new_attempt_may_follow() {
    // pre_freeze fails.
    let mut w = World::new();
    let mid = w.done_migration();
    w.apply(Command::StartCutover {
        migration_id: mid,
        now_ms: 5,
    });
    w.step(mid, 1, step_run(Step::PreFreeze, 3, None), 6);
    let c = w.cutover(mid);
    assert_eq!(c.phase, CutoverPhase::RollingBack);
    assert!(
        c.error.contains("pre_freeze on src exited 3"),
        "{}",
        c.error
    );
    assert_eq!(c.pending_steps(), vec![Step::Rollback]);
    w.step(mid, 1, step_run(Step::Rollback, 0, None), 7);
    assert_eq!(w.cutover(mid).phase, CutoverPhase::Aborted);
    assert_eq!(
        w.s.migrations[&mid].phase,
        Phase::Done,
        "the copy is as it was"
    );

    // Attempt 2: a file changes after the freeze; the final round leaves it stale.
    assert_eq!(
        w.apply(Command::StartCutover {
            migration_id: mid,
            now_ms: 8
        }),
        Response::Ok
    );
    assert_eq!(w.cutover(mid).attempt, 2);
    assert!(
        matches!(
            w.step(mid, 1, step_run(Step::PreFreeze, 0, None), 9),
            Response::Refused(_)
        ),
        "a report of the old attempt"
    );
    w.step(mid, 2, step_run(Step::PreFreeze, 0, None), 9);
    w.round_scan(mid, &[(1, 5, 1)], 0, 10);
    let l = w.lease(8, 11).pop().unwrap();
    w.apply(Command::ReportSegment {
        agent: "src".into(),
        session: 1,
        role: Role::Source,
        migration_id: mid,
        segment_id: l.segment_id,
        epoch: l.epoch,
        result: Err("changed".into()),
        source_hash: None,
        retry_later: false,
        stale: true,
        permanent: false,
        now_ms: 12,
    });
    let m = &w.s.migrations[&mid];
    assert_eq!(m.round().number, 1, "no round follows the final one");
    let c = w.cutover(mid);
    assert_eq!(c.phase, CutoverPhase::RollingBack);
    assert!(c.error.contains("changed after the freeze"), "{}", c.error);
    w.step(mid, 2, step_run(Step::Rollback, 1, None), 13);
    let c = w.cutover(mid);
    assert_eq!(c.phase, CutoverPhase::Aborted);
    assert!(c.error.contains("may still be frozen"), "{}", c.error);

    // Attempt 3 after a sync: the trees differ.
    assert_eq!(w.sync(mid, 20), Response::Ok);
    w.round_scan(mid, &[], 0, 21);
    w.apply(Command::StartCutover {
        migration_id: mid,
        now_ms: 22,
    });
    w.step(mid, 3, step_run(Step::PreFreeze, 0, None), 23);
    w.round_scan(mid, &[], 0, 24);
    assert_eq!(w.cutover(mid).phase, CutoverPhase::Verifying);
    w.step(mid, 3, step_run(Step::VerifySource, 0, tree(1)), 25);
    w.step(mid, 3, step_run(Step::VerifyTarget, 0, tree(2)), 26);
    let c = w.cutover(mid);
    assert_eq!(c.phase, CutoverPhase::RollingBack);
    assert!(
        c.error.contains("differs from the frozen source"),
        "{}",
        c.error
    );

    // An operator's abort, then a failing switch on attempt 4.
    w.step(mid, 3, step_run(Step::Rollback, 0, None), 27);
    w.apply(Command::StartCutover {
        migration_id: mid,
        now_ms: 30,
    });
    assert_eq!(
        w.apply(Command::AbortCutover { migration_id: mid }),
        Response::Ok
    );
    assert_eq!(w.cutover(mid).phase, CutoverPhase::RollingBack);
    assert_eq!(w.cutover(mid).error, "aborted by the operator");
    w.step(mid, 4, step_run(Step::Rollback, 0, None), 31);
    assert!(matches!(
        w.apply(Command::AbortCutover { migration_id: mid }),
        Response::Refused(_)
    ));
    w.apply(Command::StartCutover {
        migration_id: mid,
        now_ms: 40,
    });
    w.step(mid, 5, step_run(Step::PreFreeze, 0, None), 41);
    w.round_scan(mid, &[], 0, 42);
    w.step(mid, 5, step_run(Step::VerifySource, 0, tree(1)), 43);
    w.step(mid, 5, step_run(Step::VerifyTarget, 0, tree(1)), 44);
    w.step(mid, 5, step_run(Step::Switch, 9, None), 45);
    let c = w.cutover(mid);
    assert_eq!(c.phase, CutoverPhase::RollingBack);
    assert!(c.error.contains("switch on dst exited 9"), "{}", c.error);
    w.step(mid, 5, step_run(Step::Rollback, 0, None), 46);
    let c = w.cutover(mid);
    assert_eq!(
        (c.phase, c.ended_ms, c.freeze_window_ms(99)),
        (CutoverPhase::Aborted, 46, 5)
    );
}

#[test]
fn periodic_rounds_are_due_their_interval_after_the_last_round_ended() {
    let mut w = World::new();
    let mid = w.create(MigrationSpec {
        sync_every_ms: 1000,
        ..spec("/data", 100)
    });
    let plain = w.migration(&[]);
    assert!(
        w.s.rounds_due(10_000).is_empty(),
        "not before round 0 ended"
    );
    w.round_scan(mid, &[(0, 5, 1)], 0, 2);
    w.verify_all(500);
    let ended = w.s.migrations[&mid].round().finished_ms;
    assert_eq!(ended, 500);
    assert!(w.s.rounds_due(1499).is_empty());
    assert_eq!(
        w.s.rounds_due(1500),
        vec![mid],
        "not {plain}, which syncs when asked"
    );
    assert_eq!(w.sync(mid, 1500), Response::Ok);
    assert!(w.s.rounds_due(99_999).is_empty(), "not while a round runs");
    w.round_scan(mid, &[], 0, 1600);
    assert_eq!(w.s.rounds_due(2600), vec![mid]);
    // A running or finished cutover stops them.
    w.apply(Command::StartCutover {
        migration_id: mid,
        now_ms: 2600,
    });
    assert!(w.s.rounds_due(99_999).is_empty());
    w.apply(Command::AbortCutover { migration_id: mid });
    w.step(mid, 1, step_run(Step::Rollback, 0, None), 2700);
    assert_eq!(w.s.rounds_due(99_999), vec![mid], "again after a rollback");
}

impl World {
    /// Creates a migration of `spec` (a fresh name, at time 1); returns its id.
    fn create(&mut self, spec: MigrationSpec) -> u64 {
        match self.apply(Command::CreateMigration {
            name: unique_name(),
            idempotency_key: String::new(),
            spec,
            uuid: ferry_common::ids::random_id(),
            throttle: String::new(),
            now_ms: 1,
        }) {
            Response::MigrationCreated(mid) => mid,
            other => panic!("not created: {other:?}"),
        }
    }

    fn verify_full(&mut self, mid: u64, now_ms: u64) -> Response {
        self.apply(Command::StartVerification {
            migration_id: mid,
            now_ms,
        })
    }

    fn verification_step(&mut self, mid: u64, number: u32, run: StepRun, now_ms: u64) -> Response {
        let agent = if run.step.on_target() { "dst" } else { "src" };
        self.apply(Command::VerificationStep {
            agent: agent.into(),
            session: 1,
            migration_id: mid,
            number,
            run,
            now_ms,
        })
    }

    fn verification(&self, mid: u64) -> &FullVerification {
        self.s.migrations[&mid].verification.as_ref().unwrap()
    }
}

#[test]
fn a_full_verification_compares_both_passes_each_reported_once() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 1)]);
    assert!(
        matches!(w.verify_full(mid, 3), Response::Refused(why) if why.contains("round 0 is running")),
        "not while the bulk copy runs"
    );
    w.verify_all(4);
    assert_eq!(w.verify_full(mid, 5), Response::Ok);
    let v = w.verification(mid);
    assert_eq!((v.number, v.round, v.started_ms), (1, 0, 5));
    assert!(v.running());
    assert_eq!(
        v.pending_steps(),
        vec![Step::VerifySource, Step::VerifyTarget]
    );
    // Only the migration's own agents, only verification steps.
    let mut wrong = step_run(Step::VerifySource, 0, tree(7));
    wrong.step = Step::VerifyTarget;
    assert!(matches!(
        w.apply(Command::VerificationStep {
            agent: "src".into(),
            session: 1,
            migration_id: mid,
            number: 1,
            run: wrong,
            now_ms: 6,
        }),
        Response::Refused(why) if why.contains("does not do verify_target")
    ));
    assert!(matches!(
        w.verification_step(mid, 1, step_run(Step::Switch, 0, None), 6),
        Response::Refused(why) if why.contains("not a step of a verification")
    ));
    assert!(matches!(
        w.verification_step(mid, 2, step_run(Step::VerifySource, 0, tree(7)), 6),
        Response::Refused(_)
    ));
    assert_eq!(
        w.verification_step(mid, 1, step_run(Step::VerifySource, 0, tree(7)), 6),
        Response::Ok
    );
    // Repeated (a lost answer): accepted, changes nothing.
    assert_eq!(
        w.verification_step(mid, 1, step_run(Step::VerifySource, 0, tree(8)), 7),
        Response::Ok
    );
    assert_eq!(
        w.verification(mid).pending_steps(),
        vec![Step::VerifyTarget]
    );
    assert_eq!(
        w.verification_step(mid, 1, step_run(Step::VerifyTarget, 0, tree(7)), 8),
        Response::Ok
    );
    let v = w.verification(mid);
    assert!(v.equal(), "{v:?}");
    assert_eq!(v.ended_ms, 8);
    assert_eq!(
        v.source.as_ref().unwrap().tree,
        tree(7),
        "the first report counts"
    );

    // A second one finds the trees differ.
    assert_eq!(w.verify_full(mid, 10), Response::Ok);
    w.verification_step(mid, 2, step_run(Step::VerifySource, 0, tree(7)), 11);
    w.verification_step(mid, 2, step_run(Step::VerifyTarget, 0, tree(9)), 12);
    let v = w.verification(mid);
    assert!(!v.equal() && !v.running());
    assert!(
        v.error.contains("target differs from the source"),
        "{}",
        v.error
    );
    assert!(
        v.error
            .ends_with("; differ: regular files, directories, symlinks, hardlinks; equal: "),
        "{}",
        v.error
    );
    assert_eq!(
        w.s.migrations[&mid].phase,
        Phase::Done,
        "a verification changes nothing else"
    );

    // A live source: the source's pass names what changed since the round.
    assert_eq!(w.verify_full(mid, 20), Response::Ok);
    let mut live = tree(7).unwrap();
    live.error = "1 name(s) changed since the round's scan: d/b changed".into();
    w.verification_step(mid, 3, step_run(Step::VerifySource, 1, Some(live)), 21);
    w.verification_step(mid, 3, step_run(Step::VerifyTarget, 0, tree(7)), 22);
    let v = w.verification(mid);
    assert!(!v.equal());
    assert!(
        v.error
            .contains("source verification failed: 1 name(s) changed"),
        "{}",
        v.error
    );
}

#[test]
fn a_round_a_cutover_or_a_new_request_ends_a_running_verification() {
    let mut w = World::new();
    let mid = w.done_migration();
    assert_eq!(w.verify_full(mid, 5), Response::Ok);
    // Asked again (an agent died): the new one replaces it.
    assert_eq!(w.verify_full(mid, 6), Response::Ok);
    let v = w.verification(mid);
    assert_eq!(v.number, 2);
    assert!(matches!(
        w.verification_step(mid, 1, step_run(Step::VerifySource, 0, tree(7)), 7),
        Response::Refused(why) if why.contains("no verification 1")
    ));
    w.verification_step(mid, 2, step_run(Step::VerifySource, 0, tree(7)), 7);
    // A sync round changes the target under it: it ends without a verdict.
    assert_eq!(w.sync(mid, 8), Response::Ok);
    let v = w.verification(mid);
    assert!(!v.running() && !v.equal());
    assert!(v.error.contains("interrupted by round 1"), "{}", v.error);
    assert!(v.pending_steps().is_empty());
    assert!(matches!(
        w.verification_step(mid, 2, step_run(Step::VerifyTarget, 0, tree(7)), 9),
        Response::Refused(why) if why.contains("has ended")
    ));
    assert!(
        matches!(w.verify_full(mid, 9), Response::Refused(why) if why.contains("round 1 is running")),
    );
    w.round_scan(mid, &[(1, 5, 1)], 0, 10);
    w.verify_all(11);
    assert_eq!(w.s.migrations[&mid].phase, Phase::Done);
    assert_eq!(w.verify_full(mid, 12), Response::Ok);
    assert_eq!(w.verification(mid).round, 1);
    // A cutover verifies in full itself.
    assert_eq!(
        w.apply(Command::StartCutover {
            migration_id: mid,
            now_ms: 13
        }),
        Response::Ok
    );
    let v = w.verification(mid);
    assert!(
        v.error.contains("interrupted by cutover attempt 1"),
        "{}",
        v.error
    );
    assert!(
        matches!(w.verify_full(mid, 14), Response::Refused(why) if why.contains("cutover")),
        "not while a cutover runs"
    );
}

#[test]
fn a_fast_enough_sync_round_starts_the_cutover_by_itself_once() {
    let mut w = World::new();
    let mid = w.create(MigrationSpec {
        auto_cutover_below_ms: 1000,
        ..spec("/data", 100)
    });
    // Round 0 is the bulk copy, however quick: no cutover.
    w.round_scan(mid, &[(0, 5, 1)], 0, 2);
    w.verify_all(3);
    assert_eq!(w.s.migrations[&mid].phase, Phase::Done);
    assert!(w.s.migrations[&mid].cutover.is_none());
    // Round 1 takes 2 s: too slow.
    assert_eq!(w.sync(mid, 10), Response::Ok);
    w.round_scan(mid, &[(1, 5, 1)], 0, 11);
    w.verify_all(2010);
    assert!(w.s.migrations[&mid].cutover.is_none());
    // Round 2 finds nothing changed and ends at once: the cutover starts when it ends.
    assert_eq!(w.sync(mid, 4000), Response::Ok);
    w.round_scan(mid, &[], 0, 4500);
    let c = w.cutover(mid);
    assert_eq!(
        (c.attempt, c.phase, c.started_ms),
        (1, CutoverPhase::Freezing, 4500)
    );
    assert!(c.trigger.contains("round 2 took 0.5s"), "{}", c.trigger);
    // It rolls back; the next fast round does not try again: the operator decides.
    w.step(mid, 1, step_run(Step::PreFreeze, 1, None), 4600);
    w.step(mid, 1, step_run(Step::Rollback, 0, None), 4700);
    assert_eq!(w.cutover(mid).phase, CutoverPhase::Aborted);
    assert_eq!(w.sync(mid, 5000), Response::Ok);
    w.round_scan(mid, &[(2, 5, 1)], 0, 5001);
    w.verify_all(5002);
    assert_eq!(w.s.migrations[&mid].phase, Phase::Done);
    assert_eq!(w.cutover(mid).attempt, 1);
    assert_eq!(w.cutover(mid).phase, CutoverPhase::Aborted);
}

#[test]
fn a_mismatch_says_which_class_of_names_differs() {
    let source = tree(1).unwrap();
    let mut target = source.clone();
    target.digest = [2; 32];
    target.classes[2] = [2; 32];
    let why = TreeDigest::mismatch(&source, &target).unwrap();
    assert!(
        why.ends_with("; differ: symlinks; equal: regular files, directories, hardlinks"),
        "{why}"
    );
    // An agent that sent no class digests: the difference is not placed.
    target.classes.clear();
    let why = TreeDigest::mismatch(&source, &target).unwrap();
    assert!(
        why.ends_with("3 files, 30 bytes, 1 directories, 0 symlinks"),
        "{why}"
    );
    assert_eq!(TreeDigest::mismatch(&source, &source.clone()), None);
}

impl World {
    /// Cuts migration `mid` (whose last round is done) over: every step succeeds.
    fn cut_over(&mut self, mid: u64, now_ms: u64) {
        let attempt = self.s.migrations[&mid]
            .cutover
            .as_ref()
            .map_or(1, |c| c.attempt + 1);
        assert_eq!(
            self.apply(Command::StartCutover {
                migration_id: mid,
                now_ms
            }),
            Response::Ok
        );
        self.step(mid, attempt, step_run(Step::PreFreeze, 0, None), now_ms + 1);
        self.round_scan(mid, &[], 0, now_ms + 2);
        self.step(
            mid,
            attempt,
            step_run(Step::VerifySource, 0, tree(7)),
            now_ms + 3,
        );
        self.step(
            mid,
            attempt,
            step_run(Step::VerifyTarget, 0, tree(7)),
            now_ms + 4,
        );
        self.step(mid, attempt, step_run(Step::Switch, 0, None), now_ms + 5);
        assert_eq!(self.cutover(mid).phase, CutoverPhase::Done);
    }

    /// `agent`'s scan of `mid`'s current round found nothing to send.
    fn empty_scan_by(&mut self, agent: &str, mid: u64, now_ms: u64) -> Response {
        self.apply(Command::CompleteScan {
            agent: agent.into(),
            migration_id: mid,
            segments_total: 0,
            issues: vec![],
            issues_total: 0,
            hardlinks: 0,
            excluded: 0,
            root_error: String::new(),
            deleted: 0,
            now_ms,
        })
    }

    fn register_src(&mut self, data_addr: &str, target_root: &str) {
        self.apply(Command::RegisterAgent {
            name: "src".into(),
            session: 1,
            previous: 0,
            data_addr: data_addr.into(),
            new_cluster_id: String::new(),
            applies_owners: true,
            congestion: "bbr".into(),
            window_bytes: 64 << 20,
            target_root: target_root.into(),
            now_ms: 0,
        });
    }
}

#[test]
fn a_fallback_is_the_migration_in_reverse_from_the_switch_and_finalize_closes_it() {
    let mut w = World::new();
    let mid = w.done_migration();
    let fallback = |w: &mut World, now_ms| {
        w.apply(Command::StartFallback {
            migration_id: mid,
            uuid: ferry_common::ids::random_id(),
            now_ms,
        })
    };
    assert!(
        matches!(fallback(&mut w, 10), Response::Refused(why) if why.contains("has not been cut over"))
    );
    assert!(
        matches!(w.apply(Command::Finalize { migration_id: mid, now_ms: 10 }), Response::Refused(why) if why.contains("no fallback window"))
    );
    w.cut_over(mid, 20);
    // The old source's agent must be able to receive, below a root that holds the old source.
    assert!(
        matches!(fallback(&mut w, 30), Response::Refused(why) if why.contains("agent src cannot receive"))
    );
    w.register_src("127.0.0.1:8", "/srv");
    assert!(
        matches!(fallback(&mut w, 31), Response::Refused(why) if why.contains("/data is not below agent src's root /srv"))
    );
    w.register_src("127.0.0.1:8", "/");
    let Response::MigrationCreated(rid) = fallback(&mut w, 32) else {
        panic!("no fallback")
    };
    let (m, r) = (&w.s.migrations[&mid], &w.s.migrations[&rid]);
    assert_eq!(m.fallback, rid);
    assert_eq!(r.name, format!("{}-fallback", m.name));
    let s = &r.spec;
    assert_eq!(
        (
            s.source_agent.as_str(),
            s.source_path.as_str(),
            s.target_agent.as_str(),
            s.target_path.as_str()
        ),
        ("dst", "/cloud", "src", "data")
    );
    assert_eq!((s.baseline.as_str(), s.fallback_of), (m.uuid.as_str(), mid));
    assert_eq!(r.phase, Phase::Planned);
    assert!(
        matches!(fallback(&mut w, 33), Response::Refused(why) if why.contains("already has its fallback"))
    );
    // Not while the reverse migration's round runs.
    assert!(
        matches!(w.apply(Command::Finalize { migration_id: mid, now_ms: 34 }), Response::Refused(why) if why.contains("round 0 of its fallback"))
    );
    assert_eq!(w.empty_scan_by("dst", rid, 35), Response::Ok);
    assert_eq!(w.s.migrations[&rid].phase, Phase::Done);
    assert_eq!(
        w.apply(Command::Finalize {
            migration_id: mid,
            now_ms: 40
        }),
        Response::Ok
    );
    assert_eq!(
        w.apply(Command::Finalize {
            migration_id: mid,
            now_ms: 41
        }),
        Response::Ok,
        "again: the same"
    );
    assert_eq!(
        (
            w.s.migrations[&mid].finalized_ms,
            w.s.migrations[&rid].finalized_ms
        ),
        (40, 40)
    );
    // Closed: the reverse migration syncs no more, cuts nothing over, and no fallback follows.
    assert!(matches!(w.sync(rid, 50), Response::Refused(why) if why.contains("finalized")));
    assert!(
        matches!(w.apply(Command::StartCutover { migration_id: rid, now_ms: 50 }), Response::Refused(why) if why.contains("finalized"))
    );
    assert!(matches!(fallback(&mut w, 50), Response::Refused(why) if why.contains("finalized")));
}

#[test]
fn a_reverse_cutover_brings_the_old_site_back_and_there_is_then_no_window_to_close() {
    let mut w = World::new();
    let mid = w.done_migration();
    w.cut_over(mid, 20);
    w.register_src("127.0.0.1:8", "/");
    let Response::MigrationCreated(rid) = w.apply(Command::StartFallback {
        migration_id: mid,
        uuid: ferry_common::ids::random_id(),
        now_ms: 30,
    }) else {
        panic!("no fallback")
    };
    w.empty_scan_by("dst", rid, 31);
    // The reverse migration's cutover: its source is the new site's agent.
    assert_eq!(
        w.apply(Command::StartCutover {
            migration_id: rid,
            now_ms: 40
        }),
        Response::Ok
    );
    let pre_freeze = StepRun {
        ..step_run(Step::PreFreeze, 0, None)
    };
    assert_eq!(
        w.apply(Command::CutoverStep {
            agent: "dst".into(),
            session: 1,
            migration_id: rid,
            attempt: 1,
            run: pre_freeze,
            now_ms: 41,
        }),
        Response::Ok,
        "the new site freezes"
    );
    assert_eq!(
        w.s.migrations[&rid].cutover.as_ref().unwrap().phase,
        CutoverPhase::FinalSync
    );
    assert!(
        matches!(w.apply(Command::Finalize { migration_id: mid, now_ms: 42 }), Response::Refused(why) if why.contains("cutover of its fallback"))
    );
    // Its final round (nothing changed), both trees, and the old site's switch.
    w.empty_scan_by("dst", rid, 43);
    for (agent, step) in [
        ("dst", Step::VerifySource),
        ("src", Step::VerifyTarget),
        ("src", Step::Switch),
    ] {
        let run = step_run(step, 0, if step == Step::Switch { None } else { tree(7) });
        assert_eq!(
            w.apply(Command::CutoverStep {
                agent: agent.into(),
                session: 1,
                migration_id: rid,
                attempt: 1,
                run,
                now_ms: 44,
            }),
            Response::Ok,
            "{agent} {}",
            step.as_str()
        );
    }
    assert_eq!(
        w.s.migrations[&rid].cutover.as_ref().unwrap().phase,
        CutoverPhase::Done,
        "the old site is live again"
    );
    assert!(
        matches!(w.apply(Command::Finalize { migration_id: mid, now_ms: 45 }), Response::Refused(why) if why.contains("switched back to the old site"))
    );
}

#[test]
fn the_data_paths_commands_do_not_count_as_changes_of_what_agents_are_asked_to_do() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 1)]);
    let before = w.s.work_changes.0;
    let leases = w.lease(4, 2);
    w.report(Role::Source, &leases[0], Ok([1; 32]));
    assert_eq!(w.s.work_changes.0, before, "leases and reports");
    w.report(Role::Target, &leases[0], Ok([1; 32]));
    assert_eq!(w.s.migrations[&mid].phase, Phase::Done);
    assert_eq!(
        w.s.work_changes.0, before,
        "even the report that ends the round"
    );
    assert_eq!(w.sync(mid, 10), Response::Ok);
    assert_eq!(w.s.work_changes.0, before + 1, "a sync round");
}

/// A migration from an object store runs its bulk copy; rounds, cutovers, full verifications
/// and fallbacks are refused, saying why.
#[test]
fn a_migration_from_an_object_store_refuses_what_it_cannot_do_yet() {
    let mut w = World::new();
    let mid = w.create(spec("s3://bucket/prefix", 100));
    w.round_scan(mid, &[(0, 10, 1)], 0, 1);
    w.verify_all(3);
    assert_eq!(w.s.migrations[&mid].phase, Phase::Done);
    for r in [
        w.sync(mid, 10),
        w.apply(Command::StartCutover {
            migration_id: mid,
            now_ms: 11,
        }),
        w.apply(Command::StartVerification {
            migration_id: mid,
            now_ms: 12,
        }),
    ] {
        assert!(
            matches!(&r, Response::Refused(why) if why.contains("object store")),
            "{r:?}"
        );
    }

    // An object that changed during the copy ends it failed, not in a next round.
    let mut w = World::new();
    let mid = w.create(spec("s3://bucket/prefix", 100));
    w.round_scan(mid, &[(0, 10, 1), (1, 10, 1)], 0, 1);
    let leases = w.lease(2, 3);
    w.report_at(Role::Source, &leases[0], Ok([3; 32]), false, 3);
    w.report_at(Role::Target, &leases[0], Ok([3; 32]), false, 3);
    w.apply(Command::ReportSegment {
        agent: "src".into(),
        session: 1,
        role: Role::Source,
        migration_id: mid,
        segment_id: leases[1].segment_id,
        epoch: leases[1].epoch,
        result: Err("data/b changed in the store since it was scanned".into()),
        source_hash: None,
        retry_later: false,
        stale: true,
        permanent: false,
        now_ms: 4,
    });
    let m = &w.s.migrations[&mid];
    assert_eq!((m.phase, m.round().number), (Phase::Failed, 0));
}

#[test]
fn an_agent_is_asked_only_about_the_migrations_it_is_the_source_of() {
    let mut w = World::new();
    for (name, addr) in [("src2", ""), ("dst2", "127.0.0.1:10")] {
        let root = if addr.is_empty() { "" } else { "/cloud2" };
        register_target(&mut w, name, addr, root, 0);
    }
    let mut ids = Vec::new();
    for i in 0..6 {
        let (source, target) = if i % 3 == 0 {
            ("src2", "dst2")
        } else {
            ("src", "dst")
        };
        ids.push(w.create(MigrationSpec {
            source_agent: source.into(),
            target_agent: target.into(),
            ..spec("/data", 100)
        }));
    }
    let gone = ids[3];
    assert_eq!(
        w.apply(Command::DeleteMigration {
            migration_id: gone,
            force: true,
        }),
        Response::Ok
    );
    for agent in ["src", "src2", "dst", "dst2", "nobody"] {
        let listed: Vec<u64> = w.s.sourced_by(agent).map(|m| m.id).collect();
        let scanned: Vec<u64> =
            w.s.migrations
                .values()
                .filter(|m| m.spec.source_agent == agent)
                .map(|m| m.id)
                .collect();
        assert_eq!(listed, scanned, "{agent}");
        let listed: Vec<u64> = w.s.sourced_or_targeted_by(agent).map(|m| m.id).collect();
        let scanned: Vec<u64> =
            w.s.migrations
                .values()
                .filter(|m| m.spec.source_agent == agent || m.spec.target_agent == agent)
                .map(|m| m.id)
                .collect();
        assert_eq!(listed, scanned, "{agent}");
    }
    assert_eq!(
        w.s.sourced_by("src2").map(|m| m.id).collect::<Vec<_>>(),
        vec![ids[0]]
    );
    let mut rebuilt = w.s.clone();
    rebuilt.rebuild_indexes();
    assert_eq!(
        (&rebuilt.by_source, &rebuilt.by_target),
        (&w.s.by_source, &w.s.by_target)
    );
    // An agent whose last migration is deleted leaves no entry behind, as a rebuild has none.
    assert_eq!(
        w.apply(Command::DeleteMigration {
            migration_id: ids[0],
            force: true,
        }),
        Response::Ok
    );
    assert_eq!(w.s.sourced_or_targeted_by("src2").count(), 0);
    assert_eq!(w.s.sourced_or_targeted_by("dst2").count(), 0);
    assert!(!w.s.by_source.contains_key("src2") && !w.s.by_target.contains_key("dst2"));
    let mut rebuilt = w.s.clone();
    rebuilt.rebuild_indexes();
    assert_eq!(
        (&rebuilt.by_source, &rebuilt.by_target),
        (&w.s.by_source, &w.s.by_target)
    );
}

#[test]
fn a_deleted_migration_leaves_no_segment_or_index_behind_and_its_agents_forget_it() {
    let mut w = World::new();
    let running = w.migration(&[(0, 10, 1), (1, 10, 1), (2, 10, 1)]);
    let name = w.s.migrations[&running].name.clone();
    let uuid = w.s.migrations[&running].uuid.clone();
    let leased = w.lease(1, 2);
    assert_eq!(leased.len(), 1);
    let delete = |migration_id, force| Command::DeleteMigration {
        migration_id,
        force,
    };
    assert!(
        matches!(w.apply(delete(running, false)), Response::Refused(why) if why.contains("--force")),
        "a copying migration is deleted only with --force"
    );
    assert!(w.s.migrations.contains_key(&running), "nothing changed");
    assert!(w.s.agents["src"].forget.is_empty());

    // A cutover is never cut short, force or not.
    let cutting = w.done_migration();
    assert_eq!(
        w.apply(Command::StartCutover {
            migration_id: cutting,
            now_ms: 3
        }),
        Response::Ok
    );
    assert!(
        matches!(w.apply(delete(cutting, true)), Response::Refused(why) if why.contains("--abort")),
        "a running cutover refuses"
    );

    assert_eq!(w.apply(delete(running, true)), Response::Ok);
    assert!(!w.s.migrations.contains_key(&running));
    assert!(!w.s.segments.keys().any(|(m, _)| m == running));
    assert!(w.s.dirty.migrations.contains(&running));
    assert_eq!(
        w.s.dirty
            .segments
            .iter()
            .filter(|&&(m, _)| m == running)
            .count(),
        3,
        "each removed segment is removed from the store too"
    );
    // The derived indexes are as a rebuild from the stored records makes them (an empty set
    // stands for none).
    let mut rebuilt = w.s.clone();
    rebuilt.rebuild_indexes();
    fn held<T: Clone>(m: &BTreeMap<u64, BTreeSet<T>>) -> BTreeMap<u64, BTreeSet<T>> {
        m.iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }
    let pending = |m: &BTreeMap<u64, IdSet>| -> BTreeMap<u64, IdSet> {
        m.iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    };
    assert_eq!(
        (
            pending(&rebuilt.pending),
            held(&rebuilt.waiting),
            held(&rebuilt.leased)
        ),
        (pending(&w.s.pending), held(&w.s.waiting), held(&w.s.leased))
    );
    assert_eq!(
        (
            &rebuilt.by_name,
            &rebuilt.by_key,
            &rebuilt.by_source,
            &rebuilt.by_target
        ),
        (&w.s.by_name, &w.s.by_key, &w.s.by_source, &w.s.by_target)
    );
    assert!(
        w.s.sourced_by("src").all(|m| m.id != running),
        "its source is no longer asked to send it"
    );
    for agent in ["src", "dst"] {
        assert_eq!(
            w.s.agents[agent].forget,
            std::slice::from_ref(&uuid),
            "{agent}"
        );
    }
    // Its lease is gone with it; its name is free again.
    assert!(w.lease(8, 4).is_empty());
    assert!(matches!(
        w.apply(Command::RenewLeases {
            agent: "src".into(),
            session: 1,
            leases: vec![(leased[0].migration_id, leased[0].segment_id, leased[0].epoch)],
            now_ms: 4,
            ttl_ms: TTL,
        }),
        Response::Renewed(r) if r == [false]
    ));
    assert!(matches!(
        w.apply(Command::CreateMigration {
            name,
            idempotency_key: String::new(),
            spec: spec("/data", 100),
            uuid: ferry_common::ids::random_id(),
            throttle: String::new(),
            now_ms: 5,
        }),
        Response::MigrationCreated(_)
    ));
    assert!(
        matches!(w.apply(delete(running, true)), Response::Refused(why) if why.contains("does not exist"))
    );

    // A finished migration needs no force; an agent's list keeps the newest FORGET_MAX.
    let done = w.done_migration();
    assert_eq!(w.apply(delete(done, false)), Response::Ok);
    assert_eq!(w.s.agents["dst"].forget.len(), 2);
    let mut last = done;
    for _ in 0..FORGET_MAX {
        let m = w.done_migration();
        assert!(
            m > last,
            "an id is never given twice, even after the newest was deleted"
        );
        last = m;
        assert_eq!(w.apply(delete(m, false)), Response::Ok);
    }
    assert_eq!(w.s.agents["dst"].forget.len(), FORGET_MAX);
    assert!(
        !w.s.agents["dst"].forget.contains(&uuid),
        "the oldest went first"
    );
}

#[test]
fn operator_calls_are_recorded_with_their_outcome_in_a_hash_chain() {
    let mut w = World::new();
    let note = |call: &str| AuditNote {
        at_ms: 5,
        who: "otto".into(),
        role: "operator".into(),
        from: "10.0.0.1:5000".into(),
        call: call.into(),
        what: String::new(),
    };
    let created = w.apply(Command::Audited {
        note: note("CreateMigration"),
        cmd: Box::new(Command::CreateMigration {
            name: "audited".into(),
            idempotency_key: String::new(),
            spec: spec("/data", 100),
            uuid: ferry_common::ids::random_id(),
            throttle: String::new(),
            now_ms: 5,
        }),
    });
    let Response::MigrationCreated(mid) = created else {
        panic!("{created:?}")
    };
    assert!(w.s.migrations.contains_key(&mid), "applied as if alone");
    let refused = w.apply(Command::Audited {
        note: note("DeleteMigration"),
        cmd: Box::new(Command::DeleteMigration {
            migration_id: 99,
            force: false,
        }),
    });
    assert!(matches!(refused, Response::Refused(_)));
    w.apply(Command::Audit {
        note: note("AddNode"),
        decision: "denied: this call needs the admin role".into(),
    });
    let nested = w.apply(Command::Audited {
        note: note("Batch"),
        cmd: Box::new(Command::Batch(vec![])),
    });
    assert!(matches!(nested, Response::Refused(_)));

    let records: Vec<AuditRecord> = w.s.audit.values().cloned().collect();
    let decisions: Vec<&str> = records.iter().map(|r| r.decision.as_str()).collect();
    assert_eq!(decisions[0], "ok");
    assert!(decisions[1].starts_with("refused: migration 99 does not exist"));
    assert_eq!(decisions[2], "denied: this call needs the admin role");
    assert_eq!(
        records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(records[0].prev, [0; 32]);
    assert_eq!(verify_chain(&records, Some([0; 32])), Ok(()));
    assert_eq!(w.s.dirty.audit.len(), 4, "each record is stored");
    // A record changed, or one taken out, breaks the chain where it happened.
    let mut changed = records.clone();
    changed[1].decision = "ok".into();
    assert_eq!(verify_chain(&changed, Some([0; 32])), Err(2));
    let mut removed = records.clone();
    removed.remove(1);
    assert_eq!(verify_chain(&removed, Some([0; 32])), Err(3));
}

#[test]
fn a_segment_refused_for_good_is_given_up_at_once() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 1), (1, 10, 1)]);
    let leases = w.lease(8, 10);
    let report = |l: &Lease, permanent| Command::ReportSegment {
        agent: "src".into(),
        session: 1,
        role: Role::Source,
        migration_id: l.migration_id,
        segment_id: l.segment_id,
        epoch: l.epoch,
        result: Err("target dst refused the segment: bad entry x".into()),
        source_hash: None,
        retry_later: false,
        stale: false,
        permanent,
        now_ms: 11,
    };
    let r = w.apply(report(&leases[0], true));
    assert!(
        matches!(r, Response::Report(ReportOutcome::GaveUp, _)),
        "{r:?}"
    );
    let seg = &w.s.segments[&(mid, leases[0].segment_id)];
    assert_eq!((seg.state, seg.attempts), (SegState::Failed, 1));
    // An ordinary failure still waits out a backoff with attempts left.
    let r = w.apply(report(&leases[1], false));
    assert!(
        matches!(r, Response::Report(ReportOutcome::Failed, _)),
        "{r:?}"
    );
    assert_eq!(w.s.migrations[&mid].counters.failed_segments, 1);
}

fn assess(paths: &[&str]) -> JobKind {
    JobKind::Assess {
        paths: paths.iter().map(|p| p.to_string()).collect(),
        excludes: Vec::new(),
    }
}

fn probe_of(peer: &str) -> JobKind {
    JobKind::Probe {
        peer: peer.into(),
        seconds: 10,
        streams: 4,
        congestions: vec!["bbr".into()],
    }
}

impl World {
    fn start_job(&mut self, agent: &str, kind: JobKind, now_ms: u64) -> Response {
        self.apply(Command::StartJob {
            agent: agent.into(),
            kind,
            now_ms,
        })
    }

    fn report_job(&mut self, agent: &str, id: u64, update: JobUpdate, now_ms: u64) -> Response {
        self.apply(Command::ReportJob {
            agent: agent.into(),
            session: 1,
            id,
            update,
            now_ms,
        })
    }
}

#[test]
fn a_job_goes_to_its_agent_and_a_probe_to_its_peer_too_until_it_ends() {
    let mut w = World::new();
    assert_eq!(
        w.start_job("src", assess(&["/data"]), 1000),
        Response::JobStarted(1)
    );
    assert_eq!(
        w.start_job("src", probe_of("dst"), 1000),
        Response::JobStarted(2)
    );
    let parts = |w: &World, agent: &str| -> Vec<(u64, JobPart)> {
        w.s.jobs_for(agent, 2000)
            .into_iter()
            .map(|(j, p)| (j.id, p))
            .collect()
    };
    assert_eq!(parts(&w, "src"), [(1, JobPart::Run), (2, JobPart::Run)]);
    assert_eq!(parts(&w, "dst"), [(2, JobPart::Answer)]);

    let progress = JobUpdate::Progress("{\"files\":3}".into());
    assert_eq!(w.report_job("src", 1, progress, 1500), Response::Ok);
    assert_eq!(w.s.jobs[&1].state_at(1500), JobState::Running);
    assert_eq!(
        w.report_job("src", 1, JobUpdate::Done("{}".into()), 1600),
        Response::Ok
    );
    assert_eq!(w.s.jobs[&1].state_at(1600), JobState::Done);
    assert_eq!(w.s.jobs[&1].finished_ms, 1600);
    assert_eq!(parts(&w, "src"), [(2, JobPart::Run)]);

    let failed = JobUpdate::Failed("peer unreachable".into());
    assert_eq!(w.report_job("src", 2, failed, 1700), Response::Ok);
    assert!(
        parts(&w, "dst").is_empty(),
        "an ended probe is not answered"
    );
    // An ended job takes no more reports; only its agent reports on it.
    assert!(matches!(
        w.report_job("src", 2, JobUpdate::Done("{}".into()), 1800),
        Response::Refused(_)
    ));
    assert_eq!(
        w.start_job("src", assess(&["/x"]), 1900),
        Response::JobStarted(3)
    );
    assert!(matches!(
        w.report_job("dst", 3, JobUpdate::Done("{}".into()), 1900),
        Response::Refused(_)
    ));
    assert_eq!(w.s.jobs[&3].state, JobState::Pending);
}

#[test]
fn jobs_are_refused_for_agents_that_cannot_do_them_and_for_bad_specs() {
    let mut w = World::new();
    let refused = |r: Response| match r {
        Response::Refused(why) => why,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(refused(w.start_job("nobody", assess(&["/d"]), 1000)).contains("not registered"));
    assert!(refused(w.start_job("src", assess(&["relative"]), 1000)).contains("absolute"));
    assert!(refused(w.start_job("src", assess(&[]), 1000)).contains("1 to"));
    let bad_glob = JobKind::Assess {
        paths: vec!["/d".into()],
        excludes: vec!["[".into()],
    };
    assert!(matches!(
        w.start_job("src", bad_glob, 1000),
        Response::Refused(_)
    ));
    // "src" has no data address: nobody can probe it.
    assert!(refused(w.start_job("dst", probe_of("src"), 1000)).contains("cannot receive"));
    assert!(refused(w.start_job("src", probe_of("src"), 1000)).contains("itself"));
    let long = JobKind::Probe {
        peer: "dst".into(),
        seconds: MAX_PROBE_SECONDS + 1,
        streams: 1,
        congestions: Vec::new(),
    };
    assert!(refused(w.start_job("src", long, 1000)).contains("seconds"));
    let unknown_cc = JobKind::Probe {
        peer: "dst".into(),
        seconds: 5,
        streams: 1,
        congestions: vec!["vegas".into()],
    };
    assert!(matches!(
        w.start_job("src", unknown_cc, 1000),
        Response::Refused(_)
    ));
    // An agent not heard from for the session timeout does not get jobs.
    let later = SESSION_TIMEOUT_MS + 1;
    assert!(refused(w.start_job("src", assess(&["/d"]), later)).contains("not running"));
    assert!(w.s.jobs.is_empty(), "nothing refused was kept");
}

#[test]
fn a_job_without_a_result_by_its_deadline_has_failed_and_is_handed_out_no_more() {
    let mut w = World::new();
    assert_eq!(
        w.start_job("src", probe_of("dst"), 1000),
        Response::JobStarted(1)
    );
    let deadline = w.s.jobs[&1].deadline_ms;
    assert_eq!(deadline, 1000 + 10_000 + jobs::PROBE_GRACE_MS);
    assert!(w.s.jobs[&1].open_at(deadline - 1));
    assert_eq!(w.s.jobs[&1].state_at(deadline), JobState::Failed);
    assert!(w.s.jobs[&1].error_at(deadline).contains("no result"));
    assert!(w.s.jobs_for("src", deadline).is_empty());
    assert!(matches!(
        w.report_job("src", 1, JobUpdate::Done("{}".into()), deadline),
        Response::Refused(_)
    ));
}

#[test]
fn the_newest_jobs_are_kept_ids_are_never_reused_and_open_ones_are_bounded() {
    let mut w = World::new();
    for n in 1..=jobs::MAX_OPEN_JOBS_PER_AGENT as u64 {
        assert_eq!(
            w.start_job("src", assess(&["/d"]), 1000),
            Response::JobStarted(n)
        );
    }
    assert!(matches!(
        w.start_job("src", assess(&["/d"]), 1000),
        Response::Refused(why) if why.contains("already runs")
    ));
    // End them and keep starting: the oldest ended jobs make room, ids go on.
    let mut next = jobs::MAX_OPEN_JOBS_PER_AGENT as u64 + 1;
    for id in 1..next {
        w.report_job("src", id, JobUpdate::Done("{}".into()), 1000);
    }
    while next <= MAX_JOBS_KEPT as u64 + 10 {
        assert_eq!(
            w.start_job("src", assess(&["/d"]), 1000),
            Response::JobStarted(next)
        );
        w.report_job("src", next, JobUpdate::Done("{}".into()), 1000);
        next += 1;
    }
    assert_eq!(w.s.jobs.len(), MAX_JOBS_KEPT);
    assert_eq!(
        *w.s.jobs.keys().next().unwrap(),
        next - MAX_JOBS_KEPT as u64
    );
    // A report larger than the bound is refused.
    assert_eq!(
        w.start_job("src", assess(&["/d"]), 1000),
        Response::JobStarted(next)
    );
    let big = JobUpdate::Progress("x".repeat(MAX_JOB_TEXT + 1));
    assert!(matches!(
        w.report_job("src", next, big, 1000),
        Response::Refused(_)
    ));
}

#[test]
fn a_sync_preview_goes_to_the_source_of_a_migration_whose_round_has_ended() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 1)]);
    let preview = || JobKind::SyncPreview { migration_id: mid };
    // Round 0 is still running.
    assert!(matches!(
        w.start_job("src", preview(), 1000),
        Response::Refused(why) if why.contains("a sync round starts once it has ended")
    ));
    let l = w.lease(1, 1000);
    w.received(&l[0], [1; 32], [1; 32]);
    assert_eq!(w.s.migrations[&mid].phase, Phase::Done);
    assert!(matches!(
        w.start_job("dst", preview(), 1000),
        Response::Refused(why) if why.contains("read by agent src")
    ));
    let missing = JobKind::SyncPreview { migration_id: 99 };
    assert!(matches!(
        w.start_job("src", missing, 1000),
        Response::Refused(_)
    ));
    assert_eq!(w.start_job("src", preview(), 1000), Response::JobStarted(1));
    let parts: Vec<_> =
        w.s.jobs_for("src", 1000)
            .iter()
            .map(|(j, p)| (j.id, *p))
            .collect();
    assert_eq!(parts, [(1, JobPart::Run)]);
    assert!(w.s.jobs_for("dst", 1000).is_empty());
}

#[test]
fn a_job_id_is_never_given_again_when_the_newest_job_is_the_one_dropped() {
    let mut w = World::new();
    // Every kept job open but the newest: it is the one dropped to make room.
    for n in 0..MAX_JOBS_KEPT as u64 {
        let name = format!("a{n}");
        w.apply(Command::RegisterAgent {
            name: name.clone(),
            session: 1,
            previous: 0,
            data_addr: String::new(),
            new_cluster_id: String::new(),
            applies_owners: false,
            congestion: "bbr".into(),
            window_bytes: 1 << 20,
            target_root: String::new(),
            now_ms: 1000,
        });
        assert_eq!(
            w.start_job(&name, assess(&["/d"]), 1000),
            Response::JobStarted(n + 1)
        );
    }
    let newest = MAX_JOBS_KEPT as u64;
    let done = JobUpdate::Done("{}".into());
    assert_eq!(
        w.report_job(&format!("a{}", newest - 1), newest, done, 1000),
        Response::Ok
    );
    assert_eq!(
        w.start_job("src", assess(&["/d"]), 1000),
        Response::JobStarted(newest + 1)
    );
    assert!(!w.s.jobs.contains_key(&newest), "the ended job made room");
}

fn token(w: &mut World, id: &str, secret: &str, name: &str, ttl_ms: u64, now_ms: u64) -> Response {
    w.apply(Command::CreateJoinToken {
        id: id.into(),
        digest: ferry_common::enrol::secret_digest(secret),
        role: "agent".into(),
        name: name.into(),
        ttl_ms,
        by: "alice".into(),
        now_ms,
    })
}

fn cert(serial: &str, agent: &str, not_before_s: i64) -> IssuedCert {
    IssuedCert {
        serial: serial.into(),
        identity: agent_identity(agent),
        not_before_s,
        not_after_s: not_before_s + 7 * 86_400,
        via: "test".into(),
    }
}

fn join(w: &mut World, id: &str, secret: &str, agent: &str, serial: &str, now_ms: u64) -> Response {
    let note = AuditNote {
        at_ms: now_ms,
        who: agent.into(),
        role: "agent".into(),
        from: "10.0.0.9:40000".into(),
        call: "Join".into(),
        what: format!("join token {id} as agent {agent}"),
    };
    w.apply(Command::Audited {
        note,
        cmd: Box::new(Command::UseJoinToken {
            id: id.into(),
            digest: ferry_common::enrol::secret_digest(secret),
            agent: agent.into(),
            from: "10.0.0.9:40000".into(),
            cert: cert(serial, agent, (now_ms / 1000) as i64 - pki::SKEW_S),
            now_ms,
        }),
    })
}

fn refusal(r: Response) -> String {
    match r {
        Response::Refused(why) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_join_token_admits_one_agent_once_before_it_expires_and_every_use_is_audited() {
    let mut w = World::new();
    let hour = 3_600_000;
    assert_eq!(token(&mut w, "t1", "s1", "", hour, 1_000_000), Response::Ok);
    // A wrong secret says nothing about the token and uses nothing up.
    let why = refusal(join(&mut w, "t1", "nope", "gpu-1", "aa", 1_001_000));
    assert!(why.contains("secret is wrong"), "{why}");
    assert!(w.s.pki.tokens["t1"].used.is_none());
    // A name already in use (a registered agent) is refused: a token does not let anyone
    // become an existing agent.
    let why = refusal(join(&mut w, "t1", "s1", "src", "ab", 1_001_000));
    assert!(why.contains("exists already"), "{why}");
    assert_eq!(
        join(&mut w, "t1", "s1", "gpu-1", "ac", 1_002_000),
        Response::Ok
    );
    assert_eq!(w.s.pki.certs["ac"].identity, "agent gpu-1");
    let used = w.s.pki.tokens["t1"].used.clone().unwrap();
    assert_eq!((used.agent.as_str(), used.at_ms), ("gpu-1", 1_002_000));
    // Replayed: refused, whatever name it asks for.
    let why = refusal(join(&mut w, "t1", "s1", "gpu-2", "ad", 1_003_000));
    assert!(why.contains("was used already"), "{why}");
    assert!(!w.s.pki.certs.contains_key("ad"));
    // Expired.
    assert_eq!(token(&mut w, "t2", "s2", "", 1000, 2_000_000), Response::Ok);
    let why = refusal(join(&mut w, "t2", "s2", "gpu-3", "ae", 2_001_000));
    assert!(why.contains("expired"), "{why}");
    // Unknown.
    let why = refusal(join(&mut w, "t9", "s9", "gpu-3", "af", 2_001_000));
    assert!(why.contains("not known"), "{why}");
    // A token for one name only.
    assert_eq!(
        token(&mut w, "t3", "s3", "gpu-4", hour, 3_000_000),
        Response::Ok
    );
    let why = refusal(join(&mut w, "t3", "s3", "gpu-5", "b0", 3_001_000));
    assert!(why.contains("is for agent gpu-4"), "{why}");
    assert_eq!(
        join(&mut w, "t3", "s3", "gpu-4", "b1", 3_001_000),
        Response::Ok
    );
    // Every attempt is in the audit log with its decision, chained.
    let joins: Vec<&AuditRecord> =
        w.s.audit
            .values()
            .filter(|r| r.note.call == "Join")
            .collect();
    assert_eq!(joins.len(), 8);
    let decisions: Vec<&str> = joins.iter().map(|r| r.decision.as_str()).collect();
    assert!(decisions[0].starts_with("refused: join token t1: the secret is wrong"));
    assert_eq!(decisions[2], "ok");
    assert!(decisions[3].contains("was used already"));
    assert!(decisions[4].contains("expired"));
    let all: Vec<AuditRecord> = w.s.audit.values().cloned().collect();
    assert_eq!(verify_chain(&all, None), Ok(()));
    // Bounds: a token's validity, its role.
    let why = refusal(token(
        &mut w,
        "t4",
        "s4",
        "",
        MAX_TOKEN_TTL_MS + 1,
        4_000_000,
    ));
    assert!(why.contains("up to 7 days"), "{why}");
    let why = refusal(w.apply(Command::CreateJoinToken {
        id: "t5".into(),
        digest: [0; 32],
        role: "admin".into(),
        name: String::new(),
        ttl_ms: hour,
        by: "alice".into(),
        now_ms: 4_000_000,
    }));
    assert!(why.contains("--role agent"), "{why}");
}

#[test]
fn a_revoked_agent_renews_nothing_and_may_join_again_only_with_a_new_token() {
    let mut w = World::new();
    let hour = 3_600_000;
    assert_eq!(
        token(&mut w, "t1", "s1", "", hour, 10_000_000),
        Response::Ok
    );
    assert_eq!(
        join(&mut w, "t1", "s1", "gpu-1", "c1", 10_000_000),
        Response::Ok
    );
    let first_nb = w.s.pki.certs["c1"].not_before_s;
    let renew = |w: &mut World, prev_nb: i64, serial: &str, now_ms: u64| {
        w.apply(Command::RecordCert {
            agent: "gpu-1".into(),
            previous_not_before_s: prev_nb,
            cert: cert(serial, "gpu-1", (now_ms / 1000) as i64 - pki::SKEW_S),
            now_ms,
        })
    };
    assert_eq!(renew(&mut w, first_nb, "c2", 11_000_000), Response::Ok);
    assert!(!w.s.pki.is_revoked("gpu-1", first_nb));
    // Revoked at 12,000.5 s: certificates signed before are refused, renewals too.
    assert_eq!(
        w.apply(Command::RevokeAgent {
            agent: "gpu-1".into(),
            by: "alice".into(),
            now_ms: 12_000_500,
        }),
        Response::Ok
    );
    let second_nb = w.s.pki.certs["c2"].not_before_s;
    assert!(w.s.pki.is_revoked("gpu-1", first_nb));
    assert!(w.s.pki.is_revoked("gpu-1", second_nb));
    // Signed in the same second as the revocation but before it: revoked too.
    assert!(w.s.pki.is_revoked("gpu-1", 12_000 - pki::SKEW_S));
    let why = refusal(renew(&mut w, second_nb, "c3", 12_100_000));
    assert!(why.contains("is revoked"), "{why}");
    // Other agents are untouched.
    assert!(!w.s.pki.is_revoked("gpu-2", first_nb));
    // A new token lets it join again, signed from the revocation's second on.
    assert_eq!(
        token(&mut w, "t2", "s2", "gpu-1", hour, 12_200_000),
        Response::Ok
    );
    let sign_s = w.s.pki.signing_second("gpu-1", 12_000);
    assert_eq!(sign_s, 12_001);
    assert!(!w.s.pki.is_revoked("gpu-1", sign_s - pki::SKEW_S));
    assert_eq!(
        join(&mut w, "t2", "s2", "gpu-1", "c4", 12_200_000),
        Response::Ok
    );
    // An unknown agent cannot be revoked (a typo says so).
    let why = refusal(w.apply(Command::RevokeAgent {
        agent: "gpu-9".into(),
        by: "alice".into(),
        now_ms: 13_000_000,
    }));
    assert!(why.contains("no agent gpu-9"), "{why}");
}

#[test]
fn the_certificate_records_stay_bounded() {
    let mut w = World::new();
    let day = 86_400_000u64;
    assert_eq!(token(&mut w, "t1", "s1", "", day, 0), Response::Ok);
    assert_eq!(join(&mut w, "t1", "s1", "gpu-1", "d00", 1000), Response::Ok);
    let mut prev = w.s.pki.certs["d00"].not_before_s;
    for i in 1..20u64 {
        let now = 1000 + i * 1000;
        let serial = format!("d{i:02}");
        assert_eq!(
            w.apply(Command::RecordCert {
                agent: "gpu-1".into(),
                previous_not_before_s: prev,
                cert: cert(&serial, "gpu-1", (now / 1000) as i64),
                now_ms: now,
            }),
            Response::Ok
        );
        prev = (now / 1000) as i64;
    }
    assert_eq!(w.s.pki.certs.len(), pki::CERTS_KEPT_PER_IDENTITY);
    assert!(w.s.pki.certs.contains_key("d19") && !w.s.pki.certs.contains_key("d00"));
    // A used token is listed for a day, then dropped when the next one is made.
    assert_eq!(token(&mut w, "t2", "s2", "", day, 2 * day), Response::Ok);
    assert!(!w.s.pki.tokens.contains_key("t1"));
}

#[test]
fn revoking_a_source_ends_its_leases_at_once_and_its_segments_go_to_the_next_sender() {
    let mut w = World::new();
    let mid = w.migration(&[(0, 10, 1), (1, 10, 1)]);
    let leases = w.lease(2, 10);
    assert_eq!(leases.len(), 2);
    assert!(w.s.check_lease("dst", mid, 0, leases[0].epoch, 11).is_ok());
    assert_eq!(
        w.apply(Command::RevokeAgent {
            agent: "src".into(),
            by: "alice".into(),
            now_ms: 12,
        }),
        Response::Ok
    );
    // Well before the leases would have expired, a target is told not to take the bytes.
    for l in &leases {
        assert!(w
            .s
            .check_lease("dst", mid, l.segment_id, l.epoch, 13)
            .is_err());
        let seg = &w.s.segments[&(mid, l.segment_id)];
        assert_eq!(seg.state, SegState::Pending);
        assert!(seg.last_error.contains("revoked"), "{}", seg.last_error);
    }
    assert_eq!(w.s.agents["src"].session, 0, "its session ended");
    // Its next calls are refused (it must register again, which its certificate cannot).
    assert!(matches!(
        w.apply(Command::LeaseSegments {
            agent: "src".into(),
            session: 1,
            max: 2,
            now_ms: 14,
            ttl_ms: TTL,
        }),
        Response::Refused(_)
    ));
}

/// A world for target pools: source "src"; targets "t0", "t1", "t2" writing to one bucket,
/// "fs" to a directory and "other" to another bucket (all registered at 0 with session 1);
/// a migration from "src" to "t0" of `segs`, its scan complete.
fn pool_world(segs: Vec<SegmentReg>) -> (World, u64) {
    let mut w = World::new();
    for (i, (name, root)) in [
        ("t0", "s3://bucket/data"),
        ("t1", "s3://bucket/data"),
        ("t2", "s3://bucket/data"),
        ("fs", "/cloud"),
        ("other", "s3://elsewhere/data"),
    ]
    .into_iter()
    .enumerate()
    {
        register_target(&mut w, name, &format!("127.0.0.1:{}", 7000 + i), root, 0);
    }
    let Response::MigrationCreated(mid) = w.apply(Command::CreateMigration {
        name: unique_name(),
        idempotency_key: String::new(),
        spec: MigrationSpec {
            target_agent: "t0".into(),
            ..spec("/d", 100)
        },
        uuid: ferry_common::ids::random_id(),
        throttle: String::new(),
        now_ms: 0,
    }) else {
        panic!()
    };
    let total = segs.len() as u64;
    assert_eq!(register(&mut w, mid, segs), Response::Ok);
    assert_eq!(complete(&mut w, mid, total), Response::Ok);
    (w, mid)
}

/// Registers agent `name` (session 1) with data address `addr` and target root `root`.
fn register_target(w: &mut World, name: &str, addr: &str, root: &str, now_ms: u64) {
    let r = w.apply(Command::RegisterAgent {
        name: name.into(),
        session: 1,
        previous: 0,
        data_addr: addr.into(),
        new_cluster_id: "cluster-1".into(),
        applies_owners: true,
        congestion: "bbr".into(),
        window_bytes: 64 << 20,
        target_root: root.into(),
        now_ms,
    });
    assert!(matches!(r, Response::Registered(_)), "{r:?}");
}

/// Piece `index` of `count` of a split file, as segment `id` of 100 bytes.
fn piece(id: u64, index: u32, count: u32) -> SegmentReg {
    SegmentReg {
        piece_index: index,
        piece_count: count,
        fingerprint: [id as u8; 32],
        ..reg(id, 100, u32::from(index == 0))
    }
}

fn add_target(w: &mut World, mid: u64, agent: &str) -> Response {
    w.apply(Command::AddTarget {
        migration_id: mid,
        agent: agent.into(),
    })
}

fn targets_of(leases: &[Lease]) -> Vec<(u64, &str)> {
    leases
        .iter()
        .map(|l| (l.segment_id, l.target_agent.as_str()))
        .collect()
}

#[test]
fn a_pool_grows_only_with_targets_writing_to_the_first_targets_object_store() {
    let (mut w, mid) = pool_world(vec![reg(0, 10, 1)]);
    let refusal = |r: Response| match r {
        Response::Refused(why) => why,
        r => panic!("not refused: {r:?}"),
    };
    let before = w.s.migrations[&mid].clone();
    assert!(refusal(add_target(&mut w, mid, "fs")).contains("same object store"));
    assert!(refusal(add_target(&mut w, mid, "other")).contains("same object store"));
    assert!(refusal(add_target(&mut w, mid, "src")).contains("source"));
    assert!(refusal(add_target(&mut w, mid, "ghost")).contains("not registered"));
    assert_eq!(w.s.migrations[&mid], before, "a refusal changes nothing");
    assert_eq!(add_target(&mut w, mid, "t1"), Response::Ok);
    assert_eq!(add_target(&mut w, mid, "t1"), Response::Ok, "idempotent");
    let pool: Vec<_> = w.s.migrations[&mid]
        .targets
        .iter()
        .map(|t| (t.agent.as_str(), t.active))
        .collect();
    assert_eq!(pool, [("t0", true), ("t1", true)]);
    let remove = |w: &mut World, agent: &str| {
        w.apply(Command::RemoveTarget {
            migration_id: mid,
            agent: agent.into(),
        })
    };
    assert!(refusal(remove(&mut w, "t0")).contains("first target"));
    assert!(refusal(remove(&mut w, "t2")).contains("not a target"));
    assert_eq!(remove(&mut w, "t1"), Response::Ok);
    assert!(!w.s.migrations[&mid].targets[1].active);
    // A migration whose first target writes to a directory cannot grow: ferry cannot tell
    // that another host's directory is the same file system.
    let mid2 = create(&mut w);
    assert!(refusal(add_target(&mut w, mid2, "fs")).contains("directory on its own host"));
}

#[test]
fn bundles_go_to_the_member_with_the_fewest_bytes_leased_and_only_it_may_take_them() {
    let (mut w, mid) = pool_world((0..6).map(|id| reg(id, 10, 1)).collect());
    let first = w.lease(1, 10);
    assert_eq!(targets_of(&first), [(0, "t0")]);
    assert_eq!(first[0].target_addr, "127.0.0.1:7000");
    // A member that joins gets the very next lease: it has nothing leased.
    assert_eq!(add_target(&mut w, mid, "t1"), Response::Ok);
    let next = w.lease(1, 10);
    assert_eq!(targets_of(&next), [(1, "t1")]);
    assert_eq!(next[0].target_addr, "127.0.0.1:7001");
    assert_eq!(targets_of(&w.lease(2, 10)), [(2, "t0"), (3, "t1")]);
    // Only the member a lease went to may take the segment and report it.
    let l = &next[0];
    assert!(matches!(
        w.s.check_lease("t0", mid, l.segment_id, l.epoch, 10),
        Err(LeaseRefusal::NotTheTarget { .. })
    ));
    assert!(w
        .s
        .check_lease("t1", mid, l.segment_id, l.epoch, 10)
        .is_ok());
    assert!(matches!(
        w.s.check_lease("t2", mid, l.segment_id, l.epoch, 10),
        Err(LeaseRefusal::NotTheTarget { .. })
    ));
    let report = |w: &mut World, agent: &str| {
        w.apply(Command::ReportSegment {
            agent: agent.into(),
            session: 1,
            role: Role::Target,
            migration_id: mid,
            segment_id: l.segment_id,
            epoch: l.epoch,
            result: Ok([1; 32]),
            source_hash: Some([1; 32]),
            retry_later: false,
            stale: false,
            permanent: false,
            now_ms: 20,
        })
    };
    assert!(matches!(
        report(&mut w, "t0"),
        Response::Report(ReportOutcome::Rejected, _)
    ));
    assert!(matches!(
        report(&mut w, "t1"),
        Response::Report(ReportOutcome::Verified, _)
    ));
    let t = &w.s.migrations[&mid].targets;
    assert_eq!((t[0].verified_segments, t[1].verified_segments), (0, 1));
    assert_eq!(t[1].verified_bytes, 10);
    // The source's own leases name the member each went to.
    let held = w.s.leases_of("src", 10);
    assert_eq!(targets_of(&held), [(0, "t0"), (2, "t0"), (3, "t1")]);
}

#[test]
fn every_piece_of_a_split_file_goes_to_the_member_that_got_the_first() {
    // A file in four pieces (0..=3), then a bundle.
    let mut segs: Vec<_> = (0..4).map(|i| piece(i, i as u32, 4)).collect();
    segs.push(reg(4, 10, 1));
    let (mut w, mid) = pool_world(segs);
    assert_eq!(add_target(&mut w, mid, "t1"), Response::Ok);
    assert_eq!(targets_of(&w.lease(1, 10)), [(0, "t0")]);
    // t0 holds far more bytes than t1, yet the file's other pieces go to t0: its sidecar is
    // there. The bundle goes to t1.
    assert_eq!(
        targets_of(&w.lease(8, 10)),
        [(1, "t0"), (2, "t0"), (3, "t0"), (4, "t1")]
    );
    // t0 shuts down; the leases run out. Nothing of the file goes anywhere else; the bundle
    // goes to t1 again.
    w.apply(Command::EndSession {
        name: "t0".into(),
        session: 1,
    });
    assert_eq!(targets_of(&w.lease(8, 10 + TTL)), [(4, "t1")]);
    assert!((0..4).all(|id| w.s.segments[&(mid, id)].state == SegState::Pending));
    // t0 comes back: the file resumes there, the first piece included.
    w.apply(Command::RegisterAgent {
        name: "t0".into(),
        session: 2,
        previous: 1,
        data_addr: "127.0.0.1:7000".into(),
        new_cluster_id: "cluster-1".into(),
        applies_owners: true,
        congestion: "bbr".into(),
        window_bytes: 64 << 20,
        target_root: "s3://bucket/data".into(),
        now_ms: 20,
    });
    assert_eq!(
        targets_of(&w.lease(8, 20 + TTL)),
        [(0, "t0"), (1, "t0"), (2, "t0"), (3, "t0")]
    );
}

#[test]
fn a_removed_member_gets_no_new_files_but_finishes_the_split_files_it_began() {
    // A bundle, a file in three pieces (1..=3), two bundles.
    let segs = vec![
        reg(0, 10, 1),
        piece(1, 0, 3),
        piece(2, 1, 3),
        piece(3, 2, 3),
        reg(4, 10, 1),
        reg(5, 10, 1),
    ];
    let (mut w, mid) = pool_world(segs);
    assert_eq!(add_target(&mut w, mid, "t1"), Response::Ok);
    assert_eq!(targets_of(&w.lease(1, 10)), [(0, "t0")]);
    assert_eq!(targets_of(&w.lease(1, 10)), [(1, "t1")]);
    w.apply(Command::RemoveTarget {
        migration_id: mid,
        agent: "t1".into(),
    });
    assert_eq!(
        targets_of(&w.lease(8, 10)),
        [(2, "t1"), (3, "t1"), (4, "t0"), (5, "t0")]
    );
}

#[test]
fn a_dead_members_expired_leases_go_to_the_live_ones() {
    let (mut w, mid) = pool_world((0..4).map(|id| reg(id, 10, 1)).collect());
    assert_eq!(add_target(&mut w, mid, "t1"), Response::Ok);
    assert_eq!(
        targets_of(&w.lease(4, 10)),
        [(0, "t0"), (1, "t1"), (2, "t0"), (3, "t1")]
    );
    // t1 is not heard from again; src and t0 are. Past t1's session timeout every lease has
    // expired and all of them go to t0, the live member, though it holds more.
    let later = SESSION_TIMEOUT_MS + 1;
    for name in ["src", "t0"] {
        w.apply(Command::Heartbeat {
            name: name.into(),
            session: 1,
            now_ms: later - 1,
        });
    }
    assert!(w.s.agents["t1"].session != 0 && !w.s.agents["t1"].live(later));
    assert_eq!(
        targets_of(&w.lease(4, later)),
        [(0, "t0"), (1, "t0"), (2, "t0"), (3, "t0")]
    );
    assert_eq!(
        w.s.blocker(mid, later),
        None,
        "t0 takes the work: nothing blocks"
    );
}

/// A source's registration cannot split a file over two targets: a piece is refused unless its
/// file's first piece is registered before it or with it, in this round. And an id at the end
/// of the range is scheduled without overflow.
#[test]
fn a_piece_without_its_first_is_refused_and_the_last_id_is_scheduled() {
    let mut w = World::new();
    let mid = create(&mut w);
    let before = w.s.clone();
    let r = register(&mut w, mid, vec![piece(5, 1, 3)]);
    assert!(
        matches!(r, Response::Refused(ref why) if why.contains("first piece")),
        "{r:?}"
    );
    assert_eq!(w.s.segments, before.segments, "a refusal changes nothing");
    // With it in the same batch, or registered before: accepted.
    assert_eq!(
        register(&mut w, mid, vec![piece(4, 0, 3), piece(5, 1, 3)]),
        Response::Ok
    );
    assert_eq!(register(&mut w, mid, vec![piece(6, 2, 3)]), Response::Ok);
    let last = reg(u64::MAX, 10, 1);
    assert_eq!(register(&mut w, mid, vec![last]), Response::Ok);
    let leased: Vec<u64> = w.lease(8, 10).iter().map(|l| l.segment_id).collect();
    assert_eq!(leased, [4, 5, 6, u64::MAX]);
}

/// The coordinator holds every segment in memory: ten million of them must fit in well under
/// 2 GiB (docs/benchmarks.md, "The coordinator at 10 million segments"). A field added to
/// `Segment` costs 10 MB per byte there; this says so before the benchmark does.
#[test]
fn a_segment_stays_small() {
    assert!(
        std::mem::size_of::<Segment>() <= 144,
        "Segment grew to {} bytes",
        std::mem::size_of::<Segment>()
    );
}

/// The compact `Hashes` and `Reason` changed memory, not the encoding: a segment encodes as
/// the struct of plain fields it was (stored records and snapshots of earlier builds read the
/// same), and decodes back to itself, two different hashes included.
#[test]
fn a_segment_encodes_as_its_plain_fields() {
    #[derive(Serialize)]
    struct Plain {
        bytes: u64,
        files: u32,
        fingerprint: Digest,
        piece_index: u32,
        piece_count: u32,
        target: u16,
        state: SegState,
        leases: u32,
        attempts: u32,
        not_before_ms: u64,
        source_hash: Option<Digest>,
        target_hash: Option<Digest>,
        last_error: String,
    }
    let pairs = [
        (None, None),
        (Some([1; 32]), None),
        (None, Some([2; 32])),
        (Some([3; 32]), Some([3; 32])),
        (Some([4; 32]), Some([5; 32])),
    ];
    for (i, (source_hash, target_hash)) in pairs.into_iter().enumerate() {
        let last_error = if i % 2 == 0 {
            String::new()
        } else {
            format!("try {i}")
        };
        let seg = Segment {
            bytes: 1 << 40,
            files: 7,
            fingerprint: [9; 32],
            piece_index: 1,
            piece_count: 3,
            target: 2,
            state: SegState::Leased {
                epoch: 5,
                expires_ms: 6,
            },
            leases: 4,
            attempts: 3,
            not_before_ms: 8,
            hashes: Hashes::of(source_hash, target_hash),
            last_error: last_error.clone().into(),
        };
        assert_eq!(
            (seg.source_hash(), seg.target_hash()),
            (source_hash, target_hash)
        );
        let plain = Plain {
            bytes: 1 << 40,
            files: 7,
            fingerprint: [9; 32],
            piece_index: 1,
            piece_count: 3,
            target: 2,
            state: seg.state,
            leases: 4,
            attempts: 3,
            not_before_ms: 8,
            source_hash,
            target_hash,
            last_error,
        };
        let bytes = crate::codec::encode(&seg).unwrap();
        assert_eq!(bytes, crate::codec::encode(&plain).unwrap(), "case {i}");
        assert_eq!(
            crate::codec::decode::<Segment>(&bytes).unwrap(),
            seg,
            "case {i}"
        );
        let json = serde_json::to_string(&seg).unwrap();
        assert_eq!(json, serde_json::to_string(&plain).unwrap(), "case {i}");
        assert_eq!(
            serde_json::from_str::<Segment>(&json).unwrap(),
            seg,
            "case {i}"
        );
    }
}
