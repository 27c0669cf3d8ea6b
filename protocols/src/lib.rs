//! What Outpost's agent and hub agree on, and what field devices speak.
//!
//! This crate is Outpost's quinn-proto: it is deterministic, opens no sockets,
//! touches no files and never reads the clock. Time arrives as an argument and
//! bytes arrive as slices, so every rule here is testable without I/O and the
//! agent and hub only drive it.
//!
//! Architecture invariant: nothing in this crate depends on tokio, a socket, the
//! file system or the OS clock.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

pub mod enroll;
pub mod event;
pub mod modbus;
pub mod policy;
pub mod sparkplug;
pub mod topic;
pub mod wire;

pub use event::{
    AgentId, Event, EventBody, JsonText, Quality, Reason, Seq, StreamName, Timestamp, Value,
};
