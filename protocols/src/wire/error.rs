//! The errors of the session layer.
//!
//! Layers: a [`FrameError`] (the bytes do not form a frame) lifts into a
//! [`ProtocolError`] (the frames break the protocol), which is what ends a
//! session. A [`UsageError`] is different: the driver called a session wrongly;
//! it changes nothing and ends nothing.

use std::time::Duration;

use super::code::ErrorCode;
use super::frame::FrameError;
use crate::event::Seq;

/// Why a session ended with an error. Every variant maps to the [`ErrorCode`]
/// sent to the peer ([`ProtocolError::code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The bytes from the peer did not form a frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The hub speaks none of the versions the agent offered (at the hub), or
    /// the hub chose a version the agent did not offer (at the agent).
    #[error("no common protocol version: we speak {ours:?}, the peer {theirs:?}")]
    UnsupportedVersion {
        /// The versions this side speaks.
        ours: Vec<u16>,
        /// The versions the peer offered or chose.
        theirs: Vec<u16>,
    },
    /// A `Hello` broke one of its limits ([`MAX_VERSIONS`](super::frame::MAX_VERSIONS),
    /// [`MAX_AGENT_VERSION_LEN`](super::frame::MAX_AGENT_VERSION_LEN),
    /// [`MAX_LABELS`](super::frame::MAX_LABELS), [`MAX_LABEL_LEN`](super::frame::MAX_LABEL_LEN)).
    #[error("invalid hello: {reason}")]
    InvalidHello {
        /// Which limit.
        reason: String,
    },
    /// A `Labels` frame broke the same limits as `Hello`'s labels.
    #[error("invalid labels: {reason}")]
    InvalidLabels {
        /// Which limit.
        reason: String,
    },
    /// A field of a frame is longer than its limit (a `Policy` text over
    /// [`MAX_POLICY_LEN`](crate::policy::MAX_POLICY_LEN), a `PolicyStatus`
    /// error over [`MAX_ERROR_MESSAGE_LEN`](super::frame::MAX_ERROR_MESSAGE_LEN)).
    #[error("{frame}.{field} of {len} bytes exceeds the limit of {max} bytes")]
    FieldTooLong {
        /// The frame.
        frame: &'static str,
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A frame arrived in a state where it is not allowed.
    #[error("unexpected {frame} frame while {state}")]
    UnexpectedFrame {
        /// The frame's name.
        frame: &'static str,
        /// The session's state.
        state: &'static str,
    },
    /// A seq in a `Batch` was not greater than the one before it in the session.
    #[error("seq {got} does not follow seq {previous}")]
    SeqNotIncreasing {
        /// The seq before it.
        previous: Seq,
        /// The seq received.
        got: Seq,
    },
    /// The agent sent more events beyond the acknowledged seq than the window
    /// allows.
    #[error("{in_flight} events beyond acknowledged seq {acked}; the window is {window}")]
    WindowExceeded {
        /// The last seq the hub acknowledged.
        acked: Seq,
        /// The window granted.
        window: u32,
        /// The events the agent would have in flight with this batch.
        in_flight: u64,
    },
    /// An `Ack` acknowledged less than an earlier one.
    #[error("ack for seq {got} goes back from seq {previous}")]
    AckWentBackwards {
        /// The seq acknowledged before.
        previous: Seq,
        /// The seq in this `Ack`.
        got: Seq,
    },
    /// An `Ack` acknowledged a seq the agent has not sent.
    #[error("ack for seq {got} is beyond the last seq sent, {sent}")]
    AckBeyondSent {
        /// The highest seq sent (or the watermark, if nothing was sent).
        sent: Seq,
        /// The seq in this `Ack`.
        got: Seq,
    },
    /// A `Stored` named a seq below what an earlier `Stored` or `Ack` covered.
    #[error("Stored for seq {got} is below seq {previous}, already stored or acknowledged")]
    StoredWentBackwards {
        /// The highest seq stored or acknowledged before.
        previous: Seq,
        /// The seq in this `Stored`.
        got: Seq,
    },
    /// A `Command` or `CommandResult` whose fields break their limits
    /// (version 4).
    #[error("invalid command: {reason}")]
    InvalidCommand {
        /// Which limit.
        reason: String,
    },
    /// A `CommandResult` for a command not outstanding in this session, or
    /// a `Command` whose id is already outstanding (version 4).
    #[error("{frame} for command {id}, which is {state}")]
    UnexpectedCommand {
        /// The frame.
        frame: &'static str,
        /// The command's id.
        id: String,
        /// What the session knows of it.
        state: &'static str,
    },
    /// The hub sent more commands than may be outstanding
    /// ([`MAX_COMMANDS_IN_FLIGHT`](super::command::MAX_COMMANDS_IN_FLIGHT)).
    #[error("more than {max} commands outstanding")]
    TooManyCommands {
        /// The limit.
        max: usize,
    },
    /// Nothing arrived from the peer for the idle timeout.
    #[error("nothing received for {silent:?}; idle timeout")]
    IdleTimeout {
        /// How long the peer was silent.
        silent: Duration,
    },
    /// The peer closed the session with an `Error` frame.
    #[error("peer closed the session: {code}: {message}")]
    Peer {
        /// The peer's code.
        code: ErrorCode,
        /// The peer's message (at most [`MAX_ERROR_MESSAGE_LEN`](super::frame::MAX_ERROR_MESSAGE_LEN) bytes).
        message: String,
    },
    /// This side closed the session on the driver's request.
    #[error("closed locally: {code}: {message}")]
    Local {
        /// The code sent to the peer.
        code: ErrorCode,
        /// The message sent to the peer.
        message: String,
    },
}

