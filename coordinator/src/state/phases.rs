//! A migration's life: created, its segments registered while the source scans, the scan
//! completed, and done (or failed) once every segment is verified or given up on.

use super::*;

/// What an operator asked to move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationSpec {
    /// The agent that reads.
    pub source_agent: String,
    /// Absolute directory on the source agent.
    pub source_path: String,
    /// The agent that writes.
    pub target_agent: String,
    /// Directory under the target's root (relative; empty = the root).
    pub target_path: String,
    /// Segment size in bytes.
    pub segment_size: u64,
    /// Carry extended attributes.
    pub xattrs: bool,
    /// Glob patterns of paths not to copy ([`ferry_common::exclude`]).
    pub excludes: Vec<String>,
    /// Failed attempts after which a segment is given up on ([`SegState::Failed`]).
    pub max_attempts: u32,
    /// Sync rounds leave files deleted at the source in place at the target.
    pub keep_deleted: bool,
    /// Most names a sync round may delete at the target (`None`: no cap). A round whose scan
    /// finds more deletes none of them and ends `Failed`, saying so.
    pub max_delete: Option<u64>,
    /// Start a sync round this long after the last one ended (0: only when asked).
    pub sync_every_ms: u64,
    /// Start the cutover by itself when a sync round ends done in less than this (0: off).
    pub auto_cutover_below_ms: u64,
    /// Round 0 compares its scan with the tree the target of the migration with this uuid
    /// held at its switch, instead of copying everything (a fallback; empty: none).
    pub baseline: String,
    /// The migration this one is the fallback of (0: none).
    pub fallback_of: u64,
}

impl MigrationSpec {
    /// Tests: from agent "src" at `source_path` to agent "dst", the other settings at their
    /// defaults.
    #[cfg(test)]
    pub(crate) fn for_tests(source_path: &str, segment_size: u64) -> Self {
        MigrationSpec {
            source_agent: "src".into(),
            source_path: source_path.into(),
            target_agent: "dst".into(),
            target_path: String::new(),
            segment_size,
            xattrs: false,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            excludes: Vec::new(),
            keep_deleted: false,
            max_delete: None,
            sync_every_ms: 0,
            auto_cutover_below_ms: 0,
            baseline: String::new(),
            fallback_of: 0,
        }
    }

    /// Whether the source is an object store (`s3://…`, `gs://…`, `az://…`) rather than a
    /// directory: such a migration runs its bulk copy only (no sync rounds, cutover or full
    /// verification yet).
    pub fn source_is_store(&self) -> bool {
        ferry_common::path::is_store_url(&self.source_path)
    }
}

/// Why migration `name` cannot `what` when its source is an object store.
pub(super) fn store_source_refusal(name: &str, what: &str) -> String {
    format!(
        "migration {name} reads from an object store: {what} is not supported for an \
         object-store source yet (its bulk copy is)"
    )
}

/// Where a migration is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Created; the source has not registered segments yet.
    Planned,
    /// Bulk copy (round 0) in progress.
    Copying,
    /// A sync round (1 and up) in progress: the source rescans and sends what changed.
    Syncing,
    /// The last round is complete: its scan is complete and every segment is verified. A sync
    /// round may follow.
    Done,
    /// The last round is complete and some of it was not copied: a segment failed (the failed
    /// ones name their files and errors) or the scan left paths behind. A sync round may
    /// follow, and sends again what was not copied.
    Failed,
}

impl Phase {
    /// Lower-case name for reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Planned => "planned",
            Phase::Copying => "copying",
            Phase::Syncing => "syncing",
            Phase::Done => "done",
            Phase::Failed => "failed",
        }
    }

    /// Whether segments of the current round are being sent (bulk copy or a sync round).
    pub fn sending(self) -> bool {
        matches!(self, Phase::Copying | Phase::Syncing)
    }

    /// Whether the migration's last round has ended (done or failed): nothing is sent until
    /// another round starts.
    pub fn finished(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed)
    }
}

