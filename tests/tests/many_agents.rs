//! A thousand agents at once against the real hub: every one delivers its
//! events exactly once, and none waits for another to finish first.
//!
//! The agents are simulated in this process: each is an [`AgentSession`]
//! driven over its own QUIC connection, with its own certificate, through a
//! few shared quinn client endpoints in one tokio runtime. They all dial at
//! the same moment; each sends seqs `1..=EVENTS`, waits until the hub has
//! acknowledged every one, and says goodbye.
//!
//! Timings are printed, not asserted beyond a generous deadline: CI runs on a
//! shared 2-core machine with debug builds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use outpost_hub::ca::{issue_agent, Validity};
use outpost_protocols::wire::{AgentConfig, AgentEvent, AgentInfo, AgentSession, ALPN, CLOSE_OK};
use outpost_protocols::{AgentId, EventBody, Quality, Seq, StreamName, Timestamp, Value};
use outpost_tests::{Hub, HubEventStats, Pki};

/// Simulated agents, all connected at once.
const AGENTS: usize = 1_000;

/// Events each agent sends: seqs `1..=EVENTS`.
const EVENTS: u64 = 100;

/// quinn client endpoints (UDP sockets) the agents share, round robin.
const ENDPOINTS: usize = 4;

/// The receive (and send) buffer asked for each client socket; Linux caps
/// it at `net.core.rmem_max`.
const CLIENT_RCVBUF: usize = 4 << 20;

/// How long any one agent may take, from the common start to its last ack,
/// on a loaded 2-core machine running debug builds.
const DEADLINE: Duration = Duration::from_secs(120);

/// The agent's id: `sim-0000` .. `sim-0999`.
fn agent_id(i: usize) -> String {
    format!("sim-{i:04}")
}

/// Issues every agent's certificate with the hub's own CA code into
/// `dir/agent-<id>` (`ca.pem`, `agent.pem`, `agent.key`).
fn issue_all(ca_dir: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    (0..AGENTS)
        .map(|i| {
            let id = agent_id(i);
            let out = dir.join(format!("agent-{id}"));
            issue_agent(ca_dir, &AgentId::parse(&id)?, &out, Validity::LEAF_DEFAULT)
                .with_context(|| format!("issue {id}"))?;
            Ok(out)
        })
        .collect()
}

/// The uplink's client config (ALPN, client certificate, its transport
/// settings) for the agent whose credentials are in `creds`.
fn client_config(creds: &Path) -> Result<quinn::ClientConfig> {
    let mut tls = outpost_agent::tls::build_client_config(
        &creds.join("ca.pem"),
        Some((&creds.join("agent.pem"), &creds.join("agent.key"))),
        None,
    )?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(quinn::IdleTimeout::try_from(Duration::from_secs(60))?));
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// A quinn client endpoint on 127.0.0.1 whose socket has a receive buffer
/// of [`CLIENT_RCVBUF`], so that the test's side drops no datagram when a
/// thousand handshakes answer at once: what is lost is lost at the hub.
fn client_endpoint() -> Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_recv_buffer_size(CLIENT_RCVBUF)?;
    socket.set_send_buffer_size(CLIENT_RCVBUF)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    let runtime = quinn::default_runtime().context("no async runtime")?;
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket.into(),
        runtime,
    )?)
}

/// Agent `agent`'s events, seqs `1..=EVENTS`, with small JSON bodies.
fn events(agent: usize) -> Result<Vec<(Seq, EventBody)>> {
    let stream = StreamName::parse(&format!("sim/{agent}/temp"))?;
    (1..=EVENTS)
        .map(|seq| {
            let payload = format!("{{\"n\":{seq},\"value\":21.5}}");
            Ok((
                Seq(seq),
                EventBody {
                    stream: stream.clone(),
                    ts: Timestamp(1_700_000_000_000_000_000 + i64::try_from(seq)?),
                    value: Value::from_payload(payload.as_bytes()),
                    quality: Quality::Good,
                    attrs: BTreeMap::new(),
                },
            ))
        })
        .collect()
}

/// When each step of one agent was done, counted from the common start.
struct Finished {
    /// The QUIC and TLS handshake.
    handshake: Duration,
    /// The hub's `Welcome`.
    welcome: Duration,
    /// The ack of the last event.
    acked: Duration,
    /// The hub's close after `Goodbye`.
    closed: Duration,
    /// The hub's close came as a stateless reset: its close frame was lost
    /// and it had already forgotten the connection.
    reset: bool,
}

