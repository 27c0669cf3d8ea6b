//! The agent's configuration: one TOML file, every key overridable from the
//! environment as `OUTPOST_SECTION__KEY`.
//!
//! Loading happens in two steps, as in vector: [`load`] reads and deserialises
//! (unknown keys are errors, so a typo never silently disables a feature), then
//! [`RawConfig::validate`] checks cross-field rules without touching the network
//! and returns an [`AgentConfig`] whose values are already parsed. Sources only
//! ever see validated configuration.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_protocols::modbus::{
    plan, ByteOrder, DataType, Plan, PlanLimits, RegisterAddress, Table, TagSpec,
};
use outpost_protocols::topic::{TopicFilter, TopicTemplate};
use outpost_protocols::{AgentId, StreamName};
use serde::Deserialize;

pub use outpost_settings::{HumanDuration, HumanSize};

use crate::outbox::{Eviction, OnCorruption, Synchronous};

pub mod opcua;

use opcua::{validate_opcua, OpcuaSection, ServerSettings};

pub use outpost_settings::ConfigError;

/// The file as written, before validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[agent]`: identity and storage.
    pub agent: AgentSection,
    /// `[uplink]`: the hub; without it the agent only buffers.
    #[serde(default)]
    pub uplink: Option<UplinkSection>,
    /// `[outbox]`: durability and limits.
    #[serde(default)]
    pub outbox: OutboxSection,
    /// `[mqtt]`: the site broker.
    #[serde(default)]
    pub mqtt: Option<MqttSection>,
    /// `[modbus]`: the devices to poll.
    #[serde(default)]
    pub modbus: ModbusSection,
    /// `[[bridges]]`: local routes between Modbus and MQTT.
    #[serde(default)]
    pub bridges: Vec<BridgeSection>,
    /// `[opcua]`: the OPC UA servers to subscribe to.
    #[serde(default)]
    pub opcua: OpcuaSection,
    /// `[observability]`: logs and metrics.
    #[serde(default)]
    pub observability: ObservabilitySection,
}

/// `[agent]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// Where the outbox and agent state live.
    pub data_dir: PathBuf,
    /// The agent's id while it has no certificate; with an uplink the id comes
    /// from the certificate and this must match it if given.
    #[serde(default)]
    pub id: Option<String>,
    /// Labels that select policies at the hub (`site`, `region`, ...).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// `[uplink]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkSection {
    /// `host:port` of the hub (UDP).
    pub hub: String,
    /// The fleet CA certificate (PEM).
    pub ca: PathBuf,
    /// The agent's certificate (PEM).
    pub cert: PathBuf,
    /// The agent's private key (PEM).
    pub key: PathBuf,
    /// The name the hub's certificate must carry; defaults to the host part of
    /// `hub`.
    #[serde(default)]
    pub server_name: Option<String>,
    /// The first wait before reconnecting; it doubles, with jitter, up to
    /// `reconnect_max`.
    #[serde(default = "default_uplink_reconnect_min")]
    pub reconnect_min: HumanDuration,
    /// The longest wait between reconnects.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max: HumanDuration,
}

fn default_uplink_reconnect_min() -> HumanDuration {
    HumanDuration(Duration::from_millis(500))
}

/// `[outbox]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxSection {
    /// `full` (durable on power loss, the default) or `normal`.
    #[serde(default = "default_synchronous")]
    pub synchronous: String,
    /// The most the outbox may hold before eviction.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: HumanSize,
    /// Events older than this are evicted.
    #[serde(default = "default_max_age")]
    pub max_age: HumanDuration,
    /// `drop-oldest` or `refuse-new`.
    #[serde(default = "default_eviction")]
    pub eviction: String,
    /// The most events in one group-commit transaction.
    #[serde(default = "default_commit_batch")]
    pub commit_batch: usize,
    /// How long the writer may wait for more events once the queue is empty
    /// (0: commit at once; requests that arrive during a commit form the next
    /// group by themselves).
    #[serde(default = "default_commit_window")]
    pub commit_window: HumanDuration,
    /// What to do with an outbox found damaged at start: `move-aside` (keep
    /// what is readable in a fresh outbox and go on, the default) or `stop`.
    #[serde(default = "default_on_corruption")]
    pub on_corruption: String,
}

fn default_on_corruption() -> String {
    "move-aside".into()
}

fn default_synchronous() -> String {
    "full".into()
}
fn default_max_bytes() -> HumanSize {
    HumanSize(2 << 30)
}
fn default_max_age() -> HumanDuration {
    HumanDuration(Duration::from_secs(30 * 86400))
}
fn default_eviction() -> String {
    "drop-oldest".into()
}
fn default_commit_batch() -> usize {
    4096
}
fn default_commit_window() -> HumanDuration {
    HumanDuration(Duration::ZERO)
}

impl Default for OutboxSection {
    fn default() -> Self {
        OutboxSection {
            synchronous: default_synchronous(),
            max_bytes: default_max_bytes(),
            max_age: default_max_age(),
            eviction: default_eviction(),
            commit_batch: default_commit_batch(),
            commit_window: default_commit_window(),
            on_corruption: default_on_corruption(),
        }
    }
}

/// `[mqtt]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSection {
    /// `host:port` of the site broker.
    pub broker: String,
    /// The client id; the broker keeps the persistent session under it.
    pub client_id: String,
    /// User name, if the broker wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// Password, if the broker wants one.
    #[serde(default)]
    pub password: Option<String>,
    /// Keep-alive interval.
    #[serde(default = "default_keep_alive")]
    pub keep_alive: HumanDuration,
    /// `false` (the default) keeps a persistent session, so the broker queues
    /// messages while the agent restarts.
    #[serde(default)]
    pub clean_session: bool,
    /// Payloads larger than this are recorded as a bad-quality event with the
    /// size, not stored.
    #[serde(default = "default_max_payload")]
    pub max_payload: HumanSize,
    /// The most unacknowledged QoS 1/2 messages the agent publishes at once
    /// (bridges); keep it at or below the broker's `max_inflight_messages`.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// TLS to the broker.
    #[serde(default)]
    pub tls: Option<MqttTlsSection>,
    /// How long to wait before reconnecting, doubling up to `reconnect_max`.
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min: HumanDuration,
    /// The longest wait between reconnects.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max: HumanDuration,
    /// What to subscribe to and store.
    #[serde(default)]
    pub subscribe: Vec<SubscribeSection>,
    /// Sparkplug B groups to read as a host application.
    #[serde(default)]
    pub sparkplug: Vec<SparkplugSection>,
}

