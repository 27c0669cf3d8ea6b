//! Which certificate of an agent the hub accepts, and renewing it.
//!
//! The CA signs a certificate for any id it is asked to, so a valid
//! certificate alone does not make a connection that agent's: the registry
//! binds each agent to the fingerprint of one certificate (and the previous
//! one until `[hub] renew_grace` after a renewal). A certificate for a
//! registered id that is neither is refused with `certificate_not_current`
//! before it can supersede the live session. An agent with no binding yet
//! (a fleet from before bindings, a certificate made by `ca issue` without
//! `--config`) is bound to the certificate it first connects with: trust on
//! first use, documented in `docs/security.md`.
//!
//! Renewal signs the agent's request with the fleet CA (`[hub] ca_dir`) for
//! the id of the session's certificate, never for what the request names,
//! and binds the new certificate before the agent receives it, so the agent
//! never holds a certificate the hub would refuse.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use outpost_protocols::wire::Renewal;
use outpost_protocols::{AgentId, Timestamp};
use tracing::{debug, info, warn};

use crate::ca::{self, Validity};
use crate::clock;
use crate::store::{CertBinding, CertInfo, Rebind, StoreError, StoreHandle};

/// Warn about a certificate this close to its expiry.
pub(super) const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);

/// How often, at most, the expiry warning of one agent is logged.
const WARN_EVERY: Duration = Duration::from_secs(86_400);

/// How often, at most, one refused certificate is logged and audited.
const REFUSED_EVERY: Duration = Duration::from_secs(60);

/// What the handshake decides about a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The bound certificate.
    Current,
    /// The one before it, within its grace period.
    Previous,
    /// The agent has no binding yet: bind this one.
    FirstUse,
    /// Another certificate for a bound agent.
    NotCurrent,
}

/// Decides about `presented` for an agent bound as `binding`, at `now`.
pub(super) fn judge(
    binding: Option<&CertBinding>,
    presented: &CertInfo,
    now: Timestamp,
) -> Verdict {
    let Some(b) = binding else {
        return Verdict::FirstUse;
    };
    if b.current.fingerprint == presented.fingerprint {
        return Verdict::Current;
    }
    match &b.previous {
        Some((fingerprint, until)) if *fingerprint == presented.fingerprint && now < *until => {
            Verdict::Previous
        }
        _ => Verdict::NotCurrent,
    }
}

/// The hub's certificate settings and what it remembers between connections
/// to keep its logs quiet under a storm of them.
#[derive(Debug)]
pub(super) struct Certs {
    /// `[hub] ca_dir`, resolved; `None`: renewals are refused.
    ca_dir: Option<PathBuf>,
    /// `[hub] renew_days`.
    validity: Validity,
    /// `[hub] renew_grace`.
    grace: Duration,
    /// When each agent's expiry warning was last logged.
    warned: Mutex<HashMap<AgentId, Timestamp>>,
    /// When each refused (agent, fingerprint) was last logged and audited.
    refused: Mutex<HashMap<(AgentId, String), Timestamp>>,
}

