//! Faults of the agent's peers, with the real binaries, a real Mosquitto and
//! the real hub: a broker link that is cut every few seconds, and payloads at
//! and one byte over every size limit on the data path. Each test ends by
//! comparing what the sources produced with what the hub stored.
//!
//! Every wait polls a condition until a deadline. The fixed sleeps in the
//! flapping test are the time between two cuts, which is what it is about.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context as _, Result};
use outpost_protocols::{EventBody, Quality, StreamName, Timestamp, Value};
use outpost_tests::tcp_proxy::TcpProxy;
use outpost_tests::{
    agent_outbox_stats, free_port, wait_until, Agent, Devsim, Hub, Mosquitto, Pki,
};

/// How long any one condition may take on a loaded 2-core machine running
/// debug builds.
const DEADLINE: Duration = Duration::from_secs(60);

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
}

fn log_count(dir: &Path, needle: &str) -> usize {
    log(dir).matches(needle).count()
}

/// The agent's metrics exposition, fetched from its endpoint.
fn scrape(addr: SocketAddr) -> Result<String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The value of one sample (`name` with its labels, as exposed), 0 when the
/// metric has not appeared yet (a labelled metric appears at first use).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// The agent's config: an uplink to `hub` with the credentials in `creds`, a
/// metrics endpoint on `metrics`, and `sources` (`[mqtt]`, Modbus devices,
/// bridges) appended.
fn agent_config(hub: &Hub, creds: &Path, metrics: u16, sources: &str) -> String {
    format!(
        r#"
[agent]
data_dir = "data"

[uplink]
hub = "{}"
ca = "{}"
cert = "{}"
key = "{}"
reconnect_min = "100ms"
reconnect_max = "1s"

[outbox]
commit_window = "1ms"

[observability]
metrics = "127.0.0.1:{metrics}"
log = "info"
{sources}
"#,
        hub.addr,
        creds.join("ca.pem").display(),
        creds.join("agent.pem").display(),
        creds.join("agent.key").display(),
    )
}

/// One site: a hub, a broker, and an agent in `site/` whose certificate
/// names `agent_id`.
struct Site {
    dir: tempfile::TempDir,
    hub: Hub,
    broker: Mosquitto,
    creds: PathBuf,
    agent_id: String,
    metrics: u16,
}

impl Site {
    fn new(agent_id: &str) -> Result<Site> {
        let dir = tempfile::tempdir()?;
        let pki = Pki::new(dir.path())?;
        let creds = pki.issue_agent(agent_id)?;
        let hub = Hub::start(dir.path(), &pki)?;
        let broker = Mosquitto::start(dir.path())?;
        std::fs::create_dir_all(dir.path().join("site"))?;
        Ok(Site {
            dir,
            hub,
            broker,
            creds,
            agent_id: agent_id.to_owned(),
            metrics: free_port()?,
        })
    }

    fn site(&self) -> PathBuf {
        self.dir.path().join("site")
    }

    fn config(&self, sources: &str) -> String {
        agent_config(&self.hub, &self.creds, self.metrics, sources)
    }

    fn start_agent(&self, sources: &str) -> Result<Agent> {
        Agent::start(&self.site(), &self.config(sources))
    }

