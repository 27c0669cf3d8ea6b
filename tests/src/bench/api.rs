//! The hub's HTTP API under a steady load: p50 and p99 latency of the
//! fleet and events queries with 1,000 agents in the registry, at a fixed
//! request rate (open loop: each request has its scheduled time, and its
//! latency is counted from then, so a stalled server's queue shows instead
//! of slowing the load down).

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use outpost_hub::store::{Store, Synchronous};
use outpost_protocols::{AgentId, EventBody, Quality, Seq, StreamName, Timestamp, Value};

use crate::procs::Bins;
use crate::report::{Row, Verdict};

/// How big and how long.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    /// Agents in the registry.
    pub(crate) agents: usize,
    /// Events stored per agent.
    pub(crate) per_agent: u64,
    /// Requests per second, both queries together.
    pub(crate) rate: u32,
    /// How long the load runs.
    pub(crate) window: Duration,
}

/// Client threads, each with one keep-alive connection.
const CLIENTS: usize = 8;

fn seed(data: &Path, p: Params) -> Result<()> {
    std::fs::create_dir_all(data)?;
    let key = outpost_hub::audit::key::AuditKey::load_or_create(&data.join("audit.key"))?;
    let mut store = Store::open(&data.join("hub.db"), Synchronous::Normal, key)?;
    for a in 0..p.agents {
        let id = AgentId::parse(&format!("bench-{a:04}"))?;
        let labels = BTreeMap::from([
            ("site".to_owned(), format!("site-{}", a % 50)),
            ("region".to_owned(), "eu-west".to_owned()),
        ]);
        store.agent_connected(&id, &labels, "0.1.0", 4, Timestamp(1_000))?;
        let events: Vec<(Seq, EventBody)> = (1..=p.per_agent)
            .map(|s| {
                Ok((
                    Seq(s),
                    EventBody {
                        stream: StreamName::parse(&format!("plc1/tag{}", s % 10))?,
                        ts: Timestamp(i64::try_from(s)? * 1_000_000),
                        value: Value::F64(s as f64 * 0.5),
                        quality: Quality::Good,
                        attrs: BTreeMap::new(),
                    },
                ))
            })
            .collect::<Result<_>>()?;
        store.insert(Timestamp(2_000), &[(id.clone(), events)])?;
        store.report_backlog(&id, 12, 3_000)?;
        store.agent_disconnected(&id, Timestamp(3_000))?;
    }
    Ok(())
}

/// One keep-alive HTTP/1.1 connection; answers must carry Content-Length
/// (the API's JSON answers do).
struct Conn {
    r: BufReader<TcpStream>,
    w: TcpStream,
    host: SocketAddr,
}

impl Conn {
    fn open(addr: SocketAddr) -> Result<Conn> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Conn {
            r: BufReader::new(s.try_clone()?),
            w: s,
            host: addr,
        })
    }

    fn get(&mut self, path: &str, token: &str) -> Result<usize> {
        write!(
            self.w,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\r\n",
            self.host
        )?;
        let mut line = String::new();
        self.r.read_line(&mut line)?;
        ensure!(line.starts_with("HTTP/1.1 200"), "{path}: {}", line.trim());
        let mut len = None;
        loop {
            line.clear();
            self.r.read_line(&mut line)?;
            let l = line.trim();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse::<usize>().ok();
                }
            }
        }
        let len = len.context("no Content-Length")?;
        let mut body = vec![0; len];
        self.r.read_exact(&mut body)?;
        Ok(len)
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

pub(crate) fn run(bins: &Bins, dir: &Path, p: Params) -> Result<Vec<Row>> {
    let root = dir.join("api");
    let hub_bin = bins.hub()?;
    let pki = outpost_tests::Pki::with_hub(&root, hub_bin)?;
    seed(&root.join("hub").join("hub-data"), p)?;
    let hub = bins.start_hub_with(
        &root.join("hub"),
        &pki.hub_dir,
        "[api]\nlisten = \"127.0.0.1:0\"\nrate = 100000\nburst = 100000\n\n[observability]\nmetrics = \"\"\n",
    )?;
    let (code, out, err) = outpost_tests::run_cli(
        hub_bin,
        &[
            "token",
            "create",
            "--name",
            "bench",
            "--role",
            "viewer",
            "--config",
            &hub.config.display().to_string(),
        ],
    )?;
    ensure!(code == 0, "token create: {err}");
    let token = out.lines().next().context("no token")?.trim().to_owned();
    let api = hub.api_url()?;
    let addr: SocketAddr = api.trim_start_matches("http://").parse()?;
    let paths = [
        "/api/v1/fleet".to_owned(),
        "/api/v1/events?limit=100".to_owned(),
        "/api/v1/events?agent=bench-0500&stream=plc1/%2B&limit=100".to_owned(),
    ];
    // Warm up: every query once, and check the fleet is all there.
    let mut c = Conn::open(addr)?;
    for path in &paths {
        c.get(path, &token)?;
    }
    let total = (f64::from(p.rate) * p.window.as_secs_f64()) as usize;
    let interval = Duration::from_secs_f64(1.0 / f64::from(p.rate));
    let start = Instant::now() + Duration::from_millis(200);
    let results: Vec<Result<Vec<(usize, Duration)>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|k| {
                let (paths, token) = (&paths, &token);
                s.spawn(move || -> Result<Vec<(usize, Duration)>> {
                    let mut c = Conn::open(addr)?;
                    let mut out = Vec::new();
                    for i in (k..total).step_by(CLIENTS) {
                        let due = start + interval * u32::try_from(i)?;
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let which = if i % 2 == 0 { 0 } else { 1 + (i / 2) % 2 };
                        c.get(&paths[which], token)?;
                        out.push((which.min(1), Instant::now() - due));
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("a client thread panicked"))
            })
            .collect()
    });
    let elapsed = start.elapsed();
    let mut fleet = Vec::new();
    let mut events = Vec::new();
    for r in results {
        for (which, d) in r? {
            if which == 0 {
                fleet.push(d);
            } else {
                events.push(d);
            }
        }
    }
    fleet.sort();
    events.sort();
    let achieved = (fleet.len() + events.len()) as f64 / elapsed.as_secs_f64();
    let row = |what: &str, v: &[Duration]| {
        Row {
        what: format!(
            "API {what}, {} agents in the registry, at {} req/s (fleet and events together; {achieved:.0}/s achieved)",
            p.agents, p.rate
        ),
        ours: format!("p99 {} (p50 {}, max {}, n {})", ms(quantile(v, 0.99)), ms(quantile(v, 0.5)), ms(quantile(v, 1.0)), v.len()),
        baseline: "-".into(),
        ratio: "-".into(),
        target: "p99 under 100 ms".into(),
        verdict: Verdict::from_bool(quantile(v, 0.99) < Duration::from_millis(100)),
    }
    };
    Ok(vec![
        row("GET /api/v1/fleet", &fleet),
        row(
            "GET /api/v1/events (a page of 100; all agents, or one agent and a pattern)",
            &events,
        ),
    ])
}
