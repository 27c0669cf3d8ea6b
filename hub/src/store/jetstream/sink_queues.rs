//! The sinks' queues on the JetStream store: what the SQLite store keeps in
//! `sink_pending`, kept in a stream of its own so that any replica may run a
//! sink and any may serve the agent whose acknowledgement waits on it.
//!
//! ```text
//! stream  <sinks_stream> (OUTPOST_SINKS)  subjects <sinks_subject>.> (outpost.sinks.>)
//!   one message per event and sink, subject <sinks_subject>.<sink>.<agent_id>
//!   Nats-Msg-Id:  <sink>:<agent_id>:<seq>  a group sent again within the
//!                                          duplicate window is queued once
//!   payload:      postcard EventBody       minimised as the policy says
//! KV <prefix>_sinks        key <sink> → JSON counters for `sinks status`
//! KV <prefix>_sink_leases  key <sink> → the replica that runs the sink;
//!                          max_age LEASE_TTL (15 s): a replica killed
//!                          lets go
//! ```
//!
//! Why these shapes:
//! - A sink's queue is the subjects `<sinks_subject>.<sink>.>`, in stream
//!   order: the stream sequence is the queue position `n` the runner
//!   records progress up to, and a record is a purge of those subjects
//!   below `n + 1`. The stream numbers a new message above every earlier
//!   one, so a read past the newest position taken never misses a message
//!   (the SQLite queue needs care there, see `sinks::runner`).
//! - Forwards are published with the group's events, before the watermark
//!   is raised: an event the watermark covers is queued for every sink its
//!   route named.
//! - What may be acknowledged to an agent is below the first message on
//!   each `<sink>.<agent_id>` subject: one leader read per configured sink,
//!   made only for agents this replica knows to have something queued (or
//!   has not asked about since their session began).
//! - One runner per sink in the fleet, by lease: two would each deliver the
//!   whole queue. The lease is a key that its holder refreshes by
//!   compare-and-set on its revision; a holder that cannot refresh it for
//!   [`LEASE_HOLD`] stops delivering, and the bucket's `max_age` drops the
//!   key of one killed, so another replica takes the sink over within its
//!   time to live (`setup::LEASE_TTL`). A holder paused past its lease may
//!   deliver a batch the next holder delivers too: at least once, as after
//!   any crash.

use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull};
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, kv};
use futures::StreamExt as _;
use outpost_protocols::event::{AgentId, Event, EventBody, Seq};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::connection::JetStreamStore;
use crate::clock;
use crate::nats;
use crate::store::error::StoreError;
use crate::store::records::{Forward, Queued, SinkProgress, SinkStatus};

/// How often a lease's holder refreshes it.
pub const LEASE_REFRESH: Duration = Duration::from_secs(3);
/// How long its holder goes on without a refresh that succeeded before it
/// stops delivering: well inside the lease's time to live
/// (`setup::LEASE_TTL`), so that it has stopped before another replica may
/// take the sink.
pub const LEASE_HOLD: Duration = Duration::from_secs(8);

/// A sink's counters as `<prefix>_sinks` holds them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct KvSink {
    delivered: u64,
    rejected: u64,
    refused: u64,
    failures: u64,
    last_delivered_at: Option<i64>,
    last_error: Option<String>,
    last_error_at: Option<i64>,
}

/// A sink's lease was taken by another replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseLost;

impl JetStreamStore {
    fn sink_filter(&self, sink: &str) -> String {
        format!("{}.{sink}.>", self.cfg.sinks_subject)
    }

    fn sink_subject(&self, sink: &str, agent_id: &AgentId) -> String {
        format!("{}.{sink}.{}", self.cfg.sinks_subject, agent_id.as_str())
    }

    /// Publishes `f` to the queue of each of its sinks; the acknowledgements
    /// to wait for.
    pub(super) async fn queue_forward(
        &self,
        agent_id: &AgentId,
        f: &Forward,
    ) -> Result<Vec<jetstream::context::PublishAckFuture>, StoreError> {
        let body: bytes::Bytes = f.body.encode().into();
        let mut acks = Vec::with_capacity(f.sinks.len());
        for sink in &f.sinks {
            let id = format!("{sink}:{agent_id}:{}", f.seq.0);
            let msg = nats::message(body.clone(), &id, &self.cfg.sinks_stream);
            let ack = self
                .js
                .send_publish(self.sink_subject(sink, agent_id), msg)
                .await
                .map_err(|e| self.fail(format!("queueing {agent_id}:{} for {sink}", f.seq.0), e))?;
            acks.push(ack);
        }
        Ok(acks)
    }

