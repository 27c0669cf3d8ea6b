//! The hub's configuration: one TOML file, `OUTPOST_SECTION__KEY` overrides,
//! unknown keys refused.
//!
//! Loading happens in two steps, as the agent's: [`parse`] deserialises the
//! file into a [`RawConfig`] (unknown keys are errors, so a typo never
//! silently disables a feature), then [`RawConfig::validate`] checks every
//! rule that needs no file and no server and returns a [`HubConfig`], whose
//! kinds are enums ([`StoreKind`]) so that every use is an exhaustive match.
//! Each component owns its settings (`store::jetstream`'s table, the
//! sinks'); this module assembles them and names the key path in each error.

use std::path::{Path, PathBuf};

use outpost_settings::HumanDuration;
use serde::Deserialize;

pub use outpost_settings::ConfigError;

use crate::sinks::config::{RawSinkConfig, SinkConfig};
use crate::store::jetstream::{JetStreamStoreConfig, RawJetStreamStoreConfig};
use crate::store::Synchronous;

/// The hub's config file as written, before validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[hub]`.
    pub hub: HubSection,
    /// `[store]`.
    #[serde(default)]
    pub store: RawStoreSection,
    /// `[api]`.
    #[serde(default)]
    pub api: ApiSection,
    /// `[observability]`.
    #[serde(default)]
    pub observability: ObservabilitySection,
    /// `[[sinks]]`: where stored events are forwarded.
    #[serde(default)]
    pub sinks: Vec<RawSinkConfig>,
    /// `[enroll]`: devices enrolling with one-time tokens.
    #[serde(default)]
    pub enroll: EnrollSection,
    /// `[audit]`.
    #[serde(default)]
    pub audit: AuditSection,
    /// `[policy]`.
    #[serde(default)]
    pub policy: PolicySection,
}

/// `[policy]`: what the hub keeps for the fleet policy and never sends.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// The hub's hashing key (32 random bytes as 64 hex digits, mode 0600)
    /// from which the key of each policy rule that hashes is derived; made
    /// on first start if missing, refused if group or others may read it.
    /// Default `<data_dir>/hashing.key`. On a JetStream store every replica
    /// needs the same key.
    #[serde(default)]
    pub hashing_key: Option<PathBuf>,
}

/// `[audit]`: the audit log's signing key.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// The Ed25519 private key (PEM, mode 0600) that signs every audit
    /// entry; made on first use if missing, refused if group or others may
    /// read it. Default `<data_dir>/audit.key`. On a JetStream store every
    /// replica needs the same key.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// `[hub]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubSection {
    /// Store, registry, policy and audit live here.
    pub data_dir: PathBuf,
    /// UDP address for QUIC.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Fleet CA certificate.
    pub ca: PathBuf,
    /// The hub's certificate.
    pub cert: PathBuf,
    /// The hub's key.
    pub key: PathBuf,
    /// The region the hub's store is in (`eu-west`), for the policy's data
    /// residency: streams of a residency reach the store only if its regions
    /// include this one. Without it, no residency-bound stream may be routed
    /// to the store.
    #[serde(default)]
    pub region: Option<String>,
    /// The fleet CA's folder (`ca.pem` and `ca.key`, as `ca init` made
    /// them), so that the hub can sign the agents' certificate renewals
    /// over their sessions. Without it, renewals are refused and agents
    /// keep their certificates until an operator reissues them.
    #[serde(default)]
    pub ca_dir: Option<PathBuf>,
    /// How long the certificate an agent renewed (or that `ca issue
    /// --config` replaced) is still accepted at the handshake, so that a
    /// connection made just before the agent swapped its files still works.
    #[serde(default = "default_renew_grace")]
    pub renew_grace: outpost_settings::HumanDuration,
    /// Days a certificate signed for a renewal is valid (1 to 36500; never
    /// beyond the CA's own expiry).
    #[serde(default = "default_renew_days")]
    pub renew_days: u32,
    /// The most QUIC handshakes in flight at once; more are refused.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// With this many handshakes in flight, a connection whose source
    /// address is not yet validated is answered with a QUIC Retry.
    #[serde(default = "default_retry_above")]
    pub retry_above: usize,
    /// New connections one source IP may open at once (the bucket's size);
    /// 0: no per-address limit.
    #[serde(default = "default_per_address_burst")]
    pub per_address_burst: u32,
    /// New connections a second one source IP earns back.
    #[serde(default = "default_per_address_rate")]
    pub per_address_rate: f64,
    /// How long a connection may take, once its handshake is done, to open
    /// its stream before it is closed with `Timeout`.
    #[serde(default = "default_stream_deadline")]
    pub stream_deadline: HumanDuration,
}

