//! The agent against a real OPC UA server: asyncua (Python), an
//! implementation independent of the agent's client library
//! (`tests/peers/opcua_server.py`). Every supported data type reads back as
//! the server holds it; SignAndEncrypt works with certificates checked both
//! ways and a password; an untrusted server, an untrusted client and a wrong
//! password get nothing; a restarted server is subscribed again with bad
//! quality while it is away; a link cut again and again loses no change the
//! server kept; 10,000 monitored items all report.
//!
//! Every wait polls the outbox until a deadline; nothing sleeps for a fixed
//! time to let something happen. The Python server alone takes seconds to
//! start on a loaded machine, hence the generous deadline.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use outpost_protocols::{EventBody, JsonText, Quality, Reason, Value};
use outpost_tests::{bin, free_port, outbox_events, run_cli, wait_until, Agent, Proc};

/// How long any one condition may take to come true.
const DEADLINE: Duration = Duration::from_secs(60);

/// `tests/peers/opcua_server.py` on a free port.
struct UaServer {
    proc: Proc,
    port: u16,
    args: Vec<String>,
    log: PathBuf,
}

impl UaServer {
    /// Starts the server with `args` and waits until it says it listens.
    /// Fails, rather than skips, if Python or asyncua is missing: tests/run
    /// installs them.
    fn start(dir: &Path, args: &[String]) -> Result<UaServer> {
        Self::start_on(dir, free_port()?, args)
    }

    fn start_on(dir: &Path, port: u16, args: &[String]) -> Result<UaServer> {
        let python = std::env::var("OUTPOST_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("peers")
            .join("opcua_server.py");
        let log = dir.join(format!("opcua-server-{port}.log"));
        let mut child = Command::new(&python)
            .arg(&script)
            .arg("--port")
            .arg(port.to_string())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log)?)
            .spawn()
            .with_context(|| {
                format!("cannot run {python:?}: set OUTPOST_PYTHON to a Python 3 with asyncua (tests/run does)")
            })?;
        let stdout = child.stdout.take().context("server stdout")?;
        let mut proc = Proc {
            child,
            name: "opcua_server.py".into(),
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        if let Ok(Some(Ok(line))) = rx.recv_timeout(DEADLINE) {
            if line.starts_with("listening ") {
                return Ok(UaServer {
                    proc,
                    port,
                    args: args.to_vec(),
                    log,
                });
            }
        }
        proc.kill9();
        let stderr = std::fs::read_to_string(&log).unwrap_or_default();
        bail!(
            "the asyncua server did not start ({}):\n{stderr}",
            if stderr.contains("asyncua is not importable") {
                "asyncua is missing: tests/run installs it with pip install 'asyncua>=1.1,<2'"
            } else {
                "see its stderr below"
            }
        )
    }

    fn endpoint(&self) -> String {
        format!("opc.tcp://127.0.0.1:{}/outpost/", self.port)
    }
}