fn default_keep_alive() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_max_payload() -> HumanSize {
    HumanSize(256 * 1024)
}
fn default_max_inflight() -> u16 {
    20
}
fn default_reconnect_min() -> HumanDuration {
    HumanDuration(Duration::from_millis(200))
}
fn default_reconnect_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

/// `[mqtt.tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttTlsSection {
    /// CA certificate(s) that sign the broker's certificate (PEM).
    pub ca: PathBuf,
    /// Client certificate, for brokers that require one (PEM).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Client key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The name to check the broker's certificate against; defaults to the
    /// broker's host.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// `[[mqtt.subscribe]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeSection {
    /// The topic filter; the stream of each message is its topic.
    pub filter: String,
    /// 0, 1 or 2.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// A JSON pointer (`/ts`) to the event time inside JSON payloads.
    #[serde(default)]
    pub ts_field: Option<String>,
    /// The unit of `ts_field`: `s`, `ms` (default), `us` or `ns`.
    #[serde(default = "default_ts_unit")]
    pub ts_unit: String,
}

/// `[[mqtt.sparkplug]]`: the Sparkplug B edge nodes of one group (or every
/// group), read as a host application.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparkplugSection {
    /// The group id, or `+` (the default) for every group.
    #[serde(default = "default_sparkplug_group")]
    pub group: String,
    /// QoS of the subscription: 0 or 1 (Sparkplug publishes at 0 and 1).
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Ask an edge node for a rebirth (NCMD `Node Control/Rebirth`) after a
    /// seq gap, an unknown alias or data without a birth.
    #[serde(default = "default_true")]
    pub rebirth: bool,
    /// The least time between two rebirth requests to one edge node.
    #[serde(default = "default_rebirth_interval")]
    pub rebirth_interval: HumanDuration,
}

fn default_sparkplug_group() -> String {
    "+".into()
}
fn default_true() -> bool {
    true
}
fn default_rebirth_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}

fn default_qos() -> u8 {
    1
}
fn default_ts_unit() -> String {
    "ms".into()
}

/// `[modbus]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ModbusSection {
    /// `[[modbus.devices]]`.
    #[serde(default)]
    pub devices: Vec<DeviceSection>,
}

/// `[[modbus.devices]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSection {
    /// The device name, the first part of its streams.
    pub name: String,
    /// `tcp` or `rtu`.
    #[serde(default = "default_transport")]
    pub transport: String,
    /// TCP: `host:port`.
    #[serde(default)]
    pub address: Option<String>,
    /// RTU: the serial device (`/dev/ttyUSB0`).
    #[serde(default)]
    pub port: Option<String>,
    /// RTU: baud rate.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// RTU: `none`, `even` or `odd`.
    #[serde(default = "default_parity")]
    pub parity: String,
    /// RTU: 7 or 8.
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// RTU: 1 or 2.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// The unit (slave) id, 0 to 247.
    #[serde(default = "default_unit")]
    pub unit: u8,
    /// How often to read every tag.
    #[serde(default = "default_poll")]
    pub poll: HumanDuration,
    /// How long to wait for one reply.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// How often to retry a failed read within one poll.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// The first reconnect delay, doubling up to `backoff_max`.
    #[serde(default = "default_backoff")]
    pub backoff: HumanDuration,
    /// The longest reconnect delay.
    #[serde(default = "default_backoff_max")]
    pub backoff_max: HumanDuration,
    /// The most registers one read may ask for (1 to 125).
    #[serde(default = "default_max_registers")]
    pub max_registers: u16,
    /// The most coils or discrete inputs one read may ask for (1 to 2000).
    #[serde(default = "default_max_bits")]
    pub max_bits: u16,
    /// The most unused registers read to join two tags into one request.
    #[serde(default = "default_max_gap")]
    pub max_gap: u16,
    /// `[[modbus.devices.tags]]`.
    #[serde(default)]
    pub tags: Vec<TagSection>,
}

fn default_transport() -> String {
    "tcp".into()
}
fn default_baud() -> u32 {
    9600
}
fn default_parity() -> String {
    "none".into()
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_unit() -> u8 {
    1
}
fn default_poll() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_millis(500))
}
fn default_retries() -> u32 {
    1
}
fn default_backoff() -> HumanDuration {
    HumanDuration(Duration::from_millis(500))
}
fn default_backoff_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_max_registers() -> u16 {
    125
}
fn default_max_bits() -> u16 {
    2000
}
fn default_max_gap() -> u16 {
    10
}

/// `[[modbus.devices.tags]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagSection {
    /// The tag name, the second part of its stream.
    pub name: String,
    /// `coil`, `discrete`, `holding` or `input`.
    pub table: Table,
    /// Zero-based protocol address.
    pub address: u32,
    /// The value type.
    #[serde(rename = "type")]
    pub data_type: DataType,
    /// Byte order of multi-register values.
    #[serde(default)]
    pub order: ByteOrder,
    /// For `bool` in a register: the bit, 0 to 15.
    #[serde(default)]
    pub bit: Option<u8>,
    /// For `string`: the length in registers.
    #[serde(default)]
    pub length: Option<u16>,
    /// Value = raw × scale + offset.
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// Value = raw × scale + offset.
    #[serde(default)]
    pub offset: f64,
    /// Only record a sample when it differs from the last recorded one by more
    /// than this.
    #[serde(default)]
    pub deadband: Option<f64>,
    /// Whether bridges and commands from the hub may write this tag.
    #[serde(default)]
    pub writable: bool,
    /// The lowest value a write may set (writable tags; numbers).
    #[serde(default)]
    pub min: Option<f64>,
    /// The highest value a write may set (writable tags; numbers).
    #[serde(default)]
    pub max: Option<f64>,
    /// The only values a write may set (writable tags; numbers, or `true`
    /// and `false` as 1 and 0).
    #[serde(default)]
    pub allowed: Option<Vec<f64>>,
}

