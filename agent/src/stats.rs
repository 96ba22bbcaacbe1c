//! Counters an agent keeps about its own work (read by tests, the quick start and logs).

use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic counters. Relaxed ordering: they are statistics, not synchronisation.
#[derive(Debug, Default)]
pub struct Stats {
    /// File bytes this agent sent as a source (every attempt, including failed ones).
    pub bytes_sent: AtomicU64,
    /// Bytes in the holes of sparse files this agent sent as a source, which did not cross the
    /// wire (every attempt, like `bytes_sent`).
    pub hole_bytes: AtomicU64,
    /// Segments whose transfer this agent completed as a source and the coordinator verified.
    pub segments_verified: AtomicU64,
    /// Segment transfers that failed at this source.
    pub segments_failed: AtomicU64,
    /// File bytes this agent received and made durable as a target.
    pub bytes_received: AtomicU64,
    /// Segments this agent committed as a target.
    pub segments_committed: AtomicU64,
    /// Segments this agent refused as a target (stale lease, wrong peer, bad path, hash mismatch).
    pub segments_refused: AtomicU64,
    /// The largest congestion window (bytes allowed in flight) seen on a data connection as a
    /// source, sampled as each segment's last byte is handed to QUIC.
    pub peak_window: AtomicU64,
}

impl Stats {
    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Raises a peak to `n` if it is higher.
    pub fn peak(c: &AtomicU64, n: u64) {
        c.fetch_max(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}
