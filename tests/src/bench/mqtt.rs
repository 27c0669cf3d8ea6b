//! Measurement 2: MQTT QoS 1 ingest through one Mosquitto, in two shapes,
//! and QoS 2 (exactly once) in the second.
//!
//! The baseline is a bare rumqttc subscriber (QoS 1, automatic acks,
//! persistent session) that counts what arrives and stores nothing; ours is
//! the real `outpost-agent` process, which acknowledges each message only
//! after its outbox transaction has committed (synchronous=FULL, the default).
//!
//! - Live: one rumqttc publisher sends N messages while the subscriber is
//!   connected; the clock runs from the first publish to the N-th message
//!   received (baseline) or in the outbox (ours, seen by polling
//!   `OutboxReader::stats().accepted_total`). One publisher is often the
//!   limit here, so its own finish (its last PUBACK) is recorded too: if it
//!   is as late as the subscriber's, this shape only shows that the
//!   subscriber keeps up.
//! - Drain: the subscriber makes its persistent session and goes away, the
//!   publisher sends N messages that the broker queues for it, and the clock
//!   runs from the subscriber's reconnect (ours: the agent process's start)
//!   to the N-th message received or stored. This is what the broker can
//!   deliver, with no publisher in the way.
//! - QoS 2 drain: the drain with every message published, queued and
//!   delivered at QoS 2 (PUBREC, PUBREL, PUBCOMP per message): the bare
//!   subscriber's rumqttc completes each handshake as it comes, the agent
//!   stores each message once (its outbox keeps the packet ids between
//!   PUBREC and PUBREL); anything stored beyond N is a FAIL row.
//!
//! The publisher and the bare subscriber each run on their own one-thread
//! runtime, as if they were processes of their own like the agent. Probe
//! messages make sure a subscriber is connected and subscribed before the
//! clock starts; every run uses its own topic prefix and client ids, so that
//! a persistent session left by an earlier run receives nothing.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use outpost_tests::Mosquitto;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::procfs::{clock_ticks, CpuWindow};
use super::procs::{outbox_reader, Bins};
use super::report::{median, per_sec, ratio_row, thousands, Goal, Row, Verdict};
use super::workload::{payload, topic, PAYLOAD_LEN};

/// The publisher's and the bare subscriber's in-flight window; the broker's
/// `max_inflight_messages` is 1000 (see `Mosquitto::start`).
const INFLIGHT: u16 = 1000;

/// How often the outbox is looked at while measuring ours.
const POLL: Duration = Duration::from_millis(5);

/// How big a run is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    /// Messages per run.
    pub(crate) messages: usize,
    /// Runs of each; the median is reported.
    pub(crate) reps: usize,
}

/// What one run measured.
pub(crate) struct Sample {
    /// Messages per second, first publish to the N-th received or stored.
    pub(crate) rate: f64,
    /// Messages per second, first publish to the publisher's last PUBACK.
    pub(crate) publisher: f64,
}

/// What the measured agent runs with besides its MQTT source.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Setup<'a> {
    /// `[agent] labels` as a TOML inline table; empty: none.
    pub(crate) labels: &'a str,
    /// The `policy.json` put in the agent's data directory before it first
    /// starts (see `outpost_agent::policy`); `None`: no policy.
    pub(crate) policy_json: Option<&'a str>,
    /// Subscribe (and, in the drain, publish) at QoS 2 instead of QoS 1.
    pub(crate) qos2: bool,
}

impl Setup<'_> {
    /// The QoS of the run.
    fn qos(&self) -> QoS {
        if self.qos2 {
            QoS::ExactlyOnce
        } else {
            QoS::AtLeastOnce
        }
    }

    /// Installs the policy, if any, in `data_dir`.
    fn install(&self, data_dir: &Path) -> Result<()> {
        if let Some(json) = self.policy_json {
            std::fs::create_dir_all(data_dir)?;
            std::fs::write(data_dir.join(outpost_agent::policy::FILE_NAME), json)
                .context("install policy.json")?;
        }
        Ok(())
    }
}

/// A one-thread runtime standing in for a process of its own.
pub(crate) fn runtime(name: &str) -> Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .with_context(|| format!("start the {name} runtime"))
}

