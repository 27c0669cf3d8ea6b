//! The fleet CA: one self-signed ECDSA P-256 root that signs the hub's
//! certificate and every agent's.
//!
//! ```text
//! ca init --dir D                 D/ca.pem   the CA certificate (CN = name, CA:TRUE, pathlen 0)
//!                                 D/ca.key   its private key, PKCS#8 PEM, mode 0600
//! ca issue --dir D --agent ID     O/ca.pem   a copy of D/ca.pem
//!          --out O                O/agent.pem  CN = ID, SAN URI urn:outpost:agent:ID,
//!                                              EKU clientAuth
//!                                 O/agent.key  mode 0600
//! ca issue --dir D --hub NAME...  O/ca.pem
//!          --out O                O/hub.pem  CN = the first NAME, one SAN per NAME (IP
//!                                            address or DNS name), EKU serverAuth
//!                                 O/hub.key  mode 0600
//! ```
//!
//! `issue_from_csr` signs a certificate for a key made elsewhere (on the
//! device, at enrollment): the CSR proves possession of the key and nothing
//! else. The certificate carries only what the hub decides (CN and SAN URI of
//! the id the enrollment token names, EKU clientAuth), never the extensions
//! the CSR asks for, so a CSR cannot obtain a CA certificate, a server
//! certificate or a second identity.
//!
//! An agent's identity is the SAN URI of its certificate and nothing else: the
//! hub calls [`agent_id_from_cert_der`] on the peer certificate that TLS has
//! verified against the fleet CA.
//!
//! Every file is written to a temporary name in the same folder and renamed
//! into place, so a reader never sees half a file; a key file is created with
//! mode 0600, so it is never readable by others, not even for a moment.
//!
//! Architecture invariant: this module never logs or prints a private key.

use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use outpost_protocols::wire::{agent_uri, AGENT_URI_PREFIX};
use outpost_protocols::AgentId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::clock;

/// The CA certificate's file name, in the CA folder and in every issued folder.
pub const CA_CERT: &str = "ca.pem";
/// The CA private key's file name in the CA folder.
pub const CA_KEY: &str = "ca.key";
/// An agent's certificate file name.
pub const AGENT_CERT: &str = "agent.pem";
/// An agent's private key file name.
pub const AGENT_KEY: &str = "agent.key";
/// The hub's certificate file name.
pub const HUB_CERT: &str = "hub.pem";
/// The hub's private key file name.
pub const HUB_KEY: &str = "hub.key";

/// The CA's name (its certificate's CN) unless told otherwise.
pub const DEFAULT_CA_NAME: &str = "Outpost fleet CA";

/// How far back a new certificate's validity starts, so that a peer whose
/// clock is a little behind the CA's still accepts it.
const BACKDATE: Duration = Duration::hours(1);

/// Mode of a private key file: read and write for its owner only.
const KEY_MODE: u32 = 0o600;
/// Mode of a certificate file.
const CERT_MODE: u32 = 0o644;
/// Mode of a folder that this module creates: it holds private keys.
const DIR_MODE: u32 = 0o700;

/// Errors from the fleet CA.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// `ca init` found a CA key or certificate in the folder and was not told
    /// to replace it.
    #[error("{0}: a fleet CA already exists there; replacing it invalidates every certificate it issued (use --force to do so anyway)")]
    AlreadyExists(PathBuf),
    /// The CA folder or one of its files does not exist.
    #[error("{0}: not found (create a CA with `outpost-hub ca init --dir DIR`)")]
    Missing(PathBuf),
    /// A file or folder could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file or folder could not be created or written.
    #[error("{path}: cannot write: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The CA key file is not a PEM private key that can sign.
    #[error("{path}: not a usable private key: {reason}")]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The CA certificate file is not a PEM certificate of a CA.
    #[error("{path}: not a usable CA certificate: {reason}")]
    BadCaCertificate {
        /// The certificate file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The CA key is not the key of the CA certificate: the two files come
    /// from different `ca init` runs.
    #[error("{key}: this key does not belong to the certificate in {cert}")]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
    /// The CA certificate has expired: it can sign nothing that peers accept.
    #[error("{path}: the CA certificate expired on {not_after}; create a new CA")]
    CaExpired {
        /// The certificate file.
        path: PathBuf,
        /// When it expired.
        not_after: OffsetDateTime,
    },
    /// A validity period was not between 1 and [`Validity::MAX_DAYS`] days.
    #[error("invalid validity {0:?}: give a whole number of days from 1 to {max}", max = Validity::MAX_DAYS)]
    BadValidity(String),
    /// A hub name is neither an IP address nor a valid DNS name.
    #[error("invalid hub name {0:?}: give a DNS name or an IP address")]
    BadHubName(String),
    /// A hub certificate was asked for with no name.
    #[error("a hub certificate needs at least one DNS name or IP address")]
    NoHubName,
    /// rcgen refused to make a key or a certificate.
    #[error("cannot make the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// Bytes handed to [`agent_id_from_cert_der`] are not one DER certificate.
    #[error("not a DER X.509 certificate: {0}")]
    NotACertificate(String),
    /// A certificate has no SAN URI, so it names no agent.
    #[error(
        "the certificate has no SAN URI {AGENT_URI_PREFIX}<id>: it is not an agent certificate"
    )]
    NoAgentId,
    /// A certificate has more than one SAN URI: which one names the agent
    /// would be a guess.
    #[error("the certificate has {} SAN URIs ({}); an agent certificate has exactly one", .0.len(), .0.join(", "))]
    SeveralUris(Vec<String>),
    /// A certificate's SAN URI is not `urn:outpost:agent:<id>` with a valid id.
    #[error("the certificate's SAN URI {0:?} is not {AGENT_URI_PREFIX}<id> with a valid agent id")]
    ForeignUri(String),
    /// A certificate signing request that does not parse, or whose signature
    /// does not verify with its own key.
    #[error("invalid certificate signing request: {0}")]
    CsrInvalid(String),
    /// A certificate signing request whose subject CN or SAN names something
    /// other than the agent it is issued for.
    #[error("the certificate signing request names {named:?}, not agent {expected}")]
    CsrForAnotherId {
        /// The agent the certificate would be issued for.
        expected: AgentId,
        /// What the CSR names instead (a CN or a SAN).
        named: String,
    },
    /// A certificate signing request for a key other than ECDSA P-256.
    #[error("the certificate signing request's key is {0}; only ECDSA P-256 keys are issued")]
    CsrKeyNotP256(String),
    /// The system's random number generator failed (a serial number needs it).
    #[error("the system's random number generator failed")]
    NoRandomness,
}

