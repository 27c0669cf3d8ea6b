//! Two-person policy approval (`[api] policy_approval = "two-person"`): a
//! policy author's apply becomes a proposal, and only a *different* subject
//! with the approve-policy permission makes it the version in force.
//!
//! ```text
//! POST /api/v1/policy                      policy-author  → proposal N, pending
//!                                                           audit policy.proposed
//! POST /api/v1/policy/proposals/N/approve  approver ≠ author → applied as the
//!                                                           next version; audit
//!                                                           policy.approved +
//!                                                           policy.applied
//! POST /api/v1/policy/proposals/N/reject   approver ≠ author → rejected;
//!                                                           audit policy.rejected
//! the author approving or rejecting N      403, audit api.refused
//! ```
//!
//! The text is validated against the hub's sinks when proposed (a policy
//! the hub would refuse is never proposed) and again when approved (the
//! sinks may have changed); applying is the ordinary path
//! (`policy::apply_in`), so the running hub's watch pushes the new version
//! to the agents within seconds. On SQLite the approval, the new version and
//! their audit entries commit in one transaction. On JetStream the proposal
//! is claimed by compare-and-set (pending → approved) before the version is
//! stored, and put back to pending if the hub refuses the text.
//!
//! ```text
//! SQLite:    policy_proposals(id, proposed_at, proposed_by, source, digest,
//!                             text, status, decided_at, decided_by, reason,
//!                             version)
//! JetStream: KV <prefix>_policy_proposals, key p.<id, 20 digits> → JSON
//! ```

use std::path::Path;

use outpost_protocols::policy::{digest, Catalog, Policy};
use rusqlite::{params, Connection, OptionalExtension as _, TransactionBehavior};
use serde::{Deserialize, Serialize};

use crate::audit::key::AuditKey;
use crate::clock;
use crate::policy::{self, Applied, ApplyError};
use crate::store::audit;
use crate::store::jetstream::JetStreamStore;
use crate::store::{AtPath as _, StoreError};

/// The JetStream bucket's name after the prefix.
pub const BUCKET: &str = "policy_proposals";

/// Where a proposal is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Waiting for an approver.
    Pending,
    /// Applied (as `version`).
    Approved,
    /// Rejected; never applied.
    Rejected,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Approved => "approved",
            Status::Rejected => "rejected",
        }
    }

    fn parse(s: &str) -> Status {
        match s {
            "approved" => Status::Approved,
            "rejected" => Status::Rejected,
            _ => Status::Pending,
        }
    }
}

/// A proposal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    /// Its id, from 1.
    pub id: u64,
    /// When, Unix ns.
    pub proposed_at: i64,
    /// The author's subject.
    pub proposed_by: String,
    /// Where the text came from (a file name, `api`).
    pub source: String,
    /// SHA-256 of the text.
    pub digest: String,
    /// The policy document.
    pub text: String,
    /// Pending, approved or rejected.
    pub status: Status,
    /// When it was approved or rejected, Unix ns.
    pub decided_at: Option<i64>,
    /// Who approved or rejected it.
    pub decided_by: Option<String>,
    /// The reason given with a rejection.
    pub reason: Option<String>,
    /// The policy version it became.
    pub version: Option<u64>,
}

/// Why a proposal step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProposalError {
    /// No proposal with that id.
    #[error("no policy proposal {0}")]
    NotFound(u64),
    /// It was approved or rejected already.
    #[error("policy proposal {id} is {status} already")]
    Decided {
        /// The proposal.
        id: u64,
        /// Its status.
        status: &'static str,
    },
    /// The author tried to approve or reject their own proposal.
    #[error("{subject} proposed policy proposal {id}: another subject must approve or reject it (two-person rule)")]
    OwnProposal {
        /// The proposal.
        id: u64,
        /// The author.
        subject: String,
    },
    /// The text does not validate against the hub's sinks (when proposed,
    /// or when approved after the sinks changed).
    #[error(transparent)]
    Policy(#[from] ApplyError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What an approval did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Approved {
    /// The proposal, now approved.
    pub proposal: Proposal,
    /// The policy version it is, new or the one in force already.
    pub applied: Applied,
}

