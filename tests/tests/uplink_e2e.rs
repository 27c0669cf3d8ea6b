//! The agent's QUIC uplink against the real hub: a backlog drains exactly
//! once; kill -9 of either side and a link that black-holes for longer than
//! the session's idle timeout lose and duplicate nothing; and the hub refuses,
//! with a clear log line and no change to its store, a certificate from
//! another CA, an expired certificate and a wrong ALPN, while the agent
//! refuses a hub it does not trust. A second host (a network namespace of
//! the test's own) behind a 2 Mbit/s link and a proxy losing 30 % of the
//! datagrams takes a backlog, then its link is cut while the hub restarts.
//!
//! Every wait polls a condition until a deadline. The one fixed sleep is the
//! length of the black-holed outage, which is what that test is about.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context as _, Result};
use outpost_protocols::{EventBody, Quality, StreamName, Timestamp, Value};
use outpost_tests::netns::Netns;
use outpost_tests::udp_proxy::{Faults, UdpProxy};
use outpost_tests::{agent_outbox_stats, wait_until, Agent, Devsim, Hub, HubEventStats, Pki};

/// The agent's id, in its certificate's SAN URI.
const AGENT: &str = "gw-1";

/// How long any one condition may take to come true on a loaded 2-core
/// machine running debug builds.
const DEADLINE: Duration = Duration::from_secs(120);

/// Longer than the sessions' 30 s idle timeout (both ends give up and the
/// agent redials), shorter than quinn's 60 s idle timeout, which the
/// session's timeout always beats: outlasting that one too would add a
/// minute to the run and exercise no other code.
const BLACK_HOLE_FOR: Duration = Duration::from_secs(40);

/// The agent's config: an uplink to `hub` with the credentials in `creds`
/// (`ca.pem`, `agent.pem`, `agent.key`), no metrics port, and `extra`.
fn agent_config(hub: SocketAddr, ca: &Path, creds: &Path, extra: &str) -> String {
    format!(
        r#"
[agent]
data_dir = "data"
id = "{AGENT}"

[uplink]
hub = "{hub}"
ca = "{}"
cert = "{}"
key = "{}"
reconnect_min = "100ms"
reconnect_max = "1s"

[observability]
metrics = ""
log = "info"

{extra}
"#,
        ca.display(),
        creds.join("agent.pem").display(),
        creds.join("agent.key").display(),
    )
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Event body `i`: a 64-byte JSON payload on one of 100 streams, as the MQTT
/// source stores a sensor's message.
fn body(i: usize, ts: i64) -> Result<EventBody> {
    let head = format!("{{\"n\":{i},\"value\":21.5,\"unit\":\"degC\",\"pad\":\"");
    let mut payload = head.clone();
    payload.extend(std::iter::repeat_n(
        'x',
        64usize.saturating_sub(head.len() + 2),
    ));
    payload.push_str("\"}");
    Ok(EventBody {
        stream: StreamName::parse(&format!("plant/sensor/{}", i % 100))?,
        ts: Timestamp(ts),
        value: Value::from_payload(payload.as_bytes()),
        quality: Quality::Good,
        attrs: BTreeMap::new(),
    })
}

/// Appends `n` events to the outbox in `data_dir` through the library, in
/// transactions of 1,000, before any agent runs on it.
fn fill_outbox(data_dir: &Path, n: usize) -> Result<()> {
    fill_outbox_with(data_dir, 0..n)
}

/// Appends the events `bodies` numbers (see [`body`]) to the outbox in
/// `data_dir`.
fn fill_outbox_with(data_dir: &Path, bodies: std::ops::Range<usize>) -> Result<()> {
    let ts = now_ns();
    let bodies = bodies.map(|i| body(i, ts)).collect::<Result<Vec<_>>>()?;
    outpost_tests::fill_outbox(data_dir, AGENT, &bodies)
}

/// The hub's stats for [`AGENT`], or nothing while it has none (or the verb
/// fails, as it may while the store is being created).
fn stats(hub: &Hub) -> Option<HubEventStats> {
    hub.agent_stats(AGENT).ok().flatten()
}

fn count(hub: &Hub) -> u64 {
    stats(hub).map_or(0, |s| s.count)
}

fn outbox_u64(config: &Path, field: &str) -> Result<u64> {
    let s = agent_outbox_stats(config)?;
    s[field]
        .as_u64()
        .with_context(|| format!("outbox stats: no {field} in {s}"))
}

/// Waits until the hub holds `n` events of [`AGENT`] and the agent's outbox
/// is empty, then checks that the hub holds seqs `1..=n`, each once.
fn assert_drained_exactly(hub: &Hub, agent_config: &Path, n: u64) -> Result<HubEventStats> {
    wait_until(DEADLINE, &format!("the hub to hold {n} events"), || {
        count(hub) >= n
    })?;
    wait_until(DEADLINE, "the agent's outbox to be empty", || {
        outbox_u64(agent_config, "events").ok() == Some(0)
    })?;
    let s = stats(hub).context("no stats")?;
    assert_eq!(
        s,
        HubEventStats {
            agent_id: AGENT.into(),
            count: n,
            distinct_seqs: n,
            min_seq: Some(1),
            max_seq: Some(n),
        }
    );
    assert_eq!(outbox_u64(agent_config, "acked_seq")?, n);
    Ok(s)
}

fn log_count(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.matches(needle).count())
        .unwrap_or(0)
}

