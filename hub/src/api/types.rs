//! The API's documents: what each resource answers, in the field names the
//! CLI's `--json` output has used all along, so a script can move from the
//! CLI to the API (and `--api` back) without renaming anything.
//!
//! A room of its own because both the server's handlers and the CLI's
//! client (`crate::remote`) speak these types, and neither may import the
//! other.

use std::collections::BTreeMap;

use outpost_protocols::event::{AgentId, Seq, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::store::{audit, AgentEventStats, AgentRecord, SinkStatus};

/// One agent of the fleet registry (`fleet list --json`'s objects).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Agent {
    /// The agent's id, from its certificate.
    pub agent_id: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// When the hub first heard of it, Unix ns.
    pub first_seen: i64,
    /// When the hub last heard from it, Unix ns.
    pub last_seen: i64,
    /// Whether it has an open session.
    pub connected: bool,
    /// Its open sessions.
    pub sessions: u64,
    /// The highest seq stored for it.
    pub watermark: u64,
    /// Its software version.
    pub agent_version: Option<String>,
    /// The protocol version of its latest session.
    pub protocol_version: Option<u16>,
    /// The policy version it reported running (0: none).
    pub policy_version: Option<u64>,
    /// Why it refused the last policy pushed to it.
    pub policy_error: Option<String>,
    /// Events the hub's enforcement dropped from what it sent.
    pub policy_dropped: u64,
    /// Events the hub's enforcement changed.
    pub policy_modified: u64,
    /// Its reported outbox backlog, in events.
    pub backlog_events: Option<u64>,
    /// The same backlog, in bytes.
    pub backlog_bytes: Option<u64>,
    /// How many of its `Hello`s stated other labels than the hub's (ignored).
    pub labels_ignored: u64,
    /// Whether, when and why an operator revoked it.
    pub revoked: Option<Revoked>,
    /// When its bound certificate expires, Unix ns (unknown for an agent
    /// not seen since the hub began recording certificates).
    pub cert_not_after: Option<i64>,
    /// Its bound certificate's serial, hex.
    pub cert_serial: Option<String>,
}

/// An operator's revocation of an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Revoked {
    /// When, Unix ns.
    pub at: i64,
    /// Who revoked it.
    pub by: String,
    /// Why.
    pub reason: String,
}

impl From<&AgentRecord> for Agent {
    fn from(a: &AgentRecord) -> Agent {
        Agent {
            agent_id: a.agent_id.as_str().to_owned(),
            labels: a.labels.clone(),
            first_seen: a.first_seen.0,
            last_seen: a.last_seen.0,
            connected: a.connected(),
            sessions: a.sessions,
            watermark: a.watermark.0,
            agent_version: a.agent_version.clone(),
            protocol_version: a.protocol_version,
            policy_version: a.policy_version,
            policy_error: a.policy_error.clone(),
            policy_dropped: a.policy_dropped,
            policy_modified: a.policy_modified,
            backlog_events: a.backlog_events,
            backlog_bytes: a.backlog_bytes,
            labels_ignored: a.labels_ignored,
            revoked: a.revoked.as_ref().map(|r| Revoked {
                at: r.at.0,
                by: r.by.clone(),
                reason: r.reason.clone(),
            }),
            cert_not_after: a.cert_not_after.map(|t| t.0),
            cert_serial: a.cert_serial.clone(),
        }
    }
}

