//! The `tls` table of a connection the hub opens as a client: a sink's far
//! end (`[sinks.<kind>.tls]`) or the JetStream store's servers
//! (`[store.jetstream.tls]`).
//!
//! Why a room of its own: the sinks and the store read the same table, turn
//! it into a rustls configuration the same way (the PEM files read by
//! `outpost-tls`, only the configured CA trusted), and neither may import the
//! other. Each names the keys at fault under its own table.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use outpost_tls::{ClientFiles, TlsError};
use rustls::RootCertStore;
use serde::Deserialize;

/// TLS to a server the hub connects to: the CA that signs its certificate
/// (no roots are bundled or taken from the system: a CA is required for
/// TLS), and an optional client certificate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// PEM file of the CA(s) the far end's certificate must chain to.
    pub ca: PathBuf,
    /// PEM client certificate (chain), with `key`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The name the far end's certificate is checked against; default: the
    /// host of the address.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// Why a `tls` table cannot become a client configuration. [`key`](Self::key)
/// names the setting within the table; the message does not, so that each
/// user can name it under its own table.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientTlsError {
    /// `cert` without `key`.
    #[error("cert is set: its private key is needed too")]
    KeyMissing,
    /// `key` without `cert`.
    #[error("key is set: its certificate is needed too")]
    CertMissing,
    /// `server_name` is neither a DNS name nor an IP address.
    #[error("{name:?}: {source}")]
    ServerName {
        /// The configured name.
        name: String,
        /// Why it is not a name.
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    /// A file is unusable, or rustls refused what it holds.
    #[error(transparent)]
    Files(TlsError),
    /// rustls refused its own default protocol versions for the provider.
    #[error("TLS: {0}")]
    Protocols(#[source] rustls::Error),
}

impl ClientTlsError {
    /// The setting at fault within the `tls` table: `ca`, `cert`, `key` or
    /// `server_name`.
    #[must_use]
    pub fn key(&self) -> &'static str {
        match self {
            ClientTlsError::KeyMissing => "key",
            ClientTlsError::CertMissing => "cert",
            ClientTlsError::ServerName { .. } => "server_name",
            ClientTlsError::Files(e) => e.setting(),
            ClientTlsError::Protocols(_) => "ca",
        }
    }
}

impl From<TlsError> for ClientTlsError {
    fn from(e: TlsError) -> Self {
        match e {
            TlsError::ServerName { name, source } => ClientTlsError::ServerName { name, source },
            other => ClientTlsError::Files(other),
        }
    }
}

/// `tls` as a rustls client configuration with the `ring` provider; without
/// it, one that trusts no certificate (a server that asks for TLS then fails
/// the handshake rather than being trusted by the system's roots). Paths are
/// relative to `base`.
pub fn client_config(
    tls: Option<&ClientTls>,
    base: &Path,
) -> Result<rustls::ClientConfig, ClientTlsError> {
    let Some(t) = tls else {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        return Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(ClientTlsError::Protocols)?
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth());
    };
    let (cert, key) = match (&t.cert, &t.key) {
        (None, None) => (None, None),
        (Some(_), None) => return Err(ClientTlsError::KeyMissing),
        (None, Some(_)) => return Err(ClientTlsError::CertMissing),
        (Some(c), Some(k)) => (Some(base.join(c)), Some(base.join(k))),
    };
    let ca = base.join(&t.ca);
    Ok(outpost_tls::client_config(ClientFiles {
        ca: &ca,
        client: cert.as_deref().zip(key.as_deref()),
        server_name: t.server_name.as_deref(),
    })?)
}
