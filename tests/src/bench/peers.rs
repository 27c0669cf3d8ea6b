//! The peer-gateway measurement: `outpost-agent` beside two peer gateways
//! doing the same job on the same simulator, in the same run.
//!
//! The other rows compare the agent with bare baselines (raw SQLite, a bare
//! subscriber, raw quinn): they say what the agent costs over the floor. Whoever
//! picks an edge gateway compares it with the gateways they would run instead,
//! so this measurement runs two of them — the ThingsBoard IoT Gateway (PyPI
//! `thingsboard-gateway` 3.8.5) and Node-RED 4 with `node-red-contrib-modbus`
//! 5.23.3 — against the same in-process Modbus TCP simulator
//! (`outpost_devsim`, the code the `outpost-devsim` binary serves) and the same
//! Mosquitto, one tool at a time, each alone on the machine:
//!
//! - CPU and memory: 1,000 u16 holding registers polled at 1 Hz, every value
//!   published to Mosquitto at QoS 1 on every poll. CPU is utime+stime of the
//!   tool's whole process tree (the agent; python and whatever it spawned;
//!   node) over a window after warm-up, VmRSS summed over the tree at its end.
//! - Bridge latency: 100 registers polled every 100 ms. The bench changes one
//!   register every 47 ms (so the changes fall at every phase of the polls),
//!   recording the instant under the simulator's lock, and a subscriber in the
//!   bench records when the first message carrying the new value arrives.
//!
//! What each tool does for one poll (each in its own natural way: these are
//! the ways a user would configure it):
//!
//! ```text
//! tool            reads                 publishes (QoS 1)
//! outpost-agent   8 × 125 (its planner) one JSON message per tag, bench/ours/t<i>
//! thingsboard     1 request per tag     one JSON message per poll of the device,
//!                                       v1/gateway/telemetry {"plc1":[{ts, values}]}
//! node-red        8 × 125 (flows.json)  one text message per register, bench/nodered/t<i>
//! ```
//!
//! The peers are installed by the harness into a cache (`target/bench-peers/`:
//! a venv for ThingsBoard, an npm prefix for Node-RED) that later runs reuse;
//! a peer that cannot be installed or run becomes an error row and the other
//! rows are still taken. Every peer runs in a process group of its own, which
//! is killed whole when the peer is done, on error and on drop. Facts this
//! relies on are in shared/PEERS.md: ThingsBoard publishes nothing until its
//! `getSessionLimits` RPC is answered (the bench's subscriber answers it), it
//! pip-installs pymodbus 3.9.2 on its first start and may not load its Modbus
//! connector in that process (the install step puts that version in the venv
//! beforehand, and the bench restarts it once if no data comes), and it prints
//! a deprecation warning per decoded value on stdout (sent to /dev/null).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use outpost_devsim::{self as sim, SimConfig, Tables};
use outpost_tests::{Agent, Mosquitto};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

use super::procfs::{clock_ticks, cpu_ticks, mb, status_kib};
use super::procs::Bins;
use super::report::{thousands, Row, Verdict};

/// Registers polled in the CPU run, at addresses `0..CPU_TAGS`.
const CPU_TAGS: u16 = 1000;
/// The CPU run's poll interval.
const CPU_POLL: Duration = Duration::from_secs(1);
/// Registers polled in the latency run.
const LATENCY_TAGS: u16 = 100;
/// The latency run's poll interval, the same for every tool.
const LATENCY_POLL: Duration = Duration::from_millis(100);
/// How often the bench changes a register in the latency run: prime to the
/// poll interval, so that successive changes fall at every phase of a poll.
const CHANGE_EVERY: Duration = Duration::from_millis(47);

/// The ThingsBoard release installed, as PEERS.md measured it.
const THINGSBOARD: &str = "thingsboard-gateway==3.8.5";
/// The pymodbus that ThingsBoard 3.8.5's Modbus connector pins (and would
/// install itself on its first start).
const THINGSBOARD_PYMODBUS: [&str; 3] = ["pymodbus==3.9.2", "pyserial", "pyserial-asyncio"];
/// Node-RED and its Modbus nodes; PEERS.md: newer `node-red-contrib-modbus`
/// versions depend on a tarball outside the npm registry.
const NODE_RED: [&str; 2] = ["node-red@4", "node-red-contrib-modbus@5.23.3"];

/// How long a peer may take from its start to its first published value
/// (ThingsBoard imports for seconds on a busy 2-core machine).
const FIRST_DATA: Duration = Duration::from_secs(90);

/// How big a run is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    /// The CPU window of each tool.
    pub(crate) cpu_window: Duration,
    /// How long the bench changes registers in each tool's latency run.
    pub(crate) latency_window: Duration,
}

/// One tool's bridge latencies, change → arrival, for plots.
#[derive(Debug, Clone)]
pub(crate) struct LatencySamples {
    /// `outpost-agent`, `thingsboard-gateway` or `node-red`.
    pub(crate) tool: String,
    /// One sample per register change that arrived, in ms, in change order.
    pub(crate) millis: Vec<f64>,
}

/// The measured tools.
#[derive(Debug, Clone)]
enum Tool {
    Ours,
    ThingsBoard(ThingsBoardInstall),
    NodeRed(NodeRedInstall),
}

