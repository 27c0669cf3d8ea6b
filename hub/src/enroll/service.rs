//! One enrollment attempt, checked and answered: the order of the checks is
//! what keeps a bad attempt from spending a token or issuing anything.
//!
//! ```text
//! enabled ([enroll] ca_dir)?        no  -> disabled
//! the CSR (signature, P-256, names) bad -> csr_invalid | csr_for_another_id
//! take the token, atomically        no  -> token_unknown | _used | _expired
//!                                          | _revoked | _for_another_agent
//! sign (ca::issue_from_csr)         err -> internal (the token is spent)
//! record serial, fingerprint, labels, audit enroll.used
//!                                   err -> internal (nothing delivered)
//! answer Issued{cert, ca}
//! ```
//!
//! Every refusal is audited (`enroll.refused`, with the code, the reason and
//! the remote address) except `rate_limited`, which an unauthenticated peer
//! could otherwise turn into an audit log of its own; those are logged.

use std::path::{Path, PathBuf};

use outpost_protocols::enroll::{Answer, RefusalCode, Request};
use outpost_protocols::AgentId;
use tracing::{info, warn};

use super::limiter::Limiter;
use super::tokens::{TokenError, Tokens};
use crate::audit::key::AuditKey;
use crate::ca::{self, CaError, Validity};
use crate::clock;
use crate::config::{HubConfig, StoreKind};
use crate::store::jetstream::JetStreamStoreConfig;
use crate::store::{store_path, TokenRefusal};

/// Where the tokens are, opened when first needed (a replica's JetStream
/// connection for tokens is made only if a device enrolls).
#[derive(Debug)]
enum Source {
    Ready(Tokens),
    JetStream {
        cfg: Box<JetStreamStoreConfig>,
        base: PathBuf,
        key: AuditKey,
        opened: tokio::sync::OnceCell<Tokens>,
    },
}

/// The hub's enrollment: its CA, the validity it issues, where tokens are,
/// and the attempts per address.
#[derive(Debug)]
pub struct Enroller {
    ca_dir: Option<PathBuf>,
    validity: Validity,
    source: Source,
    limiter: Limiter,
}

impl Enroller {
    /// The enrollment `cfg` describes; relative paths are taken from `base`
    /// (the config file's folder).
    /// `key` signs the `enroll.*` audit entries (the hub's audit key).
    #[must_use]
    pub fn new(cfg: &HubConfig, base: &Path, key: AuditKey) -> Enroller {
        // Either key names the CA the hub signs with, for enrollments and
        // renewals alike.
        let ca_dir = cfg
            .enroll
            .ca_dir
            .as_ref()
            .or(cfg.hub.ca_dir.as_ref())
            .map(|d| base.join(d));
        let validity = cfg
            .enroll
            .validity_days
            .and_then(|d| Validity::days(d).ok())
            .unwrap_or(Validity::LEAF_DEFAULT);
        let source = match &cfg.store {
            StoreKind::Sqlite { .. } => {
                // `store_path` takes the config file; any name in `base` will do.
                Source::Ready(Tokens::Sqlite(
                    store_path(&base.join("hub.toml"), &cfg.hub.data_dir),
                    key.clone(),
                ))
            }
            StoreKind::JetStream(js) => Source::JetStream {
                cfg: js.clone(),
                base: base.to_owned(),
                key: key.clone(),
                opened: tokio::sync::OnceCell::new(),
            },
        };
        Enroller {
            ca_dir,
            validity,
            source,
            limiter: Limiter::new(),
        }
    }

    /// Whether the hub enrolls devices (`[enroll] ca_dir` is set).
    #[must_use]
    pub fn enabled(&self) -> bool {
        self.ca_dir.is_some()
    }

    /// Whether `remote` may make another attempt now (and counts it).
    pub fn allow(&self, remote: std::net::SocketAddr) -> bool {
        self.limiter.allow(remote.ip(), clock::now())
    }

    async fn tokens(&self) -> Result<&Tokens, TokenError> {
        match &self.source {
            Source::Ready(tokens) => Ok(tokens),
            Source::JetStream {
                cfg,
                base,
                key,
                opened,
            } => {
                opened
                    .get_or_try_init(|| async {
                        let js = crate::store::jetstream::JetStreamStore::open(cfg, base).await?;
                        Ok::<_, TokenError>(Tokens::JetStream(Box::new(js), key.clone()))
                    })
                    .await
            }
        }
    }

