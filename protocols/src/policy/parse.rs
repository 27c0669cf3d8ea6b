//! The policy document as written, and its validation into a [`Policy`].
//!
//! Every table of the document refuses unknown keys, and every refusal names
//! the key path (`rules[2] ("meters").streams[0]`), so an operator can fix
//! the document from the one line the CLI prints. Validation is split by
//! table; the residency check runs last, on the validated policy, because it
//! needs every rule and route at once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use outpost_settings::{one_line, HumanDuration, HumanSize};
use serde::Deserialize;

use super::fields;
use super::keys::RuleKey;
use super::model::{
    Action, AgentLimits, BufferLimits, Catalog, CommandGrant, Downsample, Hashing, Over, Policy,
    Rate, Residency, Rule, Selector, STORE_SINK,
};
use crate::topic::TopicFilter;

/// The largest policy document, in bytes. The hub pushes the text in one
/// frame, and an agent persists it; a megabyte holds tens of thousands of
/// rules.
pub const MAX_POLICY_LEN: usize = 1024 * 1024;

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
    /// The document has a `[hashing]` table: the hashing key is the hub's
    /// now, in its own file, and never part of a policy.
    #[error("line {line}: [hashing] key: the hashing key is no longer part of the policy: the hub keeps it in its own file ([policy] hashing_key, made on first start) and gives each agent only keys derived for the rules that apply to it; delete the [hashing] table and apply again")]
    KeyInPolicy {
        /// The line of the table (1-based).
        line: usize,
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

// The document as written. Every table refuses unknown keys.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    description: String,
    #[serde(default)]
    defaults: RawDefaults,
    hashing: Option<toml::Spanned<toml::Value>>,
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
    /// Only in a scoped document: the rule's key, as the hub derived it.
    hash_key: Option<String>,
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
    #[serde(default)]
    read: Vec<String>,
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

/// Which kind of document is read: they share the language and differ
/// only in where hashing keys may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    /// What an operator applies: no key anywhere; a rule that hashes needs
    /// a name (its key is derived from it).
    Fleet,
    /// A version from the hub's store: as `Fleet`, but one applied before
    /// the key moved to the hub's file may still carry a `[hashing]`
    /// table (ignored) and unnamed rules that hash.
    Stored,
    /// The document the hub sends one agent: every rule that hashes
    /// carries its `hash_key`.
    Scoped,
}

impl Policy {
    /// Parses and validates a document against the sinks of `catalog`.
    ///
    /// Refuses, with the key path: TOML errors and unknown keys; invalid
    /// patterns, pointers, durations and sizes; unknown sinks; a
    /// `[hashing]` table, with its line ([`PolicyError::KeyInPolicy`]: the
    /// key is the hub's); a rule with `hash_key`, or one that hashes
    /// without a `name`; a rule that an earlier rule shadows for every
    /// agent (it cannot match); and, with a catalog that knows regions, a
    /// route that would take streams of a residency to a sink outside its
    /// regions ([`PolicyError::Residency`]).
    pub fn parse(text: &str, catalog: &Catalog) -> Result<Policy, PolicyError> {
        parse(text, catalog, Dialect::Fleet)
    }

    /// Parses a version the hub stored, as [`Policy::parse`] does, except
    /// that a version applied before the hashing key moved to the hub's key
    /// file may carry a `[hashing]` table (whose key is never used; see
    /// [`Policy::carries_hashing_key`]) and unnamed rules that hash.
    pub fn parse_stored(text: &str, catalog: &Catalog) -> Result<Policy, PolicyError> {
        parse(text, catalog, Dialect::Stored)
    }

    /// Parses the document the hub sent one agent (see
    /// [`Policy::scoped_text`]): the fleet's language, where every rule
    /// that hashes carries the `hash_key` derived for it. Validated against
    /// a trusting catalog, since the hub checked the sinks and residency.
    pub fn parse_scoped(text: &str) -> Result<Policy, PolicyError> {
        parse(text, &Catalog::trusting(), Dialect::Scoped)
    }
}

