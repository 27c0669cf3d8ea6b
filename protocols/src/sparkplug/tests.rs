//! The host's state machine driven without a broker: births, aliases, seq
//! gaps, deaths and bad payloads, and model tests of the seq tracking and
//! the alias tables.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use prost::Message as _;

use super::host::convert;
use super::payload::{self, DataType, Metric, MetricValue, Payload};
use super::*;
use crate::event::{Quality, Reason, Value};

#[allow(clippy::disallowed_methods)] // Tests need one origin; the host never reads the clock.
fn origin() -> Instant {
    Instant::now()
}

const NOW_NS: i64 = 1_796_558_400_000_000_000;

fn host(interval: Duration) -> Host {
    Host::new(HostOptions {
        rebirth: true,
        rebirth_interval: interval,
    })
}

fn metric(name: Option<&str>, alias: Option<u64>, dt: u32, v: MetricValue) -> Metric {
    Metric {
        name: name.map(str::to_owned),
        alias,
        datatype: Some(dt),
        value: Some(v),
        ..Metric::default()
    }
}

fn bd(n: u64) -> Metric {
    metric(Some("bdSeq"), None, 8, MetricValue::LongValue(n))
}

fn payload(seq: Option<u64>, metrics: Vec<Metric>) -> Vec<u8> {
    Payload {
        timestamp: Some(1_000),
        seq,
        metrics,
        ..Payload::default()
    }
    .encode_to_vec()
}

/// Feeds a message and drains the outputs.
fn feed(h: &mut Host, now: Instant, topic: &str, bytes: &[u8]) -> Vec<Output> {
    h.handle_message(now, NOW_NS, topic, bytes).expect("topic");
    std::iter::from_fn(|| h.poll_output()).collect()
}

fn samples(out: &[Output]) -> BTreeMap<String, (Value, Quality)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Sample(b) => Some((
                b.stream.as_str().to_owned(),
                (b.value.clone(), b.quality.clone()),
            )),
            _ => None,
        })
        .collect()
}

fn rebirths(out: &[Output]) -> Vec<RebirthReason> {
    out.iter()
        .filter_map(|o| match o {
            Output::Rebirth {
                topic,
                payload,
                reason,
            } => {
                assert_eq!(topic, "spBv1.0/g/NCMD/n");
                let p = payload::decode(payload).expect("ncmd decodes");
                assert_eq!(p.metrics[0].name.as_deref(), Some("Node Control/Rebirth"));
                assert_eq!(p.metrics[0].value, Some(MetricValue::BooleanValue(true)));
                Some(reason.clone())
            }
            _ => None,
        })
        .collect()
}

fn nbirth(seq: u64, bdseq: u64) -> Vec<u8> {
    payload(
        Some(seq),
        vec![
            bd(bdseq),
            metric(Some("temp"), Some(1), 10, MetricValue::DoubleValue(20.5)),
            metric(Some("count"), Some(2), 1, MetricValue::IntValue(0xff)),
        ],
    )
}

#[test]
fn births_define_aliases_that_data_messages_resolve() {
    let mut h = host(Duration::ZERO);
    let t = origin();
    let out = feed(&mut h, t, "spBv1.0/g/NBIRTH/n", &nbirth(0, 3));
    let s = samples(&out);
    assert_eq!(s["g/n/temp"].0, Value::F64(20.5));
    assert_eq!(s["g/n/count"].0, Value::I64(-1), "Int8 0xff is -1");
    assert_eq!(s["g/n/bdSeq"].0, Value::U64(3));
    assert!(rebirths(&out).is_empty());
    let data = payload(
        Some(1),
        vec![Metric {
            alias: Some(1),
            value: Some(MetricValue::DoubleValue(21.0)),
            ..Metric::default()
        }],
    );
    let out = feed(&mut h, t, "spBv1.0/g/NDATA/n", &data);
    assert_eq!(samples(&out)["g/n/temp"], (Value::F64(21.0), Quality::Good));
    assert!(rebirths(&out).is_empty());
    // A device under the node has its own aliases.
    let dbirth = payload(
        Some(2),
        vec![metric(Some("rpm"), Some(1), 7, MetricValue::IntValue(1500))],
    );
    let out = feed(&mut h, t, "spBv1.0/g/DBIRTH/n/press", &dbirth);
    assert_eq!(samples(&out)["g/n/press/rpm"].0, Value::U64(1500));
    let ddata = payload(
        Some(3),
        vec![Metric {
            alias: Some(1),
            value: Some(MetricValue::IntValue(1600)),
            ..Metric::default()
        }],
    );
    let out = feed(&mut h, t, "spBv1.0/g/DDATA/n/press", &ddata);
    assert_eq!(samples(&out)["g/n/press/rpm"].0, Value::U64(1600));
    assert!(rebirths(&out).is_empty());
}

