//! The store as agent sessions, sink runners and policy see it, whichever
//! backend holds the events: the requests ([`Write`], [`Read`]), the
//! [`StoreHandle`] that queues them, and what every backend shares (the
//! order check of a group's inserts, the signals after a commit).
//!
//! A backend serves the queue [`channel`] makes: the SQLite writer through
//! `outpost_storage`'s group commit (`sqlite::writer`), the JetStream store
//! through its own task (`jetstream`). Sessions do not know which one they
//! talk to. The handle never touches a file or a connection; an insert is
//! answered once the backend has made it durable, and only then may a
//! session acknowledge it.

use std::collections::BTreeMap;

use outpost_protocols::event::{AgentId, EventBody, Seq};
use outpost_storage::{Message, Pending};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::error::StoreError;
use super::records::{CertBinding, CertInfo, Forward, Rebind, SinkProgress};

/// Requests that may wait for the writer before a sender waits too: the
/// backpressure that keeps ingest from filling memory when the disk is slow.
/// Each agent session has at most its protocol window of events in flight, so
/// this bounds memory, and a full queue makes every session wait its turn.
const QUEUE_DEPTH: usize = 4096;

/// How a backend groups requests: by default at most 16384 events a group
/// (a registry change counts as one), and no window.
pub type WriterOptions = outpost_storage::WriterOptions<16384>;

pub(super) type Reply<T> = outpost_storage::Reply<T, StoreError>;

/// An insert that was queued; await it for the outcome, which arrives once
/// the transaction that holds it has committed.
pub type PendingInsert = Pending<InsertOutcome, StoreError>;

/// What the policy did to a batch before it was stored, added to the agent's
/// counters in the same transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct PolicyCounts {
    /// Events the hub dropped (denied, local, residency, downsampled, over a
    /// drop limit).
    pub dropped: u64,
    /// Events the hub changed (minimised) before storing them.
    pub modified: u64,
}

/// What one insert request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct InsertOutcome {
    /// The agent's watermark after this request: the highest seq the store
    /// holds for it. Never lower than before, and at least the request's
    /// highest seq.
    pub watermark: Seq,
    /// Events that were new and are now stored.
    pub inserted: u64,
    /// Events the store already held, ignored. The hub sessions drop replays
    /// before they get here, so these only come from two sessions of one
    /// agent overlapping.
    pub duplicates: u64,
    /// What may be acknowledged to the agent: the watermark, or less while
    /// an event of its is still waiting for a sink.
    pub acked: Seq,
}

impl Default for InsertOutcome {
    /// Nothing stored, watermark 0.
    fn default() -> InsertOutcome {
        InsertOutcome {
            watermark: Seq(0),
            inserted: 0,
            duplicates: 0,
            acked: Seq(0),
        }
    }
}

/// An owned write, waiting for its group.
pub(super) enum Write {
    Insert {
        agent_id: AgentId,
        events: Vec<(Seq, EventBody)>,
        forward: Vec<Forward>,
        through: Seq,
        /// The seq the session's previous batch ended at (its first: the
        /// watermark it started from); 0: no order check.
        after: Seq,
        policy: PolicyCounts,
        reply: Reply<InsertOutcome>,
    },
    SinkProgress {
        sink: String,
        progress: SinkProgress,
        reply: Reply<()>,
    },
    PolicyStatus {
        agent_id: AgentId,
        version: u64,
        error: Option<String>,
        reply: Reply<()>,
    },
    Connected {
        agent_id: AgentId,
        labels: BTreeMap<String, String>,
        agent_version: String,
        protocol_version: u16,
        reply: Reply<()>,
    },
    Disconnected {
        agent_id: AgentId,
        reply: Reply<()>,
    },
    Backlog {
        agent_id: AgentId,
        events: u64,
        bytes: u64,
        reply: Reply<()>,
    },
    Touch {
        agent_id: AgentId,
        reply: Reply<()>,
    },
    /// Binds a certificate to the agent (see [`Rebind`]).
    Bind {
        agent_id: AgentId,
        cert: CertInfo,
        how: Rebind,
        reply: Reply<()>,
    },
    /// A certificate was refused at the handshake: audited `cert.refused`.
    CertRefused {
        agent_id: AgentId,
        fingerprint: String,
        reason: String,
        reply: Reply<()>,
    },
}

