//! Commands to agents: what the operator's verbs (and the HTTP API) call to
//! send them, and what each agent's session calls to deliver them and
//! record their results.
//!
//! Why a room of its own: the CLI's break-glass path, the API and the
//! sessions all go through the same authorisation and the same table, so
//! that a command is authorised, stored and audited one way whoever sends
//! it. The store's `commands` table (`store::commands`) keeps each command
//! durably with its expiry; the agent keeps its own ledger that makes it
//! execute at most once ([commands.md](../../docs/commands.md)).
//!
//! The functions the API calls: [`send`], [`status`], [`list`], each with a
//! [`CommandStore`] opened once at start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use outpost_protocols::policy::{Catalog, Command as Grant, Policy, Selector};
use outpost_protocols::wire::command::{Action, CommandError, CommandId, CommandRequest, Outcome};
use outpost_protocols::{AgentId, StreamName};
use rusqlite::{Connection, OptionalExtension as _};

pub mod verbs;

use crate::audit::key::AuditKey;
use crate::store::commands::{self as table, CommandRecord, NewCommand};
use crate::store::{AtPath as _, StoreError};

/// The roles that may send commands at all (the API's `operate`
/// permission); the policy's `[[commands]]` then says what each may send
/// to which agents.
pub const COMMAND_ROLES: [&str; 4] = ["operator", "policy-author", "approver", "admin"];

/// The default time to live of a command.
pub const DEFAULT_TTL: Duration = Duration::from_secs(600);

/// The longest time to live of a command.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why a command was not sent. Refusals by role or policy are not errors:
/// they are recorded (and audited) as `refused` commands.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandsError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The command breaks a limit of the protocol.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// `--agent` names no agent the registry knows, or the selector selects
    /// none.
    #[error("{0}")]
    NoAgent(String),
    /// A time to live of 0 or over [`MAX_TTL`].
    #[error("ttl {0:?}: must be more than 0 and at most 7d")]
    Ttl(Duration),
    /// The system gave no randomness for a command id.
    #[error("no randomness for a command id")]
    Random,
    /// The policy in force does not parse (the store was edited).
    #[error("the policy in force (version {version}) does not parse: {reason}")]
    Policy {
        /// Its version.
        version: u64,
        /// Why.
        reason: String,
    },
}

/// Which agents a command goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// One agent.
    Agent(AgentId),
    /// Every agent whose registry labels match every `KEY=PATTERN` (`*`
    /// globs), not revoked.
    Select(BTreeMap<String, String>),
}

/// A command an operator asks to send.
#[derive(Debug, Clone, PartialEq)]
pub struct SendRequest {
    /// To which agents.
    pub targets: Targets,
    /// What.
    pub action: Action,
    /// How long it may wait for an agent that is away.
    pub ttl: Duration,
}

/// The hub's commands table, with the audit key its entries are signed
/// with. One connection, used by one caller at a time (commands are few).
#[derive(Debug)]
pub struct CommandStore {
    conn: Mutex<Connection>,
    path: PathBuf,
    key: AuditKey,
}