    /// A refusal, audited (except `rate_limited`) and logged.
    pub async fn refuse(
        &self,
        agent_id: &str,
        code: RefusalCode,
        reason: String,
        remote: std::net::SocketAddr,
    ) -> Answer {
        warn!(%remote, agent_id, code = code.name(), %reason, "Enrollment refused.");
        if code != RefusalCode::RateLimited {
            let detail = format!("{}: {reason} (from {remote})", code.name());
            match self.tokens().await {
                Ok(t) => {
                    if let Err(e) = t.refused(agent_id, &detail).await {
                        warn!(error = %e, "Cannot audit a refused enrollment.");
                    }
                }
                Err(e) => warn!(error = %e, "Cannot audit a refused enrollment."),
            }
        }
        Answer::Refused { code, reason }
    }

    /// Answers one valid request from `remote`.
    pub async fn enroll(&self, request: Request, remote: std::net::SocketAddr) -> Answer {
        let id = request.agent_id.clone();
        let Some(ca_dir) = self.ca_dir.clone() else {
            return self
                .refuse(
                    id.as_str(),
                    RefusalCode::Disabled,
                    "this hub does not enroll devices ([enroll] ca_dir is not set)".into(),
                    remote,
                )
                .await;
        };
        if let Err(e) = ca::verify_csr(&request.csr_der, &id) {
            let (code, reason) = csr_refusal(&e);
            return self.refuse(id.as_str(), code, reason, remote).await;
        }
        let tokens = match self.tokens().await {
            Ok(t) => t,
            Err(e) => return self.internal(&id, &e, remote).await,
        };
        let from = remote.to_string();
        let rec = match tokens
            .take(&request.token, &id, &from, clock::unix_now())
            .await
        {
            Ok(Ok(rec)) => rec,
            Ok(Err(why)) => {
                let (code, reason) = token_refusal(why);
                return self.refuse(id.as_str(), code, reason.into(), remote).await;
            }
            Err(e) => return self.internal(&id, &e, remote).await,
        };
        let (validity, csr, who) = (self.validity, request.csr_der, id.clone());
        let dir = ca_dir.clone();
        let issued = tokio::task::spawn_blocking(move || {
            let issued = ca::issue_from_csr(&dir, &csr, &who, validity)?;
            let ca_pem =
                std::fs::read_to_string(dir.join(ca::CA_CERT)).map_err(|source| CaError::Read {
                    path: dir.join(ca::CA_CERT),
                    source,
                })?;
            Ok::<_, CaError>((issued, ca_pem))
        })
        .await;
        let (issued, ca_pem) = match issued {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return self.internal(&id, &e, remote).await,
            Err(e) => return self.internal(&id, &e, remote).await,
        };
        let detail = format!(
            "token {}, certificate serial {} sha256 {} until {}, from {remote}",
            rec.id(),
            issued.serial_hex,
            issued.fingerprint_sha256_hex,
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH
                    + std::time::Duration::from_secs(
                        u64::try_from(issued.not_after.unix_timestamp()).unwrap_or(0)
                    )
            )
        );
        if let Err(e) = tokens
            .complete(
                &rec,
                &id,
                &issued.serial_hex,
                &issued.fingerprint_sha256_hex,
                &detail,
                clock::unix_now(),
            )
            .await
        {
            return self.internal(&id, &e, remote).await;
        }
        info!(agent_id = %id, %remote, serial = %issued.serial_hex, "Device enrolled.");
        Answer::Issued {
            cert_pem: issued.pem,
            ca_pem,
        }
    }

    async fn internal(
        &self,
        id: &AgentId,
        e: &(dyn std::error::Error + Send + Sync),
        remote: std::net::SocketAddr,
    ) -> Answer {
        warn!(agent_id = %id, %remote, error = %e, "Enrollment failed at the hub.");
        self.refuse(
            id.as_str(),
            RefusalCode::Internal,
            "the hub failed to issue the certificate (see the hub's log)".into(),
            remote,
        )
        .await
    }
}

/// The refusal for a CSR the CA will not sign.
fn csr_refusal(e: &CaError) -> (RefusalCode, String) {
    match e {
        CaError::CsrForAnotherId { .. } => (RefusalCode::CsrForAnotherId, e.to_string()),
        _ => (RefusalCode::CsrInvalid, e.to_string()),
    }
}

/// The refusal for a token that cannot be used.
fn token_refusal(why: TokenRefusal) -> (RefusalCode, &'static str) {
    match why {
        TokenRefusal::Unknown => (RefusalCode::TokenUnknown, "no such token"),
        TokenRefusal::Used => (
            RefusalCode::TokenUsed,
            "this token was used already; create a new one with `outpost-hub enroll create`",
        ),
        TokenRefusal::Expired => (
            RefusalCode::TokenExpired,
            "this token expired; create a new one with `outpost-hub enroll create`",
        ),
        TokenRefusal::Revoked => (RefusalCode::TokenRevoked, "this token was revoked"),
        TokenRefusal::ForAnotherAgent => (
            RefusalCode::TokenForAnotherAgent,
            "this token was made for another agent id",
        ),
    }
}