impl Tool {
    /// Short name, for samples and stderr.
    fn name(&self) -> &'static str {
        match self {
            Tool::Ours => "outpost-agent",
            Tool::ThingsBoard(_) => "thingsboard-gateway",
            Tool::NodeRed(_) => "node-red",
        }
    }

    /// What a row says about it.
    fn label(&self) -> String {
        match self {
            Tool::Ours => "outpost-agent".into(),
            Tool::ThingsBoard(i) => format!("ThingsBoard IoT Gateway {}", i.version),
            Tool::NodeRed(i) => format!(
                "Node-RED {} + node-red-contrib-modbus {}",
                i.version, i.modbus_version
            ),
        }
    }

    /// The values a message carries, as (register, value) pairs, if it is
    /// this tool's.
    fn decode(&self, topic: &str, payload: &[u8]) -> Option<Vec<(u16, u16)>> {
        match self {
            Tool::Ours => {
                let reg = register_of(topic.strip_prefix("bench/ours/")?)?;
                let v: Value = serde_json::from_slice(payload).ok()?;
                let value = u16::try_from(v.get("value")?.as_u64()?).ok()?;
                Some(vec![(reg, value)])
            }
            Tool::NodeRed(_) => {
                let reg = register_of(topic.strip_prefix("bench/nodered/")?)?;
                let value = std::str::from_utf8(payload).ok()?.trim().parse().ok()?;
                Some(vec![(reg, value)])
            }
            Tool::ThingsBoard(_) => {
                if topic != "v1/gateway/telemetry" {
                    return None;
                }
                // {"plc1": [{"ts": 1796138943460, "values": {"t0": 184, ...}}, ...]}
                let v: Value = serde_json::from_slice(payload).ok()?;
                let mut out = Vec::new();
                for entry in v.get("plc1")?.as_array()? {
                    let Some(values) = entry.get("values").and_then(Value::as_object) else {
                        continue;
                    };
                    for (tag, value) in values {
                        let (Some(reg), Some(value)) = (
                            register_of(tag),
                            value.as_u64().and_then(|x| u16::try_from(x).ok()),
                        ) else {
                            continue;
                        };
                        out.push((reg, value));
                    }
                }
                Some(out)
            }
        }
    }
}

/// `t17` → 17.
fn register_of(tag: &str) -> Option<u16> {
    tag.strip_prefix('t')?.parse().ok()
}

/// What a tool is asked to do.
#[derive(Debug, Clone, Copy)]
struct Job {
    /// Registers `0..tags`, one u16 tag each.
    tags: u16,
    /// Poll interval.
    poll: Duration,
}

// ---------------------------------------------------------------------------
// Installing the peers.

/// ThingsBoard's venv in the cache.
#[derive(Debug, Clone)]
struct ThingsBoardInstall {
    python: PathBuf,
    /// The installed package's folder, whose `config/` holds the shipped
    /// `tb_gateway.json` and `logs.json` the bench starts from.
    package: PathBuf,
    version: String,
}

/// Node-RED's npm prefix in the cache.
#[derive(Debug, Clone)]
struct NodeRedInstall {
    node_modules: PathBuf,
    version: String,
    modbus_version: String,
}

/// Runs an install command, with its output in `log`; fails with the log's
/// tail.
pub(crate) fn run_logged(mut cmd: Command, log: &Path, what: &str) -> Result<()> {
    let out = std::fs::File::create(log)?;
    let err = out.try_clone()?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .with_context(|| format!("run {what}"))?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{what} failed ({status}; log {}): {}",
            log.display(),
            tail.join(" / ")
        );
    }
    Ok(())
}

/// The first line of a command's stdout.
fn first_line(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).stderr(Stdio::null()).output()?;
    ensure!(out.status.success(), "exited with {}", out.status);
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_owned())
}

/// The venv `cache/thingsboard` with ThingsBoard and the pymodbus its Modbus
/// connector wants; made once, reused while its marker file says the same
/// packages.
fn install_thingsboard(cache: &Path) -> Result<ThingsBoardInstall> {
    let venv = cache.join("thingsboard");
    let python = venv.join("bin").join("python");
    let marker = venv.join(".outpost-bench-installed");
    let wanted = format!("{THINGSBOARD} {}", THINGSBOARD_PYMODBUS.join(" "));
    let cached = std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == wanted);
    if !cached {
        eprintln!("peers: installing {wanted} into {} (pip)", venv.display());
        let _ = std::fs::remove_dir_all(&venv);
        std::fs::create_dir_all(cache)?;
        let mut venv_cmd = Command::new("python3");
        venv_cmd.arg("-m").arg("venv").arg(&venv);
        run_logged(
            venv_cmd,
            &cache.join("thingsboard-venv.log"),
            "python3 -m venv",
        )?;
        let mut pip = Command::new(&python);
        pip.args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            THINGSBOARD,
        ])
        .args(THINGSBOARD_PYMODBUS);
        run_logged(pip, &cache.join("thingsboard-pip.log"), "pip install")?;
        std::fs::write(&marker, &wanted)?;
    }
    let package = first_line(Command::new(&python).args([
        "-c",
        "import os, thingsboard_gateway as t; print(os.path.dirname(t.__file__))",
    ]))
    .context("find the thingsboard_gateway package")?;
    let version = first_line(Command::new(&python).args([
        "-c",
        "from importlib.metadata import version; print(version('thingsboard-gateway'))",
    ]))
    .unwrap_or_else(|_| "?".into());
    Ok(ThingsBoardInstall {
        python,
        package: PathBuf::from(package),
        version,
    })
}

