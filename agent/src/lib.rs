//! Outpost's edge agent.
//!
//! Sources (Modbus, MQTT) produce event bodies; the outbox gives them a seq and
//! makes them durable in one SQLite transaction shared by every source (group
//! commit); only then are MQTT messages acknowledged to the site broker.
//!
//! Architecture invariant: the agent acknowledges nothing to a peer before the
//! transaction that holds it has committed.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

pub mod bridges;
pub mod cert;
pub mod clock;
pub mod commands;
pub mod config;
pub mod enroll;
pub mod logging;
pub mod metrics;
pub mod outbox;
pub mod policy;
pub mod report;
pub mod run;
pub mod sources;
pub mod uplink;
