//! Commands operator → hub → agent → device against real peers: the real
//! hub and agent binaries, pymodbus as the device (an implementation
//! independent of ours), the break-glass CLI as the operator. The faults
//! (kill -9 of either end, a broken link, expiry) are in
//! `commands_faults_e2e.rs`; fan-out and publish in `commands_fleet_e2e.rs`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use outpost_tests::{free_port, wait_until, Agent, Hub, Pki, Proc};
use serde_json::Value;

const AGENT: &str = "gw-cmd";

const DEADLINE: Duration = Duration::from_secs(90);

/// Operators may write the setpoint within the site, read anything, and
/// the break-glass admin may too; nobody may write `plc1/other`.
const POLICY: &str = r#"
description = "commands e2e"

[[commands]]
roles = ["operator", "admin"]
agents = { site = "depot-*" }
write = ["plc1/setpoint", "plc1/locked"]
read = ["plc1/+"]
"#;

/// pymodbus serving two holding registers: 0 the setpoint (10), 1 a tag the
/// agent does not mark writable (7).
fn pymodbus(dir: &Path) -> Result<(Proc, SocketAddr)> {
    let python = std::env::var("OUTPOST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("peers")
        .join("pymodbus_server.py");
    let points = dir.join("points.json");
    std::fs::write(
        &points,
        r#"[{"table": "holding", "address": 0, "type": "u16", "value": 10},
            {"table": "holding", "address": 1, "type": "u16", "value": 7}]"#,
    )?;
    let port = free_port()?;
    let mut child = Command::new(&python)
        .arg(&script)
        .arg("--port")
        .arg(port.to_string())
        .arg("--points")
        .arg(&points)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("pymodbus.log"))?)
        .spawn()
        .with_context(|| format!("cannot run {python:?} with pymodbus (tests/run installs it)"))?;
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
        Ok(Some(Ok(line))) if line.starts_with("listening ") => {
            Ok((proc, SocketAddr::from(([127, 0, 0, 1], port))))
        }
        other => bail!(
            "pymodbus did not start ({other:?}): {}",
            std::fs::read_to_string(dir.join("pymodbus.log")).unwrap_or_default()
        ),
    }
}

fn agent_config(hub: &Hub, creds: &Path, device: SocketAddr) -> String {
    format!(
        r#"
[agent]
data_dir = "data"
id = "{AGENT}"
labels = {{ site = "depot-17" }}

[uplink]
hub = "{hub}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
reconnect_min = "100ms"
reconnect_max = "1s"

[[modbus.devices]]
name = "plc1"
address = "{device}"
poll = "1s"

[[modbus.devices.tags]]
name = "setpoint"
table = "holding"
address = 0
type = "u16"
writable = true
min = 0
max = 100

[[modbus.devices.tags]]
name = "locked"
table = "holding"
address = 1
type = "u16"

[observability]
metrics = ""
log = "info"
"#,
        hub = hub.addr,
        ca = creds.join("ca.pem").display(),
        cert = creds.join("agent.pem").display(),
        key = creds.join("agent.key").display(),
    )
}

/// `outpost-hub ARGS` without `--config` (the `--api` verbs).
fn run_hub_cli(args: &[&str]) -> Result<(i32, String, String)> {
    outpost_tests::run_cli(&outpost_tests::bin("outpost-hub")?, args)
}

fn json(out: &str) -> Result<Value> {
    serde_json::from_str(out.trim()).with_context(|| format!("not JSON: {out}"))
}

