//! `outpost-hub token create|list|revoke`: static API tokens, made and
//! revoked on the hub's machine (the break-glass path; over the API an
//! admin does the same). They work on either store, while the hub runs.

use std::io;
use std::path::PathBuf;

use outpost_settings::HumanDuration;

use crate::admin::{audit_key, local_actor};
use crate::api::auth::role::Role;
use crate::api::auth::tokens::{self, Created, TokenError, TokenRecord, DEFAULT_TTL};
use crate::clock;
use crate::config::{self, ConfigError};
use crate::store::{open_admin, store_path, StoreError, StoreReader};
use crate::verbs::{on_jetstream, time_text, VerbError};

/// `outpost-hub token …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum TokenCommand {
    /// Make a token and print it once: only its hash is stored.
    Create(TokenCreateArgs),
    /// Every token: name, role, state, expiry, who made and revoked it.
    List(TokenListArgs),
    /// Revoke a token: it stops working at once.
    Revoke(TokenRevokeArgs),
}

/// `outpost-hub token create`.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenCreateArgs {
    /// Its name; the caller's subject (the audit actor) is `token:NAME`.
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// viewer, operator, policy-author, approver or admin.
    #[arg(long, value_name = "ROLE")]
    pub role: Role,
    /// How long it works (`30d`, `12h`); default 90 days.
    #[arg(long, value_name = "D", value_parser = HumanDuration::parse)]
    pub ttl: Option<HumanDuration>,
    /// The hub's TOML config file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Who makes it, for the audit log (default: `local:<login>`).
    #[arg(long, value_name = "NAME")]
    pub actor: Option<String>,
    /// Print one JSON document (with the token).
    #[arg(long)]
    pub json: bool,
}

/// `outpost-hub token list`.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenListArgs {
    /// The hub's TOML config file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Print one JSON document (an array; never the tokens themselves).
    #[arg(long)]
    pub json: bool,
}

/// `outpost-hub token revoke`.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenRevokeArgs {
    /// The token's name.
    #[arg(value_name = "NAME")]
    pub name: String,
    /// The hub's TOML config file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Who revokes it, for the audit log (default: `local:<login>`).
    #[arg(long, value_name = "NAME")]
    pub actor: Option<String>,
    /// Print one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// Why a `token` verb failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenVerbError {
    /// Reading the config or the store, or writing the output.
    #[error(transparent)]
    Verb(#[from] VerbError),
    /// The token verb itself.
    #[error(transparent)]
    Token(#[from] TokenError),
}

impl From<ConfigError> for TokenVerbError {
    fn from(e: ConfigError) -> Self {
        TokenVerbError::Verb(VerbError::Config(e))
    }
}
impl From<StoreError> for TokenVerbError {
    fn from(e: StoreError) -> Self {
        TokenVerbError::Verb(VerbError::Store(e))
    }
}
impl From<io::Error> for TokenVerbError {
    fn from(e: io::Error) -> Self {
        TokenVerbError::Verb(VerbError::Output(e))
    }
}

impl TokenVerbError {
    /// The exit status: 2 for bad input, 1 for a store that failed.
    pub fn exit_code(&self) -> u8 {
        match self {
            TokenVerbError::Verb(e) => e.exit_code(),
            TokenVerbError::Token(e) => e.exit_code(),
        }
    }

    /// Whether the output's reader went away.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, TokenVerbError::Verb(e) if e.is_broken_pipe())
    }
}

/// The break-glass actor, as every verb on the store records it.
fn actor(given: &Option<String>, env: &[(String, String)]) -> String {
    local_actor(given.as_deref(), env)
}

