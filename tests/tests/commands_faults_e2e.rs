//! At most once, under faults, against real peers: the real hub and agent
//! binaries, pymodbus as the device counting every write request it receives
//! (`tests/src/commands.rs`), the break-glass CLI as the operator.
//!
//! - The agent stops (abort, as kill -9 stops it) after executing a command
//!   and recording its outcome, before reporting it: the test-only fault
//!   `OUTPOST_TEST_ABORT_AFTER_COMMAND` of debug builds hits that window
//!   exactly ([commands.md](../../docs/commands.md#testing-at-most-once)).
//! - The hub is killed -9 with commands delivered and unanswered, and one
//!   pending for an agent that is away.
//! - The link breaks after delivery (a UDP proxy that carries the hub's
//!   datagrams and loses the agent's, then neither, until both ends give the
//!   connection up), so the hub delivers the same command again.
//! - A command expires while its agent is away: at the hub (never sent) or
//!   at the agent (delivered into a session of an agent that had died).
//!
//! Each checks the device's count of writes and the hub's outcomes.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{ensure, Context as _, Result};
use outpost_tests::commands::{
    apply_policy, audited_results, ledger_has_outcome, log_count, outcome, send_one, state, status,
    wait_policy, Device, DEADLINE,
};
use outpost_tests::udp_proxy::{Faults, UdpProxy};
use outpost_tests::{wait_until, Agent, Hub, Pki};

/// Operators and the break-glass admin may write two tags and read any.
const POLICY: &str = r#"
description = "commands under faults"

[[commands]]
roles = ["operator", "admin"]
agents = { site = "depot-*" }
write = ["plc1/setpoint", "plc1/limit"]
read = ["plc1/+"]
"#;

/// Six holding registers: two for each of up to three agents.
const POINTS: &str = r#"[
    {"table": "holding", "address": 0, "type": "u16", "value": 10},
    {"table": "holding", "address": 1, "type": "u16", "value": 11},
    {"table": "holding", "address": 2, "type": "u16", "value": 12},
    {"table": "holding", "address": 3, "type": "u16", "value": 13}
]"#;

/// The config of agent `id` (data in `data` beside it) reaching the hub at
/// `hub`, with `plc1/setpoint` at holding register `base` and `plc1/limit`
/// at `base + 1`, both writable.
fn agent_config(id: &str, hub: SocketAddr, creds: &Path, device: SocketAddr, base: u16) -> String {
    format!(
        r#"
[agent]
data_dir = "data"
id = "{id}"
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
address = {base}
type = "u16"
writable = true
max = 1000

[[modbus.devices.tags]]
name = "limit"
table = "holding"
address = {limit}
type = "u16"
writable = true
max = 1000

[observability]
metrics = ""
log = "info"
"#,
        limit = base + 1,
        ca = creds.join("ca.pem").display(),
        cert = creds.join("agent.pem").display(),
        key = creds.join("agent.key").display(),
    )
}

