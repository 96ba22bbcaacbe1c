//! Deterministic simulation of the decision cores (issue 17): the replicated state machine
//! ([`State`]) driven by model agents and a model operator over a model network, on virtual
//! time, from one seeded random number generator. Nothing here touches a socket, a file or the
//! clock, so a seed replays exactly.
//!
//! What it throws at the state machine: requests and answers delayed, reordered, duplicated
//! and lost; the source and the target agent crashing (losing everything but their disk and
//! their record of the hooks they ran) and coming back with new sessions; leases expiring;
//! bytes damaged in transit; the leader changing (the new leader's state rebuilt from a
//! snapshot of the old, the calls in flight lost or applied with their answers lost); the
//! operator starting sync rounds and cutovers and aborting them. After every step each
//! invariant (one module each, [`invariants`]) is checked; after the faults stop, the
//! migration must settle.
//!
//! A failure names its seed and the command that replays it:
//! `FERRY_SIM_SEED=<seed> FERRY_SIM_STEPS=<steps> cargo test -p ferry-coordinator --lib
//! sim::replay -- --nocapture`. The CI runs [`CI_SEEDS`] seeds of [`CI_STEPS`] steps; a longer
//! soak is `FERRY_SIM_SEEDS=200 FERRY_SIM_STEPS=50000 cargo test --release -p
//! ferry-coordinator --lib sim::seeds`.

mod invariants;

use std::collections::BTreeMap;

use super::*;

/// Seeds the test suite runs.
pub const CI_SEEDS: u64 = 20;
/// Steps of each of them (with faults; the settling after them is extra).
pub const CI_STEPS: u64 = 10_000;
/// Most steps the migration may take to settle once the faults stopped.
const SETTLE_STEPS: u64 = 40_000;
/// Lease duration the model source asks for.
const TTL_MS: u64 = 3_000;
/// Segments of the bulk copy.
const BULK_SEGMENTS: u64 = 16;
/// The events kept for a failure's report.
const TRACE: usize = 40;

/// xorshift64*: small, fast, and the same on every platform.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407)
            | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// `true` with probability `n / d`.
    fn chance(&mut self, n: u64, d: u64) -> bool {
        self.next() % d < n
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Who sends or receives a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Actor {
    Source,
    /// Member `i` of the target pool: 0 is the migration's first target (it runs the target's
    /// cutover steps), 1 joins and leaves as the operator says.
    Target(usize),
    Operator,
}

/// Target agents in the model: both write to one object store (the model's `disk`).
const TARGETS: usize = 2;

/// The name of target `i`.
fn target_name(i: usize) -> &'static str {
    ["dst", "dst2"][i]
}

/// Segments of the bulk copy that are the pieces of one split file (first id, count).
const SPLIT_FILE: (u64, u32) = (4, 4);

/// A message in flight.
#[derive(Debug, Clone)]
enum Msg {
    /// A call to the coordinator (applied when delivered: committed).
    Call { from: Actor, cmd: Command },
    /// Its answer.
    Answer {
        to: Actor,
        cmd: Command,
        resp: Response,
    },
    /// A segment's bytes (their hash as received, and the hash the source sent with them).
    Data {
        lease: Lease,
        session: u64,
        received: Digest,
        sent: Digest,
    },
    /// The target's answer to a segment's bytes.
    Ack {
        lease: Lease,
        session: u64,
        stored: bool,
    },
}

#[derive(Debug, Clone)]
struct InFlight {
    at: u64,
    msg: Msg,
}

/// A deliberate bug, to show the invariants catch one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// The target reports a segment before its bytes are durable, and loses them when it
    /// crashes before it syncs.
    ReportBeforeDurable,
}

/// An agent process as the model keeps it. `session == 0`: down, or not registered yet.
#[derive(Debug, Default)]
struct Agent {
    up: bool,
    session: u64,
    registered: bool,
    /// The session of the last process that registered (its state directory keeps it).
    last_session: u64,
    /// When it comes back, if it is down.
    back_at: u64,
    /// Leases being sent (source): the lease and when it was granted.
    held: BTreeMap<(u64, u64), Lease>,
    /// The round whose scan this process registered (source).
    scanned_round: Option<u32>,
    next_renew: u64,
    next_heartbeat: u64,
    next_lease: u64,
    /// Bytes written but not synced (target, with [`Bug::ReportBeforeDurable`]).
    unsynced: BTreeMap<u64, Digest>,
}

