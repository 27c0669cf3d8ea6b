//! What a command is on the wire (frames 14 `Command` and 15
//! `CommandResult`, protocol version 4): its id, what it asks of the agent,
//! and what became of it.
//!
//! A room of its own because the frames, both sessions, the agent's ledger
//! and the hub's store all speak these types, and none of them should reach
//! into another for them.
//!
//! ```text
//! Command (14), hub -> agent
//!   id          string, 1..=64 of [A-Za-z0-9_-], unique per agent and command
//!   expires_at  i64, Unix nanoseconds: not executed after this
//!   role        string, <= 64 bytes: the operator's role, authorised again
//!   action      0 Write   { stream: "device/tag", value: Value }
//!               1 Publish { topic, payload: bytes, qos: 0..=2, retain }
//!               2 Read    { stream: "device/tag" }
//!
//! CommandResult (15), agent -> hub
//!   id          as in the Command
//!   outcome     0 Applied { value: Option<Value> }   read-back or reading
//!               1 Refused { reason }                 nothing was done
//!               2 Failed  { reason }                 tried; the device or broker said no
//!               3 Expired                            not executed: past expires_at
//!               4 Unsupported { reason }             this agent has no such command
//! ```
//!
//! The id is what makes a command happen at most once: the agent records it
//! durably before it executes, and answers a command it already recorded
//! with the recorded outcome instead of executing it again.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::event::{StreamName, Timestamp, Value};

/// The longest command id, in bytes.
pub const MAX_COMMAND_ID_LEN: usize = 64;

/// The longest MQTT topic a `Publish` command may name, in bytes.
pub const MAX_COMMAND_TOPIC_LEN: usize = 1024;

/// The largest payload of a `Publish` command, and the largest value of a
/// `Write` or in an `Applied` outcome, in bytes.
pub const MAX_COMMAND_PAYLOAD_LEN: usize = 256 * 1024;

/// The longest reason of an outcome, in bytes: the same as an `Error`
/// frame's message (`MAX_ERROR_MESSAGE_LEN`).
pub const MAX_REASON_LEN: usize = 1024;

/// How many commands the hub keeps outstanding (sent, not yet answered) on
/// one session; more wait at the hub until results come back. The agent
/// closes a session that goes beyond it.
pub const MAX_COMMANDS_IN_FLIGHT: usize = 64;

/// Why a command id, or a command's fields, are not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The id is empty, longer than [`MAX_COMMAND_ID_LEN`], or holds a
    /// character other than ASCII letters, digits, `-` and `_`.
    #[error("invalid command id {0:?}: 1 to 64 of A-Z, a-z, 0-9, '-', '_'")]
    InvalidId(String),
    /// A field is over its limit.
    #[error("command {field} of {len} bytes exceeds the limit of {max} bytes")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Stored bytes are not an encoded outcome or action.
    #[error("stored command data does not decode: {0}")]
    Undecodable(String),
    /// A `Publish` with a QoS other than 0, 1 or 2.
    #[error("command qos {0}: must be 0, 1 or 2")]
    InvalidQos(u8),
    /// A `Publish` topic that is empty or holds a wildcard or NUL (MQTT
    /// 3.1.1 section 4.7.3: topic names of PUBLISH carry no wildcards).
    #[error("command topic {0:?}: must be non-empty, without '+', '#' or NUL")]
    InvalidTopic(String),
}

/// A command's id: unique per agent, chosen by the hub.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CommandId(String);

impl CommandId {
    /// Parses an id.
    pub fn parse(s: &str) -> Result<CommandId, CommandError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_COMMAND_ID_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok {
            Ok(CommandId(s.to_owned()))
        } else {
            Err(CommandError::InvalidId(
                truncate(s, MAX_COMMAND_ID_LEN + 1)
                    .escape_debug()
                    .to_string(),
            ))
        }
    }

    /// The id as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CommandId {
    type Error = CommandError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        CommandId::parse(&s)
    }
}

impl From<CommandId> for String {
    fn from(id: CommandId) -> String {
        id.0
    }
}

