//! The agent against a real Mosquitto: acknowledgement after commit, QoS 2
//! exactly-once across kill -9, bridges both ways, payload classification.

use std::collections::BTreeMap;
use std::path::Path;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use outpost_protocols::{Quality, Value};
use outpost_tests::{outbox_events, wait_until, Agent, Devsim, Mosquitto};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

fn agent_config(broker: u16, client_id: &str, extra: &str) -> String {
    format!(
        r#"
[agent]
data_dir = "data"
id = "e2e"

[outbox]
commit_window = "1ms"

[mqtt]
broker = "127.0.0.1:{broker}"
client_id = "{client_id}"
reconnect_min = "50ms"
reconnect_max = "500ms"
keep_alive = "5s"

[[mqtt.subscribe]]
filter = "q1/#"
qos = 1

[[mqtt.subscribe]]
filter = "q2/#"
qos = 2

[[mqtt.subscribe]]
filter = "raw/#"
qos = 1

[observability]
metrics = ""
log = "info"
{extra}
"#
    )
}

fn log_contains(dir: &Path, needle: &str) -> bool {
    std::fs::read_to_string(dir.join("agent.log"))
        .map(|s| s.matches(needle).count() > 0)
        .unwrap_or(false)
}

fn log_count(dir: &Path, needle: &str) -> usize {
    std::fs::read_to_string(dir.join("agent.log"))
        .map(|s| s.matches(needle).count())
        .unwrap_or(0)
}

/// Publishes `n` messages `"<i>"` to `topic` at `qos` and waits until the
/// broker acknowledged every one (PUBACK or PUBCOMP).
fn publish_all(port: u16, topic: &str, qos: QoS, n: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut o = MqttOptions::new(format!("pub-{topic}"), "127.0.0.1", port);
        o.set_inflight(20);
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut el) = AsyncClient::new(o, 100);
        let topic = topic.to_owned();
        let sender = tokio::spawn(async move {
            for i in 0..n {
                client.publish(&topic, qos, false, i.to_string()).await?;
            }
            anyhow::Ok(client)
        });
        let mut acked = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while acked < n {
            let ev = tokio::time::timeout_at(deadline, el.poll())
                .await
                .context("publisher timed out")?
                .context("publisher connection")?;
            match ev {
                Event::Incoming(Packet::PubAck(_)) | Event::Incoming(Packet::PubComp(_)) => {
                    acked += 1
                }
                _ => {}
            }
        }
        let _client = sender.await??;
        Ok(())
    })
}

fn counts(dir: &Path, prefix: &str) -> Result<BTreeMap<u64, usize>> {
    let mut m = BTreeMap::new();
    for e in outbox_events(&dir.join("data"))? {
        if !e.body.stream.as_str().starts_with(prefix) {
            continue;
        }
        let n = match &e.body.value {
            Value::Json(j) => j.as_str().parse::<u64>().ok(),
            Value::String(s) => s.parse::<u64>().ok(),
            _ => None,
        };
        if let Some(n) = n {
            *m.entry(n).or_insert(0) += 1;
        }
    }
    Ok(m)
}

