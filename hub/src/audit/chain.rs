//! One audit entry's place in the chain: its hash, its signature, and the
//! walk that checks a whole log against a public key and an anchor.
//!
//! ```text
//! hash = hex(SHA-256( prev || for each of id, ts, actor, action, target,
//!                     result, detail: decimal length ":" bytes ";" ))
//! prev = the hash of entry id - 1 (64 zeros for entry 1)
//! sig  = the key's signature of hash (see `key`); absent on entries written
//!        before the hub had a key, and only there
//! anchor = "ID:HASH", an entry's id and hash copied somewhere else
//! ```
//!
//! The rules a log must keep, in the order [`Walk`] checks them: ids run 1,
//! 2, 3 without gaps; each `prev` is the hash before; each hash matches its
//! content; once an entry is signed every later one is, and each signature
//! verifies; the anchor's entry is there with the anchor's hash.

use outpost_protocols::event::Timestamp;
use serde::{Deserialize, Serialize};

use super::key::{AuditKey, PublicKey};

/// The `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An entry to append.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// When, Unix ns.
    pub ts: Timestamp,
    /// Who: the operator, or `hub` for what the hub records itself.
    pub actor: &'a str,
    /// What: `policy.applied`, `policy.refused`, `policy.tampered`,
    /// `ca.issued`, `agent.first_seen`, ...
    pub action: &'a str,
    /// To what.
    pub target: &'a str,
    /// `ok` or `refused`.
    pub result: &'a str,
    /// One line for people.
    pub detail: &'a str,
}

/// A stored entry, as `audit list` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Its position, from 1.
    pub id: u64,
    /// When, Unix ns.
    pub ts: i64,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// To what.
    pub target: String,
    /// `ok` or `refused`.
    pub result: String,
    /// For people.
    pub detail: String,
    /// The hash of the entry before.
    pub prev: String,
    /// This entry's hash.
    pub hash: String,
    /// The hub's signature of `hash` (hex); `None` on entries from before
    /// the hub signed.
    #[serde(default)]
    pub sig: Option<String>,
}

impl Record {
    /// The entry as appended.
    pub fn entry(&self) -> Entry<'_> {
        Entry {
            ts: Timestamp(self.ts),
            actor: &self.actor,
            action: &self.action,
            target: &self.target,
            result: &self.result,
            detail: &self.detail,
        }
    }

    /// Whether the entry's own hash matches its content and `prev`.
    pub fn hash_holds(&self) -> bool {
        hash(&self.prev, self.id, &self.entry()) == self.hash
    }
}

/// The record of `entry` as entry `id` after the entry whose hash is `prev`,
/// hashed and signed with `key`.
pub fn seal(prev: &str, id: u64, entry: &Entry<'_>, key: &AuditKey) -> Record {
    let h = hash(prev, id, entry);
    Record {
        id,
        ts: entry.ts.0,
        actor: entry.actor.to_owned(),
        action: entry.action.to_owned(),
        target: entry.target.to_owned(),
        result: entry.result.to_owned(),
        detail: entry.detail.to_owned(),
        prev: prev.to_owned(),
        sig: Some(key.sign(&h)),
        hash: h,
    }
}

/// The chain hash of `entry` as entry `id` after `prev`.
pub fn hash(prev: &str, id: u64, e: &Entry<'_>) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(prev.as_bytes());
    let ts = e.ts.0.to_string();
    let id = id.to_string();
    for field in [
        id.as_str(),
        ts.as_str(),
        e.actor,
        e.action,
        e.target,
        e.result,
        e.detail,
    ] {
        ctx.update(field.len().to_string().as_bytes());
        ctx.update(b":");
        ctx.update(field.as_bytes());
        ctx.update(b";");
    }
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An entry's id and hash, kept somewhere the log's writers cannot reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// The entry's id.
    pub id: u64,
    /// Its hash.
    pub hash: String,
}

impl Anchor {
    /// Parses `ID:HASH` (as `audit anchor` prints it).
    pub fn parse(s: &str) -> Result<Anchor, String> {
        let (id, hash) = s
            .trim()
            .split_once(':')
            .ok_or_else(|| format!("{s:?} is not ID:HASH"))?;
        let id: u64 = id
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{id:?} is not an entry id (1, 2, ...)"))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{hash:?} is not a hash (64 hex characters)"));
        }
        Ok(Anchor {
            id,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

impl std::fmt::Display for Anchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.id, self.hash)
    }
}

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Verdict {
    /// Every entry holds.
    Intact {
        /// Entries checked.
        entries: u64,
        /// The last hash.
        head: String,
        /// The first signed entry (the ones before it are unsigned, written
        /// before the hub had a key); `None` when none is signed.
        first_signed: Option<u64>,
        /// The anchor checked, if one was given.
        anchor: Option<String>,
    },
    /// The first entry that does not hold, and why.
    Broken {
        /// Its id (for a removed entry, the id that is missing).
        id: u64,
        /// What is wrong with it.
        reason: String,
    },
}

