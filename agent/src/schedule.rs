//! When a source agent does what: heartbeats, scans, adopting leases it may hold unknowingly,
//! asking for leases and renewing them. Pure, like the coordinator's state machine: the time
//! arrives as an argument and the outcome of every call as an event, so each rule tests in
//! microseconds. [`crate::source::Source::run`] drives it and performs the [`Action`]s.
//!
//! A round starts at every tick of the driver ([`SourceSchedule::start_round`]); within it,
//! [`SourceSchedule::next`] hands out each kind of action at most once, in this order:
//! heartbeat, renewal, preparations (one per migration that needs one), reconciliation, lease
//! request. The driver awaits reconciliations and lease requests before asking for the next
//! action (their answers change what comes next); heartbeats, renewals and preparations run in
//! the background and are answered when they end. A heartbeat is a long poll: the coordinator
//! holds it while the answer would be the one the agent has, so a new migration or throttle
//! reaches the source at once, and at most one runs at a time.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use ferry_common::retry::Backoff;
use ferry_proto::control::{Lease, SourceWork};

/// How often the driver starts a round when nothing happens: how soon an idle source asks for
/// work and leases again.
pub const TICK: Duration = Duration::from_millis(250);
/// The least time between the starts of two heartbeats (each may wait at the coordinator for
/// up to [`HEARTBEAT_WAIT`] first).
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
/// How long the coordinator may hold a heartbeat whose answer has not changed.
pub const HEARTBEAT_WAIT: Duration = Duration::from_secs(2);
/// How long to wait before preparing a migration again after its preparation failed.
pub const PREPARE_RETRY: Duration = Duration::from_secs(5);
/// The shortest time between two renewals, whatever the lease time: a renewal is one Raft
/// entry, and leases are minutes long.
pub const MIN_RENEW_EVERY: Duration = Duration::from_secs(1);
/// The longest wait between lease requests the coordinator refused or did not answer.
pub const LEASE_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// A lease as the schedule knows it: which segment, under which fencing token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseKey {
    /// The migration.
    pub migration_id: u64,
    /// The segment.
    pub segment_id: u64,
    /// The lease's fencing token.
    pub epoch: u64,
}

impl From<&Lease> for LeaseKey {
    fn from(l: &Lease) -> Self {
        LeaseKey {
            migration_id: l.migration_id,
            segment_id: l.segment_id,
            epoch: l.epoch,
        }
    }
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send a heartbeat in the background; answer with [`SourceSchedule::heartbeat_answered`]
    /// when it succeeds, [`SourceSchedule::heartbeat_failed`] when not.
    Heartbeat,
    /// Extend these leases in one call, in the background; answer with
    /// [`SourceSchedule::renewal_ended`].
    Renew(Vec<LeaseKey>),
    /// Drop what is loaded of this migration: the coordinator's migration of that id is another
    /// one (a new cluster restarts ids at 1). A [`Action::Prepare`] of it follows.
    Forget(u64),
    /// Load or scan the migration's manifest in the background; answer with
    /// [`SourceSchedule::prepared`] or [`SourceSchedule::prepare_failed`].
    Prepare(SourceWork),
    /// Ask the coordinator which leases this agent holds and send those not known here
    /// ([`SourceSchedule::holds`], [`SourceSchedule::started`]); answer with
    /// [`SourceSchedule::listed`].
    ListLeases,
    /// Ask for up to this many leases; answer with [`SourceSchedule::leased`] or
    /// [`SourceSchedule::lease_failed`].
    Lease(u32),
}

/// Where a migration's manifest of its current round stands at this agent.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Prep {
    /// Loading or scanning (segments may already be sent: the scan is pipelined).
    Running { uuid: String, round: u32 },
    /// Loaded, or scanned completely.
    Ready { uuid: String, round: u32 },
    /// Failed; not tried again before this time.
    RetryAt(Instant),
}

/// The stages of a round, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Heartbeat,
    Renew,
    Prepare,
    Reconcile,
    Lease,
    Done,
}

