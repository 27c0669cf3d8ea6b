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
use crate::api::state::{store_problem, ApiState, ApiStore};
use crate::api::types::{AuditAnchor, AuditEntry, AuditList, AuditPublicKey, AuditVerdict};
use crate::store::audit;

/// This resource's routes.
pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/audit", get(list))
        .route("/audit/verify", get(verify))
        .route("/audit/anchor", get(anchor))
        .route("/audit/key", get(key))
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
    let entries = entries(&state, p.limit).await?;
    let head = entries
        .last()
        .map_or(audit::GENESIS, |e| e.hash.as_str())
        .to_owned();
    Ok(Json(AuditList {
        entries: entries.iter().map(AuditEntry::from).collect(),
        head,
    }))
}

/// An anchor to check the chain against later (`audit verify --anchor`).
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct VerifyParams {
    /// `ID:HASH`, as `/api/v1/audit/anchor` gave it earlier: entry ID must
    /// still be there with that hash.
    pub anchor: Option<String>,
}

/// Walks the whole chain and checks every signature with the hub's audit
/// key (and the anchor, if given): intact, or the first entry that does
/// not hold. A client that does not trust the hub walks `/api/v1/audit`
/// itself with a key it kept (`outpost-hub audit verify --api` does).
#[utoipa::path(get, path = "/api/v1/audit/verify", tag = "audit", params(VerifyParams),
    responses(
        (status = 200, description = "The verdict (a broken chain is a verdict, not an error)", body = AuditVerdict),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn verify(
    State(state): State<ApiState>,
    caller: Authed,
    Query(p): Query<VerifyParams>,
) -> Result<Json<AuditVerdict>, Problem> {
    caller.require(Permission::Read).await?;
    let anchor = p
        .anchor
        .as_deref()
        .map(audit::Anchor::parse)
        .transpose()
        .map_err(|e| Problem::bad_request(format!("anchor: {e}")))?;
    let key = state.key.public_key();
    let verdict = match &state.store {
        ApiStore::JetStream(js) => {
            let all = js.audit_list(None).await.map_err(store_problem)?;
            crate::audit::chain::walk(&all, &key, anchor.as_ref())
        }
        ApiStore::Sqlite(_) => {
            state
                .read("the audit log", move |r| {
                    audit::verify(r.connection(), r.path(), &key, anchor.as_ref())
                        .map_err(store_problem)
                })
                .await?
        }
    };
    Ok(Json(AuditVerdict::from(&verdict)))
}

/// The newest entry's `ID:HASH`, to keep somewhere the hub cannot reach.
#[utoipa::path(get, path = "/api/v1/audit/anchor", tag = "audit",
    responses(
        (status = 200, description = "The anchor", body = AuditAnchor),
        (status = 409, description = "The audit log is empty", body = Problem, content_type = "application/problem+json"),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn anchor(
    State(state): State<ApiState>,
    caller: Authed,
) -> Result<Json<AuditAnchor>, Problem> {
    caller.require(Permission::Read).await?;
    let newest = entries(&state, Some(1)).await?;
    AuditAnchor::of(newest.last()).map(Json).ok_or_else(|| {
        Problem::new(
            http::StatusCode::CONFLICT,
            "audit-log-empty",
            "The audit log is empty",
            "nothing to anchor yet",
        )
    })
}

/// The hub's audit public key, which checks every entry's signature.
#[utoipa::path(get, path = "/api/v1/audit/key", tag = "audit",
    responses(
        (status = 200, description = "The key", body = AuditPublicKey),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn key(
    State(state): State<ApiState>,
    caller: Authed,
) -> Result<Json<AuditPublicKey>, Problem> {
    caller.require(Permission::Read).await?;
    Ok(Json(AuditPublicKey::of(&state.key.public_key())))
}

/// The newest `limit` entries (all when `None`), oldest first, on either
/// store.
async fn entries(state: &ApiState, limit: Option<usize>) -> Result<Vec<audit::Record>, Problem> {
    match &state.store {
        ApiStore::JetStream(js) => js.audit_list(limit).await.map_err(store_problem),
        ApiStore::Sqlite(_) => {
            state
                .read("the audit log", move |r| {
                    audit::list(r.connection(), r.path(), limit).map_err(store_problem)
                })
                .await
        }
    }
}
