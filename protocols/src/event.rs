//! The event: the one record every part of Outpost moves.
//!
//! An event is `(agent_id, seq, stream, ts, value, quality, attrs)`. The agent
//! creates the [`EventBody`] when a source produces a sample or message; the
//! outbox gives it a [`Seq`] when it commits, and the agent's identity comes from
//! its certificate, so `agent_id` and `seq` are attached outside the body.
//!
//! Bodies are stored and sent as postcard, which is compact but not
//! self-describing: enum variants are encoded by index, so variants are only ever
//! appended, never reordered or removed.
//!
//! ```text
//! EventBody (postcard)
//!   stream   varint length + UTF-8
//!   ts       zigzag varint i64, Unix nanoseconds
//!   value    varint variant index + payload
//!   quality  varint variant index (+ reason)
//!   attrs    varint count + (key, value) strings, sorted by key
//! ```

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The agent-assigned sequence number of an event.
///
/// Strictly increasing per agent, never reused, survives restarts. Seqs start
/// at 1; `Seq(0)`, the default, stands for "none yet" in watermarks.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Seq(pub u64);

impl Seq {
    /// The sequence number after this one.
    #[must_use]
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Errors from parsing the identifiers and values of the event model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// An agent id was empty, longer than 64 bytes or used a character other than
    /// ASCII letters, digits, `.`, `_` and `-`.
    #[error("invalid agent id {0:?}: use 1 to 64 ASCII letters, digits, '.', '_' or '-'")]
    InvalidAgentId(String),
    /// A stream name was empty, longer than 65535 bytes (the MQTT topic limit), or held a NUL or an MQTT
    /// wildcard (`+`, `#`).
    #[error("invalid stream name {0:?}: must be 1 to 65535 bytes without NUL, '+' or '#'")]
    InvalidStreamName(String),
    /// A JSON value did not parse.
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
}

/// An agent's identity, as written in its certificate (`urn:outpost:agent:<id>`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AgentId(String);

impl AgentId {
    /// Parses an agent id.
    pub fn parse(s: &str) -> Result<AgentId, EventError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(AgentId(s.to_owned()))
        } else {
            Err(EventError::InvalidAgentId(s.to_owned()))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for AgentId {
    type Error = EventError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        AgentId::parse(&s)
    }
}

