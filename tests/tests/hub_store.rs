//! The hub's operator verbs (`fleet list`, `events tail`, `events stats`) run
//! as the real `outpost-hub` binary against a store filled through the
//! library, while a writer may hold it open; and bad input is one line on
//! stderr with exit status 2.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use outpost_hub::store::{Store, Synchronous, FILE_NAME};
use outpost_protocols::event::{
    AgentId, EventBody, JsonText, Quality, Reason, Seq, StreamName, Timestamp, Value,
};
use outpost_tests::{bin, run_cli};

const NOW: Timestamp = Timestamp(1_718_000_000_000_000_000);

/// A hub config in `dir` whose `data_dir` is relative (so, relative to the
/// config file), plus the data folder; returns the config path.
fn hub_config(dir: &Path, extra: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir.join("data"))?;
    let p = dir.join("hub.toml");
    std::fs::write(
        &p,
        format!(
            "[hub]\ndata_dir = \"data\"\nca = \"ca.pem\"\ncert = \"hub.pem\"\nkey = \"hub.key\"\n{extra}"
        ),
    )?;
    Ok(p)
}

fn store(dir: &Path) -> Result<Store> {
    Ok(Store::open(
        &dir.join("data").join(FILE_NAME),
        Synchronous::Normal,
        outpost_hub::audit::key::AuditKey::generate()?,
    )?)
}

fn id(s: &str) -> AgentId {
    AgentId::parse(s).unwrap_or_else(|e| panic!("{e}"))
}

fn stream(s: &str) -> StreamName {
    StreamName::parse(s).unwrap_or_else(|e| panic!("{e}"))
}

fn body(seq: u64) -> EventBody {
    EventBody {
        stream: stream(if seq.is_multiple_of(2) {
            "plc1/temperature"
        } else {
            "plant/line1/vibration"
        }),
        ts: Timestamp(NOW.0 + seq as i64 * 1_000_000),
        value: Value::F64(20.0 + seq as f64 / 4.0),
        quality: Quality::Good,
        attrs: BTreeMap::new(),
    }
}

fn events(seqs: impl IntoIterator<Item = u64>) -> Vec<(Seq, EventBody)> {
    seqs.into_iter().map(|s| (Seq(s), body(s))).collect()
}

/// Runs `outpost-hub ARGS --config CONFIG`.
fn hub(config: &Path, args: &[&str]) -> Result<(i32, String, String)> {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--config", config.to_str().context("utf-8 path")?]);
    run_cli(&bin("outpost-hub")?, &all)
}

fn json(out: &str) -> Result<serde_json::Value> {
    serde_json::from_str(out.trim()).with_context(|| format!("not one JSON document: {out}"))
}

fn assert_bad(code: i32, stderr: &str, needles: &[&str]) {
    assert_eq!(code, 2, "exit status, stderr: {stderr}");
    assert_one_line(stderr, needles);
}

fn assert_one_line(stderr: &str, needles: &[&str]) {
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{n:?} not in {stderr:?}");
    }
}

#[test]
fn events_stats_counts_each_seq_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = hub_config(dir.path(), "")?;
    let mut s = store(dir.path())?;
    // Replays, overlaps and reorders, as reconnecting agents produce them.
    s.insert(
        NOW,
        &[(id("gw-1"), events(1..=100)), (id("gw-2"), events(1..=10))],
    )?;
    s.insert(NOW, &[(id("gw-1"), events((50..=150).rev()))])?;
    s.insert(NOW, &[(id("gw-2"), events([5, 10, 11, 11, 12]))])?;
    s.insert(NOW, &[(id("gw-3"), events([7]))])?;
    drop(s);

    let (code, out, err) = hub(&config, &["events", "stats", "--json"])?;
    assert_eq!(code, 0, "{err}");
    let expected = serde_json::json!([
        {"agent_id": "gw-1", "count": 150, "distinct_seqs": 150, "min_seq": 1, "max_seq": 150},
        {"agent_id": "gw-2", "count": 12, "distinct_seqs": 12, "min_seq": 1, "max_seq": 12},
        {"agent_id": "gw-3", "count": 1, "distinct_seqs": 1, "min_seq": 7, "max_seq": 7},
    ]);
    assert_eq!(json(&out)?, expected);
    assert_eq!(out.lines().count(), 1, "one JSON document: {out}");

    let (code, out, err) = hub(&config, &["events", "stats", "--agent", "gw-2", "--json"])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)?, serde_json::json!([expected[1]]));
    let (code, out, _) = hub(&config, &["events", "stats", "--agent", "gw-9", "--json"])?;
    assert_eq!(code, 0);
    assert_eq!(
        json(&out)?,
        serde_json::json!([{"agent_id": "gw-9", "count": 0, "distinct_seqs": 0, "min_seq": null, "max_seq": null}])
    );

    let (code, out, err) = hub(&config, &["events", "stats"])?;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("AGENT"), "{out}");
    assert!(
        lines[1]
            .split_whitespace()
            .eq(["gw-1", "150", "150", "1", "150"]),
        "{out}"
    );
    Ok(())
}

