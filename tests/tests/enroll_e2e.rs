//! Enrollment end to end, with the real binaries: a device directory with
//! only a config and a token becomes an agent whose events reach the hub;
//! every bad attempt is refused with one line, writes nothing, and is
//! audited; a token raced from two processes issues one certificate.
//!
//! A CSR for another id cannot come from `outpost-agent` (it always asks for
//! its own id), so that case uses a raw client built from `protocols`.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use outpost_protocols::enroll::{Answer, DeviceEnrollment, RefusalCode};
use outpost_protocols::AgentId;
use outpost_tests::{bin, run_cli, wait_until, Agent, Devsim, Hub, Pki};

const DEADLINE: Duration = Duration::from_secs(60);

/// A hub that enrolls with the CA of `pki`.
fn enrolling_hub(dir: &Path, pki: &Pki) -> Result<Hub> {
    Hub::start_with_tables(
        dir,
        pki,
        "",
        &format!("[enroll]\nca_dir = \"{}\"\n", pki.ca_dir.display()),
    )
}

/// The fleet CA's SHA-256 fingerprint, as an operator would copy it.
fn ca_fingerprint(pki: &Pki) -> Result<String> {
    let certs = outpost_tls::load_certs(&pki.ca_dir.join("ca.pem"))?;
    let ca = certs.first().context("no CA certificate")?;
    Ok(outpost_tls::fingerprint_sha256(ca.as_ref()))
}

/// An empty device directory `dir/<name>` with only `agent.toml`: agent id
/// `id`, the uplink's files in `tls/`, and `extra` tables.
fn device(dir: &Path, name: &str, id: &str, hub: &Hub, extra: &str) -> Result<PathBuf> {
    let d = dir.join(name);
    std::fs::create_dir_all(&d)?;
    let config = d.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ndata_dir = \"data\"\nid = \"{id}\"\n\n[uplink]\nhub = \"{}\"\nca = \"tls/ca.pem\"\ncert = \"tls/agent.pem\"\nkey = \"tls/agent.key\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n\n[observability]\nmetrics = \"\"\nlog = \"info\"\n\n{extra}",
            hub.addr
        ),
    )?;
    Ok(config)
}

