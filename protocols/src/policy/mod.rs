//! The fleet policy: one TOML document, versioned by the hub, that says what
//! may leave a site, in what form, to which sinks and regions, at what rate,
//! and who may command what.
//!
//! Both ends run the same code on the same text: the agent so that denied
//! data never crosses the wire, the hub again because an agent may be old or
//! compromised. So the rules here are pure functions of the document, the
//! agent's labels, the event and a time passed in; the evaluator is compiled
//! once per version and agent ([`Policy::compile`]) and keeps only the state
//! that downsampling and rate limits need ([`Enforcer`]).
//!
//! ```text
//! text ──parse──▶ Policy ──compile(labels, catalog)──▶ Compiled ──▶ Enforcer
//!        (syntax, keys,          (rules selecting       (per-event:
//!         patterns, shadowed      this agent, index      verdict, edits,
//!         rules, residency)       by first level)        state)
//! ```
//!
//! Rules are evaluated in order; the first whose `streams` match the event's
//! stream decides (like a firewall). A rule that an earlier one shadows for
//! every agent is refused as "cannot match", so the order an operator reads is
//! the order that applies. `docs/policy.md` is the language reference.

mod eval;
mod fields;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use outpost_settings::{one_line, HumanDuration, HumanSize};
use serde::{Deserialize, Serialize};

use crate::topic::TopicFilter;

pub use eval::{Compiled, DropReason, Enforcer, Stage, TokenBucket, Verdict};
pub use fields::{HASH_PREFIX, REDACTED};

/// The sink id of the hub's own store; every catalog has it.
pub const STORE_SINK: &str = "store";

/// The largest policy document, in bytes. The hub pushes the text in one
/// frame, and an agent persists it; a megabyte holds tens of thousands of
/// rules.
pub const MAX_POLICY_LEN: usize = 1024 * 1024;

/// A policy version: assigned by the hub, 1 for the first policy applied, one
/// more for each apply (a rollback too). 0 means "no policy": everything is
/// allowed and goes to the store.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct PolicyVersion(pub u64);

impl fmt::Display for PolicyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a policy document was refused. The message is the one line the CLI
/// prints: it names the key path (`rules[2].streams[0]`), and the rule's
/// name where it has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// Not TOML, an unknown key, or a value of the wrong type.
    #[error("{0}")]
    Syntax(String),
    /// A value parsed but breaks a rule of the language.
    #[error("{key}: {message}")]
    Invalid {
        /// The key path.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A route would carry streams of a residency to a sink outside it.
    #[error("{key}: residency: {message}")]
    Residency {
        /// The key path of the route.
        key: String,
        /// Which streams, which sink, which regions.
        message: String,
    },
    /// The document is larger than [`MAX_POLICY_LEN`].
    #[error("policy of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Its size.
        len: usize,
        /// [`MAX_POLICY_LEN`].
        max: usize,
    },
}

impl PolicyError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> PolicyError {
        PolicyError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The sinks a policy may route to, with their regions: the hub's store and,
/// later, the sinks of the hub's config. The hub validates against its
/// catalog; an agent, which does not know the sinks, compiles with
/// [`Catalog::trusting`] what the hub already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    sinks: Option<BTreeMap<String, Option<String>>>,
}

impl Catalog {
    /// The hub's catalog: the store in `store_region` (if the hub has one)
    /// and nothing else yet.
    #[must_use]
    pub fn hub(store_region: Option<&str>) -> Catalog {
        let mut sinks = BTreeMap::new();
        sinks.insert(STORE_SINK.to_owned(), store_region.map(str::to_owned));
        Catalog { sinks: Some(sinks) }
    }

    /// Adds a sink with its region.
    #[must_use]
    pub fn with_sink(mut self, id: &str, region: Option<&str>) -> Catalog {
        if let Some(s) = &mut self.sinks {
            s.insert(id.to_owned(), region.map(str::to_owned));
        }
        self
    }

    /// A catalog that accepts every sink id and knows no region: the agent's.
    #[must_use]
    pub fn trusting() -> Catalog {
        Catalog { sinks: None }
    }

    /// Whether `id` is a known sink (always, for a trusting catalog).
    fn knows(&self, id: &str) -> bool {
        self.sinks.as_ref().is_none_or(|s| s.contains_key(id))
    }

    /// The region of sink `id`, if known.
    fn region(&self, id: &str) -> Option<&str> {
        self.sinks
            .as_ref()
            .and_then(|s| s.get(id))
            .and_then(|r| r.as_deref())
    }

