//! Reading events back for the operator verbs (`events tail`, `events
//! stats`), on the writer's connection or a read-only one.

use std::path::Path;

use outpost_protocols::event::{AgentId, Event, Seq};
use outpost_protocols::topic::TopicFilter;
use outpost_storage::AtPath;
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection};
use serde::Serialize;

use super::registry;
use super::rows::{agent_from, seq_from};
use crate::store::error::StoreError;

/// What the store holds for one agent, for `events stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AgentEventStats {
    /// The agent.
    pub agent_id: AgentId,
    /// Rows stored.
    pub count: u64,
    /// Distinct seqs among them, counted by SQLite (`count(DISTINCT seq)`), not
    /// assumed: equal to `count` unless the store holds a duplicate.
    pub distinct_seqs: u64,
    /// The lowest stored seq, `None` without events.
    pub min_seq: Option<Seq>,
    /// The highest stored seq, `None` without events.
    pub max_seq: Option<Seq>,
}

fn limit_param(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The newest matching events of one agent, newest first, at most `limit`.
fn agent_tail(
    conn: &Connection,
    path: &Path,
    agent_id: &AgentId,
    stream_pattern: Option<&TopicFilter>,
    limit: usize,
) -> Result<Vec<Event>, StoreError> {
    // An exact pattern is one stream name: SQLite compares it. A wildcard is
    // matched here, on the stream column, so that only matching rows are
    // decoded; the scan stops once `limit` rows matched.
    let exact = stream_pattern.filter(|f| f.is_exact());
    let mut stmt = match exact {
        Some(_) => conn.prepare_cached(
            "SELECT seq, stream, body FROM events WHERE agent_id = ?1 AND stream = ?2
             ORDER BY seq DESC LIMIT ?3",
        ),
        None => conn.prepare_cached(
            "SELECT seq, stream, body FROM events WHERE agent_id = ?1 ORDER BY seq DESC",
        ),
    }
    .at(path)?;
    let mut rows = match exact {
        Some(f) => stmt.query(params![agent_id.as_str(), f.as_str(), limit_param(limit)]),
        None => stmt.query(params![agent_id.as_str()]),
    }
    .at(path)?;
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(row) = rows.next().at(path)? else {
            break;
        };
        if let Some(f) = stream_pattern.filter(|f| !f.is_exact()) {
            let stream = row.get_ref(1).at(path)?;
            let matches = match stream {
                ValueRef::Text(t) => std::str::from_utf8(t).is_ok_and(|s| f.matches(s)),
                _ => false,
            };
            if !matches {
                continue;
            }
        }
        let seq = seq_from(path, agent_id.as_str(), "events.seq", row.get(0).at(path)?)?;
        let body = outpost_storage::event_body(row, 2, path)?.map_err(|source| {
            StoreError::CorruptBody {
                path: path.to_owned(),
                agent_id: agent_id.clone(),
                seq,
                source,
            }
        })?;
        out.push(Event {
            agent_id: agent_id.clone(),
            seq,
            body,
        });
    }
    Ok(out)
}

pub(super) fn events_tail(
    conn: &Connection,
    path: &Path,
    agent: Option<&AgentId>,
    stream_pattern: Option<&TopicFilter>,
    limit: usize,
) -> Result<Vec<Event>, StoreError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    if let Some(agent_id) = agent {
        let mut events = agent_tail(conn, path, agent_id, stream_pattern, limit)?;
        events.reverse();
        return Ok(events);
    }
    // One read transaction, so that every agent is read at the same commit.
    let tx = conn.unchecked_transaction().at(path)?;
    let mut events = Vec::new();
    for agent_id in registry::agent_ids(&tx, path)? {
        events.extend(agent_tail(&tx, path, &agent_id, stream_pattern, limit)?);
    }
    tx.finish().at(path)?;
    events.sort_by(|a, b| (a.body.ts, &a.agent_id, a.seq).cmp(&(b.body.ts, &b.agent_id, b.seq)));
    let skip = events.len().saturating_sub(limit);
    events.drain(..skip);
    Ok(events)
}

