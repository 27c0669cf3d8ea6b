//! A client with a valid certificate that then misbehaves on the wire: the
//! hub closes its connection with the named error code, says so in one log
//! line naming the agent and the code, and stores nothing it sent.
//!
//! The clients are raw quinn connections with certificates from the real
//! fleet CA, sending hand-made bytes, so they can do what no real agent does:
//! garbage, a frame over the size limit, frames out of order, seqs going
//! back, labels claiming another agent's id.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use outpost_protocols::wire::{
    ErrorCode, Frame, ALPN, MAX_FRAME_LEN, PROTOCOL_VERSION, SUPPORTED_VERSIONS,
};
use outpost_protocols::Seq;
use outpost_tests::fleet_sim::{client_config, events, run_agent, Load};
use outpost_tests::{wait_until, Hub, HubEventStats, Pki};

/// How the hub ended a raw connection.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// With a QUIC application close carrying this wire error code.
    Code(ErrorCode),
    /// Some other way (text of quinn's error).
    Other(String),
}

/// Connects as the agent whose credentials are in `creds`, sends `bytes` on
/// the session stream, reads the hub's frames and returns them with the way
/// the hub ended the connection.
fn send_raw(hub: SocketAddr, creds: &Path, bytes: Vec<u8>) -> Result<(Vec<Frame>, Ended)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let conn = endpoint
            .connect_with(client_config(creds, ALPN)?, hub, "127.0.0.1")?
            .await
            .context("handshake")?;
        let (mut send, mut recv) = conn.open_bi().await?;
        // The hub may close while we are still writing (a frame too large is
        // refused on its length alone): a failed write is part of the test.
        let _ = send.write_all(&bytes).await;
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), async {
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 16 * 1024];
            while let Ok(Some(n)) = recv.read(&mut chunk).await {
                buf.extend_from_slice(&chunk[..n]);
            }
            buf
        })
        .await
        .context("the hub neither answered nor closed within 30 s")?;
        let mut decoder = outpost_protocols::wire::FrameDecoder::new();
        decoder.push(&read);
        while let Some(frame) = decoder.next_frame()? {
            got.push(frame);
        }
        let reason = tokio::time::timeout(Duration::from_secs(30), conn.closed())
            .await
            .context("the hub did not close the connection")?;
        let ended = match reason {
            quinn::ConnectionError::ApplicationClosed(c) => {
                match u32::try_from(c.error_code.into_inner())
                    .ok()
                    .and_then(ErrorCode::from_u32)
                {
                    Some(code) => Ended::Code(code),
                    None => Ended::Other(format!("application close {}", c.error_code)),
                }
            }
            other => Ended::Other(other.to_string()),
        };
        endpoint.close(0u32.into(), b"");
        endpoint.wait_idle().await;
        Ok((got, ended))
    })
}

/// The code of the `Error` frame that ends `frames`, if they end with one.
fn error_code(frames: &[Frame]) -> Option<ErrorCode> {
    match frames.last() {
        Some(Frame::Error { code, .. }) => Some(*code),
        _ => None,
    }
}

fn frame(f: &Frame) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    f.encode(&mut out)?;
    Ok(out)
}

fn hello() -> Frame {
    Frame::Hello {
        versions: SUPPORTED_VERSIONS.collect(),
        agent_version: "hostile-test".into(),
        labels: BTreeMap::new(),
    }
}

fn batch(agent: usize, seqs: std::ops::RangeInclusive<u64>) -> Result<Frame> {
    let all = events(agent, *seqs.end())?;
    Ok(Frame::Batch {
        events: all
            .into_iter()
            .filter(|(s, _)| seqs.contains(&s.0))
            .collect(),
    })
}

/// Delivers `load` as agent `creds` the honest way (the sans-IO agent
/// session the real agent uses).
fn deliver(hub: SocketAddr, creds: &Path, load: Load) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let f = run_agent(
            endpoint.clone(),
            client_config(creds, ALPN)?,
            hub,
            0,
            load,
            Instant::now(),
            Duration::from_secs(60),
        )
        .await?;
        ensure!(
            f.retries == 0,
            "an honest agent needed {} retries",
            f.retries
        );
        endpoint.wait_idle().await;
        Ok(())
    })
}

/// The hub's log lines that name `agent_id`.
fn lines_of(hub: &Hub, agent_id: &str) -> Vec<String> {
    let needle = format!("agent_id={agent_id}");
    hub.log()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_owned)
        .collect()
}

