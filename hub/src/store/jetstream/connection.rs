//! The store's handle on NATS: its client and the stream and buckets it
//! uses ([`JetStreamStore`]), opened in named steps (`setup`), and what
//! every part of the store shares: errors that name the server and what the
//! hub was doing, a publish's acknowledgement checked to come from the
//! right stream, and compare-and-set of JSON records.

use std::collections::BTreeSet;
use std::future::IntoFuture as _;
use std::path::Path;

use async_nats::jetstream::{self, kv, stream};
use serde::Serialize;
use tracing::info;

use super::settings::JetStreamStoreConfig;
use super::setup;
use crate::store::error::StoreError;

/// Compare-and-set attempts before a conflict is an error.
pub(super) const CAS_TRIES: usize = 32;

/// The store: a connection and the stream and buckets it uses. Clones
/// share the connection.
#[derive(Clone)]
pub struct JetStreamStore {
    pub(super) client: async_nats::Client,
    pub(super) js: jetstream::Context,
    pub(super) cfg: JetStreamStoreConfig,
    pub(super) watermarks: kv::Store,
    pub(super) agents: kv::Store,
    pub(super) policy: kv::Store,
    pub(super) replicas: kv::Store,
    /// What every replica shares (the stateless-reset secret).
    pub(super) shared: kv::Store,
    /// The sinks' queues (see `sink_queues`).
    pub(super) sinks: stream::Stream,
    /// Each sink's counters, for `sinks status`.
    pub(super) sink_counters: kv::Store,
    /// Which replica runs each sink.
    pub(super) sink_leases: kv::Store,
    /// One-time enrollment tokens (see `enrollments`).
    pub(super) enrollments: kv::Store,
    /// The audit log (see `audit`).
    pub(super) audit: stream::Stream,
    pub(super) replica: String,
    /// Buckets of the layers above the store (`buckets`), opened on first
    /// use.
    pub(super) extra: Extra,
}

impl std::fmt::Debug for JetStreamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamStore")
            .field("url", &self.cfg.url)
            .field("stream", &self.cfg.stream)
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

impl JetStreamStore {
    /// Connects, and creates the stream and buckets that are missing (with
    /// `replicas` and `duplicate_window`); existing ones are used as they
    /// are. Relative file names are taken from `base`. Fails when the server
    /// cannot be reached within `timeout`: a replica without its store
    /// cannot serve.
    pub async fn open(
        cfg: &JetStreamStoreConfig,
        base: &Path,
    ) -> Result<JetStreamStore, StoreError> {
        let (client, js) = setup::connect(cfg, base).await?;
        setup::check_max_payload(cfg, &client)?;
        let sinks = setup::open_streams(cfg, &js).await?;
        let b = setup::Buckets::open(cfg, &js).await?;
        let audit = setup::open_audit_stream(cfg, &js).await?;
        let replica = setup::replica_name();
        info!(url = %cfg.url, stream = %cfg.stream, %replica, "Hub store on NATS JetStream.");
        Ok(JetStreamStore {
            client,
            js,
            cfg: cfg.clone(),
            watermarks: b.watermarks,
            agents: b.agents,
            policy: b.policy,
            replicas: b.replicas,
            shared: b.shared,
            sinks,
            sink_counters: b.sink_counters,
            sink_leases: b.sink_leases,
            enrollments: b.enrollments,
            audit,
            replica,
            extra: Extra::default(),
        })
    }

