//! `outpost-hub command send|status|list`: with `--config`, the break-glass
//! path, on the store directly (SQLite), acting as `local:<login>` in the
//! `admin` role; with `--api`, a client of the hub's API, acting as the
//! token's subject in its role. The API's handlers call the same functions
//! as the direct path, so both print the same records.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use outpost_protocols::wire::command::Action;
use outpost_protocols::{AgentId, Value};

use super::{CommandStore, CommandsError, SendRequest, Targets};
use crate::config::{self, HubConfig};
use crate::remote::{query, StoreOrApi};
use crate::store::commands::CommandRecord;
use crate::store::store_path;
use crate::verbs::{config_path, VerbError};

/// `outpost-hub command`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CommandVerb {
    /// Send a command to one agent or to every agent a selector matches.
    Send(SendArgs),
    /// One command's state and outcome.
    Status(StatusArgs),
    /// The newest commands.
    List(ListArgs),
}

/// `command send`.
#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("to").required(true).args(["agent", "select"])))]
#[command(group(clap::ArgGroup::new("what").required(true).args(["write", "publish", "read"])))]
pub struct SendArgs {
    /// The agent.
    #[arg(long, value_name = "ID", value_parser = AgentId::parse)]
    pub agent: Option<AgentId>,
    /// Every agent whose registry label KEY matches PATTERN (`*` globs);
    /// repeatable, all must match.
    #[arg(long, value_name = "KEY=PATTERN")]
    pub select: Vec<String>,
    /// Write VALUE (a number, true/false, or text) to a writable tag.
    #[arg(long, value_name = "DEVICE/TAG=VALUE")]
    pub write: Option<String>,
    /// Publish on the site broker (with --payload).
    #[arg(long, value_name = "TOPIC", requires = "payload")]
    pub publish: Option<String>,
    /// The payload of --publish.
    #[arg(long, value_name = "TEXT")]
    pub payload: Option<String>,
    /// The QoS of --publish.
    #[arg(long, value_name = "0|1|2", default_value_t = 1)]
    pub qos: u8,
    /// Read a tag now.
    #[arg(long, value_name = "DEVICE/TAG")]
    pub read: Option<String>,
    /// How long the command may wait for an agent that is away (at most 7d).
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    pub ttl: String,
    /// The hub's store (`--config`) or its API (`--api`).
    #[command(flatten)]
    pub at: StoreOrApi,
    /// Print one JSON document (an array of the commands).
    #[arg(long)]
    pub json: bool,
}

/// `command status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// The command's id.
    #[arg(value_name = "ID")]
    pub id: String,
    /// The hub's store (`--config`) or its API (`--api`).
    #[command(flatten)]
    pub at: StoreOrApi,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `command list`.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// Only this agent's.
    #[arg(long, value_name = "ID", value_parser = AgentId::parse)]
    pub agent: Option<AgentId>,
    /// At most this many, newest first.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub limit: usize,
    /// The hub's store (`--config`) or its API (`--api`).
    #[command(flatten)]
    pub at: StoreOrApi,
    /// Print one JSON document (an array).
    #[arg(long)]
    pub json: bool,
}

/// Why a `command` verb failed; its message is the one line printed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandVerbError {
    /// The config, the store or the output.
    #[error(transparent)]
    Verb(#[from] VerbError),
    /// Sending, or reading the commands, failed.
    #[error(transparent)]
    Commands(#[from] CommandsError),
    /// A flag's value is not usable.
    #[error("{0}")]
    Usage(String),
    /// Every command was refused at the hub (printed above).
    #[error("refused: {0}")]
    Refused(String),
}

impl From<io::Error> for CommandVerbError {
    fn from(e: io::Error) -> CommandVerbError {
        CommandVerbError::Verb(VerbError::Output(e))
    }
}

impl CommandVerbError {
    /// 2 for bad input, 1 for a refusal or a store that failed.
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandVerbError::Verb(e) => e.exit_code(),
            CommandVerbError::Commands(
                CommandsError::NoAgent(_) | CommandsError::Ttl(_) | CommandsError::Command(_),
            )
            | CommandVerbError::Usage(_) => 2,
            CommandVerbError::Commands(_) | CommandVerbError::Refused(_) => 1,
        }
    }

    /// Whether the output's reader went away.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, CommandVerbError::Verb(e) if e.is_broken_pipe())
    }
}

