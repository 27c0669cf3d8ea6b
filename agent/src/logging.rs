//! Structured logs with `tracing`, as text for people or JSON for collectors.
//!
//! `RUST_LOG`, when set, wins over `[observability] log` so an operator can
//! raise verbosity for one run without editing the config.
//!
//! The filter is `Targets` (a level, and levels per module), not `EnvFilter`:
//! that is everything `log` promises, and `EnvFilter`'s span and field
//! directives would bring a regular-expression engine into the static agent
//! (about 0.4 MB of the 6 MB it may weigh; see docs/benchmarks.md).

use std::io::IsTerminal as _;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

/// Parses a filter such as `info,outpost_agent::sources::modbus=debug`.
pub fn parse_filter(filter: &str) -> Result<Targets, String> {
    filter.parse::<Targets>().map_err(|e| e.to_string())
}

/// Installs the global subscriber; logs go to stderr.
pub fn init(filter: &str, format: &str) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => parse_filter(&f).map_err(|e| format!("RUST_LOG: {e}"))?,
        _ => parse_filter(filter).map_err(|e| format!("log: {e}"))?,
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = if format == "json" {
        tracing_subscriber::registry()
            .with(layer.json().flatten_event(true).with_filter(filter))
            .try_init()
    } else {
        tracing_subscriber::registry()
            .with(layer.with_filter(filter))
            .try_init()
    };
    result.map_err(|e| e.to_string())
}