fn check(text: &str, source: &str, catalog: &Catalog) -> Result<(), ProposalError> {
    Policy::parse(text, catalog).map_err(|error| {
        ProposalError::Policy(ApplyError::Refused {
            source_name: source.to_owned(),
            error,
        })
    })?;
    Ok(())
}

fn version_of(a: &Applied) -> u64 {
    match a {
        Applied::New { version, .. } | Applied::Unchanged { version } => *version,
    }
}

// ---- SQLite ----

const COLUMNS: &str =
    "id, proposed_at, proposed_by, source, digest, text, status, decided_at, decided_by, reason, version";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Proposal> {
    Ok(Proposal {
        id: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
        proposed_at: r.get(1)?,
        proposed_by: r.get(2)?,
        source: r.get(3)?,
        digest: r.get(4)?,
        text: r.get(5)?,
        status: Status::parse(&r.get::<_, String>(6)?),
        decided_at: r.get(7)?,
        decided_by: r.get(8)?,
        reason: r.get(9)?,
        version: r
            .get::<_, Option<i64>>(10)?
            .and_then(|v| u64::try_from(v).ok()),
    })
}

/// One proposal.
pub fn get_sqlite(conn: &Connection, path: &Path, id: u64) -> Result<Option<Proposal>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM policy_proposals WHERE id = ?1"
    ))
    .and_then(|mut s| {
        s.query_row([i64::try_from(id).unwrap_or(i64::MAX)], row)
            .optional()
    })
    .at(path)
}

/// Every proposal, oldest first.
pub fn list_sqlite(conn: &Connection, path: &Path) -> Result<Vec<Proposal>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM policy_proposals ORDER BY id"
        ))
        .at(path)?;
    let rows = stmt.query_map([], row).at(path)?;
    rows.collect::<Result<Vec<_>, _>>().at(path)
}

/// Validates `text` and stores it as a pending proposal by `actor`, with
/// its `policy.proposed` entry. A text the hub would refuse is not stored
/// (its `policy.refused` entry is).
pub fn propose_sqlite(
    conn: &mut Connection,
    path: &Path,
    key: &AuditKey,
    text: &str,
    source: &str,
    actor: &str,
    catalog: &Catalog,
) -> Result<Proposal, ProposalError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    let ts = clock::unix_now();
    let d = digest(text);
    if let Err(e) = check(text, source, catalog) {
        audit::append(
            &tx,
            path,
            key,
            &audit::Entry {
                ts,
                actor,
                action: "policy.refused",
                target: source,
                result: "refused",
                detail: &format!("proposed, digest {d}: {e}"),
            },
        )?;
        tx.commit().at(path)?;
        return Err(e);
    }
    tx.execute(
        "INSERT INTO policy_proposals (proposed_at, proposed_by, source, digest, text, status)
         VALUES (?1, ?2, ?3, ?4, ?5, 'pending')",
        params![ts.0, actor, source, d, text],
    )
    .at(path)?;
    let id = u64::try_from(tx.last_insert_rowid()).unwrap_or(0);
    audit::append(
        &tx,
        path,
        key,
        &audit::Entry {
            ts,
            actor,
            action: "policy.proposed",
            target: &format!("proposal {id}"),
            result: "ok",
            detail: &format!("from {source}, digest {d}"),
        },
    )?;
    let p = get_sqlite(&tx, path, id)?.ok_or(ProposalError::NotFound(id))?;
    tx.commit().at(path)?;
    Ok(p)
}

