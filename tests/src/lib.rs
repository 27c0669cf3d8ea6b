//! Shared helpers for the end-to-end tests and the benchmark harness: start the
//! real binaries and the real peers on free ports, wait for conditions with
//! generous deadlines, and clean up on drop.
//!
//! Nothing here sleeps for a fixed time to let something happen: every wait
//! polls a condition until a deadline, because CI runs on a shared 2-core
//! machine where timings vary by an order of magnitude.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};

/// The folder holding the workspace's built binaries (`target/debug` unless
/// `OUTPOST_BIN_DIR` says otherwise).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("OUTPOST_BIN_DIR") {
        return PathBuf::from(d);
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| manifest.join("..").join("target"));
    target.join("debug")
}

/// The path of one of the workspace's binaries; fails with a hint if it was
/// not built.
pub fn bin(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} not found: run `cargo build --bins` first (tests/run does)",
            p.display()
        );
    }
    Ok(p)
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> Result<()> {
    wait_until(timeout, &format!("{addr} to accept connections"), || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    })
}

/// Whether a command is on PATH.
pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// What it is, for messages.
    pub name: String,
}

impl Proc {
    /// Sends SIGKILL and reaps.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn term(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                self.kill9();
                bail!("{} did not exit within {timeout:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A Mosquitto broker on a free port with a config fit for measuring the
/// agent rather than the broker (see shared/PEERS.md).
pub struct Mosquitto {
    /// The process.
    pub proc: Proc,
    /// Its port.
    pub port: u16,
}

impl Mosquitto {
    /// Starts Mosquitto with persistence in `dir`.
    pub fn start(dir: &Path) -> Result<Mosquitto> {
        Self::start_on(dir, free_port()?)
    }

    /// Starts Mosquitto on a given port (to restart it where clients expect it).
    pub fn start_on(dir: &Path, port: u16) -> Result<Mosquitto> {
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 1000\nmax_queued_messages 0\npersistence true\npersistence_location {}/\nautosave_interval 1\n",
                dir.display()
            ),
        )?;
        let exe = ["/usr/sbin/mosquitto", "mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).exists() || have(p))
            .context("mosquitto not installed (tests/run installs it)")?;
        let log = std::fs::File::create(dir.join(format!("mosquitto-{port}.log")))?;
        let child = Command::new(exe)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start mosquitto")?;
        let m = Mosquitto {
            proc: Proc {
                child,
                name: "mosquitto".into(),
            },
            port,
        };
        wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(20),
        )?;
        Ok(m)
    }
}

