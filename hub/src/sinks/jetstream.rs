//! The NATS JetStream sink: each event is one JetStream publish, accepted
//! when the stream's publish acknowledgement (PubAck) says it is stored.
//!
//! Why one publish per event rather than one message per batch: consumers of
//! a stream filter and fan out by subject, so each event needs its own
//! subject; and JetStream deduplicates by message, so a batch delivered again
//! after an error is stored once only if each event carries its own id. The
//! publishes of a batch are pipelined (all sent, then all acks awaited) so a
//! batch costs about one round trip, not one per event.
//!
//! ```text
//! HPUB <subject> <inbox> …
//! Nats-Msg-Id: <agent_id>:<seq>
//! Nats-Expected-Stream: <stream>
//!
//! <payload: the event as JSON (`json`) or the value's own bytes (`raw`)>
//! ```
//!
//! Why `Nats-Msg-Id` is `<agent_id>:<seq>`: that pair is the event's identity
//! across the fleet, so the stream drops a repeat within its duplicate window
//! (`duplicate_window`, two minutes by default) and answers it with a PubAck
//! marked `duplicate`, which is success here (the stream has the event).
//! Past the window the stream stores a repeat again, so a sink that may have
//! delivered part of a batch already (at start, and after a failed delivery,
//! whose publishes may have been stored with their acknowledgements lost)
//! first asks the stream for its last message on each of the batch's
//! subjects and skips the events at or below that agent's seq there
//! ([`JetStreamSink::already_stored`]). With the default subject template
//! (`{agent_id}` in it) that makes a delivery after any outage store each
//! event once.
//!
//! Why `Nats-Expected-Stream`: the hub never creates or changes streams, and
//! a subject captured by some other stream than the configured one would
//! otherwise be stored there without a word. With the header the server
//! refuses such a publish, and the sink answers [`SinkError::Transient`] with
//! a message that names both: an operator can fix the streams while the hub
//! runs, and nothing is given up meanwhile. (A PubAck that still names
//! another stream is treated the same way.) No stream at all for the subject
//! ("no responders") is Transient for the same reason.
//!
//! Why subjects are made safe rather than refused: NATS subjects are tokens
//! separated by `.`, with `*` and `>` as wildcards and no whitespace, while
//! agents' stream names are free text separated by `/`. So each
//! placeholder's value becomes one token (`{stream}` one token per `/`
//! level): every `.`, `*`, `>`, whitespace or control character in it
//! becomes `_`, and an empty value or level becomes `_`. Two streams that
//! differ only there share a subject; the payload and the message id still
//! tell them apart. A template whose own text is not a valid subject is a
//! configuration error; a subject that still cannot be valid (longer than
//! [`MAX_SUBJECT`]) and a message larger than the server's `max_payload` or
//! the stream's `max_msg_size` are [`SinkError::Rejected`]: no retry makes
//! them fit. The other events of such a batch are published all the same.
//!
//! Why the sink owns reconnecting rather than async-nats: async-nats's own
//! reconnect loop runs in a task of its own that does not end while the
//! server stays away. Here each connection is made with at most one connect
//! attempt (`max_reconnects(1)`), so async-nats's task ends when its
//! connection does, and one supervisor task of the sink makes the next
//! connection with backoff and ends on `stop`, draining the connection.

use std::collections::{BTreeMap, HashMap};
use std::future::IntoFuture as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::ErrorCode;
use async_nats::{ConnectOptions, Event as NatsEvent};
use futures::future::BoxFuture;
use futures::StreamExt as _;
use outpost_protocols::{AgentId, Event, EventBody, StreamName, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument as _};

use crate::clock;
use crate::nats::{self, Endpoint};

use super::config::{JetStreamSinkConfig, SinkConfig};
use super::format::{check_template, expand, payload, PayloadFormat};
use super::sink::{unrecorded_max, Sink, SinkError, SinkEvent};

/// The longest subject published, in bytes. The server's default
/// `max_control_line` (4096 bytes) bounds the whole `HPUB` line, which also
/// holds the reply inbox and two sizes; this leaves room for them.
pub const MAX_SUBJECT: usize = 3072;

/// The first wait before reconnecting; it doubles up to [`RECONNECT_MAX`].
const RECONNECT_MIN: Duration = Duration::from_millis(50);
/// The longest wait between connection attempts (or the sink's
/// `retry_max`, if shorter).
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// How long the supervisor waits for a connection to drain on stop.
const DRAIN_WAIT: Duration = Duration::from_secs(1);

/// What [`build`] checks of `c` (its `[sinks.jetstream]` table `cfg`),
/// without connecting.
pub(super) fn check_files(
    c: &SinkConfig,
    cfg: &JetStreamSinkConfig,
    base: &Path,
) -> Result<(), SinkError> {
    Settings::read(&c.id, cfg, c.batch_max, base).map(drop)
}

