//! Sparkplug B ingest through one Mosquitto, in the MQTT drain row's shape.
//!
//! An edge node's session (an NBIRTH defining `METRICS` metrics with aliases,
//! then N NDATA messages of `METRICS` metrics each, by alias only, seq 1, 2,
//! … modulo 256) is queued at the broker for a persistent session while its
//! subscriber is away; the clock runs from the subscriber's (re)start to the
//! last message received (the baseline: a bare rumqttc subscriber, QoS 1,
//! that counts messages and decodes nothing) or to the last metric stored
//! (ours: the real `outpost-agent` with `[[mqtt.sparkplug]]`, which decodes
//! each payload, resolves the aliases, checks the seq and stores one event
//! per metric, synchronous=FULL). Each run uses its own group, so a session
//! of an earlier run receives nothing. The payloads are encoded with the
//! agent's own prost messages: this measures speed, not correctness (the
//! e2e test uses an independent encoder).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use outpost_protocols::sparkplug::payload::{Metric, MetricValue, Payload};
use outpost_tests::Mosquitto;
use rumqttc::QoS;

use super::mqtt::{drain_bare, run_timeout, runtime, Client};
use super::procfs::{clock_ticks, CpuWindow};
use super::procs::{outbox_reader, Bins};
use super::report::{median, per_sec, samples, thousands, Row, Verdict};

/// Metrics per message.
const METRICS: usize = 10;

/// How big a run is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    /// NDATA messages per run.
    pub(crate) messages: usize,
    /// Runs of each; the median is reported.
    pub(crate) reps: usize,
}

fn payload(seq: u64, birth: bool, i: usize) -> Vec<u8> {
    let mut metrics: Vec<Metric> = (0..METRICS)
        .map(|k| Metric {
            name: birth.then(|| format!("line/sensor{k}")),
            alias: Some(k as u64 + 1),
            datatype: birth.then_some(10),
            value: Some(MetricValue::DoubleValue(i as f64 + k as f64 / 10.0)),
            ..Metric::default()
        })
        .collect();
    if birth {
        metrics.push(Metric {
            name: Some("bdSeq".into()),
            datatype: Some(8),
            value: Some(MetricValue::LongValue(0)),
            ..Metric::default()
        });
    }
    Payload {
        timestamp: Some(1_796_558_400_000 + i as u64),
        seq: Some(seq % 256),
        metrics,
        ..Payload::default()
    }
    .to_bytes()
}

/// Events the agent stores for a birth.
const BIRTH_EVENTS: u64 = METRICS as u64 + 1;

/// Publishes NBIRTHs of node `warm` until `received()` moves, then waits
/// until it settles: the subscription is in place. Returns its value.
fn warm_up(publ: &Client, group: &str, mut received: impl FnMut() -> Result<u64>) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let topic = format!("spBv1.0/{group}/NBIRTH/warm");
    while received()? == 0 {
        if Instant::now() > deadline {
            bail!("the subscriber received no probe birth in 30 s");
        }
        publ.check()?;
        publ.rt.block_on(publ.client.publish(
            &topic,
            QoS::AtLeastOnce,
            false,
            payload(0, true, 0),
        ))?;
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut last = received()?;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = received()?;
        if now == last {
            return Ok(now);
        }
        last = now;
        if Instant::now() > deadline {
            bail!("the probe births did not settle in 30 s");
        }
    }
}

