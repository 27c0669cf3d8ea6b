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
//!  10 Stored        hub -> agent   upto                          (version 3)
//!  11 Labels        hub -> agent   labels                        (version 4)
//!  12 Renew         agent -> hub   csr (PKCS#10, DER)            (version 4)
//!  13 Renewed       hub -> agent   Issued{cert_pem} | Refused{reason} (version 4)
//!  14 Command       hub -> agent   {id, expires_at, action}      (version 4)
//!  15 CommandResult agent -> hub   id, outcome                   (version 4)
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
mod code;
pub mod command;
mod error;
mod frame;
mod hub;
mod version;
mod window;

#[cfg(test)]
mod tests;

pub use agent::{AgentConfig, AgentEvent, AgentInfo, AgentSession};
pub use code::{ErrorCode, CLOSE_OK};
pub use error::{ProtocolError, UsageError};
pub use frame::{
    Frame, FrameDecoder, FrameError, Renewal, MAX_AGENT_VERSION_LEN, MAX_BODY_LEN,
    MAX_CERT_PEM_LEN, MAX_CSR_LEN, MAX_ERROR_MESSAGE_LEN, MAX_EVENT_LEN, MAX_FRAME_LEN, MAX_LABELS,
    MAX_LABEL_LEN, MAX_VERSIONS,
};
pub use hub::{HubConfig, HubEvent, HubSession};
pub use version::{negotiate, PROTOCOL_VERSION, SUPPORTED_VERSIONS};

use crate::event::AgentId;

/// The TLS ALPN protocol id. It names the protocol family and stays the same
/// for every version: versions are negotiated in `Hello`, so that an agent and a
/// hub of different versions still complete the TLS handshake.
pub const ALPN: &[u8] = b"outpost/1";

/// The prefix of the SAN URI that carries an agent's id in its certificate.
pub const AGENT_URI_PREFIX: &str = "urn:outpost:agent:";

/// The agent id in a certificate's SAN URI `urn:outpost:agent:<id>`, or `None`
/// when the URI has another form or the id is not a valid [`AgentId`].
///
/// The hub takes an agent's id from here and nowhere else.
#[must_use]
pub fn agent_id_from_uri(uri: &str) -> Option<AgentId> {
    uri.strip_prefix(AGENT_URI_PREFIX)
        .and_then(|id| AgentId::parse(id).ok())
}

/// The SAN URI that names `id` in its certificate.
#[must_use]
pub fn agent_uri(id: &AgentId) -> String {
    format!("{AGENT_URI_PREFIX}{id}")
}
