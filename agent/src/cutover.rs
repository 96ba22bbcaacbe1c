//! What an agent does for a cutover: runs its hooks and verifies its tree in full.
//!
//! Hooks are commands from the agent's own configuration (`[hooks]`), never from the
//! coordinator: an admin certificate is not a shell on every agent. A hook that is not
//! configured is a step that succeeds at once, and says so in the report. A hook's result is
//! recorded in the agent's state directory before it is reported, and a step that was recorded
//! is reported again, never run again: each hook runs once per cutover attempt, also when the
//! agent restarts or the report's answer is lost. (A hook interrupted by the agent's own death
//! did not complete, and runs again.)
//!
//! The full verification reads every file of the tree and folds each name's kind, path, mode,
//! size, mtime, link target and content hash into one BLAKE3 digest, in walk order; the
//! coordinator compares the source's with the target's. The source also checks that its tree
//! is still the one the final round scanned, before and after reading it: a file that changed
//! after the freeze fails the verification with its name.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backon::Retryable;
use ferry_common::exclude::Excludes;
use ferry_common::path::display;
use ferry_common::retry;
use ferry_common::text::tail;
use ferry_proto::control::{self as pb, CutoverStep};
use serde::{Deserialize, Serialize};

use crate::catalog::{CatalogReader, Change, Differ};
use crate::control::Coordinator;
use crate::scan::{walk, Walked};
use crate::segment::{Entry, EntryKind};
use crate::sink::RESERVED_PREFIX;
use crate::source::{cluster_dir, round_dir};

/// Most output of a hook kept and reported (its tail).
pub const OUTPUT_TAIL: usize = 4096;

fn default_hook_timeout() -> u64 {
    600
}

/// The commands this agent runs for cutovers (`[hooks]` in its config).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    /// On a source: stops the application's writes (`systemctl stop app`, `fsfreeze -f ...`).
    #[serde(default)]
    pub pre_freeze: Option<String>,
    /// On a target: starts the application on the copy (and moves its name over).
    #[serde(default)]
    pub switch: Option<String>,
    /// On a source: makes the source live again after a cutover that did not switch.
    #[serde(default)]
    pub rollback: Option<String>,
    /// Longest a hook may run; then it is killed and the step fails.
    #[serde(default = "default_hook_timeout")]
    pub timeout_secs: u64,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            pre_freeze: None,
            switch: None,
            rollback: None,
            timeout_secs: default_hook_timeout(),
        }
    }
}

/// A step as it was done, recorded before it is reported.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outcome {
    /// The command run (empty: none).
    pub command: String,
    /// Its exit status (0: success; -1: killed, timed out or not started).
    pub exit_code: i32,
    /// The tail of its output, or what went wrong.
    pub output: String,
    /// When it started (unix ms).
    pub started_ms: u64,
    /// How long it took.
    pub duration_ms: u64,
}

/// A tree as read for the full verification.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    /// The digest of every name, in walk order.
    pub digest: [u8; 32],
    /// Regular files (each name of a hardlinked file).
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Directories.
    pub dirs: u64,
    /// Symlinks.
    pub symlinks: u64,
}

