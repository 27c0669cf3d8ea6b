//! The fleet CA through the real `outpost-hub ca` verbs, checked independently
//! with `openssl`: the files, their modes, the SANs, the signatures, and bad
//! input as one line with exit status 2.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use anyhow::{anyhow, Context as _, Result};
use outpost_tests::{bin, run_cli};

/// Runs `outpost-hub` with `args`.
fn hub(args: &[&str]) -> Result<(i32, String, String)> {
    run_cli(&bin("outpost-hub")?, args)
}

/// Runs `outpost-hub` and fails unless it exits 0.
fn hub_ok(args: &[&str]) -> Result<String> {
    let (code, out, err) = hub(args)?;
    anyhow::ensure!(code == 0, "outpost-hub {args:?} exited {code}: {err}");
    Ok(out)
}

/// Runs `openssl` with `args`: whether it succeeded, and its stdout and stderr.
fn openssl(args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new("openssl").args(args).output().map_err(|e| {
        anyhow!(
            "cannot run openssl ({e}): these tests check the certificates with it, \
             independently of the code that made them; install it (apt-get install openssl)"
        )
    })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// `openssl x509 -noout -text` of a PEM certificate.
fn x509_text(pem: &Path) -> Result<String> {
    let (ok, text) = openssl(&["x509", "-in", s(pem)?, "-noout", "-text"])?;
    anyhow::ensure!(ok, "openssl cannot read {}: {text}", pem.display());
    Ok(text)
}

fn s(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("not UTF-8: {}", p.display()))
}

fn mode(p: &Path) -> Result<u32> {
    Ok(std::fs::metadata(p)
        .with_context(|| p.display().to_string())?
        .permissions()
        .mode()
        & 0o777)
}

fn assert_bad(code: i32, stderr: &str, needles: &[&str]) {
    assert_eq!(code, 2, "exit status, stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{n:?} not in {stderr:?}");
    }
}

#[test]
fn ca_init_writes_a_certificate_and_a_private_key_readable_only_by_its_owner() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("ca");
    let out = hub_ok(&["ca", "init", "--dir", s(&ca)?, "--name", "Depot fleet CA"])?;
    assert!(!out.contains("PRIVATE KEY"), "a key was printed: {out}");

    let cert = std::fs::read_to_string(ca.join("ca.pem"))?;
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
    let key = std::fs::read_to_string(ca.join("ca.key"))?;
    assert!(
        key.starts_with("-----BEGIN PRIVATE KEY-----"),
        "not PKCS#8 PEM"
    );
    assert_eq!(mode(&ca.join("ca.key"))?, 0o600, "ca.key mode");

    let text = x509_text(&ca.join("ca.pem"))?;
    assert!(text.contains("Subject: CN = Depot fleet CA"), "{text}");
    assert!(text.contains("CA:TRUE"), "{text}");
    assert!(text.contains("ecdsa-with-SHA256"), "{text}");
    assert!(text.contains("prime256v1"), "{text}");
    let (ok, text) = openssl(&["pkey", "-in", s(&ca.join("ca.key"))?, "-noout"])?;
    assert!(ok, "openssl cannot read ca.key: {text}");

    // Issued keys are 0600 too, in a folder that did not exist.
    let out_dir = dir.path().join("new").join("agent");
    hub_ok(&[
        "ca",
        "issue",
        "--dir",
        s(&ca)?,
        "--agent",
        "gw-1",
        "--out",
        s(&out_dir)?,
    ])?;
    assert_eq!(mode(&out_dir.join("agent.key"))?, 0o600, "agent.key mode");
    let hub_dir = dir.path().join("hub");
    hub_ok(&[
        "ca",
        "issue",
        "--dir",
        s(&ca)?,
        "--hub",
        "hub.example",
        "--out",
        s(&hub_dir)?,
    ])?;
    assert_eq!(mode(&hub_dir.join("hub.key"))?, 0o600, "hub.key mode");
    Ok(())
}