impl ProtocolError {
    /// The code that names this error on the wire and as the QUIC close code.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::Frame(FrameError::TooLarge { .. }) => ErrorCode::FrameTooLarge,
            ProtocolError::Frame(_)
            | ProtocolError::InvalidHello { .. }
            | ProtocolError::InvalidLabels { .. }
            | ProtocolError::FieldTooLong { .. }
            | ProtocolError::InvalidCommand { .. } => ErrorCode::Malformed,
            ProtocolError::UnexpectedCommand { .. } => ErrorCode::UnexpectedFrame,
            ProtocolError::TooManyCommands { .. } => ErrorCode::WindowExceeded,
            ProtocolError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            ProtocolError::UnexpectedFrame { .. } => ErrorCode::UnexpectedFrame,
            ProtocolError::SeqNotIncreasing { .. } => ErrorCode::SeqNotIncreasing,
            ProtocolError::WindowExceeded { .. } => ErrorCode::WindowExceeded,
            ProtocolError::AckWentBackwards { .. }
            | ProtocolError::AckBeyondSent { .. }
            | ProtocolError::StoredWentBackwards { .. } => ErrorCode::InvalidAck,
            ProtocolError::IdleTimeout { .. } => ErrorCode::Timeout,
            ProtocolError::Peer { code, .. } | ProtocolError::Local { code, .. } => *code,
        }
    }

    /// Whether the peer ended the session (with an `Error` frame) rather than
    /// this side.
    #[must_use]
    pub fn is_from_peer(&self) -> bool {
        matches!(self, ProtocolError::Peer { .. })
    }
}

/// The driver called a session wrongly. The call changed nothing, and the
/// session goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UsageError {
    /// Events were pushed before `Connected` or after `Closed`.
    #[error("the session is not streaming")]
    NotStreaming,
    /// A policy was pushed to an agent whose negotiated protocol version has
    /// no policy frames (version 1); the hub enforces it on ingest alone.
    #[error("protocol version {version} carries no policy")]
    NoPolicyFrames {
        /// The negotiated version.
        version: u16,
    },
    /// A policy text over [`MAX_POLICY_LEN`](crate::policy::MAX_POLICY_LEN).
    #[error("policy of {len} bytes exceeds the limit of {max} bytes")]
    PolicyTooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Labels that break the `Hello` limits were to be told to the agent.
    #[error("labels cannot be sent: {reason}")]
    InvalidLabels {
        /// Which limit.
        reason: String,
    },
    /// A pushed seq was not greater than the last one pushed (or the watermark).
    #[error("pushed seq {got} does not follow seq {previous}")]
    SeqNotIncreasing {
        /// The last seq pushed, or the watermark.
        previous: Seq,
        /// The seq pushed.
        got: Seq,
    },
    /// More events were pushed than the agent session's `wants` allowed.
    #[error("the window of {window} events is full")]
    WindowFull {
        /// The window the hub granted.
        window: u32,
    },
    /// One event is too large to fit in a frame, so it can never be sent. The
    /// driver must drop it from the outbox (and count it as evicted).
    #[error("event {seq} encodes to {len} bytes; at most {max} fit in a frame")]
    EventTooLarge {
        /// The event's seq.
        seq: Seq,
        /// Its encoded size.
        len: usize,
        /// [`MAX_EVENT_LEN`](super::frame::MAX_EVENT_LEN).
        max: usize,
    },
    /// An event could not be encoded. postcard encodes every
    /// [`EventBody`](crate::EventBody), so this is kept only so that encoding never panics.
    #[error("event {seq} cannot be encoded")]
    Unencodable {
        /// The event's seq.
        seq: Seq,
    },
    /// A renewal was asked of a session whose negotiated version has no
    /// renewal frames (before version 4).
    #[error("protocol version {version} carries no certificate renewal")]
    NoRenewFrames {
        /// The negotiated version.
        version: u16,
    },
    /// A `Renew` was started while one is outstanding, or a `Renewed`
    /// answered when none is.
    #[error("a renewal is {0}")]
    Renewal(&'static str),
    /// A certificate signing request or a certificate over its limit
    /// ([`MAX_CSR_LEN`](super::frame::MAX_CSR_LEN),
    /// [`MAX_CERT_PEM_LEN`](super::frame::MAX_CERT_PEM_LEN)).
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// What.
        what: &'static str,
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A command whose fields break their limits was to be sent, or an
    /// outcome whose value is over its limit was to be reported.
    #[error(transparent)]
    InvalidCommand(#[from] super::command::CommandError),
    /// A result was reported for a command not received in this session (it
    /// came in an earlier one; the hub sends it again, and the agent answers
    /// then).
    #[error("command {0} was not received in this session")]
    UnknownCommand(super::command::CommandId),
    /// `stored` named a seq beyond every seq the session handed out.
    #[error("stored seq {got} is beyond the last seq received, {received}")]
    StoredBeyondReceived {
        /// The highest seq handed out (or the watermark).
        received: Seq,
        /// The seq passed to `stored`.
        got: Seq,
    },
}
