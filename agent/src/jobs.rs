//! Jobs the coordinator hands out in heartbeats that move no migration's data: an assessment of
//! paths on this host ([`crate::assess`]), a probe of the path to another agent
//! ([`crate::probe`]), a probe to answer as its target, or a preview of a migration's next sync
//! round ([`preview_sync`]: the round's scan and comparison, nothing recorded or sent). Each job
//! runs once per process, in the background; its progress is reported every [`PROGRESS_EVERY`]
//! and its end (a JSON result or an error) with retries. A job the agent restarts during is run again from the start (every
//! kind only reads).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::Retryable;
use ferry_common::exclude::Excludes;
use ferry_common::tls::TlsMaterial;
use ferry_common::transport::Congestion;
use ferry_proto::control as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::control::Coordinator;
use crate::probe::{Expected, ProbeSpec};

/// How often a running job reports what it found so far.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How long the end of a job is retried while the coordinator does not take it.
const REPORT_FOR: Duration = Duration::from_secs(300);

/// What a prober needs: the agent's client endpoint, identity and window.
#[derive(Clone)]
pub struct Prober {
    /// The endpoint its data connections leave from.
    pub endpoint: quinn::Endpoint,
    /// Its identity.
    pub tls: TlsMaterial,
    /// Its connections' receive window.
    pub window: u64,
}

/// Runs the jobs heartbeats hand out.
pub struct JobRunner<C: Coordinator> {
    control: C,
    prober: Option<Prober>,
    /// The agent's state directory (where its migrations' catalogs are).
    state_dir: Option<PathBuf>,
    /// Its cutover hooks as in force (a preview says which would run).
    hooks: Option<crate::cutover::LiveHooks>,
    /// Probes to answer as a target (read by [`crate::probe::Answerer`]).
    expected: watch::Sender<Expected>,
    /// Jobs this process started.
    started: Mutex<BTreeSet<u64>>,
    /// Set when the agent stops: running assessments end.
    stopping: Arc<AtomicBool>,
}

impl<C: Coordinator> JobRunner<C> {
    /// A runner reporting to `control`, probing with `prober` (none: probes fail), telling the
    /// target side which probes to answer through `expected`.
    pub fn new(control: C, prober: Option<Prober>, expected: watch::Sender<Expected>) -> Self {
        JobRunner {
            control,
            prober,
            state_dir: None,
            hooks: None,
            expected,
            started: Mutex::default(),
            stopping: Arc::default(),
        }
    }

    /// The same runner, reading migrations' catalogs below `state_dir` (sync previews).
    pub fn with_state_dir(self, state_dir: PathBuf) -> Self {
        JobRunner {
            state_dir: Some(state_dir),
            ..self
        }
    }

    /// The same runner, telling previews of the cutover `hooks` in force.
    pub fn with_hooks(self, hooks: crate::cutover::LiveHooks) -> Self {
        JobRunner {
            hooks: Some(hooks),
            ..self
        }
    }

    /// Ends running assessments (the agent stops).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Takes a heartbeat's jobs: starts those not started yet, and updates the probes to answer.
    pub fn handle(self: &Arc<Self>, jobs: &[pb::JobWork]) {
        let answers: Expected = jobs
            .iter()
            .filter_map(|j| j.answer.as_ref().map(|a| (j.id, a.peer.clone())))
            .collect();
        self.expected.send_if_modified(|e| {
            let changed = *e != answers;
            *e = answers;
            changed
        });
        for job in jobs {
            if job.answer.is_some() || !self.started.lock().expect("not poisoned").insert(job.id) {
                continue;
            }
            let me = self.clone();
            let job = job.clone();
            tokio::spawn(async move { me.run(job).await });
        }
    }

