//! `docs/policy.md` must say what the code does, so its examples are run here.
//!
//! - Every ```` ```toml ```` block whose first line is `# policy` must parse
//!   against the hub catalog the doc assumes: the store in `eu-west`.
//! - Every block whose first line is `# policy: refused` must be refused; if
//!   the next block is a ```` ```text ```` block with a line starting
//!   `error: `, that line must end with the parser's message (the CLI puts
//!   `error: FILE: ` before it).
//! - Every ```` ```text ```` block whose first line starts with `# events`
//!   runs through the nearest `# policy` block above it. Its lines read
//!   `agent k=v,k=v` (the agent's labels, optional) or
//!   `<seconds>s <stream> <value> -> <result>`, where the result is the value
//!   the hub stores, or `dropped (<reason>)`. What is kept must also come out
//!   unchanged from a second pass, as the hub's recheck of an agent's work.
//!   Hashes are made with the hub's hashing key the doc shows
//!   ([`DOC_HASHING_KEY`]), derived per rule as the hub derives it.

use std::collections::BTreeMap;
use std::sync::Arc;

use outpost_protocols::policy::{Catalog, Enforcer, HashingKey, Policy, Stage, Verdict};
use outpost_protocols::{EventBody, JsonText, Quality, StreamName, Timestamp, Value};

const DOC: &str = include_str!("../../docs/policy.md");

/// The hub's hashing key file in the doc's examples.
const DOC_HASHING_KEY: &str = "4c1f0e8a9d2b7c6e5f3a1b0d9e8c7f6a4c1f0e8a9d2b7c6e5f3a1b0d9e8c7f6a";

/// A fenced block of the doc.
struct Block {
    /// The info string: `toml`, `text`, ...
    lang: String,
    /// The doc line of the opening fence, for messages.
    line: usize,
    /// The content, without the fences.
    text: String,
}

impl Block {
    fn first_line(&self) -> &str {
        self.text.lines().next().unwrap_or_default().trim()
    }

    fn is_policy(&self) -> bool {
        self.lang == "toml" && self.first_line() == "# policy"
    }

    fn is_refused(&self) -> bool {
        self.lang == "toml" && self.first_line() == "# policy: refused"
    }
}

/// The fenced blocks, in order. A fence may be indented (inside a list item);
/// its content loses the same indentation.
fn blocks(doc: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<(Block, usize)> = None;
    for (i, line) in doc.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        match &mut open {
            None => {
                if let Some(lang) = trimmed.strip_prefix("```") {
                    open = Some((
                        Block {
                            lang: lang.trim().to_owned(),
                            line: i + 1,
                            text: String::new(),
                        },
                        indent,
                    ));
                }
            }
            Some((block, fence_indent)) => {
                if trimmed.starts_with("```") {
                    if let Some((b, _)) = open.take() {
                        out.push(b);
                    }
                } else {
                    let cut = indent.min(*fence_indent);
                    block.text.push_str(&line[cut..]);
                    block.text.push('\n');
                }
            }
        }
    }
    assert!(
        open.is_none(),
        "docs/policy.md: a fenced block is not closed"
    );
    out
}

fn catalog() -> Catalog {
    Catalog::hub(Some("eu-west"))
}

