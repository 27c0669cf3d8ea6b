//! The agent–hub wire protocol, sans-IO: frames, their codec, version
//! negotiation, and the two session state machines.
//!
//! The protocol runs over one bidirectional QUIC stream per connection (ALPN
//! [`ALPN`], mutual TLS). The agent opens the stream and speaks first. The
//! agent's identity is the SAN URI of its certificate ([`agent_id_from_uri`]);
//! no frame carries it, so an agent cannot claim another's id.
//!
//! ```text
//! one frame on the stream
//! +----------------------+-------------------------------------------+
//! | length: u32, BE      | body: postcard(Frame), `length` bytes     |
//! | 4 bytes              | 1 ..= MAX_FRAME_LEN (4 MiB)               |
//! +----------------------+-------------------------------------------+
//!
//! body = varint(variant index) + the variant's fields, in order
//!   0 Hello     agent -> hub   versions, agent_version, labels   (frozen)
//!   1 Welcome   hub -> agent   version, watermark, window        (frozen)
//!   2 Error     both ways      code (u16), message               (frozen)
//!   3 Batch     agent -> hub   [(seq, EventBody)], seqs strictly increasing
//!   4 Ack       hub -> agent   upto, window
//!   5 Backlog   agent -> hub   events, bytes, oldest_seq
//!   6 Heartbeat both ways
//!   7 Goodbye   agent -> hub
//!   8 Policy        hub -> agent   version, text                 (version 2)
//!   9 PolicyStatus  agent -> hub   version, error                (version 2)
//!
//! agent                                   hub
//!   | Hello{versions:[1], ...}  ---------->  |  id from the certificate,
//!   |                                        |  watermark from the store
//!   | <------- Welcome{version:1, watermark:W, window:N}
//!   | Batch{(W+1, e), (W+3, e), ...} ----->  |  Store{...} to the driver
//!   | <------- Ack{upto, window}             |  after the store committed
//!   | PolicyStatus{version:P} ------------>  |  (version 2) the policy it runs
//!   | <------- Policy{version:Q, text}       |  if Q is not P, and on apply
//!   | PolicyStatus{version:Q} ------------>  |  once persisted and in force
//!   | Heartbeat <--------------------------> |  when idle
//!   | Goodbye ---------------------------->  |
//! ```
//!
//! Frames 0–2 are frozen: their variant index and fields never change, so any
//! two versions can always negotiate, or refuse each other with a named error.
//! Everything after the handshake is spoken in the negotiated version; a later
//! version changes a frame by appending a new variant, never by editing one.
//!
//! `docs/protocol.md` is the full specification: every frame, every error code,
//! and why the delivery is exactly once.

mod agent;
mod error;
mod frame;
mod hub;

#[cfg(test)]
mod tests;

use std::ops::RangeInclusive;

pub use agent::{AgentConfig, AgentEvent, AgentInfo, AgentSession};
pub use error::{ErrorCode, ProtocolError, UsageError, CLOSE_OK};
pub use frame::{
    Frame, FrameDecoder, FrameError, MAX_AGENT_VERSION_LEN, MAX_BODY_LEN, MAX_ERROR_MESSAGE_LEN,
    MAX_EVENT_LEN, MAX_FRAME_LEN, MAX_LABELS, MAX_LABEL_LEN, MAX_VERSIONS,
};
pub use hub::{HubConfig, HubEvent, HubSession};

use crate::event::AgentId;

/// The newest protocol version this build speaks. Version 2 added the policy
/// push (`Policy`, `PolicyStatus`); a version 1 agent gets no policy and the
/// hub enforces the policy on what it sends.
pub const PROTOCOL_VERSION: u16 = 3;

/// Every protocol version this build speaks. A hub of version N keeps speaking
/// every version down to 1 (at least N - 1), so that agents can be upgraded
/// after the hub, one site at a time.
pub const SUPPORTED_VERSIONS: RangeInclusive<u16> = 1..=PROTOCOL_VERSION;

/// The TLS ALPN protocol id. It names the protocol family and stays the same
/// for every version: versions are negotiated in `Hello`, so that an agent and a
/// hub of different versions still complete the TLS handshake.
pub const ALPN: &[u8] = b"outpost/1";

/// The prefix of the SAN URI that carries an agent's id in its certificate.
pub const AGENT_URI_PREFIX: &str = "urn:outpost:agent:";

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

/// The agent id in a certificate's SAN URI `urn:outpost:agent:<id>`, or `None`
/// when the URI has another form or the id is not a valid [`AgentId`].
///
/// The hub takes an agent's id from here and nowhere else.
#[must_use]
pub fn agent_id_from_uri(uri: &str) -> Option<AgentId> {
    uri.strip_prefix(AGENT_URI_PREFIX)
        .and_then(|id| AgentId::parse(id).ok())
}

/// Drops the seqs up to `upto` from the front of a session's in-flight
/// seqs (ascending): both sessions count their window this way.
fn release(in_flight: &mut std::collections::VecDeque<crate::event::Seq>, upto: crate::event::Seq) {
    while in_flight.front().is_some_and(|s| *s <= upto) {
        in_flight.pop_front();
    }
}

/// The SAN URI that names `id` in its certificate.
#[must_use]
pub fn agent_uri(id: &AgentId) -> String {
    format!("{AGENT_URI_PREFIX}{id}")
}
