//! The hub's web dashboard in a real browser: Debian's Chromium, headless,
//! driven by Playwright (`tests/dashboard/dashboard_test.py`) against a
//! real `outpost-hub run` with real agents fed by Mosquitto and by pymodbus.
//!
//! The script does what an operator does in the page (signs in with a
//! pasted token, reads the fleet, proposes and approves a policy, reads the
//! audit trail) and asks this test, on its stdout, for what only the test
//! can do: kill an agent with SIGKILL and start it again. This test answers
//! on the script's stdin once it has. The script fails (exit 1, the reason
//! on stderr) when the page does not show what it must within its deadline.
//!
//! Screenshots of every page go to the test's folder, or to
//! `$OUTPOST_DASHBOARD_SHOTS` (the committed ones in `docs/dashboard/` are
//! made with `OUTPOST_DASHBOARD_SHOTS=$PWD/docs/dashboard`).
//!
//! Needs Python with `playwright` and Debian's `chromium` (tests/run
//! installs both; Playwright's own browser download is not used).

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use outpost_hub::store::{Store, Synchronous};
use outpost_protocols::{AgentId, EventBody, Quality, Seq, StreamName, Timestamp, Value};
use outpost_tests::{free_port, http, wait_until, Agent, Hub, Mosquitto, Pki, Proc};
use rumqttc::{AsyncClient, MqttOptions, QoS};

/// How long any one condition may take on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(90);

/// How long the whole browser script may run.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(600);

fn python() -> String {
    std::env::var("OUTPOST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Debian's Chromium (`OUTPOST_CHROMIUM` overrides).
fn chromium() -> Result<String> {
    let path = std::env::var("OUTPOST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    ensure!(
        Path::new(&path).exists(),
        "no Chromium at {path}: tests/run installs Debian's chromium package \
         (apt-get install chromium), or set OUTPOST_CHROMIUM"
    );
    Ok(path)
}

/// A new static API token of `hub` named `name` with `role`.
fn token(hub: &Hub, role: &str, name: &str) -> Result<String> {
    let (code, out, err) = hub.cli(&["token", "create", "--name", name, "--role", role])?;
    ensure!(code == 0, "token create: {err}");
    Ok(out
        .lines()
        .next()
        .context("no token printed")?
        .trim()
        .to_owned())
}

/// The config of agent `id` with `labels`, forwarding `plant/#` from the
/// broker on `broker` and, with `modbus`, polling one holding register of
/// the device there.
fn agent_config(
    id: &str,
    labels: &str,
    broker: u16,
    modbus: Option<SocketAddr>,
    hub: &Hub,
    creds: &Path,
) -> String {
    let modbus = modbus.map_or(String::new(), |addr| {
        format!(
            r#"
[[modbus.devices]]
name = "press"
address = "{addr}"
unit = 1
poll = "500ms"
timeout = "300ms"

[[modbus.devices.tags]]
name = "pressure"
table = "holding"
address = 0
type = "u16"
"#
        )
    });
    format!(
        r#"
[agent]
data_dir = "data"
id = "{id}"
labels = {{ {labels} }}

[outbox]
commit_window = "1ms"

[uplink]
hub = "{hub}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
reconnect_min = "100ms"
reconnect_max = "1s"

[mqtt]
broker = "127.0.0.1:{broker}"
client_id = "dashboard-e2e-{id}"
reconnect_min = "50ms"
reconnect_max = "500ms"

[[mqtt.subscribe]]
filter = "plant/#"
qos = 1

[observability]
metrics = ""
log = "info"
{modbus}"#,
        hub = hub.addr,
        ca = creds.join("ca.pem").display(),
        cert = creds.join("agent.pem").display(),
        key = creds.join("agent.key").display(),
    )
}

/// Publishes a temperature and a debug reading every 200 ms until dropped.
struct Plant {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<Result<()>>>,
}

impl Plant {
    fn start(port: u16) -> Plant {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut o = MqttOptions::new("dashboard-plant", "127.0.0.1", port);
                o.set_keep_alive(Duration::from_secs(5));
                let (client, mut el) = AsyncClient::new(o, 100);
                let driver = tokio::spawn(async move { while el.poll().await.is_ok() {} });
                let mut n = 0u64;
                while !flag.load(Ordering::Relaxed) {
                    n += 1;
                    let t = format!("{{\"v\": {}}}", 20.0 + (n % 10) as f64 / 4.0);
                    let _ = client
                        .publish("plant/line1/temp", QoS::AtLeastOnce, false, t)
                        .await;
                    let _ = client
                        .publish("plant/line1/debug", QoS::AtLeastOnce, false, format!("{n}"))
                        .await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                driver.abort();
                Ok(())
            })
        });
        Plant {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Plant {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `tests/peers/pymodbus_server.py` serving one holding register.
fn pymodbus(dir: &Path) -> Result<(Proc, SocketAddr)> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("peers")
        .join("pymodbus_server.py");
    let points = dir.join("pymodbus-points.json");
    std::fs::write(
        &points,
        r#"[{"table": "holding", "address": 0, "type": "u16", "order": "abcd", "length": 0, "value": 731}]"#,
    )?;
    let port = free_port()?;
    let mut child = Command::new(python())
        .arg(&script)
        .args(["--port", &port.to_string(), "--points"])
        .arg(&points)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("pymodbus.log"))?)
        .spawn()
        .context("cannot run python3 with pymodbus (tests/run installs it)")?;
    let stdout = child.stdout.take().context("pymodbus stdout")?;
    let proc = Proc {
        child,
        name: "pymodbus".into(),
    };
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        for _ in lines {}
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(Some(Ok(l))) if l.starts_with("listening ") => {
            Ok((proc, SocketAddr::from(([127, 0, 0, 1], port))))
        }
        other => bail!(
            "pymodbus did not start ({other:?}): {}",
            std::fs::read_to_string(dir.join("pymodbus.log")).unwrap_or_default()
        ),
    }
}

