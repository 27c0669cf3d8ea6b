//! Where events come from: a closed set of source kinds while there are few.
//!
//! Each source runs as `async fn run(self, shutdown)` and hands event bodies to
//! the outbox handle; the outbox, not the source, decides their seq.

pub mod modbus;
pub mod mqtt;
#[cfg(feature = "opcua")]
pub mod opcua;

use outpost_protocols::Value;

/// A value for a writable Modbus tag, from an MQTT → Modbus bridge.
#[derive(Debug, Clone)]
pub struct WriteCommand {
    /// The tag's index in its device's tag list.
    pub tag: usize,
    /// The value as received (JSON number or boolean, or text).
    pub value: Value,
    /// The topic it came from, for the log.
    pub topic: String,
}
