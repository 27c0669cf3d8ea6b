//! The OPC UA measurement: the agent subscribed to 10,000 monitored items on
//! one asyncua server (`tests/peers/opcua_server.py --scale 10000 --tick
//! 1000`), every item changing once a second, so up to 10,000 notifications
//! a second reach the agent. CPU and RSS of the agent over a window after
//! warm-up; the baseline is the server's own CPU (what producing the changes
//! costs), because the comparison the issue asks for, Node-RED with
//! `node-red-contrib-opcua` on the same server, is not built yet (see
//! docs/benchmarks.md).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use outpost_agent::outbox::OutboxReader;
use outpost_tests::{free_port, wait_until, Agent, Proc};

use super::procfs::{clock_ticks, mb, status_kib, CpuWindow};
use super::procs::{outbox_reader, Bins};
use super::report::{thousands, Row, Verdict};

/// Monitored items.
pub(crate) const ITEMS: usize = 10_000;

/// How big a run is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    /// The CPU measurement window.
    pub(crate) window: Duration,
}

/// The asyncua server with `ITEMS` Double variables changing every second.
fn start_server(dir: &Path) -> Result<(Proc, u16)> {
    let python = std::env::var("OUTPOST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("peers")
        .join("opcua_server.py");
    let port = free_port()?;
    let log = dir.join("opcua-server.log");
    let mut child = Command::new(&python)
        .arg(&script)
        .args(["--port", &port.to_string()])
        .args(["--scale", &ITEMS.to_string(), "--tick", "1000"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("cannot run {python:?} with asyncua (tests/run installs it)"))?;
    let stdout = child.stdout.take().context("server stdout")?;
    let proc = Proc {
        child,
        name: "opcua_server.py".into(),
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        for _ in lines {}
    });
    match rx.recv_timeout(Duration::from_secs(180)) {
        Ok(Some(Ok(line))) if line.starts_with("listening ") => Ok((proc, port)),
        other => bail!(
            "the asyncua server did not start ({other:?}): {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ),
    }
}

fn agent_config(data_dir: &Path, port: u16) -> String {
    let mut s = format!(
        r#"[agent]
data_dir = "{}"

[observability]
metrics = ""

[[opcua.servers]]
name = "ua"
endpoint = "opc.tcp://127.0.0.1:{port}/outpost/"
publishing_interval = "1s"
"#,
        data_dir.display()
    );
    for i in 0..ITEMS {
        let _ = write!(
            s,
            "\n[[opcua.servers.nodes]]\nnode_id = \"ns=2;s=n{i}\"\nstream = \"ua/n{i}\"\n"
        );
    }
    s
}

fn wait_for(agent: &mut Agent, r: &OutboxReader, goal: u64, what: &str) -> Result<()> {
    wait_until(Duration::from_secs(180), what, || {
        !agent.proc.is_running() || r.stats().is_ok_and(|s| s.accepted_total >= goal)
    })?;
    ensure!(agent.proc.is_running(), "the agent exited");
    Ok(())
}

/// CPU and RSS of the agent with `ITEMS` monitored items at 1 Hz.
pub(crate) fn subscribe(bins: &Bins, dir: &Path, p: Params) -> Result<Vec<Row>> {
    let home = dir.join("agent-opcua");
    std::fs::create_dir_all(&home)?;
    eprintln!("opcua: starting the asyncua server with {ITEMS} variables");
    let (server, port) = start_server(&home)?;
    let mut agent = bins.start_agent(&home, &agent_config(&home.join("data"), port))?;
    let pid = agent.proc.child.id();
    let r = outbox_reader(&home, &mut agent)?;
    eprintln!("opcua: waiting for two rounds of {ITEMS} notifications");
    wait_for(&mut agent, &r, 2 * ITEMS as u64, "two rounds stored")?;
    let clk = clock_ticks();
    let cpu = CpuWindow::start(pid)?;
    let server_cpu = CpuWindow::start(server.child.id())?;
    let before = r.stats()?.accepted_total;
    std::thread::sleep(p.window);
    let (pct, wall) = cpu.stop(clk)?;
    let (server_pct, _) = server_cpu.stop(clk)?;
    let stored = r.stats()?.accepted_total - before;
    let rate = stored as f64 / wall.as_secs_f64();
    let rss = status_kib(pid, "VmRSS")?;
    let hwm = status_kib(pid, "VmHWM")?;
    ensure!(
        agent.proc.is_running(),
        "the agent exited during the window"
    );
    agent.proc.term(Duration::from_secs(20))?;
    drop(server);
    eprintln!(
        "opcua: agent {pct:.2}% of one core, server {server_pct:.2}%, {}/s stored, RSS {} (peak {})",
        thousands(rate),
        mb(rss),
        mb(hwm)
    );
    Ok(vec![
        Row {
            what: format!(
                "OPC UA, {} monitored items at 1 Hz from an asyncua server: agent CPU over {:.1} s (% of one core; baseline = the server's own CPU; Node-RED + node-red-contrib-opcua not measured yet)",
                thousands(ITEMS as f64),
                wall.as_secs_f64()
            ),
            ours: format!("{pct:.2}%"),
            baseline: format!("asyncua {server_pct:.2}%"),
            ratio: "-".into(),
            target: "< 10%".into(),
            verdict: Verdict::from_bool(pct < 10.0),
        },
        Row {
            what: "OPC UA, same window: notifications stored in the outbox (events/s; as many as the server produces, at most 10,000/s)".into(),
            ours: format!("{}/s", thousands(rate)),
            baseline: "-".into(),
            ratio: "-".into(),
            target: "-".into(),
            verdict: Verdict::Info,
        },
        Row {
            what: "OPC UA, same run: agent VmRSS at the end of the window (VmHWM in parentheses)".into(),
            ours: format!("{} ({})", mb(rss), mb(hwm)),
            baseline: "-".into(),
            ratio: "-".into(),
            target: "-".into(),
            verdict: Verdict::Info,
        },
    ])
}
