//! The fleet policy with real processes: `outpost-hub policy apply` while a
//! real agent forwards a real Mosquitto's traffic; the policy reaches the
//! agent within seconds, denied streams stop, minimisation shows in what the
//! hub stores, the agent keeps enforcing after a restart without its hub; an
//! old agent that knows no policy is enforced at the hub and counted; bad
//! and residency-breaking policies are refused and change nothing but the
//! audit log; and a one-character edit of the audit log is found.
//!
//! Every wait polls a condition until a deadline.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use outpost_protocols::Value;
use outpost_tests::fleet_sim::{self, Load};
use outpost_tests::{outbox_events, wait_until, Agent, Hub, Mosquitto, Pki};
use rumqttc::{AsyncClient, MqttOptions, QoS};

const AGENT: &str = "gw-1";

/// How long any one condition may take on a loaded 2-core machine running
/// debug builds.
const DEADLINE: Duration = Duration::from_secs(90);

const DENY_DEBUG: &str = r#"
description = "no debug data leaves the plants"

[[rules]]
name = "no debug"
streams = ["plant/+/debug"]
action = "deny"
"#;

const MINIMISE: &str = r#"
description = "no debug; badges pseudonymised; temperatures coarse"

[hashing]
key = "e2e-test-key-of-some-length"

[[rules]]
name = "no debug"
streams = ["plant/+/debug"]
action = "deny"

[[rules]]
name = "badges"
streams = ["plant/badge"]
drop = ["/photo"]
redact = ["/name"]
hash = ["/employee"]

[[rules]]
name = "temperatures"
streams = ["plant/+/temp"]
round = 1
round_fields = ["/v"]
downsample = { interval = "1s" }
"#;