#[test]
fn events_tail_prints_the_same_json_lines_as_the_agent() -> Result<()> {
    use outpost_agent::outbox::{Outbox, OutboxConfig, OutboxReader};

    let dir = tempfile::tempdir()?;
    // An agent with an outbox holding every kind of value and quality.
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(agent_dir.join("data"))?;
    let agent_config = agent_dir.join("agent.toml");
    std::fs::write(
        &agent_config,
        "[agent]\ndata_dir = \"data\"\nid = \"depot-17.gw-1\"\n",
    )?;
    let bodies = vec![
        EventBody {
            quality: Quality::Bad(Reason::ModbusException(2)),
            ..body(2)
        },
        EventBody {
            value: Value::Bool(true),
            ..body(3)
        },
        EventBody {
            value: Value::Bytes(vec![0, 159, 255]),
            attrs: BTreeMap::from([("retain".to_owned(), "true".to_owned())]),
            ..body(4)
        },
        EventBody {
            value: Value::Json(JsonText::parse(r#"{"rms":0.01,"unit":"g"}"#)?),
            quality: Quality::Uncertain(Reason::Timeout),
            ..body(5)
        },
        EventBody {
            value: Value::F64(f64::NAN),
            ..body(6)
        },
        EventBody {
            value: Value::String("läuft".into()),
            ..body(7)
        },
        EventBody {
            value: Value::I64(-42),
            ..body(8)
        },
    ];
    let agent_id = id("depot-17.gw-1");
    let mut cfg = OutboxConfig::new(agent_dir.join("data").join("outbox.db"));
    cfg.max_age = None;
    let mut outbox = Outbox::open(&cfg, agent_id.clone())?;
    outbox.append(NOW, &bodies, &[])?;
    drop(outbox);
    let stored = OutboxReader::open(&cfg.path, agent_id.clone())?.read_batch(Seq(0), 100)?;
    assert_eq!(stored.len(), bodies.len());

    // The hub stores what the agent would have sent: the same seqs and bodies.
    let config = hub_config(dir.path(), "")?;
    let mut s = store(dir.path())?;
    let sent: Vec<(Seq, EventBody)> = stored.iter().map(|e| (e.seq, e.body.clone())).collect();
    s.insert(
        NOW,
        &[(agent_id.clone(), sent), (id("other"), events(1..=3))],
    )?;
    drop(s);

    let (code, agent_out, err) = run_cli(
        &bin("outpost-agent")?,
        &[
            "outbox",
            "tail",
            "--json",
            "--limit",
            "100",
            "--config",
            agent_config.to_str().context("utf-8 path")?,
        ],
    )?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(agent_out.lines().count(), bodies.len(), "{agent_out}");
    let (code, hub_out, err) = hub(
        &config,
        &[
            "events",
            "tail",
            "--json",
            "--agent",
            "depot-17.gw-1",
            "--limit",
            "100",
        ],
    )?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(hub_out, agent_out, "byte for byte");
    for line in hub_out.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        for k in [
            "agent_id", "seq", "stream", "ts", "value", "quality", "attrs",
        ] {
            assert!(v.get(k).is_some(), "{k} missing: {line}");
        }
    }

    // --limit, --stream and every agent at once.
    let (code, out, err) = hub(
        &config,
        &[
            "events",
            "tail",
            "--json",
            "--agent",
            "depot-17.gw-1",
            "--stream",
            "plc1/+",
            "--limit",
            "2",
        ],
    )?;
    assert_eq!(code, 0, "{err}");
    let seqs: Vec<u64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).map(|v| v["seq"].as_u64().unwrap_or(0))
        })
        .collect::<Result<_, _>>()?;
    // Bodies 4, 6 and 8 are on plc1/temperature, stored as seqs 3, 5, 7.
    assert_eq!(seqs, [5, 7]);
    let (code, out, err) = hub(&config, &["events", "tail", "--limit", "100"])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), bodies.len() + 3, "{out}");
    assert!(
        out.contains("plc1/temperature = 20.5 [bad] modbus exception 0x02"),
        "{out}"
    );
    let (code, out, _) = hub(&config, &["events", "tail", "--limit", "0"])?;
    assert_eq!((code, out.as_str()), (0, ""));
    Ok(())
}

