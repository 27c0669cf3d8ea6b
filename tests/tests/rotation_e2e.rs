//! Certificate rotation and binding with the real binaries: an agent with a
//! short-lived certificate renews it over its session while Modbus and MQTT
//! traffic flows, losing and duplicating nothing; after the grace period its
//! old certificate is refused (`certificate_not_current`); a second
//! certificate the CA issued for the same id cannot displace the live
//! session; and an agent whose clock is ten minutes off the hub's (faketime)
//! renews and delivers.
//!
//! Every wait polls a condition until a deadline; nothing sleeps for a fixed
//! time except the publisher's pacing.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use outpost_protocols::wire::{ErrorCode, ALPN};
use outpost_tests::fleet_sim::client_config;
use outpost_tests::{
    agent_outbox_stats, bin, run_cli, wait_until, Agent, Devsim, Hub, Mosquitto, Pki, Proc,
};

const AGENT: &str = "gw-1";

/// How long any one condition may take on a loaded 2-core machine running
/// debug builds.
const DEADLINE: Duration = Duration::from_secs(120);

/// A validity, in seconds, whose two thirds (counted from `not_before`, an
/// hour before the issue) pass about 20 s after the issue:
/// -3600 + 2/3 (3600 + v) = 20.
const RENEWS_IN_20S: u32 = 1830;

/// The hub's `[hub]` keys: it can sign renewals, and a replaced certificate
/// is accepted 3 s more.
fn hub_keys(pki: &Pki) -> String {
    format!(
        "ca_dir = \"{}\"\nrenew_grace = \"{}s\"\n",
        pki.ca_dir.display(),
        GRACE.as_secs()
    )
}

/// `[hub] renew_grace` in these tests.
const GRACE: Duration = Duration::from_secs(3);

/// `ca issue --agent gw-1` into `dir/<name>`, valid `validity_secs` (or the
/// default), recorded in the hub's registry if `config` is given.
fn issue(
    pki: &Pki,
    dir: &Path,
    name: &str,
    validity_secs: Option<u32>,
    config: Option<&Path>,
) -> Result<PathBuf> {
    let out = dir.join(name);
    let ca = pki.ca_dir.display().to_string();
    let out_s = out.display().to_string();
    let mut args = vec![
        "ca", "issue", "--dir", &ca, "--agent", AGENT, "--out", &out_s,
    ];
    let secs = validity_secs.map(|s| s.to_string());
    if let Some(s) = &secs {
        args.extend(["--validity-secs", s.as_str()]);
    }
    let cfg = config.map(|c| c.display().to_string());
    if let Some(c) = &cfg {
        args.extend(["--config", c.as_str()]);
    }
    let (code, _, err) = run_cli(&bin("outpost-hub")?, &args)?;
    ensure!(code == 0, "ca issue exited {code}: {err}");
    Ok(out)
}

/// The agent's config: the uplink with the credentials in `creds`, metrics on
/// a free port, and, with a device and a broker, a Modbus tag polled every
/// 50 ms and the MQTT topics `q1/#`.
fn agent_config(hub: &Hub, creds: &Path, metrics: u16, site: Option<(SocketAddr, u16)>) -> String {
    let mut c = format!(
        r#"
[agent]
data_dir = "data"
id = "{AGENT}"

[uplink]
hub = "{}"
ca = "{}"
cert = "{}"
key = "{}"
reconnect_min = "100ms"
reconnect_max = "1s"

[observability]
metrics = "127.0.0.1:{metrics}"
log = "info"
"#,
        hub.addr,
        creds.join("ca.pem").display(),
        creds.join("agent.pem").display(),
        creds.join("agent.key").display(),
    );
    if let Some((device, broker)) = site {
        c.push_str(&format!(
            r#"
[mqtt]
broker = "127.0.0.1:{broker}"
client_id = "rotation-agent"
reconnect_min = "50ms"
reconnect_max = "500ms"

[[mqtt.subscribe]]
filter = "q1/#"
qos = 1

[[modbus.devices]]
name = "plc"
address = "{device}"
unit = 1
poll = "50ms"
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

fn log_count(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.matches(needle).count())
        .unwrap_or(0)
}

/// Connects to the hub with the credentials in `creds` and returns the code
/// the hub closed the connection with; an error if it did not close it
/// within 30 s (it took the connection as the agent's).
fn refusal(hub: SocketAddr, creds: &Path) -> Result<ErrorCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let conn = endpoint
            .connect_with(client_config(creds, ALPN)?, hub, "127.0.0.1")?
            .await
            .context("handshake")?;
        let reason = tokio::time::timeout(Duration::from_secs(30), conn.closed())
            .await
            .context("the hub kept the connection open: it took it as the agent's")?;
        endpoint.close(0u32.into(), b"");
        endpoint.wait_idle().await;
        match reason {
            quinn::ConnectionError::ApplicationClosed(c) => {
                u32::try_from(c.error_code.into_inner())
                    .ok()
                    .and_then(ErrorCode::from_u32)
                    .with_context(|| format!("closed with {}", c.error_code))
            }
            other => anyhow::bail!("ended otherwise: {other}"),
        }
    })
}

