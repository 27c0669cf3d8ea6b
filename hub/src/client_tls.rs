//! The `tls` table of a connection the hub opens as a client: a sink's far
//! end (`[sinks.<kind>.tls]`) or the JetStream store's servers
//! (`[store.jetstream.tls]`).
//!
//! Why a room of its own: the sinks and the store read the same table, and
//! neither may import the other. Turning it into a rustls configuration (the
//! PEM files read, only the configured CA trusted) is `sinks::tls`'s job.

use std::path::PathBuf;

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