#[test]
fn every_policy_in_the_docs_parses_and_every_refused_one_is_refused() {
    let all = blocks(DOC);
    let (mut parsed, mut refused, mut failures) = (0, 0, Vec::new());
    for (i, b) in all.iter().enumerate() {
        if b.is_policy() {
            match Policy::parse(&b.text, &catalog()) {
                Ok(_) => parsed += 1,
                Err(e) => failures.push(format!("line {}: refused: {e}", b.line)),
            }
        } else if b.is_refused() {
            match Policy::parse(&b.text, &catalog()) {
                Ok(_) => failures.push(format!(
                    "line {}: marked `# policy: refused` but parses",
                    b.line
                )),
                Err(e) => {
                    refused += 1;
                    let shown = all
                        .get(i + 1)
                        .filter(|n| n.lang == "text")
                        .and_then(|n| n.text.lines().find(|l| l.starts_with("error: ")));
                    if let Some(shown) = shown {
                        let want = format!(": {e}");
                        if !shown.ends_with(&want) {
                            failures.push(format!(
                                "line {}: the doc shows\n  {shown}\nbut the parser says\n  {e}",
                                b.line
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "docs/policy.md:\n{}",
        failures.join("\n")
    );
    // Guards against a change of markers that would make this test vacuous.
    assert!(parsed >= 4, "only {parsed} `# policy` blocks found");
    assert!(refused >= 1, "no `# policy: refused` block found");
}

/// A value as the doc writes it: a float is a typed float (a Modbus tag), an
/// integer a typed integer, an object or array a JSON payload.
fn value(text: &str) -> Value {
    let j: serde_json::Value = match serde_json::from_str(text) {
        Ok(j) => j,
        Err(e) => panic!("{text:?} is not JSON: {e}"),
    };
    match j {
        serde_json::Value::Bool(b) => Value::Bool(b),
        serde_json::Value::Number(n) if n.is_i64() => Value::I64(n.as_i64().unwrap_or(0)),
        serde_json::Value::Number(n) if n.is_u64() => Value::U64(n.as_u64().unwrap_or(0)),
        serde_json::Value::Number(n) => Value::F64(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Value::String(s),
        other => Value::Json(JsonText::from_value(&other)),
    }
}

fn labels(spec: &str) -> BTreeMap<String, String> {
    spec.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.trim().to_owned(), v.trim().to_owned()),
            None => panic!("label {p:?} is not k=v"),
        })
        .collect()
}

/// Runs one `# events` block through `policy`; returns what differs.
fn run(policy: &Policy, events: &Block) -> Vec<String> {
    let mut failures = Vec::new();
    let mut enforcer: Option<Enforcer> = None;
    let mut agent = BTreeMap::new();
    for (n, line) in events.text.lines().enumerate() {
        let line = line.trim();
        let at = format!("line {}", events.line + 1 + n);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(spec) = line.strip_prefix("agent ") {
            agent = labels(spec.trim());
            enforcer = None;
            continue;
        }
        let Some((input, want)) = line.split_once("->") else {
            failures.push(format!("{at}: no `->` in {line:?}"));
            continue;
        };
        let mut parts = input.split_whitespace();
        let (Some(ts), Some(stream)) = (parts.next(), parts.next()) else {
            failures.push(format!(
                "{at}: want `<seconds>s <stream> <value> -> <result>`"
            ));
            continue;
        };
        let raw: Vec<&str> = parts.collect();
        let Some(secs) = ts.strip_suffix('s').and_then(|s| s.parse::<f64>().ok()) else {
            failures.push(format!("{at}: {ts:?} is not a time like `12s`"));
            continue;
        };
        let mut body = EventBody {
            stream: StreamName::parse(stream).unwrap_or_else(|e| panic!("{at}: {e}")),
            ts: Timestamp((secs * 1e9) as i64),
            value: value(&raw.join(" ")),
            quality: Quality::Good,
            attrs: BTreeMap::new(),
        };
        let e = enforcer
            .get_or_insert_with(|| Enforcer::new(Arc::new(policy.compile(&agent, &catalog()))));
        let want = want.trim();
        match (
            e.apply(&mut body, Stage::Ingest),
            want.strip_prefix("dropped ("),
        ) {
            (Verdict::Drop(reason), Some(r)) => {
                if Some(reason.name()) != r.strip_suffix(')') {
                    failures.push(format!(
                        "{at}: dropped ({}), the doc says {want}",
                        reason.name()
                    ));
                }
            }
            (Verdict::Drop(reason), None) => {
                failures.push(format!(
                    "{at}: dropped ({}), the doc says {want}",
                    reason.name()
                ));
            }
            (Verdict::Keep { .. }, Some(_)) => {
                failures.push(format!(
                    "{at}: kept as {}, the doc says {want}",
                    body.value.to_json()
                ));
            }
            (Verdict::Keep { .. }, None) => {
                let expected: serde_json::Value = serde_json::from_str(want)
                    .unwrap_or_else(|e| panic!("{at}: {want:?} is not JSON: {e}"));
                if body.value.to_json() != expected {
                    failures.push(format!(
                        "{at}: kept as {}, the doc says {want}",
                        body.value.to_json()
                    ));
                }
                // The hub applies the same policy again: nothing changes.
                let mut again = body.clone();
                let mut hub = Enforcer::new(Arc::new(policy.compile(&agent, &catalog())));
                let second = hub.apply(&mut again, Stage::Recheck);
                if !matches!(
                    second,
                    Verdict::Keep {
                        modified: false,
                        ..
                    }
                ) || again != body
                {
                    failures.push(format!(
                        "{at}: a second pass gives {second:?}, {:?}",
                        again.value
                    ));
                }
            }
        }
    }
    failures
}

#[test]
fn the_example_events_come_out_as_the_docs_show() {
    let all = blocks(DOC);
    let mut current: Option<(usize, Policy)> = None;
    let (mut runs, mut failures) = (0, Vec::new());
    for b in &all {
        if b.is_policy() {
            let key = HashingKey::from_hex(DOC_HASHING_KEY).unwrap_or_else(|| panic!("bad key"));
            current = Policy::parse(&b.text, &catalog())
                .ok()
                .map(|p| (b.line, p.with_hashing_key(key)));
        } else if b.lang == "text" && b.first_line().starts_with("# events") {
            let Some((from, policy)) = &current else {
                failures.push(format!("line {}: no `# policy` block above", b.line));
                continue;
            };
            runs += 1;
            for f in run(policy, b) {
                failures.push(format!("{f} (policy of line {from})"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "docs/policy.md:\n{}",
        failures.join("\n")
    );
    assert!(runs >= 3, "only {runs} `# events` blocks found");
}
