//! Measurement: what the fleet policy costs, alone and in the agent's MQTT
//! ingest.
//!
//! Both rows use a generated document of 1,000 rules, as a fleet of many
//! sites would have: distinct stream patterns over sites, lines and tags
//! (exact names, a `+` over lines, a `#` under a line), one in ten a deny,
//! one in a hundred a downsample, most of the rest minimising the JSON
//! payload (redact `/unit`, hash `/pad`, round `/value`, drop `/pad`), and
//! four label selectors of which the measured agent's labels meet two, so
//! that about half the rules are compiled for it.
//!
//! - Evaluation: `Enforcer::apply(.., Stage::Ingest)` in a loop on one core
//!   over events of a few thousand distinct streams with the MQTT rows'
//!   64-byte JSON payloads; the baseline is the same loop with the empty
//!   policy (`Policy::default()`). Bodies are cloned before the clock
//!   starts, and a fresh enforcer (empty stream cache) is made per run.
//! - MQTT ingest: the MQTT row's live and drain runs of the real agent
//!   (`super::mqtt::ours`, `ours_drain`: the same Mosquitto and publisher)
//!   with a `policy.json` in its data directory before it starts that holds
//!   its part of the 1,000 rules, as the hub sends it (the rules its labels
//!   select, with their hashing keys), against the same runs with no policy.
//!   Here 100 of the rules
//!   take the published topics `bench/+/sensor/<k>` and each minimises them;
//!   none denies or downsamples them, so both runs store every message and
//!   the clocks stop at the same count.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context as _, Result};
use outpost_agent::outbox::OutboxReader;
use outpost_protocols::policy::{Catalog, Enforcer, HashingKey, Policy, Stage, Verdict};
use outpost_protocols::{AgentId, EventBody};
use outpost_tests::Mosquitto;

use super::mqtt::{self, Setup};
use super::procs::Bins;
use super::report::{self, median, per_sec, samples, thousands, Row};
use super::workload::{json_bodies, payload, PAYLOAD_LEN};

/// How big the evaluation run is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Params {
    /// Events per run.
    pub(crate) events: usize,
    /// Runs of each; the median is reported.
    pub(crate) reps: usize,
}

/// Rules in the generated document.
const RULES: usize = 1_000;

/// The stream population of the evaluation: `site-S/line-L/tag-T`.
const SITES: usize = 8;
const LINES: usize = 8;
const TAGS: usize = 48;

/// The measured agent's labels.
const LABELS: [(&str, &str); 2] = [("region", "eu-west"), ("tier", "prod")];

/// The rules' selectors, by group of ten rules: the labels above meet the
/// first two.
const SELECTORS: [&str; 4] = [
    "",
    "agents = { region = \"eu-*\" }\n",
    "agents = { tier = \"canary\" }\n",
    "agents = { region = \"us-*\" }\n",
];

/// The minimisations, over the fields of `workload::payload`.
const EDITS: [&str; 5] = [
    "redact = [\"/unit\"]\n",
    "hash = [\"/pad\"]\n",
    "round = 0\nround_fields = [\"/value\"]\n",
    "drop = [\"/pad\"]\n",
    "redact = [\"/unit\"]\nround = 1\nround_fields = [\"/value\"]\n",
];

/// The rules the MQTT rows' topics (`bench/<run>/sensor/<k>`, 100 of them)
/// meet in the ingest row: one per topic, each minimising, none dropping.
const PUBLISHED: usize = 100;

/// Event time between two events of the evaluation: 3,072 streams at about
/// one event each 3 s, so that the 10 s downsampling keeps some.
const STEP_NS: i64 = 1_000_000;

/// Stream `i` of the evaluation's population.
fn stream(i: usize) -> String {
    let (s, l, t) = (i % SITES, i / SITES % LINES, i / (SITES * LINES) % TAGS);
    format!("site-{s}/line-{l}/tag-{t}")
}

/// The site rules' patterns, in document order: exact streams, then `+`
/// over the lines, then `#` under a line. No pattern covers a later one, so
/// none is refused as shadowed.
fn site_patterns() -> Vec<String> {
    let mut v = Vec::with_capacity(RULES);
    for t in 0..12 {
        for s in 0..SITES {
            for l in 0..LINES {
                v.push(format!("site-{s}/line-{l}/tag-{t}"));
            }
        }
    }
    for t in 12..36 {
        for s in 0..SITES {
            v.push(format!("site-{s}/+/tag-{t}"));
        }
    }
    for s in 0..SITES {
        for l in 0..LINES {
            v.push(format!("site-{s}/line-{l}/#"));
        }
    }
    v
}

