//! The evaluator: a policy compiled for one agent, and the little state
//! downsampling and rate limits keep.
//!
//! Per-event cost is what matters (every event at the agent's door, again at
//! the hub), so the stream's decision is looked up once per stream name and
//! cached: which rule takes it, which sinks its residency leaves it. Rules
//! are indexed by their patterns' first level, so the first sighting of a
//! stream scans only the rules that could match it, in order.
//!
//! Downsampling and per-stream and per-agent drop limits run on event time
//! (`ts`), not arrival time: the hub applies them again to a backlog that an
//! agent drains at full speed after an outage, and must then reach the same
//! verdicts the agent reached when the events happened.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::fields;
use super::keys::RuleKey;
use super::model::{Action, Catalog, Downsample, Over, Policy, Rate, STORE_SINK};
use crate::event::{is_reserved, EventBody, JsonText, Value};
use crate::topic::TopicFilter;

/// Why an event was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DropReason {
    /// A deny rule (or the default action) took its stream.
    Denied,
    /// Its rule routes it nowhere (`sinks = []`): it stays on the site.
    Local,
    /// Every sink of its route lies outside its residency.
    Residency,
    /// Downsampling kept an earlier event instead.
    Downsampled,
    /// Above a rate limit whose `over` is `drop`.
    RateLimited,
}

impl DropReason {
    /// The reason's name in metrics, counters and logs.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Denied => "denied",
            DropReason::Local => "local",
            DropReason::Residency => "residency",
            DropReason::Downsampled => "downsampled",
            DropReason::RateLimited => "rate_limited",
        }
    }
}

/// What the policy made of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep it (as edited) and deliver it to `sinks`.
    Keep {
        /// Whether minimisation changed the event.
        modified: bool,
        /// The sinks it goes to, residency applied.
        sinks: Arc<[String]>,
    },
    /// Drop it, for this reason.
    Drop(DropReason),
}

/// How much of the policy to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Everything: allow/deny, routes and residency, minimisation,
    /// downsampling and drop limits. Where events enter the outbox, and at
    /// the hub's ingest.
    Ingest,
    /// Only what needs no state: allow/deny, routes and residency, and the
    /// idempotent field edits. For events stored under an older policy that
    /// are about to leave the agent.
    Recheck,
}

/// A token bucket on a clock given in nanoseconds: `rate` tokens a second,
/// at most one second's worth saved up.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<i64>,
}

