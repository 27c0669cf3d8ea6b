//! Tests of the outbox store: a model test in the manner of vector's disk_v2,
//! and the properties that matter across restarts.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
use std::time::Duration;

use outpost_protocols::event::{AgentId, EventBody, Quality, Seq, StreamName, Timestamp, Value};
use proptest::prelude::*;
use proptest::sample::Index;

use super::schema::row_size;
use super::*;

fn agent() -> AgentId {
    AgentId::parse("gw-1").expect("valid")
}

/// Streams of different byte lengths, one with a two-byte character, so that
/// size accounting in SQL must count bytes, not characters.
const STREAMS: [&str; 3] = ["a", "plc1/temperature", "plant/ü/flow"];

fn body(stream: usize, ts: i64, len: usize) -> EventBody {
    EventBody {
        stream: StreamName::parse(STREAMS[stream % STREAMS.len()]).expect("valid"),
        ts: Timestamp(ts),
        value: Value::Bytes(vec![0xab; len]),
        quality: Quality::Good,
        attrs: BTreeMap::new(),
    }
}

fn size_of(b: &EventBody) -> u64 {
    row_size(b.encode().len(), b.stream.as_str().len())
}

/// `outbox.db` in `dir`, roomy, dropping the oldest: for the tests whose
/// limits do not matter.
fn plain(dir: &Path) -> OutboxConfig {
    config(&dir.join("outbox.db"), Eviction::DropOldest, 1 << 20, None)
}

fn config(
    path: &Path,
    eviction: Eviction,
    max_bytes: u64,
    max_age: Option<Duration>,
) -> OutboxConfig {
    OutboxConfig {
        path: path.to_owned(),
        // The model test reopens but never loses power; NORMAL keeps it fast.
        synchronous: Synchronous::Normal,
        max_bytes,
        max_age,
        eviction,
    }
}

/// What the outbox should hold, kept as simply as possible.
#[derive(Debug)]
struct Model {
    cfg: OutboxConfig,
    events: VecDeque<(u64, EventBody)>,
    next_seq: u64,
    acked: u64,
    bytes: u64,
    accepted: u64,
    transactions: u64,
    evicted: BTreeMap<String, u64>,
    pkids: BTreeSet<u16>,
}

impl Model {
    fn new(cfg: OutboxConfig) -> Model {
        Model {
            cfg,
            events: VecDeque::new(),
            next_seq: 1,
            acked: 0,
            bytes: 0,
            accepted: 0,
            transactions: 0,
            evicted: ["max_age", "max_bytes", "refused"]
                .into_iter()
                .map(|r| (r.to_owned(), 0))
                .collect(),
            pkids: BTreeSet::new(),
        }
    }

    fn count(&mut self, reason: &str, n: u64) {
        *self.evicted.entry(reason.to_owned()).or_default() += n;
    }

    fn expire(&mut self, now: i64) -> u64 {
        let Some(age) = self.cfg.max_age else {
            return 0;
        };
        let cutoff = now.saturating_sub(age.as_nanos() as i64);
        // From the head, while the oldest is older than the cutoff.
        let mut n = 0u64;
        while let Some((_, b)) = self.events.front() {
            if b.ts.0 >= cutoff {
                break;
            }
            self.bytes -= size_of(b);
            self.events.pop_front();
            n += 1;
        }
        self.count("max_age", n);
        n
    }

