//! The fleet registry: one row per agent in the `agents` table, written in the
//! same transactions as the events.

use std::collections::BTreeMap;
use std::path::Path;

use outpost_protocols::event::{AgentId, Seq, Timestamp};
use outpost_storage::AtPath;
use rusqlite::{params, Connection, OptionalExtension as _, Row};

use super::rows::{agent_from, revocation_at, seq_from};
use crate::audit::key::AuditKey;
use crate::store::error::StoreError;
use crate::store::records::AgentRecord;

/// A counter for an INTEGER column: SQLite integers are signed, and a
/// reported value beyond `i64::MAX` is kept as `i64::MAX` rather than refused.
fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Sets every agent's session count to 0 and returns how many agents had
/// sessions recorded.
pub(crate) fn reset_connections(conn: &Connection, path: &Path) -> Result<usize, StoreError> {
    Ok(conn
        .prepare_cached("UPDATE agents SET connected = 0 WHERE connected <> 0")
        .and_then(|mut s| s.execute([]))
        .at(path)?)
}

pub(crate) fn watermark(
    conn: &Connection,
    path: &Path,
    agent_id: &AgentId,
) -> Result<Seq, StoreError> {
    let v: Option<i64> = conn
        .prepare_cached("SELECT watermark FROM agents WHERE agent_id = ?1")
        .and_then(|mut s| s.query_row([agent_id.as_str()], |r| r.get(0)).optional())
        .at(path)?;
    match v {
        Some(v) => seq_from(path, agent_id.as_str(), "agents.watermark", v),
        None => Ok(Seq(0)),
    }
}

/// Raises the watermark to `seq` (never lowers it), sets `last_seen`, creates
/// the row for an agent the registry did not know; returns the watermark.
pub(crate) fn raise_watermark(
    conn: &Connection,
    path: &Path,
    agent_id: &AgentId,
    seq: Seq,
    now: Timestamp,
) -> Result<Seq, StoreError> {
    // The caller checked that seq fits an i64.
    let v: i64 = conn
        .prepare_cached(
            "INSERT INTO agents (agent_id, first_seen, last_seen, watermark)
             VALUES (?1, ?2, ?2, ?3)
             ON CONFLICT (agent_id) DO UPDATE SET
                 watermark = max(watermark, excluded.watermark),
                 last_seen = excluded.last_seen
             RETURNING watermark",
        )
        .and_then(|mut s| {
            s.query_row(params![agent_id.as_str(), now.0, clamp(seq.0)], |r| {
                r.get(0)
            })
        })
        .at(path)?;
    seq_from(path, agent_id.as_str(), "agents.watermark", v)
}

/// Records the policy version an agent reported, and its refusal, if any.
pub(crate) fn policy_status(
    conn: &Connection,
    path: &Path,
    agent_id: &AgentId,
    version: u64,
    error: Option<&str>,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE agents SET policy_version = ?2, policy_error = ?3 WHERE agent_id = ?1",
    )
    .and_then(|mut s| s.execute(params![agent_id.as_str(), clamp(version), error]))
    .at(path)?;
    Ok(())
}

/// Adds what the hub's enforcement did to an agent's counters.
pub(crate) fn count_policy(
    conn: &Connection,
    path: &Path,
    agent_id: &AgentId,
    counts: crate::store::handle::PolicyCounts,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE agents SET policy_dropped = policy_dropped + ?2,
                           policy_modified = policy_modified + ?3
         WHERE agent_id = ?1",
    )
    .and_then(|mut s| {
        s.execute(params![
            agent_id.as_str(),
            clamp(counts.dropped),
            clamp(counts.modified)
        ])
    })
    .at(path)?;
    Ok(())
}

