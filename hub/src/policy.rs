//! Policy versions in the hub's store, and the watch that hands the version
//! in force to every agent session.
//!
//! The store is the source of truth: `policy apply` (an operator verb, in its
//! own process) validates a document against the hub's sinks and regions and
//! commits it as the next version together with its audit entry; the running
//! hub notices the new version within [`POLL`] and pushes it to every
//! connected agent. The newest version is the one in force; rolling back is
//! applying an old version's text again, as a new version.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use outpost_protocols::policy::{digest, Catalog, Policy, PolicyError, PolicyVersion};
use rusqlite::{params, Connection, OptionalExtension as _, TransactionBehavior};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::clock;
use crate::config::HubConfig;
use crate::store::audit;
use crate::store::{AtPath as _, StoreError, StoreReader};

/// How often the running hub looks for a newly applied version.
pub const POLL: Duration = Duration::from_secs(1);

/// The hub's catalog of sinks: its store, in `[hub] region`, and each
/// `[[sinks]]` entry in its own region.
pub fn catalog(cfg: &HubConfig) -> Catalog {
    cfg.sinks
        .iter()
        .fold(Catalog::hub(cfg.hub.region.as_deref()), |c, s| {
            c.with_sink(&s.id, s.region.as_deref())
        })
}

/// One stored version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PolicyRecord {
    /// The version.
    pub version: u64,
    /// When it was applied, Unix ns.
    pub applied_at: i64,
    /// Who applied it.
    pub actor: String,
    /// The file it came from, or `rollback to N`.
    pub source: String,
    /// SHA-256 of the text.
    pub digest: String,
    /// The document.
    pub text: String,
}

/// The policy in force, compiled for nobody yet: each session compiles it for
/// its agent's labels.
#[derive(Debug)]
pub struct FleetPolicy {
    /// Its version (0: none applied).
    pub version: PolicyVersion,
    /// Its text, pushed to agents.
    pub text: String,
    /// The parsed document.
    pub policy: Policy,
}

impl FleetPolicy {
    /// No policy: allow everything, to the store.
    pub fn none() -> FleetPolicy {
        FleetPolicy {
            version: PolicyVersion(0),
            text: String::new(),
            policy: Policy::default(),
        }
    }
}

/// Why a policy could not be applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The document was refused; nothing changed but the audit log, which
    /// records the refusal.
    #[error("{source_name}: {error}")]
    Refused {
        /// The file, or `version N`.
        source_name: String,
        /// Why.
        error: PolicyError,
    },
    /// No such version to roll back to or show.
    #[error("no policy version {0}")]
    UnknownVersion(u64),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What `apply` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "lowercase")]
pub enum Applied {
    /// Stored as this new version.
    New {
        /// The version.
        version: u64,
        /// Its digest.
        digest: String,
    },
    /// The text is the version in force already; nothing was stored.
    Unchanged {
        /// The version in force.
        version: u64,
    },
}

/// Validates `text` against `catalog` and stores it as the next version, with
/// its audit entry, in one transaction. A refused document stores nothing but
/// the audit entry of the refusal.
pub fn apply(
    conn: &mut Connection,
    path: &Path,
    text: &str,
    source: &str,
    actor: &str,
    catalog: &Catalog,
) -> Result<Applied, ApplyError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    let outcome = apply_in(&tx, path, text, source, actor, catalog);
    // A refusal commits its audit entry; an error of the store commits
    // nothing.
    if matches!(outcome, Ok(_) | Err(ApplyError::Refused { .. })) {
        tx.commit().at(path)?;
    }
    outcome
}

