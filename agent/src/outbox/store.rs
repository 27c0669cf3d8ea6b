//! The outbox over one SQLite file: the writer's side ([`Outbox`]), which
//! numbers, stores, acknowledges and evicts events in transactions.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_protocols::event::{AgentId, Event, EventBody, Seq, Timestamp};
use outpost_storage::{AtPath, Synchronous};
use rusqlite::{params, Connection, TransactionBehavior};
use serde::{Deserialize, Serialize};
use tracing::{debug, trace};

use super::error::OutboxError;
use super::evict::{count_and_size, cutoff, evict_oldest, expire};
use super::reads::{self, OutboxStats};
use super::schema::{self, begin, row_size, Meta, SCHEMA, SCHEMA_VERSION};

/// What happens when an append would take the outbox past `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Eviction {
    /// Accept the new events and delete the oldest ones (reason `max_bytes`).
    #[default]
    DropOldest,
    /// Keep what is stored and refuse new events that do not fit (reason
    /// `refused`).
    RefuseNew,
}

/// How to open the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxConfig {
    /// The SQLite file; its directory must exist, the file is created.
    pub path: PathBuf,
    /// Commit durability.
    pub synchronous: Synchronous,
    /// The most bytes of events kept (see [`ROW_OVERHEAD`] for how a row counts).
    pub max_bytes: u64,
    /// Events whose `ts` is older than this are evicted (reason `max_age`).
    pub max_age: Option<Duration>,
    /// What happens at `max_bytes`.
    pub eviction: Eviction,
}

impl OutboxConfig {
    /// The defaults of `[outbox]`: FULL, 2 GiB, 30 days, drop-oldest.
    pub fn new(path: impl Into<PathBuf>) -> OutboxConfig {
        OutboxConfig {
            path: path.into(),
            synchronous: Synchronous::Full,
            max_bytes: 2 << 30,
            max_age: Some(Duration::from_secs(30 * 24 * 3600)),
            eviction: Eviction::DropOldest,
        }
    }
}

/// A change to the set of inbound MQTT QoS 2 packet ids, committed in the same
/// transaction as the events (MQTT 3.1.1 section 4.3.3, method B: the receiver
/// stores the packet id until PUBREL, so a redelivered PUBLISH is recognised and
/// a PUBREL for a known id is answered even after a restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Qos2Op {
    /// A QoS 2 PUBLISH with this packet id was stored; PUBREC may now be sent.
    Received(u16),
    /// The broker released this packet id (PUBREL); PUBCOMP may now be sent.
    Released(u16),
}

/// What one append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct AppendOutcome {
    /// The seq of the first accepted body.
    pub first_seq: Option<Seq>,
    /// The seq of the last accepted body; accepted bodies got
    /// `first_seq..=last_seq`, in order.
    pub last_seq: Option<Seq>,
    /// How many bodies were stored: always a prefix of the request.
    pub accepted: usize,
    /// How many bodies were refused (`refuse-new` only): the rest of the request
    /// after the first body that did not fit.
    pub refused: usize,
    /// How many stored events this append evicted (any reason, possibly some of
    /// its own).
    pub evicted: u64,
}

/// What [`Outbox::resume_after`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumed {
    /// The watermark was a seq of this outbox: this many events up to it
    /// were deleted.
    Acked {
        /// Events deleted.
        deleted: u64,
    },
    /// The watermark was beyond every seq this outbox assigned: the waiting
    /// events were renumbered to follow it.
    Renumbered {
        /// Events renumbered.
        renumbered: u64,
        /// The last seq assigned before.
        last_before: Seq,
        /// The last seq assigned now.
        last: Seq,
    },
}

/// The durable outbox: the one writer of its SQLite file.
///
/// Every method is synchronous and may block on disk; the agent drives it from
/// the group-commit writer thread (`spawn_writer`).
#[derive(Debug)]
pub struct Outbox {
    pub(super) conn: Connection,
    pub(super) cfg: OutboxConfig,
    agent_id: AgentId,
}

