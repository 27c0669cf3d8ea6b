//! The agent's side of a connection: say `Hello`, learn the hub's watermark,
//! stream the outbox in batches within the window, and report what the hub
//! acknowledged.
//!
//! ```text
//!            new()                 Welcome
//!   ──────▶ Handshake ───────────────────────▶ Streaming
//!               │                                  │
//!               │ Error, timeout, bad frame        │ Error, timeout, bad frame,
//!               ▼                                  ▼ goodbye(), close()
//!             Closed ◀─────────────────────────── Closed
//! ```
//!
//! One session lives for one connection. After a reconnect the driver makes a
//! new session; what to resend comes from the new `Welcome`'s watermark (and,
//! in version 3, the `Stored` after it), never from the old session.
//!
//! Two marks come back from the hub: `Ack` (stored and accepted by every sink
//! routed to: delete) and, in version 3, `Stored` (stored, a sink still owes
//! it: keep, but stop counting it against the window). A sink that is down
//! then holds back only the deletes, and the upload goes on.
//!
//! The session also decides what the agent's driver would otherwise decide
//! on its own, so that the in-memory `Pair` tests the real decisions: when to
//! read more events from the outbox (`NeedEvents`, once the window has room
//! for a large read), when to report the outbox's backlog (`ReportBacklog`,
//! on an interval), and when a graceful stop says `Goodbye` (once everything
//! the outbox committed was sent and the hub acknowledged or stored it, or
//! at the stop's deadline). The driver feeds it the outbox's last committed
//! seq and the seqs it read but will not send, and carries the bytes.
//!
//! Certificate renewal (version 4) is decided here too: the driver says when
//! its certificate is due ([`AgentSession::set_renewal`], two thirds into its
//! validity, or now on an operator's request); once streaming and due, the
//! session asks for a request (`RenewDue`), sends it as `Renew`, and hands
//! the driver the hub's answer (`Renewed` or `RenewRefused`, after which it
//! asks again [`AgentConfig::renew_retry`] later). One renewal at a time;
//! the data path goes on meanwhile.
//!
//! Commands (version 4): each `Command` is handed to the driver
//! (`AgentEvent::Command`), which looks it up in its ledger, executes it at
//! most once and reports the outcome ([`AgentSession::command_result`]).
//! A result goes only to the session that received the command: one that
//! finishes after its connection closed waits in the ledger, and the hub,
//! which sends an unanswered command again, gets it then.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::code::ErrorCode;
use super::command::{CommandId, CommandRequest, Outcome, MAX_COMMANDS_IN_FLIGHT};
use super::error::{ProtocolError, UsageError};
use super::frame::{
    check_hello, check_labels, truncate, BatchEncoder, Frame, FrameDecoder, Pushed, Renewal,
    MAX_CERT_PEM_LEN, MAX_CSR_LEN, MAX_ERROR_MESSAGE_LEN, MAX_EVENT_LEN,
};
use super::version::SUPPORTED_VERSIONS;
use crate::event::{EventBody, Seq};
use crate::policy::MAX_POLICY_LEN;

/// The agent session's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Send a `Heartbeat` after this long without sending anything.
    pub heartbeat: Duration,
    /// Close with [`ErrorCode::Timeout`] after this long without receiving
    /// anything (also bounds the wait for `Welcome`).
    pub idle_timeout: Duration,
    /// The most events in one `Batch` frame (at least 1).
    pub max_batch_events: usize,
    /// The most encoded event bytes in one `Batch` frame (a single larger event
    /// still goes alone, up to [`MAX_EVENT_LEN`]); clamped to `MAX_EVENT_LEN`.
    pub max_batch_bytes: usize,
    /// The newest protocol version to offer (default
    /// [`PROTOCOL_VERSION`](super::version::PROTOCOL_VERSION)); lower only to behave
    /// like an older agent, as the tests of the hub's enforcement do.
    pub max_version: u16,
    /// While events are in flight, ask for more ([`AgentEvent::NeedEvents`])
    /// only once the window has this much room: one large read of the outbox
    /// instead of one per acknowledged batch, which during a drain kept the
    /// uplink in lock step with the outbox's thread. With nothing in flight
    /// any room is enough.
    pub refill_at: usize,
    /// Ask for a backlog report ([`AgentEvent::ReportBacklog`]) this often
    /// while streaming.
    pub backlog_every: Duration,
    /// After the hub refused a renewal, ask for the next one
    /// ([`AgentEvent::RenewDue`]) this much later.
    pub renew_retry: Duration,
}

