//! Outpost's one place for TLS: reading certificates and private keys from
//! PEM files, and the rustls configurations built from them, always with the
//! `ring` provider.
//!
//! The agent's uplink and MQTT clients, the hub's QUIC server and the hub's
//! sinks all trust exactly the CA file their operator named (no system or
//! bundled roots), so one loader gives every one of them the same errors:
//! each names the file that is wrong and keeps the cause as its source.
//!
//! Architecture invariant: key material never reaches an error message or a
//! log line; errors name the file, never its contents.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod client;
mod error;
mod files;
mod fingerprint;
mod pem;
mod pinned;
mod server;

pub use client::{client_config, ClientFiles};
pub use error::{PemError, TlsError};
pub use files::write_atomically;
pub use fingerprint::fingerprint_sha256;
pub use pem::{load_certs, load_key, load_roots};
pub use pinned::{normalize as normalize_fingerprint, pinned_ca_client_config, PinnedCa};
pub use server::{enrolling_server_config, mtls_server_config};

#[cfg(test)]
mod tests;