/// Loads proposal `id` for a decision by `actor`, refusing one decided
/// already or the author's own (that refusal is audited as `api.refused`
/// and committed).
fn decidable(
    tx: &rusqlite::Transaction<'_>,
    path: &Path,
    key: &AuditKey,
    id: u64,
    actor: &str,
    verb: &str,
) -> Result<Proposal, ProposalError> {
    let p = get_sqlite(tx, path, id)?.ok_or(ProposalError::NotFound(id))?;
    if p.status != Status::Pending {
        return Err(ProposalError::Decided {
            id,
            status: p.status.name(),
        });
    }
    if p.proposed_by == actor {
        audit::append(
            tx,
            path,
            key,
            &audit::Entry {
                ts: clock::unix_now(),
                actor,
                action: "api.refused",
                target: &format!("proposal {id}"),
                result: "refused",
                detail: &format!("{verb} their own proposal (two-person rule)"),
            },
        )?;
        return Err(ProposalError::OwnProposal {
            id,
            subject: actor.to_owned(),
        });
    }
    Ok(p)
}

/// Approves proposal `id` as `actor` (who must not be its author) and
/// applies it, all in one transaction with `policy.approved` and
/// `policy.applied`.
pub fn approve_sqlite(
    conn: &mut Connection,
    path: &Path,
    key: &AuditKey,
    id: u64,
    actor: &str,
    catalog: &Catalog,
) -> Result<Approved, ProposalError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    let p = match decidable(&tx, path, key, id, actor, "approving") {
        Ok(p) => p,
        Err(e @ ProposalError::OwnProposal { .. }) => {
            tx.commit().at(path)?;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let source = format!("proposal {id} by {}", p.proposed_by);
    let applied = match policy::apply_in(&tx, path, key, &p.text, &source, actor, catalog) {
        Ok(a) => a,
        Err(e @ ApplyError::Refused { .. }) => {
            // The refusal's entry is kept; the proposal stays pending.
            tx.commit().at(path)?;
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    let version = version_of(&applied);
    let ts = clock::unix_now();
    tx.execute(
        "UPDATE policy_proposals SET status = 'approved', decided_at = ?2, decided_by = ?3, version = ?4
         WHERE id = ?1",
        params![
            i64::try_from(id).unwrap_or(i64::MAX),
            ts.0,
            actor,
            i64::try_from(version).unwrap_or(i64::MAX)
        ],
    )
    .at(path)?;
    audit::append(
        &tx,
        path,
        key,
        &audit::Entry {
            ts,
            actor,
            action: "policy.approved",
            target: &format!("proposal {id}"),
            result: "ok",
            detail: &format!(
                "proposed by {}, digest {}, in force as policy v{version}",
                p.proposed_by, p.digest
            ),
        },
    )?;
    let proposal = get_sqlite(&tx, path, id)?.ok_or(ProposalError::NotFound(id))?;
    tx.commit().at(path)?;
    Ok(Approved { proposal, applied })
}

/// Rejects proposal `id` as `actor` (who must not be its author), with
/// `policy.rejected`.
pub fn reject_sqlite(
    conn: &mut Connection,
    path: &Path,
    key: &AuditKey,
    id: u64,
    actor: &str,
    reason: &str,
) -> Result<Proposal, ProposalError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .at(path)?;
    let p = match decidable(&tx, path, key, id, actor, "rejecting") {
        Ok(p) => p,
        Err(e @ ProposalError::OwnProposal { .. }) => {
            tx.commit().at(path)?;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let ts = clock::unix_now();
    tx.execute(
        "UPDATE policy_proposals SET status = 'rejected', decided_at = ?2, decided_by = ?3, reason = ?4
         WHERE id = ?1",
        params![i64::try_from(id).unwrap_or(i64::MAX), ts.0, actor, reason],
    )
    .at(path)?;
    audit::append(
        &tx,
        path,
        key,
        &audit::Entry {
            ts,
            actor,
            action: "policy.rejected",
            target: &format!("proposal {id}"),
            result: "ok",
            detail: &format!(
                "proposed by {}, digest {}: {}",
                p.proposed_by,
                p.digest,
                if reason.is_empty() {
                    "no reason given"
                } else {
                    reason
                }
            ),
        },
    )?;
    let proposal = get_sqlite(&tx, path, id)?.ok_or(ProposalError::NotFound(id))?;
    tx.commit().at(path)?;
    Ok(proposal)
}

// ---- JetStream ----

fn entry_key(id: u64) -> String {
    format!("p.{id:020}")
}

/// Every proposal on the JetStream store, oldest first.
pub async fn list_jetstream(js: &JetStreamStore) -> Result<Vec<Proposal>, StoreError> {
    let mut out = Vec::new();
    for k in js.kv_keys(BUCKET).await? {
        if let Some((v, _)) = js.kv_entry(BUCKET, &k).await? {
            if let Ok(p) = serde_json::from_slice::<Proposal>(&v) {
                out.push(p);
            }
        }
    }
    out.sort_by_key(|p| p.id);
    Ok(out)
}

/// One proposal on the JetStream store, with its revision.
async fn entry_jetstream(
    js: &JetStreamStore,
    id: u64,
) -> Result<Option<(Proposal, u64)>, StoreError> {
    Ok(js
        .kv_entry(BUCKET, &entry_key(id))
        .await?
        .and_then(|(v, rev)| {
            serde_json::from_slice::<Proposal>(&v)
                .ok()
                .map(|p| (p, rev))
        }))
}

/// One proposal on the JetStream store.
pub async fn get_jetstream(js: &JetStreamStore, id: u64) -> Result<Option<Proposal>, StoreError> {
    Ok(entry_jetstream(js, id).await?.map(|(p, _)| p))
}

/// [`propose_sqlite`] on the JetStream store.
pub async fn propose_jetstream(
    js: &JetStreamStore,
    key: &AuditKey,
    text: &str,
    source: &str,
    actor: &str,
    catalog: &Catalog,
) -> Result<Proposal, ProposalError> {
    check(text, source, catalog)?;
    let d = digest(text);
    loop {
        let next = list_jetstream(js).await?.last().map_or(0, |p| p.id) + 1;
        let p = Proposal {
            id: next,
            proposed_at: clock::unix_now().0,
            proposed_by: actor.to_owned(),
            source: source.to_owned(),
            digest: d.clone(),
            text: text.to_owned(),
            status: Status::Pending,
            decided_at: None,
            decided_by: None,
            reason: None,
            version: None,
        };
        let value = serde_json::to_vec(&p).unwrap_or_default();
        if js.kv_create(BUCKET, &entry_key(next), value).await? {
            js.audit_append(
                key,
                &audit::Entry {
                    ts: clock::unix_now(),
                    actor,
                    action: "policy.proposed",
                    target: &format!("proposal {next}"),
                    result: "ok",
                    detail: &format!("from {source}, digest {d}"),
                },
            )
            .await?;
            return Ok(p);
        }
    }
}

/// Claims proposal `id` for a decision by `actor` on JetStream: checks
/// and writes `change` by compare-and-set.
async fn decide_jetstream(
    js: &JetStreamStore,
    key: &AuditKey,
    id: u64,
    actor: &str,
    change: impl Fn(&mut Proposal),
) -> Result<(Proposal, Proposal, u64), ProposalError> {
    for _ in 0..32 {
        let (p, rev) = entry_jetstream(js, id)
            .await?
            .ok_or(ProposalError::NotFound(id))?;
        if p.status != Status::Pending {
            return Err(ProposalError::Decided {
                id,
                status: p.status.name(),
            });
        }
        if p.proposed_by == actor {
            js.audit_append(
                key,
                &audit::Entry {
                    ts: clock::unix_now(),
                    actor,
                    action: "api.refused",
                    target: &format!("proposal {id}"),
                    result: "refused",
                    detail: "deciding their own proposal (two-person rule)",
                },
            )
            .await?;
            return Err(ProposalError::OwnProposal {
                id,
                subject: actor.to_owned(),
            });
        }
        let mut next = p.clone();
        change(&mut next);
        next.decided_at = Some(clock::unix_now().0);
        next.decided_by = Some(actor.to_owned());
        let value = serde_json::to_vec(&next).unwrap_or_default();
        if let Some(new_rev) = js
            .kv_update(BUCKET, &entry_key(id), value, rev)
            .await?
            .then_some(rev + 1)
        {
            return Ok((p, next, new_rev));
        }
    }
    Err(ProposalError::Store(js.error(
        "deciding a policy proposal",
        "the proposal kept changing",
    )))
}

/// [`approve_sqlite`] on the JetStream store.
pub async fn approve_jetstream(
    js: &JetStreamStore,
    key: &AuditKey,
    id: u64,
    actor: &str,
    catalog: &Catalog,
) -> Result<Approved, ProposalError> {
    let (before, mut claimed, _) =
        decide_jetstream(js, key, id, actor, |p| p.status = Status::Approved).await?;
    let source = format!("proposal {id} by {}", before.proposed_by);
    match policy::apply_jetstream(js, key, &before.text, &source, actor, catalog).await {
        Ok(applied) => {
            claimed.version = Some(version_of(&applied));
            // Record the version; a failure here leaves it approved without
            // its number, which `policy history` still shows.
            let value = serde_json::to_vec(&claimed).unwrap_or_default();
            js.kv_put(BUCKET, &entry_key(id), value).await?;
            js.audit_append(
                key,
                &audit::Entry {
                    ts: clock::unix_now(),
                    actor,
                    action: "policy.approved",
                    target: &format!("proposal {id}"),
                    result: "ok",
                    detail: &format!(
                        "proposed by {}, digest {}, in force as policy v{}",
                        before.proposed_by,
                        before.digest,
                        version_of(&applied)
                    ),
                },
            )
            .await?;
            Ok(Approved {
                proposal: claimed,
                applied,
            })
        }
        Err(e) => {
            // Put it back: the hub refused the text (its sinks changed).
            let value = serde_json::to_vec(&before).unwrap_or_default();
            js.kv_put(BUCKET, &entry_key(id), value).await?;
            Err(e.into())
        }
    }
}

/// [`reject_sqlite`] on the JetStream store.
pub async fn reject_jetstream(
    js: &JetStreamStore,
    key: &AuditKey,
    id: u64,
    actor: &str,
    reason: &str,
) -> Result<Proposal, ProposalError> {
    let reason = reason.to_owned();
    let (_, p, _) = decide_jetstream(js, key, id, actor, |p| {
        p.status = Status::Rejected;
        p.reason = Some(reason.clone());
    })
    .await?;
    js.audit_append(
        key,
        &audit::Entry {
            ts: clock::unix_now(),
            actor,
            action: "policy.rejected",
            target: &format!("proposal {id}"),
            result: "ok",
            detail: &format!(
                "proposed by {}, digest {}: {}",
                p.proposed_by,
                p.digest,
                if reason.is_empty() {
                    "no reason given"
                } else {
                    &reason
                }
            ),
        },
    )
    .await?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::open_admin;

    const DENY: &str = "[[rules]]\nstreams = [\"plant/debug/#\"]\naction = \"deny\"\n";

    fn open() -> (tempfile::TempDir, std::path::PathBuf, Connection) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hub.db");
        let conn = open_admin(&path).expect("opens");
        (dir, path, conn)
    }

    fn actions(conn: &Connection, path: &Path) -> Vec<(String, String, String)> {
        audit::list(conn, path, None)
            .expect("lists")
            .into_iter()
            .map(|e| (e.actor, e.action, e.result))
            .collect()
    }

    #[test]
    fn a_proposal_is_applied_only_when_another_subject_approves_it() {
        let (_d, path, mut conn) = open();
        let k = AuditKey::generate().expect("key");
        let c = Catalog::hub(Some("eu-west"));
        let p =
            propose_sqlite(&mut conn, &path, &k, DENY, "api", "oidc:alice", &c).expect("proposes");
        assert_eq!((p.id, p.status), (1, Status::Pending));
        assert!(policy::current(&conn, &path).expect("reads").is_none());
        let own = approve_sqlite(&mut conn, &path, &k, 1, "oidc:alice", &c).expect_err("own");
        assert!(
            matches!(own, ProposalError::OwnProposal { id: 1, .. }),
            "{own}"
        );
        assert!(matches!(
            reject_sqlite(&mut conn, &path, &k, 1, "oidc:alice", "no"),
            Err(ProposalError::OwnProposal { .. })
        ));
        assert!(policy::current(&conn, &path).expect("reads").is_none());
        let a = approve_sqlite(&mut conn, &path, &k, 1, "oidc:bob", &c).expect("approves");
        assert!(matches!(a.applied, Applied::New { version: 1, .. }));
        assert_eq!(
            (
                a.proposal.status,
                a.proposal.version,
                a.proposal.decided_by.as_deref()
            ),
            (Status::Approved, Some(1), Some("oidc:bob"))
        );
        let cur = policy::current(&conn, &path)
            .expect("reads")
            .expect("in force");
        assert_eq!((cur.version, cur.text.as_str()), (1, DENY));
        assert!(matches!(
            approve_sqlite(&mut conn, &path, &k, 1, "oidc:carol", &c),
            Err(ProposalError::Decided {
                id: 1,
                status: "approved"
            })
        ));
        assert!(matches!(
            approve_sqlite(&mut conn, &path, &k, 7, "oidc:carol", &c),
            Err(ProposalError::NotFound(7))
        ));
        let s = |a: &str, b: &str, c: &str| (a.to_owned(), b.to_owned(), c.to_owned());
        assert_eq!(
            actions(&conn, &path),
            [
                s("oidc:alice", "policy.proposed", "ok"),
                s("oidc:alice", "api.refused", "refused"),
                s("oidc:alice", "api.refused", "refused"),
                s("oidc:bob", "policy.applied", "ok"),
                s("oidc:bob", "policy.approved", "ok"),
            ]
        );
        assert!(matches!(
            audit::verify(&conn, &path, &k.public_key(), None).expect("reads"),
            audit::Verdict::Intact { entries: 5, .. }
        ));
    }

    #[test]
    fn a_rejected_or_invalid_proposal_never_applies() {
        let (_d, path, mut conn) = open();
        let k = AuditKey::generate().expect("key");
        let c = Catalog::hub(Some("eu-west"));
        let bad = "[[rules]]\nstreams = [\"#\"]\naction = \"explode\"\n";
        assert!(matches!(
            propose_sqlite(&mut conn, &path, &k, bad, "api", "token:a", &c),
            Err(ProposalError::Policy(ApplyError::Refused { .. }))
        ));
        assert!(list_sqlite(&conn, &path).expect("lists").is_empty());
        propose_sqlite(&mut conn, &path, &k, DENY, "api", "token:a", &c).expect("proposes");
        let r = reject_sqlite(&mut conn, &path, &k, 1, "token:b", "too broad").expect("rejects");
        assert_eq!(
            (r.status, r.reason.as_deref()),
            (Status::Rejected, Some("too broad"))
        );
        assert!(matches!(
            approve_sqlite(&mut conn, &path, &k, 1, "token:c", &c),
            Err(ProposalError::Decided {
                status: "rejected",
                ..
            })
        ));
        assert!(policy::current(&conn, &path).expect("reads").is_none());
        let last = audit::list(&conn, &path, Some(1)).expect("lists").remove(0);
        assert_eq!(last.action, "policy.rejected");
        assert!(last.detail.contains("too broad"), "{}", last.detail);
    }
}
