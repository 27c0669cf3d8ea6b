//! The group-commit writer: one blocking thread owns the [`Outbox`] and turns the
//! append requests of every source into as few transactions as it can.
//!
//! The writer runs on tokio's blocking pool so that fsync never stalls the
//! runtime. It waits for a request with `blocking_recv`, then keeps collecting
//! appends until [`WriterOptions::max_batch`] events or
//! [`WriterOptions::window`] after that first request, commits them in ONE
//! transaction and answers each request with its own outcome. A small async
//! helper task sends it a tick every second (age eviction) and a shutdown
//! message when the token is cancelled, through a weak sender so that it does
//! not keep the channel open once every [`OutboxHandle`] is gone.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outpost_protocols::event::{Event, EventBody, Seq, Timestamp};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use std::sync::Arc;

use outpost_protocols::policy::{Enforcer, Stage, Verdict};

use super::{AppendOutcome, Eviction, Outbox, OutboxError, OutboxStats, Qos2Op, Resumed};
use crate::metrics::Metrics;
use crate::policy::AgentPolicy;

/// Requests that may wait for the writer before `append` itself waits: the
/// backpressure that keeps a fast source from filling memory.
const QUEUE_DEPTH: usize = 1024;

/// How often expired events are evicted.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

/// The longest the writer sleeps between looks at the queue inside a window.
const POLL_STEP: Duration = Duration::from_micros(200);

/// How the writer groups requests into transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterOptions {
    /// Stop collecting once this many events are waiting (a single larger
    /// request is still committed whole). Default 4096.
    pub max_batch: usize,
    /// How long after the first request of a group the writer may wait for
    /// more once the queue is empty. Zero (the default) commits whatever is
    /// queued at once; requests arriving during a commit form the next group.
    pub window: Duration,
}

impl Default for WriterOptions {
    fn default() -> WriterOptions {
        WriterOptions {
            max_batch: 4096,
            window: Duration::ZERO,
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, OutboxError>>;

struct AppendRequest {
    bodies: Vec<EventBody>,
    qos2: Vec<Qos2Op>,
    reply: Reply<AppendOutcome>,
}

enum Request {
    Append(AppendRequest),
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
    Stats {
        reply: Reply<OutboxStats>,
    },
    Qos2Pending {
        reply: Reply<BTreeSet<u16>>,
    },
    /// Time to evict expired events.
    Tick,
    /// The shutdown token was cancelled: finish what was received and stop.
    Shutdown,
}

/// A cheap, cloneable handle to the writer. The writer stops once every handle
/// is dropped or the shutdown token is cancelled.
#[derive(Debug, Clone)]
pub struct OutboxHandle {
    tx: mpsc::Sender<Request>,
    committed: watch::Receiver<Seq>,
    /// The fleet policy every append passes through, if the writer has one.
    filter: Option<Arc<std::sync::Mutex<SourceFilter>>>,
}

/// An append that was queued; await it for the outcome, which arrives once the
/// transaction that holds it has committed.
#[derive(Debug)]
#[must_use = "the outcome says whether and under which seqs the events were stored"]
pub struct PendingAppend(oneshot::Receiver<Result<AppendOutcome, OutboxError>>);

impl Future for PendingAppend {
    type Output = Result<AppendOutcome, OutboxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(OutboxError::Closed)))
    }
}