    fn metrics_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.metrics))
    }

    /// The hub's events of `pattern`, in seq order.
    fn hub_events(&self, pattern: &str) -> Result<Vec<serde_json::Value>> {
        self.hub.events_of(pattern, 10_000_000)
    }

    /// Stops the agent, restarts it with the uplink alone, waits until its
    /// outbox is empty and the hub holds every seq it assigned, and checks
    /// that each is stored exactly once. Returns how many there were.
    fn drain_and_check_every_seq(&self, agent: &mut Agent) -> Result<u64> {
        let status = agent.proc.term(Duration::from_secs(30))?;
        ensure!(status.success(), "agent exit status {status}");
        std::fs::write(&agent.config, self.config(""))?;
        let mut agent = Agent::start_file(&agent.config)?;
        let mut next_seq = 0;
        wait_until(DEADLINE, "the outbox to drain to the hub", || {
            let Ok(s) = agent_outbox_stats(&agent.config) else {
                return false;
            };
            next_seq = s["next_seq"].as_u64().unwrap_or(0);
            s["events"] == 0
                && self
                    .hub
                    .agent_stats(&self.agent_id)
                    .ok()
                    .flatten()
                    .is_some_and(|h| h.max_seq == Some(next_seq - 1))
        })?;
        let stats = self.hub.agent_stats(&self.agent_id)?.context("stored")?;
        ensure!(
            stats.count == next_seq - 1
                && stats.distinct_seqs == stats.count
                && stats.min_seq == Some(1),
            "every accepted seq exactly once at the hub: {stats:?}, the agent assigned 1..{}",
            next_seq - 1
        );
        agent.proc.term(Duration::from_secs(30))?;
        Ok(stats.count)
    }
}

/// The numbers in the payloads of `events`, with how often each was stored.
fn numbers(events: &[serde_json::Value]) -> Result<BTreeMap<u64, usize>> {
    let mut m = BTreeMap::new();
    for e in events {
        let n = e["value"]
            .as_u64()
            .or_else(|| e["value"].as_str().and_then(|s| s.parse().ok()))
            .with_context(|| format!("no number in {e}"))?;
        *m.entry(n).or_insert(0) += 1;
    }
    Ok(m)
}

/// A deterministic stream of pseudo-random numbers (xorshift), so a failing
/// run can be repeated with the seed it prints.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn seed() -> Result<u64> {
    Ok(SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64 | 1)
}

// ---------------------------------------------------------------------------
// A broker link cut every few seconds.

/// The subscriber's and the bridge publisher's client ids, as an MQTT
/// CONNECT carries them (a 16-bit length, then the bytes: MQTT 3.1.1
/// section 1.5.3), so a cut connection can be told apart.
const SUBSCRIBER_ID: &str = "flap-agent";

fn connect_id(id: &str) -> Vec<u8> {
    let mut v = (id.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(id.as_bytes());
    v
}

/// A device whose register ramps, so every poll has a new value to bridge.
const RAMP: &str = "tick = \"20ms\"\n\n[[points]]\ntable = \"holding\"\naddress = 0\ntype = \"u16\"\nwave = \"ramp\"\nmin = 0\nmax = 60000\nperiod = \"60s\"\n";

fn flapping_sources(broker: SocketAddr, device: SocketAddr) -> String {
    format!(
        r#"
[mqtt]
broker = "{broker}"
client_id = "{SUBSCRIBER_ID}"
keep_alive = "5s"
reconnect_min = "50ms"
reconnect_max = "500ms"

[[mqtt.subscribe]]
filter = "q1/#"
qos = 1

[[mqtt.subscribe]]
filter = "q2/#"
qos = 2

[[modbus.devices]]
name = "plc"
address = "{device}"
poll = "100ms"
timeout = "300ms"

[[modbus.devices.tags]]
name = "r0"
table = "holding"
address = 0
type = "u16"

[[bridges]]
from = "modbus:plc/r0"
to = "mqtt:site/{{device}}/{{tag}}"
format = "raw"
qos = 1
"#
    )
}

/// What the steady publisher did.
struct Published {
    /// Messages `0..n` were published to `q1/a` at QoS 1 and to `q2/a` at
    /// QoS 2, and the broker acknowledged every one.
    n: u64,
}

/// Messages of each QoS the steady publisher sends every 20 ms: enough that
/// a cut finds messages on their way (250 a second of each).
const BURST: usize = 5;

/// Publishes numbered messages straight to the broker, to `q1/a` at QoS 1
/// and `q2/a` at QoS 2, [`BURST`] of each every 20 ms, until `stop`; then waits
/// until the broker has acknowledged every one (PUBACK, PUBCOMP).
fn steady_publisher(port: u16, stop: Arc<AtomicBool>) -> Result<Published> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut o = MqttOptions::new("flap-pub", "127.0.0.1", port);
        o.set_inflight(100);
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut el) = AsyncClient::new(o, 1000);
        let sent = Arc::new(AtomicU64::new(0));
        let sender = {
            let sent = sent.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..BURST {
                        client
                            .publish("q1/a", QoS::AtLeastOnce, false, n.to_string())
                            .await?;
                        client
                            .publish("q2/a", QoS::ExactlyOnce, false, n.to_string())
                            .await?;
                        n += 1;
                    }
                    sent.store(n, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                anyhow::Ok((client, n))
            })
        };
        let (mut acks, mut comps) = (0u64, 0u64);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            if sender.is_finished() {
                let n = sent.load(Ordering::Relaxed);
                if acks >= n && comps >= n {
                    break;
                }
            }
            let ev = tokio::time::timeout_at(deadline, el.poll())
                .await
                .context("the publisher's broker acknowledgements timed out")?
                .context("the publisher's connection to the broker")?;
            match ev {
                Event::Incoming(Packet::PubAck(_)) => acks += 1,
                Event::Incoming(Packet::PubComp(_)) => comps += 1,
                _ => {}
            }
        }
        let (client, n) = sender.await??;
        let _ = client.disconnect().await;
        Ok(Published { n })
    })
}

