//! Commands to many agents and to the site broker, against real peers:
//!
//! - a read fanned out by label selector to 100 real agents (processes of
//!   the real binary, five of them away when it is sent), every result
//!   collected, an agent the selector does not match left alone;
//! - a publish on Mosquitto, received by a subscriber exactly once with its
//!   topic, payload and QoS.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use outpost_tests::commands::{
    apply_policy, list, outcome, send, send_one, wait_policy, Device, DEADLINE,
};
use outpost_tests::fleet_sim::{agent_id, issue_agents};
use outpost_tests::{wait_until, Agent, Hub, Mosquitto, Pki};

/// Agents the selector matches.
const AGENTS: usize = 100;

/// Of those, away when the command is sent.
const AWAY: usize = 5;

/// How long a hundred debug agents may take to come up on a loaded 2-core
/// machine.
const FLEET_DEADLINE: Duration = Duration::from_secs(300);

const POLICY: &str = r#"
description = "commands to a fleet"

[[commands]]
roles = ["operator", "admin"]
agents = { fleet = "fan*" }
read = ["plc1/+"]
publish = ["site/#"]
"#;

/// A light agent: one tag polled once a minute, logs at warn.
fn fleet_agent(id: &str, fleet: &str, hub: &Hub, creds: &Path, device: &Device) -> String {
    format!(
        r#"
[agent]
data_dir = "data"
id = "{id}"
labels = {{ fleet = "{fleet}" }}

[uplink]
hub = "{hub}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
reconnect_min = "200ms"
reconnect_max = "2s"

[[modbus.devices]]
name = "plc1"
address = "{device}"
poll = "60s"

[[modbus.devices.tags]]
name = "setpoint"
table = "holding"
address = 0
type = "u16"

[observability]
metrics = ""
log = "warn"
"#,
        hub = hub.addr,
        device = device.addr,
        ca = creds.join("ca.pem").display(),
        cert = creds.join("agent.pem").display(),
        key = creds.join("agent.key").display(),
    )
}

#[test]
fn a_read_fanned_out_to_a_hundred_agents_by_selector_collects_every_result() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let device = Device::start(
        &dir.path().join("device"),
        r#"[{"table": "holding", "address": 0, "type": "u16", "value": 321}]"#,
    )?;
    let pki = Pki::new(dir.path())?;
    // A hundred agents dial from 127.0.0.1 alone; a real fleet from as
    // many addresses, which the per-address limit is for.
    let hub = Hub::start_with(dir.path(), &pki, "per_address_burst = 0")?;
    apply_policy(&hub, dir.path(), POLICY)?;
    // Agents 0..AGENTS are in the fleet, agent AGENTS is not.
    let creds = issue_agents(&pki.ca_dir, &dir.path().join("creds"), AGENTS + 1)?;
    let mut agents = Vec::with_capacity(AGENTS + 1);
    for (i, c) in creds.iter().enumerate() {
        let id = agent_id(i);
        let home = dir.path().join(&id);
        std::fs::create_dir_all(&home)?;
        let fleet = if i < AGENTS { "fanout" } else { "other" };
        agents.push(Agent::start(
            &home,
            &fleet_agent(&id, fleet, &hub, c, &device),
        )?);
    }
    let ids: Vec<String> = (0..=AGENTS).map(agent_id).collect();
    wait_until(FLEET_DEADLINE, "every agent to run policy 1", || {
        hub.fleet().is_ok_and(|f| {
            f.iter()
                .filter(|a| {
                    a["policy_version"].as_u64() == Some(1)
                        && a["agent_id"]
                            .as_str()
                            .is_some_and(|id| ids.iter().any(|i| i == id))
                })
                .count()
                == AGENTS + 1
        })
    })?;
    // Some go away; the registry still selects them.
    for a in agents.iter_mut().take(AWAY) {
        a.proc.kill9();
    }

    let (code, sent, err) = send(
        &hub,
        &["--select", "fleet=fanout", "--read", "plc1/setpoint"],
    )?;
    ensure!(code == 0, "send: {err}");
    let by_agent: BTreeMap<String, String> = sent
        .iter()
        .map(|c| {
            Ok((
                c["agent_id"].as_str().context("agent_id")?.to_owned(),
                c["id"].as_str().context("id")?.to_owned(),
            ))
        })
        .collect::<Result<_>>()?;
    let expected: BTreeSet<String> = (0..AGENTS).map(agent_id).collect();
    ensure!(
        by_agent.keys().cloned().collect::<BTreeSet<_>>() == expected,
        "the selector chose {:?}",
        by_agent.keys()
    );
    let distinct: BTreeSet<String> = by_agent.values().cloned().collect();
    ensure!(distinct.len() == AGENTS, "ids are not distinct");

    let applied = |hub: &Hub| -> Result<BTreeMap<String, serde_json::Value>> {
        Ok(list(hub, 10 * AGENTS)?
            .into_iter()
            .filter(|c| c["id"].as_str().is_some_and(|id| distinct.contains(id)))
            .filter(|c| c["state"] != "pending" && c["state"] != "delivered")
            .filter_map(|c| Some((c["agent_id"].as_str()?.to_owned(), c)))
            .collect())
    };
    let mut done = BTreeMap::new();
    wait_until(FLEET_DEADLINE, "the agents that are up to answer", || {
        done = applied(&hub).unwrap_or_default();
        done.len() >= AGENTS - AWAY
    })?;
    ensure!(
        done.len() == AGENTS - AWAY,
        "{} answered with {AWAY} away",
        done.len()
    );
    // The ones that were away get theirs when they come back.
    for (i, a) in agents.iter_mut().enumerate().take(AWAY) {
        *a = Agent::start_file(&dir.path().join(agent_id(i)).join("agent.toml"))?;
    }
    wait_until(FLEET_DEADLINE, "every agent to answer", || {
        done = applied(&hub).unwrap_or_default();
        done.len() >= AGENTS
    })?;
    for (agent, c) in &done {
        ensure!(
            c["state"] == "applied" && c["value"].as_u64() == Some(321),
            "{agent}: {c}"
        );
    }
    // The agent outside the selector got nothing.
    let other = agent_id(AGENTS);
    ensure!(
        !list(&hub, 10 * AGENTS)?
            .iter()
            .any(|c| c["agent_id"] == other.as_str()),
        "{other} got a command"
    );
    // A read writes nothing.
    ensure!(device.writes()?.is_empty(), "{:?}", device.writes()?);
    Ok(())
}