fn parse(text: &str, catalog: &Catalog, dialect: Dialect) -> Result<Policy, PolicyError> {
    if text.len() > MAX_POLICY_LEN {
        return Err(PolicyError::TooLarge {
            len: text.len(),
            max: MAX_POLICY_LEN,
        });
    }
    let raw: RawPolicy =
        toml::from_str(text).map_err(|e| PolicyError::Syntax(one_line(&e.to_string())))?;
    let legacy_hashing = match &raw.hashing {
        Some(h) if dialect != Dialect::Stored => {
            return Err(PolicyError::KeyInPolicy {
                line: line_of(text, h.span().start),
            })
        }
        Some(_) => true,
        None => false,
    };
    let mut policy = validate(raw, catalog, dialect)?;
    policy.legacy_hashing = legacy_hashing;
    policy.check_residency(catalog)?;
    Ok(policy)
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// Every table of the document, in the order an operator reads it; the
/// residency check comes after, on the result.
fn validate(raw: RawPolicy, catalog: &Catalog, dialect: Dialect) -> Result<Policy, PolicyError> {
    let default_action = action("defaults.action", raw.defaults.action.as_deref())?;
    let default_sinks = raw
        .defaults
        .sinks
        .unwrap_or_else(|| vec![STORE_SINK.to_owned()]);
    sinks("defaults.sinks", &default_sinks, catalog)?;
    let residency = raw
        .residency
        .into_iter()
        .enumerate()
        .map(|(i, r)| residency(i, r))
        .collect::<Result<_, _>>()?;
    let (rules, keys) = rules(raw.rules, catalog, dialect)?;
    let limits = raw
        .limits
        .into_iter()
        .enumerate()
        .map(|(i, l)| agent_limits(i, l))
        .collect::<Result<_, _>>()?;
    let buffer = raw
        .buffer
        .into_iter()
        .enumerate()
        .map(|(i, b)| buffer(i, b))
        .collect::<Result<_, _>>()?;
    let commands = raw
        .commands
        .into_iter()
        .enumerate()
        .map(|(i, c)| command_grant(i, c))
        .collect::<Result<_, _>>()?;
    Ok(Policy {
        description: raw.description,
        default_action,
        default_sinks,
        hashing: match dialect {
            Dialect::Scoped => Hashing::Scoped(keys),
            Dialect::Fleet | Dialect::Stored => Hashing::None,
        },
        legacy_hashing: false,
        residency,
        rules,
        limits,
        buffer,
        commands,
    })
}

/// `allow` (the default) or `deny`, at `key`.
fn action(key: &str, s: Option<&str>) -> Result<Action, PolicyError> {
    match s {
        None | Some("allow") => Ok(Action::Allow),
        Some("deny") => Ok(Action::Deny),
        Some(other) => Err(PolicyError::invalid(
            key,
            format!("unknown action {other:?}; use \"allow\" or \"deny\""),
        )),
    }
}

/// `[[residency]]` entry `i`; its home is always one of its regions.
fn residency(i: usize, r: RawResidency) -> Result<Residency, PolicyError> {
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
    Ok(Residency {
        name: r.name.unwrap_or(key),
        streams,
        classification: r.classification,
        home: r.home,
        regions,
    })
}

/// The `[[rules]]`, in order, each refused if an earlier one shadows it,
/// with the keys a scoped document carries (one per rule).
fn rules(
    raw: Vec<RawRule>,
    catalog: &Catalog,
    dialect: Dialect,
) -> Result<(Vec<Rule>, Vec<Option<RuleKey>>), PolicyError> {
    let mut rules: Vec<Rule> = Vec::new();
    let mut keys = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let key = format!("rules[{i}]");
        let name = r.name.clone().unwrap_or_else(|| key.clone());
        let label = if r.name.is_some() {
            format!("{key} ({name:?})")
        } else {
            key.clone()
        };
        keys.push(rule_key(&label, &r, dialect)?);
        let rule = rule(&label, name, r, catalog)?;
        not_shadowed(&label, &rule, &rules)?;
        rules.push(rule);
    }
    Ok((rules, keys))
}

/// A rule's `hash_key`: required on a scoped document's rules that hash,
/// refused anywhere else; and the name a rule that hashes needs in an
/// operator's document, since its key is derived from it.
fn rule_key(label: &str, r: &RawRule, dialect: Dialect) -> Result<Option<RuleKey>, PolicyError> {
    let hashes = !r.hash.is_empty();
    match (dialect, &r.hash_key) {
        (Dialect::Scoped, Some(k)) if hashes => RuleKey::from_hex(k).map(Some).ok_or_else(|| {
            PolicyError::invalid(format!("{label}.hash_key"), "must be 64 hex digits")
        }),
        (Dialect::Scoped, None) if hashes => Err(PolicyError::invalid(
            format!("{label}.hash"),
            "needs hash_key (the hub sends it with the rule)",
        )),
        (Dialect::Scoped, None) => Ok(None),
        (Dialect::Scoped, Some(_)) => Err(PolicyError::invalid(
            format!("{label}.hash_key"),
            "only a rule that hashes carries a key",
        )),
        (Dialect::Fleet | Dialect::Stored, Some(_)) => Err(PolicyError::invalid(
            format!("{label}.hash_key"),
            "hashing keys are the hub's: it derives one for each rule that hashes; delete hash_key",
        )),
        (Dialect::Fleet, None) if hashes && r.name.as_deref().is_none_or(str::is_empty) => {
            Err(PolicyError::invalid(
                format!("{label}.hash"),
                "a rule that hashes needs a name: its hashing key is derived from the name and the agents selector, so that adding or moving rules keeps its pseudonyms",
            ))
        }
        (Dialect::Fleet | Dialect::Stored, None) => Ok(None),
    }
}

