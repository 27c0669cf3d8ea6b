//! The hub's side of a connection: wait for `Hello`, welcome the agent with its
//! durable watermark, hand new events to the store exactly once, and
//! acknowledge what the store committed.
//!
//! ```text
//!           new(agent_id, watermark)        Hello (a common version)
//!   ──────▶ AwaitHello ──────────────────────────────────▶ Streaming
//!               │                                              │
//!               │ Error, Goodbye, timeout, bad frame,          │ same, and close()
//!               │ no common version                            │
//!               ▼                                              ▼
//!             Closed ◀──────────────────────────────────────  Closed
//! ```
//!
//! Deduplication on the wire: the session hands the store only events with a
//! seq above every seq it already handed out or found durable (the watermark
//! it was created with). Duplicates are normal after a reconnect and are
//! dropped here; a seq that goes backwards *within* a session is a protocol
//! error.
//!
//! Two marks, because a sink may be down: what the store holds
//! ([`HubSession::stored`]) and what may be acknowledged, the store and every
//! sink routed to having accepted it ([`HubSession::acknowledge`]). In
//! version 3 the first is sent as `Stored` and frees the window, so a sink
//! that is down holds back only the deletes at the agent, not its upload; in
//! versions 1 and 2 only the second exists on the wire, and the window waits
//! for it.
//!
//! Certificate renewal (version 4): a `Renew` is handed to the driver
//! (`HubEvent::Renew`), which signs it or not and answers with
//! [`HubSession::renewed`]; one renewal may be outstanding per session.
//!
//! Commands (version 4): the driver hands the session every command the
//! store holds for the agent ([`HubSession::send_command`]); the session
//! sends at most [`MAX_COMMANDS_IN_FLIGHT`] at a time, each id once per
//! session, and hands each result to the driver (`HubEvent::CommandResult`)
//! to record. An agent of an older version gets none: `send_command` says
//! so, and the driver records the command as unsupported.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::code::ErrorCode;
use super::command::{CommandId, CommandRequest, Outcome, MAX_COMMANDS_IN_FLIGHT};
use super::error::{ProtocolError, UsageError};
use super::frame::{
    check_hello, check_labels, truncate, Frame, FrameDecoder, Renewal, MAX_CERT_PEM_LEN,
    MAX_CSR_LEN, MAX_ERROR_MESSAGE_LEN,
};
use super::version::{negotiate, SUPPORTED_VERSIONS};
use crate::event::{AgentId, EventBody, Seq};
use crate::policy::MAX_POLICY_LEN;

/// The hub session's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// How many events an agent may send beyond the last acknowledged seq (at
    /// least 1). Bounds what one agent has in flight, and so the hub's memory
    /// for it.
    pub window: u32,
    /// Send a `Heartbeat` after this long without sending anything.
    pub heartbeat: Duration,
    /// Close with [`ErrorCode::Timeout`] after this long without receiving
    /// anything (also bounds the wait for `Hello`).
    pub idle_timeout: Duration,
}

