//! The writer backend: a task serving the same request queue as the SQLite
//! writer (`StoreHandle`), so that agent sessions do not know which store
//! they use. It gathers the requests queued while the previous group was in
//! flight into one group, as the SQLite writer does for its transactions.
//!
//! A group of inserts is stored in steps, each a round trip for the whole
//! group rather than one per event or agent: publish its events and queue
//! what its routes send to sinks ([`Backend::publish_group`]), await every
//! acknowledgement ([`Backend::await_acks`]), raise each agent's watermark
//! once ([`Backend::raise_watermarks`]), count in the registry
//! ([`Backend::count_in_registry`]), and only then answer, with what may be
//! acknowledged to each agent ([`Backend::outcomes`]).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishAckFuture;
use outpost_protocols::event::{AgentId, Seq};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::connection::JetStreamStore;
use super::events::Known;
use super::registry::HEARTBEAT;
use crate::clock;
use crate::store::error::StoreError;
use crate::store::handle::{self, InsertOutcome, Read, Request, StoreHandle, Write, WriterOptions};

/// The longest a batch's `last_seen` waits before it is written.
pub const SEEN_EVERY: Duration = Duration::from_secs(5);

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
    known: HashMap<AgentId, Known>,
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

/// A group's publishes awaiting their acknowledgements.
struct Published {
    /// Each event's: the index of its request, its seq.
    events: Vec<(usize, Seq, PublishAckFuture)>,
    /// What was queued for the sinks.
    queued: Vec<PublishAckFuture>,
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
                    let (group, after) = gather(first, &mut rx, opts.max_batch);
                    next = after;
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
                Request::Call(Read::Labels { agent_id, reply }) => {
                    let _ = reply.send(self.store.labels(&agent_id).await);
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
                Request::Call(Read::Binding { agent_id, reply }) => {
                    let _ = reply.send(self.store.binding(&agent_id).await);
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
        let inserts = self.in_order(inserts).await;
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

    /// The inserts that follow what the stream holds, or what an earlier
    /// request of this group will (see `StoreHandle::insert_routed_nowait`);
    /// the others are answered with their refusal.
    async fn in_order(&mut self, inserts: Vec<Write>) -> Vec<Write> {
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
        ordered
    }

    /// A registry change, or a sink's progress (which may let the sessions
    /// waiting on it acknowledge more).
    async fn registry(&self, w: &Write) -> Result<(), StoreError> {
        if let Write::SinkProgress { sink, progress, .. } = w {
            self.store.record_progress(sink, progress).await?;
            if progress.through.is_some() {
                self.signals.delivered_moved();
            }
            return Ok(());
        }
        self.store.apply_registry(w).await
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

    /// Stores a group of inserts that passed the order check; each one's
    /// outcome, in order.
    async fn insert(&mut self, inserts: &[Write]) -> Result<Vec<InsertOutcome>, StoreError> {
        let (published, mut outcomes) = self.publish_group(inserts).await?;
        let any_queued = !published.queued.is_empty();
        self.await_acks(published, &mut outcomes).await?;
        let counts = self.raise_watermarks(inserts).await?;
        self.count_in_registry(&counts).await;
        if any_queued {
            self.signals.queued_moved();
        }
        // Every request of the group is stored now, and the watermark is at
        // least its highest seq.
        self.outcomes(inserts, &mut outcomes).await?;
        Ok(outcomes)
    }

    /// Publishes every event above what is known to be stored, and queues
    /// what the routes send to sinks; the outcomes so far (duplicates
    /// counted).
    async fn publish_group(
        &mut self,
        inserts: &[Write],
    ) -> Result<(Published, Vec<InsertOutcome>), StoreError> {
        let s = &self.store;
        let mut published = Published {
            events: Vec::new(),
            queued: Vec::new(),
        };
        let mut outcomes = Vec::with_capacity(inserts.len());
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
                let ack = s.publish_event(agent_id, *seq, body).await?;
                published.events.push((i, *seq, ack));
            }
            let before = published.queued.len();
            for f in forward.iter().filter(|f| f.seq > floor) {
                published.queued.extend(s.queue_forward(agent_id, f).await?);
            }
            if published.queued.len() > before {
                self.held.insert(agent_id.clone(), true);
            }
            outcomes.push(InsertOutcome {
                watermark: Seq(0),
                inserted: 0,
                duplicates,
                acked: Seq(0),
            });
        }
        Ok((published, outcomes))
    }

    /// Awaits the stream's acknowledgement of every publish of the group,
    /// counting each event as inserted or (the stream's deduplication)
    /// duplicate.
    async fn await_acks(
        &self,
        published: Published,
        outcomes: &mut [InsertOutcome],
    ) -> Result<(), StoreError> {
        let s = &self.store;
        for (i, seq, ack) in published.events {
            let a = s
                .acked_by(ack, &s.cfg.stream, || format!("storing seq {seq}"))
                .await?;
            if a.duplicate {
                outcomes[i].duplicates += 1;
            } else {
                outcomes[i].inserted += 1;
            }
        }
        for ack in published.queued {
            s.acked_by(ack, &s.cfg.sinks_stream, || {
                "queueing events for the sinks".to_owned()
            })
            .await?;
        }
        Ok(())
    }

    /// Raises each agent's watermark once, to the group's highest seq of
    /// it; what the policy dropped and modified of each agent's events.
    async fn raise_watermarks(
        &mut self,
        inserts: &[Write],
    ) -> Result<BTreeMap<AgentId, (u64, u64)>, StoreError> {
        let mut through: BTreeMap<&AgentId, Seq> = BTreeMap::new();
        let mut counts: BTreeMap<AgentId, (u64, u64)> = BTreeMap::new();
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
                let c = counts.entry(agent_id.clone()).or_default();
                c.0 += policy.dropped;
                c.1 += policy.modified;
            }
        }
        // The agents' keys are independent: one round trip for all of them,
        // not one per agent.
        let s = &self.store;
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
        Ok(counts)
    }

    /// The registry's counters and `last_seen` after a group: off the
    /// acknowledgement's critical path only in that a failure here fails
    /// nothing stored. `last_seen` alone is written at most every
    /// [`SEEN_EVERY`] per agent.
    async fn count_in_registry(&mut self, counts: &BTreeMap<AgentId, (u64, u64)>) {
        let s = &self.store;
        let t = clock::unix_now().0;
        let due: Vec<(&AgentId, u64, u64)> = counts
            .iter()
            .filter(|(agent_id, (dropped, modified))| {
                *dropped > 0
                    || *modified > 0
                    || self
                        .seen_at
                        .get(*agent_id)
                        .is_none_or(|at| clock::elapsed(*at) >= SEEN_EVERY)
            })
            .map(|(agent_id, (dropped, modified))| (agent_id, *dropped, *modified))
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
                    self.seen_at.insert((*agent_id).clone(), clock::now());
                }
                Err(e) => warn!(error = %e, "Cannot update the registry after a batch."),
            }
        }
    }

    /// Completes each request's outcome: the agent's watermark, and what
    /// may be acknowledged to it (asked once per agent of the group).
    async fn outcomes(
        &mut self,
        inserts: &[Write],
        outcomes: &mut [InsertOutcome],
    ) -> Result<(), StoreError> {
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
        Ok(())
    }
}

/// `first` and the writes queued behind it, up to `max_batch` events; the
/// request that ended the group, if it is not a write.
fn gather(
    first: Write,
    rx: &mut mpsc::Receiver<Request>,
    max_batch: usize,
) -> (Vec<Write>, Option<Request>) {
    let mut events = first.events();
    let mut group = vec![first];
    while events < max_batch {
        match rx.try_recv() {
            Ok(Request::Write(w)) => {
                events += w.events();
                group.push(w);
            }
            Ok(other) => return (group, Some(other)),
            Err(_) => break,
        }
    }
    (group, None)
}