/// Running totals of a migration, kept up to date on every change so status reads are O(1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Segments registered.
    pub segments: u64,
    /// Bytes in registered segments.
    pub bytes: u64,
    /// Files in registered segments.
    pub files: u64,
    /// Segments verified.
    pub verified_segments: u64,
    /// Bytes verified.
    pub verified_bytes: u64,
    /// Files verified.
    pub verified_files: u64,
    /// Leases granted over all segments (equals `segments` when nothing was ever resent).
    pub leases_granted: u64,
    /// Failed transfer attempts (errors and hash mismatches).
    pub failed_attempts: u64,
    /// Segments given up on after their last allowed attempt.
    pub failed_segments: u64,
    /// Segments left to the next round because their file changed after the scan (a piece of
    /// a split file that no longer is the scanned file).
    pub stale_segments: u64,
    /// Bytes in failed segments.
    pub failed_bytes: u64,
    /// Files in failed segments.
    pub failed_files: u64,
}

/// A migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// Id, from 1.
    pub id: u64,
    /// Name, unique in the cluster (operators refer to a migration by it).
    pub name: String,
    /// Random id, unique across clusters: agents key their local state by it.
    pub uuid: String,
    /// The idempotency key it was created with (empty: none): a create repeated with this key
    /// answers this migration instead of making another.
    pub idempotency_key: String,
    /// What to move.
    pub spec: MigrationSpec,
    /// Where it is.
    pub phase: Phase,
    /// The source has registered all segments.
    pub scan_complete: bool,
    /// Totals.
    pub counters: Counters,
    /// Paths the source could not copy, with the reason (at most [`MAX_SCAN_ISSUES_KEPT`]).
    pub scan_issues: Vec<(String, String)>,
    /// All scan issues, including those not kept.
    pub scan_issues_total: u64,
    /// Names the scan found to be hardlinks to a file it carries: linked at the target, not
    /// copied.
    pub hardlinks: u64,
    /// Paths the scan skipped because they match the spec's excludes (the operator's choice:
    /// they do not fail the migration).
    pub excluded: u64,
    /// The last transfer error seen.
    pub last_error: String,
    /// Creation time (unix ms).
    pub created_ms: u64,
    /// When it reached `Done` or `Failed` (0 before).
    pub finished_ms: u64,
    /// What its source may send per second ([`ferry_common::throttle`] canonical text; empty:
    /// no limit).
    pub throttle: String,
    /// The rounds, oldest first, the current one last (the most recent [`MAX_ROUNDS_KEPT`]).
    pub rounds: Vec<Round>,
    /// Its cutover (the latest attempt), once one was started.
    pub cutover: Option<Cutover>,
    /// The latest full verification an operator asked for outside a cutover.
    pub verification: Option<FullVerification>,
    /// The reverse migration of this one's fallback window (0: none).
    pub fallback: u64,
    /// When the fallback window was closed (0: open, or never opened).
    pub finalized_ms: u64,
    /// The target agents it writes through, `spec.target_agent` first ([`super::pool`]):
    /// members are never removed, only deactivated, so a segment's `target` index stays valid.
    pub targets: Vec<PoolMember>,
}

/// What a [`Command::CompleteScan`] reports, as `complete_scan` takes it.
pub(super) struct ScanEnd {
    pub(super) total: u64,
    pub(super) issues: Vec<(String, String)>,
    pub(super) issues_total: u64,
    pub(super) hardlinks: u64,
    pub(super) excluded: u64,
    pub(super) root_error: String,
    pub(super) deleted: u64,
}

impl State {
    /// Why a migration named `name` with `spec` cannot be created now, if it cannot (what
    /// [`Command::CreateMigration`] checks of the state; a dry run asks the same).
    pub fn check_new_migration(&self, name: &str, spec: &MigrationSpec) -> Result<(), String> {
        if name.is_empty() {
            return Err("a migration needs a name".into());
        }
        if let Some(&id) = self.by_name.get(name) {
            return Err(format!(
                "a migration named {name} already exists (id {id}); if it is the one you meant, \
                 see `ferryctl migration status {name}`, else choose another --name"
            ));
        }
        if spec.source_agent == spec.target_agent {
            return Err("source and target agent must differ".into());
        }
        for a in [&spec.source_agent, &spec.target_agent] {
            if !self.agents.contains_key(a) {
                return Err(format!(
                    "agent {a} is not registered; start it and check `ferryctl agents list`"
                ));
            }
        }
        if spec.segment_size == 0 {
            return Err("segment size must be at least 1 byte".into());
        }
        Ok(())
    }

