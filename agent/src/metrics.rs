//! What an agent's `/metrics` shows (see [`ferry_common::ops`]): its [`Stats`] and the path
//! figures of its open data connections, read at each scrape.

use std::sync::Arc;

use ferry_common::ops::{self, Collector, Encoder};

use crate::dial::Connections;
use crate::stats::Stats;

/// The agent's collector.
#[derive(Debug)]
pub struct AgentMetrics {
    /// The agent's counters.
    pub stats: Arc<Stats>,
    /// Its data connections as a source.
    pub connections: Connections,
}

impl Collector for AgentMetrics {
    fn encode(&self, mut enc: Encoder) -> std::fmt::Result {
        let s = &self.stats;
        let get = Stats::get;
        let e = &mut enc;
        ops::counter(
            e,
            "ferry_bytes_sent",
            "File bytes this agent sent as a source, every attempt included.",
            get(&s.bytes_sent),
        )?;
        ops::counter(
            e,
            "ferry_hole_bytes_skipped",
            "Bytes in holes of sparse files this agent sent as a source without putting them on the wire.",
            get(&s.hole_bytes),
        )?;
        ops::counter(
            e,
            "ferry_bytes_received",
            "File bytes this agent received and made durable as a target.",
            get(&s.bytes_received),
        )?;
        let outcome = |o: &str| vec![("outcome", o.to_string())];
        ops::counters(
            e,
            "ferry_segments_sent",
            "Segments this agent sent as a source, by outcome (verified by the coordinator, or failed).",
            [
                (outcome("verified"), get(&s.segments_verified)),
                (outcome("failed"), get(&s.segments_failed)),
            ],
        )?;
        ops::counters(
            e,
            "ferry_segments_received",
            "Segments this agent received as a target, by outcome (committed durably, or refused).",
            [
                (outcome("committed"), get(&s.segments_committed)),
                (outcome("refused"), get(&s.segments_refused)),
            ],
        )?;
        ops::histogram(
            e,
            "ferry_segment_seconds",
            "Time from the start of a segment's transfer to its verification, as its source saw it.",
            &s.segment_seconds.0,
        )?;
        ops::gauge(
            e,
            "ferry_congestion_window_peak_bytes",
            "The largest congestion window seen on this agent's data connections as a source.",
            get(&s.peak_window) as f64,
        )?;
        let paths = self.connections.paths();
        let peer = |name: &str| vec![("peer", name.to_string())];
        ops::gauges(
            e,
            "ferry_peer_rtt_seconds",
            "Smoothed round-trip time of the data connection to each target agent.",
            paths
                .iter()
                .map(|(n, st)| (peer(n), st.path.rtt.as_secs_f64())),
        )?;
        ops::gauges(
            e,
            "ferry_congestion_window_bytes",
            "Congestion window (bytes allowed in flight) of the data connection to each target agent.",
            paths.iter().map(|(n, st)| (peer(n), st.path.cwnd as f64)),
        )?;
        ops::counters(
            e,
            "ferry_peer_lost_packets",
            "Packets lost on the data connection to each target agent (since it opened).",
            paths.iter().map(|(n, st)| (peer(n), st.path.lost_packets)),
        )?;
        ops::counters(
            e,
            "ferry_peer_congestion_events",
            "Congestion events on the data connection to each target agent (since it opened).",
            paths
                .iter()
                .map(|(n, st)| (peer(n), st.path.congestion_events)),
        )
    }
}
