//! Measurement: a command's round trip, hub → agent → device write and
//! read-back → result at the hub, on loopback.
//!
//! A hub, an agent and `outpost-devsim` (the device) on loopback; the policy
//! lets the break-glass admin write one tag. Commands are sent one at a
//! time with `outpost-hub command send` (the operator's path), each after a
//! random pause of up to one second, so that they arrive at random moments
//! of the session's check for new commands, as an operator's do; each waits
//! for its result before the next is sent. The round trip is the hub's own
//! record: `finished_at − created_at` of the `commands` row (stored →
//! result stored), split into the wait for delivery (`delivered_at −
//! created_at`, the session looks for new commands every second) and the
//! agent's part (`finished_at − delivered_at`: the frame out, the ledger's
//! two fsyncs, the device's write and read-back, the result back and
//! recorded). Every command must come back `applied` with the value written.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use rusqlite::{Connection, OpenFlags, OptionalExtension as _};

use crate::procs::{hub_db, Bins};
use crate::report::{Row, Verdict};

/// The sizes of the run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    /// Commands sent, one after the other.
    pub(crate) commands: usize,
}

/// The agent's id.
const AGENT: &str = "gw-cmd-bench";

/// The goal for the round trip's p99: the session's one-second check for
/// new commands plus half a second for the rest.
const P99_GOAL: Duration = Duration::from_millis(1500);

/// The holding register the commands write (the simulator counts up in
/// register 0 only).
const REGISTER: u16 = 100;

const POLICY: &str = r#"
description = "command round trip"

[[commands]]
roles = ["admin"]
agents = { site = "bench" }
write = ["plc1/setpoint"]
"#;

/// One command's times at the hub, Unix ns.
struct Times {
    created: i64,
    delivered: i64,
    finished: i64,
}

/// A `commands` row: state, value, created, delivered and finished at.
type CommandRow = (String, Option<String>, i64, Option<i64>, Option<i64>);