#[test]
fn qos1_and_qos2_messages_survive_repeated_kill9() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Mosquitto::start(dir.path())?;
    let cfg = agent_config(broker.port, "kill9-agent", "");
    let mut agent = Agent::start(dir.path(), &cfg)?;
    // The persistent session must exist before publishing, or the broker has
    // nobody to queue for.
    wait_until(Duration::from_secs(30), "agent connected", || {
        log_contains(dir.path(), "Connected to the site broker")
    })?;

    const N: usize = 3000;
    let port = broker.port;
    let p1 = thread::spawn(move || publish_all(port, "q1/a", QoS::AtLeastOnce, N));
    let p2 = thread::spawn(move || publish_all(port, "q2/a", QoS::ExactlyOnce, N));

    let mut kills = 0;
    while kills < 4 {
        thread::sleep(Duration::from_millis(250 + 150 * kills as u64));
        agent.proc.kill9();
        kills += 1;
        agent = Agent::start_file(&agent.config)?;
    }
    p1.join()
        .map_err(|_| anyhow::anyhow!("publisher panicked"))??;
    p2.join()
        .map_err(|_| anyhow::anyhow!("publisher panicked"))??;

    wait_until(
        Duration::from_secs(120),
        "every message in the outbox",
        || {
            let (Ok(c1), Ok(c2)) = (counts(dir.path(), "q1/"), counts(dir.path(), "q2/")) else {
                return false;
            };
            c1.len() == N && c2.len() == N
        },
    )?;
    // Let redeliveries in flight land before judging duplicates.
    let status = agent.proc.term(Duration::from_secs(30))?;
    assert!(status.success(), "agent exit status {status}");

    let c1 = counts(dir.path(), "q1/")?;
    let c2 = counts(dir.path(), "q2/")?;
    let missing1: Vec<_> = (0..N as u64).filter(|i| !c1.contains_key(i)).collect();
    let missing2: Vec<_> = (0..N as u64).filter(|i| !c2.contains_key(i)).collect();
    assert!(missing1.is_empty(), "QoS 1 lost {missing1:?}");
    assert!(missing2.is_empty(), "QoS 2 lost {missing2:?}");
    let dup2: Vec<_> = c2.iter().filter(|(_, &n)| n > 1).collect();
    assert!(dup2.is_empty(), "QoS 2 stored more than once: {dup2:?}");
    let dup1: usize = c1.values().map(|n| n - 1).sum();
    println!("kill -9 x{kills}: QoS 1 {N} messages, {dup1} duplicates (at-least-once); QoS 2 {N} messages, 0 duplicates");
    assert!(
        log_count(dir.path(), "Agent running.") >= 5,
        "the agent was not restarted as often as it was killed"
    );
    Ok(())
}

#[test]
fn sigterm_stops_cleanly_after_committing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Mosquitto::start(dir.path())?;
    let mut agent = Agent::start(dir.path(), &agent_config(broker.port, "term-agent", ""))?;
    wait_until(Duration::from_secs(30), "agent connected", || {
        log_contains(dir.path(), "Connected to the site broker")
    })?;
    publish_all(broker.port, "q2/b", QoS::ExactlyOnce, 200)?;
    // The broker has acknowledged all 200 to the publisher, but some may still
    // be on their way to the agent when SIGTERM lands: the broker keeps those
    // for the agent's persistent session. What SIGTERM must guarantee is a
    // clean exit with nothing received lost or stored twice, which a restart
    // proves.
    let status = agent.proc.term(Duration::from_secs(30))?;
    assert!(status.success(), "exit status {status}");
    assert!(log_contains(dir.path(), "Outbox closed."));
    let before = counts(dir.path(), "q2/b")?;
    assert!(before.values().all(|&n| n == 1), "stored twice: {before:?}");
    let mut agent = Agent::start_file(&agent.config)?;
    wait_until(Duration::from_secs(30), "agent reconnected", || {
        log_count(dir.path(), "Connected to the site broker") >= 2
    })?;
    wait_until(Duration::from_secs(60), "all 200 in the outbox", || {
        counts(dir.path(), "q2/b").is_ok_and(|c| c.len() == 200)
    })?;
    let status = agent.proc.term(Duration::from_secs(30))?;
    assert!(status.success(), "exit status {status}");
    let c = counts(dir.path(), "q2/b")?;
    assert_eq!(c.len(), 200);
    assert!(c.values().all(|&n| n == 1), "stored twice: {c:?}");
    Ok(())
}