/// The source's decisions (see the module's documentation).
#[derive(Debug)]
pub struct SourceSchedule {
    /// Most segments sent at once.
    max_in_flight: u32,
    /// When the next heartbeat is due (`None`: at once).
    next_heartbeat: Option<Instant>,
    /// A heartbeat is running.
    heartbeating: bool,
    /// The work of the last heartbeat answered.
    work: Vec<SourceWork>,
    /// Leases being sent, with their lease time (ms).
    in_flight: BTreeMap<LeaseKey, u64>,
    /// When the leases in flight were last renewed, or when none needed it.
    last_renewal: Instant,
    /// A renewal call is running.
    renewing: bool,
    /// Leases may have been granted to this agent that it does not know of (from its previous
    /// run, or a lease request whose answer was lost): list them before asking for more.
    reconcile: bool,
    /// A lease call is running, with the leases it asked for: one at a time, in the background
    /// (the driver never waits a round trip for it; the slots that free meanwhile go into the
    /// next call).
    leasing: Option<u32>,
    /// Scan completions out that ask for leases ([`Self::lease_with_scan`]): how many, and the
    /// leases they asked for together.
    scan_leasing: (u32, u32),
    /// The last lease call got fewer leases than it asked for: the next asks for one (a probe
    /// for segments that became leasable with time), leaving the room to a completing scan,
    /// which brings its own; a call that gets all it asked for ends the probing.
    probing: bool,
    /// The last lease call got fewer leases than it asked for: none is asked for again before
    /// this (a tick), unless a scan completes, so an idle source does not poll in a loop.
    lease_idle_until: Option<Instant>,
    /// Lease requests the coordinator refused or did not answer are repeated less and less often
    /// (from one tick up to [`LEASE_BACKOFF_MAX`]) instead of every tick.
    lease_backoff: Backoff,
    /// Manifest preparation per migration id.
    migrations: HashMap<u64, Prep>,
    /// Where the current round stands.
    stage: Stage,
}

impl SourceSchedule {
    /// A schedule holding at most `max_in_flight` leases at once (at least 1: being sent, or
    /// leased ahead and waiting for a transfer to end), started at `now`.
    pub fn new(now: Instant, max_in_flight: u32) -> Self {
        SourceSchedule {
            max_in_flight: max_in_flight.max(1),
            next_heartbeat: None,
            heartbeating: false,
            work: Vec::new(),
            in_flight: BTreeMap::new(),
            last_renewal: now,
            renewing: false,
            reconcile: true,
            leasing: None,
            scan_leasing: (0, 0),
            probing: false,
            lease_idle_until: None,
            lease_backoff: Backoff::new(TICK, LEASE_BACKOFF_MAX),
            migrations: HashMap::new(),
            stage: Stage::Done,
        }
    }

    /// Starts a round: [`Self::next`] considers every kind of action again.
    pub fn start_round(&mut self) {
        self.stage = Stage::Heartbeat;
    }

    /// The next action of this round at `now`, or `None` when the round is over.
    pub fn next(&mut self, now: Instant) -> Option<Action> {
        loop {
            match self.stage {
                Stage::Heartbeat => {
                    self.stage = Stage::Renew;
                    if !self.heartbeating && self.next_heartbeat.is_none_or(|t| now >= t) {
                        self.next_heartbeat = Some(now + HEARTBEAT_EVERY);
                        self.heartbeating = true;
                        return Some(Action::Heartbeat);
                    }
                }
                Stage::Renew => {
                    self.stage = Stage::Prepare;
                    if let Some(a) = self.renewal(now) {
                        return Some(a);
                    }
                }
                Stage::Prepare => match self.preparation(now) {
                    Some(a) => return Some(a),
                    None => self.stage = Stage::Reconcile,
                },
                Stage::Reconcile => {
                    self.stage = Stage::Lease;
                    // Not while a lease call is out: its leases would be listed as unknown.
                    if self.reconcile && !self.lease_calls_out() && !self.work.is_empty() {
                        return Some(Action::ListLeases);
                    }
                }
                Stage::Lease => {
                    self.stage = Stage::Done;
                    if let Some(n) = self.lease_budget(now) {
                        let n = if self.probing { 1 } else { n };
                        self.leasing = Some(n);
                        return Some(Action::Lease(n));
                    }
                }
                Stage::Done => return None,
            }
        }
    }