/// `[enroll]`: enrollment with one-time tokens (`outpost-hub enroll
/// create`, `outpost-agent enroll`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollSection {
    /// The fleet CA's folder (`ca.pem` and `ca.key`, as `ca init` made it),
    /// which the hub signs enrolling devices' certificates with. Without it
    /// the hub enrolls nobody and refuses every attempt with `disabled`.
    #[serde(default)]
    pub ca_dir: Option<PathBuf>,
    /// How long an enrolled device's certificate is valid, in days (default
    /// 825).
    #[serde(default)]
    pub validity_days: Option<u32>,
}

fn default_listen() -> String {
    "0.0.0.0:7443".into()
}
fn default_max_handshakes() -> usize {
    1024
}
fn default_retry_above() -> usize {
    256
}
fn default_per_address_burst() -> u32 {
    64
}
fn default_per_address_rate() -> f64 {
    16.0
}
fn default_stream_deadline() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(10))
}

fn default_renew_grace() -> outpost_settings::HumanDuration {
    outpost_settings::HumanDuration(std::time::Duration::from_secs(3600))
}

fn default_renew_days() -> u32 {
    crate::ca::Validity::LEAF_DEFAULT.get()
}

/// `[store]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStoreSection {
    /// `sqlite` or `jetstream`.
    #[serde(default = "default_kind")]
    pub kind: String,
    /// `full` or `normal`.
    #[serde(default = "default_sync")]
    pub synchronous: String,
    /// `[store.jetstream]`, for `kind = "jetstream"`.
    #[serde(default)]
    pub jetstream: Option<RawJetStreamStoreConfig>,
}

fn default_kind() -> String {
    "sqlite".into()
}
fn default_sync() -> String {
    "full".into()
}

impl Default for RawStoreSection {
    fn default() -> Self {
        RawStoreSection {
            kind: default_kind(),
            synchronous: default_sync(),
            jetstream: None,
        }
    }
}

/// `[api]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// The operator HTTP API (empty: no API).
    #[serde(default = "default_api")]
    pub listen: String,
    /// `[api.oidc]` as written: the OIDC issuer whose JWTs the API accepts.
    #[serde(default, rename = "oidc")]
    pub raw_oidc: Option<crate::api::auth::settings::RawOidcConfig>,
    /// `[api.oidc]`, validated (by [`RawConfig::validate`]).
    #[serde(skip)]
    pub oidc: Option<crate::api::auth::settings::OidcConfig>,
    /// `single` (a policy author's apply takes effect) or `two-person` (it
    /// is a proposal until another subject approves it).
    #[serde(default)]
    pub policy_approval: crate::api::auth::settings::PolicyApproval,
    /// PEM certificate (chain) the API serves with TLS; required, with `key`,
    /// unless `listen` is a loopback address.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Requests per second each caller (token subject) may make, sustained.
    #[serde(default = "default_api_rate")]
    pub rate: u32,
    /// Requests a caller may make at once above `rate`.
    #[serde(default = "default_api_burst")]
    pub burst: u32,
    /// How long one request may take before it is answered 408.
    #[serde(default = "default_api_timeout")]
    pub timeout: outpost_settings::HumanDuration,
}

fn default_api() -> String {
    "127.0.0.1:8080".into()
}
fn default_api_rate() -> u32 {
    50
}
fn default_api_burst() -> u32 {
    100
}
fn default_api_timeout() -> outpost_settings::HumanDuration {
    outpost_settings::HumanDuration(std::time::Duration::from_secs(30))
}

impl Default for ApiSection {
    fn default() -> Self {
        ApiSection {
            listen: default_api(),
            raw_oidc: None,
            oidc: None,
            policy_approval: Default::default(),
            cert: None,
            key: None,
            rate: default_api_rate(),
            burst: default_api_burst(),
            timeout: default_api_timeout(),
        }
    }
}

