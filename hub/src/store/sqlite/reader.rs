//! The read-only view of the store for the operator verbs, which read while
//! the hub writes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use outpost_protocols::event::{AgentId, Event, Seq};
use outpost_protocols::topic::TopicFilter;
use rusqlite::Connection;

use super::events::{
    agent_streams, events_page, events_stats, events_tail, AgentEventStats, EventQuery,
};
use super::registry;
use super::schema::SCHEMA_VERSION;
use super::sink_queue;
use crate::store::error::StoreError;
use crate::store::records::AgentRecord;
use crate::store::records::{Queued, SinkStatus};

/// A read-only view of a store that the running hub may be writing: WAL lets
/// it read the last committed state without taking or waiting for the write
/// lock. For the operator verbs.
#[derive(Debug)]
pub struct StoreReader {
    conn: Connection,
    path: PathBuf,
}

impl StoreReader {
    /// Opens `path` read-only. Fails with [`StoreError::NotFound`] if there is
    /// no file, rather than creating one.
    pub fn open(path: &Path) -> Result<StoreReader, StoreError> {
        let (conn, version) = outpost_storage::open_read_only(path, SCHEMA_VERSION)?;
        if version < SCHEMA_VERSION {
            return Err(StoreError::OlderSchema {
                path: path.to_owned(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        Ok(StoreReader {
            conn,
            path: path.to_owned(),
        })
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The read-only connection, for the audit log and the policy versions.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The highest seq stored for `agent_id`, 0 if none.
    pub fn watermark(&self, agent_id: &AgentId) -> Result<Seq, StoreError> {
        registry::watermark(&self.conn, &self.path, agent_id)
    }

    /// The newest `limit` events of `agent` (every agent when `None`) whose
    /// stream matches `stream_pattern` (every stream when `None`), oldest
    /// first.
    ///
    /// For one agent, "newest" and the order are by seq. Across agents there
    /// is no common seq, so each agent's newest `limit` matching events are
    /// merged by event time (`ts`, then agent id and seq) and the last `limit`
    /// are kept. Only matching rows are decoded; a corrupt one is
    /// [`StoreError::CorruptBody`].
    pub fn events_tail(
        &self,
        agent: Option<&AgentId>,
        stream_pattern: Option<&TopicFilter>,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        events_tail(&self.conn, &self.path, agent, stream_pattern, limit)
    }

    /// At most `limit` events matching `q` in store order (agent id, then
    /// seq), and whether more match after them: a page of the API's
    /// `GET /api/v1/events`.
    pub fn events_page(
        &self,
        q: &EventQuery,
        limit: usize,
    ) -> Result<(Vec<Event>, bool), StoreError> {
        events_page(&self.conn, &self.path, q, limit)
    }

    /// The distinct streams `agent_id` has stored, at most `limit`, by name
    /// (what a policy dry run compares).
    pub fn agent_streams(
        &self,
        agent_id: &AgentId,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        agent_streams(&self.conn, &self.path, agent_id, limit)
    }

    /// Per agent (or only `agent`), how many rows the store holds, how many
    /// distinct seqs, and the lowest and highest seq, ordered by agent id.
    /// With `agent`, there is always exactly one entry (zeros for an agent
    /// without events).
    pub fn events_stats(
        &self,
        agent: Option<&AgentId>,
    ) -> Result<Vec<AgentEventStats>, StoreError> {
        events_stats(&self.conn, &self.path, agent)
    }

    /// How many commands the store holds, by kind and state.
    pub fn command_counts(&self) -> Result<Vec<(String, String, u64)>, StoreError> {
        super::commands::counts(&self.conn, &self.path)
    }

    /// The fleet registry, ordered by agent id.
    pub fn fleet(&self) -> Result<Vec<AgentRecord>, StoreError> {
        registry::fleet(&self.conn, &self.path)
    }

    /// The first at most `limit` events waiting for `sink`, oldest first.
    pub fn sink_batch(&self, sink: &str, limit: usize) -> Result<Vec<Queued>, StoreError> {
        sink_queue::batch(&self.conn, &self.path, sink, None, limit)
    }

    /// The first at most `limit` events waiting for `sink` after its queue
    /// position `after`, oldest first: the head past what a runner has
    /// taken. A row inserted later always lies past `after` while the row
    /// at `after` is still queued (SQLite numbers a new row one past the
    /// largest), not once it is deleted.
    pub fn sink_batch_after(
        &self,
        sink: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<Queued>, StoreError> {
        sink_queue::batch(&self.conn, &self.path, sink, Some(after), limit)
    }

    /// Every sink's queue and counters (with `configured` sinks that have
    /// neither), by id.
    pub fn sinks_status(&self, configured: &[String]) -> Result<Vec<SinkStatus>, StoreError> {
        sink_queue::status(&self.conn, &self.path, configured)
    }

    /// The registry's labels of `agent_id` (empty for an agent the
    /// registry does not know).
    pub fn labels(&self, agent_id: &AgentId) -> Result<BTreeMap<String, String>, StoreError> {
        Ok(registry::labels(&self.conn, &self.path, agent_id)?.unwrap_or_default())
    }
}