/// The first entry that does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// Its id (for a removed entry, the id that is missing).
    pub id: u64,
    /// What is wrong with it.
    pub reason: String,
}

impl From<Broken> for Verdict {
    fn from(b: Broken) -> Verdict {
        Verdict::Broken {
            id: b.id,
            reason: b.reason,
        }
    }
}

/// A walk over a log, oldest entry first: feed each record to
/// [`Walk::next`], then call [`Walk::finish`].
#[derive(Debug)]
pub struct Walk<'a> {
    key: &'a PublicKey,
    anchor: Option<&'a Anchor>,
    prev: String,
    expected: u64,
    first_signed: Option<u64>,
    anchor_seen: bool,
}

impl<'a> Walk<'a> {
    /// A walk that checks signatures with `key` and, if given, `anchor`.
    pub fn new(key: &'a PublicKey, anchor: Option<&'a Anchor>) -> Walk<'a> {
        Walk {
            key,
            anchor,
            prev: GENESIS.to_owned(),
            expected: 1,
            first_signed: None,
            anchor_seen: false,
        }
    }

    /// Checks the next record.
    pub fn next(&mut self, r: &Record) -> Result<(), Broken> {
        let broken = |id, reason| Err(Broken { id, reason });
        let expected = self.expected;
        if r.id != expected {
            return broken(
                expected,
                format!(
                    "entry {expected} is missing: the log goes from entry {} to entry {}",
                    expected - 1,
                    r.id
                ),
            );
        }
        if r.prev != self.prev {
            return broken(
                r.id,
                format!(
                    "entry {} does not follow the entry before it (its prev is {}, the hash before is {})",
                    r.id,
                    short(&r.prev),
                    short(&self.prev)
                ),
            );
        }
        if !r.hash_holds() {
            return broken(
                r.id,
                format!(
                    "entry {} was changed after it was written ({} {} by {}): its hash does not match its content",
                    r.id, r.action, r.target, r.actor
                ),
            );
        }
        match (&r.sig, self.first_signed) {
            (Some(sig), _) => {
                if !self.key.verifies(&r.hash, sig) {
                    return broken(
                        r.id,
                        format!(
                            "entry {}'s signature does not verify with the audit public key {} ({} {} by {}): the entry or its signature was forged",
                            r.id,
                            self.key.fingerprint(),
                            r.action,
                            r.target,
                            r.actor
                        ),
                    );
                }
                self.first_signed.get_or_insert(r.id);
            }
            (None, Some(first)) => {
                return broken(
                    r.id,
                    format!(
                        "entry {} has no signature, but every entry from {first} on must have one ({} {} by {})",
                        r.id, r.action, r.target, r.actor
                    ),
                );
            }
            (None, None) => {}
        }
        if let Some(a) = self.anchor {
            if a.id == r.id {
                if a.hash != r.hash {
                    return broken(
                        r.id,
                        format!(
                            "entry {} is not the anchored one: its hash is {}, the anchor's {}: the log was rewritten from here or before",
                            r.id,
                            short(&r.hash),
                            short(&a.hash)
                        ),
                    );
                }
                self.anchor_seen = true;
            }
        }
        self.prev = r.hash.clone();
        self.expected += 1;
        Ok(())
    }

    /// The hash of the last entry checked (the genesis hash before any).
    pub fn head(&self) -> &str {
        &self.prev
    }

    /// Entries checked.
    pub fn entries(&self) -> u64 {
        self.expected - 1
    }

    /// After the last record: the anchor must have been met.
    pub fn finish(self) -> Verdict {
        let entries = self.entries();
        if let Some(a) = self.anchor {
            if !self.anchor_seen {
                return Verdict::Broken {
                    id: a.id,
                    reason: format!(
                        "the anchored entry {} is missing: the log ends at entry {entries}, so its newest entries were cut off",
                        a.id
                    ),
                };
            }
        }
        Verdict::Intact {
            entries,
            head: self.prev,
            first_signed: self.first_signed,
            anchor: self.anchor.map(ToString::to_string),
        }
    }
}

/// The first 12 characters of a hash, for messages.
pub fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

