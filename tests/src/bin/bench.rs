//! `outpost-bench`: measures Outpost against its baselines, side by side in
//! the same run on the same machine, and prints a Markdown table for
//! `docs/benchmarks.md`.
//!
//! ```text
//! cargo build --release --bins
//! cargo run --profile bench -p outpost-tests --bin outpost-bench [-- --quick] [--only policy,mqtt]
//! ```
//!
//! It starts its own peers (Mosquitto, nats-server, `outpost-devsim`,
//! `outpost-agent`, `outpost-hub`) on free ports in a temporary directory.
//! Progress goes to stderr, the report to stdout. Exit status: 0 when every
//! measurement was taken (targets missed or not: it is a report), 1 when one
//! could not be, 2 on bad arguments.
//!
//! Timing is never asserted in unit tests; this binary is where it is measured.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::Parser;

#[path = "../bench/api.rs"]
mod api;
#[path = "../bench/append.rs"]
mod append;
#[path = "../bench/commands.rs"]
mod commands;
#[path = "../bench/door.rs"]
mod door;
#[path = "../bench/modbus.rs"]
mod modbus;
#[path = "../bench/mqtt.rs"]
mod mqtt;
#[path = "../bench/opcua.rs"]
mod opcua;
#[path = "../bench/peers.rs"]
mod peers;
#[path = "../bench/plots.rs"]
mod plots;
#[path = "../bench/policy.rs"]
mod policy;
#[path = "../bench/procfs.rs"]
mod procfs;
#[path = "../bench/procs.rs"]
mod procs;
#[path = "../bench/replicas.rs"]
mod replicas;
#[path = "../bench/report.rs"]
mod report;
#[path = "../bench/sinks.rs"]
mod sinks;
#[path = "../bench/sizes.rs"]
mod sizes;
#[path = "../bench/sparkplug.rs"]
mod sparkplug;
#[path = "../bench/uplink.rs"]
mod uplink;
#[path = "../bench/workload.rs"]
mod workload;

use report::{Row, Verdict};

/// The variable through which `outpost_tests::bin()` finds the binaries;
/// read here too, so that both agree.
const BIN_DIR_VAR: &str = "OUTPOST_BIN_DIR";

/// The static musl agent `cross/build x86_64` makes, under the target
/// directory: what the memory rows measure unless `--memory-agent` says.
const MUSL_AGENT: &str = "x86_64-unknown-linux-musl/release/outpost-agent";

#[derive(Parser, Debug)]
#[command(
    name = "outpost-bench",
    about = "Measure Outpost against its baselines and print a Markdown table."
)]
struct Cli {
    /// Smaller sizes, for a CI smoke run (the whole run takes under a minute).
    #[arg(long)]
    quick: bool,
    /// Where `outpost-agent`, `outpost-devsim` and `outpost-hub` are. Default:
    /// $OUTPOST_BIN_DIR, else target/release if it holds them, else
    /// target/debug. Without a hub there, target/release's is used.
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// Where the temporary directory goes (its file system is what the
    /// durable-append numbers measure). Default: the system's temp dir.
    #[arg(long, value_name = "DIR")]
    tmp_dir: Option<PathBuf>,
    /// Keep the temporary directory (databases, configs, logs) after the run.
    #[arg(long)]
    keep: bool,
    /// The sizes rows build nothing: they read what `cross/build` left in
    /// target/<triple>/release/ (by default they build the aarch64 agents
    /// with `cross/build --agent-only aarch64` first).
    #[arg(long)]
    sizes_no_build: bool,
    /// Where the report (`report.md`, `report.json`) and the figures (SVG)
    /// go. Default: target/outpost-bench. `--out docs/benchmarks` refreshes
    /// the committed figures.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// The agent the memory rows measure. Default: the static musl build
    /// that `cross/build x86_64` makes,
    /// target/x86_64-unknown-linux-musl/release/outpost-agent.
    #[arg(long, value_name = "PATH")]
    memory_agent: Option<PathBuf>,
    /// Take only these measurements (comma-separated); default: all.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "NAME,...")]
    only: Vec<Measurement>,
}

