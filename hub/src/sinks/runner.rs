//! One task per sink, on a thread of its own ([`start`]): takes the head of
//! the sink's queue in the store, checks residency one last time, delivers,
//! and records the progress — which is what lets the agents'
//! acknowledgements move.
//!
//! Why the queue is read from the store and not handed over in memory: the
//! rows survive a crash of the hub, so after a restart each sink gets exactly
//! what it lacks, and a sink that is down for a week costs disk, not memory.
//! The batch taken is the head of the queue; it is deleted only in the
//! transaction that records its delivery, so a crash between delivery and
//! that commit delivers the batch again (at least once; the sinks that can
//! deduplicate do: JetStream by `Nats-Msg-Id`).
//!
//! Why the work is pipelined: done strictly in turn (read a batch, deliver
//! it, wait for its last acknowledgement, record it), the far end idles
//! while the hub reads and records, and the hub idles while the far end
//! stores; measured, a sink then did a half (JetStream) or a fifth (MQTT, whose
//! broker holds its last PUBACKs behind Nagle's algorithm until the hub has
//! something to send again) of what a bare client does. So, in one task:
//!
//! ```text
//! read      [N+1 .. N+4]                      the head past what is taken, a few batches at a time
//! deliver   [N-1][N    ][N+1       ][N+2 ]    up to Sink::overlap() first attempts under way
//! record         [N-1]   [N ]      [N+1]      one at a time, in queue order
//! ```
//!
//! What keeps the promise:
//!
//! - Progress is recorded in queue order, one record at a time, and a
//!   record deletes its batch's rows only when they were delivered (or
//!   rejected, or refused). A crash leaves the batches delivered but not
//!   recorded in the queue: delivered again after the restart.
//! - Only a first attempt overlaps. When the oldest batch under way fails,
//!   nothing new is started, the later attempts under way are let finish,
//!   and then the batches are settled one after another as before: the
//!   failed one retried with backoff until it is accepted (or delivered one
//!   event at a time when rejected), a later one kept if its attempt was
//!   accepted, else attempted again. So a later batch is never sent again
//!   before an earlier failed one is; what may reach the far end ahead of a
//!   failed batch's missing events is only a later batch's first attempt
//!   already under way, and a sink that cannot allow that (JetStream's check
//!   for what the stream holds) refuses such an attempt itself (see
//!   [`Sink::overlap`]).
//! - Residency is checked before every attempt, first ones included.
//! - A read while batches are under way takes the queue past the rows
//!   already taken (`n` above the newest taken). That is sound only while
//!   the newest taken batch's rows are still in the table: SQLite gives a
//!   new row the largest `n` there plus one, so only then is every new row
//!   above it. Hence the newest taken batch's record does not begin while
//!   such a read runs, and once it is recorded the next read starts from
//!   the head again.
//!
//! On the JetStream store ([`QueueSource::JetStream`]) the queue is the
//! sinks' stream, whose sequence numbers only grow, so a read past the
//! newest taken is sound at any time; and a runner delivers only while its
//! replica holds the sink's lease (`run_leased`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures::future::BoxFuture;
use outpost_protocols::AgentId;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument as _};

use super::config::SinkConfig;
use super::sink::{Sink, SinkError, SinkEvent, MAX_OVERLAP, RECORDS_WAITING};
use crate::clock;

pub use super::sink::unrecorded_max;
use crate::policy::FleetPolicy;
use crate::store::jetstream::{
    JetStreamStore, LeaseLost, SinkQueueReader, LEASE_HOLD, LEASE_REFRESH,
};
use crate::store::{Queued, SinkProgress, StoreError, StoreHandle, StoreReader};

/// How long a runner with an empty queue waits before looking again even
/// without a signal (a signal is missed only if the store was written by
/// another process).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// What a runner needs besides its sink.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// The sink's id.
    pub id: String,
    /// Its region, for the last-step residency check.
    pub region: Option<String>,
    /// The most events in one delivery.
    pub batch_max: usize,
    /// Backoff after a failed delivery.
    pub retry_min: Duration,
    /// The longest wait between retries.
    pub retry_max: Duration,
}

/// Where a runner reads its sink's queue.
#[derive(Debug, Clone)]
pub enum QueueSource {
    /// The SQLite store, by its file.
    Sqlite(PathBuf),
    /// The JetStream store, which also says which replica runs the sink.
    JetStream(Box<JetStreamStore>),
}

/// Runs one sink until `stop`.
pub async fn run(
    cfg: RunnerConfig,
    sink: Arc<dyn Sink>,
    store: StoreHandle,
    source: QueueSource,
    policy: watch::Receiver<Arc<FleetPolicy>>,
    stop: CancellationToken,
) {
    let span = info_span!("sink", sink = %cfg.id);
    Runner {
        cfg,
        sink,
        store,
        source,
        policy,
    }
    .run(stop)
    .instrument(span)
    .await;
}

