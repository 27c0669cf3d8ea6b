//! `outpost-agent enroll`: the device makes its own key, proves the hub is
//! the fleet's, and trades a one-time token and a CSR for its certificate.
//!
//! The order is what keeps the token and the key safe:
//!
//! ```text
//! 1. refuse if [uplink] key exists (unless --force): a device's key is replaced on purpose only
//! 2. make an ECDSA P-256 key and a CSR for [agent] id, in memory
//! 3. dial the hub on ALPN outpost-enroll/1; the TLS handshake verifies the
//!    hub's certificate against the CA (--ca-file), or against the CA in the
//!    hub's chain whose SHA-256 is --ca-fingerprint; a hub that fails sees
//!    nothing
//! 4. send Request{id, token, csr}; read Issued or Refused
//! 5. check the certificate is for this key and chains to the CA
//! 6. write key (0600, whatever the umask), certificate and CA where [uplink]
//!    names them, each through a temporary file renamed into place
//! ```
//!
//! Architecture invariant: the key and the token never reach a log line, an
//! error or the network (only the CSR and the token, on the verified
//! connection).

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use outpost_protocols::enroll::{Answer, DeviceEnrollment, RefusalCode, ALPN};
use outpost_protocols::wire::agent_uri;
use outpost_protocols::AgentId;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use rustls::pki_types::CertificateDer;

use crate::config::UplinkSection;

/// How long the whole exchange may take.
const DEADLINE: Duration = Duration::from_secs(30);

/// How the device knows the fleet CA.
#[derive(Debug, Clone)]
pub enum CaPin {
    /// The CA certificate's SHA-256 (of its DER), hex.
    Fingerprint(String),
    /// A PEM file of the CA certificate.
    File(PathBuf),
}

/// What `enroll` needs.
#[derive(Debug, Clone)]
pub struct EnrollRequest {
    /// The hub's `host:port` (UDP).
    pub hub: String,
    /// The file holding the one-time token.
    pub token_file: PathBuf,
    /// The fleet CA.
    pub ca: CaPin,
    /// Replace an existing key.
    pub force: bool,
    /// The agent id (`[agent] id`).
    pub agent_id: AgentId,
    /// Where the files go (`[uplink]` ca, cert, key).
    pub uplink: UplinkSection,
}

/// What an enrollment wrote.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// The certificate file.
    pub cert: PathBuf,
}

