//! Deterministic tests of the segment lifecycle and the scheduler: no sockets, no clock.

use super::*;

const TTL: u64 = 1000;

fn reg(id: u64, bytes: u64, files: u32) -> SegmentReg {
    SegmentReg {
        id,
        bytes,
        files,
        fingerprint: [bytes as u8; 32],
    }
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
            w.apply(Command::RegisterAgent {
                name: name.into(),
                data_addr: addr.into(),
                now_ms: 0,
            });
        }
        w
    }

    fn apply(&mut self, c: Command) -> Response {
        self.index += 1;
        self.s.apply(self.index, c)
    }

    fn migration(&mut self, segs: &[(u64, u64, u32)]) -> u64 {
        let segs: Vec<SegmentReg> = segs
            .iter()
            .map(|&(id, bytes, files)| reg(id, bytes, files))
            .collect();
        let spec = MigrationSpec {
            source_agent: "src".into(),
            source_path: "/data".into(),
            target_agent: "dst".into(),
            target_path: String::new(),
            segment_size: 100,
        };
        let Response::MigrationCreated(id) =
            self.apply(Command::CreateMigration { spec, now_ms: 1 })
        else {
            panic!("not created")
        };
        assert_eq!(
            self.apply(Command::RegisterSegments {
                agent: "src".into(),
                migration_id: id,
                segments: segs.to_vec()
            }),
            Response::Ok
        );
        assert_eq!(
            self.apply(Command::CompleteScan {
                agent: "src".into(),
                migration_id: id,
                segments_total: segs.len() as u64,
                issues: vec![],
                issues_total: 0,
                now_ms: 1,
            }),
            Response::Ok
        );
        id
    }

    fn lease(&mut self, max: u32, now_ms: u64) -> Vec<Lease> {
        match self.apply(Command::LeaseSegments {
            agent: "src".into(),
            max,
            now_ms,
            ttl_ms: TTL,
        }) {
            Response::Leases(l) => l,
            r => panic!("{r:?}"),
        }
    }

    fn report(&mut self, role: Role, l: &Lease, result: Result<Digest, String>) -> ReportOutcome {
        let agent = if role == Role::Source { "src" } else { "dst" };
        match self.apply(Command::ReportSegment {
            agent: agent.into(),
            role,
            migration_id: l.migration_id,
            segment_id: l.segment_id,
            epoch: l.epoch,
            result,
            now_ms: 2,
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
    // It is leased again, with a new epoch.
    let l2 = w.lease(8, 20).pop().unwrap();
    assert!(l2.epoch > l.epoch);
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
    let err = w.s.check_lease("src", mid, 0, l.epoch, 11).unwrap_err();
    assert!(err.contains("not the target"), "{err}");
    let err =
        w.s.check_lease("dst", mid, 0, l.epoch, 10 + TTL)
            .unwrap_err();
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
        data_addr: String::new(),
        now_ms: 3,
    });
    w.migration(&[(0, 1, 1)]);
    assert!(w.lease(1, 10).is_empty());
}

#[test]
fn register_is_idempotent_and_complete_scan_checks_count() {
    let mut w = World::new();
    let spec = MigrationSpec {
        source_agent: "src".into(),
        source_path: "/d".into(),
        target_agent: "dst".into(),
        target_path: String::new(),
        segment_size: 1,
    };
    let Response::MigrationCreated(mid) = w.apply(Command::CreateMigration { spec, now_ms: 0 })
    else {
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
        source_path: "/d".into(),
        target_agent: "dst".into(),
        target_path: String::new(),
        segment_size: 1,
    };
    let r = w.apply(Command::CreateMigration { spec, now_ms: 0 });
    assert!(
        matches!(r, Response::Refused(ref m) if m.contains("nobody")),
        "{r:?}"
    );
}

/// A seeded random walk over the lifecycle: after every step the counters equal a recount and the
/// derived indexes equal a rebuild. Reproduce a failure with its printed seed.
#[test]
fn random_walk_keeps_counters_and_indexes_consistent() {
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
        let mid = w.migration(&segs);
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
                    let o = w.report(Role::Target, &l, r.clone());
                    if o == ReportOutcome::Waiting {
                        w.report(Role::Source, &l, Ok([1; 32]));
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
                    .all(|s| s.source_hash == s.target_hash && s.source_hash.is_some()),
                "seed {seed}"
            );
            let mut rebuilt = w.s.clone();
            rebuilt.rebuild_indexes();
            let flat = |m: &BTreeMap<u64, BTreeSet<u64>>| -> Vec<(u64, u64)> {
                m.iter()
                    .flat_map(|(k, v)| v.iter().map(move |x| (*k, *x)))
                    .collect()
            };
            assert_eq!(flat(&rebuilt.pending), flat(&w.s.pending), "seed {seed}");
            assert_eq!(flat(&rebuilt.leased), flat(&w.s.leased), "seed {seed}");
            assert_eq!(m.phase == Phase::Done, verified.len() == 30, "seed {seed}");
        }
    }
}

fn create(w: &mut World) -> u64 {
    let spec = MigrationSpec {
        source_agent: "src".into(),
        source_path: "/d".into(),
        target_agent: "dst".into(),
        target_path: String::new(),
        segment_size: 1,
    };
    let Response::MigrationCreated(mid) = w.apply(Command::CreateMigration { spec, now_ms: 0 })
    else {
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