/// How long a certificate is valid, in whole days from 1 to
/// [`Validity::MAX_DAYS`] (or, for tests of renewal and expiry, in seconds:
/// [`Validity::seconds`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    days: u32,
    /// Set only by [`Validity::seconds`]; then `days` is 0.
    seconds: Option<u32>,
}

impl Validity {
    /// The longest validity accepted, a hundred years.
    pub const MAX_DAYS: u32 = 36_500;
    /// The CA's validity unless told otherwise: ten years.
    pub const CA_DEFAULT: Validity = Validity {
        days: 3650,
        seconds: None,
    };
    /// An issued certificate's validity unless told otherwise: 825 days, the
    /// longest that browsers and most TLS stacks have accepted for a leaf.
    pub const LEAF_DEFAULT: Validity = Validity {
        days: 825,
        seconds: None,
    };

    /// A validity of `days` days.
    pub fn days(days: u32) -> Result<Validity, CaError> {
        if (1..=Self::MAX_DAYS).contains(&days) {
            Ok(Validity {
                days,
                seconds: None,
            })
        } else {
            Err(CaError::BadValidity(days.to_string()))
        }
    }

    /// A validity of `seconds` seconds (1 to a day), for certificates that
    /// must expire or renew within a test (`ca issue --validity-secs`, a
    /// hidden flag). Such a certificate is still backdated an hour, so its
    /// whole life is `seconds` plus an hour.
    pub fn seconds(seconds: u32) -> Result<Validity, CaError> {
        if (1..=86_400).contains(&seconds) {
            Ok(Validity {
                days: 0,
                seconds: Some(seconds),
            })
        } else {
            Err(CaError::BadValidity(format!("{seconds} seconds")))
        }
    }

    /// The number of whole days (0 for a validity in seconds).
    #[must_use]
    pub fn get(self) -> u32 {
        self.days
    }

    fn duration(self) -> Duration {
        match self.seconds {
            Some(s) => Duration::seconds(i64::from(s)),
            None => Duration::days(i64::from(self.days)),
        }
    }
}

impl std::fmt::Display for Validity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.seconds {
            Some(s) => write!(f, "{s} seconds"),
            None => write!(f, "{} days", self.days),
        }
    }
}

impl FromStr for Validity {
    type Err = CaError;

    fn from_str(s: &str) -> Result<Validity, CaError> {
        s.parse::<u32>()
            .map_err(|_| CaError::BadValidity(s.to_owned()))
            .and_then(Validity::days)
    }
}

/// Creates a fleet CA in `dir`: `dir/ca.pem` and `dir/ca.key` (mode 0600),
/// an ECDSA P-256 key and a self-signed certificate with `name` as its CN.
///
/// Creates `dir` (mode 0700) if it is missing. Refuses with
/// [`CaError::AlreadyExists`] when either file exists, unless `force`.
pub fn init(dir: &Path, name: &str, validity: Validity, force: bool) -> Result<(), CaError> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    if !force {
        for p in [&key_path, &cert_path] {
            if p.symlink_metadata().is_ok() {
                return Err(CaError::AlreadyExists(p.clone()));
            }
        }
    }
    create_dir(dir)?;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, name.to_owned());
    // Path length 0: the fleet CA signs end-entity certificates only.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, clock::utc_now(), validity, None);
    let cert = params.self_signed(&key)?;

    // The key first: a certificate without its key is useless, a key without
    // its certificate is at least not misleading.
    write_file(&key_path, key.serialize_pem().as_bytes(), KEY_MODE)?;
    write_file(&cert_path, cert.pem().as_bytes(), CERT_MODE)
}

