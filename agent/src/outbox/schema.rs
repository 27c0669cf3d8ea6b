//! What the outbox file holds besides the events' own columns: the schema,
//! the size every row is accounted at, and the counters of the `meta` table
//! (the on-disk format is described in the module above).

use std::path::Path;

use outpost_storage::{AtPath, Synchronous};
use rusqlite::{params, Connection, Transaction, TransactionBehavior};

use super::error::OutboxError;

/// The schema version this build writes, kept in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 1;

/// Bytes added to every row's size for its seq, ts and row overhead.
pub const ROW_OVERHEAD: u64 = 16;

/// The schema, created in one transaction when `user_version` is 0.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq    INTEGER PRIMARY KEY,
    ts     INTEGER NOT NULL,
    stream TEXT    NOT NULL,
    body   BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mqtt_qos2 (
    pkid INTEGER PRIMARY KEY
);
";

/// When each group commit accepted its events, for the latency the hub
/// measures from here and for the backlog's age: one row per transaction,
/// covering the seqs from `first_seq` up to the next row's. Created by every
/// open, not by the versioned schema: an older agent opening the file
/// ignores it, so the file's version need not change.
pub(super) const ACCEPTS: &str = "
CREATE TABLE IF NOT EXISTS accepts (
    first_seq INTEGER PRIMARY KEY,
    at        INTEGER NOT NULL
);
";

/// Inside a write transaction: forgets the accept times that cover no
/// waiting event any more (all of them once the outbox is empty).
pub(super) fn prune_accepts(conn: &Connection, path: &Path) -> Result<(), OutboxError> {
    conn.prepare_cached(
        "DELETE FROM accepts WHERE first_seq < coalesce(
             (SELECT max(first_seq) FROM accepts
               WHERE first_seq <= (SELECT min(seq) FROM events)),
             (SELECT max(first_seq) + 1 FROM accepts))",
    )
    .and_then(|mut s| s.execute([]))
    .at(path)?;
    Ok(())
}

/// A row's size in SQL; it must agree with [`row_size`]. `octet_length`
/// counts the stream's UTF-8 bytes where `length` would count characters.
pub(super) const SQL_ROW_SIZE: &str = "length(body) + octet_length(stream) + 16";

/// A row's accounted size: the encoded body, the stream name's bytes and
/// [`ROW_OVERHEAD`].
pub(crate) fn row_size(body_len: usize, stream_len: usize) -> u64 {
    body_len as u64 + stream_len as u64 + ROW_OVERHEAD
}

/// The counters in the `meta` table, read and written inside each write
/// transaction so that they always agree with the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Meta {
    pub(super) next_seq: u64,
    pub(super) acked_seq: u64,
    pub(super) total_bytes: u64,
    pub(super) events: u64,
    pub(super) accepted_total: u64,
    pub(super) transactions_total: u64,
    pub(super) evicted_max_bytes: u64,
    pub(super) evicted_max_age: u64,
    pub(super) refused_total: u64,
    pub(super) synchronous: i64,
}

impl Default for Meta {
    fn default() -> Meta {
        Meta {
            next_seq: 1,
            acked_seq: 0,
            total_bytes: 0,
            events: 0,
            accepted_total: 0,
            transactions_total: 0,
            evicted_max_bytes: 0,
            evicted_max_age: 0,
            refused_total: 0,
            synchronous: Synchronous::Full.pragma(),
        }
    }
}

impl Meta {
    pub(super) fn load(conn: &Connection, path: &Path) -> Result<Meta, OutboxError> {
        let mut m = Meta::default();
        let mut stmt = conn
            .prepare_cached("SELECT key, value FROM meta")
            .at(path)?;
        let mut rows = stmt.query([]).at(path)?;
        while let Some(row) = rows.next().at(path)? {
            let key: String = row.get(0).at(path)?;
            let value: i64 = row.get(1).at(path)?;
            // Counters are never negative; a negative value can only come from a
            // hand-edited file and is read as zero rather than wrapped.
            let u = u64::try_from(value).unwrap_or(0);
            match key.as_str() {
                "next_seq" => m.next_seq = u.max(1),
                "acked_seq" => m.acked_seq = u,
                "total_bytes" => m.total_bytes = u,
                "events" => m.events = u,
                "accepted_total" => m.accepted_total = u,
                "transactions_total" => m.transactions_total = u,
                "evicted.max_bytes" => m.evicted_max_bytes = u,
                "evicted.max_age" => m.evicted_max_age = u,
                "evicted.refused" => m.refused_total = u,
                "synchronous" => m.synchronous = value,
                // Keys from a newer minor layout are kept but not understood.
                _ => {}
            }
        }
        Ok(m)
    }

    pub(super) fn store(&self, conn: &Connection, path: &Path) -> Result<(), OutboxError> {
        let mut stmt = conn
            .prepare_cached(
                "INSERT INTO meta (key, value) VALUES
                    ('next_seq', ?1), ('acked_seq', ?2), ('total_bytes', ?3),
                    ('events', ?4), ('accepted_total', ?5), ('transactions_total', ?6),
                    ('evicted.max_bytes', ?7), ('evicted.max_age', ?8),
                    ('evicted.refused', ?9), ('synchronous', ?10)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .at(path)?;
        stmt.execute(params![
            self.next_seq,
            self.acked_seq,
            self.total_bytes,
            self.events,
            self.accepted_total,
            self.transactions_total,
            self.evicted_max_bytes,
            self.evicted_max_age,
            self.refused_total,
            self.synchronous,
        ])
        .at(path)?;
        Ok(())
    }

    /// Removes `count` rows of `bytes` from the totals.
    pub(super) fn remove(&mut self, count: u64, bytes: u64) {
        self.events = self.events.saturating_sub(count);
        self.total_bytes = self.total_bytes.saturating_sub(bytes);
    }
}

/// Starts a write transaction and reads the counters inside it. IMMEDIATE:
/// the write lock is taken at once, so the counters cannot change under the
/// transaction before it commits (a second writer on the file waits).
pub(super) fn begin<'c>(
    conn: &'c mut Connection,
    path: &Path,
) -> Result<(Transaction<'c>, Meta), OutboxError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    let meta = Meta::load(&tx, path)?;
    Ok((tx, meta))
}