    fn is_trusting(&self) -> bool {
        self.sinks.is_none()
    }
}

/// A label selector: every named label must be present and match its glob
/// (`*` matches any run of characters). Empty selects every agent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector(BTreeMap<String, String>);

impl Selector {
    /// Whether it selects every agent.
    #[must_use]
    pub fn is_everyone(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether an agent with `labels` is selected.
    #[must_use]
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0
            .iter()
            .all(|(k, pattern)| labels.get(k).is_some_and(|v| glob(pattern, v)))
    }

    /// Whether every agent this selector selects is also selected by `other`
    /// (conservatively: `other` asks for a subset of the same constraints).
    fn within(&self, other: &Selector) -> bool {
        // `*` still needs the label to be there: `{site = "*"}` does not
        // select an agent without a `site` label.
        other
            .0
            .iter()
            .all(|(k, p)| self.0.get(k).is_some_and(|mine| p == "*" || mine == p))
    }
}

/// `*`-globbing, anchored at both ends.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

/// What a rule does with the streams it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Action {
    /// Let them through, minimised as the rule says.
    #[default]
    Allow,
    /// Drop them at the agent (and at the hub, if they arrive anyway).
    Deny,
}

/// What to do with events above a rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Over {
    /// Keep them in the agent's outbox and send them later (per agent only).
    #[default]
    Hold,
    /// Drop them and count them.
    Drop,
}

/// A rate: so many events, or bytes, per period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Events per second, if limited.
    pub events_per_sec: Option<f64>,
    /// Payload bytes per second, if limited.
    pub bytes_per_sec: Option<f64>,
    /// What happens above it.
    pub over: Over,
}

/// Downsampling: keep an event only when enough time passed or the value moved
/// enough since the last one kept.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Downsample {
    /// Keep at most one event per this much event time.
    pub interval: Duration,
    /// Once `interval` has passed, keep a value only if it moved by at least
    /// this much from the last one kept (numbers) or changed at all (anything
    /// else). 0 keeps the first event after each `interval`.
    pub deadband: f64,
    /// Keep an event at least this often, whatever the deadband says.
    pub max_interval: Option<Duration>,
}

/// Where streams of a classification may be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Residency {
    /// The entry's name, for messages.
    pub name: String,
    /// The streams it covers.
    pub streams: Vec<TopicFilter>,
    /// What kind of data (`personal`, `operational`, ...), for audits.
    pub classification: String,
    /// Where the data lives.
    pub home: String,
    /// The regions its sinks may be in (always includes `home`).
    pub regions: BTreeSet<String>,
}

/// One rule of the document, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Its name, or `rules[i]`.
    pub name: String,
    /// Which agents it applies to.
    pub agents: Selector,
    /// Which streams.
    pub streams: Vec<TopicFilter>,
    /// Allow or deny.
    pub action: Action,
    /// JSON pointers removed from JSON values.
    pub drop: Vec<String>,
    /// JSON pointers whose values become [`REDACTED`].
    pub redact: Vec<String>,
    /// JSON pointers whose values become a keyed hash.
    pub hash: Vec<String>,
    /// Decimal places numbers are rounded to.
    pub round: Option<u8>,
    /// Where the numbers to round are: empty means the value itself.
    pub round_fields: Vec<String>,
    /// Downsampling per stream.
    pub downsample: Option<Downsample>,
    /// A rate limit per stream (drop only).
    pub rate: Option<Rate>,
    /// The sinks its events go to; `None` means the document's default.
    pub sinks: Option<Vec<String>>,
}

/// Limits for the agents a selector picks.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentLimits {
    /// Which agents.
    pub agents: Selector,
    /// The rate per agent.
    pub rate: Rate,
}

/// Edge buffer limits that override the agent's local `[outbox]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferLimits {
    /// Which agents.
    pub agents: Selector,
    /// `[outbox] max_bytes`.
    pub max_bytes: Option<u64>,
    /// `[outbox] max_age`.
    pub max_age: Option<Duration>,
    /// `[outbox] eviction`: `drop-oldest` or `refuse-new`.
    pub eviction: Option<String>,
}

/// Which operator roles may send which commands to which agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandGrant {
    /// The roles granted.
    pub roles: BTreeSet<String>,
    /// On which agents.
    pub agents: Selector,
    /// Tag streams (`device/tag`) they may write.
    pub write: Vec<TopicFilter>,
    /// MQTT topics they may publish to.
    pub publish: Vec<TopicFilter>,
}

