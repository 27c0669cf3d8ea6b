//! The group commit: one thread owns the database and turns the write
//! requests of many tasks into as few transactions as it can.
//!
//! A flush to disk (fsync) costs the same for one row as for thousands, so
//! the writer shares each transaction among every request that is waiting:
//! it blocks for a request, then keeps collecting writes until
//! [`WriterOptions::max_batch`] of their weight (events, for both owners),
//! or [`WriterOptions::window`] after the first, commits them through its
//! [`Backend`] in ONE transaction, and only then answers each. Under load,
//! requests pile up while a commit is on disk and form the next group by
//! themselves. The writer runs on tokio's blocking pool so that fsync never
//! stalls the runtime.
//!
//! The invariants the owners build their delivery guarantee on:
//!
//! - Architecture invariant: no write is answered with success before the
//!   COMMIT of the transaction that holds it has returned. A caller may
//!   therefore acknowledge to its peer (an MQTT PUBACK, a hub's batch ack)
//!   exactly when its answer arrives.
//! - Every write is answered exactly once: with its own outcome; with the
//!   error of its group's commit, which then took no effect for any of them;
//!   or, refused by [`Backend::admit`] before the transaction, with its own
//!   error, so that one bad request cannot fail the others of its group. A
//!   reply dropped unanswered (the writer gone) reads as
//!   [`Stopped`](crate::Stopped).
//! - A group holds writes in queue order, and the writer takes it whole or
//!   not at all; its weight stops growing at `max_batch` (a single heavier
//!   write is still committed whole).
//! - Requests are served in queue order. A [`Message::Call`] (a read, a
//!   state change that is not a write) that arrives while a group is open
//!   ends the group and is served after its commit, unless the backend
//!   answers it at once because doing so gives the same result
//!   ([`Backend::call_in_group`]).
//! - Shutdown (the token cancelled, or every sender dropped) is queued
//!   behind what was already sent: the writer refuses new requests, commits
//!   and answers everything it received, then hands its backend back
//!   ([`Backend::finish`]).
//! - A failed commit does not stop the writer: the cause (a full disk) may
//!   pass, and the next group may commit.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The longest the writer sleeps between looks at the queue inside a window.
const POLL_STEP: Duration = Duration::from_micros(200);

/// How the writer groups requests into transactions.
///
/// `DEFAULT_MAX_BATCH` is what [`Default`] gives for
/// [`max_batch`](Self::max_batch): each owner names its own (the outbox
/// 4096 events, the hub store 16384) through a type alias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterOptions<const DEFAULT_MAX_BATCH: usize> {
    /// Stop collecting once the group weighs this much (a single heavier
    /// request is still committed whole).
    pub max_batch: usize,
    /// How long after the first request of a group the writer may wait for
    /// more once the queue is empty. Zero (the default) commits whatever is
    /// queued at once; requests arriving during a commit form the next
    /// group, which is how many producers share one fsync under load.
    pub window: Duration,
}

impl<const DEFAULT_MAX_BATCH: usize> Default for WriterOptions<DEFAULT_MAX_BATCH> {
    fn default() -> Self {
        WriterOptions {
            max_batch: DEFAULT_MAX_BATCH,
            window: Duration::ZERO,
        }
    }
}

/// What travels on the writer's queue.
#[derive(Debug)]
pub enum Message<W, C> {
    /// A write: it joins a group and is answered after the group's commit.
    Write(W),
    /// Anything else the backend serves between groups: reads, acks,
    /// periodic work.
    Call(C),
    /// The shutdown token was cancelled: finish what was received and stop.
    Shutdown,
}

