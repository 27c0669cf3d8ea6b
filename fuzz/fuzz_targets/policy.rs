//! Policy documents come from operators through the hub, and the agent reads
//! them back from its data directory: any text must parse or be refused with
//! a named error, never a panic. What parses is compiled for a few agents and
//! applied to events built from the rest of the input, and what the hub relies
//! on must hold for every event:
//!
//! - a `Recheck` pass applied to its own output changes nothing (the hub
//!   applies the policy again to what an agent already minimised, and an
//!   agent rechecks what waits in its outbox after a change);
//! - a `Keep` verdict names at least one sink;
//! - the part of a document the hub sends each agent (`scoped_text`)
//!   parses at the agent (`parse_scoped`), holds no key of a rule that does
//!   not select it nor the hub's key, and the agent enforces it exactly as
//!   the hub enforces the whole for that agent (hashes included);
//! - `redact_keys` leaves no key in what it shows.
//!
//! Input: a mode byte, the policy bytes up to the first NUL, then the event
//! bytes. An even mode byte takes the policy bytes as the TOML text itself;
//! an odd one reads them as a recipe for a document made of the language's
//! pieces (patterns, selectors, pointers, minimisation, downsampling, rates,
//! routes, residency), so that short runs reach the evaluator and not only
//! the TOML parser. Both texts go through `Policy::parse` with the agent's
//! trusting catalog and with a hub catalog that knows regions.
#![no_main]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use outpost_protocols::policy::{
    redact_keys, Catalog, Enforcer, HashingKey, Policy, Stage, Verdict, HASH_PREFIX, KEY_REDACTED,
    REDACTED,
};
use outpost_protocols::{EventBody, JsonText, Quality, StreamName, Timestamp, Value};
use serde_json::Value as J;

/// Levels of patterns and streams: few, so that they often meet; `$s` starts
/// a name that first-level wildcards do not match (MQTT 3.1.1 section 4.7.2).
const LEVELS: [&str; 6] = ["a", "b", "c", "+", "$s", ""];

/// Field names and pointers, overlapping on purpose.
const KEYS: [&str; 5] = ["a", "b", "name", "list", "a/b"];
const POINTERS: [&str; 8] = [
    "/a", "/b", "/a/b", "/name", "/list/0", "/list/-", "/a~1b", "/b/a",
];

/// The most events one input makes.
const MAX_EVENTS: usize = 64;

/// Reads bytes one at a time; an exhausted input reads as zeros.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }

    fn pick<'s, T: ?Sized>(&mut self, from: &[&'s T]) -> &'s T {
        from[usize::from(self.byte()) % from.len()]
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
}

/// A TOML array of strings.
fn list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// The pointers a bit mask picks.
fn pointers(mask: u8) -> Vec<&'static str> {
    POINTERS
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, p)| *p)
        .collect()
}

fn pattern(c: &mut Bytes<'_>) -> String {
    let b = c.byte();
    if b == 0xff {
        return "#".into();
    }
    let levels: Vec<&str> = (0..=(b % 3)).map(|_| c.pick(&LEVELS)).collect();
    let mut s = levels.join("/");
    if b & 0x80 != 0 {
        s.push_str("/#");
    }
    s
}

