//! Hashing keys: the hub's one secret key, and the key of each rule that
//! hashes, derived from it.
//!
//! Why a key per rule and not the hub's key everywhere: an agent holds the
//! key of every rule that hashes what it sends, and a gateway can be stolen.
//! With one fleet key, one stolen gateway re-identifies every pseudonym of
//! every site. With a key per rule, derived one way (HKDF-SHA256, RFC 5869)
//! from the hub's key and the rule's identity, it re-identifies only the
//! pseudonyms of the rules that applied to it, which its own data showed
//! anyway; the hub's key never leaves the hub.
//!
//! ```text
//! rule key = HKDF-SHA256(salt = "outpost-policy-hashing-v1",
//!                        ikm  = the hub's key (32 bytes),
//!                        info = "rule" || lp(name) || u32be(n) || n × (lp(label) || lp(pattern)),
//!                        L    = 32)
//! lp(s)    = u32be(len(s)) || s
//! ```
//!
//! The identity is the rule's name and its `agents` selector (labels in
//! order): what decides which agents get the key. Two rules with the same
//! name and selector share a key (they have the same scope); any other
//! change of either gives a new key, so widening a rule to more sites never
//! hands the new sites the key of the old scope's pseudonyms.

use std::collections::BTreeMap;
use std::fmt;

use super::fields::hex;

/// The salt of the derivation: names what the output keys are for.
const SALT: &[u8] = b"outpost-policy-hashing-v1";

/// The hub's hashing key: 32 secret bytes that never leave the hub.
#[derive(Clone, PartialEq, Eq)]
pub struct HashingKey([u8; 32]);

impl fmt::Debug for HashingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HashingKey({})", self.fingerprint())
    }
}

impl From<[u8; 32]> for HashingKey {
    fn from(bytes: [u8; 32]) -> HashingKey {
        HashingKey(bytes)
    }
}

impl HashingKey {
    /// The key's length in bytes.
    pub const LEN: usize = 32;

    /// The key made of exactly [`HashingKey::LEN`] bytes.
    #[must_use]
    pub fn from_bytes(bytes: &[u8]) -> Option<HashingKey> {
        <[u8; 32]>::try_from(bytes).ok().map(HashingKey)
    }

    /// The key from its 64 lowercase or uppercase hex digits.
    #[must_use]
    pub fn from_hex(text: &str) -> Option<HashingKey> {
        unhex32(text).map(HashingKey)
    }

    /// The key as 64 lowercase hex digits, for its file.
    #[must_use]
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// A name for the key that tells keys apart and reveals nothing of it:
    /// 16 hex digits of an HMAC-SHA256 under the key of a fixed text.
    #[must_use]
    pub fn fingerprint(&self) -> String {
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0);
        let tag = ring::hmac::sign(&k, b"outpost-hashing-key-fingerprint");
        hex(&tag.as_ref()[..8])
    }

    /// The key of the rule named `name` whose `agents` selector is
    /// `selector` (label name to pattern).
    #[must_use]
    pub fn derive(&self, name: &str, selector: &BTreeMap<String, String>) -> RuleKey {
        let mut info = Vec::with_capacity(64);
        info.extend_from_slice(b"rule");
        put(&mut info, name.as_bytes());
        info.extend_from_slice(
            &u32::try_from(selector.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        for (label, pattern) in selector {
            put(&mut info, label.as_bytes());
            put(&mut info, pattern.as_bytes());
        }
        let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, SALT).extract(&self.0);
        let mut out = [0u8; 32];
        // 32 bytes is far below HKDF's limit of 255 × 32, so expanding
        // cannot fail.
        let info = [info.as_slice()];
        let filled = prk
            .expand(&info, ring::hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut out));
        debug_assert!(filled.is_ok());
        RuleKey(out)
    }
}

/// Appends `bytes` with its length before it, so that no two identities
/// encode alike.
fn put(info: &mut Vec<u8>, bytes: &[u8]) {
    info.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    info.extend_from_slice(bytes);
}

fn unhex32(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The key of one rule that hashes: what an agent the rule applies to
/// receives, and what the hub hashes that rule's fields with.
#[derive(Clone, PartialEq, Eq)]
pub struct RuleKey([u8; 32]);

impl fmt::Debug for RuleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RuleKey(..)")
    }
}

impl RuleKey {
    /// The key's bytes, for the HMAC.
    pub(super) fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// The key from the 64 hex digits of a scoped document's `hash_key`.
    pub(super) fn from_hex(text: &str) -> Option<RuleKey> {
        unhex32(text).map(RuleKey)
    }

    /// The key as 64 lowercase hex digits.
    pub(super) fn to_hex(&self) -> String {
        hex(&self.0)
    }
}
