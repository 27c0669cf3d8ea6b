//! The hub's sinks end to end: a real agent drains a backlog to a real hub,
//! whose policy routes streams to the store and to two MQTT sinks in
//! different regions (real Mosquitto brokers, the sinks' far ends). Each sink
//! gets exactly the events its routes select, once each, minimised; a
//! personal stream never reaches the sink outside its residency, not even
//! when a route said so before the policy changed (the last-step check);
//! and a sink that is down holds back the agent's acknowledgements, so the
//! backlog waits in the agent's outbox and the hub's store, until it returns
//! and gets everything once. A NATS JetStream sink does too, after an outage
//! longer than its stream's duplicate window and a SIGKILL mid-delivery.
//!
//! Every wait polls a condition until a deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context as _, Result};
use outpost_protocols::{EventBody, Quality, StreamName, Timestamp, Value};
use outpost_tests::{agent_outbox_stats, wait_until, Agent, Hub, Mosquitto, Pki};

const AGENT: &str = "gw-1";
const DEADLINE: Duration = Duration::from_secs(120);

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Event `i`: streams in turn `plant/line1/temp`, `hr/badge`, `plant/line1/debug`
/// (denied) with a JSON payload naming `i`.
fn body(i: usize, ts: i64) -> Result<EventBody> {
    let stream = ["plant/line1/temp", "hr/badge", "plant/line1/debug"][i % 3];
    let payload = format!("{{\"n\":{i},\"value\":21.5,\"unit\":\"degC\",\"name\":\"Ann\"}}");
    Ok(EventBody {
        stream: StreamName::parse(stream)?,
        ts: Timestamp(ts + i as i64),
        value: Value::from_payload(payload.as_bytes()),
        quality: Quality::Good,
        attrs: BTreeMap::new(),
    })
}

/// What the subscriber on a sink's broker saw: (topic, payload).
type Seen = outpost_tests::MqttSeen;

fn subscriber(port: u16, id: &str) -> Result<(Seen, rumqttc::Client)> {
    outpost_tests::mqtt_watcher(port, id, DEADLINE)
}

/// A broker for a sink that is down at first: started once so that the
/// watching subscriber's persistent session exists, then stopped (its
/// persistence keeps the session); [`Mosquitto::start_on`] brings it back
/// on the same port and directory.
fn down_broker(dir: &Path, watcher: &str) -> Result<u16> {
    let mut b = Mosquitto::start(dir)?;
    let (_, client) = subscriber(b.port, watcher)?;
    client.disconnect()?;
    // The broker saves the session when it stops on SIGTERM.
    std::thread::sleep(Duration::from_millis(200));
    b.proc.term(Duration::from_secs(10))?;
    Ok(b.port)
}

/// A `[[sinks]]` entry for an MQTT sink on the broker at `port`.
fn mqtt_sink(id: &str, region: &str, port: u16, prefix: &str) -> String {
    format!(
        r#"
[[sinks]]
id = "{id}"
kind = "mqtt"
region = "{region}"
retry_min = "100ms"
retry_max = "500ms"

[sinks.mqtt]
broker = "127.0.0.1:{port}"
client_id = "hub-{id}"
topic = "{prefix}/{{agent_id}}/{{stream}}"
"#
    )
}

fn agent_config(hub: &Hub, creds: &Path) -> String {
    format!(
        r#"
[agent]
data_dir = "data"
id = "{AGENT}"

[uplink]
hub = "{}"
ca = "{}"
cert = "{}"
key = "{}"
reconnect_min = "100ms"
reconnect_max = "1s"

[observability]
metrics = ""
log = "info"
"#,
        hub.addr,
        creds.join("ca.pem").display(),
        creds.join("agent.pem").display(),
        creds.join("agent.key").display(),
    )
}

fn apply(hub: &Hub, dir: &Path, name: &str, text: &str) -> Result<()> {
    let file = dir.join(name);
    std::fs::write(&file, text)?;
    let (code, out, err) = hub.cli(&["policy", "apply", &file.display().to_string()])?;
    ensure!(code == 0, "policy apply {name}: {out}{err}");
    // The running hub picks a new version up within a second; what it
    // ingests before that is under the previous one.
    let version = out
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .context("the applied version")?
        .to_owned();
    wait_until(DEADLINE, "the hub to enforce the new version", || {
        hub.log().contains(&format!(
            "New policy in force; pushing it to connected agents. version={version}"
        ))
    })?;
    Ok(())
}