/// The npm prefix `cache/node-red` with Node-RED and the Modbus nodes; made
/// once, reused while its marker file says the same packages.
fn install_node_red(cache: &Path) -> Result<NodeRedInstall> {
    let prefix = cache.join("node-red");
    let node_modules = prefix.join("node_modules");
    let marker = prefix.join(".outpost-bench-installed");
    let wanted = NODE_RED.join(" ");
    let cached = std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == wanted);
    if !cached {
        eprintln!("peers: installing {wanted} into {} (npm)", prefix.display());
        let _ = std::fs::remove_dir_all(&prefix);
        std::fs::create_dir_all(&prefix)?;
        let mut npm = Command::new("npm");
        npm.arg("install")
            .arg("--prefix")
            .arg(&prefix)
            .args(["--no-audit", "--no-fund", "--loglevel=warn"])
            .args(NODE_RED);
        run_logged(npm, &cache.join("node-red-npm.log"), "npm install")?;
        std::fs::write(&marker, &wanted)?;
    }
    let version_of = |pkg: &str| -> String {
        std::fs::read(node_modules.join(pkg).join("package.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| v.get("version")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| "?".into())
    };
    let version = version_of("node-red");
    let modbus_version = version_of("node-red-contrib-modbus");
    ensure!(
        node_modules.join("node-red").join("red.js").exists(),
        "{} has no node-red/red.js",
        node_modules.display()
    );
    Ok(NodeRedInstall {
        node_modules,
        version,
        modbus_version,
    })
}

// ---------------------------------------------------------------------------
// Processes.

/// A peer's process group (the peer is its leader), killed whole on drop.
pub(crate) struct Group {
    pub(crate) child: Child,
    name: String,
    log: PathBuf,
    /// Set once [`Group::stop`] has killed and reaped it: the group id must
    /// not be signalled again, since it may be free for reuse by then.
    stopped: bool,
}

impl Group {
    /// Spawns `cmd` as the leader of a new process group, stderr to `log`,
    /// and stdout too if `stdout` (else to /dev/null).
    pub(crate) fn spawn(mut cmd: Command, name: &str, log: &Path, stdout: bool) -> Result<Group> {
        use std::os::unix::process::CommandExt as _;
        let err = std::fs::File::create(log)?;
        let out = if stdout {
            Stdio::from(err.try_clone()?)
        } else {
            Stdio::null()
        };
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        Ok(Group {
            child,
            name: name.to_owned(),
            log: log.to_owned(),
            stopped: false,
        })
    }

    /// Signals the whole group.
    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, "--", &format!("-{}", self.child.id())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// SIGTERM to the group, SIGKILL to whatever is left after `grace`.
    pub(crate) fn stop(&mut self, grace: Duration) {
        self.signal("-TERM");
        let deadline = Instant::now() + grace;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Also when the leader is gone: children it left in the group.
        self.signal("-KILL");
        let _ = self.child.wait();
        self.stopped = true;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if !self.stopped {
            self.signal("-KILL");
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running tool.
enum Running {
    Ours(Agent),
    Peer(Group),
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Ours(a) => a.proc.child.id(),
            Running::Peer(g) => g.child.id(),
        }
    }

    fn is_running(&mut self) -> bool {
        match self {
            Running::Ours(a) => a.proc.is_running(),
            Running::Peer(g) => matches!(g.child.try_wait(), Ok(None)),
        }
    }

    fn log(&self) -> String {
        match self {
            Running::Ours(a) => a.config.with_file_name("agent.log").display().to_string(),
            Running::Peer(g) => g.log.display().to_string(),
        }
    }

    fn stop(self) -> Result<()> {
        match self {
            Running::Ours(mut a) => {
                a.proc.term(Duration::from_secs(20))?;
            }
            Running::Peer(mut g) => {
                eprintln!(
                    "peers: stopping {} (process group {})",
                    g.name,
                    g.child.id()
                );
                g.stop(Duration::from_secs(10));
            }
        }
        Ok(())
    }
}

/// `pid` and all its descendants, from the parent pids in /proc.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut parent: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // Field 4 (ppid) is the second after the ')' that closes the
            // command name, which may hold spaces.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|s| s.parse::<u32>().ok());
            if let Some(pp) = ppid {
                parent.push((p, pp));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let at = tree[i];
        tree.extend(parent.iter().filter(|(_, pp)| *pp == at).map(|(p, _)| *p));
        i += 1;
    }
    tree
}

/// CPU ticks of each process of a tree.
fn tree_ticks(root: u32) -> HashMap<u32, u64> {
    process_tree(root)
        .into_iter()
        .filter_map(|p| cpu_ticks(p).ok().map(|t| (p, t)))
        .collect()
}

/// VmRSS summed over a tree, KiB.
fn tree_rss(root: u32) -> u64 {
    process_tree(root)
        .into_iter()
        .filter_map(|p| status_kib(p, "VmRSS").ok())
        .sum()
}

// ---------------------------------------------------------------------------
// The simulator and the observer.

/// `outpost_devsim` serving `0..tags` on a runtime of its own.
struct Simulator {
    _rt: Runtime,
    addr: SocketAddr,
    tables: Arc<Mutex<Tables>>,
    shutdown: CancellationToken,
}

impl Simulator {
    /// With `counting`, the registers count up once a second, as
    /// `outpost-devsim --counters` does; without, only the bench changes them.
    fn start(tags: u16, counting: bool) -> Result<Simulator> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("modbus-sim")
            .enable_all()
            .build()
            .context("start the simulator's runtime")?;
        let cfg: SimConfig = serde_json::from_value(json!({
            "listen": "127.0.0.1:0",
            "size": tags,
            "tick": if counting { "1s" } else { "1h" },
            "counters": if counting { tags } else { 0 },
        }))
        .context("simulator config")?;
        let (s, listener, addr) = rt
            .block_on(sim::bind(&cfg))
            .map_err(|e| anyhow::anyhow!("simulator: {e}"))?;
        let tables = s.tables();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        rt.spawn(async move {
            if let Err(e) = sim::serve(cfg, s, listener, stop).await {
                eprintln!("peers: simulator stopped: {e}");
            }
        });
        Ok(Simulator {
            _rt: rt,
            addr,
            tables,
            shutdown,
        })
    }

    /// Sets holding register `reg` and returns the instant it changed (taken
    /// under the lock, so no read sees the new value before it).
    fn set(&self, reg: u16, value: u16) -> Result<Instant> {
        let mut t = self
            .tables
            .lock()
            .map_err(|_| anyhow::anyhow!("simulator lock poisoned"))?;
        let slot = t
            .holding
            .get_mut(usize::from(reg))
            .context("register past the table")?;
        *slot = value;
        Ok(Instant::now())
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A message as it arrived at the observer.
struct Arrival {
    at: Instant,
    topic: String,
    payload: Vec<u8>,
}

/// The bench's subscriber: takes every message under `bench/` and `v1/`,
/// stamps its arrival, and answers ThingsBoard's `getSessionLimits` as
/// ThingsBoard itself would (PEERS.md).
struct Observer {
    rt: Runtime,
    client: AsyncClient,
    rx: mpsc::Receiver<Arrival>,
    failed: Arc<Mutex<Option<String>>>,
    rpc_answered: Arc<AtomicU64>,
}

impl Observer {
    fn connect(port: u16) -> Result<Observer> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("observer")
            .enable_all()
            .build()
            .context("start the observer's runtime")?;
        let mut opts = MqttOptions::new("outpost-bench-peers-observer", "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_inflight(1000)
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = AsyncClient::new(opts, 1000);
        let (tx, rx) = mpsc::channel();
        let failed = Arc::new(Mutex::new(None));
        let rpc_answered = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        {
            let (failed, rpc_answered, responder) =
                (failed.clone(), rpc_answered.clone(), client.clone());
            rt.spawn(async move {
                let mut subacks = 0;
                loop {
                    match events.poll().await {
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            subacks += 1;
                            if subacks == 2 {
                                let _ = ready_tx.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let at = Instant::now();
                            if let Some(id) = p.topic.strip_prefix("v1/devices/me/rpc/request/") {
                                let request: Value =
                                    serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                                if request.get("method").and_then(Value::as_str)
                                    == Some("getSessionLimits")
                                {
                                    let body = json!({
                                        "rateLimits": {},
                                        "gatewayRateLimits": {},
                                        "maxInflightMessages": 100,
                                        "maxPayloadSize": 65536,
                                    });
                                    let _ = responder.try_publish(
                                        format!("v1/devices/me/rpc/response/{id}"),
                                        QoS::AtLeastOnce,
                                        false,
                                        body.to_string(),
                                    );
                                    rpc_answered.fetch_add(1, Ordering::SeqCst);
                                }
                                continue;
                            }
                            let _ = tx.send(Arrival {
                                at,
                                topic: p.topic,
                                payload: p.payload.to_vec(),
                            });
                        }
                        Ok(_) => {}
                        Err(e) => {
                            if let Ok(mut f) = failed.lock() {
                                *f = Some(e.to_string());
                            }
                            return;
                        }
                    }
                }
            });
        }
        rt.block_on(async {
            client.subscribe("bench/#", QoS::AtLeastOnce).await?;
            client.subscribe("v1/#", QoS::AtLeastOnce).await
        })?;
        if ready_rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let why = failed.lock().ok().and_then(|f| f.clone());
            bail!(
                "the observer got no SUBACK from 127.0.0.1:{port}: {}",
                why.unwrap_or_else(|| "timed out".into())
            );
        }
        Ok(Observer {
            rt,
            client,
            rx,
            failed,
            rpc_answered,
        })
    }

    fn check(&self) -> Result<()> {
        if let Some(e) = self.failed.lock().ok().and_then(|f| f.clone()) {
            bail!("the observer's MQTT connection failed: {e}");
        }
        Ok(())
    }

    /// The next message, waiting until `until` at most.
    fn next(&self, until: Instant) -> Result<Option<Arrival>> {
        self.check()?;
        let wait = until.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(wait) {
            Ok(a) => Ok(Some(a)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.check()?;
                bail!("the observer stopped")
            }
        }
    }

    /// Drops what arrived so far (a previous tool's stragglers).
    fn discard(&self) {
        while self.rx.try_recv().is_ok() {}
    }

    fn close(self) {
        let _ = self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(2), self.client.disconnect()).await
        });
    }
}