/// Runs a `token` verb.
pub fn token(
    command: &TokenCommand,
    env: &[(String, String)],
    out: &mut dyn io::Write,
) -> Result<(), TokenVerbError> {
    match command {
        TokenCommand::Create(args) => {
            let cfg = config::load(&args.config, env.iter().cloned())?;
            let who = actor(&args.actor, env);
            let key = audit_key(&args.config, &cfg)?;
            let ttl = args.ttl.map_or(DEFAULT_TTL, |t| t.0);
            let made = match on_jetstream(&args.config, &cfg, |js| {
                let (name, role, who, key) =
                    (args.name.clone(), args.role, who.clone(), key.clone());
                async move { Ok(tokens::create_jetstream(&js, &key, &name, role, ttl, &who).await) }
            })? {
                Some(r) => r?,
                None => {
                    let path = store_path(&args.config, &cfg.hub.data_dir);
                    if let Some(dir) = path.parent() {
                        std::fs::create_dir_all(dir).map_err(|e| {
                            io::Error::new(
                                e.kind(),
                                format!("{}: cannot create data directory: {e}", dir.display()),
                            )
                        })?;
                    }
                    let mut conn = open_admin(&path)?;
                    tokens::create_sqlite(&mut conn, &path, &key, &args.name, args.role, ttl, &who)?
                }
            };
            print_created(&made, args.json, out)?;
        }
        TokenCommand::List(args) => {
            let cfg = config::load(&args.config, env.iter().cloned())?;
            let all = match on_jetstream(&args.config, &cfg, |js| async move {
                Ok(tokens::list_jetstream(&js).await?)
            })? {
                Some(all) => all,
                None => {
                    let path = store_path(&args.config, &cfg.hub.data_dir);
                    let reader = StoreReader::open(&path)?;
                    tokens::list_sqlite(reader.connection(), &path)?
                }
            };
            print_list(&all, args.json, out)?;
        }
        TokenCommand::Revoke(args) => {
            let cfg = config::load(&args.config, env.iter().cloned())?;
            let who = actor(&args.actor, env);
            let key = audit_key(&args.config, &cfg)?;
            let now = match on_jetstream(&args.config, &cfg, |js| {
                let (name, who, key) = (args.name.clone(), who.clone(), key.clone());
                async move { Ok(tokens::revoke_jetstream(&js, &key, &name, &who).await) }
            })? {
                Some(r) => r?,
                None => {
                    let path = store_path(&args.config, &cfg.hub.data_dir);
                    let mut conn = open_admin(&path)?;
                    tokens::revoke_sqlite(&mut conn, &path, &key, &args.name, &who)?
                }
            };
            if args.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"name": args.name, "revoked": true, "already": !now})
                )?;
            } else if now {
                writeln!(out, "token {} revoked: it stops working at once", args.name)?;
            } else {
                writeln!(out, "token {} was revoked already", args.name)?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

fn print_created(made: &Created, json: bool, out: &mut dyn io::Write) -> io::Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_value(made).unwrap_or_default())
    } else {
        writeln!(out, "{}", made.token)?;
        writeln!(
            out,
            "# token {} (subject token:{}), role {}, expires {}; shown only now: store it in a file only its user reads",
            made.record.name,
            made.record.name,
            made.record.role,
            time_text(outpost_protocols::event::Timestamp(made.record.expires_at))
        )
    }
}

fn print_list(all: &[TokenRecord], json: bool, out: &mut dyn io::Write) -> io::Result<()> {
    let now = clock::unix_now();
    if json {
        let j: Vec<serde_json::Value> = all
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["state"] = serde_json::Value::from(r.state(now));
                v
            })
            .collect();
        return writeln!(out, "{}", serde_json::Value::Array(j));
    }
    if all.is_empty() {
        return writeln!(out, "no API tokens");
    }
    writeln!(
        out,
        "{:<24} {:<14} {:<8} {:<20} {:<20} CREATED BY",
        "NAME", "ROLE", "STATE", "EXPIRES", "CREATED"
    )?;
    for r in all {
        writeln!(
            out,
            "{:<24} {:<14} {:<8} {:<20} {:<20} {}{}",
            r.name,
            r.role.name(),
            r.state(now),
            time_text(outpost_protocols::event::Timestamp(r.expires_at)),
            time_text(outpost_protocols::event::Timestamp(r.created_at)),
            r.created_by,
            r.revoked_by
                .as_deref()
                .map(|b| format!(", revoked by {b}"))
                .unwrap_or_default()
        )?;
    }
    Ok(())
}
