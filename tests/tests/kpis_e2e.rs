//! The delivery KPIs end to end: a real agent takes MQTT messages from a
//! real Mosquitto and sends them to a real hub, whose MQTT sink's broker is
//! down at first. The fleet policy denies one stream; the sink's outage
//! holds the agent's acknowledgements back, so its small outbox fills and
//! refuses what comes after (`refuse-new`). Once the sink's broker is back
//! and everything drained, the books scraped from the agent's and the hub's
//! /metrics balance: what the agent received = what the hub stored + what
//! was evicted or refused + what the policy dropped (+ the backlog, 0), the
//! latency histograms counted exactly the events stored and delivered, and
//! the hub's `GET /api/v1/kpis` gives the same numbers as its Prometheus
//! endpoint. No timing is asserted.
//!
//! Every wait polls a condition until a deadline.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use outpost_tests::{free_port, wait_until, Agent, Hub, Mosquitto, Pki};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const AGENT: &str = "gw-kpi";
const DEADLINE: Duration = Duration::from_secs(120);
const TEMPS: usize = 300;
const DEBUG: usize = 100;

const POLICY: &str = r#"
[defaults]
sinks = ["store", "cloud"]

[[rules]]
name = "no debug"
streams = ["site/debug/#"]
action = "deny"
"#;

/// One HTTP/1.1 GET, the body of a 200 answer.
fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> Result<String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").context("no HTTP head")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    // The API may answer chunked; the metrics endpoints do not.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut text = String::new();
        let mut rest = body;
        while let Some((len, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(len.trim(), 16)?;
            if n == 0 {
                break;
            }
            text.push_str(tail.get(..n).context("short chunk")?);
            rest = tail.get(n + 2..).unwrap_or("");
        }
        return Ok(text);
    }
    Ok(body.to_owned())
}

/// The sum of every sample of `name` whose labels contain `labels`.
fn sum(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, r)) => (m, r),
                None => (series, ""),
            };
            (metric == name && rest.contains(labels)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// Publishes `n` messages of about 400 bytes to `topic` at QoS 1 and waits
/// until the broker acknowledged every one.
fn publish(port: u16, topic: &str, n: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut o = MqttOptions::new(
            format!("pub-{}", topic.replace('/', "-")),
            "127.0.0.1",
            port,
        );
        o.set_inflight(20);
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut el) = AsyncClient::new(o, 100);
        let topic = topic.to_owned();
        let sender = tokio::spawn(async move {
            for i in 0..n {
                let payload = format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(380));
                client
                    .publish(&topic, QoS::AtLeastOnce, false, payload)
                    .await?;
            }
            anyhow::Ok(client)
        });
        let mut acked = 0;
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while acked < n {
            let ev = tokio::time::timeout_at(deadline, el.poll())
                .await
                .context("publisher timed out")?
                .context("publisher connection")?;
            if let Event::Incoming(Packet::PubAck(_)) = ev {
                acked += 1;
            }
        }
        let _client = sender.await??;
        Ok(())
    })
}

fn agent_config(hub: &Hub, creds: &Path, broker: u16, metrics: u16) -> String {
    format!(
        r#"
[agent]
data_dir = "data"
id = "{AGENT}"

[outbox]
max_bytes = "64KiB"
eviction = "refuse-new"
commit_window = "1ms"

[mqtt]
broker = "127.0.0.1:{broker}"
client_id = "kpi-agent"
reconnect_min = "50ms"
reconnect_max = "500ms"

[[mqtt.subscribe]]
filter = "site/#"
qos = 1

[uplink]
hub = "{}"
ca = "{}"
cert = "{}"
key = "{}"
reconnect_min = "100ms"
reconnect_max = "1s"

[observability]
metrics = "127.0.0.1:{metrics}"
log = "info"
"#,
        hub.addr,
        creds.join("ca.pem").display(),
        creds.join("agent.pem").display(),
        creds.join("agent.key").display(),
    )
}