fn default_scale() -> f64 {
    1.0
}

/// `[[bridges]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeSection {
    /// `modbus:<device>/<tag>` (`+` and `#` allowed) or `mqtt:<topic filter>`.
    pub from: String,
    /// `mqtt:<topic template>` or `modbus:<device>/<tag>`.
    pub to: String,
    /// Modbus → MQTT: `json` (value, quality, ts, the default) or `raw` (the
    /// value as text).
    #[serde(default)]
    pub format: Option<String>,
    /// Modbus → MQTT: 0, 1 or 2; MQTT → Modbus: the subscription's QoS.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Modbus → MQTT: publish retained (default false).
    #[serde(default)]
    pub retain: Option<bool>,
    /// Modbus → MQTT: `change` (only when the value changes, the default) or
    /// `poll`.
    #[serde(default)]
    pub on: Option<String>,
    /// MQTT → Modbus: run this write bridge although the site broker is
    /// reached without TLS or without a login (anyone who can publish to it
    /// then writes the tag); `check` warns about it.
    #[serde(default)]
    pub allow_unauthenticated_writes: Option<bool>,
}

/// `[observability]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObservabilitySection {
    /// A tracing filter: `info`, `outpost_agent=debug`.
    #[serde(default = "default_log")]
    pub log: String,
    /// `text` or `json`.
    #[serde(default = "default_log_format")]
    pub log_format: String,
    /// Where to serve Prometheus metrics; empty to disable.
    #[serde(default = "default_metrics")]
    pub metrics: String,
}

fn default_log() -> String {
    "info".into()
}
fn default_log_format() -> String {
    "text".into()
}
fn default_metrics() -> String {
    "127.0.0.1:9464".into()
}

impl Default for ObservabilitySection {
    fn default() -> Self {
        ObservabilitySection {
            log: default_log(),
            log_format: default_log_format(),
            metrics: default_metrics(),
        }
    }
}

/// Reads a config file and applies `OUTPOST_SECTION__KEY` overrides from `env`.
///
/// The environment is passed in rather than read here so tests can give their
/// own without touching the process environment.
pub fn load(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<RawConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, env, path)
}

/// Parses a config file's text (read from `path`, which errors name) and
/// applies `OUTPOST_SECTION__KEY` overrides from `env`.
pub fn parse(
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
    path: &Path,
) -> Result<RawConfig, ConfigError> {
    outpost_settings::parse(
        text,
        env,
        &[
            "agent",
            "uplink",
            "outbox",
            "mqtt",
            "modbus",
            "bridges",
            "observability",
            "opcua",
        ],
    )
    .map_err(|message| ConfigError::Parse {
        path: path.to_owned(),
        message,
    })
}

/// Loads and validates in one step, with the process environment.
pub fn load_and_validate(path: &Path) -> Result<AgentConfig, ConfigError> {
    let raw = load(path, std::env::vars())?;
    raw.validate(path)
}

/// A validated configuration: every value parsed, every cross-reference checked.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The config file this came from.
    pub source: PathBuf,
    /// The agent id used for the outbox's events.
    pub agent_id: AgentId,
    /// Absolute data directory.
    pub data_dir: PathBuf,
    /// Agent labels.
    pub labels: BTreeMap<String, String>,
    /// The uplink, with paths resolved.
    pub uplink: Option<UplinkSection>,
    /// Outbox settings.
    pub outbox: OutboxSettings,
    /// The MQTT source, if configured.
    pub mqtt: Option<MqttSettings>,
    /// The Modbus devices.
    pub devices: Vec<DeviceSettings>,
    /// Modbus tags published to MQTT.
    pub publish_bridges: Vec<PublishBridge>,
    /// MQTT topics written to Modbus tags.
    pub write_bridges: Vec<WriteBridge>,
    /// The OPC UA servers.
    pub opcua_servers: Vec<ServerSettings>,
    /// Logs and metrics.
    pub observability: ObservabilitySection,
    /// What is allowed but risky, one line each (`<file>: <key>: ...`):
    /// `check` prints them on stderr, `run` logs them.
    pub warnings: Vec<String>,
}

/// Validated `[outbox]`.
#[derive(Debug, Clone)]
pub struct OutboxSettings {
    /// The SQLite file.
    pub path: PathBuf,
    /// Flush policy.
    pub synchronous: Synchronous,
    /// Size limit.
    pub max_bytes: u64,
    /// Age limit.
    pub max_age: Duration,
    /// What happens at the limit.
    pub eviction: Eviction,
    /// Events per transaction.
    pub commit_batch: usize,
    /// Group-commit window.
    pub commit_window: Duration,
    /// What to do with a damaged outbox.
    pub on_corruption: OnCorruption,
}

/// Validated `[mqtt]`.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Client id.
    pub client_id: String,
    /// Credentials.
    pub login: Option<(String, String)>,
    /// Keep-alive.
    pub keep_alive: Duration,
    /// Clean or persistent session.
    pub clean_session: bool,
    /// Largest payload stored.
    pub max_payload: usize,
    /// Outbound in-flight window for bridges.
    pub max_inflight: u16,
    /// TLS, with paths resolved.
    pub tls: Option<MqttTlsSection>,
    /// Reconnect backoff start.
    pub reconnect_min: Duration,
    /// Reconnect backoff cap.
    pub reconnect_max: Duration,
    /// Subscriptions whose messages are stored.
    pub subscriptions: Vec<Subscription>,
    /// Sparkplug B groups read as a host application.
    pub sparkplug: Vec<SparkplugSettings>,
}

/// One validated `[[mqtt.sparkplug]]`.
#[derive(Debug, Clone)]
pub struct SparkplugSettings {
    /// `spBv1.0/<group>/#`.
    pub filter: TopicFilter,
    /// Requested QoS.
    pub qos: u8,
    /// Whether rebirths are requested.
    pub rebirth: bool,
    /// The least time between two requests to one node.
    pub rebirth_interval: Duration,
}

/// One validated subscription.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// The filter.
    pub filter: TopicFilter,
    /// Requested QoS.
    pub qos: u8,
    /// Where the event time is in JSON payloads, and its unit in nanoseconds.
    pub ts_field: Option<(String, i64)>,
}

