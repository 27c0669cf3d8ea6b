//! The accept loop, and one connection's life around its session: decide at
//! the door (`door`), identify the agent, supersede its previous connection,
//! run the driver, close with the code that says why, and log the end in the
//! agent's span.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use outpost_protocols::wire::{ErrorCode, CLOSE_OK};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use super::binding::{BindingError, Certs};
use super::door::{Admission, Door, DoorCounters, Handshake, Limits};
use super::endpoint::{server_config, udp_socket};
use super::enforcement::PolicyFeed;
use super::enroll::enrollment;
use super::error::{ConnError, ServerError};
use super::identity::peer_agent_id;
use super::live::Live;
use super::reset::{endpoint_config, reset_secret_file};
use super::session::{session, Link};
use crate::audit::key::AuditKey;
use crate::clock;
use crate::config::HubConfig;
use crate::enroll::service::Enroller;
use crate::store::StoreHandle;

/// How long a stopping hub waits for its close frames to reach the agents.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The longest a TLS handshake may hold its place among those in flight
/// (QUIC's idle timeout alone would let a peer that keeps sending hold it
/// for ever).
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(60);

/// The keys the server needs besides its TLS files.
#[derive(Debug)]
pub struct ServeKeys {
    /// The replicas' shared secret of stateless resets; without it,
    /// `<data_dir>/reset.key`.
    pub reset: Option<Vec<u8>>,
    /// The hub's audit key, which signs the `enroll.*` entries.
    pub audit: AuditKey,
}

/// Serves agents until `shutdown`. What the door decides is counted in
/// `door`.
// One more than clippy's seven: each is a separate piece of the wiring.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    cfg: &HubConfig,
    base: &Path,
    store: StoreHandle,
    policy: PolicyFeed,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
    keys: ServeKeys,
    door: Arc<DoorCounters>,
) -> Result<(), ServerError> {
    let (endpoint, addr) = bind(cfg, base, keys.reset)?;
    let local = endpoint.local_addr().unwrap_or(addr);
    info!(listen = %local, "Hub listening (QUIC).");
    if let Some(tx) = bound {
        let _ = tx.send(local);
    }
    let live = Arc::new(Live::default());
    let door = Door::new(Limits::from_config(&cfg.hub), door);
    let enroller = Arc::new(Enroller::new(cfg, base, keys.audit));
    let certs = Arc::new(certs(cfg, base));
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let Some(handshake) = at_the_door(&door, incoming) else { continue };
                let (store, live, policy) = (store.clone(), live.clone(), policy.clone());
                let (enroller, certs) = (enroller.clone(), certs.clone());
                let stop = shutdown.child_token();
                let counters = door.counters().clone();
                let stream_deadline = door.limits().stream_deadline;
                tasks.spawn(async move {
                    let (incoming, handshake) = handshake;
                    let remote = incoming.remote_address();
                    let opening = Opening { handshake, stream_deadline, counters };
                    let signing = (enroller, certs);
                    if let Err(e) =
                        connection(incoming, opening, store, policy, live, signing, stop).await
                    {
                        warn!(%remote, error = %e, "Agent connection ended.");
                    }
                });
            }
            Some(r) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = r {
                    warn!(error = %e, "A connection task ended abnormally.");
                }
            }
        }
    }
    info!("Hub stopping: closing agent connections.");
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            warn!(error = %e, "A connection task ended abnormally.");
        }
    }
    endpoint.close(
        quinn::VarInt::from_u32(ErrorCode::ShuttingDown.to_u32()),
        b"hub shutting down",
    );
    let _ = tokio::time::timeout(CLOSE_WAIT, endpoint.wait_idle()).await;
    Ok(())
}

/// Carries out the door's decision about `incoming`: the Incoming and its
/// place among the handshakes if it may go on, nothing if it was answered
/// with a Retry or refused.
fn at_the_door(door: &Door, incoming: quinn::Incoming) -> Option<(quinn::Incoming, Handshake)> {
    let remote = incoming.remote_address();
    match door.admit(
        remote.ip(),
        incoming.remote_address_validated(),
        clock::now(),
    ) {
        Admission::Accept(handshake) => Some((incoming, handshake)),
        Admission::Retry => {
            // An unvalidated address may always be retried (quinn's
            // contract); should it not be, refusing is the safe answer.
            if let Err(e) = incoming.retry() {
                e.into_incoming().refuse();
            }
            None
        }
        Admission::RateLimited => {
            debug!(%remote, "Connection refused: the address opened too many.");
            incoming.refuse();
            None
        }
        Admission::Busy => {
            debug!(%remote, "Connection refused: too many handshakes in flight.");
            incoming.refuse();
            None
        }
    }
}

/// What an admitted connection carries until it has opened its stream.
struct Opening {
    /// Its place among the handshakes in flight, given back when the
    /// handshake ends.
    handshake: Handshake,
    /// How long it may take, once its handshake is done, to open its
    /// stream.
    stream_deadline: Duration,
    /// Where a passed deadline is counted.
    counters: Arc<DoorCounters>,
}

/// The QUIC endpoint `[hub]` describes, bound and ready to accept, and the
/// address it was asked to bind.
fn bind(
    cfg: &HubConfig,
    base: &Path,
    reset_secret: Option<Vec<u8>>,
) -> Result<(quinn::Endpoint, SocketAddr), ServerError> {
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_owned()
        } else {
            base.join(p)
        }
    };
    let config = server_config(
        &resolve(&cfg.hub.ca),
        &resolve(&cfg.hub.cert),
        &resolve(&cfg.hub.key),
    )?;
    let addr: SocketAddr = cfg
        .hub
        .listen
        .parse()
        .map_err(|source| ServerError::ListenAddress {
            value: cfg.hub.listen.clone(),
            source,
        })?;
    // Replicas share one secret (from their store), so that a connection
    // moved to another replica is reset at once rather than timed out.
    let secret = match reset_secret {
        Some(secret) => secret,
        None => reset_secret_file(&resolve(&cfg.hub.data_dir))?,
    };
    let socket = udp_socket(addr).map_err(|source| ServerError::Listen { addr, source })?;
    let runtime = quinn::default_runtime().ok_or(ServerError::NoRuntime)?;
    let endpoint = quinn::Endpoint::new(endpoint_config(&secret), Some(config), socket, runtime)
        .map_err(|source| ServerError::Listen { addr, source })?;
    Ok((endpoint, addr))
}