impl Agent {
    /// The registry record this document was made from (for the CLI's
    /// text output); `None` when the id is not a valid agent id.
    pub fn record(&self) -> Option<AgentRecord> {
        Some(AgentRecord {
            agent_id: AgentId::parse(&self.agent_id).ok()?,
            labels: self.labels.clone(),
            labels_ignored: self.labels_ignored,
            revoked: self.revoked.as_ref().map(|r| crate::store::Revocation {
                at: Timestamp(r.at),
                by: r.by.clone(),
                reason: r.reason.clone(),
            }),
            first_seen: Timestamp(self.first_seen),
            last_seen: Timestamp(self.last_seen),
            agent_version: self.agent_version.clone(),
            protocol_version: self.protocol_version,
            watermark: Seq(self.watermark),
            backlog_events: self.backlog_events,
            backlog_bytes: self.backlog_bytes,
            sessions: self.sessions,
            policy_version: self.policy_version,
            policy_error: self.policy_error.clone(),
            policy_dropped: self.policy_dropped,
            policy_modified: self.policy_modified,
            cert_not_after: self.cert_not_after.map(Timestamp),
            cert_serial: self.cert_serial.clone(),
        })
    }
}

/// An event's quality.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EventQuality {
    /// Why it is not good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `good`, `bad` or `uncertain`.
    pub status: String,
}

/// One stored event: the JSON line of `events tail --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventDoc {
    /// The agent that sent it.
    pub agent_id: String,
    /// Attributes.
    pub attrs: BTreeMap<String, String>,
    /// good, bad or uncertain, with a reason.
    pub quality: EventQuality,
    /// Its seq, per agent.
    pub seq: u64,
    /// Its stream.
    pub stream: String,
    /// Event time, Unix ns.
    pub ts: i64,
    /// The value: a number, boolean, string, JSON, or `{"base64": ...}`.
    pub value: serde_json::Value,
}

/// A page of events, and where the next one starts.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventsPage {
    /// The events, each exactly the JSON line `events tail --json` prints.
    #[schema(value_type = Vec<EventDoc>)]
    pub events: Vec<Box<RawValue>>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// The newest events (`events tail`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventsTail {
    /// Oldest first, each exactly the JSON line `events tail --json` prints.
    #[schema(value_type = Vec<EventDoc>)]
    pub events: Vec<Box<RawValue>>,
}

/// What the store holds for one agent (`events stats --json`'s objects).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EventStats {
    /// The agent.
    pub agent_id: String,
    /// Rows stored.
    pub count: u64,
    /// Distinct seqs among them.
    pub distinct_seqs: u64,
    /// The lowest seq stored.
    pub min_seq: Option<u64>,
    /// The highest seq stored.
    pub max_seq: Option<u64>,
}

impl From<&AgentEventStats> for EventStats {
    fn from(s: &AgentEventStats) -> EventStats {
        EventStats {
            agent_id: s.agent_id.as_str().to_owned(),
            count: s.count,
            distinct_seqs: s.distinct_seqs,
            min_seq: s.min_seq.map(|q| q.0),
            max_seq: s.max_seq.map(|q| q.0),
        }
    }
}

impl EventStats {
    /// The store's record (for the CLI's text output).
    pub fn record(&self) -> Option<AgentEventStats> {
        Some(AgentEventStats {
            agent_id: AgentId::parse(&self.agent_id).ok()?,
            count: self.count,
            distinct_seqs: self.distinct_seqs,
            min_seq: self.min_seq.map(Seq),
            max_seq: self.max_seq.map(Seq),
        })
    }
}

/// One sink's queue and counters (`sinks status --json`'s objects, and the
/// time the oldest waiting event was queued).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Sink {
    /// The sink's id.
    pub sink: String,
    /// Whether the config still names it.
    pub configured: bool,
    /// Events waiting for it.
    pub pending: u64,
    /// When the oldest waiting event was queued, Unix ns.
    pub oldest_queued_at: Option<i64>,
    /// Seconds the oldest waiting event has waited.
    pub lag_seconds: Option<f64>,
    /// Events it accepted.
    pub delivered: u64,
    /// Events it refused for good.
    pub rejected: u64,
    /// Events residency kept from it.
    pub refused_residency: u64,
    /// Failed attempts (each retried).
    pub failures: u64,
    /// When it last accepted a batch, Unix ns.
    pub last_delivered_at: Option<i64>,
    /// The last error.
    pub last_error: Option<String>,
    /// When the last error happened, Unix ns.
    pub last_error_at: Option<i64>,
}