/// Counts of what a run did, to show a run is not vacuous.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Messages lost.
    pub dropped: u64,
    /// Messages delivered twice.
    pub duplicated: u64,
    /// Agent crashes.
    pub crashes: u64,
    /// Leader changes.
    pub leader_changes: u64,
    /// Segments damaged in transit.
    pub damaged: u64,
    /// Sync rounds started.
    pub rounds: u64,
    /// Cutovers that switched.
    pub switched: u64,
    /// Cutovers that rolled back.
    pub aborted: u64,
    /// Segments verified.
    pub verified: u64,
    /// Segments verified at the second target (it joined the pool).
    pub pooled: u64,
}

/// One simulated migration.
pub struct Sim {
    seed: u64,
    rng: Rng,
    step: u64,
    now: u64,
    index: u64,
    /// The leader's applied state.
    state: State,
    /// Every committed command with its log index, for replicas rebuilt from scratch.
    log: Vec<(u64, Command)>,
    net: Vec<InFlight>,
    src: Agent,
    dsts: [Agent; TARGETS],
    mid: u64,
    /// The source's data: each segment's content hash (a segment stands for the files it
    /// carries; a round's segments are what changed before it).
    content: BTreeMap<u64, Digest>,
    /// The target's disk: what it holds durably, per segment.
    disk: BTreeMap<u64, Digest>,
    /// Which target wrote a piece of the split file first (its sidecar: the file's part or
    /// multipart upload lives in that agent's state directory).
    piece_writer: Option<usize>,
    /// A piece of the split file written by a target other than the one holding its sidecar.
    pieces_split: Option<String>,
    /// Whether the source application is frozen (its `pre_freeze` ran, no `rollback` since).
    frozen: bool,
    /// How many times each hook ran, per cutover attempt: the hooks' own side effects.
    hooks_ran: BTreeMap<(u32, Step), u32>,
    /// The agents' own records of the hooks and verifications they ran (kept on disk), which
    /// they report again instead of running a hook twice.
    ran: BTreeMap<(u32, Step), StepRun>,
    faults: bool,
    bug: Option<Bug>,
    last_cutover: Option<(u32, CutoverPhase)>,
    trace: std::collections::VecDeque<String>,
    /// What the invariants compare the next step with.
    seen: invariants::Seen,
    /// What the run did.
    pub tally: Tally,
}

impl Sim {
    /// A new world: both agents registered, one migration created.
    pub fn new(seed: u64, bug: Option<Bug>) -> Sim {
        let mut s = Sim {
            seed,
            rng: Rng::new(seed),
            step: 0,
            now: 1_000,
            index: 0,
            state: State::default(),
            log: Vec::new(),
            net: Vec::new(),
            src: Agent::default(),
            dsts: Default::default(),
            mid: 0,
            content: BTreeMap::new(),
            disk: BTreeMap::new(),
            piece_writer: None,
            pieces_split: None,
            frozen: false,
            hooks_ran: BTreeMap::new(),
            ran: BTreeMap::new(),
            faults: true,
            bug,
            last_cutover: None,
            trace: Default::default(),
            seen: Default::default(),
            tally: Tally::default(),
        };
        s.src.up = true;
        for d in &mut s.dsts {
            d.up = true;
        }
        // The source and the first target register, then the operator creates the migration,
        // all before any fault; the second target registers when it first ticks.
        for a in [Actor::Source, Actor::Target(0)] {
            let cmd = s.register(a);
            let resp = s.commit(cmd.clone());
            s.answered(a, cmd, resp);
        }
        let created = s.commit(Command::CreateMigration {
            name: "sim".into(),
            idempotency_key: String::new(),
            spec: MigrationSpec::for_tests("/data", 1 << 20),
            uuid: format!("{seed:032x}"),
            throttle: String::new(),
            now_ms: s.now,
        });
        let Response::MigrationCreated(mid) = created else {
            panic!("seed {seed}: the migration was not created: {created:?}")
        };
        s.mid = mid;
        s
    }

    fn note(&mut self, what: String) {
        if self.trace.len() == TRACE {
            self.trace.pop_front();
        }
        self.trace
            .push_back(format!("[{} @{}ms] {what}", self.step, self.now));
    }

    /// Applies `cmd` on the leader: committed.
    fn commit(&mut self, cmd: Command) -> Response {
        self.index += 1;
        self.log.push((self.index, cmd.clone()));
        self.state.apply(self.index, cmd)
    }

    fn send(&mut self, msg: Msg) {
        let delay = 1 + self.rng.below(if self.faults { 400 } else { 50 });
        self.net.push(InFlight {
            at: self.now + delay,
            msg,
        });
    }

    fn call(&mut self, from: Actor, cmd: Command) {
        self.send(Msg::Call { from, cmd });
    }

