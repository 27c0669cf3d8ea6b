//! What both backends store and report, in their own words: an agent's
//! registry record, an event forwarded to sinks, a sink's queue entry,
//! progress and status.
//!
//! A room of its own because the backend-neutral handle, the SQLite store and
//! the JetStream store all speak these types, and neither backend may import
//! the other.

use std::collections::BTreeMap;

use outpost_protocols::event::{AgentId, Event, EventBody, Seq, Timestamp};
use serde::Serialize;

/// What the registry knows about one agent, for `fleet list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentRecord {
    /// The agent, from its certificate.
    pub agent_id: AgentId,
    /// Its labels, which select the policy's rules, limits and sink topics:
    /// set at enrollment or by `outpost-hub agent label`, else those of its
    /// first `Hello`. Never changed by what a later `Hello` states.
    pub labels: BTreeMap<String, String>,
    /// How many of its `Hello`s stated other labels than these (ignored).
    pub labels_ignored: u64,
    /// Whether, when and why an operator revoked it; `None` while it may
    /// connect.
    pub revoked: Option<Revocation>,
    /// When the hub first heard of it, Unix ns.
    pub first_seen: Timestamp,
    /// When the hub last heard from it (a session starting or ending, a batch,
    /// a touch), Unix ns.
    pub last_seen: Timestamp,
    /// Its software version from its latest `Hello`.
    pub agent_version: Option<String>,
    /// The protocol version negotiated in its latest session.
    pub protocol_version: Option<u16>,
    /// The highest seq the store holds for it: what the hub has acknowledged
    /// or is about to, and where its next session resumes.
    pub watermark: Seq,
    /// The outbox backlog it last reported, in events; `None` before its first
    /// report.
    pub backlog_events: Option<u64>,
    /// The same backlog in bytes.
    pub backlog_bytes: Option<u64>,
    /// Its open sessions, as this hub recorded them (normally 0 or 1; 2 while a
    /// reconnect supersedes a session that has not closed yet).
    pub sessions: u64,
    /// The policy version it last reported running (0: none); `None` for an
    /// agent that never reported one (protocol version 1).
    pub policy_version: Option<u64>,
    /// Why it refused the last policy pushed to it, if it did.
    pub policy_error: Option<String>,
    /// Events the hub dropped from what it sent, by the policy (the agent
    /// should have dropped them itself: an old or misbehaving agent).
    pub policy_dropped: u64,
    /// Events the hub had to minimise before storing them.
    pub policy_modified: u64,
    /// When its current certificate (the registry's binding) expires, Unix
    /// ns; `None` before it was bound.
    pub cert_not_after: Option<Timestamp>,
    /// Its current certificate's serial number, lowercase hex.
    pub cert_serial: Option<String>,
}

impl AgentRecord {
    /// Whether the agent has an open session.
    pub fn connected(&self) -> bool {
        self.sessions > 0
    }
}

/// An operator's revocation of an agent: refused at the handshake, its live
/// sessions closed, until reinstated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Revocation {
    /// When, Unix ns.
    pub at: Timestamp,
    /// Who revoked it.
    pub by: String,
    /// Why, as the operator wrote it.
    pub reason: String,
}

/// An operator's change of an agent's labels: before (`None`: the agent
/// was not in the registry) and after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelChange {
    /// Before.
    pub old: Option<BTreeMap<String, String>>,
    /// After.
    pub new: BTreeMap<String, String>,
}

/// An event the policy routes to sinks besides (or instead of) the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    /// Its seq.
    pub seq: Seq,
    /// The body, minimised as the policy says.
    pub body: EventBody,
    /// The sink ids (never `store`).
    pub sinks: Vec<String>,
}

/// An event waiting for one sink, with its place in that sink's queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    /// Its place: deliveries record progress up to an `n`.
    pub n: i64,
    /// The event.
    pub event: Event,
    /// When it was queued (committed), Unix nanoseconds.
    pub queued_at: i64,
}

/// What a sink runner reports after a delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SinkProgress {
    /// The queue is done up to this `n` (delivered, rejected or refused);
    /// `None` when the attempt failed and is retried.
    pub through: Option<i64>,
    /// Events the sink accepted.
    pub delivered: u64,
    /// Events the sink refused for good.
    pub rejected: u64,
    /// Events the last-step residency check kept from the sink.
    pub refused: u64,
    /// Whether this attempt failed (to be retried).
    pub failed: bool,
    /// The error of a failed attempt or of a rejection, for `sinks status`.
    pub error: Option<String>,
    /// For the audit log: what the sink rejected (`sink.rejected`) and what
    /// residency kept from it (`sink.refused`), one line each.
    pub rejected_detail: Option<String>,
    /// See `rejected_detail`.
    pub refused_detail: Option<String>,
}