/// Issues an agent certificate signed by the CA in `ca_dir` and writes
/// `out/ca.pem`, `out/agent.pem` and `out/agent.key` (mode 0600).
///
/// The certificate's CN is the id, its only SAN is the URI
/// `urn:outpost:agent:<id>` and its extended key usage is clientAuth. It is
/// valid for `validity`, or until the CA expires if that comes first.
pub fn issue_agent(
    ca_dir: &Path,
    id: &AgentId,
    out: &Path,
    validity: Validity,
) -> Result<(), CaError> {
    let uri = rcgen::string::Ia5String::try_from(agent_uri(id))?;
    issue(
        ca_dir,
        out,
        validity,
        Leaf {
            cn: id.as_str().to_owned(),
            sans: vec![SanType::URI(uri)],
            eku: ExtendedKeyUsagePurpose::ClientAuth,
            cert_file: AGENT_CERT,
            key_file: AGENT_KEY,
        },
    )
}

/// Issues the hub's certificate signed by the CA in `ca_dir` and writes
/// `out/ca.pem`, `out/hub.pem` and `out/hub.key` (mode 0600).
///
/// Each of `names` becomes a SAN: an IP address if it parses as one, a DNS
/// name otherwise. The CN is the first name and the extended key usage is
/// serverAuth.
pub fn issue_hub(
    ca_dir: &Path,
    names: &[String],
    out: &Path,
    validity: Validity,
) -> Result<(), CaError> {
    let first = names.first().ok_or(CaError::NoHubName)?;
    let sans = names
        .iter()
        .map(|n| hub_san(n))
        .collect::<Result<Vec<_>, _>>()?;
    issue(
        ca_dir,
        out,
        validity,
        Leaf {
            cn: first.clone(),
            sans,
            eku: ExtendedKeyUsagePurpose::ServerAuth,
            cert_file: HUB_CERT,
            key_file: HUB_KEY,
        },
    )
}

/// The agent id a DER certificate names in its SAN URI
/// `urn:outpost:agent:<id>`.
///
/// The certificate must carry exactly one SAN URI, and it must be an agent
/// URI with a valid id; anything else is an error rather than a guess. This
/// reads the certificate only: call it on a peer certificate that TLS has
/// already verified against the fleet CA.
pub fn agent_id_from_cert_der(der: &[u8]) -> Result<AgentId, CaError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CaError::NotACertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CaError::NotACertificate(format!(
            "{} bytes after the certificate",
            rest.len()
        )));
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CaError::NotACertificate(format!("bad subjectAltName: {e}")))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(CaError::NoAgentId),
        [uri] => outpost_protocols::wire::agent_id_from_uri(uri)
            .ok_or_else(|| CaError::ForeignUri((*uri).to_owned())),
        several => Err(CaError::SeveralUris(
            several.iter().map(|u| (*u).to_owned()).collect(),
        )),
    }
}

/// A certificate [`issue_from_csr`] issued, and what the registry and the
/// audit log record of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub pem: String,
    /// Its serial number, lowercase hex of the DER integer's bytes.
    pub serial_hex: String,
    /// SHA-256 of its DER, lowercase hex ([`outpost_tls::fingerprint_sha256`]).
    pub fingerprint_sha256_hex: String,
    /// When it expires.
    pub not_after: OffsetDateTime,
}

/// The OID of an elliptic-curve public key (id-ecPublicKey, RFC 5480).
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
/// The OID of the P-256 curve (secp256r1, prime256v1).
const OID_P256: &str = "1.2.840.10045.3.1.7";

/// Issues an agent certificate for the public key of `csr_der` (a DER
/// PKCS#10 request), signed by the CA in `ca_dir`, for `expected` only.
///
/// The request's signature must verify with its own key, the key must be
/// ECDSA P-256, and its subject CN and SAN URIs, if any, must name
/// `expected`. The certificate is built here from nothing the request asks
/// for: CN = the id, the single SAN URI `urn:outpost:agent:<id>`, EKU
/// clientAuth, a random serial, valid for `validity` or until the CA
/// expires. Nothing is written to disk.
pub fn issue_from_csr(
    ca_dir: &Path,
    csr_der: &[u8],
    expected: &AgentId,
    validity: Validity,
) -> Result<IssuedCert, CaError> {
    let requested = check_csr(csr_der, expected)?;
    let ca = load_ca(ca_dir)?;
    let issuer = Issuer::from_ca_cert_der(&ca.der.as_slice().into(), &ca.key)?;

    let uri = rcgen::string::Ia5String::try_from(agent_uri(expected))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, expected.as_str().to_owned());
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    set_validity(&mut params, clock::utc_now(), validity, Some(ca.not_after));
    let cert = params.signed_by(&requested.public_key, &issuer)?;

    let der = cert.der().as_ref();
    let (_, parsed) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CaError::NotACertificate(e.to_string()))?;
    Ok(IssuedCert {
        pem: cert.pem(),
        serial_hex: hex(parsed.tbs_certificate.raw_serial()),
        fingerprint_sha256_hex: outpost_tls::fingerprint_sha256(der),
        not_after: parsed.validity().not_after.to_datetime(),
    })
}

