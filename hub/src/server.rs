//! The hub's QUIC ingest: one thin driver task per agent connection around the
//! sans-IO [`HubSession`].
//!
//! The driver makes no protocol decisions. It authenticates the agent by its
//! certificate (the id comes from the SAN URI, never from what the agent
//! says), reads the agent's watermark from the store, feeds the session what
//! arrives, stores what the session hands out, and tells the session only after
//! the store committed, so the acknowledgement the agent deletes its outbox on
//! means "durable here".
//!
//! Backpressure is per agent: a connection stops reading once a few batches
//! wait for their commit, so QUIC flow control slows that agent alone, and
//! every agent's batches share the store's group commits.
//!
//! Architecture invariant: at most one session per agent id is live. A new
//! connection supersedes the old one and waits until the old one's commits are
//! finished before reading the watermark, so the watermark it resumes from is
//! never stale.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{FuturesOrdered, StreamExt};
use outpost_protocols::wire::{
    ErrorCode, HubConfig as SessionConfig, HubEvent, HubSession, ALPN, CLOSE_OK,
};
use outpost_protocols::{AgentId, Seq};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use outpost_protocols::policy::{Catalog, Enforcer, Stage, Verdict, STORE_SINK};
use outpost_protocols::EventBody;
use tokio::sync::watch;

use crate::ca;
use crate::config::HubConfig;
use crate::policy::FleetPolicy;
use crate::store::{Forward, PolicyCounts, StoreError, StoreHandle};

