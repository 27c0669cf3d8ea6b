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
//! An agent's identity is the SAN URI of its certificate and nothing else: the
//! hub calls [`agent_id_from_cert_der`] on the peer certificate that TLS has
//! verified against the fleet CA.
//!
//! Every file is written to a temporary name in the same folder and renamed
//! into place, so a reader never sees half a file; a key file is created with
//! mode 0600, so it is never readable by others, not even for a moment.
//!
//! Architecture invariant: this module never logs or prints a private key.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
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
}

/// How long a certificate is valid, in whole days from 1 to
/// [`Validity::MAX_DAYS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    days: u32,
}

impl Validity {
    /// The longest validity accepted, a hundred years.
    pub const MAX_DAYS: u32 = 36_500;
    /// The CA's validity unless told otherwise: ten years.
    pub const CA_DEFAULT: Validity = Validity { days: 3650 };
    /// An issued certificate's validity unless told otherwise: 825 days, the
    /// longest that browsers and most TLS stacks have accepted for a leaf.
    pub const LEAF_DEFAULT: Validity = Validity { days: 825 };

    /// A validity of `days` days.
    pub fn days(days: u32) -> Result<Validity, CaError> {
        if (1..=Self::MAX_DAYS).contains(&days) {
            Ok(Validity { days })
        } else {
            Err(CaError::BadValidity(days.to_string()))
        }
    }

    /// The number of days.
    #[must_use]
    pub fn get(self) -> u32 {
        self.days
    }

    fn duration(self) -> Duration {
        Duration::days(i64::from(self.days))
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

/// Writes `bytes` to `path` through a temporary file in the same folder,
/// created exclusively with `mode`, then renamed over `path`: the file is
/// never visible half-written, and a key never exists with a wider mode,
/// whatever mode an older file at `path` had.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let err = |source| CaError::Write {
        path: path.to_owned(),
        source,
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp.{}", std::process::id()));
    // A leftover from a crashed run of this same process id; create_new below
    // refuses anything that is still there, symlinks included.
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
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
}