    fn append(&mut self, now: i64, bodies: &[EventBody], ops: &[Qos2Op]) -> AppendOutcome {
        self.transactions += 1;
        let mut out = AppendOutcome {
            evicted: self.expire(now),
            ..AppendOutcome::default()
        };
        for op in ops {
            match *op {
                Qos2Op::Received(p) => self.pkids.insert(p),
                Qos2Op::Released(p) => self.pkids.remove(&p),
            };
        }
        for b in bodies {
            let size = size_of(b);
            if self.cfg.eviction == Eviction::RefuseNew
                && (out.refused > 0 || self.bytes + size > self.cfg.max_bytes)
            {
                out.refused += 1;
                continue;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            self.events.push_back((seq, b.clone()));
            self.bytes += size;
            self.accepted += 1;
            out.first_seq.get_or_insert(Seq(seq));
            out.last_seq = Some(Seq(seq));
            out.accepted += 1;
        }
        self.count("refused", out.refused as u64);
        if self.cfg.eviction == Eviction::DropOldest {
            let mut n = 0;
            while self.bytes > self.cfg.max_bytes {
                let (_, b) = self.events.pop_front().expect("bytes > 0 means events");
                self.bytes -= size_of(&b);
                n += 1;
            }
            self.count("max_bytes", n);
            out.evicted += n;
        }
        out
    }

    fn ack(&mut self, upto: u64) -> Result<u64, (u64, u64)> {
        let last = self.next_seq - 1;
        if upto > last {
            return Err((upto, last));
        }
        let mut n = 0;
        while self.events.front().is_some_and(|(s, _)| *s <= upto) {
            let (_, b) = self.events.pop_front().expect("checked");
            self.bytes -= size_of(&b);
            n += 1;
        }
        self.acked = self.acked.max(upto);
        Ok(n)
    }

    /// A hub's watermark: an ack, or beyond every assigned seq, the waiting
    /// events renumbered to follow it.
    fn resume_after(&mut self, watermark: u64) -> Resumed {
        if watermark < self.next_seq {
            return Resumed::Acked {
                deleted: self.ack(watermark).expect("in range"),
            };
        }
        let last_before = self.next_seq - 1;
        let mut next = watermark + 1;
        for (seq, _) in &mut self.events {
            *seq = next;
            next += 1;
        }
        // Numbering goes on after the renumbered events (or the watermark).
        self.next_seq = next;
        self.acked = watermark;
        Resumed::Renumbered {
            renumbered: self.events.len() as u64,
            last_before: Seq(last_before),
            last: Seq(self.next_seq - 1),
        }
    }

    /// A hub's `Stored` mark: nothing within the assigned seqs, beyond them
    /// the same renumbering.
    fn follow(&mut self, held: u64) -> Resumed {
        if held < self.next_seq {
            return Resumed::Acked { deleted: 0 };
        }
        self.resume_after(held)
    }

    fn after(&self, after: u64, max: usize) -> Vec<(Seq, EventBody)> {
        self.events
            .iter()
            .filter(|(s, _)| *s > after)
            .take(max)
            .map(|(s, b)| (Seq(*s), b.clone()))
            .collect()
    }

    /// A seq from 0 to the last assigned one, old, evicted or stored.
    fn pick_seq(&self, i: &Index) -> u64 {
        i.index(self.next_seq as usize) as u64
    }

    fn check(&self, outbox: &Outbox) -> Result<(), TestCaseError> {
        let got: Vec<(Seq, EventBody)> = outbox
            .read_batch(Seq(0), usize::MAX)
            .map_err(|e| TestCaseError::fail(e.to_string()))?
            .into_iter()
            .map(|e| (e.seq, e.body))
            .collect();
        prop_assert_eq!(got, self.after(0, usize::MAX));
        let stats = outbox
            .stats()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(stats.events, self.events.len() as u64);
        prop_assert_eq!(stats.bytes, self.bytes);
        prop_assert_eq!(stats.first_seq, self.events.front().map(|(s, _)| Seq(*s)));
        prop_assert_eq!(stats.last_seq, self.events.back().map(|(s, _)| Seq(*s)));
        prop_assert_eq!(stats.next_seq, Seq(self.next_seq));
        prop_assert_eq!(stats.acked_seq, Seq(self.acked));
        prop_assert_eq!(stats.accepted_total, self.accepted);
        prop_assert_eq!(stats.transactions_total, self.transactions);
        prop_assert_eq!(&stats.evicted, &self.evicted);
        prop_assert_eq!(stats.qos2_pending, self.pkids.len() as u64);
        let pkids = outbox
            .qos2_pending()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&pkids, &self.pkids);
        if self.cfg.eviction == Eviction::DropOldest {
            prop_assert!(self.bytes <= self.cfg.max_bytes);
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum Action {
    /// Bodies as (stream, ts, value length).
    Append {
        now: i64,
        bodies: Vec<(usize, i64, usize)>,
    },
    ReadBatch {
        after: Index,
        max: usize,
    },
    /// Acknowledge a seq between 0 and the last assigned one.
    Ack(Index),
    /// Acknowledge past the last assigned seq, which must fail.
    AckBeyondEnd(u8),
    EvictExpired(i64),
    /// A hub's `Welcome` watermark, anywhere from 0 to past the last
    /// assigned seq (a replaced outbox).
    ResumeAfter(Index, u8),
    /// A hub's `Stored` mark, the same range.
    Follow(Index, u8),
    Reopen,
    Qos2Received(u16),
    Qos2Released(u16),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (
            0i64..2_000,
            prop::collection::vec((0usize..3, 0i64..1_000, 0usize..200), 0..8),
        )
            .prop_map(|(now, bodies)| Action::Append { now, bodies }),
        2 => (any::<Index>(), 0usize..10).prop_map(|(after, max)| Action::ReadBatch { after, max }),
        3 => any::<Index>().prop_map(Action::Ack),
        1 => any::<u8>().prop_map(Action::AckBeyondEnd),
        1 => (0i64..2_500).prop_map(Action::EvictExpired),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, extra)| Action::ResumeAfter(i, extra)),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, extra)| Action::Follow(i, extra)),
        1 => Just(Action::Reopen),
        1 => (1u16..6).prop_map(Action::Qos2Received),
        1 => (1u16..6).prop_map(Action::Qos2Released),
    ]
}