    pub(super) fn create_migration(
        &mut self,
        name: String,
        key: String,
        spec: MigrationSpec,
        uuid: String,
        throttle: &str,
        now_ms: u64,
    ) -> Response {
        // Checked first: a throttle that does not parse creates nothing. A repeated create
        // answers the earlier migration and leaves its throttle as it is now.
        let throttle = match throttle.parse::<ferry_common::throttle::Throttle>() {
            Ok(t) => t.stored(),
            Err(e) => return refused(e.to_string()),
        };
        if let Some(&id) = self.by_key.get(&key) {
            let m = &self.migrations[&id];
            if m.name == name && m.spec == spec {
                return Response::MigrationCreated(id);
            }
            return refused(format!(
                "idempotency key {key} already created migration {id} ({}) from a different \
                 request; a retry must repeat its request unchanged (a new request needs a new \
                 key)",
                m.name
            ));
        }
        if let Err(why) = self.check_new_migration(&name, &spec) {
            return refused(why);
        }
        if uuid.is_empty() || self.migrations.values().any(|m| m.uuid == uuid) {
            return refused("a migration needs a fresh uuid");
        }
        let last = self
            .migrations
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
            .max(self.deleted_up_to);
        let Some(id) = last.checked_add(1) else {
            return refused("no migration id is left");
        };
        let targets = vec![PoolMember::new(spec.target_agent.clone())];
        super::index_agents(&mut self.by_source, &mut self.by_target, id, &spec);
        self.migrations.insert(
            id,
            Migration {
                targets,
                id,
                name: name.clone(),
                uuid,
                idempotency_key: key.clone(),
                spec,
                phase: Phase::Planned,
                scan_complete: false,
                counters: Counters::default(),
                scan_issues: Vec::new(),
                scan_issues_total: 0,
                hardlinks: 0,
                excluded: 0,
                last_error: String::new(),
                created_ms: now_ms,
                finished_ms: 0,
                throttle,
                rounds: vec![Round::new(0, 0, now_ms, Counters::default())],
                cutover: None,
                verification: None,
                fallback: 0,
                finalized_ms: 0,
            },
        );
        self.by_name.insert(name, id);
        if !key.is_empty() {
            self.by_key.insert(key, id);
        }
        self.dirty.migrations.insert(id);
        Response::MigrationCreated(id)
    }

    pub(super) fn source_migration(
        &mut self,
        agent: &str,
        id: u64,
    ) -> Result<&mut Migration, Response> {
        match self.migrations.get_mut(&id) {
            None => Err(refused(format!("migration {id} does not exist"))),
            Some(m) if m.spec.source_agent != agent => Err(refused(format!(
                "agent {agent} is not the source of migration {id}"
            ))),
            Some(m) => Ok(m),
        }
    }

