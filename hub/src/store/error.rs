//! The store's errors: what the hub's operator reads about its store.
//!
//! The storage layer reports SQLite failures with the file they happened on
//! ([`outpost_storage::Error`]); they become a [`StoreError`] with the hub
//! store's wording and hints through one `From`, keeping SQLite's error as
//! the source.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use outpost_protocols::event::{AgentId, Seq};
use outpost_storage::{BodyError, Stopped};

/// Everything that can go wrong in the hub's store.
///
/// Errors are `Clone` because one failed group commit answers every request
/// that shared its transaction with the same error; the SQLite error is kept
/// behind an [`Arc`] for that reason.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// SQLite failed: the file could not be opened or created, the disk is
    /// full, the file is not a database, an I/O error. A write transaction
    /// that failed was rolled back, so nothing it held was committed or
    /// acknowledged.
    #[error("hub store {}: sqlite: {source}", .path.display())]
    Sqlite {
        /// The store file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: Arc<rusqlite::Error>,
    },
    /// A read-only open found no file: the hub has not stored anything yet,
    /// or `data_dir` points elsewhere.
    #[error(
        "hub store {} does not exist: the hub has not stored anything yet (it creates the store on its first start; check [hub] data_dir)",
        .path.display()
    )]
    NotFound {
        /// The path that was tried.
        path: PathBuf,
    },
    /// A read-only open found a SQLite file that the hub never initialised.
    #[error("hub store {} is not a hub store: it has no hub schema", .path.display())]
    NotAStore {
        /// The file.
        path: PathBuf,
    },
    /// The file was written by a newer hub whose schema this one does not
    /// know; it is refused rather than misread.
    #[error(
        "hub store {} has schema version {found}, newer than the {supported} this hub knows; upgrade the hub",
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
    /// systems cannot share memory between processes); without WAL, the
    /// operator verbs would block ingest.
    #[error(
        "hub store {}: sqlite refused the WAL journal (journal mode is {mode:?}); put data_dir on a local file system",
        .path.display()
    )]
    NoWal {
        /// The file.
        path: PathBuf,
        /// The journal mode SQLite kept.
        mode: String,
    },
    /// A stored event body did not decode as an `EventBody`: the file was
    /// damaged or edited by hand.
    #[error("hub store {}: event {seq} of agent {agent_id} has a corrupt body: {source}", .path.display())]
    CorruptBody {
        /// The file.
        path: PathBuf,
        /// The agent whose event is damaged.
        agent_id: AgentId,
        /// The event whose body is damaged.
        seq: Seq,
        /// What is wrong with the stored body.
        #[source]
        source: BodyError,
    },
    /// A stored row holds a value this hub cannot have written (an invalid
    /// agent id, a negative seq or counter, labels that are not a JSON object
    /// of strings): the file was damaged or edited by hand.
    #[error("hub store {}: agent {agent_id:?}: corrupt {column}: {reason}", .path.display())]
    CorruptRow {
        /// The file.
        path: PathBuf,
        /// The agent id as stored (it may itself be what is corrupt).
        agent_id: String,
        /// The table and column, such as `agents.labels`.
        column: &'static str,
        /// What is wrong with the value.
        reason: String,
    },
    /// An insert named a seq the store cannot hold: 0 (seqs start at 1; 0
    /// means "nothing stored") or above `i64::MAX` (SQLite integers are
    /// signed). Refused before any transaction, so other requests that would
    /// have shared it are not affected.
    #[error("hub store {}: agent {agent_id}: seq {seq} is out of range 1..=9223372036854775807", .path.display())]
    SeqOutOfRange {
        /// The file.
        path: PathBuf,
        /// The agent whose batch held the seq.
        agent_id: AgentId,
        /// The seq.
        seq: Seq,
    },
    /// The file has an older schema that only the hub migrates (when it
    /// starts); a read-only verb cannot use it.
    #[error("hub store {}: schema version {found} is older than this build's {supported}; start the hub once to migrate it", .path.display())]
    OlderSchema {
        /// The file.
        path: PathBuf,
        /// Its `user_version`.
        found: i64,
        /// The schema version this build writes (`SCHEMA_VERSION`).
        supported: i64,
    },
    /// The group-commit writer has stopped (shutdown, or every handle
    /// dropped), so the request was not carried out.
    #[error("the hub store writer has stopped")]
    Closed,
    /// The NATS JetStream store (`[store] kind = "jetstream"`) failed: the
    /// server is unreachable, did not acknowledge in time, or refused. A
    /// batch whose publishes or watermark update failed is not
    /// acknowledged; the agent sends it again.
    #[error("hub store {url}: {what}: {source}")]
    JetStream {
        /// The server(s), as configured.
        url: String,
        /// What the hub was doing.
        what: String,
        /// What the server or client said: an async-nats error, or a
        /// sentence of ours. Shared, like the SQLite error, because every
        /// request of a failed group gets it.
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// A batch that follows an earlier batch of its session which the store
    /// does not hold (that one failed): storing it would raise the agent's
    /// watermark over the missing events, and the agent, resuming after the
    /// watermark, would never send them again. Refused; the session ends and
    /// the agent resends from what is stored.
    #[error("agent {agent_id}: a batch after seq {after}, but the store holds it only up to seq {watermark}: an earlier batch of the session was not stored; refused so the agent sends both again")]
    OutOfOrder {
        /// The agent.
        agent_id: AgentId,
        /// The seq the previous batch of the session ended at.
        after: Seq,
        /// The agent's watermark in the store.
        watermark: Seq,
    },
    /// What this store kind does not do (`events tail` on JetStream).
    #[error("{0}")]
    Unsupported(String),
}

impl From<outpost_storage::Error> for StoreError {
    fn from(e: outpost_storage::Error) -> StoreError {
        use outpost_storage::Error as E;
        match e {
            E::Sqlite { path, source } => StoreError::Sqlite { path, source },
            E::NotFound { path } => StoreError::NotFound { path },
            E::Uninitialised { path } => StoreError::NotAStore { path },
            E::NewerSchema {
                path,
                found,
                supported,
            } => StoreError::NewerSchema {
                path,
                found,
                supported,
            },
            E::NoWal { path, mode } => StoreError::NoWal { path, mode },
        }
    }
}

impl From<Stopped> for StoreError {
    fn from(_: Stopped) -> StoreError {
        StoreError::Closed
    }
}

/// [`outpost_storage::AtPath`] with the error already a [`StoreError`], for
/// the modules outside the store (`audit`, `policy`, `admin`, `verbs`) whose
/// functions hand a SQLite result back as a `StoreError` without `?`. It adds
/// nothing to the storage layer's trait; inside the store, use that one and
/// `?`.
pub(crate) trait AtPath<T> {
    /// Maps a SQLite error to [`StoreError::Sqlite`] naming `path`.
    fn at(self, path: &Path) -> Result<T, StoreError>;
}

impl<T> AtPath<T> for rusqlite::Result<T> {
    fn at(self, path: &Path) -> Result<T, StoreError> {
        Ok(outpost_storage::AtPath::at(self, path)?)
    }
}