fn run_model(eviction: Eviction, actions: Vec<Action>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let cfg = config(
        &dir.path().join("outbox.db"),
        eviction,
        // A handful of events: both policies hit the limit often.
        1_200,
        Some(Duration::from_nanos(600)),
    );
    let fail = |e: OutboxError| TestCaseError::fail(e.to_string());
    let mut outbox = Some(Outbox::open(&cfg, agent()).map_err(fail)?);
    let mut model = Model::new(cfg.clone());
    for action in actions {
        let ob = outbox.as_mut().expect("open between actions");
        match action {
            Action::Append { now, bodies } => {
                let bodies: Vec<EventBody> = bodies
                    .iter()
                    .map(|&(s, ts, len)| body(s, ts, len))
                    .collect();
                let got = ob.append(Timestamp(now), &bodies, &[]).map_err(fail)?;
                prop_assert_eq!(got, model.append(now, &bodies, &[]));
            }
            Action::ReadBatch { after, max } => {
                let after = model.pick_seq(&after);
                let got: Vec<(Seq, EventBody)> = ob
                    .read_batch(Seq(after), max)
                    .map_err(fail)?
                    .into_iter()
                    .map(|e| (e.seq, e.body))
                    .collect();
                prop_assert_eq!(got, model.after(after, max));
            }
            Action::Ack(i) => {
                let upto = model.pick_seq(&i);
                prop_assert_eq!(
                    ob.ack(Seq(upto)).map_err(fail)?,
                    model.ack(upto).expect("in range")
                );
            }
            Action::AckBeyondEnd(extra) => {
                let upto = model.next_seq + u64::from(extra);
                let expected = model.ack(upto).expect_err("beyond the end");
                match ob.ack(Seq(upto)) {
                    Err(OutboxError::AckBeyondEnd { acked, last }) => {
                        prop_assert_eq!((acked.0, last.0), expected);
                    }
                    other => prop_assert!(false, "expected AckBeyondEnd, got {:?}", other),
                }
            }
            Action::EvictExpired(now) => {
                prop_assert_eq!(
                    ob.evict_expired(Timestamp(now)).map_err(fail)?,
                    model.expire(now)
                );
            }
            Action::ResumeAfter(i, extra) => {
                // Half the time a seq of this outbox, else one past its end.
                let watermark = if extra % 2 == 0 {
                    model.pick_seq(&i)
                } else {
                    model.next_seq - 1 + u64::from(extra)
                };
                prop_assert_eq!(
                    ob.resume_after(Seq(watermark)).map_err(fail)?,
                    model.resume_after(watermark)
                );
            }
            Action::Follow(i, extra) => {
                let held = if extra % 2 == 0 {
                    model.pick_seq(&i)
                } else {
                    model.next_seq - 1 + u64::from(extra)
                };
                prop_assert_eq!(ob.follow(Seq(held)).map_err(fail)?, model.follow(held));
            }
            Action::Reopen => {
                drop(outbox.take());
                outbox = Some(Outbox::open(&cfg, agent()).map_err(fail)?);
            }
            Action::Qos2Received(p) | Action::Qos2Released(p) => {
                let op = if matches!(action, Action::Qos2Received(_)) {
                    Qos2Op::Received(p)
                } else {
                    Qos2Op::Released(p)
                };
                // A QoS 2 op with no bodies still runs an append transaction,
                // with its age eviction; `now` 0 expires nothing here.
                let got = ob.append(Timestamp(0), &[], &[op]).map_err(fail)?;
                prop_assert_eq!(got, model.append(0, &[], &[op]));
            }
        }
        model.check(outbox.as_ref().expect("open"))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn drop_oldest_outbox_behaves_like_the_model(actions in prop::collection::vec(action(), 1..60)) {
        run_model(Eviction::DropOldest, actions)?;
    }

    #[test]
    fn refuse_new_outbox_behaves_like_the_model(actions in prop::collection::vec(action(), 1..60)) {
        run_model(Eviction::RefuseNew, actions)?;
    }
}

#[test]
fn seqs_strictly_increase_across_reopen_even_after_everything_was_acked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = plain(dir.path());
    let mut last = 0;
    for round in 0..3 {
        let mut outbox = Outbox::open(&cfg, agent()).expect("opens");
        let bodies: Vec<EventBody> = (0..5).map(|i| body(1, i, 4)).collect();
        let out = outbox.append(Timestamp(0), &bodies, &[]).expect("appends");
        let (first, end) = (out.first_seq.expect("first"), out.last_seq.expect("last"));
        assert!(
            first.0 > last,
            "round {round}: seq {first} reused (previous last {last})"
        );
        assert_eq!(end.0 - first.0, 4);
        outbox.ack(end).expect("acks");
        let stats = outbox.stats().expect("stats");
        assert_eq!((stats.events, stats.bytes, stats.first_seq), (0, 0, None));
        assert_eq!(stats.next_seq, end.next());
        last = end.0;
    }
}

