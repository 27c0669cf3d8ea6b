//! The MQTT sink: each event is one QoS 1 PUBLISH to a cloud broker, and a
//! batch is accepted when the broker has sent a PUBACK for every one of them.
//!
//! ```text
//! PUBLISH  topic   = expand(topic, event)       (MQTT 3.1.1 §3.3; QoS 1, retain 0)
//!          payload = json: {"agent_id":…,"seq":…,"stream":…,"ts":…,"value":…,…}
//!                  | raw:  the value's own bytes
//! ```
//!
//! Why QoS 1 and a PUBACK per event: a PUBACK is the broker taking
//! responsibility for the message (§4.3.2), the only "accepted" MQTT 3.1.1
//! has. QoS 2 would not buy exactly once here: its duplicate detection lives
//! in one session, and a batch that failed with a lost connection is sent
//! again on a new connection with new packet ids. So delivery is at least
//! once; the JSON payload carries `(agent_id, seq)` for consumers that
//! deduplicate.
//!
//! Why a new rumqttc event loop for every connection, in a clean session:
//! rumqttc's event loop keeps the publishes it has not seen acknowledged, and
//! the requests still queued to it, and replays them after it reconnects.
//! The runner already delivers a failed batch again, from the store, so a
//! replay would send it from two places, and would leave PUBACKs of an old
//! batch on the connection of the next one. With a fresh event loop, every
//! PUBACK on a connection answers a PUBLISH of a batch sent on it, which the
//! driver knows by its packet id (see [`Driver::serve`]).
//!
//! Why one future polls the event loop for the whole connection and is never
//! cancelled: rumqttc writes packets inside its `poll`; dropping that future
//! half-way through a write could lose a packet or tear the stream. The
//! driver (one task per sink) `select!`s over that future's reports through
//! a channel instead, and over the batches `deliver` hands it.
//!
//! Why a batch with a bad topic is published not at all: a label value (from
//! the agent) or a long stream name can make one event's topic invalid
//! (§4.7.3: no wildcard, no U+0000, 1 to 65535 bytes), and no retry changes
//! that; the runner then delivers the events one at a time, and a broker
//! would keep whatever was published before as duplicates.
//!
//! What MQTT 3.1.1 cannot say: there is no negative PUBACK, so a broker that
//! denies a topic by its ACL still acknowledges the publish and drops it
//! (Mosquitto does). The broker's ACL must allow the sink's topics.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::Ipv6Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet,
    QoS, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::config::{MqttSinkConfig, SinkConfig};
use super::format::{check_template, expand, payload, PayloadFormat};
use super::sink::{Sink, SinkError, SinkEvent};
use crate::clock;

/// How long a connection attempt (TCP, TLS, CONNECT/CONNACK) may take, and
/// a write to the broker; rumqttc counts it in whole seconds.
const CONNECT_TIMEOUT_SECS: u64 = 10;

/// The keep-alive sent to the broker: rumqttc pings this often and drops a
/// connection whose broker has not answered the previous ping.
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// A batch whose broker sends no PUBACK for this long is given up
/// (Transient) and its connection remade.
const ACK_STALL: Duration = Duration::from_secs(30);

/// MQTT's largest remaining length (§2.2.3), which bounds a PUBLISH.
const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// Batches waiting for the driver.
const JOB_QUEUE: usize = 16;

/// While the broker stays unreachable, how often the failure is logged as a
/// warning (every attempt is logged at debug).
const WARN_EVERY: Duration = Duration::from_secs(60);

/// What [`build`] checks of `c` (its `[sinks.mqtt]` table `cfg`), without
/// connecting.
pub(super) fn check_files(
    c: &SinkConfig,
    cfg: &MqttSinkConfig,
    base: &Path,
) -> Result<(), SinkError> {
    Settings::read(&c.id, cfg, base).map(drop)
}

