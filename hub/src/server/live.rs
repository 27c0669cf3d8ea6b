//! Which connection of each agent is current: a new one supersedes the old
//! and waits until the old one's commits are finished, so the watermark it
//! then reads from the store is never stale.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_protocols::AgentId;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::error::ConnError;

/// The longest a new connection waits for the one it supersedes.
const SUPERSEDE_WAIT: Duration = Duration::from_secs(30);

/// One agent's live connection: its number, how to stop it, and how to learn
/// that it has finished its commits.
struct LiveSession {
    number: u64,
    stop: CancellationToken,
    done: Arc<Notify>,
    finished: Arc<AtomicBool>,
}

/// The live connection of each agent, so a reconnect can supersede it.
#[derive(Default)]
pub(super) struct Live {
    sessions: Mutex<HashMap<AgentId, LiveSession>>,
    next: AtomicU64,
}

/// A connection's place in [`Live`], given back by [`Live::finish`].
pub(super) struct Registration {
    id: AgentId,
    number: u64,
    done: Arc<Notify>,
    finished: Arc<AtomicBool>,
}

impl Live {
    /// Makes the connection stopped by `stop` the live one of `id`: stops
    /// the previous one, if any, and waits (at most [`SUPERSEDE_WAIT`]) until
    /// its commits are done.
    pub(super) async fn take_over(
        &self,
        id: &AgentId,
        stop: &CancellationToken,
    ) -> Result<Registration, ConnError> {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let done = Arc::new(Notify::new());
        let finished = Arc::new(AtomicBool::new(false));
        let previous = self
            .sessions
            .lock()
            .map_err(|_| ConnError::Registry)?
            .insert(
                id.clone(),
                LiveSession {
                    number,
                    stop: stop.clone(),
                    done: done.clone(),
                    finished: finished.clone(),
                },
            );
        if let Some(old) = previous {
            info!("Superseding the agent's previous connection.");
            old.stop.cancel();
            // Created before the check: a notification after it is not lost.
            let wait = old.done.notified();
            if !old.finished.load(Ordering::Acquire) {
                let _ = tokio::time::timeout(SUPERSEDE_WAIT, wait).await;
            }
        }
        Ok(Registration {
            id: id.clone(),
            number,
            done,
            finished,
        })
    }

    /// Says the connection's commits are finished, waking a connection that
    /// waits to supersede it, and forgets it unless it was superseded.
    pub(super) fn finish(&self, registration: Registration) {
        registration.finished.store(true, Ordering::Release);
        registration.done.notify_waiters();
        if let Ok(mut map) = self.sessions.lock() {
            if map
                .get(&registration.id)
                .is_some_and(|s| s.number == registration.number)
            {
                map.remove(&registration.id);
            }
        }
    }
}
