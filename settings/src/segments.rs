//! Where a TOML document's table headers are, found with the TOML lexer alone.
//!
//! A gateway's config can list 10,000 Modbus tags, one `[[modbus.devices.tags]]`
//! table each: parsed whole, the token list and the syntax tree of such a file
//! cost 30 MB at the agent's start, where the agent has to stay under 20 MB in
//! all. So the file is cut at its headers first (the lexer is an iterator and
//! allocates nothing), and the elements of an array of tables that has no
//! sub-tables are parsed one at a time, when they are deserialised.
//!
//! A `[` opens a header only at the start of a line and outside any array or
//! inline table; strings and comments are single tokens, so a `[` inside them
//! never counts.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use toml_parser::lexer::TokenKind;
use toml_parser::Source;

/// One table header and the lines after it, up to the next header.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    /// The header's key path (`["modbus", "devices", "tags"]`).
    pub(crate) path: Vec<String>,
    /// `[[path]]` rather than `[path]`.
    pub(crate) array: bool,
    /// From the start of the header's line to the start of the next header's
    /// line (or the end of the document).
    pub(crate) whole: Range<usize>,
    /// The lines after the header line: the table's keys.
    pub(crate) body: Range<usize>,
    /// Whether this element is parsed on its own, when it is deserialised:
    /// `[[path]]` where no header anywhere is `[path]` or below `path`.
    pub(crate) lazy: bool,
}

/// The headers of `text`, in order; `None` if the document is not plain
/// enough to cut (a header the lexer alone cannot read): the caller then parses
/// it whole, which also gives the right error for a broken one.
pub(crate) fn scan(text: &str) -> Option<Vec<Segment>> {
    let source = Source::new(text);
    let mut tokens = source.lex().peekable();
    let mut segments: Vec<Segment> = Vec::new();
    let mut line_start = true;
    let mut line_begin = 0;
    let mut depth: usize = 0;
    while let Some(t) = tokens.next() {
        let span = t.span();
        match t.kind() {
            TokenKind::Eof => break,
            TokenKind::Whitespace | TokenKind::Comment => {}
            TokenKind::Newline => {
                line_start = true;
                line_begin = span.end();
            }
            TokenKind::LeftSquareBracket if line_start && depth == 0 => {
                // A header: read to the end of its line.
                let mut end = span.end();
                let mut newline = None;
                for t in tokens.by_ref() {
                    match t.kind() {
                        TokenKind::Newline => {
                            newline = Some(t.span().end());
                            break;
                        }
                        TokenKind::Eof => break,
                        _ => end = t.span().end(),
                    }
                }
                let (path, array) = header_path(text.get(span.start()..end)?)?;
                let body_start = newline.unwrap_or(text.len());
                if let Some(prev) = segments.last_mut() {
                    prev.whole.end = line_begin;
                    prev.body.end = line_begin.max(prev.body.start);
                }
                segments.push(Segment {
                    path,
                    array,
                    whole: line_begin..text.len(),
                    body: body_start..text.len(),
                    lazy: false,
                });
                line_start = true;
                line_begin = body_start;
            }
            TokenKind::LeftSquareBracket | TokenKind::LeftCurlyBracket => {
                depth += 1;
                line_start = false;
            }
            TokenKind::RightSquareBracket | TokenKind::RightCurlyBracket => {
                depth = depth.saturating_sub(1);
                line_start = false;
            }
            _ => line_start = false,
        }
    }
    mark_lazy(&mut segments);
    Some(segments)
}

/// `[a.b]` → (`["a", "b"]`, false), `[[a.b]]` → (…, true): the header line
/// parsed by itself (a few bytes), so that quoted and spaced keys read as
/// TOML reads them.
fn header_path(header: &str) -> Option<(Vec<String>, bool)> {
    let mut v: toml::Table = header.parse().ok()?;
    let mut path = Vec::new();
    loop {
        if v.len() != 1 {
            return None;
        }
        let (k, child) = v.into_iter().next()?;
        path.push(k);
        match child {
            toml::Value::Table(t) if t.is_empty() => return Some((path, false)),
            toml::Value::Table(t) => v = t,
            toml::Value::Array(a) if a.len() == 1 => return Some((path, true)),
            _ => return None,
        }
    }
}

/// An array of tables is parsed element by element when no header is the
/// same path as a plain table or lies below it (its elements are then whole
/// within their own lines).
fn mark_lazy(segments: &mut [Segment]) {
    let mut not_lazy: BTreeSet<&[String]> = BTreeSet::new();
    let mut arrays: BTreeMap<&[String], ()> = BTreeMap::new();
    for s in segments.iter() {
        if s.array {
            arrays.insert(&s.path, ());
        } else {
            not_lazy.insert(&s.path);
        }
        for n in 1..s.path.len() {
            not_lazy.insert(&s.path[..n]);
        }
    }
    let lazy: BTreeSet<Vec<String>> = arrays
        .keys()
        .filter(|p| !not_lazy.contains(*p))
        .map(|p| p.to_vec())
        .collect();
    for s in segments.iter_mut() {
        s.lazy = s.array && lazy.contains(&s.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(text: &str) -> Vec<(String, bool, bool)> {
        scan(text)
            .expect("scans")
            .into_iter()
            .map(|s| (s.path.join("."), s.array, s.lazy))
            .collect()
    }

    #[test]
    fn headers_only_at_line_starts_outside_values() {
        let text = "a = [\n[1, 2],\n[3]\n]\ns = \"\"\"\n[not.a.header]\n\"\"\"\n# [nor.this]\n  [t] # c\nx = 1\n[[d]]\n[[d.e]]\ny = { z = [\n1] }\n[[\"q.r\" . s]]\n";
        assert_eq!(
            paths(text),
            vec![
                ("t".into(), false, false),
                ("d".into(), true, false),
                ("d.e".into(), true, true),
                ("q.r.s".into(), true, true),
            ]
        );
    }

    #[test]
    fn segments_cover_the_lines_after_their_header() {
        let text = "top = 1\n[a]\nx = 1\n\n[[b]]\ny = 2\n";
        let s = scan(text).expect("scans");
        assert_eq!(&text[s[0].whole.clone()], "[a]\nx = 1\n\n");
        assert_eq!(&text[s[0].body.clone()], "x = 1\n\n");
        assert_eq!(&text[s[1].body.clone()], "y = 2\n");
        assert!(s[1].lazy);
    }

    #[test]
    fn an_array_with_a_plain_table_of_its_path_is_not_lazy() {
        assert_eq!(
            paths("[[a]]\n[a.b]\n[[c]]\n[c]\n"),
            vec![
                ("a".into(), true, false),
                ("a.b".into(), false, false),
                ("c".into(), true, false),
                ("c".into(), false, false),
            ]
        );
    }

    #[test]
    fn a_broken_header_is_left_to_the_whole_parse() {
        assert!(scan("[a\nx = 1\n").is_none());
        assert!(scan("[a.b] = 1\n").is_none());
    }
}
