//! TOML text plus `OUTPOST_SECTION__KEY` overrides, deserialised into a
//! binary's own types.
//!
//! This is pure (text and a map in, a value or an error out): each binary reads
//! its file and passes its environment, so tests never touch the process's.

use serde::de::DeserializeOwned;

use crate::segments::{scan, Segment};
use crate::tree::{line_col, Node, NodeDe};

/// Parses `text` as TOML, applies the `OUTPOST_<SECTION>__<KEY>` variables of
/// `env` whose section is one of `sections`, and deserialises the result.
///
/// Variables of other sections are ignored: the agent and the hub share the
/// prefix and may share an environment. The error is one line naming the key.
///
/// The document never exists whole as a tree: the elements of an array of
/// tables without sub-tables (`[[modbus.devices.tags]]`) are parsed one at a
/// time as they are deserialised, so a file of 10,000 tags costs little more
/// than the typed result (see `segments`).
pub fn parse<T: DeserializeOwned>(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
    sections: &[&str],
) -> Result<T, String> {
    let mut root = skeleton(text)?;
    for (var, value) in env {
        let Some(path) = var
            .strip_prefix("OUTPOST_")
            .filter(|rest| {
                rest.split_once("__").is_some_and(|(section, _)| {
                    sections.iter().any(|s| s.eq_ignore_ascii_case(section))
                })
            })
            .map(|rest| rest.to_lowercase())
        else {
            continue;
        };
        let keys: Vec<&str> = path.split("__").collect();
        set(&mut root, &keys, Node::Env { var, value });
    }
    T::deserialize(NodeDe { node: root, text }).map_err(|e| {
        let path = e.path();
        let mut message = one_line(&e.message);
        if !path.is_empty() {
            message = format!("{message} for key `{path}`");
        }
        if let Some(var) = e.var {
            message = format!("{message} (from the environment variable {var})");
        }
        message
    })
}

/// The document with the lazy array elements left as spans.
fn skeleton(text: &str) -> Result<Node, String> {
    let whole = |text: &str| {
        text.parse::<toml::Table>()
            .map(|t| Node::Toml(toml::Value::Table(t)))
            .map_err(|e| one_line(&e.to_string()))
    };
    let Some(segments) = scan(text).filter(|s| s.iter().any(|s| s.lazy)) else {
        return whole(text);
    };
    // The rest of the document, with each lazy element's lines left empty so
    // that the parser's line numbers stay those of the file.
    let mut rest = String::new();
    let mut at = 0;
    for s in segments.iter().filter(|s| s.lazy) {
        rest.push_str(&text[at..s.whole.start]);
        rest.extend(text[s.whole.clone()].matches('\n'));
        at = s.whole.end;
    }
    rest.push_str(&text[at..]);
    let mut root = whole(&rest)?;
    drop(rest);
    attach(&mut root, text, &segments)?;
    Ok(root)
}

/// Puts each lazy element where its header puts it: the array at its path in
/// the table that the path names, through the last element (so far in the
/// document) of each array of tables on the way.
fn attach(root: &mut Node, text: &str, segments: &[Segment]) -> Result<(), String> {
    let mut seen: std::collections::HashMap<&[String], usize> = Default::default();
    for s in segments {
        if s.lazy {
            let clash = |what: &str| {
                let (line, _) = line_col(text, s.whole.start);
                format!(
                    "TOML parse error at line {line}: [[{}]] {what}",
                    s.path.join(".")
                )
            };
            let mut node = &mut *root;
            for (i, key) in s.path.iter().enumerate() {
                let table = node.as_table().ok_or_else(|| {
                    clash(&format!("extends `{key}`'s parent, which is not a table"))
                })?;
                let last = i + 1 == s.path.len();
                let child = table.entry(key.clone()).or_insert_with(|| {
                    if last {
                        Node::Array(Vec::new())
                    } else {
                        Node::Toml(toml::Value::Table(toml::Table::new()))
                    }
                });
                if last {
                    match child {
                        Node::Array(a) if a.iter().all(|n| matches!(n, Node::Lazy(_))) => {
                            a.push(Node::Lazy(s.body.clone()));
                        }
                        _ => return Err(clash("extends a key that is already defined")),
                    }
                    break;
                }
                node = if child.as_array().is_some() {
                    let n = seen.get(&s.path[..=i]).copied().unwrap_or(0);
                    child
                        .as_array()
                        .and_then(|a| a.get_mut(n.checked_sub(1)?))
                        .ok_or_else(|| {
                            clash(&format!(
                                "extends `{key}`, an array not made of [[{key}]] tables"
                            ))
                        })?
                } else {
                    child
                };
            }
        }
        if s.array {
            *seen.entry(&s.path).or_default() += 1;
        }
    }
    Ok(())
}

