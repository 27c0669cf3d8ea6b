//! QUIC stateless resets across restarts and replicas.
//!
//! A restarted hub, or another replica behind the same address, must be able
//! to reset the connections it does not know: otherwise the agent hears
//! nothing and waits out its idle timeout (30 s) before redialling. That
//! takes two things that are random per endpoint by default: the key the
//! reset tokens are derived from, and the key of quinn's connection-id
//! generator, without which a packet for another endpoint's connection is
//! dropped as an invalid id before any reset is considered. Both are derived
//! here from one secret, kept in `<data_dir>/reset.key` or shared by the
//! replicas through their store.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the reset secret's file is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResetKeyError {
    /// The file exists but does not hold a secret.
    #[error("{}: must hold exactly 32 bytes; delete it to make a new one", path.display())]
    WrongLength {
        /// The file.
        path: PathBuf,
    },
    /// The OS gave no random bytes for a new secret.
    #[error("{}: no randomness", path.display())]
    NoRandomness {
        /// The file.
        path: PathBuf,
    },
    /// The data folder could not be made.
    #[error("{}: cannot create folder: {source}", path.display())]
    CreateDir {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file could not be created.
    #[error("{}: cannot create: {source}", path.display())]
    Create {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The new secret could not be written and synced.
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// The endpoint's stateless-reset key and connection-id generator, both
/// derived from `secret`.
pub(super) fn endpoint_config(secret: &[u8]) -> quinn::EndpointConfig {
    let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&reset, b"outpost connection ids");
    let mut first = [0u8; 8];
    first.copy_from_slice(&tag.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(first);
    let mut config = quinn::EndpointConfig::new(Arc::new(reset));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

/// The secret of QUIC stateless resets, kept in `<data_dir>/reset.key`
/// (0600), made on first start.
pub(super) fn reset_secret_file(data_dir: &Path) -> Result<Vec<u8>, ResetKeyError> {
    let path = data_dir.join("reset.key");
    match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == 32 => {
            // An older hub made it with the umask's mode: a secret is 0600.
            if let Err(source) = narrow_mode(&path) {
                return Err(ResetKeyError::Write { path, source });
            }
            Ok(bytes)
        }
        Ok(_) => Err(ResetKeyError::WrongLength { path }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => new_secret(data_dir, path),
        Err(source) => Err(ResetKeyError::Read { path, source }),
    }
}

/// Makes a new secret and writes it to `path`, which must not exist.
fn new_secret(data_dir: &Path, path: PathBuf) -> Result<Vec<u8>, ResetKeyError> {
    let mut bytes = vec![0u8; 32];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        return Err(ResetKeyError::NoRandomness { path });
    }
    if let Err(source) = std::fs::create_dir_all(data_dir) {
        return Err(ResetKeyError::CreateDir { path, source });
    }
    let mut f = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(f) => f,
        Err(source) => return Err(ResetKeyError::Create { path, source }),
    };
    let written = f
        .set_permissions(std::fs::Permissions::from_mode(0o600))
        .and_then(|()| f.write_all(&bytes))
        .and_then(|()| f.sync_all());
    match written {
        Ok(()) => Ok(bytes),
        Err(source) => Err(ResetKeyError::Write { path, source }),
    }
}

/// Sets the existing file at `path` to 0600 if group or others may read it.
fn narrow_mode(path: &Path) -> std::io::Result<()> {
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reset_key_is_0600_and_an_older_wider_one_is_narrowed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("reset.key");
        let mode = || std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        let made = reset_secret_file(dir.path()).expect("makes");
        assert_eq!(mode(), 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(reset_secret_file(dir.path()).expect("reads"), made);
        assert_eq!(mode(), 0o600);
    }
}
