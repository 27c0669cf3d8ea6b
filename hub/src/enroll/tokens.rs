//! One-time tokens: made from 32 random bytes (256 bits, base64url), kept
//! only as their SHA-256, in the hub's store, whichever it is.
//!
//! On SQLite, `store::enrollments` writes each change in one transaction
//! with its audit entry. On JetStream, the `<prefix>_enrollments` bucket
//! holds them, and each change's entry is appended to the store's audit
//! stream after it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use outpost_protocols::event::{AgentId, Timestamp};
use ring::rand::SecureRandom as _;
use tracing::info;

use crate::audit::key::AuditKey;
use crate::store::jetstream::JetStreamStore;
use crate::store::{enrollments, open_admin, EnrollmentRecord, StoreError, TokenRefusal};

/// Random bytes in a token.
pub const TOKEN_BYTES: usize = 32;

/// Why a token could not be made or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The system's random number generator failed.
    #[error("the system's random number generator failed")]
    NoRandomness,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A blocking store task did not finish.
    #[error("the store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A new token: its value (to hand to the operator once) and its hash (to
/// keep).
pub fn new_token() -> Result<(String, String), TokenError> {
    let mut bytes = [0u8; TOKEN_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| TokenError::NoRandomness)?;
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let hash = hash(&token);
    Ok((token, hash))
}

/// The shortest and longest token lifetime.
pub const TTL_RANGE: (Duration, Duration) =
    (Duration::from_secs(60), Duration::from_secs(30 * 24 * 3600));

/// A token lifetime as the operator writes it (`1h`, `2d`); `None` outside
/// [`TTL_RANGE`] or unreadable.
pub fn parse_ttl(text: &str) -> Option<Duration> {
    humantime::parse_duration(text)
        .ok()
        .filter(|d| (TTL_RANGE.0..=TTL_RANGE.1).contains(d))
}

/// A new pending token for `agent_id` made by `actor` now, valid for `ttl`:
/// its value (to hand over once) and the record to store.
pub fn new_enrollment(
    agent_id: &AgentId,
    labels: BTreeMap<String, String>,
    actor: String,
    ttl: Duration,
) -> Result<(String, EnrollmentRecord), TokenError> {
    let (token, token_hash) = new_token()?;
    let now = crate::clock::unix_now().0;
    let ttl_ns = i64::try_from(ttl.as_nanos()).unwrap_or(i64::MAX);
    Ok((
        token,
        EnrollmentRecord {
            token_hash,
            agent_id: agent_id.to_string(),
            labels,
            created_at: now,
            created_by: actor,
            expires_at: now.saturating_add(ttl_ns),
            used_at: None,
            used_from: None,
            revoked_at: None,
            serial: None,
            fingerprint: None,
        },
    ))
}

/// The SHA-256 of a token, lowercase hex: how the store names it. A plain
/// hash suffices: a token has 256 random bits, so there is nothing to guess.
#[must_use]
pub fn hash(token: &str) -> String {
    outpost_tls::fingerprint_sha256(token.as_bytes())
}

/// Where a hub keeps its tokens, and the key that signs their audit
/// entries.
#[derive(Debug, Clone)]
pub enum Tokens {
    /// The SQLite store file.
    Sqlite(PathBuf, AuditKey),
    /// The JetStream store.
    JetStream(Box<JetStreamStore>, AuditKey),
}

/// Appends one `enroll.*` entry to a JetStream store's audit stream.
async fn audit_js(
    js: &JetStreamStore,
    key: &AuditKey,
    actor: &str,
    action: &str,
    target: &str,
    result: &str,
    detail: &str,
) -> Result<(), TokenError> {
    js.audit_append(
        key,
        &crate::store::audit::Entry {
            ts: crate::clock::unix_now(),
            actor,
            action,
            target,
            result,
            detail,
        },
    )
    .await?;
    Ok(())
}

