//! The agent against a real Mosquitto over mutual TLS: certificates made in
//! the test with rcgen (a CA, a broker certificate for `localhost` and
//! 127.0.0.1, client certificates), a broker that requires a client
//! certificate and takes its common name as the user name, and an independent
//! publisher, `mosquitto_pub` (OpenSSL, not rustls).
//!
//! Every wait polls a condition until a deadline; nothing sleeps for a fixed
//! time to let something happen.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use outpost_protocols::{Quality, Value};
use outpost_tests::test_ca::{Ca, CertFiles};
use outpost_tests::{have, outbox_events, wait_until, Agent, Mosquitto};
use rcgen::ExtendedKeyUsagePurpose;

/// How long any one condition may take to come true.
const DEADLINE: Duration = Duration::from_secs(60);

/// The common name of the agent's client certificate, which Mosquitto takes
/// as its user name.
const AGENT_CN: &str = "outpost-agent";

/// Everything one test needs: the site CA, the broker's certificate, the
/// agent's and the publisher's client certificates.
struct Pki {
    ca: Ca,
    broker: CertFiles,
    agent: CertFiles,
    publisher: CertFiles,
}

impl Pki {
    /// Certificates in `dir`; the broker's is valid for `broker_names`.
    fn new(dir: &Path, broker_names: &[&str]) -> Result<Pki> {
        let ca = Ca::new(dir, "site-ca")?;
        let broker = ca.issue(
            dir,
            "broker",
            broker_names,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let agent = ca.issue(dir, AGENT_CN, &[], ExtendedKeyUsagePurpose::ClientAuth)?;
        let publisher = ca.issue(dir, "publisher", &[], ExtendedKeyUsagePurpose::ClientAuth)?;
        Ok(Pki {
            ca,
            broker,
            agent,
            publisher,
        })
    }

    /// A Mosquitto listener on TLS only, that refuses clients without a
    /// certificate signed by the site CA and takes the certificate's common
    /// name as the user name (so no client is anonymous). Mosquitto 2.0
    /// allows TLS 1.2 and 1.3 when `tls_version` is unset; both are fine for
    /// rustls, so it is left unset.
    fn start_broker(&self, dir: &Path) -> Result<Mosquitto> {
        Mosquitto::start_with(
            dir,
            &format!(
                "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nuse_identity_as_username true\n",
                self.ca.cert.display(),
                self.broker.cert.display(),
                self.broker.key.display()
            ),
        )
    }
}

/// The agent's config: subscribes to `tls/#` at QoS 1 on `127.0.0.1:port`
/// over TLS trusting `ca`, presenting `client`, checking the broker's
/// certificate against `localhost`. Reconnects fast.
fn agent_config(port: u16, ca: &Path, client: &CertFiles) -> String {
    format!(
        r#"
[agent]
data_dir = "data"
id = "e2e"

[outbox]
commit_window = "1ms"

[mqtt]
broker = "127.0.0.1:{port}"
client_id = "tls-agent"
reconnect_min = "50ms"
reconnect_max = "500ms"
keep_alive = "5s"

[mqtt.tls]
ca = "{}"
cert = "{}"
key = "{}"
server_name = "localhost"

[[mqtt.subscribe]]
filter = "tls/#"
qos = 1

[observability]
metrics = ""
log = "info"
"#,
        ca.display(),
        client.cert.display(),
        client.key.display()
    )
}

fn log_count(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.matches(needle).count())
        .unwrap_or(0)
}

/// The end of a log file, for failure messages.
fn tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let from = lines.len().saturating_sub(30);
    format!(
        "last lines of {}:\n{}",
        path.display(),
        lines[from..].join("\n")
    )
}

fn mosquitto_log(dir: &Path, broker: &Mosquitto) -> PathBuf {
    dir.join(format!("mosquitto-{}.log", broker.port))
}

