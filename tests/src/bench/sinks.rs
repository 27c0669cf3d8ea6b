//! Measurement 7: the hub's sinks, NATS JetStream and MQTT, against a bare
//! client publishing the same messages to the same far end.
//!
//! What is measured is the sink alone: the hub delivering events it already
//! holds, not the uplink that brought them (the uplink rows measure that).
//! Each run, of either side, goes like this:
//!
//! 1. A fresh far end in a fresh directory is started once, to make what it
//!    must hold before anything is published, and stopped: for JetStream a
//!    nats-server whose stream `OUTPOST` captures `outpost.>` (file storage,
//!    the defaults otherwise); for MQTT a Mosquitto (the tests' launcher:
//!    `max_inflight_messages 1000`, `max_queued_messages 0`, persistence) on
//!    which the watcher below makes its persistent session (QoS 1 on
//!    `outpost/#`), saved when the broker stops.
//! 2. Ours only: a fresh `outpost-hub` whose one `[[sinks]]` entry points at
//!    that far end, with the fleet policy `[defaults] sinks = ["store",
//!    "bench"]` applied by `outpost-hub policy apply`. Real `outpost-agent`s
//!    with pre-filled outboxes upload N events in all (the MQTT rows'
//!    64-byte JSON payloads). The hub stores each event and queues it for
//!    the sink in the same transaction; while the sink is down it
//!    acknowledges nothing, and before protocol version 3 an agent stopped
//!    sending after its session window (8192 events), hence several agents
//!    of at most 6,250 events (kept, so that figures stay comparable).
//!    Once `outpost-hub sinks status --json` shows all N pending, the agents
//!    are stopped: from then on the only work left is the hub's sink runner
//!    draining its durable queue (batches of `batch_max` = 500 rows, read a
//!    few at a time, up to two published at once, their progress committed
//!    in order while the next ones are delivered; see
//!    `hub/src/sinks/runner.rs`).
//! 3. The far end starts again on the same port and directory. Ours: the
//!    hub notices and delivers. Baseline: a bare client in this process, on
//!    a one-thread runtime of its own, connects and publishes the very
//!    messages the hub publishes, built before the clock from the same
//!    events: same subjects or topics (the hub's own templates), same JSON
//!    payload bytes (`outpost_hub::sinks::payload`), for JetStream the same
//!    `Nats-Msg-Id` and `Nats-Expected-Stream` headers; 1,000 publishes
//!    awaiting their acknowledgement at a time (async-nats `send_publish`,
//!    acks awaited in order; rumqttc QoS 1 with in-flight 1000), which is
//!    what the hub's sink may have in flight too (JetStream: 2 × batch_max;
//!    MQTT: `max_inflight = 1000` set in its config, its default is 100).
//!
//! The clock is the same observer on both sides, watching the far end: for
//! JetStream the stream's message count (stream info, polled every 5 ms on
//! a connection of its own); for MQTT a rumqttc subscriber taking the
//! persistent session of step 1 and counting what arrives. The headline
//! rate is (N − the count first seen above 0) / (the N-th seen − that
//! first sighting): the delivery rate once messages flow. It leaves out how
//! long the hub takes to notice that the far end is back (its NATS
//! connection retries with a backoff of up to 2 s, its MQTT one with the
//! sink's `retry_max`, set to 200 ms here); the second row of each sink,
//! from the far end listening to the N-th, keeps it in. Runs alternate,
//! baseline first; the median of the runs is reported. Each run checks that
//! the far end holds exactly N messages of the same total size on both
//! sides and that the hub counts all N delivered and none pending.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use async_nats::jetstream::{self, context::ContextBuilder, message::PublishMessage, stream};
use outpost_agent::outbox::{Outbox, OutboxConfig, Synchronous};
use outpost_hub::sinks::{expand, jetstream::subject_of, payload, PayloadFormat, SinkEvent};
use outpost_protocols::{AgentId, Seq, Timestamp};
use outpost_tests::{wait_until, Agent, Hub, Mosquitto, Nats, Pki};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use super::procfs::{clock_ticks, cpu_ticks};
use super::procs::Bins;
use super::report::{median, per_sec, ratio_row, samples, thousands, Goal, Row, Verdict};
use super::workload::{mqtt_bodies, now_ns, PAYLOAD_LEN};

/// The sink's id in the hub's config and the policy's routes.
const SINK_ID: &str = "bench";

/// The JetStream stream, and the subjects it captures.
const STREAM: &str = "OUTPOST";
const STREAM_SUBJECTS: &str = "outpost.>";

