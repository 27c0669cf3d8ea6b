//! Frames and their codec: a 4-byte big-endian length, then a postcard body.
//!
//! ```text
//! +----------------------+---------------------------------------------+
//! | length: u32, BE      | body: postcard(Frame), `length` bytes       |
//! +----------------------+---------------------------------------------+
//!   1 <= length <= MAX_FRAME_LEN; a larger length is refused as soon as
//!   its 4 bytes arrive, before any of the body is buffered.
//!
//! Batch body, as postcard writes it (varint = LEB128, 7 bits a byte):
//!   varint(3)                      variant index of Batch
//!   varint(n)                      number of events
//!   n x ( varint(seq)              Seq
//!         EventBody )              see `event.rs`
//! ```
//!
//! postcard is not self-describing: a variant travels as its index, so variants
//! are only ever appended, never reordered, removed or changed
//! (`variant_indices_are_fixed` guards this).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::code::ErrorCode;
use super::command::{CommandId, CommandRequest, Outcome};
use crate::event::{EventBody, Seq};

/// The largest frame body, in bytes. A peer that announces more is refused with
/// [`ErrorCode::FrameTooLarge`].
pub const MAX_FRAME_LEN: usize = 4 * 1024 * 1024;

/// The largest encoded event (`seq` and body) that fits alone in a `Batch`
/// frame: the frame limit less the batch header (variant index and count).
pub const MAX_EVENT_LEN: usize = MAX_FRAME_LEN - 8;

/// The largest encoded [`EventBody`] that can be sent whatever its seq:
/// [`MAX_EVENT_LEN`] less the 10 bytes a `u64` seq takes at most as a varint.
/// A source must not store a larger body, because no session can ever send
/// it (the agent's MQTT source records such a message as bad quality instead).
pub const MAX_BODY_LEN: usize = MAX_EVENT_LEN - 10;

/// The most versions a `Hello` may offer.
pub const MAX_VERSIONS: usize = 32;

/// The longest `agent_version` in a `Hello`, in bytes.
pub const MAX_AGENT_VERSION_LEN: usize = 128;

/// The most labels a `Hello` may carry.
pub const MAX_LABELS: usize = 64;

/// The longest label name or value in a `Hello`, in bytes.
pub const MAX_LABEL_LEN: usize = 256;

/// The longest message in an `Error` frame, in bytes; longer messages are cut
/// (at a character boundary) before they are sent and when they are received.
pub const MAX_ERROR_MESSAGE_LEN: usize = 1024;

/// The longest certificate signing request in a `Renew` frame, in bytes
/// (a P-256 request is about 300).
pub const MAX_CSR_LEN: usize = 16 * 1024;

/// The longest certificate in a `Renewed` frame, PEM, in bytes (a P-256
/// agent certificate is about 700).
pub const MAX_CERT_PEM_LEN: usize = 16 * 1024;

/// The size of the length prefix.
const PREFIX_LEN: usize = 4;

/// The most buffer capacity an idle decoder keeps.
const RETAINED_CAPACITY: usize = 64 * 1024;

/// The variant index of [`Frame::Batch`], which [`BatchEncoder`] writes by hand.
const BATCH_INDEX: u64 = 3;

/// Why bytes did not form a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// A frame's length is over [`MAX_FRAME_LEN`]: announced by the peer (the
    /// body was never buffered), or of a frame being encoded.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The frame's length.
        len: usize,
        /// [`MAX_FRAME_LEN`].
        max: usize,
    },
    /// The body is not a postcard `Frame`: an unknown variant, a truncated
    /// field, invalid UTF-8, an invalid stream name, or an empty body.
    #[error("malformed frame ({what}): {source}")]
    Malformed {
        /// What the body looked like: its variant and length, so that a log
        /// line tells a peer speaking another protocol from a broken field.
        what: String,
        /// postcard's reason.
        #[source]
        source: postcard::Error,
    },
    /// The body decoded as a frame but bytes were left over after it.
    #[error("malformed frame: {extra} bytes after the end of a {frame} frame")]
    TrailingBytes {
        /// The frame that decoded.
        frame: &'static str,
        /// How many bytes were left.
        extra: usize,
    },
}