/// Builds the sink of `c` (its `[sinks.jetstream]` table `cfg`): its
/// connection is made by a supervisor task, in the background.
pub(super) async fn build(
    c: &SinkConfig,
    cfg: &JetStreamSinkConfig,
    base: &Path,
    stop: CancellationToken,
) -> Result<Arc<dyn Sink>, SinkError> {
    let mut settings = Settings::read(&c.id, cfg, c.batch_max, base)?;
    // A far end that is back is found as soon as the sink's own retries
    // would look again.
    settings.reconnect_max = RECONNECT_MAX.min(c.retry_max.0);
    let settings = Arc::new(settings);
    let (tx, rx) = watch::channel(Link::Down(None));
    let span = tracing::info_span!("sink", id = %c.id, kind = "jetstream");
    tokio::spawn(supervise(settings.clone(), tx, stop.clone()).instrument(span));
    Ok(Arc::new(JetStreamSink {
        settings,
        link: rx,
        stop,
        sending: tokio::sync::Mutex::new(()),
        chain: std::sync::Mutex::new(Chain {
            started: unrecorded_max(OVERLAP),
            ..Chain::default()
        }),
    }))
}

/// Everything a connection and a delivery need, checked once at build.
struct Settings {
    id: String,
    /// The server, its credentials and TLS, read once at build.
    endpoint: Endpoint,
    stream: String,
    subject: String,
    payload: PayloadFormat,
    timeout: Duration,
    /// Publishes awaiting their ack at once, across deliveries.
    max_inflight: usize,
    /// The longest wait between connection attempts: [`RECONNECT_MAX`], or
    /// the sink's `retry_max` if shorter.
    reconnect_max: Duration,
}

impl Settings {
    fn read(
        id: &str,
        c: &JetStreamSinkConfig,
        batch_max: usize,
        base: &Path,
    ) -> Result<Settings, SinkError> {
        let bad = |key: &str, message: String| SinkError::Config {
            id: id.to_owned(),
            key: format!("jetstream.{key}"),
            message,
        };
        let addr = nats::parse_url(&c.url).map_err(|m| bad("url", m))?;
        nats::check_stream_name(&c.stream).map_err(|m| bad("stream", m))?;
        check_template(&c.subject).map_err(|m| bad("subject", m))?;
        // The template's own text reaches the subject unchanged, so a probe
        // expansion finds wildcards, spaces and empty tokens in it now.
        if let Some(probe) = probe_event() {
            subject_of(&c.subject, &probe).map_err(|m| bad("subject", m))?;
        }
        if c.timeout.0.is_zero() {
            return Err(bad("timeout", "must be longer than zero".into()));
        }
        let endpoint = Endpoint::read(
            &c.url,
            vec![addr],
            c.credentials.as_deref(),
            c.tls.as_ref(),
            base,
        )
        .map_err(|e| bad(&e.key(), e.to_string()))?;
        if endpoint.tls_required() && !endpoint.has_tls() {
            return Err(bad(
                "tls",
                format!(
                    "{:?} needs a [sinks.jetstream.tls] table with the CA of the server (none are bundled)",
                    c.url
                ),
            ));
        }
        Ok(Settings {
            id: id.to_owned(),
            endpoint,
            stream: c.stream.clone(),
            subject: c.subject.clone(),
            payload: c.payload,
            timeout: c.timeout.0,
            max_inflight: batch_max.saturating_mul(2).max(64),
            reconnect_max: RECONNECT_MAX,
        })
    }

    /// Options for one connection: one connect attempt, no reconnecting of
    /// its own (see the module doc); its events go to `events`.
    fn options(&self, events: mpsc::UnboundedSender<NatsEvent>) -> Result<ConnectOptions, String> {
        let mut o = self
            .endpoint
            .options(&format!("outpost-hub sink {}", self.id), self.timeout)
            .map_err(|e| format!("{}: {e}", e.key()))?
            .max_reconnects(1)
            .reconnect_delay_callback(|_| Duration::ZERO)
            .ignore_discovered_servers()
            .event_callback(move |e| {
                let events = events.clone();
                async move {
                    let _ = events.send(e);
                }
            });
        // A server that asks for TLS gets a handshake that trusts no one,
        // rather than the system's roots: a CA must be configured.
        if !self.endpoint.has_tls() {
            if let Ok(t) = crate::client_tls::client_config(None, Path::new("")) {
                o = o.tls_client_config(t);
            }
        }
        Ok(o)
    }
}

