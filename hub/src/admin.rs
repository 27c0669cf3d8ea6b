//! The operator verbs for the fleet's policy and the audit log:
//! `policy apply|show|history|diff` and `audit list|verify|anchor|key`.
//!
//! They work while the hub runs: `policy apply` writes the store through its
//! own connection (SQLite's lock orders it with the hub's commits), and the
//! running hub picks the new version up within a second. The actor recorded
//! in the audit log is `--actor`, or the login name (`$SUDO_USER`, `$USER`).
//!
//! The verbs that append to the audit log sign their entries with the hub's
//! audit key (`[audit] key`), which they read as the hub does: they run as
//! the hub's user, and are the break-glass path beside the running hub (see
//! `crate::audit::key`).

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use crate::api::types::{
    AuditAnchor, AuditList, AuditPublicKey, PolicyApplied, PolicyApply, PolicyDiff,
    PolicyVersionDoc,
};
use crate::audit::key::{AuditKey, PublicKey};
use crate::clock;
use crate::config::{self, HubConfig, StoreKind};
use crate::policy::{self, Applied, ApplyError, PolicyRecord};
use crate::printable::printable;
use crate::remote::{query, StoreOrApi};
use crate::store::audit::{self, Verdict};
use crate::store::{open_admin, store_path, AtPath as _, StoreReader};
use crate::verbs::config_path;
use crate::verbs::VerbError;

/// `outpost-hub policy …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file and make it the version in force (pushed to
    /// every agent it selects); `--version N` applies version N's text again
    /// (a rollback).
    Apply(PolicyApplyArgs),
    /// Print the version in force, or `--version N`.
    Show(PolicyShowArgs),
    /// Every version: when, by whom, from where, its digest.
    History(PolicyHistoryArgs),
    /// What changed between two versions, as a unified diff.
    Diff(PolicyDiffArgs),
}

/// `outpost-hub policy apply`.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["file", "version"])))]
pub struct PolicyApplyArgs {
    /// The policy document (TOML, see docs/policy.md).
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Apply this stored version's text again instead of a file.
    #[arg(long, value_name = "N")]
    pub version: Option<u64>,
    /// The hub's store (`--config`) or its API (`--api`).
    #[command(flatten)]
    pub at: StoreOrApi,
    /// Who applies it, for the audit log, as `local:NAME` (default: the
    /// login name); with --api the token's subject is recorded instead.
    #[arg(long, value_name = "NAME", conflicts_with = "api")]
    pub actor: Option<String>,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// `outpost-hub policy show`.
#[derive(Debug, Clone, clap::Args)]
pub struct PolicyShowArgs {
    /// The hub's store (`--config`) or its API (`--api`).
    #[command(flatten)]
    pub at: StoreOrApi,
    /// This version instead of the one in force.
    #[arg(long, value_name = "N")]
    pub version: Option<u64>,
    /// Print one JSON document (with the text).
    #[arg(long)]
    pub json: bool,
}

/// `outpost-hub policy history`.
#[derive(Debug, Clone, clap::Args)]
pub struct PolicyHistoryArgs {
    /// The hub's store (`--config`) or its API (`--api`).
    #[command(flatten)]
    pub at: StoreOrApi,
    /// Print one JSON document (an array, without the texts).
    #[arg(long)]
    pub json: bool,
}

/// `outpost-hub policy diff`.
#[derive(Debug, Clone, clap::Args)]
pub struct PolicyDiffArgs {
    /// The older version.
    #[arg(value_name = "A")]
    pub a: u64,
    /// The newer version.
    #[arg(value_name = "B")]
    pub b: u64,
    /// The hub's store (`--config`) or its API (`--api`).
    #[command(flatten)]
    pub at: StoreOrApi,
}

/// `outpost-hub audit …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum AuditCommand {
    /// The newest entries, oldest first.
    List(AuditListArgs),
    /// Check the whole chain and every signature (and an anchor); exit 1
    /// naming the first entry that was edited, forged or removed.
    Verify(AuditVerifyArgs),
    /// Print `ID:HASH` of the newest entry, to keep somewhere else and give
    /// to `audit verify --anchor` later.
    Anchor(AuditAnchorArgs),
    /// Print the audit public key (PEM), which checks the entries'
    /// signatures.
    Key(AuditKeyArgs),
}

