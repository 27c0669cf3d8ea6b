//! One-time enrollment tokens on JetStream: one JSON record per token in
//! `<prefix>_enrollments`, keyed by the token's SHA-256 (never the token).
//!
//! A use is a compare-and-set on the record's revision: of two replicas
//! taking one token at once, one writes `used_at` and the other's write
//! fails on the revision, reads the record again and finds it used. So a
//! token raced from two addresses, even through two replicas, issues one
//! certificate.

use std::collections::BTreeMap;

use async_nats::jetstream::kv;
use outpost_protocols::event::{AgentId, Timestamp};

use super::connection::{Conflict, JetStreamStore, CAS_TRIES};
use crate::store::error::StoreError;
use crate::store::records::{EnrollmentRecord, TokenRefusal};

impl JetStreamStore {
    /// Stores a new token.
    pub async fn enrollment_create(&self, rec: &EnrollmentRecord) -> Result<(), StoreError> {
        let what = "storing an enrollment token";
        let value = serde_json::to_vec(rec).map_err(|e| self.fail(what, e))?;
        self.enrollments
            .create(&rec.token_hash, value.into())
            .await
            .map_err(|e| self.fail(what, e))?;
        Ok(())
    }

    /// Every token, newest first.
    pub async fn enrollments(&self) -> Result<Vec<EnrollmentRecord>, StoreError> {
        let what = "listing enrollment tokens";
        let keys = self.keys_of(&self.enrollments, what).await?;
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(v) = self
                .enrollments
                .get(k.clone())
                .await
                .map_err(|e| self.fail(what, e))?
            {
                if let Ok(rec) = serde_json::from_slice::<EnrollmentRecord>(&v) {
                    out.push(rec);
                }
            }
        }
        out.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then(a.token_hash.cmp(&b.token_hash))
        });
        Ok(out)
    }

    /// Changes the record under `key` by compare-and-set: `change` returns
    /// what to write, or an outcome to return without writing.
    async fn enrollment_cas<T>(
        &self,
        key: &str,
        what: &str,
        change: impl Fn(Option<EnrollmentRecord>) -> Result<EnrollmentRecord, T>,
    ) -> Result<Result<EnrollmentRecord, T>, StoreError> {
        for _ in 0..CAS_TRIES {
            let entry = self
                .enrollments
                .entry(key)
                .await
                .map_err(|e| self.fail(what, e))?;
            let (rec, revision) = match entry {
                Some(e) if e.operation == kv::Operation::Put => (
                    serde_json::from_slice::<EnrollmentRecord>(&e.value).ok(),
                    Some(e.revision),
                ),
                Some(e) => (None, Some(e.revision)),
                None => (None, None),
            };
            let new = match change(rec) {
                Ok(new) => new,
                Err(outcome) => return Ok(Err(outcome)),
            };
            let value = serde_json::to_vec(&new).map_err(|e| self.fail(what, e))?;
            match self
                .put_at(&self.enrollments, key, value.into(), revision)
                .await
            {
                Ok(_) => return Ok(Ok(new)),
                Err(Conflict::Moved) => continue,
                Err(Conflict::Failed(m)) => return Err(self.fail(what, m)),
            }
        }
        Err(self.fail(
            what,
            format!("{CAS_TRIES} compare-and-set conflicts in a row"),
        ))
    }

    /// Revokes the pending tokens `matches` selects; the tokens revoked.
    pub async fn enrollment_revoke(
        &self,
        now: Timestamp,
        matches: impl Fn(&EnrollmentRecord) -> bool,
    ) -> Result<Vec<EnrollmentRecord>, StoreError> {
        let mut revoked = Vec::new();
        for rec in self.enrollments().await? {
            if rec.state(now.0) != "pending" || !matches(&rec) {
                continue;
            }
            let done = self
                .enrollment_cas(
                    &rec.token_hash,
                    "revoking an enrollment token",
                    |r| match r {
                        Some(mut r) if r.state(now.0) == "pending" => {
                            r.revoked_at = Some(now.0);
                            Ok(r)
                        }
                        _ => Err(()),
                    },
                )
                .await?;
            if let Ok(r) = done {
                revoked.push(r);
            }
        }
        Ok(revoked)
    }

    /// Takes the token with `token_hash` for `agent_id` from `from`, by
    /// compare-and-set; `Ok(Err(..))` says why it cannot be used.
    pub async fn enrollment_take(
        &self,
        token_hash: &str,
        agent_id: &str,
        from: &str,
        now: Timestamp,
    ) -> Result<Result<EnrollmentRecord, TokenRefusal>, StoreError> {
        self.enrollment_cas(token_hash, "taking an enrollment token", |r| {
            let mut r = r.ok_or(TokenRefusal::Unknown)?;
            r.check(agent_id, now.0)?;
            r.used_at = Some(now.0);
            r.used_from = Some(from.to_owned());
            Ok(r)
        })
        .await
    }

    /// Records the certificate a taken token issued, and the token's labels
    /// on the agent's registry record (created if the hub never saw it).
    pub async fn enrollment_complete(
        &self,
        token_hash: &str,
        agent_id: &AgentId,
        labels: &BTreeMap<String, String>,
        serial: &str,
        fingerprint: &str,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.enrollment_cas(token_hash, "recording an issued certificate", |r| {
            let mut r = r.ok_or(())?;
            r.serial = Some(serial.to_owned());
            r.fingerprint = Some(fingerprint.to_owned());
            Ok(r)
        })
        .await?
        .map_err(|()| self.fail("recording an issued certificate", "the token is gone"))?;
        self.update_agent(agent_id, |a| a.enrolled(labels, now.0))
            .await?;
        // A live session of a re-enrolled agent follows its new labels.
        self.raise_trust_generation().await
    }
}