/// The state and times of command `id` once it has an outcome.
fn finished(db: &Connection, id: &str) -> Result<Option<(String, Option<String>, Times)>> {
    let row: Option<CommandRow> = db
        .prepare_cached(
            "SELECT state, value, created_at, delivered_at, finished_at FROM commands WHERE id = ?1",
        )?
        .query_row([id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .optional()?;
    Ok(match row {
        Some((state, value, created, Some(delivered), Some(finished))) => Some((
            state,
            value,
            Times {
                created,
                delivered,
                finished,
            },
        )),
        Some((state, _, _, None, Some(_))) => bail!("command {id} finished {state} undelivered"),
        _ => None,
    })
}

/// Nearest-rank quantile of sorted durations.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn nanos(d: i64) -> Duration {
    Duration::from_nanos(u64::try_from(d).unwrap_or(0))
}

/// The run: see the module doc.
pub(crate) fn run(bins: &Bins, dir: &Path, p: Params) -> Result<Vec<Row>> {
    let root = dir.join("commands");
    std::fs::create_dir_all(&root)?;
    let pki = bins.pki(&root.join("pki"))?;
    let creds = pki.issue_agent(AGENT)?;
    let hub = bins.start_hub(&root.join("hub"), &pki.hub_dir)?;
    let policy = root.join("policy.toml");
    std::fs::write(&policy, POLICY)?;
    bins.hub_cli(
        &hub,
        &["policy", "apply", policy.to_str().context("utf-8 path")?],
    )?;
    let device = bins.start_devsim(1)?;
    let home = root.join("agent");
    let data_dir = home.join("data");
    std::fs::create_dir_all(&data_dir)?;
    let mut agent = bins.start_agent(
        &home,
        &format!(
            r#"[agent]
data_dir = "{data}"
id = "{AGENT}"
labels = {{ site = "bench" }}

[uplink]
hub = "{hub}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"

[[modbus.devices]]
name = "plc1"
address = "{device}"
poll = "1s"

[[modbus.devices.tags]]
name = "setpoint"
table = "holding"
address = {REGISTER}
type = "u16"
writable = true

[observability]
metrics = ""
log = "warn"
"#,
            data = data_dir.display(),
            hub = hub.addr,
            device = device.addr,
            ca = creds.join("ca.pem").display(),
            cert = creds.join("agent.pem").display(),
            key = creds.join("agent.key").display(),
        ),
    )?;
    // The agent runs the policy once it reported its version to the hub.
    let db = Connection::open_with_flags(
        hub_db(&hub),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    db.busy_timeout(Duration::from_secs(5))?;
    let ready = Instant::now();
    loop {
        let version: Option<Option<i64>> = db
            .query_row(
                "SELECT policy_version FROM agents WHERE agent_id = ?1",
                [AGENT],
                |r| r.get(0),
            )
            .optional()?;
        if version.flatten() == Some(1) {
            break;
        }
        if !agent.proc.is_running() {
            bail!(
                "the agent exited (log: {})",
                home.join("agent.log").display()
            );
        }
        if ready.elapsed() > Duration::from_secs(60) {
            bail!("the agent did not run the policy within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut rng = 0x9e37_79b9_7f4a_7c15_u64
        ^ u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(1),
        );
    let mut total = Vec::with_capacity(p.commands);
    let mut waiting = Vec::with_capacity(p.commands);
    let mut agent_part = Vec::with_capacity(p.commands);
    for i in 0..p.commands {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(rng % 1000));
        let value = (i % 1000) as u16;
        let out = bins.hub_cli(
            &hub,
            &[
                "command",
                "send",
                "--agent",
                AGENT,
                "--write",
                &format!("plc1/setpoint={value}"),
                "--json",
            ],
        )?;
        let sent: serde_json::Value = serde_json::from_str(out.trim())
            .with_context(|| format!("command send said {out:?}"))?;
        let id = sent[0]["id"]
            .as_str()
            .with_context(|| format!("no id in {sent}"))?
            .to_owned();
        let started = Instant::now();
        let (state, read_back, t) = loop {
            if let Some(done) = finished(&db, &id)? {
                break done;
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("command {id} has no result after 60 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        ensure!(
            state == "applied" && read_back.as_deref() == Some(value.to_string().as_str()),
            "command {id}: {state}, read back {read_back:?}, wrote {value}"
        );
        total.push(nanos(t.finished - t.created));
        waiting.push(nanos(t.delivered - t.created));
        agent_part.push(nanos(t.finished - t.delivered));
    }
    drop(agent);
    for v in [&mut total, &mut waiting, &mut agent_part] {
        v.sort();
    }
    let (p50, p99) = (quantile(&total, 0.5), quantile(&total, 0.99));
    eprintln!(
        "commands: {} round trips: p50 {}, p99 {}, max {}; waiting for delivery p50 {} p99 {}; agent part p50 {} p99 {}",
        p.commands,
        ms(p50),
        ms(p99),
        ms(total.last().copied().unwrap_or_default()),
        ms(quantile(&waiting, 0.5)),
        ms(quantile(&waiting, 0.99)),
        ms(quantile(&agent_part, 0.5)),
        ms(quantile(&agent_part, 0.99)),
    );
    Ok(vec![Row {
        what: format!(
            "Command round trip, hub → agent → device write and read-back → result at the hub ({} commands, one at a time, at random moments; of it: waiting for the session's 1 s check p50 {} / p99 {}, the agent's part p50 {} / p99 {})",
            p.commands,
            ms(quantile(&waiting, 0.5)),
            ms(quantile(&waiting, 0.99)),
            ms(quantile(&agent_part, 0.5)),
            ms(quantile(&agent_part, 0.99)),
        ),
        ours: format!("p50 {} / p99 {}", ms(p50), ms(p99)),
        baseline: "-".into(),
        ratio: "-".into(),
        target: format!("p99 ≤ {}", ms(P99_GOAL)),
        verdict: Verdict::from_bool(p99 <= P99_GOAL),
    }])
}
