//! Measurement 7: the sizes of the static builds that go onto gateways.
//!
//! A gateway's flash is small and updates travel over the same thin links as
//! the data, so the size of what the packages ship is part of the product.
//! The goal row (issue 24) is the aarch64 `outpost-agent`, the one most
//! gateways install: it is built here, by `cross/build` with the shipping
//! profile (each program in its own cargo invocation, so no dependency
//! feature is unified with the hub's), so that its size is this run's code.
//! The other rows read what an earlier `cross/build` left in
//! `target/<triple>/release/` and say when it was built.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::SystemTime;

use anyhow::{Context as _, Result};

use super::report::{Row, Verdict};

/// The goal for the ARM `outpost-agent` (the package without OPC UA), as
/// `cross/build` checks it (`CROSS_MAX_AGENT_BYTES`): MB = 10^6 bytes.
const AGENT_GOAL: u64 = 6_000_000;

/// The x86_64 agent's budget in `cross/build` (its code is larger).
const AGENT_X86_64_BUDGET: u64 = 10_000_000;

/// The budget of `outpost-agent-opcua`, as `cross/build` checks it
/// (`CROSS_MAX_AGENT_OPCUA_BYTES`).
const AGENT_OPCUA_BUDGET: u64 = 12_000_000;

/// What `cross/build` makes: (program, triple). Each agent has two programs:
/// `outpost-agent` (package outpost-agent) and `outpost-agent-opcua`
/// (package outpost-agent-opcua, installed as /usr/bin/outpost-agent).
const BUILDS: [(&str, &str); 8] = [
    ("outpost-agent", "aarch64-unknown-linux-musl"),
    ("outpost-agent", "armv7-unknown-linux-musleabihf"),
    ("outpost-agent", "x86_64-unknown-linux-musl"),
    ("outpost-agent-opcua", "aarch64-unknown-linux-musl"),
    ("outpost-agent-opcua", "armv7-unknown-linux-musleabihf"),
    ("outpost-agent-opcua", "x86_64-unknown-linux-musl"),
    ("outpost-hub", "aarch64-unknown-linux-musl"),
    ("outpost-hub", "x86_64-unknown-linux-musl"),
];

/// The triple built in the run.
const BUILT_HERE: &str = "aarch64-unknown-linux-musl";

/// Builds the aarch64 agents with `cross/build` (unless `build` is false),
/// then one row per static build in `target_dir`.
pub(crate) fn run(workspace: &Path, target_dir: &Path, build: bool) -> Result<Vec<Row>> {
    let started = SystemTime::now();
    if build {
        cross_build(workspace, target_dir)?;
    }
    Ok(BUILDS
        .iter()
        .map(|&(program, triple)| {
            let path = target_dir.join(triple).join("release").join(program);
            row(program, triple, &path, started)
        })
        .collect())
}

/// `bash cross/build --agent-only aarch64`, its output on stderr. Profile
/// overrides in the environment (tests/run sets thin LTO for CI's builds)
/// are removed: the row measures the shipping profile.
fn cross_build(workspace: &Path, target_dir: &Path) -> Result<()> {
    let mut cmd = Command::new("bash");
    cmd.arg(workspace.join("cross").join("build"))
        .args(["--agent-only", "aarch64"])
        .current_dir(workspace)
        .env("CARGO_TARGET_DIR", target_dir)
        .stdin(Stdio::null())
        .stdout(std::io::stderr());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CARGO_PROFILE_RELEASE_") {
            cmd.env_remove(k);
        }
    }
    eprintln!("sizes: bash cross/build --agent-only aarch64 (the shipping profile)");
    let status = cmd
        .status()
        .context("cannot run bash cross/build --agent-only aarch64")?;
    // Exit 1 also means "built, but over a budget": the rows say by how much.
    anyhow::ensure!(
        status.code() == Some(0) || status.code() == Some(1),
        "bash cross/build --agent-only aarch64 ended with {status}"
    );
    Ok(())
}

fn row(program: &str, triple: &str, path: &PathBuf, started: SystemTime) -> Row {
    let package = match program {
        "outpost-hub" => "package outpost-hub",
        "outpost-agent-opcua" => "package outpost-agent-opcua, with OPC UA",
        _ => "package outpost-agent, without OPC UA",
    };
    let budget = match program {
        "outpost-agent" if triple.starts_with("x86_64") => Some(AGENT_X86_64_BUDGET),
        "outpost-agent" => Some(AGENT_GOAL),
        "outpost-agent-opcua" => Some(AGENT_OPCUA_BUDGET),
        _ => None,
    };
    let target = budget.map_or_else(|| "-".to_owned(), |b| format!("≤ {}", bytes_mb(b)));
    let meta = std::fs::metadata(path);
    let when = match meta.as_ref().ok().and_then(|m| m.modified().ok()) {
        Some(t) if t >= started => "built by cross/build in this run".to_owned(),
        Some(t) => format!(
            "left by an earlier cross/build, {} h old",
            started.duration_since(t).map_or(0, |d| d.as_secs() / 3600)
        ),
        None => "not built".to_owned(),
    };
    let what = format!(
        "Static build size: `{program}` for `{triple}` ({package}; shipping profile, {when})"
    );
    match meta {
        Ok(m) => {
            let size = m.len();
            let within = budget.is_none_or(|b| size <= b);
            let gap = match budget {
                Some(b) if size > b => format!("; {} over", thousands(size - b)),
                _ => String::new(),
            };
            Row {
                what,
                ours: format!("{} ({} bytes{gap})", bytes_mb(size), thousands(size)),
                baseline: "-".into(),
                ratio: "-".into(),
                target,
                verdict: match budget {
                    Some(_) => Verdict::from_bool(within),
                    None => Verdict::Info,
                },
            }
        }
        Err(_) => Row {
            what,
            ours: format!(
                "not built: `bash cross/build --agent-only {}`",
                triple.split('-').next().unwrap_or(triple)
            ),
            baseline: "-".into(),
            ratio: "-".into(),
            target,
            // The goal's own row must be there; the others need toolchains
            // a machine may lack.
            verdict: if triple == BUILT_HERE && program != "outpost-hub" {
                Verdict::Error
            } else {
                Verdict::Info
            },
        },
    }
}

/// Bytes in MB (10^6), one decimal.
fn bytes_mb(b: u64) -> String {
    format!("{:.2} MB", b as f64 / 1e6)
}

/// 6717752 → "6,717,752".
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_by_three() {
        assert_eq!(thousands(6_717_752), "6,717,752");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(0), "0");
    }

    #[test]
    fn an_agent_over_the_goal_fails_with_its_gap() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("outpost-agent");
        std::fs::write(&f, vec![0u8; 6_000_001]).unwrap();
        let r = row("outpost-agent", BUILT_HERE, &f, SystemTime::UNIX_EPOCH);
        assert_eq!(r.verdict, Verdict::Fail, "{r:?}");
        assert!(r.ours.contains("6,000,001 bytes; 1 over"), "{r:?}");
        std::fs::write(&f, vec![0u8; 6_000_000]).unwrap();
        let r = row("outpost-agent", BUILT_HERE, &f, SystemTime::UNIX_EPOCH);
        assert_eq!(r.verdict, Verdict::Pass, "{r:?}");
        assert!(r.what.contains("in this run"), "{r:?}");
        let missing = row(
            "outpost-agent",
            BUILT_HERE,
            &dir.path().join("x"),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(missing.verdict, Verdict::Error, "{missing:?}");
    }
}