    /// Renew what is being sent at a third of the shortest lease time (at most one call at a
    /// time), so a transfer slower than the lease time keeps its lease.
    fn renewal(&mut self, now: Instant) -> Option<Action> {
        let ttl = self.in_flight.values().copied().filter(|t| *t > 0).min();
        let Some(ttl) = ttl else {
            // Nothing to renew: the first renewal of what starts later is a third of its lease
            // time away, not overdue.
            self.last_renewal = now;
            return None;
        };
        let every = Duration::from_millis(ttl / 3).max(MIN_RENEW_EVERY);
        if self.renewing || now.saturating_duration_since(self.last_renewal) < every {
            return None;
        }
        self.last_renewal = now;
        self.renewing = true;
        Some(Action::Renew(self.in_flight.keys().copied().collect()))
    }

    /// A migration of the current work whose manifest must be prepared (or forgotten first).
    fn preparation(&mut self, now: Instant) -> Option<Action> {
        for w in self.work.iter().filter(|w| !w.finished) {
            let mid = w.migration_id;
            match self.migrations.get(&mid) {
                Some(Prep::Running { .. }) => continue,
                Some(Prep::Ready { uuid, round })
                    if *uuid == w.migration_uuid && *round == w.round =>
                {
                    continue
                }
                Some(Prep::Ready { uuid, .. }) if *uuid != w.migration_uuid => {
                    // Another cluster's migration of the same id: never send from it.
                    self.migrations.remove(&mid);
                    return Some(Action::Forget(mid));
                }
                Some(Prep::RetryAt(t)) if now < *t => continue,
                // Never prepared, due again, or the next round (scanned again; the manifest
                // of the last one is replaced).
                Some(Prep::Ready { .. } | Prep::RetryAt(_)) | None => {
                    self.migrations.insert(
                        mid,
                        Prep::Running {
                            uuid: w.migration_uuid.clone(),
                            round: w.round,
                        },
                    );
                    return Some(Action::Prepare(w.clone()));
                }
            }
        }
        None
    }

    /// Whether a lease call or a completion that leases is out.
    fn lease_calls_out(&self) -> bool {
        self.leasing.is_some() || self.scan_leasing.0 > 0
    }

    /// The room left under `max_in_flight`, less what the calls out asked for.
    fn lease_room(&self) -> u32 {
        let asked = self
            .leasing
            .unwrap_or(0)
            .saturating_add(self.scan_leasing.1);
        self.max_in_flight
            .saturating_sub(u32::try_from(self.in_flight.len()).unwrap_or(u32::MAX))
            .saturating_sub(asked)
    }

    /// How many leases to ask for now, if any: the room left under `max_in_flight`, while some
    /// migration is unfinished, no backoff is running and no lease call is out.
    fn lease_budget(&self, now: Instant) -> Option<u32> {
        let free = self.lease_room();
        if self.lease_calls_out()
            || self.lease_idle_until.is_some_and(|t| now < t)
            || free == 0
            || self.work.iter().all(|w| w.finished)
            || self.lease_backoff.waiting(now)
        {
            return None;
        }
        Some(free)
    }

    /// A heartbeat succeeded with this work. When it differs from the last (a round started,
    /// a scan completed, a migration finished), the next heartbeat goes at once: the coordinator
    /// holds it until the next change, so that change reaches this source half a round trip
    /// after it happened instead of up to [`HEARTBEAT_EVERY`] later (on a 150 ms path that was
    /// most of a no-change sync round). An unchanged answer waits out the interval as before.
    pub fn heartbeat_answered(&mut self, work: Vec<SourceWork>) {
        self.heartbeating = false;
        if work != self.work {
            self.next_heartbeat = None;
        }
        self.work = work;
    }

    /// A heartbeat failed: the next one goes when due.
    pub fn heartbeat_failed(&mut self) {
        self.heartbeating = false;
    }

    /// The work of the last heartbeat answered.
    pub fn work(&self) -> &[SourceWork] {
        &self.work
    }

    /// A renewal call ended (whatever its outcome: a lease no longer ours is refused by its
    /// target, and a failed call is tried again at the next due time).
    pub fn renewal_ended(&mut self) {
        self.renewing = false;
    }

    /// A migration's manifest is loaded or completely scanned.
    pub fn prepared(&mut self, mid: u64) {
        // Its segments are registered: lease from it at once, with the whole room.
        self.lease_idle_until = None;
        self.probing = false;
        if let Some(Prep::Running { uuid, round }) = self.migrations.remove(&mid) {
            self.migrations.insert(mid, Prep::Ready { uuid, round });
        }
    }