/// Publishes one QoS 1 message straight to the broker and waits for its
/// PUBACK.
fn publish_one(port: u16, topic: &str, payload: &str) -> Result<()> {
    publish_all(
        port,
        "probe-pub",
        rumqttc::QoS::AtLeastOnce,
        &[(topic.to_owned(), payload.as_bytes().to_vec())],
    )
}

/// Publishes `messages` in order at `qos`, each after the broker
/// acknowledged the one before, on a client that allows packets of 16 MiB.
fn publish_all(
    port: u16,
    client_id: &str,
    qos: rumqttc::QoS,
    messages: &[(String, Vec<u8>)],
) -> Result<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_max_packet_size(16 << 20, 16 << 20);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = AsyncClient::new(o, 10);
        let deadline = tokio::time::Instant::now() + DEADLINE;
        for (topic, payload) in messages {
            client
                .publish(topic.as_str(), qos, false, payload.clone())
                .await?;
            loop {
                let ev = tokio::time::timeout_at(deadline, el.poll())
                    .await
                    .context("publisher timed out")??;
                match (qos, ev) {
                    (rumqttc::QoS::AtLeastOnce, Event::Incoming(Packet::PubAck(_)))
                    | (rumqttc::QoS::ExactlyOnce, Event::Incoming(Packet::PubComp(_))) => break,
                    _ => {}
                }
            }
        }
        let _ = client.disconnect().await;
        // Drive the DISCONNECT out.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while el.poll().await.is_ok() {}
        })
        .await;
        Ok(())
    })
}

/// Counts what arrives on `filter` straight from the broker until `stop`.
fn watcher(port: u16, filter: &str, seen: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let mut o = MqttOptions::new("flap-watch", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut conn) = Client::new(o, 100);
    if client.subscribe(filter, QoS::AtLeastOnce).is_err() {
        return;
    }
    while !stop.load(Ordering::Relaxed) {
        match conn.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(Event::Incoming(Packet::Publish(_)))) => {
                seen.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(_)) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let _ = client.disconnect();
}