#[test]
fn a_seq_gap_draws_one_rebirth_within_the_interval_and_another_after_it() {
    let mut h = host(Duration::from_secs(5));
    let t = origin();
    let _ = feed(&mut h, t, "spBv1.0/g/NBIRTH/n", &nbirth(0, 0));
    let gap = payload(Some(5), vec![]);
    assert_eq!(
        rebirths(&feed(&mut h, t, "spBv1.0/g/NDATA/n", &gap)),
        vec![RebirthReason::SeqGap {
            expected: 1,
            got: 5
        }]
    );
    let gap = payload(Some(9), vec![]);
    assert!(rebirths(&feed(
        &mut h,
        t + Duration::from_secs(1),
        "spBv1.0/g/NDATA/n",
        &gap
    ))
    .is_empty());
    let gap = payload(Some(20), vec![]);
    assert_eq!(
        rebirths(&feed(
            &mut h,
            t + Duration::from_secs(6),
            "spBv1.0/g/NDATA/n",
            &gap
        ))
        .len(),
        1
    );
    // 255 wraps to 0 without a gap.
    let _ = feed(&mut h, t, "spBv1.0/g/NBIRTH/n", &nbirth(254, 0));
    for seq in [255, 0, 1] {
        let out = feed(&mut h, t, "spBv1.0/g/NDATA/n", &payload(Some(seq), vec![]));
        assert!(rebirths(&out).is_empty(), "{seq}");
    }
}

#[test]
fn an_unknown_alias_or_a_node_without_birth_draws_a_rebirth() {
    let mut h = host(Duration::ZERO);
    let t = origin();
    let data = payload(
        Some(7),
        vec![Metric {
            alias: Some(9),
            value: Some(MetricValue::IntValue(1)),
            ..Metric::default()
        }],
    );
    let out = feed(&mut h, t, "spBv1.0/g/NDATA/n", &data);
    assert!(samples(&out).is_empty());
    assert!(rebirths(&out).contains(&RebirthReason::NoBirth));
    let _ = feed(&mut h, t, "spBv1.0/g/NBIRTH/n", &nbirth(0, 0));
    let data = payload(
        Some(1),
        vec![Metric {
            alias: Some(9),
            value: Some(MetricValue::IntValue(1)),
            ..Metric::default()
        }],
    );
    assert_eq!(
        rebirths(&feed(&mut h, t, "spBv1.0/g/NDATA/n", &data)),
        vec![RebirthReason::UnknownAlias(9)]
    );
}

#[test]
fn a_death_of_the_current_session_marks_every_metric_stale_and_an_old_one_nothing() {
    let mut h = host(Duration::ZERO);
    let t = origin();
    let _ = feed(&mut h, t, "spBv1.0/g/NBIRTH/n", &nbirth(0, 4));
    let dbirth = payload(
        Some(1),
        vec![metric(Some("rpm"), Some(1), 7, MetricValue::IntValue(1500))],
    );
    let _ = feed(&mut h, t, "spBv1.0/g/DBIRTH/n/press", &dbirth);
    let old = feed(&mut h, t, "spBv1.0/g/NDEATH/n", &payload(None, vec![bd(3)]));
    assert!(samples(&old).is_empty(), "{old:?}");
    let out = feed(&mut h, t, "spBv1.0/g/NDEATH/n", &payload(None, vec![bd(4)]));
    let s = samples(&out);
    let stale = Quality::Uncertain(Reason::Other("node death".into()));
    assert_eq!(s["g/n/temp"], (Value::F64(20.5), stale.clone()));
    assert_eq!(s["g/n/press/rpm"], (Value::U64(1500), stale));
    assert_eq!(s.len(), 4, "bdSeq, temp, count, rpm: {s:?}");
    // A second death changes nothing: the metrics are stale already.
    let again = feed(&mut h, t, "spBv1.0/g/NDEATH/n", &payload(None, vec![bd(4)]));
    assert!(samples(&again).is_empty());
}

