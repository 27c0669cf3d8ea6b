//! One-time enrollment tokens in the `enrollments` table, and the audit
//! entries that go with them, each change in one transaction with its entry.
//!
//! A use is taken in one IMMEDIATE transaction (SQLite's write lock): the
//! row is read, checked and marked used before any other writer can read
//! it, so a token raced from two addresses is taken once and the other
//! attempt reads it as used.

use std::collections::BTreeMap;
use std::path::Path;

use outpost_protocols::event::Timestamp;
use rusqlite::{params, Connection, OptionalExtension as _, Row, TransactionBehavior};

use super::audit;
use crate::audit::key::AuditKey;
use crate::store::error::{AtPath as _, StoreError};
use crate::store::records::{EnrollmentRecord, TokenRefusal};

const COLUMNS: &str = "token_hash, agent_id, labels, created_at, created_by, expires_at,
                       used_at, used_from, revoked_at, serial, fingerprint";

fn record(r: &Row<'_>) -> rusqlite::Result<EnrollmentRecord> {
    let labels: String = r.get(2)?;
    Ok(EnrollmentRecord {
        token_hash: r.get(0)?,
        agent_id: r.get(1)?,
        labels: serde_json::from_str(&labels).unwrap_or_default(),
        created_at: r.get(3)?,
        created_by: r.get(4)?,
        expires_at: r.get(5)?,
        used_at: r.get(6)?,
        used_from: r.get(7)?,
        revoked_at: r.get(8)?,
        serial: r.get(9)?,
        fingerprint: r.get(10)?,
    })
}

fn entry<'a>(
    actor: &'a str,
    action: &'a str,
    target: &'a str,
    result: &'a str,
    detail: &'a str,
) -> audit::Entry<'a> {
    audit::Entry {
        ts: crate::clock::unix_now(),
        actor,
        action,
        target,
        result,
        detail,
    }
}

/// Stores a new token and audits `enroll.created`.
pub fn create(
    conn: &mut Connection,
    path: &Path,
    key: &AuditKey,
    rec: &EnrollmentRecord,
) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    let labels = serde_json::to_string(&rec.labels).unwrap_or_else(|_| "{}".into());
    tx.execute(
        &format!("INSERT INTO enrollments ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, NULL, NULL, NULL, NULL)"),
        params![
            rec.token_hash,
            rec.agent_id,
            labels,
            rec.created_at,
            rec.created_by,
            rec.expires_at
        ],
    )
    .at(path)?;
    let expires = std::time::UNIX_EPOCH
        + std::time::Duration::from_nanos(u64::try_from(rec.expires_at).unwrap_or(0));
    let detail = format!(
        "token {} expires at {}, labels {labels}",
        rec.id(),
        humantime::format_rfc3339_seconds(expires)
    );
    audit::append(
        &tx,
        path,
        key,
        &entry(
            &rec.created_by,
            "enroll.created",
            &rec.agent_id,
            "ok",
            &detail,
        ),
    )?;
    tx.commit().at(path)?;
    Ok(())
}

/// Every token, newest first.
pub fn list(conn: &Connection, path: &Path) -> Result<Vec<EnrollmentRecord>, StoreError> {
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {COLUMNS} FROM enrollments ORDER BY created_at DESC, token_hash"
        ))
        .at(path)?;
    let rows = stmt.query_map([], record).at(path)?;
    rows.collect::<Result<Vec<_>, _>>().at(path)
}

/// Revokes the pending tokens `matches` selects and audits `enroll.revoked`
/// for each; the tokens revoked.
pub fn revoke(
    conn: &mut Connection,
    path: &Path,
    key: &AuditKey,
    actor: &str,
    now: Timestamp,
    matches: impl Fn(&EnrollmentRecord) -> bool,
) -> Result<Vec<EnrollmentRecord>, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    let pending: Vec<EnrollmentRecord> = list(&tx, path)?
        .into_iter()
        .filter(|r| r.state(now.0) == "pending" && matches(r))
        .collect();
    for r in &pending {
        tx.execute(
            "UPDATE enrollments SET revoked_at = ?2 WHERE token_hash = ?1",
            params![r.token_hash, now.0],
        )
        .at(path)?;
        let detail = format!("token {}", r.id());
        audit::append(
            &tx,
            path,
            key,
            &entry(actor, "enroll.revoked", &r.agent_id, "ok", &detail),
        )?;
    }
    tx.commit().at(path)?;
    Ok(pending)
}

/// Takes the token with `token_hash` for `agent_id`: marks it used from
/// `from` if it may be used, atomically. `Ok(Err(..))` says why not.
pub fn take(
    conn: &mut Connection,
    path: &Path,
    token_hash: &str,
    agent_id: &str,
    from: &str,
    now: Timestamp,
) -> Result<Result<EnrollmentRecord, TokenRefusal>, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    let rec = tx
        .query_row(
            &format!("SELECT {COLUMNS} FROM enrollments WHERE token_hash = ?1"),
            [token_hash],
            record,
        )
        .optional()
        .at(path)?;
    let Some(mut rec) = rec else {
        return Ok(Err(TokenRefusal::Unknown));
    };
    if let Err(why) = rec.check(agent_id, now.0) {
        return Ok(Err(why));
    }
    let changed = tx
        .execute(
            "UPDATE enrollments SET used_at = ?2, used_from = ?3
             WHERE token_hash = ?1 AND used_at IS NULL AND revoked_at IS NULL",
            params![token_hash, now.0, from],
        )
        .at(path)?;
    if changed != 1 {
        return Ok(Err(TokenRefusal::Used));
    }
    tx.commit().at(path)?;
    rec.used_at = Some(now.0);
    rec.used_from = Some(from.to_owned());
    Ok(Ok(rec))
}

