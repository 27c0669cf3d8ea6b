//! What every handler shares: the hub's config, where its store is, the
//! authenticator and the rate limiter.
//!
//! A room apart from the router (`api`) so that each resource's handlers
//! can name it without naming the module that names them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use outpost_protocols::policy::Catalog;

use crate::api::auth::Authenticator;
use crate::api::limit::Limiter;
use crate::api::problem::Problem;
use crate::audit::key::AuditKey;
use crate::config::HubConfig;
use crate::store::jetstream::JetStreamStore;
use crate::store::{StoreError, StoreReader};

/// The store the API reads, as the running hub has it.
#[derive(Debug, Clone)]
pub enum ApiStore {
    /// `<data_dir>/hub.db`: read through a read-only connection per request,
    /// written (policy apply) through an admin connection, as the verbs do.
    Sqlite(PathBuf),
    /// The JetStream store the replica runs on.
    JetStream(Box<JetStreamStore>),
}

impl ApiStore {
    /// The same store, as authentication reads it.
    pub fn auth_store(&self, key: &AuditKey) -> crate::api::auth::AuthStore {
        match self {
            ApiStore::Sqlite(p) => crate::api::auth::AuthStore::sqlite(p.clone(), key.clone()),
            ApiStore::JetStream(js) => {
                crate::api::auth::AuthStore::jetstream(js.clone(), key.clone())
            }
        }
    }
}

/// The handlers' shared state (cheap to clone).
#[derive(Clone)]
pub struct ApiState {
    /// The hub's config.
    pub cfg: Arc<HubConfig>,
    /// The store.
    pub store: ApiStore,
    /// The hub's sinks and regions, for policy validation.
    pub catalog: Catalog,
    /// Who is calling.
    pub auth: Authenticator,
    /// The per-caller rate limit.
    pub limiter: Arc<Limiter>,
    /// The key that signs the audit entries the API appends.
    pub key: AuditKey,
    /// What the running hub counts of its commits and deliveries.
    pub kpis: Arc<crate::kpis::Kpis>,
}

impl ApiState {
    /// The state for the hub configured by `cfg`, on `store`, with its
    /// authenticator (built by [`ApiStore::auth_store`]'s store).
    pub fn new(cfg: &HubConfig, store: ApiStore, auth: Authenticator, key: AuditKey) -> ApiState {
        ApiState {
            key,
            catalog: crate::policy::catalog(cfg),
            auth,
            limiter: Arc::new(Limiter::new(cfg.api.rate, cfg.api.burst)),
            cfg: Arc::new(cfg.clone()),
            store,
            kpis: Arc::new(crate::kpis::Kpis::new(crate::clock::unix_now().0)),
        }
    }

    /// The same, reading the KPIs of the running hub's store handle.
    pub fn with_kpis(mut self, kpis: Arc<crate::kpis::Kpis>) -> ApiState {
        self.kpis = kpis;
        self
    }

    /// The SQLite store's file; a 501 problem naming `what` on JetStream.
    pub fn sqlite(&self, what: &str) -> Result<&Path, Problem> {
        match &self.store {
            ApiStore::Sqlite(p) => Ok(p),
            ApiStore::JetStream(_) => Err(Problem::not_on_store(what, "jetstream")),
        }
    }

    /// Runs `f` on a read-only connection to the SQLite store, on the
    /// blocking pool (a query must not hold up the runtime's threads).
    pub async fn read<T, F>(&self, what: &str, f: F) -> Result<T, Problem>
    where
        T: Send + 'static,
        F: FnOnce(&StoreReader) -> Result<T, Problem> + Send + 'static,
    {
        let path = self.sqlite(what)?.to_owned();
        blocking(move || {
            let reader = StoreReader::open(&path).map_err(store_problem)?;
            f(&reader)
        })
        .await
    }
}

/// Runs `f` on the blocking pool.
pub async fn blocking<T, F>(f: F) -> Result<T, Problem>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, Problem> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Problem::internal(format!("the query's task failed: {e}")))?
}

/// A store failure as a problem: 503 while the store does not exist yet
/// (nothing stored), 500 otherwise.
pub fn store_problem(e: StoreError) -> Problem {
    match e {
        StoreError::NotFound { .. } => Problem::new(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "store-not-ready",
            "Store not ready",
            e.to_string(),
        ),
        other => Problem::internal(other.to_string()),
    }
}