/// What a runner on the JetStream store needs to build its sink.
struct Leased {
    cfg: RunnerConfig,
    sink: SinkConfig,
    base: PathBuf,
    store: StoreHandle,
    js: Box<JetStreamStore>,
    policy: watch::Receiver<Arc<FleetPolicy>>,
}

/// Runs the sink while this replica holds its lease, and stands by while
/// another does (see `store::jetstream::sinkq`): so that of several
/// replicas with the same `[[sinks]]`, one delivers, and another takes over
/// when it goes. The sink is built, and connects, only while the lease is
/// held: a replica standing by must not connect with the same client id
/// as the one delivering (an MQTT broker drops the older connection).
async fn run_leased(l: Leased, stop: CancellationToken) {
    let id = l.cfg.id.clone();
    let js = &l.js;
    let mut standing_by = false;
    loop {
        let taken = tokio::select! {
            () = stop.cancelled() => return,
            r = js.take_lease(&id) => r,
        };
        let mut revision = match taken {
            Ok(Some(r)) => r,
            Ok(None) => {
                if !standing_by {
                    info!("Another replica runs this sink; standing by to take over.");
                    standing_by = true;
                }
                if sleep(&stop, LEASE_REFRESH).await {
                    return;
                }
                continue;
            }
            Err(e) => {
                warn!(error = %e, "Cannot take the sink's lease; retrying.");
                if sleep(&stop, LEASE_REFRESH).await {
                    return;
                }
                continue;
            }
        };
        standing_by = false;
        let lease = stop.child_token();
        let sink = match l.sink.build(&l.base, lease.clone()).await {
            Ok(sink) => sink,
            Err(e) => {
                warn!(error = %e, "Cannot build the sink; letting its lease go and retrying.");
                lease.cancel();
                js.release_lease(&id, revision).await;
                if sleep(&stop, LEASE_REFRESH).await {
                    return;
                }
                continue;
            }
        };
        info!("This replica runs the sink (its lease taken).");
        let runner = Runner {
            cfg: l.cfg.clone(),
            sink,
            store: l.store.clone(),
            source: QueueSource::JetStream(l.js.clone()),
            policy: l.policy.clone(),
        };
        let refresh = async {
            let mut renewed = clock::tokio_now();
            loop {
                tokio::select! {
                    () = lease.cancelled() => return (revision, false),
                    () = tokio::time::sleep(LEASE_REFRESH) => {}
                }
                let r = tokio::time::timeout(LEASE_REFRESH, js.renew_lease(&id, revision)).await;
                match r {
                    Ok(Ok(Ok(r))) => {
                        revision = r;
                        renewed = clock::tokio_now();
                    }
                    Ok(Ok(Err(LeaseLost))) => {
                        warn!("Another replica took the sink's lease; stopping deliveries here.");
                        lease.cancel();
                        return (revision, true);
                    }
                    failed => {
                        let error = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => "timed out".into(),
                        };
                        if clock::tokio_elapsed(renewed) >= LEASE_HOLD {
                            warn!(%error, "The sink's lease could not be refreshed; stopping deliveries here before it lapses.");
                            lease.cancel();
                            return (revision, true);
                        }
                        debug!(%error, "The sink's lease could not be refreshed; trying again.");
                    }
                }
            }
        };
        let running = async {
            runner.run(lease.clone()).await;
            lease.cancel();
        };
        let ((), (revision, lost)) = tokio::join!(running, refresh);
        if !lost {
            // Stopped, or the store is gone: let another replica take over.
            js.release_lease(&id, revision).await;
            return;
        }
    }
}

/// How long a stopped sink's own tasks may take to close its connections.
const TASKS_WAIT: Duration = Duration::from_secs(3);

/// A sink running on a thread of its own, from [`start`].
pub struct SinkThread {
    id: String,
    thread: std::thread::JoinHandle<()>,
    /// Closed when the thread's work is over (its sender is the last thing
    /// the thread drops, also when it panics).
    over: oneshot::Receiver<()>,
}

impl SinkThread {
    /// Waits for the runner to stop (after the `stop` given to [`start`])
    /// and its thread to end.
    pub async fn join(self) {
        let _ = self.over.await;
        let thread = self.thread;
        let joined = tokio::task::spawn_blocking(move || thread.join().is_ok()).await;
        if !matches!(joined, Ok(true)) {
            warn!(sink = %self.id, "The sink's thread panicked.");
        }
    }
}

