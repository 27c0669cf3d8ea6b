//! Policy versions in the hub's store, and the watch that hands the version
//! in force to every agent session.
//!
//! The store is the source of truth: `policy apply` (an operator verb, in its
//! own process) validates a document against the hub's sinks and regions and
//! commits it as the next version together with its audit entry; the running
//! hub notices the new version within [`POLL`] and pushes it to every
//! connected agent. The newest version is the one in force; rolling back is
//! applying an old version's text again, as a new version.
//!
//! Why a version is checked against the audit log when it is loaded: the
//! version's row (or key-value record) is only as safe as the store, and
//! anyone who can write `hub.db` could change the text in force. Its
//! `policy.applied` audit entry, appended with it and signed with the key
//! only the hub's user reads, says which digest was applied. A version whose
//! text does not hash to that digest (or to its own `digest` column), or
//! whose entry is missing, edited or not signed, is refused: logged at error
//! level and audited as `policy.tampered`; the hub keeps the version it
//! enforces, and refuses to start when it has none.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use outpost_protocols::policy::{digest, Catalog, HashingKey, Policy, PolicyError, PolicyVersion};
use rusqlite::{params, Connection, OptionalExtension as _, TransactionBehavior};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::audit::chain::Record;
use crate::audit::key::{AuditKey, PublicKey};
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
/// its agent's labels, and cuts out the agent's part to push to it.
#[derive(Debug)]
pub struct FleetPolicy {
    /// Its version (0: none applied).
    pub version: PolicyVersion,
    /// Its text, as applied: each agent is pushed its own part of it
    /// ([`Policy::scoped_text`]), never the whole.
    pub text: String,
    /// The parsed document, with the hub's hashing key (in a running hub).
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
    key: &AuditKey,
    text: &str,
    source: &str,
    actor: &str,
    catalog: &Catalog,
) -> Result<Applied, ApplyError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    let outcome = apply_in(&tx, path, key, text, source, actor, catalog);
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
    key: &AuditKey,
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
            key,
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
        key,
        &audit::Entry {
            ts,
            actor,
            action: "policy.applied",
            target: &target(u64::try_from(version).unwrap_or(0)),
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
    key: &AuditKey,
    to: u64,
    actor: &str,
    catalog: &Catalog,
) -> Result<Applied, ApplyError> {
    let old = get(conn, path, to)?.ok_or(ApplyError::UnknownVersion(to))?;
    apply(
        conn,
        path,
        key,
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

/// Parses a stored version for the running hub, with the hub's hashing
/// key. It was valid against the catalog when applied; if the hub's sinks
/// changed since, it is still enforced (the last-step residency check keeps
/// every event inside its regions) and the operator is told to apply a
/// fixed one.
///
/// A version applied before the hashing key moved to the hub's key file
/// carries a `[hashing] key`: it is enforced, that key is never used (it
/// was sent to every agent, so it counts as known), and the operator is
/// told to apply the policy again without it.
fn load(record: PolicyRecord, catalog: &Catalog, hashing: &HashingKey) -> Option<FleetPolicy> {
    let policy = match Policy::parse_stored(&record.text, catalog) {
        Ok(p) => p,
        Err(e) => {
            warn!(version = record.version, error = %e, "The policy in force no longer validates against this hub's sinks; enforcing it anyway. Apply a corrected policy.");
            match Policy::parse_stored(&record.text, &Catalog::trusting()) {
                Ok(p) => p,
                Err(e) => {
                    error!(version = record.version, error = %e, "The policy in force cannot be parsed by this build; keeping the previous one.");
                    return None;
                }
            }
        }
    };
    if policy.carries_hashing_key() {
        warn!(
            version = record.version,
            "The policy in force carries a [hashing] key from before the key moved to the hub's key file ([policy] hashing_key). That key is not used: it was sent to every agent. Rules hash with keys derived from the hub's key, so pseudonyms made from now on differ from earlier ones. Delete the [hashing] table and apply the policy again."
        );
    }
    Some(FleetPolicy {
        version: PolicyVersion(record.version),
        text: record.text,
        policy: policy.with_hashing_key(hashing.clone()),
    })
}

/// The audit target of version `version`'s entries: `policy v<version>`.
fn target(version: u64) -> String {
    format!("policy v{version}")
}

/// Why `record` is not the version that was applied, if it is not: its text
/// against its own digest and against the digest its signed `policy.applied`
/// entry names. `unsigned_ok`: the entry may be unsigned (it was written
/// before the hub had a key, and before the first signed entry).
pub fn tampered(
    record: &PolicyRecord,
    entry: Option<&Record>,
    unsigned_ok: bool,
    key: &PublicKey,
) -> Option<String> {
    let d = digest(&record.text);
    if d != record.digest {
        return Some(format!(
            "its text hashes to {} but its stored digest is {}",
            short(&d),
            short(&record.digest)
        ));
    }
    let Some(e) = entry else {
        return Some(format!(
            "the audit log has no policy.applied entry for version {}",
            record.version
        ));
    };
    if !e.hash_holds() {
        return Some(format!(
            "its policy.applied audit entry {} was changed after it was written",
            e.id
        ));
    }
    match &e.sig {
        Some(sig) if !key.verifies(&e.hash, sig) => {
            return Some(format!(
            "its policy.applied audit entry {}'s signature does not verify with the audit key {}",
            e.id,
            key.fingerprint()
        ))
        }
        Some(_) => {}
        None if unsigned_ok => {}
        None => {
            return Some(format!(
                "its policy.applied audit entry {} is not signed",
                e.id
            ))
        }
    }
    let applied = e.detail.rsplit_once("digest ").map(|(_, d)| d.trim());
    if applied != Some(d.as_str()) {
        return Some(format!(
            "its text hashes to {} but audit entry {} says version {} was applied with digest {}",
            short(&d),
            e.id,
            record.version,
            applied.map_or("(none)", short)
        ));
    }
    None
}

fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
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

    /// Version `version`'s `policy.applied` entry, and whether an unsigned
    /// one is acceptable (on SQLite: written before the first signed
    /// entry; the JetStream log was signed from its first entry).
    async fn applied_entry(&self, version: u64) -> Result<(Option<Record>, bool), StoreError> {
        match self {
            PolicySource::Sqlite(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    let reader = StoreReader::open(&path)?;
                    let c = reader.connection();
                    let entry = audit::find(c, &path, "policy.applied", &target(version))?;
                    let first = audit::first_signed(c, &path)?;
                    let unsigned_ok = match (&entry, first) {
                        (Some(e), Some(f)) => e.id < f,
                        (_, None) => true,
                        (None, Some(_)) => false,
                    };
                    Ok((entry, unsigned_ok))
                })
                .await
                .map_err(|_| StoreError::Closed)?
            }
            PolicySource::JetStream(js) => Ok((
                js.audit_find("policy.applied", &target(version)).await?,
                false,
            )),
        }
    }

    /// Appends `entry` to the audit log of this store.
    pub(crate) async fn audit(
        &self,
        key: &AuditKey,
        entry: audit::Entry<'_>,
    ) -> Result<u64, StoreError> {
        match self {
            PolicySource::Sqlite(path) => {
                let (path, key) = (path.clone(), key.clone());
                let (actor, action, target, result, detail) = (
                    entry.actor.to_owned(),
                    entry.action.to_owned(),
                    entry.target.to_owned(),
                    entry.result.to_owned(),
                    entry.detail.to_owned(),
                );
                let ts = entry.ts;
                tokio::task::spawn_blocking(move || {
                    let mut conn = crate::store::open_admin(&path)?;
                    let tx = conn
                        .transaction_with_behavior(TransactionBehavior::Immediate)
                        .at(&path)?;
                    let id = audit::append(
                        &tx,
                        &path,
                        &key,
                        &audit::Entry {
                            ts,
                            actor: &actor,
                            action: &action,
                            target: &target,
                            result: &result,
                            detail: &detail,
                        },
                    )?;
                    tx.commit().at(&path)?;
                    Ok(id)
                })
                .await
                .map_err(|_| StoreError::Closed)?
            }
            PolicySource::JetStream(js) => js.audit_append(key, &entry).await,
        }
    }

    /// The version in force now, checked against its audit entry: `None`
    /// for none; `Err(Tampered)` for a tampered one, logged and audited.
    /// On JetStream and unless `strict`, a version applied less than
    /// [`PENDING`] ago whose entry is not there yet is [`Loaded::Pending`]:
    /// there the version is stored before its entry is appended.
    async fn load_checked(
        &self,
        key: &AuditKey,
        catalog: &Catalog,
        hashing: &HashingKey,
        strict: bool,
    ) -> Result<Loaded, WatchError> {
        let Some(record) = self.current().await? else {
            return Ok(Loaded::None);
        };
        let (entry, unsigned_ok) = self.applied_entry(record.version).await?;
        let young = clock::unix_now().0.saturating_sub(record.applied_at)
            < i64::try_from(PENDING.as_nanos()).unwrap_or(i64::MAX);
        // On SQLite a version and its entry commit together: nothing to
        // wait for.
        let apart = matches!(self, PolicySource::JetStream(_));
        if apart && !strict && entry.is_none() && young && digest(&record.text) == record.digest {
            return Ok(Loaded::Pending);
        }
        if let Some(reason) = tampered(&record, entry.as_ref(), unsigned_ok, &key.public_key()) {
            let version = record.version;
            error!(version, %reason, "POLICY TAMPERED: the stored policy version is not the one that was applied; refusing it.");
            let detail = format!("refused at load: {reason}");
            let audited = self
                .audit(
                    key,
                    audit::Entry {
                        ts: clock::unix_now(),
                        actor: "hub",
                        action: "policy.tampered",
                        target: &target(version),
                        result: "refused",
                        detail: &detail,
                    },
                )
                .await;
            if let Err(e) = audited {
                error!(version, error = %e, "Cannot audit the tampered policy version.");
            }
            return Err(WatchError::Tampered { version, reason });
        }
        Ok(load(record, catalog, hashing).map_or(Loaded::None, |p| Loaded::Good(Box::new(p))))
    }
}

