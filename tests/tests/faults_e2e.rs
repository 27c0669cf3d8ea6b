//! Faults done to the agent's storage, with the real binary: an outbox whose
//! file is damaged between two runs is detected at start, moved aside with
//! what is readable kept under its seqs, and the agent goes on (no crash
//! loop); with `on_corruption = "stop"` it refuses to start, naming the file.
//!
//! Every wait polls a condition until a deadline.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use outpost_tests::{agent_outbox_stats, outbox_events, wait_until, Agent, Devsim};

const DEADLINE: Duration = Duration::from_secs(60);

/// How many registers the device has and the agent reads each poll.
const TAGS: u16 = 25;

fn agent_config(device: std::net::SocketAddr, extra: &str) -> String {
    let mut c = format!(
        r#"
[agent]
data_dir = "data"

[outbox]
synchronous = "normal"
{extra}

[observability]
metrics = ""
log = "info"

[[modbus.devices]]
name = "plc"
address = "{device}"
unit = 1
poll = "20ms"
timeout = "300ms"
"#
    );
    c.push_str(&outpost_tests::holding_tags(usize::from(TAGS)));
    c
}

/// A device whose registers all ramp, so every poll stores every tag.
fn sim() -> String {
    outpost_tests::ramping_device(usize::from(TAGS))
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
}

/// Runs the agent on `config` until its outbox holds 10,000 events (enough
/// that the file is a B-tree of many pages), then stops it cleanly.
fn filled_and_stopped(dir: &Path, config: &str) -> Result<Agent> {
    let mut agent = Agent::start(dir, config)?;
    wait_until(DEADLINE, "10,000 events in the outbox", || {
        agent_outbox_stats(&agent.config)
            .map(|s| s["events"].as_u64().unwrap_or(0) >= 10_000)
            .unwrap_or(false)
    })?;
    agent.proc.term(Duration::from_secs(30))?;
    Ok(agent)
}

/// Writes garbage over three pages in the middle of the file.
fn damage(path: &Path) -> Result<()> {
    let len = std::fs::metadata(path)?.len();
    ensure!(
        len > 32 * 4096,
        "the outbox is too small to damage in the middle: {len}"
    );
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.seek(SeekFrom::Start(len / 2 / 4096 * 4096))?;
    f.write_all(&[0x5a; 3 * 4096])?;
    f.sync_all()?;
    Ok(())
}

#[test]
fn a_damaged_outbox_is_moved_aside_at_start_and_the_agent_goes_on() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sim = Devsim::start(dir.path(), &sim(), None)?;
    let config = agent_config(sim.addr, "");
    let agent = filled_and_stopped(dir.path(), &config)?;
    let data = dir.path().join("data");
    let before = outbox_events(&data)?;
    let last_before = before.last().map(|e| e.seq.0).context("events")?;
    damage(&data.join("outbox.db"))?;

    let mut agent = Agent::start_file(&agent.config)?;
    wait_until(DEADLINE, "the agent to say what it did", || {
        log(dir.path()).contains("The outbox was damaged")
    })?;
    // It keeps running and storing, after every seq the damaged file had.
    wait_until(DEADLINE, "new events after the recovery", || {
        outbox_events(&data)
            .map(|ev| ev.iter().filter(|e| e.seq.0 > last_before).count() >= 50)
            .unwrap_or(false)
    })?;
    ensure!(
        agent.proc.is_running(),
        "the agent exited:\n{}",
        log(dir.path())
    );
    let after = outbox_events(&data)?;
    let kept: Vec<_> = after.iter().filter(|e| e.seq.0 <= last_before).collect();
    ensure!(
        !kept.is_empty() && kept.len() < before.len(),
        "kept {} of {}",
        kept.len(),
        before.len()
    );
    for e in &kept {
        let original = before
            .iter()
            .find(|b| b.seq == e.seq)
            .context("a seq that was never written")?;
        ensure!(
            original.body == e.body,
            "seq {} changed in the salvage",
            e.seq
        );
    }
    let moved: Vec<_> = std::fs::read_dir(&data)?
        .flatten()
        .filter(|f| {
            f.file_name()
                .to_string_lossy()
                .starts_with("outbox.db.corrupt-")
        })
        .collect();
    ensure!(!moved.is_empty(), "the damaged file was not kept");
    agent.proc.term(Duration::from_secs(30))?;
    // A clean start after that finds nothing wrong.
    let mut agent = Agent::start_file(&agent.config)?;
    wait_until(DEADLINE, "the agent to run again", || {
        log(dir.path()).matches("Agent running.").count() >= 3
    })?;
    ensure!(log(dir.path()).matches("The outbox was damaged").count() == 1);
    agent.proc.term(Duration::from_secs(30))?;
    Ok(())
}

