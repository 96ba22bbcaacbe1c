//! Logging setup shared by the binaries.

use tracing_subscriber::EnvFilter;

/// Installs a global `tracing` subscriber writing to stderr. `RUST_LOG` overrides `default_filter`.
/// With `json`, one JSON object per line. Calling it twice is harmless (the second call is ignored).
pub fn init(default_filter: &str, json: bool) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