/// One frame of the agent–hub protocol.
///
/// The variant order is the wire format: append new variants at the end, never
/// reorder, remove or change one. Variants 0–2 (`Hello`, `Welcome`, `Error`) are
/// frozen for every version, so that any two versions can negotiate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Frame {
    /// 0, agent → hub, first frame: the versions the agent speaks and what it
    /// tells the registry. It carries no identity: the hub takes the agent's id
    /// from its certificate.
    Hello {
        /// Every protocol version the agent speaks, in any order.
        versions: Vec<u16>,
        /// The agent's software version, for the registry.
        agent_version: String,
        /// The agent's labels (`site`, `region`, ...), for the registry and the
        /// policy's selectors.
        labels: BTreeMap<String, String>,
    },
    /// 1, hub → agent, the answer to `Hello`.
    Welcome {
        /// The negotiated version: the highest both speak.
        version: u16,
        /// The highest seq the hub has durably stored for this agent, 0 if none.
        /// The agent resumes after it and may delete everything up to it.
        watermark: Seq,
        /// How many events the agent may send beyond `watermark` before the
        /// next `Ack`.
        window: u32,
    },
    /// 2, both ways: the sender closes the session for the reason given.
    Error {
        /// Why.
        code: ErrorCode,
        /// Details for logs, at most [`MAX_ERROR_MESSAGE_LEN`] bytes.
        message: String,
    },
    /// 3, agent → hub: events in strictly increasing seq order, continuing
    /// after the previous batch of the session. Gaps are allowed (the outbox
    /// evicts).
    Batch {
        /// The events.
        events: Vec<(Seq, EventBody)>,
    },
    /// 4, hub → agent: every event with a seq up to `upto` is durable at the
    /// hub and accepted by every sink the policy routes it to (cumulative):
    /// the agent may delete them.
    Ack {
        /// The highest seq acknowledged.
        upto: Seq,
        /// How many events the agent may send beyond `upto`.
        window: u32,
    },
    /// 5, agent → hub: what waits in the agent's outbox, for the fleet view.
    Backlog {
        /// Events in the outbox.
        events: u64,
        /// Their size in bytes.
        bytes: u64,
        /// The oldest seq in the outbox, if any.
        oldest_seq: Option<Seq>,
    },
    /// 6, both ways: sent after the sender's `heartbeat` interval
    /// without sending anything else, so the peer's idle timer is reset.
    Heartbeat,
    /// 7, agent → hub: the agent is leaving on purpose; no error.
    Goodbye,
    /// 8, hub → agent, version 2: the policy the agent must run, as the
    /// operator's TOML text (at most [`MAX_POLICY_LEN`](crate::policy::MAX_POLICY_LEN)
    /// bytes). Sent after the agent's `PolicyStatus` names another version,
    /// and whenever an operator applies a new one.
    Policy {
        /// The version the hub assigned.
        version: u64,
        /// The document.
        text: String,
    },
    /// 9, agent → hub, version 2: the policy version the agent runs (0 for
    /// none), right after `Welcome` and after each `Policy`; `error` says why
    /// a pushed policy was refused, in which case `version` is the one it
    /// still runs.
    PolicyStatus {
        /// The version in force at the agent.
        version: u64,
        /// Why the last pushed policy was not taken, at most
        /// [`MAX_ERROR_MESSAGE_LEN`] bytes.
        error: Option<String>,
    },
    /// 10, hub → agent, version 3: every event with a seq up to `upto` is
    /// durable in the hub's store, though a sink the policy routes some of
    /// them to has not accepted them yet, so no `Ack` covers them. Frees the
    /// window: the agent goes on sending, and keeps the events in its outbox
    /// until an `Ack` covers them. Right after `Welcome` it can name seqs the
    /// agent did not send in this session: the agent need not send those
    /// again.
    Stored {
        /// The highest seq durable at the hub (cumulative).
        upto: Seq,
    },
    /// 11, hub → agent, version 4: the labels the hub's registry holds for
    /// this agent, which select the policy's rules, limits and sink topics.
    /// Sent after `Welcome` and whenever an operator changes them; the
    /// agent's own enforcement selects by these, not by its config.
    Labels {
        /// The agent's labels, within the same limits as `Hello`'s.
        labels: BTreeMap<String, String>,
    },
    /// 12, agent → hub, version 4: a request for a new certificate for a key
    /// the agent just made, over the session its current certificate
    /// authenticates. At most one is outstanding per session.
    Renew {
        /// A PKCS#10 certificate signing request, DER, at most
        /// [`MAX_CSR_LEN`] bytes. The hub takes the id from the session's
        /// certificate, never from the request.
        csr: Vec<u8>,
    },
    /// 13, hub → agent, version 4: the answer to `Renew`.
    Renewed {
        /// The new certificate, or why there is none.
        result: Renewal,
    },
    /// 14, hub → agent, version 4: a command an operator sent; see
    /// [`command`](super::command). At most
    /// [`MAX_COMMANDS_IN_FLIGHT`](super::command::MAX_COMMANDS_IN_FLIGHT)
    /// are outstanding per session.
    Command {
        /// The command.
        command: CommandRequest,
    },
    /// 15, agent → hub, version 4: what became of a command sent in this
    /// session. Sent again, from the agent's record, for a command sent
    /// again.
    CommandResult {
        /// The command's id.
        id: CommandId,
        /// Its outcome.
        outcome: Outcome,
    },
}