// ---------------------------------------------------------------------------
// Starting each tool on a job.

/// What a tool needs to know to start.
struct Ctx<'a> {
    bins: &'a Bins,
    dir: &'a Path,
    broker: u16,
    observer: &'a Observer,
}

/// The agent: one device with `job.tags` u16 tags, every recorded sample
/// bridged to `bench/ours/<tag>` (`on = "poll"`: every poll, as the peers).
fn ours_config(data_dir: &Path, sim: SocketAddr, broker: u16, job: Job) -> String {
    let mut s = format!(
        r#"[agent]
data_dir = "{}"

[observability]
metrics = ""

[mqtt]
broker = "127.0.0.1:{broker}"
client_id = "outpost-bench-peers"
max_inflight = 100

[[modbus.devices]]
name = "plc1"
transport = "tcp"
address = "{sim}"
unit = 1
poll = "{}ms"

[[bridges]]
from = "modbus:plc1/+"
to = "mqtt:bench/ours/{{tag}}"
on = "poll"
qos = 1
"#,
        data_dir.display(),
        job.poll.as_millis()
    );
    for i in 0..job.tags {
        s.push_str(&format!(
            "\n[[modbus.devices.tags]]\nname = \"t{i}\"\ntable = \"holding\"\naddress = {i}\ntype = \"u16\"\n"
        ));
    }
    s
}

