//! A thousand agents at once against the real hub: every one delivers its
//! events exactly once, and none waits for another to finish first.
//!
//! The agents are simulated in this process (`outpost_tests::fleet_sim`):
//! each is an `AgentSession` driven over its own QUIC connection, with its
//! own certificate, through a few shared quinn client endpoints in one tokio
//! runtime. They dial within one second, as a fleet does after a hub restart
//! (the uplink's backoff jitter spreads it); each sends seqs `1..=EVENTS`,
//! waits until the hub has acknowledged every one, and says goodbye. An agent
//! whose handshake is lost in the burst retries like the real uplink, and the
//! test prints how many did.
//!
//! Timings are printed, not asserted beyond a generous deadline: CI runs on a
//! shared 2-core machine with debug builds.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use outpost_tests::fleet_sim::{
    agent_id, issue_agents, run_fleet, secs, spread, udp_rcvbuf_errors, Finished,
};
use outpost_tests::{Hub, HubEventStats, Pki};

/// Simulated agents, all connected at once.
const AGENTS: usize = 1_000;

/// Events each agent sends: seqs `1..=EVENTS`.
const EVENTS: u64 = 100;

/// quinn client endpoints (UDP sockets) the agents share, round robin.
const ENDPOINTS: usize = 4;

/// Over how long the agents dial.
const DIAL_SPREAD: Duration = Duration::from_secs(1);

/// How long any one agent may take, from the common start to its last ack,
/// on a loaded 2-core machine running debug builds.
const DEADLINE: Duration = Duration::from_secs(180);

#[test]
fn a_thousand_agents_all_deliver_and_none_waits_for_another() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let t = Instant::now();
    let creds = issue_agents(&pki.ca_dir, &dir.path().join("agents"), AGENTS)?;
    println!(
        "issued {AGENTS} agent certificates in {:.2} s",
        secs(t.elapsed())
    );
    // A real fleet dials from a thousand addresses; this one dials from
    // 127.0.0.1 alone, which the per-address limit would slow down.
    let hub = Hub::start_with(dir.path(), &pki, "per_address_burst = 0")?;
    let rcvbuf_before = udp_rcvbuf_errors();
    let run = run_fleet(hub.addr, &creds, EVENTS, ENDPOINTS, DIAL_SPREAD, DEADLINE)?;
    let results = run.results;

    let failed = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| (agent_id(i), format!("{e:#}"))))
        .collect::<Vec<_>>();
    if !failed.is_empty() {
        let log = hub.log();
        let mut report = String::new();
        for (id, e) in failed.iter().take(10) {
            report.push_str(&format!("{id}: {e}\n"));
            let needle = format!("agent_id={id} ");
            for line in log.lines().filter(|l| l.contains(&needle)) {
                report.push_str(&format!("    hub: {line}\n"));
            }
        }
        bail!(
            "{} of {AGENTS} agents failed; UDP receive buffer errors during the run: {}; \
             the first ones:\n{report}hub WARN lines: {}",
            failed.len(),
            udp_rcvbuf_errors().map_or("unknown".into(), |n| (n - rcvbuf_before.unwrap_or(n))
                .to_string()),
            log.lines().filter(|l| l.contains("WARN")).count(),
        );
    }
    let done: Vec<Finished> = results.into_iter().filter_map(Result::ok).collect();
    let phase = |f: fn(&Finished) -> Duration| {
        let mut v: Vec<Duration> = done.iter().map(f).collect();
        spread(&mut v)
    };
    for (name, (min, med, max)) in [
        ("handshake done", phase(|f| f.handshake)),
        ("welcome received", phase(|f| f.welcome)),
        ("all acknowledged", phase(|f| f.acked)),
        ("goodbye done", phase(|f| f.closed)),
    ] {
        println!("{name:>16}: min {min:6.2} s  median {med:6.2} s  max {max:6.2} s");
    }
    let resets = done.iter().filter(|f| f.reset).count();
    let retried: Vec<&Finished> = done.iter().filter(|f| f.retries > 0).collect();
    println!(
        "{AGENTS} agents x {EVENTS} events over {ENDPOINTS} client endpoints in {:.2} s; \
         {} agents reconnected ({} connections retried{}); \
         {resets} hub closes after Goodbye came as stateless resets; \
         UDP receive buffer errors on this host during the run: {}",
        secs(run.elapsed),
        retried.len(),
        retried.iter().map(|f| f.retries).sum::<u32>(),
        retried
            .first()
            .and_then(|f| f.first_failure.as_deref())
            .map_or(String::new(), |e| format!(", the first because: {e}")),
        udp_rcvbuf_errors().map_or("unknown".into(), |n| (n - rcvbuf_before.unwrap_or(n))
            .to_string())
    );
    // Every agent ran under the per-agent timeout, so all finished within
    // DEADLINE of the common start; say so explicitly.
    let slowest = phase(|f| f.acked).2;
    assert!(slowest <= secs(DEADLINE), "{slowest} s");

    let t = Instant::now();
    let stats = hub.events_stats()?;
    println!("events stats --json took {:.2} s", secs(t.elapsed()));
    ensure!(
        stats.len() == AGENTS,
        "the hub holds events of {} agents, not {AGENTS}",
        stats.len()
    );
    let by_id: BTreeMap<&str, &HubEventStats> =
        stats.iter().map(|s| (s.agent_id.as_str(), s)).collect();
    for i in 0..AGENTS {
        let id = agent_id(i);
        let s = by_id
            .get(id.as_str())
            .with_context(|| format!("no stats for {id}"))?;
        assert_eq!(
            **s,
            HubEventStats {
                agent_id: id.clone(),
                count: EVENTS,
                distinct_seqs: EVENTS,
                min_seq: Some(1),
                max_seq: Some(EVENTS),
            }
        );
    }
    let log = hub.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    println!("hub log: {} WARN lines, the first:", warnings.len());
    for line in warnings.iter().take(3) {
        println!("    {line}");
    }
    Ok(())
}