impl ApiSection {
    /// The checks of `[api]` that need no file: an address, TLS for any
    /// address but loopback, positive limits.
    fn validate(&self) -> Result<(), Invalid> {
        if self.listen.is_empty() {
            return Ok(());
        }
        let Ok(addr) = self.listen.parse::<std::net::SocketAddr>() else {
            return Err(invalid(
                "api.listen",
                format!(
                    "{:?} is not ip:port (leave it empty for no API)",
                    self.listen
                ),
            ));
        };
        match (&self.cert, &self.key) {
            (Some(_), None) => {
                return Err(invalid(
                    "api.key",
                    "api.cert is set: its private key is needed too".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "api.cert",
                    "api.key is set: its certificate is needed too".into(),
                ))
            }
            (None, None) if !addr.ip().is_loopback() => {
                return Err(invalid(
                    "api.cert",
                    format!(
                        "api.listen {addr} is not a loopback address: the API serves it only with TLS, so set api.cert and api.key (plain HTTP is for 127.0.0.1 or ::1 only)"
                    ),
                ))
            }
            _ => {}
        }
        if self.rate == 0 {
            return Err(invalid("api.rate", "must be at least 1".into()));
        }
        if self.burst == 0 {
            return Err(invalid("api.burst", "must be at least 1".into()));
        }
        if self.timeout.0.is_zero() {
            return Err(invalid("api.timeout", "must be longer than 0s".into()));
        }
        Ok(())
    }
}

/// `[observability]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObservabilitySection {
    /// Log filter.
    #[serde(default = "default_log")]
    pub log: String,
    /// Prometheus address.
    #[serde(default = "default_metrics")]
    pub metrics: String,
}

fn default_log() -> String {
    "info".into()
}
fn default_metrics() -> String {
    "127.0.0.1:9465".into()
}

impl Default for ObservabilitySection {
    fn default() -> Self {
        ObservabilitySection {
            log: default_log(),
            metrics: default_metrics(),
        }
    }
}

/// The hub's configuration, validated.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// `[hub]`.
    pub hub: HubSection,
    /// `[store]`: which store, with its settings.
    pub store: StoreKind,
    /// `[api]`.
    pub api: ApiSection,
    /// `[observability]`.
    pub observability: ObservabilitySection,
    /// `[[sinks]]`: where stored events are forwarded, each with its kind.
    pub sinks: Vec<SinkConfig>,
    /// `[enroll]`.
    pub enroll: EnrollSection,
    /// `[audit]`.
    pub audit: AuditSection,
    /// `[policy]`.
    pub policy: PolicySection,
}

impl HubConfig {
    /// The hashing key file of the hub whose config file is `config_file`:
    /// `[policy] hashing_key`, or `<data_dir>/hashing.key`, relative paths
    /// taken from the config file's folder.
    pub fn hashing_key_path(&self, config_file: &Path) -> PathBuf {
        let base = config_file.parent().unwrap_or(Path::new(""));
        match &self.policy.hashing_key {
            Some(k) => base.join(k),
            None => base.join(&self.hub.data_dir).join("hashing.key"),
        }
    }

    /// The audit key file of the hub whose config file is `config_file`:
    /// `[audit] key`, or `<data_dir>/audit.key`, relative paths taken from
    /// the config file's folder.
    pub fn audit_key_path(&self, config_file: &Path) -> PathBuf {
        let base = config_file.parent().unwrap_or(Path::new(""));
        match &self.audit.key {
            Some(k) => base.join(k),
            None => base.join(&self.hub.data_dir).join("audit.key"),
        }
    }
}

/// `[store]`, validated: which store holds events, watermarks, the registry
/// and the policy versions.
#[derive(Debug, Clone)]
pub enum StoreKind {
    /// `kind = "sqlite"`: the embedded file in `data_dir`.
    Sqlite {
        /// `synchronous`.
        synchronous: Synchronous,
    },
    /// `kind = "jetstream"`: NATS JetStream, for several replicas.
    JetStream(Box<JetStreamStoreConfig>),
}

impl StoreKind {
    /// The kind as `[store] kind` names it.
    pub fn name(&self) -> &'static str {
        match self {
            StoreKind::Sqlite { .. } => "sqlite",
            StoreKind::JetStream(_) => "jetstream",
        }
    }

    /// The JetStream store's settings, on that store.
    pub fn jetstream(&self) -> Option<&JetStreamStoreConfig> {
        match self {
            StoreKind::JetStream(js) => Some(js),
            StoreKind::Sqlite { .. } => None,
        }
    }
}