    fn agent(&mut self, a: Actor) -> &mut Agent {
        match a {
            Actor::Source => &mut self.src,
            Actor::Target(i) => &mut self.dsts[i],
            Actor::Operator => unreachable!("the operator is no agent"),
        }
    }

    /// A new process of agent `a` registers: it keeps its session in its state directory
    /// first, naming the one before it.
    fn register(&mut self, a: Actor) -> Command {
        let session = self.rng.next() | 1;
        let ag = self.agent(a);
        let previous = ag.last_session;
        ag.session = session;
        ag.registered = false;
        ag.last_session = session;
        self.registration(a, session, previous)
    }

    /// The registration of session `session` of agent `a`.
    fn registration(&self, a: Actor, session: u64, previous: u64) -> Command {
        let (name, addr, root) = match a {
            Actor::Source => ("src", String::new(), ""),
            Actor::Target(i) => (
                target_name(i),
                format!("127.0.0.1:{}", 9 + i),
                "s3://sim/data",
            ),
            Actor::Operator => unreachable!("the operator does not register"),
        };
        Command::RegisterAgent {
            name: name.into(),
            data_addr: addr,
            session,
            previous,
            new_cluster_id: "sim-cluster".into(),
            applies_owners: true,
            congestion: "bbr".into(),
            window_bytes: 64 << 20,
            target_root: root.into(),
            now_ms: self.now,
        }
    }

    /// Runs `steps` steps with faults, then lets the migration settle; checks every invariant
    /// after each step. Returns what it did, or why an invariant broke.
    pub fn run(mut self, steps: u64) -> Result<Tally, String> {
        for _ in 0..steps {
            self.step()?;
        }
        self.faults = false;
        // Everything down comes back; the operator lets the last round and cutover finish.
        for _ in 0..SETTLE_STEPS {
            if self.settled() {
                invariants::at_end(&self).map_err(|e| self.failure(e))?;
                self.tally.verified = self
                    .state
                    .segments
                    .values()
                    .filter(|s| s.state == SegState::Verified)
                    .count() as u64;
                self.tally.pooled = self
                    .migration()
                    .targets
                    .get(1)
                    .map_or(0, |t| t.verified_segments);
                return Ok(self.tally);
            }
            self.step()?;
        }
        Err(self.failure(format!(
            "the migration did not settle within {SETTLE_STEPS} steps after the faults stopped: \
             phase {:?}, cutover {:?}, {} messages in flight",
            self.migration().phase,
            self.migration().cutover.as_ref().map(|c| c.phase),
            self.net.len()
        )))
    }

    fn migration(&self) -> &Migration {
        &self.state.migrations[&self.mid]
    }

    /// Nothing more happens by itself: the round ended, no cutover runs, both agents are up
    /// and idle, nothing is in flight.
    fn settled(&self) -> bool {
        let m = self.migration();
        m.phase.finished()
            && !m.cutover_running()
            && self.net.is_empty()
            && self.src.up
            && self.src.registered
            && self.dsts.iter().all(|d| d.up && d.registered)
            && self.src.held.is_empty()
    }

    fn failure(&self, why: String) -> String {
        format!(
            "seed {} step {}: {why}\nreplay: FERRY_SIM_SEED={} FERRY_SIM_STEPS={} cargo test -p \
             ferry-coordinator --lib sim::replay -- --nocapture\nlast events:\n{}",
            self.seed,
            self.step,
            self.seed,
            self.step.max(1),
            self.trace.iter().cloned().collect::<Vec<_>>().join("\n")
        )
    }

    /// One step: time passes, and one thing happens.
    fn step(&mut self) -> Result<(), String> {
        self.step += 1;
        self.now += 1 + self.rng.below(60);
        let roll = self.rng.below(100);
        match roll {
            0..=44 => self.deliver(),
            45..=64 => self.tick(Actor::Source),
            65..=79 => {
                let i = self.rng.below(TARGETS as u64) as usize;
                self.tick(Actor::Target(i))
            }
            80..=83 => self.operate(),
            84..=85 if self.faults => self.crash(),
            86 if self.faults && self.rng.chance(1, 4) => self.change_leader()?,
            _ => self.revive(),
        }
        invariants::each_step(self).map_err(|e| self.failure(e))?;
        self.count_cutovers();
        Ok(())
    }

