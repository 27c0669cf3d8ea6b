//! The protocol, tested without sockets: single sessions fed hand-made frames,
//! and an in-memory [`Pair`] driven on a simulated clock.

mod util;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use self::util::{agent_id, body, origin, Pair};
use super::frame::tests::arb_frame;
use super::*;
use crate::event::{EventBody, Seq, StreamName, Timestamp, Value};

// ---------------------------------------------------------------------------
// Helpers for driving one session by hand.

fn encode(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        f.encode(&mut out).expect("encodes");
    }
    out
}

fn decode(bytes: &[u8]) -> Vec<Frame> {
    let mut d = FrameDecoder::new();
    d.push(bytes);
    let mut frames = Vec::new();
    while let Some(f) = d.next_frame().expect("the session sends valid frames") {
        frames.push(f);
    }
    assert_eq!(d.buffered(), 0, "the session sends whole frames");
    frames
}

fn agent_sent(agent: &mut AgentSession, now: Instant) -> Vec<Frame> {
    let mut buf = Vec::new();
    while agent.poll_transmit(now, &mut buf).is_some() {}
    decode(&buf)
}

fn hub_sent(hub: &mut HubSession, now: Instant) -> Vec<Frame> {
    let mut buf = Vec::new();
    while hub.poll_transmit(now, &mut buf).is_some() {}
    decode(&buf)
}

fn agent_events(agent: &mut AgentSession) -> Vec<AgentEvent> {
    std::iter::from_fn(|| agent.poll_event()).collect()
}

fn hub_events(hub: &mut HubSession) -> Vec<HubEvent> {
    std::iter::from_fn(|| hub.poll_event()).collect()
}

fn hello(versions: Vec<u16>) -> Frame {
    Frame::Hello {
        versions,
        agent_version: "test".into(),
        labels: BTreeMap::new(),
    }
}

fn batch(seqs: &[u64]) -> Frame {
    Frame::Batch {
        events: seqs.iter().map(|s| (Seq(*s), body(*s as i64))).collect(),
    }
}

/// A hub session that has welcomed an agent, with its output drained.
fn welcomed_hub(now: Instant, watermark: u64, window: u32) -> HubSession {
    let config = HubConfig {
        window,
        ..HubConfig::default()
    };
    let mut hub = HubSession::new(now, agent_id(), Seq(watermark), config);
    hub.handle_bytes(now, &encode(&[hello(vec![PROTOCOL_VERSION, 1])]))
        .expect("hello accepted");
    let _ = hub_sent(&mut hub, now);
    let _ = hub_events(&mut hub);
    hub
}

/// An agent session that was welcomed, with its output drained.
fn streaming_agent(now: Instant, watermark: u64, window: u32, config: AgentConfig) -> AgentSession {
    let mut agent = AgentSession::new(now, AgentInfo::default(), config);
    let _ = agent_sent(&mut agent, now);
    let welcome = Frame::Welcome {
        version: PROTOCOL_VERSION,
        watermark: Seq(watermark),
        window,
    };
    agent
        .handle_bytes(now, &encode(&[welcome]))
        .expect("welcome accepted");
    let _ = agent_events(&mut agent);
    agent
}

fn closed_error_of_hub(hub: &mut HubSession) -> Option<ProtocolError> {
    hub_events(hub).into_iter().find_map(|e| match e {
        HubEvent::Closed { error } => error,
        _ => None,
    })
}

fn closed_error_of_agent(agent: &mut AgentSession) -> Option<ProtocolError> {
    agent_events(agent).into_iter().find_map(|e| match e {
        AgentEvent::Closed { error } => error,
        _ => None,
    })
}

/// The code of the `Error` frame among `frames`.
fn error_code(frames: &[Frame]) -> Option<ErrorCode> {
    frames.iter().find_map(|f| match f {
        Frame::Error { code, .. } => Some(*code),
        _ => None,
    })
}

fn assert_exactly_once(pair: &Pair) {
    assert!(
        pair.outbox.is_empty(),
        "{} events left in the outbox",
        pair.outbox.len()
    );
    assert!(
        pair.store.inserts.windows(2).all(|w| w[0] < w[1]),
        "stored out of order or twice: {:?}",
        pair.store.inserts
    );
    for (seq, body) in &pair.outbox.appended {
        match pair.store.events.get(seq) {
            Some(stored) => assert_eq!(stored, body, "seq {seq}"),
            None => assert!(pair.outbox.evicted.contains(seq), "seq {seq} lost"),
        }
    }
    for seq in pair.store.events.keys() {
        assert!(pair.outbox.appended.contains_key(seq), "seq {seq} invented");
    }
}

// ---------------------------------------------------------------------------
// Version negotiation and identity.

#[test]
fn negotiation_picks_the_highest_common_version() {
    assert_eq!(negotiate(&[1, 2, 3], 1..=2), Some(2));
    assert_eq!(negotiate(&[3, 1, 2], 1..=3), Some(3));
    assert_eq!(negotiate(&[1], 1..=1), Some(1));
    assert_eq!(negotiate(&[], 1..=1), None);
    assert_eq!(negotiate(&[4, 5], 1..=3), None);
}

#[test]
fn a_version_2_hub_still_serves_a_version_1_agent() {
    let now = origin();
    // A version-1 agent offers what it speaks...
    let old = AgentConfig {
        max_version: 1,
        ..AgentConfig::default()
    };
    let mut agent = AgentSession::new(now, AgentInfo::default(), old);
    agent.report_policy(0, None);
    let sent = agent_sent(&mut agent, now);
    let Some(Frame::Hello { versions, .. }) = sent.first() else {
        panic!("expected Hello, got {sent:?}");
    };
    assert_eq!(versions, &[1]);
    // ...a hub that speaks 1 and 2 picks 1 and welcomes it in version 1...
    let mut hub = HubSession::new(now, agent_id(), Seq(0), HubConfig::default());
    hub.handle_bytes(now, &encode(&sent)).expect("accepted");
    let welcome = hub_sent(&mut hub, now);
    assert!(matches!(
        welcome.as_slice(),
        [Frame::Welcome { version: 1, .. }]
    ));
    agent
        .handle_bytes(now, &encode(&welcome))
        .expect("accepted");
    // ...and the agent streams.
    assert_eq!(
        agent_events(&mut agent),
        [AgentEvent::Connected {
            version: 1,
            watermark: Seq(0)
        }]
    );
    assert_eq!(agent.version(), Some(1));
    assert_eq!(agent.wants(), HubConfig::default().window as usize);
    // Version 1 has no policy frames: the agent reports none and the hub
    // pushes none (it enforces on ingest instead).
    assert!(agent_sent(&mut agent, now).is_empty());
    assert_eq!(
        hub.push_policy(3, "[[rules]]"),
        Err(UsageError::NoPolicyFrames { version: 1 })
    );
    assert!(hub_sent(&mut hub, now).is_empty());
}

#[test]
fn a_version_1_hub_serves_a_newer_agent_in_version_1() {
    let now = origin();
    let mut agent = AgentSession::new(now, AgentInfo::default(), AgentConfig::default());
    agent.report_policy(4, None);
    let sent = agent_sent(&mut agent, now);
    assert!(
        matches!(sent.as_slice(), [Frame::Hello { versions, .. }] if versions == &[4, 3, 2, 1])
    );
    let welcome = Frame::Welcome {
        version: 1,
        watermark: Seq(0),
        window: 10,
    };
    agent
        .handle_bytes(now, &encode(&[welcome]))
        .expect("accepted");
    assert_eq!(agent.version(), Some(1));
    // The waiting policy report is not sent in version 1.
    assert!(agent_sent(&mut agent, now).is_empty());
    // And a Policy frame in version 1 is out of place.
    let err = agent
        .handle_bytes(
            now,
            &encode(&[Frame::Policy {
                version: 1,
                text: String::new(),
            }]),
        )
        .expect_err("refused");
    assert_eq!(err.code(), ErrorCode::UnexpectedFrame);
}

#[test]
fn the_hub_pushes_its_policy_to_an_agent_that_reports_another_version() {
    let mut pair = Pair::new();
    pair.apply_policy(7, "description = \"v7\"\n");
    pair.drive();
    assert_eq!(
        pair.agent_policy, 7,
        "pushed after the agent's first report"
    );
    assert_eq!(pair.policies_received, 1);
    // An agent that already runs the version gets its part once more on
    // reconnect: what selects it may have changed while it was away.
    pair.reset();
    pair.drive();
    assert_eq!(pair.policies_received, 2);
    assert_eq!(pair.reported_policy, Some(7));
    // A new version reaches a connected agent at once.
    pair.apply_policy(8, "description = \"v8\"\n");
    pair.drive();
    assert_eq!((pair.agent_policy, pair.policies_received), (8, 3));
    // Rolling back is a new push of the old text under a new version.
    pair.apply_policy(9, "description = \"v7\"\n");
    pair.drive();
    assert_eq!(pair.agent_policy, 9);
    assert_eq!(
        pair.policies_pushed, 4,
        "the hub's session decided each push"
    );
    assert!(pair.closed.is_empty(), "{:?}", pair.closed);
}

#[test]
fn the_hub_pushes_a_version_once_a_session_even_when_the_agent_refuses_it() {
    let now = origin();
    let mut hub = welcomed_hub(now, 0, 10);
    // Set before the agent reported: nothing to decide yet.
    hub.set_policy(5, "description = \"v5\"\n")
        .expect("within the limit");
    assert!(hub_sent(&mut hub, now).is_empty());
    let status = |version, error: Option<&str>| Frame::PolicyStatus {
        version,
        error: error.map(str::to_owned),
    };
    hub.handle_bytes(now, &encode(&[status(4, None)]))
        .expect("accepted");
    assert!(matches!(
        hub_sent(&mut hub, now).as_slice(),
        [Frame::Policy { version: 5, .. }]
    ));
    assert!(hub_events(&mut hub).contains(&HubEvent::PolicyPushed { version: 5 }));
    // The agent refused it and still runs 4: not pushed again this session.
    hub.handle_bytes(now, &encode(&[status(4, Some("does not parse"))]))
        .expect("accepted");
    assert!(hub_sent(&mut hub, now).is_empty());
    // A new version reaches it at once; the one it runs is not pushed.
    hub.set_policy(6, "description = \"v6\"\n")
        .expect("within the limit");
    assert!(matches!(
        hub_sent(&mut hub, now).as_slice(),
        [Frame::Policy { version: 6, .. }]
    ));
    hub.handle_bytes(now, &encode(&[status(6, None)]))
        .expect("accepted");
    hub.set_policy(6, "description = \"v6\"\n")
        .expect("within the limit");
    assert!(hub_sent(&mut hub, now).is_empty());
    // The agent's labels changed: its part of version 6 is another text,
    // pushed under the same version.
    hub.set_policy(6, "description = \"v6 for site b\"\n")
        .expect("within the limit");
    assert!(matches!(
        hub_sent(&mut hub, now).as_slice(),
        [Frame::Policy { version: 6, text }] if text.contains("site b")
    ));
    // An oversized policy is refused, and nothing is pushed after it.
    assert!(matches!(
        hub.set_policy(7, "#".repeat(crate::policy::MAX_POLICY_LEN + 1)),
        Err(UsageError::PolicyTooLarge { .. })
    ));
    assert_eq!(hub.policy_version(), None);
    hub.handle_bytes(now, &encode(&[status(6, None)]))
        .expect("accepted");
    assert!(hub_sent(&mut hub, now).is_empty());
}

