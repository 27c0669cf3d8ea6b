//! What the command-line verbs print: for people by default, one JSON document
//! with `--json` for scripts.

use std::fmt::Write as _;

use outpost_protocols::modbus::Table;
use outpost_protocols::{Event, Quality};

use crate::config::opcua::Identity;
use crate::config::{AgentConfig, PayloadFormat, Transport};
use crate::outbox::OutboxStats;

fn table_name(t: Table) -> &'static str {
    match t {
        Table::Coil => "coil",
        Table::Discrete => "discrete",
        Table::Holding => "holding",
        Table::Input => "input",
    }
}

/// `check`: what would run, for people.
pub fn check_text(c: &AgentConfig) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "config {}: ok", c.source.display());
    let _ = writeln!(s, "agent {} labels {:?}", c.agent_id, c.labels);
    let _ = writeln!(
        s,
        "outbox {} synchronous={:?} max_bytes={} max_age={} eviction={:?} commit_batch={} commit_window={:?}",
        c.outbox.path.display(),
        c.outbox.synchronous,
        c.outbox.max_bytes,
        humantime::format_duration(c.outbox.max_age),
        c.outbox.eviction,
        c.outbox.commit_batch,
        c.outbox.commit_window
    );
    match &c.uplink {
        Some(u) => {
            let _ = writeln!(
                s,
                "uplink {} (ca {}, cert {})",
                u.hub,
                u.ca.display(),
                u.cert.display()
            );
        }
        None => {
            let _ = writeln!(s, "uplink none: events stay in the outbox");
        }
    }
    match &c.mqtt {
        Some(m) => {
            let _ = writeln!(
                s,
                "mqtt {}:{} client_id={} tls={} clean_session={} max_payload={}",
                m.host,
                m.port,
                m.client_id,
                m.tls.is_some(),
                m.clean_session,
                m.max_payload
            );
            for sub in &m.subscriptions {
                let _ = writeln!(s, "  subscribe {} qos {}", sub.filter, sub.qos);
            }
            for sp in &m.sparkplug {
                let _ = writeln!(
                    s,
                    "  sparkplug {} qos {} rebirth {} every {:?}",
                    sp.filter, sp.qos, sp.rebirth, sp.rebirth_interval
                );
            }
        }
        None => {
            let _ = writeln!(s, "mqtt none");
        }
    }
    for d in &c.devices {
        let _ = writeln!(
            s,
            "device {} {} unit {} poll {:?} timeout {:?}: {} tags in {} reads per cycle",
            d.name,
            d.transport,
            d.unit,
            d.poll,
            d.timeout,
            d.tags.len(),
            d.plan.reads.len()
        );
        for r in &d.plan.reads {
            let _ = writeln!(
                s,
                "  read {} {}..{} ({} {}) for {} tags",
                table_name(r.table),
                r.start.0,
                u32::from(r.start.0) + u32::from(r.count),
                r.count,
                if r.table.is_bits() {
                    "bits"
                } else {
                    "registers"
                },
                r.tags.len()
            );
        }
    }
    for b in &c.publish_bridges {
        let _ = writeln!(
            s,
            "bridge modbus:{} -> mqtt:{} format={} qos={} retain={} on={}",
            b.from,
            b.to.as_str(),
            if b.format == PayloadFormat::Json {
                "json"
            } else {
                "raw"
            },
            b.qos,
            b.retain,
            if b.on_change { "change" } else { "poll" }
        );
    }
    for b in &c.write_bridges {
        let d = &c.devices[b.device];
        let _ = writeln!(
            s,
            "bridge mqtt:{} -> modbus:{}/{} (write)",
            b.from, d.name, d.tags[b.tag].name
        );
    }
    for o in &c.opcua_servers {
        let _ = writeln!(
            s,
            "opcua {} {} security {}/{} identity {} publishing {:?}: {} nodes in {} subscriptions",
            o.name,
            o.endpoint,
            o.security_policy.name(),
            o.security_mode.name(),
            identity_name(&o.identity),
            o.publishing_interval,
            o.nodes.len(),
            o.subscriptions()
        );
        for n in &o.nodes {
            let sampling = match n.sampling_interval {
                Some(d) => format!("{d:?}"),
                None => "publishing".into(),
            };
            let deadband = match n.deadband {
                Some(d) => format!(" deadband {d}"),
                None => String::new(),
            };
            let _ = writeln!(
                s,
                "  subscribe {} -> {} sampling {sampling} queue {}{deadband}",
                n.node_id, n.stream, n.queue_size
            );
        }
    }
    s
}

fn identity_name(i: &Identity) -> &'static str {
    match i {
        Identity::Anonymous => "anonymous",
        Identity::UserPassword { .. } => "user",
        Identity::Certificate { .. } => "certificate",
    }
}