/// Walks `records` (oldest first) with `key` and `anchor`: the verdict of
/// the whole chain.
pub fn walk(records: &[Record], key: &PublicKey, anchor: Option<&Anchor>) -> Verdict {
    let mut w = Walk::new(key, anchor);
    for r in records {
        if let Err(b) = w.next(r) {
            return b.into();
        }
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(n: u64, key: &AuditKey, unsigned_first: u64) -> Vec<Record> {
        let mut prev = GENESIS.to_owned();
        (1..=n)
            .map(|id| {
                let target = format!("policy v{id}");
                let e = Entry {
                    ts: Timestamp(id as i64),
                    actor: "ops",
                    action: "policy.applied",
                    target: &target,
                    result: "ok",
                    detail: "from a.toml",
                };
                let mut r = seal(&prev, id, &e, key);
                if id <= unsigned_first {
                    r.sig = None;
                }
                prev = r.hash.clone();
                r
            })
            .collect()
    }

    fn walk(records: &[Record], key: &PublicKey, anchor: Option<&Anchor>) -> Verdict {
        let mut w = Walk::new(key, anchor);
        for r in records {
            if let Err(b) = w.next(r) {
                return b.into();
            }
        }
        w.finish()
    }

    #[test]
    fn a_signed_log_verifies_and_unsigned_entries_before_the_first_signed_are_named() {
        let k = AuditKey::generate().expect("key");
        let v = walk(&log(5, &k, 2), &k.public_key(), None);
        assert!(
            matches!(
                v,
                Verdict::Intact {
                    entries: 5,
                    first_signed: Some(3),
                    ..
                }
            ),
            "{v:?}"
        );
        let v = walk(&log(0, &k, 0), &k.public_key(), None);
        assert!(matches!(
            v,
            Verdict::Intact {
                entries: 0,
                first_signed: None,
                ..
            }
        ));
    }

    #[test]
    fn a_missing_or_forged_signature_after_the_first_signed_one_breaks_the_log() {
        let k = AuditKey::generate().expect("key");
        let mut l = log(5, &k, 0);
        l[3].sig = None;
        let v = walk(&l, &k.public_key(), None);
        assert!(
            matches!(&v, Verdict::Broken { id: 4, reason } if reason.contains("no signature")),
            "{v:?}"
        );
        let mut l = log(5, &k, 0);
        let other = AuditKey::generate().expect("key");
        l[2].sig = Some(other.sign(&l[2].hash));
        let v = walk(&l, &k.public_key(), None);
        assert!(
            matches!(&v, Verdict::Broken { id: 3, reason } if reason.contains("does not verify")),
            "{v:?}"
        );
        // Another key's public key refuses every signed entry.
        let v = walk(&log(2, &k, 0), &other.public_key(), None);
        assert!(matches!(v, Verdict::Broken { id: 1, .. }), "{v:?}");
    }

    #[test]
    fn an_entry_edited_and_rehashed_with_a_forged_chain_fails_its_signature() {
        let k = AuditKey::generate().expect("key");
        let mut l = log(3, &k, 0);
        // Rewrite entry 2 and every hash after it, as someone without the
        // key can: the chain holds, the signatures do not.
        l[1].actor = "nobody".into();
        let mut prev = l[0].hash.clone();
        for r in &mut l[1..] {
            r.prev = prev.clone();
            r.hash = hash(&prev, r.id, &r.entry());
            prev = r.hash.clone();
        }
        let v = walk(&l, &k.public_key(), None);
        assert!(
            matches!(&v, Verdict::Broken { id: 2, reason } if reason.contains("signature")),
            "{v:?}"
        );
    }

    #[test]
    fn an_anchor_catches_a_cut_tail_and_a_rewritten_entry() {
        let k = AuditKey::generate().expect("key");
        let l = log(5, &k, 0);
        let anchor = Anchor::parse(&format!("5:{}", l[4].hash)).expect("anchor");
        assert!(matches!(
            walk(&l, &k.public_key(), Some(&anchor)),
            Verdict::Intact {
                anchor: Some(_),
                ..
            }
        ));
        let v = walk(&l[..3], &k.public_key(), Some(&anchor));
        assert!(
            matches!(&v, Verdict::Broken { id: 5, reason } if reason.contains("cut off")),
            "{v:?}"
        );
        let other = Anchor::parse(&format!("4:{}", l[4].hash)).expect("anchor");
        let v = walk(&l, &k.public_key(), Some(&other));
        assert!(
            matches!(&v, Verdict::Broken { id: 4, reason } if reason.contains("anchor")),
            "{v:?}"
        );
    }

    #[test]
    fn anchors_parse_only_as_id_colon_hash() {
        let h = "a".repeat(64);
        assert_eq!(
            Anchor::parse(&format!("7:{h}")),
            Ok(Anchor {
                id: 7,
                hash: h.clone()
            })
        );
        for bad in [
            "7",
            "x:aa",
            &format!("0:{h}"),
            "7:abc",
            &format!("7:{}", "g".repeat(64)),
        ] {
            assert!(Anchor::parse(bad).is_err(), "{bad}");
        }
    }
}
