//! The operator verbs for an agent's standing: `agent label`, `agent revoke`
//! and `agent reinstate`.
//!
//! Labels select the policy's rules, limits and sink topics, so they are the
//! hub's to set, never the agent's to claim: these verbs write them (and
//! revocations) into the registry, audited, and raise the trust generation
//! that the running hub (every replica, on JetStream) polls, so that live
//! sessions follow within a second or two: a revoked agent's session is
//! closed, a relabelled agent's rules are selected again and it is told its
//! new labels. They work on both stores, while the hub runs.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use outpost_protocols::event::Timestamp;
use outpost_protocols::wire::{MAX_LABELS, MAX_LABEL_LEN};
use outpost_protocols::AgentId;

use crate::admin::{audit_key, local_actor};
use crate::audit::key::AuditKey;
use crate::clock;
use crate::config;
use crate::store::jetstream::JetStreamStore;
use crate::store::{open_admin, store_path, trust, LabelChange, Revocation, StoreError};
use crate::verbs::{on_jetstream, VerbError};

/// `outpost-hub agent …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum AgentCommand {
    /// Set (`KEY=VALUE`) or remove (`KEY-`) an agent's labels; they select
    /// its rules, limits and sink topics from then on (audited).
    Label(LabelArgs),
    /// Refuse an agent from now on, and close its live sessions within 5 s
    /// (audited).
    Revoke(RevokeArgs),
    /// Lift an agent's revocation (audited).
    Reinstate(ReinstateArgs),
}

