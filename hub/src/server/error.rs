//! Why the hub cannot serve ([`ServerError`], for the operator) and why one
//! connection ended ([`ConnError`], logged in the agent's span). Each keeps
//! the error it wraps as its source.

use std::net::{AddrParseError, SocketAddr};

use outpost_protocols::wire::{ProtocolError, UsageError};

use super::identity::IdentityError;
use super::reset::ResetKeyError;
use crate::store::StoreError;

/// Why the hub could not serve.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A certificate or key file is unusable, or rustls refused them.
    #[error(transparent)]
    Tls(#[from] outpost_tls::TlsError),
    /// quinn refused the TLS configuration (it has no TLS 1.3 cipher suite
    /// QUIC can start with).
    #[error("tls configuration: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// `[hub] listen` is not a socket address.
    #[error("hub.listen {value:?}: {source}")]
    ListenAddress {
        /// The configured value.
        value: String,
        /// Why it does not parse.
        #[source]
        source: AddrParseError,
    },
    /// The UDP socket could not be bound.
    #[error("hub.listen: cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// No tokio runtime runs the server (a bug in the caller).
    #[error("no async runtime")]
    NoRuntime,
    /// The stateless-reset secret is unusable.
    #[error(transparent)]
    ResetKey(#[from] ResetKeyError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why one connection ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnError {
    #[error("handshake: {0}")]
    Handshake(#[source] quinn::ConnectionError),
    #[error("handshake: not done within a minute")]
    HandshakeTimeout,
    #[error("unauthorized: {0}")]
    Unauthorized(#[from] IdentityError),
    #[error("refused: an operator revoked the agent")]
    Revoked,
    #[error("connection: {0}")]
    Connection(#[source] quinn::ConnectionError),
    #[error("connection: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("connection: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("connection: the registry of live sessions is poisoned")]
    Registry,
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("session usage: {0}")]
    Usage(#[from] UsageError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("no stream opened before the deadline (hub.stream_deadline)")]
    StreamDeadline,
}