#[test]
fn with_on_corruption_stop_a_damaged_outbox_stops_the_agent_naming_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sim = Devsim::start(dir.path(), &sim(), None)?;
    let config = agent_config(sim.addr, "on_corruption = \"stop\"");
    let agent = filled_and_stopped(dir.path(), &config)?;
    let db = dir.path().join("data/outbox.db");
    damage(&db)?;
    let mut agent = Agent::start_file(&agent.config)?;
    let mut status = None;
    wait_until(DEADLINE, "the agent to refuse", || {
        status = agent.proc.child.try_wait().ok().flatten();
        status.is_some()
    })?;
    ensure!(status.and_then(|s| s.code()) == Some(1), "{status:?}");
    let l = log(dir.path());
    ensure!(
        l.contains("is damaged") && l.contains(&db.display().to_string()),
        "{l}"
    );
    ensure!(db.exists(), "the file was left where it is");
    Ok(())
}

/// An agent that stores the QoS 1 messages of `q1/#` from the broker on
/// `port`.
fn mqtt_agent(port: u16, client_id: &str) -> String {
    format!(
        r#"
[agent]
data_dir = "data"

[outbox]
commit_window = "1ms"

[mqtt]
broker = "127.0.0.1:{port}"
client_id = "{client_id}"
reconnect_min = "50ms"
reconnect_max = "500ms"

[[mqtt.subscribe]]
filter = "q1/#"
qos = 1

[observability]
metrics = ""
log = "info"
"#
    )
}

/// Publishes `n` QoS 1 messages `"<i>"` to `topic` and returns once the broker
/// has acknowledged each.
fn publish(port: u16, topic: &str, n: usize) -> Result<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut o = MqttOptions::new("faults-pub", "127.0.0.1", port);
        o.set_inflight(20);
        let (client, mut el) = AsyncClient::new(o, 100);
        let topic = topic.to_owned();
        let sender = tokio::spawn(async move {
            for i in 0..n {
                client
                    .publish(&topic, QoS::AtLeastOnce, false, i.to_string())
                    .await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(client)
        });
        let mut acked = 0;
        while acked < n {
            let ev = tokio::time::timeout(DEADLINE, el.poll())
                .await
                .context("publisher timed out")??;
            if let Event::Incoming(Packet::PubAck(_)) = ev {
                acked += 1;
            }
        }
        let _client = sender.await??;
        Ok(())
    })
}