/// What a subscriber on the site broker received: topic, payload, QoS,
/// retain.
type Received = Arc<Mutex<Vec<(String, Vec<u8>, u8, bool)>>>;

/// Subscribes to everything at QoS 2 (so a message arrives at the QoS it was
/// published with) and records what comes; returns once subscribed.
fn subscriber(port: u16) -> Result<(Received, rumqttc::Client)> {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let (client, mut conn) = Client::new(MqttOptions::new("e2e-watcher", "127.0.0.1", port), 100);
    client.subscribe("#", QoS::ExactlyOnce)?;
    let seen: Received = Arc::default();
    let out = seen.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Ok(mut v) = out.lock() {
                        v.push((p.topic.clone(), p.payload.to_vec(), p.qos as u8, p.retain));
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    ready_rx
        .recv_timeout(DEADLINE)
        .context("the subscriber was not subscribed")?;
    Ok((seen, client))
}

#[test]
fn a_publish_reaches_a_subscriber_on_the_site_broker_once_with_its_topic_payload_and_qos(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Mosquitto::start(dir.path())?;
    let (seen, _watcher) = subscriber(broker.port)?;
    let pki = Pki::new(dir.path())?;
    let creds = pki.issue_agent("gw-pub")?;
    let hub = Hub::start(dir.path(), &pki)?;
    apply_policy(&hub, dir.path(), POLICY)?;
    let _agent = Agent::start(
        dir.path(),
        &format!(
            r#"
[agent]
data_dir = "data"
id = "gw-pub"
labels = {{ fleet = "fanout" }}

[uplink]
hub = "{hub}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
reconnect_min = "100ms"
reconnect_max = "1s"

[mqtt]
broker = "127.0.0.1:{port}"
client_id = "gw-pub"

[observability]
metrics = ""
log = "info"
"#,
            hub = hub.addr,
            port = broker.port,
            ca = creds.join("ca.pem").display(),
            cert = creds.join("agent.pem").display(),
            key = creds.join("agent.key").display(),
        ),
    )?;
    wait_policy(&hub, &["gw-pub"], 1)?;

    let payload = r#"{"door": "open", "by": "e2e"}"#;
    let id = send_one(
        &hub,
        &[
            "--agent",
            "gw-pub",
            "--publish",
            "site/door/cmd",
            "--payload",
            payload,
            "--qos",
            "1",
        ],
    )?;
    let done = outcome(&hub, &id)?;
    ensure!(done["state"] == "applied", "{done}");
    // A topic the policy does not grant: refused at the hub, never sent.
    let (code, sent, _) = send(
        &hub,
        &[
            "--agent",
            "gw-pub",
            "--publish",
            "plant/other",
            "--payload",
            "no",
        ],
    )?;
    ensure!(
        code == 1 && sent.first().is_some_and(|c| c["state"] == "refused"),
        "exit {code}: {sent:?}"
    );
    // A last publish at QoS 2 marks the end of what could arrive.
    let marker = send_one(
        &hub,
        &[
            "--agent",
            "gw-pub",
            "--publish",
            "site/marker",
            "--payload",
            "end",
            "--qos",
            "2",
        ],
    )?;
    ensure!(outcome(&hub, &marker)?["state"] == "applied", "marker");
    wait_until(DEADLINE, "the marker at the subscriber", || {
        seen.lock()
            .is_ok_and(|v| v.iter().any(|(t, ..)| t == "site/marker"))
    })?;
    let got = seen.lock().map(|v| v.clone()).unwrap_or_default();
    let ours: Vec<_> = got.iter().filter(|(t, ..)| t == "site/door/cmd").collect();
    ensure!(ours.len() == 1, "received {ours:?}");
    let (_, body, qos, retain) = ours[0];
    ensure!(body.as_slice() == payload.as_bytes(), "payload {body:?}");
    ensure!(*qos == 1 && !retain, "qos {qos}, retain {retain}");
    ensure!(
        got.iter()
            .any(|(t, b, q, _)| t == "site/marker" && b == b"end" && *q == 2),
        "{got:?}"
    );
    ensure!(
        !got.iter().any(|(t, ..)| t == "plant/other"),
        "the refused publish arrived: {got:?}"
    );
    Ok(())
}
