//! What every copy runs in: the emulated path's two sides, the daemons the tools need (sshd for
//! rsync, scp and rclone; the QUIC sink for the raw blast; ferry's own in [`super::ferry`]), and
//! the commands that drive the peer tools.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::wan::WanPath;

/// `name`'s path: as given when it holds a `/`, else the first match on `PATH`.
pub fn find_program(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Path::new(name).exists().then(|| PathBuf::from(name));
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

/// A binary built next to this one.
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{name} is not built next to this binary in {}: run `cargo build --release -p ferry-integration-tests --bins`",
            dir.display()
        );
    }
    Ok(p)
}

/// Runs `cmd` to completion within `timeout`, its output going to `log`.
pub fn run_logged(mut cmd: Command, log: &Path, timeout: Duration) -> Result<(), String> {
    let out = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let t = Instant::now();
    loop {
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(s) if s.success() => return Ok(()),
            Some(s) => {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(5).collect();
                return Err(format!(
                    "exited with {s}: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                ));
            }
            None if t.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("timed out after {} s", timeout.as_secs()));
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Processes to stop when the harness ends, each with the tools it serves.
pub struct Daemons(pub Vec<(&'static [&'static str], Child)>);

impl Daemons {
    /// Pids of the daemons that do not serve `tool` (left out of its memory figure).
    pub fn others(&self, tool: &str) -> Vec<u32> {
        self.0
            .iter()
            .filter(|(tools, _)| !tools.contains(&tool))
            .map(|(_, c)| c.id())
            .collect()
    }
}

/// The tools that go through sshd.
pub const SSH_TOOLS: &[&str] = &["rsync", "rsync-fsync", "scp", "rclone"];

impl Drop for Daemons {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Everything a tool needs.
pub struct Ctx {
    /// The emulated path: side A is the source host, side B the target host.
    pub wan: WanPath,
    /// The working directory.
    pub work: PathBuf,
    /// The data set.
    pub src: PathBuf,
    /// The ssh client key sshd accepts.
    pub ssh_key: PathBuf,
    /// The CA directory ferry and the QUIC blast take their certificates from.
    pub pki: PathBuf,
    /// The data set's size in bytes (what the raw blast sends).
    pub bytes: u64,
    /// How long one copy may take.
    pub timeout: Duration,
}

impl Ctx {
    /// The S3 server's endpoint, in side B.
    pub fn s3_endpoint(&self) -> String {
        format!("http://{}:{S3_PORT}", self.wan.addr_b)
    }

    /// `scripts/s3_tool.py` against the S3 server, run in side B; its stdout.
    pub fn s3_tool(&self, args: &[&str]) -> Result<Vec<u8>, String> {
        let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/s3_tool.py");
        let out = WanPath::command(&self.wan.ns_b, "python3")
            .arg(tool)
            .arg(self.s3_endpoint())
            .args(args)
            .env_remove("AWS_CA_BUNDLE")
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "s3_tool {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(out.stdout)
    }

    /// `rclone copy` of `src`'s contents to `bucket/prefix` of the S3 server, from side A.
    pub fn rclone_s3(&self, src: &Path, prefix: &str) -> Command {
        let conf = self.work.join("rclone.conf");
        let _ = std::fs::write(&conf, "");
        let mut c = self.in_a("rclone");
        c.arg("copy")
            .arg(src)
            .arg(format!(":s3:{S3_BUCKET}/{prefix}"))
            .arg("--config")
            .arg(&conf)
            .args([
                "--s3-provider",
                "Other",
                "--s3-endpoint",
                &self.s3_endpoint(),
            ])
            .args([
                "--s3-access-key-id",
                "test",
                "--s3-secret-access-key",
                "test",
            ])
            .args(["--s3-region", "us-east-1"])
            // A plain-HTTP local server: the machine's CA bundle setting breaks rclone's S3.
            .env_remove("AWS_CA_BUNDLE");
        c
    }

    /// ssh's options for the bench's key, no host checks.
    pub fn ssh_opts(&self) -> Vec<String> {
        [
            "-i",
            &self.ssh_key.display().to_string(),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// `program` run in side A (the source host).
    pub fn in_a(&self, program: &str) -> Command {
        WanPath::command(&self.wan.ns_a, program)
    }

    /// `rsync -a` over ssh of `src`'s contents into `dst` on side B (`--fsync` if asked).
    pub fn rsync(&self, src: &Path, dst: &Path, fsync: bool) -> Command {
        let mut c = self.in_a("rsync");
        if fsync {
            // rsync >= 3.2.4: fsync every file it writes, as ferry does before it counts a
            // segment (plain rsync leaves the data in the page cache).
            c.arg("--fsync");
        }
        c.arg("-a")
            .arg("-e")
            .arg(format!("ssh -p {SSH_PORT} {}", self.ssh_opts().join(" ")))
            .arg(format!("{}/", src.display()))
            .arg(format!("root@{}:{}/", self.wan.addr_b, dst.display()));
        c
    }

    /// `rclone copy` over sftp of `src` into `dst` on side B.
    pub fn rclone(&self, src: &Path, dst: &Path) -> Command {
        let conf = self.work.join("rclone.conf");
        let _ = std::fs::write(&conf, "");
        let mut c = self.in_a("rclone");
        c.arg("copy")
            .arg(src)
            .arg(format!(":sftp:{}", dst.display()))
            .arg("--config")
            .arg(&conf)
            .args(["--sftp-host", &self.wan.addr_b.to_string()])
            .args(["--sftp-port", &SSH_PORT.to_string()])
            .args(["--sftp-user", "root"])
            .arg("--sftp-key-file")
            .arg(&self.ssh_key)
            .args(["--sftp-shell-type", "unix"])
            .args(["--sftp-md5sum-command", "none"])
            .args(["--sftp-sha1sum-command", "none"]);
        c
    }
}

/// sshd's port in side B.
pub const SSH_PORT: u16 = 2222;
/// ferry's coordinator's port in side B.
pub const COORD_PORT: u16 = 7400;
/// ferry's target agent's data port in side B.
pub const DATA_PORT: u16 = 7401;
/// The raw QUIC sink's port in side B.
pub const QUIC_SINK_PORT: u16 = 7500;
/// The S3 server's (moto's) port in side B.
pub const S3_PORT: u16 = 7600;
/// ferry's second target agent's data port in side B (the one writing to the S3 server).
pub const DATA_PORT_S3: u16 = 7402;
/// The bucket the S3 tools write to.
pub const S3_BUCKET: &str = "bench";
/// The tools that write to the S3 server.
pub const S3_TOOLS: &[&str] = &["ferry-s3", "rclone-s3"];

/// Starts sshd in namespace B with a fresh host key and a client key.
pub fn start_sshd(ctx: &Ctx, daemons: &mut Daemons) -> anyhow::Result<()> {
    let sshd = find_program("/usr/sbin/sshd").context("sshd missing")?;
    let dir = ctx.work.join("ssh");
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all("/run/sshd")?;
    for (f, kind) in [("host", "ed25519"), ("id", "ed25519")] {
        if !dir.join(f).exists() {
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", kind, "-N", "", "-f"])
                .arg(dir.join(f))
                .status()?;
            if !st.success() {
                bail!("ssh-keygen failed");
            }
        }
    }
    std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys"))?;
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {SSH_PORT}\nListenAddress {}\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\nSubsystem sftp internal-sftp\n",
            ctx.wan.addr_b,
            dir.join("host").display(),
            dir.join("authorized_keys").display()
        ),
    )?;
    let log = std::fs::File::create(ctx.work.join("sshd.log"))?;
    daemons.0.push((
        SSH_TOOLS,
        WanPath::command(&ctx.wan.ns_b, &sshd.display().to_string())
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    ));
    // Ready when a login works across the path.
    for _ in 0..100 {
        let ok = ctx
            .in_a("ssh")
            .args(ctx.ssh_opts())
            .args(["-p", &SSH_PORT.to_string()])
            .arg(format!("root@{}", ctx.wan.addr_b))
            .arg("true")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success();
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "sshd did not accept a login; see {}",
        ctx.work.join("sshd.log").display()
    )
}

/// What each peer tool needs installed, and the packages that bring it.
const NEEDS: &[(&str, &[&str], &str)] = &[
    (
        "rsync",
        &["rsync", "ssh", "/usr/sbin/sshd"],
        "rsync openssh-client openssh-server",
    ),
    (
        "rsync-fsync",
        &["rsync", "ssh", "/usr/sbin/sshd"],
        "rsync openssh-client openssh-server",
    ),
    (
        "scp",
        &["scp", "ssh", "/usr/sbin/sshd"],
        "openssh-client openssh-server",
    ),
    (
        "rclone",
        &["rclone", "/usr/sbin/sshd"],
        "rclone openssh-server",
    ),
    (
        "rclone-s3",
        &["rclone", "moto_server"],
        "rclone; pip install 'moto[server]'",
    ),
    ("ferry-s3", &["moto_server"], "pip install 'moto[server]'"),
];

/// Keeps the tools whose programs are installed; says, for each one dropped, what to install.
pub fn installed(tools: &mut Vec<String>) -> Vec<String> {
    let mut missing = Vec::new();
    tools.retain(|t| {
        let Some((_, progs, pkgs)) = NEEDS.iter().find(|(n, _, _)| n == t) else {
            return true;
        };
        let absent: Vec<&str> = progs
            .iter()
            .copied()
            .filter(|p| find_program(p).is_none())
            .collect();
        if absent.is_empty() {
            return true;
        }
        missing.push(format!(
            "{t}: skipped, {} not installed (apt-get install -y {pkgs})",
            absent.join(", ")
        ));
        false
    });
    missing
}

/// Starts the S3 server (moto) in side B and creates the bucket.
pub fn start_s3(ctx: &Ctx, daemons: &mut Daemons) -> anyhow::Result<()> {
    let log = std::fs::File::create(ctx.work.join("moto.log"))?;
    let moto = WanPath::command(&ctx.wan.ns_b, "moto_server")
        .args([
            "-H",
            &ctx.wan.addr_b.to_string(),
            "-p",
            &S3_PORT.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    daemons.0.push((S3_TOOLS, moto));
    let t = Instant::now();
    loop {
        match ctx.s3_tool(&["create-bucket", S3_BUCKET]) {
            Ok(_) => return Ok(()),
            Err(e) if t.elapsed() > Duration::from_secs(30) => {
                bail!("the S3 server did not answer within 30 s: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Starts the raw QUIC sink (this binary's `quic-sink`) in side B.
pub fn start_quic_sink(ctx: &Ctx, daemons: &mut Daemons) -> anyhow::Result<()> {
    let log = std::fs::File::create(ctx.work.join("quic-sink.log"))?;
    let sink = WanPath::command(
        &ctx.wan.ns_b,
        &std::env::current_exe()?.display().to_string(),
    )
    .args(["quic-sink", "--listen"])
    .arg(format!("{}:{QUIC_SINK_PORT}", ctx.wan.addr_b))
    .arg("--pki")
    .arg(&ctx.pki)
    .stdin(Stdio::null())
    .stdout(log.try_clone()?)
    .stderr(log)
    .spawn()?;
    daemons.0.push((&["quic-raw", "quic-raw-bbr"], sink));
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}
