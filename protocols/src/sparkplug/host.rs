//! What a Sparkplug host application keeps about each edge node, sans-IO:
//! the alias tables from births, `bdSeq` and `seq`, which nodes and devices
//! are online, and each metric's last value (to mark it stale on a death).
//!
//! Rules, from Sparkplug 3.0:
//! - An NBIRTH starts a node's session: its `seq` is the base, its `bdSeq`
//!   metric names the session, and every alias table of the node and its
//!   devices starts again (section 7.1; devices birth again after it).
//! - Every NDATA, DBIRTH, DDATA and DDEATH carries the next `seq`, modulo
//!   256 (section 7.2.3). One that does not, a message from a node or device
//!   without a birth, and an alias no birth defined, each mean this host
//!   missed something: it asks the node for a rebirth with an NCMD whose
//!   `Node Control/Rebirth` metric is true (section 6.4.11), at most once
//!   per `rebirth_interval` per node, and stores what it can still read.
//! - An NDEATH whose `bdSeq` is not the current session's is a late will of
//!   an older session and changes nothing (section 7.1.2). One that is marks
//!   every metric of the node and its devices stale: each gets one more
//!   event with its last value and quality uncertain, reason `node death`
//!   (a DDEATH: the device's metrics, reason `device death`).
//! - A payload that is not protobuf is stored as one bad-quality event on
//!   the node's (or device's) stream, `<group>/<node>[/<device>]`, with its
//!   bytes.
//! - Transient metrics (`is_transient`, section 6.4.4) are not stored.
//!
//! Poll order after each [`Host::handle_message`]: [`Host::poll_output`]
//! until `None`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::payload::{
    decode, rebirth_request, DataType, Metric, MetricValue, Payload, BD_SEQ_METRIC,
};
use super::topic::{ncmd_topic, MessageType, Topic, TopicError};
use crate::event::{EventBody, JsonText, Quality, Reason, StreamName, Timestamp, Value};

/// How the host behaves.
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// Whether to ask edge nodes for a rebirth at all.
    pub rebirth: bool,
    /// The least time between two rebirth requests to the same node.
    pub rebirth_interval: Duration,
}

/// Why the host asks a node for a rebirth.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RebirthReason {
    /// A message's `seq` was not one more than the last.
    SeqGap {
        /// The seq that was due.
        expected: u8,
        /// The seq that came.
        got: u64,
    },
    /// A data message used an alias no birth defined.
    UnknownAlias(u64),
    /// A message came from a node or device this host has no birth of.
    NoBirth,
}

impl std::fmt::Display for RebirthReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RebirthReason::SeqGap { expected, got } => {
                write!(f, "seq gap: expected {expected}, got {got}")
            }
            RebirthReason::UnknownAlias(a) => write!(f, "unknown alias {a}"),
            RebirthReason::NoBirth => f.write_str("no birth seen"),
        }
    }
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Output {
    /// Store this event.
    Sample(EventBody),
    /// Publish `payload` to `topic` (QoS 0, not retained; section 6.4.11).
    Rebirth {
        /// `spBv1.0/<group>/NCMD/<node>`.
        topic: String,
        /// The encoded NCMD payload.
        payload: Vec<u8>,
        /// Why.
        reason: RebirthReason,
    },
    /// Something was not stored, for the log.
    Skipped {
        /// Where it came from.
        topic: String,
        /// Why.
        why: String,
    },
}

/// What the host knows of one metric from a birth.
#[derive(Debug, Clone)]
struct Known {
    name: String,
    datatype: Option<DataType>,
}

/// A node's or a device's metrics.
#[derive(Debug, Default)]
struct Scope {
    /// Alias to name and type, from the birth.
    aliases: HashMap<u64, Known>,
    /// Name to type, from the birth, for data messages that name metrics.
    types: HashMap<String, DataType>,
    /// Stream to last value, for stale marking.
    last: BTreeMap<StreamName, Value>,
    /// Whether a birth came since the last death.
    online: bool,
}

impl Scope {
    fn reset(&mut self) {
        self.aliases.clear();
        self.types.clear();
        self.last.clear();
        self.online = false;
    }
}

#[derive(Debug, Default)]
struct Node {
    bd_seq: Option<u64>,
    /// The last seq; `None` until a message carried one.
    seq: Option<u8>,
    scope: Scope,
    devices: HashMap<String, Scope>,
    last_rebirth: Option<Instant>,
}