/// `outpost-hub audit list`.
#[derive(Debug, Clone, clap::Args)]
pub struct AuditListArgs {
    /// The hub's store (`--config`) or its API (`--api`).
    #[command(flatten)]
    pub at: StoreOrApi,
    /// How many entries (all when not given).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Print one JSON document: `{"entries": [...], "head": "<hash>"}`.
    #[arg(long)]
    pub json: bool,
}

/// `outpost-hub audit verify`.
#[derive(Debug, Clone, clap::Args)]
pub struct AuditVerifyArgs {
    /// The hub's store (`--config`) or its API (`--api`).
    #[command(flatten)]
    pub at: StoreOrApi,
    /// An `ID:HASH` printed by `audit anchor` earlier: entry ID must still be
    /// there with that hash (catches the newest entries cut off).
    #[arg(long, value_name = "ID:HASH", value_parser = parse_anchor)]
    pub anchor: Option<audit::Anchor>,
    /// Check the signatures with this public key (PEM, as `audit key`
    /// prints it) instead of the one of the hub's `[audit] key` (with
    /// --api: instead of the one the hub's API serves).
    #[arg(long, value_name = "FILE")]
    pub public_key: Option<PathBuf>,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// The actor of an audit entry written on the hub's own store (the
/// break-glass path): `local:<--actor or the login name>`, so that it can
/// never pass for an API token's subject.
pub fn local_actor(actor: Option<&str>, env: &[(String, String)]) -> String {
    format!(
        "local:{}",
        actor.map_or_else(|| login_name(env), str::to_owned)
    )
}

fn parse_anchor(s: &str) -> Result<audit::Anchor, String> {
    audit::Anchor::parse(s)
}

/// `outpost-hub audit anchor`.
#[derive(Debug, Clone, clap::Args)]
pub struct AuditAnchorArgs {
    /// The hub's store (`--config`) or its API (`--api`).
    #[command(flatten)]
    pub at: StoreOrApi,
    /// Print one JSON document: `{"id": N, "hash": "...", "anchor": "N:..."}`.
    #[arg(long)]
    pub json: bool,
}

/// `outpost-hub audit key`.
#[derive(Debug, Clone, clap::Args)]
pub struct AuditKeyArgs {
    /// The hub's store (`--config`) or its API (`--api`).
    #[command(flatten)]
    pub at: StoreOrApi,
    /// Print one JSON document: `{"algorithm": "ed25519", "public_key":
    /// "<hex>", "fingerprint": "...", "pem": "..."}`.
    #[arg(long)]
    pub json: bool,
}

/// The audit key of the hub configured in `config` (made if missing): what
/// the verbs that append sign with.
pub fn audit_key(config: &Path, cfg: &HubConfig) -> Result<AuditKey, VerbError> {
    Ok(AuditKey::load_or_create(&cfg.audit_key_path(config))?)
}

/// The audit public key of the hub configured in `config` (the HTTP API
/// serves it; `audit key` prints it). Reads, never makes, the key file.
pub fn audit_public_key(
    config: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<PublicKey, VerbError> {
    let cfg = config::load(config, env)?;
    Ok(AuditKey::load(&cfg.audit_key_path(config))?.public_key())
}

/// The login name, for the audit log.
pub fn login_name(env: &[(String, String)]) -> String {
    let get = |k: &str| {
        env.iter()
            .find(|(n, v)| n == k && !v.is_empty())
            .map(|(_, v)| v.clone())
    };
    get("SUDO_USER")
        .or_else(|| get("USER"))
        .or_else(|| get("LOGNAME"))
        .unwrap_or_else(|| "unknown".to_owned())
}

fn load(config: &Path, env: &[(String, String)]) -> Result<(HubConfig, PathBuf), VerbError> {
    let cfg = config::load(config, env.iter().cloned())?;
    if let StoreKind::JetStream(_) = cfg.store {
        return Err(VerbError::NotSqlite {
            path: config.to_owned(),
            kind: cfg.store.name(),
        });
    }
    let store = store_path(config, &cfg.hub.data_dir);
    Ok((cfg, store))
}

/// Runs a `policy` verb.
pub fn policy(
    command: &PolicyCommand,
    env: &[(String, String)],
    out: &mut dyn io::Write,
) -> Result<(), VerbError> {
    match command {
        PolicyCommand::Apply(args) => {
            if let Some(api) = args.at.api()? {
                let req = match (&args.file, args.version) {
                    (Some(file), _) => PolicyApply {
                        text: Some(std::fs::read_to_string(file).map_err(|source| {
                            VerbError::Policy(ApplyError::Read {
                                path: file.clone(),
                                source,
                            })
                        })?),
                        source: Some(file.display().to_string()),
                        version: None,
                    },
                    (None, v) => PolicyApply {
                        text: None,
                        source: None,
                        version: v,
                    },
                };
                let applied: PolicyApplied = api.post("/policy", &req)?;
                return print_applied(&applied.applied(), args.json, out);
            }
            if let Some(outcome) = apply_on_jetstream(args, env)? {
                return print_applied(&outcome, args.json, out);
            }
            let (cfg, store) = load(config_path(args.at.config.as_deref())?, env)?;
            let catalog = policy::catalog(&cfg);
            let actor = local_actor(args.actor.as_deref(), env);
            let outcome = match (&args.file, args.version) {
                (Some(file), _) => {
                    let text = std::fs::read_to_string(file).map_err(|source| {
                        VerbError::Policy(ApplyError::Read {
                            path: file.clone(),
                            source,
                        })
                    })?;
                    let key = audit_key(config_path(args.at.config.as_deref())?, &cfg)?;
                    let mut conn = admin(&store)?;
                    policy::apply(
                        &mut conn,
                        &store,
                        &key,
                        &text,
                        &file.display().to_string(),
                        &actor,
                        &catalog,
                    )?
                }
                (None, Some(v)) => {
                    let key = audit_key(config_path(args.at.config.as_deref())?, &cfg)?;
                    let mut conn = admin(&store)?;
                    policy::rollback(&mut conn, &store, &key, v, &actor, &catalog)?
                }
                (None, None) => {
                    return Err(VerbError::Usage(
                        "policy apply: give a FILE or --version N".into(),
                    ))
                }
            };
            // A selector that matches no agent the hub knows is legal (the
            // agent may come later) but often a typo: say so, on stderr.
            if let Applied::New { version, .. } = &outcome {
                warn_unselected(&store, *version);
            }
            print_applied(&outcome, args.json, out)?;
        }
        PolicyCommand::Show(args) => {
            let remote = args.at.api()?;
            let (found, wanted) = match remote {
                Some(api) => {
                    let path = format!(
                        "/policy{}",
                        query(&[("version", args.version.map(|v| v.to_string()))])
                    );
                    (api.get::<PolicyVersionDoc>(&path)?.record(), args.version)
                }
                None => local_show(args, env)?,
            };
            let rec = match wanted {
                Some(v) => found.ok_or(VerbError::Policy(ApplyError::UnknownVersion(v)))?,
                None => match found {
                    Some(r) => r,
                    None => {
                        if args.json {
                            writeln!(out, "{}", serde_json::json!({"version": 0}))?;
                        } else {
                            writeln!(
                                out,
                                "no policy applied: every stream is allowed, to the store"
                            )?;
                        }
                        return Ok(out.flush()?);
                    }
                },
            };
            // Never a key: a version of before the key moved to the hub's
            // file shows its `[hashing] key` redacted.
            let rec = PolicyRecord {
                text: outpost_protocols::policy::redact_keys(&rec.text),
                ..rec
            };
            if args.json {
                writeln!(out, "{}", serde_json::to_value(&rec).unwrap_or_default())?;
            } else {
                writeln!(
                    out,
                    "# policy version {} applied {} by {} from {} (sha256 {})",
                    rec.version,
                    crate::verbs::time_text(outpost_protocols::event::Timestamp(rec.applied_at)),
                    rec.actor,
                    rec.source,
                    rec.digest
                )?;
                out.write_all(rec.text.as_bytes())?;
                if !rec.text.ends_with('\n') {
                    writeln!(out)?;
                }
            }
        }
        PolicyCommand::History(args) => {
            let all = match args.at.api()? {
                Some(api) => api
                    .get::<Vec<PolicyVersionDoc>>("/policy/history")?
                    .iter()
                    .filter_map(PolicyVersionDoc::record)
                    .collect(),
                None => {
                    let config = config_path(args.at.config.as_deref())?;
                    match jetstream_policies(config, env)? {
                        Some(all) => all,
                        None => {
                            let (_, store) = load(config, env)?;
                            let reader = StoreReader::open(&store)?;
                            policy::history(reader.connection(), &store)?
                        }
                    }
                }
            };
            if args.json {
                let j: Vec<serde_json::Value> = all
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "version": r.version,
                            "applied_at": r.applied_at,
                            "actor": r.actor,
                            "source": r.source,
                            "digest": r.digest,
                        })
                    })
                    .collect();
                writeln!(out, "{}", serde_json::Value::Array(j))?;
            } else {
                out.write_all(history_text(&all).as_bytes())?;
            }
        }
        PolicyCommand::Diff(args) => {
            let diff = match args.at.api()? {
                Some(api) => {
                    let path = format!("/policy/diff?from={}&to={}", args.a, args.b);
                    api.get::<PolicyDiff>(&path)?.diff
                }
                None => {
                    let (_, store) = load(config_path(args.at.config.as_deref())?, env)?;
                    let reader = StoreReader::open(&store)?;
                    let get = |v: u64| -> Result<PolicyRecord, VerbError> {
                        policy::get(reader.connection(), &store, v)?
                            .ok_or(VerbError::Policy(ApplyError::UnknownVersion(v)))
                    };
                    crate::api::policy::unified_diff(&get(args.a)?, &get(args.b)?)
                }
            };
            write!(out, "{diff}")?;
        }
    }
    out.flush()?;
    Ok(())
}