/// A connected rumqttc client whose event loop runs on its runtime.
pub(crate) struct Client {
    pub(crate) rt: Handle,
    pub(crate) client: AsyncClient,
    task: JoinHandle<()>,
    /// Publishes received (subscriber) or PUBACKs received (publisher).
    count: Arc<AtomicU64>,
    /// When `count` reaches this...
    target: Arc<AtomicU64>,
    /// ...the instant is recorded here.
    done: Arc<Mutex<Option<Instant>>>,
    /// Set by the event loop if it failed.
    failed: Arc<Mutex<Option<String>>>,
    /// The QoS of its subscription and of what it publishes.
    qos: QoS,
}

impl Client {
    /// Connects and waits for CONNACK (and SUBACK if `subscribe` is given).
    /// The instant `count` reaches `target` is recorded (see
    /// [`Client::finish_at`]).
    pub(crate) fn connect(
        rt: Handle,
        port: u16,
        id: &str,
        clean_session: bool,
        subscribe: Option<String>,
        target: u64,
    ) -> Result<Client> {
        Client::connect_qos(
            rt,
            port,
            id,
            clean_session,
            subscribe,
            target,
            QoS::AtLeastOnce,
        )
    }

    /// [`Client::connect`] subscribing and publishing at `qos`; a publisher
    /// counts PUBACKs (QoS 1) or PUBCOMPs (QoS 2).
    pub(crate) fn connect_qos(
        rt: Handle,
        port: u16,
        id: &str,
        clean_session: bool,
        subscribe: Option<String>,
        target: u64,
        qos: QoS,
    ) -> Result<Client> {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(clean_session)
            .set_inflight(INFLIGHT)
            .set_manual_acks(false);
        let (client, mut events) = AsyncClient::new(opts, usize::from(INFLIGHT));
        let count = Arc::new(AtomicU64::new(0));
        let target = Arc::new(AtomicU64::new(target));
        let done = Arc::new(Mutex::new(None));
        let failed = Arc::new(Mutex::new(None));
        let (ready_tx, ready_rx) = oneshot::channel::<()>();
        let wants_suback = subscribe.is_some();
        let task = {
            let (count, target, done, failed) =
                (count.clone(), target.clone(), done.clone(), failed.clone());
            rt.spawn(async move {
                let mut ready = Some(ready_tx);
                loop {
                    match events.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) if !wants_suback => {
                            if let Some(r) = ready.take() {
                                let _ = r.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(r) = ready.take() {
                                let _ = r.send(());
                            }
                        }
                        Ok(Event::Incoming(
                            Packet::Publish(_) | Packet::PubAck(_) | Packet::PubComp(_),
                        )) => {
                            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                            if n == target.load(Ordering::SeqCst) {
                                if let Ok(mut d) = done.lock() {
                                    *d = Some(Instant::now());
                                }
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            if let Ok(mut f) = failed.lock() {
                                *f = Some(e.to_string());
                            }
                            return;
                        }
                    }
                }
            })
        };
        if let Some(filter) = subscribe {
            rt.block_on(client.subscribe(filter, qos))?;
        }
        let what = if wants_suback { "SUBACK" } else { "CONNACK" };
        let ready =
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), ready_rx).await });
        if !matches!(ready, Ok(Ok(()))) {
            task.abort();
            let why = failed.lock().ok().and_then(|f| f.clone());
            bail!(
                "MQTT client {id}: no {what} from 127.0.0.1:{port}: {}",
                why.unwrap_or_else(|| "timed out".into())
            );
        }
        Ok(Client {
            rt,
            client,
            task,
            count,
            target,
            done,
            failed,
            qos,
        })
    }

    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Records the instant `count` reaches `n`.
    pub(crate) fn finish_at(&self, n: u64) {
        self.target.store(n, Ordering::SeqCst);
    }

    pub(crate) fn finished(&self) -> Option<Instant> {
        self.done.lock().ok().and_then(|d| *d)
    }

    pub(crate) fn check(&self) -> Result<()> {
        if let Some(e) = self.failed.lock().ok().and_then(|f| f.clone()) {
            bail!("MQTT connection failed: {e}");
        }
        Ok(())
    }

    /// Publishes `n` messages under `prefix` in a task on its runtime.
    fn publish_all(&self, prefix: &str, n: usize) -> JoinHandle<Result<(), rumqttc::ClientError>> {
        let client = self.client.clone();
        let prefix = prefix.to_owned();
        let qos = self.qos;
        self.rt.spawn(async move {
            for i in 0..n {
                client
                    .publish(topic(&prefix, i), qos, false, payload(i))
                    .await?;
            }
            Ok(())
        })
    }

    pub(crate) fn close(self) {
        let _ = self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(2), self.client.disconnect()).await
        });
        self.task.abort();
    }
}

