//! Measurements 3 and 4: the agent polling 10,000 Modbus tags at 1 Hz from
//! `outpost-devsim` (CPU and memory), and its memory with a large backlog in
//! the outbox.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use outpost_agent::outbox::{Outbox, OutboxConfig, OutboxReader, Synchronous};
use outpost_protocols::{AgentId, Timestamp};
use outpost_tests::{wait_until, Agent};

use super::procfs::{clock_ticks, mb, status_kib, CpuWindow};
use super::procs::{outbox_reader, Bins};
use super::report::{thousands, Row, Verdict};
use super::workload::{modbus_bodies, now_ns};

/// Tags polled, at addresses `0..TAGS`.
pub(crate) const TAGS: usize = 10_000;

/// How big a run is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    /// The CPU measurement window, in whole polls of 1 s.
    pub(crate) window: Duration,
    /// Events in the outbox before the memory run.
    pub(crate) backlog: usize,
    /// How long the agent runs on the backlog before its RSS is read.
    pub(crate) settle: Duration,
}

/// An agent config that polls `TAGS` u16 holding registers once a second.
fn agent_config(data_dir: &Path, device: &str) -> String {
    let mut s = format!(
        r#"[agent]
data_dir = "{}"

[observability]
metrics = ""

[[modbus.devices]]
name = "plc1"
transport = "tcp"
address = "{device}"
unit = 1
poll = "1s"
"#,
        data_dir.display()
    );
    for i in 0..TAGS {
        let _ = write!(
            s,
            "\n[[modbus.devices.tags]]\nname = \"t{i}\"\ntable = \"holding\"\naddress = {i}\ntype = \"u16\"\n"
        );
    }
    s
}

/// Waits until the outbox has accepted at least `goal` events in total.
fn wait_for_accepted(
    home: &Path,
    agent: &mut Agent,
    r: &OutboxReader,
    goal: u64,
    what: &str,
) -> Result<()> {
    let mut err = None;
    wait_until(Duration::from_secs(60), what, || {
        if !agent.proc.is_running() {
            return true;
        }
        match r.stats() {
            Ok(s) => s.accepted_total >= goal,
            Err(e) => {
                err = Some(e);
                true
            }
        }
    })
    .with_context(|| format!("agent log: {}", home.join("agent.log").display()))?;
    if let Some(e) = err {
        return Err(e.into());
    }
    ensure!(
        agent.proc.is_running(),
        "the agent exited (log: {})",
        home.join("agent.log").display()
    );
    Ok(())
}

/// Measurement 3: CPU and RSS of the agent polling `TAGS` tags at 1 Hz.
pub(crate) fn poll(bins: &Bins, dir: &Path, p: Params) -> Result<Vec<Row>> {
    let home = dir.join("agent-modbus");
    std::fs::create_dir_all(&home)?;
    let sim = bins.start_devsim(TAGS)?;
    let mut agent = bins.start_agent(
        &home,
        &agent_config(&home.join("data"), &sim.addr.to_string()),
    )?;
    let pid = agent.proc.child.id();
    let sim_pid = sim.proc.child.id();
    let r = outbox_reader(&home, &mut agent)?;
    // Warm-up: two complete polls stored, then the window starts.
    eprintln!("modbus: waiting for the first polls of {TAGS} tags");
    wait_for_accepted(&home, &mut agent, &r, 2 * TAGS as u64, "two polls stored")?;
    let clk = clock_ticks();
    // The window runs from the end of one poll to the end of the poll `polls`
    // later (each poll stores exactly TAGS events), so that it holds whole
    // polls: a window cut at arbitrary times would hold one poll more or less.
    let polls = p.window.as_secs().max(1);
    let start_at = (r.stats()?.accepted_total / TAGS as u64 + 1) * TAGS as u64;
    wait_for_accepted(&home, &mut agent, &r, start_at, "a poll to complete")?;
    let cpu = CpuWindow::start(pid)?;
    let sim_cpu = CpuWindow::start(sim_pid)?;
    eprintln!("modbus: measuring over {polls} polls");
    wait_for_accepted(
        &home,
        &mut agent,
        &r,
        start_at + polls * TAGS as u64,
        "the polls of the window",
    )?;
    let (pct, wall) = cpu.stop(clk)?;
    let (sim_pct, _) = sim_cpu.stop(clk)?;
    let rate = (polls * TAGS as u64) as f64 / wall.as_secs_f64();
    let rss = status_kib(pid, "VmRSS")?;
    let hwm = status_kib(pid, "VmHWM")?;
    ensure!(
        agent.proc.is_running(),
        "the agent exited during the window (log: {})",
        home.join("agent.log").display()
    );
    agent.proc.term(Duration::from_secs(20))?;
    eprintln!(
        "modbus: agent {pct:.2}% of one core, devsim {sim_pct:.2}%, {}/s stored, RSS {} (peak {})",
        thousands(rate),
        mb(rss),
        mb(hwm)
    );
    let expected = TAGS as f64;
    Ok(vec![
        Row {
            what: format!(
                "Modbus TCP, {} u16 holding tags at 1 Hz from outpost-devsim: agent CPU over {polls} polls ({:.1} s) (% of one core; baseline = the simulator's own CPU)",
                thousands(TAGS as f64),
                wall.as_secs_f64()
            ),
            ours: format!("{pct:.2}%"),
            baseline: format!("devsim {sim_pct:.2}%"),
            ratio: "-".into(),
            target: "< 10%".into(),
            verdict: Verdict::from_bool(pct < 10.0),
        },
        Row {
            what: "Modbus TCP, same window: samples stored in the outbox (events/s; ratio = vs 10,000/s)".into(),
            ours: format!("{}/s", thousands(rate)),
            baseline: "-".into(),
            ratio: format!("{:.2}", rate / expected),
            target: format!("≈ {}/s (ratio ≥ 0.95)", thousands(expected)),
            verdict: Verdict::from_bool(rate / expected >= 0.95),
        },
        Row {
            what: "Modbus TCP, same run: agent VmRSS at the end of the window (VmHWM in parentheses)"
                .into(),
            ours: format!("{} ({})", mb(rss), mb(hwm)),
            baseline: "-".into(),
            ratio: "-".into(),
            target: "-".into(),
            verdict: Verdict::Info,
        },
    ])
}

