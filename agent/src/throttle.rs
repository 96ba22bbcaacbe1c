//! What a source may send per second: token buckets (governor's GCRA) for the limits in force.
//!
//! Two scopes limit a source: the agent's own throttle and each migration's (both set with
//! `ferryctl ... throttle`, kept in Raft and learnt from heartbeats, so a change applies within
//! a second, without a restart). A byte is sent only when every bucket in force for it has
//! room. A throttle may be a time-of-day schedule: the rate in force is evaluated again before
//! every chunk, and a bucket is replaced when its rate changes.
//!
//! Buckets count cells of [`CELL`] bytes and hold at most [`BURST_TIME`] of their rate (between
//! 16 KiB and 1 MiB), so over any span a scope sends at most its rate times the span plus one
//! burst. The clock is tokio's: tests run it paused.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::ops::Add;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_common::rate::Rate;
use ferry_common::throttle::Throttle;
use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// Bytes per cell of a bucket.
pub const CELL: u64 = 1024;
/// A bucket holds this much of its rate.
pub const BURST_TIME: Duration = Duration::from_millis(50);
const MIN_BURST_CELLS: u64 = 16;
const MAX_BURST_CELLS: u64 = 1024;

/// What a throttle applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Everything this agent sends.
    Agent,
    /// One migration's segments.
    Migration(u64),
}

/// An instant of tokio's clock, as governor measures time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tick(tokio::time::Instant);

impl Add<Nanos> for Tick {
    type Output = Tick;
    fn add(self, n: Nanos) -> Tick {
        Tick(self.0 + Duration::from(n))
    }
}

impl Reference for Tick {
    fn duration_since(&self, earlier: Self) -> Nanos {
        self.0.saturating_duration_since(earlier.0).into()
    }
    fn saturating_sub(&self, d: Nanos) -> Self {
        Tick(self.0.checked_sub(d.into()).unwrap_or(self.0))
    }
}

/// tokio's clock (paused in tests, real otherwise).
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    type Instant = Tick;
    fn now(&self) -> Tick {
        Tick(tokio::time::Instant::now())
    }
}

/// One token bucket at one rate.
pub struct Bucket {
    rate: Rate,
    burst_cells: u32,
    /// Bytes taken but not charged yet, less than one cell (small files are not each rounded
    /// up to a whole cell).
    uncharged: Mutex<u64>,
    limiter: RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Tick>>,
}

impl Bucket {
    /// A full bucket for `rate`.
    pub fn new(rate: Rate) -> Self {
        let bytes_per_sec = rate.bytes_per_sec();
        let burst =
            (bytes_per_sec as u128 * BURST_TIME.as_nanos() / 1_000_000_000 / CELL as u128) as u64;
        let burst_cells = burst.clamp(MIN_BURST_CELLS, MAX_BURST_CELLS) as u32;
        // One cell every CELL / rate seconds, to the nanosecond (at least 1 ns).
        let period = (u128::from(CELL) * 1_000_000_000 / u128::from(bytes_per_sec)).max(1);
        let quota = Quota::with_period(Duration::from_nanos(period as u64))
            .expect("period is at least 1 ns")
            .allow_burst(NonZeroU32::new(burst_cells).expect("at least 16 cells"));
        Bucket {
            rate,
            burst_cells,
            uncharged: Mutex::new(0),
            limiter: RateLimiter::direct_with_clock(quota, TokioClock),
        }
    }

    /// The most bytes the bucket holds.
    pub fn burst_bytes(&self) -> u64 {
        u64::from(self.burst_cells) * CELL
    }

    /// The most bytes one `take` asks for: half the bucket, so that the time a sleep
    /// overshoots (tokio's timers have millisecond steps) accrues in the other half instead
    /// of being lost to a full bucket.
    fn chunk_bytes(&self) -> u64 {
        u64::from(self.burst_cells / 2) * CELL
    }

    /// Waits until `bytes` (at most [`Bucket::chunk_bytes`]) may be sent, and takes them: the
    /// whole cells among them and those left over from earlier takes.
    async fn take(&self, bytes: u64) {
        let cells = {
            let mut uncharged = self.uncharged.lock().expect("not poisoned");
            let total = *uncharged + bytes;
            *uncharged = total % CELL;
            total / CELL
        };
        let Some(n) = NonZeroU32::new(cells.min(u64::from(self.burst_cells)) as u32) else {
            return;
        };
        loop {
            match self.limiter.check_n(n) {
                Ok(Ok(())) | Err(_) => return,
                Ok(Err(not_until)) => {
                    tokio::time::sleep(not_until.wait_time_from(TokioClock.now())).await
                }
            }
        }
    }
}

