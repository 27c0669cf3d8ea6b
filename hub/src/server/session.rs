//! The driver of one agent's [`HubSession`]: it carries bytes between the
//! QUIC stream and the session, store requests between the session and the
//! store, and the policy in force and the sinks' deliveries into the
//! session. Every protocol decision (what to store, what to acknowledge,
//! when to push the policy) is the session's.
//!
//! The loop: write what the session queued, act on its events, then wait
//! for the stream, a commit, a sink's delivery, a new policy, the stop
//! signal or the session's timer, and feed what came.

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::time::Duration;

use futures::stream::{FuturesOrdered, StreamExt};
use outpost_protocols::wire::{
    ErrorCode, HubConfig as SessionConfig, HubEvent, HubSession, ProtocolError,
};
use outpost_protocols::{AgentId, EventBody, Seq};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::binding::Certs;
use super::enforcement::{Enforcement, PolicyFeed};
use super::error::ConnError;
use crate::clock;
use crate::store::{CertInfo, StoreError, StoreHandle};

/// Batches whose commit a connection may wait on before it stops reading.
const MAX_PENDING_BATCHES: usize = 8;

/// How long the hub waits for the agent to receive its last frames (an
/// `Error`, or the acks before a close) before it closes the connection.
const LAST_WORDS: Duration = Duration::from_secs(2);

/// How often a session looks for new commands for its agent (the CLI and
/// the API write them to the store, maybe from another process).
const COMMAND_CHECK: Duration = Duration::from_secs(1);

/// How long the driver sleeps when the session has no timer (closed).
const NO_TIMER: Duration = Duration::from_secs(3600);

/// A queued insert: resolves to the last seq of its batch and what the store
/// says may be acknowledged ([`HubSession::committed`] reconciles the two).
type Commit = Pin<Box<dyn Future<Output = Result<(Seq, Seq), StoreError>> + Send>>;

/// Runs the session of the agent `id` on `conn` until it ends or `stop`;
/// the agent must open its stream before `deadline` (the hub's keep-alives
/// would otherwise keep a connection without one open for ever).
/// `registered` is set once the agent is in the registry.
pub(super) async fn session(
    conn: &quinn::Connection,
    id: &AgentId,
    store: &StoreHandle,
    policy: PolicyFeed,
    link: Link<'_>,
    stop: &CancellationToken,
    registered: &mut bool,
) -> Result<(), ConnError> {
    let Link {
        certs,
        cert,
        deadline,
    } = link;
    let mut policy = policy;
    let mut watching_trust = true;
    // Until the agent opens its stream, a revocation closes the connection
    // too: it may have passed the handshake on a view a moment old. Biased:
    // a stream that is already open wins over a deadline that passed while
    // this connection waited to supersede the previous one.
    let (send, recv) = loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return Ok(()),
            s = conn.accept_bi() => break s.map_err(ConnError::Connection)?,
            changed = policy.trust.changed(), if watching_trust => {
                if changed.is_err() {
                    watching_trust = false;
                } else if policy.trust.borrow_and_update().revocation(id).is_some() {
                    return Err(ConnError::Revoked);
                }
            }
            () = tokio::time::sleep_until(deadline) => return Err(ConnError::StreamDeadline),
        }
    };
    let mut driver = Driver::start(id, store, policy, stop, send, recv).await?;
    driver.certs = Some((certs, cert));
    let result = driver.run().await;
    *registered = driver.registered;
    result
}

/// What the connection brings to its session: the hub's certificate
/// settings, the certificate it was made with, and when it must have opened
/// its stream.
pub(super) struct Link<'a> {
    /// The binding and renewal settings.
    pub(super) certs: &'a Certs,
    /// The agent's certificate on this connection.
    pub(super) cert: &'a CertInfo,
    /// The stream deadline.
    pub(super) deadline: tokio::time::Instant,
}

