//! Pieces shared by every ferry binary: names, paths, excludes, ids, config and PKI files, TLS
//! configurations, logging and systemd notifications. It depends on no other ferry crate, opens no
//! network connection and decides nothing from the clock.

pub mod config;
pub mod enrol;
pub mod exclude;
pub mod hash;
pub mod ids;
pub mod names;
pub mod ops;
pub mod path;
pub mod pki;
pub mod rate;
pub mod renewal;
pub mod retry;
pub mod systemd;
pub mod telemetry;
pub mod text;
pub mod throttle;
pub mod tls;
pub mod transport;

/// Most entries in one bundle segment: bounds the header a target must hold in memory, and the
/// file count the coordinator accepts for one segment.
pub const MAX_BUNDLE_ENTRIES: usize = 16 * 1024;

/// Default segment size: large enough to amortise per-segment round trips on a WAN, small enough that
/// a lost lease resends little.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 * 1024 * 1024;

/// A fault point: a durable or externally visible boundary where a crash matters (issue 17's
/// crash matrix). In a crate built with its `failpoints` feature (which depends on the `fail`
/// crate), `FAILPOINTS="<name>=return"` in the environment makes the process abort here, as a
/// crash would stop it; without the feature (release builds) it is nothing. Every point is
/// listed in `docs/reliability.md`.
#[macro_export]
macro_rules! fault_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        if fail::eval($name, |_| ()).is_some() {
            eprintln!("fault point {} reached: aborting", $name);
            std::process::abort();
        }
    };
}
