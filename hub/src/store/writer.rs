//! The group-commit writer: one blocking thread owns the [`Store`] and turns
//! the requests of every agent session into as few transactions as it can.
//!
//! The writer runs on tokio's blocking pool so that fsync never stalls the
//! runtime. It waits for a request with `blocking_recv`, then keeps collecting
//! writes (inserts and registry changes, from any number of agents) until
//! [`WriterOptions::max_batch`] events or [`WriterOptions::window`] after the
//! first, commits them in ONE transaction, and only then answers each request.
//! A read ([`StoreHandle::watermark`]) ends a group and is answered after it,
//! so it sees every write queued before it. A small async helper task turns
//! the shutdown token into a message queued behind everything already sent.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outpost_protocols::event::{AgentId, EventBody, Seq, Timestamp};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::sinkq::{Forward, SinkProgress};
use super::sqlite::PolicyCounts;
use super::sqlite::{InsertOutcome, Op, Store};
use super::StoreError;

/// Requests that may wait for the writer before a sender waits too: the
/// backpressure that keeps ingest from filling memory when the disk is slow.
/// Each agent session has at most its protocol window of events in flight, so
/// this bounds memory, and a full queue makes every session wait its turn.
const QUEUE_DEPTH: usize = 4096;

/// The longest the writer sleeps between looks at the queue inside a window.
const POLL_STEP: Duration = Duration::from_micros(200);

/// How the writer groups requests into transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterOptions {
    /// Stop collecting once this many events are waiting (a single larger
    /// request is still committed whole). Default 16384.
    pub max_batch: usize,
    /// How long after the first request of a group the writer may wait for
    /// more once the queue is empty. Zero (the default) commits whatever is
    /// queued at once; requests arriving during a commit form the next group,
    /// which is how many agents share one fsync under load.
    pub window: Duration,
}

impl Default for WriterOptions {
    fn default() -> WriterOptions {
        WriterOptions {
            max_batch: 16384,
            window: Duration::ZERO,
        }
    }
}

pub(super) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

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
}

impl Write {
    fn op(&self) -> Op<'_> {
        match self {
            Write::Insert {
                agent_id,
                events,
                forward,
                through,
                policy,
                ..
            } => Op::Insert {
                agent_id,
                events,
                forward,
                through: *through,
                policy: *policy,
            },
            Write::SinkProgress { sink, progress, .. } => Op::SinkProgress { sink, progress },
            Write::PolicyStatus {
                agent_id,
                version,
                error,
                ..
            } => Op::PolicyStatus {
                agent_id,
                version: *version,
                error: error.as_deref(),
            },
            Write::Connected {
                agent_id,
                labels,
                agent_version,
                protocol_version,
                ..
            } => Op::Connected {
                agent_id,
                labels,
                agent_version,
                protocol_version: *protocol_version,
            },
            Write::Disconnected { agent_id, .. } => Op::Disconnected { agent_id },
            Write::Backlog {
                agent_id,
                events,
                bytes,
                ..
            } => Op::Backlog {
                agent_id,
                events: *events,
                bytes: *bytes,
            },
            Write::Touch { agent_id, .. } => Op::Touch { agent_id },
        }
    }

    /// The agent whose watermark or acknowledgement this write may change;
    /// `None` for a sink's progress, which may change any agent's.
    fn agent_id(&self) -> Option<&AgentId> {
        match self {
            Write::Insert { agent_id, .. }
            | Write::PolicyStatus { agent_id, .. }
            | Write::Connected { agent_id, .. }
            | Write::Disconnected { agent_id, .. }
            | Write::Backlog { agent_id, .. }
            | Write::Touch { agent_id, .. } => Some(agent_id),
            Write::SinkProgress { .. } => None,
        }
    }

    /// Whether a read for `agent_id` must wait for this write's commit.
    fn touches(&self, agent_id: &AgentId) -> bool {
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
            | Write::Touch { reply, .. } => {
                let _ = reply.send(result.map(drop));
            }
        }
    }
}

