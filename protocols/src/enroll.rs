//! The enrollment protocol, sans-IO: how a device that has no certificate yet
//! trades a one-time token and a CSR for one.
//!
//! It runs on its own ALPN ([`ALPN`], `outpost-enroll/1`) on the hub's QUIC
//! port, where only the hub authenticates (the device has nothing to present
//! yet). It is kept apart from the agent protocol so that a connection
//! without a client certificate can never reach a session: the hub
//! dispatches on the ALPN after the handshake, and `outpost/1` still demands
//! a verified certificate.
//!
//! ```text
//! one frame each way on one bidirectional stream
//! +----------------------+---------------------------------------------+
//! | length: u32, BE      | body: postcard(EnrollFrame), `length` bytes |
//! | 4 bytes              | 1 ..= MAX_FRAME_LEN (32 KiB)                |
//! +----------------------+---------------------------------------------+
//!
//!   0 Request  device -> hub   agent_id, token, csr_der
//!   1 Issued   hub -> device   cert_pem, ca_pem
//!   2 Refused  hub -> device   code (u16), reason
//!
//! device                                  hub
//!   | (TLS: the hub's certificate is checked against the fleet CA
//!   |  before anything is sent)
//!   | Request{agent_id, token, csr} ----->  |  token unused, unexpired, for
//!   |                                       |  agent_id; CSR signed, P-256,
//!   |                                       |  names no other id
//!   | <----- Issued{cert_pem, ca_pem}       |  or Refused{code, reason}
//! ```
//!
//! One frame each way, so each side is a tiny state machine: the device's
//! [`DeviceEnrollment`] encodes its request and waits for the answer; the
//! hub's [`HubEnrollment`] waits for the request and encodes its answer.
//! Both decode incrementally, refuse a length over the limit as soon as its
//! 4 bytes arrive, and never panic on any input.
//!
//! Architecture invariant: the token is a secret: no `Debug` output, error or
//! log line in this module contains it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::event::AgentId;

/// The TLS ALPN protocol id of enrollment.
pub const ALPN: &[u8] = b"outpost-enroll/1";

/// The largest frame body, in bytes: a CSR and two PEM certificates with
/// room to spare, and small enough that an unauthenticated peer costs the hub
/// little.
pub const MAX_FRAME_LEN: usize = 32 * 1024;

/// The longest token, in bytes (the hub's are 43).
pub const MAX_TOKEN_LEN: usize = 128;

/// The largest CSR, in bytes of DER (a P-256 request is about 300).
pub const MAX_CSR_LEN: usize = 4096;

/// The largest certificate or CA text in an `Issued` frame, in bytes each.
pub const MAX_PEM_LEN: usize = 12 * 1024;

/// The longest reason in a `Refused` frame, in bytes; longer ones are cut at
/// a character boundary before they are sent.
pub const MAX_REASON_LEN: usize = 1024;

/// The size of the length prefix.
const PREFIX_LEN: usize = 4;

/// Why an enrollment was refused, as both sides name it (a `u16` on the
/// wire). Codes are never renumbered or reused; one this build does not
/// know is kept as [`RefusalCode::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
#[non_exhaustive]
pub enum RefusalCode {
    /// 1: no token has this value.
    TokenUnknown,
    /// 2: the token was used already.
    TokenUsed,
    /// 3: the token expired.
    TokenExpired,
    /// 4: an operator revoked the token.
    TokenRevoked,
    /// 5: the token was created for another agent id.
    TokenForAnotherAgent,
    /// 6: the CSR does not parse, its signature does not verify, or its key
    /// is not ECDSA P-256.
    CsrInvalid,
    /// 7: the CSR names another agent id.
    CsrForAnotherId,
    /// 8: too many attempts from this address; try again later.
    RateLimited,
    /// 9: the hub failed on its own side.
    Internal,
    /// 10: this hub does not enroll (no CA key configured).
    Disabled,
    /// 11: the request is not a valid `Request` frame.
    Malformed,
    /// A code this build does not know; never one of the values above.
    Unknown(u16),
}

impl RefusalCode {
    /// The code as sent.
    #[must_use]
    pub fn to_u16(self) -> u16 {
        match self {
            RefusalCode::TokenUnknown => 1,
            RefusalCode::TokenUsed => 2,
            RefusalCode::TokenExpired => 3,
            RefusalCode::TokenRevoked => 4,
            RefusalCode::TokenForAnotherAgent => 5,
            RefusalCode::CsrInvalid => 6,
            RefusalCode::CsrForAnotherId => 7,
            RefusalCode::RateLimited => 8,
            RefusalCode::Internal => 9,
            RefusalCode::Disabled => 10,
            RefusalCode::Malformed => 11,
            RefusalCode::Unknown(code) => code,
        }
    }

