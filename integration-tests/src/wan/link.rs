//! The impairment model of one direction of an emulated path, with no I/O and no clock of its
//! own: given a packet's arrival time and size it says whether the packet is lost and, if not,
//! when it leaves. Deterministic for a seed, so its behaviour is unit-tested exactly.
//!
//! In order: random loss (the line drops a fraction of packets), then the rate cap (a FIFO
//! serialised at `rate_bps` whose backlog is bounded by `queue_bytes`; a packet that does not fit
//! is tail-dropped, as a router does), then the one-way delay with jitter. Packets never overtake
//! each other (jitter does not reorder), like netem with a rate set.

use std::time::{Duration, Instant};

/// How one direction of the path is impaired.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    /// One-way delay.
    pub delay: Duration,
    /// Each packet's delay is `delay` plus a uniform value in `[-jitter, +jitter]`.
    pub jitter: Duration,
    /// Probability that a packet is lost (0.0–1.0).
    pub loss: f64,
    /// Rate cap in bits per second of IP packets (`None`: unlimited).
    pub rate_bps: Option<u64>,
    /// Most bytes waiting for the rate cap before packets are dropped.
    pub queue_bytes: u64,
}

/// What became of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Lost on the line.
    Lost,
    /// Dropped: the rate cap's queue was full.
    QueueFull,
    /// Delivered at this time.
    Deliver(Instant),
}

/// Counters of one direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LinkStats {
    /// Packets offered.
    pub packets: u64,
    /// Bytes offered.
    pub bytes: u64,
    /// Lost on the line.
    pub lost: u64,
    /// Dropped at the full queue.
    pub queue_drops: u64,
}

/// One direction of the path.
#[derive(Debug)]
pub struct Link {
    imp: Impairment,
    rng: SplitMix64,
    /// When the rate cap's serialiser is free again.
    next_free: Option<Instant>,
    last_release: Option<Instant>,
    /// Counters.
    pub stats: LinkStats,
}

impl Link {
    /// A link with `imp`, its random draws seeded by `seed`.
    pub fn new(imp: Impairment, seed: u64) -> Self {
        Link {
            imp,
            rng: SplitMix64(seed),
            next_free: None,
            last_release: None,
            stats: LinkStats::default(),
        }
    }

    /// Decides the fate of a packet of `len` bytes arriving at `now`.
    pub fn admit(&mut self, now: Instant, len: usize) -> Fate {
        self.stats.packets += 1;
        self.stats.bytes += len as u64;
        if self.imp.loss > 0.0 && self.rng.next_f64() < self.imp.loss {
            self.stats.lost += 1;
            return Fate::Lost;
        }
        let depart = match self.imp.rate_bps {
            None => now,
            Some(rate) => {
                let start = self.next_free.filter(|t| *t > now).unwrap_or(now);
                let waiting = start - now;
                let backlog = (waiting.as_secs_f64() * rate as f64 / 8.0) as u64;
                if backlog + len as u64 > self.imp.queue_bytes {
                    self.stats.queue_drops += 1;
                    return Fate::QueueFull;
                }
                let tx = Duration::from_secs_f64(len as f64 * 8.0 / rate as f64);
                self.next_free = Some(start + tx);
                start + tx
            }
        };
        let mut release = depart + self.imp.delay;
        if !self.imp.jitter.is_zero() {
            let j = self.imp.jitter.as_secs_f64() * (2.0 * self.rng.next_f64() - 1.0);
            release = if j >= 0.0 {
                release + Duration::from_secs_f64(j)
            } else {
                release
                    .checked_sub(Duration::from_secs_f64(-j))
                    .unwrap_or(release)
                    .max(depart)
            };
        }
        if let Some(last) = self.last_release {
            release = release.max(last);
        }
        self.last_release = Some(release);
        Fate::Deliver(release)
    }
}

/// A small, fast, seedable generator for loss and jitter draws (not for anything secret).
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imp() -> Impairment {
        Impairment {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            rate_bps: None,
            queue_bytes: 0,
        }
    }

    #[test]
    fn delay_only_delivers_everything_after_the_delay() {
        let t0 = Instant::now();
        let mut l = Link::new(
            Impairment {
                delay: Duration::from_millis(75),
                ..imp()
            },
            1,
        );
        for i in 0..100 {
            let now = t0 + Duration::from_micros(i * 10);
            assert_eq!(
                l.admit(now, 1500),
                Fate::Deliver(now + Duration::from_millis(75))
            );
        }
    }

    #[test]
    fn loss_rate_matches_the_probability() {
        let t0 = Instant::now();
        let mut l = Link::new(
            Impairment {
                loss: 0.01,
                ..imp()
            },
            7,
        );
        for _ in 0..1_000_000 {
            l.admit(t0, 100);
        }
        // Binomial(1e6, 0.01): sd ~ 99.5; 5 sd either side.
        assert!((9_500..=10_500).contains(&l.stats.lost), "{:?}", l.stats);
    }

    #[test]
    fn rate_cap_serialises_and_bounds_the_queue() {
        let t0 = Instant::now();
        // 8 Mbit/s = 1 byte/us; queue of 10 packets of 1000 bytes.
        let mut l = Link::new(
            Impairment {
                rate_bps: Some(8_000_000),
                queue_bytes: 10_000,
                ..imp()
            },
            1,
        );
        // A burst of 20 packets at once: 10 fit (the first is serialised at once, the queue holds
        // the next ones up to 10,000 bytes of backlog), the rest are dropped.
        let fates: Vec<Fate> = (0..20).map(|_| l.admit(t0, 1000)).collect();
        let delivered: Vec<Instant> = fates
            .iter()
            .filter_map(|f| match f {
                Fate::Deliver(t) => Some(*t),
                _ => None,
            })
            .collect();
        assert_eq!(delivered.len(), 10, "{fates:?}");
        for (i, t) in delivered.iter().enumerate() {
            assert_eq!(*t - t0, Duration::from_micros(1000 * (i as u64 + 1)));
        }
        assert_eq!(l.stats.queue_drops, 10);
        // Once drained, packets pass at the line rate again.
        let later = t0 + Duration::from_millis(50);
        assert_eq!(
            l.admit(later, 1000),
            Fate::Deliver(later + Duration::from_micros(1000))
        );
    }

    #[test]
    fn a_paced_sender_below_the_cap_loses_nothing() {
        let t0 = Instant::now();
        let mut l = Link::new(
            Impairment {
                rate_bps: Some(8_000_000),
                queue_bytes: 3_000,
                ..imp()
            },
            1,
        );
        // 1000-byte packets every 1.25 ms = 6.4 Mbit/s.
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_micros(1250 * i);
            assert!(matches!(l.admit(now, 1000), Fate::Deliver(_)));
        }
    }

    #[test]
    fn jitter_stays_in_bounds_and_never_reorders() {
        let t0 = Instant::now();
        let mut l = Link::new(
            Impairment {
                delay: Duration::from_millis(20),
                jitter: Duration::from_millis(5),
                ..imp()
            },
            3,
        );
        let mut last = t0;
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_micros(100 * i);
            let Fate::Deliver(t) = l.admit(now, 100) else {
                panic!()
            };
            assert!(t >= last, "reordered");
            assert!(t - now >= Duration::from_millis(15));
            // Order is kept, so a packet may wait for the one before it (at most 5 ms more).
            assert!(t - now <= Duration::from_millis(30));
            last = t;
        }
    }
}