#[test]
fn payloads_are_classified_and_oversize_ones_recorded() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Mosquitto::start(dir.path())?;
    let cfg = agent_config(broker.port, "payload-agent", "").replace(
        "keep_alive = \"5s\"",
        "keep_alive = \"5s\"\nmax_payload = \"1KiB\"",
    );
    let mut agent = Agent::start(dir.path(), &cfg)?;
    wait_until(Duration::from_secs(30), "agent connected", || {
        log_contains(dir.path(), "Connected to the site broker")
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (client, mut el) = AsyncClient::new(
            MqttOptions::new("payload-pub", "127.0.0.1", broker.port),
            10,
        );
        client
            .publish("raw/json", QoS::AtLeastOnce, false, r#"{"t":21.5}"#)
            .await?;
        client
            .publish("raw/text", QoS::AtLeastOnce, false, "hello")
            .await?;
        client
            .publish("raw/bytes", QoS::AtLeastOnce, false, vec![0xff, 0xfe, 0x00])
            .await?;
        client
            .publish("raw/big", QoS::AtLeastOnce, false, vec![b'x'; 4096])
            .await?;
        let mut acked = 0;
        while acked < 4 {
            if let Event::Incoming(Packet::PubAck(_)) = el.poll().await? {
                acked += 1;
            }
        }
        anyhow::Ok(())
    })?;
    let find = |stream: &str| -> Option<outpost_protocols::Event> {
        outbox_events(&dir.path().join("data"))
            .ok()?
            .into_iter()
            .find(|e| e.body.stream.as_str() == stream)
    };
    wait_until(Duration::from_secs(30), "four messages stored", || {
        find("raw/big").is_some() && find("raw/bytes").is_some()
    })?;
    match find("raw/json").context("json")?.body.value {
        Value::Json(j) => assert_eq!(j.as_str(), r#"{"t":21.5}"#),
        other => bail!("json stored as {other:?}"),
    }
    assert_eq!(
        find("raw/text").context("text")?.body.value,
        Value::String("hello".into())
    );
    assert_eq!(
        find("raw/bytes").context("bytes")?.body.value,
        Value::Bytes(vec![0xff, 0xfe, 0x00])
    );
    let big = find("raw/big").context("big")?;
    assert!(
        matches!(big.body.quality, Quality::Bad(_)),
        "{:?}",
        big.body.quality
    );
    agent.proc.term(Duration::from_secs(30))?;
    Ok(())
}

#[test]
fn a_modbus_tag_is_published_and_an_mqtt_command_writes_its_register() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Mosquitto::start(dir.path())?;
    let sim = Devsim::start(
        dir.path(),
        "[[points]]\ntable = \"holding\"\naddress = 110\ntype = \"u16\"\nvalue = 42\n",
        None,
    )?;
    let extra = format!(
        r#"
[[modbus.devices]]
name = "plc1"
address = "{}"
poll = "100ms"
[[modbus.devices.tags]]
name = "setpoint"
table = "holding"
address = 110
type = "u16"
writable = true

[[bridges]]
from = "modbus:plc1/setpoint"
to = "mqtt:site/{{device}}/{{tag}}"
format = "raw"
qos = 1

[[bridges]]
from = "mqtt:cmd/plc1/setpoint"
to = "modbus:plc1/setpoint"
allow_unauthenticated_writes = true
"#,
        sim.addr
    );
    let mut agent = Agent::start(
        dir.path(),
        &agent_config(broker.port, "bridge-agent", &extra),
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let seen = rt.block_on(async {
        let (client, mut el) = AsyncClient::new(
            MqttOptions::new("bridge-watch", "127.0.0.1", broker.port),
            10,
        );
        client
            .subscribe("site/plc1/setpoint", QoS::AtLeastOnce)
            .await?;
        let mut seen = Vec::new();
        let mut commanded = false;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !seen.contains(&"77".to_string()) {
            let ev = tokio::time::timeout_at(deadline, el.poll())
                .await
                .context("no bridged value")??;
            if let Event::Incoming(Packet::Publish(p)) = ev {
                let text = String::from_utf8_lossy(&p.payload).into_owned();
                if text == "42" && !commanded {
                    client
                        .publish("cmd/plc1/setpoint", QoS::AtLeastOnce, false, "77")
                        .await?;
                    commanded = true;
                }
                seen.push(text);
            }
        }
        anyhow::Ok(seen)
    })?;
    assert_eq!(seen.first().map(String::as_str), Some("42"), "{seen:?}");
    // The waiver is repeated at start, naming the bridge.
    assert!(log_contains(
        dir.path(),
        "bridges[1].allow_unauthenticated_writes"
    ));
    // The write is recorded in the outbox, for the hub, on the reserved
    // stream: what, where, from which topic, and that it was applied.
    let mut record = None;
    wait_until(
        Duration::from_secs(60),
        "the bridge write's record in the outbox",
        || {
            record = outbox_events(&dir.path().join("data"))
                .unwrap_or_default()
                .into_iter()
                .find(|e| e.body.stream.as_str() == "$outpost/bridge/writes");
            record.is_some()
        },
    )?;
    let record = record.context("record")?;
    let Value::Json(doc) = &record.body.value else {
        bail!("record is not JSON: {record:?}");
    };
    assert_eq!(
        doc.to_value(),
        serde_json::json!({"topic": "cmd/plc1/setpoint", "device": "plc1", "tag": "setpoint", "value": 77, "outcome": "applied"})
    );
    agent.proc.term(Duration::from_secs(30))?;
    Ok(())
}