struct Slot {
    /// The throttle as the coordinator sent it (a new text is parsed again).
    text: String,
    throttle: Throttle,
    bucket: Option<Arc<Bucket>>,
}

/// The throttles of one source agent.
#[derive(Default)]
pub struct Throttles {
    slots: Mutex<HashMap<Scope, Slot>>,
    /// The last text per scope that did not parse (it is reported once, not every heartbeat).
    rejected: Mutex<HashMap<Scope, String>>,
}

impl Throttles {
    /// Sets `scope`'s throttle from its text (empty or `off`: none). A text that does not parse
    /// leaves the previous throttle in force and is returned as an error to log (once: the same
    /// text again is ignored). Setting the text it already has changes nothing (the bucket
    /// keeps its state).
    pub fn set(
        &self,
        scope: Scope,
        text: &str,
    ) -> Result<(), ferry_common::throttle::ThrottleError> {
        let mut slots = self.slots.lock().expect("not poisoned");
        if slots.get(&scope).is_some_and(|s| s.text == text) {
            return Ok(());
        }
        let mut rejected = self.rejected.lock().expect("not poisoned");
        if rejected.get(&scope).is_some_and(|r| r == text) {
            return Ok(());
        }
        let throttle: Throttle = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                rejected.insert(scope, text.to_string());
                return Err(e);
            }
        };
        rejected.remove(&scope);
        if throttle.is_off() {
            slots.remove(&scope);
            return Ok(());
        }
        let bucket = slots.remove(&scope).and_then(|s| s.bucket);
        slots.insert(
            scope,
            Slot {
                text: text.to_string(),
                throttle,
                bucket,
            },
        );
        Ok(())
    }

    /// Drops a migration's throttle (it finished or is no longer this agent's).
    pub fn forget(&self, migration: u64) {
        self.slots
            .lock()
            .expect("not poisoned")
            .remove(&Scope::Migration(migration));
    }

    /// The rate in force for `scope` at `secs` after midnight UTC (`None`: no limit).
    pub fn rate_at(&self, scope: Scope, secs: u64) -> Option<Rate> {
        let slots = self.slots.lock().expect("not poisoned");
        slots.get(&scope).and_then(|s| s.throttle.rate_at(secs))
    }

    /// The buckets a byte of `migration` passes at `secs` after midnight UTC, made (or made
    /// again, at a new rate) as the throttles in force say.
    fn buckets(&self, migration: u64, secs: u64) -> Vec<Arc<Bucket>> {
        let mut slots = self.slots.lock().expect("not poisoned");
        let mut out = Vec::new();
        for scope in [Scope::Agent, Scope::Migration(migration)] {
            let Some(slot) = slots.get_mut(&scope) else {
                continue;
            };
            match slot.throttle.rate_at(secs) {
                None => slot.bucket = None,
                Some(rate) => {
                    let bucket = match &slot.bucket {
                        Some(b) if b.rate == rate => b.clone(),
                        _ => {
                            let b = Arc::new(Bucket::new(rate));
                            slot.bucket = Some(b.clone());
                            b
                        }
                    };
                    out.push(bucket);
                }
            }
        }
        out
    }

    /// Waits until `bytes` of `migration` may be sent under every throttle in force, and takes
    /// them. Throttles are looked at again before each chunk of at most one burst, so a change
    /// (a new limit, a schedule's next window) applies to the rest.
    pub async fn take(&self, migration: u64, bytes: u64) {
        // No throttle at all (the usual case): no clock read, no bucket.
        if self.slots.lock().expect("not poisoned").is_empty() {
            return;
        }
        let mut left = bytes;
        while left > 0 {
            let secs = ferry_common::throttle::secs_of_day_utc(std::time::SystemTime::now());
            let buckets = self.buckets(migration, secs);
            let Some(most) = buckets.iter().map(|b| b.chunk_bytes()).min() else {
                return;
            };
            let chunk = left.min(most);
            for b in &buckets {
                b.take(chunk).await;
            }
            left -= chunk;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    /// Takes `total` bytes in `piece`-byte calls; returns the (virtual) time it took.
    async fn send(t: &Throttles, migration: u64, total: u64, piece: u64) -> Duration {
        let start = Instant::now();
        let mut sent = 0;
        while sent < total {
            let n = piece.min(total - sent);
            t.take(migration, n).await;
            sent += n;
        }
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_migration_limit_paces_its_bytes_to_the_rate_and_no_faster() {
        let t = Throttles::default();
        t.set(Scope::Migration(1), "8mbit").unwrap(); // 1 MB/s
        let burst = Bucket::new(Rate(8_000_000)).burst_bytes();
        assert_eq!(burst, 48 * CELL, "50 ms of 1 MB/s, in whole cells");
        let took = send(&t, 1, 10_000_000, 1 << 20).await;
        // 10 MB at 1 MB/s, less what the full bucket let through at once.
        let least = Duration::from_secs_f64((10_000_000 - burst) as f64 / 1e6);
        assert!(took >= least, "{took:?} < {least:?}");
        assert!(took <= least + Duration::from_millis(20), "{took:?}");
        // Another migration is not limited by it.
        assert_eq!(send(&t, 2, 10_000_000, 1 << 20).await, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn small_files_are_charged_their_bytes_not_a_cell_each() {
        let t = Throttles::default();
        t.set(Scope::Agent, "8mbit").unwrap(); // 1 MB/s
        let took = send(&t, 1, 2_000_000, 100).await.as_secs_f64();
        assert!((1.9..=2.0).contains(&took), "{took}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_agent_limit_applies_to_every_migration_and_the_lower_limit_binds() {
        let t = Throttles::default();
        t.set(Scope::Agent, "16mbit").unwrap(); // 2 MB/s
        t.set(Scope::Migration(1), "80mbit").unwrap();
        let took = send(&t, 1, 4_000_000, 65_536).await;
        let secs = took.as_secs_f64();
        assert!((1.9..=2.01).contains(&secs), "{secs}");
        let took = send(&t, 7, 4_000_000, 65_536).await;
        assert!((1.9..=2.01).contains(&took.as_secs_f64()), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_limit_applies_to_the_rest_of_a_transfer_and_off_lifts_it() {
        let t = Arc::new(Throttles::default());
        t.set(Scope::Migration(1), "8mbit").unwrap();
        let sender = {
            let t = t.clone();
            tokio::spawn(async move { send(&t, 1, 3_000_000, 100_000).await })
        };
        tokio::time::sleep(Duration::from_millis(1000)).await;
        // About 1 MB went at 1 MB/s; the other 2 MB go at 4 MB/s.
        t.set(Scope::Migration(1), "32mbit").unwrap();
        let took = sender.await.unwrap().as_secs_f64();
        assert!((1.4..=1.6).contains(&took), "{took}");
        assert_eq!(t.rate_at(Scope::Migration(1), 0), Some(Rate(32_000_000)));

        t.set(Scope::Migration(1), "off").unwrap();
        assert_eq!(t.rate_at(Scope::Migration(1), 0), None);
        assert_eq!(send(&t, 1, 50_000_000, 1 << 20).await, Duration::ZERO);
        // A throttle that does not parse leaves the one in force.
        t.set(Scope::Migration(1), "8mbit").unwrap();
        assert!(t.set(Scope::Migration(1), "fast").is_err());
        assert!(t.set(Scope::Migration(1), "fast").is_ok(), "said once");
        assert_eq!(t.rate_at(Scope::Migration(1), 0), Some(Rate(8_000_000)));
        t.forget(1);
        assert_eq!(t.rate_at(Scope::Migration(1), 0), None);
    }

    #[test]
    fn a_schedule_switches_buckets_with_the_time_of_day() {
        let t = Throttles::default();
        t.set(Scope::Migration(1), "09:00-18:00 100mbit, else off")
            .unwrap();
        assert!(t.buckets(1, 8 * 3600).is_empty());
        let day = t.buckets(1, 10 * 3600);
        assert_eq!(day.len(), 1);
        assert_eq!(day[0].rate, Rate(100_000_000));
        // The same window keeps its bucket (and what it has taken).
        assert!(Arc::ptr_eq(&day[0], &t.buckets(1, 11 * 3600)[0]));
        assert!(t.buckets(1, 19 * 3600).is_empty());
    }
}
