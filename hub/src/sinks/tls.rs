//! TLS to a sink's far end, one way for every kind: only the configured CA is
//! trusted (no roots are bundled or taken from the system, so a hub never
//! trusts more than its operator said), `server_name` overrides the name the
//! certificate is checked against, and an optional client certificate. The
//! files are read by `outpost-tls`; this module names the sink's keys.

use std::path::Path;

use super::{SinkError, SinkTls};

/// `tls` (`[sinks.<kind>.tls]`) as a rustls client configuration
/// ([`crate::client_tls::client_config`]); errors are `SinkError::Config`
/// naming `<kind>.tls.<key>`.
pub(crate) fn client_config(
    id: &str,
    kind: &str,
    tls: Option<&SinkTls>,
    base: &Path,
) -> Result<rustls::ClientConfig, SinkError> {
    crate::client_tls::client_config(tls, base).map_err(|e| SinkError::Config {
        id: id.to_owned(),
        key: format!("{kind}.tls.{}", e.key()),
        message: e.to_string(),
    })
}