    /// Preparing a migration failed at `now`: try again after [`PREPARE_RETRY`].
    pub fn prepare_failed(&mut self, now: Instant, mid: u64) {
        self.migrations
            .insert(mid, Prep::RetryAt(now + PREPARE_RETRY));
    }

    /// The coordinator answered which leases this agent holds.
    pub fn listed(&mut self) {
        self.reconcile = false;
    }

    /// Whether this lease is being sent.
    pub fn holds(&self, key: &LeaseKey) -> bool {
        self.in_flight.contains_key(key)
    }

    /// Sending a lease started (a lease granted, or one adopted by a reconciliation).
    pub fn started(&mut self, key: LeaseKey, ttl_ms: u64) {
        self.in_flight.insert(key, ttl_ms);
    }

    /// Sending a lease ended (reported, or abandoned).
    pub fn finished(&mut self, key: &LeaseKey) {
        self.in_flight.remove(key);
    }

    /// A lease request succeeded: the backoff starts over. Record each lease with
    /// [`Self::started`].
    pub fn leased(&mut self) {
        self.leasing = None;
        self.probing = false;
        self.lease_backoff.succeeded();
    }

    /// A scan is about to complete at `now`: how many leases its completion may ask for (the
    /// room left by what is held and what the calls out asked for; 0 while a backoff runs).
    /// When more than 0, the completion counts as a lease call out until
    /// [`Self::scan_leased`] or [`Self::scan_lease_failed`] (or [`Self::lease_not_asked`]).
    pub fn lease_with_scan(&mut self, now: Instant) -> u32 {
        // Its segments are about to be leasable: an idle wait does not apply.
        self.lease_idle_until = None;
        let n = self.lease_room();
        if n == 0 || self.lease_backoff.waiting(now) {
            return 0;
        }
        self.scan_leasing.0 += 1;
        self.scan_leasing.1 = self.scan_leasing.1.saturating_add(n);
        n
    }

    /// The completion granted room (`asked`) by [`Self::lease_with_scan`] did not ask after
    /// all, or its call ended.
    pub fn lease_not_asked(&mut self, asked: u32) {
        self.scan_leasing.0 = self.scan_leasing.0.saturating_sub(1);
        self.scan_leasing.1 = self.scan_leasing.1.saturating_sub(asked);
    }

    /// A completion that asked for `asked` leases was answered at `now` with `got`: record
    /// each with [`Self::started`]. Fewer than asked: as [`Self::lease_answered`].
    pub fn scan_leased(&mut self, asked: u32, got: usize, now: Instant) {
        self.lease_not_asked(asked);
        self.probing = false;
        self.lease_backoff.succeeded();
        if got < asked as usize {
            self.nothing_more_to_lease(now);
        }
    }

    /// A completion that asked for `asked` leases failed, or an attempt of it went unanswered,
    /// at `now`: as [`Self::lease_failed`].
    pub fn scan_lease_failed(&mut self, asked: u32, now: Instant) {
        self.lease_not_asked(asked);
        self.reconcile = true;
        self.lease_backoff.failed(now);
    }

    /// The lease call out, which asked for `asked`, was answered at `now` with `got` leases:
    /// record each with [`Self::started`]. Fewer than asked: nothing more to lease for now.
    pub fn lease_answered(&mut self, asked: u32, got: usize, now: Instant) {
        self.leased();
        if got < asked as usize {
            self.nothing_more_to_lease(now);
        }
    }

    /// The last lease call, answered at `now`, got fewer leases than it asked for: there is
    /// nothing more to lease for now; ask again (for one) a tick later, or when a scan
    /// completes.
    pub fn nothing_more_to_lease(&mut self, now: Instant) {
        self.lease_idle_until = Some(now + TICK);
        self.probing = true;
    }

    /// A lease request failed at `now`: the coordinator may have granted leases whose answer was
    /// lost, so list them next round; ask again after a backoff. Returns whether this is the
    /// first failure since a success, and the delay.
    pub fn lease_failed(&mut self, now: Instant) -> (bool, Duration) {
        self.leasing = None;
        self.reconcile = true;
        self.lease_backoff.failed(now)
    }