pub(super) enum Request {
    Write(Write),
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
    /// The shutdown token was cancelled: finish what was received and stop.
    Shutdown,
}

/// A cheap, cloneable handle to the writer: give one to every agent session.
/// The writer stops once every handle is dropped or the shutdown token is
/// cancelled.
#[derive(Debug, Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Request>,
    signals: Signals,
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
    fn committed(&self, group: &[Write]) {
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

/// An insert that was queued; await it for the outcome, which arrives once the
/// transaction that holds it has committed.
#[derive(Debug)]
#[must_use = "the outcome says up to which seq the events are durable"]
pub struct PendingInsert(oneshot::Receiver<Result<InsertOutcome, StoreError>>);

impl Future for PendingInsert {
    type Output = Result<InsertOutcome, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(StoreError::Closed)))
    }
}

impl StoreHandle {
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
        let (reply, rx) = oneshot::channel();
        self.send(Request::Write(Write::Insert {
            agent_id,
            events,
            forward,
            through,
            after,
            policy,
            reply,
        }))
        .await?;
        Ok(PendingInsert(rx))
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
            Request::Write(Write::PolicyStatus {
                agent_id,
                version,
                error,
                reply,
            })
        })
        .await
    }

    /// Records that a session of `agent_id` started (after its `Hello`); see
    /// [`Store::agent_connected`].
    pub async fn agent_connected(
        &self,
        agent_id: AgentId,
        labels: BTreeMap<String, String>,
        agent_version: String,
        protocol_version: u16,
    ) -> Result<(), StoreError> {
        self.call(|reply| {
            Request::Write(Write::Connected {
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
    /// [`Store::agent_disconnected`]. Call it once for every
    /// [`agent_connected`](Self::agent_connected).
    pub async fn agent_disconnected(&self, agent_id: AgentId) -> Result<(), StoreError> {
        self.call(|reply| Request::Write(Write::Disconnected { agent_id, reply }))
            .await
    }

    /// Records the backlog `agent_id` reported; see [`Store::report_backlog`].
    pub async fn report_backlog(
        &self,
        agent_id: AgentId,
        events: u64,
        bytes: u64,
    ) -> Result<(), StoreError> {
        self.call(|reply| {
            Request::Write(Write::Backlog {
                agent_id,
                events,
                bytes,
                reply,
            })
        })
        .await
    }

    /// Sets `agent_id`'s `last_seen` to now; see [`Store::touch`]. Inserts
    /// already do this, so only an idle session needs it.
    pub async fn touch(&self, agent_id: AgentId) -> Result<(), StoreError> {
        self.call(|reply| Request::Write(Write::Touch { agent_id, reply }))
            .await
    }

    /// The highest seq stored for `agent_id` (0 if none), read after every
    /// request queued before this one has committed: the watermark a new
    /// session starts from.
    pub async fn watermark(&self, agent_id: AgentId) -> Result<Seq, StoreError> {
        self.call(|reply| Request::Watermark { agent_id, reply })
            .await
    }

    /// What may be acknowledged to `agent_id` now (its watermark, or less
    /// while an event of it waits for a sink), read like
    /// [`watermark`](Self::watermark).
    pub async fn acked(&self, agent_id: AgentId) -> Result<Seq, StoreError> {
        self.call(|reply| Request::Acked { agent_id, reply }).await
    }

    /// [`watermark`](Self::watermark) and [`acked`](Self::acked) in one
    /// request, read like them: where a new session starts.
    pub async fn resume(&self, agent_id: AgentId) -> Result<(Seq, Seq), StoreError> {
        self.call(|reply| Request::Resume { agent_id, reply }).await
    }

    /// Records a sink runner's delivery attempt: the sink's queue up to
    /// `progress.through` is deleted with its counters in one transaction.
    pub async fn sink_progress(
        &self,
        sink: String,
        progress: SinkProgress,
    ) -> Result<(), StoreError> {
        self.call(|reply| {
            Request::Write(Write::SinkProgress {
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

    async fn send(&self, request: Request) -> Result<(), StoreError> {
        self.tx.send(request).await.map_err(|_| StoreError::Closed)
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply)).await?;
        rx.await.unwrap_or(Err(StoreError::Closed))
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

/// Starts the group-commit writer for `store` on tokio's blocking pool.
///
/// On shutdown (the token cancelled, or every handle dropped) the writer
/// commits what it has received, answers every request, and the join handle
/// yields the [`Store`] back. Requests sent after that fail with
/// [`StoreError::Closed`]. Must be called inside a tokio runtime.
pub fn spawn_store_writer(
    store: Store,
    opts: WriterOptions,
    shutdown: CancellationToken,
) -> (StoreHandle, JoinHandle<Result<Store, StoreError>>) {
    let (handle, rx, done) = channel(shutdown);
    let for_writer = handle.signals.clone();
    let join = tokio::task::spawn_blocking(move || {
        // Stops the helper task however the writer ends, panics included.
        let _done = done.drop_guard();
        run(store, opts, rx, &for_writer)
    });
    (handle, join)
}

/// The handle and the queue a store backend serves, and the token that
/// stops the shutdown helper once the backend ends (drop its guard there).
pub(super) fn channel(
    shutdown: CancellationToken,
) -> (StoreHandle, mpsc::Receiver<Request>, CancellationToken) {
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let done = CancellationToken::new();
    tokio::spawn(on_shutdown(tx.downgrade(), shutdown, done.clone()));
    (
        StoreHandle {
            tx,
            signals: Signals::new(),
        },
        rx,
        done,
    )
}

/// Sends the writer the shutdown message when the token is cancelled.
async fn on_shutdown(
    tx: mpsc::WeakSender<Request>,
    shutdown: CancellationToken,
    done: CancellationToken,
) {
    tokio::select! {
        () = done.cancelled() => {}
        () = shutdown.cancelled() => {
            if let Some(tx) = tx.upgrade() {
                // Queued behind what was already sent, so that all of it is
                // committed first.
                let _ = tx.send(Request::Shutdown).await;
            }
        }
    }
}

/// The wall clock as a [`Timestamp`]: for `last_seen`, policy versions and
/// audit entries.
pub(crate) fn now() -> Timestamp {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Timestamp(nanos)
}

/// The writer loop; returns the store when the channel is closed and empty.
fn run(
    mut store: Store,
    opts: WriterOptions,
    mut rx: mpsc::Receiver<Request>,
    signals: &Signals,
) -> Result<Store, StoreError> {
    // A read that ended a group, handled next so that the channel's order is
    // kept.
    let mut next: Option<Request> = None;
    loop {
        let request = match next.take() {
            Some(r) => r,
            None => match rx.blocking_recv() {
                Some(r) => r,
                None => break,
            },
        };
        match request {
            Request::Write(first) => {
                let group = collect(&store, first, &opts, &mut rx, &mut next);
                commit(&mut store, group, signals);
            }
            Request::Watermark { agent_id, reply } => {
                let _ = reply.send(store.watermark(&agent_id));
            }
            Request::Acked { agent_id, reply } => {
                let _ = reply.send(store.acked(&agent_id));
            }
            Request::Resume { agent_id, reply } => {
                let _ = reply.send(resume(&store, &agent_id));
            }
            Request::Shutdown => {
                // Refuse new requests; the loop still drains the queued ones.
                debug!("Hub store writer shutting down.");
                rx.close();
            }
        }
    }
    debug!(
        transactions = store.transactions(),
        "Hub store writer stopped."
    );
    Ok(store)
}

fn resume(store: &Store, agent_id: &AgentId) -> Result<(Seq, Seq), StoreError> {
    Ok((store.watermark(agent_id)?, store.acked(agent_id)?))
}

/// Gathers writes after `first` until `max_batch` events, the end of the
/// window, another request (left in `next`) or a closed, empty channel.
fn collect(
    store: &Store,
    first: Write,
    opts: &WriterOptions,
    rx: &mut mpsc::Receiver<Request>,
    next: &mut Option<Request>,
) -> Vec<Write> {
    let deadline = Instant::now() + opts.window;
    let mut events = first.events();
    let mut group = vec![first];
    while events < opts.max_batch {
        match rx.try_recv() {
            Ok(Request::Write(w)) => {
                events += w.events();
                group.push(w);
            }
            // A watermark is read from what is committed. Unless the open
            // group writes to the same agent (then the read waits for the
            // commit, keeping the channel's order), answering it now gives
            // the same result, and keeps a thousand agents connecting at
            // once from splitting the groups into a transaction (and an
            // fsync) each.
            Ok(Request::Watermark { agent_id, reply })
                if !group.iter().any(|w| w.touches(&agent_id)) =>
            {
                let _ = reply.send(store.watermark(&agent_id));
            }
            Ok(Request::Acked { agent_id, reply })
                if !group.iter().any(|w| w.touches(&agent_id)) =>
            {
                let _ = reply.send(store.acked(&agent_id));
            }
            Ok(Request::Resume { agent_id, reply })
                if !group.iter().any(|w| w.touches(&agent_id)) =>
            {
                let _ = reply.send(resume(store, &agent_id));
            }
            Ok(other) => {
                *next = Some(other);
                break;
            }
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {
                // Nothing more is queued: commit now unless a window was
                // configured. tokio's channel has no blocking receive with a
                // timeout, so the window is watched in short sleeps, only
                // while a group is open.
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                std::thread::sleep((deadline - now).min(POLL_STEP));
            }
        }
    }
    group
}

/// Commits a group in one transaction and answers each request.
fn commit(store: &mut Store, group: Vec<Write>, signals: &Signals) {
    // A request the store would refuse (a seq out of range) is answered alone,
    // so that one agent's bad batch cannot fail the others'.
    let mut checked = Vec::with_capacity(group.len());
    for w in group {
        match store.check(&w.op()) {
            Ok(()) => checked.push(w),
            Err(e) => {
                warn!(error = %e, "Hub store refused a request.");
                w.answer(Err(e));
            }
        }
    }
    // A batch must follow what the store holds, or what an earlier request
    // of this group will hold once committed.
    let mut order = OrderCheck::default();
    let mut ordered = Vec::with_capacity(checked.len());
    for w in checked {
        if let Write::Insert {
            agent_id,
            after,
            through,
            ..
        } = &w
        {
            let admitted = match order.known(agent_id) {
                Some(s) => Ok(s),
                None => store.watermark(agent_id),
            }
            .and_then(|s| order.admit(agent_id, *after, *through, s));
            if let Err(e) = admitted {
                warn!(error = %e, "Hub store refused a request.");
                w.answer(Err(e));
                continue;
            }
        }
        ordered.push(w);
    }
    let group = ordered;
    if group.is_empty() {
        return;
    }
    let ops: Vec<Op<'_>> = group.iter().map(Write::op).collect();
    let result = store.apply(now(), &ops);
    drop(ops);
    match result {
        Ok(outcomes) => {
            let (inserted, duplicates) = outcomes
                .iter()
                .flatten()
                .fold((0, 0), |(i, d), o| (i + o.inserted, d + o.duplicates));
            debug!(
                requests = group.len(),
                inserted, duplicates, "Hub store group committed."
            );
            signals.committed(&group);
            for (w, o) in group.into_iter().zip(outcomes) {
                w.answer(Ok(o));
            }
        }
        Err(e) => {
            // Nothing of the group was committed, so every request fails and
            // no session acknowledges anything; the writer keeps serving,
            // since the cause (a full disk) may pass.
            warn!(requests = group.len(), error = %e, "Hub store group commit failed.");
            for w in group {
                w.answer(Err(e.clone()));
            }
        }
    }
}