/// The outbox connection's page cache (`PRAGMA cache_size`; negative:
/// KiB). SQLite's default is 2 MB; the outbox appends at the end of its
/// tables and reads them in order, so a quarter of that holds the pages it
/// touches, and the agent's whole peak has to stay under 20 MB.
const CACHE_SIZE: i64 = -512;

impl Outbox {
    /// Opens the outbox at `cfg.path`, creating the file (not its directory) and
    /// the schema if needed.
    pub fn open(cfg: &OutboxConfig, agent_id: AgentId) -> Result<Outbox, OutboxError> {
        let path = cfg.path.as_path();
        let mut conn = outpost_storage::open(path, cfg.synchronous)?;
        conn.pragma_update(None, "cache_size", CACHE_SIZE)
            .at(path)?;
        if let Some(detail) = outpost_storage::quick_check(&conn, path)? {
            return Err(OutboxError::Corrupt {
                path: path.to_owned(),
                detail,
            });
        }

        // IMMEDIATE: two agents starting on one file must not both create the
        // schema or both trust their own view of next_seq.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at(path)?;
        outpost_storage::prepare_schema(&tx, path, SCHEMA_VERSION, |tx, _| {
            tx.execute_batch(SCHEMA)
        })?;
        tx.execute_batch(schema::ACCEPTS).at(path)?;
        let mut meta = Meta::load(&tx, path)?;
        // Defence in depth: seqs are never reused, even if meta was damaged.
        let max_seq: Option<u64> = tx
            .query_row("SELECT max(seq) FROM events", [], |r| r.get(0))
            .at(path)?;
        if let Some(max) = max_seq {
            meta.next_seq = meta.next_seq.max(max + 1);
        }
        meta.next_seq = meta.next_seq.max(meta.acked_seq + 1);
        meta.synchronous = cfg.synchronous.pragma();
        meta.store(&tx, path)?;
        tx.commit().at(path)?;
        debug!(path = %path.display(), next_seq = meta.next_seq, events = meta.events, "Outbox opened.");
        Ok(Outbox {
            conn,
            cfg: cfg.clone(),
            agent_id,
        })
    }

    /// Copies the WAL into the database and truncates it to zero bytes
    /// (`PRAGMA wal_checkpoint(TRUNCATE)`). On a full file system this gives
    /// back the space the WAL holds: SQLite otherwise only restarts the WAL
    /// after a commit succeeded, and every commit fails.
    pub fn reclaim_wal(&mut self) -> Result<(), OutboxError> {
        let path = self.cfg.path.as_path();
        Ok(self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .at(path)?)
    }

    /// The configuration in force: as opened, with any limits the fleet
    /// policy set since ([`set_limits`](Self::set_limits)).
    pub fn config(&self) -> &OutboxConfig {
        &self.cfg
    }

    /// Replaces the buffer limits (the fleet policy's `[[buffer]]` overrides
    /// the local `[outbox]` settings); they apply from the next append or
    /// age eviction on.
    pub fn set_limits(&mut self, max_bytes: u64, max_age: Option<Duration>, eviction: Eviction) {
        self.cfg.max_bytes = max_bytes;
        self.cfg.max_age = max_age;
        self.cfg.eviction = eviction;
    }

    /// Stores `bodies` and applies `qos2` in one transaction; see
    /// [`append_many`](Outbox::append_many).
    pub fn append(
        &mut self,
        now: Timestamp,
        bodies: &[EventBody],
        qos2: &[Qos2Op],
    ) -> Result<AppendOutcome, OutboxError> {
        let mut outcomes = self.append_many(now, &[(bodies, qos2)])?;
        Ok(outcomes.pop().unwrap_or_default())
    }