/// How the agent reaches a Modbus device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Modbus TCP.
    Tcp {
        /// `host:port`.
        address: String,
    },
    /// Modbus RTU over a serial line.
    Rtu {
        /// The serial device path.
        port: String,
        /// Baud rate.
        baud: u32,
        /// `none`, `even`, `odd`.
        parity: String,
        /// 7 or 8.
        data_bits: u8,
        /// 1 or 2.
        stop_bits: u8,
    },
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Tcp { address } => write!(f, "tcp {address}"),
            Transport::Rtu {
                port,
                baud,
                parity,
                data_bits,
                stop_bits,
            } => write!(
                f,
                "rtu {port} {baud} {data_bits}{}{stop_bits}",
                parity.chars().next().unwrap_or('n').to_ascii_uppercase()
            ),
        }
    }
}

/// A validated tag.
#[derive(Debug, Clone)]
pub struct TagSettings {
    /// The tag name.
    pub name: String,
    /// `<device>/<tag>`.
    pub stream: StreamName,
    /// How to read and decode it.
    pub spec: TagSpec,
    /// Report-by-exception threshold.
    pub deadband: Option<f64>,
    /// Whether bridges and commands may write it.
    pub writable: bool,
    /// What a write may set.
    pub limits: WriteLimits,
}

/// What a write to a writable tag may set, beyond what its type holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WriteLimits {
    /// The lowest value.
    pub min: Option<f64>,
    /// The highest value.
    pub max: Option<f64>,
    /// The only values (empty: any).
    pub allowed: Vec<f64>,
}

impl WriteLimits {
    /// Whether `value` may be written: a number (or a boolean, as 1 or 0)
    /// within `min`, `max` and `allowed`; the error says which limit.
    /// Without limits every value passes here (its type is checked when it
    /// is encoded).
    pub fn check(&self, value: &outpost_protocols::Value) -> Result<(), String> {
        use outpost_protocols::Value;
        if self.min.is_none() && self.max.is_none() && self.allowed.is_empty() {
            return Ok(());
        }
        let v = match value {
            Value::Bool(b) => f64::from(u8::from(*b)),
            Value::I64(i) => *i as f64,
            Value::U64(u) => *u as f64,
            Value::F64(f) if f.is_finite() => *f,
            other => return Err(format!("value {other:?} is not a finite number")),
        };
        if let Some(min) = self.min.filter(|m| v < *m) {
            return Err(format!("value {v} is below min {min}"));
        }
        if let Some(max) = self.max.filter(|m| v > *m) {
            return Err(format!("value {v} is above max {max}"));
        }
        if !self.allowed.is_empty() && !self.allowed.contains(&v) {
            return Err(format!(
                "value {v} is not one of allowed {:?}",
                self.allowed
            ));
        }
        Ok(())
    }
}

/// A validated Modbus device with its read plan.
#[derive(Debug, Clone)]
pub struct DeviceSettings {
    /// Device name.
    pub name: String,
    /// How to reach it.
    pub transport: Transport,
    /// Unit id.
    pub unit: u8,
    /// Poll interval.
    pub poll: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Retries per read within a poll.
    pub retries: u32,
    /// First reconnect delay.
    pub backoff: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Tags, in config order.
    pub tags: Vec<TagSettings>,
    /// The tags' specs, indexed like `tags`, as the plan refers to them.
    pub specs: Vec<TagSpec>,
    /// The reads one poll makes.
    pub plan: Plan,
}

/// How a bridged Modbus value is written into MQTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    /// `{"value": ..., "quality": ..., "ts": ...}`.
    Json,
    /// The value alone, as text.
    Raw,
}

/// A validated Modbus → MQTT bridge.
#[derive(Debug, Clone)]
pub struct PublishBridge {
    /// Which Modbus streams (`<device>/<tag>` patterns).
    pub from: TopicFilter,
    /// The topic template.
    pub to: TopicTemplate,
    /// Payload format.
    pub format: PayloadFormat,
    /// QoS.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// Publish only on change.
    pub on_change: bool,
}

/// A validated MQTT → Modbus bridge.
#[derive(Debug, Clone)]
pub struct WriteBridge {
    /// The command topic.
    pub from: TopicFilter,
    /// The subscription's QoS.
    pub qos: u8,
    /// Device index into [`AgentConfig::devices`].
    pub device: usize,
    /// Tag index into that device's tags.
    pub tag: usize,
    /// The tag's stream, `<device>/<tag>`.
    pub stream: StreamName,
}

struct Ctx<'a> {
    path: &'a Path,
}

impl Ctx<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key: key.into(),
            message: message.into(),
        }
    }
}

fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_owned(), port.parse().ok()?))
}

impl RawConfig {
    /// Checks every rule that needs no I/O and resolves relative paths against
    /// the config file's folder.
    pub fn validate(self, path: &Path) -> Result<AgentConfig, ConfigError> {
        let cx = Ctx { path };
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };

        let agent_id = validate_agent(&cx, &self.agent)?;
        let data_dir = resolve(&self.agent.data_dir);
        let uplink = match self.uplink {
            Some(u) => Some(validate_uplink(&cx, u, &resolve)?),
            None => None,
        };
        let outbox = validate_outbox(&cx, &self.outbox, &data_dir)?;
        let devices = validate_devices(&cx, &self.modbus)?;
        let mqtt = match self.mqtt {
            Some(m) => Some(validate_mqtt(&cx, m, &resolve)?),
            None => None,
        };
        let Bridges {
            publish: publish_bridges,
            write: write_bridges,
            warnings,
        } = validate_bridges(&cx, &self.bridges, &devices, mqtt.as_ref())?;
        validate_observability(&cx, &self.observability)?;
        let opcua_servers = validate_opcua(path, &self.opcua, &resolve)?;

        Ok(AgentConfig {
            source: path.to_owned(),
            agent_id,
            data_dir,
            labels: self.agent.labels,
            uplink,
            outbox,
            mqtt,
            devices,
            publish_bridges,
            write_bridges,
            opcua_servers,
            observability: self.observability,
            warnings,
        })
    }
}

