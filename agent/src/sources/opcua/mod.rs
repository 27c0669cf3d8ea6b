//! The OPC UA source: monitored items in subscriptions on OPC UA servers.
//!
//! Built on async-opcua, behind the agent's default-on `opcua` cargo
//! feature so a gateway that never meets OPC UA can leave its crypto and
//! type tables out of the binary. The values module is pure (OPC UA values
//! to event values); the trust module writes the library's trust store from
//! the config; the source module drives one session per server.

mod source;
mod trust;
mod values;

pub use source::OpcuaSource;
