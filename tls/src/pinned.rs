//! A client that trusts the CA whose SHA-256 fingerprint it was given, found
//! in the chain the server presents: how a device that has only a
//! fingerprint (typed or printed on a label) checks the hub before it sends
//! its enrollment token.
//!
//! The server's certificate is verified in the handshake, as webpki always
//! does it (chain, validity, name, key usage, the handshake's signature),
//! with one trust anchor: the certificate of the presented chain whose
//! fingerprint is the pin. A chain without one fails the handshake; nothing
//! is sent.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::error::TlsError;
use crate::fingerprint::fingerprint_sha256;

/// What the handshake found: the pinned CA's certificate, or why not.
#[derive(Debug, Clone)]
pub struct PinnedCa {
    found: Arc<Mutex<Result<Option<CertificateDer<'static>>, String>>>,
}

impl Default for PinnedCa {
    fn default() -> PinnedCa {
        PinnedCa {
            found: Arc::new(Mutex::new(Ok(None))),
        }
    }
}

impl PinnedCa {
    /// The CA certificate whose fingerprint is the pin, once a handshake
    /// verified the server against it.
    #[must_use]
    pub fn certificate(&self) -> Option<CertificateDer<'static>> {
        self.lock().as_ref().ok().and_then(Clone::clone)
    }

    /// Why the last handshake's server was refused, in one sentence.
    #[must_use]
    pub fn refusal(&self) -> Option<String> {
        self.lock().as_ref().err().cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Result<Option<CertificateDer<'static>>, String>> {
        self.found
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A TLS client configuration (ring, TLS 1.2 and 1.3, no client
/// certificate) whose only trust anchor is the certificate in the server's
/// chain with SHA-256 `fingerprint` (64 hex digits, colons allowed), and a
/// handle that tells what the handshake found.
pub fn pinned_ca_client_config(fingerprint: &str) -> Result<(ClientConfig, PinnedCa), TlsError> {
    let pin =
        normalize(fingerprint).ok_or_else(|| TlsError::Fingerprint(fingerprint.to_owned()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let found = PinnedCa::default();
    let verifier = PinnedVerifier {
        pin,
        provider: provider.clone(),
        found: found.clone(),
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok((config, found))
}

/// A fingerprint as 64 lowercase hex digits, from any case, with or without
/// colons; `None` if it is not one.
#[must_use]
pub fn normalize(fingerprint: &str) -> Option<String> {
    let hex: String = fingerprint
        .trim()
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

#[derive(Debug)]
struct PinnedVerifier {
    pin: String,
    provider: Arc<CryptoProvider>,
    found: PinnedCa,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let refuse = |why: String| {
            *self.found.lock() = Err(why.clone());
            rustls::Error::General(why)
        };
        let Some(ca) = intermediates
            .iter()
            .find(|c| fingerprint_sha256(c.as_ref()) == self.pin)
        else {
            let seen: Vec<String> = intermediates
                .iter()
                .map(|c| fingerprint_sha256(c.as_ref()))
                .collect();
            return Err(refuse(format!(
                "the hub presented no CA certificate with SHA-256 {} (it presented {})",
                self.pin,
                if seen.is_empty() {
                    "none".to_owned()
                } else {
                    seen.join(", ")
                }
            )));
        };
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| refuse(format!("the pinned CA certificate is unusable: {e}")))?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| refuse(format!("the pinned CA certificate is unusable: {e}")))?;
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Ok(v) => {
                *self.found.lock() = Ok(Some(ca.clone().into_owned()));
                Ok(v)
            }
            Err(e) => Err(refuse(format!(
                "the hub's certificate does not verify against the pinned CA: {e}"
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
