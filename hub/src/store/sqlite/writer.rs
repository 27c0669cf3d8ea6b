//! The SQLite store as the group commit's backend: a group of writes (inserts
//! and registry changes, from any number of agents) is ONE transaction of
//! [`Store::apply`], answered only once it has committed.
//!
//! The grouping itself is `outpost_storage`'s. What is the store's own: a
//! write the store would refuse (a seq out of range, a batch that does not
//! follow what the store holds) is answered alone before the transaction,
//! so that one agent's bad batch cannot fail the others'; a read
//! ([`StoreHandle::watermark`]) ends a group only when the group writes to
//! the same agent, and is otherwise answered at once; the sink runners and
//! waiting sessions are signalled after each commit.

use outpost_protocols::event::{AgentId, Seq};
use outpost_storage::Backend;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::store::{Op, Store};
use crate::clock;
use crate::store::error::StoreError;
use crate::store::handle::{
    self, InsertOutcome, OrderCheck, Read, Signals, StoreHandle, Write, WriterOptions,
};

/// Starts the group-commit writer for `store` on tokio's blocking pool.
///
/// On shutdown (the token cancelled, or every handle dropped) the writer
/// commits what it has received, answers every request, and the join handle
/// yields the [`Store`] back. Requests sent after that fail with
/// [`StoreError::Closed`]. Must be called inside a tokio runtime.
pub fn spawn_store_writer(
    store: Store,
    opts: WriterOptions,
    shutdown: CancellationToken,
) -> (StoreHandle, JoinHandle<Result<Store, StoreError>>) {
    let (handle, rx, done) = handle::channel(shutdown);
    let backend = SqliteWriter {
        store,
        signals: handle.signals(),
    };
    let join = outpost_storage::spawn(backend, opts, rx, done);
    (handle, join)
}

struct SqliteWriter {
    store: Store,
    signals: Signals,
}

impl SqliteWriter {
    fn read(&self, read: Read) {
        match read {
            Read::Watermark { agent_id, reply } => {
                let _ = reply.send(self.store.watermark(&agent_id));
            }
            Read::Acked { agent_id, reply } => {
                let _ = reply.send(self.store.acked(&agent_id));
            }
            Read::Resume { agent_id, reply } => {
                let _ = reply.send(resume(&self.store, &agent_id));
            }
            Read::Labels { agent_id, reply } => {
                let _ = reply.send(self.store.labels(&agent_id));
            }
            Read::Binding { agent_id, reply } => {
                let _ = reply.send(self.store.binding(&agent_id));
            }
        }
    }
}

fn resume(store: &Store, agent_id: &AgentId) -> Result<(Seq, Seq), StoreError> {
    Ok((store.watermark(agent_id)?, store.acked(agent_id)?))
}

impl Backend for SqliteWriter {
    type Write = Write;
    type Call = Read;
    type Outcome = Option<InsertOutcome>;
    type Error = StoreError;
    type Output = Result<Store, StoreError>;

    fn weight(write: &Write) -> usize {
        write.events()
    }

    /// A write the store would refuse (a seq out of range) and a batch that
    /// does not follow what the store holds, or what an earlier write of
    /// this group will hold once committed.
    fn admit(&mut self, group: &[Write]) -> Vec<(usize, StoreError)> {
        let mut refused = Vec::new();
        let mut order = OrderCheck::default();
        for (i, w) in group.iter().enumerate() {
            let verdict = self.store.check(&op(w)).and_then(|()| match w {
                Write::Insert {
                    agent_id,
                    after,
                    through,
                    ..
                } => match order.known(agent_id) {
                    Some(s) => Ok(s),
                    None => self.store.watermark(agent_id),
                }
                .and_then(|s| order.admit(agent_id, *after, *through, s)),
                _ => Ok(()),
            });
            if let Err(e) = verdict {
                warn!(error = %e, "Hub store refused a request.");
                refused.push((i, e));
            }
        }
        refused
    }

    fn commit(&mut self, group: &[Write]) -> Result<Vec<Option<InsertOutcome>>, StoreError> {
        let ops: Vec<Op<'_>> = group.iter().map(op).collect();
        match self.store.apply(clock::unix_now(), &ops) {
            Ok(outcomes) => {
                let (inserted, duplicates) = outcomes
                    .iter()
                    .flatten()
                    .fold((0, 0), |(i, d), o| (i + o.inserted, d + o.duplicates));
                debug!(
                    requests = group.len(),
                    inserted, duplicates, "Hub store group committed."
                );
                self.signals.committed(group);
                Ok(outcomes)
            }
            Err(e) => {
                // Nothing of the group was committed, so every request fails
                // and no session acknowledges anything; the writer keeps
                // serving, since the cause (a full disk) may pass.
                warn!(requests = group.len(), error = %e, "Hub store group commit failed.");
                Err(e)
            }
        }
    }

    fn answer(write: Write, result: Result<Option<InsertOutcome>, StoreError>) {
        write.answer(result);
    }

    /// A watermark is read from what is committed. Unless the open group
    /// writes to the same agent (then the read waits for the commit,
    /// keeping the queue's order), answering it now gives the same result,
    /// and keeps a thousand agents connecting at once from splitting the
    /// groups into a transaction (and an fsync) each.
    fn call_in_group(&mut self, read: Read, group: &[Write]) -> Option<Read> {
        if group.iter().any(|w| w.touches(read.agent_id())) {
            return Some(read);
        }
        self.read(read);
        None
    }

    fn call(&mut self, read: Read) {
        self.read(read);
    }

    fn stopping(&mut self) {
        debug!("Hub store writer shutting down.");
    }

    fn finish(self) -> Result<Store, StoreError> {
        debug!(
            transactions = self.store.transactions(),
            "Hub store writer stopped."
        );
        Ok(self.store)
    }
}

/// The SQLite change a write stands for.
fn op(write: &Write) -> Op<'_> {
    match write {
        Write::Insert {
            agent_id,
            events,
            forward,
            through,
            policy,
            ..
        } => Op::Insert {
            agent_id,
            events,
            forward,
            through: *through,
            policy: *policy,
        },
        Write::SinkProgress { sink, progress, .. } => Op::SinkProgress { sink, progress },
        Write::PolicyStatus {
            agent_id,
            version,
            error,
            ..
        } => Op::PolicyStatus {
            agent_id,
            version: *version,
            error: error.as_deref(),
        },
        Write::Connected {
            agent_id,
            labels,
            agent_version,
            protocol_version,
            ..
        } => Op::Connected {
            agent_id,
            labels,
            agent_version,
            protocol_version: *protocol_version,
        },
        Write::Disconnected { agent_id, .. } => Op::Disconnected { agent_id },
        Write::Backlog {
            agent_id,
            events,
            bytes,
            ..
        } => Op::Backlog {
            agent_id,
            events: *events,
            bytes: *bytes,
        },
        Write::Touch { agent_id, .. } => Op::Touch { agent_id },
        Write::Bind {
            agent_id,
            cert,
            how,
            ..
        } => Op::Bind {
            agent_id,
            cert,
            how,
        },
        Write::CertRefused {
            agent_id,
            fingerprint,
            reason,
            ..
        } => Op::CertRefused {
            agent_id,
            fingerprint,
            reason,
        },
    }
}
