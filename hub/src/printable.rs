//! Text that came from outside the hub, made safe to print on an operator's
//! terminal.
//!
//! Why: an agent chooses its version string, its stream names, its quality
//! reasons and (before the hub owns them) its labels; a sink's far end
//! chooses its error text. Printed raw, an ESC or a C1 CSI in one of them
//! is a terminal escape sequence: it can move the cursor, rewrite earlier
//! lines of `fleet list`, retitle the window, or on some terminals do
//! worse. A bidirectional override can make a line read differently from
//! what it holds. Every text verb passes such strings through [`printable`]
//! before printing; `--json` output needs nothing (JSON escapes control
//! characters itself) and log lines carry them as structured fields.
//!
//! Only control characters are escaped, the way Rust's `escape_debug` writes
//! them (`\n`, `\t`, `\u{1b}`); every other character, accented letters and
//! CJK and emoji included, is printed as it is. A backslash is left alone:
//! the point is what the terminal does, not a reversible encoding.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Whether `c` may change what a terminal shows beyond itself: the C0 and
/// C1 controls and DEL (Unicode category Cc), and the bidirectional
/// formatting characters (Unicode's `Bidi_Control`).
#[must_use]
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// `s` with every character [`is_unsafe`] says may not reach a terminal
/// written as an escape: `\n`, `\r`, `\t`, else `\u{hex}`. Borrowed when
/// nothing needed escaping.
#[must_use]
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_unsafe(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn escape_sequences_are_written_out_and_other_text_kept() {
        assert_eq!(
            printable("v1\u{1b}[2J\u{9b}31m\r\n\t\u{7f}"),
            "v1\\u{1b}[2J\\u{9b}31m\\r\\n\\t\\u{7f}"
        );
        assert_eq!(printable("abc\u{202e}def"), "abc\\u{202e}def");
        assert!(matches!(
            printable("Zürich 東京 🚀 a\\b"),
            Cow::Borrowed("Zürich 東京 🚀 a\\b")
        ));
    }

    proptest! {
        #[test]
        fn the_output_never_holds_a_control_character(s in any::<String>()) {
            let out = printable(&s);
            prop_assert!(!out.chars().any(is_unsafe), "{out:?}");
        }

        #[test]
        fn text_without_control_characters_is_printed_as_it_is(s in any::<String>()) {
            let clean: String = s.chars().filter(|&c| !is_unsafe(c)).collect();
            prop_assert_eq!(printable(&clean), clean.as_str());
        }

        #[test]
        fn control_characters_among_printable_ones_are_all_escaped(
            s in "([a-zé東]|[\\x00-\\x1f\\x7f-\\x9f])*"
        ) {
            let out = printable(&s);
            let escaped = s.chars().filter(|&c| is_unsafe(c)).count();
            prop_assert_eq!(out.matches('\\').count(), escaped);
        }
    }
}
