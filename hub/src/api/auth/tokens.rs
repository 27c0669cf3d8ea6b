//! Static API tokens, for automation that has no identity provider: made by
//! `outpost-hub token create`, shown once, kept only as a SHA-256 hash,
//! expiring, revocable, each creation and revocation audited.
//!
//! ```text
//! token   = "opt_" 64 lowercase hex digits      256 random bits (ring's
//!                                               SystemRandom)
//! stored  = hex(SHA-256(token))                 what the store keeps
//!
//! SQLite: api_tokens(name PRIMARY KEY, role, hash UNIQUE, created_at,
//!                    created_by, expires_at, revoked_at, revoked_by)
//! JetStream: KV <prefix>_api_tokens
//!            n.<name> → JSON record (with the hash)
//!            h.<hash> → the name
//! ```
//!
//! Why a plain SHA-256 and not a password hash: the token is 256 random
//! bits, not a password, so nobody can guess it from its hash and a slow
//! hash would only slow every API call down. Why names are never reused: a
//! caller's subject is `token:<name>`, and the audit log must not mix two
//! tokens under one name; a revoked token stays listed.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use outpost_protocols::event::Timestamp;
use rusqlite::{params, Connection, OptionalExtension as _, TransactionBehavior};
use serde::{Deserialize, Serialize};

use crate::api::auth::role::Role;
use crate::audit::key::AuditKey;
use crate::clock;
use crate::store::audit;
use crate::store::jetstream::JetStreamStore;
use crate::store::{AtPath as _, StoreError};

/// What every static token starts with, so that a scanner (and the hub)
/// can tell one from a JWT.
pub const PREFIX: &str = "opt_";

/// The token lifetime when `--ttl` is not given.
pub const DEFAULT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// The JetStream bucket's name after the prefix.
pub const BUCKET: &str = "api_tokens";

/// A stored token, without its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Its name; the caller's subject is `token:<name>`.
    pub name: String,
    /// The role it acts in.
    pub role: Role,
    /// When it was made, Unix ns.
    pub created_at: i64,
    /// Who made it.
    pub created_by: String,
    /// When it stops working, Unix ns.
    pub expires_at: i64,
    /// When it was revoked, Unix ns.
    #[serde(default)]
    pub revoked_at: Option<i64>,
    /// Who revoked it.
    #[serde(default)]
    pub revoked_by: Option<String>,
}

impl TokenRecord {
    /// The subject of a caller with this token.
    pub fn subject(&self) -> String {
        format!("token:{}", self.name)
    }

    /// `active`, `expired` or `revoked` at `now`.
    pub fn state(&self, now: Timestamp) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if now.0 >= self.expires_at {
            "expired"
        } else {
            "active"
        }
    }
}

/// The JetStream record: the token's record and its hash.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredToken {
    #[serde(flatten)]
    record: TokenRecord,
    hash: String,
}

/// A token just made: the secret (shown once) and its record.
#[derive(Debug, Clone, Serialize)]
pub struct Created {
    /// The token itself; nothing else ever shows it again.
    pub token: String,
    /// What was stored.
    #[serde(flatten)]
    pub record: TokenRecord,
}

/// Why a token verb failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// `--name` is not a token name.
    #[error("--name {0:?}: use 1 to 64 of A-Z a-z 0-9 . _ -, starting with a letter or digit")]
    BadName(String),
    /// `--ttl` is zero or too long.
    #[error("--ttl: {0}")]
    BadTtl(String),
    /// A token of that name exists or existed.
    #[error(
        "a token named {0:?} exists already (revoked tokens keep their name): pick another name"
    )]
    NameTaken(String),
    /// No token of that name.
    #[error("no token named {0:?}")]
    Unknown(String),
    /// The system gave no randomness.
    #[error("no randomness from the system to make a token")]
    Random,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl TokenError {
    /// 2 for bad input, 1 for a store that failed.
    pub fn exit_code(&self) -> u8 {
        match self {
            TokenError::Store(_) | TokenError::Random => 1,
            _ => 2,
        }
    }
}

/// Checks a token name.
pub fn check_name(name: &str) -> Result<(), TokenError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(TokenError::BadName(name.to_owned()))
    }
}

