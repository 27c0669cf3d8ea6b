//! The hub's delivery KPIs, counted in memory at the moment they happen:
//! what an ingest commit stored and dropped for each agent, and how long
//! each event took from that commit to each sink's acceptance. (The other
//! half of the end-to-end latency, from the agent's outbox to the hub's
//! commit, is timed by the agent, on its own clock, when the hub's `Stored`
//! or `Ack` says the commit happened: no frame had to change.)
//!
//! Why in memory, when the rest of the hub's metrics are read from the store
//! at each scrape (`metrics`): a latency exists only at the instant the
//! commit or the delivery completes, and nothing durable records it. So
//! these are this process's, since it started (`outpost_hub_start_time_seconds`
//! says when), as Prometheus counters are meant to be; on the JetStream
//! store each replica counts what it committed and delivered, and the sums
//! over replicas are the fleet's.
//!
//! Bounded cardinality: the `agent` label names at most [`AGENT_SERIES`]
//! agents (the first this process commits for); later ones share the label
//! [`OTHER`]. Sinks are few and configured, so every sink has its own.
//!
//! The histograms are [`Latency`], a fixed-bucket histogram of our own
//! rather than `prometheus_client`'s: the JSON summary (`GET /api/v1/kpis`)
//! reads its buckets to give the same quantiles a PromQL
//! `histogram_quantile` would, and N events committed at one instant are
//! one `observe_n`, not N.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use outpost_protocols::event::AgentId;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use serde::Serialize;

/// The most agents with a series of their own.
pub const AGENT_SERIES: usize = 1000;

/// The `agent` label of every agent past [`AGENT_SERIES`].
pub const OTHER: &str = "_other";

/// The histograms' upper bounds in seconds (and `+Inf`): from 5 ms, for a
/// connected site, to a day, for a site's backlog after a long outage.
pub const BUCKETS: [f64; 18] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0, 21600.0, 86400.0,
];

/// A fixed-bucket latency histogram (seconds) whose buckets can be read.
#[derive(Debug)]
pub struct Latency {
    /// Per bucket (not cumulative), the last one `+Inf`.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    /// The sum in nanoseconds, so that it adds atomically.
    sum_ns: AtomicU64,
}

