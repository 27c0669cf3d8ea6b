//! The hub's configuration: one TOML file, `OUTPOST_SECTION__KEY` overrides,
//! unknown keys refused.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use outpost_settings::ConfigError;

/// The hub's config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// `[hub]`.
    pub hub: HubSection,
    /// `[store]`.
    #[serde(default)]
    pub store: StoreSection,
    /// `[api]`.
    #[serde(default)]
    pub api: ApiSection,
    /// `[observability]`.
    #[serde(default)]
    pub observability: ObservabilitySection,
    /// `[[sinks]]`: where stored events are forwarded.
    #[serde(default)]
    pub sinks: Vec<crate::sinks::SinkConfig>,
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
}

fn default_listen() -> String {
    "0.0.0.0:7443".into()
}

/// `[store]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `sqlite` or `jetstream`.
    #[serde(default = "default_kind")]
    pub kind: String,
    /// `full` or `normal`.
    #[serde(default = "default_sync")]
    pub synchronous: String,
    /// `[store.jetstream]`, for `kind = "jetstream"`.
    #[serde(default)]
    pub jetstream: Option<crate::store::jetstream::JetStreamStoreConfig>,
}

fn default_kind() -> String {
    "sqlite".into()
}
fn default_sync() -> String {
    "full".into()
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
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
    /// The operator HTTP API.
    #[serde(default = "default_api")]
    pub listen: String,
}

fn default_api() -> String {
    "127.0.0.1:8080".into()
}

impl Default for ApiSection {
    fn default() -> Self {
        ApiSection {
            listen: default_api(),
        }
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
    let cfg: HubConfig = outpost_settings::parse(
        text,
        env,
        &["hub", "store", "api", "observability", "sinks"],
    )
    .map_err(|message| ConfigError::Parse {
        path: path.to_owned(),
        message,
    })?;
    let invalid = |key: &str, message: String| ConfigError::Invalid {
        path: path.to_owned(),
        key: key.to_owned(),
        message,
    };
    if cfg.hub.listen.parse::<std::net::SocketAddr>().is_err() {
        return Err(invalid(
            "hub.listen",
            format!("{:?} is not ip:port", cfg.hub.listen),
        ));
    }
    if cfg.api.listen.parse::<std::net::SocketAddr>().is_err() {
        return Err(invalid(
            "api.listen",
            format!("{:?} is not ip:port", cfg.api.listen),
        ));
    }
    if !cfg.observability.metrics.is_empty()
        && cfg
            .observability
            .metrics
            .parse::<std::net::SocketAddr>()
            .is_err()
    {
        return Err(invalid(
            "observability.metrics",
            format!(
                "{:?} is not ip:port (leave it empty for no metrics)",
                cfg.observability.metrics
            ),
        ));
    }
    if cfg
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
    if !matches!(cfg.store.kind.as_str(), "sqlite" | "jetstream") {
        return Err(invalid(
            "store.kind",
            format!("{:?} is not one of sqlite, jetstream", cfg.store.kind),
        ));
    }
    if !matches!(cfg.store.synchronous.as_str(), "full" | "normal") {
        return Err(invalid(
            "store.synchronous",
            format!("{:?} is not one of full, normal", cfg.store.synchronous),
        ));
    }
    match (cfg.store.kind.as_str(), &cfg.store.jetstream) {
        ("jetstream", None) => {
            return Err(invalid(
                "store.jetstream",
                "kind = \"jetstream\" needs a [store.jetstream] table with at least `url`".into(),
            ))
        }
        ("jetstream", Some(js)) => {
            if let Err((key, message)) = js.check() {
                return Err(invalid(&format!("store.jetstream.{key}"), message));
            }
        }
        (_, Some(_)) => {
            return Err(invalid(
                "store.jetstream",
                "is only read with [store] kind = \"jetstream\"".into(),
            ))
        }
        _ => {}
    }
    let mut ids = std::collections::BTreeSet::new();
    for (i, sink) in cfg.sinks.iter().enumerate() {
        if let Err((key, message)) = crate::sinks::check(sink) {
            return Err(invalid(&format!("sinks[{i}].{key}"), message));
        }
        if !ids.insert(sink.id.as_str()) {
            return Err(invalid(
                &format!("sinks[{i}].id"),
                format!("{:?} is the id of an earlier sink", sink.id),
            ));
        }
    }
    Ok(cfg)
}
