//! The data every measurement uses, so that "the same rows" and "the same
//! messages" mean the same bytes everywhere.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use outpost_protocols::{EventBody, Quality, StreamName, Timestamp, Value};

/// The size of every MQTT payload.
pub(crate) const PAYLOAD_LEN: usize = 64;

/// Distinct topics (streams) the messages spread over.
const TOPICS: usize = 100;

/// Message `i`'s payload: a JSON object of exactly [`PAYLOAD_LEN`] bytes, as a
/// sensor would publish it.
pub(crate) fn payload(i: usize) -> Vec<u8> {
    let head = format!("{{\"n\":{i},\"value\":21.5,\"unit\":\"degC\",\"pad\":\"");
    let pad = PAYLOAD_LEN.saturating_sub(head.len() + 2);
    let mut s = head;
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s.into_bytes()
}

/// Message `i`'s topic under `prefix`.
pub(crate) fn topic(prefix: &str, i: usize) -> String {
    format!("{prefix}/sensor/{}", i % TOPICS)
}

/// Now, in Unix nanoseconds.
pub(crate) fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `n` event bodies shaped like what the MQTT source stores for the
/// messages above: stream = topic, value = the JSON payload, quality good.
pub(crate) fn mqtt_bodies(n: usize) -> Result<Vec<EventBody>> {
    json_bodies(n, 1_000, |i| topic("plant", i))
}

/// `n` event bodies with the JSON payloads above, event `i` on stream
/// `stream(i)`, `step_ns` of event time apart from now on.
pub(crate) fn json_bodies(
    n: usize,
    step_ns: i64,
    stream: impl Fn(usize) -> String,
) -> Result<Vec<EventBody>> {
    let t0 = now_ns();
    (0..n)
        .map(|i| {
            Ok(EventBody {
                stream: StreamName::parse(&stream(i))?,
                ts: Timestamp(t0 + i as i64 * step_ns),
                value: Value::from_payload(&payload(i)),
                quality: Quality::Good,
                attrs: BTreeMap::new(),
            })
        })
        .collect()
}

/// `n` event bodies shaped like Modbus samples (`plc1/tK`, a u16 value), to
/// fill an outbox.
pub(crate) fn modbus_bodies(from: usize, n: usize, tags: usize, ts: i64) -> Result<Vec<EventBody>> {
    (from..from + n)
        .map(|i| {
            Ok(EventBody {
                stream: StreamName::parse(&format!("plc1/t{}", i % tags))?,
                ts: Timestamp(ts),
                value: Value::U64((i / tags) as u64 % 65_536),
                quality: Quality::Good,
                attrs: BTreeMap::new(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_json_of_the_stated_size() {
        for i in [0, 7, 199_999, 10_000_000] {
            let p = payload(i);
            assert_eq!(p.len(), PAYLOAD_LEN, "{}", String::from_utf8_lossy(&p));
            assert!(matches!(Value::from_payload(&p), Value::Json(_)));
        }
    }
}
