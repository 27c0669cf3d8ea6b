//! Opening the store: connecting, checking the server, and creating the
//! streams and buckets that are missing.
//!
//! Why the buckets' streams are made here, by the key-value convention
//! (ADR-8: stream `KV_<bucket>`, subjects `$KV.<bucket>.>`, one message per
//! subject, rollups allowed, deletes denied), rather than by async-nats's
//! `create_key_value`: that one first asks for the account's info, whose
//! reply from nats-server 2.9 (Debian 12's) async-nats 0.46 cannot parse.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};

use super::settings::JetStreamStoreConfig;
use crate::clock;
use crate::nats::{self, Endpoint};
use crate::store::error::StoreError;

/// How long a replica's key in `<prefix>_replicas` outlives its last
/// refresh.
pub(super) const REPLICA_TTL: Duration = Duration::from_secs(30);
/// How long a sink's lease in `<prefix>_sink_leases` outlives its last
/// refresh (see `sink_queues`).
pub const LEASE_TTL: Duration = Duration::from_secs(15);

/// Publishes a replica may have awaiting their acknowledgement at once.
const MAX_ACK_INFLIGHT: usize = 65_536;

/// The error of a step of opening: `what` the hub was doing.
fn fail(
    cfg: &JetStreamStoreConfig,
    what: &str,
    error: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> StoreError {
    StoreError::JetStream {
        url: cfg.url.clone(),
        what: what.to_owned(),
        source: std::sync::Arc::from(error.into()),
    }
}

/// Connects to the servers (credentials and TLS from files relative to
/// `base`), letting async-nats reconnect on its own afterwards; the client
/// and a JetStream context on it.
pub(super) async fn connect(
    cfg: &JetStreamStoreConfig,
    base: &Path,
) -> Result<(async_nats::Client, jetstream::Context), StoreError> {
    let endpoint = Endpoint::read(
        &cfg.url,
        cfg.servers.clone(),
        cfg.credentials.as_deref(),
        cfg.tls.as_ref(),
        base,
    )
    .map_err(|e| fail(cfg, &format!("store.jetstream.{}", e.key()), e))?;
    if endpoint.tls_required() && !endpoint.has_tls() {
        return Err(fail(
            cfg,
            "store.jetstream.tls",
            "a tls:// server needs a [store.jetstream.tls] table with its CA",
        ));
    }
    let options = endpoint
        .options("outpost-hub store", cfg.timeout)
        .map_err(|e| fail(cfg, &format!("store.jetstream.{}", e.key()), e))?
        .request_timeout(Some(cfg.timeout))
        .reconnect_delay_callback(|n| {
            Duration::from_millis(50u64.saturating_mul(1 << n.min(6))).min(Duration::from_secs(2))
        });
    let client = options
        .connect(endpoint.servers().to_vec())
        .await
        .map_err(|e| fail(cfg, "connecting", e))?;
    let js = nats::jetstream(client.clone(), cfg.timeout, MAX_ACK_INFLIGHT);
    Ok((client, js))
}

/// The largest event an agent may send must fit in one message, or its
/// batch would fail for good and wedge the agent's upload.
pub(super) fn check_max_payload(
    cfg: &JetStreamStoreConfig,
    client: &async_nats::Client,
) -> Result<(), StoreError> {
    let max_payload = client.server_info().max_payload;
    let needed = outpost_protocols::wire::MAX_FRAME_LEN + 4096;
    if max_payload < needed {
        return Err(fail(
            cfg,
            "checking the server",
            format!(
                "its max_payload is {max_payload} bytes, and an event may be up to {} bytes: set `max_payload: 8MB` in nats-server's config",
                outpost_protocols::wire::MAX_FRAME_LEN
            ),
        ));
    }
    Ok(())
}

/// The events stream and the sinks' queues: the same settings, each on
/// subjects of its own. Returns the sinks' stream, which the store reads.
pub(super) async fn open_streams(
    cfg: &JetStreamStoreConfig,
    js: &jetstream::Context,
) -> Result<stream::Stream, StoreError> {
    open_stream(cfg, js, &cfg.stream, &cfg.subject).await?;
    open_stream(cfg, js, &cfg.sinks_stream, &cfg.sinks_subject).await
}

async fn open_stream(
    cfg: &JetStreamStoreConfig,
    js: &jetstream::Context,
    name: &str,
    prefix: &str,
) -> Result<stream::Stream, StoreError> {
    let config = stream::Config {
        name: name.to_owned(),
        subjects: vec![format!("{prefix}.>")],
        duplicate_window: cfg.duplicate_window,
        num_replicas: cfg.replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    js.get_or_create_stream(config)
        .await
        .map_err(|e| fail(cfg, &format!("stream {name}"), e.to_string()))
}

/// The audit stream's name and subject (`<PREFIX>_AUDIT`, `<prefix>_audit`;
/// see `audit`): one subject, so that the stream's last sequence is the
/// chain's head.
pub(super) fn audit_names(cfg: &JetStreamStoreConfig) -> (String, String) {
    let prefix = &cfg.bucket_prefix;
    (
        format!("{}_AUDIT", prefix.to_ascii_uppercase()),
        format!("{prefix}_audit"),
    )
}

/// The audit stream, created if missing: no message removed through the
/// API, reads from the leader (an appender must chain to the newest entry,
/// not a lagging follower's).
pub(super) async fn open_audit_stream(
    cfg: &JetStreamStoreConfig,
    js: &jetstream::Context,
) -> Result<stream::Stream, StoreError> {
    let (name, subject) = audit_names(cfg);
    let config = stream::Config {
        name: name.clone(),
        subjects: vec![subject],
        num_replicas: cfg.replicas,
        storage: stream::StorageType::File,
        deny_delete: true,
        deny_purge: true,
        allow_direct: false,
        ..Default::default()
    };
    js.get_or_create_stream(config)
        .await
        .map_err(|e| fail(cfg, &format!("stream {name}"), e.to_string()))
}

/// The key-value buckets (`<prefix>_<name>`).
pub(super) struct Buckets {
    pub(super) watermarks: kv::Store,
    pub(super) agents: kv::Store,
    pub(super) policy: kv::Store,
    pub(super) replicas: kv::Store,
    pub(super) shared: kv::Store,
    pub(super) sink_counters: kv::Store,
    pub(super) sink_leases: kv::Store,
    pub(super) enrollments: kv::Store,
}

impl Buckets {
    /// Opens every bucket, creating those that are missing.
    pub(super) async fn open(
        cfg: &JetStreamStoreConfig,
        js: &jetstream::Context,
    ) -> Result<Buckets, StoreError> {
        Ok(Buckets {
            watermarks: open_bucket(cfg, js, "watermarks", Duration::ZERO).await?,
            agents: open_bucket(cfg, js, "agents", Duration::ZERO).await?,
            policy: open_bucket(cfg, js, "policy", Duration::ZERO).await?,
            replicas: open_bucket(cfg, js, "replicas", REPLICA_TTL).await?,
            shared: open_bucket(cfg, js, "hub", Duration::ZERO).await?,
            sink_counters: open_bucket(cfg, js, "sinks", Duration::ZERO).await?,
            sink_leases: open_bucket(cfg, js, "sink_leases", LEASE_TTL).await?,
            enrollments: open_bucket(cfg, js, "enrollments", Duration::ZERO).await?,
        })
    }
}

/// One bucket, its stream made by the key-value convention (see the module
/// doc); keys older than `max_age` (zero: none) expire.
pub(super) async fn open_bucket(
    cfg: &JetStreamStoreConfig,
    js: &jetstream::Context,
    name: &str,
    max_age: Duration,
) -> Result<kv::Store, StoreError> {
    let bucket = cfg.bucket(name);
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        // Reads from the stream's leader, not any replica: a compare-and-set
        // needs the current revision, and a follower's may lag.
        allow_direct: false,
        num_replicas: cfg.replicas,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    };
    let failed = |e: String| fail(cfg, &format!("bucket {bucket}"), e);
    js.get_or_create_stream(config)
        .await
        .map_err(|e| failed(e.to_string()))?;
    js.get_key_value(&bucket)
        .await
        .map_err(|e| failed(e.to_string()))
}

/// This replica's id: the host, the process and a little of the clock, so
/// that a restarted replica is a new one.
pub(super) fn replica_name() -> String {
    format!(
        "{}-{}-{:x}",
        hostname(),
        std::process::id(),
        clock::unix_now().0 as u64 & 0xff_ffff
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "hub".into())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