/// The state of the sink's connection, as the supervisor publishes it.
#[derive(Clone)]
enum Link {
    /// Not connected; why, once known.
    Down(Option<String>),
    /// Connected.
    Up(Arc<Up>),
    /// `stop` was cancelled.
    Stopped,
}

/// One live connection.
struct Up {
    /// Which connection of the sink's this is (they are counted).
    link: u64,
    js: async_nats::jetstream::Context,
    /// The server's `max_payload`: headers and payload of one message.
    max_payload: usize,
}

/// Connects, waits for the connection to end, connects again, until `stop`
/// (or until the sink is dropped).
async fn supervise(settings: Arc<Settings>, tx: watch::Sender<Link>, stop: CancellationToken) {
    let first = RECONNECT_MIN.min(settings.reconnect_max);
    let mut backoff = first;
    let mut last_error: Option<String> = None;
    let mut links = 0u64;
    loop {
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let options = match settings.options(events_tx) {
            Ok(o) => o,
            Err(m) => {
                // Checked at build; kept as a reason rather than a panic.
                tx.send_replace(Link::Down(Some(m)));
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tx.closed() => break,
                }
            }
        };
        let attempt = tokio::select! {
            _ = stop.cancelled() => break,
            _ = tx.closed() => break,
            r = options.connect(settings.endpoint.servers().to_vec()) => r,
        };
        let client = match attempt {
            Ok(c) => c,
            Err(e) => {
                let m = format!("cannot connect to {}: {e}", settings.endpoint.url());
                if last_error.as_deref() != Some(m.as_str()) {
                    warn!(url = %settings.endpoint.url(), error = %e, "Cannot connect to the NATS server; retrying.");
                } else {
                    debug!(url = %settings.endpoint.url(), error = %e, "Still cannot connect to the NATS server.");
                }
                last_error = Some(m.clone());
                tx.send_replace(Link::Down(Some(m)));
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tx.closed() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(settings.reconnect_max);
                continue;
            }
        };
        backoff = first;
        last_error = None;
        let max_payload = client.server_info().max_payload;
        info!(url = %settings.endpoint.url(), max_payload, "Connected to the NATS server.");
        let js = nats::jetstream(client.clone(), settings.timeout, settings.max_inflight);
        links += 1;
        tx.send_replace(Link::Up(Arc::new(Up {
            link: links,
            js,
            max_payload,
        })));
        let reason = loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    tx.send_replace(Link::Stopped);
                    drain(&client).await;
                    return;
                }
                _ = tx.closed() => {
                    drain(&client).await;
                    return;
                }
                e = events.recv() => match e {
                    // async-nats's task for this connection has ended.
                    None => break "the connection closed".to_owned(),
                    Some(NatsEvent::Disconnected) => break "disconnected".to_owned(),
                    Some(NatsEvent::Closed) => break "the connection closed".to_owned(),
                    Some(NatsEvent::ServerError(e)) => {
                        warn!(error = %e, "The NATS server reported an error.");
                    }
                    Some(other) => debug!(event = %other, "NATS connection event."),
                },
            }
        };
        warn!(url = %settings.endpoint.url(), %reason, "Lost the NATS server; reconnecting.");
        tx.send_replace(Link::Down(Some(format!(
            "lost the connection to {}: {reason}",
            settings.endpoint.url()
        ))));
    }
    tx.send_replace(Link::Stopped);
}

/// Asks the connection to close, and waits a little for it: async-nats's
/// task then ends even while a delivery still holds a handle.
async fn drain(client: &async_nats::Client) {
    let _ = tokio::time::timeout(DRAIN_WAIT, client.drain()).await;
}

/// The sink.
struct JetStreamSink {
    settings: Arc<Settings>,
    link: watch::Receiver<Link>,
    /// Checked by each delivery too, so that none starts after `stop` while
    /// the supervisor has not yet taken the connection down.
    stop: CancellationToken,
    /// Held while a delivery sends its publishes, so that overlapping
    /// deliveries send theirs one batch after the other, in the order they
    /// were first polled.
    sending: tokio::sync::Mutex<()>,
    /// What overlapping deliveries must agree on; see
    /// [`JetStreamSink::deliver_batch`].
    chain: std::sync::Mutex<Chain>,
}

/// Deliveries the runner may have under way at once.
pub const OVERLAP: usize = 2;

/// Questions about what the stream holds awaiting their answer at once.
const CHECKS_AT_ONCE: usize = 32;

