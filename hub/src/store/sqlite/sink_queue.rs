//! The sinks' queue: events the policy routes to a sink wait in
//! `sink_pending` until that sink has accepted them, and an agent's
//! acknowledgement stops below the first of its events still waiting.
//!
//! Why rows in the store rather than a queue in memory: an event routed to a
//! sink is acknowledged to the agent only once the sink accepted it, and a
//! hub that crashes in between must still know, on restart, what each sink
//! lacks: the rows are inserted in the same transaction as the events and the
//! watermark, and deleted in the transaction that records the delivery. Each
//! row carries its own copy of the body, so that a stream routed to a sink
//! and not to the store is held only until delivered, and a sink's queue is
//! one index range (`sink, n`) in arrival order.

use std::path::Path;

use outpost_protocols::event::{AgentId, Event, EventBody, Seq, Timestamp};
use outpost_storage::AtPath;
use rusqlite::{params, OptionalExtension as _, Transaction};

use super::rows::{agent_from, seq_from};
use crate::audit::key::AuditKey;
use crate::store::error::StoreError;
use crate::store::records::{Forward, Queued, SinkProgress, SinkStatus};

/// From schema version 2 to 3: the sinks' queue and their counters.
pub(super) const MIGRATE_3: &str = "
CREATE TABLE IF NOT EXISTS sink_pending (
    n         INTEGER PRIMARY KEY,
    sink      TEXT    NOT NULL,
    agent_id  TEXT    NOT NULL,
    seq       INTEGER NOT NULL,
    queued_at INTEGER NOT NULL,
    body      BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS sink_pending_sink ON sink_pending (sink, n);
CREATE INDEX IF NOT EXISTS sink_pending_agent ON sink_pending (agent_id, seq);
CREATE TABLE IF NOT EXISTS sinks (
    sink              TEXT    NOT NULL PRIMARY KEY,
    delivered         INTEGER NOT NULL DEFAULT 0,
    rejected          INTEGER NOT NULL DEFAULT 0,
    refused           INTEGER NOT NULL DEFAULT 0,
    failures          INTEGER NOT NULL DEFAULT 0,
    last_delivered_at INTEGER,
    last_error        TEXT,
    last_error_at     INTEGER
) WITHOUT ROWID;
";

/// Queues `forward` (already filtered to seqs above the watermark) in the
/// open transaction.
pub(super) fn queue(
    tx: &Transaction<'_>,
    path: &Path,
    now: Timestamp,
    agent_id: &AgentId,
    forward: &[&Forward],
) -> Result<u64, StoreError> {
    let mut insert = tx
        .prepare_cached(
            "INSERT INTO sink_pending (sink, agent_id, seq, queued_at, body)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .at(path)?;
    let mut rows = 0;
    for f in forward {
        let body = f.body.encode();
        for sink in &f.sinks {
            insert
                .execute(params![sink, agent_id.as_str(), f.seq.0, now.0, body])
                .at(path)?;
            rows += 1;
        }
    }
    Ok(rows)
}

/// What may be acknowledged to `agent_id` given its store `watermark`: up to
/// the seq before its first event still waiting for a sink.
pub(super) fn acked(
    conn: &rusqlite::Connection,
    path: &Path,
    agent_id: &AgentId,
    watermark: Seq,
) -> Result<Seq, StoreError> {
    let first: Option<i64> = conn
        .prepare_cached("SELECT min(seq) FROM sink_pending WHERE agent_id = ?1")
        .at(path)?
        .query_row([agent_id.as_str()], |r| r.get(0))
        .optional()
        .at(path)?
        .flatten();
    Ok(match first {
        Some(s) => {
            let s = seq_from(path, agent_id.as_str(), "sink_pending.seq", s)?;
            Seq(s.0.saturating_sub(1)).min(watermark)
        }
        None => watermark,
    })
}

/// Records a delivery attempt of `sink`: deletes its queue up to `through`
/// and adds to its counters, in the open transaction.
pub(super) fn progress(
    tx: &Transaction<'_>,
    path: &Path,
    key: &AuditKey,
    now: Timestamp,
    sink: &str,
    p: &SinkProgress,
) -> Result<(), StoreError> {
    if let Some(n) = p.through {
        tx.prepare_cached("DELETE FROM sink_pending WHERE sink = ?1 AND n <= ?2")
            .at(path)?
            .execute(params![sink, n])
            .at(path)?;
    }
    let delivered_at = (p.delivered > 0).then_some(now.0);
    let error_at = p.error.as_ref().map(|_| now.0);
    let count = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    tx.prepare_cached(
        "INSERT INTO sinks (sink, delivered, rejected, refused, failures,
                            last_delivered_at, last_error, last_error_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (sink) DO UPDATE SET
             delivered = delivered + excluded.delivered,
             rejected = rejected + excluded.rejected,
             refused = refused + excluded.refused,
             failures = failures + excluded.failures,
             last_delivered_at = coalesce(excluded.last_delivered_at, last_delivered_at),
             last_error = coalesce(excluded.last_error, last_error),
             last_error_at = coalesce(excluded.last_error_at, last_error_at)",
    )
    .at(path)?
    .execute(params![
        sink,
        count(p.delivered),
        count(p.rejected),
        count(p.refused),
        i64::from(p.failed),
        delivered_at,
        p.error,
        error_at
    ])
    .at(path)?;
    for (action, detail) in [
        ("sink.rejected", &p.rejected_detail),
        ("sink.refused", &p.refused_detail),
    ] {
        if let Some(detail) = detail {
            super::audit::append(
                tx,
                path,
                key,
                &super::audit::Entry {
                    ts: now,
                    actor: "hub",
                    action,
                    target: sink,
                    result: "refused",
                    detail,
                },
            )?;
        }
    }
    Ok(())
}

/// Deletes the queues of sinks not in `configured` (removed from the config:
/// nothing would ever deliver them, and they would hold back their agents'
/// acknowledgements for good), with one audit entry each. Returns (sink,
/// events dropped) per sink.
pub(super) fn drop_unconfigured(
    tx: &Transaction<'_>,
    path: &Path,
    key: &AuditKey,
    now: Timestamp,
    configured: &[String],
) -> Result<Vec<(String, u64)>, StoreError> {
    let mut stmt = tx
        .prepare_cached("SELECT sink, count(*) FROM sink_pending GROUP BY sink")
        .at(path)?;
    let mut rows = stmt.query([]).at(path)?;
    let mut gone = Vec::new();
    while let Some(row) = rows.next().at(path)? {
        let sink: String = row.get(0).at(path)?;
        let n: i64 = row.get(1).at(path)?;
        if !configured.contains(&sink) {
            gone.push((sink, n.unsigned_abs()));
        }
    }
    drop(rows);
    drop(stmt);
    for (sink, n) in &gone {
        tx.prepare_cached("DELETE FROM sink_pending WHERE sink = ?1")
            .at(path)?
            .execute([sink])
            .at(path)?;
        let detail = format!(
            "sink {sink:?} is no longer configured: {n} event(s) queued for it were dropped (they are in the store if the policy routed them there too)"
        );
        super::audit::append(
            tx,
            path,
            key,
            &super::audit::Entry {
                ts: now,
                actor: "hub",
                action: "sink.removed",
                target: sink,
                result: "ok",
                detail: &detail,
            },
        )?;
    }
    Ok(gone)
}

/// The first events waiting for `sink`, in queue order: what a delivery
/// takes next (a delivered, rejected or refused event is deleted, so the
/// head of the queue is always what is left).
pub(super) fn batch(
    conn: &rusqlite::Connection,
    path: &Path,
    sink: &str,
    after: Option<i64>,
    limit: usize,
) -> Result<Vec<Queued>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT n, agent_id, seq, body, queued_at FROM sink_pending
             WHERE sink = ?1 AND n > ?2 ORDER BY n LIMIT ?3",
        )
        .at(path)?;
    let mut rows = stmt
        .query(params![
            sink,
            after.unwrap_or(i64::MIN),
            i64::try_from(limit).unwrap_or(i64::MAX)
        ])
        .at(path)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().at(path)? {
        let n: i64 = row.get(0).at(path)?;
        let id: String = row.get(1).at(path)?;
        let seq = seq_from(path, &id, "sink_pending.seq", row.get(2).at(path)?)?;
        let agent_id = agent_from(path, "sink_pending.agent_id", id)?;
        let bytes: Vec<u8> = row.get(3).at(path)?;
        let body = EventBody::decode(&bytes).map_err(|e| StoreError::CorruptBody {
            path: path.to_owned(),
            agent_id: agent_id.clone(),
            seq,
            source: outpost_storage::BodyError::Decode(e),
        })?;
        out.push(Queued {
            n,
            event: Event {
                agent_id,
                seq,
                body,
            },
            queued_at: row.get(4).at(path)?,
        });
    }
    Ok(out)
}

