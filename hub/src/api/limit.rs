//! The API's rate limit: a token bucket per caller (the authenticated
//! subject), so one script that loops cannot starve the other operators.
//!
//! Why governor with a clock of ours: its GCRA is a token bucket in one
//! word per key, and its clock reads `crate::clock`, the hub's one
//! reading of the monotonic clock. The map of buckets is bounded: past
//! [`MAX_CALLERS`] keys, buckets that are full again are forgotten (they
//! carry no state worth keeping), so a stream of distinct subjects cannot
//! grow it without end.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::{Quota, RateLimiter};

use crate::api::problem::Problem;

/// How many callers' buckets are kept before full ones are dropped.
pub const MAX_CALLERS: usize = 10_000;

/// The hub's monotonic clock, for governor.
#[derive(Debug, Clone, Copy, Default)]
pub struct HubClock;

impl Clock for HubClock {
    type Instant = Instant;

    fn now(&self) -> Instant {
        crate::clock::now()
    }
}

type Keyed = RateLimiter<
    String,
    governor::state::keyed::HashMapStateStore<String>,
    HubClock,
    governor::middleware::NoOpMiddleware<Instant>,
>;

/// A token bucket per caller.
pub struct Limiter {
    buckets: Keyed,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("callers", &self.buckets.len())
            .finish()
    }
}

impl Limiter {
    /// `rate` requests a second per caller, `burst` at once.
    pub fn new(rate: u32, burst: u32) -> Limiter {
        let one = NonZeroU32::MIN;
        let quota = Quota::per_second(NonZeroU32::new(rate).unwrap_or(one))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(one));
        Limiter {
            buckets: RateLimiter::hashmap_with_clock(quota, HubClock),
        }
    }

    /// Takes one token from `subject`'s bucket, or says how long to wait
    /// (a 429 problem).
    pub fn check(&self, subject: &str) -> Result<(), Problem> {
        if self.buckets.len() >= MAX_CALLERS {
            self.buckets.retain_recent();
        }
        match self.buckets.check_key(&subject.to_owned()) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(HubClock.now());
                Err(Problem::too_many(wait.max(Duration::from_millis(1))))
            }
        }
    }

    /// Callers with a bucket.
    pub fn callers(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_over_its_burst_is_refused_and_others_are_not() {
        let l = Limiter::new(1, 3);
        for _ in 0..3 {
            l.check("alice").expect("within the burst");
        }
        let p = l.check("alice").expect_err("over the burst");
        assert_eq!(p.status, 429);
        assert!(p
            .headers
            .iter()
            .any(|(k, _)| k == http::header::RETRY_AFTER));
        l.check("bob").expect("another caller has its own bucket");
    }

    #[test]
    fn the_map_of_buckets_stays_bounded() {
        let l = Limiter::new(1_000_000, 1);
        for i in 0..(MAX_CALLERS + 500) {
            l.check(&format!("caller-{i}")).expect("first request");
        }
        // A bucket refills in a microsecond: past the bound, full ones go.
        std::thread::sleep(Duration::from_millis(5));
        l.check("one-more").expect("allowed");
        assert!(l.callers() <= MAX_CALLERS, "{}", l.callers());
    }
}
