//! The hub on the NATS JetStream store (`[store] kind = "jetstream"`), with
//! a real nats-server: replicas that share one stream and its key-value
//! buckets, an agent moved between them by a UDP proxy as a load balancer
//! would, one replica killed with SIGKILL, and repeats from after the
//! stream's duplicate window.
//!
//! Every wait polls a condition until a deadline. The fixed sleeps: one
//! waits out the stream's duplicate window, which is what is being tested;
//! the others give a broker a moment to save its sessions, and a doubled
//! message the moment to arrive after the last one expected.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use async_nats::jetstream;
use outpost_hub::store::jetstream::{spawn_jetstream_writer, JetStreamStore, JetStreamStoreConfig};
use outpost_hub::store::WriterOptions;
use outpost_protocols::{AgentId, EventBody, Quality, Seq, StreamName, Timestamp, Value};
use outpost_tests::udp_proxy::UdpProxy;
use outpost_tests::{
    agent_outbox_stats, bin, fill_outbox, free_udp_port, msg_id, retry_until, run_cli, stream_len,
    stream_messages, wait_until, Agent, Devsim, Hub, Nats, Pki,
};
use tokio_util::sync::CancellationToken;

/// How long any one condition may take to come true.
const DEADLINE: Duration = Duration::from_secs(90);
/// The events stream's duplicate window where a test outlasts it on
/// purpose: short, so that repeats from after it are cheap to make.
const WINDOW: Duration = Duration::from_secs(1);
const STREAM: &str = "OUTPOST_EVENTS";
/// A replica needs messages as large as the largest event (4 MiB).
const MAX_PAYLOAD: &str = "max_payload: 8MB";

/// nats-server on `port` (a free one if `None`), taking messages as large
/// as a replica needs.
fn nats_on(dir: &Path, port: Option<u16>) -> Result<Nats> {
    let port = match port {
        Some(p) => p,
        None => outpost_tests::free_port()?,
    };
    Nats::start_with(dir, port, MAX_PAYLOAD)
}

fn body(i: u64) -> Result<EventBody> {
    Ok(EventBody {
        stream: StreamName::parse("plant/line1/temp")?,
        // Now: the agent's outbox evicts events older than its retention.
        ts: Timestamp(now_ns() + i as i64),
        value: Value::from_payload(format!("{{\"n\":{i}}}").as_bytes()),
        quality: Quality::Good,
        attrs: BTreeMap::new(),
    })
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The `[store]` tables for `url`, with the stream's duplicate window
/// `window`.
fn store_table(url: &str, window: Duration) -> String {
    format!(
        "[store]\nkind = \"jetstream\"\n\n[store.jetstream]\nurl = \"{url}\"\nduplicate_window = \"{}ms\"\ntimeout = \"5s\"\n",
        window.as_millis()
    )
}

/// A replica's config in `dir` listening on `addr`.
fn replica_config(
    dir: &Path,
    pki: &Pki,
    addr: SocketAddr,
    url: &str,
) -> Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "[hub]\ndata_dir = \"hub-data\"\nlisten = \"{addr}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n{}\n[observability]\nlog = \"info\"\nmetrics = \"127.0.0.1:0\"\n\n[audit]\nkey = \"{}\"\n\n[policy]\nhashing_key = \"{}\"\n",
            pki.hub_dir.join("ca.pem").display(),
            pki.hub_dir.join("hub.pem").display(),
            pki.hub_dir.join("hub.key").display(),
            // The window must outlast a failover, or the events of a group a
            // replica took to its death are stored twice (scale-out.md).
            store_table(url, Duration::from_secs(120)),
            // Every replica signs the one audit chain with the same key.
            pki.hub_dir.with_file_name("audit.key").display(),
            // And hashes with the same key.
            pki.hub_dir.with_file_name("hashing.key").display(),
        ),
    )?;
    Ok(config)
}

async fn client(url: &str) -> Result<jetstream::Context> {
    Ok(jetstream::new(async_nats::connect(url).await?))
}

/// How many messages the events stream holds; asks again while a request
/// fails (a replica or a NATS node was just killed).
async fn count(js: &jetstream::Context) -> Result<u64> {
    stream_len(js, STREAM, DEADLINE).await
}

/// How often each seq of `agent` is in the stream.
async fn seqs_of(js: &jetstream::Context, agent: &str) -> Result<BTreeMap<u64, usize>> {
    let mut seen = BTreeMap::new();
    for m in stream_messages(js, STREAM, DEADLINE).await? {
        let id = msg_id(&m).context("a message without Nats-Msg-Id")?;
        let (a, seq) = id.rsplit_once(':').context("Nats-Msg-Id is agent:seq")?;
        if a == agent {
            *seen.entry(seq.parse::<u64>()?).or_default() += 1;
        }
    }
    Ok(seen)
}

