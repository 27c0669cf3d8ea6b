//! The group-commit writer of the outbox: one blocking thread owns the
//! [`Outbox`] and turns the append requests of every source into as few
//! transactions as it can.
//!
//! The grouping itself (collecting until [`WriterOptions::max_batch`] events
//! or [`WriterOptions::window`], committing, then answering) is
//! `outpost_storage`'s; this module is the outbox's backend for it: an
//! append group is ONE `append_many` transaction, the fleet policy's buffer
//! limits are picked up before each, the uplink's
//! [`committed`](super::handle::OutboxHandle::committed) watch moves after
//! each, and the queue's helper task sends a tick every second for age
//! eviction.

use std::time::Duration;

use outpost_protocols::event::{EventBody, Seq};
use outpost_storage::Backend;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::error::OutboxError;
use super::gate::PolicyGate;
use super::handle::{AppendRequest, Call, OutboxHandle};
use super::store::{AppendOutcome, Outbox, Qos2Op, Resumed};
use crate::clock;

/// Requests that may wait for the writer before `append` itself waits: the
/// backpressure that keeps a fast source from filling memory.
const QUEUE_DEPTH: usize = 1024;

/// How often expired events are evicted.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);

/// How the writer groups appends into transactions; by default at most
/// 4096 events a group, and no window.
pub type WriterOptions = outpost_storage::WriterOptions<4096>;

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

/// [`spawn_writer`] with the fleet policy applied to every append.
pub fn spawn_writer_with_policy(
    outbox: Outbox,
    opts: WriterOptions,
    gate: Option<PolicyGate>,
    shutdown: CancellationToken,
) -> (OutboxHandle, JoinHandle<Result<Outbox, OutboxError>>) {
    let mut gate = gate;
    let filter = gate.as_mut().map(|g| g.attach(&outbox));
    let queue = outpost_storage::queue(QUEUE_DEPTH, shutdown, Some((EXPIRE_EVERY, || Call::Tick)));
    let last = outbox
        .stats()
        .map(|s| Seq(s.next_seq.0.saturating_sub(1)))
        .unwrap_or(Seq(0));
    let (committed_tx, committed) = watch::channel(last);
    let writer = OutboxWriter {
        outbox,
        gate,
        committed: committed_tx,
        last: None,
        tick: false,
    };
    let join = outpost_storage::spawn(writer, opts, queue.rx, queue.done);
    (OutboxHandle::new(queue.tx, committed, filter), join)
}

/// The outbox as the group commit's backend.
struct OutboxWriter {
    outbox: Outbox,
    gate: Option<PolicyGate>,
    /// The last seq committed, for the uplink.
    committed: watch::Sender<Seq>,
    /// The last seq the group just committed, published once it is answered.
    last: Option<Seq>,
    /// A tick arrived during the group: evict expired events after it.
    tick: bool,
}

impl OutboxWriter {
    fn refresh_policy(&mut self) {
        if let Some(g) = &mut self.gate {
            g.refresh(&mut self.outbox);
        }
    }

    fn expire(&mut self) {
        if let Err(e) = self.outbox.evict_expired(clock::unix_now()) {
            warn!(error = %e, "Outbox age eviction failed.");
        }
    }

    /// After a renumbering, the last seq is the new one, lower or higher.
    fn renumbered(&self, result: &Result<Resumed, OutboxError>) {
        if let Ok(Resumed::Renumbered { last, .. }) = result {
            self.committed.send_replace(*last);
        }
    }
}

impl Backend for OutboxWriter {
    type Write = AppendRequest;
    type Call = Call;
    type Outcome = AppendOutcome;
    type Error = OutboxError;
    type Output = Result<Outbox, OutboxError>;

    fn weight(append: &AppendRequest) -> usize {
        append.bodies.len()
    }

    /// ONE `append_many` transaction; its outcomes are in request order.
    fn commit(&mut self, group: &[AppendRequest]) -> Result<Vec<AppendOutcome>, OutboxError> {
        self.refresh_policy();
        let requests: Vec<(&[EventBody], &[Qos2Op])> = group
            .iter()
            .map(|a| (a.bodies.as_slice(), a.qos2.as_slice()))
            .collect();
        match self.outbox.append_many(clock::unix_now(), &requests) {
            Ok(outcomes) => {
                self.last = outcomes.iter().filter_map(|o| o.last_seq).max();
                Ok(outcomes)
            }
            Err(e) => {
                // Nothing of the group was committed, so every request fails
                // and its source acknowledges nothing; the writer keeps
                // serving, since the cause (a full disk) may pass.
                warn!(requests = group.len(), error = %e, "Outbox group commit failed.");
                if e.is_disk_full() {
                    // Give back the WAL's space, so that the next commit can
                    // go through as soon as the file system has room again.
                    match self.outbox.reclaim_wal() {
                        Ok(()) => debug!("Outbox WAL truncated after a full disk."),
                        Err(e) => debug!(error = %e, "Outbox WAL not truncated."),
                    }
                }
                Err(e)
            }
        }
    }