/// A new token's text.
fn generate() -> Result<String, TokenError> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| TokenError::Random)?;
    let mut s = String::with_capacity(PREFIX.len() + 64);
    s.push_str(PREFIX);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    Ok(s)
}

/// The stored form of `token`.
pub fn hash(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Whether `text` has the shape of one of our tokens (not whether it is
/// valid).
pub fn looks_like_token(text: &str) -> bool {
    text.strip_prefix(PREFIX)
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn new_record(
    name: &str,
    role: Role,
    ttl: Duration,
    actor: &str,
) -> Result<TokenRecord, TokenError> {
    check_name(name)?;
    if ttl.is_zero() {
        return Err(TokenError::BadTtl("must be more than 0".into()));
    }
    let now = clock::unix_now().0;
    let ttl_ns = i64::try_from(ttl.as_nanos())
        .ok()
        .filter(|t| now.checked_add(*t).is_some())
        .ok_or_else(|| TokenError::BadTtl("too long".into()))?;
    Ok(TokenRecord {
        name: name.to_owned(),
        role,
        created_at: now,
        created_by: actor.to_owned(),
        expires_at: now + ttl_ns,
        revoked_at: None,
        revoked_by: None,
    })
}

fn expiry_text(r: &TokenRecord) -> String {
    crate::verbs::time_text(Timestamp(r.expires_at))
}

// ---- SQLite ----

const COLUMNS: &str = "name, role, created_at, created_by, expires_at, revoked_at, revoked_by";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TokenRecord> {
    let role: String = r.get(1)?;
    Ok(TokenRecord {
        name: r.get(0)?,
        // A role this build does not know (a newer hub wrote it) reads as
        // the least one: it may read, nothing else.
        role: role.parse().unwrap_or(Role::Viewer),
        created_at: r.get(2)?,
        created_by: r.get(3)?,
        expires_at: r.get(4)?,
        revoked_at: r.get(5)?,
        revoked_by: r.get(6)?,
    })
}

/// Makes a token and stores it with its `token.created` entry in one
/// transaction.
pub fn create_sqlite(
    conn: &mut Connection,
    path: &Path,
    key: &AuditKey,
    name: &str,
    role: Role,
    ttl: Duration,
    actor: &str,
) -> Result<Created, TokenError> {
    let record = new_record(name, role, ttl, actor)?;
    let token = generate()?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    let exists: Option<String> = tx
        .query_row("SELECT name FROM api_tokens WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()
        .at(path)?;
    if exists.is_some() {
        return Err(TokenError::NameTaken(name.to_owned()));
    }
    tx.execute(
        "INSERT INTO api_tokens (name, role, hash, created_at, created_by, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            record.name,
            record.role.name(),
            hash(&token),
            record.created_at,
            record.created_by,
            record.expires_at
        ],
    )
    .at(path)?;
    audit::append(
        &tx,
        path,
        key,
        &audit::Entry {
            ts: Timestamp(record.created_at),
            actor,
            action: "token.created",
            target: &record.subject(),
            result: "ok",
            detail: &format!("role {}, expires {}", record.role, expiry_text(&record)),
        },
    )?;
    tx.commit().at(path)?;
    Ok(Created { token, record })
}

/// Revokes the token `name` with its `token.revoked` entry; `false` if it
/// was revoked already (nothing is written then).
pub fn revoke_sqlite(
    conn: &mut Connection,
    path: &Path,
    key: &AuditKey,
    name: &str,
    actor: &str,
) -> Result<bool, TokenError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    let found = tx
        .query_row(
            &format!("SELECT {COLUMNS} FROM api_tokens WHERE name = ?1"),
            [name],
            row,
        )
        .optional()
        .at(path)?
        .ok_or_else(|| TokenError::Unknown(name.to_owned()))?;
    if found.revoked_at.is_some() {
        return Ok(false);
    }
    let now = clock::unix_now();
    tx.execute(
        "UPDATE api_tokens SET revoked_at = ?2, revoked_by = ?3 WHERE name = ?1",
        params![name, now.0, actor],
    )
    .at(path)?;
    audit::append(
        &tx,
        path,
        key,
        &audit::Entry {
            ts: now,
            actor,
            action: "token.revoked",
            target: &found.subject(),
            result: "ok",
            detail: &format!("role {}", found.role),
        },
    )?;
    tx.commit().at(path)?;
    Ok(true)
}

/// Every token, oldest first.
pub fn list_sqlite(conn: &Connection, path: &Path) -> Result<Vec<TokenRecord>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM api_tokens ORDER BY created_at, name"
        ))
        .at(path)?;
    let rows = stmt.query_map([], row).at(path)?;
    rows.collect::<Result<Vec<_>, _>>().at(path)
}