    /// The lowest seq of `agent_id` still queued for one of `sinks`, read
    /// from the stream's leader.
    pub(super) async fn first_queued(
        &self,
        agent_id: &AgentId,
        sinks: &[String],
    ) -> Result<Option<Seq>, StoreError> {
        let firsts = futures::future::join_all(sinks.iter().map(|sink| async move {
            let subject = self.sink_subject(sink, agent_id);
            match self
                .sinks
                .get_first_raw_message_by_subject(&subject, 1)
                .await
            {
                Ok(m) => Ok(parse_id(&m.headers).map(|(_, seq)| seq)),
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
                Err(e) => Err(self.fail(format!("reading what waits for sink {sink}"), e)),
            }
        }))
        .await;
        let mut first: Option<Seq> = None;
        for f in firsts {
            if let Some(s) = f? {
                first = Some(first.map_or(s, |f| f.min(s)));
            }
        }
        Ok(first)
    }

    /// Records a delivery attempt of `sink`: its queue purged up to
    /// `through`, its counters added to.
    pub(super) async fn record_progress(
        &self,
        sink: &str,
        p: &SinkProgress,
    ) -> Result<(), StoreError> {
        if let Some(n) = p.through {
            let below = u64::try_from(n).unwrap_or(0).saturating_add(1);
            self.sinks
                .purge()
                .filter(self.sink_filter(sink))
                .sequence(below)
                .await
                .map_err(|e| self.fail(format!("recording what sink {sink} accepted"), e))?;
        }
        let t = clock::unix_now().0;
        let what = || format!("counting the deliveries of sink {sink}");
        self.update_json(&self.sink_counters, sink, what, |c: &mut KvSink| {
            c.delivered += p.delivered;
            c.rejected += p.rejected;
            c.refused += p.refused;
            c.failures += u64::from(p.failed);
            if p.delivered > 0 {
                c.last_delivered_at = Some(t);
            }
            if let Some(e) = &p.error {
                c.last_error = Some(e.clone());
                c.last_error_at = Some(t);
            }
        })
        .await
    }

    /// Every configured sink's queue and counters, and those of sinks
    /// counted before, by id.
    pub async fn sinks_status(&self, configured: &[String]) -> Result<Vec<SinkStatus>, StoreError> {
        use futures::TryStreamExt as _;
        let mut ids = self
            .keys_of(&self.sink_counters, "listing the sinks' counters")
            .await?;
        ids.extend(configured.iter().cloned());
        let mut out = Vec::with_capacity(ids.len());
        for sink in ids {
            let filter = self.sink_filter(&sink);
            let what = || format!("reading the queue of sink {sink}");
            let subjects = self
                .sinks
                .info_with_subjects(&filter)
                .await
                .map_err(|e| self.fail(what(), e))?;
            let pending: usize = subjects
                .try_fold(0, |n, (_, c)| async move { Ok(n + c) })
                .await
                .map_err(|e| self.fail(what(), e))?;
            let oldest = if pending == 0 {
                None
            } else {
                match self
                    .sinks
                    .get_first_raw_message_by_subject(&filter, 1)
                    .await
                {
                    Ok(m) => Some(i64::try_from(m.time.unix_timestamp_nanos()).unwrap_or(i64::MAX)),
                    Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => None,
                    Err(e) => return Err(self.fail(what(), e)),
                }
            };
            let c: KvSink = match self.sink_counters.get(&sink).await {
                Ok(Some(v)) => serde_json::from_slice(&v).unwrap_or_default(),
                Ok(None) => KvSink::default(),
                Err(e) => return Err(self.fail(what(), e)),
            };
            out.push(SinkStatus {
                sink,
                pending: pending as u64,
                oldest_queued_at: oldest,
                delivered: c.delivered,
                rejected: c.rejected,
                refused: c.refused,
                failures: c.failures,
                last_delivered_at: c.last_delivered_at,
                last_error: c.last_error,
                last_error_at: c.last_error_at,
            });
        }
        Ok(out)
    }

    /// Takes `sink`'s lease for this replica, if no other holds it: its
    /// revision, to refresh it by.
    pub async fn take_lease(&self, sink: &str) -> Result<Option<u64>, StoreError> {
        let what = || format!("taking the lease of sink {sink}");
        let me = bytes::Bytes::from(self.replica.clone());
        match self.sink_leases.create(sink, me.clone()).await {
            Ok(rev) => return Ok(Some(rev)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(self.fail(what(), e)),
        }
        // Ours still, from before a refresh went unanswered: take it back.
        match self.sink_leases.entry(sink).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put && e.value == me => {
                match self.sink_leases.update(sink, me, e.revision).await {
                    Ok(rev) => Ok(Some(rev)),
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
                    Err(e) => Err(self.fail(what(), e)),
                }
            }
            Ok(_) => Ok(None),
            Err(e) => Err(self.fail(what(), e)),
        }
    }