#[test]
fn a_device_death_marks_only_its_metrics_stale() {
    let mut h = host(Duration::ZERO);
    let t = origin();
    let _ = feed(&mut h, t, "spBv1.0/g/NBIRTH/n", &nbirth(0, 4));
    let dbirth = payload(
        Some(1),
        vec![metric(Some("rpm"), Some(1), 7, MetricValue::IntValue(1500))],
    );
    let _ = feed(&mut h, t, "spBv1.0/g/DBIRTH/n/press", &dbirth);
    let out = feed(
        &mut h,
        t,
        "spBv1.0/g/DDEATH/n/press",
        &payload(Some(2), vec![]),
    );
    let s = samples(&out);
    assert_eq!(s.len(), 1);
    assert_eq!(
        s["g/n/press/rpm"].1,
        Quality::Uncertain(Reason::Other("device death".into()))
    );
}

#[test]
fn a_payload_that_is_not_protobuf_is_one_bad_event_with_its_bytes() {
    let mut h = host(Duration::ZERO);
    let out = feed(
        &mut h,
        origin(),
        "spBv1.0/g/DDATA/n/d",
        b"\xff\xff\xff garbage",
    );
    let s = samples(&out);
    let (v, q) = &s["g/n/d"];
    assert_eq!(v, &Value::Bytes(b"\xff\xff\xff garbage".to_vec()));
    assert!(matches!(q, Quality::Bad(Reason::Decode(_))), "{q:?}");
}

#[test]
fn commands_state_and_foreign_topics_store_nothing() {
    let mut h = host(Duration::ZERO);
    let t = origin();
    assert!(feed(&mut h, t, "spBv1.0/g/NCMD/n", &payload::rebirth_request(1)).is_empty());
    assert!(feed(&mut h, t, "spBv1.0/STATE/scada", b"{\"online\":true}").is_empty());
    assert!(h.handle_message(t, NOW_NS, "plant/a", b"1").is_err());
}

#[test]
fn values_are_read_as_their_data_type_says() {
    let c = |dt: u32, v: MetricValue| convert(Some(DataType::from_wire(dt)), Some(&v));
    assert_eq!(
        c(2, MetricValue::IntValue(0xffff_8000)),
        Ok(Value::I64(-32768))
    );
    assert_eq!(c(3, MetricValue::IntValue(u32::MAX)), Ok(Value::I64(-1)));
    assert_eq!(c(4, MetricValue::LongValue(u64::MAX)), Ok(Value::I64(-1)));
    assert_eq!(
        c(8, MetricValue::LongValue(u64::MAX)),
        Ok(Value::U64(u64::MAX))
    );
    assert_eq!(c(9, MetricValue::FloatValue(1.5)), Ok(Value::F64(1.5)));
    assert_eq!(
        c(11, MetricValue::BooleanValue(true)),
        Ok(Value::Bool(true))
    );
    assert_eq!(
        c(12, MetricValue::StringValue("on".into())),
        Ok(Value::String("on".into()))
    );
    let arr = |dt, b: &[u8]| match c(dt, MetricValue::BytesValue(b.to_vec())) {
        Ok(Value::Json(j)) => j.to_value(),
        other => panic!("{other:?}"),
    };
    assert_eq!(arr(23, &[0xff, 0xff, 2, 0]), serde_json::json!([-1, 2]));
    assert_eq!(
        arr(32, &[3, 0, 0, 0, 0b1010_0000]),
        serde_json::json!([true, false, true])
    );
    assert_eq!(arr(33, b"ab\0c\0"), serde_json::json!(["ab", "c"]));
    assert!(c(24, MetricValue::BytesValue(vec![1, 2, 3])).is_err());
    assert!(c(32, MetricValue::BytesValue(vec![9, 0, 0, 0, 0])).is_err());
    assert!(convert(Some(DataType::from_wire(16)), None).is_err_and(|e| e.contains("DataSet")));
}

