//! The audit log on JetStream: one chain that every replica and every
//! operator verb appends to.
//!
//! ```text
//! stream  <PREFIX>_AUDIT (OUTPOST_AUDIT)   subject <prefix>_audit
//!   one message per entry, in id order: entry id N is the Nth message
//!   payload: the JSON of crate::audit::chain::Record
//!            {"id", "ts", "actor", "action", "target", "result", "detail",
//!             "prev", "hash", "sig"}
//!   deny_delete, deny_purge: no message is removed through the API
//! ```
//!
//! Why a stream with an expected last sequence and not a compare-and-set
//! head in a bucket: the append and the head move are then one operation.
//! An appender reads the stream's last message (its sequence and its
//! entry), chains the new entry to it, and publishes with
//! `Nats-Expected-Last-Sequence` set to that sequence; if another appender
//! got there first the server refuses the publish ("wrong last sequence")
//! and the loser reads the head again and retries. So two replicas appending
//! at once still make one chain without forks or gaps.
//!
//! The stream's messages are not trusted for anything but order: every
//! entry's chain, signature and the anchor are checked by `audit verify`
//! exactly as on SQLite.

use std::future::IntoFuture as _;
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::stream::LastRawMessageErrorKind;

use super::connection::JetStreamStore;
use super::setup::audit_names as names;
use crate::audit::chain::{self, Entry, Record, GENESIS};
use crate::audit::key::{AuditKey, PublicKey};
use crate::store::error::StoreError;

/// Appends lost to another appender before giving up.
const APPEND_TRIES: u32 = 64;

impl JetStreamStore {
    /// Appends `entry`, signed with `key`, as the next entry of the chain;
    /// returns its id.
    pub async fn audit_append(&self, key: &AuditKey, entry: &Entry<'_>) -> Result<u64, StoreError> {
        let (_, subject) = names(&self.cfg);
        let what = || format!("appending {} to the audit log", entry.action);
        for attempt in 0..APPEND_TRIES {
            let (last, head) = self.audit_head().await?;
            let (id, prev) = match &head {
                Some(r) => (r.id + 1, r.hash.clone()),
                None => (1, GENESIS.to_owned()),
            };
            let record = chain::seal(&prev, id, entry, key);
            let payload = serde_json::to_vec(&record).unwrap_or_default();
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SEQUENCE,
                last.to_string().as_str(),
            );
            let ack = self
                .js
                .publish_with_headers(subject.clone(), headers, payload.into())
                .await
                .map_err(|e| self.fail(what(), e))?;
            match ack.into_future().await {
                Ok(a) if a.stream == self.audit.cached_info().config.name => return Ok(id),
                Ok(a) => {
                    return Err(self.fail(
                        what(),
                        format!(
                            "stored in stream {:?}, not {:?}",
                            a.stream,
                            self.audit.cached_info().config.name
                        ),
                    ))
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    // Another appender moved the head: chain to theirs. A
                    // little jitter keeps two losers from colliding again.
                    let ms = u64::from(attempt.min(8)) * 3 + u64::from(std::process::id() % 5);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                Err(e) => return Err(self.fail(what(), e)),
            }
        }
        Err(self.fail(
            what(),
            format!("{APPEND_TRIES} appends in a row lost to other appenders"),
        ))
    }

    /// The stream's last sequence (0: empty) and the entry there.
    async fn audit_head(&self) -> Result<(u64, Option<Record>), StoreError> {
        let what = "reading the audit log's head";
        let info = self
            .audit
            .get_info()
            .await
            .map_err(|e| self.fail(what, e))?;
        let last = info.state.last_sequence;
        if info.state.messages == 0 {
            return Ok((last, None));
        }
        Ok((last, self.audit_at(last).await?))
    }

