//! The agent against a real Modbus RTU device on a serial line: pymodbus, an
//! implementation independent of the agent's, serves RTU on one end of a pty
//! pair made by socat, and the agent opens the other end with tokio-serial as
//! it would open `/dev/ttyUSB0`. The registers are encoded by the Python
//! script with `struct`, not by the agent's codec.
//!
//! Every wait polls the outbox until a deadline; nothing sleeps for a fixed
//! time to let something happen.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use outpost_protocols::{Event, Quality, Reason, Value};
use outpost_tests::{outbox_events, wait_until, Agent, Proc, SerialLine};

/// The device name, the first part of every stream.
const DEVICE: &str = "meter";

/// How long any one condition may take to come true. A poll of the serial
/// line takes a few hundred milliseconds here; this leaves room for a loaded
/// 2-core CI machine.
const DEADLINE: Duration = Duration::from_secs(90);

/// The line's speed, on both ends. A pty ignores it, but both ends must agree
/// and the agent sets it on the port as it would on a real one.
const BAUD: u32 = 19_200;

/// The unit id the device answers to.
const UNIT: u8 = 1;

/// One tag of the agent's config and the value the device holds for it.
struct Point {
    name: &'static str,
    table: &'static str,
    address: u16,
    data_type: &'static str,
    order: &'static str,
    /// For strings, their length in registers.
    length: u16,
    value: Value,
}

impl Point {
    /// The point as an entry of `pymodbus_server.py`'s JSON: the typed value,
    /// for Python to encode itself.
    fn peer_json(&self) -> serde_json::Value {
        serde_json::json!({
            "table": self.table,
            "address": self.address,
            "type": self.data_type,
            "order": self.order,
            "length": self.length,
            "value": self.value.to_json(),
        })
    }

    /// The point as a `[[modbus.devices.tags]]` entry of the agent's config.
    fn tag_toml(&self) -> String {
        let mut s = format!(
            "[[modbus.devices.tags]]\nname = \"{}\"\ntable = \"{}\"\naddress = {}\ntype = \"{}\"\n",
            self.name, self.table, self.address, self.data_type
        );
        if !matches!(self.table, "coil" | "discrete") {
            s.push_str(&format!("order = \"{}\"\n", self.order));
        }
        if self.data_type == "string" {
            s.push_str(&format!("length = {}\n", self.length));
        }
        s.push('\n');
        s
    }
}

/// A handful of types and byte orders over both register tables and the
/// coils, in more than one read. The values have distinct bytes, so a mix-up
/// of bytes or registers changes them; the floats are exact in binary.
fn points() -> Vec<Point> {
    let point = |name, table, address, data_type, order, length, value| Point {
        name,
        table,
        address,
        data_type,
        order,
        length,
        value,
    };
    vec![
        point("level", "holding", 0, "u16", "abcd", 0, Value::U64(0xA1B2)),
        point(
            "count",
            "holding",
            1,
            "i32",
            "cdab",
            0,
            Value::I64(-1_234_567_890),
        ),
        point(
            "energy",
            "holding",
            3,
            "f64",
            "dcba",
            0,
            Value::F64(-1234.5678),
        ),
        point(
            "serial",
            "holding",
            7,
            "string",
            "abcd",
            5,
            Value::String("Outpost-1".into()),
        ),
        point(
            "temperature",
            "input",
            10,
            "f32",
            "abcd",
            0,
            Value::F64(12345.6875),
        ),
        point("running", "coil", 2, "bool", "abcd", 0, Value::Bool(true)),
        point("fault", "coil", 9, "bool", "abcd", 0, Value::Bool(false)),
        point("alarm", "coil", 10, "bool", "abcd", 0, Value::Bool(true)),
    ]
}

/// The agent's config: one RTU device on `port` polling `unit`, waiting
/// `timeout` for each reply, with `tags`.
fn agent_config(port: &Path, unit: u8, timeout: &str, tags: &str) -> String {
    format!(
        r#"
[agent]
data_dir = "data"

[observability]
metrics = ""
log = "info"

[[modbus.devices]]
name = "{DEVICE}"
transport = "rtu"
port = "{}"
baud = {BAUD}
parity = "none"
data_bits = 8
stop_bits = 1
unit = {unit}
poll = "200ms"
timeout = "{timeout}"
retries = 1
backoff = "100ms"
backoff_max = "1s"

{tags}"#,
        port.display()
    )
}

/// `tests/peers/pymodbus_server.py` serving RTU on one end of a serial line.
struct PymodbusRtu {
    _proc: Proc,
    log: PathBuf,
}

