//! Measurement 7: the sizes of the static builds that go onto gateways.
//!
//! A gateway's flash is small and updates travel over the same thin links as
//! the data, so the size of what `cross/build` makes is part of the product.
//! Nothing is built here: the rows read what `bash cross/build` left in
//! `target/<triple>/release/`, and say how to make what is missing.

use std::path::Path;

use super::procfs::mb;
use super::report::{Row, Verdict};

/// The agent's budget, as `cross/build` checks it (`CROSS_MAX_AGENT_BYTES`).
const AGENT_BUDGET: u64 = 10_000_000;

/// The goal for the static aarch64 agent the packages ship (issue 24).
const AGENT_GOAL: u64 = 6_000_000;

/// What `cross/build` makes: (program, triple).
const BUILDS: [(&str, &str); 5] = [
    ("outpost-agent", "x86_64-unknown-linux-musl"),
    ("outpost-agent", "aarch64-unknown-linux-musl"),
    ("outpost-agent", "armv7-unknown-linux-musleabihf"),
    ("outpost-hub", "x86_64-unknown-linux-musl"),
    ("outpost-hub", "aarch64-unknown-linux-musl"),
];

/// One row per static build, from `target_dir`.
pub(crate) fn rows(target_dir: &Path) -> Vec<Row> {
    BUILDS
        .iter()
        .map(|(program, triple)| {
            let path = target_dir.join(triple).join("release").join(program);
            let what = format!("Static build size: `{program}` for `{triple}` (stripped, LTO)");
            let (target, budget) = if *program == "outpost-agent" && triple.starts_with("aarch64") {
                (
                    format!("≤ {} (issue 24)", mb(AGENT_GOAL / 1024)),
                    Some(AGENT_GOAL + 1),
                )
            } else if *program == "outpost-agent" {
                (
                    format!("< {} (cross/build's budget)", mb(AGENT_BUDGET / 1024)),
                    Some(AGENT_BUDGET),
                )
            } else {
                ("-".to_owned(), None)
            };
            match std::fs::metadata(&path) {
                Ok(m) => Row {
                    what,
                    ours: format!("{} ({} bytes)", mb(m.len() / 1024), m.len()),
                    baseline: "-".into(),
                    ratio: "-".into(),
                    target: match budget {
                        Some(b) if m.len() >= b => {
                            format!("{target}: over by {} bytes", m.len() + 1 - b)
                        }
                        _ => target,
                    },
                    verdict: budget.map_or(Verdict::Info, |b| Verdict::from_bool(m.len() < b)),
                },
                Err(_) => Row {
                    what,
                    ours: format!(
                        "not built: `bash cross/build {}`",
                        triple.split('-').next().unwrap_or(triple)
                    ),
                    baseline: "-".into(),
                    ratio: "-".into(),
                    target,
                    verdict: Verdict::Info,
                },
            }
        })
        .collect()
}