    async fn run(&self, job: pb::JobWork) {
        let id = job.id;
        tracing::info!(message = "Job started.", job = id);
        let outcome = if let Some(a) = job.assess {
            self.assess(id, a).await
        } else if let Some(p) = job.probe {
            self.probe(id, p).await
        } else if let Some(p) = job.sync_preview {
            self.sync_preview(p).await
        } else {
            Err("the coordinator sent a job of a kind this agent does not know: upgrade it".into())
        };
        let report = match outcome {
            Ok(result) => pb::JobReport {
                id,
                done: true,
                result,
                ..Default::default()
            },
            Err(error) => {
                tracing::warn!(message = "Job failed.", job = id, %error);
                pb::JobReport {
                    id,
                    done: true,
                    error,
                    ..Default::default()
                }
            }
        };
        let sent = (|| self.control.report_job(report.clone()))
            .retry(ferry_common::retry::policy_for(
                Duration::from_millis(200),
                Duration::from_secs(10),
                REPORT_FOR,
            ))
            .when(|e| e.is_transient())
            .await;
        match sent {
            Ok(()) => tracing::info!(message = "Job ended.", job = id),
            Err(e) => {
                tracing::warn!(message = "Could not report a job's end.", job = id, error = %e)
            }
        }
    }

    /// Reports `progress` (best effort: the next one or the end says more).
    async fn progress(&self, id: u64, progress: String) {
        let report = pb::JobReport {
            id,
            progress,
            ..Default::default()
        };
        if let Err(e) = self.control.report_job(report).await {
            tracing::debug!(message = "Could not report a job's progress.", job = id, error = %e);
        }
    }

    async fn assess(&self, id: u64, job: pb::AssessJob) -> Result<String, String> {
        let excludes = Excludes::new(&job.excludes).map_err(|e| e.to_string())?;
        let roots: Vec<PathBuf> = job.paths.iter().map(PathBuf::from).collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let (tx, mut rx) = watch::channel(None);
        let stopping = self.stopping.clone();
        let walk = tokio::task::spawn_blocking(move || {
            crate::assess::assess_roots(&roots, &excludes, now, 1000, |so_far| {
                tx.send_replace(Some(so_far.clone()));
                !stopping.load(Ordering::Relaxed)
            })
        });
        tokio::pin!(walk);
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        tick.tick().await;
        let assessed = loop {
            tokio::select! {
                done = &mut walk => break done,
                _ = tick.tick() => {
                    let so_far = rx.borrow_and_update().clone();
                    if let Some(a) = so_far {
                        let json = serde_json::to_string(&a).map_err(|e| e.to_string())?;
                        self.progress(id, json).await;
                    }
                }
            }
        };
        let a = assessed
            .map_err(|e| format!("the assessment ended abnormally: {e}"))?
            .map_err(|e| e.to_string())?;
        serde_json::to_string(&a).map_err(|e| e.to_string())
    }

    async fn sync_preview(&self, job: pb::SyncPreviewJob) -> Result<String, String> {
        let Some(state_dir) = self.state_dir.clone() else {
            return Err("this agent keeps no migration state".into());
        };
        let dir = crate::source::migration_state_dir(
            &state_dir,
            &self.control.cluster_id(),
            &job.migration_uuid,
        )
        .map_err(|(what, v)| format!("{what} {v:?} is not an id"))?;
        let stopping = self.stopping.clone();
        let mut preview = tokio::task::spawn_blocking(move || preview_sync(&dir, &job, &stopping))
            .await
            .map_err(|e| format!("the preview ended abnormally: {e}"))??;
        if let Some(h) = &self.hooks {
            let h = h.read().expect("not poisoned");
            preview.pre_freeze = h.pre_freeze.is_some();
            preview.rollback = h.rollback.is_some();
        }
        serde_json::to_string(&preview).map_err(|e| e.to_string())
    }

    async fn probe(&self, id: u64, job: pb::ProbeJob) -> Result<String, String> {
        let Some(prober) = &self.prober else {
            return Err("this agent cannot probe (it has no client endpoint)".into());
        };
        let addr = job.peer_addr.parse().map_err(|_| {
            format!(
                "agent {} advertises {:?}, which is not an address",
                job.peer, job.peer_addr
            )
        })?;
        let mut congestions = Vec::new();
        for c in &job.congestions {
            congestions.push(c.parse::<Congestion>().map_err(|e| e.to_string())?);
        }
        if congestions.is_empty() {
            congestions = vec![Congestion::Bbr, Congestion::Cubic, Congestion::NewReno];
        }
        let spec = ProbeSpec {
            job: id,
            peer: job.peer.clone(),
            addr,
            seconds: job.seconds,
            streams: job.streams,
            congestions,
            window: prober.window,
        };
        let result =
            crate::probe::probe(&prober.endpoint, &prober.tls, self.control.agent(), &spec)
                .await
                .map_err(|e| e.to_string())?;
        serde_json::to_string(&result).map_err(|e| e.to_string())
    }
}

