//! The agents' standing as the running hub sees it: which are revoked, and
//! a generation that moves whenever an operator changes an agent's labels or
//! revocation. The operator verbs write the store from another process (or,
//! on JetStream, another machine), so the hub polls the store's trust
//! generation and, when it moved, reads the revocations again and hands the
//! new view to every session: a revoked agent's session closes, and every
//! session reads its agent's labels again.
//!
//! Why a poll of one small value and not a watch of the registry: the
//! registry changes with every session and backlog report, so watching it
//! would wake every replica for nothing; the generation changes only when an
//! operator acts. A poll every [`POLL`] keeps the promise that a revoked
//! agent's live session is closed within 5 s, with room to spare.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use outpost_protocols::AgentId;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::jetstream::JetStreamStore;
use crate::store::{trust, Revocation, StoreError, StoreReader};

/// How often the hub reads the trust generation.
pub const POLL: Duration = Duration::from_secs(1);

/// Which agents are revoked, as of one trust generation.
#[derive(Debug, Clone, Default)]
pub struct TrustView {
    generation: u64,
    revoked: HashMap<AgentId, Revocation>,
}

impl TrustView {
    /// A view with nothing revoked, for hubs and tests without a store.
    pub fn empty() -> TrustView {
        TrustView::default()
    }

    /// The generation this view was read at.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// `agent_id`'s revocation, if it is revoked.
    pub fn revocation(&self, agent_id: &AgentId) -> Option<&Revocation> {
        self.revoked.get(agent_id)
    }
}

/// Where the trust generation and the revocations are.
#[derive(Debug, Clone)]
pub enum TrustSource {
    /// `<data_dir>/hub.db`.
    Sqlite(PathBuf),
    /// The JetStream store.
    JetStream(Box<JetStreamStore>),
}

impl TrustSource {
    async fn generation(&self) -> Result<u64, StoreError> {
        match self {
            TrustSource::Sqlite(path) => {
                on_sqlite(path, |r| trust::generation(r.connection(), r.path())).await
            }
            TrustSource::JetStream(js) => js.trust_generation().await,
        }
    }

    /// The view at the current generation. The generation is read first, so
    /// that a change made while the revocations are read raises it again
    /// and is read at the next poll.
    async fn read(&self) -> Result<TrustView, StoreError> {
        let generation = self.generation().await?;
        let revoked = match self {
            TrustSource::Sqlite(path) => {
                on_sqlite(path, |r| trust::revoked(r.connection(), r.path())).await?
            }
            TrustSource::JetStream(js) => js.revoked().await?,
        };
        Ok(TrustView {
            generation,
            revoked,
        })
    }
}

/// Runs `read` on a reader of the SQLite store at `path`, on the blocking
/// pool.
async fn on_sqlite<T: Send + 'static>(
    path: &Path,
    read: fn(&StoreReader) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || read(&StoreReader::open(&path)?))
        .await
        .map_err(|_| StoreError::Closed)?
}

/// Reads the view now and starts a task that publishes a new one whenever
/// the trust generation moves, until `shutdown`.
pub async fn watch(
    source: TrustSource,
    shutdown: CancellationToken,
) -> Result<(watch::Receiver<Arc<TrustView>>, tokio::task::JoinHandle<()>), StoreError> {
    let initial = source.read().await?;
    if !initial.revoked.is_empty() {
        info!(
            revoked = initial.revoked.len(),
            "Revoked agents are refused."
        );
    }
    let (tx, rx) = watch::channel(Arc::new(initial));
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let seen = tx.borrow().generation;
            let found = match source.generation().await {
                Ok(g) if g == seen => continue,
                Ok(_) => source.read().await,
                Err(e) => Err(e),
            };
            match found {
                Ok(view) => {
                    info!(
                        generation = view.generation,
                        revoked = view.revoked.len(),
                        "An operator changed agents' labels or revocations; applying it to live sessions."
                    );
                    tx.send_replace(Arc::new(view));
                }
                Err(e) => warn!(error = %e, "Cannot read the agents' revocations."),
            }
        }
    });
    Ok((rx, task))
}