impl Sink {
    /// The document of `s`, at hub time `now` (Unix ns).
    pub fn new(s: &SinkStatus, configured: bool, now: i64) -> Sink {
        Sink {
            sink: s.sink.clone(),
            configured,
            pending: s.pending,
            oldest_queued_at: s.oldest_queued_at,
            lag_seconds: s
                .oldest_queued_at
                .map(|t| now.saturating_sub(t).max(0) as f64 / 1e9),
            delivered: s.delivered,
            rejected: s.rejected,
            refused_residency: s.refused,
            failures: s.failures,
            last_delivered_at: s.last_delivered_at,
            last_error: s.last_error.clone(),
            last_error_at: s.last_error_at,
        }
    }

    /// The store's record (for the CLI's text output).
    pub fn record(&self) -> SinkStatus {
        SinkStatus {
            sink: self.sink.clone(),
            pending: self.pending,
            oldest_queued_at: self.oldest_queued_at,
            delivered: self.delivered,
            rejected: self.rejected,
            refused: self.refused_residency,
            failures: self.failures,
            last_delivered_at: self.last_delivered_at,
            last_error: self.last_error.clone(),
            last_error_at: self.last_error_at,
        }
    }
}

/// One policy version (`policy show --json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicyVersionDoc {
    /// The version (0: no policy applied; then the rest is absent).
    pub version: u64,
    /// When it was applied, Unix ns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_at: Option<i64>,
    /// Who applied it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The file it came from, or `rollback to N`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// SHA-256 of the text, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The document (absent in the history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl PolicyVersionDoc {
    /// The document of a stored version, with its text or without.
    pub fn new(r: &crate::policy::PolicyRecord, with_text: bool) -> PolicyVersionDoc {
        PolicyVersionDoc {
            version: r.version,
            applied_at: Some(r.applied_at),
            actor: Some(r.actor.clone()),
            source: Some(r.source.clone()),
            digest: Some(r.digest.clone()),
            // Never a key, even of a version stored with one.
            text: with_text.then(|| outpost_protocols::policy::redact_keys(&r.text)),
        }
    }

    /// The stored version (for the CLI's text output); `None` for version 0.
    pub fn record(&self) -> Option<crate::policy::PolicyRecord> {
        (self.version > 0).then(|| crate::policy::PolicyRecord {
            version: self.version,
            applied_at: self.applied_at.unwrap_or(0),
            actor: self.actor.clone().unwrap_or_default(),
            source: self.source.clone().unwrap_or_default(),
            digest: self.digest.clone().unwrap_or_default(),
            text: self.text.clone().unwrap_or_default(),
        })
    }
}

/// What changed between two versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicyDiff {
    /// The older version.
    pub from: u64,
    /// The newer version.
    pub to: u64,
    /// A unified diff of the texts (`policy diff`'s output).
    pub diff: String,
}

/// A policy to apply: a text, or a stored version to apply again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyApply {
    /// The policy document (TOML, docs/policy.md).
    #[serde(default)]
    pub text: Option<String>,
    /// Where the text came from, for the history (a file name).
    #[serde(default)]
    pub source: Option<String>,
    /// Apply this stored version's text again (a rollback) instead.
    #[serde(default)]
    pub version: Option<u64>,
}

/// What applying did (`policy apply --json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicyApplied {
    /// `new`: stored as a new version; `unchanged`: the text is the version
    /// in force already.
    pub outcome: String,
    /// The version.
    pub version: u64,
    /// The new version's digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

