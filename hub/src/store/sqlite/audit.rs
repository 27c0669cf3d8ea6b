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
//!       hash   TEXT NOT NULL,        SHA-256 over prev and every field above
//!       sig    TEXT NULL)            the hub's Ed25519 signature of hash
//!                                    (schema 4; NULL before the upgrade)
//! meta('audit.count') = entries written, meta('audit.head') = last hash
//! ```
//!
//! The hash and the signature are `crate::audit::chain`'s. Each entry carries
//! the hash of the one before, so editing any field of an entry breaks its
//! own hash, and removing one breaks the chain (or the count kept beside it,
//! for the newest); re-hashing an edited chain breaks the signatures, which
//! need the key. `audit verify` walks the chain and names the first entry
//! that does not hold. What it cannot show alone is a tail cut with `meta`
//! rewritten: that takes an anchor kept elsewhere (`audit anchor`,
//! `audit verify --anchor`).
//!
//! Appends happen inside the caller's write transaction (the hub's group
//! commit, or an operator verb's), so an entry and the change it records
//! commit together, and SQLite's write lock orders concurrent appends.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension as _};

use crate::audit::chain::{self, Walk};
pub use crate::audit::chain::{Anchor, Entry, Record, Verdict, GENESIS};
use crate::audit::key::{AuditKey, PublicKey};
use crate::store::error::{AtPath as _, StoreError};

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

/// Appends `entry`, signed with `key`, inside the caller's write
/// transaction; returns its id.
pub fn append(
    conn: &Connection,
    path: &Path,
    key: &AuditKey,
    entry: &Entry<'_>,
) -> Result<u64, StoreError> {
    let count: u64 = meta(conn, path, "audit.count")?
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let prev = meta(conn, path, "audit.head")?.unwrap_or_else(|| GENESIS.to_owned());
    let id = count + 1;
    let r = chain::seal(&prev, id, entry, key);
    conn.prepare_cached(
        "INSERT INTO audit (id, ts, actor, action, target, result, detail, prev, hash, sig)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )
    .and_then(|mut s| {
        s.execute(params![
            i64::try_from(id).unwrap_or(i64::MAX),
            r.ts,
            r.actor,
            r.action,
            r.target,
            r.result,
            r.detail,
            r.prev,
            r.hash,
            r.sig
        ])
    })
    .at(path)?;
    set_meta(conn, path, "audit.count", &id.to_string())?;
    set_meta(conn, path, "audit.head", &r.hash)?;
    Ok(id)
}

const COLUMNS: &str = "id, ts, actor, action, target, result, detail, prev, hash, sig";

fn record(r: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
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
        sig: r.get(9)?,
    })
}

/// The newest `limit` entries (all when `None`), oldest first.
pub fn list(
    conn: &Connection,
    path: &Path,
    limit: Option<usize>,
) -> Result<Vec<Record>, StoreError> {
    let limit = limit.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM
               (SELECT * FROM audit ORDER BY id DESC LIMIT ?1)
             ORDER BY id"
        ))
        .at(path)?;
    let rows = stmt.query_map([limit], record).at(path)?;
    rows.collect::<Result<Vec<_>, _>>().at(path)
}

/// The newest `action` entry about `target` (`policy.applied`, `policy v3`).
pub fn find(
    conn: &Connection,
    path: &Path,
    action: &str,
    target: &str,
) -> Result<Option<Record>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM audit WHERE action = ?1 AND target = ?2 ORDER BY id DESC LIMIT 1"
    ))
    .and_then(|mut s| s.query_row([action, target], record).optional())
    .at(path)
}

/// The id of the first signed entry, if any: entries before it were written
/// before the hub had a key.
pub fn first_signed(conn: &Connection, path: &Path) -> Result<Option<u64>, StoreError> {
    let id: Option<i64> = conn
        .query_row("SELECT min(id) FROM audit WHERE sig IS NOT NULL", [], |r| {
            r.get(0)
        })
        .at(path)?;
    Ok(id.and_then(|i| u64::try_from(i).ok()))
}