/// Every sink that has a queue or counters, plus `configured` ones that have
/// neither yet, by id.
pub(super) fn status(
    conn: &rusqlite::Connection,
    path: &Path,
    configured: &[String],
) -> Result<Vec<SinkStatus>, StoreError> {
    let mut by_id = std::collections::BTreeMap::new();
    for id in configured {
        by_id.insert(id.clone(), SinkStatus::empty(id));
    }
    let mut stmt = conn
        .prepare_cached(
            "SELECT sink, delivered, rejected, refused, failures, last_delivered_at,
                    last_error, last_error_at FROM sinks",
        )
        .at(path)?;
    let mut rows = stmt.query([]).at(path)?;
    let count = |v: i64| v.unsigned_abs();
    while let Some(row) = rows.next().at(path)? {
        let id: String = row.get(0).at(path)?;
        let s = by_id
            .entry(id.clone())
            .or_insert_with(|| SinkStatus::empty(&id));
        s.delivered = count(row.get(1).at(path)?);
        s.rejected = count(row.get(2).at(path)?);
        s.refused = count(row.get(3).at(path)?);
        s.failures = count(row.get(4).at(path)?);
        s.last_delivered_at = row.get(5).at(path)?;
        s.last_error = row.get(6).at(path)?;
        s.last_error_at = row.get(7).at(path)?;
    }
    let mut stmt = conn
        .prepare_cached("SELECT sink, count(*), min(queued_at) FROM sink_pending GROUP BY sink")
        .at(path)?;
    let mut rows = stmt.query([]).at(path)?;
    while let Some(row) = rows.next().at(path)? {
        let id: String = row.get(0).at(path)?;
        let s = by_id
            .entry(id.clone())
            .or_insert_with(|| SinkStatus::empty(&id));
        s.pending = count(row.get(1).at(path)?);
        s.oldest_queued_at = row.get(2).at(path)?;
    }
    Ok(by_id.into_values().collect())
}