/// Records what a taken token issued: the certificate's serial and
/// fingerprint on the token, the token's labels on the agent's registry row
/// (created if the hub never saw the agent), and `enroll.used`, in one
/// transaction.
#[allow(clippy::too_many_arguments)]
pub fn complete(
    conn: &mut Connection,
    path: &Path,
    key: &AuditKey,
    token_hash: &str,
    agent_id: &str,
    labels: &BTreeMap<String, String>,
    serial: &str,
    fingerprint: &str,
    detail: &str,
    now: Timestamp,
) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    tx.execute(
        "UPDATE enrollments SET serial = ?2, fingerprint = ?3 WHERE token_hash = ?1",
        params![token_hash, serial, fingerprint],
    )
    .at(path)?;
    let labels = serde_json::to_string(labels).unwrap_or_else(|_| "{}".into());
    tx.execute(
        "INSERT INTO agents (agent_id, labels, first_seen, last_seen)
         VALUES (?1, ?2, ?3, ?3)
         ON CONFLICT (agent_id) DO UPDATE SET labels = excluded.labels",
        params![agent_id, labels, now.0],
    )
    .at(path)?;
    // A live session of a re-enrolled agent follows its new labels.
    super::trust::raise_generation(&tx, path)?;
    audit::append(
        &tx,
        path,
        key,
        &entry("hub", "enroll.used", agent_id, "ok", detail),
    )?;
    tx.commit().at(path)?;
    Ok(())
}

/// Audits `enroll.refused` for `agent_id` (what the device claimed, or `-`).
pub fn refused(
    conn: &mut Connection,
    path: &Path,
    key: &AuditKey,
    agent_id: &str,
    detail: &str,
) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    audit::append(
        &tx,
        path,
        key,
        &entry("hub", "enroll.refused", agent_id, "refused", detail),
    )?;
    tx.commit().at(path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::open_admin;

    fn token(hash: &str, agent: &str, expires_at: i64) -> EnrollmentRecord {
        EnrollmentRecord {
            token_hash: hash.into(),
            agent_id: agent.into(),
            labels: BTreeMap::from([("site".into(), "plant-1".into())]),
            created_at: 1,
            created_by: "ops".into(),
            expires_at,
            used_at: None,
            used_from: None,
            revoked_at: None,
            serial: None,
            fingerprint: None,
        }
    }

    #[test]
    fn a_token_is_taken_once_and_each_refusal_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        let mut conn = open_admin(&path).expect("opens");
        let key = AuditKey::generate().expect("key");
        create(&mut conn, &path, &key, &token("aa", "gw-1", 100)).expect("a");
        create(&mut conn, &path, &key, &token("bb", "gw-1", 10)).expect("b");
        create(&mut conn, &path, &key, &token("cc", "gw-1", 100)).expect("c");
        let now = Timestamp(50);
        assert_eq!(
            take(&mut conn, &path, "zz", "gw-1", "x", now).expect("db"),
            Err(TokenRefusal::Unknown)
        );
        assert_eq!(
            take(&mut conn, &path, "aa", "gw-2", "x", now).expect("db"),
            Err(TokenRefusal::ForAnotherAgent)
        );
        let taken = take(&mut conn, &path, "aa", "gw-1", "10.0.0.1:5", now)
            .expect("db")
            .expect("taken");
        assert_eq!(taken.used_from.as_deref(), Some("10.0.0.1:5"));
        assert_eq!(
            take(&mut conn, &path, "aa", "gw-1", "x", now).expect("db"),
            Err(TokenRefusal::Used)
        );
        assert_eq!(
            take(&mut conn, &path, "bb", "gw-1", "x", now).expect("db"),
            Err(TokenRefusal::Expired)
        );
        let revoked =
            revoke(&mut conn, &path, &key, "ops", now, |r| r.id() == "cc").expect("revoke");
        assert_eq!(revoked.len(), 1);
        assert_eq!(
            take(&mut conn, &path, "cc", "gw-1", "x", now).expect("db"),
            Err(TokenRefusal::Revoked)
        );
        let states: Vec<(String, &str)> = list(&conn, &path)
            .expect("list")
            .iter()
            .map(|r| (r.token_hash.clone(), r.state(now.0)))
            .collect();
        assert!(states.contains(&("aa".into(), "used")));
        assert!(states.contains(&("bb".into(), "expired")));
        assert!(states.contains(&("cc".into(), "revoked")));

        complete(
            &mut conn,
            &path,
            &key,
            "aa",
            "gw-1",
            &taken.labels,
            "01",
            "ff",
            "issued",
            now,
        )
        .expect("complete");
        let labels: String = conn
            .query_row(
                "SELECT labels FROM agents WHERE agent_id = 'gw-1'",
                [],
                |r| r.get(0),
            )
            .expect("row");
        assert_eq!(labels, r#"{"site":"plant-1"}"#);
        let actions: Vec<String> = audit::list(&conn, &path, None)
            .expect("audit")
            .into_iter()
            .map(|e| e.action)
            .collect();
        assert_eq!(
            actions,
            [
                "enroll.created",
                "enroll.created",
                "enroll.created",
                "enroll.revoked",
                "enroll.used"
            ]
        );
    }
}
