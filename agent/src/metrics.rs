//! The agent's Prometheus metrics: one registry, counted where things happen.
//!
//! Served on `[observability] metrics` (127.0.0.1:9464 by default) by a
//! deliberately tiny HTTP responder: the endpoint answers every GET with the
//! text exposition, and an HTTP framework would cost the static ARM binary more
//! than the whole metrics feature is worth.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Labels naming a source.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `modbus` or `mqtt`.
    pub source: String,
}

/// Labels naming a reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why.
    pub reason: String,
}

/// Labels naming a Modbus device.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    /// The device name.
    pub device: String,
}

/// Labels naming a Modbus device and an error kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceErrorLabels {
    /// The device name.
    pub device: String,
    /// `exception`, `timeout`, `disconnected`, `short_reply`, `decode`.
    pub kind: String,
}

/// Labels for MQTT messages.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QosLabels {
    /// 0, 1 or 2.
    pub qos: String,
}

/// Labels of a command's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    /// `write`, `publish` or `read`.
    pub kind: String,
    /// `applied`, `refused`, `failed`, `expired` or `unsupported`.
    pub outcome: String,
}

/// Every metric the agent exposes.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Events committed to the outbox, by source.
    pub events_accepted: Family<SourceLabels, Counter>,
    /// Events evicted or refused, by reason.
    pub events_evicted: Family<ReasonLabels, Counter>,
    /// Events in the outbox.
    pub outbox_backlog_events: Gauge,
    /// Bytes in the outbox.
    pub outbox_backlog_bytes: Gauge,
    /// MQTT messages received, by QoS.
    pub mqtt_messages: Family<QosLabels, Counter>,
    /// QoS 2 redeliveries recognised and not stored again.
    pub mqtt_qos2_duplicates: Counter,
    /// QoS 1 messages the broker marked as redelivered (stored again:
    /// at-least-once).
    pub mqtt_qos1_redelivered: Counter,
    /// Messages larger than `max_payload`, recorded as bad quality.
    pub mqtt_oversize: Counter,
    /// Messages received and not yet acknowledged.
    pub mqtt_inflight: Gauge,
    /// Sparkplug B rebirth requests (NCMD) published.
    pub sparkplug_rebirths: Counter,
    /// Sparkplug B messages or metrics not stored (unknown alias, no name,
    /// a topic outside the namespace).
    pub sparkplug_skipped: Counter,
    /// 1 while connected to the site broker.
    pub mqtt_connected: Gauge,
    /// Messages published by bridges.
    pub bridge_published: Counter,
    /// 1 while a session with the hub is up.
    pub uplink_connected: Gauge,
    /// Seconds until the agent's certificate expires.
    pub cert_expiry_seconds: Gauge,
    /// Events handed to the hub session (resends after a reconnect included).
    pub uplink_sent: Counter,
    /// Events the hub acknowledged and the outbox deleted.
    pub uplink_acked: Counter,
    /// Waiting events renumbered to follow a hub that holds seqs this outbox
    /// never assigned (a replaced, wiped or restored data directory).
    pub outbox_renumbered: Counter,
    /// Events the policy dropped before they were stored or sent, by reason.
    pub policy_dropped: Family<ReasonLabels, Counter>,
    /// Events the policy minimised before they were stored.
    pub policy_modified: Counter,
    /// The policy version in force (0: none).
    pub policy_version: Gauge,
    /// Bridged values or commands dropped because a queue was full or the
    /// peer was away.
    pub bridge_dropped: Counter,
    /// Appends the outbox could not commit (disk full, I/O error).
    pub outbox_errors: Counter,
    /// Bridge writes to Modbus, by device and result.
    pub modbus_writes: Family<DeviceErrorLabels, Counter>,
    /// Modbus requests, by device.
    pub modbus_requests: Family<DeviceLabels, Counter>,
    /// Modbus request failures, by device and kind.
    pub modbus_errors: Family<DeviceErrorLabels, Counter>,
    /// Modbus request latency in seconds, by device.
    pub modbus_latency: Family<DeviceLabels, Histogram>,
    /// OPC UA source faults and recoveries, by server (the `device` label)
    /// and kind.
    pub opcua_errors: Family<DeviceErrorLabels, Counter>,
    /// Commands from the hub, by kind and outcome, counted once each.
    pub commands: Family<CommandLabels, Counter>,
    /// Commands sent again and answered from the ledger, not executed.
    pub commands_replayed: Counter,
    /// The delivery KPIs (`outpost_agent_*`).
    pub kpi: Kpis,
}

