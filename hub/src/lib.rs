//! Outpost's fleet hub.
//!
//! This release validates the hub's configuration (`outpost-hub check`); QUIC
//! ingest, the store and the operator surface arrive with the "Secure sync to
//! the hub" issue and build on the same config.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

pub mod config;