/// `policy show` on the store itself: the version found and the one asked for.
fn local_show(
    args: &PolicyShowArgs,
    env: &[(String, String)],
) -> Result<(Option<PolicyRecord>, Option<u64>), VerbError> {
    let config = config_path(args.at.config.as_deref())?;
    Ok(match jetstream_policies(config, env)? {
        Some(all) => match args.version {
            Some(v) => (all.into_iter().find(|r| r.version == v), Some(v)),
            None => (all.into_iter().last(), None),
        },
        None => {
            let (_, store) = load(config, env)?;
            let reader = StoreReader::open(&store)?;
            match args.version {
                Some(v) => (policy::get(reader.connection(), &store, v)?, Some(v)),
                None => (policy::current(reader.connection(), &store)?, None),
            }
        }
    })
}

/// `policy apply` on a hub whose store is JetStream; `None` for sqlite.
fn apply_on_jetstream(
    args: &PolicyApplyArgs,
    env: &[(String, String)],
) -> Result<Option<Applied>, VerbError> {
    let config = config_path(args.at.config.as_deref())?;
    let cfg = config::load(config, env.iter().cloned())?;
    if cfg.store.jetstream().is_none() {
        return Ok(None);
    }
    let catalog = policy::catalog(&cfg);
    let actor = local_actor(args.actor.as_deref(), env);
    let (text, source) = match (&args.file, args.version) {
        (Some(file), _) => (None, Some(file.clone())),
        (None, Some(_)) => (None, None),
        (None, None) => {
            return Err(VerbError::Usage(
                "policy apply: give a FILE or --version N".into(),
            ))
        }
    };
    let text = match (&source, text) {
        (Some(file), _) => Some(std::fs::read_to_string(file).map_err(|source| {
            VerbError::Policy(ApplyError::Read {
                path: file.clone(),
                source,
            })
        })?),
        (None, t) => t,
    };
    let version = args.version;
    let key = audit_key(config, &cfg)?;
    crate::verbs::on_jetstream(config, &cfg, |js| async move {
        let (text, source) = match (text, source) {
            (Some(t), Some(f)) => (t, f.display().to_string()),
            _ => {
                let v = version.unwrap_or(0);
                let old = js
                    .policies::<PolicyRecord>()
                    .await?
                    .into_iter()
                    .find(|r| r.version == v)
                    .ok_or(VerbError::Policy(ApplyError::UnknownVersion(v)))?;
                (old.text, format!("rollback to {v}"))
            }
        };
        Ok(policy::apply_jetstream(&js, &key, &text, &source, &actor, &catalog).await?)
    })
}

