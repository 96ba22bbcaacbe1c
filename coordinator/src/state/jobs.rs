//! Jobs: work an operator asks of an agent that moves no migration's data — an assessment of
//! paths on the agent's host (`ferryctl assess`), a probe of the network path from it to
//! another agent (`ferryctl probe`), or a preview of a migration's next sync round (`ferryctl
//! migration sync --dry-run`). Heartbeats hand a job to its agent (and a probe to the agent
//! that must answer it); the agent reports its progress and its result, JSON kept here verbatim
//! (bounded), so `ferryctl plan` can read a probe's figures after the fact. The newest
//! [`MAX_JOBS_KEPT`] jobs are kept; a job with no result by its deadline has failed.

use super::*;

/// How many jobs are kept (the oldest ended ones make room for new ones).
pub const MAX_JOBS_KEPT: usize = 64;
/// Jobs one agent may have open (pending or running) at once.
pub const MAX_OPEN_JOBS_PER_AGENT: usize = 4;
/// Most bytes of a job's progress, result or error text.
pub const MAX_JOB_TEXT: usize = 256 << 10;
/// Most paths one assessment takes.
pub const MAX_ASSESS_PATHS: usize = 64;
/// How long an assessment may take (a tree of ten million files on a slow disk: hours).
pub const ASSESS_DEADLINE_MS: u64 = 24 * 3600 * 1000;
/// Longest probe.
pub const MAX_PROBE_SECONDS: u32 = 600;
/// Most parallel streams a probe tries.
pub const MAX_PROBE_STREAMS: u32 = 32;
/// Time a probe's deadline allows beyond its seconds (connecting, handshakes per congestion
/// controller, the agents learning of it from their heartbeats).
pub const PROBE_GRACE_MS: u64 = 120_000;

/// What a job does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobKind {
    /// Assess absolute paths on the agent's host, minus names matching `excludes`.
    Assess {
        /// The paths.
        paths: Vec<String>,
        /// Glob patterns (as a migration's excludes).
        excludes: Vec<String>,
    },
    /// Probe the path from the agent to `peer`.
    Probe {
        /// The agent that answers (it must receive data).
        peer: String,
        /// Most seconds in all.
        seconds: u32,
        /// Up to this many parallel streams.
        streams: u32,
        /// Congestion controllers to try, by name.
        congestions: Vec<String>,
    },
    /// What the next sync round of a migration would send and delete, by its source agent.
    SyncPreview {
        /// The migration.
        migration_id: u64,
    },
}

impl JobKind {
    /// `assess` or `probe`.
    pub fn name(&self) -> &'static str {
        match self {
            JobKind::Assess { .. } => "assess",
            JobKind::Probe { .. } => "probe",
            JobKind::SyncPreview { .. } => "sync-preview",
        }
    }
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Its agent has not reported on it yet.
    Pending,
    /// Its agent reported progress.
    Running,
    /// Its agent reported a result.
    Done,
    /// Its agent reported an error, or no result came by the deadline.
    Failed,
}

/// A job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Its number (increasing).
    pub id: u64,
    /// The agent that runs it.
    pub agent: String,
    /// What it does.
    pub kind: JobKind,
    /// Leader time it was started.
    pub created_ms: u64,
    /// A job without a result by then has failed.
    pub deadline_ms: u64,
    /// Where it is (as reported; see [`Job::state_at`] for the deadline).
    pub state: JobState,
    /// The last progress reported (JSON).
    pub progress: String,
    /// The result (JSON), once done.
    pub result: String,
    /// Why it failed.
    pub error: String,
    /// Leader time it ended (0: it has not).
    pub finished_ms: u64,
}

impl Job {
    /// Its state at `now_ms`: an open job past its deadline has failed.
    pub fn state_at(&self, now_ms: u64) -> JobState {
        match self.state {
            JobState::Pending | JobState::Running if now_ms >= self.deadline_ms => JobState::Failed,
            s => s,
        }
    }