/// Runs a `command` verb with the environment `env`, printing to `out`.
pub fn command(
    verb: &CommandVerb,
    env: &[(String, String)],
    out: &mut dyn io::Write,
) -> Result<(), CommandVerbError> {
    match verb {
        CommandVerb::Send(args) => {
            let sent = match args.at.api().map_err(VerbError::from)? {
                Some(api) => api
                    .post("/commands", &send_body(args)?)
                    .map_err(VerbError::from)?,
                None => {
                    let request = send_request(args)?;
                    let store = open(config_path(args.at.config.as_deref())?, env)?;
                    let actor = format!("local:{}", crate::admin::login_name(env));
                    super::send(&store, &actor, "admin", &request)?
                }
            };
            print(out, &sent, args.json)?;
            if sent.iter().all(|c| c.state == "refused") {
                let why = sent
                    .first()
                    .and_then(|c| c.reason.clone())
                    .unwrap_or_default();
                return Err(CommandVerbError::Refused(why));
            }
        }
        CommandVerb::Status(args) => {
            let found = match args.at.api().map_err(VerbError::from)? {
                Some(api) => {
                    match api.get(&format!("/commands/{}", crate::remote::encode(&args.id))) {
                        Ok(c) => Some(c),
                        Err(crate::remote::RemoteError::Problem { problem, .. })
                            if problem.status == 404 =>
                        {
                            None
                        }
                        Err(e) => return Err(VerbError::from(e).into()),
                    }
                }
                None => {
                    let store = open(config_path(args.at.config.as_deref())?, env)?;
                    super::status(&store, &args.id)?
                }
            };
            match found {
                Some(c) => print_one(out, &c, args.json)?,
                None => {
                    return Err(CommandVerbError::Usage(format!(
                        "no command {:?} (see `outpost-hub command list`)",
                        args.id
                    )))
                }
            }
        }
        CommandVerb::List(args) => {
            let all: Vec<CommandRecord> = match args.at.api().map_err(VerbError::from)? {
                Some(api) => api
                    .get(&format!(
                        "/commands{}",
                        query(&[
                            ("agent", args.agent.as_ref().map(ToString::to_string)),
                            ("limit", Some(args.limit.to_string())),
                        ])
                    ))
                    .map_err(VerbError::from)?,
                None => {
                    let store = open(config_path(args.at.config.as_deref())?, env)?;
                    super::list(&store, args.agent.as_ref(), args.limit)?
                }
            };
            if !args.json && all.is_empty() {
                writeln!(out, "no commands")?;
            } else {
                print(out, &all, args.json)?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

fn open(config_file: &Path, env: &[(String, String)]) -> Result<CommandStore, CommandVerbError> {
    let cfg: HubConfig = config::load(config_file, env.iter().cloned()).map_err(VerbError::from)?;
    if cfg.store.jetstream().is_some() {
        return Err(CommandVerbError::Usage(
            "commands need the SQLite store: the JetStream store has no commands bucket yet".into(),
        ));
    }
    let key = crate::admin::audit_key(config_file, &cfg)?;
    let path = store_path(config_file, &cfg.hub.data_dir);
    Ok(CommandStore::open(&path, key).map_err(CommandsError::from)?)
}

/// The API's body for what the flags describe (checked by the API, which
/// parses it into the same request as [`send_request`]).
fn send_body(args: &SendArgs) -> Result<serde_json::Value, CommandVerbError> {
    let request = send_request(args)?;
    let mut body = serde_json::Map::new();
    match &request.targets {
        Targets::Agent(id) => body.insert("agent".into(), id.to_string().into()),
        Targets::Select(p) => body.insert("select".into(), serde_json::json!(p)),
    };
    let (key, what) = match &request.action {
        Action::Write { stream, value } => (
            "write",
            serde_json::json!({"tag": stream.as_str(), "value": value.to_json()}),
        ),
        Action::Publish {
            topic,
            payload,
            qos,
            retain,
        } => (
            "publish",
            serde_json::json!({"topic": topic, "payload": String::from_utf8_lossy(payload), "qos": qos, "retain": retain}),
        ),
        Action::Read { stream } => ("read", serde_json::json!({"tag": stream.as_str()})),
        _ => {
            return Err(CommandVerbError::Usage(
                "give --write, --publish or --read".into(),
            ))
        }
    };
    body.insert(key.into(), what);
    body.insert("ttl".into(), args.ttl.clone().into());
    Ok(body.into())
}

/// The request the flags describe.
fn send_request(args: &SendArgs) -> Result<SendRequest, CommandVerbError> {
    let usage = CommandVerbError::Usage;
    let targets = match &args.agent {
        Some(id) => Targets::Agent(id.clone()),
        None => {
            let mut patterns = BTreeMap::new();
            for s in &args.select {
                let (k, v) = s
                    .split_once('=')
                    .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                    .ok_or_else(|| usage(format!("--select {s:?}: give KEY=PATTERN")))?;
                patterns.insert(k.to_owned(), v.to_owned());
            }
            Targets::Select(patterns)
        }
    };
    let stream =
        |s: &str, flag: &str| super::tag_stream(s).map_err(|e| usage(format!("{flag} {e}")));
    let action = if let Some(w) = &args.write {
        let (tag, value) = w
            .split_once('=')
            .ok_or_else(|| usage(format!("--write {w:?}: give DEVICE/TAG=VALUE")))?;
        Action::Write {
            stream: stream(tag, "--write")?,
            value: parse_value(value),
        }
    } else if let Some(topic) = &args.publish {
        if args.qos > 2 {
            return Err(usage(format!("--qos {}: give 0, 1 or 2", args.qos)));
        }
        Action::Publish {
            topic: topic.clone(),
            payload: args.payload.clone().unwrap_or_default().into_bytes(),
            qos: args.qos,
            retain: false,
        }
    } else if let Some(r) = &args.read {
        Action::Read {
            stream: stream(r, "--read")?,
        }
    } else {
        return Err(usage("give --write, --publish or --read".into()));
    };
    action
        .check()
        .map_err(|e| usage(format!("the command: {e}")))?;
    let ttl = super::parse_ttl(Some(&args.ttl)).map_err(|e| usage(format!("--ttl {e}")))?;
    Ok(SendRequest {
        targets,
        action,
        ttl,
    })
}

/// `true`/`false`, an integer, a number, else text.
fn parse_value(s: &str) -> Value {
    let t = s.trim();
    if let Ok(b) = t.parse::<bool>() {
        Value::Bool(b)
    } else if let Ok(i) = t.parse::<i64>() {
        Value::I64(i)
    } else if let Ok(f) = t.parse::<f64>() {
        Value::F64(f)
    } else {
        Value::String(s.to_owned())
    }
}

fn print(out: &mut dyn io::Write, all: &[CommandRecord], json: bool) -> io::Result<()> {
    if json {
        return writeln!(
            out,
            "{}",
            serde_json::to_string(all).unwrap_or_else(|_| "[]".into())
        );
    }
    for c in all {
        line(out, c)?;
    }
    Ok(())
}

fn print_one(out: &mut dyn io::Write, c: &CommandRecord, json: bool) -> io::Result<()> {
    if json {
        return writeln!(
            out,
            "{}",
            serde_json::to_string(c).unwrap_or_else(|_| "{}".into())
        );
    }
    line(out, c)
}

fn line(out: &mut dyn io::Write, c: &CommandRecord) -> io::Result<()> {
    let printable = crate::printable::printable;
    writeln!(
        out,
        "{}  {}  {:<11}  {} {} {}  by {} as {}{}{}",
        c.id,
        c.agent_id,
        c.state,
        c.kind,
        printable(&c.target),
        printable(&c.detail),
        printable(&c.actor),
        c.role,
        c.value
            .as_ref()
            .map_or(String::new(), |v| format!("  value {v}")),
        c.reason
            .as_ref()
            .map_or(String::new(), |r| format!("  ({})", printable(r))),
    )
}