/// `outpost-hub enroll create --agent ID [--label ..] --json`: the token.
fn create_token(hub: &Hub, agent: &str, labels: &[&str]) -> Result<String> {
    let mut args = vec!["enroll", "create", "--agent", agent, "--json"];
    for l in labels {
        args.extend(["--label", l]);
    }
    let (code, out, err) = hub.cli(&args)?;
    ensure!(code == 0, "enroll create exited {code}: {err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(v["agent_id"] == agent, "{v}");
    ensure!(
        v["expires_at"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{v}"
    );
    Ok(v["token"].as_str().context("no token")?.to_owned())
}

/// `outpost-agent enroll` for the device of `config` with `token`: (exit
/// code, stdout, stderr).
fn enroll(config: &Path, hub: &Hub, token: &str, trust: &[&str]) -> Result<(i32, String, String)> {
    let token_file = config.with_file_name("token");
    std::fs::write(&token_file, format!("{token}\n"))?;
    let hub_addr = hub.addr.to_string();
    let mut args = vec![
        "enroll",
        "--hub",
        &hub_addr,
        "--token-file",
        token_file.to_str().context("utf-8")?,
        "--config",
        config.to_str().context("utf-8")?,
    ];
    args.extend(trust);
    run_cli(&bin("outpost-agent")?, &args)
}

/// The audit entries with `action`.
fn audited(hub: &Hub, action: &str) -> Result<Vec<serde_json::Value>> {
    let (code, out, err) = hub.cli(&["audit", "list", "--json"])?;
    ensure!(code == 0, "audit list exited {code}: {err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["entries"]
        .as_array()
        .context("no entries")?
        .iter()
        .filter(|e| e["action"] == action)
        .cloned()
        .collect())
}

/// The state `enroll list` shows for the only token of `agent`.
fn token_state(hub: &Hub, agent: &str) -> Result<String> {
    let (code, out, err) = hub.cli(&["enroll", "list", "--json"])?;
    ensure!(code == 0, "enroll list exited {code}: {err}");
    ensure!(
        !out.contains("\"token\""),
        "enroll list shows a token: {out}"
    );
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let states: Vec<&str> = v
        .as_array()
        .context("not an array")?
        .iter()
        .filter(|t| t["agent_id"] == agent)
        .filter_map(|t| t["state"].as_str())
        .collect();
    match states.as_slice() {
        [one] => Ok((*one).to_owned()),
        other => bail!("{agent} has tokens {other:?}"),
    }
}

fn in_registry(hub: &Hub, agent: &str) -> Result<bool> {
    Ok(hub.fleet()?.iter().any(|a| a["agent_id"] == agent))
}

/// Nothing was written to the device's `tls/`.
fn nothing_written(config: &Path) -> Result<()> {
    let tls = config.with_file_name("tls");
    for f in ["agent.key", "agent.pem", "ca.pem"] {
        ensure!(
            !tls.join(f).exists(),
            "{} was written",
            tls.join(f).display()
        );
    }
    Ok(())
}

/// A refusal: exit 2, exactly one line on stderr naming `expect`, nothing on
/// stdout.
fn refused(result: (i32, String, String), expect: &str) -> Result<String> {
    let (code, out, err) = result;
    ensure!(code == 2, "exit {code}, stdout {out:?}, stderr {err:?}");
    ensure!(out.is_empty(), "stdout {out:?}");
    ensure!(err.lines().count() == 1, "not one line: {err:?}");
    ensure!(err.contains(expect), "{err:?} does not say {expect:?}");
    Ok(err)
}

#[test]
fn a_device_enrolls_from_an_empty_directory_and_its_events_reach_the_hub() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let hub = enrolling_hub(dir.path(), &pki)?;
    let sim = Devsim::start(dir.path(), "counters = 2\ntick = \"100ms\"\n", None)?;
    let tags = format!(
        "[[modbus.devices]]\nname = \"plc\"\naddress = \"{}\"\nunit = 1\npoll = \"100ms\"\ntimeout = \"500ms\"\n\n[[modbus.devices.tags]]\nname = \"c0\"\ntable = \"holding\"\naddress = 0\ntype = \"u16\"\n",
        sim.addr
    );
    let config = device(dir.path(), "gw", "gw-1", &hub, &tags)?;
    let token = create_token(&hub, "gw-1", &["site=plant-7"])?;
    ensure!(token_state(&hub, "gw-1")? == "pending");

    let fp = ca_fingerprint(&pki)?;
    let (code, out, err) = enroll(&config, &hub, &token, &["--ca-fingerprint", &fp])?;
    ensure!(code == 0, "exit {code}: {err}");
    ensure!(
        out.lines().count() == 1 && out.contains("enrolled gw-1"),
        "{out:?}"
    );
    ensure!(
        !out.contains(&token) && !err.contains(&token),
        "the token was printed"
    );

    let tls = config.with_file_name("tls");
    let mode = std::fs::metadata(tls.join("agent.key"))?
        .permissions()
        .mode();
    ensure!(mode & 0o777 == 0o600, "key mode {mode:o}");
    ensure!(
        std::fs::read(tls.join("ca.pem"))? == std::fs::read(pki.ca_dir.join("ca.pem"))?,
        "the CA written is not the fleet CA"
    );
    // The certificate names the device and nothing else.
    let certs = outpost_tls::load_certs(&tls.join("agent.pem"))?;
    let id = outpost_hub::ca::agent_id_from_cert_der(certs[0].as_ref())?;
    ensure!(id.as_str() == "gw-1");

    // The registry has the token's labels, the token is spent, and audited.
    let fleet = hub.fleet()?;
    let me = fleet
        .iter()
        .find(|a| a["agent_id"] == "gw-1")
        .context("gw-1 not in the registry")?;
    ensure!(me["labels"]["site"] == "plant-7", "{me}");
    ensure!(token_state(&hub, "gw-1")? == "used");
    let used = audited(&hub, "enroll.used")?;
    ensure!(used.len() == 1 && used[0]["target"] == "gw-1", "{used:?}");
    ensure!(
        used[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&outpost_tls::fingerprint_sha256(certs[0].as_ref()))),
        "{used:?}"
    );

    // And it runs: events from the simulator are stored at the hub.
    let _agent = Agent::start_file(&config)?;
    wait_until(DEADLINE, "events from the enrolled agent", || {
        hub.agent_stats("gw-1")
            .ok()
            .flatten()
            .is_some_and(|s| s.count >= 5)
    })?;
    Ok(())
}

