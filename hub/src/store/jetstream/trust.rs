//! What an operator decides about an agent's standing, on the JetStream
//! store: labels and revocation in the agent's registry record (changed by
//! compare-and-set, like every registry change), and a trust generation in
//! the shared bucket that every replica polls, so that a change made from
//! any machine reaches the live sessions on every replica.
//!
//! ```text
//! KV <prefix>_hub     key trust-generation → decimal u64, raised by each change
//! KV <prefix>_agents  record.labels, record.revoked {at, by, reason}
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use outpost_protocols::event::{AgentId, Timestamp};

use super::connection::JetStreamStore;
use super::registry::KvAgent;
use crate::store::error::StoreError;
use crate::store::records::{LabelChange, Revocation};

/// The key of the trust generation in the shared bucket.
const GENERATION: &str = "trust-generation";

impl JetStreamStore {
    /// The trust generation (0 before the first change).
    pub async fn trust_generation(&self) -> Result<u64, StoreError> {
        match self.shared.get(GENERATION).await {
            Ok(Some(v)) => Ok(std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)),
            Ok(None) => Ok(0),
            Err(e) => Err(self.fail("reading the trust generation", e)),
        }
    }

    /// Raises the trust generation: every replica's sessions look again.
    pub(super) async fn raise_trust_generation(&self) -> Result<(), StoreError> {
        self.update_json(
            &self.shared,
            GENERATION,
            || "raising the trust generation".to_owned(),
            |n: &mut u64| *n += 1,
        )
        .await
    }

    /// Every revoked agent and its revocation.
    pub async fn revoked(&self) -> Result<HashMap<AgentId, Revocation>, StoreError> {
        let ids = self.keys_of(&self.agents, "listing agents").await?;
        let mut out = HashMap::new();
        for id in ids {
            let Ok(agent_id) = AgentId::parse(&id) else {
                continue;
            };
            if let Some(r) = self.agent(&agent_id).await?.and_then(|r| r.revoked) {
                out.insert(agent_id, r);
            }
        }
        Ok(out)
    }

    /// Sets `agent_id`'s labels to what `edit` makes of those held (empty
    /// for an agent not registered), creating its record if it has none;
    /// see the SQLite store's `trust::edit_labels`. `edit` runs on the
    /// record each compare-and-set attempt read, so two operators' edits at
    /// once both count; an error of `edit` on what is held writes nothing.
    pub async fn edit_labels<E: From<StoreError>>(
        &self,
        agent_id: &AgentId,
        edit: impl Fn(BTreeMap<String, String>) -> Result<BTreeMap<String, String>, E>,
        now: Timestamp,
    ) -> Result<LabelChange, E> {
        edit(self.labels(agent_id).await?.unwrap_or_default())?;
        let outcome = Mutex::new(None);
        self.update_agent(agent_id, |r: &mut KvAgent| {
            let registered = r.first_seen != 0;
            let held = if registered {
                r.labels.clone()
            } else {
                BTreeMap::new()
            };
            let done = edit(held).map(|new| {
                let old = registered.then(|| r.labels.clone());
                if !registered {
                    r.first_seen = now.0;
                    r.last_seen = now.0;
                }
                r.labels = new.clone();
                LabelChange { old, new }
            });
            *outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(done);
        })
        .await?;
        let change = outcome
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .ok_or_else(|| self.fail("editing labels", "no compare-and-set attempt ran"))??;
        if change.old.as_ref() != Some(&change.new) {
            self.raise_trust_generation().await?;
        }
        Ok(change)
    }

    /// Revokes `agent_id` (creating its record if it has none); the
    /// revocation in force and whether it is new.
    pub async fn revoke(
        &self,
        agent_id: &AgentId,
        reason: &str,
        actor: &str,
        now: Timestamp,
    ) -> Result<(Revocation, bool), StoreError> {
        let revocation = Revocation {
            at: now,
            by: actor.to_owned(),
            reason: reason.to_owned(),
        };
        let earlier = Mutex::new(None);
        self.update_agent(agent_id, |r: &mut KvAgent| {
            if r.first_seen == 0 {
                r.first_seen = now.0;
                r.last_seen = now.0;
            }
            *earlier.lock().unwrap_or_else(|e| e.into_inner()) = r.revoked.clone();
            if r.revoked.is_none() {
                r.revoked = Some(revocation.clone());
            }
        })
        .await?;
        match earlier.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(earlier) => Ok((earlier, false)),
            None => {
                self.raise_trust_generation().await?;
                Ok((revocation, true))
            }
        }
    }

    /// Lifts `agent_id`'s revocation; the one lifted, `None` if it was not
    /// revoked.
    pub async fn reinstate(&self, agent_id: &AgentId) -> Result<Option<Revocation>, StoreError> {
        if self.agent(agent_id).await?.is_none() {
            return Ok(None);
        }
        let lifted = Mutex::new(None);
        self.update_agent(agent_id, |r: &mut KvAgent| {
            *lifted.lock().unwrap_or_else(|e| e.into_inner()) = r.revoked.take();
        })
        .await?;
        let lifted = lifted.into_inner().unwrap_or_else(|e| e.into_inner());
        if lifted.is_some() {
            self.raise_trust_generation().await?;
        }
        Ok(lifted)
    }
}
