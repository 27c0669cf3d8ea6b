//! CloudEvents 1.0 for the sinks: event routers (Knative, EventBridge,
//! Event Grid) and their SDKs parse this envelope already, where our own
//! JSON shape would make every consumer learn it.
//!
//! Why the `id` is `<agent_id>:<seq>`: that pair is the event's identity
//! across the fleet (the store's key, `Nats-Msg-Id`), and CloudEvents 1.0
//! section 3.1.1 says that a consumer may take two events with the same
//! `source` and `id` as duplicates; a sink that delivers at least once
//! then hands over a repeat that any consumer recognises.
//!
//! Why `data` is an object with the value, its quality and its attributes,
//! and not the bare value: a value without its quality would turn a bad
//! reading into a good one downstream.
//!
//! Structured mode (section 3.1 of the JSON format; every sink):
//!
//! ```text
//! {"specversion":"1.0","id":"gw-1:42","source":"urn:outpost:agent:gw-1",
//!  "type":"io.outpost.event","subject":"plc1/temp",
//!  "time":"2026-12-06T12:00:00.123456789Z","datacontenttype":"application/json",
//!  "data":{"attrs":{},"quality":{"status":"good"},"value":21.5}}
//! ```
//!
//! Binary mode (HTTP protocol binding section 3.1; the HTTP sink only): the
//! same attributes as `ce-` headers, `Content-Type: application/json`, and
//! `data` as the body. Batched mode (HTTP binding section 3.3): a JSON array
//! of structured events, `Content-Type: application/cloudevents-batch+json`.

use outpost_protocols::Timestamp;
use serde::Deserialize;

use super::sink::SinkEvent;

/// `specversion`.
pub const SPEC_VERSION: &str = "1.0";

/// `type` of every event the hub forwards (reverse-DNS prefixed, as
/// section 3.1.1 recommends).
pub const EVENT_TYPE: &str = "io.outpost.event";

/// `datacontenttype`: `data` is always a JSON object.
pub const DATA_CONTENT_TYPE: &str = "application/json";

/// The media type of one structured event.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// The media type of a batch of structured events.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// How the HTTP sink sends CloudEvents (`http.cloudevents_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CloudEventsMode {
    /// One request per event, the event as its body.
    #[default]
    Structured,
    /// One request per event, the attributes as `ce-` headers and `data`
    /// as the body.
    Binary,
    /// One request per batch, a JSON array of structured events.
    Batch,
}

/// `id`: `<agent_id>:<seq>`.
pub fn id(e: &SinkEvent) -> String {
    format!("{}:{}", e.event.agent_id, e.event.seq.0)
}

/// `source`: `urn:outpost:agent:<agent_id>` (a URI-reference, section
/// 3.1.1; agent ids are `a-z 0-9 - _ .`, which a URN holds as they are).
pub fn source(e: &SinkEvent) -> String {
    format!("urn:outpost:agent:{}", e.event.agent_id)
}