    /// Whether it is pending or running at `now_ms`.
    pub fn open_at(&self, now_ms: u64) -> bool {
        matches!(self.state_at(now_ms), JobState::Pending | JobState::Running)
    }

    /// Why it failed, at `now_ms` (empty unless it has).
    pub fn error_at(&self, now_ms: u64) -> String {
        if self.state != JobState::Failed && self.state_at(now_ms) == JobState::Failed {
            return format!(
                "agent {} reported no result before the job's deadline: is it running? (`ferryctl \
                 agents list`)",
                self.agent
            );
        }
        self.error.clone()
    }
}

/// What an agent does with a job it is handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobPart {
    /// Runs it.
    Run,
    /// Answers its probe (accepts the probing agent's connections).
    Answer,
}

/// An agent's report on a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobUpdate {
    /// What it found so far (JSON).
    Progress(String),
    /// Its result (JSON).
    Done(String),
    /// Why it failed.
    Failed(String),
}

impl State {
    /// Starts a job on `agent` (an operator's request), checked: the agents exist and run, the
    /// spec is sound, the agent has room for it. Room for it among the kept jobs is made by
    /// dropping the oldest ended one.
    pub(super) fn start_job(&mut self, agent: &str, kind: JobKind, now_ms: u64) -> Response {
        if let Err(why) = self.check_job(agent, &kind, now_ms) {
            return refused(why);
        }
        let open = self
            .jobs
            .values()
            .filter(|j| j.agent == agent && j.open_at(now_ms))
            .count();
        if open >= MAX_OPEN_JOBS_PER_AGENT {
            return refused(format!(
                "agent {agent} already runs {open} jobs (at most {MAX_OPEN_JOBS_PER_AGENT}); wait \
                 for one to end (`ferryctl jobs`)"
            ));
        }
        // Taken before a job is dropped to make room (that may be the newest, when every
        // older one is still open): the new job's id is above every id given, never a reuse.
        let id = self.jobs.last_key_value().map_or(1, |(&id, _)| id + 1);
        if self.jobs.len() >= MAX_JOBS_KEPT {
            let oldest_ended = self
                .jobs
                .values()
                .find(|j| !j.open_at(now_ms))
                .map(|j| j.id);
            match oldest_ended {
                Some(id) => {
                    self.jobs.remove(&id);
                    self.dirty.jobs.insert(id);
                }
                None => {
                    return refused(format!(
                        "{MAX_JOBS_KEPT} jobs are still open; wait for one to end (`ferryctl jobs`)"
                    ))
                }
            }
        }
        let deadline_ms = now_ms.saturating_add(match &kind {
            JobKind::Assess { .. } => ASSESS_DEADLINE_MS,
            JobKind::Probe { seconds, .. } => u64::from(*seconds) * 1000 + PROBE_GRACE_MS,
            JobKind::SyncPreview { .. } => ASSESS_DEADLINE_MS,
        });
        self.jobs.insert(
            id,
            Job {
                id,
                agent: agent.to_string(),
                kind,
                created_ms: now_ms,
                deadline_ms,
                state: JobState::Pending,
                progress: String::new(),
                result: String::new(),
                error: String::new(),
                finished_ms: 0,
            },
        );
        self.dirty.jobs.insert(id);
        Response::JobStarted(id)
    }