    /// Refreshes the lease taken at `revision`: the new revision, or
    /// [`LeaseLost`] when another replica holds it now.
    pub async fn renew_lease(
        &self,
        sink: &str,
        revision: u64,
    ) -> Result<Result<u64, LeaseLost>, StoreError> {
        let me = bytes::Bytes::from(self.replica.clone());
        match self.sink_leases.update(sink, me, revision).await {
            Ok(rev) => Ok(Ok(rev)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(Err(LeaseLost)),
            Err(e) => Err(self.fail(format!("refreshing the lease of sink {sink}"), e)),
        }
    }

    /// Lets go of the lease taken at `revision`, so that another replica
    /// takes the sink over at once.
    pub async fn release_lease(&self, sink: &str, revision: u64) {
        if let Err(e) = self
            .sink_leases
            .delete_expect_revision(sink, Some(revision))
            .await
        {
            warn!(sink, error = %e, "Cannot let go of the sink's lease; it lapses by itself.");
        }
    }

    /// A reader of `sink`'s queue.
    pub fn queue_reader(&self, sink: &str) -> SinkQueueReader {
        SinkQueueReader {
            store: self.clone(),
            sink: sink.to_owned(),
            consumer: None,
        }
    }
}

/// Reads one sink's queue, oldest first, through a consumer of the sinks
/// stream that it keeps while reads follow on from each other.
pub struct SinkQueueReader {
    store: JetStreamStore,
    sink: String,
    /// The consumer, and the stream sequence its next message is at least.
    consumer: Option<(consumer::Consumer<pull::Config>, u64)>,
}

impl SinkQueueReader {
    /// The registry's labels of `agent_id` ([`JetStreamStore::labels`]),
    /// empty for an agent it does not know.
    pub async fn labels(
        &self,
        agent_id: &AgentId,
    ) -> Result<std::collections::BTreeMap<String, String>, StoreError> {
        Ok(self.store.labels(agent_id).await?.unwrap_or_default())
    }

    /// Up to `limit` events of the queue: after position `after`, or from
    /// its head.
    pub async fn batch(
        &mut self,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<Queued>, StoreError> {
        let r = self.read(after, limit).await;
        if r.is_err() {
            // What it had delivered of a failed fetch is lost to it.
            self.consumer = None;
        }
        r
    }

    async fn read(&mut self, after: Option<i64>, limit: usize) -> Result<Vec<Queued>, StoreError> {
        let s = &self.store;
        let what = || format!("reading the queue of sink {}", self.sink);
        let start = after.map(|n| u64::try_from(n).unwrap_or(0).saturating_add(1));
        // From the head only at the first read, or when a read does not
        // follow on: the runner reads from the head once everything it took
        // is recorded, which is where the consumer stands then.
        let follows = match (&self.consumer, start) {
            (Some(_), None) => true,
            (Some((_, next)), Some(start)) => *next == start,
            (None, _) => false,
        };
        if !follows {
            let config = pull::Config {
                filter_subject: s.sink_filter(&self.sink),
                deliver_policy: match start {
                    Some(start_sequence) => {
                        consumer::DeliverPolicy::ByStartSequence { start_sequence }
                    }
                    None => consumer::DeliverPolicy::All,
                },
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(120),
                ..Default::default()
            };
            let c = s
                .sinks
                .create_consumer(config)
                .await
                .map_err(|e| s.fail(what(), e))?;
            self.consumer = Some((c, start.unwrap_or(0)));
        }
        let Some((c, next)) = self.consumer.as_mut() else {
            return Ok(Vec::new());
        };
        let mut messages = c
            .fetch()
            .max_messages(limit)
            .messages()
            .await
            .map_err(|e| s.fail(what(), e))?;
        let mut out = Vec::new();
        while let Some(m) = messages.next().await {
            let m = m.map_err(|e| s.fail(what(), e))?;
            let info = m.info().map_err(|e| s.fail(what(), e))?;
            let (n, queued_at) = (
                info.stream_sequence,
                i64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(i64::MAX),
            );
            *next = n + 1;
            let Some((agent_id, seq)) = m.headers.as_ref().and_then(parse_id) else {
                warn!(sink = %self.sink, n, subject = %m.subject, "A message in the sinks' stream that the hub did not queue; left alone.");
                continue;
            };
            let body = EventBody::decode(&m.payload).map_err(|e| {
                s.fail(
                    format!(
                        "decoding {agent_id}:{} queued for sink {}",
                        seq.0, self.sink
                    ),
                    e,
                )
            })?;
            out.push(Queued {
                n: i64::try_from(n).unwrap_or(i64::MAX),
                event: Event {
                    agent_id,
                    seq,
                    body,
                },
                queued_at,
            });
        }
        Ok(out)
    }
}

/// The agent and seq of a queued message's `Nats-Msg-Id`
/// (`<sink>:<agent_id>:<seq>`).
fn parse_id(headers: &async_nats::HeaderMap) -> Option<(AgentId, Seq)> {
    let id = headers.get(async_nats::header::NATS_MESSAGE_ID)?.as_str();
    let (_, rest) = id.split_once(':')?;
    let (agent, seq) = rest.rsplit_once(':')?;
    Some((AgentId::parse(agent).ok()?, Seq(seq.parse().ok()?)))
}
