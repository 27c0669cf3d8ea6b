//! The hub's server configuration: mutual TLS 1.3, where a client is let in
//! only with a certificate the fleet CA issued.

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;

use crate::error::TlsError;
use crate::pem::{load_certs, load_key, load_roots};

/// A TLS 1.3 server configuration with the `ring` provider presenting
/// `cert`/`key` and requiring a client certificate that chains to `ca`.
pub fn mtls_server_config(ca: &Path, cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let roots = Arc::new(load_roots(ca).map_err(TlsError::Ca)?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|source| TlsError::Verifier {
            ca: ca.to_owned(),
            source,
        })?;
    let chain = load_certs(cert).map_err(TlsError::Cert)?;
    let key_der = load_key(key).map_err(TlsError::Key)?;
    ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key_der)
        .map_err(|source| TlsError::KeyPair {
            key: key.to_owned(),
            source,
        })
}
