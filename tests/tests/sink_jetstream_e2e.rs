//! The NATS JetStream sink against a real nats-server (JetStream, file
//! store in the test's temp dir): built with `SinkConfig::build` and
//! driven through `Sink::deliver` with real `SinkEvent`s. The streams are made
//! by the test (the hub creates none) and read back with an independent
//! async-nats consumer.
//!
//! Every wait polls a condition until a deadline; nothing sleeps for a fixed
//! time to let something happen. The server is paused with SIGSTOP to make a
//! far end that takes publishes and never acknowledges them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use async_nats::jetstream::{self, stream};
use outpost_hub::sinks::{Sink, SinkConfig, SinkError, SinkEvent};
use outpost_protocols::{AgentId, Event, EventBody, Quality, Seq, StreamName, Timestamp, Value};
use outpost_tests::{free_port, Nats};
use rcgen::ExtendedKeyUsagePurpose;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// How long any one condition may take to come true.
const DEADLINE: Duration = Duration::from_secs(60);
/// The sinks' `timeout` in these tests.
const TIMEOUT: Duration = Duration::from_secs(2);
/// What a Transient answer may take beyond `timeout` on a shared 2-core
/// machine.
const SLACK: Duration = Duration::from_secs(3);

fn event(agent: &str, seq: u64, stream: &str, value: Value) -> SinkEvent {
    let mut labels = BTreeMap::new();
    labels.insert("site".to_owned(), "lyon".to_owned());
    SinkEvent {
        queued_at: 0,
        event: Event {
            agent_id: AgentId::parse(agent).expect("agent id"),
            seq: Seq(seq),
            body: EventBody {
                stream: StreamName::parse(stream).expect("stream name"),
                ts: Timestamp(1_700_000_000_000_000_000 + seq as i64),
                value,
                quality: Quality::Good,
                attrs: BTreeMap::new(),
            },
        },
        labels: Arc::new(labels),
    }
}

/// `n` events of agent `gw-1` from `first` on, numbers on `plc1/temp`.
fn batch(first: u64, n: u64) -> Vec<SinkEvent> {
    (first..first + n)
        .map(|s| event("gw-1", s, "plc1/temp", Value::F64(s as f64 / 2.0)))
        .collect()
}

/// A `[[sinks]]` entry of kind jetstream with `table` as `[sinks.jetstream]`.
fn config(table: serde_json::Value) -> SinkConfig {
    serde_json::from_value(json!({ "id": "js", "kind": "jetstream", "jetstream": table }))
        .expect("sink config")
}

fn table(url: &str, stream: &str) -> serde_json::Value {
    json!({ "url": url, "stream": stream, "timeout": format!("{}ms", TIMEOUT.as_millis()) })
}

async fn build(c: &SinkConfig, base: &Path, stop: &CancellationToken) -> Arc<dyn Sink> {
    match c.build(base, stop.clone()).await {
        Ok(s) => s,
        Err(e) => panic!("build: {e}"),
    }
}

/// Delivers until it succeeds (the sink connects in the background).
async fn deliver_eventually(sink: &dyn Sink, events: &[SinkEvent]) -> Result<()> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match sink.deliver(events).await {
            Ok(()) => return Ok(()),
            Err(SinkError::Transient(m)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = m;
            }
            Err(e) => bail!("delivery never succeeded: {e}"),
        }
    }
}

/// Delivers once and expects Transient within the timeout (and slack);
/// returns its message.
async fn expect_transient(sink: &dyn Sink, events: &[SinkEvent]) -> Result<String> {
    let t0 = Instant::now();
    let r = tokio::time::timeout(TIMEOUT + SLACK, sink.deliver(events))
        .await
        .context("deliver hung past its timeout")?;
    let took = t0.elapsed();
    match r {
        Err(SinkError::Transient(m)) => {
            ensure!(took <= TIMEOUT + SLACK, "Transient after {took:?}");
            Ok(m)
        }
        other => bail!("expected Transient, got {other:?}"),
    }
}

/// A plain client of the server, for the test's own streams and reads.
async fn client(url: &str) -> Result<jetstream::Context> {
    let c = async_nats::connect(url).await?;
    Ok(jetstream::new(c))
}

