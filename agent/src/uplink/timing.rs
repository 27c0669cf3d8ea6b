//! Two of the delivery KPIs, timed by the uplink on the agent's own clock:
//! how long after its outbox commit (the accept stamp the outbox keeps per
//! group commit) the hub's commit of each event was confirmed by `Stored`
//! or `Ack`, and how long a connection took to get everything that waited
//! when it opened acknowledged (a site's recovery after an outage).
//!
//! Why here and not at the hub: the hub learns of the commit first, but
//! telling it the accept times would take a new frame that a hub of the
//! same protocol version may not know, and its clock is not the agent's.
//! The confirmation arrives half a round trip after the commit, which the
//! histogram includes.

use std::collections::VecDeque;
use std::time::Instant;

use outpost_protocols::Seq;

use crate::clock;
use crate::metrics::Metrics;

/// What one connection times.
#[derive(Debug, Default)]
pub(super) struct Timing {
    /// Pushed events whose commit the hub has not confirmed yet, in seq
    /// order, with their accept time (Unix ns) when the outbox knows it.
    waiting: VecDeque<(Seq, Option<i64>)>,
    /// While the connection drains what waited when it opened: since when,
    /// and the last seq that waited.
    recovering: Option<(Instant, Seq)>,
}

impl Timing {
    /// The session was welcomed with `watermark` while the outbox's last
    /// committed seq was `committed`: anything between waited.
    pub(super) fn connected(&mut self, watermark: Seq, committed: Seq) {
        self.recovering = (committed > watermark).then(|| (clock::now(), committed));
    }

    /// `seq` was pushed; `stamps` are (first seq, accept time) of the
    /// group commits of a read, in seq order, and `at` the index into them
    /// that the previous event of the read used.
    pub(super) fn pushed(&mut self, seq: Seq, stamps: &[(Seq, i64)], at: &mut usize) {
        while *at + 1 < stamps.len() && stamps[*at + 1].0 <= seq {
            *at += 1;
        }
        let t = stamps
            .get(*at)
            .filter(|(first, _)| *first <= seq)
            .map(|s| s.1);
        self.waiting.push_back((seq, t));
    }

    /// The hub's `Stored` or `Ack` says its commit holds every seq up to
    /// `upto`.
    pub(super) fn committed(&mut self, upto: Seq, metrics: &Metrics) {
        let now = clock::unix_now().0;
        while let Some(&(seq, at)) = self.waiting.front() {
            if seq > upto {
                break;
            }
            self.waiting.pop_front();
            if let Some(at) = at {
                let secs = now.saturating_sub(at).max(0) as f64 / 1e9;
                metrics.kpi.ingest_latency.observe(secs);
            }
        }
    }

    /// The hub acknowledged every seq up to `upto`.
    pub(super) fn acked(&mut self, upto: Seq, metrics: &Metrics) {
        self.committed(upto, metrics);
        if let Some((since, last)) = self.recovering {
            if upto >= last {
                let secs = clock::elapsed(since).as_secs_f64();
                metrics.kpi.recovery.observe(secs);
                metrics.kpi.last_recovery.set(secs);
                self.recovering = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_takes_its_group_commits_time_and_is_timed_once() {
        let m = Metrics::new();
        let mut t = Timing::default();
        let now = clock::unix_now().0;
        let stamps = [(Seq(1), now - 2_000_000_000), (Seq(3), now)];
        let mut at = 0;
        for s in [2, 3, 4] {
            t.pushed(Seq(s), &stamps, &mut at);
        }
        assert_eq!(
            t.waiting.iter().map(|w| w.1).collect::<Vec<_>>(),
            vec![Some(now - 2_000_000_000), Some(now), Some(now)]
        );
        t.committed(Seq(3), &m);
        t.committed(Seq(3), &m);
        let text = m.render();
        assert!(
            text.contains("outpost_agent_ingest_latency_seconds_count 2"),
            "{text}"
        );
        t.acked(Seq(4), &m);
        assert!(m
            .render()
            .contains("outpost_agent_ingest_latency_seconds_count 3"),);
    }

    #[test]
    fn a_recovery_ends_when_what_waited_is_acknowledged() {
        let m = Metrics::new();
        let mut t = Timing::default();
        t.connected(Seq(5), Seq(5));
        assert!(t.recovering.is_none(), "nothing waited");
        t.connected(Seq(5), Seq(9));
        t.acked(Seq(8), &m);
        assert!(t.recovering.is_some());
        t.acked(Seq(9), &m);
        assert!(t.recovering.is_none());
        assert!(m
            .render()
            .contains("outpost_agent_recovery_seconds_count 1"));
    }
}
