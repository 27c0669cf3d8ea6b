//! The uplink's outer loop: build the QUIC client once, dial the hub, run a
//! connection's driver, and redial with exponential backoff and jitter.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use outpost_protocols::wire::{AgentInfo, ErrorCode, ALPN, CLOSE_OK};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span, warn, Instrument};

use super::driver::{serve, Ended, Link};
use super::error::UplinkError;
use super::renew::Renewer;
use crate::cert::CertFiles;
use crate::clock;
use crate::commands::Commands;
use crate::config::UplinkSection;
use crate::metrics::Metrics;
use crate::outbox::OutboxHandle;
use crate::policy::PolicyStore;

/// How long a connection may stay silent, keep-alives included, before
/// quinn drops it: beyond the session's own idle timeout, which closes it
/// with a named code first.
const IDLE_TIMEOUT_MS: u32 = 60_000;

/// How long a closing connection waits for its close to reach the hub.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// The uplink to the hub.
pub struct Uplink {
    settings: UplinkSection,
    outbox: OutboxHandle,
    metrics: Arc<Metrics>,
    policy: PolicyStore,
    renewer: Renewer,
    commands: Option<Arc<Commands>>,
}

impl Uplink {
    /// An uplink for these settings. The `Hello` states the labels the
    /// policy in force is selected by (`policy`'s: the hub's, once told).
    pub fn new(
        settings: UplinkSection,
        outbox: OutboxHandle,
        metrics: Arc<Metrics>,
        policy: PolicyStore,
    ) -> Uplink {
        let files = CertFiles {
            cert: settings.cert.clone(),
            key: settings.key.clone(),
        };
        Uplink {
            renewer: Renewer::new(files, None),
            settings,
            outbox,
            metrics,
            policy,
            commands: None,
        }
    }

    /// Hands the hub's commands to an executor, and its results back.
    #[must_use]
    pub fn with_commands(mut self, commands: Arc<Commands>) -> Uplink {
        self.commands = Some(commands);
        self
    }

    /// Watches `data_dir` for an operator's request to renew the
    /// certificate (`outpost-agent cert renew`).
    #[must_use]
    pub fn renewing_in(mut self, data_dir: &std::path::Path) -> Uplink {
        let files = CertFiles {
            cert: self.settings.cert.clone(),
            key: self.settings.key.clone(),
        };
        self.renewer = Renewer::new(files, Some(data_dir));
        self
    }

    fn client_config(&self) -> Result<quinn::ClientConfig, UplinkError> {
        let s = &self.settings;
        let mut tls = outpost_tls::client_config(outpost_tls::ClientFiles {
            ca: &s.ca,
            client: Some((s.cert.as_path(), s.key.as_path())),
            server_name: None,
        })?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(Some(quinn::VarInt::from_u32(IDLE_TIMEOUT_MS).into()));
        transport.keep_alive_interval(Some(Duration::from_secs(5)));
        config.transport_config(Arc::new(transport));
        Ok(config)
    }

    /// Runs until `shutdown`, reconnecting with backoff.
    pub async fn run(self, shutdown: CancellationToken) {
        let span = info_span!("uplink", hub = %self.settings.hub);
        self.run_inner(shutdown).instrument(span).await
    }

    async fn run_inner(self, shutdown: CancellationToken) {
        // Read once at start: files that are unusable now stop the uplink,
        // as before renewal existed.
        if let Err(e) = self.client_config() {
            warn!(error = %e, "Uplink cannot start; events stay in the outbox.");
            return;
        }
        let min = self.settings.reconnect_min.0;
        let max = self.settings.reconnect_max.0;
        let mut backoff = min;
        loop {
            let started = clock::now();
            // Read again for every connection: a renewal swaps the files,
            // and the next connection uses the new certificate.
            self.renewer.recover();
            self.renewer.watch_expiry(&self.metrics);
            let served = match self.client_config() {
                Ok(config) => self.connect_and_serve(&config, &shutdown).await,
                Err(e) => Err(e),
            };
            match served {
                Ok(Ended::Shutdown) => return,
                Ok(Ended::Closed) => info!("Hub closed the connection; reconnecting."),
                Err(e) if e.hub_code() == Some(ErrorCode::Revoked) => {
                    self.metrics.uplink_connected.set(0);
                    // Only an operator's `agent reinstate` helps: retry
                    // at the longest interval.
                    backoff = max;
                    error!(retry_in = ?backoff, "The hub refused this agent: an operator revoked it. Events stay in the outbox.");
                }
                Err(e) => {
                    self.metrics.uplink_connected.set(0);
                    warn!(error = %e, retry_in = ?backoff, "Uplink lost; reconnecting.");
                }
            }
            if clock::elapsed(started) > max {
                backoff = min;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(clock::jitter(backoff)) => {}
            }
            backoff = (backoff * 2).min(max);
            self.metrics.kpi.uplink_reconnects.inc();
        }
    }

    async fn resolve(&self) -> Result<SocketAddr, UplinkError> {
        let hub = &self.settings.hub;
        tokio::net::lookup_host(hub)
            .await
            .map_err(|source| UplinkError::Resolve {
                hub: hub.clone(),
                source,
            })?
            .next()
            .ok_or_else(|| UplinkError::NoAddress { hub: hub.clone() })
    }

    async fn connect_and_serve(
        &self,
        config: &quinn::ClientConfig,
        shutdown: &CancellationToken,
    ) -> Result<Ended, UplinkError> {
        let addr = self.resolve().await?;
        let bind = if addr.is_ipv6() {
            SocketAddr::from(([0u16; 8], 0))
        } else {
            SocketAddr::from(([0u8; 4], 0))
        };
        let endpoint = quinn::Endpoint::client(bind).map_err(UplinkError::Socket)?;
        let server_name = self.settings.server_name.clone().unwrap_or_default();
        let connecting = endpoint.connect_with(config.clone(), addr, &server_name)?;
        let conn = tokio::select! {
            () = shutdown.cancelled() => return Ok(Ended::Shutdown),
            c = connecting => c?,
        };
        let info = AgentInfo {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            labels: self.policy.labels(),
        };
        let link = Link {
            outbox: &self.outbox,
            metrics: &self.metrics,
            policy: &self.policy,
            info: &info,
            renewer: &self.renewer,
            commands: self.commands.as_deref(),
        };
        let result = serve(link, &conn, shutdown).await;
        match &result {
            Ok(_) => conn.close(quinn::VarInt::from_u32(CLOSE_OK), b"bye"),
            Err(UplinkError::Protocol(e)) => conn.close(
                quinn::VarInt::from_u32(e.code().to_u32()),
                e.to_string().as_bytes(),
            ),
            Err(_) => conn.close(quinn::VarInt::from_u32(CLOSE_OK), b""),
        }
        // Let the close reach the hub before the endpoint goes.
        let _ = tokio::time::timeout(CLOSE_WAIT, endpoint.wait_idle()).await;
        self.metrics.uplink_connected.set(0);
        result
    }
}