/// Publishes probes to `prefix/warm` until `received()` is at least 1, then
/// waits until it stops moving. Returns (its settled value, probes sent).
fn warm_up(
    publisher: &Client,
    prefix: &str,
    mut received: impl FnMut() -> Result<u64>,
) -> Result<(u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let warm = format!("{prefix}/warm");
    let mut sent = 0usize;
    while received()? == 0 {
        if Instant::now() > deadline {
            bail!("the subscriber received none of {sent} probe messages in 30 s");
        }
        publisher.check()?;
        publisher.rt.block_on(publisher.client.publish(
            &warm,
            QoS::AtLeastOnce,
            false,
            payload(sent),
        ))?;
        sent += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut last = received()?;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = received()?;
        if now == last && publisher.count() == sent as u64 {
            return Ok((now, sent as u64));
        }
        last = now;
        if Instant::now() > deadline {
            bail!("the probe messages did not settle in 30 s");
        }
    }
}

/// How long to wait for a run before calling it failed.
pub(crate) fn run_timeout(n: usize) -> Duration {
    // 1,000 msg/s is far below anything sane on loopback.
    Duration::from_secs(30 + n as u64 / 1000)
}

/// Waits for the publisher's last PUBACK and its task; returns its msg/s.
fn publisher_done(
    publ: &Client,
    sending: JoinHandle<Result<(), rumqttc::ClientError>>,
    started: Instant,
    n: usize,
) -> Result<f64> {
    publ.rt
        .block_on(sending)
        .context("publisher task")?
        .context("publish")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(at) = publ.finished() {
            return Ok(per_sec(n as u64, at.duration_since(started)));
        }
        publ.check()?;
        if Instant::now() > deadline {
            bail!("the publisher's PUBACKs did not all arrive");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The bare subscriber.
fn baseline(port: u16, run: usize, n: usize) -> Result<Sample> {
    let (pub_rt, sub_rt) = (runtime("publisher")?, runtime("subscriber")?);
    let prefix = format!("bench/base{run}");
    let sub = Client::connect(
        sub_rt.handle().clone(),
        port,
        &format!("bench-sub-{run}"),
        false,
        Some(format!("{prefix}/#")),
        u64::MAX,
    )?;
    let publ = Client::connect(
        pub_rt.handle().clone(),
        port,
        &format!("bench-pub-base-{run}"),
        true,
        None,
        u64::MAX,
    )?;
    let (base, probes) = warm_up(&publ, &prefix, || Ok(sub.count()))?;
    sub.finish_at(base + n as u64);
    publ.finish_at(probes + n as u64);

    let started = Instant::now();
    let sending = publ.publish_all(&prefix, n);
    let deadline = started + run_timeout(n);
    let finished = loop {
        if let Some(at) = sub.finished() {
            break at;
        }
        sub.check()?;
        publ.check()?;
        if Instant::now() > deadline {
            bail!(
                "the bare subscriber received {} of {n} messages in {:?}",
                sub.count() - base,
                run_timeout(n)
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let publisher = publisher_done(&publ, sending, started, n)?;
    sub.close();
    publ.close();
    Ok(Sample {
        rate: per_sec(n as u64, finished.duration_since(started)),
        publisher,
    })
}

/// The agent's config for the MQTT run.
fn agent_config(
    data_dir: &Path,
    port: u16,
    id: &str,
    prefix: &str,
    labels: &str,
    qos: u8,
) -> String {
    let labels = if labels.is_empty() {
        String::new()
    } else {
        format!("labels = {labels}\n")
    };
    format!(
        r#"[agent]
data_dir = "{}"
{labels}
[mqtt]
broker = "127.0.0.1:{port}"
client_id = "outpost-bench-{id}"

[[mqtt.subscribe]]
filter = "{prefix}/#"
qos = {qos}

[observability]
metrics = ""
"#,
        data_dir.display()
    )
}

/// Where [`ours`] runs the agent of run `run`: its outbox is
/// `data/outbox.db` in there.
pub(crate) fn agent_home(dir: &Path, run: usize) -> PathBuf {
    dir.join(format!("agent-mqtt-{run}"))
}

/// The real agent, with `setup`: returns the sample and how many events it
/// stored beyond N (duplicates). Its topics are `bench/agent<run>/sensor/<k>`.
pub(crate) fn ours(
    bins: &Bins,
    dir: &Path,
    port: u16,
    run: usize,
    n: usize,
    setup: Setup<'_>,
) -> Result<(Sample, u64)> {
    let pub_rt = runtime("publisher")?;
    let prefix = format!("bench/agent{run}");
    let home = agent_home(dir, run);
    std::fs::create_dir_all(&home)?;
    let data_dir = home.join("data");
    setup.install(&data_dir)?;
    let mut agent = bins.start_agent(
        &home,
        &agent_config(&data_dir, port, &run.to_string(), &prefix, setup.labels, 1),
    )?;
    let reader = outbox_reader(&home, &mut agent)?;
    let accepted = || -> Result<u64> { Ok(reader.stats()?.accepted_total) };
    let log = home.join("agent.log");

    let publ = Client::connect(
        pub_rt.handle().clone(),
        port,
        &format!("bench-pub-agent-{run}"),
        true,
        None,
        u64::MAX,
    )?;
    let (base, probes) = warm_up(&publ, &prefix, &accepted)?;
    let goal = base + n as u64;
    publ.finish_at(probes + n as u64);

    let started = Instant::now();
    let sending = publ.publish_all(&prefix, n);
    let deadline = started + run_timeout(n);
    let finished = loop {
        let now = accepted()?;
        if now >= goal {
            break Instant::now();
        }
        publ.check()?;
        if !agent.proc.is_running() {
            bail!(
                "the agent exited with {} of {n} messages stored (log: {})",
                now - base,
                log.display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the agent stored {} of {n} messages in {:?} (log: {})",
                now - base,
                run_timeout(n),
                log.display()
            );
        }
        std::thread::sleep(POLL);
    };
    let publisher = publisher_done(&publ, sending, started, n)?;
    // Anything stored beyond N would be a duplicate: give stragglers a moment.
    std::thread::sleep(Duration::from_millis(500));
    let extra = accepted()?.saturating_sub(goal);
    publ.close();
    agent.proc.term(Duration::from_secs(20))?;
    Ok((
        Sample {
            rate: per_sec(n as u64, finished.duration_since(started)),
            publisher,
        },
        extra,
    ))
}

/// Publishes `n` messages under `prefix` and waits for every PUBACK: the
/// broker then holds them all for the absent subscriber's session.
fn preload(port: u16, id: &str, prefix: &str, n: usize, qos: QoS) -> Result<()> {
    let rt = runtime("publisher")?;
    let publ = Client::connect_qos(rt.handle().clone(), port, id, true, None, n as u64, qos)?;
    let started = Instant::now();
    let sending = publ.publish_all(prefix, n);
    let rate = publisher_done(&publ, sending, started, n)?;
    eprintln!(
        "mqtt: {} messages queued at the broker for {prefix}/# ({}/s)",
        thousands(n as f64),
        thousands(rate)
    );
    publ.close();
    Ok(())
}

/// The bare subscriber draining `n` messages the broker queued for its
/// persistent session while it was away: returns msg/s from its reconnect to
/// the N-th message.
fn baseline_drain(port: u16, run: usize, n: usize, qos: QoS) -> Result<f64> {
    let q = qos as u8;
    let prefix = format!("bench/q{q}base{run}");
    let id = format!("bench-q{q}sub-{run}");
    let publisher_id = format!("bench-q{q}pub-base-{run}");
    {
        // The session and its subscription exist, proven by a probe.
        let (pub_rt, sub_rt) = (runtime("publisher")?, runtime("subscriber")?);
        let sub = Client::connect_qos(
            sub_rt.handle().clone(),
            port,
            &id,
            false,
            Some(format!("{prefix}/#")),
            u64::MAX,
            qos,
        )?;
        let publ = Client::connect(
            pub_rt.handle().clone(),
            port,
            &publisher_id,
            true,
            None,
            u64::MAX,
        )?;
        warm_up(&publ, &prefix, || Ok(sub.count()))?;
        publ.close();
        sub.close();
    }
    preload(port, &publisher_id, &prefix, n, qos)?;

    drain_bare(port, &id, n, run_timeout(n))
}

/// Reconnects the bare subscriber of persistent session `id` and times it
/// from there to the `n`-th message the broker had queued for it: msg/s.
pub(crate) fn drain_bare(port: u16, id: &str, n: usize, timeout: Duration) -> Result<f64> {
    let sub_rt = runtime("subscriber")?;
    let started = Instant::now();
    let sub = Client::connect(sub_rt.handle().clone(), port, id, false, None, n as u64)?;
    let deadline = started + timeout;
    let finished = loop {
        if let Some(at) = sub.finished() {
            break at;
        }
        sub.check()?;
        if Instant::now() > deadline {
            bail!(
                "the bare subscriber drained {} of {n} queued messages in {timeout:?}",
                sub.count(),
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    sub.close();
    Ok(per_sec(n as u64, finished.duration_since(started)))
}

/// The agent, with `setup`, draining `n` messages the broker queued for its
/// persistent session while it was stopped. Its topics are
/// `bench/qagent<run>/sensor/<k>`.
pub(crate) fn ours_drain(
    bins: &Bins,
    dir: &Path,
    port: u16,
    run: usize,
    n: usize,
    setup: Setup<'_>,
) -> Result<Drain> {
    let q = setup.qos() as u8;
    let prefix = format!("bench/q{q}agent{run}");
    let home = dir.join(format!("agent-mqtt-drain-q{q}-{run}"));
    std::fs::create_dir_all(&home)?;
    setup.install(&home.join("data"))?;
    let config = agent_config(
        &home.join("data"),
        port,
        &format!("q{q}-{run}"),
        &prefix,
        setup.labels,
        q,
    );
    let log = home.join("agent.log");
    let publisher_id = format!("bench-q{q}pub-agent-{run}");
    let base = {
        // The session and its subscription exist, proven by a probe.
        let mut agent = bins.start_agent(&home, &config)?;
        let reader = outbox_reader(&home, &mut agent)?;
        let pub_rt = runtime("publisher")?;
        let publ = Client::connect(
            pub_rt.handle().clone(),
            port,
            &publisher_id,
            true,
            None,
            u64::MAX,
        )?;
        let (base, _) = warm_up(&publ, &prefix, || Ok(reader.stats()?.accepted_total))?;
        publ.close();
        let status = agent.proc.term(Duration::from_secs(20))?;
        if !status.success() {
            bail!("the agent stopped with {status} (log: {})", log.display());
        }
        base
    };
    preload(port, &publisher_id, &prefix, n, setup.qos())?;

    let goal = base + n as u64;
    let started = Instant::now();
    let mut agent = bins.start_agent(&home, &config)?;
    let cpu = CpuWindow::start(agent.proc.child.id())?;
    let reader = outbox_reader(&home, &mut agent)?;
    let accepted = || -> Result<u64> { Ok(reader.stats()?.accepted_total) };
    let deadline = started + run_timeout(n);
    let finished = loop {
        let now = accepted()?;
        if now >= goal {
            break Instant::now();
        }
        if !agent.proc.is_running() {
            bail!(
                "the agent exited with {} of {n} queued messages stored (log: {})",
                now - base,
                log.display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the agent stored {} of {n} queued messages in {:?} (log: {})",
                now - base,
                run_timeout(n),
                log.display()
            );
        }
        std::thread::sleep(POLL);
    };
    let (cpu, _) = cpu.stop(clock_ticks())?;
    let txs = reader.stats()?.transactions_total;
    std::thread::sleep(Duration::from_millis(500));
    let extra = accepted()?.saturating_sub(goal);
    agent.proc.term(Duration::from_secs(20))?;
    Ok(Drain {
        rate: per_sec(n as u64, finished.duration_since(started)),
        cpu,
        transactions: txs,
        extra,
    })
}

/// What the agent's drain measured.
pub(crate) struct Drain {
    /// Messages per second, agent start to the N-th stored.
    pub(crate) rate: f64,
    /// The agent's CPU over the drain, % of one core.
    pub(crate) cpu: f64,
    /// Outbox transactions so far (the probe's and the drain's).
    pub(crate) transactions: u64,
    /// Events stored beyond N.
    pub(crate) extra: u64,
}

/// The goal of the QoS 1 and QoS 2 rows: the agent at least this share of a
/// bare subscriber through the same broker (issue 24).
const GOAL: f64 = 0.9;

/// Runs the MQTT measurement in `dir` and returns its rows.
pub(crate) fn run(bins: &Bins, dir: &Path, p: Params) -> Result<Vec<Row>> {
    let broker_dir = dir.join("mosquitto");
    std::fs::create_dir_all(&broker_dir)?;
    let broker = Mosquitto::start(&broker_dir)?;
    let (mut live, mut drain, mut drain2) = (Vec::new(), Vec::new(), Vec::new());
    let (mut base_pub, mut ours_pub) = (Vec::new(), Vec::new());
    let (mut ours_q_cpu, mut ours_q2_cpu) = (Vec::new(), Vec::new());
    let (mut duplicates, mut duplicates2) = (0, 0);
    let qos2 = Setup {
        qos2: true,
        ..Setup::default()
    };
    for rep in 0..p.reps {
        let b = baseline(broker.port, rep, p.messages)?;
        let (o, extra) = ours(bins, dir, broker.port, rep, p.messages, Setup::default())?;
        duplicates += extra;
        eprintln!(
            "mqtt run {}: bare subscriber {}/s (publisher done at {}/s), agent {}/s (publisher done at {}/s)",
            rep + 1,
            thousands(b.rate),
            thousands(b.publisher),
            thousands(o.rate),
            thousands(o.publisher)
        );
        live.push((o.rate, b.rate));
        base_pub.push(b.publisher);
        ours_pub.push(o.publisher);

        let bq = baseline_drain(broker.port, rep, p.messages, QoS::AtLeastOnce)?;
        let oq = ours_drain(bins, dir, broker.port, rep, p.messages, Setup::default())?;
        duplicates += oq.extra;
        eprintln!(
            "mqtt drain run {}: bare subscriber {}/s, agent {}/s ({:.0}% of one core, {} transactions, ~{} events each)",
            rep + 1,
            thousands(bq),
            thousands(oq.rate),
            oq.cpu,
            oq.transactions,
            thousands(p.messages as f64 / oq.transactions.max(1) as f64)
        );
        drain.push((oq.rate, bq));
        ours_q_cpu.push(oq.cpu);

        let bq2 = baseline_drain(broker.port, rep, p.messages, QoS::ExactlyOnce)?;
        let oq2 = ours_drain(bins, dir, broker.port, rep, p.messages, qos2)?;
        duplicates2 += oq2.extra;
        eprintln!(
            "mqtt QoS 2 drain run {}: bare subscriber {}/s, agent {}/s ({:.0}% of one core, {} stored beyond N)",
            rep + 1,
            thousands(bq2),
            thousands(oq2.rate),
            oq2.cpu,
            oq2.extra
        );
        drain2.push((oq2.rate, bq2));
        ours_q2_cpu.push(oq2.cpu);
    }
    let mut rows = vec![
        ratio_row(
            format!(
                "MQTT QoS 1 live: {} × {PAYLOAD_LEN}-byte messages published while subscribed, first publish → last stored (msg/s; agent synchronous=FULL)",
                thousands(p.messages as f64)
            ),
            "/s",
            &live,
            Goal::AtLeast(GOAL),
        ),
        ratio_row(
            format!(
                "MQTT QoS 1 drain: {} × {PAYLOAD_LEN}-byte messages queued at Mosquitto for a persistent session, subscriber (re)start → last stored (msg/s; agent synchronous=FULL, {:.0}% of one core meanwhile)",
                thousands(p.messages as f64),
                median(&ours_q_cpu)
            ),
            "/s",
            &drain,
            Goal::AtLeast(GOAL),
        ),
        ratio_row(
            format!(
                "MQTT QoS 2 drain, exactly once: {} × {PAYLOAD_LEN}-byte QoS 2 messages queued at Mosquitto for a persistent QoS 2 session, subscriber (re)start → last stored (msg/s; agent synchronous=FULL, {:.0}% of one core meanwhile; baseline a bare QoS 2 subscriber)",
                thousands(p.messages as f64),
                median(&ours_q2_cpu)
            ),
            "/s",
            &drain2,
            Goal::AtLeast(GOAL),
        ),
        Row {
            what: "MQTT live, same runs: the publisher's own rate, first publish → its last PUBACK (msg/s)"
                .into(),
            ours: format!("{}/s", thousands(median(&ours_pub))),
            baseline: format!("{}/s", thousands(median(&base_pub))),
            ratio: "-".into(),
            target: "-".into(),
            verdict: Verdict::Info,
        },
    ];
    for (qos, extra) in [(1, duplicates), (2, duplicates2)] {
        if extra > 0 {
            rows.push(Row {
                what: format!("MQTT QoS {qos} ingest: events stored beyond the messages sent"),
                ours: thousands(extra as f64),
                baseline: "-".into(),
                ratio: "-".into(),
                target: "0 (no redelivery happened)".into(),
                verdict: Verdict::Fail,
            });
        }
    }
    Ok(rows)
}