impl Metrics {
    /// Counts a command's outcome.
    pub fn command(&self, kind: &str, outcome: &str) {
        self.commands
            .get_or_create(&CommandLabels {
                kind: kind.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// A registry with every metric registered under `outpost_`.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("outpost");
        let events_accepted = Family::<SourceLabels, Counter>::default();
        registry.register(
            "events_accepted",
            "Events committed to the outbox",
            events_accepted.clone(),
        );
        let events_evicted = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "events_evicted",
            "Events evicted or refused by the outbox limits",
            events_evicted.clone(),
        );
        let outbox_backlog_events = Gauge::default();
        registry.register(
            "outbox_backlog_events",
            "Events in the outbox",
            outbox_backlog_events.clone(),
        );
        let outbox_backlog_bytes = Gauge::default();
        registry.register(
            "outbox_backlog_bytes",
            "Bytes of events in the outbox",
            outbox_backlog_bytes.clone(),
        );
        let mqtt_messages = Family::<QosLabels, Counter>::default();
        registry.register(
            "mqtt_messages",
            "MQTT messages received",
            mqtt_messages.clone(),
        );
        let mqtt_qos2_duplicates = Counter::default();
        registry.register(
            "mqtt_qos2_duplicates",
            "QoS 2 redeliveries recognised and not stored again",
            mqtt_qos2_duplicates.clone(),
        );
        let mqtt_qos1_redelivered = Counter::default();
        registry.register(
            "mqtt_qos1_redelivered",
            "QoS 1 messages flagged DUP by the broker",
            mqtt_qos1_redelivered.clone(),
        );
        let mqtt_oversize = Counter::default();
        registry.register(
            "mqtt_oversize",
            "MQTT payloads over max_payload",
            mqtt_oversize.clone(),
        );
        let sparkplug_rebirths = Counter::default();
        registry.register(
            "sparkplug_rebirth_requests",
            "Sparkplug B rebirth requests published",
            sparkplug_rebirths.clone(),
        );
        let sparkplug_skipped = Counter::default();
        registry.register(
            "sparkplug_skipped",
            "Sparkplug B messages or metrics not stored",
            sparkplug_skipped.clone(),
        );
        let mqtt_inflight = Gauge::default();
        registry.register(
            "mqtt_inflight",
            "MQTT messages received and not yet acknowledged",
            mqtt_inflight.clone(),
        );
        let mqtt_connected = Gauge::default();
        registry.register(
            "mqtt_connected",
            "1 while connected to the site broker",
            mqtt_connected.clone(),
        );
        let bridge_published = Counter::default();
        registry.register(
            "bridge_published",
            "Messages published by Modbus-to-MQTT bridges",
            bridge_published.clone(),
        );
        let uplink_connected = Gauge::default();
        registry.register(
            "uplink_connected",
            "1 while a session with the hub is up",
            uplink_connected.clone(),
        );
        let cert_expiry_seconds = Gauge::default();
        registry.register(
            "agent_cert_expiry_seconds",
            "Seconds until the agent's certificate expires (negative: expired)",
            cert_expiry_seconds.clone(),
        );
        let uplink_sent = Counter::default();
        registry.register(
            "uplink_sent",
            "Events sent to the hub, resends included",
            uplink_sent.clone(),
        );
        let uplink_acked = Counter::default();
        registry.register(
            "uplink_acked",
            "Events the hub acknowledged and the outbox deleted",
            uplink_acked.clone(),
        );
        let policy_dropped = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "policy_dropped",
            "Events the policy dropped at the agent, by reason",
            policy_dropped.clone(),
        );
        let policy_modified = Counter::default();
        registry.register(
            "policy_modified",
            "Events the policy minimised at the agent",
            policy_modified.clone(),
        );
        let policy_version = Gauge::default();
        registry.register(
            "policy_version",
            "The policy version in force (0: none)",
            policy_version.clone(),
        );
        let outbox_renumbered = Counter::default();
        registry.register(
            "outbox_renumbered",
            "Waiting events renumbered to follow a hub that holds seqs this outbox never assigned",
            outbox_renumbered.clone(),
        );
        let bridge_dropped = Counter::default();
        registry.register(
            "bridge_dropped",
            "Bridged values or commands dropped (queue full or peer away)",
            bridge_dropped.clone(),
        );
        let outbox_errors = Counter::default();
        registry.register(
            "outbox_errors",
            "Appends the outbox could not commit",
            outbox_errors.clone(),
        );
        let modbus_writes = Family::<DeviceErrorLabels, Counter>::default();
        registry.register(
            "modbus_writes",
            "Bridge writes to Modbus by result",
            modbus_writes.clone(),
        );
        let modbus_requests = Family::<DeviceLabels, Counter>::default();
        registry.register(
            "modbus_requests",
            "Modbus read requests",
            modbus_requests.clone(),
        );
        let modbus_errors = Family::<DeviceErrorLabels, Counter>::default();
        registry.register(
            "modbus_errors",
            "Modbus read failures",
            modbus_errors.clone(),
        );
        let opcua_errors = Family::<DeviceErrorLabels, Counter>::default();
        registry.register(
            "opcua_errors",
            "OPC UA source faults and recoveries",
            opcua_errors.clone(),
        );
        let modbus_latency = Family::<DeviceLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.0005, 2.0, 14))) as fn() -> Histogram,
        );
        registry.register(
            "modbus_request_seconds",
            "Modbus read latency",
            modbus_latency.clone(),
        );
        let commands = Family::<CommandLabels, Counter>::default();
        registry.register(
            "commands",
            "Commands from the hub by kind and outcome",
            commands.clone(),
        );
        let commands_replayed = Counter::default();
        registry.register(
            "commands_replayed",
            "Commands sent again and answered from the ledger without executing",
            commands_replayed.clone(),
        );
        let kpi = Kpis::new(&mut registry);
        Arc::new(Metrics {
            kpi,
            commands,
            commands_replayed,
            registry,
            events_accepted,
            events_evicted,
            outbox_backlog_events,
            outbox_backlog_bytes,
            mqtt_messages,
            mqtt_qos2_duplicates,
            mqtt_qos1_redelivered,
            mqtt_oversize,
            mqtt_inflight,
            sparkplug_rebirths,
            sparkplug_skipped,
            mqtt_connected,
            bridge_published,
            uplink_connected,
            cert_expiry_seconds,
            uplink_sent,
            uplink_acked,
            outbox_renumbered,
            policy_dropped,
            policy_modified,
            policy_version,
            bridge_dropped,
            outbox_errors,
            modbus_writes,
            modbus_requests,
            modbus_errors,
            modbus_latency: Family::clone(&modbus_latency),
            opcua_errors,
        })
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Encoding into a String only fails if a label cannot be written, which
        // our derive-generated label sets never do.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts events accepted from a source.
    pub fn accepted(&self, source: &str, n: u64) {
        self.events_accepted
            .get_or_create(&SourceLabels {
                source: source.into(),
            })
            .inc_by(n);
    }

    /// Counts evictions for a reason.
    pub fn evicted(&self, reason: &str, n: u64) {
        if n > 0 {
            self.events_evicted
                .get_or_create(&ReasonLabels {
                    reason: reason.into(),
                })
                .inc_by(n);
        }
    }

    /// Counts events the policy dropped.
    pub fn policy_dropped(&self, reason: &str, n: u64) {
        if n > 0 {
            self.policy_dropped
                .get_or_create(&ReasonLabels {
                    reason: reason.into(),
                })
                .inc_by(n);
        }
    }

    /// Counts one OPC UA fault or recovery of `kind` for `server`.
    pub fn opcua_error(&self, server: &str, kind: &str) {
        self.opcua_errors
            .get_or_create(&DeviceErrorLabels {
                device: server.into(),
                kind: kind.into(),
            })
            .inc();
    }

    /// Counts a Modbus failure.
    pub fn modbus_error(&self, device: &str, kind: &str) {
        self.modbus_errors
            .get_or_create(&DeviceErrorLabels {
                device: device.into(),
                kind: kind.into(),
            })
            .inc();
    }
}