/// A self-signed OPC UA application certificate (RSA 2048, DER) and its
/// key (PEM), made with openssl as an operator would.
fn app_cert(dir: &Path, name: &str, uri: &str) -> Result<(PathBuf, PathBuf)> {
    let pem = dir.join(format!("{name}-cert.pem"));
    let der = dir.join(format!("{name}.der"));
    let key = dir.join(format!("{name}-key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&pem)
        .args(["-subj", &format!("/CN={name}/O=Outpost tests")])
        .args(["-addext", &format!("subjectAltName=URI:{uri},DNS:localhost,IP:127.0.0.1")])
        .args([
            "-addext",
            "keyUsage=critical,digitalSignature,nonRepudiation,keyEncipherment,dataEncipherment,keyCertSign",
        ])
        .args(["-addext", "extendedKeyUsage=serverAuth,clientAuth"])
        .output()
        .context("run openssl")?;
    ensure!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("openssl")
        .args(["x509", "-outform", "der", "-in"])
        .arg(&pem)
        .arg("-out")
        .arg(&der)
        .output()?;
    ensure!(
        out.status.success(),
        "openssl x509: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((der, key))
}

fn agent_toml(servers: &str) -> String {
    format!(
        r#"
[agent]
data_dir = "data"

[outbox]
synchronous = "normal"

[observability]
metrics = ""
log = "info"
{servers}
"#
    )
}

/// The events of each stream, oldest first.
fn by_stream(dir: &Path) -> Result<BTreeMap<String, Vec<EventBody>>> {
    let mut out: BTreeMap<String, Vec<EventBody>> = BTreeMap::new();
    for e in outbox_events(&dir.join("data"))? {
        out.entry(e.body.stream.as_str().to_owned())
            .or_default()
            .push(e.body);
    }
    Ok(out)
}

/// The typed nodes the server holds and what the agent must record for each.
fn typed_nodes() -> Vec<(serde_json::Value, Value)> {
    use serde_json::json;
    let j = |s: &str| Value::Json(JsonText::parse(s).expect("json"));
    vec![
        (
            json!({"name": "Boolean", "type": "Boolean", "value": true}),
            Value::Bool(true),
        ),
        (
            json!({"name": "SByte", "type": "SByte", "value": -128}),
            Value::I64(-128),
        ),
        (
            json!({"name": "Byte", "type": "Byte", "value": 255}),
            Value::U64(255),
        ),
        (
            json!({"name": "Int16", "type": "Int16", "value": -32768}),
            Value::I64(-32768),
        ),
        (
            json!({"name": "UInt16", "type": "UInt16", "value": 65535}),
            Value::U64(65535),
        ),
        (
            json!({"name": "Int32", "type": "Int32", "value": -2147483648i64}),
            Value::I64(-2_147_483_648),
        ),
        (
            json!({"name": "UInt32", "type": "UInt32", "value": 4294967295u64}),
            Value::U64(4_294_967_295),
        ),
        (
            json!({"name": "Int64", "type": "Int64", "value": i64::MIN}),
            Value::I64(i64::MIN),
        ),
        (
            json!({"name": "UInt64", "type": "UInt64", "value": u64::MAX}),
            Value::U64(u64::MAX),
        ),
        (
            json!({"name": "Float", "type": "Float", "value": 0.1}),
            Value::F64(0.1),
        ),
        (
            json!({"name": "Double", "type": "Double", "value": -1.0e-300}),
            Value::F64(-1.0e-300),
        ),
        (
            json!({"name": "String", "type": "String", "value": "héllo, wörld ✓"}),
            Value::String("héllo, wörld ✓".into()),
        ),
        (
            json!({"name": "DateTime", "type": "DateTime", "value": "2026-12-06T12:30:01.123456Z"}),
            Value::String("2026-12-06T12:30:01.123456000Z".into()),
        ),
        (
            json!({"name": "ByteString", "type": "ByteString", "value": "00017f80feff"}),
            Value::Bytes(vec![0, 1, 0x7f, 0x80, 0xfe, 0xff]),
        ),
        (
            json!({"name": "LocalizedText", "type": "LocalizedText", "value": "hot"}),
            Value::String("hot".into()),
        ),
        (
            json!({"name": "Guid", "type": "Guid", "value": "72962b91-fa75-4ae6-8d28-b404dc7daf63"}),
            Value::String("72962b91-fa75-4ae6-8d28-b404dc7daf63".into()),
        ),
        (
            json!({"name": "Int32Array", "type": "Int32", "value": [1, -2, 2147483647]}),
            j("[1,-2,2147483647]"),
        ),
        (
            json!({"name": "DoubleArray", "type": "Double", "value": [1.5, -2.25]}),
            j("[1.5,-2.25]"),
        ),
        (
            json!({"name": "BooleanArray", "type": "Boolean", "value": [true, false]}),
            j("[true,false]"),
        ),
        (
            json!({"name": "StringArray", "type": "String", "value": ["a", "ü"]}),
            j(r#"["a","ü"]"#),
        ),
        (
            json!({"name": "ByteStringArray", "type": "ByteString", "value": ["00ff", ""]}),
            j(r#"["AP8=",""]"#),
        ),
    ]
}

#[test]
fn every_data_type_reads_back_as_the_server_holds_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let nodes = typed_nodes();
    let file = dir.path().join("nodes.json");
    let spec: Vec<_> = nodes.iter().map(|(n, _)| n.clone()).collect();
    std::fs::write(&file, serde_json::to_vec(&spec)?)?;
    let server = UaServer::start(dir.path(), &["--nodes".into(), file.display().to_string()])?;
    let mut entries = String::new();
    for (n, _) in &nodes {
        let name = n["name"].as_str().context("name")?;
        entries.push_str(&format!(
            "[[opcua.servers.nodes]]\nnode_id = \"ns=2;s={name}\"\nstream = \"ua/{name}\"\n"
        ));
    }
    let mut agent = Agent::start(
        dir.path(),
        &agent_toml(&format!(
            "[[opcua.servers]]\nname = \"ua\"\nendpoint = \"{}\"\npublishing_interval = \"100ms\"\n{entries}",
            server.endpoint()
        )),
    )?;
    wait_until(DEADLINE, "a sample of every node", || {
        by_stream(dir.path())
            .map(|m| m.len() >= nodes.len())
            .unwrap_or(false)
    })?;
    let got = by_stream(dir.path())?;
    let mut wrong = Vec::new();
    for (n, want) in &nodes {
        let stream = format!("ua/{}", n["name"].as_str().unwrap_or_default());
        let first = got.get(&stream).and_then(|v| v.first());
        match first {
            Some(e) if e.quality == Quality::Good && &e.value == want => {}
            other => wrong.push(format!(
                "{stream}: want {want:?}, got {:?}",
                other.map(|e| (&e.value, &e.quality))
            )),
        }
    }
    ensure!(
        wrong.is_empty(),
        "{} of {} nodes read back wrong:\n{}",
        wrong.len(),
        nodes.len(),
        wrong.join("\n")
    );
    // SIGTERM closes the session and ends the agent cleanly.
    let status = agent.proc.term(Duration::from_secs(30))?;
    let log = std::fs::read_to_string(dir.path().join("agent.log"))?;
    ensure!(status.success(), "exit {status}:\n{log}");
    ensure!(log.contains("OPC UA server stopped."), "{log}");
    Ok(())
}

#[test]
fn sign_and_encrypt_with_certificates_both_ways_and_a_password() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let (server_der, server_key) = app_cert(d, "server", "urn:outpost:test:server")?;
    let (other_der, _) = app_cert(d, "impostor", "urn:outpost:test:server")?;
    let (agent_der, agent_key) = app_cert(d, "agent", "urn:outpost:agent")?;
    let (stranger_der, stranger_key) = app_cert(d, "stranger", "urn:outpost:agent")?;
    // The server trusts the agent's certificate only (a folder of its own).
    std::fs::create_dir_all(d.join("server-trust"))?;
    std::fs::copy(&agent_der, d.join("server-trust").join("agent.der"))?;
    std::fs::write(d.join("good.pass"), "s3cret\n")?;
    std::fs::write(d.join("bad.pass"), "guess\n")?;
    let server = UaServer::start(
        d,
        &[
            "--cert".into(),
            server_der.display().to_string(),
            "--key".into(),
            server_key.display().to_string(),
            "--trust".into(),
            d.join("server-trust")
                .join("agent.der")
                .display()
                .to_string(),
            "--user".into(),
            "operator:s3cret".into(),
            "--tick".into(),
            "200".into(),
        ],
    )?;
    let entry = |name: &str, policy: &str, cert: &Path, key: &Path, trusted: &Path, pass: &str| {
        format!(
            r#"
[[opcua.servers]]
name = "{name}"
endpoint = "{}"
security_policy = "{policy}"
security_mode = "SignAndEncrypt"
certificate = "{}"
private_key = "{}"
trusted_server_certificates = ["{}"]
username = "operator"
password_file = "{pass}"
publishing_interval = "100ms"
reconnect_min = "200ms"
reconnect_max = "1s"
[[opcua.servers.nodes]]
node_id = "ns=2;s=Counter"
"#,
            server.endpoint(),
            cert.display(),
            key.display(),
            trusted.display()
        )
    };
    let good = [
        "Basic256Sha256",
        "Aes128_Sha256_RsaOaep",
        "Aes256_Sha256_RsaPss",
    ];
    let mut servers = String::new();
    for p in good {
        servers.push_str(&entry(
            p,
            p,
            &agent_der,
            &agent_key,
            &server_der,
            "good.pass",
        ));
    }
    servers.push_str(&entry(
        "wrong-password",
        "Basic256Sha256",
        &agent_der,
        &agent_key,
        &server_der,
        "bad.pass",
    ));
    servers.push_str(&entry(
        "untrusted-server",
        "Basic256Sha256",
        &agent_der,
        &agent_key,
        &other_der,
        "good.pass",
    ));
    servers.push_str(&entry(
        "untrusted-agent",
        "Basic256Sha256",
        &stranger_der,
        &stranger_key,
        &server_der,
        "good.pass",
    ));
    let _agent = Agent::start(d, &agent_toml(&servers))?;
    wait_until(
        DEADLINE,
        "five good Counter samples over each policy",
        || {
            by_stream(d)
                .map(|m| {
                    good.iter().all(|p| {
                        m.get(&format!("{p}/ns=2;s=Counter")).is_some_and(|v| {
                            v.iter().filter(|e| e.quality == Quality::Good).count() >= 5
                        })
                    })
                })
                .unwrap_or(false)
        },
    )?;
    // By now each refused entry has tried several times (reconnect_max 1s).
    let log = || std::fs::read_to_string(d.join("agent.log")).unwrap_or_default();
    // Each refusal is logged with the status that says why: the server
    // refuses the password and the certificate it does not trust; the agent
    // refuses the server certificate it does not trust.
    let refusals = [
        ("wrong-password", "BadUserAccessDenied"),
        ("untrusted-server", "BadCertificateUntrusted"),
        ("untrusted-agent", "BadCertificateUntrusted"),
    ];
    wait_until(DEADLINE, "the refused connections to be logged", || {
        let l = log();
        refusals.iter().all(|(n, status)| {
            l.lines().any(|line| {
                line.contains(&format!("server={n}"))
                    && line.contains("Cannot reconnect to the OPC UA server")
                    && line.contains(&format!("status={status}"))
            })
        })
    })
    .with_context(log)?;
    let m = by_stream(d)?;
    for refused in ["wrong-password", "untrusted-server", "untrusted-agent"] {
        let good_ones = m.get(&format!("{refused}/ns=2;s=Counter")).map_or(0, |v| {
            v.iter().filter(|e| e.quality == Quality::Good).count()
        });
        ensure!(
            good_ones == 0,
            "{refused}: {good_ones} good samples; the connection should have been refused\n{}",
            log()
        );
    }
    drop(server);
    Ok(())
}

#[test]
fn a_restarted_server_is_subscribed_again_with_bad_quality_while_away() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let args = vec!["--tick".to_string(), "100".to_string()];
    let mut server = UaServer::start(d, &args)?;
    let mut agent = Agent::start(
        d,
        &agent_toml(&format!(
            r#"
[[opcua.servers]]
name = "ua"
endpoint = "{}"
publishing_interval = "100ms"
reconnect_min = "200ms"
reconnect_max = "1s"
[[opcua.servers.nodes]]
node_id = "ns=2;s=Counter"
stream = "ua/counter"
"#,
            server.endpoint()
        )),
    )?;
    let counter = |d: &Path| -> Vec<EventBody> {
        by_stream(d)
            .ok()
            .and_then(|mut m| m.remove("ua/counter"))
            .unwrap_or_default()
    };
    wait_until(DEADLINE, "counter samples", || counter(d).len() >= 5)?;
    server.proc.kill9();
    wait_until(DEADLINE, "a bad sample once the server is gone", || {
        counter(d)
            .last()
            .is_some_and(|e| e.quality == Quality::Bad(Reason::Disconnected))
    })?;
    let before = counter(d).len();
    let port = server.port;
    let args = server.args.clone();
    let log = server.log.clone();
    drop(server);
    let _server = UaServer::start_on(d, port, &args)
        .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
    wait_until(DEADLINE, "five good samples after the restart", || {
        counter(d)[before..]
            .iter()
            .filter(|e| e.quality == Quality::Good)
            .count()
            >= 5
    })
    .with_context(|| std::fs::read_to_string(d.join("agent.log")).unwrap_or_default())?;
    ensure!(agent.proc.is_running(), "the agent exited");
    let events = counter(d);
    let bad = events
        .iter()
        .filter(|e| e.quality == Quality::Bad(Reason::Disconnected))
        .count();
    ensure!(
        bad == 1,
        "one bad sample while the server was away, not {bad}"
    );
    // The restarted server counts from 1 again: its samples are new ones.
    let after: Vec<_> = events[before..].iter().map(|e| e.value.clone()).collect();
    ensure!(
        after.iter().all(|v| matches!(v, Value::I64(n) if *n >= 0)),
        "{after:?}"
    );
    Ok(())
}

#[test]
fn a_cut_link_loses_no_change_the_server_kept() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    // The counter goes up by one every 100 ms; the agent sees it through a
    // proxy that resets the connection, both ways, while the server keeps
    // the session, its subscription and up to 100 queued changes.
    let server = UaServer::start(d, &["--tick".into(), "100".into()])?;
    let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], server.port));
    let proxy = outpost_tests::tcp_proxy::TcpProxy::start(upstream)?;
    let _agent = Agent::start(
        d,
        &agent_toml(&format!(
            r#"
[[opcua.servers]]
name = "ua"
endpoint = "opc.tcp://{}/outpost/"
publishing_interval = "100ms"
reconnect_min = "100ms"
reconnect_max = "500ms"
[[opcua.servers.nodes]]
node_id = "ns=2;s=Counter"
stream = "ua/counter"
queue_size = 100
"#,
            proxy.addr()
        )),
    )?;
    let good = |d: &Path| -> Vec<i64> {
        by_stream(d)
            .ok()
            .and_then(|mut m| m.remove("ua/counter"))
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.quality == Quality::Good)
            .filter_map(|e| match e.value {
                Value::I64(n) => Some(n),
                _ => None,
            })
            .collect()
    };
    wait_until(DEADLINE, "counter samples", || good(d).len() >= 5)?;
    let mut cuts = 0;
    for _ in 0..5 {
        let seen = good(d).len();
        wait_until(DEADLINE, "samples after the last cut", || {
            good(d).len() >= seen + 3
        })?;
        cuts += proxy.cut_all().len();
    }
    ensure!(cuts >= 5, "only {cuts} connections were cut");
    let last = *good(d).last().context("no samples")?;
    wait_until(DEADLINE, "the counter to pass the last cut", || {
        good(d).last().is_some_and(|&n| n >= last + 10)
    })?;
    let values = good(d);
    let first = values[0];
    let missing: Vec<i64> = (first..=*values.last().unwrap_or(&first))
        .filter(|n| !values.contains(n))
        .collect();
    ensure!(
        missing.is_empty(),
        "{} counter values the server kept never arrived: {missing:?}\n{}",
        missing.len(),
        std::fs::read_to_string(d.join("agent.log")).unwrap_or_default()
    );
    // A value is good twice only around a cut: good, bad while away, and
    // good again once the agent is back (a recovery, not a duplicate).
    let all = by_stream(d)?.remove("ua/counter").unwrap_or_default();
    for pair in all.windows(2) {
        ensure!(
            !(pair[0].quality == Quality::Good && pair[0] == pair[1]),
            "a sample was recorded twice in a row: {:?}",
            pair[1]
        );
    }
    Ok(())
}