#[test]
fn the_hub_does_not_push_no_policy_to_an_agent_that_runs_none() {
    let now = origin();
    let mut hub = welcomed_hub(now, 0, 10);
    hub.set_policy(0, "").expect("within the limit");
    let status = |version| Frame::PolicyStatus {
        version,
        error: None,
    };
    hub.handle_bytes(now, &encode(&[status(0)]))
        .expect("accepted");
    assert!(hub_sent(&mut hub, now).is_empty());
    // An agent that runs a version the hub no longer has gets version 0.
    hub.handle_bytes(now, &encode(&[status(3)]))
        .expect("accepted");
    assert!(matches!(
        hub_sent(&mut hub, now).as_slice(),
        [Frame::Policy { version: 0, .. }]
    ));
}

#[test]
fn the_hub_pushes_nothing_to_a_version_1_agent() {
    let now = origin();
    let mut hub = HubSession::new(now, agent_id(), Seq(0), HubConfig::default());
    hub.set_policy(3, "[[rules]]").expect("within the limit");
    hub.handle_bytes(now, &encode(&[hello(vec![1])]))
        .expect("accepted");
    assert!(matches!(
        hub_sent(&mut hub, now).as_slice(),
        [Frame::Welcome { version: 1, .. }]
    ));
    hub.set_policy(4, "[[rules]]").expect("within the limit");
    assert!(hub_sent(&mut hub, now).is_empty());
    assert!(!hub_events(&mut hub)
        .iter()
        .any(|e| matches!(e, HubEvent::PolicyPushed { .. })));
}

#[test]
fn policy_frames_over_their_limits_close_the_session_as_malformed() {
    let now = origin();
    let mut agent = streaming_agent(now, 0, 10, AgentConfig::default());
    let text = "#".repeat(crate::policy::MAX_POLICY_LEN + 1);
    let err = agent
        .handle_bytes(now, &encode(&[Frame::Policy { version: 1, text }]))
        .expect_err("refused");
    assert_eq!(err.code(), ErrorCode::Malformed);
    let mut hub = welcomed_hub(now, 0, 10);
    let status = Frame::PolicyStatus {
        version: 1,
        error: Some("x".repeat(MAX_ERROR_MESSAGE_LEN + 1)),
    };
    let err = hub
        .handle_bytes(now, &encode(&[status]))
        .expect_err("refused");
    assert_eq!(err.code(), ErrorCode::Malformed);
    // A hub refuses to push an oversized policy rather than send it.
    let mut hub = welcomed_hub(now, 0, 10);
    assert!(matches!(
        hub.push_policy(1, &"#".repeat(crate::policy::MAX_POLICY_LEN + 1)),
        Err(UsageError::PolicyTooLarge { .. })
    ));
}

fn site(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("site".to_owned(), name.to_owned())])
}

#[test]
fn the_hub_tells_a_version_4_agent_its_registry_labels() {
    let now = origin();
    let mut hub = welcomed_hub(now, 0, 10);
    assert_eq!(hub.tell_labels(&site("plant-a")), Ok(true));
    let frames = hub_sent(&mut hub, now);
    assert_eq!(
        frames,
        vec![Frame::Labels {
            labels: site("plant-a")
        }]
    );
    let mut agent = streaming_agent(now, 0, 10, AgentConfig::default());
    agent.handle_bytes(now, &encode(&frames)).expect("accepted");
    assert_eq!(
        agent_events(&mut agent),
        vec![AgentEvent::Labels {
            labels: site("plant-a")
        }]
    );
}

#[test]
fn labels_are_not_told_to_an_older_agent_nor_before_hello() {
    let now = origin();
    let mut hub = HubSession::new(now, agent_id(), Seq(0), HubConfig::default());
    assert_eq!(hub.tell_labels(&site("a")), Err(UsageError::NotStreaming));
    hub.handle_bytes(now, &encode(&[hello(vec![3, 2, 1])]))
        .expect("accepted");
    let _ = hub_sent(&mut hub, now);
    assert_eq!(hub.tell_labels(&site("a")), Ok(false));
    assert!(hub_sent(&mut hub, now).is_empty());
}

#[test]
fn labels_over_the_limits_are_refused_at_both_ends() {
    let now = origin();
    let too_many: BTreeMap<String, String> = (0..=MAX_LABELS)
        .map(|i| (format!("k{i}"), "v".to_owned()))
        .collect();
    let mut hub = welcomed_hub(now, 0, 10);
    assert!(matches!(
        hub.tell_labels(&too_many),
        Err(UsageError::InvalidLabels { .. })
    ));
    assert!(hub_sent(&mut hub, now).is_empty());
    let mut agent = streaming_agent(now, 0, 10, AgentConfig::default());
    let err = agent
        .handle_bytes(now, &encode(&[Frame::Labels { labels: too_many }]))
        .expect_err("refused");
    assert_eq!(err.code(), ErrorCode::Malformed);
    // Before `Welcome`, a `Labels` frame is out of place.
    let mut agent = AgentSession::new(now, AgentInfo::default(), AgentConfig::default());
    let err = agent
        .handle_bytes(now, &encode(&[Frame::Labels { labels: site("a") }]))
        .expect_err("refused");
    assert_eq!(err.code(), ErrorCode::UnexpectedFrame);
}

#[test]
fn an_agent_with_no_common_version_is_refused_with_unsupported_version() {
    let now = origin();
    let mut hub = HubSession::new(now, agent_id(), Seq(0), HubConfig::default());
    let err = hub
        .handle_bytes(now, &encode(&[hello(vec![7, 8])]))
        .expect_err("refused");
    assert_eq!(
        err,
        ProtocolError::UnsupportedVersion {
            ours: vec![4, 3, 2, 1],
            theirs: vec![7, 8]
        }
    );
    assert_eq!(
        error_code(&hub_sent(&mut hub, now)),
        Some(ErrorCode::UnsupportedVersion)
    );
    assert!(hub.is_closed());
    assert_eq!(closed_error_of_hub(&mut hub), Some(err));
}

#[test]
fn a_welcome_with_a_version_the_agent_did_not_offer_is_refused() {
    let now = origin();
    let mut agent = AgentSession::new(now, AgentInfo::default(), AgentConfig::default());
    let _ = agent_sent(&mut agent, now);
    let welcome = Frame::Welcome {
        version: 9,
        watermark: Seq(0),
        window: 1,
    };
    let err = agent
        .handle_bytes(now, &encode(&[welcome]))
        .expect_err("refused");
    assert_eq!(err.code(), ErrorCode::UnsupportedVersion);
    assert_eq!(
        error_code(&agent_sent(&mut agent, now)),
        Some(ErrorCode::UnsupportedVersion)
    );
}

#[test]
fn agent_ids_come_from_the_certificate_uri_only() {
    let id = agent_id();
    assert_eq!(agent_uri(&id), "urn:outpost:agent:depot-17.gw-1");
    assert_eq!(agent_id_from_uri(&agent_uri(&id)), Some(id));
    assert_eq!(agent_id_from_uri("urn:outpost:hub:x"), None);
    assert_eq!(agent_id_from_uri("urn:outpost:agent:"), None);
    assert_eq!(agent_id_from_uri("urn:outpost:agent:a b"), None);
}

#[test]
fn error_codes_map_to_quic_close_codes_and_back() {
    let named = [
        ErrorCode::UnsupportedVersion,
        ErrorCode::FrameTooLarge,
        ErrorCode::Malformed,
        ErrorCode::UnexpectedFrame,
        ErrorCode::SeqNotIncreasing,
        ErrorCode::WindowExceeded,
        ErrorCode::InvalidAck,
        ErrorCode::Timeout,
        ErrorCode::Unauthorized,
        ErrorCode::Internal,
        ErrorCode::ShuttingDown,
        ErrorCode::Superseded,
        ErrorCode::Revoked,
        ErrorCode::CertificateNotCurrent,
    ];
    let mut seen = std::collections::BTreeSet::new();
    for code in named {
        assert_ne!(code.to_u32(), CLOSE_OK, "{code}");
        assert!(seen.insert(code.to_u16()), "{code} reuses a number");
        assert_eq!(ErrorCode::from_u32(code.to_u32()), Some(code));
        assert_eq!(ErrorCode::from_u16(code.to_u16()), code);
        assert_ne!(code.name(), "unknown");
    }
    assert_eq!(ErrorCode::from_u32(CLOSE_OK), None);
    assert_eq!(ErrorCode::from_u32(70_000), None);
    assert_eq!(ErrorCode::from_u16(500), ErrorCode::Unknown(500));
    assert_eq!(ErrorCode::Unknown(500).to_u32(), 500);
    assert_eq!(ErrorCode::WindowExceeded.to_string(), "window_exceeded (6)");
}

// ---------------------------------------------------------------------------
// Delivery through the pair.

#[test]
fn delivers_a_backlog_with_gaps_exactly_once_and_in_order() {
    let mut pair = Pair::new();
    for i in 0..2000 {
        pair.outbox.append(i % 3, body(i as i64));
    }
    pair.drive();
    assert_exactly_once(&pair);
    assert_eq!(pair.store.events.len(), 2000);
    assert!(pair.errors().is_empty(), "{:?}", pair.errors());
    assert_eq!(pair.agent.acked(), pair.store.watermark());
}

#[test]
fn acks_only_after_the_store_commits() {
    let mut pair = Pair::new();
    pair.auto_commit = false;
    for i in 0..50 {
        pair.outbox.append(0, body(i));
    }
    pair.drive();
    assert_eq!(pair.hub.highest_received(), Seq(50));
    assert_eq!(pair.outbox.len(), 50, "nothing deleted before the commit");
    assert_eq!(pair.agent.acked(), Seq(0));
    pair.commit();
    pair.drive();
    assert_eq!(pair.agent.acked(), Seq(50));
    assert_exactly_once(&pair);
}

#[test]
fn replays_unacked_events_after_a_hub_restart() {
    let mut pair = Pair::new();
    pair.auto_commit = false;
    for i in 0..30 {
        pair.outbox.append(0, body(i));
    }
    pair.drive();
    assert_eq!(pair.hub.highest_received(), Seq(30));
    // The hub dies before its commit: the events exist only in the outbox.
    pair.hub_restart();
    assert!(pair.store.events.is_empty());
    pair.auto_commit = true;
    pair.drive();
    assert_eq!(pair.connected, [Seq(0), Seq(0)]);
    assert_exactly_once(&pair);
    assert_eq!(pair.store.ignored_duplicates, 0);
}

#[test]
fn resumes_from_the_hub_watermark_when_the_ack_was_lost() {
    let mut pair = Pair::new();
    pair.auto_commit = false;
    for i in 0..30 {
        pair.outbox.append(0, body(i));
    }
    pair.drive();
    // The store commits, but the connection breaks before the Ack leaves.
    pair.commit();
    pair.reset();
    pair.drive();
    assert_eq!(pair.connected.last(), Some(&Seq(30)));
    assert_exactly_once(&pair);
    // The watermark told the agent everything was stored: nothing was resent.
    assert_eq!(pair.store.ignored_duplicates, 0);
}

#[test]
fn events_resent_below_the_watermark_are_dropped_on_the_wire() {
    let mut pair = Pair::new();
    pair.auto_commit = false;
    for i in 0..30 {
        pair.outbox.append(0, body(i));
    }
    pair.drive();
    // Stored, but the Ack is lost with the connection; the agent sends all 30
    // again on the new one.
    pair.commit();
    pair.reset_with_replay();
    pair.auto_commit = true;
    pair.drive();
    assert_eq!(pair.replayed, 1);
    assert_exactly_once(&pair);
    // The store never even saw them: sinks would not either.
    assert_eq!(pair.store.ignored_duplicates, 0);
    assert!(pair.errors().is_empty(), "{:?}", pair.errors());
}

