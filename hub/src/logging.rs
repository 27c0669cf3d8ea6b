//! Structured logs with `tracing` on stderr; `RUST_LOG` wins over
//! `[observability] log` for one-off debugging.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber.
pub fn init(filter: &str) -> Result<(), String> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => EnvFilter::try_new(f).map_err(|e| format!("RUST_LOG: {e}"))?,
        _ => EnvFilter::try_new(filter).map_err(|e| e.to_string())?,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init()
        .map_err(|e| e.to_string())
}
