//! Protocol versions and their negotiation: what this build speaks and how
//! two builds pick the version they share.
//!
//! A room of its own because both sessions and the crate's users need it, and
//! the sessions must not reach up into `wire` for it.

use std::ops::RangeInclusive;

/// The newest protocol version this build speaks. Version 2 added the policy
/// push (`Policy`, `PolicyStatus`); a version 1 agent gets no policy and the
/// hub enforces the policy on what it sends. Version 3 added `Stored`,
/// version 4 `Labels` (the hub's registry labels, told to the agent),
/// certificate renewal over the session (`Renew`, `Renewed`) and commands
/// (`Command`, `CommandResult`).
pub const PROTOCOL_VERSION: u16 = 4;

/// Every protocol version this build speaks. A hub of version N keeps speaking
/// every version down to 1 (at least N - 1), so that agents can be upgraded
/// after the hub, one site at a time.
pub const SUPPORTED_VERSIONS: RangeInclusive<u16> = 1..=PROTOCOL_VERSION;

/// Picks the highest version both sides speak: the highest of `offered` (the
/// agent's `Hello`) that lies in `supported` (the hub's range), or `None` when
/// they share none.
///
/// ```
/// use outpost_protocols::wire::negotiate;
/// // A hub of version 2 still serves an agent of version 1.
/// assert_eq!(negotiate(&[1], 1..=2), Some(1));
/// // An agent of version 2 still talks to a hub of version 1.
/// assert_eq!(negotiate(&[2, 1], 1..=1), Some(1));
/// assert_eq!(negotiate(&[3], 1..=2), None);
/// ```
#[must_use]
pub fn negotiate(offered: &[u16], supported: RangeInclusive<u16>) -> Option<u16> {
    offered
        .iter()
        .copied()
        .filter(|v| supported.contains(v))
        .max()
}