/// Why a connection's certificate is not accepted.
#[derive(Debug, thiserror::Error)]
pub(super) enum BindingError {
    #[error("certificate sha256:{fingerprint} is not the one the registry binds to this agent")]
    NotCurrent { fingerprint: String },
    #[error("cannot read or write the certificate binding: {0}")]
    Store(#[from] StoreError),
}

fn ns(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

impl Certs {
    pub(super) fn new(ca_dir: Option<PathBuf>, validity: Validity, grace: Duration) -> Certs {
        Certs {
            ca_dir,
            validity,
            grace,
            warned: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
        }
    }

    /// Admits the certificate `presented` for `id`, binding it on first
    /// use, or refuses it (audited `cert.refused`, at most once a minute for
    /// the same certificate).
    pub(super) async fn admit(
        &self,
        store: &StoreHandle,
        id: &AgentId,
        presented: &CertInfo,
    ) -> Result<(), BindingError> {
        let now = clock::unix_now();
        let mut verdict = judge(store.binding(id.clone()).await?.as_ref(), presented, now);
        if verdict == Verdict::FirstUse {
            store
                .bind(id.clone(), presented.clone(), Rebind::FirstUse)
                .await?;
            // Another connection may have bound another certificate first.
            verdict = judge(store.binding(id.clone()).await?.as_ref(), presented, now);
            if verdict == Verdict::Current {
                info!(serial = %presented.serial, fingerprint = %presented.fingerprint, "Certificate bound to the agent on first use.");
            }
        }
        match verdict {
            Verdict::Current | Verdict::FirstUse => {}
            Verdict::Previous => {
                debug!(fingerprint = %presented.fingerprint, "The agent's previous certificate, within its grace period.");
            }
            Verdict::NotCurrent => {
                let key = (id.clone(), presented.fingerprint.clone());
                if due(&self.refused, key, now, REFUSED_EVERY) {
                    warn!(fingerprint = %presented.fingerprint, serial = %presented.serial, "Refused a certificate that is not the one bound to the agent; its live session, if any, goes on.");
                    store
                        .cert_refused(
                            id.clone(),
                            presented.fingerprint.clone(),
                            "not the certificate the registry binds to this agent".into(),
                        )
                        .await?;
                }
                return Err(BindingError::NotCurrent {
                    fingerprint: presented.fingerprint.clone(),
                });
            }
        }
        self.warn_if_expiring(id, presented.not_after, now);
        Ok(())
    }

    /// Logs a warning, once a day per agent, when its certificate expires
    /// within [`EXPIRY_WARNING`].
    fn warn_if_expiring(&self, id: &AgentId, not_after: Timestamp, now: Timestamp) {
        let left = not_after.0.saturating_sub(now.0);
        if left >= ns(EXPIRY_WARNING) || !due(&self.warned, id.clone(), now, WARN_EVERY) {
            return;
        }
        warn!(
            not_after = %crate::store::rfc3339(not_after),
            days_left = left / ns(Duration::from_secs(86_400)),
            "The agent's certificate expires within 30 days; it renews itself over its session if the hub has [hub] ca_dir, otherwise reissue it."
        );
    }

    /// Signs the renewal request `csr` of the agent `id`, whose session's
    /// certificate is `old`, binds the new certificate (audited
    /// `cert.renewed`), and says what to answer.
    pub(super) async fn renew(
        &self,
        store: &StoreHandle,
        id: &AgentId,
        old: &CertInfo,
        csr: Vec<u8>,
    ) -> Renewal {
        let Some(ca_dir) = self.ca_dir.clone() else {
            info!("The agent asked to renew its certificate, but [hub] ca_dir is not set.");
            return Renewal::Refused {
                reason: "certificate renewal is not configured at the hub ([hub] ca_dir)".into(),
            };
        };
        let (agent, validity) = (id.clone(), self.validity);
        let signed = tokio::task::spawn_blocking(move || {
            ca::issue_from_csr(&ca_dir, &csr, &agent, validity)
        })
        .await;
        let issued = match signed {
            Ok(Ok(issued)) => issued,
            Ok(Err(e)) => {
                warn!(error = %e, "Refused the agent's certificate renewal.");
                return Renewal::Refused {
                    reason: e.to_string(),
                };
            }
            Err(_) => {
                return Renewal::Refused {
                    reason: "the hub failed while signing".into(),
                }
            }
        };
        let cert = CertInfo {
            serial: issued.serial_hex.clone(),
            fingerprint: issued.fingerprint_sha256_hex.clone(),
            not_after: Timestamp(
                i64::try_from(issued.not_after.unix_timestamp_nanos()).unwrap_or(i64::MAX),
            ),
        };
        let grace_until = Timestamp(clock::unix_now().0.saturating_add(ns(self.grace)));
        let how = Rebind::Replace {
            grace_until,
            actor: Some("hub".into()),
        };
        if let Err(e) = store.bind(id.clone(), cert.clone(), how).await {
            warn!(error = %e, "Cannot record the renewed certificate; not handing it out.");
            return Renewal::Refused {
                reason: "the hub could not record the new certificate; try again later".into(),
            };
        }
        info!(old_serial = %old.serial, new_serial = %cert.serial, fingerprint = %cert.fingerprint, "Renewed the agent's certificate.");
        Renewal::Issued {
            cert_pem: issued.pem,
        }
    }
}

/// Whether `key` was not marked within `every` before `now`; marks it.
fn due<K: std::hash::Hash + Eq>(
    map: &Mutex<HashMap<K, Timestamp>>,
    key: K,
    now: Timestamp,
    every: Duration,
) -> bool {
    let Ok(mut map) = map.lock() else {
        return true;
    };
    if map.len() > 100_000 {
        // A storm of distinct certificates: forget rather than grow.
        map.clear();
    }
    match map.get(&key) {
        Some(last) if now.0.saturating_sub(last.0) < ns(every) => false,
        _ => {
            map.insert(key, now);
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(f: &str) -> CertInfo {
        CertInfo {
            serial: format!("s-{f}"),
            fingerprint: f.into(),
            not_after: Timestamp(1_000),
        }
    }

    #[test]
    fn only_the_bound_certificate_or_the_previous_within_grace_is_accepted() {
        let now = Timestamp(500);
        assert_eq!(judge(None, &cert("a"), now), Verdict::FirstUse);
        let bound = CertBinding {
            current: cert("b"),
            previous: Some(("a".into(), Timestamp(600))),
        };
        assert_eq!(judge(Some(&bound), &cert("b"), now), Verdict::Current);
        assert_eq!(judge(Some(&bound), &cert("a"), now), Verdict::Previous);
        assert_eq!(
            judge(Some(&bound), &cert("a"), Timestamp(600)),
            Verdict::NotCurrent,
            "not at the end of the grace period"
        );
        assert_eq!(judge(Some(&bound), &cert("c"), now), Verdict::NotCurrent);
        let unrenewed = CertBinding {
            current: cert("b"),
            previous: None,
        };
        assert_eq!(
            judge(Some(&unrenewed), &cert("a"), now),
            Verdict::NotCurrent
        );
    }

    #[test]
    fn warnings_and_refusals_are_logged_at_most_once_per_interval() {
        let map = Mutex::new(HashMap::new());
        let every = Duration::from_secs(60);
        let s = 1_000_000_000;
        assert!(due(&map, "a", Timestamp(0), every));
        assert!(!due(&map, "a", Timestamp(59 * s), every));
        assert!(due(&map, "b", Timestamp(59 * s), every));
        assert!(due(&map, "a", Timestamp(60 * s), every));
    }
}
