//! What every sink promises the runner: [`Sink::deliver`] returns once
//! the far end has accepted a batch, and says with [`SinkError`] whether
//! trying again can help.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use outpost_protocols::Event;

/// One event as a sink receives it: as stored (minimised by the policy), with
/// the identity that makes it unique across the fleet: `(agent_id, seq)` is
/// the key sinks deduplicate by (`Nats-Msg-Id`, an HTTP idempotency key).
#[derive(Debug, Clone)]
pub struct SinkEvent {
    /// The event, with its agent and seq.
    pub event: Event,
    /// The agent's labels (from its `Hello`), for topic templates.
    pub labels: Arc<BTreeMap<String, String>>,
    /// When the hub committed it and queued it for the sink, Unix
    /// nanoseconds (0 for an event that was never queued): the start of
    /// `outpost_hub_sink_latency_seconds`.
    pub queued_at: i64,
}

/// Why a sink did not accept a batch.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The far end is down, slow, or refused for now: the runner retries the
    /// same batch with backoff, and nothing behind it for this sink moves.
    #[error("{0}")]
    Transient(String),
    /// The far end refused the batch for good (a payload it will never
    /// take): none of it was accepted, or only by a far end that
    /// deduplicates. The runner delivers a rejected batch's events one at a
    /// time, and counts, logs and audits those rejected alone. Never used for
    /// anything a retry or an operator could fix.
    #[error("{0}")]
    Rejected(String),
    /// The sink's settings cannot work (a certificate that does not parse, a
    /// template naming an unknown field): the hub refuses to start.
    #[error("sink {id}: {key}: {message}")]
    Config {
        /// The sink's id.
        id: String,
        /// The config key, as `sinks.<id>.<key>`'s last part.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The OS would not give the sink its thread (see `runner::start`): the
    /// hub refuses to start.
    #[error("sink {id}: cannot start its thread: {source}")]
    Thread {
        /// The sink's id.
        id: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The sink's thread ended before its sink was built (it panicked):
    /// the hub refuses to start.
    #[error("sink {id}: cannot start its thread: it ended before the sink was built")]
    ThreadEnded {
        /// The sink's id.
        id: String,
    },
}

/// A destination for stored events.
pub trait Sink: Send + Sync {
    /// Delivers `events` (ascending `(agent_id, seq)` per agent; never empty)
    /// and returns once the far end has accepted every one of them, as far
    /// as it can say so: a QoS 1 PUBACK, a JetStream publish ack, a 2xx. A
    /// batch delivered again after an error must be harmless (the far end
    /// deduplicates, or the sink documents that it delivers at least once).
    fn deliver<'a>(&'a self, events: &'a [SinkEvent]) -> BoxFuture<'a, Result<(), SinkError>>;

    /// How many deliveries the runner may have under way at once (it takes
    /// at most 4). More than one only for a sink that sends the batches of
    /// overlapping deliveries to its far end in the order the deliveries
    /// were first polled (the runner polls them in queue order), and that
    /// stays correct when a later batch is under way while an earlier one
    /// fails: after a failure the runner lets the attempts under way finish
    /// and then settles the batches one at a time, the failed one first
    /// (see `runner`). The default, one, is what a far end that may apply
    /// concurrent requests in any order (an HTTP service) needs.
    fn overlap(&self) -> usize {
        1
    }
}

/// The most first attempts a runner has under way at once, whatever a sink
/// asks for ([`Sink::overlap`]).
pub const MAX_OVERLAP: usize = 4;

/// How many delivered batches may wait for their record (the one under way
/// included) before a runner starts no new attempt. Records are slower than
/// deliveries (each is a durable transaction), so several wait, and the
/// ones waiting are recorded together, in one transaction.
pub const RECORDS_WAITING: usize = 4;

/// The most batches a runner may have delivered without having recorded
/// them yet, for a sink of that [`Sink::overlap`]: those under way, and
/// those waiting for their record. A hub that crashes may have delivered
/// that many batches it delivers again after the restart.
pub fn unrecorded_max(overlap: usize) -> usize {
    overlap.clamp(1, MAX_OVERLAP) + RECORDS_WAITING
}
