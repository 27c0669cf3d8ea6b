//! Sparkplug B, as a host application at the site broker reads it: edge
//! nodes publish typed metrics with birth and death certificates, and a
//! host that missed a message asks for a rebirth rather than guessing.
//!
//! Why here and not in the agent: the alias tables, `bdSeq`/`seq` and the
//! stale marking are protocol state, tested without a broker (and fuzzed);
//! the agent's MQTT source only carries bytes to [`host::Host`] and its
//! NCMDs back.
//!
//! The rooms: `topic` (the namespace), `payload` (the protobuf messages,
//! from the Eclipse Tahu schema), `host` (the state machine).

pub mod host;
pub mod payload;
pub mod topic;

pub use host::{Host, HostOptions, Output, RebirthReason};
pub use topic::{MessageType, Topic, TopicError, NAMESPACE};

#[cfg(test)]
mod tests;
