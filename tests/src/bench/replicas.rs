//! Scale-out: the hub's ingest on the NATS JetStream store through two
//! replicas against one, and one replica against the SQLite hub, from the
//! same simulated fleet (`fleet_sim::run_fleet`: each agent its own
//! certificate and QUIC + mTLS connection).
//!
//! Each round starts a fresh nats-server (JetStream, file store in the run's
//! temporary directory) and fresh hubs, so that no run finds another's
//! stream. With two replicas the fleet is split in halves, one per replica,
//! dialled at the same moment; the clock runs from the first dial to the
//! last agent's goodbye (every agent waits for its acknowledgements, which a
//! replica sends only after the stream and the watermark bucket have the
//! events). Afterwards the stream must hold every event: a run that lost or
//! doubled one is an error, not a figure. Rounds alternate SQLite, one
//! replica, two replicas; the rows give medians.
//!
//! Everything shares one machine: nats-server, the replicas and the
//! simulated fleet. On a 2-core machine two replicas cannot be faster than
//! one by much; the row says what the second replica costs or gains here,
//! not what a cluster of machines would do.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use outpost_tests::fleet_sim::{issue_agents, run_fleet};
use outpost_tests::{Hub, Nats};

use crate::procfs::{clock_ticks, CpuWindow};
use crate::procs::Bins;
use crate::report::{median, per_sec, ratio_row, thousands, Goal, Row, Verdict};

/// Shared client sockets of the simulated fleet (per replica).
const ENDPOINTS: usize = 2;

/// The sizes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    /// Simulated agents in all.
    pub(crate) agents: usize,
    /// Events each sends.
    pub(crate) per_agent: u64,
    /// Rounds (each: SQLite, one replica, two replicas).
    pub(crate) rounds: usize,
}

fn run_timeout(n: u64) -> Duration {
    // 2,000 events/s is far below anything sane on loopback.
    Duration::from_secs(60 + n / 2000)
}

/// The `[store]` tables of a replica on `url`; the replicas in `dir` share
/// one audit key and one hashing key, as every replica of a fleet must.
fn jetstream_tables(url: &str, dir: &Path) -> String {
    format!(
        "[store]\nkind = \"jetstream\"\n\n[store.jetstream]\nurl = \"{url}\"\n\n[observability]\nmetrics = \"\"\n\n[audit]\nkey = \"{}\"\n\n[policy]\nhashing_key = \"{}\"\n",
        dir.join("audit.key").display(),
        dir.join("hashing.key").display()
    )
}

/// One round's rate and the CPU its processes used (% of one core over the
/// run): the hubs together, and nats-server.
struct Round {
    rate: f64,
    hubs_cpu: f64,
    nats_cpu: Option<f64>,
}

/// Runs `groups` of agents at once, each against its hub; the wall time.
fn run_groups(hubs: &[&Hub], groups: &[Vec<PathBuf>], per_agent: u64) -> Result<Duration> {
    let total: u64 = groups.iter().map(|g| g.len() as u64).sum::<u64>() * per_agent;
    let deadline = run_timeout(total);
    let start = Instant::now();
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = hubs
            .iter()
            .zip(groups)
            .map(|(hub, creds)| {
                let addr = hub.addr;
                s.spawn(move || -> Result<()> {
                    let run = run_fleet(
                        addr,
                        creds,
                        per_agent,
                        ENDPOINTS,
                        Duration::from_millis(500),
                        deadline,
                    )?;
                    let failed = run.results.iter().filter(|r| r.is_err()).count();
                    if let Some(Err(e)) = run.results.iter().find(|r| r.is_err()) {
                        bail!("{failed} agents did not deliver; the first: {e:#}");
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("a fleet thread panicked"))
            })
            .collect()
    });
    let elapsed = start.elapsed();
    for r in results {
        r?;
    }
    Ok(elapsed)
}

/// Messages in `stream` of the server at `url`.
fn stream_count(url: &str, stream: &str) -> Result<u64> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(url).await?);
        let s = js
            .get_stream(stream)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let info = s.get_info().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(info.state.messages)
    })
}

