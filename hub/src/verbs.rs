//! The operator verbs that read the hub's store, while the hub runs or not:
//! `fleet list`, `events tail`, `events stats` and `sinks status`.
//!
//! Each verb loads the hub's config (`--config FILE`, with the same
//! environment overrides as `run`), opens `<data_dir>/hub.db` read-only
//! ([`StoreReader`], never creating it) and prints for people, or with
//! `--json` for scripts. Text output may change; JSON field names are stable.
//!
//! Exit statuses (see [`VerbError::exit_code`]): 2 for bad input (the config,
//! `--agent`, `--stream`), 1 when the store cannot be read (including: it does
//! not exist yet, like the agent's `outbox` verbs, because that passes once
//! the hub has started and is not something a retry with other flags fixes).

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use outpost_protocols::event::{AgentId, Event, EventError, Quality, Seq, Timestamp};
use outpost_protocols::topic::{TopicError, TopicFilter};

use crate::api::types::{Agent, EventDoc, EventStats, EventsTail, Sink};
use crate::clock;
use crate::config::{self, ConfigError, StoreKind};
use crate::printable::printable;
use crate::remote::{query, RemoteError, StoreOrApi};
use crate::store::{store_path, AgentEventStats, AgentRecord, SinkStatus, StoreError, StoreReader};

/// `outpost-hub fleet …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum FleetCommand {
    /// Every agent the hub knows: labels, first and last seen, acknowledged
    /// watermark, versions, policy version, reported backlog, connection state.
    List(FleetListArgs),
}

/// `outpost-hub sinks ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum SinksCommand {
    /// Each sink's queue (events waiting, the oldest one's age), what it
    /// accepted, rejected and was kept from by residency, its failures and
    /// last error.
    Status(SinksStatusArgs),
}

/// `outpost-hub sinks status`.
#[derive(Debug, Clone, clap::Args)]
pub struct SinksStatusArgs {
    /// The hub's store (`--config`) or its API (`--api`).
    #[command(flatten)]
    pub at: StoreOrApi,
    /// Print one JSON document (an array of objects).
    #[arg(long)]
    pub json: bool,
}

/// `outpost-hub fleet list`.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetListArgs {
    /// The hub's store (`--config`) or its API (`--api`).
    #[command(flatten)]
    pub at: StoreOrApi,
    /// Print one JSON document (an array of objects).
    #[arg(long)]
    pub json: bool,
}

/// `outpost-hub events …`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum EventsCommand {
    /// The newest stored events, oldest first.
    Tail(EventsTailArgs),
    /// Per agent: events stored, distinct seqs, lowest and highest seq.
    Stats(EventsStatsArgs),
}

/// `outpost-hub events tail`.
#[derive(Debug, Clone, clap::Args)]
pub struct EventsTailArgs {
    /// The hub's store (`--config`) or its API (`--api`).
    #[command(flatten)]
    pub at: StoreOrApi,
    /// Only this agent's events.
    #[arg(long, value_name = "ID")]
    pub agent: Option<String>,
    /// Only streams matching this MQTT-style filter (`plc1/+`, `plant/#`).
    #[arg(long, value_name = "PATTERN")]
    pub stream: Option<String>,
    /// How many events.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub limit: usize,
    /// One JSON object a line, as `outpost-agent outbox tail --json`.
    #[arg(long)]
    pub json: bool,
}

/// `outpost-hub events stats`.
#[derive(Debug, Clone, clap::Args)]
pub struct EventsStatsArgs {
    /// The hub's store (`--config`) or its API (`--api`).
    #[command(flatten)]
    pub at: StoreOrApi,
    /// Only this agent.
    #[arg(long, value_name = "ID")]
    pub agent: Option<String>,
    /// Print one JSON document (an array of objects).
    #[arg(long)]
    pub json: bool,
}

