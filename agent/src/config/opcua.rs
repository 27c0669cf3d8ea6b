//! `[[opcua.servers]]`: the OPC UA servers the agent subscribes to.
//!
//! Kept apart from the other sections because OPC UA has the most keys of any
//! source (security, identity, trust, per-node monitoring) and because its
//! node ids are parsed by the OPC UA library, which a build without the
//! `opcua` feature does not have: such a build still reads the section, so a
//! config is never silently half-run, and refuses it by name.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_protocols::StreamName;
use outpost_settings::{ConfigError, HumanDuration};
use serde::Deserialize;

/// `[opcua]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OpcuaSection {
    /// `[[opcua.servers]]`.
    #[serde(default)]
    pub servers: Vec<ServerSection>,
}

/// `[[opcua.servers]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// The server's name: the first part of its nodes' default streams, and
    /// the name in logs and metrics.
    pub name: String,
    /// `opc.tcp://host:port[/path]`.
    pub endpoint: String,
    /// `None`, `Basic256Sha256`, `Aes128_Sha256_RsaOaep` or
    /// `Aes256_Sha256_RsaPss`.
    #[serde(default = "default_security_policy")]
    pub security_policy: String,
    /// `None`, `Sign` or `SignAndEncrypt`.
    #[serde(default = "default_security_mode")]
    pub security_mode: String,
    /// The agent's application instance certificate (DER `.der` or PEM
    /// `.pem`); required unless the policy is `None`.
    #[serde(default)]
    pub certificate: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[serde(default)]
    pub private_key: Option<PathBuf>,
    /// The application URI the agent announces; it must equal the URI in
    /// the certificate's subjectAltName.
    #[serde(default = "default_application_uri")]
    pub application_uri: String,
    /// The server certificates the agent trusts (DER or PEM); any other is
    /// refused. Required unless the policy is `None`.
    #[serde(default)]
    pub trusted_server_certificates: Vec<PathBuf>,
    /// User name, for user and password authentication.
    #[serde(default)]
    pub username: Option<String>,
    /// The file holding the password (trailing newlines are ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// A user certificate (DER or PEM), for certificate authentication.
    #[serde(default)]
    pub user_certificate: Option<PathBuf>,
    /// The user certificate's private key (PEM).
    #[serde(default)]
    pub user_private_key: Option<PathBuf>,
    /// How often the server sends what changed.
    #[serde(default = "default_publishing_interval")]
    pub publishing_interval: HumanDuration,
    /// The most monitored items in one subscription; more nodes make more
    /// subscriptions.
    #[serde(default = "default_items_per_subscription")]
    pub items_per_subscription: usize,
    /// How long one request may take.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: HumanDuration,
    /// How long the server keeps the session (and its subscriptions, with
    /// the notifications not yet acknowledged) while the agent is away.
    #[serde(default = "default_session_timeout")]
    pub session_timeout: HumanDuration,
    /// The first wait before reconnecting, doubling up to `reconnect_max`.
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min: HumanDuration,
    /// The longest wait between reconnects.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max: HumanDuration,
    /// `[[opcua.servers.nodes]]`.
    #[serde(default)]
    pub nodes: Vec<NodeSection>,
}

/// `[[opcua.servers.nodes]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// The node id in OPC UA text form: `ns=2;s=Temperature`, `i=2258`,
    /// `ns=3;g=...`, `ns=1;b=...`.
    pub node_id: String,
    /// The stream; defaults to `<server name>/<node_id>`.
    #[serde(default)]
    pub stream: Option<String>,
    /// How often the server samples the node; defaults to the publishing
    /// interval.
    #[serde(default)]
    pub sampling_interval: Option<HumanDuration>,
    /// An absolute deadband: a change smaller than this is not reported.
    #[serde(default)]
    pub deadband: Option<f64>,
    /// How many changes the server queues for this node between two
    /// publishes (and while the agent is away).
    #[serde(default = "default_queue_size")]
    pub queue_size: u32,
}

fn default_security_policy() -> String {
    "None".into()
}
fn default_security_mode() -> String {
    "None".into()
}
fn default_application_uri() -> String {
    "urn:outpost:agent".into()
}
fn default_publishing_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_items_per_subscription() -> usize {
    1000
}
fn default_request_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_session_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(120))
}
fn default_reconnect_min() -> HumanDuration {
    HumanDuration(Duration::from_millis(500))
}
fn default_reconnect_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_queue_size() -> u32 {
    10
}