/// A command an operator asks to send, for [`Policy::authorize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// Write a Modbus tag, named by its stream `device/tag`.
    Write(&'a str),
    /// Publish on the site broker.
    Publish(&'a str),
}

/// A parsed and validated policy document.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// What the operator says it is.
    pub description: String,
    /// What happens to streams no rule matches.
    pub default_action: Action,
    /// Where events go when their rule names no sinks.
    pub default_sinks: Vec<String>,
    /// The key of `hash` fields.
    hash_key: Option<Vec<u8>>,
    /// The residency entries.
    pub residency: Vec<Residency>,
    /// The rules, in order.
    pub rules: Vec<Rule>,
    /// Per-agent rate limits; the first selecting entry applies.
    pub limits: Vec<AgentLimits>,
    /// Edge buffer limits; the first selecting entry applies.
    pub buffer: Vec<BufferLimits>,
    /// Command grants; any granting entry allows.
    pub commands: Vec<CommandGrant>,
}

impl Default for Policy {
    /// The empty policy: allow everything, to the store.
    fn default() -> Policy {
        Policy {
            description: String::new(),
            default_action: Action::Allow,
            default_sinks: vec![STORE_SINK.to_owned()],
            hash_key: None,
            residency: Vec::new(),
            rules: Vec::new(),
            limits: Vec::new(),
            buffer: Vec::new(),
            commands: Vec::new(),
        }
    }
}