/// The browser script, running: its requests on stdout, our answers on its
/// stdin; killed on drop.
struct Script {
    proc: Proc,
    lines: mpsc::Receiver<String>,
    stderr: PathBuf,
}

impl Script {
    fn start(dir: &Path, scenario: &str, env: &[(&str, String)]) -> Result<Script> {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("dashboard")
            .join("dashboard_test.py");
        let shots = std::env::var("OUTPOST_DASHBOARD_SHOTS")
            .map(PathBuf::from)
            .unwrap_or_else(|_| dir.join("shots"));
        std::fs::create_dir_all(&shots)?;
        let stderr = dir.join(format!("browser-{scenario}.log"));
        let mut cmd = Command::new(python());
        cmd.arg(&script)
            .arg(scenario)
            .env("OUTPOST_CHROMIUM", chromium()?)
            .env("SHOTS", &shots)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr)?);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .context("cannot run python3 (tests/run installs playwright)")?;
        let stdout = child.stdout.take().context("script stdout")?;
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Ok(Script {
            proc: Proc {
                child,
                name: "dashboard_test.py".into(),
            },
            lines,
            stderr,
        })
    }

    /// The script's next request; `None` once it has exited (its status
    /// checked by [`Script::finish`]).
    fn next(&mut self, deadline: Instant) -> Result<Option<String>> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(l) => Ok(Some(l)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Ok(None),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!(
                    "the browser script ran over {SCRIPT_DEADLINE:?}:\n{}",
                    self.log()
                )
            }
        }
    }

    fn answer(&mut self, text: &str) -> Result<()> {
        let stdin = self.proc.child.stdin.as_mut().context("script stdin")?;
        writeln!(stdin, "{text}")?;
        stdin.flush()?;
        Ok(())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn finish(mut self) -> Result<()> {
        let status = self.proc.child.wait()?;
        ensure!(
            status.success(),
            "the browser script failed ({status}):\n{}",
            self.log()
        );
        // What it measured, for `--nocapture`.
        eprint!("{}", self.log());
        Ok(())
    }
}