/// Waits until the hub has logged `nth` (from 1) protocol violation of
/// `agent_id`, checks that it names `code`, and returns that line.
fn refusal_line(hub: &Hub, agent_id: &str, nth: usize, code: ErrorCode) -> Result<String> {
    let mut lines = Vec::new();
    wait_until(
        Duration::from_secs(30),
        &format!("the hub's log line {nth} on {agent_id} breaking the protocol"),
        || {
            lines = lines_of(hub, agent_id)
                .into_iter()
                .filter(|l| l.contains("broke the protocol"))
                .collect();
            lines.len() >= nth
        },
    )
    .with_context(|| hub.log())?;
    ensure!(
        lines.len() == nth,
        "more refusals than connections: {lines:#?}"
    );
    let line = lines.pop().context("no line")?;
    let name = format!("code={}", code.name());
    ensure!(line.contains(&name), "{name} not in: {line}");
    Ok(line)
}

fn ids(fleet: &[serde_json::Value]) -> Vec<String> {
    fleet
        .iter()
        .filter_map(|a| a["agent_id"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn garbage_oversize_and_out_of_order_frames_are_refused_and_store_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let hub = Hub::start(dir.path(), &pki)?;
    let good = pki.issue_agent("good")?;
    deliver(hub.addr, &good, Load::new(0, 3)?)?;
    let baseline_events = hub.events_stats()?;
    assert_eq!(baseline_events.len(), 1, "{baseline_events:?}");
    let evil = pki.issue_agent("evil")?;

    let prefix = |len: usize| -> Result<Vec<u8>> { Ok(u32::try_from(len)?.to_be_bytes().to_vec()) };
    let too_large = {
        let mut b = prefix(MAX_FRAME_LEN + 1)?;
        b.extend_from_slice(&[0u8; 1024]);
        b
    };
    let http = {
        // A client that speaks HTTP at the hub: 'G' is no frame variant.
        let text = b"GET / HTTP/1.1\r\nHost: hub\r\n\r\n";
        let mut b = prefix(text.len())?;
        b.extend_from_slice(text);
        b
    };
    let truncated_hello = {
        // A Hello whose versions claim 200 entries and end after one.
        let mut b = prefix(3)?;
        b.extend_from_slice(&[0, 200, 1]);
        b
    };
    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        ("a length over 4 MiB", too_large, ErrorCode::FrameTooLarge),
        ("HTTP instead of frames", http, ErrorCode::Malformed),
        ("a truncated Hello", truncated_hello, ErrorCode::Malformed),
        (
            "a Batch before Hello",
            frame(&batch(1, 1..=3)?)?,
            ErrorCode::UnexpectedFrame,
        ),
        (
            "a Welcome sent by an agent",
            frame(&Frame::Welcome {
                version: PROTOCOL_VERSION,
                watermark: Seq(0),
                window: 10,
            })?,
            ErrorCode::UnexpectedFrame,
        ),
        (
            "a Hello offering only version 999",
            frame(&Frame::Hello {
                versions: vec![999],
                agent_version: "future".into(),
                labels: BTreeMap::new(),
            })?,
            ErrorCode::UnsupportedVersion,
        ),
    ];
    for (i, (what, bytes, code)) in cases.into_iter().enumerate() {
        let (frames, ended) = send_raw(hub.addr, &evil, bytes)?;
        println!("{what}: the hub sent {frames:?} and ended with {ended:?}");
        assert_eq!(ended, Ended::Code(code), "{what}");
        assert_eq!(error_code(&frames), Some(code), "{what}: {frames:?}");
        assert!(
            !frames
                .iter()
                .any(|f| matches!(f, Frame::Welcome { .. } | Frame::Ack { .. })),
            "{what}: the hub answered {frames:?}"
        );
        let line = refusal_line(&hub, "evil", i + 1, code)?;
        println!("    hub: {line}");
        // No trace: the registry never saw "evil" and no event was stored.
        let fleet = hub.fleet()?;
        assert_eq!(ids(&fleet), vec!["good".to_owned()], "{what}");
        assert_eq!(hub.events_stats()?, baseline_events, "{what}");
    }
    Ok(())
}

#[test]
fn frames_out_of_order_after_hello_are_refused_and_nothing_is_duplicated() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let hub = Hub::start(dir.path(), &pki)?;
    let evil = pki.issue_agent("evil")?;
    let mut cases: Vec<(&str, Vec<Frame>, ErrorCode)> = vec![
        (
            "a second Hello",
            vec![hello(), hello()],
            ErrorCode::UnexpectedFrame,
        ),
        (
            "an Ack sent by an agent",
            vec![
                hello(),
                Frame::Ack {
                    upto: Seq(1),
                    window: 5,
                },
            ],
            ErrorCode::UnexpectedFrame,
        ),
        (
            "a Stored sent by an agent",
            vec![hello(), Frame::Stored { upto: Seq(1) }],
            ErrorCode::UnexpectedFrame,
        ),
    ];
    // Seqs that go back within a session: 1..=3, then 2..=4. What the hub
    // may store is 1..=3 at most, each once.
    cases.push((
        "a seq that goes back",
        vec![hello(), batch(1, 1..=3)?, batch(1, 2..=4)?],
        ErrorCode::SeqNotIncreasing,
    ));
    for (i, (what, frames, code)) in cases.into_iter().enumerate() {
        let mut bytes = Vec::new();
        for f in &frames {
            bytes.extend(frame(f)?);
        }
        let (answer, ended) = send_raw(hub.addr, &evil, bytes)?;
        println!("{what}: the hub sent {answer:?} and ended with {ended:?}");
        assert_eq!(ended, Ended::Code(code), "{what}");
        assert_eq!(error_code(&answer), Some(code), "{what}: {answer:?}");
        let line = refusal_line(&hub, "evil", i + 1, code)?;
        println!("    hub: {line}");
        let stats = hub.agent_stats("evil")?;
        if let Some(s) = &stats {
            assert_eq!(s.count, s.distinct_seqs, "{what}: duplicates {s:?}");
            assert!(
                s.max_seq <= Some(3),
                "{what}: stored past the bad batch {s:?}"
            );
        }
    }
    // Each Hello arrived in one read with the violation after it, so the
    // session ended before it was registered: the registry may know "evil"
    // (had a read split them), but never as connected.
    wait_until(Duration::from_secs(30), "no agent connected", || {
        hub.fleet()
            .is_ok_and(|f| f.iter().all(|a| a["connected"] == false))
    })?;
    let fleet = hub.fleet()?;
    assert!(ids(&fleet).iter().all(|id| id == "evil"), "{fleet:?}");
    Ok(())
}