impl TokenBucket {
    /// A full bucket of `rate` tokens a second (`rate` > 0).
    #[must_use]
    pub fn new(rate: f64) -> TokenBucket {
        let rate = if rate.is_finite() && rate > 0.0 {
            rate
        } else {
            f64::MIN_POSITIVE
        };
        let burst = rate.max(1.0);
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: None,
        }
    }

    fn refill(&mut self, now: i64) {
        if let Some(last) = self.last {
            // A clock that goes back (event times out of order) adds nothing.
            let dt = now.saturating_sub(last).max(0) as f64 / 1e9;
            self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        }
        self.last = Some(self.last.map_or(now, |l| l.max(now)));
    }

    /// Takes `n` tokens at `now` if there are enough.
    pub fn try_take(&mut self, now: i64, n: f64) -> bool {
        self.refill(now);
        // A single take larger than the burst passes on a full bucket, so a
        // big event is slowed, not refused forever.
        if self.tokens >= n || self.tokens >= self.burst {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Nanoseconds from `now` until `n` tokens can be taken (0: now).
    #[must_use]
    pub fn wait(&mut self, now: i64, n: f64) -> i64 {
        self.refill(now);
        let need = n.min(self.burst) - self.tokens;
        if need <= 0.0 {
            0
        } else {
            (need / self.rate * 1e9).ceil() as i64
        }
    }
}

/// A rule as the evaluator keeps it.
#[derive(Debug)]
struct CRule {
    name: String,
    streams: Vec<TopicFilter>,
    action: Action,
    drop: Vec<String>,
    redact: Vec<String>,
    hash: Vec<String>,
    /// The rule's own hashing key; without one, `hash` fields are redacted.
    hash_key: Option<RuleKey>,
    round: Option<u8>,
    round_fields: Vec<String>,
    downsample: Option<Downsample>,
    rate: Option<Rate>,
    sinks: Arc<[String]>,
}

impl CRule {
    fn edits(&self) -> bool {
        !self.drop.is_empty()
            || !self.redact.is_empty()
            || !self.hash.is_empty()
            || self.round.is_some()
    }
}

/// A policy compiled for one agent: only the rules that select it, indexed.
#[derive(Debug)]
pub struct Compiled {
    rules: Vec<CRule>,
    /// Rules by the literal first level of a pattern.
    by_first: HashMap<String, Vec<u32>>,
    /// Rules with a pattern whose first level is a wildcard.
    wild: Vec<u32>,
    default_action: Action,
    default_sinks: Arc<[String]>,
    residency: Vec<(Vec<TopicFilter>, BTreeSet<String>)>,
    catalog: Catalog,
    agent_rate: Option<Rate>,
}

impl Policy {
    /// Compiles the rules that select an agent with `labels` into an
    /// evaluator, with the regions of `catalog` for the last-step residency
    /// check.
    #[must_use]
    pub fn compile(&self, labels: &BTreeMap<String, String>, catalog: &Catalog) -> Compiled {
        Compiled::new(self, labels, catalog)
    }
}

impl Compiled {
    fn new(policy: &Policy, labels: &BTreeMap<String, String>, catalog: &Catalog) -> Compiled {
        let mut rules = Vec::new();
        let mut by_first: HashMap<String, Vec<u32>> = HashMap::new();
        let mut wild = Vec::new();
        for (n, r) in policy
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.agents.selects(labels))
        {
            let i = rules.len() as u32;
            for s in &r.streams {
                let first = s.as_str().split('/').next().unwrap_or_default();
                if first == "+" || first == "#" {
                    if wild.last() != Some(&i) {
                        wild.push(i);
                    }
                } else {
                    let v = by_first.entry(first.to_owned()).or_default();
                    if v.last() != Some(&i) {
                        v.push(i);
                    }
                }
            }
            rules.push(CRule {
                name: r.name.clone(),
                streams: r.streams.clone(),
                action: r.action,
                drop: r.drop.clone(),
                redact: r.redact.clone(),
                hash: r.hash.clone(),
                hash_key: policy.rule_key(n),
                round: r.round,
                round_fields: r.round_fields.clone(),
                downsample: r.downsample,
                rate: r.rate,
                sinks: r
                    .sinks
                    .clone()
                    .unwrap_or_else(|| policy.default_sinks.clone())
                    .into(),
            });
        }
        Compiled {
            rules,
            by_first,
            wild,
            default_action: policy.default_action,
            default_sinks: policy.default_sinks.clone().into(),
            residency: policy
                .residency
                .iter()
                .map(|r| (r.streams.clone(), r.regions.clone()))
                .collect(),
            catalog: catalog.clone(),
            agent_rate: policy.limits_for(labels),
        }
    }

    /// How many rules select this agent.
    #[must_use]
    pub fn rules(&self) -> usize {
        self.rules.len()
    }

    /// The per-agent rate limit, if any; the driver paces a `hold` limit.
    #[must_use]
    pub fn agent_rate(&self) -> Option<Rate> {
        self.agent_rate
    }

    /// The name of the rule that takes `stream`, if one does.
    #[must_use]
    pub fn rule_for(&self, stream: &str) -> Option<&str> {
        self.find(stream)
            .map(|i| self.rules[i as usize].name.as_str())
    }

    /// The first rule, in document order, with a pattern matching `stream`.
    fn find(&self, stream: &str) -> Option<u32> {
        let first = stream.split('/').next().unwrap_or_default();
        let lit = self.by_first.get(first).map(Vec::as_slice).unwrap_or(&[]);
        // Both lists are ascending; walk them merged, in rule order.
        let (mut a, mut b) = (lit.iter().peekable(), self.wild.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(&&x), Some(&&y)) if x <= y => {
                    a.next();
                    if x == y {
                        b.next();
                    }
                    x
                }
                (_, Some(&&y)) => {
                    b.next();
                    y
                }
                (Some(&&x), None) => {
                    a.next();
                    x
                }
                (None, None) => return None,
            };
            if self.rules[next as usize]
                .streams
                .iter()
                .any(|f| f.matches(stream))
            {
                return Some(next);
            }
        }
    }

    fn resolve(&self, stream: &str) -> Resolved {
        let rule = self.find(stream);
        let (action, sinks) = match rule {
            Some(i) => {
                let r = &self.rules[i as usize];
                (r.action, r.sinks.clone())
            }
            // The agent's own records (`$outpost/...`, such as the writes
            // its bridges made) are audit, not data: `[defaults]` written
            // for the site's streams must not drop them unseen. Only a rule
            // that names them governs them.
            None if is_reserved(stream) => (Action::Allow, Arc::from([STORE_SINK.to_owned()])),
            None => (self.default_action, self.default_sinks.clone()),
        };
        if action == Action::Deny {
            return Resolved::Drop(DropReason::Denied);
        }
        if sinks.is_empty() {
            return Resolved::Drop(DropReason::Local);
        }
        // The last step of residency: whatever the routes say, a sink outside
        // the stream's regions never gets it (a trusting catalog, at the
        // agent, knows no regions and leaves this to the hub).
        let regions = self
            .residency
            .iter()
            .find(|(patterns, _)| patterns.iter().any(|p| p.matches(stream)))
            .map(|(_, regions)| regions);
        let sinks = match regions {
            Some(regions) if !self.catalog.is_trusting() => {
                let kept: Vec<String> = sinks
                    .iter()
                    .filter(|s| {
                        self.catalog
                            .region(s)
                            .is_some_and(|region| regions.contains(region))
                    })
                    .cloned()
                    .collect();
                if kept.is_empty() {
                    return Resolved::Drop(DropReason::Residency);
                }
                if kept.len() == sinks.len() {
                    sinks
                } else {
                    kept.into()
                }
            }
            _ => sinks,
        };
        Resolved::Keep { rule, sinks }
    }
}

