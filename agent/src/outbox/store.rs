//! The outbox over one SQLite file: the writer ([`Outbox`]) and the read-only
//! view for CLI verbs ([`OutboxReader`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_protocols::event::{AgentId, Event, EventBody, Seq, Timestamp};
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OpenFlags, TransactionBehavior};
use serde::{Deserialize, Serialize};
use tracing::{debug, trace};

use super::error::{AtPath, OutboxError};

/// The schema version this build writes, kept in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 1;

/// Bytes added to every row's size for its seq, ts and row overhead.
pub const ROW_OVERHEAD: u64 = 16;

/// How long a statement waits for another connection's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema, created in one transaction when `user_version` is 0.
const SCHEMA: &str = "
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

/// A row's size in SQL; it must agree with [`row_size`]. `octet_length`
/// counts the stream's UTF-8 bytes where `length` would count characters.
const SQL_ROW_SIZE: &str = "length(body) + octet_length(stream) + 16";

/// A row's accounted size: the encoded body, the stream name's bytes and
/// [`ROW_OVERHEAD`].
pub(crate) fn row_size(body_len: usize, stream_len: usize) -> u64 {
    body_len as u64 + stream_len as u64 + ROW_OVERHEAD
}

/// How hard SQLite flushes a commit (`PRAGMA synchronous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Every commit is on disk before it returns: "acknowledged" means durable,
    /// even across a power cut. The default, because gateways lose power.
    #[default]
    Full,
    /// Commits reach the WAL but are not flushed: a power cut may lose the last
    /// commits (a process crash does not). Faster; benchmarks report both.
    Normal,
}

impl Synchronous {
    /// The value of `PRAGMA synchronous` (2 for FULL, 1 for NORMAL).
    fn pragma(self) -> i64 {
        match self {
            Synchronous::Full => 2,
            Synchronous::Normal => 1,
        }
    }

    fn from_pragma(v: i64) -> Synchronous {
        if v == 1 {
            Synchronous::Normal
        } else {
            Synchronous::Full
        }
    }
}

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

/// The counters in the `meta` table, read and written inside each write
/// transaction so that they always agree with the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    next_seq: u64,
    acked_seq: u64,
    total_bytes: u64,
    events: u64,
    accepted_total: u64,
    transactions_total: u64,
    evicted_max_bytes: u64,
    evicted_max_age: u64,
    refused_total: u64,
    synchronous: i64,
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
    fn load(conn: &Connection, path: &Path) -> Result<Meta, OutboxError> {
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

    fn store(&self, conn: &Connection, path: &Path) -> Result<(), OutboxError> {
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
    fn remove(&mut self, count: u64, bytes: u64) {
        self.events = self.events.saturating_sub(count);
        self.total_bytes = self.total_bytes.saturating_sub(bytes);
    }
}

/// What the agent does with an outbox it finds damaged at start
/// (`[outbox] on_corruption`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnCorruption {
    /// Move the damaged file aside (`outbox.db.corrupt-<unix time>`, with its
    /// `-wal`), copy every event still readable from it into a fresh outbox
    /// with its seq, and go on. The default: a gateway keeps collecting, and
    /// the damaged file is kept for whoever wants to look.
    #[default]
    MoveAside,
    /// Refuse to start (exit status 1), for sites that want a person to look
    /// first.
    Stop,
}

/// What [`Outbox::open_recovering`] did with a damaged outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Where the damaged file went.
    pub moved_to: PathBuf,
    /// What was wrong with it.
    pub detail: String,
    /// Events copied into the new outbox, with their seqs.
    pub salvaged: u64,
    /// Events the damaged file claimed to hold, if its counters were
    /// readable.
    pub claimed: Option<u64>,
}

/// Runs `PRAGMA quick_check`: a pass over every page that finds damaged
/// B-trees, about a second per few hundred MB. A file that is not SQLite at
/// all already failed to open.
fn check_integrity(conn: &Connection, path: &Path) -> Result<(), OutboxError> {
    let verdict: String = conn
        .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
        .at(path)?;
    if verdict == "ok" {
        Ok(())
    } else {
        Err(OutboxError::Corrupt {
            path: path.to_owned(),
            detail: verdict,
        })
    }
}

/// A row read back from a damaged file.
struct Salvaged {
    seq: u64,
    ts: i64,
    stream: String,
    body: Vec<u8>,
}