#[test]
fn duplicates_after_a_stale_watermark_are_stored_once() {
    let mut pair = Pair::new();
    pair.auto_commit = false;
    for i in 0..30 {
        pair.outbox.append(0, body(i));
    }
    pair.drive();
    pair.reset_stale();
    pair.auto_commit = true;
    pair.drive();
    assert_eq!(pair.store.ignored_duplicates, 30, "the agent resent them");
    assert_exactly_once(&pair);
}

#[test]
fn the_hub_hands_out_only_seqs_above_its_watermark() {
    let now = origin();
    let mut hub = welcomed_hub(now, 5, 100);
    hub.handle_bytes(now, &encode(&[batch(&[3, 4, 5, 6, 7])]))
        .expect("duplicates are fine");
    let stored: Vec<Vec<Seq>> = hub_events(&mut hub)
        .into_iter()
        .filter_map(|e| match e {
            HubEvent::Store { events } => Some(events.into_iter().map(|(s, _)| s).collect()),
            _ => None,
        })
        .collect();
    assert_eq!(stored, [vec![Seq(6), Seq(7)]]);
    // A batch of duplicates only hands out nothing.
    let mut hub = welcomed_hub(now, 5, 100);
    hub.handle_bytes(now, &encode(&[batch(&[1, 2])]))
        .expect("fine");
    assert!(hub_events(&mut hub).is_empty());
}

#[test]
fn the_agent_never_has_more_than_the_window_in_flight() {
    let hub_config = HubConfig {
        window: 10,
        ..HubConfig::default()
    };
    let mut pair = Pair::with_configs(AgentConfig::default(), hub_config);
    pair.auto_commit = false;
    for i in 0..100 {
        pair.outbox.append(0, body(i));
    }
    pair.drive();
    assert_eq!(pair.hub.highest_received(), Seq(10));
    assert_eq!(pair.agent.wants(), 0);
    for _ in 0..20 {
        pair.commit();
        pair.drive();
    }
    assert_exactly_once(&pair);
    assert!(pair.errors().is_empty(), "{:?}", pair.errors());
}

#[test]
fn delivers_everything_exactly_once_over_a_lossy_link() {
    let mut pair = Pair::new();
    pair.loss = 0.01;
    pair.mtu = 300;
    pair.seed(42);
    for i in 0..3000 {
        pair.outbox.append(i % 2, body(i as i64));
    }
    for _ in 0..1000 {
        if pair.outbox.is_empty() {
            break;
        }
        assert!(pair.drive_bounded(10_000), "did not settle");
    }
    assert!(
        pair.connections > 2,
        "the link should have broken a few times"
    );
    assert_exactly_once(&pair);
    assert_eq!(pair.store.ignored_duplicates, 0);
    assert!(pair.errors().is_empty(), "{:?}", pair.errors());
}

#[test]
fn batches_respect_event_and_byte_limits() {
    let now = origin();
    let config = AgentConfig {
        max_batch_events: 3,
        max_batch_bytes: 120,
        ..AgentConfig::default()
    };
    let mut agent = streaming_agent(now, 0, 100, config);
    let events: Vec<(Seq, EventBody)> = (1..=20).map(|s| (Seq(s), body(s as i64))).collect();
    agent.push_events(events.clone()).expect("pushed");
    let mut big = body(21);
    big.value = Value::String("x".repeat(500));
    agent
        .push_event(Seq(21), &big)
        .expect("a large event goes alone");
    let frames = agent_sent(&mut agent, now);
    let mut got = Vec::new();
    for frame in frames {
        let Frame::Batch { events } = frame else {
            panic!("expected batches, got {frame:?}");
        };
        assert!((1..=3).contains(&events.len()), "{} events", events.len());
        let bytes: usize = events
            .iter()
            .map(|e| postcard::to_stdvec(e).expect("encodes").len())
            .sum();
        assert!(bytes <= 120 || events.len() == 1, "{bytes} bytes");
        got.extend(events);
    }
    assert_eq!(got.len(), 21);
    assert_eq!(got[..20], events[..]);
    assert_eq!(agent.read_after(), Seq(21));
}

#[test]
fn an_event_too_large_for_a_frame_is_refused_at_push() {
    let now = origin();
    let mut agent = streaming_agent(now, 0, 100, AgentConfig::default());
    let mut huge = body(1);
    huge.value = Value::Bytes(vec![0; MAX_FRAME_LEN]);
    let err = agent.push_event(Seq(1), &huge).expect_err("too large");
    assert!(matches!(
        err,
        UsageError::EventTooLarge {
            seq: Seq(1),
            max: MAX_EVENT_LEN,
            ..
        }
    ));
    // Nothing changed; the next event goes.
    assert_eq!(agent.read_after(), Seq(0));
    assert_eq!(agent.wants(), 100);
    agent.push_event(Seq(2), &body(2)).expect("pushed");
    assert!(matches!(
        agent_sent(&mut agent, now).as_slice(),
        [Frame::Batch { events }] if events.len() == 1 && events[0].0 == Seq(2)
    ));
}

#[test]
fn pushing_out_of_order_or_beyond_the_window_is_a_usage_error() {
    let now = origin();
    let mut agent = AgentSession::new(now, AgentInfo::default(), AgentConfig::default());
    assert_eq!(agent.wants(), 0);
    assert_eq!(
        agent.push_event(Seq(1), &body(1)),
        Err(UsageError::NotStreaming)
    );
    let mut agent = streaming_agent(now, 10, 2, AgentConfig::default());
    assert_eq!(agent.read_after(), Seq(10));
    assert_eq!(
        agent.push_event(Seq(10), &body(10)),
        Err(UsageError::SeqNotIncreasing {
            previous: Seq(10),
            got: Seq(10)
        })
    );
    agent
        .push_events(vec![(Seq(11), body(11)), (Seq(13), body(13))])
        .expect("within the window");
    assert_eq!(
        agent.push_event(Seq(14), &body(14)),
        Err(UsageError::WindowFull { window: 2 })
    );
    assert_eq!(agent.in_flight(), 2);
}

#[test]
fn storing_beyond_what_was_received_is_a_usage_error() {
    let now = origin();
    let mut hub = welcomed_hub(now, 0, 100);
    hub.handle_bytes(now, &encode(&[batch(&[1, 2])]))
        .expect("fine");
    assert_eq!(
        hub.acknowledge(Seq(3)),
        Err(UsageError::StoredBeyondReceived {
            received: Seq(2),
            got: Seq(3)
        })
    );
    hub.acknowledge(Seq(2)).expect("fine");
    assert!(matches!(
        hub_sent(&mut hub, now).as_slice(),
        [Frame::Ack {
            upto: Seq(2),
            window: 100
        }]
    ));
    // A repeated or lower commit sends nothing more.
    hub.acknowledge(Seq(1)).expect("fine");
    assert!(hub_sent(&mut hub, now).is_empty());
}

#[test]
fn acks_are_coalesced_between_polls() {
    let now = origin();
    let mut hub = welcomed_hub(now, 0, 100);
    hub.handle_bytes(now, &encode(&[batch(&[1, 2, 3])]))
        .expect("fine");
    hub.acknowledge(Seq(1)).expect("fine");
    hub.acknowledge(Seq(3)).expect("fine");
    assert_eq!(
        hub_sent(&mut hub, now),
        [Frame::Ack {
            upto: Seq(3),
            window: 100
        }]
    );
}

#[test]
fn backlog_reports_reach_the_hub_even_when_made_before_welcome() {
    let mut pair = Pair::new();
    pair.agent.report_backlog(7, 700, Some(Seq(3)));
    let now = pair.now;
    let mut hub_got = Vec::new();
    // Drive by hand to see the hub's events.
    let mut buf = Vec::new();
    while pair.agent.poll_transmit(now, &mut buf).is_some() {}
    pair.hub.handle_bytes(now, &buf).expect("hello");
    let mut buf = Vec::new();
    while pair.hub.poll_transmit(now, &mut buf).is_some() {}
    pair.agent.handle_bytes(now, &buf).expect("welcome");
    let mut buf = Vec::new();
    while pair.agent.poll_transmit(now, &mut buf).is_some() {}
    pair.hub.handle_bytes(now, &buf).expect("backlog");
    hub_got.extend(hub_events(&mut pair.hub));
    assert!(hub_got.contains(&HubEvent::Backlog {
        events: 7,
        bytes: 700,
        oldest_seq: Some(Seq(3))
    }));
}

#[test]
fn goodbye_closes_both_sessions_cleanly() {
    let mut pair = Pair::new();
    pair.outbox.append(0, body(1));
    pair.drive();
    pair.agent.goodbye();
    pair.drive();
    assert!(pair.agent.is_closed() && pair.hub.is_closed());
    assert_eq!(pair.closed, [("agent", None), ("hub", None)]);
    assert_exactly_once(&pair);
}

#[test]
fn a_hub_shutting_down_tells_the_agent_why() {
    let mut pair = Pair::new();
    pair.drive();
    pair.hub.close(ErrorCode::ShuttingDown, "hub is restarting");
    pair.drive();
    let errors = pair.errors();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(
        errors[0],
        (
            "hub",
            ProtocolError::Local {
                code: ErrorCode::ShuttingDown,
                message: "hub is restarting".into()
            }
        )
    );
    assert_eq!(
        errors[1],
        (
            "agent",
            ProtocolError::Peer {
                code: ErrorCode::ShuttingDown,
                message: "hub is restarting".into()
            }
        )
    );
}

#[test]
fn an_agent_closing_on_an_outbox_failure_tells_the_hub() {
    let mut pair = Pair::new();
    pair.drive();
    pair.agent.close(ErrorCode::Internal, "disk I/O error");
    pair.drive();
    assert!(pair.hub.is_closed());
    assert!(matches!(
        pair.errors().last(),
        Some((
            "hub",
            ProtocolError::Peer {
                code: ErrorCode::Internal,
                ..
            }
        ))
    ));
}

// ---------------------------------------------------------------------------
// What the agent's session decides for its driver: the drained stop, the
// refill threshold and the backlog timer.

/// A pair whose hub received `n` events and committed none of them.
fn pair_awaiting_commit(n: i64) -> Pair {
    let mut pair = Pair::new();
    pair.auto_commit = false;
    pair.fill(n);
    pair.drive();
    assert_eq!(pair.hub.highest_received(), Seq(n as u64));
    pair
}

#[test]
fn a_drained_stop_says_goodbye_only_after_the_last_ack() {
    let mut pair = pair_awaiting_commit(10);
    pair.stop(Duration::from_secs(2));
    pair.drive();
    // Everything was sent, nothing acknowledged: the agent waits.
    assert!(!pair.agent.is_closed() && !pair.hub.is_closed());
    assert!(pair.closed.is_empty(), "{:?}", pair.closed);
    pair.commit();
    pair.drive();
    assert_eq!(pair.closed, [("agent", None), ("hub", None)]);
    assert!(
        pair.outbox.is_empty(),
        "the goodbye came before the last ack"
    );
    assert_exactly_once(&pair);
}

#[test]
fn a_stop_sends_what_the_outbox_committed_before_saying_goodbye() {
    // Stopped before the hub even welcomed it, with events committed and
    // none read yet.
    let mut pair = Pair::new();
    pair.fill(25);
    pair.stop(Duration::from_secs(2));
    pair.drive();
    assert_eq!(pair.closed, [("agent", None), ("hub", None)]);
    assert!(pair.outbox.is_empty());
    assert_exactly_once(&pair);
}

