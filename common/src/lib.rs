//! Pieces shared by every ferry binary. This crate does no network I/O and reads no clock: it names
//! things (agents, paths, segments), plans segments, and builds TLS material from files.

pub mod config;
pub mod hash;
pub mod names;
pub mod path;
pub mod pki;
pub mod segment;
pub mod telemetry;
pub mod tls;
pub mod wire;

/// Default segment size: large enough to amortise per-segment round trips on a WAN, small enough that
/// a lost lease resends little.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 * 1024 * 1024;
