//! The store over one SQLite file: the writer's side ([`Store`]), which
//! carries out a group of changes in one transaction, and the connection of
//! the operator verbs that write while the hub runs ([`open_admin`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use outpost_protocols::event::{AgentId, Event, EventBody, Seq, Timestamp};
use outpost_protocols::topic::TopicFilter;
use outpost_storage::{AtPath, Synchronous};
use rusqlite::{params, Connection, Transaction, TransactionBehavior};
use tracing::debug;

use super::binding;
use super::events::{events_stats, events_tail, AgentEventStats};
use super::registry;
use super::schema::prepare_schema;
use super::sink_queue;
use crate::audit::key::AuditKey;
use crate::clock;
use crate::store::error::StoreError;
use crate::store::handle::{InsertOutcome, PolicyCounts};
use crate::store::records::AgentRecord;
use crate::store::records::{CertBinding, CertInfo, Forward, Rebind, SinkProgress};

/// Binds `cert` to `agent_id` as `how` says, on a connection of the
/// operator verbs ([`open_admin`]), inside the caller's transaction: `ca
/// issue --config` records the certificate it issued.
pub fn bind_certificate(
    conn: &Connection,
    path: &Path,
    key: &AuditKey,
    now: Timestamp,
    agent_id: &AgentId,
    cert: &CertInfo,
    how: &Rebind,
) -> Result<(), StoreError> {
    binding::bind(conn, path, key, now, agent_id, cert, how)
}

/// The store's file name inside the hub's `data_dir`.
pub const FILE_NAME: &str = "hub.db";

/// A read-write connection for the operator verbs that write while the hub
/// runs (`policy apply`, the audit log of `ca issue`): the schema is created
/// or migrated if needed, but nothing else is touched (unlike [`Store::open`],
/// which declares every agent disconnected). Writes wait for the hub's
/// transactions through the busy timeout; every commit is FULL.
pub fn open_admin(path: &Path) -> Result<Connection, StoreError> {
    let mut conn = outpost_storage::open(path, Synchronous::Full)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    prepare_schema(&tx, path)?;
    tx.commit().at(path)?;
    Ok(conn)
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
    /// A certificate is bound to the agent.
    Bind {
        agent_id: &'a AgentId,
        cert: &'a CertInfo,
        how: &'a Rebind,
    },
    /// A certificate of the agent was refused at the handshake.
    CertRefused {
        agent_id: &'a AgentId,
        fingerprint: &'a str,
        reason: &'a str,
    },
}

/// The durable store: the one writer of its SQLite file.
///
/// Every method is synchronous and may block on disk; the hub drives it from
/// the group-commit writer thread (`spawn_store_writer`).
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// Signs the audit entries the hub appends itself.
    audit_key: AuditKey,
    transactions: u64,
}

impl Store {
    /// Opens the store at `path`, creating the file (not its directory) and the
    /// schema if needed; the audit entries it appends are signed with
    /// `audit_key`.
    ///
    /// Opening for writing also declares every agent disconnected: only the
    /// hub writes the store, and a hub that is starting has no sessions yet,
    /// whatever a killed predecessor left behind.
    pub fn open(
        path: &Path,
        synchronous: Synchronous,
        audit_key: AuditKey,
    ) -> Result<Store, StoreError> {
        let mut conn = outpost_storage::open(path, synchronous)?;

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
            audit_key,
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

    /// Records that a session of `agent_id` started: its versions replace
    /// the old ones, its labels are the registry's only if it is new (see
    /// [`labels`](Self::labels)), `last_seen` becomes `now` (and `first_seen`
    /// too for a new agent), and the agent counts as connected until as many
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
            outcomes.push(apply_one(&tx, path, &self.audit_key, now, op)?);
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

    /// The registry's labels of `agent_id`; `None` if it is not registered.
    pub fn labels(
        &self,
        agent_id: &AgentId,
    ) -> Result<Option<std::collections::BTreeMap<String, String>>, StoreError> {
        registry::labels(&self.conn, &self.path, agent_id)
    }

    /// What may be acknowledged to `agent_id`: its watermark, or less while
    /// one of its events waits for a sink. Where its next session resumes.
    pub fn acked(&self, agent_id: &AgentId) -> Result<Seq, StoreError> {
        let w = self.watermark(agent_id)?;
        sink_queue::acked(&self.conn, &self.path, agent_id, w)
    }

    /// The certificate bound to `agent_id`, if any.
    pub fn binding(&self, agent_id: &AgentId) -> Result<Option<CertBinding>, StoreError> {
        binding::binding(&self.conn, &self.path, agent_id)
    }

    /// Binds `cert` to `agent_id` in its own transaction, as the hub's
    /// sessions do through the writer (tests and tools).
    pub fn bind(
        &mut self,
        now: Timestamp,
        agent_id: &AgentId,
        cert: &CertInfo,
        how: &Rebind,
    ) -> Result<(), StoreError> {
        self.apply(
            now,
            &[Op::Bind {
                agent_id,
                cert,
                how,
            }],
        )
        .map(drop)
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
        let gone = sink_queue::drop_unconfigured(
            &tx,
            &path,
            &self.audit_key,
            clock::unix_now(),
            configured,
        )?;
        tx.commit().at(&path)?;
        Ok(gone)
    }

    /// Records a sink's delivery attempt in its own transaction (tests and
    /// tools; the hub goes through the writer).
    pub fn sink_progress(&mut self, sink: &str, progress: &SinkProgress) -> Result<(), StoreError> {
        self.apply(clock::unix_now(), &[Op::SinkProgress { sink, progress }])
            .map(drop)
    }
}

/// One op of a group commit; see [`Store::apply`].
fn apply_one(
    tx: &Transaction<'_>,
    path: &Path,
    key: &AuditKey,
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
            sink_queue::progress(tx, path, key, now, sink, progress).map(|()| None)
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
            key,
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
        Op::Bind {
            agent_id,
            cert,
            how,
        } => binding::bind(tx, path, key, now, agent_id, cert, how).map(|()| None),
        Op::CertRefused {
            agent_id,
            fingerprint,
            reason,
        } => binding::refused(tx, path, key, now, agent_id, fingerprint, reason).map(|()| None),
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
            acked: sink_queue::acked(tx, path, agent_id, before)?,
            ..InsertOutcome::default()
        });
    }
    // A sink's copy is queued once: what the watermark already covers was
    // queued (or delivered) before, unlike a stored row, which the primary
    // key deduplicates.
    let fresh: Vec<&Forward> = forward.iter().filter(|f| f.seq > before).collect();
    sink_queue::queue(tx, path, now, agent_id, &fresh)?;
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
    out.acked = sink_queue::acked(tx, path, agent_id, out.watermark)?;
    Ok(out)
}