#[test]
fn failing_fsyncs_acknowledge_nothing_that_is_not_durable_and_corrupt_nothing() -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    ensure!(
        outpost_tests::have("strace"),
        "strace is not installed (tests/run installs it)"
    );
    let dir = tempfile::tempdir()?;
    let broker = outpost_tests::Mosquitto::start(dir.path())?;
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, mqtt_agent(broker.port, "faults-agent"))?;
    // The agent under strace: from the 40th fsync or fdatasync on (past the
    // outbox's creation and the first commits), every one fails with EIO,
    // as a dying SD card does.
    let agent_log = std::fs::File::create(dir.path().join("agent.log"))?;
    let mut faulty = std::process::Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            "trace=fsync,fdatasync",
        ])
        .args(["-e", "inject=fsync,fdatasync:error=EIO:when=40+"])
        .arg(outpost_tests::bin("outpost-agent")?)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(agent_log)
        .process_group(0)
        .spawn()
        .context("start the agent under strace")?;
    wait_until(DEADLINE, "the agent to reach the broker", || {
        log(dir.path()).contains("Connected to the site broker")
    })?;
    const N: usize = 600;
    publish(broker.port, "q1/x", N)?;
    wait_until(DEADLINE, "failed commits", || {
        log(dir.path()).contains("Outbox group commit failed")
    })?;
    ensure!(
        faulty.try_wait()?.is_none(),
        "the agent died of failing fsyncs:\n{}",
        log(dir.path())
    );
    let stored_while_failing = outbox_events(&dir.path().join("data"))?.len();
    ensure!(
        stored_while_failing < N,
        "every commit succeeded: the fault was not injected"
    );
    // Power cut: the agent and strace go at once.
    let pgid = faulty.id().to_string();
    std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .status()?;
    let _ = faulty.wait();

    // On a sound disk again, the broker redelivers everything the agent never
    // acknowledged; if it had acknowledged a failed commit, that message
    // would be gone.
    let mut agent = Agent::start_file(&config)?;
    wait_until(DEADLINE, "every message in the outbox", || {
        outbox_events(&dir.path().join("data"))
            .map(|ev| {
                let seen: std::collections::BTreeSet<String> = ev
                    .iter()
                    .filter_map(|e| match &e.body.value {
                        outpost_protocols::Value::Json(j) => Some(j.as_str().to_owned()),
                        outpost_protocols::Value::String(s) => Some(s.clone()),
                        _ => None,
                    })
                    .collect();
                (0..N).all(|i| seen.contains(&i.to_string()))
            })
            .unwrap_or(false)
    })?;
    ensure!(
        !log(dir.path()).contains("The outbox was damaged"),
        "failed fsyncs left a damaged outbox"
    );
    println!(
        "{} of {N} messages were stored while fsync failed; all {N} after the restart",
        stored_while_failing
    );
    agent.proc.term(Duration::from_secs(30))?;
    Ok(())
}