    /// Carries out several append requests in ONE transaction (group commit)
    /// and returns one outcome per request, in order.
    ///
    /// Each request, in turn: evicts events older than `now - max_age`; applies
    /// its QoS 2 operations; assigns seqs to its bodies and inserts them
    /// (`refuse-new`: the first body that would take the total past `max_bytes`
    /// and every body after it in the request are refused); then (`drop-oldest`)
    /// evicts the oldest events until the total is within `max_bytes`. Grouping
    /// therefore changes how many transactions run, never an outcome. On error
    /// the transaction is rolled back and no request took effect.
    pub fn append_many(
        &mut self,
        now: Timestamp,
        requests: &[(&[EventBody], &[Qos2Op])],
    ) -> Result<Vec<AppendOutcome>, OutboxError> {
        let path = self.cfg.path.as_path();
        let (tx, mut meta) = begin(&mut self.conn, path)?;
        let mut outcomes = Vec::with_capacity(requests.len());
        for (bodies, qos2) in requests {
            outcomes.push(append_one(&tx, &self.cfg, &mut meta, now, bodies, qos2)?);
        }
        meta.transactions_total += 1;
        meta.store(&tx, path)?;
        let first = outcomes.iter().find_map(|o| o.first_seq).map(|s| s.0);
        if let Some(first) = first {
            tx.prepare_cached("INSERT OR REPLACE INTO accepts (first_seq, at) VALUES (?1, ?2)")
                .and_then(|mut s| s.execute(params![first, now.0]))
                .at(path)?;
        }
        if outcomes.iter().any(|o| o.evicted > 0) {
            schema::prune_accepts(&tx, path)?;
        }
        tx.commit().at(path)?;

        let last = outcomes.iter().rev().find_map(|o| o.last_seq).map(|s| s.0);
        debug!(
            requests = outcomes.len(),
            accepted = outcomes.iter().map(|o| o.accepted).sum::<usize>(),
            refused = outcomes.iter().map(|o| o.refused).sum::<usize>(),
            evicted = outcomes.iter().map(|o| o.evicted).sum::<u64>(),
            first_seq = ?first,
            last_seq = ?last,
            "Outbox batch committed."
        );
        Ok(outcomes)
    }

    /// Deletes events whose `ts` is older than `now - max_age` (reason
    /// `max_age`) and returns how many.
    pub fn evict_expired(&mut self, now: Timestamp) -> Result<u64, OutboxError> {
        let Some(max_age) = self.cfg.max_age else {
            return Ok(0);
        };
        let path = self.cfg.path.as_path();
        let (tx, mut meta) = begin(&mut self.conn, path)?;
        let n = expire(&tx, path, &mut meta, cutoff(now, max_age))?;
        if n > 0 {
            meta.store(&tx, path)?;
            schema::prune_accepts(&tx, path)?;
            tx.commit().at(path)?;
            debug!(
                evicted = n,
                reason = "max_age",
                "Outbox evicted expired events."
            );
        }
        Ok(n)
    }

    /// Deletes the events up to and including `upto`, which the hub has made
    /// durable, and raises the acknowledged watermark (never lowers it).
    /// Returns how many events were deleted.
    pub fn ack(&mut self, upto: Seq) -> Result<u64, OutboxError> {
        let path = self.cfg.path.as_path();
        let (tx, mut meta) = begin(&mut self.conn, path)?;
        let n = delete_acked(&tx, path, &mut meta, upto)?;
        if n > 0 {
            schema::prune_accepts(&tx, path)?;
        }
        tx.commit().at(path)?;
        Ok(n)
    }

    /// Applies the watermark a hub sent in its `Welcome`: the hub durably
    /// holds every seq of this agent up to `watermark`.
    ///
    /// Normally `watermark` is a seq this outbox assigned, and this is
    /// [`ack`](Self::ack). A watermark beyond every seq it ever assigned means
    /// the hub's history is not this outbox's: a gateway replaced under the
    /// same agent id, a data directory wiped or restored from a backup. Then
    /// the events still waiting here are not the ones the hub holds under
    /// their seqs, and acknowledging them would delete them unsent, while new
    /// events would reuse seqs the hub drops as duplicates. So the waiting
    /// events are renumbered, in order, to start right after `watermark`,
    /// and numbering continues from there: nothing is lost; events delivered
    /// before a backup was taken may reach the hub twice.
    pub fn resume_after(&mut self, watermark: Seq) -> Result<Resumed, OutboxError> {
        self.apply_hub_mark(watermark, true)
    }

