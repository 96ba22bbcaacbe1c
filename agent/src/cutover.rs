//! What an agent does for a cutover: runs its hooks and verifies its tree in full.
//!
//! Hooks are commands from the agent's own configuration (`[hooks]`), never from the
//! coordinator: an admin certificate is not a shell on every agent. A hook that is not
//! configured is a step that succeeds at once, and says so in the report. A hook's result is
//! recorded in the agent's state directory before it is reported, and a step that was recorded
//! is reported again, never run again: each hook runs once per cutover attempt, also when the
//! agent restarts or the report's answer is lost. (A hook interrupted by the agent's own death
//! did not complete, and runs again; so does one that ended just before the agent died, before
//! its outcome was recorded: hooks must be idempotent.)
//!
//! The full verification reads every file of the tree and folds each name's kind, path, mode,
//! size, mtime, link target and content hash into one BLAKE3 digest, in walk order; the
//! coordinator compares the source's with the target's. The source also checks that its tree
//! is still the one the final round scanned, before and after reading it: a file that changed
//! after the freeze fails the verification with its name. A file whose size, mtime, ctime and
//! inode are as an earlier verification read them is not read again: its hash comes from the
//! agent's cache ([`crate::hashcache`]), so a verification run before the cutover
//! (`ferryctl migration verify NAME --mode full`, the same steps with a `verification` number)
//! leaves only the final round's changes to read while writes are frozen.
//!
//! A target writing into an object store reads its objects back instead
//! ([`crate::storeverify`]), and the source then digests its tree as a store keeps it
//! ([`Pass::store`]).

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

use crate::catalog::{CatalogReader, CatalogWriter, Change, Differ};
use crate::control::Coordinator;
use crate::hashcache::{HashCache, HashCacheWriter, Identity, SETTLE_NS};
use crate::scan::{walk, walk_in, Order, Walked};
use crate::segment::{Entry, EntryKind};
use crate::sink::object::ObjectSink;
use crate::sink::RESERVED_PREFIX;
use crate::source::{migration_state_dir, round_dir};

/// Most output of a hook kept and reported (its tail).
pub const OUTPUT_TAIL: usize = 4096;

fn default_hook_timeout() -> u64 {
    600
}

/// The commands this agent runs for cutovers (`[hooks]` in its config).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
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

/// The hooks in force, shared between the cutover runner and the SIGHUP handler.
pub type LiveHooks = Arc<std::sync::RwLock<Hooks>>;

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
    /// Files read by this pass (the others' hashes came from the cache: unchanged since an
    /// earlier pass read them).
    pub files_read: u64,
    /// Their bytes.
    pub bytes_read: u64,
    /// A digest per class of name, in [`CLASSES`] order.
    pub classes: [[u8; 32]; 4],
}

/// The classes of names a tree's digest is also made per, to say which differs.
pub const CLASSES: [&str; 4] = ["regular files", "directories", "symlinks", "hardlinks"];

