//! `outpost-hub enroll create|list|revoke`: the operator's side of
//! enrollment, on either store (like `fleet list`), while the hub runs or
//! not.
//!
//! `create` prints the token once: on stdout alone (text) so that
//! `outpost-hub enroll create ... > token` makes the device's token file, or
//! in one JSON object; nothing else ever shows it again.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use outpost_protocols::wire::MAX_LABELS;
use outpost_protocols::AgentId;

use super::tokens::{labels_text, new_enrollment, parse_ttl, TokenError, Tokens};
use crate::clock;
use crate::config::{self, HubConfig};
use crate::store::{store_path, EnrollmentRecord};
use crate::verbs::VerbError;

/// `outpost-hub enroll …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum EnrollCommand {
    /// Make a one-time token that enrolls one agent id (printed once).
    Create(CreateArgs),
    /// Every token: id, agent, state (pending, used, expired, revoked),
    /// expiry, labels; never the token itself.
    List(ListArgs),
    /// Revoke pending tokens: one by its id (from `enroll list`), or every
    /// pending token of an agent.
    Revoke(RevokeArgs),
}

/// `enroll create`.
#[derive(Debug, Clone, clap::Args)]
pub struct CreateArgs {
    /// The agent id the token enrolls (and no other).
    #[arg(long, value_name = "ID", value_parser = AgentId::parse)]
    pub agent: AgentId,
    /// A label the agent gets in the registry (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    pub label: Vec<String>,
    /// How long the token stays usable (1m to 30d).
    #[arg(long, value_name = "DURATION", default_value = "1h")]
    pub ttl: String,
    /// The hub's TOML config file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Who makes it, for the audit log (default: the login name).
    #[arg(long, value_name = "NAME")]
    pub actor: Option<String>,
    /// Print `{"agent_id":…,"token":…,"expires_at":…}`.
    #[arg(long)]
    pub json: bool,
}

/// `enroll list`.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// The hub's TOML config file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Print one JSON document (an array of objects).
    #[arg(long)]
    pub json: bool,
}

/// `enroll revoke`.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["id", "agent"])))]
pub struct RevokeArgs {
    /// The token's id, as `enroll list` shows it.
    #[arg(value_name = "TOKEN_ID")]
    pub id: Option<String>,
    /// Every pending token of this agent id.
    #[arg(long, value_name = "ID", value_parser = AgentId::parse)]
    pub agent: Option<AgentId>,
    /// The hub's TOML config file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Who revokes, for the audit log (default: the login name).
    #[arg(long, value_name = "NAME")]
    pub actor: Option<String>,
    /// Print one JSON document (the revoked tokens).
    #[arg(long)]
    pub json: bool,
}

/// Why an `enroll` verb failed; its message is the one line printed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollVerbError {
    /// The config, the store or the output.
    #[error(transparent)]
    Verb(#[from] VerbError),
    /// The tokens could not be made, read or written.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A flag's value is not usable.
    #[error("{0}")]
    Usage(String),
}

impl From<io::Error> for EnrollVerbError {
    fn from(e: io::Error) -> EnrollVerbError {
        EnrollVerbError::Verb(VerbError::Output(e))
    }
}

impl EnrollVerbError {
    /// 2 for bad input, 1 for a store that failed.
    pub fn exit_code(&self) -> u8 {
        match self {
            EnrollVerbError::Verb(e) => e.exit_code(),
            EnrollVerbError::Token(_) => 1,
            EnrollVerbError::Usage(_) => 2,
        }
    }

    /// Whether the output's reader went away.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, EnrollVerbError::Verb(e) if e.is_broken_pipe())
    }
}

/// Runs an `enroll` verb with the environment `env`, printing to `out`.
pub fn enroll(
    command: &EnrollCommand,
    env: &[(String, String)],
    out: &mut dyn io::Write,
) -> Result<(), EnrollVerbError> {
    match command {
        EnrollCommand::Create(args) => create(args, env, out)?,
        EnrollCommand::List(args) => {
            let cfg = load(&args.config, env)?;
            let now = clock::unix_now().0;
            let all = with_tokens(&args.config, &cfg, |t| async move { t.list().await })?;
            if args.json {
                let v: Vec<serde_json::Value> = all.iter().map(|r| record_json(r, now)).collect();
                writeln!(out, "{}", serde_json::Value::Array(v))?;
            } else if all.is_empty() {
                writeln!(out, "no enrollment tokens")?;
            } else {
                for r in &all {
                    writeln!(
                        out,
                        "{}  {}  {:<7}  expires {}  by {}{}{}",
                        r.id(),
                        r.agent_id,
                        r.state(now),
                        rfc3339(r.expires_at),
                        r.created_by,
                        r.used_from
                            .as_ref()
                            .map_or(String::new(), |f| format!("  used from {f}")),
                        if r.labels.is_empty() {
                            String::new()
                        } else {
                            format!("  labels {}", labels_text(&r.labels))
                        }
                    )?;
                }
            }
        }
        EnrollCommand::Revoke(args) => {
            let cfg = load(&args.config, env)?;
            let actor = crate::admin::local_actor(args.actor.as_deref(), env);
            let (id, agent) = (args.id.clone(), args.agent.clone());
            if let Some(id) = &id {
                if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(EnrollVerbError::Usage(format!(
                        "TOKEN_ID {id:?}: give the 12 hex digits `enroll list` shows"
                    )));
                }
            }
            let revoked = with_tokens(&args.config, &cfg, |t| async move {
                t.revoke(&actor, clock::unix_now(), move |r| {
                    id.as_deref()
                        .is_none_or(|i| r.id() == i.to_ascii_lowercase())
                        && agent.as_ref().is_none_or(|a| r.agent_id == a.as_str())
                })
                .await
            })?;
            if revoked.is_empty() {
                return Err(EnrollVerbError::Usage(
                    "no pending token matches (see `outpost-hub enroll list`)".into(),
                ));
            }
            let now = clock::unix_now().0;
            if args.json {
                let v: Vec<serde_json::Value> =
                    revoked.iter().map(|r| record_json(r, now)).collect();
                writeln!(out, "{}", serde_json::Value::Array(v))?;
            } else {
                for r in &revoked {
                    writeln!(out, "revoked token {} for {}", r.id(), r.agent_id)?;
                }
            }
        }
    }
    out.flush()?;
    Ok(())
}