/// Checks a CSR for `expected` as [`issue_from_csr`] does (signature, key
/// type, names), without signing anything: the enrollment checks a request
/// before it spends the token.
pub fn verify_csr(csr_der: &[u8], expected: &AgentId) -> Result<(), CaError> {
    check_csr(csr_der, expected).map(drop)
}

/// Parses and checks a CSR for `expected`: signature, key type, names.
fn check_csr(
    csr_der: &[u8],
    expected: &AgentId,
) -> Result<rcgen::CertificateSigningRequestParams, CaError> {
    use x509_parser::prelude::FromDer as _;

    let (rest, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(csr_der)
            .map_err(|e| CaError::CsrInvalid(format!("not a DER PKCS#10 request ({e})")))?;
    if !rest.is_empty() {
        return Err(CaError::CsrInvalid(format!(
            "{} bytes after the request",
            rest.len()
        )));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let key_oid = spki.algorithm.algorithm.to_id_string();
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    if key_oid != OID_EC_PUBLIC_KEY || curve.as_deref() != Some(OID_P256) {
        let what = match curve {
            Some(c) if key_oid == OID_EC_PUBLIC_KEY => format!("an EC key on curve {c}"),
            _ => format!("a key of algorithm {key_oid}"),
        };
        return Err(CaError::CsrKeyNotP256(what));
    }
    // rcgen checks the signature with the request's own key (proof of
    // possession) and refuses extensions it does not know.
    let requested = rcgen::CertificateSigningRequestParams::from_der(&csr_der.into())
        .map_err(|e| CaError::CsrInvalid(e.to_string()))?;

    let another = |named: String| CaError::CsrForAnotherId {
        expected: expected.clone(),
        named,
    };
    for (ty, value) in requested.params.distinguished_name.iter() {
        if *ty == DnType::CommonName {
            let cn = dn_text(value);
            if cn != expected.as_str() {
                return Err(another(format!("CN={cn}")));
            }
        }
    }
    let wanted = agent_uri(expected);
    for san in &requested.params.subject_alt_names {
        if let SanType::URI(uri) = san {
            if uri.as_str() != wanted {
                return Err(another(uri.as_str().to_owned()));
            }
        }
    }
    Ok(requested)
}

/// The text of a distinguished-name value; a string type that no agent's
/// CSR uses (BMP, universal) shows as its debug form, which names no id.
fn dn_text(value: &rcgen::DnValue) -> String {
    match value {
        rcgen::DnValue::Utf8String(s) => s.clone(),
        rcgen::DnValue::PrintableString(s) => s.as_str().to_owned(),
        rcgen::DnValue::Ia5String(s) => s.as_str().to_owned(),
        rcgen::DnValue::TeletexString(s) => s.as_str().to_owned(),
        other => format!("{other:?}"),
    }
}

/// A random positive 128-bit serial number (RFC 5280 allows up to 20 bytes;
/// CA/B Forum asks for at least 64 random bits).
fn random_serial() -> Result<rcgen::SerialNumber, CaError> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CaError::NoRandomness)?;
    // Positive and without a leading zero byte, so the DER integer is these
    // 16 bytes exactly.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(rcgen::SerialNumber::from_slice(&bytes))
}

/// What the registry binds of a certificate (DER): its serial number
/// (lowercase hex), its SHA-256 fingerprint (lowercase hex) and when it
/// expires. Reads the certificate only.
pub fn cert_facts(der: &[u8]) -> Result<(String, String, OffsetDateTime), CaError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CaError::NotACertificate(e.to_string()))?;
    Ok((
        hex(cert.tbs_certificate.raw_serial()),
        outpost_tls::fingerprint_sha256(der),
        cert.validity().not_after.to_datetime(),
    ))
}

/// [`cert_facts`] of the first certificate in a PEM file.
pub fn cert_facts_pem(path: &Path) -> Result<(String, String, OffsetDateTime), CaError> {
    let pem = read_text(path)?;
    let (_, block) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| CaError::Read {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        })?;
    cert_facts(&block.contents)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// What distinguishes one kind of issued certificate from another.
struct Leaf {
    cn: String,
    sans: Vec<SanType>,
    eku: ExtendedKeyUsagePurpose,
    cert_file: &'static str,
    key_file: &'static str,
}

/// The fleet CA, loaded from its folder.
struct LoadedCa {
    /// `ca.pem` as written by `init`.
    pem: String,
    key: KeyPair,
    der: Vec<u8>,
    not_after: OffsetDateTime,
}

