//! Limits at the door: what the accept loop decides about a new QUIC
//! connection before it spends a TLS handshake on it.
//!
//! Why here and not in QUIC's own settings: quinn accepts every Initial it
//! can parse, and each accepted one holds connection state until its
//! handshake completes or times out (the idle timeout, a minute). Without
//! limits a flood of Initials, spoofed or not, grows the hub's memory and
//! CPU with the flood. The decision, in this order:
//!
//! 1. With `retry_above` handshakes already in flight, an Incoming whose
//!    source address is not yet validated is answered with a QUIC Retry
//!    (RFC 9000 §8.1.2): stateless for the hub, and a spoofed source never
//!    sees the token, so it never comes back.
//! 2. Each source IP has a token bucket (`per_address_burst`, refilled at
//!    `per_address_rate` a second); an Incoming that finds it empty is
//!    refused. The buckets live in two generations of at most
//!    [`GENERATION`] addresses each: when the current one is full it
//!    becomes the previous one and the previous one is dropped, so a flood
//!    from many addresses costs at most two generations of memory and
//!    forgets the least recently seen addresses first.
//! 3. With `max_handshakes` handshakes in flight, an Incoming is refused.
//!
//! What is admitted holds a [`Handshake`] until its TLS handshake ends, and
//! must then open its stream within `stream_deadline`, or it is closed with
//! `Timeout`.
//!
//! The decision takes `now` and touches no socket, so it is tested without
//! either; the accept loop carries it out and counts it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::HubSection;

/// Addresses per generation of buckets (two generations at most).
pub(super) const GENERATION: usize = 16_384;

/// The limits, from `[hub]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Limits {
    /// `max_handshakes`.
    pub(super) max_handshakes: usize,
    /// `retry_above`.
    pub(super) retry_above: usize,
    /// `per_address_burst`; 0: no per-address limit.
    pub(super) burst: u32,
    /// `per_address_rate`, connections a second.
    pub(super) rate: f64,
    /// `stream_deadline`.
    pub(super) stream_deadline: Duration,
}

impl Limits {
    /// The limits `[hub]` sets (validated by the config).
    pub(super) fn from_config(hub: &HubSection) -> Limits {
        Limits {
            max_handshakes: hub.max_handshakes,
            retry_above: hub.retry_above,
            burst: hub.per_address_burst,
            rate: hub.per_address_rate,
            stream_deadline: hub.stream_deadline.0,
        }
    }
}

/// What to do with an Incoming.
#[derive(Debug)]
pub(super) enum Admission {
    /// Go on with the handshake, holding this place until it ends.
    Accept(Handshake),
    /// Answer with a Retry: validate the source address first.
    Retry,
    /// Refuse: the source address used up its connections.
    RateLimited,
    /// Refuse: too many handshakes in flight.
    Busy,
}

/// How many of each decision, and of deadline closes, since the hub
/// started; read by the metrics endpoint.
#[derive(Debug, Default)]
pub struct DoorCounters {
    refused_busy: AtomicU64,
    refused_rate: AtomicU64,
    retried: AtomicU64,
    stream_deadline: AtomicU64,
    in_flight: AtomicUsize,
}

/// A reading of [`DoorCounters`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DoorCounts {
    /// Incomings refused because `max_handshakes` were in flight.
    pub refused_busy: u64,
    /// Incomings refused by the per-address limit.
    pub refused_rate: u64,
    /// Incomings answered with a Retry.
    pub retried: u64,
    /// Connections closed because they opened no stream in time.
    pub stream_deadline: u64,
    /// Handshakes in flight now.
    pub in_flight: u64,
}

impl DoorCounters {
    /// The counts now.
    pub fn read(&self) -> DoorCounts {
        DoorCounts {
            refused_busy: self.refused_busy.load(Ordering::Relaxed),
            refused_rate: self.refused_rate.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            stream_deadline: self.stream_deadline.load(Ordering::Relaxed),
            in_flight: u64::try_from(self.in_flight.load(Ordering::Relaxed)).unwrap_or(u64::MAX),
        }
    }

    /// Counts a connection closed at its stream deadline.
    pub(super) fn stream_deadline_passed(&self) {
        self.stream_deadline.fetch_add(1, Ordering::Relaxed);
    }
}