/// One simulated agent: dial, stream every event, wait for the last ack, say
/// goodbye and wait for the hub to close the connection.
async fn run_agent(
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    hub: SocketAddr,
    agent: usize,
    start: Instant,
) -> Result<Finished> {
    let conn = endpoint
        .connect_with(config, hub, "127.0.0.1")?
        .await
        .with_context(|| format!("handshake, {:.1} s after the start", secs(start.elapsed())))?;
    let handshake = start.elapsed();
    let (mut send, mut recv) = conn.open_bi().await.context("open_bi")?;
    let mut session = AgentSession::new(
        Instant::now(),
        AgentInfo {
            agent_version: "many-agents-test".into(),
            labels: BTreeMap::new(),
        },
        AgentConfig::default(),
    );
    let mut pending = Some(events(agent)?);
    let mut welcome = None;
    let mut acked_at = None;
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        out.clear();
        while session.poll_transmit(Instant::now(), &mut out).is_some() {}
        if !out.is_empty() {
            send.write_all(&out).await.context("write")?;
        }
        let mut progressed = false;
        while let Some(ev) = session.poll_event() {
            match ev {
                AgentEvent::Connected { watermark, .. } => {
                    welcome = Some(start.elapsed());
                    ensure!(
                        watermark == Seq(0),
                        "a fresh agent with watermark {watermark:?}"
                    );
                    let batch = pending.take().context("connected twice")?;
                    ensure!(session.wants() >= batch.len(), "window {}", session.wants());
                    session.push_events(batch)?;
                    progressed = true;
                }
                AgentEvent::Acked { upto } if upto == Seq(EVENTS) => {
                    acked_at = Some(start.elapsed());
                    session.goodbye();
                    progressed = true;
                }
                AgentEvent::Acked { .. } => {}
                AgentEvent::Closed { error: None } => {
                    let _ = send.finish();
                    let acked = acked_at.context("goodbye before the last ack")?;
                    // The hub answers Goodbye by closing the connection.
                    let reason = tokio::time::timeout(Duration::from_secs(30), conn.closed())
                        .await
                        .context("the hub did not close after Goodbye")?;
                    let reset = match &reason {
                        quinn::ConnectionError::ApplicationClosed(c)
                            if c.error_code == quinn::VarInt::from_u32(CLOSE_OK) =>
                        {
                            false
                        }
                        quinn::ConnectionError::Reset => true,
                        other => bail!("the hub closed with {other}"),
                    };
                    return Ok(Finished {
                        handshake,
                        welcome: welcome.context("no welcome")?,
                        acked,
                        closed: start.elapsed(),
                        reset,
                    });
                }
                AgentEvent::Closed { error: Some(e) } => bail!(
                    "session closed {:.1} s after the start (handshake done at {:.1} s, \
                     welcome {}): {e}",
                    secs(start.elapsed()),
                    secs(handshake),
                    welcome.map_or("not received".into(), |w| format!("at {:.1} s", secs(w))),
                ),
                other => bail!("unexpected {other:?}"),
            }
        }
        if progressed {
            continue;
        }
        let deadline = session
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + DEADLINE);
        tokio::select! {
            read = recv.read(&mut buf) => match read.context("read")? {
                Some(n) => session.handle_bytes(Instant::now(), &buf[..n])?,
                None => bail!("the hub finished the stream"),
            },
            () = tokio::time::sleep_until(deadline.into()) => session.handle_timeout(Instant::now()),
        }
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Min, median, and max of `v` (sorted here).
fn spread(v: &mut [Duration]) -> (f64, f64, f64) {
    v.sort();
    (secs(v[0]), secs(v[v.len() / 2]), secs(v[v.len() - 1]))
}

