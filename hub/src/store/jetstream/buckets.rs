//! Key-value buckets for the layers above the store (the API's tokens and
//! policy proposals): opened, or created, by name on first use and kept,
//! with the few operations those layers need.
//!
//! Why the store hands out raw bytes here instead of typed records, as it
//! does for policy versions: the records belong to `api::auth`, which sits
//! above the store; the store only names the bucket (`<prefix>_<name>`, made
//! by the same convention as its own) and does the compare-and-set.

use std::time::Duration;

use async_nats::jetstream::kv;

use super::connection::JetStreamStore;
use super::setup;
use crate::store::error::StoreError;

impl JetStreamStore {
    async fn bucket(&self, name: &str) -> Result<kv::Store, StoreError> {
        if let Some(b) = self.extra.0.lock().ok().and_then(|m| m.get(name).cloned()) {
            return Ok(b);
        }
        let b = setup::open_bucket(&self.cfg, &self.js, name, Duration::ZERO).await?;
        if let Ok(mut m) = self.extra.0.lock() {
            m.insert(name.to_owned(), b.clone());
        }
        Ok(b)
    }

    /// Stores `value` under `key` in bucket `name` if the key does not
    /// exist; `false` if it does.
    pub async fn kv_create(
        &self,
        name: &str,
        key: &str,
        value: Vec<u8>,
    ) -> Result<bool, StoreError> {
        let b = self.bucket(name).await?;
        match b.create(key, value.into()).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(self.fail(format!("creating {key} in {name}"), e)),
        }
    }

    /// Stores `value` under `key` in bucket `name`, whatever was there.
    pub async fn kv_put(&self, name: &str, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let b = self.bucket(name).await?;
        b.put(key, value.into())
            .await
            .map_err(|e| self.fail(format!("writing {key} in {name}"), e))?;
        Ok(())
    }

    /// The value under `key` in bucket `name` and its revision, if the key
    /// holds one.
    pub async fn kv_entry(
        &self,
        name: &str,
        key: &str,
    ) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        let b = self.bucket(name).await?;
        let entry = b
            .entry(key)
            .await
            .map_err(|e| self.fail(format!("reading {key} in {name}"), e))?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| (e.value.to_vec(), e.revision)))
    }

    /// Replaces the value under `key` if it is still at `revision`; `false`
    /// if another writer changed it first.
    pub async fn kv_update(
        &self,
        name: &str,
        key: &str,
        value: Vec<u8>,
        revision: u64,
    ) -> Result<bool, StoreError> {
        let b = self.bucket(name).await?;
        match b.update(key, value.into(), revision).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(e) => Err(self.fail(format!("updating {key} in {name}"), e)),
        }
    }

    /// Every key of bucket `name`, in order.
    pub async fn kv_keys(&self, name: &str) -> Result<Vec<String>, StoreError> {
        let b = self.bucket(name).await?;
        Ok(self
            .keys_of(&b, &format!("listing {name}"))
            .await?
            .into_iter()
            .collect())
    }

    /// An error of this store, for a layer above that found something
    /// wrong in what it read.
    pub fn error(&self, what: &str, message: &str) -> StoreError {
        self.fail(what, message.to_owned())
    }
}