    /// Counts cutover attempts as they end.
    fn count_cutovers(&mut self) {
        let now = self
            .migration()
            .cutover
            .as_ref()
            .map(|c| (c.attempt, c.phase));
        if now != self.last_cutover {
            match now {
                Some((_, CutoverPhase::Done)) => self.tally.switched += 1,
                Some((_, CutoverPhase::Aborted)) => self.tally.aborted += 1,
                _ => {}
            }
            self.last_cutover = now;
        }
    }

    /// Delivers one message that is due (any of them: messages overtake each other).
    fn deliver(&mut self) {
        let due: Vec<usize> = (0..self.net.len())
            .filter(|&i| self.net[i].at <= self.now)
            .collect();
        if due.is_empty() {
            return;
        }
        let i = due[self.rng.below(due.len() as u64) as usize];
        let f = self.net.swap_remove(i);
        if self.faults && self.rng.chance(3, 100) {
            self.tally.dropped += 1;
            self.note(format!("lost {:?}", short(&f.msg)));
            return;
        }
        if self.faults && self.rng.chance(3, 100) {
            self.tally.duplicated += 1;
            let again = InFlight {
                at: self.now + 1 + self.rng.below(500),
                msg: f.msg.clone(),
            };
            self.net.push(again);
        }
        match f.msg {
            Msg::Call { from, cmd } => {
                let cmd = restamp(cmd, self.now);
                let resp = self.commit(cmd.clone());
                self.note(format!(
                    "{from:?} {} -> {}",
                    short_cmd(&cmd),
                    short_resp(&resp)
                ));
                self.send(Msg::Answer {
                    to: from,
                    cmd,
                    resp,
                });
            }
            Msg::Answer { to, cmd, resp } => self.answered(to, cmd, resp),
            Msg::Data {
                lease,
                session,
                received,
                sent,
            } => self.receive(lease, session, received, sent),
            Msg::Ack {
                lease,
                session,
                stored,
            } => self.acked(lease, session, stored),
        }
    }

    /// An answer reaches `to` (ignored by a process that is not the one that asked).
    fn answered(&mut self, to: Actor, cmd: Command, resp: Response) {
        if to == Actor::Operator {
            return;
        }
        let session = self.agent(to).session;
        if !self.agent(to).up {
            return;
        }
        match (cmd, resp) {
            (Command::RegisterAgent { session: s, .. }, Response::Registered(_))
                if s == session =>
            {
                self.agent(to).registered = true;
            }
            (Command::RegisterAgent { session: s, .. }, Response::Conflict(_)) if s == session => {
                // Another process's session is still live: try again later.
                self.agent(to).session = 0;
            }
            (Command::LeaseSegments { session: s, .. }, Response::Leases(leases))
                if s == session =>
            {
                for l in leases {
                    self.src
                        .held
                        .insert((l.migration_id, l.segment_id), l.clone());
                    self.transfer(l);
                }
            }
            (cmd, Response::Refused(why))
                if refuses_session(&why) && cmd_session(&cmd) == Some(session) =>
            {
                // This process's session ended (a successor registered, or it timed out).
                let ag = self.agent(to);
                ag.registered = false;
                ag.session = 0;
                ag.held.clear();
            }
            _ => {}
        }
    }

    /// The source sends a leased segment's bytes.
    fn transfer(&mut self, l: Lease) {
        let Some(&sent) = self.content.get(&l.segment_id) else {
            return;
        };
        let mut received = sent;
        if self.faults && self.rng.chance(1, 50) {
            self.tally.damaged += 1;
            received[0] ^= 0xff;
        }
        let session = self.src.session;
        self.send(Msg::Data {
            lease: l,
            session,
            received,
            sent,
        });
    }

    /// The target gets a segment's bytes: checks the lease, writes them durably, reports.
    fn receive(&mut self, l: Lease, from: u64, received: Digest, sent: Digest) {
        let Some(i) = (0..TARGETS).find(|&i| target_name(i) == l.target_agent) else {
            return;
        };
        if !self.dsts[i].up || !self.dsts[i].registered {
            return;
        }
        let current = self.state.check_lease(
            target_name(i),
            l.migration_id,
            l.segment_id,
            l.epoch,
            self.now,
        );
        let ack = |stored| Msg::Ack {
            lease: l.clone(),
            session: from,
            stored,
        };
        if current.is_err() {
            self.send(ack(false));
            return;
        }
        let session = self.dsts[i].session;
        let report = |result, source_hash| {
            report(
                target_name(i),
                Role::Target,
                session,
                &l,
                result,
                source_hash,
                false,
            )
        };
        if received != sent {
            self.call(
                Actor::Target(i),
                report(
                    Err("the bytes' BLAKE3 differs from the source's".into()),
                    None,
                ),
            );
            self.send(ack(false));
            return;
        }
        let (first, count) = SPLIT_FILE;
        if (first..first + u64::from(count)).contains(&l.segment_id) {
            match self.piece_writer {
                Some(w) if w != i => {
                    self.pieces_split.get_or_insert(format!(
                        "piece {} of the split file was written by {}, but {} holds its sidecar",
                        l.segment_id,
                        target_name(i),
                        target_name(w)
                    ));
                }
                _ => self.piece_writer = Some(i),
            }
        }
        match self.bug {
            Some(Bug::ReportBeforeDurable) => {
                self.dsts[i].unsynced.insert(l.segment_id, received);
            }
            None => {
                // Written, synced, renamed into place: durable before anything is said.
                self.disk.insert(l.segment_id, received);
            }
        }
        self.call(Actor::Target(i), report(Ok(received), Some(sent)));
        self.send(ack(true));
    }

