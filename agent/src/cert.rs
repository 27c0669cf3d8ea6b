//! The agent's certificate on disk, and renewing it: when it is due, a new
//! key and its signing request, the hub's certificate put in place, and the
//! operator's request to renew now.
//!
//! ```text
//! [uplink] cert    agent.pem        the certificate in use
//! [uplink] key     agent.key        its key (0600)
//!                  agent.key.new    the key of a renewal under way (0600),
//!                                   made on the device; it never leaves it
//!                  agent.pem.new    the renewed certificate, before the swap
//! data_dir         renew.request    `outpost-agent cert renew` asks the
//!                                   running agent to renew now
//! ```
//!
//! The swap, once the hub's certificate arrived and was checked against the
//! new key: `agent.pem.new` → `agent.pem`, then `agent.key.new` →
//! `agent.key`, each a rename. A crash between the two leaves a certificate
//! whose key is `agent.key.new`; [`recover`] (run before every connection)
//! finishes the swap. The connection that renewed goes on with the old
//! certificate; the next one uses the new.
//!
//! Every file is written under a temporary name in the same folder and
//! renamed into place, a key created with mode 0600 from the start.
//! Architecture invariant: this module never logs or prints a private key.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_protocols::Timestamp;

/// The request file's name in the data directory.
pub const RENEW_REQUEST: &str = "renew.request";

/// Mode of a private key file.
const KEY_MODE: u32 = 0o600;
/// Mode of a certificate file.
const CERT_MODE: u32 = 0o644;

/// Why a certificate step failed; each names its file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// A file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written or renamed.
    #[error("{path}: cannot write: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file is not a PEM certificate.
    #[error("{path}: not a PEM certificate: {reason}")]
    NotACertificate {
        /// The file, or `Renewed` for the hub's answer.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The certificate from the hub is not for the key this agent made.
    #[error("the renewed certificate is not for the key in {0}; keeping the current one")]
    KeyMismatch(PathBuf),
    /// No renewal is under way (no new key).
    #[error("{0}: no renewal key; the renewed certificate cannot be used")]
    NoNewKey(PathBuf),
    /// rcgen refused to make the key or the request.
    #[error("cannot make the key or the signing request: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The agent's certificate and key files (`[uplink] cert`, `key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The certificate.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

/// When a certificate is valid, Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Not before.
    pub not_before: i64,
    /// Not after.
    pub not_after: i64,
}

impl Validity {
    /// When two thirds of the validity have passed: when to renew.
    #[must_use]
    pub fn renew_at(&self) -> i64 {
        let span = self.not_after.saturating_sub(self.not_before).max(0);
        self.not_before
            .saturating_add(span / 3 * 2 + (span % 3) * 2 / 3)
    }

    /// How long from `now` until [`renew_at`](Self::renew_at), zero once
    /// passed.
    #[must_use]
    pub fn renew_in(&self, now: Timestamp) -> Duration {
        let now_s = now.0.div_euclid(1_000_000_000);
        Duration::from_secs(u64::try_from(self.renew_at().saturating_sub(now_s)).unwrap_or(0))
    }

    /// Seconds from `now` until it expires (negative once expired).
    #[must_use]
    pub fn expires_in(&self, now: Timestamp) -> i64 {
        self.not_after
            .saturating_sub(now.0.div_euclid(1_000_000_000))
    }
}

impl CertFiles {
    /// `<key>.new`: the key of a renewal under way.
    #[must_use]
    pub fn new_key(&self) -> PathBuf {
        with_suffix(&self.key, ".new")
    }

    fn new_cert(&self) -> PathBuf {
        with_suffix(&self.cert, ".new")
    }

    /// The validity of the certificate in use.
    pub fn validity(&self) -> Result<Validity, CertError> {
        let pem = fs::read(&self.cert).map_err(|source| CertError::Read {
            path: self.cert.clone(),
            source,
        })?;
        let (_, v, _) = parse(&pem, &self.cert)?;
        Ok(v)
    }