#[test]
fn ten_thousand_monitored_items_all_report() -> Result<()> {
    const N: usize = 10_000;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let server = UaServer::start(d, &["--scale".into(), N.to_string()])?;
    let mut nodes = String::with_capacity(N * 60);
    for i in 0..N {
        nodes.push_str(&format!(
            "[[opcua.servers.nodes]]\nnode_id = \"ns=2;s=n{i}\"\nstream = \"big/{i}\"\n"
        ));
    }
    let started = Instant::now();
    let _agent = Agent::start(
        d,
        &agent_toml(&format!(
            "[[opcua.servers]]\nname = \"big\"\nendpoint = \"{}\"\n{nodes}",
            server.endpoint()
        )),
    )?;
    wait_until(DEADLINE, "a sample of each of the 10,000 nodes", || {
        outbox_events(&d.join("data"))
            .map(|e| e.len() >= N)
            .unwrap_or(false)
    })?;
    let events = outbox_events(&d.join("data"))?;
    let mut seen = vec![false; N];
    for e in events.iter().map(|e| &e.body) {
        let i: usize = e.stream.as_str().trim_start_matches("big/").parse()?;
        ensure!(e.quality == Quality::Good, "{}: {:?}", e.stream, e.quality);
        ensure!(
            e.value == Value::F64(i as f64),
            "{}: {:?}",
            e.stream,
            e.value
        );
        seen[i] = true;
    }
    ensure!(
        seen.iter().all(|s| *s),
        "{} nodes never reported",
        seen.iter().filter(|s| !**s).count()
    );
    eprintln!("10,000 monitored items reported in {:?}", started.elapsed());
    Ok(())
}

