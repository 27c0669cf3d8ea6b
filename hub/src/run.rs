//! Wiring: open the store, watch the policy versions, serve agents, stop in
//! order.
//!
//! Shutdown order: the QUIC side stops first (every connection task finishes
//! the commits it started), then the store writer commits what it holds and
//! closes, so nothing the hub acknowledged is left uncommitted.

use std::net::SocketAddr;
use std::path::Path;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::api::state::ApiStore;
use crate::audit::key::AuditKey;
use crate::config::{HubConfig, StoreKind};
use crate::metrics::MetricsSource;
use crate::policy::PolicySource;
use crate::server::{self, ServerError};
use crate::sinks::runner::{QueueSource, SinkThread};
use crate::store::jetstream::{spawn_jetstream_writer, JetStreamStore, JetStreamStoreConfig};
use crate::store::{self, spawn_store_writer, Store, StoreError, Synchronous, WriterOptions};
use crate::trust::TrustSource;

/// Why the hub could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The data directory could not be created.
    #[error("{path}: cannot create data directory: {source}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The QUIC server failed.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The store writer thread died.
    #[error("store writer failed: {0}")]
    Writer(#[source] tokio::task::JoinError),
    /// A sink's settings cannot work.
    #[error(transparent)]
    Sink(#[from] crate::sinks::SinkError),
    /// The API's TLS files cannot be used.
    #[error(transparent)]
    Api(#[from] crate::api::server::ApiError),
    /// The audit key cannot be read or made, or is readable by others.
    #[error(transparent)]
    AuditKey(#[from] crate::audit::key::KeyError),
    /// The policy in force could not be read, or was tampered with.
    #[error(transparent)]
    Policy(#[from] crate::policy::WatchError),
    /// The hashing key cannot be read or made, or is readable by others.
    #[error(transparent)]
    HashingKey(#[from] crate::hashing::HashingKeyError),
}

impl RunError {
    /// The exit status: 2 for what the operator must fix in files (the
    /// audit key, a tampered policy), 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::AuditKey(_)
            | RunError::HashingKey(_)
            | RunError::Policy(crate::policy::WatchError::Tampered { .. }) => 2,
            _ => 1,
        }
    }
}

/// Runs the hub until `shutdown`; `bound` receives the QUIC address once it
/// listens (tests bind port 0).
pub async fn run(
    cfg: HubConfig,
    config_file: &Path,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), RunError> {
    match cfg.store.clone() {
        StoreKind::Sqlite { synchronous } => {
            run_sqlite(cfg, synchronous, config_file, shutdown, bound).await
        }
        StoreKind::JetStream(js) => run_jetstream(cfg, &js, config_file, shutdown, bound).await,
    }
}

/// Runs the hub on its SQLite store in `data_dir`.
async fn run_sqlite(
    cfg: HubConfig,
    synchronous: Synchronous,
    config_file: &Path,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), RunError> {
    let path = store::store_path(config_file, &cfg.hub.data_dir);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| RunError::DataDir {
            path: dir.to_owned(),
            source,
        })?;
    }
    let audit_key = AuditKey::load_or_create(&cfg.audit_key_path(config_file))?;
    let mut store = Store::open(&path, synchronous, audit_key.clone())?;
    let commands = std::sync::Arc::new(crate::commands::CommandStore::open(
        &path,
        audit_key.clone(),
    )?);
    let configured: Vec<String> = cfg.sinks.iter().map(|s| s.id.clone()).collect();
    for (sink, events) in store.drop_unconfigured_sinks(&configured)? {
        tracing::warn!(
            sink = %sink,
            events,
            "A sink that is no longer configured had events queued; dropped them (audited), so that they no longer hold back the agents' acknowledgements."
        );
    }
    let writer_stop = CancellationToken::new();
    let (handle, writer) = spawn_store_writer(store, WriterOptions::default(), writer_stop.clone());
    let base = config_file.parent().unwrap_or(Path::new(""));
    let catalog = crate::policy::catalog(&cfg);
    let watch_stop = shutdown.child_token();
    let source = PolicySource::Sqlite(path.clone());
    let watched = match hashing_key(&cfg, config_file, &source, &audit_key).await {
        Ok(hashing) => {
            crate::policy::watch(
                source,
                catalog.clone(),
                audit_key.clone(),
                hashing,
                watch_stop.clone(),
            )
            .await
        }
        Err(e) => {
            drop(handle);
            writer_stop.cancel();
            let _ = writer.await;
            return Err(e);
        }
    };
    let (current, watcher) = match watched {
        Ok(w) => w,
        Err(e) => {
            drop(handle);
            writer_stop.cancel();
            let _ = writer.await;
            return Err(e.into());
        }
    };
    let (trust, trust_watcher) =
        crate::trust::watch(TrustSource::Sqlite(path.clone()), watch_stop.clone()).await?;
    let running = Running {
        handle,
        writer,
        writer_stop,
        watch_stop,
        watchers: vec![watcher, trust_watcher],
        current,
        trust,
        catalog,
        commands: Some(commands),
    };
    let sources = Sources {
        queue: QueueSource::Sqlite(path.clone()),
        metrics: MetricsSource::Sqlite {
            path: path.clone(),
            sinks: configured,
        },
        api: ApiStore::Sqlite(path.clone()),
        keys: server::ServeKeys {
            reset: None,
            audit: audit_key,
        },
    };
    serve_on(&cfg, base, running, sources, shutdown, bound).await?;
    info!(store = %path.display(), "Hub stopped.");
    Ok(())
}

/// Runs a stateless replica on the JetStream store: no local store; the
/// policy from the store's bucket; the sinks' queues in the store's sinks
/// stream, each sink run by the replica that holds its lease.
async fn run_jetstream(
    cfg: HubConfig,
    js: &JetStreamStoreConfig,
    config_file: &Path,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), RunError> {
    let base = config_file.parent().unwrap_or(Path::new(""));
    let audit_key = AuditKey::load_or_create(&cfg.audit_key_path(config_file))?;
    let store = JetStreamStore::open(js, base).await?;
    store.claim_audit_key(&audit_key).await?;
    let reset = store.reset_secret().await?;
    let catalog = crate::policy::catalog(&cfg);
    let watch_stop = shutdown.child_token();
    let source = PolicySource::JetStream(Box::new(store.clone()));
    let hashing = hashing_key(&cfg, config_file, &source, &audit_key).await?;
    store.claim_hashing_key(&hashing).await?;
    let (current, watcher) = crate::policy::watch(
        source,
        catalog.clone(),
        audit_key.clone(),
        hashing,
        watch_stop.clone(),
    )
    .await?;
    let (trust, trust_watcher) = crate::trust::watch(
        TrustSource::JetStream(Box::new(store.clone())),
        watch_stop.clone(),
    )
    .await?;
    let writer_stop = CancellationToken::new();
    let replica = store.replica().to_owned();
    let configured: Vec<String> = cfg.sinks.iter().map(|s| s.id.clone()).collect();
    let (handle, writer) = spawn_jetstream_writer(
        store.clone(),
        WriterOptions::default(),
        configured.clone(),
        writer_stop.clone(),
    );
    let running = Running {
        handle,
        writer,
        writer_stop,
        watch_stop,
        watchers: vec![watcher, trust_watcher],
        current,
        trust,
        catalog,
        // Commands need the SQLite store for now: a JetStream hub sends
        // none, and `command send` refuses it (no commands bucket yet).
        commands: None,
    };
    let sources = Sources {
        queue: QueueSource::JetStream(Box::new(store.clone())),
        api: ApiStore::JetStream(Box::new(store.clone())),
        metrics: MetricsSource::JetStream {
            store: Box::new(store),
            sinks: configured,
        },
        keys: server::ServeKeys {
            reset: Some(reset),
            audit: audit_key,
        },
    };
    serve_on(&cfg, base, running, sources, shutdown, bound).await?;
    info!(url = %js.url(), %replica, "Hub stopped.");
    Ok(())
}

/// Reads the hub's hashing key, or makes it and audits that as
/// `hashing.key_created` (its fingerprint, never the key).
async fn hashing_key(
    cfg: &HubConfig,
    config_file: &Path,
    source: &PolicySource,
    audit_key: &AuditKey,
) -> Result<outpost_protocols::policy::HashingKey, RunError> {
    let path = cfg.hashing_key_path(config_file);
    let (key, created) = crate::hashing::load_or_create(&path)?;
    if created {
        let detail = format!(
            "fingerprint {}; the key of each policy rule that hashes is derived from it",
            key.fingerprint()
        );
        info!(path = %path.display(), fingerprint = %key.fingerprint(), "Made the hub's hashing key.");
        source
            .audit(
                audit_key,
                crate::store::audit::Entry {
                    ts: crate::clock::unix_now(),
                    actor: "hub",
                    action: "hashing.key_created",
                    target: &path.display().to_string(),
                    result: "ok",
                    detail: &detail,
                },
            )
            .await?;
    }
    Ok(key)
}

/// A store backend and the policy and trust watches, running.
struct Running<T> {
    handle: store::StoreHandle,
    writer: tokio::task::JoinHandle<Result<T, StoreError>>,
    writer_stop: CancellationToken,
    watch_stop: CancellationToken,
    watchers: Vec<tokio::task::JoinHandle<()>>,
    current: tokio::sync::watch::Receiver<std::sync::Arc<crate::policy::FleetPolicy>>,
    trust: tokio::sync::watch::Receiver<std::sync::Arc<crate::trust::TrustView>>,
    catalog: outpost_protocols::policy::Catalog,
    commands: Option<std::sync::Arc<crate::commands::CommandStore>>,
}

/// What the sinks and the metrics read on this store, and the replicas'
/// shared stateless-reset secret (JetStream).
struct Sources {
    queue: QueueSource,
    metrics: MetricsSource,
    api: ApiStore,
    keys: server::ServeKeys,
}

/// On either store, once its backend runs: starts the sinks and the
/// metrics, serves agents until `shutdown`, then stops everything in order
/// (see the module doc).
async fn serve_on<T>(
    cfg: &HubConfig,
    base: &Path,
    r: Running<T>,
    sources: Sources,
    shutdown: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), RunError> {
    let started = start_sinks(cfg, base, &r.handle, sources.queue, &r.current).await;
    let (sinks_stop, runners) = match started {
        Ok(started) => started,
        Err(e) => {
            let _ = stop_store(r.watch_stop, r.watchers, r.handle, r.writer_stop, r.writer).await;
            return Err(e.into());
        }
    };
    let feed = server::PolicyFeed {
        current: r.current,
        trust: r.trust,
        catalog: r.catalog,
        commands: r.commands,
    };
    let door = std::sync::Arc::new(server::DoorCounters::default());
    let metrics = start_metrics(
        cfg,
        sources.metrics,
        door.clone(),
        r.handle.kpis().clone(),
        shutdown.child_token(),
    )
    .await;
    let api = match crate::api::server::start(
        cfg,
        base,
        sources.api,
        sources.keys.audit.clone(),
        r.handle.kpis().clone(),
        shutdown.child_token(),
    )
    .await
    {
        Ok(api) => api,
        Err(e) => {
            stop_metrics(metrics).await;
            stop_sinks(sinks_stop, runners).await;
            let _ = stop_store(r.watch_stop, r.watchers, r.handle, r.writer_stop, r.writer).await;
            return Err(e.into());
        }
    };
    let served = server::serve(
        cfg,
        base,
        r.handle.clone(),
        feed,
        shutdown,
        bound,
        sources.keys,
        door,
    )
    .await;
    if let Some(api) = api {
        api.stop().await;
    }
    stop_metrics(metrics).await;
    stop_sinks(sinks_stop, runners).await;
    let closed = stop_store(r.watch_stop, r.watchers, r.handle, r.writer_stop, r.writer).await;
    served?;
    closed
}

/// Starts a runner per `[[sinks]]` entry, reading its queue from `source`,
/// with the token that stops them; they stop after the QUIC side (whose
/// sessions wait on them) and before the store. If one cannot start, those
/// started are stopped again.
async fn start_sinks(
    cfg: &HubConfig,
    base: &Path,
    handle: &store::StoreHandle,
    source: QueueSource,
    current: &tokio::sync::watch::Receiver<std::sync::Arc<crate::policy::FleetPolicy>>,
) -> Result<(CancellationToken, Vec<SinkThread>), crate::sinks::SinkError> {
    let stop = CancellationToken::new();
    let mut runners = Vec::new();
    for c in &cfg.sinks {
        let started = crate::sinks::runner::start(
            c,
            base,
            handle.clone(),
            source.clone(),
            current.clone(),
            stop.clone(),
        )
        .await;
        match started {
            Ok(t) => runners.push(t),
            Err(e) => {
                stop_sinks(stop, runners).await;
                return Err(e);
            }
        }
    }
    Ok((stop, runners))
}

/// Stops the sinks' runners and waits for their threads.
async fn stop_sinks(stop: CancellationToken, runners: Vec<SinkThread>) {
    stop.cancel();
    for t in runners {
        t.join().await;
    }
}

/// After the QUIC side: stops the policy and trust watches, then the store
/// backend once it has answered everything queued, and says how the backend
/// ended.
async fn stop_store<T>(
    watch_stop: CancellationToken,
    watchers: Vec<tokio::task::JoinHandle<()>>,
    handle: store::StoreHandle,
    writer_stop: CancellationToken,
    writer: tokio::task::JoinHandle<Result<T, StoreError>>,
) -> Result<(), RunError> {
    watch_stop.cancel();
    for w in watchers {
        let _ = w.await;
    }
    drop(handle);
    writer_stop.cancel();
    writer
        .await
        .map_err(RunError::Writer)?
        .map(drop)
        .map_err(RunError::from)
}

async fn stop_metrics(metrics: Option<Metrics>) {
    if let Some(m) = metrics {
        m.stop.cancel();
        let _ = m.task.await;
    }
}

/// The metrics endpoint's task and its stop token.
struct Metrics {
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

/// Binds `[observability] metrics` and serves it, unless it is empty. An
/// address that cannot be bound is logged and the hub runs without metrics:
/// taking the fleet's uplink down for a scrape endpoint would be the worse
/// failure.
async fn start_metrics(
    cfg: &HubConfig,
    source: MetricsSource,
    door: std::sync::Arc<server::DoorCounters>,
    kpis: std::sync::Arc<crate::kpis::Kpis>,
    stop: CancellationToken,
) -> Option<Metrics> {
    let addr = cfg.observability.metrics.parse::<SocketAddr>().ok()?;
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => {
            info!(listen = %listener.local_addr().unwrap_or(addr), "Metrics listening (Prometheus).");
            let task = tokio::spawn(crate::metrics::serve(
                listener,
                source,
                door,
                kpis,
                stop.clone(),
            ));
            Some(Metrics { task, stop })
        }
        Err(e) => {
            tracing::error!(%addr, error = %e, "Cannot bind the metrics address; running without metrics.");
            None
        }
    }
}
