use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;

use super::model::glob;
use super::*;
use crate::event::{EventBody, JsonText, Quality, StreamName, Timestamp, Value};
use crate::topic::TopicFilter;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn body(stream: &str, ts_s: f64, value: Value) -> EventBody {
    EventBody {
        stream: StreamName::parse(stream).expect("valid stream"),
        ts: Timestamp((ts_s * 1e9) as i64),
        value,
        quality: Quality::Good,
        attrs: BTreeMap::new(),
    }
}

fn json(text: &str) -> Value {
    Value::Json(JsonText::parse(text).expect("json"))
}

/// The hub's hashing key of these tests.
fn hub_key() -> HashingKey {
    HashingKey::from_bytes(&[7u8; 32]).expect("32 bytes")
}

fn enforcer(text: &str, labels: &BTreeMap<String, String>, catalog: &Catalog) -> Enforcer {
    let p = Policy::parse(text, catalog)
        .expect("policy parses")
        .with_hashing_key(hub_key());
    Enforcer::new(Arc::new(p.compile(labels, catalog)))
}

fn eu_catalog() -> Catalog {
    Catalog::hub(Some("eu-west")).with_sink("cloud-us", Some("us-east"))
}

fn err(text: &str) -> String {
    Policy::parse(text, &eu_catalog())
        .expect_err("refused")
        .to_string()
}

#[test]
fn the_empty_policy_allows_everything_to_the_store() {
    let mut e = enforcer("", &labels(&[]), &eu_catalog());
    let mut b = body("plant/a", 0.0, Value::U64(1));
    assert_eq!(
        e.apply(&mut b, Stage::Ingest),
        Verdict::Keep {
            modified: false,
            sinks: vec!["store".to_owned()].into()
        }
    );
}

#[test]
fn the_first_matching_rule_decides_and_selectors_pick_agents() {
    let text = r#"
        [[rules]]
        name = "no debug at depot 17"
        agents = { site = "depot-17" }
        streams = ["plant/+/debug/#"]
        action = "deny"
        [[rules]]
        streams = ["plant/#"]
        [defaults]
        action = "deny"
    "#;
    let c = eu_catalog();
    let mut depot = enforcer(text, &labels(&[("site", "depot-17")]), &c);
    let mut other = enforcer(text, &labels(&[("site", "depot-18")]), &c);
    let mut b = body("plant/l1/debug/x", 0.0, Value::U64(1));
    assert_eq!(
        depot.apply(&mut b.clone(), Stage::Ingest),
        Verdict::Drop(DropReason::Denied)
    );
    assert!(matches!(
        other.apply(&mut b, Stage::Ingest),
        Verdict::Keep { .. }
    ));
    let mut elsewhere = body("office/x", 0.0, Value::U64(1));
    assert_eq!(
        other.apply(&mut elsewhere, Stage::Ingest),
        Verdict::Drop(DropReason::Denied)
    );
    assert_eq!(
        depot.compiled().rule_for("plant/l1/debug/x"),
        Some("no debug at depot 17")
    );
}

#[test]
fn label_globs_anchor_at_both_ends() {
    assert!(glob("depot-*", "depot-17"));
    assert!(glob("*-17", "depot-17"));
    assert!(glob("d*t*7", "depot-17"));
    assert!(!glob("depot-*", "xdepot-17"));
    assert!(!glob("depot", "depot-17"));
    assert!(glob("*", ""));
    assert!(!glob("a*a", "a"));
}