/// Publishes `messages` to `topic` at QoS 1 with `mosquitto_pub` over mutual
/// TLS, one message per line of its standard input, and waits for it to exit.
fn publish(
    broker: &Mosquitto,
    pki: &Pki,
    topic: &str,
    retain: bool,
    messages: &[String],
) -> Result<()> {
    ensure!(
        have("mosquitto_pub"),
        "mosquitto_pub not installed (tests/run installs mosquitto-clients)"
    );
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-h", "localhost", "-p", &broker.port.to_string()])
        .arg("--cafile")
        .arg(&pki.ca.cert)
        .arg("--cert")
        .arg(&pki.publisher.cert)
        .arg("--key")
        .arg(&pki.publisher.key)
        .args(["-i", "tls-publisher", "-q", "1", "-t", topic, "-l"]);
    if retain {
        cmd.arg("-r");
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start mosquitto_pub")?;
    {
        let mut stdin = child.stdin.take().context("mosquitto_pub stdin")?;
        for m in messages {
            writeln!(stdin, "{m}")?;
        }
    }
    // Dropping stdin ends the input; mosquitto_pub then exits once the
    // broker acknowledged what it sent.
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "mosquitto_pub exited with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The numbers stored on `stream`, as text or JSON payloads.
fn stored_numbers(dir: &Path, stream: &str) -> Vec<u64> {
    outbox_events(&dir.join("data"))
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.body.stream.as_str() == stream && e.body.quality == Quality::Good)
        .filter_map(|e| match &e.body.value {
            Value::Json(j) => j.as_str().parse().ok(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        })
        .collect()
}

#[test]
fn messages_over_mutual_tls_are_stored() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path(), &["localhost", "127.0.0.1"])?;
    let broker = pki.start_broker(dir.path())?;
    let agent_log = dir.path().join("agent.log");
    let mut agent = Agent::start(
        dir.path(),
        &agent_config(broker.port, &pki.ca.cert, &pki.agent),
    )?;
    // The subscription must exist before publishing, or the broker has
    // nobody to deliver to.
    wait_until(DEADLINE, "the agent connected over TLS", || {
        log_count(&agent_log, "Connected to the site broker") > 0
    })
    .with_context(|| tail(&agent_log))?;
    // The broker saw the agent's certificate: with use_identity_as_username
    // its common name is the user name it logs.
    let broker_log = mosquitto_log(dir.path(), &broker);
    wait_until(DEADLINE, "the broker logged the agent's identity", || {
        log_count(&broker_log, &format!("u'{AGENT_CN}'")) > 0
    })
    .with_context(|| tail(&broker_log))?;

    const N: u64 = 200;
    let messages: Vec<String> = (0..N).map(|i| i.to_string()).collect();
    publish(&broker, &pki, "tls/a", false, &messages)?;

    wait_until(DEADLINE, "every message in the outbox", || {
        stored_numbers(dir.path(), "tls/a").len() as u64 >= N
    })
    .with_context(|| tail(&agent_log))?;
    let stored: BTreeSet<u64> = stored_numbers(dir.path(), "tls/a").into_iter().collect();
    let missing: Vec<u64> = (0..N).filter(|i| !stored.contains(i)).collect();
    ensure!(missing.is_empty(), "not stored: {missing:?}");
    ensure!(
        stored.iter().all(|&i| i < N),
        "stored numbers nobody published: {stored:?}"
    );
    assert!(agent.proc.is_running(), "the agent exited");
    let status = agent.proc.term(Duration::from_secs(30))?;
    assert!(status.success(), "agent exit status {status}");
    Ok(())
}