/// Every policy version of a hub whose store is JetStream; `None` for sqlite.
fn jetstream_policies(
    config: &Path,
    env: &[(String, String)],
) -> Result<Option<Vec<PolicyRecord>>, VerbError> {
    let cfg = config::load(config, env.iter().cloned())?;
    crate::verbs::on_jetstream(config, &cfg, |js| async move { Ok(js.policies().await?) })
}

fn print_applied(outcome: &Applied, json: bool, out: &mut dyn io::Write) -> Result<(), VerbError> {
    if json {
        writeln!(out, "{}", serde_json::to_value(outcome).unwrap_or_default())?;
    } else {
        match outcome {
            Applied::New { version, digest } => writeln!(
                out,
                "policy version {version} applied (sha256 {digest}); connected agents get it within seconds"
            )?,
            Applied::Unchanged { version } => writeln!(
                out,
                "unchanged: this text is policy version {version}, in force already"
            )?,
        }
    }
    Ok(out.flush()?)
}

/// Warns on stderr about every selector of version `version` that selects
/// none of the agents in the registry (when there are any).
fn warn_unselected(store: &Path, version: u64) {
    let Ok(reader) = StoreReader::open(store) else {
        return;
    };
    let fleet = reader.fleet().unwrap_or_default();
    let Ok(Some(rec)) = policy::get(reader.connection(), store, version) else {
        return;
    };
    let Ok(p) = outpost_protocols::policy::Policy::parse_stored(
        &rec.text,
        &outpost_protocols::policy::Catalog::trusting(),
    ) else {
        return;
    };
    for (key, sel) in p.selectors() {
        if !fleet.is_empty() && !fleet.iter().any(|a| sel.selects(&a.labels)) {
            eprintln!(
                "warning: {key}: selects none of the {} agents the hub knows",
                fleet.len()
            );
        }
    }
}