impl Default for Latency {
    fn default() -> Latency {
        Latency {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }
}

impl Latency {
    /// Records `n` observations of `ns` nanoseconds (a negative one, from
    /// clocks that disagree, as 0).
    pub fn observe_n(&self, ns: i64, n: u64) {
        if n == 0 {
            return;
        }
        let ns = u64::try_from(ns).unwrap_or(0);
        let secs = ns as f64 / 1e9;
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(n, Ordering::Relaxed);
        self.count.fetch_add(n, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(ns.saturating_mul(n), Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Their sum in seconds.
    pub fn sum(&self) -> f64 {
        self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
    }

    /// Per-bucket counts with their upper bounds, `+Inf` last.
    fn snapshot(&self) -> Vec<(f64, u64)> {
        BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect()
    }

    /// The `q` quantile (0..=1), interpolated within its bucket as
    /// Prometheus' `histogram_quantile` does; `None` without observations.
    /// A quantile in the `+Inf` bucket is the highest finite bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let buckets = self.snapshot();
        let total: u64 = buckets.iter().map(|(_, c)| c).sum();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        let mut lower = 0.0;
        for (upper, c) in buckets {
            if c > 0 && (below + c) as f64 >= rank {
                if upper.is_infinite() {
                    return Some(lower);
                }
                let within = (rank - below as f64) / c as f64;
                return Some(lower + (upper - lower) * within);
            }
            below += c;
            if upper.is_finite() {
                lower = upper;
            }
        }
        Some(lower)
    }

    /// Count, sum and p50/p95/p99, for the JSON summary.
    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.count(),
            sum_seconds: self.sum(),
            p50_seconds: self.quantile(0.5),
            p95_seconds: self.quantile(0.95),
            p99_seconds: self.quantile(0.99),
        }
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum(), self.count(), &self.snapshot(), None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// A latency histogram's numbers, as the JSON summary gives them.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct LatencySummary {
    /// Observations (events).
    pub count: u64,
    /// Their sum, in seconds.
    pub sum_seconds: f64,
    /// The median, estimated from the buckets as `histogram_quantile` does.
    pub p50_seconds: Option<f64>,
    /// The 95th percentile.
    pub p95_seconds: Option<f64>,
    /// The 99th percentile.
    pub p99_seconds: Option<f64>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    agent: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabels {
    sink: String,
}

/// The KPIs this hub process counts (cheap to share: every family is a
/// handle on shared state).
#[derive(Debug)]
pub struct Kpis {
    /// Unix seconds when the process started counting.
    start_time: i64,
    stored: Family<AgentLabels, Counter>,
    dropped: Family<AgentLabels, Counter>,
    sink: Family<SinkLabels, Latency>,
    /// The agents with a series of their own, and the sinks seen.
    agents: Mutex<BTreeSet<String>>,
    sinks: Mutex<BTreeSet<String>>,
}

impl Kpis {
    /// Counting from `start_ns` (Unix nanoseconds, the process's start).
    pub fn new(start_ns: i64) -> Kpis {
        Kpis {
            start_time: start_ns / 1_000_000_000,
            stored: Family::default(),
            dropped: Family::default(),
            sink: Family::default(),
            agents: Mutex::new(BTreeSet::new()),
            sinks: Mutex::new(BTreeSet::new()),
        }
    }

    /// The `agent` label of `id`: its own while fewer than
    /// [`AGENT_SERIES`] have one, [`OTHER`] after.
    fn agent(&self, id: &AgentId) -> AgentLabels {
        let mut agents = self.agents.lock().unwrap_or_else(|e| e.into_inner());
        let agent = if agents.contains(id.as_str()) {
            id.as_str().to_owned()
        } else if agents.len() < AGENT_SERIES {
            agents.insert(id.as_str().to_owned());
            id.as_str().to_owned()
        } else {
            OTHER.to_owned()
        };
        AgentLabels { agent }
    }

    /// An ingest commit for `id` completed: `stored` events are new in the
    /// store, `dropped` were dropped by the hub's policy.
    pub fn committed(&self, id: &AgentId, stored: u64, dropped: u64) {
        if stored == 0 && dropped == 0 {
            return;
        }
        let l = self.agent(id);
        self.stored.get_or_create(&l).inc_by(stored);
        self.dropped.get_or_create(&l).inc_by(dropped);
    }

    /// `sink` accepted events at `now_ns`, which the hub had committed (and
    /// queued for it) at `queued_at` (Unix nanoseconds each).
    pub fn delivered(&self, sink: &str, queued_at: impl IntoIterator<Item = i64>, now_ns: i64) {
        {
            let mut sinks = self.sinks.lock().unwrap_or_else(|e| e.into_inner());
            if !sinks.contains(sink) {
                sinks.insert(sink.to_owned());
            }
        }
        let h = self.sink.get_or_create(&SinkLabels { sink: sink.into() });
        // Events of one commit share their time: one observation per run.
        let mut run: Option<(i64, u64)> = None;
        for t in queued_at {
            run = match run {
                Some((at, n)) if at == t => Some((at, n + 1)),
                Some((at, n)) => {
                    h.observe_n(now_ns.saturating_sub(at), n);
                    Some((t, 1))
                }
                None => Some((t, 1)),
            };
        }
        if let Some((at, n)) = run {
            h.observe_n(now_ns.saturating_sub(at), n);
        }
    }

    /// Adds this process's KPIs to a scrape's `registry` (prefix
    /// `outpost_hub`).
    pub fn register(&self, registry: &mut Registry) {
        let start = Gauge::<i64>::default();
        start.set(self.start_time);
        registry.register(
            "start_time_seconds",
            "When this hub process started, Unix seconds (uptime: time() minus it; a restart: it changes).",
            start,
        );
        registry.register(
            "events_stored",
            "Events this process committed to the store, by agent: the hub's side of the books.",
            self.stored.clone(),
        );
        registry.register(
            "policy_dropped_events",
            "Events the hub's policy dropped from what an agent sent (not stored; the agent's watermark covers them), by agent.",
            self.dropped.clone(),
        );
        registry.register(
            "sink_latency_seconds",
            "Hub commit to sink acceptance, per delivered event, by sink.",
            self.sink.clone(),
        );
    }

    /// The totals and per-agent and per-sink numbers, for the JSON summary.
    pub fn summary(&self) -> KpiCounts {
        let agents: Vec<String> = {
            let a = self.agents.lock().unwrap_or_else(|e| e.into_inner());
            a.iter().cloned().chain([OTHER.to_owned()]).collect()
        };
        let sinks: Vec<String> = {
            let s = self.sinks.lock().unwrap_or_else(|e| e.into_inner());
            s.iter().cloned().collect()
        };
        let mut out = KpiCounts {
            start_time_seconds: self.start_time,
            events_stored: 0,
            policy_dropped_events: 0,
            agents: BTreeMap::new(),
            sink_latency: BTreeMap::new(),
        };
        for agent in agents {
            let l = AgentLabels { agent };
            let stored = self.stored.get(&l).map_or(0, |c| c.get());
            let dropped = self.dropped.get(&l).map_or(0, |c| c.get());
            if stored == 0 && dropped == 0 {
                continue;
            }
            out.events_stored += stored;
            out.policy_dropped_events += dropped;
            out.agents.insert(
                l.agent,
                AgentKpis {
                    events_stored: stored,
                    policy_dropped_events: dropped,
                },
            );
        }
        for sink in sinks {
            if let Some(h) = self.sink.get(&SinkLabels { sink: sink.clone() }) {
                out.sink_latency.insert(sink, h.summary());
            }
        }
        out
    }
}

/// What [`Kpis::summary`] gives.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct KpiCounts {
    /// `outpost_hub_start_time_seconds`.
    pub start_time_seconds: i64,
    /// `outpost_hub_events_stored_total`, summed over agents.
    pub events_stored: u64,
    /// `outpost_hub_policy_dropped_events_total`, summed over agents.
    pub policy_dropped_events: u64,
    /// The same by agent (the label's values: at most 1000 ids and `_other`).
    pub agents: BTreeMap<String, AgentKpis>,
    /// `outpost_hub_sink_latency_seconds`, by sink.
    pub sink_latency: BTreeMap<String, LatencySummary>,
}

/// One agent's numbers in [`KpiCounts`].
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AgentKpis {
    /// `outpost_hub_events_stored_total{agent}`.
    pub events_stored: u64,
    /// `outpost_hub_policy_dropped_events_total{agent}`.
    pub policy_dropped_events: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> AgentId {
        AgentId::parse(s).expect("id")
    }

    #[test]
    fn a_commit_counts_its_events_by_agent() {
        let k = Kpis::new(7_000_000_000);
        k.committed(&id("a"), 5, 2);
        k.committed(&id("a"), 1, 0);
        let mut r = Registry::with_prefix("outpost_hub");
        k.register(&mut r);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).expect("encode");
        for line in [
            "outpost_hub_start_time_seconds 7",
            "outpost_hub_events_stored_total{agent=\"a\"} 6",
            "outpost_hub_policy_dropped_events_total{agent=\"a\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        let sum = k.summary();
        assert_eq!(sum.events_stored, 6);
        assert_eq!(sum.policy_dropped_events, 2);
        assert_eq!(sum.agents["a"].events_stored, 6);
    }

    #[test]
    fn agents_past_the_limit_share_one_series() {
        let k = Kpis::new(0);
        for i in 0..AGENT_SERIES + 5 {
            k.committed(&id(&format!("a{i}")), 1, 0);
        }
        let sum = k.summary();
        assert_eq!(sum.agents.len(), AGENT_SERIES + 1);
        assert_eq!(sum.agents[OTHER].events_stored, 5);
        assert_eq!(sum.events_stored, AGENT_SERIES as u64 + 5);
    }

    #[test]
    fn deliveries_are_timed_from_their_commit() {
        let k = Kpis::new(0);
        let s = 1_000_000_000;
        k.delivered("cloud", [s, s, 2 * s], 3 * s);
        let h = k.summary().sink_latency["cloud"].clone();
        assert_eq!(h.count, 3);
        assert!((h.sum_seconds - 5.0).abs() < 1e-9, "{h:?}");
        let mut r = Registry::with_prefix("outpost_hub");
        k.register(&mut r);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).expect("encode");
        for line in [
            "outpost_hub_sink_latency_seconds_count{sink=\"cloud\"} 3",
            "outpost_hub_sink_latency_seconds_sum{sink=\"cloud\"} 5.0",
            "outpost_hub_sink_latency_seconds_bucket{le=\"1.0\",sink=\"cloud\"} 1",
            "outpost_hub_sink_latency_seconds_bucket{le=\"2.5\",sink=\"cloud\"} 3",
            "outpost_hub_sink_latency_seconds_bucket{le=\"+Inf\",sink=\"cloud\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        let h = Latency::default();
        assert_eq!(h.quantile(0.5), None);
        h.observe_n(700_000_000, 10); // in (0.5, 1]
        let p50 = h.quantile(0.5).expect("some");
        assert!((p50 - 0.75).abs() < 1e-9, "{p50}");
        h.observe_n(-5, 1); // clocks that disagree: 0
        assert_eq!(h.count(), 11);
        h.observe_n(i64::MAX, 100); // past the last bound
        assert_eq!(h.quantile(0.99), Some(86400.0));
    }
}