/// `[agent]`: the id (or `local` without one), a data folder, and labels.
fn validate_agent(cx: &Ctx<'_>, a: &AgentSection) -> Result<AgentId, ConfigError> {
    let agent_id = match &a.id {
        Some(id) => AgentId::parse(id).map_err(|e| cx.err("agent.id", e.to_string()))?,
        None => AgentId::parse("local").map_err(|e| cx.err("agent.id", e.to_string()))?,
    };
    if a.data_dir.as_os_str().is_empty() {
        return Err(cx.err("agent.data_dir", "must not be empty"));
    }
    for (k, v) in &a.labels {
        if k.is_empty() || v.is_empty() {
            return Err(cx.err(
                format!("agent.labels.{k}"),
                "label names and values must not be empty",
            ));
        }
    }
    Ok(agent_id)
}

/// `[uplink]`, with its files resolved and the server name defaulted to the
/// hub's host.
fn validate_uplink(
    cx: &Ctx<'_>,
    u: UplinkSection,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<UplinkSection, ConfigError> {
    let Some((host, _)) = split_host_port(&u.hub) else {
        return Err(cx.err("uplink.hub", format!("{:?} is not host:port", u.hub)));
    };
    if u.reconnect_min.0.is_zero() || u.reconnect_min.0 > u.reconnect_max.0 {
        return Err(cx.err(
            "uplink.reconnect_min",
            "must be longer than zero and not exceed uplink.reconnect_max",
        ));
    }
    let server_name = u.server_name.unwrap_or(host);
    if rustls::pki_types::ServerName::try_from(server_name.clone()).is_err() {
        return Err(cx.err(
            "uplink.server_name",
            format!("{server_name:?} is not a DNS name or IP address"),
        ));
    }
    Ok(UplinkSection {
        hub: u.hub,
        ca: resolve(&u.ca),
        cert: resolve(&u.cert),
        key: resolve(&u.key),
        server_name: Some(server_name),
        reconnect_min: u.reconnect_min,
        reconnect_max: u.reconnect_max,
    })
}

/// `[outbox]`: its modes parsed, its limits checked, the database in
/// `data_dir`.
fn validate_outbox(
    cx: &Ctx<'_>,
    o: &OutboxSection,
    data_dir: &Path,
) -> Result<OutboxSettings, ConfigError> {
    let synchronous = match o.synchronous.as_str() {
        "full" => Synchronous::Full,
        "normal" => Synchronous::Normal,
        other => {
            return Err(cx.err(
                "outbox.synchronous",
                format!("{other:?} is not one of full, normal"),
            ))
        }
    };
    let eviction = match o.eviction.as_str() {
        "drop-oldest" => Eviction::DropOldest,
        "refuse-new" => Eviction::RefuseNew,
        other => {
            return Err(cx.err(
                "outbox.eviction",
                format!("{other:?} is not one of drop-oldest, refuse-new"),
            ))
        }
    };
    let on_corruption = match o.on_corruption.as_str() {
        "move-aside" => OnCorruption::MoveAside,
        "stop" => OnCorruption::Stop,
        other => {
            return Err(cx.err(
                "outbox.on_corruption",
                format!("{other:?} is not one of move-aside, stop"),
            ))
        }
    };
    if o.max_bytes.0 < 64 * 1024 {
        return Err(cx.err("outbox.max_bytes", "must be at least 64KiB"));
    }
    if o.max_age.0.is_zero() {
        return Err(cx.err("outbox.max_age", "must be longer than zero"));
    }
    if o.commit_batch == 0 || o.commit_batch > 1_000_000 {
        return Err(cx.err("outbox.commit_batch", "must be between 1 and 1000000"));
    }
    if o.commit_window.0 > Duration::from_secs(1) {
        return Err(cx.err(
            "outbox.commit_window",
            "must be at most 1s: MQTT acknowledgements wait for it",
        ));
    }
    Ok(OutboxSettings {
        path: data_dir.join("outbox.db"),
        synchronous,
        max_bytes: o.max_bytes.0,
        max_age: o.max_age.0,
        eviction,
        commit_batch: o.commit_batch,
        commit_window: o.commit_window.0,
        on_corruption,
    })
}

/// `[observability]`: a log format, a valid filter, a metrics address.
fn validate_observability(cx: &Ctx<'_>, obs: &ObservabilitySection) -> Result<(), ConfigError> {
    if !matches!(obs.log_format.as_str(), "text" | "json") {
        return Err(cx.err(
            "observability.log_format",
            format!("{:?} is not one of text, json", obs.log_format),
        ));
    }
    if let Err(e) = crate::logging::parse_filter(&obs.log) {
        return Err(cx.err(
            "observability.log",
            format!("invalid filter {:?}: {e}", obs.log),
        ));
    }
    if !obs.metrics.is_empty() && obs.metrics.parse::<std::net::SocketAddr>().is_err() {
        return Err(cx.err(
            "observability.metrics",
            format!("{:?} is not ip:port (or empty to disable)", obs.metrics),
        ));
    }
    Ok(())
}

fn validate_name(cx: &Ctx<'_>, key: String, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(cx.err(
            key,
            format!("{name:?} must be 1 to 128 ASCII letters, digits, '-', '_' or '.'"),
        ))
    }
}

fn validate_devices(cx: &Ctx<'_>, m: &ModbusSection) -> Result<Vec<DeviceSettings>, ConfigError> {
    let mut names = BTreeSet::new();
    let mut out = Vec::new();
    for (i, d) in m.devices.iter().enumerate() {
        let k = format!("modbus.devices[{i}]");
        validate_name(cx, format!("{k}.name"), &d.name)?;
        if !names.insert(d.name.clone()) {
            return Err(cx.err(
                format!("{k}.name"),
                format!("duplicate device name {:?}", d.name),
            ));
        }
        out.push(validate_device(cx, &k, d)?);
    }
    Ok(out)
}