/// An OPC UA security policy the agent supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityPolicy {
    /// No security.
    None,
    /// `Basic256Sha256`.
    Basic256Sha256,
    /// `Aes128_Sha256_RsaOaep`.
    Aes128Sha256RsaOaep,
    /// `Aes256_Sha256_RsaPss`.
    Aes256Sha256RsaPss,
}

impl SecurityPolicy {
    /// The policy's name as OPC UA writes it (the last part of its URI).
    pub fn name(self) -> &'static str {
        match self {
            SecurityPolicy::None => "None",
            SecurityPolicy::Basic256Sha256 => "Basic256Sha256",
            SecurityPolicy::Aes128Sha256RsaOaep => "Aes128_Sha256_RsaOaep",
            SecurityPolicy::Aes256Sha256RsaPss => "Aes256_Sha256_RsaPss",
        }
    }
}

/// An OPC UA message security mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityMode {
    /// Neither signed nor encrypted.
    None,
    /// Signed.
    Sign,
    /// Signed and encrypted.
    SignAndEncrypt,
}

impl SecurityMode {
    /// The mode's name as OPC UA writes it.
    pub fn name(self) -> &'static str {
        match self {
            SecurityMode::None => "None",
            SecurityMode::Sign => "Sign",
            SecurityMode::SignAndEncrypt => "SignAndEncrypt",
        }
    }
}

/// Who the agent is to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// Anonymous.
    Anonymous,
    /// User name and the file holding the password.
    UserPassword {
        /// The user name.
        username: String,
        /// The password file.
        password_file: PathBuf,
    },
    /// An X.509 user certificate and its key.
    Certificate {
        /// The certificate.
        certificate: PathBuf,
        /// Its private key.
        private_key: PathBuf,
    },
}

/// A validated node.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// The node id as written (parsed again by the source's library).
    pub node_id: String,
    /// The stream its samples go to.
    pub stream: StreamName,
    /// The sampling interval; `None`: the publishing interval.
    pub sampling_interval: Option<Duration>,
    /// Absolute deadband.
    pub deadband: Option<f64>,
    /// Server-side queue size.
    pub queue_size: u32,
}

/// A validated `[[opcua.servers]]` entry.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// The server's name.
    pub name: String,
    /// The endpoint URL.
    pub endpoint: String,
    /// Security policy.
    pub security_policy: SecurityPolicy,
    /// Message security mode.
    pub security_mode: SecurityMode,
    /// The agent's certificate and key, resolved; `None` with policy `None`
    /// and none given.
    pub certificate: Option<(PathBuf, PathBuf)>,
    /// The application URI.
    pub application_uri: String,
    /// Trusted server certificates, resolved.
    pub trusted_server_certificates: Vec<PathBuf>,
    /// User identity, paths resolved.
    pub identity: Identity,
    /// Publishing interval.
    pub publishing_interval: Duration,
    /// Items per subscription.
    pub items_per_subscription: usize,
    /// Request timeout.
    pub request_timeout: Duration,
    /// Session timeout.
    pub session_timeout: Duration,
    /// Reconnect backoff start.
    pub reconnect_min: Duration,
    /// Reconnect backoff cap.
    pub reconnect_max: Duration,
    /// The nodes, in config order.
    pub nodes: Vec<NodeSettings>,
}

impl ServerSettings {
    /// How many subscriptions the nodes need.
    pub fn subscriptions(&self) -> usize {
        self.nodes
            .len()
            .div_ceil(self.items_per_subscription.max(1))
    }
}

/// Why a build without the `opcua` feature refuses `[[opcua.servers]]`, and
/// where the build with it comes from: the packages ship the agent without
/// OPC UA (it would more than double the binary) and `outpost-agent-opcua`
/// with it, so the operator reading this needs the package's name.
pub const WITHOUT_OPCUA: &str = "this outpost-agent was built without OPC UA: \
install the package outpost-agent-opcua instead of outpost-agent (it replaces it, \
keeping the configuration and the outbox), or build with `cargo build --release \
-p outpost-agent --features opcua`";

fn err(path: &Path, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_owned(),
        key: key.into(),
        message: message.into(),
    }
}