/// What a `Renewed` frame says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Renewal {
    /// 0: the new certificate, PEM, at most [`MAX_CERT_PEM_LEN`] bytes; the
    /// agent uses it from its next connection.
    Issued {
        /// The certificate.
        cert_pem: String,
    },
    /// 1: the hub signs nothing now (renewal is not configured, the request
    /// is not for this agent or not valid); the agent tries again later.
    Refused {
        /// Why, at most [`MAX_ERROR_MESSAGE_LEN`] bytes.
        reason: String,
    },
}

/// The frames' names by variant index, for errors about bodies that did not
/// decode.
const KINDS: [&str; 16] = [
    "Hello",
    "Welcome",
    "Error",
    "Batch",
    "Ack",
    "Backlog",
    "Heartbeat",
    "Goodbye",
    "Policy",
    "PolicyStatus",
    "Stored",
    "Labels",
    "Renew",
    "Renewed",
    "Command",
    "CommandResult",
];

/// What a body that did not decode looked like, for [`FrameError::Malformed`].
fn describe(body: &[u8]) -> String {
    match body.first() {
        None => "an empty body".to_owned(),
        Some(&v) => match KINDS.get(usize::from(v)) {
            Some(kind) => format!("a {kind} frame of {} bytes", body.len()),
            None => format!("unknown variant {v} in {} bytes", body.len()),
        },
    }
}

impl Frame {
    /// The frame's name, for errors and logs.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "Hello",
            Frame::Welcome { .. } => "Welcome",
            Frame::Error { .. } => "Error",
            Frame::Batch { .. } => "Batch",
            Frame::Ack { .. } => "Ack",
            Frame::Backlog { .. } => "Backlog",
            Frame::Heartbeat => "Heartbeat",
            Frame::Goodbye => "Goodbye",
            Frame::Policy { .. } => "Policy",
            Frame::PolicyStatus { .. } => "PolicyStatus",
            Frame::Stored { .. } => "Stored",
            Frame::Labels { .. } => "Labels",
            Frame::Renew { .. } => "Renew",
            Frame::Renewed { .. } => "Renewed",
            Frame::Command { .. } => "Command",
            Frame::CommandResult { .. } => "CommandResult",
        }
    }

    /// Appends the frame, length prefix and body, to `out` and returns how many
    /// bytes it appended. On error `out` is left as it was.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<usize, FrameError> {
        let start = out.len();
        out.extend_from_slice(&[0; PREFIX_LEN]);
        if let Err(source) = postcard::to_io(self, &mut *out) {
            out.truncate(start);
            return Err(FrameError::Malformed {
                what: format!("a {} frame being encoded", self.kind()),
                source,
            });
        }
        let len = out.len() - start - PREFIX_LEN;
        match u32::try_from(len) {
            Ok(len32) if len <= MAX_FRAME_LEN => {
                out[start..start + PREFIX_LEN].copy_from_slice(&len32.to_be_bytes());
                Ok(len + PREFIX_LEN)
            }
            _ => {
                out.truncate(start);
                Err(FrameError::TooLarge {
                    len,
                    max: MAX_FRAME_LEN,
                })
            }
        }
    }

    /// Decodes one frame body (without its length prefix). Every byte must be
    /// used.
    pub fn decode(body: &[u8]) -> Result<Frame, FrameError> {
        let (frame, rest) =
            postcard::take_from_bytes::<Frame>(body).map_err(|source| FrameError::Malformed {
                what: describe(body),
                source,
            })?;
        if rest.is_empty() {
            Ok(frame)
        } else {
            Err(FrameError::TrailingBytes {
                frame: frame.kind(),
                extra: rest.len(),
            })
        }
    }
}

/// Checks a `Hello`'s fields against the limits; the error names the limit.
pub(crate) fn check_hello(
    versions: &[u16],
    agent_version: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), String> {
    if versions.is_empty() {
        return Err("no protocol version offered".into());
    }
    if versions.len() > MAX_VERSIONS {
        return Err(format!(
            "{} versions offered; at most {MAX_VERSIONS}",
            versions.len()
        ));
    }
    if agent_version.len() > MAX_AGENT_VERSION_LEN {
        return Err(format!(
            "agent_version of {} bytes; at most {MAX_AGENT_VERSION_LEN}",
            agent_version.len()
        ));
    }
    check_labels(labels)
}

/// Checks labels (of a `Hello` or a `Labels` frame) against the limits.
pub(crate) fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!("{} labels; at most {MAX_LABELS}", labels.len()));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_LABEL_LEN || v.len() > MAX_LABEL_LEN {
            return Err(format!(
                "label {:?}: names must be 1 to {MAX_LABEL_LEN} bytes and values at most {MAX_LABEL_LEN}",
                truncate(k, 64)
            ));
        }
    }
    Ok(())
}