/// The host's state over every edge node it hears.
#[derive(Debug)]
pub struct Host {
    opts: HostOptions,
    nodes: HashMap<(String, String), Node>,
    outputs: VecDeque<Output>,
}

/// One message's context.
struct Msg<'a> {
    now: Instant,
    unix_ns: i64,
    group: &'a str,
    node_id: &'a str,
    device: Option<&'a str>,
    topic: &'a str,
}

impl Msg<'_> {
    /// `<group>/<node>[/<device>]`.
    fn prefix(&self) -> String {
        match self.device {
            Some(d) => format!("{}/{}/{d}", self.group, self.node_id),
            None => format!("{}/{}", self.group, self.node_id),
        }
    }
}

impl Host {
    /// A host that knows no node yet.
    pub fn new(opts: HostOptions) -> Host {
        Host {
            opts,
            nodes: HashMap::new(),
            outputs: VecDeque::new(),
        }
    }

    /// How many edge nodes the host has heard of.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// The next output.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Feeds one message: its topic, payload, the monotonic time (for the
    /// rebirth interval) and the Unix time in nanoseconds (for events
    /// without a timestamp). A topic outside the namespace is an error and
    /// changes nothing; commands and STATE messages are not for a host to
    /// store and are skipped.
    pub fn handle_message(
        &mut self,
        now: Instant,
        unix_ns: i64,
        topic: &str,
        payload: &[u8],
    ) -> Result<(), TopicError> {
        let (group, kind, node_id, device) = match Topic::parse(topic)? {
            Topic::State { .. } => return Ok(()),
            Topic::Node {
                group,
                kind,
                node,
                device,
            } => (group, kind, node, device),
        };
        if matches!(kind, MessageType::NCmd | MessageType::DCmd) {
            return Ok(());
        }
        let m = Msg {
            now,
            unix_ns,
            group: &group,
            node_id: &node_id,
            device: device.as_deref(),
            topic,
        };
        let p = match decode(payload) {
            Ok(p) => p,
            Err(e) => {
                self.bad_payload(&m, payload, e.0);
                return Ok(());
            }
        };
        match kind {
            MessageType::NBirth => self.nbirth(&m, &p),
            MessageType::NDeath => self.ndeath(&m, &p),
            MessageType::DBirth => self.dbirth(&m, &p),
            MessageType::DDeath => self.ddeath(&m, &p),
            MessageType::NData | MessageType::DData => self.data(&m, &p),
            MessageType::NCmd | MessageType::DCmd => {}
        }
        Ok(())
    }

    fn bad_payload(&mut self, m: &Msg<'_>, payload: &[u8], why: String) {
        match StreamName::parse(&m.prefix()) {
            Ok(stream) => self.outputs.push_back(Output::Sample(EventBody {
                stream,
                ts: Timestamp(m.unix_ns),
                value: Value::Bytes(payload.to_vec()),
                quality: Quality::Bad(Reason::Decode(format!("not a Sparkplug B payload: {why}"))),
                attrs: BTreeMap::new(),
            })),
            Err(_) => self.skip(m, format!("bad payload ({why}) on an unusable stream name")),
        }
    }

    fn skip(&mut self, m: &Msg<'_>, why: String) {
        self.outputs.push_back(Output::Skipped {
            topic: m.topic.to_owned(),
            why,
        });
    }

    /// Asks `m`'s node for a rebirth, unless asked within the interval.
    fn rebirth(&mut self, m: &Msg<'_>, reason: RebirthReason) {
        if !self.opts.rebirth {
            return;
        }
        let node = self
            .nodes
            .entry((m.group.to_owned(), m.node_id.to_owned()))
            .or_default();
        if node
            .last_rebirth
            .is_some_and(|t| m.now.saturating_duration_since(t) < self.opts.rebirth_interval)
        {
            return;
        }
        node.last_rebirth = Some(m.now);
        let now_ms = u64::try_from(m.unix_ns / 1_000_000).unwrap_or(0);
        self.outputs.push_back(Output::Rebirth {
            topic: ncmd_topic(m.group, m.node_id),
            payload: rebirth_request(now_ms),
            reason,
        });
    }

