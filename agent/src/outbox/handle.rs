//! The sources' and the uplink's side of the outbox: [`OutboxHandle`] and
//! the requests it queues for the group-commit writer.
//!
//! A handle never touches the file: it queues a request and awaits the
//! writer's answer, which for an append arrives only once the transaction
//! holding it has committed. So a source may acknowledge its peer exactly
//! when its [`PendingAppend`] resolves.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use outpost_protocols::event::{Event, EventBody, Seq};
use outpost_storage::{Message, Pending};
use tokio::sync::{mpsc, watch};

use super::error::OutboxError;
use super::gate::SourceFilter;
use super::reads::OutboxStats;
use super::store::{AppendOutcome, Qos2Op, Resumed};

pub(super) type Reply<T> = outpost_storage::Reply<T, OutboxError>;

/// An append that was queued; await it for the outcome, which arrives once
/// the transaction that holds it has committed.
pub type PendingAppend = Pending<AppendOutcome, OutboxError>;

/// Events of one source to store, and the QoS 2 packet ids to record with
/// them: one write of a group commit.
pub(super) struct AppendRequest {
    pub(super) bodies: Vec<EventBody>,
    pub(super) qos2: Vec<Qos2Op>,
    pub(super) reply: Reply<AppendOutcome>,
}

/// Events read, and (first seq, Unix ns) of the group commits that
/// accepted them.
pub type Stamped = (Vec<Event>, Vec<(Seq, i64)>);

/// What the writer serves between groups.
pub(super) enum Call {
    Ack {
        upto: Seq,
        reply: Reply<u64>,
    },
    Resume {
        watermark: Seq,
        reply: Reply<Resumed>,
    },
    Follow {
        held: Seq,
        reply: Reply<Resumed>,
    },
    ReadBatch {
        after: Seq,
        max_events: usize,
        reply: Reply<Vec<Event>>,
    },
    ReadStamped {
        after: Seq,
        max_events: usize,
        reply: Reply<Stamped>,
    },
    Stats {
        reply: Reply<OutboxStats>,
    },
    Qos2Pending {
        reply: Reply<BTreeSet<u16>>,
    },
    /// Time to evict expired events (sent every second by the queue's
    /// helper task).
    Tick,
}

pub(super) type Request = Message<AppendRequest, Call>;

/// A cheap, cloneable handle to the writer. The writer stops once every handle
/// is dropped or the shutdown token is cancelled.
#[derive(Debug, Clone)]
pub struct OutboxHandle {
    tx: mpsc::Sender<Request>,
    committed: watch::Receiver<Seq>,
    /// The fleet policy every append passes through, if the writer has one.
    filter: Option<Arc<Mutex<SourceFilter>>>,
}

impl OutboxHandle {
    pub(super) fn new(
        tx: mpsc::Sender<Request>,
        committed: watch::Receiver<Seq>,
        filter: Option<SourceFilter>,
    ) -> OutboxHandle {
        OutboxHandle {
            tx,
            committed,
            filter: filter.map(|f| Arc::new(Mutex::new(f))),
        }
    }

    /// Stores `bodies` and applies `qos2`, sharing a transaction with whatever
    /// else arrives in the same window; resolves once it has committed.
    pub async fn append(
        &self,
        bodies: Vec<EventBody>,
        qos2: Vec<Qos2Op>,
    ) -> Result<AppendOutcome, OutboxError> {
        self.append_nowait(bodies, qos2).await?.await
    }

    /// Queues an append and returns without waiting for its commit (it waits
    /// only while the queue is full), so a source can keep reading and
    /// acknowledge its peer when the [`PendingAppend`] resolves.
    pub async fn append_nowait(
        &self,
        bodies: Vec<EventBody>,
        qos2: Vec<Qos2Op>,
    ) -> Result<PendingAppend, OutboxError> {
        let mut bodies = bodies;
        if let Some(f) = &self.filter {
            // Held for one request's edits, never across an await.
            if let Ok(mut f) = f.lock() {
                f.filter(&mut bodies);
            }
        }
        outpost_storage::send(&self.tx, |reply| {
            Message::Write(AppendRequest {
                bodies,
                qos2,
                reply,
            })
        })
        .await
    }

    /// Deletes the events up to `upto` once the hub made them durable; see
    /// [`Outbox::ack`](super::store::Outbox::ack).
    pub async fn ack(&self, upto: Seq) -> Result<u64, OutboxError> {
        self.call(|reply| Call::Ack { upto, reply }).await
    }

    /// Applies a hub's `Welcome` watermark
    /// ([`Outbox::resume_after`](super::store::Outbox::resume_after)); after
    /// a renumbering, [`committed`](Self::committed) moves to the new last
    /// seq.
    pub async fn resume_after(&self, watermark: Seq) -> Result<Resumed, OutboxError> {
        self.call(|reply| Call::Resume { watermark, reply }).await
    }

    /// Applies a hub's `Stored` mark
    /// ([`Outbox::follow`](super::store::Outbox::follow)); after a
    /// renumbering, [`committed`](Self::committed) moves to the new last seq.
    pub async fn follow(&self, held: Seq) -> Result<Resumed, OutboxError> {
        self.call(|reply| Call::Follow { held, reply }).await
    }

    /// Up to `max_events` events after `after`, read on the writer's
    /// connection. A bulk reader may prefer its own
    /// [`OutboxReader`](super::reads::OutboxReader), which does not wait for
    /// commits.
    pub async fn read_batch(
        &self,
        after: Seq,
        max_events: usize,
    ) -> Result<Vec<Event>, OutboxError> {
        self.call(|reply| Call::ReadBatch {
            after,
            max_events,
            reply,
        })
        .await
    }

    /// [`read_batch`](Self::read_batch), with when the events were accepted:
    /// see [`Outbox::accepted_at`](super::store::Outbox::accepted_at).
    pub async fn read_stamped(
        &self,
        after: Seq,
        max_events: usize,
    ) -> Result<Stamped, OutboxError> {
        self.call(|reply| Call::ReadStamped {
            after,
            max_events,
            reply,
        })
        .await
    }

    /// The last seq committed so far, updated after every commit; the uplink
    /// waits on it for new events instead of polling the file.
    pub fn committed(&self) -> watch::Receiver<Seq> {
        self.committed.clone()
    }

    /// A snapshot of the counters.
    pub async fn stats(&self) -> Result<OutboxStats, OutboxError> {
        self.call(|reply| Call::Stats { reply }).await
    }

    /// The inbound QoS 2 packet ids stored and not yet released.
    pub async fn qos2_pending(&self) -> Result<BTreeSet<u16>, OutboxError> {
        self.call(|reply| Call::Qos2Pending { reply }).await
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Call) -> Result<T, OutboxError> {
        outpost_storage::send(&self.tx, |reply| Message::Call(make(reply)))
            .await?
            .await
    }
}