#[test]
fn a_read_only_reader_sees_committed_rows_while_the_writer_is_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outbox.db");
    let cfg = config(&path, Eviction::DropOldest, 1 << 20, None);
    let mut outbox = Outbox::open(&cfg, agent()).expect("opens");
    outbox
        .append(Timestamp(0), &[body(0, 1, 3)], &[Qos2Op::Received(9)])
        .expect("appends");

    let reader = OutboxReader::open(&path, agent()).expect("opens read-only");
    assert_eq!(reader.read_batch(Seq(0), 10).expect("reads").len(), 1);

    // The writer keeps committing with the reader open, and the reader sees it.
    let bodies: Vec<EventBody> = (0..3).map(|i| body(1, i, 5)).collect();
    outbox.append(Timestamp(0), &bodies, &[]).expect("appends");
    let tail = reader.tail(2).expect("tails");
    assert_eq!(tail.iter().map(|e| e.seq.0).collect::<Vec<_>>(), vec![3, 4]);
    assert_eq!(
        reader.stats().expect("stats"),
        outbox.stats().expect("stats")
    );
    assert_eq!(reader.qos2_pending().expect("reads"), BTreeSet::from([9]));

    // A reader opened while the writer holds an open write transaction is
    // not blocked by it.
    let blocker = rusqlite::Connection::open(&path).expect("opens");
    blocker
        .execute_batch("BEGIN IMMEDIATE; DELETE FROM mqtt_qos2;")
        .expect("locks");
    let second = OutboxReader::open(&path, agent()).expect("opens beside a write lock");
    assert_eq!(second.stats().expect("stats").events, 4);
    blocker.execute_batch("ROLLBACK").expect("rolls back");

    // After the writer closed (and SQLite removed the WAL), reading still works.
    drop((outbox, reader, second, blocker));
    let reader = OutboxReader::open(&path, agent()).expect("opens after close");
    assert_eq!(reader.stats().expect("stats").events, 4);
}

#[test]
fn a_reader_on_a_missing_file_names_the_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nope.db");
    let err = OutboxReader::open(&path, agent()).expect_err("no file");
    assert!(matches!(err, OutboxError::NotFound { .. }));
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert!(!path.exists(), "a reader must not create the file");
}

