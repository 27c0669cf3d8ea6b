//! Measurement: the hub's door under a flood of handshakes without a valid
//! certificate, while a real agent connects.
//!
//! A release hub with its default limits (`[hub] max_handshakes`,
//! `retry_above`, `per_address_burst`, `stream_deadline`) takes `handshakes`
//! QUIC connection attempts from the bench process: half present no client
//! certificate, half one from another CA (made by another `ca init`), spread
//! over `sources` loopback addresses (127.0.1.1, 127.0.1.2, ...) with at most
//! `concurrency` in flight. Once a quarter of them are fired, a real
//! `outpost-agent` with a valid certificate starts from 127.0.0.1; its time to
//! connect runs from its process start to the hub's registry marking it
//! connected. The hub's peak memory is its `VmHWM` after the flood, against
//! its `VmRSS` once it listened and settled.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use outpost_protocols::wire::ALPN;
use rusqlite::{Connection, OpenFlags, OptionalExtension as _};

use crate::procfs::{mb, status_kib};
use crate::procs::{hub_db, Bins};
use crate::report::{thousands, Row, Verdict};

/// The sizes of the run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    /// Connection attempts in the flood.
    pub(crate) handshakes: usize,
    /// Source addresses they come from.
    pub(crate) sources: u8,
    /// Attempts in flight at once.
    pub(crate) concurrency: usize,
}

/// The real agent's id.
const AGENT: &str = "gw-door";

/// How long the hub settles after it listens before its idle RSS is read.
const SETTLE: Duration = Duration::from_secs(2);

/// The target: the agent connects within this long.
const CONNECT_TARGET: Duration = Duration::from_secs(5);

/// The memory bound: twice the idle RSS plus this much (KiB; 96 MB). A
/// handshake in flight holds about 70 KB of quinn and rustls state (the
/// first release run: 70 MB over idle with 1,000 in flight), and the door
/// keeps at most `max_handshakes` (1024) of them; the buckets are at most
/// 32,768 entries of a few dozen bytes.
const MARGIN_KIB: u64 = 93_750;

/// How one attempt of the flood ended.
#[derive(Debug, Default, Clone, Copy)]
struct Outcomes {
    /// Refused before the handshake (`CONNECTION_REFUSED`).
    refused: usize,
    /// Failed or closed after the handshake (no certificate, or an unknown CA).
    closed: usize,
    /// No answer within the attempt's deadline.
    timed_out: usize,
}

/// The flood's result.
struct Flood {
    outcomes: Outcomes,
    elapsed: Duration,
}

/// Fires the flood at `hub`; `fired` counts the attempts started.
fn flood(
    hub: SocketAddr,
    fleet_ca: &Path,
    foreign: &Path,
    p: Params,
    fired: &AtomicUsize,
) -> Result<Flood> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let config = |client: Option<(&Path, &Path)>| -> Result<quinn::ClientConfig> {
        let mut tls = outpost_tls::client_config(outpost_tls::ClientFiles {
            ca: fleet_ca,
            client,
            server_name: None,
        })?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        Ok(quinn::ClientConfig::new(Arc::new(crypto)))
    };
    let anonymous = config(None)?;
    let intruder = config(Some((
        &foreign.join("agent.pem"),
        &foreign.join("agent.key"),
    )))?;
    rt.block_on(async {
        let endpoints = (1..=p.sources.max(1))
            .map(|i| {
                quinn::Endpoint::client(SocketAddr::from((Ipv4Addr::new(127, 0, 1, i), 0)))
                    .context("bind a flood socket")
            })
            .collect::<Result<Vec<_>>>()?;
        let permits = Arc::new(tokio::sync::Semaphore::new(p.concurrency.max(1)));
        let mut attempts = tokio::task::JoinSet::new();
        let mut ends = Vec::with_capacity(p.handshakes);
        let started = Instant::now();
        for i in 0..p.handshakes {
            let permit = permits.clone().acquire_owned().await?;
            let config = if i % 2 == 0 { &anonymous } else { &intruder };
            let connecting =
                endpoints[i % endpoints.len()].connect_with(config.clone(), hub, "127.0.0.1")?;
            fired.fetch_add(1, Ordering::Relaxed);
            attempts.spawn(async move {
                let ended = tokio::time::timeout(Duration::from_secs(30), async move {
                    match connecting.await {
                        Ok(conn) => conn.closed().await,
                        Err(e) => e,
                    }
                })
                .await;
                drop(permit);
                ended
            });
            while let Some(done) = attempts.try_join_next() {
                ends.push(done?);
            }
        }
        let mut o = Outcomes::default();
        while let Some(done) = attempts.join_next().await {
            ends.push(done?);
        }
        for end in ends {
            match end {
                Ok(quinn::ConnectionError::ConnectionClosed(c))
                    if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
                {
                    o.refused += 1;
                }
                Ok(_) => o.closed += 1,
                Err(_) => o.timed_out += 1,
            }
        }
        let elapsed = started.elapsed();
        for e in &endpoints {
            e.close(0u32.into(), b"");
        }
        Ok(Flood {
            outcomes: o,
            elapsed,
        })
    })
}