#[test]
fn an_operator_runs_the_fleet_from_the_dashboard() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let broker = Mosquitto::start(dir.path())?;
    let (_modbus, device) = pymodbus(dir.path())?;
    // The sink's own broker (the cloud's), which the script has stopped and
    // started again while the plant's keeps feeding the agents.
    let sink_dir = dir.path().join("sink-broker");
    std::fs::create_dir_all(&sink_dir)?;
    let mut sink_broker = Some(Mosquitto::start(&sink_dir)?);
    let sink_port = sink_broker.as_ref().context("sink broker")?.port;
    // Two-person approval, one MQTT sink on the cloud's broker, enrollment.
    let tables = format!(
        "[api]\nlisten = \"127.0.0.1:0\"\npolicy_approval = \"two-person\"\n\n\
         [enroll]\nca_dir = \"{ca}\"\n\n\
         [[sinks]]\nid = \"cloud-mqtt\"\nkind = \"mqtt\"\nregion = \"eu-west\"\n\
         retry_min = \"100ms\"\nretry_max = \"500ms\"\n\
         [sinks.mqtt]\nbroker = \"127.0.0.1:{port}\"\nclient_id = \"hub-cloud\"\n\
         topic = \"cloud/{{agent_id}}/{{stream}}\"\n",
        ca = pki.ca_dir.display(),
        port = sink_port,
    );
    let hub = Hub::start_with_tables(dir.path(), &pki, "region = \"eu-west\"", &tables)?;
    let api = hub.api_url()?;
    let viewer = token(&hub, "viewer", "vera")?;
    let author = token(&hub, "policy-author", "alice")?;
    let approver = token(&hub, "approver", "bob")?;
    let admin = token(&hub, "admin", "root")?;

    // Three agents: two on the broker, one also polling pymodbus.
    let specs = [
        ("gw-1", "site = \"north\", line = \"1\"", None),
        ("gw-2", "site = \"north\", line = \"2\"", None),
        ("gw-3", "site = \"south\", line = \"1\"", Some(device)),
    ];
    let mut agents = BTreeMap::new();
    for (id, labels, modbus) in specs {
        let creds = pki.issue_agent(id)?;
        let adir = dir.path().join(id);
        std::fs::create_dir_all(&adir)?;
        let cfg = agent_config(id, labels, broker.port, modbus, &hub, &creds);
        agents.insert(id.to_owned(), Agent::start(&adir, &cfg)?);
    }
    let mut plant = Some(Plant::start(broker.port));
    // Version 1, applied on the hub's machine (break-glass), so that the
    // page has two versions to compare once the approved one is in force.
    let first = dir.path().join("first.toml");
    std::fs::write(&first, "description = \"keep everything\"\n")?;
    let (code, _, err) = hub.cli(&["policy", "apply", first.to_str().context("utf-8")?])?;
    ensure!(code == 0, "policy apply: {err}");
    wait_until(DEADLINE, "every agent connected", || {
        hub.fleet()
            .is_ok_and(|f| f.len() == 3 && f.iter().all(|a| a["connected"] == true))
    })?;

    let mut script = Script::start(
        dir.path(),
        "operator",
        &[
            ("HUB_URL", api.clone()),
            ("AGENTS", "gw-1,gw-2,gw-3".into()),
            ("TOKEN_VIEWER", viewer.clone()),
            ("TOKEN_AUTHOR", author),
            ("TOKEN_APPROVER", approver),
            ("TOKEN_ADMIN", admin),
        ],
    )?;
    let deadline = Instant::now() + SCRIPT_DEADLINE;
    while let Some(line) = script.next(deadline)? {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("stop"), Some("sink-broker")) => {
                if let Some(mut b) = sink_broker.take() {
                    b.proc.kill9();
                }
                script.answer("stopped")?;
            }
            (Some("start"), Some("sink-broker")) => {
                sink_broker = Some(Mosquitto::start_on(&sink_dir, sink_port)?);
                script.answer("started")?;
            }
            (Some("quiesce"), None) => {
                drop(plant.take());
                for a in agents.values_mut() {
                    a.proc.term(DEADLINE)?;
                }
                script.answer("quiet")?;
            }
            (Some("kpis"), Some(_)) => {
                let shown: serde_json::Value =
                    serde_json::from_str(line.trim_start_matches("kpis").trim())?;
                let answer = match compare_kpis(&shown, &hub.metrics()?) {
                    Ok(()) => "equal".to_owned(),
                    Err(e) => format!("differ {e:#}"),
                };
                script.answer(&answer)?;
            }
            (Some("kill"), Some(id)) => {
                agents.get_mut(id).context("no such agent")?.proc.kill9();
                script.answer("killed")?;
            }
            (Some("start"), Some(id)) => {
                let cfg = agents.get(id).context("no such agent")?.config.clone();
                agents.insert(id.to_owned(), Agent::start_file(&cfg)?);
                script.answer("started")?;
            }
            _ => eprintln!("browser: {line}"),
        }
    }
    script.finish()?;

    // What the page did is in the store: the approved policy is in force and
    // reached every agent, and the viewer's refused call is audited.
    let shown = http(&api, "GET", "/api/v1/policy", Some(&viewer), None)?.json()?;
    ensure!(shown["version"] == 2, "{shown}");
    wait_until(DEADLINE, "every agent running policy version 2", || {
        hub.fleet()
            .is_ok_and(|f| f.iter().all(|a| a["policy_version"] == 2))
    })?;
    let audit = http(&api, "GET", "/api/v1/audit", Some(&viewer), None)?.json()?;
    let entries = audit["entries"].as_array().context("entries")?;
    for (action, actor) in [
        ("policy.proposed", "token:alice"),
        ("policy.approved", "token:bob"),
        ("api.refused", "token:vera"),
    ] {
        ensure!(
            entries
                .iter()
                .any(|e| e["action"] == action && e["actor"] == actor),
            "no {action} by {actor} in {audit}"
        );
    }
    Ok(())
}

