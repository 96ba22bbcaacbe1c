//! The one retry policy of ferry's clients: exponential backoff with jitter and a cap (backon).
//!
//! Every call that may fail for a while (a coordinator electing a leader, an agent not yet
//! registered) is retried with it: awaited (`backon::Retryable::retry(policy(..))`), or, in loops
//! that must not block on the wait, through [`Backoff`], which takes the time as an argument.

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};

/// Exponential backoff from `min`, doubling up to `max`, with jitter (each delay gets up to one
/// more of itself at random, so clients that failed together do not come back together), and no
/// limit on the number of tries: bound it with [`policy_for`] or the caller's own condition.
pub fn policy(min: Duration, max: Duration) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
}

/// [`policy`], giving up once the delays slept add up to `total`.
pub fn policy_for(min: Duration, max: Duration, total: Duration) -> ExponentialBuilder {
    policy(min, max).with_total_delay(Some(total))
}

/// When to try a failing call again, for loops that tick on instead of sleeping: [`policy`]'s
/// delays, reset by a success. Pure: the time is an argument.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: Option<backon::ExponentialBackoff>,
    max: Duration,
    next_at: Option<Instant>,
}

impl Backoff {
    /// Delays from `min` up to `max` (plus jitter).
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            builder: policy(min, max),
            delays: None,
            max,
            next_at: None,
        }
    }

    /// Whether the last failure's delay has not passed at `now`.
    pub fn waiting(&self, now: Instant) -> bool {
        self.next_at.is_some_and(|t| now < t)
    }

    /// Records a failure at `now`; returns whether it is the first since the last success, and
    /// how long to wait before the next try.
    pub fn failed(&mut self, now: Instant) -> (bool, Duration) {
        let first = self.delays.is_none();
        let delay = self
            .delays
            .get_or_insert_with(|| self.builder.build())
            .next()
            .unwrap_or(self.max);
        self.next_at = Some(now + delay);
        (first, delay)
    }

    /// Records a success: the next failure starts from the shortest delay again.
    pub fn succeeded(&mut self) {
        self.delays = None;
        self.next_at = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_grows_to_its_cap_and_a_success_resets_it() {
        let now = Instant::now();
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        assert!(!b.waiting(now));
        let (first, d1) = b.failed(now);
        assert!(first && d1 <= Duration::from_millis(200), "{d1:?}");
        assert!(b.waiting(now));
        assert!(!b.waiting(now + d1), "the delay has passed");
        let mut last = d1;
        for _ in 0..10 {
            let (first, d) = b.failed(now);
            assert!(!first);
            // Jitter adds up to one delay: never more than twice the cap.
            assert!(d <= Duration::from_secs(4), "{d:?}");
            last = d;
        }
        assert!(last >= Duration::from_secs(2), "grew to the cap: {last:?}");
        b.succeeded();
        assert!(!b.waiting(now));
        assert!(b.failed(now).0, "a success starts over");
    }

    #[test]
    fn a_bounded_policy_stops_after_its_total_delay() {
        let total: Duration = policy_for(
            Duration::from_millis(100),
            Duration::from_secs(1),
            Duration::from_secs(5),
        )
        .build()
        .sum();
        assert!(total <= Duration::from_secs(5), "{total:?}");
        assert!(total >= Duration::from_secs(3), "{total:?}");
    }
}