/// The `[agent] labels` table.
fn labels_toml() -> String {
    let pairs: Vec<String> = LABELS.iter().map(|(k, v)| format!("{k} = {v:?}")).collect();
    format!("{{ {} }}", pairs.join(", "))
}

fn labels() -> BTreeMap<String, String> {
    LABELS
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The generated document: `published` rules for the MQTT topics first (0
/// or [`PUBLISHED`]), then site rules up to [`RULES`].
fn document(published: usize) -> String {
    let mut t = String::from("description = \"outpost-bench: 1,000 generated rules\"\n");
    for k in 0..published {
        let _ = write!(
            t,
            "\n[[rules]]\nname = \"published {k}\"\nstreams = [\"bench/+/sensor/{k}\"]\n{}",
            EDITS[k % EDITS.len()]
        );
    }
    for (i, p) in site_patterns()
        .into_iter()
        .take(RULES - published)
        .enumerate()
    {
        let what = if i % 10 == 0 {
            "action = \"deny\"\n"
        } else if i % 100 == 7 {
            "downsample = { interval = \"10s\" }\n"
        } else if i % 4 == 3 {
            ""
        } else {
            EDITS[i % EDITS.len()]
        };
        let _ = write!(
            t,
            "\n[[rules]]\nname = \"site {i}\"\nstreams = [{p:?}]\n{}{what}",
            SELECTORS[i / 10 % SELECTORS.len()]
        );
    }
    t
}

/// The hub's hashing key of the benchmark.
fn hashing_key() -> HashingKey {
    HashingKey::from([0x5a; HashingKey::LEN])
}

/// The document parsed as the hub does (with its hashing key), and how
/// many rules select the measured agent.
fn parse(text: &str) -> Result<(Policy, usize)> {
    let policy = Policy::parse(text, &Catalog::trusting())
        .context("the generated policy")?
        .with_hashing_key(hashing_key());
    ensure!(
        policy.rules.len() == RULES,
        "generated {} rules",
        policy.rules.len()
    );
    let selected = policy.compile(&labels(), &Catalog::trusting()).rules();
    Ok((policy, selected))
}

/// What one evaluation run counted.
struct Eval {
    rate: f64,
    kept: usize,
    modified: usize,
}

/// Applies `policy` to copies of `bodies` with a fresh enforcer.
fn evaluate(policy: &Policy, bodies: &[EventBody]) -> Eval {
    let mut enforcer = Enforcer::new(Arc::new(policy.compile(&labels(), &Catalog::trusting())));
    let mut work = bodies.to_vec();
    let (mut kept, mut modified) = (0, 0);
    let started = Instant::now();
    for b in &mut work {
        if let Verdict::Keep { modified: m, .. } = enforcer.apply(b, Stage::Ingest) {
            kept += 1;
            modified += usize::from(m);
        }
    }
    let elapsed = started.elapsed();
    std::hint::black_box(&work);
    Eval {
        rate: per_sec(bodies.len() as u64, elapsed),
        kept,
        modified,
    }
}

/// `1,234,567/s (810 ns)`.
fn rate_and_cost(rate: f64) -> String {
    format!("{}/s ({:.0} ns)", thousands(rate), 1e9 / rate)
}

/// Row (a): the evaluator's events/s against the empty policy's.
pub(crate) fn evaluation(p: Params) -> Result<Vec<Row>> {
    let text = document(0);
    // What an agent pays once per policy version, before the first event.
    let started = Instant::now();
    let (policy, selected) = parse(&text)?;
    let load = started.elapsed();
    let empty = Policy::default();
    let population = SITES * LINES * TAGS;
    // A stride prime to the population, so that consecutive events are on
    // streams far apart, as from many devices.
    let bodies = json_bodies(p.events, STEP_NS, |i| stream(i * 7_919 % population))?;
    eprintln!(
        "policy evaluation: {} events over {} streams, {selected} of {} rules for this agent; parse and compile {:.0} ms",
        thousands(p.events as f64),
        thousands(population as f64),
        thousands(RULES as f64),
        load.as_secs_f64() * 1e3
    );
    let (mut base, mut ours) = (Vec::new(), Vec::new());
    let mut last = None;
    for rep in 0..p.reps {
        // Interleaved, so that drift on a shared machine hits both alike.
        let b = evaluate(&empty, &bodies);
        let o = evaluate(&policy, &bodies);
        ensure!(b.kept == p.events, "the empty policy dropped events");
        eprintln!(
            "policy evaluation run {}: empty policy {}/s, 1,000 rules {}/s ({} kept, {} of them modified)",
            rep + 1,
            thousands(b.rate),
            thousands(o.rate),
            thousands(o.kept as f64),
            thousands(o.modified as f64)
        );
        base.push(b.rate);
        ours.push(o.rate);
        last = Some(o);
    }
    let Some(o) = last else {
        bail!("no runs");
    };
    eprintln!(
        "policy evaluation: empty policy [{}], 1,000 rules [{}]",
        samples(&base),
        samples(&ours)
    );
    let (b, r) = (median(&base), median(&ours));
    let pct = |x: usize, of: usize| 100.0 * x as f64 / of.max(1) as f64;
    Ok(vec![Row {
        what: format!(
            "Policy evaluation, 1,000 rules ({selected} select this agent): `Enforcer::apply(Ingest)` on one core, {} events over {} streams, {PAYLOAD_LEN}-byte JSON payloads ({:.0}% kept, {:.0}% of those minimised; events/s and ns/event; baseline = the empty policy; parsing and compiling the document took {:.0} ms once)",
            thousands(p.events as f64),
            thousands(population as f64),
            pct(o.kept, p.events),
            pct(o.modified, o.kept),
            load.as_secs_f64() * 1e3
        ),
        ours: rate_and_cost(r),
        baseline: rate_and_cost(b),
        ratio: format!("{:.3}", r / b),
        target: "-".into(),
        verdict: report::Verdict::Info,
    }])
}

/// Checks that the agent of a policy run stored its last messages
/// minimised: every published topic meets a rule that changes its payload.
fn check_minimised(home: &Path, n: usize) -> Result<()> {
    let reader = OutboxReader::open(
        &home.join("data").join("outbox.db"),
        AgentId::parse("local")?,
    )?;
    let tail = reader.tail(PUBLISHED.min(n))?;
    ensure!(!tail.is_empty(), "the agent stored nothing");
    for e in &tail {
        let stored = e.body.value.to_json();
        let i = stored
            .get("n")
            .and_then(serde_json::Value::as_u64)
            .with_context(|| format!("stored event {stored} has no n"))?;
        let sent: serde_json::Value = serde_json::from_slice(&payload(i as usize))?;
        ensure!(
            stored != sent,
            "{} was stored as sent, not minimised: {stored}",
            e.body.stream
        );
    }
    Ok(())
}

/// Row (b): the agent's MQTT ingest with the 1,000-rule policy against the
/// same runs without a policy.
pub(crate) fn mqtt_ingest(bins: &Bins, dir: &Path, p: mqtt::Params) -> Result<Vec<Row>> {
    let fleet = document(PUBLISHED);
    let (policy, selected) = parse(&fleet)?;
    // What the hub sends the agent: its part, with its rules' keys.
    let text = policy
        .scoped_text(&fleet, &labels())
        .context("the agent's part of the generated policy")?;
    let json = serde_json::json!({ "version": 1, "text": text }).to_string();
    let labels = labels_toml();
    let plain = Setup {
        labels: &labels,
        policy_json: None,
        qos2: false,
    };
    let with_policy = Setup {
        labels: &labels,
        policy_json: Some(&json),
        qos2: false,
    };
    let broker_dir = dir.join("mosquitto");
    std::fs::create_dir_all(&broker_dir)?;
    let broker = Mosquitto::start(&broker_dir)?;
    let (mut base, mut ours, mut base_q, mut ours_q) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut base_cpu, mut ours_cpu) = (Vec::new(), Vec::new());
    let mut duplicates = 0;
    let (mut live_rounds, mut drain_rounds) = (Vec::new(), Vec::new());
    for rep in 0..p.reps {
        // Runs 2k without, 2k+1 with the policy: their own topics, client
        // ids and data directories. Which goes first alternates, so that
        // drift on a shared machine hits both alike.
        let (plain_run, policy_run) = (2 * rep, 2 * rep + 1);
        let live = |run: usize, setup: Setup<'_>| {
            mqtt::ours(bins, dir, broker.port, run, p.messages, setup)
        };
        let drain = |run: usize, setup: Setup<'_>| {
            mqtt::ours_drain(bins, dir, broker.port, run, p.messages, setup)
        };
        let ((b, b_extra), (o, o_extra), bq, oq) = if rep % 2 == 0 {
            let b = live(plain_run, plain)?;
            let o = live(policy_run, with_policy)?;
            let bq = drain(plain_run, plain)?;
            let oq = drain(policy_run, with_policy)?;
            (b, o, bq, oq)
        } else {
            let o = live(policy_run, with_policy)?;
            let b = live(plain_run, plain)?;
            let oq = drain(policy_run, with_policy)?;
            let bq = drain(plain_run, plain)?;
            (b, o, bq, oq)
        };
        duplicates += b_extra + o_extra + bq.extra + oq.extra;
        check_minimised(&mqtt::agent_home(dir, policy_run), p.messages)?;
        eprintln!(
            "policy mqtt run {}: live {}/s without, {}/s with the policy (publisher done at {}/s, {}/s); drain {}/s ({:.0}% of one core) without, {}/s ({:.0}%) with",
            rep + 1,
            thousands(b.rate),
            thousands(o.rate),
            thousands(b.publisher),
            thousands(o.publisher),
            thousands(bq.rate),
            bq.cpu,
            thousands(oq.rate),
            oq.cpu
        );
        base.push(b.rate);
        ours.push(o.rate);
        base_q.push(bq.rate);
        ours_q.push(oq.rate);
        live_rounds.push((o.rate, b.rate));
        drain_rounds.push((oq.rate, bq.rate));
        base_cpu.push(bq.cpu);
        ours_cpu.push(oq.cpu);
    }
    eprintln!(
        "policy mqtt live: without [{}], with [{}]; drain: without [{}], with [{}]",
        samples(&base),
        samples(&ours),
        samples(&base_q),
        samples(&ours_q)
    );
    let mut rows = vec![
        report::ratio_row(
            format!(
                "MQTT QoS 1 live with a 1,000-rule policy ({selected} select this agent; the published topics meet 100 that minimise them, none denies or downsamples them, so both runs store all {} × {PAYLOAD_LEN}-byte messages): first publish → last stored (msg/s; baseline = the same agent without a policy)",
                thousands(p.messages as f64)
            ),
            "/s",
            &live_rounds,
            report::Goal::AtLeast(0.9),
        ),
        report::ratio_row(
            format!(
                "MQTT QoS 1 drain with the same policy: {} messages queued at Mosquitto, agent start → last stored (msg/s; {:.0}% of one core with, {:.0}% without; baseline = no policy)",
                thousands(p.messages as f64),
                median(&ours_cpu),
                median(&base_cpu)
            ),
            "/s",
            &drain_rounds,
            report::Goal::AtLeast(0.9),
        ),
    ];
    if duplicates > 0 {
        rows.push(Row {
            what: "MQTT ingest with a policy: events stored beyond the messages sent".into(),
            ours: thousands(duplicates as f64),
            baseline: "-".into(),
            ratio: "-".into(),
            target: "0 (no redelivery happened)".into(),
            verdict: report::Verdict::Fail,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::topic;

    #[test]
    fn the_generated_documents_parse_with_half_the_rules_for_the_agent() {
        for published in [0, PUBLISHED] {
            let (_, selected) = parse(&document(published)).expect("parses");
            assert!((400..=600).contains(&selected), "{selected} rules selected");
        }
    }

    #[test]
    fn the_ingest_policy_keeps_and_minimises_every_published_message() {
        let (policy, _) = parse(&document(PUBLISHED)).expect("parses");
        let mut e = Enforcer::new(Arc::new(policy.compile(&labels(), &Catalog::trusting())));
        let bodies = json_bodies(1_000, 1_000, |i| topic("bench/agent1", i)).expect("bodies");
        for mut b in bodies {
            let v = e.apply(&mut b, Stage::Ingest);
            assert!(
                matches!(v, Verdict::Keep { modified: true, .. }),
                "{v:?} for {}",
                b.stream
            );
        }
    }
}
