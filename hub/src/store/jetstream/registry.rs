//! The fleet registry on JetStream: one JSON record per agent in
//! `<prefix>_agents`, and one key per live replica in `<prefix>_replicas`.
//!
//! The registry is informational (`fleet list`); it is updated by
//! compare-and-set too, so that two replicas never overwrite each other's
//! change. Sessions are counted per replica, and a replica that stopped
//! refreshing its key in `<prefix>_replicas` (killed) no longer counts.

use std::collections::BTreeMap;
use std::time::Duration;

use outpost_protocols::event::{AgentId, Timestamp};
use serde::{Deserialize, Serialize};

use super::connection::JetStreamStore;
use crate::clock;
use crate::store::error::StoreError;
use crate::store::handle::Write;
use crate::store::records::{AgentRecord, CertBinding, CertInfo, Rebind, Revocation};

/// How often a replica refreshes its key in `<prefix>_replicas`.
pub(super) const HEARTBEAT: Duration = Duration::from_secs(10);

/// An agent's registry record as the `<prefix>_agents` bucket holds it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub(super) struct KvAgent {
    pub(super) labels: BTreeMap<String, String>,
    /// `Hello`s that stated other labels (ignored).
    pub(super) labels_ignored: u64,
    /// Set by `agent revoke`, cleared by `agent reinstate`.
    pub(super) revoked: Option<Revocation>,
    pub(super) first_seen: i64,
    pub(super) last_seen: i64,
    agent_version: Option<String>,
    protocol_version: Option<u16>,
    backlog_events: Option<u64>,
    backlog_bytes: Option<u64>,
    /// Open sessions by replica.
    sessions: BTreeMap<String, u64>,
    policy_version: Option<u64>,
    policy_error: Option<String>,
    pub(super) policy_dropped: u64,
    pub(super) policy_modified: u64,
    /// The certificate binding (see `sqlite::binding`); absent in records
    /// written before it.
    #[serde(default)]
    cert_serial: Option<String>,
    #[serde(default)]
    cert_fingerprint: Option<String>,
    #[serde(default)]
    cert_not_after: Option<i64>,
    #[serde(default)]
    cert_prev_fingerprint: Option<String>,
    #[serde(default)]
    cert_prev_until: Option<i64>,
}

impl KvAgent {
    fn binding(&self) -> Option<CertBinding> {
        Some(CertBinding {
            current: CertInfo {
                serial: self.cert_serial.clone().unwrap_or_default(),
                fingerprint: self.cert_fingerprint.clone()?,
                not_after: Timestamp(self.cert_not_after.unwrap_or(0)),
            },
            previous: self
                .cert_prev_fingerprint
                .clone()
                .zip(self.cert_prev_until.map(Timestamp)),
        })
    }

    /// Binds `cert` as `how` says (the same rules as the SQLite store).
    fn bind(&mut self, cert: &CertInfo, how: &Rebind) {
        let (prev, prev_until) = match (how, &self.cert_fingerprint) {
            (Rebind::FirstUse, Some(_)) => return,
            (Rebind::Replace { .. }, Some(f)) if *f == cert.fingerprint => return,
            (Rebind::Replace { grace_until, .. }, Some(f)) => {
                (Some(f.clone()), Some(grace_until.0))
            }
            (_, None) => (None, None),
        };
        self.cert_serial = Some(cert.serial.clone());
        self.cert_fingerprint = Some(cert.fingerprint.clone());
        self.cert_not_after = Some(cert.not_after.0);
        self.cert_prev_fingerprint = prev;
        self.cert_prev_until = prev_until;
    }
}

impl KvAgent {
    /// The labels an enrollment token gave the agent; the record is created
    /// by its first change.
    pub(super) fn enrolled(&mut self, labels: &BTreeMap<String, String>, now: i64) {
        if self.first_seen == 0 {
            self.first_seen = now;
            self.last_seen = now;
        }
        self.labels = labels.clone();
    }
}

impl JetStreamStore {
    /// Read-modify-write of `agent_id`'s registry record by compare-and-set.
    pub(super) async fn update_agent(
        &self,
        agent_id: &AgentId,
        change: impl Fn(&mut KvAgent),
    ) -> Result<(), StoreError> {
        let what = || format!("updating the registry record of {agent_id}");
        self.update_json(&self.agents, agent_id.as_str(), what, change)
            .await
    }

