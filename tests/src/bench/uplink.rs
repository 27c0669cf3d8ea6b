//! Measurements 5 and 6: the agent's outbox backlog drained to the hub over
//! QUIC, and the hub's ingest from a thousand connected agents.
//!
//! - Drain: a pre-filled outbox of N events (the MQTT rows' 64-byte JSON
//!   payloads), the real `outpost-agent` and `outpost-hub` processes on
//!   loopback, certificates from the real `outpost-hub ca` verbs, both stores
//!   `synchronous = FULL` (their defaults). The clock runs from the agent
//!   process's start to the hub having durably stored all N, seen by polling
//!   the agent's watermark in the hub's `hub.db` (read-only, every 2 ms; the
//!   hub commits it in the same transaction as the events). The baseline is
//!   raw quinn in this process: a server and a client with the hub's and the
//!   agent's own TLS and transport settings, the client writing exactly the
//!   `Batch` frames the agent would send for the same events (read back from
//!   the same outbox, batches of `AgentConfig::default().max_batch_events`)
//!   on one bidirectional stream; its clock runs from the connect to the
//!   client seeing the server's reply stream finished, which the server sends
//!   once it has read every byte. Baseline and ours alternate, each run on a
//!   fresh hub and a fresh copy of the outbox.
//! - Fleet: `fleet_sim::run_fleet` dials the simulated agents (each its own
//!   QUIC connection and certificate) against a release hub started here;
//!   events/s = all events / (first dial → last goodbye); memory per agent =
//!   (the hub's VmHWM after the run − its VmRSS before the first dial) /
//!   agents. The baseline is the single-agent drain above.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use outpost_agent::outbox::{Outbox, OutboxConfig, Synchronous};
use outpost_protocols::wire::{AgentConfig, Frame, ALPN};
use outpost_protocols::{AgentId, Seq, Timestamp};
use outpost_tests::fleet_sim::{client_config, issue_agents, run_fleet, udp_rcvbuf_errors};
use outpost_tests::Hub;
use rusqlite::{Connection, OpenFlags, OptionalExtension as _};
use tokio::runtime::Runtime;

use super::procfs::{clock_ticks, mb, status_kib, CpuWindow};
use super::procs::{hub_db, Bins};
use super::report::{median, per_sec, ratio_row, samples, thousands, Goal, Row, Verdict};
use super::workload::{mqtt_bodies, now_ns, PAYLOAD_LEN};

/// The draining agent's id (its certificate's).
const AGENT: &str = "bench-drain";

/// How often the hub's store is looked at while measuring ours.
const POLL: Duration = Duration::from_millis(2);

/// The drain's goal (issue 24): at least this share of a raw SQLite insert
/// of the same events (`synchronous = FULL`, batches of [`RAW_BATCH`]),
/// measured in the same rounds: the hub's store is the physical limit.
const GOAL: f64 = 0.7;

/// The hub's memory per connected agent, kB (issue 24).
const PER_AGENT_GOAL: Goal = Goal::AtMost(50.0);

/// The raw SQLite insert's batch (the outbox-append row's).
const RAW_BATCH: usize = 1000;

/// How often a drain's trace (for the plot) takes a point.
const TRACE_EVERY: Duration = Duration::from_millis(50);

/// quinn client endpoints (UDP sockets) the simulated agents share.
const ENDPOINTS: usize = 4;

/// How big the drain is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    /// Events in the outbox.
    pub(crate) events: usize,
    /// Runs of each; the median is reported.
    pub(crate) reps: usize,
}

/// How big the fleet is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FleetParams {
    /// Simulated agents, all connected at once.
    pub(crate) agents: usize,
    /// Events each sends.
    pub(crate) per_agent: u64,
    /// Over how long they dial.
    pub(crate) dial_spread: Duration,
}