impl Write {
    /// The agent whose watermark or acknowledgement this write may change;
    /// `None` for a sink's progress, which may change any agent's.
    fn agent_id(&self) -> Option<&AgentId> {
        match self {
            Write::Insert { agent_id, .. }
            | Write::PolicyStatus { agent_id, .. }
            | Write::Connected { agent_id, .. }
            | Write::Disconnected { agent_id, .. }
            | Write::Backlog { agent_id, .. }
            | Write::Touch { agent_id, .. }
            | Write::Bind { agent_id, .. }
            | Write::CertRefused { agent_id, .. } => Some(agent_id),
            Write::SinkProgress { .. } => None,
        }
    }

    /// Whether a read for `agent_id` must wait for this write's commit.
    pub(super) fn touches(&self, agent_id: &AgentId) -> bool {
        self.agent_id().is_none_or(|a| a == agent_id)
    }

    pub(super) fn events(&self) -> usize {
        match self {
            Write::Insert {
                events, forward, ..
            } => events.len() + forward.len(),
            // A registry change costs about as much as one row.
            _ => 1,
        }
    }

    /// Answers the request with its share of the group's result.
    pub(super) fn answer(self, result: Result<Option<InsertOutcome>, StoreError>) {
        match self {
            Write::Insert { reply, .. } => {
                let _ = reply.send(result.map(Option::unwrap_or_default));
            }
            Write::Connected { reply, .. }
            | Write::SinkProgress { reply, .. }
            | Write::PolicyStatus { reply, .. }
            | Write::Disconnected { reply, .. }
            | Write::Backlog { reply, .. }
            | Write::Touch { reply, .. }
            | Write::Bind { reply, .. }
            | Write::CertRefused { reply, .. } => {
                let _ = reply.send(result.map(drop));
            }
        }
    }
}

/// A read, served between groups (or inside one when no write of the group
/// touches its agent; see the SQLite writer).
pub(super) enum Read {
    Watermark {
        agent_id: AgentId,
        reply: Reply<Seq>,
    },
    Acked {
        agent_id: AgentId,
        reply: Reply<Seq>,
    },
    /// Both at once, for a session that starts.
    Resume {
        agent_id: AgentId,
        reply: Reply<(Seq, Seq)>,
    },
    /// The registry's labels of the agent (`None`: not registered).
    Labels {
        agent_id: AgentId,
        reply: Reply<Option<BTreeMap<String, String>>>,
    },
    /// The agent's certificate binding, for the handshake.
    Binding {
        agent_id: AgentId,
        reply: Reply<Option<CertBinding>>,
    },
}

impl Read {
    /// The agent the read is about.
    pub(super) fn agent_id(&self) -> &AgentId {
        match self {
            Read::Watermark { agent_id, .. }
            | Read::Acked { agent_id, .. }
            | Read::Resume { agent_id, .. }
            | Read::Labels { agent_id, .. }
            | Read::Binding { agent_id, .. } => agent_id,
        }
    }
}

/// What travels on the queue a store backend serves: a [`Write`] joins a
/// group, a [`Read`] is served between groups.
pub(super) type Request = Message<Write, Read>;

/// A cheap, cloneable handle to the writer: give one to every agent session.
/// The writer stops once every handle is dropped or the shutdown token is
/// cancelled.
#[derive(Debug, Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Request>,
    signals: Signals,
    /// What this process counts of the commits and deliveries it awaits.
    kpis: std::sync::Arc<crate::kpis::Kpis>,
}