/// Records that a session of the agent started. The labels of its `Hello`
/// become the registry's only for an agent the registry does not know yet
/// (its first connection, when it was not enrolled); for a known agent they
/// change nothing, and a `Hello` that states others is counted in
/// `labels_ignored`. Returns the registry's labels, which are the ones the
/// hub selects rules, limits and sink topics by.
#[allow(clippy::too_many_arguments)]
pub(crate) fn connected(
    conn: &Connection,
    path: &Path,
    key: &AuditKey,
    agent_id: &AgentId,
    labels: &BTreeMap<String, String>,
    agent_version: &str,
    protocol_version: u16,
    now: Timestamp,
) -> Result<(), StoreError> {
    // A map of strings always serialises.
    let text = serde_json::to_string(labels).unwrap_or_else(|_| "{}".into());
    match self::labels(conn, path, agent_id)? {
        None => super::audit::append(
            conn,
            path,
            key,
            &super::audit::Entry {
                ts: now,
                actor: "hub",
                action: "agent.first_seen",
                target: agent_id.as_str(),
                result: "ok",
                detail: &format!(
                    "labels {text}, agent version {agent_version}, protocol {protocol_version}"
                ),
            },
        )
        .map(drop)?,
        Some(held) if held != *labels => {
            conn.prepare_cached(
                "UPDATE agents SET labels_ignored = labels_ignored + 1 WHERE agent_id = ?1",
            )
            .and_then(|mut s| s.execute([agent_id.as_str()]))
            .at(path)?;
        }
        Some(_) => {}
    }
    conn.prepare_cached(
        "INSERT INTO agents
             (agent_id, labels, first_seen, last_seen, agent_version, protocol_version, connected)
         VALUES (?1, ?2, ?3, ?3, ?4, ?5, 1)
         ON CONFLICT (agent_id) DO UPDATE SET
             last_seen = excluded.last_seen,
             agent_version = excluded.agent_version,
             protocol_version = excluded.protocol_version,
             connected = connected + 1",
    )
    .and_then(|mut s| {
        s.execute(params![
            agent_id.as_str(),
            text,
            now.0,
            agent_version,
            protocol_version
        ])
    })
    .at(path)?;
    Ok(())
}

/// The registry's labels of `agent_id`, `None` for an agent it does not
/// know; labels that do not read as a JSON object of strings are a
/// [`StoreError::CorruptRow`].
pub(crate) fn labels(
    conn: &Connection,
    path: &Path,
    agent_id: &AgentId,
) -> Result<Option<BTreeMap<String, String>>, StoreError> {
    let text: Option<String> = conn
        .prepare_cached("SELECT labels FROM agents WHERE agent_id = ?1")
        .and_then(|mut s| s.query_row([agent_id.as_str()], |r| r.get(0)).optional())
        .at(path)?;
    text.map(|t| parse_labels(path, agent_id.as_str(), &t))
        .transpose()
}

/// The `labels` column's JSON object of strings.
pub(crate) fn parse_labels(
    path: &Path,
    agent_id: &str,
    text: &str,
) -> Result<BTreeMap<String, String>, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::CorruptRow {
        path: path.to_owned(),
        agent_id: agent_id.to_owned(),
        column: "agents.labels",
        reason: format!("not a JSON object of strings: {e}"),
    })
}

pub(crate) fn disconnected(
    conn: &Connection,
    path: &Path,
    agent_id: &AgentId,
    now: Timestamp,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE agents SET connected = max(connected - 1, 0), last_seen = ?2 WHERE agent_id = ?1",
    )
    .and_then(|mut s| s.execute(params![agent_id.as_str(), now.0]))
    .at(path)?;
    Ok(())
}

pub(crate) fn backlog(
    conn: &Connection,
    path: &Path,
    agent_id: &AgentId,
    events: u64,
    bytes: u64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE agents SET backlog_events = ?2, backlog_bytes = ?3 WHERE agent_id = ?1",
    )
    .and_then(|mut s| s.execute(params![agent_id.as_str(), clamp(events), clamp(bytes)]))
    .at(path)?;
    Ok(())
}

pub(crate) fn touch(
    conn: &Connection,
    path: &Path,
    agent_id: &AgentId,
    now: Timestamp,
) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE agents SET last_seen = ?2 WHERE agent_id = ?1")
        .and_then(|mut s| s.execute(params![agent_id.as_str(), now.0]))
        .at(path)?;
    Ok(())
}

