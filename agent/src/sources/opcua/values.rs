//! OPC UA data values to event values and qualities, with no I/O.
//!
//! The event model has fewer types than OPC UA's built-in ones (Part 6,
//! 5.1.2), so each OPC UA type maps to the event type that keeps its value
//! exactly: every signed integer to `i64`, every unsigned one to `u64`, a
//! `Float` to the `f64` of its shortest decimal form (so `0.1f32` stays
//! `0.1`, not `0.10000000149…`), a `DateTime` to RFC 3339 text in UTC, a
//! `ByteString` to bytes, the text-like types to text, and an array to a
//! JSON array of the same mapping (byte strings in base64). What cannot be
//! carried without knowing the server's structure types (`ExtensionObject`,
//! `DiagnosticInfo`) is recorded with bad quality naming the type rather
//! than guessed at.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use opcua::types::{DataValue, DateTime, StatusCode, Variant};
use outpost_protocols::{JsonText, Quality, Reason, Timestamp, Value};

/// Ticks (100 ns) from the OPC UA epoch (1601-01-01) to the Unix epoch.
const UNIX_EPOCH_TICKS: i64 = 116_444_736_000_000_000;

/// One notification's sample: when, what, and how far to trust it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    /// The source timestamp, else the server's, else `received`.
    pub(crate) ts: Timestamp,
    /// The value; `None` when the server sent none (a bad status).
    pub(crate) value: Option<Value>,
    /// From the status code (Part 4, 7.39): its name is the reason.
    pub(crate) quality: Quality,
}

/// Maps a data value from a notification; `received` is the agent's clock,
/// for a value with neither timestamp.
pub(crate) fn sample(dv: &DataValue, received: Timestamp) -> Sample {
    let ts = dv
        .source_timestamp
        .as_ref()
        .or(dv.server_timestamp.as_ref())
        .and_then(unix_nanos)
        .map(Timestamp)
        .unwrap_or(received);
    let mut quality = quality(dv.status.unwrap_or(StatusCode::Good));
    let value = match &dv.value {
        None => None,
        Some(v) => match value(v) {
            Ok(v) => Some(v),
            Err(reason) => {
                quality = Quality::Bad(reason);
                None
            }
        },
    };
    Sample { ts, value, quality }
}

/// The quality a status code means: good, uncertain or bad by its severity
/// bits, with the code's name (such as `BadNodeIdUnknown`) as the reason.
pub(crate) fn quality(status: StatusCode) -> Quality {
    if status.is_good() {
        Quality::Good
    } else if status.is_uncertain() {
        Quality::Uncertain(Reason::Other(status.to_string()))
    } else {
        Quality::Bad(Reason::Other(status.to_string()))
    }
}

/// A variant as an event value, or why it has none.
pub(crate) fn value(v: &Variant) -> Result<Value, Reason> {
    Ok(match v {
        Variant::Empty => Value::Json(JsonText::from_value(&serde_json::Value::Null)),
        Variant::Boolean(b) => Value::Bool(*b),
        Variant::SByte(n) => Value::I64(i64::from(*n)),
        Variant::Int16(n) => Value::I64(i64::from(*n)),
        Variant::Int32(n) => Value::I64(i64::from(*n)),
        Variant::Int64(n) => Value::I64(*n),
        Variant::Byte(n) => Value::U64(u64::from(*n)),
        Variant::UInt16(n) => Value::U64(u64::from(*n)),
        Variant::UInt32(n) => Value::U64(u64::from(*n)),
        Variant::UInt64(n) => Value::U64(*n),
        Variant::Float(f) => Value::F64(float(*f)),
        Variant::Double(f) => Value::F64(*f),
        Variant::String(s) => Value::String(s.value().clone().unwrap_or_default()),
        Variant::DateTime(d) => Value::String(rfc3339(d)),
        Variant::Guid(g) => Value::String(g.to_string()),
        Variant::StatusCode(s) => Value::String(s.to_string()),
        Variant::ByteString(b) => Value::Bytes(b.value.clone().unwrap_or_default()),
        Variant::XmlElement(x) => Value::String(x.to_string()),
        Variant::QualifiedName(q) => Value::String(q.to_string()),
        Variant::LocalizedText(t) => Value::String(t.text.value().clone().unwrap_or_default()),
        Variant::NodeId(n) => Value::String(n.to_string()),
        Variant::ExpandedNodeId(n) => Value::String(n.to_string()),
        Variant::Variant(inner) => value(inner)?,
        Variant::DataValue(dv) => match &dv.value {
            Some(inner) => value(inner)?,
            None => Value::Json(JsonText::from_value(&serde_json::Value::Null)),
        },
        Variant::Array(a) => {
            let items = a.values.iter().map(json).collect::<Result<Vec<_>, _>>()?;
            Value::Json(JsonText::from_value(&serde_json::Value::Array(items)))
        }
        Variant::ExtensionObject(_) => return Err(unsupported("ExtensionObject")),
        Variant::DiagnosticInfo(_) => return Err(unsupported("DiagnosticInfo")),
    })
}

fn unsupported(what: &str) -> Reason {
    Reason::Decode(format!("OPC UA type {what} is not supported"))
}