    /// The secret of the QUIC stateless resets, the same for every replica:
    /// made by the first and read by the others. With it, an agent whose
    /// connection a load balancer moved to another replica (or whose replica
    /// restarted) is told at once that the connection is gone, and redials
    /// instead of waiting out its idle timeout.
    pub async fn reset_secret(&self) -> Result<Vec<u8>, StoreError> {
        const KEY: &str = "quic-reset-secret";
        let what = "reading the stateless-reset secret";
        for _ in 0..CAS_TRIES {
            if let Some(v) = self.shared.get(KEY).await.map_err(|e| self.fail(what, e))? {
                if v.len() == 32 {
                    return Ok(v.to_vec());
                }
                return Err(self.fail(what, format!("{} bytes, not 32", v.len())));
            }
            let mut secret = vec![0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
                .map_err(|_| self.fail(what, "no randomness"))?;
            match self.shared.create(KEY, secret.clone().into()).await {
                Ok(_) => return Ok(secret),
                // Another replica made it first: read theirs.
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                Err(e) => return Err(self.fail(what, e)),
            }
        }
        Err(self.fail(what, "the secret kept changing"))
    }

    /// The store's error: what the hub was doing, and what the server or
    /// the client said (an async-nats error, or a sentence of ours).
    ///
    /// The error is kept whole, as the `StoreError`'s source.
    pub(super) fn fail(
        &self,
        what: impl Into<String>,
        error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> StoreError {
        StoreError::JetStream {
            url: self.cfg.url.clone(),
            what: what.into(),
            source: std::sync::Arc::from(error.into()),
        }
    }

    /// The acknowledgement of a publish, which must come from `stream`.
    pub(super) async fn acked_by(
        &self,
        ack: jetstream::context::PublishAckFuture,
        stream: &str,
        what: impl Fn() -> String,
    ) -> Result<jetstream::publish::PublishAck, StoreError> {
        let a = ack.into_future().await.map_err(|e| self.fail(what(), e))?;
        if a.stream != stream {
            return Err(self.fail(
                what(),
                format!("stored in stream {:?}, not {stream:?}", a.stream),
            ));
        }
        Ok(a)
    }

    /// This replica's id in the registry.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Read-modify-write of the JSON record under `key` in `bucket` by
    /// compare-and-set (a record that does not read starts from default).
    pub(super) async fn update_json<T>(
        &self,
        bucket: &kv::Store,
        key: &str,
        what: impl Fn() -> String,
        change: impl Fn(&mut T),
    ) -> Result<(), StoreError>
    where
        T: Default + Serialize + serde::de::DeserializeOwned,
    {
        for _ in 0..CAS_TRIES {
            let entry = bucket.entry(key).await.map_err(|e| self.fail(what(), e))?;
            let (mut rec, revision) = match entry {
                Some(e) if e.operation == kv::Operation::Put => (
                    serde_json::from_slice::<T>(&e.value).unwrap_or_default(),
                    Some(e.revision),
                ),
                Some(e) => (T::default(), Some(e.revision)),
                None => (T::default(), None),
            };
            change(&mut rec);
            let value = bytes::Bytes::from(serde_json::to_vec(&rec).unwrap_or_default());
            match self.put_at(bucket, key, value, revision).await {
                Ok(_) => return Ok(()),
                Err(Conflict::Moved) => continue,
                Err(Conflict::Failed(m)) => return Err(self.fail(what(), m)),
            }
        }
        Err(self.fail(
            what(),
            format!("{CAS_TRIES} compare-and-set conflicts in a row"),
        ))
    }

    /// Writes `value` under `key` if the key is still at `revision` (`None`:
    /// if it does not exist); its new revision.
    pub(super) async fn put_at(
        &self,
        bucket: &kv::Store,
        key: &str,
        value: bytes::Bytes,
        revision: Option<u64>,
    ) -> Result<u64, Conflict> {
        match revision {
            Some(r) => bucket.update(key, value, r).await.map_err(|e| {
                if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                    Conflict::Moved
                } else {
                    Conflict::Failed(e.to_string())
                }
            }),
            None => bucket.create(key, value).await.map_err(|e| {
                if e.kind() == kv::CreateErrorKind::AlreadyExists {
                    Conflict::Moved
                } else {
                    Conflict::Failed(e.to_string())
                }
            }),
        }
    }

    /// The keys of `bucket`, in order; `what` names the listing in an error.
    pub(super) async fn keys_of(
        &self,
        bucket: &kv::Store,
        what: &str,
    ) -> Result<BTreeSet<String>, StoreError> {
        use futures::TryStreamExt as _;
        bucket
            .keys()
            .await
            .map_err(|e| self.fail(what, e))?
            .try_collect()
            .await
            .map_err(|e| self.fail(what, e))
    }

    /// Flushes and closes the connection, waiting at most `timeout`.
    pub async fn close(self) {
        let _ = tokio::time::timeout(self.cfg.timeout, self.client.drain()).await;
    }
}

/// The buckets of the layers above the store opened so far (`buckets`),
/// shared by the store's clones.
#[derive(Clone, Default)]
pub(super) struct Extra(
    pub(super) std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, kv::Store>>>,
);

/// Why a compare-and-set write did not happen.
pub(super) enum Conflict {
    /// Another writer moved the key first: read it again.
    Moved,
    /// The server refused or did not answer.
    Failed(String),
}