#[test]
fn an_agent_certificate_carries_its_id_as_a_san_uri_and_is_signed_by_the_ca() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ca, out) = (dir.path().join("ca"), dir.path().join("gw-1"));
    hub_ok(&["ca", "init", "--dir", s(&ca)?])?;
    hub_ok(&[
        "ca",
        "issue",
        "--dir",
        s(&ca)?,
        "--agent",
        "gw-1",
        "--out",
        s(&out)?,
        "--days",
        "30",
    ])?;
    assert_eq!(
        std::fs::read(out.join("ca.pem"))?,
        std::fs::read(ca.join("ca.pem"))?,
        "OUT/ca.pem is the CA certificate"
    );

    let agent = out.join("agent.pem");
    let text = x509_text(&agent)?;
    assert!(text.contains("URI:urn:outpost:agent:gw-1"), "{text}");
    assert!(text.contains("Subject: CN = gw-1"), "{text}");
    assert!(text.contains("Issuer: CN = Outpost fleet CA"), "{text}");
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");

    let (ok, text) = openssl(&["verify", "-CAfile", s(&out.join("ca.pem"))?, s(&agent)?])?;
    assert!(ok && text.contains(": OK"), "{text}");
    let (ok, text) = openssl(&[
        "verify",
        "-purpose",
        "sslclient",
        "-CAfile",
        s(&ca.join("ca.pem"))?,
        s(&agent)?,
    ])?;
    assert!(ok, "not valid for TLS client authentication: {text}");

    // The key belongs to the certificate.
    let (_, cert_pub) = openssl(&["x509", "-in", s(&agent)?, "-noout", "-pubkey"])?;
    let (_, key_pub) = openssl(&["pkey", "-in", s(&out.join("agent.key"))?, "-pubout"])?;
    assert_eq!(cert_pub, key_pub, "agent.key is not the key of agent.pem");

    // Valid for the 30 days asked for, not much more.
    let (ok, _) = openssl(&["x509", "-in", s(&agent)?, "-noout", "-checkend", "2505600"])?;
    assert!(ok, "expires within 29 days");
    let (ok, _) = openssl(&["x509", "-in", s(&agent)?, "-noout", "-checkend", "2678400"])?;
    assert!(!ok, "still valid after 31 days");

    // A control: another CA's certificate does not verify the agent's.
    let other = dir.path().join("other");
    hub_ok(&["ca", "init", "--dir", s(&other)?])?;
    let (ok, text) = openssl(&["verify", "-CAfile", s(&other.join("ca.pem"))?, s(&agent)?])?;
    assert!(!ok, "verified against a foreign CA: {text}");
    Ok(())
}

#[test]
fn a_hub_certificate_names_its_dns_names_and_ips() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ca, out) = (dir.path().join("ca"), dir.path().join("hub"));
    hub_ok(&["ca", "init", "--dir", s(&ca)?])?;
    hub_ok(&[
        "ca",
        "issue",
        "--dir",
        s(&ca)?,
        "--hub",
        "hub.example",
        "--hub",
        "10.0.0.1",
        "--hub",
        "::1",
        "--hub",
        "localhost",
        "--out",
        s(&out)?,
    ])?;
    let pem = out.join("hub.pem");
    let text = x509_text(&pem)?;
    for needle in [
        "DNS:hub.example",
        "IP Address:10.0.0.1",
        "IP Address:0:0:0:0:0:0:0:1",
        "DNS:localhost",
        "Subject: CN = hub.example",
        "TLS Web Server Authentication",
    ] {
        assert!(text.contains(needle), "{needle:?} not in {text}");
    }
    assert!(
        !text.contains("URI:"),
        "a hub certificate names no agent: {text}"
    );

    let ca_pem = s(&out.join("ca.pem"))?.to_owned();
    for check in [
        ["-verify_hostname", "hub.example"],
        ["-verify_hostname", "localhost"],
        ["-verify_ip", "10.0.0.1"],
        ["-verify_ip", "::1"],
    ] {
        let (ok, text) = openssl(&[
            "verify",
            "-purpose",
            "sslserver",
            check[0],
            check[1],
            "-CAfile",
            &ca_pem,
            s(&pem)?,
        ])?;
        assert!(ok, "{check:?}: {text}");
    }
    let (ok, _) = openssl(&[
        "verify",
        "-verify_hostname",
        "other.example",
        "-CAfile",
        &ca_pem,
        s(&pem)?,
    ])?;
    assert!(!ok, "verified for a name it does not carry");
    assert_eq!(mode(&out.join("hub.key"))?, 0o600);
    Ok(())
}

#[test]
fn the_id_is_read_back_from_the_certificate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ca, agent, hub_out) = (
        dir.path().join("ca"),
        dir.path().join("agent"),
        dir.path().join("hub"),
    );
    hub_ok(&["ca", "init", "--dir", s(&ca)?])?;
    hub_ok(&[
        "ca",
        "issue",
        "--dir",
        s(&ca)?,
        "--agent",
        "depot-17.gw_1",
        "--out",
        s(&agent)?,
    ])?;
    hub_ok(&[
        "ca",
        "issue",
        "--dir",
        s(&ca)?,
        "--hub",
        "hub.example",
        "--out",
        s(&hub_out)?,
    ])?;

    // DER as a TLS stack hands it over, converted by openssl rather than by us.
    let der_of = |pem: &Path| -> Result<Vec<u8>> {
        let der = pem.with_extension("der");
        let (ok, text) = openssl(&["x509", "-in", s(pem)?, "-outform", "DER", "-out", s(&der)?])?;
        anyhow::ensure!(ok, "{text}");
        Ok(std::fs::read(der)?)
    };
    let id = outpost_hub::ca::agent_id_from_cert_der(&der_of(&agent.join("agent.pem"))?)?;
    assert_eq!(id.as_str(), "depot-17.gw_1");

    let err = outpost_hub::ca::agent_id_from_cert_der(&der_of(&hub_out.join("hub.pem"))?)
        .expect_err("the hub's certificate names no agent");
    assert!(err.to_string().contains("urn:outpost:agent:"), "{err}");
    let err = outpost_hub::ca::agent_id_from_cert_der(&der_of(&ca.join("ca.pem"))?)
        .expect_err("the CA's certificate names no agent");
    assert!(err.to_string().contains("no SAN URI"), "{err}");
    Ok(())
}