/// One array element as JSON, by the same mapping as [`value`].
fn json(v: &Variant) -> Result<serde_json::Value, Reason> {
    use serde_json::Value as J;
    Ok(match value(v)? {
        Value::Bool(b) => J::Bool(b),
        Value::I64(n) => J::from(n),
        Value::U64(n) => J::from(n),
        // JSON has no NaN or infinity: those become null.
        Value::F64(f) => serde_json::Number::from_f64(f).map_or(J::Null, J::Number),
        Value::String(s) => J::String(s),
        Value::Bytes(b) => J::String(base64::engine::general_purpose::STANDARD.encode(b)),
        Value::Json(j) => j.to_value(),
        // Value is non-exhaustive upstream of us only in name; keep any new
        // kind visible rather than dropping it.
        #[allow(unreachable_patterns)]
        other => J::String(format!("{other:?}")),
    })
}

/// A `Float` as the `f64` of its shortest decimal form.
fn float(f: f32) -> f64 {
    if f.is_finite() {
        f.to_string().parse().unwrap_or(f64::from(f))
    } else {
        f64::from(f)
    }
}

/// Unix nanoseconds of an OPC UA time; `None` for the null time (Part 6,
/// 5.2.2.5: ticks 0 means "no time") and for one out of `i64` range.
fn unix_nanos(d: &DateTime) -> Option<i64> {
    let ticks = d.checked_ticks();
    if ticks == 0 || ticks == i64::MAX {
        return None;
    }
    (ticks - UNIX_EPOCH_TICKS).checked_mul(100)
}

/// RFC 3339 in UTC, to the nanosecond the tick allows.
fn rfc3339(d: &DateTime) -> String {
    let ticks = d.checked_ticks();
    if ticks >= UNIX_EPOCH_TICKS && ticks != i64::MAX {
        let nanos = u64::try_from(ticks - UNIX_EPOCH_TICKS).unwrap_or(0) * 100;
        let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos);
        humantime::format_rfc3339_nanos(t).to_string()
    } else {
        // Before 1970 (or at the end of OPC UA time): the library's own
        // RFC 3339 form, to the millisecond.
        d.to_rfc3339()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opcua::types::{Array, ByteString, LocalizedText, UAString, VariantScalarTypeId};

    #[test]
    fn integers_keep_their_sign_and_width() {
        assert_eq!(value(&Variant::SByte(-8)), Ok(Value::I64(-8)));
        assert_eq!(value(&Variant::Int64(i64::MIN)), Ok(Value::I64(i64::MIN)));
        assert_eq!(value(&Variant::UInt64(u64::MAX)), Ok(Value::U64(u64::MAX)));
        assert_eq!(value(&Variant::Byte(255)), Ok(Value::U64(255)));
    }

    #[test]
    fn a_float_keeps_its_shortest_decimal_form() {
        assert_eq!(value(&Variant::Float(0.1)), Ok(Value::F64(0.1)));
        assert_eq!(value(&Variant::Double(0.1)), Ok(Value::F64(0.1)));
        let nan = value(&Variant::Float(f32::NAN));
        assert!(matches!(nan, Ok(Value::F64(f)) if f.is_nan()));
    }

    #[test]
    fn text_like_types_become_text() {
        assert_eq!(
            value(&Variant::String(UAString::from("héllo"))),
            Ok(Value::String("héllo".into()))
        );
        assert_eq!(
            value(&Variant::LocalizedText(Box::new(LocalizedText::new(
                "en", "hot"
            )))),
            Ok(Value::String("hot".into()))
        );
    }

    #[test]
    fn a_date_time_becomes_rfc3339_in_utc() {
        let d = DateTime::ymd_hms_nano(2026, 12, 6, 12, 30, 1, 123_456_700);
        assert_eq!(
            value(&Variant::DateTime(Box::new(d))),
            Ok(Value::String("2026-12-06T12:30:01.123456700Z".into()))
        );
        assert_eq!(unix_nanos(&d), Some(1_796_560_201_123_456_700));
        assert_eq!(unix_nanos(&DateTime::null()), None);
    }

    #[test]
    fn arrays_become_json_and_byte_strings_bytes() {
        let a = Array::new(
            VariantScalarTypeId::Int32,
            vec![Variant::Int32(1), Variant::Int32(-2)],
        )
        .expect("array");
        assert_eq!(
            value(&Variant::Array(Box::new(a))),
            Ok(Value::Json(JsonText::parse("[1,-2]").expect("json")))
        );
        assert_eq!(
            value(&Variant::ByteString(ByteString::from(vec![0u8, 255]))),
            Ok(Value::Bytes(vec![0, 255]))
        );
    }

    #[test]
    fn the_status_code_names_the_quality() {
        assert_eq!(quality(StatusCode::Good), Quality::Good);
        assert_eq!(
            quality(StatusCode::BadNodeIdUnknown),
            Quality::Bad(Reason::Other("BadNodeIdUnknown".into()))
        );
        assert!(matches!(
            quality(StatusCode::UncertainLastUsableValue),
            Quality::Uncertain(Reason::Other(n)) if n == "UncertainLastUsableValue"
        ));
    }

    #[test]
    fn a_bad_value_without_data_keeps_the_status_and_the_time() {
        let dv = DataValue {
            value: None,
            status: Some(StatusCode::BadCommunicationError),
            source_timestamp: None,
            source_picoseconds: None,
            server_timestamp: None,
            server_picoseconds: None,
        };
        let s = sample(&dv, Timestamp(42));
        assert_eq!(s.ts, Timestamp(42));
        assert_eq!(s.value, None);
        assert_eq!(
            s.quality,
            Quality::Bad(Reason::Other("BadCommunicationError".into()))
        );
    }
}