    /// Makes a new ECDSA P-256 key, writes it to `<key>.new` (0600), and
    /// returns a signing request for it (DER). The request names nothing:
    /// the hub signs it for the id of the session's certificate.
    pub fn make_request(&self) -> Result<Vec<u8>, CertError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&key)?;
        write_file(&self.new_key(), key.serialize_pem().as_bytes(), KEY_MODE)?;
        Ok(csr.der().to_vec())
    }

    /// Puts the hub's certificate `cert_pem` and the renewal's key in place
    /// of the current ones, after checking that the certificate is for that
    /// key; returns its validity.
    pub fn install(&self, cert_pem: &str) -> Result<Validity, CertError> {
        let new_key = self.new_key();
        let key_pem = match fs::read_to_string(&new_key) {
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CertError::NoNewKey(new_key))
            }
            Err(source) => {
                return Err(CertError::Read {
                    path: new_key,
                    source,
                })
            }
        };
        let (_, validity, spki) = parse(cert_pem.as_bytes(), Path::new("Renewed"))?;
        if !same_key(&spki, &key_pem) {
            return Err(CertError::KeyMismatch(new_key));
        }
        let new_cert = self.new_cert();
        write_file(&new_cert, cert_pem.as_bytes(), CERT_MODE)?;
        rename(&new_cert, &self.cert)?;
        rename(&new_key, &self.key)?;
        Ok(validity)
    }
}

/// Finishes a swap a crash interrupted: when `<key>.new` is the key of the
/// certificate in use, it becomes the key. Whether it did.
pub fn recover(files: &CertFiles) -> Result<bool, CertError> {
    let new_key = files.new_key();
    let Ok(key_pem) = fs::read_to_string(&new_key) else {
        return Ok(false);
    };
    let pem = fs::read(&files.cert).map_err(|source| CertError::Read {
        path: files.cert.clone(),
        source,
    })?;
    let (_, _, spki) = parse(&pem, &files.cert)?;
    if !same_key(&spki, &key_pem) {
        return Ok(false);
    }
    rename(&new_key, &files.key)?;
    Ok(true)
}

/// Whether an operator asked for a renewal (`outpost-agent cert renew`).
#[must_use]
pub fn renewal_requested(data_dir: &Path) -> bool {
    data_dir.join(RENEW_REQUEST).exists()
}

/// Asks the running agent to renew now: writes `<data_dir>/renew.request`.
pub fn request_renewal(data_dir: &Path) -> Result<PathBuf, CertError> {
    let path = data_dir.join(RENEW_REQUEST);
    write_file(&path, b"renew\n", CERT_MODE)?;
    Ok(path)
}

/// Forgets an operator's request, once the renewal it asked for is done.
pub fn clear_request(data_dir: &Path) {
    let _ = fs::remove_file(data_dir.join(RENEW_REQUEST));
}

/// The certificate, its validity and its public key (SubjectPublicKeyInfo,
/// DER) from PEM text.
fn parse(pem: &[u8], path: &Path) -> Result<(Vec<u8>, Validity, Vec<u8>), CertError> {
    let bad = |reason: String| CertError::NotACertificate {
        path: path.to_owned(),
        reason,
    };
    let (_, block) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| bad(e.to_string()))?;
    if block.label != "CERTIFICATE" {
        return Err(bad(format!("a {:?} block", block.label)));
    }
    let (_, cert) =
        x509_parser::parse_x509_certificate(&block.contents).map_err(|e| bad(e.to_string()))?;
    let v = Validity {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    };
    let spki = cert.public_key().raw.to_vec();
    Ok((block.contents.clone(), v, spki))
}

