//! `/api/v1/commands`: commands to agents as a resource, so that an operator
//! changes a setpoint or asks for a reading without a shell on the hub.
//!
//! The handlers call what `outpost-hub command send|status|list` calls
//! (`crate::commands`), with the caller's subject as the actor and its role
//! as the role the policy's `[[commands]]` is asked about: one path for the
//! authorisation, the table and the audit entries, whoever sends. A command
//! refused at the hub is still a command (stored, audited, `refused` with
//! why), so a send answers 201 with every command it made, refused or not.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use outpost_protocols::wire::command::Action;
use outpost_protocols::{AgentId, Value};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::api::auth::Permission;
use crate::api::caller::Authed;
use crate::api::problem::Problem;
use crate::api::state::{blocking, store_problem, ApiState};
use crate::commands::{self, CommandStore, CommandsError, SendRequest, Targets};
use crate::store::commands::CommandRecord;

/// This resource's routes.
pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/commands", get(list).post(send))
        .route("/commands/{id}", get(one))
}

/// A tag to write and the value.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteSpec {
    /// `DEVICE/TAG`, a tag configured `writable = true` at the agent.
    pub tag: String,
    /// A boolean, an integer, a number or a string, as the tag's type takes it.
    #[schema(value_type = Object)]
    pub value: serde_json::Value,
}

/// A message to publish on the agent's site broker.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PublishSpec {
    /// The topic (no wildcards).
    pub topic: String,
    /// The payload, as text.
    #[serde(default)]
    pub payload: String,
    /// 0, 1 or 2 (default 1).
    #[serde(default)]
    pub qos: Option<u8>,
    /// Whether the broker retains it (default false).
    #[serde(default)]
    pub retain: bool,
}

/// A tag to read now.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadSpec {
    /// `DEVICE/TAG`.
    pub tag: String,
}

/// A command to send: to one agent (`agent`) or to every agent whose
/// registry labels match `select`; exactly one of `write`, `publish`, `read`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendBody {
    /// The agent.
    #[serde(default)]
    pub agent: Option<String>,
    /// Label key to pattern (`*` globs); every one must match.
    #[serde(default)]
    pub select: BTreeMap<String, String>,
    /// A write to a writable tag, read back.
    #[serde(default)]
    pub write: Option<WriteSpec>,
    /// A publish on the site broker.
    #[serde(default)]
    pub publish: Option<PublishSpec>,
    /// A reading now.
    #[serde(default)]
    pub read: Option<ReadSpec>,
    /// How long it may wait for an agent that is away (`30s`, `10m`, `2d`;
    /// default `10m`, at most `7d`).
    #[serde(default)]
    pub ttl: Option<String>,
}

/// A command and what became of it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CommandDoc {
    /// Its id (32 hex digits).
    pub id: String,
    /// The agent.
    pub agent_id: String,
    /// Who sent it.
    pub actor: String,
    /// In which role.
    pub role: String,
    /// `write`, `publish` or `read`.
    pub kind: String,
    /// The tag's stream or the topic.
    pub target: String,
    /// The value or payload, for people.
    pub detail: String,
    /// When it was sent, Unix ns.
    pub created_at: i64,
    /// Not delivered after this, Unix ns.
    pub expires_at: i64,
    /// `pending`, `delivered`, `applied`, `refused`, `failed`, `expired`,
    /// `unsupported`.
    pub state: String,
    /// When it was first sent to the agent, Unix ns.
    pub delivered_at: Option<i64>,
    /// When its outcome was recorded, Unix ns.
    pub finished_at: Option<i64>,
    /// Why it was refused, failed or unsupported.
    pub reason: Option<String>,
    /// The read-back (write) or the reading (read).
    #[schema(value_type = Option<Object>)]
    pub value: Option<serde_json::Value>,
}

impl From<CommandRecord> for CommandDoc {
    fn from(c: CommandRecord) -> CommandDoc {
        CommandDoc {
            id: c.id,
            agent_id: c.agent_id,
            actor: c.actor,
            role: c.role,
            kind: c.kind,
            target: c.target,
            detail: c.detail,
            created_at: c.created_at,
            expires_at: c.expires_at,
            state: c.state,
            delivered_at: c.delivered_at,
            finished_at: c.finished_at,
            reason: c.reason,
            value: c.value,
        }
    }
}

/// Which commands to list.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only this agent's.
    pub agent: Option<String>,
    /// At most this many, newest first (1 to 1000, default 100).
    pub limit: Option<usize>,
}

fn value(v: &serde_json::Value) -> Result<Value, Problem> {
    match v {
        serde_json::Value::Bool(b) => Ok(Value::Bool(*b)),
        serde_json::Value::String(s) => Ok(Value::String(s.clone())),
        serde_json::Value::Number(n) => n
            .as_i64()
            .map(Value::I64)
            .or_else(|| n.as_f64().map(Value::F64))
            .ok_or_else(|| Problem::bad_request(format!("write.value {n}: out of range"))),
        other => Err(Problem::bad_request(format!(
            "write.value {other}: give a boolean, a number or a string"
        ))),
    }
}