impl Default for HubConfig {
    fn default() -> HubConfig {
        HubConfig {
            window: 8192,
            heartbeat: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// What the hub session tells its driver.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum HubEvent {
    /// The agent said `Hello` and was welcomed: update the registry.
    Hello {
        /// The negotiated protocol version.
        version: u16,
        /// The agent's software version.
        agent_version: String,
        /// The agent's labels.
        labels: BTreeMap<String, String>,
    },
    /// New events, in increasing seq order, none handed out before by this
    /// session nor at or below its watermark. Store them (idempotently, keyed by
    /// `(agent_id, seq)`), then call [`HubSession::stored`] and, once every
    /// sink they are routed to accepted them, [`HubSession::acknowledge`].
    Store {
        /// The events.
        events: Vec<(Seq, EventBody)>,
    },
    /// The agent reported its outbox backlog: update the registry.
    Backlog {
        /// Events in the agent's outbox.
        events: u64,
        /// Their size in bytes.
        bytes: u64,
        /// The oldest seq in the outbox, if any.
        oldest_seq: Option<Seq>,
    },
    /// The agent reported the policy version it runs (version 2): record it.
    /// The session itself pushes the policy in force
    /// ([`HubSession::set_policy`]) if the report names another version.
    PolicyStatus {
        /// The version in force at the agent (0: none).
        version: u64,
        /// Why the agent refused the last policy pushed, if it did.
        error: Option<String>,
    },
    /// The session queued a `Policy` frame with the policy in force: the
    /// agent reported another version, or a new version was set while it
    /// streams. Nothing to do but say so.
    PolicyPushed {
        /// The version pushed.
        version: u64,
    },
    /// The agent asked for a certificate for a new key (version 4): check
    /// that the request names this session's agent, sign it (or not), record
    /// the binding, and answer with [`HubSession::renewed`].
    Renew {
        /// The PKCS#10 request, DER, at most [`MAX_CSR_LEN`] bytes.
        csr: Vec<u8>,
    },
    /// The agent reported what became of a command sent in this session
    /// (version 4): record it. The next queued command goes out.
    CommandResult {
        /// The command's id.
        id: CommandId,
        /// Its outcome.
        outcome: Outcome,
    },
    /// The session is over. `None` after the agent's `Goodbye`.
    Closed {
        /// Why, if the agent did not leave cleanly.
        error: Option<ProtocolError>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitHello,
    Streaming { version: u16 },
    Closed,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::AwaitHello => "awaiting Hello",
            State::Streaming { .. } => "streaming",
            State::Closed => "closed",
        }
    }
}

/// One agent connection's worth of hub protocol state, sans-IO.
///
/// Inputs: [`handle_bytes`](Self::handle_bytes) with what the stream yields,
/// [`handle_timeout`](Self::handle_timeout) when [`poll_timeout`](Self::poll_timeout)
/// passes, and the driver's news from the store and the operator:
/// [`committed`](Self::committed) (or [`stored`](Self::stored) and
/// [`acknowledge`](Self::acknowledge)), [`sinks_accepted`](Self::sinks_accepted),
/// [`set_policy`](Self::set_policy) and [`close`](Self::close).
///
/// Every protocol decision is the session's: what to hand to the store, what
/// to acknowledge and when, and when to push the policy in force (once the
/// agent reported running another version, at most once a version per
/// session, so that a policy the agent refused is not pushed again and
/// again). The driver carries bytes, timers and store requests.
///
/// Poll order after every input: [`poll_transmit`](Self::poll_transmit) until
/// `None` (write the bytes to the stream), then [`poll_event`](Self::poll_event)
/// until `None` (a `Store` goes to the store; when it commits, call
/// `committed`, an input: poll again), then wait for bytes, a commit, a
/// sink's delivery, a new policy or [`poll_timeout`](Self::poll_timeout).
#[derive(Debug)]
pub struct HubSession {
    agent_id: AgentId,
    config: HubConfig,
    state: State,
    decoder: FrameDecoder,
    transmit: VecDeque<Vec<u8>>,
    events: VecDeque<HubEvent>,
    /// The durable watermark the session started from.
    watermark: Seq,
    /// The highest seq handed out in a `Store`, or the watermark.
    highest: Seq,
    /// The last seq received in this session, duplicates included.
    last_received: Option<Seq>,
    /// The highest seq acknowledged (at least the watermark).
    acked: Seq,
    /// The `upto` of the last `Ack` sent (or the watermark `Welcome` said).
    ack_sent: Seq,
    /// The highest seq the store holds (at least `acked`).
    held: Seq,
    /// The `upto` of the last `Stored` sent (version 3), or the watermark.
    stored_sent: Seq,
    /// The seqs handed out and still counted against the window, ascending:
    /// not yet stored (version 3) or not yet acknowledged (before it).
    in_flight: VecDeque<Seq>,
    /// The policy in force at the hub (version and text), as the driver
    /// last set it.
    policy: Option<(u64, Arc<str>)>,
    /// The policy version the agent last reported running, this session.
    reported: Option<u64>,
    /// The policy last pushed in this session (version and text).
    pushed: Option<(u64, Arc<str>)>,
    /// Whether a `Renew` was handed out and not answered yet.
    renewing: bool,
    /// Commands given by the driver and not sent yet, in order.
    commands_queued: VecDeque<CommandRequest>,
    /// Commands sent (or queued) in this session, and not yet answered.
    commands_open: BTreeSet<CommandId>,
    /// How many of `commands_open` were sent.
    commands_sent: usize,
    last_heard: Instant,
    last_sent: Instant,
}

impl HubSession {
    /// Starts a session for a connection whose certificate names `agent_id`.
    /// `watermark` is the highest seq the store holds durably for that agent (0
    /// if none), read after every earlier session's commits have finished.
    pub fn new(now: Instant, agent_id: AgentId, watermark: Seq, config: HubConfig) -> HubSession {
        // A window of 0 would wedge the session: with nothing in flight no
        // `Ack` would ever open it.
        let config = HubConfig {
            window: config.window.max(1),
            ..config
        };
        HubSession {
            agent_id,
            config,
            state: State::AwaitHello,
            decoder: FrameDecoder::new(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            watermark,
            highest: watermark,
            last_received: None,
            acked: watermark,
            ack_sent: watermark,
            held: watermark,
            stored_sent: watermark,
            in_flight: VecDeque::new(),
            policy: None,
            reported: None,
            pushed: None,
            renewing: false,
            commands_queued: VecDeque::new(),
            commands_open: BTreeSet::new(),
            commands_sent: 0,
            last_heard: now,
            last_sent: now,
        }
    }

    /// The same session for a store that holds more than it may acknowledge
    /// yet (events waiting for a sink): the `Welcome` still says `watermark`,
    /// what the agent may delete, but what it sends again up to `received`
    /// (the store's own watermark) is not handed out a second time. A
    /// version 3 agent is told `Stored { upto: received }` right after
    /// `Welcome` and resumes after it.
    #[must_use]
    pub fn holding(mut self, received: Seq) -> HubSession {
        self.highest = self.highest.max(received);
        self.held = self.held.max(received);
        self
    }

    /// Feeds bytes read from the stream and processes every complete frame.
    ///
    /// Returns the error if these bytes closed the session (it is also in the
    /// `Closed` event). Bytes after the session closed are ignored.
    pub fn handle_bytes(&mut self, now: Instant, bytes: &[u8]) -> Result<(), ProtocolError> {
        if self.state == State::Closed {
            return Ok(());
        }
        if !bytes.is_empty() {
            self.last_heard = now;
        }
        self.decoder.push(bytes);
        while self.state != State::Closed {
            let frame = match self.decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => return Err(self.fail(e.into())),
            };
            if let Err(e) = self.handle_frame(frame) {
                return Err(self.fail(e));
            }
        }
        Ok(())
    }