    /// The source hears from the target about a segment it sent.
    fn acked(&mut self, l: Lease, session: u64, stored: bool) {
        if !self.src.up || session != self.src.session {
            return;
        }
        if self
            .src
            .held
            .remove(&(l.migration_id, l.segment_id))
            .is_none()
        {
            return;
        }
        let result = if stored {
            Ok(self.content[&l.segment_id])
        } else {
            Err("the target did not store the segment".into())
        };
        let cmd = report("src", Role::Source, session, &l, result, None, false);
        self.call(Actor::Source, cmd);
    }

    /// An agent process does what is due: register, heartbeat, scan, lease, renew, cutover
    /// steps.
    fn tick(&mut self, a: Actor) {
        if !self.agent(a).up {
            return;
        }
        if self.agent(a).session == 0 {
            let cmd = self.register(a);
            self.call(a, cmd);
            return;
        }
        if !self.agent(a).registered {
            // Registration in flight, or its answer lost: ask again now and then (the same
            // session: idempotent).
            if self.rng.chance(1, 10) {
                let session = self.agent(a).session;
                let cmd = self.registration(a, session, 0);
                self.call(a, cmd);
            }
            return;
        }
        let name = actor_name(a);
        let session = self.agent(a).session;
        if self.now >= self.agent(a).next_heartbeat {
            self.agent(a).next_heartbeat = self.now + 2_000;
            self.call(
                a,
                Command::Heartbeat {
                    name: name.into(),
                    session,
                    now_ms: 0,
                },
            );
        }
        self.cutover_steps(a);
        if a == Actor::Source {
            self.source_work();
        }
    }

    /// The source: scan a round that needs it, lease, renew.
    fn source_work(&mut self) {
        let session = self.src.session;
        let m = self.migration().clone();
        let round = m.round().clone();
        if !m.scan_complete && m.phase != Phase::Done && m.phase != Phase::Failed {
            if self.src.scanned_round != Some(round.number) || self.rng.chance(1, 20) {
                // The scan: round 0 finds the whole tree; a later round what changed since
                // (nothing while the application is frozen).
                let n = match round.number {
                    0 => BULK_SEGMENTS,
                    _ if self.frozen => 0,
                    _ => self.rng.below(5),
                };
                let ids = round.first_segment..round.first_segment + n;
                let segs: Vec<SegmentReg> = ids
                    .map(|id| {
                        let hash = *self
                            .content
                            .entry(id)
                            .or_insert_with(|| *blake3::hash(&id.to_le_bytes()).as_bytes());
                        // Round 0 holds a file split into pieces: they must all go to one
                        // target.
                        let (first, count) = SPLIT_FILE;
                        let piece =
                            round.number == 0 && (first..first + u64::from(count)).contains(&id);
                        SegmentReg {
                            id,
                            bytes: 1000 + id,
                            files: u32::from(!piece || id == first),
                            fingerprint: hash,
                            piece_index: if piece { (id - first) as u32 } else { 0 },
                            piece_count: if piece { count } else { 0 },
                        }
                    })
                    .collect();
                self.src.scanned_round = Some(round.number);
                let mid = self.mid;
                self.call(
                    Actor::Source,
                    Command::RegisterSegments {
                        agent: "src".into(),
                        migration_id: mid,
                        segments: segs,
                    },
                );
                self.call(
                    Actor::Source,
                    Command::CompleteScan {
                        agent: "src".into(),
                        migration_id: mid,
                        segments_total: n,
                        issues: vec![],
                        issues_total: 0,
                        hardlinks: 0,
                        excluded: 0,
                        root_error: String::new(),
                        deleted: 0,
                        now_ms: 0,
                    },
                );
            }
            return;
        }
        if !m.phase.sending() {
            return;
        }
        if self.now >= self.src.next_lease && self.src.held.len() < 4 {
            self.src.next_lease = self.now + 100;
            let max = 1 + self.rng.below(4) as u32;
            self.call(
                Actor::Source,
                Command::LeaseSegments {
                    agent: "src".into(),
                    session,
                    max,
                    now_ms: 0,
                    ttl_ms: TTL_MS,
                },
            );
        }
        // A transfer that heard nothing for a lease's time is given up (it timed out): not
        // the segment's fault.
        let now = self.now;
        let timed_out: Vec<Lease> = self
            .src
            .held
            .values()
            .filter(|l| l.expires_ms + TTL_MS <= now)
            .cloned()
            .collect();
        for l in timed_out {
            self.src.held.remove(&(l.migration_id, l.segment_id));
            let timed_out = Err("the transfer timed out".into());
            self.call(
                Actor::Source,
                report("src", Role::Source, session, &l, timed_out, None, true),
            );
        }
        if self.now >= self.src.next_renew && !self.src.held.is_empty() {
            self.src.next_renew = self.now + TTL_MS / 3;
            let leases = self
                .src
                .held
                .values()
                .map(|l| (l.migration_id, l.segment_id, l.epoch))
                .collect();
            self.call(
                Actor::Source,
                Command::RenewLeases {
                    agent: "src".into(),
                    session,
                    leases,
                    now_ms: 0,
                    ttl_ms: TTL_MS,
                },
            );
        }
    }

