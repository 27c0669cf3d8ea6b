//! Enrollment attempts per source address: a small token bucket each, in a
//! bounded map, so that guessing tokens from one address is slow, and many
//! addresses cannot grow the hub's memory.
//!
//! A token has 256 random bits, so guessing is hopeless anyway; the limit
//! is there to keep an unauthenticated peer from making the hub hash,
//! look up and audit thousands of attempts a second.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Attempts an address may make at once.
pub const BURST: f64 = 5.0;
/// One more attempt is allowed every this long.
pub const REFILL_EVERY: Duration = Duration::from_secs(6);
/// Addresses remembered at most; beyond it, full buckets are forgotten
/// first, and a new address is refused while none can be.
pub const MAX_ADDRESSES: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refilled(self, now: Instant) -> f64 {
        let gained =
            now.saturating_duration_since(self.at).as_secs_f64() / REFILL_EVERY.as_secs_f64();
        (self.tokens + gained).min(BURST)
    }
}

/// The attempts per address.
#[derive(Debug, Default)]
pub struct Limiter {
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl Limiter {
    /// A limiter that remembers nobody yet.
    #[must_use]
    pub fn new() -> Limiter {
        Limiter::default()
    }

    /// Whether `addr` may make an attempt at `now` (and counts it).
    pub fn allow(&self, addr: IpAddr, now: Instant) -> bool {
        let mut map = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !map.contains_key(&addr) && map.len() >= MAX_ADDRESSES {
            map.retain(|_, b| b.refilled(now) < BURST);
            if map.len() >= MAX_ADDRESSES {
                return false;
            }
        }
        let bucket = map.entry(addr).or_insert(Bucket {
            tokens: BURST,
            at: now,
        });
        let tokens = bucket.refilled(now);
        if tokens >= 1.0 {
            *bucket = Bucket {
                tokens: tokens - 1.0,
                at: now,
            };
            true
        } else {
            false
        }
    }

    /// How many addresses are remembered.
    pub fn len(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    #[test]
    fn an_address_gets_a_burst_then_one_attempt_per_refill() {
        let l = Limiter::new();
        let t0 = crate::clock::now();
        for _ in 0..5 {
            assert!(l.allow(ip(1), t0));
        }
        assert!(!l.allow(ip(1), t0));
        // Another address is not held back.
        assert!(l.allow(ip(2), t0));
        assert!(!l.allow(ip(1), t0 + REFILL_EVERY / 2));
        assert!(l.allow(ip(1), t0 + REFILL_EVERY));
        assert!(!l.allow(ip(1), t0 + REFILL_EVERY));
    }

    #[test]
    fn the_map_is_bounded_and_forgets_full_buckets_first() {
        let l = Limiter::new();
        let t0 = crate::clock::now();
        for n in 0..MAX_ADDRESSES as u32 {
            assert!(l.allow(ip(n), t0));
        }
        assert_eq!(l.len(), MAX_ADDRESSES);
        // Every bucket is in use: a new address is refused, not remembered.
        assert!(!l.allow(ip(u32::MAX), t0));
        assert_eq!(l.len(), MAX_ADDRESSES);
        // Once they have refilled, they are forgotten for the new one.
        assert!(l.allow(ip(u32::MAX), t0 + REFILL_EVERY));
        assert_eq!(l.len(), 1);
    }
}