/// The deliveries that have sent their publishes and not heard back about
/// all of them yet ("in doubt"), and what that means for the next ones.
#[derive(Debug, Default)]
struct Chain {
    /// How many there are.
    in_doubt: usize,
    /// The connection they sent on ([`Up::link`]).
    link: u64,
    /// Whether one of them failed since the last time none was in doubt:
    /// then no batch is sent until they are all over.
    broken: bool,
    /// How many deliveries from now on first ask the stream what it holds
    /// ([`JetStreamSink::already_stored`]), whenever the batch was sent
    /// before: at start, every batch a hub may have delivered without
    /// recording it (a hub that stopped in between, how long ago no one
    /// knows).
    started: usize,
    /// How many deliveries from now on ask too after a failed delivery:
    /// every batch that was in doubt with it, unless they are sent again
    /// within the stream's duplicate window of [`Chain::failed_since`].
    suspect: usize,
    /// When the oldest delivery in doubt sent its first publish.
    doubt_since: Option<Instant>,
    /// When the oldest of the deliveries in doubt at a failure sent its
    /// first publish.
    failed_since: Option<Instant>,
    /// While `started`: what the stream said it holds last on each subject
    /// asked about (`None`: nothing of ours), so that each is asked once at
    /// start rather than once per delivery. Sound because a later answer
    /// could only add this run's own publishes of events earlier in the
    /// queue, which a later delivery does not hold; emptied at a failure,
    /// after which part of what this run sent may be stored.
    known: HashMap<String, Option<Last>>,
    /// Counts the failures: answers asked for before one are not kept.
    failures: u64,
}

/// The agent and seq of the last message of ours on a subject.
type Last = (AgentId, outpost_protocols::Seq);

/// Counts a delivery in doubt until it is over; dropped unfinished (the
/// delivery was cancelled), it counts as failed.
struct Doubt<'a> {
    chain: &'a std::sync::Mutex<Chain>,
    /// Whether the delivery is over without a transient failure.
    settled: bool,
}

impl Drop for Doubt<'_> {
    fn drop(&mut self) {
        let mut c = self.chain.lock().unwrap_or_else(|p| p.into_inner());
        if self.settled {
            c.started = c.started.saturating_sub(1);
            if c.started == 0 {
                c.known = HashMap::new();
            }
            c.suspect = c.suspect.saturating_sub(1);
            if c.suspect == 0 {
                c.failed_since = None;
            }
        } else {
            c.broken = true;
            c.known.clear();
            c.failures += 1;
            // Every batch in doubt with this one may hold part of what
            // the stream stored.
            c.suspect = c.suspect.max(c.in_doubt);
            c.failed_since = match (c.failed_since, c.doubt_since) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        c.in_doubt = c.in_doubt.saturating_sub(1);
    }
}

impl Sink for JetStreamSink {
    fn deliver<'a>(&'a self, events: &'a [SinkEvent]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(self.deliver_batch(events))
    }

    /// Two; why that is safe is [`JetStreamSink::deliver_batch`]'s doc.
    fn overlap(&self) -> usize {
        OVERLAP
    }
}

/// Why one event was not accepted.
enum Refusal {
    Transient(String),
    Rejected(String),
}

impl JetStreamSink {
    /// Delivers one batch; the runner may have [`OVERLAP`] under way.
    ///
    /// Why overlapping deliveries keep the check of what the stream holds
    /// correct: that check skips an agent's events at or below the last
    /// seq of that agent on their subject, which is right only if what
    /// the stream holds of one agent on one subject is a prefix, in seq
    /// order, of what was sent there. One batch's publishes, sent in order
    /// on one connection and stored in the order they arrive, keep that
    /// (a connection that breaks loses a tail, never a middle). Two
    /// batches in flight keep it when they are, together, like one batch
    /// of both: so a delivery sends its publishes only
    ///
    /// - after those of every earlier delivery (`sending`, held while
    ///   sending; the runner polls deliveries in queue order);
    /// - on the connection those in doubt were sent on: if that connection
    ///   is gone, a batch sent on the next one could land ahead of an
    ///   earlier batch's lost tail, so it is refused (Transient) and sent
    ///   again later;
    /// - while none of those in doubt has failed (`broken`): after a
    ///   failure the runner sends the failed batch again before anything
    ///   later, and with `suspect` every batch that was in doubt with it is
    ///   checked when sent again.
    ///
    /// A later batch already accepted when an earlier one fails is then as
    /// the accepted part of one larger batch, which the runner keeps: the
    /// earlier batch sent again skips what the stream holds below the
    /// later one's seqs, which is what the check would have found of the
    /// larger batch.
    async fn deliver_batch(&self, events: &[SinkEvent]) -> Result<(), SinkError> {
        let s = &self.settings;
        let deadline = clock::tokio_now() + s.timeout;
        let sending = self.sending.lock().await;
        let up = self.connected(deadline).await?;
        let check = {
            let mut c = self.chain.lock().unwrap_or_else(|p| p.into_inner());
            if c.in_doubt > 0 && (c.broken || c.link != up.link) {
                return Err(SinkError::Transient(format!(
                    "an earlier batch to stream {:?} failed or lost its connection before its acknowledgements: this one waits for it to be sent again",
                    s.stream
                )));
            }
            if c.in_doubt == 0 {
                c.broken = false;
                c.link = up.link;
                c.doubt_since = Some(clock::tokio_now());
            }
            c.in_doubt += 1;
            if c.started > 0 {
                Some(None)
            } else if c.suspect > 0 {
                Some(c.failed_since)
            } else {
                None
            }
        };
        let mut doubt = Doubt {
            chain: &self.chain,
            settled: false,
        };
        let r = self.publish(&up, events, check, deadline, sending).await;
        doubt.settled = !matches!(r, Err(SinkError::Transient(_)));
        r
    }