/// ThingsBoard's config folder in `home/config`: the shipped
/// `tb_gateway.json` pointed at the broker (remote configuration and
/// statistics off, so that it does the job and nothing else; report
/// strategy ON_RECEIVED, its default: every value read is sent), the shipped
/// `logs.json`, and a Modbus connector with one tag per register.
fn thingsboard_config(
    i: &ThingsBoardInstall,
    home: &Path,
    sim: SocketAddr,
    broker: u16,
    job: Job,
) -> Result<PathBuf> {
    let shipped = i.package.join("config");
    let config = home.join("config");
    std::fs::create_dir_all(&config)?;
    let mut gw: Value = serde_json::from_slice(
        &std::fs::read(shipped.join("tb_gateway.json"))
            .context("read the shipped tb_gateway.json")?,
    )?;
    let tb = gw
        .get_mut("thingsboard")
        .and_then(Value::as_object_mut)
        .context("tb_gateway.json has no thingsboard section")?;
    tb.insert("host".into(), json!("127.0.0.1"));
    tb.insert("port".into(), json!(broker));
    tb.insert("remoteConfiguration".into(), json!(false));
    tb.insert("remoteShell".into(), json!(false));
    tb.insert(
        "security".into(),
        json!({"type": "accessToken", "accessToken": "outpost-bench"}),
    );
    tb.insert("qos".into(), json!(1));
    tb.insert("reportStrategy".into(), json!({"type": "ON_RECEIVED"}));
    if let Some(stats) = tb.get_mut("statistics").and_then(Value::as_object_mut) {
        stats.insert("enable".into(), json!(false));
    }
    gw["connectors"] =
        json!([{"type": "modbus", "name": "Modbus", "configuration": "modbus.json"}]);
    std::fs::write(
        config.join("tb_gateway.json"),
        serde_json::to_vec_pretty(&gw)?,
    )?;
    std::fs::copy(shipped.join("logs.json"), config.join("logs.json"))
        .context("copy the shipped logs.json")?;
    let timeseries: Vec<Value> = (0..job.tags)
        .map(|a| {
            json!({"tag": format!("t{a}"), "type": "16uint", "functionCode": 3,
                   "objectsCount": 1, "address": a})
        })
        .collect();
    let modbus = json!({"master": {"slaves": [{
        "host": sim.ip().to_string(), "port": sim.port(), "type": "tcp", "method": "socket",
        "unitId": 1, "deviceName": "plc1", "deviceType": "default",
        "timeout": 35, "byteOrder": "BIG", "wordOrder": "BIG", "retries": 3,
        "retryOnEmpty": true, "retryOnInvalid": true,
        "pollPeriod": job.poll.as_millis() as u64,
        "connectAttemptTimeMs": 5000, "connectAttemptCount": 5, "waitAfterFailedAttemptsMs": 300000,
        "attributes": [], "timeseries": timeseries, "attributeUpdates": [], "rpc": [],
    }]}});
    std::fs::write(
        config.join("modbus.json"),
        serde_json::to_vec_pretty(&modbus)?,
    )?;
    Ok(config)
}

/// Node-RED's user folder `home`: `node_modules` linked to the cache, a
/// settings file without editor or HTTP, and `flows.json`: reads of at most
/// 125 registers (8 blocks of 125 for 1,000), each answer split by a function
/// node into one message per register, published by an `mqtt out` node.
///
/// Node ids differ from every other string in the file: Node-RED takes any
/// property whose value is a config node's id for a reference to it (a
/// client named as its own id is "a circular config node dependency").
fn node_red_config(
    i: &NodeRedInstall,
    home: &Path,
    sim: SocketAddr,
    broker: u16,
    job: Job,
) -> Result<PathBuf> {
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
    let mut flows = vec![
        json!({"id": "bench", "type": "tab", "label": "outpost-bench"}),
        json!({"id": "modbus-client-1", "type": "modbus-client", "name": "sim", "clienttype": "tcp",
               "bufferCommands": true, "stateLogEnabled": false, "queueLogEnabled": false,
               "failureLogEnabled": true, "tcpHost": sim.ip().to_string(),
               "tcpPort": sim.port().to_string(), "tcpType": "DEFAULT",
               "serialPort": "/dev/null", "serialType": "RTU-BUFFERD", "serialBaudrate": "9600",
               "serialDatabits": "8", "serialStopbits": "1", "serialParity": "none",
               "serialConnectionDelay": "100", "serialAsciiResponseStartDelimiter": "0x3A",
               "unit_id": "1", "commandDelay": "1", "clientTimeout": "1000",
               "reconnectOnTimeout": true, "reconnectTimeout": "2000",
               "parallelUnitIdsAllowed": true}),
        json!({"id": "mqtt-broker-1", "type": "mqtt-broker", "name": "mosquitto",
               "broker": "127.0.0.1", "port": broker.to_string(),
               "clientid": "outpost-bench-nodered", "autoConnect": true, "usetls": false,
               "protocolVersion": "4", "keepalive": "30", "cleansession": true}),
        json!({"id": "split", "type": "function", "z": "bench",
               "name": "one message per register", "outputs": 1,
               "func": "const base = Number(msg.input.payload.address);\nreturn [msg.payload.map((v, i) => ({ topic: 'bench/nodered/t' + (base + i), payload: String(v) }))];",
               "wires": [["publish"]]}),
        json!({"id": "publish", "type": "mqtt out", "z": "bench", "name": "", "topic": "",
               "qos": "1", "retain": "false", "broker": "mqtt-broker-1", "wires": []}),
    ];
    let mut start = 0u16;
    while start < job.tags {
        let n = (job.tags - start).min(125);
        flows.push(json!({
            "id": format!("read{start}"), "type": "modbus-read", "z": "bench",
            "name": format!("holding {start}..{}", start + n), "topic": "",
            "showStatusActivities": false, "logIOActivities": false, "showErrors": true,
            "unitid": "1", "dataType": "HoldingRegister", "adr": start.to_string(),
            "quantity": n.to_string(), "rate": job.poll.as_millis().to_string(), "rateUnit": "ms",
            "delayOnStart": false, "startDelayTime": "", "server": "modbus-client-1", "useIOFile": false,
            "ioFile": "", "useIOForPayload": false, "emptyMsgOnFail": false,
            "wires": [["split"], []],
        }));
        start += n;
    }
    std::fs::write(home.join("flows.json"), serde_json::to_vec_pretty(&flows)?)?;
    Ok(settings)
}