    pub(super) fn register_segments(
        &mut self,
        agent: &str,
        mid: u64,
        segments: Vec<SegmentReg>,
    ) -> Response {
        let m = match self.source_migration(agent, mid) {
            Ok(m) => m,
            Err(r) => return r,
        };
        let complete = m.scan_complete;
        let round_first = m.round().first_segment;
        let in_batch: BTreeSet<u64> = segments.iter().map(|r| r.id).collect();
        // Check the whole batch first: a refused command changes nothing.
        for r in &segments {
            // A piece's file begins in this round, and its first piece is registered before
            // it or with it: every piece of a file must go where its first piece goes.
            let first = r.id.checked_sub(u64::from(r.piece_index));
            let piece_ok = if r.piece_count == 0 {
                r.piece_index == 0
            } else {
                r.piece_index < r.piece_count
                    && first.is_some_and(|f| {
                        f >= round_first
                            && (in_batch.contains(&f) || self.segments.contains_key(&(mid, f)))
                    })
            };
            if !piece_ok {
                return refused(format!(
                    "migration {mid}: segment {} says it is piece {} of {}, which cannot be \
                     (no such piece, or its file's first piece is not registered in this \
                     round: a corrupt manifest?) — check the source agent",
                    r.id, r.piece_index, r.piece_count
                ));
            }
            match self.segments.get(&(mid, r.id)) {
                Some(s) if s.fingerprint == r.fingerprint => {}
                None if !complete => {}
                // A rescan after a source restart planned this segment differently; it may be
                // replaced only if no byte of it was ever sent.
                Some(s) if !complete && s.state == SegState::Pending && s.leases == 0 => {}
                _ => {
                    return refused(format!(
                        "migration {mid}: segment {} differs from the one already registered \
                         (the source tree changed between scans after a source restart); \
                         start a new migration",
                        r.id
                    ))
                }
            }
        }
        if complete {
            return Response::Ok;
        }
        // The totals after this batch, computed before anything changes: counts come from an
        // agent, and a sum that does not fit is a refused command, never a panic (which would
        // crash every node again on replay) nor a silent wrap.
        let Some((bytes, files)) = self.totals_after(mid, &segments) else {
            return refused(format!(
                "migration {mid}: registering these {} segments would overflow the migration's \
                 byte or file count; the source's segment sizes are not plausible (a corrupt \
                 manifest?) — check the source agent",
                segments.len()
            ));
        };
        let m = self.migrations.get_mut(&mid).expect("checked above");
        if m.phase == Phase::Planned {
            m.phase = Phase::Copying;
        }
        m.counters.bytes = bytes;
        m.counters.files = files;
        for r in segments {
            match self.segments.get_mut(&(mid, r.id)) {
                Some(s) if s.fingerprint == r.fingerprint => continue,
                Some(s) => {
                    s.bytes = r.bytes;
                    s.files = r.files;
                    s.fingerprint = r.fingerprint;
                    s.piece_index = r.piece_index;
                    s.piece_count = r.piece_count;
                }
                None => {
                    self.segments.insert(
                        (mid, r.id),
                        Segment {
                            bytes: r.bytes,
                            files: r.files,
                            fingerprint: r.fingerprint,
                            piece_index: r.piece_index,
                            piece_count: r.piece_count,
                            target: 0,
                            state: SegState::Pending,
                            leases: 0,
                            attempts: 0,
                            not_before_ms: 0,
                            hashes: Hashes::None,
                            last_error: Reason::default(),
                        },
                    );
                    self.pending.entry(mid).or_default().insert(r.id);
                    m.counters.segments = m.counters.segments.saturating_add(1);
                }
            }
            self.dirty.segments.insert((mid, r.id));
        }
        self.dirty.migrations.insert(mid);
        Response::Ok
    }

    /// The migration's byte and file totals once `segments` are registered (new ones added,
    /// replanned ones replacing their earlier size), or `None` if they do not fit in a `u64`.
    /// A segment listed twice in the batch counts as its last registration, as applying does.
    pub(super) fn totals_after(&self, mid: u64, segments: &[SegmentReg]) -> Option<(u64, u64)> {
        let c = &self.migrations.get(&mid)?.counters;
        let (mut bytes, mut files) = (c.bytes, c.files);
        let mut seen: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        for r in segments {
            let (old_bytes, old_files) = match seen.get(&r.id) {
                Some(&prev) => prev,
                None => match self.segments.get(&(mid, r.id)) {
                    Some(s) => (s.bytes, s.files as u64),
                    None => (0, 0),
                },
            };
            // Removing what is counted cannot underflow; saturate anyway rather than trust it.
            bytes = bytes.saturating_sub(old_bytes).checked_add(r.bytes)?;
            files = files
                .saturating_sub(old_files)
                .checked_add(r.files as u64)?;
            seen.insert(r.id, (r.bytes, r.files as u64));
        }
        Some((bytes, files))
    }