#[test]
fn ca_init_refuses_to_overwrite_an_existing_ca() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("ca");
    hub_ok(&["ca", "init", "--dir", s(&ca)?])?;
    let key = std::fs::read(ca.join("ca.key"))?;
    let cert = std::fs::read(ca.join("ca.pem"))?;

    let (code, out, err) = hub(&["ca", "init", "--dir", s(&ca)?])?;
    assert_bad(code, &err, &["ca.key", "already exists", "--force"]);
    assert!(out.is_empty(), "{out}");
    assert_eq!(std::fs::read(ca.join("ca.key"))?, key, "ca.key changed");
    assert_eq!(std::fs::read(ca.join("ca.pem"))?, cert, "ca.pem changed");

    // Either file alone is a CA worth protecting.
    let half = dir.path().join("half");
    std::fs::create_dir(&half)?;
    std::fs::copy(ca.join("ca.pem"), half.join("ca.pem"))?;
    let (code, _, err) = hub(&["ca", "init", "--dir", s(&half)?])?;
    assert_bad(code, &err, &["ca.pem", "already exists"]);

    hub_ok(&["ca", "init", "--dir", s(&ca)?, "--force"])?;
    assert_ne!(
        std::fs::read(ca.join("ca.key"))?,
        key,
        "--force made no new key"
    );
    assert_eq!(mode(&ca.join("ca.key"))?, 0o600);
    Ok(())
}

#[test]
fn bad_input_is_one_line_and_exit_2() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = dir.path().join("ca");
    let out = dir.path().join("out");
    hub_ok(&["ca", "init", "--dir", s(&ca)?])?;
    let (ca, out_s) = (s(&ca)?, s(&out)?);

    let missing = dir.path().join("no-such-ca");
    let (code, _, err) = hub(&[
        "ca",
        "issue",
        "--dir",
        s(&missing)?,
        "--agent",
        "gw-1",
        "--out",
        out_s,
    ])?;
    assert_bad(code, &err, &["no-such-ca", "not found"]);

    let (code, _, err) = hub(&["ca", "issue", "--dir", ca, "--agent", "a b", "--out", out_s])?;
    assert_bad(code, &err, &["--agent", "a b"]);

    let (code, _, err) = hub(&[
        "ca", "issue", "--dir", ca, "--agent", "gw-1", "--out", out_s, "--days", "0",
    ])?;
    assert_bad(code, &err, &["--days", "0"]);
    let fresh = dir.path().join("fresh");
    let (code, _, err) = hub(&["ca", "init", "--dir", s(&fresh)?, "--days", "0"])?;
    assert_bad(code, &err, &["--days"]);
    assert!(
        !fresh.exists(),
        "a refused init created {}",
        fresh.display()
    );
    let (code, _, err) = hub(&["ca", "init", "--dir", s(&fresh)?, "--days", "ten"])?;
    assert_bad(code, &err, &["--days", "ten"]);

    let (code, _, err) = hub(&[
        "ca",
        "issue",
        "--dir",
        ca,
        "--hub",
        "not a name",
        "--out",
        out_s,
    ])?;
    assert_bad(code, &err, &["not a name"]);
    let (code, _, err) = hub(&["ca", "issue", "--dir", ca, "--out", out_s])?;
    assert_bad(code, &err, &["--agent", "--hub"]);
    let (code, _, err) = hub(&[
        "ca", "issue", "--dir", ca, "--agent", "gw-1", "--hub", "h", "--out", out_s,
    ])?;
    assert_bad(code, &err, &["--agent", "--hub"]);
    assert!(!out.exists(), "a refused issue created {}", out.display());

    // A CA folder whose key is damaged.
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken)?;
    std::fs::copy(Path::new(ca).join("ca.pem"), broken.join("ca.pem"))?;
    std::fs::write(broken.join("ca.key"), "not a key\n")?;
    let (code, _, err) = hub(&[
        "ca",
        "issue",
        "--dir",
        s(&broken)?,
        "--agent",
        "gw-1",
        "--out",
        out_s,
    ])?;
    assert_bad(code, &err, &["ca.key"]);
    assert!(
        !err.contains("not a key"),
        "the key's text was printed: {err}"
    );
    std::fs::remove_file(broken.join("ca.key"))?;
    let (code, _, err) = hub(&[
        "ca",
        "issue",
        "--dir",
        s(&broken)?,
        "--agent",
        "gw-1",
        "--out",
        out_s,
    ])?;
    assert_bad(code, &err, &["ca.key", "not found"]);
    Ok(())
}