/// Does the cutover steps the coordinator hands this agent.
pub struct CutoverRunner<C: Coordinator> {
    control: C,
    hooks: LiveHooks,
    state_dir: PathBuf,
    /// The target root (targets only).
    target_root: Option<PathBuf>,
    /// The object store a target writes into, instead of a root.
    target_store: Option<Arc<ObjectSink>>,
    /// Steps being done: `(migration, cutover attempt, verification, step)`.
    running: Mutex<HashSet<(u64, u32, u32, i32)>>,
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
            hooks: Arc::new(std::sync::RwLock::new(hooks)),
            state_dir,
            target_root,
            target_store: None,
            running: Mutex::new(HashSet::new()),
        }
    }

    /// The hooks it runs, which SIGHUP replaces with the config's (a step reads them when it
    /// starts: a hook running keeps the command it started with).
    pub fn live_hooks(&self) -> LiveHooks {
        self.hooks.clone()
    }

    /// The runner of a target writing into `sink`'s object store.
    pub fn with_store(mut self, sink: Arc<ObjectSink>) -> Self {
        self.target_store = Some(sink);
        self
    }

    /// Starts the steps of `work` not already running (each in its own task).
    pub fn handle(self: &Arc<Self>, work: &[pb::CutoverWork]) {
        for w in work {
            let key = (w.migration_id, w.attempt, w.verification, w.step);
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
        tracing::info!(message = "Cutover step.", migration = %w.migration_name, attempt = w.attempt, verification = w.verification, step = step.as_str_name());
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
                let r = match (&self.target_store, step) {
                    (Some(sink), CutoverStep::VerifyTarget) => self.verify_store(sink, w).await,
                    _ => {
                        let me = self.clone();
                        let w2 = w.clone();
                        tokio::task::spawn_blocking(move || me.verify(&w2))
                            .await
                            .unwrap_or_else(|e| Err(format!("verification task failed: {e}")))
                    }
                };
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
                            files_read: t.files_read,
                            bytes_read: t.bytes_read,
                            class_digests: t.classes.iter().map(|d| d.to_vec()).collect(),
                        };
                        format!(
                            "{} files, {} bytes, {} directories, {} symlinks; read {} files, \
                             {} bytes (the rest unchanged since an earlier verification){}",
                            t.files,
                            t.bytes,
                            t.dirs,
                            t.symlinks,
                            t.files_read,
                            t.bytes_read,
                            if w.target_is_store {
                                "; compared as an object store keeps them: keys, sizes, \
                                 bytes and symlink targets (no directories, modes or mtimes)"
                            } else {
                                ""
                            }
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
            verification: w.verification,
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

    /// This agent's directory of the migration `w` is about.
    fn migration_dir(&self, w: &pb::CutoverWork) -> Result<PathBuf, String> {
        let cluster = self.control.cluster_id();
        migration_state_dir(&self.state_dir, &cluster, &w.migration_uuid)
            .map_err(|(what, id)| format!("the coordinator gave no usable {what} ({id:?})"))
    }

    /// Where this step's record is kept.
    fn record_path(&self, w: &pb::CutoverWork, step: CutoverStep) -> Result<PathBuf, String> {
        Ok(self.migration_dir(w)?.join("cutover").join(format!(
            "a{}-{}.json",
            w.attempt,
            step.as_str_name()
        )))
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
        let hooks = self.hooks.read().unwrap_or_else(|p| p.into_inner()).clone();
        let command = match step {
            CutoverStep::PreFreeze => &hooks.pre_freeze,
            CutoverStep::Switch => &hooks.switch,
            _ => &hooks.rollback,
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
                let timeout = Duration::from_secs(hooks.timeout_secs.max(1));
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
        // The hook ran to its end; nothing says so yet.
        ferry_common::fault_point!("cutover::hook_before_record");
        write_record(&record, &outcome)?;
        // Recorded, not reported: a restarted agent reports the record.
        ferry_common::fault_point!("cutover::hook_after_record");
        tracing::info!(
            message = "Hook ran.",
            step = name,
            exit_code = outcome.exit_code,
            duration_ms = outcome.duration_ms
        );
        Ok(outcome)
    }

    /// Reads the tree of a verification step in full (files unchanged since the last
    /// verification read them are not read again). Runs on a blocking thread.
    fn verify(&self, w: &pb::CutoverWork) -> Result<Tree, String> {
        let dir = self.migration_dir(w)?;
        match w.step() {
            CutoverStep::VerifyTarget => {
                let root = self
                    .target_dir(w)
                    .ok_or("this agent has no target directory to verify")?;
                let cache = dir.join("verify").join("target.hashes");
                // A cutover's pass records the tree it verified: a fallback starts from it.
                let record = switch_catalog(&dir);
                let pass = Pass {
                    cache: Some(&cache),
                    record: (w.verification == 0).then_some(record.as_path()),
                    ..Pass::default()
                };
                tree_digest(&root, &Excludes::new(&[]).expect("no patterns"), pass)
            }
            _ => {
                let excludes = Excludes::new(&w.excludes).map_err(|e| e.to_string())?;
                let root = PathBuf::from(&w.source_path);
                let catalog = round_dir(&dir, w.final_round).join("catalog");
                let cache = dir.join("verify").join(if w.target_is_store {
                    "source-as-stored.hashes"
                } else {
                    "source.hashes"
                });
                let standalone = w.verification != 0;
                let pass = Pass {
                    // A walk in a store's order cannot be checked against the catalog as it
                    // goes: the check after it covers it.
                    catalog: (!w.target_is_store).then_some(catalog.as_path()),
                    cache: Some(&cache),
                    // Outside a cutover the source is live: read it all (the cache then
                    // holds the whole tree for the cutover's pass), then say what changed.
                    keep_going: standalone,
                    since: if standalone {
                        "since the round scanned them (the next round sends them)"
                    } else {
                        "after the freeze (the final round scanned it frozen)"
                    },
                    store: w.target_is_store,
                    ..Pass::default()
                };
                let t = tree_digest(&root, &excludes, pass)?;
                // And nothing changed while it was read.
                unchanged_since(&root, &excludes, &catalog, pass.since)?;
                Ok(t)
            }
        }
    }
}

impl<C: Coordinator> CutoverRunner<C> {
    /// Reads a store target's objects back for a verification step
    /// ([`crate::storeverify`]).
    async fn verify_store(&self, sink: &ObjectSink, w: &pb::CutoverWork) -> Result<Tree, String> {
        if !w.target_is_store {
            return Err(
                "this target writes into an object store but the coordinator did not say so: \
                 upgrade the coordinator"
                    .into(),
            );
        }
        let cache = self
            .migration_dir(w)?
            .join("verify")
            .join("target-store.hashes");
        crate::storeverify::store_digest(sink, &w.target_path, &cache).await
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

/// Why a walk of the tree does not match a round's catalog (a name changed or appeared since
/// the round scanned it), if it does not.
/// `since` says when, for the message ("since the round scanned it").
fn check(differ: &mut Differ<CatalogReader>, e: &Entry, since: &str) -> Result<(), String> {
    match differ.entry(e).map_err(|e| e.to_string())? {
        Change::Same => Ok(()),
        Change::Send(_) | Change::Resend(_) | Change::Replace(_) => {
            Err(format!("{} changed {since}", display(&e.path)))
        }
    }
}

/// Walks `root` again and checks every name against a round's catalog.
fn unchanged_since(
    root: &Path,
    excludes: &Excludes,
    catalog: &Path,
    since: &str,
) -> Result<(), String> {
    let mut differ = Differ::new(
        CatalogReader::open(catalog).map_err(|e| e.to_string())?,
        HashSet::new(),
        HashSet::new(),
    );
    let mut changed = Changed::default();
    let walked = walk(root, excludes, |item| match item {
        Walked::Entry(e) => {
            if check(&mut differ, &e, since).is_err() {
                changed.push(display(&e.path));
            }
            Ok(())
        }
        Walked::Excluded => Ok(()),
        Walked::Issue { path, reason, .. } => Err(format!("{path}: {reason}")),
    })
    .map_err(|e| e.to_string())?;
    walked?;
    let (deleted, _) = differ.finish().map_err(|e| e.to_string())?;
    for p in deleted {
        changed.push(format!("{} (removed)", display(&p)));
    }
    changed.check(since)
}

/// How a verification pass reads a tree.
#[derive(Debug, Clone, Copy)]
pub struct Pass<'a> {
    /// Every name must be as this catalog lists it (a source: the round verified against).
    pub catalog: Option<&'a Path>,
    /// The content hashes of an earlier pass, taken for files unchanged since, and replaced by
    /// this pass's when it completes ([`crate::hashcache`]).
    pub cache: Option<&'a Path>,
    /// Read on past names that are not as the catalog lists them and report them all at the end
    /// (the hashes of the whole tree are then cached), instead of stopping at the first.
    pub keep_going: bool,
    /// How much older than its read a file's ctime must be for its hash to be cached
    /// ([`SETTLE_NS`]; tests set less).
    pub settle_ns: i128,
    /// When a name must not have changed since, as messages say it (the catalog's scan).
    pub since: &'a str,
    /// Also write a catalog of the tree as read here (a target at its switch: a fallback's
    /// first round compares with it); replaced only when the pass completes.
    pub record: Option<&'a Path>,
    /// Digest the tree as an object store keeps it (its target is one); no `catalog` then.
    pub store: bool,
}

/// Where a target keeps the catalog of its tree as its cutover verified it (in the migration's
/// directory).
pub fn switch_catalog(migration_dir: &Path) -> PathBuf {
    migration_dir.join("switch-catalog")
}

impl Default for Pass<'_> {
    fn default() -> Self {
        Pass {
            catalog: None,
            cache: None,
            keep_going: false,
            settle_ns: SETTLE_NS,
            since: "since the round scanned it",
            record: None,
            store: false,
        }
    }
}

/// Names not as the catalog lists them, counted, the first few kept (as shown to people).
#[derive(Default)]
struct Changed {
    count: u64,
    first: Vec<String>,
}

impl Changed {
    fn push(&mut self, name: String) {
        self.count += 1;
        if self.first.len() < 5 {
            self.first.push(name);
        }
    }

    /// An error naming what changed `since`, if anything did.
    fn check(&self, since: &str) -> Result<(), String> {
        if self.count == 0 {
            return Ok(());
        }
        Err(format!(
            "{} name(s) changed {since}: {}{}",
            self.count,
            self.first.join(", "),
            if self.count > self.first.len() as u64 {
                ", ..."
            } else {
                ""
            }
        ))
    }
}

fn unix_ns_now() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// Digests every file below `root` (names starting `.ferry-` are ferry's and left out), reading
/// those the cache has no hash of for their current version.
///
/// With [`Pass::store`], the tree is digested as an object store keeps it, in the store's
/// listing order ([`Order::Key`]), for comparison with [`crate::storeverify::store_digest`]:
/// files and each name of a hardlinked file as a key with its size and bytes, symlinks as
/// markers with their targets; directories, modes and mtimes are left out.
pub fn tree_digest(root: &Path, excludes: &Excludes, pass: Pass<'_>) -> Result<Tree, String> {
    let order = if pass.store { Order::Key } else { Order::Name };
    if pass.store && pass.catalog.is_some() {
        return Err("a catalog is in name order and cannot check a walk in a store's order".into());
    }
    let mut differ = match pass.catalog {
        Some(c) => Some(Differ::new(
            CatalogReader::open(c).map_err(|e| format!("the round's catalog: {e}"))?,
            HashSet::new(),
            HashSet::new(),
        )),
        None => None,
    };
    let mut cache = pass.cache.map(|p| HashCache::open_in(order, p));
    let mut new_cache = match pass.cache {
        Some(p) => Some(HashCacheWriter::create(p).map_err(|e| {
            format!(
                "cannot write the verification hash cache {}: {e}",
                p.display()
            )
        })?),
        None => None,
    };
    let mut record = match pass.record {
        Some(p) => Some(
            CatalogWriter::create(&p.with_extension("tmp"))
                .map_err(|e| format!("cannot record the tree: {e}"))?,
        ),
        None => None,
    };
    let mut changed = Changed::default();
    let mut t = Tree::default();
    let mut fold = Fold::default();
    let mut buf = vec![0u8; 1 << 20];
    let walked = walk_in(order, root, excludes, |item| -> Result<(), String> {
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
        // A target's own temporaries (a source has a catalog, or is read as a store keeps it).
        if pass.catalog.is_none() && !pass.store && name.starts_with(RESERVED_PREFIX.as_bytes()) {
            return Ok(());
        }
        if let Some(r) = &mut record {
            r.append(&e)
                .map_err(|err| format!("cannot record the tree: {err}"))?;
        }
        if let Some(d) = &mut differ {
            if let Err(why) = check(d, &e, pass.since) {
                if !pass.keep_going {
                    return Err(why);
                }
                changed.push(display(&e.path));
            }
        }
        if pass.store {
            if let Some(why) = crate::sink::object::key_refusal(&e.path) {
                return Err(format!("{}: {why}", display(&e.path)));
            }
        }
        let path = ferry_common::path::bytes(&e.path);
        let link = ferry_common::path::bytes(&e.link_target);
        let (kind, mtime): (u8, (i64, u32)) = match e.kind {
            // A store keeps no directories.
            EntryKind::Dir if pass.store => return Ok(()),
            EntryKind::File => {
                t.files += 1;
                t.bytes += e.file_size;
                (KIND_FILE, (e.mtime_sec, e.mtime_nsec))
            }
            EntryKind::Dir => {
                t.dirs += 1;
                // A directory's mtime is left out: ferry restores it, but the tree's own
                // activity may have moved it, and it holds no data.
                (KIND_DIR, (0, 0))
            }
            EntryKind::Symlink => {
                t.symlinks += 1;
                (KIND_SYMLINK, (e.mtime_sec, e.mtime_nsec))
            }
            EntryKind::Hardlink => {
                t.files += 1;
                t.bytes += e.file_size;
                (KIND_HARDLINK, (e.mtime_sec, e.mtime_nsec))
            }
            EntryKind::Delete => return Ok(()),
        };
        let content = match e.kind {
            EntryKind::File => {
                let id = Identity {
                    size: e.file_size,
                    mtime,
                    ctime: e.ctime,
                    inode: e.inode,
                };
                let cached = cache.as_mut().and_then(|c| c.lookup(&e.path, &id));
                let (content, settled) = match cached {
                    Some(hash) => (hash, true),
                    None => {
                        let started = unix_ns_now();
                        let hash = read_content(&root.join(&e.path), e.file_size, &mut buf)?;
                        t.files_read += 1;
                        t.bytes_read += e.file_size;
                        (hash, id.settled(started, pass.settle_ns))
                    }
                };
                if let (Some(w), true) = (&mut new_cache, settled) {
                    w.append(&e.path, &id, &content).map_err(|err| {
                        format!("cannot write the verification hash cache: {err}")
                    })?;
                }
                Some(content)
            }
            // A store holds a copy of the file under each of its names: read it again.
            EntryKind::Hardlink if pass.store => {
                t.files_read += 1;
                t.bytes_read += e.file_size;
                Some(read_content(&root.join(&e.path), e.file_size, &mut buf)?)
            }
            _ => None,
        };
        if pass.store {
            // What a store keeps of a name: its key, whether it is a symlink's marker (and
            // the link's target), its size and bytes.
            match kind {
                KIND_SYMLINK => fold.name(KIND_SYMLINK, path, link, 0, 0, (0, 0), None),
                _ => fold.name(
                    KIND_FILE,
                    path,
                    b"",
                    0,
                    e.file_size,
                    (0, 0),
                    content.as_ref(),
                ),
            }
        } else {
            fold.name(
                kind,
                path,
                link,
                e.mode,
                e.file_size,
                mtime,
                content.as_ref(),
            );
        }
        Ok(())
    });
    match walked {
        Err(root_err) => return Err(root_err.to_string()),
        Ok(r) => r?,
    }
    if let Some(d) = differ {
        let (deleted, _) = d.finish().map_err(|e| e.to_string())?;
        for p in deleted {
            changed.push(format!("{} (removed)", display(&p)));
        }
    }
    if let (Some(r), Some(p)) = (record, pass.record) {
        r.finish()
            .and_then(|()| {
                std::fs::rename(p.with_extension("tmp"), p).map_err(|source| {
                    crate::manifest::ManifestError::Io {
                        path: p.to_path_buf(),
                        source,
                    }
                })
            })
            .map_err(|e| format!("cannot record the tree: {e}"))?;
    }
    // The hashes are of the files as they are now, whatever the catalog said.
    if let Some(w) = new_cache {
        w.finish()
            .map_err(|e| format!("cannot write the verification hash cache: {e}"))?;
    }
    changed.check(pass.since)?;
    fold.finish(&mut t);
    Ok(t)
}

/// The kinds of names as a tree's digest records them (also the [`CLASSES`] index + 1).
pub const KIND_FILE: u8 = 1;
/// A directory.
pub const KIND_DIR: u8 = 2;
/// A symlink.
pub const KIND_SYMLINK: u8 = 3;
/// A further name of a hardlinked file.
pub const KIND_HARDLINK: u8 = 4;

/// Folds the names of a tree, in walk order, into its digest and the digest of each class.
#[derive(Default)]
pub struct Fold {
    all: blake3::Hasher,
    classes: [blake3::Hasher; 4],
    rec: Vec<u8>,
}

impl Fold {
    /// Adds one name: its kind (`KIND_…`), path and link target as bytes, mode, size, mtime
    /// and, for a file, the BLAKE3 of its content.
    #[allow(clippy::too_many_arguments)]
    pub fn name(
        &mut self,
        kind: u8,
        path: &[u8],
        link: &[u8],
        mode: u32,
        size: u64,
        mtime: (i64, u32),
        content: Option<&[u8; 32]>,
    ) {
        let rec = &mut self.rec;
        rec.clear();
        rec.push(kind);
        rec.extend_from_slice(&(path.len() as u64).to_le_bytes());
        rec.extend_from_slice(path);
        rec.extend_from_slice(&(link.len() as u64).to_le_bytes());
        rec.extend_from_slice(link);
        rec.extend_from_slice(&mode.to_le_bytes());
        rec.extend_from_slice(&size.to_le_bytes());
        rec.extend_from_slice(&mtime.0.to_le_bytes());
        rec.extend_from_slice(&mtime.1.to_le_bytes());
        if let Some(c) = content {
            rec.extend_from_slice(c);
        }
        self.all.update(rec);
        self.classes[usize::from(kind) - 1].update(rec);
    }

    /// Puts the digests into `t`.
    pub fn finish(self, t: &mut Tree) {
        t.digest = *self.all.finalize().as_bytes();
        t.classes = self.classes.map(|c| *c.finalize().as_bytes());
    }
}

/// BLAKE3 of the file at `full`, which must still hold `size` bytes.
fn read_content(full: &Path, size: u64, buf: &mut [u8]) -> Result<[u8; 32], String> {
    let mut f = std::fs::File::open(full)
        .map_err(|err| format!("cannot read {}: {err}", full.display()))?;
    let mut content = blake3::Hasher::new();
    let mut n = 0u64;
    loop {
        let k = f
            .read(buf)
            .map_err(|err| format!("cannot read {}: {err}", full.display()))?;
        if k == 0 {
            break;
        }
        content.update(&buf[..k]);
        n += k as u64;
    }
    if n != size {
        return Err(format!(
            "{} changed while it was read for the verification ({n} bytes, {size} when \
             listed): is something still writing to it?",
            full.display()
        ));
    }
    Ok(*content.finalize().as_bytes())
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
        let ta = tree_digest(a.path(), &none, Pass::default()).unwrap();
        let tb = tree_digest(b.path(), &none, Pass::default()).unwrap();
        assert_eq!(ta, tb);
        assert_eq!((ta.files, ta.bytes, ta.dirs, ta.symlinks), (1, 5, 1, 1));
        // Same size and mtime, other bytes.
        std::fs::write(b.path().join("d/f"), b"HELLO").unwrap();
        filetime::set_file_mtime(
            b.path().join("d/f"),
            filetime::FileTime::from_unix_time(5, 0),
        )
        .unwrap();
        let changed = tree_digest(b.path(), &none, Pass::default()).unwrap();
        assert_ne!(changed.digest, ta.digest);
        // Only the class of regular files differs.
        let differ: Vec<&str> = CLASSES
            .iter()
            .zip(changed.classes.iter().zip(&ta.classes))
            .filter(|(_, (x, y))| x != y)
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(differ, vec!["regular files"]);
    }

    #[test]
    fn a_second_pass_reads_only_the_files_changed_since_the_first() {
        let tree = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let root = tree.path();
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("d/a"), vec![1u8; 100]).unwrap();
        std::fs::write(root.join("d/b"), vec![2u8; 200]).unwrap();
        std::fs::write(root.join("c"), vec![3u8; 300]).unwrap();
        let none = Excludes::new(&[]).expect("no patterns");
        let cache = state.path().join("verify/target.hashes");
        // Files written just now are not settled: every pass reads them all again.
        let racy = Pass {
            cache: Some(&cache),
            ..Pass::default()
        };
        for _ in 0..2 {
            let t = tree_digest(root, &none, racy).unwrap();
            assert_eq!((t.files_read, t.bytes_read), (3, 600));
        }
        // Settled (the test cannot wait out the clock's granularity, so it says 0).
        let pass = Pass {
            settle_ns: 0,
            ..racy
        };
        let first = tree_digest(root, &none, pass).unwrap();
        assert_eq!((first.files_read, first.bytes_read), (3, 600));
        let second = tree_digest(root, &none, pass).unwrap();
        assert_eq!((second.files_read, second.bytes_read), (0, 0));
        assert_eq!(second.digest, first.digest);
        // One file changes (its size too, so the test does not depend on the ctime's tick).
        std::fs::write(root.join("d/b"), vec![9u8; 250]).unwrap();
        let third = tree_digest(root, &none, pass).unwrap();
        assert_eq!((third.files_read, third.bytes_read), (1, 250));
        assert_ne!(third.digest, first.digest);
        let uncached = tree_digest(root, &none, Pass::default()).unwrap();
        assert_eq!(third.digest, uncached.digest);
        assert_eq!((uncached.files_read, uncached.bytes_read), (3, 650));
    }

    #[test]
    fn a_pass_over_a_live_source_reads_on_and_names_what_changed_since_the_round() {
        let tree = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let root = tree.path();
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("d/a"), b"aaaa").unwrap();
        std::fs::write(root.join("d/b"), b"bbbb").unwrap();
        std::fs::write(root.join("gone"), b"gggg").unwrap();
        let none = Excludes::new(&[]).expect("no patterns");
        // The round's catalog, as a scan writes it.
        let catalog = state.path().join("catalog");
        let mut w = crate::catalog::CatalogWriter::create(&catalog).unwrap();
        walk(root, &none, |item| -> Result<(), String> {
            if let Walked::Entry(e) = item {
                w.append(&e).unwrap();
            }
            Ok(())
        })
        .unwrap()
        .unwrap();
        w.finish().unwrap();
        let cache = state.path().join("source.hashes");
        let pass = Pass {
            catalog: Some(&catalog),
            cache: Some(&cache),
            keep_going: true,
            settle_ns: 0,
            ..Pass::default()
        };
        assert!(tree_digest(root, &none, pass).is_ok());
        // The live source moves on after the round.
        std::fs::write(root.join("d/b"), b"bbbbbb").unwrap();
        std::fs::write(root.join("new"), b"n").unwrap();
        std::fs::remove_file(root.join("gone")).unwrap();
        let err = tree_digest(root, &none, pass).unwrap_err();
        assert_eq!(
            err,
            "3 name(s) changed since the round scanned it: d/b, new, gone (removed)"
        );
        // It read on: every file's hash is cached, so nothing is read again.
        let again = Pass {
            catalog: None,
            ..pass
        };
        let t = tree_digest(root, &none, again).unwrap();
        assert_eq!((t.files, t.files_read), (3, 0));
        // Without keep_going (a cutover), the first change stops the pass.
        let strict = Pass {
            keep_going: false,
            ..pass
        };
        let err = tree_digest(root, &none, strict).unwrap_err();
        assert!(err.contains("d/b changed since the round"), "{err}");
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
            // SIGHUP's new hooks are the ones the next step runs.
            *runner.live_hooks().write().unwrap() = Hooks {
                rollback: Some("echo \"rolled back $FERRY_MIGRATION\"".into()),
                ..Hooks::default()
            };
            let w2 = pb::CutoverWork { attempt: 2, ..w };
            let rolled = runner.hook(&w2, CutoverStep::Rollback).await.unwrap();
            assert_eq!(
                (rolled.exit_code, rolled.output.as_str()),
                (0, "rolled back m\n")
            );
        });
    }
}