/// What the writer drives: the owner of the database, which carries out a
/// group of writes in ONE transaction.
///
/// The writer calls it from one thread only, in this order for each group:
/// [`admit`](Self::admit), [`commit`](Self::commit), [`answer`](Self::answer)
/// for each write, [`after_group`](Self::after_group).
pub trait Backend: Send + 'static {
    /// A queued write, with the reply it is answered through.
    type Write: Send + 'static;
    /// A queued request that is not a write.
    type Call: Send + 'static;
    /// What a committed write is answered with.
    type Outcome;
    /// What a failed or refused write is answered with; cloned for every
    /// write of a failed group.
    type Error: Clone;
    /// What the writer's join handle yields once it stopped.
    type Output: Send + 'static;

    /// How much a write counts towards [`WriterOptions::max_batch`].
    fn weight(write: &Self::Write) -> usize;

    /// Checks a group before its transaction and returns the writes it
    /// refuses, by index in ascending order, with why. They are answered at
    /// once and left out of the transaction. By default every write joins.
    fn admit(&mut self, group: &[Self::Write]) -> Vec<(usize, Self::Error)> {
        let _ = group;
        Vec::new()
    }

    /// Carries out `group` in ONE transaction and returns one outcome per
    /// write, in order, once the COMMIT has returned. On error nothing of
    /// the group took effect.
    fn commit(&mut self, group: &[Self::Write]) -> Result<Vec<Self::Outcome>, Self::Error>;

    /// Answers a write.
    fn answer(write: Self::Write, result: Result<Self::Outcome, Self::Error>);

    /// After every write of a group was answered, whether its commit
    /// succeeded or not.
    fn after_group(&mut self) {}

    /// A call arrived while a group is open. Serve it now and return `None`
    /// only if that gives the same result as serving it after the group's
    /// commit (a read that touches nothing the group writes); otherwise
    /// return it, and it ends the group. By default every call ends it.
    fn call_in_group(&mut self, call: Self::Call, group: &[Self::Write]) -> Option<Self::Call> {
        let _ = group;
        Some(call)
    }

    /// Serves a call between groups.
    fn call(&mut self, call: Self::Call);

    /// The shutdown message arrived; the queued requests are still served.
    fn stopping(&mut self) {}

    /// The queue is closed and empty: hands the backend's result back.
    fn finish(self) -> Self::Output;
}

/// A writer's queue, as [`queue`] makes it.
#[derive(Debug)]
pub struct Queue<W, C> {
    /// The sending side, for the handles.
    pub tx: mpsc::Sender<Message<W, C>>,
    /// The side the writer serves.
    pub rx: mpsc::Receiver<Message<W, C>>,
    /// Stops the helper task once the writer ended: hold its `drop_guard`
    /// where the writer runs, so that this happens however it ends, panics
    /// included.
    pub done: CancellationToken,
}

/// Makes the queue of a writer and starts its helper task.
///
/// The helper task turns the `shutdown` token into a [`Message::Shutdown`]
/// queued behind everything already sent, and, with `ticks`, sends the call
/// `ticks.1()` every `ticks.0` (dropped when the queue is full: the writer
/// is busy, and the next tick will do). It holds only a weak sender, so it
/// does not keep the queue open once every handle is gone. Must be called
/// inside a tokio runtime.
pub fn queue<W: Send + 'static, C: Send + 'static>(
    depth: usize,
    shutdown: CancellationToken,
    ticks: Option<(Duration, fn() -> C)>,
) -> Queue<W, C> {
    let (tx, rx) = mpsc::channel(depth);
    let done = CancellationToken::new();
    tokio::spawn(pace(tx.downgrade(), shutdown, done.clone(), ticks));
    Queue { tx, rx, done }
}

/// Starts the writer for `backend` on tokio's blocking pool, serving `rx`
/// (from [`queue`], with its `done` token). The join handle yields
/// [`Backend::finish`]. Must be called inside a tokio runtime.
pub fn spawn<B: Backend, const N: usize>(
    backend: B,
    opts: WriterOptions<N>,
    rx: mpsc::Receiver<Message<B::Write, B::Call>>,
    done: CancellationToken,
) -> JoinHandle<B::Output> {
    tokio::task::spawn_blocking(move || {
        // Stops the helper task however the writer ends, panics included.
        let _done = done.drop_guard();
        run(backend, opts, rx)
    })
}