/// Every agent id in the registry, in order.
pub(crate) fn agent_ids(conn: &Connection, path: &Path) -> Result<Vec<AgentId>, StoreError> {
    let ids: Vec<String> = conn
        .prepare_cached("SELECT agent_id FROM agents ORDER BY agent_id")
        .and_then(|mut s| {
            s.query_map([], |r| r.get(0))
                .and_then(|rows| rows.collect::<Result<Vec<String>, _>>())
        })
        .at(path)?;
    ids.into_iter()
        .map(|id| agent_from(path, "agents.agent_id", id))
        .collect()
}

pub(crate) fn fleet(conn: &Connection, path: &Path) -> Result<Vec<AgentRecord>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT agent_id, labels, first_seen, last_seen, agent_version, protocol_version,
                    watermark, backlog_events, backlog_bytes, connected, policy_version,
                    policy_error, policy_dropped, policy_modified, labels_ignored,
                    revoked_at, revoked_by, revoked_reason,
                    (SELECT not_after FROM agent_certs c WHERE c.agent_id = agents.agent_id),
                    (SELECT serial FROM agent_certs c WHERE c.agent_id = agents.agent_id)
             FROM agents ORDER BY agent_id",
        )
        .at(path)?;
    let mut rows = stmt.query([]).at(path)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().at(path)? {
        out.push(record(path, row)?);
    }
    Ok(out)
}

/// One `agents` row; anything this hub cannot have written is
/// [`StoreError::CorruptRow`], never a panic.
fn record(path: &Path, row: &Row<'_>) -> Result<AgentRecord, StoreError> {
    let id: String = row.get(0).at(path)?;
    let corrupt = |column: &'static str, reason: String| StoreError::CorruptRow {
        path: path.to_owned(),
        agent_id: id.clone(),
        column,
        reason,
    };
    let unsigned = |column: &'static str, v: i64| {
        u64::try_from(v).map_err(|_| corrupt(column, format!("{v} is negative")))
    };
    let labels: String = row.get(1).at(path)?;
    let labels = parse_labels(path, &id, &labels)?;
    let protocol_version = row
        .get::<_, Option<i64>>(5)
        .at(path)?
        .map(|v| {
            u16::try_from(v)
                .map_err(|_| corrupt("agents.protocol_version", format!("{v} is not a u16")))
        })
        .transpose()?;
    let watermark = unsigned("agents.watermark", row.get(6).at(path)?)?;
    let backlog_events = row
        .get::<_, Option<i64>>(7)
        .at(path)?
        .map(|v| unsigned("agents.backlog_events", v))
        .transpose()?;
    let backlog_bytes = row
        .get::<_, Option<i64>>(8)
        .at(path)?
        .map(|v| unsigned("agents.backlog_bytes", v))
        .transpose()?;
    let sessions = unsigned("agents.connected", row.get(9).at(path)?)?;
    let policy_version = row
        .get::<_, Option<i64>>(10)
        .at(path)?
        .map(|v| unsigned("agents.policy_version", v))
        .transpose()?;
    let policy_dropped = unsigned("agents.policy_dropped", row.get(12).at(path)?)?;
    let policy_modified = unsigned("agents.policy_modified", row.get(13).at(path)?)?;
    let labels_ignored = unsigned("agents.labels_ignored", row.get(14).at(path)?)?;
    let revoked = revocation_at(row, 15).at(path)?;
    Ok(AgentRecord {
        labels_ignored,
        revoked,
        policy_error: row.get(11).at(path)?,
        policy_dropped,
        policy_modified,
        labels,
        first_seen: Timestamp(row.get(2).at(path)?),
        last_seen: Timestamp(row.get(3).at(path)?),
        agent_version: row.get(4).at(path)?,
        protocol_version,
        watermark: Seq(watermark),
        backlog_events,
        backlog_bytes,
        sessions,
        policy_version,
        cert_not_after: row.get::<_, Option<i64>>(18).at(path)?.map(Timestamp),
        cert_serial: row.get(19).at(path)?,
        agent_id: agent_from(path, "agents.agent_id", id.clone())?,
    })
}