/// Validates `[opcua]`: `path` is the config file (for errors), `resolve`
/// makes relative paths relative to it.
pub fn validate_opcua(
    path: &Path,
    o: &OpcuaSection,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<Vec<ServerSettings>, ConfigError> {
    if !o.servers.is_empty() && !cfg!(feature = "opcua") {
        return Err(err(path, "opcua.servers", WITHOUT_OPCUA));
    }
    let mut names = BTreeSet::new();
    let mut out = Vec::with_capacity(o.servers.len());
    for (i, s) in o.servers.iter().enumerate() {
        let k = format!("opcua.servers[{i}]");
        if !valid_name(&s.name) {
            return Err(err(
                path,
                format!("{k}.name"),
                format!(
                    "{:?} must be 1 to 128 ASCII letters, digits, '-', '_' or '.'",
                    s.name
                ),
            ));
        }
        if !names.insert(s.name.clone()) {
            return Err(err(
                path,
                format!("{k}.name"),
                format!("duplicate server name {:?}", s.name),
            ));
        }
        out.push(validate_server(path, &k, s, resolve)?);
    }
    Ok(out)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn validate_server(
    path: &Path,
    k: &str,
    s: &ServerSection,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<ServerSettings, ConfigError> {
    let e = |key: &str, m: String| err(path, format!("{k}.{key}"), m);
    let rest = s.endpoint.strip_prefix("opc.tcp://").ok_or_else(|| {
        e(
            "endpoint",
            format!("{:?} is not an opc.tcp://host:port URL", s.endpoint),
        )
    })?;
    let authority = rest.split('/').next().unwrap_or_default();
    let port_ok = authority
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
    if !port_ok {
        return Err(e(
            "endpoint",
            format!("{:?} is not an opc.tcp://host:port URL", s.endpoint),
        ));
    }
    let security_policy = match s.security_policy.as_str() {
        "None" => SecurityPolicy::None,
        "Basic256Sha256" => SecurityPolicy::Basic256Sha256,
        "Aes128_Sha256_RsaOaep" => SecurityPolicy::Aes128Sha256RsaOaep,
        "Aes256_Sha256_RsaPss" => SecurityPolicy::Aes256Sha256RsaPss,
        other => return Err(e("security_policy", format!("{other:?} is not one of None, Basic256Sha256, Aes128_Sha256_RsaOaep, Aes256_Sha256_RsaPss"))),
    };
    let security_mode = match s.security_mode.as_str() {
        "None" => SecurityMode::None,
        "Sign" => SecurityMode::Sign,
        "SignAndEncrypt" => SecurityMode::SignAndEncrypt,
        other => {
            return Err(e(
                "security_mode",
                format!("{other:?} is not one of None, Sign, SignAndEncrypt"),
            ))
        }
    };
    if (security_policy == SecurityPolicy::None) != (security_mode == SecurityMode::None) {
        return Err(e(
            "security_mode",
            format!(
                "{:?} does not go with security_policy {:?}: None goes only with None",
                s.security_mode, s.security_policy
            ),
        ));
    }
    let certificate = match (&s.certificate, &s.private_key) {
        (Some(c), Some(key)) => Some((resolve(c), resolve(key))),
        (None, None) => None,
        (Some(_), None) => return Err(e("private_key", "required with certificate".into())),
        (None, Some(_)) => return Err(e("certificate", "required with private_key".into())),
    };
    if security_policy != SecurityPolicy::None {
        if certificate.is_none() {
            return Err(e(
                "certificate",
                format!(
                    "required with security_policy {:?} (with private_key)",
                    s.security_policy
                ),
            ));
        }
        if s.trusted_server_certificates.is_empty() {
            return Err(e(
                "trusted_server_certificates",
                format!(
                    "required with security_policy {:?}: the server's certificate, or the agent trusts none",
                    s.security_policy
                ),
            ));
        }
    }
    for (j, c) in s
        .trusted_server_certificates
        .iter()
        .chain(s.certificate.iter())
        .chain(s.user_certificate.iter())
        .enumerate()
    {
        let ext = c.extension().and_then(|x| x.to_str()).unwrap_or_default();
        if !matches!(ext, "der" | "pem") {
            let key = if j < s.trusted_server_certificates.len() {
                format!("trusted_server_certificates[{j}]")
            } else if s.certificate.as_ref() == Some(c) {
                "certificate".into()
            } else {
                "user_certificate".into()
            };
            return Err(e(
                &key,
                format!("{}: must end in .der or .pem", c.display()),
            ));
        }
    }
    if s.application_uri.is_empty() {
        return Err(e("application_uri", "must not be empty".into()));
    }
    let identity = match (
        &s.username,
        &s.password_file,
        &s.user_certificate,
        &s.user_private_key,
    ) {
        (None, None, None, None) => Identity::Anonymous,
        (Some(u), Some(p), None, None) => {
            if u.is_empty() {
                return Err(e("username", "must not be empty".into()));
            }
            Identity::UserPassword {
                username: u.clone(),
                password_file: resolve(p),
            }
        }
        (None, None, Some(c), Some(key)) => Identity::Certificate {
            certificate: resolve(c),
            private_key: resolve(key),
        },
        (Some(_), None, _, _) => return Err(e("password_file", "required with username".into())),
        (None, Some(_), _, _) => return Err(e("username", "required with password_file".into())),
        (_, _, Some(_), None) => {
            return Err(e("user_private_key", "required with user_certificate".into()))
        }
        (_, _, None, Some(_)) => {
            return Err(e("user_certificate", "required with user_private_key".into()))
        }
        _ => {
            return Err(e(
                "username",
                "give either username and password_file or user_certificate and user_private_key, not both".into(),
            ))
        }
    };
    let publishing_interval = s.publishing_interval.0;
    if publishing_interval < Duration::from_millis(10) {
        return Err(e("publishing_interval", "must be at least 10ms".into()));
    }
    if !(1..=100_000).contains(&s.items_per_subscription) {
        return Err(e(
            "items_per_subscription",
            format!("{} is out of range 1..=100000", s.items_per_subscription),
        ));
    }
    if s.request_timeout.0 < Duration::from_millis(100) {
        return Err(e("request_timeout", "must be at least 100ms".into()));
    }
    if s.session_timeout.0 < Duration::from_secs(1)
        || s.session_timeout.0.as_millis() > u128::from(u32::MAX)
    {
        return Err(e(
            "session_timeout",
            "must be between 1s and 49 days".into(),
        ));
    }
    if s.reconnect_min.0.is_zero() || s.reconnect_min.0 > s.reconnect_max.0 {
        return Err(e(
            "reconnect_min",
            "must be longer than zero and not exceed reconnect_max".into(),
        ));
    }
    if s.nodes.is_empty() {
        return Err(e(
            "nodes",
            "at least one [[...nodes]] entry is needed".into(),
        ));
    }
    let mut streams = BTreeSet::new();
    let mut nodes = Vec::with_capacity(s.nodes.len());
    for (j, n) in s.nodes.iter().enumerate() {
        let nk = format!("nodes[{j}]");
        check_node_id(&n.node_id).map_err(|m| e(&format!("{nk}.node_id"), m))?;
        let stream_text = match &n.stream {
            Some(st) => st.clone(),
            None => format!("{}/{}", s.name, n.node_id),
        };
        let stream = StreamName::parse(&stream_text)
            .map_err(|x| e(&format!("{nk}.stream"), x.to_string()))?;
        if !streams.insert(stream_text.clone()) {
            return Err(e(
                &format!("{nk}.stream"),
                format!("duplicate stream {stream_text:?} in server {:?}", s.name),
            ));
        }
        if let Some(db) = n.deadband {
            if !db.is_finite() || db < 0.0 {
                return Err(e(
                    &format!("{nk}.deadband"),
                    "must be a finite number at least 0".into(),
                ));
            }
        }
        if n.queue_size == 0 {
            return Err(e(&format!("{nk}.queue_size"), "must be at least 1".into()));
        }
        nodes.push(NodeSettings {
            node_id: n.node_id.clone(),
            stream,
            sampling_interval: n.sampling_interval.map(|d| d.0),
            deadband: n.deadband,
            queue_size: n.queue_size,
        });
    }
    Ok(ServerSettings {
        name: s.name.clone(),
        endpoint: s.endpoint.clone(),
        security_policy,
        security_mode,
        certificate,
        application_uri: s.application_uri.clone(),
        trusted_server_certificates: s
            .trusted_server_certificates
            .iter()
            .map(|p| resolve(p))
            .collect(),
        identity,
        publishing_interval,
        items_per_subscription: s.items_per_subscription,
        request_timeout: s.request_timeout.0,
        session_timeout: s.session_timeout.0,
        reconnect_min: s.reconnect_min.0,
        reconnect_max: s.reconnect_max.0,
        nodes,
    })
}

/// Whether `text` is a node id the OPC UA library can parse (OPC UA Part 6,
/// 5.3.1.10 gives the text form).
#[cfg(feature = "opcua")]
fn check_node_id(text: &str) -> Result<(), String> {
    text.parse::<opcua::types::NodeId>()
        .map(|_| ())
        .map_err(|_| {
            format!(
                "{text:?} is not an OPC UA node id such as \"ns=2;s=Temperature\" or \"i=2258\""
            )
        })
}

#[cfg(not(feature = "opcua"))]
fn check_node_id(_text: &str) -> Result<(), String> {
    Ok(())
}