/// Numbered QoS 1 messages on `q1/a`, 50 a second, until stopped.
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
            let mut o = MqttOptions::new("rotation-pub", "127.0.0.1", port);
            o.set_inflight(50);
            let (client, mut conn) = Client::new(o, 100);
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
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_secs(1));
            client.disconnect()?;
            let _ = driver.join();
            Ok(n)
        });
        Publisher { stop, thread }
    }

    fn stop(self) -> Result<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("publisher panicked"))?
    }
}

/// Waits until the outbox is empty and the hub holds every seq the agent
/// assigned, then checks each is there exactly once, without a gap.
fn assert_delivered_exactly_once(hub: &Hub, agent: &Agent) -> Result<u64> {
    let mut next_seq = 0;
    wait_until(DEADLINE, "the outbox to drain to the hub", || {
        let Ok(s) = agent_outbox_stats(&agent.config) else {
            return false;
        };
        next_seq = s["next_seq"].as_u64().unwrap_or(0);
        s["events"] == 0
            && hub
                .agent_stats(AGENT)
                .ok()
                .flatten()
                .is_some_and(|h| h.max_seq == Some(next_seq - 1))
    })?;
    let stats = hub.agent_stats(AGENT)?.context("stored")?;
    ensure!(
        stats.count == next_seq - 1
            && stats.distinct_seqs == stats.count
            && stats.min_seq == Some(1),
        "every seq exactly once, no gap: {stats:?}, the agent assigned 1..{}",
        next_seq - 1
    );
    Ok(stats.count)
}

fn audit(hub: &Hub) -> Result<String> {
    let (code, out, err) = run_cli(
        &bin("outpost-hub")?,
        &[
            "audit",
            "list",
            "--config",
            &hub.config.display().to_string(),
        ],
    )?;
    ensure!(code == 0, "audit list exited {code}: {err}");
    Ok(out)
}