fn create(
    args: &CreateArgs,
    env: &[(String, String)],
    out: &mut dyn io::Write,
) -> Result<(), EnrollVerbError> {
    let cfg = load(&args.config, env)?;
    let labels = parse_labels(&args.label)?;
    let ttl = parse_ttl(&args.ttl).ok_or_else(|| {
        EnrollVerbError::Usage(format!(
            "--ttl {:?}: give a duration from 1m to 30d (`1h`, `2d`)",
            args.ttl
        ))
    })?;
    let actor = crate::admin::local_actor(args.actor.as_deref(), env);
    let (token, rec) = new_enrollment(&args.agent, labels, actor, ttl)?;
    let stored = rec.clone();
    with_tokens(
        &args.config,
        &cfg,
        |t| async move { t.create(stored).await },
    )?;
    if args.json {
        let v = serde_json::json!({
            "agent_id": rec.agent_id,
            "token": token,
            "expires_at": rfc3339(rec.expires_at),
            "id": rec.id(),
        });
        writeln!(out, "{v}")?;
    } else {
        writeln!(out, "{token}")?;
        eprintln!(
            "token {} enrolls {} once, until {}; give it to the device (`outpost-agent enroll --token-file FILE`)",
            rec.id(),
            rec.agent_id,
            rfc3339(rec.expires_at)
        );
    }
    Ok(())
}

fn load(config: &Path, env: &[(String, String)]) -> Result<HubConfig, EnrollVerbError> {
    Ok(config::load(config, env.iter().cloned()).map_err(VerbError::from)?)
}

/// Runs `f` with the tokens of the hub `cfg` describes, on a runtime of its
/// own (the verbs are synchronous).
fn with_tokens<T, F, Fut>(config: &Path, cfg: &HubConfig, f: F) -> Result<T, EnrollVerbError>
where
    F: FnOnce(Tokens) -> Fut,
    Fut: std::future::Future<Output = Result<T, TokenError>>,
{
    let key = crate::admin::audit_key(config, cfg)?;
    if cfg.store.jetstream().is_some() {
        let out = crate::verbs::on_jetstream(config, cfg, |js| async move {
            Ok(f(Tokens::JetStream(Box::new(js), key)).await)
        })?;
        return match out {
            Some(r) => Ok(r?),
            None => Err(EnrollVerbError::Usage("no JetStream store".into())),
        };
    }
    let path = store_path(config, &cfg.hub.data_dir);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{}: cannot create data directory: {e}", dir.display()),
            )
        })?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(f(Tokens::Sqlite(path, key)))?)
}

/// `KEY=VALUE` flags into labels, within the protocol's limits.
fn parse_labels(flags: &[String]) -> Result<BTreeMap<String, String>, EnrollVerbError> {
    let mut labels = BTreeMap::new();
    for f in flags {
        let bad = |why: &str| EnrollVerbError::Usage(format!("--label {f:?}: {why}"));
        let (k, v) = f.split_once('=').ok_or_else(|| bad("give KEY=VALUE"))?;
        crate::agents::check_label(k, v).map_err(|why| bad(&why))?;
        if labels.insert(k.to_owned(), v.to_owned()).is_some() {
            return Err(bad("this key is given twice"));
        }
    }
    if labels.len() > MAX_LABELS {
        return Err(EnrollVerbError::Usage(format!(
            "{} labels; at most {MAX_LABELS}",
            labels.len()
        )));
    }
    Ok(labels)
}

/// Unix ns as RFC 3339, UTC, whole seconds.
fn rfc3339(ns: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

fn opt_rfc3339(ns: Option<i64>) -> serde_json::Value {
    ns.map_or(serde_json::Value::Null, |n| rfc3339(n).into())
}

/// `enroll list --json`: one object per token; never the token.
fn record_json(r: &EnrollmentRecord, now: i64) -> serde_json::Value {
    serde_json::json!({
        "id": r.id(),
        "agent_id": r.agent_id,
        "state": r.state(now),
        "labels": r.labels,
        "created_at": rfc3339(r.created_at),
        "created_by": r.created_by,
        "expires_at": rfc3339(r.expires_at),
        "used_at": opt_rfc3339(r.used_at),
        "used_from": r.used_from,
        "revoked_at": opt_rfc3339(r.revoked_at),
        "serial": r.serial,
        "fingerprint": r.fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_key_value_within_limits() {
        let ok = parse_labels(&["site=plant-1".into(), "line=2".into()]).expect("ok");
        assert_eq!(ok.get("site").map(String::as_str), Some("plant-1"));
        for bad in ["site", "=x", "a=b\u{1b}[2J"] {
            assert!(parse_labels(&[bad.into()]).is_err(), "{bad}");
        }
        assert!(parse_labels(&["a=1".into(), "a=2".into()]).is_err());
    }

    #[test]
    fn times_print_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_000_000_000), "2023-11-14T22:13:20Z");
    }
}