    /// The entry stored at stream sequence `seq`; `None` if no message is
    /// there (removed).
    async fn audit_at(&self, seq: u64) -> Result<Option<Record>, StoreError> {
        let what = || format!("reading audit message {seq}");
        match self.audit.get_raw_message(seq).await {
            Ok(m) => serde_json::from_slice(&m.payload)
                .map(Some)
                .map_err(|e| self.fail(format!("{}: not an audit entry", what()), e)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(self.fail(what(), e)),
        }
    }

    /// The newest `limit` entries (all when `None`), oldest first.
    pub async fn audit_list(&self, limit: Option<usize>) -> Result<Vec<Record>, StoreError> {
        let what = "listing the audit log";
        let info = self
            .audit
            .get_info()
            .await
            .map_err(|e| self.fail(what, e))?;
        let (first, last) = (info.state.first_sequence.max(1), info.state.last_sequence);
        let mut out = Vec::new();
        let mut seq = last;
        while seq >= first && seq > 0 && limit.is_none_or(|n| out.len() < n) {
            if let Some(r) = self.audit_at(seq).await? {
                out.push(r);
            }
            seq -= 1;
        }
        out.reverse();
        Ok(out)
    }

    /// The newest `action` entry about `target`, searched from the newest
    /// back (a policy version's entry is near the end when it is loaded).
    pub async fn audit_find(
        &self,
        action: &str,
        target: &str,
    ) -> Result<Option<Record>, StoreError> {
        let info = self
            .audit
            .get_info()
            .await
            .map_err(|e| self.fail("searching the audit log", e))?;
        let first = info.state.first_sequence.max(1);
        let mut seq = info.state.last_sequence;
        while seq >= first && seq > 0 {
            if let Some(r) = self.audit_at(seq).await? {
                if r.action == action && r.target == target {
                    return Ok(Some(r));
                }
            }
            seq -= 1;
        }
        Ok(None)
    }

    /// Makes `key`'s public key the fleet's audit key in `<prefix>_hub` if
    /// none is yet, and refuses a different one: every replica must sign
    /// with the same key, or one chain would hold entries no single public
    /// key verifies.
    pub async fn claim_audit_key(&self, key: &AuditKey) -> Result<(), StoreError> {
        const KEY: &str = "audit-public-key";
        let what = "checking the fleet's audit key";
        let mine = key.public_key().to_hex();
        for _ in 0..super::connection::CAS_TRIES {
            if let Some(v) = self.shared.get(KEY).await.map_err(|e| self.fail(what, e))? {
                if v.as_ref() == mine.as_bytes() {
                    return Ok(());
                }
                return Err(self.fail(
                    what,
                    format!(
                        "this hub's audit key (public {}) is not the fleet's (public {} in bucket {}): copy the first replica's [audit] key file to every replica",
                        key.public_key().fingerprint(),
                        std::str::from_utf8(&v)
                            .ok()
                            .and_then(PublicKey::from_hex)
                            .map_or_else(|| "unreadable".to_owned(), |k| k.fingerprint()),
                        self.cfg.bucket("hub")
                    ),
                ));
            }
            match self
                .shared
                .create(KEY, mine.clone().into_bytes().into())
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {
                    continue
                }
                Err(e) => return Err(self.fail(what, e)),
            }
        }
        Err(self.fail(what, "the fleet's audit key kept changing"))
    }
}

impl JetStreamStore {
    /// Makes `key`'s fingerprint the fleet's hashing key in `<prefix>_hub`
    /// if none is yet, and refuses a different one: replicas hashing with
    /// different keys would give one badge number two pseudonyms. Only the
    /// fingerprint is stored (an HMAC under the key), never the key.
    pub async fn claim_hashing_key(
        &self,
        key: &outpost_protocols::policy::HashingKey,
    ) -> Result<(), StoreError> {
        const KEY: &str = "hashing-key-fingerprint";
        let what = "checking the fleet's hashing key";
        let mine = key.fingerprint();
        for _ in 0..super::connection::CAS_TRIES {
            if let Some(v) = self.shared.get(KEY).await.map_err(|e| self.fail(what, e))? {
                if v.as_ref() == mine.as_bytes() {
                    return Ok(());
                }
                return Err(self.fail(
                    what,
                    format!(
                        "this hub's hashing key (fingerprint {mine}) is not the fleet's (fingerprint {} in bucket {}): copy the first replica's [policy] hashing_key file to every replica",
                        String::from_utf8_lossy(&v),
                        self.cfg.bucket("hub")
                    ),
                ));
            }
            match self
                .shared
                .create(KEY, mine.clone().into_bytes().into())
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {
                    continue
                }
                Err(e) => return Err(self.fail(what, e)),
            }
        }
        Err(self.fail(what, "the fleet's hashing key kept changing"))
    }
}
