//! What the agent's outbox and the hub's SQLite store share: the group-commit
//! writer, the future a queued request resolves through, opening a SQLite
//! file with its pragmas and schema checks, and errors that name the file.
//!
//! Both ends of Outpost keep their events in one SQLite file that a single
//! thread writes, and both acknowledge nothing to a peer before the
//! transaction holding it has committed. The machinery for that promise is
//! the same on both sides, so it lives here once; what is stored, in which
//! tables and why (the on-disk formats) stays with the outbox
//! (`outpost_agent::outbox`) and the hub store (`outpost_hub::store`).
//!
//! - [`writer`]: the group commit, generic over a [`Backend`] that carries
//!   out a group of writes in ONE transaction.
//! - [`reply`]: how a request is queued and its answer awaited
//!   ([`Pending`]).
//! - [`sqlite`]: opening a file (WAL, `synchronous`, busy timeout), its
//!   schema version and integrity check.
//! - [`error`]: [`Error`], a SQLite failure with the file it happened on.
//! - [`body`]: reading a stored event body back from a row.
//!
//! Architecture invariant: this crate knows no table of either side; it
//! never decides what is stored, only how a write reaches the disk and when
//! it may be answered.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

pub mod body;
pub mod error;
pub mod reply;
pub mod sqlite;
pub mod writer;

pub use body::{event_body, BodyError};
pub use error::{AtPath, Error};
pub use reply::{send, Pending, Reply, Stopped};
pub use sqlite::{
    open, open_read_only, prepare_schema, quick_check, Synchronous, BUSY_TIMEOUT, STATEMENT_CACHE,
};
pub use writer::{queue, run, spawn, Backend, Message, Queue, WriterOptions};