/// Every seq from 1 to `last` once, nothing else.
fn check_once(seen: &BTreeMap<u64, usize>, last: u64) -> Result<()> {
    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(10).collect();
    ensure!(repeated.is_empty(), "stored more than once: {repeated:?}");
    let missing: Vec<u64> = (1..=last)
        .filter(|s| !seen.contains_key(s))
        .take(10)
        .collect();
    ensure!(
        missing.is_empty(),
        "missing seqs (first 10): {missing:?}; {} seqs stored, {:?}..={:?}",
        seen.len(),
        seen.keys().next(),
        seen.keys().last()
    );
    ensure!(
        seen.len() as u64 == last,
        "{} seqs stored, expected 1..={last}",
        seen.len()
    );
    Ok(())
}

/// [`check_once`] for an agent that may still be adding events (the
/// bad-quality samples of a device that went away): every seq up to `last`
/// and up to the highest stored once, none missing, none twice.
fn check_once_and_after(seen: &BTreeMap<u64, usize>, last: u64) -> Result<u64> {
    let top = seen.keys().last().copied().unwrap_or(0).max(last);
    check_once(seen, top)?;
    Ok(top)
}

/// Polls `f` (async) until it is true. A failing read (a JetStream request
/// timing out while the cluster elects leaders after a kill) is "not yet";
/// the last error is reported if the deadline passes.
async fn wait_for<F, Fut>(what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let until = Instant::now() + DEADLINE;
    loop {
        let last = match f().await {
            Ok(true) => return Ok(()),
            Ok(false) => None,
            Err(e) => Some(e),
        };
        if Instant::now() >= until {
            return match last {
                Some(e) => Err(e.context(format!("timed out waiting for {what}"))),
                None => Err(anyhow::anyhow!("timed out waiting for {what}")),
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const TAGS: usize = 8;

fn agent_config(hub: SocketAddr, creds: &Path, device: SocketAddr) -> String {
    let mut c = format!(
        r#"
[agent]
data_dir = "data"
id = "line1"

[uplink]
hub = "{hub}"
ca = "{}"
cert = "{}"
key = "{}"
reconnect_min = "100ms"
reconnect_max = "500ms"

[observability]
metrics = ""
log = "info"

[[modbus.devices]]
name = "plc"
address = "{device}"
unit = 1
poll = "20ms"
timeout = "300ms"
"#,
        creds.join("ca.pem").display(),
        creds.join("agent.pem").display(),
        creds.join("agent.key").display(),
    );
    c.push_str(&outpost_tests::holding_tags(TAGS));
    c
}

fn sim() -> String {
    outpost_tests::ramping_device(TAGS)
}

fn hub_verb(config: &Path, args: &[&str]) -> Result<(i32, String, String)> {
    let mut all: Vec<&str> = args.to_vec();
    let c = config.to_str().context("config path")?;
    all.extend(["--config", c]);
    run_cli(&bin("outpost-hub")?, &all)
}

/// Two replicas; the agent's traffic moved from one to the other and back
/// while it sends a backlog and live Modbus samples, the first replica
/// killed with SIGKILL while it serves: the stream holds every seq once, the
/// policy applied through one replica's config is the one the agent runs,
/// and `fleet list` through the other shows where it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_moved_between_two_replicas_one_killed_stores_every_seq_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let nats = nats_on(dir.path(), None)?;
    let pki = Pki::new(dir.path())?;
    let addr_a = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    let addr_b = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    let config_a = replica_config(&dir.path().join("a"), &pki, addr_a, &nats.url())?;
    let config_b = replica_config(&dir.path().join("b"), &pki, addr_b, &nats.url())?;
    let mut hub_a = Hub::start_file(&config_a, addr_a)?;
    let hub_b = Hub::start_file(&config_b, addr_b)?;

    // A policy applied through replica A's config, before the agent comes.
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[rules]]\nstreams = [\"plant/debug/#\"]\naction = \"deny\"\n",
    )?;
    let (code, out, err) = hub_verb(
        &config_a,
        &[
            "policy",
            "apply",
            policy.to_str().context("path")?,
            "--json",
        ],
    )?;
    ensure!(code == 0, "policy apply exited {code}: {err}");
    ensure!(out.contains("\"version\":1"), "{out}");

    let proxy = UdpProxy::start(addr_a)?;
    let device = Devsim::start(dir.path(), &sim(), None)?;
    let creds = pki.issue_agent("line1")?;
    let agent_dir = dir.path().join("agent");
    let backlog: Vec<EventBody> = (1..=20_000).map(body).collect::<Result<_>>()?;
    fill_outbox(&agent_dir.join("data"), "line1", &backlog)?;
    let agent_toml = agent_dir.join("agent.toml");
    std::fs::write(&agent_toml, agent_config(proxy.addr(), &creds, device.addr))?;
    let agent = Agent::start_file(&agent_toml)?;

    let js = client(&nats.url()).await?;
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("{:>6.1} s  {what}", t0.elapsed().as_secs_f64());
    let connected = |hub: &Hub| hub.log().matches("Agent connected").count();
    wait_for("5,000 events through replica A", || async {
        Ok(count(&js).await? >= 5_000)
    })
    .await?;
    phase("switch to B");
    proxy.set_upstream(addr_b);
    wait_until(DEADLINE, "the agent on replica B", || {
        connected(&hub_b) >= 1
    })?;
    let at = count(&js).await?;
    wait_for("3,000 more through replica B", || async {
        Ok(count(&js).await? >= at + 3_000)
    })
    .await?;
    phase("switch to A");
    let before = connected(&hub_a);
    proxy.set_upstream(addr_a);
    wait_until(DEADLINE, "the agent back on replica A", || {
        connected(&hub_a) > before
    })?;
    let at = count(&js).await?;
    wait_for("1,000 more through replica A", || async {
        Ok(count(&js).await? >= at + 1_000)
    })
    .await?;
    phase("kill A");
    hub_a.proc.kill9();
    proxy.set_upstream(addr_b);
    let before = connected(&hub_b);
    wait_until(DEADLINE, "the agent back on replica B", || {
        connected(&hub_b) > before
    })?;
    phase("on B again");
    // Live samples keep coming; then the device goes and the agent drains.
    let at = count(&js).await?;
    wait_for("more samples through replica B", || async {
        Ok(count(&js).await? >= at + 500)
    })
    .await?;
    phase("device stopped");
    drop(device);
    let mut last = 0;
    wait_until(
        DEADLINE,
        "the agent's outbox to be acknowledged",
        || match agent_outbox_stats(&agent_toml) {
            Ok(s) => {
                last = s["next_seq"].as_u64().unwrap_or(1).saturating_sub(1);
                last > 20_000 && s["events"] == 0 && s["acked_seq"].as_u64() == Some(last)
            }
            Err(_) => false,
        },
    )?;
    phase("reading the stream");
    // The device's going away is itself an event per tag (bad quality),
    // which may land after the outbox looked drained: what is stored is
    // checked up to the highest seq, and at least up to `last`.
    let seen = seqs_of(&js, "line1").await?;
    check_once_and_after(&seen, last)?;

    // The registry, read through replica B's config: the watermark, and the
    // policy version the agent reported (applied through A's).
    let (code, out, err) = hub_verb(&config_b, &["fleet", "list", "--json"])?;
    ensure!(code == 0, "fleet list exited {code}: {err}");
    let fleet: serde_json::Value = serde_json::from_str(&out)?;
    let line1 = fleet
        .as_array()
        .and_then(|a| a.iter().find(|r| r["agent_id"] == "line1"))
        .with_context(|| format!("line1 in {out}"))?;
    ensure!(
        line1["watermark"].as_u64().is_some_and(|w| w >= last),
        "watermark below the acknowledged {last}: {line1}"
    );
    ensure!(line1["policy_version"].as_u64() == Some(1), "{line1}");
    // And through replica B's metrics, read from the same buckets.
    let metrics = hub_b.metrics()?;
    ensure!(
        metrics
            .lines()
            .any(|l| l == "outpost_hub_agents{state=\"connected\"} 1"),
        "{metrics}"
    );
    drop(agent);
    drop(hub_b);
    Ok(())
}

/// The `[store.jetstream]` table of [`store_table`], read by the hub's own
/// config reader.
fn store_config(url: &str) -> Result<JetStreamStoreConfig> {
    let text = format!(
        "[hub]\ndata_dir = \"d\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n{}",
        store_table(url, WINDOW)
    );
    let cfg = outpost_hub::config::parse(&text, Vec::new(), Path::new("hub.toml"))?;
    cfg.store
        .jetstream()
        .cloned()
        .context("no [store.jetstream]")
}

fn agent(id: &str) -> Result<AgentId> {
    Ok(AgentId::parse(id)?)
}

fn events(range: std::ops::RangeInclusive<u64>) -> Result<Vec<(Seq, EventBody)>> {
    range.map(|i| Ok((Seq(i), body(i)?))).collect()
}

/// The store driven directly, as two replicas: a batch replayed after the
/// duplicate window is not stored again; events a replica published but
/// died before covering with the watermark are sent again and dropped by
/// the window; a batch that does not follow what is stored (one before it
/// failed) is refused; two replicas storing the same batch at once store it
/// once and agree on the watermark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watermark_keeps_repeats_out_after_the_duplicate_window() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let nats = nats_on(dir.path(), None)?;
    let cfg = store_config(&nats.url())?;
    let js = client(&nats.url()).await?;
    let id = agent("site7")?;

    let stop = CancellationToken::new();
    let one = JetStreamStore::open(&cfg, dir.path()).await?;
    let (h1, w1) = spawn_jetstream_writer(one, WriterOptions::default(), Vec::new(), stop.clone());
    ensure!(h1.insert(id.clone(), events(1..=100)?).await? == Seq(100));
    tokio::time::sleep(WINDOW + Duration::from_millis(500)).await;
    // The stream forgot the ids by now; the watermark did not.
    let again = h1
        .insert_nowait(id.clone(), events(1..=100)?)
        .await?
        .await?;
    ensure!(
        (again.inserted, again.duplicates, again.watermark) == (0, 100, Seq(100)),
        "{again:?}"
    );
    ensure!(count(&js).await? == 100, "{} messages", count(&js).await?);

    // A replica that published 101..=120 and died before its watermark;
    // the agent is back within the window.
    for seq in 101..=120u64 {
        let msg = jetstream::message::PublishMessage::build()
            .payload(body(seq)?.encode().into())
            .message_id(format!("{id}:{seq}"));
        js.send_publish(format!("outpost.events.{id}"), msg)
            .await?
            .await?;
    }
    let two = JetStreamStore::open(&cfg, dir.path()).await?;
    let (h2, w2) = spawn_jetstream_writer(two, WriterOptions::default(), Vec::new(), stop.clone());
    ensure!(h2.watermark(id.clone()).await? == Seq(100));
    let o = h2
        .insert_nowait(id.clone(), events(101..=150)?)
        .await?
        .await?;
    ensure!(
        (o.inserted, o.duplicates, o.watermark) == (30, 20, Seq(150)),
        "{o:?}"
    );

    // A batch queued behind one that was not stored is refused.
    let gap = h2
        .insert_routed_nowait(
            id.clone(),
            events(161..=170)?,
            Vec::new(),
            (Seq(160), Seq(170)),
            outpost_hub::store::PolicyCounts::default(),
        )
        .await?
        .await;
    ensure!(
        matches!(gap, Err(outpost_hub::store::StoreError::OutOfOrder { .. })),
        "{gap:?}"
    );
    ensure!(h2.watermark(id.clone()).await? == Seq(150));

    // Both replicas store the same batch at once.
    let (a, b) = tokio::join!(
        h1.insert(id.clone(), events(151..=400)?),
        h2.insert(id.clone(), events(151..=400)?)
    );
    ensure!(a? >= Seq(400) && b? >= Seq(400));
    ensure!(h1.watermark(id.clone()).await? == Seq(400));
    check_once(&seqs_of(&js, id.as_str()).await?, 400)?;

    stop.cancel();
    drop((h1, h2));
    w1.await??;
    w2.await??;
    Ok(())
}

/// Settings that cannot work are refused at start with one line naming the
/// key (exit 2); a server that cannot be reached is an error naming it
/// (exit 1), not a hub that pretends to run.
#[test]
fn bad_jetstream_store_settings_are_clear_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    let config = replica_config(dir.path(), &pki, addr, "nats://127.0.0.1:1")?;
    let base = std::fs::read_to_string(&config)?;
    let cases: &[(&str, &str, &str)] = &[
        (
            "[store.jetstream]\nurl = \"nats://127.0.0.1:1\"\n",
            "",
            "store.jetstream",
        ),
        (
            "url = \"nats://127.0.0.1:1\"",
            "url = \"http://x\"",
            "store.jetstream.url",
        ),
        (
            "timeout = \"5s\"",
            "timeout = \"5s\"\nbucket_prefix = \"a.b\"",
            "store.jetstream.bucket_prefix",
        ),
        (
            "timeout = \"5s\"",
            "timeout = \"5s\"\nsubject = \"outpost.>\"",
            "store.jetstream.subject",
        ),
        (
            "timeout = \"5s\"",
            "timeout = \"5s\"\nsinks_subject = \"outpost.events.sinks\"",
            "store.jetstream.sinks_subject",
        ),
        (
            "timeout = \"5s\"",
            "timeout = \"5s\"\nsinks_stream = \"OUTPOST_EVENTS\"",
            "store.jetstream.sinks_stream",
        ),
    ];
    for (from, to, key) in cases {
        let text = if from.starts_with("[store.jetstream]") {
            // No table at all.
            let start = base.find("[store.jetstream]").context("table")?;
            let end = base.find("[observability]").context("next")?;
            format!("{}{}", &base[..start], &base[end..])
        } else {
            ensure!(base.contains(from), "{from:?} in the config");
            base.replacen(from, to, 1)
        };
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, text)?;
        let (code, _, err) = hub_verb(&bad, &["check"])?;
        ensure!(code == 2, "{key}: check exited {code}: {err}");
        ensure!(err.contains(key), "{key}: {err}");
        ensure!(err.lines().count() == 1, "{key}: one line: {err}");
    }
    let started = Instant::now();
    let (code, _, err) = hub_verb(&config, &["run"])?;
    ensure!(code == 1, "run exited {code}: {err}");
    ensure!(err.contains("nats://127.0.0.1:1"), "{err}");
    ensure!(
        started.elapsed() < DEADLINE,
        "gave up after {:?}",
        started.elapsed()
    );
    Ok(())
}