/// The writer loop, on the calling thread (which may block); returns once
/// the queue is closed and empty.
pub fn run<B: Backend, const N: usize>(
    mut backend: B,
    opts: WriterOptions<N>,
    mut rx: mpsc::Receiver<Message<B::Write, B::Call>>,
) -> B::Output {
    // A request that ended a group, served next so that the queue's order
    // is kept.
    let mut next = None;
    loop {
        let message = match next.take() {
            Some(m) => m,
            None => match rx.blocking_recv() {
                Some(m) => m,
                None => break,
            },
        };
        match message {
            Message::Write(first) => {
                let group = collect(&mut backend, first, &opts, &mut rx, &mut next);
                commit(&mut backend, group);
            }
            Message::Call(call) => backend.call(call),
            Message::Shutdown => {
                // Refuse new requests; the loop still drains the queued ones.
                backend.stopping();
                rx.close();
            }
        }
    }
    backend.finish()
}

/// Gathers writes after `first` until `max_batch` of weight, the end of the
/// window, a request that ends the group (left in `next`) or a closed,
/// empty queue.
fn collect<B: Backend, const N: usize>(
    backend: &mut B,
    first: B::Write,
    opts: &WriterOptions<N>,
    rx: &mut mpsc::Receiver<Message<B::Write, B::Call>>,
    next: &mut Option<Message<B::Write, B::Call>>,
) -> Vec<B::Write> {
    let deadline = Instant::now() + opts.window;
    let mut weight = B::weight(&first);
    let mut group = vec![first];
    while weight < opts.max_batch {
        match rx.try_recv() {
            Ok(Message::Write(w)) => {
                weight += B::weight(&w);
                group.push(w);
            }
            Ok(Message::Call(call)) => {
                if let Some(call) = backend.call_in_group(call, &group) {
                    *next = Some(Message::Call(call));
                    break;
                }
            }
            Ok(Message::Shutdown) => {
                *next = Some(Message::Shutdown);
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

/// Commits a group in one transaction, then answers each write.
fn commit<B: Backend>(backend: &mut B, group: Vec<B::Write>) {
    let group = admitted(backend, group);
    if !group.is_empty() {
        match backend.commit(&group) {
            Ok(outcomes) => {
                debug_assert_eq!(outcomes.len(), group.len(), "one outcome per write");
                for (w, o) in group.into_iter().zip(outcomes) {
                    B::answer(w, Ok(o));
                }
            }
            Err(e) => {
                // Nothing of the group was committed, so every write fails
                // and its producer acknowledges nothing.
                for w in group {
                    B::answer(w, Err(e.clone()));
                }
            }
        }
    }
    backend.after_group();
}

/// The writes of `group` the backend admits; the others are answered now.
fn admitted<B: Backend>(backend: &mut B, group: Vec<B::Write>) -> Vec<B::Write> {
    let refused = backend.admit(&group);
    if refused.is_empty() {
        return group;
    }
    let mut refused = refused.into_iter().peekable();
    let mut admitted = Vec::with_capacity(group.len());
    for (i, w) in group.into_iter().enumerate() {
        match refused.next_if(|(r, _)| *r == i) {
            Some((_, e)) => B::answer(w, Err(e)),
            None => admitted.push(w),
        }
    }
    admitted
}

/// Sends the writer the shutdown message and, with `ticks`, its periodic
/// call.
async fn pace<W, C>(
    tx: mpsc::WeakSender<Message<W, C>>,
    shutdown: CancellationToken,
    done: CancellationToken,
    ticks: Option<(Duration, fn() -> C)>,
) {
    // Without ticks the interval is never polled; one loop serves both, so
    // that the binary carries one state machine.
    let mut interval = tokio::time::interval(ticks.map_or(Duration::from_secs(3600), |t| t.0));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = done.cancelled() => return,
            () = shutdown.cancelled() => {
                send_shutdown(&tx).await;
                return;
            }
            _ = interval.tick(), if ticks.is_some() => match (tx.upgrade(), ticks) {
                // A full queue means the writer is busy; the next tick will do.
                (Some(tx), Some((_, tick))) => { let _ = tx.try_send(Message::Call(tick())); }
                _ => return,
            },
        }
    }
}

async fn send_shutdown<W, C>(tx: &mpsc::WeakSender<Message<W, C>>) {
    if let Some(tx) = tx.upgrade() {
        // Queued behind what was already sent, so that all of it is
        // committed first.
        let _ = tx.send(Message::Shutdown).await;
    }
}

#[cfg(test)]
mod tests;
