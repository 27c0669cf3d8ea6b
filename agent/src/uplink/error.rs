//! Why a connection to the hub ended, keeping the quinn, io or outbox error
//! as the source; the uplink logs it as one line and redials.

use outpost_protocols::wire::{ErrorCode, ProtocolError, UsageError};

use crate::outbox::OutboxError;

/// Why a connection to the hub ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UplinkError {
    /// The TLS files are unusable; the uplink cannot start.
    #[error(transparent)]
    Tls(#[from] outpost_tls::TlsError),
    /// quinn refused the TLS configuration (no TLS 1.3 cipher suite QUIC can
    /// start with).
    #[error("quic configuration: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// The hub's address did not resolve.
    #[error("resolve {hub}: {source}")]
    Resolve {
        /// `[uplink] hub`.
        hub: String,
        /// What the resolver said.
        #[source]
        source: std::io::Error,
    },
    /// The hub's address resolved to nothing.
    #[error("resolve {hub}: no address")]
    NoAddress {
        /// `[uplink] hub`.
        hub: String,
    },
    /// No local UDP socket could be opened.
    #[error("connection: {0}")]
    Socket(#[source] std::io::Error),
    /// quinn refused to start the connection.
    #[error("connection: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The QUIC connection failed or was closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to the stream failed.
    #[error("connection: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from the stream failed.
    #[error("connection: {0}")]
    Read(#[from] quinn::ReadError),
    /// The hub finished its stream without closing the session.
    #[error("connection: the hub finished the stream")]
    StreamFinished,
    /// The session ended with a protocol error.
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The session was driven wrongly (a bug in this driver).
    #[error("session usage: {0}")]
    Usage(#[from] UsageError),
    /// The outbox failed.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

impl UplinkError {
    /// The code the hub closed with, when it closed the connection or the
    /// session for a named reason.
    pub fn hub_code(&self) -> Option<ErrorCode> {
        let closed = |e: &quinn::ConnectionError| match e {
            quinn::ConnectionError::ApplicationClosed(c) => {
                u32::try_from(c.error_code.into_inner())
                    .ok()
                    .and_then(ErrorCode::from_u32)
            }
            _ => None,
        };
        match self {
            UplinkError::Connection(e) => closed(e),
            UplinkError::Write(quinn::WriteError::ConnectionLost(e))
            | UplinkError::Read(quinn::ReadError::ConnectionLost(e)) => closed(e),
            UplinkError::Protocol(e) if e.is_from_peer() => Some(e.code()),
            _ => None,
        }
    }
}
