//! Each agent's certificate binding: the certificate the hub accepts for
//! it, and the previous one until its grace period ends. Written in the
//! writer's transactions with the audit entries that record a change
//! (`cert.renewed`) or a refusal (`cert.refused`).
//!
//! A table of its own rather than columns of `agents`, because a binding
//! may come before the agent's first `Hello` (`ca issue --config`, the
//! handshake's first use), and an `agents` row is what makes a `Hello` the
//! agent's first (its labels then become the registry's).
//!
//! ```text
//! agent_certs(agent_id         TEXT PRIMARY KEY,
//!             serial           TEXT NOT NULL,     current certificate: serial, hex
//!             fingerprint      TEXT NOT NULL,     SHA-256 of its DER, hex
//!             not_after        INTEGER NOT NULL,  its expiry, Unix ns
//!             prev_fingerprint TEXT NULL,         the one before it, accepted
//!             prev_until       INTEGER NULL)      until then, Unix ns
//!             WITHOUT ROWID
//! ```

use std::path::Path;

use outpost_protocols::event::{AgentId, Timestamp};
use outpost_storage::AtPath;
use rusqlite::{params, Connection, OptionalExtension as _};

use super::audit;
use crate::audit::key::AuditKey;
use crate::store::error::StoreError;
use crate::store::records::{CertBinding, CertInfo, Rebind};

/// The binding of `agent_id`, `None` if it has none.
pub(crate) fn binding(
    conn: &Connection,
    path: &Path,
    agent_id: &AgentId,
) -> Result<Option<CertBinding>, StoreError> {
    type Row = (String, String, i64, Option<String>, Option<i64>);
    let row: Option<Row> = conn
        .prepare_cached(
            "SELECT serial, fingerprint, not_after, prev_fingerprint, prev_until
             FROM agent_certs WHERE agent_id = ?1",
        )
        .and_then(|mut s| {
            s.query_row([agent_id.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .optional()
        })
        .at(path)?;
    let Some((serial, fingerprint, not_after, prev, prev_until)) = row else {
        return Ok(None);
    };
    Ok(Some(CertBinding {
        current: CertInfo {
            serial,
            fingerprint,
            not_after: Timestamp(not_after),
        },
        previous: prev.zip(prev_until.map(Timestamp)),
    }))
}

/// Binds `cert` to `agent_id` as `how` says.
pub(crate) fn bind(
    conn: &Connection,
    path: &Path,
    key: &AuditKey,
    now: Timestamp,
    agent_id: &AgentId,
    cert: &CertInfo,
    how: &Rebind,
) -> Result<(), StoreError> {
    let old = binding(conn, path, agent_id)?;
    let (prev, prev_until) = match (how, &old) {
        // Someone bound it first: that binding stands.
        (Rebind::FirstUse, Some(_)) => return Ok(()),
        (Rebind::FirstUse, None) => (None, None),
        (Rebind::Replace { .. }, Some(old)) if old.current.fingerprint == cert.fingerprint => {
            return Ok(())
        }
        (Rebind::Replace { grace_until, .. }, Some(old)) => {
            (Some(old.current.fingerprint.clone()), Some(grace_until.0))
        }
        (Rebind::Replace { .. }, None) => (None, None),
    };
    conn.prepare_cached(
        "INSERT INTO agent_certs
             (agent_id, serial, fingerprint, not_after, prev_fingerprint, prev_until)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (agent_id) DO UPDATE SET
             serial = excluded.serial,
             fingerprint = excluded.fingerprint,
             not_after = excluded.not_after,
             prev_fingerprint = excluded.prev_fingerprint,
             prev_until = excluded.prev_until",
    )
    .and_then(|mut s| {
        s.execute(params![
            agent_id.as_str(),
            cert.serial,
            cert.fingerprint,
            cert.not_after.0,
            prev,
            prev_until
        ])
    })
    .at(path)?;
    if let Rebind::Replace {
        actor: Some(actor), ..
    } = how
    {
        let old_serial = old.map_or_else(|| "none".to_owned(), |o| o.current.serial);
        audit::append(
            conn,
            path,
            key,
            &audit::Entry {
                ts: now,
                actor,
                action: "cert.renewed",
                target: agent_id.as_str(),
                result: "ok",
                detail: &renewed_detail(&old_serial, cert),
            },
        )?;
    }
    Ok(())
}

/// The `cert.renewed` entry's detail, the same on both stores.
pub(crate) fn renewed_detail(old_serial: &str, cert: &CertInfo) -> String {
    format!(
        "serial {old_serial} -> {}, fingerprint sha256:{}, not_after {}",
        cert.serial,
        cert.fingerprint,
        crate::store::records::rfc3339(cert.not_after)
    )
}

/// Audits `cert.refused`.
pub(crate) fn refused(
    conn: &Connection,
    path: &Path,
    key: &AuditKey,
    now: Timestamp,
    agent_id: &AgentId,
    fingerprint: &str,
    reason: &str,
) -> Result<(), StoreError> {
    audit::append(
        conn,
        path,
        key,
        &audit::Entry {
            ts: now,
            actor: "hub",
            action: "cert.refused",
            target: agent_id.as_str(),
            result: "refused",
            detail: &format!("fingerprint sha256:{fingerprint}: {reason}"),
        },
    )?;
    Ok(())
}