/// Starts `tool` on `job` against the simulator at `sim`; its files go to
/// `home`.
fn start(tool: &Tool, ctx: &Ctx<'_>, home: &Path, sim: SocketAddr, job: Job) -> Result<Running> {
    std::fs::create_dir_all(home)?;
    Ok(match tool {
        Tool::Ours => Running::Ours(
            ctx.bins
                .start_agent(home, &ours_config(&home.join("data"), sim, ctx.broker, job))?,
        ),
        Tool::ThingsBoard(i) => {
            let config = thingsboard_config(i, home, sim, ctx.broker, job)?;
            let mut cmd = Command::new(&i.python);
            // `thingsboard-gateway`'s entry point, with the config folder it
            // reads from TB_GW_CONFIG_DIR; its logs go to ./logs.
            cmd.args([
                "-c",
                "from thingsboard_gateway.tb_gateway import daemon; daemon()",
            ])
            .current_dir(home)
            .env("TB_GW_CONFIG_DIR", &config);
            // Its stdout carries a deprecation warning per decoded value
            // (PEERS.md): /dev/null, so that it costs what a service does.
            Running::Peer(Group::spawn(
                cmd,
                tool.name(),
                &home.join("stderr.log"),
                false,
            )?)
        }
        Tool::NodeRed(i) => {
            let settings = node_red_config(i, home, sim, ctx.broker, job)?;
            let mut cmd = Command::new("node");
            cmd.arg(i.node_modules.join("node-red").join("red.js"))
                .arg("--userDir")
                .arg(home)
                .arg("--settings")
                .arg(&settings)
                .current_dir(home);
            // Node-RED logs to stdout; at level warn that is a few lines.
            Running::Peer(Group::spawn(
                cmd,
                tool.name(),
                &home.join("node-red.log"),
                true,
            )?)
        }
    })
}