    fn handle_frame(&mut self, frame: Frame) -> Result<(), ProtocolError> {
        match (self.state, frame) {
            (_, Frame::Error { code, message }) => Err(ProtocolError::Peer {
                code,
                message: truncate(&message, MAX_ERROR_MESSAGE_LEN),
            }),
            (_, Frame::Goodbye) => {
                self.transmit.clear();
                self.state = State::Closed;
                self.events.push_back(HubEvent::Closed { error: None });
                Ok(())
            }
            (
                State::AwaitHello,
                Frame::Hello {
                    versions,
                    agent_version,
                    labels,
                },
            ) => {
                check_hello(&versions, &agent_version, &labels)
                    .map_err(|reason| ProtocolError::InvalidHello { reason })?;
                let Some(version) = negotiate(&versions, SUPPORTED_VERSIONS) else {
                    return Err(ProtocolError::UnsupportedVersion {
                        ours: SUPPORTED_VERSIONS.rev().collect(),
                        theirs: versions,
                    });
                };
                self.queue(&Frame::Welcome {
                    version,
                    watermark: self.watermark,
                    window: self.config.window,
                });
                self.state = State::Streaming { version };
                self.events.push_back(HubEvent::Hello {
                    version,
                    agent_version,
                    labels,
                });
                Ok(())
            }
            (State::Streaming { .. }, Frame::Batch { events }) => self.handle_batch(events),
            (
                State::Streaming { .. },
                Frame::Backlog {
                    events,
                    bytes,
                    oldest_seq,
                },
            ) => {
                self.events.push_back(HubEvent::Backlog {
                    events,
                    bytes,
                    oldest_seq,
                });
                Ok(())
            }
            (State::Streaming { version }, Frame::PolicyStatus { version: v, error })
                if version >= 2 =>
            {
                if let Some(len) = error
                    .as_ref()
                    .map(String::len)
                    .filter(|l| *l > MAX_ERROR_MESSAGE_LEN)
                {
                    return Err(ProtocolError::FieldTooLong {
                        frame: "PolicyStatus",
                        field: "error",
                        len,
                        max: MAX_ERROR_MESSAGE_LEN,
                    });
                }
                self.events
                    .push_back(HubEvent::PolicyStatus { version: v, error });
                self.reported = Some(v);
                self.push_policy_if_due();
                Ok(())
            }
            (State::Streaming { version }, Frame::Renew { csr }) if version >= 4 => {
                if self.renewing {
                    return Err(ProtocolError::UnexpectedFrame {
                        frame: "Renew",
                        state: "renewing",
                    });
                }
                if csr.len() > MAX_CSR_LEN {
                    return Err(ProtocolError::FieldTooLong {
                        frame: "Renew",
                        field: "csr",
                        len: csr.len(),
                        max: MAX_CSR_LEN,
                    });
                }
                self.renewing = true;
                self.events.push_back(HubEvent::Renew { csr });
                Ok(())
            }
            (State::Streaming { version }, Frame::CommandResult { id, outcome })
                if version >= 4 =>
            {
                outcome.check().map_err(|e| ProtocolError::InvalidCommand {
                    reason: e.to_string(),
                })?;
                let sent = !self.commands_queued.iter().any(|c| c.id == id);
                if !sent || !self.commands_open.remove(&id) {
                    return Err(ProtocolError::UnexpectedCommand {
                        frame: "CommandResult",
                        id: id.to_string(),
                        state: "not outstanding in this session",
                    });
                }
                self.commands_sent -= 1;
                self.events
                    .push_back(HubEvent::CommandResult { id, outcome });
                self.send_queued_commands();
                Ok(())
            }
            (State::Streaming { .. }, Frame::Heartbeat) => Ok(()),
            (state, frame) => Err(ProtocolError::UnexpectedFrame {
                frame: frame.kind(),
                state: state.name(),
            }),
        }
    }

