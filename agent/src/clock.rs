//! The agent's one reading of the clocks.
//!
//! The protocol sessions take `now` as an argument and never read a clock
//! (`protocols` bans it), so every reading the agent makes is its drivers'
//! doing. They all come through here: the wall clock's edge cases (a clock set
//! before 1970, nanoseconds past `i64`) are handled once, a test or a review
//! finds every reading in one file, and `agent/clippy.toml` refuses
//! `Instant::now`, `Instant::elapsed` and `SystemTime::now` everywhere
//! else.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outpost_protocols::Timestamp;

/// The monotonic clock: timers, deadlines, the sessions' `now`.
#[must_use]
pub fn now() -> Instant {
    Instant::now()
}

/// The monotonic clock as tokio's `Instant`, for `sleep_until` deadlines (it
/// follows tokio's paused time in tests).
#[must_use]
pub fn tokio_now() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

/// How long ago `since` was on the monotonic clock (zero if it is ahead).
#[must_use]
pub fn elapsed(since: Instant) -> Duration {
    since.elapsed()
}

/// [`elapsed`] for tokio's `Instant`.
#[must_use]
pub fn tokio_elapsed(since: tokio::time::Instant) -> Duration {
    since.elapsed()
}

/// The wall clock in Unix nanoseconds: event times and stored timestamps. A
/// clock set before 1970 reads 0; one past 2262 saturates.
#[must_use]
pub fn unix_now() -> Timestamp {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    Timestamp(nanos)
}

/// `d` ± 25 %, so that a fleet that lost its peer does not come back in
/// lockstep. The wall clock's nanoseconds are random enough for spreading
/// load; no RNG is needed.
#[must_use]
pub fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    let factor = 0.75 + f64::from(nanos % 1000) / 2000.0;
    d.mul_f64(factor)
}