/// One round with `replicas` JetStream replicas (0: the SQLite hub); events/s.
fn round(
    bins: &Bins,
    dir: &Path,
    hub_creds: &Path,
    creds: &[PathBuf],
    per_agent: u64,
    replicas: usize,
) -> Result<Round> {
    let clk = clock_ticks();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let total = creds.len() as u64 * per_agent;
    if replicas == 0 {
        let mut hub = bins.start_hub_with(
            &dir.join("hub"),
            hub_creds,
            "[observability]\nmetrics = \"\"\n",
        )?;
        let cpu = CpuWindow::start(hub.proc.child.id())?;
        let elapsed = run_groups(&[&hub], &[creds.to_vec()], per_agent)?;
        let (hubs_cpu, _) = cpu.stop(clk)?;
        hub.proc.term(Duration::from_secs(30))?;
        return Ok(Round {
            rate: per_sec(total, elapsed),
            hubs_cpu,
            nats_cpu: None,
        });
    }
    let nats = Nats::start_with(dir, outpost_tests::free_port()?, "max_payload: 8MB")?;
    let url = nats.url();
    let mut hubs = Vec::with_capacity(replicas);
    for r in 0..replicas {
        hubs.push(bins.start_hub_with(
            &dir.join(format!("replica-{r}")),
            hub_creds,
            &jetstream_tables(&url, dir),
        )?);
    }
    let chunk = creds.len().div_ceil(replicas);
    let groups: Vec<Vec<PathBuf>> = creds.chunks(chunk).map(<[PathBuf]>::to_vec).collect();
    let refs: Vec<&Hub> = hubs.iter().collect();
    let cpus = hubs
        .iter()
        .map(|h| CpuWindow::start(h.proc.child.id()))
        .collect::<Result<Vec<_>>>()?;
    let nats_window = CpuWindow::start(nats.proc.child.id())?;
    let elapsed = run_groups(&refs, &groups, per_agent)?;
    let mut hubs_cpu = 0.0;
    for c in &cpus {
        hubs_cpu += c.stop(clk)?.0;
    }
    let (nats_cpu, _) = nats_window.stop(clk)?;
    let stored = stream_count(&url, "OUTPOST_EVENTS")?;
    ensure!(
        stored == total,
        "the stream holds {stored} events of {total} after the run"
    );
    for mut h in hubs {
        h.proc.term(Duration::from_secs(30))?;
    }
    drop(nats);
    Ok(Round {
        rate: per_sec(total, elapsed),
        hubs_cpu,
        nats_cpu: Some(nats_cpu),
    })
}

/// The measurement.
pub(crate) fn replicas(bins: &Bins, dir: &Path, p: Params) -> Result<Vec<Row>> {
    let root = dir.join("replicas");
    std::fs::create_dir_all(&root)?;
    let pki = bins.pki(&root.join("pki"))?;
    let creds = issue_agents(&pki.ca_dir, &root.join("agents"), p.agents)
        .context("issue the fleet's certificates")?;
    let (mut sqlite, mut one, mut two) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..p.rounds {
        for (replicas, into) in [(0, &mut sqlite), (1, &mut one), (2, &mut two)] {
            let got = round(
                bins,
                &root.join("run"),
                &pki.hub_dir,
                &creds,
                p.per_agent,
                replicas,
            )?;
            eprintln!(
                "replicas: round {} with {}: {}/s, hubs {:.0}% of one core{}",
                r + 1,
                match replicas {
                    0 => "the SQLite hub".to_owned(),
                    n => format!("{n} JetStream replica(s)"),
                },
                thousands(got.rate),
                got.hubs_cpu,
                got.nats_cpu
                    .map_or(String::new(), |c| format!(", nats-server {c:.0}%"))
            );
            into.push(got);
        }
    }
    let _ = std::fs::remove_dir_all(&root);
    let rates = |v: &[Round]| median(&v.iter().map(|r| r.rate).collect::<Vec<_>>());
    let cpu = |v: &[Round]| {
        let hubs = median(&v.iter().map(|r| r.hubs_cpu).collect::<Vec<_>>());
        let nats: Vec<f64> = v.iter().filter_map(|r| r.nats_cpu).collect();
        if nats.is_empty() {
            format!("hub {hubs:.0}% of one core")
        } else {
            format!(
                "hubs {hubs:.0}%, nats-server {:.0}% of one core",
                median(&nats)
            )
        }
    };
    let (o, t) = (rates(&one), rates(&two));
    let (cs, co, ct) = (cpu(&sqlite), cpu(&one), cpu(&two));
    let fleet = format!(
        "{} simulated agents × {} events (each its own QUIC + mTLS connection), first dial → last acknowledgement; nats-server, hubs and fleet on this one machine; median of {}",
        thousands(p.agents as f64),
        thousands(p.per_agent as f64),
        p.rounds
    );
    Ok(vec![
        Row {
            what: format!(
                "Scale-out: hub ingest on the JetStream store, two replicas (the fleet split in halves) vs one ({fleet}; events/s; every event in the stream once checked; two: {ct}; one: {co})"
            ),
            ours: format!("{}/s", thousands(t)),
            baseline: format!("{}/s", thousands(o)),
            ratio: format!("{:.2}", t / o),
            target: "-".into(),
            verdict: Verdict::Info,
        },
        ratio_row(
            format!(
                "Scale-out: one JetStream replica vs the SQLite hub, same fleet ({fleet}; events/s; baseline = the SQLite hub, synchronous=FULL, {cs})"
            ),
            "/s",
            &one
                .iter()
                .zip(&sqlite)
                .map(|(o, s)| (o.rate, s.rate))
                .collect::<Vec<_>>(),
            Goal::AtLeast(0.7),
        ),
    ])
}