/// Whether `key_pem` is the private key of the public key `spki`.
fn same_key(spki: &[u8], key_pem: &str) -> bool {
    use rcgen::PublicKeyData as _;
    rcgen::KeyPair::from_pem(key_pem).is_ok_and(|k| k.subject_public_key_info() == spki)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn rename(from: &Path, to: &Path) -> Result<(), CertError> {
    fs::rename(from, to).map_err(|source| CertError::Write {
        path: to.to_owned(),
        source,
    })
}

/// Writes `bytes` to `path` with exactly `mode`, atomically
/// (`outpost_tls::write_atomically`).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    let err = |source| CertError::Write {
        path: path.to_owned(),
        source,
    };
    outpost_tls::write_atomically(path, bytes, mode).map_err(err)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    /// A CA and a leaf for `key`, valid from `nb` to `na` (Unix seconds).
    fn issue(ca: &rcgen::KeyPair, key: &impl rcgen::PublicKeyData, nb: i64, na: i64) -> String {
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(ca).expect("ca");
        let issuer = rcgen::Issuer::from_ca_cert_der(ca_cert.der(), ca).expect("issuer");
        let mut p = rcgen::CertificateParams::default();
        p.not_before = rcgen::date_time_ymd(1970, 1, 1) + time_secs(nb);
        p.not_after = rcgen::date_time_ymd(1970, 1, 1) + time_secs(na);
        p.signed_by(key, &issuer).expect("leaf").pem()
    }

    fn time_secs(s: i64) -> std::time::Duration {
        std::time::Duration::from_secs(u64::try_from(s).expect("positive"))
    }

    #[test]
    fn renewal_is_due_two_thirds_into_the_validity() {
        let v = Validity {
            not_before: 1_000,
            not_after: 4_000,
        };
        assert_eq!(v.renew_at(), 3_000);
        let s = 1_000_000_000;
        assert_eq!(v.renew_in(Timestamp(2_000 * s)), Duration::from_secs(1_000));
        assert_eq!(v.renew_in(Timestamp(5_000 * s)), Duration::ZERO);
        assert_eq!(v.expires_in(Timestamp(5_000 * s)), -1_000);
    }

    #[test]
    fn a_renewal_swaps_in_a_new_0600_key_only_with_its_certificate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = CertFiles {
            cert: dir.path().join("agent.pem"),
            key: dir.path().join("agent.key"),
        };
        let ca = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("ca key");
        let old = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        fs::write(&files.cert, issue(&ca, &old, 1_000, 4_000)).expect("cert");
        fs::write(&files.key, old.serialize_pem()).expect("key");
        assert_eq!(
            files.validity().expect("validity"),
            Validity {
                not_before: 1_000,
                not_after: 4_000
            }
        );

        let csr = files.make_request().expect("request");
        let req = rcgen::CertificateSigningRequestParams::from_der(&csr.as_slice().into())
            .expect("a valid request");
        let mode = fs::metadata(files.new_key())
            .expect("new key")
            .permissions();
        assert_eq!(mode.mode() & 0o777, 0o600);

        // A certificate for another key is refused, and nothing moves.
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let wrong = issue(&ca, &other, 2_000, 9_000);
        assert!(matches!(
            files.install(&wrong),
            Err(CertError::KeyMismatch(_))
        ));
        assert_eq!(
            fs::read_to_string(&files.key).expect("key"),
            old.serialize_pem()
        );

        let renewed = issue(&ca, &req.public_key, 2_000, 9_000);
        let v = files.install(&renewed).expect("installs");
        assert_eq!(v.not_after, 9_000);
        assert_eq!(fs::read_to_string(&files.cert).expect("cert"), renewed);
        assert!(!files.new_key().exists());
        let mode = fs::metadata(&files.key).expect("key").permissions();
        assert_eq!(mode.mode() & 0o777, 0o600);
        assert!(!recover(&files).expect("nothing to recover"));
    }

    #[test]
    fn a_swap_cut_between_its_renames_is_finished_before_the_next_connection() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = CertFiles {
            cert: dir.path().join("agent.pem"),
            key: dir.path().join("agent.key"),
        };
        let ca = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("ca key");
        let old = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        fs::write(&files.key, old.serialize_pem()).expect("key");
        let csr = files.make_request().expect("request");
        let req = rcgen::CertificateSigningRequestParams::from_der(&csr.as_slice().into())
            .expect("request");
        // The certificate was renamed into place, the key not yet.
        fs::write(&files.cert, issue(&ca, &req.public_key, 0, 9_000)).expect("cert");
        assert!(recover(&files).expect("recovers"));
        let key =
            rcgen::KeyPair::from_pem(&fs::read_to_string(&files.key).expect("key")).expect("key");
        use rcgen::PublicKeyData as _;
        assert!(same_key(
            &req.public_key.subject_public_key_info(),
            &key.serialize_pem()
        ));
    }

    #[test]
    fn an_operators_request_is_a_file_in_the_data_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!renewal_requested(dir.path()));
        request_renewal(dir.path()).expect("requests");
        assert!(renewal_requested(dir.path()));
        clear_request(dir.path());
        assert!(!renewal_requested(dir.path()));
    }
}