impl fmt::Display for CommandId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a command asks of the agent.
///
/// The variant order is the wire format: append, never reorder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Action {
    /// 0: write `value` to a Modbus tag configured `writable = true`, named
    /// by its stream `device/tag`, then read it back.
    Write {
        /// The tag's stream.
        stream: StreamName,
        /// The value; the agent checks it against the tag's type and limits.
        value: Value,
    },
    /// 1: publish on the site broker.
    Publish {
        /// The topic (no wildcards).
        topic: String,
        /// The payload.
        payload: Vec<u8>,
        /// 0, 1 or 2.
        qos: u8,
        /// Whether the broker keeps it as the topic's retained message.
        retain: bool,
    },
    /// 2: read a Modbus tag now.
    Read {
        /// The tag's stream.
        stream: StreamName,
    },
}

impl CommandRequest {
    /// Checks the fields against their limits.
    pub fn check(&self) -> Result<(), CommandError> {
        if self.role.len() > MAX_ROLE_LEN {
            return Err(CommandError::TooLong {
                field: "role",
                len: self.role.len(),
                max: MAX_ROLE_LEN,
            });
        }
        self.action.check()
    }
}

impl Action {
    /// `write`, `publish` or `read`.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Write { .. } => "write",
            Action::Publish { .. } => "publish",
            Action::Read { .. } => "read",
        }
    }

    /// The stream or topic the command is about.
    #[must_use]
    pub fn target(&self) -> &str {
        match self {
            Action::Write { stream, .. } | Action::Read { stream } => stream.as_str(),
            Action::Publish { topic, .. } => topic,
        }
    }

    /// The action as bytes, for a store (postcard, as on the wire).
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// An action stored with [`to_bytes`](Self::to_bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<Action, CommandError> {
        postcard::from_bytes(bytes).map_err(|e| CommandError::Undecodable(e.to_string()))
    }

    /// Checks the fields against their limits.
    pub fn check(&self) -> Result<(), CommandError> {
        match self {
            Action::Write { value, .. } => check_value("value", value),
            Action::Read { .. } => Ok(()),
            Action::Publish {
                topic,
                payload,
                qos,
                ..
            } => {
                if topic.len() > MAX_COMMAND_TOPIC_LEN {
                    return Err(CommandError::TooLong {
                        field: "topic",
                        len: topic.len(),
                        max: MAX_COMMAND_TOPIC_LEN,
                    });
                }
                if topic.is_empty() || topic.contains(['+', '#', '\0']) {
                    return Err(CommandError::InvalidTopic(
                        truncate(topic, 64).escape_debug().to_string(),
                    ));
                }
                if payload.len() > MAX_COMMAND_PAYLOAD_LEN {
                    return Err(CommandError::TooLong {
                        field: "payload",
                        len: payload.len(),
                        max: MAX_COMMAND_PAYLOAD_LEN,
                    });
                }
                if *qos > 2 {
                    return Err(CommandError::InvalidQos(*qos));
                }
                Ok(())
            }
        }
    }
}

/// `s` cut to at most `max` bytes at a character boundary. Its own copy of
/// the frame codec's, which needs this module's types: the codec depends
/// on commands, not commands on the codec.
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

/// A value's payload within [`MAX_COMMAND_PAYLOAD_LEN`].
fn check_value(field: &'static str, value: &Value) -> Result<(), CommandError> {
    let len = value.payload_len();
    if len > MAX_COMMAND_PAYLOAD_LEN {
        return Err(CommandError::TooLong {
            field,
            len,
            max: MAX_COMMAND_PAYLOAD_LEN,
        });
    }
    Ok(())
}

/// The longest role name in a command, in bytes.
pub const MAX_ROLE_LEN: usize = 64;

/// One command as the hub sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandRequest {
    /// Its id.
    pub id: CommandId,
    /// Not executed after this (Unix nanoseconds, the agent's clock).
    pub expires_at: Timestamp,
    /// The role the operator sent it in (at most [`MAX_ROLE_LEN`] bytes):
    /// the agent asks its own copy of the policy's `[[commands]]` again
    /// with it.
    pub role: String,
    /// What to do.
    pub action: Action,
}

/// What became of a command.
///
/// The variant order is the wire format: append, never reorder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Outcome {
    /// 0: done. For a write the value read back from the device afterwards
    /// (`None` if the read-back failed), for a read the value read, for a
    /// publish `None` (the broker acknowledged it as its QoS asks).
    Applied {
        /// The read-back or reading.
        value: Option<Value>,
    },
    /// 1: not done, and nothing was attempted: the agent's policy, the
    /// tag's configuration or the value said no.
    Refused {
        /// Why.
        reason: String,
    },
    /// 2: attempted and not done, or not known to be done: a Modbus
    /// exception, a timeout, a broker that is away, an agent that stopped
    /// while executing it (it is never executed again).
    Failed {
        /// Why.
        reason: String,
    },
    /// 3: not executed because it arrived (or the hub would have sent it)
    /// after its expiry.
    Expired,
    /// 4: the agent cannot execute such a command (an older protocol
    /// version, no MQTT broker configured).
    Unsupported {
        /// Why.
        reason: String,
    },
}