    /// Checks and advances the node's seq (section 7.2.3).
    fn check_seq(&mut self, m: &Msg<'_>, p: &Payload) {
        let Some(got) = p.seq else {
            return;
        };
        let node = self
            .nodes
            .entry((m.group.to_owned(), m.node_id.to_owned()))
            .or_default();
        let last = node.seq;
        node.seq = Some((got % 256) as u8);
        if let Some(last) = last {
            let expected = last.wrapping_add(1);
            if got != u64::from(expected) {
                self.rebirth(m, RebirthReason::SeqGap { expected, got });
            }
        }
    }

    fn nbirth(&mut self, m: &Msg<'_>, p: &Payload) {
        let node = self
            .nodes
            .entry((m.group.to_owned(), m.node_id.to_owned()))
            .or_default();
        node.seq = p.seq.map(|s| (s % 256) as u8);
        node.bd_seq = bd_seq(p);
        node.scope.reset();
        node.devices.clear();
        node.scope.online = true;
        // A birth answers any request made so far.
        node.last_rebirth = None;
        self.birth_metrics(m, p);
    }

    fn dbirth(&mut self, m: &Msg<'_>, p: &Payload) {
        self.check_seq(m, p);
        let Some(device) = m.device else { return };
        let node_online = self
            .nodes
            .get(&(m.group.to_owned(), m.node_id.to_owned()))
            .is_some_and(|n| n.scope.online);
        if !node_online {
            self.rebirth(m, RebirthReason::NoBirth);
        }
        let node = self
            .nodes
            .entry((m.group.to_owned(), m.node_id.to_owned()))
            .or_default();
        let scope = node.devices.entry(device.to_owned()).or_default();
        scope.reset();
        scope.online = true;
        self.birth_metrics(m, p);
    }

    /// Records a birth's aliases and types, and stores its values.
    fn birth_metrics(&mut self, m: &Msg<'_>, p: &Payload) {
        let prefix = m.prefix();
        let mut samples = Vec::with_capacity(p.metrics.len());
        let mut skipped = Vec::new();
        {
            let Some(scope) = self.scope_mut(m) else {
                return;
            };
            for metric in &p.metrics {
                let Some(name) = metric.name.clone() else {
                    skipped.push("a birth metric without a name".to_owned());
                    continue;
                };
                let datatype = metric.datatype.map(DataType::from_wire);
                if let Some(dt) = datatype {
                    scope.types.insert(name.clone(), dt);
                }
                if let Some(alias) = metric.alias {
                    scope.aliases.insert(
                        alias,
                        Known {
                            name: name.clone(),
                            datatype,
                        },
                    );
                }
                samples.push((name, datatype, metric));
            }
        }
        for s in skipped {
            self.skip(m, s);
        }
        for (name, datatype, metric) in samples {
            self.store(m, &prefix, &name, datatype, metric, p.timestamp);
        }
    }

    fn data(&mut self, m: &Msg<'_>, p: &Payload) {
        self.check_seq(m, p);
        let online = self.scope_mut(m).is_some_and(|s| s.online);
        if !online {
            self.rebirth(m, RebirthReason::NoBirth);
        }
        let prefix = m.prefix();
        for metric in &p.metrics {
            let resolved = match (&metric.name, metric.alias) {
                (Some(name), _) => {
                    let dt = metric.datatype.map(DataType::from_wire).or_else(|| {
                        self.scope_mut(m)
                            .and_then(|s| s.types.get(name.as_str()).copied())
                    });
                    Some((name.clone(), dt))
                }
                (None, Some(alias)) => self
                    .scope_mut(m)
                    .and_then(|s| s.aliases.get(&alias).cloned())
                    .map(|k| {
                        (
                            k.name,
                            metric.datatype.map(DataType::from_wire).or(k.datatype),
                        )
                    }),
                (None, None) => {
                    self.skip(m, "a metric with neither name nor alias".into());
                    continue;
                }
            };
            match resolved {
                Some((name, dt)) => self.store(m, &prefix, &name, dt, metric, p.timestamp),
                None => {
                    let alias = metric.alias.unwrap_or_default();
                    self.skip(m, format!("unknown alias {alias}"));
                    self.rebirth(m, RebirthReason::UnknownAlias(alias));
                }
            }
        }
    }