/// Does the cutover steps the coordinator hands this agent.
pub struct CutoverRunner<C: Coordinator> {
    control: C,
    hooks: Hooks,
    state_dir: PathBuf,
    /// The target root (targets only).
    target_root: Option<PathBuf>,
    /// Steps being done: `(migration, attempt, step)`.
    running: Mutex<HashSet<(u64, u32, i32)>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl<C: Coordinator> CutoverRunner<C> {
    /// A runner with this agent's hooks; `target_root` when it is a target.
    pub fn new(control: C, hooks: Hooks, state_dir: PathBuf, target_root: Option<PathBuf>) -> Self {
        CutoverRunner {
            control,
            hooks,
            state_dir,
            target_root,
            running: Mutex::new(HashSet::new()),
        }
    }

    /// Starts the steps of `work` not already running (each in its own task).
    pub fn handle(self: &Arc<Self>, work: &[pb::CutoverWork]) {
        for w in work {
            let key = (w.migration_id, w.attempt, w.step);
            if !self.running.lock().expect("not poisoned").insert(key) {
                continue;
            }
            let me = self.clone();
            let w = w.clone();
            tokio::spawn(async move {
                me.step(&w).await;
                me.running.lock().expect("not poisoned").remove(&key);
            });
        }
    }

    /// Does one step (or takes its record) and reports it, retrying while the coordinator
    /// cannot be reached; a step whose report failed for good is handed out again by a later
    /// heartbeat, and then reported from its record.
    async fn step(self: &Arc<Self>, w: &pb::CutoverWork) {
        let step = w.step();
        tracing::info!(message = "Cutover step.", migration = %w.migration_name, attempt = w.attempt, step = step.as_str_name());
        let (outcome, tree) = match step {
            CutoverStep::PreFreeze | CutoverStep::Switch | CutoverStep::Rollback => {
                match self.hook(w, step).await {
                    Ok(o) => (o, None),
                    Err(why) => {
                        tracing::error!(message = "Cannot run or record the hook; will try again.", error = %why);
                        return;
                    }
                }
            }
            CutoverStep::VerifySource | CutoverStep::VerifyTarget => {
                let started = Instant::now();
                let started_ms = now_ms();
                let me = self.clone();
                let w2 = w.clone();
                let r = tokio::task::spawn_blocking(move || me.verify(&w2))
                    .await
                    .unwrap_or_else(|e| Err(format!("verification task failed: {e}")));
                let mut tree = pb::TreeDigest::default();
                let output = match r {
                    Ok(t) => {
                        tree = pb::TreeDigest {
                            digest: t.digest.to_vec(),
                            files: t.files,
                            bytes: t.bytes,
                            dirs: t.dirs,
                            symlinks: t.symlinks,
                            error: String::new(),
                        };
                        format!(
                            "{} files, {} bytes, {} directories, {} symlinks",
                            t.files, t.bytes, t.dirs, t.symlinks
                        )
                    }
                    Err(e) => {
                        tree.digest = vec![0; 32];
                        tree.error = e.clone();
                        e
                    }
                };
                let o = Outcome {
                    command: String::new(),
                    exit_code: i32::from(!tree.error.is_empty()),
                    output,
                    started_ms,
                    duration_ms: started.elapsed().as_millis() as u64,
                };
                (o, Some(tree))
            }
            CutoverStep::Unspecified => return,
        };
        let req = pb::CutoverStepRequest {
            agent: String::new(),
            session: 0,
            migration_id: w.migration_id,
            attempt: w.attempt,
            step: w.step,
            command: outcome.command,
            exit_code: outcome.exit_code,
            output: outcome.output,
            started_ms: outcome.started_ms,
            duration_ms: outcome.duration_ms,
            tree,
        };
        let sent = (|| self.control.report_cutover_step(req.clone()))
            .retry(retry::policy_for(
                Duration::from_millis(200),
                Duration::from_secs(5),
                Duration::from_secs(120),
            ))
            .when(|e| e.is_transient())
            .await;
        if let Err(e) = sent {
            tracing::warn!(message = "Cutover step not reported; it is reported again when asked.", step = step.as_str_name(), error = %e);
        }
    }

    /// The directory a migration writes to on this target.
    fn target_dir(&self, w: &pb::CutoverWork) -> Option<PathBuf> {
        let root = self.target_root.as_ref()?;
        Some(match w.target_path.as_str() {
            "" => root.clone(),
            dir => root.join(dir),
        })
    }

    /// Where this step's record is kept.
    fn record_path(&self, w: &pb::CutoverWork, step: CutoverStep) -> Result<PathBuf, String> {
        let cluster = self.control.cluster_id();
        for id in [&cluster, &w.migration_uuid] {
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(format!("the coordinator gave no usable id ({id:?})"));
            }
        }
        Ok(cluster_dir(&self.state_dir, &cluster)
            .join("migrations")
            .join(&w.migration_uuid)
            .join("cutover")
            .join(format!("a{}-{}.json", w.attempt, step.as_str_name())))
    }

