//! The hub store's schema and its migrations (the on-disk format is
//! described in the module above).

use std::path::Path;

use rusqlite::Transaction;

use crate::store::error::StoreError;

/// The schema version this build writes, kept in `PRAGMA user_version`.
/// Version 2 added the policy versions, the audit log and the agents'
/// policy columns, version 3 the sinks' queues, version 4 the trust
/// columns (labels owned by the hub, revocation), the certificate bindings,
/// the enrollment tokens, the audit entries' signatures, the API's tokens and
/// policy proposals, version 5 the commands to agents; an older file is
/// migrated when the hub opens it.
pub const SCHEMA_VERSION: i64 = 5;

/// The schema, created in one transaction when `user_version` is 0.
pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    agent_id TEXT    NOT NULL,
    seq      INTEGER NOT NULL,
    ts       INTEGER NOT NULL,
    stream   TEXT    NOT NULL,
    body     BLOB    NOT NULL,
    PRIMARY KEY (agent_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS agents (
    agent_id         TEXT    NOT NULL PRIMARY KEY,
    labels           TEXT    NOT NULL DEFAULT '{}',
    first_seen       INTEGER NOT NULL,
    last_seen        INTEGER NOT NULL,
    agent_version    TEXT,
    protocol_version INTEGER,
    watermark        INTEGER NOT NULL DEFAULT 0,
    backlog_events   INTEGER,
    backlog_bytes    INTEGER,
    connected        INTEGER NOT NULL DEFAULT 0,
    policy_version   INTEGER
) WITHOUT ROWID;
";

/// From schema version 1 to 2: policies, the audit log, per-agent policy
/// counters.
const MIGRATE_2: &str = "
ALTER TABLE agents ADD COLUMN policy_error TEXT;
ALTER TABLE agents ADD COLUMN policy_dropped INTEGER NOT NULL DEFAULT 0;
ALTER TABLE agents ADD COLUMN policy_modified INTEGER NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS policies (
    version    INTEGER PRIMARY KEY,
    applied_at INTEGER NOT NULL,
    actor      TEXT    NOT NULL,
    source     TEXT    NOT NULL,
    digest     TEXT    NOT NULL,
    text       TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id     INTEGER PRIMARY KEY,
    ts     INTEGER NOT NULL,
    actor  TEXT    NOT NULL,
    action TEXT    NOT NULL,
    target TEXT    NOT NULL,
    result TEXT    NOT NULL,
    detail TEXT    NOT NULL,
    prev   TEXT    NOT NULL,
    hash   TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
";

/// From schema version 3 to 4: the registry's labels become the hub's (a
/// `Hello` that states others is counted in `labels_ignored`), and agents
/// can be revoked. Each existing agent gets back the labels it was first
/// seen with ([`first_seen_labels`]). `agent_certs` binds each agent to its
/// certificate (see `sqlite::binding`). And the one-time enrollment tokens
/// (`sqlite::enrollments`).
///
/// `api_tokens`: the API's static tokens (`api::auth::tokens`), stored only
/// as the SHA-256 of the token. `policy_proposals`: policies proposed under
/// `[api] policy_approval = "two-person"` (`api::auth::proposals`).
/// `audit.sig`: the hub's Ed25519 signature of each entry's hash
/// (`crate::audit`); entries written before are left NULL and verify as
/// unsigned, before the first signed one.
pub(crate) const MIGRATE_4: &str = "
ALTER TABLE agents ADD COLUMN labels_ignored INTEGER NOT NULL DEFAULT 0;
ALTER TABLE agents ADD COLUMN revoked_at INTEGER;
ALTER TABLE agents ADD COLUMN revoked_by TEXT;
ALTER TABLE agents ADD COLUMN revoked_reason TEXT;
CREATE TABLE IF NOT EXISTS enrollments (
    token_hash  TEXT    NOT NULL PRIMARY KEY,
    agent_id    TEXT    NOT NULL,
    labels      TEXT    NOT NULL DEFAULT '{}',
    created_at  INTEGER NOT NULL,
    created_by  TEXT    NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,
    used_from   TEXT,
    revoked_at  INTEGER,
    serial      TEXT,
    fingerprint TEXT
) WITHOUT ROWID;
ALTER TABLE audit ADD COLUMN sig TEXT;
CREATE TABLE IF NOT EXISTS agent_certs (
    agent_id         TEXT    NOT NULL PRIMARY KEY,
    serial           TEXT    NOT NULL,
    fingerprint      TEXT    NOT NULL,
    not_after        INTEGER NOT NULL,
    prev_fingerprint TEXT,
    prev_until       INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS api_tokens (
    name       TEXT    NOT NULL PRIMARY KEY,
    role       TEXT    NOT NULL,
    hash       TEXT    NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    created_by TEXT    NOT NULL,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER,
    revoked_by TEXT
);
CREATE TABLE IF NOT EXISTS policy_proposals (
    id          INTEGER PRIMARY KEY,
    proposed_at INTEGER NOT NULL,
    proposed_by TEXT    NOT NULL,
    source      TEXT    NOT NULL,
    digest      TEXT    NOT NULL,
    text        TEXT    NOT NULL,
    status      TEXT    NOT NULL DEFAULT 'pending',
    decided_at  INTEGER,
    decided_by  TEXT,
    reason      TEXT,
    version     INTEGER
);
";

/// Version 5: commands to agents (`outpost-hub command`, issue 21), each
/// with its expiry, state and outcome; see `commands.rs`.
pub(crate) const MIGRATE_5: &str = "
CREATE TABLE IF NOT EXISTS commands (
    id           TEXT    NOT NULL PRIMARY KEY,
    agent_id     TEXT    NOT NULL,
    actor        TEXT    NOT NULL,
    role         TEXT    NOT NULL,
    kind         TEXT    NOT NULL,
    target       TEXT    NOT NULL,
    action       BLOB    NOT NULL,
    detail       TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    state        TEXT    NOT NULL,
    delivered_at INTEGER,
    finished_at  INTEGER,
    reason       TEXT,
    value        TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS commands_by_agent ON commands (agent_id, state);
CREATE INDEX IF NOT EXISTS commands_by_time ON commands (created_at);
";

/// Before version 4 every `Hello` replaced an agent's labels, so a gateway
/// that changed its claim after its first connection holds the claimed ones.
/// The labels it was first seen with are in its `agent.first_seen` audit
/// entry (`labels {json}, agent version …`): those become its labels. An
/// entry that does not read that way (none, or an agent version that
/// confuses the split) leaves the row as it is; `fleet list` shows it, and
/// `agent label` corrects it.
fn first_seen_labels(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    let firsts: Vec<(String, String)> = tx
        .prepare(
            "SELECT target, detail FROM audit WHERE action = 'agent.first_seen'
             AND id IN (SELECT min(id) FROM audit WHERE action = 'agent.first_seen' GROUP BY target)",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (agent, detail) in firsts {
        let labels = detail
            .strip_prefix("labels ")
            .and_then(|rest| rest.rfind(", agent version ").map(|end| &rest[..end]))
            .and_then(|json| {
                serde_json::from_str::<std::collections::BTreeMap<String, String>>(json).ok()
            });
        if let Some(labels) = labels {
            let text = serde_json::to_string(&labels).unwrap_or_else(|_| "{}".into());
            tx.execute(
                "UPDATE agents SET labels = ?2 WHERE agent_id = ?1",
                rusqlite::params![agent, text],
            )?;
        }
    }
    Ok(())
}

/// Creates or migrates the schema inside `tx` (an IMMEDIATE transaction, so
/// that two processes opening one file do not both do it). Refuses a newer
/// schema.
pub(crate) fn prepare_schema(tx: &Transaction<'_>, path: &Path) -> Result<(), StoreError> {
    outpost_storage::prepare_schema(tx, path, SCHEMA_VERSION, |tx, found| {
        if found < 1 {
            tx.execute_batch(SCHEMA)?;
        }
        if found < 2 {
            tx.execute_batch(MIGRATE_2)?;
        }
        if found < 3 {
            tx.execute_batch(super::sink_queue::MIGRATE_3)?;
        }
        if found < 4 {
            tx.execute_batch(MIGRATE_4)?;
            first_seen_labels(tx)?;
        }
        if found < 5 {
            tx.execute_batch(MIGRATE_5)?;
        }
        Ok(())
    })?;
    Ok(())
}