    /// The code for a `u16`; unknown values become [`RefusalCode::Unknown`].
    #[must_use]
    pub fn from_u16(code: u16) -> RefusalCode {
        match code {
            1 => RefusalCode::TokenUnknown,
            2 => RefusalCode::TokenUsed,
            3 => RefusalCode::TokenExpired,
            4 => RefusalCode::TokenRevoked,
            5 => RefusalCode::TokenForAnotherAgent,
            6 => RefusalCode::CsrInvalid,
            7 => RefusalCode::CsrForAnotherId,
            8 => RefusalCode::RateLimited,
            9 => RefusalCode::Internal,
            10 => RefusalCode::Disabled,
            11 => RefusalCode::Malformed,
            other => RefusalCode::Unknown(other),
        }
    }

    /// The code's name, as logs, the audit log and `docs/protocol.md` write it.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            RefusalCode::TokenUnknown => "token_unknown",
            RefusalCode::TokenUsed => "token_used",
            RefusalCode::TokenExpired => "token_expired",
            RefusalCode::TokenRevoked => "token_revoked",
            RefusalCode::TokenForAnotherAgent => "token_for_another_agent",
            RefusalCode::CsrInvalid => "csr_invalid",
            RefusalCode::CsrForAnotherId => "csr_for_another_id",
            RefusalCode::RateLimited => "rate_limited",
            RefusalCode::Internal => "internal",
            RefusalCode::Disabled => "disabled",
            RefusalCode::Malformed => "malformed",
            RefusalCode::Unknown(_) => "unknown",
        }
    }
}

impl From<u16> for RefusalCode {
    fn from(code: u16) -> RefusalCode {
        RefusalCode::from_u16(code)
    }
}

impl From<RefusalCode> for u16 {
    fn from(code: RefusalCode) -> u16 {
        code.to_u16()
    }
}

impl fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefusalCode::Unknown(code) => write!(f, "unknown ({code})"),
            other => f.write_str(other.name()),
        }
    }
}

/// One frame of the enrollment protocol. The variant order is the wire
/// format: append, never reorder or change.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum EnrollFrame {
    /// 0, device → hub: the only frame the device sends.
    Request {
        /// The id the device enrolls as (its `[agent] id`).
        agent_id: String,
        /// The one-time token the operator gave it.
        token: String,
        /// A PKCS#10 request for the device's own key, DER.
        csr_der: Vec<u8>,
    },
    /// 1, hub → device: the certificate and the fleet CA.
    Issued {
        /// The device's certificate, PEM.
        cert_pem: String,
        /// The fleet CA's certificate, PEM.
        ca_pem: String,
    },
    /// 2, hub → device: no certificate, and why.
    Refused {
        /// Why, by name.
        code: RefusalCode,
        /// Details for the operator, at most [`MAX_REASON_LEN`] bytes.
        reason: String,
    },
}

impl fmt::Debug for EnrollFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnrollFrame::Request {
                agent_id, csr_der, ..
            } => f
                .debug_struct("Request")
                .field("agent_id", agent_id)
                .field("token", &"<redacted>")
                .field("csr_der", &format_args!("{} bytes", csr_der.len()))
                .finish(),
            EnrollFrame::Issued { cert_pem, ca_pem } => f
                .debug_struct("Issued")
                .field("cert_pem", &format_args!("{} bytes", cert_pem.len()))
                .field("ca_pem", &format_args!("{} bytes", ca_pem.len()))
                .finish(),
            EnrollFrame::Refused { code, reason } => f
                .debug_struct("Refused")
                .field("code", code)
                .field("reason", reason)
                .finish(),
        }
    }
}

impl EnrollFrame {
    /// The frame's name.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            EnrollFrame::Request { .. } => "Request",
            EnrollFrame::Issued { .. } => "Issued",
            EnrollFrame::Refused { .. } => "Refused",
        }
    }

    /// The frame with its length prefix.
    pub fn encode(&self) -> Result<Vec<u8>, EnrollError> {
        let mut out = vec![0; PREFIX_LEN];
        postcard::to_io(self, &mut out).map_err(|e| EnrollError::Malformed(e.to_string()))?;
        let len = out.len() - PREFIX_LEN;
        if len > MAX_FRAME_LEN {
            return Err(EnrollError::TooLarge { len });
        }
        let len32 = u32::try_from(len).map_err(|_| EnrollError::TooLarge { len })?;
        out[..PREFIX_LEN].copy_from_slice(&len32.to_be_bytes());
        Ok(out)
    }

    /// Decodes one body (without its prefix); every byte must be used.
    pub fn decode(body: &[u8]) -> Result<EnrollFrame, EnrollError> {
        let (frame, rest) = postcard::take_from_bytes::<EnrollFrame>(body)
            .map_err(|e| EnrollError::Malformed(e.to_string()))?;
        if rest.is_empty() {
            Ok(frame)
        } else {
            Err(EnrollError::Malformed(format!(
                "{} bytes after a {} frame",
                rest.len(),
                frame.kind()
            )))
        }
    }
}

