//! The uplink: the thin quinn driver of the sans-IO [`AgentSession`].
//!
//! It makes no protocol decisions. It dials the hub over QUIC with the agent's
//! certificate, opens one bidirectional stream, feeds the session what the hub
//! sends and the time, hands it events read from the outbox after the hub's
//! watermark, and deletes from the outbox what the hub acknowledged. A lost
//! connection is redialled with exponential backoff and jitter; the new session
//! resumes from the watermark the hub sends in its `Welcome`.
//!
//! Architecture invariant: the outbox deletes a row only after the hub
//! acknowledged its seq, which the hub does only after its store committed it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outpost_protocols::wire::{
    AgentConfig, AgentEvent, AgentInfo, AgentSession, UsageError, ALPN, CLOSE_OK,
};
use outpost_protocols::{EventBody, Seq};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use outpost_protocols::policy::{Enforcer, Over, PolicyVersion, Stage, TokenBucket, Verdict};

use crate::config::UplinkSection;
use crate::metrics::Metrics;
use crate::outbox::{OutboxError, OutboxHandle, Resumed};
use crate::policy::PolicyStore;

/// Why a connection to the hub ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UplinkError {
    /// The TLS files are unusable; the uplink cannot start.
    #[error(transparent)]
    Tls(#[from] outpost_tls::TlsError),
    /// quinn refused the TLS configuration (for example no TLS 1.3).
    #[error("quic configuration: {0}")]
    Quic(String),
    /// The hub's address did not resolve.
    #[error("resolve {hub}: {message}")]
    Resolve {
        /// `[uplink] hub`.
        hub: String,
        /// What went wrong.
        message: String,
    },
    /// The QUIC connection failed or was closed.
    #[error("connection: {0}")]
    Connection(String),
    /// The session ended with a protocol error.
    #[error("protocol: {0}")]
    Protocol(#[from] outpost_protocols::wire::ProtocolError),
    /// The session was driven wrongly (a bug in this driver).
    #[error("session usage: {0}")]
    Usage(#[from] outpost_protocols::wire::UsageError),
    /// The outbox failed.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

/// Events read from the outbox per request.
const READ_CHUNK: usize = 4096;

/// While events are in flight, the session is refilled only once the window
/// has this much room: one large read instead of one per acknowledged
/// batch, which during a drain kept the uplink in lock step with the
/// outbox thread.
const REFILL_AT: usize = 2048;

/// How often the backlog is reported to the hub.
const BACKLOG_EVERY: Duration = Duration::from_secs(5);

/// The uplink to the hub.
pub struct Uplink {
    settings: UplinkSection,
    outbox: OutboxHandle,
    info: AgentInfo,
    metrics: Arc<Metrics>,
    policy: PolicyStore,
}

/// The policy as the uplink applies it to what leaves: the stateless part
/// again (events stored under an older policy), and a `hold` rate per agent,
/// which paces sending while the events wait in the outbox.
struct SendGate {
    version: PolicyVersion,
    recheck: Option<Enforcer>,
    events: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
    clock: Instant,
}

impl SendGate {
    fn new(store: &PolicyStore) -> SendGate {
        let p = store.current();
        let hold = p.compiled.agent_rate().filter(|r| r.over == Over::Hold);
        SendGate {
            version: p.version,
            recheck: (!p.is_permissive()).then(|| Enforcer::new(p.compiled.clone())),
            events: hold.and_then(|r| r.events_per_sec.map(TokenBucket::new)),
            bytes: hold.and_then(|r| r.bytes_per_sec.map(TokenBucket::new)),
            clock: Instant::now(),
        }
    }

    /// Follows the policy in force.
    fn refresh(&mut self, store: &PolicyStore) {
        if store.current().version != self.version {
            *self = SendGate::new(store);
        }
    }

    fn now(&self) -> i64 {
        i64::try_from(self.clock.elapsed().as_nanos()).unwrap_or(i64::MAX)
    }

    /// How long until one more event of `size` bytes may be sent.
    fn wait(&mut self, size: usize) -> Duration {
        let now = self.now();
        let e = self.events.as_mut().map_or(0, |b| b.wait(now, 1.0));
        let b = self.bytes.as_mut().map_or(0, |b| b.wait(now, size as f64));
        Duration::from_nanos(u64::try_from(e.max(b)).unwrap_or(0))
    }

    fn take(&mut self, size: usize) {
        let now = self.now();
        if let Some(b) = &mut self.events {
            let _ = b.try_take(now, 1.0);
        }
        if let Some(b) = &mut self.bytes {
            let _ = b.try_take(now, size as f64);
        }
    }
}

enum Ended {
    Shutdown,
    Closed,
}

impl Uplink {
    /// An uplink for these settings; `labels` travel in the handshake.
    pub fn new(
        settings: UplinkSection,
        outbox: OutboxHandle,
        labels: std::collections::BTreeMap<String, String>,
        metrics: Arc<Metrics>,
        policy: PolicyStore,
    ) -> Uplink {
        Uplink {
            settings,
            outbox,
            info: AgentInfo {
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                labels,
            },
            metrics,
            policy,
        }
    }

    fn client_config(&self) -> Result<quinn::ClientConfig, UplinkError> {
        let s = &self.settings;
        let mut tls = outpost_tls::client_config(outpost_tls::ClientFiles {
            ca: &s.ca,
            client: Some((s.cert.as_path(), s.key.as_path())),
            server_name: None,
        })?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| UplinkError::Quic(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_secs(60))
                .map_err(|e| UplinkError::Quic(e.to_string()))?,
        ));
        transport.keep_alive_interval(Some(Duration::from_secs(5)));
        config.transport_config(Arc::new(transport));
        Ok(config)
    }

    /// Runs until `shutdown`, reconnecting with backoff.
    pub async fn run(self, shutdown: CancellationToken) {
        let span = info_span!("uplink", hub = %self.settings.hub);
        self.run_inner(shutdown).instrument(span).await
    }

    async fn run_inner(self, shutdown: CancellationToken) {
        let config = match self.client_config() {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "Uplink cannot start; events stay in the outbox.");
                return;
            }
        };
        let min = self.settings.reconnect_min.0;
        let max = self.settings.reconnect_max.0;
        let mut backoff = min;
        loop {
            let started = Instant::now();
            match self.connect_and_serve(&config, &shutdown).await {
                Ok(Ended::Shutdown) => return,
                Ok(Ended::Closed) => info!("Hub closed the connection; reconnecting."),
                Err(e) => {
                    self.metrics.uplink_connected.set(0);
                    warn!(error = %e, retry_in = ?backoff, "Uplink lost; reconnecting.");
                }
            }
            if started.elapsed() > max {
                backoff = min;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(jitter(backoff)) => {}
            }
            backoff = (backoff * 2).min(max);
        }
    }

    async fn resolve(&self) -> Result<SocketAddr, UplinkError> {
        let hub = &self.settings.hub;
        tokio::net::lookup_host(hub)
            .await
            .map_err(|e| UplinkError::Resolve {
                hub: hub.clone(),
                message: e.to_string(),
            })?
            .next()
            .ok_or_else(|| UplinkError::Resolve {
                hub: hub.clone(),
                message: "no address".into(),
            })
    }

    async fn connect_and_serve(
        &self,
        config: &quinn::ClientConfig,
        shutdown: &CancellationToken,
    ) -> Result<Ended, UplinkError> {
        let addr = self.resolve().await?;
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0"
                .parse()
                .map_err(|_| UplinkError::Quic("bind address".into()))?
        } else {
            "0.0.0.0:0"
                .parse()
                .map_err(|_| UplinkError::Quic("bind address".into()))?
        };
        let endpoint =
            quinn::Endpoint::client(bind).map_err(|e| UplinkError::Connection(e.to_string()))?;
        let server_name = self.settings.server_name.clone().unwrap_or_default();
        let connecting = endpoint
            .connect_with(config.clone(), addr, &server_name)
            .map_err(|e| UplinkError::Connection(e.to_string()))?;
        let conn = tokio::select! {
            () = shutdown.cancelled() => return Ok(Ended::Shutdown),
            c = connecting => c.map_err(|e| UplinkError::Connection(e.to_string()))?,
        };
        let result = self.serve(&conn, shutdown).await;
        match &result {
            Ok(_) => conn.close(quinn::VarInt::from_u32(CLOSE_OK), b"bye"),
            Err(UplinkError::Protocol(e)) => conn.close(
                quinn::VarInt::from_u32(e.code().to_u32()),
                e.to_string().as_bytes(),
            ),
            Err(_) => conn.close(quinn::VarInt::from_u32(CLOSE_OK), b""),
        }
        // Let the close reach the hub before the endpoint goes.
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        self.metrics.uplink_connected.set(0);
        result
    }

    async fn serve(
        &self,
        conn: &quinn::Connection,
        shutdown: &CancellationToken,
    ) -> Result<Ended, UplinkError> {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| UplinkError::Connection(e.to_string()))?;
        let mut session =
            AgentSession::new(Instant::now(), self.info.clone(), AgentConfig::default());
        session.report_policy(self.policy.current().version.0, None);
        let mut gate = SendGate::new(&self.policy);
        // The last seq read from the outbox and either pushed or, denied by
        // the policy, skipped: reading resumes after it.
        let mut cursor = Seq(0);
        // While a `hold` rate is exhausted: when sending may go on.
        let mut paced: Option<tokio::time::Instant> = None;
        let mut committed = self.outbox.committed();
        let mut buf = vec![0u8; 64 * 1024];
        let mut out = Vec::with_capacity(64 * 1024);
        let mut backlog = tokio::time::interval(BACKLOG_EVERY);
        let mut stopping = false;
        let mut stop_by = tokio::time::Instant::now();
        // The highest seq the hub acknowledged, the highest whose delete was
        // asked for, and that delete while it runs.
        let mut ack_wanted = Seq(0);
        let mut ack_asked = Seq(0);
        let mut ack_job: Option<AckJob<'_>> = None;
        loop {
            // Outputs first, in the session's documented order.
            out.clear();
            while session.poll_transmit(Instant::now(), &mut out).is_some() {}
            if !out.is_empty() {
                send.write_all(&out)
                    .await
                    .map_err(|e| UplinkError::Connection(e.to_string()))?;
            }
            while let Some(ev) = session.poll_event() {
                match ev {
                    AgentEvent::Connected { version, watermark } => {
                        self.metrics.uplink_connected.set(1);
                        info!(version, watermark = watermark.0, "Connected to the hub.");
                        self.resume(watermark).await?;
                    }
                    AgentEvent::Stored { upto } => {
                        // Kept until acknowledged; read on after it. Beyond
                        // the last seq this outbox assigned, the hub's
                        // history is not this outbox's: renumber.
                        debug!(
                            held = upto.0,
                            "The hub stored events a sink has not accepted yet."
                        );
                        if upto > *committed.borrow() {
                            self.follow(upto).await?;
                        }
                    }
                    AgentEvent::Acked { upto } => {
                        // The session only acknowledges seqs it sent, which
                        // were committed.
                        ack_wanted = ack_wanted.max(upto.min(*committed.borrow()));
                    }
                    AgentEvent::Policy { version, text } => {
                        match self.policy.install(version, &text) {
                            Ok(p) => {
                                info!(
                                    policy_version = version,
                                    rules = p.compiled.rules(),
                                    "Policy from the hub in force."
                                );
                                self.metrics
                                    .policy_version
                                    .set(i64::try_from(version).unwrap_or(i64::MAX));
                                session.report_policy(version, None);
                            }
                            Err(e) => {
                                let running = self.policy.current().version.0;
                                warn!(policy_version = version, running, error = %e, "Refused the policy from the hub; the previous one stays in force.");
                                session.report_policy(running, Some(&e));
                            }
                        }
                        gate.refresh(&self.policy);
                    }
                    AgentEvent::Closed { error } => {
                        let _ = send.finish();
                        if let Some(job) = ack_job.take() {
                            self.ack_done(job.await)?;
                        }
                        return match error {
                            None => Ok(if stopping {
                                Ended::Shutdown
                            } else {
                                Ended::Closed
                            }),
                            Some(e) => Err(e.into()),
                        };
                    }
                    _ => {}
                }
            }
            // Stopping: send what is committed, wait for its acks, say goodbye
            // (or give up at `stop_by`; the hub dedups what is resent).
            let last = *committed.borrow();
            cursor = cursor.max(session.read_after());
            if stopping && session.in_flight() == 0 && last <= cursor {
                session.goodbye();
                continue;
            }
            // Delete what the hub acknowledged, one request at a time and
            // without waiting for it: acks that arrive meanwhile are merged
            // into the next. A delete lost in a crash only means a resend,
            // which the hub drops.
            if ack_job.is_none() && ack_wanted > ack_asked {
                ack_asked = ack_wanted;
                ack_job = Some(Box::pin(self.outbox.ack(ack_asked)));
            }
            // Feed the session from the outbox while it has room.
            let can_feed = session.is_streaming()
                && session.wants() > 0
                && (session.in_flight() == 0 || session.wants() >= REFILL_AT)
                && paced.is_none_or(|t| t <= tokio::time::Instant::now());
            if can_feed && last > cursor {
                paced = None;
                gate.refresh(&self.policy);
                let n = session.wants().min(READ_CHUNK);
                let events = self.outbox.read_batch(cursor, n).await?;
                if !events.is_empty() {
                    let (sent, skipped, too_large) =
                        self.feed(&mut session, &mut gate, &mut cursor, &mut paced, events)?;
                    self.metrics.uplink_sent.inc_by(sent);
                    self.metrics.policy_dropped("denied_at_send", skipped);
                    if sent + skipped + too_large > 0 {
                        continue;
                    }
                }
            }
            let deadline = session
                .poll_timeout()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                done = async { ack_job.as_mut().expect("guarded").await }, if ack_job.is_some() => {
                    ack_job = None;
                    self.ack_done(done)?;
                }
                () = shutdown.cancelled(), if !stopping => {
                    // Give in-flight batches a moment to be acknowledged, so the
                    // next start does not resend them; the hub dedups anyway.
                    stopping = true;
                    stop_by = tokio::time::Instant::now() + Duration::from_secs(2);
                    debug!(in_flight = session.in_flight(), "Uplink stopping.");
                }
                () = tokio::time::sleep_until(stop_by), if stopping => {
                    session.goodbye();
                }
                read = recv.read(&mut buf) => match read {
                    Ok(Some(n)) => session.handle_bytes(Instant::now(), &buf[..n])?,
                    Ok(None) => return Err(UplinkError::Connection("the hub finished the stream".into())),
                    Err(e) => return Err(UplinkError::Connection(e.to_string())),
                },
                () = tokio::time::sleep_until(paced.unwrap_or_else(tokio::time::Instant::now)), if paced.is_some() => {
                    paced = None;
                }
                changed = committed.changed(), if can_feed => {
                    if changed.is_err() {
                        // The outbox writer is gone: the agent is stopping.
                        stopping = true;
                    }
                }
                () = tokio::time::sleep_until(deadline) => session.handle_timeout(Instant::now()),
                _ = backlog.tick() => {
                    if let Ok(s) = self.outbox.stats().await {
                        session.report_backlog(s.events, s.bytes, s.first_seq);
                    }
                }
            }
        }
    }

    /// Pushes what the policy lets through of `events` (read after `cursor`)
    /// and moves the cursor past what it pushed or skipped; stops early when
    /// a `hold` rate is exhausted, setting `paced`. Returns (pushed, skipped
    /// by the policy, skipped as too large to send).
    fn feed(
        &self,
        session: &mut AgentSession,
        gate: &mut SendGate,
        cursor: &mut Seq,
        paced: &mut Option<tokio::time::Instant>,
        events: Vec<outpost_protocols::Event>,
    ) -> Result<(u64, u64, u64), UplinkError> {
        let (mut sent, mut skipped, mut too_large) = (0u64, 0u64, 0u64);
        let mut batch: Vec<(Seq, EventBody)> = Vec::with_capacity(events.len());
        for e in events {
            let mut body = e.body;
            if let Some(r) = &mut gate.recheck {
                if let Verdict::Drop(reason) = r.apply(&mut body, Stage::Recheck) {
                    tracing::trace!(seq = e.seq.0, stream = %body.stream, reason = reason.name(), "Not sent: the policy in force denies it.");
                    skipped += 1;
                    *cursor = e.seq;
                    continue;
                }
            }
            let size = body.value.payload_len();
            let wait = gate.wait(size);
            if !wait.is_zero() {
                *paced = Some(tokio::time::Instant::now() + wait);
                break;
            }
            gate.take(size);
            *cursor = e.seq;
            batch.push((e.seq, body));
        }
        for (seq, body) in batch {
            match session.push_event(seq, &body) {
                Ok(()) => sent += 1,
                // No session can ever send it (an outbox written by an agent
                // that stored such events): closing the connection would only
                // meet it again on the next one, and nothing behind it would
                // ever leave. It is skipped and counted; the hub's
                // acknowledgement of a later seq deletes it.
                Err(UsageError::EventTooLarge { seq, len, max }) => {
                    tracing::error!(seq = seq.0, stream = %body.stream, len, max, "Event too large for the uplink; not sent.");
                    self.metrics.evicted("too_large", 1);
                    too_large += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok((sent, skipped, too_large))
    }

    /// Applies the hub's watermark: deletes what the hub holds or, when the
    /// hub holds seqs this outbox never assigned, renumbers what waits here
    /// to follow them (see `Outbox::resume_after`), and says so loudly.
    async fn resume(&self, watermark: Seq) -> Result<(), UplinkError> {
        let resumed = self.outbox.resume_after(watermark).await?;
        self.resumed(watermark, resumed);
        Ok(())
    }

    /// Applies the hub's `Stored` mark beyond every seq this outbox assigned
    /// (see `Outbox::follow`), and says so loudly.
    async fn follow(&self, held: Seq) -> Result<(), UplinkError> {
        let resumed = self.outbox.follow(held).await?;
        self.resumed(held, resumed);
        Ok(())
    }

    /// Counts what applying the hub's mark `hub` did to the outbox.
    fn resumed(&self, hub: Seq, resumed: Resumed) {
        match resumed {
            Resumed::Acked { deleted } => {
                self.metrics.uplink_acked.inc_by(deleted);
            }
            Resumed::Renumbered {
                renumbered,
                last_before,
                last,
            } => {
                warn!(
                    hub_seq = hub.0,
                    outbox_last = last_before.0,
                    renumbered,
                    new_last = last.0,
                    "The hub holds seqs this outbox never assigned (a new, wiped or restored \
                     data directory under this agent id): the waiting events were renumbered to \
                     follow the hub's, so none is lost. Events delivered before a restored \
                     backup was taken may arrive twice."
                );
                self.metrics.outbox_renumbered.inc_by(renumbered);
            }
        }
    }

    /// Counts what a finished delete removed.
    fn ack_done(&self, result: Result<u64, OutboxError>) -> Result<(), UplinkError> {
        self.metrics.uplink_acked.inc_by(result?);
        Ok(())
    }
}

/// A delete of acknowledged events, running in the outbox's writer.
type AckJob<'a> = Pin<Box<dyn Future<Output = Result<u64, OutboxError>> + Send + 'a>>;

/// Up to ±25 % around `d`, so a fleet that lost its hub does not reconnect in
/// lockstep. The clock's nanoseconds are random enough for spreading load.
fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let factor = 0.75 + f64::from(nanos % 1000) / 2000.0;
    d.mul_f64(factor)
}