/// The measurements, in the order they run.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Measurement {
    /// Outbox append and the group-commit writer against raw SQLite.
    Append,
    /// MQTT QoS 1 ingest against a bare subscriber.
    Mqtt,
    /// Sparkplug B ingest against a bare subscriber.
    Sparkplug,
    /// The fleet policy: evaluation against the empty policy, and MQTT ingest
    /// with a 1,000-rule policy against none.
    Policy,
    /// Modbus 10,000 tags at 1 Hz.
    Modbus,
    /// OPC UA: 10,000 monitored items at 1 Hz from an asyncua server, the
    /// agent against Node-RED (installed into target/bench-peers).
    Opcua,
    /// Agent memory at 10,000 tags (the static musl build).
    Tags,
    /// Agent memory with a backlog draining to a hub (the static musl build).
    Backlog,
    /// Agent memory idle.
    Idle,
    /// Uplink drain agent → hub against raw quinn.
    Uplink,
    /// Hub ingest from many agents.
    Fleet,
    /// The hub's NATS JetStream and MQTT sinks against bare publishers.
    Sinks,
    /// Hub ingest on the JetStream store: two replicas against one, one
    /// against the SQLite hub.
    Replicas,
    /// Modbus polling CPU and Modbus → MQTT latency against the ThingsBoard
    /// IoT Gateway and Node-RED (installed into target/bench-peers).
    Peers,
    /// Sizes of the static builds.
    Sizes,
    /// The hub's HTTP API: fleet and events latency with 1,000 agents.
    Api,
    /// The hub's door: 10,000 handshakes without a valid certificate while a
    /// real agent connects.
    Door,
    /// A command's round trip: hub → agent → device → result at the hub.
    Commands,
}

/// The sizes of a run.
struct Plan {
    api: api::Params,
    append: append::Params,
    mqtt: mqtt::Params,
    sparkplug: sparkplug::Params,
    policy: policy::Params,
    modbus: modbus::Params,
    uplink: uplink::Params,
    fleet: uplink::FleetParams,
    sinks: sinks::Params,
    replicas: replicas::Params,
    peers: peers::Params,
    door: door::Params,
    opcua: opcua::Params,
    commands: commands::Params,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                api: api::Params {
                    agents: 1000,
                    per_agent: 20,
                    rate: 200,
                    window: Duration::from_secs(5),
                },
                append: append::Params {
                    events: 200_000,
                    batch: 1000,
                    producers: 4,
                    request: 100,
                    reps: 1,
                },
                mqtt: mqtt::Params {
                    messages: 20_000,
                    reps: 1,
                },
                sparkplug: sparkplug::Params {
                    messages: 2_000,
                    reps: 1,
                },
                policy: policy::Params {
                    events: 200_000,
                    reps: 1,
                },
                modbus: modbus::Params {
                    window: Duration::from_secs(8),
                    backlog: 100_000,
                    settle: Duration::from_secs(5),
                },
                uplink: uplink::Params {
                    events: 100_000,
                    reps: 1,
                },
                fleet: uplink::FleetParams {
                    agents: 200,
                    per_agent: 100,
                    dial_spread: Duration::from_secs(1),
                },
                sinks: sinks::Params {
                    events: 5_000,
                    reps: 1,
                },
                replicas: replicas::Params {
                    agents: 40,
                    per_agent: 250,
                    rounds: 1,
                },
                peers: peers::Params {
                    cpu_window: Duration::from_secs(8),
                    latency_window: Duration::from_secs(5),
                },
                door: door::Params {
                    handshakes: 2_000,
                    sources: 50,
                    concurrency: 500,
                },
                opcua: opcua::Params {
                    window: Duration::from_secs(8),
                },
                commands: commands::Params { commands: 30 },
            }
        } else {
            Plan {
                api: api::Params {
                    agents: 1000,
                    per_agent: 20,
                    rate: 200,
                    window: Duration::from_secs(30),
                },
                append: append::Params {
                    events: 1_000_000,
                    batch: 1000,
                    producers: 4,
                    request: 100,
                    reps: 3,
                },
                mqtt: mqtt::Params {
                    messages: 200_000,
                    reps: 3,
                },
                sparkplug: sparkplug::Params {
                    messages: 20_000,
                    reps: 3,
                },
                policy: policy::Params {
                    events: 1_000_000,
                    reps: 3,
                },
                modbus: modbus::Params {
                    window: Duration::from_secs(20),
                    backlog: 1_000_000,
                    settle: Duration::from_secs(10),
                },
                uplink: uplink::Params {
                    events: 1_000_000,
                    reps: 3,
                },
                fleet: uplink::FleetParams {
                    agents: 1_000,
                    per_agent: 1_000,
                    dial_spread: Duration::from_secs(1),
                },
                sinks: sinks::Params {
                    events: 50_000,
                    reps: 3,
                },
                replicas: replicas::Params {
                    agents: 200,
                    per_agent: 1_000,
                    rounds: 3,
                },
                peers: peers::Params {
                    cpu_window: Duration::from_secs(20),
                    latency_window: Duration::from_secs(20),
                },
                door: door::Params {
                    handshakes: 10_000,
                    sources: 100,
                    concurrency: 1_000,
                },
                opcua: opcua::Params {
                    window: Duration::from_secs(20),
                },
                commands: commands::Params { commands: 200 },
            }
        }
    }
}

