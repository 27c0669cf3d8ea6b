//! The store over one SQLite file: the writer ([`Store`]) and the read-only
//! view for the operator verbs ([`StoreReader`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_protocols::event::{AgentId, Event, EventBody, Seq, Timestamp};
use outpost_protocols::topic::TopicFilter;
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OpenFlags, Transaction, TransactionBehavior};
use serde::Serialize;
use tracing::debug;

use super::error::{AtPath, StoreError};
use super::registry::{self, AgentRecord};
use super::sinkq::{Forward, SinkProgress};

/// The schema version this build writes, kept in `PRAGMA user_version`.
/// Version 2 added the policy versions, the audit log and the agents'
/// policy columns; a version 1 file is migrated when opened.
pub const SCHEMA_VERSION: i64 = 3;

/// The store's file name inside the hub's `data_dir`.
pub const FILE_NAME: &str = "hub.db";

/// How long a statement waits for another connection's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema, created in one transaction when `user_version` is 0.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    agent_id TEXT    NOT NULL,
    seq      INTEGER NOT NULL,
    ts       INTEGER NOT NULL,
    stream   TEXT    NOT NULL,
    body     BLOB    NOT NULL,
    PRIMARY KEY (agent_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS agents (
    agent_id         TEXT    NOT NULL PRIMARY KEY,
    labels           TEXT    NOT NULL DEFAULT '{}',
    first_seen       INTEGER NOT NULL,
    last_seen        INTEGER NOT NULL,
    agent_version    TEXT,
    protocol_version INTEGER,
    watermark        INTEGER NOT NULL DEFAULT 0,
    backlog_events   INTEGER,
    backlog_bytes    INTEGER,
    connected        INTEGER NOT NULL DEFAULT 0,
    policy_version   INTEGER
) WITHOUT ROWID;
";

/// From schema version 1 to 2: policies, the audit log, per-agent policy
/// counters.
const MIGRATE_2: &str = "
ALTER TABLE agents ADD COLUMN policy_error TEXT;
ALTER TABLE agents ADD COLUMN policy_dropped INTEGER NOT NULL DEFAULT 0;
ALTER TABLE agents ADD COLUMN policy_modified INTEGER NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS policies (
    version    INTEGER PRIMARY KEY,
    applied_at INTEGER NOT NULL,
    actor      TEXT    NOT NULL,
    source     TEXT    NOT NULL,
    digest     TEXT    NOT NULL,
    text       TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id     INTEGER PRIMARY KEY,
    ts     INTEGER NOT NULL,
    actor  TEXT    NOT NULL,
    action TEXT    NOT NULL,
    target TEXT    NOT NULL,
    result TEXT    NOT NULL,
    detail TEXT    NOT NULL,
    prev   TEXT    NOT NULL,
    hash   TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
";

/// Refuses a file written by a newer hub.
fn refuse_newer(path: &Path, version: i64) -> Result<(), StoreError> {
    if version > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            path: path.to_owned(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

/// Creates or migrates the schema inside `tx` (an IMMEDIATE transaction, so
/// that two processes opening one file do not both do it). Refuses a newer
/// schema.
pub(crate) fn prepare_schema(tx: &Transaction<'_>, path: &Path) -> Result<(), StoreError> {
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .at(path)?;
    refuse_newer(path, version)?;
    if version < 1 {
        tx.execute_batch(SCHEMA).at(path)?;
    }
    if version < 2 {
        tx.execute_batch(MIGRATE_2).at(path)?;
    }
    if version < 3 {
        tx.execute_batch(super::sinkq::MIGRATE_3).at(path)?;
    }
    if version < SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .at(path)?;
    }
    Ok(())
}

/// A read-write connection in WAL mode with the busy timeout.
fn connect(path: &Path, synchronous: Synchronous) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).at(path)?;
    conn.busy_timeout(BUSY_TIMEOUT).at(path)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .at(path)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::NoWal {
            path: path.to_owned(),
            mode,
        });
    }
    conn.pragma_update(None, "synchronous", synchronous.pragma())
        .at(path)?;
    Ok(conn)
}

