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
    agent_config_for(AGENT, "depot-17", broker, hub, creds)
}

/// The config of agent `id` at site `site`, forwarding all of `plant/#`.
fn agent_config_for(id: &str, site: &str, broker: u16, hub: &Hub, creds: &Path) -> String {
    format!(
        r#"
[agent]
data_dir = "data"
id = "{id}"
labels = {{ site = "{site}", region = "eu-west" }}

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
client_id = "policy-e2e-{id}"
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
    // What the agent shows is its part as the hub sent it, its key redacted.
    let text = shown["text"].as_str().context("text")?;
    for line in text.lines().filter(|l| l.contains("hash_key")) {
        ensure!(
            line.contains(outpost_protocols::policy::KEY_REDACTED),
            "a key shown: {line}"
        );
    }
    ensure!(
        text.contains("badges") && text.contains(outpost_protocols::policy::KEY_REDACTED),
        "{shown}"
    );
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

/// Two sites whose badge readings are pseudonymised by rules of the same
/// name, and a rule only site B has.
const SCOPED: &str = r#"
description = "badges pseudonymised per site"

[[rules]]
name = "badges"
agents = { site = "a" }
streams = ["plant/badge"]
hash = ["/employee"]
drop = ["/photo"]

[[rules]]
name = "badges"
agents = { site = "b" }
streams = ["plant/badge"]
hash = ["/employee"]
drop = ["/photo"]

[[rules]]
name = "site b keeps its debug dumps"
agents = { site = "b" }
streams = ["plant/+/debug"]
action = "deny"
"#;

/// The `hash_key` values of a scoped document.
fn keys_in(scoped: &str) -> Vec<String> {
    scoped
        .lines()
        .filter_map(|l| l.trim().strip_prefix("hash_key = \""))
        .map(|l| l.trim_end_matches('"').to_owned())
        .collect()
}

/// The pseudonyms of `plant/badge` readings agent `id` sent, once hashed.
fn pseudonyms(hub: &Hub, id: &str) -> Result<std::collections::BTreeSet<String>> {
    Ok(stored(hub, "plant/badge")?
        .into_iter()
        .filter(|e| e["agent_id"] == id)
        .filter_map(|e| e["value"]["employee"].as_str().map(str::to_owned))
        .filter(|h| h.starts_with("hmac-sha256:"))
        .collect())
}

fn mode(p: &Path) -> Result<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    Ok(std::fs::metadata(p)
        .with_context(|| p.display().to_string())?
        .permissions()
        .mode()
        & 0o777)
}

#[test]
fn each_agent_gets_only_its_rules_and_keys_and_pseudonyms_agree_only_within_a_rules_scope(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    // The files below are 0600 although this umask lets others read what
    // is made with the default mode.
    let probe = dir.path().join("umask-probe");
    std::fs::write(&probe, "")?;
    ensure!(
        mode(&probe)? & 0o044 != 0,
        "run this test with a umask such as 022 that lets group or others read new files"
    );
    let pki = Pki::new(dir.path())?;
    let hub = Hub::start_with(dir.path(), &pki, "region = \"eu-west\"")?;
    let broker = Mosquitto::start(dir.path())?;
    let mut agents = Vec::new();
    for (id, site) in [("gw-a1", "a"), ("gw-a2", "a"), ("gw-b", "b")] {
        let creds = pki.issue_agent(id)?;
        let agent_dir = dir.path().join(id);
        std::fs::create_dir_all(&agent_dir)?;
        let config = agent_config_for(id, site, broker.port, &hub, &creds);
        agents.push((id, agent_dir.clone(), Agent::start(&agent_dir, &config)?));
    }
    let plant = Plant::start(broker.port);

    // The hub made its key on first start, 0600, and audited it.
    let key_file = dir.path().join("hub-data").join("hashing.key");
    ensure!(
        mode(&key_file)? == 0o600,
        "hashing.key is {:o}",
        mode(&key_file)?
    );
    let master =
        outpost_protocols::policy::HashingKey::from_hex(&std::fs::read_to_string(&key_file)?)
            .context("hashing.key holds 64 hex digits")?;
    let (code, audit, err) = hub.cli(&["audit", "list", "--json"])?;
    ensure!(code == 0, "audit list: {err}");
    ensure!(audit.contains("hashing.key_created"), "{audit}");
    ensure!(
        !audit.contains(&master.to_hex()),
        "the key in the audit log"
    );

    // A policy with a key in it is refused, naming the line and what to do.
    let legacy = dir.path().join("legacy.toml");
    std::fs::write(
        &legacy,
        format!(
            "description = \"old\"\n\n[hashing]\nkey = \"e2e-test-key-of-some-length\"\n{SCOPED}"
        ),
    )?;
    let (code, _, err) = hub.cli(&["policy", "apply", path(&legacy)?, "--actor", "e2e"])?;
    ensure!(code == 2, "policy apply of a key exited {code}: {err}");
    ensure!(
        err.lines().count() == 1
            && err.contains("line 3: [hashing] key")
            && err.contains("[policy] hashing_key"),
        "{err}"
    );

    let v = apply(&hub, &dir.path().join("scoped.toml"), SCOPED)?;
    wait_until(DEADLINE, "every agent to run the policy", || {
        hub.fleet()
            .map(|f| {
                f.iter()
                    .filter(|a| a["policy_version"].as_u64() == Some(v))
                    .count()
                    == 3
            })
            .unwrap_or(false)
    })?;
    wait_until(DEADLINE, "pseudonymised badges from every agent", || {
        ["gw-a1", "gw-a2", "gw-b"]
            .iter()
            .all(|id| pseudonyms(&hub, id).map(|p| !p.is_empty()).unwrap_or(false))
    })?;
    let (a1, a2, b) = (
        pseudonyms(&hub, "gw-a1")?,
        pseudonyms(&hub, "gw-a2")?,
        pseudonyms(&hub, "gw-b")?,
    );
    ensure!(
        a1.len() == 1 && a1 == a2,
        "one scope, one pseudonym: {a1:?} {a2:?}"
    );
    ensure!(
        b.len() == 1 && b != a1,
        "another scope, another pseudonym: {a1:?} {b:?}"
    );

    // The hub hashes with the same key as the agents of the rule's scope.
    let fleet = outpost_protocols::policy::Policy::parse(
        SCOPED,
        &outpost_protocols::policy::Catalog::trusting(),
    )?
    .with_hashing_key(master.clone());
    let site = |s: &str| BTreeMap::from([("site".to_owned(), s.to_owned())]);
    let mut at_hub = outpost_protocols::policy::Enforcer::new(Arc::new(
        fleet.compile(&site("a"), &outpost_protocols::policy::Catalog::trusting()),
    ));
    let mut raw = outpost_protocols::EventBody {
        stream: outpost_protocols::StreamName::parse("plant/badge")?,
        ts: outpost_protocols::Timestamp(0),
        value: Value::Json(outpost_protocols::JsonText::parse(r#"{"employee":4711}"#)?),
        quality: outpost_protocols::event::Quality::Good,
        attrs: BTreeMap::new(),
    };
    let _ = at_hub.apply(&mut raw, outpost_protocols::policy::Stage::Ingest);
    let Value::Json(j) = &raw.value else {
        anyhow::bail!("not JSON")
    };
    ensure!(
        a1.contains(j.to_value()["employee"].as_str().unwrap_or_default()),
        "the hub's hash {j:?} is not site a's {a1:?}"
    );

    // What each agent received, saved and shows: its own rules and keys,
    // none of another scope's, never the hub's key.
    let key_a = keys_in(&fleet.scoped_text(SCOPED, &site("a"))?);
    let key_b = keys_in(&fleet.scoped_text(SCOPED, &site("b"))?);
    ensure!(key_a.len() == 1 && key_b.len() == 1 && key_a != key_b);
    for (id, agent_dir, agent) in &agents {
        let (mine, theirs) = if id.starts_with("gw-a") {
            (&key_a[0], &key_b[0])
        } else {
            (&key_b[0], &key_a[0])
        };
        let file = agent_dir.join("data").join("policy.json");
        ensure!(
            mode(&file)? == 0o600,
            "{id}: policy.json is {:o}",
            mode(&file)?
        );
        let saved = std::fs::read_to_string(&file)?;
        ensure!(
            saved.contains(mine.as_str()),
            "{id} has not its key: {saved}"
        );
        ensure!(
            !saved.contains(theirs.as_str()),
            "{id} has another scope's key: {saved}"
        );
        ensure!(!saved.contains(&master.to_hex()), "{id} has the hub's key");
        ensure!(
            saved.contains("site b keeps") == (*id == "gw-b"),
            "{id} has another site's rule: {saved}"
        );
        for json in [true, false] {
            let mut args = vec!["policy", "show", "--config", path(&agent.config)?];
            if json {
                args.push("--json");
            }
            let (code, out, err) =
                outpost_tests::run_cli(&outpost_tests::bin("outpost-agent")?, &args)?;
            ensure!(code == 0, "{id}: policy show: {err}");
            for k in [mine, theirs, &master.to_hex()] {
                ensure!(
                    !out.contains(k.as_str()),
                    "{id}: policy show prints a key: {out}"
                );
            }
            ensure!(out.contains("badges"), "{id}: {out}");
        }
    }
    for json in [true, false] {
        let mut args = vec!["policy", "show"];
        if json {
            args.push("--json");
        }
        let (code, out, err) = hub.cli(&args)?;
        ensure!(code == 0, "hub policy show: {err}");
        for k in [&key_a[0], &key_b[0], &master.to_hex()] {
            ensure!(
                !out.contains(k.as_str()),
                "hub policy show prints a key: {out}"
            );
        }
    }

    // Site B's gateway moves to site A: it gets site A's part (and key) in
    // place of its own, and its pseudonyms from then on are site A's.
    let (code, _, err) = hub.cli(&["agent", "label", "gw-b", "site=a", "--actor", "e2e"])?;
    ensure!(code == 0, "agent label: {err}");
    let b_file = agents[2].1.join("data").join("policy.json");
    wait_until(DEADLINE, "gw-b to get site a's part", || {
        std::fs::read_to_string(&b_file)
            .map(|s| s.contains(key_a[0].as_str()) && !s.contains(key_b[0].as_str()))
            .unwrap_or(false)
    })?;
    wait_until(DEADLINE, "gw-b to pseudonymise as site a", || {
        pseudonyms(&hub, "gw-b")
            .map(|p| p.is_superset(&a1))
            .unwrap_or(false)
    })?;
    ensure!(
        mode(&b_file)? == 0o600,
        "policy.json rewritten as {:o}",
        mode(&b_file)?
    );
    drop(plant);
    Ok(())
}