fn issue(ca_dir: &Path, out: &Path, validity: Validity, leaf: Leaf) -> Result<(), CaError> {
    let ca = load_ca(ca_dir)?;
    let issuer = Issuer::from_ca_cert_der(&ca.der.as_slice().into(), &ca.key)?;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, leaf.cn);
    params.subject_alt_names = leaf.sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![leaf.eku];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, clock::utc_now(), validity, Some(ca.not_after));
    let cert = params.signed_by(&key, &issuer)?;

    create_dir(out)?;
    write_file(&out.join(CA_CERT), ca.pem.as_bytes(), CERT_MODE)?;
    write_file(
        &out.join(leaf.key_file),
        key.serialize_pem().as_bytes(),
        KEY_MODE,
    )?;
    write_file(&out.join(leaf.cert_file), cert.pem().as_bytes(), CERT_MODE)
}

/// Loads `dir/ca.pem` and `dir/ca.key` and checks that they belong together
/// and that the CA has not expired.
fn load_ca(dir: &Path) -> Result<LoadedCa, CaError> {
    if !dir.is_dir() {
        return Err(CaError::Missing(dir.to_owned()));
    }
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    let pem = read_text(&cert_path)?;
    let key_pem = read_text(&key_path)?;

    let bad_cert = |reason: String| CaError::BadCaCertificate {
        path: cert_path.clone(),
        reason,
    };
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| bad_cert(format!("no PEM certificate ({e})")))?;
    if block.label != "CERTIFICATE" {
        return Err(bad_cert(format!(
            "the PEM block is a {:?}, not a CERTIFICATE",
            block.label
        )));
    }
    let der = block.contents;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| bad_cert(format!("invalid X.509 ({e})")))?;
    if !cert.is_ca() {
        return Err(bad_cert(
            "it is not a CA certificate (basicConstraints CA:FALSE)".into(),
        ));
    }
    let not_after = cert.validity().not_after.to_datetime();
    if not_after <= clock::utc_now() {
        return Err(CaError::CaExpired {
            path: cert_path,
            not_after,
        });
    }

    // Never put the key's text or rcgen's view of it into a message.
    let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::BadKey {
        path: key_path.clone(),
        reason: e.to_string(),
    })?;
    if !same_public_key(&cert, &key) {
        return Err(CaError::KeyMismatch {
            key: key_path,
            cert: cert_path,
        });
    }
    Ok(LoadedCa {
        pem,
        key,
        der,
        not_after,
    })
}

fn same_public_key(cert: &X509Certificate<'_>, key: &KeyPair) -> bool {
    use rcgen::PublicKeyData as _;
    cert.public_key().raw == key.subject_public_key_info().as_slice()
}

/// Sets `not_before` a little in the past and `not_after` `validity` from
/// `now`, but no later than `cap` (the CA's own expiry): a certificate that
/// outlives its CA would only fail later and more confusingly.
fn set_validity(
    params: &mut CertificateParams,
    now: OffsetDateTime,
    validity: Validity,
    cap: Option<OffsetDateTime>,
) {
    let not_after = now + validity.duration();
    params.not_before = now - BACKDATE;
    params.not_after = match cap {
        Some(cap) if cap < not_after => cap,
        _ => not_after,
    };
}

fn hub_san(name: &str) -> Result<SanType, CaError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    // The same rules rustls applies to the host name an agent dials, so a
    // name accepted here is one an agent can check.
    rustls_pki_types::DnsName::try_from(name).map_err(|_| CaError::BadHubName(name.to_owned()))?;
    let ia5 = rcgen::string::Ia5String::try_from(name.to_owned())
        .map_err(|_| CaError::BadHubName(name.to_owned()))?;
    Ok(SanType::DnsName(ia5))
}

fn read_text(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => CaError::Missing(path.to_owned()),
        _ => CaError::Read {
            path: path.to_owned(),
            source,
        },
    })
}

fn create_dir(dir: &Path) -> Result<(), CaError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|source| CaError::Write {
            path: dir.to_owned(),
            source,
        })
}

