//! `ferryctl`: the operator's CLI (gRPC with an admin certificate).

// Output goes through `emit`: `ferryctl agents list | head -1` ends quietly with 0 when `head`
// has read enough, where std's `println!` would panic on the closed pipe. These shadow std's
// macros in this file.
macro_rules! println {
    () => {
        $crate::cli::emit(format_args!("\n"))
    };
    ($($t:tt)*) => {
        $crate::cli::emit(format_args!("{}\n", format_args!($($t)*)))
    };
}
macro_rules! print {
    ($($t:tt)*) => {
        $crate::cli::emit(format_args!($($t)*))
    };
}

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::ctl::{
    cutover_lines, default_name, failed_lines, human_bytes, print_json, progress_line, round_lines,
    verification_lines, Ctl, Output,
};
use crate::quickstart;
use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand};
use ferry_common::config::TlsPaths;
use ferry_common::tls::TlsMaterial;
use ferry_coordinator::grpc::now_ms;
use ferry_proto::admin as pb;
use ferry_proto::json::{phase_name, segment_status_name};

#[derive(Parser)]
#[command(
    name = "ferryctl",
    version,
    about = "Drive ferry migrations: agents, migrations, progress, verification",
    after_help = crate::exit::HELP
)]
struct Cli {
    /// Coordinator address (host:port), or several separated by commas [default: the
    /// context's, else 127.0.0.1:7400].
    #[arg(long, global = true, env = "FERRY_COORDINATOR")]
    coordinator: Option<String>,
    /// Directory with ca.pem and admin-<name>.pem/.key [default: the context's, else
    /// /etc/ferry/pki].
    #[arg(long, global = true, env = "FERRY_PKI_DIR")]
    pki_dir: Option<PathBuf>,
    /// Admin identity (certificate admin-<NAME>.pem). Not `--name`, which names migrations
    /// [default: the context's, else admin].
    #[arg(
        long = "admin",
        value_name = "NAME",
        global = true,
        env = "FERRY_ADMIN"
    )]
    admin: Option<String>,
    /// The context (from ~/.config/ferry/config.toml) to use instead of the current one.
    #[arg(long, global = true, env = "FERRY_CONTEXT")]
    context: Option<String>,
    /// Output format of read commands.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The coordinator cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Agents.
    #[command(subcommand)]
    Agents(AgentsCmd),
    /// Migrations.
    #[command(subcommand)]
    Migration(MigrationCmd),
    /// The audit log: every call that changed or tried to change the cluster (who, from where,
    /// what, the decision), oldest first. Checks the records' hash chain and exits non-zero
    /// when it is broken. Needs the admin role.
    Audit {
        /// Only records of the last DURATION (`1h`, `2d`); the chain is checked over all.
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
    },
    /// Join tokens: one-time secrets with which a new agent gets its certificate
    /// (`ferry-agent join`). Need the admin role.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Certificates the coordinators signed for agents (joins and renewals).
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Operators' identities: keys made where they are used, certified by the coordinator.
    #[command(subcommand)]
    User(UserCmd),
    /// Contexts: named coordinator addresses, PKI directory and admin identity in
    /// ~/.config/ferry/config.toml (or $FERRY_CONFIG), as kubectl has them.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Assess PATHs on AGENT's host without moving anything: bytes, files, directories, a size
    /// histogram, the largest files, small files, hardlinks, sparse files, names that are not
    /// UTF-8, what cannot be copied, and how much changed in the last hour, day and week. The
    /// agent walks the tree as a migration would (progress shows while it runs); the result is
    /// kept as a job (`ferryctl jobs ID`) that `plan --assessed ID` reads.
    Assess {
        /// The agent whose host holds the paths.
        agent: String,
        /// Absolute paths on that host.
        #[arg(required = true)]
        paths: Vec<String>,
        /// Glob of names to leave out, as a migration's --exclude (repeatable).
        #[arg(long)]
        exclude: Vec<String>,
        /// A gitignore-style file of names to leave out, as a migration's --exclude-from.
        #[arg(long, value_name = "FILE")]
        exclude_from: Vec<PathBuf>,
        /// How long to wait for the result [default: 24h].
        #[arg(long, value_parser = parse_duration, default_value = "24h")]
        timeout: Duration,
    },
    /// Probe the network path from agent SRC to agent DST (which must receive data) over their
    /// real QUIC connection: round-trip time, packet loss, and throughput with 1, 2, 4 … up to
    /// --streams parallel streams for each congestion controller. The result is kept as a job
    /// (`ferryctl jobs ID`) that `plan --probed ID` reads.
    Probe {
        /// The agent that sends.
        src: String,
        /// The agent that receives.
        dst: String,
        /// Seconds of throughput runs in all (shared among them; each gets at least 1 s).
        #[arg(long, default_value_t = 20)]
        seconds: u32,
        /// The most parallel streams to try.
        #[arg(long, default_value_t = 4)]
        streams: u32,
        /// Congestion controllers to try (`bbr,cubic,newreno`) [default: all three].
        #[arg(long, value_delimiter = ',')]
        congestion: Vec<ferry_common::transport::Congestion>,
    },
    /// Jobs (assessments, probes, sync previews), newest first, without their results; with
    /// ID, that job and its result.
    Jobs {
        /// A job's number.
        id: Option<u64>,
    },
    /// Plan a migration's target agents: how many of which type (from a catalog of types with
    /// their price, throughput, quota and egress price) move DATA before DEADLINE at the least
    /// cost, the predicted duration and cost, and which constraint binds; or, when nothing can,
    /// what would. Solved exactly (integer program). Needs no coordinator unless it reads a
    /// job's result (--assessed, --probed).
    Plan {
        /// How much to move: `50TB`, `1.5TiB`, `800GB`.
        #[arg(long, value_parser = parse_size, required_unless_present = "assessed")]
        data: Option<u64>,
        /// Take the data size from assessment job ID (`ferryctl assess`) instead of --data.
        #[arg(long, value_name = "ID", conflicts_with = "data")]
        assessed: Option<u64>,
        /// Take the path's limit from probe job ID (`ferryctl probe`): its fastest run, a lower
        /// bound of what the path carries between those two agents.
        #[arg(long, value_name = "ID", conflicts_with = "path_limit")]
        probed: Option<u64>,
        /// When the copy must be done, from now: `72h`, `3d`.
        #[arg(long, value_parser = parse_duration)]
        deadline: Duration,
        /// The catalog of target agent types (TOML `[[agent]]` entries; an example:
        /// deploy/plan/catalog.example.toml).
        #[arg(long)]
        catalog: PathBuf,
        /// What the path between the sites carries, if it limits (`10gbit`).
        #[arg(long)]
        path_limit: Option<ferry_common::rate::Rate>,
    },
    /// Print a completion script for SHELL: `ferryctl completions bash >
    /// /etc/bash_completion.d/ferryctl` (zsh: a file `_ferryctl` on `$fpath`; fish:
    /// `~/.config/fish/completions/ferryctl.fish`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `ferryctl man > /usr/share/man/man1/ferryctl.1`.
    Man,
    /// Write the quick start's sample data set (checkpoints, small files, empties, a symlink).
    Sample {
        /// Directory to create.
        #[arg(long)]
        dir: PathBuf,
        /// Size of each large file, in MiB.
        #[arg(long, default_value_t = 128)]
        big_file_mib: u64,
        /// Number of small files.
        #[arg(long, default_value_t = 3000)]
        small_files: u32,
    },
    /// Run a complete migration on this machine: coordinator and two agents on 127.0.0.1.
    Quickstart {
        /// Directory to migrate (default: a generated sample).
        #[arg(long)]
        source: Option<PathBuf>,
        /// Where to write it (default: <workdir>/target); must be empty or absent.
        #[arg(long)]
        target: Option<PathBuf>,
        /// Keep the CA, coordinator and agent state here (default: a temporary directory).
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// Segment size: `64MiB`, `8MB`, or a number of bytes.
        #[arg(long, default_value_t = ferry_common::DEFAULT_SEGMENT_SIZE, value_parser = parse_size)]
        segment_size: u64,
        /// Carry extended attributes (xattrs; ACLs and security labels are xattrs too).
        #[arg(long)]
        xattrs: bool,
        /// Size of each large file of the generated sample, in MiB.
        #[arg(long, default_value_t = 128)]
        sample_big_file_mib: u64,
        /// Number of small files in the generated sample.
        #[arg(long, default_value_t = 3000)]
        sample_small_files: u32,
        /// Write into an object store instead of a directory: `s3://bucket/prefix`,
        /// `gs://bucket/prefix`, `az://container/prefix`. Credentials from the environment
        /// (`AWS_ACCESS_KEY_ID`, ...) or --store-option.
        #[arg(long, conflicts_with = "target")]
        target_store: Option<String>,
        /// A setting of the target store, `KEY=VALUE` (`endpoint=http://127.0.0.1:5000`,
        /// `allow_http=true`, `region=us-east-1`, ...); repeatable.
        #[arg(
            long = "store-option",
            value_name = "KEY=VALUE",
            requires = "target_store"
        )]
        store_options: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Make NAME the current context.
    UseContext {
        /// The context.
        name: String,
    },
    /// List the contexts (the current one marked *).
    GetContexts,
    /// Create or change context NAME from the --coordinator, --pki-dir and --admin given
    /// (`ferryctl config set-context prod --coordinator 10.0.0.11:7400 --admin alice`).
    SetContext {
        /// The context.
        name: String,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Members, leader, term, log indexes, each member's replication (on the leader).
    Status,
    /// Add a coordinator node (started with `bootstrap = false`): it joins as a learner, and
    /// becomes a voter once it has caught up. If it does not catch up in time it is removed
    /// again (the membership is unchanged) and this fails.
    AddNode {
        /// Its node id.
        #[arg(long)]
        id: u64,
        /// Its gRPC address (host:port).
        #[arg(long)]
        addr: String,
        /// Seconds it may take to catch up.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Remove a coordinator node (voter or learner) from the cluster.
    RemoveNode {
        /// Its node id.
        #[arg(long)]
        id: u64,
    },
    /// Build a snapshot on the node ferryctl is connected to, compacting its log.
    Snapshot,
    /// Make a node the leader.
    TransferLeader {
        /// Its node id.
        #[arg(long)]
        id: u64,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Make a one-time join token and print it. It carries the cluster CA's pin, so the agent
    /// that uses it (`ferry-agent join --token T --coordinator HOST:JOINPORT`) trusts only this
    /// cluster. Hand it over a channel you trust; it is shown once.
    Create {
        /// Who joins with it: agent.
        #[arg(long, default_value = "agent")]
        role: String,
        /// How long it is valid (`15m`, `1h`, `2d`; at most 7d).
        #[arg(long, value_parser = parse_duration, default_value = "1h")]
        ttl: Duration,
        /// The only agent name it may be used for [default: any name not in use].
        #[arg(long)]
        agent: Option<String>,
    },
    /// Join tokens of the last day: who made them, until when they are valid, who used them.
    List,
}

#[derive(Subcommand)]
enum UserCmd {
    /// Make operator NAME's key here (DIR/admin-NAME.key, 0600) and a certificate request
    /// (DIR/admin-NAME.csr) to hand to an admin, who certifies it with `user create NAME
    /// --role R --csr FILE`. The key never leaves this host.
    Request {
        /// The operator's name.
        name: String,
        /// Where the key and the request go [default: the PKI directory].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Certify operator NAME with ROLE (admin role needed; valid 90 days). With --csr, the
    /// request someone made with `user request` (the certificate is written next to it, as
    /// admin-NAME.pem); without, a key made here for an operator who works from this host
    /// (written to the PKI directory as admin-NAME.key and .pem). Never replaces a file.
    Create {
        /// The operator's name.
        name: String,
        /// viewer (reads), operator (also changes migrations) or admin (also the cluster,
        /// tokens, users, revocations).
        #[arg(long)]
        role: ferry_common::names::Role,
        /// A request made with `ferryctl user request`.
        #[arg(long)]
        csr: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Signed certificates by identity: serial, validity, how each came (a join or a renewal),
    /// and whether it is revoked.
    List,
    /// Renew this operator's own certificate before it expires (ferryctl says when it is due):
    /// a new key is made here, a coordinator certifies it for the same name and role, and both
    /// files are replaced (admin-NAME.key and .pem in the PKI directory). Any role may.
    Renew,
}

#[derive(Subcommand)]
enum AgentsCmd {
    /// Registered agents, with their data connections' congestion controller, window and
    /// throttle.
    List,
    /// Cut an agent off: every certificate of it signed until now is refused on every
    /// connection, to coordinators and to other agents, and its session ends. It may join again
    /// only with a new token (`ferry-agent join --replace`). Needs the admin role.
    Revoke {
        /// The agent's name.
        name: String,
    },
    /// Limit what an agent sends as a source, over all its migrations; changed live.
    Throttle {
        /// The agent's name.
        name: String,
        /// A rate (200mbit, 1gbit, 500kbit, bits per second), off, or a schedule with times
        /// in UTC: "09:00-18:00 100mbit, else off" (windows may cross midnight).
        throttle: String,
    },
}

#[derive(Subcommand)]
enum TargetsAction {
    /// Add a target agent (or make a removed one active again).
    Add {
        /// The target agent.
        agent: String,
    },
    /// Send no new files to a target agent.
    Remove {
        /// The target agent.
        agent: String,
    },
}

/// A migration's pool of targets, one line each.
fn print_pool(pool: &[ferry_proto::admin::PoolMember]) {
    println!(
        "{:<24} {:<8} {:>8} {:>10} {:>12}",
        "TARGET", "ACTIVE", "LEASED", "VERIFIED", "BYTES"
    );
    for t in pool {
        println!(
            "{:<24} {:<8} {:>8} {:>10} {:>12}",
            t.agent,
            if t.active { "yes" } else { "no" },
            t.segments_leased,
            t.segments_verified,
            t.bytes_verified
        );
    }
}

#[derive(Subcommand)]
enum MigrationCmd {
    /// Create a migration: --source AGENT:/abs/path --target AGENT[:relative/dir] [--name NAME].
    /// Retried with the same idempotency key while the coordinator does not answer, so it
    /// never creates two.
    Create {
        /// Its name, unique in the cluster (default: from source and target, e.g.
        /// src-01-data-to-dst-01-restored).
        #[arg(long)]
        name: Option<String>,
        /// Source agent and absolute directory, as AGENT:/path; or AGENT:s3://bucket/prefix
        /// (gs://, az://) to read an object store through that agent (bulk copy only).
        #[arg(long)]
        source: String,
        /// Target agent and directory under its root, as AGENT or AGENT:dir.
        #[arg(long)]
        target: String,
        /// Segment size: `64MiB`, `8MB`, or a number of bytes.
        #[arg(long, default_value_t = ferry_common::DEFAULT_SEGMENT_SIZE, value_parser = parse_size)]
        segment_size: u64,
        /// Carry extended attributes (xattrs; ACLs and security labels are xattrs too). The
        /// target's file system must keep them, or the files carrying them fail.
        #[arg(long)]
        xattrs: bool,
        /// Failed attempts after which a segment (and the files in it) is given up on and
        /// marked failed with its last error; the migration goes on with the rest and ends
        /// failed. Retries back off from 1 s, doubling to at most 60 s.
        #[arg(long, default_value_t = ferry_coordinator::state::DEFAULT_MAX_ATTEMPTS, value_parser = clap::value_parser!(u32).range(1..=ferry_coordinator::state::MAX_MAX_ATTEMPTS as i64))]
        max_attempts: u32,
        /// A glob pattern of paths (relative to the source root) not to copy; repeat it for
        /// several. `*` crosses '/', a matching directory is skipped whole. Excluded paths are
        /// counted, not failures.
        #[arg(long = "exclude", value_name = "PATTERN")]
        excludes: Vec<String>,
        /// A file of paths not to copy, in gitignore's syntax (`build/` only directories, a
        /// name without '/' at any depth, `*` not crossing '/', `!name` takes back what an
        /// earlier line of the file left out, `#` comments); repeatable. Its rules are kept
        /// with the migration, not the file's path.
        #[arg(long, value_name = "FILE")]
        exclude_from: Vec<PathBuf>,
        /// Its throttle from the start (change it later with `migration throttle`): a rate
        /// (200mbit), or a schedule with times in UTC: "09:00-18:00 100mbit, else off".
        #[arg(long)]
        throttle: Option<String>,
        /// Sync rounds leave files deleted at the source in place at the target.
        #[arg(long)]
        keep_deleted: bool,
        /// Most names one sync round may delete at the target: a round whose scan finds more
        /// (a source file system that was not mounted?) deletes none and fails, saying so.
        #[arg(long, value_name = "N")]
        max_delete: Option<u64>,
        /// Start a sync round this long after the last one ended (30s, 10m, 2h; at most 7 days),
        /// besides those started with `migration sync`.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        sync_every: Option<Duration>,
        /// Cut over by itself once a sync round ends done in less than this (60s, 5m): the
        /// freeze its final round would take at that pace. Once: after a rolled-back attempt
        /// you decide. Pairs with --sync-every for a hands-off migration.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        auto_cutover_below: Option<Duration>,
        /// More target agents for its pool, comma-separated: segments spread over every
        /// member (the pieces of a split file stay with one). Each must write to the same
        /// object store as --target's agent. `migration targets` changes the pool later.
        #[arg(long, value_delimiter = ',', value_name = "AGENT,...")]
        targets: Vec<String>,
        /// A plan made with `ferryctl plan -o json`: the pool (--target and --targets) must
        /// have as many target agents as the plan has.
        #[arg(long, value_name = "FILE")]
        plan: Option<PathBuf>,
        /// Change nothing: check the request as a create would (name, agents, spec), then have
        /// the source agent walk its path with these excludes and print what would be copied,
        /// how much, what is excluded or cannot be copied, and what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
    /// Cut over: freeze the source (its agent's pre_freeze hook), sync the last changes,
    /// verify both trees in full, and switch (the target agent's switch hook) — or, on any
    /// failure, roll back (the source agent's rollback hook). The last round must be done.
    Cutover {
        /// Migration name or id.
        id: String,
        /// Abort the running cutover: the source rolls back.
        #[arg(long)]
        abort: bool,
        /// Wait until the cutover has ended; then exit non-zero if it did not switch.
        #[arg(long)]
        watch: bool,
        /// Start nothing: check that a cutover could start now, and print its steps — the
        /// source's pre_freeze hook, what the final round would send and delete (the source
        /// agent previews it), the full verification, the target's switch hook.
        #[arg(long, conflicts_with_all = ["abort", "watch"])]
        dry_run: bool,
    },
    /// A migration's report: its rounds, its cutover with each step and the freeze window,
    /// and what was verified.
    Report {
        /// Migration name or id.
        id: String,
    },
    /// Start a sync round: the source rescans and sends what changed since the last round
    /// (new, changed and deleted names, and what the last round did not copy). The current
    /// round must have ended.
    Sync {
        /// Migration name or id.
        id: String,
        /// Wait until the round has ended; then exit non-zero if it failed.
        #[arg(long)]
        watch: bool,
        /// Start nothing: the source agent scans and compares as the round would, and this
        /// prints what it would send (new and changed names, how much) and delete.
        #[arg(long, conflicts_with = "watch")]
        dry_run: bool,
    },
    /// After a cutover switched, keep the old source in sync from the new target: starts a
    /// migration in reverse (NAME-fallback; its agent must be able to receive: data_listen and
    /// a root holding the old source path) whose first round sends only what changed at the
    /// target since the switch. Sync it like any migration; its own cutover brings the old
    /// site back; `migration finalize NAME` ends the window.
    Fallback {
        /// Migration name or id (the one that was cut over).
        id: String,
        /// Wait until the reverse migration's first round has ended.
        #[arg(long)]
        watch: bool,
    },
    /// Close the fallback window of a migration that was cut over: its reverse migration syncs
    /// no more and no fallback may start after (the old site may be retired).
    Finalize {
        /// Migration name or id (the one that was cut over).
        id: String,
    },
    /// Delete a migration: it leaves the cluster's state with its segments (its name is free
    /// again) and its agents remove what they keep of it — a target writing to an object store
    /// aborts its unfinished multipart uploads. The data already at the target stays. Refused
    /// during a cutover and while it has a fallback.
    Delete {
        /// Migration name or id.
        id: String,
        /// Also while its source still scans or sends, or a full verification runs.
        #[arg(long)]
        force: bool,
    },
    /// All migrations.
    List,
    /// One migration's progress, and its failed segments with their errors.
    Status {
        /// Migration name or id.
        id: String,
        /// Refresh until the migration has ended; then exit non-zero if it failed.
        #[arg(long)]
        watch: bool,
    },
    /// Grow or shrink a migration's pool of target agents while it runs. Members must write
    /// to the same object store as its first target; a new member gets work at the source's
    /// next lease call. A removed member gets no new files (the pieces of split files it
    /// began still go to it); the first target cannot leave.
    Targets {
        /// Migration name or id.
        id: String,
        #[command(subcommand)]
        action: TargetsAction,
    },
    /// Limit what a migration's source sends; changed live (sources apply it within a second).
    Throttle {
        /// Migration name or id.
        id: String,
        /// A rate (200mbit, 1gbit, 500kbit, bits per second), off, or a schedule with times
        /// in UTC: "09:00-18:00 100mbit, else off" (windows may cross midnight).
        throttle: String,
    },
    /// Verify a migration. `--mode transferred` (the default) checks what the rounds moved:
    /// every segment verified with equal source and target BLAKE3 (failed segments are listed
    /// first, with their errors). `--mode full` has both agents read their whole trees back and
    /// compares them — the target against the source as the last round's scan found it (a
    /// name changed since on a live source makes it inconclusive and is named). Each agent
    /// keeps the hashes it read: a later full verification, such as the cutover's, reads only
    /// files changed since, so running one before a cutover keeps the freeze short.
    /// Exits non-zero when not verified.
    Verify {
        /// Migration name or id.
        id: String,
        /// transferred or full.
        #[arg(long, value_enum, default_value_t = VerifyMode::Transferred)]
        mode: VerifyMode,
    },
}

/// Follows migration `id` until its round has ended, showing progress, then its rounds (or
/// the progress as JSON); failure when the round failed.
async fn watch_round(ctl: &Ctl, id: u64, json: bool) -> anyhow::Result<ExitCode> {
    let p = ctl
        .watch(id, Duration::from_secs(3600), |p, r| {
            if !json {
                eprintln!("{}", progress_line(p, r))
            }
        })
        .await?;
    if json {
        print_json(&p);
    } else {
        println!("{}", progress_line(&p, &Default::default()));
        for line in round_lines(&p, now_ms()) {
            println!("{line}");
        }
    }
    Ok(if p.phase() == pb::Phase::Failed {
        crate::exit::Exit::Failed.code()
    } else {
        ExitCode::SUCCESS
    })
}

/// What `migration verify` checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum VerifyMode {
    /// What the rounds transferred: every segment's BLAKE3, as both ends reported it.
    Transferred,
    /// Both trees, read back from disk by their agents, compared.
    Full,
}

/// `migration create --dry-run` once the coordinator found the request sound: the source
/// agent assesses the source path with the spec's excludes (a job, as `ferryctl assess`), and
/// this says what the first copy would move. A first copy deletes nothing at the target.
async fn dry_run_create(
    ctl: &Ctl,
    name: &str,
    spec: &pb::MigrationSpec,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if ferry_common::path::is_store_url(&spec.source_path) {
        bail!(
            "--dry-run: the request is sound, but the source {} is an object store, which a dry \
             run does not list yet",
            spec.source_path
        );
    }
    let job = dry_run_job(
        ctl,
        pb::StartJobRequest {
            agent: spec.source_agent.clone(),
            assess: Some(pb::AssessSpec {
                paths: vec![spec.source_path.clone()],
                excludes: spec.excludes.clone(),
            }),
            ..Default::default()
        },
    )
    .await?;
    let a = crate::jobs::assessment(&job)?;
    let on_wire = a.bytes.saturating_sub(a.hole_bytes);
    if json {
        print_json(&serde_json::json!({
            "dry_run": true,
            "name": name,
            "job": job.id,
            "would_copy": {
                "files": a.files, "bytes": a.bytes, "bytes_sent": on_wire, "dirs": a.dirs,
                "symlinks": a.symlinks, "hardlinks": a.hardlinks,
            },
            "excluded": a.excluded,
            "cannot_copy": a.issues,
            "would_delete": 0,
            "assessment": a,
        }));
    } else {
        let size = |n: u64| ferry_common::text::bytes(n as f64);
        println!(
            "dry run: migration {name} from {}:{} to {}:{} (nothing was created)",
            spec.source_agent,
            spec.source_path,
            spec.target_agent,
            if spec.target_path.is_empty() {
                "."
            } else {
                &spec.target_path
            }
        );
        println!(
            "would copy {} files ({}, {} of it sent: holes of sparse files are not), {} \
             directories, {} symlinks, {} further names of files (hardlinks)",
            a.files,
            size(a.bytes),
            size(on_wire),
            a.dirs,
            a.symlinks,
            a.hardlinks
        );
        println!("excluded: {} path(s)", a.excluded);
        if a.issues > 0 {
            println!(
                "cannot copy {} path(s) (the migration would end failed unless they are \
                 excluded):",
                a.issues
            );
            for (path, why) in &a.issue_examples {
                println!("  {path}: {why}");
            }
        }
        println!("would delete nothing at the target (a first copy only adds)");
    }
    Ok(ExitCode::SUCCESS)
}

/// The source agent's preview of migration `id`'s next round (a job), with the migration and
/// the job's id.
async fn preview_round(
    ctl: &Ctl,
    id: u64,
) -> anyhow::Result<(pb::MigrationProgress, u64, ferry_agent::jobs::SyncPreview)> {
    let p = ctl.status(id).await?;
    let source = p
        .spec
        .as_ref()
        .map(|s| s.source_agent.clone())
        .unwrap_or_default();
    let job = dry_run_job(
        ctl,
        pb::StartJobRequest {
            agent: source,
            sync_preview: Some(pb::SyncPreviewSpec { migration_id: id }),
            ..Default::default()
        },
    )
    .await?;
    let v = crate::jobs::sync_preview(&job)?;
    Ok((p, job.id, v))
}

/// Runs the job a dry run needs of an agent and waits for it (as long as an assessment may
/// take); its failure is the dry run's.
async fn dry_run_job(ctl: &Ctl, req: pb::StartJobRequest) -> anyhow::Result<pb::JobInfo> {
    let agent = req.agent.clone();
    let started = ctl.start_job(req).await?;
    let job = crate::jobs::wait(ctl, started.id, Duration::from_secs(24 * 3600)).await?;
    if job.state() == pb::JobState::Failed {
        bail!(
            "--dry-run: agent {agent} could not walk the source (job {}): {}",
            job.id,
            job.error
        );
    }
    Ok(job)
}

/// `migration cutover --dry-run`: checked by the coordinator as a cutover, then the steps it
/// would take, with the final round previewed by the source agent; nothing is started.
async fn dry_run_cutover(ctl: &Ctl, id: u64, json: bool) -> anyhow::Result<ExitCode> {
    let attempt = ctl.check_cutover(id).await?;
    let (p, job, v) = preview_round(ctl, id).await?;
    let spec = p.spec.clone().unwrap_or_default();
    if json {
        print_json(&serde_json::json!({
            "dry_run": true, "migration": id, "attempt": attempt, "job": job,
            "source_agent": spec.source_agent, "target_agent": spec.target_agent,
            "final_round": v,
        }));
        return Ok(ExitCode::SUCCESS);
    }
    let hook = |configured: bool| {
        if configured {
            "(configured on that agent)"
        } else {
            "(none configured)"
        }
    };
    let size = |n: u64| ferry_common::text::bytes(n as f64);
    println!(
        "dry run: cutover attempt {attempt} of migration {id} ({}) could start now (nothing was \
         started). It would:",
        p.name
    );
    println!(
        "  1. freeze the source: {}'s pre_freeze hook {}",
        spec.source_agent,
        hook(v.pre_freeze)
    );
    println!(
        "  2. run the final round {} under the freeze: send {} files ({} at most) and {} other \
         names, replace {}, delete {}{}",
        v.round,
        v.send_files,
        size(v.send_bytes),
        v.send_other,
        v.replaced,
        if v.keep_deleted { 0 } else { v.deleted },
        if v.over_max_delete {
            " — over its --max-delete: the round would end failed and the cutover roll back"
        } else {
            ""
        }
    );
    println!(
        "  3. verify both trees in full (files unchanged since their last verification are not \
         read again)"
    );
    println!(
        "  4. switch: {}'s switch hook (configured on that agent)",
        spec.target_agent
    );
    println!(
        "  or, when a step fails: roll back with {}'s rollback hook {}",
        spec.source_agent,
        hook(v.rollback)
    );
    if v.issues > 0 {
        println!(
            "  {} path(s) cannot be copied: the final round would end failed",
            v.issues
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `migration sync --dry-run`: the source agent previews the next round (a job); nothing is
/// started.
async fn dry_run_sync(ctl: &Ctl, id: u64, json: bool) -> anyhow::Result<ExitCode> {
    let (p, job, v) = preview_round(ctl, id).await?;
    if json {
        print_json(
            &serde_json::json!({ "dry_run": true, "migration": id, "job": job, "preview": v }),
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "dry run: round {} of migration {} ({}) (nothing was started)",
        v.round, id, p.name
    );
    print!("{}", crate::jobs::preview_table(&v));
    Ok(ExitCode::SUCCESS)
}

/// The spec's excludes: the `--exclude` globs, then the rules of each `--exclude-from` file
/// (checked here, so a bad line is named before anything is sent).
fn excludes_with(globs: &[String], files: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut all = globs.to_vec();
    for f in files {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("--exclude-from: cannot read {}", f.display()))?;
        all.extend(ferry_common::exclude::rules_from(&text));
    }
    ferry_common::exclude::Excludes::new(&all).context("--exclude/--exclude-from")?;
    Ok(all)
}

/// One look of `migration status --watch -o json`: the progress as one line of JSON (or a YAML
/// document under `-o yaml`).
fn print_watched(p: &pb::MigrationProgress) {
    if crate::ctl::yaml_output() {
        print_json(p);
    } else {
        println!(
            "{}",
            serde_json::to_string(p).expect("protobuf types serialise")
        );
    }
}

/// Prints a job: its result as a table (or the job as JSON), or why it failed (exit 7).
fn show_job(job: &pb::JobInfo, json: bool) -> anyhow::Result<ExitCode> {
    use ferry_proto::admin::JobState;
    if json {
        let parse = |t: &str| {
            serde_json::from_str::<serde_json::Value>(t).unwrap_or(serde_json::Value::Null)
        };
        print_json(&serde_json::json!({
            "id": job.id,
            "agent": job.agent,
            "kind": job.kind,
            "state": ferry_proto::json::job_state_name(job.state()),
            "assess": job.assess,
            "probe": job.probe,
            "error": job.error,
            "created_ms": job.created_ms,
            "finished_ms": job.finished_ms,
            "progress": parse(&job.progress),
            "result": parse(&job.result),
        }));
    } else {
        match (job.state(), job.kind.as_str()) {
            (JobState::Done, "assess") => {
                let a = crate::jobs::assessment(job)?;
                println!("Assessment (job {}) on {}:", job.id, job.agent);
                print!("{}", ferry_agent::assess::table(&a));
            }
            (JobState::Done, "sync-preview") => {
                let v = crate::jobs::sync_preview(job)?;
                println!("Sync preview (job {}), round {}:", job.id, v.round);
                print!("{}", crate::jobs::preview_table(&v));
            }
            (JobState::Done, "probe") => {
                let p = crate::jobs::probe_result(job)?;
                println!("Probe (job {}):", job.id);
                print!("{}", crate::jobs::probe_table(&p));
            }
            (state, kind) => println!(
                "{kind} job {} on {}: {}",
                job.id,
                job.agent,
                ferry_proto::json::job_state_name(state)
            ),
        }
    }
    if job.state() == JobState::Failed {
        eprintln!("job {} failed: {}", job.id, job.error);
        return Ok(crate::exit::Exit::Failed.code());
    }
    Ok(ExitCode::SUCCESS)
}

/// How long ago `then_ms` was at `now_ms`, as people say it: `3s ago`, `5m ago`, `2h ago`,
/// `3d ago` (`never` for 0).
pub(crate) fn ago(now_ms: u64, then_ms: u64) -> String {
    if then_ms == 0 {
        return "never".into();
    }
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        7200..=172_799 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// Writes to stdout; when its reader has gone (a closed pipe), ends the process with 0: the
/// reader took what it wanted.
pub fn emit(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(crate::exit::Exit::Error as i32);
    }
}

/// The binary's entry point.
#[tokio::main]
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    ferry_common::telemetry::init("warn", false);
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            crate::exit::Exit::of(&e).code()
        }
    }
}

/// What the command line gave for the connection (flags or environment).
fn given(cli: &Cli) -> crate::contexts::Context {
    crate::contexts::Context {
        coordinator: cli.coordinator.clone(),
        pki_dir: cli.pki_dir.clone(),
        admin: cli.admin.clone(),
    }
}

/// Where and as whom to connect: the command line over the context over the defaults.
fn resolved(cli: &Cli) -> anyhow::Result<crate::contexts::Resolved> {
    let config = match crate::contexts::path() {
        Some(p) => crate::contexts::load(&p)?,
        None => Default::default(),
    };
    crate::contexts::resolve(&config, cli.context.as_deref(), &given(cli))
}

async fn connect(cli: &Cli) -> anyhow::Result<Ctl> {
    let r = resolved(cli)?;
    let paths = TlsPaths::in_dir(&r.pki_dir, &format!("admin-{}", r.admin));
    ferry_common::renewal::finish_renewal(&paths);
    let tls = load_identity(&r, &paths)?;
    if let Some(warning) = renewal_due(&r.admin, &tls.cert_pem, now_ms() as i64 / 1000) {
        eprintln!("ferryctl: {warning}");
    }
    Ok(Ctl::connect(&r.coordinator, &tls).await?)
}

/// The operator's certificate and key.
fn load_identity(r: &crate::contexts::Resolved, paths: &TlsPaths) -> anyhow::Result<TlsMaterial> {
    TlsMaterial::load(paths).with_context(|| {
        format!(
            "cannot load admin certificate; issue one with `ferry-coordinator pki issue --dir {} --admin {}`",
            r.pki_dir.display(),
            r.admin
        )
    })
}

/// What to tell operator `name` about its certificate `cert_pem` at `now_s` (unix seconds):
/// that it is due for renewal (two thirds of its life behind it), expired, or made before
/// certificates had lifetimes; nothing when none is so.
fn renewal_due(name: &str, cert_pem: &[u8], now_s: i64) -> Option<String> {
    let info = ferry_common::pki::CertInfo::from_pem(cert_pem).ok()?;
    // Valid for more than 20 years: made before lifetimes (valid until 4096).
    if info.not_after - info.not_before > 20 * 365 * 86_400 {
        return Some(format!(
            "the certificate of operator {name} never expires (it was made before certificates \
             had lifetimes): replace it with one that does, `ferryctl certs renew`"
        ));
    }
    if now_s >= info.not_after {
        return Some(format!(
            "the certificate of operator {name} expired at {} UTC; an admin must certify a new \
             one (`ferryctl user request` here, `ferryctl user create --csr` by the admin)",
            crate::ctl::utc(info.not_after.max(0) as u64 * 1000)
        ));
    }
    if now_s >= ferry_common::renewal::renew_at(info.not_before, info.not_after) {
        return Some(format!(
            "the certificate of operator {name} expires at {} UTC: renew it now with `ferryctl \
             certs renew`",
            crate::ctl::utc(info.not_after.max(0) as u64 * 1000)
        ));
    }
    None
}

/// A duration as operators write it: a number of seconds, or with `s`, `m`, `h` or `d`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: a number with s, m, h or d (10m)"))?;
    let unit = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => {
            return Err(format!(
                "bad duration unit {other:?} in {s:?}: s, m, h or d"
            ))
        }
    };
    if n == 0 {
        return Err("a duration of 0 means never; leave the option out".into());
    }
    Ok(Duration::from_secs(n.saturating_mul(unit)))
}

/// A size as operators write it: `50TB`, `1.5TiB`, `800GB`, `4096` (bytes).
fn parse_size(s: &str) -> Result<u64, String> {
    let size: bytesize::ByteSize = s.trim().parse().map_err(|e| {
        format!("bad size {s:?} ({e}): a number with B, KB, MB, GB, TB, KiB, ... (50TB)")
    })?;
    if size.as_u64() == 0 {
        return Err("a size of 0 has nothing to move".into());
    }
    Ok(size.as_u64())
}

/// Whether a pool of `named` target agents is what the plan (`ferryctl plan -o json`) has.
fn pool_matches_plan(plan_json: &str, named: usize) -> anyhow::Result<()> {
    #[derive(serde::Deserialize)]
    struct Planned {
        agent_count: u64,
    }
    let p: Planned = serde_json::from_str(plan_json)
        .context("not a plan: make one with `ferryctl plan ... -o json`")?;
    if p.agent_count != named as u64 {
        bail!(
            "it plans {} target agents, but --target and --targets name {named}: start the \
             planned agents and name each of them (`ferryctl agents list` shows who is \
             registered)",
            p.agent_count
        );
    }
    Ok(())
}

fn split_agent(s: &str, what: &str) -> anyhow::Result<(String, String)> {
    let (agent, path) = s.split_once(':').unwrap_or((s, ""));
    if agent.is_empty() {
        bail!("{what} {s:?}: expected AGENT or AGENT:PATH");
    }
    Ok((agent.to_string(), path.to_string()))
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // `-o yaml` is `-o json` written as YAML (print_json does it).
    let json = cli.output != Output::Table;
    if cli.output == Output::Yaml {
        crate::ctl::output_yaml();
    }
    match &cli.cmd {
        Cmd::Quickstart {
            source,
            target,
            workdir,
            segment_size,
            xattrs,
            sample_big_file_mib,
            sample_small_files,
            target_store,
            store_options,
        } => {
            let target_store = match target_store {
                None => None,
                Some(url) => {
                    let mut options = std::collections::BTreeMap::new();
                    for o in store_options {
                        let Some((k, v)) = o.split_once('=') else {
                            bail!("--store-option {o:?} is not KEY=VALUE");
                        };
                        options.insert(k.trim().to_string(), v.trim().to_string());
                    }
                    Some(ferry_agent::sink::object::StoreConfig::new(url, options))
                }
            };
            let report = quickstart::run(quickstart::Options {
                target_store,
                source: source.clone(),
                target: target.clone(),
                workdir: workdir.clone(),
                segment_size: *segment_size,
                xattrs: *xattrs,
                sample_big_file_bytes: sample_big_file_mib * 1024 * 1024,
                sample_small_files: *sample_small_files,
                progress: !json,
            })
            .await?;
            if json {
                print_json(&report);
            } else {
                print!("{}", report.render());
            }
            return Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                crate::exit::Exit::Failed.code()
            });
        }
        Cmd::Audit { since } => {
            let ctl = connect(&cli).await?;
            let records = ctl.audit().await?;
            let chain = crate::ctl::check_audit_chain(&records);
            let from_ms = since.map_or(0, |d| {
                (std::time::SystemTime::now() - d)
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |t| t.as_millis() as u64)
            });
            let shown: Vec<_> = records.iter().filter(|r| r.at_ms >= from_ms).collect();
            if json {
                for r in &shown {
                    print_json(&serde_json::json!({
                        "seq": r.seq, "at_ms": r.at_ms, "who": r.who, "role": r.role,
                        "from": r.from, "call": r.call, "what": r.what, "decision": r.decision,
                        "hash": ferry_common::hash::hex(&r.hash),
                    }));
                }
            } else {
                for r in &shown {
                    println!(
                        "{:>6}  {}  {} ({}) from {}  {}  {}  -> {}",
                        r.seq,
                        crate::ctl::utc(r.at_ms),
                        r.who,
                        r.role,
                        r.from,
                        r.call,
                        r.what,
                        r.decision
                    );
                }
            }
            return Ok(match chain {
                Ok(()) => {
                    if !json {
                        match records.first() {
                            Some(r) if r.seq > 1 => println!(
                                "{} record(s); hash chain intact from record {} (the \
                                 coordinator keeps the newest {}; every record is also in the \
                                 nodes' logs, target ferry_audit)",
                                records.len(),
                                r.seq,
                                ferry_coordinator::state::AUDIT_KEPT
                            ),
                            _ => println!("{} record(s); hash chain intact", records.len()),
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(seq) => {
                    eprintln!(
                        "the audit log's hash chain is BROKEN at record {seq}: a record was \
                         changed or removed"
                    );
                    crate::exit::Exit::Failed.code()
                }
            });
        }
        Cmd::Config(c) => {
            let path = crate::contexts::path()
                .context("no config file: set HOME, XDG_CONFIG_HOME or FERRY_CONFIG")?;
            let mut config = crate::contexts::load(&path)?;
            match c {
                ConfigCmd::UseContext { name } => {
                    if !config.contexts.contains_key(name) {
                        // The same message as a command naming it would give.
                        crate::contexts::resolve(&config, Some(name), &given(&cli))?;
                    }
                    config.current = Some(name.clone());
                    crate::contexts::save(&path, &config)?;
                    println!("current context: {name}");
                }
                ConfigCmd::SetContext { name } => {
                    let g = given(&cli);
                    if let Some(c) = &g.coordinator {
                        for one in c.split(',').map(str::trim) {
                            crate::ctl::check_address(one)?;
                        }
                    }
                    let ctx = config.contexts.entry(name.clone()).or_default();
                    ctx.coordinator = g.coordinator.or(ctx.coordinator.take());
                    ctx.pki_dir = g.pki_dir.or(ctx.pki_dir.take());
                    ctx.admin = g.admin.or(ctx.admin.take());
                    crate::contexts::save(&path, &config)?;
                    println!("context {name} saved in {}", path.display());
                }
                ConfigCmd::GetContexts => {
                    if json {
                        print_json(&config);
                    } else {
                        println!(
                            "{:<3}{:<16} {:<40} {:<24} ADMIN",
                            "", "NAME", "COORDINATOR", "PKI DIR"
                        );
                        for (name, c) in &config.contexts {
                            let mark = if config.current.as_deref() == Some(name.as_str()) {
                                "*"
                            } else {
                                ""
                            };
                            println!(
                                "{mark:<3}{name:<16} {:<40} {:<24} {}",
                                c.coordinator.as_deref().unwrap_or("-"),
                                c.pki_dir
                                    .as_ref()
                                    .map_or("-".to_string(), |p| p.display().to_string()),
                                c.admin.as_deref().unwrap_or("-")
                            );
                        }
                    }
                }
            }
        }
        Cmd::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "ferryctl", &mut out);
            print!("{}", String::from_utf8_lossy(&out));
        }
        Cmd::Man => {
            let mut out = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut out)?;
            print!("{}", String::from_utf8_lossy(&out));
        }
        Cmd::Assess {
            agent,
            paths,
            exclude,
            exclude_from,
            timeout,
        } => {
            let exclude = &excludes_with(exclude, exclude_from)?;
            let ctl = connect(&cli).await?;
            let started = ctl
                .start_job(pb::StartJobRequest {
                    agent: agent.clone(),
                    assess: Some(pb::AssessSpec {
                        paths: paths.clone(),
                        excludes: exclude.clone(),
                    }),
                    ..Default::default()
                })
                .await?;
            let job = crate::jobs::wait(&ctl, started.id, *timeout).await?;
            return show_job(&job, json);
        }
        Cmd::Probe {
            src,
            dst,
            seconds,
            streams,
            congestion,
        } => {
            let ctl = connect(&cli).await?;
            let started = ctl
                .start_job(pb::StartJobRequest {
                    agent: src.clone(),
                    probe: Some(pb::ProbeSpec {
                        peer: dst.clone(),
                        seconds: *seconds,
                        streams: *streams,
                        congestions: congestion.iter().map(|c| c.to_string()).collect(),
                    }),
                    ..Default::default()
                })
                .await?;
            // The job's own length, not the leader's deadline against this host's clock.
            let limit =
                Duration::from_millis(started.deadline_ms.saturating_sub(started.created_ms))
                    + Duration::from_secs(10);
            let job = crate::jobs::wait(&ctl, started.id, limit).await?;
            return show_job(&job, json);
        }
        Cmd::Jobs { id: Some(id) } => {
            let ctl = connect(&cli).await?;
            let job = ctl.job(*id).await?;
            return show_job(&job, json);
        }
        Cmd::Jobs { id: None } => {
            let ctl = connect(&cli).await?;
            let jobs = ctl.jobs().await?;
            if json {
                print_json(&jobs);
            } else {
                print!("{}", crate::jobs::list_table(&jobs, now_ms()));
            }
        }
        Cmd::Plan {
            data,
            assessed,
            probed,
            deadline,
            catalog,
            path_limit,
        } => {
            let text = std::fs::read_to_string(catalog)
                .with_context(|| format!("cannot read the catalog {}", catalog.display()))?;
            let parsed: crate::plan::Catalog = toml::from_str(&text)
                .with_context(|| format!("catalog {} is not valid", catalog.display()))?;
            let (mut bytes, mut limit) = (*data, path_limit.map(|r| r.bytes_per_sec()));
            if assessed.is_some() || probed.is_some() {
                let ctl = connect(&cli).await?;
                if let Some(id) = assessed {
                    let a = crate::jobs::assessment(&ctl.job(*id).await?)?;
                    bytes = Some(a.bytes.saturating_sub(a.hole_bytes));
                }
                if let Some(id) = probed {
                    let p = crate::jobs::probe_result(&ctl.job(*id).await?)?;
                    let best = p.best.ok_or_else(|| {
                        anyhow::anyhow!("probe job {id} measured no throughput to plan with")
                    })?;
                    limit = Some(best.bytes_per_sec as u64);
                }
            }
            let inputs = crate::plan::Inputs {
                bytes: bytes.context("give --data or --assessed")?,
                deadline_secs: deadline.as_secs(),
                path_limit: limit,
            };
            let p = crate::plan::plan(&parsed, &inputs)?;
            if json {
                print_json(&p);
            } else {
                print!("{}", crate::plan::table(&p, &inputs));
            }
        }
        Cmd::Sample {
            dir,
            big_file_mib,
            small_files,
        } => {
            if dir.exists() {
                bail!(
                    "{} exists; the sample goes into a new directory",
                    dir.display()
                );
            }
            quickstart::generate_sample(dir, big_file_mib * 1024 * 1024, *small_files, true)?;
            println!("wrote a sample data set to {}", dir.display());
        }
        Cmd::Cluster(ClusterCmd::AddNode { id, addr, timeout }) => {
            if *timeout == 0 {
                bail!("--timeout must be at least 1 second");
            }
            let ctl = connect(&cli).await?;
            ctl.add_node_watched(*id, addr, Duration::from_secs(*timeout), |line| {
                eprintln!("{line}")
            })
            .await
            .with_context(|| format!("node {id} at {addr} was not added"))?;
            println!("node {id} added");
        }
        Cmd::Cluster(ClusterCmd::RemoveNode { id }) => {
            connect(&cli)
                .await?
                .remove_node(*id)
                .await
                .with_context(|| format!("node {id} was not removed"))?;
            println!("node {id} removed");
        }
        Cmd::Cluster(ClusterCmd::Snapshot) => {
            let (node, index, ms) = connect(&cli).await?.snapshot().await?;
            println!("node {node}: snapshot at log index {index} ({ms} ms)");
        }
        Cmd::Cluster(ClusterCmd::TransferLeader { id }) => {
            connect(&cli).await?.transfer_leader(*id).await?;
            println!("node {id} leads");
        }
        Cmd::Cluster(ClusterCmd::Status) => {
            let s = connect(&cli).await?.cluster_status().await?;
            if json {
                print_json(&s);
            } else {
                println!(
                    "node {}  state {}  leader {}  term {}",
                    s.node_id, s.state, s.leader_id, s.term
                );
                println!(
                    "last log index {}  last applied {}",
                    s.last_log_index, s.last_applied_index
                );
                for m in &s.members {
                    let lag = if m.matched_known {
                        format!(
                            "replicated to {} (lag {})",
                            m.matched_index,
                            s.last_log_index.saturating_sub(m.matched_index)
                        )
                    } else {
                        String::new()
                    };
                    println!(
                        "  member {}  {}  {}  {lag}",
                        m.node_id,
                        m.addr,
                        if m.voter { "voter" } else { "learner" }
                    );
                }
            }
        }
        Cmd::Agents(AgentsCmd::List) => {
            let agents = connect(&cli).await?.agents().await?;
            if json {
                print_json(&agents);
            } else {
                println!(
                    "{:<24} {:<24} {:<10} {:<16} {:<12} LAST SEEN",
                    "NAME", "DATA ADDRESS", "STATUS", "CONGESTION", "THROTTLE"
                );
                for a in agents {
                    let congestion = if a.congestion.is_empty() {
                        "-".to_string()
                    } else {
                        format!("{} {}", a.congestion, human_bytes(a.window_bytes))
                    };
                    println!(
                        "{:<24} {:<24} {:<10} {:<16} {:<12} {}",
                        a.name,
                        if a.data_addr.is_empty() {
                            "-"
                        } else {
                            &a.data_addr
                        },
                        a.status,
                        congestion,
                        a.throttle,
                        ago(now_ms(), a.last_seen_ms)
                    );
                    if !a.target_root.is_empty() {
                        println!("  writes below {}", a.target_root);
                    }
                    if !a.cannot_receive.is_empty() {
                        println!("  cannot receive: {}", a.cannot_receive);
                    }
                    if !a.conflict.is_empty() {
                        println!("  refused a second process {}", a.conflict);
                    }
                }
            }
        }
        Cmd::Migration(MigrationCmd::Create {
            name,
            source,
            target,
            segment_size,
            xattrs,
            max_attempts,
            excludes,
            exclude_from,
            throttle,
            keep_deleted,
            max_delete,
            sync_every,
            auto_cutover_below,
            targets,
            plan,
            dry_run,
        }) => {
            let (source_agent, source_path) = split_agent(source, "--source")?;
            let (target_agent, target_path) = split_agent(target, "--target")?;
            if let Some(file) = plan {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("reading the plan {}", file.display()))?;
                pool_matches_plan(&text, 1 + targets.len())
                    .with_context(|| format!("the plan {}", file.display()))?;
            }
            let excludes = &excludes_with(excludes, exclude_from)?;
            let spec = pb::MigrationSpec {
                source_agent,
                source_path,
                target_agent,
                target_path,
                segment_size: *segment_size,
                xattrs: *xattrs,
                max_attempts: *max_attempts,
                excludes: excludes.clone(),
                keep_deleted: *keep_deleted,
                max_delete: *max_delete,
                sync_every_secs: sync_every.map_or(0, |d| d.as_secs()),
                auto_cutover_below_ms: auto_cutover_below.map_or(0, |d| d.as_millis() as u64),
            };
            let name = name.clone().unwrap_or_else(|| default_name(&spec));
            if *dry_run {
                let ctl = connect(&cli).await?;
                ctl.check_create(&name, spec.clone(), throttle.as_deref().unwrap_or(""))
                    .await?;
                return dry_run_create(&ctl, &name, &spec, json).await;
            }
            let ctl = connect(&cli).await?;
            let id = ctl
                .create_throttled(
                    &name,
                    spec,
                    &crate::ctl::new_idempotency_key(),
                    throttle.as_deref().unwrap_or(""),
                )
                .await?;
            for t in targets {
                ctl.set_migration_target(&id.to_string(), t, true)
                    .await
                    .with_context(|| {
                        format!(
                            "migration {id} ({name}) was created, but adding target {t} to its \
                             pool failed; once fixed: `ferryctl migration targets {name} add {t}`"
                        )
                    })?;
            }
            if json {
                print_json(&serde_json::json!({ "migration_id": id, "name": name }));
            } else {
                println!("created migration {id} ({name})");
            }
        }
        Cmd::Agents(AgentsCmd::Revoke { name }) => {
            connect(&cli).await?.revoke(name).await?;
            if json {
                print_json(&serde_json::json!({ "agent": name, "revoked": true }));
            } else {
                println!("agent {name} revoked: its certificates are refused from now on");
            }
        }
        Cmd::Token(TokenCmd::Create { role, ttl, agent }) => {
            let t = connect(&cli)
                .await?
                .create_token(role, *ttl, agent.as_deref().unwrap_or(""))
                .await?;
            if json {
                print_json(&t);
            } else {
                println!("{}", t.token);
                eprintln!(
                    "join token {} for {role}{} valid until {} UTC; use it once: \
                     FERRY_JOIN_TOKEN=<token> ferry-agent join --coordinator HOST:JOINPORT",
                    t.id,
                    agent.as_ref().map(|a| format!(" {a}")).unwrap_or_default(),
                    crate::ctl::utc(t.expires_unix_ms)
                );
            }
        }
        Cmd::Token(TokenCmd::List) => {
            let tokens = connect(&cli).await?.tokens().await?;
            if json {
                print_json(&tokens);
            } else {
                let now = now_ms();
                println!(
                    "{:<16} {:<6} {:<12} {:<12} {:<20} STATE",
                    "ID", "ROLE", "FOR", "BY", "EXPIRES (UTC)"
                );
                for t in tokens {
                    let state = if !t.used_by.is_empty() {
                        format!(
                            "used by {} from {} {}",
                            t.used_by,
                            t.used_from,
                            ago(now, t.used_unix_ms)
                        )
                    } else if t.expires_unix_ms <= now {
                        "expired".to_string()
                    } else {
                        "open".to_string()
                    };
                    println!(
                        "{:<16} {:<6} {:<12} {:<12} {:<20} {state}",
                        t.id,
                        t.role,
                        if t.agent.is_empty() { "any" } else { &t.agent },
                        t.created_by,
                        crate::ctl::utc(t.expires_unix_ms)
                    );
                }
            }
        }
        Cmd::User(UserCmd::Request { name, dir }) => {
            let dir = match dir {
                Some(d) => d.clone(),
                None => resolved(&cli)?.pki_dir,
            };
            let who =
                ferry_common::pki::Identity::User(name.clone(), ferry_common::names::Role::Viewer);
            ferry_common::names::validate_name(name)?;
            let (key_path, csr_path) = ferry_common::pki::write_request(&who, &dir)?;
            println!(
                "wrote {} (keep it here) and {}: an admin certifies it with `ferryctl user \
                 create {name} --role ROLE --csr {}`",
                key_path.display(),
                csr_path.display(),
                csr_path.display()
            );
        }
        Cmd::User(UserCmd::Create { name, role, csr }) => {
            ferry_common::names::validate_name(name)?;
            let (csr_der, key, cert_path) = match csr {
                Some(file) => {
                    let der = ferry_common::pki::read_request(file)?;
                    let cert = file.with_file_name(format!("admin-{name}.pem"));
                    (der, None, cert)
                }
                None => {
                    let dir = resolved(&cli)?.pki_dir;
                    let who = ferry_common::pki::Identity::User(name.clone(), *role);
                    let (key, der) = ferry_common::pki::request(&who)?;
                    let key_path = dir.join(format!("admin-{name}.key"));
                    (
                        der,
                        Some((key_path, key)),
                        dir.join(format!("admin-{name}.pem")),
                    )
                }
            };
            // Checked before the call: the coordinator's certificate would be lost.
            for p in std::iter::once(&cert_path).chain(key.as_ref().map(|(p, _)| p)) {
                if std::fs::symlink_metadata(p).is_ok() {
                    anyhow::bail!("{} exists already; refusing to replace it", p.display());
                }
            }
            let r = connect(&cli)
                .await?
                .create_user(name, role.as_str(), csr_der)
                .await?;
            if let Some((key_path, key)) = &key {
                ferry_common::pki::create_file(key_path, key, 0o600)?;
            }
            ferry_common::pki::create_file(&cert_path, &r.cert_pem, 0o644)?;
            // The operator's ferryctl needs the cluster's CA beside its certificate.
            let ca = cert_path.with_file_name("ca.pem");
            if std::fs::symlink_metadata(&ca).is_err() {
                ferry_common::pki::create_file(&ca, &r.ca_pem, 0o644)?;
            }
            if json {
                print_json(&serde_json::json!({
                    "name": name, "role": role.as_str(), "serial": r.serial,
                    "not_after": r.not_after, "certificate": cert_path,
                }));
            } else {
                println!(
                    "operator {name} ({role}): wrote {}{} (serial {}, valid until {} UTC)",
                    cert_path.display(),
                    key.as_ref()
                        .map(|(p, _)| format!(" and {}", p.display()))
                        .unwrap_or_default(),
                    r.serial,
                    crate::ctl::utc(r.not_after.max(0) as u64 * 1000)
                );
            }
        }
        Cmd::Certs(CertsCmd::Renew) => {
            let r = resolved(&cli)?;
            let paths = TlsPaths::in_dir(&r.pki_dir, &format!("admin-{}", r.admin));
            ferry_common::renewal::finish_renewal(&paths);
            let tls = load_identity(&r, &paths)?;
            let old = ferry_common::pki::CertInfo::from_pem(&tls.cert_pem)?;
            let ctl = Ctl::connect(&r.coordinator, &tls).await?;
            // The request carries only the key: the coordinator certifies the name and role
            // of the certificate this call is made with.
            let (key_pem, csr) = ferry_common::pki::request(&ferry_common::pki::Identity::User(
                r.admin.clone(),
                ferry_common::names::Role::Viewer,
            ))?;
            let answer = ctl.renew_operator_certificate(csr).await?;
            let new = ferry_common::pki::CertInfo::from_pem(answer.cert_pem.as_bytes())?;
            if !new
                .names
                .contains(&ferry_common::names::admin_dns(&r.admin))
            {
                bail!(
                    "the coordinator sent a certificate that is not operator {}'s; the old one stays",
                    r.admin
                );
            }
            ferry_common::renewal::install(&paths, answer.cert_pem.as_bytes(), key_pem.as_bytes())?;
            if json {
                print_json(&serde_json::json!({
                    "name": r.admin, "serial": answer.serial, "previous": old.serial,
                    "not_after": answer.not_after, "certificate": paths.cert, "key": paths.key,
                }));
            } else {
                println!(
                    "operator {}: wrote {} and {} (serial {}, valid until {} UTC; was {})",
                    r.admin,
                    paths.cert.display(),
                    paths.key.display(),
                    answer.serial,
                    crate::ctl::utc(answer.not_after.max(0) as u64 * 1000),
                    old.serial
                );
            }
        }
        Cmd::Certs(CertsCmd::List) => {
            let certs = connect(&cli).await?.certificates().await?;
            if json {
                print_json(&certs);
            } else {
                let now = now_ms() as i64 / 1000;
                println!(
                    "{:<24} {:<34} {:<20} {:<10} VIA",
                    "IDENTITY", "SERIAL", "VALID UNTIL (UTC)", "STATE"
                );
                for c in certs {
                    let state = if c.revoked {
                        "revoked"
                    } else if c.not_after <= now {
                        "expired"
                    } else {
                        "valid"
                    };
                    println!(
                        "{:<24} {:<34} {:<20} {:<10} {}",
                        c.identity,
                        c.serial,
                        crate::ctl::utc(c.not_after.max(0) as u64 * 1000),
                        state,
                        c.via
                    );
                }
            }
        }
        Cmd::Agents(AgentsCmd::Throttle { name, throttle }) => {
            let now = connect(&cli)
                .await?
                .set_throttle("", name, throttle)
                .await?;
            if json {
                print_json(&serde_json::json!({ "agent": name, "throttle": now }));
            } else {
                println!("agent {name} throttled: {now}");
            }
        }
        Cmd::Migration(MigrationCmd::Targets { id, action }) => {
            let (agent, active) = match action {
                TargetsAction::Add { agent } => (agent, true),
                TargetsAction::Remove { agent } => (agent, false),
            };
            let pool = connect(&cli)
                .await?
                .set_migration_target(id, agent, active)
                .await?;
            if json {
                print_json(&pool);
            } else {
                print_pool(&pool);
            }
        }
        Cmd::Migration(MigrationCmd::Throttle { id, throttle }) => {
            let now = connect(&cli).await?.set_throttle(id, "", throttle).await?;
            if json {
                print_json(&serde_json::json!({ "migration": id, "throttle": now }));
            } else {
                println!("migration {id} throttled: {now}");
            }
        }
        Cmd::Migration(MigrationCmd::List) => {
            let ms = connect(&cli).await?.migrations().await?;
            if json {
                print_json(&ms);
            } else {
                println!(
                    "{:<4} {:<24} {:<9} {:<22} {:<22} {:>12} {:>10}",
                    "ID", "NAME", "PHASE", "SOURCE", "TARGET", "BYTES", "VERIFIED"
                );
                for m in ms {
                    let spec = m.spec.clone().unwrap_or_default();
                    println!(
                        "{:<4} {:<24} {:<9} {:<22} {:<22} {:>12} {:>9.1}%",
                        m.migration_id,
                        m.name,
                        phase_name(m.phase()),
                        format!("{}:{}", spec.source_agent, spec.source_path),
                        format!("{}:{}", spec.target_agent, spec.target_path),
                        human_bytes(m.bytes_total),
                        if m.bytes_total > 0 {
                            100.0 * m.bytes_verified as f64 / m.bytes_total as f64
                        } else {
                            0.0
                        }
                    );
                }
            }
        }
        Cmd::Migration(MigrationCmd::Status { id, watch }) => {
            let ctl = connect(&cli).await?;
            let id = &ctl.resolve(id).await?;
            if *watch {
                // A terminal sees one line redrawn in place; a log or a pipe a line per look;
                // `-o json` one JSON object per line on stdout (`-o yaml` a document each).
                let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
                let started = std::time::Instant::now();
                let last = ctl
                    .watch(*id, Duration::from_secs(3600), |p, r| {
                        if json {
                            print_watched(p);
                            return;
                        }
                        let line = format!(
                            "{}  elapsed {}",
                            progress_line(p, r),
                            crate::plan::duration_text(started.elapsed().as_secs())
                        );
                        if terminal {
                            eprint!("\r\x1b[2K{line}");
                        } else {
                            eprintln!("{line}");
                        }
                    })
                    .await?;
                if terminal && !json {
                    eprintln!();
                }
                if json {
                    return Ok(if last.phase() == pb::Phase::Failed {
                        crate::exit::Exit::Failed.code()
                    } else {
                        ExitCode::SUCCESS
                    });
                }
            }
            let p = ctl.status(*id).await?;
            if json {
                print_json(&p);
            } else {
                println!("{}", progress_line(&p, &Default::default()));
                println!(
                    "leases granted {}  in flight {}  failed attempts {}",
                    p.leases_granted, p.segments_leased, p.failed_attempts
                );
                for line in round_lines(&p, now_ms()) {
                    println!("{line}");
                }
                if let Some(c) = &p.cutover {
                    for line in cutover_lines(c) {
                        println!("{line}");
                    }
                }
                if p.throttle != "off" && !p.throttle.is_empty() {
                    let utc = if p.throttle.contains(':') {
                        " (times UTC)"
                    } else {
                        ""
                    };
                    println!("throttle {}{utc}", p.throttle);
                }
                let every = p.spec.as_ref().map_or(0, |s| s.sync_every_secs);
                if every > 0 {
                    println!("sync rounds every {every} s after the last one ended");
                }
                if p.fallback != 0 {
                    println!(
                        "fallback window {}: migration {} syncs the old source from the target",
                        if p.finalized_ms > 0 { "closed" } else { "open" },
                        p.fallback
                    );
                } else if p.finalized_ms > 0 {
                    println!("finalized: no fallback window");
                }
                if p.fallback_of != 0 {
                    println!(
                        "the fallback of migration {}: from its target back to its old source{}",
                        p.fallback_of,
                        if p.finalized_ms > 0 {
                            " (finalized: syncs no more)"
                        } else {
                            ""
                        }
                    );
                }
                let auto = p.spec.as_ref().map_or(0, |s| s.auto_cutover_below_ms);
                if auto > 0 && p.cutover.is_none() {
                    println!(
                        "cutover starts by itself once a sync round ends done in under {:.1} s",
                        auto as f64 / 1000.0
                    );
                }
                if p.targets.len() > 1 {
                    print_pool(&p.targets);
                }
                if !p.blocked.is_empty() {
                    println!("blocked: {}", p.blocked);
                }
                if p.excluded > 0 {
                    println!("excluded {} path(s) (--exclude)", p.excluded);
                }
                if p.hardlinks > 0 {
                    println!(
                        "hardlinks {} (names linked at the target, content sent once)",
                        p.hardlinks
                    );
                }
                for n in &p.notes {
                    println!("note: {n}");
                }
                if !p.last_error.is_empty() {
                    println!("last error: {}", p.last_error);
                }
                for line in failed_lines(&p) {
                    println!("{line}");
                }
                if p.scan_issues_total > 0 {
                    println!("{} path(s) cannot be copied:", p.scan_issues_total);
                    for i in &p.scan_issues {
                        println!("  {}: {}", i.path, i.reason);
                    }
                }
            }
            if *watch && p.phase() == pb::Phase::Failed {
                return Ok(crate::exit::Exit::Failed.code());
            }
        }
        Cmd::Migration(MigrationCmd::Sync { id, watch, dry_run }) => {
            let ctl = connect(&cli).await?;
            let id = ctl.resolve(id).await?;
            if *dry_run {
                return dry_run_sync(&ctl, id, json).await;
            }
            let round = ctl.sync(id).await?;
            if !json {
                println!("migration {id}: round {round} started");
            }
            let mut code = ExitCode::SUCCESS;
            if *watch {
                code = watch_round(&ctl, id, json).await?;
            } else if json {
                print_json(&serde_json::json!({ "migration_id": id, "round": round }));
            }
            return Ok(code);
        }
        Cmd::Migration(MigrationCmd::Fallback { id, watch }) => {
            let ctl = connect(&cli).await?;
            let id = ctl.resolve(id).await?;
            let (rid, name) = ctl.fallback(id).await?;
            if !json {
                println!(
                    "migration {id}: fallback window open — migration {rid} ({name}) syncs the \
                     old source from the target; its round 0 sends what changed since the switch"
                );
            }
            let mut code = ExitCode::SUCCESS;
            if *watch {
                code = watch_round(&ctl, rid, json).await?;
            } else if json {
                print_json(&serde_json::json!({ "migration_id": rid, "name": name }));
            }
            return Ok(code);
        }
        Cmd::Migration(MigrationCmd::Finalize { id }) => {
            let ctl = connect(&cli).await?;
            let id = ctl.resolve(id).await?;
            ctl.finalize(id).await?;
            if !json {
                println!("migration {id}: finalized — the fallback window is closed");
            }
        }
        Cmd::Migration(MigrationCmd::Delete { id, force }) => {
            let ctl = connect(&cli).await?;
            let id = ctl.resolve(id).await?;
            ctl.delete(id, *force).await?;
            if json {
                print_json(&serde_json::json!({ "migration_id": id, "deleted": true }));
            } else {
                println!(
                    "migration {id}: deleted — its agents remove what they keep of it at their \
                     next heartbeat; the data at the target stays"
                );
            }
        }
        Cmd::Migration(MigrationCmd::Cutover {
            id,
            abort,
            watch,
            dry_run,
        }) => {
            let ctl = connect(&cli).await?;
            let id = ctl.resolve(id).await?;
            if *dry_run {
                return dry_run_cutover(&ctl, id, json).await;
            }
            let attempt = ctl.cutover(id, *abort).await?;
            if !json {
                if *abort {
                    println!("migration {id}: cutover attempt {attempt} is rolling back");
                } else {
                    println!("migration {id}: cutover attempt {attempt} started");
                }
            }
            if !*watch {
                if json {
                    print_json(&serde_json::json!({ "migration_id": id, "attempt": attempt }));
                }
                return Ok(ExitCode::SUCCESS);
            }
            let p = ctl
                .watch_cutover(id, Duration::from_secs(24 * 3600), |p| {
                    if let (false, Some(c)) = (json, &p.cutover) {
                        eprintln!(
                            "cutover {}",
                            ferry_proto::json::cutover_phase_name(c.phase())
                        );
                    }
                })
                .await?;
            if json {
                print_json(&p);
            } else if let Some(c) = &p.cutover {
                for line in cutover_lines(c) {
                    println!("{line}");
                }
            }
            let switched = p
                .cutover
                .as_ref()
                .is_some_and(|c| c.phase() == pb::CutoverPhase::Done);
            return Ok(if switched {
                ExitCode::SUCCESS
            } else {
                crate::exit::Exit::Failed.code()
            });
        }
        Cmd::Migration(MigrationCmd::Report { id }) => {
            let ctl = connect(&cli).await?;
            let id = ctl.resolve(id).await?;
            let p = ctl.status(id).await?;
            let v = ctl.verify(id, 0).await?;
            if json {
                print_json(&serde_json::json!({ "progress": p, "verification": v }));
            } else {
                println!("{}", progress_line(&p, &Default::default()));
                println!(
                    "verified   {} of {} segments with equal source and target BLAKE3, {} failed, \
                     {} hash mismatches — {}",
                    v.segments_verified,
                    v.segments_total,
                    v.segments_failed,
                    v.hash_mismatches,
                    if v.all_verified {
                        "VERIFIED"
                    } else {
                        "NOT VERIFIED"
                    }
                );
                let rounds = round_lines(&p, now_ms());
                if rounds.is_empty() {
                    println!("rounds     the bulk copy only");
                }
                for line in rounds {
                    println!("{line}");
                }
                match &p.cutover {
                    Some(c) => {
                        for line in cutover_lines(c) {
                            println!("{line}");
                        }
                    }
                    None => println!("cutover    not started"),
                }
                match (&p.verification, &p.cutover) {
                    // The cutover's own full verification came after it.
                    (Some(v), Some(c)) if v.ended_ms != 0 && v.ended_ms <= c.started_ms => {
                        println!(
                            "full verification {} of round {} ran before cutover attempt {}, \
                             whose own full verification is above",
                            v.number, v.round, c.attempt
                        )
                    }
                    (Some(v), _) => {
                        for line in verification_lines(v) {
                            println!("{line}");
                        }
                    }
                    (None, _) => {}
                }
            }
        }
        Cmd::Migration(MigrationCmd::Verify {
            id,
            mode: VerifyMode::Full,
        }) => {
            let ctl = connect(&cli).await?;
            let id = ctl.resolve(id).await?;
            let (number, round) = ctl.verify_full(id).await?;
            if !json {
                println!(
                    "full verification {number} of round {round} started: both agents read \
                     their trees back"
                );
            }
            // Reading tens of terabytes takes hours: no deadline but the operator's.
            let week = Duration::from_secs(7 * 24 * 3600);
            let v = ctl.watch_verification(id, number, week).await?;
            if json {
                print_json(&v);
            } else {
                for line in verification_lines(&v) {
                    println!("{line}");
                }
            }
            return Ok(if v.equal {
                ExitCode::SUCCESS
            } else {
                crate::exit::Exit::Failed.code()
            });
        }
        Cmd::Migration(MigrationCmd::Verify { id, .. }) => {
            let ctl = connect(&cli).await?;
            let id = ctl.resolve(id).await?;
            let v = ctl.verify(id, 0).await?;
            if json {
                print_json(&v);
            } else {
                println!(
                    "migration {}: {} of {} segments verified, {} failed, {} hash mismatches — {}",
                    v.migration_id,
                    v.segments_verified,
                    v.segments_total,
                    v.segments_failed,
                    v.hash_mismatches,
                    if v.all_verified {
                        "VERIFIED"
                    } else {
                        "NOT VERIFIED"
                    }
                );
                for s in &v.unverified {
                    println!(
                        "  segment {} {} ({} file(s)) attempts {} {}",
                        s.segment_id,
                        segment_status_name(s.state()),
                        s.files,
                        s.attempts,
                        s.last_error
                    );
                }
                if v.scan_issues_total > 0 {
                    println!("{} path(s) not copied:", v.scan_issues_total);
                    for i in &v.scan_issues {
                        println!("  {}: {}", i.path, i.reason);
                    }
                }
            }
            return Ok(if v.all_verified {
                ExitCode::SUCCESS
            } else {
                crate::exit::Exit::Failed.code()
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    /// `migration create --plan` takes a plan as `ferryctl plan -o json` prints it and checks
    /// the pool named on the command line against it.
    #[test]
    fn a_pool_must_have_as_many_targets_as_the_plan() {
        use crate::plan::{plan, AgentType, Catalog, Inputs};
        // 1 TB in 3 h is 92.6 MB/s: ten agents of 10 MB/s.
        let catalog = Catalog {
            agents: vec![AgentType {
                name: "m.large".into(),
                price_per_hour: 1.0,
                throughput: 10_000_000,
                max_count: 12,
                egress_per_gb: 0.0,
            }],
        };
        let inputs = Inputs {
            bytes: 1_000_000_000_000,
            deadline_secs: 3 * 3600,
            path_limit: None,
        };
        let p = plan(&catalog, &inputs).unwrap();
        assert_eq!(p.agent_count, 10);
        let json = serde_json::to_string(&p).unwrap();
        super::pool_matches_plan(&json, p.agent_count as usize).unwrap();
        let short = super::pool_matches_plan(&json, p.agent_count as usize - 1).unwrap_err();
        assert!(
            short
                .to_string()
                .contains(&format!("plans {} target agents", p.agent_count)),
            "{short}"
        );
        let junk = super::pool_matches_plan("{}", 1).unwrap_err();
        assert!(format!("{junk:#}").contains("not a plan"), "{junk:#}");
    }

    #[test]
    fn an_operator_is_told_when_its_certificate_is_due_expired_or_never_expires() {
        use ferry_common::pki::{request, Ca, Identity};
        use std::time::{Duration, UNIX_EPOCH};
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(dir.path()).unwrap();
        let who = Identity::User("vera".into(), ferry_common::names::Role::Viewer);
        // Signed at 10,000 for 90 s: due from 10,060, expired from 10,090.
        let at = |signed: u64, life: u64| {
            let (_, csr) = request(&who).unwrap();
            let t = UNIX_EPOCH + Duration::from_secs(signed);
            ca.sign_request(&csr, &who, t, Duration::from_secs(life))
                .unwrap()
                .0
        };
        let cert = at(10_000, 90);
        assert_eq!(super::renewal_due("vera", cert.as_bytes(), 10_059), None);
        let due = super::renewal_due("vera", cert.as_bytes(), 10_060).unwrap();
        assert!(
            due.contains("renew it now with `ferryctl certs renew`"),
            "{due}"
        );
        let expired = super::renewal_due("vera", cert.as_bytes(), 10_090).unwrap();
        assert!(expired.contains("expired at"), "{expired}");
        assert!(expired.contains("ferryctl user request"), "{expired}");
        // One from before certificates had lifetimes (valid until 4096).
        let forever = at(10_000, 2_000 * 365 * 86_400);
        let told = super::renewal_due("vera", forever.as_bytes(), 10_001).unwrap();
        assert!(told.contains("never expires"), "{told}");
    }

    #[test]
    fn sizes_read_as_operators_write_them() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("8MB"), Ok(8_000_000));
        assert_eq!(parse_size("1.5TiB"), Ok(3 << 39));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("lots").unwrap_err().contains("bad size"));
        let cli = Cli::try_parse_from([
            "ferryctl",
            "migration",
            "create",
            "--source",
            "a:/x",
            "--target",
            "b",
            "--segment-size",
            "16MiB",
        ])
        .unwrap();
        let Cmd::Migration(MigrationCmd::Create { segment_size, .. }) = cli.cmd else {
            panic!("not a create");
        };
        assert_eq!(segment_size, 16 << 20);
    }

    #[test]
    fn last_seen_reads_as_how_long_ago() {
        let now = 1_000_000_000;
        assert_eq!(ago(now, now - 3_400), "3s ago");
        assert_eq!(ago(now, now - 300_000), "5m ago");
        assert_eq!(ago(now, now - 3 * 3_600_000), "3h ago");
        assert_eq!(ago(now, now - 4 * 86_400_000), "4d ago");
        assert_eq!(ago(now, now + 5), "0s ago");
        assert_eq!(ago(now, 0), "never");
    }

    use super::*;

    #[test]
    fn a_migrations_name_is_not_the_admin_identity() {
        // `--name` of `migration create` once set the global admin identity too, so the
        // create looked for the certificate admin-<migration name>.pem.
        let cli = Cli::try_parse_from([
            "ferryctl",
            "migration",
            "create",
            "--name",
            "app",
            "--source",
            "src:/data",
            "--target",
            "dst",
        ])
        .unwrap();
        assert_eq!(cli.admin, None, "the context's or the default");
        match cli.cmd {
            Cmd::Migration(MigrationCmd::Create { name, .. }) => {
                assert_eq!(name.as_deref(), Some("app"))
            }
            _ => panic!("not a create"),
        }
        let cli = Cli::try_parse_from(["ferryctl", "--admin", "ops", "cluster", "status"]).unwrap();
        assert_eq!(cli.admin.as_deref(), Some("ops"));
    }

    #[test]
    fn durations_read_as_operators_write_them() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        for bad in ["", "m", "10x", "0", "-5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
