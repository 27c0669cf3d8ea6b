//! A failure of the storage layer, always naming the file it happened on.
//!
//! The outbox and the hub store each turn an [`Error`] into their own error
//! (`OutboxError`, `StoreError`) with one `From`, because the operator reads
//! their messages ("outbox …", "hub store …", with the hint that fits) and
//! the docs quote them. The SQLite error itself travels on as the
//! `#[source]`, so the chain survives to the log line.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Everything the storage layer itself can report.
///
/// Cloneable, because one failed group commit answers every request that
/// shared its transaction with the same error; the SQLite error is kept
/// behind an [`Arc`] for that reason.
///
/// Deliberately not `#[non_exhaustive]`: the outbox and the hub store map
/// every variant to their own, and a new one should stop their build until
/// they say what it means to their operator.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// SQLite failed: the file could not be opened or created, the disk is
    /// full, the file is not a database, an I/O error. A write transaction
    /// that failed was rolled back, so nothing it held was committed.
    #[error("{}: sqlite: {source}", .path.display())]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: Arc<rusqlite::Error>,
    },
    /// A read-only open found no file; it never creates one.
    #[error("{} does not exist", .path.display())]
    NotFound {
        /// The path that was tried.
        path: PathBuf,
    },
    /// A read-only open found a SQLite file whose schema version is 0: its
    /// owner never initialised it.
    #[error("{} has no schema", .path.display())]
    Uninitialised {
        /// The file.
        path: PathBuf,
    },
    /// The file has a schema version newer than this build knows; it is
    /// refused rather than misread.
    #[error("{} has schema version {found}, newer than the {supported} this build knows", .path.display())]
    NewerSchema {
        /// The file.
        path: PathBuf,
        /// `PRAGMA user_version` in the file.
        found: i64,
        /// The newest version this build understands.
        supported: i64,
    },
    /// SQLite would not switch the file to WAL mode (some network or FUSE
    /// file systems cannot share memory between processes); without WAL,
    /// readers would block the writer.
    #[error("{}: sqlite refused the WAL journal (journal mode is {mode:?})", .path.display())]
    NoWal {
        /// The file.
        path: PathBuf,
        /// The journal mode SQLite kept.
        mode: String,
    },
}

impl Error {
    /// The file the error happened on.
    pub fn path(&self) -> &Path {
        match self {
            Error::Sqlite { path, .. }
            | Error::NotFound { path }
            | Error::Uninitialised { path }
            | Error::NewerSchema { path, .. }
            | Error::NoWal { path, .. } => path,
        }
    }

    /// Whether SQLite says the file is damaged (`SQLITE_CORRUPT`) or not a
    /// database at all (`SQLITE_NOTADB`).
    pub fn is_damaged(&self) -> bool {
        matches!(self, Error::Sqlite { source, .. } if is_damaged(source))
    }
}

/// Whether `e` says the file is damaged or not a database.
pub fn is_damaged(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

/// Whether `e` says the file system is full (`SQLITE_FULL`).
pub fn is_disk_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

/// Attaches the database file to a SQLite error.
pub trait AtPath<T> {
    /// Maps a SQLite error to [`Error::Sqlite`] naming `path`; `?` then lifts
    /// it into the caller's error.
    fn at(self, path: &Path) -> Result<T, Error>;
}

impl<T> AtPath<T> for rusqlite::Result<T> {
    fn at(self, path: &Path) -> Result<T, Error> {
        self.map_err(|source| Error::Sqlite {
            path: path.to_owned(),
            source: Arc::new(source),
        })
    }
}