/// How long a new version may wait for its `policy.applied` entry before it
/// is refused as tampered: an applier on JetStream stores the version, then
/// appends the entry.
pub const PENDING: Duration = Duration::from_secs(30);

/// What [`PolicySource::load_checked`] found.
enum Loaded {
    /// No version, or one this build cannot parse (logged).
    None,
    /// A version that holds.
    Good(Box<FleetPolicy>),
    /// A version whose audit entry may still come.
    Pending,
}

/// Why the policy watch could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The version in force was changed in the store after it was applied,
    /// and the hub has no good version to keep.
    #[error("policy version {version} in the store is not the one that was applied: {reason}; refusing to start with it (audited as policy.tampered). Apply a good policy (`outpost-hub policy apply`) and start again")]
    Tampered {
        /// The version.
        version: u64,
        /// What does not match.
        reason: String,
    },
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

/// Reads the version in force now (refusing a tampered one) and starts a
/// task that publishes every newer one that holds, until `shutdown`; a
/// newer one that does not hold is refused once and the one in force kept.
/// Each is published with the hub's `hashing` key.
pub async fn watch(
    source: PolicySource,
    catalog: Catalog,
    key: AuditKey,
    hashing: HashingKey,
    shutdown: CancellationToken,
) -> Result<
    (
        watch::Receiver<Arc<FleetPolicy>>,
        tokio::task::JoinHandle<()>,
    ),
    WatchError,