/// [`apply`] inside the caller's write transaction (an approval commits the
/// proposal's state with the version it became). On
/// [`ApplyError::Refused`] the `policy.refused` entry is in `tx`: commit it.
pub fn apply_in(
    tx: &rusqlite::Transaction<'_>,
    path: &Path,
    text: &str,
    source: &str,
    actor: &str,
    catalog: &Catalog,
) -> Result<Applied, ApplyError> {
    let ts = clock::unix_now();
    let d = digest(text);
    if let Err(error) = Policy::parse(text, catalog) {
        audit::append(
            tx,
            path,
            &audit::Entry {
                ts,
                actor,
                action: "policy.refused",
                target: source,
                result: "refused",
                detail: &format!("digest {d}: {error}"),
            },
        )?;
        return Err(ApplyError::Refused {
            source_name: source.to_owned(),
            error,
        });
    }
    if let Some(cur) = current(tx, path)? {
        if cur.digest == d {
            return Ok(Applied::Unchanged {
                version: cur.version,
            });
        }
    }
    let version: i64 = tx
        .query_row(
            "SELECT coalesce(max(version), 0) + 1 FROM policies",
            [],
            |r| r.get(0),
        )
        .at(path)?;
    tx.execute(
        "INSERT INTO policies (version, applied_at, actor, source, digest, text)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![version, ts.0, actor, source, d, text],
    )
    .at(path)?;
    audit::append(
        tx,
        path,
        &audit::Entry {
            ts,
            actor,
            action: "policy.applied",
            target: &format!("policy v{version}"),
            result: "ok",
            detail: &format!("from {source}, digest {d}"),
        },
    )?;
    Ok(Applied::New {
        version: u64::try_from(version).unwrap_or(0),
        digest: d,
    })
}

/// Applies the text of an older version again, as a new version.
pub fn rollback(
    conn: &mut Connection,
    path: &Path,
    to: u64,
    actor: &str,
    catalog: &Catalog,
) -> Result<Applied, ApplyError> {
    let old = get(conn, path, to)?.ok_or(ApplyError::UnknownVersion(to))?;
    apply(
        conn,
        path,
        &old.text,
        &format!("rollback to {to}"),
        actor,
        catalog,
    )
}

fn record(r: &rusqlite::Row<'_>) -> rusqlite::Result<PolicyRecord> {
    Ok(PolicyRecord {
        version: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
        applied_at: r.get(1)?,
        actor: r.get(2)?,
        source: r.get(3)?,
        digest: r.get(4)?,
        text: r.get(5)?,
    })
}

const COLUMNS: &str = "version, applied_at, actor, source, digest, text";

/// The version in force: the newest.
pub fn current(conn: &Connection, path: &Path) -> Result<Option<PolicyRecord>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM policies ORDER BY version DESC LIMIT 1"
    ))
    .and_then(|mut s| s.query_row([], record).optional())
    .at(path)
}

/// One version.
pub fn get(
    conn: &Connection,
    path: &Path,
    version: u64,
) -> Result<Option<PolicyRecord>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM policies WHERE version = ?1"
    ))
    .and_then(|mut s| {
        s.query_row([i64::try_from(version).unwrap_or(i64::MAX)], record)
            .optional()
    })
    .at(path)
}

/// Every version, oldest first.
pub fn history(conn: &Connection, path: &Path) -> Result<Vec<PolicyRecord>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!("SELECT {COLUMNS} FROM policies ORDER BY version"))
        .at(path)?;
    let rows = stmt.query_map([], record).at(path)?;
    rows.collect::<Result<Vec<_>, _>>().at(path)
}

fn newest_version(conn: &Connection, path: &Path) -> Result<u64, StoreError> {
    let v: i64 = conn
        .query_row("SELECT coalesce(max(version), 0) FROM policies", [], |r| {
            r.get(0)
        })
        .at(path)?;
    Ok(u64::try_from(v).unwrap_or(0))
}

