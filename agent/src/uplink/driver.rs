//! One connection's loop around the [`AgentSession`]: tell it the outbox's
//! last committed seq, write what it queued, act on its events (read the
//! outbox when it asks, report the backlog when it asks, apply the hub's
//! marks), then wait for the stream, a delete, the outbox, shutdown or the
//! session's timer.
//!
//! The decisions are the session's, so the wire tests' `Pair` checks them:
//! when to read more (`NeedEvents`), when to report the backlog
//! (`ReportBacklog`), and when a stop is drained and says `Goodbye`. The
//! driver only gives a stop its deadline ([`DRAIN`]) and applies the policy
//! to what it reads (skipping what it denies, deferring for a `hold` rate).

use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::time::Duration;

use outpost_protocols::wire::command::Outcome;
use outpost_protocols::wire::{AgentConfig, AgentEvent, AgentInfo, AgentSession, UsageError};
use outpost_protocols::{Event, Seq};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::error::UplinkError;
use super::gate::SendGate;
use super::marks;
use super::renew::Renewer;
use super::timing::Timing;
use crate::clock;
use crate::commands::Commands;
use crate::metrics::Metrics;
use crate::outbox::{OutboxError, OutboxHandle};
use crate::policy::PolicyStore;

/// Events read from the outbox per request.
const READ_CHUNK: usize = 4096;

/// How long a stop may wait for in-flight events to be acknowledged, so the
/// next start does not resend them (the hub drops what is resent anyway).
const DRAIN: Duration = Duration::from_secs(2);

/// How long the driver sleeps when the session has no timer (closed).
const NO_TIMER: Duration = Duration::from_secs(3600);

/// How often the driver looks for an operator's renewal request and
/// updates the certificate's expiry gauge.
const CERT_CHECK: Duration = Duration::from_secs(5);

/// After a renewal failed on this side (a key that cannot be written, a
/// certificate that does not fit it), when to try again.
const RENEW_RETRY: Duration = Duration::from_secs(3600);

/// What a connection works with, lent by the uplink.
#[derive(Clone, Copy)]
pub(super) struct Link<'a> {
    pub(super) outbox: &'a OutboxHandle,
    pub(super) metrics: &'a Metrics,
    pub(super) policy: &'a PolicyStore,
    pub(super) info: &'a AgentInfo,
    pub(super) renewer: &'a Renewer,
    pub(super) commands: Option<&'a Commands>,
}

/// How a connection ended without an error.
pub(super) enum Ended {
    /// The agent is stopping.
    Shutdown,
    /// The hub closed the session cleanly.
    Closed,
}

/// A delete of acknowledged events, running in the outbox's writer.
type AckJob<'a> = Pin<Box<dyn Future<Output = Result<u64, OutboxError>> + Send + 'a>>;

/// Runs the session on `conn` until it ends.
pub(super) async fn serve(
    link: Link<'_>,
    conn: &quinn::Connection,
    shutdown: &CancellationToken,
) -> Result<Ended, UplinkError> {
    let (send, recv) = conn.open_bi().await?;
    Driver::new(link, send, recv, shutdown).run().await
}