#[test]
fn fleet_list_shows_agents_and_watermarks() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = hub_config(dir.path(), "")?;
    let mut s = store(dir.path())?;
    let labels = BTreeMap::from([
        ("region".to_owned(), "eu-west".to_owned()),
        ("site".to_owned(), "depot-17".to_owned()),
    ]);
    s.agent_connected(&id("depot-17.gw-1"), &labels, "0.1.0", 1, NOW)?;
    s.report_backlog(&id("depot-17.gw-1"), 1200, 98_712)?;
    s.insert(NOW, &[(id("depot-17.gw-1"), events(1..=1523))])?;
    s.agent_connected(&id("gw-2"), &BTreeMap::new(), "0.0.9", 1, NOW)?;
    s.insert(NOW, &[(id("gw-2"), events(1..=5))])?;
    s.agent_disconnected(&id("gw-2"), Timestamp(NOW.0 + 60_000_000_000))?;

    let (code, out, err) = hub(&config, &["fleet", "list", "--json"])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "one JSON document: {out}");
    let fleet = json(&out)?;
    let a = &fleet[0];
    assert_eq!(a["agent_id"], "depot-17.gw-1");
    assert_eq!(
        a["labels"],
        serde_json::json!({"region": "eu-west", "site": "depot-17"})
    );
    assert_eq!(a["watermark"], 1523);
    assert_eq!(a["connected"], true);
    assert_eq!(a["sessions"], 1);
    assert_eq!(a["agent_version"], "0.1.0");
    assert_eq!(a["protocol_version"], 1);
    assert_eq!(a["backlog_events"], 1200);
    assert_eq!(a["backlog_bytes"], 98_712);
    assert_eq!(a["first_seen"], NOW.0);
    assert!(a["policy_version"].is_null());
    let b = &fleet[1];
    assert_eq!(b["agent_id"], "gw-2");
    assert_eq!(b["watermark"], 5);
    assert_eq!(b["connected"], false);
    assert_eq!(b["last_seen"], NOW.0 + 60_000_000_000);
    assert!(b["backlog_events"].is_null());

    let (code, out, err) = hub(&config, &["fleet", "list"])?;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("AGENT"), "{out}");
    assert!(lines[1].starts_with("depot-17.gw-1  connected"), "{out}");
    assert!(lines[2].starts_with("gw-2           disconnected"), "{out}");
    assert!(lines[1].contains(" 1523 ") && lines[1].contains("region=eu-west,site=depot-17"));
    assert!(lines[1].contains("2024-06-10T06:13:20Z"), "{out}");
    // The columns line up: every row has its watermark where the header does.
    let end = lines[0].find("WATERMARK").context("header")? + "WATERMARK".len();
    assert_eq!(&lines[1][end - 4..end], "1523", "{out}");
    assert_eq!(&lines[2][end - 1..end], "5", "{out}");
    Ok(())
}