/// Parses a stored version for the running hub. It was valid against the
/// catalog when applied; if the hub's sinks changed since, it is still
/// enforced (the last-step residency check keeps every event inside its
/// regions) and the operator is told to apply a fixed one.
fn load(record: PolicyRecord, catalog: &Catalog) -> Option<FleetPolicy> {
    let policy = match Policy::parse(&record.text, catalog) {
        Ok(p) => p,
        Err(e) => {
            warn!(version = record.version, error = %e, "The policy in force no longer validates against this hub's sinks; enforcing it anyway. Apply a corrected policy.");
            match Policy::parse(&record.text, &Catalog::trusting()) {
                Ok(p) => p,
                Err(e) => {
                    error!(version = record.version, error = %e, "The policy in force cannot be parsed by this build; keeping the previous one.");
                    return None;
                }
            }
        }
    };
    Some(FleetPolicy {
        version: PolicyVersion(record.version),
        text: record.text,
        policy,
    })
}

/// Where the policy versions are: the SQLite store's file, or the JetStream
/// store's `<prefix>_policy` bucket.
#[derive(Debug, Clone)]
pub enum PolicySource {
    /// `<data_dir>/hub.db`.
    Sqlite(PathBuf),
    /// The JetStream store.
    JetStream(Box<crate::store::jetstream::JetStreamStore>),
}

impl PolicySource {
    async fn newest(&self) -> Result<u64, StoreError> {
        match self {
            PolicySource::Sqlite(path) => on_sqlite(path, newest_version).await,
            PolicySource::JetStream(js) => js.newest_policy().await,
        }
    }

    async fn current(&self) -> Result<Option<PolicyRecord>, StoreError> {
        match self {
            PolicySource::Sqlite(path) => on_sqlite(path, current).await,
            PolicySource::JetStream(js) => Ok(js.policies::<PolicyRecord>().await?.pop()),
        }
    }
}

/// Runs `read` on a reader of the SQLite store at `path`, on the blocking
/// pool (the running hub's runtime must not wait on the file).
async fn on_sqlite<T: Send + 'static>(
    path: &Path,
    read: fn(&Connection, &Path) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let reader = StoreReader::open(&path)?;
        read(reader.connection(), &path)
    })
    .await
    .map_err(|_| StoreError::Closed)?
}

/// Reads the version in force now and starts a task that publishes every
/// newer one, until `shutdown`.
pub async fn watch(
    source: PolicySource,
    catalog: Catalog,
    shutdown: CancellationToken,
) -> Result<
    (
        watch::Receiver<Arc<FleetPolicy>>,
        tokio::task::JoinHandle<()>,
    ),
    StoreError,
> {
    let initial = Arc::new(
        source
            .current()
            .await?
            .and_then(|r| load(r, &catalog))
            .unwrap_or_else(FleetPolicy::none),
    );
    if initial.version.0 > 0 {
        info!(
            version = initial.version.0,
            rules = initial.policy.rules.len(),
            "Policy in force."
        );
    }
    let (tx, rx) = watch::channel(initial);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let seen = tx.borrow().version.0;
            let found = match source.newest().await {
                Ok(n) if n <= seen => Ok(None),
                Ok(_) => source
                    .current()
                    .await
                    .map(|r| r.and_then(|r| load(r, &catalog))),
                Err(e) => Err(e),
            };
            match found {
                Ok(Some(p)) => {
                    info!(
                        version = p.version.0,
                        rules = p.policy.rules.len(),
                        "New policy in force; pushing it to connected agents."
                    );
                    tx.send_replace(Arc::new(p));
                }
                Ok(None) => {}
                Err(e) => warn!(error = %e, "Cannot read the policy versions."),
            }
        }
    });
    Ok((rx, task))
}