/// Why an enrollment did not happen; its message is one line. Nothing was
/// written in any case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnrollError {
    /// The key file exists and `--force` was not given.
    #[error("{0}: a key exists already; enrolling again replaces it and its certificate stops working (use --force to do so anyway)")]
    KeyExists(PathBuf),
    /// The token file cannot be read or is empty.
    #[error("--token-file {path}: {reason}")]
    Token {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The CA file or fingerprint is unusable.
    #[error("{0}")]
    Ca(#[source] outpost_tls::TlsError),
    /// `--hub` is not `host:port` or does not resolve.
    #[error("--hub {hub:?}: {reason}")]
    Hub {
        /// As given.
        hub: String,
        /// What is wrong.
        reason: String,
    },
    /// The hub's certificate is not the fleet's.
    #[error("the hub at {hub} is not trusted: {reason}; nothing was sent")]
    Untrusted {
        /// The hub.
        hub: String,
        /// Why.
        reason: String,
    },
    /// The connection failed.
    #[error("cannot reach the hub at {hub}: {reason}")]
    Connect {
        /// The hub.
        hub: String,
        /// What failed.
        reason: String,
    },
    /// The hub refused.
    #[error("enrollment refused by the hub: {code}: {reason}")]
    Refused {
        /// Its code.
        code: RefusalCode,
        /// Its reason.
        reason: String,
    },
    /// The hub's answer is not usable.
    #[error("the hub's answer is not usable: {0}")]
    BadAnswer(String),
    /// The key or CSR could not be made.
    #[error("cannot make the key: {0}")]
    Key(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("{path}: cannot write: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl EnrollError {
    /// 1 when the hub could not be reached or a file not written (a retry
    /// may work), 2 for every refusal and bad input.
    #[must_use]
    pub fn exit_code(&self) -> u8 {
        match self {
            EnrollError::Connect { .. } | EnrollError::Write { .. } => 1,
            _ => 2,
        }
    }
}

/// Enrolls the device; see the module doc for the steps.
pub async fn enroll(req: &EnrollRequest) -> Result<Enrolled, EnrollError> {
    let u = &req.uplink;
    if !req.force && u.key.symlink_metadata().is_ok() {
        return Err(EnrollError::KeyExists(u.key.clone()));
    }
    let token = read_token(&req.token_file)?;

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, req.agent_id.as_str());
    params.subject_alt_names = vec![SanType::URI(rcgen::string::Ia5String::try_from(
        agent_uri(&req.agent_id),
    )?)];
    let csr = params.serialize_request(&key)?;

    let (host, addr) = resolve(&req.hub).await?;
    let (tls, pinned, file_ca) = match &req.ca {
        CaPin::File(path) => {
            let tls = outpost_tls::client_config(outpost_tls::ClientFiles {
                ca: path,
                client: None,
                server_name: None,
            })
            .map_err(EnrollError::Ca)?;
            let pem = fs::read_to_string(path).map_err(|e| {
                EnrollError::Ca(outpost_tls::TlsError::Ca(outpost_tls::PemError::Read {
                    path: path.clone(),
                    source: e,
                }))
            })?;
            let der = outpost_tls::load_certs(path)
                .map_err(|e| EnrollError::Ca(outpost_tls::TlsError::Ca(e)))?;
            (tls, None, Some((pem, der)))
        }
        CaPin::Fingerprint(fp) => {
            let (tls, pinned) =
                outpost_tls::pinned_ca_client_config(fp).map_err(EnrollError::Ca)?;
            (tls, Some(pinned), None)
        }
    };
    let (cert_pem, ca_pem) = tokio::time::timeout(
        DEADLINE,
        exchange(
            tls,
            &req.hub,
            &host,
            addr,
            pinned.as_ref(),
            &req.agent_id,
            &token,
            csr.der(),
        ),
    )
    .await
    .map_err(|_| EnrollError::Connect {
        hub: req.hub.clone(),
        reason: format!("no answer within {}s", DEADLINE.as_secs()),
    })??;

    // The CA to trust from now on: the file given, or the hub's answer if
    // it is the pinned certificate.
    let (ca_pem, roots) = match (file_ca, &pinned) {
        (Some((pem, der)), _) => (pem, der),
        (None, Some(pinned)) => {
            let der = pem_certs(&ca_pem)?;
            let pin = pinned
                .certificate()
                .ok_or_else(|| EnrollError::BadAnswer("no CA was pinned".into()))?;
            if !der.contains(&pin) {
                return Err(EnrollError::BadAnswer(
                    "the CA in the answer is not the pinned one".into(),
                ));
            }
            (ca_pem, vec![pin])
        }
        (None, None) => return Err(EnrollError::BadAnswer("no CA to check it against".into())),
    };
    check_issued(&cert_pem, &key, &roots)?;

    write_file(&u.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&u.cert, cert_pem.as_bytes(), 0o644)?;
    write_file(&u.ca, ca_pem.as_bytes(), 0o644)?;
    Ok(Enrolled {
        cert: u.cert.clone(),
    })
}

/// The TLS handshake, then one request and its answer.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    mut tls: rustls::ClientConfig,
    hub: &str,
    host: &str,
    addr: SocketAddr,
    pinned: Option<&outpost_tls::PinnedCa>,
    id: &AgentId,
    token: &str,
    csr: &[u8],
) -> Result<(String, String), EnrollError> {
    let connect = |reason: String| EnrollError::Connect {
        hub: hub.to_owned(),
        reason,
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| connect(e.to_string()))?;
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse().unwrap_or(addr)
    } else {
        "0.0.0.0:0".parse().unwrap_or(addr)
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| connect(e.to_string()))?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let result = async {
        let conn = match endpoint.connect(addr, host) {
            Ok(c) => c.await,
            Err(e) => return Err(connect(e.to_string())),
        };
        let conn = conn.map_err(|e| match pinned.and_then(outpost_tls::PinnedCa::refusal) {
            Some(reason) => EnrollError::Untrusted {
                hub: hub.to_owned(),
                reason,
            },
            None => match &e {
                quinn::ConnectionError::TransportError(t)
                    if t.code.to_string().contains("crypto")
                        || t.reason.contains("certificate") =>
                {
                    EnrollError::Untrusted {
                        hub: hub.to_owned(),
                        reason: t.reason.clone(),
                    }
                }
                _ => connect(e.to_string()),
            },
        })?;
        let (mut device, request) =
            DeviceEnrollment::start(id, token, csr).map_err(|e| EnrollError::Token {
                path: PathBuf::from("-"),
                reason: e.to_string(),
            })?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| connect(e.to_string()))?;
        send.write_all(&request)
            .await
            .map_err(|e| connect(e.to_string()))?;
        send.finish().map_err(|e| connect(e.to_string()))?;
        let mut buf = vec![0u8; 8192];
        let answer = loop {
            match recv.read(&mut buf).await {
                Ok(Some(n)) => match device.push(buf.get(..n).unwrap_or_default()) {
                    Ok(Some(a)) => break a,
                    Ok(None) => {}
                    Err(e) => return Err(EnrollError::BadAnswer(e.to_string())),
                },
                Ok(None) => {
                    return Err(EnrollError::BadAnswer(
                        device
                            .finish()
                            .err()
                            .map_or_else(|| "no answer".into(), |e| e.to_string()),
                    ))
                }
                Err(e) => return Err(connect(e.to_string())),
            }
        };
        conn.close(quinn::VarInt::from_u32(0), b"");
        match answer {
            Answer::Issued { cert_pem, ca_pem } => Ok((cert_pem, ca_pem)),
            Answer::Refused { code, reason } => Err(EnrollError::Refused {
                code,
                reason: printable(&reason),
            }),
        }
    }
    .await;
    endpoint.wait_idle().await;
    result
}

