//! `/api/v1/sinks`: each sink's queue and counters, read with the same
//! store calls as `sinks status`.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};

use crate::api::auth::Permission;
use crate::api::caller::Authed;
use crate::api::problem::Problem;
use crate::api::state::{store_problem, ApiState, ApiStore};
use crate::api::types::Sink;

/// This resource's routes.
pub fn router() -> Router<ApiState> {
    Router::new().route("/sinks", get(list))
}

/// Every sink: configured ones, and those the store still has counters of.
#[utoipa::path(get, path = "/api/v1/sinks", tag = "sinks",
    responses(
        (status = 200, description = "Every sink, ordered by id", body = Vec<Sink>),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Authed,
) -> Result<Json<Vec<Sink>>, Problem> {
    caller.require(Permission::Read).await?;
    let configured: Vec<String> = state.cfg.sinks.iter().map(|s| s.id.clone()).collect();
    let ids = configured.clone();
    let status = match &state.store {
        ApiStore::Sqlite(_) => {
            state
                .read("sinks", move |r| {
                    r.sinks_status(&ids).map_err(store_problem)
                })
                .await?
        }
        ApiStore::JetStream(js) => js.sinks_status(&ids).await.map_err(store_problem)?,
    };
    let now = crate::clock::unix_now().0;
    Ok(Json(
        status
            .iter()
            .map(|s| Sink::new(s, configured.contains(&s.sink), now))
            .collect(),
    ))
}