impl CommandStore {
    /// Opens the hub's SQLite store at `path` (schema created or migrated).
    pub fn open(path: &Path, key: AuditKey) -> Result<CommandStore, StoreError> {
        let conn = crate::store::open_admin(path)?;
        Ok(CommandStore {
            conn: Mutex::new(conn),
            path: path.to_owned(),
            key,
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The commands to send to `agent` on its session now (see
    /// `store::commands::deliverable`).
    pub fn deliverable(&self, agent: &AgentId) -> Result<Vec<CommandRequest>, StoreError> {
        let now = crate::clock::unix_now().0;
        table::deliverable(&mut self.conn(), &self.path, &self.key, agent.as_str(), now)
    }

    /// Records that these commands went out on `agent`'s session.
    pub fn delivered(&self, ids: &[CommandId]) -> Result<(), StoreError> {
        table::delivered(&self.conn(), &self.path, ids, crate::clock::unix_now().0)
    }

    /// Records a command's outcome (audited); whether it was open and the
    /// agent's.
    pub fn finish(
        &self,
        agent: &AgentId,
        id: &CommandId,
        outcome: &Outcome,
    ) -> Result<bool, StoreError> {
        table::finish(
            &mut self.conn(),
            &self.path,
            &self.key,
            agent.as_str(),
            id,
            outcome,
            crate::clock::unix_now().0,
        )
    }
}

/// `DEVICE/TAG` as the stream of a tag; the error names the text.
pub fn tag_stream(s: &str) -> Result<StreamName, String> {
    StreamName::parse(s)
        .ok()
        .filter(|n| n.as_str().contains('/'))
        .ok_or_else(|| format!("{s:?}: give DEVICE/TAG"))
}

/// A command's time to live: a duration (`30s`, `10m`, `2d`), [`DEFAULT_TTL`]
/// when absent or empty; the range is checked by [`send`].
pub fn parse_ttl(s: Option<&str>) -> Result<Duration, String> {
    match s.map(str::trim) {
        None | Some("") => Ok(DEFAULT_TTL),
        Some(t) => humantime::parse_duration(t)
            .map_err(|_| format!("{t:?}: give a duration (`30s`, `10m`, `2d`)")),
    }
}

/// A fresh command id: 128 random bits, hex.
fn new_id() -> Result<CommandId, CommandsError> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| CommandsError::Random)?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(CommandId::parse(&hex)?)
}

/// The value or payload of an action, for people.
fn describe(action: &Action) -> String {
    match action {
        Action::Write { value, .. } => format!("= {}", value.to_json()),
        Action::Publish {
            payload,
            qos,
            retain,
            ..
        } => format!(
            "payload {} (qos {qos}{})",
            String::from_utf8_lossy(payload),
            if *retain { ", retained" } else { "" }
        ),
        Action::Read { .. } => String::new(),
        _ => String::new(),
    }
}

/// Authorises and stores a command for every target agent, each with its own
/// id; returns their records (`pending`, or `refused` with why). The caller
/// is `caller_subject` (`local:<login>` on the break-glass CLI, the API's
/// authenticated subject) acting in `caller_role`. Audited as
/// `command.requested` (and `command.result` for a refusal).
pub fn send(
    store: &CommandStore,
    caller_subject: &str,
    caller_role: &str,
    request: &SendRequest,
) -> Result<Vec<CommandRecord>, CommandsError> {
    request.action.check()?;
    if request.ttl.is_zero() || request.ttl > MAX_TTL {
        return Err(CommandsError::Ttl(request.ttl));
    }
    let now = crate::clock::unix_now().0;
    let expires_at = now.saturating_add(i64::try_from(request.ttl.as_nanos()).unwrap_or(i64::MAX));
    let mut conn = store.conn();
    let agents = agents(&conn, &store.path, &request.targets)?;
    let policy = policy_in_force(&conn, &store.path)?;
    let target = request.action.target();
    let grant = match &request.action {
        Action::Write { .. } => Grant::Write(target),
        Action::Publish { .. } => Grant::Publish(target),
        _ => Grant::Read(target),
    };
    let mut commands = Vec::with_capacity(agents.len());
    for (agent_id, labels) in agents {
        let refused = if !COMMAND_ROLES.contains(&caller_role) {
            Some(format!("role {caller_role:?} may not send commands"))
        } else if !policy.1.authorize(caller_role, &labels, grant) {
            Some(format!(
                "the policy in force (version {}) grants role {caller_role:?} no {} of {target} on this agent",
                policy.0,
                request.action.kind()
            ))
        } else {
            None
        };
        commands.push(NewCommand {
            id: new_id()?,
            agent_id,
            actor: caller_subject.to_owned(),
            role: caller_role.to_owned(),
            action: request.action.clone(),
            detail: describe(&request.action),
            created_at: now,
            expires_at,
            refused,
        });
    }
    table::insert(&mut conn, &store.path, &store.key, &commands)?;
    let mut out = Vec::with_capacity(commands.len());
    for c in &commands {
        if let Some(r) = table::get(&conn, &store.path, c.id.as_str())? {
            out.push(r);
        }
    }
    Ok(out)
}

/// One command, by id.
pub fn status(store: &CommandStore, id: &str) -> Result<Option<CommandRecord>, CommandsError> {
    Ok(table::get(&store.conn(), &store.path, id)?)
}

/// The newest commands, of one agent or all, at most `limit`.
pub fn list(
    store: &CommandStore,
    agent: Option<&AgentId>,
    limit: usize,
) -> Result<Vec<CommandRecord>, CommandsError> {
    Ok(table::list(
        &store.conn(),
        &store.path,
        agent.map(AgentId::as_str),
        limit,
    )?)
}

/// An agent id with its registry labels.
type Labelled = (String, BTreeMap<String, String>);

/// The target agents with their registry labels (not revoked).
fn agents(
    conn: &Connection,
    path: &Path,
    targets: &Targets,
) -> Result<Vec<Labelled>, CommandsError> {
    let mut stmt = conn
        .prepare("SELECT agent_id, labels FROM agents WHERE revoked_at IS NULL ORDER BY agent_id")
        .at(path)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .at(path)?;
    let all: Vec<(String, String)> = rows.collect::<rusqlite::Result<_>>().at(path)?;
    let parsed = all
        .into_iter()
        .map(|(id, labels)| (id, serde_json::from_str(&labels).unwrap_or_default()));
    let selected: Vec<Labelled> = match targets {
        Targets::Agent(id) => parsed.filter(|(a, _)| a == id.as_str()).collect(),
        Targets::Select(patterns) => {
            let selector = Selector::from_patterns(patterns.clone());
            parsed.filter(|(_, l)| selector.selects(l)).collect()
        }
    };
    if selected.is_empty() {
        return Err(CommandsError::NoAgent(match targets {
            Targets::Agent(id) => format!("agent {id} is not in the registry (or is revoked)"),
            Targets::Select(p) => format!("the selector {p:?} selects no agent in the registry"),
        }));
    }
    Ok(selected)
}

/// The policy in force (its version and document); the empty policy,
/// which grants no command, when none was applied.
fn policy_in_force(conn: &Connection, path: &Path) -> Result<(u64, Policy), CommandsError> {
    let row: Option<(i64, String)> = conn
        .query_row(
            "SELECT version, text FROM policies ORDER BY version DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .at(path)?;
    match row {
        None => Ok((0, Policy::default())),
        Some((version, text)) => {
            let version = u64::try_from(version).unwrap_or(0);
            Policy::parse(&text, &Catalog::trusting())
                .map(|p| (version, p))
                .map_err(|e| CommandsError::Policy {
                    version,
                    reason: e.to_string(),
                })
        }
    }
}