#[test]
fn check_prints_what_it_will_subscribe_and_names_a_bad_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        agent_toml(
            r#"
[[opcua.servers]]
name = "press"
endpoint = "opc.tcp://10.0.0.5:4840"
[[opcua.servers.nodes]]
node_id = "ns=2;s=Temperature"
sampling_interval = "250ms"
deadband = 0.5
queue_size = 20
"#,
        ),
    )?;
    let exe = bin("outpost-agent")?;
    let (code, out, err) = run_cli(&exe, &["check", "--config", &path.display().to_string()])?;
    ensure!(code == 0, "check failed: {err}");
    ensure!(
        out.contains("opcua press opc.tcp://10.0.0.5:4840 security None/None identity anonymous"),
        "{out}"
    );
    ensure!(out.contains("subscribe ns=2;s=Temperature -> press/ns=2;s=Temperature sampling 250ms queue 20 deadband 0.5"), "{out}");
    std::fs::write(
        &path,
        agent_toml(
            r#"
[[opcua.servers]]
name = "press"
endpoint = "opc.tcp://10.0.0.5:4840"
security_policy = "Basic256Sha256"
security_mode = "SignAndEncrypt"
[[opcua.servers.nodes]]
node_id = "ns=2;s=Temperature"
"#,
        ),
    )?;
    let (code, _, err) = run_cli(&exe, &["check", "--config", &path.display().to_string()])?;
    ensure!(code == 2, "exit {code}: {err}");
    ensure!(
        err.contains("opcua.servers[0].certificate") && err.lines().count() == 1,
        "{err}"
    );
    std::fs::write(
        &path,
        agent_toml("[[opcua.servers]]\nname = \"p\"\nendpoint = \"opc.tcp://h:1\"\n[[opcua.servers.nodes]]\nnode_id = \"ns=2;x=1\"\n"),
    )?;
    let (code, _, err) = run_cli(&exe, &["check", "--config", &path.display().to_string()])?;
    ensure!(
        code == 2 && err.contains("opcua.servers[0].nodes[0].node_id"),
        "exit {code}: {err}"
    );
    Ok(())
}