/// A read-write connection for the operator verbs that write while the hub
/// runs (`policy apply`, the audit log of `ca issue`): the schema is created
/// or migrated if needed, but nothing else is touched (unlike [`Store::open`],
/// which declares every agent disconnected). Writes wait for the hub's
/// transactions through the busy timeout; every commit is FULL.
pub fn open_admin(path: &Path) -> Result<Connection, StoreError> {
    let mut conn = connect(path, Synchronous::Full)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    prepare_schema(&tx, path)?;
    tx.commit().at(path)?;
    Ok(conn)
}

/// What the policy did to a batch before it was stored, added to the agent's
/// counters in the same transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct PolicyCounts {
    /// Events the hub dropped (denied, local, residency, downsampled, over a
    /// drop limit).
    pub dropped: u64,
    /// Events the hub changed (minimised) before storing them.
    pub modified: u64,
}

/// The store file of a hub whose config file is `config_file` and whose
/// `[hub] data_dir` is `data_dir`: `<data_dir>/hub.db`, with a relative
/// `data_dir` taken relative to the config file's folder (as every relative
/// path in a config is). The hub and its operator verbs both use this.
pub fn store_path(config_file: &Path, data_dir: &Path) -> PathBuf {
    let base = config_file.parent().unwrap_or(Path::new(""));
    // `join` keeps an absolute `data_dir` as it is.
    base.join(data_dir).join(FILE_NAME)
}

/// How hard SQLite flushes a commit (`PRAGMA synchronous`), from
/// `[store] synchronous`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Every commit is on disk before it returns, so an acknowledged batch
    /// survives a power cut. The default.
    #[default]
    Full,
    /// Commits reach the WAL but are not flushed: a power cut may lose the last
    /// commits, which the agents have already deleted after the ack. A process
    /// crash loses nothing. Faster; benchmarks report both.
    Normal,
}

impl Synchronous {
    /// Parses the config value `full` or `normal`.
    pub fn parse(s: &str) -> Option<Synchronous> {
        match s {
            "full" => Some(Synchronous::Full),
            "normal" => Some(Synchronous::Normal),
            _ => None,
        }
    }

    /// The value of `PRAGMA synchronous` (2 for FULL, 1 for NORMAL).
    fn pragma(self) -> i64 {
        match self {
            Synchronous::Full => 2,
            Synchronous::Normal => 1,
        }
    }
}

/// What one insert request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct InsertOutcome {
    /// The agent's watermark after this request: the highest seq the store
    /// holds for it. Never lower than before, and at least the request's
    /// highest seq.
    pub watermark: Seq,
    /// Events that were new and are now stored.
    pub inserted: u64,
    /// Events the store already held, ignored. The hub sessions drop replays
    /// before they get here, so these only come from two sessions of one
    /// agent overlapping.
    pub duplicates: u64,
    /// What may be acknowledged to the agent: the watermark, or less while
    /// an event of its is still waiting for a sink.
    pub acked: Seq,
}

impl Default for InsertOutcome {
    /// Nothing stored, watermark 0.
    fn default() -> InsertOutcome {
        InsertOutcome {
            watermark: Seq(0),
            inserted: 0,
            duplicates: 0,
            acked: Seq(0),
        }
    }
}

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

