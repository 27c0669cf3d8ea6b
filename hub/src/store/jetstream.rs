//! The hub's store on NATS JetStream (`[store] kind = "jetstream"`): the hub
//! keeps no state of its own, so that several replicas can serve one fleet
//! side by side and an agent can reconnect to any of them.
//!
//! ```text
//! stream  <stream> (OUTPOST_EVENTS)      subjects <subject>.> (outpost.events.>)
//!   one message per event, subject <subject>.<agent_id>
//!   Nats-Msg-Id:    <agent_id>:<seq>     the stream drops a repeat within
//!                                        its duplicate_window
//!   Outpost-Stream: <stream name>        filter without decoding
//!   payload:        postcard EventBody   the bytes the agent's outbox held
//! KV <prefix>_watermarks  key <agent_id> → decimal seq: the highest seq
//!                                        stored for the agent; raised by
//!                                        compare-and-set, never lowered
//! KV <prefix>_agents      key <agent_id> → JSON registry record
//! KV <prefix>_policy      key v.<version, 20 digits> → JSON policy version
//! KV <prefix>_replicas    key <replica>  → JSON, max_age 30 s: who is alive
//! KV <prefix>_hub         key quic-reset-secret → 32 bytes shared by the
//!                                        replicas' QUIC endpoints
//! stream  <sinks_stream> (OUTPOST_SINKS), KV <prefix>_sinks and
//!   KV <prefix>_sink_leases: the sinks' queues, counters and leases (`sinkq`)
//! ```
//!
//! Why the watermark and not the stream's deduplication: JetStream forgets a
//! `Nats-Msg-Id` after its duplicate window (two minutes by default), and an
//! agent whose hub went away can send a batch again hours later. A replica
//! therefore stores nothing at or below the agent's watermark, and
//! acknowledges a batch only after (1) the stream acknowledged every publish
//! of it and (2) the watermark was raised past it by compare-and-set on its
//! KV revision, and (3) the batch follows what the watermark covers (a batch
//! queued behind one that failed is refused, or the watermark would pass
//! over the failed one's events). So every seq at or below the watermark is
//! in the stream, and a session resumes after the watermark.
//!
//! Why not resume after the agent's last message in the stream, which a
//! replica killed between (1) and (2) leaves above the watermark: the stream
//! may hold later events of a failed group without earlier ones (publishes
//! lost with a dropped connection, later ones sent on the next), so the last
//! message does not prove that everything before it is there. Those events
//! are sent again by the agent instead, and the duplicate window drops them:
//! exactly once when the agent is back within `duplicate_window` (two minutes
//! by default) of such a failure; after that, the events of that one
//! unacknowledged group may be stored twice, never lost.
//!
//! Why one publish per event and not one per batch: so that the stream's own
//! deduplication and consumers that filter by subject see events, not
//! batches. Publishes of a group are pipelined,
//! so a group costs one round trip for the acks and one per agent for the
//! watermark.
//!
//! The backend serves the same request queue as the SQLite writer
//! ([`StoreHandle`]), so agent sessions do not know which store they use. It
//! gathers the requests queued while the previous group was in flight into
//! one group, as the SQLite writer does for its transactions.
//!
//! The registry is informational (`fleet list`); it is updated by
//! compare-and-set too, so that two replicas never overwrite each other's
//! change. Sessions are counted per replica, and a replica that stopped
//! refreshing its key in `<prefix>_replicas` (killed) no longer counts.
//! `last_seen` from batches is written at most every [`SEEN_EVERY`] per
//! agent, to keep the registry off the ingest path.

use std::collections::{BTreeMap, HashMap};
use std::future::IntoFuture as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};
use async_nats::{ConnectOptions, ServerAddr};
use outpost_protocols::event::{AgentId, EventBody, Seq, Timestamp};
use outpost_protocols::units::HumanDuration;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

mod sinkq;

pub use sinkq::{LeaseLost, SinkQueueReader, LEASE_HOLD, LEASE_REFRESH, LEASE_TTL};

use super::clock::now;
use super::handle::{self, InsertOutcome, Read, Request, Write};
use super::registry::AgentRecord;
use super::{StoreError, StoreHandle, WriterOptions};
use crate::policy::PolicyRecord;
use crate::sinks::SinkTls;

/// The longest a batch's `last_seen` waits before it is written.
pub const SEEN_EVERY: Duration = Duration::from_secs(5);
/// How often a replica refreshes its key in `<prefix>_replicas`.
const HEARTBEAT: Duration = Duration::from_secs(10);
/// How long a replica's key outlives its last refresh.
const REPLICA_TTL: Duration = Duration::from_secs(30);
/// Compare-and-set attempts before a conflict is an error.
const CAS_TRIES: usize = 32;