async fn create_stream(
    js: &jetstream::Context,
    name: &str,
    subjects: &[&str],
    duplicate_window: Option<Duration>,
) -> Result<()> {
    let mut config = stream::Config {
        name: name.to_owned(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    if let Some(w) = duplicate_window {
        config.duplicate_window = w;
    }
    js.create_stream(config)
        .await
        .with_context(|| format!("create stream {name}"))?;
    Ok(())
}

async fn read_all(js: &jetstream::Context, name: &str) -> Result<Vec<jetstream::Message>> {
    outpost_tests::stream_messages(js, name, DEADLINE).await
}

/// How many messages stream `name` holds; asks again while the request
/// fails (a server just restarted or resumed may not answer at once).
async fn count(js: &jetstream::Context, name: &str) -> Result<u64> {
    outpost_tests::stream_len(js, name, DEADLINE).await
}

use outpost_tests::msg_id;

fn signal(nats: &Nats, sig: &str) -> Result<()> {
    let pid = nats.proc.child.id().to_string();
    let ok = Command::new("kill").args([sig, &pid]).status()?.success();
    ensure!(ok, "kill {sig} {pid} failed");
    // A signal is sent before it takes effect: wait until the process is
    // seen stopped (state `T`) or running again.
    let stopped = sig == "-STOP";
    outpost_tests::wait_until(DEADLINE, &format!("nats-server to take {sig}"), || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state follows the command name, which is in parentheses.
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next());
        (state == Some("T")) == stopped
    })?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_land_in_the_stream_once_each_with_their_subject_id_and_payload() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let monitor = free_port()?;
    let nats = Nats::start_with(
        dir.path(),
        free_port()?,
        &format!("http: \"127.0.0.1:{monitor}\""),
    )?;
    let js = client(&nats.url()).await?;
    create_stream(&js, "EVENTS", &["outpost.>"], None).await?;
    create_stream(&js, "RAW", &["raw.>"], None).await?;
    let stop = CancellationToken::new();

    let events = vec![
        event("gw-1", 1, "plc1/temp", Value::F64(21.5)),
        event("gw-1", 2, "a b//c*d", Value::String("hello".into())),
        event("gw.2", 1, "plc1/temp", Value::Bytes(vec![0, 159, 255])),
        event(
            "gw-1",
            3,
            "doc",
            Value::Json(outpost_protocols::JsonText::parse("{\"k\":[1,2]}").expect("json")),
        ),
    ];
    let json_sink = build(&config(table(&nats.url(), "EVENTS")), dir.path(), &stop).await;
    deliver_eventually(json_sink.as_ref(), &events).await?;

    let stored = read_all(&js, "EVENTS").await?;
    let subjects: Vec<&str> = stored.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "outpost.gw-1.plc1.temp",
            "outpost.gw-1.a_b._.c_d",
            "outpost.gw_2.plc1.temp",
            "outpost.gw-1.doc"
        ]
    );
    for (m, e) in stored.iter().zip(&events) {
        let id = format!("{}:{}", e.event.agent_id, e.event.seq.0);
        assert_eq!(msg_id(m).as_deref(), Some(id.as_str()), "{:?}", m.headers);
        let expected_stream = m
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_EXPECTED_STREAM))
            .map(|v| v.as_str());
        assert_eq!(expected_stream, Some("EVENTS"));
        let got: serde_json::Value = serde_json::from_slice(&m.payload)?;
        assert_eq!(got, e.event.to_json(), "payload of {id}");
    }

    // `raw`, with a template using a label and the seq.
    let mut t = table(&nats.url(), "RAW");
    t["subject"] = json!("raw.{label.site}.{agent_id}.{stream}.{seq}");
    t["payload"] = json!("raw");
    let raw_sink = build(&config(t), dir.path(), &stop).await;
    deliver_eventually(raw_sink.as_ref(), &events).await?;
    let stored = read_all(&js, "RAW").await?;
    let got: Vec<(&str, &[u8])> = stored
        .iter()
        .map(|m| (m.subject.as_str(), m.payload.as_ref()))
        .collect();
    assert_eq!(
        got,
        [
            ("raw.lyon.gw-1.plc1.temp.1", b"21.5".as_slice()),
            ("raw.lyon.gw-1.a_b._.c_d.2", b"hello".as_slice()),
            ("raw.lyon.gw_2.plc1.temp.1", [0u8, 159, 255].as_slice()),
            ("raw.lyon.gw-1.doc.3", b"{\"k\":[1,2]}".as_slice()),
        ]
    );

    // Once `stop` is cancelled, deliveries say so rather than hang, and
    // both sinks' connections close (the server's monitor counts only the
    // test's own client), though the sinks themselves are still alive.
    assert_eq!(connections(monitor)?, 3);
    stop.cancel();
    let m = expect_transient(json_sink.as_ref(), &events).await?;
    assert!(m.contains("stopped"), "{m}");
    outpost_tests::wait_until(DEADLINE, "the sinks' connections to close", || {
        connections(monitor).ok() == Some(1)
    })?;
    drop((json_sink, raw_sink));
    Ok(())
}

