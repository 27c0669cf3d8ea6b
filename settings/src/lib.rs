//! How Outpost's binaries read their configuration, and the human units
//! (`"500ms"`, `"64MiB"`) their config files and the policy document are
//! written in.
//!
//! This is not protocol code, so it lives below `outpost-protocols` rather
//! than in it: the agent and the hub load their files with it, and the policy
//! language borrows its units and its one-line error folding. The arrows
//! point one way: settings ← protocols ← agent, hub.
//!
//! Architecture invariant: nothing here opens a file or reads the process
//! environment; each binary passes its file's text and its environment in.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

mod error;
mod load;
mod segments;
mod tree;
mod units;

pub use error::ConfigError;
pub use load::{one_line, parse};
pub use units::{HumanDuration, HumanSize};