    pub(super) fn complete_scan(
        &mut self,
        agent: &str,
        mid: u64,
        end: ScanEnd,
        now_ms: u64,
    ) -> Response {
        let ScanEnd {
            total,
            issues,
            issues_total,
            hardlinks,
            excluded,
            root_error,
            deleted,
        } = end;
        let m = match self.source_migration(agent, mid) {
            Ok(m) => m,
            Err(r) => return r,
        };
        if m.scan_complete {
            return Response::Ok;
        }
        let base = m.round().first_segment;
        let Some(end) = base.checked_add(total) else {
            return refused(format!(
                "migration {mid}: a scan of {total} segments is not plausible"
            ));
        };
        // Segments past the end were planned by an earlier scan that a restarted source redid
        // with fewer segments: drop them if nothing of them was sent, else refuse.
        let stale: Vec<u64> = self
            .segments
            .range((mid, end)..=(mid, u64::MAX))
            .map(|((_, id), _)| id)
            .collect();
        if let Some(id) = stale.iter().find(|id| {
            let s = &self.segments[&(mid, **id)];
            s.state != SegState::Pending || s.leases > 0
        }) {
            return refused(format!(
                "migration {mid}: the rescan has {total} segments but segment {id} of an earlier \
                 scan was already sent; the source tree changed — start a new migration"
            ));
        }
        let registered = self.segments.range((mid, base)..(mid, end)).count() as u64;
        if registered != total {
            return refused(format!(
                "migration {mid}: scan reports {total} segments but {registered} are registered; \
                 the source retries registration"
            ));
        }
        let m = self.migrations.get_mut(&mid).expect("checked above");
        for id in stale {
            let s = self.segments.remove(&(mid, id)).expect("listed above");
            self.pending.entry(mid).or_default().remove(&id);
            m.counters.segments = m.counters.segments.saturating_sub(1);
            m.counters.bytes = m.counters.bytes.saturating_sub(s.bytes);
            m.counters.files = m.counters.files.saturating_sub(s.files as u64);
            self.dirty.segments.insert((mid, id));
        }
        m.scan_complete = true;
        let round = m.round_mut();
        round.segments = total;
        round.deleted = deleted;
        m.scan_issues = issues.into_iter().take(MAX_SCAN_ISSUES_KEPT).collect();
        m.scan_issues_total = issues_total;
        m.hardlinks = hardlinks;
        m.excluded = excluded;
        if !root_error.is_empty() {
            // Nothing was scanned: an empty copy of a tree that is not there must not end
            // "done" (0 of 0 segments verified).
            m.last_error = format!(
                "the source root {} on {} cannot be scanned: {root_error}; fix it (or the \
                 path) and create the migration again",
                m.spec.source_path, m.spec.source_agent
            );
            m.phase = Phase::Failed;
            m.finished_ms = now_ms;
            m.end_round(Phase::Failed, now_ms);
            self.dirty.migrations.insert(mid);
            return Response::Ok;
        }
        if m.phase == Phase::Planned {
            m.phase = Phase::Copying;
        }
        Self::maybe_done(m, now_ms);
        self.dirty.migrations.insert(mid);
        Response::Ok
    }

    /// Ends the current round once its scan is complete and every segment is verified, failed
    /// or stale: `Done` when all verified, `Failed` when a segment of this round failed or its
    /// scan left paths behind, and otherwise (files changed after the scan) the next round
    /// starts at once, so a file written during the copy is sent again once it is stable.
    pub(super) fn maybe_done(m: &mut Migration, now_ms: u64) {
        let c = &m.counters;
        if !m.scan_complete
            || m.phase.finished()
            || c.verified_segments
                .saturating_add(c.failed_segments)
                .saturating_add(c.stale_segments)
                != c.segments
        {
            return;
        }
        let at_start = &m.round().at_start;
        let failed = c.failed_segments > at_start.failed_segments;
        let stale = c.stale_segments > at_start.stale_segments;
        // Anything the scan could not copy (a FIFO, an unreadable file) fails the round too: a
        // copy that left something behind is not done.
        // A store source has no sync round yet (its listing is in the store's order, not the
        // catalog's): objects that changed during its copy leave it failed, each named by its
        // segment's error, instead of a next round.
        let phase = if failed || m.scan_issues_total > 0 || (stale && m.spec.source_is_store()) {
            Phase::Failed
        } else if stale {
            Phase::Syncing
        } else {
            Phase::Done
        };
        m.end_round(phase, now_ms);
        if m.frozen_awaiting_final_round() {
            // Frozen while this round ran: the final round follows it, whatever its outcome
            // (it sends again what this one did not copy).
            m.next_round(now_ms);
            let number = m.round().number;
            if let Some(c) = m.cutover.as_mut() {
                c.final_round = number;
            }
        } else if m.cutover_round_ended(phase) {
            // The final round of a cutover is followed by no other: the cutover verifies or
            // rolls back.
            m.phase = if phase == Phase::Syncing {
                Phase::Failed
            } else {
                phase
            };
            m.finished_ms = now_ms;
        } else if phase == Phase::Syncing {
            m.next_round(now_ms);
        } else {
            m.phase = phase;
            m.finished_ms = now_ms;
            m.maybe_auto_cutover(now_ms);
        }
    }
}