    /// Applies a registry change (a session opened or closed, a backlog or
    /// policy status reported, a touch); `Ok` for any other write.
    pub(super) async fn apply_registry(&self, w: &Write) -> Result<(), StoreError> {
        let t = clock::unix_now().0;
        let replica = &self.replica;
        match w {
            Write::Connected {
                agent_id,
                labels,
                agent_version,
                protocol_version,
                ..
            } => {
                // The labels of a `Hello` are the registry's only for an
                // agent it does not know yet (see the SQLite registry).
                self.update_agent(agent_id, |r| {
                    if r.first_seen == 0 {
                        r.first_seen = t;
                        r.labels = labels.clone();
                    } else if r.labels != *labels {
                        r.labels_ignored += 1;
                    }
                    r.last_seen = r.last_seen.max(t);
                    r.agent_version = Some(agent_version.clone());
                    r.protocol_version = Some(*protocol_version);
                    *r.sessions.entry(replica.clone()).or_default() += 1;
                })
                .await
            }
            Write::Disconnected { agent_id, .. } => {
                self.update_agent(agent_id, |r| {
                    r.last_seen = r.last_seen.max(t);
                    if let Some(n) = r.sessions.get_mut(replica) {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            r.sessions.remove(replica);
                        }
                    }
                })
                .await
            }
            Write::Backlog {
                agent_id,
                events,
                bytes,
                ..
            } => {
                self.update_agent(agent_id, |r| {
                    r.backlog_events = Some(*events);
                    r.backlog_bytes = Some(*bytes);
                })
                .await
            }
            Write::Touch { agent_id, .. } => {
                self.update_agent(agent_id, |r| r.last_seen = r.last_seen.max(t))
                    .await
            }
            Write::PolicyStatus {
                agent_id,
                version,
                error,
                ..
            } => {
                self.update_agent(agent_id, |r| {
                    r.policy_version = Some(*version);
                    r.policy_error = error.clone();
                })
                .await
            }
            Write::Bind {
                agent_id,
                cert,
                how,
                ..
            } => {
                // `first_seen` stays 0 until the agent's first `Hello`,
                // which then gives the registry its labels.
                self.update_agent(agent_id, |r| r.bind(cert, how)).await
            }
            // No audit log on this store yet: the hub's log line is the
            // record.
            Write::SinkProgress { .. } | Write::Insert { .. } | Write::CertRefused { .. } => Ok(()),
        }
    }

    /// Refreshes this replica's key in `<prefix>_replicas`.
    pub(super) async fn heartbeat(&self) -> Result<(), StoreError> {
        let value = serde_json::json!({ "since": clock::unix_now().0 }).to_string();
        self.replicas
            .put(&self.replica, value.into())
            .await
            .map(drop)
            .map_err(|e| self.fail("refreshing this replica's key", e))
    }

    /// Every agent in the registry with its watermark, sessions counted only
    /// on replicas that are alive, in id order.
    pub async fn fleet(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let alive = self.keys_of(&self.replicas, "listing replicas").await?;
        let ids = self.keys_of(&self.agents, "listing agents").await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Ok(agent_id) = AgentId::parse(&id) else {
                continue;
            };
            let Some(v) = self
                .agents
                .get(id.clone())
                .await
                .map_err(|e| self.fail("reading agents", e))?
            else {
                continue;
            };
            let rec: KvAgent = serde_json::from_slice(&v).unwrap_or_default();
            let watermark = self.watermark(&agent_id).await?;
            out.push(AgentRecord {
                agent_id,
                labels: rec.labels,
                labels_ignored: rec.labels_ignored,
                revoked: rec.revoked,
                first_seen: Timestamp(rec.first_seen),
                last_seen: Timestamp(rec.last_seen),
                agent_version: rec.agent_version,
                protocol_version: rec.protocol_version,
                watermark,
                backlog_events: rec.backlog_events,
                backlog_bytes: rec.backlog_bytes,
                sessions: rec
                    .sessions
                    .iter()
                    .filter(|(r, _)| alive.contains(*r))
                    .map(|(_, n)| n)
                    .sum(),
                policy_version: rec.policy_version,
                policy_error: rec.policy_error,
                policy_dropped: rec.policy_dropped,
                policy_modified: rec.policy_modified,
                cert_not_after: rec.cert_not_after.map(Timestamp),
                cert_serial: rec.cert_serial,
            });
        }
        Ok(out)
    }

    /// Binds `cert` to `agent_id` as `how` says, outside a session (`ca
    /// issue --config`); the same rules as the SQLite store.
    pub async fn bind_certificate(
        &self,
        agent_id: &AgentId,
        cert: &CertInfo,
        how: &Rebind,
    ) -> Result<(), StoreError> {
        self.update_agent(agent_id, |r| r.bind(cert, how)).await
    }

    /// The certificate bound to `agent_id`, if any.
    pub(super) async fn binding(
        &self,
        agent_id: &AgentId,
    ) -> Result<Option<CertBinding>, StoreError> {
        Ok(self.agent(agent_id).await?.and_then(|r| r.binding()))
    }

    /// The registry's labels of `agent_id`; `None` for an agent it does
    /// not know.
    pub async fn labels(
        &self,
        agent_id: &AgentId,
    ) -> Result<Option<BTreeMap<String, String>>, StoreError> {
        Ok(self.agent(agent_id).await?.map(|r| r.labels))
    }

    /// `agent_id`'s registry record, `None` if it has none (or a deleted
    /// one); a record that does not read is an empty one, as everywhere in
    /// this registry.
    pub(super) async fn agent(&self, agent_id: &AgentId) -> Result<Option<KvAgent>, StoreError> {
        match self.agents.entry(agent_id.as_str()).await {
            Ok(Some(e)) if e.operation == async_nats::jetstream::kv::Operation::Put => Ok(Some(
                serde_json::from_slice::<KvAgent>(&e.value).unwrap_or_default(),
            )),
            Ok(_) => Ok(None),
            Err(e) => Err(self.fail(format!("reading the registry record of {agent_id}"), e)),
        }
    }
}
