//! The wall clock of the store: `last_seen`, sink queue times, policy
//! versions and audit entries are stamped with it.

use std::time::{SystemTime, UNIX_EPOCH};

use outpost_protocols::event::Timestamp;

/// The wall clock as a [`Timestamp`]: for `last_seen`, policy versions and
/// audit entries.
pub(crate) fn now() -> Timestamp {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Timestamp(nanos)
}