/// The delivery KPIs the agent measures where they happen: the left side
/// of the books (what the sources handed over), how long after its accept
/// the hub's commit of each event was confirmed, the backlog's age, how long
/// a reconnect took to drain what waited, reconnects, and when the process
/// started. Named `outpost_agent_*` (docs/metrics.md).
#[derive(Debug)]
pub struct Kpis {
    /// Events the sources handed to the outbox, before the policy and the
    /// limits.
    pub events_received: Counter,
    /// When the process started, Unix seconds.
    pub start_time: Gauge,
    /// Age of the oldest event waiting in the outbox, seconds (0: none).
    pub backlog_age: Gauge,
    /// Outbox commit to the hub's confirmed commit (`Stored` or `Ack`),
    /// per event.
    pub ingest_latency: Histogram,
    /// From a session's start to the acknowledgement of everything that
    /// waited when it started.
    pub recovery: Histogram,
    /// The last such time, seconds.
    pub last_recovery: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Connections to the site broker after the first.
    pub mqtt_reconnects: Counter,
    /// Connections to the hub after the first.
    pub uplink_reconnects: Counter,
}

/// The latency buckets, seconds: 5 ms, for a connected site, to a day, for
/// a site's backlog after a long outage (the hub's sink latency uses the
/// same).
pub const LATENCY_BUCKETS: [f64; 18] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0, 21600.0, 86400.0,
];

