//! Events and watermarks: one message per event in the events stream, and
//! each agent's watermark in `<prefix>_watermarks`, raised by
//! compare-and-set and never lowered (see the folder's module doc for why
//! the watermark, not the stream's deduplication, decides what is stored).

use async_nats::jetstream::{context::PublishAckFuture, kv};
use outpost_protocols::event::{AgentId, EventBody, Seq};

use super::connection::{Conflict, JetStreamStore, CAS_TRIES};
use crate::nats;
use crate::store::error::StoreError;

/// A watermark as this replica last read or wrote it: its value and its
/// key's revision (`None`: the key does not exist yet).
pub(super) type Known = (Seq, Option<u64>);

impl JetStreamStore {
    fn subject_of(&self, agent_id: &AgentId) -> String {
        format!("{}.{}", self.cfg.subject, agent_id.as_str())
    }

    /// Publishes one event (`Nats-Msg-Id` `<agent_id>:<seq>`, its stream
    /// name in `Outpost-Stream`); the acknowledgement to wait for.
    pub(super) async fn publish_event(
        &self,
        agent_id: &AgentId,
        seq: Seq,
        body: &EventBody,
    ) -> Result<PublishAckFuture, StoreError> {
        let id = format!("{agent_id}:{}", seq.0);
        let msg = nats::message(body.encode().into(), &id, &self.cfg.stream)
            .header("Outpost-Stream", body.stream.as_str());
        self.js
            .send_publish(self.subject_of(agent_id), msg)
            .await
            .map_err(|e| self.fail(format!("publishing {id}"), e))
    }

    /// The watermark bucket's value for `agent_id` and its revision.
    pub(super) async fn kv_watermark(&self, agent_id: &AgentId) -> Result<Known, StoreError> {
        let what = || format!("reading the watermark of {agent_id}");
        let entry = self
            .watermarks
            .entry(agent_id.as_str())
            .await
            .map_err(|e| self.fail(what(), e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let seq = std::str::from_utf8(&e.value)
                    .ok()
                    .and_then(|t| t.parse::<u64>().ok())
                    .ok_or_else(|| {
                        self.fail(
                            what(),
                            format!("{:?} is not a seq", String::from_utf8_lossy(&e.value)),
                        )
                    })?;
                Ok((Seq(seq), Some(e.revision)))
            }
            Some(e) => Ok((Seq(0), Some(e.revision))),
            None => Ok((Seq(0), None)),
        }
    }

    /// Where a session of `agent_id` resumes: its watermark. Events a
    /// replica published above it without raising it (it died, or NATS
    /// failed mid-group) are sent again by the agent and dropped by the
    /// stream's duplicate window (see the module doc).
    pub async fn watermark(&self, agent_id: &AgentId) -> Result<Seq, StoreError> {
        Ok(self.kv_watermark(agent_id).await?.0)
    }

    /// Raises `agent_id`'s watermark to `to` by compare-and-set, starting
    /// from `known` if given; returns the new value and revision (higher
    /// than `to` if another replica raised it further).
    pub(super) async fn raise(
        &self,
        agent_id: &AgentId,
        to: Seq,
        mut known: Option<Known>,
    ) -> Result<Known, StoreError> {
        let what = || format!("raising the watermark of {agent_id}");
        for _ in 0..CAS_TRIES {
            let (current, revision) = match known.take() {
                Some(k) => k,
                None => self.kv_watermark(agent_id).await?,
            };
            if current >= to {
                return Ok((current, revision));
            }
            let value = bytes::Bytes::from(to.0.to_string());
            match self
                .put_at(&self.watermarks, agent_id.as_str(), value, revision)
                .await
            {
                Ok(r) => return Ok((to, Some(r))),
                // Another replica moved it: read it again.
                Err(Conflict::Moved) => continue,
                Err(Conflict::Failed(m)) => return Err(self.fail(what(), m)),
            }
        }
        Err(self.fail(
            what(),
            format!("{CAS_TRIES} compare-and-set conflicts in a row"),
        ))
    }
}