/// A multi-thread runtime with tokio's default threads, as the agent's and the
/// hub's `main` build theirs: each side of the baseline stands in for a
/// process of its own.
fn runtime(name: &str) -> Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .thread_name(name)
        .enable_all()
        .build()
        .with_context(|| format!("start the {name} runtime"))
}

/// How long to wait for a run before calling it failed.
fn run_timeout(n: u64) -> Duration {
    // 5,000 events/s is far below anything sane on loopback.
    Duration::from_secs(60 + n / 5000)
}

/// The hub's store, read-only, as another process may read it while the hub
/// writes (WAL).
pub(crate) struct HubStore {
    conn: Connection,
}

impl HubStore {
    pub(crate) fn open(path: &Path) -> Result<HubStore> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)
            .with_context(|| format!("open {} read-only", path.display()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(HubStore { conn })
    }

    /// The agent's durable watermark, 0 before it is known.
    pub(crate) fn watermark(&self, agent: &str) -> Result<u64> {
        let w: Option<i64> = self
            .conn
            .prepare_cached("SELECT watermark FROM agents WHERE agent_id = ?1")?
            .query_row([agent], |r| r.get(0))
            .optional()?;
        Ok(w.map_or(0, |w| w.max(0) as u64))
    }

    /// Rows stored for the agent.
    fn events(&self, agent: &str) -> Result<u64> {
        let n: i64 = self.conn.query_row(
            "SELECT count(*) FROM events WHERE agent_id = ?1",
            [agent],
            |r| r.get(0),
        )?;
        Ok(n.max(0) as u64)
    }

    /// (agents known, agents whose watermark is at least `w`, events stored).
    fn fleet(&self, w: u64) -> Result<(u64, u64, u64)> {
        let w = i64::try_from(w)?;
        let (known, at): (i64, i64) = self.conn.query_row(
            "SELECT count(*), count(*) FILTER (WHERE watermark >= ?1) FROM agents",
            [w],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let events: i64 = self
            .conn
            .query_row("SELECT count(*) FROM events", [], |r| r.get(0))?;
        Ok((known.max(0) as u64, at.max(0) as u64, events.max(0) as u64))
    }
}

/// Fills a fresh outbox at `db` with `n` events (the MQTT rows' bodies) and
/// returns the file's size in KiB and the `Batch` frames the agent sends for
/// them: the events read back in seq order, `max_batch_events` to a frame,
/// each encoded by `Frame::encode` (length prefix included).
fn fill(db: &Path, n: usize) -> Result<(u64, Vec<Vec<u8>>)> {
    let mut cfg = OutboxConfig::new(db);
    // Only the fill is NORMAL, for speed; the agent reopens it FULL.
    cfg.synchronous = Synchronous::Normal;
    let mut outbox = Outbox::open(&cfg, AgentId::parse(AGENT)?)?;
    {
        let bodies = mqtt_bodies(n)?;
        for chunk in bodies.chunks(10_000) {
            let outcome = outbox.append(Timestamp(now_ns()), chunk, &[])?;
            ensure!(outcome.accepted == chunk.len(), "{outcome:?}");
        }
    }
    let stats = outbox.stats()?;
    ensure!(
        stats.events == n as u64,
        "the fill stored {} events",
        stats.events
    );
    let wire = AgentConfig::default();
    let mut frames = Vec::new();
    let mut after = Seq(0);
    loop {
        let events = outbox.read_batch(after, wire.max_batch_events)?;
        let Some(last) = events.last() else { break };
        after = last.seq;
        let frame = Frame::Batch {
            events: events.into_iter().map(|e| (e.seq, e.body)).collect(),
        };
        let mut out = Vec::new();
        frame.encode(&mut out)?;
        // The agent also cuts a batch at max_batch_bytes of events; these
        // 64-byte payloads never reach it.
        ensure!(
            out.len() <= wire.max_batch_bytes,
            "a batch of {} bytes: the agent would cut it smaller",
            out.len()
        );
        frames.push(out);
    }
    // Closing checkpoints the WAL into the file, which is then all there is.
    drop(outbox);
    ensure!(
        !wal(db).exists(),
        "{} is still there after the close",
        wal(db).display()
    );
    Ok((std::fs::metadata(db)?.len() / 1024, frames))
}

/// The WAL file of the SQLite file `db`.
fn wal(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// The hub's UDP socket as the hub makes it (8 MiB buffers, capped by the
/// kernel), as a quinn server endpoint. Must run inside a runtime.
fn server_endpoint(config: quinn::ServerConfig) -> Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(8 << 20);
    let _ = socket.set_send_buffer_size(8 << 20);
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    let runtime = quinn::default_runtime().context("no async runtime")?;
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket.into(),
        runtime,
    )?)
}