/// The hub's default subject and topic templates, written into its config
/// too, so that the baselines publish to exactly the same names.
const SUBJECT: &str = "outpost.{agent_id}.{stream}";
const TOPIC: &str = "outpost/{agent_id}/{stream}";

/// What the MQTT watcher subscribes to.
const TOPIC_FILTER: &str = "outpost/#";

/// The watcher's client id: its persistent session survives the broker's
/// restart, so nothing published before it reconnects is lost to it.
const WATCHER: &str = "bench-sink-watcher";

/// Publishes awaiting their acknowledgement at once: the bare clients', the
/// hub's MQTT sink's (`max_inflight`), and the most the hub's JetStream sink
/// may have (2 × `batch_max`); Mosquitto's `max_inflight_messages`.
const WINDOW: usize = 1000;

/// The most events one agent uploads: below its session window (8192), which
/// is all it sends while the hub holds back the acknowledgements.
const PER_AGENT: usize = 6_250;

/// How often the JetStream stream's count is read.
const POLL: Duration = Duration::from_millis(5);

/// The goal: the hub's sink at least this share of the bare client
/// (issue 24).
const TARGET: f64 = 0.9;

/// The policy every hub run applies: everything to the store and the sink.
const POLICY: &str = "[defaults]\nsinks = [\"store\", \"bench\"]\n";

/// How big a run is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    /// Events per run, per sink.
    pub(crate) events: usize,
    /// Runs of each side; the median is reported.
    pub(crate) reps: usize,
}

/// Which sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    JetStream,
    Mqtt,
}

impl Kind {
    fn far_end(self) -> &'static str {
        match self {
            Kind::JetStream => "nats-server",
            Kind::Mqtt => "Mosquitto",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::JetStream => "jetstream",
            Kind::Mqtt => "mqtt",
        }
    }

    /// The hub's `[[sinks]]` entry for a far end on `port`.
    fn sink_table(self, port: u16) -> String {
        let common = format!(
            "[[sinks]]\nid = \"{SINK_ID}\"\nkind = \"{}\"\nretry_min = \"50ms\"\nretry_max = \"200ms\"\n\n",
            self.label()
        );
        match self {
            Kind::JetStream => format!(
                "{common}[sinks.jetstream]\nurl = \"nats://127.0.0.1:{port}\"\nstream = \"{STREAM}\"\nsubject = \"{SUBJECT}\"\n"
            ),
            Kind::Mqtt => format!(
                "{common}[sinks.mqtt]\nbroker = \"127.0.0.1:{port}\"\nclient_id = \"outpost-hub-bench\"\ntopic = \"{TOPIC}\"\nmax_inflight = {WINDOW}\n"
            ),
        }
    }
}

/// A one-thread runtime standing in for a process of its own.
fn runtime(name: &str) -> Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .with_context(|| format!("start the {name} runtime"))
}

/// How long to wait for a phase before calling the run failed.
fn run_timeout(n: usize) -> Duration {
    // 2,000 events/s is far below anything sane on loopback.
    Duration::from_secs(60 + n as u64 / 2000)
}

/// One agent's share of the events.
struct AgentFiles {
    id: String,
    /// Its certificate folder (`ca.pem`, `agent.pem`, `agent.key`).
    creds: PathBuf,
    /// Its filled outbox, copied into each run.
    outbox: PathBuf,
}

/// What every run uses.
struct Fixture {
    pki: Pki,
    agents: Vec<AgentFiles>,
    /// Every event as the hub stores it, per agent in seq order.
    events: Vec<SinkEvent>,
}

impl Fixture {
    fn new(bins: &Bins, root: &Path, n: usize) -> Result<Fixture> {
        let pki = bins.pki(&root.join("pki"))?;
        let bodies = mqtt_bodies(n)?;
        let count = n.div_ceil(PER_AGENT).max(1);
        let labels = Arc::new(BTreeMap::new());
        let (mut agents, mut events) = (Vec::new(), Vec::with_capacity(n));
        let mut from = 0;
        for k in 0..count {
            let share = n / count + usize::from(k < n % count);
            let id = format!("bench-sink-{}", k + 1);
            let creds = pki.issue_agent(&id)?;
            let dir = root.join("templates").join(&id);
            std::fs::create_dir_all(&dir)?;
            let outbox = dir.join("outbox.db");
            let mut cfg = OutboxConfig::new(&outbox);
            // Only the fill is NORMAL, for speed; the agent reopens it FULL.
            cfg.synchronous = Synchronous::Normal;
            let mut ob = Outbox::open(&cfg, AgentId::parse(&id)?)?;
            for chunk in bodies[from..from + share].chunks(1000) {
                let outcome = ob.append(Timestamp(now_ns()), chunk, &[])?;
                ensure!(outcome.accepted == chunk.len(), "{outcome:?}");
            }
            let stored = ob.read_batch(Seq(0), usize::MAX)?;
            ensure!(
                stored.len() == share,
                "{id}'s outbox holds {} of {share} events",
                stored.len()
            );
            events.extend(stored.into_iter().map(|event| SinkEvent {
                queued_at: 0,
                event,
                labels: labels.clone(),
            }));
            // Closing checkpoints the WAL into the file, which is then all
            // there is to copy.
            drop(ob);
            let mut wal = outbox.as_os_str().to_owned();
            wal.push("-wal");
            ensure!(
                !Path::new(&wal).exists(),
                "{} still has a WAL after the close",
                outbox.display()
            );
            agents.push(AgentFiles { id, creds, outbox });
            from += share;
        }
        Ok(Fixture {
            pki,
            agents,
            events,
        })
    }