/// One scrape of the agent's metrics on `port`.
fn agent_metrics(port: u16) -> Result<String> {
    use std::io::{Read as _, Write as _};
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// The value of the sample `name` (with its labels) in an exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

#[test]
fn a_short_lived_certificate_renews_while_modbus_and_mqtt_flow_and_the_old_one_is_refused_after_grace(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let hub = Hub::start_with(dir.path(), &pki, &hub_keys(&pki))?;
    // Issued without --config: the hub binds it when the agent first
    // connects.
    let creds = issue(&pki, dir.path(), "creds", Some(RENEWS_IN_20S), None)?;
    let old = dir.path().join("old-creds");
    std::fs::create_dir_all(&old)?;
    for f in ["ca.pem", "agent.pem", "agent.key"] {
        std::fs::copy(creds.join(f), old.join(f))?;
    }
    let broker = Mosquitto::start(dir.path())?;
    let device = Devsim::start(dir.path(), &outpost_tests::ramping_device(1), None)?;
    let site = dir.path().join("site");
    std::fs::create_dir_all(&site)?;
    let agent_log = site.join("agent.log");
    let metrics_port = outpost_tests::free_port()?;
    let mut agent = Agent::start(
        &site,
        &agent_config(&hub, &creds, metrics_port, Some((device.addr, broker.port))),
    )?;
    wait_until(DEADLINE, "the agent to connect", || {
        log_count(&agent_log, "Connected to the hub.") == 1
    })?;
    let publisher = Publisher::start(broker.port);
    ensure!(
        hub.log()
            .contains("Certificate bound to the agent on first use."),
        "{}",
        hub.log()
    );

    wait_until(DEADLINE, "the agent to renew its certificate", || {
        log_count(&agent_log, "Certificate renewed") == 1
    })?;
    let at_renewal = hub.agent_stats(AGENT)?.map_or(0, |s| s.count);
    // The new certificate and key are in place, the key 0600, no leftover.
    ensure!(std::fs::read(creds.join("agent.pem"))? != std::fs::read(old.join("agent.pem"))?);
    ensure!(std::fs::read(creds.join("agent.key"))? != std::fs::read(old.join("agent.key"))?);
    let mode = std::fs::metadata(creds.join("agent.key"))?
        .permissions()
        .mode();
    ensure!(mode & 0o777 == 0o600, "agent.key mode {mode:o}");
    ensure!(!creds.join("agent.key.new").exists());
    ensure!(hub.log().contains("Renewed the agent's certificate."));
    let entries = audit(&hub)?;
    ensure!(entries.contains("cert.renewed"), "{entries}");
    // Traffic goes on over the same connection: nothing forced a reconnect.
    wait_until(DEADLINE, "more events after the renewal", || {
        hub.agent_stats(AGENT)
            .ok()
            .flatten()
            .is_some_and(|s| s.count > at_renewal + 100)
    })?;
    ensure!(
        log_count(&agent_log, "Connected to the hub.") == 1,
        "the renewal reconnected the agent"
    );
    // The registry binds the renewed certificate: about 825 days ahead.
    let fleet = hub.fleet()?;
    let serial = fleet[0]["cert_serial"]
        .as_str()
        .context("cert_serial")?
        .to_owned();
    let metrics = hub.metrics()?;
    let left = sample(
        &metrics,
        "outpost_hub_agent_cert_expiry_seconds{agent=\"gw-1\"}",
    )
    .with_context(|| format!("no expiry gauge in\n{metrics}"))?;
    ensure!(left > 800.0 * 86_400.0, "{left}");
    let agent_left = sample(
        &agent_metrics(metrics_port)?,
        "outpost_agent_cert_expiry_seconds",
    )
    .context("no agent expiry gauge")?;
    ensure!(agent_left > 800.0 * 86_400.0, "{agent_left}");

    // Within the grace period the old certificate is still accepted (and
    // would take over the session, as any connection of the agent does);
    // once it is over, the old certificate is refused and the agent's session
    // is untouched. The one fixed wait is the grace period itself, which is
    // what this step is about; the hub started it before the agent logged
    // the renewal.
    std::thread::sleep(GRACE + Duration::from_secs(1));
    assert_eq!(refusal(hub.addr, &old)?, ErrorCode::CertificateNotCurrent);
    ensure!(audit(&hub)?.contains("cert.refused"));
    ensure!(!hub.log().contains("Superseding"), "{}", hub.log());

    // A new connection uses the new certificate.
    let published = publisher.stop()?;
    assert!(agent.proc.term(Duration::from_secs(30))?.success());
    // With the uplink only, so that what it drains is all there is.
    std::fs::write(
        &agent.config,
        agent_config(&hub, &creds, metrics_port, None),
    )?;
    let agent = Agent::start_file(&agent.config)?;
    wait_until(DEADLINE, "the agent to reconnect", || {
        log_count(&agent_log, "Connected to the hub.") == 2
    })?;
    let stored = assert_delivered_exactly_once(&hub, &agent)?;
    let q1 = hub.events_of("q1/a", 10_000_000)?;
    let mut seen = std::collections::BTreeSet::new();
    for e in &q1 {
        let n = e["value"]
            .as_u64()
            .or_else(|| e["value"].as_str().and_then(|s| s.parse().ok()))
            .with_context(|| format!("no number in {e}"))?;
        seen.insert(n);
    }
    let lost: Vec<u64> = (0..published).filter(|n| !seen.contains(n)).collect();
    ensure!(lost.is_empty(), "MQTT messages lost: {lost:?}");
    ensure!(!hub.events_of("plc/#", 10)?.is_empty(), "no Modbus samples");
    ensure!(hub.fleet()?[0]["cert_serial"] == serial.as_str());
    println!("{stored} events exactly once across the renewal ({published} MQTT messages, Modbus samples)");
    drop(device);
    drop(broker);
    Ok(())
}

#[test]
fn a_second_certificate_for_a_registered_agent_cannot_displace_its_live_session() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let hub = Hub::start_with(dir.path(), &pki, &hub_keys(&pki))?;
    // Issued with --config: bound before the agent ever connects.
    let creds = issue(&pki, dir.path(), "creds", None, Some(&hub.config))?;
    let site = dir.path().join("site");
    std::fs::create_dir_all(&site)?;
    let agent_log = site.join("agent.log");
    let agent = Agent::start(
        &site,
        &agent_config(&hub, &creds, outpost_tests::free_port()?, None),
    )?;
    wait_until(DEADLINE, "the agent to connect", || {
        log_count(&agent_log, "Connected to the hub.") == 1
    })?;
    // The CA signs another one for the same id, not recorded at the hub.
    let second = issue(&pki, dir.path(), "second", None, None)?;
    assert_eq!(
        refusal(hub.addr, &second)?,
        ErrorCode::CertificateNotCurrent
    );
    let fingerprint = {
        let certs = outpost_tls::load_certs(&second.join("agent.pem"))?;
        outpost_tls::fingerprint_sha256(certs.first().context("no certificate")?.as_ref())
    };
    let entries = audit(&hub)?;
    ensure!(
        entries.contains("cert.refused") && entries.contains(&fingerprint),
        "{entries}"
    );
    // The real agent kept its session.
    ensure!(!hub.log().contains("Superseding"), "{}", hub.log());
    ensure!(log_count(&agent_log, "Connected to the hub.") == 1);
    let fleet = hub.fleet()?;
    ensure!(fleet[0]["sessions"] == 1, "{fleet:?}");
    drop(agent);
    Ok(())
}