    /// Applies a hub's `Stored` mark (protocol version 3): the hub's store
    /// holds every seq of this agent up to `held`, though a sink has not
    /// accepted them all, so nothing is deleted. Within what this outbox
    /// assigned it changes nothing here (the uplink just reads on after
    /// it); beyond, the hub's history is not this outbox's, and the waiting
    /// events are renumbered to follow `held` for the reasons
    /// [`resume_after`](Self::resume_after) gives.
    pub fn follow(&mut self, held: Seq) -> Result<Resumed, OutboxError> {
        self.apply_hub_mark(held, false)
    }

    /// A hub's mark within what this outbox assigned: deleted up to it when
    /// `delete` (a watermark); beyond: renumbered to follow it.
    fn apply_hub_mark(&mut self, mark: Seq, delete: bool) -> Result<Resumed, OutboxError> {
        let path = self.cfg.path.as_path();
        let (tx, mut meta) = begin(&mut self.conn, path)?;
        let resumed = if mark.0 >= meta.next_seq {
            renumber_after(&tx, path, &mut meta, mark)?
        } else if delete {
            let deleted = delete_acked(&tx, path, &mut meta, mark)?;
            schema::prune_accepts(&tx, path)?;
            Resumed::Acked { deleted }
        } else {
            return Ok(Resumed::Acked { deleted: 0 });
        };
        tx.commit().at(path)?;
        Ok(resumed)
    }

    /// Up to `max_events` events with a seq greater than `after`, in seq order.
    pub fn read_batch(&self, after: Seq, max_events: usize) -> Result<Vec<Event>, OutboxError> {
        reads::read_batch(
            &self.conn,
            &self.cfg.path,
            &self.agent_id,
            after,
            max_events,
        )
    }

    /// When the events from `after + 1` to `last` were accepted: (first
    /// seq, Unix ns) for each group commit that covers some of them, the
    /// first at or before `after + 1`, in seq order.
    pub fn accepted_at(&self, after: Seq, last: Seq) -> Result<Vec<(Seq, i64)>, OutboxError> {
        reads::accepted_at(&self.conn, &self.cfg.path, after, last)
    }

    /// The newest `limit` events, in ascending seq order.
    pub fn tail(&self, limit: usize) -> Result<Vec<Event>, OutboxError> {
        reads::tail(&self.conn, &self.cfg.path, &self.agent_id, limit)
    }

    /// The inbound QoS 2 packet ids stored and not yet released.
    pub fn qos2_pending(&self) -> Result<BTreeSet<u16>, OutboxError> {
        reads::qos2_pending(&self.conn, &self.cfg.path)
    }

    /// A consistent snapshot of the counters.
    pub fn stats(&self) -> Result<OutboxStats, OutboxError> {
        reads::stats(&self.conn, &self.cfg.path)
    }
}

/// Renumbers every waiting event, in order, to start right after `after`,
/// a seq at or beyond every seq this outbox assigned, and numbers new events
/// from there. Nothing at or below `after` waits here afterwards, so it
/// counts as acknowledged.
fn renumber_after(
    tx: &Connection,
    path: &Path,
    meta: &mut Meta,
    after: Seq,
) -> Result<Resumed, OutboxError> {
    let first: Option<u64> = tx
        .query_row("SELECT min(seq) FROM events", [], |r| r.get(0))
        .at(path)?;
    let waiting = meta.next_seq - first.unwrap_or(meta.next_seq);
    // New seqs start at after + 1; every old one is at most next_seq - 1 <=
    // after, so no renumbered row meets an old one. A hub naming a seq near
    // u64::MAX cannot be followed.
    let Some(next) = after
        .0
        .checked_add(1)
        .and_then(|n| n.checked_add(waiting))
        .filter(|n| i64::try_from(*n).is_ok())
    else {
        return Err(OutboxError::SeqOverflow { after });
    };
    let shift = after.0 + 1 - first.unwrap_or(meta.next_seq);
    // The accept times move with their events. The row that covers the
    // first waiting event may start before it; it is made to start at it, so
    // that every row lies in first..next_seq and, shifted by at least the
    // width of that range, meets no row still unshifted.
    schema::prune_accepts(tx, path)?;
    if let Some(first) = first {
        tx.prepare_cached("UPDATE accepts SET first_seq = ?1 WHERE first_seq < ?1")
            .and_then(|mut s| s.execute([first]))
            .at(path)?;
    }
    let renumbered = tx
        .prepare_cached("UPDATE events SET seq = seq + ?1")
        .and_then(|mut s| s.execute([shift]))
        .at(path)? as u64;
    tx.prepare_cached("UPDATE accepts SET first_seq = first_seq + ?1")
        .and_then(|mut s| s.execute([shift]))
        .at(path)?;
    let from = Seq(meta.next_seq - 1);
    meta.next_seq = next;
    meta.acked_seq = after.0;
    meta.store(tx, path)?;
    Ok(Resumed::Renumbered {
        renumbered,
        last_before: from,
        last: Seq(meta.next_seq - 1),
    })
}