/// A tmpfs of `size` mounted on `dir` for the life of the value.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(dir)?;
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()?;
        ensure!(
            st.success(),
            "mount tmpfs on {} (needs root)",
            dir.display()
        );
        Ok(Tmpfs(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_disk_stops_acknowledging_and_everything_lands_when_space_returns() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = outpost_tests::Mosquitto::start(dir.path())?;
    let data = dir.path().join("data");
    let _fs = Tmpfs::mount(&data, "16m")?;
    let config = mqtt_agent(broker.port, "disk-agent");
    let mut agent = Agent::start(dir.path(), &config)?;
    wait_until(DEADLINE, "the agent to reach the broker", || {
        log(dir.path()).contains("Connected to the site broker")
    })?;
    // Leave about 400 KiB free, then send 1,000 messages of 2 KiB.
    let free = {
        let out = std::process::Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&data)
            .output()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse::<u64>().ok())
            .context("df")?
    };
    let filler = data.join("filler");
    std::fs::write(
        &filler,
        vec![0u8; usize::try_from(free.saturating_sub(400 * 1024))?],
    )?;
    const N: usize = 1000;
    let port = broker.port;
    let publisher = std::thread::spawn(move || -> Result<()> {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut o = MqttOptions::new("disk-pub", "127.0.0.1", port);
            o.set_inflight(20);
            let (client, mut el) = AsyncClient::new(o, 100);
            let sender = tokio::spawn(async move {
                for i in 0..N {
                    let payload = format!("{i:06}{}", "x".repeat(2048));
                    client
                        .publish("q1/big", QoS::AtLeastOnce, false, payload)
                        .await?;
                }
                anyhow::Ok(client)
            });
            let mut acked = 0;
            while acked < N {
                if let Event::Incoming(Packet::PubAck(_)) =
                    tokio::time::timeout(DEADLINE, el.poll())
                        .await
                        .context("publisher")??
                {
                    acked += 1;
                }
            }
            let _c = sender.await??;
            Ok(())
        })
    });
    wait_until(DEADLINE, "commits to fail on the full disk", || {
        log(dir.path()).contains("Outbox group commit failed")
    })?;
    ensure!(
        agent.proc.is_running(),
        "the agent died of a full disk:\n{}",
        log(dir.path())
    );
    publisher
        .join()
        .map_err(|_| anyhow::anyhow!("publisher panicked"))??;
    let while_full = outbox_events(&data).map(|e| e.len()).unwrap_or(0);
    ensure!(while_full < N, "the disk never filled");
    // Space returns; the broker still holds what the agent did not acknowledge.
    std::fs::remove_file(&filler)?;
    let payload_no = |e: &outpost_protocols::Event| match &e.body.value {
        outpost_protocols::Value::String(s) => s.get(..6).and_then(|n| n.parse::<usize>().ok()),
        _ => None,
    };
    wait_until(DEADLINE, "every message in the outbox", || {
        outbox_events(&data)
            .map(|ev| {
                let seen: std::collections::BTreeSet<usize> =
                    ev.iter().filter_map(payload_no).collect();
                seen.len() == N
            })
            .unwrap_or(false)
    })
    .with_context(|| {
        let l = log(dir.path());
        let tail: Vec<&str> = l.lines().rev().take(15).collect();
        let df = std::process::Command::new("ls")
            .args(["-la"])
            .arg(&data)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        format!("{df}\nagent log, newest first:\n{}", tail.join("\n"))
    })?;
    println!(
        "{while_full} of {N} messages stored while the disk was full; all {N} once it had room"
    );
    ensure!(agent.proc.is_running());
    agent.proc.term(Duration::from_secs(30))?;
    Ok(())
}

/// A deterministic stream of pseudo-random numbers (xorshift), so a failing
/// run can be repeated with the seed it prints.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The site of the kill -9 loop: Modbus polls, MQTT QoS 1 and QoS 2 traffic,
/// the uplink to the hub.
fn site_config(
    hub: &outpost_tests::Hub,
    creds: &Path,
    broker: u16,
    device: Option<std::net::SocketAddr>,
) -> String {
    let mut c = format!(
        r#"
[agent]
data_dir = "data"
id = "gw-1"

[uplink]
hub = "{}"
ca = "{}"
cert = "{}"
key = "{}"
reconnect_min = "100ms"
reconnect_max = "1s"

[observability]
metrics = ""
log = "info"
"#,
        hub.addr,
        creds.join("ca.pem").display(),
        creds.join("agent.pem").display(),
        creds.join("agent.key").display(),
    );
    if let Some(device) = device {
        c.push_str(&format!(
            r#"
[mqtt]
broker = "127.0.0.1:{broker}"
client_id = "loop-agent"
reconnect_min = "50ms"
reconnect_max = "500ms"

[[mqtt.subscribe]]
filter = "q1/#"
qos = 1

[[mqtt.subscribe]]
filter = "q2/#"
qos = 2

[[modbus.devices]]
name = "plc"
address = "{device}"
unit = 1
poll = "100ms"
timeout = "300ms"

[[modbus.devices.tags]]
name = "r0"
table = "holding"
address = 0
type = "u16"
"#
        ));
    }
    c
}

/// The numbers in the payloads of the hub's events of `pattern`, with how
/// often each was stored.
fn hub_numbers(
    hub: &outpost_tests::Hub,
    pattern: &str,
) -> Result<std::collections::BTreeMap<u64, usize>> {
    let mut m = std::collections::BTreeMap::new();
    for e in hub.events_of(pattern, 10_000_000)? {
        let n = e["value"]
            .as_u64()
            .or_else(|| e["value"].as_str().and_then(|s| s.parse().ok()))
            .with_context(|| format!("no number in {e}"))?;
        *m.entry(n).or_insert(0) += 1;
    }
    Ok(m)
}