    /// Publishes `events` on `up` and awaits their acks; `sending` is held
    /// until all are sent. With `check`, what the stream holds already is
    /// skipped (see [`JetStreamSink::already_stored`] for `Some(since)`).
    async fn publish(
        &self,
        up: &Up,
        events: &[SinkEvent],
        check: Option<Option<Instant>>,
        deadline: Instant,
        sending: tokio::sync::MutexGuard<'_, ()>,
    ) -> Result<(), SinkError> {
        let s = &self.settings;
        let stored = match check {
            Some(since) => self.already_stored(up, events, since, deadline).await?,
            None => BTreeMap::new(),
        };
        let mut skipped = 0;
        let mut rejected: Vec<String> = Vec::new();
        let mut pending = Vec::with_capacity(events.len());
        // A batch holds a few subjects many times over (each agent's
        // streams): each is made once, unless the template names `{seq}`.
        // The labels are part of the key by identity: the runner hands one
        // agent's events the same labels.
        let per_event = s.subject.contains("{seq}");
        type Key<'e> = (&'e AgentId, &'e str, usize);
        let mut subjects: HashMap<Key<'_>, Result<String, String>> = HashMap::new();
        for e in events {
            let id = format!("{}:{}", e.event.agent_id, e.event.seq.0);
            let subject = if per_event {
                subject_of(&s.subject, e)
            } else {
                subjects
                    .entry((
                        &e.event.agent_id,
                        e.event.body.stream.as_str(),
                        Arc::as_ptr(&e.labels) as usize,
                    ))
                    .or_insert_with(|| subject_of(&s.subject, e))
                    .clone()
            };
            let subject = match subject {
                Ok(subject) => subject,
                Err(m) => {
                    rejected.push(format!("{id}: {m}"));
                    continue;
                }
            };
            if stored
                .get(&subject)
                .is_some_and(|(a, seq)| *a == e.event.agent_id && e.event.seq <= *seq)
            {
                skipped += 1;
                continue;
            }
            let body = payload(e, s.payload);
            // NATS/1.0, the two headers and the blank line, as sent.
            let headers = 10 + 15 + id.len() + 24 + s.stream.len() + 2;
            if headers + body.len() > up.max_payload {
                rejected.push(format!(
                    "{id}: {} bytes with headers; the server takes at most {} (max_payload)",
                    headers + body.len(),
                    up.max_payload
                ));
                continue;
            }
            let msg = nats::message(body.into(), &id, &s.stream);
            let sent = tokio::time::timeout_at(deadline, up.js.send_publish(subject.clone(), msg))
                .await
                .map_err(|_| self.timed_out(events.len()))?;
            match sent {
                Ok(ack) => pending.push((id, subject, ack)),
                Err(err) => {
                    return Err(SinkError::Transient(format!(
                        "publishing {id} to {subject:?}: {err}"
                    )))
                }
            }
        }
        drop(sending);
        for (id, subject, ack) in pending {
            let answer = tokio::time::timeout_at(deadline, ack.into_future())
                .await
                .map_err(|_| self.timed_out(events.len()))?;
            match self.judge(&id, &subject, answer) {
                Ok(()) => {}
                Err(Refusal::Transient(m)) => return Err(SinkError::Transient(m)),
                Err(Refusal::Rejected(m)) => rejected.push(m),
            }
        }
        if skipped > 0 {
            info!(sink = %s.id, skipped, events = events.len(), "The stream held part of a batch delivered again already; not published twice.");
        }
        if rejected.is_empty() {
            debug!(sink = %s.id, events = events.len(), "Batch stored by the stream.");
            Ok(())
        } else {
            let n = rejected.len();
            let shown: Vec<&str> = rejected.iter().take(5).map(String::as_str).collect();
            let more = if n > 5 {
                format!("; and {} more", n - 5)
            } else {
                String::new()
            };
            warn!(sink = %s.id, refused = n, events = events.len(), "Events no retry can store.");
            Err(SinkError::Rejected(format!(
                "{n} of {} events cannot be stored in stream {:?} (the others were): {}{more}",
                events.len(),
                s.stream,
                shown.join("; ")
            )))
        }
    }

