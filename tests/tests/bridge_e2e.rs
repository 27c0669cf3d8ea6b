//! The local MQTT → Modbus write bridge, hardened, against real peers: a
//! Mosquitto that takes only TLS and only users of its password file,
//! `mosquitto_pub` (OpenSSL, not our client) as the site's publisher,
//! pymodbus as the device (an implementation independent of ours), and the
//! real hub, which must see every write the bridge made on the reserved
//! stream `$outpost/bridge/writes` even under a policy whose default is to
//! deny. What the device holds is read with a Modbus request written out
//! here byte by byte, not with the agent's codec.
//!
//! Every wait polls a condition until a deadline; nothing sleeps for a fixed
//! time to let something happen.

use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use outpost_tests::test_ca::Ca;
use outpost_tests::{bin, free_port, have, run_cli, wait_until, Agent, Hub, Mosquitto, Pki, Proc};
use rcgen::ExtendedKeyUsagePurpose;
use serde_json::Value;

const AGENT: &str = "gw-bridge";

const DEADLINE: Duration = Duration::from_secs(90);

const STREAM: &str = "$outpost/bridge/writes";

/// What the operator's site tool logs in as, and the agent.
const OPERATOR: (&str, &str) = ("operator", "op-secret");
const AGENT_LOGIN: (&str, &str) = ("outpost-agent", "agent-secret");

/// Nothing of the site's data may leave it; the agent's own records are not
/// the site's data.
const POLICY: &str = r#"
description = "bridge e2e: deny by default"

[defaults]
action = "deny"
"#;

/// pymodbus serving holding register 0, the setpoint, at 10.
fn pymodbus(dir: &Path) -> Result<(Proc, SocketAddr)> {
    let python = std::env::var("OUTPOST_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("peers")
        .join("pymodbus_server.py");
    let points = dir.join("points.json");
    std::fs::write(
        &points,
        r#"[{"table": "holding", "address": 0, "type": "u16", "value": 10}]"#,
    )?;
    let port = free_port()?;
    let mut child = Command::new(&python)
        .arg(&script)
        .arg("--port")
        .arg(port.to_string())
        .arg("--points")
        .arg(&points)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("pymodbus.log"))?)
        .spawn()
        .with_context(|| format!("cannot run {python:?} with pymodbus (tests/run installs it)"))?;
    let stdout = child.stdout.take().context("pymodbus stdout")?;
    let proc = Proc {
        child,
        name: "pymodbus".into(),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        for _ in lines {}
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(Some(Ok(line))) if line.starts_with("listening ") => {
            Ok((proc, SocketAddr::from(([127, 0, 0, 1], port))))
        }
        other => bail!(
            "pymodbus did not start ({other:?}): {}",
            std::fs::read_to_string(dir.join("pymodbus.log")).unwrap_or_default()
        ),
    }
}

