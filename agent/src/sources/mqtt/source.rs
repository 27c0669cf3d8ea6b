//! The thin driver of the MQTT subscriber session: sockets, TLS, reconnects.
//!
//! It makes no protocol decisions. It reads packets into [`Session`], hands new
//! messages to the outbox, and feeds each commit back to the session in the
//! order the messages arrived, which is the order MQTT requires for
//! acknowledgements.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::BytesMut;
use futures::stream::{FuturesOrdered, StreamExt};
use outpost_protocols::sparkplug::{Host, HostOptions, Output};
use outpost_protocols::wire::MAX_BODY_LEN;
use outpost_protocols::{EventBody, Quality, Reason, StreamName, Timestamp, Value};
use rumqttc::mqttbytes::v4::{Packet, Publish};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::session::{Ack, Session, SessionError, SessionEvent, SessionOptions};
use crate::clock;
use crate::config::{MqttSettings, WriteBridge};
use crate::metrics::{Metrics, QosLabels};
use crate::outbox::{OutboxError, OutboxHandle, Qos2Op};
use crate::sources::{bridge_write_record, DeviceOp, WriteCommand};

/// Errors that end one connection; the source reconnects after each.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MqttError {
    /// TCP or TLS failed.
    #[error("connection to {addr}: {source}")]
    Io {
        /// The broker.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The broker sent bytes that are not MQTT 3.1.1.
    #[error("malformed packet from the broker: {0}")]
    Codec(String),
    /// The session ended.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The outbox refused to commit; nothing was acknowledged.
    #[error("outbox: {0}")]
    Outbox(#[from] OutboxError),
    /// The TLS configuration is unusable.
    #[error(transparent)]
    Tls(#[from] outpost_tls::TlsError),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What a pending commit will acknowledge.
enum Then {
    Ack(Ack),
    Release(u16),
}

type Commit = Pin<Box<dyn Future<Output = (Result<usize, OutboxError>, Vec<Then>)> + Send>>;

/// Tells the session that the commit holding these messages is durable, so
/// their acknowledgements may go out, in the order they were received.
fn settle(session: &mut Session, thens: Vec<Then>) {
    for then in thens {
        match then {
            Then::Ack(ack) => session.committed(ack),
            Then::Release(pkid) => session.released(pkid),
        }
    }
}

/// The messages of one read, stored in one outbox request: a read from the
/// socket usually holds many PUBLISH packets, and one request (one seq range,
/// one reply) for all of them keeps the per-message cost to the codec and the
/// insert.
#[derive(Default)]
struct Group {
    bodies: Vec<EventBody>,
    qos2: Vec<Qos2Op>,
    thens: Vec<Then>,
    messages: usize,
}

impl Group {
    fn flush(
        &mut self,
        outbox: &OutboxHandle,
        metrics: &Arc<Metrics>,
        commits: &mut FuturesOrdered<Commit>,
    ) {
        if self.thens.is_empty() {
            return;
        }
        let Group {
            bodies,
            qos2,
            thens,
            messages,
        } = std::mem::take(self);
        if bodies.is_empty() && qos2.is_empty() {
            // Nothing to store (QoS 0/1 commands for a bridge): the
            // acknowledgements need no commit, but still keep their order.
            commits.push_back(Box::pin(async move { (Ok(messages), thens) }));
            return;
        }
        let h = outbox.clone();
        let metrics = metrics.clone();
        commits.push_back(Box::pin(async move {
            let r = h.append(bodies, qos2).await;
            if let Ok(outcome) = &r {
                metrics.accepted("mqtt", outcome.accepted as u64);
            }
            (r.map(|_| messages), thens)
        }));
    }
}

/// The MQTT source: subscribes to the site broker and stores what arrives.
pub struct MqttSource {
    settings: MqttSettings,
    write_bridges: Vec<WriteBridge>,
    /// One command channel per Modbus device, indexed like the config's devices.
    device_writers: Vec<mpsc::Sender<WriteCommand>>,
    outbox: OutboxHandle,
    metrics: Arc<Metrics>,
    /// `outpost_mqtt_messages_total` for QoS 0, 1, 2, looked up once.
    qos_counters: [prometheus_client::metrics::counter::Counter; 3],
}

/// Stop reading from the broker while this many messages wait for their
/// commit: a QoS 0 flood must not grow memory without bound.
const MAX_PENDING_MESSAGES: usize = 8192;

impl MqttSource {
    /// A source for these settings.
    pub fn new(
        settings: MqttSettings,
        write_bridges: Vec<WriteBridge>,
        device_writers: Vec<mpsc::Sender<WriteCommand>>,
        outbox: OutboxHandle,
        metrics: Arc<Metrics>,
    ) -> MqttSource {
        let qos_counters = ["0", "1", "2"].map(|q| {
            metrics
                .mqtt_messages
                .get_or_create(&QosLabels { qos: q.into() })
                .clone()
        });
        MqttSource {
            settings,
            write_bridges,
            device_writers,
            outbox,
            metrics,
            qos_counters,
        }
    }

    fn subscriptions(&self) -> Vec<(String, u8)> {
        let mut subs: BTreeMap<String, u8> = BTreeMap::new();
        for s in &self.settings.subscriptions {
            let q = subs.entry(s.filter.as_str().to_owned()).or_insert(0);
            *q = (*q).max(s.qos);
        }
        for b in &self.write_bridges {
            let q = subs.entry(b.from.as_str().to_owned()).or_insert(0);
            *q = (*q).max(b.qos);
        }
        for s in &self.settings.sparkplug {
            let q = subs.entry(s.filter.as_str().to_owned()).or_insert(0);
            *q = (*q).max(s.qos);
        }
        subs.into_iter().collect()
    }

    /// Runs until `shutdown`, reconnecting with backoff.
    pub async fn run(self, shutdown: CancellationToken) {
        let addr = format!("{}:{}", self.settings.host, self.settings.port);
        let mut backoff = self.settings.reconnect_min;
        // A Sparkplug host's state outlives a connection: a gap across a
        // reconnect is a gap like any other.
        let mut hosts: Vec<Host> = self
            .settings
            .sparkplug
            .iter()
            .map(|s| {
                Host::new(HostOptions {
                    rebirth: s.rebirth,
                    rebirth_interval: s.rebirth_interval,
                })
            })
            .collect();
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let started = clock::now();
            match self.connect_and_serve(&addr, &shutdown, &mut hosts).await {
                Ok(()) => return,
                Err(e) => {
                    self.metrics.mqtt_connected.set(0);
                    warn!(broker = %addr, error = %e, "MQTT connection lost; reconnecting.");
                }
            }
            // A connection that lived a while resets the backoff.
            if clock::elapsed(started) > self.settings.reconnect_max {
                backoff = self.settings.reconnect_min;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.settings.reconnect_max);
            self.metrics.kpi.mqtt_reconnects.inc();
        }
    }

    async fn connect(&self, addr: &str) -> Result<Box<dyn Io>, MqttError> {
        let io_err = |source| MqttError::Io {
            addr: addr.to_owned(),
            source,
        };
        let tcp = TcpStream::connect(addr).await.map_err(io_err)?;
        tcp.set_nodelay(true).map_err(io_err)?;
        let Some(tls) = &self.settings.tls else {
            return Ok(Box::new(tcp));
        };
        let client = match (&tls.cert, &tls.key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            _ => None,
        };
        let config = Arc::new(outpost_tls::client_config(outpost_tls::ClientFiles {
            ca: &tls.ca,
            client,
            server_name: None,
        })?);
        let name = tls
            .server_name
            .clone()
            .unwrap_or_else(|| self.settings.host.clone());
        let server_name = rustls::pki_types::ServerName::try_from(name.clone()).map_err(|e| {
            io_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("invalid TLS server name {name:?}: {e}"),
            ))
        })?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(server_name, tcp)
            .await
            .map_err(io_err)?;
        Ok(Box::new(stream))
    }

    async fn connect_and_serve(
        &self,
        addr: &str,
        shutdown: &CancellationToken,
        hosts: &mut [Host],
    ) -> Result<(), MqttError> {
        let mut io = self.connect(addr).await?;
        let pending = self.outbox.qos2_pending().await?;
        let opts = SessionOptions {
            client_id: self.settings.client_id.clone(),
            login: self.settings.login.clone(),
            keep_alive: self.settings.keep_alive,
            clean_session: self.settings.clean_session,
            subscriptions: self.subscriptions(),
        };
        let mut session = Session::new(opts, pending, clock::now());
        // A packet must be read whole to be acknowledged, and one that is never
        // acknowledged is redelivered forever; so the read limit is MQTT's own
        // maximum (3.1.1 section 2.2.3) and `max_payload` decides what is
        // stored. Bound what the broker sends with its `message_size_limit`.
        let hard_limit = 268_435_455;
        let mut rbuf = BytesMut::with_capacity(64 * 1024);
        let mut wbuf = BytesMut::with_capacity(64 * 1024);
        let mut commits: FuturesOrdered<Commit> = FuturesOrdered::new();
        let mut group = Group::default();
        let mut inflight = 0usize;

        let result = loop {
            // Outputs first, in the documented order.
            if let Err(e) = self.flush(&mut session, &mut io, &mut wbuf).await {
                break Err(e);
            }
            let mut ncmds = Vec::new();
            while let Some(ev) = session.poll_event() {
                self.on_event(ev, &mut group, hosts, &mut ncmds).await;
            }
            let publish_now = !ncmds.is_empty();
            for (topic, payload) in ncmds {
                session.publish(topic, payload);
            }
            if publish_now {
                // The NCMDs go out before the next wait.
                if let Err(e) = self.flush(&mut session, &mut io, &mut wbuf).await {
                    break Err(e);
                }
            }
            inflight += group.messages;
            group.flush(&self.outbox, &self.metrics, &mut commits);
            self.metrics.mqtt_inflight.set(inflight as i64);
            let deadline = tokio::time::Instant::from_std(session.poll_timeout());
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break Ok(()),
                Some((res, thens)) = commits.next(), if !commits.is_empty() => {
                    match res {
                        Ok(n) => {
                            inflight = inflight.saturating_sub(n);
                            settle(&mut session, thens);
                        }
                        Err(e) => break Err(e.into()),
                    }
                }
                read = io.read_buf(&mut rbuf), if inflight < MAX_PENDING_MESSAGES => {
                    match read {
                        Ok(0) => break Err(MqttError::Io { addr: addr.to_owned(), source: std::io::ErrorKind::UnexpectedEof.into() }),
                        Ok(_) => {
                            if let Err(e) = self.parse_packets(&mut session, &mut rbuf, hard_limit) {
                                break Err(e);
                            }
                        }
                        Err(e) => break Err(MqttError::Io { addr: addr.to_owned(), source: e }),
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    if let Err(e) = session.handle_timeout(clock::now()) {
                        break Err(e.into());
                    }
                }
            }
        };

        // Whatever happened, every message handed to the outbox is committed
        // (or has failed) before the connection goes: on shutdown its
        // acknowledgement still reaches the broker; after an error the broker
        // redelivers it and the stored packet ids recognise QoS 2 copies.
        while let Some((res, thens)) = commits.next().await {
            if res.is_ok() {
                settle(&mut session, thens);
            }
        }
        self.metrics.mqtt_inflight.set(0);
        if result.is_ok() {
            let _ = self.flush(&mut session, &mut io, &mut wbuf).await;
            wbuf.clear();
            let _ = Packet::Disconnect.write(&mut wbuf, usize::MAX);
            let _ = io.write_all(&wbuf).await;
            let _ = io.shutdown().await;
            info!(broker = %addr, "MQTT source stopped.");
        }
        result
    }

    async fn flush(
        &self,
        session: &mut Session,
        io: &mut Box<dyn Io>,
        wbuf: &mut BytesMut,
    ) -> Result<(), MqttError> {
        wbuf.clear();
        while let Some(p) = session.poll_transmit(clock::now()) {
            p.write(wbuf, usize::MAX)
                .map_err(|e| MqttError::Codec(e.to_string()))?;
        }
        if !wbuf.is_empty() {
            io.write_all(wbuf).await.map_err(|source| MqttError::Io {
                addr: format!("{}:{}", self.settings.host, self.settings.port),
                source,
            })?;
        }
        Ok(())
    }

    fn parse_packets(
        &self,
        session: &mut Session,
        rbuf: &mut BytesMut,
        hard_limit: usize,
    ) -> Result<(), MqttError> {
        loop {
            match Packet::read(rbuf, hard_limit) {
                Ok(p) => session.handle_packet(clock::now(), p)?,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => return Ok(()),
                Err(e) => return Err(MqttError::Codec(e.to_string())),
            }
        }
    }

    async fn on_event(
        &self,
        ev: SessionEvent,
        group: &mut Group,
        hosts: &mut [Host],
        ncmds: &mut Vec<(String, Vec<u8>)>,
    ) {
        match ev {
            SessionEvent::Connected { session_present } => {
                self.metrics.mqtt_connected.set(1);
                info!(broker = %self.settings.host, session_present, "Connected to the site broker.");
            }
            SessionEvent::SubscribeFailed { filter } => {
                warn!(%filter, "The broker refused a subscription.");
            }
            SessionEvent::Duplicate { pkid } => {
                self.metrics.mqtt_qos2_duplicates.inc();
                debug!(pkid, "QoS 2 redelivery recognised; not stored again.");
            }
            SessionEvent::Release { pkid } => {
                group.qos2.push(Qos2Op::Released(pkid));
                group.thens.push(Then::Release(pkid));
            }
            SessionEvent::Message { publish, ack } => {
                let i = match publish.qos {
                    QoS::AtMostOnce => 0,
                    QoS::AtLeastOnce => 1,
                    QoS::ExactlyOnce => 2,
                };
                self.qos_counters[i].inc();
                if publish.dup && publish.qos == QoS::AtLeastOnce {
                    self.metrics.mqtt_qos1_redelivered.inc();
                }
                if !self.write_bridges.is_empty() {
                    self.dispatch_writes(&publish, &mut group.bodies);
                }
                let sparkplug = self
                    .settings
                    .sparkplug
                    .iter()
                    .position(|s| s.filter.matches(&publish.topic));
                match sparkplug {
                    Some(i) if publish.payload.len() <= self.settings.max_payload => {
                        if let Some(host) = hosts.get_mut(i) {
                            self.sparkplug(host, &publish, group, ncmds);
                        }
                    }
                    _ => {
                        if let Some(body) = self.to_event(&publish) {
                            group.bodies.push(body);
                        }
                    }
                }
                if let Ack::PubRec(pkid) = ack {
                    group.qos2.push(Qos2Op::Received(pkid));
                }
                group.thens.push(Then::Ack(ack));
                group.messages += 1;
            }
        }
    }

    /// Feeds a Sparkplug B message to its host: the events it makes go to
    /// the group, its rebirth requests to `ncmds`.
    fn sparkplug(
        &self,
        host: &mut Host,
        publish: &Publish,
        group: &mut Group,
        ncmds: &mut Vec<(String, Vec<u8>)>,
    ) {
        let now_ns = clock::unix_now().0;
        if let Err(e) = host.handle_message(clock::now(), now_ns, &publish.topic, &publish.payload)
        {
            self.metrics.sparkplug_skipped.inc();
            debug!(topic = %publish.topic, error = %e, "Not a Sparkplug B topic; message not stored.");
            return;
        }
        while let Some(out) = host.poll_output() {
            match out {
                Output::Sample(mut body) => {
                    fit_uplink(&mut body, &self.metrics);
                    group.bodies.push(body);
                }
                Output::Rebirth {
                    topic,
                    payload,
                    reason,
                } => {
                    self.metrics.sparkplug_rebirths.inc();
                    info!(%topic, %reason, "Asking a Sparkplug edge node for a rebirth.");
                    ncmds.push((topic, payload));
                }
                Output::Skipped { topic, why } => {
                    self.metrics.sparkplug_skipped.inc();
                    debug!(%topic, %why, "Sparkplug metric not stored.");
                }
                _ => {}
            }
        }
    }

    /// The event for a message, if one of the store subscriptions matches.
    fn to_event(&self, publish: &Publish) -> Option<EventBody> {
        let sub = self
            .settings
            .subscriptions
            .iter()
            .find(|s| s.filter.matches(&publish.topic))?;
        let now = clock::unix_now().0;
        let stream = match StreamName::parse(&publish.topic) {
            Ok(s) => s,
            Err(e) => {
                warn!(topic = %publish.topic, error = %e, "Topic is not a valid stream name; message not stored.");
                return None;
            }
        };
        let mut attrs = BTreeMap::new();
        if publish.retain {
            attrs.insert("retain".to_owned(), "true".to_owned());
        }
        let (value, quality) = if publish.payload.len() > self.settings.max_payload {
            self.metrics.mqtt_oversize.inc();
            warn!(topic = %publish.topic, size = publish.payload.len(), max = self.settings.max_payload, "Payload over max_payload; recorded as bad quality without its bytes.");
            (
                Value::Bytes(Vec::new()),
                Quality::Bad(Reason::Other(format!(
                    "payload of {} bytes exceeds max_payload {}",
                    publish.payload.len(),
                    self.settings.max_payload
                ))),
            )
        } else {
            (Value::from_payload(&publish.payload), Quality::Good)
        };
        let ts = match (&sub.ts_field, &value) {
            (Some((pointer, unit)), Value::Json(j)) => j
                .to_value()
                .pointer(pointer)
                .and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)))
                .and_then(|t| t.checked_mul(*unit))
                .unwrap_or(now),
            _ => now,
        };
        let mut body = EventBody {
            stream,
            ts: Timestamp(ts),
            value,
            quality,
            attrs,
        };
        // An event the uplink can never send would stop every event behind
        // it, so one over the wire's limit (possible only with a
        // `max_payload` above it) is kept like an oversize payload: on its
        // topic, bad quality, without its bytes. The check encodes only
        // payloads that come near the limit.
        if publish.payload.len() + publish.topic.len() + 64 > MAX_BODY_LEN {
            let len = body.encode().len();
            if len > MAX_BODY_LEN {
                self.metrics.mqtt_oversize.inc();
                warn!(topic = %publish.topic, size = publish.payload.len(), event = len, max = MAX_BODY_LEN, "Event over the uplink's size limit; recorded as bad quality without its bytes.");
                body.value = Value::Bytes(Vec::new());
                body.quality = Quality::Bad(Reason::Other(format!(
                    "payload of {} bytes makes an event of {len} bytes, over the uplink's limit of {MAX_BODY_LEN}",
                    publish.payload.len()
                )));
            }
        }
        Some(body)
    }

    /// Hands a message to the device of each write bridge it is for; the
    /// device's task records what it did. A write it cannot hand over is
    /// recorded here, into `records`, which commit with the message.
    fn dispatch_writes(&self, publish: &Publish, records: &mut Vec<EventBody>) {
        for b in &self.write_bridges {
            if !b.from.matches(&publish.topic) {
                continue;
            }
            let value = Value::from_payload(&publish.payload);
            let refused = match self.device_writers.get(b.device) {
                Some(tx) => {
                    let cmd = WriteCommand {
                        tag: b.tag,
                        op: DeviceOp::Write(value.clone()),
                        topic: publish.topic.clone(),
                        reply: None,
                    };
                    // A full queue means the device is far behind; waiting
                    // here would stall every subscription, so the write is
                    // refused and logged.
                    tx.try_send(cmd).is_err()
                }
                None => true,
            };
            if refused {
                self.metrics.bridge_dropped.inc();
                warn!(topic = %publish.topic, "Modbus write queue full or device stopped; write dropped.");
                let (device, tag) = b
                    .stream
                    .as_str()
                    .split_once('/')
                    .unwrap_or((b.stream.as_str(), ""));
                records.push(bridge_write_record(
                    clock::unix_now(),
                    &publish.topic,
                    device,
                    tag,
                    &value,
                    "failed",
                    Some("the device's write queue is full or its task stopped; not written"),
                ));
            }
        }
    }
}

/// Keeps a Sparkplug event the uplink could never send (possible only with
/// a `max_payload` over the wire's limit) as `to_event` keeps an MQTT one:
/// on its stream, bad quality, without its bytes.
fn fit_uplink(body: &mut EventBody, metrics: &Metrics) {
    if body.value.payload_len() + body.stream.as_str().len() + 64 <= MAX_BODY_LEN {
        return;
    }
    let len = body.encode().len();
    if len > MAX_BODY_LEN {
        metrics.mqtt_oversize.inc();
        warn!(stream = %body.stream, event = len, max = MAX_BODY_LEN, "Event over the uplink's size limit; recorded as bad quality without its bytes.");
        body.value = Value::Bytes(Vec::new());
        body.quality = Quality::Bad(Reason::Other(format!(
            "an event of {len} bytes, over the uplink's limit of {MAX_BODY_LEN}"
        )));
    }
}