/// A policy document made from a recipe.
fn render(c: &mut Bytes<'_>) -> String {
    let mut t = String::new();
    let flags = c.byte();
    // A `[hashing]` table is refused now (the key is the hub's); rare, so
    // that most documents parse.
    if flags & 3 == 3 {
        let _ = writeln!(t, "[hashing]\nkey = \"a key of sixteen bytes or more\"");
    }
    let named = flags & 2 != 0;
    if flags & 4 != 0 {
        let _ = writeln!(t, "[defaults]");
        if flags & 8 != 0 {
            let _ = writeln!(t, "action = \"deny\"");
        }
        let sinks = c.pick(&[
            "[]",
            "[\"store\"]",
            "[\"store\", \"eu2\"]",
            "[\"us\"]",
            "[\"eu2\"]",
        ]);
        let _ = writeln!(t, "sinks = {sinks}");
    }
    for _ in 0..(flags >> 4) % 3 {
        let streams = [pattern(c)];
        let regions = c.pick(&["[]", "[\"eu-central\"]", "[\"us-east\"]"]);
        let _ = writeln!(
            t,
            "[[residency]]\nstreams = {}\nclassification = \"personal\"\nhome = \"eu-west\"\nregions = {regions}",
            list(&streams.iter().map(String::as_str).collect::<Vec<_>>())
        );
    }
    for i in 0..c.byte() % 8 {
        if c.is_empty() {
            break;
        }
        let shape = c.byte();
        let streams: Vec<String> = (0..=(shape & 1)).map(|_| pattern(c)).collect();
        let _ = writeln!(
            t,
            "[[rules]]\nstreams = {}",
            list(&streams.iter().map(String::as_str).collect::<Vec<_>>())
        );
        // A rule that hashes needs a name; two of the same name share a
        // key where their selectors agree.
        if named {
            let _ = writeln!(t, "name = \"rule {}\"", i % 3);
        }
        let agents = c.pick(&[
            "",
            "{ site = \"s1\" }",
            "{ site = \"s*\" }",
            "{ region = \"eu\" }",
            "{ site = \"s2\", region = \"*\" }",
        ]);
        if !agents.is_empty() {
            let _ = writeln!(t, "agents = {agents}");
        }
        if shape & 2 != 0 {
            let _ = writeln!(t, "action = {:?}", c.pick(&["deny", "allow", "block"]));
        }
        for (bit, key) in [
            (4, "drop"),
            (8, "redact"),
            (16, "hash"),
            (32, "round_fields"),
        ] {
            if shape & bit != 0 {
                let _ = writeln!(t, "{key} = {}", list(&pointers(c.byte())));
            }
        }
        if shape & 64 != 0 {
            let round = c.pick(&["0", "1", "2", "12", "13", "-1"]);
            let _ = writeln!(t, "round = {round}");
        }
        if shape & 128 != 0 {
            let more = c.byte();
            if more & 1 != 0 {
                let interval = c.pick(&["1s", "10ms", "0s", "1h"]);
                let deadband = c.pick(&["0", "0.5", "-1", "1e300"]);
                let max = c.pick(&["", ", max_interval = \"2s\"", ", max_interval = \"1ms\""]);
                let _ = writeln!(
                    t,
                    "downsample = {{ interval = {interval:?}, deadband = {deadband}{max} }}"
                );
            }
            if more & 2 != 0 {
                let events = c.pick(&["1", "0.5", "1000", "0"]);
                let bytes = c.pick(&[
                    "",
                    ", bytes_per_second = \"100B\"",
                    ", bytes_per_second = 1",
                ]);
                let over = c.pick(&["\"drop\"", "\"hold\"", "\"queue\""]);
                let _ = writeln!(
                    t,
                    "rate = {{ events_per_second = {events}{bytes}, over = {over} }}"
                );
            }
            if more & 4 != 0 {
                let sinks = c.pick(&[
                    "[]",
                    "[\"store\"]",
                    "[\"eu2\"]",
                    "[\"us\", \"store\"]",
                    "[\"nope\"]",
                ]);
                let _ = writeln!(t, "sinks = {sinks}");
            }
        }
    }
    let limits = c.byte();
    if limits & 1 != 0 {
        let over = if limits & 2 != 0 { "drop" } else { "hold" };
        let events = c.pick(&["1", "100"]);
        let _ = writeln!(
            t,
            "[[limits]]\nevents_per_second = {events}\nover = {over:?}"
        );
    }
    t
}

