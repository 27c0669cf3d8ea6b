//! Enrollment with keys made on the device: an operator makes a one-time
//! token for an agent id (`enroll create`), the device makes its own key and
//! trades the token and a CSR for a certificate over the hub's enrollment
//! ALPN. The private key never leaves the device; the hub stores only each
//! token's SHA-256.
//!
//! Why tokens rather than certificates made on the hub: a key made on the
//! hub has to be copied to the device and exists in two places; a token is
//! worthless once used, expires, names the one id it may enroll, and can be
//! revoked before it is used.
//!
//! The rooms: `tokens` (making and hashing tokens, and where they are kept:
//! the SQLite store or the JetStream bucket), `service` (checking one
//! attempt and issuing), `limiter` (attempts per source address) and `verbs`
//! (`enroll create|list|revoke`). The QUIC side is `server::enroll`.

pub mod limiter;
pub mod service;
pub mod tokens;
pub mod verbs;