    /// Sends queued commands while fewer than [`MAX_COMMANDS_IN_FLIGHT`]
    /// are outstanding.
    fn send_queued_commands(&mut self) {
        while self.commands_sent < MAX_COMMANDS_IN_FLIGHT {
            let Some(command) = self.commands_queued.pop_front() else {
                break;
            };
            self.commands_sent += 1;
            self.queue(&Frame::Command { command });
        }
    }

    /// Gives the session a command for its agent (version 4): sent now, or
    /// once fewer than [`MAX_COMMANDS_IN_FLIGHT`] are outstanding. A command
    /// whose id was given before in this session and not answered is not
    /// sent twice. Returns `false`, changing nothing, when the agent's
    /// negotiated version has no command frames (before 4): record the
    /// command as unsupported. Refused, changing nothing, when not
    /// streaming or when the command breaks a limit.
    pub fn send_command(&mut self, command: CommandRequest) -> Result<bool, UsageError> {
        let negotiated = match self.state {
            State::Streaming { version } => version,
            _ => return Err(UsageError::NotStreaming),
        };
        if negotiated < 4 {
            return Ok(false);
        }
        command.check()?;
        if self.commands_open.insert(command.id.clone()) {
            self.commands_queued.push_back(command);
            self.send_queued_commands();
        }
        Ok(true)
    }