/// What the writer tells whoever waits on the sinks' queue, after each
/// commit: a counter that moves when events were queued for a sink (the
/// runners wait on it) and one that moves when a sink's queue shrank (the
/// sessions whose acknowledgement waits on it).
#[derive(Debug, Clone)]
pub(super) struct Signals {
    queued: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    delivered: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
}

impl Signals {
    fn new() -> Signals {
        Signals {
            queued: std::sync::Arc::new(tokio::sync::watch::Sender::new(0)),
            delivered: std::sync::Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    /// After a group committed.
    pub(super) fn committed(&self, group: &[Write]) {
        let queued = group
            .iter()
            .any(|w| matches!(w, Write::Insert { forward, .. } if !forward.is_empty()));
        let delivered = group.iter().any(
            |w| matches!(w, Write::SinkProgress { progress, .. } if progress.through.is_some()),
        );
        if queued {
            self.queued_moved();
        }
        if delivered {
            self.delivered_moved();
        }
    }

    /// Events were queued for a sink.
    pub(super) fn queued_moved(&self) {
        self.queued.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A sink's queue shrank (or may have, elsewhere).
    pub(super) fn delivered_moved(&self) {
        self.delivered.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl StoreHandle {
    /// The KPIs of this process: the sessions and sink runners that await
    /// this handle's commits count what they committed and delivered.
    pub fn kpis(&self) -> &std::sync::Arc<crate::kpis::Kpis> {
        &self.kpis
    }

    /// Stores `events` of `agent_id` (deduplicated by `(agent_id, seq)`),
    /// sharing a transaction with whatever else is queued, and resolves once
    /// it has committed with the agent's new watermark. Only then may the
    /// session acknowledge them.
    pub async fn insert(
        &self,
        agent_id: AgentId,
        events: Vec<(Seq, EventBody)>,
    ) -> Result<Seq, StoreError> {
        Ok(self.insert_nowait(agent_id, events).await?.await?.watermark)
    }

    /// Queues an insert and returns without waiting for its commit (it waits
    /// only while the queue is full), so that a session can keep reading
    /// batches and acknowledge each when its [`PendingInsert`] resolves.
    /// Inserts queued through one handle commit in the order they were queued.
    pub async fn insert_nowait(
        &self,
        agent_id: AgentId,
        events: Vec<(Seq, EventBody)>,
    ) -> Result<PendingInsert, StoreError> {
        let through = events.last().map_or(Seq(0), |(seq, _)| *seq);
        self.insert_routed_nowait(
            agent_id,
            events,
            Vec::new(),
            (Seq(0), through),
            PolicyCounts::default(),
        )
        .await
    }

    /// Like [`insert_nowait`](Self::insert_nowait) for what the policy kept of
    /// a batch that ended at seq `through`: the watermark rises to `through`
    /// even where the policy dropped the last events (the agent must not send
    /// them again), `policy` is added to the agent's counters, and the events
    /// it routes to sinks (`forward`) are queued for them, all in the same
    /// transaction. The outcome's `acked` is what may be acknowledged: it
    /// stays below the first event still waiting for a sink.
    ///
    /// `(after, through)`: the batch follows the session's previous batch,
    /// which ended at seq `after` (the first batch: the watermark the
    /// session started from). It is refused with
    /// [`StoreError::OutOfOrder`] unless the store holds the agent up to
    /// `after`: if an earlier batch failed while later ones were queued,
    /// storing a later one would raise the watermark over the missing
    /// events. `after = 0` checks nothing.
    pub async fn insert_routed_nowait(
        &self,
        agent_id: AgentId,
        events: Vec<(Seq, EventBody)>,
        forward: Vec<Forward>,
        (after, through): (Seq, Seq),
        policy: PolicyCounts,
    ) -> Result<PendingInsert, StoreError> {
        outpost_storage::send(&self.tx, |reply| {
            Message::Write(Write::Insert {
                agent_id,
                events,
                forward,
                through,
                after,
                policy,
                reply,
            })
        })
        .await
    }

    /// Records the policy version `agent_id` reported, and why it refused
    /// the last one pushed, if it did.
    pub async fn policy_status(
        &self,
        agent_id: AgentId,
        version: u64,
        error: Option<String>,
    ) -> Result<(), StoreError> {
        self.call(|reply| {
            Message::Write(Write::PolicyStatus {
                agent_id,
                version,
                error,
                reply,
            })
        })
        .await
    }

    /// Records that a session of `agent_id` started (after its `Hello`); see
    /// `Store::agent_connected`.
    pub async fn agent_connected(
        &self,
        agent_id: AgentId,
        labels: BTreeMap<String, String>,
        agent_version: String,
        protocol_version: u16,
    ) -> Result<(), StoreError> {
        self.call(|reply| {
            Message::Write(Write::Connected {
                agent_id,
                labels,
                agent_version,
                protocol_version,
                reply,
            })
        })
        .await
    }

    /// Records that a session of `agent_id` ended; see
    /// `Store::agent_disconnected`. Call it once for every
    /// [`agent_connected`](Self::agent_connected).
    pub async fn agent_disconnected(&self, agent_id: AgentId) -> Result<(), StoreError> {
        self.call(|reply| Message::Write(Write::Disconnected { agent_id, reply }))
            .await
    }

    /// Records the backlog `agent_id` reported; see `Store::report_backlog`.
    pub async fn report_backlog(
        &self,
        agent_id: AgentId,
        events: u64,
        bytes: u64,
    ) -> Result<(), StoreError> {
        self.call(|reply| {
            Message::Write(Write::Backlog {
                agent_id,
                events,
                bytes,
                reply,
            })
        })
        .await
    }

    /// Sets `agent_id`'s `last_seen` to now; see `Store::touch`. Inserts
    /// already do this, so only an idle session needs it.
    pub async fn touch(&self, agent_id: AgentId) -> Result<(), StoreError> {
        self.call(|reply| Message::Write(Write::Touch { agent_id, reply }))
            .await
    }

    /// The highest seq stored for `agent_id` (0 if none), read after every
    /// request queued before this one has committed: the watermark a new
    /// session starts from.
    pub async fn watermark(&self, agent_id: AgentId) -> Result<Seq, StoreError> {
        self.call(|reply| Message::Call(Read::Watermark { agent_id, reply }))
            .await
    }

    /// What may be acknowledged to `agent_id` now (its watermark, or less
    /// while an event of it waits for a sink), read like
    /// [`watermark`](Self::watermark).
    pub async fn acked(&self, agent_id: AgentId) -> Result<Seq, StoreError> {
        self.call(|reply| Message::Call(Read::Acked { agent_id, reply }))
            .await
    }

    /// [`watermark`](Self::watermark) and [`acked`](Self::acked) in one
    /// request, read like them: where a new session starts.
    pub async fn resume(&self, agent_id: AgentId) -> Result<(Seq, Seq), StoreError> {
        self.call(|reply| Message::Call(Read::Resume { agent_id, reply }))
            .await
    }

    /// The registry's labels of `agent_id`, read after every request queued
    /// before this one has committed (so after its `agent_connected`):
    /// the labels the hub selects its rules by. `None` for an agent the
    /// registry does not know.
    pub async fn labels(
        &self,
        agent_id: AgentId,
    ) -> Result<Option<BTreeMap<String, String>>, StoreError> {
        self.call(|reply| Message::Call(Read::Labels { agent_id, reply }))
            .await
    }

    /// The certificate the registry binds to `agent_id`, and the previous
    /// one within its grace period; `None` for an agent never bound. Read
    /// after every request queued before it has committed.
    pub async fn binding(&self, agent_id: AgentId) -> Result<Option<CertBinding>, StoreError> {
        self.call(|reply| Message::Call(Read::Binding { agent_id, reply }))
            .await
    }

    /// Binds `cert` to `agent_id` as `how` says: on first use only if no
    /// certificate is bound yet (read [`binding`](Self::binding) again to
    /// learn which one won), or in place of the current one after a
    /// renewal, audited `cert.renewed` in the same transaction.
    pub async fn bind(
        &self,
        agent_id: AgentId,
        cert: CertInfo,
        how: Rebind,
    ) -> Result<(), StoreError> {
        self.call(|reply| {
            Message::Write(Write::Bind {
                agent_id,
                cert,
                how,
                reply,
            })
        })
        .await
    }

    /// Audits `cert.refused`: a certificate for `agent_id` with
    /// `fingerprint` was refused at the handshake, for `reason`.
    pub async fn cert_refused(
        &self,
        agent_id: AgentId,
        fingerprint: String,
        reason: String,
    ) -> Result<(), StoreError> {
        self.call(|reply| {
            Message::Write(Write::CertRefused {
                agent_id,
                fingerprint,
                reason,
                reply,
            })
        })
        .await
    }

    /// Records a sink runner's delivery attempt: the sink's queue up to
    /// `progress.through` is deleted with its counters in one transaction.
    pub async fn sink_progress(
        &self,
        sink: String,
        progress: SinkProgress,
    ) -> Result<(), StoreError> {
        self.call(|reply| {
            Message::Write(Write::SinkProgress {
                sink,
                progress,
                reply,
            })
        })
        .await
    }

    /// What the store's backend tells the runners and sessions by.
    pub(super) fn signals(&self) -> Signals {
        self.signals.clone()
    }

    /// Moves after each commit that queued events for a sink.
    pub fn queued_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.signals.queued.subscribe()
    }

    /// Moves after each commit in which a sink's queue shrank.
    pub fn delivered_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.signals.delivered.subscribe()
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, StoreError> {
        outpost_storage::send(&self.tx, make).await?.await
    }
}

/// The order check of one group's inserts (see
/// [`StoreHandle::insert_routed_nowait`]), shared by both stores: what the
/// store holds of each agent, plus what the group's earlier inserts will add.
#[derive(Debug, Default)]
pub(super) struct OrderCheck {
    held: BTreeMap<AgentId, Seq>,
}

impl OrderCheck {
    /// What the group already knows the store will hold of `agent_id`;
    /// `None`: ask the store.
    pub(super) fn known(&self, agent_id: &AgentId) -> Option<Seq> {
        self.held.get(agent_id).copied()
    }

    /// Admits an insert `after..=through` of `agent_id` when the store holds
    /// (or will hold) the agent up to `after`; `stored` is [`known`] or what
    /// the store said.
    ///
    /// [`known`]: OrderCheck::known
    pub(super) fn admit(
        &mut self,
        agent_id: &AgentId,
        after: Seq,
        through: Seq,
        stored: Seq,
    ) -> Result<(), StoreError> {
        if stored < after {
            return Err(StoreError::OutOfOrder {
                agent_id: agent_id.clone(),
                after,
                watermark: stored,
            });
        }
        self.held.insert(agent_id.clone(), stored.max(through));
        Ok(())
    }
}

/// The handle and the queue a store backend serves, and the token that
/// stops the shutdown helper once the backend ends (drop its guard there).
pub(super) fn channel(
    shutdown: CancellationToken,
) -> (StoreHandle, mpsc::Receiver<Request>, CancellationToken) {
    let queue = outpost_storage::queue(QUEUE_DEPTH, shutdown, None);
    (
        StoreHandle {
            tx: queue.tx,
            signals: Signals::new(),
            kpis: std::sync::Arc::new(crate::kpis::Kpis::new(crate::clock::unix_now().0)),
        },
        queue.rx,
        queue.done,
    )
}