/// Builds the sink `c` describes ([`SinkConfig::build`]; relative paths from
/// `base`) and runs it ([`run`]) until `stop`, on a thread of its own that
/// runs a one-thread tokio runtime: the runner, the sink's client and its
/// connection tasks all live there. Returns once the sink is built, with its
/// error if it cannot be. On the JetStream store the sink is built only
/// while this replica holds its lease (`run_leased`); its files are
/// checked before this returns ([`SinkConfig::check_files`]).
///
/// Why a thread per sink: a sink's work is a stream of small steps that
/// wake each other (a publish handed to the client's connection task, an
/// acknowledgement handed back), and on the hub's multi-thread runtime many
/// of those wakes cross to another worker thread, each a futex call and a
/// context switch. Measured with `outpost-bench --only sinks`, the same
/// hub on one worker thread did 0.75 (JetStream) and 0.82 (MQTT) of a bare
/// client against 0.61 and 0.71 on two, at the same CPU per event. A thread
/// of its own keeps those wakes on one thread without taking the agents'
/// sessions off the other cores, and a sink that is busy or slow cannot
/// delay them.
pub async fn start(
    c: &SinkConfig,
    base: &Path,
    store: StoreHandle,
    source: QueueSource,
    policy: watch::Receiver<Arc<FleetPolicy>>,
    stop: CancellationToken,
) -> Result<SinkThread, SinkError> {
    let id = c.id.clone();
    let failed = |source: std::io::Error| SinkError::Thread {
        id: id.clone(),
        source,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(failed)?;
    let rc = RunnerConfig {
        id: c.id.clone(),
        region: c.region.clone(),
        batch_max: c.batch_max,
        retry_min: c.retry_min.0,
        retry_max: c.retry_max.0,
    };
    let (c, base) = (c.clone(), base.to_owned());
    let (built_tx, built) = oneshot::channel();
    let (over_tx, over) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(format!("sink-{}", c.id))
        .spawn(move || {
            rt.block_on(async move {
                match source {
                    QueueSource::Sqlite(path) => {
                        let sink = match c.build(&base, stop.clone()).await {
                            Ok(sink) => sink,
                            Err(e) => {
                                let _ = built_tx.send(Err(e));
                                return;
                            }
                        };
                        let _ = built_tx.send(Ok(()));
                        let source = QueueSource::Sqlite(path);
                        run(rc, sink, store, source, policy, stop).await;
                    }
                    // Built once this replica holds the sink's lease; its
                    // files are checked now, so that a bad certificate
                    // still fails the start.
                    QueueSource::JetStream(js) => {
                        if let Err(e) = c.check_files(&base) {
                            let _ = built_tx.send(Err(e));
                            return;
                        }
                        let _ = built_tx.send(Ok(()));
                        let span = info_span!("sink", sink = %c.id);
                        let l = Leased {
                            cfg: rc,
                            sink: c,
                            base,
                            store,
                            js,
                            policy,
                        };
                        run_leased(l, stop).instrument(span).await;
                    }
                }
                // The sink's own tasks (its connection's supervisor, the
                // MQTT driver) end after `stop` too, closing their
                // connections cleanly (a NATS drain, an MQTT DISCONNECT):
                // they get the moment they had on the hub's runtime.
                let tasks = tokio::runtime::Handle::current().metrics();
                let deadline = clock::tokio_now() + TASKS_WAIT;
                while tasks.num_alive_tasks() > 0 && clock::tokio_now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
            // What is left of them goes with the runtime, before `over`
            // says so.
            drop(rt);
            drop(over_tx);
        })
        .map_err(failed)?;
    let sink = SinkThread { id, thread, over };
    match built.await {
        Ok(Ok(())) => Ok(sink),
        Ok(Err(e)) => {
            sink.join().await;
            Err(e)
        }
        Err(_) => {
            let id = sink.id.clone();
            sink.join().await;
            Err(SinkError::ThreadEnded { id })
        }
    }
}

struct Runner {
    cfg: RunnerConfig,
    sink: Arc<dyn Sink>,
    store: StoreHandle,
    source: QueueSource,
    policy: watch::Receiver<Arc<FleetPolicy>>,
}

/// The agents' labels, kept across batches.
type Labels = HashMap<AgentId, Arc<BTreeMap<String, String>>>;

/// What a read needs and gives back: the reader and the labels.
struct ReadState {
    reader: Reader,
    labels: Labels,
    /// When `labels` was last emptied.
    labels_read: Option<std::time::Instant>,
}

/// The queue's reader.
enum Reader {
    /// The SQLite file, opened on first use and kept after.
    Sqlite {
        path: PathBuf,
        reader: Option<StoreReader>,
    },
    /// A consumer of the JetStream store's sinks stream.
    JetStream(Box<SinkQueueReader>),
}

impl ReadState {
    fn new(source: &QueueSource, sink: &str) -> ReadState {
        let reader = match source {
            QueueSource::Sqlite(path) => Reader::Sqlite {
                path: path.clone(),
                reader: None,
            },
            QueueSource::JetStream(js) => Reader::JetStream(Box::new(js.queue_reader(sink))),
        };
        ReadState {
            reader,
            labels: Labels::new(),
            labels_read: None,
        }
    }

    /// Empties the labels when they are no longer fresh (or too many).
    fn freshen(&mut self) {
        if self.labels.len() > 100_000
            || self
                .labels_read
                .is_none_or(|at| clock::elapsed(at) >= LABELS_FRESH)
        {
            self.labels.clear();
            self.labels_read = Some(clock::now());
        }
    }
}

/// Agents of `rows` whose labels are not in `labels`.
fn unlabelled(labels: &Labels, rows: &[Queued]) -> Vec<AgentId> {
    let mut out: Vec<AgentId> = Vec::new();
    for q in rows {
        let a = &q.event.agent_id;
        if !labels.contains_key(a) && !out.contains(a) {
            out.push(a.clone());
        }
    }
    out
}

/// What a read comes to: the state back (none if the read panicked), and
/// the batches.
type ReadOut = (Option<ReadState>, Result<Vec<Taken>, StoreError>);

/// A read under way.
type Reading = BoxFuture<'static, ReadOut>;

/// A batch taken from the queue, with the agents' labels.
struct Taken {
    /// The last queue position it covers.
    through: i64,
    /// Its events.
    events: Vec<SinkEvent>,
}

/// How a first attempt went: the events it was made with (what residency
/// allowed), and the sink's answer.
type Tried = (Vec<SinkEvent>, Result<(), SinkError>);

/// A batch whose first attempt is under way, or over.
struct Flight {
    through: i64,
    /// The events residency kept from it, before its first attempt.
    refused: Vec<String>,
    /// The first attempt, until it is over.
    attempt: Option<BoxFuture<'static, Tried>>,
    /// How it went.
    tried: Option<Tried>,
}

impl Flight {
    /// Polls the attempt, if still under way; whether it is over.
    fn poll_attempt(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        if let Some(a) = self.attempt.as_mut() {
            if let Poll::Ready(t) = a.as_mut().poll(cx) {
                self.attempt = None;
                self.tried = Some(t);
            }
        }
        self.tried.is_some()
    }
}

/// Polls every attempt under way, oldest first (so that a sink sees the
/// batches' first polls in queue order); ready when the oldest is over.
/// Pending while there is none.
async fn oldest_over(flights: &mut VecDeque<Flight>) {
    futures::future::poll_fn(|cx| {
        let mut oldest = None;
        for (i, f) in flights.iter_mut().enumerate() {
            let over = f.poll_attempt(cx);
            if i == 0 {
                oldest = Some(over);
            }
        }
        match oldest {
            Some(true) => Poll::Ready(()),
            _ => Poll::Pending,
        }
    })
    .await
}

/// Polls every attempt under way; ready when all are over.
async fn all_over(flights: &mut VecDeque<Flight>) {
    futures::future::poll_fn(|cx| {
        let mut all = true;
        for f in flights.iter_mut() {
            all &= f.poll_attempt(cx);
        }
        if all {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await
}

/// A record waiting for its turn: the batch's last queue position and its
/// progress.
type Record = (i64, SinkProgress);

/// The most rows one read takes in: a few batches, so that a read (a
/// blocking-pool round trip) is made once per few batches rather than once
/// per batch.
const READ_AHEAD: usize = 8000;

/// How long the agents' labels are used before they are read again: an
/// agent's next `Hello` may change them, and the topics and subjects made
/// from them must follow.
const LABELS_FRESH: Duration = Duration::from_secs(10);

/// Reads the next batches: up to [`READ_AHEAD`] rows (but at least one
/// batch of `batch_max`) of `sink`'s queue after `after` (the newest row
/// taken and not yet recorded, see the module doc), with the agents'
/// labels, cut in batches of `batch_max`. SQLite reads run on the blocking
/// pool: they must not stall the runtime.
fn read(mut state: ReadState, sink: String, batch_max: usize, after: Option<i64>) -> Reading {
    let want = batch_max * (READ_AHEAD / batch_max).clamp(1, 4);
    state.freshen();
    match state.reader {
        Reader::Sqlite { .. } => Box::pin(async move {
            let read = tokio::task::spawn_blocking(move || {
                let r = read_sqlite(&mut state, &sink, after, want)
                    .map(|rows| cut(rows, batch_max, &state.labels));
                (Some(state), r)
            });
            read.await.unwrap_or((None, Err(StoreError::Closed)))
        }),
        Reader::JetStream(_) => Box::pin(async move {
            let r = read_jetstream(&mut state, after, want)
                .await
                .map(|rows| cut(rows, batch_max, &state.labels));
            (Some(state), r)
        }),
    }
}

fn read_sqlite(
    state: &mut ReadState,
    sink: &str,
    after: Option<i64>,
    want: usize,
) -> Result<Vec<Queued>, StoreError> {
    let Reader::Sqlite { path, reader } = &mut state.reader else {
        return Ok(Vec::new());
    };
    let r = match reader.take() {
        Some(r) => r,
        None => StoreReader::open(path)?,
    };
    let rows = match after {
        Some(after) => r.sink_batch_after(sink, after, want),
        None => r.sink_batch(sink, want),
    };
    let r = reader.insert(r);
    let rows = rows?;
    for a in unlabelled(&state.labels, &rows) {
        let l = Arc::new(r.labels(&a)?);
        state.labels.insert(a, l);
    }
    Ok(rows)
}

async fn read_jetstream(
    state: &mut ReadState,
    after: Option<i64>,
    want: usize,
) -> Result<Vec<Queued>, StoreError> {
    let Reader::JetStream(queue) = &mut state.reader else {
        return Ok(Vec::new());
    };
    let rows = queue.batch(after, want).await?;
    for a in unlabelled(&state.labels, &rows) {
        let l = Arc::new(queue.labels(&a).await?);
        state.labels.insert(a, l);
    }
    Ok(rows)
}

/// Cuts `rows` in batches of `batch_max`, with their agents' labels.
fn cut(rows: Vec<Queued>, batch_max: usize, labels: &Labels) -> Vec<Taken> {
    let mut batches = Vec::new();
    let mut events = Vec::with_capacity(batch_max.min(rows.len()));
    let mut through = 0;
    for q in rows {
        through = q.n;
        let e = q.event;
        let labels = labels.get(&e.agent_id).cloned().unwrap_or_default();
        events.push(SinkEvent {
            event: e,
            labels,
            queued_at: q.queued_at,
        });
        if events.len() == batch_max {
            let events = std::mem::replace(&mut events, Vec::with_capacity(batch_max));
            batches.push(Taken { through, events });
        }
    }
    if !events.is_empty() {
        batches.push(Taken { through, events });
    }
    batches
}

/// Waits for the read under way; pending forever without one (for
/// `select!`).
async fn read_over(reading: &mut Option<Reading>) -> ReadOut {
    match reading.as_mut() {
        Some(r) => r.await,
        None => std::future::pending().await,
    }
}

/// Waits for the record under way; pending forever without one.
async fn record_over(recording: &mut Option<(i64, BoxFuture<'_, Option<()>>)>) -> Option<()> {
    match recording.as_mut() {
        Some((_, r)) => r.await,
        None => std::future::pending().await,
    }
}

/// The runner's state between two steps of its loop.
struct Pipe<'a> {
    /// What the next read needs; `None` while a read is under way.
    state: Option<ReadState>,
    reading: Option<Reading>,
    /// The next batches, read and not started yet.
    ahead: VecDeque<Taken>,
    /// First attempts, oldest first.
    flights: VecDeque<Flight>,
    /// Records waiting for their turn, oldest first.
    records: VecDeque<Record>,
    /// The record under way, and its batch's last row.
    recording: Option<(i64, BoxFuture<'a, Option<()>>)>,
    /// The newest row taken whose batch is not recorded yet: what a read
    /// skips up to.
    newest: Option<i64>,
    /// The last read found nothing new: read again after a signal.
    exhausted: bool,
    /// When to read again after a failed read.
    read_retry: Option<Instant>,
    read_backoff: Duration,
}

impl Pipe<'_> {
    /// Takes in what a read came to.
    fn read_over(&mut self, out: ReadOut, cfg: &RunnerConfig, source: &QueueSource) {
        self.reading = None;
        let (state, r) = out;
        let state = self
            .state
            .insert(state.unwrap_or_else(|| ReadState::new(source, &cfg.id)));
        match r {
            Ok(batches) => {
                self.read_backoff = cfg.retry_min;
                self.exhausted = batches.is_empty();
                for t in batches {
                    self.newest = Some(t.through);
                    self.ahead.push_back(t);
                }
            }
            Err(e) => {
                warn!(error = %e, "Sink queue unreadable; retrying.");
                if let Reader::Sqlite { reader, .. } = &mut state.reader {
                    *reader = None;
                }
                self.read_retry = Some(clock::tokio_now() + self.read_backoff);
                self.read_backoff = (self.read_backoff * 2).min(cfg.retry_max);
            }
        }
    }

    /// Notes that the batch through `through` is recorded: its rows, and
    /// those of every batch before it, are gone.
    fn recorded(&mut self, through: i64) {
        if self.newest.is_some_and(|n| n <= through) {
            self.newest = None;
        }
    }
}

impl Runner {
    async fn run(&self, stop: CancellationToken) {
        let overlap = self.sink.overlap().clamp(1, MAX_OVERLAP);
        let mut queued = self.store.queued_signal();
        // False once the store's writer is gone: no signal will come.
        let mut signal = true;
        let mut p = Pipe {
            state: Some(ReadState::new(&self.source, &self.cfg.id)),
            reading: None,
            ahead: VecDeque::new(),
            flights: VecDeque::new(),
            records: VecDeque::new(),
            recording: None,
            newest: None,
            exhausted: false,
            read_retry: None,
            read_backoff: self.cfg.retry_min,
        };
        info!(region = ?self.cfg.region, overlap, "Sink running.");
        loop {
            // First attempts, as long as the records keep up.
            while p.flights.len() < overlap
                && p.records.len() + usize::from(p.recording.is_some()) < RECORDS_WAITING
            {
                let Some(t) = p.ahead.pop_front() else { break };
                p.flights.push_back(self.launch(t));
            }
            if p.reading.is_none() && p.ahead.is_empty() && !p.exhausted && p.read_retry.is_none() {
                if let Some(s) = p.state.take() {
                    p.reading = Some(read(s, self.cfg.id.clone(), self.cfg.batch_max, p.newest));
                }
            }
            // The newest taken batch's rows must stay while a read that
            // skips them runs (see the module doc).
            let may_record = p.recording.is_none()
                && p.records.front().is_some_and(|(through, _)| {
                    p.reading.is_none() || p.newest.is_none_or(|n| *through < n)
                });
            if may_record {
                if let Some((mut through, mut progress)) = p.records.pop_front() {
                    // Those waiting behind it go in the same transaction,
                    // unless they carry lines for the audit log (one entry
                    // per batch, as before).
                    while let Some((t, next)) = p.records.front() {
                        let rule = p.reading.is_none() || p.newest.is_none_or(|n| *t < n);
                        if !rule || !plain(&progress) || !plain(next) {
                            break;
                        }
                        let Some((t, next)) = p.records.pop_front() else {
                            break;
                        };
                        through = t;
                        progress.through = next.through;
                        progress.delivered += next.delivered;
                    }
                    p.recording = Some((through, Box::pin(self.record(progress, &stop))));
                }
            }
            let idle = p.flights.is_empty() && p.records.is_empty() && p.recording.is_none();
            let wake = p
                .read_retry
                .unwrap_or_else(|| clock::tokio_now() + IDLE_POLL);
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                out = read_over(&mut p.reading) => p.read_over(out, &self.cfg, &self.source),
                () = oldest_over(&mut p.flights), if !p.flights.is_empty() => {
                    let accepted = p
                        .flights
                        .front()
                        .is_some_and(|f| matches!(f.tried, Some((_, Ok(())))));
                    if !accepted {
                        if self.settle_all(&mut p, &stop).await.is_none() {
                            break;
                        }
                    } else if let Some(f) = p.flights.pop_front() {
                        let delivered = f.tried.as_ref().map_or(0, |(e, _)| {
                            self.timed(e);
                            e.len() as u64
                        });
                        let progress = self.progress(f.through, f.refused, delivered, Vec::new());
                        p.records.push_back((f.through, progress));
                    }
                }
                r = record_over(&mut p.recording) => {
                    let Some((through, _)) = p.recording.take() else { continue };
                    if r.is_none() {
                        break;
                    }
                    p.recorded(through);
                }
                r = queued.changed(), if signal => {
                    signal = r.is_ok();
                    p.exhausted = false;
                }
                () = tokio::time::sleep_until(wake), if p.read_retry.is_some() || (p.exhausted && idle) => {
                    p.read_retry = None;
                    p.exhausted = false;
                }
            }
        }
        // Stopped: what is under way stays queued (delivered again after a
        // restart); what was delivered is recorded if the store still can.
        p.flights.clear();
        if let Some(r) = p.reading.take() {
            let _ = r.await;
        }
        if let Some((_, r)) = p.recording.take() {
            let _ = r.await;
        }
        for (_, progress) in std::mem::take(&mut p.records) {
            if self.record(progress, &stop).await.is_none() {
                break;
            }
        }
        info!("Sink stopped.");
    }

    /// After the oldest first attempt under way failed: lets the others
    /// finish, then settles every batch taken, in turn and in queue order,
    /// as the runner did before it pipelined (see the module doc). `None`
    /// when stopped first, or when the store is closed.
    async fn settle_all(&self, p: &mut Pipe<'_>, stop: &CancellationToken) -> Option<()> {
        // A read under way may skip rows of the batches recorded below.
        if let Some(r) = p.reading.as_mut() {
            let out = r.await;
            p.read_over(out, &self.cfg, &self.source);
        }
        tokio::select! {
            biased;
            () = stop.cancelled() => return None,
            () = all_over(&mut p.flights) => {}
        }
        if let Some((through, r)) = p.recording.take() {
            r.await?;
            p.recorded(through);
        }
        while let Some((through, progress)) = p.records.pop_front() {
            self.record(progress, stop).await?;
            p.recorded(through);
        }
        let mut oldest = true;
        while let Some(f) = p.flights.pop_front() {
            let through = f.through;
            let progress = self.settle(f, oldest, stop).await?;
            oldest = false;
            self.record(progress, stop).await?;
            p.recorded(through);
        }
        Some(())
    }

    /// Starts the first attempt of a batch, residency checked first.
    fn launch(&self, taken: Taken) -> Flight {
        let mut refused = Vec::new();
        let mut events = taken.events;
        self.refuse(&mut events, &mut refused);
        let (attempt, tried): (Option<BoxFuture<'static, Tried>>, _) = if events.is_empty() {
            (None, Some((events, Ok(()))))
        } else {
            let sink = self.sink.clone();
            let attempt = Box::pin(async move {
                let r = sink.deliver(&events).await;
                (events, r)
            });
            (Some(attempt), None)
        };
        Flight {
            through: taken.through,
            refused,
            attempt,
            tried,
        }
    }

    /// Settles a batch whose first attempt is over: an accepted one as it
    /// is; the failed `oldest` retried from its failure; a later one that
    /// failed (its failure may be only the oldest's) attempted afresh,
    /// unless it was rejected. `None` when stopped first.
    async fn settle(
        &self,
        f: Flight,
        oldest: bool,
        stop: &CancellationToken,
    ) -> Option<SinkProgress> {
        let Flight {
            through,
            refused,
            tried,
            ..
        } = f;
        let Some((events, result)) = tried else {
            // Not reached (every attempt is over); attempted afresh.
            return self.deliver(through, Vec::new(), refused, None, stop).await;
        };
        let first = match result {
            Ok(()) => {
                self.timed(&events);
                let delivered = events.len() as u64;
                return Some(self.progress(through, refused, delivered, Vec::new()));
            }
            Err(SinkError::Rejected(m)) => Some(Err(SinkError::Rejected(m))),
            Err(e) if oldest => Some(Err(e)),
            Err(_) => None,
        };
        self.deliver(through, events, refused, first, stop).await
    }

    /// Takes out of `events` what residency, in the policy in force now,
    /// does not allow in this sink's region, into `refused`: the last step,
    /// run before every attempt, so that a policy applied while a sink was
    /// down holds for what it was about to get.
    fn refuse(&self, events: &mut Vec<SinkEvent>, refused: &mut Vec<String>) {
        let policy = self.policy.borrow().clone();
        events.retain(|e| {
            let body = &e.event.body;
            match policy.policy.residency_of(body.stream.as_str()) {
                Some(r)
                    if !self
                        .cfg
                        .region
                        .as_ref()
                        .is_some_and(|g| r.regions.contains(g)) =>
                {
                    refused.push(format!(
                        "{}:{} ({}, residency {:?})",
                        e.event.agent_id.as_str(),
                        e.event.seq.0,
                        body.stream.as_str(),
                        r.name
                    ));
                    false
                }
                _ => true,
            }
        });
    }

    /// Delivers what residency allows of a batch (`first`: how its last
    /// attempt went, if it was made already), retrying what fails with
    /// backoff; the progress to record. `None` when stopped first (the
    /// batch stays queued).
    async fn deliver(
        &self,
        through: i64,
        mut allowed: Vec<SinkEvent>,
        mut refused: Vec<String>,
        first: Option<Result<(), SinkError>>,
        stop: &CancellationToken,
    ) -> Option<SinkProgress> {
        let mut rejected = Vec::new();
        let mut delivered = 0u64;
        if !allowed.is_empty() {
            match self
                .attempt(&mut allowed, &mut refused, first, stop)
                .await?
            {
                Ok(()) => {
                    self.timed(&allowed);
                    delivered = allowed.len() as u64;
                }
                // One bad event must not take the others with it: try each
                // alone to find out which.
                Err(message) if allowed.len() > 1 => {
                    debug!(error = %message, "Batch rejected; delivering its events one by one.");
                    for e in allowed {
                        let mut one = vec![e];
                        match self.attempt(&mut one, &mut refused, None, stop).await? {
                            Ok(()) => {
                                self.timed(&one);
                                delivered += one.len() as u64;
                            }
                            Err(m) => rejected.extend(one.into_iter().map(|e| (e, m.clone()))),
                        }
                    }
                }
                Err(message) => rejected.extend(allowed.into_iter().map(|e| (e, message.clone()))),
            }
        }
        Some(self.progress(through, refused, delivered, rejected))
    }

    /// Times `events`, which the sink just accepted, from their commit
    /// (`outpost_hub_sink_latency_seconds`).
    fn timed(&self, events: &[SinkEvent]) {
        self.store.kpis().delivered(
            &self.cfg.id,
            events.iter().map(|e| e.queued_at).filter(|t| *t > 0),
            clock::unix_now().0,
        );
    }

    /// The progress of a batch settled: delivered, `refused` by residency,
    /// `rejected` by the sink for good.
    fn progress(
        &self,
        through: i64,
        refused: Vec<String>,
        delivered: u64,
        rejected: Vec<(SinkEvent, String)>,
    ) -> SinkProgress {
        let mut progress = SinkProgress {
            through: Some(through),
            refused: refused.len() as u64,
            delivered,
            ..SinkProgress::default()
        };
        if !refused.is_empty() {
            warn!(
                events = refused.len(),
                region = ?self.cfg.region,
                "Residency keeps events from this sink whatever the routes say; counted and audited."
            );
            progress.refused_detail = Some(format!(
                "residency kept {} event(s) from sink {:?} (region {}): {}",
                refused.len(),
                self.cfg.id,
                self.cfg.region.as_deref().unwrap_or("none"),
                summary(&refused)
            ));
        }
        if !rejected.is_empty() {
            let lines: Vec<String> = rejected
                .iter()
                .map(|(e, m)| {
                    format!(
                        "{}:{} ({}): {m}",
                        e.event.agent_id.as_str(),
                        e.event.seq.0,
                        e.event.body.stream.as_str()
                    )
                })
                .collect();
            warn!(events = rejected.len(), first = %lines[0], "The sink rejected events for good; counted and audited.");
            progress.rejected = rejected.len() as u64;
            progress.error = Some(lines[0].clone());
            progress.rejected_detail = Some(format!(
                "sink {:?} rejected {} event(s): {}",
                self.cfg.id,
                lines.len(),
                summary(&lines)
            ));
        }
        progress
    }

    /// Records a batch's progress. It must be recorded, or the batch would
    /// be delivered again after a restart: retried like a delivery. `None`
    /// when stopped first, or when the store is closed.
    async fn record(&self, progress: SinkProgress, stop: &CancellationToken) -> Option<()> {
        let mut backoff = self.cfg.retry_min;
        loop {
            match self
                .store
                .sink_progress(self.cfg.id.clone(), progress.clone())
                .await
            {
                Ok(()) => return Some(()),
                Err(StoreError::Closed) => return None,
                Err(e) => {
                    warn!(error = %e, "Sink progress not recorded; retrying.");
                    if sleep(stop, backoff).await {
                        return None;
                    }
                    backoff = (backoff * 2).min(self.cfg.retry_max);
                }
            }
        }
    }

    /// Delivers `events` until the sink accepts or rejects them, retrying
    /// transient failures with backoff; before each try, what residency no
    /// longer allows moves to `refused`. `first` is how the first try went,
    /// if it was made already (residency was checked before it). `None`
    /// when stopped first; `Some(Err(message))` when rejected.
    async fn attempt(
        &self,
        events: &mut Vec<SinkEvent>,
        refused: &mut Vec<String>,
        mut first: Option<Result<(), SinkError>>,
        stop: &CancellationToken,
    ) -> Option<Result<(), String>> {
        let mut backoff = self.cfg.retry_min;
        let mut failures = 0u64;
        loop {
            let result = match first.take() {
                Some(r) => r,
                None => {
                    self.refuse(events, refused);
                    if events.is_empty() {
                        return Some(Ok(()));
                    }
                    tokio::select! {
                        () = stop.cancelled() => return None,
                        r = self.sink.deliver(events) => r,
                    }
                }
            };
            match result {
                Ok(()) => {
                    if failures > 0 {
                        info!(failures, "Sink accepting again.");
                    }
                    return Some(Ok(()));
                }
                Err(SinkError::Rejected(m)) => return Some(Err(m)),
                Err(e) => {
                    failures += 1;
                    // Logged at the first failure and then at each doubling,
                    // so a sink down for a day does not flood the log.
                    if failures.is_power_of_two() {
                        warn!(error = %e, failures, retry_in = ?backoff, "Sink delivery failed; retrying. Its events wait in the store and hold back the agents' acknowledgements.");
                    }
                    let p = SinkProgress {
                        failed: true,
                        error: Some(e.to_string()),
                        ..SinkProgress::default()
                    };
                    if let Err(e) = self.store.sink_progress(self.cfg.id.clone(), p).await {
                        debug!(error = %e, "Sink failure not recorded.");
                    }
                    if sleep(stop, clock::jitter(backoff)).await {
                        return None;
                    }
                    backoff = (backoff * 2).min(self.cfg.retry_max);
                }
            }
        }
    }
}

/// Whether a record is a plain delivery, which may be merged with the next:
/// nothing refused or rejected, nothing for the audit log.
fn plain(p: &SinkProgress) -> bool {
    p.rejected == 0
        && p.refused == 0
        && !p.failed
        && p.error.is_none()
        && p.rejected_detail.is_none()
        && p.refused_detail.is_none()
}

/// The first few of a list and how many more, for one audit line.
fn summary(items: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s = items
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() > SHOWN {
        s.push_str(&format!("; and {} more", items.len() - SHOWN));
    }
    s
}

/// Sleeps `d` unless stopped first; true when stopped.
async fn sleep(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}