/// The request the body describes, or a 400 naming what is wrong.
fn request(body: SendBody) -> Result<SendRequest, Problem> {
    let bad = Problem::bad_request;
    let targets = match (body.agent, body.select.is_empty()) {
        (Some(id), true) => {
            Targets::Agent(AgentId::parse(&id).map_err(|e| bad(format!("agent {id:?}: {e}")))?)
        }
        (None, false) => Targets::Select(body.select),
        _ => return Err(bad("give `agent` or `select`, not both".into())),
    };
    let action = match (body.write, body.publish, body.read) {
        (Some(w), None, None) => Action::Write {
            stream: commands::tag_stream(&w.tag).map_err(|e| bad(format!("write.tag {e}")))?,
            value: value(&w.value)?,
        },
        (None, Some(p), None) => {
            let qos = p.qos.unwrap_or(1);
            if qos > 2 {
                return Err(bad(format!("publish.qos {qos}: give 0, 1 or 2")));
            }
            Action::Publish {
                topic: p.topic,
                payload: p.payload.into_bytes(),
                qos,
                retain: p.retain,
            }
        }
        (None, None, Some(r)) => Action::Read {
            stream: commands::tag_stream(&r.tag).map_err(|e| bad(format!("read.tag {e}")))?,
        },
        _ => return Err(bad("give exactly one of `write`, `publish`, `read`".into())),
    };
    action
        .check()
        .map_err(|e| bad(format!("the command: {e}")))?;
    let ttl = commands::parse_ttl(body.ttl.as_deref()).map_err(|e| bad(format!("ttl {e}")))?;
    Ok(SendRequest {
        targets,
        action,
        ttl,
    })
}

fn commands_problem(e: CommandsError) -> Problem {
    match e {
        CommandsError::Store(s) => store_problem(s),
        e @ (CommandsError::NoAgent(_) | CommandsError::Ttl(_) | CommandsError::Command(_)) => {
            Problem::bad_request(e.to_string())
        }
        other => Problem::internal(other.to_string()),
    }
}

/// Runs `f` on the commands table, off the async threads (a connection per
/// request: commands are few). 501 on the JetStream store.
async fn with_store<T, F>(state: &ApiState, f: F) -> Result<T, Problem>
where
    T: Send + 'static,
    F: FnOnce(&CommandStore) -> Result<T, CommandsError> + Send + 'static,
{
    let path = state.sqlite("commands")?.to_owned();
    let key = state.key.clone();
    blocking(move || {
        let store = CommandStore::open(&path, key).map_err(store_problem)?;
        f(&store).map_err(commands_problem)
    })
    .await
}

/// Sends a command to one agent or to every agent a selector matches, each
/// with its own id: authorised by the caller's role and the policy's
/// `[[commands]]`, stored with its expiry, audited `command.requested`.
/// Results arrive later: `GET /api/v1/commands/{id}`.
#[utoipa::path(post, path = "/api/v1/commands", tag = "commands",
    request_body = SendBody,
    responses(
        (status = 201, description = "The commands made, each `pending` or `refused` with why", body = Vec<CommandDoc>),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn send(
    State(state): State<ApiState>,
    caller: Authed,
    Json(body): Json<SendBody>,
) -> Result<(StatusCode, Json<Vec<CommandDoc>>), Problem> {
    let caller = caller.require(Permission::Operate).await?;
    let (subject, role) = (caller.subject.clone(), caller.role.name());
    let request = request(body)?;
    let sent = with_store(&state, move |s| commands::send(s, &subject, role, &request)).await?;
    Ok((
        StatusCode::CREATED,
        Json(sent.into_iter().map(CommandDoc::from).collect()),
    ))
}

/// The newest commands, of one agent or all.
#[utoipa::path(get, path = "/api/v1/commands", tag = "commands",
    params(ListQuery),
    responses(
        (status = 200, description = "Newest first", body = Vec<CommandDoc>),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Authed,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<CommandDoc>>, Problem> {
    caller.require(Permission::Read).await?;
    let agent = q
        .agent
        .map(|id| {
            AgentId::parse(&id).map_err(|e| Problem::bad_request(format!("agent {id:?}: {e}")))
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::bad_request(format!(
            "limit {limit}: give 1 to 1000"
        )));
    }
    let all = with_store(&state, move |s| commands::list(s, agent.as_ref(), limit)).await?;
    Ok(Json(all.into_iter().map(CommandDoc::from).collect()))
}

/// One command, with its outcome once the agent answered.
#[utoipa::path(get, path = "/api/v1/commands/{id}", tag = "commands",
    params(("id" = String, Path, description = "The command's id")),
    responses(
        (status = 200, description = "The command", body = CommandDoc),
        (status = "4XX", description = "Refused, or no such command", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn one(
    State(state): State<ApiState>,
    caller: Authed,
    Path(id): Path<String>,
) -> Result<Json<CommandDoc>, Problem> {
    caller.require(Permission::Read).await?;
    let found = with_store(&state, {
        let id = id.clone();
        move |s| commands::status(s, &id)
    })
    .await?;
    found
        .map(|c| Json(CommandDoc::from(c)))
        .ok_or_else(|| Problem::not_found(format!("no command {id:?}")))
}