#[test]
fn an_agent_cannot_claim_another_agents_id() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let hub = Hub::start(dir.path(), &pki)?;
    let b = pki.issue_agent("b")?;
    deliver(hub.addr, &b, Load::new(2, 3)?)?;
    let b_before = hub.agent_stats("b")?.context("b stored nothing")?;
    let b_tail = hub.events_tail("b", None)?;
    wait_until(Duration::from_secs(30), "b disconnected", || {
        fleet_entry(&hub, "b").is_ok_and(|e| e["connected"] == false)
    })?;
    let fleet_b_before = fleet_entry(&hub, "b")?;
    let b_lines = lines_of(&hub, "b");

    // Agent "a" says it is "b" in every way a Hello can: its labels.
    let a = pki.issue_agent("a")?;
    let mut claim = Load::new(1, 5)?;
    for (k, v) in [
        ("agent_id", "b"),
        ("id", "b"),
        ("uri", "urn:outpost:agent:b"),
    ] {
        claim.labels.insert(k.into(), v.into());
    }
    deliver(hub.addr, &a, claim)?;

    // Everything "a" sent is stored as a's; b's data and registry entry are
    // untouched.
    wait_until(Duration::from_secs(30), "a's 5 events", || {
        hub.agent_stats("a").ok().flatten().map(|s| s.count) == Some(5)
    })?;
    assert_eq!(
        hub.agent_stats("a")?,
        Some(HubEventStats {
            agent_id: "a".into(),
            count: 5,
            distinct_seqs: 5,
            min_seq: Some(1),
            max_seq: Some(5),
        })
    );
    assert_eq!(hub.agent_stats("b")?, Some(b_before));
    assert_eq!(hub.events_tail("b", None)?, b_tail);
    assert_eq!(fleet_entry(&hub, "b")?, fleet_b_before);
    let fleet_a = fleet_entry(&hub, "a")?;
    println!("fleet entry of a: {fleet_a}");
    assert_eq!(fleet_a["labels"]["agent_id"], "b", "labels are only labels");
    let connected = lines_of(&hub, "a")
        .into_iter()
        .find(|l| l.contains("Agent connected"))
        .context("no 'Agent connected' line for a")?;
    println!("hub: {connected}");
    let b_lines_after = lines_of(&hub, "b");
    if b_lines_after != b_lines {
        bail!("a's session was logged as b's: {b_lines_after:?}");
    }
    Ok(())
}

fn fleet_entry(hub: &Hub, id: &str) -> Result<serde_json::Value> {
    hub.fleet()?
        .into_iter()
        .find(|a| a["agent_id"] == id)
        .with_context(|| format!("{id} not in the fleet"))
}