#[derive(Debug, Clone)]
enum Resolved {
    Keep {
        rule: Option<u32>,
        sinks: Arc<[String]>,
    },
    Drop(DropReason),
}

/// The most stream decisions an enforcer caches before it starts afresh: a
/// bound on memory if an agent invents stream names.
const MAX_CACHED_STREAMS: usize = 65_536;

/// What downsampling remembers of a stream: the last kept event's time and
/// value.
#[derive(Debug)]
struct Kept {
    ts: i64,
    value: Value,
}

/// Applies a compiled policy to events, one agent's stream after another.
#[derive(Debug)]
pub struct Enforcer {
    compiled: Arc<Compiled>,
    cache: HashMap<String, Resolved>,
    kept: HashMap<String, Kept>,
    stream_rates: HashMap<String, (Option<TokenBucket>, Option<TokenBucket>)>,
    agent_events: Option<TokenBucket>,
    agent_bytes: Option<TokenBucket>,
}

impl Enforcer {
    /// An enforcer with no history.
    #[must_use]
    pub fn new(compiled: Arc<Compiled>) -> Enforcer {
        let drop_rate = compiled.agent_rate.filter(|r| r.over == Over::Drop);
        Enforcer {
            agent_events: drop_rate.and_then(|r| r.events_per_sec.map(TokenBucket::new)),
            agent_bytes: drop_rate.and_then(|r| r.bytes_per_sec.map(TokenBucket::new)),
            compiled,
            cache: HashMap::new(),
            kept: HashMap::new(),
            stream_rates: HashMap::new(),
        }
    }

    /// The compiled policy it applies.
    #[must_use]
    pub fn compiled(&self) -> &Arc<Compiled> {
        &self.compiled
    }