/// The token whose hash is `hash`, whatever its state.
pub fn lookup_sqlite(
    conn: &Connection,
    path: &Path,
    hash: &str,
) -> Result<Option<TokenRecord>, StoreError> {
    conn.prepare_cached(&format!("SELECT {COLUMNS} FROM api_tokens WHERE hash = ?1"))
        .and_then(|mut s| s.query_row([hash], row).optional())
        .at(path)
}

// ---- JetStream ----

fn name_key(name: &str) -> String {
    format!("n.{name}")
}
fn hash_key(hash: &str) -> String {
    format!("h.{hash}")
}

/// [`create_sqlite`] on the JetStream store.
pub async fn create_jetstream(
    js: &JetStreamStore,
    key: &AuditKey,
    name: &str,
    role: Role,
    ttl: Duration,
    actor: &str,
) -> Result<Created, TokenError> {
    let record = new_record(name, role, ttl, actor)?;
    let token = generate()?;
    let h = hash(&token);
    let stored = StoredToken {
        record: record.clone(),
        hash: h.clone(),
    };
    let value = serde_json::to_vec(&stored).unwrap_or_default();
    if !js.kv_create(BUCKET, &name_key(name), value).await? {
        return Err(TokenError::NameTaken(name.to_owned()));
    }
    js.kv_put(BUCKET, &hash_key(&h), name.as_bytes().to_vec())
        .await?;
    js.audit_append(
        key,
        &audit::Entry {
            ts: Timestamp(record.created_at),
            actor,
            action: "token.created",
            target: &record.subject(),
            result: "ok",
            detail: &format!("role {}, expires {}", record.role, expiry_text(&record)),
        },
    )
    .await?;
    Ok(Created { token, record })
}

/// [`revoke_sqlite`] on the JetStream store.
pub async fn revoke_jetstream(
    js: &JetStreamStore,
    key: &AuditKey,
    name: &str,
    actor: &str,
) -> Result<bool, TokenError> {
    let entry = name_key(name);
    for _ in 0..32 {
        let Some((value, revision)) = js.kv_entry(BUCKET, &entry).await? else {
            return Err(TokenError::Unknown(name.to_owned()));
        };
        let Ok(mut stored) = serde_json::from_slice::<StoredToken>(&value) else {
            return Err(TokenError::Unknown(name.to_owned()));
        };
        if stored.record.revoked_at.is_some() {
            return Ok(false);
        }
        stored.record.revoked_at = Some(clock::unix_now().0);
        stored.record.revoked_by = Some(actor.to_owned());
        let value = serde_json::to_vec(&stored).unwrap_or_default();
        if js.kv_update(BUCKET, &entry, value, revision).await? {
            js.audit_append(
                key,
                &audit::Entry {
                    ts: clock::unix_now(),
                    actor,
                    action: "token.revoked",
                    target: &stored.record.subject(),
                    result: "ok",
                    detail: &format!("role {}", stored.record.role),
                },
            )
            .await?;
            return Ok(true);
        }
    }
    Err(TokenError::Store(js.error(
        "revoking an API token",
        "the token's record kept changing",
    )))
}

/// [`list_sqlite`] on the JetStream store.
pub async fn list_jetstream(js: &JetStreamStore) -> Result<Vec<TokenRecord>, StoreError> {
    let mut out = Vec::new();
    for key in js.kv_keys(BUCKET).await? {
        if !key.starts_with("n.") {
            continue;
        }
        if let Some((v, _)) = js.kv_entry(BUCKET, &key).await? {
            if let Ok(s) = serde_json::from_slice::<StoredToken>(&v) {
                out.push(s.record);
            }
        }
    }
    out.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
    Ok(out)
}

