//! `[[sinks]]`: an entry as written ([`RawSinkConfig`]: a `kind` and a
//! table named after it) and as validated ([`SinkConfig`], whose kind table
//! is its [`SinkKind`] variant), with the checks that need no file and no
//! connection. What needs files (certificates, passwords) or a far end is
//! checked when the sink is built.
//!
//! Why the kind is read as text and not by serde's enum tagging: the
//! command-line contract's one-line errors name the key and the allowed
//! kinds (`sinks[0].kind: "kafka" is not one of mqtt, jetstream, http`), and
//! say which table is missing or out of place; serde's messages for a tagged
//! enum do neither.

use std::path::PathBuf;

use outpost_settings::HumanDuration;
use serde::Deserialize;

use super::cloudevents::CloudEventsMode;
use super::format::{check_template, PayloadFormat};
use crate::client_tls::ClientTls;

/// `[[sinks]]`: one sink, as written. The keys of its kind are in a table
/// named after the kind (`[sinks.mqtt]`, `[sinks.jetstream]`,
/// `[sinks.http]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSinkConfig {
    /// How policies' routes name it: 1 to 64 of `a-z 0-9 - _`; not `store`.
    pub id: String,
    /// `mqtt`, `jetstream` or `http`.
    pub kind: String,
    /// The region its far end stores data in (`eu-west`), for residency.
    /// Without it, no residency-bound stream reaches it.
    #[serde(default)]
    pub region: Option<String>,
    /// The most events in one delivery.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// The first wait after a failed delivery; it doubles up to `retry_max`.
    #[serde(default = "default_retry_min")]
    pub retry_min: HumanDuration,
    /// The longest wait between retries.
    #[serde(default = "default_retry_max")]
    pub retry_max: HumanDuration,
    /// `[sinks.mqtt]`, for `kind = "mqtt"`.
    #[serde(default)]
    pub mqtt: Option<MqttSinkConfig>,
    /// `[sinks.jetstream]`, for `kind = "jetstream"`.
    #[serde(default)]
    pub jetstream: Option<JetStreamSinkConfig>,
    /// `[sinks.http]`, for `kind = "http"`.
    #[serde(default)]
    pub http: Option<HttpSinkConfig>,
}

fn default_batch_max() -> usize {
    500
}
fn default_retry_min() -> HumanDuration {
    HumanDuration(std::time::Duration::from_millis(200))
}
fn default_retry_max() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(30))
}

/// One sink, its kind resolved. Deserialising one resolves the kind only
/// ([`RawSinkConfig::resolve`]); the hub's config loader validates it all
/// ([`RawSinkConfig::validate`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawSinkConfig")]
pub struct SinkConfig {
    /// How policies' routes name it.
    pub id: String,
    /// The region its far end stores data in, for residency.
    pub region: Option<String>,
    /// The most events in one delivery.
    pub batch_max: usize,
    /// The first wait after a failed delivery; it doubles up to `retry_max`.
    pub retry_min: HumanDuration,
    /// The longest wait between retries.
    pub retry_max: HumanDuration,
    /// Which far end, with its table.
    pub kind: SinkKind,
}

/// A sink's kind and the table of that name.
#[derive(Debug, Clone)]
pub enum SinkKind {
    /// `kind = "mqtt"`, `[sinks.mqtt]`.
    Mqtt(MqttSinkConfig),
    /// `kind = "jetstream"`, `[sinks.jetstream]`.
    JetStream(JetStreamSinkConfig),
    /// `kind = "http"`, `[sinks.http]`.
    Http(HttpSinkConfig),
}

impl SinkKind {
    /// The kind as `kind` names it.
    pub fn name(&self) -> &'static str {
        match self {
            SinkKind::Mqtt(_) => "mqtt",
            SinkKind::JetStream(_) => "jetstream",
            SinkKind::Http(_) => "http",
        }
    }
}

/// A `[[sinks]]` entry that breaks a rule: the key, relative to the entry,
/// and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct SinkConfigError {
    /// The key, such as `kind` or `mqtt.topic`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

fn bad<T>(key: &str, message: String) -> Result<T, SinkConfigError> {
    Err(SinkConfigError {
        key: key.to_owned(),
        message,
    })
}

impl RawSinkConfig {
    /// Checks the entry (what needs files or connections is the sink's own,
    /// at start) and resolves its kind.
    pub fn validate(self) -> Result<SinkConfig, SinkConfigError> {
        if let Err(m) = check_id(&self.id) {
            return bad("id", m);
        }
        let c = self.resolve()?;
        if c.region.as_deref().is_some_and(|r| r.trim().is_empty()) {
            return bad("region", "must not be empty; leave it out instead".into());
        }
        if !(1..=10_000).contains(&c.batch_max) {
            return bad("batch_max", format!("{} is not 1 to 10000", c.batch_max));
        }
        if c.retry_min.0.is_zero() || c.retry_min.0 > c.retry_max.0 {
            return bad(
                "retry_min",
                "must be longer than zero and not exceed retry_max".into(),
            );
        }
        let template = match &c.kind {
            SinkKind::Mqtt(m) => Some(("mqtt.topic", &m.topic)),
            SinkKind::JetStream(j) => Some(("jetstream.subject", &j.subject)),
            SinkKind::Http(_) => None,
        };
        if let Some((k, t)) = template {
            if let Err(m) = check_template(t) {
                return bad(k, m);
            }
        }
        if let SinkKind::Http(h) = &c.kind {
            if h.payload == PayloadFormat::Raw {
                return bad(
                    "http.payload",
                    "\"raw\" is not one of json, cloudevents: a request carries a batch, not one value".into(),
                );
            }
            if h.cloudevents_mode.is_some() && h.payload != PayloadFormat::CloudEvents {
                return bad(
                    "http.cloudevents_mode",
                    "applies only with payload = \"cloudevents\"".into(),
                );
            }
        }
        Ok(c)
    }

