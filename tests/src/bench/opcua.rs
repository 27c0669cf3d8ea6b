//! The OPC UA measurement: the agent subscribed to 10,000 monitored items on
//! one asyncua server (`tests/peers/opcua_server.py --scale 10000 --tick
//! 1000`), every item changing once a second, so up to 10,000 notifications
//! a second reach the agent. CPU and RSS of the agent over a window after
//! warm-up, then, on the same server in the same run, of Node-RED with
//! `node-red-contrib-opcua` subscribed to the same 10,000 items (the
//! comparison issue 23 asks for); the server's own CPU says what producing
//! the changes costs. Node-RED is installed from npm into the bench's cache
//! on first use, like the peers row's.
//!
//! Node-RED's flow: an inject node once at start, a function node building
//! the 10,000 node ids, the `OpcUa-Client` node with action `subscribe` and
//! `msg.topic = "multiple"` (one `ClientMonitoredItemGroup` of all items,
//! sampling 1 s, queue 1: the package's way to subscribe many items in one
//! call; one `OpcUa-Item` per node would be 10,000 messages and
//! `ClientMonitoredItem`s), its output into a function node that counts the
//! notifications and logs the count every 1,000 (`node.warn`, which the
//! harness reads from Node-RED's log to get the rate).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use outpost_agent::outbox::OutboxReader;
use outpost_tests::{free_port, wait_until, Agent, Proc};
use serde_json::{json, Value};

use super::peers::{run_logged, Group};
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

/// Node-RED and its OPC UA nodes, pinned: the versions the figures in
/// docs/benchmarks.md were measured with.
const NODE_RED: [&str; 2] = ["node-red@4.1.15", "node-red-contrib-opcua@0.2.354"];

/// Node-RED's npm prefix in the cache.
struct NodeRedInstall {
    node_modules: PathBuf,
    label: String,
}

/// The npm prefix `cache/node-red-opcua` with Node-RED and
/// `node-red-contrib-opcua`; made once, reused while its marker file says
/// the same packages.
fn install_node_red(cache: &Path) -> Result<NodeRedInstall> {
    let prefix = cache.join("node-red-opcua");
    let node_modules = prefix.join("node_modules");
    let marker = prefix.join(".outpost-bench-installed");
    let wanted = NODE_RED.join(" ");
    let cached = std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == wanted);
    if !cached {
        eprintln!(
            "opcua: installing {wanted} into {} (npm, first use only)",
            prefix.display()
        );
        let _ = std::fs::remove_dir_all(&prefix);
        std::fs::create_dir_all(&prefix)?;
        let mut npm = Command::new("npm");
        npm.arg("install")
            .arg("--prefix")
            .arg(&prefix)
            .args(["--no-audit", "--no-fund", "--loglevel=warn"])
            .args(NODE_RED);
        run_logged(npm, &cache.join("node-red-opcua-npm.log"), "npm install")?;
        std::fs::write(&marker, &wanted)?;
    }
    let version_of = |pkg: &str| -> String {
        std::fs::read(node_modules.join(pkg).join("package.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v.get("version")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| "?".into())
    };
    ensure!(
        node_modules.join("node-red").join("red.js").exists(),
        "{} has no node-red/red.js",
        node_modules.display()
    );
    let label = format!(
        "Node-RED {} + node-red-contrib-opcua {}",
        version_of("node-red"),
        version_of("node-red-contrib-opcua")
    );
    Ok(NodeRedInstall {
        node_modules,
        label,
    })
}

/// Node-RED's user folder `home` (settings without editor or HTTP, the flow
/// of the module doc); returns the settings file. Node ids differ from every
/// other string in the file (Node-RED takes a property equal to a config
/// node's id for a reference to it).
fn node_red_config(i: &NodeRedInstall, home: &Path, port: u16) -> Result<PathBuf> {
    std::fs::create_dir_all(home)?;
    let link = home.join("node_modules");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink(&i.node_modules, &link).context("link node_modules")?;
    }
    let settings = home.join("settings.js");
    std::fs::write(
        &settings,
        r#"module.exports = {
  uiHost: "127.0.0.1",
  uiPort: 0,
  httpAdminRoot: false,
  httpNodeRoot: false,
  flowFile: "flows.json",
  credentialSecret: false,
  logging: { console: { level: "warn", metrics: false, audit: false } },
  telemetry: { enabled: false },
  diagnostics: { enabled: false },
  runtimeState: { enabled: false },
};
"#,
    )?;
    let build = format!(
        "const p = [];\nfor (let i = 0; i < {ITEMS}; i++) p.push({{ nodeId: 'ns=2;s=n' + i }});\nreturn {{ topic: 'multiple', payload: p, interval: 1000 }};"
    );
    let flows = json!([
        {"id": "bench", "type": "tab", "label": "outpost-bench"},
        {"id": "ua-endpoint-1", "type": "OpcUa-Endpoint", "name": "asyncua",
         "endpoint": format!("opc.tcp://127.0.0.1:{port}/outpost/"), "secpol": "None",
         "secmode": "None", "none": true, "login": false, "usercert": false,
         "usercertificate": "", "userprivatekey": ""},
        {"id": "inject-1", "type": "inject", "z": "bench", "name": "at start", "props": [],
         "repeat": "", "crontab": "", "once": true, "onceDelay": "1", "topic": "",
         "wires": [["build-1"]]},
        {"id": "build-1", "type": "function", "z": "bench", "name": "the node ids",
         "outputs": 1, "func": build, "wires": [["client-1"]]},
        {"id": "client-1", "type": "OpcUa-Client", "z": "bench", "endpoint": "ua-endpoint-1",
         "action": "subscribe", "deadbandtype": "a", "deadbandvalue": 1, "time": "1",
         "timeUnit": "s", "certificate": "n", "localfile": "", "localkeyfile": "",
         "securitymode": "None", "securitypolicy": "None", "useTransport": false,
         "maxChunkCount": 1, "maxMessageSize": 8192, "receiveBufferSize": 8192,
         "sendBufferSize": 8192, "setstatusandtime": false, "keepsessionalive": false,
         "name": "ua client", "applicationName": "", "applicationUri": "",
         "wires": [["count-1"], ["errors-1"], []]},
        {"id": "count-1", "type": "function", "z": "bench", "name": "count", "outputs": 1,
         "func": "if (msg.topic === 'subscriptionId') return null;\nconst n = (context.get('n') || 0) + 1;\ncontext.set('n', n);\nif (n % 1000 === 0) node.warn('notifications ' + n);\nreturn null;",
         "wires": [[]]},
        {"id": "errors-1", "type": "function", "z": "bench", "name": "client errors",
         "outputs": 1, "func": "node.warn('client error ' + JSON.stringify(msg.error));\nreturn null;",
         "wires": [[]]},
    ]);
    std::fs::write(home.join("flows.json"), serde_json::to_vec_pretty(&flows)?)?;
    Ok(settings)
}