/// A fleet, a hub and a backlog of `n` events for an agent that has not
/// started yet.
struct Setup {
    dir: tempfile::TempDir,
    pki: Pki,
    hub: Hub,
    creds: PathBuf,
}

impl Setup {
    fn new(backlog: usize) -> Result<Setup> {
        let dir = tempfile::tempdir()?;
        let pki = Pki::new(dir.path())?;
        let creds = pki.issue_agent(AGENT)?;
        fill_outbox(&dir.path().join("data"), backlog)?;
        let hub = Hub::start(dir.path(), &pki)?;
        Ok(Setup {
            dir,
            pki,
            hub,
            creds,
        })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The agent's config pointing at `hub`, trusting the fleet CA.
    fn agent_config(&self, hub: SocketAddr, extra: &str) -> String {
        agent_config(hub, &self.creds.join("ca.pem"), &self.creds, extra)
    }
}

#[test]
fn a_backlog_of_100000_events_drains_to_the_hub_exactly_once() -> Result<()> {
    const N: u64 = 100_000;
    let s = Setup::new(N as usize)?;
    let started = Instant::now();
    let agent = Agent::start(s.path(), &s.agent_config(s.hub.addr, ""))?;
    let mut first = None;
    wait_until(DEADLINE, "the first events at the hub", || {
        let c = count(&s.hub);
        if c > 0 {
            first = Some((Instant::now(), c));
        }
        c > 0
    })?;
    wait_until(DEADLINE, "the hub to hold every event", || {
        count(&s.hub) >= N
    })?;
    let total = started.elapsed();
    let (first_at, first_count) = first.context("no first batch")?;
    let streaming = first_at.elapsed();
    assert_drained_exactly(&s.hub, &agent.config, N)?;
    println!(
        "drained {N} events in {:.2} s from the agent's start ({:.0} events/s); \
         {:.0} events/s once streaming (debug build, synchronous=FULL at both ends)",
        total.as_secs_f64(),
        N as f64 / total.as_secs_f64(),
        (N - first_count) as f64 / streaming.as_secs_f64(),
    );
    let fleet = s.hub.fleet()?;
    assert_eq!(fleet.len(), 1, "{fleet:?}");
    assert_eq!(fleet[0]["agent_id"], AGENT);
    assert_eq!(fleet[0]["watermark"], N);
    Ok(())
}

#[test]
fn a_replaced_data_directory_is_renumbered_after_the_hub_and_loses_nothing() -> Result<()> {
    // A gateway delivers 300 events, then is replaced (or its data directory
    // wiped) under the same agent id; the new one stores 200 events, seqs
    // 1..=200 again, before it first reaches the hub.
    let s = Setup::new(300)?;
    let mut agent = Agent::start(s.path(), &s.agent_config(s.hub.addr, ""))?;
    assert_drained_exactly(&s.hub, &agent.config, 300)?;
    assert!(agent.proc.term(DEADLINE)?.success());
    std::fs::remove_dir_all(s.path().join("data"))?;
    fill_outbox_with(&s.path().join("data"), 1000..1200)?;
    let agent = Agent::start_file(&agent.config)?;
    // All 500 at the hub, each once, the new ones as 301..=500 in order.
    assert_drained_exactly(&s.hub, &agent.config, 500)?;
    let tail = s.hub.events_tail(AGENT, Some(200))?;
    let ns: Vec<(u64, u64)> = tail
        .iter()
        .map(|e| {
            let seq = e["seq"].as_u64().context("seq")?;
            let n = e["value"]["n"]
                .as_u64()
                .with_context(|| format!("n in {e}"))?;
            Ok((seq, n))
        })
        .collect::<Result<_>>()?;
    let expected: Vec<(u64, u64)> = (301..=500).zip(1000..1200).collect();
    assert_eq!(ns, expected);
    let log = std::fs::read_to_string(s.path().join("agent.log"))?;
    let line = log
        .lines()
        .find(|l| l.contains("renumbered"))
        .context("no renumbering line in the agent's log")?;
    println!("agent: {line}");
    assert!(line.contains("renumbered=200"), "{line}");
    Ok(())
}

#[test]
fn killing_the_hub_mid_drain_loses_and_duplicates_nothing() -> Result<()> {
    const N: u64 = 50_000;
    let s = Setup::new(N as usize)?;
    let mut hub = s.hub;
    let agent = Agent::start(
        s.dir.path(),
        &agent_config(hub.addr, &s.creds.join("ca.pem"), &s.creds, ""),
    )?;
    let mut last = 0;
    for round in 1..=2 {
        wait_until(
            DEADLINE,
            &format!("progress at the hub before kill {round}"),
            || count(&hub) > last,
        )?;
        hub.proc.kill9();
        last = count(&hub);
        ensure!(
            last < N,
            "the drain finished before kill {round}: nothing was tested"
        );
        println!("kill -9 of the hub {round} with {last} of {N} events stored");
        hub = Hub::start_file(&hub.config, hub.addr)?;
    }
    // The agent notices each dead hub only by its session's 30 s idle
    // timeout: the restarted hub's endpoint has a new random stateless-reset
    // key, so its resets for the old connection fail the token check and are
    // ignored (RFC 9000 section 10.3). Each kill costs about 30 s.
    let t = Instant::now();
    assert_drained_exactly(&hub, &agent.config, N)?;
    println!(
        "the rest arrived {:.1} s after the last restart",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

#[test]
fn killing_the_agent_mid_drain_loses_and_duplicates_nothing() -> Result<()> {
    const N: u64 = 50_000;
    let s = Setup::new(N as usize)?;
    let mut agent = Agent::start(s.path(), &s.agent_config(s.hub.addr, ""))?;
    let mut last = 0;
    for round in 1..=3 {
        wait_until(
            DEADLINE,
            &format!("progress at the hub before kill {round}"),
            || count(&s.hub) > last,
        )?;
        agent.proc.kill9();
        last = count(&s.hub);
        ensure!(
            last < N,
            "the drain finished before kill {round}: nothing was tested"
        );
        println!("kill -9 of the agent {round} with {last} of {N} events at the hub");
        agent = Agent::start_file(&agent.config)?;
    }
    assert_drained_exactly(&s.hub, &agent.config, N)?;
    Ok(())
}

/// A device whose holding registers 0..4 count up every 100 ms, and the
/// agent's tags that poll them as often, so new events keep coming.
fn counting_device(dir: &Path) -> Result<(Devsim, String)> {
    let sim = Devsim::start(dir, "counters = 4\ntick = \"100ms\"\n", None)?;
    let mut tags = format!(
        "[[modbus.devices]]\nname = \"plc\"\naddress = \"{}\"\nunit = 1\npoll = \"100ms\"\ntimeout = \"500ms\"\nretries = 1\nbackoff = \"100ms\"\nbackoff_max = \"500ms\"\n\n",
        sim.addr
    );
    for i in 0..4 {
        tags.push_str(&format!(
            "[[modbus.devices.tags]]\nname = \"c{i}\"\ntable = \"holding\"\naddress = {i}\ntype = \"u16\"\n\n"
        ));
    }
    Ok((sim, tags))
}

#[test]
fn a_black_holed_link_longer_than_every_timeout_recovers_exactly() -> Result<()> {
    const BACKLOG: u64 = 20_000;
    let s = Setup::new(BACKLOG as usize)?;
    let proxy = UdpProxy::start(s.hub.addr)?;
    let (_sim, device) = counting_device(s.path())?;
    proxy.set(Faults {
        drop: 0.05,
        duplicate: 0.05,
        reorder: 0.05,
        reorder_by: Duration::from_millis(30),
        ..Faults::PASS
    });
    let agent = Agent::start(s.path(), &s.agent_config(proxy.addr(), &device))?;
    let log = s.path().join("agent.log");

    let t = Instant::now();
    wait_until(DEADLINE, "the backlog through a lossy link", || {
        count(&s.hub) >= BACKLOG
    })?;
    let faults = proxy.stats();
    println!(
        "{BACKLOG} events through 5 % loss, duplication and reordering in {:.1} s; proxy: {faults:?}",
        t.elapsed().as_secs_f64()
    );
    assert!(
        faults.dropped > 0 && faults.duplicated > 0 && faults.reordered > 0,
        "{faults:?}"
    );

    let lost_before = log_count(&log, "Uplink lost");
    let connected_before = log_count(&log, "Connected to the hub.");
    proxy.set(Faults::BLACK_HOLE);
    let max_before = stats(&s.hub).and_then(|s| s.max_seq).unwrap_or(0);
    // The outage itself: nothing to wait for but time.
    std::thread::sleep(BLACK_HOLE_FOR);
    ensure!(
        log_count(&log, "Uplink lost") > lost_before,
        "the agent did not notice a {BLACK_HOLE_FOR:?} outage:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(proxy.stats().black_holed > faults.black_holed);
    let agent_log = std::fs::read_to_string(&log)?;
    let lost = agent_log
        .lines()
        .filter(|l| l.contains("Uplink lost"))
        .nth(lost_before)
        .unwrap_or_default();
    println!("agent: {lost}");
    assert!(lost.contains("idle timeout"), "{lost}");

    proxy.set(Faults::PASS);
    let t = Instant::now();
    wait_until(DEADLINE, "the agent to reconnect", || {
        log_count(&log, "Connected to the hub.") > connected_before
    })?;
    wait_until(DEADLINE, "new events at the hub", || {
        stats(&s.hub).and_then(|s| s.max_seq).unwrap_or(0) > max_before + 40
    })?;
    println!(
        "reconnected and delivering {:.1} s after the link came back",
        t.elapsed().as_secs_f64()
    );

    let last = stop_and_drain(agent, &s.hub, s.agent_config(proxy.addr(), ""))?;
    assert!(last > BACKLOG + 40, "no new events: {last}");
    Ok(())
}

/// Stops an agent that polls a device (SIGTERM: it must exit cleanly), lets
/// an agent with only the uplink (`drain_config`) send what the first left in
/// the outbox, and checks that the hub holds every seq the agent assigned,
/// once. Returns the last seq.
fn stop_and_drain(mut agent: Agent, hub: &Hub, drain_config: String) -> Result<u64> {
    let status = agent.proc.term(Duration::from_secs(30))?;
    ensure!(
        status.success(),
        "the agent exited with {status} on SIGTERM"
    );
    let last = outbox_u64(&agent.config, "next_seq")? - 1;
    // Samples committed while the uplink was stopping stay in the outbox; an
    // agent without the device sends them and makes no new ones.
    let left = outbox_u64(&agent.config, "events")?;
    println!("agent stopped at seq {last} with {left} events not yet at the hub");
    if left > 0 {
        let drain = agent.config.with_file_name("agent-drain.toml");
        std::fs::write(&drain, drain_config)?;
        let mut rest = Agent::start_file(&drain)?;
        wait_until(DEADLINE, "the rest of the outbox to drain", || {
            outbox_u64(&drain, "events").ok() == Some(0)
        })?;
        let status = rest.proc.term(Duration::from_secs(30))?;
        ensure!(
            status.success(),
            "the agent exited with {status} on SIGTERM"
        );
    }
    wait_until(DEADLINE, "the hub to hold every seq", || count(hub) >= last)?;
    let got = stats(hub).context("no stats")?;
    assert_eq!(
        got,
        HubEventStats {
            agent_id: AGENT.into(),
            count: last,
            distinct_seqs: last,
            min_seq: Some(1),
            max_seq: Some(last),
        }
    );
    Ok(last)
}

#[test]
fn a_throttled_lossy_link_cut_while_the_hub_restarts_loses_and_duplicates_nothing() -> Result<()> {
    const BACKLOG: u64 = 3_000;
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let creds = pki.issue_agent(AGENT)?;
    fill_outbox(&dir.path().join("data"), BACKLOG as usize)?;
    // The hub on a second host whose link runs at 2 Mbit/s each way, and
    // the proxy in front of it losing 30 % of the datagrams.
    let ns = Netns::new()?;
    ns.throttle(Some("2mbit"))?;
    let mut hub = Hub::start_in(dir.path(), &pki, &ns)?;
    let proxy = UdpProxy::start(hub.addr)?;
    proxy.set(Faults {
        drop: 0.3,
        duplicate: 0.05,
        reorder: 0.05,
        reorder_by: Duration::from_millis(30),
        ..Faults::PASS
    });
    let (_sim, device) = counting_device(dir.path())?;
    let config = |extra: &str| agent_config(proxy.addr(), &creds.join("ca.pem"), &creds, extra);
    let agent = Agent::start(dir.path(), &config(&device))?;
    let log = dir.path().join("agent.log");

    let t = Instant::now();
    wait_until(
        Duration::from_secs(240),
        "the backlog through 2 Mbit/s and 30 % loss",
        || count(&hub) >= BACKLOG,
    )?;
    let faults = proxy.stats();
    println!(
        "{BACKLOG} events through 2 Mbit/s, 30 % loss, 5 % duplication and reordering in {:.1} s; proxy: {faults:?}",
        t.elapsed().as_secs_f64()
    );
    ensure!(
        faults.dropped > 0 && faults.duplicated > 0 && faults.reordered > 0,
        "{faults:?}"
    );

    // The link goes down for longer than every timeout, and the hub is
    // killed and restarted in the middle of it.
    let lost_before = log_count(&log, "Uplink lost");
    let connected_before = log_count(&log, "Connected to the hub.");
    let max_before = stats(&hub).and_then(|s| s.max_seq).unwrap_or(0);
    ns.link(false)?;
    std::thread::sleep(BLACK_HOLE_FOR / 2);
    hub.proc.kill9();
    hub = Hub::start_file_in(&hub.config, hub.addr, Some(&ns))?;
    std::thread::sleep(BLACK_HOLE_FOR / 2);
    ensure!(
        log_count(&log, "Uplink lost") > lost_before,
        "the agent did not notice a {BLACK_HOLE_FOR:?} cut:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    ns.link(true)?;
    let t = Instant::now();
    wait_until(DEADLINE, "the agent to reconnect", || {
        log_count(&log, "Connected to the hub.") > connected_before
    })?;
    wait_until(DEADLINE, "new events at the hub", || {
        stats(&hub).and_then(|s| s.max_seq).unwrap_or(0) > max_before + 40
    })?;
    println!(
        "reconnected to the restarted hub and delivering {:.1} s after the link came back",
        t.elapsed().as_secs_f64()
    );
    let last = stop_and_drain(agent, &hub, config(""))?;
    ensure!(last > BACKLOG + 40, "no new events: {last}");
    hub.proc.kill9();
    Ok(())
}

/// Waits until `log` has said `needle` `times` times (an agent retries with
/// backoff), then checks that the hub's store shows no agent and no event.
fn assert_refused_without_trace(hub: &Hub, log: &Path, needle: &str, times: usize) -> Result<()> {
    wait_until(
        Duration::from_secs(60),
        &format!("{times} x {needle:?} in {}", log.display()),
        || log_count(log, needle) >= times,
    )
    .with_context(|| std::fs::read_to_string(log).unwrap_or_default())?;
    let fleet = hub.fleet()?;
    assert!(fleet.is_empty(), "the registry changed: {fleet:?}");
    let events = hub.events_stats()?;
    assert!(events.is_empty(), "events were stored: {events:?}");
    Ok(())
}

#[test]
fn an_agent_certificate_from_another_ca_is_refused() -> Result<()> {
    let s = Setup::new(10)?;
    let other = Pki::new(&s.path().join("other"))?;
    let foreign = other.issue_agent(AGENT)?;
    // The agent trusts the real fleet CA, so only the hub can object. Both CAs
    // bear the default name, so the hub finds "its" CA by name and rejects the
    // signature (BadSignature); a CA of another name gives UnknownIssuer.
    let _agent = Agent::start(
        s.path(),
        &agent_config(s.hub.addr, &s.creds.join("ca.pem"), &foreign, ""),
    )?;
    let hub_log = s.hub.config.with_file_name("hub.log");
    assert_refused_without_trace(&s.hub, &hub_log, "invalid peer certificate", 3)?;
    let line = s.hub.log();
    let line = line
        .lines()
        .find(|l| l.contains("invalid peer certificate"))
        .unwrap_or_default();
    println!("hub: {line}");
    assert!(line.contains("Agent connection ended"), "{line}");
    Ok(())
}

#[test]
fn a_hub_certificate_the_agent_does_not_trust_is_refused() -> Result<()> {
    let s = Setup::new(10)?;
    let other = Pki::new(&s.path().join("other"))?;
    let _agent = Agent::start(
        s.path(),
        &agent_config(s.hub.addr, &other.ca_dir.join("ca.pem"), &s.creds, ""),
    )?;
    let agent_log = s.path().join("agent.log");
    assert_refused_without_trace(&s.hub, &agent_log, "invalid peer certificate", 3)?;
    let text = std::fs::read_to_string(&agent_log)?;
    let line = text
        .lines()
        .find(|l| l.contains("invalid peer certificate"))
        .unwrap_or_default();
    println!("agent: {line}");
    assert!(line.contains("Uplink lost"), "{line}");
    assert_eq!(outbox_u64(&s.path().join("agent.toml"), "events")?, 10);
    Ok(())
}

/// Writes `out/agent.pem` and `out/agent.key`: a certificate for [`AGENT`]
/// signed by the fleet CA whose validity ended yesterday, which `ca issue`
/// cannot make (its shortest validity is one day from now).
fn issue_expired(pki: &Pki, out: &Path) -> Result<()> {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
    };
    let ca_pem = std::fs::read_to_string(pki.ca_dir.join("ca.pem"))?;
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(pki.ca_dir.join("ca.key"))?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, AGENT);
    params.subject_alt_names = vec![SanType::URI(rcgen::string::Ia5String::try_from(format!(
        "urn:outpost:agent:{AGENT}"
    ))?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(10);
    params.not_after = now - time::Duration::days(1);
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("agent.pem"), cert.pem())?;
    std::fs::write(out.join("agent.key"), key.serialize_pem())?;
    Ok(())
}

#[test]
fn an_expired_agent_certificate_is_refused() -> Result<()> {
    let s = Setup::new(10)?;
    let expired = s.path().join("expired");
    issue_expired(&s.pki, &expired)?;
    let _agent = Agent::start(
        s.path(),
        &agent_config(s.hub.addr, &s.creds.join("ca.pem"), &expired, ""),
    )?;
    let hub_log = s.hub.config.with_file_name("hub.log");
    assert_refused_without_trace(&s.hub, &hub_log, "certificate expired", 3)?;
    let text = s.hub.log();
    let line = text
        .lines()
        .find(|l| l.contains("certificate expired"))
        .unwrap_or_default();
    println!("hub: {line}");
    assert!(line.contains("Agent connection ended"), "{line}");
    Ok(())
}

/// Connects to `hub` as the agent whose credentials are in `creds`, offering
/// `alpn`; the handshake's outcome.
fn raw_quic_connect(hub: SocketAddr, creds: &Path, alpn: &[u8]) -> Result<Result<(), String>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let config = outpost_tests::fleet_sim::client_config(creds, alpn)?;
        let endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let connecting = endpoint.connect_with(config, hub, "localhost")?;
        let outcome = match tokio::time::timeout(Duration::from_secs(30), connecting).await {
            Err(_) => Err("the handshake timed out".to_owned()),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(conn)) => {
                conn.close(0u32.into(), b"");
                Ok(())
            }
        };
        endpoint.wait_idle().await;
        Ok(outcome)
    })
}

#[test]
fn a_wrong_alpn_is_refused() -> Result<()> {
    let s = Setup::new(0)?;
    let outcome = raw_quic_connect(s.hub.addr, &s.creds, b"other/1")?;
    let err = outcome.err().context("the hub accepted ALPN other/1")?;
    println!("client: {err}");
    // TLS alert 120, no_application_protocol (RFC 8446 section 6.2; RFC 9001
    // section 8.1 makes it mandatory for QUIC).
    assert!(err.contains("error 120"), "{err}");
    let hub_log = s.hub.config.with_file_name("hub.log");
    let needle = "doesn't support any known protocol";
    assert_refused_without_trace(&s.hub, &hub_log, needle, 1)?;
    let text = s.hub.log();
    let line = text
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_default();
    println!("hub: {line}");
    assert!(line.contains("Agent connection ended"), "{line}");
    // The same client with the right ALPN gets through, so it was the ALPN.
    raw_quic_connect(s.hub.addr, &s.creds, b"outpost/1")?
        .map_err(anyhow::Error::msg)
        .context("the control connection with ALPN outpost/1")?;
    Ok(())
}