    /// The entry with its kind resolved: `kind` must be a known one, its
    /// table present, and no other kind's table.
    pub fn resolve(self) -> Result<SinkConfig, SinkConfigError> {
        const KINDS: [&str; 3] = ["mqtt", "jetstream", "http"];
        let kind = self.kind.as_str();
        if !KINDS.contains(&kind) {
            return bad(
                "kind",
                format!("{kind:?} is not one of mqtt, jetstream, http"),
            );
        }
        let tables = [
            ("mqtt", self.mqtt.map(SinkKind::Mqtt)),
            ("jetstream", self.jetstream.map(SinkKind::JetStream)),
            ("http", self.http.map(SinkKind::Http)),
        ];
        let mut chosen = None;
        for (k, table) in tables {
            match (k == kind, table) {
                (true, Some(t)) => chosen = Some(t),
                (true, None) => return bad(k, format!("kind = {k:?} needs a [sinks.{k}] table")),
                (false, Some(_)) => {
                    return bad(k, format!("a [sinks.{k}] table in a sink of kind {kind:?}"))
                }
                (false, None) => {}
            }
        }
        let Some(kind) = chosen else {
            return bad(
                "kind",
                format!("{kind:?} is not one of mqtt, jetstream, http"),
            );
        };
        Ok(SinkConfig {
            id: self.id,
            region: self.region,
            batch_max: self.batch_max,
            retry_min: self.retry_min,
            retry_max: self.retry_max,
            kind,
        })
    }
}

impl TryFrom<RawSinkConfig> for SinkConfig {
    type Error = SinkConfigError;

    fn try_from(raw: RawSinkConfig) -> Result<SinkConfig, SinkConfigError> {
        raw.resolve()
    }
}

/// The sink ids a policy's routes may name besides `store`: 1 to 64 of
/// `a-z 0-9 - _`.
pub fn check_id(id: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !ok {
        return Err(format!("{id:?} must be 1 to 64 of a-z, 0-9, '-' and '_'"));
    }
    if id == outpost_protocols::policy::STORE_SINK {
        return Err(format!("{id:?} names the hub's own store"));
    }
    Ok(())
}

/// `[sinks.mqtt]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSinkConfig {
    /// `host:port` of the broker.
    pub broker: String,
    /// The client id (unique on the broker).
    pub client_id: String,
    /// Topic template: `{agent_id}`, `{stream}`, `{seq}` and
    /// `{label.<name>}` are replaced.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// `json` (default) or `raw`.
    #[serde(default)]
    pub payload: PayloadFormat,
    /// User name, with `password_file`.
    #[serde(default)]
    pub username: Option<String>,
    /// A file whose first line is the password (never in the config itself).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// `[sinks.mqtt.tls]`: without it, plain TCP.
    #[serde(default)]
    pub tls: Option<ClientTls>,
    /// QoS 1 publishes unacknowledged at once.
    #[serde(default = "default_inflight")]
    pub max_inflight: u16,
}

fn default_topic() -> String {
    "outpost/{agent_id}/{stream}".into()
}
fn default_inflight() -> u16 {
    100
}

/// `[sinks.jetstream]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JetStreamSinkConfig {
    /// `nats://host:port` (or `tls://host:port`).
    pub url: String,
    /// The stream that must capture `subject` (created by the operator; the
    /// hub does not create or change it).
    pub stream: String,
    /// Subject template, as the MQTT topic's (`.` separates tokens; a
    /// stream's `/` become `.`).
    #[serde(default = "default_subject")]
    pub subject: String,
    /// `json` (default) or `raw`.
    #[serde(default)]
    pub payload: PayloadFormat,
    /// A NATS credentials file (`.creds`).
    #[serde(default)]
    pub credentials: Option<PathBuf>,
    /// `[sinks.jetstream.tls]`.
    #[serde(default)]
    pub tls: Option<ClientTls>,
    /// How long to wait for the stream's acknowledgement of a publish.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
}

fn default_subject() -> String {
    "outpost.{agent_id}.{stream}".into()
}
fn default_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(10))
}

/// `[sinks.http]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkConfig {
    /// `http://` or `https://` URL the batches are POSTed to.
    pub url: String,
    /// A header sent with every request (`Authorization`), with
    /// `auth_value_file`.
    #[serde(default)]
    pub auth_header: Option<String>,
    /// A file whose first line is the header's value (never in the config).
    #[serde(default)]
    pub auth_value_file: Option<PathBuf>,
    /// How long one request may take.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// `[sinks.http.tls]`: the CA for an `https://` URL, an optional client
    /// certificate.
    #[serde(default)]
    pub tls: Option<ClientTls>,
    /// `json` (default: one `{"events":[…]}` per batch) or `cloudevents`.
    #[serde(default)]
    pub payload: PayloadFormat,
    /// With `payload = "cloudevents"`: `structured` (default; one request
    /// per event), `binary` (one request per event, attributes as `ce-`
    /// headers) or `batch` (one request per batch, a JSON array).
    #[serde(default)]
    pub cloudevents_mode: Option<CloudEventsMode>,
}