    /// The leases being sent: what a stopping agent releases.
    pub fn in_flight(&self) -> impl Iterator<Item = LeaseKey> + '_ {
        self.in_flight.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(mid: u64, uuid: &str) -> SourceWork {
        SourceWork {
            migration_id: mid,
            migration_uuid: uuid.into(),
            source_path: "/src".into(),
            ..Default::default()
        }
    }

    fn key(sid: u64) -> LeaseKey {
        LeaseKey {
            migration_id: 1,
            segment_id: sid,
            epoch: 7,
        }
    }

    /// All actions of one round at `now`, answering heartbeats with `w` and reconciliations
    /// successfully; leases granted as asked, with lease time `ttl_ms`, starting at `next_sid`.
    /// Rounds within one heartbeat interval.
    const STEP: Duration = Duration::from_millis(HEARTBEAT_EVERY.as_millis() as u64 / 4);

    fn round(s: &mut SourceSchedule, now: Instant, w: &[SourceWork]) -> Vec<Action> {
        s.start_round();
        let mut out = Vec::new();
        while let Some(a) = s.next(now) {
            match &a {
                Action::Heartbeat => s.heartbeat_answered(w.to_vec()),
                Action::ListLeases => s.listed(),
                _ => {}
            }
            out.push(a);
        }
        out
    }

    #[test]
    fn a_round_heartbeats_prepares_reconciles_then_asks_for_the_room_left() {
        let t0 = Instant::now();
        let mut s = SourceSchedule::new(t0, 4);
        let w = [work(1, "u1")];
        assert_eq!(
            round(&mut s, t0, &w),
            vec![
                Action::Heartbeat,
                Action::Prepare(w[0].clone()),
                Action::ListLeases,
                Action::Lease(4)
            ]
        );
        // Two leases granted: the next round asks for the other two, and no heartbeat is due
        // yet, no preparation runs twice, and the reconciliation is done.
        s.leased();
        s.started(key(1), 120_000);
        s.started(key(2), 120_000);
        // The first answer changed the work (none before): the next heartbeat goes at once.
        assert_eq!(
            round(&mut s, t0 + STEP, &w),
            vec![Action::Heartbeat, Action::Lease(2)]
        );
        s.leased();
        s.started(key(3), 120_000);
        s.started(key(4), 120_000);
        assert_eq!(round(&mut s, t0 + 2 * STEP, &w), vec![], "no room left");
        s.finished(&key(2));
        assert_eq!(round(&mut s, t0 + 3 * STEP, &w), vec![Action::Lease(1)]);
        // One lease call at a time: none while that one is out.
        assert_eq!(round(&mut s, t0 + 3 * STEP, &w), vec![]);
        s.leased();
        // That answer was the same: the one after waits out the interval.
        assert_eq!(
            round(&mut s, t0 + HEARTBEAT_EVERY, &w),
            vec![Action::Lease(1)]
        );
        s.leased();
        assert_eq!(
            round(&mut s, t0 + STEP + HEARTBEAT_EVERY, &w),
            vec![Action::Heartbeat, Action::Lease(1)]
        );
    }

    #[test]
    fn after_a_short_lease_answer_the_next_call_waits_a_tick_or_a_completed_scan() {
        let t0 = Instant::now();
        let mut s = SourceSchedule::new(t0, 4);
        let w = [work(1, "u1")];
        round(&mut s, t0, &w);
        s.prepared(1);
        s.leased();
        let leases = |s: &mut SourceSchedule, now| {
            round(s, now, &w)
                .into_iter()
                .filter(|a| matches!(a, Action::Lease(_)))
                .collect::<Vec<_>>()
        };
        s.nothing_more_to_lease(t0);
        assert_eq!(
            leases(&mut s, t0 + TICK / 2),
            vec![],
            "not polled in a loop"
        );
        assert_eq!(
            leases(&mut s, t0 + TICK),
            vec![Action::Lease(1)],
            "an idle source probes for one, leaving the room to a completing scan"
        );
        s.leased();
        assert_eq!(
            leases(&mut s, t0 + TICK),
            vec![Action::Lease(4)],
            "a probe that got what it asked for ends the probing"
        );
        s.leased();
        s.nothing_more_to_lease(t0 + TICK);
        s.prepared(1);
        assert_eq!(
            leases(&mut s, t0 + TICK),
            vec![Action::Lease(4)],
            "a completed scan has registered segments"
        );
    }