/// Sets `keys` in `node` to `value`, making tables on the way; a value in the
/// way is replaced by a table (and the type check then names the key).
fn set(node: &mut Node, keys: &[&str], value: Node) {
    let Some((first, rest)) = keys.split_first() else {
        *node = value;
        return;
    };
    if node.as_table().is_none() {
        *node = Node::Table(Default::default());
    }
    let Some(table) = node.as_table() else {
        return;
    };
    let child = table
        .entry((*first).to_owned())
        .or_insert_with(|| Node::Table(Default::default()));
    set(child, rest, value);
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

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Plant {
        name: String,
        #[serde(default)]
        devices: Vec<Device>,
        #[serde(default)]
        notes: Vec<Note>,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Device {
        name: String,
        #[serde(default)]
        tags: Vec<Tag>,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Tag {
        name: String,
        address: u16,
    }

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Note {
        text: String,
    }

    const PLANT: &str = "name = \"p\"\n[[devices]]\nname = \"a\"\n[[devices.tags]]\nname = \"t0\"\naddress = 0\n\n[[notes]]\ntext = \"x\"\n[[devices.tags]] # a comment\nname = \"t1\"\naddress = 1\n[[devices]]\nname = \"b\"\n[[devices.tags]]\nname = \"t2\"\naddress = 2\n";

    #[test]
    fn element_by_element_reads_as_the_whole_document() {
        let ours: Plant = parse(PLANT, Vec::new(), &[]).expect("parses");
        let whole: Plant = toml::from_str(PLANT).expect("toml parses");
        assert_eq!(ours, whole);
        assert_eq!(ours.devices[0].tags.len(), 2);
        assert_eq!(ours.devices[1].tags[0].name, "t2");
    }

    #[test]
    fn an_error_in_an_element_names_its_line_in_the_file_and_the_key() {
        let text = PLANT.replace("address = 2", "address = \"two\"");
        let e = parse::<Plant>(&text, Vec::new(), &[]).expect_err("a string address");
        assert!(e.contains("line 17, column 11"), "{e}");
        assert!(e.contains("devices[1].tags[0].address"), "{e}");
        let text = PLANT.replace("address = 1\n", "adress = 1\n");
        let e = parse::<Plant>(&text, Vec::new(), &[]).expect_err("an unknown key");
        assert!(
            e.contains("adress") && e.contains("devices[0].tags[1]"),
            "{e}"
        );
        let text = PLANT.replace("address = 0\n", "address = [0\n");
        let e = parse::<Plant>(&text, Vec::new(), &[]).expect_err("broken TOML");
        assert!(
            e.contains("line 8") && e.contains("devices[0].tags[0]"),
            "{e}"
        );
    }

    #[test]
    fn an_array_of_tables_that_clashes_with_a_key_is_refused() {
        let text = PLANT.replace("name = \"b\"\n", "name = \"b\"\ntags = []\n");
        let e = parse::<Plant>(&text, Vec::new(), &[]).expect_err("tags twice");
        assert!(e.contains("devices.tags"), "{e}");
        assert!(toml::from_str::<Plant>(&text).is_err());
    }

    #[test]
    fn environment_values_take_the_type_the_key_wants() {
        let d: Doc = parse(
            "[a]\nx = 1\n",
            env(&[("OUTPOST_A__X", " 7"), ("OUTPOST_A__Y", "007")]),
            &["a"],
        )
        .expect("parses");
        assert_eq!((d.a.x, d.a.y.as_deref()), (7, Some("007")));
        let e = parse::<Doc>("[a]\nx = 1\n", env(&[("OUTPOST_A__X", "seven")]), &["a"])
            .expect_err("not a number");
        assert!(e.contains("a.x") && e.contains("OUTPOST_A__X"), "{e}");
    }

    #[test]
    fn toml_errors_are_one_line() {
        let e = parse::<Doc>("[a\nx = 1", Vec::new(), &["a"]).expect_err("invalid");
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("line 1"), "{e}");
    }
}
