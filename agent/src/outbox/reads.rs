//! Reading the outbox: the queries both the writer's connection (`Outbox`)
//! and a read-only one ([`OutboxReader`]) run, and the read-only view for
//! the CLI verbs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use outpost_protocols::event::{AgentId, Event, Seq};
use outpost_storage::{AtPath, Synchronous};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use super::error::OutboxError;
use super::schema::{Meta, SCHEMA_VERSION};

/// A snapshot of the outbox, for `outbox stats` and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutboxStats {
    /// The SQLite file.
    pub path: PathBuf,
    /// Events stored (not yet acknowledged nor evicted).
    pub events: u64,
    /// Their accounted size.
    pub bytes: u64,
    /// The oldest stored seq.
    pub first_seq: Option<Seq>,
    /// The newest stored seq.
    pub last_seq: Option<Seq>,
    /// The seq the next accepted event gets.
    pub next_seq: Seq,
    /// The highest seq the hub acknowledged (0 before the first ack).
    pub acked_seq: Seq,
    /// Events ever accepted.
    pub accepted_total: u64,
    /// Events ever dropped, by reason: `max_bytes`, `max_age`, `refused`.
    pub evicted: BTreeMap<String, u64>,
    /// Inbound QoS 2 packet ids stored and not yet released.
    pub qos2_pending: u64,
    /// Append transactions committed (a group commit counts once).
    pub transactions_total: u64,
    /// The durability the writer opened the file with.
    pub synchronous: Synchronous,
    /// When the oldest waiting event was committed here, Unix ns; `None`
    /// when none waits or its time is unknown (stored by an older agent).
    pub oldest_accepted_at: Option<i64>,
}

/// A read-only view of an outbox that another process (the running agent) may be
/// writing: WAL lets it read the last committed state without taking or
/// waiting for the write lock. For `outbox stats` and `outbox tail`.
#[derive(Debug)]
pub struct OutboxReader {
    conn: Connection,
    path: PathBuf,
    agent_id: AgentId,
}

impl OutboxReader {
    /// Opens `path` read-only. Fails with [`OutboxError::NotFound`] if there is
    /// no file, rather than creating one.
    pub fn open(path: &Path, agent_id: AgentId) -> Result<OutboxReader, OutboxError> {
        let (conn, _version) = outpost_storage::open_read_only(path, SCHEMA_VERSION)?;
        Ok(OutboxReader {
            conn,
            path: path.to_owned(),
            agent_id,
        })
    }

    /// Up to `max_events` events with a seq greater than `after`, in seq order.
    pub fn read_batch(&self, after: Seq, max_events: usize) -> Result<Vec<Event>, OutboxError> {
        read_batch(&self.conn, &self.path, &self.agent_id, after, max_events)
    }

    /// The newest `limit` events, in ascending seq order.
    pub fn tail(&self, limit: usize) -> Result<Vec<Event>, OutboxError> {
        tail(&self.conn, &self.path, &self.agent_id, limit)
    }

    /// The inbound QoS 2 packet ids stored and not yet released.
    pub fn qos2_pending(&self) -> Result<BTreeSet<u16>, OutboxError> {
        qos2_pending(&self.conn, &self.path)
    }

    /// A consistent snapshot of the counters.
    pub fn stats(&self) -> Result<OutboxStats, OutboxError> {
        stats(&self.conn, &self.path)
    }
}