impl Default for AgentConfig {
    fn default() -> AgentConfig {
        AgentConfig {
            heartbeat: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            max_batch_events: 1024,
            max_batch_bytes: 256 * 1024,
            max_version: super::version::PROTOCOL_VERSION,
            refill_at: 2048,
            backlog_every: Duration::from_secs(5),
            renew_retry: Duration::from_secs(3600),
        }
    }
}

/// What the agent tells the hub about itself in `Hello`. Not its id: the hub
/// takes that from the agent's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentInfo {
    /// The agent's software version (at most
    /// [`MAX_AGENT_VERSION_LEN`](super::frame::MAX_AGENT_VERSION_LEN) bytes).
    pub agent_version: String,
    /// The agent's labels (at most [`MAX_LABELS`](super::frame::MAX_LABELS), each name
    /// and value at most [`MAX_LABEL_LEN`](super::frame::MAX_LABEL_LEN) bytes).
    pub labels: BTreeMap<String, String>,
}

/// What the agent session tells its driver.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum AgentEvent {
    /// The hub welcomed the agent. Read the outbox after
    /// [`AgentSession::read_after`] (which is `watermark` now) and push events
    /// as [`AgentSession::wants`] allows.
    Connected {
        /// The negotiated protocol version.
        version: u16,
        /// The highest seq the hub has durably stored.
        watermark: Seq,
    },
    /// The hub has durably stored every event up to `upto` and every sink
    /// routed to accepted it: delete them from the outbox. Follows `Connected`
    /// for the watermark when it is above 0.
    Acked {
        /// The highest seq acknowledged.
        upto: Seq,
    },
    /// The hub's store holds every event up to `upto`, but a sink has not
    /// accepted them all (version 3): keep them in the outbox until `Acked`.
    /// [`AgentSession::read_after`] is now at least `upto`; when `upto` is
    /// beyond the last seq the outbox ever assigned (a wiped or restored
    /// data directory), renumber what waits to follow it, as for a
    /// `Welcome` watermark.
    Stored {
        /// The highest seq stored.
        upto: Seq,
    },
    /// Read up to `room` events from the outbox after
    /// [`AgentSession::read_after`] and push them
    /// ([`AgentSession::push_event`]), or [`AgentSession::skip`] those that
    /// will not be sent. Asked once the window has room for a refill
    /// ([`AgentConfig::refill_at`], or any room with nothing in flight) and
    /// the outbox committed events beyond `read_after`
    /// ([`AgentSession::outbox_committed`]); asked again only after a push or
    /// skip, a rise of the outbox's committed seq, or the end of a
    /// [`AgentSession::defer_events`]. A read that finds nothing (the events
    /// were evicted) needs no answer.
    NeedEvents {
        /// How many events the window has room for.
        room: usize,
    },
    /// Time to tell the hub the outbox's backlog: call
    /// [`AgentSession::report_backlog`] with its figures. Asked every
    /// [`AgentConfig::backlog_every`] while streaming.
    ReportBacklog,
    /// The hub sent the policy to run (version 2): validate it, persist it,
    /// put it in force, then [`AgentSession::report_policy`] the outcome.
    Policy {
        /// The version the hub assigned.
        version: u64,
        /// The document's text.
        text: String,
    },
    /// The hub told the agent the labels its registry holds (version 4):
    /// select the policy's rules by these from now on, and keep them for
    /// the next start.
    Labels {
        /// The labels.
        labels: BTreeMap<String, String>,
    },
    /// The certificate is due for renewal and the hub can renew it (version
    /// 4): make a new key, write it beside the current one, and give the
    /// session a signing request for it ([`AgentSession::renew`]).
    RenewDue,
    /// The hub signed the request: write the certificate, then put it and
    /// the new key in place of the old ones; the next connection uses them.
    /// Then tell the session when the new one is due
    /// ([`AgentSession::set_renewal`]).
    Renewed {
        /// The new certificate, PEM.
        cert_pem: String,
    },
    /// The hub refused the request; the session asks again
    /// [`AgentConfig::renew_retry`] later. The current certificate stays.
    RenewRefused {
        /// The hub's reason.
        reason: String,
    },
    /// The hub sent a command (version 4): answer it from the ledger if it
    /// was recorded before, else record its id durably, execute it, record
    /// the outcome, and report it ([`AgentSession::command_result`]).
    Command {
        /// The command.
        command: CommandRequest,
    },
    /// The session is over; make a new one on a new connection. `None` after a
    /// `goodbye()` or a drained [`AgentSession::stop`].
    Closed {
        /// Why, if it was not a clean goodbye.
        error: Option<ProtocolError>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Handshake,
    Streaming { version: u16 },
    Closed,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Handshake => "awaiting Welcome",
            State::Streaming { .. } => "streaming",
            State::Closed => "closed",
        }
    }
}