#[test]
#[ignore = "flaky on a 2-core machine: passes about 2 runs in 3; handshake bursts still overflow the hub's UDP buffer (net.core.rmem_max caps it at 4 MiB here). Run with --ignored; see issue 4's note."]
fn a_thousand_agents_all_deliver_and_none_waits_for_another() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let t = Instant::now();
    let creds = issue_all(&pki.ca_dir, &dir.path().join("agents"))?;
    println!(
        "issued {AGENTS} agent certificates in {:.2} s",
        secs(t.elapsed())
    );
    let hub = Hub::start(dir.path(), &pki)?;
    let configs = creds
        .iter()
        .map(|c| client_config(c))
        .collect::<Result<Vec<_>>>()?;

    let rcvbuf_before = udp_rcvbuf_errors();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let results = rt.block_on(async {
        let endpoints = (0..ENDPOINTS)
            .map(|_| client_endpoint())
            .collect::<Result<Vec<_>>>()?;
        let start = Instant::now();
        let tasks: Vec<_> = configs
            .into_iter()
            .enumerate()
            .map(|(i, config)| {
                let endpoint = endpoints[i % ENDPOINTS].clone();
                let addr = hub.addr;
                tokio::spawn(async move {
                    tokio::time::timeout(DEADLINE, run_agent(endpoint, config, addr, i, start))
                        .await
                        .unwrap_or_else(|_| bail!("not done within {DEADLINE:?}"))
                })
            })
            .collect();
        let mut results = Vec::with_capacity(AGENTS);
        for task in tasks {
            results.push(task.await?);
        }
        for endpoint in &endpoints {
            endpoint.close(quinn::VarInt::from_u32(CLOSE_OK), b"");
        }
        for endpoint in &endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        }
        anyhow::Ok(results)
    })?;

    let failed = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| (agent_id(i), format!("{e:#}"))))
        .collect::<Vec<_>>();
    if !failed.is_empty() {
        let log = hub.log();
        let mut report = String::new();
        for (id, e) in failed.iter().take(10) {
            report.push_str(&format!("{id}: {e}\n"));
            let needle = format!("agent_id={id} ");
            for line in log.lines().filter(|l| l.contains(&needle)) {
                report.push_str(&format!("    hub: {line}\n"));
            }
        }
        bail!(
            "{} of {AGENTS} agents failed; UDP receive buffer errors during the run: {}; \
             the first ones:\n{report}hub WARN lines: {}",
            failed.len(),
            udp_rcvbuf_errors().map_or("unknown".into(), |n| (n - rcvbuf_before.unwrap_or(n))
                .to_string()),
            log.lines().filter(|l| l.contains("WARN")).count(),
        );
    }
    let done: Vec<Finished> = results.into_iter().filter_map(Result::ok).collect();
    let phase = |f: fn(&Finished) -> Duration| {
        let mut v: Vec<Duration> = done.iter().map(f).collect();
        spread(&mut v)
    };
    for (name, (min, med, max)) in [
        ("handshake done", phase(|f| f.handshake)),
        ("welcome received", phase(|f| f.welcome)),
        ("all acknowledged", phase(|f| f.acked)),
        ("goodbye done", phase(|f| f.closed)),
    ] {
        println!("{name:>16}: min {min:6.2} s  median {med:6.2} s  max {max:6.2} s");
    }
    let resets = done.iter().filter(|f| f.reset).count();
    println!(
        "{AGENTS} agents x {EVENTS} events over {ENDPOINTS} client endpoints; \
         {resets} hub closes after Goodbye came as stateless resets; \
         UDP receive buffer errors on this host during the run: {}",
        udp_rcvbuf_errors().map_or("unknown".into(), |n| (n - rcvbuf_before.unwrap_or(n))
            .to_string())
    );
    // Every agent ran under the per-agent timeout, so all finished within
    // DEADLINE of the common start; say so explicitly.
    let slowest = phase(|f| f.acked).2;
    assert!(slowest <= secs(DEADLINE), "{slowest} s");

    let t = Instant::now();
    let stats = hub.events_stats()?;
    println!("events stats --json took {:.2} s", secs(t.elapsed()));
    ensure!(
        stats.len() == AGENTS,
        "the hub holds events of {} agents, not {AGENTS}",
        stats.len()
    );
    let by_id: BTreeMap<&str, &HubEventStats> =
        stats.iter().map(|s| (s.agent_id.as_str(), s)).collect();
    for i in 0..AGENTS {
        let id = agent_id(i);
        let s = by_id
            .get(id.as_str())
            .with_context(|| format!("no stats for {id}"))?;
        assert_eq!(
            **s,
            HubEventStats {
                agent_id: id.clone(),
                count: EVENTS,
                distinct_seqs: EVENTS,
                min_seq: Some(1),
                max_seq: Some(EVENTS),
            }
        );
    }
    let warnings = hub.log().lines().filter(|l| l.contains("WARN")).count();
    println!("hub log: {warnings} WARN lines");
    Ok(())
}

/// The host's count of UDP datagrams dropped for a full receive buffer
/// (Linux, `/proc/net/snmp`), if known.
fn udp_rcvbuf_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names = udp.next()?.split_whitespace();
    let values = udp.next()?.split_whitespace();
    names
        .zip(values)
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
}
