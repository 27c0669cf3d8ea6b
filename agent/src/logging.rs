//! Structured logs with `tracing`, as text for people or JSON for collectors.
//!
//! `RUST_LOG`, when set, wins over `[observability] log` so an operator can
//! raise verbosity for one run without editing the config.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; logs go to stderr.
pub fn init(filter: &str, format: &str) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => EnvFilter::try_new(f).map_err(|e| format!("RUST_LOG: {e}"))?,
        _ => EnvFilter::try_new(filter).map_err(|e| format!("log: {e}"))?,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = if format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    result.map_err(|e| e.to_string())
}