    /// For each subject of `events`, the agent and seq of the stream's last
    /// message on it, if it carries an id of ours.
    ///
    /// Why: JetStream drops a repeated `Nats-Msg-Id` only within its
    /// duplicate window, and a batch is delivered again after a failure that
    /// may have hidden its success (the server stored it and the
    /// acknowledgement was lost), possibly much later (the server came back
    /// after an hour). One agent's events reach one subject in seq order, so
    /// an event at or below the last seq of its agent on its subject is in
    /// the stream already and is not published again. With a template
    /// without `{agent_id}`, several agents share a subject and only the
    /// last one's events are recognised; the others rely on the window.
    ///
    /// Why not when `since` (the first publish of what was in doubt at a
    /// failure) lies within the stream's duplicate window, with the sink's
    /// `timeout` to spare: then the stream drops every repeat by its id
    /// anyway, and the check could only do harm. A stream that refused a
    /// batch's middle and stored its end (a cluster electing a leader)
    /// holds no prefix, and the check would skip the refused events; sent
    /// again, they are stored. Past the window only the check keeps
    /// repeats out, at that small risk.
    ///
    /// At start (`since` is `None`) a subject asked about is not asked
    /// again until a delivery fails ([`Chain::known`]): measured, asking
    /// anew for each of the first deliveries took 7–17 ms each, an eighth
    /// of the time the bench's 50,000 events take to drain.
    async fn already_stored(
        &self,
        up: &Up,
        events: &[SinkEvent],
        since: Option<Instant>,
        deadline: Instant,
    ) -> Result<BTreeMap<String, Last>, SinkError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let s = &self.settings;
        use async_nats::jetstream::context::GetStreamErrorKind;
        let mut out = BTreeMap::new();
        let subjects: std::collections::BTreeSet<String> = events
            .iter()
            .filter_map(|e| subject_of(&s.subject, e).ok())
            .collect();
        // At start, each subject once (see `Chain::known`).
        let start = since.is_none();
        let (subjects, failures) = {
            let c = self.chain.lock().unwrap_or_else(|p| p.into_inner());
            let ask: Vec<String> = subjects
                .into_iter()
                .filter(|subject| match c.known.get(subject).filter(|_| start) {
                    Some(Some(last)) => {
                        out.insert(subject.clone(), last.clone());
                        false
                    }
                    Some(None) => false,
                    None => true,
                })
                .collect();
            (ask, c.failures)
        };
        if subjects.is_empty() {
            return Ok(out);
        }
        let found = tokio::time::timeout_at(deadline, up.js.get_stream(&s.stream))
            .await
            .map_err(|_| self.timed_out(events.len()))?;
        let stream = match found {
            Ok(stream) => stream,
            // No such stream holds anything; the publishes say what is wrong.
            Err(e)
                if matches!(e.kind(), GetStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
            {
                return Ok(BTreeMap::new())
            }
            Err(e) => {
                return Err(SinkError::Transient(format!(
                    "looking up stream {:?}: {e}",
                    s.stream
                )))
            }
        };
        let window = stream.cached_info().config.duplicate_window;
        if since.is_some_and(|t| clock::tokio_elapsed(t) + s.timeout < window) {
            debug!(sink = %s.id, "Sent again within the stream's duplicate window: no check.");
            return Ok(BTreeMap::new());
        }
        // The questions go out together, a few at a time: one after
        // another, a batch of a hundred subjects cost a hundred round trips.
        let stream = &stream;
        let answers = futures::stream::iter(subjects)
            .map(|subject| async move {
                let last = tokio::time::timeout_at(
                    deadline,
                    stream.get_last_raw_message_by_subject(&subject),
                )
                .await
                .map_err(|_| self.timed_out(events.len()))?;
                let m = match last {
                    Ok(m) => m,
                    Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {
                        return Ok((subject, None))
                    }
                    Err(e) => {
                        return Err(SinkError::Transient(format!(
                            "checking what stream {:?} holds on {subject:?}: {e}",
                            s.stream
                        )))
                    }
                };
                let ours = m
                    .headers
                    .get(async_nats::header::NATS_MESSAGE_ID)
                    .and_then(|id| {
                        id.as_str()
                            .rsplit_once(':')
                            .map(|(a, q)| (a.to_owned(), q.to_owned()))
                    })
                    .and_then(|(a, q)| {
                        Some((
                            AgentId::parse(&a).ok()?,
                            outpost_protocols::Seq(q.parse().ok()?),
                        ))
                    });
                Ok((subject, ours))
            })
            .buffer_unordered(CHECKS_AT_ONCE);
        futures::pin_mut!(answers);
        let mut asked = Vec::new();
        while let Some(answer) = answers.next().await {
            let (subject, last) = answer?;
            if let Some(last) = &last {
                out.insert(subject.clone(), last.clone());
            }
            asked.push((subject, last));
        }
        if start {
            let mut c = self.chain.lock().unwrap_or_else(|p| p.into_inner());
            if c.started > 0 && c.failures == failures {
                c.known.extend(asked);
            }
        }
        Ok(out)
    }

