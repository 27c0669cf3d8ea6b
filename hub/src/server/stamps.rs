//! The agent's accept times for what its session sends: `Accepted` frames
//! say "the events from seq S on were committed to my outbox at T", until
//! the next stamp; the driver looks up each stored event's time here to
//! time it from the edge to the hub's commit (`kpis`).
//!
//! Kept apart from the session (`protocols`) because it decides nothing:
//! an agent that sends no stamps, or wrong ones, only changes a histogram.

use std::collections::BTreeMap;

use outpost_protocols::Seq;

/// The most stamps kept: far more than a window of events has group
/// commits. Past it the oldest go (their events are simply not timed).
#[allow(dead_code)] // until the `Accepted` frame feeds `add`
const MAX_STAMPS: usize = 16 * 1024;

/// The stamps of one session, by the first seq each covers.
#[derive(Debug, Default)]
pub(super) struct Stamps {
    from: BTreeMap<Seq, i64>,
}

impl Stamps {
    /// The events from `from` on were accepted at `at` (Unix nanoseconds).
    #[allow(dead_code)]
    pub(super) fn add(&mut self, from: Seq, at: i64) {
        self.from.insert(from, at);
        while self.from.len() > MAX_STAMPS {
            self.from.pop_first();
        }
    }

    /// Runs of (events, accept time) for `seqs`, in order; seqs no stamp
    /// covers are left out.
    pub(super) fn runs(&self, seqs: impl IntoIterator<Item = Seq>) -> Vec<(u64, i64)> {
        let mut out: Vec<(u64, i64)> = Vec::new();
        if self.from.is_empty() {
            return out;
        }
        for seq in seqs {
            let Some((_, &at)) = self.from.range(..=seq).next_back() else {
                continue;
            };
            match out.last_mut() {
                Some((n, t)) if *t == at => *n += 1,
                _ => out.push((1, at)),
            }
        }
        out
    }

    /// Forgets the stamps that cover only seqs up to `last` (sent already).
    pub(super) fn forget_before(&mut self, last: Seq) {
        let next = Seq(last.0.saturating_add(1));
        if let Some((&keep, _)) = self.from.range(..=next).next_back() {
            self.from = self.from.split_off(&keep);
        }
    }
}

/// The runs of the newest `n` events of `runs`.
pub(super) fn newest(runs: Vec<(u64, i64)>, n: u64) -> Vec<(u64, i64)> {
    let total: u64 = runs.iter().map(|(c, _)| c).sum();
    let mut skip = total.saturating_sub(n);
    let mut out = Vec::with_capacity(runs.len());
    for (c, at) in runs {
        let cut = c.min(skip);
        skip -= cut;
        if c > cut {
            out.push((c - cut, at));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_seq_takes_the_stamp_before_it() {
        let mut s = Stamps::default();
        assert!(s.runs([Seq(1)]).is_empty());
        s.add(Seq(3), 30);
        s.add(Seq(6), 60);
        let seqs = [1, 3, 4, 5, 6, 9].map(Seq);
        assert_eq!(s.runs(seqs), vec![(3, 30), (2, 60)]);
        s.forget_before(Seq(5));
        assert_eq!(s.runs([Seq(6)]), vec![(1, 60)]);
        // The stamp covering the next seq stays.
        s.forget_before(Seq(7));
        assert_eq!(s.runs([Seq(8)]), vec![(1, 60)]);
    }

    #[test]
    fn the_newest_events_keep_their_runs() {
        let runs = vec![(3, 30), (2, 60)];
        assert_eq!(newest(runs.clone(), 5), runs);
        assert_eq!(newest(runs.clone(), 4), vec![(2, 30), (2, 60)]);
        assert_eq!(newest(runs.clone(), 1), vec![(1, 60)]);
        assert_eq!(newest(runs, 0), vec![]);
    }
}
