//! The hub's server configuration: mutual TLS 1.3, where a client is let in
//! only with a certificate the fleet CA issued; or, for a hub that also
//! enrolls devices, a client certificate optional at TLS (one presented must
//! still chain to the CA) and left to the hub to require per ALPN.

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

/// The hub's server configuration when devices may enroll on the same port:
/// like [`mtls_server_config`], but a client without a certificate completes
/// the handshake (the caller must refuse it on every ALPN but enrollment),
/// and the chain sent is `cert`'s followed by the CA certificates of `ca`,
/// so that a device that knows only the CA's fingerprint can find the CA
/// in the handshake and check the hub's certificate against it.
pub fn enrolling_server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<ServerConfig, TlsError> {
    let roots = Arc::new(load_roots(ca).map_err(TlsError::Ca)?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|source| TlsError::Verifier {
            ca: ca.to_owned(),
            source,
        })?;
    let mut chain = load_certs(cert).map_err(TlsError::Cert)?;
    for c in load_certs(ca).map_err(TlsError::Ca)? {
        if !chain.contains(&c) {
            chain.push(c);
        }
    }
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