/// Builds the MQTT sink of `c` (its `[sinks.mqtt]` table `cfg`) and starts
/// its driver, which connects in the background and ends when `stop` is
/// cancelled.
pub(super) async fn build(
    c: &SinkConfig,
    cfg: &MqttSinkConfig,
    base: &Path,
    stop: CancellationToken,
) -> Result<Arc<dyn Sink>, SinkError> {
    let settings = Settings::read(&c.id, cfg, base)?;
    let (jobs_tx, jobs_rx) = mpsc::channel(JOB_QUEUE);
    let span = tracing::info_span!("sink", sink = %c.id, kind = "mqtt", broker = %settings.broker);
    let driver = Driver {
        broker: settings.broker.clone(),
        options: settings.options,
        network: settings.network,
        capacity: usize::from(cfg.max_inflight),
        jobs: jobs_rx,
        stop,
        retry_min: c.retry_min.0,
        retry_max: c.retry_max.0.max(c.retry_min.0),
        last_error: "not connected yet".into(),
    };
    tokio::spawn(driver.run().instrument(span));
    Ok(Arc::new(MqttSink {
        broker: settings.broker,
        topic: cfg.topic.clone(),
        format: cfg.payload,
        jobs: jobs_tx,
    }))
}

/// A topic name a PUBLISH may carry (MQTT 3.1.1 §4.7.3, §1.5.3).
#[derive(Debug, Clone, PartialEq, Eq)]
struct TopicName(String);

/// Why a string is not a topic name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum TopicError {
    /// Topic names are at least one character long (§4.7.3).
    #[error("is empty")]
    Empty,
    /// Topic names are UTF-8 strings with a 16-bit length (§1.5.3).
    #[error("is {0} bytes long, more than MQTT's 65535")]
    TooLong(usize),
    /// Wildcards are for subscriptions only (§4.7.1).
    #[error("contains the wildcard {0:?}, which a topic name cannot have")]
    Wildcard(char),
    /// U+0000 is not allowed in an MQTT string (§1.5.3).
    #[error("contains U+0000")]
    Nul,
}

impl TopicName {
    fn parse(s: String) -> Result<TopicName, TopicError> {
        if s.is_empty() {
            return Err(TopicError::Empty);
        }
        if s.len() > usize::from(u16::MAX) {
            return Err(TopicError::TooLong(s.len()));
        }
        if let Some(c) = s.chars().find(|c| matches!(c, '+' | '#' | '\0')) {
            return Err(if c == '\0' {
                TopicError::Nul
            } else {
                TopicError::Wildcard(c)
            });
        }
        Ok(TopicName(s))
    }
}

/// `[sinks.mqtt]` read and checked: everything the driver needs, files read.
struct Settings {
    /// `host:port`, for messages.
    broker: String,
    options: MqttOptions,
    network: NetworkOptions,
}

impl Settings {
    fn read(id: &str, c: &MqttSinkConfig, base: &Path) -> Result<Settings, SinkError> {
        let bad = |key: &str, message: String| SinkError::Config {
            id: id.to_owned(),
            key: format!("mqtt.{key}"),
            message,
        };
        let (host, port) = parse_broker(&c.broker).map_err(|m| bad("broker", m))?;
        if c.client_id.is_empty() {
            return Err(bad("client_id", "must not be empty".into()));
        }
        if c.client_id.len() > usize::from(u16::MAX) || c.client_id.contains('\0') {
            return Err(bad(
                "client_id",
                "must be at most 65535 bytes, without U+0000".into(),
            ));
        }
        check_template(&c.topic).map_err(|m| bad("topic", m))?;
        check_topic_template(&c.topic).map_err(|m| bad("topic", m))?;
        if c.max_inflight == 0 {
            return Err(bad("max_inflight", "must be 1 to 65535".into()));
        }

        let mut o = MqttOptions::new(c.client_id.clone(), host.clone(), port);
        o.set_clean_session(true);
        o.set_keep_alive(KEEP_ALIVE);
        o.set_inflight(c.max_inflight);
        // Only acknowledgements come in; any PUBLISH up to MQTT's own limit
        // may go out (a larger one is rejected before it is queued).
        o.set_max_packet_size(64 * 1024, MAX_REMAINING_LENGTH + 5);
        match (&c.username, &c.password_file) {
            (Some(u), _) if u.is_empty() => {
                return Err(bad(
                    "username",
                    "must not be empty; leave it out instead".into(),
                ))
            }
            (Some(u), Some(f)) => {
                let password = read_password(&base.join(f)).map_err(|m| bad("password_file", m))?;
                o.set_credentials(u.clone(), password);
            }
            (Some(u), None) => {
                o.set_credentials(u.clone(), String::new());
            }
            (None, Some(_)) => {
                // §3.1.2.9: a password only comes with a user name.
                return Err(bad(
                    "password_file",
                    "needs username: MQTT sends no password without a user name".into(),
                ));
            }
            (None, None) => {}
        }
        if let Some(t) = &c.tls {
            if host.starts_with('[') {
                // rumqttc checks the certificate against the host it dials
                // and cannot make a TLS server name of a bracketed address.
                return Err(bad(
                    "broker",
                    format!(
                        "{:?}: TLS to an IPv6 address is not supported; use a host name",
                        c.broker
                    ),
                ));
            }
            let config = super::tls::client_config(id, "mqtt", Some(t), base)?;
            o.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(config))));
        }
        let mut network = NetworkOptions::new();
        network.set_connection_timeout(CONNECT_TIMEOUT_SECS);
        // PUBLISHes of a batch go out back to back; Nagle's algorithm would
        // hold each behind the previous one's PUBACK.
        network.set_tcp_nodelay(true);
        Ok(Settings {
            broker: c.broker.clone(),
            options: o,
            network,
        })
    }
}

