//! rustls client configurations: trust only the given CA, optionally check
//! the server's certificate against a configured name instead of the host
//! dialled, optionally present a client certificate.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

use crate::error::TlsError;
use crate::pem::{load_certs, load_key, load_roots};

/// The files and names of a client configuration.
#[derive(Debug, Clone, Copy)]
pub struct ClientFiles<'a> {
    /// The CA file: the only trust anchors.
    pub ca: &'a Path,
    /// The client's certificate chain and private key, to present when the
    /// server asks for one.
    pub client: Option<(&'a Path, &'a Path)>,
    /// The name to check the server's certificate against instead of the host
    /// dialled.
    pub server_name: Option<&'a str>,
}

/// A client configuration with the `ring` provider and TLS 1.2 and 1.3,
/// unshared so that callers can set more (ALPN).
pub fn client_config(files: ClientFiles<'_>) -> Result<ClientConfig, TlsError> {
    let roots = Arc::new(load_roots(files.ca).map_err(TlsError::Ca)?);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?;
    let builder = match files.server_name {
        None => builder.with_root_certificates(roots),
        Some(name) => {
            let name =
                ServerName::try_from(name.to_owned()).map_err(|source| TlsError::ServerName {
                    name: name.to_owned(),
                    source,
                })?;
            let inner = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|source| TlsError::Verifier {
                    ca: files.ca.to_owned(),
                    source,
                })?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NamedServerVerifier { inner, name }))
        }
    };
    match files.client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = load_certs(cert).map_err(TlsError::Cert)?;
            let key_der = load_key(key).map_err(TlsError::Key)?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|source| TlsError::KeyPair {
                    key: key.to_owned(),
                    source,
                })
        }
    }
}

/// Checks the server's certificate against a configured name instead of the
/// host the client connected to.
///
/// Clients such as rumqttc verify against the host they dial; a peer reached
/// by IP address whose certificate names only its DNS name needs the name
/// substituted. Everything else is webpki's.
#[derive(Debug)]
struct NamedServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for NamedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