> {
    let started = clock::tokio_now();
    let initial = loop {
        let strict = clock::tokio_elapsed(started) >= PENDING;
        match source
            .load_checked(&key, &catalog, &hashing, strict)
            .await?
        {
            Loaded::Good(p) => break *p,
            Loaded::None => break FleetPolicy::none(),
            Loaded::Pending => {
                info!("The newest policy version's audit entry is not there yet; waiting for it.");
                tokio::select! {
                    () = shutdown.cancelled() => break FleetPolicy::none(),
                    () = tokio::time::sleep(POLL) => {}
                }
            }
        }
    };
    let initial = Arc::new(initial);
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
        // The newest version refused as tampered: not looked at again.
        let mut refused = 0;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let seen = tx.borrow().version.0;
            let found = match source.newest().await {
                Ok(n) if n <= seen || n == refused => Ok(None),
                Ok(n) => match source.load_checked(&key, &catalog, &hashing, false).await {
                    Err(WatchError::Tampered { .. }) => {
                        refused = n;
                        warn!(version = seen, "Keeping the policy version in force.");
                        Ok(None)
                    }
                    Err(WatchError::Store(e)) => Err(e),
                    Ok(Loaded::Good(p)) => Ok(Some(*p)),
                    Ok(Loaded::None | Loaded::Pending) => Ok(None),
                },
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

/// Appends version `version`'s `policy.applied` entry to the JetStream
/// store's audit log.
async fn audit_applied(
    js: &crate::store::jetstream::JetStreamStore,
    key: &AuditKey,
    actor: &str,
    version: u64,
    source: &str,
    digest: &str,
) -> Result<u64, StoreError> {
    js.audit_append(
        key,
        &audit::Entry {
            ts: clock::unix_now(),
            actor,
            action: "policy.applied",
            target: &target(version),
            result: "ok",
            detail: &format!("from {source}, digest {digest}"),
        },
    )
    .await
}

/// Validates `text` against `catalog` and stores it as the next version in
/// the JetStream store's policy bucket, then appends its `policy.applied`
/// entry to the store's audit log (a refusal appends `policy.refused`).
/// Concurrent appliers (on any replica's machine) are serialised by the
/// bucket: a version number is created once, and the loser tries the next
/// one. A version stored without its entry (the applier died in between)
/// is refused by the replicas as tampered; applying the same text again
/// appends the missing entry.
pub async fn apply_jetstream(
    js: &crate::store::jetstream::JetStreamStore,
    key: &AuditKey,
    text: &str,
    source: &str,
    actor: &str,
    catalog: &Catalog,
) -> Result<Applied, ApplyError> {
    let d = digest(text);
    if let Err(error) = Policy::parse(text, catalog) {
        js.audit_append(
            key,
            &audit::Entry {
                ts: clock::unix_now(),
                actor,
                action: "policy.refused",
                target: source,
                result: "refused",
                detail: &format!("digest {d}: {error}"),
            },
        )
        .await?;
        return Err(ApplyError::Refused {
            source_name: source.to_owned(),
            error,
        });
    }
    loop {
        let all: Vec<PolicyRecord> = js.policies().await?;
        if let Some(cur) = all.last() {
            if cur.digest == d {
                if js
                    .audit_find("policy.applied", &target(cur.version))
                    .await?
                    .is_none()
                {
                    audit_applied(js, key, actor, cur.version, &cur.source, &d).await?;
                    return Ok(Applied::New {
                        version: cur.version,
                        digest: d.clone(),
                    });
                }
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
            audit_applied(js, key, actor, version, source, &d).await?;
            return Ok(Applied::New {
                version,
                digest: d.clone(),
            });
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

    fn open() -> (tempfile::TempDir, PathBuf, Connection, AuditKey) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        let conn = open_admin(&path).expect("opens");
        (dir, path, conn, AuditKey::generate().expect("key"))
    }

    #[test]
    fn applying_stores_versions_in_order_and_rolling_back_makes_a_new_one() {
        let (_d, path, mut conn, k) = open();
        let c = Catalog::hub(Some("eu-west"));
        let v1 = apply(&mut conn, &path, &k, DENY, "a.toml", "ops", &c).expect("applies");
        assert!(matches!(v1, Applied::New { version: 1, .. }));
        assert_eq!(
            apply(&mut conn, &path, &k, DENY, "a.toml", "ops", &c).expect("same text"),
            Applied::Unchanged { version: 1 }
        );
        let v2 = apply(&mut conn, &path, &k, RESIDENCY, "b.toml", "ops", &c).expect("applies");
        assert!(matches!(v2, Applied::New { version: 2, .. }));
        let back = rollback(&mut conn, &path, &k, 1, "ops", &c).expect("rolls back");
        assert!(matches!(back, Applied::New { version: 3, .. }));
        let cur = current(&conn, &path).expect("reads").expect("one");
        assert_eq!(
            (cur.version, cur.text.as_str(), cur.source.as_str()),
            (3, DENY, "rollback to 1")
        );
        assert_eq!(history(&conn, &path).expect("reads").len(), 3);
        assert!(matches!(
            rollback(&mut conn, &path, &k, 9, "ops", &c),
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
        let (_d, path, mut conn, k) = open();
        let eu = Catalog::hub(Some("eu-west"));
        apply(&mut conn, &path, &k, DENY, "a.toml", "ops", &eu).expect("applies");
        let us = Catalog::hub(Some("us-east"));
        let e =
            apply(&mut conn, &path, &k, RESIDENCY, "bad.toml", "ops", &us).expect_err("refused");
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
            audit::verify(&conn, &path, &k.public_key(), None).expect("reads"),
            audit::Verdict::Intact { entries: 2, .. }
        ));
    }

    #[test]
    fn a_version_whose_text_or_entry_was_edited_is_found_tampered() {
        let (_d, path, mut conn, k) = open();
        let c = Catalog::hub(Some("eu-west"));
        apply(&mut conn, &path, &k, DENY, "a.toml", "ops", &c).expect("applies");
        let check = |conn: &Connection| {
            let rec = current(conn, &path).expect("reads").expect("one");
            let e = audit::find(conn, &path, "policy.applied", "policy v1").expect("reads");
            tampered(&rec, e.as_ref(), false, &k.public_key())
        };
        assert_eq!(check(&conn), None);
        // The text and its digest column edited together: the signed entry
        // still names the applied digest.
        let forged = "[[rules]]\nstreams = [\"#\"]\naction = \"allow\"\n";
        conn.execute(
            "UPDATE policies SET text = ?1, digest = ?2 WHERE version = 1",
            [forged, &digest(forged)],
        )
        .expect("tampers");
        let why = check(&conn).expect("tampered");
        assert!(why.contains("audit entry 1 says"), "{why}");
        // The entry edited to match: its hash no longer holds.
        conn.execute(
            "UPDATE audit SET detail = ?1 WHERE id = 1",
            [format!("from a.toml, digest {}", digest(forged))],
        )
        .expect("tampers");
        let why = check(&conn).expect("tampered");
        assert!(why.contains("changed after it was written"), "{why}");
        // Only the text edited: its own digest column disagrees.
        let (_d, path2, mut conn2, k2) = open();
        apply(&mut conn2, &path2, &k2, DENY, "a.toml", "ops", &c).expect("applies");
        conn2
            .execute(
                "UPDATE policies SET text = text || ' ' WHERE version = 1",
                [],
            )
            .expect("tampers");
        let rec = current(&conn2, &path2).expect("reads").expect("one");
        let why = tampered(&rec, None, false, &k2.public_key()).expect("tampered");
        assert!(why.contains("stored digest"), "{why}");
    }
}