/// Why a verb failed; its message is the one line printed on stderr.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerbError {
    /// The config file could not be read or is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `[store] kind` names a store these verbs cannot read.
    #[error(
        "{}: store.kind: this verb reads the sqlite store, and this hub stores in {kind:?} (on jetstream: `fleet list`, `sinks status` and the `policy` verbs)",
        .path.display()
    )]
    NotSqlite {
        /// The config file.
        path: PathBuf,
        /// The configured kind.
        kind: &'static str,
    },
    /// `--agent` is not a valid agent id.
    #[error("--agent: {0}")]
    Agent(#[source] EventError),
    /// `--stream` is not a valid topic filter.
    #[error("--stream {pattern:?}: {source}")]
    Stream {
        /// The pattern as given.
        pattern: String,
        /// What is wrong with it.
        #[source]
        source: TopicError,
    },
    /// The store could not be opened or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing the output failed (a closed pipe, a full disk).
    #[error("cannot write the output: {0}")]
    Output(#[from] io::Error),
    /// A policy could not be applied or shown.
    #[error(transparent)]
    Policy(#[from] crate::policy::ApplyError),
    /// `audit verify` found an entry that was edited or removed.
    #[error("audit log broken at entry {id}: {reason}")]
    AuditBroken {
        /// The first entry that does not hold.
        id: u64,
        /// What is wrong.
        reason: String,
    },
    /// A combination of flags the verb cannot use.
    #[error("{0}")]
    Usage(String),
    /// A call to the hub's API failed (`--api`).
    #[error(transparent)]
    Remote(Box<RemoteError>),
    /// The audit key (or a public key given to check with) cannot be read
    /// or made, or others may read it.
    #[error(transparent)]
    AuditKey(#[from] crate::audit::key::KeyError),
    /// A certificate just issued could not be read back for the registry.
    #[error(transparent)]
    Certificate(#[from] crate::ca::CaError),
}

impl From<RemoteError> for VerbError {
    fn from(e: RemoteError) -> VerbError {
        VerbError::Remote(Box::new(e))
    }
}

impl VerbError {
    /// The exit status: 2 for bad input, 1 for a store that cannot be read or
    /// output that cannot be written.
    pub fn exit_code(&self) -> u8 {
        match self {
            VerbError::Config(_)
            | VerbError::NotSqlite { .. }
            | VerbError::Agent(_)
            | VerbError::Stream { .. }
            | VerbError::Usage(_)
            | VerbError::AuditKey(_) => 2,
            VerbError::Policy(crate::policy::ApplyError::Store(_)) => 1,
            VerbError::Policy(_) => 2,
            VerbError::Store(_)
            | VerbError::Output(_)
            | VerbError::AuditBroken { .. }
            | VerbError::Certificate(_) => 1,
            VerbError::Remote(e) => e.exit_code(),
        }
    }

    /// Whether the output's reader went away (`… | head`): not worth a message.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, VerbError::Output(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }
}

/// Runs a `fleet` verb, reading the config with overrides from `env` and
/// printing to `out`.
pub fn fleet(
    command: &FleetCommand,
    env: impl IntoIterator<Item = (String, String)>,
    out: &mut dyn io::Write,
) -> Result<(), VerbError> {
    match command {
        FleetCommand::List(args) => {
            let fleet = match args.at.api()? {
                Some(api) => records(api.get::<Vec<Agent>>("/fleet")?.iter().map(Agent::record))?,
                None => {
                    let path = config_path(args.at.config.as_deref())?;
                    let env: Vec<(String, String)> = env.into_iter().collect();
                    let cfg = config::load(path, env.clone())?;
                    match on_jetstream(path, &cfg, |js| async move { Ok(js.fleet().await?) })? {
                        Some(fleet) => fleet,
                        None => open(path, env)?.fleet()?,
                    }
                }
            };
            if args.json {
                writeln!(out, "{}", fleet_json(&fleet))?;
            } else {
                out.write_all(fleet_text(&fleet).as_bytes())?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// Runs a `sinks` verb, reading the config with overrides from `env` and
/// printing to `out`.
pub fn sinks(
    command: &SinksCommand,
    env: impl IntoIterator<Item = (String, String)>,
    out: &mut dyn io::Write,
) -> Result<(), VerbError> {
    match command {
        SinksCommand::Status(args) => {
            let (status, configured) = match args.at.api()? {
                Some(api) => {
                    let sinks = api.get::<Vec<Sink>>("/sinks")?;
                    let configured = sinks
                        .iter()
                        .filter(|s| s.configured)
                        .map(|s| s.sink.clone())
                        .collect();
                    (sinks.iter().map(Sink::record).collect(), configured)
                }
                None => {
                    let path = config_path(args.at.config.as_deref())?;
                    let env: Vec<(String, String)> = env.into_iter().collect();
                    let cfg = config::load(path, env.clone())?;
                    let configured: Vec<String> = cfg.sinks.iter().map(|s| s.id.clone()).collect();
                    let ids = configured.clone();
                    let status = match on_jetstream(path, &cfg, |js| async move {
                        Ok(js.sinks_status(&ids).await?)
                    })? {
                        Some(status) => status,
                        None => open(path, env)?.sinks_status(&configured)?,
                    };
                    (status, configured)
                }
            };
            let now = clock::unix_now().0;
            if args.json {
                writeln!(out, "{}", sinks_json(&status, &configured, now))?;
            } else {
                out.write_all(sinks_text(&status, &configured, now).as_bytes())?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// Seconds from `then` (Unix ns) to `now`.
fn age_s(then: Option<i64>, now: i64) -> Option<f64> {
    then.map(|t| (now.saturating_sub(t)).max(0) as f64 / 1e9)
}

/// `sinks status --json`: one object per sink, ordered by id; `configured`
/// is false for a sink the store knows but the config no longer names.
pub fn sinks_json(status: &[SinkStatus], configured: &[String], now: i64) -> serde_json::Value {
    status
        .iter()
        .map(|s| {
            serde_json::json!({
                "sink": s.sink,
                "configured": configured.contains(&s.sink),
                "pending": s.pending,
                "lag_seconds": age_s(s.oldest_queued_at, now),
                "delivered": s.delivered,
                "rejected": s.rejected,
                "refused_residency": s.refused,
                "failures": s.failures,
                "last_delivered_at": s.last_delivered_at,
                "last_error": s.last_error,
                "last_error_at": s.last_error_at,
            })
        })
        .collect()
}

/// `sinks status`: one line per sink.
pub fn sinks_text(status: &[SinkStatus], configured: &[String], now: i64) -> String {
    if status.is_empty() {
        return "no sinks configured\n".into();
    }
    let mut t = String::new();
    for s in status {
        let lag = age_s(s.oldest_queued_at, now).map_or("-".into(), |a| format!("{a:.1}s"));
        let _ = write!(
            t,
            "{}{}  pending {}  lag {lag}  delivered {}  rejected {}  refused {}  failures {}",
            s.sink,
            if configured.contains(&s.sink) {
                ""
            } else {
                " (not configured)"
            },
            s.pending,
            s.delivered,
            s.rejected,
            s.refused,
            s.failures,
        );
        if let Some(e) = &s.last_error {
            let ago =
                age_s(s.last_error_at, now).map_or(String::new(), |a| format!(" ({a:.0}s ago)"));
            // The sink's far end wrote part of this text.
            let _ = write!(t, "  last error{ago}: {}", printable(e));
        }
        t.push('\n');
    }
    t
}

/// Runs an `events` verb, reading the config with overrides from `env` and
/// printing to `out`.
pub fn events(
    command: &EventsCommand,
    env: impl IntoIterator<Item = (String, String)>,
    out: &mut dyn io::Write,
) -> Result<(), VerbError> {
    match command {
        EventsCommand::Tail(args) => {
            if let Some(api) = args.at.api()? {
                let path = format!(
                    "/events/tail{}",
                    query(&[
                        ("agent", args.agent.clone()),
                        ("stream", args.stream.clone()),
                        ("limit", Some(args.limit.to_string())),
                    ])
                );
                for raw in api.get::<EventsTail>(&path)?.events {
                    if args.json {
                        writeln!(out, "{}", raw.get())?;
                    } else {
                        let doc: EventDoc =
                            serde_json::from_str(raw.get()).map_err(|e| RemoteError::Answer {
                                url: path.clone(),
                                why: e.to_string(),
                            })?;
                        writeln!(out, "{}", event_doc_text(&doc))?;
                    }
                }
                out.flush()?;
                return Ok(());
            }
            let cfg = load(config_path(args.at.config.as_deref())?, env)?;
            let agent = parse_agent(args.agent.as_deref())?;
            let pattern = args
                .stream
                .as_deref()
                .map(|p| {
                    TopicFilter::parse(p).map_err(|source| VerbError::Stream {
                        pattern: p.to_owned(),
                        source,
                    })
                })
                .transpose()?;
            let reader = StoreReader::open(&cfg)?;
            for event in reader.events_tail(agent.as_ref(), pattern.as_ref(), args.limit)? {
                if args.json {
                    writeln!(out, "{}", event.json_line())?;
                } else {
                    writeln!(out, "{}", event_text(&event))?;
                }
            }
        }
        EventsCommand::Stats(args) => {
            let stats = match args.at.api()? {
                Some(api) => {
                    let path = format!("/events/stats{}", query(&[("agent", args.agent.clone())]));
                    records(
                        api.get::<Vec<EventStats>>(&path)?
                            .iter()
                            .map(EventStats::record),
                    )?
                }
                None => {
                    let cfg = load(config_path(args.at.config.as_deref())?, env)?;
                    let agent = parse_agent(args.agent.as_deref())?;
                    StoreReader::open(&cfg)?.events_stats(agent.as_ref())?
                }
            };
            if args.json {
                writeln!(out, "{}", stats_json(&stats))?;
            } else {
                out.write_all(stats_text(&stats).as_bytes())?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// `--config`, which clap requires unless `--api` is given.
pub(crate) fn config_path(config: Option<&Path>) -> Result<&Path, VerbError> {
    config.ok_or_else(|| VerbError::Usage("give --config FILE, or --api URL".into()))
}

/// The API's documents as the store's records; an id the API sent that
/// is not an agent id is an answer this client cannot use.
fn records<T>(docs: impl Iterator<Item = Option<T>>) -> Result<Vec<T>, VerbError> {
    docs.collect::<Option<Vec<T>>>().ok_or_else(|| {
        VerbError::from(RemoteError::Answer {
            url: "the API".into(),
            why: "an agent id that is not valid".into(),
        })
    })
}

/// Runs `f` on the JetStream store that `cfg` (read from `config`) names,
/// on a runtime of its own (the verbs are synchronous); `None` for a hub on
/// the sqlite store.
pub(crate) fn on_jetstream<T, F, Fut>(
    config: &Path,
    cfg: &crate::config::HubConfig,
    f: F,
) -> Result<Option<T>, VerbError>
where
    F: FnOnce(crate::store::jetstream::JetStreamStore) -> Fut,
    Fut: std::future::Future<Output = Result<T, VerbError>>,
{
    let Some(js) = cfg.store.jetstream() else {
        return Ok(None);
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let base = config.parent().unwrap_or(Path::new("")).to_owned();
    rt.block_on(async move {
        let store = crate::store::jetstream::JetStreamStore::open(js, &base).await?;
        let out = f(store.clone()).await;
        store.close().await;
        out.map(Some)
    })
}

/// Loads and validates the config and returns the store file it names.
fn load(
    config: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<PathBuf, VerbError> {
    let cfg = config::load(config, env)?;
    if let StoreKind::JetStream(_) = cfg.store {
        return Err(VerbError::NotSqlite {
            path: config.to_owned(),
            kind: cfg.store.name(),
        });
    }
    Ok(store_path(config, &cfg.hub.data_dir))
}

fn open(
    config: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<StoreReader, VerbError> {
    Ok(StoreReader::open(&load(config, env)?)?)
}

fn parse_agent(agent: Option<&str>) -> Result<Option<AgentId>, VerbError> {
    agent
        .map(|a| AgentId::parse(a).map_err(VerbError::Agent))
        .transpose()
}

/// `fleet list --json`: an array of objects, one per agent, ordered by id.
pub fn fleet_json(fleet: &[AgentRecord]) -> serde_json::Value {
    fleet
        .iter()
        .map(|a| {
            serde_json::json!({
                "agent_id": a.agent_id.as_str(),
                "labels": a.labels,
                "first_seen": a.first_seen.0,
                "last_seen": a.last_seen.0,
                "connected": a.connected(),
                "sessions": a.sessions,
                "watermark": a.watermark.0,
                "agent_version": a.agent_version,
                "protocol_version": a.protocol_version,
                "policy_version": a.policy_version,
                "policy_error": a.policy_error,
                "policy_dropped": a.policy_dropped,
                "policy_modified": a.policy_modified,
                "backlog_events": a.backlog_events,
                "backlog_bytes": a.backlog_bytes,
                "labels_ignored": a.labels_ignored,
                "revoked": a.revoked.as_ref().map(|r| serde_json::json!({
                    "at": r.at.0,
                    "by": r.by,
                    "reason": r.reason,
                })),
                "cert_not_after": a.cert_not_after.map(|t| t.0),
                "cert_serial": a.cert_serial,
            })
        })
        .collect()
}

/// `fleet list`, for people: an aligned table.
pub fn fleet_text(fleet: &[AgentRecord]) -> String {
    if fleet.is_empty() {
        return "no agents in the registry yet\n".into();
    }
    let dash = || "-".to_owned();
    let rows: Vec<Vec<String>> = fleet
        .iter()
        .map(|a| {
            let state = match (a.sessions, &a.revoked) {
                (_, Some(_)) => "revoked".to_owned(),
                (0, None) => "disconnected".to_owned(),
                (1, None) => "connected".to_owned(),
                (n, None) => format!("connected ({n} sessions)"),
            };
            let backlog = match (a.backlog_events, a.backlog_bytes) {
                (Some(e), Some(b)) => format!("{e} ev / {b} B"),
                _ => dash(),
            };
            let labels = if a.labels.is_empty() {
                dash()
            } else {
                a.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            vec![
                a.agent_id.to_string(),
                state,
                time_text(a.last_seen),
                a.watermark.0.to_string(),
                backlog,
                a.agent_version.clone().unwrap_or_else(dash),
                a.protocol_version.map_or_else(dash, |v| v.to_string()),
                match (a.policy_version, &a.policy_error) {
                    (_, Some(_)) => format!("{} (refused newer)", a.policy_version.unwrap_or(0)),
                    (Some(v), None) => v.to_string(),
                    (None, None) => dash(),
                },
                if a.policy_dropped + a.policy_modified == 0 {
                    dash()
                } else {
                    format!(
                        "{} dropped / {} changed",
                        a.policy_dropped, a.policy_modified
                    )
                },
                time_text(a.first_seen),
                a.cert_not_after.map_or_else(dash, time_text),
                labels,
            ]
        })
        .collect();
    table(
        &[
            ("AGENT", false),
            ("STATE", false),
            ("LAST SEEN", false),
            ("WATERMARK", true),
            ("BACKLOG", true),
            ("VERSION", false),
            ("PROTOCOL", true),
            ("POLICY", true),
            ("ENFORCED AT HUB", true),
            ("FIRST SEEN", false),
            ("CERT EXPIRES", false),
            ("LABELS", false),
        ],
        &rows,
    )
}

/// `events stats --json`: an array of objects, one per agent, ordered by id.
pub fn stats_json(stats: &[AgentEventStats]) -> serde_json::Value {
    stats
        .iter()
        .map(|s| {
            serde_json::json!({
                "agent_id": s.agent_id.as_str(),
                "count": s.count,
                "distinct_seqs": s.distinct_seqs,
                "min_seq": s.min_seq.map(|q| q.0),
                "max_seq": s.max_seq.map(|q| q.0),
            })
        })
        .collect()
}

/// `events stats`, for people: an aligned table.
pub fn stats_text(stats: &[AgentEventStats]) -> String {
    if stats.is_empty() {
        return "no events stored yet\n".into();
    }
    let seq = |q: Option<Seq>| q.map_or_else(|| "-".to_owned(), |q| q.0.to_string());
    let rows: Vec<Vec<String>> = stats
        .iter()
        .map(|s| {
            vec![
                s.agent_id.to_string(),
                s.count.to_string(),
                s.distinct_seqs.to_string(),
                seq(s.min_seq),
                seq(s.max_seq),
            ]
        })
        .collect();
    table(
        &[
            ("AGENT", false),
            ("EVENTS", true),
            ("DISTINCT SEQS", true),
            ("MIN SEQ", true),
            ("MAX SEQ", true),
        ],
        &rows,
    )
}

/// One event, for people: `agent seq ts stream = value [quality] reason`, the
/// agent's `outbox tail` line with the agent in front.
pub fn event_text(e: &Event) -> String {
    let quality = match &e.body.quality {
        Quality::Bad(r) => format!(" [bad] {r}"),
        Quality::Uncertain(r) => format!(" [uncertain] {r}"),
        _ => String::new(),
    };
    // The agent named the stream and wrote the reasons.
    let line = format!(
        "{} {:>10} {} {} = {}{quality}",
        e.agent_id,
        e.seq.0,
        e.body.ts.0,
        e.body.stream,
        e.body.value.to_json()
    );
    printable(&line).into_owned()
}

/// [`event_text`] of an event as the API sends it: the same line.
pub fn event_doc_text(e: &EventDoc) -> String {
    let quality = match (e.quality.status.as_str(), &e.quality.reason) {
        ("good", _) => String::new(),
        (status, reason) => format!(" [{status}] {}", reason.as_deref().unwrap_or("")),
    };
    format!(
        "{} {:>10} {} {} = {}{quality}",
        e.agent_id, e.seq, e.ts, e.stream, e.value
    )
}

/// A Unix-ns time as RFC 3339 in UTC, to the second; the number itself when it
/// is before 1970.
/// A timestamp as RFC 3339 UTC, to the second, for people.
pub fn time_text(ts: Timestamp) -> String {
    match u64::try_from(ts.0) {
        Ok(ns) => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
        }
        Err(_) => ts.0.to_string(),
    }
}

/// Renders rows under a header, each column as wide as its widest cell, two
/// spaces apart; columns flagged `true` are right-aligned. Every cell is
/// made [`printable`]: agents choose their versions and labels.
fn table(header: &[(&str, bool)], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| printable(c).into_owned()).collect())
        .collect();
    let rows = rows.as_slice();
    let width = |i: usize| {
        rows.iter()
            .filter_map(|r| r.get(i))
            .map(|c| c.chars().count())
            .chain([header[i].0.len()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..header.len()).map(width).collect();
    let mut out = String::new();
    let head: Vec<String> = header.iter().map(|(h, _)| (*h).to_owned()).collect();
    for row in std::iter::once(&head).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            let right = header.get(i).is_some_and(|(_, r)| *r);
            if i > 0 {
                line.push_str("  ");
            }
            if right {
                let _ = write!(line, "{cell:>w$}");
            } else {
                let _ = write!(line, "{cell:<w$}");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use outpost_protocols::event::{EventBody, Reason, StreamName, Value};

    use super::*;

    fn record(id: &str, sessions: u64) -> AgentRecord {
        AgentRecord {
            agent_id: AgentId::parse(id).expect("valid"),
            labels: BTreeMap::from([("site".to_owned(), "depot-17".to_owned())]),
            labels_ignored: 0,
            revoked: None,
            first_seen: Timestamp(1_718_000_000_000_000_000),
            last_seen: Timestamp(1_718_000_060_000_000_000),
            agent_version: Some("0.1.0".into()),
            protocol_version: Some(1),
            watermark: Seq(1523),
            backlog_events: Some(12),
            backlog_bytes: Some(3120),
            sessions,
            policy_version: None,
            policy_error: None,
            policy_dropped: 0,
            policy_modified: 0,
            cert_not_after: Some(Timestamp(1_790_000_000_000_000_000)),
            cert_serial: Some("0a1b".into()),
        }
    }

    #[test]
    fn fleet_text_is_an_aligned_table_with_a_header() {
        let text = fleet_text(&[record("gw-1", 1), record("depot-17.gw-20", 0)]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("AGENT "), "{text}");
        // Every row puts its watermark where the header does.
        let col = lines[0].find("WATERMARK").expect("header") + "WATERMARK".len();
        for l in &lines[1..] {
            assert_eq!(&l[col - 4..col], "1523", "{text}");
        }
        assert!(lines[1].contains("connected") && lines[2].contains("disconnected"));
        assert!(text.contains("2024-06-10T06:13:20Z"), "{text}");
        assert!(text.contains("site=depot-17"), "{text}");
        assert!(lines[0].contains("CERT EXPIRES"), "{text}");
        assert!(text.contains("2026-09-21T"), "{text}");
    }

    #[test]
    fn fleet_json_has_the_contract_fields_and_null_policy() {
        let j = fleet_json(&[record("gw-1", 2)]);
        let a = &j[0];
        for k in [
            "agent_id",
            "labels",
            "first_seen",
            "last_seen",
            "connected",
            "sessions",
            "watermark",
            "agent_version",
            "protocol_version",
            "policy_version",
            "policy_error",
            "policy_dropped",
            "policy_modified",
            "backlog_events",
            "backlog_bytes",
            "cert_not_after",
            "cert_serial",
        ] {
            assert!(a.get(k).is_some(), "missing {k}: {a}");
        }
        assert_eq!(a["cert_not_after"], 1_790_000_000_000_000_000_i64);
        assert_eq!(a["connected"], true);
        assert_eq!(a["watermark"], 1523);
        assert!(a["policy_version"].is_null());
        assert_eq!(a["labels"]["site"], "depot-17");
    }

    #[test]
    fn event_text_puts_the_agent_before_the_agents_tail_line() {
        let e = Event {
            agent_id: AgentId::parse("gw-1").expect("valid"),
            seq: Seq(1522),
            body: EventBody {
                stream: StreamName::parse("plc1/level").expect("valid"),
                ts: Timestamp(1_718_000_005_000_198_114),
                value: Value::F64(42.1),
                quality: Quality::Bad(Reason::Timeout),
                attrs: BTreeMap::new(),
            },
        };
        assert_eq!(
            event_text(&e),
            "gw-1       1522 1718000005000198114 plc1/level = 42.1 [bad] timeout"
        );
    }

    #[test]
    fn what_agents_and_sinks_wrote_reaches_the_terminal_escaped() {
        let esc = "\u{1b}]0;owned\u{7}\u{1b}[2J\u{9b}1A";
        let mut a = record("gw-1", 1);
        a.agent_version = Some(format!("1.0{esc}"));
        a.labels = BTreeMap::from([(format!("site{esc}"), format!("x\n{esc}"))]);
        let e = Event {
            agent_id: AgentId::parse("gw-1").expect("valid"),
            seq: Seq(1),
            body: EventBody {
                stream: StreamName::parse(&format!("plc1/{esc}")).expect("valid"),
                ts: Timestamp(0),
                value: Value::F64(1.0),
                quality: Quality::Bad(Reason::Other(format!("r{esc}"))),
                attrs: BTreeMap::new(),
            },
        };
        let mut sink = SinkStatus {
            sink: "cloud".into(),
            pending: 0,
            oldest_queued_at: None,
            delivered: 0,
            rejected: 0,
            refused: 0,
            failures: 1,
            last_delivered_at: None,
            last_error: Some(format!("503 {esc}")),
            last_error_at: None,
        };
        sink.last_error_at = Some(0);
        for text in [
            fleet_text(&[a]),
            event_text(&e),
            sinks_text(&[sink], &["cloud".into()], 0),
        ] {
            // One line per row, each free of what a terminal would obey.
            assert!(
                text.lines()
                    .all(|l| !l.chars().any(crate::printable::is_unsafe)),
                "{text:?}"
            );
            assert!(text.contains("\\u{1b}]0;owned"), "{text:?}");
        }
    }

    #[test]
    fn bad_input_exits_2_and_store_failures_exit_1() {
        let agent = AgentId::parse("a b").expect_err("invalid");
        assert_eq!(VerbError::Agent(agent).exit_code(), 2);
        let missing = VerbError::Store(StoreError::NotFound {
            path: "/nowhere/hub.db".into(),
        });
        assert_eq!(missing.exit_code(), 1);
        assert!(missing.to_string().contains("has not stored anything yet"));
    }
}