/// Sends a command with the CLI and returns the commands it printed.
fn send(hub: &Hub, args: &[&str]) -> Result<(i32, Vec<Value>, String)> {
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

fn status(hub: &Hub, id: &str) -> Result<Value> {
    let (code, out, err) = hub.cli(&["command", "status", id, "--json"])?;
    ensure!(code == 0, "command status {id}: {err}");
    json(&out)
}

/// Waits until the command has an outcome and returns it.
fn outcome(hub: &Hub, id: &str) -> Result<Value> {
    let mut last = Value::Null;
    wait_until(DEADLINE, &format!("an outcome of command {id}"), || {
        last = status(hub, id).unwrap_or(Value::Null);
        !matches!(last["state"].as_str(), None | Some("pending" | "delivered"))
    })?;
    Ok(last)
}

fn id_of(sent: &[Value]) -> Result<String> {
    sent.first()
        .and_then(|c| c["id"].as_str())
        .map(str::to_owned)
        .context("no command printed")
}

#[test]
fn a_write_reads_back_what_the_device_holds_and_every_refusal_is_refused_and_audited() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let (_device, device) = pymodbus(dir.path())?;
    let pki = Pki::new(dir.path())?;
    let creds = pki.issue_agent(AGENT)?;
    let hub = Hub::start(dir.path(), &pki)?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY)?;
    let (code, _, err) = hub.cli(&[
        "policy",
        "apply",
        policy.to_str().context("utf-8")?,
        "--actor",
        "e2e",
    ])?;
    ensure!(code == 0, "policy apply: {err}");
    let _agent = Agent::start(dir.path(), &agent_config(&hub, &creds, device))?;
    // The agent runs the policy once it reported its version.
    wait_until(DEADLINE, "the agent to run policy 1", || {
        hub.fleet().is_ok_and(|f| {
            f.iter()
                .any(|a| a["agent_id"] == AGENT && a["policy_version"].as_u64() == Some(1))
        })
    })?;

    // A write, read back from the device.
    let (code, sent, err) = send(&hub, &["--agent", AGENT, "--write", "plc1/setpoint=42"])?;
    ensure!(code == 0, "send: {err}");
    let done = outcome(&hub, &id_of(&sent)?)?;
    ensure!(done["state"] == "applied", "{done}");
    ensure!(done["value"].as_u64() == Some(42), "read-back {done}");
    // An independent read of what the device holds.
    let (_, sent, _) = send(&hub, &["--agent", AGENT, "--read", "plc1/setpoint"])?;
    let read = outcome(&hub, &id_of(&sent)?)?;
    ensure!(
        read["state"] == "applied" && read["value"].as_u64() == Some(42),
        "{read}"
    );

    // Out of range at the agent: refused, nothing written.
    let (_, sent, _) = send(&hub, &["--agent", AGENT, "--write", "plc1/setpoint=150"])?;
    let r = outcome(&hub, &id_of(&sent)?)?;
    ensure!(r["state"] == "refused", "{r}");
    ensure!(
        r["reason"]
            .as_str()
            .is_some_and(|s| s.contains("above max 100")),
        "{r}"
    );
    // A tag that is not writable (the policy grants it; the agent's config
    // does not).
    let (_, sent, _) = send(&hub, &["--agent", AGENT, "--write", "plc1/locked=1"])?;
    let r = outcome(&hub, &id_of(&sent)?)?;
    ensure!(r["state"] == "refused", "{r}");
    ensure!(
        r["reason"]
            .as_str()
            .is_some_and(|s| s.contains("not writable")),
        "{r}"
    );
    // A pattern the policy does not grant: refused at the hub, exit 1.
    let (code, sent, _) = send(&hub, &["--agent", AGENT, "--write", "plc1/other=1"])?;
    ensure!(code == 1, "exit {code}");
    ensure!(
        sent.first().is_some_and(|c| c["state"] == "refused"),
        "{sent:?}"
    );
    // Nothing of the refused ones reached the device.
    let (_, sent, _) = send(&hub, &["--agent", AGENT, "--read", "plc1/setpoint"])?;
    let read = outcome(&hub, &id_of(&sent)?)?;
    ensure!(read["value"].as_u64() == Some(42), "{read}");
    let (_, sent, _) = send(&hub, &["--agent", AGENT, "--read", "plc1/locked"])?;
    let read = outcome(&hub, &id_of(&sent)?)?;
    ensure!(read["value"].as_u64() == Some(7), "{read}");

    // Every command and result is in the audit log.
    let (code, out, err) = hub.cli(&["audit", "list", "--json", "--limit", "1000"])?;
    ensure!(code == 0, "audit list: {err}");
    let requested = out.matches("command.requested").count();
    let results = out.matches("command.result").count();
    // Seven commands: five executed or refused at the agent, one refused
    // at the hub, each with its request and its result.
    ensure!(requested == 7, "{requested} command.requested in {out}");
    ensure!(results == 7, "{results} command.result in {out}");
    Ok(())
}

