//! What can be wrong with a TLS setting: a PEM file ([`PemError`]) or the
//! configuration built from the files ([`TlsError`]). Every message is one
//! line naming the file or the setting, and none holds key material.

use std::io;
use std::path::PathBuf;

/// A PEM file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PemError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// A PEM section of the file did not decode.
    #[error("{}: invalid PEM: {source}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        #[source]
        source: io::Error,
    },
    /// The file holds no certificate.
    #[error("{}: no certificate found (expected PEM)", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The file holds no private key.
    #[error("{}: no private key found (expected PEM)", path.display())]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// A certificate of a CA file cannot be a trust anchor.
    #[error("{}: unusable CA certificate: {source}", path.display())]
    UnusableCa {
        /// The file.
        path: PathBuf,
        /// What webpki said.
        #[source]
        source: rustls::Error,
    },
}

impl PemError {
    /// The file that is wrong.
    #[must_use]
    pub fn path(&self) -> &std::path::Path {
        match self {
            PemError::Read { path, .. }
            | PemError::Invalid { path, .. }
            | PemError::NoCertificate { path }
            | PemError::NoPrivateKey { path }
            | PemError::UnusableCa { path, .. } => path,
        }
    }
}

/// Why a TLS configuration could not be built. Each variant says which
/// setting is wrong, so that a caller can name its own key for it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A CA fingerprint is not 64 hex digits (SHA-256).
    #[error("{0:?} is not a SHA-256 fingerprint (64 hex digits, colons allowed)")]
    Fingerprint(String),
    /// The CA file is unusable.
    #[error(transparent)]
    Ca(PemError),
    /// The certificate file is unusable.
    #[error(transparent)]
    Cert(PemError),
    /// The private key file is unusable.
    #[error(transparent)]
    Key(PemError),
    /// The name the server's certificate is to be checked against is neither
    /// a DNS name nor an IP address.
    #[error("tls server_name: invalid TLS server name {name:?}: {source}")]
    ServerName {
        /// The configured name.
        name: String,
        /// Why it is not a name.
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    /// No certificate verifier could be built from the CA file (for
    /// example, it holds no usable trust anchor).
    #[error("{}: {source}", ca.display())]
    Verifier {
        /// The CA file.
        ca: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::client::VerifierBuilderError,
    },
    /// rustls refused the certificate and key as a pair (for example a key
    /// that does not match its certificate, or of an unsupported kind).
    #[error("{}: {source}", key.display())]
    KeyPair {
        /// The private key file.
        key: PathBuf,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// rustls refused the configuration itself (for example no protocol
    /// version in common with the provider).
    #[error("tls configuration: {0}")]
    Config(#[source] rustls::Error),
}

impl TlsError {
    /// The setting that is wrong, as the agent's and the sinks' `tls` tables
    /// name it: `ca`, `cert`, `key` or `server_name`. A configuration rustls
    /// refused as a whole is put on `ca`, the setting every TLS table has.
    #[must_use]
    pub fn setting(&self) -> &'static str {
        match self {
            TlsError::Ca(_)
            | TlsError::Verifier { .. }
            | TlsError::Config(_)
            | TlsError::Fingerprint(_) => "ca",
            TlsError::Cert(_) => "cert",
            TlsError::Key(_) | TlsError::KeyPair { .. } => "key",
            TlsError::ServerName { .. } => "server_name",
        }
    }
}
