//! The OPC UA library's trust store, made from the config at every start.
//!
//! async-opcua trusts a server certificate when a copy of it lies in its PKI
//! folder's `trusted/` directory under a name made from the certificate, and
//! refuses one found in `rejected/` (where it also drops every unknown one).
//! The config is the trust list here, so the folder is rebuilt from
//! `trusted_server_certificates` each time: a certificate removed from the
//! config is no longer trusted, and one added is trusted even if an earlier
//! run rejected it.

use std::path::{Path, PathBuf};

use opcua::crypto::CertificateStore;

/// Why the trust store could not be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TrustError {
    /// A configured certificate cannot be read or parsed.
    #[error("{path}: {message}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What the library said.
        message: String,
    },
    /// The PKI folder cannot be written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrustError + '_ {
    move |source| TrustError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Makes `pki/trusted` hold exactly the `trusted` certificates (as DER) and
/// takes them out of `pki/rejected`.
pub(crate) fn prepare(pki: &Path, trusted: &[PathBuf]) -> Result<(), TrustError> {
    let trusted_dir = pki.join("trusted");
    let rejected_dir = pki.join("rejected");
    for d in [&trusted_dir, &rejected_dir] {
        std::fs::create_dir_all(d).map_err(io(d))?;
    }
    let mut names = Vec::with_capacity(trusted.len());
    for path in trusted {
        let cert =
            CertificateStore::read_cert(path).map_err(|message| TrustError::Certificate {
                path: path.clone(),
                message,
            })?;
        let der = cert.to_der().map_err(|e| TrustError::Certificate {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let name = CertificateStore::cert_file_name(&cert);
        let target = trusted_dir.join(&name);
        std::fs::write(&target, der).map_err(io(&target))?;
        let rejected = rejected_dir.join(&name);
        if rejected.exists() {
            std::fs::remove_file(&rejected).map_err(io(&rejected))?;
        }
        names.push(name);
    }
    for entry in std::fs::read_dir(&trusted_dir).map_err(io(&trusted_dir))? {
        let entry = entry.map_err(io(&trusted_dir))?;
        let keep = entry
            .file_name()
            .to_str()
            .is_some_and(|n| names.iter().any(|k| k == n));
        if !keep {
            let p = entry.path();
            if p.is_file() {
                std::fs::remove_file(&p).map_err(io(&p))?;
            }
        }
    }
    Ok(())
}