/// `check --json`.
pub fn check_json(c: &AgentConfig) -> serde_json::Value {
    let devices: Vec<_> = c
        .devices
        .iter()
        .map(|d| {
            let transport = match &d.transport {
                Transport::Tcp { address } => serde_json::json!({"kind": "tcp", "address": address}),
                Transport::Rtu { port, baud, parity, data_bits, stop_bits } => serde_json::json!({
                    "kind": "rtu", "port": port, "baud": baud, "parity": parity,
                    "data_bits": data_bits, "stop_bits": stop_bits
                }),
            };
            serde_json::json!({
                "name": d.name,
                "transport": transport,
                "unit": d.unit,
                "poll_ms": d.poll.as_millis() as u64,
                "timeout_ms": d.timeout.as_millis() as u64,
                "tags": d.tags.len(),
                "reads_per_cycle": d.plan.reads.len(),
                "reads": d.plan.reads.iter().map(|r| serde_json::json!({
                    "table": table_name(r.table), "start": r.start.0, "count": r.count, "tags": r.tags.len()
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({
        "config": c.source,
        "agent_id": c.agent_id.as_str(),
        "labels": c.labels,
        "outbox": {
            "path": c.outbox.path,
            "synchronous": format!("{:?}", c.outbox.synchronous).to_lowercase(),
            "max_bytes": c.outbox.max_bytes,
            "max_age_s": c.outbox.max_age.as_secs(),
        },
        "uplink": c.uplink.as_ref().map(|u| u.hub.clone()),
        "mqtt": c.mqtt.as_ref().map(|m| serde_json::json!({
            "broker": format!("{}:{}", m.host, m.port),
            "client_id": m.client_id,
            "subscriptions": m.subscriptions.iter().map(|s| serde_json::json!({"filter": s.filter.as_str(), "qos": s.qos})).collect::<Vec<_>>(),
            "sparkplug": m.sparkplug.iter().map(|s| serde_json::json!({"filter": s.filter.as_str(), "qos": s.qos, "rebirth": s.rebirth, "rebirth_interval_ms": s.rebirth_interval.as_millis() as u64})).collect::<Vec<_>>(),
        })),
        "devices": devices,
        "bridges": {
            "publish": c.publish_bridges.len(),
            "write": c.write_bridges.len(),
        },
        "opcua": c.opcua_servers.iter().map(|o| serde_json::json!({
            "name": o.name,
            "endpoint": o.endpoint,
            "security_policy": o.security_policy.name(),
            "security_mode": o.security_mode.name(),
            "identity": identity_name(&o.identity),
            "publishing_interval_ms": o.publishing_interval.as_millis() as u64,
            "subscriptions": o.subscriptions(),
            "nodes": o.nodes.iter().map(|n| serde_json::json!({
                "node_id": n.node_id,
                "stream": n.stream.as_str(),
                "sampling_interval_ms": n.sampling_interval.map(|d| d.as_millis() as u64),
                "deadband": n.deadband,
                "queue_size": n.queue_size,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "warnings": c.warnings,
    })
}

/// `outbox stats`, for people.
pub fn stats_text(s: &OutboxStats) -> String {
    let seq = |q: Option<outpost_protocols::Seq>| {
        q.map(|q| q.0.to_string()).unwrap_or_else(|| "-".into())
    };
    let mut out = String::new();
    let _ = writeln!(out, "outbox       {}", s.path.display());
    let _ = writeln!(out, "events       {}", s.events);
    let _ = writeln!(out, "bytes        {}", s.bytes);
    let _ = writeln!(
        out,
        "seq range    {}..={}",
        seq(s.first_seq),
        seq(s.last_seq)
    );
    let _ = writeln!(out, "next seq     {}", s.next_seq.0);
    let _ = writeln!(out, "acked seq    {}", s.acked_seq.0);
    let _ = writeln!(out, "accepted     {}", s.accepted_total);
    let _ = writeln!(out, "transactions {}", s.transactions_total);
    let _ = writeln!(out, "qos2 pending {}", s.qos2_pending);
    let _ = writeln!(out, "synchronous  {:?}", s.synchronous);
    if s.evicted.is_empty() {
        let _ = writeln!(out, "evicted      0");
    }
    for (reason, n) in &s.evicted {
        let _ = writeln!(out, "evicted      {n} ({reason})");
    }
    out
}

/// One event, for people: `seq ts stream value [quality]`.
pub fn event_text(e: &Event) -> String {
    let q = match &e.body.quality {
        Quality::Good => String::new(),
        other => format!(" [{}]", other.to_json()["status"].as_str().unwrap_or("?")),
    };
    let reason = match &e.body.quality {
        Quality::Bad(r) | Quality::Uncertain(r) => format!(" {r}"),
        _ => String::new(),
    };
    format!(
        "{:>10} {} {} = {}{q}{reason}",
        e.seq.0,
        e.body.ts.0,
        e.body.stream,
        e.body.value.to_json()
    )
}