    fn ndeath(&mut self, m: &Msg<'_>, p: &Payload) {
        let Some(node) = self
            .nodes
            .get_mut(&(m.group.to_owned(), m.node_id.to_owned()))
        else {
            return;
        };
        let death = bd_seq(p);
        if let (Some(current), Some(death)) = (node.bd_seq, death) {
            if current != death {
                self.skip(
                    m,
                    format!("NDEATH of bdSeq {death}, not the current session's {current}"),
                );
                return;
            }
        }
        let ts = payload_ts(p.timestamp, m.unix_ns);
        let mut stale = Vec::new();
        if node.scope.online {
            stale.extend(std::mem::take(&mut node.scope.last));
        }
        for scope in node.devices.values_mut() {
            if scope.online {
                stale.extend(std::mem::take(&mut scope.last));
            }
            scope.reset();
        }
        node.scope.reset();
        node.seq = None;
        self.stale(stale, ts, "node death");
    }

    fn ddeath(&mut self, m: &Msg<'_>, p: &Payload) {
        self.check_seq(m, p);
        let ts = payload_ts(p.timestamp, m.unix_ns);
        let Some(scope) = self.scope_mut(m) else {
            return;
        };
        let stale: Vec<_> = if scope.online {
            std::mem::take(&mut scope.last).into_iter().collect()
        } else {
            Vec::new()
        };
        scope.reset();
        self.stale(stale, ts, "device death");
    }

    fn stale(&mut self, metrics: Vec<(StreamName, Value)>, ts: i64, reason: &str) {
        for (stream, value) in metrics {
            self.outputs.push_back(Output::Sample(EventBody {
                stream,
                ts: Timestamp(ts),
                value,
                quality: Quality::Uncertain(Reason::Other(reason.to_owned())),
                attrs: BTreeMap::new(),
            }));
        }
    }

    /// The scope `m` is about: the node's, or its device's (created empty,
    /// offline, if unknown).
    fn scope_mut(&mut self, m: &Msg<'_>) -> Option<&mut Scope> {
        let node = self
            .nodes
            .entry((m.group.to_owned(), m.node_id.to_owned()))
            .or_default();
        match m.device {
            None => Some(&mut node.scope),
            Some(d) => Some(node.devices.entry(d.to_owned()).or_default()),
        }
    }

    /// Stores one metric's value as an event, and remembers it.
    fn store(
        &mut self,
        m: &Msg<'_>,
        prefix: &str,
        name: &str,
        datatype: Option<DataType>,
        metric: &Metric,
        payload_timestamp: Option<u64>,
    ) {
        if metric.is_transient == Some(true) {
            return;
        }
        let stream = match StreamName::parse(&format!("{prefix}/{name}")) {
            Ok(s) => s,
            Err(_) => {
                self.skip(m, format!("metric {name:?} makes no valid stream name"));
                return;
            }
        };
        let ts = payload_ts(metric.timestamp.or(payload_timestamp), m.unix_ns);
        let mut attrs = BTreeMap::new();
        if metric.is_historical == Some(true) {
            attrs.insert("historical".to_owned(), "true".to_owned());
        }
        if datatype == Some(DataType::DateTime) {
            attrs.insert("datatype".to_owned(), "DateTime".to_owned());
        }
        let (value, quality) = if metric.is_null == Some(true) {
            (
                Value::Json(JsonText::from_value(&serde_json::Value::Null)),
                Quality::Bad(Reason::Other("null value".into())),
            )
        } else {
            match convert(datatype, metric.value.as_ref()) {
                Ok(v) => (v, Quality::Good),
                Err(why) => (Value::Bytes(Vec::new()), Quality::Bad(Reason::Decode(why))),
            }
        };
        if quality == Quality::Good && metric.is_historical != Some(true) {
            if let Some(scope) = self.scope_mut(m) {
                scope.last.insert(stream.clone(), value.clone());
            }
        }
        self.outputs.push_back(Output::Sample(EventBody {
            stream,
            ts: Timestamp(ts),
            value,
            quality,
            attrs,
        }));
    }
}

/// The `bdSeq` metric's value.
fn bd_seq(p: &Payload) -> Option<u64> {
    p.metrics
        .iter()
        .find(|m| m.name.as_deref() == Some(BD_SEQ_METRIC))
        .and_then(|m| match m.value {
            Some(MetricValue::LongValue(v)) => Some(v),
            Some(MetricValue::IntValue(v)) => Some(u64::from(v)),
            _ => None,
        })
}

/// A Sparkplug millisecond timestamp in nanoseconds, or `now_ns`.
fn payload_ts(ms: Option<u64>, now_ns: i64) -> i64 {
    ms.and_then(|ms| i64::try_from(ms).ok())
        .and_then(|ms| ms.checked_mul(1_000_000))
        .unwrap_or(now_ns)
}