/// Why an enrollment exchange failed on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    /// A frame's length is over [`MAX_FRAME_LEN`].
    #[error("enrollment frame of {len} bytes exceeds the limit of {MAX_FRAME_LEN} bytes")]
    TooLarge {
        /// The length announced or encoded.
        len: usize,
    },
    /// The bytes are not a frame, or a field breaks a limit.
    #[error("malformed enrollment frame: {0}")]
    Malformed(String),
    /// A frame arrived that this side never receives (a `Request` at the
    /// device, an answer at the hub), or a second frame.
    #[error("unexpected enrollment frame {0}")]
    Unexpected(&'static str),
    /// The peer closed its side before a whole frame arrived.
    #[error("the peer closed the stream {0}")]
    Truncated(&'static str),
}

impl EnrollError {
    /// The refusal code the hub answers this error with.
    #[must_use]
    pub fn code(&self) -> RefusalCode {
        RefusalCode::Malformed
    }
}

/// A request as the hub reads it: every field within its limits and a valid
/// agent id. Its `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub struct Request {
    /// The id the device enrolls as.
    pub agent_id: AgentId,
    /// The one-time token.
    pub token: String,
    /// The CSR, DER.
    pub csr_der: Vec<u8>,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("agent_id", &self.agent_id)
            .field("token", &"<redacted>")
            .field("csr_der", &format_args!("{} bytes", self.csr_der.len()))
            .finish()
    }
}

impl Request {
    fn check(agent_id: String, token: String, csr_der: Vec<u8>) -> Result<Request, EnrollError> {
        let agent_id = AgentId::parse(&agent_id)
            .map_err(|e| EnrollError::Malformed(format!("agent_id: {e}")))?;
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(EnrollError::Malformed(format!(
                "a token of {} bytes; 1 to {MAX_TOKEN_LEN}",
                token.len()
            )));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(EnrollError::Malformed(
                "the token has characters other than printable ASCII".into(),
            ));
        }
        if csr_der.is_empty() || csr_der.len() > MAX_CSR_LEN {
            return Err(EnrollError::Malformed(format!(
                "a CSR of {} bytes; 1 to {MAX_CSR_LEN}",
                csr_der.len()
            )));
        }
        Ok(Request {
            agent_id,
            token,
            csr_der,
        })
    }
}

/// The hub's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The certificate and the fleet CA, PEM.
    Issued {
        /// The device's certificate.
        cert_pem: String,
        /// The fleet CA.
        ca_pem: String,
    },
    /// Refused, with its code and reason.
    Refused {
        /// Why, by name.
        code: RefusalCode,
        /// Details.
        reason: String,
    },
}

impl Answer {
    fn into_frame(self) -> EnrollFrame {
        match self {
            Answer::Issued { cert_pem, ca_pem } => EnrollFrame::Issued { cert_pem, ca_pem },
            Answer::Refused { code, reason } => EnrollFrame::Refused {
                code,
                reason: truncate(&reason, MAX_REASON_LEN),
            },
        }
    }
}

/// Collects bytes until one frame is complete.
#[derive(Debug, Default)]
struct OneFrame {
    buf: Vec<u8>,
    done: bool,
}

impl OneFrame {
    /// The frame, once all of it has arrived. Bytes after it are an error.
    fn push(&mut self, bytes: &[u8]) -> Result<Option<EnrollFrame>, EnrollError> {
        if self.done {
            return if bytes.is_empty() {
                Ok(None)
            } else {
                Err(EnrollError::Unexpected("after the only frame"))
            };
        }
        // Never buffer more than a whole frame and its prefix, whatever arrives.
        let room = (PREFIX_LEN + MAX_FRAME_LEN + 1).saturating_sub(self.buf.len());
        self.buf
            .extend_from_slice(bytes.get(..room.min(bytes.len())).unwrap_or_default());
        let Some(prefix) = self.buf.get(..PREFIX_LEN) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > MAX_FRAME_LEN {
            self.buf = Vec::new();
            self.done = true;
            return Err(EnrollError::TooLarge { len });
        }
        let end = PREFIX_LEN + len;
        if self.buf.len() < end {
            return Ok(None);
        }
        self.done = true;
        let extra = self.buf.len() - end;
        let frame = EnrollFrame::decode(&self.buf[PREFIX_LEN..end]);
        self.buf = Vec::new();
        if extra > 0 {
            return Err(EnrollError::Unexpected("after the only frame"));
        }
        frame.map(Some)
    }
}