/// One change of a group commit; see [`Store::apply`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Op<'a> {
    /// Store events of one agent and raise its watermark to at least
    /// `through`.
    Insert {
        agent_id: &'a AgentId,
        events: &'a [(Seq, EventBody)],
        forward: &'a [Forward],
        through: Seq,
        policy: PolicyCounts,
    },
    /// A sink runner's delivery attempt.
    SinkProgress {
        sink: &'a str,
        progress: &'a SinkProgress,
    },
    /// The agent reported the policy version it runs.
    PolicyStatus {
        agent_id: &'a AgentId,
        version: u64,
        error: Option<&'a str>,
    },
    /// A session of the agent started.
    Connected {
        agent_id: &'a AgentId,
        labels: &'a BTreeMap<String, String>,
        agent_version: &'a str,
        protocol_version: u16,
    },
    /// A session of the agent ended.
    Disconnected { agent_id: &'a AgentId },
    /// The agent reported its outbox backlog.
    Backlog {
        agent_id: &'a AgentId,
        events: u64,
        bytes: u64,
    },
    /// The agent was heard from.
    Touch { agent_id: &'a AgentId },
}

/// The durable store: the one writer of its SQLite file.
///
/// Every method is synchronous and may block on disk; the hub drives it from
/// the group-commit writer thread
/// ([`spawn_store_writer`](super::spawn_store_writer)).
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
    transactions: u64,
}