fn agent_config(broker: u16, hub: &Hub, creds: &Path) -> String {
    format!(
        r#"
[agent]
data_dir = "data"
id = "{AGENT}"
labels = {{ site = "depot-17", region = "eu-west" }}

[outbox]
commit_window = "1ms"

[uplink]
hub = "{hub}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
reconnect_min = "100ms"
reconnect_max = "1s"

[mqtt]
broker = "127.0.0.1:{broker}"
client_id = "policy-e2e"
reconnect_min = "50ms"
reconnect_max = "500ms"

[[mqtt.subscribe]]
filter = "plant/#"
qos = 1

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

/// Publishes, every 50 ms until dropped, one message to each of the plant's
/// streams: a temperature, a debug dump and a badge reading with personal
/// data; each carries its number `n`.
struct Plant {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<Result<()>>>,
}

impl Plant {
    fn start(port: u16) -> Plant {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut o = MqttOptions::new("plant", "127.0.0.1", port);
                o.set_keep_alive(Duration::from_secs(5));
                let (client, mut el) = AsyncClient::new(o, 100);
                let driver = tokio::spawn(async move { while el.poll().await.is_ok() {} });
                let mut n = 0u64;
                while !flag.load(Ordering::Relaxed) {
                    n += 1;
                    let t = 21.0 + (n % 10) as f64 * 0.123_45;
                    for (topic, payload) in [
                        ("plant/line1/temp", format!(r#"{{"n":{n},"v":{t}}}"#)),
                        ("plant/line1/debug", format!(r#"{{"n":{n},"dump":"regs"}}"#)),
                        (
                            "plant/badge",
                            format!(
                                r#"{{"n":{n},"name":"Ann Example","employee":4711,"photo":"AAAA","door":"north"}}"#
                            ),
                        ),
                    ] {
                        client.publish(topic, QoS::AtLeastOnce, false, payload).await?;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                driver.abort();
                Ok(())
            })
        });
        Plant {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Plant {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The stored events of `stream` at the hub.
fn stored(hub: &Hub, stream: &str) -> Result<Vec<serde_json::Value>> {
    hub.events_of(stream, 1_000_000)
}

fn agent_entry(hub: &Hub) -> Result<Option<serde_json::Value>> {
    Ok(hub.fleet()?.into_iter().find(|a| a["agent_id"] == AGENT))
}

fn reported_version(hub: &Hub) -> Result<Option<u64>> {
    Ok(agent_entry(hub)?.and_then(|a| a["policy_version"].as_u64()))
}

fn apply(hub: &Hub, file: &Path, text: &str) -> Result<u64> {
    std::fs::write(file, text)?;
    let (code, out, err) =
        hub.cli(&["policy", "apply", path(file)?, "--json", "--actor", "e2e"])?;
    ensure!(code == 0, "policy apply exited {code}: {err}");
    let j: serde_json::Value = serde_json::from_str(&out)?;
    j["version"].as_u64().context("no version")
}

fn path(p: &Path) -> Result<&str> {
    p.to_str().context("not UTF-8")
}

/// The highest seq among `events`.
fn max_seq(events: &[serde_json::Value]) -> u64 {
    events
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .max()
        .unwrap_or(0)
}

#[test]
fn a_policy_applied_while_the_agent_sends_is_enforced_within_seconds_and_survives_a_restart(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let creds = pki.issue_agent(AGENT)?;
    let hub = Hub::start_with(dir.path(), &pki, "region = \"eu-west\"")?;
    let broker = Mosquitto::start(dir.path())?;
    let agent_dir = dir.path().join("site");
    std::fs::create_dir_all(&agent_dir)?;
    let mut agent = Agent::start(&agent_dir, &agent_config(broker.port, &hub, &creds))?;
    let plant = Plant::start(broker.port);

    // Everything arrives while there is no policy.
    wait_until(DEADLINE, "every stream at the hub", || {
        ["plant/line1/temp", "plant/line1/debug", "plant/badge"]
            .iter()
            .all(|s| stored(&hub, s).map(|e| e.len() >= 5).unwrap_or(false))
    })?;
    ensure!(
        reported_version(&hub)? == Some(0),
        "the agent reports no policy"
    );

    // Deny the debug stream while it flows.
    let applied = Instant::now();
    let v1 = apply(&hub, &dir.path().join("deny.toml"), DENY_DEBUG)?;
    ensure!(v1 == 1);
    wait_until(DEADLINE, "the agent to report policy 1", || {
        reported_version(&hub).ok().flatten() == Some(1)
    })?;
    println!(
        "policy 1 in force at the agent {:.1} s after `policy apply`",
        applied.elapsed().as_secs_f64()
    );
    let debug_then = stored(&hub, "plant/line1/debug")?.len();
    let temp_then = stored(&hub, "plant/line1/temp")?.len();
    wait_until(DEADLINE, "40 more temperatures", || {
        stored(&hub, "plant/line1/temp")
            .map(|e| e.len() >= temp_then + 40)
            .unwrap_or(false)
    })?;
    ensure!(
        stored(&hub, "plant/line1/debug")?.len() == debug_then,
        "debug events reached the hub after the agent put the deny in force"
    );

    // Minimisation, visible in what the hub stores.
    let v2 = apply(&hub, &dir.path().join("minimise.toml"), MINIMISE)?;
    ensure!(v2 == 2);
    wait_until(DEADLINE, "the agent to report policy 2", || {
        reported_version(&hub).ok().flatten() == Some(2)
    })?;
    let badge_from = max_seq(&stored(&hub, "plant/badge")?);
    let temp_from = max_seq(&stored(&hub, "plant/line1/temp")?);
    wait_until(DEADLINE, "5 minimised badges and temperatures", || {
        let b = stored(&hub, "plant/badge").unwrap_or_default();
        let t = stored(&hub, "plant/line1/temp").unwrap_or_default();
        b.iter()
            .filter(|e| e["seq"].as_u64() > Some(badge_from))
            .count()
            >= 5
            && t.iter()
                .filter(|e| e["seq"].as_u64() > Some(temp_from))
                .count()
                >= 5
    })?;
    let badges: Vec<serde_json::Value> = stored(&hub, "plant/badge")?
        .into_iter()
        .filter(|e| e["seq"].as_u64() > Some(badge_from))
        .collect();
    let hashes: std::collections::BTreeSet<String> = badges
        .iter()
        .map(|e| {
            e["value"]["employee"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    for b in &badges {
        let v = &b["value"];
        ensure!(v["name"] == "[redacted]", "name not redacted: {b}");
        ensure!(v.get("photo").is_none(), "photo not dropped: {b}");
        ensure!(v["door"] == "north", "an untouched field changed: {b}");
        ensure!(
            !v.to_string().contains("Ann Example") && v["employee"] != 4711,
            "personal data stored: {b}"
        );
    }
    let h = hashes.iter().next().context("no hash")?;
    ensure!(hashes.len() == 1, "one employee, one pseudonym: {hashes:?}");
    ensure!(
        h.starts_with("hmac-sha256:") && h.len() == "hmac-sha256:".len() + 64,
        "{h}"
    );
    let temps: Vec<serde_json::Value> = stored(&hub, "plant/line1/temp")?
        .into_iter()
        .filter(|e| e["seq"].as_u64() > Some(temp_from))
        .collect();
    for t in &temps {
        let v = t["value"]["v"].as_f64().context("v")?;
        ensure!(
            ((v * 10.0).round() - v * 10.0).abs() < 1e-9,
            "not rounded to 0.1: {t}"
        );
    }
    // 20 temperatures a second come in; downsampling keeps one a second.
    let ts: Vec<i64> = temps.iter().filter_map(|t| t["ts"].as_i64()).collect();
    for w in ts.windows(2) {
        ensure!(
            w[1] - w[0] >= 1_000_000_000,
            "downsampled events closer than 1 s: {ts:?}"
        );
    }

    // The agent keeps enforcing policy 2 after a restart without its hub.
    drop(hub);
    agent.proc.term(Duration::from_secs(30))?;
    let before = outbox_events(&agent_dir.join("data"))?
        .iter()
        .map(|e| e.seq.0)
        .max()
        .unwrap_or(0);
    let _agent = Agent::start_file(&agent.config)?;
    wait_until(
        DEADLINE,
        "new events in the outbox after the restart",
        || {
            outbox_events(&agent_dir.join("data"))
                .map(|ev| ev.iter().filter(|e| e.seq.0 > before).count() >= 60)
                .unwrap_or(false)
        },
    )?;
    drop(plant);
    let fresh: Vec<_> = outbox_events(&agent_dir.join("data"))?
        .into_iter()
        .filter(|e| e.seq.0 > before)
        .collect();
    ensure!(
        fresh
            .iter()
            .all(|e| e.body.stream.as_str() != "plant/line1/debug"),
        "denied events stored for upload after the restart"
    );
    for e in fresh
        .iter()
        .filter(|e| e.body.stream.as_str() == "plant/badge")
    {
        let Value::Json(j) = &e.body.value else {
            anyhow::bail!("badge not JSON: {e:?}")
        };
        ensure!(
            !j.as_str().contains("Ann Example"),
            "unredacted badge stored: {j:?}"
        );
    }
    ensure!(
        std::fs::read_to_string(agent_dir.join("agent.log"))?
            .contains("Policy in force from the data directory"),
        "the agent did not say which policy it runs"
    );
    let (code, out, err) = outpost_tests::run_cli(
        &outpost_tests::bin("outpost-agent")?,
        &["policy", "show", "--config", path(&agent.config)?, "--json"],
    )?;
    ensure!(code == 0, "policy show: {err}");
    let shown: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(shown["version"] == 2 && shown["rules"] == 3, "{shown}");
    ensure!(shown["text"].as_str() == Some(MINIMISE), "{shown}");
    Ok(())
}

#[test]
fn an_old_agent_that_knows_no_policy_is_enforced_at_the_hub_and_counted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let hub = Hub::start_with(dir.path(), &pki, "region = \"eu-west\"")?;
    let policy = r#"
[[rules]]
streams = ["sim/+/debug"]
action = "deny"

[[rules]]
streams = ["sim/+/badge"]
redact = ["/name"]
"#;
    let v = apply(&hub, &dir.path().join("p.toml"), policy)?;
    ensure!(v == 1);
    // The hub's watch reads new versions every second; an agent connecting
    // before that would be enforced by the previous one.
    wait_until(DEADLINE, "the hub to put policy 1 in force", || {
        hub.log().contains("New policy in force")
    })?;

    // Simulated agent 0 speaks protocol version 1 (no policy frames) and
    // sends 30 events: a temperature, a debug dump and a badge, in turn.
    let creds = fleet_sim::issue_agents(&pki.ca_dir, dir.path(), 1)?;
    let mut load = Load::new(0, 30)?;
    load.max_version = 1;
    for (seq, body) in &mut load.events {
        let (stream, payload) = match seq.0 % 3 {
            0 => ("sim/0/temp", format!(r#"{{"n":{}}}"#, seq.0)),
            1 => ("sim/0/debug", format!(r#"{{"n":{},"dump":"x"}}"#, seq.0)),
            _ => ("sim/0/badge", format!(r#"{{"n":{},"name":"Bob"}}"#, seq.0)),
        };
        body.stream = outpost_protocols::StreamName::parse(stream)?;
        body.value = Value::from_payload(payload.as_bytes());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let endpoint = fleet_sim::client_endpoint(1 << 20)?;
        let config = fleet_sim::client_config(&creds[0], outpost_protocols::wire::ALPN)?;
        fleet_sim::run_agent(
            endpoint,
            config,
            hub.addr,
            0,
            load,
            Instant::now(),
            DEADLINE,
        )
        .await
    })?;

    let id = fleet_sim::agent_id(0);
    let stats = hub.agent_stats(&id)?.context("nothing stored")?;
    ensure!(
        stats.count == 20,
        "10 debug events of 30 should be dropped: {stats:?}"
    );
    ensure!(
        stats.max_seq == Some(30),
        "the watermark covers the last, dropped, seq: {stats:?}"
    );
    let fleet = hub.fleet()?;
    let a = fleet
        .iter()
        .find(|a| a["agent_id"] == id.as_str())
        .context("registered")?;
    ensure!(
        a["protocol_version"] == 1 && a["policy_version"].is_null(),
        "{a}"
    );
    ensure!(
        a["policy_dropped"] == 10 && a["policy_modified"] == 10,
        "counted against the agent: {a}"
    );
    let badges = hub.events_of("sim/+/badge", 100)?;
    ensure!(badges.len() == 10);
    ensure!(
        badges.iter().all(|b| b["value"]["name"] == "[redacted]"),
        "unredacted badge stored: {badges:?}"
    );
    ensure!(hub.events_of("sim/+/debug", 100)?.is_empty());
    // The fleet view says so too.
    let (code, text, _) = hub.cli(&["fleet", "list"])?;
    ensure!(
        code == 0 && text.contains("10 dropped / 10 changed"),
        "{text}"
    );
    // A selector that selects no agent the hub knows is applied, with a
    // warning naming it.
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "[[rules]]\nname = \"depot\"\nagents = { site = \"depto-17\" }\nstreams = [\"sim/#\"]\naction = \"deny\"\n")?;
    let (code, _, err) = hub.cli(&["policy", "apply", path(&typo)?])?;
    ensure!(code == 0, "{err}");
    ensure!(
        err.contains(
            "warning: rules[0] (\"depot\").agents: selects none of the 1 agents the hub knows"
        ),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn bad_and_residency_breaking_policies_are_refused_and_an_edited_audit_log_is_found() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    // This hub stores in the US.
    let hub = Hub::start_with(dir.path(), &pki, "region = \"us-east\"")?;
    let good = apply(&hub, &dir.path().join("good.toml"), DENY_DEBUG)?;
    ensure!(good == 1);
    let history = || -> Result<String> {
        let (code, out, err) = hub.cli(&["policy", "history", "--json"])?;
        ensure!(code == 0, "history: {err}");
        Ok(out)
    };
    let before = history()?;

    let cases: BTreeMap<&str, (&str, &str)> = BTreeMap::from([
        ("syntax", ("[[rules]\nstreams = [\"a\"]\n", "TOML")),
        ("unknown-key", ("[[rules]]\nstreams = [\"a\"]\nsend_to = [\"x\"]\n", "unknown field `send_to`")),
        ("unknown-sink", ("[[rules]]\nstreams = [\"a\"]\nsinks = [\"cloud-eu\"]\n", "rules[0].sinks[0]: unknown sink \"cloud-eu\"")),
        ("cannot-match", ("[[rules]]\nname = \"all plant\"\nstreams = [\"plant/#\"]\n[[rules]]\nname = \"line 1\"\nstreams = [\"plant/line1/+\"]\naction = \"deny\"\n", "cannot match: rule \"all plant\"")),
        ("residency", (
            "[[residency]]\nname = \"personnel\"\nstreams = [\"hr/#\"]\nclassification = \"personal\"\nhome = \"eu-west\"\n\n[[rules]]\nname = \"hr to the store\"\nstreams = [\"hr/+/badge\"]\n",
            "rules[0] (\"hr to the store\") by defaults.sinks[0]: residency: streams of residency \"personnel\"",
        )),
    ]);
    for (name, (text, want)) in &cases {
        let file = dir.path().join(format!("{name}.toml"));
        std::fs::write(&file, text)?;
        let (code, out, err) = hub.cli(&["policy", "apply", path(&file)?])?;
        ensure!(
            code == 2,
            "{name}: exit {code}, stdout {out:?}, stderr {err:?}"
        );
        let line = err.trim_end();
        ensure!(!line.contains('\n'), "{name}: more than one line: {err:?}");
        ensure!(
            line.contains(path(&file)?) && line.contains(want),
            "{name}: {line:?} should name the file and {want:?}"
        );
        ensure!(!err.contains("panicked"), "{name}: {err}");
    }
    ensure!(
        history()? == before,
        "a refused policy changed the versions"
    );
    let (code, show, _) = hub.cli(&["policy", "show", "--json"])?;
    ensure!(code == 0, "policy show");
    let show: serde_json::Value = serde_json::from_str(&show)?;
    ensure!(show["version"] == 1, "the running policy changed: {show}");

    // The audit log records the applied policy and every refusal.
    let (code, out, _) = hub.cli(&["audit", "list", "--json"])?;
    ensure!(code == 0);
    let log: serde_json::Value = serde_json::from_str(&out)?;
    let entries = log["entries"].as_array().context("entries")?;
    let refused: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| e["action"] == "policy.refused")
        .collect();
    ensure!(refused.len() == cases.len(), "{entries:?}");
    ensure!(
        refused.iter().any(|e| e["detail"]
            .as_str()
            .is_some_and(|d| d.contains("residency"))),
        "the residency refusal is recorded with its reason"
    );
    ensure!(entries
        .iter()
        .any(|e| e["action"] == "policy.applied" && e["actor"] == "local:e2e"));
    let (code, out, err) = hub.cli(&["audit", "verify"])?;
    ensure!(code == 0 && out.contains("intact"), "{out} {err}");

    // Change one character of one entry.
    let target = refused[1]["id"].as_u64().context("id")?;
    {
        let db = rusqlite::Connection::open(dir.path().join("hub-data/hub.db"))?;
        db.busy_timeout(Duration::from_secs(10))?;
        let changed = db.execute(
            "UPDATE audit SET actor = 'f2e' WHERE id = ?1",
            [i64::try_from(target)?],
        )?;
        ensure!(changed == 1);
    }
    let (code, out, err) = hub.cli(&["audit", "verify"])?;
    ensure!(
        code == 1,
        "verify of an edited log exited {code}: {out} {err}"
    );
    ensure!(
        err.contains(&format!("entry {target}")) && err.trim_end().lines().count() == 1,
        "verify should name entry {target}: {err:?}"
    );
    Ok(())
}

#[test]
fn an_agent_that_ignores_its_hold_rate_is_slowed_by_the_hub_and_loses_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let hub = Hub::start_with(dir.path(), &pki, "region = \"eu-west\"")?;
    apply(
        &hub,
        &dir.path().join("p.toml"),
        "[[limits]]\nevents_per_second = 100\nover = \"hold\"\n",
    )?;
    wait_until(DEADLINE, "the hub to put policy 1 in force", || {
        hub.log().contains("New policy in force")
    })?;
    // A version 1 agent gets no policy, so nothing paces it but the hub: it
    // sends 400 events as fast as the window lets it.
    let creds = fleet_sim::issue_agents(&pki.ca_dir, dir.path(), 1)?;
    let mut load = Load::new(0, 400)?;
    load.max_version = 1;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let done = rt.block_on(async {
        let endpoint = fleet_sim::client_endpoint(1 << 20)?;
        let config = fleet_sim::client_config(&creds[0], outpost_protocols::wire::ALPN)?;
        fleet_sim::run_agent(endpoint, config, hub.addr, 0, load, started, DEADLINE).await
    })?;
    // 400 events at 100/s with one second of burst take at least 3 s; a
    // machine slower than this one only makes it longer.
    let took = done.acked.saturating_sub(done.welcome);
    println!(
        "400 events under a 100/s hold took {:.1} s",
        took.as_secs_f64()
    );
    ensure!(
        took >= Duration::from_millis(2500),
        "the hub did not hold the agent back: {took:?}"
    );
    let stats = hub
        .agent_stats(&fleet_sim::agent_id(0))?
        .context("stored")?;
    ensure!(
        stats.count == 400 && stats.distinct_seqs == 400,
        "a hold never drops: {stats:?}"
    );
    Ok(())
}
