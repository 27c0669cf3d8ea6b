//! `/api/v1/policy/proposals`: the two-person rule's side of the policy
//! resource (`[api] policy_approval = "two-person"`). Under it, `POST
//! /api/v1/policy` by a policy author stores a proposal ([`propose`], called
//! by the policy resource) instead of applying; an approver who is not the
//! author approves it (applied through the ordinary path, pushed by the
//! running hub's watch) or rejects it. The rules and their storage are
//! `api::auth::proposals`; this file only speaks HTTP.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::auth::proposals::{self as rules, Proposal, ProposalError};
use crate::api::auth::Permission;
use crate::api::caller::Authed;
use crate::api::problem::Problem;
use crate::api::state::{blocking, store_problem, ApiState, ApiStore};
use crate::api::types::PolicyApplied;
use crate::policy::ApplyError;
use crate::store::{open_admin, StoreReader};

/// This resource's routes.
pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/policy/proposals", get(list))
        .route("/policy/proposals/{id}", get(one))
        .route("/policy/proposals/{id}/approve", post(approve))
        .route("/policy/proposals/{id}/reject", post(reject))
}

/// A policy proposal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProposalDoc {
    /// Its id.
    pub id: u64,
    /// `pending`, `approved` or `rejected`.
    pub status: String,
    /// When it was proposed, Unix ns.
    pub proposed_at: i64,
    /// The author's subject.
    pub proposed_by: String,
    /// Where the text came from.
    pub source: String,
    /// SHA-256 of the text, hex.
    pub digest: String,
    /// The policy document.
    pub text: String,
    /// When it was approved or rejected, Unix ns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<i64>,
    /// Who approved or rejected it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// Why it was rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The policy version it became.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

impl From<Proposal> for ProposalDoc {
    fn from(p: Proposal) -> ProposalDoc {
        ProposalDoc {
            id: p.id,
            status: serde_json::to_value(p.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            proposed_at: p.proposed_at,
            proposed_by: p.proposed_by,
            source: p.source,
            digest: p.digest,
            text: p.text,
            decided_at: p.decided_at,
            decided_by: p.decided_by,
            reason: p.reason,
            version: p.version,
        }
    }
}

/// What an approval did: the proposal and the version it is in force as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProposalApproved {
    /// The proposal, approved.
    pub proposal: ProposalDoc,
    /// The policy version.
    pub applied: PolicyApplied,
}

/// Why a proposal is rejected.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProposalReject {
    /// For the audit log and the author.
    #[serde(default)]
    pub reason: Option<String>,
}

fn problem(e: ProposalError) -> Problem {
    match e {
        ProposalError::NotFound(_) => Problem::not_found(e.to_string()),
        ProposalError::Decided { .. } => Problem::new(
            StatusCode::CONFLICT,
            "proposal-decided",
            "Proposal decided already",
            e.to_string(),
        ),
        ProposalError::OwnProposal { .. } => Problem::new(
            StatusCode::FORBIDDEN,
            "own-proposal",
            "Forbidden: two-person rule",
            e.to_string(),
        ),
        ProposalError::Policy(ApplyError::Refused { .. }) => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "policy-refused",
            "Policy refused",
            e.to_string(),
        ),
        ProposalError::Policy(ApplyError::Store(s)) | ProposalError::Store(s) => store_problem(s),
        ProposalError::Policy(other) => Problem::bad_request(other.to_string()),
    }
}

/// Stores `text` as a proposal by `actor` (the policy resource's `POST`
/// under the two-person rule): 202 with the proposal.
pub async fn propose(
    state: &ApiState,
    text: String,
    source: String,
    actor: String,
) -> Result<(StatusCode, Json<ProposalDoc>), Problem> {
    let (catalog, key) = (state.catalog.clone(), state.key.clone());
    let p = match &state.store {
        ApiStore::Sqlite(path) => {
            let path = path.clone();
            blocking(move || {
                let mut conn = open_admin(&path).map_err(store_problem)?;
                rules::propose_sqlite(&mut conn, &path, &key, &text, &source, &actor, &catalog)
                    .map_err(problem)
            })
            .await?
        }
        ApiStore::JetStream(js) => {
            rules::propose_jetstream(js, &state.key, &text, &source, &actor, &catalog)
                .await
                .map_err(problem)?
        }
    };
    tracing::info!(proposal = p.id, subject = %p.proposed_by, "Policy proposed through the API.");
    Ok((StatusCode::ACCEPTED, Json(p.into())))
}

