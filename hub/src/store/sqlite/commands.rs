//! Commands to agents in the `commands` table (schema version 5), and the
//! audit entries that go with them (`command.requested`,
//! `command.result`), each change in one transaction with its entry.
//!
//! ```text
//! state: pending ──delivered──▶ delivered ──result──▶ applied | refused | failed
//!           │                                         | expired | unsupported
//!           ├── past expires_at before delivery ──▶ expired
//!           ├── agent older than version 4 ──▶ unsupported
//!           └── refused at the hub (role, policy) ──▶ refused, never pending
//! ```
//!
//! A delivered command has no expiry at the hub: the agent may have
//! executed it, so only the agent's answer (from its ledger) says what
//! became of it. It is sent again at each connection until answered.

use std::path::Path;

use outpost_protocols::event::Timestamp;
use outpost_protocols::wire::command::{Action, CommandId, CommandRequest, Outcome};
use rusqlite::{params, Connection, OptionalExtension as _, Row, TransactionBehavior};
use serde::{Deserialize, Serialize};

use super::audit;
use crate::audit::key::AuditKey;
use crate::store::error::{AtPath as _, StoreError};

/// A command to store.
#[derive(Debug, Clone)]
pub struct NewCommand {
    /// Its id.
    pub id: CommandId,
    /// The agent.
    pub agent_id: String,
    /// Who sent it (`local:<login>`, or the API caller's subject).
    pub actor: String,
    /// The role they sent it in.
    pub role: String,
    /// What it does.
    pub action: Action,
    /// The value or payload, for people.
    pub detail: String,
    /// When it was sent, Unix ns.
    pub created_at: i64,
    /// Not delivered after this, Unix ns.
    pub expires_at: i64,
    /// Why the hub refused it; `None`: pending.
    pub refused: Option<String>,
}

/// A stored command, as `command status` and `command list` print it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandRecord {
    /// Its id.
    pub id: String,
    /// The agent.
    pub agent_id: String,
    /// Who sent it.
    pub actor: String,
    /// In which role.
    pub role: String,
    /// `write`, `publish` or `read`.
    pub kind: String,
    /// The tag stream or topic.
    pub target: String,
    /// The value or payload.
    pub detail: String,
    /// When it was sent, Unix ns.
    pub created_at: i64,
    /// Its expiry, Unix ns.
    pub expires_at: i64,
    /// `pending`, `delivered`, `applied`, `refused`, `failed`, `expired`,
    /// `unsupported`.
    pub state: String,
    /// When it was first sent to the agent, Unix ns.
    pub delivered_at: Option<i64>,
    /// When its outcome was recorded, Unix ns.
    pub finished_at: Option<i64>,
    /// Why it was refused, failed or unsupported.
    pub reason: Option<String>,
    /// The read-back or reading, as JSON.
    pub value: Option<serde_json::Value>,
}

const COLUMNS: &str = "id, agent_id, actor, role, kind, target, detail, created_at, expires_at,
                       state, delivered_at, finished_at, reason, value";

fn record(r: &Row<'_>) -> rusqlite::Result<CommandRecord> {
    let value: Option<String> = r.get(13)?;
    Ok(CommandRecord {
        id: r.get(0)?,
        agent_id: r.get(1)?,
        actor: r.get(2)?,
        role: r.get(3)?,
        kind: r.get(4)?,
        target: r.get(5)?,
        detail: r.get(6)?,
        created_at: r.get(7)?,
        expires_at: r.get(8)?,
        state: r.get(9)?,
        delivered_at: r.get(10)?,
        finished_at: r.get(11)?,
        reason: r.get(12)?,
        value: value.and_then(|v| serde_json::from_str(&v).ok()),
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

/// Stores commands, each with its `command.requested` entry (and, for one
/// the hub refused, its `command.result`), in one transaction.
pub fn insert(
    conn: &mut Connection,
    path: &Path,
    key: &AuditKey,
    commands: &[NewCommand],
) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    for c in commands {
        let (state, reason) = match &c.refused {
            Some(r) => ("refused", Some(r.as_str())),
            None => ("pending", None),
        };
        tx.execute(
            "INSERT INTO commands (id, agent_id, actor, role, kind, target, action, detail,
                                   created_at, expires_at, state, finished_at, reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                c.id.as_str(),
                c.agent_id,
                c.actor,
                c.role,
                c.action.kind(),
                c.action.target(),
                c.action.to_bytes(),
                c.detail,
                c.created_at,
                c.expires_at,
                state,
                c.refused.as_ref().map(|_| c.created_at),
                reason,
            ],
        )
        .at(path)?;
        let target = format!("{}/{}", c.agent_id, c.action.target());
        let detail = format!(
            "command {} {} {} as {}, expires {}",
            c.id,
            c.action.kind(),
            c.detail,
            c.role,
            crate::store::records::rfc3339(Timestamp(c.expires_at))
        );
        let result = if c.refused.is_some() { "refused" } else { "ok" };
        audit::append(
            &tx,
            path,
            key,
            &entry(&c.actor, "command.requested", &target, result, &detail),
        )?;
        if let Some(reason) = &c.refused {
            let detail = format!("command {} refused at the hub: {reason}", c.id);
            audit::append(
                &tx,
                path,
                key,
                &entry("hub", "command.result", &target, "refused", &detail),
            )?;
        }
    }
    tx.commit().at(path)?;
    Ok(())
}

/// One command.
pub fn get(conn: &Connection, path: &Path, id: &str) -> Result<Option<CommandRecord>, StoreError> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM commands WHERE id = ?1"),
        [id],
        record,
    )
    .optional()
    .at(path)
}