pub(super) fn events_stats(
    conn: &Connection,
    path: &Path,
    agent: Option<&AgentId>,
) -> Result<Vec<AgentEventStats>, StoreError> {
    const SELECT: &str = "SELECT agent_id, count(*), count(DISTINCT seq), min(seq), max(seq)
                          FROM events";
    let mut stmt = match agent {
        Some(_) => conn.prepare_cached(&format!("{SELECT} WHERE agent_id = ?1 GROUP BY agent_id")),
        None => conn.prepare_cached(&format!("{SELECT} GROUP BY agent_id ORDER BY agent_id")),
    }
    .at(path)?;
    let mut rows = match agent {
        Some(a) => stmt.query([a.as_str()]),
        None => stmt.query([]),
    }
    .at(path)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().at(path)? {
        let id: String = row.get(0).at(path)?;
        let count: i64 = row.get(1).at(path)?;
        let distinct: i64 = row.get(2).at(path)?;
        let min: Option<i64> = row.get(3).at(path)?;
        let max: Option<i64> = row.get(4).at(path)?;
        let min_seq = min
            .map(|v| seq_from(path, &id, "events.seq", v))
            .transpose()?;
        let max_seq = max
            .map(|v| seq_from(path, &id, "events.seq", v))
            .transpose()?;
        out.push(AgentEventStats {
            agent_id: agent_from(path, "events.agent_id", id)?,
            // count() is never negative.
            count: count.unsigned_abs(),
            distinct_seqs: distinct.unsigned_abs(),
            min_seq,
            max_seq,
        });
    }
    if out.is_empty() {
        if let Some(agent_id) = agent {
            out.push(AgentEventStats {
                agent_id: agent_id.clone(),
                count: 0,
                distinct_seqs: 0,
                min_seq: None,
                max_seq: None,
            });
        }
    }
    Ok(out)
}

/// Which events a page holds: an agent or all, a stream pattern or all, a
/// range of event times, and where the previous page ended.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    /// Only this agent's events.
    pub agent: Option<AgentId>,
    /// Only streams matching this filter.
    pub stream: Option<TopicFilter>,
    /// Only events at or after this event time (Unix ns).
    pub from: Option<i64>,
    /// Only events before this event time (Unix ns).
    pub to: Option<i64>,
    /// Only events after this `(agent_id, seq)`: the previous page's last.
    pub after: Option<(AgentId, Seq)>,
}

/// At most `limit` events matching `q` in store order (by agent id, then
/// seq), and whether more match after them.
///
/// Why store order and not event time: it is the primary key's, so a page
/// is a range scan that starts where the previous one ended, and an event
/// stored while a client pages through never shifts what it has seen.
pub(super) fn events_page(
    conn: &Connection,
    path: &Path,
    q: &EventQuery,
    limit: usize,
) -> Result<(Vec<Event>, bool), StoreError> {
    let (after_agent, after_seq) = match (&q.after, &q.agent) {
        (Some((a, s)), _) => (a.as_str(), i64::try_from(s.0).unwrap_or(i64::MAX)),
        (None, Some(a)) => (a.as_str(), 0),
        (None, None) => ("", 0),
    };
    let from = q.from.unwrap_or(i64::MIN);
    let to = q.to.unwrap_or(i64::MAX);
    let exact = q
        .stream
        .as_ref()
        .filter(|f| f.is_exact())
        .map(|f| f.as_str());
    let mut stmt = conn
        .prepare_cached(
            "SELECT agent_id, seq, stream, body FROM events
             WHERE (agent_id, seq) > (?1, ?2)
               AND (?3 IS NULL OR agent_id = ?3)
               AND (?4 IS NULL OR stream = ?4)
               AND ts >= ?5 AND ts < ?6
             ORDER BY agent_id, seq",
        )
        .at(path)?;
    let mut rows = stmt
        .query(params![
            after_agent,
            after_seq,
            q.agent.as_ref().map(AgentId::as_str),
            exact,
            from,
            to
        ])
        .at(path)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().at(path)? {
        if let Some(f) = q.stream.as_ref().filter(|f| !f.is_exact()) {
            let matches = match row.get_ref(2).at(path)? {
                ValueRef::Text(t) => std::str::from_utf8(t).is_ok_and(|s| f.matches(s)),
                _ => false,
            };
            if !matches {
                continue;
            }
        }
        if out.len() == limit {
            return Ok((out, true));
        }
        let id: String = row.get(0).at(path)?;
        let agent_id = agent_from(path, "events.agent_id", id)?;
        let seq = seq_from(path, agent_id.as_str(), "events.seq", row.get(1).at(path)?)?;
        let body = outpost_storage::event_body(row, 3, path)?.map_err(|source| {
            StoreError::CorruptBody {
                path: path.to_owned(),
                agent_id: agent_id.clone(),
                seq,
                source,
            }
        })?;
        out.push(Event {
            agent_id,
            seq,
            body,
        });
    }
    Ok((out, false))
}

/// The distinct streams `agent_id` has stored, at most `limit`, by name.
pub(super) fn agent_streams(
    conn: &Connection,
    path: &Path,
    agent_id: &AgentId,
    limit: usize,
) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT DISTINCT stream FROM events WHERE agent_id = ?1 ORDER BY stream LIMIT ?2",
        )
        .at(path)?;
    let rows = stmt
        .query_map(params![agent_id.as_str(), limit_param(limit)], |r| r.get(0))
        .at(path)?;
    Ok(rows.collect::<Result<Vec<String>, _>>().at(path)?)
}
