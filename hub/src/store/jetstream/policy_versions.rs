//! The fleet policy's versions on JetStream: `<prefix>_policy`, one key per
//! version (`v.<version, 20 digits>`, so that keys sort as versions do),
//! each holding the version's JSON record.
//!
//! Why the record's type is the caller's (`T`): the policy layer, above the
//! store, owns what a version says; the store only keeps versions apart and
//! in order, and creates each number once, which is what serialises
//! concurrent appliers.

use async_nats::jetstream::kv;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::connection::JetStreamStore;
use crate::store::error::StoreError;

/// The key of version `version`.
fn key(version: u64) -> String {
    format!("v.{version:020}")
}

impl JetStreamStore {
    /// The keys of the versions, oldest first.
    async fn policy_keys(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .keys_of(&self.policy, "listing policy versions")
            .await?
            .into_iter()
            .collect())
    }

    /// Every policy version, oldest first.
    pub async fn policies<T: DeserializeOwned>(&self) -> Result<Vec<T>, StoreError> {
        let keys = self.policy_keys().await?;
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(v) = self
                .policy
                .get(k.clone())
                .await
                .map_err(|e| self.fail("reading policy versions", e))?
            {
                let rec: T = serde_json::from_slice(&v)
                    .map_err(|e| self.fail(format!("reading policy {k}"), e))?;
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// The newest policy version's number (0: none), without reading the
    /// documents.
    pub async fn newest_policy(&self) -> Result<u64, StoreError> {
        Ok(self
            .policy_keys()
            .await?
            .iter()
            .filter_map(|k| k.strip_prefix("v.").and_then(|n| n.parse().ok()))
            .max()
            .unwrap_or(0))
    }

    /// Stores `record` as version `version` if no version has that number
    /// yet; `Ok(false)` if one has (another applier got there first).
    pub async fn create_policy<T: Serialize>(
        &self,
        version: u64,
        record: &T,
    ) -> Result<bool, StoreError> {
        let value = serde_json::to_vec(record).unwrap_or_default();
        match self.policy.create(key(version), value.into()).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(self.fail(format!("storing policy version {version}"), e)),
        }
    }
}