/// `[store.jetstream]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JetStreamStoreConfig {
    /// `nats://host:port` (or `tls://`); several, comma-separated, for a
    /// cluster.
    pub url: String,
    /// The events stream; created if missing.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Subject prefix: events go to `<subject>.<agent_id>`.
    #[serde(default = "default_subject")]
    pub subject: String,
    /// The sinks' queues (`[[sinks]]`); created if missing.
    #[serde(default = "default_sinks_stream")]
    pub sinks_stream: String,
    /// Their subject prefix: an event waits for sink `s` on
    /// `<sinks_subject>.<s>.<agent_id>`.
    #[serde(default = "default_sinks_subject")]
    pub sinks_subject: String,
    /// Prefix of the key-value buckets (`<prefix>_watermarks`, ...).
    #[serde(default = "default_prefix")]
    pub bucket_prefix: String,
    /// Replicas of the stream and buckets the hub creates (1, 3 or 5 in a
    /// cluster).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// The stream's duplicate window, when the hub creates it.
    #[serde(default = "default_window")]
    pub duplicate_window: HumanDuration,
    /// How long to wait for the server: connecting, each acknowledgement.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// A NATS credentials file (`.creds`).
    #[serde(default)]
    pub credentials: Option<PathBuf>,
    /// `[store.jetstream.tls]`, as a sink's.
    #[serde(default)]
    pub tls: Option<SinkTls>,
}

fn default_stream() -> String {
    "OUTPOST_EVENTS".into()
}
fn default_subject() -> String {
    "outpost.events".into()
}
fn default_sinks_stream() -> String {
    "OUTPOST_SINKS".into()
}
fn default_sinks_subject() -> String {
    "outpost.sinks".into()
}
fn default_prefix() -> String {
    "outpost".into()
}
fn default_replicas() -> usize {
    1
}
fn default_window() -> HumanDuration {
    HumanDuration(Duration::from_secs(120))
}
fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

impl JetStreamStoreConfig {
    /// Checks what can be checked without a server: `(key, message)` of the
    /// first problem, the key relative to `store.jetstream`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        self.addrs().map_err(|m| ("url", m))?;
        crate::sinks::jetstream::check_stream_name(&self.stream).map_err(|m| ("stream", m))?;
        crate::sinks::jetstream::check_stream_name(&self.sinks_stream)
            .map_err(|m| ("sinks_stream", m))?;
        if self.sinks_stream == self.stream {
            return Err((
                "sinks_stream",
                format!("{:?} is the events stream's name too", self.stream),
            ));
        }
        check_prefix(&self.subject).map_err(|m| ("subject", m))?;
        check_prefix(&self.sinks_subject).map_err(|m| ("sinks_subject", m))?;
        let (a, b) = (
            format!("{}.", self.subject),
            format!("{}.", self.sinks_subject),
        );
        if a.starts_with(&b) || b.starts_with(&a) {
            return Err((
                "sinks_subject",
                format!(
                    "{:?} and subject {:?} overlap: the two streams need subjects of their own",
                    self.sinks_subject, self.subject
                ),
            ));
        }
        if self.bucket_prefix.is_empty()
            || !self
                .bucket_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
        {
            return Err((
                "bucket_prefix",
                format!(
                    "{:?}: letters, digits, `_` and `-` only (a KV bucket name)",
                    self.bucket_prefix
                ),
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(("replicas", format!("{} is not 1..=5", self.replicas)));
        }
        if self.duplicate_window.0.is_zero() {
            return Err(("duplicate_window", "must be longer than zero".into()));
        }
        if self.timeout.0.is_zero() {
            return Err(("timeout", "must be longer than zero".into()));
        }
        Ok(())
    }

    fn addrs(&self) -> Result<Vec<ServerAddr>, String> {
        self.url
            .split(',')
            .map(|u| crate::sinks::jetstream::parse_url(u.trim()))
            .collect()
    }

    fn bucket(&self, name: &str) -> String {
        format!("{}_{name}", self.bucket_prefix)
    }
}

/// A subject prefix: tokens separated by `.`, none empty, no wildcards.
fn check_prefix(p: &str) -> Result<(), String> {
    let bad = p.is_empty()
        || p.split('.').any(|t| {
            t.is_empty()
                || t.bytes()
                    .any(|b| matches!(b, b'*' | b'>') || b.is_ascii_whitespace() || b < 0x20)
        });
    if bad {
        return Err(format!(
            "{p:?} is not a subject prefix: tokens separated by `.`, none empty, no `*`, `>` or whitespace"
        ));
    }
    Ok(())
}

/// An agent's registry record as the `<prefix>_agents` bucket holds it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct KvAgent {
    labels: BTreeMap<String, String>,
    first_seen: i64,
    last_seen: i64,
    agent_version: Option<String>,
    protocol_version: Option<u16>,
    backlog_events: Option<u64>,
    backlog_bytes: Option<u64>,
    /// Open sessions by replica.
    sessions: BTreeMap<String, u64>,
    policy_version: Option<u64>,
    policy_error: Option<String>,
    policy_dropped: u64,
    policy_modified: u64,
}