impl Kpis {
    fn new(registry: &mut Registry) -> Kpis {
        let k = Kpis {
            events_received: Counter::default(),
            start_time: Gauge::default(),
            backlog_age: Gauge::default(),
            ingest_latency: Histogram::new(LATENCY_BUCKETS),
            recovery: Histogram::new(LATENCY_BUCKETS),
            last_recovery: Gauge::default(),
            mqtt_reconnects: Counter::default(),
            uplink_reconnects: Counter::default(),
        };
        registry.register(
            "agent_events_received",
            "Events the sources handed to the outbox, before the policy and the limits: the left side of the books",
            k.events_received.clone(),
        );
        registry.register(
            "agent_start_time_seconds",
            "When this agent process started, Unix seconds",
            k.start_time.clone(),
        );
        registry.register(
            "agent_backlog_age_seconds",
            "Age of the oldest event waiting in the outbox by its accept time (0: none waits)",
            k.backlog_age.clone(),
        );
        registry.register(
            "agent_ingest_latency_seconds",
            "Edge accept (outbox commit) to the hub's commit, as its Stored or Ack confirms it, per event",
            k.ingest_latency.clone(),
        );
        registry.register(
            "agent_recovery_seconds",
            "From a connection to the hub to the acknowledgement of everything that waited when it opened",
            k.recovery.clone(),
        );
        registry.register(
            "agent_last_recovery_seconds",
            "The last such recovery time",
            k.last_recovery.clone(),
        );
        registry.register(
            "agent_mqtt_reconnects",
            "Connections to the site broker after the first (each follows a loss or a failed attempt)",
            k.mqtt_reconnects.clone(),
        );
        registry.register(
            "agent_uplink_reconnects",
            "Connections to the hub after the first (each follows a loss or a failed attempt)",
            k.uplink_reconnects.clone(),
        );
        k
    }
}

/// Serves the metrics until `shutdown`.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((mut stream, _)) = accepted else {
            continue;
        };
        // One request per connection, answered inline: scrapes are rare and
        // tiny, and answering inline keeps every task inside this one.
        let mut buf = [0u8; 1024];
        let read =
            tokio::time::timeout(std::time::Duration::from_secs(2), stream.read(&mut buf)).await;
        if !matches!(read, Ok(Ok(n)) if n > 0) {
            continue;
        }
        let body = metrics.render();
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(body.as_bytes()).await?;
            stream.shutdown().await
        })
        .await;
    }
}
