//! The fleet policy at the outbox: what a source may store, and the buffer
//! limits the policy sets in place of the local `[outbox]` ones.
//!
//! The filter runs in the appending task, beside the writer's commits rather
//! than between them, so that JSON minimisation does not lengthen the
//! writer's critical path; the limits are applied by the writer, which owns
//! the [`Outbox`].

use std::sync::Arc;
use std::time::Duration;

use outpost_protocols::event::EventBody;
use outpost_protocols::policy::{Enforcer, Stage, Verdict};
use tokio::sync::watch;
use tracing::debug;

use super::store::{Eviction, Outbox};
use crate::metrics::Metrics;
use crate::policy::AgentPolicy;

/// The fleet policy at the outbox: every append passes through it before it
/// is stored for upload ([`SourceFilter`], run by the appending task, so that
/// JSON minimisation runs beside the writer's commits rather than between
/// them), and its buffer limits replace the local ones (applied by the
/// writer, which owns the outbox).
pub struct PolicyGate {
    rx: watch::Receiver<Arc<AgentPolicy>>,
    metrics: Arc<Metrics>,
    /// The outbox limits of the local config, restored when a policy sets
    /// none.
    local: (u64, Option<Duration>, Eviction),
}

impl PolicyGate {
    /// A gate following `rx` (each policy carries the labels it selects
    /// by).
    pub fn new(mut rx: watch::Receiver<Arc<AgentPolicy>>, metrics: Arc<Metrics>) -> PolicyGate {
        // The first refresh applies the policy in force now.
        rx.mark_changed();
        PolicyGate {
            rx,
            metrics,
            local: (0, None, Eviction::DropOldest),
        }
    }

    /// Remembers `outbox`'s local limits (restored when a policy sets none)
    /// and makes the filter its handles run every append through.
    pub(super) fn attach(&mut self, outbox: &Outbox) -> SourceFilter {
        let c = outbox.config();
        self.local = (c.max_bytes, c.max_age, c.eviction);
        let mut rx = self.rx.clone();
        rx.mark_changed();
        SourceFilter {
            rx,
            metrics: self.metrics.clone(),
            enforcer: None,
        }
    }

    /// Picks up the buffer limits of a policy put in force since the last
    /// look.
    pub(super) fn refresh(&mut self, outbox: &mut Outbox) {
        if !self.rx.has_changed().unwrap_or(false) {
            return;
        }
        let p = self.rx.borrow_and_update().clone();
        let (max_bytes, max_age, eviction) = self.local;
        let limits = p.policy.buffer_for(&p.labels);
        let eviction_of = |e: &str| match e {
            "refuse-new" => Eviction::RefuseNew,
            _ => Eviction::DropOldest,
        };
        outbox.set_limits(
            limits.and_then(|l| l.max_bytes).unwrap_or(max_bytes),
            limits.and_then(|l| l.max_age).or(max_age),
            limits
                .and_then(|l| l.eviction.as_deref())
                .map_or(eviction, eviction_of),
        );
        self.metrics
            .policy_version
            .set(i64::try_from(p.version.0).unwrap_or(i64::MAX));
        debug!(
            policy_version = p.version.0,
            rules = p.compiled.rules(),
            "The outbox enforces the policy."
        );
    }
}

/// The part of the policy every append passes through, shared by the
/// handles of one writer.
#[derive(Debug)]
pub(super) struct SourceFilter {
    rx: watch::Receiver<Arc<AgentPolicy>>,
    metrics: Arc<Metrics>,
    enforcer: Option<Enforcer>,
}

impl SourceFilter {
    /// Drops and minimises `bodies` as the policy in force says.
    pub(super) fn filter(&mut self, bodies: &mut Vec<EventBody>) {
        self.metrics.kpi.events_received.inc_by(bodies.len() as u64);
        if self.rx.has_changed().unwrap_or(false) {
            let p = self.rx.borrow_and_update().clone();
            self.enforcer = (!p.is_permissive()).then(|| Enforcer::new(p.compiled.clone()));
        }
        let Some(enforcer) = &mut self.enforcer else {
            return;
        };
        let metrics = &self.metrics;
        bodies.retain_mut(|b| match enforcer.apply(b, Stage::Ingest) {
            Verdict::Keep { modified, .. } => {
                if modified {
                    metrics.policy_modified.inc();
                }
                true
            }
            Verdict::Drop(reason) => {
                metrics.policy_dropped(reason.name(), 1);
                false
            }
        });
    }
}