// The document as written. Every table refuses unknown keys.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    description: String,
    #[serde(default)]
    defaults: RawDefaults,
    hashing: Option<RawHashing>,
    #[serde(default)]
    residency: Vec<RawResidency>,
    #[serde(default)]
    rules: Vec<RawRule>,
    #[serde(default)]
    limits: Vec<RawLimits>,
    #[serde(default)]
    buffer: Vec<RawBuffer>,
    #[serde(default)]
    commands: Vec<RawCommand>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    action: Option<String>,
    sinks: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHashing {
    key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResidency {
    name: Option<String>,
    streams: Vec<String>,
    classification: String,
    home: String,
    #[serde(default)]
    regions: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<String>,
    #[serde(default)]
    agents: BTreeMap<String, String>,
    streams: Vec<String>,
    action: Option<String>,
    #[serde(default)]
    drop: Vec<String>,
    #[serde(default)]
    redact: Vec<String>,
    #[serde(default)]
    hash: Vec<String>,
    round: Option<i64>,
    #[serde(default)]
    round_fields: Vec<String>,
    downsample: Option<RawDownsample>,
    rate: Option<RawRate>,
    sinks: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDownsample {
    interval: HumanDuration,
    #[serde(default)]
    deadband: f64,
    max_interval: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    events_per_second: Option<f64>,
    bytes_per_second: Option<HumanSize>,
    over: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default)]
    agents: BTreeMap<String, String>,
    events_per_second: Option<f64>,
    bytes_per_second: Option<HumanSize>,
    over: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuffer {
    #[serde(default)]
    agents: BTreeMap<String, String>,
    max_bytes: Option<HumanSize>,
    max_age: Option<HumanDuration>,
    eviction: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommand {
    roles: Vec<String>,
    #[serde(default)]
    agents: BTreeMap<String, String>,
    #[serde(default)]
    write: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

fn filters(key: &str, patterns: &[String]) -> Result<Vec<TopicFilter>, PolicyError> {
    if patterns.is_empty() {
        return Err(PolicyError::invalid(key, "must list at least one pattern"));
    }
    patterns
        .iter()
        .enumerate()
        .map(|(i, p)| {
            TopicFilter::parse(p)
                .map_err(|e| PolicyError::invalid(format!("{key}[{i}]"), e.to_string()))
        })
        .collect()
}

fn selector(key: &str, labels: BTreeMap<String, String>) -> Result<Selector, PolicyError> {
    for (k, v) in &labels {
        if k.is_empty() || v.is_empty() {
            return Err(PolicyError::invalid(
                format!("{key}.agents"),
                "label names and patterns must not be empty",
            ));
        }
    }
    Ok(Selector(labels))
}

fn over(key: &str, s: Option<&str>) -> Result<Over, PolicyError> {
    match s {
        None | Some("hold") => Ok(Over::Hold),
        Some("drop") => Ok(Over::Drop),
        Some(other) => Err(PolicyError::invalid(
            format!("{key}.over"),
            format!("unknown value {other:?}; use \"hold\" or \"drop\""),
        )),
    }
}

fn rate(
    key: &str,
    events: Option<f64>,
    bytes: Option<HumanSize>,
    over_s: Option<&str>,
) -> Result<Rate, PolicyError> {
    if events.is_none() && bytes.is_none() {
        return Err(PolicyError::invalid(
            key,
            "give events_per_second, bytes_per_second or both",
        ));
    }
    if let Some(e) = events {
        if !(e.is_finite() && e > 0.0) {
            return Err(PolicyError::invalid(
                format!("{key}.events_per_second"),
                "must be a positive number",
            ));
        }
    }
    if bytes.is_some_and(|b| b.0 == 0) {
        return Err(PolicyError::invalid(
            format!("{key}.bytes_per_second"),
            "must be positive",
        ));
    }
    Ok(Rate {
        events_per_sec: events,
        bytes_per_sec: bytes.map(|b| b.0 as f64),
        over: over(key, over_s)?,
    })
}

fn pointers(key: &str, ps: &[String]) -> Result<(), PolicyError> {
    for (i, p) in ps.iter().enumerate() {
        fields::check_pointer(p).map_err(|m| PolicyError::invalid(format!("{key}[{i}]"), m))?;
    }
    Ok(())
}

fn sinks(key: &str, ids: &[String], catalog: &Catalog) -> Result<(), PolicyError> {
    for (i, id) in ids.iter().enumerate() {
        if !catalog.knows(id) {
            return Err(PolicyError::invalid(
                format!("{key}[{i}]"),
                format!("unknown sink {id:?}"),
            ));
        }
    }
    Ok(())
}

impl Policy {
    /// Parses and validates a document against the sinks of `catalog`.
    ///
    /// Refuses, with the key path: TOML errors and unknown keys; invalid
    /// patterns, pointers, durations and sizes; unknown sinks; a `hash`
    /// without `[hashing] key`; a rule that an earlier rule shadows for every
    /// agent (it cannot match); and, with a catalog that knows regions, a
    /// route that would take streams of a residency to a sink outside its
    /// regions ([`PolicyError::Residency`]).
    pub fn parse(text: &str, catalog: &Catalog) -> Result<Policy, PolicyError> {
        if text.len() > MAX_POLICY_LEN {
            return Err(PolicyError::TooLarge {
                len: text.len(),
                max: MAX_POLICY_LEN,
            });
        }
        let raw: RawPolicy =
            toml::from_str(text).map_err(|e| PolicyError::Syntax(one_line(&e.to_string())))?;
        let policy = Policy::validate(raw, catalog)?;
        policy.check_residency(catalog)?;
        Ok(policy)
    }

    fn validate(raw: RawPolicy, catalog: &Catalog) -> Result<Policy, PolicyError> {
        let default_action = match raw.defaults.action.as_deref() {
            None | Some("allow") => Action::Allow,
            Some("deny") => Action::Deny,
            Some(other) => {
                return Err(PolicyError::invalid(
                    "defaults.action",
                    format!("unknown action {other:?}; use \"allow\" or \"deny\""),
                ))
            }
        };
        let default_sinks = raw
            .defaults
            .sinks
            .unwrap_or_else(|| vec![STORE_SINK.to_owned()]);
        sinks("defaults.sinks", &default_sinks, catalog)?;
        let hash_key = match raw.hashing {
            Some(h) if h.key.len() < 16 => {
                return Err(PolicyError::invalid(
                    "hashing.key",
                    "must be at least 16 bytes; a short key makes hashes guessable",
                ))
            }
            Some(h) => Some(h.key.into_bytes()),
            None => None,
        };

        let mut residency = Vec::new();
        for (i, r) in raw.residency.into_iter().enumerate() {
            let key = format!("residency[{i}]");
            let streams = filters(&format!("{key}.streams"), &r.streams)?;
            if r.home.is_empty() || r.classification.is_empty() {
                return Err(PolicyError::invalid(
                    &key,
                    "home and classification must not be empty",
                ));
            }
            let mut regions: BTreeSet<String> = r.regions.into_iter().collect();
            regions.insert(r.home.clone());
            residency.push(Residency {
                name: r.name.unwrap_or(key),
                streams,
                classification: r.classification,
                home: r.home,
                regions,
            });
        }

        let mut rules: Vec<Rule> = Vec::new();
        for (i, r) in raw.rules.into_iter().enumerate() {
            let key = format!("rules[{i}]");
            let name = r.name.clone().unwrap_or_else(|| key.clone());
            let label = if r.name.is_some() {
                format!("{key} ({name:?})")
            } else {
                key.clone()
            };
            let streams = filters(&format!("{label}.streams"), &r.streams)?;
            let action = match r.action.as_deref() {
                None | Some("allow") => Action::Allow,
                Some("deny") => Action::Deny,
                Some(other) => {
                    return Err(PolicyError::invalid(
                        format!("{label}.action"),
                        format!("unknown action {other:?}; use \"allow\" or \"deny\""),
                    ))
                }
            };
            let shapes = !r.drop.is_empty()
                || !r.redact.is_empty()
                || !r.hash.is_empty()
                || r.round.is_some()
                || r.downsample.is_some()
                || r.rate.is_some()
                || r.sinks.is_some();
            if action == Action::Deny && shapes {
                return Err(PolicyError::invalid(
                    &label,
                    "a deny rule drops its streams; it takes no drop, redact, hash, round, downsample, rate or sinks",
                ));
            }
            pointers(&format!("{label}.drop"), &r.drop)?;
            // One field, one edit: redacting a hash and hashing "[redacted]"
            // would change the field on every pass, at the agent and again
            // at the hub.
            for (a_name, a, b_name, b) in [
                ("drop", &r.drop, "redact", &r.redact),
                ("drop", &r.drop, "hash", &r.hash),
                ("redact", &r.redact, "hash", &r.hash),
            ] {
                if let Some(p) = a.iter().find(|p| b.contains(p)) {
                    return Err(PolicyError::invalid(
                        format!("{label}.{b_name}"),
                        format!("{p:?} is also in {a_name}; give each field one edit"),
                    ));
                }
            }
            pointers(&format!("{label}.redact"), &r.redact)?;
            pointers(&format!("{label}.hash"), &r.hash)?;
            pointers(&format!("{label}.round_fields"), &r.round_fields)?;
            if !r.hash.is_empty() && hash_key.is_none() {
                return Err(PolicyError::invalid(
                    format!("{label}.hash"),
                    "needs [hashing] key",
                ));
            }
            let round = match r.round {
                None if !r.round_fields.is_empty() => {
                    return Err(PolicyError::invalid(
                        format!("{label}.round_fields"),
                        "needs round (the decimal places)",
                    ))
                }
                None => None,
                Some(d) => Some(u8::try_from(d).ok().filter(|d| *d <= 12).ok_or_else(|| {
                    PolicyError::invalid(format!("{label}.round"), "must be 0 to 12 decimal places")
                })?),
            };
            let downsample = match r.downsample {
                None => None,
                Some(d) => {
                    if d.interval.0.is_zero() {
                        return Err(PolicyError::invalid(
                            format!("{label}.downsample.interval"),
                            "must be positive",
                        ));
                    }
                    if !(d.deadband.is_finite() && d.deadband >= 0.0) {
                        return Err(PolicyError::invalid(
                            format!("{label}.downsample.deadband"),
                            "must be a number, 0 or more",
                        ));
                    }
                    if d.max_interval.is_some_and(|m| m.0 < d.interval.0) {
                        return Err(PolicyError::invalid(
                            format!("{label}.downsample.max_interval"),
                            "must be at least interval",
                        ));
                    }
                    Some(Downsample {
                        interval: d.interval.0,
                        deadband: d.deadband,
                        max_interval: d.max_interval.map(|m| m.0),
                    })
                }
            };
            let rate = match r.rate {
                None => None,
                Some(x) => {
                    let k = format!("{label}.rate");
                    let rt = rate(
                        &k,
                        x.events_per_second,
                        x.bytes_per_second,
                        x.over.as_deref(),
                    )?;
                    if x.over.is_none() || rt.over == Over::Hold {
                        return Err(PolicyError::invalid(
                            format!("{k}.over"),
                            "a per-stream rate must say over = \"drop\"; holding is per agent ([[limits]])",
                        ));
                    }
                    Some(rt)
                }
            };
            if let Some(s) = &r.sinks {
                sinks(&format!("{label}.sinks"), s, catalog)?;
            }
            let agents = selector(&label, r.agents)?;
            let rule = Rule {
                name: name.clone(),
                agents,
                streams,
                action,
                drop: r.drop,
                redact: r.redact,
                hash: r.hash,
                round,
                round_fields: r.round_fields,
                downsample,
                rate,
                sinks: r.sinks,
            };
            for (j, s) in rule.streams.iter().enumerate() {
                let shadow = rules.iter().find(|earlier| {
                    rule.agents.within(&earlier.agents)
                        && earlier.streams.iter().any(|e| e.covers(s))
                });
                if let Some(earlier) = shadow {
                    return Err(PolicyError::invalid(
                        format!("{label}.streams[{j}]"),
                        format!(
                            "pattern {:?} cannot match: rule {:?} before it takes every such stream",
                            s.as_str(),
                            earlier.name
                        ),
                    ));
                }
            }
            rules.push(rule);
        }

        let mut limits = Vec::new();
        for (i, l) in raw.limits.into_iter().enumerate() {
            let key = format!("limits[{i}]");
            let rt = rate(
                &key,
                l.events_per_second,
                l.bytes_per_second,
                l.over.as_deref(),
            )?;
            limits.push(AgentLimits {
                agents: selector(&key, l.agents)?,
                rate: rt,
            });
        }

        let mut buffer = Vec::new();
        for (i, b) in raw.buffer.into_iter().enumerate() {
            let key = format!("buffer[{i}]");
            if let Some(e) = &b.eviction {
                if e != "drop-oldest" && e != "refuse-new" {
                    return Err(PolicyError::invalid(
                        format!("{key}.eviction"),
                        format!("unknown eviction {e:?}; use \"drop-oldest\" or \"refuse-new\""),
                    ));
                }
            }
            if b.max_bytes.is_some_and(|s| s.0 < 1024 * 1024) {
                return Err(PolicyError::invalid(
                    format!("{key}.max_bytes"),
                    "must be at least 1MiB",
                ));
            }
            if b.max_age.is_some_and(|d| d.0 < Duration::from_secs(60)) {
                return Err(PolicyError::invalid(
                    format!("{key}.max_age"),
                    "must be at least 1m",
                ));
            }
            buffer.push(BufferLimits {
                agents: selector(&key, b.agents)?,
                max_bytes: b.max_bytes.map(|s| s.0),
                max_age: b.max_age.map(|d| d.0),
                eviction: b.eviction,
            });
        }

        let mut commands = Vec::new();
        for (i, c) in raw.commands.into_iter().enumerate() {
            let key = format!("commands[{i}]");
            if c.roles.is_empty() || c.roles.iter().any(String::is_empty) {
                return Err(PolicyError::invalid(
                    format!("{key}.roles"),
                    "must name at least one role",
                ));
            }
            if c.write.is_empty() && c.publish.is_empty() {
                return Err(PolicyError::invalid(
                    &key,
                    "grants nothing: give write, publish or both",
                ));
            }
            let write = if c.write.is_empty() {
                Vec::new()
            } else {
                filters(&format!("{key}.write"), &c.write)?
            };
            let publish = if c.publish.is_empty() {
                Vec::new()
            } else {
                filters(&format!("{key}.publish"), &c.publish)?
            };
            commands.push(CommandGrant {
                roles: c.roles.into_iter().collect(),
                agents: selector(&key, c.agents)?,
                write,
                publish,
            });
        }

        Ok(Policy {
            description: raw.description,
            default_action,
            default_sinks,
            hash_key,
            residency,
            rules,
            limits,
            buffer,
            commands,
        })
    }

    /// Refuses a route that could carry a stream of a residency to a sink
    /// outside its regions. Checked with the patterns alone (any stream both
    /// patterns match counts) and for every agent, so it holds whatever the
    /// labels; a trusting catalog knows no regions and checks nothing.
    fn check_residency(&self, catalog: &Catalog) -> Result<(), PolicyError> {
        if catalog.is_trusting() {
            return Ok(());
        }
        let outside = |r: &Residency, sink: &str| match catalog.region(sink) {
            Some(region) => !r.regions.contains(region),
            None => true,
        };
        let describe = |r: &Residency, sink: &str| {
            let region = catalog.region(sink).unwrap_or("no region");
            format!(
                "streams of residency {:?} ({}, home {}) may only reach regions {:?}, but sink {sink:?} is in {region}",
                r.name,
                r.classification,
                r.home,
                r.regions.iter().collect::<Vec<_>>()
            )
        };
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.action == Action::Deny {
                continue;
            }
            let route = rule.sinks.as_ref().unwrap_or(&self.default_sinks);
            for r in &self.residency {
                let meets = rule
                    .streams
                    .iter()
                    .any(|s| r.streams.iter().any(|p| p.overlaps(s)));
                if !meets {
                    continue;
                }
                if let Some((j, sink)) = route.iter().enumerate().find(|(_, s)| outside(r, s)) {
                    let key = match rule.sinks {
                        Some(_) => format!("rules[{i}] ({:?}).sinks[{j}]", rule.name),
                        None => format!("rules[{i}] ({:?}) by defaults.sinks[{j}]", rule.name),
                    };
                    return Err(PolicyError::Residency {
                        key,
                        message: describe(r, sink),
                    });
                }
            }
        }
        // Streams no rule takes go by the default action and sinks.
        if self.default_action == Action::Allow {
            for r in &self.residency {
                if let Some((j, sink)) = self
                    .default_sinks
                    .iter()
                    .enumerate()
                    .find(|(_, s)| outside(r, s))
                {
                    // Only if some of its streams fall through every rule.
                    let all_taken = r.streams.iter().all(|p| {
                        self.rules.iter().any(|rule| {
                            rule.agents.0.is_empty() && rule.streams.iter().any(|s| s.covers(p))
                        })
                    });
                    if !all_taken {
                        return Err(PolicyError::Residency {
                            key: format!("defaults.sinks[{j}]"),
                            message: describe(r, sink),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Every label selector of the document with its key path, for an
    /// operator's check against the fleet ("selects no known agent").
    #[must_use]
    pub fn selectors(&self) -> Vec<(String, &Selector)> {
        let mut out = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            out.push((format!("rules[{i}] ({:?}).agents", r.name), &r.agents));
        }
        for (i, l) in self.limits.iter().enumerate() {
            out.push((format!("limits[{i}].agents"), &l.agents));
        }
        for (i, b) in self.buffer.iter().enumerate() {
            out.push((format!("buffer[{i}].agents"), &b.agents));
        }
        for (i, c) in self.commands.iter().enumerate() {
            out.push((format!("commands[{i}].agents"), &c.agents));
        }
        out.retain(|(_, s)| !s.is_everyone());
        out
    }

    /// Whether `role` may send `command` to an agent with `labels`. Nothing is
    /// allowed unless a `[[commands]]` entry grants it.
    #[must_use]
    pub fn authorize(
        &self,
        role: &str,
        labels: &BTreeMap<String, String>,
        command: Command<'_>,
    ) -> bool {
        self.commands.iter().any(|g| {
            g.roles.contains(role)
                && g.agents.selects(labels)
                && match command {
                    Command::Write(stream) => g.write.iter().any(|f| f.matches(stream)),
                    Command::Publish(topic) => g.publish.iter().any(|f| f.matches(topic)),
                }
        })
    }

    /// The edge buffer limits for an agent with `labels`, if any entry
    /// selects it.
    #[must_use]
    pub fn buffer_for(&self, labels: &BTreeMap<String, String>) -> Option<&BufferLimits> {
        self.buffer.iter().find(|b| b.agents.selects(labels))
    }

    /// The per-agent rate for an agent with `labels`, if any entry selects it.
    #[must_use]
    pub fn limits_for(&self, labels: &BTreeMap<String, String>) -> Option<Rate> {
        self.limits
            .iter()
            .find(|l| l.agents.selects(labels))
            .map(|l| l.rate)
    }

    /// The residency entry that covers `stream` (the first whose patterns
    /// match it), if any: what the hub checks at the last step, just before
    /// a sink gets an event, whatever the routes said.
    #[must_use]
    pub fn residency_of(&self, stream: &str) -> Option<&Residency> {
        self.residency
            .iter()
            .find(|r| r.streams.iter().any(|f| f.matches(stream)))
    }

    /// Compiles the rules that select an agent with `labels` into an
    /// evaluator, with the regions of `catalog` for the last-step residency
    /// check.
    #[must_use]
    pub fn compile(&self, labels: &BTreeMap<String, String>, catalog: &Catalog) -> Compiled {
        Compiled::new(self, labels, catalog)
    }
}

/// The SHA-256 of a policy's text, as lowercase hex: what the audit log and
/// `policy history` show to tell versions apart.
#[must_use]
pub fn digest(text: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}
