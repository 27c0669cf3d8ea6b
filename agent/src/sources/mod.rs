//! Where events come from: a closed set of source kinds while there are few.
//!
//! Each source runs as `async fn run(self, shutdown)` and hands event bodies to
//! the outbox handle; the outbox, not the source, decides their seq.

pub mod modbus;
pub mod mqtt;
#[cfg(feature = "opcua")]
pub mod opcua;

use outpost_protocols::Value;
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
    /// Where the outcome goes (a command's); `None` for a bridge's write.
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