/// The baseline's server: accepts one connection and its stream, reads it to
/// the end, answers with the byte count and finishes. Returns when it had
/// read everything.
async fn serve_once(endpoint: quinn::Endpoint, expected: u64) -> Result<Instant> {
    let incoming = endpoint.accept().await.context("the endpoint closed")?;
    let conn = incoming.await.context("server handshake")?;
    let (mut send, mut recv) = conn.accept_bi().await.context("accept_bi")?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    while let Some(n) = recv.read(&mut buf).await.context("server read")? {
        got += n as u64;
    }
    let at = Instant::now();
    ensure!(got == expected, "the server read {got} of {expected} bytes");
    send.write_all(&got.to_be_bytes()).await?;
    send.finish()?;
    // The client closes once it has the reply.
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
    endpoint.close(0u32.into(), b"");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok(at)
}

/// The baseline's client: connects, writes every frame on one stream,
/// finishes it and waits for the server's reply stream to finish. Returns
/// (connect start, reply seen).
async fn send_once(
    config: quinn::ClientConfig,
    server: SocketAddr,
    frames: &[Vec<u8>],
    total: u64,
) -> Result<(Instant, Instant)> {
    let endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let started = Instant::now();
    let conn = endpoint
        .connect_with(config, server, "127.0.0.1")?
        .await
        .context("client handshake")?;
    let (mut send, mut recv) = conn.open_bi().await.context("open_bi")?;
    for f in frames.iter() {
        send.write_all(f).await.context("client write")?;
    }
    send.finish()?;
    let reply = recv.read_to_end(64).await.context("client read")?;
    let done = Instant::now();
    ensure!(
        reply == total.to_be_bytes(),
        "the server answered {reply:?}, not {total}"
    );
    conn.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok((started, done))
}

/// One baseline run: events/s equivalent, connect → reply seen.
fn baseline(hub_creds: &Path, agent_creds: &Path, frames: &[Vec<u8>], n: u64) -> Result<f64> {
    let total: u64 = frames.iter().map(|f| f.len() as u64).sum();
    let (server_rt, client_rt) = (runtime("quic-server")?, runtime("quic-client")?);
    let server_config = outpost_hub::server::server_config(
        &hub_creds.join("ca.pem"),
        &hub_creds.join("hub.pem"),
        &hub_creds.join("hub.key"),
    )?;
    let endpoint = {
        let _in = server_rt.enter();
        server_endpoint(server_config)?
    };
    let addr = endpoint.local_addr()?;
    let serving = server_rt.spawn(serve_once(endpoint, total));
    let config = client_config(agent_creds, ALPN)?;
    let sent = client_rt.block_on(async {
        tokio::time::timeout(run_timeout(n), send_once(config, addr, frames, total))
            .await
            .unwrap_or_else(|_| bail!("the raw quinn run took longer than {:?}", run_timeout(n)))
    });
    let (started, done) = match sent {
        Ok(t) => t,
        Err(e) => {
            serving.abort();
            return Err(e);
        }
    };
    let read_all = server_rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), serving)
            .await
            .context("the server did not finish")?
            .context("server task")?
    })?;
    eprintln!(
        "uplink baseline: the server had read all {} in {:.2} s, the client saw its reply at {:.2} s",
        mb(total / 1024),
        read_all.duration_since(started).as_secs_f64(),
        done.duration_since(started).as_secs_f64()
    );
    Ok(per_sec(n, done.duration_since(started)))
}

