//! Outpost's fleet hub.
//!
//! Agents connect over QUIC with certificates from the fleet CA (`ca`); each
//! connection drives a sans-IO session (`server`), whose batches the store
//! commits in group transactions, deduplicated by `(agent_id, seq)`, before
//! anything is acknowledged (`store`). Operators read the store while the hub
//! runs (`verbs`).
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

pub mod admin;
pub mod agents;
pub mod api;
pub mod audit;
pub mod ca;
pub mod client_tls;
pub mod clock;
pub mod commands;
pub mod config;
pub mod enroll;
pub mod hashing;
pub mod kpis;
pub mod logging;
pub mod metrics;
pub mod nats;
pub mod policy;
pub mod printable;
pub mod remote;
pub mod run;
pub mod server;
pub mod sinks;
pub mod store;
pub mod trust;
pub mod verbs;