#[test]
fn a_corrupt_body_is_an_error_naming_its_seq() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outbox.db");
    let cfg = config(&path, Eviction::DropOldest, 1 << 20, None);
    let mut outbox = Outbox::open(&cfg, agent()).expect("opens");
    let bodies: Vec<EventBody> = (0..3).map(|i| body(0, i, 2)).collect();
    outbox.append(Timestamp(0), &bodies, &[]).expect("appends");

    let raw = rusqlite::Connection::open(&path).expect("opens");
    raw.execute(
        "UPDATE events SET body = x'ffffffffffffffffff' WHERE seq = 2",
        [],
    )
    .expect("damages");

    let err = outbox.read_batch(Seq(0), 10).expect_err("corrupt");
    match &err {
        OutboxError::CorruptBody { seq, path: p, .. } => {
            assert_eq!(*seq, Seq(2));
            assert_eq!(p, &path);
        }
        other => panic!("expected CorruptBody, got {other:?}"),
    }
    assert!(err.to_string().contains("event 2"), "{err}");
    // The rows around it are still readable.
    assert_eq!(outbox.read_batch(Seq(2), 10).expect("reads").len(), 1);
    assert!(matches!(
        outbox.tail(3),
        Err(OutboxError::CorruptBody { seq: Seq(2), .. })
    ));
}

#[test]
fn a_newer_schema_is_refused_with_its_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outbox.db");
    rusqlite::Connection::open(&path)
        .and_then(|c| c.pragma_update(None, "user_version", 99))
        .expect("writes");
    let cfg = config(&path, Eviction::DropOldest, 1 << 20, None);
    let err = Outbox::open(&cfg, agent()).expect_err("refused");
    assert!(
        matches!(
            err,
            OutboxError::NewerSchema {
                found: 99,
                supported: SCHEMA_VERSION,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(matches!(
        OutboxReader::open(&path, agent()),
        Err(OutboxError::NewerSchema { found: 99, .. })
    ));
}

#[test]
fn acking_beyond_the_last_seq_is_an_error_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = plain(dir.path());
    let mut outbox = Outbox::open(&cfg, agent()).expect("opens");
    assert!(matches!(
        outbox.ack(Seq(1)),
        Err(OutboxError::AckBeyondEnd {
            acked: Seq(1),
            last: Seq(0)
        })
    ));
    outbox
        .append(Timestamp(0), &[body(0, 0, 1), body(0, 0, 1)], &[])
        .expect("appends");
    assert!(matches!(
        outbox.ack(Seq(3)),
        Err(OutboxError::AckBeyondEnd {
            acked: Seq(3),
            last: Seq(2)
        })
    ));
    assert_eq!(outbox.ack(Seq(1)).expect("acks"), 1);
    // A stale ack neither fails nor lowers the watermark.
    assert_eq!(outbox.ack(Seq(0)).expect("acks"), 0);
    assert_eq!(outbox.stats().expect("stats").acked_seq, Seq(1));
}

#[test]
fn refuse_new_accepts_a_prefix_of_the_request_and_counts_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = size_of(&body(0, 0, 10));
    let cfg = config(
        &dir.path().join("outbox.db"),
        Eviction::RefuseNew,
        2 * one,
        None,
    );
    let mut outbox = Outbox::open(&cfg, agent()).expect("opens");
    // The third body does not fit; the fourth (tiny) would, but is refused too
    // so that the accepted bodies stay a prefix that maps onto the seq range.
    let bodies = [
        body(0, 0, 10),
        body(0, 0, 10),
        body(0, 0, 10),
        body(0, 0, 0),
    ];
    let out = outbox.append(Timestamp(0), &bodies, &[]).expect("appends");
    assert_eq!(
        (out.accepted, out.refused, out.first_seq, out.last_seq),
        (2, 2, Some(Seq(1)), Some(Seq(2)))
    );
    assert_eq!(outbox.stats().expect("stats").evicted["refused"], 2);
}

