//! Local bridges from Modbus tags to MQTT topics.
//!
//! Publishing is live data for the site, not the durable path: the outbox
//! already holds every sample for the hub. So the publisher uses rumqttc's
//! client as it is (its trap concerns only inbound QoS 2), on a connection of
//! its own (`<client_id>-bridge`, clean session), and a publish that cannot be
//! queued while the broker is away is counted (`outpost_bridge_dropped_total`)
//! and dropped rather than blocking
//! polling. Writes in the other direction (MQTT → Modbus) arrive through the
//! subscriber session and are performed by the device's own task.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use outpost_protocols::{EventBody, Quality, StreamName, Value};
use rumqttc::{AsyncClient, MqttOptions, QoS, TlsConfiguration, Transport};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::clock;
use crate::config::{MqttSettings, PayloadFormat, PublishBridge};
use crate::metrics::Metrics;

/// Publishes bridged Modbus samples to the site broker.
pub struct Publisher {
    settings: MqttSettings,
    bridges: Vec<PublishBridge>,
    samples: mpsc::Receiver<Vec<EventBody>>,
    metrics: Arc<Metrics>,
}

/// Renders a bridged sample's payload.
pub fn render(format: PayloadFormat, body: &EventBody) -> Vec<u8> {
    match format {
        PayloadFormat::Json => serde_json::json!({
            "value": body.value.to_json(),
            "quality": body.quality.to_json(),
            "ts": body.ts.0,
        })
        .to_string()
        .into_bytes(),
        PayloadFormat::Raw => match &body.value {
            Value::Bytes(b) => b.clone(),
            Value::String(s) => s.clone().into_bytes(),
            other => other.to_json().to_string().into_bytes(),
        },
    }
}

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// Options for a publishing connection of its own to the site broker
/// (clean session), with the broker's login and TLS.
pub fn client_options(
    s: &MqttSettings,
    client_id: String,
) -> Result<MqttOptions, outpost_tls::TlsError> {
    let mut o = MqttOptions::new(client_id, s.host.clone(), s.port);
    o.set_keep_alive(s.keep_alive);
    o.set_clean_session(true);
    o.set_inflight(s.max_inflight);
    o.set_max_packet_size(s.max_payload + 65_536, s.max_payload + 65_536);
    if let Some((u, p)) = &s.login {
        o.set_credentials(u.clone(), p.clone());
    }
    if let Some(tls) = &s.tls {
        let client = match (&tls.cert, &tls.key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            _ => None,
        };
        let config = outpost_tls::client_config(outpost_tls::ClientFiles {
            ca: &tls.ca,
            client,
            server_name: tls.server_name.as_deref(),
        })?;
        o.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(config))));
    }
    Ok(o)
}

impl Publisher {
    /// A publisher for these bridges.
    pub fn new(
        settings: MqttSettings,
        bridges: Vec<PublishBridge>,
        samples: mpsc::Receiver<Vec<EventBody>>,
        metrics: Arc<Metrics>,
    ) -> Publisher {
        Publisher {
            settings,
            bridges,
            samples,
            metrics,
        }
    }

    fn options(&self) -> Result<MqttOptions, outpost_tls::TlsError> {
        client_options(
            &self.settings,
            format!("{}-bridge", self.settings.client_id),
        )
    }

    /// Publishes until `shutdown`.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let opts = match self.options() {
            Ok(o) => o,
            Err(e) => {
                warn!(error = %e, "Bridge publisher cannot start.");
                return;
            }
        };
        let (client, mut eventloop) = AsyncClient::new(opts, 4096);
        let mut last: HashMap<(usize, StreamName), (Value, Quality)> = HashMap::new();
        let mut connected = false;
        let mut last_warning: Option<std::time::Instant> = None;
        info!(bridges = self.bridges.len(), "Bridge publisher started.");
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                ev = eventloop.poll() => match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        connected = true;
                        debug!("Bridge publisher connected.");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // Losing the broker is said at once; failing to reach
                        // it (a wrong certificate, say) once a minute.
                        let quiet = last_warning.is_some_and(|t| clock::elapsed(t) < Duration::from_secs(60));
                        if connected || !quiet {
                            warn!(error = %e, "Bridge publisher cannot reach the broker; retrying.");
                            last_warning = Some(clock::now());
                        }
                        connected = false;
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                },
                batch = self.samples.recv() => {
                    let Some(batch) = batch else { break };
                    for body in &batch {
                        for (i, b) in self.bridges.iter().enumerate() {
                            if !b.from.matches(body.stream.as_str()) {
                                continue;
                            }
                            if b.on_change {
                                let key = (i, body.stream.clone());
                                let now = (body.value.clone(), body.quality.clone());
                                if last.get(&key) == Some(&now) {
                                    continue;
                                }
                                last.insert(key, now);
                            }
                            let topic = b.to.render(body.stream.as_str());
                            let payload = render(b.format, body);
                            match client.try_publish(topic, qos(b.qos), b.retain, payload) {
                                Ok(()) => {
                                    self.metrics.bridge_published.inc();
                                }
                                Err(e) => {
                                    self.metrics.bridge_dropped.inc();
                                    debug!(error = %e, "Bridge publish not queued.");
                                }
                            }
                        }
                    }
                }
            }
        }
        let _ = client.try_disconnect();
        // Give the event loop a moment to send what is queued and DISCONNECT.
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while eventloop.poll().await.is_ok() {}
        })
        .await;
        info!("Bridge publisher stopped.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocols::{Reason, Timestamp};

    fn body(value: Value, quality: Quality) -> EventBody {
        EventBody {
            stream: StreamName::parse("plc1/t").expect("valid"),
            ts: Timestamp(5),
            value,
            quality,
            attrs: Default::default(),
        }
    }

    #[test]
    fn json_payloads_carry_value_quality_and_time() {
        let p = render(PayloadFormat::Json, &body(Value::F64(1.5), Quality::Good));
        let j: serde_json::Value = serde_json::from_slice(&p).expect("json");
        assert_eq!(j["value"], 1.5);
        assert_eq!(j["quality"]["status"], "good");
        assert_eq!(j["ts"], 5);
        let p = render(
            PayloadFormat::Json,
            &body(Value::I64(1), Quality::Bad(Reason::Timeout)),
        );
        let j: serde_json::Value = serde_json::from_slice(&p).expect("json");
        assert_eq!(j["quality"]["reason"], "timeout");
    }

    #[test]
    fn raw_payloads_are_the_value_alone() {
        assert_eq!(
            render(PayloadFormat::Raw, &body(Value::I64(-7), Quality::Good)),
            b"-7"
        );
        assert_eq!(
            render(PayloadFormat::Raw, &body(Value::Bool(true), Quality::Good)),
            b"true"
        );
        assert_eq!(
            render(
                PayloadFormat::Raw,
                &body(Value::String("ok".into()), Quality::Good)
            ),
            b"ok"
        );
    }
}