/// The number of client connections nats-server's monitor (`/connz`) counts.
fn connections(monitor: u16) -> Result<u64> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", monitor))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /connz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let body = answer.split("\r\n\r\n").nth(1).context("no HTTP body")?;
    let v: serde_json::Value = serde_json::from_str(body)?;
    v["num_connections"].as_u64().context("no num_connections")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_delivered_again_is_stored_once_within_the_window_and_after_a_restart_past_it(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let nats = Nats::start(dir.path())?;
    let js = client(&nats.url()).await?;
    let window = Duration::from_secs(1);
    create_stream(&js, "EVENTS", &["outpost.>"], Some(window)).await?;
    let stop = CancellationToken::new();
    let sink = build(&config(table(&nats.url(), "EVENTS")), dir.path(), &stop).await;

    let events = batch(1, 50);
    deliver_eventually(sink.as_ref(), &events).await?;
    // The next deliveries follow the first at once: well within the window.
    // A new sink checks what the stream holds for its first few (as many
    // batches as a runner may have delivered and not recorded when its hub
    // stopped: those under way, and those waiting for their record); these
    // make up the few.
    let checked =
        outpost_hub::sinks::runner::unrecorded_max(outpost_hub::sinks::jetstream::OVERLAP);
    for _ in 1..checked {
        sink.deliver(&events).await?;
    }
    assert_eq!(count(&js, "EVENTS").await?, 50);
    let ids: BTreeSet<String> = read_all(&js, "EVENTS")
        .await?
        .iter()
        .filter_map(msg_id)
        .collect();
    assert_eq!(ids.len(), 50);

    // Past the window the stream no longer knows the ids. A restarted hub
    // (a new sink) delivering the batch again stores none of it: a sink
    // checks what the stream holds on the batch's subjects first.
    tokio::time::sleep(window + Duration::from_millis(500)).await;
    let restarted = build(&config(table(&nats.url(), "EVENTS")), dir.path(), &stop).await;
    deliver_eventually(restarted.as_ref(), &events).await?;
    assert_eq!(count(&js, "EVENTS").await?, 50);
    // What the check is for: a sink past its first deliveries whose last
    // delivery succeeded does not check (the runner never repeats a
    // delivered batch), and its repeat past the window is stored again.
    sink.deliver(&events[..1]).await?;
    assert_eq!(count(&js, "EVENTS").await?, 51);
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_gives_transient_within_the_timeout_and_delivery_resumes_after_restart(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut nats = Nats::start(dir.path())?;
    let port = nats.port;
    {
        let js = client(&nats.url()).await?;
        create_stream(&js, "EVENTS", &["outpost.>"], None).await?;
    }
    let stop = CancellationToken::new();
    let sink = build(&config(table(&nats.url(), "EVENTS")), dir.path(), &stop).await;
    let first = batch(1, 20);
    deliver_eventually(sink.as_ref(), &first).await?;

    // Paused: the server takes the publishes and acknowledges none of them.
    let second = batch(21, 20);
    signal(&nats, "-STOP")?;
    let m = expect_transient(sink.as_ref(), &second)
        .await
        .context("paused")?;
    assert!(m.contains("acknowledge"), "{m}");

    // Killed while a delivery waits for its acks.
    let pending = {
        let sink = sink.clone();
        let second = second.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            (sink.deliver(&second).await, t0.elapsed())
        })
    };
    nats.proc.kill9();
    let (r, took) = tokio::time::timeout(TIMEOUT + SLACK, pending)
        .await
        .context("deliver hung past its timeout")??;
    assert!(matches!(r, Err(SinkError::Transient(_))), "{r:?}");
    assert!(took <= TIMEOUT + SLACK, "{took:?}");
    // Down: Transient until it is back.
    let m = expect_transient(sink.as_ref(), &second)
        .await
        .context("killed")?;
    assert!(m.contains(&format!("127.0.0.1:{port}")), "{m}");

    // Back on the same port with the same store: the sink reconnects by
    // itself and the retried batch is stored.
    let nats = Nats::start_on(dir.path(), port)?;
    deliver_eventually(sink.as_ref(), &second).await?;
    let js = client(&nats.url()).await?;
    let ids: Vec<String> = read_all(&js, "EVENTS")
        .await?
        .iter()
        .filter_map(msg_id)
        .collect();
    let expected: Vec<String> = first
        .iter()
        .chain(&second)
        .map(|e| format!("gw-1:{}", e.event.seq.0))
        .collect();
    assert_eq!(ids, expected);
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_sent_again_within_the_window_is_not_checked_so_a_hole_below_a_later_seq_is_filled(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut nats = Nats::start(dir.path())?;
    let port = nats.port;
    {
        let js = client(&nats.url()).await?;
        create_stream(
            &js,
            "EVENTS",
            &["outpost.>"],
            Some(Duration::from_secs(120)),
        )
        .await?;
    }
    let stop = CancellationToken::new();
    let sink = build(&config(table(&nats.url(), "EVENTS")), dir.path(), &stop).await;
    // Past the deliveries a new sink checks whatever happens.
    let first = batch(1, 1);
    let checked =
        outpost_hub::sinks::runner::unrecorded_max(outpost_hub::sinks::jetstream::OVERLAP);
    for _ in 0..checked {
        deliver_eventually(sink.as_ref(), &first).await?;
    }
    // A delivery fails: nothing of it reaches a server.
    nats.proc.kill9();
    let held = batch(10, 20);
    expect_transient(sink.as_ref(), &held).await?;
    let nats = Nats::start_on(dir.path(), port)?;
    let js = client(&nats.url()).await?;
    // Meanwhile a later seq of the same agent landed on the same subject,
    // as when a cluster refused a batch's middle and stored its end: the
    // stream holds no prefix of what was sent.
    // Published until acknowledged: the server just restarted may not
    // answer at once, and a repeat is dropped by its id.
    outpost_tests::retry_until(DEADLINE, "publishing gw-1:100", || async {
        js.send_publish(
            "outpost.gw-1.plc1.temp",
            jetstream::message::PublishMessage::build()
                .payload("{}".into())
                .message_id("gw-1:100"),
        )
        .await?
        .await?;
        Ok(())
    })
    .await?;
    // Sent again well within the window: no check, every event stored (the
    // stream would drop any repeat by its id). With the check, the events
    // below seq 100 would have been skipped and never stored.
    deliver_eventually(sink.as_ref(), &held).await?;
    let ids: BTreeSet<String> = read_all(&js, "EVENTS")
        .await?
        .iter()
        .filter_map(msg_id)
        .collect();
    let want: BTreeSet<String> = std::iter::once("gw-1:1".to_owned())
        .chain(held.iter().map(|e| format!("gw-1:{}", e.event.seq.0)))
        .chain(std::iter::once("gw-1:100".to_owned()))
        .collect();
    assert_eq!(ids, want);
    assert_eq!(count(&js, "EVENTS").await?, 22);
    stop.cancel();
    Ok(())
}

