//! Eviction: the rows that leave the outbox because a limit says so, not
//! because the hub acknowledged them; each is counted under its reason
//! (`max_age`, `max_bytes`).

use std::path::Path;
use std::time::Duration;

use outpost_protocols::event::Timestamp;
use outpost_storage::AtPath;
use rusqlite::Connection;
use tracing::debug;

use super::error::OutboxError;
use super::schema::{Meta, SQL_ROW_SIZE};

/// The `ts` below which events are expired.
pub(super) fn cutoff(now: Timestamp, max_age: Duration) -> i64 {
    let age = i64::try_from(max_age.as_nanos()).unwrap_or(i64::MAX);
    now.0.saturating_sub(age)
}

/// Deletes the events with `ts < cutoff`, counting them under `max_age`.
pub(super) fn expire(
    conn: &Connection,
    path: &Path,
    meta: &mut Meta,
    cutoff: i64,
) -> Result<u64, OutboxError> {
    // Age eviction works from the head of the queue: the oldest seqs go while
    // their time is before the cutoff, and the first younger event stops it.
    // Event times follow seqs (receipt or poll time) except for payload
    // timestamps, and a head walk needs no index on `ts`, which would cost
    // every insert a second B-tree update. When nothing has expired this
    // reads one row.
    let mut freed = 0u64;
    let mut count = 0u64;
    let mut upto = None;
    {
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT seq, ts, {SQL_ROW_SIZE} FROM events ORDER BY seq"
            ))
            .at(path)?;
        let mut rows = stmt.query([]).at(path)?;
        while let Some(row) = rows.next().at(path)? {
            let ts: i64 = row.get(1).at(path)?;
            if ts >= cutoff {
                break;
            }
            upto = Some(row.get::<_, u64>(0).at(path)?);
            freed += row.get::<_, u64>(2).at(path)?;
            count += 1;
        }
    }
    let Some(upto) = upto else {
        return Ok(0);
    };
    conn.prepare_cached("DELETE FROM events WHERE seq <= ?1")
        .and_then(|mut s| s.execute([upto]))
        .at(path)?;
    meta.remove(count, freed);
    meta.evicted_max_age += count;
    Ok(count)
}

/// Deletes the oldest events until the total is within `max_bytes`, counting
/// them under `max_bytes`.
pub(super) fn evict_oldest(
    conn: &Connection,
    path: &Path,
    meta: &mut Meta,
    max_bytes: u64,
) -> Result<u64, OutboxError> {
    let excess = meta.total_bytes - max_bytes;
    let mut freed = 0u64;
    let mut count = 0u64;
    let mut upto = None;
    {
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT seq, {SQL_ROW_SIZE} FROM events ORDER BY seq"
            ))
            .at(path)?;
        let mut rows = stmt.query([]).at(path)?;
        while freed < excess {
            let Some(row) = rows.next().at(path)? else {
                break;
            };
            let seq: u64 = row.get(0).at(path)?;
            let size: u64 = row.get(1).at(path)?;
            freed += size;
            count += 1;
            upto = Some(seq);
        }
    }
    if let Some(upto) = upto {
        conn.prepare_cached("DELETE FROM events WHERE seq <= ?1")
            .and_then(|mut s| s.execute([upto]))
            .at(path)?;
        debug!(
            evicted = count,
            upto,
            reason = "max_bytes",
            "Outbox evicted oldest events."
        );
    }
    meta.remove(count, freed);
    meta.evicted_max_bytes += count;
    Ok(count)
}

/// How many events match `cond` (with one parameter) and their total size.
pub(super) fn count_and_size(
    conn: &Connection,
    path: &Path,
    cond: &str,
    param: impl rusqlite::ToSql,
) -> Result<(u64, u64), OutboxError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT count(*), coalesce(sum({SQL_ROW_SIZE}), 0) FROM events WHERE {cond}"
        ))
        .and_then(|mut s| s.query_row([param], |r| Ok((r.get(0)?, r.get(1)?))))
        .at(path)?)
}