    /// Whether the command was given in this session and not yet answered.
    #[must_use]
    pub fn has_command(&self, id: &CommandId) -> bool {
        self.commands_open.contains(id)
    }

    /// How many commands were given in this session and not yet answered
    /// (sent or waiting to be).
    #[must_use]
    pub fn commands_open(&self) -> usize {
        self.commands_open.len()
    }

    /// Checks a whole batch before taking any of it, so that a refused batch
    /// changes nothing.
    fn handle_batch(&mut self, events: Vec<(Seq, EventBody)>) -> Result<(), ProtocolError> {
        let mut previous = self.last_received;
        let mut fresh = 0usize;
        for (seq, _) in &events {
            if let Some(previous) = previous.filter(|p| seq <= p) {
                return Err(ProtocolError::SeqNotIncreasing {
                    previous,
                    got: *seq,
                });
            }
            previous = Some(*seq);
            if *seq > self.highest {
                fresh += 1;
            }
        }
        let in_flight = self.in_flight.len() as u64 + fresh as u64;
        if in_flight > u64::from(self.config.window) {
            return Err(ProtocolError::WindowExceeded {
                acked: self.acked,
                window: self.config.window,
                in_flight,
            });
        }
        self.last_received = previous;
        let highest = self.highest;
        let fresh: Vec<(Seq, EventBody)> = events
            .into_iter()
            .filter(|(seq, _)| *seq > highest)
            .collect();
        if let Some((last, _)) = fresh.last() {
            self.highest = *last;
            self.in_flight.extend(fresh.iter().map(|(seq, _)| *seq));
            self.events.push_back(HubEvent::Store { events: fresh });
        }
        Ok(())
    }

    /// Processes the passage of time: closes with [`ErrorCode::Timeout`] after
    /// the idle timeout, queues a `Heartbeat` after the heartbeat interval.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        let silent = now.saturating_duration_since(self.last_heard);
        if silent >= self.config.idle_timeout {
            self.fail(ProtocolError::IdleTimeout { silent });
            return;
        }
        if matches!(self.state, State::Streaming { .. })
            && self.transmit.is_empty()
            && self.stored_due().is_none()
            && self.ack_due().is_none()
            && now.saturating_duration_since(self.last_sent) >= self.config.heartbeat
        {
            self.queue(&Frame::Heartbeat);
            self.last_sent = now;
        }
    }

    /// Tells the session that the store has durably committed every event it
    /// handed out up to `upto`, though a sink may not have accepted them yet.
    /// In version 3 a `Stored` follows and the window opens; before, nothing
    /// is sent until [`acknowledge`](Self::acknowledge). A `upto` at or below
    /// what is known stored, or a call after `Closed`, does nothing.
    pub fn stored(&mut self, upto: Seq) -> Result<(), UsageError> {
        self.check_received(upto)?;
        if self.state == State::Closed || upto <= self.held {
            return Ok(());
        }
        self.held = upto;
        if self.speaks_stored() {
            self.release(upto);
        }
        Ok(())
    }

    /// Tells the session that every event it handed out up to `upto` is
    /// durable in the store and accepted by every sink the policy routes it
    /// to; an `Ack` follows. Implies [`stored`](Self::stored). A `upto` at or
    /// below what was acknowledged, or a call after `Closed`, does nothing.
    pub fn acknowledge(&mut self, upto: Seq) -> Result<(), UsageError> {
        self.check_received(upto)?;
        if self.state == State::Closed || upto <= self.acked {
            return Ok(());
        }
        self.acked = upto;
        self.held = self.held.max(upto);
        self.release(upto);
        if self.state == State::AwaitHello {
            // Nothing may precede `Welcome`: it says this instead.
            self.watermark = upto;
            self.ack_sent = upto;
            self.stored_sent = self.stored_sent.max(upto);
        }
        Ok(())
    }