/// `host` and the first address of `host:port`.
async fn resolve(hub: &str) -> Result<(String, SocketAddr), EnrollError> {
    let bad = |reason: String| EnrollError::Hub {
        hub: hub.to_owned(),
        reason,
    };
    let (host, _) = hub
        .rsplit_once(':')
        .ok_or_else(|| bad("give host:port".into()))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let addr = tokio::net::lookup_host(hub)
        .await
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("resolves to no address".into()))?;
    Ok((host, addr))
}

fn read_token(path: &Path) -> Result<String, EnrollError> {
    let bad = |reason: String| EnrollError::Token {
        path: path.to_owned(),
        reason,
    };
    // Never put the file's content into a message.
    let text = fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(bad("the file is empty".into()));
    }
    if token.len() > outpost_protocols::enroll::MAX_TOKEN_LEN
        || !token.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(bad(
            "not a token (one line from `outpost-hub enroll create`)".into(),
        ));
    }
    Ok(token.to_owned())
}

fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, EnrollError> {
    use rustls::pki_types::pem::PemObject as _;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| EnrollError::BadAnswer(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(EnrollError::BadAnswer(
            "no certificate in the answer".into(),
        ));
    }
    Ok(certs)
}

/// The certificate must carry this device's public key and verify as a
/// client certificate of `roots`.
fn check_issued(
    cert_pem: &str,
    key: &KeyPair,
    roots: &[CertificateDer<'static>],
) -> Result<(), EnrollError> {
    let certs = pem_certs(cert_pem)?;
    let leaf = certs
        .first()
        .ok_or_else(|| EnrollError::BadAnswer("no certificate".into()))?;
    use rcgen::PublicKeyData as _;
    let spki = key.subject_public_key_info();
    if !leaf
        .as_ref()
        .windows(spki.len())
        .any(|w| w == spki.as_slice())
    {
        return Err(EnrollError::BadAnswer(
            "the certificate is not for this device's key".into(),
        ));
    }
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store
            .add(r.clone())
            .map_err(|e| EnrollError::BadAnswer(format!("the CA is unusable: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
            .build()
            .map_err(|e| EnrollError::BadAnswer(format!("the CA is unusable: {e}")))?;
    verifier
        .verify_client_cert(
            leaf,
            certs.get(1..).unwrap_or_default(),
            rustls::pki_types::UnixTime::now(),
        )
        .map_err(|e| {
            EnrollError::BadAnswer(format!(
                "the certificate does not verify against the CA: {e}"
            ))
        })?;
    Ok(())
}

/// A reason from the hub, with control characters replaced: it is printed
/// on the operator's terminal.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Writes `bytes` to `path` with exactly `mode`, atomically
/// (`outpost_tls::write_atomically`).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), EnrollError> {
    let err = |source| EnrollError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    outpost_tls::write_atomically(path, bytes, mode).map_err(err)
}
