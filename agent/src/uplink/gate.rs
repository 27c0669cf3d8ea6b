//! The policy as the uplink applies it to what leaves: the stateless part
//! again (events stored under an older policy), and the agent's `hold` rate,
//! which paces sending while the events wait in the outbox.

use std::time::{Duration, Instant};

use outpost_protocols::policy::{
    DropReason, Enforcer, Over, PolicyVersion, Stage, TokenBucket, Verdict,
};
use outpost_protocols::EventBody;

use crate::clock;
use crate::policy::PolicyStore;

/// The policy as the uplink applies it to what leaves: the stateless part
/// again (events stored under an older policy), and a `hold` rate per agent,
/// which paces sending while the events wait in the outbox.
pub(super) struct SendGate {
    version: PolicyVersion,
    recheck: Option<Enforcer>,
    events: Option<TokenBucket>,
    bytes: Option<TokenBucket>,
    clock: Instant,
}

impl SendGate {
    pub(super) fn new(store: &PolicyStore) -> SendGate {
        let p = store.current();
        let hold = p.compiled.agent_rate().filter(|r| r.over == Over::Hold);
        SendGate {
            version: p.version,
            recheck: (!p.is_permissive()).then(|| Enforcer::new(p.compiled.clone())),
            events: hold.and_then(|r| r.events_per_sec.map(TokenBucket::new)),
            bytes: hold.and_then(|r| r.bytes_per_sec.map(TokenBucket::new)),
            clock: clock::now(),
        }
    }

    /// Follows the policy in force.
    pub(super) fn refresh(&mut self, store: &PolicyStore) {
        if store.current().version != self.version {
            *self = SendGate::new(store);
        }
    }

    /// Applies the policy in force again to an event stored under an older
    /// one: why it must not be sent, if it must not.
    pub(super) fn denies(&mut self, body: &mut EventBody) -> Option<DropReason> {
        match self.recheck.as_mut()?.apply(body, Stage::Recheck) {
            Verdict::Drop(reason) => Some(reason),
            Verdict::Keep { .. } => None,
        }
    }

    fn now(&self) -> i64 {
        i64::try_from(clock::elapsed(self.clock).as_nanos()).unwrap_or(i64::MAX)
    }

    /// How long until one more event of `size` bytes may be sent.
    pub(super) fn wait(&mut self, size: usize) -> Duration {
        let now = self.now();
        let e = self.events.as_mut().map_or(0, |b| b.wait(now, 1.0));
        let b = self.bytes.as_mut().map_or(0, |b| b.wait(now, size as f64));
        Duration::from_nanos(u64::try_from(e.max(b)).unwrap_or(0))
    }

    pub(super) fn take(&mut self, size: usize) {
        let now = self.now();
        if let Some(b) = &mut self.events {
            let _ = b.try_take(now, 1.0);
        }
        if let Some(b) = &mut self.bytes {
            let _ = b.try_take(now, size as f64);
        }
    }
}