/// A metric's value as an event value, read as its data type says
/// (Sparkplug 3.0 section 6.4.16); a value without a known type is read as
/// what carries it.
pub fn convert(datatype: Option<DataType>, value: Option<&MetricValue>) -> Result<Value, String> {
    use DataType as T;
    use MetricValue as V;
    let Some(value) = value else {
        return Err(match datatype {
            Some(dt @ (T::Other(16) | T::Other(19) | T::Other(20) | T::Other(21))) => {
                format!("unsupported Sparkplug datatype {}", dt.name())
            }
            _ => "metric without a value".to_owned(),
        });
    };
    Ok(match (datatype, value) {
        (Some(T::Int8), V::IntValue(v)) => Value::I64(i64::from(*v as u8 as i8)),
        (Some(T::Int16), V::IntValue(v)) => Value::I64(i64::from(*v as u16 as i16)),
        (Some(T::Int32), V::IntValue(v)) => Value::I64(i64::from(*v as i32)),
        (Some(T::Int64 | T::DateTime), V::LongValue(v)) => Value::I64(*v as i64),
        (Some(T::Other(n)), V::BytesValue(b)) if (22..=34).contains(&n) => array(n, b)?,
        (_, V::IntValue(v)) => Value::U64(u64::from(*v)),
        (_, V::LongValue(v)) => Value::U64(*v),
        (_, V::FloatValue(f)) => Value::F64(f64::from(*f)),
        (_, V::DoubleValue(f)) => Value::F64(*f),
        (_, V::BooleanValue(b)) => Value::Bool(*b),
        (_, V::StringValue(s)) => Value::String(s.clone()),
        (_, V::BytesValue(b)) => Value::Bytes(b.clone()),
    })
}

/// A Sparkplug 3.0 array (section 6.4.17: little-endian elements packed in
/// `bytes_value`; booleans as a 4-byte count and packed bits; strings
/// NUL-terminated) as a JSON array.
fn array(datatype: u32, b: &[u8]) -> Result<Value, String> {
    use serde_json::Value as J;
    fn chunks<const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> J) -> Result<Vec<J>, String> {
        if !b.chunks_exact(N).remainder().is_empty() {
            return Err(format!(
                "an array of {N}-byte elements in {} bytes",
                b.len()
            ));
        }
        Ok(b.chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                f(a)
            })
            .collect())
    }
    let f = |x: f64| serde_json::Number::from_f64(x).map_or(J::Null, J::Number);
    let items = match datatype {
        22 => chunks::<1>(b, |a| J::from(i8::from_le_bytes(a)))?,
        23 => chunks::<2>(b, |a| J::from(i16::from_le_bytes(a)))?,
        24 => chunks::<4>(b, |a| J::from(i32::from_le_bytes(a)))?,
        25 | 34 => chunks::<8>(b, |a| J::from(i64::from_le_bytes(a)))?,
        26 => chunks::<1>(b, |a| J::from(a[0]))?,
        27 => chunks::<2>(b, |a| J::from(u16::from_le_bytes(a)))?,
        28 => chunks::<4>(b, |a| J::from(u32::from_le_bytes(a)))?,
        29 => chunks::<8>(b, |a| J::from(u64::from_le_bytes(a)))?,
        30 => chunks::<4>(b, |a| f(f64::from(f32::from_le_bytes(a))))?,
        31 => chunks::<8>(b, |a| f(f64::from_le_bytes(a)))?,
        32 => {
            let (count, bits) = match b.split_first_chunk::<4>() {
                Some((c, bits)) => (u32::from_le_bytes(*c) as usize, bits),
                None => return Err("a boolean array without its count".into()),
            };
            if count > bits.len().saturating_mul(8) {
                return Err(format!(
                    "a boolean array of {count} in {} bytes",
                    bits.len()
                ));
            }
            (0..count)
                .map(|i| J::Bool(bits[i / 8] & (0x80 >> (i % 8)) != 0))
                .collect()
        }
        33 => {
            let body = b.strip_suffix(&[0]).unwrap_or(b);
            if body.is_empty() {
                Vec::new()
            } else {
                body.split(|c| *c == 0)
                    .map(|s| J::String(String::from_utf8_lossy(s).into_owned()))
                    .collect()
            }
        }
        n => return Err(format!("unsupported Sparkplug datatype {n}")),
    };
    Ok(Value::Json(JsonText::from_value(&J::Array(items))))
}