/// The device simulator binary on a free port.
pub struct Devsim {
    /// The process.
    pub proc: Proc,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Devsim {
    /// Starts `outpost-devsim` with a config file's text (its `listen` is
    /// replaced by `listen`, or a free port).
    pub fn start(dir: &Path, config: &str, listen: Option<SocketAddr>) -> Result<Devsim> {
        let listen = match listen {
            Some(a) => a,
            None => SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        };
        let path = dir.join(format!("sim-{}.toml", listen.port()));
        std::fs::write(&path, config)?;
        let mut child = Command::new(bin("outpost-devsim")?)
            .arg("--config")
            .arg(&path)
            .arg("--listen")
            .arg(listen.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start outpost-devsim")?;
        let stdout = child.stdout.take().context("devsim stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr: SocketAddr = line
            .trim()
            .strip_prefix("listening ")
            .with_context(|| format!("devsim said {line:?}"))?
            .parse()?;
        Ok(Devsim {
            proc: Proc {
                child,
                name: "outpost-devsim".into(),
            },
            addr,
        })
    }
}

/// An `outpost-agent run` process.
pub struct Agent {
    /// The process.
    pub proc: Proc,
    /// Its config file.
    pub config: PathBuf,
}

impl Agent {
    /// Writes `config` to `dir/agent.toml` and starts the agent on it.
    pub fn start(dir: &Path, config: &str) -> Result<Agent> {
        let path = dir.join("agent.toml");
        std::fs::write(&path, config)?;
        Self::start_file(&path)
    }

    /// Starts the agent on an existing config file; its log goes to
    /// `agent.log` beside it (appended, so restarts keep history).
    pub fn start_file(path: &Path) -> Result<Agent> {
        Self::start_file_with_env(path, &[])
    }

    /// [`Agent::start_file`] with more environment variables (a test-only
    /// fault such as `outpost_agent::commands::ABORT_AFTER_RECORD`).
    pub fn start_file_with_env(path: &Path, env: &[(&str, &str)]) -> Result<Agent> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path.with_file_name("agent.log"))?;
        let child = Command::new(bin("outpost-agent")?)
            .arg("run")
            .arg("--config")
            .arg(path)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start outpost-agent")?;
        Ok(Agent {
            proc: Proc {
                child,
                name: "outpost-agent".into(),
            },
            config: path.to_owned(),
        })
    }
}

/// Appends `bodies` to the outbox in `data_dir` as agent `agent`, in
/// transactions of 1,000, through the agent's library, before any agent runs
/// on it: a backlog to drain.
pub fn fill_outbox(
    data_dir: &Path,
    agent: &str,
    bodies: &[outpost_protocols::EventBody],
) -> Result<()> {
    use outpost_agent::outbox::{Outbox, OutboxConfig};
    std::fs::create_dir_all(data_dir)?;
    let mut outbox = Outbox::open(
        &OutboxConfig::new(data_dir.join("outbox.db")),
        outpost_protocols::AgentId::parse(agent)?,
    )?;
    for chunk in bodies.chunks(1000) {
        let ts = chunk
            .first()
            .map_or(outpost_protocols::Timestamp(0), |b| b.ts);
        let outcome = outbox.append(ts, chunk, &[])?;
        anyhow::ensure!(outcome.accepted == chunk.len(), "{outcome:?}");
    }
    Ok(())
}

/// Runs a CLI command to completion: (exit code, stdout, stderr).
pub fn run_cli(exe: &Path, args: &[&str]) -> Result<(i32, String, String)> {
    let out = Command::new(exe).args(args).output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Every event in an agent's outbox, oldest first, read while it may run.
pub fn outbox_events(data_dir: &Path) -> Result<Vec<outpost_protocols::Event>> {
    let id = outpost_protocols::AgentId::parse("test").map_err(anyhow::Error::msg)?;
    let r = outpost_agent::outbox::OutboxReader::open(&data_dir.join("outbox.db"), id)?;
    Ok(r.read_batch(outpost_protocols::Seq(0), usize::MAX)?)
}

/// A null-modem serial line: two linked pseudo-terminals made by
/// `socat pty,... pty,...`, so what is written to one end is read from the
/// other. socat is killed on drop; its links, left dangling, go with `dir`.
pub struct SerialLine {
    /// The socat process.
    pub proc: Proc,
    /// One end (a symlink to a `/dev/pts/N`).
    pub a: PathBuf,
    /// The other end.
    pub b: PathBuf,
}

impl SerialLine {
    /// Starts socat with the ends linked at `dir/tty-a` and `dir/tty-b` and
    /// waits until both links exist. socat's log goes to `dir/socat.log`.
    pub fn start(dir: &Path) -> Result<SerialLine> {
        if !have("socat") {
            bail!("socat not installed (tests/run installs it)");
        }
        let a = dir.join("tty-a");
        let b = dir.join("tty-b");
        for end in [&a, &b] {
            // socat's address syntax gives `,` `:` and `!` a meaning.
            if end.to_string_lossy().contains([',', ':', '!']) {
                bail!("{} cannot be written in a socat address", end.display());
            }
        }
        let log_path = dir.join("socat.log");
        let child = Command::new("socat")
            .args(["-d", "-d"])
            .arg(format!("pty,raw,echo=0,link={}", a.display()))
            .arg(format!("pty,raw,echo=0,link={}", b.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path)?)
            .spawn()
            .context("start socat")?;
        let mut line = SerialLine {
            proc: Proc {
                child,
                name: "socat".into(),
            },
            a,
            b,
        };
        let mut exited = false;
        wait_until(Duration::from_secs(20), "socat's pty links", || {
            exited = !line.proc.is_running();
            exited || (line.a.exists() && line.b.exists())
        })?;
        if exited {
            bail!(
                "socat exited before linking its ptys:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        Ok(line)
    }
}

impl Mosquitto {
    /// Starts Mosquitto on a free port with `listener_options` (TLS files,
    /// `require_certificate`, ...) right under its only `listener` line, so
    /// they apply to it, and the same limits and persistence as [`start`].
    /// Nothing else is set: `allow_anonymous` is Mosquitto 2's default, false,
    /// unless `listener_options` says otherwise.
    ///
    /// [`start`]: Mosquitto::start
    pub fn start_with(dir: &Path, listener_options: &str) -> Result<Mosquitto> {
        let port = free_port()?;
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n{listener_options}\nmax_inflight_messages 1000\nmax_queued_messages 0\npersistence true\npersistence_location {}/\nautosave_interval 1\n",
                dir.display()
            ),
        )?;
        let proc = start_server(
            "mosquitto",
            &["/usr/sbin/mosquitto", "mosquitto"],
            &conf,
            &dir.join(format!("mosquitto-{port}.log")),
            port,
        )?;
        Ok(Mosquitto { proc, port })
    }
}

/// Starts the first of `exes` that is installed as `exe -c conf`, its stderr
/// to `log`, and waits until it accepts TCP on 127.0.0.1:`port`. A config it
/// refuses (a bad certificate path) makes it exit: the error then says why,
/// from the log, rather than waiting for a port that never opens.
fn start_server(name: &str, exes: &[&str], conf: &Path, log: &Path, port: u16) -> Result<Proc> {
    let exe = exes
        .iter()
        .find(|p| Path::new(p).exists() || have(p))
        .with_context(|| format!("{name} not installed (tests/run installs it)"))?;
    let child = Command::new(exe)
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .with_context(|| format!("start {name}"))?;
    let mut proc = Proc {
        child,
        name: name.into(),
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut exited = false;
    wait_until(
        Duration::from_secs(20),
        &format!("{name} to listen"),
        || {
            exited = !proc.is_running();
            exited || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        },
    )?;
    if exited {
        bail!(
            "{name} exited on start:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    Ok(proc)
}

/// A nats-server with JetStream on 127.0.0.1, its store in `dir/nats-store`
/// (so a restart in the same `dir` finds the streams and messages again);
/// killed on drop. See shared/PEERS.md.
pub struct Nats {
    /// The process.
    pub proc: Proc,
    /// Its port.
    pub port: u16,
}

impl Nats {
    /// Starts nats-server on a free port.
    pub fn start(dir: &Path) -> Result<Nats> {
        Self::start_on(dir, free_port()?)
    }

    /// Starts nats-server on a given port (to restart it where clients
    /// expect it).
    pub fn start_on(dir: &Path, port: u16) -> Result<Nats> {
        Self::start_with(dir, port, "")
    }

    /// Starts nats-server on `port` with `extra` appended to its config
    /// file (a `tls { … }` block, say).
    pub fn start_with(dir: &Path, port: u16, extra: &str) -> Result<Nats> {
        let conf = dir.join(format!("nats-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "listen: \"127.0.0.1:{port}\"\njetstream {{\n  store_dir: \"{}\"\n}}\n{extra}\n",
                dir.join("nats-store").display()
            ),
        )?;
        let proc = start_server(
            "nats-server",
            &[
                "/usr/sbin/nats-server",
                "/usr/bin/nats-server",
                "nats-server",
            ],
            &conf,
            &dir.join(format!("nats-{port}.log")),
            port,
        )?;
        Ok(Nats { proc, port })
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// A UDP port that was free a moment ago on 127.0.0.1 (the hub's QUIC port).
pub fn free_udp_port() -> Result<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(s.local_addr()?.port())
}

/// A fleet PKI made by the real `outpost-hub ca` verbs: a CA in `dir/ca` and
/// the hub's certificate in `dir/hub`, valid for `127.0.0.1` and `localhost`.
pub struct Pki {
    /// The CA's folder (`ca.pem`, `ca.key`).
    pub ca_dir: PathBuf,
    /// The hub's folder (`ca.pem`, `hub.pem`, `hub.key`).
    pub hub_dir: PathBuf,
    root: PathBuf,
    /// The `outpost-hub` whose `ca` verbs make the certificates.
    hub: PathBuf,
}

impl Pki {
    /// Runs `ca init` and `ca issue --hub` under `dir`.
    pub fn new(dir: &Path) -> Result<Pki> {
        Pki::with_hub(dir, &bin("outpost-hub")?)
    }

    /// [`Pki::new`] with the `ca` verbs of the `outpost-hub` at `hub` (the
    /// benchmark's release build, say).
    pub fn with_hub(dir: &Path, hub: &Path) -> Result<Pki> {
        let pki = Pki {
            ca_dir: dir.join("ca"),
            hub_dir: dir.join("hub"),
            root: dir.to_owned(),
            hub: hub.to_owned(),
        };
        let ca = path_str(&pki.ca_dir)?;
        pki.ca_verb(&["ca", "init", "--dir", ca])?;
        pki.ca_verb(&[
            "ca",
            "issue",
            "--dir",
            ca,
            "--hub",
            "127.0.0.1",
            "--hub",
            "localhost",
            "--out",
            path_str(&pki.hub_dir)?,
        ])?;
        Ok(pki)
    }

    /// Issues an agent certificate with `ca issue --agent id` into
    /// `dir/agent-<id>` and returns that folder (`ca.pem`, `agent.pem`,
    /// `agent.key`).
    pub fn issue_agent(&self, id: &str) -> Result<PathBuf> {
        let out = self.root.join(format!("agent-{id}"));
        self.ca_verb(&[
            "ca",
            "issue",
            "--dir",
            path_str(&self.ca_dir)?,
            "--agent",
            id,
            "--out",
            path_str(&out)?,
        ])?;
        Ok(out)
    }

    fn ca_verb(&self, args: &[&str]) -> Result<String> {
        run_verb(&self.hub, args)
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("not UTF-8: {}", p.display()))
}

/// Runs an `outpost-hub` verb and fails unless it exits 0; its stdout.
fn hub_verb(args: &[&str]) -> Result<String> {
    run_verb(&bin("outpost-hub")?, args)
}

/// Runs `exe` with `args` and fails unless it exits 0; its stdout.
fn run_verb(exe: &Path, args: &[&str]) -> Result<String> {
    let (code, out, err) = run_cli(exe, args)?;
    if code != 0 {
        bail!("{} {args:?} exited {code}: {err}", exe.display());
    }
    Ok(out)
}

/// One agent's line of `outpost-hub events stats --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubEventStats {
    /// The agent.
    pub agent_id: String,
    /// Events stored.
    pub count: u64,
    /// Distinct seqs among them: equal to `count` when nothing is duplicated.
    pub distinct_seqs: u64,
    /// The lowest seq stored.
    pub min_seq: Option<u64>,
    /// The highest seq stored.
    pub max_seq: Option<u64>,
}

/// An `outpost-hub run` process listening on a UDP port of 127.0.0.1.
pub struct Hub {
    /// The process.
    pub proc: Proc,
    /// Its config file; its log is `hub.log` beside it.
    pub config: PathBuf,
    /// Where it listens (QUIC).
    pub addr: SocketAddr,
}

impl Hub {
    /// Writes `dir/hub.toml` (store in `dir/hub-data`, the certificates of
    /// `pki`, a free UDP port, `synchronous = "full"`) and starts the hub.
    pub fn start(dir: &Path, pki: &Pki) -> Result<Hub> {
        Hub::start_with(dir, pki, "")
    }

    /// [`Hub::start`] with more `[hub]` keys (`region = "eu-west"`).
    pub fn start_with(dir: &Path, pki: &Pki, hub_keys: &str) -> Result<Hub> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
        Self::start_listening(dir, pki, hub_keys, "", addr, None)
    }

    /// [`Hub::start_with`] and more tables at the end of the config
    /// (`[[sinks]]`).
    pub fn start_with_tables(dir: &Path, pki: &Pki, hub_keys: &str, tables: &str) -> Result<Hub> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
        Self::start_listening(dir, pki, hub_keys, tables, addr, None)
    }

    /// [`Hub::start`] inside `netns`, listening on its address.
    pub fn start_in(dir: &Path, pki: &Pki, netns: &netns::Netns) -> Result<Hub> {
        let addr = SocketAddr::from((netns.ns_addr, free_udp_port()?));
        Self::start_listening(dir, pki, "", "", addr, Some(netns))
    }

    fn start_listening(
        dir: &Path,
        pki: &Pki,
        hub_keys: &str,
        tables: &str,
        addr: SocketAddr,
        netns: Option<&netns::Netns>,
    ) -> Result<Hub> {
        let config = dir.join("hub.toml");
        // The API on a port of its own, unless the caller configures it.
        let api = if tables.contains("[api]") {
            ""
        } else {
            "[api]\nlisten = \"127.0.0.1:0\"\n\n"
        };
        std::fs::write(
            &config,
            format!(
                "[hub]\ndata_dir = \"hub-data\"\nlisten = \"{addr}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n{hub_keys}\n\n[store]\nsynchronous = \"full\"\n\n[observability]\nlog = \"info\"\nmetrics = \"127.0.0.1:0\"\n\n{api}{tables}\n",
                pki.hub_dir.join("ca.pem").display(),
                pki.hub_dir.join("hub.pem").display(),
                pki.hub_dir.join("hub.key").display(),
            ),
        )?;
        Self::start_file_in(&config, addr, netns)
    }

    /// Starts the hub on an existing config that listens on `addr`, and waits
    /// until it says it listens. Its log goes to `hub.log` beside the config
    /// (appended, so restarts keep history).
    pub fn start_file(config: &Path, addr: SocketAddr) -> Result<Hub> {
        Self::start_file_in(config, addr, None)
    }

    /// [`Hub::start_file`], inside `netns` if given (its config listens on
    /// the namespace's address).
    pub fn start_file_in(
        config: &Path,
        addr: SocketAddr,
        netns: Option<&netns::Netns>,
    ) -> Result<Hub> {
        let log_path = config.with_file_name("hub.log");
        let listening = |p: &Path| {
            std::fs::read_to_string(p)
                .map(|s| s.matches("Hub listening").count())
                .unwrap_or(0)
        };
        let before = listening(&log_path);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let exe = bin("outpost-hub")?;
        let child = match netns {
            Some(ns) => ns.command(&exe),
            None => Command::new(&exe),
        }
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("start outpost-hub")?;
        let mut hub = Hub {
            proc: Proc {
                child,
                name: "outpost-hub".into(),
            },
            config: config.to_owned(),
            addr,
        };
        let mut exited = false;
        wait_until(Duration::from_secs(30), "the hub to listen", || {
            exited = !hub.proc.is_running();
            exited || listening(&log_path) > before
        })?;
        if exited {
            bail!("outpost-hub exited on start:\n{}", hub.log());
        }
        Ok(hub)
    }

    /// One scrape of the hub's Prometheus endpoint (its address from the
    /// latest "Metrics listening" line of its log): the exposition text.
    pub fn metrics(&self) -> Result<String> {
        use std::io::{Read as _, Write as _};
        let log = self.log();
        let addr: SocketAddr = log
            .lines()
            .rfind(|l| l.contains("Metrics listening"))
            .and_then(|l| l.split("listen=").nth(1))
            .and_then(|a| a.split_whitespace().next())
            .context("no \"Metrics listening\" line in the hub's log")?
            .parse()?;
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let (head, body) = out.split_once("\r\n\r\n").context("no HTTP head")?;
        anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
        Ok(body.to_owned())
    }

    /// The address of the hub's HTTP API (from the latest "API listening"
    /// line of its log), as `http://ip:port`.
    pub fn api_url(&self) -> Result<String> {
        let log = self.log();
        let addr: SocketAddr = log
            .lines()
            .rfind(|l| l.contains("API listening"))
            .and_then(|l| l.split("listen=").nth(1))
            .and_then(|a| a.split_whitespace().next())
            .context("no \"API listening\" line in the hub's log")?
            .parse()?;
        Ok(format!("http://{addr}"))
    }

    /// Everything the hub (and its earlier runs on this config) logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.config.with_file_name("hub.log")).unwrap_or_default()
    }

    /// `outpost-hub events stats --json`, one entry per agent.
    pub fn events_stats(&self) -> Result<Vec<HubEventStats>> {
        let out = hub_verb(&[
            "events",
            "stats",
            "--config",
            path_str(&self.config)?,
            "--json",
        ])?;
        let json: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("events stats said {out:?}"))?;
        let rows = json
            .as_array()
            .context("events stats --json: not an array")?;
        rows.iter()
            .map(|r| {
                let n = |k: &str| {
                    r[k].as_u64()
                        .with_context(|| format!("events stats --json: no {k} in {r}"))
                };
                Ok(HubEventStats {
                    agent_id: r["agent_id"]
                        .as_str()
                        .context("events stats --json: no agent_id")?
                        .to_owned(),
                    count: n("count")?,
                    distinct_seqs: n("distinct_seqs")?,
                    min_seq: r["min_seq"].as_u64(),
                    max_seq: r["max_seq"].as_u64(),
                })
            })
            .collect()
    }

    /// The stats of one agent, if the hub stored anything from it.
    pub fn agent_stats(&self, agent_id: &str) -> Result<Option<HubEventStats>> {
        Ok(self
            .events_stats()?
            .into_iter()
            .find(|s| s.agent_id == agent_id))
    }

    /// `outpost-hub events tail --agent ID [--limit N] --json`: the agent's
    /// stored events (the last `limit`), in seq order, one JSON object each.
    pub fn events_tail(
        &self,
        agent_id: &str,
        limit: Option<usize>,
    ) -> Result<Vec<serde_json::Value>> {
        let limit = limit.map(|n| n.to_string());
        let mut args = vec![
            "events",
            "tail",
            "--config",
            path_str(&self.config)?,
            "--agent",
            agent_id,
            "--json",
        ];
        if let Some(n) = &limit {
            args.extend(["--limit", n.as_str()]);
        }
        hub_verb(&args)?
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("events tail line {l:?}")))
            .collect()
    }

    /// Runs `outpost-hub ARGS --config <this hub's config>`: (exit code,
    /// stdout, stderr), whatever the code.
    pub fn cli(&self, args: &[&str]) -> Result<(i32, String, String)> {
        let mut all = args.to_vec();
        all.extend(["--config", path_str(&self.config)?]);
        run_cli(&bin("outpost-hub")?, &all)
    }

    /// The stored events whose stream matches `pattern` (every agent), in
    /// store order, at most `limit`.
    pub fn events_of(&self, pattern: &str, limit: usize) -> Result<Vec<serde_json::Value>> {
        let limit = limit.to_string();
        hub_verb(&[
            "events",
            "tail",
            "--config",
            path_str(&self.config)?,
            "--stream",
            pattern,
            "--limit",
            &limit,
            "--json",
        ])?
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("events tail line {l:?}")))
        .collect()
    }

    /// `outpost-hub fleet list --json`: an array of agents.
    pub fn fleet(&self) -> Result<Vec<serde_json::Value>> {
        let out = hub_verb(&[
            "fleet",
            "list",
            "--config",
            path_str(&self.config)?,
            "--json",
        ])?;
        let json: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("fleet list said {out:?}"))?;
        json.as_array()
            .cloned()
            .context("fleet list --json: not an array")
    }
}