/// One rule, named `label` in messages (`rules[i]`, with its name if it
/// has one).
fn rule(label: &str, name: String, r: RawRule, catalog: &Catalog) -> Result<Rule, PolicyError> {
    let streams = filters(&format!("{label}.streams"), &r.streams)?;
    let action = action(&format!("{label}.action"), r.action.as_deref())?;
    let shapes = !r.drop.is_empty()
        || !r.redact.is_empty()
        || !r.hash.is_empty()
        || r.round.is_some()
        || r.downsample.is_some()
        || r.rate.is_some()
        || r.sinks.is_some();
    if action == Action::Deny && shapes {
        return Err(PolicyError::invalid(
            label,
            "a deny rule drops its streams; it takes no drop, redact, hash, round, downsample, rate or sinks",
        ));
    }
    field_edits(label, &r)?;
    let round = round(label, r.round, &r.round_fields)?;
    let downsample = match r.downsample {
        None => None,
        Some(d) => Some(downsample(label, d)?),
    };
    let rate = match r.rate {
        None => None,
        Some(x) => Some(stream_rate(label, x)?),
    };
    if let Some(s) = &r.sinks {
        sinks(&format!("{label}.sinks"), s, catalog)?;
    }
    let agents = selector(label, r.agents)?;
    Ok(Rule {
        name,
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
    })
}

/// A rule's `drop`, `redact`, `hash` and `round_fields` pointers: valid,
/// and one edit per field.
fn field_edits(label: &str, r: &RawRule) -> Result<(), PolicyError> {
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
    Ok(())
}

/// A rule's `round` (decimal places), required when it has `round_fields`.
fn round(
    label: &str,
    round: Option<i64>,
    round_fields: &[String],
) -> Result<Option<u8>, PolicyError> {
    match round {
        None if !round_fields.is_empty() => Err(PolicyError::invalid(
            format!("{label}.round_fields"),
            "needs round (the decimal places)",
        )),
        None => Ok(None),
        Some(d) => Ok(Some(u8::try_from(d).ok().filter(|d| *d <= 12).ok_or_else(
            || PolicyError::invalid(format!("{label}.round"), "must be 0 to 12 decimal places"),
        )?)),
    }
}

/// A rule's `downsample` table.
fn downsample(label: &str, d: RawDownsample) -> Result<Downsample, PolicyError> {
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
    Ok(Downsample {
        interval: d.interval.0,
        deadband: d.deadband,
        max_interval: d.max_interval.map(|m| m.0),
    })
}

/// A rule's `rate`: per stream, so it can only drop (holding is per agent).
fn stream_rate(label: &str, x: RawRate) -> Result<Rate, PolicyError> {
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
    Ok(rt)
}

/// Refuses `rule` if a rule before it takes every stream of one of its
/// patterns for every agent it selects: it could never match.
fn not_shadowed(label: &str, rule: &Rule, earlier_rules: &[Rule]) -> Result<(), PolicyError> {
    for (j, s) in rule.streams.iter().enumerate() {
        let shadow = earlier_rules.iter().find(|earlier| {
            rule.agents.within(&earlier.agents) && earlier.streams.iter().any(|e| e.covers(s))
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
    Ok(())
}

/// `[[limits]]` entry `i`: a rate per agent.
fn agent_limits(i: usize, l: RawLimits) -> Result<AgentLimits, PolicyError> {
    let key = format!("limits[{i}]");
    let rt = rate(
        &key,
        l.events_per_second,
        l.bytes_per_second,
        l.over.as_deref(),
    )?;
    Ok(AgentLimits {
        agents: selector(&key, l.agents)?,
        rate: rt,
    })
}

/// `[[buffer]]` entry `i`: edge buffer limits no smaller than the agent can
/// work with.
fn buffer(i: usize, b: RawBuffer) -> Result<BufferLimits, PolicyError> {
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
    Ok(BufferLimits {
        agents: selector(&key, b.agents)?,
        max_bytes: b.max_bytes.map(|s| s.0),
        max_age: b.max_age.map(|d| d.0),
        eviction: b.eviction,
    })
}

/// `[[commands]]` entry `i`: roles, and what they may write, publish or read.
fn command_grant(i: usize, c: RawCommand) -> Result<CommandGrant, PolicyError> {
    let key = format!("commands[{i}]");
    if c.roles.is_empty() || c.roles.iter().any(String::is_empty) {
        return Err(PolicyError::invalid(
            format!("{key}.roles"),
            "must name at least one role",
        ));
    }
    if c.write.is_empty() && c.publish.is_empty() && c.read.is_empty() {
        return Err(PolicyError::invalid(
            &key,
            "grants nothing: give write, publish, read or several",
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
    let read = if c.read.is_empty() {
        Vec::new()
    } else {
        filters(&format!("{key}.read"), &c.read)?
    };
    Ok(CommandGrant {
        roles: c.roles.into_iter().collect(),
        agents: selector(&key, c.agents)?,
        write,
        publish,
        read,
    })
}

impl Policy {
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
}