#[test]
fn each_bad_attempt_is_refused_with_one_line_writes_nothing_and_is_audited() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let hub = enrolling_hub(dir.path(), &pki)?;
    let fp = ca_fingerprint(&pki)?;
    let ca_file = pki.ca_dir.join("ca.pem");
    let ca_file = ca_file.to_str().context("utf-8")?;

    // An expired token: its expiry moved into the past in the store.
    let token = create_token(&hub, "gw-exp", &[])?;
    let db = rusqlite::Connection::open(dir.path().join("hub-data/hub.db"))?;
    db.busy_timeout(Duration::from_secs(10))?;
    ensure!(
        db.execute(
            "UPDATE enrollments SET expires_at = 1 WHERE agent_id = 'gw-exp'",
            []
        )? == 1
    );
    let config = device(dir.path(), "exp", "gw-exp", &hub, "")?;
    refused(
        enroll(&config, &hub, &token, &["--ca-fingerprint", &fp])?,
        "token_expired",
    )?;
    nothing_written(&config)?;
    ensure!(!in_registry(&hub, "gw-exp")?);

    // A reused token: the first device enrolls, a second one with the same
    // token (and id) is refused.
    let token = create_token(&hub, "gw-re", &[])?;
    let first = device(dir.path(), "re1", "gw-re", &hub, "")?;
    let (code, _, err) = enroll(&first, &hub, &token, &["--ca-file", ca_file])?;
    ensure!(code == 0, "{err}");
    let second = device(dir.path(), "re2", "gw-re", &hub, "")?;
    refused(
        enroll(&second, &hub, &token, &["--ca-file", ca_file])?,
        "token_used",
    )?;
    nothing_written(&second)?;

    // A token for agent A used by a device configured as B.
    let token = create_token(&hub, "gw-a", &[])?;
    let config = device(dir.path(), "b", "gw-b", &hub, "")?;
    refused(
        enroll(&config, &hub, &token, &["--ca-fingerprint", &fp])?,
        "token_for_another_agent",
    )?;
    nothing_written(&config)?;
    ensure!(!in_registry(&hub, "gw-b")? && !in_registry(&hub, "gw-a")?);
    ensure!(
        token_state(&hub, "gw-a")? == "pending",
        "a refused use spent the token"
    );

    // A wrong CA fingerprint: refused by the device before the token is
    // sent, so the token stays pending and the hub has no request to audit.
    let token = create_token(&hub, "gw-fp", &[])?;
    let config = device(dir.path(), "fp", "gw-fp", &hub, "")?;
    let wrong = format!(
        "{}{}",
        if fp.starts_with('0') { "1" } else { "0" },
        &fp[1..]
    );
    refused(
        enroll(&config, &hub, &token, &["--ca-fingerprint", &wrong])?,
        "not trusted",
    )?;
    nothing_written(&config)?;
    ensure!(token_state(&hub, "gw-fp")? == "pending");
    // A CA file of another fleet: the same.
    let other = Pki::new(&dir.path().join("other"))?;
    let other_ca = other.ca_dir.join("ca.pem");
    let (code, _, err) = enroll(
        &config,
        &hub,
        &token,
        &["--ca-file", other_ca.to_str().context("utf-8")?],
    )?;
    ensure!(code == 2 && err.lines().count() == 1, "{code} {err:?}");
    nothing_written(&config)?;
    ensure!(token_state(&hub, "gw-fp")? == "pending");

    // A CSR for another id, from a raw client: refused, the token unspent.
    let token = create_token(&hub, "gw-c", &[])?;
    let answer = raw_enroll(&hub, &fp, "gw-c", &token, "gw-x")?;
    ensure!(
        matches!(
            &answer,
            Answer::Refused {
                code: RefusalCode::CsrForAnotherId,
                ..
            }
        ),
        "{answer:?}"
    );
    ensure!(token_state(&hub, "gw-c")? == "pending");
    ensure!(!in_registry(&hub, "gw-c")? && !in_registry(&hub, "gw-x")?);

    // Every refusal the hub saw is audited with its code and the address.
    let refusals = audited(&hub, "enroll.refused")?;
    for (target, code) in [
        ("gw-exp", "token_expired"),
        ("gw-re", "token_used"),
        ("gw-b", "token_for_another_agent"),
        ("gw-c", "csr_for_another_id"),
    ] {
        ensure!(
            refusals.iter().any(|e| e["target"] == target
                && e["result"] == "refused"
                && e["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with(code) && d.contains("from 127.0.0.1:"))),
            "no enroll.refused for {target} ({code}) in {refusals:?}"
        );
    }
    ensure!(audited(&hub, "enroll.used")?.len() == 1);
    Ok(())
}

#[test]
fn two_racing_uses_of_one_token_issue_one_certificate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let hub = enrolling_hub(dir.path(), &pki)?;
    let fp = ca_fingerprint(&pki)?;
    let token = create_token(&hub, "gw-race", &[])?;
    let configs = [
        device(dir.path(), "r1", "gw-race", &hub, "")?,
        device(dir.path(), "r2", "gw-race", &hub, "")?,
    ];
    let children = configs
        .iter()
        .map(|config| {
            let token_file = config.with_file_name("token");
            std::fs::write(&token_file, &token)?;
            Command::new(bin("outpost-agent")?)
                .args([
                    "enroll",
                    "--hub",
                    &hub.addr.to_string(),
                    "--ca-fingerprint",
                    &fp,
                ])
                .arg("--token-file")
                .arg(&token_file)
                .arg("--config")
                .arg(config)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("start outpost-agent enroll")
        })
        .collect::<Result<Vec<_>>>()?;
    let results = children
        .into_iter()
        .map(|c| c.wait_with_output().context("wait"))
        .collect::<Result<Vec<_>>>()?;
    let codes: Vec<i32> = results
        .iter()
        .map(|o| o.status.code().unwrap_or(-1))
        .collect();
    let mut sorted = codes.clone();
    sorted.sort_unstable();
    ensure!(sorted == [0, 2], "exit codes {codes:?}: {results:?}");
    let loser = codes.iter().position(|c| *c == 2).context("no loser")?;
    let err = String::from_utf8_lossy(&results[loser].stderr);
    ensure!(err.contains("token_used"), "{err}");
    nothing_written(&configs[loser])?;
    ensure!(configs[1 - loser]
        .with_file_name("tls")
        .join("agent.pem")
        .exists());
    ensure!(audited(&hub, "enroll.used")?.len() == 1);
    Ok(())
}