#[test]
fn a_broker_certificate_from_another_ca_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path(), &["localhost", "127.0.0.1"])?;
    let other = Ca::new(dir.path(), "other-ca")?;
    let broker = pki.start_broker(dir.path())?;
    // A retained message: an agent that connected and subscribed, whatever it
    // trusted, would receive and store it.
    publish(&broker, &pki, "tls/retained", true, &["42".to_string()])?;
    let agent_log = dir.path().join("agent.log");
    // The agent's own certificate is good; only what it trusts is wrong.
    let mut agent = Agent::start(
        dir.path(),
        &agent_config(broker.port, &other.cert, &pki.agent),
    )?;

    // rustls says why: the broker's certificate chains to no CA it trusts.
    // The agent goes on retrying with backoff.
    let refused = "invalid peer certificate";
    wait_until(DEADLINE, "the agent to be refused three times", || {
        log_count(&agent_log, refused) >= 3
    })
    .with_context(|| tail(&agent_log))?;
    let log = std::fs::read_to_string(&agent_log)?;
    ensure!(
        log.contains("UnknownIssuer"),
        "the refusal does not name the unknown issuer:\n{}",
        tail(&agent_log)
    );
    ensure!(
        log_count(&agent_log, "Connected to the site broker") == 0,
        "the agent connected:\n{}",
        tail(&agent_log)
    );
    let seen = log_count(&agent_log, refused);
    wait_until(DEADLINE, "two more attempts", || {
        log_count(&agent_log, refused) >= seen + 2
    })
    .with_context(|| tail(&agent_log))?;
    assert!(agent.proc.is_running(), "the agent exited");
    let events = outbox_events(&dir.path().join("data"))?;
    ensure!(events.is_empty(), "events were stored: {events:?}");
    // It stops cleanly while still retrying.
    let status = agent.proc.term(Duration::from_secs(30))?;
    assert!(status.success(), "agent exit status {status}");
    Ok(())
}

/// The bridge publisher is a rumqttc client, which checks the broker's
/// certificate against the host it dials; with `broker = "127.0.0.1:..."` and
/// a certificate naming only `localhost`, it must use `server_name` instead,
/// as the subscriber does.
#[test]
fn modbus_values_are_bridged_to_a_tls_broker_named_by_server_name() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // The broker's certificate names `localhost` only, as a site broker's
    // certificate names its host name, not an address the agent dials.
    let pki = Pki::new(dir.path(), &["localhost"])?;
    let broker = pki.start_broker(dir.path())?;
    let sim = outpost_tests::Devsim::start(
        dir.path(),
        "[[points]]\ntable = \"holding\"\naddress = 110\ntype = \"u16\"\nvalue = 42\n",
        None,
    )?;
    let extra = format!(
        r#"
[[modbus.devices]]
name = "plc1"
address = "{}"
poll = "100ms"
[[modbus.devices.tags]]
name = "level"
table = "holding"
address = 110
type = "u16"

[[bridges]]
from = "modbus:plc1/level"
to = "mqtt:site/{{device}}/{{tag}}"
format = "raw"
qos = 1
on = "poll"
"#,
        sim.addr
    );
    let agent_log = dir.path().join("agent.log");
    let mut agent = Agent::start(
        dir.path(),
        &(agent_config(broker.port, &pki.ca.cert, &pki.agent) + &extra),
    )?;
    wait_until(
        DEADLINE,
        "the agent's subscriber connected over TLS",
        || log_count(&agent_log, "Connected to the site broker") > 0,
    )
    .with_context(|| tail(&agent_log))?;
    let out = Command::new("mosquitto_sub")
        .args(["-h", "localhost", "-p", &broker.port.to_string()])
        .arg("--cafile")
        .arg(&pki.ca.cert)
        .arg("--cert")
        .arg(&pki.publisher.cert)
        .arg("--key")
        .arg(&pki.publisher.key)
        .args(["-t", "site/plc1/level", "-q", "1", "-C", "1", "-W", "30"])
        .output()
        .context("run mosquitto_sub")?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "42",
        "no bridged value within 30 s (mosquitto_sub {}: {:?} {:?})\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        tail(&agent_log)
    );
    agent.proc.term(Duration::from_secs(30))?;
    Ok(())
}
