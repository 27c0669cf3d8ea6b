//! The audit log: who did what, when, to what, and with what result — every
//! policy applied or refused, every certificate issued, every agent first
//! seen — in the hub's store, append-only and tamper-evident.
//!
//! ```text
//! audit(id     INTEGER PRIMARY KEY,  1, 2, 3, ... without gaps
//!       ts     INTEGER NOT NULL,     Unix ns
//!       actor  TEXT NOT NULL,        operator name, or "hub"
//!       action TEXT NOT NULL,        policy.applied, policy.refused, ca.issued,
//!                                    agent.first_seen
//!       target TEXT NOT NULL,        a policy version, an agent id, a file
//!       result TEXT NOT NULL,        ok | refused
//!       detail TEXT NOT NULL,        one line for people
//!       prev   TEXT NOT NULL,        the hash of entry id - 1 (64 zeros for 1)
//!       hash   TEXT NOT NULL)        SHA-256 over prev and every field above
//! meta('audit.count') = entries written, meta('audit.head') = last hash
//!
//! hash = hex(SHA-256( prev || for each of id, ts, actor, action, target,
//!                     result, detail: decimal length ":" bytes ";" ))
//! ```
//!
//! Each entry carries the hash of the one before, so editing any field of an
//! entry breaks its own hash, and removing one breaks the chain (or the count
//! kept beside it, for the newest). `audit verify` walks the chain and names
//! the first entry that does not hold. What it cannot show is a log rewritten
//! wholesale by someone who can write the file: for that, copy the head hash
//! (`audit list --json`) somewhere else now and then and compare.
//!
//! Appends happen inside the caller's write transaction (the hub's group
//! commit, or an operator verb's), so an entry and the change it records
//! commit together, and SQLite's write lock orders concurrent appends.

use std::path::Path;

use outpost_protocols::event::Timestamp;
use rusqlite::{params, Connection, OptionalExtension as _};
use serde::Serialize;

use crate::store::error::{AtPath as _, StoreError};

/// The `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An entry to append.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// When, Unix ns.
    pub ts: Timestamp,
    /// Who: the operator, or `hub` for what the hub records itself.
    pub actor: &'a str,
    /// What: `policy.applied`, `policy.refused`, `ca.issued`,
    /// `agent.first_seen`.
    pub action: &'a str,
    /// To what.
    pub target: &'a str,
    /// `ok` or `refused`.
    pub result: &'a str,
    /// One line for people.
    pub detail: &'a str,
}

/// A stored entry, as `audit list` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
    },
    /// The first entry that does not hold, and why.
    Broken {
        /// Its id (for a removed entry, the id that is missing).
        id: u64,
        /// What is wrong with it.
        reason: String,
    },
}

fn hash(prev: &str, id: u64, e: &Entry<'_>) -> String {
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

fn meta(conn: &Connection, path: &Path, key: &str) -> Result<Option<String>, StoreError> {
    conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")
        .and_then(|mut s| s.query_row([key], |r| r.get(0)).optional())
        .at(path)
}

fn set_meta(conn: &Connection, path: &Path, key: &str, value: &str) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )
    .and_then(|mut s| s.execute(params![key, value]))
    .at(path)?;
    Ok(())
}

/// Appends `entry` inside the caller's write transaction; returns its id.
pub fn append(conn: &Connection, path: &Path, entry: &Entry<'_>) -> Result<u64, StoreError> {
    let count: u64 = meta(conn, path, "audit.count")?
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let prev = meta(conn, path, "audit.head")?.unwrap_or_else(|| GENESIS.to_owned());
    let id = count + 1;
    let h = hash(&prev, id, entry);
    conn.prepare_cached(
        "INSERT INTO audit (id, ts, actor, action, target, result, detail, prev, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )
    .and_then(|mut s| {
        s.execute(params![
            i64::try_from(id).unwrap_or(i64::MAX),
            entry.ts.0,
            entry.actor,
            entry.action,
            entry.target,
            entry.result,
            entry.detail,
            prev,
            h
        ])
    })
    .at(path)?;
    set_meta(conn, path, "audit.count", &id.to_string())?;
    set_meta(conn, path, "audit.head", &h)?;
    Ok(id)
}

/// The newest `limit` entries (all when `None`), oldest first.
pub fn list(
    conn: &Connection,
    path: &Path,
    limit: Option<usize>,
) -> Result<Vec<Record>, StoreError> {
    let limit = limit.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, ts, actor, action, target, result, detail, prev, hash FROM
               (SELECT * FROM audit ORDER BY id DESC LIMIT ?1)
             ORDER BY id",
        )
        .at(path)?;
    let rows = stmt
        .query_map([limit], |r| {
            Ok(Record {
                id: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                ts: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                target: r.get(4)?,
                result: r.get(5)?,
                detail: r.get(6)?,
                prev: r.get(7)?,
                hash: r.get(8)?,
            })
        })
        .at(path)?;
    rows.collect::<Result<Vec<_>, _>>().at(path)
}

