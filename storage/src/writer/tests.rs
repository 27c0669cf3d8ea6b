//! The group commit against a recording backend: what it commits, in which
//! groups, and when each request is answered.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::reply::{Pending, Reply, Stopped};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Error {
    Disk,
    Refused(u32),
    Stopped,
}

impl From<Stopped> for Error {
    fn from(_: Stopped) -> Error {
        Error::Stopped
    }
}

/// A write: its id, how much it weighs, and where its answer goes.
struct Write {
    id: u32,
    weight: usize,
    reply: Reply<u32, Error>,
}

/// A call: read the number of transactions committed so far.
struct Read {
    reply: oneshot::Sender<usize>,
}

/// What the backend saw, shared with the test.
#[derive(Debug, Default)]
struct Log {
    /// The ids of every committed group, in commit order.
    committed: Vec<Vec<u32>>,
    /// Every group handed to `commit`, failed or not.
    attempted: Vec<Vec<u32>>,
    /// Calls served inside an open group.
    early_reads: usize,
    /// Calls served, early or not.
    calls: usize,
    after_groups: usize,
    stopping: bool,
}

struct Recording {
    log: Arc<Mutex<Log>>,
    /// Commits whose number (from 0) is in here fail.
    fail: Vec<usize>,
    /// Ids refused before the transaction.
    refuse: Vec<u32>,
    /// Whether reads may be served inside an open group.
    early: bool,
}

impl Recording {
    fn new() -> (Recording, Arc<Mutex<Log>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        (
            Recording {
                log: log.clone(),
                fail: Vec::new(),
                refuse: Vec::new(),
                early: false,
            },
            log,
        )
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().expect("log")
    }
}

impl Backend for Recording {
    type Write = Write;
    type Call = Read;
    /// The number of the transaction (from 0) that committed the write.
    type Outcome = u32;
    type Error = Error;
    type Output = Arc<Mutex<Log>>;

    fn weight(write: &Write) -> usize {
        write.weight
    }

    fn admit(&mut self, group: &[Write]) -> Vec<(usize, Error)> {
        group
            .iter()
            .enumerate()
            .filter(|(_, w)| self.refuse.contains(&w.id))
            .map(|(i, w)| (i, Error::Refused(w.id)))
            .collect()
    }

    fn commit(&mut self, group: &[Write]) -> Result<Vec<u32>, Error> {
        let ids: Vec<u32> = group.iter().map(|w| w.id).collect();
        let mut log = self.log();
        let attempt = log.attempted.len();
        log.attempted.push(ids.clone());
        if self.fail.contains(&attempt) {
            return Err(Error::Disk);
        }
        let n = log.committed.len() as u32;
        log.committed.push(ids);
        Ok(vec![n; group.len()])
    }

    fn answer(write: Write, result: Result<u32, Error>) {
        let _ = write.reply.send(result);
    }

    fn after_group(&mut self) {
        self.log().after_groups += 1;
    }

    fn call_in_group(&mut self, call: Read, _group: &[Write]) -> Option<Read> {
        if !self.early {
            return Some(call);
        }
        self.log().early_reads += 1;
        self.call(call);
        None
    }

    fn call(&mut self, call: Read) {
        let mut log = self.log();
        log.calls += 1;
        let _ = call.reply.send(log.committed.len());
    }

    fn stopping(&mut self) {
        self.log().stopping = true;
    }

    fn finish(self) -> Arc<Mutex<Log>> {
        self.log
    }
}

type Channel = (
    mpsc::Sender<Message<Write, Read>>,
    mpsc::Receiver<Message<Write, Read>>,
);

fn channel() -> Channel {
    mpsc::channel(1024)
}

/// Queues a write without a runtime (the queue has room).
fn write(q: &Channel, id: u32, weight: usize) -> Pending<u32, Error> {
    let (reply, pending) = Pending::channel();
    q.0.try_send(Message::Write(Write { id, weight, reply }))
        .unwrap_or_else(|_| panic!("queued"));
    pending
}

fn read(q: &Channel) -> oneshot::Receiver<usize> {
    let (reply, rx) = oneshot::channel();
    q.0.try_send(Message::Call(Read { reply }))
        .unwrap_or_else(|_| panic!("queued"));
    rx
}

/// Runs the writer over what was queued until the queue is closed and empty.
fn drain(backend: Recording, max_batch: usize, q: Channel) -> Arc<Mutex<Log>> {
    let (tx, rx) = q;
    drop(tx);
    let opts = WriterOptions::<4096> {
        max_batch,
        window: Duration::ZERO,
    };
    run(backend, opts, rx)
}

