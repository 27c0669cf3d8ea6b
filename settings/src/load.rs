//! TOML text plus `OUTPOST_SECTION__KEY` overrides, deserialised into a
//! binary's own types.
//!
//! This is pure (text and a map in, a value or an error out): each binary reads
//! its file and passes its environment, so tests never touch the process's.

use serde::de::DeserializeOwned;

/// Parses `text` as TOML, applies the `OUTPOST_<SECTION>__<KEY>` variables of
/// `env` whose section is one of `sections`, and deserialises the result.
///
/// Variables of other sections are ignored: the agent and the hub share the
/// prefix and may share an environment. The error is one line naming the key.
pub fn parse<T: DeserializeOwned>(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
    sections: &[&str],
) -> Result<T, String> {
    let env: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| {
            k.strip_prefix("OUTPOST_")
                .and_then(|rest| rest.split_once("__"))
                .is_some_and(|(section, _)| {
                    sections.iter().any(|s| s.eq_ignore_ascii_case(section))
                })
        })
        .collect();
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix("OUTPOST")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(env)),
        )
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| one_line(&e.to_string()))
}

/// Folds a parser's multi-line message (TOML errors quote the offending line
/// with a caret) into one line, as the command-line contract wants.
pub fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| {
            let rest = l.trim_start_matches(|c: char| c.is_ascii_digit() || c == ' ');
            !l.is_empty() && !rest.starts_with('|')
        })
        .collect::<Vec<_>>()
        .join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        a: Section,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Section {
        x: u32,
        #[serde(default)]
        y: Option<String>,
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn overrides_apply_to_known_sections_only() {
        let d: Doc = parse(
            "[a]\nx = 1\n",
            env(&[("OUTPOST_A__X", "5"), ("OUTPOST_B__Z", "9"), ("OTHER", "1")]),
            &["a"],
        )
        .expect("parses");
        assert_eq!(d.a.x, 5);
        assert!(d.a.y.is_none());
    }

    #[test]
    fn unknown_keys_in_known_sections_are_errors() {
        let e = parse::<Doc>("[a]\nx = 1\n", env(&[("OUTPOST_A__W", "5")]), &["a"])
            .expect_err("unknown");
        assert!(e.contains('w'), "{e}");
    }

    #[test]
    fn toml_errors_are_one_line() {
        let e = parse::<Doc>("[a\nx = 1", Vec::new(), &["a"]).expect_err("invalid");
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("line 1"), "{e}");
    }
}
