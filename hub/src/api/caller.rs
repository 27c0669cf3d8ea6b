//! The extractor every handler takes: the authenticated caller, counted
//! against its rate limit.
//!
//! Authentication itself is `api::auth`'s ([`Authenticator`]); this only
//! turns its answers into problems (401, 403) and applies the per-caller
//! rate limit (429) once the subject is known.
//!
//! [`Authenticator`]: crate::api::auth::Authenticator

use axum::extract::FromRequestParts;
use http::request::Parts;

use crate::api::auth::{Caller, Role};
use crate::api::problem::Problem;
use crate::api::state::ApiState;

/// The caller of a request, authenticated and within its rate.
#[derive(Debug, Clone)]
pub struct Authed(pub Caller);

impl Authed {
    /// The caller, if its role is `role` or above; a 403 problem otherwise.
    pub fn require(&self, role: Role) -> Result<&Caller, Problem> {
        self.0
            .require(role)
            .map_err(|e| Problem::forbidden(e.to_string()))?;
        Ok(&self.0)
    }
}

impl FromRequestParts<ApiState> for Authed {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Problem> {
        let caller = state
            .auth
            .authenticate(&parts.headers)
            .await
            .map_err(|e| Problem::unauthorized(e.to_string()))?;
        state.limiter.check(&caller.subject)?;
        Ok(Authed(caller))
    }
}