/// One connection's worth of agent protocol state, sans-IO.
///
/// Inputs: [`handle_bytes`](Self::handle_bytes) with what the stream yields,
/// [`handle_timeout`](Self::handle_timeout) when [`poll_timeout`](Self::poll_timeout)
/// passes, and the driver's news from the outbox and the agent:
/// [`outbox_committed`](Self::outbox_committed), [`push_events`](Self::push_events)
/// and [`skip`](Self::skip), [`defer_events`](Self::defer_events),
/// [`report_backlog`](Self::report_backlog), [`report_policy`](Self::report_policy),
/// [`stop`](Self::stop) and [`close`](Self::close).
///
/// Every protocol decision is the session's: when to read more events from
/// the outbox (`NeedEvents`), when to report the backlog (`ReportBacklog`),
/// when to send a heartbeat, and when a stop is drained and says `Goodbye`.
/// The driver carries bytes, timers and outbox requests.
///
/// Poll order after every input: [`poll_transmit`](Self::poll_transmit) until
/// `None` (write the bytes to the stream), then [`poll_event`](Self::poll_event)
/// until `None` (an `Acked` deletes from the outbox; a `NeedEvents` reads the
/// outbox after [`read_after`](Self::read_after) and pushes; a
/// `ReportBacklog` reports), then wait for bytes, a rise of the outbox's
/// committed seq (while [`awaits_events`](Self::awaits_events)), or
/// [`poll_timeout`](Self::poll_timeout). Pushing is an input: poll again after it.
#[derive(Debug)]
pub struct AgentSession {
    config: AgentConfig,
    state: State,
    decoder: FrameDecoder,
    /// Encoded frames, each with the highest seq it carries.
    transmit: VecDeque<(Vec<u8>, Option<Seq>)>,
    events: VecDeque<AgentEvent>,
    /// The batch being filled by `push_events`, sealed at `poll_transmit`.
    open: BatchEncoder,
    /// The watermark from `Welcome`.
    watermark: Seq,
    /// The highest seq the hub acknowledged (at least the watermark).
    acked: Seq,
    /// The highest seq the hub stored or acknowledged.
    held: Seq,
    /// The highest seq pushed or skipped (at least the watermark, and at
    /// least what the hub stored): the outbox is read after it.
    pushed: Seq,
    /// The highest seq handed to the driver by `poll_transmit`.
    sent: Seq,
    /// The seqs pushed and neither stored nor acknowledged, ascending.
    in_flight: VecDeque<Seq>,
    /// How many events may be in flight.
    window: u32,
    /// The latest backlog report, sent once streaming.
    backlog: Option<Frame>,
    /// The latest policy report, sent once streaming (version 2 only).
    policy_status: Option<Frame>,
    /// The versions offered in `Hello`, newest first.
    offered: Vec<u16>,
    /// The outbox's last committed seq, as the driver last reported it.
    committed: Seq,
    /// Whether `NeedEvents` was asked since the last push or skip, rise of
    /// `committed` or end of a deferral.
    asked: bool,
    /// While a `hold` rate is exhausted: when pushing may go on.
    deferred: Option<Instant>,
    /// When to ask for the next backlog report.
    next_backlog: Instant,
    /// After [`stop`](Self::stop): when `Goodbye` goes at the latest.
    stop_by: Option<Instant>,
    /// When the certificate is due for renewal, as the driver set it.
    renew_at: Option<Instant>,
    /// Whether `RenewDue` was asked and not answered with a `renew`.
    renew_asked: bool,
    /// Whether a `Renew` was queued and its `Renewed` has not arrived.
    renewing: bool,
    /// Commands received in this session and not yet answered.
    commands: BTreeSet<CommandId>,
    last_received: Instant,
    last_sent: Instant,
}