/// The samples of metric `name` in Prometheus text `text`: each one's
/// labels and value.
fn samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = series.split_once('{').unwrap_or((series, "}"));
            if metric != name {
                return None;
            }
            let labels = labels
                .trim_end_matches('}')
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
                .collect();
            Some((labels, value.parse().ok()?))
        })
        .collect()
}

/// `histogram_quantile(q, ...)` of one series' cumulative buckets.
fn histogram_quantile(q: f64, mut buckets: Vec<(f64, f64)>) -> Option<f64> {
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (upper, cumulative) in buckets {
        if cumulative >= rank && cumulative > below {
            if upper.is_infinite() {
                return Some(lower);
            }
            return Some(lower + (upper - lower) * (rank - below) / (cumulative - below));
        }
        below = cumulative;
        lower = upper;
    }
    Some(lower)
}

/// Whether the numbers the dashboard's KPI panel shows (`shown`: stored,
/// dropped, and per sink delivered, p50, p95, p99, count) equal the hub's
/// Prometheus scrape `metrics`.
fn compare_kpis(shown: &serde_json::Value, metrics: &str) -> Result<()> {
    let sum = |name: &str| samples(metrics, name).iter().map(|(_, v)| v).sum::<f64>();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0);
    let mut wrong = Vec::new();
    let mut check = |what: String, page: Option<f64>, prom: Option<f64>| match (page, prom) {
        (Some(a), Some(b)) if close(a, b) => {}
        (None, None) => {}
        _ => wrong.push(format!("{what}: page {page:?}, Prometheus {prom:?}")),
    };
    check(
        "stored".into(),
        shown["stored"].as_f64(),
        Some(sum("outpost_hub_events_stored_total")),
    );
    check(
        "dropped".into(),
        shown["dropped"].as_f64(),
        Some(sum("outpost_hub_policy_dropped_events_total")),
    );
    let sinks = shown["sinks"].as_object().context("no sinks shown")?;
    ensure!(!sinks.is_empty(), "no sink on the KPI panel");
    for (sink, s) in sinks {
        let of = |name: &str| {
            samples(metrics, name)
                .into_iter()
                .filter(|(l, _)| l.get("sink") == Some(sink))
                .collect::<Vec<_>>()
        };
        let delivered = of("outpost_hub_sink_delivered_events_total");
        check(
            format!("{sink} delivered"),
            s["delivered"].as_f64(),
            delivered.first().map(|(_, v)| *v),
        );
        let count = of("outpost_hub_sink_latency_seconds_count");
        check(
            format!("{sink} timed"),
            s["count"].as_f64(),
            Some(count.first().map_or(0.0, |(_, v)| *v)),
        );
        let buckets: Vec<(f64, f64)> = of("outpost_hub_sink_latency_seconds_bucket")
            .into_iter()
            .filter_map(|(l, v)| {
                let le = l.get("le")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, v))
            })
            .collect();
        for (key, q) in [("p50", 0.5), ("p95", 0.95), ("p99", 0.99)] {
            check(
                format!("{sink} {key}"),
                s[key].as_f64(),
                histogram_quantile(q, buckets.clone()),
            );
        }
    }
    ensure!(wrong.is_empty(), "{}", wrong.join("; "));
    Ok(())
}

