//! Simulated agents in one process, and raw QUIC clients of the hub.
//!
//! The 1,000-agent test, the hub-ingest benchmark and the hostile-client
//! tests all need to speak to a real `outpost-hub` without starting a real
//! agent per connection: a thousand agent processes do not fit a 2-core
//! machine, and a hostile client must send what no real agent would. They
//! drive the same sans-IO [`AgentSession`] the agent uses (or hand-made
//! frames) over real quinn connections with real certificates from the
//! fleet CA.
//!
//! A simulated agent behaves like the real uplink where it matters for the
//! hub: when a connection fails it reconnects after a jittered backoff and
//! resumes after the hub's watermark, so a handshake lost in a burst of a
//! thousand costs that agent a retry, not the run.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use outpost_protocols::wire::{AgentConfig, AgentEvent, AgentInfo, AgentSession, ALPN, CLOSE_OK};
use outpost_protocols::{AgentId, EventBody, Quality, Seq, StreamName, Timestamp, Value};

/// The simulated agent's id: `sim-0000` .. `sim-9999`.
pub fn agent_id(i: usize) -> String {
    format!("sim-{i:04}")
}

/// Issues the certificates of agents `0..n` with the hub's own CA code into
/// `dir/agent-<id>` (`ca.pem`, `agent.pem`, `agent.key`), one folder each.
pub fn issue_agents(ca_dir: &Path, dir: &Path, n: usize) -> Result<Vec<PathBuf>> {
    (0..n)
        .map(|i| {
            let id = agent_id(i);
            let out = dir.join(format!("agent-{id}"));
            outpost_hub::ca::issue_agent(
                ca_dir,
                &AgentId::parse(&id)?,
                &out,
                outpost_hub::ca::Validity::LEAF_DEFAULT,
            )
            .with_context(|| format!("issue {id}"))?;
            Ok(out)
        })
        .collect()
}

/// A quinn client config for the agent whose credentials are in `creds`
/// (`ca.pem`, `agent.pem`, `agent.key`), offering `alpn`, with the uplink's
/// idle timeout and keep-alive.
pub fn client_config(creds: &Path, alpn: &[u8]) -> Result<quinn::ClientConfig> {
    let mut tls = outpost_tls::client_config(outpost_tls::ClientFiles {
        ca: &creds.join("ca.pem"),
        client: Some((&creds.join("agent.pem"), &creds.join("agent.key"))),
        server_name: None,
    })?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(quinn::IdleTimeout::try_from(Duration::from_secs(60))?));
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// A quinn client endpoint on 127.0.0.1 whose socket asks for `buffer`
/// bytes of receive and send buffer (Linux caps it at `net.core.rmem_max`),
/// so that under load the datagrams dropped are the hub's, not ours.
pub fn client_endpoint(buffer: usize) -> Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_recv_buffer_size(buffer)?;
    socket.set_send_buffer_size(buffer)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    let runtime = quinn::default_runtime().context("no async runtime")?;
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket.into(),
        runtime,
    )?)
}

/// Agent `agent`'s events `1..=n`: small JSON bodies of about 64 bytes on
/// the wire, each a distinct reading.
pub fn events(agent: usize, n: u64) -> Result<Vec<(Seq, EventBody)>> {
    let stream = StreamName::parse(&format!("sim/{agent}/temp"))?;
    (1..=n)
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

/// When each step of one simulated agent was done, counted from the common
/// start, and what it cost.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The last (successful) QUIC and TLS handshake.
    pub handshake: Duration,
    /// The hub's `Welcome` on that connection.
    pub welcome: Duration,
    /// The ack of the last event.
    pub acked: Duration,
    /// The hub's close after `Goodbye`.
    pub closed: Duration,
    /// The hub's close came as a stateless reset: its close frame was lost
    /// and it had already forgotten the connection.
    pub reset: bool,
    /// Connections that failed before this one, each retried after a
    /// backoff; with the reason of the first.
    pub retries: u32,
    /// Why the first failed connection failed.
    pub first_failure: Option<String>,
}

/// What one simulated agent sends: its `Hello` labels and its events (seqs
/// increasing).
pub struct Load {
    /// The labels its `Hello` carries.
    pub labels: BTreeMap<String, String>,
    /// Its events.
    pub events: Vec<(Seq, EventBody)>,
    /// The newest protocol version it offers: 1 behaves like an agent from
    /// before the policy push.
    pub max_version: u16,
}

impl Load {
    /// Agent `agent`'s events `1..=n` (see [`events`]), no labels.
    pub fn new(agent: usize, n: u64) -> Result<Load> {
        Ok(Load {
            labels: BTreeMap::new(),
            events: events(agent, n)?,
            max_version: outpost_protocols::wire::PROTOCOL_VERSION,
        })
    }
}

/// One simulated agent: sends its `load`, and reconnects like the real
/// uplink until every event is acknowledged or `deadline` (from `start`)
/// passes; then says goodbye. `agent` only seeds the retry jitter.
pub async fn run_agent(
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    hub: SocketAddr,
    agent: usize,
    load: Load,
    start: Instant,
    deadline: Duration,
) -> Result<Finished> {
    let last = load.events.last().map_or(Seq(0), |(s, _)| *s);
    let mut retries = 0u32;
    let mut first_failure = None;
    loop {
        match connection(&endpoint, config.clone(), hub, &load, last, start).await {
            Ok(mut f) => {
                f.retries = retries;
                f.first_failure = first_failure;
                return Ok(f);
            }
            Err(e) => {
                let e = format!("{e:#}");
                if start.elapsed() >= deadline {
                    bail!("gave up after {retries} retries; last: {e}");
                }
                first_failure.get_or_insert(e);
                retries += 1;
                // The uplink's backoff: 250 ms doubling to 4 s, with a
                // jitter of up to half of it so that retries spread.
                let base = 250u64 << retries.min(4);
                let jitter = jitter(agent, retries) % (base / 2 + 1);
                tokio::time::sleep(Duration::from_millis(base / 2 + jitter)).await;
            }
        }
    }
}