impl OutboxHandle {
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
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Append(AppendRequest {
                bodies,
                qos2,
                reply,
            }))
            .await
            .map_err(|_| OutboxError::Closed)?;
        Ok(PendingAppend(rx))
    }

    /// Deletes the events up to `upto` once the hub made them durable; see
    /// [`Outbox::ack`].
    pub async fn ack(&self, upto: Seq) -> Result<u64, OutboxError> {
        self.call(|reply| Request::Ack { upto, reply }).await
    }

    /// Applies a hub's `Welcome` watermark ([`Outbox::resume_after`]); after
    /// a renumbering, [`committed`](Self::committed) moves to the new last
    /// seq.
    pub async fn resume_after(&self, watermark: Seq) -> Result<Resumed, OutboxError> {
        self.call(|reply| Request::Resume { watermark, reply })
            .await
    }

    /// Applies a hub's `Stored` mark ([`Outbox::follow`]); after a
    /// renumbering, [`committed`](Self::committed) moves to the new last seq.
    pub async fn follow(&self, held: Seq) -> Result<Resumed, OutboxError> {
        self.call(|reply| Request::Follow { held, reply }).await
    }

    /// Up to `max_events` events after `after`, read on the writer's
    /// connection. A bulk reader may prefer its own
    /// [`OutboxReader`](super::OutboxReader), which does not wait for commits.
    pub async fn read_batch(
        &self,
        after: Seq,
        max_events: usize,
    ) -> Result<Vec<Event>, OutboxError> {
        self.call(|reply| Request::ReadBatch {
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
        self.call(|reply| Request::Stats { reply }).await
    }

    /// The inbound QoS 2 packet ids stored and not yet released.
    pub async fn qos2_pending(&self) -> Result<BTreeSet<u16>, OutboxError> {
        self.call(|reply| Request::Qos2Pending { reply }).await
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| OutboxError::Closed)?;
        rx.await.unwrap_or(Err(OutboxError::Closed))
    }
}

/// Starts the group-commit writer for `outbox` on tokio's blocking pool.
///
/// On shutdown (the token cancelled, or every handle dropped) the writer
/// commits what it has received, answers every request, and the join handle
/// yields the [`Outbox`] back. Requests sent after that fail with
/// [`OutboxError::Closed`]. Must be called inside a tokio runtime.
pub fn spawn_writer(
    outbox: Outbox,
    opts: WriterOptions,
    shutdown: CancellationToken,
) -> (OutboxHandle, JoinHandle<Result<Outbox, OutboxError>>) {
    spawn_writer_with_policy(outbox, opts, None, shutdown)
}

/// The fleet policy at the outbox: every append passes through it before it
/// is stored for upload ([`SourceFilter`], run by the appending task, so that
/// JSON minimisation runs beside the writer's commits rather than between
/// them), and its buffer limits replace the local ones (applied by the
/// writer, which owns the outbox).
pub struct PolicyGate {
    rx: watch::Receiver<Arc<AgentPolicy>>,
    labels: std::collections::BTreeMap<String, String>,
    metrics: Arc<Metrics>,
    /// The outbox limits of the local config, restored when a policy sets
    /// none.
    local: (u64, Option<Duration>, Eviction),
}

impl PolicyGate {
    /// A gate following `rx`, for an agent with `labels`.
    pub fn new(
        mut rx: watch::Receiver<Arc<AgentPolicy>>,
        labels: std::collections::BTreeMap<String, String>,
        metrics: Arc<Metrics>,
    ) -> PolicyGate {
        // The first refresh applies the policy in force now.
        rx.mark_changed();
        PolicyGate {
            rx,
            labels,
            metrics,
            local: (0, None, Eviction::DropOldest),
        }
    }

    /// Picks up the buffer limits of a policy put in force since the last
    /// look.
    fn refresh(&mut self, outbox: &mut Outbox) {
        if !self.rx.has_changed().unwrap_or(false) {
            return;
        }
        let p = self.rx.borrow_and_update().clone();
        let (max_bytes, max_age, eviction) = self.local;
        let limits = p.policy.buffer_for(&self.labels);
        let eviction_of = |e: &str| match e {
            "refuse-new" => Eviction::RefuseNew,
            _ => Eviction::DropOldest,
        };
        outbox.set_limits(
            limits.and_then(|l| l.max_bytes).unwrap_or(max_bytes),
            limits.and_then(|l| l.max_age).or(max_age),
            limits
                .and_then(|l| l.eviction.as_deref())
                .map_or(eviction, eviction_of),
        );
        self.metrics
            .policy_version
            .set(i64::try_from(p.version.0).unwrap_or(i64::MAX));
        debug!(
            policy_version = p.version.0,
            rules = p.compiled.rules(),
            "The outbox enforces the policy."
        );
    }
}