#[test]
fn a_stop_that_cannot_drain_says_goodbye_at_its_deadline() {
    let mut pair = pair_awaiting_commit(10);
    pair.stop(Duration::from_secs(2));
    pair.advance(Duration::from_millis(1990));
    assert!(!pair.agent.is_closed());
    pair.advance(Duration::from_millis(20));
    assert!(pair.agent.is_closed() && pair.hub.is_closed());
    assert_eq!(pair.closed, [("agent", None), ("hub", None)]);
    // Not acknowledged: they stay for the next session.
    assert_eq!(pair.outbox.len(), 10);
    pair.connect();
    pair.auto_commit = true;
    pair.commit();
    pair.drive();
    assert_exactly_once(&pair);
}

#[test]
fn a_stop_past_its_deadline_says_goodbye_at_once() {
    let now = origin();
    let mut agent = streaming_agent(now, 0, 10, AgentConfig::default());
    agent.outbox_committed(Seq(5));
    agent.stop(now, now);
    assert!(agent.is_closed());
    assert_eq!(agent_sent(&mut agent, now), [Frame::Goodbye]);
    assert_eq!(
        agent_events(&mut agent),
        [AgentEvent::Closed { error: None }]
    );
}

#[test]
fn a_stop_does_not_wait_for_events_the_driver_skipped() {
    let now = origin();
    let mut agent = streaming_agent(now, 0, 10, AgentConfig::default());
    agent.outbox_committed(Seq(3));
    agent
        .push_events(vec![(Seq(1), body(1)), (Seq(2), body(2))])
        .expect("pushed");
    // The policy in force denies seq 3.
    agent.skip(Seq(3)).expect("skipped");
    assert_eq!(agent.read_after(), Seq(3));
    agent.stop(now, now + Duration::from_secs(2));
    assert_eq!(agent_sent(&mut agent, now), [batch(&[1, 2])]);
    assert!(!agent.is_closed());
    let ack = Frame::Ack {
        upto: Seq(2),
        window: 10,
    };
    agent.handle_bytes(now, &encode(&[ack])).expect("fine");
    assert_eq!(agent_sent(&mut agent, now), [Frame::Goodbye]);
    assert_eq!(
        agent_events(&mut agent),
        [
            AgentEvent::Acked { upto: Seq(2) },
            AgentEvent::Closed { error: None }
        ]
    );
}

#[test]
fn skipping_out_of_order_or_before_welcome_is_a_usage_error() {
    let now = origin();
    let mut agent = AgentSession::new(now, AgentInfo::default(), AgentConfig::default());
    assert_eq!(agent.skip(Seq(1)), Err(UsageError::NotStreaming));
    let mut agent = streaming_agent(now, 5, 10, AgentConfig::default());
    assert_eq!(
        agent.skip(Seq(5)),
        Err(UsageError::SeqNotIncreasing {
            previous: Seq(5),
            got: Seq(5)
        })
    );
    agent.skip(Seq(7)).expect("skipped");
    assert_eq!(
        agent.push_event(Seq(6), &body(6)),
        Err(UsageError::SeqNotIncreasing {
            previous: Seq(7),
            got: Seq(6)
        })
    );
}

#[test]
fn the_agent_asks_for_events_once_the_window_has_room_for_a_refill() {
    let now = origin();
    let config = AgentConfig {
        refill_at: 4,
        ..AgentConfig::default()
    };
    let mut agent = streaming_agent(now, 0, 10, config);
    // Nothing committed beyond what was read: nothing to ask for.
    assert!(agent_events(&mut agent).is_empty());
    agent.outbox_committed(Seq(100));
    assert!(agent.awaits_events());
    assert_eq!(
        agent_events(&mut agent),
        [AgentEvent::NeedEvents { room: 10 }]
    );
    // Asked once, until the driver answers.
    assert!(agent_events(&mut agent).is_empty());
    agent
        .push_events((1..=10).map(|i| (Seq(i), body(i as i64))).collect())
        .expect("pushed");
    assert!(!agent.awaits_events());
    assert!(agent_events(&mut agent).is_empty());
    let _ = agent_sent(&mut agent, now);
    // Room for 3 while 7 are in flight: below the threshold.
    let ack = |upto| Frame::Ack {
        upto: Seq(upto),
        window: 10,
    };
    agent.handle_bytes(now, &encode(&[ack(3)])).expect("fine");
    assert_eq!(
        agent_events(&mut agent),
        [AgentEvent::Acked { upto: Seq(3) }]
    );
    assert!(!agent.awaits_events());
    // Room for 4: at the threshold.
    agent.handle_bytes(now, &encode(&[ack(4)])).expect("fine");
    assert_eq!(
        agent_events(&mut agent),
        [
            AgentEvent::Acked { upto: Seq(4) },
            AgentEvent::NeedEvents { room: 4 }
        ]
    );
    agent
        .push_events((11..=14).map(|i| (Seq(i), body(i as i64))).collect())
        .expect("pushed");
    let _ = agent_sent(&mut agent, now);
    // Nothing in flight: any room is enough.
    agent.handle_bytes(now, &encode(&[ack(14)])).expect("fine");
    assert_eq!(
        agent_events(&mut agent),
        [
            AgentEvent::Acked { upto: Seq(14) },
            AgentEvent::NeedEvents { room: 10 }
        ]
    );
}

#[test]
fn a_read_that_finds_nothing_is_asked_again_only_when_the_outbox_commits_more() {
    let now = origin();
    let mut agent = streaming_agent(now, 0, 10, AgentConfig::default());
    agent.outbox_committed(Seq(3));
    assert_eq!(
        agent_events(&mut agent),
        [AgentEvent::NeedEvents { room: 10 }]
    );
    // The driver read nothing (seqs 1 to 3 were evicted).
    agent.outbox_committed(Seq(3));
    assert!(agent_events(&mut agent).is_empty());
    agent.outbox_committed(Seq(4));
    assert_eq!(
        agent_events(&mut agent),
        [AgentEvent::NeedEvents { room: 10 }]
    );
}

#[test]
fn a_deferred_agent_asks_for_events_when_the_deferral_ends() {
    let now = origin();
    let mut agent = streaming_agent(now, 0, 10, AgentConfig::default());
    agent.outbox_committed(Seq(3));
    assert_eq!(
        agent_events(&mut agent),
        [AgentEvent::NeedEvents { room: 10 }]
    );
    // The driver read, but a `hold` rate is exhausted for a second: it
    // pushed nothing.
    let until = now + Duration::from_secs(1);
    agent.defer_events(until);
    assert!(!agent.awaits_events());
    assert!(agent_events(&mut agent).is_empty());
    assert_eq!(agent.poll_timeout(), Some(until));
    agent.handle_timeout(until);
    assert_eq!(
        agent_events(&mut agent),
        [AgentEvent::NeedEvents { room: 10 }]
    );
}

#[test]
fn the_pair_refills_only_at_the_threshold() {
    let agent_config = AgentConfig {
        refill_at: 40,
        max_batch_events: 10,
        ..AgentConfig::default()
    };
    let hub_config = HubConfig {
        window: 100,
        ..HubConfig::default()
    };
    let mut pair = Pair::with_configs(agent_config, hub_config);
    pair.auto_commit = false;
    pair.read_chunk = 1000;
    pair.fill(300);
    pair.drive();
    assert_eq!(pair.needs, [100]);
    assert_eq!(pair.hub.highest_received(), Seq(100));
    // The hub acknowledges 30: room below the threshold, no read.
    pair.commit_upto(Seq(30));
    pair.drive();
    assert_eq!(pair.needs, [100]);
    // And 10 more: room for 40, one read.
    pair.commit_upto(Seq(40));
    pair.drive();
    assert_eq!(pair.needs, [100, 40]);
    assert_eq!(pair.hub.highest_received(), Seq(140));
}

#[test]
fn the_agent_asks_for_a_backlog_report_on_its_interval() {
    let now = origin();
    let config = AgentConfig {
        backlog_every: Duration::from_secs(3),
        ..AgentConfig::default()
    };
    let mut agent = streaming_agent(now, 0, 10, config);
    let every = Duration::from_secs(3);
    assert_eq!(agent.poll_timeout(), Some(now + every));
    agent.handle_timeout(now + every - Duration::from_millis(1));
    assert!(agent_events(&mut agent).is_empty());
    agent.handle_timeout(now + every);
    assert_eq!(agent_events(&mut agent), [AgentEvent::ReportBacklog]);
    agent.report_backlog(7, 700, Some(Seq(3)));
    assert_eq!(
        agent_sent(&mut agent, now + every),
        [Frame::Backlog {
            events: 7,
            bytes: 700,
            oldest_seq: Some(Seq(3))
        }]
    );
    // The next on the beat, even when the call comes late.
    agent.handle_timeout(now + every * 2 + Duration::from_millis(500));
    assert_eq!(agent_events(&mut agent), [AgentEvent::ReportBacklog]);
    assert!(agent.poll_timeout() <= Some(now + every * 3));
}

#[test]
fn backlog_reports_reach_the_hub_on_their_interval() {
    let mut pair = Pair::new();
    pair.fill(3);
    pair.drive();
    assert_eq!(pair.backlogs_reported, 0);
    pair.advance(Duration::from_secs(30));
    assert_eq!(pair.backlogs_reported, 6);
}

// ---------------------------------------------------------------------------
// A sink that is down (version 3: `Stored`).

/// A pair whose one sink is down, with `n` events waiting in the outbox.
fn pair_with_sink_down(max_version: u16, window: u32, n: i64) -> Pair {
    let agent_config = AgentConfig {
        max_version,
        max_batch_events: 3,
        ..AgentConfig::default()
    };
    let hub_config = HubConfig {
        window,
        ..HubConfig::default()
    };
    let mut pair = Pair::with_configs(agent_config, hub_config);
    pair.sink_down = true;
    for i in 1..=n {
        pair.outbox.append(0, body(i));
    }
    pair
}

#[test]
fn with_a_sink_down_a_version_3_agent_uploads_past_the_window_and_keeps_everything() {
    let mut pair = pair_with_sink_down(3, 4, 20);
    pair.drive();
    assert!(pair.errors().is_empty(), "{:?}", pair.errors());
    // All of it is stored, none acknowledged: the outbox keeps every event.
    assert_eq!(pair.store.events.len(), 20);
    assert_eq!(pair.store.acked, Seq(0));
    assert_eq!(pair.outbox.len(), 20);
    assert_eq!(pair.agent.held(), Seq(20));
    assert_eq!(pair.agent.acked(), Seq(0));
    assert_eq!(pair.agent.in_flight(), 0);
    assert!(pair.stored_seen > 0);
    // The sink comes back: the acknowledgement deletes everything.
    pair.sink_up();
    pair.drive();
    assert_exactly_once(&pair);
    assert_eq!(pair.agent.acked(), Seq(20));
}

#[test]
fn with_a_sink_down_a_version_2_agent_stops_at_the_window() {
    let mut pair = pair_with_sink_down(2, 4, 20);
    pair.drive();
    assert!(pair.errors().is_empty(), "{:?}", pair.errors());
    assert_eq!(pair.stored_seen, 0);
    assert_eq!(pair.store.events.len(), 4);
    assert_eq!(pair.agent.in_flight(), 4);
    assert_eq!(pair.agent.wants(), 0);
    pair.sink_up();
    pair.drive();
    assert_exactly_once(&pair);
}