/// Why the hub could not serve.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A certificate or key file is unusable.
    #[error("{path}: {message}")]
    Tls {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls or quinn refused the configuration.
    #[error("tls configuration: {0}")]
    Config(String),
    /// The UDP socket could not be bound.
    #[error("hub.listen: cannot listen on {addr}: {message}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// What the OS said.
        message: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why one connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("connection: {0}")]
    Connection(String),
    #[error("protocol: {0}")]
    Protocol(#[from] outpost_protocols::wire::ProtocolError),
    #[error("session usage: {0}")]
    Usage(#[from] outpost_protocols::wire::UsageError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

fn read_pem(path: &Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|e| ServerError::Tls {
        path: path.to_owned(),
        message: format!("cannot read: {e}"),
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ServerError> {
    let bytes = read_pem(path)?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServerError::Tls {
            path: path.to_owned(),
            message: format!("invalid PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(ServerError::Tls {
            path: path.to_owned(),
            message: "no certificate found".into(),
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, ServerError> {
    let bytes = read_pem(path)?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|e| ServerError::Tls {
            path: path.to_owned(),
            message: format!("invalid PEM: {e}"),
        })?
        .ok_or_else(|| ServerError::Tls {
            path: path.to_owned(),
            message: "no private key found".into(),
        })
}

/// The QUIC server configuration: the hub's certificate, client certificates
/// required and checked against the fleet CA, ALPN `outpost/1`.
pub fn server_config(
    ca: &Path,
    cert: &Path,
    key_path: &Path,
) -> Result<quinn::ServerConfig, ServerError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c).map_err(|e| ServerError::Tls {
            path: ca.to_owned(),
            message: format!("unusable CA certificate: {e}"),
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| ServerError::Config(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ServerError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert)?, key(key_path)?)
        .map_err(|e| ServerError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| ServerError::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(1u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(60))
            .map_err(|e| ServerError::Config(e.to_string()))?,
    ));
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// One agent's live connection: its number, how to stop it, and how to learn
/// that it has finished its commits.
struct LiveSession {
    number: u64,
    stop: CancellationToken,
    done: Arc<tokio::sync::Notify>,
    finished: Arc<std::sync::atomic::AtomicBool>,
}

/// The hub's UDP socket, with large kernel buffers: a thousand agents
/// redialling at once (after a hub restart, say) send their handshakes in one
/// burst, and the default buffer (about 200 KB) drops most of it, so agents
/// wait out QUIC's doubling handshake retries. The kernel caps the size at
/// `net.core.rmem_max`/`wmem_max`; a refusal leaves the default.
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(8 << 20);
    let _ = socket.set_send_buffer_size(8 << 20);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The endpoint's stateless-reset key and connection-id generator, both
/// derived from `secret`.
///
/// A restarted hub, or another replica behind the same address, must be able
/// to reset the connections it does not know: otherwise the agent hears
/// nothing and waits out its idle timeout (30 s) before redialling. That
/// takes two things that are random per endpoint by default: the key the
/// reset tokens are derived from, and the key of quinn's connection-id
/// generator, without which a packet for another endpoint's connection is
/// dropped as an invalid id before any reset is considered.
fn endpoint_config(secret: &[u8]) -> quinn::EndpointConfig {
    let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&reset, b"outpost connection ids");
    let mut first = [0u8; 8];
    first.copy_from_slice(&tag.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(first);
    let mut config = quinn::EndpointConfig::new(Arc::new(reset));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

/// The secret of QUIC stateless resets, kept in `<data_dir>/reset.key`
/// (0600), made on first start; see [`endpoint_config`].
fn reset_secret_file(data_dir: &Path) -> Result<Vec<u8>, ServerError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = data_dir.join("reset.key");
    let tls_err = |message: String| ServerError::Tls {
        path: path.clone(),
        message,
    };
    let secret = match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == 32 => bytes,
        Ok(_) => {
            return Err(tls_err(
                "must hold exactly 32 bytes; delete it to make a new one".into(),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = vec![0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                .map_err(|_| tls_err("no randomness".into()))?;
            std::fs::create_dir_all(data_dir)
                .map_err(|e| tls_err(format!("cannot create folder: {e}")))?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| tls_err(format!("cannot create: {e}")))?;
            f.write_all(&bytes)
                .and_then(|()| f.sync_all())
                .map_err(|e| tls_err(format!("cannot write: {e}")))?;
            bytes
        }
        Err(e) => return Err(tls_err(format!("cannot read: {e}"))),
    };
    Ok(secret)
}

/// The live session of each agent, so a reconnect can supersede it.
#[derive(Default)]
struct Live {
    sessions: Mutex<HashMap<AgentId, LiveSession>>,
    next: std::sync::atomic::AtomicU64,
}

/// Batches whose commit a connection may wait on before it stops reading.
const MAX_PENDING_BATCHES: usize = 8;

/// Serves agents until `shutdown`.
pub async fn serve(
    cfg: &HubConfig,
    base: &Path,
    store: StoreHandle,
    policy: PolicyFeed,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
    reset_secret: Option<Vec<u8>>,
) -> Result<(), ServerError> {
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
        .map_err(|_| ServerError::Config(format!("hub.listen {:?}", cfg.hub.listen)))?;
    let data_dir = resolve(&cfg.hub.data_dir);
    // Replicas share one secret (from their store), so that a connection
    // moved to another replica is reset at once rather than timed out.
    let secret = match reset_secret {
        Some(secret) => secret,
        None => reset_secret_file(&data_dir)?,
    };
    let endpoint_config = endpoint_config(&secret);
    let socket = udp_socket(addr).map_err(|e| ServerError::Listen {
        addr,
        message: e.to_string(),
    })?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| ServerError::Config("no async runtime".into()))?;
    let endpoint =
        quinn::Endpoint::new(endpoint_config, Some(config), socket, runtime).map_err(|e| {
            ServerError::Listen {
                addr,
                message: e.to_string(),
            }
        })?;
    let local = endpoint.local_addr().unwrap_or(addr);
    info!(listen = %local, "Hub listening (QUIC).");
    if let Some(tx) = bound {
        let _ = tx.send(local);
    }
    let live = Arc::new(Live::default());
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let store = store.clone();
                let live = live.clone();
                let stop = shutdown.child_token();
                let policy = policy.clone();
                tasks.spawn(async move {
                    let remote = incoming.remote_address();
                    if let Err(e) = connection(incoming, store, policy, live, stop).await {
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
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok(())
}

fn peer_agent_id(conn: &quinn::Connection) -> Result<AgentId, ConnError> {
    let identity = conn
        .peer_identity()
        .ok_or_else(|| ConnError::Unauthorized("no client certificate".into()))?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| ConnError::Unauthorized("unexpected peer identity".into()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| ConnError::Unauthorized("empty certificate chain".into()))?;
    ca::agent_id_from_cert_der(leaf.as_ref()).map_err(|e| ConnError::Unauthorized(e.to_string()))
}

/// A queued insert: resolves to the last seq of its batch and what the store
/// says may be acknowledged. The session acknowledges at most the former
/// (the store's watermark can be higher while a superseded session of the
/// same agent is still finishing), and less while a sink holds events back.
type Commit = Pin<Box<dyn Future<Output = Result<(Seq, Seq), StoreError>> + Send>>;

/// The policy in force and the sinks it is enforced against, for every
/// session.
#[derive(Debug, Clone)]
pub struct PolicyFeed {
    /// The version in force, replaced when an operator applies another.
    pub current: watch::Receiver<Arc<FleetPolicy>>,
    /// The hub's sinks and their regions.
    pub catalog: Catalog,
}

impl PolicyFeed {
    /// No policy, ever: for tests of the ingest alone.
    pub fn none(catalog: Catalog) -> PolicyFeed {
        let (tx, current) = watch::channel(Arc::new(FleetPolicy::none()));
        // A receiver outlives its sender: it keeps the last value.
        drop(tx);
        PolicyFeed { current, catalog }
    }
}

async fn connection(
    incoming: quinn::Incoming,
    store: StoreHandle,
    policy: PolicyFeed,
    live: Arc<Live>,
    stop: CancellationToken,
) -> Result<(), ConnError> {
    let conn = incoming
        .await
        .map_err(|e| ConnError::Handshake(e.to_string()))?;
    let id = match peer_agent_id(&conn) {
        Ok(id) => id,
        Err(e) => {
            conn.close(
                quinn::VarInt::from_u32(ErrorCode::Unauthorized.to_u32()),
                b"unauthorized",
            );
            return Err(e);
        }
    };
    let span = info_span!("agent", agent_id = %id, remote = %conn.remote_address());
    async move {
        // Supersede an older session of the same agent and wait until its
        // commits are done, so the watermark below is current.
        let me = live.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let done = Arc::new(tokio::sync::Notify::new());
        let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let previous = {
            let mut map = live
                .sessions
                .lock()
                .map_err(|_| ConnError::Connection("registry lock".into()))?;
            map.insert(
                id.clone(),
                LiveSession {
                    number: me,
                    stop: stop.clone(),
                    done: done.clone(),
                    finished: finished.clone(),
                },
            )
        };
        if let Some(old) = previous {
            info!("Superseding the agent's previous connection.");
            old.stop.cancel();
            // Created before the check: a notification after it is not lost.
            let wait = old.done.notified();
            if !old.finished.load(std::sync::atomic::Ordering::Acquire) {
                let _ = tokio::time::timeout(Duration::from_secs(30), wait).await;
            }
        }
        let mut registered = false;
        let result = session(&conn, &id, &store, policy, &stop, &mut registered).await;
        match &result {
            Ok(()) => conn.close(quinn::VarInt::from_u32(CLOSE_OK), b""),
            Err(ConnError::Protocol(e)) => conn.close(
                quinn::VarInt::from_u32(e.code().to_u32()),
                e.to_string().as_bytes(),
            ),
            Err(_) => conn.close(quinn::VarInt::from_u32(ErrorCode::Internal.to_u32()), b""),
        }
        if registered {
            let _ = store.agent_disconnected(id.clone()).await;
        }
        finished.store(true, std::sync::atomic::Ordering::Release);
        done.notify_waiters();
        if let Ok(mut map) = live.sessions.lock() {
            if map.get(&id).is_some_and(|s| s.number == me) {
                map.remove(&id);
            }
        }
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

/// How long the hub waits for the agent to receive its last frames (an
/// `Error`, or the acks before a close) before it closes the connection.
const LAST_WORDS: Duration = Duration::from_secs(2);

/// Finishes the send stream and waits, at most [`LAST_WORDS`], until the
/// agent has received all of it: closing the connection at once would throw
/// away stream data still in flight, such as the `Error` frame that says why.
async fn last_words(send: &mut quinn::SendStream) {
    if send.finish().is_ok() {
        let _ = tokio::time::timeout(LAST_WORDS, send.stopped()).await;
    }
}

/// The longest the hub holds one batch of an agent above its `hold` rate:
/// well under the agent's 30 s idle timeout, since the session sends nothing
/// meanwhile, and the batches of an agent that keeps to its rate are a
/// second's worth anyway.
const MAX_HOLD: Duration = Duration::from_secs(10);

/// The hub's enforcement for one session: the policy in force compiled for
/// the agent's labels, and what the agent said it runs.
struct Enforcement {
    catalog: Catalog,
    labels: std::collections::BTreeMap<String, String>,
    current: Arc<FleetPolicy>,
    enforcer: Enforcer,
    /// Until when the agent's `hold` rate is used up. A batch above it waits
    /// before it is stored and acknowledged, and nothing more is read
    /// meanwhile, so QUIC flow control slows the agent and the events wait
    /// in its outbox, as the policy says, even if the agent ignores it.
    hold_until: Option<Instant>,
}

impl Enforcement {
    fn new(current: Arc<FleetPolicy>, catalog: Catalog) -> Enforcement {
        let labels = std::collections::BTreeMap::new();
        let enforcer = Enforcer::new(Arc::new(current.policy.compile(&labels, &catalog)));
        Enforcement {
            catalog,
            labels,
            current,
            enforcer,
            hold_until: None,
        }
    }

    /// Charges a batch of `events` events and `bytes` payload bytes to the
    /// agent's `hold` rate, if it has one, and returns until when the batch
    /// must wait before it is stored (a leaky bucket with one second of
    /// burst; never longer than [`MAX_HOLD`]).
    fn pace(&mut self, events: usize, bytes: usize, now: Instant) -> Option<Instant> {
        let rate = self
            .enforcer
            .compiled()
            .agent_rate()
            .filter(|r| r.over == outpost_protocols::policy::Over::Hold)?;
        let cost = |n: usize, per_sec: Option<f64>| {
            per_sec.map_or(Duration::ZERO, |r| Duration::from_secs_f64(n as f64 / r))
        };
        let cost = cost(events, rate.events_per_sec).max(cost(bytes, rate.bytes_per_sec));
        let target = self.hold_until.map_or(now, |t| t.max(now)) + cost;
        self.hold_until = Some(target);
        target
            .checked_sub(Duration::from_secs(1))
            .filter(|t| *t > now)
            .map(|t| t.min(now + MAX_HOLD))
    }

    /// Compiles the policy in force for these labels.
    fn recompile(&mut self, labels: Option<std::collections::BTreeMap<String, String>>) {
        if let Some(l) = labels {
            self.labels = l;
        }
        let compiled = self.current.policy.compile(&self.labels, &self.catalog);
        self.enforcer = Enforcer::new(Arc::new(compiled));
    }

    /// Hands the policy in force to the session, which decides whether and
    /// when to push it.
    fn offer(&self, session: &mut HubSession) {
        if let Err(e) = session.set_policy(self.current.version.0, self.current.text.as_str()) {
            debug!(error = %e, "Policy not pushed.");
        }
    }

    /// Applies the policy to a batch: what to store, what to queue for
    /// sinks, and what it did.
    fn apply(
        &mut self,
        events: Vec<(Seq, EventBody)>,
    ) -> (Vec<(Seq, EventBody)>, Vec<Forward>, PolicyCounts) {
        let mut counts = PolicyCounts::default();
        let mut kept = Vec::with_capacity(events.len());
        let mut forward = Vec::new();
        for (seq, mut body) in events {
            match self.enforcer.apply(&mut body, Stage::Ingest) {
                Verdict::Keep { modified, sinks } => {
                    counts.modified += u64::from(modified);
                    let to_store = sinks.iter().any(|s| s == STORE_SINK);
                    let others: Vec<String> = sinks
                        .iter()
                        .filter(|s| s.as_str() != STORE_SINK)
                        .cloned()
                        .collect();
                    match (to_store, others.is_empty()) {
                        (true, true) => kept.push((seq, body)),
                        (true, false) => {
                            kept.push((seq, body.clone()));
                            forward.push(Forward {
                                seq,
                                body,
                                sinks: others,
                            });
                        }
                        (false, false) => forward.push(Forward {
                            seq,
                            body,
                            sinks: others,
                        }),
                        // A kept event always has a sink; without one it
                        // goes nowhere, like a dropped one.
                        (false, true) => counts.dropped += 1,
                    }
                }
                Verdict::Drop(reason) => {
                    tracing::trace!(seq = seq.0, stream = %body.stream, reason = reason.name(), "Event dropped by the policy.");
                    counts.dropped += 1;
                }
            }
        }
        (kept, forward, counts)
    }
}

async fn session(
    conn: &quinn::Connection,
    id: &AgentId,
    store: &StoreHandle,
    policy: PolicyFeed,
    stop: &CancellationToken,
    registered: &mut bool,
) -> Result<(), ConnError> {
    let (mut send, mut recv) = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        s = conn.accept_bi() => s.map_err(|e| ConnError::Connection(e.to_string()))?,
    };
    // The agent resumes after what may be acknowledged; what it sends again
    // up to the store's own watermark (events waiting for a sink) is not
    // stored or queued twice.
    let (received, watermark) = store.resume(id.clone()).await?;
    let mut session = HubSession::new(
        Instant::now(),
        id.clone(),
        watermark,
        SessionConfig::default(),
    )
    .holding(received);
    // Moves when a sink's queue shrank: an acknowledgement held back for a
    // sink may move then.
    let mut delivered = store.delivered_signal();
    // Where the previous batch of this session ended: the store refuses a
    // batch that does not follow what it holds (an earlier one failed).
    let mut after = received;
    let mut policy = policy;
    let current = policy.current.borrow_and_update().clone();
    let mut enforcement = Enforcement::new(current, policy.catalog.clone());
    enforcement.offer(&mut session);
    let mut watching = true;
    // The sinks' delivery signal, until its sender is gone.
    let mut watching_sinks = true;
    let mut commits: FuturesOrdered<Commit> = FuturesOrdered::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(16 * 1024);
    let mut closing = false;
    loop {
        out.clear();
        while session.poll_transmit(Instant::now(), &mut out).is_some() {}
        if !out.is_empty() {
            send.write_all(&out)
                .await
                .map_err(|e| ConnError::Connection(e.to_string()))?;
        }
        while let Some(ev) = session.poll_event() {
            match ev {
                HubEvent::Hello {
                    version,
                    agent_version,
                    labels,
                } => {
                    info!(version, %agent_version, policy_version = enforcement.current.version.0, "Agent connected.");
                    enforcement.recompile(Some(labels.clone()));
                    store
                        .agent_connected(id.clone(), labels, agent_version, version)
                        .await?;
                    *registered = true;
                }
                HubEvent::Store { events } => {
                    let Some(last) = events.last().map(|(seq, _)| *seq) else {
                        continue;
                    };
                    let bytes: usize = events.iter().map(|(_, b)| b.value.payload_len()).sum();
                    if let Some(t) = enforcement.pace(events.len(), bytes, Instant::now()) {
                        debug!(
                            held_ms =
                                t.saturating_duration_since(Instant::now()).as_millis() as u64,
                            "Above the agent's hold rate: holding the batch."
                        );
                        tokio::select! {
                            () = tokio::time::sleep_until(tokio::time::Instant::from_std(t)) => {}
                            () = stop.cancelled() => {}
                        }
                    }
                    // The same policy again, because the agent may be old or
                    // compromised; what it drops still moves the watermark.
                    let (kept, forward, counts) = enforcement.apply(events);
                    if counts.dropped > 0 {
                        debug!(
                            dropped = counts.dropped,
                            modified = counts.modified,
                            last = last.0,
                            "The hub's policy dropped events the agent sent."
                        );
                    }
                    // Queued now, in the order the batches arrived; awaited in
                    // that order below.
                    let pending = store
                        .insert_routed_nowait(id.clone(), kept, forward, (after, last), counts)
                        .await?;
                    after = last;
                    commits.push_back(Box::pin(
                        async move { pending.await.map(|o| (last, o.acked)) },
                    ));
                }
                HubEvent::PolicyStatus { version, error } => {
                    match &error {
                        Some(e) => {
                            warn!(policy_version = version, error = %e, "The agent refused the policy pushed to it and runs its previous one.")
                        }
                        None => info!(policy_version = version, "The agent runs policy."),
                    }
                    store.policy_status(id.clone(), version, error).await?;
                }
                HubEvent::PolicyPushed { version } => {
                    info!(
                        policy_version = version,
                        "Pushing the policy in force to the agent."
                    );
                }
                HubEvent::Backlog { events, bytes, .. } => {
                    store.report_backlog(id.clone(), events, bytes).await?;
                }
                HubEvent::Closed { error } => {
                    // Commits already handed to the store finish; their acks
                    // cannot be sent any more, and the agent resends.
                    while commits.next().await.is_some() {}
                    last_words(&mut send).await;
                    return match error {
                        None => Ok(()),
                        Some(e) if e.is_from_peer() => {
                            debug!(error = %e, "Agent closed with an error.");
                            Ok(())
                        }
                        Some(e) => Err(e.into()),
                    };
                }
                _ => {}
            }
        }
        let deadline = session
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            biased;
            () = stop.cancelled(), if !closing => {
                closing = true;
                session.close(ErrorCode::Superseded, "another connection of this agent took over, or the hub is stopping");
            }
            Some(r) = commits.next(), if !commits.is_empty() => {
                let (upto, acked) = r?;
                session.committed(upto, acked)?;
            }
            changed = delivered.changed(), if watching_sinks && session.awaits_sinks() => {
                if changed.is_err() {
                    watching_sinks = false;
                } else {
                    let acked = store.acked(id.clone()).await?;
                    session.sinks_accepted(acked)?;
                }
            }
            changed = policy.current.changed(), if watching => {
                if changed.is_ok() {
                    enforcement.current = policy.current.borrow_and_update().clone();
                    enforcement.recompile(None);
                    enforcement.offer(&mut session);
                } else {
                    // No more versions will come (the hub is stopping, or
                    // runs without a watch): the last one stays in force.
                    watching = false;
                }
            }
            read = recv.read(&mut buf), if commits.len() < MAX_PENDING_BATCHES => match read {
                Ok(Some(n)) => {
                    if let Err(e) = session.handle_bytes(Instant::now(), &buf[..n]) {
                        // The session queued an Error frame naming the code:
                        // send it before the connection closes with it.
                        out.clear();
                        while session.poll_transmit(Instant::now(), &mut out).is_some() {}
                        let _ = tokio::time::timeout(LAST_WORDS, send.write_all(&out)).await;
                        last_words(&mut send).await;
                        return Err(e.into());
                    }
                }
                Ok(None) => {
                    while commits.next().await.is_some() {}
                    return Ok(());
                }
                Err(e) => {
                    while commits.next().await.is_some() {}
                    return Err(ConnError::Connection(e.to_string()));
                }
            },
            () = tokio::time::sleep_until(deadline) => session.handle_timeout(Instant::now()),
        }
    }
}