    fn answer(append: AppendRequest, result: Result<AppendOutcome, OutboxError>) {
        let _ = append.reply.send(result);
    }

    fn after_group(&mut self) {
        if let Some(last) = self.last.take() {
            self.committed.send_if_modified(|s| {
                let newer = last > *s;
                if newer {
                    *s = last;
                }
                newer
            });
        }
        if std::mem::take(&mut self.tick) {
            self.expire();
        }
    }

    /// A tick need not cut the group short: expiry runs after it.
    fn call_in_group(&mut self, call: Call, _group: &[AppendRequest]) -> Option<Call> {
        match call {
            Call::Tick => {
                self.tick = true;
                None
            }
            other => Some(other),
        }
    }

    fn call(&mut self, call: Call) {
        match call {
            Call::Ack { upto, reply } => {
                let _ = reply.send(self.outbox.ack(upto));
            }
            Call::Resume { watermark, reply } => {
                let result = self.outbox.resume_after(watermark);
                self.renumbered(&result);
                let _ = reply.send(result);
            }
            Call::Follow { held, reply } => {
                let result = self.outbox.follow(held);
                self.renumbered(&result);
                let _ = reply.send(result);
            }
            Call::ReadBatch {
                after,
                max_events,
                reply,
            } => {
                let _ = reply.send(self.outbox.read_batch(after, max_events));
            }
            Call::ReadStamped {
                after,
                max_events,
                reply,
            } => {
                let read = self
                    .outbox
                    .read_batch(after, max_events)
                    .and_then(|events| {
                        let stamps = match events.last() {
                            Some(last) => self.outbox.accepted_at(after, last.seq)?,
                            None => Vec::new(),
                        };
                        Ok((events, stamps))
                    });
                let _ = reply.send(read);
            }
            Call::Stats { reply } => {
                let _ = reply.send(self.outbox.stats());
            }
            Call::Qos2Pending { reply } => {
                let _ = reply.send(self.outbox.qos2_pending());
            }
            Call::Tick => {
                self.refresh_policy();
                self.expire();
            }
        }
    }

    fn stopping(&mut self) {
        debug!("Outbox writer shutting down.");
    }

    fn finish(self) -> Result<Outbox, OutboxError> {
        debug!("Outbox writer stopped.");
        Ok(self.outbox)
    }
}

#[cfg(test)]
mod tests {
    use outpost_protocols::event::Timestamp;
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    use outpost_protocols::event::{AgentId, Quality, StreamName, Value};
    use outpost_storage::Synchronous;

    use super::*;
    use crate::metrics::Metrics;
    use crate::outbox::store::OutboxConfig;

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
                let bodies = (0..PER_TASK)
                    .map(|i| body(t * 100 + i, clock::unix_now().0))
                    .collect();
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
                vec![body(1, clock::unix_now().0), body(2, clock::unix_now().0)],
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
            .append(vec![body(1, clock::unix_now().0)], vec![])
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
            .append(vec![body(1, clock::unix_now().0)], vec![])
            .await
            .expect("appends");
        let deadline = clock::now() + Duration::from_secs(5);
        loop {
            let stats = handle.stats().await.expect("stats");
            if stats.events == 0 {
                assert_eq!(stats.evicted["max_age"], 1);
                break;
            }
            assert!(clock::now() < deadline, "nothing expired: {stats:?}");
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
        let gate = PolicyGate::new(policy.subscribe(), metrics.clone());
        let (handle, join) = spawn_writer_with_policy(
            open(&dir),
            WriterOptions::default(),
            Some(gate),
            CancellationToken::new(),
        );
        let mut denied = body(1, clock::unix_now().0);
        denied.stream = StreamName::parse("plc1/debug").expect("valid");
        // No policy yet: both are stored.
        let o = handle
            .append(vec![body(0, clock::unix_now().0), denied.clone()], vec![])
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
                vec![
                    body(2, clock::unix_now().0),
                    denied.clone(),
                    body(3, clock::unix_now().0),
                ],
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
        let mut big = body(4, clock::unix_now().0);
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
