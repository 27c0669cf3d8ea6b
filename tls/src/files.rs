//! Writing a key or certificate file so that no reader ever sees half of it
//! and no other user can read a key, not even for a moment: the CA, the
//! enrolling device and the renewing agent all write theirs this way, so it
//! is written once, here, beside the code that reads them back.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

/// Writes `bytes` to `path` with exactly `mode`: to `.<name>.tmp.<pid>` in
/// the same folder, created with `mode` (never through a leftover or a
/// symlink there), synced, then renamed over `path`, whose old mode does not
/// matter. A failure removes the temporary file and leaves `path` as it
/// was.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp.{}", std::process::id()));
    // A leftover from a crashed run of this same process id; `create_new`
    // below refuses anything still there, symlinks included.
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode, never widened it: set it
        // exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_gets_exactly_its_mode_and_replaces_an_older_wider_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.key");
        fs::write(&path, b"old").expect("old");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).expect("wide");
        write_atomically(&path, b"new", 0o600).expect("writes");
        assert_eq!(fs::read(&path).expect("reads"), b"new");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Nothing is left beside it.
        assert_eq!(fs::read_dir(dir.path()).expect("lists").count(), 1);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing").join("agent.key");
        assert!(write_atomically(&path, b"new", 0o600).is_err());
        assert_eq!(fs::read_dir(dir.path()).expect("lists").count(), 0);
    }
}