fn sinks_status(hub: &Hub) -> Result<BTreeMap<String, serde_json::Value>> {
    let (code, out, err) = hub.cli(&["sinks", "status", "--json"])?;
    ensure!(code == 0, "sinks status: {out}{err}");
    outpost_tests::sinks_by_id(&out)
}

/// The `n`s a subscriber saw under `prefix/`, with how often each.
fn counts(seen: &Seen, prefix: &str) -> BTreeMap<u64, usize> {
    let mut m = BTreeMap::new();
    for (topic, j) in seen.lock().map(|v| v.clone()).unwrap_or_default() {
        let n = j["value"]["n"].as_u64().unwrap_or(u64::MAX);
        if topic.starts_with(prefix) {
            *m.entry(n).or_insert(0) += 1;
        }
    }
    m
}

/// The policy of both tests: debug streams denied, badges personal (their
/// home region only: `eu-west`) with the name redacted, everything else to
/// the store and both clouds.
const POLICY: &str = r#"
[defaults]
sinks = ["store", "cloud-eu", "cloud-us"]

[[residency]]
name = "personnel"
streams = ["hr/#"]
classification = "personal"
home = "eu-west"

[[rules]]
name = "no debug"
streams = ["plant/+/debug"]
action = "deny"

[[rules]]
name = "badges stay in the EU"
streams = ["hr/#"]
redact = ["/name"]
sinks = ["store", "cloud-eu"]
"#;

#[test]
fn each_sink_gets_what_its_routes_select_once_and_residency_holds_to_the_last_step() -> Result<()> {
    const N: usize = 900;
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let creds = pki.issue_agent(AGENT)?;
    let eu = Mosquitto::start(&dir.path().join("eu").tap_dir()?)?;
    let us_dir = dir.path().join("us").tap_dir()?;
    let us_port = down_broker(&us_dir, "watch-us")?;
    let (eu_seen, _eu_client) = subscriber(eu.port, "watch-eu")?;
    let tables = format!(
        "{}{}",
        mqtt_sink("cloud-eu", "eu-west", eu.port, "eu"),
        mqtt_sink("cloud-us", "us-east", us_port, "us")
    );
    let hub = Hub::start_with_tables(dir.path(), &pki, "region = \"eu-west\"", &tables)?;
    let _logs = Logs(dir.path().to_owned());

    // A policy the hub refuses: it would route personal data to us-east.
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        POLICY.replace(
            "sinks = [\"store\", \"cloud-eu\"]",
            "sinks = [\"store\", \"cloud-eu\", \"cloud-us\"]",
        ),
    )?;
    let (code, out, err) = hub.cli(&["policy", "apply", &file.display().to_string()])?;
    ensure!(
        code != 0 && format!("{out}{err}").contains("cloud-us"),
        "refused: {code} {out}{err}"
    );

    // Version 1, before the residency entry existed: badges to every sink.
    // The us broker is down, so what is routed there waits in the hub.
    let v1 = POLICY
        .replace("[[residency]]\nname = \"personnel\"\nstreams = [\"hr/#\"]\nclassification = \"personal\"\nhome = \"eu-west\"\n", "")
        .replace("sinks = [\"store\", \"cloud-eu\"]", "sinks = [\"store\", \"cloud-eu\", \"cloud-us\"]");
    apply(&hub, dir.path(), "v1.toml", &v1)?;

    let ts = now_ns();
    let bodies = (0..N).map(|i| body(i, ts)).collect::<Result<Vec<_>>>()?;
    let site = dir.path().join("site").tap_dir()?;
    outpost_tests::fill_outbox(&site.join("data"), AGENT, &bodies)?;
    let mut agent = Agent::start(&site, &agent_config(&hub, &creds))?;

    // cloud-eu gets the temperatures and the badges, not the debug stream.
    let kept: BTreeSet<u64> = (0..N as u64).filter(|i| i % 3 != 2).collect();
    wait_until(DEADLINE, "cloud-eu to have every kept event", || {
        counts(&eu_seen, "eu/")
            .keys()
            .copied()
            .collect::<BTreeSet<_>>()
            == kept
    })?;
    // Version 2 adds the residency: badges may only be stored in eu-west.
    apply(&hub, dir.path(), "v2.toml", POLICY)?;
    // The us broker comes up; its queue (temperatures and, from version 1,
    // badges) is delivered, less the badges, which the last step keeps back.
    let us = Mosquitto::start_on(&us_dir, us_port)?;
    let (us_seen, _us_client) = subscriber(us.port, "watch-us")?;
    let temps: BTreeSet<u64> = (0..N as u64).filter(|i| i % 3 == 0).collect();
    wait_until(DEADLINE, "the agent's outbox to drain", || {
        agent_outbox_stats(&agent.config)
            .map(|s| s["events"] == 0)
            .unwrap_or(false)
    })?;
    let status = sinks_status(&hub)?;
    let us_status = &status["cloud-us"];
    let badges = (0..N as u64).filter(|i| i % 3 == 1).count() as u64;
    ensure!(
        us_status["pending"] == 0 && us_status["refused_residency"] == badges,
        "cloud-us: {us_status}"
    );
    wait_until(
        DEADLINE,
        "cloud-us's watcher to see every temperature",
        || counts(&us_seen, "us/").len() >= temps.len(),
    )?;
    let got_us = counts(&us_seen, "us/");
    ensure!(
        got_us.keys().copied().collect::<BTreeSet<_>>() == temps,
        "cloud-us got something other than the temperatures: {:?}",
        got_us
            .keys()
            .filter(|n| !temps.contains(n))
            .collect::<Vec<_>>()
    );
    ensure!(
        us_status["delivered"] == temps.len() as u64,
        "cloud-us delivered {} of {}",
        us_status["delivered"],
        temps.len()
    );
    let got_eu = counts(&eu_seen, "eu/");
    let twice: Vec<_> = got_eu
        .iter()
        .chain(got_us.iter())
        .filter(|(_, c)| **c > 1)
        .collect();
    ensure!(twice.is_empty(), "delivered twice: {twice:?}");
    // Minimised: no badge left the hub with its name.
    for (topic, j) in eu_seen.lock().map(|v| v.clone()).unwrap_or_default() {
        if topic.contains("hr/badge") {
            ensure!(j["value"]["name"] == "[redacted]", "{topic}: {j}");
        }
    }
    let (_, audit, _) = hub.cli(&["audit", "list", "--json"])?;
    ensure!(
        audit.contains("sink.refused"),
        "no sink.refused entry: {audit}"
    );
    agent.proc.term(Duration::from_secs(30))?;
    Ok(())
}

