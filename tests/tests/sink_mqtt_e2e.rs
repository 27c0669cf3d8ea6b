//! The hub's MQTT sink against a real Mosquitto: events delivered through
//! `SinkConfig::build` and `Sink::deliver`, read back by an
//! independent rumqttc subscriber; TLS with certificates made here with
//! rcgen; the broker down at build time, killed in the middle of a batch and
//! restarted on the same port.
//!
//! Every wait polls a condition until a deadline; nothing sleeps for a fixed
//! time to let something happen.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use outpost_hub::sinks::{Sink, SinkConfig, SinkError, SinkEvent};
use outpost_protocols::{AgentId, Event, EventBody, Quality, Seq, StreamName, Timestamp, Value};
use outpost_tests::test_ca::{Ca, CertFiles};
use outpost_tests::{free_port, Mosquitto};
use rcgen::ExtendedKeyUsagePurpose;
use rumqttc::{AsyncClient, MqttOptions, QoS, TlsConfiguration, Transport};
use tokio_util::sync::CancellationToken;

/// How long any one condition may take to come true.
const DEADLINE: Duration = Duration::from_secs(60);

/// The longest one `deliver` may take when the broker is away: the sink's
/// connection timeout (10 s) with room for a slow machine.
const DELIVER_BOUND: Duration = Duration::from_secs(30);

/// The common name of the sink's client certificate, which Mosquitto takes
/// as its user name.
const SINK_CN: &str = "outpost-hub-sink";

fn event(agent: &str, seq: u64, stream: &str, value: Value, site: &str) -> SinkEvent {
    let mut labels = BTreeMap::new();
    labels.insert("site".to_owned(), site.to_owned());
    SinkEvent {
        queued_at: 0,
        event: Event {
            agent_id: AgentId::parse(agent).expect("agent id"),
            seq: Seq(seq),
            body: EventBody {
                stream: StreamName::parse(stream).expect("stream"),
                ts: Timestamp(1_700_000_000_000_000_000 + seq as i64),
                value,
                quality: Quality::Good,
                attrs: BTreeMap::new(),
            },
        },
        labels: Arc::new(labels),
    }
}

/// A `[[sinks]]` entry of kind mqtt, `mqtt` being its `[sinks.mqtt]` table.
fn sink_config(id: &str, mqtt: serde_json::Value) -> Result<SinkConfig> {
    Ok(serde_json::from_value(serde_json::json!({
        "id": id,
        "kind": "mqtt",
        "retry_min": "50ms",
        "retry_max": "500ms",
        "mqtt": mqtt,
    }))?)
}

async fn build(c: &SinkConfig, stop: &CancellationToken) -> Result<Arc<dyn Sink>> {
    c.build(Path::new("/"), stop.clone())
        .await
        .map_err(|e| anyhow::anyhow!("build: {e}"))
}

/// One `deliver`, bounded: a sink that hangs fails the test.
async fn deliver(sink: &Arc<dyn Sink>, events: &[SinkEvent]) -> Result<Result<(), SinkError>> {
    tokio::time::timeout(DELIVER_BOUND, sink.deliver(events))
        .await
        .with_context(|| format!("deliver took longer than {DELIVER_BOUND:?}"))
}

/// Delivers `events` again until the sink accepts them; every refusal on the
/// way must be Transient.
async fn deliver_until_accepted(sink: &Arc<dyn Sink>, events: &[SinkEvent]) -> Result<usize> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut transient = 0;
    loop {
        match deliver(sink, events).await? {
            Ok(()) => return Ok(transient),
            Err(SinkError::Transient(_)) if tokio::time::Instant::now() < deadline => {
                transient += 1;
                // The runner's backoff, shortened: the sink reconnects on
                // its own schedule meanwhile.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => bail!("not accepted: {e:?}"),
        }
    }
}

/// Polls `cond` every 20 ms until it holds or [`DEADLINE`] passes.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("timed out after {DEADLINE:?} waiting for {what}")
}

/// Starts a broker without blocking the runtime's other tasks.
fn blocking<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    tokio::task::block_in_place(f)
}

