//! Durations and sizes as people write them in config and policy files: `"500ms"`, `"7d"`,
//! `"64MiB"`.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as text (`"500ms"`, `"1s"`, `"7d"`), parsed by humantime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// Parses `"500ms"`, `"1s"`, `"30d"`, `"1h 30m"`.
    pub fn parse(s: &str) -> Result<HumanDuration, String> {
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| {
                format!("invalid duration {s:?} ({e}); write it like \"500ms\", \"1s\" or \"7d\"")
            })
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HumanDuration::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A size written as text (`"64MiB"`, `"2GiB"`, `"500kB"`) or a plain number of
/// bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanSize(pub u64);

impl HumanSize {
    /// Parses `"64MiB"`, `"2 GiB"`, `"1000"`.
    pub fn parse(s: &str) -> Result<HumanSize, String> {
        s.trim()
            .parse::<bytesize::ByteSize>()
            .map(|b| HumanSize(b.as_u64()))
            .map_err(|e| format!("invalid size {s:?} ({e}); write it like \"64MiB\" or \"2GiB\""))
    }
}

impl fmt::Display for HumanSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", bytesize::ByteSize(self.0).display().iec())
    }
}

impl<'de> Deserialize<'de> for HumanSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(HumanSize(n)),
            Raw::S(s) => HumanSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for HumanSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_as_written_in_the_design() {
        assert_eq!(
            HumanDuration::parse("500ms").unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!(
            HumanDuration::parse("1s").unwrap().0,
            Duration::from_secs(1)
        );
        assert_eq!(
            HumanDuration::parse("7d").unwrap().0,
            Duration::from_secs(7 * 86400)
        );
        assert!(HumanDuration::parse("soon").is_err());
    }

    #[test]
    fn sizes_parse_binary_units() {
        assert_eq!(HumanSize::parse("64MiB").unwrap().0, 64 << 20);
        assert_eq!(HumanSize::parse("2GiB").unwrap().0, 2 << 30);
        assert_eq!(HumanSize::parse("1000").unwrap().0, 1000);
        assert!(HumanSize::parse("lots").is_err());
    }
}
