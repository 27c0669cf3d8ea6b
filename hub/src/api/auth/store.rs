//! Where authentication reads tokens and writes its audit entries: the
//! hub's SQLite file or its JetStream store.
//!
//! Why a small enum of its own rather than the group-commit handle: token
//! lookups are reads (a read-only connection per lookup, on the blocking
//! pool, never queued behind ingest), and the audit entries of the API
//! (`api.refused`, `policy.*`) are rare operator actions, each committed in
//! a transaction of its own like an operator verb's.

use std::path::PathBuf;

use rusqlite::TransactionBehavior;

use crate::api::auth::tokens::{self, TokenRecord};
use crate::audit::key::AuditKey;
use crate::clock;
use crate::store::audit;
use crate::store::jetstream::JetStreamStore;
use crate::store::{open_admin, AtPath as _, StoreError, StoreReader};

/// The store authentication uses, and the key its audit entries are signed
/// with.
#[derive(Debug, Clone)]
pub struct AuthStore {
    at: At,
    key: AuditKey,
}

#[derive(Debug, Clone)]
enum At {
    /// `<data_dir>/hub.db`.
    Sqlite(PathBuf),
    /// The JetStream store.
    JetStream(Box<JetStreamStore>),
}

/// One audit entry of the API.
#[derive(Debug, Clone, Copy)]
pub struct Audit<'a> {
    /// The caller's subject.
    pub actor: &'a str,
    /// `api.refused`, `policy.proposed`, ...
    pub action: &'a str,
    /// What it was about.
    pub target: &'a str,
    /// `ok` or `refused`.
    pub result: &'a str,
    /// For people.
    pub detail: &'a str,
}

impl AuthStore {
    /// The SQLite store at `path`.
    pub fn sqlite(path: PathBuf, key: AuditKey) -> AuthStore {
        AuthStore {
            at: At::Sqlite(path),
            key,
        }
    }

    /// The JetStream store `js`.
    pub fn jetstream(js: Box<JetStreamStore>, key: AuditKey) -> AuthStore {
        AuthStore {
            at: At::JetStream(js),
            key,
        }
    }

    /// The token whose hash is `hash`.
    pub async fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        match &self.at {
            At::Sqlite(path) => {
                let (path, hash) = (path.clone(), hash.to_owned());
                blocking(move || {
                    let reader = StoreReader::open(&path)?;
                    tokens::lookup_sqlite(reader.connection(), &path, &hash)
                })
                .await
            }
            At::JetStream(js) => tokens::lookup_jetstream(js, hash).await,
        }
    }

    /// Appends `entry` to the audit log, in a transaction of its own.
    pub async fn audit(&self, entry: Audit<'_>) -> Result<(), StoreError> {
        match &self.at {
            At::Sqlite(path) => {
                let (path, key) = (path.clone(), self.key.clone());
                let owned = [
                    entry.actor,
                    entry.action,
                    entry.target,
                    entry.result,
                    entry.detail,
                ]
                .map(str::to_owned);
                blocking(move || {
                    let [actor, action, target, result, detail] = &owned;
                    let mut conn = open_admin(&path)?;
                    let tx = conn
                        .transaction_with_behavior(TransactionBehavior::Immediate)
                        .at(&path)?;
                    audit::append(
                        &tx,
                        &path,
                        &key,
                        &audit::Entry {
                            ts: clock::unix_now(),
                            actor,
                            action,
                            target,
                            result,
                            detail,
                        },
                    )?;
                    tx.commit().at(&path)
                })
                .await
            }
            At::JetStream(js) => {
                js.audit_append(
                    &self.key,
                    &audit::Entry {
                        ts: clock::unix_now(),
                        actor: entry.actor,
                        action: entry.action,
                        target: entry.target,
                        result: entry.result,
                        detail: entry.detail,
                    },
                )
                .await?;
                Ok(())
            }
        }
    }

    /// The key the API's audit entries are signed with.
    pub fn key(&self) -> &AuditKey {
        &self.key
    }
}

/// Runs `f` on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| StoreError::Closed)?
}