/// A JSON value from the input, at most `depth` levels deep.
fn json(c: &mut Bytes<'_>, depth: u8) -> J {
    let b = c.byte();
    match b % 8 {
        0 => J::Null,
        1 => J::from(i64::from(c.byte() as i8)),
        // Only finite floats are JSON numbers.
        2 => serde_json::Number::from_f64(f64::from_bits(u64::from_le_bytes(eight(c))))
            .map_or(J::Null, J::Number),
        3 => J::from(f64::from(c.byte()) / 7.0),
        4 => J::String(match b >> 6 {
            0 => REDACTED.to_owned(),
            1 => format!("{HASH_PREFIX}{}", "ab".repeat(32)),
            _ => String::from_utf8_lossy(c.take(usize::from(b >> 3) % 8)).into_owned(),
        }),
        5 | 6 if depth > 0 => {
            let n = c.byte() % 4;
            if b % 8 == 5 {
                J::Object(
                    (0..n)
                        .map(|_| (c.pick(&KEYS).to_owned(), json(c, depth - 1)))
                        .collect(),
                )
            } else {
                J::Array((0..n).map(|_| json(c, depth - 1)).collect())
            }
        }
        _ => J::Bool(b & 0x80 != 0),
    }
}

fn eight(c: &mut Bytes<'_>) -> [u8; 8] {
    let mut a = [0u8; 8];
    for x in &mut a {
        *x = c.byte();
    }
    a
}

