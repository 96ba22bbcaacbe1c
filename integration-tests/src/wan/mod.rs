//! A user-space WAN emulator (the kernel here has no netem): two network namespaces joined by
//! TUN devices and a forwarder that delays, jitters, drops and rate-limits the IP packets between
//! them. Everything a tool sends from one namespace to the other crosses the emulated path, TCP
//! and QUIC alike.
//!
//! - [`link`]: the impairment model (pure, unit-tested).
//! - [`path`]: namespaces, TUN devices and forwarding threads.
//! - [`sys`]: the two raw system calls (TUN, setns).

pub mod link;
pub mod path;
pub mod sys;

use std::time::Duration;

pub use link::{Fate, Impairment, Link, LinkStats};
pub use path::WanPath;

/// A named path profile: round-trip time, loss per direction, optional rate cap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    /// Its name.
    pub name: &'static str,
    /// Round-trip time added (split evenly between the directions).
    pub rtt: Duration,
    /// Jitter of each direction's delay (uniform, ±).
    pub jitter: Duration,
    /// Packet loss probability, each direction.
    pub loss: f64,
    /// Rate cap each direction, bits per second.
    pub rate_bps: Option<u64>,
}

/// The profiles the benchmarks use.
pub const PROFILES: [Profile; 4] = [
    Profile {
        name: "lan",
        rtt: Duration::ZERO,
        jitter: Duration::ZERO,
        loss: 0.0,
        rate_bps: None,
    },
    Profile {
        name: "metro",
        rtt: Duration::from_millis(5),
        jitter: Duration::ZERO,
        loss: 0.0,
        rate_bps: None,
    },
    Profile {
        name: "continental",
        rtt: Duration::from_millis(40),
        jitter: Duration::ZERO,
        loss: 0.001,
        rate_bps: None,
    },
    Profile {
        name: "intercontinental",
        rtt: Duration::from_millis(150),
        jitter: Duration::ZERO,
        loss: 0.01,
        rate_bps: None,
    },
];

impl Profile {
    /// The profile called `name`.
    pub fn named(name: &str) -> Result<Profile, String> {
        PROFILES
            .iter()
            .find(|p| p.name == name)
            .copied()
            .ok_or_else(|| {
                let names: Vec<_> = PROFILES.iter().map(|p| p.name).collect();
                format!("unknown profile {name:?}; one of {}", names.join(", "))
            })
    }

    /// The same profile with a rate cap.
    pub fn with_rate(mut self, rate_bps: Option<u64>) -> Profile {
        self.rate_bps = rate_bps;
        self
    }

    /// The impairment of each direction. The rate cap's queue holds one bandwidth-delay product
    /// (at least 20 ms and 128 KiB worth), like a reasonably sized router buffer.
    pub fn impairment(&self) -> Impairment {
        let queue_bytes = match self.rate_bps {
            Some(r) => {
                let bdp = r as f64 / 8.0 * self.rtt.max(Duration::from_millis(20)).as_secs_f64();
                (bdp as u64).max(128 * 1024)
            }
            None => 0,
        };
        Impairment {
            delay: self.rtt / 2,
            jitter: self.jitter,
            loss: self.loss,
            rate_bps: self.rate_bps,
            queue_bytes,
        }
    }

    /// One line describing it.
    pub fn describe(&self) -> String {
        let rate = match self.rate_bps {
            Some(r) => format!("{} Mbit/s cap", r / 1_000_000),
            None => "no rate cap".into(),
        };
        format!(
            "{}: RTT {} ms, jitter ±{} ms, loss {}% each way, {rate}",
            self.name,
            self.rtt.as_millis(),
            self.jitter.as_millis(),
            self.loss * 100.0
        )
    }
}

/// Parses a rate such as `1gbit`, `200mbit`, `500kbit` or a number of bits per second.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    s.parse::<ferry_common::rate::Rate>()
        .map(|r| r.0)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_and_rates_parse() {
        let p = Profile::named("intercontinental").unwrap();
        assert_eq!(p.impairment().delay, Duration::from_millis(75));
        assert!(Profile::named("moon").unwrap_err().contains("lan"));
        assert_eq!(parse_rate("1gbit").unwrap(), 1_000_000_000);
        assert_eq!(parse_rate("2.5mbit").unwrap(), 2_500_000);
        assert!(parse_rate("fast").is_err());
        let capped = p.with_rate(Some(100_000_000)).impairment();
        // 100 Mbit/s x 150 ms = 1.875 MB.
        assert_eq!(capped.queue_bytes, 1_875_000);
    }
}
