//! `/api/v1/audit`: the audit log's entries and the check of its chain,
//! read with the same store calls as `audit list` and `audit verify`.

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::api::auth::Permission;
use crate::api::caller::Authed;
use crate::api::problem::Problem;
use crate::api::state::{store_problem, ApiState};
use crate::api::types::{AuditEntry, AuditList, AuditVerdict};
use crate::store::audit;

/// This resource's routes.
pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/audit", get(list))
        .route("/audit/verify", get(verify))
}

/// How many entries.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// The newest this many entries (all when not given).
    pub limit: Option<usize>,
}

/// The newest entries, oldest first, and the head hash.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", params(AuditParams),
    responses(
        (status = 200, description = "The entries and the head hash", body = AuditList),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Authed,
    Query(p): Query<AuditParams>,
) -> Result<Json<AuditList>, Problem> {
    caller.require(Permission::Read).await?;
    let entries = state
        .read("the audit log", move |r| {
            audit::list(r.connection(), r.path(), p.limit).map_err(store_problem)
        })
        .await?;
    let head = entries
        .last()
        .map_or(audit::GENESIS, |e| e.hash.as_str())
        .to_owned();
    Ok(Json(AuditList {
        entries: entries.iter().map(AuditEntry::from).collect(),
        head,
    }))
}

/// Walks the whole chain: intact, or the first entry that does not hold.
#[utoipa::path(get, path = "/api/v1/audit/verify", tag = "audit",
    responses(
        (status = 200, description = "The verdict (a broken chain is a verdict, not an error)", body = AuditVerdict),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn verify(
    State(state): State<ApiState>,
    caller: Authed,
) -> Result<Json<AuditVerdict>, Problem> {
    caller.require(Permission::Read).await?;
    let verdict = state
        .read("the audit log", |r| {
            audit::verify(r.connection(), r.path()).map_err(store_problem)
        })
        .await?;
    Ok(Json(AuditVerdict::from(&verdict)))
}
