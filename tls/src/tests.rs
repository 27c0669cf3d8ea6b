//! The loaders' errors, and configurations that really complete a handshake
//! (in memory, client against server).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::ServerName;

use crate::{
    client_config, load_certs, load_key, mtls_server_config, ClientFiles, PemError, TlsError,
};

/// A CA and two certificates it issued (a server's for `hub.example.net`, a
/// client's), as PEM files in `dir`.
struct Files {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    client_key_pem: String,
}

fn files(dir: &Path) -> Files {
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca_params, ca_key);
    let issue = |name: &str, file: &str| {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("issued");
        let (c, k) = (
            dir.join(format!("{file}.pem")),
            dir.join(format!("{file}.key")),
        );
        std::fs::write(&c, cert.pem()).expect("write");
        std::fs::write(&k, key.serialize_pem()).expect("write");
        (c, k, key.serialize_pem())
    };
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, ca_cert.pem()).expect("write");
    let (sc, sk, _) = issue("hub.example.net", "server");
    let (cc, ck, client_key_pem) = issue("agent", "client");
    Files {
        ca,
        server: (sc, sk),
        client: (cc, ck),
        client_key_pem,
    }
}

/// Runs a handshake between the two configurations in memory.
fn handshake(
    client: rustls::ClientConfig,
    server: rustls::ServerConfig,
    name: &str,
) -> Result<(), rustls::Error> {
    let name = ServerName::try_from(name.to_owned()).expect("name");
    let mut c = rustls::ClientConnection::new(Arc::new(client), name)?;
    let mut s = rustls::ServerConnection::new(Arc::new(server))?;
    for _ in 0..10 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).expect("in memory");
        }
        let mut rd = buf.as_slice();
        while !rd.is_empty() {
            s.read_tls(&mut rd).expect("in memory");
            s.process_new_packets()?;
        }
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).expect("in memory");
        }
        let mut rd = buf.as_slice();
        while !rd.is_empty() {
            c.read_tls(&mut rd).expect("in memory");
            c.process_new_packets()?;
        }
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok(());
        }
    }
    panic!("the handshake did not finish");
}

#[test]
fn a_client_with_its_certificate_completes_mutual_tls_with_the_hub() {
    let dir = tempfile::tempdir().expect("dir");
    let f = files(dir.path());
    let server = mtls_server_config(&f.ca, &f.server.0, &f.server.1).expect("server");
    let client = client_config(ClientFiles {
        ca: &f.ca,
        client: Some((&f.client.0, &f.client.1)),
        server_name: None,
    })
    .expect("client");
    handshake(client, server, "hub.example.net").expect("handshake");
}

#[test]
fn a_client_without_a_certificate_is_refused_by_the_hub() {
    let dir = tempfile::tempdir().expect("dir");
    let f = files(dir.path());
    let server = mtls_server_config(&f.ca, &f.server.0, &f.server.1).expect("server");
    let client = client_config(ClientFiles {
        ca: &f.ca,
        client: None,
        server_name: None,
    })
    .expect("client");
    assert!(handshake(client, server, "hub.example.net").is_err());
}

#[test]
fn server_name_checks_the_certificate_against_that_name_not_the_host_dialled() {
    let dir = tempfile::tempdir().expect("dir");
    let f = files(dir.path());
    let server = || mtls_server_config(&f.ca, &f.server.0, &f.server.1).expect("server");
    let client = |server_name| {
        client_config(ClientFiles {
            ca: &f.ca,
            client: Some((&f.client.0, &f.client.1)),
            server_name,
        })
        .expect("client")
    };
    // Dialled by address: refused unless the name is substituted.
    assert!(handshake(client(None), server(), "192.0.2.1").is_err());
    handshake(client(Some("hub.example.net")), server(), "192.0.2.1").expect("named");
    assert!(handshake(
        client(Some("other.example.net")),
        server(),
        "hub.example.net"
    )
    .is_err());
}

#[test]
fn pem_errors_name_the_file_and_keep_their_source() {
    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("missing.pem");
    let err = load_certs(&missing).expect_err("missing");
    assert!(matches!(err, PemError::Read { .. }));
    assert!(std::error::Error::source(&err).is_some());
    assert!(err
        .to_string()
        .starts_with(&format!("{}: cannot read: ", missing.display())));
    assert_eq!(err.path(), missing);

    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").expect("write");
    let err = load_certs(&garbage).expect_err("garbage");
    assert_eq!(
        err.to_string(),
        format!("{}: no certificate found (expected PEM)", garbage.display())
    );
    let err = load_key(&garbage).expect_err("garbage");
    assert_eq!(
        err.to_string(),
        format!("{}: no private key found (expected PEM)", garbage.display())
    );

    let broken = dir.path().join("broken.pem");
    std::fs::write(
        &broken,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let err = load_certs(&broken).expect_err("broken");
    assert!(matches!(err, PemError::Invalid { .. }), "{err:?}");
    assert!(err.to_string().contains("invalid PEM"), "{err}");
}

#[test]
fn configuration_errors_say_which_setting_is_wrong() {
    let dir = tempfile::tempdir().expect("dir");
    let f = files(dir.path());
    let missing = dir.path().join("missing.pem");
    let files = |ca, client, server_name| ClientFiles {
        ca,
        client,
        server_name,
    };
    assert!(matches!(
        client_config(files(&missing, None, None)),
        Err(TlsError::Ca(PemError::Read { .. }))
    ));
    assert!(matches!(
        client_config(files(&f.ca, Some((&missing, &f.client.1)), None)),
        Err(TlsError::Cert(_))
    ));
    assert!(matches!(
        client_config(files(&f.ca, Some((&f.client.0, &missing)), None)),
        Err(TlsError::Key(_))
    ));
    // A key that is not the certificate's.
    assert!(matches!(
        client_config(files(&f.ca, Some((&f.client.0, &f.server.1)), None)),
        Err(TlsError::KeyPair { .. })
    ));
    let err = client_config(files(&f.ca, None, Some("not a name!"))).expect_err("name");
    assert!(matches!(err, TlsError::ServerName { .. }));
    assert!(err.to_string().contains("not a name!"), "{err}");
    assert!(matches!(
        mtls_server_config(&f.ca, &f.server.0, &missing),
        Err(TlsError::Key(_))
    ));
}

#[test]
fn no_error_shows_key_material() {
    let dir = tempfile::tempdir().expect("dir");
    let f = files(dir.path());
    // A key where a certificate belongs, and a damaged key.
    let key_body: String = f
        .client_key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let damaged = dir.path().join("damaged.key");
    std::fs::write(
        &damaged,
        format!("-----BEGIN PRIVATE KEY-----\n{key_body}!\n-----END PRIVATE KEY-----\n"),
    )
    .expect("write");
    let errors = [
        client_config(ClientFiles {
            ca: &f.client.1,
            client: None,
            server_name: None,
        })
        .expect_err("a key is no CA")
        .to_string(),
        client_config(ClientFiles {
            ca: &f.ca,
            client: Some((&f.client.0, &damaged)),
            server_name: None,
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
        .err()
        .unwrap_or_default(),
        client_config(ClientFiles {
            ca: &f.ca,
            client: Some((&f.client.0, &f.server.1)),
            server_name: None,
        })
        .expect_err("not its key")
        .to_string(),
    ];
    for e in errors {
        assert!(!e.contains(&key_body[..16]), "key material in {e}");
    }
}
