//! `/api/v1/agents/{id}/labels|revoke|reinstate` and `/api/v1/enrollments`:
//! the trust verbs (`agent label|revoke|reinstate`, `enroll
//! create|list|revoke`) as resources, so that an operator gives and takes
//! back trust without a shell on the hub.
//!
//! Each handler calls the function its verb calls (`crate::agents`,
//! `crate::enroll::tokens::Tokens`), with the caller's subject as the actor:
//! the same rows, the same audit entries, the same checks of labels and
//! lifetimes. Labels are an operator's; revocation and enrollment an
//! administrator's (docs/api.md).

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use outpost_protocols::wire::MAX_LABELS;
use outpost_protocols::AgentId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::agents::{self, check_label, Edit};
use crate::api::auth::Permission;
use crate::api::caller::Authed;
use crate::api::problem::Problem;
use crate::api::state::{blocking, store_problem, ApiState, ApiStore};
use crate::clock;
use crate::enroll::tokens::{new_enrollment, parse_ttl, TokenError, Tokens};
use crate::store::EnrollmentRecord;
use crate::verbs::VerbError;

/// This resource's routes.
pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/agents/{id}/labels", post(labels))
        .route("/agents/{id}/revoke", post(revoke))
        .route("/agents/{id}/reinstate", post(reinstate))
        .route("/enrollments", get(enrollments).post(enroll))
        .route("/enrollments/{agent}", delete(unenroll))
}

/// A label edit: keys to set and keys to remove.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LabelEdit {
    /// Labels to set (added or changed).
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Label keys to remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// An agent's labels before and after an edit.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LabelsChanged {
    /// The agent.
    pub agent_id: String,
    /// Its labels before (null: it was not registered).
    pub old: Option<BTreeMap<String, String>>,
    /// Its labels now.
    pub new: BTreeMap<String, String>,
    /// Whether anything changed.
    pub changed: bool,
}

/// Why an agent is revoked.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// For people; at most 512 bytes.
    #[serde(default)]
    pub reason: String,
}

/// An agent's revocation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentRevoked {
    /// The agent.
    pub agent_id: String,
    /// Whether this request revoked it (false: it was revoked already).
    pub new: bool,
    /// When, Unix ns.
    pub at: i64,
    /// By whom.
    pub by: String,
    /// Why.
    pub reason: String,
}

/// Whether a revocation was lifted.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentReinstated {
    /// The agent.
    pub agent_id: String,
    /// False when it was not revoked (nothing changed).
    pub reinstated: bool,
}

/// A new enrollment token.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The only agent id the token enrolls.
    pub agent_id: String,
    /// The labels the agent gets in the registry when it enrolls.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How long the token works, `1m` to `30d` (default `1h`).
    #[serde(default)]
    pub ttl: Option<String>,
}

/// A token made: shown once, stored only as its hash.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnrollCreated {
    /// The agent it enrolls.
    pub agent_id: String,
    /// The token, to give to the device (`outpost-agent enroll`).
    pub token: String,
    /// The token's id (the first 12 hex digits of its hash).
    pub id: String,
    /// When it stops working, Unix ns.
    pub expires_at: i64,
}

/// One enrollment token, without its secret.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Enrollment {
    /// The first 12 hex digits of the token's hash.
    pub id: String,
    /// The agent it enrolls.
    pub agent_id: String,
    /// The labels it gives.
    pub labels: BTreeMap<String, String>,
    /// `pending`, `used`, `expired` or `revoked`.
    pub state: String,
    /// When it was made, Unix ns.
    pub created_at: i64,
    /// Who made it.
    pub created_by: String,
    /// When it stops working, Unix ns.
    pub expires_at: i64,
    /// When it was used, Unix ns.
    pub used_at: Option<i64>,
    /// From which address.
    pub used_from: Option<String>,
    /// When it was revoked, Unix ns.
    pub revoked_at: Option<i64>,
    /// The serial of the certificate it issued.
    pub serial: Option<String>,
}

impl Enrollment {
    fn of(r: &EnrollmentRecord, now: i64) -> Enrollment {
        Enrollment {
            id: r.id().to_owned(),
            agent_id: r.agent_id.clone(),
            labels: r.labels.clone(),
            state: r.state(now).to_owned(),
            created_at: r.created_at,
            created_by: r.created_by.clone(),
            expires_at: r.expires_at,
            used_at: r.used_at,
            used_from: r.used_from.clone(),
            revoked_at: r.revoked_at,
            serial: r.serial.clone(),
        }
    }
}

fn agent_id(id: &str) -> Result<AgentId, Problem> {
    AgentId::parse(id).map_err(|e| Problem::bad_request(format!("agent id {id:?}: {e}")))
}

