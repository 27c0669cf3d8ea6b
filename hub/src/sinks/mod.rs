//! Sinks: where the hub forwards what it stores — a cloud MQTT broker, a NATS
//! JetStream stream, an HTTP service — each in a region.
//!
//! Why a trait and a runner rather than code per sink in the session: the
//! promise (exactly once, residency, nothing dropped silently) is the same for
//! every sink, so it lives in one place — the runner, fed from durable rows of
//! the hub's store, retrying with backoff, checking residency at the last
//! step — and a sink only has to say when its far end has accepted a batch
//! (a PUBACK, a JetStream ack, a 2xx). A sink that cannot accept says whether
//! trying again can help ([`SinkError::Transient`]) or not
//! ([`SinkError::Rejected`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use futures::future::BoxFuture;
use outpost_protocols::{Event, Value};
use outpost_settings::HumanDuration;
use serde::Deserialize;

pub mod http;
pub mod jetstream;
pub mod mqtt;
pub mod runner;
pub(crate) mod tls;

/// One event as a sink receives it: as stored (minimised by the policy), with
/// the identity that makes it unique across the fleet: `(agent_id, seq)` is
/// the key sinks deduplicate by (`Nats-Msg-Id`, an HTTP idempotency key).
#[derive(Debug, Clone)]
pub struct SinkEvent {
    /// The event, with its agent and seq.
    pub event: Event,
    /// The agent's labels (from its `Hello`), for topic templates.
    pub labels: Arc<BTreeMap<String, String>>,
}

/// Why a sink did not accept a batch.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The far end is down, slow, or refused for now: the runner retries the
    /// same batch with backoff, and nothing behind it for this sink moves.
    #[error("{0}")]
    Transient(String),
    /// The far end refused the batch for good (a payload it will never
    /// take): none of it was accepted, or only by a far end that
    /// deduplicates. The runner delivers a rejected batch's events one at a
    /// time, and counts, logs and audits those rejected alone. Never used for
    /// anything a retry or an operator could fix.
    #[error("{0}")]
    Rejected(String),
    /// The sink's settings cannot work (a certificate that does not parse, a
    /// template naming an unknown field): the hub refuses to start.
    #[error("sink {id}: {key}: {message}")]
    Config {
        /// The sink's id.
        id: String,
        /// The config key, as `sinks.<id>.<key>`'s last part.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The OS would not give the sink its thread (see
    /// [`runner::start`]): the hub refuses to start.
    #[error("sink {id}: cannot start its thread: {message}")]
    Thread {
        /// The sink's id.
        id: String,
        /// What the OS said.
        message: String,
    },
}

/// A destination for stored events.
pub trait Sink: Send + Sync {
    /// Delivers `events` (ascending `(agent_id, seq)` per agent; never empty)
    /// and returns once the far end has accepted every one of them, as far
    /// as it can say so: a QoS 1 PUBACK, a JetStream publish ack, a 2xx. A
    /// batch delivered again after an error must be harmless (the far end
    /// deduplicates, or the sink documents that it delivers at least once).
    fn deliver<'a>(&'a self, events: &'a [SinkEvent]) -> BoxFuture<'a, Result<(), SinkError>>;

    /// How many deliveries the runner may have under way at once (it takes
    /// at most 4). More than one only for a sink that sends the batches of
    /// overlapping deliveries to its far end in the order the deliveries
    /// were first polled (the runner polls them in queue order), and that
    /// stays correct when a later batch is under way while an earlier one
    /// fails: after a failure the runner lets the attempts under way finish
    /// and then settles the batches one at a time, the failed one first
    /// (see [`runner`]). The default, one, is what a far end that may apply
    /// concurrent requests in any order (an HTTP service) needs.
    fn overlap(&self) -> usize {
        1
    }
}

/// `[[sinks]]`: one sink. The keys of its kind are in a table named after the
/// kind (`[sinks.mqtt]`, `[sinks.jetstream]`, `[sinks.http]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
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

/// How a payload is written: the event as JSON, or the value's own bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// `{"agent_id", "seq", "stream", "ts", "quality", "value", ...}`.
    #[default]
    Json,
    /// The value as published (JSON text, a string's bytes, raw bytes);
    /// numbers and booleans as their JSON text.
    Raw,
}

/// TLS to a sink: the CA that signs its certificate (else the system's
/// roots... none are bundled: a CA is required for TLS), and an optional
/// client certificate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkTls {
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
    pub tls: Option<SinkTls>,
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
    pub tls: Option<SinkTls>,
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
    pub tls: Option<SinkTls>,
}

/// `d` ± 25 %, so that sinks failing together do not retry in lockstep.
pub(crate) fn jitter(d: std::time::Duration) -> std::time::Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    // 0.75 .. 1.25 from the clock's low bits: enough spread, no RNG needed.
    let f = 0.75 + f64::from(nanos % 1000) / 2000.0;
    d.mul_f64(f)
}

