//! Opening a SQLite file the way both writers need it: in WAL mode with the
//! chosen `synchronous`, a busy timeout, its schema version checked and,
//! where the owner asks, its pages checked.
//!
//! Why WAL: readers (the operator verbs, the agent's uplink and CLI) then
//! never block the single writer, nor it them, and a reader sees the last
//! committed state without taking the write lock. A file system that cannot
//! give WAL is refused ([`Error::NoWal`]) rather than silently run in a mode
//! where a reader stalls ingest.
//!
//! The schema version lives in `PRAGMA user_version`. A newer one than the
//! build knows is refused, never misread; an older one is brought up to date
//! by the owner's migration inside one IMMEDIATE transaction, so that two
//! processes opening one file do not both migrate it.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, Transaction};
use serde::{Deserialize, Serialize};

use crate::error::{AtPath, Error};

/// How long a statement waits for another connection's lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Prepared statements kept per connection: both writers run a few dozen
/// distinct statements on their hot paths, more than SQLite's default 16.
pub const STATEMENT_CACHE: usize = 32;

/// How hard SQLite flushes a commit (`PRAGMA synchronous`): `[outbox]
/// synchronous` in the agent, `[store] synchronous` in the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Every commit is on disk before it returns: "acknowledged" means
    /// durable, even across a power cut. The default, because gateways lose
    /// power.
    #[default]
    Full,
    /// Commits reach the WAL but are not flushed: a power cut may lose the
    /// last commits (which a peer may already have been told are stored); a
    /// process crash loses nothing. Faster; benchmarks report both.
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
    pub fn pragma(self) -> i64 {
        match self {
            Synchronous::Full => 2,
            Synchronous::Normal => 1,
        }
    }

    /// The mode a `PRAGMA synchronous` value stands for: 1 is NORMAL, and
    /// anything else is read as FULL, the safe side.
    pub fn from_pragma(v: i64) -> Synchronous {
        if v == 1 {
            Synchronous::Normal
        } else {
            Synchronous::Full
        }
    }
}

/// Opens `path` for writing (creating the file, not its directory) in WAL
/// mode with `synchronous`, the busy timeout and the statement cache.
pub fn open(path: &Path, synchronous: Synchronous) -> Result<Connection, Error> {
    let conn = Connection::open(path).at(path)?;
    conn.busy_timeout(BUSY_TIMEOUT).at(path)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .at(path)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::NoWal {
            path: path.to_owned(),
            mode,
        });
    }
    conn.pragma_update(None, "synchronous", synchronous.pragma())
        .at(path)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Opens `path` read-only, for a process that reads while another writes:
/// never creates the file ([`Error::NotFound`]), refuses a schema newer than
/// `supported` ([`Error::NewerSchema`]) and a file never initialised
/// ([`Error::Uninitialised`]). Returns the connection and the file's schema
/// version, which the caller may still find too old.
pub fn open_read_only(path: &Path, supported: i64) -> Result<(Connection, i64), Error> {
    if !path.exists() {
        return Err(Error::NotFound {
            path: path.to_owned(),
        });
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).at(path)?;
    conn.busy_timeout(BUSY_TIMEOUT).at(path)?;
    let version = user_version(&conn, path)?;
    refuse_newer(path, version, supported)?;
    if version < 1 {
        return Err(Error::Uninitialised {
            path: path.to_owned(),
        });
    }
    Ok((conn, version))
}

/// Brings the schema of the file to `version` inside `tx`, which must be an
/// IMMEDIATE transaction (so that two processes opening one file do not both
/// do it); the caller commits.
///
/// A newer schema is refused ([`Error::NewerSchema`]). An older one (0 for
/// a new file) is handed to `migrate` with its version, which creates or
/// alters the tables; then `user_version` becomes `version`. Returns the
/// version the file had.
pub fn prepare_schema(
    tx: &Transaction<'_>,
    path: &Path,
    version: i64,
    migrate: impl FnOnce(&Transaction<'_>, i64) -> rusqlite::Result<()>,
) -> Result<i64, Error> {
    let found = user_version(tx, path)?;
    refuse_newer(path, found, version)?;
    if found < version {
        migrate(tx, found).at(path)?;
        tx.pragma_update(None, "user_version", version).at(path)?;
    }
    Ok(found)
}

/// Runs `PRAGMA quick_check`: a pass over every page that finds damaged
/// B-trees, about a second per few hundred MB. Returns SQLite's first
/// complaint, `None` when the file is sound. A file that is not SQLite at
/// all already failed to open. The damage is data, not an error: the owner
/// decides what a damaged file means (the agent moves it aside).
pub fn quick_check(conn: &Connection, path: &Path) -> Result<Option<String>, Error> {
    let verdict: String = conn
        .query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
        .at(path)?;
    Ok((verdict != "ok").then_some(verdict))
}

fn user_version(conn: &Connection, path: &Path) -> Result<i64, Error> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
        .at(path)
}

fn refuse_newer(path: &Path, found: i64, supported: i64) -> Result<(), Error> {
    if found > supported {
        return Err(Error::NewerSchema {
            path: path.to_owned(),
            found,
            supported,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_file_is_migrated_from_version_0_and_a_newer_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.db");
        let mut conn = open(&path, Synchronous::Normal).expect("opens");
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .expect("tx");
        let mut seen = None;
        let found = prepare_schema(&tx, &path, 2, |tx, from| {
            seen = Some(from);
            tx.execute_batch("CREATE TABLE t (x INTEGER)")
        })
        .expect("migrates");
        tx.commit().expect("commits");
        assert_eq!((found, seen), (0, Some(0)));

        let (ro, version) = open_read_only(&path, 2).expect("reads");
        assert_eq!(version, 2);
        drop(ro);
        assert!(matches!(
            open_read_only(&path, 1),
            Err(Error::NewerSchema {
                found: 2,
                supported: 1,
                ..
            })
        ));
        assert_eq!(quick_check(&conn, &path).expect("checks"), None);
    }

    #[test]
    fn a_read_only_open_creates_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing.db");
        assert!(matches!(
            open_read_only(&path, 1),
            Err(Error::NotFound { .. })
        ));
        assert!(!path.exists());
        drop(open(&path, Synchronous::Full).expect("creates"));
        assert!(matches!(
            open_read_only(&path, 1),
            Err(Error::Uninitialised { .. })
        ));
    }

    #[test]
    fn synchronous_reads_back_what_it_writes() {
        for s in [Synchronous::Full, Synchronous::Normal] {
            assert_eq!(Synchronous::from_pragma(s.pragma()), s);
        }
        assert_eq!(Synchronous::parse("normal"), Some(Synchronous::Normal));
        assert_eq!(Synchronous::parse("off"), None);
    }
}
