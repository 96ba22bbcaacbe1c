//! The figures: medians per tool, the machine's local ceilings, and the table and JSON that
//! `docs/benchmarks.md` quotes.

use std::path::Path;
use std::time::Instant;

use super::dataset::Kind;
use super::runs::Run;
use crate::wan::Profile;

/// Bytes as MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The median, or NaN for no values.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The machine the figures come from.
pub struct Machine {
    /// Cores.
    pub cores: usize,
    /// Memory.
    pub mem_gib: f64,
    /// Disk write + fsync, one stream.
    pub disk_mb_s: f64,
    /// BLAKE3 on one core.
    pub blake3_mb_s: f64,
}

impl Machine {
    /// Measures the local ceilings (writing 512 MiB under `work`, hashing 1 GiB).
    pub fn measure(work: &Path) -> anyhow::Result<Machine> {
        use std::io::Write;
        let len = 512usize << 20;
        let buf = vec![0xa5u8; 8 << 20];
        let p = work.join("ceiling.tmp");
        let t = Instant::now();
        let mut f = std::fs::File::create(&p)?;
        for _ in 0..len / buf.len() {
            f.write_all(&buf)?;
        }
        f.sync_all()?;
        let disk_mb_s = len as f64 / t.elapsed().as_secs_f64() / 1e6;
        drop(f);
        std::fs::remove_file(&p)?;
        let data = vec![0x3cu8; 256 << 20];
        let t = Instant::now();
        let mut h = blake3::Hasher::new();
        for _ in 0..4 {
            h.update(&data);
        }
        std::hint::black_box(h.finalize());
        let blake3_mb_s = (4 * data.len()) as f64 / t.elapsed().as_secs_f64() / 1e6;
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let mem_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            })
            .unwrap_or(0.0)
            / 1024.0
            / 1024.0;
        Ok(Machine {
            cores,
            mem_gib,
            disk_mb_s,
            blake3_mb_s,
        })
    }
}

/// One tool's medians over its successful runs.
struct Row {
    tool: String,
    ok: usize,
    wall: f64,
    cpu: f64,
    rss: f64,
    /// ferry: its largest agent's peak RSS (the others: 0).
    agent_rss: f64,
    error: String,
}

/// Everything one `wan-bench` invocation measured.
pub struct Report {
    /// The path.
    pub profile: Profile,
    /// The path as printed (with how it was built).
    pub path_text: String,
    /// The data set.
    pub kind: Kind,
    /// The size as asked for.
    pub size: String,
    /// Files in the data set.
    pub files: u64,
    /// Bytes in the data set.
    pub bytes: u64,
    /// The tools, in order.
    pub tools: Vec<String>,
    /// Runs per tool.
    pub runs_per_tool: usize,
    /// Every run.
    pub runs: Vec<Run>,
    /// Tools left out, and why.
    pub missing: Vec<String>,
    /// The incremental scenario: (tool, change re-sync, no-change re-run) as printable cells.
    pub incremental: Vec<(String, String, String)>,
    /// ferry's cutover after the incremental scenario: (what, figure).
    pub cutover: Vec<(String, String)>,
    /// The machine.
    pub machine: Machine,
}