/// The part of the policy every append passes through, shared by the
/// handles of one writer.
#[derive(Debug)]
struct SourceFilter {
    rx: watch::Receiver<Arc<AgentPolicy>>,
    metrics: Arc<Metrics>,
    enforcer: Option<Enforcer>,
}

impl SourceFilter {
    /// Drops and minimises `bodies` as the policy in force says.
    fn filter(&mut self, bodies: &mut Vec<EventBody>) {
        if self.rx.has_changed().unwrap_or(false) {
            let p = self.rx.borrow_and_update().clone();
            self.enforcer = (!p.is_permissive()).then(|| Enforcer::new(p.compiled.clone()));
        }
        let Some(enforcer) = &mut self.enforcer else {
            return;
        };
        let metrics = &self.metrics;
        bodies.retain_mut(|b| match enforcer.apply(b, Stage::Ingest) {
            Verdict::Keep { modified, .. } => {
                if modified {
                    metrics.policy_modified.inc();
                }
                true
            }
            Verdict::Drop(reason) => {
                metrics.policy_dropped(reason.name(), 1);
                false
            }
        });
    }
}

/// [`spawn_writer`] with the fleet policy applied to every append.
pub fn spawn_writer_with_policy(
    outbox: Outbox,
    opts: WriterOptions,
    gate: Option<PolicyGate>,
    shutdown: CancellationToken,
) -> (OutboxHandle, JoinHandle<Result<Outbox, OutboxError>>) {
    let mut gate = gate;
    let mut filter = None;
    if let Some(g) = &mut gate {
        let c = outbox.config();
        g.local = (c.max_bytes, c.max_age, c.eviction);
        let mut rx = g.rx.clone();
        rx.mark_changed();
        filter = Some(Arc::new(std::sync::Mutex::new(SourceFilter {
            rx,
            metrics: g.metrics.clone(),
            enforcer: None,
        })));
    }
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let last = outbox
        .stats()
        .map(|s| Seq(s.next_seq.0.saturating_sub(1)))
        .unwrap_or(Seq(0));
    let (committed_tx, committed) = watch::channel(last);
    let done = CancellationToken::new();
    tokio::spawn(pace(tx.downgrade(), shutdown, done.clone()));
    let join = tokio::task::spawn_blocking(move || {
        // Stops the helper task however the writer ends, panics included.
        let _done = done.drop_guard();
        run(outbox, opts, gate, rx, committed_tx)
    });
    (
        OutboxHandle {
            tx,
            committed,
            filter,
        },
        join,
    )
}

/// Sends the writer its ticks and the shutdown message.
async fn pace(tx: mpsc::WeakSender<Request>, shutdown: CancellationToken, done: CancellationToken) {
    let mut tick = tokio::time::interval(EXPIRE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = done.cancelled() => return,
            () = shutdown.cancelled() => {
                if let Some(tx) = tx.upgrade() {
                    // Queued behind what was already sent, so that all of it is
                    // committed first.
                    let _ = tx.send(Request::Shutdown).await;
                }
                return;
            }
            _ = tick.tick() => match tx.upgrade() {
                // A full queue means the writer is busy; the next tick will do.
                Some(tx) => { let _ = tx.try_send(Request::Tick); }
                None => return,
            },
        }
    }
}

fn now() -> Timestamp {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Timestamp(nanos)
}