/// A handshake's place among those in flight, given back on drop.
#[derive(Debug)]
pub(super) struct Handshake {
    counters: Arc<DoorCounters>,
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One source address's bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The buckets, in two generations (see the module doc).
#[derive(Debug, Default)]
struct Buckets {
    current: HashMap<IpAddr, Bucket>,
    previous: HashMap<IpAddr, Bucket>,
}

impl Buckets {
    /// Takes one token from `ip`'s bucket, refilled for the time since it was
    /// last used; false if it had none.
    fn take(&mut self, ip: IpAddr, now: Instant, limits: &Limits) -> bool {
        let burst = f64::from(limits.burst);
        let found = self
            .current
            .get(&ip)
            .copied()
            .or_else(|| self.previous.remove(&ip));
        let tokens = found.map_or(burst, |b| {
            let refill = now.saturating_duration_since(b.at).as_secs_f64() * limits.rate;
            (b.tokens + refill).min(burst)
        });
        let (tokens, admitted) = if tokens >= 1.0 {
            (tokens - 1.0, true)
        } else {
            (tokens, false)
        };
        if !self.current.contains_key(&ip) && self.current.len() >= GENERATION {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(ip, Bucket { tokens, at: now });
        admitted
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

/// The door: the limits, the buckets and the counters.
#[derive(Debug)]
pub(super) struct Door {
    limits: Limits,
    buckets: Mutex<Buckets>,
    counters: Arc<DoorCounters>,
}

impl Door {
    /// A door with `limits`, counting into `counters`.
    pub(super) fn new(limits: Limits, counters: Arc<DoorCounters>) -> Door {
        Door {
            limits,
            buckets: Mutex::new(Buckets::default()),
            counters,
        }
    }

    /// The limits.
    pub(super) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The counters.
    pub(super) fn counters(&self) -> &Arc<DoorCounters> {
        &self.counters
    }

    /// Decides about an Incoming from `ip` (`validated`: its address was
    /// proven by a Retry token) at `now`, and counts the decision.
    pub(super) fn admit(&self, ip: IpAddr, validated: bool, now: Instant) -> Admission {
        let c = &self.counters;
        let in_flight = c.in_flight.load(Ordering::Relaxed);
        if !validated && in_flight >= self.limits.retry_above {
            c.retried.fetch_add(1, Ordering::Relaxed);
            return Admission::Retry;
        }
        if self.limits.burst > 0 {
            // A poisoned lock only means another accept panicked mid-update;
            // the buckets are still usable numbers.
            let mut buckets = self
                .buckets
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !buckets.take(ip, now, &self.limits) {
                c.refused_rate.fetch_add(1, Ordering::Relaxed);
                return Admission::RateLimited;
            }
        }
        if c.in_flight.fetch_add(1, Ordering::Relaxed) >= self.limits.max_handshakes {
            c.in_flight.fetch_sub(1, Ordering::Relaxed);
            c.refused_busy.fetch_add(1, Ordering::Relaxed);
            return Admission::Busy;
        }
        Admission::Accept(Handshake {
            counters: c.clone(),
        })
    }

    /// How many addresses have a bucket.
    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn limits() -> Limits {
        Limits {
            max_handshakes: 4,
            retry_above: 2,
            burst: 3,
            rate: 1.0,
            stream_deadline: Duration::from_secs(10),
        }
    }

    fn door(limits: Limits) -> Door {
        Door::new(limits, Arc::new(DoorCounters::default()))
    }

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn an_address_gets_its_burst_then_one_connection_per_refill() {
        let d = door(Limits {
            max_handshakes: 100,
            retry_above: 100,
            ..limits()
        });
        let t = crate::clock::now();
        let mut held = Vec::new();
        for _ in 0..3 {
            match d.admit(ip(1), true, t) {
                Admission::Accept(h) => held.push(h),
                other => panic!("expected accept, got {other:?}"),
            }
        }
        assert!(matches!(d.admit(ip(1), true, t), Admission::RateLimited));
        assert!(matches!(d.admit(ip(2), true, t), Admission::Accept(_)));
        let later = t + Duration::from_millis(1100);
        assert!(matches!(d.admit(ip(1), true, later), Admission::Accept(_)));
        assert!(matches!(
            d.admit(ip(1), true, later),
            Admission::RateLimited
        ));
        assert_eq!(d.counters().read().refused_rate, 2);
    }

    #[test]
    fn above_the_threshold_unvalidated_addresses_are_retried_and_validated_ones_pass() {
        let d = door(Limits {
            burst: 0,
            ..limits()
        });
        let t = crate::clock::now();
        let a = d.admit(ip(1), false, t);
        let b = d.admit(ip(2), false, t);
        assert!(matches!(
            (&a, &b),
            (Admission::Accept(_), Admission::Accept(_))
        ));
        assert!(matches!(d.admit(ip(3), false, t), Admission::Retry));
        let c = d.admit(ip(3), true, t);
        assert!(matches!(c, Admission::Accept(_)));
        assert_eq!(d.counters().read().retried, 1);
        assert_eq!(d.counters().read().in_flight, 3);
        drop((a, b, c));
        assert_eq!(d.counters().read().in_flight, 0);
        assert!(matches!(d.admit(ip(3), false, t), Admission::Accept(_)));
    }

    #[test]
    fn the_handshake_cap_refuses_until_a_handshake_ends() {
        let d = door(Limits {
            burst: 0,
            ..limits()
        });
        let t = crate::clock::now();
        let held: Vec<_> = (0..4).map(|i| d.admit(ip(i), true, t)).collect();
        assert!(held.iter().all(|a| matches!(a, Admission::Accept(_))));
        assert!(matches!(d.admit(ip(9), true, t), Admission::Busy));
        assert_eq!(d.counters().read().refused_busy, 1);
        drop(held);
        assert!(matches!(d.admit(ip(9), true, t), Admission::Accept(_)));
    }

    #[test]
    fn a_flood_from_many_addresses_keeps_at_most_two_generations_of_buckets() {
        let d = door(Limits {
            max_handshakes: usize::MAX,
            retry_above: usize::MAX,
            ..limits()
        });
        let t = crate::clock::now();
        for n in 0..(5 * GENERATION as u32) {
            let _ = d.admit(ip(n), true, t);
            assert!(d.addresses() <= 2 * GENERATION);
        }
        // The most recently seen addresses are still limited.
        let last = ip(5 * GENERATION as u32 - 1);
        let _ = d.admit(last, true, t);
        let _ = d.admit(last, true, t);
        assert!(matches!(d.admit(last, true, t), Admission::RateLimited));
    }

    #[test]
    fn no_burst_means_no_per_address_limit() {
        let d = door(Limits {
            burst: 0,
            max_handshakes: usize::MAX,
            retry_above: usize::MAX,
            ..limits()
        });
        let t = crate::clock::now();
        for _ in 0..1000 {
            assert!(matches!(d.admit(ip(1), true, t), Admission::Accept(_)));
        }
        assert_eq!(d.addresses(), 0);
    }
}