/// One connection's session and everything its driver waits on.
struct Driver<'a> {
    link: Link<'a>,
    shutdown: &'a CancellationToken,
    session: AgentSession,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    gate: SendGate,
    /// The outbox's last committed seq.
    committed: watch::Receiver<Seq>,
    /// Whether the agent is stopping (the session drains, then says
    /// `Goodbye`).
    stopping: bool,
    /// The highest seq the hub acknowledged, the highest whose delete was
    /// asked for, and that delete while it runs.
    ack_wanted: Seq,
    ack_asked: Seq,
    ack_job: Option<AckJob<'a>>,
    /// When to look for an operator's renewal request next.
    next_cert_check: tokio::time::Instant,
    /// Whether this connection already acted on an operator's request.
    request_seen: bool,
    /// The ingest latency and recovery time this connection measures.
    timing: Timing,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl<'a> Driver<'a> {
    fn new(
        link: Link<'a>,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        shutdown: &'a CancellationToken,
    ) -> Driver<'a> {
        let mut session =
            AgentSession::new(clock::now(), link.info.clone(), AgentConfig::default());
        session.report_policy(link.policy.current().version.0, None);
        Driver {
            link,
            shutdown,
            session,
            send,
            recv,
            gate: SendGate::new(link.policy),
            committed: link.outbox.committed(),
            stopping: false,
            ack_wanted: Seq(0),
            ack_asked: Seq(0),
            ack_job: None,
            next_cert_check: clock::tokio_now() + CERT_CHECK,
            request_seen: false,
            timing: Timing::default(),
            buf: vec![0u8; 64 * 1024],
            out: Vec::with_capacity(64 * 1024),
        }
    }

    /// The loop, in the session's poll order.
    async fn run(mut self) -> Result<Ended, UplinkError> {
        // `Hello` first; then the first backlog report, which the session
        // sends once welcomed, as it does the policy version. The session
        // asks for the next ones.
        self.transmit().await?;
        self.report_backlog().await;
        loop {
            let last = *self.committed.borrow_and_update();
            self.session.outbox_committed(last);
            self.transmit().await?;
            let need = match self.handle_events().await? {
                ControlFlow::Break(ended) => return Ok(ended),
                ControlFlow::Continue(need) => need,
            };
            // What acting on the events queued (a `Renew`) goes now.
            self.transmit().await?;
            self.start_delete();
            if let Some(room) = need {
                if self.feed_from_outbox(room).await? {
                    continue;
                }
            }
            self.wait().await?;
        }
    }

    /// Writes everything the session queued.
    async fn transmit(&mut self) -> Result<(), UplinkError> {
        self.out.clear();
        while self
            .session
            .poll_transmit(clock::now(), &mut self.out)
            .is_some()
        {}
        if !self.out.is_empty() {
            self.send.write_all(&self.out).await?;
        }
        Ok(())
    }

    /// Acts on every event the session has; `Break` once it closed cleanly,
    /// else how many events the session asked to be read, if it asked.
    async fn handle_events(&mut self) -> Result<ControlFlow<Ended, Option<usize>>, UplinkError> {
        let mut need = None;
        while let Some(event) = self.session.poll_event() {
            match event {
                AgentEvent::Connected { version, watermark } => {
                    self.link.metrics.uplink_connected.set(1);
                    info!(version, watermark = watermark.0, "Connected to the hub.");
                    self.timing.connected(watermark, *self.committed.borrow());
                    marks::resume(self.link.outbox, self.link.metrics, watermark).await?;
                    self.request_seen = self.link.renewer.requested();
                    self.session.set_renewal(self.link.renewer.due());
                }
                AgentEvent::Stored { upto } => {
                    // Kept until acknowledged; read on after it. Beyond the
                    // last seq this outbox assigned, the hub's history is not
                    // this outbox's: renumber.
                    debug!(
                        held = upto.0,
                        "The hub stored events a sink has not accepted yet."
                    );
                    self.timing.committed(upto, self.link.metrics);
                    if upto > *self.committed.borrow() {
                        marks::follow(self.link.outbox, self.link.metrics, upto).await?;
                    }
                }
                AgentEvent::Acked { upto } => {
                    self.timing.acked(upto, self.link.metrics);
                    // The session only acknowledges seqs it sent, which were
                    // committed.
                    self.ack_wanted = self.ack_wanted.max(upto.min(*self.committed.borrow()));
                }
                AgentEvent::Policy { version, text } => self.install_policy(version, &text),
                AgentEvent::Labels { labels } => self.set_labels(labels),
                AgentEvent::NeedEvents { room } => need = Some(room),
                AgentEvent::ReportBacklog => self.report_backlog().await,
                AgentEvent::RenewDue => match self.link.renewer.request() {
                    Ok(csr) => {
                        info!("Asking the hub to renew the certificate, with a new key.");
                        self.session.renew(csr)?;
                    }
                    Err(e) => {
                        warn!(error = %e, "Cannot make a key for the certificate's renewal; trying again later.");
                        let at = self.link.renewer.retry(RENEW_RETRY);
                        self.session.set_renewal(Some(at));
                    }
                },
                AgentEvent::Renewed { cert_pem } => {
                    let at = match self.link.renewer.install(&cert_pem) {
                        Ok(at) => at,
                        Err(e) => {
                            warn!(error = %e, "Cannot use the renewed certificate; keeping the current one and trying again later.");
                            self.link.renewer.retry(RENEW_RETRY)
                        }
                    };
                    self.session.set_renewal(Some(at));
                    self.link.renewer.watch_expiry(self.link.metrics);
                }
                AgentEvent::Command { command } => {
                    let id = command.id.clone();
                    match self.link.commands {
                        Some(c) if c.submit(command) => {
                            debug!(command = %id, "Command handed to the executor.");
                        }
                        Some(_) => {
                            // Unanswered: the hub sends it again on the next
                            // connection, and the ledger keeps it single.
                            warn!(command = %id, "Command queue full; the command waits for the next connection.");
                        }
                        None => {
                            let outcome = Outcome::Unsupported {
                                reason: "this agent executes no commands".into(),
                            };
                            self.session.command_result(&id, outcome)?;
                        }
                    }
                }
                AgentEvent::RenewRefused { reason } => {
                    warn!(%reason, "The hub refused to renew the certificate; keeping the current one and asking again later.");
                    self.link.renewer.forget_request();
                }
                AgentEvent::Closed { error } => {
                    let _ = self.send.finish();
                    if let Some(job) = self.ack_job.take() {
                        marks::deleted(self.link.metrics, job.await)?;
                    }
                    return match error {
                        None if self.stopping => Ok(ControlFlow::Break(Ended::Shutdown)),
                        None => Ok(ControlFlow::Break(Ended::Closed)),
                        Some(e) => Err(e.into()),
                    };
                }
                _ => {}
            }
        }
        Ok(ControlFlow::Continue(need))
    }

    /// Reports the outbox's backlog to the hub; a failed count is skipped,
    /// and the next report comes on the session's interval.
    async fn report_backlog(&mut self) {
        if let Ok(s) = self.link.outbox.stats().await {
            self.session.report_backlog(s.events, s.bytes, s.first_seq);
        }
    }

    /// Selects the policy's rules by the labels the hub's registry holds
    /// from now on (the hub selects by them too). A failure to keep them
    /// for the next start leaves the labels in force as they were; the hub
    /// tells them again at the next connection.
    fn set_labels(&mut self, labels: std::collections::BTreeMap<String, String>) {
        let policy = self.link.policy;
        match policy.set_labels(labels) {
            Ok(true) => {
                info!(labels = ?policy.labels(), "The hub's labels are in force; the policy's rules are selected by them.");
                self.gate.refresh(policy);
            }
            Ok(false) => {}
            Err(e) => {
                warn!(error = %e, "Cannot keep the labels the hub told; the previous ones stay in force.")
            }
        }
    }

    /// Puts a policy from the hub in force, or keeps the previous one if it
    /// does not parse; the session reports which.
    fn install_policy(&mut self, version: u64, text: &str) {
        let policy = self.link.policy;
        match policy.install(version, text) {
            Ok(p) => {
                info!(
                    policy_version = version,
                    rules = p.compiled.rules(),
                    "Policy from the hub in force."
                );
                self.link
                    .metrics
                    .policy_version
                    .set(i64::try_from(version).unwrap_or(i64::MAX));
                self.session.report_policy(version, None);
            }
            Err(e) => {
                let running = policy.current().version.0;
                warn!(policy_version = version, running, error = %e, "Refused the policy from the hub; the previous one stays in force.");
                self.session.report_policy(running, Some(&e));
            }
        }
        self.gate.refresh(policy);
    }

    /// Deletes what the hub acknowledged, one request at a time and without
    /// waiting for it: acks that arrive meanwhile are merged into the next.
    /// A delete lost in a crash only means a resend, which the hub drops.
    fn start_delete(&mut self) {
        if self.ack_job.is_none() && self.ack_wanted > self.ack_asked {
            self.ack_asked = self.ack_wanted;
            self.ack_job = Some(Box::pin(self.link.outbox.ack(self.ack_asked)));
        }
    }

    /// Reads up to `room` events after where the session reads from and
    /// pushes what the policy lets through; whether anything was pushed or
    /// skipped.
    async fn feed_from_outbox(&mut self, room: usize) -> Result<bool, UplinkError> {
        self.gate.refresh(self.link.policy);
        let n = room.min(READ_CHUNK);
        let after = self.session.read_after();
        let (events, stamps) = self.link.outbox.read_stamped(after, n).await?;
        if events.is_empty() {
            return Ok(false);
        }
        let (sent, skipped, too_large) = self.feed(events, &stamps)?;
        self.link.metrics.uplink_sent.inc_by(sent);
        self.link.metrics.policy_dropped("denied_at_send", skipped);
        Ok(sent + skipped + too_large > 0)
    }

    /// Pushes what the policy lets through of `events` (read after where
    /// the session reads from) and skips the rest in the session; stops
    /// early when a `hold` rate is exhausted, deferring the session's next
    /// `NeedEvents`. Returns (pushed, skipped by the policy, skipped as too
    /// large to send).
    fn feed(
        &mut self,
        events: Vec<Event>,
        stamps: &[(Seq, i64)],
    ) -> Result<(u64, u64, u64), UplinkError> {
        let (mut sent, mut skipped, mut too_large) = (0u64, 0u64, 0u64);
        let mut stamp = 0;
        for e in events {
            let mut body = e.body;
            if let Some(reason) = self.gate.denies(&mut body) {
                tracing::trace!(seq = e.seq.0, stream = %body.stream, reason = reason.name(), "Not sent: the policy in force denies it.");
                self.session.skip(e.seq)?;
                skipped += 1;
                continue;
            }
            let size = body.value.payload_len();
            let wait = self.gate.wait(size);
            if !wait.is_zero() {
                self.session.defer_events(clock::now() + wait);
                break;
            }
            self.gate.take(size);
            match self.session.push_event(e.seq, &body) {
                Ok(()) => {
                    self.timing.pushed(e.seq, stamps, &mut stamp);
                    sent += 1;
                }
                // No session can ever send it (an outbox written by an agent
                // that stored such events): closing the connection would only
                // meet it again on the next one, and nothing behind it would
                // ever leave. It is skipped and counted; the hub's
                // acknowledgement of a later seq deletes it.
                Err(UsageError::EventTooLarge { seq, len, max }) => {
                    tracing::error!(seq = seq.0, stream = %body.stream, len, max, "Event too large for the uplink; not sent.");
                    self.link.metrics.evicted("too_large", 1);
                    self.session.skip(seq)?;
                    too_large += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok((sent, skipped, too_large))
    }

    /// Waits for the next input and feeds it to the session.
    async fn wait(&mut self) -> Result<(), UplinkError> {
        let deadline = self
            .session
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| clock::tokio_now() + NO_TIMER);
        let awaits_events = self.session.awaits_events();
        tokio::select! {
            done = async {
                match self.ack_job.as_mut() {
                    Some(job) => job.await,
                    None => std::future::pending().await,
                }
            }, if self.ack_job.is_some() => {
                self.ack_job = None;
                marks::deleted(self.link.metrics, done)?;
            }
            () = self.shutdown.cancelled(), if !self.stopping => {
                self.stopping = true;
                debug!(in_flight = self.session.in_flight(), "Uplink stopping.");
                let now = clock::now();
                self.session.stop(now, now + DRAIN);
            }
            read = self.recv.read(&mut self.buf) => match read? {
                Some(n) => self.session.handle_bytes(clock::now(), &self.buf[..n])?,
                None => return Err(UplinkError::StreamFinished),
            },
            changed = self.committed.changed(), if awaits_events => {
                if changed.is_err() {
                    // The outbox writer is gone: the agent is stopping, and
                    // nothing more can be read or deleted.
                    self.stopping = true;
                    let now = clock::now();
                    self.session.stop(now, now);
                }
            }
            Some((id, outcome)) = async {
                match self.link.commands {
                    Some(c) => c.next_result().await,
                    None => std::future::pending().await,
                }
            } => match self.session.command_result(&id, outcome) {
                Ok(()) => debug!(command = %id, "Command result sent."),
                // Received on an earlier connection: recorded in the
                // ledger, and answered when the hub sends it again.
                Err(UsageError::UnknownCommand(_)) => {
                    debug!(command = %id, "Command result for an earlier connection; kept in the ledger.")
                }
                Err(e) => warn!(command = %id, error = %e, "Command result not sent."),
            },
            () = tokio::time::sleep_until(self.next_cert_check) => {
                self.next_cert_check = clock::tokio_now() + CERT_CHECK;
                if !self.request_seen && self.link.renewer.requested() {
                    self.request_seen = true;
                    info!("An operator asked to renew the certificate.");
                    self.session.set_renewal(Some(clock::now()));
                }
                self.link.renewer.watch_expiry(self.link.metrics);
            }
            () = tokio::time::sleep_until(deadline) => self.session.handle_timeout(clock::now()),
        }
        Ok(())
    }
}