/// One agent's session and everything its driver waits on.
struct Driver<'a> {
    id: &'a AgentId,
    store: &'a StoreHandle,
    stop: &'a CancellationToken,
    session: HubSession,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    policy: PolicyFeed,
    /// Whether new policy versions may still come.
    watching_policy: bool,
    /// Whether new trust views may still come.
    watching_trust: bool,
    enforcement: Enforcement,
    /// Moves when a sink's queue shrank: an acknowledgement held back for a
    /// sink may move then.
    delivered: watch::Receiver<u64>,
    /// Whether the sinks' delivery signal still has a sender.
    watching_sinks: bool,
    /// Where the previous batch of this session ended: the store refuses a
    /// batch that does not follow what it holds (an earlier one failed).
    after: Seq,
    /// The inserts handed to the store, awaited in the order they were made.
    commits: FuturesOrdered<Commit>,
    /// Whether the session was told to close (stop, or superseded).
    closing: bool,
    /// Whether the agent was put in the registry (it said `Hello`).
    registered: bool,
    /// The hub's certificate settings and the session's certificate, for
    /// renewals.
    certs: Option<(&'a Certs, &'a CertInfo)>,
    /// When to look for new commands next.
    next_command_check: tokio::time::Instant,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl<'a> Driver<'a> {
    /// Reads where the agent resumes and starts its session with the policy
    /// in force.
    async fn start(
        id: &'a AgentId,
        store: &'a StoreHandle,
        mut policy: PolicyFeed,
        stop: &'a CancellationToken,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> Result<Driver<'a>, ConnError> {
        // The agent resumes after what may be acknowledged; what it sends
        // again up to the store's own watermark (events waiting for a sink)
        // is not stored or queued twice.
        let (received, watermark) = store.resume(id.clone()).await?;
        let session = HubSession::new(
            clock::now(),
            id.clone(),
            watermark,
            SessionConfig::default(),
        )
        .holding(received);
        let current = policy.current.borrow_and_update().clone();
        // The agent's part of the policy is handed to the session once its
        // labels are known, at `Hello`.
        let enforcement = Enforcement::new(current, policy.catalog.clone());
        Ok(Driver {
            id,
            store,
            stop,
            session,
            send,
            recv,
            policy,
            watching_policy: true,
            watching_trust: true,
            enforcement,
            delivered: store.delivered_signal(),
            watching_sinks: true,
            after: received,
            commits: FuturesOrdered::new(),
            closing: false,
            registered: false,
            certs: None,
            next_command_check: clock::tokio_now() + COMMAND_CHECK,
            buf: vec![0u8; 64 * 1024],
            out: Vec::with_capacity(16 * 1024),
        })
    }

    /// The loop, in the session's poll order.
    async fn run(&mut self) -> Result<(), ConnError> {
        loop {
            self.transmit().await?;
            if self.handle_events().await?.is_break() {
                return Ok(());
            }
            // What acting on the events queued (a `Renewed`) goes now, not
            // after the next input.
            self.transmit().await?;
            if self.wait().await?.is_break() {
                return Ok(());
            }
        }
    }

    /// Writes everything the session queued.
    async fn transmit(&mut self) -> Result<(), ConnError> {
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

    /// Acts on every event the session has; `Break` once it closed cleanly.
    async fn handle_events(&mut self) -> Result<ControlFlow<()>, ConnError> {
        while let Some(event) = self.session.poll_event() {
            match event {
                HubEvent::Hello {
                    version,
                    agent_version,
                    labels,
                } => {
                    info!(version, %agent_version, policy_version = self.enforcement.version(), "Agent connected.");
                    self.store
                        .agent_connected(self.id.clone(), labels.clone(), agent_version, version)
                        .await?;
                    self.registered = true;
                    // The registry's labels select the rules, never the
                    // `Hello`'s: they are the registry's only for an agent
                    // it did not know (registered just now).
                    let held = self
                        .store
                        .labels(self.id.clone())
                        .await?
                        .unwrap_or_else(|| labels.clone());
                    if held != labels {
                        warn!(
                            stated = ?labels,
                            registry = ?held,
                            "The agent's Hello states other labels than the registry holds; ignored (counted in labels_ignored)."
                        );
                    }
                    self.use_labels(held);
                    self.deliver_commands();
                }
                HubEvent::CommandResult { id, outcome } => match &self.policy.commands {
                    Some(commands) => match commands.finish(self.id, &id, &outcome) {
                        Ok(true) => {
                            info!(command = %id, outcome = outcome.name(), reason = outcome.reason().unwrap_or(""), "Command result recorded.")
                        }
                        Ok(false) => {
                            debug!(command = %id, "Command result for a command already finished; ignored.")
                        }
                        Err(e) => {
                            warn!(command = %id, error = %e, "Cannot record the command's result; the agent reports it again when the command is sent again.")
                        }
                    },
                    None => debug!(command = %id, "Command result on a store without commands."),
                },
                HubEvent::Store { events } => self.store_batch(events).await?,
                HubEvent::PolicyStatus { version, error } => {
                    match &error {
                        Some(e) => {
                            warn!(policy_version = version, error = %e, "The agent refused the policy pushed to it and runs its previous one.")
                        }
                        None => info!(policy_version = version, "The agent runs policy."),
                    }
                    self.store
                        .policy_status(self.id.clone(), version, error)
                        .await?;
                }
                HubEvent::PolicyPushed { version } => {
                    info!(
                        policy_version = version,
                        "Pushing the policy in force to the agent."
                    );
                }
                HubEvent::Backlog { events, bytes, .. } => {
                    self.store
                        .report_backlog(self.id.clone(), events, bytes)
                        .await?;
                }
                HubEvent::Renew { csr } => {
                    let result = match self.certs {
                        Some((certs, old)) => certs.renew(self.store, self.id, old, csr).await,
                        None => outpost_protocols::wire::Renewal::Refused {
                            reason: "certificate renewal is not configured at the hub".into(),
                        },
                    };
                    self.session.renewed(result)?;
                }
                HubEvent::Closed { error } => {
                    // Commits already handed to the store finish; their acks
                    // cannot be sent any more, and the agent resends.
                    self.finish_commits().await;
                    last_words(&mut self.send).await;
                    return match error {
                        None => Ok(ControlFlow::Break(())),
                        Some(e) if e.is_from_peer() => {
                            debug!(error = %e, "Agent closed with an error.");
                            Ok(ControlFlow::Break(()))
                        }
                        Some(e) => Err(e.into()),
                    };
                }
                _ => {}
            }
        }
        Ok(ControlFlow::Continue(()))
    }

    /// Sends the agent the commands the store holds for it that this session
    /// has not sent yet; an agent too old for commands gets each recorded
    /// `unsupported`.
    fn deliver_commands(&mut self) {
        let Some(commands) = self.policy.commands.clone() else {
            return;
        };
        if !self.session.is_streaming() {
            return;
        }
        let open = match commands.deliverable(self.id) {
            Ok(open) => open,
            Err(e) => {
                warn!(error = %e, "Cannot read the agent's commands; trying again shortly.");
                return;
            }
        };
        let mut sent = Vec::new();
        for command in open {
            if self.session.has_command(&command.id) {
                continue;
            }
            let id = command.id.clone();
            if let Some(reason) = self.enforcement.refuses(&command) {
                let outcome = outpost_protocols::wire::command::Outcome::Refused { reason };
                if let Err(e) = commands.finish(self.id, &id, &outcome) {
                    warn!(command = %id, error = %e, "Cannot record the command as refused.");
                }
                continue;
            }
            match self.session.send_command(command) {
                Ok(true) => sent.push(id),
                Ok(false) => {
                    let outcome = outpost_protocols::wire::command::Outcome::Unsupported {
                        reason: format!(
                            "the agent speaks protocol version {}; commands need version 4",
                            self.session.version().unwrap_or(0)
                        ),
                    };
                    if let Err(e) = commands.finish(self.id, &id, &outcome) {
                        warn!(command = %id, error = %e, "Cannot record the command as unsupported.");
                    }
                }
                Err(e) => warn!(command = %id, error = %e, "Command not sent."),
            }
        }
        if !sent.is_empty() {
            debug!(commands = sent.len(), "Commands sent to the agent.");
            if let Err(e) = commands.delivered(&sent) {
                warn!(error = %e, "Cannot record the commands as delivered.");
            }
        }
    }

    /// Selects the policy's rules by `labels` (the registry's) and tells the
    /// agent, so that its own enforcement selects the same.
    fn use_labels(&mut self, labels: BTreeMap<String, String>) {
        if let Err(e) = self.session.tell_labels(&labels) {
            warn!(error = %e, "Cannot tell the agent its labels.");
        }
        self.enforcement.set_labels(labels, &mut self.session);
    }

    /// An operator changed labels or revocations: closes the session of a
    /// revoked agent, and selects the rules by the agent's labels again.
    async fn trust_changed(&mut self) -> Result<(), ConnError> {
        let view = self.policy.trust.borrow_and_update().clone();
        if let Some(r) = view.revocation(self.id) {
            warn!(by = %r.by, reason = %r.reason, "The agent was revoked; closing its session.");
            self.closing = true;
            self.session.close(
                ErrorCode::Revoked,
                &format!("revoked by an operator: {}", r.reason),
            );
            return Ok(());
        }
        if !self.registered {
            return Ok(());
        }
        if let Some(labels) = self.store.labels(self.id.clone()).await? {
            if labels != *self.enforcement.labels() {
                info!(
                    old = ?self.enforcement.labels(),
                    new = ?labels,
                    "An operator changed the agent's labels; its rules are selected by the new ones."
                );
                self.use_labels(labels);
            }
        }
        Ok(())
    }

    /// Paces a batch to the agent's `hold` rate, applies the policy to it
    /// again, and queues what is kept in the store; its commit is awaited in
    /// [`wait`](Self::wait).
    async fn store_batch(&mut self, events: Vec<(Seq, EventBody)>) -> Result<(), ConnError> {
        let Some(last) = events.last().map(|(seq, _)| *seq) else {
            return Ok(());
        };
        let bytes: usize = events.iter().map(|(_, b)| b.value.payload_len()).sum();
        if let Some(until) = self.enforcement.pace(events.len(), bytes, clock::now()) {
            debug!(
                held_ms = until.saturating_duration_since(clock::now()).as_millis() as u64,
                "Above the agent's hold rate: holding the batch."
            );
            tokio::select! {
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(until)) => {}
                () = self.stop.cancelled() => {}
            }
        }
        // The same policy again, because the agent may be old or
        // compromised; what it drops still moves the watermark.
        let (kept, forward, counts) = self.enforcement.apply(events);
        if counts.dropped > 0 {
            debug!(
                dropped = counts.dropped,
                modified = counts.modified,
                last = last.0,
                "The hub's policy dropped events the agent sent."
            );
        }
        // Queued now, in the order the batches arrived; awaited in that
        // order.
        let dropped = counts.dropped;
        let pending = self
            .store
            .insert_routed_nowait(self.id.clone(), kept, forward, (self.after, last), counts)
            .await?;
        self.after = last;
        let (kpis, id) = (self.store.kpis().clone(), self.id.clone());
        self.commits.push_back(Box::pin(async move {
            let o = pending.await?;
            kpis.committed(&id, o.inserted, dropped);
            Ok((last, o.acked))
        }));
        Ok(())
    }

    /// Waits for the next input and feeds it to the session; `Break` once
    /// the agent finished the stream.
    async fn wait(&mut self) -> Result<ControlFlow<()>, ConnError> {
        let deadline = self
            .session
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| clock::tokio_now() + NO_TIMER);
        let awaits_sinks = self.watching_sinks && self.session.awaits_sinks();
        tokio::select! {
            biased;
            () = self.stop.cancelled(), if !self.closing => {
                self.closing = true;
                self.session.close(ErrorCode::Superseded, "another connection of this agent took over, or the hub is stopping");
            }
            Some(r) = self.commits.next(), if !self.commits.is_empty() => {
                let (upto, acked) = r?;
                self.session.committed(upto, acked)?;
            }
            changed = self.delivered.changed(), if awaits_sinks => {
                if changed.is_err() {
                    self.watching_sinks = false;
                } else {
                    let acked = self.store.acked(self.id.clone()).await?;
                    self.session.sinks_accepted(acked)?;
                }
            }
            changed = self.policy.trust.changed(), if self.watching_trust => {
                if changed.is_ok() {
                    self.trust_changed().await?;
                } else {
                    self.watching_trust = false;
                }
            }
            changed = self.policy.current.changed(), if self.watching_policy => {
                if changed.is_ok() {
                    let current = self.policy.current.borrow_and_update().clone();
                    self.enforcement.replace(current, &mut self.session);
                } else {
                    // No more versions will come (the hub is stopping, or
                    // runs without a watch): the last one stays in force.
                    self.watching_policy = false;
                }
            }
            read = self.recv.read(&mut self.buf), if self.commits.len() < MAX_PENDING_BATCHES => match read {
                Ok(Some(n)) => {
                    if let Err(e) = self.session.handle_bytes(clock::now(), &self.buf[..n]) {
                        return Err(self.refuse(e).await);
                    }
                }
                Ok(None) => {
                    self.finish_commits().await;
                    return Ok(ControlFlow::Break(()));
                }
                Err(e) => {
                    self.finish_commits().await;
                    return Err(e.into());
                }
            },
            () = tokio::time::sleep_until(self.next_command_check), if self.policy.commands.is_some() => {
                self.next_command_check = clock::tokio_now() + COMMAND_CHECK;
                self.deliver_commands();
            }
            () = tokio::time::sleep_until(deadline) => self.session.handle_timeout(clock::now()),
        }
        Ok(ControlFlow::Continue(()))
    }

    /// The agent broke the protocol: the session queued an `Error` frame
    /// naming the code, which is sent before the connection closes with it.
    async fn refuse(&mut self, error: ProtocolError) -> ConnError {
        self.out.clear();
        while self
            .session
            .poll_transmit(clock::now(), &mut self.out)
            .is_some()
        {}
        let _ = tokio::time::timeout(LAST_WORDS, self.send.write_all(&self.out)).await;
        last_words(&mut self.send).await;
        error.into()
    }

    /// Lets the commits already handed to the store finish.
    async fn finish_commits(&mut self) {
        while self.commits.next().await.is_some() {}
    }
}

/// Finishes the send stream and waits, at most [`LAST_WORDS`], until the
/// agent has received all of it: closing the connection at once would throw
/// away stream data still in flight, such as the `Error` frame that says why.
async fn last_words(send: &mut quinn::SendStream) {
    if send.finish().is_ok() {
        let _ = tokio::time::timeout(LAST_WORDS, send.stopped()).await;
    }
}