impl From<AgentId> for String {
    fn from(a: AgentId) -> String {
        a.0
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A `/`-separated stream name: `<device>/<tag>` for Modbus, the topic for MQTT.
///
/// Wildcards are refused because a stream is always a concrete name; patterns
/// over streams are `TopicFilter`s.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StreamName(String);

impl StreamName {
    /// Parses a stream name.
    pub fn parse(s: &str) -> Result<StreamName, EventError> {
        let ok = !s.is_empty() && s.len() <= 65535 && !s.contains(['\0', '+', '#']);
        if ok {
            Ok(StreamName(s.to_owned()))
        } else {
            Err(EventError::InvalidStreamName(s.to_owned()))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// [`BRIDGE_WRITES_STREAM`], which is valid by construction.
    pub fn bridge_writes() -> StreamName {
        StreamName(BRIDGE_WRITES_STREAM.to_owned())
    }

    /// Whether the name is in the namespace the agent keeps for its own
    /// records ([`RESERVED_PREFIX`]).
    pub fn is_reserved(&self) -> bool {
        is_reserved(&self.0)
    }
}

/// The first level of the streams the agent writes about itself, such as
/// [`BRIDGE_WRITES_STREAM`]. `$` because MQTT keeps topics starting with it
/// for the broker's own use: no filter starting with a wildcard matches
/// them, so neither a site's `#` subscription nor a policy's `#` rule takes
/// one by accident, and the agent refuses a subscription that names it.
pub const RESERVED_PREFIX: &str = "$outpost/";

/// The stream of the agent's record of every write an MQTT → Modbus bridge
/// made (or refused, or failed): topic, device, tag, value and outcome.
pub const BRIDGE_WRITES_STREAM: &str = "$outpost/bridge/writes";

/// Whether a stream name or topic is in the reserved namespace: its first
/// level is `$outpost`.
pub fn is_reserved(name: &str) -> bool {
    name.split('/').next() == Some(RESERVED_PREFIX.trim_end_matches('/'))
}

impl TryFrom<String> for StreamName {
    type Error = EventError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        StreamName::parse(&s)
    }
}

impl From<StreamName> for String {
    fn from(s: StreamName) -> String {
        s.0
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Event time in Unix nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(pub i64);

/// A JSON document kept as its text.
///
/// postcard cannot carry `serde_json::Value` (it is not self-describing), so
/// JSON travels as text that is known to parse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JsonText(String);

impl JsonText {
    /// Parses JSON text, keeping it as given.
    pub fn parse(s: &str) -> Result<JsonText, EventError> {
        serde_json::from_str::<serde::de::IgnoredAny>(s)
            .map_err(|e| EventError::InvalidJson(e.to_string()))?;
        Ok(JsonText(s.to_owned()))
    }

    /// Serialises a JSON value.
    pub fn from_value(v: &serde_json::Value) -> JsonText {
        JsonText(v.to_string())
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The parsed JSON value.
    pub fn to_value(&self) -> serde_json::Value {
        // The text was checked when this value was made, so this cannot fail; a
        // null keeps the function total anyway.
        serde_json::from_str(&self.0).unwrap_or(serde_json::Value::Null)
    }
}

impl TryFrom<String> for JsonText {
    type Error = EventError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        JsonText::parse(&s)
    }
}

impl From<JsonText> for String {
    fn from(j: JsonText) -> String {
        j.0
    }
}

/// A typed value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Value {
    /// A boolean (coil, discrete input, bit in a register).
    Bool(bool),
    /// A signed integer.
    I64(i64),
    /// An unsigned integer.
    U64(u64),
    /// A float (also every scaled register value).
    F64(f64),
    /// UTF-8 text.
    String(String),
    /// Opaque bytes (an MQTT payload that is not UTF-8).
    Bytes(Vec<u8>),
    /// A JSON document (an MQTT payload that parses as JSON).
    Json(JsonText),
}

impl Value {
    /// Classifies an MQTT payload: JSON if it parses as JSON, text if it is
    /// UTF-8, bytes otherwise. Nothing is rejected.
    pub fn from_payload(payload: &[u8]) -> Value {
        match std::str::from_utf8(payload) {
            Ok(text) => match JsonText::parse(text) {
                Ok(json) => Value::Json(json),
                Err(_) => Value::String(text.to_owned()),
            },
            Err(_) => Value::Bytes(payload.to_vec()),
        }
    }

    /// The value as JSON, for `tail` output and JSON payloads.
    ///
    /// Integers and floats become numbers (a non-finite float becomes the string
    /// `"NaN"`, `"inf"` or `"-inf"`), bytes become `{"base64": "..."}`, and JSON is
    /// embedded as itself.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::Bool(b) => J::Bool(*b),
            Value::I64(i) => J::from(*i),
            Value::U64(u) => J::from(*u),
            Value::F64(f) => serde_json::Number::from_f64(*f)
                .map(J::Number)
                .unwrap_or_else(|| J::String(f.to_string())),
            Value::String(s) => J::String(s.clone()),
            Value::Bytes(b) => {
                let mut m = serde_json::Map::new();
                m.insert(
                    "base64".into(),
                    J::String(base64::engine::general_purpose::STANDARD.encode(b)),
                );
                J::Object(m)
            }
            Value::Json(j) => j.to_value(),
        }
    }

    /// Writes [`Value::to_json`] into `out` without building it, except that a
    /// JSON document is embedded as the text it arrived as (less the
    /// whitespace around it): the device's key order and number digits stay,
    /// and nothing is parsed again. Text that spans lines is written compact
    /// instead, so that an event stays one line.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Value::I64(i) => write_display(out, i),
            Value::U64(u) => write_display(out, u),
            Value::F64(f) if f.is_finite() => json_into(out, f),
            Value::F64(f) => json_into(out, &f.to_string()),
            Value::String(s) => json_into(out, s),
            Value::Bytes(b) => {
                out.extend_from_slice(b"{\"base64\":\"");
                out.extend_from_slice(
                    base64::engine::general_purpose::STANDARD
                        .encode(b)
                        .as_bytes(),
                );
                out.extend_from_slice(b"\"}");
            }
            Value::Json(j) => {
                let text = j.as_str().trim_matches([' ', '\t', '\n', '\r']);
                if text.contains(['\n', '\r']) {
                    json_into(out, &j.to_value());
                } else {
                    out.extend_from_slice(text.as_bytes());
                }
            }
        }
    }

