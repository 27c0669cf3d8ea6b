//! The MQTT source: the site broker's messages into the outbox, acknowledged
//! only after they are durable.

pub mod session;
mod source;

pub use source::{MqttError, MqttSource};
