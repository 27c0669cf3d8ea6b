//! Who may call the operator API and what each caller may do: bearer
//! credentials (OIDC JWTs from the configured issuer, or the hub's own
//! static tokens) become a [`Caller`] with a subject and a [`Role`]; each
//! route asks for a [`Permission`] (`Caller::require`), and a refusal is
//! answered 403 and audited. Policy changes can need two people
//! (`[api] policy_approval = "two-person"`, `proposals`).
//!
//! Why the subject is the audit actor everywhere: the issue this answers
//! (named, authenticated users; IEC 62443-3-3 SR 1.1, 2.1) wants every
//! entry to say who, and `--actor` free text cannot. The parts: `role` (the
//! one permission table), `settings` (`[api.oidc]`), `jwks` and `jwt` (OIDC
//! bearer tokens), `tokens` (static tokens), `store` (where tokens are read
//! and entries written), `caller` (the request's credential to a caller),
//! `verbs` (`outpost-hub token …`).

pub mod caller;
pub mod jwks;
pub mod jwt;
pub mod proposals;
pub mod role;
pub mod settings;
pub mod store;
pub mod tokens;
pub mod verbs;

pub use caller::{AuthError, AuthSetupError, Authenticator, Caller, Refused};
pub use role::{Permission, Role};
pub use settings::{OidcConfig, PolicyApproval, RawOidcConfig};
pub use store::{Audit, AuthStore};
