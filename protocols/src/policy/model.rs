//! The validated policy: what a document means once parsed, and the
//! questions the hub and the agent ask of it (which selectors, which grants,
//! which limits, which residency).
//!
//! Kept apart from the document as written (`parse.rs`) and from the
//! per-agent evaluator (`eval.rs`), both of which build on these types; this
//! module names neither, so the arrows point one way.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::fields::hex;
use super::keys::{HashingKey, RuleKey};
use crate::topic::TopicFilter;

/// The sink id of the hub's own store; every catalog has it.
pub const STORE_SINK: &str = "store";

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
    pub(super) fn knows(&self, id: &str) -> bool {
        self.sinks.as_ref().is_none_or(|s| s.contains_key(id))
    }

    /// The region of sink `id`, if known.
    pub(super) fn region(&self, id: &str) -> Option<&str> {
        self.sinks
            .as_ref()
            .and_then(|s| s.get(id))
            .and_then(|r| r.as_deref())
    }

    pub(super) fn is_trusting(&self) -> bool {
        self.sinks.is_none()
    }
}

/// A label selector: every named label must be present and match its glob
/// (`*` matches any run of characters). Empty selects every agent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector(pub(super) BTreeMap<String, String>);

impl Selector {
    /// A selector of these label patterns (`*` globs), as an operator's
    /// `--select KEY=PATTERN` gives them.
    #[must_use]
    pub fn from_patterns(patterns: BTreeMap<String, String>) -> Selector {
        Selector(patterns)
    }

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
    pub(super) fn within(&self, other: &Selector) -> bool {
        // `*` still needs the label to be there: `{site = "*"}` does not
        // select an agent without a `site` label.
        other
            .0
            .iter()
            .all(|(k, p)| self.0.get(k).is_some_and(|mine| p == "*" || mine == p))
    }
}

/// `*`-globbing, anchored at both ends.
pub(super) fn glob(pattern: &str, text: &str) -> bool {
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
    /// Tag streams (`device/tag`) they may read now.
    pub read: Vec<TopicFilter>,
}

/// A command an operator asks to send, for [`Policy::authorize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// Write a Modbus tag, named by its stream `device/tag`.
    Write(&'a str),
    /// Publish on the site broker.
    Publish(&'a str),
    /// Read a Modbus tag now, named by its stream `device/tag`.
    Read(&'a str),
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
    /// Where the keys of `hash` fields come from.
    pub(super) hashing: Hashing,
    /// Whether the text carried the `[hashing]` table of older versions
    /// (read from the hub's store, never used).
    pub(super) legacy_hashing: bool,
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
            hashing: Hashing::None,
            legacy_hashing: false,
            residency: Vec::new(),
            rules: Vec::new(),
            limits: Vec::new(),
            buffer: Vec::new(),
            commands: Vec::new(),
        }
    }
}

/// Where the keys of a policy's `hash` fields come from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) enum Hashing {
    /// No key: a `hash` field is redacted instead, so that nothing leaves
    /// under a key anyone could guess.
    #[default]
    None,
    /// The hub's key; each rule's is derived from it.
    Hub(HashingKey),
    /// A scoped document's keys, one per rule (`None` for a rule that does
    /// not hash), as the hub derived them.
    Scoped(Vec<Option<RuleKey>>),
}

impl Policy {
    /// The policy with the hub's hashing key, from which the key of each
    /// rule that hashes is derived (for the hub's own enforcement and for
    /// the documents it sends agents).
    #[must_use]
    pub fn with_hashing_key(mut self, key: HashingKey) -> Policy {
        self.hashing = Hashing::Hub(key);
        self
    }

    /// Whether the text carried a `[hashing]` table, as versions applied
    /// before the key moved to the hub's key file did. Only
    /// [`Policy::parse_stored`] accepts one; its key is never used.
    #[must_use]
    pub fn carries_hashing_key(&self) -> bool {
        self.legacy_hashing
    }

    /// The key of rule `i`, if it hashes and a key is known.
    pub(super) fn rule_key(&self, i: usize) -> Option<RuleKey> {
        let rule = self.rules.get(i).filter(|r| !r.hash.is_empty())?;
        match &self.hashing {
            Hashing::None => None,
            Hashing::Hub(key) => Some(key.derive(&rule.name, &rule.agents.0)),
            Hashing::Scoped(keys) => keys.get(i).cloned().flatten(),
        }
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
                    Command::Read(stream) => g.read.iter().any(|f| f.matches(stream)),
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
}

/// The SHA-256 of a policy's text, as lowercase hex: what the audit log and
/// `policy history` show to tell versions apart.
#[must_use]
pub fn digest(text: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref())
}