/// The certificate settings of `[hub]`, paths resolved against `base`.
fn certs(cfg: &HubConfig, base: &Path) -> Certs {
    // Either key names the CA the hub signs with, for renewals and
    // enrollments alike.
    let ca_dir = cfg
        .hub
        .ca_dir
        .as_ref()
        .or(cfg.enroll.ca_dir.as_ref())
        .map(|p| base.join(p));
    let validity =
        crate::ca::Validity::days(cfg.hub.renew_days).unwrap_or(crate::ca::Validity::LEAF_DEFAULT);
    Certs::new(ca_dir, validity, cfg.hub.renew_grace.0)
}

/// One agent connection, from the handshake to the close.
async fn connection(
    incoming: quinn::Incoming,
    opening: Opening,
    store: StoreHandle,
    policy: PolicyFeed,
    live: Arc<Live>,
    (enroller, certs): (Arc<Enroller>, Arc<Certs>),
    stop: CancellationToken,
) -> Result<(), ConnError> {
    let Opening {
        handshake,
        stream_deadline,
        counters,
    } = opening;
    // The handshake has a bound of its own, longer than the stream
    // deadline: a thousand agents redialling at once on a slow machine may
    // take longer than that to be served, and cutting them off would only
    // make them dial again. Dropping it abandons the connection (quinn
    // closes it).
    let conn = tokio::time::timeout(HANDSHAKE_LIMIT, incoming)
        .await
        .map_err(|_| ConnError::HandshakeTimeout)?
        .map_err(ConnError::Handshake)?;
    drop(handshake);
    let deadline = clock::tokio_now() + stream_deadline;
    if negotiated_alpn(&conn).as_deref() == Some(outpost_protocols::enroll::ALPN) {
        enrollment(conn, enroller, stop).await;
        return Ok(());
    }
    let (id, cert) = match peer_agent_id(&conn) {
        Ok(id) => id,
        Err(e) => {
            conn.close(
                quinn::VarInt::from_u32(ErrorCode::Unauthorized.to_u32()),
                b"unauthorized",
            );
            return Err(e.into());
        }
    };
    let span = info_span!("agent", agent_id = %id, remote = %conn.remote_address());
    // Refused before it can supersede the live connection of its id.
    let revoked = policy.trust.borrow().revocation(&id).cloned();
    if let Some(r) = revoked {
        conn.close(
            quinn::VarInt::from_u32(ErrorCode::Revoked.to_u32()),
            b"revoked",
        );
        let _enter = span.enter();
        warn!(by = %r.by, reason = %r.reason, "Refused a revoked agent.");
        return Ok(());
    }
    async move {
        // Before `take_over`: a certificate that is not the agent's must not
        // displace the live session.
        if let Err(e) = certs.admit(&store, &id, &cert).await {
            let code = match e {
                BindingError::NotCurrent { .. } => ErrorCode::CertificateNotCurrent,
                BindingError::Store(_) => ErrorCode::Internal,
            };
            conn.close(
                quinn::VarInt::from_u32(code.to_u32()),
                e.to_string().as_bytes(),
            );
            warn!(code = %code.name(), error = %e, "Agent connection refused.");
            return Ok(());
        }
        let registration = live.take_over(&id, &stop).await?;
        let mut registered = false;
        let link = Link {
            certs: &certs,
            cert: &cert,
            deadline,
        };
        let result = session(&conn, &id, &store, policy, link, &stop, &mut registered).await;
        if matches!(result, Err(ConnError::StreamDeadline)) {
            counters.stream_deadline_passed();
        }
        conn.close(close_code(&result), close_reason(&result).as_bytes());
        if registered {
            let _ = store.agent_disconnected(id.clone()).await;
        }
        live.finish(registration);
        // Logged here, inside the agent's span, so the line names the agent
        // and the wire's error code.
        match &result {
            Ok(()) => {}
            Err(ConnError::Protocol(e)) => warn!(
                code = %e.code().name(),
                error = %e,
                "Agent connection ended: the agent broke the protocol."
            ),
            Err(e) => warn!(error = %e, "Agent connection ended."),
        }
        Ok(())
    }
    .instrument(span)
    .await
}

/// The ALPN the handshake settled on.
fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// The QUIC close code for how a session ended: 0, the protocol error's
/// code, or `internal`.
fn close_code(result: &Result<(), ConnError>) -> quinn::VarInt {
    quinn::VarInt::from_u32(match result {
        Ok(()) => CLOSE_OK,
        Err(ConnError::Protocol(e)) => e.code().to_u32(),
        Err(ConnError::StreamDeadline) => ErrorCode::Timeout.to_u32(),
        Err(ConnError::Revoked) => ErrorCode::Revoked.to_u32(),
        Err(_) => ErrorCode::Internal.to_u32(),
    })
}

/// The close reason: the protocol error's text, or nothing.
fn close_reason(result: &Result<(), ConnError>) -> String {
    match result {
        Err(ConnError::Protocol(e)) => e.to_string(),
        Err(e @ ConnError::StreamDeadline) => e.to_string(),
        _ => String::new(),
    }
}
