//! `/api/v1/fleet` and `/api/v1/agents/{id}`: the fleet registry, read with
//! the same store calls as `fleet list`.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};

use crate::api::auth::Permission;
use crate::api::caller::Authed;
use crate::api::problem::Problem;
use crate::api::state::{store_problem, ApiState, ApiStore};
use crate::api::types::Agent;
use crate::store::AgentRecord;

/// This resource's routes.
pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/fleet", get(list))
        .route("/agents/{id}", get(agent))
}

/// The registry, on either store.
pub(crate) async fn fleet(state: &ApiState) -> Result<Vec<AgentRecord>, Problem> {
    match &state.store {
        ApiStore::Sqlite(_) => {
            state
                .read("the fleet", |r| r.fleet().map_err(store_problem))
                .await
        }
        ApiStore::JetStream(js) => js.fleet().await.map_err(store_problem),
    }
}

/// Every agent the hub knows, ordered by id.
#[utoipa::path(get, path = "/api/v1/fleet", tag = "fleet",
    responses(
        (status = 200, description = "Every agent, ordered by id", body = Vec<Agent>),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Authed,
) -> Result<Json<Vec<Agent>>, Problem> {
    caller.require(Permission::Read).await?;
    Ok(Json(fleet(&state).await?.iter().map(Agent::from).collect()))
}

/// One agent.
#[utoipa::path(get, path = "/api/v1/agents/{id}", tag = "fleet",
    params(("id" = String, Path, description = "The agent's id")),
    responses(
        (status = 200, description = "The agent", body = Agent),
        (status = 404, description = "No such agent in the registry", body = Problem, content_type = "application/problem+json"),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn agent(
    State(state): State<ApiState>,
    caller: Authed,
    Path(id): Path<String>,
) -> Result<Json<Agent>, Problem> {
    caller.require(Permission::Read).await?;
    let fleet = fleet(&state).await?;
    fleet
        .iter()
        .find(|a| a.agent_id.as_str() == id)
        .map(|a| Json(Agent::from(a)))
        .ok_or_else(|| Problem::not_found(format!("no agent {id:?} in the registry")))
}