/// The last notification count Node-RED logged (a multiple of 1,000).
fn node_red_count(log: &Path) -> u64 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .rev()
        .find_map(|l| {
            l.split_once("] notifications ")
                .and_then(|(_, n)| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// What one client cost over the window.
struct Measured {
    pct: f64,
    server_pct: f64,
    rate: f64,
    rss: u64,
    hwm: u64,
    wall: Duration,
}

/// Node-RED on the server at `port`, measured like the agent.
fn node_red(
    cache: &Path,
    home: &Path,
    port: u16,
    server: u32,
    p: Params,
) -> Result<(String, Measured)> {
    let i = install_node_red(cache)?;
    let settings = node_red_config(&i, home, port)?;
    let log = home.join("node-red.log");
    let mut cmd = Command::new("node");
    cmd.arg(i.node_modules.join("node-red").join("red.js"))
        .arg("--userDir")
        .arg(home)
        .arg("--settings")
        .arg(&settings)
        .current_dir(home);
    eprintln!("opcua: starting {}", i.label);
    let mut group = Group::spawn(cmd, "node-red", &log, true)?;
    let pid = group.child.id();
    let running = |g: &mut Group| matches!(g.child.try_wait(), Ok(None));
    wait_until(
        Duration::from_secs(180),
        "Node-RED: two rounds of notifications",
        || !running(&mut group) || node_red_count(&log) >= 2 * ITEMS as u64,
    )
    .with_context(|| format!("log {}", log.display()))?;
    ensure!(
        running(&mut group),
        "Node-RED exited (log {})",
        log.display()
    );
    let clk = clock_ticks();
    let cpu = CpuWindow::start(pid)?;
    let server_cpu = CpuWindow::start(server)?;
    let before = node_red_count(&log);
    std::thread::sleep(p.window);
    let (pct, wall) = cpu.stop(clk)?;
    let (server_pct, _) = server_cpu.stop(clk)?;
    let counted = node_red_count(&log).saturating_sub(before);
    let rss = status_kib(pid, "VmRSS")?;
    let hwm = status_kib(pid, "VmHWM")?;
    ensure!(
        running(&mut group),
        "Node-RED exited during the window (log {})",
        log.display()
    );
    group.stop(Duration::from_secs(10));
    Ok((
        i.label,
        Measured {
            pct,
            server_pct,
            rate: counted as f64 / wall.as_secs_f64(),
            rss,
            hwm,
            wall,
        },
    ))
}

/// CPU and RSS of the agent with `ITEMS` monitored items at 1 Hz, then of
/// Node-RED on the same server (installed into `cache` on first use).
pub(crate) fn subscribe(bins: &Bins, dir: &Path, cache: &Path, p: Params) -> Result<Vec<Row>> {
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
    eprintln!(
        "opcua: agent {pct:.2}% of one core, server {server_pct:.2}%, {}/s stored, RSS {} (peak {})",
        thousands(rate),
        mb(rss),
        mb(hwm)
    );
    let ours = Measured {
        pct,
        server_pct,
        rate,
        rss,
        hwm,
        wall,
    };
    // Back to back on the same server process: the same variables, the
    // same rate of change, the same machine.
    let theirs = node_red(
        cache,
        &dir.join("node-red-opcua"),
        port,
        server.child.id(),
        p,
    );
    drop(server);
    let mut rows = Vec::new();
    let cell = |m: &Measured| format!("{:.2}% ({}/s)", m.pct, thousands(m.rate));
    let mem = |m: &Measured| format!("{} ({})", mb(m.rss), mb(m.hwm));
    match &theirs {
        Ok((label, t)) => {
            eprintln!(
                "opcua: {label} {:.2}% of one core, server {:.2}%, {}/s notifications, RSS {} (peak {})",
                t.pct,
                t.server_pct,
                thousands(t.rate),
                mb(t.rss),
                mb(t.hwm)
            );
            rows.push(Row {
                what: format!(
                    "OPC UA, {} monitored items at 1 Hz from an asyncua server: CPU over {:.1} s (% of one core; notifications/s in parentheses; the server at {:.0}% / {:.0}% of a core in the two windows; baseline = {label}, same server, run after the agent)",
                    thousands(ITEMS as f64),
                    ours.wall.as_secs_f64(),
                    ours.server_pct,
                    t.server_pct,
                ),
                ours: cell(&ours),
                baseline: cell(t),
                ratio: format!("{:.2}", ours.pct / t.pct.max(1e-9)),
                target: "< 10%".into(),
                verdict: Verdict::from_bool(ours.pct < 10.0),
            });
            rows.push(Row {
                what: format!(
                    "OPC UA, same windows: CPU per notification (µs of CPU; baseline = {label})"
                ),
                ours: format!("{:.1} µs", 1e4 * ours.pct / ours.rate.max(1e-9)),
                baseline: format!("{:.1} µs", 1e4 * t.pct / t.rate.max(1e-9)),
                ratio: format!(
                    "{:.2}",
                    (ours.pct / ours.rate.max(1e-9)) / (t.pct / t.rate.max(1e-9)).max(1e-12)
                ),
                target: "-".into(),
                verdict: Verdict::Info,
            });
            rows.push(Row {
                what: format!("OPC UA, same runs: VmRSS at the end of the window (VmHWM in parentheses; baseline = {label})"),
                ours: mem(&ours),
                baseline: mem(t),
                ratio: format!("{:.2}", ours.rss as f64 / t.rss.max(1) as f64),
                target: "-".into(),
                verdict: Verdict::Info,
            });
        }
        Err(e) => {
            eprintln!("opcua: Node-RED: {e:#}");
            rows.push(Row {
                what: format!(
                    "OPC UA, {} monitored items at 1 Hz from an asyncua server: agent CPU over {:.1} s (% of one core; notifications/s in parentheses; baseline = the server's own CPU: Node-RED could not be measured, see the next row)",
                    thousands(ITEMS as f64),
                    ours.wall.as_secs_f64()
                ),
                ours: cell(&ours),
                baseline: format!("asyncua {:.2}%", ours.server_pct),
                ratio: "-".into(),
                target: "< 10%".into(),
                verdict: Verdict::from_bool(ours.pct < 10.0),
            });
            rows.push(Row::error(
                "OPC UA peer Node-RED + node-red-contrib-opcua",
                e,
            ));
            rows.push(Row {
                what:
                    "OPC UA, same run: agent VmRSS at the end of the window (VmHWM in parentheses)"
                        .into(),
                ours: mem(&ours),
                baseline: "-".into(),
                ratio: "-".into(),
                target: "-".into(),
                verdict: Verdict::Info,
            });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_last_count_node_red_logged() {
        let dir = std::env::temp_dir().join(format!("outpost-opcua-count-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let log = dir.join("node-red.log");
        assert_eq!(node_red_count(&log), 0, "no log yet");
        std::fs::write(
            &log,
            "6 Dec 17:52:35 - [warn] [function:count] notifications 1000\n\
             6 Dec 17:52:35 - [warn] [OpcUa-Client:ua client] userIdentity is ANONYMOUS\n\
             6 Dec 17:52:37 - [warn] [function:count] notifications 2000\n\
             6 Dec 17:52:37 - [warn] [function:client errors] client error \"x\"\n",
        )
        .expect("write");
        assert_eq!(node_red_count(&log), 2000);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