/// Walks the whole chain, checking every signature with `key` and, if
/// given, that `anchor`'s entry is there with its hash; says whether it
/// holds.
pub fn verify(
    conn: &Connection,
    path: &Path,
    key: &PublicKey,
    anchor: Option<&Anchor>,
) -> Result<Verdict, StoreError> {
    let records = list(conn, path, None)?;
    let mut walk = Walk::new(key, anchor);
    for r in &records {
        if let Err(b) = walk.next(r) {
            return Ok(b.into());
        }
    }
    let count: u64 = meta(conn, path, "audit.count")?
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let head = meta(conn, path, "audit.head")?.unwrap_or_else(|| GENESIS.to_owned());
    let entries = walk.entries();
    if count != entries || head != walk.head() {
        return Ok(Verdict::Broken {
            id: entries + 1,
            reason: format!(
                "the log ends at entry {entries} but {count} were written (head {}): the newest entries were removed",
                chain::short(&head)
            ),
        });
    }
    Ok(walk.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::open_admin;
    use outpost_protocols::event::Timestamp;

    fn log_of(n: usize) -> (tempfile::TempDir, std::path::PathBuf, Connection, AuditKey) {
        let key = AuditKey::generate().expect("key");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        let mut conn = open_admin(&path).expect("opens");
        for i in 0..n {
            let tx = conn.transaction().expect("tx");
            append(
                &tx,
                &path,
                &key,
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
        (dir, path, conn, key)
    }

    fn check(conn: &Connection, path: &Path, key: &AuditKey) -> Verdict {
        verify(conn, path, &key.public_key(), None).expect("reads")
    }

    #[test]
    fn an_untouched_log_verifies() {
        let (_d, path, conn, key) = log_of(5);
        let Verdict::Intact {
            entries,
            head,
            first_signed,
            ..
        } = check(&conn, &path, &key)
        else {
            panic!("intact")
        };
        assert_eq!((entries, first_signed), (5, Some(1)));
        assert_eq!(head, list(&conn, &path, Some(1)).expect("lists")[0].hash);
        let (_d, path, conn, key) = log_of(0);
        assert!(matches!(
            check(&conn, &path, &key),
            Verdict::Intact { entries: 0, .. }
        ));
    }

    #[test]
    fn one_changed_character_is_found_and_named() {
        let (_d, path, conn, key) = log_of(5);
        conn.execute("UPDATE audit SET target = 'policy v4' WHERE id = 3", [])
            .expect("tampers");
        let v = check(&conn, &path, &key);
        assert!(
            matches!(&v, Verdict::Broken { id: 3, reason } if reason.contains("changed")),
            "{v:?}"
        );
        // Re-hashing the edited entry is caught by its signature.
        let forged = {
            let r = &list(&conn, &path, None).expect("lists")[2];
            chain::hash(&r.prev, 3, &r.entry())
        };
        conn.execute("UPDATE audit SET hash = ?1 WHERE id = 3", [forged])
            .expect("forges");
        let v = check(&conn, &path, &key);
        assert!(
            matches!(&v, Verdict::Broken { id: 3, reason } if reason.contains("signature")),
            "{v:?}"
        );
    }

    #[test]
    fn an_edited_signature_is_found() {
        let (_d, path, conn, key) = log_of(3);
        conn.execute(
            "UPDATE audit SET sig = substr(sig, 1, 10) || (CASE substr(sig, 11, 1) WHEN '0' THEN '1' ELSE '0' END) || substr(sig, 12) WHERE id = 2",
            [],
        )
        .expect("tampers");
        let v = check(&conn, &path, &key);
        assert!(
            matches!(&v, Verdict::Broken { id: 2, reason } if reason.contains("signature")),
            "{v:?}"
        );
    }

    #[test]
    fn entries_from_before_the_upgrade_verify_as_unsigned_and_only_before_the_first_signed() {
        let (_d, path, conn, key) = log_of(4);
        conn.execute("UPDATE audit SET sig = NULL WHERE id <= 2", [])
            .expect("as before the upgrade");
        assert_eq!(first_signed(&conn, &path).expect("reads"), Some(3));
        assert!(matches!(
            check(&conn, &path, &key),
            Verdict::Intact {
                first_signed: Some(3),
                ..
            }
        ));
        conn.execute("UPDATE audit SET sig = NULL WHERE id = 4", [])
            .expect("strips");
        let v = check(&conn, &path, &key);
        assert!(
            matches!(&v, Verdict::Broken { id: 4, reason } if reason.contains("no signature")),
            "{v:?}"
        );
    }

    #[test]
    fn a_tail_cut_with_meta_rewritten_passes_alone_and_fails_against_an_anchor() {
        let (_d, path, conn, key) = log_of(5);
        let newest = list(&conn, &path, Some(1)).expect("lists").remove(0);
        let anchor = Anchor {
            id: newest.id,
            hash: newest.hash,
        };
        conn.execute_batch(
            "DELETE FROM audit WHERE id > 3;
             UPDATE meta SET value = '3' WHERE key = 'audit.count';
             UPDATE meta SET value = (SELECT hash FROM audit WHERE id = 3) WHERE key = 'audit.head';",
        )
        .expect("cuts");
        assert!(matches!(
            check(&conn, &path, &key),
            Verdict::Intact { entries: 3, .. }
        ));
        let v = verify(&conn, &path, &key.public_key(), Some(&anchor)).expect("reads");
        assert!(
            matches!(&v, Verdict::Broken { id: 5, reason } if reason.contains("cut off")),
            "{v:?}"
        );
    }

    #[test]
    fn removed_entries_are_found_in_the_middle_and_at_the_end() {
        let (_d, path, conn, key) = log_of(5);
        conn.execute("DELETE FROM audit WHERE id = 2", [])
            .expect("removes");
        assert!(matches!(
            check(&conn, &path, &key),
            Verdict::Broken { id: 2, .. }
        ));
        let (_d, path, conn, key) = log_of(5);
        conn.execute("DELETE FROM audit WHERE id = 5", [])
            .expect("removes");
        let v = check(&conn, &path, &key);
        assert!(
            matches!(&v, Verdict::Broken { id: 5, reason } if reason.contains("removed")),
            "{v:?}"
        );
    }
}