impl Store {
    /// Opens the store at `path`, creating the file (not its directory) and the
    /// schema if needed.
    ///
    /// Opening for writing also declares every agent disconnected: only the
    /// hub writes the store, and a hub that is starting has no sessions yet,
    /// whatever a killed predecessor left behind.
    pub fn open(path: &Path, synchronous: Synchronous) -> Result<Store, StoreError> {
        let mut conn = connect(path, synchronous)?;
        conn.set_prepared_statement_cache_capacity(32);

        // IMMEDIATE: two processes opening one file must not both create the
        // schema.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at(path)?;
        prepare_schema(&tx, path)?;
        let stale = registry::reset_connections(&tx, path)?;
        tx.commit().at(path)?;
        debug!(path = %path.display(), stale_sessions = stale, "Hub store opened.");
        Ok(Store {
            conn,
            path: path.to_owned(),
            transactions: 0,
        })
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write transactions committed since the store was opened (a group
    /// commit counts once).
    pub fn transactions(&self) -> u64 {
        self.transactions
    }

    /// Stores each agent's events and raises its watermark, all in ONE
    /// transaction, and returns one outcome per entry, in order.
    ///
    /// Rows are inserted with `INSERT OR IGNORE` keyed by `(agent_id, seq)`, so
    /// an event the store already holds is counted as a duplicate and left
    /// as it is. Each agent's watermark becomes the larger of its old value
    /// and the entry's highest seq; it is never lowered. `now` is the agent's
    /// `last_seen`; an agent the registry did not know gets a row. On error
    /// nothing was stored. Seqs must lie in `1..=i64::MAX`
    /// ([`StoreError::SeqOutOfRange`], checked before the transaction).
    pub fn insert(
        &mut self,
        now: Timestamp,
        batches: &[(AgentId, Vec<(Seq, EventBody)>)],
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        let ops: Vec<Op<'_>> = batches
            .iter()
            .map(|(agent_id, events)| Op::Insert {
                agent_id,
                events,
                forward: &[],
                through: Seq(0),
                policy: PolicyCounts::default(),
            })
            .collect();
        Ok(self
            .apply(now, &ops)?
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect())
    }

    /// Records that a session of `agent_id` started: its labels and versions
    /// replace the old ones, `last_seen` becomes `now` (and `first_seen` too
    /// for a new agent), and the agent counts as connected until as many
    /// [`agent_disconnected`](Self::agent_disconnected) calls.
    pub fn agent_connected(
        &mut self,
        agent_id: &AgentId,
        labels: &BTreeMap<String, String>,
        agent_version: &str,
        protocol_version: u16,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let op = Op::Connected {
            agent_id,
            labels,
            agent_version,
            protocol_version,
        };
        self.apply(now, &[op]).map(drop)
    }

    /// Records that a session of `agent_id` ended at `now`.
    pub fn agent_disconnected(
        &mut self,
        agent_id: &AgentId,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.apply(now, &[Op::Disconnected { agent_id }]).map(drop)
    }

    /// Records the outbox backlog `agent_id` reported (events, bytes). An
    /// agent the registry does not know is ignored: it reports only after its
    /// `Hello`.
    pub fn report_backlog(
        &mut self,
        agent_id: &AgentId,
        events: u64,
        bytes: u64,
    ) -> Result<(), StoreError> {
        // A backlog report does not move `last_seen`, so no time is needed.
        self.apply(
            Timestamp(0),
            &[Op::Backlog {
                agent_id,
                events,
                bytes,
            }],
        )
        .map(drop)
    }

    /// Sets `agent_id`'s `last_seen` to `now`.
    pub fn touch(&mut self, agent_id: &AgentId, now: Timestamp) -> Result<(), StoreError> {
        self.apply(now, &[Op::Touch { agent_id }]).map(drop)
    }

    /// Checks an operation before it joins a transaction, so that one bad
    /// request cannot fail the others of its group.
    pub(crate) fn check(&self, op: &Op<'_>) -> Result<(), StoreError> {
        if let Op::Insert {
            agent_id,
            events,
            through,
            ..
        } = op
        {
            let bad = |seq: &Seq| seq.0 == 0 || i64::try_from(seq.0).is_err();
            if let Some(seq) = events
                .iter()
                .map(|(seq, _)| seq)
                .chain(Some(through).filter(|t| t.0 != 0))
                .find(|seq| bad(seq))
            {
                return Err(StoreError::SeqOutOfRange {
                    path: self.path.clone(),
                    agent_id: (*agent_id).clone(),
                    seq: *seq,
                });
            }
        }
        Ok(())
    }

    /// Carries out `ops` in order in ONE transaction (group commit) and
    /// returns, per op, the insert outcome (`None` for registry changes). On
    /// error the transaction is rolled back and no op took effect.
    pub(crate) fn apply(
        &mut self,
        now: Timestamp,
        ops: &[Op<'_>],
    ) -> Result<Vec<Option<InsertOutcome>>, StoreError> {
        for op in ops {
            self.check(op)?;
        }
        let path = self.path.as_path();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at(path)?;
        let mut outcomes = Vec::with_capacity(ops.len());
        for op in ops {
            outcomes.push(apply_one(&tx, path, now, op)?);
        }
        tx.commit().at(path)?;
        self.transactions += 1;
        Ok(outcomes)
    }

    /// The highest seq stored for `agent_id`, 0 if none: below it the hub
    /// ignores what the agent sends again.
    pub fn watermark(&self, agent_id: &AgentId) -> Result<Seq, StoreError> {
        registry::watermark(&self.conn, &self.path, agent_id)
    }

    /// What may be acknowledged to `agent_id`: its watermark, or less while
    /// one of its events waits for a sink. Where its next session resumes.
    pub fn acked(&self, agent_id: &AgentId) -> Result<Seq, StoreError> {
        let w = self.watermark(agent_id)?;
        super::sinkq::acked(&self.conn, &self.path, agent_id, w)
    }

    /// See [`StoreReader::events_tail`].
    pub fn events_tail(
        &self,
        agent: Option<&AgentId>,
        stream_pattern: Option<&TopicFilter>,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        events_tail(&self.conn, &self.path, agent, stream_pattern, limit)
    }

    /// See [`StoreReader::events_stats`].
    pub fn events_stats(
        &self,
        agent: Option<&AgentId>,
    ) -> Result<Vec<AgentEventStats>, StoreError> {
        events_stats(&self.conn, &self.path, agent)
    }

    /// See [`StoreReader::fleet`].
    pub fn fleet(&self) -> Result<Vec<AgentRecord>, StoreError> {
        registry::fleet(&self.conn, &self.path)
    }

    /// Stores `events` and queues `forward` for their sinks, in one
    /// transaction, as the hub's sessions do through the writer (tests and
    /// tools).
    pub fn insert_routed(
        &mut self,
        now: Timestamp,
        agent_id: &AgentId,
        events: &[(Seq, EventBody)],
        forward: &[Forward],
        through: Seq,
    ) -> Result<InsertOutcome, StoreError> {
        let op = Op::Insert {
            agent_id,
            events,
            forward,
            through,
            policy: PolicyCounts::default(),
        };
        self.check(&op)?;
        Ok(self.apply(now, &[op])?.pop().flatten().unwrap_or_default())
    }

    /// Deletes the queues of sinks that are not in `configured`, auditing
    /// each; the hub does this at start. Returns (sink, events dropped).
    pub fn drop_unconfigured_sinks(
        &mut self,
        configured: &[String],
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .at(&path)?;
        let gone = super::sinkq::drop_unconfigured(&tx, &path, super::writer::now(), configured)?;
        tx.commit().at(&path)?;
        Ok(gone)
    }

    /// Records a sink's delivery attempt in its own transaction (tests and
    /// tools; the hub goes through the writer).
    pub fn sink_progress(&mut self, sink: &str, progress: &SinkProgress) -> Result<(), StoreError> {
        self.apply(super::writer::now(), &[Op::SinkProgress { sink, progress }])
            .map(drop)
    }
}

/// One op of a group commit; see [`Store::apply`].
fn apply_one(
    tx: &Transaction<'_>,
    path: &Path,
    now: Timestamp,
    op: &Op<'_>,
) -> Result<Option<InsertOutcome>, StoreError> {
    match op {
        Op::Insert {
            agent_id,
            events,
            forward,
            through,
            policy,
        } => insert_one(tx, path, now, agent_id, events, forward, *through, *policy).map(Some),
        Op::SinkProgress { sink, progress } => {
            super::sinkq::progress(tx, path, now, sink, progress).map(|()| None)
        }
        Op::PolicyStatus {
            agent_id,
            version,
            error,
        } => registry::policy_status(tx, path, agent_id, *version, *error).map(|()| None),
        Op::Connected {
            agent_id,
            labels,
            agent_version,
            protocol_version,
        } => registry::connected(
            tx,
            path,
            agent_id,
            labels,
            agent_version,
            *protocol_version,
            now,
        )
        .map(|()| None),
        Op::Disconnected { agent_id } => {
            registry::disconnected(tx, path, agent_id, now).map(|()| None)
        }
        Op::Backlog {
            agent_id,
            events,
            bytes,
        } => registry::backlog(tx, path, agent_id, *events, *bytes).map(|()| None),
        Op::Touch { agent_id } => registry::touch(tx, path, agent_id, now).map(|()| None),
    }
}

#[allow(clippy::too_many_arguments)]
fn insert_one(
    tx: &Transaction<'_>,
    path: &Path,
    now: Timestamp,
    agent_id: &AgentId,
    events: &[(Seq, EventBody)],
    forward: &[Forward],
    through: Seq,
    policy: PolicyCounts,
) -> Result<InsertOutcome, StoreError> {
    if policy != PolicyCounts::default() {
        registry::count_policy(tx, path, agent_id, policy)?;
    }
    let max_seq = events
        .iter()
        .map(|(seq, _)| *seq)
        .chain(forward.iter().map(|f| f.seq))
        .max()
        .unwrap_or(Seq(0))
        .max(through);
    let before = registry::watermark(tx, path, agent_id)?;
    if max_seq == Seq(0) {
        return Ok(InsertOutcome {
            watermark: before,
            acked: super::sinkq::acked(tx, path, agent_id, before)?,
            ..InsertOutcome::default()
        });
    }
    // A sink's copy is queued once: what the watermark already covers was
    // queued (or delivered) before, unlike a stored row, which the primary
    // key deduplicates.
    let fresh: Vec<&Forward> = forward.iter().filter(|f| f.seq > before).collect();
    super::sinkq::queue(tx, path, now, agent_id, &fresh)?;
    let mut out = InsertOutcome::default();
    let mut insert = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO events (agent_id, seq, ts, stream, body)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .at(path)?;
    for (seq, body) in events {
        let changed = insert
            .execute(params![
                agent_id.as_str(),
                seq.0,
                body.ts.0,
                body.stream.as_str(),
                body.encode()
            ])
            .at(path)?;
        if changed == 0 {
            out.duplicates += 1;
        } else {
            out.inserted += 1;
        }
    }
    out.watermark = registry::raise_watermark(tx, path, agent_id, max_seq, now)?;
    out.acked = super::sinkq::acked(tx, path, agent_id, out.watermark)?;
    Ok(out)
}

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
        if !path.exists() {
            return Err(StoreError::NotFound {
                path: path.to_owned(),
            });
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).at(path)?;
        conn.busy_timeout(BUSY_TIMEOUT).at(path)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .at(path)?;
        refuse_newer(path, version)?;
        if version < 1 {
            return Err(StoreError::NotAStore {
                path: path.to_owned(),
            });
        }
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

    /// The fleet registry, ordered by agent id.
    pub fn fleet(&self) -> Result<Vec<AgentRecord>, StoreError> {
        registry::fleet(&self.conn, &self.path)
    }

    /// The first at most `limit` events waiting for `sink`, oldest first.
    pub fn sink_batch(&self, sink: &str, limit: usize) -> Result<Vec<super::Queued>, StoreError> {
        super::sinkq::batch(&self.conn, &self.path, sink, None, limit)
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
    ) -> Result<Vec<super::Queued>, StoreError> {
        super::sinkq::batch(&self.conn, &self.path, sink, Some(after), limit)
    }

    /// Every sink's queue and counters (with `configured` sinks that have
    /// neither), by id.
    pub fn sinks_status(
        &self,
        configured: &[String],
    ) -> Result<Vec<super::SinkStatus>, StoreError> {
        super::sinkq::status(&self.conn, &self.path, configured)
    }

    /// The labels of `agent_id`'s latest `Hello` (empty for an agent the
    /// registry does not know, or with labels that do not read as JSON).
    pub fn labels(&self, agent_id: &AgentId) -> Result<BTreeMap<String, String>, StoreError> {
        use rusqlite::OptionalExtension as _;
        let text: Option<String> = self
            .conn
            .prepare_cached("SELECT labels FROM agents WHERE agent_id = ?1")
            .at(&self.path)?
            .query_row([agent_id.as_str()], |r| r.get(0))
            .optional()
            .at(&self.path)?;
        Ok(text
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default())
    }
}

fn limit_param(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A stored seq, which the store only ever writes in `1..=i64::MAX`.
pub(crate) fn seq_from(
    path: &Path,
    agent_id: &str,
    column: &'static str,
    v: i64,
) -> Result<Seq, StoreError> {
    u64::try_from(v)
        .map(Seq)
        .map_err(|_| StoreError::CorruptRow {
            path: path.to_owned(),
            agent_id: agent_id.to_owned(),
            column,
            reason: format!("{v} is negative"),
        })
}

/// An agent id read from a row.
pub(crate) fn agent_from(
    path: &Path,
    column: &'static str,
    s: String,
) -> Result<AgentId, StoreError> {
    AgentId::parse(&s).map_err(|e| StoreError::CorruptRow {
        path: path.to_owned(),
        agent_id: s,
        column,
        reason: e.to_string(),
    })
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
        let corrupt = |reason: String| StoreError::CorruptBody {
            path: path.to_owned(),
            agent_id: agent_id.clone(),
            seq,
            reason,
        };
        let body = match row.get_ref(2).at(path)? {
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

fn events_tail(
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

fn events_stats(
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