#[test]
fn a_broker_link_cut_every_few_seconds_loses_nothing_and_the_agent_reconnects_each_time(
) -> Result<()> {
    // The long form: OUTPOST_FLAP_CUTS=100.
    let rounds: usize = std::env::var("OUTPOST_FLAP_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let seed = seed()?;
    println!("flapping broker link: {rounds} cuts, seed {seed}");
    let mut rng = Rng(seed);
    let s = Site::new("gw-flap")?;
    let sim = Devsim::start(s.dir.path(), RAMP, None)?;
    let proxy = TcpProxy::start(SocketAddr::from(([127, 0, 0, 1], s.broker.port)))?;
    let mut agent = s.start_agent(&flapping_sources(proxy.addr(), sim.addr))?;
    let site = s.site();
    let connected = || log_count(&site, "Connected to the site broker.");
    wait_until(DEADLINE, "the agent to reach the broker", || {
        connected() >= 1
    })?;
    // The subscriptions are in place once a message published after them
    // arrives; only then does the broker queue for the agent.
    let mut probes = 0;
    wait_until(DEADLINE, "a probe message at the hub", || {
        probes += 1;
        if publish_one(s.broker.port, "q1/probe", &probes.to_string()).is_err() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
        s.hub_events("q1/probe").is_ok_and(|e| !e.is_empty())
    })?;

    let stop = Arc::new(AtomicBool::new(false));
    let bridged = Arc::new(AtomicU64::new(0));
    let watch = {
        let (seen, stop, port) = (bridged.clone(), stop.clone(), s.broker.port);
        std::thread::spawn(move || watcher(port, "site/#", seen, stop))
    };
    let stop_pub = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (stop, port) = (stop_pub.clone(), s.broker.port);
        std::thread::spawn(move || steady_publisher(port, stop))
    };

    let subscriber = connect_id(SUBSCRIBER_ID);
    let bridge = connect_id(&format!("{SUBSCRIBER_ID}-bridge"));
    let (mut subscriber_cuts, mut bridge_cuts, mut bytes_cut) = (0usize, 0usize, 0u64);
    for round in 0..rounds {
        // Each cut finds a session that is up again: the agent reconnected
        // after the previous one.
        wait_until(DEADLINE, "the agent to reconnect to the broker", || {
            connected() > round
        })
        .with_context(|| log(&site))?;
        std::thread::sleep(Duration::from_millis(2000 + rng.next() % 1000));
        let cuts = proxy.cut_all();
        let sub = cuts.iter().filter(|c| c.client_sent(&subscriber)).count();
        ensure!(sub == 1, "round {round}: {sub} subscriber connections cut");
        subscriber_cuts += sub;
        bridge_cuts += cuts.iter().filter(|c| c.client_sent(&bridge)).count();
        bytes_cut += cuts.iter().map(|c| c.to_client).sum::<u64>();
        println!(
            "cut {round}: {} connections ({} bytes had reached the agent on its session)",
            cuts.len(),
            cuts.iter()
                .find(|c| c.client_sent(&subscriber))
                .map_or(0, |c| c.to_client)
        );
    }
    let bridged_at_last_cut = bridged.load(Ordering::Relaxed);
    stop_pub.store(true, Ordering::Relaxed);
    let published = publisher
        .join()
        .map_err(|_| anyhow::anyhow!("publisher panicked"))??;
    let n = published.n;
    ensure!(n > 0, "nothing was published");

    // Everything lands once the link holds.
    wait_until(
        DEADLINE,
        "the agent to reconnect after the last cut",
        || connected() > rounds,
    )?;
    wait_until(DEADLINE, "every message at the hub", || {
        let (Ok(q1), Ok(q2)) = (s.hub_events("q1/a"), s.hub_events("q2/a")) else {
            return false;
        };
        let (Ok(q1), Ok(q2)) = (numbers(&q1), numbers(&q2)) else {
            return false;
        };
        (0..n).all(|i| q1.contains_key(&i) && q2.contains_key(&i))
    })
    .with_context(|| log(&site))?;
    // The bridge publisher came back too: bridged values reach the broker
    // after the last cut.
    wait_until(DEADLINE, "bridged values after the last cut", || {
        bridged.load(Ordering::Relaxed) >= bridged_at_last_cut + 5
    })
    .with_context(|| log(&site))?;
    stop.store(true, Ordering::Relaxed);
    let _ = watch.join();

    // The agent saw each cut and reconnected after each, and nothing else.
    let lost = log_count(&site, "MQTT connection lost; reconnecting.");
    let connects = connected();
    ensure!(
        lost == subscriber_cuts && connects == subscriber_cuts + 1,
        "{subscriber_cuts} cuts of the agent's session, {lost} losses and {connects} connections logged:\n{}",
        log(&site)
    );
    let m = scrape(s.metrics_addr())?;
    ensure!(
        metric(&m, "outpost_mqtt_connected") == 1.0,
        "not connected at the end"
    );
    let dup2 = metric(&m, "outpost_mqtt_qos2_duplicates_total");
    let redelivered1 = metric(&m, "outpost_mqtt_qos1_redelivered_total");
    let bridge_dropped = metric(&m, "outpost_bridge_dropped_total");
    ensure!(agent.proc.is_running(), "the agent exited:\n{}", log(&site));

    let total = s.drain_and_check_every_seq(&mut agent)?;
    let q1 = numbers(&s.hub_events("q1/a")?)?;
    let q2 = numbers(&s.hub_events("q2/a")?)?;
    let missing1: Vec<u64> = (0..n).filter(|i| !q1.contains_key(i)).collect();
    let missing2: Vec<u64> = (0..n).filter(|i| !q2.contains_key(i)).collect();
    let twice2: Vec<_> = q2.iter().filter(|(_, c)| **c > 1).collect();
    let extra: Vec<_> = q1.keys().chain(q2.keys()).filter(|i| **i >= n).collect();
    ensure!(missing1.is_empty(), "QoS 1 lost {missing1:?}");
    ensure!(missing2.is_empty(), "QoS 2 lost {missing2:?}");
    ensure!(twice2.is_empty(), "QoS 2 stored more than once: {twice2:?}");
    ensure!(extra.is_empty(), "numbers never published: {extra:?}");
    let dup1: usize = q1.values().map(|c| c - 1).sum();
    let modbus = s.hub_events("plc/#")?.len();
    ensure!(modbus > 0, "no Modbus samples reached the hub");
    println!(
        "{subscriber_cuts} cuts of the agent's session ({bridge_cuts} of its bridge publisher, {bytes_cut} bytes had reached the agent on cut connections): \
         {total} events exactly once at the hub; {n} QoS 2 once each ({dup2} redeliveries recognised), \
         {n} QoS 1 with {dup1} stored twice ({redelivered1} marked DUP), {modbus} Modbus samples; \
         {} bridged values seen, {bridge_dropped} dropped while the broker was away",
        bridged.load(Ordering::Relaxed)
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Payloads at and over every size limit.

/// `len` bytes of printable ASCII that is not JSON, different at every
/// position that matters, so a truncated or shifted copy does not compare
/// equal.
fn text_payload(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut v: Vec<u8> = (0..len).map(|_| b'a' + (rng.next() % 26) as u8).collect();
    if let Some(first) = v.first_mut() {
        // "x..." never parses as JSON.
        *first = b'x';
    }
    v
}

/// The one event of `stream` at the hub.
fn one_at_hub(events: &[serde_json::Value], stream: &str) -> Result<serde_json::Value> {
    let of: Vec<_> = events.iter().filter(|e| e["stream"] == stream).collect();
    ensure!(of.len() == 1, "{} events of {stream} at the hub", of.len());
    Ok(of[0].clone())
}

fn mqtt_sources(port: u16, extra: &str) -> String {
    format!(
        r#"
[mqtt]
broker = "127.0.0.1:{port}"
client_id = "limits-agent"
reconnect_min = "50ms"
reconnect_max = "500ms"
{extra}

[[mqtt.subscribe]]
filter = "lim/#"
qos = 2
"#
    )
}

/// Starts the agent with an MQTT source on `lim/#` and waits until a probe
/// published after its subscription arrives at the hub, so that what is
/// published next is queued for it.
fn start_mqtt_agent(s: &Site, extra: &str) -> Result<Agent> {
    let agent = s.start_agent(&mqtt_sources(s.broker.port, extra))?;
    let site = s.site();
    wait_until(DEADLINE, "the agent to reach the broker", || {
        log_count(&site, "Connected to the site broker.") >= 1
    })?;
    let mut probes = 0;
    wait_until(DEADLINE, "a probe at the hub", || {
        probes += 1;
        if publish_one(s.broker.port, "lim/probe", &probes.to_string()).is_err() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
        s.hub_events("lim/probe").is_ok_and(|e| !e.is_empty())
    })?;
    Ok(agent)
}

/// `outpost-agent check` on `config`: (exit code, stderr).
fn check(dir: &Path, config: &str) -> Result<(i32, String)> {
    let path = dir.join("check.toml");
    std::fs::write(&path, config)?;
    let (code, _, err) = outpost_tests::run_cli(
        &outpost_tests::bin("outpost-agent")?,
        &["check", "--config", path.to_str().context("path")?],
    )?;
    Ok((code, err))
}

/// Checks that `check` refuses `config` with exit status 2 and one line
/// that names `key` and says `what`.
fn refused_at_check(dir: &Path, config: &str, key: &str, what: &str) -> Result<()> {
    let (code, err) = check(dir, config)?;
    ensure!(
        code == 2 && err.lines().count() == 1 && err.contains(key) && err.contains(what),
        "expected one line naming {key} ({what}) and exit 2, got {code}: {err}"
    );
    ensure!(!err.contains("panicked"), "{err}");
    Ok(())
}

#[test]
fn a_payload_at_max_payload_and_a_topic_of_65535_bytes_arrive_intact_and_one_byte_over_max_payload_is_recorded_as_bad_quality(
) -> Result<()> {
    // The default max_payload, 256 KiB.
    const LIMIT: usize = 256 * 1024;
    let s = Site::new("gw-limits")?;
    let mut agent = start_mqtt_agent(&s, "")?;
    let at = text_payload(LIMIT, 1);
    let over = text_payload(LIMIT + 1, 2);
    // MQTT gives a topic a 16-bit length (3.1.1 section 1.5.3): 65535 bytes
    // is the longest there is, and one byte more cannot be encoded.
    let long_topic = format!("lim/{}", "t".repeat(65535 - 4));
    publish_all(
        s.broker.port,
        "limits-pub",
        rumqttc::QoS::ExactlyOnce,
        &[
            ("lim/before".into(), b"1".to_vec()),
            ("lim/at".into(), at.clone()),
            ("lim/over".into(), over),
            (long_topic.clone(), b"2".to_vec()),
            ("lim/after".into(), b"3".to_vec()),
        ],
    )?;
    wait_until(DEADLINE, "the message after them at the hub", || {
        s.hub_events("lim/after").is_ok_and(|e| !e.is_empty())
    })
    .with_context(|| log(&s.site()))?;
    let events = s.hub_events("lim/#")?;
    let order: Vec<String> = events
        .iter()
        .filter_map(|e| e["stream"].as_str())
        .filter(|t| *t != "lim/probe")
        .map(|t| {
            if t.len() > 64 {
                "<long topic>".into()
            } else {
                t.to_owned()
            }
        })
        .collect();
    ensure!(
        order
            == [
                "lim/before",
                "lim/at",
                "lim/over",
                "<long topic>",
                "lim/after"
            ],
        "stored in this order: {order:?}"
    );
    // At the limit: every byte, good quality.
    let e = one_at_hub(&events, "lim/at")?;
    ensure!(
        e["value"].as_str().map(str::as_bytes) == Some(&at[..]),
        "the payload at max_payload changed on the way ({} bytes arrived)",
        e["value"].as_str().map_or(0, str::len)
    );
    ensure!(e["quality"]["status"] == "good", "{}", e["quality"]);
    // One byte over: recorded on its topic, bad quality naming both sizes,
    // without its bytes.
    let e = one_at_hub(&events, "lim/over")?;
    ensure!(
        e["value"] == serde_json::json!({"base64": ""})
            && e["quality"]
                == serde_json::json!({"status": "bad", "reason": format!("payload of {} bytes exceeds max_payload {LIMIT}", LIMIT + 1)}),
        "{e}"
    );
    let e = one_at_hub(&events, &long_topic)?;
    ensure!(e["value"] == 2 && e["quality"]["status"] == "good", "{e}");
    // Counted once, logged once.
    let m = scrape(s.metrics_addr())?;
    ensure!(metric(&m, "outpost_mqtt_oversize_total") == 1.0, "{m}");
    ensure!(log_count(&s.site(), "Payload over max_payload") == 1);
    ensure!(agent.proc.is_running());
    s.drain_and_check_every_seq(&mut agent)?;

    // The key's own range: 256 MiB is accepted, one byte more is refused
    // when the config is read, naming the key.
    let config = |size: &str| {
        s.config(&mqtt_sources(
            s.broker.port,
            &format!("max_payload = \"{size}\""),
        ))
    };
    let (code, err) = check(&s.site(), &config("256MiB"))?;
    ensure!(code == 0, "256MiB refused: {err}");
    refused_at_check(&s.site(), &config("268435457"), "mqtt.max_payload", "")?;
    println!(
        "max_payload {LIMIT}: {LIMIT} bytes arrived intact, {} recorded as bad quality; a 65535-byte topic arrived",
        LIMIT + 1
    );
    Ok(())
}

/// The encoded size of the event the agent makes of a text payload of
/// `len` bytes on `stream` received at `ts` (a String value, good quality,
/// no attributes).
fn body_len(stream: &str, ts: i64, len: usize) -> Result<usize> {
    Ok(EventBody {
        stream: StreamName::parse(stream)?,
        ts: Timestamp(ts),
        value: Value::String("x".repeat(len)),
        quality: Quality::Good,
        attrs: BTreeMap::new(),
    }
    .encode()
    .len())
}

fn now_ns() -> Result<i64> {
    Ok(SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as i64)
}

#[test]
fn an_event_at_the_uplinks_size_limit_arrives_intact_and_one_byte_over_is_recorded_as_bad_quality(
) -> Result<()> {
    use outpost_protocols::wire::{MAX_BODY_LEN, MAX_EVENT_LEN};
    let s = Site::new("gw-wire")?;
    // max_payload above the wire's limit, so that the wire's limit is the one
    // met.
    let mut agent = start_mqtt_agent(&s, "max_payload = \"8MiB\"")?;
    // The largest body the uplink sends whatever its seq: a Batch carries
    // (seq, body) of at most MAX_EVENT_LEN bytes, and a seq takes up to 10.
    let overhead = body_len("lim/at", now_ns()?, 4_000_000)? - 4_000_000;
    let at_len = MAX_BODY_LEN - overhead;
    let at = text_payload(at_len, 3);
    let over = text_payload(at_len + 1, 4);
    publish_all(
        s.broker.port,
        "wire-pub",
        rumqttc::QoS::ExactlyOnce,
        &[
            ("lim/before".into(), b"1".to_vec()),
            ("lim/at".into(), at.clone()),
            // A topic of the same length, so the events differ by one byte.
            ("lim/ov".into(), over),
            ("lim/after".into(), b"3".to_vec()),
        ],
    )?;
    wait_until(DEADLINE, "the message after them at the hub", || {
        s.hub_events("lim/after").is_ok_and(|e| !e.is_empty())
    })
    .with_context(|| {
        let l = log(&s.site());
        let tail: Vec<&str> = l.lines().rev().take(6).collect();
        format!("agent log, newest first:\n{}", tail.join("\n"))
    })?;
    let events = s.hub_events("lim/#")?;
    let order: Vec<&str> = events
        .iter()
        .filter_map(|e| e["stream"].as_str())
        .filter(|t| *t != "lim/probe")
        .collect();
    ensure!(
        order == ["lim/before", "lim/at", "lim/ov", "lim/after"],
        "stored in this order: {order:?}"
    );
    let e = one_at_hub(&events, "lim/at")?;
    let ts = e["ts"].as_i64().context("ts")?;
    ensure!(
        body_len("lim/at", ts, at_len)? == MAX_BODY_LEN,
        "the test missed the limit"
    );
    ensure!(
        e["value"].as_str().map(str::as_bytes) == Some(&at[..]) && e["quality"]["status"] == "good",
        "the event at the limit changed on the way ({} bytes arrived, {})",
        e["value"].as_str().map_or(0, str::len),
        e["quality"]
    );
    let e = one_at_hub(&events, "lim/ov")?;
    let reason = format!(
        "payload of {} bytes makes an event of {} bytes, over the uplink's limit of {MAX_BODY_LEN}",
        at_len + 1,
        MAX_BODY_LEN + 1
    );
    ensure!(
        e["value"] == serde_json::json!({"base64": ""})
            && e["quality"] == serde_json::json!({"status": "bad", "reason": reason}),
        "{e}"
    );
    let m = scrape(s.metrics_addr())?;
    ensure!(metric(&m, "outpost_mqtt_oversize_total") == 1.0, "{m}");
    ensure!(log_count(&s.site(), "Event over the uplink's size limit") == 1);
    ensure!(
        log_count(&s.site(), "Uplink lost") == 0,
        "the uplink was dropped:\n{}",
        log(&s.site())
    );
    ensure!(agent.proc.is_running());
    s.drain_and_check_every_seq(&mut agent)?;
    println!(
        "uplink limit: a body of {MAX_BODY_LEN} bytes ({at_len}-byte payload; (seq, body) at most {MAX_EVENT_LEN}) arrived intact, one byte more recorded as bad quality"
    );
    Ok(())
}

#[test]
fn an_unsendable_event_already_in_the_outbox_is_skipped_and_counted_and_the_events_after_it_arrive(
) -> Result<()> {
    use outpost_agent::outbox::{Outbox, OutboxConfig};
    use outpost_protocols::wire::MAX_EVENT_LEN;
    let s = Site::new("gw-old")?;
    // An outbox as an agent without the source's check could leave it: an
    // event no Batch can carry between two that fit.
    let data = s.site().join("data");
    std::fs::create_dir_all(&data)?;
    let body = |stream: &str, value: Value| -> Result<EventBody> {
        Ok(EventBody {
            stream: StreamName::parse(stream)?,
            ts: Timestamp(now_ns()?),
            value,
            quality: Quality::Good,
            attrs: BTreeMap::new(),
        })
    };
    {
        let mut outbox = Outbox::open(
            &OutboxConfig::new(data.join("outbox.db")),
            outpost_protocols::AgentId::parse("test")?,
        )?;
        outbox.append(
            Timestamp(now_ns()?),
            &[
                body("old/before", Value::U64(1))?,
                body("old/big", Value::Bytes(vec![7; MAX_EVENT_LEN]))?,
                body("old/after", Value::U64(3))?,
            ],
            &[],
        )?;
    }
    let mut agent = s.start_agent("")?;
    wait_until(DEADLINE, "the event after it at the hub", || {
        s.hub_events("old/after").is_ok_and(|e| !e.is_empty())
    })
    .with_context(|| log(&s.site()))?;
    wait_until(DEADLINE, "an empty outbox", || {
        agent_outbox_stats(&agent.config).is_ok_and(|st| st["events"] == 0)
    })?;
    let seqs: Vec<(String, u64)> = s
        .hub_events("old/#")?
        .iter()
        .map(|e| {
            (
                e["stream"].as_str().unwrap_or_default().to_owned(),
                e["seq"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    ensure!(
        seqs == [("old/before".to_owned(), 1), ("old/after".to_owned(), 3)],
        "{seqs:?}"
    );
    ensure!(
        log_count(&s.site(), "Event too large for the uplink; not sent.") >= 1
            && log_count(&s.site(), "Uplink lost") == 0,
        "{}",
        log(&s.site())
    );
    let m = scrape(s.metrics_addr())?;
    ensure!(
        metric(&m, "outpost_events_evicted_total{reason=\"too_large\"}") >= 1.0,
        "{m}"
    );
    agent.proc.term(Duration::from_secs(30))?;
    Ok(())
}