    #[test]
    fn leases_are_not_listed_while_a_lease_call_is_out() {
        let t0 = Instant::now();
        let mut s = SourceSchedule::new(t0, 4);
        let w = [work(1, "u1")];
        s.heartbeat_answered(w.to_vec());
        s.prepared(1);
        s.listed();
        s.start_round();
        let acts: Vec<_> = std::iter::from_fn(|| s.next(t0)).collect();
        assert!(acts.contains(&Action::Lease(4)), "{acts:?}");
        // A heartbeat answer or a failed renewal may ask for a reconciliation meanwhile: it
        // waits for the lease call, whose leases it would take for unknown ones.
        s.reconcile = true;
        s.start_round();
        let acts: Vec<_> = std::iter::from_fn(|| s.next(t0)).collect();
        assert!(!acts.contains(&Action::ListLeases), "{acts:?}");
        s.leased();
        s.start_round();
        let acts: Vec<_> = std::iter::from_fn(|| s.next(t0)).collect();
        assert!(acts.contains(&Action::ListLeases), "{acts:?}");
    }

    #[test]
    fn a_changed_answer_is_followed_by_the_next_heartbeat_at_once() {
        let t0 = Instant::now();
        let mut s = SourceSchedule::new(t0, 4);
        let mut w = work(1, "u1");
        w.finished = true;
        round(&mut s, t0, std::slice::from_ref(&w));
        // Unchanged answers: one heartbeat per interval.
        round(&mut s, t0 + STEP, std::slice::from_ref(&w));
        assert!(
            !round(&mut s, t0 + 2 * STEP, std::slice::from_ref(&w)).contains(&Action::Heartbeat)
        );
        // A new round: the answer after the change is asked for at once.
        let mut next = w.clone();
        next.round = 1;
        next.finished = false;
        assert_eq!(s.next(t0 + 2 * STEP), None);
        s.start_round();
        let acts = round(
            &mut s,
            t0 + STEP + HEARTBEAT_EVERY,
            std::slice::from_ref(&next),
        );
        assert_eq!(acts.first(), Some(&Action::Heartbeat));
        let acts = round(
            &mut s,
            t0 + STEP + HEARTBEAT_EVERY + Duration::from_millis(1),
            std::slice::from_ref(&next),
        );
        assert_eq!(
            acts.first(),
            Some(&Action::Heartbeat),
            "at once, not {HEARTBEAT_EVERY:?} later"
        );
        let acts = round(
            &mut s,
            t0 + STEP + HEARTBEAT_EVERY + Duration::from_millis(2),
            std::slice::from_ref(&next),
        );
        assert!(
            !acts.contains(&Action::Heartbeat),
            "unchanged: the interval again"
        );
    }

    #[test]
    fn nothing_is_leased_without_unfinished_work() {
        let t0 = Instant::now();
        let mut s = SourceSchedule::new(t0, 4);
        assert_eq!(round(&mut s, t0, &[]), vec![Action::Heartbeat]);
        let mut done = work(1, "u1");
        done.finished = true;
        assert_eq!(
            round(&mut s, t0 + HEARTBEAT_EVERY, &[done]),
            vec![Action::Heartbeat, Action::ListLeases]
        );
    }

    #[test]
    fn leases_are_renewed_at_a_third_of_their_time_one_call_at_a_time() {
        let t0 = Instant::now();
        let mut s = SourceSchedule::new(t0, 8);
        let w = [work(1, "u1")];
        round(&mut s, t0, &w);
        s.prepared(1);
        s.started(key(1), 30_000);
        s.started(key(2), 60_000);
        let renewals = |acts: Vec<Action>| -> Vec<Action> {
            acts.into_iter()
                .filter(|a| matches!(a, Action::Renew(_)))
                .collect()
        };
        // The shortest lease time rules: 30 s / 3 = 10 s after the last renewal (the start).
        assert_eq!(
            renewals(round(&mut s, t0 + Duration::from_millis(9_999), &w)),
            vec![]
        );
        assert_eq!(
            renewals(round(&mut s, t0 + Duration::from_secs(10), &w)),
            vec![Action::Renew(vec![key(1), key(2)])]
        );
        // The call has not ended: no second one, however late.
        assert_eq!(
            renewals(round(&mut s, t0 + Duration::from_secs(25), &w)),
            vec![]
        );
        s.renewal_ended();
        assert_eq!(
            renewals(round(&mut s, t0 + Duration::from_secs(25), &w)),
            vec![Action::Renew(vec![key(1), key(2)])]
        );
        s.renewal_ended();
        // Very short leases are not renewed more than once a second.
        s.finished(&key(1));
        s.finished(&key(2));
        s.started(key(3), 900);
        assert_eq!(
            renewals(round(&mut s, t0 + Duration::from_millis(25_999), &w)),
            vec![]
        );
        assert_eq!(
            renewals(round(&mut s, t0 + Duration::from_secs(26), &w)),
            vec![Action::Renew(vec![key(3)])]
        );
    }