/// The writer loop; returns the outbox when the channel is closed and empty.
fn run(
    mut outbox: Outbox,
    opts: WriterOptions,
    mut gate: Option<PolicyGate>,
    mut rx: mpsc::Receiver<Request>,
    committed: watch::Sender<Seq>,
) -> Result<Outbox, OutboxError> {
    // A non-append request that ended a group, handled next so that the
    // channel's order is kept.
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
            Request::Append(first) => {
                let mut tick = false;
                let group = collect(first, &opts, &mut rx, &mut next, &mut tick);
                if let Some(g) = &mut gate {
                    g.refresh(&mut outbox);
                }
                if let Some(last) = commit(&mut outbox, group) {
                    committed.send_if_modified(|s| {
                        let newer = last > *s;
                        if newer {
                            *s = last;
                        }
                        newer
                    });
                }
                if tick {
                    expire(&mut outbox);
                }
            }
            Request::Ack { upto, reply } => {
                let _ = reply.send(outbox.ack(upto));
            }
            Request::Resume { watermark, reply } => {
                let result = outbox.resume_after(watermark);
                if let Ok(Resumed::Renumbered { last, .. }) = result {
                    committed.send_replace(last);
                }
                let _ = reply.send(result);
            }
            Request::Follow { held, reply } => {
                let result = outbox.follow(held);
                if let Ok(Resumed::Renumbered { last, .. }) = result {
                    committed.send_replace(last);
                }
                let _ = reply.send(result);
            }
            Request::ReadBatch {
                after,
                max_events,
                reply,
            } => {
                let _ = reply.send(outbox.read_batch(after, max_events));
            }
            Request::Stats { reply } => {
                let _ = reply.send(outbox.stats());
            }
            Request::Qos2Pending { reply } => {
                let _ = reply.send(outbox.qos2_pending());
            }
            Request::Tick => {
                if let Some(g) = &mut gate {
                    g.refresh(&mut outbox);
                }
                expire(&mut outbox);
            }
            Request::Shutdown => {
                // Refuse new requests; the loop still drains the queued ones.
                debug!("Outbox writer shutting down.");
                rx.close();
            }
        }
    }
    debug!("Outbox writer stopped.");
    Ok(outbox)
}