/// `outpost-hub agent label`.
#[derive(Debug, Clone, clap::Args)]
pub struct LabelArgs {
    /// The agent's id.
    #[arg(value_name = "ID", value_parser = AgentId::parse)]
    pub agent: AgentId,
    /// `KEY=VALUE` sets a label, `KEY-` removes one.
    #[arg(value_name = "KEY=VALUE|KEY-", required = true)]
    pub changes: Vec<String>,
    /// The hub's TOML config file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Who changes them, for the audit log (default: the login name).
    #[arg(long, value_name = "NAME")]
    pub actor: Option<String>,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// `outpost-hub agent revoke`.
#[derive(Debug, Clone, clap::Args)]
pub struct RevokeArgs {
    /// The agent's id.
    #[arg(value_name = "ID", value_parser = AgentId::parse)]
    pub agent: AgentId,
    /// Why, for the audit log and the fleet list.
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub reason: String,
    /// The hub's TOML config file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Who revokes it, for the audit log (default: the login name).
    #[arg(long, value_name = "NAME")]
    pub actor: Option<String>,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// `outpost-hub agent reinstate`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReinstateArgs {
    /// The agent's id.
    #[arg(value_name = "ID", value_parser = AgentId::parse)]
    pub agent: AgentId,
    /// The hub's TOML config file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Who reinstates it, for the audit log (default: the login name).
    #[arg(long, value_name = "NAME")]
    pub actor: Option<String>,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// The longest revocation reason kept, in bytes.
pub const MAX_REASON_LEN: usize = 512;

/// One label change asked for on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// `KEY=VALUE`: set it.
    Set(String, String),
    /// `KEY-`: remove it.
    Remove(String),
}

/// Whether one label may be given to an agent: the wire's limits (the agent
/// is told its labels in a `Labels` frame), and text an operator can read
/// back. `agent label` and `enroll create --label` both check by this.
pub(crate) fn check_label(key: &str, value: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_LABEL_LEN {
        return Err(format!("names are 1 to {MAX_LABEL_LEN} bytes"));
    }
    if value.is_empty() || value.len() > MAX_LABEL_LEN {
        return Err(format!(
            "values are 1 to {MAX_LABEL_LEN} bytes (remove a label with KEY-)"
        ));
    }
    if key.contains('=') || key.chars().chain(value.chars()).any(char::is_control) {
        return Err("names hold no '=', and names and values no control characters".into());
    }
    Ok(())
}

/// Parses `KEY=VALUE` and `KEY-`, each checked by [`check_label`].
pub fn parse_edit(s: &str) -> Result<Edit, VerbError> {
    let bad = |why: &str| VerbError::Usage(format!("label {s:?}: {why}"));
    let edit = match s.split_once('=') {
        Some((k, v)) => {
            check_label(k, v).map_err(|why| bad(&why))?;
            Edit::Set(k.to_owned(), v.to_owned())
        }
        None => match s.strip_suffix('-') {
            Some(k) => {
                check_label(k, "-").map_err(|why| bad(&why))?;
                Edit::Remove(k.to_owned())
            }
            None => return Err(bad("write KEY=VALUE to set a label or KEY- to remove one")),
        },
    };
    Ok(edit)
}

/// `labels` with `edits` applied, within [`MAX_LABELS`].
fn edited(
    mut labels: BTreeMap<String, String>,
    edits: &[Edit],
) -> Result<BTreeMap<String, String>, VerbError> {
    for e in edits {
        match e {
            Edit::Set(k, v) => {
                labels.insert(k.clone(), v.clone());
            }
            Edit::Remove(k) => {
                labels.remove(k);
            }
        }
    }
    if labels.len() > MAX_LABELS {
        return Err(VerbError::Usage(format!(
            "{} labels; an agent has at most {MAX_LABELS}",
            labels.len()
        )));
    }
    Ok(labels)
}

/// Runs an `agent` verb.
pub fn agent(
    command: &AgentCommand,
    env: &[(String, String)],
    out: &mut dyn io::Write,
) -> Result<(), VerbError> {
    match command {
        AgentCommand::Label(args) => {
            let edits = args
                .changes
                .iter()
                .map(|c| parse_edit(c))
                .collect::<Result<Vec<_>, _>>()?;
            let actor = local_actor(args.actor.as_deref(), env);
            let change = label(args, &edits, &actor, env)?;
            print_labels(&args.agent, &change, args.json, out)?;
        }
        AgentCommand::Revoke(args) => {
            if args.reason.len() > MAX_REASON_LEN {
                return Err(VerbError::Usage(format!(
                    "--reason: at most {MAX_REASON_LEN} bytes"
                )));
            }
            let actor = local_actor(args.actor.as_deref(), env);
            let (r, new) = revoke(args, &actor, env)?;
            if args.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({
                        "agent_id": args.agent.as_str(),
                        "revoked": true,
                        "new": new,
                        "at": r.at.0,
                        "by": r.by,
                        "reason": r.reason,
                    })
                )?;
            } else if new {
                writeln!(
                    out,
                    "agent {} revoked: refused from now on, live sessions closed within 5 s",
                    args.agent
                )?;
            } else {
                writeln!(
                    out,
                    "agent {} was already revoked by {} ({})",
                    args.agent, r.by, r.reason
                )?;
            }
        }
        AgentCommand::Reinstate(args) => {
            let actor = local_actor(args.actor.as_deref(), env);
            let lifted = reinstate(args, &actor, env)?;
            if args.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({
                        "agent_id": args.agent.as_str(),
                        "reinstated": lifted.is_some(),
                    })
                )?;
            } else if lifted.is_some() {
                writeln!(out, "agent {} reinstated: it may connect again", args.agent)?;
            } else {
                writeln!(out, "agent {} was not revoked; nothing changed", args.agent)?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

fn label(
    args: &LabelArgs,
    edits: &[Edit],
    actor: &str,
    env: &[(String, String)],
) -> Result<LabelChange, VerbError> {
    let cfg = config::load(&args.config, env.iter().cloned())?;
    let key = audit_key(&args.config, &cfg)?;
    let now = clock::unix_now();
    let signer = &key;
    if let Some(change) = on_jetstream(&args.config, &cfg, |js| async move {
        label_jetstream(&js, signer, &args.agent, edits, actor, now).await
    })? {
        return Ok(change);
    }
    let path = store_path(&args.config, &cfg.hub.data_dir);
    label_sqlite(&path, &key, &args.agent, edits, actor, now)
}

/// Applies `edits` to agent `id`'s registry labels on the SQLite store at
/// `path`, audited `agent.labels_changed` by `actor` when they change.
pub fn label_sqlite(
    path: &Path,
    key: &AuditKey,
    id: &AgentId,
    edits: &[Edit],
    actor: &str,
    now: Timestamp,
) -> Result<LabelChange, VerbError> {
    let mut conn = open_admin(path)?;
    trust::edit_labels(
        &mut conn,
        path,
        key,
        id,
        |held| edited(held, edits),
        actor,
        now,
    )
}

/// [`label_sqlite`] on the JetStream store.
pub async fn label_jetstream(
    js: &JetStreamStore,
    key: &AuditKey,
    id: &AgentId,
    edits: &[Edit],
    actor: &str,
    now: Timestamp,
) -> Result<LabelChange, VerbError> {
    let change = js.edit_labels(id, |held| edited(held, edits), now).await?;
    if change.old.as_ref() != Some(&change.new) {
        let json =
            |l: &BTreeMap<String, String>| serde_json::to_string(l).unwrap_or_else(|_| "{}".into());
        let detail = format!(
            "labels {} -> {}",
            change
                .old
                .as_ref()
                .map_or_else(|| "(not registered)".to_owned(), json),
            json(&change.new)
        );
        audit_on_jetstream(js, key, actor, "agent.labels_changed", id, &detail, now).await?;
    }
    Ok(change)
}

fn revoke(
    args: &RevokeArgs,
    actor: &str,
    env: &[(String, String)],
) -> Result<(Revocation, bool), VerbError> {
    let cfg = config::load(&args.config, env.iter().cloned())?;
    let key = audit_key(&args.config, &cfg)?;
    let now = clock::unix_now();
    let (signer, reason) = (&key, args.reason.as_str());
    if let Some(r) = on_jetstream(&args.config, &cfg, |js| async move {
        Ok(revoke_jetstream(&js, signer, &args.agent, reason, actor, now).await?)
    })? {
        return Ok(r);
    }
    let path = store_path(&args.config, &cfg.hub.data_dir);
    revoke_sqlite(&path, &key, &args.agent, &args.reason, actor, now)
}

/// Revokes agent `id` on the SQLite store at `path` (audited
/// `agent.revoked`); the revocation and whether it is new.
pub fn revoke_sqlite(
    path: &Path,
    key: &AuditKey,
    id: &AgentId,
    reason: &str,
    actor: &str,
    now: Timestamp,
) -> Result<(Revocation, bool), VerbError> {
    let mut conn = open_admin(path)?;
    Ok(trust::revoke(&mut conn, path, key, id, reason, actor, now)?)
}

/// [`revoke_sqlite`] on the JetStream store.
pub async fn revoke_jetstream(
    js: &JetStreamStore,
    key: &AuditKey,
    id: &AgentId,
    reason: &str,
    actor: &str,
    now: Timestamp,
) -> Result<(Revocation, bool), StoreError> {
    let (revocation, newly) = js.revoke(id, reason, actor, now).await?;
    if newly {
        let detail = format!("reason: {reason}");
        audit_on_jetstream(js, key, actor, "agent.revoked", id, &detail, now).await?;
    }
    Ok((revocation, newly))
}

fn reinstate(
    args: &ReinstateArgs,
    actor: &str,
    env: &[(String, String)],
) -> Result<Option<Revocation>, VerbError> {
    let cfg = config::load(&args.config, env.iter().cloned())?;
    let key = audit_key(&args.config, &cfg)?;
    let now = clock::unix_now();
    let signer = &key;
    if let Some(r) = on_jetstream(&args.config, &cfg, |js| async move {
        Ok(reinstate_jetstream(&js, signer, &args.agent, actor, now).await?)
    })? {
        return Ok(r);
    }
    let path = store_path(&args.config, &cfg.hub.data_dir);
    reinstate_sqlite(&path, &key, &args.agent, actor, now)
}

/// Lifts agent `id`'s revocation on the SQLite store at `path` (audited
/// `agent.reinstated`); the revocation lifted, `None` if it had none.
pub fn reinstate_sqlite(
    path: &Path,
    key: &AuditKey,
    id: &AgentId,
    actor: &str,
    now: Timestamp,
) -> Result<Option<Revocation>, VerbError> {
    let mut conn = open_admin(path)?;
    Ok(trust::reinstate(&mut conn, path, key, id, actor, now)?)
}

/// [`reinstate_sqlite`] on the JetStream store.
pub async fn reinstate_jetstream(
    js: &JetStreamStore,
    key: &AuditKey,
    id: &AgentId,
    actor: &str,
    now: Timestamp,
) -> Result<Option<Revocation>, StoreError> {
    let lifted = js.reinstate(id).await?;
    if let Some(l) = &lifted {
        let detail = format!("revoked by {} (reason: {})", l.by, l.reason);
        audit_on_jetstream(js, key, actor, "agent.reinstated", id, &detail, now).await?;
    }
    Ok(lifted)
}

/// Appends one entry about agent `id` to a JetStream store's audit log (on
/// SQLite the trust functions append theirs in their own transactions).
async fn audit_on_jetstream(
    js: &JetStreamStore,
    key: &AuditKey,
    actor: &str,
    action: &str,
    id: &AgentId,
    detail: &str,
    now: Timestamp,
) -> Result<u64, StoreError> {
    js.audit_append(
        key,
        &crate::store::audit::Entry {
            ts: now,
            actor,
            action,
            target: id.as_str(),
            result: "ok",
            detail,
        },
    )
    .await
}

fn print_labels(
    id: &AgentId,
    change: &LabelChange,
    json: bool,
    out: &mut dyn io::Write,
) -> Result<(), VerbError> {
    let text = |l: &BTreeMap<String, String>| {
        if l.is_empty() {
            "(none)".to_owned()
        } else {
            l.iter()
                .map(|(k, v)| format!("{k}={}", v.escape_debug()))
                .collect::<Vec<_>>()
                .join(",")
        }
    };
    if json {
        writeln!(
            out,
            "{}",
            serde_json::json!({
                "agent_id": id.as_str(),
                "old": change.old,
                "new": change.new,
                "changed": change.old.as_ref() != Some(&change.new),
            })
        )?;
    } else if change.old.as_ref() == Some(&change.new) {
        writeln!(out, "agent {id} labels unchanged: {}", text(&change.new))?;
    } else {
        writeln!(
            out,
            "agent {id} labels {} -> {}",
            change
                .old
                .as_ref()
                .map_or_else(|| "(not registered)".to_owned(), text),
            text(&change.new)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn edits_set_and_remove_labels() {
        let edits: Vec<Edit> = ["site=b", "line-", "zone=north"]
            .iter()
            .map(|s| parse_edit(s).expect("valid"))
            .collect();
        let out = edited(labels(&[("site", "a"), ("line", "3")]), &edits).expect("fits");
        assert_eq!(out, labels(&[("site", "b"), ("zone", "north")]));
    }

    #[test]
    fn bad_edits_are_refused_with_a_reason() {
        for bad in ["site", "=a", "site=", "-", "a\u{1b}b=c", "site=a\u{7}b"] {
            let e = parse_edit(bad).expect_err(bad).to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        let long = format!("k={}", "v".repeat(MAX_LABEL_LEN + 1));
        assert!(parse_edit(&long).is_err());
        let many: Vec<Edit> = (0..=MAX_LABELS)
            .map(|i| Edit::Set(format!("k{i}"), "v".into()))
            .collect();
        assert!(edited(BTreeMap::new(), &many).is_err());
    }
}