/// Writes `bytes` to `path` with exactly `mode`, atomically
/// (`outpost_tls::write_atomically`).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let err = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    outpost_tls::write_atomically(path, bytes, mode).map_err(err)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    /// A self-signed certificate with these SANs, as DER.
    fn cert_with(sans: Vec<SanType>) -> Vec<u8> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(rcgen::string::Ia5String::try_from(s.to_owned()).expect("ia5"))
    }

    fn dns(s: &str) -> SanType {
        SanType::DnsName(rcgen::string::Ia5String::try_from(s.to_owned()).expect("ia5"))
    }

    #[test]
    fn the_agent_id_is_read_from_the_only_san_uri() {
        let der = cert_with(vec![dns("gw-1.example"), uri("urn:outpost:agent:gw-1")]);
        let id = agent_id_from_cert_der(&der).expect("id");
        assert_eq!(id.as_str(), "gw-1");
    }

    #[test]
    fn a_certificate_without_a_san_uri_names_no_agent() {
        let der = cert_with(vec![dns("gw-1.example")]);
        assert!(matches!(
            agent_id_from_cert_der(&der),
            Err(CaError::NoAgentId)
        ));
        let der = cert_with(vec![]);
        assert!(matches!(
            agent_id_from_cert_der(&der),
            Err(CaError::NoAgentId)
        ));
    }

    #[test]
    fn a_certificate_with_two_san_uris_is_refused_rather_than_guessed() {
        let der = cert_with(vec![
            uri("urn:outpost:agent:gw-1"),
            uri("urn:outpost:agent:gw-2"),
        ]);
        let err = agent_id_from_cert_der(&der).expect_err("two uris");
        assert!(
            matches!(&err, CaError::SeveralUris(u) if u.len() == 2),
            "{err}"
        );
        let der = cert_with(vec![
            uri("urn:outpost:agent:gw-1"),
            uri("https://example.invalid/"),
        ]);
        assert!(matches!(
            agent_id_from_cert_der(&der),
            Err(CaError::SeveralUris(_))
        ));
    }

    #[test]
    fn a_foreign_or_malformed_san_uri_is_refused() {
        for u in [
            "https://example.invalid/agent/gw-1",
            "urn:outpost:hub:gw-1",
            "urn:outpost:agent:",
            "urn:outpost:agent:a%20b",
        ] {
            let der = cert_with(vec![uri(u)]);
            let err = agent_id_from_cert_der(&der).expect_err(u);
            assert!(matches!(&err, CaError::ForeignUri(x) if x == u), "{err}");
        }
    }

    #[test]
    fn bytes_that_are_not_one_certificate_are_refused() {
        assert!(matches!(
            agent_id_from_cert_der(b"not a certificate"),
            Err(CaError::NotACertificate(_))
        ));
        let mut der = cert_with(vec![uri("urn:outpost:agent:gw-1")]);
        der.push(0);
        assert!(matches!(
            agent_id_from_cert_der(&der),
            Err(CaError::NotACertificate(_))
        ));
    }

    #[test]
    fn validity_is_one_day_to_a_hundred_years() {
        assert!("0".parse::<Validity>().is_err());
        assert!("-1".parse::<Validity>().is_err());
        assert!("ten".parse::<Validity>().is_err());
        assert!("36501".parse::<Validity>().is_err());
        assert_eq!("1".parse::<Validity>().expect("1").get(), 1);
        assert_eq!("36500".parse::<Validity>().expect("max").get(), 36_500);
    }

    #[test]
    fn hub_names_are_ip_addresses_or_dns_names() {
        assert!(matches!(hub_san("10.0.0.1"), Ok(SanType::IpAddress(_))));
        assert!(matches!(hub_san("::1"), Ok(SanType::IpAddress(_))));
        assert!(matches!(hub_san("hub.example"), Ok(SanType::DnsName(_))));
        for bad in ["", "a b", "hub..example", "-hub.example", "hüb.example"] {
            assert!(
                matches!(hub_san(bad), Err(CaError::BadHubName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn an_issued_certificate_does_not_outlive_its_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        init(&ca, DEFAULT_CA_NAME, Validity::days(10).expect("10"), false).expect("init");
        let out = dir.path().join("out");
        let id = AgentId::parse("gw-1").expect("id");
        issue_agent(&ca, &id, &out, Validity::LEAF_DEFAULT).expect("issue");
        let ca_after = load_ca(&ca).expect("ca").not_after;
        let pem = fs::read(out.join(AGENT_CERT)).expect("read");
        let (_, block) = x509_parser::pem::parse_x509_pem(&pem).expect("pem");
        let (_, cert) = x509_parser::parse_x509_certificate(&block.contents).expect("der");
        assert_eq!(cert.validity().not_after.to_datetime(), ca_after);
        assert_eq!(agent_id_from_cert_der(&block.contents).expect("id"), id);
    }

    #[test]
    fn a_key_from_another_ca_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        init(&a, DEFAULT_CA_NAME, Validity::CA_DEFAULT, false).expect("a");
        init(&b, DEFAULT_CA_NAME, Validity::CA_DEFAULT, false).expect("b");
        fs::copy(b.join(CA_KEY), a.join(CA_KEY)).expect("copy");
        let err = issue_hub(
            &a,
            &["hub".into()],
            &dir.path().join("o"),
            Validity::LEAF_DEFAULT,
        )
        .expect_err("mismatch");
        assert!(matches!(err, CaError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn a_forced_init_replaces_a_wider_key_file_with_a_0600_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join(CA_KEY);
        fs::write(&key, "old").expect("write");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err =
            init(dir.path(), DEFAULT_CA_NAME, Validity::CA_DEFAULT, false).expect_err("exists");
        assert!(matches!(err, CaError::AlreadyExists(_)), "{err}");
        init(dir.path(), DEFAULT_CA_NAME, Validity::CA_DEFAULT, true).expect("force");
        let mode = fs::metadata(&key).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// The first certificate of a PEM file, as DER.
    fn der(path: &Path) -> rustls::pki_types::CertificateDer<'static> {
        let pem = fs::read(path).expect("read");
        let (_, block) = x509_parser::pem::parse_x509_pem(&pem).expect("pem");
        block.contents.into()
    }

    #[test]
    fn rustls_accepts_the_agent_as_a_client_and_the_hub_as_a_server() {
        use std::sync::Arc;

        use rustls::client::danger::ServerCertVerifier as _;
        use rustls::pki_types::{ServerName, UnixTime};

        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        init(&ca, DEFAULT_CA_NAME, Validity::CA_DEFAULT, false).expect("init");
        let (a, h) = (dir.path().join("a"), dir.path().join("h"));
        let id = AgentId::parse("gw-1").expect("id");
        issue_agent(&ca, &id, &a, Validity::LEAF_DEFAULT).expect("agent");
        let names = ["hub.example".to_owned(), "10.0.0.1".to_owned()];
        issue_hub(&ca, &names, &h, Validity::LEAF_DEFAULT).expect("hub");

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der(&ca.join(CA_CERT))).expect("root");
        let roots = Arc::new(roots);
        let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .expect("client verifier");
        let servers = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .expect("server verifier");
        let now = UnixTime::now();
        let (agent, hub) = (der(&a.join(AGENT_CERT)), der(&h.join(HUB_CERT)));

        clients
            .verify_client_cert(&agent, &[], now)
            .expect("the agent is a valid client");
        for name in ["hub.example", "10.0.0.1"] {
            let name = ServerName::try_from(name).expect("name");
            servers
                .verify_server_cert(&hub, &[], &name, &[], now)
                .expect("the hub is a valid server");
        }
        let other = ServerName::try_from("other.example").expect("name");
        assert!(servers
            .verify_server_cert(&hub, &[], &other, &[], now)
            .is_err());
        // Each is good for its own role only (extended key usage).
        assert!(clients.verify_client_cert(&hub, &[], now).is_err());
        let name = ServerName::try_from("hub.example").expect("name");
        assert!(servers
            .verify_server_cert(&agent, &[], &name, &[], now)
            .is_err());
    }

    /// A CSR as an agent makes it (CN and SAN URI of `id`), plus `extra`
    /// changes to its parameters, signed by a new key of `alg`.
    fn csr(
        id: &str,
        alg: &'static rcgen::SignatureAlgorithm,
        extra: impl FnOnce(&mut CertificateParams),
    ) -> Vec<u8> {
        let key = KeyPair::generate_for(alg).expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, id);
        params.subject_alt_names = vec![uri(&format!("urn:outpost:agent:{id}"))];
        extra(&mut params);
        params.serialize_request(&key).expect("csr").der().to_vec()
    }

    fn new_ca(dir: &Path) -> PathBuf {
        let ca = dir.join("ca");
        init(&ca, DEFAULT_CA_NAME, Validity::CA_DEFAULT, false).expect("init");
        ca
    }

    #[test]
    fn a_csr_gets_a_client_certificate_for_the_expected_id_and_nothing_it_asked_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = new_ca(dir.path());
        let id = AgentId::parse("gw-1").expect("id");
        // Everything a hostile CSR could ask for besides its id.
        let request = csr("gw-1", &PKCS_ECDSA_P256_SHA256, |p| {
            p.subject_alt_names.push(dns("hub.example"));
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        });
        let issued =
            issue_from_csr(&ca, &request, &id, Validity::days(30).expect("30")).expect("issue");

        let (_, block) = x509_parser::pem::parse_x509_pem(issued.pem.as_bytes()).expect("pem");
        let (_, cert) = x509_parser::parse_x509_certificate(&block.contents).expect("der");
        assert_eq!(agent_id_from_cert_der(&block.contents).expect("id"), id);
        let names: Vec<String> = cert
            .subject_alternative_name()
            .expect("san")
            .expect("has san")
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(names, ["URI(urn:outpost:agent:gw-1)"]);
        let cns: Vec<&str> = cert
            .subject()
            .iter_common_name()
            .map(|c| c.as_str().expect("cn"))
            .collect();
        assert_eq!(cns, ["gw-1"]);
        assert!(!cert.is_ca());
        let eku = cert
            .extended_key_usage()
            .expect("eku")
            .expect("has eku")
            .value;
        assert!(eku.client_auth && !eku.server_auth && !eku.any);
        assert_eq!(
            issued.fingerprint_sha256_hex,
            outpost_tls::fingerprint_sha256(&block.contents)
        );
        assert_eq!(issued.serial_hex, hex(cert.tbs_certificate.raw_serial()));
        assert_eq!(issued.serial_hex.len(), 32);
        assert_eq!(issued.not_after, cert.validity().not_after.to_datetime());
        let days = (issued.not_after - clock::utc_now()).whole_days();
        assert!((29..=30).contains(&days), "{days}");

        // rustls takes it as a client certificate of the fleet CA.
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der(&ca.join(CA_CERT))).expect("root");
        let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider,
        )
        .build()
        .expect("verifier");
        let leaf: rustls::pki_types::CertificateDer<'_> = block.contents.clone().into();
        clients
            .verify_client_cert(&leaf, &[], rustls::pki_types::UnixTime::now())
            .expect("a valid client certificate");

        // Two issues for one key have two serials.
        let again = issue_from_csr(&ca, &request, &id, Validity::LEAF_DEFAULT).expect("again");
        assert_ne!(again.serial_hex, issued.serial_hex);
    }

    #[test]
    fn a_csr_that_names_no_one_is_issued_for_the_expected_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = new_ca(dir.path());
        let id = AgentId::parse("gw-1").expect("id");
        let der = csr("gw-1", &PKCS_ECDSA_P256_SHA256, |p| {
            p.distinguished_name = DistinguishedName::new();
            p.subject_alt_names.clear();
        });
        let issued = issue_from_csr(&ca, &der, &id, Validity::LEAF_DEFAULT).expect("issue");
        let (_, block) = x509_parser::pem::parse_x509_pem(issued.pem.as_bytes()).expect("pem");
        assert_eq!(agent_id_from_cert_der(&block.contents).expect("id"), id);
    }

    #[test]
    fn a_csr_for_another_id_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = new_ca(dir.path());
        let id = AgentId::parse("gw-1").expect("id");
        // By its CN and SAN, by its SAN alone, by its CN alone.
        let both = csr("gw-2", &PKCS_ECDSA_P256_SHA256, |_| {});
        let san = csr("gw-1", &PKCS_ECDSA_P256_SHA256, |p| {
            p.subject_alt_names.push(uri("urn:outpost:agent:gw-2"));
        });
        let cn = csr("gw-1", &PKCS_ECDSA_P256_SHA256, |p| {
            p.distinguished_name = DistinguishedName::new();
            p.distinguished_name.push(DnType::CommonName, "gw-2");
        });
        for (what, der, named) in [
            ("both", both, "CN=gw-2"),
            ("san", san, "urn:outpost:agent:gw-2"),
            ("cn", cn, "CN=gw-2"),
        ] {
            let err = issue_from_csr(&ca, &der, &id, Validity::LEAF_DEFAULT).expect_err(what);
            assert!(
                matches!(&err, CaError::CsrForAnotherId { expected, named: n } if expected == &id && n == named),
                "{what}: {err}"
            );
        }
    }

    #[test]
    fn a_csr_whose_signature_does_not_verify_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = new_ca(dir.path());
        let id = AgentId::parse("gw-1").expect("id");
        let mut der = csr("gw-1", &PKCS_ECDSA_P256_SHA256, |_| {});
        // The request's info is signed: change one byte of the CN's text.
        let at = der
            .windows(4)
            .position(|w| w == b"gw-1")
            .expect("the CN is in the request");
        der[at + 3] = b'9';
        let err = issue_from_csr(&ca, &der, &id, Validity::LEAF_DEFAULT).expect_err("tampered");
        assert!(matches!(err, CaError::CsrInvalid(_)), "{err}");
    }

    #[test]
    fn bytes_that_are_not_one_csr_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = new_ca(dir.path());
        let id = AgentId::parse("gw-1").expect("id");
        let mut trailing = csr("gw-1", &PKCS_ECDSA_P256_SHA256, |_| {});
        trailing.push(0);
        let cert = cert_with(vec![uri("urn:outpost:agent:gw-1")]);
        for (what, der) in [
            ("empty", Vec::new()),
            ("garbage", b"not a request".to_vec()),
            ("trailing", trailing),
            ("a certificate", cert),
        ] {
            let err = issue_from_csr(&ca, &der, &id, Validity::LEAF_DEFAULT).expect_err(what);
            assert!(matches!(err, CaError::CsrInvalid(_)), "{what}: {err}");
        }
    }

    #[test]
    fn a_csr_for_a_key_other_than_p256_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = new_ca(dir.path());
        let id = AgentId::parse("gw-1").expect("id");
        for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let der = csr("gw-1", alg, |_| {});
            let err = issue_from_csr(&ca, &der, &id, Validity::LEAF_DEFAULT).expect_err("alg");
            assert!(matches!(err, CaError::CsrKeyNotP256(_)), "{err}");
        }
    }

    #[test]
    fn no_csr_is_signed_without_a_usable_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = AgentId::parse("gw-1").expect("id");
        let der = csr("gw-1", &PKCS_ECDSA_P256_SHA256, |_| {});
        let err = issue_from_csr(&dir.path().join("none"), &der, &id, Validity::LEAF_DEFAULT)
            .expect_err("no ca");
        assert!(matches!(err, CaError::Missing(_)), "{err}");
    }
}
