//! MQTT topic filters and topic templates.
//!
//! Filters follow MQTT 3.1.1 section 4.7: `+` matches one level, `#` matches the
//! rest and must be last, and topics starting with `$` are not matched by a
//! filter starting with a wildcard (section 4.7.2). Templates let a bridge name
//! the topic a Modbus tag is published on from the device and tag names.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Errors from parsing topic filters and templates.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// The filter was empty or longer than 65535 bytes (MQTT 3.1.1 section 4.7.3).
    #[error("topic filter must be 1 to 65535 bytes")]
    Length,
    /// A `#` was not alone in the last level, or a `+` shared its level with
    /// other characters (MQTT 3.1.1 section 4.7.1).
    #[error("invalid wildcard in topic filter {0:?}: '#' must be last and alone, '+' alone in its level")]
    Wildcard(String),
    /// The filter held a NUL character (MQTT 3.1.1 section 4.7.3).
    #[error("topic filter contains NUL")]
    Nul,
    /// A template placeholder was not one of `{device}`, `{tag}`, `{stream}`.
    #[error(
        "unknown placeholder {{{0}}} in topic template; use {{device}}, {{tag}} or {{stream}}"
    )]
    Placeholder(String),
    /// A template produced, or held, an MQTT wildcard.
    #[error("topic template {0:?} must not contain '+' or '#'")]
    TemplateWildcard(String),
}

/// A parsed MQTT topic filter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TopicFilter(String);

