//! TLS to a sink's far end, one way for every kind: only the configured CA is
//! trusted (no roots are bundled or taken from the system, so a hub never
//! trusts more than its operator said), `server_name` overrides the name the
//! certificate is checked against, and an optional client certificate. The
//! files are read by `outpost-tls`; this module names the sink's keys.

use std::path::Path;
use std::sync::Arc;

use outpost_tls::{ClientFiles, TlsError};
use rustls::RootCertStore;

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
    let Some(t) = tls else {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        return Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("ca", format!("TLS: {e}")))?
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth());
    };
    let (cert, key) = match (&t.cert, &t.key) {
        (None, None) => (None, None),
        (Some(_), None) => {
            return Err(bad(
                "key",
                "cert is set: its private key is needed too".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(bad(
                "cert",
                "key is set: its certificate is needed too".into(),
            ))
        }
        (Some(c), Some(k)) => (Some(base.join(c)), Some(base.join(k))),
    };
    let ca = base.join(&t.ca);
    outpost_tls::client_config(ClientFiles {
        ca: &ca,
        client: cert.as_deref().zip(key.as_deref()),
        server_name: t.server_name.as_deref(),
    })
    .map_err(|e| {
        let message = match &e {
            TlsError::ServerName { name, source } => format!("{name:?}: {source}"),
            other => other.to_string(),
        };
        bad(e.setting(), message)
    })
}