/// The agent's backlog through one replica while NATS goes away and comes
/// back: `fault` takes it down (and returns whatever must live on), `back`
/// brings it back. Asserts that nothing is acknowledged while it is away
/// and that the stream ends with every seq once.
async fn backlog_through_a_nats_outage(
    dir: &Path,
    urls: &str,
    replicas: usize,
    fault: impl FnOnce() -> Result<()>,
    back: impl FnOnce() -> Result<()>,
) -> Result<()> {
    const N: u64 = 30_000;
    let pki = Pki::new(dir)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    let config = replica_config(&dir.join("a"), &pki, addr, urls)?;
    if replicas > 1 {
        let text = std::fs::read_to_string(&config)?;
        std::fs::write(
            &config,
            text.replace(
                "[store.jetstream]\n",
                &format!("[store.jetstream]\nreplicas = {replicas}\n"),
            ),
        )?;
    }
    let hub = Hub::start_file(&config, addr)?;
    let creds = pki.issue_agent("line1")?;
    let agent_dir = dir.join("agent");
    let backlog: Vec<EventBody> = (1..=N).map(body).collect::<Result<_>>()?;
    fill_outbox(&agent_dir.join("data"), "line1", &backlog)?;
    let agent_toml = agent_dir.join("agent.toml");
    // No device: the backlog is all it sends.
    let text = agent_config(addr, &creds, SocketAddr::from(([127, 0, 0, 1], 1)));
    let text = text[..text.find("[[modbus.devices]]").context("device table")?].to_owned();
    std::fs::write(&agent_toml, text)?;
    let agent = Agent::start_file(&agent_toml)?;

    let first = urls.split(',').next().context("a url")?.to_owned();
    let js = client(&first).await?;
    wait_for("the first events in the stream", || async {
        Ok(count(&js).await? > 0)
    })
    .await?;
    drop(js);
    fault()?;
    let acked = |s: &serde_json::Value| s["acked_seq"].as_u64().unwrap_or(0);
    let during = agent_outbox_stats(&agent_toml)?;
    ensure!(
        acked(&during) < N,
        "all acknowledged before the fault: {during}"
    );
    back()?;
    wait_until(DEADLINE, "the agent's outbox to be acknowledged", || {
        agent_outbox_stats(&agent_toml)
            .map(|s| s["events"] == 0 && acked(&s) == N)
            .unwrap_or(false)
    })?;
    let js = client(&first).await?;
    check_once(&seqs_of(&js, "line1").await?, N)?;
    drop(agent);
    drop(hub);
    Ok(())
}