/// `time` in RFC 3339 (UTC, with the nanoseconds that are not zero), or
/// `None` for a time outside years 0 to 9999, which RFC 3339 cannot write;
/// `time` is optional, so such an event goes without it.
pub fn time(ts: Timestamp) -> Option<String> {
    let secs = ts.0.div_euclid(1_000_000_000);
    let nanos = ts.0.rem_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    if !(0..=9999).contains(&y) {
        return None;
    }
    let (hh, mm, ss) = (rem / 3600, rem / 60 % 60, rem % 60);
    let mut out = format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}");
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push('Z');
    Some(out)
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`), total over every `i64` that a nanosecond
/// timestamp divides into.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Appends `data`: `{"attrs":{…},"quality":{…},"value":…}`.
pub fn write_data(e: &SinkEvent, out: &mut Vec<u8>) {
    let body = &e.event.body;
    out.extend_from_slice(b"{\"attrs\":");
    let _ = serde_json::to_writer(&mut *out, &body.attrs);
    out.extend_from_slice(b",\"quality\":");
    body.quality.write_json(out);
    out.extend_from_slice(b",\"value\":");
    body.value.write_json(out);
    out.push(b'}');
}

/// Appends the event in structured mode (the JSON event format).
pub fn write_structured(e: &SinkEvent, out: &mut Vec<u8>) {
    let s = |out: &mut Vec<u8>, v: &str| {
        let _ = serde_json::to_writer(&mut *out, v);
    };
    out.extend_from_slice(b"{\"specversion\":\"");
    out.extend_from_slice(SPEC_VERSION.as_bytes());
    out.extend_from_slice(b"\",\"id\":");
    s(out, &id(e));
    out.extend_from_slice(b",\"source\":");
    s(out, &source(e));
    out.extend_from_slice(b",\"type\":");
    s(out, EVENT_TYPE);
    out.extend_from_slice(b",\"subject\":");
    s(out, e.event.body.stream.as_str());
    if let Some(t) = time(e.event.body.ts) {
        out.extend_from_slice(b",\"time\":");
        s(out, &t);
    }
    out.extend_from_slice(b",\"datacontenttype\":");
    s(out, DATA_CONTENT_TYPE);
    out.extend_from_slice(b",\"data\":");
    write_data(e, out);
    out.push(b'}');
}

/// A structured event as bytes.
pub fn structured(e: &SinkEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + e.event.body.value.payload_len());
    write_structured(e, &mut out);
    out
}

/// A batch in batched mode: a JSON array of structured events.
pub fn batch(events: &[SinkEvent]) -> Vec<u8> {
    let mut out = Vec::with_capacity(events.len() * 256);
    out.push(b'[');
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_structured(e, &mut out);
    }
    out.push(b']');
    out
}

/// The `ce-` headers of binary mode (HTTP binding section 3.1.3), besides
/// `Content-Type`, which carries `datacontenttype`. Header values are
/// percent-encoded where they hold characters outside printable ASCII, or
/// `%`, `"` or a space at either end (section 3.1.3.2).
pub fn binary_headers(e: &SinkEvent) -> Vec<(&'static str, String)> {
    let mut h = vec![
        ("ce-specversion", SPEC_VERSION.to_owned()),
        ("ce-id", header_value(&id(e))),
        ("ce-source", header_value(&source(e))),
        ("ce-type", EVENT_TYPE.to_owned()),
        ("ce-subject", header_value(e.event.body.stream.as_str())),
    ];
    if let Some(t) = time(e.event.body.ts) {
        h.push(("ce-time", t));
    }
    h
}

/// Percent-encodes what section 3.1.3.2 says must be: bytes outside
/// printable ASCII, `%` and `"` (and spaces, which a header would trim).
fn header_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'%' && b != b'"' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc_with_the_nanoseconds_that_matter() {
        assert_eq!(time(Timestamp(0)).as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(
            time(Timestamp(1_796_558_400_123_000_000)).as_deref(),
            Some("2026-12-06T12:00:00.123Z")
        );
        assert_eq!(
            time(Timestamp(951_782_400_000_000_001)).as_deref(),
            Some("2000-02-29T00:00:00.000000001Z")
        );
        assert_eq!(
            time(Timestamp(-1)).as_deref(),
            Some("1969-12-31T23:59:59.999999999Z")
        );
        assert_eq!(
            time(Timestamp(i64::MAX)).as_deref(),
            Some("2262-04-11T23:47:16.854775807Z")
        );
        assert_eq!(
            time(Timestamp(i64::MIN)).as_deref(),
            Some("1677-09-21T00:12:43.145224192Z")
        );
    }

    #[test]
    fn header_values_percent_encode_what_a_header_cannot_hold() {
        assert_eq!(header_value("plc1/temp"), "plc1/temp");
        assert_eq!(header_value("a b%\"é"), "a%20b%25%22%C3%A9");
    }
}
