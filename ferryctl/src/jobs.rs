//! `ferryctl assess`, `ferryctl probe` and `ferryctl jobs`: jobs the coordinator hands to an
//! agent, waited for here, their results (JSON the agent reported) read back into the agent's
//! own types and shown as tables.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use ferry_agent::assess::Assessment;
use ferry_agent::probe::ProbeResult;
use ferry_proto::admin::{self as pb, JobState};
use ferry_proto::json::job_state_name;

use crate::ctl::{Ctl, CtlError};

/// How often a job is looked at while it runs.
const POLL: Duration = Duration::from_millis(500);

/// Waits until job `id` ends (or `timeout` passes), showing its progress on stderr when that
/// is a terminal; returns it as it ended.
pub async fn wait(ctl: &Ctl, id: u64, timeout: Duration) -> Result<pb::JobInfo, CtlError> {
    let started = Instant::now();
    let show = std::io::stderr().is_terminal();
    loop {
        let job = ctl.job(id).await?;
        match job.state() {
            JobState::Done | JobState::Failed => {
                if show {
                    eprint!("\r\x1b[2K");
                }
                return Ok(job);
            }
            _ => {
                if show {
                    eprint!(
                        "\r\x1b[2K{} job {id} on {}: {} ({})",
                        job.kind,
                        job.agent,
                        progress_line(&job),
                        crate::plan::duration_text(started.elapsed().as_secs())
                    );
                }
            }
        }
        if started.elapsed() > timeout {
            return Err(CtlError::Status(format!(
                "job {id} has not ended after {}; `ferryctl jobs {id}` shows it later",
                crate::plan::duration_text(timeout.as_secs())
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What a running job found so far, in a few words.
fn progress_line(job: &pb::JobInfo) -> String {
    if job.state() == JobState::Pending {
        return "waiting for the agent to take it".into();
    }
    match serde_json::from_str::<Assessment>(&job.progress) {
        Ok(a) if job.kind == "assess" => format!(
            "{} files, {} so far",
            a.files,
            ferry_common::text::bytes(a.bytes as f64)
        ),
        _ => "running".into(),
    }
}

/// An assessment job's result.
pub fn assessment(job: &pb::JobInfo) -> Result<Assessment, CtlError> {
    result(job, "assess")
}

/// A sync preview job's result.
pub fn sync_preview(job: &pb::JobInfo) -> Result<ferry_agent::jobs::SyncPreview, CtlError> {
    result(job, "sync-preview")
}

/// A probe job's result.
pub fn probe_result(job: &pb::JobInfo) -> Result<ProbeResult, CtlError> {
    result(job, "probe")
}

fn result<T: serde::de::DeserializeOwned>(job: &pb::JobInfo, kind: &str) -> Result<T, CtlError> {
    if job.kind != kind {
        return Err(CtlError::Status(format!(
            "job {} is {} job, not {kind} job",
            job.id,
            article(&job.kind)
        )));
    }
    if job.state() != JobState::Done {
        return Err(CtlError::Status(format!(
            "job {} has no result: it is {}{}",
            job.id,
            job_state_name(job.state()),
            if job.error.is_empty() {
                String::new()
            } else {
                format!(" ({})", job.error)
            }
        )));
    }
    serde_json::from_str(&job.result).map_err(|e| {
        CtlError::Status(format!(
            "job {}'s result is not what this ferryctl reads ({e}): are the agent and ferryctl \
             of the same version?",
            job.id
        ))
    })
}

fn article(kind: &str) -> String {
    match kind {
        "assess" => "an assess".into(),
        other => format!("a {other}"),
    }
}

/// A probe's result as a table.
pub fn probe_table(p: &ProbeResult) -> String {
    use std::fmt::Write;
    let rate = crate::plan::rate_text;
    let mut out = String::new();
    let _ = writeln!(out, "Path from {} to {}", p.from, p.to);
    let _ = writeln!(
        out,
        "  round trip   {:.1} ms (median; {:.1}–{:.1} ms)",
        p.rtt_ms, p.rtt_min_ms, p.rtt_max_ms
    );
    let _ = writeln!(
        out,
        "  loss         {:.2} % ({} of {} paced packets)",
        p.loss * 100.0,
        p.packets_lost,
        p.packets_sent
    );
    let _ = writeln!(
        out,
        "  under load   {:.2} % of {} packets (queues and receivers overrun included)",
        p.load_loss * 100.0,
        p.load_packets_sent
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<10} {:>7} {:>9} {:>12} {:>14}",
        "CONGESTION", "STREAMS", "SECONDS", "RECEIVED", "THROUGHPUT"
    );
    for r in &p.runs {
        let _ = writeln!(
            out,
            "{:<10} {:>7} {:>9.1} {:>12} {:>14}",
            r.congestion,
            r.streams,
            r.seconds,
            ferry_common::text::bytes(r.bytes as f64),
            rate(r.bytes_per_sec)
        );
    }
    if let Some(b) = &p.best {
        let _ = writeln!(
            out,
            "\nFastest: {} with {} stream(s), {}",
            b.congestion,
            b.streams,
            rate(b.bytes_per_sec)
        );
    }
    out
}

/// What a sync round would do, as lines.
pub fn preview_table(v: &ferry_agent::jobs::SyncPreview) -> String {
    use std::fmt::Write;
    let size = |n: u64| ferry_common::text::bytes(n as f64);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "would send {} new or changed files ({} at most: a large file with recorded blocks sends \
         only its changed ones), {} other names (directories, symlinks, hardlinks), replace {} \
         of another kind; {} unchanged",
        v.send_files,
        size(v.send_bytes),
        v.send_other,
        v.replaced,
        v.unchanged
    );
    for name in &v.send_examples {
        let _ = writeln!(out, "  send    {name}");
    }
    let _ = if v.keep_deleted {
        writeln!(
            out,
            "would delete nothing: the migration keeps deleted names ({} gone at the source)",
            v.deleted
        )
    } else if v.over_max_delete {
        writeln!(
            out,
            "would delete nothing and end failed: {} names are gone at the source, more than \
             its --max-delete",
            v.deleted
        )
    } else {
        writeln!(out, "would delete {} names at the target", v.deleted)
    };
    for name in &v.deleted_examples {
        let _ = writeln!(out, "  delete  {name}");
    }
    let _ = writeln!(out, "excluded: {} path(s)", v.excluded);
    if v.issues > 0 {
        let _ = writeln!(out, "cannot copy {} path(s):", v.issues);
        for (path, why) in &v.issue_examples {
            let _ = writeln!(out, "  {path}: {why}");
        }
    }
    out
}

/// The jobs as a table, newest first.
pub fn list_table(jobs: &[pb::JobInfo], now_ms: u64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>5}  {:<7} {:<16} {:<8} {:<10} WHAT",
        "ID", "KIND", "AGENT", "STATE", "STARTED"
    );
    for j in jobs {
        let what = match (&j.assess, &j.probe) {
            (Some(a), _) => a.paths.join(" "),
            (_, Some(p)) => format!("to {}", p.peer),
            _ => j
                .sync_preview
                .as_ref()
                .map_or(String::new(), |p| format!("migration {}", p.migration_id)),
        };
        let what = if j.error.is_empty() {
            what
        } else {
            format!("{what}: {}", j.error)
        };
        let _ = writeln!(
            out,
            "{:>5}  {:<7} {:<16} {:<8} {:<10} {}",
            j.id,
            j.kind,
            j.agent,
            job_state_name(j.state()),
            crate::cli::ago(now_ms, j.created_ms),
            what
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(kind: &str, state: JobState, result: &str) -> pb::JobInfo {
        let mut j = pb::JobInfo {
            id: 3,
            agent: "src".into(),
            kind: kind.into(),
            result: result.into(),
            ..Default::default()
        };
        j.set_state(state);
        j
    }

    #[test]
    fn a_result_is_read_only_from_a_done_job_of_its_kind() {
        let a = Assessment {
            files: 2,
            bytes: 10,
            ..Default::default()
        };
        let done = job(
            "assess",
            JobState::Done,
            &serde_json::to_string(&a).unwrap(),
        );
        assert_eq!(assessment(&done).unwrap(), a);
        let e = probe_result(&done).unwrap_err().to_string();
        assert!(e.contains("an assess job, not probe job"), "{e}");
        let mut failed = job("assess", JobState::Failed, "");
        failed.error = "no such directory".into();
        let e = assessment(&failed).unwrap_err().to_string();
        assert!(e.contains("failed (no such directory)"), "{e}");
        let garbled = job("assess", JobState::Done, "{\"files\": \"many\"}");
        assert!(assessment(&garbled)
            .unwrap_err()
            .to_string()
            .contains("same version"));
    }
}