/// The store: a connection and the stream and buckets it uses. Clones
/// share the connection.
#[derive(Clone)]
pub struct JetStreamStore {
    client: async_nats::Client,
    js: jetstream::Context,
    cfg: JetStreamStoreConfig,
    watermarks: kv::Store,
    agents: kv::Store,
    policy: kv::Store,
    replicas: kv::Store,
    /// What every replica shares (the stateless-reset secret).
    shared: kv::Store,
    /// The sinks' queues (see `sinkq`).
    sinks: stream::Stream,
    /// Each sink's counters, for `sinks status`.
    sink_counters: kv::Store,
    /// Which replica runs each sink.
    sink_leases: kv::Store,
    replica: String,
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
        let fail = |what: &str, message: String| StoreError::JetStream {
            url: cfg.url.clone(),
            what: what.to_owned(),
            message,
        };
        let addrs = cfg.addrs().map_err(|m| fail("store.jetstream.url", m))?;
        let mut o = ConnectOptions::new()
            .name("outpost-hub store")
            .connection_timeout(cfg.timeout.0)
            .request_timeout(Some(cfg.timeout.0))
            .reconnect_delay_callback(|n| {
                Duration::from_millis(50u64.saturating_mul(1 << n.min(6)))
                    .min(Duration::from_secs(2))
            });
        if let Some(p) = &cfg.credentials {
            let path = base.join(p);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                fail(
                    "store.jetstream.credentials",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            o = o.credentials(&text).map_err(|e| {
                fail(
                    "store.jetstream.credentials",
                    format!("{} is not a NATS credentials file: {e}", path.display()),
                )
            })?;
        }
        let tls_required = addrs.iter().any(ServerAddr::tls_required);
        match &cfg.tls {
            Some(t) => {
                let c = crate::sinks::tls::client_config("store", "jetstream", Some(t), base)
                    .map_err(|e| match e {
                        crate::sinks::SinkError::Config { key, message, .. } => {
                            fail(&format!("store.{key}"), message)
                        }
                        other => fail("store.jetstream.tls", other.to_string()),
                    })?;
                o = o.require_tls(true).tls_client_config(c);
            }
            None if tls_required => {
                return Err(fail(
                    "store.jetstream.tls",
                    "a tls:// server needs a [store.jetstream.tls] table with its CA".into(),
                ))
            }
            None => {}
        }
        let client = o
            .connect(addrs)
            .await
            .map_err(|e| fail("connecting", e.to_string()))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(cfg.timeout.0)
            .ack_timeout(cfg.timeout.0)
            .max_ack_inflight(65_536)
            .backpressure_on_inflight(true)
            .build(client.clone());
        // The largest event an agent may send must fit in one message, or
        // its batch would fail for good and wedge the agent's upload.
        let max_payload = client.server_info().max_payload;
        let needed = outpost_protocols::wire::MAX_FRAME_LEN + 4096;
        if max_payload < needed {
            return Err(fail(
                "checking the server",
                format!(
                    "its max_payload is {max_payload} bytes, and an event may be up to {} bytes: set `max_payload: 8MB` in nats-server's config",
                    outpost_protocols::wire::MAX_FRAME_LEN
                ),
            ));
        }
        // The events and the sinks' queues: the same settings, each on
        // subjects of its own.
        let open_stream = |name: &str, prefix: &str| {
            let config = stream::Config {
                name: name.to_owned(),
                subjects: vec![format!("{prefix}.>")],
                duplicate_window: cfg.duplicate_window.0,
                num_replicas: cfg.replicas,
                storage: stream::StorageType::File,
                ..Default::default()
            };
            let js = js.clone();
            let what = format!("stream {name}");
            async move {
                js.get_or_create_stream(config)
                    .await
                    .map_err(|e| fail(&what, e.to_string()))
            }
        };
        open_stream(&cfg.stream, &cfg.subject).await?;
        let sinks = open_stream(&cfg.sinks_stream, &cfg.sinks_subject).await?;
        // The bucket's stream is made here, by the key-value convention
        // (ADR-8: stream `KV_<bucket>`, subjects `$KV.<bucket>.>`, one
        // message per subject, rollups allowed, deletes denied; no direct
        // gets, see below), rather than
        // by async-nats's `create_key_value`: that one first asks for the
        // account's info, whose reply from nats-server 2.9 (Debian 12's)
        // async-nats 0.46 cannot parse.
        let open_kv = |name: &str, max_age: Duration| {
            let js = js.clone();
            let bucket = cfg.bucket(name);
            let config = stream::Config {
                name: format!("KV_{bucket}"),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                max_age,
                storage: stream::StorageType::File,
                allow_rollup: true,
                deny_delete: true,
                // Reads from the stream's leader, not any replica: a
                // compare-and-set needs the current revision, and a
                // follower's may lag.
                allow_direct: false,
                num_replicas: cfg.replicas,
                discard: stream::DiscardPolicy::New,
                ..Default::default()
            };
            async move {
                js.get_or_create_stream(config)
                    .await
                    .map_err(|e| (bucket.clone(), e.to_string()))?;
                js.get_key_value(&bucket)
                    .await
                    .map_err(|e| (bucket.clone(), e.to_string()))
            }
        };
        let kv_fail = |(name, m): (String, String)| fail(&format!("bucket {name}"), m);
        let watermarks = open_kv("watermarks", Duration::ZERO)
            .await
            .map_err(kv_fail)?;
        let agents = open_kv("agents", Duration::ZERO).await.map_err(kv_fail)?;
        let policy = open_kv("policy", Duration::ZERO).await.map_err(kv_fail)?;
        let replicas = open_kv("replicas", REPLICA_TTL).await.map_err(kv_fail)?;
        let shared = open_kv("hub", Duration::ZERO).await.map_err(kv_fail)?;
        let sink_counters = open_kv("sinks", Duration::ZERO).await.map_err(kv_fail)?;
        let sink_leases = open_kv("sink_leases", sinkq::LEASE_TTL)
            .await
            .map_err(kv_fail)?;
        let replica = format!(
            "{}-{}-{:x}",
            hostname(),
            std::process::id(),
            now().0 as u64 & 0xff_ffff
        );
        info!(url = %cfg.url, stream = %cfg.stream, %replica, "Hub store on NATS JetStream.");
        Ok(JetStreamStore {
            client,
            js,
            cfg: cfg.clone(),
            watermarks,
            agents,
            policy,
            replicas,
            shared,
            sinks,
            sink_counters,
            sink_leases,
            replica,
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

    fn fail(&self, what: impl Into<String>, message: impl ToString) -> StoreError {
        StoreError::JetStream {
            url: self.cfg.url.clone(),
            what: what.into(),
            message: message.to_string(),
        }
    }

    fn subject_of(&self, agent_id: &AgentId) -> String {
        format!("{}.{}", self.cfg.subject, agent_id.as_str())
    }

    /// The acknowledgement of a publish, which must come from `stream`.
    async fn acked_by(
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

    /// The watermark bucket's value for `agent_id` and its revision (`None`
    /// when the key does not exist yet).
    async fn kv_watermark(&self, agent_id: &AgentId) -> Result<(Seq, Option<u64>), StoreError> {
        let entry = self
            .watermarks
            .entry(agent_id.as_str())
            .await
            .map_err(|e| self.fail(format!("reading the watermark of {agent_id}"), e))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let seq = std::str::from_utf8(&e.value)
                    .ok()
                    .and_then(|t| t.parse::<u64>().ok())
                    .ok_or_else(|| {
                        self.fail(
                            format!("reading the watermark of {agent_id}"),
                            format!("{:?} is not a seq", String::from_utf8_lossy(&e.value)),
                        )
                    })?;
                Ok((Seq(seq), Some(e.revision)))
            }
            Some(e) => Ok((Seq(0), Some(e.revision))),
            None => Ok((Seq(0), None)),
        }
    }

    /// Where a session of `agent_id` resumes: its watermark. Events a
    /// replica published above it without raising it (it died, or NATS
    /// failed mid-group) are sent again by the agent and dropped by the
    /// stream's duplicate window (see the module doc).
    pub async fn watermark(&self, agent_id: &AgentId) -> Result<Seq, StoreError> {
        Ok(self.kv_watermark(agent_id).await?.0)
    }

    /// Raises `agent_id`'s watermark to `to` by compare-and-set, starting
    /// from `known` (value and revision) if given; returns the new value and
    /// revision (higher than `to` if another replica raised it further).
    async fn raise(
        &self,
        agent_id: &AgentId,
        to: Seq,
        mut known: Option<(Seq, Option<u64>)>,
    ) -> Result<(Seq, Option<u64>), StoreError> {
        let key = agent_id.as_str();
        for _ in 0..CAS_TRIES {
            let (current, revision) = match known.take() {
                Some(k) => k,
                None => self.kv_watermark(agent_id).await?,
            };
            if current >= to {
                return Ok((current, revision));
            }
            let value = bytes::Bytes::from(to.0.to_string());
            let written = match revision {
                Some(r) => self.watermarks.update(key, value, r).await.map_err(|e| {
                    (
                        e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                        e.to_string(),
                    )
                }),
                None => self.watermarks.create(key, value).await.map_err(|e| {
                    (
                        e.kind() == kv::CreateErrorKind::AlreadyExists,
                        e.to_string(),
                    )
                }),
            };
            match written {
                Ok(r) => return Ok((to, Some(r))),
                // Another replica moved it: read it again.
                Err((true, _)) => continue,
                Err((false, m)) => {
                    return Err(self.fail(format!("raising the watermark of {agent_id}"), m))
                }
            }
        }
        Err(self.fail(
            format!("raising the watermark of {agent_id}"),
            format!("{CAS_TRIES} compare-and-set conflicts in a row"),
        ))
    }

    /// Read-modify-write of `agent_id`'s registry record by compare-and-set.
    async fn update_agent(
        &self,
        agent_id: &AgentId,
        change: impl Fn(&mut KvAgent),
    ) -> Result<(), StoreError> {
        let what = || format!("updating the registry record of {agent_id}");
        self.update_json(&self.agents, agent_id.as_str(), what, change)
            .await
    }

    /// Read-modify-write of the JSON record under `key` in `bucket` by
    /// compare-and-set (a record that does not read starts from default).
    async fn update_json<T>(
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
            let written = match revision {
                Some(r) => bucket.update(key, value, r).await.map_err(|e| {
                    (
                        e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                        e.to_string(),
                    )
                }),
                None => bucket.create(key, value).await.map_err(|e| {
                    (
                        e.kind() == kv::CreateErrorKind::AlreadyExists,
                        e.to_string(),
                    )
                }),
            };
            match written {
                Ok(_) => return Ok(()),
                Err((true, _)) => continue,
                Err((false, m)) => return Err(self.fail(what(), m)),
            }
        }
        Err(self.fail(
            what(),
            format!("{CAS_TRIES} compare-and-set conflicts in a row"),
        ))
    }

    /// Refreshes this replica's key in `<prefix>_replicas`.
    async fn heartbeat(&self) -> Result<(), StoreError> {
        let value = serde_json::json!({ "since": now().0 }).to_string();
        self.replicas
            .put(&self.replica, value.into())
            .await
            .map(drop)
            .map_err(|e| self.fail("refreshing this replica's key", e))
    }

    /// The keys of `bucket`, in order; `what` names the listing in an error.
    async fn keys_of(
        &self,
        bucket: &kv::Store,
        what: &str,
    ) -> Result<std::collections::BTreeSet<String>, StoreError> {
        use futures::TryStreamExt as _;
        bucket
            .keys()
            .await
            .map_err(|e| self.fail(what, e))?
            .try_collect()
            .await
            .map_err(|e| self.fail(what, e))
    }

    /// Every agent in the registry with its watermark, sessions counted only
    /// on replicas that are alive, in id order.
    pub async fn fleet(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let alive = self.keys_of(&self.replicas, "listing replicas").await?;
        let ids = self.keys_of(&self.agents, "listing agents").await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Ok(agent_id) = AgentId::parse(&id) else {
                continue;
            };
            let Some(v) = self
                .agents
                .get(id.clone())
                .await
                .map_err(|e| self.fail("reading agents", e))?
            else {
                continue;
            };
            let rec: KvAgent = serde_json::from_slice(&v).unwrap_or_default();
            let watermark = self.watermark(&agent_id).await?;
            out.push(AgentRecord {
                agent_id,
                labels: rec.labels,
                first_seen: Timestamp(rec.first_seen),
                last_seen: Timestamp(rec.last_seen),
                agent_version: rec.agent_version,
                protocol_version: rec.protocol_version,
                watermark,
                backlog_events: rec.backlog_events,
                backlog_bytes: rec.backlog_bytes,
                sessions: rec
                    .sessions
                    .iter()
                    .filter(|(r, _)| alive.contains(*r))
                    .map(|(_, n)| n)
                    .sum(),
                policy_version: rec.policy_version,
                policy_error: rec.policy_error,
                policy_dropped: rec.policy_dropped,
                policy_modified: rec.policy_modified,
            });
        }
        Ok(out)
    }