    /// The value as a float, where it is numeric or boolean.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
            Value::I64(i) => Some(*i as f64),
            Value::U64(u) => Some(*u as f64),
            Value::F64(f) => Some(*f),
            _ => None,
        }
    }

    /// The size of the payload in bytes, for accounting.
    pub fn payload_len(&self) -> usize {
        match self {
            Value::Bool(_) => 1,
            Value::I64(_) | Value::U64(_) | Value::F64(_) => 8,
            Value::String(s) => s.len(),
            Value::Bytes(b) => b.len(),
            Value::Json(j) => j.as_str().len(),
        }
    }
}

/// Why a value is not good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Reason {
    /// The Modbus device answered with an exception code
    /// (Modbus Application Protocol v1.1b3, section 7).
    ModbusException(u8),
    /// The device did not answer within the configured timeout.
    Timeout,
    /// The connection to the device failed or was closed.
    Disconnected,
    /// The device answered with fewer registers or bits than requested.
    ShortReply {
        /// How many were asked for.
        expected: u16,
        /// How many came back.
        got: u16,
    },
    /// The raw data could not be decoded as the configured type.
    Decode(String),
    /// Anything else, as text.
    Other(String),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::ModbusException(code) => {
                let name = match code {
                    1 => "illegal function",
                    2 => "illegal data address",
                    3 => "illegal data value",
                    4 => "server device failure",
                    5 => "acknowledge",
                    6 => "server device busy",
                    8 => "memory parity error",
                    10 => "gateway path unavailable",
                    11 => "gateway target device failed to respond",
                    _ => "unknown exception",
                };
                write!(f, "modbus exception {code:#04x} ({name})")
            }
            Reason::Timeout => f.write_str("timeout"),
            Reason::Disconnected => f.write_str("disconnected"),
            Reason::ShortReply { expected, got } => {
                write!(f, "short reply: expected {expected}, got {got}")
            }
            Reason::Decode(msg) => write!(f, "decode error: {msg}"),
            Reason::Other(msg) => f.write_str(msg),
        }
    }
}

/// How far a value can be trusted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[non_exhaustive]
pub enum Quality {
    /// The value was read or received as it is.
    #[default]
    Good,
    /// There is no usable value; the reason says why.
    Bad(Reason),
    /// A value is present but may be stale or approximate.
    Uncertain(Reason),
}

impl Quality {
    /// The quality as JSON: `{"status": "good"}` or
    /// `{"status": "bad", "reason": "timeout"}`.
    pub fn to_json(&self) -> serde_json::Value {
        let (status, reason) = self.parts();
        let mut m = serde_json::Map::new();
        m.insert("status".into(), status.into());
        if let Some(r) = reason {
            m.insert("reason".into(), r.to_string().into());
        }
        serde_json::Value::Object(m)
    }

    /// The JSON `status` and the reason, if any.
    fn parts(&self) -> (&'static str, Option<&Reason>) {
        match self {
            Quality::Good => ("good", None),
            Quality::Bad(r) => ("bad", Some(r)),
            Quality::Uncertain(r) => ("uncertain", Some(r)),
        }
    }