/// Numbered QoS 1 and QoS 2 messages (`q1/a`, `q2/a`), 50 a second each,
/// straight to the broker, until stopped.
struct Publisher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Result<u64>>,
}

impl Publisher {
    fn start(port: u16) -> Publisher {
        use rumqttc::{Client, MqttOptions, QoS};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || -> Result<u64> {
            let mut o = MqttOptions::new("loop-pub", "127.0.0.1", port);
            o.set_inflight(50);
            let (client, mut conn) = Client::new(o, 100);
            // The connection ends with an error once the client disconnects.
            let driver = std::thread::spawn(move || {
                for n in conn.iter() {
                    if n.is_err() {
                        break;
                    }
                }
            });
            let mut n = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                client.publish("q1/a", QoS::AtLeastOnce, false, n.to_string())?;
                client.publish("q2/a", QoS::ExactlyOnce, false, n.to_string())?;
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            // Let the last ones reach the broker before disconnecting.
            std::thread::sleep(Duration::from_secs(1));
            client.disconnect()?;
            let _ = driver.join();
            Ok(n)
        });
        Publisher { stop, thread }
    }

    /// Stops publishing; how many of each were published.
    fn stop(self) -> Result<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("publisher panicked"))?
    }
}

/// The end of a fault run at the site of `agent`: waits until the broker has
/// handed the agent the last of `published` messages, drains the outbox to
/// the hub with an agent that only has the uplink, and checks what the hub
/// stored: every seq the agent assigned exactly once, every QoS 2 message
/// exactly once, every QoS 1 message at least once, Modbus samples. Returns
/// a line saying what was stored.
fn drain_and_check(
    mut agent: Agent,
    hub: &outpost_tests::Hub,
    creds: &Path,
    broker: u16,
    published: u64,
) -> Result<String> {
    let site = agent.config.parent().context("site")?.to_owned();
    wait_until(
        DEADLINE,
        "the last QoS 2 message in the outbox or at the hub",
        || {
            let last = (published - 1).to_string();
            let in_outbox = outbox_events(&site.join("data"))
            .map(|ev| ev.iter().any(|e| e.body.stream.as_str() == "q2/a" && matches!(&e.body.value, outpost_protocols::Value::Json(j) if j.as_str() == last)))
            .unwrap_or(false);
            in_outbox
                || hub_numbers(hub, "q2/a")
                    .map(|m| m.contains_key(&(published - 1)))
                    .unwrap_or(false)
        },
    )?;
    agent.proc.term(Duration::from_secs(30))?;
    std::fs::write(&agent.config, site_config(hub, creds, broker, None))?;
    let agent = Agent::start_file(&agent.config)?;
    let mut next_seq = 0;
    wait_until(
        Duration::from_secs(180),
        "the outbox to drain to the hub",
        || {
            let Ok(s) = agent_outbox_stats(&agent.config) else {
                return false;
            };
            next_seq = s["next_seq"].as_u64().unwrap_or(0);
            s["events"] == 0
                && hub
                    .agent_stats("gw-1")
                    .ok()
                    .flatten()
                    .is_some_and(|h| h.max_seq == Some(next_seq - 1))
        },
    )?;
    let stats = hub.agent_stats("gw-1")?.context("stored")?;
    ensure!(
        stats.count == next_seq - 1
            && stats.distinct_seqs == stats.count
            && stats.min_seq == Some(1),
        "every accepted seq exactly once at the hub: {stats:?}, the agent assigned 1..{}",
        next_seq - 1
    );
    let q2 = hub_numbers(hub, "q2/a")?;
    let q1 = hub_numbers(hub, "q1/a")?;
    let missing2: Vec<u64> = (0..published).filter(|n| !q2.contains_key(n)).collect();
    let missing1: Vec<u64> = (0..published).filter(|n| !q1.contains_key(n)).collect();
    let twice2: Vec<_> = q2.iter().filter(|(_, c)| **c > 1).collect();
    ensure!(missing2.is_empty(), "QoS 2 lost {missing2:?}");
    ensure!(missing1.is_empty(), "QoS 1 lost {missing1:?}");
    ensure!(twice2.is_empty(), "QoS 2 stored twice: {twice2:?}");
    let dup1: usize = q1.values().map(|c| c - 1).sum();
    let modbus = hub.events_of("plc/#", 10_000_000)?.len();
    ensure!(modbus > 0, "no Modbus samples reached the hub");
    Ok(format!(
        "{} events exactly once at the hub ({published} QoS 2 once each, {published} QoS 1 with {dup1} redelivered, {modbus} Modbus samples)",
        stats.count
    ))
}