    fn check_job(&self, agent: &str, kind: &JobKind, now_ms: u64) -> Result<(), String> {
        let live = |name: &str| match self.agents.get(name) {
            None => Err(format!(
                "agent {name} is not registered (`ferryctl agents list` shows those that are)"
            )),
            Some(a) if !a.live(now_ms) => Err(format!(
                "agent {name} is not running (not heard from within {} s): start it, then try \
                 again",
                SESSION_TIMEOUT_MS / 1000
            )),
            Some(a) => Ok(a),
        };
        live(agent)?;
        match kind {
            JobKind::Assess { paths, excludes } => {
                if paths.is_empty() || paths.len() > MAX_ASSESS_PATHS {
                    return Err(format!(
                        "an assessment takes 1 to {MAX_ASSESS_PATHS} paths, not {}",
                        paths.len()
                    ));
                }
                if let Some(p) = paths.iter().find(|p| !p.starts_with('/')) {
                    return Err(format!(
                        "{p:?} is not an absolute path on agent {agent}'s host"
                    ));
                }
                ferry_common::exclude::Excludes::new(excludes).map_err(|e| e.to_string())?;
            }
            JobKind::Probe {
                peer,
                seconds,
                streams,
                congestions,
            } => {
                if peer == agent {
                    return Err(format!(
                        "agent {agent} cannot probe itself; name another agent"
                    ));
                }
                let p = live(peer)?;
                if let Some(why) = p.undialable() {
                    return Err(why);
                }
                if !(1..=MAX_PROBE_SECONDS).contains(seconds) {
                    return Err(format!(
                        "a probe takes 1 to {MAX_PROBE_SECONDS} seconds, not {seconds}"
                    ));
                }
                if !(1..=MAX_PROBE_STREAMS).contains(streams) {
                    return Err(format!(
                        "a probe tries 1 to {MAX_PROBE_STREAMS} streams, not {streams}"
                    ));
                }
                for c in congestions {
                    c.parse::<ferry_common::transport::Congestion>()
                        .map_err(|e| e.to_string())?;
                }
            }
            JobKind::SyncPreview { migration_id } => {
                let Some(m) = self.migrations.get(migration_id) else {
                    return Err(format!("migration {migration_id} does not exist"));
                };
                if m.spec.source_agent != agent {
                    return Err(format!(
                        "migration {} is read by agent {}, not {agent}",
                        m.name, m.spec.source_agent
                    ));
                }
                if let Some(why) = super::rounds::sync_refusal(m) {
                    return Err(why);
                }
            }
        }
        Ok(())
    }

    /// An agent's report on job `id`: progress while it is open, then its end.
    pub(super) fn report_job(
        &mut self,
        agent: &str,
        id: u64,
        update: JobUpdate,
        now_ms: u64,
    ) -> Response {
        let Some(job) = self.jobs.get_mut(&id) else {
            return refused(format!(
                "job {id} is not kept (the newest {MAX_JOBS_KEPT} are)"
            ));
        };
        if job.agent != agent {
            return refused(format!("job {id} is agent {}'s, not {agent}'s", job.agent));
        }
        if !job.open_at(now_ms) {
            return refused(format!("job {id} has ended"));
        }
        let text = match &update {
            JobUpdate::Progress(t) | JobUpdate::Done(t) | JobUpdate::Failed(t) => t,
        };
        if text.len() > MAX_JOB_TEXT {
            return refused(format!(
                "a job's report is at most {MAX_JOB_TEXT} bytes, not {}",
                text.len()
            ));
        }
        match update {
            JobUpdate::Progress(t) => {
                job.state = JobState::Running;
                job.progress = t;
            }
            JobUpdate::Done(t) => {
                job.state = JobState::Done;
                job.result = t;
                job.finished_ms = now_ms;
            }
            JobUpdate::Failed(t) => {
                job.state = JobState::Failed;
                job.error = t;
                job.finished_ms = now_ms;
            }
        }
        self.dirty.jobs.insert(id);
        Response::Ok
    }

    /// The open jobs `agent` must run or answer at `now_ms`, oldest first.
    pub fn jobs_for(&self, agent: &str, now_ms: u64) -> Vec<(&Job, JobPart)> {
        self.jobs
            .values()
            .filter(|j| j.open_at(now_ms))
            .filter_map(|j| match &j.kind {
                _ if j.agent == agent => Some((j, JobPart::Run)),
                JobKind::Probe { peer, .. } if peer == agent => Some((j, JobPart::Answer)),
                _ => None,
            })
            .collect()
    }
}