impl AgentSession {
    /// Starts a session on a freshly opened stream: queues `Hello` offering
    /// every version in [`SUPPORTED_VERSIONS`].
    ///
    /// If `info` breaks a `Hello` limit the session starts closed, with
    /// [`ProtocolError::InvalidHello`] in its `Closed` event, rather than being
    /// refused by the hub.
    pub fn new(now: Instant, info: AgentInfo, config: AgentConfig) -> AgentSession {
        let config = AgentConfig {
            max_batch_events: config.max_batch_events.max(1),
            max_batch_bytes: config.max_batch_bytes.clamp(1, MAX_EVENT_LEN),
            ..config
        };
        let next_backlog = now + config.backlog_every;
        let offered: Vec<u16> = SUPPORTED_VERSIONS
            .rev()
            .filter(|v| *v <= config.max_version)
            .collect();
        let mut session = AgentSession {
            config,
            state: State::Handshake,
            decoder: FrameDecoder::new(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            open: BatchEncoder::default(),
            watermark: Seq(0),
            acked: Seq(0),
            held: Seq(0),
            pushed: Seq(0),
            sent: Seq(0),
            in_flight: VecDeque::new(),
            window: 0,
            backlog: None,
            policy_status: None,
            offered,
            committed: Seq(0),
            asked: false,
            deferred: None,
            next_backlog,
            stop_by: None,
            renew_at: None,
            renew_asked: false,
            renewing: false,
            commands: BTreeSet::new(),
            last_received: now,
            last_sent: now,
        };
        let versions = session.offered.clone();
        match check_hello(&versions, &info.agent_version, &info.labels) {
            Ok(()) => session.queue(&Frame::Hello {
                versions,
                agent_version: info.agent_version,
                labels: info.labels,
            }),
            Err(reason) => {
                // Nothing was sent yet, so there is no peer to tell.
                session.state = State::Closed;
                session.events.push_back(AgentEvent::Closed {
                    error: Some(ProtocolError::InvalidHello { reason }),
                });
            }
        }
        session
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
            // Any byte counts as life: a large frame may take longer than the
            // idle timeout to arrive on a slow link.
            self.last_received = now;
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
            (
                State::Handshake,
                Frame::Welcome {
                    version,
                    watermark,
                    window,
                },
            ) => {
                if !self.offered.contains(&version) {
                    return Err(ProtocolError::UnsupportedVersion {
                        ours: self.offered.clone(),
                        theirs: vec![version],
                    });
                }
                self.state = State::Streaming { version };
                self.watermark = watermark;
                self.acked = watermark;
                self.held = watermark;
                self.pushed = watermark;
                self.sent = watermark;
                self.window = window;
                self.events
                    .push_back(AgentEvent::Connected { version, watermark });
                if watermark > Seq(0) {
                    self.events.push_back(AgentEvent::Acked { upto: watermark });
                }
                if let Some(backlog) = self.backlog.take() {
                    self.queue(&backlog);
                }
                if let Some(status) = self.policy_status.take() {
                    if version >= 2 {
                        self.queue(&status);
                    }
                }
                Ok(())
            }
            (State::Streaming { version }, Frame::Policy { version: v, text }) if version >= 2 => {
                if text.len() > MAX_POLICY_LEN {
                    return Err(ProtocolError::FieldTooLong {
                        frame: "Policy",
                        field: "text",
                        len: text.len(),
                        max: MAX_POLICY_LEN,
                    });
                }
                self.events
                    .push_back(AgentEvent::Policy { version: v, text });
                Ok(())
            }
            (State::Streaming { version }, Frame::Labels { labels }) if version >= 4 => {
                check_labels(&labels).map_err(|reason| ProtocolError::InvalidLabels { reason })?;
                self.events.push_back(AgentEvent::Labels { labels });
                Ok(())
            }
            (State::Streaming { .. }, Frame::Ack { upto, window }) => {
                if upto < self.acked {
                    return Err(ProtocolError::AckWentBackwards {
                        previous: self.acked,
                        got: upto,
                    });
                }
                if upto > self.sent {
                    return Err(ProtocolError::AckBeyondSent {
                        sent: self.sent,
                        got: upto,
                    });
                }
                self.window = window;
                if upto > self.acked {
                    self.acked = upto;
                    self.held = self.held.max(upto);
                    self.release(upto);
                    self.events.push_back(AgentEvent::Acked { upto });
                }
                Ok(())
            }
            (State::Streaming { version }, Frame::Stored { upto }) if version >= 3 => {
                if upto < self.held {
                    return Err(ProtocolError::StoredWentBackwards {
                        previous: self.held,
                        got: upto,
                    });
                }
                if upto > self.held {
                    self.held = upto;
                    self.release(upto);
                    // Right after `Welcome` the hub may hold more than this
                    // session sent: what it holds is not sent again.
                    self.pushed = self.pushed.max(upto);
                    self.sent = self.sent.max(upto);
                    self.events.push_back(AgentEvent::Stored { upto });
                }
                Ok(())
            }
            (State::Streaming { version }, Frame::Renewed { result })
                if version >= 4 && self.renewing =>
            {
                self.renewing = false;
                match result {
                    Renewal::Issued { cert_pem } => {
                        if cert_pem.len() > MAX_CERT_PEM_LEN {
                            return Err(ProtocolError::FieldTooLong {
                                frame: "Renewed",
                                field: "cert_pem",
                                len: cert_pem.len(),
                                max: MAX_CERT_PEM_LEN,
                            });
                        }
                        // The driver sets when the new certificate is due.
                        self.renew_at = None;
                        self.events.push_back(AgentEvent::Renewed { cert_pem });
                    }
                    Renewal::Refused { reason } => {
                        self.renew_at = Some(self.last_received + self.config.renew_retry);
                        self.events.push_back(AgentEvent::RenewRefused {
                            reason: truncate(&reason, MAX_ERROR_MESSAGE_LEN),
                        });
                    }
                }
                Ok(())
            }
            (State::Streaming { version }, Frame::Command { command }) if version >= 4 => {
                command.check().map_err(|e| ProtocolError::InvalidCommand {
                    reason: e.to_string(),
                })?;
                if self.commands.contains(&command.id) {
                    return Err(ProtocolError::UnexpectedCommand {
                        frame: "Command",
                        id: command.id.to_string(),
                        state: "already outstanding in this session",
                    });
                }
                if self.commands.len() >= MAX_COMMANDS_IN_FLIGHT {
                    return Err(ProtocolError::TooManyCommands {
                        max: MAX_COMMANDS_IN_FLIGHT,
                    });
                }
                self.commands.insert(command.id.clone());
                self.events.push_back(AgentEvent::Command { command });
                Ok(())
            }
            (State::Streaming { .. }, Frame::Heartbeat) => Ok(()),
            (state, frame) => Err(ProtocolError::UnexpectedFrame {
                frame: frame.kind(),
                state: state.name(),
            }),
        }
    }