/// The site of the fault runs: a hub, a broker, a ramping device, and the
/// agent between them, connected to the broker.
struct Site {
    // Fields drop in order: the processes before their directory.
    agent: Agent,
    device: Devsim,
    broker: outpost_tests::Mosquitto,
    hub: outpost_tests::Hub,
    creds: std::path::PathBuf,
    dir: tempfile::TempDir,
}

impl Site {
    fn start() -> Result<Site> {
        let dir = tempfile::tempdir()?;
        let pki = outpost_tests::Pki::new(dir.path())?;
        let creds = pki.issue_agent("gw-1")?;
        let hub = outpost_tests::Hub::start(dir.path(), &pki)?;
        let broker = outpost_tests::Mosquitto::start(dir.path())?;
        let device = Devsim::start(dir.path(), &sim(), None)?;
        let site = dir.path().join("site");
        std::fs::create_dir_all(&site)?;
        let config = site_config(&hub, &creds, broker.port, Some(device.addr));
        let agent = Agent::start(&site, &config)?;
        wait_until(DEADLINE, "the agent to reach the broker", || {
            log(&site).contains("Connected to the site broker")
        })?;
        Ok(Site {
            agent,
            device,
            broker,
            hub,
            creds,
            dir,
        })
    }

    fn kill9_hub(&mut self) -> Result<()> {
        self.hub.proc.kill9();
        self.hub = outpost_tests::Hub::start_file(&self.hub.config, self.hub.addr)?;
        Ok(())
    }

    /// The device goes away (kill -9) and comes back on the same address.
    fn restart_device(&mut self) -> Result<()> {
        self.device.proc.kill9();
        self.device = Devsim::start(self.dir.path(), &sim(), Some(self.device.addr))?;
        Ok(())
    }

    fn finish(self, published: u64) -> Result<String> {
        drain_and_check(
            self.agent,
            &self.hub,
            &self.creds,
            self.broker.port,
            published,
        )
    }
}

#[test]
fn kill9_of_agent_and_hub_at_random_moments_loses_and_duplicates_nothing() -> Result<()> {
    // The long form: OUTPOST_FAULT_CYCLES=200 (docs/reliability.md).
    let cycles: u32 = std::env::var("OUTPOST_FAULT_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        | 1;
    println!("kill -9 loop: {cycles} cycles, seed {seed}");
    let mut rng = Rng(seed);
    let mut site = Site::start()?;
    let publisher = Publisher::start(site.broker.port);
    for cycle in 0..cycles {
        std::thread::sleep(Duration::from_millis(300 + rng.next() % 1200));
        if rng.next().is_multiple_of(3) {
            site.kill9_hub()?;
            println!("cycle {cycle}: kill -9 of the hub");
        } else {
            site.agent.proc.kill9();
            println!("cycle {cycle}: kill -9 of the agent");
            site.agent = Agent::start_file(&site.agent.config)?;
        }
    }
    let published = publisher.stop()?;
    println!("{cycles} kills: {}", site.finish(published)?);
    Ok(())
}

/// The agent process's resident memory (KiB) and open file descriptors.
fn rss_and_fds(pid: u32) -> Result<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((rss, fds))
}