#[test]
fn grouped_appends_give_the_same_outcomes_as_separate_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = size_of(&body(0, 0, 10));
    let mk = |name: &str| config(&dir.path().join(name), Eviction::DropOldest, 3 * one, None);
    let mut grouped = Outbox::open(&mk("a.db"), agent()).expect("opens");
    let mut separate = Outbox::open(&mk("b.db"), agent()).expect("opens");
    let r1 = [body(0, 0, 10), body(0, 0, 10)];
    let r2 = [body(0, 0, 10), body(0, 0, 10)];
    let ops = [Qos2Op::Received(1)];
    let g = grouped
        .append_many(Timestamp(0), &[(&r1, &ops), (&r2, &[])])
        .expect("appends");
    let s1 = separate.append(Timestamp(0), &r1, &ops).expect("appends");
    let s2 = separate.append(Timestamp(0), &r2, &[]).expect("appends");
    assert_eq!(g, vec![s1, s2]);
    let (gs, ss) = (
        grouped.stats().expect("stats"),
        separate.stats().expect("stats"),
    );
    assert_eq!((gs.transactions_total, ss.transactions_total), (1, 2));
    assert_eq!(
        (gs.events, gs.bytes, &gs.evicted),
        (ss.events, ss.bytes, &ss.evicted)
    );
}

#[test]
fn stats_serialise_with_the_documented_fields() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = plain(dir.path());
    let outbox = Outbox::open(&cfg, agent()).expect("opens");
    let json = serde_json::to_value(outbox.stats().expect("stats")).expect("serialises");
    for key in [
        "events",
        "bytes",
        "first_seq",
        "last_seq",
        "next_seq",
        "acked_seq",
        "accepted_total",
        "evicted",
        "qos2_pending",
        "transactions_total",
        "synchronous",
        "path",
        "oldest_accepted_at",
    ] {
        assert!(json.get(key).is_some(), "missing {key} in {json}");
    }
    assert_eq!(json["synchronous"], "normal");
    assert_eq!(json["next_seq"], 1);
}

/// An outbox of `n` events of 200 bytes each, acked up to `acked`, closed.
fn filled(dir: &Path, n: usize, acked: u64) -> (OutboxConfig, Vec<EventBody>) {
    let cfg = config(&dir.join("outbox.db"), Eviction::DropOldest, 1 << 30, None);
    let mut ob = Outbox::open(&cfg, agent()).expect("opens");
    let bodies: Vec<EventBody> = (0..n).map(|i| body(i, i as i64, 200)).collect();
    for chunk in bodies.chunks(100) {
        ob.append(Timestamp(0), chunk, &[]).expect("appends");
    }
    if acked > 0 {
        ob.ack(Seq(acked)).expect("acks");
    }
    drop(ob);
    (cfg, bodies)
}

fn overwrite(path: &Path, at: u64, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("opens");
    f.seek(SeekFrom::Start(at)).expect("seeks");
    f.write_all(bytes).expect("writes");
}

#[test]
fn a_damaged_outbox_is_refused_by_open_and_moved_aside_keeping_what_is_readable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, bodies) = filled(dir.path(), 3000, 100);
    let len = std::fs::metadata(&cfg.path).expect("exists").len();
    // Garbage over a few pages in the middle of the events' B-tree.
    overwrite(&cfg.path, len / 2 / 4096 * 4096, &[0x5a; 3 * 4096]);
    assert!(matches!(
        Outbox::open(&cfg, agent()),
        Err(OutboxError::Corrupt { .. })
    ));
    assert!(matches!(
        Outbox::open_recovering(&cfg, agent(), OnCorruption::Stop),
        Err(OutboxError::Corrupt { .. })
    ));
    let (mut ob, rec) =
        Outbox::open_recovering(&cfg, agent(), OnCorruption::MoveAside).expect("recovers");
    let rec = rec.expect("recovered");
    assert!(rec.moved_to.exists(), "the damaged file is kept");
    assert_eq!(rec.claimed, Some(2900));
    assert!(rec.salvaged > 1000 && rec.salvaged < 2900, "{rec:?}");
    // What was kept is what was written, under the same seqs, none acked.
    let kept = ob.read_batch(Seq(0), 10_000).expect("reads");
    assert_eq!(kept.len() as u64, rec.salvaged);
    for e in &kept {
        assert!(e.seq.0 > 100, "an acked seq came back: {}", e.seq);
        assert_eq!(e.body, bodies[(e.seq.0 - 1) as usize]);
    }
    let stats = ob.stats().expect("stats");
    assert_eq!(stats.events, rec.salvaged);
    assert_eq!(stats.next_seq, Seq(3001), "no seq is reused");
    let o = ob
        .append(Timestamp(0), &[body(0, 0, 10)], &[])
        .expect("appends");
    assert_eq!(o.first_seq, Some(Seq(3001)));
    // And the fresh file is sound.
    drop(ob);
    Outbox::open(&cfg, agent()).expect("a recovered outbox opens cleanly");
}