fn verb_problem(e: VerbError) -> Problem {
    match e {
        VerbError::Usage(why) => Problem::bad_request(why),
        VerbError::Store(s) => store_problem(s),
        other => Problem::internal(other.to_string()),
    }
}

fn token_problem(e: TokenError) -> Problem {
    match e {
        TokenError::Store(s) => store_problem(s),
        other => Problem::internal(other.to_string()),
    }
}

/// Changes an agent's registry labels (which select the policy's rules),
/// audited `agent.labels_changed`; live sessions follow within seconds.
#[utoipa::path(post, path = "/api/v1/agents/{id}/labels", tag = "fleet",
    params(("id" = String, Path, description = "The agent's id")),
    request_body = LabelEdit,
    responses(
        (status = 200, description = "The labels before and after", body = LabelsChanged),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn labels(
    State(state): State<ApiState>,
    caller: Authed,
    Path(id): Path<String>,
    Json(edit): Json<LabelEdit>,
) -> Result<Json<LabelsChanged>, Problem> {
    let actor = caller.require(Permission::Operate).await?.subject.clone();
    let id = agent_id(&id)?;
    let mut edits = Vec::new();
    for (k, v) in &edit.set {
        check_label(k, v).map_err(|why| Problem::bad_request(format!("label {k:?}: {why}")))?;
        edits.push(Edit::Set(k.clone(), v.clone()));
    }
    for k in &edit.remove {
        check_label(k, "-").map_err(|why| Problem::bad_request(format!("label {k:?}: {why}")))?;
        edits.push(Edit::Remove(k.clone()));
    }
    if edits.is_empty() {
        return Err(Problem::bad_request("give labels to `set` or to `remove`"));
    }
    let now = clock::unix_now();
    let change = match &state.store {
        ApiStore::Sqlite(path) => {
            let (path, key, who) = (path.clone(), state.key.clone(), id.clone());
            blocking(move || {
                agents::label_sqlite(&path, &key, &who, &edits, &actor, now).map_err(verb_problem)
            })
            .await?
        }
        ApiStore::JetStream(js) => {
            agents::label_jetstream(js, &state.key, &id, &edits, &actor, now)
                .await
                .map_err(verb_problem)?
        }
    };
    Ok(Json(LabelsChanged {
        agent_id: id.to_string(),
        changed: change.old.as_ref() != Some(&change.new),
        old: change.old,
        new: change.new,
    }))
}

/// Revokes an agent: refused at its next handshake, its live sessions
/// closed within seconds; audited `agent.revoked`.
#[utoipa::path(post, path = "/api/v1/agents/{id}/revoke", tag = "fleet",
    params(("id" = String, Path, description = "The agent's id")),
    request_body = RevokeRequest,
    responses(
        (status = 200, description = "Revoked (now or before)", body = AgentRevoked),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn revoke(
    State(state): State<ApiState>,
    caller: Authed,
    Path(id): Path<String>,
    body: Option<Json<RevokeRequest>>,
) -> Result<Json<AgentRevoked>, Problem> {
    let actor = caller
        .require(Permission::Administer)
        .await?
        .subject
        .clone();
    let id = agent_id(&id)?;
    let reason = body.map(|Json(b)| b.reason).unwrap_or_default();
    if reason.len() > agents::MAX_REASON_LEN || reason.chars().any(char::is_control) {
        return Err(Problem::bad_request(format!(
            "reason: at most {} bytes, no control characters",
            agents::MAX_REASON_LEN
        )));
    }
    let now = clock::unix_now();
    let (r, new) = match &state.store {
        ApiStore::Sqlite(path) => {
            let (path, key, who) = (path.clone(), state.key.clone(), id.clone());
            blocking(move || {
                agents::revoke_sqlite(&path, &key, &who, &reason, &actor, now).map_err(verb_problem)
            })
            .await?
        }
        ApiStore::JetStream(js) => {
            agents::revoke_jetstream(js, &state.key, &id, &reason, &actor, now)
                .await
                .map_err(store_problem)?
        }
    };
    Ok(Json(AgentRevoked {
        agent_id: id.to_string(),
        new,
        at: r.at.0,
        by: r.by,
        reason: r.reason,
    }))
}

/// Lifts an agent's revocation; audited `agent.reinstated`.
#[utoipa::path(post, path = "/api/v1/agents/{id}/reinstate", tag = "fleet",
    params(("id" = String, Path, description = "The agent's id")),
    responses(
        (status = 200, description = "Whether a revocation was lifted", body = AgentReinstated),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn reinstate(
    State(state): State<ApiState>,
    caller: Authed,
    Path(id): Path<String>,
) -> Result<Json<AgentReinstated>, Problem> {
    let actor = caller
        .require(Permission::Administer)
        .await?
        .subject
        .clone();
    let id = agent_id(&id)?;
    let now = clock::unix_now();
    let lifted = match &state.store {
        ApiStore::Sqlite(path) => {
            let (path, key, who) = (path.clone(), state.key.clone(), id.clone());
            blocking(move || {
                agents::reinstate_sqlite(&path, &key, &who, &actor, now).map_err(verb_problem)
            })
            .await?
        }
        ApiStore::JetStream(js) => agents::reinstate_jetstream(js, &state.key, &id, &actor, now)
            .await
            .map_err(store_problem)?,
    };
    Ok(Json(AgentReinstated {
        agent_id: id.to_string(),
        reinstated: lifted.is_some(),
    }))
}

fn tokens(state: &ApiState) -> Tokens {
    match &state.store {
        ApiStore::Sqlite(p) => Tokens::Sqlite(p.clone(), state.key.clone()),
        ApiStore::JetStream(js) => Tokens::JetStream(js.clone(), state.key.clone()),
    }
}

/// Makes a single-use enrollment token for one agent id (`enroll
/// create`); audited `enroll.created`. The token is in this answer only.
#[utoipa::path(post, path = "/api/v1/enrollments", tag = "fleet",
    request_body = EnrollRequest,
    responses(
        (status = 201, description = "The token, shown once", body = EnrollCreated),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn enroll(
    State(state): State<ApiState>,
    caller: Authed,
    Json(req): Json<EnrollRequest>,
) -> Result<(StatusCode, Json<EnrollCreated>), Problem> {
    let actor = caller
        .require(Permission::Administer)
        .await?
        .subject
        .clone();
    let id = agent_id(&req.agent_id)?;
    if req.labels.len() > MAX_LABELS {
        return Err(Problem::bad_request(format!(
            "{} labels; at most {MAX_LABELS}",
            req.labels.len()
        )));
    }
    for (k, v) in &req.labels {
        check_label(k, v).map_err(|why| Problem::bad_request(format!("label {k:?}: {why}")))?;
    }
    let ttl_text = req.ttl.as_deref().unwrap_or("1h");
    let ttl = parse_ttl(ttl_text).ok_or_else(|| {
        Problem::bad_request(format!(
            "ttl {ttl_text:?}: give a duration from 1m to 30d (`1h`, `2d`)"
        ))
    })?;
    let (token, rec) = new_enrollment(&id, req.labels, actor, ttl).map_err(token_problem)?;
    tokens(&state)
        .create(rec.clone())
        .await
        .map_err(token_problem)?;
    Ok((
        StatusCode::CREATED,
        Json(EnrollCreated {
            agent_id: rec.agent_id.clone(),
            token,
            id: rec.id().to_owned(),
            expires_at: rec.expires_at,
        }),
    ))
}

/// Every enrollment token, newest first, without secrets (`enroll list`).
#[utoipa::path(get, path = "/api/v1/enrollments", tag = "fleet",
    responses(
        (status = 200, description = "The tokens", body = Vec<Enrollment>),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn enrollments(
    State(state): State<ApiState>,
    caller: Authed,
) -> Result<Json<Vec<Enrollment>>, Problem> {
    caller.require(Permission::Administer).await?;
    let now = clock::unix_now().0;
    let all = tokens(&state).list().await.map_err(token_problem)?;
    Ok(Json(all.iter().map(|r| Enrollment::of(r, now)).collect()))
}

/// Revokes every pending token of one agent (`enroll revoke --agent`);
/// audited `enroll.revoked` each. 404 when none is pending.
#[utoipa::path(delete, path = "/api/v1/enrollments/{agent}", tag = "fleet",
    params(("agent" = String, Path, description = "The agent id the tokens enroll")),
    responses(
        (status = 200, description = "The tokens revoked", body = Vec<Enrollment>),
        (status = 404, description = "No pending token for this agent", body = Problem, content_type = "application/problem+json"),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn unenroll(
    State(state): State<ApiState>,
    caller: Authed,
    Path(agent): Path<String>,
) -> Result<Json<Vec<Enrollment>>, Problem> {
    let actor = caller
        .require(Permission::Administer)
        .await?
        .subject
        .clone();
    let id = agent_id(&agent)?.to_string();
    let now = clock::unix_now();
    let revoked = tokens(&state)
        .revoke(&actor, now, move |r| r.agent_id == id)
        .await
        .map_err(token_problem)?;
    if revoked.is_empty() {
        return Err(Problem::not_found(format!(
            "no pending enrollment token for {agent:?}"
        )));
    }
    // The store answers with the tokens as they were found: show them as
    // they are now.
    Ok(Json(
        revoked
            .into_iter()
            .map(|mut r| {
                r.revoked_at.get_or_insert(now.0);
                Enrollment::of(&r, now.0)
            })
            .collect(),
    ))
}