#[test]
fn a_soak_with_steady_traffic_and_periodic_faults_keeps_memory_and_descriptors_flat() -> Result<()>
{
    // The long form: OUTPOST_SOAK_SECS=3600 (docs/reliability.md).
    let secs: u64 = std::env::var("OUTPOST_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60)
        .max(20);
    let run = Duration::from_secs(secs);
    let fault_every = Duration::from_secs((secs / 5).clamp(10, 60));
    let mut site = Site::start()?;
    let pid = site.agent.proc.child.id();
    let publisher = Publisher::start(site.broker.port);
    let started = std::time::Instant::now();
    let mut samples: Vec<(Duration, u64, usize)> = Vec::new();
    let (mut next_fault, mut faults) = (fault_every, 0u32);
    while started.elapsed() < run {
        std::thread::sleep(Duration::from_secs(1));
        ensure!(
            site.agent.proc.is_running(),
            "the agent exited during the soak:\n{}",
            log(&site.dir.path().join("site"))
        );
        let (rss, fds) = rss_and_fds(pid)?;
        samples.push((started.elapsed(), rss, fds));
        if started.elapsed() >= next_fault {
            // The agent itself is never restarted: its memory is the point.
            if faults % 2 == 0 {
                site.restart_device()?;
                println!("{:?}: the device restarted", started.elapsed());
            } else {
                site.kill9_hub()?;
                println!("{:?}: kill -9 of the hub", started.elapsed());
            }
            faults += 1;
            next_fault += fault_every;
        }
    }
    let published = publisher.stop()?;
    // Flat: past the warm-up (the first quarter), the last quarter's peak is
    // within max(4 MiB, 20%) of the second quarter's, and it holds at most 4
    // more descriptors (sockets come and go with the faults). A leak of a
    // few hundred bytes per event fails the short form; of a few bytes, the
    // hour-long one.
    let quarter = |q: u32| {
        let (from, to) = (run * q / 4, run * (q + 1) / 4);
        samples
            .iter()
            .filter(move |(at, _, _)| *at >= from && *at < to)
    };
    let warm_rss = quarter(1).map(|s| s.1).max().context("samples")?;
    let late_rss = quarter(3).map(|s| s.1).max().context("samples")?;
    let warm_fds = quarter(1).map(|s| s.2).max().context("samples")?;
    let late_fds = quarter(3).map(|s| s.2).max().context("samples")?;
    let first = samples.first().context("samples")?;
    println!(
        "soak {secs} s, {faults} faults: agent VmRSS {} KiB at start, peak {warm_rss} KiB in the second quarter, {late_rss} KiB in the last; descriptors {} → {warm_fds} → {late_fds}",
        first.1, first.2
    );
    ensure!(
        late_rss <= warm_rss + (warm_rss / 5).max(4096),
        "the agent's memory grew: {warm_rss} KiB → {late_rss} KiB"
    );
    ensure!(
        late_fds <= warm_fds + 4,
        "the agent's descriptors grew: {warm_fds} → {late_fds}"
    );
    println!("soak: {}", site.finish(published)?);
    Ok(())
}

/// A Modbus TCP device that misbehaves on purpose, by request count: wrong
/// transaction ids, then replies with fewer registers than asked for, then
/// replies slower than the agent's timeout, then correct replies of
/// 100, 101, 102, 103 (Modbus Application Protocol v1.1b3 section 6.3, MBAP
/// of Modbus Messaging on TCP/IP v1.0b section 3.1.3).
fn hostile_device() -> Result<std::net::SocketAddr> {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        let mut served = 0u32;
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            loop {
                let mut req = [0u8; 12];
                if s.read_exact(&mut req).is_err() {
                    break;
                }
                served += 1;
                let (txn, unit, count) = (
                    [req[0], req[1]],
                    req[6],
                    u16::from_be_bytes([req[10], req[11]]),
                );
                let (txn, regs, delay) = match served {
                    0..=15 => ([txn[0], txn[1].wrapping_add(7)], count, 0),
                    16..=30 => (txn, count / 2, 0),
                    31..=40 => (txn, count, 1000),
                    _ => (txn, count, 0),
                };
                let mut pdu = vec![0x03, (regs * 2) as u8];
                for r in 0..regs {
                    pdu.extend_from_slice(&(100 + r).to_be_bytes());
                }
                let mut frame = txn.to_vec();
                frame.extend_from_slice(&[0, 0]);
                frame.extend_from_slice(&((pdu.len() + 1) as u16).to_be_bytes());
                frame.push(unit);
                frame.extend_from_slice(&pdu);
                std::thread::sleep(Duration::from_millis(delay));
                if s.write_all(&frame).is_err() {
                    break;
                }
            }
        }
    });
    Ok(addr)
}