/// The workspace's target directory, as `outpost_tests::bin_dir` finds it.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
        })
}

/// Which binaries to measure: `--bin-dir`, else `$OUTPOST_BIN_DIR`, else
/// target/release if it holds the agent, else target/debug.
fn choose_bin_dir(cli: &Cli) -> PathBuf {
    if let Some(d) = &cli.bin_dir {
        return d.clone();
    }
    if let Some(d) = std::env::var_os(BIN_DIR_VAR) {
        return PathBuf::from(d);
    }
    let release = target_dir().join("release");
    if release.join("outpost-agent").exists() {
        release
    } else {
        target_dir().join("debug")
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let bin_dir = choose_bin_dir(&cli);
    let bin_dir = bin_dir.canonicalize().unwrap_or(bin_dir);
    match run(&cli, &bin_dir) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Runs every measurement and prints the report; `Ok(false)` if one could
/// not be taken.
fn run(cli: &Cli, bin_dir: &Path) -> Result<bool> {
    let started = Instant::now();
    let plan = Plan::new(cli.quick);
    let mut bins = procs::Bins::in_dir(bin_dir)?;
    if bins.hub.is_none() {
        // An agent-only build (the static musl one): the hub rows use the
        // workspace's release hub.
        let release = target_dir().join("release").join("outpost-hub");
        if release.exists() {
            eprintln!(
                "outpost-bench: no outpost-hub in {}, using {}",
                bin_dir.display(),
                release.display()
            );
            bins.hub = Some(release.canonicalize().unwrap_or(release));
        }
    }
    let agent_version = report::command_line(&bins.agent.display().to_string(), &["--version"]);
    let hub_version = bins.hub.as_ref().map_or("?".into(), |h| {
        report::command_line(&h.display().to_string(), &["--version"])
    });
    let mosquitto_version = report::command_line("/usr/sbin/mosquitto", &["-h"]);
    let debug_build = bin_dir.ends_with("debug");

    let mut tmp = tempfile::Builder::new();
    tmp.prefix("outpost-bench-");
    let tmp = match &cli.tmp_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            tmp.tempdir_in(d)
        }
        None => tmp.tempdir(),
    }
    .context("create the temporary directory")?;
    let dir = tmp.path().to_owned();
    let load_before = report::loadavg();
    eprintln!(
        "outpost-bench: {} run in {}, binaries from {}",
        if cli.quick { "quick" } else { "full" },
        dir.display(),
        bin_dir.display()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the tokio runtime")?;

    let mut rows: Vec<Row> = Vec::new();
    let mut latencies: Vec<peers::LatencySamples> = Vec::new();
    // Each row names the build it measured (issue 24): the agent's, the
    // hub's, or the harness's own for what runs in-process. The memory rows
    // name theirs (the static musl agent).
    let agent_build = format!("agent {}", procs::build_name(&bins.agent));
    let hub_build = bins.hub.as_ref().map_or("hub not found".into(), |h| {
        format!("hub {}", procs::build_name(h))
    });
    let harness_build = format!(
        "in the harness's process, {} profile",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "optimised"
        }
    );
    let build_of = |m: Measurement| -> String {
        use Measurement as M;
        match m {
            M::Append => harness_build.clone(),
            M::Mqtt | M::Sparkplug | M::Modbus | M::Opcua | M::Peers => agent_build.clone(),
            M::Policy => format!("{agent_build}; evaluation {harness_build}"),
            M::Uplink | M::Commands => format!("{agent_build}; {hub_build}"),
            M::Fleet | M::Sinks | M::Replicas | M::Api | M::Door => hub_build.clone(),
            M::Tags | M::Backlog | M::Idle | M::Sizes => String::new(),
        }
    };
    let mut measure = |m: Measurement, what: &str, f: &mut dyn FnMut() -> Result<Vec<Row>>| {
        if !(cli.only.is_empty() || cli.only.contains(&m)) {
            return;
        }
        let t = Instant::now();
        let build = build_of(m);
        match f() {
            Ok(r) => rows.extend(r.into_iter().map(|mut row| {
                if !build.is_empty() && !row.what.contains("(build: ") {
                    row.what = format!("{} (build: {build})", row.what);
                }
                row
            })),
            Err(e) => {
                eprintln!("{what}: could not be measured: {e:#}");
                rows.push(Row::error(what, &e));
            }
        }
        eprintln!("{what}: {:.1} s", t.elapsed().as_secs_f64());
    };
    measure(Measurement::Append, "Outbox append", &mut || {
        let d = dir.join("append");
        std::fs::create_dir_all(&d)?;
        let r = append::run(&rt, &d, plan.append);
        // The databases are large; the later runs do not need them.
        let _ = std::fs::remove_dir_all(&d);
        r
    });
    measure(Measurement::Mqtt, "MQTT QoS 1 ingest", &mut || {
        let d = dir.join("mqtt");
        std::fs::create_dir_all(&d)?;
        mqtt::run(&bins, &d, plan.mqtt)
    });
    measure(Measurement::Sparkplug, "Sparkplug B ingest", &mut || {
        let d = dir.join("sparkplug");
        std::fs::create_dir_all(&d)?;
        sparkplug::run(&bins, &d, plan.sparkplug)
    });
    measure(
        Measurement::Policy,
        "Policy evaluation, 1,000 rules",
        &mut || policy::evaluation(plan.policy),
    );
    measure(
        Measurement::Policy,
        "MQTT ingest with a 1,000-rule policy",
        &mut || {
            let d = dir.join("policy");
            std::fs::create_dir_all(&d)?;
            policy::mqtt_ingest(&bins, &d, plan.mqtt)
        },
    );
    measure(
        Measurement::Modbus,
        "Modbus 10,000 tags at 1 Hz",
        &mut || modbus::poll(&bins, &dir, plan.modbus),
    );
    measure(
        Measurement::Opcua,
        "OPC UA 10,000 monitored items at 1 Hz",
        &mut || opcua::subscribe(&bins, &dir, &target_dir().join("bench-peers"), plan.opcua),
    );
    // The memory rows measure the static musl agent (issue 24): the binary
    // the packages ship, not the glibc one the other rows run.
    let memory_agent = cli
        .memory_agent
        .clone()
        .unwrap_or_else(|| target_dir().join(MUSL_AGENT));
    let memory_agent = memory_agent.canonicalize().unwrap_or(memory_agent);
    let memory_bins = || -> Result<procs::Bins> {
        anyhow::ensure!(
            memory_agent.exists(),
            "{} not built: run `bash cross/build --agent-only x86_64` (or pass --memory-agent)",
            memory_agent.display()
        );
        Ok(bins.with_agent(memory_agent.clone()))
    };
    measure(Measurement::Idle, "Agent memory idle", &mut || {
        modbus::idle(&memory_bins()?, &dir, plan.modbus)
    });
    measure(
        Measurement::Tags,
        "Agent memory at 10,000 tags",
        &mut || modbus::tags(&memory_bins()?, &dir, plan.modbus),
    );
    measure(
        Measurement::Backlog,
        "Agent memory with a backlog draining to a hub",
        &mut || modbus::backlog(&memory_bins()?, &dir, plan.modbus),
    );
    let mut single_drain = None;
    let mut drain_trace = Vec::new();
    measure(
        Measurement::Uplink,
        "Uplink drain agent → hub",
        &mut || {
            let r = uplink::drain(&bins, &dir, plan.uplink)?;
            single_drain = Some(r.rate);
            drain_trace = r.trace;
            Ok(r.rows)
        },
    );
    measure(
        Measurement::Fleet,
        "Hub ingest from many agents",
        &mut || uplink::fleet(&bins, &dir, plan.fleet, single_drain),
    );
    measure(
        Measurement::Sinks,
        "Hub sinks: NATS JetStream, MQTT",
        &mut || sinks::run(&bins, &dir, plan.sinks),
    );
    measure(
        Measurement::Replicas,
        "Scale-out: hub replicas on JetStream",
        &mut || replicas::replicas(&bins, &dir, plan.replicas),
    );
    measure(
        Measurement::Peers,
        "Peer gateways: ThingsBoard IoT Gateway, Node-RED",
        &mut || {
            let cache = target_dir().join("bench-peers");
            let (r, l) = peers::run(&bins, &dir, &cache, plan.peers)?;
            latencies.extend(l);
            Ok(r)
        },
    );
    measure(
        Measurement::Api,
        "Hub API latency, 1,000 agents",
        &mut || api::run(&bins, &dir, plan.api),
    );
    measure(
        Measurement::Door,
        "The hub's door under bad handshakes",
        &mut || door::run(&bins, &dir, plan.door),
    );
    measure(Measurement::Commands, "Command round trip", &mut || {
        commands::run(&bins, &dir, plan.commands)
    });
    measure(Measurement::Sizes, "Static build sizes", &mut || {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        sizes::run(&workspace, &target_dir(), !cli.sizes_no_build)
    });
    drop(rt);

    let complete = rows.iter().all(|r| r.verdict != Verdict::Error);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut out = String::new();
    out.push_str(&format!(
        "## Outpost benchmarks ({} run)\n\n",
        if cli.quick { "quick" } else { "full" }
    ));
    out.push_str(&report::table(&rows));
    out.push_str("\nMachine and software:\n\n");
    out.push_str(&report::machine(&dir));
    out.push_str(&format!(
        "- Load average before / after: {load_before} / {}\n",
        report::loadavg()
    ));
    out.push_str(&format!(
        "- Agent: `{}` ({agent_version}){}\n",
        bins.agent.display(),
        if debug_build {
            " — **debug build: build with `cargo build --release --bins` for real numbers**"
        } else {
            ""
        }
    ));
    out.push_str(&format!(
        "- Hub: `{}` ({hub_version})\n",
        bins.hub
            .as_ref()
            .map_or("not found".into(), |h| h.display().to_string())
    ));
    out.push_str(&format!("- Broker: {mosquitto_version}\n"));
    out.push_str(&format!(
        "- Whole run: {:.0} s\n",
        started.elapsed().as_secs_f64()
    ));
    out.push_str("\nCommands:\n\n```sh\ncargo build --release --bins\n");
    out.push_str(&format!(
        "cargo run --profile bench -p outpost-tests --bin outpost-bench{}{}\n```\n",
        if args.is_empty() { "" } else { " -- " },
        args.join(" ")
    ));
    out.push_str(NOTES);
    print!("{out}");

    let out_dir = cli
        .out
        .clone()
        .unwrap_or_else(|| target_dir().join("outpost-bench"));
    let mut figures = Vec::new();
    let mut figure = |name: &str, draw: &dyn Fn(&Path) -> Result<()>| {
        let path = out_dir.join(name);
        match draw(&path) {
            Ok(()) => figures.push(name.to_owned()),
            Err(e) => eprintln!("outpost-bench: no {}: {e:#}", path.display()),
        }
    };
    std::fs::create_dir_all(&out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    if drain_trace.len() >= 2 {
        figure("uplink-drain.svg", &|p| {
            plots::drain(
                p,
                &format!(
                    "Uplink drain of {} events, agent → hub over QUIC (median run)",
                    report::thousands(plan.uplink.events as f64)
                ),
                &drain_trace,
            )
        });
    }
    if !latencies.is_empty() {
        let tools: Vec<(&str, &[f64])> = latencies
            .iter()
            .map(|l| (l.tool.as_str(), l.millis.as_slice()))
            .collect();
        figure("bridge-latency.svg", &|p| {
            plots::latency(
                p,
                "Modbus → MQTT bridge latency: register change → message at the subscriber",
                &tools,
            )
        });
    }
    let json = report::json(
        &rows,
        &report::Meta {
            quick: cli.quick,
            args: &args,
            machine: &report::machine(&dir),
            load_before: &load_before,
            load_after: &report::loadavg(),
            agent: &format!("{} ({agent_version})", bins.agent.display()),
            hub: &hub_version,
            broker: &mosquitto_version,
            seconds: started.elapsed().as_secs_f64(),
            figures: &figures,
        },
    );
    for (name, text) in [("report.md", out), ("report.json", format!("{json:#}\n"))] {
        let path = out_dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    }
    eprintln!(
        "outpost-bench: report.md, report.json{} in {}",
        figures.iter().map(|f| format!(", {f}")).collect::<String>(),
        out_dir.display()
    );

    if cli.keep {
        let kept = tmp.keep();
        eprintln!("kept {}", kept.display());
    }
    Ok(complete)
}

/// How each row was measured, printed under the table.
const NOTES: &str = "
How each row is measured (medians of the runs; every run's numbers are on stderr):

- Verdicts: every target is the goal in issue 24's table (where the table has none,
  the row's own target, or info). A ratio is the median of the rounds' ratios, each
  round measuring baseline and ours one after the other, and every round's ratio is
  printed beside it; a verdict needs at least 3 rounds (a `--quick` run has 1 and gives
  none). A miss says by how much. Each row names the build it measured: the agent's
  or the hub's (static musl or dynamic glibc, and the path), or the harness's own
  process for what runs in-process.
- QoS 2: the MQTT drain with messages published, queued and delivered at QoS 2; the
  bare subscriber (rumqttc, QoS 2 subscription, automatic PUBREC/PUBCOMP) against the
  agent with `qos = 2`; the same Mosquitto. Goal ≥ 0.9; a message stored twice is a
  FAIL row.

- Outbox append: ours = `Outbox::append` with N pre-built `EventBody`s (64-byte JSON
  payloads), one call = one transaction per batch; it encodes each body, assigns seqs,
  probes for expired rows, maintains the `events_ts` index and the `meta` counters.
  Baseline = rusqlite alone on a fresh file with the same WAL and `synchronous`, a table
  `events(seq INTEGER PRIMARY KEY, ts, stream, body BLOB)` without the index, the
  bodies already postcard-encoded, one prepared INSERT per row, the same batches.
  Baseline and ours alternate, each on a fresh file.
- Group-commit writer: `spawn_writer` (default options: window 0, max batch 4096)
  with concurrent producers, each awaiting `OutboxHandle::append` of its 100-event
  request before sending the next; compared with the batch baseline above.
- MQTT: a rumqttc publisher (QoS 1, in-flight 1000) → Mosquitto (max_inflight_messages
  1000, max_queued_messages 0) → a bare rumqttc subscriber (QoS 1, automatic acks,
  persistent session, stores nothing) or the real `outpost-agent` (persistent session,
  outbox FULL). Publisher and bare subscriber each run on a one-thread runtime of their
  own. Live: messages are published while the subscriber is connected; clock from the
  first publish to the N-th message received (baseline) or counted in the outbox's
  `accepted_total` (ours, polled every 5 ms). One publisher is usually the limit of
  this shape (compare the publisher's own rate): it shows that the agent keeps up.
  Drain: the subscriber's persistent session is made and left, N messages are queued
  at the broker, and the clock runs from the reconnect (ours: the agent process's
  start) to the N-th message received or stored: what the broker can deliver, with no
  publisher in the way. Probe messages before each clock make sure the subscriber is
  connected and subscribed. For scale, shared/PEERS.md measured ~65k msg/s QoS 1 live
  (one publisher, in-flight 100) on a quiet machine of this type.
- Sparkplug B: the MQTT drain shape with an edge node's session queued at Mosquitto (an
  NBIRTH of 10 metrics with aliases, then N NDATA of the 10 metrics by alias only, seq
  1, 2, ... modulo 256, QoS 1); the bare subscriber counts messages and decodes nothing,
  the agent (`[[mqtt.sparkplug]]`) decodes each payload, resolves the aliases, checks
  the seq and stores one event per metric. Clock from the subscriber's (re)start to the
  last message received or the last metric counted in `accepted_total`. Info only: the
  agent writes ten events per message the bare subscriber merely counts.
- Policy evaluation: a generated document of 1,000 rules with distinct patterns over
  `site-S/line-L/tag-T` (exact names, `+` over lines, `#` under a line; one in ten a deny,
  one in a hundred a 10 s downsample, most of the rest redact `/unit`, hash `/pad`, round
  `/value` or drop `/pad`) and four label selectors, two of which the agent's labels
  `{ region = \"eu-west\", tier = \"prod\" }` meet; compiled as the agent does (trusting
  catalog). `Enforcer::apply(.., Stage::Ingest)` in a loop on one core over N pre-built
  bodies (cloned before the clock) of 3,072 streams with the MQTT rows' 64-byte JSON
  payloads, 1 ms of event time apart; a fresh enforcer per run. Baseline = the same loop
  with `Policy::default()`. Baseline and ours alternate.
- MQTT with a policy: the MQTT rows' live and drain runs of the real agent (same broker
  settings, publisher and clocks), with the labels above and a `policy.json` of 1,000
  rules in its data directory before it starts: 100 rules take the published topics
  `bench/+/sensor/<k>` and minimise them, the other 900 are the site rules above; none
  denies or downsamples a published topic, so both runs store all N messages (checked:
  the clock stops at N stored, and the last stored messages are checked minimised).
  Baseline = the same agent with the same labels and no policy. Runs alternate.
- Modbus: `outpost-devsim --listen 127.0.0.1:0 --counters 10000` and an agent with one
  device, 10,000 u16 holding tags at addresses 0..9999, poll 1 s, after two polls were
  stored. The window runs from the end of one poll to the end of the W-th poll after
  it, so it holds whole polls; CPU = utime+stime of the agent process (all threads)
  from /proc/PID/stat over the window.
- OPC UA: `tests/peers/opcua_server.py --scale 10000 --tick 1000` (asyncua, every
  variable set each second) and, back to back on that server, the agent (10,000
  `[[opcua.servers.nodes]]`, publishing interval 1 s; notifications = events stored in
  the outbox) and Node-RED 4.1.15 + node-red-contrib-opcua 0.2.354 (npm, installed into
  target/bench-peers/node-red-opcua on first use): one `OpcUa-Client` node, action
  `subscribe`, `msg.topic` = `multiple` with the 10,000 node ids (one monitored-item
  group, sampling 1 s, queue 1), its output counted by a function node that logs the
  count every 1,000 (notifications/s read from that log). Each after two rounds
  arrived; CPU = utime+stime from /proc/PID/stat over the window, VmRSS and VmHWM at
  its end. Node-RED only counts what arrives; the agent also stores it durably.
- Memory rows (idle, 10,000 tags, backlog): the agent measured is `--memory-agent`, by
  default the static musl build that `cross/build x86_64` makes
  (target/x86_64-unknown-linux-musl/release/outpost-agent); each row names the build
  (static or dynamic, read from the ELF file) and its path. VmRSS and VmHWM from
  /proc/PID/status (VmHWM: the most the process ever had resident, so config parsing
  is included). MB = 10^6 bytes. Goals: VmHWM ≤ 20 MB with 10,000 tags, with or
  without a backlog draining; idle VmRSS ≤ 6 MB. A miss says by how much.
- Idle: the agent with only `[agent] data_dir` (no device, broker or uplink), after the
  settle time.
- 10,000 tags: the Modbus row's agent config, no uplink, after two polls were stored
  and the settle time.
- Backlog: the outbox is filled with `Outbox::append` (as the agent of a certificate
  from `outpost-hub ca issue`) before the agent starts; the agent polls the same
  10,000 tags and has an `[uplink]` to a fresh `outpost-hub`, so the backlog drains
  while it runs; VmRSS is sampled every 100 ms until the hub's watermark for the
  agent reaches the backlog (read-only rusqlite on `hub.db`), then after the settle
  time VmHWM and VmRSS are read.
- Uplink drain: the outbox is filled with N of the MQTT rows' bodies (64-byte JSON
  payloads) before the agent starts; a fresh `outpost-hub` (store `synchronous = full`,
  its default) and a fresh copy of the outbox per run; certificates from
  `outpost-hub ca init` / `ca issue`; the agent's `[uplink]` has its defaults (outbox
  FULL, 1024-event batches, the hub's 8192-event window). Clock from the agent process's
  start to the agent's watermark in the hub's `hub.db` reaching N (read-only rusqlite,
  polled every 2 ms; the hub commits it with the events), then the rows are counted.
  CPU = utime+stime of each process over the drain. The ratio's baseline (issue 24's
  goal ≥ 0.7) = rusqlite inserting the same events into a fresh file, WAL,
  synchronous=FULL, batches of 1000 (the outbox-append row's baseline), once per round
  beside the drain. Info row: raw quinn in the bench
  process: a server with the hub's own `server_config` (mTLS, transport settings) and
  socket buffers, a client with the agent's TLS and transport settings, each on a
  runtime of its own; the client writes exactly the `Batch` frames the agent sends for
  the same events (read back from the same outbox, 1024 to a frame, `Frame::encode`) on
  one bidirectional stream and finishes it; the server reads to the end and answers with
  the byte count; clock from the connect to the client having read that reply. Events/s
  = N / that time. Baseline and ours alternate. The streaming row is the rate
  from the first events durable at the hub to the N-th.
- Hub ingest: `fleet_sim::run_fleet` in the bench process (4 shared client sockets,
  2 tokio threads, the same cores as the hub) against a release hub started by the
  harness: each simulated agent has its own certificate and QUIC connection, sends its
  events through the real `AgentSession`, waits for the last ack and says goodbye;
  dials are spread over 1 s; an agent whose connection fails retries with the uplink's
  backoff. Events/s = all events / (first dial → last goodbye), so the dial spread
  and the handshakes are inside it; afterwards the hub's `agents` table must show every
  agent at its last seq and `events` every row. Ratio = that / the single-agent drain
  above. Memory per agent = (the hub's VmHWM after the run − its VmRSS once it
  listened, before the first dial) / agents; kB = 10^3 bytes.
- Hub sinks: per run a fresh far end (nats-server with JetStream, stream `OUTPOST`
  capturing `outpost.>`; or Mosquitto as above, with a watcher's persistent session on
  `outpost/#`) is prepared and stopped. Ours: a release hub with one `[[sinks]]` entry
  for it (defaults, but `retry_min`/`retry_max` 50/200 ms, and for MQTT `max_inflight =
  1000`) and the policy `[defaults] sinks = [\"store\", \"bench\"]`; real agents with
  pre-filled outboxes (at most 6,250 events each, under the 8192-event window that is all
  an agent sends while the hub holds back its acknowledgements) upload N events, which the
  hub stores and queues for the sink; once `sinks status` shows all N pending the agents
  stop, and the far end starts again on the same port. Baseline: the far end prepared and
  restarted the same way, then a bare client on a one-thread runtime publishes the same
  messages (the hub's subjects or topics, JSON payloads and, for JetStream, its
  `Nats-Msg-Id` and `Nats-Expected-Stream` headers, built before the clock), 1,000
  awaiting their ack at a time (async-nats `send_publish`; rumqttc QoS 1). The same
  observer times both: the stream's message count (stream info every 5 ms) or a rumqttc
  subscriber on the watcher's session. Rate = (N − the count at the first sighting) /
  (first sighting → N-th); the second row runs from the far end listening, so it includes
  how long the hub takes to reconnect. Checked: exactly N messages of the same total size
  on both sides, and the hub's `delivered` = N. Baseline and ours alternate.
- Scale-out: a fresh nats-server (JetStream, file store in the run's directory) per
  round; one or two release hubs with `[store] kind = \"jetstream\"` on it, or one
  SQLite hub (synchronous=FULL); the simulated fleet of the hub-ingest row, split in
  halves between two replicas, dialled at once; first dial → last acknowledgement.
  Checked: the stream holds every event. Rounds alternate SQLite, one replica, two
  replicas; medians. nats-server, the hubs and the fleet share this machine.
- Peer gateways: ours, the ThingsBoard IoT Gateway 3.8.5 (PyPI, its own venv) and
  Node-RED 4 + node-red-contrib-modbus 5.23.3 (npm), installed once into
  target/bench-peers, run one at a time against the same in-process Modbus TCP
  simulator (`outpost_devsim`) and the same Mosquitto. CPU: 1,000 u16 holding
  registers polled at 1 Hz, every value published at QoS 1 on every poll (ours: a
  `[[bridges]]` with `on = \"poll\"`, one JSON message per tag; ThingsBoard: one request
  per tag, one telemetry message per poll, report strategy ON_RECEIVED, stdout to
  /dev/null; Node-RED: 8 reads of 125 registers, one message per register);
  utime+stime of the whole process tree over the window after two polls of warm-up,
  VmRSS summed over the tree. Latency: 100 registers polled every 100 ms by every
  tool; the bench sets one register every 47 ms at a recorded instant and a
  subscriber in the bench times the first message carrying the new value; p50 / p99
  (nearest rank) and the messages/s arriving. Ratio = ours / peer.
- Door: a release hub with its default limits (`max_handshakes` 1024, `retry_above`
  256, `per_address_burst` 64 at 16/s) takes N QUIC connection attempts from the bench
  process, at most C in flight, from S loopback addresses (127.0.1.1 ...): half without
  a client certificate, half with one from another CA; each attempt ends when the hub
  refuses it, or fails or closes it after the TLS handshake (30 s at most). Once a
  quarter are fired, a release `outpost-agent` with a valid certificate starts from
  127.0.0.1 (its default reconnect backoff); connect = its process start → the hub's
  `agents` row saying connected (read-only rusqlite, every 5 ms). Peak RSS = the hub's
  VmHWM after the flood; idle = its VmRSS 2 s after it listened. The counts of
  refusals and Retries are the hub's own metrics.
- Static build sizes: the files `bash cross/build` leaves in
  `target/<triple>/release/`, the binaries the packages ship. The aarch64 agents are
  built in the run (`cross/build --agent-only aarch64`, the shipping profile, each
  program in its own cargo invocation; `--sizes-no-build` skips it); the other rows
  say when they were built. Goal: `outpost-agent` (the package without OPC UA) ≤ 6 MB
  (10^6 bytes); `outpost-agent-opcua` within the 12 MB budget `cross/build` checks.
- Hub API latency: a store seeded through the hub's library with 1,000 agents (20
  events each), a fresh hub on it (`[api]` on loopback, rate limit out of the way) and
  a viewer token from `token create`; 8 client threads with one keep-alive connection
  each send 200 requests/s in all, open loop (each request has its due time and its
  latency runs from then, so a server that falls behind shows its queue): every other
  one `GET /api/v1/fleet` (all 1,000 agents), the rest `GET /api/v1/events` pages of
  100 (all agents, or one agent with a `plc1/+` pattern). p50 / p99 / max by query
  kind (nearest rank), after one warm-up request of each. No baseline; the target is
  ours (p99 under 100 ms).
- Command round trip: a hub, an agent and `outpost-devsim` on loopback; N writes of
  one writable u16 tag sent one at a time with `outpost-hub command send` (the
  break-glass CLI), each after a random pause of 0 to 1 s so that it arrives at a random
  moment of the session's one-second check for new commands, and each awaited (its row
  in `hub.db`, read-only, every 2 ms) before the next. Round trip = the hub's own
  `finished_at − created_at` (stored → result stored: delivery, the agent's ledger
  fsyncs, the Modbus write and read-back, the result recorded); every command must be
  `applied` with the value written. p50 / p99 nearest rank. No baseline; the goal is
  ours: p99 ≤ 1.5 s, the one-second check plus half a second.
";