#[test]
fn the_books_balance_after_refusals_denials_and_a_sink_outage() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let creds = pki.issue_agent(AGENT)?;
    let site_dir = dir.path().join("site-broker");
    std::fs::create_dir_all(&site_dir)?;
    let site = Mosquitto::start(&site_dir)?;
    // The sink's broker: started for its port and directory, then stopped.
    let cloud_dir = dir.path().join("cloud");
    std::fs::create_dir_all(&cloud_dir)?;
    let cloud_port = {
        let mut b = Mosquitto::start(&cloud_dir)?;
        b.proc.term(Duration::from_secs(10))?;
        b.port
    };
    let sink = format!(
        r#"
[[sinks]]
id = "cloud"
kind = "mqtt"
retry_min = "100ms"
retry_max = "500ms"

[sinks.mqtt]
broker = "127.0.0.1:{cloud_port}"
client_id = "hub-cloud"
topic = "cloud/{{agent_id}}/{{stream}}"
"#
    );
    let hub = Hub::start_with_tables(dir.path(), &pki, "", &sink)?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY)?;
    let (code, out, err) = hub.cli(&["policy", "apply", &policy.display().to_string()])?;
    ensure!(code == 0, "policy apply: {out}{err}");

    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir)?;
    let metrics_port = free_port()?;
    let agent_metrics = SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let _agent = Agent::start(
        &agent_dir,
        &agent_config(&hub, &creds, site.port, metrics_port),
    )?;
    // A scrape that meets a connection reset (a busy 2-core machine) is
    // tried again rather than failing the books.
    let scrape_agent = || {
        let mut tries = 0;
        loop {
            match get(agent_metrics, "/metrics", None) {
                Ok(m) => return Ok(m),
                Err(e) if tries < 5 && e.downcast_ref::<std::io::Error>().is_some() => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    };
    wait_until(DEADLINE, "the agent to run the policy", || {
        scrape_agent().is_ok_and(|m| sum(&m, "outpost_policy_version", "") == 1.0)
    })?;

    publish(site.port, "site/line/temp", TEMPS)?;
    publish(site.port, "site/debug/trace", DEBUG)?;
    let received = (TEMPS + DEBUG) as f64;
    wait_until(DEADLINE, "the agent to receive every message", || {
        scrape_agent().is_ok_and(|m| sum(&m, "outpost_agent_events_received_total", "") == received)
    })?;
    // The outage did its work: the sink failed, the outbox refused.
    wait_until(
        DEADLINE,
        "the sink to fail and the outbox to refuse",
        || {
            let (Ok(h), Ok(a)) = (hub.metrics(), scrape_agent()) else {
                return false;
            };
            sum(&h, "outpost_hub_sink_failures_total", "sink=\"cloud\"") >= 1.0
                && sum(&a, "outpost_events_evicted_total", "reason=\"refused\"") >= 1.0
        },
    )?;

    let cloud = Mosquitto::start_on(&cloud_dir, cloud_port)?;
    // Drained and settled: nothing waits at the agent or for the sink, and
    // the books balance.
    let books = |a: &str, h: &str| {
        let agent_side = sum(a, "outpost_agent_events_received_total", "");
        let stored = sum(
            h,
            "outpost_hub_events_stored_total",
            &format!("agent=\"{AGENT}\""),
        );
        let evicted = sum(a, "outpost_events_evicted_total", "");
        let denied = sum(a, "outpost_policy_dropped_total", "");
        let hub_denied = sum(h, "outpost_hub_policy_dropped_events_total", "");
        let backlog = sum(a, "outpost_outbox_backlog_events", "");
        (agent_side, stored, evicted, denied, hub_denied, backlog)
    };
    let mut last = String::new();
    wait_until(DEADLINE, "the backlog to drain and the books to balance", || {
        let (Ok(h), Ok(a)) = (hub.metrics(), scrape_agent()) else {
            return false;
        };
        let (received, stored, evicted, denied, hub_denied, backlog) = books(&a, &h);
        last = format!(
            "received {received}, stored {stored}, evicted {evicted}, denied {denied}, denied at the hub {hub_denied}, backlog {backlog}, pending {}",
            sum(&h, "outpost_hub_sink_pending_events", "")
        );
        backlog == 0.0
            && sum(&h, "outpost_hub_sink_pending_events", "") == 0.0
            && received == stored + evicted + denied + hub_denied
    })
    .with_context(|| last.clone())?;

    let (h, a) = (hub.metrics()?, scrape_agent()?);
    let (_, stored, evicted, denied, _, _) = books(&a, &h);
    ensure!(
        denied == DEBUG as f64
            && sum(&a, "outpost_policy_dropped_total", "reason=\"denied\"") == DEBUG as f64,
        "the deny rule should drop every debug message at the agent: {last}"
    );
    ensure!(
        evicted >= 1.0 && stored >= 1.0 && stored + evicted == TEMPS as f64,
        "{last}"
    );
    // Every stored event was timed once from the edge to the hub's commit,
    // and from that commit to the sink, which got each once.
    let timed = sum(&a, "outpost_agent_ingest_latency_seconds_count", "");
    ensure!(
        timed == stored,
        "ingest latency counted {timed} of {stored}"
    );
    let delivered = sum(
        &h,
        "outpost_hub_sink_delivered_events_total",
        "sink=\"cloud\"",
    );
    let sink_timed = sum(
        &h,
        "outpost_hub_sink_latency_seconds_count",
        "sink=\"cloud\"",
    );
    ensure!(
        delivered == stored && sink_timed == stored,
        "delivered {delivered}, sink latency counted {sink_timed}, stored {stored}"
    );
    ensure!(sum(&a, "outpost_agent_start_time_seconds", "") > 0.0, "{a}");
    ensure!(sum(&h, "outpost_hub_start_time_seconds", "") > 0.0, "{h}");
    wait_until(DEADLINE, "the backlog's age to read 0", || {
        scrape_agent().is_ok_and(|m| sum(&m, "outpost_agent_backlog_age_seconds", "") == 0.0)
    })?;

    // The JSON summary says what Prometheus says.
    let api: SocketAddr = hub.api_url()?.trim_start_matches("http://").parse()?;
    let (code, out, err) = hub.cli(&["token", "create", "--name", "dash", "--role", "viewer"])?;
    ensure!(code == 0, "token create: {err}");
    let token = out
        .lines()
        .next()
        .context("no token printed")?
        .trim()
        .to_owned();
    let kpis: serde_json::Value = serde_json::from_str(&get(api, "/api/v1/kpis", Some(&token))?)?;
    ensure!(
        kpis["process"]["agents"][AGENT]["events_stored"] == stored as u64
            && kpis["process"]["events_stored"] == stored as u64
            && kpis["sinks"]["cloud"]["delivered_events"] == delivered as u64
            && kpis["sinks"]["cloud"]["latency"]["count"] == sink_timed as u64
            && kpis["sinks"]["cloud"]["pending_events"] == 0,
        "{kpis:#}"
    );
    drop(cloud);
    Ok(())
}
