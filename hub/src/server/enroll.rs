//! A connection on the enrollment ALPN (`outpost-enroll/1`): one request,
//! one answer, then close. The device has no certificate yet; the attempt
//! is limited per address before anything is read, and the whole exchange
//! has a deadline, so an unauthenticated peer holds nothing for long.

use std::sync::Arc;
use std::time::Duration;

use outpost_protocols::enroll::{Answer, HubEnrollment, RefusalCode};
use tokio_util::sync::CancellationToken;
use tracing::{info_span, warn, Instrument as _};

use crate::enroll::service::Enroller;

/// The longest an enrollment connection may take, from the handshake to the
/// answer.
const DEADLINE: Duration = Duration::from_secs(20);
/// How long the answer is given to reach the device before the close.
const LINGER: Duration = Duration::from_secs(2);

/// Serves one enrollment connection until it is answered, the deadline
/// passes, or the hub stops.
pub(super) async fn enrollment(
    conn: quinn::Connection,
    enroller: Arc<Enroller>,
    stop: CancellationToken,
) {
    let remote = conn.remote_address();
    let span = info_span!("enroll", %remote);
    async move {
        tokio::select! {
            () = stop.cancelled() => {}
            r = tokio::time::timeout(DEADLINE, exchange(&conn, &enroller)) => match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "Enrollment connection ended."),
                Err(_) => warn!("Enrollment connection timed out."),
            },
        }
        let _ = tokio::time::timeout(LINGER, conn.closed()).await;
        conn.close(quinn::VarInt::from_u32(0), b"");
    }
    .instrument(span)
    .await;
}

#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("{0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("{0}")]
    Read(#[from] quinn::ReadError),
    #[error("{0}")]
    Write(#[from] quinn::WriteError),
    #[error("{0}")]
    Closed(#[from] quinn::ClosedStream),
}

async fn exchange(conn: &quinn::Connection, enroller: &Enroller) -> Result<(), ExchangeError> {
    let remote = conn.remote_address();
    let (mut send, mut recv) = conn.accept_bi().await?;
    let mut session = HubEnrollment::new();
    let answer = if !enroller.allow(remote) {
        enroller
            .refuse(
                "-",
                RefusalCode::RateLimited,
                "too many enrollment attempts from this address; wait a minute".into(),
                remote,
            )
            .await
    } else {
        let mut buf = vec![0u8; 8192];
        let request = loop {
            match recv.read(&mut buf).await? {
                Some(n) => match session.push(buf.get(..n).unwrap_or_default()) {
                    Ok(Some(request)) => break Ok(request),
                    Ok(None) => {}
                    Err(e) => break Err(e),
                },
                // The stream ended before a whole request.
                None => {
                    break Err(session.finish().err().unwrap_or(
                        outpost_protocols::enroll::EnrollError::Truncated("before its request"),
                    ))
                }
            }
        };
        match request {
            Ok(request) => enroller.enroll(request, remote).await,
            Err(e) => enroller.refuse("-", e.code(), e.to_string(), remote).await,
        }
    };
    if let Answer::Refused { code, .. } = &answer {
        tracing::debug!(code = code.name(), "Answering with a refusal.");
    }
    send.write_all(&session.answer(answer)).await?;
    send.finish()?;
    Ok(())
}
