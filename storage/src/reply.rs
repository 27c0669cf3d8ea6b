//! How a request reaches the writer and how its answer comes back.
//!
//! Every request carries a [`Reply`], the sending half of a one-shot
//! channel; the caller keeps the other half as a [`Pending`] future. The
//! writer answers through the reply exactly once (see [`crate::writer`]);
//! a reply dropped unanswered (the writer stopped, or panicked) resolves
//! the future to [`Stopped`], turned into the caller's own "closed" error,
//! so no caller waits forever and none takes silence for success.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::{mpsc, oneshot};

use crate::writer::Message;

/// The half of a request the writer answers through.
pub type Reply<T, E> = oneshot::Sender<Result<T, E>>;

/// The writer has stopped (shutdown, or every handle dropped), so the
/// request was not carried out. Each owner lifts it into its own error
/// (`OutboxError::Closed`, `StoreError::Closed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the writer has stopped")]
pub struct Stopped;

/// A request that was queued; await it for its outcome, which arrives once
/// the transaction that holds it has committed (or failed).
#[derive(Debug)]
#[must_use = "the outcome says whether and how the request was carried out"]
pub struct Pending<T, E>(oneshot::Receiver<Result<T, E>>);

impl<T, E> Pending<T, E> {
    /// A request's reply and the future that resolves with its answer.
    pub fn channel() -> (Reply<T, E>, Pending<T, E>) {
        let (reply, rx) = oneshot::channel();
        (reply, Pending(rx))
    }
}

impl<T, E: From<Stopped>> Future for Pending<T, E> {
    type Output = Result<T, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Err(E::from(Stopped))))
    }
}

/// Queues the request `make` builds around its reply and returns without
/// waiting for the answer; it waits only while the queue is full, which is
/// the backpressure that keeps a fast producer from filling memory. Fails
/// with [`Stopped`] once the writer no longer takes requests.
pub async fn send<W, C, T, E: From<Stopped>>(
    tx: &mpsc::Sender<Message<W, C>>,
    make: impl FnOnce(Reply<T, E>) -> Message<W, C>,
) -> Result<Pending<T, E>, E> {
    let (reply, pending) = Pending::channel();
    tx.send(make(reply)).await.map_err(|_| E::from(Stopped))?;
    Ok(pending)
}
