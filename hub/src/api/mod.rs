//! The operator HTTP API on `[api] listen`: the fleet, events, policy,
//! sinks and the audit log under `/api/v1/`, for operators who have no
//! shell on the hub's machine (docs/api.md).
//!
//! Each resource is a file with its own `router()`, merged here, so a new
//! resource (enrollment, labels, revocation, tokens) is one file and one
//! line below. Every handler takes the authenticated caller ([`caller`],
//! on [`auth`]) and names the role it needs; every error is a problem
//! document ([`problem`]); the OpenAPI document is generated from the
//! handlers ([`openapi`]) and committed as `docs/api/openapi.json`.
//!
//! Architecture invariant: a handler calls the same library functions as
//! the CLI verb that does the same thing (the store's readers,
//! `crate::policy::apply`), so the API and the CLI cannot disagree about
//! what is stored or how it is audited.

pub mod audit;
pub mod auth;
pub mod caller;
pub mod commands;
pub mod dashboard;
pub mod events;
pub mod fleet;
pub mod kpis;
pub mod limit;
pub mod openapi;
pub mod policy;
pub mod problem;
pub mod proposals;
pub mod server;
pub mod sinks;
pub mod state;
pub mod trust;
pub mod types;
pub mod whoami;

use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use http::StatusCode;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

/// The largest request body: twice the largest policy document
/// (`outpost_protocols::policy::MAX_POLICY_LEN`), room for its JSON
/// escaping; the policy's own limit is checked when it is parsed.
pub const MAX_BODY: usize = 2 * outpost_protocols::policy::MAX_POLICY_LEN;

/// The API's routes, limits and error handling, on `state`; requests that
/// take longer than `timeout` are answered 408.
pub fn router(state: state::ApiState, timeout: Duration) -> Router {
    let v1 = Router::new()
        .merge(fleet::router())
        .merge(events::router())
        .merge(policy::router())
        .merge(proposals::router())
        .merge(sinks::router())
        .merge(audit::router())
        .merge(trust::router())
        .merge(kpis::router())
        .merge(whoami::router())
        .merge(commands::router())
        .route("/openapi.json", get(openapi::serve));
    Router::new()
        .nest("/api/v1", v1)
        .merge(dashboard::router())
        .fallback(problem::unknown_route)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(RequestBodyLimitLayer::new(MAX_BODY))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .layer(axum::middleware::from_fn(problem::problem_for_bare_errors))
        .with_state(state)
}