impl Tokens {
    /// Runs `f` on a write connection to the SQLite file, off the runtime.
    async fn sqlite<T: Send + 'static>(
        path: &std::path::Path,
        f: impl FnOnce(&mut rusqlite::Connection, &std::path::Path) -> Result<T, StoreError>
            + Send
            + 'static,
    ) -> Result<T, TokenError> {
        let path = path.to_owned();
        Ok(tokio::task::spawn_blocking(move || {
            let mut conn = open_admin(&path)?;
            f(&mut conn, &path)
        })
        .await??)
    }

    /// Stores a new token and audits `enroll.created`.
    pub async fn create(&self, rec: EnrollmentRecord) -> Result<(), TokenError> {
        match self {
            Tokens::Sqlite(path, key) => {
                let key = key.clone();
                Self::sqlite(path, move |c, p| enrollments::create(c, p, &key, &rec)).await
            }
            Tokens::JetStream(js, key) => {
                js.enrollment_create(&rec).await?;
                info!(agent_id = %rec.agent_id, token = rec.id(), actor = %rec.created_by, "enroll.created");
                let detail = format!(
                    "token {}, labels {}",
                    rec.id(),
                    serde_json::to_string(&rec.labels).unwrap_or_default()
                );
                audit_js(
                    js,
                    key,
                    &rec.created_by,
                    "enroll.created",
                    &rec.agent_id,
                    "ok",
                    &detail,
                )
                .await
            }
        }
    }

    /// Every token, newest first.
    pub async fn list(&self) -> Result<Vec<EnrollmentRecord>, TokenError> {
        match self {
            Tokens::Sqlite(path, _) => Self::sqlite(path, |c, p| enrollments::list(c, p)).await,
            Tokens::JetStream(js, _) => Ok(js.enrollments().await?),
        }
    }

    /// Revokes the pending tokens `matches` selects, auditing each.
    pub async fn revoke(
        &self,
        actor: &str,
        now: Timestamp,
        matches: impl Fn(&EnrollmentRecord) -> bool + Send + 'static,
    ) -> Result<Vec<EnrollmentRecord>, TokenError> {
        match self {
            Tokens::Sqlite(path, key) => {
                let (actor, key) = (actor.to_owned(), key.clone());
                Self::sqlite(path, move |c, p| {
                    enrollments::revoke(c, p, &key, &actor, now, matches)
                })
                .await
            }
            Tokens::JetStream(js, key) => {
                let revoked = js.enrollment_revoke(now, matches).await?;
                for r in &revoked {
                    info!(agent_id = %r.agent_id, token = r.id(), %actor, "enroll.revoked");
                    let detail = format!("token {}", r.id());
                    audit_js(js, key, actor, "enroll.revoked", &r.agent_id, "ok", &detail).await?;
                }
                Ok(revoked)
            }
        }
    }

    /// Takes `token` for `agent_id`, atomically.
    pub async fn take(
        &self,
        token: &str,
        agent_id: &AgentId,
        from: &str,
        now: Timestamp,
    ) -> Result<Result<EnrollmentRecord, TokenRefusal>, TokenError> {
        let h = hash(token);
        match self {
            Tokens::Sqlite(path, _) => {
                let (agent, from) = (agent_id.to_string(), from.to_owned());
                Self::sqlite(path, move |c, p| {
                    enrollments::take(c, p, &h, &agent, &from, now)
                })
                .await
            }
            Tokens::JetStream(js, _) => {
                Ok(js.enrollment_take(&h, agent_id.as_str(), from, now).await?)
            }
        }
    }

    /// Records what a taken token issued, and the token's labels in the
    /// registry; audits `enroll.used` with `detail`.
    pub async fn complete(
        &self,
        rec: &EnrollmentRecord,
        agent_id: &AgentId,
        serial: &str,
        fingerprint: &str,
        detail: &str,
        now: Timestamp,
    ) -> Result<(), TokenError> {
        match self {
            Tokens::Sqlite(path, key) => {
                let key = key.clone();
                let (h, agent, labels) = (
                    rec.token_hash.clone(),
                    agent_id.to_string(),
                    rec.labels.clone(),
                );
                let (serial, fingerprint, detail) =
                    (serial.to_owned(), fingerprint.to_owned(), detail.to_owned());
                Self::sqlite(path, move |c, p| {
                    enrollments::complete(
                        c,
                        p,
                        &key,
                        &h,
                        &agent,
                        &labels,
                        &serial,
                        &fingerprint,
                        &detail,
                        now,
                    )
                })
                .await
            }
            Tokens::JetStream(js, key) => {
                js.enrollment_complete(
                    &rec.token_hash,
                    agent_id,
                    &rec.labels,
                    serial,
                    fingerprint,
                    now,
                )
                .await?;
                info!(%agent_id, %detail, "enroll.used");
                audit_js(
                    js,
                    key,
                    "hub",
                    "enroll.used",
                    agent_id.as_str(),
                    "ok",
                    detail,
                )
                .await
            }
        }
    }

    /// Audits `enroll.refused` for `agent_id` (the id claimed, or `-`).
    pub async fn refused(&self, agent_id: &str, detail: &str) -> Result<(), TokenError> {
        match self {
            Tokens::Sqlite(path, key) => {
                let (agent, detail, key) = (agent_id.to_owned(), detail.to_owned(), key.clone());
                Self::sqlite(path, move |c, p| {
                    enrollments::refused(c, p, &key, &agent, &detail)
                })
                .await
            }
            Tokens::JetStream(js, key) => {
                info!(agent_id, detail, "enroll.refused");
                audit_js(
                    js,
                    key,
                    "hub",
                    "enroll.refused",
                    agent_id,
                    "refused",
                    detail,
                )
                .await
            }
        }
    }
}

/// The labels of a record as `KEY=VALUE,...`, for people.
#[must_use]
pub fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_256_random_bits_and_are_kept_as_their_hash() {
        let (a, ha) = new_token().expect("a");
        let (b, hb) = new_token().expect("b");
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_eq!(ha, hash(&a));
        assert_ne!(ha, hb);
        assert_eq!(ha.len(), 64);
        assert!(!ha.contains(&a));
    }
}
