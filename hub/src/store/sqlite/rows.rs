//! Values read back from rows that the store only ever writes valid: a
//! value that does not read back is a damaged or hand-edited file
//! ([`StoreError::CorruptRow`]), never a panic.

use std::path::Path;

use outpost_protocols::event::{AgentId, Seq};

use crate::store::error::StoreError;

/// A stored seq, which the store only ever writes in `1..=i64::MAX`.
pub(crate) fn seq_from(
    path: &Path,
    agent_id: &str,
    column: &'static str,
    v: i64,
) -> Result<Seq, StoreError> {
    u64::try_from(v)
        .map(Seq)
        .map_err(|_| StoreError::CorruptRow {
            path: path.to_owned(),
            agent_id: agent_id.to_owned(),
            column,
            reason: format!("{v} is negative"),
        })
}

/// An agent id read from a row.
pub(crate) fn agent_from(
    path: &Path,
    column: &'static str,
    s: String,
) -> Result<AgentId, StoreError> {
    AgentId::parse(&s).map_err(|e| StoreError::CorruptRow {
        path: path.to_owned(),
        agent_id: s,
        column,
        reason: e.to_string(),
    })
}

/// The revocation in the `revoked_at`, `revoked_by` and `revoked_reason`
/// columns of `row`, from column `first` on; `None` while not revoked.
pub(crate) fn revocation_at(
    row: &rusqlite::Row<'_>,
    first: usize,
) -> rusqlite::Result<Option<crate::store::records::Revocation>> {
    let Some(at) = row.get::<_, Option<i64>>(first)? else {
        return Ok(None);
    };
    Ok(Some(crate::store::records::Revocation {
        at: outpost_protocols::event::Timestamp(at),
        by: row.get::<_, Option<String>>(first + 1)?.unwrap_or_default(),
        reason: row.get::<_, Option<String>>(first + 2)?.unwrap_or_default(),
    }))
}