    /// The digest of a tree as an agent reads it: its segments' contents.
    fn tree(of: &BTreeMap<u64, Digest>) -> TreeDigest {
        let mut h = blake3::Hasher::new();
        for (id, d) in of {
            h.update(&id.to_le_bytes());
            h.update(d);
        }
        TreeDigest {
            digest: *h.finalize().as_bytes(),
            files: of.len() as u64,
            ..TreeDigest::default()
        }
    }

    /// Agent `a` does the cutover steps that are its own and pending: a hook runs only if
    /// the agent has no record of running it for this attempt; otherwise that record is
    /// reported again.
    fn cutover_steps(&mut self, a: Actor) {
        let Some(c) = self.migration().cutover.clone() else {
            return;
        };
        let session = self.agent(a).session;
        for step in c.pending_steps() {
            // The first target runs the target's steps.
            if step.on_target() != (a == Actor::Target(0)) || a == Actor::Target(1) {
                continue;
            }
            let key = (c.attempt, step);
            let run = match self.ran.get(&key) {
                Some(r) => r.clone(),
                None => {
                    let tree = match step {
                        Step::VerifySource => Some(Self::tree(&self.content)),
                        Step::VerifyTarget => Some(Self::tree(&self.disk)),
                        _ => None,
                    };
                    if matches!(step, Step::PreFreeze | Step::Switch | Step::Rollback) {
                        *self.hooks_ran.entry(key).or_default() += 1;
                        match step {
                            Step::PreFreeze => self.frozen = true,
                            Step::Rollback => self.frozen = false,
                            _ => {}
                        }
                    }
                    let failed = self.faults && self.rng.chance(1, 20);
                    let run = StepRun {
                        step,
                        agent: String::new(),
                        command: format!("{} hook", step.as_str()),
                        exit_code: i32::from(failed && step != Step::Rollback),
                        output: String::new(),
                        started_ms: self.now,
                        duration_ms: 1,
                        recorded_ms: 0,
                        tree,
                    };
                    self.note(format!(
                        "{a:?} ran {} of attempt {}",
                        step.as_str(),
                        c.attempt
                    ));
                    self.ran.insert(key, run.clone());
                    run
                }
            };
            let name = actor_name(a);
            let mid = self.mid;
            self.call(
                a,
                Command::CutoverStep {
                    agent: name.into(),
                    session,
                    migration_id: mid,
                    attempt: c.attempt,
                    run,
                    now_ms: 0,
                },
            );
        }
    }