#[test]
fn a_sink_down_holds_back_the_agents_acks_and_gets_everything_once_when_it_returns() -> Result<()> {
    // More than twice the hub's 8192-event window: the upload must go on
    // past it while cloud-us holds the acknowledgements back (protocol
    // version 3's `Stored`), or the store and cloud-eu would stop short.
    const N: usize = 20_000;
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let creds = pki.issue_agent(AGENT)?;
    let eu = Mosquitto::start(&dir.path().join("eu").tap_dir()?)?;
    let (eu_seen, _eu_client) = subscriber(eu.port, "watch-eu")?;
    // cloud-us's broker is down from the start (nothing listens there).
    let us_dir = dir.path().join("us").tap_dir()?;
    let us_port = down_broker(&us_dir, "watch-us")?;
    let tables = format!(
        "{}{}",
        mqtt_sink("cloud-eu", "eu-west", eu.port, "eu"),
        mqtt_sink("cloud-us", "us-east", us_port, "us")
    );
    let hub = Hub::start_with_tables(dir.path(), &pki, "region = \"eu-west\"", &tables)?;
    let _logs = Logs(dir.path().to_owned());
    apply(&hub, dir.path(), "policy.toml", POLICY)?;
    let ts = now_ns();
    let bodies = (0..N).map(|i| body(i, ts)).collect::<Result<Vec<_>>>()?;
    let site = dir.path().join("site").tap_dir()?;
    outpost_tests::fill_outbox(&site.join("data"), AGENT, &bodies)?;
    let mut agent = Agent::start(&site, &agent_config(&hub, &creds))?;

    // Everything reaches the hub's store and cloud-eu, but the agent gets no
    // acknowledgement past the first temperature (routed to cloud-us too):
    // the backlog stays in its outbox, and the streams routed to cloud-eu
    // alone keep flowing.
    let stored = (0..N).filter(|i| i % 3 != 2).count() as u64;
    wait_until(DEADLINE, "the hub to store every kept event", || {
        hub.agent_stats(AGENT)
            .ok()
            .flatten()
            .is_some_and(|s| s.count == stored)
    })?;
    wait_until(
        DEADLINE,
        "cloud-us's failures to show, and cloud-eu to get everything meanwhile",
        || {
            sinks_status(&hub)
                .map(|s| {
                    s["cloud-us"]["failures"].as_u64().unwrap_or(0) >= 2
                        && s["cloud-eu"]["delivered"] == stored
                })
                .unwrap_or(false)
        },
    )?;
    let status = sinks_status(&hub)?;
    let temps = (0..N).filter(|i| i % 3 == 0).count() as u64;
    ensure!(
        status["cloud-us"]["pending"] == temps && status["cloud-eu"]["pending"] == 0,
        "{status:?}"
    );
    // The same, as Prometheus sees it.
    let metrics = hub.metrics()?;
    for line in [
        format!("outpost_hub_sink_pending_events{{sink=\"cloud-us\"}} {temps}"),
        "outpost_hub_sink_pending_events{sink=\"cloud-eu\"} 0".to_owned(),
        format!("outpost_hub_sink_delivered_events_total{{sink=\"cloud-eu\"}} {stored}"),
    ] {
        ensure!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }
    let failures = metrics
        .lines()
        .find_map(|l| l.strip_prefix("outpost_hub_sink_failures_total{sink=\"cloud-us\"} "))
        .and_then(|n| n.parse::<u64>().ok())
        .context("cloud-us failures")?;
    ensure!(failures >= 2, "{metrics}");
    let waiting = agent_outbox_stats(&agent.config)?["events"]
        .as_u64()
        .context("events")?;
    ensure!(
        waiting == N as u64,
        "the agent's outbox should still hold all {N} (the first event waits for cloud-us), holds {waiting}"
    );
    // The agent restarts meanwhile: it resumes where the hub's
    // acknowledgement stopped, and nothing is stored or queued twice.
    agent.proc.kill9();
    let mut agent = Agent::start_file(&agent.config)?;

    let us = Mosquitto::start_on(&us_dir, us_port)?;
    let (us_seen, _us_client) = subscriber(us.port, "watch-us")?;
    wait_until(DEADLINE, "the agent's outbox to drain", || {
        agent_outbox_stats(&agent.config)
            .map(|s| s["events"] == 0)
            .unwrap_or(false)
    })?;
    let status = sinks_status(&hub)?;
    ensure!(
        status["cloud-us"]["pending"] == 0 && status["cloud-us"]["delivered"] == temps,
        "{status:?}"
    );
    ensure!(
        status["cloud-eu"]["delivered"] == stored,
        "cloud-eu delivered {} of {stored}",
        status["cloud-eu"]["delivered"]
    );
    let got_eu = counts(&eu_seen, "eu/");
    ensure!(
        got_eu.len() as u64 == stored && got_eu.values().all(|c| *c == 1),
        "cloud-eu saw {} distinct, some twice: {:?}",
        got_eu.len(),
        got_eu.iter().filter(|(_, c)| **c > 1).collect::<Vec<_>>()
    );
    wait_until(
        DEADLINE,
        "cloud-us's watcher to see every temperature",
        || counts(&us_seen, "us/").len() as u64 >= temps,
    )?;
    let got_us = counts(&us_seen, "us/");
    let want: BTreeSet<u64> = (0..N as u64).filter(|i| i % 3 == 0).collect();
    ensure!(
        got_us.keys().copied().collect::<BTreeSet<_>>() == want && got_us.values().all(|c| *c == 1),
        "cloud-us: {} distinct of {}, twice: {:?}",
        got_us.len(),
        want.len(),
        got_us.iter().filter(|(_, c)| **c > 1).collect::<Vec<_>>()
    );
    let s = hub.agent_stats(AGENT)?.context("stats")?;
    ensure!(s.count == stored && s.distinct_seqs == stored, "{s:?}");
    agent.proc.term(Duration::from_secs(30))?;
    Ok(())
}