    #[test]
    fn the_first_renewal_is_a_third_of_the_lease_time_after_the_transfer_starts() {
        let t0 = Instant::now();
        let mut s = SourceSchedule::new(t0, 8);
        let w = [work(1, "u1")];
        round(&mut s, t0, &w);
        // Idle for a minute: the clock of renewals follows.
        round(&mut s, t0 + Duration::from_secs(60), &w);
        s.started(key(1), 30_000);
        let acts = round(&mut s, t0 + Duration::from_secs(61), &w);
        assert!(
            !acts.iter().any(|a| matches!(a, Action::Renew(_))),
            "{acts:?}"
        );
        let acts = round(&mut s, t0 + Duration::from_secs(70), &w);
        assert!(acts.contains(&Action::Renew(vec![key(1)])), "{acts:?}");
    }

    #[test]
    fn failed_lease_requests_back_off_and_reconcile_before_asking_again() {
        let t0 = Instant::now();
        let mut s = SourceSchedule::new(t0, 2);
        let w = [work(1, "u1")];
        round(&mut s, t0, &w);
        s.prepared(1);
        let mut now = t0;
        let mut last = Duration::ZERO;
        for i in 0..8 {
            let (first, delay) = s.lease_failed(now);
            assert_eq!(first, i == 0);
            assert!(delay <= 2 * LEASE_BACKOFF_MAX, "{delay:?}");
            // While the delay runs, the round lists the leases (the lost answer may have granted
            // some) but does not ask for more.
            let acts = round(&mut s, now + delay / 2, &w);
            assert!(
                !acts.iter().any(|a| matches!(a, Action::Lease(_))),
                "{acts:?}"
            );
            now += delay;
            let acts = round(&mut s, now, &w);
            assert!(acts.contains(&Action::Lease(2)), "{acts:?}");
            last = delay;
        }
        assert!(last >= LEASE_BACKOFF_MAX, "grew to the cap: {last:?}");
        s.leased();
        assert!(round(&mut s, now, &w).contains(&Action::Lease(2)));
        let (first, delay) = s.lease_failed(now);
        assert!(
            first && delay <= 2 * TICK,
            "a success starts over: {delay:?}"
        );
    }

    #[test]
    fn one_heartbeat_runs_at_a_time_and_the_next_goes_when_it_ends() {
        let t0 = Instant::now();
        let mut s = SourceSchedule::new(t0, 2);
        s.start_round();
        assert_eq!(s.next(t0), Some(Action::Heartbeat));
        // Still held by the coordinator (a long poll) when the next is due: not sent again.
        s.start_round();
        assert_eq!(s.next(t0 + HEARTBEAT_EVERY), None);
        s.heartbeat_answered(Vec::new());
        s.start_round();
        assert_eq!(s.next(t0 + HEARTBEAT_EVERY), Some(Action::Heartbeat));
        s.heartbeat_failed();
        s.start_round();
        assert_eq!(s.next(t0 + HEARTBEAT_EVERY + STEP), None, "not due yet");
        s.start_round();
        assert_eq!(s.next(t0 + 2 * HEARTBEAT_EVERY), Some(Action::Heartbeat));
    }