    /// Writes [`Quality::to_json`] into `out`, keys in the same order.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let (status, reason) = self.parts();
        out.push(b'{');
        if let Some(r) = reason {
            out.extend_from_slice(b"\"reason\":");
            json_into(out, &r.to_string());
            out.push(b',');
        }
        out.extend_from_slice(b"\"status\":");
        json_into(out, status);
        out.push(b'}');
    }
}

/// Appends `v` as JSON. Writing into a `Vec` cannot fail, nor can
/// serialising these types (strings, numbers, maps of strings).
fn json_into<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    let _ = serde_json::to_writer(&mut *out, v);
}

/// Appends a number as its decimal digits.
fn write_display(out: &mut Vec<u8>, v: &dyn fmt::Display) {
    use std::io::Write as _;
    let _ = write!(out, "{v}");
}

/// What a source produces: an event before it has a seq or an agent id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBody {
    /// The stream the event belongs to.
    pub stream: StreamName,
    /// Event time.
    pub ts: Timestamp,
    /// The value.
    pub value: Value,
    /// The value's quality.
    pub quality: Quality,
    /// Per-event attributes (for example the MQTT QoS or a Modbus unit id).
    pub attrs: BTreeMap<String, String>,
}

impl EventBody {
    /// Encodes the body as postcard.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising into a Vec cannot fail for these types: every field is a
        // plain value postcard supports.
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes a body from postcard.
    pub fn decode(bytes: &[u8]) -> Result<EventBody, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

/// A complete event: a body with its agent and sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The agent that accepted the event.
    pub agent_id: AgentId,
    /// The agent's sequence number for it.
    pub seq: Seq,
    /// What happened.
    pub body: EventBody,
}