impl Outcome {
    /// `applied`, `refused`, `failed`, `expired` or `unsupported`.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Applied { .. } => "applied",
            Outcome::Refused { .. } => "refused",
            Outcome::Failed { .. } => "failed",
            Outcome::Expired => "expired",
            Outcome::Unsupported { .. } => "unsupported",
        }
    }

    /// The reason of a refusal, failure or unsupported command.
    #[must_use]
    pub fn reason(&self) -> Option<&str> {
        match self {
            Outcome::Refused { reason }
            | Outcome::Failed { reason }
            | Outcome::Unsupported { reason } => Some(reason),
            Outcome::Applied { .. } | Outcome::Expired => None,
        }
    }

    /// The value of an `Applied` outcome.
    #[must_use]
    pub fn value(&self) -> Option<&Value> {
        match self {
            Outcome::Applied { value } => value.as_ref(),
            _ => None,
        }
    }

    /// The same outcome with its reason cut to
    /// [`MAX_REASON_LEN`] bytes.
    #[must_use]
    pub fn bounded(self) -> Outcome {
        let cut = |r: String| truncate(&r, MAX_REASON_LEN);
        match self {
            Outcome::Refused { reason } => Outcome::Refused {
                reason: cut(reason),
            },
            Outcome::Failed { reason } => Outcome::Failed {
                reason: cut(reason),
            },
            Outcome::Unsupported { reason } => Outcome::Unsupported {
                reason: cut(reason),
            },
            other => other,
        }
    }

    /// The outcome as bytes, for a ledger or a store (postcard, as on the
    /// wire).
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// An outcome stored with [`to_bytes`](Self::to_bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<Outcome, CommandError> {
        postcard::from_bytes(bytes).map_err(|e| CommandError::Undecodable(e.to_string()))
    }

    /// Checks the fields against their limits.
    pub fn check(&self) -> Result<(), CommandError> {
        if let Some(r) = self.reason() {
            if r.len() > MAX_REASON_LEN {
                return Err(CommandError::TooLong {
                    field: "reason",
                    len: r.len(),
                    max: MAX_REASON_LEN,
                });
            }
        }
        match self.value() {
            Some(v) => check_value("value", v),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_ids_are_parsed_not_validated() {
        assert!(CommandId::parse("c0ffee-01_x").is_ok());
        assert!(CommandId::parse(&"a".repeat(64)).is_ok());
        for bad in ["", "a b", "a/b", "é", &"a".repeat(65)] {
            assert!(CommandId::parse(bad).is_err(), "{bad:?}");
        }
        // An id that fails to parse also fails to decode.
        let bytes = postcard::to_stdvec("a b").expect("encodes");
        assert!(postcard::from_bytes::<CommandId>(&bytes).is_err());
    }

    #[test]
    fn the_reason_limit_is_the_error_message_limit() {
        assert_eq!(MAX_REASON_LEN, crate::wire::MAX_ERROR_MESSAGE_LEN);
        let long = Outcome::Failed {
            reason: "é".repeat(MAX_REASON_LEN),
        }
        .bounded();
        assert!(long.reason().is_some_and(|r| r.len() <= MAX_REASON_LEN));
        assert_eq!(long.check(), Ok(()));
    }

    #[test]
    fn publish_fields_are_checked() {
        let p = |topic: &str, payload: usize, qos: u8| Action::Publish {
            topic: topic.into(),
            payload: vec![0; payload],
            qos,
            retain: false,
        };
        assert_eq!(p("a/b", 3, 1).check(), Ok(()));
        assert!(matches!(
            p("a/+", 0, 0).check(),
            Err(CommandError::InvalidTopic(_))
        ));
        assert!(matches!(
            p("", 0, 0).check(),
            Err(CommandError::InvalidTopic(_))
        ));
        assert_eq!(p("a", 0, 3).check(), Err(CommandError::InvalidQos(3)));
        assert!(matches!(
            p("a", MAX_COMMAND_PAYLOAD_LEN + 1, 0).check(),
            Err(CommandError::TooLong {
                field: "payload",
                ..
            })
        ));
    }
}