/// Inside `tx`: deletes the events up to and including `upto` and raises
/// the acknowledged watermark in `meta` (never lowers it), storing `meta`
/// when anything changed; the caller commits. How many events were deleted.
fn delete_acked(
    tx: &Connection,
    path: &Path,
    meta: &mut Meta,
    upto: Seq,
) -> Result<u64, OutboxError> {
    let last = meta.next_seq - 1;
    if upto.0 > last {
        return Err(OutboxError::AckBeyondEnd {
            acked: upto,
            last: Seq(last),
        });
    }
    if upto.0 <= meta.acked_seq {
        // Everything up to the watermark was deleted when it was acked.
        return Ok(0);
    }
    let (n, bytes) = count_and_size(tx, path, "seq <= ?1", upto.0)?;
    tx.prepare_cached("DELETE FROM events WHERE seq <= ?1")
        .and_then(|mut s| s.execute([upto.0]))
        .at(path)?;
    meta.remove(n, bytes);
    meta.acked_seq = upto.0;
    meta.store(tx, path)?;
    debug!(
        acked_seq = upto.0,
        deleted = n,
        "Outbox acknowledged events."
    );
    Ok(n)
}

/// One request of a group commit; see [`Outbox::append_many`].
fn append_one(
    conn: &Connection,
    cfg: &OutboxConfig,
    meta: &mut Meta,
    now: Timestamp,
    bodies: &[EventBody],
    qos2: &[Qos2Op],
) -> Result<AppendOutcome, OutboxError> {
    let path = cfg.path.as_path();
    let mut out = AppendOutcome::default();
    if let Some(max_age) = cfg.max_age {
        // Expired rows go first so that they, not fresh ones, make room.
        out.evicted += expire(conn, path, meta, cutoff(now, max_age))?;
    }
    for op in qos2 {
        match *op {
            Qos2Op::Received(pkid) => conn
                .prepare_cached("INSERT OR IGNORE INTO mqtt_qos2 (pkid) VALUES (?1)")
                .and_then(|mut s| s.execute([pkid])),
            Qos2Op::Released(pkid) => conn
                .prepare_cached("DELETE FROM mqtt_qos2 WHERE pkid = ?1")
                .and_then(|mut s| s.execute([pkid])),
        }
        .at(path)?;
    }
    let mut insert = conn
        .prepare_cached("INSERT INTO events (seq, ts, stream, body) VALUES (?1, ?2, ?3, ?4)")
        .at(path)?;
    for body in bodies {
        let bytes = body.encode();
        let stream = body.stream.as_str();
        let size = row_size(bytes.len(), stream.len());
        if cfg.eviction == Eviction::RefuseNew
            && (out.refused > 0 || meta.total_bytes.saturating_add(size) > cfg.max_bytes)
        {
            out.refused += 1;
            continue;
        }
        let seq = meta.next_seq;
        insert
            .execute(params![seq, body.ts.0, stream, bytes])
            .at(path)?;
        trace!(seq, size, "Outbox stored event.");
        meta.next_seq += 1;
        meta.total_bytes += size;
        meta.events += 1;
        meta.accepted_total += 1;
        out.first_seq.get_or_insert(Seq(seq));
        out.last_seq = Some(Seq(seq));
        out.accepted += 1;
    }
    meta.refused_total += out.refused as u64;
    if cfg.eviction == Eviction::DropOldest && meta.total_bytes > cfg.max_bytes {
        out.evicted += evict_oldest(conn, path, meta, cfg.max_bytes)?;
    }
    Ok(out)
}
