//! What an operator decides about an agent's standing, in the registry:
//! its labels and its revocation. Each change commits with its audit entry
//! and raises the trust generation in `meta`, which the running hub polls:
//! that is how a change made by a verb in another process reaches the live
//! sessions (a revoked agent's is closed, a relabelled one's rules are
//! recompiled) within a second or two.
//!
//! ```text
//! meta('trust.generation') = n    raised by every change below
//! agents.labels                   set here (or at enrollment, or by the
//!                                 first Hello of an agent never registered)
//! agents.revoked_at/_by/_reason   set by revoke, cleared by reinstate
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use outpost_protocols::event::{AgentId, Timestamp};
use outpost_storage::AtPath;
use rusqlite::{params, Connection, OptionalExtension as _, TransactionBehavior};

use super::audit::{self, Entry};
use super::registry;
use super::rows::{agent_from, revocation_at};
use crate::audit::key::AuditKey;
use crate::store::error::StoreError;
use crate::store::records::{LabelChange, Revocation};

/// The `meta` key of the trust generation.
const GENERATION: &str = "trust.generation";

/// The trust generation: raised by every label change, revocation and
/// reinstatement (0 before the first).
pub fn generation(conn: &Connection, path: &Path) -> Result<u64, StoreError> {
    let v: Option<String> = conn
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")
        .and_then(|mut s| s.query_row([GENERATION], |r| r.get(0)).optional())
        .at(path)?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// Raises the trust generation, inside the caller's transaction.
pub(crate) fn raise_generation(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, '1')
         ON CONFLICT (key) DO UPDATE SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)",
    )
    .and_then(|mut s| s.execute([GENERATION]))
    .at(path)?;
    Ok(())
}

/// Every revoked agent and its revocation.
pub fn revoked(conn: &Connection, path: &Path) -> Result<HashMap<AgentId, Revocation>, StoreError> {
    let rows: Vec<(String, Option<Revocation>)> = conn
        .prepare_cached(
            "SELECT agent_id, revoked_at, revoked_by, revoked_reason FROM agents
             WHERE revoked_at IS NOT NULL",
        )
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, revocation_at(r, 1)?)))
                .and_then(|rows| rows.collect())
        })
        .at(path)?;
    rows.into_iter()
        .filter_map(|(id, r)| r.map(|r| (id, r)))
        .map(|(id, r)| Ok((agent_from(path, "agents.agent_id", id)?, r)))
        .collect()
}

/// Sets `agent_id`'s labels to `labels` (the whole set), creating its
/// registry row if it has none (labels given before its first connection),
/// audited `agent.labels_changed` with the old and new sets. Setting the
/// labels it has changes and records nothing.
pub fn set_labels(
    conn: &mut Connection,
    path: &Path,
    key: &AuditKey,
    agent_id: &AgentId,
    labels: &BTreeMap<String, String>,
    actor: &str,
    now: Timestamp,
) -> Result<LabelChange, StoreError> {
    edit_labels(
        conn,
        path,
        key,
        agent_id,
        |_| Ok(labels.clone()),
        actor,
        now,
    )
}

/// [`set_labels`] to what `edit` makes of the labels held (empty for an
/// agent not registered), read in the same transaction as the write, so two
/// operators' edits at once both count. An error of `edit` changes nothing.
pub fn edit_labels<E: From<StoreError>>(
    conn: &mut Connection,
    path: &Path,
    key: &AuditKey,
    agent_id: &AgentId,
    edit: impl FnOnce(BTreeMap<String, String>) -> Result<BTreeMap<String, String>, E>,
    actor: &str,
    now: Timestamp,
) -> Result<LabelChange, E> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)
        .map_err(StoreError::from)?;
    let old = registry::labels(&tx, path, agent_id)?;
    let labels = edit(old.clone().unwrap_or_default())?;
    let change = LabelChange {
        old: old.clone(),
        new: labels.clone(),
    };
    if old.as_ref() == Some(&labels) {
        return Ok(change);
    }
    let text = json(&labels);
    ensure_row(&tx, path, agent_id, now)?;
    tx.prepare_cached("UPDATE agents SET labels = ?2 WHERE agent_id = ?1")
        .and_then(|mut s| s.execute(params![agent_id.as_str(), text]))
        .at(path)
        .map_err(StoreError::from)?;
    audit::append(
        &tx,
        path,
        key,
        &Entry {
            ts: now,
            actor,
            action: "agent.labels_changed",
            target: agent_id.as_str(),
            result: "ok",
            detail: &format!(
                "labels {} -> {text}",
                old.as_ref()
                    .map_or_else(|| "(not registered)".to_owned(), json)
            ),
        },
    )?;
    raise_generation(&tx, path)?;
    tx.commit().at(path).map_err(StoreError::from)?;
    Ok(change)
}