    /// The operator: a sync round, a cutover, now and then an abort.
    fn operate(&mut self) {
        let m = self.migration();
        let mid = self.mid;
        let now = self.now;
        let done = m.switched();
        let (finished, running) = (m.phase.finished(), m.cutover_running());
        if !self.faults {
            return;
        }
        // The second target joins, leaves and joins again.
        if self.rng.chance(1, 8) {
            let agent = target_name(1).to_string();
            let m = self.migration();
            let member = m.member(&agent).map(|i| m.targets[i as usize].active);
            let cmd = if member == Some(true) && self.rng.chance(1, 3) {
                Command::RemoveTarget {
                    migration_id: mid,
                    agent,
                }
            } else {
                Command::AddTarget {
                    migration_id: mid,
                    agent,
                }
            };
            self.call(Actor::Operator, cmd);
            return;
        }
        if finished && !running && !done {
            if self.rng.chance(1, 3) {
                self.tally.rounds += 1;
                self.call(
                    Actor::Operator,
                    Command::StartRound {
                        migration_id: mid,
                        now_ms: now,
                    },
                );
            } else if self.rng.chance(1, 4) {
                self.call(
                    Actor::Operator,
                    Command::StartCutover {
                        migration_id: mid,
                        now_ms: now,
                    },
                );
            }
        } else if running && self.rng.chance(1, 30) {
            self.call(Actor::Operator, Command::AbortCutover { migration_id: mid });
        }
    }

    /// An agent process dies: everything but its disk and its record of hooks is gone.
    fn crash(&mut self) {
        let a = match self.rng.below(1 + TARGETS as u64) {
            0 => Actor::Source,
            i => Actor::Target(i as usize - 1),
        };
        if !self.agent(a).up {
            return;
        }
        self.tally.crashes += 1;
        let back = self.now + 200 + self.rng.below(5_000);
        let ag = self.agent(a);
        let last = ag.last_session;
        // Bytes a buggy target never synced go with the process.
        *ag = Agent {
            last_session: last,
            back_at: back,
            ..Agent::default()
        };
        self.note(format!("{a:?} crashed"));
    }

    /// Agents that are down come back when due; a target with unsynced bytes syncs them now
    /// and then.
    fn revive(&mut self) {
        for a in [Actor::Source, Actor::Target(0), Actor::Target(1)] {
            let (now, faults) = (self.now, self.faults);
            let ag = self.agent(a);
            if !ag.up && (now >= ag.back_at || !faults) {
                ag.up = true;
                self.note(format!("{a:?} restarted"));
            }
        }
        for i in 0..TARGETS {
            if !self.dsts[i].unsynced.is_empty() && self.rng.chance(1, 3) {
                let synced = std::mem::take(&mut self.dsts[i].unsynced);
                self.disk.extend(synced);
            }
        }
    }

    /// The leader changes: the new leader's state is the old one's snapshot (encoded and
    /// decoded, indexes rebuilt), which must equal a replica that applied the whole log from
    /// the start; calls in flight are lost or were applied with their answers lost.
    fn change_leader(&mut self) -> Result<(), String> {
        self.tally.leader_changes += 1;
        let bytes = postcard::to_allocvec(&self.state).map_err(|e| e.to_string())?;
        let mut snapshot: State = postcard::from_bytes(&bytes).map_err(|e| e.to_string())?;
        snapshot.rebuild_indexes();
        invariants::replicas::check(self, &snapshot).map_err(|e| self.failure(e))?;
        self.state = snapshot;
        let mut kept = Vec::new();
        for f in std::mem::take(&mut self.net) {
            match &f.msg {
                Msg::Answer { .. } => {}
                Msg::Call { .. } if self.rng.chance(1, 2) => {}
                _ => kept.push(f),
            }
        }
        self.net = kept;
        self.note("the leader changed".into());
        Ok(())
    }
}

/// The name agent `a` registers with.
fn actor_name(a: Actor) -> &'static str {
    match a {
        Actor::Source => "src",
        Actor::Target(i) => target_name(i),
        Actor::Operator => "operator",
    }
}

/// The report of `role`'s agent `agent` (session `session`) on lease `l` (stamped when
/// delivered).
fn report(
    agent: &str,
    role: Role,
    session: u64,
    l: &Lease,
    result: Result<Digest, String>,
    source_hash: Option<Digest>,
    retry_later: bool,
) -> Command {
    Command::ReportSegment {
        agent: agent.into(),
        session,
        role,
        migration_id: l.migration_id,
        segment_id: l.segment_id,
        epoch: l.epoch,
        result,
        source_hash,
        retry_later,
        stale: false,
        permanent: false,
        now_ms: 0,
    }
}

/// `cmd` with the leader's time of proposing it.
fn restamp(mut cmd: Command, now: u64) -> Command {
    match &mut cmd {
        Command::Heartbeat { now_ms, .. }
        | Command::CompleteScan { now_ms, .. }
        | Command::LeaseSegments { now_ms, .. }
        | Command::ReportSegment { now_ms, .. }
        | Command::RenewLeases { now_ms, .. }
        | Command::CutoverStep { now_ms, .. }
        | Command::RegisterAgent { now_ms, .. }
        | Command::StartRound { now_ms, .. }
        | Command::StartCutover { now_ms, .. } => *now_ms = now,
        _ => {}
    }
    cmd
}