/// Gathers appends after `first` until `max_batch` events, the end of the
/// window, a non-append request (left in `next`) or a closed, empty channel.
fn collect(
    first: AppendRequest,
    opts: &WriterOptions,
    rx: &mut mpsc::Receiver<Request>,
    next: &mut Option<Request>,
    tick: &mut bool,
) -> Vec<AppendRequest> {
    let deadline = Instant::now() + opts.window;
    let mut events = first.bodies.len();
    let mut group = vec![first];
    while events < opts.max_batch {
        match rx.try_recv() {
            Ok(Request::Append(a)) => {
                events += a.bodies.len();
                group.push(a);
            }
            // A tick need not cut the group short: expiry runs after it.
            Ok(Request::Tick) => *tick = true,
            Ok(other) => {
                *next = Some(other);
                break;
            }
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {
                // Nothing more is queued: commit now unless a window was
                // configured. Under load, requests pile up while a commit is
                // on disk and form the next group by themselves, so waiting
                // only adds latency where a flush is cheap; on slow flash a
                // short window trades latency for fewer flushes. tokio's
                // channel has no blocking receive with a timeout, so the
                // window is watched in short sleeps, only while a group is
                // open.
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
/// Returns the last seq the group committed, if it stored any event.
fn commit(outbox: &mut Outbox, group: Vec<AppendRequest>) -> Option<Seq> {
    let requests: Vec<(&[EventBody], &[Qos2Op])> = group
        .iter()
        .map(|a| (a.bodies.as_slice(), a.qos2.as_slice()))
        .collect();
    let result = outbox.append_many(now(), &requests);
    drop(requests);
    match result {
        Ok(outcomes) => {
            let last = outcomes.iter().filter_map(|o| o.last_seq).max();
            for (a, o) in group.into_iter().zip(outcomes) {
                let _ = a.reply.send(Ok(o));
            }
            last
        }
        Err(e) => {
            // Nothing of the group was committed, so every request fails and
            // its source acknowledges nothing; the writer keeps serving, since
            // the cause (a full disk) may pass.
            warn!(requests = group.len(), error = %e, "Outbox group commit failed.");
            if e.is_disk_full() {
                // Give back the WAL's space, so that the next commit can go
                // through as soon as the file system has room again.
                match outbox.reclaim_wal() {
                    Ok(()) => debug!("Outbox WAL truncated after a full disk."),
                    Err(e) => debug!(error = %e, "Outbox WAL not truncated."),
                }
            }
            for a in group {
                let _ = a.reply.send(Err(e.clone()));
            }
            None
        }
    }
}

fn expire(outbox: &mut Outbox) {
    if let Err(e) = outbox.evict_expired(now()) {
        warn!(error = %e, "Outbox age eviction failed.");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use outpost_protocols::event::{AgentId, Quality, StreamName, Value};

    use super::*;
    use crate::outbox::{OutboxConfig, Synchronous};

    fn body(i: u64, ts: i64) -> EventBody {
        EventBody {
            stream: StreamName::parse("plc1/temperature").expect("valid"),
            ts: Timestamp(ts),
            value: Value::U64(i),
            quality: Quality::Good,
            attrs: BTreeMap::new(),
        }
    }

    fn open(dir: &tempfile::TempDir) -> Outbox {
        let mut cfg = OutboxConfig::new(dir.path().join("outbox.db"));
        cfg.synchronous = Synchronous::Normal;
        Outbox::open(&cfg, AgentId::parse("gw-1").expect("valid")).expect("opens")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_from_many_tasks_share_transactions_and_get_distinct_seq_ranges() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = WriterOptions {
            max_batch: 4096,
            window: Duration::from_millis(300),
        };
        let (handle, join) = spawn_writer(open(&dir), opts, CancellationToken::new());
        let before = handle.stats().await.expect("stats").transactions_total;

        const TASKS: usize = 8;
        const PER_TASK: u64 = 10;
        let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
        let mut tasks = Vec::new();
        for t in 0..TASKS as u64 {
            let handle = handle.clone();
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                let bodies = (0..PER_TASK).map(|i| body(t * 100 + i, now().0)).collect();
                barrier.wait().await;
                (t, handle.append(bodies, vec![]).await.expect("appends"))
            }));
        }
        let mut ranges = Vec::new();
        for task in tasks {
            let (t, outcome) = task.await.expect("task");
            assert_eq!(outcome.accepted, PER_TASK as usize);
            let (first, last) = (
                outcome.first_seq.expect("first"),
                outcome.last_seq.expect("last"),
            );
            assert_eq!(
                last.0 - first.0 + 1,
                PER_TASK,
                "one contiguous range per request"
            );
            ranges.push((first.0, last.0, t));
        }
        ranges.sort();
        for w in ranges.windows(2) {
            assert!(w[0].1 < w[1].0, "ranges overlap: {ranges:?}");
        }

        let stats = handle.stats().await.expect("stats");
        let transactions = stats.transactions_total - before;
        assert!(
            transactions < TASKS as u64,
            "{transactions} transactions for {TASKS} requests"
        );
        assert_eq!(stats.events, TASKS as u64 * PER_TASK);

        // Every request's seqs hold exactly its own bodies.
        let events = handle.read_batch(Seq(0), 1000).await.expect("reads");
        for (first, last, t) in ranges {
            for ev in events.iter().filter(|e| (first..=last).contains(&e.seq.0)) {
                let Value::U64(v) = ev.body.value else {
                    panic!("unexpected value")
                };
                assert_eq!(v / 100, t);
            }
        }
        drop(handle);
        join.await.expect("joins").expect("writer ends cleanly");
    }

    #[tokio::test]
    async fn shutdown_commits_what_was_received_and_returns_the_outbox() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shutdown = CancellationToken::new();
        let opts = WriterOptions {
            max_batch: 4096,
            window: Duration::from_millis(200),
        };
        let (handle, join) = spawn_writer(open(&dir), opts, shutdown.clone());
        let pending = handle
            .append_nowait(
                vec![body(1, now().0), body(2, now().0)],
                vec![Qos2Op::Received(7)],
            )
            .await
            .expect("queued");
        shutdown.cancel();
        let outcome = pending.await.expect("committed before stopping");
        assert_eq!(outcome.accepted, 2);

        let outbox = join.await.expect("joins").expect("returns the outbox");
        assert_eq!(outbox.read_batch(Seq(0), 10).expect("reads").len(), 2);
        assert_eq!(outbox.qos2_pending().expect("reads"), BTreeSet::from([7]));
        assert!(matches!(
            handle.append(vec![body(3, 0)], vec![]).await,
            Err(OutboxError::Closed)
        ));
    }

    #[tokio::test]
    async fn dropping_every_handle_stops_the_writer_and_returns_the_outbox() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (handle, join) = spawn_writer(
            open(&dir),
            WriterOptions::default(),
            CancellationToken::new(),
        );
        let other = handle.clone();
        other
            .append(vec![body(1, now().0)], vec![])
            .await
            .expect("appends");
        drop(handle);
        drop(other);
        let outbox = tokio::time::timeout(Duration::from_secs(5), join)
            .await
            .expect("the writer stops")
            .expect("joins")
            .expect("returns the outbox");
        assert_eq!(outbox.stats().expect("stats").events, 1);
    }

    #[tokio::test]
    async fn the_writer_evicts_expired_events_periodically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = OutboxConfig::new(dir.path().join("outbox.db"));
        cfg.synchronous = Synchronous::Normal;
        cfg.max_age = Some(Duration::from_millis(300));
        let outbox = Outbox::open(&cfg, AgentId::parse("gw-1").expect("valid")).expect("opens");
        let (handle, join) =
            spawn_writer(outbox, WriterOptions::default(), CancellationToken::new());
        handle
            .append(vec![body(1, now().0)], vec![])
            .await
            .expect("appends");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stats = handle.stats().await.expect("stats");
            if stats.events == 0 {
                assert_eq!(stats.evicted["max_age"], 1);
                break;
            }
            assert!(Instant::now() < deadline, "nothing expired: {stats:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(handle);
        join.await.expect("joins").expect("writer ends cleanly");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_policy_gate_drops_denied_events_and_its_buffer_limits_replace_the_local_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let labels = BTreeMap::from([("site".to_owned(), "a".to_owned())]);
        let policy = crate::policy::PolicyStore::open(dir.path(), &labels).expect("policy");
        let metrics = Metrics::new();
        let gate = PolicyGate::new(policy.subscribe(), labels, metrics.clone());
        let (handle, join) = spawn_writer_with_policy(
            open(&dir),
            WriterOptions::default(),
            Some(gate),
            CancellationToken::new(),
        );
        let mut denied = body(1, now().0);
        denied.stream = StreamName::parse("plc1/debug").expect("valid");
        // No policy yet: both are stored.
        let o = handle
            .append(vec![body(0, now().0), denied.clone()], vec![])
            .await
            .expect("appends");
        assert_eq!(o.accepted, 2);
        policy
            .install(
                1,
                "[[rules]]\nstreams = [\"plc1/debug\"]\naction = \"deny\"\n\n[[buffer]]\nmax_bytes = \"1MiB\"\neviction = \"refuse-new\"\n",
            )
            .expect("installs");
        let o = handle
            .append(
                vec![body(2, now().0), denied.clone(), body(3, now().0)],
                vec![],
            )
            .await
            .expect("appends");
        assert_eq!(
            (o.accepted, o.refused),
            (2, 0),
            "the denied event is not stored"
        );
        let streams: Vec<String> = handle
            .read_batch(Seq(0), 100)
            .await
            .expect("reads")
            .into_iter()
            .map(|e| e.body.stream.as_str().to_owned())
            .collect();
        assert_eq!(
            streams.iter().filter(|s| *s == "plc1/debug").count(),
            1,
            "{streams:?}"
        );
        // 1 MiB and refuse-new from the policy, not the local 2 GiB and drop-oldest.
        let mut big = body(4, now().0);
        big.value = Value::String("x".repeat(600 * 1024));
        let o = handle
            .append(vec![big.clone(), big], vec![])
            .await
            .expect("appends");
        assert_eq!((o.accepted, o.refused), (1, 1));
        assert!(handle.stats().await.expect("stats").bytes <= 1 << 20);
        let text = metrics.render();
        assert!(
            text.contains("outpost_policy_dropped_total{reason=\"denied\"} 1"),
            "{text}"
        );
        assert!(text.contains("outpost_policy_version 1"), "{text}");
        drop(handle);
        join.await.expect("joins").expect("closes");
    }
}
