//! Who is calling: the bearer credential of a request turned into a
//! [`Caller`] (a subject and a role), and the permission checks that refuse
//! and audit.
//!
//! A request carries `Authorization: Bearer <credential>`, where the
//! credential is either a static token (`opt_…`, looked up by its hash on
//! every request, so a revocation takes effect at once) or an OIDC JWT (see
//! `jwt`). Nothing else authenticates: no cookie, no query parameter, no
//! client certificate.

use std::path::Path;
use std::sync::Arc;

use http::HeaderMap;

use crate::api::auth::jwks::{Jwks, JwksError};
use crate::api::auth::jwt::{self, JwtError};
use crate::api::auth::role::{Need, Permission, Role};
use crate::api::auth::settings::{OidcConfig, PolicyApproval};
use crate::api::auth::store::{Audit, AuthStore};
use crate::api::auth::tokens;
use crate::clock;
use crate::config::HubConfig;
use crate::store::StoreError;

/// Why a request is not authenticated: answered 401 with
/// `WWW-Authenticate: Bearer` (but [`AuthError::NoRole`], 403, and
/// [`AuthError::Unavailable`], 503).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("no credentials: send Authorization: Bearer <token>")]
    Missing,
    /// An `Authorization` header that is not `Bearer <token>`.
    #[error("the Authorization header is not \"Bearer <token>\"")]
    Malformed,
    /// A static token the hub does not know.
    #[error("unknown token")]
    UnknownToken,
    /// A static token past its expiry.
    #[error("token {name:?} expired")]
    ExpiredToken {
        /// Its name.
        name: String,
    },
    /// A revoked static token.
    #[error("token {name:?} was revoked")]
    RevokedToken {
        /// Its name.
        name: String,
    },
    /// A JWT, but `[api.oidc]` is not configured.
    #[error("a JWT was sent, and this hub has no [api.oidc] issuer configured")]
    NoIssuer,
    /// A JWT that does not hold.
    #[error("JWT refused: {0}")]
    Jwt(#[source] JwtError),
    /// A valid credential whose role claim names none of our roles.
    #[error("{0}")]
    NoRole(#[source] JwtError),
    /// The store could not be read to check the token.
    #[error("cannot check the token now: {0}")]
    Unavailable(#[source] StoreError),
}

impl AuthError {
    /// The HTTP status it is answered with.
    pub fn status(&self) -> http::StatusCode {
        match self {
            AuthError::NoRole(_) => http::StatusCode::FORBIDDEN,
            AuthError::Unavailable(_) => http::StatusCode::SERVICE_UNAVAILABLE,
            _ => http::StatusCode::UNAUTHORIZED,
        }
    }

    /// The `WWW-Authenticate` value (RFC 6750 §3), for a 401 or 403.
    pub fn www_authenticate(&self) -> Option<String> {
        let error = match self {
            AuthError::Missing => return Some("Bearer realm=\"outpost\"".into()),
            AuthError::Unavailable(_) => return None,
            AuthError::Malformed => "invalid_request",
            AuthError::NoRole(_) => "insufficient_scope",
            _ => "invalid_token",
        };
        let description = self.to_string().replace(['"', '\\'], "'");
        Some(format!(
            "Bearer realm=\"outpost\", error=\"{error}\", error_description=\"{description}\""
        ))
    }
}

/// Why `[api.oidc]` could not be put to work at start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthSetupError {
    /// The JWKS could not be read.
    #[error("api.oidc.jwks: {0}")]
    Jwks(#[from] JwksError),
}

/// A refused request: the caller lacks a permission. Answered 403; audited
/// as `api.refused` before it is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{subject} acts as {role}, and {route} needs {missing_permission} (the {missing_role} role)"
)]
pub struct Refused {
    /// The caller.
    pub subject: String,
    /// The caller's role.
    pub role: Role,
    /// `METHOD /path`.
    pub route: String,
    /// The role that would have been enough.
    pub missing_role: Role,
    /// The permission asked for.
    pub missing_permission: Permission,
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `token:<name>` or `oidc:<sub>`; the actor of its audit entries.
    pub subject: String,
    /// The role it acts in.
    pub role: Role,
    /// `METHOD /path` of the request (for refusals).
    route: String,
    /// Where refusals are audited; `None` for a caller made in a test.
    auth: Option<Authenticator>,
}

impl Caller {
    /// A caller that was not authenticated by a request (tests, the
    /// break-glass CLI): its refusals are not audited.
    pub fn new(subject: impl Into<String>, role: Role) -> Caller {
        Caller {
            subject: subject.into(),
            role,
            route: String::new(),
            auth: None,
        }
    }

    /// The same caller on `route` (`METHOD /path`), as the extractor makes
    /// it.
    pub fn on_route(mut self, route: impl Into<String>) -> Caller {
        self.route = route.into();
        self
    }

    /// `METHOD /path` of its request.
    pub fn route(&self) -> &str {
        &self.route
    }