    /// Tells the session that the store committed the batch ending at `upto`
    /// and that everything up to `acked` may be acknowledged (the store and
    /// every sink routed to accepted it): [`stored`](Self::stored) `upto`, and
    /// [`acknowledge`](Self::acknowledge) as much of `acked` as this batch
    /// covers. The store's mark may run ahead of the batch while a superseded
    /// session of the same agent is still finishing; it may lag behind it
    /// while a sink holds events back ([`awaits_sinks`](Self::awaits_sinks)).
    pub fn committed(&mut self, upto: Seq, acked: Seq) -> Result<(), UsageError> {
        self.stored(upto)?;
        self.acknowledge(acked.min(upto))
    }

    /// Tells the session that a sink's delivery moved what may be
    /// acknowledged to `acked`: acknowledges as much of it as this session
    /// handed out.
    pub fn sinks_accepted(&mut self, acked: Seq) -> Result<(), UsageError> {
        self.acknowledge(acked.min(self.highest))
    }

    /// Whether the store holds events of this session that a sink has not
    /// accepted yet, so that [`sinks_accepted`](Self::sinks_accepted) may move
    /// the acknowledgement: the driver watches the sinks' deliveries only
    /// while this holds.
    #[must_use]
    pub fn awaits_sinks(&self) -> bool {
        self.acked < self.held
    }

    fn check_received(&self, upto: Seq) -> Result<(), UsageError> {
        if upto > self.highest {
            return Err(UsageError::StoredBeyondReceived {
                received: self.highest,
                got: upto,
            });
        }
        Ok(())
    }

    /// Whether the negotiated version has the `Stored` frame.
    fn speaks_stored(&self) -> bool {
        matches!(self.state, State::Streaming { version } if version >= 3)
    }

    /// The highest `upto` an `Ack` may carry now: the agent refuses one
    /// beyond what it sent in this session, `Welcome` said or a `Stored`
    /// told it. What was acknowledged beyond that (events a resuming session
    /// holds, not yet sent again by a version 1 or 2 agent) waits until the
    /// agent sends them again.
    fn ack_limit(&self) -> Seq {
        self.last_received
            .unwrap_or(Seq(0))
            .max(self.watermark)
            .max(self.stored_sent)
    }

    /// The `Ack` to send now, if any.
    fn ack_due(&self) -> Option<Seq> {
        let upto = self.acked.min(self.ack_limit());
        (self.is_streaming() && upto > self.ack_sent).then_some(upto)
    }

    /// The `Stored` to send now (version 3), if any: what the store holds
    /// beyond everything already said, unless the `Ack` due says as much.
    fn stored_due(&self) -> Option<Seq> {
        let said = self.stored_sent.max(self.ack_sent);
        let covered = self.acked >= self.held && self.held <= self.ack_limit();
        (self.speaks_stored() && self.held > said && !covered).then_some(self.held)
    }

    /// Stops counting the seqs up to `upto` against the window.
    fn release(&mut self, upto: Seq) {
        super::window::release(&mut self.in_flight, upto);
    }