/// The answer a pending request already has.
fn answer(p: Pending<u32, Error>) -> Result<u32, Error> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(p)
}

#[test]
fn every_write_is_answered_once_with_the_transaction_that_committed_it() {
    let (backend, _) = Recording::new();
    let q = channel();
    let pending: Vec<_> = (0..10).map(|id| (id, write(&q, id, 1))).collect();
    let log = drain(backend, 4, q);
    let log = log.lock().expect("log");
    assert_eq!(
        log.committed,
        vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]],
        "groups in queue order, bounded by max_batch"
    );
    for (id, p) in pending {
        let txn = answer(p).expect("committed");
        assert!(
            log.committed[txn as usize].contains(&id),
            "write {id} answered with transaction {txn}, which does not hold it"
        );
    }
    assert_eq!(log.after_groups, 3);
}

#[test]
fn no_write_is_answered_before_its_commit_returned() {
    // A backend that looks, inside its commit, whether any write of the
    // group was already answered.
    struct Watching {
        answered_early: Arc<Mutex<bool>>,
    }
    struct W {
        seen: Arc<Mutex<bool>>,
        reply: Reply<(), Error>,
    }
    impl Backend for Watching {
        type Write = W;
        type Call = ();
        type Outcome = ();
        type Error = Error;
        type Output = bool;
        fn weight(_: &W) -> usize {
            1
        }
        fn commit(&mut self, group: &[W]) -> Result<Vec<()>, Error> {
            for w in group {
                if *w.seen.lock().expect("seen") {
                    *self.answered_early.lock().expect("flag") = true;
                }
            }
            Ok(vec![(); group.len()])
        }
        fn answer(w: W, result: Result<(), Error>) {
            *w.seen.lock().expect("seen") = true;
            let _ = w.reply.send(result);
        }
        fn call(&mut self, (): ()) {}
        fn finish(self) -> bool {
            *self.answered_early.lock().expect("flag")
        }
    }
    let (tx, rx) = mpsc::channel(64);
    let mut pending = Vec::new();
    for _ in 0..20 {
        let (reply, p) = Pending::<(), Error>::channel();
        let seen = Arc::new(Mutex::new(false));
        tx.try_send(Message::Write(W { seen, reply }))
            .unwrap_or_else(|_| panic!("queued"));
        pending.push(p);
    }
    drop(tx);
    let early = run(
        Watching {
            answered_early: Arc::new(Mutex::new(false)),
        },
        WriterOptions::<3>::default(),
        rx,
    );
    assert!(!early, "a write was answered before its group's commit");
    for p in pending {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(p)
            .expect("answered");
    }
}

#[test]
fn a_failed_commit_answers_every_write_of_its_group_with_the_error_and_the_writer_goes_on() {
    let (mut backend, _) = Recording::new();
    backend.fail = vec![1];
    let q = channel();
    let pending: Vec<_> = (0..6).map(|id| write(&q, id, 1)).collect();
    let log = drain(backend, 2, q);
    let results: Vec<_> = pending.into_iter().map(answer).collect();
    assert_eq!(
        results,
        vec![
            Ok(0),
            Ok(0),
            Err(Error::Disk),
            Err(Error::Disk),
            Ok(1),
            Ok(1)
        ]
    );
    let log = log.lock().expect("log");
    assert_eq!(log.committed, vec![vec![0, 1], vec![4, 5]]);
    assert_eq!(log.after_groups, 3, "after every group, failed or not");
}

#[test]
fn a_group_stops_growing_at_max_batch_and_a_heavier_write_is_committed_whole() {
    let (backend, _) = Recording::new();
    let q = channel();
    for (id, weight) in [(0, 3), (1, 3), (2, 3), (3, 3), (4, 3), (5, 50), (6, 1)] {
        drop(write(&q, id, weight));
    }
    let log = drain(backend, 10, q);
    let log = log.lock().expect("log");
    // 3+3+3 < 10, so a fourth joins (12); 3 alone, then 50 ends that
    // group; 1 is the last.
    assert_eq!(
        log.attempted,
        vec![vec![0, 1, 2, 3], vec![4, 5], vec![6]],
        "{:?}",
        log.attempted
    );
}

#[test]
fn a_call_ends_the_open_group_and_is_served_after_its_commit() {
    let (backend, _) = Recording::new();
    let q = channel();
    let a = write(&q, 0, 1);
    let r = read(&q);
    let b = write(&q, 1, 1);
    let log = drain(backend, 100, q);
    assert_eq!(answer(a), Ok(0));
    assert_eq!(
        r.blocking_recv().expect("read"),
        1,
        "after the first commit"
    );
    assert_eq!(answer(b), Ok(1));
    assert_eq!(log.lock().expect("log").committed, vec![vec![0], vec![1]]);
}

