//! TEMPORARY, on branch `api` only: a stand-in for the `auth` helper's
//! authentication (hub/src/api/auth/ on branch `auth`), with the interface
//! PLAN.md fixes, so that the API's handlers are written against it now.
//! The merge of `auth` replaces this whole folder; it must never reach main.
//!
//! It accepts `Authorization: Bearer dev.<role>.<subject>` and nothing else:
//! no secret at all, so it is for this branch's tests only.

use http::HeaderMap;

/// What a caller may do; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read.
    Viewer,
    /// Commands, labels.
    Operator,
    /// Propose policies.
    PolicyAuthor,
    /// Approve another's proposal.
    Approver,
    /// Tokens, enrollment, revocation, the CA.
    Admin,
}

impl Role {
    fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "viewer" => Role::Viewer,
            "operator" => Role::Operator,
            "policy-author" => Role::PolicyAuthor,
            "approver" => Role::Approver,
            "admin" => Role::Admin,
            _ => return None,
        })
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Who: the audit log's actor.
    pub subject: String,
    /// What they may do.
    pub role: Role,
}

/// Why a caller was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No usable credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// Authenticated, but the role is not enough.
    #[error("this needs the role {needed:?}; the caller has {has:?}")]
    Forbidden {
        /// The role the action needs.
        needed: Role,
        /// The caller's.
        has: Role,
    },
}

impl Caller {
    /// `Ok` when the caller's role is `role` or above.
    pub fn require(&self, role: Role) -> Result<(), AuthError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(AuthError::Forbidden {
                needed: role,
                has: self.role,
            })
        }
    }
}

/// Turns a request's headers into a [`Caller`].
#[derive(Debug, Clone, Default)]
pub struct Authenticator {}

impl Authenticator {
    /// The authenticator of the hub configured by `_cfg`.
    pub fn new(_cfg: &crate::config::HubConfig) -> Authenticator {
        Authenticator {}
    }

    /// The caller the `Authorization` header names.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, AuthError> {
        let value = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| AuthError::Unauthenticated("no bearer token".into()))?;
        let token = value
            .strip_prefix("Bearer ")
            .ok_or_else(|| AuthError::Unauthenticated("not a bearer token".into()))?;
        let mut parts = token.splitn(3, '.');
        match (
            parts.next(),
            parts.next().and_then(Role::parse),
            parts.next(),
        ) {
            (Some("dev"), Some(role), Some(subject)) if !subject.is_empty() => Ok(Caller {
                subject: subject.to_owned(),
                role,
            }),
            _ => Err(AuthError::Unauthenticated("unknown token".into())),
        }
    }
}