#[test]
fn a_hub_without_a_ca_dir_refuses_with_disabled_and_agents_without_a_certificate_are_unauthorized(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let hub = Hub::start(dir.path(), &pki)?;
    let fp = ca_fingerprint(&pki)?;
    let token = create_token(&hub, "gw-1", &[])?;
    let config = device(dir.path(), "d", "gw-1", &hub, "")?;
    refused(
        enroll(&config, &hub, &token, &["--ca-fingerprint", &fp])?,
        "disabled",
    )?;
    nothing_written(&config)?;
    ensure!(token_state(&hub, "gw-1")? == "pending");

    // The agent protocol still needs a verified client certificate: a client
    // on outpost/1 without one is closed with `unauthorized` (9).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let code = rt.block_on(async {
        let (mut tls, _) = outpost_tls::pinned_ca_client_config(&fp)?;
        tls.alpn_protocols = vec![outpost_protocols::wire::ALPN.to_vec()];
        let conn = connect(tls, hub.addr).await?;
        // The hub may close before the stream opens: that is the answer.
        if let Ok((mut send, _recv)) = conn.open_bi().await {
            let _ = send.write_all(&[0, 0, 0, 1, 6]).await;
        }
        Ok::<_, anyhow::Error>(match conn.closed().await {
            quinn::ConnectionError::ApplicationClosed(c) => Some(c.error_code.into_inner()),
            _ => None,
        })
    })?;
    ensure!(code == Some(9), "closed with {code:?}");
    Ok(())
}

async fn connect(
    tls: rustls::ClientConfig,
    addr: std::net::SocketAddr,
) -> Result<quinn::Connection> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    Ok(endpoint.connect(addr, "127.0.0.1")?.await?)
}

/// Enrolls as `id` with a CSR whose names are `csr_for`'s, the way no
/// `outpost-agent` would, and returns the hub's answer.
fn raw_enroll(hub: &Hub, fp: &str, id: &str, token: &str, csr_for: &str) -> Result<Answer> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, csr_for);
    params.subject_alt_names = vec![rcgen::SanType::URI(rcgen::string::Ia5String::try_from(
        format!("urn:outpost:agent:{csr_for}"),
    )?)];
    let csr = params.serialize_request(&key)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (mut tls, _) = outpost_tls::pinned_ca_client_config(fp)?;
        tls.alpn_protocols = vec![outpost_protocols::enroll::ALPN.to_vec()];
        let conn = connect(tls, hub.addr).await?;
        let (mut device, request) =
            DeviceEnrollment::start(&AgentId::parse(id)?, token, csr.der())?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&request).await?;
        send.finish()?;
        let bytes = recv.read_to_end(64 * 1024).await?;
        let answer = device.push(&bytes)?.context("no whole answer")?;
        conn.close(0u32.into(), b"");
        Ok(answer)
    })
}
