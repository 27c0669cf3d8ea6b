//! What the commands tests share: pymodbus as the device, counting every
//! write request it receives, and the operator's side through the hub's
//! break-glass CLI (`command send|status|list`).
//!
//! The write counts are the device's own (`tests/peers/pymodbus_server.py
//! --writes`), not the agent's or the hub's account: "executed at most once"
//! is checked where it matters.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;

use crate::{free_port, wait_until, Hub, Proc};

/// How long a command may take to reach an outcome on a loaded 2-core
/// machine running debug builds.
pub const DEADLINE: Duration = Duration::from_secs(90);

/// pymodbus serving `points` (the JSON of `pymodbus_server.py --points`) on
/// a free port of 127.0.0.1, counting writes; killed on drop.
pub struct Device {
    /// The process.
    pub proc: Proc,
    /// Where it serves Modbus TCP.
    pub addr: SocketAddr,
    writes: PathBuf,
}

impl Device {
    /// Starts pymodbus in `dir` (its files: `points.json`, `writes.json`,
    /// `pymodbus.log`) and waits until it serves.
    pub fn start(dir: &Path, points: &str) -> Result<Device> {
        let python = std::env::var("OUTPOST_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("peers")
            .join("pymodbus_server.py");
        std::fs::create_dir_all(dir)?;
        let points_file = dir.join("points.json");
        std::fs::write(&points_file, points)?;
        let writes = dir.join("writes.json");
        let log = dir.join("pymodbus.log");
        let port = free_port()?;
        let mut child = Command::new(&python)
            .arg(&script)
            .arg("--port")
            .arg(port.to_string())
            .arg("--points")
            .arg(&points_file)
            .arg("--writes")
            .arg(&writes)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| {
                format!("cannot run {python:?} with pymodbus (tests/run installs it)")
            })?;
        let stdout = child.stdout.take().context("pymodbus stdout")?;
        let proc = Proc {
            child,
            name: "pymodbus".into(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        match rx.recv_timeout(DEADLINE) {
            Ok(Some(Ok(line))) if line.starts_with("listening ") => Ok(Device {
                proc,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                writes,
            }),
            other => bail!(
                "pymodbus did not start ({other:?}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        }
    }

    /// Every write request received so far, by `table/address`
    /// (`holding/0`).
    pub fn writes(&self) -> Result<BTreeMap<String, u64>> {
        let text = std::fs::read_to_string(&self.writes)
            .with_context(|| format!("read {}", self.writes.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: {text}", self.writes.display()))
    }

    /// The write requests received for one holding register.
    pub fn holding_writes(&self, address: u16) -> Result<u64> {
        Ok(self
            .writes()?
            .get(&format!("holding/{address}"))
            .copied()
            .unwrap_or(0))
    }
}

/// Parses a CLI's JSON output.
pub fn json(out: &str) -> Result<Value> {
    serde_json::from_str(out.trim()).with_context(|| format!("not JSON: {out}"))
}

/// `command send --json ARGS`: the exit status, the commands it printed,
/// and its stderr.
pub fn send(hub: &Hub, args: &[&str]) -> Result<(i32, Vec<Value>, String)> {
    let mut all = vec!["command", "send", "--json"];
    all.extend_from_slice(args);
    let (code, out, err) = hub.cli(&all)?;
    let sent = if out.trim().is_empty() {
        Vec::new()
    } else {
        json(&out)?.as_array().cloned().unwrap_or_default()
    };
    Ok((code, sent, err))
}

/// Sends one command that the hub must accept; its id.
pub fn send_one(hub: &Hub, args: &[&str]) -> Result<String> {
    let (code, sent, err) = send(hub, args)?;
    ensure!(code == 0, "command send {args:?} exited {code}: {err}");
    ensure!(sent.len() == 1, "command send {args:?} printed {sent:?}");
    id_of(&sent)
}

/// The id of the first command printed.
pub fn id_of(sent: &[Value]) -> Result<String> {
    sent.first()
        .and_then(|c| c["id"].as_str())
        .map(str::to_owned)
        .context("no command printed")
}

/// `command status ID --json`.
pub fn status(hub: &Hub, id: &str) -> Result<Value> {
    let (code, out, err) = hub.cli(&["command", "status", id, "--json"])?;
    ensure!(code == 0, "command status {id}: {err}");
    json(&out)
}

/// The command's state at the hub (`pending`, `delivered`, an outcome).
pub fn state(hub: &Hub, id: &str) -> Result<String> {
    let s = status(hub, id)?;
    s["state"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no state in {s}"))
}

/// Waits until the command has an outcome at the hub and returns its
/// status.
pub fn outcome(hub: &Hub, id: &str) -> Result<Value> {
    let mut last = Value::Null;
    wait_until(DEADLINE, &format!("an outcome of command {id}"), || {
        last = status(hub, id).unwrap_or(Value::Null);
        !matches!(last["state"].as_str(), None | Some("pending" | "delivered"))
    })
    .with_context(|| format!("last status: {last}"))?;
    Ok(last)
}

/// `command list --json --limit LIMIT`, every agent.
pub fn list(hub: &Hub, limit: usize) -> Result<Vec<Value>> {
    let limit = limit.to_string();
    let (code, out, err) = hub.cli(&["command", "list", "--json", "--limit", &limit])?;
    ensure!(code == 0, "command list: {err}");
    json(&out)?
        .as_array()
        .cloned()
        .context("command list --json: not an array")
}

/// `policy apply FILE` of `text`, written to `dir/policy.toml`.
pub fn apply_policy(hub: &Hub, dir: &Path, text: &str) -> Result<()> {
    let policy = dir.join("policy.toml");
    std::fs::write(&policy, text)?;
    let (code, _, err) = hub.cli(&[
        "policy",
        "apply",
        policy.to_str().context("utf-8 path")?,
        "--actor",
        "e2e",
    ])?;
    ensure!(code == 0, "policy apply: {err}");
    Ok(())
}

/// Waits until every agent of `agents` runs policy `version` (it reported
/// it to the hub), so that its own check of a command uses that policy.
pub fn wait_policy(hub: &Hub, agents: &[&str], version: u64) -> Result<()> {
    wait_until(
        DEADLINE,
        &format!("{} agent(s) to run policy {version}", agents.len()),
        || {
            hub.fleet().is_ok_and(|f| {
                agents.iter().all(|id| {
                    f.iter().any(|a| {
                        a["agent_id"] == *id && a["policy_version"].as_u64() == Some(version)
                    })
                })
            })
        },
    )
}

/// The `command.result` entries of the hub's audit log for command `id`.
pub fn audited_results(hub: &Hub, id: &str) -> Result<usize> {
    let (code, out, err) = hub.cli(&["audit", "list", "--json", "--limit", "100000"])?;
    ensure!(code == 0, "audit list: {err}");
    let all = json(&out)?;
    let entries = all["entries"]
        .as_array()
        .with_context(|| format!("audit list --json: no entries in {out}"))?;
    let needle = format!("command {id} ");
    Ok(entries
        .iter()
        .filter(|e| {
            e["action"] == "command.result"
                && e["detail"].as_str().is_some_and(|d| d.contains(&needle))
        })
        .count())
}

/// Occurrences of `needle` in the log file `path`.
pub fn log_count(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.matches(needle).count())
        .unwrap_or(0)
}

/// Whether the agent's ledger (`<data_dir>/commands.db`) holds the outcome
/// of command `id` (read-only, beside the running agent).
pub fn ledger_has_outcome(data_dir: &Path, id: &str) -> bool {
    let Ok(db) = rusqlite::Connection::open_with_flags(
        data_dir.join("commands.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    ) else {
        return false;
    };
    db.query_row(
        "SELECT outcome IS NOT NULL FROM commands WHERE id = ?1",
        [id],
        |r| r.get::<_, bool>(0),
    )
    .unwrap_or(false)
}