/// [`lookup_sqlite`] on the JetStream store.
pub async fn lookup_jetstream(
    js: &JetStreamStore,
    hash: &str,
) -> Result<Option<TokenRecord>, StoreError> {
    let Some((name, _)) = js.kv_entry(BUCKET, &hash_key(hash)).await? else {
        return Ok(None);
    };
    let name = String::from_utf8_lossy(&name).into_owned();
    let Some((v, _)) = js.kv_entry(BUCKET, &name_key(&name)).await? else {
        return Ok(None);
    };
    Ok(serde_json::from_slice::<StoredToken>(&v)
        .ok()
        .filter(|s| s.hash == hash)
        .map(|s| s.record))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::open_admin;

    #[test]
    fn a_token_is_stored_only_as_its_hash_and_found_by_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        let mut conn = open_admin(&path).expect("opens");
        let k = AuditKey::generate().expect("key");
        let made = create_sqlite(
            &mut conn,
            &path,
            &k,
            "ci",
            Role::Operator,
            DEFAULT_TTL,
            "ops",
        )
        .expect("creates");
        assert!(looks_like_token(&made.token), "{}", made.token);
        let stored: String = conn
            .query_row("SELECT hash FROM api_tokens", [], |r| r.get(0))
            .expect("reads");
        assert_eq!(stored, hash(&made.token));
        assert!(!stored.contains(&made.token[PREFIX.len()..]));
        let found = lookup_sqlite(&conn, &path, &hash(&made.token))
            .expect("reads")
            .expect("found");
        assert_eq!(
            (found.subject().as_str(), found.role),
            ("token:ci", Role::Operator)
        );
        assert_eq!(found.state(clock::unix_now()), "active");
        assert!(lookup_sqlite(&conn, &path, &hash("opt_00"))
            .expect("reads")
            .is_none());
        // Two tokens never share a secret.
        let other = create_sqlite(
            &mut conn,
            &path,
            &k,
            "ci-2",
            Role::Viewer,
            DEFAULT_TTL,
            "ops",
        )
        .expect("creates");
        assert_ne!(other.token, made.token);
    }

    #[test]
    fn revoking_is_audited_once_and_a_name_is_never_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        let mut conn = open_admin(&path).expect("opens");
        let k = AuditKey::generate().expect("key");
        create_sqlite(
            &mut conn,
            &path,
            &k,
            "ci",
            Role::Admin,
            Duration::from_secs(60),
            "ops",
        )
        .expect("creates");
        assert!(revoke_sqlite(&mut conn, &path, &k, "ci", "sec").expect("revokes"));
        assert!(!revoke_sqlite(&mut conn, &path, &k, "ci", "sec").expect("again"));
        assert!(matches!(
            revoke_sqlite(&mut conn, &path, &k, "nobody", "sec"),
            Err(TokenError::Unknown(_))
        ));
        assert!(matches!(
            create_sqlite(&mut conn, &path, &k, "ci", Role::Viewer, DEFAULT_TTL, "ops"),
            Err(TokenError::NameTaken(_))
        ));
        let all = list_sqlite(&conn, &path).expect("lists");
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].state(clock::unix_now()), "revoked");
        assert_eq!(all[0].revoked_by.as_deref(), Some("sec"));
        let entries: Vec<(String, String, String)> = audit::list(&conn, &path, None)
            .expect("lists")
            .into_iter()
            .map(|e| (e.actor, e.action, e.target))
            .collect();
        assert_eq!(
            entries,
            [
                ("ops".into(), "token.created".into(), "token:ci".into()),
                ("sec".into(), "token.revoked".into(), "token:ci".into())
            ]
        );
    }

    #[test]
    fn bad_names_and_ttls_are_refused() {
        for bad in ["", "-x", "a b", "ä", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name("ci.nightly_2-b").is_ok());
        assert!(matches!(
            new_record("ci", Role::Viewer, Duration::ZERO, "ops"),
            Err(TokenError::BadTtl(_))
        ));
        assert!(matches!(
            new_record("ci", Role::Viewer, Duration::from_secs(u64::MAX), "ops"),
            Err(TokenError::BadTtl(_))
        ));
    }
}