/// The hub's side of one enrollment: read the request, then write the answer.
#[derive(Debug, Default)]
pub struct HubEnrollment {
    reader: OneFrame,
    answered: bool,
}

impl HubEnrollment {
    /// A new exchange, waiting for the request.
    #[must_use]
    pub fn new() -> HubEnrollment {
        HubEnrollment::default()
    }

    /// Feeds bytes from the stream: the request once it is complete and
    /// valid. An error is final; answer it with [`EnrollError::code`].
    pub fn push(&mut self, bytes: &[u8]) -> Result<Option<Request>, EnrollError> {
        match self.reader.push(bytes)? {
            None => Ok(None),
            Some(EnrollFrame::Request {
                agent_id,
                token,
                csr_der,
            }) => Request::check(agent_id, token, csr_der).map(Some),
            Some(other) => Err(EnrollError::Unexpected(other.kind())),
        }
    }

    /// The stream ended: an error unless the request has arrived.
    pub fn finish(&self) -> Result<(), EnrollError> {
        if self.reader.done {
            Ok(())
        } else {
            Err(EnrollError::Truncated("before its request was complete"))
        }
    }

    /// The answer's bytes, to write and then finish the stream. An answer
    /// too large for a frame becomes an `Internal` refusal rather than a
    /// frame the device would refuse.
    pub fn answer(&mut self, answer: Answer) -> Vec<u8> {
        self.answered = true;
        let frame = answer.into_frame();
        frame.encode().unwrap_or_else(|e| {
            EnrollFrame::Refused {
                code: RefusalCode::Internal,
                reason: truncate(&e.to_string(), MAX_REASON_LEN),
            }
            .encode()
            .unwrap_or_default()
        })
    }

    /// Whether the answer has been produced.
    #[must_use]
    pub fn answered(&self) -> bool {
        self.answered
    }
}

/// The device's side of one enrollment: its request, then the hub's answer.
#[derive(Debug)]
pub struct DeviceEnrollment {
    reader: OneFrame,
}

impl DeviceEnrollment {
    /// Starts an exchange: the device's state and the request's bytes, to
    /// write and then finish the stream. The request is checked against the
    /// same limits the hub applies.
    pub fn start(
        agent_id: &AgentId,
        token: &str,
        csr_der: &[u8],
    ) -> Result<(DeviceEnrollment, Vec<u8>), EnrollError> {
        let request = Request::check(agent_id.to_string(), token.to_owned(), csr_der.to_vec())?;
        let bytes = EnrollFrame::Request {
            agent_id: request.agent_id.to_string(),
            token: request.token,
            csr_der: request.csr_der,
        }
        .encode()?;
        Ok((
            DeviceEnrollment {
                reader: OneFrame::default(),
            },
            bytes,
        ))
    }

    /// Feeds bytes from the stream: the answer once it is complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Option<Answer>, EnrollError> {
        match self.reader.push(bytes)? {
            None => Ok(None),
            Some(EnrollFrame::Issued { cert_pem, ca_pem }) => {
                if cert_pem.len() > MAX_PEM_LEN || ca_pem.len() > MAX_PEM_LEN {
                    return Err(EnrollError::Malformed(format!(
                        "a certificate of {} or a CA of {} bytes; at most {MAX_PEM_LEN} each",
                        cert_pem.len(),
                        ca_pem.len()
                    )));
                }
                Ok(Some(Answer::Issued { cert_pem, ca_pem }))
            }
            Some(EnrollFrame::Refused { code, reason }) => Ok(Some(Answer::Refused {
                code,
                reason: truncate(&reason, MAX_REASON_LEN),
            })),
            Some(other) => Err(EnrollError::Unexpected(other.kind())),
        }
    }

    /// The stream ended: an error unless the answer has arrived.
    pub fn finish(&self) -> Result<(), EnrollError> {
        if self.reader.done {
            Ok(())
        } else {
            Err(EnrollError::Truncated("before its answer was complete"))
        }
    }
}

/// `s` cut to at most `max` bytes at a character boundary.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests;