/// The next event, or `None` when the input is used up.
fn event(c: &mut Bytes<'_>, ts: &mut i64) -> Option<EventBody> {
    if c.is_empty() {
        return None;
    }
    let b = c.byte();
    let levels: Vec<&str> = (0..=(b % 4))
        .map(|_| c.pick(&LEVELS))
        .map(|l| if l == "+" { "d" } else { l })
        .collect();
    let name = levels.join("/");
    // A stream has a name: one empty level is none.
    let stream = StreamName::parse(if name.is_empty() { "e" } else { &name }).ok()?;
    // Event time mostly moves forward, by up to ~4 s, and sometimes back.
    let step = i64::from(c.byte()) * 16_000_000;
    *ts = if b & 0x80 != 0 {
        ts.saturating_sub(step)
    } else {
        ts.saturating_add(step)
    };
    let value = match (b >> 2) % 6 {
        0 => Value::F64(f64::from_bits(u64::from_le_bytes(eight(c)))),
        1 => Value::F64(f64::from(c.byte() as i8) / 3.0),
        2 => Value::U64(u64::from(c.byte())),
        3 => Value::String(String::from_utf8_lossy(c.take(4)).into_owned()),
        4 => Value::Bytes(c.take(4).to_vec()),
        _ => Value::Json(JsonText::from_value(&json(c, 3))),
    };
    Some(EventBody {
        stream,
        ts: Timestamp(*ts),
        value,
        quality: Quality::Good,
        attrs: BTreeMap::new(),
    })
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Applies `enforcer` (compiled from `text`) to `body` as the properties
/// above say.
fn check(enforcer: &mut Enforcer, body: &EventBody, text: &str) {
    let mut ingested = body.clone();
    if let Verdict::Keep { sinks, .. } = enforcer.apply(&mut ingested, Stage::Ingest) {
        assert!(
            !sinks.is_empty(),
            "Keep with no sinks at ingest: {body:?}\npolicy:\n{text}"
        );
    }
    let mut once = body.clone();
    let first = enforcer.apply(&mut once, Stage::Recheck);
    if let Verdict::Keep { sinks, .. } = &first {
        assert!(
            !sinks.is_empty(),
            "Keep with no sinks at recheck: {body:?}\npolicy:\n{text}"
        );
    }
    let mut twice = once.clone();
    let second = enforcer.apply(&mut twice, Stage::Recheck);
    // Compared as encoded bytes, so that a NaN equals itself.
    assert_eq!(
        once.encode(),
        twice.encode(),
        "a second recheck changed the event\n first:  {once:?}\n second: {twice:?}\n from:   {body:?}\npolicy:\n{text}"
    );
    match (&first, &second) {
        (Verdict::Keep { sinks: a, .. }, Verdict::Keep { modified, sinks: b }) => {
            assert!(
                !modified,
                "a second recheck says it modified {once:?} (from {body:?})\npolicy:\n{text}"
            );
            assert_eq!(
                a, b,
                "a second recheck routed {once:?} elsewhere\npolicy:\n{text}"
            );
        }
        (a, b) => assert_eq!(
            a, b,
            "a second recheck decided otherwise on {once:?}\npolicy:\n{text}"
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let split = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
    let (policy_bytes, events) = (&rest[..split], rest.get(split + 1..).unwrap_or(&[]));
    let text = if mode % 2 == 0 {
        let Ok(text) = std::str::from_utf8(policy_bytes) else {
            return;
        };
        text.to_owned()
    } else {
        render(&mut Bytes(policy_bytes))
    };

    let hub = Catalog::hub(Some("eu-west"))
        .with_sink("eu2", Some("eu-central"))
        .with_sink("us", Some("us-east"));
    let agents = [
        labels(&[]),
        labels(&[("site", "s1")]),
        labels(&[("site", "s2"), ("region", "eu")]),
    ];
    let _ = redact_keys(&text);
    let key = HashingKey::from([mode; HashingKey::LEN]);
    let mut enforcers = Vec::new();
    for catalog in [Catalog::trusting(), hub] {
        let Ok(policy) = Policy::parse(&text, &catalog) else {
            continue;
        };
        let policy = policy.with_hashing_key(key.clone());
        for a in &agents {
            enforcers.push(Enforcer::new(Arc::new(policy.compile(a, &catalog))));
        }
    }
    if enforcers.is_empty() {
        return;
    }
    // Each agent's part, enforced at the agent as the hub enforces the
    // whole for it (both with the agent's trusting catalog).
    let mut pairs = Vec::new();
    if let Ok(fleet) = Policy::parse(&text, &Catalog::trusting()) {
        let fleet = fleet.with_hashing_key(key.clone());
        for a in &agents {
            let scoped = fleet
                .scoped_text(&text, a)
                .unwrap_or_else(|e| panic!("no part for {a:?}: {e}\npolicy:\n{text}"));
            let part = Policy::parse_scoped(&scoped)
                .unwrap_or_else(|e| panic!("the agent refuses its part: {e}\npart:\n{scoped}"));
            let shown = redact_keys(&scoped);
            assert!(!scoped.contains(&key.to_hex()), "the hub's key sent:\n{scoped}");
            for line in shown.lines().filter(|l| l.contains("hash_key")) {
                assert!(line.contains(KEY_REDACTED), "a key shown: {line}");
            }
            let selected = fleet.rules.iter().filter(|r| r.agents.selects(a)).count();
            assert_eq!(part.rules.len(), selected, "part:\n{scoped}");
            pairs.push((
                Enforcer::new(Arc::new(fleet.compile(a, &Catalog::trusting()))),
                Enforcer::new(Arc::new(part.compile(a, &Catalog::trusting()))),
                scoped,
            ));
        }
    }
    let mut c = Bytes(events);
    let mut ts = 1_700_000_000_000_000_000i64;
    for _ in 0..MAX_EVENTS {
        let Some(body) = event(&mut c, &mut ts) else {
            break;
        };
        for e in &mut enforcers {
            check(e, &body, &text);
        }
        for (hub, agent, scoped) in &mut pairs {
            let (mut at_hub, mut at_agent) = (body.clone(), body.clone());
            let v_hub = hub.apply(&mut at_hub, Stage::Ingest);
            let v_agent = agent.apply(&mut at_agent, Stage::Ingest);
            assert_eq!(v_hub, v_agent, "the ends disagree on {body:?}\npolicy:\n{text}\npart:\n{scoped}");
            assert_eq!(at_hub.encode(), at_agent.encode(), "the ends edit {body:?} apart\npolicy:\n{text}\npart:\n{scoped}");
        }
    }
});
