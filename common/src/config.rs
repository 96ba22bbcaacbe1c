//! TOML config loading shared by the daemons. Each daemon owns its config struct; this module only
//! reads a file and reports errors that name the file and the problem.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use thiserror::Error;

/// A config file could not be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this daemon.
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with line and column.
        message: String,
    },
}

/// A config file as a table (what SIGHUP compares: `telemetry::Logging::reload`).
pub use toml::Table;

/// Reads and parses a TOML config file.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Where a daemon's TLS material lives: the cluster CA and this identity's certificate and key (PEM).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// The cluster CA certificate.
    pub ca: PathBuf,
    /// This identity's certificate.
    pub cert: PathBuf,
    /// This identity's private key.
    pub key: PathBuf,
}

impl TlsPaths {
    /// The layout `ferry-coordinator pki issue` writes: `<dir>/ca.pem`, `<dir>/<name>.pem`,
    /// `<dir>/<name>.key`.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        TlsPaths {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        #[allow(dead_code)]
        name: String,
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "name = 3\n").unwrap();
        let err = load_toml::<Cfg>(&p).unwrap_err().to_string();
        assert!(err.contains("c.toml") && err.contains("invalid"), "{err}");
        let err = load_toml::<Cfg>(&dir.path().join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read config"), "{err}");
    }
}
