//! The hub's enforcement of the policy on what an agent sends, because the
//! agent may be old or compromised: the policy in force compiled for the
//! agent's labels, applied again to every batch, and the agent's `hold` rate
//! paced here. Whether the policy is pushed to the agent is the session's
//! decision; this module only hands it the agent's part of the version in
//! force: the rules its labels select, with the keys derived for those
//! that hash (`Policy::scoped_text`), never the fleet's whole document.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_protocols::policy::{Catalog, Enforcer, Over, Stage, Verdict, STORE_SINK};
use outpost_protocols::wire::HubSession;
use outpost_protocols::{EventBody, Seq};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::policy::FleetPolicy;
use crate::store::{Forward, PolicyCounts};
use crate::trust::TrustView;

/// The policy in force, the agents' standing (revocations, and when their
/// labels change) and the sinks the policy is enforced against, for every
/// session.
#[derive(Debug, Clone)]
pub struct PolicyFeed {
    /// The version in force, replaced when an operator applies another.
    pub current: watch::Receiver<Arc<FleetPolicy>>,
    /// Which agents are revoked; a new view whenever an operator changes
    /// labels or revocations.
    pub trust: watch::Receiver<Arc<TrustView>>,
    /// The hub's sinks and their regions.
    pub catalog: Catalog,
    /// The commands table (SQLite store), whose commands each session
    /// delivers to its agent; `None` on a store without commands.
    pub commands: Option<Arc<crate::commands::CommandStore>>,
}

impl PolicyFeed {
    /// No policy and no revocation, ever: for tests of the ingest alone.
    pub fn none(catalog: Catalog) -> PolicyFeed {
        let (tx, current) = watch::channel(Arc::new(FleetPolicy::none()));
        let (trust_tx, trust) = watch::channel(Arc::new(TrustView::empty()));
        // A receiver outlives its sender: it keeps the last value.
        drop((tx, trust_tx));
        PolicyFeed {
            current,
            trust,
            catalog,
            commands: None,
        }
    }
}

/// The longest the hub holds one batch of an agent above its `hold` rate:
/// well under the agent's 30 s idle timeout, since the session sends nothing
/// meanwhile, and the batches of an agent that keeps to its rate are a
/// second's worth anyway.
const MAX_HOLD: Duration = Duration::from_secs(10);

/// The hub's enforcement for one session: the policy in force compiled for
/// the agent's labels, and how much of its `hold` rate is used.
pub(super) struct Enforcement {
    catalog: Catalog,
    labels: BTreeMap<String, String>,
    /// Whether the registry's labels are known (after `Hello`): nothing is
    /// offered to the session before.
    labelled: bool,
    current: Arc<FleetPolicy>,
    enforcer: Enforcer,
    /// Until when the agent's `hold` rate is used up. A batch above it waits
    /// before it is stored and acknowledged, and nothing more is read
    /// meanwhile, so QUIC flow control slows the agent and the events wait
    /// in its outbox, as the policy says, even if the agent ignores it.
    hold_until: Option<Instant>,
}

impl Enforcement {
    pub(super) fn new(current: Arc<FleetPolicy>, catalog: Catalog) -> Enforcement {
        let labels = BTreeMap::new();
        let enforcer = Enforcer::new(Arc::new(current.policy.compile(&labels, &catalog)));
        Enforcement {
            catalog,
            labels,
            labelled: false,
            current,
            enforcer,
            hold_until: None,
        }
    }

    /// Charges a batch of `events` events and `bytes` payload bytes to the
    /// agent's `hold` rate, if it has one, and returns until when the batch
    /// must wait before it is stored (a leaky bucket with one second of
    /// burst; never longer than [`MAX_HOLD`]).
    pub(super) fn pace(&mut self, events: usize, bytes: usize, now: Instant) -> Option<Instant> {
        let rate = self
            .enforcer
            .compiled()
            .agent_rate()
            .filter(|r| r.over == Over::Hold)?;
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

    /// Why the policy in force no longer grants `command` to this agent,
    /// if it does not: a command authorised when it was sent may wait while
    /// an operator takes the grant back.
    pub(super) fn refuses(
        &self,
        command: &outpost_protocols::wire::command::CommandRequest,
    ) -> Option<String> {
        use outpost_protocols::policy::Command as Grant;
        use outpost_protocols::wire::command::Action;
        let target = command.action.target();
        let grant = match &command.action {
            Action::Write { .. } => Grant::Write(target),
            Action::Publish { .. } => Grant::Publish(target),
            _ => Grant::Read(target),
        };
        (!self
            .current
            .policy
            .authorize(&command.role, &self.labels, grant))
        .then(|| {
            format!(
                "the policy in force at delivery (version {}) grants role {:?} no {} of {target} on this agent",
                self.current.version.0,
                command.role,
                command.action.kind()
            )
        })
    }

    /// The version in force.
    pub(super) fn version(&self) -> u64 {
        self.current.version.0
    }

    /// The registry's labels of the agent (never what its `Hello` states):
    /// the policy in force is compiled for them, and the agent's part of it
    /// handed to the session.
    pub(super) fn set_labels(
        &mut self,
        labels: BTreeMap<String, String>,
        session: &mut HubSession,
    ) {
        self.labels = labels;
        self.labelled = true;
        self.recompile();
        self.offer(session);
    }

    /// The labels the policy is compiled for.
    pub(super) fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    /// An operator applied another version: it is compiled for the agent's
    /// labels and handed to the session.
    pub(super) fn replace(&mut self, current: Arc<FleetPolicy>, session: &mut HubSession) {
        self.current = current;
        self.recompile();
        self.offer(session);
    }

    /// Compiles the policy in force for the agent's labels.
    fn recompile(&mut self) {
        let compiled = self.current.policy.compile(&self.labels, &self.catalog);
        self.enforcer = Enforcer::new(Arc::new(compiled));
    }

    /// Hands the agent's part of the policy in force to the session, which
    /// decides whether and when to push it.
    fn offer(&self, session: &mut HubSession) {
        if !self.labelled {
            return;
        }
        let version = self.current.version.0;
        let text = match self
            .current
            .policy
            .scoped_text(&self.current.text, &self.labels)
        {
            Ok(text) => text,
            Err(e) => {
                warn!(policy_version = version, error = %e, "Cannot make the agent's part of the policy; it keeps the one it runs (the hub enforces this one).");
                return;
            }
        };
        if let Err(e) = session.set_policy(version, text) {
            debug!(error = %e, "Policy not pushed.");
        }
    }

    /// Applies the policy to a batch: what to store, what to queue for
    /// sinks, and what it did.
    pub(super) fn apply(
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