    /// Runs the hook of `step` once per attempt: its recorded result if there is one.
    async fn hook(&self, w: &pb::CutoverWork, step: CutoverStep) -> Result<Outcome, String> {
        let record = self.record_path(w, step)?;
        if let Ok(bytes) = std::fs::read(&record) {
            if let Ok(o) = serde_json::from_slice::<Outcome>(&bytes) {
                tracing::info!(
                    message = "Hook ran before; reporting its recorded result.",
                    step = step.as_str_name(),
                    exit_code = o.exit_code
                );
                return Ok(o);
            }
        }
        let command = match step {
            CutoverStep::PreFreeze => &self.hooks.pre_freeze,
            CutoverStep::Switch => &self.hooks.switch,
            _ => &self.hooks.rollback,
        };
        let name = match step {
            CutoverStep::PreFreeze => "pre_freeze",
            CutoverStep::Switch => "switch",
            _ => "rollback",
        };
        let root = match step {
            CutoverStep::Switch => self.target_dir(w).unwrap_or_default(),
            _ => PathBuf::from(&w.source_path),
        };
        let started = Instant::now();
        let started_ms = now_ms();
        let outcome = match command.as_deref().map(str::trim) {
            None | Some("") => Outcome {
                command: String::new(),
                exit_code: 0,
                output: format!(
                    "no {name} hook is configured on agent {}",
                    self.control.agent()
                ),
                started_ms,
                duration_ms: 0,
            },
            Some(cmd) => {
                let mut c = tokio::process::Command::new("sh");
                c.arg("-c")
                    .arg(cmd)
                    .env("FERRY_MIGRATION", &w.migration_name)
                    .env("FERRY_MIGRATION_ID", w.migration_id.to_string())
                    .env("FERRY_CUTOVER_ATTEMPT", w.attempt.to_string())
                    .env("FERRY_STEP", name)
                    .env("FERRY_ROOT", &root)
                    .stdin(std::process::Stdio::null())
                    .kill_on_drop(true);
                let timeout = Duration::from_secs(self.hooks.timeout_secs.max(1));
                let (exit_code, output) = match tokio::time::timeout(timeout, c.output()).await {
                    Ok(Ok(out)) => {
                        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                        text.push_str(&String::from_utf8_lossy(&out.stderr));
                        (
                            out.status.code().unwrap_or(-1),
                            tail(&text, OUTPUT_TAIL).to_string(),
                        )
                    }
                    Ok(Err(e)) => (-1, format!("cannot run `sh -c {cmd}`: {e}")),
                    Err(_) => (
                        -1,
                        format!("killed after {} s (hooks.timeout_secs)", timeout.as_secs()),
                    ),
                };
                Outcome {
                    command: cmd.to_string(),
                    exit_code,
                    output,
                    started_ms,
                    duration_ms: started.elapsed().as_millis() as u64,
                }
            }
        };
        write_record(&record, &outcome)?;
        tracing::info!(
            message = "Hook ran.",
            step = name,
            exit_code = outcome.exit_code,
            duration_ms = outcome.duration_ms
        );
        Ok(outcome)
    }

    /// Reads the tree of a verification step in full. Runs on a blocking thread.
    fn verify(&self, w: &pb::CutoverWork) -> Result<Tree, String> {
        match w.step() {
            CutoverStep::VerifyTarget => {
                let root = self.target_dir(w).ok_or("this agent has no target root")?;
                tree_digest(&root, &Excludes::new(&[]).expect("no patterns"), None)
            }
            _ => {
                let excludes = Excludes::new(&w.excludes).map_err(|e| e.to_string())?;
                let root = PathBuf::from(&w.source_path);
                let dir = cluster_dir(&self.state_dir, &self.control.cluster_id())
                    .join("migrations")
                    .join(&w.migration_uuid);
                let catalog = round_dir(&dir, w.final_round).join("catalog");
                let t = tree_digest(&root, &excludes, Some(&catalog))?;
                // And nothing changed while it was read.
                unchanged_since(&root, &excludes, &catalog)?;
                Ok(t)
            }
        }
    }
}

fn write_record(path: &Path, o: &Outcome) -> Result<(), String> {
    let dir = path.parent().expect("a record has a directory");
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let body = serde_json::to_vec(o).expect("plain struct serialises");
    let write = || -> std::io::Result<()> {
        let f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut &f, &body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| format!("cannot record the hook's result in {}: {e}", path.display()))
}