impl Report {
    fn rows(&self) -> Vec<Row> {
        self.tools
            .iter()
            .map(|t| {
                let mine: Vec<&Run> = self.runs.iter().filter(|r| &r.tool == t).collect();
                let good: Vec<&&Run> = mine.iter().filter(|r| r.ok).collect();
                Row {
                    tool: t.clone(),
                    ok: good.len(),
                    wall: median(good.iter().map(|r| r.wall_secs).collect()),
                    cpu: median(good.iter().map(|r| r.cpu_secs).collect()),
                    rss: median(good.iter().map(|r| r.peak_rss_mib).collect()),
                    agent_rss: good
                        .iter()
                        .map(|r| r.peak_agent_rss_mib)
                        .fold(0.0, f64::max),
                    error: mine
                        .iter()
                        .find(|r| !r.ok)
                        .map(|r| r.error.clone())
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// The Markdown table, as `docs/benchmarks.md` quotes it.
    pub fn markdown(&self) -> String {
        use std::fmt::Write;
        let rows = self.rows();
        let ferry_wall = ferry_wall(&rows);
        let m = &self.machine;
        let mut out = String::new();
        let o = &mut out;
        let _ = writeln!(
            o,
            "## {} / {} ({})\n",
            self.profile.name,
            self.kind.name(),
            self.size
        );
        let _ = writeln!(
            o,
            "{} files, {:.1} MiB; {}; {} cores, {:.0} GiB RAM; {}.",
            self.files,
            self.bytes as f64 / 1048576.0,
            self.path_text,
            m.cores,
            m.mem_gib,
            match self.runs_per_tool {
                0 => "one incremental scenario per tool".to_string(),
                n => format!("median of {n} interleaved runs"),
            }
        );
        let _ = writeln!(
            o,
            "Local ceilings: disk write+fsync {:.0} MB/s, BLAKE3 (one core) {:.0} MB/s.\n",
            m.disk_mb_s, m.blake3_mb_s
        );
        if self.runs.is_empty() {
            let _ = writeln!(
                o,
                "Full copies not timed (`--incremental-only`): ferry's starting copy is its own \
                 round 0; rsync's and rclone's are made locally with `cp -a`."
            );
        } else {
            let _ = writeln!(
                o,
                "| tool | wall s | MB/s | files/s | CPU s | peak RSS MiB | agent RSS MiB | time ÷ ferry's | runs ok |"
            );
            let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|");
        }
        for r in rows.iter().filter(|_| !self.runs.is_empty()) {
            if r.ok == 0 {
                let _ = writeln!(
                    o,
                    "| {} | FAILED | | | | | | | 0/{} — {} |",
                    r.tool, self.runs_per_tool, r.error
                );
                continue;
            }
            let files_s = if r.tool.starts_with("quic-raw") {
                "—".to_string()
            } else {
                format!("{:.0}", self.files as f64 / r.wall)
            };
            let ratio = ferry_wall.map_or("—".into(), |f| format!("{:.2}", r.wall / f));
            let mb_s = self.bytes as f64 / r.wall / 1e6;
            let mb_s = if mb_s < 10.0 {
                format!("{mb_s:.2}")
            } else {
                format!("{mb_s:.1}")
            };
            let agent = if r.agent_rss > 0.0 {
                format!("{:.0}", r.agent_rss)
            } else {
                "—".to_string()
            };
            let _ = writeln!(
                o,
                "| {} | {:.2} | {mb_s} | {files_s} | {:.1} | {:.0} | {agent} | {ratio} | {}/{} |",
                r.tool, r.wall, r.cpu, r.rss, r.ok, self.runs_per_tool
            );
        }
        for m in &self.missing {
            let _ = writeln!(o, "| {m} | | | | | | | | |");
        }
        if !self.incremental.is_empty() {
            let _ = writeln!(
                o,
                "\nIncremental re-sync (after changing 1 % of small files and 1 % of large files' bytes):\n"
            );
            let _ = writeln!(o, "| tool | change re-sync s | no-change re-run s |");
            let _ = writeln!(o, "|---|---|---|");
            for (t, a, b) in &self.incremental {
                let _ = writeln!(o, "| {t} | {a} | {b} |");
            }
        }
        if !self.cutover.is_empty() {
            let _ = writeln!(
                o,
                "\nferry's cutover (a full verification while the source is live, 1 % more changed, then the cutover; no hooks):\n"
            );
            let _ = writeln!(o, "| | |");
            let _ = writeln!(o, "|---|---|");
            for (what, v) in &self.cutover {
                let _ = writeln!(o, "| {what} | {v} |");
            }
        }
        out
    }

    /// Every figure and every run, for tools that read results.
    pub fn json(&self) -> serde_json::Value {
        let rows = self.rows();
        let ferry_wall = ferry_wall(&rows);
        let (files, bytes, m) = (self.files as f64, self.bytes as f64, &self.machine);
        serde_json::json!({
            "profile": self.profile.name,
            "rtt_ms": self.profile.rtt.as_millis() as u64,
            "loss": self.profile.loss,
            "rate_bps": self.profile.rate_bps,
            "dataset": self.kind.name(),
            "size": self.size,
            "files": self.files,
            "bytes": self.bytes,
            "cores": m.cores,
            "mem_gib": m.mem_gib,
            "disk_write_fsync_mb_s": m.disk_mb_s,
            "blake3_mb_s": m.blake3_mb_s,
            "runs": self.runs,
            "missing": self.missing,
            "median": rows.iter().map(|r| serde_json::json!({
                "tool": r.tool, "ok_runs": r.ok, "wall_secs": r.wall, "mb_s": bytes / r.wall / 1e6,
                "files_s": files / r.wall, "cpu_secs": r.cpu, "peak_rss_mib": r.rss,
                "peak_agent_rss_mib": r.agent_rss,
                "time_over_ferry": ferry_wall.map(|f| r.wall / f),
            })).collect::<Vec<_>>(),
            "incremental": self.incremental.iter().map(|(t, a, b)| serde_json::json!({"tool": t, "change": a, "no_change": b})).collect::<Vec<_>>(),
            "cutover": self.cutover.iter().map(|(w, v)| serde_json::json!({"what": w, "figure": v})).collect::<Vec<_>>(),
        })
    }
}

/// ferry's median wall time, the yardstick of the "time ÷ ferry's" column: `ferry`'s, or
/// `ferry-s3`'s when only the S3 tools ran.
fn ferry_wall(rows: &[Row]) -> Option<f64> {
    ["ferry", "ferry-s3"].iter().find_map(|name| {
        rows.iter()
            .find(|r| r.tool == *name && r.ok > 0)
            .map(|r| r.wall)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_no_values() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