#[test]
fn minimisation_drops_redacts_hashes_and_rounds_json_fields() {
    let text = r#"
        [[rules]]
        name = "badges"
        streams = ["badge/#"]
        drop = ["/photo"]
        redact = ["/name"]
        hash = ["/employee"]
        round = 1
        round_fields = ["/temp", "/missing"]
    "#;
    let mut e = enforcer(text, &labels(&[]), &eu_catalog());
    let mut b = body(
        "badge/gate1",
        0.0,
        json(r#"{"photo":"AAAA","name":"Ann","employee":4711,"temp":36.66,"door":"north"}"#),
    );
    assert!(matches!(
        e.apply(&mut b, Stage::Ingest),
        Verdict::Keep { modified: true, .. }
    ));
    let Value::Json(j) = &b.value else {
        panic!("still json")
    };
    let v = j.to_value();
    assert!(v.get("photo").is_none());
    assert_eq!(v["name"], REDACTED);
    let h = v["employee"].as_str().expect("hash is text");
    let key = hub_key().derive("badges", &BTreeMap::new());
    assert_eq!(h, fields::keyed_hash(key.bytes(), "4711"));
    assert!(h.starts_with(HASH_PREFIX) && h.len() == HASH_PREFIX.len() + 64);
    assert_eq!(v["temp"], 36.7);
    assert_eq!(v["door"], "north");
    // Applying the policy again (as the hub does) changes nothing.
    let once = b.clone();
    assert!(matches!(
        e.apply(&mut b, Stage::Recheck),
        Verdict::Keep {
            modified: false,
            ..
        }
    ));
    assert_eq!(b, once);
}

#[test]
fn rounding_settles_after_one_pass_for_nan_huge_and_json_numbers() {
    // Found by the policy fuzz target: each of these reported a change on
    // every pass.
    let text = "[[rules]]\nstreams = [\"a\"]\nround = 1\n";
    let mut e = enforcer(text, &labels(&[]), &eu_catalog());
    for v in [
        Value::F64(f64::NAN),
        Value::F64(-2.920_375_946_602_099_6e94),
        json("-2.9203759466020996e+94"),
        json("0.30000000000000004"),
        json("123456.789012"),
    ] {
        let mut b = body("a", 0.0, v);
        let _ = e.apply(&mut b, Stage::Recheck);
        let once = b.clone();
        let again = e.apply(&mut b, Stage::Recheck);
        assert!(
            matches!(
                again,
                Verdict::Keep {
                    modified: false,
                    ..
                }
            ),
            "{once:?}"
        );
        assert_eq!(b.encode(), once.encode());
    }
}

#[test]
fn a_float_value_is_rounded_in_place() {
    let text = "[[rules]]\nstreams = [\"plc1/#\"]\nround = 2\n";
    let mut e = enforcer(text, &labels(&[]), &eu_catalog());
    let mut b = body("plc1/temp", 0.0, Value::F64(21.3456));
    assert!(matches!(
        e.apply(&mut b, Stage::Ingest),
        Verdict::Keep { modified: true, .. }
    ));
    assert_eq!(b.value, Value::F64(21.35));
}

#[test]
fn downsampling_keeps_one_event_per_interval_and_respects_the_deadband() {
    let text = r#"
        [[rules]]
        streams = ["plc1/temp"]
        downsample = { interval = "10s", deadband = 0.5, max_interval = "60s" }
    "#;
    let mut e = enforcer(text, &labels(&[]), &eu_catalog());
    let mut kept = Vec::new();
    let values = [
        (0.0, 20.0),  // first: kept
        (5.0, 25.0),  // within interval: dropped
        (10.0, 20.2), // interval passed, moved 0.2 < 0.5: dropped
        (11.0, 21.0), // moved 1.0: kept
        (30.0, 21.1), // moved 0.1: dropped
        (71.0, 21.1), // max_interval passed: kept
    ];
    for (t, v) in values {
        let mut b = body("plc1/temp", t, Value::F64(v));
        if matches!(e.apply(&mut b, Stage::Ingest), Verdict::Keep { .. }) {
            kept.push(t);
        }
    }
    assert_eq!(kept, vec![0.0, 11.0, 71.0]);
}

#[test]
fn per_stream_and_per_agent_drop_limits_run_on_event_time() {
    let text = r#"
        [[rules]]
        streams = ["fast/#"]
        rate = { events_per_second = 2, over = "drop" }
        [[limits]]
        events_per_second = 1000
        over = "drop"
    "#;
    let mut e = enforcer(text, &labels(&[]), &eu_catalog());
    // 100 events in one second of event time: a 2/s limit with a one-second
    // burst keeps 2 at the start and one more per half second.
    let kept = (0..100)
        .filter(|i| {
            let mut b = body("fast/x", *i as f64 / 100.0, Value::U64(1));
            matches!(e.apply(&mut b, Stage::Ingest), Verdict::Keep { .. })
        })
        .count();
    assert_eq!(kept, 3, "2 saved up and 1 refilled within the second");
    // The same events drained later, at any speed, get the same verdicts.
    let mut hub = enforcer(text, &labels(&[]), &eu_catalog());
    let again = (0..100)
        .filter(|i| {
            let mut b = body("fast/x", *i as f64 / 100.0, Value::U64(1));
            matches!(hub.apply(&mut b, Stage::Ingest), Verdict::Keep { .. })
        })
        .count();
    assert_eq!(again, kept);
}

#[test]
fn the_agents_own_records_survive_default_deny_and_agent_limits_but_not_a_rule_naming_them() {
    use crate::event::BRIDGE_WRITES_STREAM;
    let store = || Verdict::Keep {
        modified: false,
        sinks: vec!["store".to_owned()].into(),
    };
    // `[defaults]` deny, a `#` rule routing nowhere, a tight agent-wide
    // drop limit: none of them was written for the agent's records.
    let text = r##"
        [defaults]
        action = "deny"
        [[rules]]
        streams = ["#"]
        sinks = []
        [[limits]]
        events_per_second = 1
        over = "drop"
    "##;
    let mut e = enforcer(text, &labels(&[]), &eu_catalog());
    for i in 0..10 {
        let mut b = body(BRIDGE_WRITES_STREAM, f64::from(i) / 100.0, json("{}"));
        assert_eq!(e.apply(&mut b, Stage::Ingest), store(), "event {i}");
    }
    let mut b = body("plant/a", 0.0, Value::U64(1));
    assert_eq!(
        e.apply(&mut b, Stage::Ingest),
        Verdict::Drop(DropReason::Local)
    );
    // A rule that names them decides, as for any stream.
    let text = r#"
        [[rules]]
        name = "no bridge audit"
        streams = ["$outpost/bridge/writes"]
        action = "deny"
    "#;
    let mut e = enforcer(text, &labels(&[]), &eu_catalog());
    let mut b = body(BRIDGE_WRITES_STREAM, 0.0, json("{}"));
    assert_eq!(
        e.apply(&mut b, Stage::Ingest),
        Verdict::Drop(DropReason::Denied)
    );
}

#[test]
fn token_bucket_waits_for_refill() {
    let mut b = TokenBucket::new(10.0);
    assert!(b.try_take(0, 10.0));
    assert!(!b.try_take(0, 1.0));
    assert_eq!(b.wait(0, 1.0), 100_000_000);
    assert!(b.try_take(100_000_000, 1.0));
}

#[test]
fn residency_removes_sinks_outside_the_regions_at_the_last_step() {
    // Validation refuses such a route; a policy validated against another
    // catalog (an older hub config) must still not deliver outside.
    let text = r#"
        [[residency]]
        streams = ["hr/#"]
        classification = "personal"
        home = "eu-west"
        [[rules]]
        streams = ["hr/#"]
        sinks = ["store", "cloud-us"]
    "#;
    let loose = Catalog::trusting();
    let p = Policy::parse(text, &loose).expect("a trusting catalog checks no regions");
    let mut e = Enforcer::new(Arc::new(p.compile(&labels(&[]), &eu_catalog())));
    let mut b = body("hr/badge", 0.0, Value::U64(1));
    assert_eq!(
        e.apply(&mut b, Stage::Ingest),
        Verdict::Keep {
            modified: false,
            sinks: vec!["store".to_owned()].into()
        }
    );
    let us = Catalog::hub(Some("us-east"));
    let mut e = Enforcer::new(Arc::new(p.compile(&labels(&[]), &us)));
    assert_eq!(
        e.apply(&mut b, Stage::Ingest),
        Verdict::Drop(DropReason::Residency)
    );
}

#[test]
fn a_route_against_residency_is_refused_naming_the_rule() {
    let e = err(r#"
        [[residency]]
        name = "personnel"
        streams = ["hr/#"]
        classification = "personal"
        home = "eu-west"
        [[rules]]
        name = "to the us"
        streams = ["hr/+/badge"]
        sinks = ["store", "cloud-us"]
    "#);
    assert!(
        e.starts_with("rules[0] (\"to the us\").sinks[1]: residency:"),
        "{e}"
    );
    assert!(
        e.contains("personnel") && e.contains("cloud-us") && e.contains("us-east"),
        "{e}"
    );
    // The default route counts too, for streams no rule takes.
    let e = err(r#"
        [defaults]
        sinks = ["cloud-us"]
        [[residency]]
        streams = ["hr/#"]
        classification = "personal"
        home = "eu-west"
    "#);
    assert!(e.starts_with("defaults.sinks[0]: residency:"), "{e}");
    // A store whose region is not known is outside every residency.
    let e = Policy::parse(
        "[[residency]]\nstreams = [\"hr/#\"]\nclassification = \"p\"\nhome = \"eu-west\"\n",
        &Catalog::hub(None),
    )
    .expect_err("refused")
    .to_string();
    assert!(e.contains("no region"), "{e}");
}

#[test]
fn bad_documents_are_refused_with_the_key_path() {
    let cases: &[(&str, &str)] = &[
        ("rules = [", "TOML"),
        ("[[rules]]\nstreams = [\"a\"]\nfrobnicate = 1\n", "frobnicate"),
        ("[[rules]]\nstreams = [\"a/#/b\"]\n", "rules[0].streams[0]"),
        ("[[rules]]\nstreams = []\n", "rules[0].streams: must list"),
        ("[[rules]]\nstreams = [\"a\"]\nsinks = [\"nowhere\"]\n", "rules[0].sinks[0]: unknown sink \"nowhere\""),
        ("[[rules]]\nstreams = [\"a\"]\nhash = [\"/x\"]\n", "rules[0].hash: a rule that hashes needs a name"),
        ("[[rules]]\nname = \"n\"\nstreams = [\"a\"]\nhash = [\"/x\"]\nhash_key = \"00\"\n", "rules[0] (\"n\").hash_key: hashing keys are the hub's"),
        ("[[rules]]\nstreams = [\"a\"]\ndrop = [\"x\"]\n", "rules[0].drop[0]"),
        ("[[rules]]\nstreams = [\"a\"]\naction = \"deny\"\nredact = [\"/x\"]\n", "a deny rule"),
        ("[[rules]]\nname = \"all\"\nstreams = [\"plant/#\"]\n[[rules]]\nname = \"late\"\nstreams = [\"plant/a/+\"]\n", "rules[1] (\"late\").streams[0]: pattern \"plant/a/+\" cannot match: rule \"all\""),
        ("[[rules]]\nstreams = [\"a\"]\nrate = { events_per_second = 5 }\n", "must say over = \"drop\""),
        ("[[rules]]\nstreams = [\"a\"]\ndownsample = { interval = \"soon\" }\n", "invalid duration"),
        ("[hashing]\nkey = \"short\"\n", "line 1: [hashing] key"),
        ("[[rules]]\nname = \"n\"\nstreams = [\"a\"]\nredact = [\"/n\"]\nhash = [\"/n\"]\n", "rules[0] (\"n\").hash: \"/n\" is also in redact"),
        ("[[buffer]]\neviction = \"random\"\n", "buffer[0].eviction"),
        ("[[commands]]\nroles = [\"operator\"]\n", "commands[0]: grants nothing"),
    ];
    for (text, want) in cases {
        let e = err(text);
        assert!(e.contains(want), "{text:?}: {e:?} should contain {want:?}");
        assert!(!e.contains('\n'), "one line: {e:?}");
    }
    let big = "#".repeat(MAX_POLICY_LEN + 1);
    assert!(err(&big).contains("exceeds the limit"));
}

#[test]
fn a_rule_for_other_agents_does_not_shadow() {
    let text = r#"
        [[rules]]
        agents = { site = "a" }
        streams = ["plant/#"]
        action = "deny"
        [[rules]]
        streams = ["plant/x"]
    "#;
    Policy::parse(text, &eu_catalog()).expect("the second rule still applies to other sites");
}

#[test]
fn a_star_selector_does_not_shadow_a_rule_for_agents_without_the_label() {
    let text = r#"
        [[rules]]
        agents = { site = "*" }
        streams = ["plant/#"]
        action = "deny"
        [[rules]]
        streams = ["plant/x"]
    "#;
    let p = Policy::parse(text, &eu_catalog())
        .expect("agents without a site label reach the second rule");
    let mut e = Enforcer::new(Arc::new(p.compile(&labels(&[]), &eu_catalog())));
    let mut b = body("plant/x", 0.0, Value::U64(1));
    assert!(matches!(
        e.apply(&mut b, Stage::Ingest),
        Verdict::Keep { .. }
    ));
    // With the label, the first rule takes it; a later rule for the same
    // label is shadowed.
    let shadowed =
        format!("{text}\n[[rules]]\nagents = {{ site = \"a\" }}\nstreams = [\"plant/y\"]\n");
    assert!(err(&shadowed).contains("cannot match"));
}

#[test]
fn commands_are_denied_unless_granted() {
    let text = r#"
        [[commands]]
        roles = ["operator"]
        agents = { site = "depot-17" }
        write = ["plc1/setpoint"]
        publish = ["plant/+/cmd/#"]
    "#;
    let p = Policy::parse(text, &eu_catalog()).expect("parses");
    let depot = labels(&[("site", "depot-17")]);
    assert!(p.authorize("operator", &depot, Command::Write("plc1/setpoint")));
    assert!(p.authorize("operator", &depot, Command::Publish("plant/l1/cmd/start")));
    assert!(!p.authorize("viewer", &depot, Command::Write("plc1/setpoint")));
    assert!(!p.authorize("operator", &depot, Command::Write("plc1/other")));
    assert!(!p.authorize(
        "operator",
        &labels(&[("site", "x")]),
        Command::Write("plc1/setpoint")
    ));
    assert!(!Policy::default().authorize("admin", &depot, Command::Write("plc1/setpoint")));
    // Reading now is a grant of its own: a write grant does not give it.
    assert!(!p.authorize("operator", &depot, Command::Read("plc1/setpoint")));
    let read = Policy::parse(
        "[[commands]]\nroles = [\"viewer\"]\nread = [\"plc1/+\"]\n",
        &eu_catalog(),
    )
    .expect("parses");
    assert!(read.authorize("viewer", &depot, Command::Read("plc1/setpoint")));
    assert!(!read.authorize("viewer", &depot, Command::Write("plc1/setpoint")));
}

#[test]
fn buffer_and_limits_pick_the_first_selecting_entry() {
    let text = r#"
        [[buffer]]
        agents = { site = "tiny-*" }
        max_bytes = "64MiB"
        eviction = "drop-oldest"
        [[buffer]]
        max_age = "7d"
        [[limits]]
        agents = { region = "eu-*" }
        events_per_second = 500
    "#;
    let p = Policy::parse(text, &eu_catalog()).expect("parses");
    let tiny = labels(&[("site", "tiny-1"), ("region", "eu-west")]);
    assert_eq!(
        p.buffer_for(&tiny).and_then(|b| b.max_bytes),
        Some(64 << 20)
    );
    assert_eq!(
        p.buffer_for(&labels(&[])).and_then(|b| b.max_age),
        Some(std::time::Duration::from_secs(7 * 86400))
    );
    let rate = p.limits_for(&tiny).expect("selected");
    assert_eq!((rate.events_per_sec, rate.over), (Some(500.0), Over::Hold));
    assert!(p.limits_for(&labels(&[("region", "us")])).is_none());
}

// Property tests.

/// Small patterns and streams over a few levels, so that they often meet.
fn arb_pattern() -> impl Strategy<Value = String> {
    let level = prop_oneof![Just("a"), Just("b"), Just("c"), Just("+")];
    (prop::collection::vec(level, 1..4), any::<bool>()).prop_map(|(levels, hash)| {
        let mut s = levels.join("/");
        if hash {
            s.push_str("/#");
        }
        s
    })
}

fn arb_stream() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![Just("a"), Just("b"), Just("c"), Just("d")],
        1..5,
    )
    .prop_map(|l| l.join("/"))
}

#[derive(Debug, Clone)]
struct ArbRule {
    pattern: String,
    deny: bool,
    site: Option<&'static str>,
    sinks: Option<Vec<&'static str>>,
}

fn arb_rule() -> impl Strategy<Value = ArbRule> {
    (
        arb_pattern(),
        any::<bool>(),
        prop::option::of(prop_oneof![Just("s1"), Just("s2")]),
        prop::option::of(prop::sample::subsequence(vec!["store", "eu2", "us"], 0..3)),
    )
        .prop_map(|(pattern, deny, site, sinks)| ArbRule {
            pattern,
            deny,
            site,
            sinks,
        })
}

fn render(rules: &[ArbRule], residency: &[String]) -> String {
    let mut text = String::new();
    for r in residency {
        text.push_str(&format!(
            "[[residency]]\nstreams = [{r:?}]\nclassification = \"personal\"\nhome = \"eu-west\"\nregions = [\"eu-central\"]\n"
        ));
    }
    for r in rules {
        text.push_str(&format!("[[rules]]\nstreams = [{:?}]\n", r.pattern));
        if let Some(site) = r.site {
            text.push_str(&format!("agents = {{ site = {site:?} }}\n"));
        }
        if r.deny {
            text.push_str("action = \"deny\"\n");
        } else if let Some(s) = &r.sinks {
            text.push_str(&format!("sinks = {s:?}\n"));
        }
    }
    text
}

fn regional() -> Catalog {
    Catalog::hub(Some("eu-west"))
        .with_sink("eu2", Some("eu-central"))
        .with_sink("us", Some("us-east"))
}

proptest! {
    #[test]
    fn the_index_agrees_with_a_linear_first_match(
        rules in prop::collection::vec(arb_rule(), 0..12),
        streams in prop::collection::vec(arb_stream(), 1..20),
        site in prop_oneof![Just("s1"), Just("s2")],
    ) {
        let text = render(&rules, &[]);
        // Random rule lists often shadow themselves; those are refused, and
        // the rest must evaluate like the simplest possible model.
        let Ok(policy) = Policy::parse(&text, &Catalog::trusting()) else { return Ok(()) };
        let l = labels(&[("site", site)]);
        let compiled = Arc::new(policy.compile(&l, &Catalog::trusting()));
        let mut e = Enforcer::new(compiled);
        for s in &streams {
            let model = rules
                .iter()
                .find(|r| r.site.is_none_or(|x| x == site)
                    && TopicFilter::parse(&r.pattern).expect("valid").matches(s));
            let want = match model {
                Some(r) if r.deny => Verdict::Drop(DropReason::Denied),
                Some(r) => match &r.sinks {
                    Some(v) if v.is_empty() => Verdict::Drop(DropReason::Local),
                    Some(v) => Verdict::Keep { modified: false, sinks: v.iter().map(|s| s.to_string()).collect::<Vec<_>>().into() },
                    None => Verdict::Keep { modified: false, sinks: vec!["store".to_owned()].into() },
                },
                None => Verdict::Keep { modified: false, sinks: vec!["store".to_owned()].into() },
            };
            let mut b = body(s, 0.0, Value::U64(1));
            prop_assert_eq!(e.apply(&mut b, Stage::Ingest), want, "stream {}", s);
        }
    }

    #[test]
    fn a_denied_stream_never_passes(
        deny in arb_pattern(),
        rules in prop::collection::vec(arb_rule(), 0..8),
        streams in prop::collection::vec(arb_stream(), 1..20),
    ) {
        // A deny rule placed first, for every agent, wins over anything after it.
        let mut all = vec![ArbRule { pattern: deny.clone(), deny: true, site: None, sinks: None }];
        all.extend(rules);
        let Ok(policy) = Policy::parse(&render(&all, &[]), &Catalog::trusting()) else { return Ok(()) };
        let f = TopicFilter::parse(&deny).expect("valid");
        for site in ["s1", "s2"] {
            let mut e = Enforcer::new(Arc::new(policy.compile(&labels(&[("site", site)]), &Catalog::trusting())));
            for s in streams.iter().filter(|s| f.matches(s)) {
                for stage in [Stage::Ingest, Stage::Recheck] {
                    let mut b = body(s, 0.0, Value::U64(1));
                    prop_assert_eq!(e.apply(&mut b, stage), Verdict::Drop(DropReason::Denied));
                }
            }
        }
    }

    #[test]
    fn a_route_against_residency_never_appears(
        rules in prop::collection::vec(arb_rule(), 0..10),
        residency in prop::collection::vec(arb_pattern(), 1..3),
        streams in prop::collection::vec(arb_stream(), 1..20),
    ) {
        let text = render(&rules, &residency);
        let catalog = regional();
        let checked = Policy::parse(&text, &catalog);
        // Whatever the hub's validation said, compile the document as an agent
        // would have it and check every verdict at the hub's last step.
        let Ok(policy) = Policy::parse(&text, &Catalog::trusting()) else { return Ok(()) };
        let filters: Vec<TopicFilter> = residency.iter().map(|r| TopicFilter::parse(r).expect("valid")).collect();
        let allowed = ["store", "eu2"];
        for site in ["s1", "s2"] {
            let mut e = Enforcer::new(Arc::new(policy.compile(&labels(&[("site", site)]), &catalog)));
            for s in &streams {
                let mut b = body(s, 0.0, Value::U64(1));
                let v = e.apply(&mut b, Stage::Ingest);
                let resident = filters.iter().any(|f| f.matches(s));
                if let Verdict::Keep { sinks, .. } = &v {
                    if resident {
                        prop_assert!(sinks.iter().all(|x| allowed.contains(&x.as_str())), "{} went to {:?}", s, sinks);
                    }
                }
                // A validated policy never needs the last step: nothing is
                // dropped or re-routed there for residency.
                if checked.is_ok() && resident {
                    prop_assert_ne!(&v, &Verdict::Drop(DropReason::Residency));
                }
            }
        }
    }

    #[test]
    fn minimisation_is_idempotent(
        name in prop::option::of("[a-z]{0,8}"),
        id in prop::option::of(any::<i64>()),
        temp in prop::option::of(-1e6f64..1e6),
        nested in any::<bool>(),
    ) {
        let text = r##"
            [[rules]]
            name = "all"
            streams = ["#"]
            drop = ["/photo", "/list/0"]
            redact = ["/name", "/inner/name"]
            hash = ["/id"]
            round = 2
            round_fields = ["/temp"]
        "##;
        let mut doc = serde_json::json!({"photo": "x", "list": [1, 2]});
        if let Some(n) = name { doc["name"] = n.into(); }
        if let Some(i) = id { doc["id"] = i.into(); }
        if let Some(t) = temp { doc["temp"] = t.into(); }
        if nested { doc["inner"] = serde_json::json!({"name": "n"}); }
        let mut e = enforcer(text, &labels(&[]), &Catalog::trusting());
        let mut b = body("a/b", 0.0, Value::Json(JsonText::from_value(&doc)));
        let _ = e.apply(&mut b, Stage::Recheck);
        let once = b.clone();
        let again = e.apply(&mut b, Stage::Recheck);
        prop_assert_eq!(&b, &once);
        let unchanged = matches!(again, Verdict::Keep { modified: false, .. });
        prop_assert!(unchanged, "second pass changed the event: {:?}", again);
    }

    #[test]
    fn parsing_arbitrary_text_never_panics(text in ".{0,256}") {
        let _ = Policy::parse(&text, &eu_catalog());
    }
}

#[test]
fn a_hashing_table_is_refused_with_its_line_and_what_to_do_but_read_from_the_store() {
    let text = "description = \"old\"\n\n[hashing]\nkey = \"0123456789abcdef-secret\"\n\n[[rules]]\nstreams = [\"hr/#\"]\nhash = [\"/id\"]\n";
    let e = Policy::parse(text, &eu_catalog()).expect_err("refused");
    assert_eq!(e, PolicyError::KeyInPolicy { line: 3 });
    let line = e.to_string();
    assert!(line.starts_with("line 3: [hashing] key:"), "{line}");
    assert!(line.contains("[policy] hashing_key"), "{line}");
    assert!(line.contains("delete the [hashing] table"), "{line}");
    assert!(Policy::parse_scoped(text).is_err());
    // A stored version of before keeps being read (its key is never used,
    // and its unnamed rule that hashes is known by its place).
    let stored = Policy::parse_stored(text, &eu_catalog()).expect("stored version reads");
    assert!(stored.carries_hashing_key());
    assert!(!Policy::parse_stored("", &eu_catalog())
        .expect("reads")
        .carries_hashing_key());
    let stored = stored.with_hashing_key(hub_key());
    let mut e = Enforcer::new(Arc::new(stored.compile(&labels(&[]), &eu_catalog())));
    let mut b = body("hr/x", 0.0, json(r#"{"id":"4711"}"#));
    let _ = e.apply(&mut b, Stage::Ingest);
    let key = hub_key().derive("rules[0]", &BTreeMap::new());
    assert!(json_text(&b.value).contains(&fields::keyed_hash(key.bytes(), "4711")));
}

#[test]
fn without_a_key_a_hashed_field_is_redacted_not_hashed_under_a_guessable_key() {
    let text = "[[rules]]\nname = \"ids\"\nstreams = [\"hr/#\"]\nhash = [\"/id\"]\n";
    let p = Policy::parse(text, &eu_catalog()).expect("parses");
    let mut e = Enforcer::new(Arc::new(p.compile(&labels(&[]), &eu_catalog())));
    let mut b = body("hr/x", 0.0, json(r#"{"id":"4711"}"#));
    let _ = e.apply(&mut b, Stage::Ingest);
    let Value::Json(j) = &b.value else {
        panic!("still json")
    };
    assert_eq!(j.to_value()["id"], REDACTED);
}

fn json_text(v: &Value) -> String {
    match v {
        Value::Json(j) => j.to_value().to_string(),
        other => format!("{other:?}"),
    }
}

/// The fleet document of the scope tests: site A's badges, site B's
/// badges, a rule for every agent, and limits per site.
const FLEET: &str = r#"
description = "two sites"

[[rules]]
name = "badges"
agents = { site = "a" }
streams = ["badge/#"]
hash = ["/employee"]

[[rules]]
name = "badges"
agents = { site = "b" }
streams = ["door/#"]
hash = ["/employee"]

[[rules]]
streams = ["debug/#"]
action = "deny"

[[limits]]
agents = { site = "b" }
events_per_second = 5

[[buffer]]
agents = { site = "a" }
max_bytes = "2MiB"
"#;

#[test]
fn an_agent_gets_only_its_rules_and_their_keys_and_hashes_as_the_hub_does() {
    let fleet = Policy::parse(FLEET, &eu_catalog())
        .expect("parses")
        .with_hashing_key(hub_key());
    let a = labels(&[("site", "a")]);
    let text = fleet.scoped_text(FLEET, &a).expect("scoped");
    let key_a = hub_key().derive("badges", &labels(&[("site", "a")]));
    let key_b = hub_key().derive("badges", &labels(&[("site", "b")]));
    assert_ne!(key_a, key_b, "same name, another scope: another key");
    assert!(text.contains(&key_a.to_hex()), "{text}");
    assert!(!text.contains(&key_b.to_hex()), "{text}");
    assert!(!text.contains(&hub_key().to_hex()), "{text}");
    assert!(
        !text.contains("door/#") && !text.contains("events_per_second"),
        "{text}"
    );
    let agent = Policy::parse_scoped(&text).expect("the agent reads it");
    let names: Vec<&str> = agent.rules.iter().map(|r| r.name.as_str()).collect();
    // The unnamed rule keeps its fleet name, so both ends count it alike.
    assert_eq!(names, ["badges", "rules[2]"]);
    assert_eq!(agent.limits.len(), 0);
    assert_eq!(agent.buffer.len(), 1);
    // Both ends hash alike.
    let mut at_agent = Enforcer::new(Arc::new(agent.compile(&a, &Catalog::trusting())));
    let mut at_hub = Enforcer::new(Arc::new(fleet.compile(&a, &eu_catalog())));
    let mut b1 = body("badge/gate", 0.0, json(r#"{"employee":4711}"#));
    let mut b2 = b1.clone();
    let _ = at_agent.apply(&mut b1, Stage::Ingest);
    let _ = at_hub.apply(&mut b2, Stage::Ingest);
    assert_eq!(b1, b2);
    assert!(json_text(&b1.value).contains(HASH_PREFIX));
    // A document to show has no key left.
    let shown = redact_keys(&text);
    assert!(!shown.contains(&key_a.to_hex()), "{shown}");
    assert!(shown.contains(KEY_REDACTED), "{shown}");
    assert!(
        Policy::parse_scoped(&shown).is_err(),
        "a redacted key is no key"
    );
    // An agent no hash rule selects gets no key at all.
    let c = fleet
        .scoped_text(FLEET, &labels(&[("site", "c")]))
        .expect("scoped");
    assert!(!c.contains("hash_key") && !c.contains("badge"), "{c}");
    // Without the hub's key, a document for an agent a hash rule selects
    // cannot be made.
    let keyless = Policy::parse(FLEET, &eu_catalog()).expect("parses");
    assert!(keyless.scoped_text(FLEET, &a).is_err());
    assert!(keyless
        .scoped_text(FLEET, &labels(&[("site", "c")]))
        .is_ok());
}

#[test]
fn redaction_hides_an_older_versions_key_and_keeps_the_rest_as_written() {
    let text = "# comment kept\n[hashing]\nkey = \"0123456789abcdef-secret\"  # trailing\n[[rules]]\nstreams = [\"a\"]\naction = \"deny\"\n";
    let shown = redact_keys(text);
    assert_eq!(
        shown,
        format!("# comment kept\n[hashing]\nkey = {KEY_REDACTED}  # trailing\n[[rules]]\nstreams = [\"a\"]\naction = \"deny\"\n")
    );
    assert_eq!(redact_keys(FLEET), FLEET);
    assert!(!redact_keys("hashing = { key = \"s3cr3t-s3cr3t-s3cr3t\" }\n").contains("s3cr3t"));
    assert!(!redact_keys("[hashing\nkey = \"s3cr3t\"").contains("s3cr3t"));
}

/// A selector among a few, over the labels `site` and `line`.
fn arb_selector() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        prop::sample::select(vec!["site", "line"]).prop_map(str::to_owned),
        prop::sample::select(vec!["a", "b", "a*", "*"]).prop_map(str::to_owned),
        0..=2,
    )
}

fn selector_toml(s: &BTreeMap<String, String>) -> String {
    let pairs: Vec<String> = s.iter().map(|(k, v)| format!("{k} = {v:?}")).collect();
    format!("{{ {} }}", pairs.join(", "))
}

proptest! {
    #[test]
    fn rule_keys_are_equal_for_one_scope_and_differ_across_scopes(
        name in "[a-z ]{0,12}",
        other in "[a-z ]{0,12}",
        sel in arb_selector(),
        other_sel in arb_selector(),
        master in prop::array::uniform32(any::<u8>()),
        other_master in prop::array::uniform32(any::<u8>()),
    ) {
        let k = HashingKey::from_bytes(&master).expect("32 bytes");
        prop_assert_eq!(k.derive(&name, &sel), k.derive(&name, &sel));
        if (&name, &sel) != (&other, &other_sel) {
            prop_assert_ne!(k.derive(&name, &sel), k.derive(&other, &other_sel));
        }
        if master != other_master {
            let o = HashingKey::from_bytes(&other_master).expect("32 bytes");
            prop_assert_ne!(k.derive(&name, &sel), o.derive(&name, &sel));
            prop_assert_ne!(k.fingerprint(), o.fingerprint());
        }
        prop_assert_eq!(HashingKey::from_hex(&k.to_hex()), Some(k.clone()));
        let shown = format!("{:?}", k);
        prop_assert!(!shown.contains(&k.to_hex()));
    }

    #[test]
    fn a_scoped_document_holds_exactly_the_rules_that_select_the_agent_with_their_keys(
        rules in prop::collection::vec((arb_selector(), any::<bool>(), any::<bool>()), 0..8),
        site in prop::option::of(prop::sample::select(vec!["a", "b", "ab", "c"])),
        line in prop::option::of(prop::sample::select(vec!["a", "b"])),
        employee in "[0-9]{1,6}",
    ) {
        let mut text = String::from("description = \"generated\"\n");
        for (i, (sel, hashes, named)) in rules.iter().enumerate() {
            text.push_str(&format!("\n[[rules]]\nstreams = [\"s{i}/#\"]\nagents = {}\n", selector_toml(sel)));
            if *named || *hashes {
                text.push_str(&format!("name = \"rule {}\"\n", i % 3));
            }
            if *hashes {
                text.push_str("hash = [\"/employee\"]\n");
            }
        }
        let mut agent_labels = BTreeMap::new();
        if let Some(s) = site { agent_labels.insert("site".to_owned(), s.to_owned()); }
        if let Some(l) = line { agent_labels.insert("line".to_owned(), l.to_owned()); }
        let fleet = Policy::parse(&text, &eu_catalog()).expect("parses").with_hashing_key(hub_key());
        let scoped = fleet.scoped_text(&text, &agent_labels).expect("scoped");
        let agent = Policy::parse_scoped(&scoped).expect("the agent reads it");
        let want: Vec<&str> = fleet.rules.iter().filter(|r| r.agents.selects(&agent_labels)).map(|r| r.name.as_str()).collect();
        let got: Vec<&str> = agent.rules.iter().map(|r| r.name.as_str()).collect();
        prop_assert_eq!(&got, &want);
        let shown = redact_keys(&scoped);
        prop_assert!(!scoped.contains(&hub_key().to_hex()));
        for (i, r) in fleet.rules.iter().enumerate() {
            let Some(key) = fleet.rule_key(i) else { continue };
            let selects = r.agents.selects(&agent_labels);
            // A key of another scope is never there (unless it is the same
            // scope under another rule: same name and selector).
            let shared = fleet.rules.iter().enumerate().any(|(j, o)| j != i && o.agents.selects(&agent_labels) && fleet.rule_key(j) == Some(key.clone()));
            prop_assert_eq!(scoped.contains(&key.to_hex()), selects || shared);
            prop_assert!(!shown.contains(&key.to_hex()));
            // Where it applies, the agent hashes what the hub hashes.
            if selects {
                let stream = format!("s{i}/x");
                let mut at_agent = Enforcer::new(Arc::new(agent.compile(&agent_labels, &Catalog::trusting())));
                let mut at_hub = Enforcer::new(Arc::new(fleet.compile(&agent_labels, &eu_catalog())));
                let mut b1 = body(&stream, 0.0, json(&format!(r#"{{"employee":"{employee}"}}"#)));
                let mut b2 = b1.clone();
                let _ = at_agent.apply(&mut b1, Stage::Ingest);
                let _ = at_hub.apply(&mut b2, Stage::Ingest);
                prop_assert_eq!(&b1, &b2);
                prop_assert!(json_text(&b1.value).contains(&fields::keyed_hash(key.bytes(), &employee)));
            }
        }
    }

    #[test]
    fn redacting_arbitrary_text_never_panics(text in ".{0,256}") {
        let _ = redact_keys(&text);
        let _ = Policy::parse_scoped(&text);
        let _ = Policy::parse_stored(&text, &eu_catalog());
    }
}