/// The agent's config: the uplink to `hub` with the credentials in `creds`.
fn agent_config(data_dir: &Path, hub: SocketAddr, creds: &Path) -> String {
    format!(
        r#"[agent]
data_dir = "{}"

[uplink]
hub = "{hub}"
ca = "{}"
cert = "{}"
key = "{}"

[observability]
metrics = ""
"#,
        data_dir.display(),
        creds.join("ca.pem").display(),
        creds.join("agent.pem").display(),
        creds.join("agent.key").display(),
    )
}

/// What one drain of ours measured.
struct Drain {
    /// Events per second, agent start → N durable at the hub.
    rate: f64,
    /// From the agent's start to the first events durable at the hub.
    first: Duration,
    /// Events per second from then to the N-th.
    streaming: f64,
    /// CPU over the drain, % of one core.
    agent_cpu: f64,
    hub_cpu: f64,
    /// What the drain looked like over time.
    trace: Vec<TracePoint>,
}

/// One point of a drain over time: for the plot of throughput and memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TracePoint {
    /// Since the agent process's start.
    pub(crate) at: Duration,
    /// Events durable at the hub.
    pub(crate) stored: u64,
    /// VmRSS of the agent and the hub, KiB.
    pub(crate) agent_rss_kib: u64,
    pub(crate) hub_rss_kib: u64,
}

/// The drain's rows, its median rate (the fleet's baseline) and the trace of
/// its median run.
pub(crate) struct DrainReport {
    pub(crate) rows: Vec<Row>,
    pub(crate) rate: f64,
    pub(crate) trace: Vec<TracePoint>,
}

/// One drain of ours in `home`: a fresh hub, a copy of the template outbox.
fn ours(
    bins: &Bins,
    home: &Path,
    hub_creds: &Path,
    agent_creds: &Path,
    template: &Path,
    n: u64,
) -> Result<Drain> {
    let mut hub = bins.start_hub(&home.join("hub"), hub_creds)?;
    let agent_home = home.join("agent");
    let data_dir = agent_home.join("data");
    std::fs::create_dir_all(&data_dir)?;
    std::fs::copy(template, data_dir.join("outbox.db")).context("copy the outbox")?;
    let store = HubStore::open(&hub_db(&hub))?;
    ensure!(store.watermark(AGENT)? == 0, "a fresh hub knows the agent");
    let log = agent_home.join("agent.log");
    let clk = clock_ticks();
    let hub_cpu = CpuWindow::start(hub.proc.child.id())?;
    let started = Instant::now();
    let mut agent =
        bins.start_agent(&agent_home, &agent_config(&data_dir, hub.addr, agent_creds))?;
    let agent_cpu = CpuWindow::start(agent.proc.child.id())?;
    let deadline = started + run_timeout(n);
    let mut first = None;
    let mut trace = Vec::new();
    let mut next_point = started;
    let finished = loop {
        let w = store.watermark(AGENT)?;
        let now = Instant::now();
        if now >= next_point || w >= n {
            // A process that just exited reads as 0; the checks below say why.
            let rss = |pid| status_kib(pid, "VmRSS").unwrap_or(0);
            trace.push(TracePoint {
                at: now.duration_since(started),
                stored: w,
                agent_rss_kib: rss(agent.proc.child.id()),
                hub_rss_kib: rss(hub.proc.child.id()),
            });
            next_point += TRACE_EVERY;
        }
        if w >= n {
            break now;
        }
        if w > 0 && first.is_none() {
            first = Some((Instant::now(), w));
        }
        if !agent.proc.is_running() {
            bail!(
                "the agent exited with {w} of {n} events at the hub (log: {})",
                log.display()
            );
        }
        if !hub.proc.is_running() {
            bail!(
                "the hub exited with {w} of {n} events stored:\n{}",
                hub.log()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the hub stored {w} of {n} events in {:?} (agent log: {})",
                run_timeout(n),
                log.display()
            );
        }
        std::thread::sleep(POLL);
    };
    let (agent_cpu, _) = agent_cpu.stop(clk)?;
    let (hub_cpu, _) = hub_cpu.stop(clk)?;
    // Exactly once: the watermark is N and N rows are stored.
    let stored = store.events(AGENT)?;
    ensure!(stored == n, "the hub stored {stored} rows for {n} events");
    drop(store);
    agent.proc.term(Duration::from_secs(20))?;
    hub.proc.term(Duration::from_secs(20))?;
    let (first_at, first_w) = first.unwrap_or((finished, n));
    let after_first = finished.duration_since(first_at);
    Ok(Drain {
        rate: per_sec(n, finished.duration_since(started)),
        first: first_at.duration_since(started),
        streaming: if first_w < n {
            per_sec(n - first_w, after_first)
        } else {
            f64::NAN
        },
        agent_cpu,
        hub_cpu,
        trace,
    })
}