/// libfaketime, which the `faketime` package (tests/run installs it)
/// ships.
fn libfaketime() -> Result<PathBuf> {
    let found = std::fs::read_dir("/usr/lib")?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("faketime").join("libfaketimeMT.so.1"))
        .chain([PathBuf::from("/usr/lib/faketime/libfaketimeMT.so.1")])
        .find(|p| p.exists());
    found.context("libfaketime is not installed (tests/run installs the faketime package)")
}

/// Starts the agent on `config` with libfaketime preloaded, its clock
/// `offset` off. Preloaded rather than run through the `faketime` wrapper,
/// so that the agent is the process and SIGTERM reaches it.
fn agent_with_clock(config: &Path, offset: &str) -> Result<Proc> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(config.with_file_name("agent.log"))?;
    let child = Command::new(bin("outpost-agent")?)
        .env("LD_PRELOAD", libfaketime()?)
        .env("FAKETIME", offset)
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("start outpost-agent with libfaketime")?;
    Ok(Proc {
        child,
        name: "outpost-agent".into(),
    })
}

/// `-10m` and `+10m` in seconds.
fn offset_secs(offset: &str) -> i64 {
    let minutes: i64 = offset.trim_end_matches('m').parse().unwrap_or(0);
    minutes * 60
}

/// The time of day, in seconds, of a log line that starts with an RFC 3339
/// UTC time (`...THH:MM:SS...`).
fn time_of_day(line: &str) -> Option<i64> {
    let t = line.split('T').nth(1)?;
    let h: i64 = t.get(0..2)?.parse().ok()?;
    let m: i64 = t.get(3..5)?.parse().ok()?;
    let s: i64 = t.get(6..8)?.parse().ok()?;
    Some(h * 3600 + m * 60 + s)
}

