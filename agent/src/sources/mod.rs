//! Where events come from: a closed set of source kinds while there are few.
//!
//! Each source runs as `async fn run(self, shutdown)` and hands event bodies to
//! the outbox handle; the outbox, not the source, decides their seq.

pub mod modbus;
pub mod mqtt;
#[cfg(feature = "opcua")]
pub mod opcua;

use outpost_protocols::{EventBody, Quality, StreamName, Timestamp, Value};
use tokio::sync::oneshot;

/// A request to a Modbus device's own task, which alone talks to the
/// device (so reads and writes never interleave on the wire): a value for a
/// writable tag from an MQTT → Modbus bridge or a command from the hub, or
/// a read of a tag now.
#[derive(Debug)]
pub struct WriteCommand {
    /// The tag's index in its device's tag list.
    pub tag: usize,
    /// Write this value (as received: JSON number or boolean, or text), or
    /// read the tag.
    pub op: DeviceOp,
    /// Where it came from (a topic, or `command <id>`), for the log.
    pub topic: String,
    /// Where the outcome goes (a command's); `None` for a bridge's write,
    /// whose outcome the device's task records on
    /// [`BRIDGE_WRITES_STREAM`](outpost_protocols::event::BRIDGE_WRITES_STREAM) instead (a command's outcome reaches the
    /// hub as its result).
    pub reply: Option<oneshot::Sender<DeviceReply>>,
}

/// What a device's task is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceOp {
    /// Write the value, then (for a command) read the tag back.
    Write(Value),
    /// Read the tag.
    Read,
}

/// What a device's task did with a command's request.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceReply {
    /// Written (and read back: the value, or `None` if the read-back
    /// failed), or read.
    Done(Option<Value>),
    /// Not attempted: the value does not fit the tag's type or limits.
    Refused(String),
    /// Attempted and failed, or the device was not reachable: why.
    Failed(String),
}

/// The longest value, as JSON text, a bridge write's record carries; a
/// longer payload (it cannot have been a register's value) is recorded by
/// its size.
const MAX_RECORDED_VALUE: usize = 256;

/// The record of one write an MQTT → Modbus bridge asked for, on
/// [`BRIDGE_WRITES_STREAM`](outpost_protocols::event::BRIDGE_WRITES_STREAM): sent to the hub through the outbox like any
/// event, so the site's local writes are seen where the fleet's commands
/// are. `outcome` is `applied`, `refused` or `failed`, with `reason` unless
/// applied.
pub fn bridge_write_record(
    ts: Timestamp,
    topic: &str,
    device: &str,
    tag: &str,
    value: &Value,
    outcome: &str,
    reason: Option<&str>,
) -> EventBody {
    let mut value = value.to_json();
    let len = value.to_string().len();
    if len > MAX_RECORDED_VALUE {
        value = serde_json::json!({ "omitted_bytes": len });
    }
    let mut doc = serde_json::json!({
        "topic": topic,
        "device": device,
        "tag": tag,
        "value": value,
        "outcome": outcome,
    });
    if let Some(r) = reason {
        doc["reason"] = r.into();
    }
    EventBody {
        stream: StreamName::bridge_writes(),
        ts,
        value: Value::Json(outpost_protocols::JsonText::from_value(&doc)),
        quality: Quality::Good,
        attrs: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(body: &EventBody) -> serde_json::Value {
        match &body.value {
            Value::Json(j) => j.to_value(),
            other => panic!("not JSON: {other:?}"),
        }
    }

    #[test]
    fn a_bridge_write_record_names_topic_tag_value_and_outcome_on_the_reserved_stream() {
        let b = bridge_write_record(
            Timestamp(9),
            "cmd/plc1/setpoint",
            "plc1",
            "setpoint",
            &Value::U64(77),
            "applied",
            None,
        );
        assert_eq!(b.stream.as_str(), "$outpost/bridge/writes");
        assert!(b.stream.is_reserved());
        assert_eq!(b.ts, Timestamp(9));
        assert_eq!(
            doc(&b),
            serde_json::json!({"topic": "cmd/plc1/setpoint", "device": "plc1", "tag": "setpoint", "value": 77, "outcome": "applied"})
        );
        let b = bridge_write_record(
            Timestamp(9),
            "t",
            "plc1",
            "setpoint",
            &Value::String("x".repeat(1000)),
            "refused",
            Some("not a number"),
        );
        let d = doc(&b);
        assert_eq!(d["value"], serde_json::json!({"omitted_bytes": 1002}));
        assert_eq!(d["reason"], "not a number");
    }
}