    fn n(&self) -> usize {
        self.events.len()
    }

    /// What the bare JetStream client publishes: (subject, message id,
    /// payload) of every event, as the hub's sink makes them.
    fn jetstream_messages(&self) -> Result<Vec<(String, String, Vec<u8>)>> {
        self.events
            .iter()
            .map(|e| {
                let subject = subject_of(SUBJECT, e).map_err(anyhow::Error::msg)?;
                let id = format!("{}:{}", e.event.agent_id, e.event.seq.0);
                Ok((subject, id, payload(e, PayloadFormat::Json)))
            })
            .collect()
    }

    /// What the bare MQTT client publishes: (topic, payload) of every event.
    fn mqtt_messages(&self) -> Vec<(String, Vec<u8>)> {
        self.events
            .iter()
            .map(|e| (expand(TOPIC, e), payload(e, PayloadFormat::Json)))
            .collect()
    }
}

/// When the far end saw what.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// The first sighting of any message, and how many there were then.
    first: Instant,
    first_count: u64,
    /// When all N were there.
    done: Instant,
    /// What they weigh at the far end: the stream's bytes (JetStream) or
    /// the topics and payloads received (MQTT).
    bytes: u64,
}

/// What one run measured.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Events/s, first sighting → N-th.
    rate: f64,
    /// Events/s, far end listening → N-th.
    from_start: f64,
    /// Far end listening → first sighting.
    first_after: Duration,
    bytes: u64,
    /// Hub CPU per event (µs), ours only.
    hub_cpu_us: f64,
}

impl Sample {
    fn new(n: usize, listening: Instant, seen: Seen) -> Sample {
        let flowing = n as u64 - seen.first_count.min(n as u64);
        Sample {
            rate: if flowing > 0 {
                per_sec(flowing, seen.done.duration_since(seen.first))
            } else {
                f64::NAN
            },
            from_start: per_sec(n as u64, seen.done.duration_since(listening)),
            first_after: seen.first.duration_since(listening),
            bytes: seen.bytes,
            hub_cpu_us: f64::NAN,
        }
    }
}

// ---------------------------------------------------------------------------
// MQTT clients: the watcher (a subscriber) and the bare publisher.

/// Counts arrivals (PUBLISHes for a subscriber, PUBACKs for a publisher) and
/// notes when the first and the `target`-th came.
#[derive(Default)]
struct Counter {
    count: AtomicU64,
    bytes: AtomicU64,
    target: AtomicU64,
    first: Mutex<Option<Instant>>,
    done: Mutex<Option<Instant>>,
    failed: Mutex<Option<String>>,
}

