//! Data minimisation inside JSON values, addressed by JSON pointers (RFC 6901).
//!
//! Every edit is idempotent, because the hub applies the same policy again to
//! what an agent already minimised: a dropped field stays dropped, a redacted
//! one reads [`REDACTED`], a hashed one carries [`HASH_PREFIX`] and is not
//! hashed twice, and rounding a rounded number changes nothing.

use serde_json::Value as J;

/// What a redacted field reads.
pub const REDACTED: &str = "[redacted]";

/// The prefix of a hashed field: `hmac-sha256:` and 64 hex digits.
pub const HASH_PREFIX: &str = "hmac-sha256:";

/// Checks a pointer's syntax: empty (the whole document) is refused, so is
/// anything not starting with `/` or with a bad `~` escape.
pub(crate) fn check_pointer(p: &str) -> Result<(), String> {
    if p.is_empty() || !p.starts_with('/') {
        return Err(format!(
            "{p:?} is not a JSON pointer to a field; write it like \"/operator/name\""
        ));
    }
    let mut chars = p.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Err(format!("{p:?}: '~' must be followed by 0 or 1 (RFC 6901)"));
        }
    }
    Ok(())
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// The parent of the field `p` points to, and the field's last token.
fn parent_mut<'a>(doc: &'a mut J, p: &str) -> Option<(&'a mut J, String)> {
    let (parent, last) = p.rsplit_once('/')?;
    let parent = if parent.is_empty() {
        doc
    } else {
        doc.pointer_mut(parent)?
    };
    Some((parent, unescape(last)))
}

/// Removes the member; returns whether it was there. Only object members
/// are removed: removing an array element would shift the next one under
/// the same pointer, and a second pass would remove that too (redact an
/// element instead).
pub(crate) fn drop_field(doc: &mut J, p: &str) -> bool {
    match parent_mut(doc, p) {
        Some((J::Object(m), k)) => m.remove(&k).is_some(),
        _ => false,
    }
}

/// Replaces the field's value with [`REDACTED`]; returns whether it changed.
pub(crate) fn redact_field(doc: &mut J, p: &str) -> bool {
    match doc.pointer_mut(p) {
        Some(v) if v.as_str() != Some(REDACTED) => {
            *v = J::String(REDACTED.to_owned());
            true
        }
        _ => false,
    }
}

/// Whether `s` already is a keyed hash as [`keyed_hash`] writes it.
fn is_hash(s: &str) -> bool {
    s.strip_prefix(HASH_PREFIX).is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// HMAC-SHA256 of `text` under `key`, as `hmac-sha256:<hex>`.
pub(crate) fn keyed_hash(key: &[u8], text: &str) -> String {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&k, text.as_bytes());
    format!("{HASH_PREFIX}{}", hex(tag.as_ref()))
}

/// Replaces the field's value with its keyed hash (of its JSON text, or of
/// the string itself); returns whether it changed.
pub(crate) fn hash_field(doc: &mut J, p: &str, key: &[u8]) -> bool {
    match doc.pointer_mut(p) {
        Some(J::String(s)) if is_hash(s) => false,
        Some(v) => {
            let text = match &*v {
                J::String(s) => s.clone(),
                other => other.to_string(),
            };
            *v = J::String(keyed_hash(key, &text));
            true
        }
        None => false,
    }
}

/// `x` rounded to `decimals` places (half away from zero). A value with no
/// fraction left at that scale (|x·10^d| ≥ 2^52) or that is not finite is
/// returned as it is: rounding it could only move it by float error, and a
/// second pass would move it again.
pub(crate) fn round(x: f64, decimals: u8) -> f64 {
    let f = 10f64.powi(i32::from(decimals));
    let scaled = x * f;
    if !scaled.is_finite() || scaled.abs() >= 4_503_599_627_370_496.0 {
        return x;
    }
    let r = scaled.round() / f;
    if r.is_finite() {
        r
    } else {
        x
    }
}

/// Rounds the number at `p` if it is a float; returns whether it changed.
pub(crate) fn round_field(doc: &mut J, p: &str, decimals: u8) -> bool {
    let target = if p.is_empty() {
        Some(doc)
    } else {
        doc.pointer_mut(p)
    };
    round_number(target, decimals)
}

pub(crate) fn round_number(target: Option<&mut J>, decimals: u8) -> bool {
    match target {
        Some(J::Number(n)) if n.is_f64() => {
            let x = n.as_f64().unwrap_or(0.0);
            let r = round(x, decimals);
            if r.to_bits() == x.to_bits() {
                return false;
            }
            match serde_json::Number::from_f64(r) {
                Some(num) => {
                    *n = num;
                    true
                }
                None => false,
            }
        }
        _ => false,
    }
}

/// Lowercase hex, for hashes and digests.
pub(super) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}