/// Splits `host:port`; an IPv6 address is written `[addr]:port` and kept
/// bracketed (rumqttc dials `format!("{host}:{port}")`).
fn parse_broker(s: &str) -> Result<(String, u16), String> {
    if s.contains("://") {
        return Err(format!(
            "{s:?}: expected host:port without a scheme (TLS is [sinks.mqtt.tls])"
        ));
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: expected host:port"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{s:?}: the port must be 1 to 65535"))?;
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        inner
            .parse::<Ipv6Addr>()
            .map_err(|_| format!("{s:?}: {inner:?} is not an IPv6 address"))?;
        return Ok((host.to_owned(), port));
    }
    let ok =
        !host.is_empty() && !host.contains(|c: char| c == ':' || c == '/' || c.is_whitespace());
    if !ok {
        return Err(format!(
            "{s:?}: expected host:port (an IPv6 address as [addr]:port)"
        ));
    }
    Ok((host.to_owned(), port))
}

/// Refuses a template whose own text, placeholders aside, could never make a
/// topic name: every event would be rejected.
fn check_topic_template(template: &str) -> Result<(), String> {
    if template.is_empty() {
        return Err("must not be empty".into());
    }
    let mut literal = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        literal.push_str(&rest[..open]);
        match rest[open..].find('}') {
            Some(close) => rest = &rest[open + close + 1..],
            None => {
                literal.push_str(&rest[open..]);
                rest = "";
            }
        }
    }
    literal.push_str(rest);
    if let Some(c) = literal.chars().find(|c| matches!(c, '+' | '#' | '\0')) {
        return Err(format!(
            "{template:?} contains {c:?}, which an MQTT topic name cannot have"
        ));
    }
    Ok(())
}

/// The first line of a password file.
fn read_password(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    Ok(text.lines().next().unwrap_or("").to_owned())
}

/// One PUBLISH of a batch.
struct Item {
    topic: TopicName,
    payload: Vec<u8>,
}

/// A batch handed to the driver, and where to say how it went.
struct Job {
    items: Vec<Item>,
    reply: oneshot::Sender<Result<(), SinkError>>,
}

/// The sink `deliver` is called on; the connection is the driver's.
struct MqttSink {
    broker: String,
    topic: String,
    format: PayloadFormat,
    jobs: mpsc::Sender<Job>,
}

impl MqttSink {
    /// The PUBLISHes of `events`, and why the others cannot be published.
    fn items(&self, events: &[SinkEvent]) -> (Vec<Item>, Vec<String>) {
        let mut items = Vec::with_capacity(events.len());
        let mut rejected = Vec::new();
        for e in events {
            let who = format!("event {}:{}", e.event.agent_id, e.event.seq);
            let topic = match TopicName::parse(expand(&self.topic, e)) {
                Ok(t) => t,
                Err(why) => {
                    let mut shown = expand(&self.topic, e);
                    if shown.len() > 200 {
                        let mut cut = 200;
                        while !shown.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        shown.truncate(cut);
                        shown.push('…');
                    }
                    rejected.push(format!(
                        "{who}: topic {shown:?} is not a valid MQTT topic name: it {why}"
                    ));
                    continue;
                }
            };
            let body = payload(e, self.format);
            // Topic length, topic, packet id, payload (§3.3.2, §3.3.3).
            let size = 2 + topic.0.len() + 2 + body.len();
            if size > MAX_REMAINING_LENGTH {
                rejected.push(format!(
                    "{who}: a PUBLISH of {size} bytes is larger than MQTT's limit of {MAX_REMAINING_LENGTH}"
                ));
                continue;
            }
            items.push(Item {
                topic,
                payload: body,
            });
        }
        (items, rejected)
    }
}

