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

/// A daemon's config file: which environment variables may set its keys, and its log level.
pub trait DaemonConfig: DeserializeOwned {
    /// Environment variables `<ENV_PREFIX><KEY>` set keys ([`load_with_env`]).
    const ENV_PREFIX: &'static str;
    /// The sections whose keys the environment may set (`<ENV_PREFIX><SECTION>_<KEY>`).
    const ENV_SECTIONS: &'static [&'static str];
    /// The `log_level` key, if given.
    fn log_level(&self) -> Option<&str>;
}

/// A daemon's config from `path` with the environment over it ([`load_with_env`]).
pub fn load_daemon<T: DaemonConfig>(path: &Path) -> Result<(T, Table), ConfigError> {
    load_with_env(path, T::ENV_PREFIX, T::ENV_SECTIONS)
}

/// Reads the daemon config at `path` and lays the environment's `<prefix><KEY>` variables over
/// it, for systemd's `EnvironmentFile=`: `FERRY_AGENT_MAX_IN_FLIGHT=8` sets `max_in_flight`, and
/// `FERRY_AGENT_TLS_CA=...` sets `ca` in `[tls]` (for each section named in `sections`). A value
/// is read as a TOML value (`8`, `true`, `"x"`, `["a", "b"]`), else taken as a string.
/// `<prefix>CONFIG` names the file and is not a key. Returns the config and the table it was
/// read from (the file with the environment over it).
pub fn load_with_env<T: DeserializeOwned>(
    path: &Path,
    prefix: &str,
    sections: &[&str],
) -> Result<(T, Table), ConfigError> {
    load_with_vars(path, prefix, sections, std::env::vars())
}

/// [`load_with_env`] with the variables given.
pub fn load_with_vars<T: DeserializeOwned>(
    path: &Path,
    prefix: &str,
    sections: &[&str],
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<(T, Table), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let parse = |message: String| ConfigError::Parse {
        path: path.to_path_buf(),
        message,
    };
    let mut table: Table = toml::from_str(&text).map_err(|e| parse(e.to_string()))?;
    let mut applied = Vec::new();
    let mut overrides: Vec<(String, String)> = vars
        .into_iter()
        .filter(|(k, _)| k.starts_with(prefix) && k.as_str() != format!("{prefix}CONFIG"))
        .collect();
    overrides.sort();
    for (var, raw) in overrides {
        let key = var[prefix.len()..].to_ascii_lowercase();
        if key.is_empty() {
            continue;
        }
        let value = toml::from_str::<Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        let section = sections
            .iter()
            .find(|s| key.starts_with(&format!("{s}_")) && key.len() > s.len() + 1);
        match section {
            Some(s) => {
                let sub = table
                    .entry((*s).to_string())
                    .or_insert_with(|| toml::Value::Table(Table::new()));
                let Some(sub) = sub.as_table_mut() else {
                    return Err(parse(format!("{var}: `{s}` is not a section in the file")));
                };
                sub.insert(key[s.len() + 1..].to_string(), value);
            }
            None => {
                table.insert(key, value);
            }
        }
        applied.push(var);
    }
    let cfg = if applied.is_empty() {
        toml::from_str::<T>(&text).map_err(|e| parse(e.to_string()))?
    } else {
        toml::Value::Table(table.clone())
            .try_into::<T>()
            .map_err(|e| {
                parse(format!(
                    "{e} (with {} from the environment)",
                    applied.join(", ")
                ))
            })?
    };
    Ok((cfg, table))
}

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

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Daemon {
        name: String,
        #[serde(default)]
        max_in_flight: u32,
        #[serde(default)]
        verbose: bool,
        tls: Tls,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Tls {
        ca: String,
        #[serde(default)]
        cert: String,
    }

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Issue 15: every key can come from the environment (`EnvironmentFile=`), sections too;
    /// values are TOML where they parse and strings otherwise; the config path's own variable
    /// and other daemons' variables are not keys.
    #[test]
    fn the_environment_sets_keys_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.toml");
        std::fs::write(&path, "name = \"file\"\n[tls]\nca = \"/file/ca.pem\"\n").unwrap();
        let (cfg, table) = load_with_vars::<Daemon>(
            &path,
            "FERRY_AGENT_",
            &["tls"],
            vars(&[
                ("FERRY_AGENT_NAME", "gpu-01"),
                ("FERRY_AGENT_MAX_IN_FLIGHT", "8"),
                ("FERRY_AGENT_VERBOSE", "true"),
                ("FERRY_AGENT_TLS_CERT", "/env/cert.pem"),
                ("FERRY_AGENT_CONFIG", "/etc/ferry/agent.toml"),
                ("FERRY_COORDINATOR_NODE_ID", "3"),
            ]),
        )
        .unwrap();
        assert_eq!(
            cfg,
            Daemon {
                name: "gpu-01".into(),
                max_in_flight: 8,
                verbose: true,
                tls: Tls {
                    ca: "/file/ca.pem".into(),
                    cert: "/env/cert.pem".into(),
                },
            }
        );
        assert_eq!(table["max_in_flight"].as_integer(), Some(8));
        // A value of the wrong type names the variable it came from.
        let e = load_with_vars::<Daemon>(
            &path,
            "FERRY_AGENT_",
            &["tls"],
            vars(&[("FERRY_AGENT_MAX_IN_FLIGHT", "many")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("FERRY_AGENT_MAX_IN_FLIGHT"), "{e}");
        // An unknown key is refused as from the file.
        let e = load_with_vars::<Daemon>(
            &path,
            "FERRY_AGENT_",
            &["tls"],
            vars(&[("FERRY_AGENT_TYPO", "1")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("typo"), "{e}");
    }
}
