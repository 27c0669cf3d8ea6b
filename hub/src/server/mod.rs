//! The hub's QUIC ingest: one thin driver task per agent connection around the
//! sans-IO [`HubSession`](outpost_protocols::wire::HubSession).
//!
//! The drivers make no protocol decisions. A connection is authenticated by
//! its certificate (the id comes from the SAN URI, never from what the agent
//! says); its driver reads the agent's watermark from the store, feeds the
//! session what arrives, the policy in force and what the store committed,
//! stores what the session hands out, and writes what it queues. The
//! acknowledgement the agent deletes its outbox on means "durable here",
//! because the session is told only after the store committed.
//!
//! Backpressure is per agent: a connection stops reading once a few batches
//! wait for their commit, so QUIC flow control slows that agent alone, and
//! every agent's batches share the store's group commits.
//!
//! Architecture invariant: at most one session per agent id is live. A new
//! connection supersedes the old one and waits until the old one's commits are
//! finished before reading the watermark, so the watermark it resumes from is
//! never stale.
//!
//! The rooms, one job each: `endpoint` (the QUIC and socket settings),
//! `reset` (the stateless-reset secret), `door` (the limits a new
//! connection meets before its handshake), `accept` (the accept loop and a
//! connection's life), `live` (which connection of an agent is current),
//! `identity` (the agent id from the certificate), `binding` (which
//! certificate of an agent is accepted, and renewing it), `enforcement` (the
//! policy applied again on ingest), `session` (the driver) and `enroll` (a
//! connection on the enrollment ALPN, which needs no client certificate).

mod accept;
mod binding;
mod door;
mod endpoint;
mod enforcement;
mod enroll;
mod error;
mod identity;
mod live;
mod reset;
mod session;

pub use accept::{serve, ServeKeys};
pub use door::{DoorCounters, DoorCounts};
pub use endpoint::server_config;
pub use enforcement::PolicyFeed;
pub use error::ServerError;
pub use reset::ResetKeyError;
