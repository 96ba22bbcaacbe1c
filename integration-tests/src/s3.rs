//! A real S3 server for the tests and benchmarks: `moto` in server mode (PyPI `moto[server]`,
//! installed by `.ci/run`), started on a free loopback port and killed when dropped, and an S3
//! client independent of ferry (`scripts/s3_tool.py`, boto3) to create buckets and check what
//! the store holds.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Deserialize;

/// A `moto_server` process.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    _log: tempfile::NamedTempFile,
}

/// One object as the independent client read it back.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Object {
    /// Bytes.
    pub size: u64,
    /// SHA-256 of the bytes, hex.
    pub sha256: String,
    /// User metadata (`x-amz-meta-*`, without the prefix).
    pub metadata: BTreeMap<String, String>,
}

fn tool() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/s3_tool.py")
}

impl Moto {
    /// Starts a server, or `Ok(None)` when `moto_server` is not installed.
    pub fn start() -> anyhow::Result<Option<Moto>> {
        if Command::new("moto_server")
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            return Ok(None);
        }
        // Port 0: the server says in its log where it listens (no port picked and released).
        let log = tempfile::NamedTempFile::new()?;
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdin(Stdio::null())
            .stdout(log.reopen()?)
            .stderr(log.reopen()?)
            .spawn()
            .context("cannot start moto_server")?;
        let mut moto = Moto {
            child,
            endpoint: String::new(),
            _log: log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        moto.endpoint = loop {
            let text = std::fs::read_to_string(moto._log.path()).unwrap_or_default();
            if let Some(url) = text
                .lines()
                .find_map(|l| l.split("Running on ").nth(1))
                .map(|u| u.trim().to_string())
            {
                break url;
            }
            if let Some(status) = moto.child.try_wait()? {
                bail!("moto_server exited at start ({status}):\n{text}");
            }
            if Instant::now() > deadline {
                bail!("moto_server did not say where it listens within 30 s:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let port = moto
            .endpoint
            .rsplit(':')
            .next()
            .unwrap_or_default()
            .parse::<u16>()?;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "moto_server does not accept connections at {}",
                    moto.endpoint
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Some(moto))
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<Vec<u8>> {
        let out = Command::new("python3")
            .arg(tool())
            .arg(&self.endpoint)
            .args(args)
            .env_remove("AWS_CA_BUNDLE")
            .output()
            .context("cannot run python3")?;
        if !out.status.success() {
            bail!(
                "s3_tool {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out.stdout)
    }

    /// Creates `bucket`.
    pub fn create_bucket(&self, bucket: &str) -> anyhow::Result<()> {
        self.run(&["create-bucket", bucket]).map(|_| ())
    }

    /// Every object below `prefix` of `bucket`, read back whole.
    pub fn list(&self, bucket: &str, prefix: &str) -> anyhow::Result<BTreeMap<String, Object>> {
        Ok(serde_json::from_slice(
            &self.run(&["list", bucket, prefix])?,
        )?)
    }

    /// The keys of the multipart uploads in progress in `bucket`.
    pub fn uploads(&self, bucket: &str) -> anyhow::Result<Vec<String>> {
        Ok(serde_json::from_slice(&self.run(&["uploads", bucket])?)?)
    }

    /// The `[target_store]` section of an agent writing below `bucket/prefix` of this server.
    pub fn target_store_toml(&self, bucket: &str, prefix: &str) -> String {
        format!(
            "[target_store]\nurl = \"s3://{bucket}/{prefix}\"\n[target_store.options]\n\
             endpoint = \"{}\"\nallow_http = \"true\"\nregion = \"us-east-1\"\n\
             access_key_id = \"test\"\nsecret_access_key = \"test\"\n",
            self.endpoint
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