/// One `[[modbus.devices]]` entry (at key `k`), its tags and its read plan.
fn validate_device(
    cx: &Ctx<'_>,
    k: &str,
    d: &DeviceSection,
) -> Result<DeviceSettings, ConfigError> {
    let transport = validate_transport(cx, k, d)?;
    validate_polling(cx, k, d)?;
    let tags = validate_tags(cx, k, d)?;
    let limits = PlanLimits {
        max_registers: d.max_registers,
        max_bits: d.max_bits,
        max_gap: d.max_gap,
    };
    let specs: Vec<TagSpec> = tags.iter().map(|t| t.spec.clone()).collect();
    let plan = plan(&specs, &limits).map_err(|e| cx.err(format!("{k}.tags"), e.to_string()))?;
    Ok(DeviceSettings {
        name: d.name.clone(),
        transport,
        unit: d.unit,
        poll: d.poll.0,
        timeout: d.timeout.0,
        retries: d.retries,
        backoff: d.backoff.0,
        backoff_max: d.backoff_max.0,
        tags,
        specs,
        plan,
    })
}

/// A device's `transport` with the keys it needs: `address` for TCP; `port`
/// and the serial line's settings for RTU.
fn validate_transport(cx: &Ctx<'_>, k: &str, d: &DeviceSection) -> Result<Transport, ConfigError> {
    match d.transport.as_str() {
        "tcp" => {
            let address = d
                .address
                .clone()
                .ok_or_else(|| cx.err(format!("{k}.address"), "required for transport \"tcp\""))?;
            if split_host_port(&address).is_none() {
                return Err(cx.err(
                    format!("{k}.address"),
                    format!("{address:?} is not host:port"),
                ));
            }
            Ok(Transport::Tcp { address })
        }
        "rtu" => {
            let port = d.port.clone().ok_or_else(|| {
                cx.err(
                    format!("{k}.port"),
                    "required for transport \"rtu\" (a serial device such as /dev/ttyUSB0)",
                )
            })?;
            if !matches!(d.parity.as_str(), "none" | "even" | "odd") {
                return Err(cx.err(
                    format!("{k}.parity"),
                    format!("{:?} is not one of none, even, odd", d.parity),
                ));
            }
            if !matches!(d.data_bits, 7 | 8) {
                return Err(cx.err(format!("{k}.data_bits"), "must be 7 or 8"));
            }
            if !matches!(d.stop_bits, 1 | 2) {
                return Err(cx.err(format!("{k}.stop_bits"), "must be 1 or 2"));
            }
            if d.baud == 0 {
                return Err(cx.err(format!("{k}.baud"), "must be above zero"));
            }
            Ok(Transport::Rtu {
                port,
                baud: d.baud,
                parity: d.parity.clone(),
                data_bits: d.data_bits,
                stop_bits: d.stop_bits,
            })
        }
        other => Err(cx.err(
            format!("{k}.transport"),
            format!("{other:?} is not one of tcp, rtu"),
        )),
    }
}

/// A device's unit id, timing (poll, timeout, backoff) and request sizes.
fn validate_polling(cx: &Ctx<'_>, k: &str, d: &DeviceSection) -> Result<(), ConfigError> {
    if d.unit > 247 {
        return Err(cx.err(
            format!("{k}.unit"),
            format!("{} is out of range 0..=247", d.unit),
        ));
    }
    if d.poll.0 < Duration::from_millis(10) {
        return Err(cx.err(format!("{k}.poll"), "must be at least 10ms"));
    }
    if d.timeout.0.is_zero() {
        return Err(cx.err(format!("{k}.timeout"), "must be longer than zero"));
    }
    if d.backoff.0 > d.backoff_max.0 {
        return Err(cx.err(format!("{k}.backoff"), "must not exceed backoff_max"));
    }
    if !(1..=125).contains(&d.max_registers) {
        return Err(cx.err(
            format!("{k}.max_registers"),
            format!("{} is out of range 1..=125", d.max_registers),
        ));
    }
    if !(1..=2000).contains(&d.max_bits) {
        return Err(cx.err(
            format!("{k}.max_bits"),
            format!("{} is out of range 1..=2000", d.max_bits),
        ));
    }
    Ok(())
}

/// A device's `[[...tags]]`: unique names, each a valid register spec.
fn validate_tags(
    cx: &Ctx<'_>,
    k: &str,
    d: &DeviceSection,
) -> Result<Vec<TagSettings>, ConfigError> {
    let mut tag_names = BTreeSet::new();
    let mut tags = Vec::new();
    for (j, t) in d.tags.iter().enumerate() {
        let tk = format!("{k}.tags[{j}]");
        validate_name(cx, format!("{tk}.name"), &t.name)?;
        if !tag_names.insert(t.name.clone()) {
            return Err(cx.err(
                format!("{tk}.name"),
                format!("duplicate tag name {:?} in device {:?}", t.name, d.name),
            ));
        }
        tags.push(validate_tag(cx, &tk, &d.name, t)?);
    }
    Ok(tags)
}

/// One tag (at key `tk`) of device `device`: its register spec, deadband,
/// writability and stream name.
fn validate_tag(
    cx: &Ctx<'_>,
    tk: &str,
    device: &str,
    t: &TagSection,
) -> Result<TagSettings, ConfigError> {
    let address = u16::try_from(t.address).map_err(|_| {
        cx.err(
            format!("{tk}.address"),
            format!("{} is out of range 0..=65535", t.address),
        )
    })?;
    let spec = TagSpec {
        table: t.table,
        address: RegisterAddress(address),
        data_type: t.data_type,
        order: t.order,
        bit: t.bit,
        length: t.length.unwrap_or(0),
        scale: t.scale,
        offset: t.offset,
    };
    spec.validate().map_err(|e| cx.err(tk, e.to_string()))?;
    if let Some(db) = t.deadband {
        if !db.is_finite() || db < 0.0 {
            return Err(cx.err(
                format!("{tk}.deadband"),
                "must be a finite number at least 0",
            ));
        }
    }
    if t.writable && !t.table.is_writable() {
        return Err(cx.err(
            format!("{tk}.writable"),
            format!("the {:?} table is read-only in Modbus", t.table),
        ));
    }
    let limits = WriteLimits {
        min: t.min,
        max: t.max,
        allowed: t.allowed.clone().unwrap_or_default(),
    };
    for (key, set) in [
        ("min", t.min.is_some()),
        ("max", t.max.is_some()),
        ("allowed", t.allowed.is_some()),
    ] {
        if set && !t.writable {
            return Err(cx.err(
                format!("{tk}.{key}"),
                "limits a write: set only on a tag with writable = true",
            ));
        }
    }
    let finite = |v: &f64| v.is_finite();
    if !t
        .min
        .iter()
        .chain(t.max.iter())
        .chain(limits.allowed.iter())
        .all(finite)
    {
        return Err(cx.err(
            tk.to_string(),
            "min, max and allowed must be finite numbers",
        ));
    }
    if let (Some(min), Some(max)) = (t.min, t.max) {
        if min > max {
            return Err(cx.err(format!("{tk}.min"), format!("{min} is above max {max}")));
        }
    }
    if t.allowed.as_ref().is_some_and(Vec::is_empty) {
        return Err(cx.err(format!("{tk}.allowed"), "must list at least one value"));
    }
    let stream = StreamName::parse(&format!("{device}/{}", t.name))
        .map_err(|e| cx.err(format!("{tk}.name"), e.to_string()))?;
    Ok(TagSettings {
        name: t.name.clone(),
        stream,
        spec,
        deadband: t.deadband,
        writable: t.writable,
        limits,
    })
}

