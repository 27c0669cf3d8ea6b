//! The hub's durable store: every event the agents sent, exactly once, and the
//! fleet registry, in one SQLite file.
//!
//! Agent sessions hand their new events to the group-commit writer
//! ([`spawn_store_writer`], on `outpost_storage`'s group commit) through a
//! [`StoreHandle`]; it gathers the requests of every session, stores
//! them and raises each agent's watermark in ONE transaction, and only then
//! answers each request with its agent's new watermark. A session
//! acknowledges nothing to its agent before that answer. The registry
//! (sessions opening and closing, reported backlogs) goes through the same
//! writer, so the file has one writer connection. The operator verbs read the
//! file through a [`StoreReader`] while the hub runs.
//!
//! Architecture invariant: the store holds each `(agent_id, seq)` at most
//! once, and an agent's watermark is committed in the same transaction as the
//! rows it covers.
//!
//! # On-disk format
//!
//! One SQLite file (`<data_dir>/hub.db`, see [`store_path`]) in WAL mode, with
//! its `-wal` and `-shm` companions while it is open.
//!
//! ```text
//! PRAGMA journal_mode = WAL         readers (the `fleet`/`events` verbs) never
//!                                   block ingest, nor it them
//! PRAGMA synchronous  = FULL|NORMAL `[store] synchronous`; FULL by default: a
//!                                   commit is on disk before anything is acked
//! PRAGMA user_version = 4           the schema version; a newer one is refused,
//!                                   an older one migrated by the hub
//!
//! events(agent_id TEXT    NOT NULL,  from the agent's certificate
//!        seq      INTEGER NOT NULL,  agent-assigned, 1..=i64::MAX
//!        ts       INTEGER NOT NULL,  event time, Unix ns (copy of body.ts)
//!        stream   TEXT    NOT NULL,  stream name (copy of body.stream)
//!        body     BLOB    NOT NULL,  postcard EventBody (protocols::event),
//!                                    the bytes the agent's outbox holds
//!        PRIMARY KEY (agent_id, seq)) WITHOUT ROWID
//!
//! agents(agent_id         TEXT PRIMARY KEY,
//!        labels           TEXT NOT NULL,     JSON object of strings, from Hello
//!        first_seen       INTEGER NOT NULL,  Unix ns
//!        last_seen        INTEGER NOT NULL,  Unix ns: Hello, batch, goodbye, touch
//!        agent_version    TEXT NULL,         from Hello
//!        protocol_version INTEGER NULL,      negotiated in the latest session
//!        watermark        INTEGER NOT NULL,  highest seq in events; never lowered
//!        backlog_events   INTEGER NULL,      last reported outbox backlog
//!        backlog_bytes    INTEGER NULL,
//!        connected        INTEGER NOT NULL,  open sessions (0 = disconnected)
//!        policy_version   INTEGER NULL,      the policy it reported running
//!        policy_error     TEXT NULL,         why it refused the last one pushed
//!        policy_dropped   INTEGER NOT NULL,  events the hub's enforcement dropped
//!        policy_modified  INTEGER NOT NULL)  events the hub's enforcement changed
//!        WITHOUT ROWID
//!
//! policies(version    INTEGER PRIMARY KEY,   1, 2, ...; the newest is in force
//!          applied_at INTEGER NOT NULL,      Unix ns
//!          actor      TEXT NOT NULL,         who applied it
//!          source     TEXT NOT NULL,         the file, or "rollback to N"
//!          digest     TEXT NOT NULL,         SHA-256 of text, hex
//!          text       TEXT NOT NULL)         the document as applied
//!
//! audit(...), meta(key, value)               see `sqlite::audit`
//! agent_certs(agent_id, serial, fingerprint, the certificate the hub accepts for
//!             not_after, prev_fingerprint,   each agent, and the one before it
//!             prev_until)                    until then; see `sqlite::binding`
//!
//! sink_pending(n INTEGER PRIMARY KEY,        queue order
//!              sink, agent_id, seq,          what waits for which sink
//!              queued_at, body)              its own copy of the body
//! sinks(sink, delivered, rejected, refused,  counters for `sinks status`
//!       failures, last_delivered_at, last_error, last_error_at)
//!                                            see `sqlite::sink_queue`
//! enrollments(token_hash, agent_id, labels,  one-time enrollment tokens, by
//!             created_at, created_by,        the SHA-256 of the token (never
//!             expires_at, used_at, used_from, the token); see
//!             revoked_at, serial, fingerprint) `sqlite::enrollments`
//! api_tokens(name, role, hash, created_at,   the API's static tokens, by
//!            created_by, expires_at,         SHA-256 only; see
//!            revoked_at, revoked_by)         `api::auth::tokens`
//! policy_proposals(id, proposed_at,          two-person policy approval;
//!   proposed_by, source, digest, text,       see `api::auth::proposals`
//!   status, decided_at, decided_by,
//!   reason, version)
//! ```
//!
//! Why this shape:
//! - The primary key `(agent_id, seq)` is the deduplication key of the
//!   delivery guarantee, so SQLite itself refuses a second copy: rows go in
//!   with `INSERT OR IGNORE`, and a replayed event is counted as a duplicate
//!   and left alone. This is the second line of defence; the hub session
//!   already drops seqs at or below the watermark.
//! - `WITHOUT ROWID` makes the primary key the table's only B-tree, clustered
//!   by agent and seq, so that `events tail`, `events stats` and a watermark
//!   check are range scans of that key and read each row once. The
//!   alternative, a rowid table plus a unique index on `(agent_id, seq)`,
//!   appends rows at the end of one tree but updates a second. Measured with
//!   the same SQLite, 64-byte bodies and `synchronous = NORMAL`
//!   (`tests::layout_without_rowid_against_a_rowid_table_with_a_unique_index`,
//!   medians of 4 alternating runs on a shared 2-core machine):
//!
//!   ```text
//!   agents  rows per tx           rowid + unique index    WITHOUT ROWID
//!   100     10 agents x 100       ~211k rows/s, 43 MB     ~219k rows/s, 36 MB
//!   1000    50 agents x 20        ~87k rows/s, 432 MB     ~82k rows/s, 363 MB
//!   ```
//!
//!   Inserts are a tie within the noise (±5%, no consistent winner); the
//!   file is about 16% smaller without the rowid and the separate index, so
//!   the table is `WITHOUT ROWID`.
//! - The body is the postcard `EventBody` exactly as the agent stored and sent
//!   it, so the store never has to understand values. `ts` and `stream` are
//!   copied into columns so that `tail` filters on streams without decoding.
//! - Counters such as `events stats` are computed from the rows
//!   (`count(DISTINCT seq)` included), never kept beside them, so they cannot
//!   disagree with what is stored.
//! - `connected` counts sessions instead of being a flag, so that a reconnect
//!   that supersedes a session not yet closed does not show the agent as
//!   disconnected when the old session ends. Opening the store for writing
//!   resets it to 0 for every agent, since a starting hub has no sessions.
//!
//! # Exactly once
//!
//! The watermark of an agent is the highest seq the store holds for it. It is
//! raised in the same transaction that inserts the rows, so after any crash
//! rows and watermark agree: both committed, or neither. The writer answers an
//! insert only after `COMMIT` returned (with `synchronous = FULL`, after the
//! WAL was flushed), and the session acknowledges a batch only after that
//! answer ([`HubSession::stored`](outpost_protocols::wire::HubSession::stored)).
//! So:
//! - a crash before the commit loses the batch at the hub, but it was not
//!   acknowledged: the agent still holds it and sends it again;
//! - a crash after the commit and before the ack leaves the rows and the
//!   watermark durable: the next session welcomes the agent with that
//!   watermark, the agent resumes after it, and whatever it sends again
//!   anyway is ignored by the primary key;
//! - a new session reads the watermark through the writer
//!   ([`StoreHandle::watermark`]), behind every write queued before it;
//! - a session queues its batches without waiting for their commits, so a
//!   batch may be queued behind one whose commit fails (a full disk) and
//!   then succeed (the disk freed): each insert says where the session's
//!   previous batch ended, and one that does not follow what the store holds
//!   is refused ([`StoreError::OutOfOrder`]). Otherwise its commit would
//!   raise the watermark over the failed batch's events, and the agent,
//!   resuming after the watermark, would never send them again.
//!
//! An event the policy routes to a sink is queued in `sink_pending` in the
//! same transaction, and acknowledged only once the sink accepted it: an
//! agent's acknowledgement (and the `Welcome` of its next session) stops at
//! the seq before its first event still queued, while the watermark moves on
//! so that nothing it sends again is stored or queued twice.
//!
//! With `synchronous = NORMAL` a power cut (not a process crash) may undo the
//! last commits after their ack, and the agent has deleted those events: they
//! are lost, never duplicated. That is why FULL is the default.

mod error;
mod handle;
pub mod jetstream;
mod records;
mod sqlite;

#[cfg(test)]
mod tests;

pub(crate) use error::AtPath;
pub use error::StoreError;
pub use handle::{InsertOutcome, PendingInsert, PolicyCounts, StoreHandle, WriterOptions};
pub use outpost_storage::Synchronous;
pub(crate) use records::rfc3339;
pub use records::{
    AgentRecord, CertBinding, CertInfo, EnrollmentRecord, Forward, LabelChange, Queued, Rebind,
    Revocation, SinkProgress, SinkStatus, TokenRefusal,
};
pub use sqlite::audit;
pub use sqlite::commands;
pub use sqlite::enrollments;
pub use sqlite::trust;
pub use sqlite::{
    bind_certificate, open_admin, spawn_store_writer, store_path, AgentEventStats, EventQuery,
    Store, StoreReader, FILE_NAME, SCHEMA_VERSION,
};