/// Why a walk of the tree does not match the final round's catalog (a name changed, appeared
/// or went since), if it does not.
fn check(differ: &mut Differ<CatalogReader>, e: &Entry) -> Result<(), String> {
    match differ.entry(e).map_err(|e| e.to_string())? {
        Change::Same => Ok(()),
        Change::Send(_) | Change::Resend(_) | Change::Replace(_) => Err(format!(
            "{} changed after the freeze (it is not as the final round scanned it)",
            display(&e.path)
        )),
    }
}

fn gone(differ: Differ<CatalogReader>) -> Result<(), String> {
    let (deleted, _) = differ.finish().map_err(|e| e.to_string())?;
    match deleted.first() {
        None => Ok(()),
        Some(p) => Err(format!(
            "{} was removed after the freeze (the final round scanned it)",
            display(p)
        )),
    }
}

/// Walks `root` again and checks every name against the final round's catalog.
fn unchanged_since(root: &Path, excludes: &Excludes, catalog: &Path) -> Result<(), String> {
    let mut differ = Differ::new(
        CatalogReader::open(catalog).map_err(|e| e.to_string())?,
        HashSet::new(),
        HashSet::new(),
    );
    let walked = walk(root, excludes, |item| match item {
        Walked::Entry(e) => check(&mut differ, &e),
        Walked::Excluded => Ok(()),
        Walked::Issue { path, reason, .. } => Err(format!("{path}: {reason}")),
    })
    .map_err(|e| e.to_string())?;
    walked?;
    gone(differ)
}

