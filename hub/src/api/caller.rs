//! The extractor every handler takes: the authenticated caller, counted
//! against its rate limit.
//!
//! Authentication itself is `api::auth`'s ([`Authenticator`]); this only
//! turns its answers into problems (401, 403) and applies the per-caller
//! rate limit (429) once the subject is known.
//!
//! [`Authenticator`]: crate::api::auth::Authenticator

use axum::extract::{FromRequestParts, MatchedPath};
use http::request::Parts;
use http::{HeaderValue, StatusCode};

use crate::api::auth::role::Need;
use crate::api::auth::{AuthError, Caller};
use crate::api::problem::Problem;
use crate::api::state::ApiState;

/// The caller of a request, authenticated and within its rate.
#[derive(Debug, Clone)]
pub struct Authed(pub Caller);

impl Authed {
    /// The caller, if its role meets `need` (a `Permission`, or a `Role`'s
    /// permissions; see `api::auth::role`); a 403 problem otherwise, audited
    /// as `api.refused`.
    pub async fn require(&self, need: impl Need) -> Result<&Caller, Problem> {
        self.0
            .require(need)
            .await
            .map_err(|e| Problem::forbidden(e.to_string()))?;
        Ok(&self.0)
    }
}

/// An authentication failure as a problem: 401 with `WWW-Authenticate:
/// Bearer` and the RFC 6750 error, 403 for a credential without a role,
/// 503 when the store cannot be read to check a token.
pub fn auth_problem(e: &AuthError) -> Problem {
    let mut p = match e.status() {
        StatusCode::UNAUTHORIZED => Problem::unauthorized(e.to_string()),
        StatusCode::FORBIDDEN => Problem::forbidden(e.to_string()),
        status => Problem::new(
            status,
            "auth-unavailable",
            "Cannot authenticate now",
            e.to_string(),
        ),
    };
    if let Some(v) = e
        .www_authenticate()
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        p.headers
            .retain(|(n, _)| n != http::header::WWW_AUTHENTICATE);
        p.headers.push((http::header::WWW_AUTHENTICATE, v));
    }
    p
}

impl FromRequestParts<ApiState> for Authed {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Problem> {
        let route = format!(
            "{} {}",
            parts.method,
            parts
                .extensions
                .get::<MatchedPath>()
                .map_or(parts.uri.path(), MatchedPath::as_str)
        );
        let caller = state
            .auth
            .authenticate(&parts.headers)
            .await
            .map_err(|e| auth_problem(&e))?
            .on_route(route);
        state.limiter.check(&caller.subject)?;
        Ok(Authed(caller))
    }
}