#[test]
fn after_a_reconnect_the_agent_resumes_after_what_the_hub_stored_not_after_its_ack() {
    let mut pair = pair_with_sink_down(3, 4, 20);
    pair.drive();
    assert_eq!(pair.store.events.len(), 20);
    pair.reset();
    pair.drive();
    assert!(pair.errors().is_empty(), "{:?}", pair.errors());
    // Welcome says 0 (nothing may be deleted), Stored says 20: nothing is
    // read from the outbox again.
    assert_eq!(pair.connected.last(), Some(&Seq(0)));
    assert_eq!(pair.agent.read_after(), Seq(20));
    assert_eq!(pair.agent.held(), Seq(20));
    assert_eq!(pair.outbox.len(), 20);
    // New events go on past the window while the sink is still down.
    for i in 21..=30 {
        pair.outbox.append(0, body(i));
    }
    pair.drive();
    assert_eq!(pair.store.events.len(), 30);
    assert_eq!(pair.store.ignored_duplicates, 0);
    pair.sink_up();
    pair.drive();
    assert_exactly_once(&pair);
}

#[test]
fn the_hub_sends_stored_only_in_version_3_and_never_what_an_ack_covers() {
    let now = origin();
    // Version 3: a commit the sink has not accepted is `Stored`, and frees
    // the window.
    let mut hub = welcomed_hub(now, 0, 3);
    hub.handle_bytes(now, &encode(&[batch(&[1, 2, 3])]))
        .expect("fine");
    hub.stored(Seq(3)).expect("fine");
    assert_eq!(hub_sent(&mut hub, now), [Frame::Stored { upto: Seq(3) }]);
    hub.handle_bytes(now, &encode(&[batch(&[4, 5, 6])]))
        .expect("the window counts from what is stored");
    // Stored and acknowledged between two polls: the Ack says it all.
    hub.stored(Seq(6)).expect("fine");
    hub.acknowledge(Seq(6)).expect("fine");
    assert_eq!(
        hub_sent(&mut hub, now),
        [Frame::Ack {
            upto: Seq(6),
            window: 3
        }]
    );
    // Version 2: nothing goes out, and the window waits for the Ack.
    let mut hub = HubSession::new(
        now,
        agent_id(),
        Seq(0),
        HubConfig {
            window: 3,
            ..HubConfig::default()
        },
    );
    hub.handle_bytes(now, &encode(&[hello(vec![2, 1])]))
        .expect("hello accepted");
    let _ = hub_sent(&mut hub, now);
    hub.handle_bytes(now, &encode(&[batch(&[1, 2, 3])]))
        .expect("fine");
    hub.stored(Seq(3)).expect("fine");
    assert!(hub_sent(&mut hub, now).is_empty());
    let err = hub
        .handle_bytes(now, &encode(&[batch(&[4])]))
        .expect_err("window full");
    assert_eq!(err.code(), ErrorCode::WindowExceeded);
}

#[test]
fn a_resuming_hub_tells_a_version_3_agent_what_it_holds_right_after_welcome() {
    let now = origin();
    let mut hub = HubSession::new(now, agent_id(), Seq(5), HubConfig::default()).holding(Seq(9));
    // The sink accepts up to 7 before the agent's Hello: Welcome says so,
    // and no Ack comes before it.
    hub.acknowledge(Seq(7)).expect("fine");
    hub.handle_bytes(now, &encode(&[hello(vec![3, 2, 1])]))
        .expect("hello accepted");
    let sent = hub_sent(&mut hub, now);
    assert!(
        matches!(
            sent.as_slice(),
            [
                Frame::Welcome {
                    version: 3,
                    watermark: Seq(7),
                    ..
                },
                Frame::Stored { upto: Seq(9) }
            ]
        ),
        "{sent:?}"
    );
    // A version 2 agent gets the Welcome alone, and sends seqs 8 and 9
    // again, which the hub drops.
    let mut hub = HubSession::new(now, agent_id(), Seq(5), HubConfig::default()).holding(Seq(9));
    hub.handle_bytes(now, &encode(&[hello(vec![2, 1])]))
        .expect("hello accepted");
    assert!(matches!(
        hub_sent(&mut hub, now).as_slice(),
        [Frame::Welcome {
            version: 2,
            watermark: Seq(5),
            ..
        }]
    ));
    // The sink accepts up to 9 now: the agent has not sent 6 to 9 again in
    // this session, and would refuse an Ack for them.
    hub.acknowledge(Seq(9)).expect("fine");
    assert!(hub_sent(&mut hub, now).is_empty());
    hub.handle_bytes(now, &encode(&[batch(&[6, 7])]))
        .expect("fine");
    assert!(matches!(
        hub_sent(&mut hub, now).as_slice(),
        [Frame::Ack { upto: Seq(7), .. }]
    ));
    hub.handle_bytes(now, &encode(&[batch(&[8, 9, 10])]))
        .expect("fine");
    assert!(matches!(
        hub_sent(&mut hub, now).as_slice(),
        [Frame::Ack { upto: Seq(9), .. }]
    ));
    let stored: Vec<Seq> = hub_events(&mut hub)
        .into_iter()
        .flat_map(|e| match e {
            HubEvent::Store { events } => events.into_iter().map(|(s, _)| s).collect(),
            _ => vec![],
        })
        .collect();
    assert_eq!(stored, [Seq(10)]);
}

#[test]
fn the_agent_refuses_a_stored_that_goes_backwards_or_comes_in_version_2() {
    let now = origin();
    let mut agent = streaming_agent(now, 0, 10, AgentConfig::default());
    agent
        .push_events(vec![(Seq(1), body(1)), (Seq(2), body(2))])
        .expect("fine");
    let _ = agent_sent(&mut agent, now);
    agent
        .handle_bytes(now, &encode(&[Frame::Stored { upto: Seq(2) }]))
        .expect("fine");
    assert_eq!(
        agent_events(&mut agent),
        [AgentEvent::Stored { upto: Seq(2) }]
    );
    assert_eq!(agent.in_flight(), 0);
    let err = agent
        .handle_bytes(now, &encode(&[Frame::Stored { upto: Seq(1) }]))
        .expect_err("backwards");
    assert_eq!(err.code(), ErrorCode::InvalidAck);
    assert_eq!(
        error_code(&agent_sent(&mut agent, now)),
        Some(ErrorCode::InvalidAck)
    );

    let mut agent = AgentSession::new(now, AgentInfo::default(), AgentConfig::default());
    let _ = agent_sent(&mut agent, now);
    let welcome = Frame::Welcome {
        version: 2,
        watermark: Seq(0),
        window: 10,
    };
    let err = agent
        .handle_bytes(now, &encode(&[welcome, Frame::Stored { upto: Seq(1) }]))
        .expect_err("no Stored in version 2");
    assert_eq!(err.code(), ErrorCode::UnexpectedFrame);
}

#[test]
fn a_stored_beyond_what_the_agent_sent_moves_where_it_reads_from() {
    let now = origin();
    let mut agent = streaming_agent(now, 4, 10, AgentConfig::default());
    agent
        .handle_bytes(now, &encode(&[Frame::Stored { upto: Seq(9) }]))
        .expect("fine");
    assert_eq!(agent.read_after(), Seq(9));
    assert_eq!(
        agent.push_event(Seq(9), &body(9)),
        Err(UsageError::SeqNotIncreasing {
            previous: Seq(9),
            got: Seq(9)
        })
    );
    agent.push_event(Seq(10), &body(10)).expect("fine");
    let _ = agent_sent(&mut agent, now);
    // An Ack of what the hub holds is no longer beyond what was sent.
    agent
        .handle_bytes(
            now,
            &encode(&[Frame::Ack {
                upto: Seq(9),
                window: 10,
            }]),
        )
        .expect("fine");
    assert_eq!(agent.acked(), Seq(9));
}
// ---------------------------------------------------------------------------
// Heartbeats and timeouts.

#[test]
fn heartbeats_keep_an_idle_connection_alive() {
    let mut pair = Pair::new();
    pair.drive();
    pair.advance(Duration::from_secs(600));
    assert!(pair.errors().is_empty(), "{:?}", pair.errors());
    assert!(pair.agent.is_streaming() && pair.hub.is_streaming());
}

#[test]
fn the_agent_sends_a_heartbeat_when_idle() {
    let now = origin();
    let config = AgentConfig::default();
    let mut agent = streaming_agent(now, 0, 10, config.clone());
    assert_eq!(agent.poll_timeout(), Some(now + config.heartbeat));
    agent.handle_timeout(now + config.heartbeat);
    assert_eq!(
        agent_sent(&mut agent, now + config.heartbeat),
        [Frame::Heartbeat]
    );
    assert_eq!(agent.poll_timeout(), Some(now + config.heartbeat * 2));
}

#[test]
fn a_silent_hub_times_the_agent_out() {
    let now = origin();
    let config = AgentConfig::default();
    let mut agent = streaming_agent(now, 0, 10, config.clone());
    let later = now + config.idle_timeout;
    agent.handle_timeout(later - Duration::from_millis(1));
    assert!(!agent.is_closed());
    agent.handle_timeout(later);
    assert!(agent.is_closed());
    assert_eq!(agent.poll_timeout(), None);
    assert_eq!(
        error_code(&agent_sent(&mut agent, later)),
        Some(ErrorCode::Timeout)
    );
    assert_eq!(
        closed_error_of_agent(&mut agent),
        Some(ProtocolError::IdleTimeout {
            silent: config.idle_timeout
        })
    );
}

#[test]
fn a_hub_that_never_welcomes_times_the_handshake_out() {
    let now = origin();
    let mut agent = AgentSession::new(now, AgentInfo::default(), AgentConfig::default());
    let _ = agent_sent(&mut agent, now);
    let deadline = agent.poll_timeout().expect("a deadline");
    assert_eq!(deadline, now + AgentConfig::default().idle_timeout);
    agent.handle_timeout(deadline);
    assert_eq!(
        closed_error_of_agent(&mut agent).map(|e| e.code()),
        Some(ErrorCode::Timeout)
    );
}

#[test]
fn an_agent_that_never_says_hello_times_out() {
    let now = origin();
    let mut hub = HubSession::new(now, agent_id(), Seq(0), HubConfig::default());
    let deadline = hub.poll_timeout().expect("a deadline");
    hub.handle_timeout(deadline);
    assert!(hub.is_closed());
    assert_eq!(
        error_code(&hub_sent(&mut hub, deadline)),
        Some(ErrorCode::Timeout)
    );
}

#[test]
fn a_partial_frame_counts_as_life() {
    let now = origin();
    let config = HubConfig::default();
    let mut hub = welcomed_hub(now, 0, 10);
    let half = config.idle_timeout / 2;
    let bytes = encode(&[batch(&[1])]);
    hub.handle_bytes(now + half, &bytes[..3]).expect("fine");
    hub.handle_timeout(now + config.idle_timeout);
    assert!(!hub.is_closed());
}

// ---------------------------------------------------------------------------
// Bad peers.

#[test]
fn an_oversized_frame_closes_the_hub_with_frame_too_large() {
    let now = origin();
    let mut hub = welcomed_hub(now, 0, 10);
    let len = (MAX_FRAME_LEN as u32 + 1).to_be_bytes();
    let err = hub.handle_bytes(now, &len).expect_err("refused");
    assert_eq!(err.code(), ErrorCode::FrameTooLarge);
    assert_eq!(err.code().to_u32(), 2);
    assert_eq!(
        error_code(&hub_sent(&mut hub, now)),
        Some(ErrorCode::FrameTooLarge)
    );
    // Further bytes are ignored.
    hub.handle_bytes(now, &[0; 1000]).expect("ignored");
}

#[test]
fn garbage_bytes_close_the_hub_with_malformed() {
    let now = origin();
    let mut hub = HubSession::new(now, agent_id(), Seq(0), HubConfig::default());
    let err = hub
        .handle_bytes(now, &[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff])
        .expect_err("refused");
    assert_eq!(err.code(), ErrorCode::Malformed);
    assert_eq!(
        error_code(&hub_sent(&mut hub, now)),
        Some(ErrorCode::Malformed)
    );
}