/// Reads what can still be read from a damaged outbox: its counters if they
/// load, and its events scanned from both ends (a damaged page stops a
/// scan; the other direction gets what lies beyond it). Never fails.
fn salvage(path: &Path) -> (Option<Meta>, Vec<Salvaged>, Vec<u16>) {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let Ok(conn) = Connection::open_with_flags(path, flags) else {
        return (None, Vec::new(), Vec::new());
    };
    let meta = Meta::load(&conn, path).ok();
    let mut rows: BTreeMap<u64, Salvaged> = BTreeMap::new();
    for order in ["ASC", "DESC"] {
        let sql = format!("SELECT seq, ts, stream, body FROM events ORDER BY seq {order}");
        let Ok(mut stmt) = conn.prepare(&sql) else {
            continue;
        };
        let Ok(mut it) = stmt.query([]) else { continue };
        while let Ok(Some(row)) = it.next() {
            let r = (|| -> rusqlite::Result<Salvaged> {
                Ok(Salvaged {
                    seq: row.get::<_, i64>(0)? as u64,
                    ts: row.get(1)?,
                    stream: row.get(2)?,
                    body: row.get(3)?,
                })
            })();
            match r {
                // A row is kept only if its body still decodes: the hub
                // would refuse anything else.
                Ok(s) if s.seq > 0 && EventBody::decode(&s.body).is_ok() => {
                    if rows.contains_key(&s.seq) {
                        break;
                    }
                    rows.insert(s.seq, s);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    let qos2: Vec<u16> = conn
        .prepare("SELECT pkid FROM mqtt_qos2")
        .and_then(|mut s| {
            s.query_map([], |r| r.get::<_, i64>(0))
                .map(|it| it.flatten().filter_map(|v| u16::try_from(v).ok()).collect())
        })
        .unwrap_or_default();
    (meta, rows.into_values().collect(), qos2)
}

/// Renames `path` and its `-wal` and `-shm` companions to
/// `<path>.corrupt-<unix seconds>` (plus the companions' suffixes).
fn move_aside(path: &Path) -> Result<PathBuf, OutboxError> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".corrupt-{secs}"));
    let to = PathBuf::from(name);
    let io = |e: std::io::Error| OutboxError::Sqlite {
        path: path.to_owned(),
        source: std::sync::Arc::new(rusqlite::Error::ToSqlConversionFailure(Box::new(e))),
    };
    for suffix in ["", "-wal", "-shm"] {
        let mut from = path.as_os_str().to_owned();
        from.push(suffix);
        let from = PathBuf::from(from);
        if from.exists() {
            let mut dest = to.as_os_str().to_owned();
            dest.push(suffix);
            std::fs::rename(&from, PathBuf::from(dest)).map_err(io)?;
        }
    }
    Ok(to)
}

/// The durable outbox: the one writer of its SQLite file.
///
/// Every method is synchronous and may block on disk; the agent drives it from
/// the group-commit writer thread ([`spawn_writer`](super::spawn_writer)).
#[derive(Debug)]
pub struct Outbox {
    conn: Connection,
    cfg: OutboxConfig,
    agent_id: AgentId,
}

impl Outbox {
    /// Opens the outbox at `cfg.path`, creating the file (not its directory) and
    /// the schema if needed.
    pub fn open(cfg: &OutboxConfig, agent_id: AgentId) -> Result<Outbox, OutboxError> {
        let path = cfg.path.as_path();
        let mut conn = Connection::open(path).at(path)?;
        conn.busy_timeout(BUSY_TIMEOUT).at(path)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .at(path)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(OutboxError::NoWal {
                path: path.to_owned(),
                mode,
            });
        }
        conn.pragma_update(None, "synchronous", cfg.synchronous.pragma())
            .at(path)?;
        conn.set_prepared_statement_cache_capacity(32);
        check_integrity(&conn, path)?;

        // IMMEDIATE: two agents starting on one file must not both create the
        // schema or both trust their own view of next_seq.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at(path)?;
        let version: i64 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .at(path)?;
        if version > SCHEMA_VERSION {
            return Err(OutboxError::NewerSchema {
                path: path.to_owned(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version < SCHEMA_VERSION {
            tx.execute_batch(SCHEMA).at(path)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .at(path)?;
        }
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

    /// Opens the outbox like [`open`](Self::open); if the file is damaged
    /// and `on_corruption` is [`OnCorruption::MoveAside`], moves it aside,
    /// starts a fresh outbox with every event still readable from it (seqs
    /// kept, and `next_seq` never below what the damaged file had assigned,
    /// so no seq is reused) and says what it did.
    pub fn open_recovering(
        cfg: &OutboxConfig,
        agent_id: AgentId,
        on_corruption: OnCorruption,
    ) -> Result<(Outbox, Option<Recovered>), OutboxError> {
        let detail = match Outbox::open(cfg, agent_id.clone()) {
            Ok(o) => return Ok((o, None)),
            Err(OutboxError::Corrupt { detail, .. })
                if on_corruption == OnCorruption::MoveAside =>
            {
                detail
            }
            Err(e) => return Err(e),
        };
        let moved_to = move_aside(&cfg.path)?;
        let (old_meta, rows, qos2) = salvage(&moved_to);
        let mut outbox = Outbox::open(cfg, agent_id)?;
        let path = cfg.path.clone();
        let tx = outbox
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at(&path)?;
        let mut meta = Meta::load(&tx, &path)?;
        {
            let mut insert = tx
                .prepare("INSERT INTO events (seq, ts, stream, body) VALUES (?1, ?2, ?3, ?4)")
                .at(&path)?;
            for r in &rows {
                insert
                    .execute(params![r.seq, r.ts, r.stream, r.body])
                    .at(&path)?;
                meta.events += 1;
                meta.total_bytes += row_size(r.body.len(), r.stream.len());
            }
            let mut q = tx
                .prepare("INSERT OR IGNORE INTO mqtt_qos2 (pkid) VALUES (?1)")
                .at(&path)?;
            for pkid in &qos2 {
                q.execute([pkid]).at(&path)?;
            }
        }
        let max_seq = rows.last().map_or(0, |r| r.seq);
        let min_seq = rows.first().map_or(u64::MAX, |r| r.seq);
        if let Some(old) = old_meta {
            meta.next_seq = old.next_seq;
            meta.accepted_total = old.accepted_total;
            meta.evicted_max_bytes = old.evicted_max_bytes;
            meta.evicted_max_age = old.evicted_max_age;
            meta.refused_total = old.refused_total;
            // Never claim an ack beyond what is salvaged as waiting.
            meta.acked_seq = old.acked_seq.min(min_seq.saturating_sub(1));
        } else if max_seq > 0 {
            meta.acked_seq = min_seq - 1;
        }
        meta.next_seq = meta.next_seq.max(max_seq + 1).max(meta.acked_seq + 1);
        meta.store(&tx, &path)?;
        tx.commit().at(&path)?;
        Ok((
            outbox,
            Some(Recovered {
                moved_to,
                detail,
                salvaged: rows.len() as u64,
                claimed: old_meta.map(|m| m.events),
            }),
        ))
    }

    /// Copies the WAL into the database and truncates it to zero bytes
    /// (`PRAGMA wal_checkpoint(TRUNCATE)`). On a full file system this gives
    /// back the space the WAL holds: SQLite otherwise only restarts the WAL
    /// after a commit succeeded, and every commit fails.
    pub fn reclaim_wal(&mut self) -> Result<(), OutboxError> {
        let path = self.cfg.path.as_path();
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .at(path)
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
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at(path)?;
        let mut meta = Meta::load(&tx, path)?;
        let mut outcomes = Vec::with_capacity(requests.len());
        for (bodies, qos2) in requests {
            outcomes.push(append_one(&tx, &self.cfg, &mut meta, now, bodies, qos2)?);
        }
        meta.transactions_total += 1;
        meta.store(&tx, path)?;
        tx.commit().at(path)?;

        let first = outcomes.iter().find_map(|o| o.first_seq).map(|s| s.0);
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
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at(path)?;
        let mut meta = Meta::load(&tx, path)?;
        let n = expire(&tx, path, &mut meta, cutoff(now, max_age))?;
        if n > 0 {
            meta.store(&tx, path)?;
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
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at(path)?;
        let mut meta = Meta::load(&tx, path)?;
        let n = delete_acked(&tx, path, &mut meta, upto)?;
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
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at(path)?;
        let mut meta = Meta::load(&tx, path)?;
        let resumed = if mark.0 >= meta.next_seq {
            renumber_after(&tx, path, &mut meta, mark)?
        } else if delete {
            Resumed::Acked {
                deleted: delete_acked(&tx, path, &mut meta, mark)?,
            }
        } else {
            return Ok(Resumed::Acked { deleted: 0 });
        };
        tx.commit().at(path)?;
        Ok(resumed)
    }

    /// Up to `max_events` events with a seq greater than `after`, in seq order.
    pub fn read_batch(&self, after: Seq, max_events: usize) -> Result<Vec<Event>, OutboxError> {
        read_batch(
            &self.conn,
            &self.cfg.path,
            &self.agent_id,
            after,
            max_events,
        )
    }

    /// The newest `limit` events, in ascending seq order.
    pub fn tail(&self, limit: usize) -> Result<Vec<Event>, OutboxError> {
        tail(&self.conn, &self.cfg.path, &self.agent_id, limit)
    }

    /// The inbound QoS 2 packet ids stored and not yet released.
    pub fn qos2_pending(&self) -> Result<BTreeSet<u16>, OutboxError> {
        qos2_pending(&self.conn, &self.cfg.path)
    }

    /// A consistent snapshot of the counters.
    pub fn stats(&self) -> Result<OutboxStats, OutboxError> {
        stats(&self.conn, &self.cfg.path)
    }
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
        if !path.exists() {
            return Err(OutboxError::NotFound {
                path: path.to_owned(),
            });
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).at(path)?;
        conn.busy_timeout(BUSY_TIMEOUT).at(path)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .at(path)?;
        if version > SCHEMA_VERSION {
            return Err(OutboxError::NewerSchema {
                path: path.to_owned(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version < 1 {
            return Err(OutboxError::NotAnOutbox {
                path: path.to_owned(),
            });
        }
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

/// One request of a group commit; see [`Outbox::append_many`].
/// Inside `tx`: deletes the events up to and including `upto` and raises
/// the acknowledged watermark in `meta` (never lowers it), storing `meta`
/// when anything changed; the caller commits. How many events were deleted.
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
    let renumbered = tx
        .prepare_cached("UPDATE events SET seq = seq + ?1")
        .and_then(|mut s| s.execute([shift]))
        .at(path)? as u64;
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

/// The `ts` below which events are expired.
fn cutoff(now: Timestamp, max_age: Duration) -> i64 {
    let age = i64::try_from(max_age.as_nanos()).unwrap_or(i64::MAX);
    now.0.saturating_sub(age)
}

/// Deletes the events with `ts < cutoff`, counting them under `max_age`.
fn expire(
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
fn evict_oldest(
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
fn count_and_size(
    conn: &Connection,
    path: &Path,
    cond: &str,
    param: impl rusqlite::ToSql,
) -> Result<(u64, u64), OutboxError> {
    conn.prepare_cached(&format!(
        "SELECT count(*), coalesce(sum({SQL_ROW_SIZE}), 0) FROM events WHERE {cond}"
    ))
    .and_then(|mut s| s.query_row([param], |r| Ok((r.get(0)?, r.get(1)?))))
    .at(path)
}

fn decode_rows(
    stmt: &mut rusqlite::CachedStatement<'_>,
    params: impl rusqlite::Params,
    path: &Path,
    agent_id: &AgentId,
) -> Result<Vec<Event>, OutboxError> {
    let mut rows = stmt.query(params).at(path)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().at(path)? {
        let seq = Seq(row.get(0).at(path)?);
        let corrupt = |reason: String| OutboxError::CorruptBody {
            path: path.to_owned(),
            seq,
            reason,
        };
        let body = match row.get_ref(1).at(path)? {
            // Text is accepted too: a body is only ever bytes, whatever type
            // SQLite was told.
            ValueRef::Blob(bytes) | ValueRef::Text(bytes) => {
                EventBody::decode(bytes).map_err(|e| corrupt(e.to_string()))?
            }
            other => {
                return Err(corrupt(format!(
                    "the body is {:?}, not bytes",
                    other.data_type()
                )))
            }
        };
        out.push(Event {
            agent_id: agent_id.clone(),
            seq,
            body,
        });
    }
    Ok(out)
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn read_batch(
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

fn tail(
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

fn qos2_pending(conn: &Connection, path: &Path) -> Result<BTreeSet<u16>, OutboxError> {
    let mut stmt = conn
        .prepare_cached("SELECT pkid FROM mqtt_qos2 ORDER BY pkid")
        .at(path)?;
    let ids = stmt
        .query_map([], |r| r.get::<_, u16>(0))
        .and_then(|rows| rows.collect::<Result<BTreeSet<u16>, _>>())
        .at(path)?;
    Ok(ids)
}

fn stats(conn: &Connection, path: &Path) -> Result<OutboxStats, OutboxError> {
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
    })
}