    /// Applies the policy to `body`, editing it in place where minimisation
    /// says so, and says whether to keep it.
    pub fn apply(&mut self, body: &mut EventBody, stage: Stage) -> Verdict {
        let stream = body.stream.as_str();
        let resolved = match self.cache.get(stream) {
            Some(r) => r.clone(),
            None => {
                if self.cache.len() >= MAX_CACHED_STREAMS {
                    self.cache.clear();
                }
                let r = self.compiled.resolve(stream);
                self.cache.insert(stream.to_owned(), r.clone());
                r
            }
        };
        let (rule, sinks) = match resolved {
            Resolved::Drop(reason) => return Verdict::Drop(reason),
            Resolved::Keep { rule, sinks } => {
                (rule.map(|i| &self.compiled.rules[i as usize]), sinks)
            }
        };
        let modified = match rule {
            Some(r) if r.edits() => edit(r, &mut body.value),
            _ => false,
        };
        if stage == Stage::Recheck {
            return Verdict::Keep { modified, sinks };
        }
        let ts = body.ts.0;
        let size = body.value.payload_len() as f64;
        if let Some(ds) = rule.and_then(|r| r.downsample) {
            if let Some(last) = self.kept.get(stream) {
                if !keeps(&ds, last, ts, &body.value) {
                    return Verdict::Drop(DropReason::Downsampled);
                }
            }
        }
        if let Some(rate) = rule.and_then(|r| r.rate) {
            let entry = self
                .stream_rates
                .entry(stream.to_owned())
                .or_insert_with(|| {
                    (
                        rate.events_per_sec.map(TokenBucket::new),
                        rate.bytes_per_sec.map(TokenBucket::new),
                    )
                });
            if !take(entry, ts, size) {
                return Verdict::Drop(DropReason::RateLimited);
            }
        }
        // The agent-wide drop limit is for the site's data; the agent's own
        // records neither count against it nor are dropped by it.
        if !is_reserved(stream) {
            let mut agent = (self.agent_events.take(), self.agent_bytes.take());
            let within = take(&mut agent, ts, size);
            (self.agent_events, self.agent_bytes) = agent;
            if !within {
                return Verdict::Drop(DropReason::RateLimited);
            }
        }
        if rule.and_then(|r| r.downsample).is_some() {
            self.kept.insert(
                stream.to_owned(),
                Kept {
                    ts,
                    value: body.value.clone(),
                },
            );
        }
        Verdict::Keep { modified, sinks }
    }
}

/// Takes one event of `size` bytes from both buckets, or from neither.
fn take(buckets: &mut (Option<TokenBucket>, Option<TokenBucket>), ts: i64, size: f64) -> bool {
    let (events, bytes) = buckets;
    let before = (events.clone(), bytes.clone());
    let ok_e = events.as_mut().is_none_or(|b| b.try_take(ts, 1.0));
    let ok_b = bytes.as_mut().is_none_or(|b| b.try_take(ts, size));
    if ok_e && ok_b {
        true
    } else {
        // A refused event costs nothing, so what is kept stays within both.
        *events = before.0;
        *bytes = before.1;
        if let Some(b) = events.as_mut() {
            b.refill(ts);
        }
        if let Some(b) = bytes.as_mut() {
            b.refill(ts);
        }
        false
    }
}

/// Whether downsampling keeps an event at `ts` with `value` after `last`.
fn keeps(ds: &Downsample, last: &Kept, ts: i64, value: &Value) -> bool {
    let elapsed = ts.saturating_sub(last.ts);
    let nanos = |d: std::time::Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
    if ds.max_interval.is_some_and(|m| elapsed >= nanos(m)) {
        return true;
    }
    if elapsed < nanos(ds.interval) {
        return false;
    }
    if ds.deadband == 0.0 {
        return true;
    }
    match (value.as_f64(), last.value.as_f64()) {
        (Some(now), Some(before)) => (now - before).abs() >= ds.deadband,
        _ => *value != last.value,
    }
}

/// Applies a rule's field edits to a value; returns whether it changed.
fn edit(rule: &CRule, value: &mut Value) -> bool {
    match value {
        Value::F64(x) if rule.round_fields.is_empty() => match rule.round {
            Some(d) => {
                let r = fields::round(*x, d);
                // Bits, not `!=`: NaN is never equal to itself.
                let changed = r.to_bits() != x.to_bits();
                *x = r;
                changed
            }
            None => false,
        },
        Value::Json(text) => {
            let mut doc = text.to_value();
            let mut changed = false;
            for p in &rule.drop {
                changed |= fields::drop_field(&mut doc, p);
            }
            for p in &rule.redact {
                changed |= fields::redact_field(&mut doc, p);
            }
            for p in &rule.hash {
                changed |= match &rule.hash_key {
                    Some(key) => fields::hash_field(&mut doc, p, key.bytes()),
                    // No key (a document read without the hub's): nothing
                    // leaves under a key anyone could guess.
                    None => fields::redact_field(&mut doc, p),
                };
            }
            if let Some(d) = rule.round {
                if rule.round_fields.is_empty() {
                    changed |= fields::round_number(Some(&mut doc), d);
                }
                for p in &rule.round_fields {
                    changed |= fields::round_field(&mut doc, p, d);
                }
            }
            if changed {
                *text = JsonText::from_value(&doc);
            }
            changed
        }
        _ => false,
    }
}