    /// Every policy version, oldest first.
    pub async fn policies(&self) -> Result<Vec<PolicyRecord>, StoreError> {
        use futures::TryStreamExt as _;
        let mut keys: Vec<String> = match self.policy.keys().await {
            Ok(k) => k
                .try_collect()
                .await
                .map_err(|e| self.fail("listing policy versions", e))?,
            Err(e) => return Err(self.fail("listing policy versions", e)),
        };
        keys.sort();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(v) = self
                .policy
                .get(k.clone())
                .await
                .map_err(|e| self.fail("reading policy versions", e))?
            {
                let rec: PolicyRecord = serde_json::from_slice(&v)
                    .map_err(|e| self.fail(format!("reading policy {k}"), e))?;
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// The newest policy version's number (0: none), without reading the
    /// documents.
    pub async fn newest_policy(&self) -> Result<u64, StoreError> {
        use futures::TryStreamExt as _;
        let keys: Vec<String> = match self.policy.keys().await {
            Ok(k) => k
                .try_collect()
                .await
                .map_err(|e| self.fail("listing policy versions", e))?,
            Err(e) => return Err(self.fail("listing policy versions", e)),
        };
        Ok(keys
            .iter()
            .filter_map(|k| k.strip_prefix("v.").and_then(|n| n.parse().ok()))
            .max()
            .unwrap_or(0))
    }

    /// Stores `record` as its version if no version has that number yet;
    /// `Ok(false)` if one has (another applier got there first).
    pub async fn create_policy(&self, record: &PolicyRecord) -> Result<bool, StoreError> {
        let key = format!("v.{:020}", record.version);
        let value = serde_json::to_vec(record).unwrap_or_default();
        match self.policy.create(&key, value.into()).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(self.fail(format!("storing policy version {}", record.version), e)),
        }
    }

    /// Flushes and closes the connection, waiting at most `timeout`.
    pub async fn close(self) {
        let _ = tokio::time::timeout(self.cfg.timeout.0, self.client.drain()).await;
    }
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

/// How often sessions whose acknowledgement waits on a sink are told to
/// look again: a runner on another replica may have delivered.
const HELD_POLL: Duration = Duration::from_secs(1);

/// Starts the backend for `store`: a task serving the same queue as the
/// SQLite writer, for a hub whose `[[sinks]]` are `sinks`. On shutdown (the
/// token cancelled, or every handle dropped) it finishes what it received,
/// answers every request and closes the connection.
pub fn spawn_jetstream_writer(
    store: JetStreamStore,
    opts: WriterOptions,
    sinks: Vec<String>,
    shutdown: CancellationToken,
) -> (StoreHandle, JoinHandle<Result<(), StoreError>>) {
    let (handle, rx, done) = handle::channel(shutdown);
    let signals = handle.signals();
    let join = tokio::spawn(async move {
        let _done = done.drop_guard();
        let mut backend = Backend {
            store,
            known: HashMap::new(),
            floor: HashMap::new(),
            seen_at: HashMap::new(),
            sinks,
            held: HashMap::new(),
            signals,
        };
        backend.run(opts, rx).await;
        backend.store.close().await;
        Ok(())
    });
    (handle, join)
}

struct Backend {
    store: JetStreamStore,
    /// The watermark bucket's value and revision per agent, as this replica
    /// last read or wrote them: a compare-and-set starts from it, and reads
    /// it again only on a conflict.
    known: HashMap<AgentId, (Seq, Option<u64>)>,
    /// Per agent, the seq at and below which nothing is published: its
    /// watermark as this replica last read or raised it.
    floor: HashMap<AgentId, Seq>,
    /// When each agent's `last_seen` was last written from a batch.
    seen_at: HashMap<AgentId, Instant>,
    /// The configured sinks, whose queues hold acknowledgements back.
    sinks: Vec<String>,
    /// Per agent, whether something of it may be queued for a sink: true
    /// once this replica queued some, or when it has not looked since the
    /// agent's session began; false once it looked and found nothing.
    held: HashMap<AgentId, bool>,
    signals: handle::Signals,
}

impl Backend {
    async fn run(&mut self, opts: WriterOptions, mut rx: mpsc::Receiver<Request>) {
        let mut next: Option<Request> = None;
        let mut beat = tokio::time::interval(HEARTBEAT);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut held_poll = tokio::time::interval(HELD_POLL);
        held_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let request = match next.take() {
                Some(r) => r,
                None => tokio::select! {
                    r = rx.recv() => match r {
                        Some(r) => r,
                        None => break,
                    },
                    _ = beat.tick() => {
                        if let Err(e) = self.store.heartbeat().await {
                            warn!(error = %e, "Cannot refresh this replica's key.");
                        }
                        continue;
                    }
                    _ = held_poll.tick() => {
                        if self.held.values().any(|h| *h) {
                            self.signals.delivered_moved();
                        }
                        continue;
                    }
                },
            };
            match request {
                Request::Write(first) => {
                    let mut events = first.events();
                    let mut group = vec![first];
                    while events < opts.max_batch {
                        match rx.try_recv() {
                            Ok(Request::Write(w)) => {
                                events += w.events();
                                group.push(w);
                            }
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.commit(group).await;
                }
                Request::Call(Read::Watermark { agent_id, reply }) => {
                    let _ = reply.send(self.watermark(agent_id).await);
                }
                Request::Call(Read::Acked { agent_id, reply }) => {
                    let r = match self.watermark(agent_id.clone()).await {
                        Ok(w) => self.acked(&agent_id, w).await,
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(r);
                }
                Request::Call(Read::Resume { agent_id, reply }) => {
                    // Another replica may have queued for it since.
                    self.held.remove(&agent_id);
                    let r = match self.watermark(agent_id.clone()).await {
                        Ok(w) => self.acked(&agent_id, w).await.map(|a| (w, a)),
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(r);
                }
                Request::Shutdown => {
                    debug!("Hub store (JetStream) shutting down.");
                    rx.close();
                }
            }
        }
        // Sessions of this replica are over.
        let _ = self.store.replicas.delete(&self.store.replica).await;
        debug!("Hub store (JetStream) stopped.");
    }

    /// The agent's watermark, which also raises what this replica knows is
    /// stored of it.
    async fn watermark(&mut self, agent_id: AgentId) -> Result<Seq, StoreError> {
        let w = self.store.watermark(&agent_id).await;
        if let Ok(seq) = &w {
            let f = self.floor.entry(agent_id).or_insert(*seq);
            *f = (*f).max(*seq);
        }
        w
    }

    /// What may be acknowledged to `agent_id` given its `watermark`: up to
    /// the seq before its first event still queued for a sink.
    async fn acked(&mut self, agent_id: &AgentId, watermark: Seq) -> Result<Seq, StoreError> {
        if self.sinks.is_empty() || self.held.get(agent_id) == Some(&false) {
            return Ok(watermark);
        }
        let first = self.store.first_queued(agent_id, &self.sinks).await?;
        self.held.insert(agent_id.clone(), first.is_some());
        Ok(match first {
            Some(s) => Seq(s.0.saturating_sub(1)).min(watermark),
            None => watermark,
        })
    }

    /// Publishes the group's events (and queues them for their sinks), then
    /// raises the watermarks, then answers; registry changes are applied
    /// one by one.
    async fn commit(&mut self, group: Vec<Write>) {
        let mut inserts = Vec::new();
        for w in group {
            match w {
                Write::Insert { .. } => inserts.push(w),
                other => {
                    let r = self.registry(&other).await;
                    if let Err(e) = &r {
                        warn!(error = %e, "Hub store (JetStream) could not update the registry.");
                    }
                    other.answer(r.map(|()| None));
                }
            }
        }
        // A batch must follow what the stream holds, or what an earlier
        // request of this group will (see `StoreHandle::insert_routed_nowait`).
        let mut order = handle::OrderCheck::default();
        let mut ordered = Vec::with_capacity(inserts.len());
        for w in inserts {
            let Write::Insert {
                agent_id,
                after,
                through,
                ..
            } = &w
            else {
                continue;
            };
            let stored = match order.known(agent_id) {
                Some(s) => Ok(s),
                None => self.floor_of(agent_id, *after).await,
            };
            match stored.and_then(|s| order.admit(agent_id, *after, *through, s)) {
                Ok(()) => ordered.push(w),
                Err(e) => {
                    warn!(error = %e, "Hub store (JetStream) refused a request.");
                    w.answer(Err(e));
                }
            }
        }
        let inserts = ordered;
        if inserts.is_empty() {
            return;
        }
        match self.insert(&inserts).await {
            Ok(outcomes) => {
                for (w, o) in inserts.into_iter().zip(outcomes) {
                    w.answer(Ok(Some(o)));
                }
            }
            Err(e) => {
                warn!(requests = inserts.len(), error = %e, "Hub store (JetStream) group failed; nothing of it is acknowledged.");
                for w in inserts {
                    w.answer(Err(e.clone()));
                }
            }
        }
    }

    /// What is known to be stored of `agent_id` (see `floor`), read from
    /// the buckets and the stream on first sight, and again when it is below
    /// `want` (another replica may have stored more since).
    async fn floor_of(&mut self, agent_id: &AgentId, want: Seq) -> Result<Seq, StoreError> {
        let cached = self.floor.get(agent_id).copied();
        if let Some(f) = cached.filter(|f| *f >= want) {
            return Ok(f);
        }
        let k = self.store.kv_watermark(agent_id).await?;
        let f = k.0.max(cached.unwrap_or(Seq(0)));
        self.known.insert(agent_id.clone(), k);
        self.floor.insert(agent_id.clone(), f);
        Ok(f)
    }

    async fn insert(&mut self, inserts: &[Write]) -> Result<Vec<InsertOutcome>, StoreError> {
        let s = &self.store;
        // Publish everything above what is known to be stored.
        let mut acks = Vec::new();
        let mut outcomes = Vec::with_capacity(inserts.len());
        let mut queued = Vec::new();
        for (i, w) in inserts.iter().enumerate() {
            let Write::Insert {
                agent_id,
                events,
                forward,
                ..
            } = w
            else {
                continue;
            };
            // Read on first sight in `floor_of`, which the order check
            // called.
            let floor = self.floor.get(agent_id).copied().unwrap_or(Seq(0));
            let mut duplicates = 0;
            for (seq, body) in events {
                if *seq <= floor {
                    duplicates += 1;
                    continue;
                }
                let msg = jetstream::message::PublishMessage::build()
                    .payload(body_bytes(body))
                    .message_id(format!("{agent_id}:{}", seq.0))
                    .expected_stream(&s.cfg.stream)
                    .header("Outpost-Stream", body.stream.as_str());
                let ack =
                    s.js.send_publish(s.subject_of(agent_id), msg)
                        .await
                        .map_err(|e| s.fail(format!("publishing {agent_id}:{}", seq.0), e))?;
                acks.push((i, *seq, ack));
            }
            let before = queued.len();
            for f in forward.iter().filter(|f| f.seq > floor) {
                queued.extend(s.queue_forward(agent_id, f).await?);
            }
            if queued.len() > before {
                self.held.insert(agent_id.clone(), true);
            }
            outcomes.push(InsertOutcome {
                watermark: Seq(0),
                inserted: 0,
                duplicates,
                acked: Seq(0),
            });
        }
        for (i, seq, ack) in acks {
            let a = s
                .acked_by(ack, &s.cfg.stream, || format!("storing seq {seq}"))
                .await?;
            if a.duplicate {
                outcomes[i].duplicates += 1;
            } else {
                outcomes[i].inserted += 1;
            }
        }
        let any_queued = !queued.is_empty();
        for ack in queued {
            s.acked_by(ack, &s.cfg.sinks_stream, || {
                "queueing events for the sinks".to_owned()
            })
            .await?;
        }
        // Raise each agent's watermark once, to the group's highest seq.
        let mut through: BTreeMap<&AgentId, Seq> = BTreeMap::new();
        let mut counts: BTreeMap<&AgentId, (u64, u64)> = BTreeMap::new();
        for w in inserts {
            if let Write::Insert {
                agent_id,
                through: t,
                policy,
                ..
            } = w
            {
                let e = through.entry(agent_id).or_insert(*t);
                *e = (*e).max(*t);
                let c = counts.entry(agent_id).or_default();
                c.0 += policy.dropped;
                c.1 += policy.modified;
            }
        }
        // The agents' keys are independent: one round trip for all of them,
        // not one per agent.
        let raised = futures::future::join_all(through.iter().map(|(agent_id, to)| {
            let known = self.known.get(*agent_id).copied();
            s.raise(agent_id, *to, known)
        }))
        .await;
        for ((agent_id, _), k) in through.iter().zip(raised) {
            let k = k?;
            self.known.insert((*agent_id).clone(), k);
            let f = self.floor.entry((*agent_id).clone()).or_insert(k.0);
            *f = (*f).max(k.0);
        }
        // The registry's counters and last_seen, off the acknowledgement's
        // critical path only in that a failure here fails nothing stored.
        let t = now().0;
        let due: Vec<(&AgentId, u64, u64)> = counts
            .iter()
            .filter(|(agent_id, (dropped, modified))| {
                *dropped > 0
                    || *modified > 0
                    || self
                        .seen_at
                        .get(**agent_id)
                        .is_none_or(|at| at.elapsed() >= SEEN_EVERY)
            })
            .map(|(agent_id, (dropped, modified))| (*agent_id, *dropped, *modified))
            .collect();
        let updated = futures::future::join_all(due.iter().map(|(agent_id, dropped, modified)| {
            s.update_agent(agent_id, move |r| {
                r.last_seen = r.last_seen.max(t);
                r.policy_dropped += dropped;
                r.policy_modified += modified;
            })
        }))
        .await;
        for ((agent_id, _, _), r) in due.iter().zip(updated) {
            match r {
                Ok(()) => {
                    self.seen_at.insert((*agent_id).clone(), Instant::now());
                }
                Err(e) => warn!(error = %e, "Cannot update the registry after a batch."),
            }
        }
        if any_queued {
            self.signals.queued_moved();
        }
        // Every request of the group is stored now, and the watermark is at
        // least its highest seq.
        let mut acked: HashMap<AgentId, Seq> = HashMap::new();
        for (w, o) in inserts.iter().zip(outcomes.iter_mut()) {
            if let Write::Insert {
                agent_id,
                through: t,
                ..
            } = w
            {
                o.watermark = self.floor.get(agent_id).copied().unwrap_or(*t).max(*t);
                let a = match acked.get(agent_id) {
                    Some(a) => *a,
                    None => {
                        let a = self.acked(agent_id, o.watermark).await?;
                        acked.insert(agent_id.clone(), a);
                        a
                    }
                };
                o.acked = a.min(o.watermark);
            }
        }
        Ok(outcomes)
    }

    async fn registry(&self, w: &Write) -> Result<(), StoreError> {
        let s = &self.store;
        let t = now().0;
        match w {
            Write::Connected {
                agent_id,
                labels,
                agent_version,
                protocol_version,
                ..
            } => {
                s.update_agent(agent_id, |r| {
                    if r.first_seen == 0 {
                        r.first_seen = t;
                    }
                    r.last_seen = r.last_seen.max(t);
                    r.labels = labels.clone();
                    r.agent_version = Some(agent_version.clone());
                    r.protocol_version = Some(*protocol_version);
                    *r.sessions.entry(s.replica.clone()).or_default() += 1;
                })
                .await
            }
            Write::Disconnected { agent_id, .. } => {
                s.update_agent(agent_id, |r| {
                    r.last_seen = r.last_seen.max(t);
                    if let Some(n) = r.sessions.get_mut(&s.replica) {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            r.sessions.remove(&s.replica);
                        }
                    }
                })
                .await
            }
            Write::Backlog {
                agent_id,
                events,
                bytes,
                ..
            } => {
                s.update_agent(agent_id, |r| {
                    r.backlog_events = Some(*events);
                    r.backlog_bytes = Some(*bytes);
                })
                .await
            }
            Write::Touch { agent_id, .. } => {
                s.update_agent(agent_id, |r| r.last_seen = r.last_seen.max(t))
                    .await
            }
            Write::PolicyStatus {
                agent_id,
                version,
                error,
                ..
            } => {
                s.update_agent(agent_id, |r| {
                    r.policy_version = Some(*version);
                    r.policy_error = error.clone();
                })
                .await
            }
            Write::SinkProgress { sink, progress, .. } => {
                s.record_progress(sink, progress).await?;
                if progress.through.is_some() {
                    self.signals.delivered_moved();
                }
                Ok(())
            }
            Write::Insert { .. } => Ok(()),
        }
    }
}

fn body_bytes(body: &EventBody) -> bytes::Bytes {
    body.encode().into()
}