/// Whether the hub's registry has `agent` connected.
fn connected(db: &Connection, agent: &str) -> Result<bool> {
    let c: Option<i64> = db
        .prepare_cached("SELECT connected FROM agents WHERE agent_id = ?1")?
        .query_row([agent], |r| r.get(0))
        .optional()?;
    Ok(c.unwrap_or(0) > 0)
}

/// The value of the metric line `name` (labels included), 0 if absent.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// The run: see the module doc.
pub(crate) fn run(bins: &Bins, dir: &Path, p: Params) -> Result<Vec<Row>> {
    let root = dir.join("door");
    std::fs::create_dir_all(&root)?;
    let pki = bins.pki(&root.join("pki"))?;
    let creds = pki.issue_agent(AGENT)?;
    let foreign = bins.pki(&root.join("foreign"))?.issue_agent("intruder")?;
    // The default limits; the metrics on a free port, for the door's counts.
    let mut hub = bins.start_hub_keys(
        &root.join("hub"),
        &pki.hub_dir,
        "",
        "[observability]\nmetrics = \"127.0.0.1:0\"\n",
    )?;
    let pid = hub.proc.child.id();
    std::thread::sleep(SETTLE);
    let idle = status_kib(pid, "VmRSS")?;
    let db = Connection::open_with_flags(
        hub_db(&hub),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    db.busy_timeout(Duration::from_secs(5))?;

    let fired = Arc::new(AtomicUsize::new(0));
    let flooding = {
        let (fired, ca, foreign, addr) = (
            fired.clone(),
            pki.hub_dir.join("ca.pem"),
            foreign.clone(),
            hub.addr,
        );
        std::thread::spawn(move || flood(addr, &ca, &foreign, p, &fired))
    };
    let quarter = p.handshakes / 4;
    let wait = Instant::now() + Duration::from_secs(120);
    while fired.load(Ordering::Relaxed) < quarter {
        if flooding.is_finished() || Instant::now() > wait {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let agent_home = root.join("agent");
    let data_dir = agent_home.join("data");
    std::fs::create_dir_all(&data_dir)?;
    let started = Instant::now();
    let mut agent = bins.start_agent(
        &agent_home,
        &format!(
            "[agent]\ndata_dir = \"{}\"\n\n[uplink]\nhub = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[observability]\nmetrics = \"\"\n",
            data_dir.display(),
            hub.addr,
            creds.join("ca.pem").display(),
            creds.join("agent.pem").display(),
            creds.join("agent.key").display(),
        ),
    )?;
    let connect = loop {
        if connected(&db, AGENT)? {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "the agent did not connect within 120 s (log: {})",
                agent_home.join("agent.log").display()
            );
        }
        if !agent.proc.is_running() {
            bail!(
                "the agent exited (log: {})",
                agent_home.join("agent.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let during = !flooding.is_finished();
    let fired_then = fired.load(Ordering::Relaxed);
    let flood = flooding
        .join()
        .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
    let peak = status_kib(pid, "VmHWM")?;
    let after = status_kib(pid, "VmRSS")?;
    let text = hub.metrics().unwrap_or_default();
    let o = flood.outcomes;
    eprintln!(
        "door: {} attempts in {:.1} s: {} refused, {} closed after the handshake, {} timed out; \
         the agent connected after {:.2} s ({} fired then, flood {}); hub VmRSS idle {}, VmHWM {}, VmRSS after {}",
        p.handshakes,
        flood.elapsed.as_secs_f64(),
        o.refused,
        o.closed,
        o.timed_out,
        connect.as_secs_f64(),
        fired_then,
        if during { "still running" } else { "over" },
        mb(idle),
        mb(peak),
        mb(after),
    );
    drop(agent);
    hub.proc.term(Duration::from_secs(30))?;
    let bound = 2 * idle + MARGIN_KIB;
    let n = thousands(p.handshakes as f64);
    Ok(vec![
        Row {
            what: format!("Door: a real agent connects during {n} bad handshakes"),
            ours: format!(
                "{:.2} s{}",
                connect.as_secs_f64(),
                if during {
                    ""
                } else {
                    " (flood over first)"
                }
            ),
            baseline: "-".into(),
            ratio: "-".into(),
            target: format!("< {} s", CONNECT_TARGET.as_secs()),
            verdict: Verdict::from_bool(during && connect < CONNECT_TARGET),
        },
        Row {
            what: format!("Door: hub peak RSS under {n} bad handshakes"),
            ours: format!("{} (idle {})", mb(peak), mb(idle)),
            baseline: "-".into(),
            ratio: "-".into(),
            target: format!("< 2 × idle + {}", mb(MARGIN_KIB)),
            verdict: Verdict::from_bool(peak < bound),
        },
        Row {
            what: format!("Door: how the hub answered {n} bad handshakes"),
            ours: format!(
                "{:.0}/s; refused {} (rate {}, busy {}), retried {}, closed after TLS {}, no answer {}",
                p.handshakes as f64 / flood.elapsed.as_secs_f64().max(1e-9),
                o.refused,
                metric(&text, "outpost_hub_connections_refused_total{reason=\"rate\"}"),
                metric(&text, "outpost_hub_connections_refused_total{reason=\"busy\"}"),
                metric(&text, "outpost_hub_connections_retried_total"),
                o.closed,
                o.timed_out,
            ),
            baseline: "-".into(),
            ratio: "-".into(),
            target: "-".into(),
            verdict: Verdict::Info,
        },
    ])
}