impl TopicFilter {
    /// Parses a topic filter.
    pub fn parse(s: &str) -> Result<TopicFilter, TopicError> {
        if s.is_empty() || s.len() > 65535 {
            return Err(TopicError::Length);
        }
        if s.contains('\0') {
            return Err(TopicError::Nul);
        }
        let levels: Vec<&str> = s.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            let last = i + 1 == levels.len();
            if level.contains('#') && (*level != "#" || !last) {
                return Err(TopicError::Wildcard(s.to_owned()));
            }
            if level.contains('+') && *level != "+" {
                return Err(TopicError::Wildcard(s.to_owned()));
            }
        }
        Ok(TopicFilter(s.to_owned()))
    }

    /// The filter as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the filter holds no wildcard, so it names exactly one topic.
    pub fn is_exact(&self) -> bool {
        !self.0.contains(['+', '#'])
    }

    /// Whether a concrete topic matches this filter.
    pub fn matches(&self, topic: &str) -> bool {
        if topic.starts_with('$') && self.0.starts_with(['+', '#']) {
            return false;
        }
        let mut f = self.0.split('/');
        let mut t = topic.split('/');
        loop {
            match (f.next(), t.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    /// Whether some topic matches both filters. The policy uses it to find a
    /// route that could carry a stream of a residency to a sink outside it.
    pub fn overlaps(&self, other: &TopicFilter) -> bool {
        // A topic starting with '$' is never matched by a leading wildcard, so
        // such a filter meets a wildcard-led one only through non-'$' topics,
        // which its own literal first level excludes.
        let dollar = |f: &TopicFilter| f.0.starts_with('$');
        let wild = |f: &TopicFilter| f.0.starts_with(['+', '#']);
        if (dollar(self) && wild(other)) || (dollar(other) && wild(self)) {
            return false;
        }
        let mut a = self.0.split('/');
        let mut b = other.0.split('/');
        loop {
            match (a.next(), b.next()) {
                (Some("#"), _) | (_, Some("#")) => return true,
                (None, None) => return true,
                (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
                (Some(x), Some(y)) if x == y => {}
                _ => return false,
            }
        }
    }

    /// Whether every topic that `other` matches is matched by this filter, so
    /// a rule with this filter placed before one with `other` shadows it.
    pub fn covers(&self, other: &TopicFilter) -> bool {
        if self.0.starts_with(['+', '#']) && other.0.starts_with('$') {
            // A '$' topic is never matched by a leading wildcard.
            return false;
        }
        let a: Vec<&str> = self.0.split('/').collect();
        let b: Vec<&str> = other.0.split('/').collect();
        for k in 0.. {
            match (a.get(k).copied(), b.get(k).copied()) {
                (Some("#"), _) => return true,
                // `other`'s '#' also matches its parent level (section
                // 4.7.1.2) except at the start, where it needs one level:
                // only "#" covers the first, "#" and "+/#" the second.
                (_, Some("#")) => return k == 0 && a[k..] == ["+", "#"],
                (None, None) => return true,
                (Some("+"), Some(_)) => {}
                (Some(x), Some(y)) if x == y => {}
                _ => return false,
            }
        }
        false
    }
}

impl TryFrom<String> for TopicFilter {
    type Error = TopicError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        TopicFilter::parse(&s)
    }
}

impl From<TopicFilter> for String {
    fn from(f: TopicFilter) -> String {
        f.0
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    Device,
    Tag,
    Stream,
}

/// A topic with placeholders: `plant/{device}/{tag}` or `site/{stream}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    text: String,
    pieces: Vec<Piece>,
}

impl TopicTemplate {
    /// Parses a template; `{device}`, `{tag}` and `{stream}` are placeholders.
    pub fn parse(s: &str) -> Result<TopicTemplate, TopicError> {
        if s.is_empty() || s.len() > 65535 {
            return Err(TopicError::Length);
        }
        if s.contains(['+', '#']) {
            return Err(TopicError::TemplateWildcard(s.to_owned()));
        }
        let mut pieces = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                pieces.push(Piece::Lit(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| TopicError::Placeholder(after.to_owned()))?;
            pieces.push(match &after[..close] {
                "device" => Piece::Device,
                "tag" => Piece::Tag,
                "stream" => Piece::Stream,
                other => return Err(TopicError::Placeholder(other.to_owned())),
            });
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Lit(rest.to_owned()));
        }
        Ok(TopicTemplate {
            text: s.to_owned(),
            pieces,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Fills the placeholders for a stream `<device>/<tag>`.
    ///
    /// A stream without a `/` fills `{device}` with the whole name and `{tag}`
    /// with nothing.
    pub fn render(&self, stream: &str) -> String {
        let (device, tag) = stream.split_once('/').unwrap_or((stream, ""));
        let mut out = String::with_capacity(self.text.len() + stream.len());
        for p in &self.pieces {
            match p {
                Piece::Lit(s) => out.push_str(s),
                Piece::Device => out.push_str(device),
                Piece::Tag => out.push_str(tag),
                Piece::Stream => out.push_str(stream),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn filters_follow_mqtt_wildcard_rules() {
        let f = TopicFilter::parse("plant/+/temp").expect("valid");
        assert!(f.matches("plant/line1/temp"));
        assert!(!f.matches("plant/line1/x/temp"));
        assert!(!f.matches("plant/temp"));
        let all = TopicFilter::parse("plant/#").expect("valid");
        assert!(all.matches("plant"));
        assert!(all.matches("plant/a/b/c"));
        assert!(!all.matches("other/a"));
        assert!(!TopicFilter::parse("#").expect("valid").matches("$SYS/x"));
        assert!(TopicFilter::parse("a/#/b").is_err());
        assert!(TopicFilter::parse("a/b#").is_err());
        assert!(TopicFilter::parse("a/+b").is_err());
        assert!(TopicFilter::parse("").is_err());
    }

    #[test]
    fn templates_fill_device_and_tag() {
        let t = TopicTemplate::parse("plant/{device}/{tag}/value").expect("valid");
        assert_eq!(t.render("plc1/temperature"), "plant/plc1/temperature/value");
        let s = TopicTemplate::parse("x/{stream}").expect("valid");
        assert_eq!(s.render("plc1/t"), "x/plc1/t");
        assert!(TopicTemplate::parse("x/{nope}").is_err());
        assert!(TopicTemplate::parse("x/+").is_err());
    }

    /// Filters of up to three levels over a tiny alphabet, with wildcards and
    /// a '$' first level.
    fn small_filter() -> impl Strategy<Value = String> {
        let level = prop_oneof![Just("a"), Just("b"), Just("+")];
        (
            prop_oneof![Just("a"), Just("+"), Just("$s"), Just("#")],
            prop::collection::vec(level, 0..2),
            any::<bool>(),
        )
            .prop_map(|(first, rest, hash)| {
                let mut levels = vec![first];
                if first != "#" {
                    levels.extend(rest);
                    if hash {
                        levels.push("#");
                    }
                }
                levels.join("/")
            })
    }

    /// Every topic of one to four levels over `a`, `b`, `c` (a level no
    /// filter names) and a '$' first level: enough to tell any two small
    /// filters apart.
    fn small_topics() -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut frontier: Vec<String> = ["a", "b", "c", "$s"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for _ in 0..4 {
            out.extend(frontier.iter().cloned());
            frontier = frontier
                .iter()
                .flat_map(|t| ["a", "b", "c"].iter().map(move |l| format!("{t}/{l}")))
                .collect();
        }
        out
    }

    proptest! {
        #[test]
        fn a_topic_matches_itself_and_hash(topic in "[a-z]{1,4}(/[a-z]{0,4}){0,4}") {
            prop_assert!(TopicFilter::parse(&topic).expect("valid").matches(&topic));
            prop_assert!(TopicFilter::parse("#").expect("valid").matches(&topic));
        }

        #[test]
        fn plus_matches_exactly_one_level(topic in "[a-z]{1,4}(/[a-z]{1,4}){0,4}") {
            let levels = topic.split('/').count();
            let filter = vec!["+"; levels].join("/");
            prop_assert!(TopicFilter::parse(&filter).expect("valid").matches(&topic));
            let longer = format!("{filter}/+");
            prop_assert!(!TopicFilter::parse(&longer).expect("valid").matches(&topic));
        }

        #[test]
        fn overlaps_and_covers_agree_with_matches_on_every_small_topic(
            f in small_filter(),
            g in small_filter(),
        ) {
            let (f, g) = (TopicFilter::parse(&f).expect("valid"), TopicFilter::parse(&g).expect("valid"));
            let topics = small_topics();
            let both = topics.iter().any(|t| f.matches(t) && g.matches(t));
            prop_assert_eq!(f.overlaps(&g), both, "overlaps {} {}", f, g);
            prop_assert_eq!(g.overlaps(&f), both);
            let covered = topics.iter().all(|t| !g.matches(t) || f.matches(t));
            prop_assert_eq!(f.covers(&g), covered, "{} covers {}", f, g);
        }

        #[test]
        fn parsing_never_panics(s in ".{0,32}") {
            let _ = TopicFilter::parse(&s);
            let _ = TopicTemplate::parse(&s);
        }
    }
}