#[test]
fn garbage_bytes_close_the_agent_with_malformed() {
    let now = origin();
    let mut agent = streaming_agent(now, 0, 10, AgentConfig::default());
    let err = agent
        .handle_bytes(now, &[0, 0, 0, 2, 4, 0x80])
        .expect_err("refused");
    assert_eq!(err.code(), ErrorCode::Malformed);
}

#[test]
fn a_batch_before_hello_is_an_unexpected_frame() {
    let now = origin();
    let mut hub = HubSession::new(now, agent_id(), Seq(0), HubConfig::default());
    let err = hub
        .handle_bytes(now, &encode(&[batch(&[1])]))
        .expect_err("refused");
    assert_eq!(
        err,
        ProtocolError::UnexpectedFrame {
            frame: "Batch",
            state: "awaiting Hello"
        }
    );
    assert_eq!(
        error_code(&hub_sent(&mut hub, now)),
        Some(ErrorCode::UnexpectedFrame)
    );
    assert!(hub_events(&mut hub)
        .iter()
        .all(|e| !matches!(e, HubEvent::Store { .. })));
}

#[test]
fn a_second_hello_is_an_unexpected_frame() {
    let now = origin();
    let mut hub = welcomed_hub(now, 0, 10);
    let err = hub
        .handle_bytes(now, &encode(&[hello(vec![1])]))
        .expect_err("refused");
    assert_eq!(
        err,
        ProtocolError::UnexpectedFrame {
            frame: "Hello",
            state: "streaming"
        }
    );
}

#[test]
fn hub_frames_sent_by_an_agent_are_unexpected() {
    let now = origin();
    for frame in [
        Frame::Welcome {
            version: 1,
            watermark: Seq(0),
            window: 1,
        },
        Frame::Ack {
            upto: Seq(0),
            window: 1,
        },
    ] {
        let mut hub = welcomed_hub(now, 0, 10);
        let err = hub
            .handle_bytes(now, &encode(&[frame]))
            .expect_err("refused");
        assert_eq!(err.code(), ErrorCode::UnexpectedFrame);
    }
}

#[test]
fn agent_frames_sent_by_a_hub_are_unexpected() {
    let now = origin();
    for frame in [hello(vec![1]), batch(&[1]), Frame::Goodbye] {
        let mut agent = streaming_agent(now, 0, 10, AgentConfig::default());
        let err = agent
            .handle_bytes(now, &encode(&[frame]))
            .expect_err("refused");
        assert_eq!(err.code(), ErrorCode::UnexpectedFrame);
    }
    // An Ack before Welcome, too.
    let mut agent = AgentSession::new(now, AgentInfo::default(), AgentConfig::default());
    let ack = Frame::Ack {
        upto: Seq(0),
        window: 1,
    };
    let err = agent
        .handle_bytes(now, &encode(&[ack]))
        .expect_err("refused");
    assert_eq!(
        err,
        ProtocolError::UnexpectedFrame {
            frame: "Ack",
            state: "awaiting Welcome"
        }
    );
}

#[test]
fn decreasing_seqs_close_with_seq_not_increasing() {
    let now = origin();
    let mut hub = welcomed_hub(now, 0, 100);
    let err = hub
        .handle_bytes(now, &encode(&[batch(&[1, 5, 4])]))
        .expect_err("refused");
    assert_eq!(
        err,
        ProtocolError::SeqNotIncreasing {
            previous: Seq(5),
            got: Seq(4)
        }
    );
    // The refused batch handed nothing to the store.
    assert!(hub_events(&mut hub)
        .iter()
        .all(|e| !matches!(e, HubEvent::Store { .. })));
    // Across batches, and for a repeated seq.
    let mut hub = welcomed_hub(now, 0, 100);
    hub.handle_bytes(now, &encode(&[batch(&[1, 2])]))
        .expect("fine");
    let err = hub
        .handle_bytes(now, &encode(&[batch(&[2])]))
        .expect_err("refused");
    assert_eq!(
        err,
        ProtocolError::SeqNotIncreasing {
            previous: Seq(2),
            got: Seq(2)
        }
    );
    assert_eq!(err.code(), ErrorCode::SeqNotIncreasing);
}

#[test]
fn an_agent_beyond_its_window_is_refused() {
    let now = origin();
    let mut hub = welcomed_hub(now, 0, 3);
    hub.handle_bytes(now, &encode(&[batch(&[1, 2, 3])]))
        .expect("within the window");
    hub.acknowledge(Seq(2)).expect("fine");
    // Two acknowledged: two more may come.
    hub.handle_bytes(now, &encode(&[batch(&[4, 5])]))
        .expect("within the window");
    let err = hub
        .handle_bytes(now, &encode(&[batch(&[6])]))
        .expect_err("refused");
    assert_eq!(
        err,
        ProtocolError::WindowExceeded {
            acked: Seq(2),
            window: 3,
            in_flight: 4
        }
    );
    assert_eq!(
        error_code(&hub_sent(&mut hub, now)),
        Some(ErrorCode::WindowExceeded)
    );
}

#[test]
fn an_ack_beyond_what_was_sent_closes_the_agent() {
    let now = origin();
    let mut agent = streaming_agent(now, 5, 10, AgentConfig::default());
    agent.push_event(Seq(6), &body(6)).expect("pushed");
    // Pushed but not yet transmitted: the hub cannot have it.
    let ack = Frame::Ack {
        upto: Seq(6),
        window: 10,
    };
    let err = agent
        .handle_bytes(now, &encode(&[ack]))
        .expect_err("refused");
    assert_eq!(
        err,
        ProtocolError::AckBeyondSent {
            sent: Seq(5),
            got: Seq(6)
        }
    );
    assert_eq!(err.code(), ErrorCode::InvalidAck);
}

#[test]
fn an_ack_going_backwards_closes_the_agent() {
    let now = origin();
    let mut agent = streaming_agent(now, 5, 10, AgentConfig::default());
    let ack = Frame::Ack {
        upto: Seq(4),
        window: 10,
    };
    let err = agent
        .handle_bytes(now, &encode(&[ack]))
        .expect_err("refused");
    assert_eq!(
        err,
        ProtocolError::AckWentBackwards {
            previous: Seq(5),
            got: Seq(4)
        }
    );
}

#[test]
fn an_ack_updates_the_window_and_reports_the_progress() {
    let now = origin();
    let mut agent = streaming_agent(now, 0, 2, AgentConfig::default());
    agent
        .push_events(vec![(Seq(1), body(1)), (Seq(2), body(2))])
        .expect("pushed");
    let _ = agent_sent(&mut agent, now);
    assert_eq!(agent.wants(), 0);
    let ack = Frame::Ack {
        upto: Seq(1),
        window: 5,
    };
    agent.handle_bytes(now, &encode(&[ack])).expect("fine");
    assert_eq!(
        agent_events(&mut agent),
        [AgentEvent::Acked { upto: Seq(1) }]
    );
    assert_eq!(agent.wants(), 4);
    // A window-only update reports nothing.
    let ack = Frame::Ack {
        upto: Seq(1),
        window: 1,
    };
    agent.handle_bytes(now, &encode(&[ack])).expect("fine");
    assert!(agent_events(&mut agent).is_empty());
    assert_eq!(agent.wants(), 0);
}

#[test]
fn an_error_frame_from_the_peer_closes_with_its_code() {
    let now = origin();
    let mut agent = streaming_agent(now, 0, 10, AgentConfig::default());
    let error = Frame::Error {
        code: ErrorCode::Unknown(4242),
        message: "from the future".into(),
    };
    let err = agent
        .handle_bytes(now, &encode(&[error]))
        .expect_err("closed");
    assert_eq!(err.code(), ErrorCode::Unknown(4242));
    assert!(err.is_from_peer());
    // No error is sent back in answer to an error.
    assert!(agent_sent(&mut agent, now).is_empty());
}

#[test]
fn a_hello_breaking_a_limit_is_malformed() {
    let now = origin();
    let labels: BTreeMap<String, String> = (0..=MAX_LABELS)
        .map(|i| (format!("k{i}"), "v".to_owned()))
        .collect();
    let frame = Frame::Hello {
        versions: vec![1],
        agent_version: "x".into(),
        labels: labels.clone(),
    };
    let mut hub = HubSession::new(now, agent_id(), Seq(0), HubConfig::default());
    let err = hub
        .handle_bytes(now, &encode(&[frame]))
        .expect_err("refused");
    assert!(matches!(err, ProtocolError::InvalidHello { .. }));
    assert_eq!(err.code(), ErrorCode::Malformed);
    // The agent refuses to send such a Hello in the first place.
    let info = AgentInfo {
        agent_version: "x".into(),
        labels,
    };
    let mut agent = AgentSession::new(now, info, AgentConfig::default());
    assert!(agent.is_closed());
    assert!(agent_sent(&mut agent, now).is_empty());
    assert!(matches!(
        closed_error_of_agent(&mut agent),
        Some(ProtocolError::InvalidHello { .. })
    ));
}

#[test]
fn bytes_after_close_are_ignored() {
    let now = origin();
    let mut hub = welcomed_hub(now, 0, 10);
    hub.close(ErrorCode::Superseded, "a newer connection");
    hub.handle_bytes(now, &encode(&[batch(&[1])]))
        .expect("ignored");
    assert!(hub_events(&mut hub)
        .iter()
        .all(|e| !matches!(e, HubEvent::Store { .. })));
    assert_eq!(
        error_code(&hub_sent(&mut hub, now)),
        Some(ErrorCode::Superseded)
    );
}

// ---------------------------------------------------------------------------
// Properties.

#[derive(Debug, Clone)]
enum Action {
    /// Drive until nothing is in flight.
    Deliver,
    /// A little progress only.
    Steps(u8),
    /// The agent accepts new events, after a gap of evicted seqs.
    Append { count: u8, gap: u8 },
    /// The outbox evicts its oldest event.
    Evict,
    /// A chunk in flight is lost: the connection breaks.
    Drop(prop::sample::Index),
    /// The connection breaks.
    Reset,
    /// The connection breaks and the hub reads a stale watermark.
    StaleReconnect,
    /// The connection breaks and the agent resends what the hub has.
    ReplayReconnect,
    /// The hub restarts; what it had not committed is lost.
    HubRestart,
    /// The agent restarts; its outbox stays.
    AgentRestart,
    /// The agent's certificate is due for renewal now.
    RenewNow,
    /// The store commits.
    Commit,
    /// The sink goes down: commits are stored, not acknowledged.
    SinkDown,
    /// The sink comes back and accepts everything stored.
    SinkUp,
}