proptest! {
    /// Any bytes on any message type: no panic, and every event the host
    /// makes has a stream under the node (the fuzz target `sparkplug` does
    /// the same for longer).
    #[test]
    fn any_messages_never_panic(msgs in proptest::collection::vec((0usize..8, proptest::collection::vec(any::<u8>(), 0..64)), 0..32)) {
        let topics = [
            "spBv1.0/g/NBIRTH/n", "spBv1.0/g/NDATA/n", "spBv1.0/g/NDEATH/n", "spBv1.0/g/DBIRTH/n/d",
            "spBv1.0/g/DDATA/n/d", "spBv1.0/g/DDEATH/n/d", "spBv1.0/g/NCMD/n", "spBv1.0/STATE/h",
        ];
        let mut h = host(Duration::ZERO);
        let t = origin();
        for (i, bytes) in msgs {
            for o in feed(&mut h, t, topics[i], &bytes) {
                if let Output::Sample(b) = o {
                    prop_assert!(b.stream.as_str().starts_with("g/n"), "{}", b.stream);
                }
            }
        }
    }

    /// The seq model: after a birth at `start`, a rebirth is asked for
    /// exactly at the data messages whose seq is not the last one plus one
    /// (modulo 256), with no interval between requests.
    #[test]
    fn rebirths_follow_exactly_the_seq_gaps(start in 0u64..256, seqs in proptest::collection::vec(0u64..256, 0..64)) {
        let mut h = host(Duration::ZERO);
        let t = origin();
        let _ = feed(&mut h, t, "spBv1.0/g/NBIRTH/n", &nbirth(start, 1));
        let mut last = start;
        for seq in seqs {
            let asked = rebirths(&feed(&mut h, t, "spBv1.0/g/NDATA/n", &payload(Some(seq), vec![])));
            let gap = seq != (last + 1) % 256;
            prop_assert_eq!(asked.len(), usize::from(gap), "last {} seq {}", last, seq);
            last = seq;
        }
    }

    /// The alias model: births (of the node or a device) define aliases;
    /// data messages by alias resolve to the name of the latest birth of
    /// their scope, and an alias no birth of that scope defined draws a
    /// rebirth and stores nothing.
    #[test]
    fn aliases_resolve_to_the_latest_birth_of_their_scope(
        steps in proptest::collection::vec(
            (any::<bool>(), 0u8..2, proptest::collection::btree_map(0u64..8, "[a-z]{1,6}", 0..5), 0u64..8),
            1..40,
        ),
    ) {
        let mut h = host(Duration::ZERO);
        let t = origin();
        let _ = feed(&mut h, t, "spBv1.0/g/NBIRTH/n", &payload(Some(0), vec![bd(1)]));
        let mut seq = 0u64;
        let mut model: [BTreeMap<u64, String>; 2] = Default::default();
        for (is_birth, scope, aliases, probe) in steps {
            seq = (seq + 1) % 256;
            let (kind, dev) = if scope == 0 { ("N", "") } else { ("D", "/dev") };
            if is_birth {
                let mut metrics: Vec<Metric> = aliases.iter().map(|(a, n)| metric(Some(n), Some(*a), 10, MetricValue::DoubleValue(0.0))).collect();
                if scope == 0 {
                    metrics.push(bd(1));
                }
                let out = feed(&mut h, t, &format!("spBv1.0/g/{kind}BIRTH/n{dev}"), &payload(Some(seq), metrics));
                prop_assert!(rebirths(&out).is_empty());
                if scope == 0 {
                    // A node's birth starts its devices over too.
                    model[1].clear();
                }
                model[usize::from(scope)] = aliases;
                continue;
            }
            let data = payload(Some(seq), vec![Metric { alias: Some(probe), value: Some(MetricValue::DoubleValue(1.0)), ..Metric::default() }]);
            let out = feed(&mut h, t, &format!("spBv1.0/g/{kind}DATA/n{dev}"), &data);
            let s = samples(&out);
            match model[usize::from(scope)].get(&probe) {
                Some(name) => {
                    let prefix = if scope == 0 { "g/n".to_owned() } else { "g/n/dev".to_owned() };
                    prop_assert_eq!(s.keys().cloned().collect::<Vec<_>>(), vec![format!("{prefix}/{name}")]);
                    prop_assert!(rebirths(&out).is_empty());
                }
                None => {
                    prop_assert!(s.is_empty(), "{:?}", s);
                    prop_assert!(!rebirths(&out).is_empty());
                }
            }
        }
    }
}