/// Prints the hub's and the agent's logs when a test fails (dropped while
/// panicking or after an error return: the test's `Result` is printed by the
/// harness, the logs by this).
struct Logs(std::path::PathBuf);

impl Drop for Logs {
    fn drop(&mut self) {
        if std::env::var_os("OUTPOST_TEST_LOGS").is_some() || std::thread::panicking() {
            for f in ["hub.log", "site/agent.log"] {
                let text = std::fs::read_to_string(self.0.join(f)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("--- {f} (last lines) ---");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// `create_dir_all`, returning the path.
trait TapDir: Sized {
    fn tap_dir(self) -> Result<Self>;
}

impl TapDir for std::path::PathBuf {
    fn tap_dir(self) -> Result<Self> {
        std::fs::create_dir_all(&self)?;
        Ok(self)
    }
}

#[test]
fn a_bad_sink_config_is_one_clear_error_and_an_unreachable_sink_is_not_fatal() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let hub_bin = outpost_tests::bin("outpost-hub")?;
    let write = |name: &str, tables: &str| -> Result<std::path::PathBuf> {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "[hub]\ndata_dir = \"data-{name}\"\nlisten = \"127.0.0.1:{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n{tables}",
                outpost_tests::free_udp_port()?,
                pki.hub_dir.join("ca.pem").display(),
                pki.hub_dir.join("hub.pem").display(),
                pki.hub_dir.join("hub.key").display(),
            ),
        )?;
        Ok(path)
    };
    let run = |args: &[&str]| outpost_tests::run_cli(&hub_bin, args);

    // An unknown kind: `check` and `run` refuse it, exit 2, naming the key.
    let unknown = write("unknown.toml", "[[sinks]]\nid = \"x\"\nkind = \"kafka\"\n")?;
    for verb in ["check", "run"] {
        let (code, _, err) = run(&[verb, "--config", &unknown.display().to_string()])?;
        ensure!(
            code == 2
                && err.contains("sinks[0].kind")
                && err.contains("kafka")
                && err.lines().count() == 1,
            "{verb}: {code} {err}"
        );
    }
    // A CA file that is not a certificate: `run` exits 1 naming the key and
    // the file.
    std::fs::write(dir.path().join("junk.pem"), "not a certificate\n")?;
    let bad_ca = write(
        "badca.toml",
        &format!(
            "[[sinks]]\nid = \"cloud\"\nkind = \"mqtt\"\n[sinks.mqtt]\nbroker = \"127.0.0.1:1\"\nclient_id = \"hub\"\n[sinks.mqtt.tls]\nca = \"{}\"\n",
            dir.path().join("junk.pem").display()
        ),
    )?;
    let (code, _, err) = run(&["run", "--config", &bad_ca.display().to_string()])?;
    ensure!(
        code == 1 && err.contains("mqtt.tls.ca") && err.contains("junk.pem"),
        "bad CA: {code} {err}"
    );
    // A far end nobody listens on: the hub runs, says so, and keeps trying.
    let port = outpost_tests::free_port()?;
    let tables = format!(
        "[[sinks]]\nid = \"cloud\"\nkind = \"mqtt\"\nretry_min = \"100ms\"\nretry_max = \"200ms\"\n[sinks.mqtt]\nbroker = \"127.0.0.1:{port}\"\nclient_id = \"hub\"\n"
    );
    let hub = Hub::start_with_tables(dir.path(), &pki, "", &tables)?;
    wait_until(DEADLINE, "the hub to say the sink is unreachable", || {
        hub.log().contains("unreachable")
    })?;
    let mut hub = hub;
    ensure!(hub.proc.is_running(), "the hub exited:\n{}", hub.log());
    hub.proc.term(Duration::from_secs(20))?;
    Ok(())
}

/// A JetStream sink whose server is down for longer than the sink's timeout
/// and the stream's duplicate window, comes back, is killed with SIGKILL while
/// the hub delivers the backlog, and comes back again after the window: the
/// agent's acknowledgements wait throughout, and the stream ends up with
/// every event once (the sink checks what the stream holds before it
/// delivers a batch again, since the window no longer catches repeats).
#[test]
fn a_jetstream_sink_down_past_its_timeout_and_the_duplicate_window_gets_everything_once(
) -> Result<()> {
    use async_nats::jetstream;
    const N: usize = 3000;
    const WINDOW: Duration = Duration::from_secs(1);
    let dir = tempfile::tempdir()?;
    let rt = tokio::runtime::Runtime::new()?;
    let nats_dir = dir.path().join("nats").tap_dir()?;
    let mut nats = outpost_tests::Nats::start(&nats_dir)?;
    let (port, url) = (nats.port, nats.url());
    let js = rt.block_on(async { anyhow::Ok(jetstream::new(async_nats::connect(&url).await?)) })?;
    rt.block_on(js.create_stream(jetstream::stream::Config {
        name: "FLEET".into(),
        subjects: vec!["outpost.>".into()],
        duplicate_window: WINDOW,
        ..Default::default()
    }))
    .map_err(|e| anyhow::anyhow!("create stream: {e}"))?;
    drop(js);
    nats.proc.term(Duration::from_secs(10))?;

    let pki = Pki::new(dir.path())?;
    let creds = pki.issue_agent(AGENT)?;
    let sink = format!(
        r#"
[[sinks]]
id = "lake"
kind = "jetstream"
region = "eu-west"
retry_min = "100ms"
retry_max = "500ms"
batch_max = 200

[sinks.jetstream]
url = "{url}"
stream = "FLEET"
timeout = "1s"
"#
    );
    let hub = Hub::start_with_tables(dir.path(), &pki, "region = \"eu-west\"", &sink)?;
    let _logs = Logs(dir.path().to_owned());
    apply(
        &hub,
        dir.path(),
        "policy.toml",
        "[defaults]\nsinks = [\"store\", \"lake\"]\n",
    )?;
    let ts = now_ns();
    let bodies = (0..N).map(|i| body(i, ts)).collect::<Result<Vec<_>>>()?;
    let site = dir.path().join("site").tap_dir()?;
    outpost_tests::fill_outbox(&site.join("data"), AGENT, &bodies)?;
    let started = std::time::Instant::now();
    let agent = Agent::start(&site, &agent_config(&hub, &creds))?;

    wait_until(DEADLINE, "the hub to store the backlog", || {
        hub.agent_stats(AGENT)
            .ok()
            .flatten()
            .is_some_and(|s| s.count == N as u64)
    })?;
    wait_until(
        DEADLINE,
        "the sink to be down past its timeout and the window",
        || {
            started.elapsed() > Duration::from_secs(1) + WINDOW * 2
                && sinks_status(&hub)
                    .map(|s| s["lake"]["failures"].as_u64().unwrap_or(0) >= 3)
                    .unwrap_or(false)
        },
    )?;
    let waiting = agent_outbox_stats(&agent.config)?["events"].as_u64();
    ensure!(
        waiting == Some(N as u64),
        "the agent's outbox holds {waiting:?}"
    );

    // Back; killed while the backlog is delivered; back after the window.
    let mut nats = outpost_tests::Nats::start_on(&nats_dir, port)?;
    let js = rt.block_on(async { anyhow::Ok(jetstream::new(async_nats::connect(&url).await?)) })?;
    let stored = |js: &jetstream::Context| -> u64 {
        rt.block_on(async {
            let s = js.get_stream("FLEET").await.ok()?;
            Some(s.get_info().await.ok()?.state.messages)
        })
        .unwrap_or(0)
    };
    wait_until(DEADLINE, "the first batches in the stream", || {
        stored(&js) > 0
    })?;
    nats.proc.kill9();
    let at_kill = std::time::Instant::now();
    drop(js);
    wait_until(DEADLINE, "the duplicate window to pass", || {
        at_kill.elapsed() > WINDOW * 2
    })?;
    let _nats = outpost_tests::Nats::start_on(&nats_dir, port)?;
    wait_until(DEADLINE, "the agent's outbox to drain", || {
        agent_outbox_stats(&agent.config)
            .map(|s| s["events"] == 0)
            .unwrap_or(false)
    })?;
    let js = rt.block_on(async { anyhow::Ok(jetstream::new(async_nats::connect(&url).await?)) })?;
    let messages = rt.block_on(outpost_tests::stream_messages(&js, "FLEET", DEADLINE))?;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for m in &messages {
        *seen
            .entry(outpost_tests::msg_id(m).context("Nats-Msg-Id")?)
            .or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    ensure!(twice.is_empty(), "stored twice: {twice:?}");
    let expected: BTreeSet<String> = (1..=N).map(|s| format!("{AGENT}:{s}")).collect();
    let got: BTreeSet<String> = seen.into_keys().collect();
    ensure!(
        got == expected,
        "{} of {N} stored; missing e.g. {:?}",
        got.len(),
        expected.difference(&got).take(5).collect::<Vec<_>>()
    );
    let status = sinks_status(&hub)?;
    ensure!(
        status["lake"]["pending"] == 0 && status["lake"]["delivered"] == N as u64,
        "{status:?}"
    );
    Ok(())
}
