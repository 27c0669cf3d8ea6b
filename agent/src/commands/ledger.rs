//! The agent's record of every command it was sent, in
//! `<data_dir>/commands.db` beside the outbox: what makes a command happen
//! at most once across crashes and resends.
//!
//! ```text
//! commands
//!   id           TEXT PRIMARY KEY     the hub's command id
//!   kind         TEXT                 write, publish, read
//!   target       TEXT                 device/tag or topic
//!   received_at  INTEGER              Unix ns, when it was first recorded
//!   outcome      BLOB NULL            postcard(Outcome); NULL while executing
//! ```
//!
//! A row is committed (`synchronous = FULL`) **before** the command is
//! executed, and its outcome after. A row without an outcome found later
//! means the agent stopped while executing: the command is never executed
//! again and is reported `failed` (the device may or may not hold the value).
//! A separate file rather than a table of the outbox because the outbox's
//! writer commits in groups on its own thread, and a command must not wait
//! for a group nor a group for a command's fsync.

use std::path::{Path, PathBuf};

use outpost_protocols::wire::command::{Action, CommandId, Outcome};
use outpost_storage::{AtPath, Synchronous};
use rusqlite::{params, Connection, OptionalExtension};

/// Why the ledger failed. A command whose id cannot be recorded is not
/// executed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// Opening the file or a statement failed.
    #[error(transparent)]
    Storage(#[from] outpost_storage::Error),
    /// A recorded outcome does not decode (the file was edited or damaged).
    #[error("{path}: command {id}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The command.
        id: String,
        /// What failed.
        reason: String,
    },
}

/// What the ledger knows of a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// Recorded, and the agent stopped before recording an outcome.
    Started,
    /// Recorded with its outcome.
    Done(Outcome),
}

/// The open ledger.
#[derive(Debug)]
pub struct Ledger {
    conn: Connection,
    path: PathBuf,
}

impl Ledger {
    /// Opens (or creates) the ledger at `path`.
    pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
        let conn = outpost_storage::open(path, Synchronous::Full)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS commands (
                id TEXT PRIMARY KEY,
                kind TEXT NOT NULL,
                target TEXT NOT NULL,
                received_at INTEGER NOT NULL,
                outcome BLOB
            )",
        )
        .at(path)?;
        Ok(Ledger {
            conn,
            path: path.to_owned(),
        })
    }

    /// What is recorded for `id`, if anything.
    pub fn get(&self, id: &CommandId) -> Result<Option<Entry>, LedgerError> {
        let row: Option<Option<Vec<u8>>> = self
            .conn
            .query_row(
                "SELECT outcome FROM commands WHERE id = ?1",
                [id.as_str()],
                |r| r.get(0),
            )
            .optional()
            .at(&self.path)?;
        match row {
            None => Ok(None),
            Some(None) => Ok(Some(Entry::Started)),
            Some(Some(bytes)) => Outcome::from_bytes(&bytes)
                .map(|o| Some(Entry::Done(o)))
                .map_err(|e| LedgerError::Corrupt {
                    path: self.path.clone(),
                    id: id.to_string(),
                    reason: e.to_string(),
                }),
        }
    }

    /// Records that `id` is about to be executed; committed when this
    /// returns.
    pub fn start(&self, id: &CommandId, action: &Action, now: i64) -> Result<(), LedgerError> {
        self.conn
            .execute(
                "INSERT INTO commands (id, kind, target, received_at, outcome)
                 VALUES (?1, ?2, ?3, ?4, NULL)",
                params![id.as_str(), action.kind(), action.target(), now],
            )
            .at(&self.path)?;
        Ok(())
    }

    /// Records the outcome of `id` (recording the id too if it was not).
    pub fn finish(
        &self,
        id: &CommandId,
        action: &Action,
        outcome: &Outcome,
        now: i64,
    ) -> Result<(), LedgerError> {
        self.conn
            .execute(
                "INSERT INTO commands (id, kind, target, received_at, outcome)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO UPDATE SET outcome = excluded.outcome",
                params![
                    id.as_str(),
                    action.kind(),
                    action.target(),
                    now,
                    outcome.to_bytes()
                ],
            )
            .at(&self.path)?;
        Ok(())
    }

    /// Forgets commands recorded before `before` (Unix ns): the hub stops
    /// sending a command again once it has its result, and a command older
    /// than any expiry cannot be sent again.
    pub fn prune(&self, before: i64) -> Result<usize, LedgerError> {
        Ok(self
            .conn
            .execute(
                "DELETE FROM commands WHERE received_at < ?1 AND outcome IS NOT NULL",
                [before],
            )
            .at(&self.path)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocols::{StreamName, Value};

    #[test]
    fn a_recorded_command_survives_reopening_with_or_without_its_outcome() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("commands.db");
        let action = Action::Read {
            stream: StreamName::parse("plc1/t").expect("valid"),
        };
        let (a, b) = (
            CommandId::parse("a").expect("valid"),
            CommandId::parse("b").expect("valid"),
        );
        {
            let l = Ledger::open(&path).expect("opens");
            assert_eq!(l.get(&a).expect("reads"), None);
            l.start(&a, &action, 1).expect("starts");
            l.start(&b, &action, 1).expect("starts");
            // The same id cannot start twice.
            assert!(l.start(&a, &action, 2).is_err());
            let done = Outcome::Applied {
                value: Some(Value::F64(f64::NAN)),
            };
            l.finish(&b, &action, &done, 2).expect("finishes");
        }
        let l = Ledger::open(&path).expect("reopens");
        assert_eq!(l.get(&a).expect("reads"), Some(Entry::Started));
        assert!(matches!(
            l.get(&b).expect("reads"),
            Some(Entry::Done(Outcome::Applied { value: Some(Value::F64(f)) })) if f.is_nan()
        ));
        assert_eq!(l.prune(10).expect("prunes"), 1);
        assert_eq!(l.get(&b).expect("reads"), None);
        assert_eq!(l.get(&a).expect("reads"), Some(Entry::Started));
    }
}