/// `s` cut to at most `max` bytes at a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Splits a byte stream into frames.
///
/// Feed it whatever the stream yields with [`push`](Self::push), then call
/// [`next_frame`](Self::next_frame) until it returns `Ok(None)`. A length over
/// [`MAX_FRAME_LEN`] is refused as soon as its 4 bytes arrive: the bytes after it
/// are discarded, not buffered. Errors are final: after one, the decoder returns
/// the same error and ignores further input. It never panics, whatever the bytes.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// The start of the first frame not yet returned.
    read: usize,
    /// The end of the complete frames whose lengths were checked; the bytes
    /// after it are an incomplete frame.
    checked: usize,
    /// The first error, returned once the frames before it were.
    failed: Option<FrameError>,
}

impl FrameDecoder {
    /// An empty decoder.
    #[must_use]
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Appends bytes from the stream, in any chunking.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        self.compact();
        self.buf.extend_from_slice(bytes);
        // Check every length that has arrived, so that an oversized frame is
        // refused before its body is buffered.
        while let Some(prefix) = self.buf.get(self.checked..self.checked + PREFIX_LEN) {
            let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
            if len > MAX_FRAME_LEN {
                self.failed = Some(FrameError::TooLarge {
                    len,
                    max: MAX_FRAME_LEN,
                });
                self.buf.truncate(self.checked);
                self.buf.shrink_to_fit();
                return;
            }
            let end = self.checked + PREFIX_LEN + len;
            if end > self.buf.len() {
                break;
            }
            self.checked = end;
        }
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or the
    /// error that ends the stream.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.read < self.checked {
            let start = self.read + PREFIX_LEN;
            let len = self
                .buf
                .get(self.read..start)
                .map_or(0, |p| u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize);
            let body = self.buf.get(start..start + len).unwrap_or_default();
            self.read = start + len;
            let decoded = Frame::decode(body);
            if self.read == self.buf.len() {
                self.compact();
            }
            return match decoded {
                Ok(frame) => Ok(Some(frame)),
                Err(e) => {
                    self.failed = Some(e.clone());
                    self.buf = Vec::new();
                    self.read = 0;
                    self.checked = 0;
                    Err(e)
                }
            };
        }
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(None),
        }
    }

    /// How many bytes are buffered and not yet returned as frames.
    #[must_use]
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.read
    }

    /// Drops the bytes of frames already returned.
    fn compact(&mut self) {
        if self.read == 0 {
            return;
        }
        if self.read == self.buf.len() {
            self.buf.clear();
            // One large frame must not pin its buffer for the life of the
            // connection: the hub holds one decoder per agent.
            if self.buf.capacity() > RETAINED_CAPACITY {
                self.buf = Vec::new();
            }
        } else {
            self.buf.drain(..self.read);
        }
        self.checked -= self.read;
        self.read = 0;
    }
}

/// Builds a `Batch` frame event by event, encoding each event once.
///
/// The result is byte for byte what postcard writes for
/// `Frame::Batch { events }` (`a_sealed_batch_decodes_as_the_batch_frame`).
#[derive(Debug, Default)]
pub(crate) struct BatchEncoder {
    /// The encoded events.
    events: Vec<u8>,
    count: usize,
    last: Option<Seq>,
}

/// Where one event ended up; see [`BatchEncoder::push`].
pub(crate) enum Pushed {
    /// Appended; the batch may grow further.
    Appended,
    /// Appended, and the batch is full: seal it now.
    Full,
    /// Appending would have passed the byte limit: the batch before this event
    /// must be sealed, then the event pushed again into an empty batch.
    SealFirst,
}

impl BatchEncoder {
    /// Appends one event unless it would make a batch of several events exceed
    /// `max_bytes`. Returns the event's encoded size with the outcome.
    pub(crate) fn push(
        &mut self,
        seq: Seq,
        body: &EventBody,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Pushed, (usize, Option<postcard::Error>)> {
        let mark = self.events.len();
        if let Err(e) = postcard::to_io(&(seq, body), &mut self.events) {
            self.events.truncate(mark);
            return Err((0, Some(e)));
        }
        let len = self.events.len() - mark;
        if len > MAX_EVENT_LEN {
            self.events.truncate(mark);
            return Err((len, None));
        }
        if self.count > 0 && self.events.len() > max_bytes {
            self.events.truncate(mark);
            return Ok(Pushed::SealFirst);
        }
        self.count += 1;
        self.last = Some(seq);
        if self.count >= max_events || self.events.len() >= max_bytes {
            Ok(Pushed::Full)
        } else {
            Ok(Pushed::Appended)
        }
    }

    /// Whether no event was pushed since the last seal.
    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The highest seq in the batch.
    pub(crate) fn last(&self) -> Option<Seq> {
        self.last
    }

    /// The complete frame, length prefix included, and the batch is emptied.
    pub(crate) fn seal(&mut self) -> Vec<u8> {
        let mut header = Vec::with_capacity(16);
        write_varint(&mut header, BATCH_INDEX);
        write_varint(&mut header, self.count as u64);
        let len = header.len() + self.events.len();
        let mut frame = Vec::with_capacity(PREFIX_LEN + len);
        // A batch holds at most one event of MAX_EVENT_LEN or events within
        // `max_bytes` (clamped below MAX_EVENT_LEN), so `len` fits in a u32.
        frame.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
        frame.extend_from_slice(&header);
        frame.append(&mut self.events);
        self.count = 0;
        self.last = None;
        frame
    }
}

/// Appends `v` as a postcard varint (unsigned LEB128).
fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::event::{Quality, Reason, StreamName, Timestamp, Value};
    use proptest::prelude::*;

