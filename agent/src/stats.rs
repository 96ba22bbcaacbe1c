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
    /// How long the segments this agent sent took, from the start of the transfer to their
    /// verification (the verified ones only).
    pub segment_seconds: SegmentTimes,
}

/// A histogram of segment durations in seconds: buckets from 10 ms doubling up to ~11 min.
#[derive(Debug)]
pub struct SegmentTimes(pub ferry_common::ops::Histogram);

impl Default for SegmentTimes {
    fn default() -> Self {
        SegmentTimes(ferry_common::ops::Histogram::new(
            ferry_common::ops::exponential_buckets(0.01, 2.0, 17),
        ))
    }
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

/// What a status line reads from the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// [`Stats::bytes_sent`].
    pub sent: u64,
    /// [`Stats::segments_verified`].
    pub verified: u64,
    /// [`Stats::segments_failed`].
    pub failed: u64,
    /// [`Stats::bytes_received`].
    pub received: u64,
    /// [`Stats::segments_committed`].
    pub committed: u64,
    /// [`Stats::segments_refused`].
    pub refused: u64,
}

impl Stats {
    /// The counters a status line shows, now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            sent: Self::get(&self.bytes_sent),
            verified: Self::get(&self.segments_verified),
            failed: Self::get(&self.segments_failed),
            received: Self::get(&self.bytes_received),
            committed: Self::get(&self.segments_committed),
            refused: Self::get(&self.segments_refused),
        }
    }
}

/// The agent's line for `systemctl status` (`STATUS=`): totals, and rates since `before`,
/// `secs` ago.
pub fn status_line(now: Snapshot, before: Snapshot, secs: f64) -> String {
    let rate = |a: u64, b: u64| {
        if secs > 0.0 {
            a.saturating_sub(b) as f64 / secs
        } else {
            0.0
        }
    };
    format!(
        "sent {} ({}/s), {} segments verified, {} failed; received {} ({}/s), {} segments committed, {} refused",
        ferry_common::text::bytes(now.sent as f64),
        ferry_common::text::bytes(rate(now.sent, before.sent)),
        now.verified,
        now.failed,
        ferry_common::text::bytes(now.received as f64),
        ferry_common::text::bytes(rate(now.received, before.received)),
        now.committed,
        now.refused
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_shows_totals_and_rates() {
        let before = Snapshot {
            sent: 1_000_000_000,
            ..Snapshot::default()
        };
        let now = Snapshot {
            sent: 1_200_000_000,
            verified: 12,
            received: 512,
            committed: 1,
            ..Snapshot::default()
        };
        assert_eq!(
            status_line(now, before, 5.0),
            "sent 1.2 GB (40 MB/s), 12 segments verified, 0 failed; received 512 B (102 B/s), 1 segments committed, 0 refused"
        );
        assert!(status_line(now, now, 0.0).contains("(0 B/s)"));
    }
}