    /// Whether the caller's role meets `need`, without auditing.
    pub fn has(&self, need: impl Need) -> bool {
        need.met_by(self.role)
    }

    /// `Ok` if the caller's role meets `need` (a [`Permission`], or every
    /// permission of a [`Role`]); otherwise the refusal, audited as
    /// `api.refused` with the subject, the route and the role missing.
    pub async fn require(&self, need: impl Need) -> Result<(), Refused> {
        if need.met_by(self.role) {
            return Ok(());
        }
        let refused = Refused {
            subject: self.subject.clone(),
            role: self.role,
            route: self.route.clone(),
            missing_role: need.missing_role(),
            missing_permission: need.missing_permission(),
        };
        if let Some(auth) = &self.auth {
            auth.audit_refusal(&refused).await;
        }
        Err(refused)
    }
}

/// Turns a request's credential into a [`Caller`]. Built once from the
/// config; clones share everything.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    oidc: Option<(OidcConfig, Jwks)>,
    store: AuthStore,
    approval: PolicyApproval,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("oidc", &self.inner.oidc.as_ref().map(|(c, _)| &c.issuer))
            .field("approval", &self.inner.approval)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// From the hub's config (relative paths from `base`, the config
    /// file's folder) and its store. A JWKS file is read now.
    pub async fn new(
        cfg: &HubConfig,
        base: &Path,
        store: AuthStore,
    ) -> Result<Authenticator, AuthSetupError> {
        let oidc = match &cfg.api.oidc {
            Some(o) => Some((o.clone(), Jwks::open(o, base).await?)),
            None => None,
        };
        Ok(Authenticator {
            inner: Arc::new(Inner {
                oidc,
                store,
                approval: cfg.api.policy_approval,
            }),
        })
    }

    /// The store it reads tokens from and audits to.
    pub fn store(&self) -> &AuthStore {
        &self.inner.store
    }

    /// `[api] policy_approval`.
    pub fn policy_approval(&self) -> PolicyApproval {
        self.inner.approval
    }

    /// The caller of a request with these headers.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, AuthError> {
        let value = headers
            .get(http::header::AUTHORIZATION)
            .ok_or(AuthError::Missing)?;
        let value = value.to_str().map_err(|_| AuthError::Malformed)?;
        let (scheme, credential) = value.trim().split_once(' ').ok_or(AuthError::Malformed)?;
        // RFC 7235 §2.1: the scheme is case-insensitive.
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Malformed);
        }
        let credential = credential.trim();
        if credential.is_empty() {
            return Err(AuthError::Malformed);
        }
        let (subject, role) = if credential.starts_with(tokens::PREFIX) {
            self.static_token(credential).await?
        } else {
            self.jwt(credential).await?
        };
        Ok(Caller {
            subject,
            role,
            route: String::new(),
            auth: Some(self.clone()),
        })
    }

    async fn static_token(&self, token: &str) -> Result<(String, Role), AuthError> {
        if !tokens::looks_like_token(token) {
            return Err(AuthError::UnknownToken);
        }
        let record = self
            .inner
            .store
            .token(&tokens::hash(token))
            .await
            .map_err(AuthError::Unavailable)?
            .ok_or(AuthError::UnknownToken)?;
        match record.state(clock::unix_now()) {
            "revoked" => Err(AuthError::RevokedToken { name: record.name }),
            "expired" => Err(AuthError::ExpiredToken { name: record.name }),
            _ => Ok((record.subject(), record.role)),
        }
    }

    async fn jwt(&self, token: &str) -> Result<(String, Role), AuthError> {
        let Some((cfg, jwks)) = &self.inner.oidc else {
            return Err(AuthError::NoIssuer);
        };
        let (kid, alg) = jwt::key_id(token).map_err(AuthError::Jwt)?;
        let key = jwks
            .key(kid.as_deref(), alg)
            .await
            .ok_or(AuthError::Jwt(JwtError::UnknownKey(kid)))?;
        match jwt::verify_with(token, &key.key, alg, cfg) {
            Ok(v) => Ok((v.subject, v.role)),
            Err(e @ JwtError::NoRole { .. }) => Err(AuthError::NoRole(e)),
            Err(e) => Err(AuthError::Jwt(e)),
        }
    }

    /// Writes `entry`; a failure is logged, not returned (the request's
    /// answer does not change because the audit log could not be written,
    /// and the log says so loudly).
    pub async fn audit(&self, entry: Audit<'_>) {
        if let Err(e) = self.inner.store.audit(entry).await {
            tracing::error!(error = %e, action = entry.action, actor = entry.actor, "Cannot write the audit log.");
        }
    }

    async fn audit_refusal(&self, r: &Refused) {
        self.audit(Audit {
            actor: &r.subject,
            action: "api.refused",
            target: &r.route,
            result: "refused",
            detail: &format!(
                "acts as {}; needs {} (the {} role)",
                r.role, r.missing_permission, r.missing_role
            ),
        })
        .await;
    }
}