    pub(crate) fn arb_body() -> impl Strategy<Value = EventBody> {
        let value = prop_oneof![
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::I64),
            any::<u64>().prop_map(Value::U64),
            any::<f64>().prop_map(Value::F64),
            ".{0,16}".prop_map(Value::String),
            prop::collection::vec(any::<u8>(), 0..64).prop_map(Value::Bytes),
        ];
        let quality = prop_oneof![
            Just(Quality::Good),
            Just(Quality::Bad(Reason::Timeout)),
            any::<u8>().prop_map(|c| Quality::Uncertain(Reason::ModbusException(c))),
        ];
        (
            "[a-z0-9]{1,8}(/[a-z0-9_]{1,8}){0,2}",
            any::<i64>(),
            value,
            quality,
            prop::collection::btree_map("[a-z]{1,6}", ".{0,8}", 0..3),
        )
            .prop_map(|(stream, ts, value, quality, attrs)| EventBody {
                stream: StreamName::parse(&stream).expect("generated names are valid"),
                ts: Timestamp(ts),
                value,
                quality,
                attrs,
            })
    }

    fn arb_events() -> impl Strategy<Value = Vec<(Seq, EventBody)>> {
        prop::collection::vec((any::<u64>().prop_map(Seq), arb_body()), 0..6)
    }

    pub(crate) fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (
                prop::collection::vec(any::<u16>(), 0..4),
                ".{0,12}",
                prop::collection::btree_map(".{0,6}", ".{0,6}", 0..4)
            )
                .prop_map(|(versions, agent_version, labels)| Frame::Hello {
                    versions,
                    agent_version,
                    labels
                }),
            (any::<u16>(), any::<u64>(), any::<u32>()).prop_map(|(version, w, window)| {
                Frame::Welcome {
                    version,
                    watermark: Seq(w),
                    window,
                }
            }),
            (any::<u16>(), ".{0,32}").prop_map(|(code, message)| Frame::Error {
                code: ErrorCode::from_u16(code),
                message
            }),
            arb_events().prop_map(|events| Frame::Batch { events }),
            (any::<u64>(), any::<u32>()).prop_map(|(upto, window)| Frame::Ack {
                upto: Seq(upto),
                window
            }),
            (any::<u64>(), any::<u64>(), any::<Option<u64>>()).prop_map(|(events, bytes, o)| {
                Frame::Backlog {
                    events,
                    bytes,
                    oldest_seq: o.map(Seq),
                }
            }),
            Just(Frame::Heartbeat),
            Just(Frame::Goodbye),
            (any::<u64>(), ".{0,64}").prop_map(|(version, text)| Frame::Policy { version, text }),
            (any::<u64>(), prop::option::of(".{0,16}"))
                .prop_map(|(version, error)| Frame::PolicyStatus { version, error }),
            any::<u64>().prop_map(|upto| Frame::Stored { upto: Seq(upto) }),
            prop::collection::btree_map(".{0,6}", ".{0,6}", 0..4)
                .prop_map(|labels| Frame::Labels { labels }),
            prop::collection::vec(any::<u8>(), 0..512).prop_map(|csr| Frame::Renew { csr }),
            prop_oneof![
                ".{0,64}".prop_map(|cert_pem| Renewal::Issued { cert_pem }),
                ".{0,32}".prop_map(|reason| Renewal::Refused { reason }),
            ]
            .prop_map(|result| Frame::Renewed { result }),
            arb_command().prop_map(|command| Frame::Command { command }),
            ("[a-z0-9_-]{1,64}", arb_outcome()).prop_map(|(id, outcome)| Frame::CommandResult {
                id: CommandId::parse(&id).expect("generated ids are valid"),
                outcome
            }),
        ]
    }

    pub(crate) fn arb_value() -> impl Strategy<Value = crate::event::Value> {
        use crate::event::Value;
        prop_oneof![
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::I64),
            any::<u64>().prop_map(Value::U64),
            any::<f64>().prop_map(Value::F64),
            ".{0,16}".prop_map(Value::String),
        ]
    }

    pub(crate) fn arb_command() -> impl Strategy<Value = CommandRequest> {
        use super::super::command::Action;
        let stream = "[a-z0-9]{1,8}/[a-z0-9_]{1,8}"
            .prop_map(|s| StreamName::parse(&s).expect("generated names are valid"));
        let action = prop_oneof![
            (stream.clone(), arb_value())
                .prop_map(|(stream, value)| Action::Write { stream, value }),
            (
                "[a-z]{1,8}(/[a-z]{1,8}){0,3}",
                prop::collection::vec(any::<u8>(), 0..64),
                0u8..=2,
                any::<bool>()
            )
                .prop_map(|(topic, payload, qos, retain)| Action::Publish {
                    topic,
                    payload,
                    qos,
                    retain
                }),
            stream.prop_map(|stream| Action::Read { stream }),
        ];
        ("[A-Za-z0-9_-]{1,64}", any::<i64>(), "[a-z-]{0,64}", action).prop_map(
            |(id, ts, role, action)| CommandRequest {
                id: CommandId::parse(&id).expect("generated ids are valid"),
                expires_at: Timestamp(ts),
                role,
                action,
            },
        )
    }

    pub(crate) fn arb_outcome() -> impl Strategy<Value = Outcome> {
        prop_oneof![
            prop::option::of(arb_value()).prop_map(|value| Outcome::Applied { value }),
            ".{0,32}".prop_map(|reason| Outcome::Refused { reason }),
            ".{0,32}".prop_map(|reason| Outcome::Failed { reason }),
            Just(Outcome::Expired),
            ".{0,32}".prop_map(|reason| Outcome::Unsupported { reason }),
        ]
    }

    fn encode(frame: &Frame) -> Vec<u8> {
        let mut out = Vec::new();
        frame.encode(&mut out).expect("encodes");
        out
    }

    fn decode_all(bytes: &[u8]) -> Vec<Frame> {
        let mut d = FrameDecoder::new();
        d.push(bytes);
        let mut frames = Vec::new();
        while let Some(f) = d.next_frame().expect("decodes") {
            frames.push(f);
        }
        frames
    }

    proptest! {
        #[test]
        fn every_frame_round_trips_through_encode_and_decode(frame in arb_frame()) {
            let bytes = encode(&frame);
            let frames = decode_all(&bytes);
            prop_assert_eq!(frames.len(), 1);
            // Compare encodings: a NaN in an event is not equal to itself.
            prop_assert_eq!(encode(&frames[0]), bytes);
        }

        #[test]
        fn frames_survive_any_chunking(
            frames in prop::collection::vec(arb_frame(), 1..6),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let bytes: Vec<u8> = frames.iter().flat_map(encode).collect();
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut d = FrameDecoder::new();
            let mut got = Vec::new();
            let mut from = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                d.push(&bytes[from..cut]);
                from = cut;
                while let Some(f) = d.next_frame().expect("decodes") {
                    got.push(encode(&f));
                }
            }
            let want: Vec<Vec<u8>> = frames.iter().map(encode).collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(d.buffered(), 0);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(
            bytes in prop::collection::vec(any::<u8>(), 0..512),
            chunk in 1usize..64,
        ) {
            let _ = Frame::decode(&bytes);
            let mut d = FrameDecoder::new();
            for c in bytes.chunks(chunk) {
                d.push(c);
                while let Ok(Some(_)) = d.next_frame() {}
            }
        }

        #[test]
        fn decoding_a_valid_length_with_arbitrary_bodies_never_panics(
            body in prop::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
            bytes.extend_from_slice(&body);
            let mut d = FrameDecoder::new();
            d.push(&bytes);
            let _ = d.next_frame();
        }

        #[test]
        fn a_sealed_batch_decodes_as_the_batch_frame(
            events in prop::collection::vec((any::<u64>().prop_map(Seq), arb_body()), 1..20),
        ) {
            let mut b = BatchEncoder::default();
            for (seq, body) in &events {
                let pushed = b.push(*seq, body, usize::MAX, MAX_EVENT_LEN);
                prop_assert!(matches!(pushed, Ok(Pushed::Appended)));
            }
            let sealed = b.seal();
            prop_assert!(b.is_empty());
            let want = encode(&Frame::Batch { events });
            prop_assert_eq!(sealed, want);
        }
    }

    fn command_frame() -> Frame {
        Frame::Command {
            command: CommandRequest {
                id: CommandId::parse("c1").expect("valid"),
                expires_at: Timestamp(0),
                role: String::new(),
                action: super::super::command::Action::Read {
                    stream: StreamName::parse("d/t").expect("valid"),
                },
            },
        }
    }

    #[test]
    fn variant_indices_are_fixed() {
        // The first byte of a body is the variant index; changing any of these
        // breaks every deployed peer.
        let frames = [
            (
                0,
                Frame::Hello {
                    versions: vec![1],
                    agent_version: String::new(),
                    labels: BTreeMap::new(),
                },
            ),
            (
                1,
                Frame::Welcome {
                    version: 1,
                    watermark: Seq(0),
                    window: 0,
                },
            ),
            (
                2,
                Frame::Error {
                    code: ErrorCode::Internal,
                    message: String::new(),
                },
            ),
            (3, Frame::Batch { events: vec![] }),
            (
                4,
                Frame::Ack {
                    upto: Seq(0),
                    window: 0,
                },
            ),
            (
                5,
                Frame::Backlog {
                    events: 0,
                    bytes: 0,
                    oldest_seq: None,
                },
            ),
            (6, Frame::Heartbeat),
            (7, Frame::Goodbye),
            (
                8,
                Frame::Policy {
                    version: 1,
                    text: String::new(),
                },
            ),
            (
                9,
                Frame::PolicyStatus {
                    version: 0,
                    error: None,
                },
            ),
            (10, Frame::Stored { upto: Seq(0) }),
            (
                11,
                Frame::Labels {
                    labels: BTreeMap::new(),
                },
            ),
            (12, Frame::Renew { csr: vec![] }),
            (
                13,
                Frame::Renewed {
                    result: Renewal::Refused {
                        reason: String::new(),
                    },
                },
            ),
            (14, command_frame()),
            (
                15,
                Frame::CommandResult {
                    id: CommandId::parse("c1").expect("valid"),
                    outcome: Outcome::Expired,
                },
            ),
        ];
        for (index, frame) in frames {
            let bytes = encode(&frame);
            assert_eq!(bytes[PREFIX_LEN], index, "{}", frame.kind());
        }
        // A `Renewed`'s result travels as its own variant index: Issued 0,
        // Refused 1.
        let refused = encode(&Frame::Renewed {
            result: Renewal::Refused { reason: "x".into() },
        });
        assert_eq!(refused, [0, 0, 0, 4, 13, 1, 1, b'x']);
        // A result's outcome and a command's action travel as their own
        // variant indices (Applied 0 .. Unsupported 4; Write 0, Publish 1,
        // Read 2), as docs/protocol.md shows them.
        let result = encode(&Frame::CommandResult {
            id: CommandId::parse("c1").expect("valid"),
            outcome: Outcome::Expired,
        });
        assert_eq!(result, [0, 0, 0, 5, 15, 2, b'c', b'1', 3]);
        let read = encode(&Frame::Command {
            command: CommandRequest {
                id: CommandId::parse("c1").expect("valid"),
                expires_at: Timestamp(1),
                role: "r".into(),
                action: super::super::command::Action::Read {
                    stream: StreamName::parse("d/t").expect("valid"),
                },
            },
        });
        assert_eq!(
            read,
            [0, 0, 0, 12, 14, 2, b'c', b'1', 2, 1, b'r', 2, 3, b'd', b'/', b't']
        );
        // And the exact bytes of two frames, as docs/protocol.md shows them.
        assert_eq!(encode(&Frame::Heartbeat), [0, 0, 0, 1, 6]);
        assert_eq!(
            encode(&Frame::Ack {
                upto: Seq(300),
                window: 8192
            }),
            [0, 0, 0, 5, 4, 0xac, 0x02, 0x80, 0x40]
        );
    }

    #[test]
    fn a_decoder_fed_byte_by_byte_yields_every_frame() {
        let frames = [
            Frame::Heartbeat,
            Frame::Ack {
                upto: Seq(u64::MAX),
                window: u32::MAX,
            },
            Frame::Error {
                code: ErrorCode::Unknown(999),
                message: "é".repeat(300),
            },
            Frame::Goodbye,
        ];
        let bytes: Vec<u8> = frames.iter().flat_map(encode).collect();
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for b in &bytes {
            d.push(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().expect("decodes") {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn an_oversized_length_is_rejected_before_its_body_arrives() {
        let mut d = FrameDecoder::new();
        let len = (MAX_FRAME_LEN + 1) as u32;
        d.push(&len.to_be_bytes()[..3]);
        assert_eq!(d.next_frame(), Ok(None));
        d.push(&len.to_be_bytes()[3..]);
        let err = d.next_frame().expect_err("refused");
        assert_eq!(
            err,
            FrameError::TooLarge {
                len: MAX_FRAME_LEN + 1,
                max: MAX_FRAME_LEN
            }
        );
        // Nothing after the length is kept, and the error is final.
        d.push(&vec![0; 1 << 20]);
        assert_eq!(d.buffered(), 0);
        assert_eq!(d.next_frame(), Err(err));
    }

    #[test]
    fn frames_before_an_oversized_one_are_still_delivered() {
        let mut bytes = encode(&Frame::Heartbeat);
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        bytes.extend_from_slice(&[7; 100]);
        let mut d = FrameDecoder::new();
        d.push(&bytes);
        assert_eq!(d.next_frame(), Ok(Some(Frame::Heartbeat)));
        assert!(matches!(
            d.next_frame(),
            Err(FrameError::TooLarge { len, .. }) if len == u32::MAX as usize
        ));
    }

    #[test]
    fn a_frame_of_exactly_the_limit_is_accepted() {
        let mut d = FrameDecoder::new();
        d.push(&(MAX_FRAME_LEN as u32).to_be_bytes());
        d.push(&vec![0xff; MAX_FRAME_LEN - 1]);
        assert_eq!(d.next_frame(), Ok(None));
        d.push(&[0xff]);
        // The length is fine; the body is garbage.
        assert!(matches!(d.next_frame(), Err(FrameError::Malformed { .. })));
    }

    #[test]
    fn garbage_bytes_are_malformed() {
        let mut d = FrameDecoder::new();
        d.push(&[0, 0, 0, 3, 0xee, 0xff, 0x01]);
        assert!(matches!(d.next_frame(), Err(FrameError::Malformed { .. })));
        // An empty body is malformed too.
        let mut d = FrameDecoder::new();
        d.push(&[0, 0, 0, 0]);
        assert!(matches!(d.next_frame(), Err(FrameError::Malformed { .. })));
    }

    #[test]
    fn a_malformed_body_is_described_by_its_variant() {
        // Every frame's first body byte indexes KINDS with its own name.
        let frames = [
            Frame::Hello {
                versions: vec![1],
                agent_version: String::new(),
                labels: BTreeMap::new(),
            },
            Frame::Welcome {
                version: 1,
                watermark: Seq(0),
                window: 1,
            },
            Frame::Error {
                code: ErrorCode::Internal,
                message: String::new(),
            },
            Frame::Batch { events: vec![] },
            Frame::Ack {
                upto: Seq(0),
                window: 0,
            },
            Frame::Backlog {
                events: 0,
                bytes: 0,
                oldest_seq: None,
            },
            Frame::Heartbeat,
            Frame::Goodbye,
            Frame::Policy {
                version: 0,
                text: String::new(),
            },
            Frame::PolicyStatus {
                version: 0,
                error: None,
            },
            Frame::Stored { upto: Seq(0) },
            Frame::Labels {
                labels: BTreeMap::new(),
            },
            Frame::Renew { csr: vec![1, 2] },
            Frame::Renewed {
                result: Renewal::Issued {
                    cert_pem: String::new(),
                },
            },
            command_frame(),
            Frame::CommandResult {
                id: CommandId::parse("c").expect("valid"),
                outcome: Outcome::Applied { value: None },
            },
        ];
        assert_eq!(frames.len(), KINDS.len());
        for f in &frames {
            let mut out = Vec::new();
            f.encode(&mut out).unwrap();
            assert_eq!(KINDS[usize::from(out[PREFIX_LEN])], f.kind());
        }
        let msg = |bytes: &[u8]| {
            let mut d = FrameDecoder::new();
            d.push(bytes);
            d.next_frame().unwrap_err().to_string()
        };
        // An HTTP request where a frame should be: 'G' is variant 71.
        assert!(
            msg(b"\0\0\0\x05GET /").contains("unknown variant 71 in 5 bytes"),
            "{}",
            msg(b"\0\0\0\x05GET /")
        );
        // A Hello that ends inside its versions.
        assert!(msg(&[0, 0, 0, 2, 0, 5]).contains("a Hello frame of 2 bytes"));
        assert!(msg(&[0, 0, 0, 0]).contains("an empty body"));
    }

    #[test]
    fn trailing_bytes_in_a_frame_are_malformed() {
        let mut d = FrameDecoder::new();
        d.push(&[0, 0, 0, 3, 6, 0, 0]);
        assert_eq!(
            d.next_frame(),
            Err(FrameError::TrailingBytes {
                frame: "Heartbeat",
                extra: 2
            })
        );
    }

    #[test]
    fn encoding_refuses_a_frame_over_the_limit() {
        let mut out = vec![1, 2, 3];
        let frame = Frame::Error {
            code: ErrorCode::Internal,
            message: "x".repeat(MAX_FRAME_LEN),
        };
        assert!(matches!(
            frame.encode(&mut out),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(out, [1, 2, 3]);
    }

    #[test]
    fn an_event_too_large_for_a_frame_is_refused_by_the_batch_encoder() {
        let body = EventBody {
            stream: StreamName::parse("big").expect("valid"),
            ts: Timestamp(0),
            value: Value::Bytes(vec![0; MAX_EVENT_LEN]),
            quality: Quality::Good,
            attrs: BTreeMap::new(),
        };
        let mut b = BatchEncoder::default();
        assert!(matches!(b.push(Seq(1), &body, 10, 1000), Err((len, None)) if len > MAX_EVENT_LEN));
        assert!(b.is_empty());
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