    #[test]
    fn a_reconciliation_is_repeated_until_it_succeeds() {
        let t0 = Instant::now();
        let mut s = SourceSchedule::new(t0, 2);
        s.start_round();
        assert_eq!(s.next(t0), Some(Action::Heartbeat));
        s.heartbeat_answered(vec![work(1, "u1")]);
        assert!(matches!(s.next(t0), Some(Action::Prepare(_))));
        assert_eq!(s.next(t0), Some(Action::ListLeases));
        // Failed (no `listed`): the round goes on to ask for leases, and the next round lists
        // again, once.
        assert_eq!(s.next(t0), Some(Action::Lease(2)));
        assert_eq!(s.next(t0), None);
        s.leased();
        s.start_round();
        // The first answer changed the work: a heartbeat at once.
        assert_eq!(s.next(t0 + STEP), Some(Action::Heartbeat));
        s.heartbeat_answered(vec![work(1, "u1")]);
        assert_eq!(s.next(t0 + STEP), Some(Action::ListLeases));
        s.listed();
        assert_eq!(s.next(t0 + STEP), Some(Action::Lease(2)));
        s.leased();
        s.start_round();
        assert_eq!(s.next(t0 + 2 * STEP), Some(Action::Lease(2)));
    }

    #[test]
    fn a_failed_preparation_is_retried_later_and_another_clusters_manifest_is_forgotten() {
        let t0 = Instant::now();
        let mut s = SourceSchedule::new(t0, 2);
        let w = [work(1, "u1")];
        assert!(round(&mut s, t0, &w).contains(&Action::Prepare(w[0].clone())));
        // Running: not started twice.
        let acts = round(&mut s, t0 + TICK, &w);
        assert!(!acts.iter().any(|a| matches!(a, Action::Prepare(_))));
        s.prepare_failed(t0 + TICK, 1);
        let acts = round(&mut s, t0 + TICK + PREPARE_RETRY / 2, &w);
        assert!(!acts.iter().any(|a| matches!(a, Action::Prepare(_))));
        let acts = round(&mut s, t0 + TICK + PREPARE_RETRY, &w);
        assert!(acts.contains(&Action::Prepare(w[0].clone())), "{acts:?}");
        s.prepared(1);
        let later = t0 + 2 * PREPARE_RETRY;
        assert!(!round(&mut s, later, &w)
            .iter()
            .any(|a| matches!(a, Action::Prepare(_) | Action::Forget(_))));
        // The coordinator's data was replaced: migration 1 is now another migration.
        let other = [work(1, "u2")];
        let acts = round(&mut s, later + HEARTBEAT_EVERY, &other);
        assert_eq!(
            acts[..3],
            [
                Action::Heartbeat,
                Action::Forget(1),
                Action::Prepare(other[0].clone())
            ]
        );
    }

    /// A completing scan takes the room the calls out leave: an idle source's lease call asks
    /// for one, so a scan that completes while it is out leases the rest; no other lease call
    /// goes while a completion is out.
    #[test]
    fn a_completing_scan_takes_the_room_the_calls_out_leave() {
        let t0 = Instant::now();
        let mut s = SourceSchedule::new(t0, 4);
        let w = [work(1, "u1")];
        let leases = |s: &mut SourceSchedule, now| {
            round(s, now, &w)
                .into_iter()
                .filter(|a| matches!(a, Action::Lease(_)))
                .collect::<Vec<_>>()
        };
        assert_eq!(leases(&mut s, t0), vec![Action::Lease(4)]);
        s.leased();
        s.nothing_more_to_lease(t0);
        assert_eq!(leases(&mut s, t0 + TICK), vec![Action::Lease(1)]);
        assert_eq!(s.lease_with_scan(t0 + TICK), 3, "the room the probe left");
        assert_eq!(s.lease_with_scan(t0 + TICK), 0, "none left");
        s.leased();
        assert_eq!(leases(&mut s, t0 + TICK), vec![], "a completion is out");
        s.scan_leased(3, 3, t0 + TICK);
        for sid in 1..=3 {
            s.started(key(sid), 1000);
        }
        assert_eq!(leases(&mut s, t0 + TICK), vec![Action::Lease(1)]);
        s.leased();
        s.started(key(4), 1000);
        assert_eq!(s.lease_with_scan(t0 + TICK), 0, "every slot is held");
        s.finished(&key(1));
        assert_eq!(s.lease_with_scan(t0 + TICK), 1);
        s.lease_not_asked(1);
        assert_eq!(leases(&mut s, t0 + TICK), vec![Action::Lease(1)]);
    }
}
