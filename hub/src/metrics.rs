//! The hub's Prometheus metrics, on `[observability] metrics`
//! (127.0.0.1:9465 by default).
//!
//! Why read from the store at each scrape rather than count in memory: the
//! sinks' counters, queues and the registry are already durable in the store
//! (they are what `sinks status` and `fleet list` print), so a scrape shows
//! the same numbers as those verbs, survives a restart, and on the JetStream
//! store covers every replica, not only the one scraped. The values are put
//! into a fresh `prometheus-client` registry per scrape and encoded by it.
//!
//! Served with hyper's HTTP/1 server (the hub links hyper for the HTTP sink
//! already), one connection at a time: scrapes are rare and small, and no
//! task outlives the shutdown token.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::clock;
use crate::kpis::Kpis;
use crate::server::{DoorCounters, DoorCounts};
use crate::store::jetstream::JetStreamStore;
use crate::store::{AgentRecord, SinkStatus, StoreError, StoreReader};

/// How long one scrape may take, reading included.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the numbers come from.
#[derive(Debug, Clone)]
pub enum MetricsSource {
    /// The SQLite store's file and the configured sinks.
    Sqlite {
        /// `<data_dir>/hub.db`.
        path: PathBuf,
        /// The `[[sinks]]` ids.
        sinks: Vec<String>,
    },
    /// The JetStream store and the configured sinks.
    JetStream {
        /// The store.
        store: Box<JetStreamStore>,
        /// The `[[sinks]]` ids.
        sinks: Vec<String>,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabels {
    sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    agent: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    kind: String,
    state: String,
}

/// What one scrape read from the store.
#[derive(Debug, Default)]
pub struct Scrape {
    /// Every sink's queue and counters.
    pub sinks: Vec<SinkStatus>,
    /// The fleet registry.
    pub fleet: Vec<AgentRecord>,
    /// Commands by kind and state (SQLite store only).
    pub commands: Vec<(String, String, u64)>,
}

impl MetricsSource {
    async fn read(&self) -> Result<Scrape, StoreError> {
        match self {
            MetricsSource::Sqlite { path, sinks } => {
                let (path, sinks) = (path.clone(), sinks.clone());
                tokio::task::spawn_blocking(move || {
                    let reader = StoreReader::open(&path)?;
                    Ok(Scrape {
                        sinks: reader.sinks_status(&sinks)?,
                        fleet: reader.fleet()?,
                        commands: reader.command_counts()?,
                    })
                })
                .await
                .map_err(|_| StoreError::Closed)?
            }
            MetricsSource::JetStream { store, sinks } => Ok(Scrape {
                sinks: store.sinks_status(sinks).await?,
                fleet: store.fleet().await?,
                commands: Vec::new(),
            }),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// The text exposition of what `sinks` and `fleet` say now, what the
/// door decided, and the KPIs this process counted.
pub fn render(scrape: &Scrape, door: &DoorCounts, kpis: &Kpis, now_ns: i64) -> String {
    let (sinks, fleet) = (&scrape.sinks, &scrape.fleet);
    let mut registry = Registry::with_prefix("outpost_hub");
    render_door(&mut registry, door);
    render_commands(&mut registry, &scrape.commands);
    kpis.register(&mut registry);
    let counter = |registry: &mut Registry, name: &str, help: &str| {
        let f = Family::<SinkLabels, Counter>::default();
        registry.register(name, help, f.clone());
        f
    };
    let delivered = counter(
        &mut registry,
        "sink_delivered_events",
        "Events a sink accepted.",
    );
    let rejected = counter(
        &mut registry,
        "sink_rejected_events",
        "Events a sink refused for good (audited).",
    );
    let refused = counter(
        &mut registry,
        "sink_residency_refused_events",
        "Events the last-step residency check kept from a sink (audited).",
    );
    let failures = counter(
        &mut registry,
        "sink_failures",
        "Failed delivery attempts; each is retried.",
    );
    let pending = Family::<SinkLabels, Gauge>::default();
    registry.register(
        "sink_pending_events",
        "Events waiting for a sink; while any wait, the agents' acknowledgements stop before them.",
        pending.clone(),
    );
    let lag = Family::<SinkLabels, Gauge>::default();
    registry.register(
        "sink_lag_seconds",
        "Age of the oldest event waiting for a sink (0: none waits).",
        lag.clone(),
    );
    for s in sinks {
        let l = SinkLabels {
            sink: s.sink.clone(),
        };
        delivered.get_or_create(&l).inc_by(s.delivered);
        rejected.get_or_create(&l).inc_by(s.rejected);
        refused.get_or_create(&l).inc_by(s.refused);
        failures.get_or_create(&l).inc_by(s.failures);
        pending
            .get_or_create(&l)
            .set(i64::try_from(s.pending).unwrap_or(i64::MAX));
        let age = s
            .oldest_queued_at
            .map_or(0, |t| now_ns.saturating_sub(t).max(0) / 1_000_000_000);
        lag.get_or_create(&l).set(age);
    }
    let agents = Family::<StateLabels, Gauge>::default();
    registry.register(
        "agents",
        "Agents in the fleet registry, by whether a session is open.",
        agents.clone(),
    );
    let connected = fleet.iter().filter(|a| a.connected()).count();
    for (state, n) in [
        ("connected", connected),
        ("disconnected", fleet.len() - connected),
    ] {
        agents
            .get_or_create(&StateLabels {
                state: state.into(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    let backlog = Gauge::<i64>::default();
    registry.register(
        "agents_backlog_events",
        "Outbox backlog the agents last reported, summed.",
        backlog.clone(),
    );
    let sum: u64 = fleet.iter().filter_map(|a| a.backlog_events).sum();
    backlog.set(i64::try_from(sum).unwrap_or(i64::MAX));
    let revoked = Gauge::<i64>::default();
    registry.register(
        "agents_revoked",
        "Agents an operator revoked (refused until reinstated).",
        revoked.clone(),
    );
    let n = fleet.iter().filter(|a| a.revoked.is_some()).count();
    revoked.set(i64::try_from(n).unwrap_or(i64::MAX));
    let ignored = Counter::<u64>::default();
    registry.register(
        "hello_labels_ignored",
        "Hellos whose labels differed from the registry's (ignored), summed over the fleet.",
        ignored.clone(),
    );
    ignored.inc_by(fleet.iter().map(|a| a.labels_ignored).sum());
    let expiry = Family::<AgentLabels, Gauge>::default();
    registry.register(
        "agent_cert_expiry_seconds",
        "Seconds until the certificate the registry binds to an agent expires (negative: expired).",
        expiry.clone(),
    );
    for a in fleet {
        if let Some(not_after) = a.cert_not_after {
            expiry
                .get_or_create(&AgentLabels {
                    agent: a.agent_id.to_string(),
                })
                .set(not_after.0.saturating_sub(now_ns) / 1_000_000_000);
        }
    }
    let mut out = String::new();
    // Encoding into a String fails only if a label cannot be written, which
    // derive-generated label sets never do.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// The commands table by kind and state: every command counted once, in
/// its latest state (`pending`, `delivered`, then its outcome).
fn render_commands(registry: &mut Registry, counts: &[(String, String, u64)]) {
    let commands = Family::<CommandLabels, Gauge>::default();
    registry.register(
        "commands",
        "Commands to agents the hub holds, by kind (write, publish, read) and state (pending, delivered, applied, refused, failed, expired, unsupported).",
        commands.clone(),
    );
    for (kind, state, n) in counts {
        commands
            .get_or_create(&CommandLabels {
                kind: kind.clone(),
                state: state.clone(),
            })
            .set(i64::try_from(*n).unwrap_or(i64::MAX));
    }
}

/// The QUIC door's counters (`server::door`).
fn render_door(registry: &mut Registry, door: &DoorCounts) {
    let refused = Family::<ReasonLabels, Counter>::default();
    registry.register(
        "connections_refused",
        "New QUIC connections refused at the door, by reason: `rate` (the source address opened too many), `busy` (hub.max_handshakes in flight).",
        refused.clone(),
    );
    for (reason, n) in [("rate", door.refused_rate), ("busy", door.refused_busy)] {
        refused
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc_by(n);
    }
    let retried = Counter::<u64>::default();
    registry.register(
        "connections_retried",
        "New QUIC connections answered with a Retry to validate their address (above hub.retry_above handshakes in flight).",
        retried.clone(),
    );
    retried.inc_by(door.retried);
    let deadline = Counter::<u64>::default();
    registry.register(
        "connections_stream_deadline",
        "Connections closed with Timeout because they opened no stream within hub.stream_deadline.",
        deadline.clone(),
    );
    deadline.inc_by(door.stream_deadline);
    let in_flight = Gauge::<i64>::default();
    registry.register(
        "handshakes_in_flight",
        "QUIC handshakes in flight now.",
        in_flight.clone(),
    );
    in_flight.set(i64::try_from(door.in_flight).unwrap_or(i64::MAX));
}

/// Serves the metrics until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    source: MetricsSource,
    door: Arc<DoorCounters>,
    kpis: Arc<Kpis>,
    shutdown: CancellationToken,
) {
    let source = Arc::new(source);
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let (source, door, kpis) = (source.clone(), door.clone(), kpis.clone());
        let service = hyper::service::service_fn(move |_req| {
            let (source, door, kpis) = (source.clone(), door.clone(), kpis.clone());
            async move {
                let (status, body) = match source.read().await {
                    Ok(scrape) => (
                        200,
                        render(&scrape, &door.read(), &kpis, clock::unix_now().0),
                    ),
                    Err(e) => {
                        warn!(error = %e, "Cannot read the store for a metrics scrape.");
                        (503, format!("cannot read the store: {e}\n"))
                    }
                };
                let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
                *resp.status_mut() =
                    hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
                resp.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tokio::time::timeout(SCRAPE_TIMEOUT, conn) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocols::event::{AgentId, Seq, Timestamp};

    fn sink(id: &str, pending: u64, oldest: Option<i64>) -> SinkStatus {
        SinkStatus {
            sink: id.into(),
            pending,
            oldest_queued_at: oldest,
            delivered: 7,
            rejected: 1,
            refused: 2,
            failures: 3,
            last_delivered_at: None,
            last_error: None,
            last_error_at: None,
        }
    }

    fn agent(id: &str, sessions: u64, backlog: Option<u64>) -> AgentRecord {
        AgentRecord {
            agent_id: AgentId::parse(id).expect("id"),
            labels: Default::default(),
            labels_ignored: 0,
            revoked: None,
            first_seen: Timestamp(0),
            last_seen: Timestamp(0),
            agent_version: None,
            protocol_version: None,
            watermark: Seq(0),
            backlog_events: backlog,
            backlog_bytes: None,
            sessions,
            policy_version: None,
            policy_error: None,
            policy_dropped: 0,
            policy_modified: 0,
            cert_not_after: None,
            cert_serial: None,
        }
    }

    #[test]
    fn the_exposition_carries_every_sink_and_the_fleet() {
        let s = 1_000_000_000;
        let scrape = Scrape {
            sinks: vec![sink("cloud", 5, Some(10 * s)), sink("idle", 0, None)],
            fleet: vec![
                AgentRecord {
                    cert_not_after: Some(Timestamp(125 * s)),
                    ..agent("a", 1, Some(40))
                },
                agent("b", 0, Some(2)),
                agent("c", 0, None),
            ],
            commands: vec![
                ("read".into(), "applied".into(), 4),
                ("write".into(), "refused".into(), 1),
            ],
        };
        let text = render(
            &scrape,
            &DoorCounts {
                refused_busy: 4,
                refused_rate: 9,
                retried: 6,
                stream_deadline: 2,
                in_flight: 3,
            },
            &Kpis::new(5 * s),
            25 * s,
        );
        for line in [
            "outpost_hub_sink_delivered_events_total{sink=\"cloud\"} 7",
            "outpost_hub_sink_rejected_events_total{sink=\"cloud\"} 1",
            "outpost_hub_sink_residency_refused_events_total{sink=\"cloud\"} 2",
            "outpost_hub_sink_failures_total{sink=\"cloud\"} 3",
            "outpost_hub_sink_pending_events{sink=\"cloud\"} 5",
            "outpost_hub_sink_lag_seconds{sink=\"cloud\"} 15",
            "outpost_hub_sink_lag_seconds{sink=\"idle\"} 0",
            "outpost_hub_agents{state=\"connected\"} 1",
            "outpost_hub_agents{state=\"disconnected\"} 2",
            "outpost_hub_agents_backlog_events 42",
            "outpost_hub_agent_cert_expiry_seconds{agent=\"a\"} 100",
            "outpost_hub_connections_refused_total{reason=\"rate\"} 9",
            "outpost_hub_connections_refused_total{reason=\"busy\"} 4",
            "outpost_hub_connections_retried_total 6",
            "outpost_hub_connections_stream_deadline_total 2",
            "outpost_hub_handshakes_in_flight 3",
            "outpost_hub_start_time_seconds 5",
            "outpost_hub_commands{kind=\"read\",state=\"applied\"} 4",
            "outpost_hub_commands{kind=\"write\",state=\"refused\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // An agent never bound has no gauge rather than a made-up one.
        assert!(!text.contains("cert_expiry_seconds{agent=\"b\"}"), "{text}");
    }
}