/// Reads, applies environment overrides from `env`, and validates.
pub fn load(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<HubConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.to_owned(),
        source: e,
    })?;
    parse(&text, env, path)
}

/// Parses and validates a config file's text (read from `path`, which errors
/// name), with environment overrides from `env`.
pub fn parse(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
    path: &Path,
) -> Result<HubConfig, ConfigError> {
    let raw: RawConfig = outpost_settings::parse(
        text,
        env,
        &[
            "hub",
            "store",
            "api",
            "observability",
            "sinks",
            "enroll",
            "audit",
            "policy",
        ],
    )
    .map_err(|message| ConfigError::Parse {
        path: path.to_owned(),
        message,
    })?;
    raw.validate()
        .map_err(|(key, message)| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        })
}

/// A rule broken: the key path and what is wrong.
type Invalid = (String, String);

fn invalid(key: &str, message: String) -> Invalid {
    (key.to_owned(), message)
}

impl RawConfig {
    /// Checks every rule that needs no file and no server; the error is
    /// the first broken one, with its key path.
    pub fn validate(self) -> Result<HubConfig, Invalid> {
        self.check_addresses()?;
        self.check_door()?;
        let store = self.store.validate()?;
        let sinks = validate_sinks(self.sinks)?;
        if let Some(days) = self.enroll.validity_days {
            crate::ca::Validity::days(days)
                .map_err(|e| invalid("enroll.validity_days", e.to_string()))?;
        }
        let mut api = self.api;
        api.oidc = match api.raw_oidc.clone() {
            Some(o) => Some(
                o.validate()
                    .map_err(|(key, message)| invalid(&format!("api.oidc.{key}"), message))?,
            ),
            None => None,
        };
        Ok(HubConfig {
            hub: self.hub,
            store,
            api,
            observability: self.observability,
            sinks,
            enroll: self.enroll,
            audit: self.audit,
            policy: self.policy,
        })
    }

    /// The listening addresses and the region.
    fn check_addresses(&self) -> Result<(), Invalid> {
        if self.hub.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "hub.listen",
                format!("{:?} is not ip:port", self.hub.listen),
            ));
        }
        self.api.validate()?;
        let metrics = &self.observability.metrics;
        if !metrics.is_empty() && metrics.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "observability.metrics",
                format!("{metrics:?} is not ip:port (leave it empty for no metrics)"),
            ));
        }
        if crate::ca::Validity::days(self.hub.renew_days).is_err() {
            return Err(invalid(
                "hub.renew_days",
                format!(
                    "{} is not a number of days from 1 to {}",
                    self.hub.renew_days,
                    crate::ca::Validity::MAX_DAYS
                ),
            ));
        }
        if self
            .hub
            .region
            .as_deref()
            .is_some_and(|r| r.trim().is_empty())
        {
            return Err(invalid(
                "hub.region",
                "must not be empty; leave it out instead".into(),
            ));
        }
        Ok(())
    }
}

impl RawConfig {
    /// The limits at the door (`server::door`).
    fn check_door(&self) -> Result<(), Invalid> {
        let h = &self.hub;
        if h.max_handshakes == 0 {
            return Err(invalid("hub.max_handshakes", "must be at least 1".into()));
        }
        if h.retry_above > h.max_handshakes {
            return Err(invalid(
                "hub.retry_above",
                format!(
                    "{} is above max_handshakes ({}): a Retry must come before a refusal",
                    h.retry_above, h.max_handshakes
                ),
            ));
        }
        if !(h.per_address_rate.is_finite() && h.per_address_rate > 0.0) {
            return Err(invalid(
                "hub.per_address_rate",
                format!("{} is not a number above 0", h.per_address_rate),
            ));
        }
        let deadline = h.stream_deadline.0;
        if deadline < std::time::Duration::from_secs(1)
            || deadline > std::time::Duration::from_secs(300)
        {
            return Err(invalid(
                "hub.stream_deadline",
                format!("{} is not between 1s and 300s", h.stream_deadline),
            ));
        }
        Ok(())
    }
}