impl PymodbusRtu {
    /// Starts the server on `port` and waits until it says it serves. Fails,
    /// rather than skips, if Python, pymodbus or pyserial is missing:
    /// tests/run installs them.
    fn start(dir: &Path, port: &Path, points: &[Point]) -> Result<PymodbusRtu> {
        let python = std::env::var("OUTPOST_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("peers")
            .join("pymodbus_server.py");
        let json: Vec<serde_json::Value> = points.iter().map(Point::peer_json).collect();
        let points_file = dir.join("pymodbus-points.json");
        std::fs::write(&points_file, serde_json::to_vec_pretty(&json)?)?;
        let log = dir.join("pymodbus.log");
        let mut child = Command::new(&python)
            .arg(&script)
            .arg("--serial")
            .arg(port)
            .arg("--baud")
            .arg(BAUD.to_string())
            .arg("--unit")
            .arg(UNIT.to_string())
            .arg("--points")
            .arg(&points_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot run {python:?}: set OUTPOST_PYTHON to a Python 3 with \
                     pymodbus 3.x and pyserial (tests/run does)"
                )
            })?;
        let stdout = child.stdout.take().context("pymodbus stdout")?;
        let mut proc = Proc {
            child,
            name: "pymodbus".into(),
        };
        // Read the first line on a thread so a server that hangs cannot hang
        // the test; the thread then drains stdout until the server exits.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        let first = rx.recv_timeout(DEADLINE);
        if let Ok(Some(Ok(line))) = &first {
            if line.starts_with("listening ") {
                return Ok(PymodbusRtu { _proc: proc, log });
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut status = None;
        while status.is_none() && Instant::now() < deadline {
            status = proc.child.try_wait()?;
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "the pymodbus RTU server did not start (first line {first:?}, exit {status:?}):\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    }

    /// What the server wrote on stderr so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The outbox so far; empty until the agent has created it.
fn events(dir: &Path) -> Vec<Event> {
    outbox_events(&dir.join("data")).unwrap_or_default()
}

fn of<'a>(events: &'a [Event], tag: &str) -> impl Iterator<Item = &'a Event> + 'a {
    let stream = format!("{DEVICE}/{tag}");
    events
        .iter()
        .filter(move |e| e.body.stream.as_str() == stream)
}

fn good<'a>(events: &'a [Event], tag: &str) -> impl Iterator<Item = &'a Event> + 'a {
    of(events, tag).filter(|e| e.body.quality == Quality::Good)
}

/// The end of the agent's log, for failure messages.
fn agent_log(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let from = lines.len().saturating_sub(30);
    format!("last lines of agent.log:\n{}", lines[from..].join("\n"))
}

/// Waits for `cond` over the outbox's events, naming `what` and showing the
/// agent's log if it never holds.
fn wait_for_events(dir: &Path, what: &str, mut cond: impl FnMut(&[Event]) -> bool) -> Result<()> {
    wait_until(DEADLINE, what, || cond(&events(dir))).with_context(|| agent_log(dir))
}

/// Floats compare by bits so that a sign or a NaN payload cannot pass unseen.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::F64(x), Value::F64(y)) => x.to_bits() == y.to_bits(),
        _ => a == b,
    }
}

#[test]
fn an_rtu_device_over_a_serial_line_reads_back_every_type() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let line = SerialLine::start(dir.path())?;
    let points = points();
    let _device = PymodbusRtu::start(dir.path(), &line.b, &points)?;
    let tags: String = points.iter().map(Point::tag_toml).collect();
    let mut agent = Agent::start(dir.path(), &agent_config(&line.a, UNIT, "1s", &tags))?;

    // Three good samples of every tag: the line keeps working poll after
    // poll, not only once.
    wait_for_events(dir.path(), "three good samples of every tag", |ev| {
        points.iter().all(|p| good(ev, p.name).count() >= 3)
    })?;
    let ev = events(dir.path());
    let mut wrong = Vec::new();
    for p in &points {
        if let Some(e) = of(&ev, p.name).find(|e| !same(&e.body.value, &p.value)) {
            wrong.push(format!(
                "{DEVICE}/{} ({} {} @{} {}): wrote {:?}, read {:?} ({:?})",
                p.name,
                p.table,
                p.data_type,
                p.address,
                p.order,
                p.value,
                e.body.value,
                e.body.quality
            ));
        }
    }
    ensure!(
        wrong.is_empty(),
        "{} of {} tags read back wrong or bad:\n{}",
        wrong.len(),
        points.len(),
        wrong.join("\n")
    );
    assert!(agent.proc.is_running(), "the agent exited");
    let status = agent.proc.term(Duration::from_secs(30))?;
    assert!(status.success(), "agent exit status {status}");
    Ok(())
}

#[test]
fn a_unit_id_that_nobody_answers_times_out_as_bad_quality() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let line = SerialLine::start(dir.path())?;
    let points = points();
    let device = PymodbusRtu::start(dir.path(), &line.b, &points)?;
    // The same tags, asked of unit 7: the device on the line hears every
    // request and, as on a real RS-485 bus, answers only its own unit id.
    // Nothing is late here, only absent, so a short timeout keeps it quick.
    let tags: String = points.iter().map(Point::tag_toml).collect();
    let mut agent = Agent::start(dir.path(), &agent_config(&line.a, 7, "500ms", &tags))?;

    wait_for_events(dir.path(), "a bad sample of every tag", |ev| {
        points.iter().all(|p| of(ev, p.name).next().is_some())
    })?;
    // The requests reached the device: this is silence, not a dead line.
    ensure!(
        device.log().contains("not answering a request for unit 7"),
        "the device never saw a request for unit 7:\n{}\n{}",
        device.log(),
        agent_log(dir.path())
    );
    // Let a few more polls run, then check nothing else was recorded: a
    // lasting timeout is recorded once, when the quality changes.
    let requests = |log: &str| log.matches("not answering a request for unit 7").count();
    let seen = requests(&device.log());
    wait_until(DEADLINE, "five more requests to unit 7", || {
        requests(&device.log()) >= seen + 5
    })
    .with_context(|| agent_log(dir.path()))?;
    let ev = events(dir.path());
    for p in &points {
        let samples: Vec<&Quality> = of(&ev, p.name).map(|e| &e.body.quality).collect();
        // Two reads in a row time out, the device is then taken as gone, and
        // the reads after them in the same poll get the same reason without
        // being sent (agent/src/sources/modbus/source.rs, `run_inner`).
        assert_eq!(
            samples,
            [&Quality::Bad(Reason::Timeout)],
            "{DEVICE}/{}: a unit nobody answers is one timeout sample",
            p.name
        );
    }
    assert!(agent.proc.is_running(), "the agent exited");
    let status = agent.proc.term(Duration::from_secs(30))?;
    assert!(status.success(), "agent exit status {status}");
    Ok(())
}
