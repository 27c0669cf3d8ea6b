//! The document the hub sends one agent, and the text anyone may be shown.
//!
//! Why an agent does not get the fleet's document: it would learn every
//! other site's rules, and with the fleet's hashing key it could undo their
//! pseudonyms. So the hub sends each agent the fleet's document cut down to
//! what selects it, in the same language, with the key of each of its
//! rules that hashes ([`HashingKey::derive`](super::keys::HashingKey::derive)):
//!
//! ```text
//! kept      description, [defaults], [[residency]], and the [[rules]],
//!           [[limits]], [[buffer]] and [[commands]] entries whose agents
//!           selector selects the agent's labels, in their order
//! added     name = "rules[i]" on an unnamed rule (its fleet name, so both
//!           ends log and count it alike); hash_key = "<64 hex>" on a rule
//!           that hashes
//! removed   everything else, and a [hashing] table of an older version
//! ```
//!
//! Selection keeps the document's order, so "the first selecting entry
//! applies" picks the same entry at the agent as in the fleet's document,
//! and a rule shadowed in neither is shadowed in the part.

use std::collections::BTreeMap;

use outpost_settings::one_line;
use serde::Deserialize;

use super::model::{Hashing, Policy, Selector};
use super::parse::PolicyError;

impl Policy {
    /// The document for an agent with `labels`, from `text`, the fleet's
    /// document this policy was parsed from (by [`Policy::parse`] or
    /// [`Policy::parse_stored`]) and given the hub's key
    /// ([`Policy::with_hashing_key`]). The agent reads it with
    /// [`Policy::parse_scoped`].
    ///
    /// Refused if `text` is not this policy's, or if a rule that hashes
    /// selects the agent and the policy has no key.
    pub fn scoped_text(
        &self,
        text: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<String, PolicyError> {
        let mut doc: toml::Table =
            toml::from_str(text).map_err(|e| PolicyError::Syntax(one_line(&e.to_string())))?;
        doc.remove("hashing");
        let mismatch = |table: &str| PolicyError::Invalid {
            key: table.to_owned(),
            message: "the text is not the document this policy was parsed from".into(),
        };
        let kept = |entries: Vec<&Selector>| -> Vec<bool> {
            entries.into_iter().map(|s| s.selects(labels)).collect()
        };
        let rules = kept(self.rules.iter().map(|r| &r.agents).collect());
        let limits = kept(self.limits.iter().map(|l| &l.agents).collect());
        let buffer = kept(self.buffer.iter().map(|b| &b.agents).collect());
        let commands = kept(self.commands.iter().map(|c| &c.agents).collect());
        for (table, keep) in [
            ("limits", &limits),
            ("buffer", &buffer),
            ("commands", &commands),
        ] {
            select(&mut doc, table, keep, |_, _| Ok(())).ok_or_else(|| mismatch(table))??;
        }
        select(&mut doc, "rules", &rules, |i, entry| {
            let rule = &self.rules[i];
            entry
                .entry("name")
                .or_insert_with(|| toml::Value::String(rule.name.clone()));
            if rule.hash.is_empty() {
                return Ok(());
            }
            if matches!(self.hashing, Hashing::Scoped(_)) {
                return Err(PolicyError::Invalid {
                    key: format!("rules[{i}]"),
                    message: "a scoped document is not cut down again".into(),
                });
            }
            let key = self.rule_key(i).ok_or_else(|| PolicyError::Invalid {
                key: format!("rules[{i}] ({:?}).hash", rule.name),
                message: "the hub has no hashing key to derive this rule's from".into(),
            })?;
            entry.insert("hash_key".into(), toml::Value::String(key.to_hex()));
            Ok(())
        })
        .ok_or_else(|| mismatch("rules"))??;
        toml::to_string(&doc).map_err(|e| PolicyError::Syntax(one_line(&e.to_string())))
    }
}

/// Keeps entry `i` of the array of tables `table` where `keep[i]`, passing
/// each kept one to `edit`; drops the array if none is kept. `None` if the
/// array's length is not `keep`'s.
fn select(
    doc: &mut toml::Table,
    table: &str,
    keep: &[bool],
    mut edit: impl FnMut(usize, &mut toml::Table) -> Result<(), PolicyError>,
) -> Option<Result<(), PolicyError>> {
    let entries = match doc.remove(table) {
        None if keep.is_empty() => return Some(Ok(())),
        Some(toml::Value::Array(entries)) if entries.len() == keep.len() => entries,
        _ => return None,
    };
    let mut out = Vec::new();
    for (i, entry) in entries.into_iter().enumerate() {
        if !keep[i] {
            continue;
        }
        let toml::Value::Table(mut t) = entry else {
            return None;
        };
        if let Err(e) = edit(i, &mut t) {
            return Some(Err(e));
        }
        out.push(toml::Value::Table(t));
    }
    if !out.is_empty() {
        doc.insert(table.to_owned(), toml::Value::Array(out));
    }
    Some(Ok(()))
}

/// What a redacted key reads.
pub const KEY_REDACTED: &str = "\"[redacted: hashing keys are never shown]\"";

#[derive(Deserialize)]
struct Keys {
    hashing: Option<toml::Spanned<HashingKeys>>,
    #[serde(default)]
    rules: Vec<RuleKeys>,
}

#[derive(Deserialize)]
struct HashingKeys {
    key: Option<toml::Spanned<toml::Value>>,
}

#[derive(Deserialize)]
struct RuleKeys {
    hash_key: Option<toml::Spanned<toml::Value>>,
}

/// `text` as it may be shown, in `policy show` on either end and wherever
/// a policy is printed: the value of every hashing key in it (a `[hashing]
/// key` of an older version, each rule's `hash_key` in an agent's document)
/// replaced by [`KEY_REDACTED`], everything else as written. A text that
/// does not parse as TOML is not shown at all, since where its keys are
/// cannot be told.
#[must_use]
pub fn redact_keys(text: &str) -> String {
    let Ok(keys) = toml::from_str::<Keys>(text) else {
        return "# (this policy text does not parse, so it is not shown: it might hold a hashing key)\n"
            .to_owned();
    };
    let mut spans: Vec<std::ops::Range<usize>> = Vec::new();
    if let Some(k) = keys.hashing.as_ref().and_then(|h| h.get_ref().key.as_ref()) {
        spans.push(k.span());
    }
    spans.extend(
        keys.rules
            .iter()
            .filter_map(|r| r.hash_key.as_ref().map(toml::Spanned::span)),
    );
    spans.sort_by_key(|s| s.start);
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for s in spans {
        if s.start < at || s.end > text.len() {
            continue;
        }
        out.push_str(&text[at..s.start]);
        out.push_str(KEY_REDACTED);
        at = s.end;
    }
    out.push_str(&text[at..]);
    out
}
