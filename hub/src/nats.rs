//! NATS connections, for the JetStream store and the JetStream sink.
//!
//! Why one room below both: they name their servers the same way
//! (`nats://` or `tls://` URLs, a `.creds` file, a `tls` table), refuse the
//! same mistakes in them (a password in a URL, a stream name with a `.`),
//! and publish with the same headers. The store used to borrow all of this
//! from the sink, so that the store imported the sinks and the sinks' runner
//! the store. What differs stays with each user: the store lets async-nats
//! reconnect, the sink makes every connection itself (see
//! `sinks::jetstream`).

use std::path::{Path, PathBuf};
use std::str::FromStr as _;
use std::time::Duration;

use async_nats::jetstream::context::ContextBuilder;
use async_nats::jetstream::message::PublishMessage;
use async_nats::{ConnectOptions, ServerAddr};

use crate::client_tls::{self, ClientTls, ClientTlsError};

/// `nats://host:port` or `tls://host:port` (a bare `host:port` is `nats://`);
/// no user or password in it.
pub fn parse_url(url: &str) -> Result<ServerAddr, String> {
    let addr = ServerAddr::from_str(url).map_err(|e| format!("{url:?}: {e}"))?;
    match addr.scheme() {
        "nats" | "tls" => {}
        other => {
            return Err(format!(
                "{url:?}: scheme {other:?} is not supported; use nats:// or tls://"
            ))
        }
    }
    if addr.has_user_pass() {
        return Err(format!(
            "{url:?}: no user or password in the URL; use `credentials`"
        ));
    }
    if addr.host().is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    Ok(addr)
}

/// Several URLs, comma-separated, as for a cluster ([`parse_url`] each).
pub fn parse_urls(urls: &str) -> Result<Vec<ServerAddr>, String> {
    urls.split(',').map(|u| parse_url(u.trim())).collect()
}

/// Whether `c` cannot be part of a subject token (nor of a stream name).
pub fn unsafe_subject_char(c: char) -> bool {
    matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control()
}

/// A JetStream stream name, as the server takes it: no whitespace, `.`, `*`,
/// `>` or path separators.
pub fn check_stream_name(s: &str) -> Result<(), String> {
    let bad = s.is_empty()
        || s.len() > 255
        || s.chars()
            .any(|c| unsafe_subject_char(c) || matches!(c, '/' | '\\'));
    if bad {
        return Err(format!(
            "{s:?} is not a stream name: 1 to 255 characters, none of '.', '*', '>', '/', '\\' or whitespace"
        ));
    }
    Ok(())
}

/// Why the files an [`Endpoint`] names cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// The credentials file could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    CredentialsUnreadable {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The credentials file is not a NATS `.creds` file.
    #[error("{} is not a NATS credentials file: {source}", .path.display())]
    NotCredentials {
        /// The file.
        path: PathBuf,
        /// What async-nats said.
        #[source]
        source: std::io::Error,
    },
    /// The `tls` table cannot work (a CA that does not parse, a key without
    /// its certificate).
    #[error(transparent)]
    Tls(ClientTlsError),
}

impl EndpointError {
    /// The key at fault, relative to the table that configures the
    /// connection (`credentials`, `tls.ca`).
    pub fn key(&self) -> String {
        match self {
            EndpointError::CredentialsUnreadable { .. } | EndpointError::NotCredentials { .. } => {
                "credentials".into()
            }
            EndpointError::Tls(e) => format!("tls.{}", e.key()),
        }
    }
}