/// One sink as `sinks status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SinkStatus {
    /// The sink's id.
    pub sink: String,
    /// Events waiting for it.
    pub pending: u64,
    /// When the oldest waiting event was queued (Unix ns).
    pub oldest_queued_at: Option<i64>,
    /// Events it accepted, since the store was created.
    pub delivered: u64,
    /// Events it refused for good.
    pub rejected: u64,
    /// Events residency kept from it at the last step.
    pub refused: u64,
    /// Failed delivery attempts (each retried).
    pub failures: u64,
    /// When it last accepted a batch.
    pub last_delivered_at: Option<i64>,
    /// The last error, and when.
    pub last_error: Option<String>,
    /// When the last error happened (Unix ns).
    pub last_error_at: Option<i64>,
}

impl SinkStatus {
    pub(crate) fn empty(id: &str) -> SinkStatus {
        SinkStatus {
            sink: id.to_owned(),
            pending: 0,
            oldest_queued_at: None,
            delivered: 0,
            rejected: 0,
            refused: 0,
            failures: 0,
            last_delivered_at: None,
            last_error: None,
            last_error_at: None,
        }
    }
}

/// A one-time enrollment token as the store keeps it: its hash, never its
/// value (`enroll list`, and what a use checks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct EnrollmentRecord {
    /// Lowercase hex SHA-256 of the token: the key.
    pub token_hash: String,
    /// The only agent id the token enrolls.
    pub agent_id: String,
    /// The labels the agent gets in the registry when it enrolls.
    pub labels: BTreeMap<String, String>,
    /// When it was made, Unix ns.
    pub created_at: i64,
    /// Who made it.
    pub created_by: String,
    /// When it stops working, Unix ns.
    pub expires_at: i64,
    /// When it was used, Unix ns.
    pub used_at: Option<i64>,
    /// From which address.
    pub used_from: Option<String>,
    /// When an operator revoked it, Unix ns.
    pub revoked_at: Option<i64>,
    /// The serial of the certificate it issued, lowercase hex.
    pub serial: Option<String>,
    /// The SHA-256 fingerprint of that certificate, lowercase hex.
    pub fingerprint: Option<String>,
}

/// Why a token cannot be used (now, for this agent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No token has this hash.
    Unknown,
    /// It was used.
    Used,
    /// It expired.
    Expired,
    /// It was revoked.
    Revoked,
    /// It is for another agent id.
    ForAnotherAgent,
}

impl EnrollmentRecord {
    /// The token's id for people: the first 12 hex digits of its hash,
    /// enough to name it in `enroll revoke` and useless for enrolling.
    pub fn id(&self) -> &str {
        self.token_hash.get(..12).unwrap_or(&self.token_hash)
    }

    /// `pending`, `used`, `expired` or `revoked` at `now` (Unix ns).
    pub fn state(&self, now: i64) -> &'static str {
        if self.used_at.is_some() {
            "used"
        } else if self.revoked_at.is_some() {
            "revoked"
        } else if self.expires_at <= now {
            "expired"
        } else {
            "pending"
        }
    }

    /// Whether `agent_id` may use the token at `now`; why not otherwise.
    pub fn check(&self, agent_id: &str, now: i64) -> Result<(), TokenRefusal> {
        match self.state(now) {
            "used" => Err(TokenRefusal::Used),
            "revoked" => Err(TokenRefusal::Revoked),
            "expired" => Err(TokenRefusal::Expired),
            _ if self.agent_id != agent_id => Err(TokenRefusal::ForAnotherAgent),
            _ => Ok(()),
        }
    }
}

/// A certificate as the registry binds it to an agent: what the handshake
/// compares and `fleet list` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertInfo {
    /// Its serial number, lowercase hex.
    pub serial: String,
    /// SHA-256 of its DER, lowercase hex (`outpost_tls::fingerprint_sha256`).
    pub fingerprint: String,
    /// When it expires, Unix ns.
    pub not_after: Timestamp,
}

/// An agent's certificate binding: the one certificate the hub accepts for
/// it, and the one before it while its grace period lasts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertBinding {
    /// The current certificate.
    pub current: CertInfo,
    /// The previous certificate's fingerprint and until when (Unix ns) it is
    /// still accepted, after a renewal or a reissue.
    pub previous: Option<(String, Timestamp)>,
}

/// How a binding changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rebind {
    /// Trust on first use: bind `cert` only if the agent has no binding yet.
    FirstUse,
    /// A new certificate replaces the current one, which stays accepted
    /// until `grace_until` (Unix ns); audited `cert.renewed` by `actor`.
    Replace {
        /// Until when the replaced certificate is accepted.
        grace_until: Timestamp,
        /// Who renewed it, audited `cert.renewed` in the same transaction
        /// (`hub` for a renewal over the session); `None` for a reissue by
        /// `ca issue`, which its own `ca.issued` entry records.
        actor: Option<String>,
    },
}

/// A Unix ns timestamp as RFC 3339 to the second, for audit details.
pub(crate) fn rfc3339(ts: Timestamp) -> String {
    let secs = u64::try_from(ts.0.div_euclid(1_000_000_000)).unwrap_or(0);
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        .to_string()
}