impl From<&crate::policy::Applied> for PolicyApplied {
    fn from(a: &crate::policy::Applied) -> PolicyApplied {
        match a {
            crate::policy::Applied::New { version, digest } => PolicyApplied {
                outcome: "new".into(),
                version: *version,
                digest: Some(digest.clone()),
            },
            crate::policy::Applied::Unchanged { version } => PolicyApplied {
                outcome: "unchanged".into(),
                version: *version,
                digest: None,
            },
        }
    }
}

impl PolicyApplied {
    /// What the store returned (for the CLI's text output).
    pub fn applied(&self) -> crate::policy::Applied {
        match (self.outcome.as_str(), &self.digest) {
            ("new", Some(d)) => crate::policy::Applied::New {
                version: self.version,
                digest: d.clone(),
            },
            _ => crate::policy::Applied::Unchanged {
                version: self.version,
            },
        }
    }
}

/// A policy text to try without storing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyDryRunRequest {
    /// The policy document.
    pub text: String,
}

/// What a policy text would change, found without storing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PolicyDryRun {
    /// Whether `policy apply` would take it.
    pub valid: bool,
    /// Why not, when it would not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The residency verdict against this hub's sinks and regions.
    pub residency: Residency,
    /// The version in force it is compared with (0: none).
    pub current_version: u64,
    /// Its digest.
    pub digest: String,
    /// Agents of the registry whose treatment changes, by id.
    pub agents: Vec<AgentChange>,
    /// Agents in the registry, changed or not.
    pub agents_checked: u64,
}

/// The residency verdict of a dry run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Residency {
    /// `ok` or `refused`.
    pub verdict: String,
    /// Which route breaks which residency, when refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// How a new policy changes one agent's treatment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AgentChange {
    /// The agent.
    pub agent_id: String,
    /// Rules that select it now.
    pub rules_before: u64,
    /// Rules that would select it.
    pub rules_after: u64,
    /// Whether its rate limit or buffer limits change.
    pub limits_changed: bool,
    /// Streams it has sent whose rule or route changes.
    pub streams: Vec<StreamChange>,
}

/// One stream whose treatment changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StreamChange {
    /// The stream.
    pub stream: String,
    /// What takes it now: a rule's name, or `default`.
    pub before: String,
    /// What would take it.
    pub after: String,
}

/// One audit entry (`audit list --json`'s entries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    /// Its position, from 1.
    pub id: u64,
    /// When, Unix ns.
    pub ts: i64,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// To what.
    pub target: String,
    /// `ok` or `refused`.
    pub result: String,
    /// For people.
    pub detail: String,
    /// The hash of the entry before.
    pub prev: String,
    /// This entry's hash.
    pub hash: String,
    /// The hub's Ed25519 signature of `hash` (hex); null on entries written
    /// before the hub had an audit key.
    #[serde(default)]
    pub sig: Option<String>,
}

impl From<&audit::Record> for AuditEntry {
    fn from(r: &audit::Record) -> AuditEntry {
        AuditEntry {
            id: r.id,
            ts: r.ts,
            actor: r.actor.clone(),
            action: r.action.clone(),
            target: r.target.clone(),
            result: r.result.clone(),
            detail: r.detail.clone(),
            prev: r.prev.clone(),
            hash: r.hash.clone(),
            sig: r.sig.clone(),
        }
    }
}

impl AuditEntry {
    /// The stored record this document shows (to walk the chain at the
    /// client with a key it trusts).
    pub fn record(&self) -> audit::Record {
        audit::Record {
            id: self.id,
            ts: self.ts,
            actor: self.actor.clone(),
            action: self.action.clone(),
            target: self.target.clone(),
            result: self.result.clone(),
            detail: self.detail.clone(),
            prev: self.prev.clone(),
            hash: self.hash.clone(),
            sig: self.sig.clone(),
        }
    }
}