impl Sink for MqttSink {
    /// Two: the driver sends the batches in the order their deliveries
    /// queued them, and a failed batch is simply sent again (the sink
    /// delivers at least once and skips nothing). Why it matters: with one
    /// batch at a time, a broker with Nagle's algorithm on (Mosquitto's
    /// default) holds the batch's last PUBACKs until the hub's delayed TCP
    /// acknowledgement, up to 40 ms on Linux, since the hub has nothing
    /// more to send; with the next batch's PUBLISHes going out meanwhile,
    /// they carry that acknowledgement at once.
    fn overlap(&self) -> usize {
        2
    }

    fn deliver<'a>(&'a self, events: &'a [SinkEvent]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let (items, rejected) = self.items(events);
            // Nothing is published when something in the batch cannot be:
            // the runner then delivers the events one at a time, and a
            // broker (unlike a JetStream stream) would keep the copies
            // published now as duplicates.
            if rejected.is_empty() && !items.is_empty() {
                let stopped =
                    || SinkError::Transient(format!("broker {}: the sink is stopped", self.broker));
                let (reply, answer) = oneshot::channel();
                self.jobs
                    .send(Job { items, reply })
                    .await
                    .map_err(|_| stopped())?;
                answer.await.map_err(|_| stopped())??;
            }
            match rejected.len() {
                0 => Ok(()),
                n => Err(SinkError::Rejected(format!(
                    "{n} of {} events cannot be published (none of the batch was): {}",
                    events.len(),
                    rejected.join("; ")
                ))),
            }
        })
    }
}

/// What the event loop of one connection reports.
enum Wire {
    /// The broker accepted the CONNECT.
    Up,
    /// A PUBLISH went out with this packet id.
    Sent(u16),
    /// A PUBACK for this packet id.
    Ack(u16),
}

/// Why one connection ended.
enum End {
    /// `stop` was cancelled.
    Stop,
    /// The sink was dropped: no batch can come any more.
    Closed,
    /// The connection failed or was given up; it is remade.
    Lost(String),
}

/// Polls one connection's event loop until it fails; it never reconnects
/// (the driver makes a new event loop instead, see the module doc).
async fn pump(mut el: EventLoop, tx: mpsc::UnboundedSender<Wire>) -> ConnectionError {
    loop {
        let wire = match el.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => Wire::Up,
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Wire::Sent(pkid),
            Ok(Event::Incoming(Packet::PubAck(a))) => Wire::Ack(a.pkid),
            Ok(_) => continue,
            Err(e) => return e,
        };
        // The receiver lives as long as this future is polled.
        let _ = tx.send(wire);
    }
}