fn arb_action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => Just(Action::Deliver),
        4 => (1u8..20).prop_map(Action::Steps),
        2 => (1u8..30, 0u8..4).prop_map(|(count, gap)| Action::Append { count, gap }),
        1 => Just(Action::Evict),
        2 => any::<prop::sample::Index>().prop_map(Action::Drop),
        1 => Just(Action::Reset),
        1 => Just(Action::StaleReconnect),
        2 => Just(Action::ReplayReconnect),
        1 => Just(Action::HubRestart),
        1 => Just(Action::AgentRestart),
        2 => Just(Action::Commit),
        1 => Just(Action::SinkDown),
        1 => Just(Action::SinkUp),
        1 => Just(Action::RenewNow),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_interleaving_of_loss_duplication_and_restarts_stores_each_seq_once(
        initial in prop::collection::vec(0u64..4, 0..80),
        actions in prop::collection::vec(arb_action(), 0..40),
        auto_commit in any::<bool>(),
        window in 1u32..64,
        max_batch_events in 1usize..16,
        latency_ms in 0u64..50,
        max_version in 1u16..=PROTOCOL_VERSION,
    ) {
        let agent_config = AgentConfig { max_batch_events, max_version, ..AgentConfig::default() };
        let hub_config = HubConfig { window, ..HubConfig::default() };
        let mut pair = Pair::with_configs(agent_config, hub_config);
        pair.latency = Duration::from_millis(latency_ms);
        pair.mtu = 64;
        pair.auto_commit = auto_commit;
        let mut n = 0i64;
        for gap in initial {
            n += 1;
            pair.outbox.append(gap, body(n));
        }
        let mut stale = false;
        for action in actions {
            match action {
                Action::Deliver => pair.drive(),
                Action::Steps(k) => {
                    for _ in 0..k {
                        pair.step();
                    }
                }
                Action::Append { count, gap } => {
                    for i in 0..count {
                        n += 1;
                        pair.outbox.append(if i == 0 { u64::from(gap) } else { 0 }, body(n));
                    }
                }
                Action::Evict => {
                    pair.outbox.evict_oldest();
                }
                Action::Drop(index) => pair.drop_in_flight(index),
                Action::Reset => pair.reset(),
                Action::StaleReconnect => {
                    stale = true;
                    pair.reset_stale();
                }
                Action::ReplayReconnect => pair.reset_with_replay(),
                Action::HubRestart => pair.hub_restart(),
                Action::AgentRestart => pair.agent_restart(),
                Action::Commit => pair.commit(),
                Action::SinkDown => pair.sink_down = true,
                Action::SinkUp => pair.sink_up(),
                Action::RenewNow => {
                    let now = pair.now;
                    pair.agent.set_renewal(Some(now));
                }
            }
            prop_assert!(pair.errors().is_empty(), "{:?}", pair.errors());
        }
        // Heal: commit as it comes, the sink accepts, and drain.
        pair.auto_commit = true;
        pair.commit();
        pair.sink_up();
        for _ in 0..50 {
            if pair.outbox.is_empty() {
                break;
            }
            pair.drive();
        }
        prop_assert!(pair.errors().is_empty(), "{:?}", pair.errors());
        assert_exactly_once(&pair);
        if !stale {
            // With a fresh watermark, the wire alone kept out every duplicate.
            prop_assert_eq!(pair.store.ignored_duplicates, 0);
        }
    }

    #[test]
    fn random_bytes_never_panic_either_session(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..8),
        streaming in any::<bool>(),
    ) {
        let now = origin();
        let mut hub = if streaming {
            welcomed_hub(now, 3, 10)
        } else {
            HubSession::new(now, agent_id(), Seq(3), HubConfig::default())
        };
        let mut agent = if streaming {
            streaming_agent(now, 3, 10, AgentConfig::default())
        } else {
            AgentSession::new(now, AgentInfo::default(), AgentConfig::default())
        };
        let _ = agent_sent(&mut agent, now);
        for chunk in &chunks {
            let h = hub.handle_bytes(now, chunk);
            let a = agent.handle_bytes(now, chunk);
            if let Err(e) = h {
                prop_assert_eq!(error_code(&hub_sent(&mut hub, now)), (!e.is_from_peer()).then(|| e.code()));
            }
            if let Err(e) = a {
                prop_assert_eq!(error_code(&agent_sent(&mut agent, now)), (!e.is_from_peer()).then(|| e.code()));
            }
        }
        let _ = hub_sent(&mut hub, now);
        let _ = hub_events(&mut hub);
        let _ = agent_sent(&mut agent, now);
        let _ = agent_events(&mut agent);
    }

    #[test]
    fn any_sequence_of_frames_never_panics_either_session(
        frames in prop::collection::vec(arb_frame(), 0..8),
    ) {
        let now = origin();
        let mut hub = HubSession::new(now, agent_id(), Seq(3), HubConfig::default());
        let mut agent = AgentSession::new(now, AgentInfo::default(), AgentConfig::default());
        // The hub never hands out a seq at or below what it has.
        let mut highest = Seq(3);
        for frame in &frames {
            let bytes = encode(std::slice::from_ref(frame));
            let _ = hub.handle_bytes(now, &bytes);
            let _ = agent.handle_bytes(now, &bytes);
            let _ = hub_sent(&mut hub, now);
            let _ = agent_sent(&mut agent, now);
            for event in hub_events(&mut hub) {
                if let HubEvent::Store { events } = event {
                    for (seq, _) in events {
                        prop_assert!(seq > highest);
                        highest = seq;
                    }
                }
            }
            let _ = hub.acknowledge(hub.highest_received());
        }
    }
}

#[test]
fn stream_names_in_batches_are_checked_on_decode() {
    // A batch whose stream name holds a wildcard does not decode: the hub never
    // stores an event the event model would refuse.
    let good = EventBody {
        stream: StreamName::parse("plant/a").expect("valid"),
        ts: Timestamp(0),
        value: Value::Bool(true),
        quality: Default::default(),
        attrs: BTreeMap::new(),
    };
    let mut bytes = encode(&[Frame::Batch {
        events: vec![(Seq(1), good)],
    }]);
    let at = bytes
        .windows(7)
        .position(|w| w == b"plant/a")
        .expect("the name is in the frame");
    bytes[at + 6] = b'#';
    let now = origin();
    let mut hub = welcomed_hub(now, 0, 10);
    let err = hub.handle_bytes(now, &bytes).expect_err("refused");
    assert_eq!(err.code(), ErrorCode::Malformed);
}

// ---------------------------------------------------------------------------
// Certificate renewal (version 4).

#[test]
fn the_agent_renews_when_due_while_its_events_keep_flowing() {
    let mut pair = Pair::new();
    pair.fill(50);
    pair.drive();
    let due = pair.now + Duration::from_secs(3);
    pair.agent.set_renewal(Some(due));
    pair.advance(Duration::from_secs(2));
    assert!(pair.renewals_due.is_empty(), "not due yet");
    pair.fill(50);
    pair.advance(Duration::from_secs(2));
    pair.fill(50);
    pair.drive();
    assert_eq!(pair.renewals_due.len(), 1, "asked once, when due");
    assert!(pair.renewals_due[0] >= due);
    assert_eq!(pair.renew_requests, [b"csr 1".to_vec()]);
    assert_eq!(pair.renewed, ["cert for csr 1"]);
    // The session did not end, and every event arrived once.
    assert_eq!(pair.connections, 1);
    assert!(pair.closed.is_empty(), "{:?}", pair.closed);
    assert_exactly_once(&pair);
    // The new certificate is due far ahead: nothing more is asked.
    pair.advance(Duration::from_secs(60));
    assert_eq!(pair.renewals_due.len(), 1);
}

#[test]
fn a_renewal_due_before_welcome_is_asked_once_streaming() {
    let now = origin();
    let mut agent = AgentSession::new(now, AgentInfo::default(), AgentConfig::default());
    agent.set_renewal(Some(now));
    let _ = agent_sent(&mut agent, now);
    agent.handle_timeout(now);
    assert!(!agent_events(&mut agent).contains(&AgentEvent::RenewDue));
    let welcome = Frame::Welcome {
        version: PROTOCOL_VERSION,
        watermark: Seq(0),
        window: 10,
    };
    agent
        .handle_bytes(now, &encode(&[welcome]))
        .expect("welcome");
    let _ = agent_events(&mut agent);
    assert!(agent.poll_timeout().expect("a timer") <= now);
    agent.handle_timeout(now);
    assert_eq!(agent_events(&mut agent), [AgentEvent::RenewDue]);
    // Asked once until answered.
    agent.handle_timeout(now);
    assert!(agent_events(&mut agent).is_empty());
    agent.renew(vec![1, 2, 3]).expect("renew");
    assert_eq!(
        agent_sent(&mut agent, now),
        [Frame::Renew { csr: vec![1, 2, 3] }]
    );
    assert!(agent.is_renewing());
    assert!(matches!(agent.renew(vec![4]), Err(UsageError::Renewal(_))));
}

#[test]
fn a_refused_renewal_is_asked_again_after_the_retry_interval() {
    let config = AgentConfig {
        renew_retry: Duration::from_secs(30),
        heartbeat: Duration::from_secs(5),
        ..AgentConfig::default()
    };
    let mut pair = Pair::with_configs(config, HubConfig::default());
    pair.hub_signs = false;
    pair.drive();
    let start = pair.now;
    pair.agent.set_renewal(Some(start));
    pair.advance(Duration::from_secs(10));
    assert_eq!(pair.renewals_due.len(), 1);
    assert_eq!(pair.renew_refused, ["renewal is not configured"]);
    assert!(pair.renewed.is_empty());
    pair.advance(Duration::from_secs(15));
    assert_eq!(pair.renewals_due.len(), 1, "not before the retry interval");
    pair.hub_signs = true;
    pair.advance(Duration::from_secs(10));
    assert_eq!(pair.renewals_due.len(), 2);
    assert!(pair.renewals_due[1] >= start + Duration::from_secs(30));
    assert_eq!(pair.renewed, ["cert for csr 2"]);
    assert!(pair.closed.is_empty(), "{:?}", pair.closed);
}

#[test]
fn peers_before_version_4_never_see_renewal_frames() {
    // An agent that speaks version 3 at most is never asked to renew, and
    // cannot send a request.
    let config = AgentConfig {
        max_version: 3,
        ..AgentConfig::default()
    };
    let mut pair = Pair::with_configs(config, HubConfig::default());
    pair.drive();
    assert_eq!(pair.agent.version(), Some(3));
    pair.agent.set_renewal(Some(pair.now));
    pair.advance(Duration::from_secs(10));
    assert!(pair.renewals_due.is_empty());
    assert!(matches!(
        pair.agent.renew(vec![1]),
        Err(UsageError::NoRenewFrames { version: 3 })
    ));
    assert!(pair.closed.is_empty(), "{:?}", pair.closed);
    // A hub that negotiated version 3 refuses a `Renew` as unexpected.
    let now = origin();
    let mut hub = HubSession::new(now, agent_id(), Seq(0), HubConfig::default());
    hub.handle_bytes(now, &encode(&[hello(vec![3])]))
        .expect("hello");
    let err = hub
        .handle_bytes(now, &encode(&[Frame::Renew { csr: vec![1] }]))
        .expect_err("refused");
    assert_eq!(err.code(), ErrorCode::UnexpectedFrame);
}