#[test]
fn the_api_sends_in_the_callers_role_and_the_hub_counts_what_became_of_each() -> Result<()> {
    use outpost_tests::http;
    let dir = tempfile::tempdir()?;
    let (_device, device) = pymodbus(dir.path())?;
    let pki = Pki::new(dir.path())?;
    let creds = pki.issue_agent(AGENT)?;
    let hub = Hub::start(dir.path(), &pki)?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY)?;
    let (code, _, err) = hub.cli(&["policy", "apply", policy.to_str().context("utf-8")?])?;
    ensure!(code == 0, "policy apply: {err}");
    let _agent = Agent::start(dir.path(), &agent_config(&hub, &creds, device))?;
    wait_until(DEADLINE, "the agent to run policy 1", || {
        hub.fleet().is_ok_and(|f| {
            f.iter()
                .any(|a| a["agent_id"] == AGENT && a["policy_version"].as_u64() == Some(1))
        })
    })?;
    let token = |role: &str, name: &str| -> Result<String> {
        let (code, out, err) = hub.cli(&["token", "create", "--name", name, "--role", role])?;
        ensure!(code == 0, "token create: {err}");
        Ok(out.lines().next().context("no token")?.trim().to_owned())
    };
    let (operator, author, viewer) = (
        token("operator", "ops")?,
        token("policy-author", "author")?,
        token("viewer", "watcher")?,
    );
    let api = hub.api_url()?;
    let write = serde_json::to_vec(&serde_json::json!({
        "agent": AGENT, "write": {"tag": "plc1/setpoint", "value": 33}, "ttl": "5m"
    }))?;

    // A viewer may not send: 403, and nothing is stored.
    let r = http(
        &api,
        "POST",
        "/api/v1/commands",
        Some(&viewer),
        Some(&write),
    )?;
    ensure!(r.status == 403, "{} {:?}", r.status, r.json());
    // An operator's write is applied with its read-back, as token:ops.
    let r = http(
        &api,
        "POST",
        "/api/v1/commands",
        Some(&operator),
        Some(&write),
    )?;
    ensure!(r.status == 201, "{} {:?}", r.status, r.json());
    let sent = r.json()?;
    let id = sent[0]["id"].as_str().context("id")?.to_owned();
    ensure!(
        sent[0]["actor"] == "token:ops" && sent[0]["role"] == "operator",
        "{sent}"
    );
    let mut done = Value::Null;
    wait_until(DEADLINE, "the write's outcome through the API", || {
        done = http(
            &api,
            "GET",
            &format!("/api/v1/commands/{id}"),
            Some(&viewer),
            None,
        )
        .and_then(|a| a.json())
        .unwrap_or(Value::Null);
        !matches!(done["state"].as_str(), None | Some("pending" | "delivered"))
    })?;
    ensure!(
        done["state"] == "applied" && done["value"].as_u64() == Some(33),
        "{done}"
    );
    // The policy grants policy authors no command: stored refused, with why.
    let r = http(
        &api,
        "POST",
        "/api/v1/commands",
        Some(&author),
        Some(&write),
    )?;
    ensure!(r.status == 201, "{} {:?}", r.status, r.json());
    let refused = r.json()?;
    ensure!(
        refused[0]["state"] == "refused"
            && refused[0]["reason"]
                .as_str()
                .is_some_and(|s| s.contains("policy-author")),
        "{refused}"
    );
    // Both in the list, newest first; an unknown id is a 404.
    let all = http(
        &api,
        "GET",
        &format!("/api/v1/commands?agent={AGENT}"),
        Some(&viewer),
        None,
    )?
    .json()?;
    ensure!(
        all.as_array().map(Vec::len) == Some(2) && all[1]["id"] == id.as_str(),
        "{all}"
    );
    let r = http(&api, "GET", "/api/v1/commands/00", Some(&viewer), None)?;
    ensure!(r.status == 404, "{}", r.status);
    // Neither a body with two kinds nor one without a target is accepted.
    let both = serde_json::to_vec(&serde_json::json!({
        "agent": AGENT, "write": {"tag": "plc1/setpoint", "value": 1}, "read": {"tag": "plc1/setpoint"}
    }))?;
    let r = http(
        &api,
        "POST",
        "/api/v1/commands",
        Some(&operator),
        Some(&both),
    )?;
    ensure!(r.status == 400, "{}", r.status);
    // The device holds what the one applied write wrote.
    let (_, sent, _) = send(&hub, &["--agent", AGENT, "--read", "plc1/setpoint"])?;
    let read = outcome(&hub, &id_of(&sent)?)?;
    ensure!(read["value"].as_u64() == Some(33), "{read}");
    // The CLI through the API prints what it prints from the store, and
    // sends as the token's subject.
    let token_file = dir.path().join("ops.token");
    std::fs::write(&token_file, format!("{operator}\n"))?;
    let tf = token_file.to_str().context("utf-8")?;
    let (code, direct, err) = hub.cli(&["command", "list", "--json"])?;
    ensure!(code == 0, "command list: {err}");
    let (code, remote, err) = run_hub_cli(&[
        "command",
        "list",
        "--json",
        "--api",
        &api,
        "--token-file",
        tf,
    ])?;
    ensure!(
        code == 0 && json(&remote)? == json(&direct)?,
        "{err}\n{remote}\n{direct}"
    );
    let (code, remote, err) =
        run_hub_cli(&["command", "status", &id, "--api", &api, "--token-file", tf])?;
    let (_, direct, _) = hub.cli(&["command", "status", &id])?;
    ensure!(code == 0 && remote == direct, "{err}\n{remote}\n{direct}");
    let (code, out, err) = run_hub_cli(&[
        "command",
        "send",
        "--json",
        "--agent",
        AGENT,
        "--read",
        "plc1/setpoint",
        "--api",
        &api,
        "--token-file",
        tf,
    ])?;
    ensure!(code == 0, "send --api: {err}");
    let via = json(&out)?;
    ensure!(
        via[0]["actor"] == "token:ops" && via[0]["role"] == "operator",
        "{via}"
    );
    let read = outcome(&hub, via[0]["id"].as_str().context("id")?)?;
    ensure!(read["value"].as_u64() == Some(33), "{read}");
    let (code, _, err) =
        run_hub_cli(&["command", "status", "00", "--api", &api, "--token-file", tf])?;
    ensure!(code == 2, "status of no command: {code} {err}");

    // The hub's counters say the same as the table.
    let metrics = hub.metrics()?;
    for line in [
        "outpost_hub_commands{kind=\"write\",state=\"applied\"} 1",
        "outpost_hub_commands{kind=\"write\",state=\"refused\"} 1",
        "outpost_hub_commands{kind=\"read\",state=\"applied\"} 2",
    ] {
        ensure!(
            metrics.lines().any(|l| l == line),
            "no {line} in\n{metrics}"
        );
    }
    Ok(())
}

