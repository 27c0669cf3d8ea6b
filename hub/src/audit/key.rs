//! The hub's audit signing key: an Ed25519 private key in a file only the
//! hub's user reads (`[audit] key`, by default `<data_dir>/audit.key`).
//!
//! ```text
//! audit.key   mode 0600, refused when group or others may read it
//!   -----BEGIN PRIVATE KEY-----      PKCS#8 (v2 as written here; a v1 key
//!   <base64>                          from `openssl genpkey -algorithm
//!   -----END PRIVATE KEY-----         ed25519` is read too)
//!
//! public key  -----BEGIN PUBLIC KEY-----   SubjectPublicKeyInfo, as
//!             <base64>                      `outpost-hub audit key` prints it
//!             -----END PUBLIC KEY-----      and `audit verify --public-key`
//!                                           reads it
//!
//! sig = hex(Ed25519(key, "outpost-audit-v1\n" || hash))
//!       hash: the entry's chain hash as its 64 hex characters
//! ```
//!
//! Why the hub's process and the operator verbs both read the private key:
//! the verbs are the break-glass path that writes the store directly
//! (`policy apply`, `ca issue --config`), and they run as the hub's user; an
//! entry they append unsigned would break the chain's rule that every entry
//! after the first signed one is signed. Whoever can read the key can sign;
//! whoever can only write the store (a copy of `hub.db`, a NATS account
//! with access to the streams) cannot.
//!
//! Why the file is made on first use rather than by an install step: a hub
//! upgraded in place starts signing at once, and its older entries verify as
//! unsigned before the first signed one. It is created exclusively (a hard
//! link from a temporary file), so a verb and the hub starting together end
//! up with one key.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};

/// What a signature signs before the hash, so that an audit signature is
/// never valid as anything else made with the same key.
const CONTEXT: &[u8] = b"outpost-audit-v1\n";

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410, section 4),
/// before the 32 bytes of the key.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Why the key could not be read or made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The file exists but could not be read.
    #[error("{}: audit key: cannot read: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A new key could not be written.
    #[error("{}: audit key: cannot create: {source}", .path.display())]
    Create {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Group or others may read the file: it is no longer a secret.
    #[error("{}: audit key: mode {mode:04o} lets group or others read it; `chmod 600` it (and make a new key if others may have read it)", .path.display())]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is not an Ed25519 private key in PEM.
    #[error("{}: audit key: {message}", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A public key (given to `audit verify --public-key`) is not an Ed25519
    /// public key in PEM.
    #[error("{}: public key: {message}", .path.display())]
    InvalidPublic {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The OS gave no randomness for a new key.
    #[error("no randomness for a new audit key")]
    NoRandomness,
}

/// The private key that signs audit entries. Clones share it.
#[derive(Clone)]
pub struct AuditKey {
    pair: Arc<Ed25519KeyPair>,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKey")
            .field("public", &self.public_key().fingerprint())
            .finish_non_exhaustive()
    }
}

impl AuditKey {
    /// Reads the key at `path`, or makes it (mode 0600, its folder too) if
    /// there is no file. Refuses a file group or others may read.
    pub fn load_or_create(path: &Path) -> Result<AuditKey, KeyError> {
        match Self::load(path) {
            Err(KeyError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Self::create(path)
            }
            other => other,
        }
    }

    /// Reads the key at `path`; refuses a file group or others may read.
    pub fn load(path: &Path) -> Result<AuditKey, KeyError> {
        let read = |source| KeyError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = fs::metadata(path).map_err(read)?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::TooOpen {
                path: path.to_owned(),
                mode,
            });
        }
        let text = fs::read_to_string(path).map_err(read)?;
        let invalid = |message: String| KeyError::Invalid {
            path: path.to_owned(),
            message,
        };
        let der = pem_block(&text, "PRIVATE KEY").map_err(invalid)?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(|e| invalid(format!("not an Ed25519 private key ({e})")))?;
        Ok(AuditKey {
            pair: Arc::new(pair),
        })
    }

    /// A new key in memory only (tests, and tools that need a throwaway
    /// log).
    pub fn generate() -> Result<AuditKey, KeyError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .map_err(|_| KeyError::NoRandomness)?;
        let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|_| KeyError::NoRandomness)?;
        Ok(AuditKey {
            pair: Arc::new(pair),
        })
    }

    /// Makes a new key at `path`, unless another process made one first
    /// (then that one is read).
    fn create(path: &Path) -> Result<AuditKey, KeyError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .map_err(|_| KeyError::NoRandomness)?;
        let err = |source| KeyError::Create {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(err)?;
        }
        let pem = to_pem("PRIVATE KEY", doc.as_ref());
        write_private_new(path, pem.as_bytes()).map_err(err)?;
        Self::load(path)
    }

    /// Signs an entry's chain hash (hex); the signature in hex.
    pub fn sign(&self, hash: &str) -> String {
        let mut msg = Vec::with_capacity(CONTEXT.len() + hash.len());
        msg.extend_from_slice(CONTEXT);
        msg.extend_from_slice(hash.as_bytes());
        hex(self.pair.sign(&msg).as_ref())
    }

    /// The public key that checks this key's signatures.
    pub fn public_key(&self) -> PublicKey {
        let mut raw = [0u8; 32];
        raw.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(raw)
    }
}

