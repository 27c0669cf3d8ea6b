//! CloudEvents 1.0 from each of the hub's sinks, parsed by the CloudEvents
//! Python SDK (`tests/peers/cloudevents_parse.py`, pip `cloudevents`): what
//! Mosquitto, a JetStream stream and an HTTP webhook received are valid
//! events whose `id`, `source`, `subject`, `time` and `data` are the stored
//! event's. The HTTP sink is checked in its three modes: structured,
//! binary (`ce-` headers) and batched.
//!
//! The sinks are driven directly through `SinkConfig::build` and
//! `Sink::deliver`, as in the sinks' own tests; every wait has a deadline.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::service::service_fn;
use hyper::Response;
use hyper_util::rt::TokioIo;
use outpost_hub::sinks::{Sink, SinkConfig, SinkEvent};
use outpost_protocols::{
    AgentId, Event, EventBody, JsonText, Quality, Reason, Seq, StreamName, Timestamp, Value,
};
use outpost_tests::{Mosquitto, Nats};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long any one condition may take to come true.
const DEADLINE: Duration = Duration::from_secs(60);

fn event(agent: &str, seq: u64, stream: &str, value: Value, quality: Quality) -> SinkEvent {
    let mut attrs = BTreeMap::new();
    attrs.insert("unit".to_owned(), "°C".to_owned());
    SinkEvent {
        queued_at: 0,
        event: Event {
            agent_id: AgentId::parse(agent).expect("agent id"),
            seq: Seq(seq),
            body: EventBody {
                stream: StreamName::parse(stream).expect("stream"),
                // 2026-12-06T12:00:00.123456789Z plus the seq in microseconds.
                ts: Timestamp(1_796_558_400_123_456_789 + seq as i64 * 1000),
                value,
                quality,
                attrs,
            },
        },
        labels: Arc::new(BTreeMap::new()),
    }
}

