//! The outbox's errors: what the agent's operator reads about its outbox.
//!
//! The storage layer reports SQLite failures with the file they happened on
//! ([`outpost_storage::Error`]); they become an [`OutboxError`] with the
//! outbox's wording and hints through one `From`, keeping SQLite's error as
//! the source.

use std::path::PathBuf;
use std::sync::Arc;

use outpost_protocols::event::Seq;
use outpost_storage::{BodyError, Stopped};

/// Everything that can go wrong in the outbox.
///
/// Errors are `Clone` because one failed group commit answers every request that
/// shared its transaction with the same error; the SQLite error is kept behind an
/// [`Arc`] for that reason.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// SQLite failed: the file could not be opened or created, the disk is full,
    /// the file is not a database, an I/O error. The transaction that failed was
    /// rolled back, so nothing it held was committed or acknowledged.
    #[error("outbox {}: sqlite: {source}", .path.display())]
    Sqlite {
        /// The outbox file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: Arc<rusqlite::Error>,
    },
    /// A read-only open found no file: the agent has not created the outbox yet,
    /// or `data_dir` points elsewhere.
    #[error("outbox {} does not exist (the agent creates it on its first start; check data_dir)", .path.display())]
    NotFound {
        /// The path that was tried.
        path: PathBuf,
    },
    /// A read-only open found a SQLite file that the agent never initialised.
    #[error("outbox {} is not an outbox: it has no outbox schema", .path.display())]
    NotAnOutbox {
        /// The file.
        path: PathBuf,
    },
    /// The file was written by a newer agent whose schema this one does not
    /// know; it is refused rather than misread.
    #[error(
        "outbox {} has schema version {found}, newer than the {supported} this agent knows; upgrade the agent",
        .path.display()
    )]
    NewerSchema {
        /// The file.
        path: PathBuf,
        /// `PRAGMA user_version` in the file.
        found: i64,
        /// The newest version this build understands.
        supported: i64,
    },
    /// SQLite would not switch the file to WAL mode (some network or FUSE file
    /// systems cannot share memory between processes); without WAL, readers
    /// would block the writer.
    #[error(
        "outbox {}: sqlite refused the WAL journal (journal mode is {mode:?}); put data_dir on a local file system",
        .path.display()
    )]
    NoWal {
        /// The file.
        path: PathBuf,
        /// The journal mode SQLite kept.
        mode: String,
    },
    /// A stored body did not decode as an `EventBody`: the file was damaged or
    /// edited by hand.
    #[error("outbox {}: event {seq} has a corrupt body: {source}", .path.display())]
    CorruptBody {
        /// The file.
        path: PathBuf,
        /// The event whose body is damaged.
        seq: Seq,
        /// What is wrong with the stored body.
        #[source]
        source: BodyError,
    },
    /// The file is damaged: SQLite says it is not a database, or its
    /// integrity check (`PRAGMA quick_check`, run on every start) failed.
    #[error("outbox {} is damaged: {detail}", .path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What SQLite found: its error message, or the integrity check's
        /// first complaint.
        detail: String,
    },
    /// A damaged outbox could not be moved aside (`on_corruption =
    /// "move-aside"`): the data directory is not writable, or the file
    /// system failed.
    #[error("outbox {}: cannot move the damaged file aside: {source}", .path.display())]
    MoveAside {
        /// The file (or its `-wal`/`-shm` companion) that was to be moved.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// An ack named a seq that was never assigned; the peer is confused or
    /// talking about another outbox.
    #[error("ack of seq {acked} is beyond the last assigned seq {last}")]
    AckBeyondEnd {
        /// The seq that was acknowledged.
        acked: Seq,
        /// The last seq this outbox assigned (0 when it assigned none).
        last: Seq,
    },
    /// A hub named a seq so high that the waiting events cannot be numbered
    /// after it; the hub is confused, and nothing here was changed.
    #[error("cannot number events after seq {after}: seqs would overflow")]
    SeqOverflow {
        /// The seq the hub named.
        after: Seq,
    },
    /// The group-commit writer has stopped (shutdown, or every handle dropped),
    /// so the request was not carried out.
    #[error("the outbox writer has stopped")]
    Closed,
}

impl OutboxError {
    /// Whether SQLite found the file system full (`SQLITE_FULL`).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, OutboxError::Sqlite { source, .. }
            if outpost_storage::error::is_disk_full(source))
    }
}

impl From<outpost_storage::Error> for OutboxError {
    fn from(e: outpost_storage::Error) -> OutboxError {
        use outpost_storage::Error as E;
        match e {
            // A damaged file is its own error, so that the agent can move it
            // aside instead of failing the same way at every start.
            E::Sqlite { path, source } if outpost_storage::error::is_damaged(&source) => {
                OutboxError::Corrupt {
                    path,
                    detail: source.to_string(),
                }
            }
            E::Sqlite { path, source } => OutboxError::Sqlite { path, source },
            E::NotFound { path } => OutboxError::NotFound { path },
            E::Uninitialised { path } => OutboxError::NotAnOutbox { path },
            E::NewerSchema {
                path,
                found,
                supported,
            } => OutboxError::NewerSchema {
                path,
                found,
                supported,
            },
            E::NoWal { path, mode } => OutboxError::NoWal { path, mode },
        }
    }
}

impl From<Stopped> for OutboxError {
    fn from(_: Stopped) -> OutboxError {
        OutboxError::Closed
    }
}
