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

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::code::ErrorCode;
use super::error::{ProtocolError, UsageError};
use super::frame::{
    check_hello, truncate, BatchEncoder, Frame, FrameDecoder, Pushed, MAX_ERROR_MESSAGE_LEN,
    MAX_EVENT_LEN,
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
}

impl Default for AgentConfig {
    fn default() -> AgentConfig {
        AgentConfig {
            heartbeat: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            max_batch_events: 1024,
            max_batch_bytes: 256 * 1024,
            max_version: super::version::PROTOCOL_VERSION,
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
    /// The hub sent the policy to run (version 2): validate it, persist it,
    /// put it in force, then [`AgentSession::report_policy`] the outcome.
    Policy {
        /// The version the hub assigned.
        version: u64,
        /// The document's text.
        text: String,
    },
    /// The session is over; make a new one on a new connection. `None` after a
    /// `goodbye()`.
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
/// passes, and the driver's [`push_events`](Self::push_events),
/// [`report_backlog`](Self::report_backlog), [`goodbye`](Self::goodbye) and
/// [`close`](Self::close).
///
/// Poll order after every input: [`poll_transmit`](Self::poll_transmit) until
/// `None` (write the bytes to the stream), then [`poll_event`](Self::poll_event)
/// until `None` (an `Acked` deletes from the outbox; then, while
/// [`wants`](Self::wants) is above 0, read the outbox after
/// [`read_after`](Self::read_after) and push), then wait for bytes or for
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
    /// The highest seq pushed (at least the watermark).
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
            (State::Streaming { .. }, Frame::Heartbeat) => Ok(()),
            (state, frame) => Err(ProtocolError::UnexpectedFrame {
                frame: frame.kind(),
                state: state.name(),
            }),
        }
    }

    /// Processes the passage of time: closes with [`ErrorCode::Timeout`] after
    /// the idle timeout, queues a `Heartbeat` after the heartbeat interval.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        let silent = now.saturating_duration_since(self.last_received);
        if silent >= self.config.idle_timeout {
            self.fail(ProtocolError::IdleTimeout { silent });
            return;
        }
        if matches!(self.state, State::Streaming { .. })
            && self.transmit.is_empty()
            && self.open.is_empty()
            && now.saturating_duration_since(self.last_sent) >= self.config.heartbeat
        {
            self.queue(&Frame::Heartbeat);
            // Counted as sent now, so the timer moves on even if the driver
            // polls the frame a little later.
            self.last_sent = now;
        }
    }

    /// Appends the next frame to `buf` and returns its length, or `None` when
    /// nothing is waiting. Call until `None`.
    #[must_use]
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<usize> {
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
        match self.state {
            State::Closed => None,
            State::Handshake => Some(idle),
            State::Streaming { .. } => Some(idle.min(self.last_sent + self.config.heartbeat)),
        }
    }

    /// The next event for the driver.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        self.events.pop_front()
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

    /// The seq to read the outbox after: the last seq pushed, or the `Welcome`
    /// watermark before any push. Push only events with greater seqs.
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
        if !matches!(self.state, State::Streaming { .. }) {
            return Err(UsageError::NotStreaming);
        }
        if seq <= self.pushed {
            return Err(UsageError::SeqNotIncreasing {
                previous: self.pushed,
                got: seq,
            });
        }
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
        self.in_flight.push_back(seq);
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

    /// Leaves on purpose: sends what was pushed, then `Goodbye`, and closes
    /// with `Closed { error: None }`. Events not yet acknowledged stay in the
    /// outbox and are sent again by the next session (unless the hub says it
    /// stored them). For a drained stop, wait until
    /// [`in_flight`](Self::in_flight) is 0 (with a deadline) first.
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