pub(super) fn decode_rows(
    stmt: &mut rusqlite::CachedStatement<'_>,
    params: impl rusqlite::Params,
    path: &Path,
    agent_id: &AgentId,
) -> Result<Vec<Event>, OutboxError> {
    let mut rows = stmt.query(params).at(path)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().at(path)? {
        let seq = Seq(row.get(0).at(path)?);
        let body = outpost_storage::event_body(row, 1, path)?.map_err(|source| {
            OutboxError::CorruptBody {
                path: path.to_owned(),
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

pub(super) fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(super) fn read_batch(
    conn: &Connection,
    path: &Path,
    agent_id: &AgentId,
    after: Seq,
    max_events: usize,
) -> Result<Vec<Event>, OutboxError> {
    let mut stmt = conn
        .prepare_cached("SELECT seq, body FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2")
        .at(path)?;
    decode_rows(
        &mut stmt,
        params![after.0, limit(max_events)],
        path,
        agent_id,
    )
}

pub(super) fn accepted_at(
    conn: &Connection,
    path: &Path,
    after: Seq,
    last: Seq,
) -> Result<Vec<(Seq, i64)>, OutboxError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT first_seq, at FROM accepts
              WHERE first_seq <= ?2
                AND first_seq >= coalesce(
                    (SELECT max(first_seq) FROM accepts WHERE first_seq <= ?1), 0)
              ORDER BY first_seq",
        )
        .at(path)?;
    let rows = stmt
        .query_map(params![after.0.saturating_add(1), last.0], |r| {
            Ok((Seq(r.get(0)?), r.get(1)?))
        })
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .at(path)?;
    Ok(rows)
}

/// When the oldest waiting event was accepted (Unix ns), if the outbox
/// knows: a file an older agent wrote has no `accepts` table, and events
/// it stored have no row.
fn oldest_accepted_at(conn: &Connection, path: &Path) -> Result<Option<i64>, OutboxError> {
    let has: bool = conn
        .prepare_cached(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'accepts'",
        )
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .at(path)?;
    if !has {
        return Ok(None);
    }
    conn.prepare_cached(
        "SELECT at FROM accepts WHERE first_seq <= (SELECT min(seq) FROM events)
          ORDER BY first_seq DESC LIMIT 1",
    )
    .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
    .at(path)
    .map_err(OutboxError::from)
}

pub(super) fn tail(
    conn: &Connection,
    path: &Path,
    agent_id: &AgentId,
    n: usize,
) -> Result<Vec<Event>, OutboxError> {
    let mut stmt = conn
        .prepare_cached("SELECT seq, body FROM events ORDER BY seq DESC LIMIT ?1")
        .at(path)?;
    let mut events = decode_rows(&mut stmt, [limit(n)], path, agent_id)?;
    events.reverse();
    Ok(events)
}

pub(super) fn qos2_pending(conn: &Connection, path: &Path) -> Result<BTreeSet<u16>, OutboxError> {
    let mut stmt = conn
        .prepare_cached("SELECT pkid FROM mqtt_qos2 ORDER BY pkid")
        .at(path)?;
    let ids = stmt
        .query_map([], |r| r.get::<_, u16>(0))
        .and_then(|rows| rows.collect::<Result<BTreeSet<u16>, _>>())
        .at(path)?;
    Ok(ids)
}

pub(super) fn stats(conn: &Connection, path: &Path) -> Result<OutboxStats, OutboxError> {
    // One read transaction, so that the counters and the rows agree even while
    // another connection commits.
    let tx = conn.unchecked_transaction().at(path)?;
    let meta = Meta::load(&tx, path)?;
    let (first, last): (Option<u64>, Option<u64>) = tx
        .prepare_cached("SELECT min(seq), max(seq) FROM events")
        .and_then(|mut s| s.query_row([], |r| Ok((r.get(0)?, r.get(1)?))))
        .at(path)?;
    let qos2: u64 = tx
        .prepare_cached("SELECT count(*) FROM mqtt_qos2")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .at(path)?;
    let oldest_accepted_at = oldest_accepted_at(&tx, path)?;
    tx.finish().at(path)?;
    Ok(OutboxStats {
        path: path.to_owned(),
        events: meta.events,
        bytes: meta.total_bytes,
        first_seq: first.map(Seq),
        last_seq: last.map(Seq),
        next_seq: Seq(meta.next_seq),
        acked_seq: Seq(meta.acked_seq),
        accepted_total: meta.accepted_total,
        evicted: BTreeMap::from([
            ("max_age".to_owned(), meta.evicted_max_age),
            ("max_bytes".to_owned(), meta.evicted_max_bytes),
            ("refused".to_owned(), meta.refused_total),
        ]),
        qos2_pending: qos2,
        transactions_total: meta.transactions_total,
        synchronous: Synchronous::from_pragma(meta.synchronous),
        oldest_accepted_at,
    })
}
