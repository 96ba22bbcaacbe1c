//! Pieces shared by every ferry binary: names, paths, the segment planner, config and PKI files,
//! TLS configurations, logging and systemd notifications. It opens no network connection and
//! decides nothing from the clock.

pub mod config;
pub mod exclude;
pub mod hash;
pub mod ids;
pub mod names;
pub mod path;
pub mod pki;
pub mod segment;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod wire;

/// Default segment size: large enough to amortise per-segment round trips on a WAN, small enough that
/// a lost lease resends little.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 * 1024 * 1024;