/// Queues a node's NBIRTH and `n` NDATA at the broker and waits for every
/// PUBACK.
fn preload(port: u16, id: &str, group: &str, n: usize) -> Result<()> {
    let rt = runtime("publisher")?;
    let publ = Client::connect(rt.handle().clone(), port, id, true, None, n as u64 + 1)?;
    let client = publ.client.clone();
    let group = group.to_owned();
    let sending = rt.spawn(async move {
        client
            .publish(
                format!("spBv1.0/{group}/NBIRTH/gw"),
                QoS::AtLeastOnce,
                false,
                payload(0, true, 0),
            )
            .await?;
        for i in 1..=n {
            client
                .publish(
                    format!("spBv1.0/{group}/NDATA/gw"),
                    QoS::AtLeastOnce,
                    false,
                    payload(i as u64, false, i),
                )
                .await?;
        }
        Ok::<_, rumqttc::ClientError>(())
    });
    rt.block_on(sending)??;
    let deadline = Instant::now() + Duration::from_secs(60);
    while publ.finished().is_none() {
        publ.check()?;
        if Instant::now() > deadline {
            bail!("the publisher's PUBACKs did not all arrive");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    publ.close();
    Ok(())
}

/// The bare subscriber draining the queued session: msg/s.
fn baseline(port: u16, run: usize, n: usize) -> Result<f64> {
    let group = format!("bbase{run}");
    let id = format!("bench-spsub-{run}");
    let publisher_id = format!("bench-sppub-base-{run}");
    {
        let (pub_rt, sub_rt) = (runtime("publisher")?, runtime("subscriber")?);
        let sub = Client::connect(
            sub_rt.handle().clone(),
            port,
            &id,
            false,
            Some(format!("spBv1.0/{group}/#")),
            u64::MAX,
        )?;
        let publ = Client::connect(
            pub_rt.handle().clone(),
            port,
            &publisher_id,
            true,
            None,
            u64::MAX,
        )?;
        warm_up(&publ, &group, || Ok(sub.count()))?;
        publ.close();
        sub.close();
    }
    preload(port, &publisher_id, &group, n)?;
    drain_bare(port, &id, n + 1, run_timeout(n * METRICS))
}

/// The agent draining the queued session: (msg/s, % of one core).
fn ours(bins: &Bins, dir: &Path, port: u16, run: usize, n: usize) -> Result<(f64, f64)> {
    let group = format!("bagent{run}");
    let home = dir.join(format!("agent-sparkplug-{run}"));
    std::fs::create_dir_all(&home)?;
    let config = format!(
        r#"[agent]
data_dir = "{}"

[mqtt]
broker = "127.0.0.1:{port}"
client_id = "outpost-bench-sparkplug-{run}"

[[mqtt.sparkplug]]
group = "{group}"

[observability]
metrics = ""
"#,
        home.join("data").display()
    );
    let log = home.join("agent.log");
    let publisher_id = format!("bench-sppub-agent-{run}");
    let base = {
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
        let base = warm_up(&publ, &group, || Ok(reader.stats()?.accepted_total))?;
        publ.close();
        let status = agent.proc.term(Duration::from_secs(20))?;
        if !status.success() {
            bail!("the agent stopped with {status} (log: {})", log.display());
        }
        base
    };
    preload(port, &publisher_id, &group, n)?;

    let goal = base + BIRTH_EVENTS + (n * METRICS) as u64;
    let started = Instant::now();
    let mut agent = bins.start_agent(&home, &config)?;
    let cpu = CpuWindow::start(agent.proc.child.id())?;
    let reader = outbox_reader(&home, &mut agent)?;
    let deadline = started + run_timeout(n * METRICS);
    let finished = loop {
        let now = reader.stats()?.accepted_total;
        if now >= goal {
            break Instant::now();
        }
        if !agent.proc.is_running() {
            bail!(
                "the agent exited with {} of {} events stored (log: {})",
                now - base,
                goal - base,
                log.display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the agent stored {} of {} events in time (log: {})",
                now - base,
                goal - base,
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let (cpu, _) = cpu.stop(clock_ticks())?;
    std::thread::sleep(Duration::from_millis(500));
    let extra = reader.stats()?.accepted_total.saturating_sub(goal);
    agent.proc.term(Duration::from_secs(20))?;
    if extra > 0 {
        bail!(
            "the agent stored {extra} events beyond the {} sent",
            goal - base
        );
    }
    Ok((per_sec(n as u64 + 1, finished.duration_since(started)), cpu))
}

/// Runs the Sparkplug measurement in `dir` and returns its row.
pub(crate) fn run(bins: &Bins, dir: &Path, p: Params) -> Result<Vec<Row>> {
    let broker_dir = dir.join("mosquitto-sparkplug");
    std::fs::create_dir_all(&broker_dir)?;
    let broker = Mosquitto::start(&broker_dir)?;
    let (mut base, mut ours_v, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..p.reps {
        let b = baseline(broker.port, rep, p.messages)?;
        let (o, c) = ours(bins, dir, broker.port, rep, p.messages)?;
        eprintln!(
            "sparkplug drain run {}: bare subscriber {}/s, agent {}/s ({:.0}% of one core)",
            rep + 1,
            thousands(b),
            thousands(o),
            c
        );
        base.push(b);
        ours_v.push(o);
        cpu.push(c);
    }
    eprintln!(
        "sparkplug drain: bare subscriber [{}], agent [{}]",
        samples(&base),
        samples(&ours_v)
    );
    let (b, o) = (median(&base), median(&ours_v));
    Ok(vec![Row {
        what: format!(
            "Sparkplug B drain: an NBIRTH and {} NDATA of {METRICS} aliased metrics queued at Mosquitto for a persistent session, subscriber (re)start → last message received (bare) or last metric stored (agent: decode, aliases, seq, one event per metric, synchronous=FULL; {} metrics/s, {:.0}% of one core) (msg/s)",
            thousands(p.messages as f64),
            thousands(o * METRICS as f64),
            median(&cpu)
        ),
        ours: format!("{}/s", thousands(o)),
        baseline: format!("{}/s", thousands(b)),
        ratio: format!("{:.2}", o / b),
        target: "-".into(),
        verdict: Verdict::Info,
    }])
}