    /// Processes the passage of time: closes with [`ErrorCode::Timeout`] after
    /// the idle timeout, says `Goodbye` at a stop's deadline, queues a
    /// `Heartbeat` after the heartbeat interval, asks for a backlog report on
    /// its interval, and ends a [`defer_events`](Self::defer_events).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        let silent = now.saturating_duration_since(self.last_received);
        if silent >= self.config.idle_timeout {
            self.fail(ProtocolError::IdleTimeout { silent });
            return;
        }
        if self.stop_by.is_some_and(|by| now >= by) {
            self.goodbye();
            return;
        }
        if !matches!(self.state, State::Streaming { .. }) {
            return;
        }
        if self.transmit.is_empty()
            && self.open.is_empty()
            && now.saturating_duration_since(self.last_sent) >= self.config.heartbeat
        {
            self.queue(&Frame::Heartbeat);
            // Counted as sent now, so the timer moves on even if the driver
            // polls the frame a little later.
            self.last_sent = now;
        }
        if now >= self.next_backlog {
            self.events.push_back(AgentEvent::ReportBacklog);
            // On the interval's beat, without a burst to catch up after a
            // late call.
            self.next_backlog += self.config.backlog_every;
            if self.next_backlog <= now {
                self.next_backlog = now + self.config.backlog_every;
            }
        }
        if self.deferred.is_some_and(|until| until <= now) {
            self.deferred = None;
            self.asked = false;
        }
        if self.renewal_timer().is_some_and(|at| at <= now) {
            self.renew_asked = true;
            self.events.push_back(AgentEvent::RenewDue);
        }
    }

    /// When to ask for a renewal: set, not asked or in flight, and the hub
    /// speaks renewal (version 4).
    fn renewal_timer(&self) -> Option<Instant> {
        match self.state {
            State::Streaming { version } if version >= 4 && !self.renew_asked && !self.renewing => {
                self.renew_at
            }
            _ => None,
        }
    }

    /// Sets when the certificate is due for renewal (`None`: never, such as
    /// a certificate the driver cannot read), replacing what was set. The
    /// driver sets it from the certificate's validity at each connection
    /// and after a renewal, and to now on an operator's request. Once it
    /// passes while streaming in version 4, the session asks for a request
    /// ([`AgentEvent::RenewDue`]).
    pub fn set_renewal(&mut self, at: Option<Instant>) {
        self.renew_at = at;
        self.renew_asked = false;
    }

    /// Sends a certificate signing request (DER) for a new key: the answer
    /// to [`AgentEvent::RenewDue`]. Refused, changing nothing, before version
    /// 4, while another renewal is outstanding, or over [`MAX_CSR_LEN`].
    pub fn renew(&mut self, csr: Vec<u8>) -> Result<(), UsageError> {
        let version = match self.state {
            State::Streaming { version } => version,
            _ => return Err(UsageError::NotStreaming),
        };
        if version < 4 {
            return Err(UsageError::NoRenewFrames { version });
        }
        if self.renewing {
            return Err(UsageError::Renewal("already outstanding"));
        }
        if csr.len() > MAX_CSR_LEN {
            return Err(UsageError::TooLarge {
                what: "certificate signing request",
                len: csr.len(),
                max: MAX_CSR_LEN,
            });
        }
        self.renewing = true;
        self.renew_asked = false;
        self.queue(&Frame::Renew { csr });
        Ok(())
    }

    /// Reports what became of a command received in this session (its
    /// reason cut to [`MAX_ERROR_MESSAGE_LEN`]). Refused, changing nothing,
    /// when not streaming, for a command not received in this session or
    /// already answered, or for a value over its limit.
    pub fn command_result(&mut self, id: &CommandId, outcome: Outcome) -> Result<(), UsageError> {
        if !matches!(self.state, State::Streaming { .. }) {
            return Err(UsageError::NotStreaming);
        }
        if !self.commands.contains(id) {
            return Err(UsageError::UnknownCommand(id.clone()));
        }
        let outcome = outcome.bounded();
        outcome.check()?;
        self.commands.remove(id);
        self.queue(&Frame::CommandResult {
            id: id.clone(),
            outcome,
        });
        Ok(())
    }

    /// How many commands were received in this session and not answered.
    #[must_use]
    pub fn commands_open(&self) -> usize {
        self.commands.len()
    }

    /// Whether a `Renew` was sent and its answer has not arrived.
    #[must_use]
    pub fn is_renewing(&self) -> bool {
        self.renewing
    }

    /// Appends the next frame to `buf` and returns its length, or `None` when
    /// nothing is waiting. Call until `None`.
    ///
    /// After a [`stop`](Self::stop), this is where a drained session says
    /// `Goodbye` (and closes): here rather than in the inputs, so that a
    /// driver pushing or skipping a read's events one by one never finds the
    /// session closed halfway through.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<usize> {
        self.goodbye_if_stopped(now);
        if !self.open.is_empty() {
            self.seal();
        }
        let (frame, last) = self.transmit.pop_front()?;
        if let Some(last) = last {
            self.sent = self.sent.max(last);
        }
        buf.extend_from_slice(&frame);
        self.last_sent = now;
        Some(frame.len())
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called, or
    /// `None` once closed.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let idle = self.last_received + self.config.idle_timeout;
        let timer = match self.state {
            State::Closed => return None,
            State::Handshake => idle,
            State::Streaming { .. } => [
                Some(self.last_sent + self.config.heartbeat),
                Some(self.next_backlog),
                self.deferred,
                self.renewal_timer(),
            ]
            .into_iter()
            .flatten()
            .fold(idle, Instant::min),
        };
        Some(self.stop_by.map_or(timer, |by| timer.min(by)))
    }

    /// The next event for the driver. Once the queue is empty, a
    /// [`AgentEvent::NeedEvents`] if the session wants events from the outbox
    /// and has not asked for them yet.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        if let Some(event) = self.events.pop_front() {
            return Some(event);
        }
        if self.asked || self.committed <= self.pushed || !self.awaits_events() {
            return None;
        }
        self.asked = true;
        Some(AgentEvent::NeedEvents { room: self.wants() })
    }

    /// Whether the window has room for a refill and pushing is not deferred,
    /// so that a rise of the outbox's committed seq
    /// ([`outbox_committed`](Self::outbox_committed)) would be answered with
    /// `NeedEvents`: the driver watches the outbox's commits only while this
    /// holds.
    #[must_use]
    pub fn awaits_events(&self) -> bool {
        let room = self.wants();
        room > 0
            && (self.in_flight.is_empty() || room >= self.config.refill_at)
            && self.deferred.is_none()
    }

    /// Tells the session the outbox's last committed seq: events after
    /// [`read_after`](Self::read_after) up to it wait to be read. Call it
    /// before polling, whenever it may have risen.
    pub fn outbox_committed(&mut self, last: Seq) {
        if last > self.committed {
            self.committed = last;
            self.asked = false;
        }
    }

    /// Defers pushing until `until`: the agent's `hold` rate is exhausted. No
    /// `NeedEvents` is asked for before then.
    pub fn defer_events(&mut self, until: Instant) {
        self.deferred = Some(until);
    }

    /// How many more events the session accepts now: the window's room. 0
    /// before `Connected` and after `Closed`.
    #[must_use]
    pub fn wants(&self) -> usize {
        match self.state {
            State::Streaming { .. } => (self.window as usize).saturating_sub(self.in_flight.len()),
            _ => 0,
        }
    }

    /// The seq to read the outbox after: the last seq pushed or skipped, or
    /// the `Welcome` watermark (or the hub's `Stored` mark) beyond them. Push
    /// only events with greater seqs.
    #[must_use]
    pub fn read_after(&self) -> Seq {
        self.pushed
    }

    /// Takes events read from the outbox, in increasing seq order after
    /// [`read_after`](Self::read_after), at most [`wants`](Self::wants) of them.
    /// They are sent in `Batch` frames of at most `max_batch_events` events and
    /// `max_batch_bytes` bytes.
    ///
    /// Events are taken one by one; on an error the events before the failing
    /// one were taken, that one and those after it were not. On
    /// [`UsageError::EventTooLarge`] drop that event from the outbox (count it as
    /// evicted) and push the rest again.
    pub fn push_events(&mut self, events: Vec<(Seq, EventBody)>) -> Result<(), UsageError> {
        for (seq, body) in &events {
            self.push_event(*seq, body)?;
        }
        Ok(())
    }

    /// Takes one event; see [`push_events`](Self::push_events).
    pub fn push_event(&mut self, seq: Seq, body: &EventBody) -> Result<(), UsageError> {
        self.check_next(seq)?;
        if self.wants() == 0 {
            return Err(UsageError::WindowFull {
                window: self.window,
            });
        }
        let (max_events, max_bytes) = (self.config.max_batch_events, self.config.max_batch_bytes);
        let mut pushed = self.open.push(seq, body, max_events, max_bytes);
        if matches!(pushed, Ok(Pushed::SealFirst)) {
            self.seal();
            pushed = self.open.push(seq, body, max_events, max_bytes);
        }
        match pushed {
            Ok(Pushed::Full) => self.seal(),
            Ok(Pushed::Appended | Pushed::SealFirst) => {}
            Err((len, None)) => {
                return Err(UsageError::EventTooLarge {
                    seq,
                    len,
                    max: MAX_EVENT_LEN,
                })
            }
            Err((_, Some(_))) => return Err(UsageError::Unencodable { seq }),
        }
        self.pushed = seq;
        self.asked = false;
        self.in_flight.push_back(seq);
        Ok(())
    }

    /// Passes over an event read from the outbox that will not be sent (the
    /// policy in force denies it, or it is too large for a frame): reading
    /// resumes after it, and a stop need not wait for it. Seqs go in
    /// increasing order with the pushed ones.
    pub fn skip(&mut self, seq: Seq) -> Result<(), UsageError> {
        self.check_next(seq)?;
        self.pushed = seq;
        self.asked = false;
        Ok(())
    }

    /// Whether `seq` may be pushed or skipped now: streaming, and after
    /// [`read_after`](Self::read_after).
    fn check_next(&self, seq: Seq) -> Result<(), UsageError> {
        if !matches!(self.state, State::Streaming { .. }) {
            return Err(UsageError::NotStreaming);
        }
        if seq <= self.pushed {
            return Err(UsageError::SeqNotIncreasing {
                previous: self.pushed,
                got: seq,
            });
        }
        Ok(())
    }

    /// Reports the outbox's backlog to the hub (for the fleet view). Before
    /// `Welcome` the latest report waits and is sent once streaming.
    pub fn report_backlog(&mut self, events: u64, bytes: u64, oldest_seq: Option<Seq>) {
        let frame = Frame::Backlog {
            events,
            bytes,
            oldest_seq,
        };
        match self.state {
            State::Handshake => self.backlog = Some(frame),
            State::Streaming { .. } => self.queue(&frame),
            State::Closed => {}
        }
    }

    /// Reports the policy version in force (0 for none) and, after a pushed
    /// policy was refused, why. Before `Welcome` the latest report waits and
    /// is sent once streaming; a version 1 hub gets none.
    pub fn report_policy(&mut self, version: u64, error: Option<&str>) {
        let frame = Frame::PolicyStatus {
            version,
            error: error.map(|e| truncate(e, MAX_ERROR_MESSAGE_LEN)),
        };
        match self.state {
            State::Handshake => self.policy_status = Some(frame),
            State::Streaming { version } if version >= 2 => self.queue(&frame),
            State::Streaming { .. } | State::Closed => {}
        }
    }

    /// Stops gracefully: keeps sending what the outbox committed, then, once
    /// everything was sent and nothing is in flight (the hub acknowledged or
    /// stored it), or at `deadline` at the latest, says `Goodbye` as
    /// [`goodbye`](Self::goodbye) does. The next start then does not resend
    /// what this one delivered; the hub drops what is resent anyway. A
    /// deadline already passed says `Goodbye` now; whether the session is
    /// drained is decided at the next [`poll_transmit`](Self::poll_transmit),
    /// against the outbox's committed seq as reported before it.
    pub fn stop(&mut self, now: Instant, deadline: Instant) {
        if self.state == State::Closed {
            return;
        }
        let by = self.stop_by.map_or(deadline, |by| by.min(deadline));
        self.stop_by = Some(by);
        if now >= by {
            self.goodbye();
        }
    }

    /// Whether [`stop`](Self::stop) was called.
    #[must_use]
    pub fn is_stopping(&self) -> bool {
        self.stop_by.is_some()
    }

    /// After a stop, says `Goodbye` once drained or at the deadline.
    fn goodbye_if_stopped(&mut self, now: Instant) {
        let Some(by) = self.stop_by else {
            return;
        };
        let drained = self.in_flight.is_empty() && self.committed <= self.pushed;
        if drained || now >= by {
            self.goodbye();
        }
    }

    /// Leaves on purpose, now: sends what was pushed, then `Goodbye`, and
    /// closes with `Closed { error: None }`. Events not yet acknowledged stay
    /// in the outbox and are sent again by the next session (unless the hub
    /// says it stored them). For a drained stop, call [`stop`](Self::stop).
    pub fn goodbye(&mut self) {
        if self.state == State::Closed {
            return;
        }
        if !self.open.is_empty() {
            self.seal();
        }
        self.queue(&Frame::Goodbye);
        self.state = State::Closed;
        self.events.push_back(AgentEvent::Closed { error: None });
    }

    /// Closes with an error the agent found on its side (for example
    /// [`ErrorCode::Internal`] when the outbox fails): queues an `Error` frame
    /// and a `Closed` event with [`ProtocolError::Local`].
    pub fn close(&mut self, code: ErrorCode, message: &str) {
        if self.state == State::Closed {
            return;
        }
        self.fail(ProtocolError::Local {
            code,
            message: truncate(message, MAX_ERROR_MESSAGE_LEN),
        });
    }

    /// The negotiated version, once connected.
    #[must_use]
    pub fn version(&self) -> Option<u16> {
        match self.state {
            State::Streaming { version } => Some(version),
            _ => None,
        }
    }

    /// Whether `Welcome` was received and the session is not closed.
    #[must_use]
    pub fn is_streaming(&self) -> bool {
        matches!(self.state, State::Streaming { .. })
    }

    /// Whether the session is over.
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The watermark from `Welcome` (0 before it).
    #[must_use]
    pub fn watermark(&self) -> Seq {
        self.watermark
    }

    /// The highest seq the hub acknowledged in this session.
    #[must_use]
    pub fn acked(&self) -> Seq {
        self.acked
    }

    /// The highest seq the hub stored or acknowledged in this session.
    #[must_use]
    pub fn held(&self) -> Seq {
        self.held
    }

    /// How many pushed events count against the window: the hub has neither
    /// stored (version 3) nor acknowledged them yet.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Stops counting the seqs up to `upto` against the window.
    fn release(&mut self, upto: Seq) {
        super::window::release(&mut self.in_flight, upto);
    }

    fn seal(&mut self) {
        let last = self.open.last();
        let frame = self.open.seal();
        self.transmit.push_back((frame, last));
    }

    fn queue(&mut self, frame: &Frame) {
        let mut buf = Vec::new();
        // Control frames are a few bytes (a Hello is bounded by its limits and
        // error messages are cut to MAX_ERROR_MESSAGE_LEN), so encoding cannot
        // fail.
        if frame.encode(&mut buf).is_ok() {
            self.transmit.push_back((buf, None));
        }
    }

    /// Ends the session with `error`: everything not yet sent is dropped and,
    /// unless the peer ended it, an `Error` frame tells the peer why.
    fn fail(&mut self, error: ProtocolError) -> ProtocolError {
        self.transmit.clear();
        self.open = BatchEncoder::default();
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
        self.events.push_back(AgentEvent::Closed {
            error: Some(error.clone()),
        });
        error
    }
}
