//! The limits at the hub's door against the real hub process: a client that
//! completes TLS and never opens its stream is closed with `Timeout` (the
//! hub's own keep-alives would otherwise hold it open for ever), and a flood
//! of connection attempts without a client certificate from one address is
//! refused by the per-address limit, counted on the metrics endpoint, while
//! a real agent from another address connects.
//!
//! The flood comes from 127.0.0.2, the agent from 127.0.0.1: both are
//! loopback, but the hub sees two source addresses, as it would see a
//! flooding host and a gateway. Every wait polls until a generous deadline;
//! no timing is asserted.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use outpost_protocols::wire::{ErrorCode, ALPN};
use outpost_tests::fleet_sim::client_config;
use outpost_tests::{wait_until, Agent, Hub, Pki};

/// How long any one condition may take on a loaded 2-core machine running
/// debug builds.
const DEADLINE: Duration = Duration::from_secs(120);

/// Connection attempts in the flood.
const FLOOD: usize = 200;

/// The value of the metric line `name` (exactly, labels included), if any.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A quinn client config that trusts the fleet CA of `creds` and presents
/// no certificate.
fn anonymous_config(creds: &Path) -> Result<quinn::ClientConfig> {
    let mut tls = outpost_tls::client_config(outpost_tls::ClientFiles {
        ca: &creds.join("ca.pem"),
        client: None,
        server_name: None,
    })?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

#[test]
fn a_connection_that_opens_no_stream_is_closed_with_timeout() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let creds = pki.issue_agent("silent")?;
    let hub = Hub::start(dir.path(), &pki)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reason = rt.block_on(async {
        let endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        // The client's keep-alives (every 5 s) and the hub's would keep this
        // connection open for as long as the test waits, were it not for the
        // hub's stream deadline.
        let conn = endpoint
            .connect_with(client_config(&creds, ALPN)?, hub.addr, "127.0.0.1")?
            .await
            .context("handshake")?;
        let reason = tokio::time::timeout(DEADLINE, conn.closed())
            .await
            .context("the hub kept a connection without a stream open")?;
        endpoint.close(0u32.into(), b"");
        anyhow::Ok(reason)
    })?;
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let code = u32::try_from(c.error_code.into_inner())
                .ok()
                .and_then(ErrorCode::from_u32);
            ensure!(
                code == Some(ErrorCode::Timeout),
                "closed with {:?} ({:?}), not timeout",
                c.error_code,
                String::from_utf8_lossy(&c.reason)
            );
        }
        other => bail!("the hub ended the connection otherwise: {other}"),
    }
    let text = hub.metrics()?;
    ensure!(
        metric(&text, "outpost_hub_connections_stream_deadline_total") == Some(1.0),
        "{text}"
    );
    Ok(())
}

#[test]
fn a_flood_without_certificates_is_limited_per_address_while_a_real_agent_connects() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let creds = pki.issue_agent("gw-1")?;
    // A small bucket refilled slowly, so that the flood trips the limit
    // however slowly this machine fires it.
    let hub = Hub::start_with(
        dir.path(),
        &pki,
        "per_address_burst = 20\nper_address_rate = 1.0",
    )?;
    let (hub_addr, flood_creds) = (hub.addr, creds.clone());
    let flood = std::thread::spawn(move || -> Result<(usize, usize)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let endpoint = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 2], 0)))?;
            let config = anonymous_config(&flood_creds)?;
            let mut attempts = tokio::task::JoinSet::new();
            for _ in 0..FLOOD {
                let connecting = endpoint.connect_with(config.clone(), hub_addr, "127.0.0.1")?;
                // In TLS 1.3 the client finishes its side of the handshake
                // before the hub has checked (and refused) its missing
                // certificate: the hub's refusal closes it just after.
                attempts.spawn(tokio::time::timeout(DEADLINE, async move {
                    match connecting.await {
                        Ok(conn) => conn.closed().await,
                        Err(e) => e,
                    }
                }));
            }
            let (mut refused, mut failed) = (0, 0);
            while let Some(r) = attempts.join_next().await {
                match r? {
                    Ok(quinn::ConnectionError::ConnectionClosed(c))
                        if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
                    {
                        refused += 1;
                    }
                    Ok(_) => failed += 1,
                    Err(_) => {
                        bail!("an attempt was neither refused nor closed within {DEADLINE:?}")
                    }
                }
            }
            endpoint.close(0u32.into(), b"");
            Ok((refused, failed))
        })
    });
    let config = format!(
        r#"
[agent]
data_dir = "data"

[uplink]
hub = "{}"
ca = "{}"
cert = "{}"
key = "{}"
reconnect_min = "100ms"
reconnect_max = "1s"

[observability]
metrics = ""
log = "info"
"#,
        hub.addr,
        creds.join("ca.pem").display(),
        creds.join("agent.pem").display(),
        creds.join("agent.key").display(),
    );
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir)?;
    let _agent = Agent::start(&agent_dir, &config)?;
    wait_until(DEADLINE, "the real agent is connected", || {
        hub.fleet().is_ok_and(|f| {
            f.iter()
                .any(|a| a["agent_id"] == "gw-1" && a["connected"] == true)
        })
    })?;
    let (refused, failed) = flood
        .join()
        .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
    println!("flood of {FLOOD}: {refused} refused at the door, {failed} failed their handshake");
    ensure!(refused > 0, "no attempt was refused");
    let text = hub.metrics()?;
    let counted = metric(
        &text,
        "outpost_hub_connections_refused_total{reason=\"rate\"}",
    )
    .with_context(|| format!("no rate refusals in\n{text}"))?;
    ensure!(
        counted >= refused as f64,
        "the hub counted {counted} refusals, the flood saw {refused}"
    );
    Ok(())
}
