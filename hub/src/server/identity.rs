//! Who is on the other end: the agent id from the SAN URI of the certificate
//! TLS verified, and from nowhere else, so no agent can claim another's id.

use outpost_protocols::{AgentId, Timestamp};
use rustls::pki_types::CertificateDer;

use crate::ca::{self, CaError};
use crate::store::CertInfo;

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

/// The agent id of the peer's leaf certificate, and what the registry binds
/// of that certificate.
pub(super) fn peer_agent_id(
    conn: &quinn::Connection,
) -> Result<(AgentId, CertInfo), IdentityError> {
    let identity = conn.peer_identity().ok_or(IdentityError::NoCertificate)?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| IdentityError::UnexpectedIdentity)?;
    let leaf = chain.first().ok_or(IdentityError::EmptyChain)?;
    let id = ca::agent_id_from_cert_der(leaf.as_ref())?;
    let (serial, fingerprint, not_after) = ca::cert_facts(leaf.as_ref())?;
    let not_after = Timestamp(i64::try_from(not_after.unix_timestamp_nanos()).unwrap_or(i64::MAX));
    Ok((
        id,
        CertInfo {
            serial,
            fingerprint,
            not_after,
        },
    ))
}