/// Validates `text` against `catalog` and stores it as the next version in
/// the JetStream store's policy bucket. Concurrent appliers (on any
/// replica's machine) are serialised by the bucket: a version number is
/// created once, and the loser tries the next one. A refused document
/// stores nothing.
pub async fn apply_jetstream(
    js: &crate::store::jetstream::JetStreamStore,
    text: &str,
    source: &str,
    actor: &str,
    catalog: &Catalog,
) -> Result<Applied, ApplyError> {
    let d = digest(text);
    if let Err(error) = Policy::parse(text, catalog) {
        return Err(ApplyError::Refused {
            source_name: source.to_owned(),
            error,
        });
    }
    loop {
        let all: Vec<PolicyRecord> = js.policies().await?;
        if let Some(cur) = all.last() {
            if cur.digest == d {
                return Ok(Applied::Unchanged {
                    version: cur.version,
                });
            }
        }
        let version = all.last().map_or(0, |r| r.version) + 1;
        let record = PolicyRecord {
            version,
            applied_at: clock::unix_now().0,
            actor: actor.to_owned(),
            source: source.to_owned(),
            digest: d.clone(),
            text: text.to_owned(),
        };
        if js.create_policy(version, &record).await? {
            return Ok(Applied::New { version, digest: d });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::open_admin;

    const DENY: &str = "[[rules]]\nstreams = [\"plant/debug/#\"]\naction = \"deny\"\n";
    const RESIDENCY: &str =
        "[[residency]]\nstreams = [\"hr/#\"]\nclassification = \"personal\"\nhome = \"eu-west\"\n";

    fn open() -> (tempfile::TempDir, PathBuf, Connection) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        let conn = open_admin(&path).expect("opens");
        (dir, path, conn)
    }

    #[test]
    fn applying_stores_versions_in_order_and_rolling_back_makes_a_new_one() {
        let (_d, path, mut conn) = open();
        let c = Catalog::hub(Some("eu-west"));
        let v1 = apply(&mut conn, &path, DENY, "a.toml", "ops", &c).expect("applies");
        assert!(matches!(v1, Applied::New { version: 1, .. }));
        assert_eq!(
            apply(&mut conn, &path, DENY, "a.toml", "ops", &c).expect("same text"),
            Applied::Unchanged { version: 1 }
        );
        let v2 = apply(&mut conn, &path, RESIDENCY, "b.toml", "ops", &c).expect("applies");
        assert!(matches!(v2, Applied::New { version: 2, .. }));
        let back = rollback(&mut conn, &path, 1, "ops", &c).expect("rolls back");
        assert!(matches!(back, Applied::New { version: 3, .. }));
        let cur = current(&conn, &path).expect("reads").expect("one");
        assert_eq!(
            (cur.version, cur.text.as_str(), cur.source.as_str()),
            (3, DENY, "rollback to 1")
        );
        assert_eq!(history(&conn, &path).expect("reads").len(), 3);
        assert!(matches!(
            rollback(&mut conn, &path, 9, "ops", &c),
            Err(ApplyError::UnknownVersion(9))
        ));
        let actions: Vec<String> = audit::list(&conn, &path, None)
            .expect("lists")
            .into_iter()
            .map(|e| e.action)
            .collect();
        assert_eq!(actions, ["policy.applied"; 3]);
    }

    #[test]
    fn a_refused_policy_changes_nothing_but_the_audit_log() {
        let (_d, path, mut conn) = open();
        let eu = Catalog::hub(Some("eu-west"));
        apply(&mut conn, &path, DENY, "a.toml", "ops", &eu).expect("applies");
        let us = Catalog::hub(Some("us-east"));
        let e = apply(&mut conn, &path, RESIDENCY, "bad.toml", "ops", &us).expect_err("refused");
        let line = e.to_string();
        assert!(
            line.starts_with("bad.toml: defaults.sinks[0]: residency:"),
            "{line}"
        );
        assert_eq!(
            current(&conn, &path).expect("reads").expect("one").version,
            1
        );
        let last = audit::list(&conn, &path, Some(1)).expect("lists").remove(0);
        assert_eq!(
            (last.action.as_str(), last.result.as_str()),
            ("policy.refused", "refused")
        );
        assert!(last.detail.contains("residency"), "{}", last.detail);
        assert!(matches!(
            audit::verify(&conn, &path).expect("reads"),
            audit::Verdict::Intact { entries: 2, .. }
        ));
    }
}