/// Measurement 5: the drain and its raw-quinn baseline.
pub(crate) fn drain(bins: &Bins, dir: &Path, p: Params) -> Result<DrainReport> {
    let root = dir.join("uplink");
    std::fs::create_dir_all(&root)?;
    let pki = bins.pki(&root.join("pki"))?;
    let agent_creds = pki.issue_agent(AGENT)?;
    let template = root.join("template").join("outbox.db");
    std::fs::create_dir_all(root.join("template"))?;
    eprintln!(
        "uplink: filling {} with {} events",
        template.display(),
        thousands(p.events as f64)
    );
    let (file_kib, frames) = fill(&template, p.events)?;
    let total: u64 = frames.iter().map(|f| f.len() as u64).sum();
    let n = p.events as u64;
    eprintln!(
        "uplink: {} events = {} Batch frames, {} on the wire (outbox file {})",
        thousands(p.events as f64),
        thousands(frames.len() as f64),
        mb(total / 1024),
        mb(file_kib)
    );
    let raw = super::append::raw_rows(&mqtt_bodies(p.events)?);
    let (mut base, mut ours_v, mut sqlite) = (Vec::new(), Vec::new(), Vec::new());
    let (mut firsts, mut streaming) = (Vec::new(), Vec::new());
    let (mut agent_cpu, mut hub_cpu) = (Vec::new(), Vec::new());
    let mut traces = Vec::new();
    for rep in 0..p.reps {
        let b = baseline(&pki.hub_dir, &agent_creds, &frames, n)?;
        let raw_db = root.join(format!("raw-{rep}.db"));
        let s = super::append::baseline(&raw_db, &raw, RAW_BATCH, Synchronous::Full)?;
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", raw_db.display()));
        }
        let home = root.join(format!("run-{rep}"));
        let o = ours(bins, &home, &pki.hub_dir, &agent_creds, &template, n)?;
        // The stores are large; later runs do not need them.
        let _ = std::fs::remove_dir_all(&home);
        eprintln!(
            "uplink run {}: raw quinn {}/s, raw SQLite FULL insert {}/s, agent → hub {}/s (first events durable after {:.2} s, then {}/s; agent {:.0}%, hub {:.0}% of one core)",
            rep + 1,
            thousands(b),
            thousands(s),
            thousands(o.rate),
            o.first.as_secs_f64(),
            thousands(o.streaming),
            o.agent_cpu,
            o.hub_cpu
        );
        base.push(b);
        sqlite.push((o.rate, s));
        ours_v.push(o.rate);
        firsts.push(o.first.as_secs_f64());
        streaming.push(o.streaming);
        agent_cpu.push(o.agent_cpu);
        hub_cpu.push(o.hub_cpu);
        traces.push((o.rate, o.trace));
    }
    let _ = std::fs::remove_file(&template);
    eprintln!(
        "uplink: raw quinn [{}], agent → hub [{}]",
        samples(&base),
        samples(&ours_v)
    );
    let b = median(&base);
    let o = median(&ours_v);
    let rows = vec![
        ratio_row(
            format!(
                "Uplink drain: a {}-event outbox backlog ({PAYLOAD_LEN}-byte JSON payloads) → outpost-hub over loopback QUIC + mTLS, agent process start → all durable at the hub (events/s; synchronous=FULL at both ends; agent {:.0}%, hub {:.0}% of one core; baseline = a raw SQLite insert of the same events, FULL, batches of {RAW_BATCH}, in the same rounds)",
                thousands(p.events as f64),
                median(&agent_cpu),
                median(&hub_cpu),
            ),
            "/s",
            &sqlite,
            Goal::AtLeast(GOAL),
        ),
        Row {
            what: format!(
                "Uplink drain, same runs, against raw quinn writing the same {} of Batch frames on one stream (the transport's ceiling)",
                mb(total / 1024)
            ),
            ours: format!("{}/s", thousands(o)),
            baseline: format!("{}/s", thousands(b)),
            ratio: format!("{:.3}", o / b),
            target: "-".into(),
            verdict: Verdict::Info,
        },
        Row {
            what: format!(
                "Uplink drain, same runs: the rate once streaming, first events durable at the hub → the last (events/s; the first were durable {:.2} s after the agent's start)",
                median(&firsts)
            ),
            ours: format!("{}/s", thousands(median(&streaming))),
            baseline: "-".into(),
            ratio: "-".into(),
            target: "-".into(),
            verdict: Verdict::Info,
        },
    ];
    // The median run's trace (the lower middle one for an even count).
    traces.sort_by(|a, b| a.0.total_cmp(&b.0));
    let trace = traces
        .into_iter()
        .nth((p.reps.max(1) - 1) / 2)
        .map(|(_, t)| t)
        .unwrap_or_default();
    Ok(DrainReport {
        rows,
        rate: o,
        trace,
    })
}