/// Waits for the tool's first published value: `Ok(false)` if none came in
/// [`FIRST_DATA`].
fn first_data(tool: &Tool, ctx: &Ctx<'_>, running: &mut Running) -> Result<bool> {
    let deadline = Instant::now() + FIRST_DATA;
    while Instant::now() < deadline {
        if !running.is_running() {
            bail!("{} exited on start (log: {})", tool.name(), running.log());
        }
        if let Some(a) = ctx
            .observer
            .next(Instant::now() + Duration::from_millis(200))?
        {
            if tool
                .decode(&a.topic, &a.payload)
                .is_some_and(|v| !v.is_empty())
            {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Starts the tool and waits for its first published value. ThingsBoard gets
/// a second start if the first brings nothing (PEERS.md: the process that
/// installed pymodbus may not load the Modbus connector).
fn start_and_wait(
    tool: &Tool,
    ctx: &Ctx<'_>,
    home: &Path,
    sim: SocketAddr,
    job: Job,
) -> Result<Running> {
    ctx.observer.discard();
    let mut running = start(tool, ctx, home, sim, job)?;
    if first_data(tool, ctx, &mut running)? {
        return Ok(running);
    }
    let log = running.log();
    running.stop()?;
    if matches!(tool, Tool::ThingsBoard(_)) {
        eprintln!(
            "peers: {} published nothing in {FIRST_DATA:?}; starting it once more",
            tool.name()
        );
        let mut running = start(tool, ctx, home, sim, job)?;
        if first_data(tool, ctx, &mut running)? {
            return Ok(running);
        }
        let log = running.log();
        running.stop()?;
        bail!(
            "{} published no value in {FIRST_DATA:?}, twice (log: {log}; {} getSessionLimits answered)",
            tool.name(),
            ctx.observer.rpc_answered.load(Ordering::SeqCst)
        );
    }
    bail!(
        "{} published no value in {FIRST_DATA:?} (log: {log})",
        tool.name()
    )
}

// ---------------------------------------------------------------------------
// The two runs.

/// What the CPU run measured for one tool.
struct Cpu {
    pct: f64,
    rss_kib: u64,
    wall: Duration,
    messages: f64,
    values: f64,
}

/// CPU and memory of `tool` polling `CPU_TAGS` registers at 1 Hz.
fn cpu_run(tool: &Tool, ctx: &Ctx<'_>, window: Duration) -> Result<Cpu> {
    let sim = Simulator::start(CPU_TAGS, true)?;
    let job = Job {
        tags: CPU_TAGS,
        poll: CPU_POLL,
    };
    let home = ctx.dir.join(format!("cpu-{}", tool.name()));
    eprintln!(
        "peers: {} polling {CPU_TAGS} registers at 1 Hz",
        tool.name()
    );
    let mut running = start_and_wait(tool, ctx, &home, sim.addr, job)?;
    // Warm-up: two more polls' worth of values after the first, so that
    // start-up work (imports, flow deployment, the config parse) is over.
    let warm = 2 * u64::from(CPU_TAGS);
    let mut seen = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen < warm {
        if Instant::now() > deadline {
            bail!(
                "{} published {seen} of {warm} warm-up values in 60 s (log: {})",
                tool.name(),
                running.log()
            );
        }
        if let Some(a) = ctx
            .observer
            .next(Instant::now() + Duration::from_millis(200))?
        {
            seen += tool
                .decode(&a.topic, &a.payload)
                .map_or(0, |v| v.len() as u64);
        }
    }
    let pid = running.pid();
    let clk = clock_ticks();
    let before = tree_ticks(pid);
    let started = Instant::now();
    let end = started + window;
    let (mut messages, mut values) = (0u64, 0u64);
    while Instant::now() < end {
        if let Some(a) = ctx.observer.next(end)? {
            if let Some(v) = tool.decode(&a.topic, &a.payload) {
                messages += 1;
                values += v.len() as u64;
            }
        }
    }
    let after = tree_ticks(pid);
    let wall = started.elapsed();
    let rss_kib = tree_rss(pid);
    let procs = after.len();
    ensure!(
        running.is_running(),
        "{} exited during the window (log: {})",
        tool.name(),
        running.log()
    );
    running.stop()?;
    let ticks: u64 = after
        .iter()
        .map(|(p, t)| t.saturating_sub(before.get(p).copied().unwrap_or(0)))
        .sum();
    let secs = wall.as_secs_f64();
    let cpu = Cpu {
        pct: 100.0 * ticks as f64 / clk as f64 / secs,
        rss_kib,
        wall,
        messages: messages as f64 / secs,
        values: values as f64 / secs,
    };
    eprintln!(
        "peers: {} {:.2}% of one core over {secs:.1} s ({procs} processes), RSS {}, {} msg/s, {} values/s",
        tool.name(),
        cpu.pct,
        mb(rss_kib),
        thousands(cpu.messages),
        thousands(cpu.values)
    );
    Ok(cpu)
}

/// What the latency run measured for one tool.
struct Latency {
    /// Change → first arrival of the new value, ms, in change order.
    millis: Vec<f64>,
    changes: usize,
    messages: f64,
    values: f64,
}

/// Bridge latency of `tool` polling `LATENCY_TAGS` registers every
/// `LATENCY_POLL` while the bench changes one every `CHANGE_EVERY`.
fn latency_run(tool: &Tool, ctx: &Ctx<'_>, window: Duration) -> Result<Latency> {
    let sim = Simulator::start(LATENCY_TAGS, false)?;
    let job = Job {
        tags: LATENCY_TAGS,
        poll: LATENCY_POLL,
    };
    let home = ctx.dir.join(format!("latency-{}", tool.name()));
    eprintln!(
        "peers: {} polling {LATENCY_TAGS} registers every {LATENCY_POLL:?}",
        tool.name()
    );
    let mut running = start_and_wait(tool, ctx, &home, sim.addr, job)?;
    // Warm-up: every register published at least once.
    let mut seen = vec![false; usize::from(LATENCY_TAGS)];
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.iter().any(|s| !s) {
        if Instant::now() > deadline {
            bail!(
                "{} published {} of {LATENCY_TAGS} registers in 60 s (log: {})",
                tool.name(),
                seen.iter().filter(|s| **s).count(),
                running.log()
            );
        }
        if let Some(a) = ctx
            .observer
            .next(Instant::now() + Duration::from_millis(200))?
        {
            for (r, _) in tool.decode(&a.topic, &a.payload).unwrap_or_default() {
                if let Some(s) = seen.get_mut(usize::from(r)) {
                    *s = true;
                }
            }
        }
    }

    // Change k sets register k % TAGS to k / TAGS + 1: every value of a
    // register is new, and a register changes again only after TAGS changes
    // (4.7 s), long after every tool has published the previous one.
    let tags = usize::from(LATENCY_TAGS);
    let changes = (window.as_secs_f64() / CHANGE_EVERY.as_secs_f64()).floor() as usize;
    let mut changed_at: Vec<Option<Instant>> = vec![None; changes];
    let mut arrived_at: Vec<Option<Instant>> = vec![None; changes];
    let (mut messages, mut values) = (0u64, 0u64);
    let mut record = |a: &Arrival, arrived_at: &mut Vec<Option<Instant>>, counting: bool| {
        let Some(vals) = tool.decode(&a.topic, &a.payload) else {
            return;
        };
        if counting {
            messages += 1;
            values += vals.len() as u64;
        }
        for (r, v) in vals {
            let (r, v) = (usize::from(r), usize::from(v));
            if v == 0 || r >= tags {
                continue;
            }
            let k = (v - 1) * tags + r;
            if let Some(slot @ None) = arrived_at.get_mut(k) {
                *slot = Some(a.at);
            }
        }
    };
    let started = Instant::now();
    for (k, changed) in changed_at.iter_mut().enumerate() {
        let due = started + CHANGE_EVERY * k as u32;
        // Messages are taken while waiting for the next change: their
        // instants were stamped on arrival by the observer's thread.
        while let Some(a) = ctx.observer.next(due)? {
            record(&a, &mut arrived_at, true);
        }
        let reg = (k % tags) as u16;
        let value = (k / tags + 1) as u16;
        *changed = Some(sim.set(reg, value)?);
    }
    let last_change = Instant::now();
    // The window for the rates ends one change interval after the last
    // change; then the stragglers are waited for (not counted in the rates).
    let window_end = last_change + CHANGE_EVERY;
    while let Some(a) = ctx.observer.next(window_end)? {
        record(&a, &mut arrived_at, true);
    }
    let rate_secs = window_end.duration_since(started).as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(10);
    while arrived_at.iter().any(Option::is_none) && Instant::now() < deadline {
        if let Some(a) = ctx
            .observer
            .next(deadline.min(Instant::now() + Duration::from_millis(100)))?
        {
            record(&a, &mut arrived_at, false);
        }
    }
    ensure!(
        running.is_running(),
        "{} exited during the latency run (log: {})",
        tool.name(),
        running.log()
    );
    running.stop()?;
    let millis: Vec<f64> = changed_at
        .iter()
        .zip(&arrived_at)
        .filter_map(|(c, a)| Some(a.as_ref()?.saturating_duration_since((*c)?).as_secs_f64() * 1e3))
        .collect();
    let l = Latency {
        changes,
        messages: messages as f64 / rate_secs,
        values: values as f64 / rate_secs,
        millis,
    };
    eprintln!(
        "peers: {} latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} of {changes} changes; {} msg/s, {} values/s",
        tool.name(),
        percentile(&l.millis, 50.0),
        percentile(&l.millis, 99.0),
        percentile(&l.millis, 100.0),
        l.millis.len(),
        thousands(l.messages),
        thousands(l.values)
    );
    Ok(l)
}

/// The `p`-th percentile (nearest rank) of `v`; NaN if empty.
fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// Both runs of one tool.
struct Measured {
    cpu: Cpu,
    latency: Latency,
}

fn measure_tool(tool: &Tool, ctx: &Ctx<'_>, p: Params) -> Result<Measured> {
    let cpu = cpu_run(tool, ctx, p.cpu_window)?;
    let latency = latency_run(tool, ctx, p.latency_window)?;
    Ok(Measured { cpu, latency })
}

// ---------------------------------------------------------------------------
// The rows.

fn cpu_cell(c: &Cpu) -> String {
    format!("{:.2}% ({} values/s)", c.pct, thousands(c.values))
}

fn latency_cell(l: &Latency) -> String {
    let lost = l.changes - l.millis.len();
    format!(
        "{:.1} / {:.1} ms{}",
        percentile(&l.millis, 50.0),
        percentile(&l.millis, 99.0),
        if lost > 0 {
            format!(" ({lost} of {} changes never arrived)", l.changes)
        } else {
            String::new()
        }
    )
}

fn rate_cell(l: &Latency) -> String {
    format!(
        "{} msg/s ({} values/s)",
        thousands(l.messages),
        thousands(l.values)
    )
}

/// The four rows comparing ours with one peer.
fn rows_for(ours: &Measured, peer: &Tool, theirs: &Measured) -> Vec<Row> {
    let label = peer.label();
    let (o, t) = (&ours.cpu, &theirs.cpu);
    let (ol, tl) = (&ours.latency, &theirs.latency);
    vec![
        Row {
            what: format!(
                "Modbus TCP → MQTT, {} u16 holding registers polled at 1 Hz, every value published at QoS 1: CPU of the process tree over {:.0} s (% of one core; values/s arriving in parentheses; baseline = {label})",
                thousands(f64::from(CPU_TAGS)),
                o.wall.as_secs_f64()
            ),
            ours: cpu_cell(o),
            baseline: cpu_cell(t),
            ratio: format!("{:.2}", o.pct / t.pct),
            target: "-".into(),
            verdict: Verdict::Info,
        },
        Row {
            what: format!("Same runs: VmRSS of the process tree at the end of the window (baseline = {label})"),
            ours: mb(o.rss_kib),
            baseline: mb(t.rss_kib),
            ratio: format!("{:.2}", o.rss_kib as f64 / t.rss_kib.max(1) as f64),
            target: "-".into(),
            verdict: Verdict::Info,
        },
        Row {
            what: format!(
                "Modbus → MQTT latency, {LATENCY_TAGS} registers polled every {} ms, one changed every {} ms ({} changes): register change → message with the new value at a subscriber, p50 / p99 (baseline = {label})",
                LATENCY_POLL.as_millis(),
                CHANGE_EVERY.as_millis(),
                ol.changes
            ),
            ours: latency_cell(ol),
            baseline: latency_cell(tl),
            ratio: format!(
                "{:.2} / {:.2}",
                percentile(&ol.millis, 50.0) / percentile(&tl.millis, 50.0),
                percentile(&ol.millis, 99.0) / percentile(&tl.millis, 99.0)
            ),
            target: "-".into(),
            verdict: Verdict::Info,
        },
        Row {
            what: format!(
                "Same runs: messages/s arriving at the subscriber (values/s in parentheses; ratio = of values/s; baseline = {label})"
            ),
            ours: rate_cell(ol),
            baseline: rate_cell(tl),
            ratio: format!("{:.2}", ol.values / tl.values),
            target: "-".into(),
            verdict: Verdict::Info,
        },
    ]
}

/// Runs the measurement: installs the peers into `cache` (if not there
/// yet), then measures ours, ThingsBoard and Node-RED in turn. A peer that
/// cannot be installed or measured gives an error row; ours failing fails
/// the measurement.
pub(crate) fn run(
    bins: &Bins,
    dir: &Path,
    cache: &Path,
    p: Params,
) -> Result<(Vec<Row>, Vec<LatencySamples>)> {
    let dir = dir.join("peers");
    std::fs::create_dir_all(&dir)?;
    let peers: Vec<(&str, Result<Tool>)> = vec![
        (
            "ThingsBoard IoT Gateway",
            install_thingsboard(cache).map(Tool::ThingsBoard),
        ),
        (
            "Node-RED + node-red-contrib-modbus",
            install_node_red(cache).map(Tool::NodeRed),
        ),
    ];
    let broker_dir = dir.join("mosquitto");
    std::fs::create_dir_all(&broker_dir)?;
    let broker = Mosquitto::start(&broker_dir)?;
    let observer = Observer::connect(broker.port)?;
    let ctx = Ctx {
        bins,
        dir: &dir,
        broker: broker.port,
        observer: &observer,
    };
    let ours = measure_tool(&Tool::Ours, &ctx, p)?;
    let mut rows = Vec::new();
    let mut samples = vec![LatencySamples {
        tool: Tool::Ours.name().into(),
        millis: ours.latency.millis.clone(),
    }];
    for (what, tool) in peers {
        let measured = tool.and_then(|t| {
            let m = measure_tool(&t, &ctx, p)?;
            Ok((t, m))
        });
        match measured {
            Ok((t, m)) => {
                rows.extend(rows_for(&ours, &t, &m));
                samples.push(LatencySamples {
                    tool: t.name().into(),
                    millis: m.latency.millis,
                });
            }
            Err(e) => {
                eprintln!("peers: {what}: {e:#}");
                rows.push(Row::error(&format!("Peer gateway {what}"), &e));
            }
        }
    }
    observer.close();
    drop(broker);
    for s in &samples {
        eprintln!("peers: {} latency samples from {}", s.millis.len(), s.tool);
    }
    Ok((rows, samples))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_takes_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn each_tool_decodes_its_own_messages_only() {
        let ours = Tool::Ours;
        assert_eq!(
            ours.decode(
                "bench/ours/t17",
                br#"{"quality":{"status":"good"},"ts":1,"value":42}"#
            ),
            Some(vec![(17, 42)])
        );
        assert_eq!(ours.decode("bench/nodered/t17", b"42"), None);
        let red = Tool::NodeRed(NodeRedInstall {
            node_modules: PathBuf::new(),
            version: "4".into(),
            modbus_version: "5".into(),
        });
        assert_eq!(
            red.decode("bench/nodered/t3", b"65535"),
            Some(vec![(3, 65535)])
        );
        let tb = Tool::ThingsBoard(ThingsBoardInstall {
            python: PathBuf::new(),
            package: PathBuf::new(),
            version: "3".into(),
        });
        let mut got = tb
            .decode(
                "v1/gateway/telemetry",
                br#"{"plc1":[{"ts":1,"values":{"t0":5,"t1":6}},{"ts":2,"values":{"t2":7}}]}"#,
            )
            .unwrap_or_default();
        got.sort_unstable();
        assert_eq!(got, vec![(0, 5), (1, 6), (2, 7)]);
        assert_eq!(tb.decode("v1/gateway/connect", b"{}"), None);
    }
}