/// Waits for `f` if there is one; pending forever otherwise (a disabled
/// `select!` branch).
async fn pending_or<F: std::future::Future + Unpin>(f: &mut Option<F>) -> F::Output {
    match f.as_mut() {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// A batch on the connection: fed to the event loop in whole or in part,
/// waiting for its PUBACKs.
struct InFlight {
    n: usize,
    /// Its PUBLISHes the event loop has sent (packet ids known).
    sent: usize,
    acked: usize,
    started: Instant,
    reply: oneshot::Sender<Result<(), SinkError>>,
}

/// The sink's one task: connects, publishes the batches in the order they
/// come, reconnects with backoff.
struct Driver {
    broker: String,
    options: MqttOptions,
    network: NetworkOptions,
    /// rumqttc's request queue; PUBLISHes beyond `max_inflight` wait there.
    capacity: usize,
    jobs: mpsc::Receiver<Job>,
    stop: CancellationToken,
    retry_min: Duration,
    retry_max: Duration,
    /// Why the last connection failed, for the batches refused meanwhile.
    last_error: String,
}

impl Driver {
    async fn run(mut self) {
        let mut backoff = self.retry_min;
        let mut last_warning: Option<Instant> = None;
        'connections: loop {
            let (end, lived) = self.connection().await;
            let why = match end {
                End::Stop | End::Closed => break,
                End::Lost(why) => why,
            };
            if let Some(lived) = lived {
                // Only a connection that lasted resets the backoff, so that
                // a broker that drops the sink at once (another client with
                // its client id, say) is not hammered.
                if lived > self.retry_max {
                    backoff = self.retry_min;
                }
                tracing::warn!(error = %why, "Connection to the sink's broker lost; reconnecting.");
                last_warning = Some(clock::tokio_now());
            } else if last_warning.is_none_or(|t| clock::tokio_elapsed(t) >= WARN_EVERY) {
                tracing::warn!(error = %why, "Sink's broker unreachable; retrying.");
                last_warning = Some(clock::tokio_now());
            } else {
                tracing::debug!(error = %why, "Sink's broker unreachable; retrying.");
            }
            self.last_error = why;
            // Batches that come while the broker is away fail at once: the
            // runner has its own backoff, and holds the events meanwhile.
            let wake = clock::tokio_now() + backoff;
            loop {
                tokio::select! {
                    biased;
                    () = self.stop.cancelled() => break 'connections,
                    () = tokio::time::sleep_until(wake) => break,
                    job = self.jobs.recv() => match job {
                        Some(job) => {
                            let _ = job.reply.send(Err(SinkError::Transient(format!(
                                "broker {}: not connected: {}",
                                self.broker, self.last_error
                            ))));
                        }
                        None => break 'connections,
                    },
                }
            }
            backoff = backoff.saturating_mul(2).min(self.retry_max);
        }
        tracing::debug!("MQTT sink stopped.");
    }

    /// One connection, from CONNECT to its end; how long it was up, if it
    /// got its CONNACK.
    async fn connection(&mut self) -> (End, Option<Duration>) {
        let (client, mut el) = AsyncClient::new(self.options.clone(), self.capacity);
        el.set_network_options(self.network.clone());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let pump = pump(el, tx);
        tokio::pin!(pump);
        // Batches wait in their queue while the attempt is under way: it is
        // bounded by the connection timeout.
        loop {
            tokio::select! {
                biased;
                () = self.stop.cancelled() => return (End::Stop, None),
                wire = rx.recv() => match wire {
                    Some(Wire::Up) => break,
                    Some(Wire::Sent(_) | Wire::Ack(_)) => {}
                    None => return (End::Lost("the event loop ended".into()), None),
                },
                e = &mut pump => return (End::Lost(e.to_string()), None),
            }
        }
        tracing::info!("Connected to the sink's broker.");
        let up = clock::tokio_now();
        let end = self.serve(&client, &mut rx, pump.as_mut()).await;
        let lived = clock::tokio_elapsed(up);
        if matches!(end, End::Stop | End::Closed) {
            // A DISCONNECT tells the broker the close is on purpose; the
            // pump ends when the broker closes the connection, or we give up.
            let _ = client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_millis(500), &mut pump).await;
        }
        (end, Some(lived))
    }

    /// Publishes batches on a connected event loop until the connection
    /// ends, taking the next batch while earlier ones wait for their
    /// PUBACKs. `pump` has not completed yet; when it does, this returns at
    /// once, and the caller must not poll it again.
    ///
    /// Why PUBACKs are matched to batches by packet id rather than counted:
    /// with more than one batch on the connection, a count would say which
    /// batch is done only if the broker acknowledges in the order it
    /// received; MQTT 3.1.1 asks that of it (§4.6), but a batch reported
    /// accepted too early is recorded, and lost if its missing PUBLISH is.
    /// rumqttc reports each PUBLISH it writes with its packet id, in the
    /// order they were queued, and batches are queued one after the other,
    /// so each packet id is known to belong to one batch.
    async fn serve<F>(
        &mut self,
        client: &AsyncClient,
        rx: &mut mpsc::UnboundedReceiver<Wire>,
        mut pump: std::pin::Pin<&mut F>,
    ) -> End
    where
        F: std::future::Future<Output = ConnectionError>,
    {
        // Batches on the connection, by arrival; the batch of each packet id
        // awaiting its PUBACK; PUBLISHes not yet queued to rumqttc.
        let mut flights: BTreeMap<u64, InFlight> = BTreeMap::new();
        let mut owners: HashMap<u16, u64> = HashMap::new();
        let mut unfed: VecDeque<Vec<Item>> = VecDeque::new();
        let mut next = 0u64;
        let mut feed: Option<BoxFuture<'static, Result<(), rumqttc::ClientError>>> = None;
        let stall = tokio::time::sleep(ACK_STALL);
        tokio::pin!(stall);
        let end = loop {
            if feed.is_none() {
                if let Some(items) = unfed.pop_front() {
                    let client = client.clone();
                    feed = Some(Box::pin(async move {
                        for item in items {
                            client
                                .publish(item.topic.0, QoS::AtLeastOnce, false, item.payload)
                                .await?;
                        }
                        Ok(())
                    }));
                }
            }
            tokio::select! {
                biased;
                () = self.stop.cancelled() => break End::Stop,
                e = &mut pump => break End::Lost(e.to_string()),
                wire = rx.recv() => match wire {
                    Some(Wire::Sent(pkid)) => {
                        // The oldest batch not yet sent in full: PUBLISHes
                        // go out in the order they were queued.
                        if let Some((id, f)) = flights.iter_mut().find(|(_, f)| f.sent < f.n) {
                            f.sent += 1;
                            owners.insert(pkid, *id);
                        }
                    }
                    Some(Wire::Ack(pkid)) => {
                        stall.as_mut().reset(clock::tokio_now() + ACK_STALL);
                        let Some(id) = owners.remove(&pkid) else {
                            // Not ours to count; rumqttc already refuses
                            // a PUBACK for a packet id it did not send.
                            continue;
                        };
                        let done = flights.get_mut(&id).is_some_and(|f| {
                            f.acked += 1;
                            f.acked >= f.n
                        });
                        if let Some(f) = done.then(|| flights.remove(&id)).flatten() {
                            tracing::debug!(
                                events = f.n,
                                ms = clock::tokio_elapsed(f.started).as_millis() as u64,
                                "Batch acknowledged by the broker."
                            );
                            let _ = f.reply.send(Ok(()));
                        }
                    }
                    Some(Wire::Up) => {}
                    None => break End::Lost("the event loop ended".into()),
                },
                r = pending_or(&mut feed) => match r {
                    Ok(()) => feed = None,
                    Err(e) => break End::Lost(format!("publish not queued: {e}")),
                },
                () = &mut stall, if !flights.is_empty() => {
                    let waiting: usize = flights.values().map(|f| f.n - f.acked).sum();
                    break End::Lost(format!(
                        "no PUBACK for {} s with {waiting} publishes unacknowledged",
                        ACK_STALL.as_secs()
                    ));
                }
                job = self.jobs.recv() => match job {
                    Some(job) => {
                        if job.reply.is_closed() {
                            // Its `deliver` was dropped: nobody waits for the answer.
                            continue;
                        }
                        if flights.is_empty() {
                            stall.as_mut().reset(clock::tokio_now() + ACK_STALL);
                        }
                        let Job { items, reply } = job;
                        flights.insert(next, InFlight {
                            n: items.len(),
                            sent: 0,
                            acked: 0,
                            started: clock::tokio_now(),
                            reply,
                        });
                        next += 1;
                        unfed.push_back(items);
                    }
                    None => break End::Closed,
                },
            }
        };
        let why = match &end {
            End::Lost(why) => why.clone(),
            End::Stop | End::Closed => "the sink is stopping".into(),
        };
        for f in flights.into_values() {
            let _ = f.reply.send(Err(SinkError::Transient(format!(
                "broker {}: {} of {} publishes acknowledged, then: {why}",
                self.broker, f.acked, f.n
            ))));
        }
        end
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use outpost_protocols::{
        AgentId, Event, EventBody, Quality, Seq, StreamName, Timestamp, Value,
    };

    use super::*;
    use crate::sinks::config::SinkKind;

    fn config(extra: &str) -> SinkConfig {
        toml::from_str(&format!(
            "id = \"cloud\"\nkind = \"mqtt\"\n[mqtt]\nbroker = \"127.0.0.1:1\"\nclient_id = \"hub\"\n{extra}"
        ))
        .expect("config")
    }

    fn config_error(c: &SinkConfig, base: &Path) -> (String, String) {
        let SinkKind::Mqtt(table) = &c.kind else {
            panic!("mqtt");
        };
        match Settings::read(&c.id, table, base) {
            Err(SinkError::Config { key, message, .. }) => (key, message),
            Err(e) => panic!("not a config error: {e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    fn event(labels: &[(&str, &str)]) -> SinkEvent {
        SinkEvent {
            queued_at: 0,
            event: Event {
                agent_id: AgentId::parse("gw-1").expect("id"),
                seq: Seq(9),
                body: EventBody {
                    stream: StreamName::parse("plc1/temp").expect("stream"),
                    ts: Timestamp(1),
                    value: Value::I64(5),
                    quality: Quality::Good,
                    attrs: BTreeMap::new(),
                },
            },
            labels: Arc::new(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
        }
    }

    #[test]
    fn topic_names_follow_mqtt_rules() {
        assert!(TopicName::parse("a/b/c".into()).is_ok());
        assert!(TopicName::parse("$aws/rules/x".into()).is_ok());
        assert_eq!(TopicName::parse(String::new()), Err(TopicError::Empty));
        assert_eq!(
            TopicName::parse("a/+/b".into()),
            Err(TopicError::Wildcard('+'))
        );
        assert_eq!(
            TopicName::parse("a/#".into()),
            Err(TopicError::Wildcard('#'))
        );
        assert_eq!(TopicName::parse("a\0b".into()), Err(TopicError::Nul));
        assert!(TopicName::parse("x".repeat(65535)).is_ok());
        assert_eq!(
            TopicName::parse("x".repeat(65536)),
            Err(TopicError::TooLong(65536))
        );
    }

    #[test]
    fn broker_addresses_are_host_and_port() {
        assert_eq!(
            parse_broker("mqtt.example.net:8883"),
            Ok(("mqtt.example.net".into(), 8883))
        );
        assert_eq!(parse_broker("[::1]:1883"), Ok(("[::1]".into(), 1883)));
        for bad in [
            "mqtt.example.net",
            "mqtts://mqtt.example.net:8883",
            "host:0",
            "host:65536",
            ":1883",
            "::1:1883",
            "[zz]:1883",
            "a b:1",
        ] {
            assert!(parse_broker(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn settings_that_cannot_work_name_their_key() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("not-pem.pem"), "hello").expect("write");
        let cases = [
            ("max_inflight = 0", "mqtt.max_inflight"),
            ("topic = \"a/+/{stream}\"", "mqtt.topic"),
            ("topic = \"a/{strem}\"", "mqtt.topic"),
            ("topic = \"\"", "mqtt.topic"),
            ("password_file = \"pw\"", "mqtt.password_file"),
            (
                "username = \"u\"\npassword_file = \"missing\"",
                "mqtt.password_file",
            ),
            ("username = \"\"", "mqtt.username"),
            ("[mqtt.tls]\nca = \"missing.pem\"", "mqtt.tls.ca"),
            ("[mqtt.tls]\nca = \"not-pem.pem\"", "mqtt.tls.ca"),
        ];
        for (lines, want) in cases {
            let (key, message) = config_error(&config(lines), dir.path());
            assert_eq!(key, want, "{lines}: {message}");
        }
        let (_, message) = config_error(&config("[mqtt.tls]\nca = \"not-pem.pem\""), dir.path());
        assert!(message.contains("not-pem.pem"), "{message}");
        let mut c = config("");
        if let SinkKind::Mqtt(m) = &mut c.kind {
            m.broker = "nope".into();
        }
        assert_eq!(config_error(&c, dir.path()).0, "mqtt.broker");
        if let SinkKind::Mqtt(m) = &mut c.kind {
            m.broker = "127.0.0.1:1".into();
            m.client_id = String::new();
        }
        assert_eq!(config_error(&c, dir.path()).0, "mqtt.client_id");
    }

    #[test]
    fn the_first_line_of_the_password_file_is_the_password() {
        let dir = tempfile::tempdir().expect("dir");
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\r\nignored\n").expect("write");
        assert_eq!(read_password(&f).as_deref(), Ok("s3cret"));
        std::fs::write(&f, "").expect("write");
        assert_eq!(read_password(&f).as_deref(), Ok(""));
    }

    #[tokio::test]
    async fn invalid_topics_are_rejected_and_the_others_kept() {
        let (jobs, _rx) = mpsc::channel(1);
        let sink = MqttSink {
            broker: "b:1".into(),
            topic: "f/{label.site}/{stream}".into(),
            format: PayloadFormat::Raw,
            jobs,
        };
        let (items, rejected) =
            sink.items(&[event(&[("site", "a+b")]), event(&[("site", "lyon")])]);
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].topic.0, "f/lyon/plc1/temp");
        assert_eq!(items[0].payload, b"5");
        assert_eq!(rejected.len(), 1);
        assert!(rejected[0].contains("gw-1:9"), "{}", rejected[0]);
        assert!(rejected[0].contains("'+'"), "{}", rejected[0]);
    }
}