/// Revokes `agent_id` (creating its registry row if it has none, so an id
/// can be revoked before it ever connects), audited `agent.revoked`.
/// Returns the revocation in force: the earlier one, unchanged, if it was
/// revoked already.
pub fn revoke(
    conn: &mut Connection,
    path: &Path,
    key: &AuditKey,
    agent_id: &AgentId,
    reason: &str,
    actor: &str,
    now: Timestamp,
) -> Result<(Revocation, bool), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    if let Some(earlier) = revocation(&tx, path, agent_id)? {
        return Ok((earlier, false));
    }
    ensure_row(&tx, path, agent_id, now)?;
    tx.prepare_cached(
        "UPDATE agents SET revoked_at = ?2, revoked_by = ?3, revoked_reason = ?4
         WHERE agent_id = ?1",
    )
    .and_then(|mut s| s.execute(params![agent_id.as_str(), now.0, actor, reason]))
    .at(path)?;
    audit::append(
        &tx,
        path,
        key,
        &Entry {
            ts: now,
            actor,
            action: "agent.revoked",
            target: agent_id.as_str(),
            result: "ok",
            detail: &format!("reason: {reason}"),
        },
    )?;
    raise_generation(&tx, path)?;
    tx.commit().at(path)?;
    Ok((
        Revocation {
            at: now,
            by: actor.to_owned(),
            reason: reason.to_owned(),
        },
        true,
    ))
}

/// Lifts `agent_id`'s revocation, audited `agent.reinstated`. Returns the
/// revocation lifted, `None` if it was not revoked (nothing changes).
pub fn reinstate(
    conn: &mut Connection,
    path: &Path,
    key: &AuditKey,
    agent_id: &AgentId,
    actor: &str,
    now: Timestamp,
) -> Result<Option<Revocation>, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    let Some(lifted) = revocation(&tx, path, agent_id)? else {
        return Ok(None);
    };
    tx.prepare_cached(
        "UPDATE agents SET revoked_at = NULL, revoked_by = NULL, revoked_reason = NULL
         WHERE agent_id = ?1",
    )
    .and_then(|mut s| s.execute([agent_id.as_str()]))
    .at(path)?;
    audit::append(
        &tx,
        path,
        key,
        &Entry {
            ts: now,
            actor,
            action: "agent.reinstated",
            target: agent_id.as_str(),
            result: "ok",
            detail: &format!("revoked by {} (reason: {})", lifted.by, lifted.reason),
        },
    )?;
    raise_generation(&tx, path)?;
    tx.commit().at(path)?;
    Ok(Some(lifted))
}

/// `agent_id`'s revocation, if it is revoked.
fn revocation(
    conn: &Connection,
    path: &Path,
    agent_id: &AgentId,
) -> Result<Option<Revocation>, StoreError> {
    let row: Option<Option<Revocation>> = conn
        .prepare_cached(
            "SELECT revoked_at, revoked_by, revoked_reason FROM agents WHERE agent_id = ?1",
        )
        .and_then(|mut s| {
            s.query_row([agent_id.as_str()], |r| revocation_at(r, 0))
                .optional()
        })
        .at(path)?;
    Ok(row.flatten())
}

/// Creates `agent_id`'s registry row, empty, if it has none.
fn ensure_row(
    conn: &Connection,
    path: &Path,
    agent_id: &AgentId,
    now: Timestamp,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO agents (agent_id, first_seen, last_seen) VALUES (?1, ?2, ?2)
         ON CONFLICT (agent_id) DO NOTHING",
    )
    .and_then(|mut s| s.execute(params![agent_id.as_str(), now.0]))
    .at(path)?;
    Ok(())
}

fn json(labels: &BTreeMap<String, String>) -> String {
    // A map of strings always serialises.
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".into())
}
