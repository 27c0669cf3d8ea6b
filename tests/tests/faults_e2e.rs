//! Faults done to the agent's storage, with the real binary: an outbox whose
//! file is damaged between two runs is detected at start, moved aside with
//! what is readable kept under its seqs, and the agent goes on (no crash
//! loop); with `on_corruption = "stop"` it refuses to start, naming the file.
//!
//! Every wait polls a condition until a deadline.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use outpost_tests::{agent_outbox_stats, outbox_events, wait_until, Agent, Devsim};

const DEADLINE: Duration = Duration::from_secs(60);

/// How many registers the device has and the agent reads each poll.
const TAGS: u16 = 25;

fn agent_config(device: std::net::SocketAddr, extra: &str) -> String {
    let mut c = format!(
        r#"
[agent]
data_dir = "data"

[outbox]
synchronous = "normal"
{extra}

[observability]
metrics = ""
log = "info"

[[modbus.devices]]
name = "plc"
address = "{device}"
unit = 1
poll = "20ms"
timeout = "300ms"
"#
    );
    for t in 0..TAGS {
        c.push_str(&format!(
            "\n[[modbus.devices.tags]]\nname = \"r{t}\"\ntable = \"holding\"\naddress = {t}\ntype = \"u16\"\n"
        ));
    }
    c
}

/// A device whose registers all ramp, so every poll stores every tag.
fn sim() -> String {
    let mut s = String::from("tick = \"10ms\"\n");
    for t in 0..TAGS {
        s.push_str(&format!(
            "\n[[points]]\ntable = \"holding\"\naddress = {t}\ntype = \"u16\"\nwave = \"ramp\"\nmin = 0\nmax = 60000\nperiod = \"{}s\"\n",
            3 + t
        ));
    }
    s
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
}

/// Writes garbage over three pages in the middle of the file.
fn damage(path: &Path) -> Result<()> {
    let len = std::fs::metadata(path)?.len();
    ensure!(
        len > 32 * 4096,
        "the outbox is too small to damage in the middle: {len}"
    );
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.seek(SeekFrom::Start(len / 2 / 4096 * 4096))?;
    f.write_all(&[0x5a; 3 * 4096])?;
    f.sync_all()?;
    Ok(())
}

#[test]
fn a_damaged_outbox_is_moved_aside_at_start_and_the_agent_goes_on() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sim = Devsim::start(dir.path(), &sim(), None)?;
    let config = agent_config(sim.addr, "");
    let mut agent = Agent::start(dir.path(), &config)?;
    let data = dir.path().join("data");
    // Enough events that the file has a B-tree of many pages.
    wait_until(DEADLINE, "10,000 events in the outbox", || {
        agent_outbox_stats(&agent.config)
            .map(|s| s["events"].as_u64().unwrap_or(0) >= 10_000)
            .unwrap_or(false)
    })?;
    agent.proc.term(Duration::from_secs(30))?;
    let before = outbox_events(&data)?;
    let last_before = before.last().map(|e| e.seq.0).context("events")?;
    damage(&data.join("outbox.db"))?;

    let mut agent = Agent::start_file(&agent.config)?;
    wait_until(DEADLINE, "the agent to say what it did", || {
        log(dir.path()).contains("The outbox was damaged")
    })?;
    // It keeps running and storing, after every seq the damaged file had.
    wait_until(DEADLINE, "new events after the recovery", || {
        outbox_events(&data)
            .map(|ev| ev.iter().filter(|e| e.seq.0 > last_before).count() >= 50)
            .unwrap_or(false)
    })?;
    ensure!(
        agent.proc.is_running(),
        "the agent exited:\n{}",
        log(dir.path())
    );
    let after = outbox_events(&data)?;
    let kept: Vec<_> = after.iter().filter(|e| e.seq.0 <= last_before).collect();
    ensure!(
        !kept.is_empty() && kept.len() < before.len(),
        "kept {} of {}",
        kept.len(),
        before.len()
    );
    for e in &kept {
        let original = before
            .iter()
            .find(|b| b.seq == e.seq)
            .context("a seq that was never written")?;
        ensure!(
            original.body == e.body,
            "seq {} changed in the salvage",
            e.seq
        );
    }
    let moved: Vec<_> = std::fs::read_dir(&data)?
        .flatten()
        .filter(|f| {
            f.file_name()
                .to_string_lossy()
                .starts_with("outbox.db.corrupt-")
        })
        .collect();
    ensure!(!moved.is_empty(), "the damaged file was not kept");
    agent.proc.term(Duration::from_secs(30))?;
    // A clean start after that finds nothing wrong.
    let mut agent = Agent::start_file(&agent.config)?;
    wait_until(DEADLINE, "the agent to run again", || {
        log(dir.path()).matches("Agent running.").count() >= 3
    })?;
    ensure!(log(dir.path()).matches("The outbox was damaged").count() == 1);
    agent.proc.term(Duration::from_secs(30))?;
    Ok(())
}

#[test]
fn with_on_corruption_stop_a_damaged_outbox_stops_the_agent_naming_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sim = Devsim::start(dir.path(), &sim(), None)?;
    let config = agent_config(sim.addr, "on_corruption = \"stop\"");
    let mut agent = Agent::start(dir.path(), &config)?;
    wait_until(DEADLINE, "10,000 events in the outbox", || {
        agent_outbox_stats(&agent.config)
            .map(|s| s["events"].as_u64().unwrap_or(0) >= 10_000)
            .unwrap_or(false)
    })?;
    agent.proc.term(Duration::from_secs(30))?;
    let db = dir.path().join("data/outbox.db");
    damage(&db)?;
    let mut agent = Agent::start_file(&agent.config)?;
    let mut status = None;
    wait_until(DEADLINE, "the agent to refuse", || {
        status = agent.proc.child.try_wait().ok().flatten();
        status.is_some()
    })?;
    ensure!(status.and_then(|s| s.code()) == Some(1), "{status:?}");
    let l = log(dir.path());
    ensure!(
        l.contains("is damaged") && l.contains(&db.display().to_string()),
        "{l}"
    );
    ensure!(db.exists(), "the file was left where it is");
    Ok(())
}