/// `outpost-agent outbox stats --config FILE --json` (works while the agent
/// runs).
pub fn agent_outbox_stats(config: &Path) -> Result<serde_json::Value> {
    let (code, out, err) = run_cli(
        &bin("outpost-agent")?,
        &["outbox", "stats", "--config", path_str(config)?, "--json"],
    )?;
    if code != 0 {
        bail!("outpost-agent outbox stats exited {code}: {err}");
    }
    serde_json::from_str(&out).with_context(|| format!("outbox stats said {out:?}"))
}

/// Runs the request `attempt` until it succeeds or `deadline` passes, 200 ms
/// apart, and returns the last error if it never does.
///
/// For a check that reads a result from a peer right after a fault: a
/// JetStream request may time out while the cluster elects leaders (or a
/// server that came back is still recovering its streams), most often under
/// the whole suite's load. Such a failure means "not yet", not "wrong"; what
/// the caller then checks on the result is unchanged.
pub async fn retry_until<T, F, Fut>(deadline: Duration, what: &str, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= until => {
                return Err(e.context(format!("{what}: still failing after {deadline:?}")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// How many messages the JetStream stream `name` holds, asking again until
/// `deadline` while the request fails (see [`retry_until`]).
pub async fn stream_len(
    js: &async_nats::jetstream::Context,
    name: &str,
    deadline: Duration,
) -> Result<u64> {
    retry_until(deadline, &format!("stream {name}'s info"), || async {
        Ok(js.get_stream(name).await?.get_info().await?.state.messages)
    })
    .await
}

/// Every message of the JetStream stream `name`, in order, read with a
/// fresh pull consumer that acknowledges nothing (so it changes nothing),
/// within `deadline`. A read that fails (a request timing out while the
/// cluster elects leaders) or stalls starts over with a new consumer until
/// the deadline (see [`retry_until`]).
pub async fn stream_messages(
    js: &async_nats::jetstream::Context,
    name: &str,
    deadline: Duration,
) -> Result<Vec<async_nats::jetstream::Message>> {
    let until = Instant::now() + deadline;
    retry_until(deadline, &format!("reading stream {name}"), || {
        read_stream(js, name, until)
    })
    .await
}

/// One attempt of [`stream_messages`]: gives up when `until` passes or the
/// consumer delivers nothing for [`STALLED`] (its leader may have moved).
async fn read_stream(
    js: &async_nats::jetstream::Context,
    name: &str,
    until: Instant,
) -> Result<Vec<async_nats::jetstream::Message>> {
    use async_nats::jetstream::consumer;
    use futures::StreamExt as _;
    let s = js.get_stream(name).await?;
    let expected = s.get_info().await?.state.messages as usize;
    let c = s
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let mut out = Vec::new();
    let mut progressed = Instant::now();
    while out.len() < expected {
        anyhow::ensure!(Instant::now() < until, "read {} of {expected}", out.len());
        anyhow::ensure!(
            progressed.elapsed() < STALLED,
            "read {} of {expected}, then nothing for {STALLED:?}",
            out.len()
        );
        let before = out.len();
        let mut batch = c
            .batch()
            .max_messages(expected - out.len())
            .expires(Duration::from_millis(500))
            .messages()
            .await?;
        while let Some(m) = batch.next().await {
            out.push(m.map_err(|e| anyhow::anyhow!("{e}"))?);
        }
        if out.len() > before {
            progressed = Instant::now();
        }
    }
    Ok(out)
}

/// How long [`stream_messages`] waits on a consumer that delivers nothing
/// before it starts over with a new one.
const STALLED: Duration = Duration::from_secs(15);

/// A JetStream message's `Nats-Msg-Id`.
pub fn msg_id(m: &async_nats::jetstream::Message) -> Option<String> {
    m.headers
        .as_ref()?
        .get(async_nats::header::NATS_MESSAGE_ID)
        .map(|v| v.as_str().to_owned())
}

/// `[[modbus.devices.tags]]` entries `r0`, `r1`, ... for holding registers
/// `0..tags` (u16), to follow a `[[modbus.devices]]` table.
pub fn holding_tags(tags: usize) -> String {
    (0..tags)
        .map(|t| {
            format!(
                "\n[[modbus.devices.tags]]\nname = \"r{t}\"\ntable = \"holding\"\naddress = {t}\ntype = \"u16\"\n"
            )
        })
        .collect()
}

/// A device simulator config whose holding registers `0..tags` all ramp
/// (register `t` over `3 + t` seconds, ticking every 10 ms), so that every
/// poll stores every tag.
pub fn ramping_device(tags: usize) -> String {
    let mut s = String::from("tick = \"10ms\"\n");
    for t in 0..tags {
        s.push_str(&format!(
            "\n[[points]]\ntable = \"holding\"\naddress = {t}\ntype = \"u16\"\nwave = \"ramp\"\nmin = 0\nmax = 60000\nperiod = \"{}s\"\n",
            3 + t
        ));
    }
    s
}

pub mod commands;
pub mod fleet_sim;
pub mod netns;
pub mod tcp_proxy;
pub mod test_ca;
pub mod udp_proxy;

/// What an MQTT watcher saw: (topic, the payload as JSON), in arrival order.
pub type MqttSeen = std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>;

/// Subscribes to `#` on the broker at `port` as client `id` and records
/// every message whose payload is JSON until the client is dropped (its
/// thread ends with the connection). The session is persistent: messages
/// published while it is away (or before its broker restarted) wait for it
/// at the broker. Returns once the subscription is acknowledged.
pub fn mqtt_watcher(
    port: u16,
    id: &str,
    deadline: Duration,
) -> Result<(MqttSeen, rumqttc::Client)> {
    use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_clean_session(false);
    let (client, mut conn) = Client::new(o, 100);
    client.subscribe("#", QoS::AtLeastOnce)?;
    let seen: MqttSeen = Default::default();
    let out = seen.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Ok(j) = serde_json::from_slice::<serde_json::Value>(&p.payload) else {
                        continue;
                    };
                    if let Ok(mut v) = out.lock() {
                        v.push((p.topic.clone(), j));
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    ready_rx
        .recv_timeout(deadline)
        .context("the subscriber was not subscribed")?;
    Ok((seen, client))
}

/// `sinks status --json` output, by sink id.
pub fn sinks_by_id(json: &str) -> Result<std::collections::BTreeMap<String, serde_json::Value>> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    Ok(v.as_array()
        .context("sinks status --json: an array")?
        .iter()
        .map(|s| (s["sink"].as_str().unwrap_or("").to_owned(), s.clone()))
        .collect())
}

/// One answer of [`http`].
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    /// The status code.
    pub status: u16,
    /// The headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl HttpAnswer {
    /// The first header called `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "{} answered {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// One HTTP/1.1 request on its own connection (`Connection: close`) to
/// `base` (`http://ip:port`), with a bearer `token` if given and a JSON
/// `body` if given: the test's client of the hub's API, written against
/// the socket so it shows exactly what the server sent.
pub fn http(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
) -> Result<HttpAnswer> {
    use std::io::{Read as _, Write as _};
    let addr: SocketAddr = base
        .strip_prefix("http://")
        .context("base must be http://ip:port")?
        .parse()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    if let Some(b) = body {
        // The server may answer (413) and close before it has read it all.
        let _ = s.write_all(b);
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP head")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no status line")?
        .parse()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_vec()
    };
    Ok(HttpAnswer {
        status,
        headers,
        body,
    })
}

fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size line")?;
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&raw[..eol])
                .split(';')
                .next()
                .unwrap_or("")
                .trim(),
            16,
        )?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        ensure!(raw.len() >= size + 2, "short chunk");
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}