/// Names a preview lists of each kind.
pub const PREVIEW_EXAMPLES: usize = 20;

/// What a migration's next sync round would do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncPreview {
    /// The round it would be.
    pub round: u32,
    /// Files new or changed since the last round (sent; a large file with recorded blocks
    /// sends only its changed blocks, so `send_bytes` is at most what travels).
    pub send_files: u64,
    /// Their sizes.
    pub send_bytes: u64,
    /// Directories, symlinks and further names of files new or changed.
    pub send_other: u64,
    /// Names whose kind changed (removed at the target, then sent).
    pub replaced: u64,
    /// Names as the target has them.
    pub unchanged: u64,
    /// Names gone at the source, deleted at the target (all names, inside removed directories
    /// too).
    pub deleted: u64,
    /// The topmost of them (at most [`PREVIEW_EXAMPLES`]).
    pub deleted_examples: Vec<String>,
    /// The migration keeps deleted names at the target: nothing would be deleted.
    pub keep_deleted: bool,
    /// More deletions than its `--max-delete`: the round would delete none and end failed.
    pub over_max_delete: bool,
    /// The first names to send (at most [`PREVIEW_EXAMPLES`]).
    pub send_examples: Vec<String>,
    /// Paths left out by the excludes.
    pub excluded: u64,
    /// Paths that cannot be copied.
    pub issues: u64,
    /// The first of them, with the reason.
    pub issue_examples: Vec<(String, String)>,
    /// Whether the source agent has a `pre_freeze` hook in force, which a cutover would run
    /// (not its command: results are readable by viewers, and commands may hold secrets).
    #[serde(default)]
    pub pre_freeze: bool,
    /// Whether it has a `rollback` hook.
    #[serde(default)]
    pub rollback: bool,
}

