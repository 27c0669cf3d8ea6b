//! Sinks: where the hub forwards what it stores — a cloud MQTT broker, a NATS
//! JetStream stream, an HTTP service — each in a region.
//!
//! Why a trait and a runner rather than code per sink in the session: the
//! promise (exactly once, residency, nothing dropped silently) is the same for
//! every sink, so it lives in one place — the runner, fed from durable rows of
//! the hub's store, retrying with backoff, checking residency at the last
//! step — and a sink only has to say when its far end has accepted a batch
//! (a PUBACK, a JetStream ack, a 2xx). A sink that cannot accept says whether
//! trying again can help ([`SinkError::Transient`]) or not
//! ([`SinkError::Rejected`]).

//!
//! The rooms: `sink` (the trait and its errors), `config` (`[[sinks]]`),
//! `format` (topics, subjects and payloads), `cloudevents` (the
//! CloudEvents 1.0 envelope), `build` (one entry into a
//! sink), the three kinds, `tls` (their TLS), and `runner` on top. This
//! root only gathers their names.

mod build;
pub mod cloudevents;
pub mod config;
pub mod format;
pub mod http;
pub mod jetstream;
pub mod mqtt;
pub mod runner;
pub mod sink;
pub(crate) mod tls;

pub use config::{
    check_id, HttpSinkConfig, JetStreamSinkConfig, MqttSinkConfig, RawSinkConfig, SinkConfig,
    SinkConfigError, SinkKind,
};
pub use format::{check_template, expand, payload, PayloadFormat};
pub use sink::{Sink, SinkError, SinkEvent};

/// TLS to a sink's far end (`[sinks.<kind>.tls]`): the table every client
/// connection of the hub shares.
pub use crate::client_tls::ClientTls as SinkTls;

#[cfg(test)]
mod tests;
