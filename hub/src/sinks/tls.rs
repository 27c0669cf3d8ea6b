//! TLS to a sink's far end, one way for every kind: only the configured CA is
//! trusted (no roots are bundled or taken from the system, so a hub never
//! trusts more than its operator said), `server_name` overrides the name the
//! certificate is checked against, and an optional client certificate.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::{SinkError, SinkTls};

/// `tls` (`[sinks.<kind>.tls]`) as a rustls client configuration with the
/// `ring` provider; without it, one that trusts no certificate. Paths are
/// relative to `base`; errors are `SinkError::Config` naming
/// `<kind>.tls.<key>`.
pub(crate) fn client_config(
    id: &str,
    kind: &str,
    tls: Option<&SinkTls>,
    base: &Path,
) -> Result<rustls::ClientConfig, SinkError> {
    let bad = |key: &str, message: String| SinkError::Config {
        id: id.to_owned(),
        key: format!("{kind}.tls.{key}"),
        message,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("ca", format!("TLS: {e}")))?;
    let Some(t) = tls else {
        return Ok(builder
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth());
    };
    let ca = base.join(&t.ca);
    let mut roots = RootCertStore::empty();
    for cert in read_certs(&ca).map_err(|m| bad("ca", m))? {
        roots.add(cert).map_err(|e| {
            bad(
                "ca",
                format!("{}: unusable CA certificate: {e}", ca.display()),
            )
        })?;
    }
    let roots = Arc::new(roots);
    let builder = match &t.server_name {
        None => builder.with_root_certificates(roots),
        Some(name) => {
            let name = ServerName::try_from(name.clone())
                .map_err(|e| bad("server_name", format!("{name:?}: {e}")))?;
            let inner = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| bad("ca", format!("{}: {e}", ca.display())))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NamedVerifier { inner, name }))
        }
    };
    match (&t.cert, &t.key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(_), None) => Err(bad(
            "key",
            "cert is set: its private key is needed too".into(),
        )),
        (None, Some(_)) => Err(bad(
            "cert",
            "key is set: its certificate is needed too".into(),
        )),
        (Some(c), Some(k)) => {
            let (cert, key) = (base.join(c), base.join(k));
            let chain = read_certs(&cert).map_err(|m| bad("cert", m))?;
            let key_der = read_key(&key).map_err(|m| bad("key", m))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| bad("key", format!("{}: {e}", key.display())))
        }
    }
}

/// Every certificate of a PEM file; none is an error.
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: invalid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate found (expected PEM)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The first private key of a PEM file. The message never holds key bytes.
pub(crate) fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|e| format!("{}: invalid PEM: {e}", path.display()))?
        .ok_or_else(|| format!("{}: no private key found (expected PEM)", path.display()))
}

/// Checks the far end's certificate against `server_name` rather than the
/// host dialled (a far end reached by address whose certificate names it);
/// everything else is webpki's.
#[derive(Debug)]
struct NamedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for NamedVerifier {
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
