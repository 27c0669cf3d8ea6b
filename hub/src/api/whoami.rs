//! `/api/v1/whoami`: the caller's subject, role and permissions, so that a
//! client (the dashboard) shows only what the caller may do.
//!
//! Why an endpoint rather than decoding the token in the client: a static
//! token is opaque, a JWT's role goes through `role_map`, and only the hub
//! knows the answer the routes will act on. Hiding a button is a courtesy;
//! every route still checks its permission.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::auth::settings::PolicyApproval;
use crate::api::auth::Permission;
use crate::api::caller::Authed;
use crate::api::problem::Problem;
use crate::api::state::ApiState;

/// This resource's routes.
pub fn router() -> Router<ApiState> {
    Router::new().route("/whoami", get(whoami))
}

/// Who the caller is, as the routes judge it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    /// `token:<name>` or `oidc:<sub>`: the actor of the audit entries the
    /// caller's requests cause.
    pub subject: String,
    /// The role it acts in: `viewer`, `operator`, `policy-author`,
    /// `approver` or `admin`.
    pub role: String,
    /// The permissions the role holds (`read`, `operate`, `propose-policy`,
    /// `approve-policy`, `administer`), docs/api.md's table.
    pub permissions: Vec<String>,
    /// `single` (a policy author's change applies at once) or `two-person`
    /// (it is proposed and another subject approves it).
    pub policy_approval: String,
}

/// The caller's subject, role and permissions.
#[utoipa::path(get, path = "/api/v1/whoami", tag = "fleet",
    responses(
        (status = 200, description = "The caller", body = WhoAmI),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn whoami(
    State(state): State<ApiState>,
    caller: Authed,
) -> Result<Json<WhoAmI>, Problem> {
    let c = caller.require(Permission::Read).await?;
    Ok(Json(WhoAmI {
        subject: c.subject.clone(),
        role: c.role.name().to_owned(),
        permissions: c
            .role
            .permissions()
            .iter()
            .map(|p| p.name().to_owned())
            .collect(),
        policy_approval: match state.cfg.api.policy_approval {
            PolicyApproval::Single => "single",
            PolicyApproval::TwoPerson => "two-person",
        }
        .to_owned(),
    }))
}