impl Counter {
    fn hit(&self, bytes: usize) {
        let now = Instant::now();
        self.bytes.fetch_add(bytes as u64, Ordering::SeqCst);
        let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        if n == 1 {
            if let Ok(mut f) = self.first.lock() {
                *f = Some(now);
            }
        }
        if n == self.target.load(Ordering::SeqCst) {
            if let Ok(mut d) = self.done.lock() {
                *d = Some(now);
            }
        }
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    fn first(&self) -> Option<Instant> {
        self.first.lock().ok().and_then(|f| *f)
    }

    fn done(&self) -> Option<Instant> {
        self.done.lock().ok().and_then(|d| *d)
    }

    fn check(&self, who: &str) -> Result<()> {
        if let Some(e) = self.failed.lock().ok().and_then(|f| f.clone()) {
            bail!("{who}: the MQTT connection failed: {e}");
        }
        Ok(())
    }
}

/// A connected rumqttc client whose event loop runs on its own runtime.
struct MqttClient {
    client: AsyncClient,
    task: JoinHandle<()>,
    counter: Arc<Counter>,
}

impl MqttClient {
    /// Connects (clean or persistent session) and waits for the CONNACK, or
    /// for the SUBACK of `subscribe`; counts up to `target`.
    fn connect(
        rt: &Runtime,
        port: u16,
        id: &str,
        clean_session: bool,
        subscribe: Option<&str>,
        target: u64,
    ) -> Result<MqttClient> {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(clean_session)
            .set_inflight(WINDOW as u16)
            .set_manual_acks(false);
        let (client, mut events) = AsyncClient::new(opts, WINDOW);
        let counter = Arc::new(Counter::default());
        counter.target.store(target, Ordering::SeqCst);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let wants_suback = subscribe.is_some();
        let task = {
            let counter = counter.clone();
            rt.spawn(async move {
                let mut ready = Some(ready_tx);
                loop {
                    match events.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) if !wants_suback => {
                            if let Some(r) = ready.take() {
                                let _ = r.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(r) = ready.take() {
                                let _ = r.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            counter.hit(p.topic.len() + p.payload.len());
                        }
                        Ok(Event::Incoming(Packet::PubAck(_))) => counter.hit(0),
                        Ok(_) => {}
                        Err(e) => {
                            if let Ok(mut f) = counter.failed.lock() {
                                *f = Some(e.to_string());
                            }
                            return;
                        }
                    }
                }
            })
        };
        if let Some(filter) = subscribe {
            rt.block_on(client.subscribe(filter, QoS::AtLeastOnce))?;
        }
        let ready =
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), ready_rx).await });
        if !matches!(ready, Ok(Ok(()))) {
            task.abort();
            let why = counter.failed.lock().ok().and_then(|f| f.clone());
            bail!(
                "MQTT client {id}: no {} from 127.0.0.1:{port}: {}",
                if wants_suback { "SUBACK" } else { "CONNACK" },
                why.unwrap_or_else(|| "timed out".into())
            );
        }
        Ok(MqttClient {
            client,
            task,
            counter,
        })
    }

    /// Publishes `items` at QoS 1 in a task on `rt`.
    fn publish_all(
        &self,
        rt: &Runtime,
        items: Vec<(String, Vec<u8>)>,
    ) -> JoinHandle<Result<(), rumqttc::ClientError>> {
        let client = self.client.clone();
        rt.spawn(async move {
            for (topic, body) in items {
                client.publish(topic, QoS::AtLeastOnce, false, body).await?;
            }
            Ok(())
        })
    }

    /// Sends a DISCONNECT and lets the event loop end.
    fn close(self, rt: &Runtime) {
        let MqttClient { client, task, .. } = self;
        rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(2), client.disconnect()).await;
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        });
    }
}