    /// Appends the next frame to `buf` and returns its length, or `None` when
    /// nothing is waiting. Call until `None`. Acknowledgements are coalesced:
    /// several `acknowledge` calls between polls send one `Ack`, several
    /// `stored` calls one `Stored`, and none is sent that an `Ack` covers.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<usize> {
        if self.transmit.is_empty() {
            if let Some(upto) = self.stored_due() {
                self.stored_sent = upto;
                self.queue(&Frame::Stored { upto });
            }
        }
        if self.transmit.is_empty() {
            if let Some(upto) = self.ack_due() {
                self.ack_sent = upto;
                self.queue(&Frame::Ack {
                    upto,
                    window: self.config.window,
                });
            }
        }
        let frame = self.transmit.pop_front()?;
        buf.extend_from_slice(&frame);
        self.last_sent = now;
        Some(frame.len())
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called, or
    /// `None` once closed.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let idle = self.last_heard + self.config.idle_timeout;
        match self.state {
            State::Closed => None,
            State::AwaitHello => Some(idle),
            State::Streaming { .. } => Some(idle.min(self.last_sent + self.config.heartbeat)),
        }
    }

    /// The next event for the driver.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<HubEvent> {
        self.events.pop_front()
    }

    /// Sets the agent's policy: after `Hello`, whenever an operator applies
    /// another version, and whenever the agent's labels select other rules
    /// (the text is the agent's own part of the fleet's document, so it can
    /// change under the same version). The session pushes it once the agent
    /// reported the version it runs (`PolicyStatus`, at once if it already
    /// did), whatever that version is, since the part it holds may be
    /// another (its labels changed while it was away), and at most once a
    /// text per session, so a policy the agent refused is not pushed again
    /// until its next connection. Version 0 (no policy) is not pushed to an
    /// agent that runs it. A version 1 agent, which has no policy frames, is
    /// pushed nothing: the hub enforces the policy on what it sends.
    ///
    /// A text over [`MAX_POLICY_LEN`] is refused, and the session then
    /// pushes nothing until another policy is set.
    pub fn set_policy(
        &mut self,
        version: u64,
        text: impl Into<Arc<str>>,
    ) -> Result<(), UsageError> {
        let text = text.into();
        if text.len() > MAX_POLICY_LEN {
            self.policy = None;
            return Err(UsageError::PolicyTooLarge {
                len: text.len(),
                max: MAX_POLICY_LEN,
            });
        }
        self.policy = Some((version, text));
        self.push_policy_if_due();
        Ok(())
    }

    /// The policy in force, as [`set_policy`](Self::set_policy) last set it.
    #[must_use]
    pub fn policy_version(&self) -> Option<u64> {
        self.policy.as_ref().map(|(version, _)| *version)
    }

    /// Pushes the agent's policy once the agent reported what it runs, if
    /// this text was not pushed in this session yet.
    fn push_policy_if_due(&mut self) {
        let Some((version, text)) = self.policy.clone() else {
            return;
        };
        if self.reported.is_none() || self.pushed.as_ref() == Some(&(version, text.clone())) {
            return;
        }
        // Version 0 (no policy) is the same for every agent, so an agent that
        // runs it cannot hold a stale part of it.
        if version == 0 && self.reported == Some(0) {
            return;
        }
        if self.push_policy(version, &text).is_ok() {
            self.pushed = Some((version, text));
            self.events.push_back(HubEvent::PolicyPushed { version });
        }
    }

    /// Queues a `Policy` frame. Refused before `Hello`, after `Closed`, and
    /// for a version 1 agent, which has no policy frames (the hub then
    /// enforces the policy on what the agent sends, and nothing else).
    pub(super) fn push_policy(&mut self, version: u64, text: &str) -> Result<(), UsageError> {
        let negotiated = match self.state {
            State::Streaming { version } => version,
            _ => return Err(UsageError::NotStreaming),
        };
        if negotiated < 2 {
            return Err(UsageError::NoPolicyFrames {
                version: negotiated,
            });
        }
        if text.len() > MAX_POLICY_LEN {
            return Err(UsageError::PolicyTooLarge {
                len: text.len(),
                max: MAX_POLICY_LEN,
            });
        }
        self.queue(&Frame::Policy {
            version,
            text: text.to_owned(),
        });
        Ok(())
    }

    /// Tells the agent the labels the hub's registry holds for it, which
    /// select the rules both ends enforce: after `Hello`, and whenever an
    /// operator changes them. Returns whether a `Labels` frame was queued:
    /// an agent of version 3 or older has no such frame and goes on
    /// selecting by its config; the hub's enforcement, which selects by the
    /// registry's labels, is what holds it to them.
    pub fn tell_labels(&mut self, labels: &BTreeMap<String, String>) -> Result<bool, UsageError> {
        let negotiated = match self.state {
            State::Streaming { version } => version,
            _ => return Err(UsageError::NotStreaming),
        };
        if negotiated < 4 {
            return Ok(false);
        }
        check_labels(labels).map_err(|reason| UsageError::InvalidLabels { reason })?;
        self.queue(&Frame::Labels {
            labels: labels.clone(),
        });
        Ok(true)
    }

    /// Answers the outstanding `Renew` with a new certificate or a refusal
    /// (its reason cut to [`MAX_ERROR_MESSAGE_LEN`]). After `Closed` it does
    /// nothing; with no `Renew` outstanding, or a certificate over
    /// [`MAX_CERT_PEM_LEN`], it is refused and changes nothing.
    pub fn renewed(&mut self, result: Renewal) -> Result<(), UsageError> {
        if self.state == State::Closed {
            return Ok(());
        }
        if !self.renewing {
            return Err(UsageError::Renewal("not outstanding"));
        }
        let result = match result {
            Renewal::Issued { cert_pem } if cert_pem.len() > MAX_CERT_PEM_LEN => {
                return Err(UsageError::TooLarge {
                    what: "certificate",
                    len: cert_pem.len(),
                    max: MAX_CERT_PEM_LEN,
                })
            }
            Renewal::Refused { reason } => Renewal::Refused {
                reason: truncate(&reason, MAX_ERROR_MESSAGE_LEN),
            },
            issued => issued,
        };
        self.renewing = false;
        self.queue(&Frame::Renewed { result });
        Ok(())
    }

    /// Closes the session for a reason found on the hub's side
    /// ([`ErrorCode::ShuttingDown`], [`ErrorCode::Internal`] when the store
    /// fails, [`ErrorCode::Superseded`], [`ErrorCode::Unauthorized`]): queues an
    /// `Error` frame and a `Closed` event with [`ProtocolError::Local`].
    pub fn close(&mut self, code: ErrorCode, message: &str) {
        if self.state == State::Closed {
            return;
        }
        self.fail(ProtocolError::Local {
            code,
            message: truncate(message, MAX_ERROR_MESSAGE_LEN),
        });
    }

    /// The agent this session serves, from its certificate.
    #[must_use]
    pub fn agent_id(&self) -> &AgentId {
        &self.agent_id
    }

    /// The negotiated version, once the agent was welcomed.
    #[must_use]
    pub fn version(&self) -> Option<u16> {
        match self.state {
            State::Streaming { version } => Some(version),
            _ => None,
        }
    }

    /// Whether the agent was welcomed and the session is not closed.
    #[must_use]
    pub fn is_streaming(&self) -> bool {
        matches!(self.state, State::Streaming { .. })
    }

    /// Whether the session is over.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The watermark the session was created with, or acknowledged before
    /// `Welcome` was sent: what `Welcome` says.
    #[must_use]
    pub fn watermark(&self) -> Seq {
        self.watermark
    }

    /// The highest seq acknowledged to the agent (or to be, at the next poll).
    #[must_use]
    pub fn acked(&self) -> Seq {
        self.acked
    }

    /// The highest seq the store holds, as far as the session was told (at
    /// least [`acked`](Self::acked)).
    #[must_use]
    pub fn held(&self) -> Seq {
        self.held
    }

    /// The highest seq handed out in a `Store` (or the watermark).
    #[must_use]
    pub fn highest_received(&self) -> Seq {
        self.highest
    }

    fn queue(&mut self, frame: &Frame) {
        let mut buf = Vec::new();
        // Control frames are a few bytes (error messages are cut to
        // MAX_ERROR_MESSAGE_LEN), so encoding cannot fail.
        if frame.encode(&mut buf).is_ok() {
            self.transmit.push_back(buf);
        }
    }

    /// Ends the session with `error`: everything not yet sent is dropped and,
    /// unless the agent ended it, an `Error` frame tells the agent why.
    fn fail(&mut self, error: ProtocolError) -> ProtocolError {
        self.transmit.clear();
        if !error.is_from_peer() {
            // A local close sends the driver's words; anything else says
            // what the peer did wrong.
            let message = match &error {
                ProtocolError::Local { message, .. } => message.clone(),
                other => truncate(&other.to_string(), MAX_ERROR_MESSAGE_LEN),
            };
            self.queue(&Frame::Error {
                code: error.code(),
                message,
            });
        }
        self.state = State::Closed;
        self.events.push_back(HubEvent::Closed {
            error: Some(error.clone()),
        });
        error
    }
}