    /// The live connection, waiting for one until `deadline`.
    async fn connected(&self, deadline: Instant) -> Result<Arc<Up>, SinkError> {
        if self.stop.is_cancelled() {
            return Err(self.stopped());
        }
        let mut link = self.link.clone();
        let wait = tokio::time::timeout_at(
            deadline,
            link.wait_for(|l| matches!(l, Link::Up(_) | Link::Stopped)),
        )
        .await;
        let current = match wait {
            Ok(Ok(l)) => l.clone(),
            // The supervisor ended (stop) or the wait timed out.
            Ok(Err(_)) => Link::Stopped,
            Err(_) => self.link.borrow().clone(),
        };
        match current {
            Link::Up(up) => Ok(up),
            Link::Stopped => Err(self.stopped()),
            Link::Down(why) => Err(SinkError::Transient(format!(
                "not connected to {} within {:?}: {}",
                self.settings.endpoint.url(),
                self.settings.timeout,
                why.as_deref().unwrap_or("connecting")
            ))),
        }
    }

    fn stopped(&self) -> SinkError {
        SinkError::Transient(format!("sink {} is stopped", self.settings.id))
    }

    fn timed_out(&self, n: usize) -> SinkError {
        SinkError::Transient(format!(
            "stream {:?} did not acknowledge all {n} events within {:?}",
            self.settings.stream, self.settings.timeout
        ))
    }

    /// Sorts one publish's answer.
    fn judge(
        &self,
        id: &str,
        subject: &str,
        answer: Result<
            async_nats::jetstream::publish::PublishAck,
            async_nats::jetstream::context::PublishError,
        >,
    ) -> Result<(), Refusal> {
        let stream = &self.settings.stream;
        let err = match answer {
            Ok(ack) if ack.stream == *stream => return Ok(()),
            Ok(ack) => {
                return Err(Refusal::Transient(format!(
                    "subject {subject:?} is stored by stream {:?}, not {stream:?}: change the streams' subjects (the hub creates no stream)",
                    ack.stream
                )))
            }
            Err(e) => e,
        };
        let code = std::error::Error::source(&err)
            .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
            .map(|j| j.error_code());
        match (err.kind(), code) {
            (PublishErrorKind::StreamNotFound, _) => Err(Refusal::Transient(format!(
                "no stream captures subject {subject:?} (no responders): stream {stream:?} must capture it (the hub creates no stream)"
            ))),
            (_, Some(ErrorCode::STREAM_NOT_MATCH)) => Err(Refusal::Transient(format!(
                "subject {subject:?} is captured by another stream than {stream:?}: change the streams' subjects (the hub creates no stream)"
            ))),
            (_, Some(ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM)) => Err(Refusal::Rejected(format!(
                "{id}: larger than stream {stream:?} takes (max_msg_size)"
            ))),
            (PublishErrorKind::TimedOut, _) => Err(Refusal::Transient(format!(
                "no acknowledgement for {id} within {:?}",
                self.settings.timeout
            ))),
            (PublishErrorKind::BrokenPipe, _) => Err(Refusal::Transient(format!(
                "the connection to {} was lost before {id} was acknowledged",
                self.settings.endpoint.url()
            ))),
            _ => Err(Refusal::Transient(format!("publishing {id} to {subject:?}: {err}"))),
        }
    }
}