/// An Ed25519 public key that checks audit signatures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// Reads a PEM public key (as `outpost-hub audit key` prints it) from
    /// `path`.
    pub fn read(path: &Path) -> Result<PublicKey, KeyError> {
        let text = fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_pem(&text).map_err(|message| KeyError::InvalidPublic {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses a PEM `PUBLIC KEY` block holding an Ed25519 key.
    pub fn from_pem(text: &str) -> Result<PublicKey, String> {
        let der = pem_block(text, "PUBLIC KEY")?;
        match der.strip_prefix(&SPKI_PREFIX[..]) {
            Some(raw) if raw.len() == 32 => {
                let mut k = [0u8; 32];
                k.copy_from_slice(raw);
                Ok(PublicKey(k))
            }
            _ => Err("not an Ed25519 public key".into()),
        }
    }

    /// Parses the 64 hex characters of [`PublicKey::to_hex`].
    pub fn from_hex(s: &str) -> Option<PublicKey> {
        let raw = unhex(s.trim())?;
        let mut k = [0u8; 32];
        (raw.len() == 32).then(|| {
            k.copy_from_slice(&raw);
            PublicKey(k)
        })
    }

    /// The key as PEM (SubjectPublicKeyInfo), which OpenSSL reads too.
    pub fn to_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.0);
        to_pem("PUBLIC KEY", &der)
    }

    /// The 32 bytes of the key in hex.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// A short name for the key in messages: the first 16 hex characters of
    /// the SHA-256 of its 32 bytes.
    pub fn fingerprint(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.0);
        hex(&d.as_ref()[..8])
    }

    /// Whether `sig` (hex) is this key's signature of the chain hash `hash`.
    pub fn verifies(&self, hash: &str, sig: &str) -> bool {
        let Some(sig) = unhex(sig) else {
            return false;
        };
        let mut msg = Vec::with_capacity(CONTEXT.len() + hash.len());
        msg.extend_from_slice(CONTEXT);
        msg.extend_from_slice(hash.as_bytes());
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(&msg, &sig)
            .is_ok()
    }
}

/// Writes `bytes` to a new file at `path` with mode 0600 whatever the umask,
/// failing if `path` exists: written to a temporary file first and hard
/// linked into place, so nobody ever reads it half written.
pub(crate) fn write_private_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        // The mode given at creation is masked by the umask; 0600 has no
        // bits a usual umask clears, but set it anyway so a strange umask
        // (0177 is fine, 0277 is not) cannot leave the key unreadable.
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        match fs::hard_link(&tmp, path) {
            Ok(()) => Ok(()),
            // Another process made the key first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    })();
    let _ = fs::remove_file(&tmp);
    result
}

/// The DER inside the first PEM block labelled `label`.
fn pem_block(text: &str, label: &str) -> Result<Vec<u8>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut lines = text.lines().map(str::trim);
    if !lines.by_ref().any(|l| l == begin) {
        return Err(format!("no `{begin}` line (PEM expected)"));
    }
    let mut b64 = String::new();
    for l in lines {
        if l == end {
            return base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| format!("bad base64 in the PEM block: {e}"));
        }
        b64.push_str(l);
    }
    Err(format!("no `{end}` line"))
}

fn to_pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(chunk));
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    s.as_bytes()
        .chunks(2)
        .map(|pair| {
            let pair = std::str::from_utf8(pair).ok().filter(|p| p.len() == 2)?;
            u8::from_str_radix(pair, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_file_is_0600_and_reads_back_as_the_same_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub").join("audit.key");
        let a = AuditKey::load_or_create(&path).expect("creates");
        let mode = fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = AuditKey::load_or_create(&path).expect("reads");
        assert_eq!(a.public_key(), b.public_key());
        assert_eq!(
            fs::read_dir(path.parent().expect("dir"))
                .expect("ls")
                .count(),
            1
        );
    }

    #[test]
    fn a_key_file_others_may_read_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.key");
        AuditKey::load_or_create(&path).expect("creates");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
        let e = AuditKey::load(&path).expect_err("refused");
        assert!(matches!(e, KeyError::TooOpen { mode: 0o640, .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[test]
    fn signatures_verify_only_for_their_hash_and_their_key() {
        let k = AuditKey::generate().expect("key");
        let other = AuditKey::generate().expect("key");
        let h = "ab".repeat(32);
        let sig = k.sign(&h);
        assert!(k.public_key().verifies(&h, &sig));
        assert!(!k.public_key().verifies(&"cd".repeat(32), &sig));
        assert!(!other.public_key().verifies(&h, &sig));
        let mut bad = sig.clone();
        bad.replace_range(0..2, if &sig[0..2] == "00" { "01" } else { "00" });
        assert!(!k.public_key().verifies(&h, &bad));
        assert!(!k.public_key().verifies(&h, "zz"));
    }

    #[test]
    fn the_public_key_round_trips_through_pem() {
        let k = AuditKey::generate().expect("key");
        let pem = k.public_key().to_pem();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
        assert_eq!(PublicKey::from_pem(&pem), Ok(k.public_key()));
        assert!(PublicKey::from_pem("hello").is_err());
    }

    #[test]
    fn an_openssl_v1_pkcs8_key_is_read() {
        // `openssl genpkey -algorithm ed25519` output (RFC 8410, section 10.3).
        let pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n-----END PRIVATE KEY-----\n";
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.key");
        write_private_new(&path, pem.as_bytes()).expect("writes");
        let k = AuditKey::load(&path).expect("reads");
        assert_eq!(
            k.public_key().to_hex(),
            "19bf44096984cdfe8541bac167dc3b96c85086aa30b6b6cb0c5c38ad703166e1"
        );
    }
}