#[test]
fn renewal_frames_out_of_turn_or_over_their_limits_close_the_session() {
    let now = origin();
    // A second `Renew` while one is outstanding.
    let mut hub = welcomed_hub(now, 0, 10);
    hub.handle_bytes(now, &encode(&[Frame::Renew { csr: vec![1] }]))
        .expect("first");
    assert_eq!(hub_events(&mut hub), [HubEvent::Renew { csr: vec![1] }]);
    let err = hub
        .handle_bytes(now, &encode(&[Frame::Renew { csr: vec![2] }]))
        .expect_err("second");
    assert_eq!(err.code(), ErrorCode::UnexpectedFrame);
    // A request over the limit.
    let mut hub = welcomed_hub(now, 0, 10);
    let err = hub
        .handle_bytes(
            now,
            &encode(&[Frame::Renew {
                csr: vec![0; MAX_CSR_LEN + 1],
            }]),
        )
        .expect_err("too long");
    assert_eq!(err.code(), ErrorCode::Malformed);
    // The driver cannot answer what was not asked, nor with too much.
    let mut hub = welcomed_hub(now, 0, 10);
    assert!(matches!(
        hub.renewed(Renewal::Refused {
            reason: "no".into()
        }),
        Err(UsageError::Renewal(_))
    ));
    hub.handle_bytes(now, &encode(&[Frame::Renew { csr: vec![1] }]))
        .expect("asked");
    assert!(matches!(
        hub.renewed(Renewal::Issued {
            cert_pem: "x".repeat(MAX_CERT_PEM_LEN + 1)
        }),
        Err(UsageError::TooLarge { .. })
    ));
    hub.renewed(Renewal::Refused {
        reason: "é".repeat(MAX_ERROR_MESSAGE_LEN),
    })
    .expect("answered");
    match hub_sent(&mut hub, now).as_slice() {
        [Frame::Renewed {
            result: Renewal::Refused { reason },
        }] => assert!(reason.len() <= MAX_ERROR_MESSAGE_LEN),
        other => panic!("{other:?}"),
    }
    // An agent that asked nothing refuses a `Renewed`.
    let mut agent = streaming_agent(now, 0, 10, AgentConfig::default());
    let renewed = Frame::Renewed {
        result: Renewal::Issued {
            cert_pem: "pem".into(),
        },
    };
    let err = agent
        .handle_bytes(now, &encode(&[renewed]))
        .expect_err("unasked");
    assert_eq!(err.code(), ErrorCode::UnexpectedFrame);
    // And one that asked refuses a certificate over the limit.
    let mut agent = streaming_agent(now, 0, 10, AgentConfig::default());
    agent.renew(vec![1]).expect("renew");
    let renewed = Frame::Renewed {
        result: Renewal::Issued {
            cert_pem: "x".repeat(MAX_CERT_PEM_LEN + 1),
        },
    };
    let err = agent
        .handle_bytes(now, &encode(&[renewed]))
        .expect_err("too long");
    assert_eq!(err.code(), ErrorCode::Malformed);
}

// ---------------------------------------------------------------------------
// Commands (frames 14 and 15, version 4).

fn read_command(id: &str) -> command::CommandRequest {
    command::CommandRequest {
        id: command::CommandId::parse(id).expect("valid id"),
        expires_at: Timestamp(i64::MAX),
        role: "operator".into(),
        action: command::Action::Read {
            stream: StreamName::parse("plc1/setpoint").expect("valid"),
        },
    }
}

fn hub_at_version(now: Instant, version: u16) -> HubSession {
    let mut hub = HubSession::new(now, agent_id(), Seq(0), HubConfig::default());
    hub.handle_bytes(now, &encode(&[hello(vec![version])]))
        .expect("hello accepted");
    let _ = hub_sent(&mut hub, now);
    let _ = hub_events(&mut hub);
    hub
}

fn commands_in(frames: &[Frame]) -> Vec<String> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Command { command } => Some(command.id.to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_command_reaches_the_agent_and_its_result_the_hub() {
    let now = origin();
    let mut hub = welcomed_hub(now, 0, 10);
    let mut agent = streaming_agent(now, 0, 10, AgentConfig::default());
    assert_eq!(hub.send_command(read_command("c1")), Ok(true));
    let frames = hub_sent(&mut hub, now);
    assert_eq!(commands_in(&frames), ["c1"]);
    agent.handle_bytes(now, &encode(&frames)).expect("command");
    assert_eq!(
        agent_events(&mut agent),
        [AgentEvent::Command {
            command: read_command("c1")
        }]
    );
    assert_eq!(agent.commands_open(), 1);
    let id = command::CommandId::parse("c1").expect("valid");
    let outcome = command::Outcome::Applied {
        value: Some(Value::I64(7)),
    };
    agent
        .command_result(&id, outcome.clone())
        .expect("reported");
    // Answered once: a second report of the same command is refused.
    assert_eq!(
        agent.command_result(&id, outcome.clone()),
        Err(UsageError::UnknownCommand(id.clone()))
    );
    let frames = agent_sent(&mut agent, now);
    hub.handle_bytes(now, &encode(&frames)).expect("result");
    assert_eq!(
        hub_events(&mut hub),
        [HubEvent::CommandResult {
            id: id.clone(),
            outcome
        }]
    );
    assert!(!hub.has_command(&id));
    // A result for a command no longer outstanding closes the hub's session.
    let err = hub
        .handle_bytes(now, &encode(&frames))
        .expect_err("not outstanding");
    assert_eq!(err.code(), ErrorCode::UnexpectedFrame);
}

#[test]
fn an_agent_of_an_older_version_gets_no_command() {
    let now = origin();
    for version in 1..4 {
        let mut hub = hub_at_version(now, version);
        assert_eq!(hub.send_command(read_command("c1")), Ok(false));
        assert!(commands_in(&hub_sent(&mut hub, now)).is_empty());
        assert_eq!(hub.commands_open(), 0);
    }
    // And an agent session that negotiated version 3 refuses the frame.
    let mut agent = AgentSession::new(
        now,
        AgentInfo::default(),
        AgentConfig {
            max_version: 3,
            ..AgentConfig::default()
        },
    );
    let _ = agent_sent(&mut agent, now);
    let welcome = Frame::Welcome {
        version: 3,
        watermark: Seq(0),
        window: 10,
    };
    agent
        .handle_bytes(now, &encode(&[welcome]))
        .expect("welcome");
    let err = agent
        .handle_bytes(
            now,
            &encode(&[Frame::Command {
                command: read_command("c1"),
            }]),
        )
        .expect_err("no commands in version 3");
    assert_eq!(err.code(), ErrorCode::UnexpectedFrame);
}

#[test]
fn a_command_given_twice_in_a_session_is_sent_once() {
    let now = origin();
    let mut hub = welcomed_hub(now, 0, 10);
    assert_eq!(hub.send_command(read_command("c1")), Ok(true));
    assert_eq!(hub.send_command(read_command("c1")), Ok(true));
    assert_eq!(commands_in(&hub_sent(&mut hub, now)), ["c1"]);
    // A command over its limits is refused and changes nothing.
    let mut bad = read_command("c2");
    bad.action = command::Action::Publish {
        topic: "a/#".into(),
        payload: vec![],
        qos: 0,
        retain: false,
    };
    assert!(matches!(
        hub.send_command(bad),
        Err(UsageError::InvalidCommand(_))
    ));
    assert_eq!(hub.commands_open(), 1);
}

#[test]
fn commands_out_of_turn_or_over_their_limits_close_the_agents_session() {
    let now = origin();
    // The same id twice in one session.
    let mut agent = streaming_agent(now, 0, 10, AgentConfig::default());
    let twice = encode(&[
        Frame::Command {
            command: read_command("c1"),
        },
        Frame::Command {
            command: read_command("c1"),
        },
    ]);
    let err = agent.handle_bytes(now, &twice).expect_err("twice");
    assert_eq!(err.code(), ErrorCode::UnexpectedFrame);
    // More than may be outstanding.
    let mut agent = streaming_agent(now, 0, 10, AgentConfig::default());
    let many: Vec<Frame> = (0..=command::MAX_COMMANDS_IN_FLIGHT)
        .map(|i| Frame::Command {
            command: read_command(&format!("c{i}")),
        })
        .collect();
    let err = agent.handle_bytes(now, &encode(&many)).expect_err("many");
    assert_eq!(err.code(), ErrorCode::WindowExceeded);
    // A publish with a wildcard topic (which the codec carries).
    let mut agent = streaming_agent(now, 0, 10, AgentConfig::default());
    let mut bad = read_command("c1");
    bad.action = command::Action::Publish {
        topic: "a/+".into(),
        payload: vec![],
        qos: 0,
        retain: false,
    };
    let err = agent
        .handle_bytes(now, &encode(&[Frame::Command { command: bad }]))
        .expect_err("wildcard");
    assert_eq!(err.code(), ErrorCode::Malformed);
    // A result before any command, at the hub.
    let mut hub = welcomed_hub(now, 0, 10);
    let err = hub
        .handle_bytes(
            now,
            &encode(&[Frame::CommandResult {
                id: command::CommandId::parse("c9").expect("valid"),
                outcome: command::Outcome::Expired,
            }]),
        )
        .expect_err("unknown");
    assert_eq!(err.code(), ErrorCode::UnexpectedFrame);
}

proptest! {
    /// However many commands the driver gives and in whatever order the
    /// agent answers them, each goes out once, at most
    /// MAX_COMMANDS_IN_FLIGHT are outstanding, and every result arrives.
    #[test]
    fn commands_are_sent_once_and_every_result_arrives(
        n in 1usize..200,
        order in prop::collection::vec(any::<prop::sample::Index>(), 200),
        repeats in prop::collection::vec(0usize..200, 0..20),
    ) {
        let now = origin();
        let mut hub = welcomed_hub(now, 0, 10);
        let mut agent = streaming_agent(now, 0, 10, AgentConfig::default());
        for i in 0..n {
            prop_assert_eq!(hub.send_command(read_command(&format!("c{i}"))), Ok(true));
        }
        for r in &repeats {
            // Given again while open: not sent again.
            let _ = hub.send_command(read_command(&format!("c{}", r % n)));
        }
        let mut sent = std::collections::BTreeSet::new();
        let mut results = Vec::new();
        let mut open: Vec<command::CommandId> = Vec::new();
        let mut step = 0;
        loop {
            let frames = hub_sent(&mut hub, now);
            for id in commands_in(&frames) {
                prop_assert!(sent.insert(id), "sent twice");
            }
            agent.handle_bytes(now, &encode(&frames)).expect("agent accepts");
            for e in agent_events(&mut agent) {
                if let AgentEvent::Command { command } = e {
                    open.push(command.id);
                }
            }
            prop_assert!(open.len() <= command::MAX_COMMANDS_IN_FLIGHT);
            if open.is_empty() {
                break;
            }
            let pick = order[step % order.len()].index(open.len());
            step += 1;
            let id = open.swap_remove(pick);
            agent.command_result(&id, command::Outcome::Expired).expect("reported");
            hub.handle_bytes(now, &encode(&agent_sent(&mut agent, now))).expect("hub accepts");
            for e in hub_events(&mut hub) {
                if let HubEvent::CommandResult { id, .. } = e {
                    results.push(id);
                }
            }
        }
        prop_assert_eq!(sent.len(), n);
        prop_assert_eq!(results.len(), n);
        prop_assert_eq!(hub.commands_open(), 0);
    }
}

#[test]
fn a_command_unanswered_when_the_connection_broke_is_answered_from_the_ledger() {
    let mut p = Pair::new();
    p.drive();
    // The agent executes and records, then its connection breaks before
    // the result leaves (as after a kill -9 between executing and
    // reporting).
    p.reports_commands = false;
    p.send_command("c1");
    p.drive();
    assert_eq!(p.executions, 1);
    let id = command::CommandId::parse("c1").expect("valid");
    assert_eq!(p.commands.get(&id), Some(&None), "no result at the hub yet");
    p.reports_commands = true;
    p.reset();
    p.drive();
    // Sent again on the new connection, answered from the ledger, executed
    // once.
    assert_eq!(p.executions, 1);
    assert_eq!(
        p.commands.get(&id),
        Some(&Some(command::Outcome::Applied { value: None }))
    );
}

#[test]
fn a_command_sent_while_the_agent_is_away_goes_out_at_its_next_connection() {
    let mut p = Pair::new();
    p.drive();
    p.hub.close(ErrorCode::ShuttingDown, "restart");
    p.drive();
    p.send_command("c1");
    p.send_command("c2");
    p.reset();
    p.drive();
    assert_eq!(p.executions, 2);
    assert!(p.commands.values().all(Option::is_some));
}