#[test]
fn a_device_with_wrong_ids_short_and_slow_replies_gives_bad_samples_and_polling_goes_on(
) -> Result<()> {
    use outpost_protocols::{Quality, Reason, Value};
    let dir = tempfile::tempdir()?;
    let device = hostile_device()?;
    let mut config = format!(
        "[agent]\ndata_dir = \"data\"\n\n[observability]\nmetrics = \"\"\nlog = \"debug\"\n\n[[modbus.devices]]\nname = \"plc\"\naddress = \"{device}\"\nunit = 1\npoll = \"100ms\"\ntimeout = \"300ms\"\nbackoff = \"100ms\"\nbackoff_max = \"200ms\"\n"
    );
    config.push_str(&outpost_tests::holding_tags(4));
    let mut agent = Agent::start(dir.path(), &config)?;
    let data = dir.path().join("data");
    let good_of = |ev: &[outpost_protocols::Event]| {
        ev.iter()
            .filter(|e| e.body.quality == Quality::Good && e.body.stream.as_str() == "plc/r3")
            .count()
    };
    wait_until(DEADLINE, "good samples once the device behaves", || {
        outbox_events(&data)
            .map(|ev| good_of(&ev) >= 3)
            .unwrap_or(false)
    })
    .with_context(|| log(dir.path()))?;
    ensure!(
        agent.proc.is_running(),
        "the agent exited:\n{}",
        log(dir.path())
    );
    let ev = outbox_events(&data)?;
    let reasons: Vec<&Reason> = ev
        .iter()
        .filter_map(|e| match &e.body.quality {
            Quality::Bad(r) | Quality::Uncertain(r) => Some(r),
            Quality::Good => None,
            _ => None,
        })
        .collect();
    let distinct: std::collections::BTreeSet<String> =
        reasons.iter().map(|r| r.to_string()).collect();
    println!("bad samples recorded: {distinct:?}");
    ensure!(
        reasons.iter().any(|r| matches!(
            r,
            Reason::ShortReply {
                expected: 4,
                got: 2
            }
        )),
        "no short reply recorded: {reasons:?}"
    );
    ensure!(
        reasons.iter().any(|r| matches!(r, Reason::Timeout)),
        "no timeout recorded: {reasons:?}"
    );
    // The first samples of all came from replies with wrong transaction ids:
    // none of them may be taken as a good value.
    let first_good = ev
        .iter()
        .position(|e| e.body.quality == Quality::Good)
        .context("no good sample")?;
    ensure!(
        first_good > 0,
        "a reply with a wrong transaction id was taken as good: {:?}",
        ev[0]
    );
    let last = ev
        .iter()
        .rev()
        .find(|e| e.body.stream.as_str() == "plc/r3")
        .context("r3")?;
    ensure!(last.body.value == Value::U64(103), "{last:?}");
    agent.proc.term(Duration::from_secs(30))?;
    Ok(())
}