/// The audit log's newest entries and its head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditList {
    /// Oldest first.
    pub entries: Vec<AuditEntry>,
    /// The hash of the newest entry.
    pub head: String,
}

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditVerdict {
    /// `intact` or `broken`.
    pub status: String,
    /// Entries checked (intact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<u64>,
    /// The last hash (intact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<String>,
    /// The first signed entry (intact; the ones before it were written
    /// before the hub had an audit key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_signed: Option<u64>,
    /// The anchor checked, `ID:HASH` (intact, when one was given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<String>,
    /// The first entry that does not hold (broken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// What is wrong with it (broken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl From<&audit::Verdict> for AuditVerdict {
    fn from(v: &audit::Verdict) -> AuditVerdict {
        let none = AuditVerdict {
            status: String::new(),
            entries: None,
            head: None,
            first_signed: None,
            anchor: None,
            id: None,
            reason: None,
        };
        match v {
            audit::Verdict::Intact {
                entries,
                head,
                first_signed,
                anchor,
            } => AuditVerdict {
                status: "intact".into(),
                entries: Some(*entries),
                head: Some(head.clone()),
                first_signed: *first_signed,
                anchor: anchor.clone(),
                ..none
            },
            audit::Verdict::Broken { id, reason } => AuditVerdict {
                status: "broken".into(),
                id: Some(*id),
                reason: Some(reason.clone()),
                ..none
            },
        }
    }
}

/// The newest entry's id and hash, to keep somewhere the hub cannot reach
/// and give to `audit verify --anchor` later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditAnchor {
    /// The entry's id.
    pub id: u64,
    /// Its hash.
    pub hash: String,
    /// `ID:HASH`, as `audit verify --anchor` takes it.
    pub anchor: String,
    /// When the entry was written, Unix ns.
    pub ts: i64,
}

impl AuditAnchor {
    /// The anchor of `newest`; `None` for an empty log.
    pub fn of(newest: Option<&audit::Record>) -> Option<AuditAnchor> {
        newest.map(|e| AuditAnchor {
            id: e.id,
            hash: e.hash.clone(),
            anchor: audit::Anchor {
                id: e.id,
                hash: e.hash.clone(),
            }
            .to_string(),
            ts: e.ts,
        })
    }
}

/// The hub's audit public key, which checks the entries' signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditPublicKey {
    /// Always `ed25519`.
    pub algorithm: String,
    /// The 32-byte public key, hex.
    pub public_key: String,
    /// Its SHA-256 fingerprint.
    pub fingerprint: String,
    /// The key as PEM (SubjectPublicKeyInfo).
    pub pem: String,
}

impl AuditPublicKey {
    /// The document of `key`.
    pub fn of(key: &crate::audit::key::PublicKey) -> AuditPublicKey {
        AuditPublicKey {
            algorithm: "ed25519".into(),
            public_key: key.to_hex(),
            fingerprint: key.fingerprint(),
            pem: key.to_pem(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_document_is_fleet_list_json_and_reads_back_to_its_record() {
        let r = AgentRecord {
            agent_id: AgentId::parse("gw-1").expect("valid"),
            labels: BTreeMap::from([("site".to_owned(), "a".to_owned())]),
            labels_ignored: 2,
            revoked: Some(crate::store::Revocation {
                at: Timestamp(5),
                by: "token:ops".into(),
                reason: "stolen".into(),
            }),
            first_seen: Timestamp(1),
            last_seen: Timestamp(2),
            agent_version: Some("0.1.0".into()),
            protocol_version: Some(4),
            watermark: Seq(9),
            backlog_events: None,
            backlog_bytes: Some(3),
            sessions: 1,
            policy_version: Some(2),
            policy_error: None,
            policy_dropped: 4,
            policy_modified: 5,
            cert_not_after: Some(Timestamp(7)),
            cert_serial: Some("0a1b".into()),
        };
        let doc = Agent::from(&r);
        assert_eq!(
            serde_json::to_value(&doc).expect("serialises"),
            crate::verbs::fleet_json(std::slice::from_ref(&r))[0]
        );
        assert_eq!(doc.record(), Some(r));
    }
}