/// A single nats-server stopped and started again while a replica takes an
/// agent's backlog: nothing lost or doubled. (What a single server that
/// loses power keeps depends on its `sync_interval`; see scale-out.md.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_under_a_replica_loses_and_duplicates_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let nats = std::cell::RefCell::new(Some(nats_on(dir.path(), None)?));
    let (port, url) = {
        let n = nats.borrow();
        let n = n.as_ref().context("nats")?;
        (n.port, n.url())
    };
    let root = dir.path().to_owned();
    backlog_through_a_nats_outage(
        dir.path(),
        &url,
        1,
        || {
            if let Some(mut n) = nats.borrow_mut().take() {
                n.proc.term(Duration::from_secs(20))?;
            }
            Ok(())
        },
        || {
            *nats.borrow_mut() = Some(nats_on(&root, Some(port))?);
            Ok(())
        },
    )
    .await
}

/// Three nats-servers in a cluster, the stream and buckets with three
/// replicas, one server killed with SIGKILL while a replica takes an agent's
/// backlog and started again later: what the cluster acknowledged is on a
/// majority, so nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_cluster_node_killed_under_a_replica_loses_and_duplicates_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ports: Vec<u16> = (0..3)
        .map(|_| outpost_tests::free_port())
        .collect::<Result<_>>()?;
    let routes: Vec<u16> = (0..3)
        .map(|_| outpost_tests::free_port())
        .collect::<Result<_>>()?;
    let routes_list = routes
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(", ");
    let node = |i: usize| -> Result<Nats> {
        let d = dir.path().join(format!("n{i}"));
        std::fs::create_dir_all(&d)?;
        Nats::start_with(
            &d,
            ports[i],
            &format!(
                "{MAX_PAYLOAD}\nserver_name: n{i}\ncluster {{\n  name: outpost\n  listen: 127.0.0.1:{}\n  routes: [{routes_list}]\n}}\n",
                routes[i]
            ),
        )
    };
    let mut nodes: Vec<Option<Nats>> = (0..3).map(|i| node(i).map(Some)).collect::<Result<_>>()?;
    let urls = ports
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    // The cluster takes a moment to elect its JetStream meta leader: wait
    // until a three-replica stream can be made.
    let js = client(&format!("nats://127.0.0.1:{}", ports[0])).await?;
    wait_for("the JetStream cluster to form", || async {
        let made = js
            .get_or_create_stream(async_nats::jetstream::stream::Config {
                name: "PROBE".into(),
                subjects: vec!["probe".into()],
                num_replicas: 3,
                ..Default::default()
            })
            .await;
        Ok(made.is_ok())
    })
    .await?;
    // The cluster may still be settling under load: ask until it is done
    // (a repeat after a delete whose answer was lost finds no stream).
    retry_until(DEADLINE, "deleting the probe stream", || async {
        match js.delete_stream("PROBE").await {
            Ok(_) => Ok(()),
            Err(e) => match e.kind() {
                jetstream::context::DeleteStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    Ok(())
                }
                _ => Err(anyhow::anyhow!("{e}")),
            },
        }
    })
    .await?;
    drop(js);
    // Not the first node: the test's own reads go there.
    let victim = std::cell::RefCell::new(nodes[1].take());
    backlog_through_a_nats_outage(
        dir.path(),
        &urls,
        3,
        || {
            if let Some(mut n) = victim.borrow_mut().take() {
                n.proc.kill9();
            }
            Ok(())
        },
        || {
            *victim.borrow_mut() = Some(node(1)?);
            Ok(())
        },
    )
    .await
}