#[test]
fn verbs_read_while_a_writer_is_open() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = hub_config(dir.path(), "")?;
    // The hub's writer connection stays open throughout.
    let mut s = store(dir.path())?;
    s.insert(NOW, &[(id("gw-1"), events(1..=10))])?;
    let count = |config: &Path| -> Result<serde_json::Value> {
        let (code, out, err) = hub(config, &["events", "stats", "--json"])?;
        assert_eq!(code, 0, "{err}");
        Ok(json(&out)?[0]["count"].clone())
    };
    assert_eq!(count(&config)?, 10);
    s.insert(NOW, &[(id("gw-1"), events(11..=20))])?;
    assert_eq!(count(&config)?, 20, "each commit is visible");

    // Another connection is in the middle of a write transaction: the verbs
    // neither wait for it nor see what it has not committed.
    let path = dir.path().join("data").join(FILE_NAME);
    let busy = rusqlite::Connection::open(&path)?;
    busy.execute_batch(
        "BEGIN IMMEDIATE;
         INSERT INTO events (agent_id, seq, ts, stream, body) VALUES ('gw-1', 99, 0, 'x', x'00');",
    )?;
    let started = std::time::Instant::now();
    assert_eq!(count(&config)?, 20);
    let (code, out, err) = hub(&config, &["fleet", "list", "--json"])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)?[0]["watermark"], 20);
    let (code, out, err) = hub(&config, &["events", "tail", "--json", "--limit", "1"])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"seq\":20"), "{out}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(4),
        "the verbs waited for the writer's lock: {:?}",
        started.elapsed()
    );
    busy.execute_batch("ROLLBACK;")?;
    // The writer still works after the readers came and went.
    s.insert(NOW, &[(id("gw-1"), events([21]))])?;
    assert_eq!(count(&config)?, 21);
    Ok(())
}

#[test]
fn bad_input_is_one_line_on_stderr_and_exit_2() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = hub_config(dir.path(), "")?;
    drop(store(dir.path())?);

    let missing = dir.path().join("nowhere.toml");
    let (code, _, err) = hub(&missing, &["fleet", "list"])?;
    assert_bad(code, &err, &["nowhere.toml"]);

    for verb in [
        &["events", "tail"][..],
        &["events", "stats"],
        &["fleet", "list"],
    ] {
        let (code, out, err) = hub(&config, &[verb, &["--agent", "a b"]].concat())?;
        if verb == ["fleet", "list"] {
            // fleet list takes no --agent: the argument parser says so.
            assert_eq!(code, 2, "{err}");
            assert!(!err.contains("panicked"), "{err}");
            continue;
        }
        assert_bad(code, &err, &["--agent", "a b"]);
        assert!(out.is_empty());
    }
    let (code, _, err) = hub(&config, &["events", "tail", "--stream", "plant/#/x"])?;
    assert_bad(code, &err, &["--stream", "plant/#/x"]);
    let (code, _, err) = hub(&config, &["events", "tail", "--limit", "many"])?;
    assert_eq!(code, 2, "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let unknown = hub_config(dir.path(), "bogus = 1\n")?;
    let (code, _, err) = hub(&unknown, &["events", "stats"])?;
    assert_bad(code, &err, &["hub.toml", "bogus"]);
    // A verb that reads only the SQLite store, on a hub whose store is
    // JetStream (`fleet list` and the policy verbs read JetStream:
    // scale_out_e2e.rs); a JetStream store without its table.
    let jetstream = hub_config(
        dir.path(),
        "[store]\nkind = \"jetstream\"\n\n[store.jetstream]\nurl = \"nats://127.0.0.1:1\"\n",
    )?;
    let (code, _, err) = hub(&jetstream, &["events", "stats"])?;
    assert_bad(code, &err, &["hub.toml", "store.kind", "jetstream"]);
    let tableless = hub_config(dir.path(), "[store]\nkind = \"jetstream\"\n")?;
    let (code, _, err) = hub(&tableless, &["fleet", "list"])?;
    assert_bad(code, &err, &["hub.toml", "store.jetstream", "url"]);
    Ok(())
}

#[test]
fn a_missing_store_is_one_line_and_exit_1_and_is_not_created() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = hub_config(dir.path(), "")?;
    for verb in [
        &["fleet", "list"][..],
        &["events", "tail"],
        &["events", "stats", "--json"],
    ] {
        let (code, out, err) = hub(&config, verb)?;
        assert_eq!(code, 1, "{err}");
        assert_one_line(&err, &["hub.db", "has not stored anything yet"]);
        assert!(out.is_empty(), "{out}");
    }
    assert!(!dir.path().join("data").join(FILE_NAME).exists());
    Ok(())
}