/// A sink on a stream of duplicate window `window` that delivered
/// `batch(1, first)`, then failed to deliver `events` (the next 30) to the
/// paused server, which runs again.
struct Paused {
    js: jetstream::Context,
    stop: CancellationToken,
    sink: Arc<dyn Sink>,
    events: Vec<SinkEvent>,
    _nats: Nats,
    _dir: tempfile::TempDir,
}

async fn paused_after(first: u64, window: Option<Duration>) -> Result<Paused> {
    let dir = tempfile::tempdir()?;
    let nats = Nats::start(dir.path())?;
    let js = client(&nats.url()).await?;
    create_stream(&js, "EVENTS", &["outpost.>"], window).await?;
    let stop = CancellationToken::new();
    let sink = build(&config(table(&nats.url(), "EVENTS")), dir.path(), &stop).await;
    deliver_eventually(sink.as_ref(), &batch(1, first)).await?;
    let events = batch(first + 1, 30);
    signal(&nats, "-STOP")?;
    expect_transient(sink.as_ref(), &events).await?;
    signal(&nats, "-CONT")?;
    Ok(Paused {
        js,
        stop,
        sink,
        events,
        _nats: nats,
        _dir: dir,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_is_transient_and_the_late_stores_are_deduplicated() -> Result<()> {
    let p = paused_after(1, None).await?;
    // The server stores what it had read while paused; the retry is then a
    // duplicate, acknowledged as stored, and nothing is stored twice.
    deliver_eventually(p.sink.as_ref(), &p.events).await?;
    assert_eq!(count(&p.js, "EVENTS").await?, 31);
    p.stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_at_start_makes_the_sink_ask_the_stream_again_so_late_stores_are_not_repeated_past_the_window(
) -> Result<()> {
    // A new sink's first delivery asks what the stream holds on the
    // subject (nothing yet); the next ones at start take that answer
    // rather than ask again, so the paused server does not stall a
    // question: the publishes go out and their acks time out.
    let window = Duration::from_secs(1);
    let p = paused_after(10, Some(window)).await?;
    // The server stores what it had read while paused. Past its window it
    // no longer knows the ids: only asking again (the failure dropped the
    // old answer) keeps the retry from storing the 30 twice.
    let late = tokio::time::timeout(DEADLINE, async {
        while count(&p.js, "EVENTS").await? < 40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::Ok(())
    })
    .await;
    ensure!(
        matches!(late, Ok(Ok(()))),
        "the paused server never stored the publishes it had read"
    );
    tokio::time::sleep(window + Duration::from_millis(500)).await;
    deliver_eventually(p.sink.as_ref(), &p.events).await?;
    assert_eq!(count(&p.js, "EVENTS").await?, 40);
    p.stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_at_build_is_no_error_and_deliveries_are_transient_until_it_is_up(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let url = format!("nats://127.0.0.1:{port}");
    let stop = CancellationToken::new();
    let sink = build(&config(table(&url, "EVENTS")), dir.path(), &stop).await;
    let events = batch(1, 5);
    for _ in 0..2 {
        let m = expect_transient(sink.as_ref(), &events).await?;
        assert!(m.contains(&url), "{m}");
    }

    let nats = Nats::start_on(dir.path(), port)?;
    // Up, but no stream captures the subject yet: still Transient, and the
    // message says what is missing.
    let deadline = Instant::now() + DEADLINE;
    let m = loop {
        let m = expect_transient(sink.as_ref(), &events).await?;
        if m.contains("no stream") || Instant::now() > deadline {
            break m;
        }
    };
    assert!(m.contains("no stream") && m.contains("EVENTS"), "{m}");

    let js = client(&nats.url()).await?;
    create_stream(&js, "EVENTS", &["outpost.>"], None).await?;
    deliver_eventually(sink.as_ref(), &events).await?;
    assert_eq!(count(&js, "EVENTS").await?, 5);
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_captured_by_another_stream_is_transient_until_the_streams_are_fixed(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let nats = Nats::start(dir.path())?;
    let js = client(&nats.url()).await?;
    create_stream(&js, "OTHER", &["outpost.>"], None).await?;
    let stop = CancellationToken::new();
    let sink = build(&config(table(&nats.url(), "EVENTS")), dir.path(), &stop).await;
    let events = batch(1, 5);

    let deadline = Instant::now() + DEADLINE;
    let m = loop {
        let m = expect_transient(sink.as_ref(), &events).await?;
        if !m.contains("not connected") || Instant::now() > deadline {
            break m;
        }
    };
    assert!(m.contains("another stream") && m.contains("EVENTS"), "{m}");
    // Refused by the server, not stored in the wrong stream.
    assert_eq!(count(&js, "OTHER").await?, 0);

    // The operator fixes the streams; the same sink then delivers.
    js.delete_stream("OTHER").await?;
    create_stream(&js, "EVENTS", &["outpost.>"], None).await?;
    deliver_eventually(sink.as_ref(), &events).await?;
    assert_eq!(count(&js, "EVENTS").await?, 5);
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_larger_than_the_server_takes_is_rejected_and_the_others_are_stored() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let nats = Nats::start(dir.path())?;
    let js = client(&nats.url()).await?;
    create_stream(&js, "EVENTS", &["outpost.>"], None).await?;
    let stop = CancellationToken::new();
    let mut t = table(&nats.url(), "EVENTS");
    t["payload"] = json!("raw");
    let sink = build(&config(t), dir.path(), &stop).await;
    deliver_eventually(sink.as_ref(), &batch(1, 1)).await?;

    // nats-server's default max_payload is 1 MiB.
    let events = vec![
        event("gw-1", 2, "s", Value::I64(2)),
        event("gw-1", 3, "s", Value::Bytes(vec![7; 2 << 20])),
        event("gw-1", 4, "s", Value::I64(4)),
    ];
    match sink.deliver(&events).await {
        Err(SinkError::Rejected(m)) => {
            assert!(m.contains("gw-1:3") && m.contains("max_payload"), "{m}");
            assert!(!m.contains("gw-1:2") && !m.contains("gw-1:4"), "{m}");
        }
        other => bail!("expected Rejected, got {other:?}"),
    }
    let ids: Vec<String> = read_all(&js, "EVENTS")
        .await?
        .iter()
        .filter_map(msg_id)
        .collect();
    assert_eq!(ids, ["gw-1:1", "gw-1:2", "gw-1:4"]);
    stop.cancel();
    Ok(())
}

/// A CA and the files of a server and a client certificate it signed.
struct Certs {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// A CA, a server certificate for `nats.test` and `localhost` only (not
/// 127.0.0.1, so the sink must check it against `server_name`), and a client
/// certificate.
fn certs(dir: &Path) -> Result<Certs> {
    let ca = outpost_tests::test_ca::Ca::new(dir, "ca")?;
    let server = ca.issue(
        dir,
        "server",
        &["nats.test", "localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let client = ca.issue(dir, "hub", &[], ExtendedKeyUsagePurpose::ClientAuth)?;
    Ok(Certs {
        ca: ca.cert,
        server_cert: server.cert,
        server_key: server.key,
        client_cert: client.cert,
        client_key: client.key,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_over_mutual_tls_checking_the_server_against_server_name() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let c = certs(dir.path())?;
    let port = free_port()?;
    let nats = Nats::start_with(
        dir.path(),
        port,
        &format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 5\n}}\n",
            c.server_cert.display(),
            c.server_key.display(),
            c.ca.display()
        ),
    )?;
    // The test's own client, over TLS to `localhost`, which the certificate
    // names.
    let js = jetstream::new(
        async_nats::ConnectOptions::new()
            .require_tls(true)
            .add_root_certificates(c.ca.clone())
            .add_client_certificate(c.client_cert.clone(), c.client_key.clone())
            .connect(format!("tls://localhost:{port}"))
            .await?,
    );
    create_stream(&js, "EVENTS", &["outpost.>"], None).await?;
    let stop = CancellationToken::new();

    // Relative paths are relative to `base`.
    let mut t = table(&format!("tls://127.0.0.1:{port}"), "EVENTS");
    t["tls"] =
        json!({ "ca": "ca.pem", "cert": "hub.pem", "key": "hub.key", "server_name": "nats.test" });
    let sink = build(&config(t), dir.path(), &stop).await;
    let events = batch(1, 10);
    deliver_eventually(sink.as_ref(), &events).await?;
    assert_eq!(count(&js, "EVENTS").await?, 10);

    // Without `server_name` the address is what the certificate must name,
    // and it does not: Transient (the far end may get a new certificate),
    // not Config.
    let mut t = table(&format!("tls://127.0.0.1:{port}"), "EVENTS");
    t["tls"] = json!({ "ca": "ca.pem", "cert": "hub.pem", "key": "hub.key" });
    let unnamed = build(&config(t), dir.path(), &stop).await;
    let m = expect_transient(unnamed.as_ref(), &events).await?;
    assert!(m.contains("not connected"), "{m}");

    // A CA that did not sign the server's certificate: Transient too.
    outpost_tests::test_ca::Ca::new(dir.path(), "other-ca")?;
    let mut t = table(&format!("tls://127.0.0.1:{port}"), "EVENTS");
    t["tls"] = json!({ "ca": "other-ca.pem", "cert": "hub.pem", "key": "hub.key", "server_name": "nats.test" });
    let untrusting = build(&config(t), dir.path(), &stop).await;
    expect_transient(untrusting.as_ref(), &events).await?;

    // No client certificate, to a server that requires one: Transient.
    let mut t = table(&format!("tls://127.0.0.1:{port}"), "EVENTS");
    t["tls"] = json!({ "ca": "ca.pem", "server_name": "nats.test" });
    let anonymous = build(&config(t), dir.path(), &stop).await;
    expect_transient(anonymous.as_ref(), &events).await?;

    assert_eq!(count(&js, "EVENTS").await?, 10);
    stop.cancel();
    drop(nats);
    Ok(())
}

/// Builds `table` and expects a Config error naming `key`; its message.
async fn config_error(dir: &Path, table: serde_json::Value, key: &str) -> String {
    let stop = CancellationToken::new();
    let r = config(table).build(dir, stop.clone()).await;
    stop.cancel();
    match r {
        Err(SinkError::Config {
            id,
            key: k,
            message,
        }) => {
            assert_eq!(id, "js");
            assert_eq!(k, key, "{message}");
            message
        }
        Err(e) => panic!("expected a Config error on {key}, got {e}"),
        Ok(_) => panic!("expected a Config error on {key}, got a sink"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_cannot_work_are_config_errors_naming_their_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let url = "nats://127.0.0.1:4222";
    let with = |k: &str, v: serde_json::Value| {
        let mut t = table(url, "EVENTS");
        t[k] = v;
        t
    };

    let m = config_error(
        d,
        with("credentials", json!("missing.creds")),
        "jetstream.credentials",
    )
    .await;
    assert!(m.contains("missing.creds"), "{m}");
    std::fs::write(d.join("bad.creds"), "not a credentials file\n")?;
    let m = config_error(
        d,
        with("credentials", json!("bad.creds")),
        "jetstream.credentials",
    )
    .await;
    assert!(m.contains("bad.creds"), "{m}");

    config_error(d, table("http://127.0.0.1:4222", "EVENTS"), "jetstream.url").await;
    config_error(
        d,
        table("nats://user:secret@127.0.0.1:4222", "EVENTS"),
        "jetstream.url",
    )
    .await;
    config_error(d, table(url, "EV.ENTS"), "jetstream.stream").await;
    config_error(
        d,
        with("subject", json!("outpost.*.{stream}")),
        "jetstream.subject",
    )
    .await;
    config_error(
        d,
        with("subject", json!("outpost..{stream}")),
        "jetstream.subject",
    )
    .await;
    config_error(
        d,
        with("subject", json!("outpost.{agnet_id}")),
        "jetstream.subject",
    )
    .await;
    config_error(d, with("timeout", json!("0s")), "jetstream.timeout").await;
    let m = config_error(d, table("tls://127.0.0.1:4222", "EVENTS"), "jetstream.tls").await;
    assert!(m.contains("CA"), "{m}");

    let m = config_error(
        d,
        with("tls", json!({ "ca": "missing-ca.pem" })),
        "jetstream.tls.ca",
    )
    .await;
    assert!(m.contains("missing-ca.pem"), "{m}");
    std::fs::write(
        d.join("garbage.pem"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )?;
    config_error(
        d,
        with("tls", json!({ "ca": "garbage.pem" })),
        "jetstream.tls.ca",
    )
    .await;
    std::fs::write(d.join("empty.pem"), "")?;
    config_error(
        d,
        with("tls", json!({ "ca": "empty.pem" })),
        "jetstream.tls.ca",
    )
    .await;

    let c = certs(d)?;
    let ca = c.ca.display().to_string();
    let cert = c.client_cert.display().to_string();
    let key = c.client_key.display().to_string();
    config_error(
        d,
        with("tls", json!({ "ca": ca, "cert": cert })),
        "jetstream.tls.key",
    )
    .await;
    config_error(
        d,
        with("tls", json!({ "ca": ca, "key": key })),
        "jetstream.tls.cert",
    )
    .await;
    config_error(
        d,
        with(
            "tls",
            json!({ "ca": ca, "cert": cert, "key": "garbage.pem" }),
        ),
        "jetstream.tls.key",
    )
    .await;
    config_error(
        d,
        with("tls", json!({ "ca": ca, "server_name": "not a name!" })),
        "jetstream.tls.server_name",
    )
    .await;
    Ok(())
}