/// How many commands the table holds, by kind and state, ordered: the
/// hub's command counters (a command is counted once, in its latest state).
pub fn counts(conn: &Connection, path: &Path) -> Result<Vec<(String, String, u64)>, StoreError> {
    let mut stmt = conn
        .prepare(
            "SELECT kind, state, COUNT(*) FROM commands GROUP BY kind, state ORDER BY kind, state",
        )
        .at(path)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
            ))
        })
        .at(path)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().at(path)
}

/// The newest commands first, of one agent or all, at most `limit`.
pub fn list(
    conn: &Connection,
    path: &Path,
    agent: Option<&str>,
    limit: usize,
) -> Result<Vec<CommandRecord>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {COLUMNS} FROM commands WHERE (?1 IS NULL OR agent_id = ?1)
             ORDER BY created_at DESC, id LIMIT ?2"
        ))
        .at(path)?;
    let rows = stmt.query_map(params![agent, limit], record).at(path)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().at(path)
}

/// The commands to send to `agent` now: pending ones not yet expired and
/// delivered ones not yet answered, oldest first. Pending ones past their
/// expiry are recorded `expired` (audited) first.
pub fn deliverable(
    conn: &mut Connection,
    path: &Path,
    key: &AuditKey,
    agent: &str,
    now: i64,
) -> Result<Vec<CommandRequest>, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    let expired: Vec<(String, String)> = {
        let mut stmt = tx
            .prepare_cached(
                "SELECT id, target FROM commands
                 WHERE agent_id = ?1 AND state = 'pending' AND expires_at < ?2",
            )
            .at(path)?;
        let rows = stmt
            .query_map(params![agent, now], |r| Ok((r.get(0)?, r.get(1)?)))
            .at(path)?;
        rows.collect::<rusqlite::Result<_>>().at(path)?
    };
    for (id, target) in &expired {
        tx.execute(
            "UPDATE commands SET state = 'expired', finished_at = ?2 WHERE id = ?1",
            params![id, now],
        )
        .at(path)?;
        let detail = format!("command {id} expired before it could be delivered");
        audit::append(
            &tx,
            path,
            key,
            &entry(
                "hub",
                "command.result",
                &format!("{agent}/{target}"),
                "expired",
                &detail,
            ),
        )?;
    }
    let open: Vec<(String, i64, String, Vec<u8>)> = {
        let mut stmt = tx
            .prepare_cached(
                "SELECT id, expires_at, role, action FROM commands
                 WHERE agent_id = ?1 AND state IN ('pending', 'delivered')
                 ORDER BY created_at, id",
            )
            .at(path)?;
        let rows = stmt
            .query_map([agent], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .at(path)?;
        rows.collect::<rusqlite::Result<_>>().at(path)?
    };
    tx.commit().at(path)?;
    Ok(open
        .into_iter()
        .filter_map(|(id, expires_at, role, action)| {
            Some(CommandRequest {
                id: CommandId::parse(&id).ok()?,
                expires_at: Timestamp(expires_at),
                role,
                action: Action::from_bytes(&action).ok()?,
            })
        })
        .collect())
}

/// Records that these commands were sent to their agent (the first time).
pub fn delivered(
    conn: &Connection,
    path: &Path,
    ids: &[CommandId],
    now: i64,
) -> Result<(), StoreError> {
    for id in ids {
        conn.execute(
            "UPDATE commands SET state = 'delivered', delivered_at = ?2
             WHERE id = ?1 AND state = 'pending'",
            params![id.as_str(), now],
        )
        .at(path)?;
    }
    Ok(())
}

/// Records a command's outcome, with its `command.result` entry, if it is
/// `agent`'s and still open; whether it was.
pub fn finish(
    conn: &mut Connection,
    path: &Path,
    key: &AuditKey,
    agent: &str,
    id: &CommandId,
    outcome: &Outcome,
    now: i64,
) -> Result<bool, StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    let value = outcome.value().map(|v| v.to_json().to_string());
    let target: Option<String> = tx
        .query_row(
            "SELECT target FROM commands WHERE id = ?1 AND agent_id = ?2
             AND state IN ('pending', 'delivered')",
            params![id.as_str(), agent],
            |r| r.get(0),
        )
        .optional()
        .at(path)?;
    let Some(target) = target else {
        return Ok(false);
    };
    tx.execute(
        "UPDATE commands SET state = ?2, finished_at = ?3, reason = ?4, value = ?5 WHERE id = ?1",
        params![id.as_str(), outcome.name(), now, outcome.reason(), value],
    )
    .at(path)?;
    let mut detail = format!("command {id} {}", outcome.name());
    if let Some(v) = &value {
        detail.push_str(&format!(", value {v}"));
    }
    if let Some(r) = outcome.reason() {
        detail.push_str(&format!(": {r}"));
    }
    audit::append(
        &tx,
        path,
        key,
        &entry(
            "hub",
            "command.result",
            &format!("{agent}/{target}"),
            outcome.name(),
            &detail,
        ),
    )?;
    tx.commit().at(path)?;
    Ok(true)
}