/// What a subscriber received: topic and payload, in arrival order.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A rumqttc client subscribed to `#` at QoS 1, resubscribing after each
/// reconnect, that records every message.
struct Subscriber {
    got: Received,
    count: Arc<AtomicUsize>,
    subacks: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Subscriber {
    fn start(mut options: MqttOptions) -> Subscriber {
        options.set_keep_alive(Duration::from_secs(5));
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(options, 100);
        let s = Subscriber {
            got: Arc::default(),
            count: Arc::default(),
            subacks: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (got, count, subacks, stop) = (
            s.got.clone(),
            s.count.clone(),
            s.subacks.clone(),
            s.stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    ev = el.poll() => match ev {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                            let _ = client.try_subscribe("#", QoS::AtLeastOnce);
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                            subacks.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                            got.lock().expect("lock").push((p.topic.clone(), p.payload.to_vec()));
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(_) => {}
                        // Paces reconnects while the broker is away; not a
                        // wait for anything to happen.
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    },
                }
            }
        });
        s
    }

    fn plain(port: u16, id: &str) -> Subscriber {
        Subscriber::start(MqttOptions::new(id, "127.0.0.1", port))
    }

    async fn subscribed(&self, times: usize) -> Result<()> {
        eventually(&format!("subscription number {times}"), || {
            self.subacks.load(Ordering::SeqCst) >= times
        })
        .await
    }

    fn messages(&self) -> Vec<(String, Vec<u8>)> {
        self.got.lock().expect("lock").clone()
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The `seq` of a JSON payload.
fn seq_of(payload: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()?
        .get("seq")?
        .as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_raw_payloads_arrive_on_templated_topics_once_each() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = blocking(|| Mosquitto::start(dir.path()))?;
    let sub = Subscriber::plain(broker.port, "reader");
    sub.subscribed(1).await?;
    let stop = CancellationToken::new();
    let json = build(
        &sink_config(
            "cloud-json",
            serde_json::json!({
                "broker": format!("127.0.0.1:{}", broker.port),
                "client_id": "hub-json",
                "topic": "fleet/{label.site}/{label.line}/{agent_id}/{stream}",
            }),
        )?,
        &stop,
    )
    .await?;
    let raw = build(
        &sink_config(
            "cloud-raw",
            serde_json::json!({
                "broker": format!("127.0.0.1:{}", broker.port),
                "client_id": "hub-raw",
                "topic": "raw/{agent_id}/{seq}",
                "payload": "raw",
                "max_inflight": 4,
            }),
        )?,
        &stop,
    )
    .await?;

    let values = [
        Value::I64(-3),
        Value::U64(18_446_744_073_709_551_615),
        Value::F64(21.5),
        Value::Bool(true),
        Value::String("hello, cloud".into()),
        Value::Bytes(vec![0, 159, 146, 150, 255]),
        Value::from_payload(br#"{"a":[1,2,{"b":null}]}"#),
    ];
    let events: Vec<SinkEvent> = (0..70u64)
        .map(|i| {
            event(
                "gw-1",
                i + 1,
                "plc1/temp",
                values[i as usize % values.len()].clone(),
                "lyon",
            )
        })
        .collect();
    // The first attempts may come before the sinks' first CONNACK.
    deliver_until_accepted(&json, &events).await?;
    deliver_until_accepted(&raw, &events).await?;
    eventually("140 messages", || sub.count() >= 140).await?;

    let got = sub.messages();
    let mut json_seen: HashMap<u64, usize> = HashMap::new();
    let mut raw_seen: HashMap<String, Vec<u8>> = HashMap::new();
    for (topic, payload) in &got {
        if let Some(rest) = topic.strip_prefix("raw/") {
            ensure!(
                raw_seen.insert(rest.to_owned(), payload.clone()).is_none(),
                "raw {topic} twice"
            );
            continue;
        }
        // A label the agent does not have is `_`.
        ensure!(
            topic == "fleet/lyon/_/gw-1/plc1/temp",
            "unexpected topic {topic}"
        );
        let seq = seq_of(payload).with_context(|| format!("no seq in {payload:?}"))?;
        *json_seen.entry(seq).or_default() += 1;
        let e = &events[seq as usize - 1];
        let want = e.event.to_json();
        let have: serde_json::Value = serde_json::from_slice(payload)?;
        ensure!(have == want, "seq {seq}: {have} is not {want}");
    }
    ensure!(json_seen.len() == 70, "json seqs: {}", json_seen.len());
    ensure!(
        json_seen.values().all(|n| *n == 1),
        "json duplicates: {json_seen:?}"
    );
    ensure!(raw_seen.len() == 70, "raw topics: {}", raw_seen.len());
    for e in &events {
        let p = &raw_seen[&format!("gw-1/{}", e.event.seq.0)];
        let want: Vec<u8> = match &e.event.body.value {
            Value::I64(_) => b"-3".to_vec(),
            Value::U64(_) => b"18446744073709551615".to_vec(),
            Value::F64(_) => b"21.5".to_vec(),
            Value::Bool(_) => b"true".to_vec(),
            Value::String(s) => s.as_bytes().to_vec(),
            Value::Bytes(b) => b.clone(),
            Value::Json(_) => br#"{"a":[1,2,{"b":null}]}"#.to_vec(),
            other => bail!("no raw form expected for {other:?}"),
        };
        ensure!(
            *p == want,
            "raw seq {}: {:?} is not {:?}",
            e.event.seq,
            String::from_utf8_lossy(p),
            String::from_utf8_lossy(&want)
        );
    }
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_an_invalid_topic_is_rejected_whole_and_its_good_events_go_alone() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let broker = blocking(|| Mosquitto::start(dir.path()))?;
    let sub = Subscriber::plain(broker.port, "reader");
    sub.subscribed(1).await?;
    let stop = CancellationToken::new();
    let sink = build(
        &sink_config(
            "cloud",
            serde_json::json!({
                "broker": format!("127.0.0.1:{}", broker.port),
                "client_id": "hub",
                "topic": "site/{label.site}/{stream}",
            }),
        )?,
        &stop,
    )
    .await?;
    let good = vec![event("gw-1", 1, "a", Value::I64(1), "lyon")];
    deliver_until_accepted(&sink, &good).await?;
    let batch = vec![
        event("gw-1", 2, "a", Value::I64(2), "lyon"),
        // A label with a wildcard makes a topic no broker would take.
        event("gw-1", 3, "a", Value::I64(3), "ly+on"),
        event("gw-1", 4, "a", Value::I64(4), "lyon"),
    ];
    match deliver(&sink, &batch).await? {
        Err(SinkError::Rejected(m)) => {
            ensure!(m.contains("gw-1:3") && m.contains("'+'"), "message: {m}");
            ensure!(!m.contains("gw-1:2"), "message names a good event: {m}");
        }
        other => bail!("not rejected: {other:?}"),
    }
    // Nothing of the rejected batch was published (the runner delivers its
    // events one at a time next, as here): no copy of 2 or 4 is left over.
    for one in [&batch[0], &batch[2]] {
        deliver_until_accepted(&sink, std::slice::from_ref(one)).await?;
    }
    ensure!(
        matches!(
            deliver(&sink, &batch[1..2]).await?,
            Err(SinkError::Rejected(_))
        ),
        "the bad event alone is rejected"
    );
    eventually("seqs 1, 2 and 4", || sub.count() >= 3).await?;
    let seqs: Vec<u64> = sub
        .messages()
        .iter()
        .filter_map(|(_, p)| seq_of(p))
        .collect();
    ensure!(seqs == vec![1, 2, 4], "delivered: {seqs:?}");
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_at_build_time_gives_transient_until_it_starts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let stop = CancellationToken::new();
    // Building does not need the broker.
    let sink = build(
        &sink_config(
            "cloud",
            serde_json::json!({
                "broker": format!("127.0.0.1:{port}"),
                "client_id": "hub",
            }),
        )?,
        &stop,
    )
    .await?;
    let events: Vec<SinkEvent> = (1..=20)
        .map(|i| event("gw-2", i, "line/speed", Value::F64(i as f64), "x"))
        .collect();
    for _ in 0..3 {
        match deliver(&sink, &events).await? {
            Err(SinkError::Transient(m)) => {
                ensure!(m.contains(&port.to_string()), "message: {m}")
            }
            other => bail!("not transient with the broker down: {other:?}"),
        }
    }
    let broker = blocking(|| Mosquitto::start_on(dir.path(), port))?;
    let sub = Subscriber::plain(broker.port, "reader");
    sub.subscribed(1).await?;
    deliver_until_accepted(&sink, &events).await?;
    eventually("20 messages", || sub.count() >= 20).await?;
    let mut seqs: Vec<u64> = sub
        .messages()
        .iter()
        .filter_map(|(_, p)| seq_of(p))
        .collect();
    seqs.sort_unstable();
    ensure!(seqs == (1..=20).collect::<Vec<_>>(), "delivered: {seqs:?}");
    // The default topic.
    ensure!(
        sub.messages()
            .iter()
            .all(|(t, _)| t == "outpost/gw-2/line/speed"),
        "topics: {:?}",
        sub.messages().iter().map(|(t, _)| t).collect::<Vec<_>>()
    );
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_mid_batch_gives_transient_and_the_retried_batch_arrives() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut broker = blocking(|| Mosquitto::start(dir.path()))?;
    let port = broker.port;
    let sub = Subscriber::plain(port, "reader");
    sub.subscribed(1).await?;
    let stop = CancellationToken::new();
    let sink = build(
        &sink_config(
            "cloud",
            serde_json::json!({
                "broker": format!("127.0.0.1:{port}"),
                "client_id": "hub",
                "max_inflight": 5,
            }),
        )?,
        &stop,
    )
    .await?;
    // Connected, and the subscriber sees what it sends.
    let first = vec![event("gw-3", 1, "s", Value::I64(0), "x")];
    deliver_until_accepted(&sink, &first).await?;
    eventually("the first message", || sub.count() >= 1).await?;

    // A batch long enough to be cut: the broker dies once the first of it
    // has come through.
    const N: u64 = 30_000;
    let batch: Vec<SinkEvent> = (2..N + 2)
        .map(|i| event("gw-3", i, "s", Value::I64(i as i64), "x"))
        .collect();
    let delivering = {
        let sink = sink.clone();
        let batch = batch.clone();
        tokio::spawn(async move { deliver(&sink, &batch).await })
    };
    eventually("part of the batch", || sub.count() >= 2).await?;
    broker.proc.kill9();
    match delivering.await?? {
        Err(SinkError::Transient(m)) => {
            ensure!(m.contains("acknowledged"), "message: {m}")
        }
        Ok(()) => {
            bail!("the whole batch was acknowledged before the broker was killed; make N larger")
        }
        Err(e) => bail!("not transient: {e:?}"),
    }
    // While it is down, deliveries are refused as Transient, quickly.
    match deliver(&sink, &batch[..10]).await? {
        Err(SinkError::Transient(_)) => {}
        other => bail!("not transient with the broker down: {other:?}"),
    }

    let _broker = blocking(|| Mosquitto::start_on(dir.path(), port))?;
    sub.subscribed(2).await?;
    // The subscriber has read all the first broker sent it before it
    // reconnected.
    let before = sub.count();
    ensure!(
        before < N as usize + 1,
        "the subscriber has every message already ({before})"
    );
    deliver_until_accepted(&sink, &batch).await?;
    eventually("the retried batch", || {
        let got = sub.messages();
        let mut seen = std::collections::HashSet::new();
        for (_, p) in &got {
            if let Some(s) = seq_of(p) {
                seen.insert(s);
            }
        }
        (1..N + 2).all(|s| seen.contains(&s))
    })
    .await?;
    // At least once: only the cut batch's first part may come twice.
    let total = sub.count();
    ensure!(
        total <= before + N as usize,
        "{total} messages: more than the first part ({before}) plus one full batch"
    );
    stop.cancel();
    Ok(())
}

/// The test subscriber's TLS: trusts `ca`, presents `client`.
fn subscriber_tls(ca: &Ca, client: &CertFiles) -> Result<Transport> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![client.cert_der.clone().into()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(client.key_der.clone().into()),
    )?;
    Ok(Transport::Tls(TlsConfiguration::Rustls(Arc::new(config))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_a_tls_broker_that_requires_a_client_certificate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new(dir.path(), "cloud-ca")?;
    // The broker's certificate names `localhost` only; the sink dials
    // 127.0.0.1 and checks the name with `server_name`.
    let server = ca.issue(
        dir.path(),
        "broker",
        &["localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let client = ca.issue(
        dir.path(),
        SINK_CN,
        &[],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let reader = ca.issue(
        dir.path(),
        "reader",
        &[],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let options = format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\n",
        ca.cert.display(),
        server.cert.display(),
        server.key.display()
    );
    let broker = blocking(|| Mosquitto::start_with(dir.path(), &options))?;
    let mut o = MqttOptions::new("reader", "localhost", broker.port);
    o.set_transport(subscriber_tls(&ca, &reader)?);
    let sub = Subscriber::start(o);
    sub.subscribed(1).await?;

    let stop = CancellationToken::new();
    let sink = build(
        &sink_config(
            "cloud",
            serde_json::json!({
                "broker": format!("127.0.0.1:{}", broker.port),
                "client_id": "hub-tls",
                "topic": "tls/{agent_id}/{stream}",
                "tls": {
                    "ca": ca.cert,
                    "cert": client.cert,
                    "key": client.key,
                    "server_name": "localhost",
                },
            }),
        )?,
        &stop,
    )
    .await?;
    let events: Vec<SinkEvent> = (1..=10)
        .map(|i| event("gw-4", i, "t", Value::I64(i as i64), "x"))
        .collect();
    deliver_until_accepted(&sink, &events).await?;
    eventually("10 messages over TLS", || sub.count() >= 10).await?;
    let mut seqs: Vec<u64> = sub
        .messages()
        .iter()
        .filter_map(|(_, p)| seq_of(p))
        .collect();
    seqs.sort_unstable();
    ensure!(seqs == (1..=10).collect::<Vec<_>>(), "delivered: {seqs:?}");
    ensure!(
        sub.messages().iter().all(|(t, _)| t == "tls/gw-4/t"),
        "topics"
    );
    // The broker saw the sink's certificate: its common name is the user
    // name it logs.
    let log = std::fs::read_to_string(dir.path().join(format!("mosquitto-{}.log", broker.port)))?;
    ensure!(
        log.contains(&format!("u'{SINK_CN}'")),
        "the broker did not log the sink's identity:\n{log}"
    );

    // A sink that trusts another CA never connects: Transient, not Config
    // (the files are fine; the far end is not the one it trusts).
    let other = Ca::new(dir.path(), "other-ca")?;
    let wrong = build(
        &sink_config(
            "wrong-ca",
            serde_json::json!({
                "broker": format!("127.0.0.1:{}", broker.port),
                "client_id": "hub-wrong",
                "tls": { "ca": other.cert, "cert": client.cert, "key": client.key, "server_name": "localhost" },
            }),
        )?,
        &stop,
    )
    .await?;
    for _ in 0..3 {
        match deliver(&wrong, &events).await? {
            Err(SinkError::Transient(_)) => {}
            other => bail!("not transient with an untrusted broker: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(sub.count() == 10, "the untrusted path delivered");
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_name_and_password_file_log_in() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let passwords = dir.path().join("passwd");
    let status = std::process::Command::new("mosquitto_passwd")
        .arg("-b")
        .arg("-c")
        .arg(&passwords)
        .args(["hub", "s3cret pass"])
        .status()
        .context("run mosquitto_passwd (tests/run installs mosquitto)")?;
    ensure!(status.success(), "mosquitto_passwd: {status}");
    let broker = blocking(|| {
        Mosquitto::start_with(
            dir.path(),
            &format!(
                "allow_anonymous false\npassword_file {}\n",
                passwords.display()
            ),
        )
    })?;
    let mut o = MqttOptions::new("reader", "127.0.0.1", broker.port);
    o.set_credentials("hub", "s3cret pass");
    let sub = Subscriber::start(o);
    sub.subscribed(1).await?;

    let good = dir.path().join("good");
    std::fs::write(&good, "s3cret pass\nnot this line\n")?;
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "wrong\n")?;
    let stop = CancellationToken::new();
    let config = |file: &Path, id: &str| {
        sink_config(
            id,
            serde_json::json!({
                "broker": format!("127.0.0.1:{}", broker.port),
                "client_id": id,
                "username": "hub",
                "password_file": file,
            }),
        )
    };
    let events = vec![event("gw-5", 1, "p", Value::I64(1), "x")];
    let refused = build(&config(&bad, "refused")?, &stop).await?;
    for _ in 0..3 {
        match deliver(&refused, &events).await? {
            Err(SinkError::Transient(_)) => {}
            other => bail!("not transient with a wrong password: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sink = build(&config(&good, "accepted")?, &stop).await?;
    deliver_until_accepted(&sink, &events).await?;
    eventually("the message", || sub.count() >= 1).await?;
    ensure!(sub.count() == 1, "{} messages", sub.count());
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_that_cannot_work_are_config_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new(dir.path(), "cloud-ca")?;
    let client = ca.issue(
        dir.path(),
        SINK_CN,
        &[],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let not_pem = dir.path().join("not-pem.pem");
    std::fs::write(&not_pem, "this is not a certificate\n")?;
    let stop = CancellationToken::new();
    let port = free_port()?;
    let cases = [
        (
            serde_json::json!({ "tls": { "ca": not_pem } }),
            "mqtt.tls.ca",
            "not-pem.pem",
        ),
        (
            serde_json::json!({ "tls": { "ca": dir.path().join("absent.pem") } }),
            "mqtt.tls.ca",
            "absent.pem",
        ),
        (
            serde_json::json!({ "tls": { "ca": ca.cert, "cert": client.cert, "key": not_pem } }),
            "mqtt.tls.key",
            "not-pem.pem",
        ),
        (
            serde_json::json!({ "tls": { "ca": ca.cert, "cert": not_pem, "key": client.key } }),
            "mqtt.tls.cert",
            "not-pem.pem",
        ),
        (
            serde_json::json!({ "tls": { "ca": ca.cert, "cert": client.cert } }),
            "mqtt.tls.key",
            "key",
        ),
        (
            serde_json::json!({ "username": "hub", "password_file": dir.path().join("nope") }),
            "mqtt.password_file",
            "nope",
        ),
        (
            serde_json::json!({ "broker": "mqtts://cloud.example.net:8883" }),
            "mqtt.broker",
            "scheme",
        ),
    ];
    for (extra, want_key, want_text) in cases {
        let mut mqtt = serde_json::json!({
            "broker": format!("127.0.0.1:{port}"),
            "client_id": "hub",
        });
        if let (Some(m), Some(e)) = (mqtt.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                m.insert(k.clone(), v.clone());
            }
        }
        let c = sink_config("cloud", mqtt)?;
        match c.build(dir.path(), stop.clone()).await {
            Err(SinkError::Config { id, key, message }) => {
                ensure!(id == "cloud", "id {id}");
                ensure!(key == want_key, "{extra}: key {key} ({message})");
                ensure!(
                    message.contains(want_text),
                    "{extra}: message {message:?} does not mention {want_text:?}"
                );
            }
            Err(e) => bail!("{extra}: not a config error: {e:?}"),
            Ok(_) => bail!("{extra}: accepted"),
        }
    }
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_sink_refuses_at_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = blocking(|| Mosquitto::start(dir.path()))?;
    let stop = CancellationToken::new();
    let sink = build(
        &sink_config(
            "cloud",
            serde_json::json!({
                "broker": format!("127.0.0.1:{}", broker.port),
                "client_id": "hub",
            }),
        )?,
        &stop,
    )
    .await?;
    let events = vec![event("gw-6", 1, "p", Value::I64(1), "x")];
    deliver_until_accepted(&sink, &events).await?;
    stop.cancel();
    // The driver ends; deliveries then fail instead of waiting.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match deliver(&sink, &events).await? {
            Err(SinkError::Transient(m)) if m.contains("stopped") => break,
            _ if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => bail!("still delivering after stop: {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_never_answers_gives_transient_within_the_connect_timeout() -> Result<()> {
    // Something that accepts TCP connections and never says a word: the
    // CONNACK never comes.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let held = Arc::new(Mutex::new(Vec::new()));
    {
        let held = held.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                held.lock().expect("lock").push(conn);
            }
        });
    }
    let stop = CancellationToken::new();
    let sink = build(
        &sink_config(
            "cloud",
            serde_json::json!({
                "broker": format!("127.0.0.1:{port}"),
                "client_id": "hub",
            }),
        )?,
        &stop,
    )
    .await?;
    let events = vec![event("gw-7", 1, "p", Value::I64(1), "x")];
    match deliver(&sink, &events).await? {
        Err(SinkError::Transient(m)) => ensure!(m.contains("timeout"), "message: {m}"),
        other => bail!("not transient: {other:?}"),
    }
    ensure!(
        !held.lock().expect("lock").is_empty(),
        "the sink never connected to the listener"
    );
    stop.cancel();
    Ok(())
}