/// Expands a topic or subject template for one event. `{label.x}` of a label
/// the agent does not have becomes `_`, so that a topic never has an empty
/// level.
pub fn expand(template: &str, event: &SinkEvent) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) => {
                let name = &after[..close];
                match name {
                    "agent_id" => out.push_str(event.event.agent_id.as_str()),
                    "stream" => out.push_str(event.event.body.stream.as_str()),
                    "seq" => out.push_str(&event.event.seq.0.to_string()),
                    _ => match name.strip_prefix("label.") {
                        Some(l) => out.push_str(
                            event
                                .labels
                                .get(l)
                                .map(String::as_str)
                                .filter(|v| !v.is_empty())
                                .unwrap_or("_"),
                        ),
                        None => {
                            out.push('{');
                            out.push_str(name);
                            out.push('}');
                        }
                    },
                }
                rest = &after[close + 1..];
            }
            None => {
                out.push_str(&rest[open..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Checks a template's placeholders; the message names the bad one.
pub fn check_template(template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("{template:?}: '{{' without '}}'"))?;
        let name = &after[..close];
        let ok = matches!(name, "agent_id" | "stream" | "seq")
            || name.strip_prefix("label.").is_some_and(|l| !l.is_empty());
        if !ok {
            return Err(format!(
                "{template:?}: unknown placeholder {{{name}}}; use {{agent_id}}, {{stream}}, {{seq}} or {{label.<name>}}"
            ));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

/// The payload of one event in `format`: `json` is the object `events tail`
/// prints (`agent_id`, `seq`, `stream`, `ts`, `value`, `quality`, `attrs`).
pub fn payload(event: &SinkEvent, format: PayloadFormat) -> Vec<u8> {
    match format {
        PayloadFormat::Json => {
            let mut out = Vec::with_capacity(128 + event.event.body.value.payload_len());
            event.event.write_json(&mut out);
            out
        }
        PayloadFormat::Raw => match &event.event.body.value {
            Value::Json(j) => j.as_str().as_bytes().to_vec(),
            Value::String(s) => s.as_bytes().to_vec(),
            Value::Bytes(b) => b.clone(),
            other => {
                let mut out = Vec::new();
                other.write_json(&mut out);
                out
            }
        },
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

/// Checks one `[[sinks]]` entry (the kind-specific checks that need files or
/// connections are the sink's own, at start); the error is `(key, message)`,
/// the key relative to the entry.
pub fn check(c: &SinkConfig) -> Result<(), (String, String)> {
    let bad = |k: &str, m: String| Err((k.to_owned(), m));
    if let Err(m) = check_id(&c.id) {
        return bad("id", m);
    }
    let tables = [
        ("mqtt", c.mqtt.is_some()),
        ("jetstream", c.jetstream.is_some()),
        ("http", c.http.is_some()),
    ];
    if !tables.iter().any(|(k, _)| *k == c.kind) {
        return bad(
            "kind",
            format!("{:?} is not one of mqtt, jetstream, http", c.kind),
        );
    }
    for (k, present) in tables {
        if k == c.kind && !present {
            return bad(k, format!("kind = {k:?} needs a [sinks.{k}] table"));
        }
        if k != c.kind && present {
            return bad(
                k,
                format!("a [sinks.{k}] table in a sink of kind {:?}", c.kind),
            );
        }
    }
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
    let template = match (&c.mqtt, &c.jetstream) {
        (Some(m), _) => Some(("mqtt.topic", &m.topic)),
        (_, Some(j)) => Some(("jetstream.subject", &j.subject)),
        _ => None,
    };
    if let Some((k, t)) = template {
        if let Err(m) = check_template(t) {
            return bad(k, m);
        }
    }
    Ok(())
}

/// Builds the sink an entry describes; relative paths in it are relative to
/// `base` (the config file's folder). Connections are made in the background
/// and remade when lost: a far end that is unreachable now is not an error
/// here (the runner retries, and says so), a setting that cannot work is
/// ([`SinkError::Config`]). Background tasks end when `stop` is cancelled.
pub async fn build(
    c: &SinkConfig,
    base: &std::path::Path,
    stop: tokio_util::sync::CancellationToken,
) -> Result<Arc<dyn Sink>, SinkError> {
    match c.kind.as_str() {
        "http" => http::build(c, base, stop).await,
        "mqtt" => mqtt::build(c, base, stop).await,
        "jetstream" => jetstream::build(c, base, stop).await,
        _ => Err(unknown_kind(c)),
    }
}

/// Checks what [`build`] checks of `c` (its files read, its certificates
/// and keys parsed) without connecting or starting anything: for a replica
/// that stands by while another runs the sink (see `runner::start`).
pub fn check_files(c: &SinkConfig, base: &std::path::Path) -> Result<(), SinkError> {
    match c.kind.as_str() {
        "http" => http::check_files(c, base),
        "mqtt" => mqtt::check_files(c, base),
        "jetstream" => jetstream::check_files(c, base),
        _ => Err(unknown_kind(c)),
    }
}

fn unknown_kind(c: &SinkConfig) -> SinkError {
    SinkError::Config {
        id: c.id.clone(),
        key: "kind".into(),
        message: format!("sinks of kind {:?} are not built yet", c.kind),
    }
}

#[cfg(test)]
mod tests;