fn validate_mqtt(
    cx: &Ctx<'_>,
    m: MqttSection,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Result<MqttSettings, ConfigError> {
    let (host, port) = split_host_port(&m.broker)
        .ok_or_else(|| cx.err("mqtt.broker", format!("{:?} is not host:port", m.broker)))?;
    if m.client_id.is_empty() || m.client_id.len() > 128 {
        return Err(cx.err("mqtt.client_id", "must be 1 to 128 characters"));
    }
    let login = match (m.username, m.password) {
        (Some(u), p) => Some((u, p.unwrap_or_default())),
        (None, Some(_)) => return Err(cx.err("mqtt.password", "given without mqtt.username")),
        (None, None) => None,
    };
    let keep_alive = m.keep_alive.0;
    if keep_alive < Duration::from_secs(1) || keep_alive > Duration::from_secs(65535) {
        return Err(cx.err("mqtt.keep_alive", "must be between 1s and 65535s"));
    }
    if m.max_payload.0 == 0 || m.max_payload.0 > 256 << 20 {
        return Err(cx.err(
            "mqtt.max_payload",
            "must be between 1 byte and 256MiB (the MQTT maximum)",
        ));
    }
    if m.reconnect_min.0 > m.reconnect_max.0 || m.reconnect_min.0.is_zero() {
        return Err(cx.err(
            "mqtt.reconnect_min",
            "must be longer than zero and not exceed mqtt.reconnect_max",
        ));
    }
    if m.max_inflight == 0 {
        return Err(cx.err("mqtt.max_inflight", "must be at least 1"));
    }
    let tls = match m.tls {
        Some(t) => {
            if t.cert.is_some() != t.key.is_some() {
                return Err(cx.err("mqtt.tls", "cert and key must be given together"));
            }
            Some(MqttTlsSection {
                ca: resolve(&t.ca),
                cert: t.cert.as_deref().map(resolve),
                key: t.key.as_deref().map(resolve),
                server_name: t.server_name,
            })
        }
        None => None,
    };
    let mut subscriptions = Vec::new();
    for (i, s) in m.subscribe.iter().enumerate() {
        let k = format!("mqtt.subscribe[{i}]");
        let filter = TopicFilter::parse(&s.filter)
            .map_err(|e| cx.err(format!("{k}.filter"), e.to_string()))?;
        if outpost_protocols::event::is_reserved(filter.as_str()) {
            return Err(cx.err(
                format!("{k}.filter"),
                format!(
                    "{:?}: streams under {:?} are the agent's own records; a message stored there could pass for one",
                    s.filter,
                    outpost_protocols::event::RESERVED_PREFIX
                ),
            ));
        }
        if s.qos > 2 {
            return Err(cx.err(format!("{k}.qos"), format!("{} is not 0, 1 or 2", s.qos)));
        }
        let unit = match s.ts_unit.as_str() {
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" => 1_000,
            "ns" => 1,
            other => {
                return Err(cx.err(
                    format!("{k}.ts_unit"),
                    format!("{other:?} is not one of s, ms, us, ns"),
                ))
            }
        };
        let ts_field = match &s.ts_field {
            Some(p) if p.starts_with('/') => Some((p.clone(), unit)),
            Some(p) => {
                return Err(cx.err(
                    format!("{k}.ts_field"),
                    format!("{p:?} is not a JSON pointer such as \"/ts\""),
                ))
            }
            None => None,
        };
        subscriptions.push(Subscription {
            filter,
            qos: s.qos,
            ts_field,
        });
    }
    let mut sparkplug = Vec::new();
    for (i, s) in m.sparkplug.iter().enumerate() {
        let k = format!("mqtt.sparkplug[{i}]");
        let g = s.group.as_str();
        if g.is_empty() || g == "STATE" || (g != "+" && g.contains(['/', '+', '#', '\0'])) {
            return Err(cx.err(
                format!("{k}.group"),
                format!("{g:?} is not a Sparkplug group id (one topic level, no wildcards, not STATE) or \"+\""),
            ));
        }
        if s.qos > 1 {
            return Err(cx.err(format!("{k}.qos"), format!("{} is not 0 or 1", s.qos)));
        }
        if s.rebirth_interval.0.is_zero() {
            return Err(cx.err(format!("{k}.rebirth_interval"), "must be longer than zero"));
        }
        let filter = TopicFilter::parse(&format!("spBv1.0/{g}/#"))
            .map_err(|e| cx.err(format!("{k}.group"), e.to_string()))?;
        sparkplug.push(SparkplugSettings {
            filter,
            qos: s.qos,
            rebirth: s.rebirth,
            rebirth_interval: s.rebirth_interval.0,
        });
    }
    Ok(MqttSettings {
        host,
        port,
        client_id: m.client_id,
        login,
        keep_alive,
        clean_session: m.clean_session,
        max_payload: m.max_payload.0 as usize,
        max_inflight: m.max_inflight,
        tls,
        reconnect_min: m.reconnect_min.0,
        reconnect_max: m.reconnect_max.0,
        subscriptions,
        sparkplug,
    })
}

fn validate_bridges(
    cx: &Ctx<'_>,
    bridges: &[BridgeSection],
    devices: &[DeviceSettings],
    mqtt: Option<&MqttSettings>,
) -> Result<Bridges, ConfigError> {
    let mut publish = Vec::new();
    let mut write = Vec::new();
    let mut warnings = Vec::new();
    for (i, b) in bridges.iter().enumerate() {
        let k = format!("bridges[{i}]");
        let Some(mqtt) = mqtt else {
            return Err(cx.err(k, "bridges need an [mqtt] section"));
        };
        if b.qos > 2 {
            return Err(cx.err(format!("{k}.qos"), format!("{} is not 0, 1 or 2", b.qos)));
        }
        match (b.from.split_once(':'), b.to.split_once(':')) {
            (Some(("modbus", from)), Some(("mqtt", to))) => {
                if b.allow_unauthenticated_writes.is_some() {
                    return Err(cx.err(
                        format!("{k}.allow_unauthenticated_writes"),
                        "applies only to bridges from mqtt: to modbus:",
                    ));
                }
                let from = TopicFilter::parse(from).map_err(|e| cx.err(format!("{k}.from"), e.to_string()))?;
                let matched = devices
                    .iter()
                    .flat_map(|d| d.tags.iter())
                    .any(|t| from.matches(t.stream.as_str()));
                if !matched {
                    return Err(cx.err(format!("{k}.from"), format!("no Modbus tag matches {:?}", from.as_str())));
                }
                let to = TopicTemplate::parse(to).map_err(|e| cx.err(format!("{k}.to"), e.to_string()))?;
                let format = match b.format.as_deref().unwrap_or("json") {
                    "json" => PayloadFormat::Json,
                    "raw" => PayloadFormat::Raw,
                    other => return Err(cx.err(format!("{k}.format"), format!("{other:?} is not one of json, raw"))),
                };
                let on_change = match b.on.as_deref().unwrap_or("change") {
                    "change" => true,
                    "poll" => false,
                    other => return Err(cx.err(format!("{k}.on"), format!("{other:?} is not one of change, poll"))),
                };
                publish.push(PublishBridge {
                    from,
                    to,
                    format,
                    qos: b.qos,
                    retain: b.retain.unwrap_or(false),
                    on_change,
                });
            }
            (Some(("mqtt", from)), Some(("modbus", to))) => {
                for (key, given) in [
                    ("format", b.format.is_some()),
                    ("on", b.on.is_some()),
                    ("retain", b.retain.is_some()),
                ] {
                    if given {
                        return Err(cx.err(
                            format!("{k}.{key}"),
                            "applies only to bridges from modbus: to mqtt:",
                        ));
                    }
                }
                let from = TopicFilter::parse(from).map_err(|e| cx.err(format!("{k}.from"), e.to_string()))?;
                if !from.is_exact() {
                    return Err(cx.err(
                        format!("{k}.from"),
                        format!("{:?}: a write bridge takes one topic, without the wildcards + and #, so that what may write the tag is exactly one topic", b.from),
                    ));
                }
                let (dev, tag) = to
                    .split_once('/')
                    .ok_or_else(|| cx.err(format!("{k}.to"), format!("{to:?} is not <device>/<tag>")))?;
                let di = devices
                    .iter()
                    .position(|d| d.name == dev)
                    .ok_or_else(|| cx.err(format!("{k}.to"), format!("no Modbus device named {dev:?}")))?;
                let ti = devices[di]
                    .tags
                    .iter()
                    .position(|t| t.name == tag)
                    .ok_or_else(|| cx.err(format!("{k}.to"), format!("device {dev:?} has no tag {tag:?}")))?;
                if !devices[di].tags[ti].writable {
                    return Err(cx.err(format!("{k}.to"), format!("tag {to:?} is not marked writable = true")));
                }
                if let Some(missing) = unauthenticated(mqtt) {
                    let what = format!("the write bridge from {:?} to {:?}", b.from, b.to);
                    if b.allow_unauthenticated_writes != Some(true) {
                        return Err(cx.err(
                            k,
                            format!("{what} needs TLS and a login to the site broker, but {missing}: anyone who can publish to the broker could write the tag; configure both, or set allow_unauthenticated_writes = true on this bridge to accept that"),
                        ));
                    }
                    warnings.push(cx.err(
                        format!("{k}.allow_unauthenticated_writes"),
                        format!("{what} accepts writes from anyone who can publish {from:?} to the site broker: {missing}", from = from.as_str()),
                    ).to_string());
                }
                write.push(WriteBridge {
                    from,
                    qos: b.qos,
                    device: di,
                    tag: ti,
                    stream: devices[di].tags[ti].stream.clone(),
                });
            }
            _ => {
                return Err(cx.err(
                    k,
                    format!("from {:?} to {:?}: a bridge goes from \"modbus:<device>/<tag>\" to \"mqtt:<topic>\" or from \"mqtt:<topic>\" to \"modbus:<device>/<tag>\"", b.from, b.to),
                ))
            }
        }
    }
    Ok(Bridges {
        publish,
        write,
        warnings,
    })
}

/// `[[bridges]]`, validated, and what they allow that `check` warns about.
struct Bridges {
    publish: Vec<PublishBridge>,
    write: Vec<WriteBridge>,
    warnings: Vec<String>,
}

/// What the connection to the site broker lacks for a write bridge to trust
/// who publishes, said for an error or a warning; `None` if it has TLS and a
/// login (a user name with a password, or a client certificate).
fn unauthenticated(m: &MqttSettings) -> Option<String> {
    let password = m
        .login
        .as_ref()
        .is_some_and(|(u, p)| !u.is_empty() && !p.is_empty());
    let certificate = m.tls.as_ref().is_some_and(|t| t.cert.is_some());
    let mut missing = Vec::new();
    if m.tls.is_none() {
        missing.push("no TLS ([mqtt.tls])");
    }
    if !password && !certificate {
        missing.push("no login (mqtt.username with mqtt.password, or a client certificate: cert and key in [mqtt.tls])");
    }
    if missing.is_empty() {
        None
    } else {
        Some(format!("[mqtt] has {}", missing.join(" and ")))
    }
}

#[cfg(test)]
mod tests;