#[test]
fn a_call_the_backend_serves_inside_a_group_does_not_split_it() {
    let (mut backend, _) = Recording::new();
    backend.early = true;
    let q = channel();
    let a = write(&q, 0, 1);
    let r = read(&q);
    let b = write(&q, 1, 1);
    let log = drain(backend, 100, q);
    assert_eq!(
        r.blocking_recv().expect("read"),
        0,
        "served before the commit"
    );
    assert_eq!((answer(a), answer(b)), (Ok(0), Ok(0)));
    let log = log.lock().expect("log");
    assert_eq!(log.committed, vec![vec![0, 1]]);
    assert_eq!(log.early_reads, 1);
}

#[test]
fn a_refused_write_gets_its_own_error_and_stays_out_of_the_transaction() {
    let (mut backend, _) = Recording::new();
    backend.refuse = vec![1, 3];
    let q = channel();
    let pending: Vec<_> = (0..4).map(|id| write(&q, id, 1)).collect();
    let log = drain(backend, 100, q);
    let results: Vec<_> = pending.into_iter().map(answer).collect();
    assert_eq!(
        results,
        vec![Ok(0), Err(Error::Refused(1)), Ok(0), Err(Error::Refused(3))]
    );
    assert_eq!(log.lock().expect("log").committed, vec![vec![0, 2]]);

    // A group refused whole commits nothing.
    let (mut backend, _) = Recording::new();
    backend.refuse = vec![7];
    let q = channel();
    let p = write(&q, 7, 1);
    let log = drain(backend, 100, q);
    assert_eq!(answer(p), Err(Error::Refused(7)));
    assert!(log.lock().expect("log").attempted.is_empty());
}

#[test]
fn shutdown_serves_what_was_queued_before_it_and_refuses_the_rest() {
    let (backend, _) = Recording::new();
    let q = channel();
    let a = write(&q, 0, 1);
    q.0.try_send(Message::Shutdown)
        .unwrap_or_else(|_| panic!("queued"));
    let (tx, rx) = q;
    let log = run(backend, WriterOptions::<8>::default(), rx);
    assert_eq!(answer(a), Ok(0));
    assert!(log.lock().expect("log").stopping);
    assert!(
        tx.try_send(Message::Shutdown).is_err(),
        "the queue is closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_within_the_window_share_a_transaction_and_the_token_stops_the_writer() {
    let (backend, _) = Recording::new();
    let shutdown = CancellationToken::new();
    let Queue { tx, rx, done } = queue::<Write, Read>(16, shutdown.clone(), None);
    let opts = WriterOptions::<4096> {
        max_batch: 4096,
        window: Duration::from_millis(300),
    };
    let join = spawn(backend, opts, rx, done);
    let a = crate::reply::send(&tx, |reply| {
        Message::Write(Write {
            id: 0,
            weight: 1,
            reply,
        })
    })
    .await
    .expect("queued");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let b = crate::reply::send(&tx, |reply| {
        Message::Write(Write {
            id: 1,
            weight: 1,
            reply,
        })
    })
    .await
    .expect("queued");
    assert_eq!((a.await, b.await), (Ok(0), Ok(0)), "one transaction");
    shutdown.cancel();
    let log = tokio::time::timeout(Duration::from_secs(5), join)
        .await
        .expect("the writer stops")
        .expect("joins");
    assert!(log.lock().expect("log").stopping);
    let late = crate::reply::send(&tx, |reply| {
        Message::Write(Write {
            id: 2,
            weight: 1,
            reply,
        })
    })
    .await;
    assert!(matches!(late, Err(Error::Stopped)));
}

#[tokio::test]
async fn ticks_arrive_as_calls_and_dropping_every_sender_stops_the_writer() {
    let (backend, log) = Recording::new();
    let Queue { tx, rx, done } = queue::<Write, Read>(
        16,
        CancellationToken::new(),
        Some((Duration::from_millis(10), || {
            // The reply is dropped; the backend answers into the void.
            Read {
                reply: oneshot::channel().0,
            }
        })),
    );
    let join = spawn(backend, WriterOptions::<8>::default(), rx, done);
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(tx);
    tokio::time::timeout(Duration::from_secs(5), join)
        .await
        .expect("the writer stops once every sender is gone")
        .expect("joins");
    let log = log.lock().expect("log");
    assert!(log.calls > 0, "no tick arrived");
    assert!(log.committed.is_empty());
}
