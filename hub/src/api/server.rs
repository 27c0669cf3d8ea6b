//! Serving the API: bind `[api] listen`, TLS with `[api] cert` and `key`
//! (plain HTTP only on loopback, which the config enforces), HTTP/1.1 on
//! hyper, stopped by the hub's cancellation token.
//!
//! Why our own accept loop rather than `axum::serve`: TLS handshakes run
//! in each connection's task, so a slow or silent client holds up nobody
//! else; every connection task lives in a `JoinSet` (none is detached),
//! and on shutdown each finishes the request it is serving and closes.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::state::{ApiState, ApiStore};
use crate::audit::key::AuditKey;
use crate::config::HubConfig;

/// Connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 1024;

/// How long a client may take for its TLS handshake and request head.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// How long open connections get to finish on shutdown.
const GRACE: Duration = Duration::from_secs(5);

/// Why the API cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// `[api] cert` or `key` is unusable.
    #[error("api.cert/api.key: {0}")]
    Tls(#[source] outpost_tls::PemError),
    /// rustls refused the certificate and key.
    #[error("api.cert/api.key: {0}")]
    Rustls(#[source] rustls::Error),
    /// `[api.oidc]` cannot be put to work (its JWKS file).
    #[error(transparent)]
    Auth(#[from] crate::api::auth::AuthSetupError),
}

/// The running API: its address, task and stop token.
#[derive(Debug)]
pub struct ApiServer {
    /// Where it listens.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl ApiServer {
    /// Stops accepting, lets open requests finish, and waits.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The TLS configuration of `[api]`, if it has a certificate.
pub fn tls_config(
    cfg: &HubConfig,
    base: &Path,
) -> Result<Option<Arc<rustls::ServerConfig>>, ApiError> {
    let (Some(cert), Some(key)) = (&cfg.api.cert, &cfg.api.key) else {
        return Ok(None);
    };
    let certs = outpost_tls::load_certs(&base.join(cert)).map_err(ApiError::Tls)?;
    let key = outpost_tls::load_key(&base.join(key)).map_err(ApiError::Tls)?;
    let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(ApiError::Rustls)?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(ApiError::Rustls)?;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(c)))
}

/// Binds `[api] listen` and serves the API on `store` until `stop`; `None`
/// when `listen` is empty or cannot be bound (logged: taking the fleet's
/// uplink down because the operators' port is taken would be the worse
/// failure, as for the metrics endpoint). Unusable TLS files are an error.
pub async fn start(
    cfg: &HubConfig,
    base: &Path,
    store: ApiStore,
    key: AuditKey,
    kpis: std::sync::Arc<crate::kpis::Kpis>,
    stop: CancellationToken,
) -> Result<Option<ApiServer>, ApiError> {
    let Ok(addr) = cfg.api.listen.parse::<SocketAddr>() else {
        return Ok(None);
    };
    let tls = tls_config(cfg, base)?;
    let auth = crate::api::auth::Authenticator::new(cfg, base, store.auth_store(&key)).await?;
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "Cannot bind the API address; running without the API.");
            return Ok(None);
        }
    };
    let addr = listener.local_addr().unwrap_or(addr);
    let state = ApiState::new(cfg, store, auth, key).with_kpis(kpis);
    let app = crate::api::router(state, cfg.api.timeout.0);
    info!(listen = %addr, tls = tls.is_some(), "API listening.");
    let task = tokio::spawn(serve(
        listener,
        tls.map(TlsAcceptor::from),
        app,
        stop.clone(),
    ));
    Ok(Some(ApiServer { addr, task, stop }))
}

/// Accepts connections until `stop`, then waits up to [`GRACE`] for the
/// open ones.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    stop: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept(), if conns.len() < MAX_CONNECTIONS => match accepted {
                Ok((tcp, _peer)) => {
                    conns.spawn(connection(tcp, tls.clone(), app.clone(), stop.clone()));
                }
                Err(e) => {
                    // Out of file descriptors, mostly: wait a moment rather
                    // than spin.
                    warn!(error = %e, "API accept failed.");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            },
        }
    }
    let drained =
        tokio::time::timeout(GRACE, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
}

async fn connection(
    tcp: TcpStream,
    tls: Option<TlsAcceptor>,
    app: Router,
    stop: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    match tls {
        None => serve_io(TokioIo::new(tcp), app, stop).await,
        Some(acceptor) => match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => serve_io(TokioIo::new(stream), app, stop).await,
            Ok(Err(e)) => tracing::debug!(error = %e, "API TLS handshake failed."),
            Err(_) => tracing::debug!("API TLS handshake timed out."),
        },
    }
}

async fn serve_io<I>(io: I, app: Router, stop: CancellationToken)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE);
    let conn = builder.serve_connection(io, TowerToHyperService::new(app));
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "API connection ended with an error.");
            }
        }
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