/// Measurement 6: the hub's ingest from `p.agents` simulated agents at once;
/// `single` is the single-agent drain rate (events/s), the baseline.
pub(crate) fn fleet(
    bins: &Bins,
    dir: &Path,
    p: FleetParams,
    single: Option<f64>,
) -> Result<Vec<Row>> {
    let root = dir.join("fleet");
    std::fs::create_dir_all(&root)?;
    let pki = bins.pki(&root.join("pki"))?;
    let t = Instant::now();
    let creds: Vec<PathBuf> = issue_agents(&pki.ca_dir, &root.join("agents"), p.agents)?;
    eprintln!(
        "fleet: issued {} agent certificates in {:.1} s",
        thousands(p.agents as f64),
        t.elapsed().as_secs_f64()
    );
    let mut hub: Hub = bins.start_hub(&root.join("hub"), &pki.hub_dir)?;
    let pid = hub.proc.child.id();
    let total = p.agents as u64 * p.per_agent;
    let deadline = run_timeout(total);
    let rss_before = status_kib(pid, "VmRSS")?;
    let drops_before = udp_rcvbuf_errors();
    let clk = clock_ticks();
    let cpu = CpuWindow::start(pid)?;
    eprintln!(
        "fleet: {} agents × {} events, dials over {:?}, hub VmRSS {}",
        thousands(p.agents as f64),
        thousands(p.per_agent as f64),
        p.dial_spread,
        mb(rss_before)
    );
    let run = run_fleet(
        hub.addr,
        &creds,
        p.per_agent,
        ENDPOINTS,
        p.dial_spread,
        deadline,
    )?;
    let (cpu, _) = cpu.stop(clk)?;
    let hwm = status_kib(pid, "VmHWM")?;
    let rss_after = status_kib(pid, "VmRSS")?;
    let drops = match (drops_before, udp_rcvbuf_errors()) {
        (Some(a), Some(b)) => thousands(b.saturating_sub(a) as f64),
        _ => "unknown".into(),
    };
    ensure!(
        hub.proc.is_running(),
        "the hub exited during the run:\n{}",
        hub.log()
    );
    let failed: Vec<String> = run
        .results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| format!("{e:#}")))
        .collect();
    if let Some(e) = failed.first() {
        bail!(
            "{} of {} agents did not deliver (UDP receive-buffer drops: {drops}); the first: {e}",
            failed.len(),
            p.agents
        );
    }
    let retried: Vec<u32> = run
        .results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|f| f.retries)
        .filter(|&r| r > 0)
        .collect();
    let first_failure = run
        .results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .find_map(|f| f.first_failure.clone());
    let store = HubStore::open(&hub_db(&hub))?;
    let (known, complete, events) = store.fleet(p.per_agent)?;
    drop(store);
    ensure!(
        known == p.agents as u64 && complete == known && events == total,
        "the hub knows {known} agents, {complete} with watermark {}, and stores {events} of {total} events",
        p.per_agent
    );
    hub.proc.term(Duration::from_secs(30))?;
    let rate = per_sec(total, run.elapsed);
    let per_agent_bytes = hwm.saturating_sub(rss_before) as f64 * 1024.0 / p.agents.max(1) as f64;
    eprintln!(
        "fleet: {} events in {:.2} s = {}/s (hub {cpu:.0}% of one core); {} agents retried ({} connections{}); UDP receive-buffer drops on this host: {drops}; hub VmRSS {} before, {} after, VmHWM {}",
        thousands(total as f64),
        run.elapsed.as_secs_f64(),
        thousands(rate),
        retried.len(),
        retried.iter().sum::<u32>(),
        first_failure.map_or(String::new(), |e| format!(", the first because: {e}")),
        mb(rss_before),
        mb(rss_after),
        mb(hwm)
    );
    let _ = std::fs::remove_dir_all(&root);
    Ok(vec![
        Row {
            what: format!(
                "Hub ingest: {} simulated agents × {} events, each its own QUIC + mTLS connection, dials spread over {:.0} s, first dial → last goodbye (events/s; hub synchronous=FULL, {cpu:.0}% of one core; baseline = the single-agent drain above, ratio = fleet / single)",
                thousands(p.agents as f64),
                thousands(p.per_agent as f64),
                p.dial_spread.as_secs_f64()
            ),
            ours: format!("{}/s", thousands(rate)),
            baseline: single.map_or("-".into(), |s| format!("{}/s", thousands(s))),
            ratio: single.map_or("-".into(), |s| format!("{:.2}", rate / s)),
            target: "-".into(),
            verdict: Verdict::Info,
        },
        Row {
            what: format!(
                "Hub ingest, same run: agents that needed a reconnect (all delivered; {} connections retried; UDP receive-buffer drops on the host: {drops})",
                retried.iter().sum::<u32>()
            ),
            ours: format!(
                "{} of {}",
                thousands(retried.len() as f64),
                thousands(p.agents as f64)
            ),
            baseline: "-".into(),
            ratio: "-".into(),
            target: "-".into(),
            verdict: Verdict::Info,
        },
        Row {
            what: format!(
                "Hub ingest, same run: hub memory per connected agent, (VmHWM during the run − VmRSS before the first dial) / agents (VmRSS {} → VmHWM {})",
                mb(rss_before),
                mb(hwm)
            ),
            ours: format!("{:.1} kB", per_agent_bytes / 1e3),
            baseline: "-".into(),
            ratio: "-".into(),
            target: PER_AGENT_GOAL.target(per_agent_bytes / 1e3, |v| format!("{v:.1} kB")),
            verdict: Verdict::from_bool(PER_AGENT_GOAL.met(per_agent_bytes / 1e3)),
        },
    ])
}