/// A policy without the write grant: what the operators may still do once
/// the grant is taken back.
const POLICY_READ_ONLY: &str = r#"
description = "commands e2e: writes taken back"

[[commands]]
roles = ["operator", "admin"]
agents = { site = "depot-*" }
read = ["plc1/+"]
"#;

#[test]
fn a_command_whose_grant_was_taken_back_while_it_waited_is_refused_at_delivery_and_never_sent(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_device, device) = pymodbus(dir.path())?;
    let pki = Pki::new(dir.path())?;
    let creds = pki.issue_agent(AGENT)?;
    let hub = Hub::start(dir.path(), &pki)?;
    let apply = |name: &str, text: &str| -> Result<()> {
        let p = dir.path().join(name);
        std::fs::write(&p, text)?;
        let (code, _, err) = hub.cli(&["policy", "apply", p.to_str().context("utf-8")?])?;
        ensure!(code == 0, "policy apply {name}: {err}");
        Ok(())
    };
    apply("policy-1.toml", POLICY)?;
    let mut agent = Agent::start(dir.path(), &agent_config(&hub, &creds, device))?;
    let runs = |version: u64| {
        hub.fleet().is_ok_and(|f| {
            f.iter()
                .any(|a| a["agent_id"] == AGENT && a["policy_version"].as_u64() == Some(version))
        })
    };
    wait_until(DEADLINE, "the agent to run policy 1", || runs(1))?;
    // The agent goes away cleanly (its session closes at once).
    let status = agent.proc.term(DEADLINE)?;
    ensure!(status.success(), "agent exit {status}");
    wait_until(DEADLINE, "the hub to see the agent gone", || {
        hub.fleet().is_ok_and(|f| {
            f.iter()
                .any(|a| a["agent_id"] == AGENT && a["connected"] == false)
        })
    })?;
    // Authorised at the hub under version 1, then the grant is taken back
    // before the agent is back.
    let (code, sent, err) = send(&hub, &["--agent", AGENT, "--write", "plc1/setpoint=77"])?;
    ensure!(
        code == 0 && sent[0]["state"] == "pending",
        "send: {err} {sent:?}"
    );
    let id = id_of(&sent)?;
    apply("policy-2.toml", POLICY_READ_ONLY)?;
    wait_until(DEADLINE, "the hub to have policy 2 in force", || {
        hub.log()
            .lines()
            .any(|l| l.contains("New policy in force") && l.contains("version=2"))
    })?;
    let _agent = Agent::start_file(&agent.config)?;
    let r = outcome(&hub, &id)?;
    ensure!(r["state"] == "refused", "{r}");
    ensure!(
        r["reason"]
            .as_str()
            .is_some_and(|s| s.contains("the policy in force at delivery (version 2)")),
        "{r}"
    );
    ensure!(r["delivered_at"].is_null(), "never sent: {r}");
    // Nothing was written: the device holds its value.
    wait_until(DEADLINE, "the agent to run policy 2", || runs(2))?;
    let (_, sent, _) = send(&hub, &["--agent", AGENT, "--read", "plc1/setpoint"])?;
    let read = outcome(&hub, &id_of(&sent)?)?;
    ensure!(read["value"].as_u64() == Some(10), "{read}");
    Ok(())
}
