//! The durable outbox: where every accepted event waits, with its seq, until the
//! hub acknowledges it.
//!
//! Sources hand event bodies to the group-commit writer ([`spawn_writer`]); it
//! gathers the requests of every source for up to [`WriterOptions::window`],
//! stores them in ONE SQLite transaction, and only then answers each request
//! with its own seq range. A source acknowledges nothing to its peer (an MQTT
//! PUBACK or PUBREC) before that answer. The uplink reads batches in seq order
//! and calls [`Outbox::ack`] once the hub has made them durable.
//!
//! Architecture invariant: a row leaves the outbox only because the hub
//! acknowledged its seq or because a configured limit evicted it, and every
//! eviction is counted under its reason (`max_bytes`, `max_age`, `refused`).
//!
//! # On-disk format
//!
//! One SQLite file (`<data_dir>/outbox.db`) in WAL mode, with its `-wal` and
//! `-shm` companions while it is open.
//!
//! ```text
//! PRAGMA journal_mode = WAL         readers (the `outbox stats`/`tail` CLI, the
//!                                   uplink) never block the writer, nor it them
//! PRAGMA synchronous  = FULL|NORMAL FULL by default: a commit is on disk before
//!                                   anything is acknowledged
//! PRAGMA user_version = 1           the schema version; a newer one is refused
//!
//! events(seq    INTEGER PRIMARY KEY,    agent-assigned, strictly increasing
//!        ts     INTEGER NOT NULL,       event time, Unix ns (copy of body.ts)
//!        stream TEXT    NOT NULL,       stream name (copy of body.stream)
//!        body   BLOB    NOT NULL)       postcard EventBody (protocols::event)
//!
//! meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID
//!   next_seq            seq of the next accepted event (starts at 1)
//!   acked_seq           highest seq the hub acknowledged; never lowered
//!   events, total_bytes rows stored and their accounted size
//!   accepted_total      events ever accepted
//!   transactions_total  append transactions committed
//!   evicted.max_bytes   events dropped by drop-oldest
//!   evicted.max_age     events dropped for age
//!   evicted.refused     events refused by refuse-new
//!   synchronous         the writer's PRAGMA synchronous (2 FULL, 1 NORMAL),
//!                       so read-only `outbox stats` can report it
//!
//! mqtt_qos2(pkid INTEGER PRIMARY KEY)   inbound MQTT QoS 2 packet ids stored
//!                                       but not yet released by PUBREL
//!
//! row size = length(body) + bytes(stream) + 16
//! ```
//!
//! Why this shape:
//! - `seq` is the rowid, so the rows are a B-tree in seq order: appending is
//!   cheap, and reading after a watermark, acking a prefix and evicting the
//!   oldest are range operations on the primary key.
//! - The body is the postcard bytes of `EventBody`, exactly as it travels to the
//!   hub, so the outbox never has to understand values. `ts` and `stream` are
//!   copied into columns so that age eviction and `tail`/filters need no decode.
//!   There is no index on `ts`: age eviction walks from the head (oldest seq)
//!   while events are older than the cutoff, so a second B-tree would only
//!   slow every insert.
//! - `next_seq` lives in `meta` and is written in the same transaction as the
//!   rows it numbered. Seqs are never reused, even after every row was acked or
//!   evicted and the table is empty: the hub deduplicates by `(agent_id, seq)`,
//!   so a reused seq would be silently dropped there.
//! - The counters are read and written inside every write transaction, so they
//!   always agree with the rows, survive kill -9 and power cuts, and a second
//!   writer on the same file could not reuse seqs either.
//! - QoS 2 packet ids are committed with the events of the same PUBLISH: after
//!   a kill -9 the agent still knows which ids it stored, so a redelivered
//!   PUBLISH is not stored twice and a PUBREL for a known id is answered
//!   (MQTT 3.1.1 section 4.3.3; rumqttc alone cannot, see DESIGN "Known traps").
//! - The accounted size (body + stream + 16 bytes for seq, ts and row overhead)
//!   is an estimate of the payload, not of SQLite pages; it is cheap to compute
//!   on both sides of a transaction and the same on every platform.

mod error;
mod evict;
mod gate;
mod handle;
mod reads;
mod recover;
mod schema;
mod store;
mod writer;

#[cfg(test)]
mod tests;

pub use error::OutboxError;
pub use gate::PolicyGate;
pub use handle::{OutboxHandle, PendingAppend, Stamped};
pub use outpost_storage::Synchronous;
pub use reads::{OutboxReader, OutboxStats};
pub use recover::{OnCorruption, Recovered};
pub use schema::{ROW_OVERHEAD, SCHEMA_VERSION};
pub use store::{AppendOutcome, Eviction, Outbox, OutboxConfig, Qos2Op, Resumed};
pub use writer::{spawn_writer, spawn_writer_with_policy, WriterOptions};