/// Two replicas with the same `[[sinks]]` (`sinks` appended to each one's
/// config), the agent behind a UDP proxy on replica A with a backlog of
/// `n` events and no device, and the fleet `policy` applied through A.
/// Its fields drop in order: the processes before their directory.
struct SinkFleet {
    _agent: Agent,
    hubs: [Option<Hub>; 2],
    proxy: UdpProxy,
    nats: Nats,
    addrs: [SocketAddr; 2],
    configs: [std::path::PathBuf; 2],
    agent_toml: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SinkFleet {
    /// `stream`: a stream to make for the sink, `(name, subjects)`, before
    /// the replicas start.
    async fn start(
        policy: &str,
        sinks: impl Fn(&str) -> String,
        n: u64,
        stream: Option<(&str, &str)>,
    ) -> Result<SinkFleet> {
        let dir = tempfile::tempdir()?;
        let nats = nats_on(dir.path(), None)?;
        if let Some((name, subjects)) = stream {
            client(&nats.url())
                .await?
                .create_stream(jetstream::stream::Config {
                    name: name.into(),
                    subjects: vec![subjects.into()],
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow::anyhow!("creating stream {name}: {e}"))?;
        }
        let pki = Pki::new(dir.path())?;
        let addrs = [
            SocketAddr::from(([127, 0, 0, 1], free_udp_port()?)),
            SocketAddr::from(([127, 0, 0, 1], free_udp_port()?)),
        ];
        let mut configs = Vec::new();
        for (name, addr) in ["a", "b"].iter().zip(addrs) {
            let config = replica_config(&dir.path().join(name), &pki, addr, &nats.url())?;
            let text = std::fs::read_to_string(&config)?;
            std::fs::write(&config, format!("{text}\n{}", sinks(&nats.url())))?;
            configs.push(config);
        }
        let configs: [std::path::PathBuf; 2] = [configs[0].clone(), configs[1].clone()];
        let hubs = [
            Some(Hub::start_file(&configs[0], addrs[0])?),
            Some(Hub::start_file(&configs[1], addrs[1])?),
        ];
        let file = dir.path().join("policy.toml");
        std::fs::write(&file, policy)?;
        let (code, out, err) = hub_verb(
            &configs[0],
            &["policy", "apply", file.to_str().context("path")?],
        )?;
        ensure!(code == 0, "policy apply exited {code}: {out}{err}");
        // Both replicas enforce it before the agent sends anything.
        for h in hubs.iter().flatten() {
            wait_until(DEADLINE, "the replica to enforce the policy", || {
                h.log().contains("New policy in force")
            })?;
        }
        let proxy = UdpProxy::start(addrs[0])?;
        let creds = pki.issue_agent("line1")?;
        let agent_dir = dir.path().join("agent");
        let backlog: Vec<EventBody> = (1..=n).map(body).collect::<Result<_>>()?;
        fill_outbox(&agent_dir.join("data"), "line1", &backlog)?;
        let agent_toml = agent_dir.join("agent.toml");
        let text = agent_config(proxy.addr(), &creds, SocketAddr::from(([127, 0, 0, 1], 1)));
        let text = text[..text.find("[[modbus.devices]]").context("device table")?].to_owned();
        std::fs::write(&agent_toml, text)?;
        let agent = Agent::start_file(&agent_toml)?;
        Ok(SinkFleet {
            _agent: agent,
            hubs,
            proxy,
            nats,
            addrs,
            configs,
            agent_toml,
            _dir: dir,
        })
    }

    /// The replicas whose log says they run the sink, and those standing by.
    fn roles(&self) -> (Vec<usize>, Vec<usize>) {
        let mut running = Vec::new();
        let mut standing = Vec::new();
        for (i, h) in self.hubs.iter().enumerate() {
            let Some(h) = h else { continue };
            let log = h.log();
            if log.contains("This replica runs the sink") {
                running.push(i);
            }
            if log.contains("standing by to take over") {
                standing.push(i);
            }
        }
        (running, standing)
    }

    fn outbox(&self) -> Result<serde_json::Value> {
        agent_outbox_stats(&self.agent_toml)
    }

    /// `sinks status --json` through replica `i`'s config, by sink.
    fn sinks_status(&self, i: usize) -> Result<BTreeMap<String, serde_json::Value>> {
        let (code, out, err) = hub_verb(&self.configs[i], &["sinks", "status", "--json"])?;
        ensure!(code == 0, "sinks status exited {code}: {out}{err}");
        outpost_tests::sinks_by_id(&out)
    }

    /// Waits until replica `i`'s `sinks status` satisfies `ok`: a delivery
    /// is recorded a moment after the far end has it, later still when a
    /// replica that took the sink over is under load. The last status read
    /// is in the error.
    fn wait_sinks_status(
        &self,
        i: usize,
        what: &str,
        ok: impl Fn(&BTreeMap<String, serde_json::Value>) -> bool,
    ) -> Result<()> {
        let mut last = None;
        let done = wait_until(DEADLINE, what, || match self.sinks_status(i) {
            Ok(s) => {
                let held = ok(&s);
                last = Some(Ok(s));
                held
            }
            Err(e) => {
                last = Some(Err(e));
                false
            }
        });
        done.with_context(|| format!("last status: {last:?}"))
    }
}

/// An MQTT sink configured on two replicas of a JetStream hub, its broker
/// down at first: one replica runs it and the other stands by; the agent's
/// acknowledgements wait while it is down (also after the agent moved to
/// the other replica), and once it is back the broker gets every event
/// once (which it would not if both replicas ran the sink), minimised as
/// the policy says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_on_two_replicas_is_run_by_one_and_holds_the_acks_back_while_down() -> Result<()> {
    const N: u64 = 3_000;
    let broker_dir = tempfile::tempdir()?;
    // Started once so that the watching subscriber's session exists (QoS 1
    // messages wait in it), then stopped.
    let mut broker = outpost_tests::Mosquitto::start(broker_dir.path())?;
    let port = broker.port;
    outpost_tests::mqtt_watcher(port, "watcher", DEADLINE)?
        .1
        .disconnect()?;
    std::thread::sleep(Duration::from_millis(200));
    broker.proc.term(Duration::from_secs(10))?;

    let sinks = |_: &str| {
        format!(
            "[[sinks]]\nid = \"cloud\"\nkind = \"mqtt\"\nretry_min = \"100ms\"\nretry_max = \"500ms\"\n\n[sinks.mqtt]\nbroker = \"127.0.0.1:{port}\"\nclient_id = \"hub-cloud\"\ntopic = \"fleet/{{agent_id}}/{{stream}}\"\n"
        )
    };
    // Minimised on the way: the sink gets `n` redacted.
    let policy = "[defaults]\nsinks = [\"store\", \"cloud\"]\n\n[[rules]]\nname = \"minimise\"\nstreams = [\"plant/#\"]\nredact = [\"/n\"]\nsinks = [\"store\", \"cloud\"]\n";
    let mut f = SinkFleet::start(policy, sinks, N, None).await?;
    let js = client(&f.nats.url()).await?;
    wait_for("the backlog in the events stream", || async {
        Ok(count(&js).await? >= N)
    })
    .await?;
    wait_until(
        DEADLINE,
        "one replica running the sink, one standing by",
        || {
            let (running, standing) = f.roles();
            running.len() == 1 && standing.len() == 1 && running != standing
        },
    )?;
    wait_until(
        DEADLINE,
        "the backlog queued for the sink and its failures counted",
        || {
            f.sinks_status(1)
                .map(|s| {
                    s["cloud"]["pending"] == N && s["cloud"]["failures"].as_u64().unwrap_or(0) >= 2
                })
                .unwrap_or(false)
        },
    )?;
    let held = f.outbox()?;
    ensure!(
        held["events"] == N && held["acked_seq"] == 0,
        "acknowledged while the sink is down: {held}"
    );

    // The agent moves to replica B; its acknowledgements still wait.
    let connected = |h: &Hub| h.log().matches("Agent connected").count();
    let hub_b = f.hubs[1].as_ref().context("B")?;
    f.proxy.set_upstream(f.addrs[1]);
    wait_until(DEADLINE, "the agent on replica B", || connected(hub_b) >= 1)?;
    let held = f.outbox()?;
    ensure!(held["events"] == N, "acknowledged on B: {held}");

    let _broker = outpost_tests::Mosquitto::start_on(broker_dir.path(), port)?;
    let (seen, watcher) = outpost_tests::mqtt_watcher(port, "watcher", DEADLINE)?;
    wait_until(DEADLINE, "the agent's outbox to be acknowledged", || {
        f.outbox()
            .map(|s| s["events"] == 0 && s["acked_seq"] == N)
            .unwrap_or(false)
    })?;
    wait_until(DEADLINE, "the broker to pass on every event", || {
        seen.lock().map(|v| v.len() as u64 >= N).unwrap_or(false)
    })?;
    // Anything doubled would arrive right behind.
    std::thread::sleep(Duration::from_millis(500));
    let mut got: BTreeMap<u64, usize> = BTreeMap::new();
    for (topic, j) in seen.lock().map(|v| v.clone()).unwrap_or_default() {
        ensure!(
            j["value"]["n"] == "[redacted]",
            "not minimised: {topic}: {j}"
        );
        *got.entry(j["seq"].as_u64().unwrap_or(0)).or_default() += 1;
    }
    check_once(&got, N)?;
    f.wait_sinks_status(0, "the sink's deliveries recorded", |s| {
        s["cloud"]["pending"] == 0 && s["cloud"]["delivered"] == N
    })?;
    // Each replica's metrics show the fleet's figures for the sink,
    // whichever replica runs it.
    // The replica standing by learns them from the store a moment later.
    for h in f.hubs.iter().flatten() {
        let line = format!("outpost_hub_sink_delivered_events_total{{sink=\"cloud\"}} {N}");
        let mut metrics = String::new();
        wait_until(DEADLINE, &format!("{line:?} in the metrics"), || {
            metrics = h.metrics().unwrap_or_else(|e| e.to_string());
            metrics.lines().any(|l| l == line)
        })
        .with_context(|| format!("last read:\n{metrics}"))?;
    }
    watcher.disconnect()?;
    f.hubs = [None, None];
    Ok(())
}

/// A JetStream sink on two replicas, the one that runs it killed with
/// SIGKILL while it delivers the agent's backlog: the other takes the sink
/// over once the lease lapses, the agent's outbox is acknowledged in full,
/// and the sink's stream holds every seq once (what the killed replica had
/// delivered without recording it goes again, and the stream drops it by
/// `Nats-Msg-Id`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replica_running_a_sink_killed_mid_delivery_leaves_every_seq_in_it_once() -> Result<()>
{
    const N: u64 = 20_000;
    const LAKE: &str = "LAKE";
    let sinks = |url: &str| {
        format!(
            "[[sinks]]\nid = \"lake\"\nkind = \"jetstream\"\nretry_min = \"100ms\"\nretry_max = \"500ms\"\nbatch_max = 200\n\n[sinks.jetstream]\nurl = \"{url}\"\nstream = \"{LAKE}\"\nsubject = \"lake.{{agent_id}}.{{stream}}\"\ntimeout = \"2s\"\n"
        )
    };
    let policy = "[defaults]\nsinks = [\"store\", \"lake\"]\n";
    let mut f = SinkFleet::start(policy, sinks, N, Some((LAKE, "lake.>"))).await?;
    let js = client(&f.nats.url()).await?;
    let lake = |js: jetstream::Context| async move { stream_len(&js, LAKE, DEADLINE).await };
    wait_until(DEADLINE, "one replica running the sink", || {
        f.roles().0.len() == 1
    })?;
    wait_for("the sink's first batches", || {
        let js = js.clone();
        async move { Ok(lake(js).await? >= 2_000) }
    })
    .await?;
    let (running, _) = f.roles();
    let victim = running[0];
    let survivor = 1 - victim;
    f.hubs[victim]
        .as_mut()
        .context("the running replica")?
        .proc
        .kill9();
    let at = lake(js.clone()).await?;
    ensure!(at < N, "the sink had everything before the kill: {at}");
    f.proxy.set_upstream(f.addrs[survivor]);
    wait_until(DEADLINE, "the agent's outbox to be acknowledged", || {
        f.outbox()
            .map(|s| s["events"] == 0 && s["acked_seq"] == N)
            .unwrap_or(false)
    })?;
    let survivor_log = f.hubs[survivor].as_ref().context("survivor")?.log();
    ensure!(
        survivor_log.contains("This replica runs the sink"),
        "the survivor did not take the sink over:\n{survivor_log}"
    );
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    for m in stream_messages(&js, LAKE, DEADLINE).await? {
        let id = msg_id(&m).context("a message without Nats-Msg-Id")?;
        let (_, seq) = id.rsplit_once(':').context("Nats-Msg-Id is agent:seq")?;
        *seen.entry(seq.parse::<u64>()?).or_default() += 1;
    }
    check_once(&seen, N)?;
    check_once(&seqs_of(&js, "line1").await?, N)?;
    f.wait_sinks_status(survivor, "the sink's deliveries recorded", |s| {
        s["lake"]["pending"] == 0
    })?;
    Ok(())
}
