//! Certificates and private keys from PEM files.
//!
//! The file is read whole and parsed with `rustls-pemfile`; an error names the
//! file and keeps the I/O or decoding error as its source. A key's bytes are
//! never put into an error.

use std::path::Path;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

use crate::error::PemError;

fn read(path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|source| PemError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file, in order; a file with none is an error.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let bytes = read(path)?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| PemError::Invalid {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    let bytes = read(path)?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|source| PemError::Invalid {
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| PemError::NoPrivateKey {
            path: path.to_owned(),
        })
}

/// Every certificate of a CA file as a trust anchor, and nothing else.
pub fn load_roots(path: &Path) -> Result<RootCertStore, PemError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|source| PemError::UnusableCa {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}
