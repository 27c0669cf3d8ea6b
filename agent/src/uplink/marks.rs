//! The hub's marks applied to the outbox: the watermark of `Welcome`, a
//! `Stored` beyond what this outbox assigned, and the deletes an `Ack`
//! allows; each counted in the metrics.

use outpost_protocols::Seq;
use tracing::warn;

use crate::metrics::Metrics;
use crate::outbox::{OutboxError, OutboxHandle, Resumed};

/// Applies the hub's watermark: deletes what the hub holds or, when the
/// hub holds seqs this outbox never assigned, renumbers what waits here
/// to follow them (see `Outbox::resume_after`), and says so loudly.
pub(super) async fn resume(
    outbox: &OutboxHandle,
    metrics: &Metrics,
    watermark: Seq,
) -> Result<(), OutboxError> {
    let resumed = outbox.resume_after(watermark).await?;
    count(metrics, watermark, resumed);
    Ok(())
}

/// Applies the hub's `Stored` mark beyond every seq this outbox assigned
/// (see `Outbox::follow`), and says so loudly.
pub(super) async fn follow(
    outbox: &OutboxHandle,
    metrics: &Metrics,
    held: Seq,
) -> Result<(), OutboxError> {
    let resumed = outbox.follow(held).await?;
    count(metrics, held, resumed);
    Ok(())
}

/// Counts what a finished delete removed.
pub(super) fn deleted(
    metrics: &Metrics,
    result: Result<u64, OutboxError>,
) -> Result<(), OutboxError> {
    metrics.uplink_acked.inc_by(result?);
    Ok(())
}

/// Counts what applying the hub's mark `hub` did to the outbox.
fn count(metrics: &Metrics, hub: Seq, resumed: Resumed) {
    match resumed {
        Resumed::Acked { deleted } => {
            metrics.uplink_acked.inc_by(deleted);
        }
        Resumed::Renumbered {
            renumbered,
            last_before,
            last,
        } => {
            warn!(
                hub_seq = hub.0,
                outbox_last = last_before.0,
                renumbered,
                new_last = last.0,
                "The hub holds seqs this outbox never assigned (a new, wiped or restored \
                 data directory under this agent id): the waiting events were renumbered to \
                 follow the hub's, so none is lost. Events delivered before a restored \
                 backup was taken may arrive twice."
            );
            metrics.outbox_renumbered.inc_by(renumbered);
        }
    }
}
