//! Contexts, as kubectl has them: named sets of coordinator addresses, PKI directory and admin
//! identity in `~/.config/ferry/config.toml` (or `$XDG_CONFIG_HOME/ferry/config.toml`, or
//! `$FERRY_CONFIG`), one of them current:
//!
//! ```toml
//! current = "prod"
//! [contexts.prod]
//! coordinator = "10.0.0.11:7400,10.0.0.12:7400"
//! pki_dir = "/etc/ferry/pki"
//! admin = "alice"
//! ```
//!
//! What a command uses comes from, first to last: its flags, the environment (`FERRY_…`), the
//! context named by `--context` or the current one, then the built-in defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One context.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// Coordinator addresses (`host:port`, comma-separated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<String>,
    /// Directory with `ca.pem` and `admin-<admin>.pem`/`.key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pki_dir: Option<PathBuf>,
    /// The admin identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<String>,
}

/// The config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The context used when `--context` is not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    /// Contexts by name.
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// The built-in defaults.
pub const DEFAULT_COORDINATOR: &str = "127.0.0.1:7400";
/// See [`DEFAULT_COORDINATOR`].
pub const DEFAULT_PKI_DIR: &str = "/etc/ferry/pki";
/// See [`DEFAULT_COORDINATOR`].
pub const DEFAULT_ADMIN: &str = "admin";

/// Where the config file is: `$FERRY_CONFIG`, else `$XDG_CONFIG_HOME/ferry/config.toml`, else
/// `$HOME/.config/ferry/config.toml` (`None`: no home).
pub fn path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FERRY_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".config")))?;
    Some(base.join("ferry/config.toml"))
}

/// Reads the config at `path` (absent: empty).
pub fn load(path: &Path) -> anyhow::Result<Config> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("ferryctl config {} is not valid: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}

/// Writes `config` to `path` (through a temporary file and a rename).
pub fn save(path: &Path, config: &Config) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = toml::to_string(config)?;
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// What a command connects with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Coordinator addresses.
    pub coordinator: String,
    /// PKI directory.
    pub pki_dir: PathBuf,
    /// Admin identity.
    pub admin: String,
}

/// Resolves what a command uses: `given` (flags or environment, as clap read them) over the
/// context `name` (or the current one) over the defaults. A context named but missing is an
/// error; no context at all is not.
pub fn resolve(config: &Config, name: Option<&str>, given: &Context) -> anyhow::Result<Resolved> {
    let chosen = name.or(config.current.as_deref());
    let ctx = match chosen {
        None => Context::default(),
        Some(n) => config.contexts.get(n).cloned().ok_or_else(|| {
            let known: Vec<&str> = config.contexts.keys().map(String::as_str).collect();
            anyhow::anyhow!(
                "no context {n:?} (known: {}); add it with `ferryctl config set-context {n} --coordinator HOST:PORT`",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            )
        })?,
    };
    Ok(Resolved {
        coordinator: given
            .coordinator
            .clone()
            .or(ctx.coordinator)
            .unwrap_or_else(|| DEFAULT_COORDINATOR.into()),
        pki_dir: given
            .pki_dir
            .clone()
            .or(ctx.pki_dir)
            .unwrap_or_else(|| DEFAULT_PKI_DIR.into()),
        admin: given
            .admin
            .clone()
            .or(ctx.admin)
            .unwrap_or_else(|| DEFAULT_ADMIN.into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_context_which_wins_over_the_defaults() {
        let mut config = Config::default();
        let none = Context::default();
        assert_eq!(
            resolve(&config, None, &none).unwrap(),
            Resolved {
                coordinator: DEFAULT_COORDINATOR.into(),
                pki_dir: DEFAULT_PKI_DIR.into(),
                admin: DEFAULT_ADMIN.into(),
            }
        );
        config.contexts.insert(
            "prod".into(),
            Context {
                coordinator: Some("10.0.0.11:7400".into()),
                pki_dir: None,
                admin: Some("alice".into()),
            },
        );
        config.contexts.insert(
            "lab".into(),
            Context {
                coordinator: Some("lab:7400".into()),
                ..Context::default()
            },
        );
        config.current = Some("prod".into());
        let r = resolve(&config, None, &none).unwrap();
        assert_eq!(
            (r.coordinator.as_str(), r.admin.as_str()),
            ("10.0.0.11:7400", "alice")
        );
        assert_eq!(r.pki_dir, PathBuf::from(DEFAULT_PKI_DIR));
        let r = resolve(&config, Some("lab"), &none).unwrap();
        assert_eq!(
            (r.coordinator.as_str(), r.admin.as_str()),
            ("lab:7400", "admin")
        );
        let flags = Context {
            admin: Some("bob".into()),
            ..Context::default()
        };
        let r = resolve(&config, None, &flags).unwrap();
        assert_eq!(
            (r.coordinator.as_str(), r.admin.as_str()),
            ("10.0.0.11:7400", "bob")
        );
        let e = resolve(&config, Some("staging"), &none)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no context \"staging\" (known: lab, prod)"),
            "{e}"
        );
    }

    #[test]
    fn the_file_round_trips_and_a_missing_one_is_empty() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ferry/config.toml");
        assert_eq!(load(&p).unwrap(), Config::default());
        let mut c = Config::default();
        c.contexts.insert(
            "prod".into(),
            Context {
                coordinator: Some("a:1,b:2".into()),
                pki_dir: Some("/p".into()),
                admin: Some("ops".into()),
            },
        );
        c.current = Some("prod".into());
        save(&p, &c).unwrap();
        assert_eq!(load(&p).unwrap(), c);
        std::fs::write(&p, "current = 3").unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("is not valid"));
    }
}