/// The subject of one event: the template expanded with each value made one
/// token (see the module doc), then checked.
pub fn subject_of(template: &str, e: &SinkEvent) -> Result<String, String> {
    let agent = token(e.event.agent_id.as_str());
    let stream = e
        .event
        .body
        .stream
        .as_str()
        .split('/')
        .map(token)
        .collect::<Vec<_>>()
        .join(".");
    let labels = if e.labels.values().all(|v| is_token(v)) {
        e.labels.clone()
    } else {
        Arc::new(
            e.labels
                .iter()
                .map(|(k, v)| (k.clone(), token(v)))
                .collect::<BTreeMap<_, _>>(),
        )
    };
    // `expand` reads only the identity, the stream and the labels: a copy of
    // the event with safe values of those (and no value) expands the same
    // template into a safe subject.
    let safe = SinkEvent {
        queued_at: e.queued_at,
        event: Event {
            agent_id: AgentId::parse(&agent).map_err(|e| e.to_string())?,
            seq: e.event.seq,
            body: EventBody {
                stream: StreamName::parse(&stream).map_err(|_| {
                    format!("stream {:?} makes no subject", e.event.body.stream.as_str())
                })?,
                ts: e.event.body.ts,
                value: Value::Bool(false),
                quality: e.event.body.quality.clone(),
                attrs: BTreeMap::new(),
            },
        },
        labels,
    };
    let subject = expand(template, &safe);
    check_subject(&subject)?;
    Ok(subject)
}

fn is_token(v: &str) -> bool {
    !v.is_empty() && !v.chars().any(nats::unsafe_subject_char)
}

/// `v` as one subject token: unsafe characters become `_`, and so does an
/// empty value.
fn token(v: &str) -> String {
    if v.is_empty() {
        return "_".into();
    }
    v.chars()
        .map(|c| if nats::unsafe_subject_char(c) { '_' } else { c })
        .collect()
}

/// A subject the server takes for a publish: `.`-separated non-empty tokens
/// without wildcards, whitespace or control characters, at most
/// [`MAX_SUBJECT`] bytes.
fn check_subject(s: &str) -> Result<(), String> {
    if s.len() > MAX_SUBJECT {
        return Err(format!(
            "subject of {} bytes is longer than {MAX_SUBJECT}",
            s.len()
        ));
    }
    for t in s.split('.') {
        if t.is_empty() {
            return Err(format!("subject {s:?} has an empty token"));
        }
        if let Some(c) = t.chars().find(|&c| nats::unsafe_subject_char(c)) {
            return Err(format!(
                "subject {s:?} holds {c:?}, which NATS subjects cannot"
            ));
        }
    }
    Ok(())
}

/// The event a template is tried on at build (always `Some`: its id and
/// stream are valid).
fn probe_event() -> Option<SinkEvent> {
    Some(SinkEvent {
        queued_at: 0,
        event: Event {
            agent_id: AgentId::parse("probe").ok()?,
            seq: outpost_protocols::Seq(1),
            body: EventBody {
                stream: StreamName::parse("probe").ok()?,
                ts: outpost_protocols::Timestamp(0),
                value: Value::Bool(false),
                quality: Default::default(),
                attrs: BTreeMap::new(),
            },
        },
        labels: Arc::new(BTreeMap::new()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocols::{Quality, Seq, Timestamp};

    fn event(agent: &str, stream: &str, labels: &[(&str, &str)]) -> SinkEvent {
        SinkEvent {
            queued_at: 0,
            event: Event {
                agent_id: AgentId::parse(agent).expect("agent"),
                seq: Seq(7),
                body: EventBody {
                    stream: StreamName::parse(stream).expect("stream"),
                    ts: Timestamp(1),
                    value: Value::F64(1.0),
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
    fn stream_levels_become_subject_tokens() {
        let e = event("gw-1", "plc1/temp", &[]);
        assert_eq!(
            subject_of("outpost.{agent_id}.{stream}", &e).expect("subject"),
            "outpost.gw-1.plc1.temp"
        );
    }

    #[test]
    fn unsafe_characters_and_empty_levels_become_underscores() {
        let e = event(
            "site.gw",
            "/a b//c*.d>\te/",
            &[("site", "eu.lyon"), ("empty", "")],
        );
        assert_eq!(
            subject_of(
                "x.{label.site}.{label.empty}.{label.none}.{agent_id}.{stream}.{seq}",
                &e
            )
            .expect("subject"),
            "x.eu_lyon._._.site_gw._.a_b._.c__d__e._.7"
        );
    }

    #[test]
    fn templates_that_are_no_subject_are_refused() {
        let e = probe_event().expect("probe");
        assert!(subject_of("a.*.{stream}", &e).is_err());
        assert!(subject_of("a.>", &e).is_err());
        assert!(subject_of("a..{stream}", &e).is_err());
        assert!(subject_of("a b.{stream}", &e).is_err());
        assert!(subject_of("", &e).is_err());
        assert!(subject_of(".{stream}", &e).is_err());
    }

    #[test]
    fn subjects_longer_than_the_control_line_allows_are_refused() {
        let long = "x/".repeat(MAX_SUBJECT);
        let e = event("gw", &long, &[]);
        let m = subject_of("o.{stream}", &e).expect_err("too long");
        assert!(m.contains("longer"), "{m}");
    }
}