/// Measurement 4: the agent's RSS with `TAGS` tags and a pre-filled outbox.
pub(crate) fn backlog(bins: &Bins, dir: &Path, p: Params) -> Result<Vec<Row>> {
    let home = dir.join("agent-backlog");
    let data_dir = home.join("data");
    std::fs::create_dir_all(&data_dir)?;
    let db = data_dir.join("outbox.db");
    eprintln!(
        "backlog: filling {} with {} events",
        db.display(),
        thousands(p.backlog as f64)
    );
    {
        let mut cfg = OutboxConfig::new(&db);
        // Only the fill is NORMAL, for speed; the agent reopens it FULL.
        cfg.synchronous = Synchronous::Normal;
        let mut outbox = Outbox::open(&cfg, AgentId::parse("local")?)?;
        let ts = now_ns();
        let chunk = 10_000;
        let mut done = 0;
        while done < p.backlog {
            let n = chunk.min(p.backlog - done);
            let bodies = modbus_bodies(done, n, TAGS, ts)?;
            outbox.append(Timestamp(ts), &bodies, &[])?;
            done += n;
        }
        let stats = outbox.stats()?;
        ensure!(
            stats.events == p.backlog as u64,
            "the fill stored {} events",
            stats.events
        );
    }
    let file_mb = std::fs::metadata(&db).map(|m| m.len() / 1024).unwrap_or(0);

    let sim = bins.start_devsim(TAGS)?;
    let mut agent = bins.start_agent(&home, &agent_config(&data_dir, &sim.addr.to_string()))?;
    let pid = agent.proc.child.id();
    let r = outbox_reader(&home, &mut agent)?;
    wait_for_accepted(
        &home,
        &mut agent,
        &r,
        (p.backlog + TAGS) as u64,
        "the first poll stored on top of the backlog",
    )?;
    eprintln!("backlog: agent running; reading its RSS in {:?}", p.settle);
    let started = Instant::now();
    std::thread::sleep(p.settle);
    let rss = status_kib(pid, "VmRSS")?;
    let hwm = status_kib(pid, "VmHWM")?;
    let stats = r.stats()?;
    ensure!(
        agent.proc.is_running(),
        "the agent exited (log: {})",
        home.join("agent.log").display()
    );
    agent.proc.term(Duration::from_secs(20))?;
    ensure!(
        stats.events >= p.backlog as u64,
        "the outbox holds {} events, fewer than the backlog",
        stats.events
    );
    eprintln!(
        "backlog: {} events stored after {:?}, RSS {} (peak {})",
        thousands(stats.events as f64),
        started.elapsed(),
        mb(rss),
        mb(hwm)
    );
    Ok(vec![Row {
        what: format!(
            "Agent VmRSS with {} tags at 1 Hz and a {}-event outbox backlog ({} file), after {:.0} s (VmHWM in parentheses)",
            thousands(TAGS as f64),
            thousands(p.backlog as f64),
            mb(file_mb),
            p.settle.as_secs_f64()
        ),
        ours: format!("{} ({})", mb(rss), mb(hwm)),
        baseline: "-".into(),
        ratio: "-".into(),
        target: "< 20 MB".into(),
        verdict: Verdict::from_bool((rss as f64) * 1024.0 < 20e6),
    }])
}

/// The agent with nothing to do: no device, no broker, no uplink — what it
/// costs a gateway just to be installed and running.
pub(crate) fn idle(bins: &Bins, dir: &Path, p: Params) -> Result<Vec<Row>> {
    let home = dir.join("agent-idle");
    let data_dir = home.join("data");
    std::fs::create_dir_all(&data_dir)?;
    let config = format!(
        "[agent]\ndata_dir = \"{}\"\n\n[observability]\nmetrics = \"\"\n",
        data_dir.display()
    );
    let mut agent = bins.start_agent(&home, &config)?;
    let pid = agent.proc.child.id();
    // Running once its outbox is open; then it only waits.
    wait_until(Duration::from_secs(30), "the idle agent's outbox", || {
        data_dir.join("outbox.db").exists()
    })?;
    std::thread::sleep(p.settle);
    let rss = status_kib(pid, "VmRSS")?;
    let hwm = status_kib(pid, "VmHWM")?;
    ensure!(
        agent.proc.is_running(),
        "the idle agent exited (log: {})",
        home.join("agent.log").display()
    );
    agent.proc.term(Duration::from_secs(20))?;
    eprintln!("idle: RSS {} (peak {})", mb(rss), mb(hwm));
    Ok(vec![Row {
        what: format!(
            "Agent VmRSS idle (no device, no broker, no uplink; an empty outbox), after {:.0} s (VmHWM in parentheses)",
            p.settle.as_secs_f64()
        ),
        ours: format!("{} ({})", mb(rss), mb(hwm)),
        baseline: "-".into(),
        ratio: "-".into(),
        target: "< 10 MB".into(),
        verdict: Verdict::from_bool((rss as f64) * 1024.0 < 10e6),
    }])
}
