//! The agent as a Sparkplug B host application against a real Mosquitto
//! and an edge node whose payloads pysparkplug encodes
//! (`tests/peers/sparkplug_node.py`): births, aliases, node and device
//! data, a seq gap and an unknown alias each drawing a Rebirth NCMD that the
//! node receives, bad protobuf stored as bad quality without stopping the
//! source, and a death marking the node's and its device's metrics stale.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use outpost_protocols::{Event, Quality, Reason, Value};
use outpost_tests::{outbox_events, wait_until, Agent, Mosquitto};

/// How long any one condition may take to come true.
const DEADLINE: Duration = Duration::from_secs(60);

/// The scripted edge node; killed on drop.
struct Node {
    child: Child,
    stdin: ChildStdin,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Node {
    fn start(port: u16, group: &str, node: &str) -> Result<Node> {
        let python = std::env::var("OUTPOST_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("peers")
            .join("sparkplug_node.py");
        let mut child = Command::new(&python)
            .arg(&script)
            .args([
                "--port",
                &port.to_string(),
                "--group",
                group,
                "--node",
                node,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| {
                format!("cannot run {python:?}: set OUTPOST_PYTHON to a Python 3 with pysparkplug")
            })?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = child.stdout.take().context("stdout")?;
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let out = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut v) = out.lock() {
                    v.push(line);
                }
            }
        });
        let n = Node {
            child,
            stdin,
            lines,
        };
        wait_until(DEADLINE, "the node subscribed to its NCMD topic", || {
            n.count("ready") == 1
        })?;
        Ok(n)
    }

    fn count(&self, prefix: &str) -> usize {
        self.lines
            .lock()
            .map(|v| v.iter().filter(|l| l.starts_with(prefix)).count())
            .unwrap_or(0)
    }

    /// Sends one command and waits until the broker has its message.
    fn send(&mut self, cmd: serde_json::Value) -> Result<()> {
        let op = cmd["op"].as_str().context("op")?.to_owned();
        let done = self.count(&format!("ok {op}"));
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        wait_until(DEADLINE, &format!("the broker took {op}"), || {
            self.count(&format!("ok {op}")) > done
        })
    }

    fn ncmds(&self) -> Vec<String> {
        self.lines
            .lock()
            .map(|v| {
                v.iter()
                    .filter(|l| l.starts_with("ncmd "))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent_config(broker: u16) -> String {
    format!(
        r#"
[agent]
data_dir = "data"
id = "e2e"

[outbox]
commit_window = "1ms"

[mqtt]
broker = "127.0.0.1:{broker}"
client_id = "sparkplug-host"
reconnect_min = "50ms"
reconnect_max = "500ms"
keep_alive = "5s"

[[mqtt.subscribe]]
filter = "probe/#"
qos = 1

[[mqtt.sparkplug]]
group = "plant1"
rebirth_interval = "30s"

[observability]
metrics = ""
log = "info"
"#
    )
}

/// The events of `stream` in the outbox, oldest first.
fn events_of(dir: &Path, stream: &str) -> Result<Vec<Event>> {
    Ok(outbox_events(&dir.join("data"))?
        .into_iter()
        .filter(|e| e.body.stream.as_str() == stream)
        .collect())
}

/// Waits until the newest event of `stream` has this value and quality.
fn wait_value(dir: &Path, stream: &str, value: Value, quality: Quality) -> Result<()> {
    let mut last = None;
    let r = wait_until(
        DEADLINE,
        &format!("{stream} = {value:?} {quality:?}"),
        || {
            let e = events_of(dir, stream).ok().and_then(|v| v.last().cloned());
            let hit = e
                .as_ref()
                .is_some_and(|e| e.body.value == value && e.body.quality == quality);
            last = e;
            hit
        },
    );
    r.with_context(|| format!("newest event of {stream}: {last:?}"))
}

fn m(name: Option<&str>, alias: u64, ty: &str, value: serde_json::Value) -> serde_json::Value {
    let mut j = serde_json::json!({"alias": alias, "type": ty, "value": value});
    if let Some(n) = name {
        j["name"] = n.into();
    }
    j
}

#[test]
fn a_sparkplug_node_is_read_rebirthed_on_gaps_and_marked_stale_on_death() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let broker = Mosquitto::start(dir.path())?;
    let mut agent = Agent::start(dir.path(), &agent_config(broker.port))?;
    // The subscriptions go in one SUBSCRIBE: once a probe is stored, the
    // Sparkplug filter is in place too.
    wait_until(DEADLINE, "a probe stored", || {
        let _ = Command::new("mosquitto_pub")
            .args([
                "-p",
                &broker.port.to_string(),
                "-q",
                "1",
                "-t",
                "probe/x",
                "-m",
                "1",
            ])
            .status();
        events_of(dir.path(), "probe/x").is_ok_and(|v| !v.is_empty())
    })?;
    let mut node = Node::start(broker.port, "plant1", "gw")?;

    // Births with aliases, then data by alias only.
    node.send(
        serde_json::json!({"op": "nbirth", "seq": 0, "bdseq": 1, "metrics": [
            m(Some("temp"), 1, "DOUBLE", 20.5.into()),
            m(Some("count"), 2, "INT8", (-3).into()),
            m(Some("mode"), 3, "STRING", "auto".into()),
        ]}),
    )?;
    node.send(serde_json::json!({"op": "ndata", "seq": 1, "metrics": [
        m(None, 1, "DOUBLE", 21.0.into()),
        m(None, 2, "INT8", (-4).into()),
    ]}))?;
    node.send(
        serde_json::json!({"op": "dbirth", "seq": 2, "device": "press1", "metrics": [
            m(Some("rpm"), 10, "UINT32", 1500.into()),
            m(Some("on"), 11, "BOOLEAN", true.into()),
        ]}),
    )?;
    node.send(
        serde_json::json!({"op": "ddata", "seq": 3, "device": "press1", "metrics": [
            m(None, 10, "UINT32", 1600.into()),
        ]}),
    )?;
    let d = dir.path();
    wait_value(d, "plant1/gw/temp", Value::F64(21.0), Quality::Good)?;
    wait_value(d, "plant1/gw/count", Value::I64(-4), Quality::Good)?;
    wait_value(
        d,
        "plant1/gw/mode",
        Value::String("auto".into()),
        Quality::Good,
    )?;
    wait_value(d, "plant1/gw/press1/rpm", Value::U64(1600), Quality::Good)?;
    wait_value(d, "plant1/gw/press1/on", Value::Bool(true), Quality::Good)?;
    let temps: Vec<Value> = events_of(d, "plant1/gw/temp")?
        .into_iter()
        .map(|e| e.body.value)
        .collect();
    ensure!(
        temps == vec![Value::F64(20.5), Value::F64(21.0)],
        "{temps:?}"
    );
    // The metric's own timestamp (pysparkplug's, in ms) is the event's.
    let ts = events_of(d, "plant1/gw/temp")?[0].body.ts.0;
    ensure!(ts == 1_796_558_400_000_000_000, "ts {ts}");
    ensure!(
        node.ncmds().is_empty(),
        "no rebirth yet: {:?}",
        node.ncmds()
    );

    // A seq gap (4 was due) draws a Rebirth; the data still counts.
    node.send(serde_json::json!({"op": "ndata", "seq": 7, "metrics": [
        m(None, 1, "DOUBLE", 22.0.into()),
    ]}))?;
    wait_until(DEADLINE, "the node got a Rebirth NCMD", || {
        node.ncmds().len() == 1
    })?;
    let ncmd = &node.ncmds()[0];
    ensure!(
        ncmd == "ncmd spBv1.0/plant1/NCMD/gw {\"Node Control/Rebirth\": true}",
        "{ncmd}"
    );
    wait_value(d, "plant1/gw/temp", Value::F64(22.0), Quality::Good)?;

    // The node is reborn (a new session); an unknown alias draws another.
    node.send(
        serde_json::json!({"op": "nbirth", "seq": 0, "bdseq": 2, "metrics": [
            m(Some("temp"), 1, "DOUBLE", 23.0.into()),
        ]}),
    )?;
    node.send(serde_json::json!({"op": "ndata", "seq": 1, "metrics": [
        m(None, 99, "DOUBLE", 0.5.into()),
    ]}))?;
    wait_until(DEADLINE, "a second Rebirth NCMD", || {
        node.ncmds().len() == 2
    })?;

    // Bad protobuf: one bad-quality event with its bytes, and the source
    // goes on.
    node.send(
        serde_json::json!({"op": "raw", "topic": "spBv1.0/plant1/NDATA/gw", "hex": "ffffffff0a"}),
    )?;
    let bad = wait_until(DEADLINE, "the bad payload stored", || {
        events_of(d, "plant1/gw").is_ok_and(|v| !v.is_empty())
    });
    bad?;
    let e = &events_of(d, "plant1/gw")?[0];
    ensure!(
        e.body.value == Value::Bytes(vec![0xff, 0xff, 0xff, 0xff, 0x0a]),
        "{e:?}"
    );
    ensure!(
        matches!(&e.body.quality, Quality::Bad(Reason::Decode(m)) if m.contains("Sparkplug")),
        "{e:?}"
    );
    node.send(
        serde_json::json!({"op": "dbirth", "seq": 2, "device": "press1", "metrics": [
            m(Some("rpm"), 10, "UINT32", 1700.into()),
        ]}),
    )?;
    wait_value(d, "plant1/gw/press1/rpm", Value::U64(1700), Quality::Good)?;

    // A death of an older session changes nothing; the current one's marks
    // the node's and its device's metrics stale, with their last values.
    node.send(serde_json::json!({"op": "ndeath", "bdseq": 1}))?;
    node.send(serde_json::json!({"op": "ndeath", "bdseq": 2}))?;
    let stale = Quality::Uncertain(Reason::Other("node death".into()));
    wait_value(d, "plant1/gw/temp", Value::F64(23.0), stale.clone())?;
    wait_value(d, "plant1/gw/press1/rpm", Value::U64(1700), stale.clone())?;
    let stale_temps = events_of(d, "plant1/gw/temp")?
        .iter()
        .filter(|e| e.body.quality == stale)
        .count();
    ensure!(
        stale_temps == 1,
        "one stale mark from the current session's death"
    );
    ensure!(agent.proc.is_running(), "the agent still runs");
    Ok(())
}