/// How far the agent's clock is from the hub's: the agent's first
/// "Connected to the hub." line against the hub's first "Agent connected."
/// line (the same moment, within a second or two), modulo a day.
fn skew(agent_log: &str, hub_log: &str) -> Option<i64> {
    let a = time_of_day(
        agent_log
            .lines()
            .find(|l| l.contains("Connected to the hub."))?,
    )?;
    let h = time_of_day(hub_log.lines().find(|l| l.contains("Agent connected."))?)?;
    let d = (a - h).rem_euclid(86_400);
    Some(if d > 43_200 { d - 86_400 } else { d })
}

#[test]
fn an_agent_ten_minutes_off_the_hubs_clock_renews_and_delivers() -> Result<()> {
    libfaketime()?;
    for offset in ["-10m", "+10m"] {
        let dir = tempfile::tempdir()?;
        let pki = Pki::new(dir.path())?;
        let hub = Hub::start_with(dir.path(), &pki, &hub_keys(&pki))?;
        let creds = issue(&pki, dir.path(), "creds", None, None)?;
        let site = dir.path().join("site");
        std::fs::create_dir_all(&site)?;
        // Stamped now, so that the outbox's age limit keeps them.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
        let bodies: Vec<_> = outpost_tests::fleet_sim::events(0, 500)?
            .into_iter()
            .map(|(_, mut b)| {
                b.ts = outpost_protocols::Timestamp(i64::try_from(now.as_nanos()).unwrap_or(0));
                b
            })
            .collect();
        outpost_tests::fill_outbox(&site.join("data"), AGENT, &bodies)?;
        let config = site.join("agent.toml");
        std::fs::write(
            &config,
            agent_config(&hub, &creds, outpost_tests::free_port()?, None),
        )?;
        let agent_log = site.join("agent.log");
        let logs = || {
            format!(
                "agent:\n{}\nhub:\n{}",
                std::fs::read_to_string(&agent_log).unwrap_or_default(),
                hub.log()
            )
        };
        let mut proc = agent_with_clock(&config, offset)?;
        wait_until(DEADLINE, "the agent to connect", || {
            log_count(&agent_log, "Connected to the hub.") == 1
        })
        .with_context(logs)?;
        // Its clock really is off: its log lines carry its own time.
        let off = skew(&std::fs::read_to_string(&agent_log)?, &hub.log());
        ensure!(
            off.is_some_and(|s| (s - offset_secs(offset)).abs() <= 60),
            "skew {off:?}, not {offset}\n{}",
            logs()
        );
        let (code, out, err) = run_cli(
            &bin("outpost-agent")?,
            &["cert", "renew", "--config", &config.display().to_string()],
        )?;
        ensure!(code == 0, "cert renew exited {code}: {out}{err}");
        wait_until(DEADLINE, "the agent to renew", || {
            log_count(&agent_log, "Certificate renewed") == 1
        })
        .with_context(logs)?;
        ensure!(!site.join("data").join("renew.request").exists());
        ensure!(proc.term(Duration::from_secs(30))?.success(), "{}", logs());
        let mut proc = agent_with_clock(&config, offset)?;
        wait_until(
            DEADLINE,
            "the agent to reconnect with its new certificate",
            || log_count(&agent_log, "Connected to the hub.") == 2,
        )
        .with_context(logs)?;
        wait_until(DEADLINE, "the backlog at the hub", || {
            hub.agent_stats(AGENT)
                .ok()
                .flatten()
                .is_some_and(|s| s.count == 500 && s.distinct_seqs == 500)
        })
        .with_context(logs)?;
        ensure!(!hub.log().contains("certificate_not_current"), "{}", logs());
        ensure!(proc.term(Duration::from_secs(30))?.success());
        println!("agent at {offset}: renewed, reconnected with the new certificate, delivered 500 events");
    }
    Ok(())
}