/// Scans the migration's source as its next sync round would and compares it, name by name,
/// with the catalog of its last round (below `dir`, the migration's state directory), recording
/// and sending nothing. Names the last round sent but did not verify are sent again by the
/// round too; they are not counted here unless they changed.
pub fn preview_sync(
    dir: &Path,
    job: &pb::SyncPreviewJob,
    stopping: &AtomicBool,
) -> Result<SyncPreview, String> {
    use crate::catalog::{CatalogReader, Change, Differ};
    use crate::scan::Walked;
    use crate::segment::EntryKind;
    let catalog = crate::source::round_dir(dir, job.round).join("catalog");
    if !catalog.exists() {
        return Err(format!(
            "this agent holds no catalog of round {} of the migration ({}): was it its source \
             then, with this state directory?",
            job.round,
            catalog.display()
        ));
    }
    let reader = CatalogReader::open(&catalog).map_err(|e| e.to_string())?;
    let mut differ = Differ::new(reader, Default::default(), Default::default());
    let excludes = Excludes::new(&job.excludes).map_err(|e| e.to_string())?;
    let mut p = SyncPreview {
        round: job.round + 1,
        keep_deleted: job.keep_deleted,
        ..SyncPreview::default()
    };
    let shown = |path: &Path| ferry_common::path::display(path);
    let walked = crate::scan::walk(Path::new(&job.source_path), &excludes, |item| {
        if stopping.load(Ordering::Relaxed) {
            return Err("the preview was stopped (the agent shuts down)".to_string());
        }
        match item {
            Walked::Excluded => p.excluded += 1,
            Walked::Issue { path, at, reason } => {
                differ.unreadable(&at).map_err(|e| e.to_string())?;
                p.issues += 1;
                if p.issue_examples.len() < PREVIEW_EXAMPLES {
                    p.issue_examples.push((path, reason));
                }
            }
            Walked::Entry(e) => {
                let (sent, replaced) = match differ.entry(&e).map_err(|e| e.to_string())? {
                    Change::Same => (None, false),
                    Change::Send(e) | Change::Resend(e) => (Some(e), false),
                    Change::Replace(e) => (Some(e), true),
                };
                let Some(e) = sent else {
                    p.unchanged += 1;
                    return Ok(());
                };
                if replaced {
                    p.replaced += 1;
                } else if e.kind == EntryKind::File {
                    p.send_files += 1;
                    p.send_bytes += e.file_size;
                } else {
                    p.send_other += 1;
                }
                if p.send_examples.len() < PREVIEW_EXAMPLES {
                    p.send_examples.push(shown(&e.path));
                }
            }
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    walked?;
    let (deleted, names) = differ.finish().map_err(|e| e.to_string())?;
    p.deleted = names;
    p.deleted_examples = deleted
        .iter()
        .take(PREVIEW_EXAMPLES)
        .map(|d| shown(d))
        .collect();
    p.over_max_delete = !job.keep_deleted && job.max_delete.is_some_and(|cap| names > cap);
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::testing::FakeCoordinator;

    async fn ended(control: &FakeCoordinator, id: u64) -> pb::JobReport {
        for _ in 0..500 {
            let end =
                control.with(|s| s.job_reports.iter().find(|r| r.id == id && r.done).cloned());
            if let Some(r) = end {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("job {id} never ended");
    }

    #[tokio::test]
    async fn an_assessment_runs_once_and_reports_its_result_with_absolute_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 1000]).unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/b"), vec![2u8; 24]).unwrap();
        let control = FakeCoordinator::default();
        let (tx, rx) = watch::channel(Expected::new());
        let runner = Arc::new(JobRunner::new(control.clone(), None, tx));
        let assess = pb::JobWork {
            id: 7,
            assess: Some(pb::AssessJob {
                paths: vec![dir.path().display().to_string()],
                excludes: Vec::new(),
            }),
            ..Default::default()
        };
        let answer = pb::JobWork {
            id: 8,
            answer: Some(pb::ProbeAnswer { peer: "src".into() }),
            ..Default::default()
        };
        runner.handle(&[assess.clone(), answer]);
        // The same job again (the next heartbeat) is not run twice.
        runner.handle(std::slice::from_ref(&assess));
        let end = ended(&control, 7).await;
        assert!(end.error.is_empty(), "{}", end.error);
        let a: crate::assess::Assessment = serde_json::from_str(&end.result).unwrap();
        assert_eq!((a.files, a.bytes, a.dirs), (2, 1024, 1));
        let largest = &a.largest[0].0;
        assert!(
            largest.starts_with('/') && largest.ends_with("/a"),
            "{largest}"
        );
        assert_eq!(
            rx.borrow().get(&8).map(String::as_str),
            None,
            "no longer listed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            control.with(|s| s.job_reports.iter().filter(|r| r.done).count()),
            1
        );
    }

    #[tokio::test]
    async fn probes_to_answer_follow_the_heartbeats() {
        let control = FakeCoordinator::default();
        let (tx, rx) = watch::channel(Expected::new());
        let runner = Arc::new(JobRunner::new(control, None, tx));
        let answer = pb::JobWork {
            id: 8,
            answer: Some(pb::ProbeAnswer { peer: "src".into() }),
            ..Default::default()
        };
        runner.handle(std::slice::from_ref(&answer));
        assert_eq!(rx.borrow().get(&8).map(String::as_str), Some("src"));
        runner.handle(&[]);
        assert!(rx.borrow().is_empty());
    }

    #[tokio::test]
    async fn a_missing_path_and_a_probe_without_an_endpoint_fail_with_the_reason() {
        let control = FakeCoordinator::default();
        let (tx, _rx) = watch::channel(Expected::new());
        let runner = Arc::new(JobRunner::new(control.clone(), None, tx));
        runner.handle(&[
            pb::JobWork {
                id: 1,
                assess: Some(pb::AssessJob {
                    paths: vec!["/no/such/ferry/path".into()],
                    excludes: Vec::new(),
                }),
                ..Default::default()
            },
            pb::JobWork {
                id: 2,
                probe: Some(pb::ProbeJob {
                    peer: "dst".into(),
                    peer_addr: "127.0.0.1:9".into(),
                    seconds: 1,
                    streams: 1,
                    congestions: Vec::new(),
                }),
                ..Default::default()
            },
        ]);
        assert!(ended(&control, 1)
            .await
            .error
            .contains("/no/such/ferry/path"));
        assert!(ended(&control, 2).await.error.contains("cannot probe"));
    }
}
