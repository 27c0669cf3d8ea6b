//! One task per sink: takes the head of the sink's queue in the store, checks
//! residency one last time, delivers, and records the progress — which is
//! what lets the agents' acknowledgements move.
//!
//! Why the queue is read from the store and not handed over in memory: the
//! rows survive a crash of the hub, so after a restart each sink gets exactly
//! what it lacks, and a sink that is down for a week costs disk, not memory.
//! The batch taken is the head of the queue; it is deleted only in the
//! transaction that records its delivery, so a crash between delivery and
//! that commit delivers the batch again (at least once; the sinks that can
//! deduplicate do: JetStream by `Nats-Msg-Id`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use outpost_protocols::AgentId;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument as _};

use super::{Sink, SinkError, SinkEvent};
use crate::policy::FleetPolicy;
use crate::store::{Queued, SinkProgress, StoreError, StoreHandle, StoreReader};

/// How long a runner with an empty queue waits before looking again even
/// without a signal (a signal is missed only if the store was written by
/// another process).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// What a runner needs besides its sink.
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

/// Runs one sink until `stop`.
pub async fn run(
    cfg: RunnerConfig,
    sink: Arc<dyn Sink>,
    store: StoreHandle,
    store_path: PathBuf,
    policy: watch::Receiver<Arc<FleetPolicy>>,
    stop: CancellationToken,
) {
    let span = info_span!("sink", sink = %cfg.id);
    Runner {
        cfg,
        sink,
        store,
        store_path,
        policy,
        labels: HashMap::new(),
    }
    .run(stop)
    .instrument(span)
    .await;
}

struct Runner {
    cfg: RunnerConfig,
    sink: Arc<dyn Sink>,
    store: StoreHandle,
    store_path: PathBuf,
    policy: watch::Receiver<Arc<FleetPolicy>>,
    labels: HashMap<AgentId, Arc<std::collections::BTreeMap<String, String>>>,
}

/// A batch taken from the queue, with the agents' labels.
struct Taken {
    /// The last queue position it covers.
    through: i64,
    /// Its events.
    events: Vec<SinkEvent>,
}

impl Runner {
    async fn run(mut self, stop: CancellationToken) {
        let mut queued = self.store.queued_signal();
        let mut reader: Option<StoreReader> = None;
        let mut backoff = self.cfg.retry_min;
        info!(region = ?self.cfg.region, "Sink running.");
        loop {
            if stop.is_cancelled() {
                break;
            }
            let batch = match self.read(&mut reader).await {
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, "Sink queue unreadable; retrying.");
                    reader = None;
                    if sleep(&stop, backoff).await {
                        break;
                    }
                    backoff = (backoff * 2).min(self.cfg.retry_max);
                    continue;
                }
            };
            if batch.is_empty() {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = queued.changed() => {}
                    () = tokio::time::sleep(IDLE_POLL) => {}
                }
                continue;
            }
            let taken = match self.take(batch, &mut reader).await {
                Ok(t) => t,
                Err(e) => {
                    warn!(error = %e, "Sink queue unreadable; retrying.");
                    reader = None;
                    continue;
                }
            };
            match self.deliver(taken, &stop).await {
                Some(()) => backoff = self.cfg.retry_min,
                None => break,
            }
        }
        info!("Sink stopped.");
    }

    /// Runs `f` on the store reader (opened on first use, kept after) on
    /// the blocking pool: SQLite reads must not stall the runtime.
    async fn with_reader<T: Send + 'static>(
        &self,
        reader: &mut Option<StoreReader>,
        f: impl FnOnce(&StoreReader) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let r = match reader.take() {
            Some(r) => r,
            None => StoreReader::open(&self.store_path)?,
        };
        let (r, out) = tokio::task::spawn_blocking(move || {
            let out = f(&r);
            (r, out)
        })
        .await
        .map_err(|_| StoreError::Closed)?;
        *reader = Some(r);
        out
    }

    /// The head of the queue.
    async fn read(&self, reader: &mut Option<StoreReader>) -> Result<Vec<Queued>, StoreError> {
        let (id, n) = (self.cfg.id.clone(), self.cfg.batch_max);
        self.with_reader(reader, move |r| r.sink_batch(&id, n))
            .await
    }

    /// Attaches the agents' labels to a batch.
    async fn take(
        &mut self,
        batch: Vec<Queued>,
        reader: &mut Option<StoreReader>,
    ) -> Result<Taken, StoreError> {
        let through = batch.last().map_or(0, |q| q.n);
        let mut events = Vec::with_capacity(batch.len());
        for q in batch {
            let e = q.event;
            let labels = match self.labels.get(&e.agent_id) {
                Some(l) => l.clone(),
                None => {
                    let a = e.agent_id.clone();
                    let l = Arc::new(self.with_reader(reader, move |r| r.labels(&a)).await?);
                    if self.labels.len() > 100_000 {
                        self.labels.clear();
                    }
                    self.labels.insert(e.agent_id.clone(), l.clone());
                    l
                }
            };
            events.push(SinkEvent { event: e, labels });
        }
        Ok(Taken { through, events })
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

    /// Delivers what residency allows of a batch, retrying what fails with
    /// backoff, then records the progress. `None` when stopped first (the
    /// batch stays queued).
    async fn deliver(&self, taken: Taken, stop: &CancellationToken) -> Option<()> {
        let mut refused = Vec::new();
        let mut allowed = taken.events;
        let mut rejected = Vec::new();
        let mut delivered = 0u64;
        if !allowed.is_empty() {
            match self.attempt(&mut allowed, &mut refused, stop).await? {
                Ok(()) => delivered = allowed.len() as u64,
                // One bad event must not take the others with it: try each
                // alone to find out which.
                Err(message) if allowed.len() > 1 => {
                    debug!(error = %message, "Batch rejected; delivering its events one by one.");
                    for e in allowed {
                        let mut one = vec![e];
                        match self.attempt(&mut one, &mut refused, stop).await? {
                            Ok(()) => delivered += one.len() as u64,
                            Err(m) => rejected.extend(one.into_iter().map(|e| (e, m.clone()))),
                        }
                    }
                }
                Err(message) => rejected.extend(allowed.into_iter().map(|e| (e, message.clone()))),
            }
        }
        let mut progress = SinkProgress {
            through: Some(taken.through),
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
        // The progress must be recorded, or the batch would be delivered
        // again after a restart: retried like a delivery.
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
    /// longer allows moves to `refused`. `None` when stopped first;
    /// `Some(Err(message))` when rejected.
    async fn attempt(
        &self,
        events: &mut Vec<SinkEvent>,
        refused: &mut Vec<String>,
        stop: &CancellationToken,
    ) -> Option<Result<(), String>> {
        let mut backoff = self.cfg.retry_min;
        let mut failures = 0u64;
        loop {
            self.refuse(events, refused);
            if events.is_empty() {
                return Some(Ok(()));
            }
            let result = tokio::select! {
                () = stop.cancelled() => return None,
                r = self.sink.deliver(events) => r,
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
                    if sleep(stop, super::jitter(backoff)).await {
                        return None;
                    }
                    backoff = (backoff * 2).min(self.cfg.retry_max);
                }
            }
        }
    }
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