fn admin(store: &Path) -> Result<rusqlite::Connection, VerbError> {
    if let Some(dir) = store.parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            VerbError::Output(io::Error::new(
                e.kind(),
                format!("{}: cannot create data directory: {e}", dir.display()),
            ))
        })?;
    }
    Ok(open_admin(store)?)
}

fn history_text(all: &[PolicyRecord]) -> String {
    if all.is_empty() {
        return "no policy applied yet\n".into();
    }
    let mut s = String::new();
    let newest = all.last().map_or(0, |r| r.version);
    for r in all {
        let _ = writeln!(
            s,
            "v{:<4} {} {:<12} {} sha256:{}{}",
            r.version,
            crate::verbs::time_text(outpost_protocols::event::Timestamp(r.applied_at)),
            r.actor,
            r.source,
            &r.digest[..r.digest.len().min(12)],
            if r.version == newest {
                "  (in force)"
            } else {
                ""
            }
        );
    }
    s
}

/// Every entry (or the newest `limit`) of the hub's audit log, on either
/// store.
fn audit_entries(
    config: &Path,
    env: &[(String, String)],
    limit: Option<usize>,
) -> Result<Vec<audit::Record>, VerbError> {
    let cfg = config::load(config, env.iter().cloned())?;
    if let Some(all) =
        crate::verbs::on_jetstream(
            config,
            &cfg,
            |js| async move { Ok(js.audit_list(limit).await?) },
        )?
    {
        return Ok(all);
    }
    let (_, store) = load(config, env)?;
    let reader = StoreReader::open(&store)?;
    Ok(audit::list(reader.connection(), &store, limit)?)
}

