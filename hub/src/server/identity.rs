//! Who is on the other end: the agent id from the SAN URI of the certificate
//! TLS verified, and from nowhere else, so no agent can claim another's id.

use outpost_protocols::AgentId;
use rustls::pki_types::CertificateDer;

use crate::ca::{self, CaError};

/// Why a verified connection names no agent.
#[derive(Debug, thiserror::Error)]
pub(super) enum IdentityError {
    #[error("no client certificate")]
    NoCertificate,
    #[error("unexpected peer identity")]
    UnexpectedIdentity,
    #[error("empty certificate chain")]
    EmptyChain,
    #[error(transparent)]
    Certificate(#[from] CaError),
}

/// The agent id of the peer's leaf certificate.
pub(super) fn peer_agent_id(conn: &quinn::Connection) -> Result<AgentId, IdentityError> {
    let identity = conn.peer_identity().ok_or(IdentityError::NoCertificate)?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| IdentityError::UnexpectedIdentity)?;
    let leaf = chain.first().ok_or(IdentityError::EmptyChain)?;
    Ok(ca::agent_id_from_cert_der(leaf.as_ref())?)
}
