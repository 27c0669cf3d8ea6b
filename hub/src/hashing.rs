//! The hub's hashing key: the secret from which the key of every policy
//! rule that hashes is derived (`outpost_protocols::policy::HashingKey`),
//! in a file only the hub's user reads (`[policy] hashing_key`, by default
//! `<data_dir>/hashing.key`).
//!
//! ```text
//! hashing.key   mode 0600, refused when group or others may read it
//!   <64 hex digits>\n     32 random bytes
//! ```
//!
//! Why a file of its own and not the policy text: the text is stored in the
//! hub's database, shown by `policy show` and diffed by `policy diff`, and
//! used to be sent to every agent; a key in it was a key on every gateway.
//! Only the running hub reads this file (the operator verbs never need it),
//! and agents get keys derived from it for the rules that apply to them.
//!
//! Why it is made on first start: a hub upgraded in place has no key yet;
//! a fresh random key is the only safe one (the `[hashing] key` of an older
//! policy version was on every gateway, so it is never taken over). It is
//! created exclusively (a hard link from a temporary file), so two
//! processes starting together end up with one key, and its creation is
//! audited as `hashing.key_created`.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use outpost_protocols::policy::HashingKey;

/// Why the key could not be read or made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HashingKeyError {
    /// The file exists but could not be read.
    #[error("{}: hashing key: cannot read: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A new key could not be written.
    #[error("{}: hashing key: cannot create: {source}", .path.display())]
    Create {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Group or others may read the file: it is no longer a secret.
    #[error("{}: hashing key: mode {mode:04o} lets group or others read it; `chmod 600` it (and, if others may have read it, remove it so that the hub makes a new one: pseudonyms then change)", .path.display())]
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file does not hold 64 hex digits.
    #[error("{}: hashing key: not 64 hex digits (32 bytes)", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
    },
    /// The OS gave no randomness for a new key.
    #[error("no randomness for a new hashing key")]
    NoRandomness,
}

/// Reads the key at `path`, or makes it (mode 0600, its folder too) if
/// there is no file; `true` if this call made it. Refuses a file group or
/// others may read.
pub fn load_or_create(path: &Path) -> Result<(HashingKey, bool), HashingKeyError> {
    match load(path) {
        Err(HashingKeyError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            create(path)
        }
        other => other.map(|k| (k, false)),
    }
}

/// Reads the key at `path`; refuses a file group or others may read.
pub fn load(path: &Path) -> Result<HashingKey, HashingKeyError> {
    let read = |source| HashingKeyError::Read {
        path: path.to_owned(),
        source,
    };
    let mode = fs::metadata(path).map_err(read)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(HashingKeyError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    let text = fs::read_to_string(path).map_err(read)?;
    HashingKey::from_hex(&text).ok_or_else(|| HashingKeyError::Invalid {
        path: path.to_owned(),
    })
}

/// Makes a new key at `path`, unless another process made one first (then
/// that one is read, and this call made nothing).
fn create(path: &Path) -> Result<(HashingKey, bool), HashingKeyError> {
    let mut bytes = [0u8; HashingKey::LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| HashingKeyError::NoRandomness)?;
    let key = HashingKey::from_bytes(&bytes).ok_or(HashingKeyError::NoRandomness)?;
    let err = |source| HashingKeyError::Create {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(err)?;
    }
    let text = format!("{}\n", key.to_hex());
    crate::audit::key::write_private_new(path, text.as_bytes()).map_err(err)?;
    let found = load(path)?;
    let made = found == key;
    Ok((found, made))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_key_file_is_0600_and_reads_back_as_the_same_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub").join("hashing.key");
        let (a, made) = load_or_create(&path).expect("creates");
        assert!(made);
        let mode = fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (b, made) = load_or_create(&path).expect("reads");
        assert!(!made);
        assert_eq!(a, b);
        assert_eq!(
            fs::read_dir(path.parent().expect("dir"))
                .expect("ls")
                .count(),
            1
        );
    }

    #[test]
    fn a_key_file_others_may_read_or_that_is_not_a_key_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hashing.key");
        load_or_create(&path).expect("creates");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
        let e = load(&path).expect_err("refused");
        assert!(
            matches!(e, HashingKeyError::TooOpen { mode: 0o640, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
        fs::write(&path, "not a key").expect("writes");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(
            load_or_create(&path),
            Err(HashingKeyError::Invalid { .. })
        ));
    }
}
