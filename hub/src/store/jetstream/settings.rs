//! `[store.jetstream]`: the table as written ([`RawJetStreamStoreConfig`])
//! and the settings it is validated into ([`JetStreamStoreConfig`]).
//!
//! Why validated apart from the connection: `check` and the hub's config
//! loader refuse a table that cannot work (a bad URL, overlapping subjects)
//! with one line naming the key, without a server; only what needs the
//! server or the files is found when the store opens.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::ServerAddr;
use outpost_settings::HumanDuration;
use serde::Deserialize;

use crate::client_tls::ClientTls;
use crate::nats;

/// `[store.jetstream]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJetStreamStoreConfig {
    /// `nats://host:port` (or `tls://`); several, comma-separated, for a
    /// cluster.
    pub url: String,
    /// The events stream; created if missing.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Subject prefix: events go to `<subject>.<agent_id>`.
    #[serde(default = "default_subject")]
    pub subject: String,
    /// The sinks' queues (`[[sinks]]`); created if missing.
    #[serde(default = "default_sinks_stream")]
    pub sinks_stream: String,
    /// Their subject prefix: an event waits for sink `s` on
    /// `<sinks_subject>.<s>.<agent_id>`.
    #[serde(default = "default_sinks_subject")]
    pub sinks_subject: String,
    /// Prefix of the key-value buckets (`<prefix>_watermarks`, ...).
    #[serde(default = "default_prefix")]
    pub bucket_prefix: String,
    /// Replicas of the stream and buckets the hub creates (1, 3 or 5 in a
    /// cluster).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// The stream's duplicate window, when the hub creates it.
    #[serde(default = "default_window")]
    pub duplicate_window: HumanDuration,
    /// How long to wait for the server: connecting, each acknowledgement.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// A NATS credentials file (`.creds`).
    #[serde(default)]
    pub credentials: Option<PathBuf>,
    /// `[store.jetstream.tls]`, as a sink's.
    #[serde(default)]
    pub tls: Option<ClientTls>,
}

fn default_stream() -> String {
    "OUTPOST_EVENTS".into()
}
fn default_subject() -> String {
    "outpost.events".into()
}
fn default_sinks_stream() -> String {
    "OUTPOST_SINKS".into()
}
fn default_sinks_subject() -> String {
    "outpost.sinks".into()
}
fn default_prefix() -> String {
    "outpost".into()
}
fn default_replicas() -> usize {
    1
}
fn default_window() -> HumanDuration {
    HumanDuration(Duration::from_secs(120))
}
fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

/// `[store.jetstream]`, validated: the servers parsed, the names and
/// subjects checked. Made only by [`RawJetStreamStoreConfig::validate`].
#[derive(Debug, Clone)]
pub struct JetStreamStoreConfig {
    pub(crate) url: String,
    pub(crate) servers: Vec<ServerAddr>,
    pub(crate) stream: String,
    pub(crate) subject: String,
    pub(crate) sinks_stream: String,
    pub(crate) sinks_subject: String,
    pub(crate) bucket_prefix: String,
    pub(crate) replicas: usize,
    pub(crate) duplicate_window: Duration,
    pub(crate) timeout: Duration,
    pub(crate) credentials: Option<PathBuf>,
    pub(crate) tls: Option<ClientTls>,
}

impl JetStreamStoreConfig {
    /// The servers, as configured.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The name of the key-value bucket `name` (`<prefix>_<name>`).
    pub(crate) fn bucket(&self, name: &str) -> String {
        format!("{}_{name}", self.bucket_prefix)
    }
}

impl RawJetStreamStoreConfig {
    /// Checks what can be checked without a server; the error is `(key,
    /// message)` of the first problem, the key relative to
    /// `store.jetstream`.
    pub fn validate(self) -> Result<JetStreamStoreConfig, (&'static str, String)> {
        let servers = nats::parse_urls(&self.url).map_err(|m| ("url", m))?;
        nats::check_stream_name(&self.stream).map_err(|m| ("stream", m))?;
        nats::check_stream_name(&self.sinks_stream).map_err(|m| ("sinks_stream", m))?;
        if self.sinks_stream == self.stream {
            return Err((
                "sinks_stream",
                format!("{:?} is the events stream's name too", self.stream),
            ));
        }
        check_prefix(&self.subject).map_err(|m| ("subject", m))?;
        check_prefix(&self.sinks_subject).map_err(|m| ("sinks_subject", m))?;
        let (a, b) = (
            format!("{}.", self.subject),
            format!("{}.", self.sinks_subject),
        );
        if a.starts_with(&b) || b.starts_with(&a) {
            return Err((
                "sinks_subject",
                format!(
                    "{:?} and subject {:?} overlap: the two streams need subjects of their own",
                    self.sinks_subject, self.subject
                ),
            ));
        }
        check_bucket_prefix(&self.bucket_prefix).map_err(|m| ("bucket_prefix", m))?;
        if !(1..=5).contains(&self.replicas) {
            return Err(("replicas", format!("{} is not 1..=5", self.replicas)));
        }
        if self.duplicate_window.0.is_zero() {
            return Err(("duplicate_window", "must be longer than zero".into()));
        }
        if self.timeout.0.is_zero() {
            return Err(("timeout", "must be longer than zero".into()));
        }
        Ok(JetStreamStoreConfig {
            url: self.url,
            servers,
            stream: self.stream,
            subject: self.subject,
            sinks_stream: self.sinks_stream,
            sinks_subject: self.sinks_subject,
            bucket_prefix: self.bucket_prefix,
            replicas: self.replicas,
            duplicate_window: self.duplicate_window.0,
            timeout: self.timeout.0,
            credentials: self.credentials,
            tls: self.tls,
        })
    }
}

/// A subject prefix: tokens separated by `.`, none empty, no wildcards.
fn check_prefix(p: &str) -> Result<(), String> {
    let bad = p.is_empty()
        || p.split('.').any(|t| {
            t.is_empty()
                || t.bytes()
                    .any(|b| matches!(b, b'*' | b'>') || b.is_ascii_whitespace() || b < 0x20)
        });
    if bad {
        return Err(format!(
            "{p:?} is not a subject prefix: tokens separated by `.`, none empty, no `*`, `>` or whitespace"
        ));
    }
    Ok(())
}

/// A key-value bucket name's prefix: letters, digits, `_` and `-`.
fn check_bucket_prefix(p: &str) -> Result<(), String> {
    if p.is_empty()
        || !p
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    {
        return Err(format!(
            "{p:?}: letters, digits, `_` and `-` only (a KV bucket name)"
        ));
    }
    Ok(())
}