/// The servers to connect to and how, with the credentials file read and
/// the TLS configuration built: made once (when the store opens, when a
/// sink is built), so that a file that cannot work is found then and not at
/// every connection.
#[derive(Clone)]
pub struct Endpoint {
    /// The servers as configured, for messages.
    url: String,
    servers: Vec<ServerAddr>,
    /// The `.creds` file and its text, checked to parse.
    credentials: Option<(PathBuf, String)>,
    tls: Option<rustls::ClientConfig>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &self.url)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Reads `credentials` and `tls` (paths relative to `base`) for a
    /// connection to `servers` (`url` as configured).
    pub fn read(
        url: &str,
        servers: Vec<ServerAddr>,
        credentials: Option<&Path>,
        tls: Option<&ClientTls>,
        base: &Path,
    ) -> Result<Endpoint, EndpointError> {
        let credentials = credentials
            .map(|p| read_credentials(&base.join(p)))
            .transpose()?;
        let tls = tls.map(|t| tls_config(t, base)).transpose()?;
        Ok(Endpoint {
            url: url.to_owned(),
            servers,
            credentials,
            tls,
        })
    }

    /// The servers, as configured.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The servers to connect to.
    pub fn servers(&self) -> &[ServerAddr] {
        &self.servers
    }

    /// Whether a server is named `tls://`, which needs a `tls` table.
    pub fn tls_required(&self) -> bool {
        self.servers.iter().any(ServerAddr::tls_required)
    }

    /// Whether a `tls` table was given.
    pub fn has_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Connection options named `name`, waiting `timeout` to connect, with
    /// the credentials and (when a `tls` table was given, required) TLS.
    pub fn options(&self, name: &str, timeout: Duration) -> Result<ConnectOptions, EndpointError> {
        let mut o = ConnectOptions::new().name(name).connection_timeout(timeout);
        if let Some((path, text)) = &self.credentials {
            o = o
                .credentials(text)
                .map_err(|source| EndpointError::NotCredentials {
                    path: path.clone(),
                    source,
                })?;
        }
        if let Some(t) = &self.tls {
            o = o.require_tls(true).tls_client_config(t.clone());
        }
        Ok(o)
    }
}

/// The text of a `.creds` file, checked to parse.
fn read_credentials(path: &Path) -> Result<(PathBuf, String), EndpointError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| EndpointError::CredentialsUnreadable {
            path: path.to_owned(),
            source,
        })?;
    ConnectOptions::new()
        .credentials(&text)
        .map_err(|source| EndpointError::NotCredentials {
            path: path.to_owned(),
            source,
        })?;
    Ok((path.to_owned(), text))
}

/// `tls` as a rustls client configuration.
fn tls_config(tls: &ClientTls, base: &Path) -> Result<rustls::ClientConfig, EndpointError> {
    client_tls::client_config(Some(tls), base).map_err(EndpointError::Tls)
}

/// A JetStream context on `client` that waits `timeout` for each request and
/// acknowledgement, with at most `max_inflight` publishes awaiting theirs
/// (a publish beyond that waits for room, rather than failing).
pub fn jetstream(
    client: async_nats::Client,
    timeout: Duration,
    max_inflight: usize,
) -> async_nats::jetstream::Context {
    ContextBuilder::new()
        .timeout(timeout)
        .ack_timeout(timeout)
        .max_ack_inflight(max_inflight)
        .backpressure_on_inflight(true)
        .build(client)
}

/// A publish of `payload` that the stream deduplicates by `id`
/// (`Nats-Msg-Id`) and that only `stream` may store
/// (`Nats-Expected-Stream`: a subject some other stream captures is refused
/// rather than stored there).
pub fn message(payload: bytes::Bytes, id: &str, stream: &str) -> PublishMessage {
    PublishMessage::build()
        .payload(payload)
        .message_id(id)
        .expected_stream(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_stream_names_are_checked() {
        assert!(parse_url("nats://127.0.0.1:4222").is_ok());
        assert!(parse_url("tls://nats.example:4222").is_ok());
        assert!(parse_url("127.0.0.1:4222").is_ok());
        assert!(parse_url("http://127.0.0.1:4222").is_err());
        assert!(parse_url("ws://127.0.0.1:4222").is_err());
        assert!(parse_url("nats://u:p@127.0.0.1:4222").is_err());
        assert!(parse_url("nats://").is_err());
        assert!(check_stream_name("EVENTS").is_ok());
        assert!(check_stream_name("a.b").is_err());
        assert!(check_stream_name("").is_err());
        assert!(check_stream_name("a/b").is_err());
    }

    #[test]
    fn a_cluster_is_several_urls() {
        let servers = parse_urls("nats://a:4222, nats://b:4222,tls://c:4222").expect("urls");
        assert_eq!(servers.len(), 3);
        assert!(parse_urls("nats://a:4222,http://b").is_err());
    }
}