/// An agent's own directory under `root`.
fn home(root: &Path, id: &str) -> Result<std::path::PathBuf> {
    let d = root.join(id);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// The line the agent logs when a command is delivered again and answered
/// from its ledger.
const REPLAYED: &str = "answered from the ledger, not executed again";

#[test]
fn an_agent_stopped_after_executing_and_before_reporting_wrote_once_and_reports_after_restart(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let device = Device::start(&dir.path().join("device"), POINTS)?;
    let pki = Pki::new(dir.path())?;
    let creds = pki.issue_agent("gw-abort")?;
    let hub = Hub::start(dir.path(), &pki)?;
    apply_policy(&hub, dir.path(), POLICY)?;
    let site = home(dir.path(), "gw-abort")?;
    let config = site.join("agent.toml");
    std::fs::write(
        &config,
        agent_config("gw-abort", hub.addr, &creds, device.addr, 0),
    )?;
    let mut agent = Agent::start_file_with_env(
        &config,
        &[(outpost_agent::commands::ABORT_AFTER_RECORD, "1")],
    )?;
    wait_policy(&hub, &["gw-abort"], 1)?;

    let id = send_one(
        &hub,
        &["--agent", "gw-abort", "--write", "plc1/setpoint=42"],
    )?;
    let log = site.join("agent.log");
    wait_until(DEADLINE, "the agent to stop after recording the outcome", || {
        !agent.proc.is_running()
    })
    .context("the agent kept running: is it a release build? The fault is compiled into debug builds only")?;
    ensure!(
        log_count(&log, "Test fault: aborting after recording") == 1,
        "the agent stopped, but not at the fault:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Written once, recorded, never reported.
    ensure!(device.holding_writes(0)? == 1, "{:?}", device.writes()?);
    ensure!(
        ledger_has_outcome(&site.join("data"), &id),
        "no outcome in the ledger"
    );
    let s = state(&hub, &id)?;
    ensure!(
        s == "delivered",
        "the hub has {s} before the agent restarted"
    );

    // The agent comes back without the fault: the hub delivers the command
    // again, the ledger answers it.
    let _agent = Agent::start_file(&config)?;
    let done = outcome(&hub, &id)?;
    ensure!(done["state"] == "applied", "{done}");
    ensure!(done["value"].as_u64() == Some(42), "read-back {done}");
    ensure!(device.holding_writes(0)? == 1, "{:?}", device.writes()?);
    ensure!(
        log_count(&log, REPLAYED) == 1,
        "not answered from the ledger once"
    );
    ensure!(audited_results(&hub, &id)? == 1, "one command.result");

    // And it executes the next command as ever.
    let next = send_one(
        &hub,
        &["--agent", "gw-abort", "--write", "plc1/setpoint=43"],
    )?;
    let done = outcome(&hub, &next)?;
    ensure!(
        done["state"] == "applied" && done["value"].as_u64() == Some(43),
        "{done}"
    );
    ensure!(device.holding_writes(0)? == 2, "{:?}", device.writes()?);
    Ok(())
}

#[test]
fn the_hub_killed_with_commands_in_flight_gets_one_result_each_and_each_is_written_once(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let device = Device::start(&dir.path().join("device"), POINTS)?;
    let pki = Pki::new(dir.path())?;
    let mut hub = Hub::start(dir.path(), &pki)?;
    apply_policy(&hub, dir.path(), POLICY)?;

    // gw-away registers and stops (cleanly, so that the hub knows it is
    // away: a session the hub still holds would take the command): its
    // command waits, pending.
    let away_home = home(dir.path(), "gw-away")?;
    let away_config = away_home.join("agent.toml");
    std::fs::write(
        &away_config,
        agent_config(
            "gw-away",
            hub.addr,
            &pki.issue_agent("gw-away")?,
            device.addr,
            2,
        ),
    )?;
    let mut away = Agent::start_file(&away_config)?;
    wait_policy(&hub, &["gw-away"], 1)?;
    away.proc.term(DEADLINE)?;
    wait_until(DEADLINE, "the hub to see gw-away gone", || {
        hub.fleet().is_ok_and(|f| {
            f.iter()
                .any(|a| a["agent_id"] == "gw-away" && a["connected"] == false)
        })
    })?;

    // gw-near is connected through a link that carries the hub's datagrams
    // and loses its own: its commands are delivered and executed, their
    // results never arrive.
    let proxy = UdpProxy::start(hub.addr)?;
    let near_home = home(dir.path(), "gw-near")?;
    let near_config = near_home.join("agent.toml");
    std::fs::write(
        &near_config,
        agent_config(
            "gw-near",
            proxy.addr(),
            &pki.issue_agent("gw-near")?,
            device.addr,
            0,
        ),
    )?;
    let _near = Agent::start_file(&near_config)?;
    wait_policy(&hub, &["gw-near"], 1)?;
    proxy.set_each(Faults::BLACK_HOLE, Faults::PASS);
    let a = send_one(&hub, &["--agent", "gw-near", "--write", "plc1/setpoint=41"])?;
    let b = send_one(&hub, &["--agent", "gw-near", "--write", "plc1/limit=5"])?;
    let c = send_one(&hub, &["--agent", "gw-away", "--write", "plc1/setpoint=43"])?;
    let near_data = near_home.join("data");
    wait_until(DEADLINE, "gw-near to execute and record both", || {
        ledger_has_outcome(&near_data, &a) && ledger_has_outcome(&near_data, &b)
    })?;
    for (id, want) in [(&a, "delivered"), (&b, "delivered"), (&c, "pending")] {
        let s = state(&hub, id)?;
        ensure!(s == want, "command {id}: {s}, not {want}, before the kill");
    }
    ensure!(
        device.holding_writes(0)? == 1 && device.holding_writes(1)? == 1,
        "{:?}",
        device.writes()?
    );

    hub.proc.kill9();
    hub = Hub::start_file(&hub.config, hub.addr)?;
    proxy.set(Faults::PASS);
    let _away = Agent::start_file(&away_config)?;

    for (id, value) in [(&a, 41), (&b, 5), (&c, 43)] {
        let done = outcome(&hub, id)?;
        ensure!(
            done["state"] == "applied" && done["value"].as_u64() == Some(value),
            "{done}"
        );
        ensure!(
            audited_results(&hub, id)? == 1,
            "command {id}: not one command.result"
        );
    }
    let writes = device.writes()?;
    for register in 0..3 {
        ensure!(
            device.holding_writes(register)? == 1,
            "register {register}: {writes:?}"
        );
    }
    ensure!(
        log_count(&near_home.join("agent.log"), REPLAYED) == 2,
        "gw-near did not answer both from its ledger"
    );
    Ok(())
}

#[test]
fn a_command_delivered_again_after_the_link_broke_is_answered_from_the_ledger() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let device = Device::start(&dir.path().join("device"), POINTS)?;
    let pki = Pki::new(dir.path())?;
    let hub = Hub::start(dir.path(), &pki)?;
    apply_policy(&hub, dir.path(), POLICY)?;
    let proxy = UdpProxy::start(hub.addr)?;
    let site = home(dir.path(), "gw-link")?;
    let config = site.join("agent.toml");
    std::fs::write(
        &config,
        agent_config(
            "gw-link",
            proxy.addr(),
            &pki.issue_agent("gw-link")?,
            device.addr,
            0,
        ),
    )?;
    let _agent = Agent::start_file(&config)?;
    wait_policy(&hub, &["gw-link"], 1)?;
    let log = site.join("agent.log");

    // The command goes out, the result does not come back.
    proxy.set_each(Faults::BLACK_HOLE, Faults::PASS);
    let id = send_one(&hub, &["--agent", "gw-link", "--write", "plc1/setpoint=77"])?;
    wait_until(DEADLINE, "the agent to execute and record it", || {
        ledger_has_outcome(&site.join("data"), &id)
    })?;
    ensure!(state(&hub, &id)? == "delivered", "not delivered");
    // Then nothing either way until the agent gives the connection up (its
    // idle timeout: a minute), so that its result cannot come on it.
    let lost = log_count(&log, "Uplink lost");
    proxy.set(Faults::BLACK_HOLE);
    wait_until(
        std::time::Duration::from_secs(180),
        "the agent to give the connection up",
        || log_count(&log, "Uplink lost") > lost,
    )?;
    ensure!(state(&hub, &id)? == "delivered", "answered on a dead link");
    proxy.set(Faults::PASS);

    // The next connection delivers the command a second time.
    let done = outcome(&hub, &id)?;
    ensure!(
        done["state"] == "applied" && done["value"].as_u64() == Some(77),
        "{done}"
    );
    ensure!(device.holding_writes(0)? == 1, "{:?}", device.writes()?);
    ensure!(
        log_count(&log, REPLAYED) == 1,
        "the second delivery was not answered from the ledger"
    );
    ensure!(audited_results(&hub, &id)? == 1, "not one command.result");
    Ok(())
}

/// A command with a 2 s ttl for an agent that is away, which comes back
/// after the expiry. Stopped cleanly, the agent is known away: the command
/// stays pending and expires at the hub. Killed -9, its session lingers at
/// the hub (until the session's idle timeout), which delivers the command
/// into it: the agent gets it at its next connection, past its expiry, and
/// records it expired itself. Either way the device is not written; the
/// second way is the agent's own check of `expires_at`.
fn expires_while_away(clean_stop: bool) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let device = Device::start(&dir.path().join("device"), POINTS)?;
    let pki = Pki::new(dir.path())?;
    let hub = Hub::start(dir.path(), &pki)?;
    apply_policy(&hub, dir.path(), POLICY)?;
    let site = home(dir.path(), "gw-late")?;
    let config = site.join("agent.toml");
    std::fs::write(
        &config,
        agent_config(
            "gw-late",
            hub.addr,
            &pki.issue_agent("gw-late")?,
            device.addr,
            0,
        ),
    )?;
    // The agent registers once, then goes away.
    let mut agent = Agent::start_file(&config)?;
    wait_policy(&hub, &["gw-late"], 1)?;
    if clean_stop {
        agent.proc.term(DEADLINE)?;
        wait_until(DEADLINE, "the hub to see the agent gone", || {
            hub.fleet().is_ok_and(|f| {
                f.iter()
                    .any(|a| a["agent_id"] == "gw-late" && a["connected"] == false)
            })
        })?;
    } else {
        agent.proc.kill9();
    }
    let id = send_one(
        &hub,
        &[
            "--agent",
            "gw-late",
            "--write",
            "plc1/setpoint=55",
            "--ttl",
            "2s",
        ],
    )?;
    let sent = status(&hub, &id)?;
    let expires_at = sent["expires_at"].as_i64().context("expires_at")?;
    if !clean_stop {
        wait_until(DEADLINE, "the hub to deliver into the dead session", || {
            state(&hub, &id).is_ok_and(|s| s == "delivered")
        })?;
    }
    wait_until(DEADLINE, "the command's expiry to pass", || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .is_ok_and(|d| d.as_nanos() as i64 > expires_at)
    })?;
    let _agent = Agent::start_file(&config)?;
    let r = outcome(&hub, &id)?;
    ensure!(r["state"] == "expired", "{r}");
    ensure!(
        r["delivered_at"].is_null() == clean_stop,
        "delivered_at {}",
        r["delivered_at"]
    );
    let expired_here = log_count(&site.join("agent.log"), "outcome=\"expired\"")
        + log_count(&site.join("agent.log"), "outcome=expired");
    ensure!(
        (expired_here == 1) != clean_stop,
        "the agent logged {expired_here} expiries"
    );
    // A command sent after it is executed: the agent is up and took its
    // commands, and the expired one never reached the device.
    let next = send_one(&hub, &["--agent", "gw-late", "--write", "plc1/limit=9"])?;
    let done = outcome(&hub, &next)?;
    ensure!(done["state"] == "applied", "{done}");
    let writes = device.writes()?;
    ensure!(
        device.holding_writes(0)? == 0 && device.holding_writes(1)? == 1,
        "{writes:?}"
    );
    ensure!(audited_results(&hub, &id)? == 1, "not one command.result");
    Ok(())
}

#[test]
fn a_command_for_an_agent_known_away_expires_at_the_hub_and_is_never_sent() -> Result<()> {
    expires_while_away(true)
}

#[test]
fn a_command_delivered_to_an_agent_that_died_expires_at_the_agent_and_is_never_executed(
) -> Result<()> {
    expires_while_away(false)
}
