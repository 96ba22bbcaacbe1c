//! Real object-store servers for the tests and benchmarks, started on port 0 (each says in its
//! log where it listens) and killed when dropped: S3 is `moto` in server mode (PyPI
//! `moto[server]`), Azure Blob is `azurite` (npm); `.ci/run` installs both. What a store holds
//! is checked with clients independent of ferry (`scripts/s3_tool.py` with boto3,
//! `scripts/azure_tool.py` with azure-storage-blob): create a bucket, read back and hash every
//! object.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Deserialize;

/// Which store a [`Server`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// S3 (moto).
    S3,
    /// Azure Blob (azurite), account `devstoreaccount1`.
    Azure,
}

/// A store server process.
pub struct Server {
    child: Child,
    kind: Kind,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    _log: tempfile::NamedTempFile,
    _data: Option<tempfile::TempDir>,
}

/// One object as the independent client read it back.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Object {
    /// Bytes.
    pub size: u64,
    /// SHA-256 of the bytes, hex.
    pub sha256: String,
    /// User metadata (without the store's header prefix).
    pub metadata: BTreeMap<String, String>,
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name)
}

fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

impl Server {
    /// A `moto_server`, or `Ok(None)` when it is not installed.
    pub fn moto() -> anyhow::Result<Option<Server>> {
        if !installed("moto_server") {
            return Ok(None);
        }
        let mut cmd = Command::new("moto_server");
        cmd.args(["-H", "127.0.0.1", "-p", "0"]);
        Self::start(Kind::S3, cmd, "Running on ", None).map(Some)
    }

    /// An `azurite-blob`, or `Ok(None)` when it is not installed.
    pub fn azurite() -> anyhow::Result<Option<Server>> {
        if !installed("azurite-blob") {
            return Ok(None);
        }
        let data = tempfile::tempdir()?;
        let mut cmd = Command::new("azurite-blob");
        cmd.args([
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            "0",
            "--skipApiVersionCheck",
        ])
        .args(["--disableTelemetry", "--location"])
        .arg(data.path());
        Self::start(Kind::Azure, cmd, "successfully listens on ", Some(data)).map(Some)
    }

    /// Starts `cmd` and waits until its log names the URL it serves after `says`.
    fn start(
        kind: Kind,
        mut cmd: Command,
        says: &str,
        data: Option<tempfile::TempDir>,
    ) -> anyhow::Result<Server> {
        let log = tempfile::NamedTempFile::new()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.reopen()?)
            .stderr(log.reopen()?)
            .spawn()
            .with_context(|| format!("cannot start {kind:?} server"))?;
        let mut server = Server {
            child,
            kind,
            endpoint: String::new(),
            _log: log,
            _data: data,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        server.endpoint = loop {
            let text = std::fs::read_to_string(server._log.path()).unwrap_or_default();
            if let Some(url) = text
                .lines()
                .find_map(|l| l.split(says).nth(1))
                .map(|u| u.trim().to_string())
            {
                break url;
            }
            if let Some(status) = server.child.try_wait()? {
                bail!("{kind:?} server exited at start ({status}):\n{text}");
            }
            if Instant::now() > deadline {
                bail!("{kind:?} server did not say where it listens within 30 s:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let port: u16 = server
            .endpoint
            .rsplit(':')
            .next()
            .unwrap_or_default()
            .parse()?;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "{kind:?} server does not accept connections at {}",
                    server.endpoint
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<Vec<u8>> {
        let tool = match self.kind {
            Kind::S3 => "s3_tool.py",
            Kind::Azure => "azure_tool.py",
        };
        let out = Command::new("python3")
            .arg(script(tool))
            .arg(&self.endpoint)
            .args(args)
            .env_remove("AWS_CA_BUNDLE")
            .output()
            .context("cannot run python3")?;
        if !out.status.success() {
            bail!(
                "{tool} {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out.stdout)
    }

    /// Creates a bucket (a container on Azure).
    pub fn create_bucket(&self, bucket: &str) -> anyhow::Result<()> {
        let cmd = match self.kind {
            Kind::S3 => "create-bucket",
            Kind::Azure => "create-container",
        };
        self.run(&[cmd, bucket]).map(|_| ())
    }

    /// Every object below `prefix` of `bucket`, read back whole.
    pub fn list(&self, bucket: &str, prefix: &str) -> anyhow::Result<BTreeMap<String, Object>> {
        Ok(serde_json::from_slice(
            &self.run(&["list", bucket, prefix])?,
        )?)
    }

    /// S3: uploads every regular file below `dir` to `bucket` as `prefix/<path>`.
    pub fn put_tree(
        &self,
        bucket: &str,
        prefix: &str,
        dir: &std::path::Path,
    ) -> anyhow::Result<()> {
        assert_eq!(self.kind, Kind::S3, "only the S3 tool uploads");
        let dir = dir.to_str().context("a UTF-8 directory")?;
        self.run(&["put", bucket, prefix, dir]).map(|_| ())
    }

    /// S3: the keys of the multipart uploads in progress in `bucket`.
    pub fn uploads(&self, bucket: &str) -> anyhow::Result<Vec<String>> {
        assert_eq!(self.kind, Kind::S3, "only S3 lists multipart uploads");
        Ok(serde_json::from_slice(&self.run(&["uploads", bucket])?)?)
    }

    /// The `[target_store]` section of an agent writing below `bucket/prefix` of this server,
    /// and the environment it needs (azurite's address is read from `AZURITE_BLOB_STORAGE_URL`).
    pub fn target_store_toml(&self, bucket: &str, prefix: &str) -> (String, Vec<(String, String)>) {
        match self.kind {
            Kind::S3 => (
                format!(
                    "[target_store]\nurl = \"s3://{bucket}/{prefix}\"\n[target_store.options]\n\
                     endpoint = \"{}\"\nallow_http = \"true\"\nregion = \"us-east-1\"\n\
                     access_key_id = \"test\"\nsecret_access_key = \"test\"\n",
                    self.endpoint
                ),
                Vec::new(),
            ),
            Kind::Azure => (
                format!(
                    "[target_store]\nurl = \"az://{bucket}/{prefix}\"\n[target_store.options]\n\
                     use_emulator = \"true\"\n"
                ),
                vec![(
                    "AZURITE_BLOB_STORAGE_URL".to_string(),
                    self.endpoint.clone(),
                )],
            ),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