impl Event {
    /// The event as the one-line JSON object that `outbox tail` and
    /// `events tail` print: `agent_id`, `seq`, `stream`, `ts`, `value`, `quality`,
    /// `attrs`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "agent_id": self.agent_id.as_str(),
            "seq": self.seq.0,
            "stream": self.body.stream.as_str(),
            "ts": self.body.ts.0,
            "value": self.body.value.to_json(),
            "quality": self.body.quality.to_json(),
            "attrs": self.body.attrs,
        })
    }

    /// Writes the one-line JSON object of [`Event::to_json`] into `out`, keys
    /// in the same (sorted) order, the value as [`Value::write_json`] writes
    /// it: what `events tail --json` prints and a sink's `json` payload.
    ///
    /// Why not `to_json().to_string()`: building the tree parses a JSON value
    /// again and allocates per key; a sink writes this for every event.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"agent_id\":");
        json_into(out, self.agent_id.as_str());
        out.extend_from_slice(b",\"attrs\":");
        json_into(out, &self.body.attrs);
        out.extend_from_slice(b",\"quality\":");
        self.body.quality.write_json(out);
        out.extend_from_slice(b",\"seq\":");
        write_display(out, &self.seq.0);
        out.extend_from_slice(b",\"stream\":");
        json_into(out, self.body.stream.as_str());
        out.extend_from_slice(b",\"ts\":");
        write_display(out, &self.body.ts.0);
        out.extend_from_slice(b",\"value\":");
        self.body.value.write_json(out);
        out.push(b'}');
    }

    /// [`Event::write_json`] as a string.
    pub fn json_line(&self) -> String {
        let mut out = Vec::with_capacity(160);
        self.write_json(&mut out);
        // Every part written is UTF-8: JSON from serde_json, and JSON text
        // that is a `str`.
        String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_reason() -> impl Strategy<Value = Reason> {
        prop_oneof![
            any::<u8>().prop_map(Reason::ModbusException),
            Just(Reason::Timeout),
            Just(Reason::Disconnected),
            (any::<u16>(), any::<u16>()).prop_map(|(e, g)| Reason::ShortReply {
                expected: e,
                got: g
            }),
            ".*".prop_map(Reason::Decode),
            ".*".prop_map(Reason::Other),
        ]
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(serde_json::Value::from),
            ".*".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                prop::collection::btree_map("[a-z]{0,4}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    pub(crate) fn arb_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::I64),
            any::<u64>().prop_map(Value::U64),
            any::<f64>().prop_map(Value::F64),
            ".*".prop_map(Value::String),
            prop::collection::vec(any::<u8>(), 0..64).prop_map(Value::Bytes),
            arb_json().prop_map(|j| Value::Json(JsonText::from_value(&j))),
        ]
    }

    fn arb_body() -> impl Strategy<Value = EventBody> {
        (
            "[a-z0-9]{1,8}(/[a-z0-9_]{1,8}){0,3}",
            any::<i64>(),
            arb_value(),
            prop_oneof![
                Just(Quality::Good),
                arb_reason().prop_map(Quality::Bad),
                arb_reason().prop_map(Quality::Uncertain),
            ],
            prop::collection::btree_map("[a-z]{1,6}", ".{0,8}", 0..4),
        )
            .prop_map(|(stream, ts, value, quality, attrs)| EventBody {
                stream: StreamName::parse(&stream).expect("generated names are valid"),
                ts: Timestamp(ts),
                value,
                quality,
                attrs,
            })
    }

    /// NaN is not equal to itself, so compare floats by bits.
    fn same(a: &EventBody, b: &EventBody) -> bool {
        match (&a.value, &b.value) {
            (Value::F64(x), Value::F64(y)) => {
                x.to_bits() == y.to_bits()
                    && a.stream == b.stream
                    && a.ts == b.ts
                    && a.quality == b.quality
                    && a.attrs == b.attrs
            }
            _ => a == b,
        }
    }

    proptest! {
        #[test]
        fn every_event_body_round_trips_through_postcard(body in arb_body()) {
            let bytes = body.encode();
            let back = EventBody::decode(&bytes).expect("decodes");
            prop_assert!(same(&body, &back), "{body:?} != {back:?}");
        }

        #[test]
        fn every_full_event_round_trips_through_postcard(body in arb_body(), seq in any::<u64>()) {
            let ev = Event { agent_id: AgentId::parse("gw-1").expect("valid"), seq: Seq(seq), body };
            let bytes = postcard::to_stdvec(&ev).expect("encodes");
            let back: Event = postcard::from_bytes(&bytes).expect("decodes");
            prop_assert!(same(&ev.body, &back.body));
            prop_assert_eq!(ev.seq, back.seq);
            prop_assert_eq!(ev.agent_id, back.agent_id);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = EventBody::decode(&bytes);
        }

        #[test]
        fn payload_classification_keeps_every_byte(payload in prop::collection::vec(any::<u8>(), 0..64)) {
            let v = Value::from_payload(&payload);
            let back: Vec<u8> = match v {
                Value::Json(j) => j.as_str().as_bytes().to_vec(),
                Value::String(s) => s.into_bytes(),
                Value::Bytes(b) => b,
                other => panic!("unexpected {other:?}"),
            };
            prop_assert_eq!(back, payload);
        }
    }

    #[test]
    fn invalid_json_is_refused_when_decoding() {
        let bad = postcard::to_stdvec(&"{not json").expect("encodes");
        assert!(postcard::from_bytes::<JsonText>(&bad).is_err());
    }

    #[test]
    fn agent_ids_are_checked() {
        assert!(AgentId::parse("depot-17.gw_1").is_ok());
        assert!(AgentId::parse("").is_err());
        assert!(AgentId::parse("a b").is_err());
        assert!(AgentId::parse(&"x".repeat(65)).is_err());
    }

    #[test]
    fn stream_names_refuse_wildcards() {
        assert!(StreamName::parse("plant/line1/temp").is_ok());
        assert!(StreamName::parse("plant/+/temp").is_err());
        assert!(StreamName::parse("plant/#").is_err());
        assert!(StreamName::parse("").is_err());
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        ("[a-z0-9-]{1,12}", any::<u64>(), arb_body()).prop_map(|(id, seq, body)| Event {
            agent_id: AgentId::parse(&id).expect("generated ids are valid"),
            seq: Seq(seq),
            body,
        })
    }

    fn with_json(e: &Event, text: &str) -> Event {
        let mut e = e.clone();
        e.body.value = Value::Json(JsonText::parse(text).expect("valid JSON"));
        e
    }

    proptest! {
        /// The direct writer says byte for byte what the tree says whenever
        /// the JSON text is already compact and sorted, as every other value
        /// is; pretty-printed text is written compact, so also the same.
        #[test]
        fn the_direct_writer_matches_the_tree(e in arb_event()) {
            let tree = e.to_json().to_string();
            prop_assert_eq!(e.json_line(), tree.clone());
            if let Value::Json(j) = &e.body.value {
                let pretty = serde_json::to_string_pretty(&j.to_value()).expect("serialises");
                prop_assert_eq!(with_json(&e, &format!("\n {pretty}\r\n")).json_line(), tree);
            }
        }

        /// JSON text written as the device sent it (spaces, its own key
        /// order) reads back as the same object as the tree.
        #[test]
        fn json_text_as_sent_reads_back_as_the_tree(e in arb_event(), j in arb_json()) {
            let spaced = serde_json::to_string(&j)
                .expect("serialises")
                .replace(',', " ,\t")
                .replace(':', " : ");
            let spaced = match serde_json::from_str::<serde_json::Value>(&spaced) {
                Ok(_) => spaced,
                // A string holding ',' or ':' is changed too; it still parses,
                // so this only guards the test's own assumption.
                Err(_) => serde_json::to_string(&j).expect("serialises"),
            };
            let e = with_json(&e, &format!("  {spaced} "));
            let line = e.json_line();
            prop_assert!(!line.contains('\n'));
            let back: serde_json::Value = serde_json::from_str(&line).expect("the line is JSON");
            prop_assert_eq!(back, e.to_json());
        }
    }

    #[test]
    fn json_values_keep_the_devices_key_order_and_digits() {
        let e = with_json(
            &Event {
                agent_id: AgentId::parse("gw").expect("valid"),
                seq: Seq(1),
                body: EventBody {
                    stream: StreamName::parse("s").expect("valid"),
                    ts: Timestamp(2),
                    value: Value::Bool(true),
                    quality: Quality::Good,
                    attrs: BTreeMap::new(),
                },
            },
            r#" {"value": 21.5, "n": 123456789012345678901234} "#,
        );
        assert_eq!(
            e.json_line(),
            r#"{"agent_id":"gw","attrs":{},"quality":{"status":"good"},"seq":1,"stream":"s","ts":2,"value":{"value": 21.5, "n": 123456789012345678901234}}"#
        );
    }

    #[test]
    fn tail_json_has_the_contract_fields() {
        let ev = Event {
            agent_id: AgentId::parse("gw").expect("valid"),
            seq: Seq(7),
            body: EventBody {
                stream: StreamName::parse("plc1/temperature").expect("valid"),
                ts: Timestamp(1),
                value: Value::F64(21.5),
                quality: Quality::Bad(Reason::ModbusException(2)),
                attrs: BTreeMap::new(),
            },
        };
        let j = ev.to_json();
        for k in [
            "agent_id", "seq", "stream", "ts", "value", "quality", "attrs",
        ] {
            assert!(j.get(k).is_some(), "missing {k}");
        }
        assert_eq!(j["value"], serde_json::json!(21.5));
        assert_eq!(j["quality"]["status"], "bad");
        assert_eq!(
            j["quality"]["reason"],
            "modbus exception 0x02 (illegal data address)"
        );
    }
}
