//! The error codes both peers agree on: sent in the `Error` frame and used as
//! the QUIC application close code.
//!
//! Kept apart from the session's errors because both the frames (which carry
//! a code) and the errors (which map to one) need it, and neither should
//! depend on the other for it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The QUIC application close code of a connection that ended normally (after a
/// `Goodbye`). Every [`ErrorCode`] maps to a non-zero close code.
pub const CLOSE_OK: u32 = 0;

/// Why a session was closed, as both peers name it: sent in the `Error` frame
/// (a `u16`) and used as the QUIC application close code ([`ErrorCode::to_u32`]).
///
/// Codes are never renumbered or reused. A code this build does not know (sent
/// by a newer peer) is kept as [`ErrorCode::Unknown`], so the `Error` frame of
/// any version always decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "u16", into = "u16")]
#[non_exhaustive]
pub enum ErrorCode {
    /// 1: the peers share no protocol version.
    UnsupportedVersion,
    /// 2: a frame's length exceeds `MAX_FRAME_LEN`.
    FrameTooLarge,
    /// 3: a frame's body does not decode, or a `Hello` breaks a limit.
    Malformed,
    /// 4: a frame arrived in a state where it is not allowed (a `Batch` before
    /// `Hello`, a second `Hello`, a hub frame sent by an agent).
    UnexpectedFrame,
    /// 5: a seq was not greater than the one before it in the same session.
    SeqNotIncreasing,
    /// 6: the agent sent more events beyond the acknowledged seq than the window
    /// allows.
    WindowExceeded,
    /// 7: an `Ack` went backwards or acknowledged a seq the agent never sent.
    InvalidAck,
    /// 8: nothing arrived from the peer for the idle timeout.
    Timeout,
    /// 9: the agent's certificate is valid but the agent may not connect (for
    /// example, it carries no agent id, or the agent is blocked).
    Unauthorized,
    /// 10: the peer failed on its own side (a store or outbox error).
    Internal,
    /// 11: the peer is shutting down; reconnect later.
    ShuttingDown,
    /// 12: a newer connection of the same agent replaced this one.
    Superseded,
    /// 13: an operator revoked the agent (`outpost-hub agent revoke`): it is
    /// refused until reinstated. Retrying soon does not help.
    Revoked,
    /// 14: the certificate names a registered agent but is not the one the
    /// registry binds to it (nor the previous one within its grace period):
    /// a second certificate for the same id, or one replaced by a renewal.
    CertificateNotCurrent,
    /// A code this build does not know; never one of the values above.
    Unknown(u16),
}

impl ErrorCode {
    /// The code as sent in an `Error` frame.
    #[must_use]
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::UnsupportedVersion => 1,
            ErrorCode::FrameTooLarge => 2,
            ErrorCode::Malformed => 3,
            ErrorCode::UnexpectedFrame => 4,
            ErrorCode::SeqNotIncreasing => 5,
            ErrorCode::WindowExceeded => 6,
            ErrorCode::InvalidAck => 7,
            ErrorCode::Timeout => 8,
            ErrorCode::Unauthorized => 9,
            ErrorCode::Internal => 10,
            ErrorCode::ShuttingDown => 11,
            ErrorCode::Superseded => 12,
            ErrorCode::Revoked => 13,
            ErrorCode::CertificateNotCurrent => 14,
            ErrorCode::Unknown(code) => code,
        }
    }

    /// The code for a `u16` from an `Error` frame; unknown values become
    /// [`ErrorCode::Unknown`].
    #[must_use]
    pub fn from_u16(code: u16) -> ErrorCode {
        match code {
            1 => ErrorCode::UnsupportedVersion,
            2 => ErrorCode::FrameTooLarge,
            3 => ErrorCode::Malformed,
            4 => ErrorCode::UnexpectedFrame,
            5 => ErrorCode::SeqNotIncreasing,
            6 => ErrorCode::WindowExceeded,
            7 => ErrorCode::InvalidAck,
            8 => ErrorCode::Timeout,
            9 => ErrorCode::Unauthorized,
            10 => ErrorCode::Internal,
            11 => ErrorCode::ShuttingDown,
            12 => ErrorCode::Superseded,
            13 => ErrorCode::Revoked,
            14 => ErrorCode::CertificateNotCurrent,
            other => ErrorCode::Unknown(other),
        }
    }

    /// The QUIC application close code (RFC 9000 section 20.2) to close the
    /// connection with: the same number as on the wire.
    #[must_use]
    pub fn to_u32(self) -> u32 {
        u32::from(self.to_u16())
    }

    /// The error code for a QUIC application close code, or `None` for
    /// [`CLOSE_OK`] and for values beyond `u16`, which no Outpost peer sends.
    #[must_use]
    pub fn from_u32(code: u32) -> Option<ErrorCode> {
        match u16::try_from(code) {
            Ok(0) | Err(_) => None,
            Ok(code) => Some(ErrorCode::from_u16(code)),
        }
    }

    /// The code's name, as logs and `docs/protocol.md` write it.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnexpectedFrame => "unexpected_frame",
            ErrorCode::SeqNotIncreasing => "seq_not_increasing",
            ErrorCode::WindowExceeded => "window_exceeded",
            ErrorCode::InvalidAck => "invalid_ack",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Internal => "internal",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Superseded => "superseded",
            ErrorCode::Revoked => "revoked",
            ErrorCode::CertificateNotCurrent => "certificate_not_current",
            ErrorCode::Unknown(_) => "unknown",
        }
    }
}

impl From<u16> for ErrorCode {
    fn from(code: u16) -> ErrorCode {
        ErrorCode::from_u16(code)
    }
}

impl From<ErrorCode> for u16 {
    fn from(code: ErrorCode) -> u16 {
        code.to_u16()
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.to_u16())
    }
}
