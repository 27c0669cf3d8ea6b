//! The operator HTTP API.

pub mod auth;