/// Every proposal, oldest first.
#[utoipa::path(get, path = "/api/v1/policy/proposals", tag = "policy",
    responses(
        (status = 200, description = "Every proposal, oldest first", body = [ProposalDoc]),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Authed,
) -> Result<Json<Vec<ProposalDoc>>, Problem> {
    caller.require(Permission::Read).await?;
    let all = match &state.store {
        ApiStore::Sqlite(path) => {
            let path = path.clone();
            blocking(move || {
                let r = StoreReader::open(&path).map_err(store_problem)?;
                rules::list_sqlite(r.connection(), &path).map_err(store_problem)
            })
            .await?
        }
        ApiStore::JetStream(js) => rules::list_jetstream(js).await.map_err(store_problem)?,
    };
    Ok(Json(all.into_iter().map(ProposalDoc::from).collect()))
}

/// One proposal.
#[utoipa::path(get, path = "/api/v1/policy/proposals/{id}", tag = "policy",
    params(("id" = u64, Path, description = "The proposal's id")),
    responses(
        (status = 200, description = "The proposal", body = ProposalDoc),
        (status = 404, description = "No such proposal", body = Problem, content_type = "application/problem+json"),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn one(
    State(state): State<ApiState>,
    caller: Authed,
    Path(id): Path<u64>,
) -> Result<Json<ProposalDoc>, Problem> {
    caller.require(Permission::Read).await?;
    let found = match &state.store {
        ApiStore::Sqlite(path) => {
            let path = path.clone();
            blocking(move || {
                let r = StoreReader::open(&path).map_err(store_problem)?;
                rules::get_sqlite(r.connection(), &path, id).map_err(store_problem)
            })
            .await?
        }
        ApiStore::JetStream(js) => rules::get_jetstream(js, id).await.map_err(store_problem)?,
    };
    found
        .map(|p| Json(p.into()))
        .ok_or_else(|| problem(ProposalError::NotFound(id)))
}

/// Approves a proposal and applies it; the caller must not be its author.
#[utoipa::path(post, path = "/api/v1/policy/proposals/{id}/approve", tag = "policy",
    params(("id" = u64, Path, description = "The proposal's id")),
    responses(
        (status = 200, description = "Approved and in force", body = ProposalApproved),
        (status = 403, description = "Not an approver, or the proposal's own author (audited)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such proposal", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Approved or rejected already", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The hub refuses the text now (its sinks changed)", body = Problem, content_type = "application/problem+json"),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn approve(
    State(state): State<ApiState>,
    caller: Authed,
    Path(id): Path<u64>,
) -> Result<Json<ProposalApproved>, Problem> {
    let actor = caller
        .require(Permission::ApprovePolicy)
        .await?
        .subject
        .clone();
    let (catalog, key) = (state.catalog.clone(), state.key.clone());
    let approved = match &state.store {
        ApiStore::Sqlite(path) => {
            let path = path.clone();
            blocking(move || {
                let mut conn = open_admin(&path).map_err(store_problem)?;
                rules::approve_sqlite(&mut conn, &path, &key, id, &actor, &catalog).map_err(problem)
            })
            .await?
        }
        ApiStore::JetStream(js) => rules::approve_jetstream(js, &state.key, id, &actor, &catalog)
            .await
            .map_err(problem)?,
    };
    tracing::info!(proposal = id, subject = %caller.0.subject, "Policy proposal approved through the API.");
    Ok(Json(ProposalApproved {
        applied: PolicyApplied::from(&approved.applied),
        proposal: approved.proposal.into(),
    }))
}

/// Rejects a proposal; the caller must not be its author.
#[utoipa::path(post, path = "/api/v1/policy/proposals/{id}/reject", tag = "policy",
    params(("id" = u64, Path, description = "The proposal's id")),
    request_body = ProposalReject,
    responses(
        (status = 200, description = "Rejected", body = ProposalDoc),
        (status = 403, description = "Not an approver, or the proposal's own author (audited)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such proposal", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Approved or rejected already", body = Problem, content_type = "application/problem+json"),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn reject(
    State(state): State<ApiState>,
    caller: Authed,
    Path(id): Path<u64>,
    body: Option<Json<ProposalReject>>,
) -> Result<Json<ProposalDoc>, Problem> {
    let actor = caller
        .require(Permission::ApprovePolicy)
        .await?
        .subject
        .clone();
    let reason = body.and_then(|Json(b)| b.reason).unwrap_or_default();
    let key = state.key.clone();
    let p = match &state.store {
        ApiStore::Sqlite(path) => {
            let path = path.clone();
            blocking(move || {
                let mut conn = open_admin(&path).map_err(store_problem)?;
                rules::reject_sqlite(&mut conn, &path, &key, id, &actor, &reason).map_err(problem)
            })
            .await?
        }
        ApiStore::JetStream(js) => rules::reject_jetstream(js, &state.key, id, &actor, &reason)
            .await
            .map_err(problem)?,
    };
    Ok(Json(p.into()))
}