/// Events of two agents with a number, a string, JSON, bytes and a bad one.
fn events() -> Vec<SinkEvent> {
    vec![
        event("gw-1", 1, "plc1/temp", Value::F64(21.5), Quality::Good),
        event(
            "gw-1",
            2,
            "plc1/state",
            Value::String("running \"ok\"".into()),
            Quality::Good,
        ),
        event(
            "gw-2",
            7,
            "site/meter",
            Value::Json(JsonText::parse(r#"{"kwh":12,"phases":[1,2,3]}"#).expect("json")),
            Quality::Good,
        ),
        event(
            "gw-2",
            8,
            "site/raw",
            Value::Bytes(vec![0, 159, 255]),
            Quality::Good,
        ),
        event(
            "gw-2",
            9,
            "plc1/pressure",
            Value::I64(-4),
            Quality::Uncertain(Reason::Other("node death".into())),
        ),
    ]
}

/// What the SDK must read back from `e`.
fn expected(e: &SinkEvent) -> serde_json::Value {
    let b = &e.event.body;
    serde_json::json!({
        "id": format!("{}:{}", e.event.agent_id, e.event.seq.0),
        "source": format!("urn:outpost:agent:{}", e.event.agent_id),
        "type": "io.outpost.event",
        "specversion": "1.0",
        "subject": b.stream.as_str(),
        "datacontenttype": "application/json",
        "data": {
            "value": b.value.to_json(),
            "quality": b.quality.to_json(),
            "attrs": b.attrs,
        },
        "time_us": b.ts.0.div_euclid(1000),
    })
}

/// One message as a far end received it: HTTP headers (none for MQTT and
/// NATS) and the body.
struct Received {
    headers: Option<BTreeMap<String, String>>,
    body: String,
}

/// Runs the SDK over `messages`; the events it read, in order.
fn sdk_parse(messages: &[Received]) -> Result<Vec<serde_json::Value>> {
    let input: Vec<serde_json::Value> = messages
        .iter()
        .map(|m| serde_json::json!({"headers": m.headers, "body": m.body}))
        .collect();
    let python = std::env::var("OUTPOST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("peers")
        .join("cloudevents_parse.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {python:?}: set OUTPOST_PYTHON to a Python 3 with the cloudevents package"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(serde_json::to_string(&input)?.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "the CloudEvents SDK refused what the sink sent ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)?
        .lines()
        .map(|l| serde_json::from_str(l).context("a line of the parser's output"))
        .collect()
}

/// The SDK's events are exactly `events`, in order (by id).
fn check(parsed: &[serde_json::Value], events: &[SinkEvent]) -> Result<()> {
    let mut parsed = parsed.to_vec();
    let mut want: Vec<serde_json::Value> = events.iter().map(expected).collect();
    let by_id = |v: &serde_json::Value| v["id"].as_str().unwrap_or_default().to_owned();
    parsed.sort_by_key(by_id);
    want.sort_by_key(by_id);
    ensure!(
        parsed.len() == want.len(),
        "{} events parsed, {} sent: {parsed:#?}",
        parsed.len(),
        want.len()
    );
    for (p, w) in parsed.iter().zip(&want) {
        ensure!(p == w, "parsed {p:#}\nexpected {w:#}");
    }
    Ok(())
}

async fn build(c: serde_json::Value) -> Result<(Arc<dyn Sink>, CancellationToken)> {
    let c: SinkConfig = serde_json::from_value(c)?;
    let stop = CancellationToken::new();
    let sink = c
        .build(Path::new("/"), stop.clone())
        .await
        .map_err(|e| anyhow::anyhow!("build: {e}"))?;
    Ok((sink, stop))
}

async fn deliver(sink: &Arc<dyn Sink>, events: &[SinkEvent]) -> Result<()> {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(until, sink.deliver(events)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) if tokio::time::Instant::now() < until => {
                eprintln!("delivery not accepted yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Err(e)) => bail!("delivery: {e}"),
            Err(_) => bail!("delivery took longer than {DEADLINE:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mqtt_sink_publishes_structured_cloudevents_the_sdk_reads() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Mosquitto::start(dir.path())?;
    let (seen, _watcher) = outpost_tests::mqtt_watcher(broker.port, "ce-watcher", DEADLINE)?;
    let (sink, stop) = build(serde_json::json!({
        "id": "cloud",
        "kind": "mqtt",
        "mqtt": {
            "broker": format!("127.0.0.1:{}", broker.port),
            "client_id": "hub-ce",
            "payload": "cloudevents",
        },
    }))
    .await?;
    let events = events();
    deliver(&sink, &events).await?;
    outpost_tests::wait_until(DEADLINE, "every event at the watcher", || {
        seen.lock()
            .map(|s| s.len() >= events.len())
            .unwrap_or(false)
    })?;
    let messages: Vec<Received> = seen
        .lock()
        .map_err(|_| anyhow::anyhow!("watcher lock"))?
        .iter()
        .map(|(_, j)| Received {
            headers: None,
            body: j.to_string(),
        })
        .collect();
    check(&sdk_parse(&messages)?, &events)?;
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jetstream_sink_stores_structured_cloudevents_the_sdk_reads() -> Result<()> {
    use async_nats::jetstream::{self, stream};
    let dir = tempfile::tempdir()?;
    let nats = Nats::start(dir.path())?;
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    js.create_stream(stream::Config {
        name: "EVENTS".into(),
        subjects: vec!["outpost.>".into()],
        ..Default::default()
    })
    .await
    .context("create stream")?;
    let (sink, stop) = build(serde_json::json!({
        "id": "js",
        "kind": "jetstream",
        "jetstream": {"url": nats.url(), "stream": "EVENTS", "payload": "cloudevents"},
    }))
    .await?;
    let events = events();
    deliver(&sink, &events).await?;
    let stored = outpost_tests::stream_messages(&js, "EVENTS", DEADLINE).await?;
    let messages: Vec<Received> = stored
        .iter()
        .map(|m| {
            Ok(Received {
                headers: None,
                body: String::from_utf8(m.payload.to_vec())?,
            })
        })
        .collect::<Result<_>>()?;
    check(&sdk_parse(&messages)?, &events)?;
    stop.cancel();
    Ok(())
}

/// A webhook that accepts everything and records each request's headers
/// and body; it stops with `stop`.
async fn webhook(stop: CancellationToken) -> Result<(String, Arc<Mutex<Vec<Received>>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let got: Arc<Mutex<Vec<Received>>> = Arc::default();
    let out = got.clone();
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                () = stop.cancelled() => return,
                r = listener.accept() => match r { Ok((t, _)) => t, Err(_) => continue },
            };
            let out = out.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let out = out.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let headers = parts
                            .headers
                            .iter()
                            .map(|(k, v)| {
                                (
                                    k.as_str().to_owned(),
                                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                )
                            })
                            .collect();
                        if let Ok(mut v) = out.lock() {
                            v.push(Received {
                                headers: Some(headers),
                                body: String::from_utf8_lossy(&body).into_owned(),
                            });
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service);
                tokio::select! {
                    () = stop.cancelled() => {}
                    _ = conn => {}
                }
            });
        }
    });
    Ok((url, got))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_sink_posts_cloudevents_in_each_mode_the_sdk_reads() -> Result<()> {
    let events = events();
    for (mode, requests, content_type) in [
        ("structured", events.len(), "application/cloudevents+json"),
        ("binary", events.len(), "application/json"),
        ("batch", 1, "application/cloudevents-batch+json"),
    ] {
        let stop = CancellationToken::new();
        let (url, got) = webhook(stop.clone()).await?;
        let (sink, sink_stop) = build(serde_json::json!({
            "id": "hook",
            "kind": "http",
            "http": {"url": url, "payload": "cloudevents", "cloudevents_mode": mode},
        }))
        .await?;
        deliver(&sink, &events).await?;
        let received = std::mem::take(&mut *got.lock().map_err(|_| anyhow::anyhow!("lock"))?);
        ensure!(
            received.len() == requests,
            "{mode}: {} requests, expected {requests}",
            received.len()
        );
        for r in &received {
            let h = r.headers.as_ref().context("headers")?;
            ensure!(
                h.get("content-type").map(String::as_str) == Some(content_type),
                "{mode}: content-type {:?}",
                h.get("content-type")
            );
            ensure!(
                (mode == "binary") == h.contains_key("ce-id"),
                "{mode}: ce- headers only in binary mode: {h:?}"
            );
        }
        check(&sdk_parse(&received)?, &events).with_context(|| format!("mode {mode}"))?;
        sink_stop.cancel();
        stop.cancel();
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_settings_that_cannot_work_name_their_key() -> Result<()> {
    let bad = |http: serde_json::Value| -> Result<String> {
        let raw: outpost_hub::sinks::RawSinkConfig = serde_json::from_value(serde_json::json!({
            "id": "hook", "kind": "http", "http": http,
        }))?;
        match raw.validate() {
            Err(e) => Ok(e.to_string()),
            Ok(_) => bail!("validated"),
        }
    };
    let m = bad(serde_json::json!({"url": "http://127.0.0.1:1/", "payload": "raw"}))?;
    ensure!(m.starts_with("http.payload:"), "{m}");
    let m = bad(serde_json::json!({"url": "http://127.0.0.1:1/", "cloudevents_mode": "binary"}))?;
    ensure!(m.starts_with("http.cloudevents_mode:"), "{m}");
    let unknown = serde_json::from_value::<outpost_hub::sinks::RawSinkConfig>(serde_json::json!({
        "id": "hook", "kind": "http",
        "http": {"url": "http://127.0.0.1:1/", "payload": "cloudevents", "cloudevents_mode": "chunked"},
    }));
    ensure!(unknown.is_err(), "an unknown mode is refused");
    Ok(())
}