#[test]
fn a_truncated_or_overwritten_outbox_starts_afresh_without_reusing_what_it_can_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, _) = filled(dir.path(), 2000, 0);
    let len = std::fs::metadata(&cfg.path).expect("exists").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cfg.path)
        .and_then(|f| f.set_len(len / 3))
        .expect("truncates");
    let (ob, rec) =
        Outbox::open_recovering(&cfg, agent(), OnCorruption::MoveAside).expect("recovers");
    let rec = rec.expect("recovered");
    assert!(rec.salvaged < 2000, "{rec:?}");
    assert!(ob.stats().expect("stats").next_seq.0 > rec.salvaged);
    drop(ob);

    // A file that is not SQLite at all.
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, _) = filled(dir.path(), 10, 0);
    overwrite(&cfg.path, 0, b"this is not a database header....");
    let (ob, rec) =
        Outbox::open_recovering(&cfg, agent(), OnCorruption::MoveAside).expect("recovers");
    let rec = rec.expect("recovered");
    assert_eq!((rec.salvaged, rec.claimed), (0, None));
    assert_eq!(ob.stats().expect("stats").events, 0);
}

#[test]
fn a_hub_seq_too_high_to_follow_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = plain(dir.path());
    let mut ob = Outbox::open(&cfg, agent()).expect("opens");
    ob.append(Timestamp(0), &[body(0, 0, 8), body(1, 0, 8)], &[])
        .expect("appends");
    for far in [u64::MAX, u64::MAX - 1, i64::MAX as u64] {
        assert!(matches!(
            ob.follow(Seq(far)),
            Err(OutboxError::SeqOverflow { after }) if after == Seq(far)
        ));
        assert!(matches!(
            ob.resume_after(Seq(far)),
            Err(OutboxError::SeqOverflow { .. })
        ));
    }
    let left: Vec<Seq> = ob
        .read_batch(Seq(0), 10)
        .expect("reads")
        .into_iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(left, [Seq(1), Seq(2)]);
}

#[test]
fn each_group_commit_stamps_its_events_until_they_leave() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ob = Outbox::open(&plain(dir.path()), agent()).expect("opens");
    let b = |i: i64| body(1, i, 4);
    ob.append(Timestamp(100), &[b(1), b(2)], &[])
        .expect("append");
    ob.append(Timestamp(200), &[b(3)], &[]).expect("append");
    assert_eq!(
        ob.accepted_at(Seq(0), Seq(3)).expect("stamps"),
        vec![(Seq(1), 100), (Seq(3), 200)]
    );
    // A read from the middle of a commit gets the stamp that covers it.
    assert_eq!(
        ob.accepted_at(Seq(1), Seq(2)).expect("stamps"),
        vec![(Seq(1), 100)]
    );
    assert_eq!(ob.stats().expect("stats").oldest_accepted_at, Some(100));
    ob.ack(Seq(2)).expect("ack");
    assert_eq!(ob.stats().expect("stats").oldest_accepted_at, Some(200));
    assert_eq!(
        ob.accepted_at(Seq(2), Seq(3)).expect("stamps"),
        vec![(Seq(3), 200)]
    );
    ob.ack(Seq(3)).expect("ack");
    assert_eq!(ob.stats().expect("stats").oldest_accepted_at, None);
    // A renumbering moves the stamps with their events.
    ob.append(Timestamp(300), &[b(4)], &[]).expect("append");
    ob.resume_after(Seq(10)).expect("renumber");
    assert_eq!(
        ob.accepted_at(Seq(10), Seq(11)).expect("stamps"),
        vec![(Seq(11), 300)]
    );
}
