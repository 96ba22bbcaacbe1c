//! Logging setup shared by the binaries, and the log level a running daemon changes on SIGHUP.

use std::io::IsTerminal;
use std::path::Path;

use tracing_subscriber::EnvFilter;

use crate::config::DaemonConfig;

/// A log filter that does not parse.
#[derive(Debug, thiserror::Error)]
#[error(
    "log_level {value:?} is not a log filter ({reason}); use a level such as \"info\" or \
     directives such as \"info,ferry_agent=debug\""
)]
pub struct LogLevelError {
    /// What was given.
    pub value: String,
    /// Why it does not parse.
    pub reason: String,
}

type Setter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// The installed subscriber's filter, changeable while the daemon runs.
pub struct Logging {
    set: Setter,
    /// `RUST_LOG` chose the filter: it wins over the config's `log_level`.
    from_env: bool,
    default: String,
}

/// Whether log lines carry terminal colours: only on a terminal (never into a file, a pipe or
/// the journal) and never with `NO_COLOR` set.
pub fn colours(stderr_is_terminal: bool, no_color: bool) -> bool {
    stderr_is_terminal && !no_color
}

/// Installs a global `tracing` subscriber writing to stderr, filtered by `RUST_LOG` if set, else
/// by `default_filter` (until [`Logging::apply`] sets the config's level). With `json`, one JSON
/// object per line. Calling it twice is harmless (the second subscriber is not installed).
pub fn init(default_filter: &str, json: bool) -> Logging {
    let from_env = EnvFilter::try_from_default_env().ok();
    let env_set = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(default_filter));
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colours(std::io::stderr().is_terminal(), no_color));
    let set: Setter = if json {
        let b = builder.json().with_filter_reloading();
        let handle = b.reload_handle();
        let _ = b.try_init();
        Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
    } else {
        let b = builder.with_filter_reloading();
        let handle = b.reload_handle();
        let _ = b.try_init();
        Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
    };
    Logging {
        set,
        from_env: env_set,
        default: default_filter.to_string(),
    }
}

impl Logging {
    /// Filters by `level` (the config's `log_level`; `None`: the default), unless `RUST_LOG`
    /// chose the filter. Returns whether the filter was set.
    pub fn apply(&self, level: Option<&str>) -> Result<bool, LogLevelError> {
        let value = level.unwrap_or(&self.default);
        let filter = EnvFilter::try_new(value).map_err(|e| LogLevelError {
            value: value.to_string(),
            reason: e.to_string(),
        })?;
        if self.from_env {
            return Ok(false);
        }
        (self.set)(filter).map_err(|reason| LogLevelError {
            value: value.to_string(),
            reason,
        })?;
        Ok(true)
    }

    /// SIGHUP: reads the daemon's config at `path` again and applies its log level, then
    /// `live`: what else the daemon applies at once (it returns those keys). The other
    /// top-level keys and sections that differ from `started` (the table the daemon started
    /// with) are named: they take effect at the next start. A config that does not read or
    /// parse changes nothing, and says so.
    pub fn reload<T: DaemonConfig>(
        &self,
        path: &Path,
        started: &toml::Table,
        live: impl FnOnce(&T) -> &'static [&'static str],
    ) {
        let (cfg, table) = match crate::config::load_daemon::<T>(path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(message = "Config not reloaded; the running settings stay.", error = %e);
                return;
            }
        };
        let wanted = cfg.log_level();
        match self.apply(wanted) {
            Ok(true) => {
                tracing::info!(
                    message = "Log level set from the config.",
                    log_level = wanted.unwrap_or(&self.default)
                )
            }
            Ok(false) => {
                tracing::info!("Log level not changed: RUST_LOG sets it (unset it to use the config's log_level).")
            }
            Err(e) => tracing::error!(message = "Log level not changed.", error = %e),
        }
        let applied = live(&cfg);
        let restart: Vec<String> = changed_keys(started, &table)
            .into_iter()
            .filter(|k| !applied.contains(&k.as_str()))
            .collect();
        if !restart.is_empty() {
            tracing::warn!(message = "Config changes that take effect only when the daemon restarts.", keys = %restart.join(", "));
        }
    }
}

/// Top-level keys and sections that differ between two configs, `log_level` left out.
pub fn changed_keys(before: &toml::Table, after: &toml::Table) -> Vec<String> {
    let mut keys: Vec<String> = before
        .keys()
        .chain(after.keys())
        .filter(|k| k.as_str() != "log_level" && before.get(*k) != after.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Lets a warning that may repeat fast (a peer failing its handshake again and again, a listener
/// out of file descriptors) through at most once per period, and says how many it held back:
/// a failing or hostile peer costs a line every few seconds, not thirty a second.
///
/// ```ignore
/// static FAILED: LogLimit = LogLimit::new(Duration::from_secs(10));
/// if let Some(held_back) = FAILED.admit() {
///     tracing::warn!(message = "Handshake failed.", error = %e, held_back);
/// }
/// ```
#[derive(Debug)]
pub struct LogLimit {
    every: std::time::Duration,
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl LogLimit {
    /// At most one line per `every`.
    pub const fn new(every: std::time::Duration) -> Self {
        LogLimit {
            every,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// Whether to log now: `Some(n)` with `n` lines held back since the last one logged.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(std::time::Instant::now())
    }

    /// [`LogLimit::admit`] at `now`.
    pub fn admit_at(&self, now: std::time::Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.0 {
            Some(next) if now < next => {
                s.1 += 1;
                None
            }
            _ => {
                let held = std::mem::take(&mut s.1);
                s.0 = Some(now + self.every);
                Some(held)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(colours(true, false));
        assert!(!colours(false, false), "a file, a pipe or the journal");
        assert!(!colours(true, true));
    }

    #[test]
    fn changed_keys_name_what_needs_a_restart_but_not_the_log_level() {
        let a: toml::Table =
            toml::from_str("name = \"a\"\nlog_level = \"info\"\n[tls]\nca = \"x\"").unwrap();
        let b: toml::Table = toml::from_str(
            "name = \"a\"\nlog_level = \"debug\"\nmax_in_flight = 4\n[tls]\nca = \"y\"",
        )
        .unwrap();
        assert_eq!(changed_keys(&a, &b), vec!["max_in_flight", "tls"]);
        assert!(changed_keys(&a, &a).is_empty());
    }

    #[test]
    fn a_log_level_that_does_not_parse_is_refused_with_what_to_write() {
        let l = Logging {
            set: Box::new(|_| Ok(())),
            from_env: false,
            default: "info".into(),
        };
        let e = l.apply(Some("info,=[")).unwrap_err();
        assert!(e.to_string().contains("info,ferry_agent=debug"), "{e}");
        assert!(l.apply(Some("debug")).unwrap());
        let env = Logging {
            from_env: true,
            ..l
        };
        assert!(!env.apply(Some("debug")).unwrap(), "RUST_LOG wins");
    }

    #[test]
    fn a_repeated_warning_passes_once_per_period_with_the_count_it_held_back() {
        let limit = LogLimit::new(std::time::Duration::from_secs(10));
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        assert_eq!(limit.admit_at(at(0)), Some(0));
        for i in 1..30 {
            assert_eq!(limit.admit_at(at(i * 300)), None, "{i}");
        }
        assert_eq!(limit.admit_at(at(10_000)), Some(29));
        assert_eq!(limit.admit_at(at(19_999)), None);
        assert_eq!(limit.admit_at(at(20_000)), Some(1));
        // After a quiet spell the next one passes at once, nothing held back.
        assert_eq!(limit.admit_at(at(60_000)), Some(0));
    }
}