fn cmd_session(cmd: &Command) -> Option<u64> {
    match cmd {
        Command::Heartbeat { session, .. }
        | Command::LeaseSegments { session, .. }
        | Command::ReportSegment { session, .. }
        | Command::RenewLeases { session, .. }
        | Command::CutoverStep { session, .. } => Some(*session),
        _ => None,
    }
}

fn refuses_session(why: &str) -> bool {
    why.contains("has ended") || why.contains("is not current") || why.contains("not registered")
}

fn short(m: &Msg) -> String {
    match m {
        Msg::Call { from, cmd } => format!("call {from:?} {}", short_cmd(cmd)),
        Msg::Answer { to, resp, .. } => format!("answer to {to:?} {}", short_resp(resp)),
        Msg::Data { lease, .. } => format!("data {}@{}", lease.segment_id, lease.epoch),
        Msg::Ack { lease, stored, .. } => {
            format!("ack {}@{} stored {stored}", lease.segment_id, lease.epoch)
        }
    }
}

fn short_cmd(c: &Command) -> String {
    let s = format!("{c:?}");
    ferry_common::text::head(&s, 160).to_string()
}

fn short_resp(r: &Response) -> String {
    let s = format!("{r:?}");
    ferry_common::text::head(&s, 120).to_string()
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Runs seeds `first..first + count` of `steps` steps each; panics with the first failure.
fn seeds(first: u64, count: u64, steps: u64) -> Tally {
    let mut sum = Tally::default();
    for seed in first..first + count {
        match Sim::new(seed, None).run(steps) {
            Ok(t) => {
                sum.dropped += t.dropped;
                sum.duplicated += t.duplicated;
                sum.crashes += t.crashes;
                sum.leader_changes += t.leader_changes;
                sum.damaged += t.damaged;
                sum.rounds += t.rounds;
                sum.switched += t.switched;
                sum.aborted += t.aborted;
                sum.verified += t.verified;
                sum.pooled += t.pooled;
            }
            Err(e) => panic!("{e}"),
        }
    }
    sum
}

/// The CI's seeds (or `FERRY_SIM_SEEDS` from `FERRY_SIM_FIRST_SEED`, of `FERRY_SIM_STEPS`
/// steps): every invariant holds after every step, every migration settles, and the runs
/// met every kind of fault and outcome they are meant to.
#[test]
fn seeds_keep_every_invariant_under_faults() {
    let count = env_u64("FERRY_SIM_SEEDS").unwrap_or(CI_SEEDS);
    let first = env_u64("FERRY_SIM_FIRST_SEED").unwrap_or(1);
    let steps = env_u64("FERRY_SIM_STEPS").unwrap_or(CI_STEPS);
    let t = seeds(first, count, steps);
    eprintln!("simulated {count} seeds × {steps} steps: {t:?}");
    if count >= CI_SEEDS && steps >= CI_STEPS {
        assert!(t.dropped > 0 && t.duplicated > 0, "{t:?}");
        assert!(
            t.crashes > 0 && t.leader_changes > 0 && t.damaged > 0,
            "{t:?}"
        );
        assert!(t.rounds > 0 && t.switched > 0 && t.aborted > 0, "{t:?}");
        assert!(t.pooled > 0, "{t:?}");
    }
}

/// Replays one seed (`FERRY_SIM_SEED`, `FERRY_SIM_STEPS`) — the command a failure prints.
/// Without them, seed 0 for 2,000 steps.
#[test]
fn replay() {
    let seed = env_u64("FERRY_SIM_SEED").unwrap_or(0);
    let steps = env_u64("FERRY_SIM_STEPS").unwrap_or(2_000);
    if let Err(e) = Sim::new(seed, None).run(steps) {
        panic!("{e}");
    }
}

/// The invariants are not vacuous: a target that reports bytes before they are durable
/// (and loses them when it crashes first) is caught within a few seeds.
#[test]
fn a_target_reporting_before_its_bytes_are_durable_is_caught() {
    let caught = (1..=20).find_map(|seed| {
        Sim::new(seed, Some(Bug::ReportBeforeDurable))
            .run(CI_STEPS)
            .err()
    });
    let why = caught.expect("no seed of 20 caught a target that reports before it syncs");
    assert!(why.contains("does not hold it durably"), "{why}");
    assert!(why.contains("replay: FERRY_SIM_SEED="), "{why}");
}