/// Walks the whole chain and says whether it holds.
pub fn verify(conn: &Connection, path: &Path) -> Result<Verdict, StoreError> {
    let records = list(conn, path, None)?;
    let mut prev = GENESIS.to_owned();
    let mut expected = 1u64;
    for r in &records {
        if r.id != expected {
            return Ok(Verdict::Broken {
                id: expected,
                reason: format!(
                    "entry {expected} is missing: the log goes from entry {} to entry {}",
                    expected - 1,
                    r.id
                ),
            });
        }
        if r.prev != prev {
            return Ok(Verdict::Broken {
                id: r.id,
                reason: format!(
                    "entry {} does not follow the entry before it (its prev is {}, the hash before is {})",
                    r.id,
                    short(&r.prev),
                    short(&prev)
                ),
            });
        }
        let entry = Entry {
            ts: Timestamp(r.ts),
            actor: &r.actor,
            action: &r.action,
            target: &r.target,
            result: &r.result,
            detail: &r.detail,
        };
        let h = hash(&prev, r.id, &entry);
        if h != r.hash {
            return Ok(Verdict::Broken {
                id: r.id,
                reason: format!(
                    "entry {} was changed after it was written ({} {} by {}): its hash does not match its content",
                    r.id, r.action, r.target, r.actor
                ),
            });
        }
        prev = h;
        expected += 1;
    }
    let count: u64 = meta(conn, path, "audit.count")?
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let head = meta(conn, path, "audit.head")?.unwrap_or_else(|| GENESIS.to_owned());
    let entries = expected - 1;
    if count != entries || head != prev {
        return Ok(Verdict::Broken {
            id: entries + 1,
            reason: format!(
                "the log ends at entry {entries} but {count} were written (head {}): the newest entries were removed",
                short(&head)
            ),
        });
    }
    Ok(Verdict::Intact {
        entries,
        head: prev,
    })
}

fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::open_admin;

    fn log_of(n: usize) -> (tempfile::TempDir, std::path::PathBuf, Connection) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        let mut conn = open_admin(&path).expect("opens");
        for i in 0..n {
            let tx = conn.transaction().expect("tx");
            append(
                &tx,
                &path,
                &Entry {
                    ts: Timestamp(i as i64),
                    actor: "ops",
                    action: "policy.applied",
                    target: &format!("policy v{}", i + 1),
                    result: "ok",
                    detail: "from policy.toml",
                },
            )
            .expect("appends");
            tx.commit().expect("commits");
        }
        (dir, path, conn)
    }

    #[test]
    fn an_untouched_log_verifies() {
        let (_d, path, conn) = log_of(5);
        let Verdict::Intact { entries, head } = verify(&conn, &path).expect("reads") else {
            panic!("intact")
        };
        assert_eq!(entries, 5);
        assert_eq!(head, list(&conn, &path, Some(1)).expect("lists")[0].hash);
        let (_d, path, conn) = log_of(0);
        assert!(matches!(
            verify(&conn, &path).expect("reads"),
            Verdict::Intact { entries: 0, .. }
        ));
    }

    #[test]
    fn one_changed_character_is_found_and_named() {
        let (_d, path, conn) = log_of(5);
        conn.execute("UPDATE audit SET target = 'policy v4' WHERE id = 3", [])
            .expect("tampers");
        let v = verify(&conn, &path).expect("reads");
        assert!(
            matches!(&v, Verdict::Broken { id: 3, reason } if reason.contains("changed")),
            "{v:?}"
        );
        // Re-hashing the edited entry is caught by the next one's link.
        let forged = {
            let r = &list(&conn, &path, None).expect("lists")[2];
            hash(
                &r.prev,
                3,
                &Entry {
                    ts: Timestamp(r.ts),
                    actor: &r.actor,
                    action: &r.action,
                    target: &r.target,
                    result: &r.result,
                    detail: &r.detail,
                },
            )
        };
        conn.execute("UPDATE audit SET hash = ?1 WHERE id = 3", [forged])
            .expect("forges");
        let v = verify(&conn, &path).expect("reads");
        assert!(
            matches!(&v, Verdict::Broken { id: 4, reason } if reason.contains("does not follow")),
            "{v:?}"
        );
    }

    #[test]
    fn removed_entries_are_found_in_the_middle_and_at_the_end() {
        let (_d, path, conn) = log_of(5);
        conn.execute("DELETE FROM audit WHERE id = 2", [])
            .expect("removes");
        assert!(matches!(
            verify(&conn, &path).expect("reads"),
            Verdict::Broken { id: 2, .. }
        ));
        let (_d, path, conn) = log_of(5);
        conn.execute("DELETE FROM audit WHERE id = 5", [])
            .expect("removes");
        let v = verify(&conn, &path).expect("reads");
        assert!(
            matches!(&v, Verdict::Broken { id: 5, reason } if reason.contains("removed")),
            "{v:?}"
        );
    }
}