/// Holding register `address` of unit 1 at `device`, read with one Modbus
/// TCP request (function 3) built here.
fn holding_register(device: SocketAddr, address: u16) -> Result<u16> {
    let mut s = TcpStream::connect_timeout(&device, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let [hi, lo] = address.to_be_bytes();
    // Transaction 7, protocol 0, 6 bytes follow, unit 1; read 1 register.
    s.write_all(&[0, 7, 0, 0, 0, 6, 1, 3, hi, lo, 0, 1])?;
    let mut reply = [0u8; 11];
    s.read_exact(&mut reply)?;
    ensure!(
        reply[..2] == [0, 7] && reply[7] == 3 && reply[8] == 2,
        "unexpected reply {reply:?}"
    );
    Ok(u16::from_be_bytes([reply[9], reply[10]]))
}

/// A password file for Mosquitto with the agent's and the operator's
/// logins, made by Mosquitto's own tool.
fn password_file(dir: &Path) -> Result<PathBuf> {
    ensure!(
        have("mosquitto_passwd"),
        "mosquitto_passwd not installed (tests/run installs mosquitto)"
    );
    let file = dir.join("mosquitto.passwd");
    for (i, (user, password)) in [AGENT_LOGIN, OPERATOR].into_iter().enumerate() {
        let mut cmd = Command::new("mosquitto_passwd");
        if i == 0 {
            cmd.arg("-c");
        }
        let out = cmd.arg("-b").arg(&file).args([user, password]).output()?;
        ensure!(
            out.status.success(),
            "mosquitto_passwd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(file)
}

/// Publishes `message` to `topic` at QoS 1 over TLS with `mosquitto_pub`,
/// logging in as `login` if given: its exit status and stderr.
fn publish(
    broker: &Mosquitto,
    ca: &Path,
    login: Option<(&str, &str)>,
    topic: &str,
    message: &str,
) -> Result<(bool, String)> {
    ensure!(
        have("mosquitto_pub"),
        "mosquitto_pub not installed (tests/run installs mosquitto-clients)"
    );
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-h", "localhost", "-p", &broker.port.to_string()])
        .arg("--cafile")
        .arg(ca)
        .args(["-i", "site-tool", "-q", "1", "-t", topic, "-m", message]);
    if let Some((user, password)) = login {
        cmd.args(["-u", user, "-P", password]);
    }
    let out = cmd.output().context("run mosquitto_pub")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn agent_config(
    hub: &Hub,
    creds: &Path,
    broker: &Mosquitto,
    site_ca: &Path,
    device: SocketAddr,
) -> String {
    format!(
        r#"
[agent]
data_dir = "data"
id = "{AGENT}"
labels = {{ site = "depot-17" }}

[uplink]
hub = "{hub}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
reconnect_min = "100ms"
reconnect_max = "1s"

[outbox]
commit_window = "1ms"

[mqtt]
broker = "127.0.0.1:{port}"
client_id = "bridge-agent"
username = "{user}"
password = "{password}"
reconnect_min = "50ms"
reconnect_max = "500ms"
keep_alive = "5s"

[mqtt.tls]
ca = "{site_ca}"
server_name = "localhost"

[[modbus.devices]]
name = "plc1"
address = "{device}"
poll = "200ms"

[[modbus.devices.tags]]
name = "setpoint"
table = "holding"
address = 0
type = "u16"
writable = true
min = 0
max = 100

[[bridges]]
from = "mqtt:cmd/plc1/setpoint"
to = "modbus:plc1/setpoint"
qos = 1

[observability]
metrics = ""
log = "info"
"#,
        hub = hub.addr,
        ca = creds.join("ca.pem").display(),
        cert = creds.join("agent.pem").display(),
        key = creds.join("agent.key").display(),
        port = broker.port,
        user = AGENT_LOGIN.0,
        password = AGENT_LOGIN.1,
        site_ca = site_ca.display(),
    )
}

/// The hub's records of the agent's bridge writes, oldest first: their
/// JSON documents.
fn records(hub: &Hub) -> Result<Vec<Value>> {
    Ok(hub
        .events_of(STREAM, 100)?
        .into_iter()
        .filter(|e| e["agent_id"] == AGENT)
        .map(|e| e["value"].clone())
        .collect())
}

/// Waits until the hub holds `n` records and returns them.
fn wait_for_records(hub: &Hub, n: usize) -> Result<Vec<Value>> {
    let mut last = Vec::new();
    wait_until(
        DEADLINE,
        &format!("{n} bridge write records at the hub"),
        || {
            last = records(hub).unwrap_or_default();
            last.len() >= n
        },
    )
    .with_context(|| format!("records so far: {last:?}"))?;
    Ok(last)
}

#[test]
fn a_publish_over_tls_with_a_login_writes_the_register_and_the_hub_sees_the_write() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let site = Ca::new(dir.path(), "site-ca")?;
    let broker_cert = site.issue(
        dir.path(),
        "broker",
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let passwd = password_file(dir.path())?;
    let broker = Mosquitto::start_with(
        dir.path(),
        &format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nallow_anonymous false\npassword_file {}\n",
            site.cert.display(),
            broker_cert.cert.display(),
            broker_cert.key.display(),
            passwd.display()
        ),
    )?;
    let (_device, device) = pymodbus(dir.path())?;
    ensure!(
        holding_register(device, 0)? == 10,
        "the device starts at 10"
    );

    let pki = Pki::new(dir.path())?;
    let creds = pki.issue_agent(AGENT)?;
    let hub = Hub::start(dir.path(), &pki)?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY)?;
    let (code, _, err) = hub.cli(&[
        "policy",
        "apply",
        policy.to_str().context("utf-8")?,
        "--actor",
        "e2e",
    ])?;
    ensure!(code == 0, "policy apply: {err}");

    // TLS and a login: the bridge needs no waiver, and `check` says nothing
    // on stderr.
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        agent_config(&hub, &creds, &broker, &site.cert, device),
    )?;
    let (code, out, err) = run_cli(
        &bin("outpost-agent")?,
        &["check", "--config", config.to_str().context("utf-8")?],
    )?;
    ensure!(code == 0 && err.is_empty(), "check: {code} {err}");
    ensure!(
        out.contains("bridge mqtt:cmd/plc1/setpoint -> modbus:plc1/setpoint (write)"),
        "{out}"
    );

    let agent = Agent::start_file(&config)?;
    let agent_log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    wait_until(
        DEADLINE,
        "the agent to run policy 1 and reach the broker",
        || {
            agent_log().contains("Connected to the site broker")
                && hub.fleet().is_ok_and(|f| {
                    f.iter()
                        .any(|a| a["agent_id"] == AGENT && a["policy_version"].as_u64() == Some(1))
                })
        },
    )
    .with_context(agent_log)?;

    // Nobody without a login gets in, so nothing is written or recorded.
    let (ok, err) = publish(&broker, &site.cert, None, "cmd/plc1/setpoint", "55")?;
    ensure!(!ok, "an anonymous publish was accepted");
    ensure!(err.to_lowercase().contains("not authori"), "{err}");
    let (ok, _) = publish(
        &broker,
        &site.cert,
        Some((OPERATOR.0, "wrong")),
        "cmd/plc1/setpoint",
        "56",
    )?;
    ensure!(!ok, "a wrong password was accepted");

    // The operator's write reaches the device, and the hub hears of it.
    let (ok, err) = publish(
        &broker,
        &site.cert,
        Some(OPERATOR),
        "cmd/plc1/setpoint",
        "77",
    )?;
    ensure!(ok, "mosquitto_pub: {err}");
    let got = wait_for_records(&hub, 1)?;
    ensure!(
        got[0]
            == serde_json::json!({
                "topic": "cmd/plc1/setpoint",
                "device": "plc1",
                "tag": "setpoint",
                "value": 77,
                "outcome": "applied",
            }),
        "{got:?}"
    );
    ensure!(holding_register(device, 0)? == 77, "the device holds 77");

    // A value above the tag's max is refused at the agent: not written,
    // and recorded as refused, with why.
    let (ok, err) = publish(
        &broker,
        &site.cert,
        Some(OPERATOR),
        "cmd/plc1/setpoint",
        "500",
    )?;
    ensure!(ok, "mosquitto_pub: {err}");
    let got = wait_for_records(&hub, 2)?;
    ensure!(got[1]["outcome"] == "refused", "{got:?}");
    ensure!(got[1]["value"] == 500, "{got:?}");
    ensure!(
        got[1]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("above max 100")),
        "{got:?}"
    );
    ensure!(
        holding_register(device, 0)? == 77,
        "the device still holds 77"
    );

    // Neither rejected publish left a record, and the default deny kept the
    // site's own data at the site: no sample of the new value (samples from
    // before the hub took up version 1, a second at most, may be stored).
    ensure!(got.len() == 2, "{got:?}");
    let samples = hub.events_of("plc1/#", 1000)?;
    ensure!(
        samples.iter().all(|e| e["value"] != 77),
        "site data under deny by default: {samples:?}"
    );
    drop(agent);
    Ok(())
}