/// Seeds `dir/hub-data/hub.db` with `n` agents (`gw-0000`..), labels
/// `site=site-<i % 4>`, one event each, different backlogs, all offline.
fn seed(dir: &Path, n: usize) -> Result<()> {
    let data = dir.join("hub-data");
    std::fs::create_dir_all(&data)?;
    let key = outpost_hub::audit::key::AuditKey::load_or_create(&data.join("audit.key"))?;
    let mut store = Store::open(&data.join("hub.db"), Synchronous::Normal, key)?;
    for a in 0..n {
        let id = AgentId::parse(&format!("gw-{a:04}"))?;
        let labels = BTreeMap::from([("site".to_owned(), format!("site-{}", a % 4))]);
        store.agent_connected(&id, &labels, "0.1.0", 4, Timestamp(1_000))?;
        let body = EventBody {
            stream: StreamName::parse("plant/temp")?,
            ts: Timestamp(1_000),
            value: Value::F64(a as f64),
            quality: Quality::Good,
            attrs: BTreeMap::new(),
        };
        store.insert(Timestamp(2_000), &[(id.clone(), vec![(Seq(1), body)])])?;
        store.report_backlog(&id, (a as u64 * 37) % 1000, 0)?;
        store.agent_disconnected(&id, Timestamp(3_000))?;
    }
    Ok(())
}

#[test]
fn the_fleet_page_pages_a_fleet_of_1200_on_the_server() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    seed(dir.path(), 1200)?;
    let hub = Hub::start(dir.path(), &pki)?;
    let api = hub.api_url()?;
    let viewer = token(&hub, "viewer", "vera")?;
    // The API pages, filters and sorts, and says how many matched.
    let a = http(
        &api,
        "GET",
        "/api/v1/fleet?label=site=site-1&sort=-backlog&limit=25&offset=25",
        Some(&viewer),
        None,
    )?;
    ensure!(a.status == 200, "{}", String::from_utf8_lossy(&a.body));
    ensure!(a.header("x-total-count") == Some("300"), "{:?}", a.headers);
    let page = a.json()?;
    let page = page.as_array().context("array")?;
    ensure!(page.len() == 25);
    ensure!(page
        .iter()
        .all(|x| x["labels"]["site"] == "site-1" && x["health"] == "offline"));
    let backlogs: Vec<u64> = page
        .iter()
        .filter_map(|x| x["backlog_events"].as_u64())
        .collect();
    ensure!(
        backlogs.len() == 25 && backlogs.windows(2).all(|w| w[0] >= w[1]),
        "{backlogs:?}"
    );
    for bad in [
        "sort=colour",
        "limit=0",
        "limit=1001",
        "health=sleepy",
        "label==x",
    ] {
        let a = http(
            &api,
            "GET",
            &format!("/api/v1/fleet?{bad}"),
            Some(&viewer),
            None,
        )?;
        ensure!(a.status == 400, "{bad}: {}", a.status);
    }
    // The page shows a page of it, quickly, and moves through it.
    let mut script = Script::start(
        dir.path(),
        "large",
        &[("HUB_URL", api), ("TOKEN_VIEWER", viewer)],
    )?;
    let deadline = Instant::now() + SCRIPT_DEADLINE;
    while let Some(line) = script.next(deadline)? {
        eprintln!("browser: {line}");
    }
    script.finish()
}