/// Waits until `watcher` has all `n` (or fails), lets stragglers arrive,
/// and checks that there are exactly `n`.
fn watch_mqtt(
    watcher: &MqttClient,
    n: usize,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<Seen> {
    let deadline = Instant::now() + run_timeout(n);
    let done = loop {
        if let Some(at) = watcher.counter.done() {
            break at;
        }
        watcher.counter.check("the watcher")?;
        alive()?;
        if Instant::now() > deadline {
            bail!(
                "the watcher received {} of {n} messages in {:?}",
                watcher.counter.count(),
                run_timeout(n)
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    // A duplicate (QoS 1 allows them) would come right behind.
    std::thread::sleep(Duration::from_millis(300));
    let got = watcher.counter.count();
    ensure!(
        got == n as u64,
        "the watcher received {got} messages for {n} published"
    );
    Ok(Seen {
        first: watcher.counter.first().unwrap_or(done),
        first_count: 1,
        done,
        bytes: watcher.counter.bytes.load(Ordering::SeqCst),
    })
}

// ---------------------------------------------------------------------------
// JetStream: the observer and the bare publisher.

/// Connects to a server that has just started listening, retrying briefly.
async fn nats_connect(url: &str) -> Result<async_nats::Client> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match async_nats::connect(url).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => bail!("connect to {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// The stream, once JetStream answers for it (it may take a moment after
/// the server listens).
async fn stream_of(js: &jetstream::Context) -> Result<jetstream::stream::Stream> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match js.get_stream(STREAM).await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => bail!("stream {STREAM}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Polls the stream's message count until it holds `n`, then checks that
/// it holds exactly `n`.
async fn observe_stream(
    url: String,
    n: usize,
    alive: &mut dyn FnMut() -> Result<()>,
) -> Result<Seen> {
    let n = n as u64;
    let deadline = Instant::now() + run_timeout(n as usize);
    let js = jetstream::new(nats_connect(&url).await?);
    let stream = stream_of(&js).await?;
    let mut first = None;
    let done = loop {
        let messages = stream.get_info().await?.state.messages;
        let now = Instant::now();
        if messages > 0 && first.is_none() {
            first = Some((now, messages));
        }
        if messages >= n {
            break now;
        }
        alive()?;
        if now > deadline {
            bail!(
                "stream {STREAM} holds {messages} of {n} messages after {:?}",
                run_timeout(n as usize)
            );
        }
        tokio::time::sleep(POLL).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let state = stream.get_info().await?.state;
    ensure!(
        state.messages == n,
        "stream {STREAM} holds {} messages for {n} published",
        state.messages
    );
    let (first, first_count) = first.unwrap_or((done, n));
    Ok(Seen {
        first,
        first_count,
        done,
        bytes: state.bytes,
    })
}

/// The bare publisher: connects, waits for the stream, publishes every
/// message with `WINDOW` acknowledgements outstanding at most (awaited in
/// order), and returns when the last is acknowledged.
async fn publish_stream(url: String, messages: Vec<(String, String, Vec<u8>)>) -> Result<Instant> {
    let client = nats_connect(&url).await?;
    let js = ContextBuilder::new()
        .max_ack_inflight(WINDOW)
        .backpressure_on_inflight(true)
        .build(client);
    stream_of(&js).await?;
    let mut acks = VecDeque::with_capacity(WINDOW);
    let check = |ack: jetstream::publish::PublishAck| -> Result<()> {
        ensure!(
            ack.stream == STREAM && !ack.duplicate,
            "an unexpected acknowledgement: {ack:?}"
        );
        Ok(())
    };
    for (subject, id, body) in messages {
        if acks.len() >= WINDOW {
            if let Some(ack) = acks.pop_front() {
                let ack: jetstream::context::PublishAckFuture = ack;
                check(ack.await?)?;
            }
        }
        let msg = PublishMessage::build()
            .payload(body.into())
            .message_id(&id)
            .expected_stream(STREAM);
        acks.push_back(js.send_publish(subject, msg).await?);
    }
    while let Some(ack) = acks.pop_front() {
        check(ack.await?)?;
    }
    Ok(Instant::now())
}

// ---------------------------------------------------------------------------
// The far ends.

/// A far end prepared for one run and stopped (see the module doc, step 1).
struct FarEnd {
    kind: Kind,
    dir: PathBuf,
    port: u16,
}

/// A far end running again.
enum Running {
    Nats(Nats),
    Mosquitto(Mosquitto),
}

impl Running {
    fn is_running(&mut self) -> bool {
        match self {
            Running::Nats(n) => n.proc.is_running(),
            Running::Mosquitto(m) => m.proc.is_running(),
        }
    }

    fn stop(self) -> Result<()> {
        match self {
            Running::Nats(mut n) => n.proc.term(Duration::from_secs(20))?,
            Running::Mosquitto(mut m) => m.proc.term(Duration::from_secs(20))?,
        };
        Ok(())
    }
}

impl FarEnd {
    fn prepare(kind: Kind, dir: &Path, rt: &Runtime) -> Result<FarEnd> {
        std::fs::create_dir_all(dir)?;
        let port = match kind {
            Kind::JetStream => {
                let mut nats = Nats::start(dir)?;
                let url = nats.url();
                rt.block_on(async {
                    let js = jetstream::new(nats_connect(&url).await?);
                    js.create_stream(stream::Config {
                        name: STREAM.to_owned(),
                        subjects: vec![STREAM_SUBJECTS.to_owned()],
                        ..Default::default()
                    })
                    .await
                    .with_context(|| format!("create stream {STREAM}"))?;
                    anyhow::Ok(())
                })?;
                nats.proc.term(Duration::from_secs(20))?;
                nats.port
            }
            Kind::Mqtt => {
                let mut broker = Mosquitto::start(dir)?;
                let watcher =
                    MqttClient::connect(rt, broker.port, WATCHER, false, Some(TOPIC_FILTER), 0)?;
                watcher.close(rt);
                // The broker saves the session when it stops on SIGTERM;
                // the DISCONNECT is handled first.
                std::thread::sleep(Duration::from_millis(200));
                broker.proc.term(Duration::from_secs(20))?;
                broker.port
            }
        };
        Ok(FarEnd {
            kind,
            dir: dir.to_owned(),
            port,
        })
    }

    /// Starts it again; returns once it accepts TCP connections.
    fn start(&self) -> Result<Running> {
        Ok(match self.kind {
            Kind::JetStream => Running::Nats(Nats::start_on(&self.dir, self.port)?),
            Kind::Mqtt => Running::Mosquitto(Mosquitto::start_on(&self.dir, self.port)?),
        })
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

// ---------------------------------------------------------------------------
// The two sides.

/// One baseline run in `home`.
fn baseline(fx: &Fixture, kind: Kind, home: &Path) -> Result<Sample> {
    let n = fx.n();
    let (client_rt, watch_rt) = (runtime("bare-client")?, runtime("watcher")?);
    let far = FarEnd::prepare(kind, &home.join("far"), &watch_rt)?;
    let sample = match kind {
        Kind::JetStream => {
            let messages = fx.jetstream_messages()?;
            let mut running = far.start()?;
            let listening = Instant::now();
            let failed: Arc<Mutex<Option<String>>> = Arc::default();
            let publishing = {
                let (url, failed) = (far.url(), failed.clone());
                client_rt.spawn(async move {
                    let r = publish_stream(url, messages).await;
                    if let (Err(e), Ok(mut f)) = (&r, failed.lock()) {
                        *f = Some(format!("{e:#}"));
                    }
                    r
                })
            };
            let mut alive = || match failed.lock().ok().and_then(|f| f.clone()) {
                Some(e) => bail!("the bare publisher failed: {e}"),
                None => Ok(()),
            };
            let seen = watch_rt.block_on(observe_stream(far.url(), n, &mut alive))?;
            let last_ack = client_rt
                .block_on(publishing)
                .context("the bare publisher's task")??;
            eprintln!(
                "sinks: bare async-nats: last ack {:.2} s after the server listened, the N-th in the stream seen at {:.2} s",
                last_ack.duration_since(listening).as_secs_f64(),
                seen.done.duration_since(listening).as_secs_f64()
            );
            ensure!(running.is_running(), "nats-server exited during the run");
            running.stop()?;
            Sample::new(n, listening, seen)
        }
        Kind::Mqtt => {
            let items = fx.mqtt_messages();
            let mut running = far.start()?;
            let listening = Instant::now();
            let watcher = MqttClient::connect(
                &watch_rt,
                far.port,
                WATCHER,
                false,
                Some(TOPIC_FILTER),
                n as u64,
            )?;
            let publisher = MqttClient::connect(
                &client_rt,
                far.port,
                "bench-sink-publisher",
                true,
                None,
                n as u64,
            )?;
            let sending = publisher.publish_all(&client_rt, items);
            let seen = watch_mqtt(&watcher, n, || publisher.counter.check("the publisher"))?;
            client_rt
                .block_on(sending)
                .context("the bare publisher's task")?
                .context("publish")?;
            let deadline = Instant::now() + Duration::from_secs(30);
            let last_ack = loop {
                if let Some(at) = publisher.counter.done() {
                    break at;
                }
                publisher.counter.check("the publisher")?;
                ensure!(
                    Instant::now() < deadline,
                    "the publisher got {} of {n} PUBACKs",
                    publisher.counter.count()
                );
                std::thread::sleep(Duration::from_millis(1));
            };
            eprintln!(
                "sinks: bare rumqttc: last PUBACK {:.2} s after the broker listened, the N-th at the watcher {:.2} s",
                last_ack.duration_since(listening).as_secs_f64(),
                seen.done.duration_since(listening).as_secs_f64()
            );
            publisher.close(&client_rt);
            watcher.close(&watch_rt);
            ensure!(running.is_running(), "Mosquitto exited during the run");
            running.stop()?;
            Sample::new(n, listening, seen)
        }
    };
    Ok(sample)
}

/// The agent's config: the uplink to `hub` with the credentials in `creds`.
fn agent_config(data_dir: &Path, hub: &Hub, creds: &Path) -> String {
    format!(
        "[agent]\ndata_dir = \"{}\"\n\n[uplink]\nhub = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[observability]\nmetrics = \"\"\n",
        data_dir.display(),
        hub.addr,
        creds.join("ca.pem").display(),
        creds.join("agent.pem").display(),
        creds.join("agent.key").display(),
    )
}

/// The sink's line of `outpost-hub sinks status --json`.
fn sink_status(bins: &Bins, hub: &Hub) -> Result<serde_json::Value> {
    let out = bins.hub_cli(hub, &["sinks", "status", "--json"])?;
    let all: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("sinks status said {out:?}"))?;
    all.as_array()
        .and_then(|a| a.iter().find(|s| s["sink"] == SINK_ID))
        .cloned()
        .with_context(|| format!("sinks status lists no {SINK_ID:?}: {out}"))
}

/// Applies [`POLICY`] and waits until the hub enforces it.
fn apply_policy(bins: &Bins, hub: &Hub, dir: &Path) -> Result<()> {
    let file = dir.join("policy.toml");
    std::fs::write(&file, POLICY)?;
    bins.hub_cli(hub, &["policy", "apply", &file.display().to_string()])?;
    // The running hub looks for a new version every second.
    wait_until(
        Duration::from_secs(30),
        "the hub to enforce the policy",
        || hub.log().contains("New policy in force"),
    )
}

/// One run of ours in `home`.
fn ours(bins: &Bins, fx: &Fixture, kind: Kind, home: &Path) -> Result<Sample> {
    let n = fx.n();
    let watch_rt = runtime("watcher")?;
    let far = FarEnd::prepare(kind, &home.join("far"), &watch_rt)?;
    let mut hub = bins.start_hub_with(
        &home.join("hub"),
        &fx.pki.hub_dir,
        &kind.sink_table(far.port),
    )?;
    apply_policy(bins, &hub, home)?;

    // The upload: every event stored and queued for the sink, none delivered.
    let t = Instant::now();
    let mut agents: Vec<Agent> = Vec::new();
    for a in &fx.agents {
        let agent_home = home.join(&a.id);
        let data_dir = agent_home.join("data");
        std::fs::create_dir_all(&data_dir)?;
        std::fs::copy(&a.outbox, data_dir.join("outbox.db")).context("copy the outbox")?;
        agents.push(bins.start_agent(&agent_home, &agent_config(&data_dir, &hub, &a.creds))?);
    }
    let deadline = Instant::now() + run_timeout(n);
    loop {
        let status = sink_status(bins, &hub)?;
        if status["pending"].as_u64() == Some(n as u64) {
            break;
        }
        ensure!(
            status["delivered"].as_u64() == Some(0),
            "the sink delivered while its far end was down: {status}"
        );
        for (a, p) in fx.agents.iter().zip(agents.iter_mut()) {
            ensure!(
                p.proc.is_running(),
                "agent {} exited (log: {})",
                a.id,
                home.join(&a.id).join("agent.log").display()
            );
        }
        ensure!(hub.proc.is_running(), "the hub exited:\n{}", hub.log());
        ensure!(
            Instant::now() < deadline,
            "the hub queued {} of {n} events for the sink in {:?}",
            status["pending"],
            run_timeout(n)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "sinks: {} agents uploaded {} events in {:.1} s; all queued in the hub for its {} sink",
        fx.agents.len(),
        thousands(n as f64),
        t.elapsed().as_secs_f64(),
        kind.far_end()
    );
    for mut a in agents {
        a.proc.term(Duration::from_secs(20))?;
    }

    // The drain: the far end comes back, the hub's runner delivers.
    let hub_pid = hub.proc.child.id();
    let ticks = cpu_ticks(hub_pid)?;
    let mut running = far.start()?;
    let listening = Instant::now();
    let seen = {
        let hub_proc = &mut hub.proc;
        let mut alive = || {
            ensure!(hub_proc.is_running(), "the hub exited during the drain");
            Ok(())
        };
        match kind {
            Kind::JetStream => watch_rt.block_on(observe_stream(far.url(), n, &mut alive))?,
            Kind::Mqtt => {
                let watcher = MqttClient::connect(
                    &watch_rt,
                    far.port,
                    WATCHER,
                    false,
                    Some(TOPIC_FILTER),
                    n as u64,
                )?;
                let seen = watch_mqtt(&watcher, n, &mut alive);
                watcher.close(&watch_rt);
                seen?
            }
        }
    };
    let cpu_s = cpu_ticks(hub_pid)?.saturating_sub(ticks) as f64 / clock_ticks() as f64;
    // The far end has every message before the hub has every
    // acknowledgement, and the hub records the last batches after those.
    let mut status = serde_json::Value::Null;
    let recorded = wait_until(
        Duration::from_secs(30),
        "the hub to record the drain",
        || {
            status = sink_status(bins, &hub).unwrap_or_else(|e| serde_json::json!(e.to_string()));
            status["pending"].as_u64() == Some(0) && status["delivered"].as_u64() == Some(n as u64)
        },
    );
    ensure!(recorded.is_ok(), "after the drain the hub says: {status}");
    ensure!(
        running.is_running(),
        "{} exited during the run",
        kind.far_end()
    );
    hub.proc.term(Duration::from_secs(20))?;
    running.stop()?;
    let mut sample = Sample::new(n, listening, seen);
    sample.hub_cpu_us = cpu_s * 1e6 / n as f64;
    Ok(sample)
}

/// Both sides of one sink, alternating; its two rows.
fn measure(bins: &Bins, fx: &Fixture, kind: Kind, root: &Path, reps: usize) -> Result<Vec<Row>> {
    let n = fx.n();
    let (mut base, mut mine) = (Vec::new(), Vec::new());
    for rep in 0..reps.max(1) {
        let home = root.join(format!("{}-base-{rep}", kind.label()));
        let b = baseline(fx, kind, &home)?;
        let _ = std::fs::remove_dir_all(&home);
        let home = root.join(format!("{}-hub-{rep}", kind.label()));
        let o = ours(bins, fx, kind, &home)?;
        let _ = std::fs::remove_dir_all(&home);
        ensure!(
            b.bytes == o.bytes,
            "the far end holds {} bytes from the bare client and {} from the hub: not the same messages",
            b.bytes,
            o.bytes
        );
        eprintln!(
            "sinks {} run {}: bare client {}/s, hub {}/s ({:.1} µs of hub CPU per event); from the far end's start: {}/s and {}/s (hub's first delivery after {:.2} s)",
            kind.far_end(),
            rep + 1,
            thousands(b.rate),
            thousands(o.rate),
            o.hub_cpu_us,
            thousands(b.from_start),
            thousands(o.from_start),
            o.first_after.as_secs_f64()
        );
        base.push(b);
        mine.push(o);
    }
    let pick = |v: &[Sample], f: fn(&Sample) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    let rates = |v: &[Sample]| v.iter().map(|s| s.rate).collect::<Vec<_>>();
    eprintln!(
        "sinks {}: bare client [{}], hub [{}]",
        kind.far_end(),
        samples(&rates(&base)),
        samples(&rates(&mine))
    );
    let (bs, os) = (pick(&base, |s| s.from_start), pick(&mine, |s| s.from_start));
    let first = pick(&mine, |s| s.first_after.as_secs_f64());
    let cpu = pick(&mine, |s| s.hub_cpu_us);
    let size = mine[0].bytes as f64 / n as f64;
    let (what, bare, weight) = match kind {
        Kind::JetStream => (
            "Hub → NATS JetStream sink",
            "a bare async-nats publisher, same subjects, payloads and Nats-Msg-Id, 1,000 acks outstanding, into the same stream",
            "bytes stored per message",
        ),
        Kind::Mqtt => (
            "Hub → MQTT sink (QoS 1, max_inflight 1000)",
            "a bare rumqttc QoS 1 publisher, same topics and payloads, in-flight 1000, to the same Mosquitto",
            "bytes of topic and payload per message",
        ),
    };
    Ok(vec![
        ratio_row(
            format!(
                "{what}: {} events queued in the hub's store while {} was down, then delivered; first → last message at the far end (events/s; each the event's JSON around a {PAYLOAD_LEN}-byte JSON value, {size:.0} {weight}; batch_max 500; {cpu:.0} µs of hub CPU per event; baseline = {bare})",
                thousands(n as f64),
                kind.far_end()
            ),
            "/s",
            &mine
                .iter()
                .zip(&base)
                .map(|(m, b)| (m.rate, b.rate))
                .collect::<Vec<_>>(),
            Goal::AtLeast(TARGET),
        ),
        Row {
            what: format!(
                "{what}, same runs: {} listening → last message at the far end (events/s; includes the hub noticing that the far end is back: its first delivery came {first:.2} s after)",
                kind.far_end()
            ),
            ours: format!("{}/s", thousands(os)),
            baseline: format!("{}/s", thousands(bs)),
            ratio: format!("{:.2}", os / bs),
            target: "-".into(),
            verdict: Verdict::Info,
        },
    ])
}

/// Measurement 7: both sinks; a sink that cannot be measured is an error
/// row, and the other is still measured.
pub(crate) fn run(bins: &Bins, dir: &Path, p: Params) -> Result<Vec<Row>> {
    let root = dir.join("sinks");
    std::fs::create_dir_all(&root)?;
    let t = Instant::now();
    let fx = Fixture::new(bins, &root, p.events)?;
    eprintln!(
        "sinks: {} events in {} agent outboxes ({:.1} s)",
        thousands(fx.n() as f64),
        fx.agents.len(),
        t.elapsed().as_secs_f64()
    );
    let mut rows = Vec::new();
    for (kind, what) in [
        (Kind::JetStream, "Hub → NATS JetStream sink"),
        (Kind::Mqtt, "Hub → MQTT sink"),
    ] {
        match measure(bins, &fx, kind, &root, p.reps) {
            Ok(r) => rows.extend(r),
            Err(e) => {
                eprintln!("{what}: could not be measured: {e:#}");
                rows.push(Row::error(what, &e));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&root);
    Ok(rows)
}