/// Runs an `audit` verb.
pub fn audit(
    command: &AuditCommand,
    env: &[(String, String)],
    out: &mut dyn io::Write,
) -> Result<(), VerbError> {
    match command {
        AuditCommand::List(args) => {
            let entries: Vec<crate::api::types::AuditEntry> = match args.at.api()? {
                Some(api) => {
                    let path = format!(
                        "/audit{}",
                        query(&[("limit", args.limit.map(|l| l.to_string()))])
                    );
                    api.get::<AuditList>(&path)?.entries
                }
                None => audit_entries(config_path(args.at.config.as_deref())?, env, args.limit)?
                    .iter()
                    .map(crate::api::types::AuditEntry::from)
                    .collect(),
            };
            if args.json {
                let head = entries.last().map_or(audit::GENESIS, |e| e.hash.as_str());
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({ "entries": entries, "head": head })
                )?;
            } else if entries.is_empty() {
                writeln!(out, "the audit log is empty")?;
            } else {
                for e in &entries {
                    writeln!(
                        out,
                        "{:>5} {} {:<10} {:<17} {:<8} {} — {}{}",
                        e.id,
                        crate::verbs::time_text(outpost_protocols::event::Timestamp(e.ts)),
                        printable(&e.actor),
                        e.action,
                        e.result,
                        printable(&e.target),
                        printable(&e.detail),
                        if e.sig.is_none() { " (unsigned)" } else { "" }
                    )?;
                }
            }
        }
        AuditCommand::Verify(args) => {
            let given = match &args.public_key {
                Some(f) => Some(PublicKey::read(f)?),
                None => None,
            };
            let verdict = match args.at.api()? {
                Some(api) => {
                    // The hub's own verdict, and a walk here with the key the
                    // operator trusts: a hub that lies about its chain is
                    // caught by the second.
                    let key = match given {
                        Some(k) => k,
                        None => {
                            PublicKey::from_hex(&api.get::<AuditPublicKey>("/audit/key")?.public_key)
                                .ok_or_else(|| {
                                    VerbError::Usage(
                                        "the hub's API served an audit key that is not an Ed25519 public key in hex".into(),
                                    )
                                })?
                        }
                    };
                    let all = api.get::<AuditList>("/audit")?;
                    let records: Vec<audit::Record> = all
                        .entries
                        .iter()
                        .map(crate::api::types::AuditEntry::record)
                        .collect();
                    crate::audit::chain::walk(&records, &key, args.anchor.as_ref())
                }
                None => {
                    let config = config_path(args.at.config.as_deref())?;
                    let cfg = config::load(config, env.iter().cloned())?;
                    let key = match given {
                        Some(k) => k,
                        None => AuditKey::load(&cfg.audit_key_path(config))?.public_key(),
                    };
                    let anchor = args.anchor.clone();
                    let k = key;
                    match crate::verbs::on_jetstream(config, &cfg, |js| async move {
                        let all = js.audit_list(None).await?;
                        Ok(crate::audit::chain::walk(&all, &k, anchor.as_ref()))
                    })? {
                        Some(v) => v,
                        None => {
                            let (_, store) = load(config, env)?;
                            let reader = StoreReader::open(&store)?;
                            audit::verify(reader.connection(), &store, &key, args.anchor.as_ref())?
                        }
                    }
                }
            };
            if args.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_value(&verdict).unwrap_or_default()
                )?;
            }
            match verdict {
                Verdict::Intact {
                    entries,
                    head,
                    first_signed,
                    anchor,
                } => {
                    if !args.json {
                        writeln!(
                            out,
                            "audit log intact: {entries} entries, head {head}; {}{}",
                            signed_text(entries, first_signed),
                            anchor.map_or(String::new(), |a| format!(
                                "; anchor {} holds",
                                a.split(':').next().unwrap_or("")
                            ))
                        )?;
                    }
                }
                Verdict::Broken { id, reason } => {
                    out.flush()?;
                    return Err(VerbError::AuditBroken { id, reason });
                }
            }
        }
        AuditCommand::Anchor(args) => {
            let anchor = match args.at.api()? {
                Some(api) => api.get::<AuditAnchor>("/audit/anchor")?,
                None => {
                    let config = config_path(args.at.config.as_deref())?;
                    let newest = audit_entries(config, env, Some(1))?;
                    AuditAnchor::of(newest.last()).ok_or_else(|| {
                        VerbError::Usage(format!(
                            "{}: the audit log is empty: nothing to anchor yet",
                            config.display()
                        ))
                    })?
                }
            };
            if args.json {
                writeln!(out, "{}", serde_json::to_value(&anchor).unwrap_or_default())?;
            } else {
                writeln!(out, "{}", anchor.anchor)?;
            }
        }
        AuditCommand::Key(args) => {
            let doc = match args.at.api()? {
                Some(api) => api.get::<AuditPublicKey>("/audit/key")?,
                None => AuditPublicKey::of(&audit_public_key(
                    config_path(args.at.config.as_deref())?,
                    env.iter().cloned(),
                )?),
            };
            if args.json {
                writeln!(out, "{}", serde_json::to_value(&doc).unwrap_or_default())?;
            } else {
                out.write_all(doc.pem.as_bytes())?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// Which entries are signed, for `audit verify`'s line.
fn signed_text(entries: u64, first_signed: Option<u64>) -> String {
    match first_signed {
        _ if entries == 0 => "nothing to sign yet".into(),
        None => format!("all {entries} unsigned (written before the hub had an audit key)"),
        Some(1) => format!("all {entries} signed"),
        Some(f) => format!(
            "entries 1-{} unsigned (before {f}), {f}-{entries} signed",
            f - 1
        ),
    }
}

/// A hub's audit log, for the verbs that are not policy verbs (`ca issue
/// --config`), on either store; entries signed with the hub's audit key.
#[derive(Debug)]
pub struct AuditTarget {
    config: PathBuf,
    cfg: HubConfig,
    key: AuditKey,
}

impl AuditTarget {
    /// The audit log of the hub configured in `config`.
    pub fn open(
        config: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<AuditTarget, VerbError> {
        let cfg = config::load(config, env)?;
        let key = audit_key(config, &cfg)?;
        Ok(AuditTarget {
            config: config.to_owned(),
            cfg,
            key,
        })
    }

    /// Records the certificate in `cert_pem` as the one the hub accepts for
    /// `agent_id` (the one it replaces stays accepted for `[hub]
    /// renew_grace`), and `ca.issued` with `detail` and the certificate's
    /// serial and fingerprint (in one transaction on SQLite). Returns the
    /// serial and fingerprint.
    pub fn record_agent_certificate(
        &self,
        actor: &str,
        agent_id: &outpost_protocols::AgentId,
        cert_pem: &Path,
        detail: &str,
    ) -> Result<(String, String), VerbError> {
        let (serial, fingerprint, not_after) = crate::ca::cert_facts_pem(cert_pem)?;
        let now = clock::unix_now();
        let cert = crate::store::CertInfo {
            serial: serial.clone(),
            fingerprint: fingerprint.clone(),
            not_after: outpost_protocols::Timestamp(
                i64::try_from(not_after.unix_timestamp_nanos()).unwrap_or(i64::MAX),
            ),
        };
        let grace = i64::try_from(self.cfg.hub.renew_grace.0.as_nanos()).unwrap_or(i64::MAX);
        let how = crate::store::Rebind::Replace {
            grace_until: outpost_protocols::Timestamp(now.0.saturating_add(grace)),
            actor: None,
        };
        let detail = format!(
            "{detail}; serial {serial}, fingerprint sha256:{fingerprint}, now the agent's bound certificate"
        );
        let target = format!("agent {agent_id}");
        let entry = audit::Entry {
            ts: now,
            actor,
            action: "ca.issued",
            target: &target,
            result: "ok",
            detail: &detail,
        };
        let key = &self.key;
        let (c, h) = (&cert, &how);
        if crate::verbs::on_jetstream(&self.config, &self.cfg, |js| async move {
            js.bind_certificate(agent_id, c, h).await?;
            Ok(js.audit_append(key, &entry).await?)
        })?
        .is_some()
        {
            return Ok((serial, fingerprint));
        }
        let store = store_path(&self.config, &self.cfg.hub.data_dir);
        let mut conn = admin(&store)?;
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .at(&store)?;
        crate::store::bind_certificate(&tx, &store, &self.key, now, agent_id, &cert, &how)?;
        audit::append(&tx, &store, &self.key, &entry)?;
        tx.commit().at(&store)?;
        Ok((serial, fingerprint))
    }

    /// Appends one entry in its own transaction.
    pub fn record(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: &str,
    ) -> Result<u64, VerbError> {
        let entry = audit::Entry {
            ts: clock::unix_now(),
            actor,
            action,
            target,
            result: "ok",
            detail,
        };
        let key = &self.key;
        if let Some(id) = crate::verbs::on_jetstream(&self.config, &self.cfg, |js| async move {
            Ok(js.audit_append(key, &entry).await?)
        })? {
            return Ok(id);
        }
        let store = store_path(&self.config, &self.cfg.hub.data_dir);
        let mut conn = admin(&store)?;
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .at(&store)?;
        let id = audit::append(&tx, &store, &self.key, &entry)?;
        tx.commit().at(&store)?;
        Ok(id)
    }
}