impl RawStoreSection {
    /// `[store]` into its kind: `synchronous` is checked on either kind
    /// (it is read only by SQLite), `[store.jetstream]` is required with
    /// `jetstream` and refused without it.
    fn validate(self) -> Result<StoreKind, Invalid> {
        let jetstream = match self.kind.as_str() {
            "sqlite" => false,
            "jetstream" => true,
            other => {
                return Err(invalid(
                    "store.kind",
                    format!("{other:?} is not one of sqlite, jetstream"),
                ))
            }
        };
        let Some(synchronous) = Synchronous::parse(&self.synchronous) else {
            return Err(invalid(
                "store.synchronous",
                format!("{:?} is not one of full, normal", self.synchronous),
            ));
        };
        match (jetstream, self.jetstream) {
            (true, None) => Err(invalid(
                "store.jetstream",
                "kind = \"jetstream\" needs a [store.jetstream] table with at least `url`".into(),
            )),
            (true, Some(js)) => js
                .validate()
                .map(|js| StoreKind::JetStream(Box::new(js)))
                .map_err(|(key, message)| invalid(&format!("store.jetstream.{key}"), message)),
            (false, Some(_)) => Err(invalid(
                "store.jetstream",
                "is only read with [store] kind = \"jetstream\"".into(),
            )),
            (false, None) => Ok(StoreKind::Sqlite { synchronous }),
        }
    }
}

/// `[[sinks]]`: each entry validated, ids unique.
fn validate_sinks(raw: Vec<RawSinkConfig>) -> Result<Vec<SinkConfig>, Invalid> {
    let mut ids = std::collections::BTreeSet::new();
    let mut sinks = Vec::with_capacity(raw.len());
    for (i, r) in raw.into_iter().enumerate() {
        let sink = r
            .validate()
            .map_err(|e| invalid(&format!("sinks[{i}].{}", e.key), e.message))?;
        if !ids.insert(sink.id.clone()) {
            return Err(invalid(
                &format!("sinks[{i}].id"),
                format!("{:?} is the id of an earlier sink", sink.id),
            ));
        }
        sinks.push(sink);
    }
    Ok(sinks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_hub(keys: &str) -> Result<HubConfig, ConfigError> {
        let text = format!(
            "[hub]\ndata_dir = \"d\"\nca = \"ca.pem\"\ncert = \"hub.pem\"\nkey = \"hub.key\"\n{keys}\n"
        );
        parse(&text, Vec::new(), Path::new("hub.toml"))
    }

    fn invalid_key(keys: &str) -> String {
        match parse_hub(keys) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key for {keys:?}, got {other:?}"),
        }
    }

    #[test]
    fn the_door_has_limits_by_default() -> Result<(), ConfigError> {
        let c = parse_hub("")?;
        assert_eq!(c.hub.max_handshakes, 1024);
        assert_eq!(c.hub.retry_above, 256);
        assert_eq!(c.hub.per_address_burst, 64);
        assert!((c.hub.per_address_rate - 16.0).abs() < f64::EPSILON);
        assert_eq!(c.hub.stream_deadline.0, std::time::Duration::from_secs(10));
        Ok(())
    }

    #[test]
    fn door_limits_that_cannot_work_are_refused_with_their_key() {
        assert_eq!(invalid_key("max_handshakes = 0"), "hub.max_handshakes");
        assert_eq!(
            invalid_key("max_handshakes = 10\nretry_above = 11"),
            "hub.retry_above"
        );
        assert_eq!(
            invalid_key("per_address_rate = 0.0"),
            "hub.per_address_rate"
        );
        assert_eq!(
            invalid_key("per_address_rate = -1.0"),
            "hub.per_address_rate"
        );
        assert_eq!(
            invalid_key("stream_deadline = \"0s\""),
            "hub.stream_deadline"
        );
        assert_eq!(
            invalid_key("stream_deadline = \"1h\""),
            "hub.stream_deadline"
        );
    }

    #[test]
    fn door_limits_may_be_set() -> Result<(), ConfigError> {
        let c = parse_hub(
            "max_handshakes = 10\nretry_above = 0\nper_address_burst = 0\nper_address_rate = 0.5\nstream_deadline = \"3s\"",
        )?;
        assert_eq!((c.hub.max_handshakes, c.hub.retry_above), (10, 0));
        assert_eq!(c.hub.per_address_burst, 0);
        assert_eq!(c.hub.stream_deadline.0, std::time::Duration::from_secs(3));
        Ok(())
    }
}