/// Reads every file below `root` and digests the tree (names starting `.ferry-` are ferry's
/// and left out). With a `catalog`, every name must also be as it lists it.
pub fn tree_digest(
    root: &Path,
    excludes: &Excludes,
    catalog: Option<&Path>,
) -> Result<Tree, String> {
    let mut differ = match catalog {
        Some(c) => Some(Differ::new(
            CatalogReader::open(c).map_err(|e| format!("the final round's catalog: {e}"))?,
            HashSet::new(),
            HashSet::new(),
        )),
        None => None,
    };
    let mut t = Tree::default();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let walked = walk(root, excludes, |item| -> Result<(), String> {
        let e = match item {
            Walked::Entry(e) => e,
            Walked::Excluded => return Ok(()),
            Walked::Issue { path, reason, .. } => return Err(format!("{path}: {reason}")),
        };
        let name = e
            .path
            .file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or(b"");
        if catalog.is_none() && name.starts_with(RESERVED_PREFIX.as_bytes()) {
            return Ok(());
        }
        if let Some(d) = &mut differ {
            check(d, &e)?;
        }
        let path = ferry_common::path::bytes(&e.path);
        let link = ferry_common::path::bytes(&e.link_target);
        let (kind, mtime): (u8, (i64, u32)) = match e.kind {
            EntryKind::File => {
                t.files += 1;
                t.bytes += e.file_size;
                (1, (e.mtime_sec, e.mtime_nsec))
            }
            EntryKind::Dir => {
                t.dirs += 1;
                // A directory's mtime is left out: ferry restores it, but the tree's own
                // activity may have moved it, and it holds no data.
                (2, (0, 0))
            }
            EntryKind::Symlink => {
                t.symlinks += 1;
                (3, (e.mtime_sec, e.mtime_nsec))
            }
            EntryKind::Hardlink => {
                t.files += 1;
                t.bytes += e.file_size;
                (4, (e.mtime_sec, e.mtime_nsec))
            }
            EntryKind::Delete => return Ok(()),
        };
        h.update(&[kind]);
        h.update(&(path.len() as u64).to_le_bytes());
        h.update(path);
        h.update(&(link.len() as u64).to_le_bytes());
        h.update(link);
        h.update(&e.mode.to_le_bytes());
        h.update(&e.file_size.to_le_bytes());
        h.update(&mtime.0.to_le_bytes());
        h.update(&mtime.1.to_le_bytes());
        if e.kind == EntryKind::File {
            let full = root.join(&e.path);
            let mut f = std::fs::File::open(&full)
                .map_err(|err| format!("cannot read {}: {err}", full.display()))?;
            let mut content = blake3::Hasher::new();
            let mut n = 0u64;
            loop {
                let k = f
                    .read(&mut buf)
                    .map_err(|err| format!("cannot read {}: {err}", full.display()))?;
                if k == 0 {
                    break;
                }
                content.update(&buf[..k]);
                n += k as u64;
            }
            if n != e.file_size {
                return Err(format!(
                    "{} changed while it was read for the verification ({n} bytes, {} when \
                     listed): is something still writing to it after the freeze?",
                    full.display(),
                    e.file_size
                ));
            }
            h.update(content.finalize().as_bytes());
        }
        Ok(())
    });
    match walked {
        Err(root_err) => return Err(root_err.to_string()),
        Ok(r) => r?,
    }
    if let Some(d) = differ {
        gone(d)?;
    }
    t.digest = *h.finalize().as_bytes();
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_trees_have_equal_digests_and_any_difference_shows() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for root in [a.path(), b.path()] {
            std::fs::create_dir_all(root.join("d")).unwrap();
            std::fs::write(root.join("d/f"), b"hello").unwrap();
            std::os::unix::fs::symlink("d/f", root.join("l")).unwrap();
            filetime::set_file_mtime(root.join("d/f"), filetime::FileTime::from_unix_time(5, 0))
                .unwrap();
            filetime::set_symlink_file_times(
                root.join("l"),
                filetime::FileTime::from_unix_time(6, 0),
                filetime::FileTime::from_unix_time(6, 0),
            )
            .unwrap();
        }
        // ferry's own temporaries at the target are not part of the tree.
        std::fs::write(b.path().join(".ferry-s1-e2-x.1.1.tmp"), b"junk").unwrap();
        let none = Excludes::new(&[]).expect("no patterns");
        let ta = tree_digest(a.path(), &none, None).unwrap();
        let tb = tree_digest(b.path(), &none, None).unwrap();
        assert_eq!(ta, tb);
        assert_eq!((ta.files, ta.bytes, ta.dirs, ta.symlinks), (1, 5, 1, 1));
        // Same size and mtime, other bytes.
        std::fs::write(b.path().join("d/f"), b"HELLO").unwrap();
        filetime::set_file_mtime(
            b.path().join("d/f"),
            filetime::FileTime::from_unix_time(5, 0),
        )
        .unwrap();
        assert_ne!(
            tree_digest(b.path(), &none, None).unwrap().digest,
            ta.digest
        );
    }

    #[test]
    fn a_hook_runs_once_and_its_record_is_reported_after() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let state = tempfile::tempdir().unwrap();
            let count = state.path().join("count");
            let control = crate::control::testing::FakeCoordinator::default();
            let hooks = Hooks {
                pre_freeze: Some(format!(
                    "echo run >> {}; echo \"frozen $FERRY_MIGRATION $FERRY_STEP\"; exit 3",
                    count.display()
                )),
                ..Hooks::default()
            };
            let runner = CutoverRunner::new(control, hooks, state.path().to_path_buf(), None);
            let w = pb::CutoverWork {
                migration_id: 1,
                migration_uuid: "u-1".into(),
                migration_name: "m".into(),
                attempt: 1,
                step: CutoverStep::PreFreeze.into(),
                ..Default::default()
            };
            let first = runner.hook(&w, CutoverStep::PreFreeze).await.unwrap();
            assert_eq!(first.exit_code, 3);
            assert_eq!(first.output, "frozen m pre_freeze\n");
            let again = runner.hook(&w, CutoverStep::PreFreeze).await.unwrap();
            assert_eq!(again, first, "the record, not a second run");
            assert_eq!(std::fs::read_to_string(&count).unwrap(), "run\n");
            // No rollback hook configured: a step that succeeds and says why.
            let none = runner.hook(&w, CutoverStep::Rollback).await.unwrap();
            assert_eq!(none.exit_code, 0);
            assert!(none.output.contains("no rollback hook"), "{}", none.output);
        });
    }
}