/// A number that differs between agents and attempts (no RNG needed: it only
/// has to spread retries).
fn jitter(agent: usize, attempt: u32) -> u64 {
    let mut x = (agent as u64) << 32 | u64::from(attempt);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

/// One connection of a simulated agent, to the end: `Ok` once every event
/// up to `last` is acknowledged and the hub closed after `Goodbye`.
async fn connection(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    hub: SocketAddr,
    load: &Load,
    last: Seq,
    start: Instant,
) -> Result<Finished> {
    let events = &load.events;
    let conn = endpoint
        .connect_with(config, hub, "127.0.0.1")?
        .await
        .with_context(|| format!("handshake, {:.1} s after the start", secs(start.elapsed())))?;
    let handshake = start.elapsed();
    let (mut send, mut recv) = conn.open_bi().await.context("open_bi")?;
    let mut session = AgentSession::new(
        Instant::now(),
        AgentInfo {
            agent_version: "fleet-sim".into(),
            labels: load.labels.clone(),
        },
        AgentConfig {
            max_version: load.max_version,
            ..AgentConfig::default()
        },
    );
    let mut next = 0usize;
    let mut welcome = None;
    let mut acked_at = None;
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        // Fill the window, from where the hub's watermark said to resume.
        if welcome.is_some() && acked_at.is_none() {
            let room = session.wants();
            let upto = (next + room).min(events.len());
            if upto > next {
                session.push_events(events[next..upto].to_vec())?;
                next = upto;
            }
        }
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
                    ensure!(watermark <= last, "watermark {watermark:?} beyond {last:?}");
                    next = events.partition_point(|(s, _)| *s <= watermark);
                    if watermark == last {
                        acked_at = Some(start.elapsed());
                        session.goodbye();
                    }
                    progressed = true;
                }
                AgentEvent::Acked { upto } if upto == last => {
                    acked_at = Some(start.elapsed());
                    session.goodbye();
                    progressed = true;
                }
                AgentEvent::Acked { .. } => progressed = true,
                // The registry's labels (protocol version 4): nothing
                // here selects by them.
                AgentEvent::Labels { .. } => progressed = true,
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
                        retries: 0,
                        first_failure: None,
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
        let wake = session
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            read = recv.read(&mut buf) => match read.context("read")? {
                Some(n) => session.handle_bytes(Instant::now(), &buf[..n])?,
                None => bail!("the hub finished the stream"),
            },
            () = tokio::time::sleep_until(wake.into()) => session.handle_timeout(Instant::now()),
        }
    }
}

/// Seconds, for printing.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Min, median and max of `v` in seconds (sorts `v`).
pub fn spread(v: &mut [Duration]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort();
    (secs(v[0]), secs(v[v.len() / 2]), secs(v[v.len() - 1]))
}

/// The host's count of UDP datagrams dropped for a full receive buffer
/// (Linux, `/proc/net/snmp`), if known.
pub fn udp_rcvbuf_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let names = udp.next()?.split_whitespace();
    let values = udp.next()?.split_whitespace();
    names
        .zip(values)
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
}

/// The outcome of a fleet run: every agent's result, in agent order.
pub struct FleetRun {
    /// Each agent's outcome.
    pub results: Vec<Result<Finished>>,
    /// From the common start to the last agent's close.
    pub elapsed: Duration,
}

/// Runs `creds.len()` simulated agents against `hub` at once, each sending
/// `per_agent` events, over `endpoints` shared client sockets; dials are
/// spread over `dial_spread` (a fleet reconnecting after a hub restart
/// spreads by its backoff jitter).
pub fn run_fleet(
    hub: SocketAddr,
    creds: &[PathBuf],
    per_agent: u64,
    endpoints: usize,
    dial_spread: Duration,
    deadline: Duration,
) -> Result<FleetRun> {
    let configs = creds
        .iter()
        .map(|c| client_config(c, ALPN))
        .collect::<Result<Vec<_>>>()?;
    let loads = (0..creds.len())
        .map(|i| Load::new(i, per_agent))
        .collect::<Result<Vec<_>>>()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let endpoints = (0..endpoints)
            .map(|_| client_endpoint(4 << 20))
            .collect::<Result<Vec<_>>>()?;
        let n = configs.len().max(1);
        let start = Instant::now();
        let tasks: Vec<_> = configs
            .into_iter()
            .zip(loads)
            .enumerate()
            .map(|(i, (config, load))| {
                let endpoint = endpoints[i % endpoints.len()].clone();
                let delay = dial_spread.mul_f64(i as f64 / n as f64);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    tokio::time::timeout(
                        deadline,
                        run_agent(endpoint, config, hub, i, load, start, deadline),
                    )
                    .await
                    .unwrap_or_else(|_| bail!("not done within {deadline:?}"))
                })
            })
            .collect();
        let mut results = Vec::with_capacity(tasks.len());
        for task in tasks {
            results.push(task.await?);
        }
        let elapsed = start.elapsed();
        for endpoint in &endpoints {
            endpoint.close(quinn::VarInt::from_u32(CLOSE_OK), b"");
        }
        for endpoint in &endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        }
        Ok(FleetRun { results, elapsed })
    })
}
