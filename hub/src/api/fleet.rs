//! `/api/v1/fleet` and `/api/v1/agents/{id}`: the fleet registry, read with
//! the same store calls as `fleet list`.
//!
//! The list is filtered, sorted and paged here rather than by the store:
//! the registry is one row per agent (thousands, not millions), read whole
//! in milliseconds, and the one place that judges an agent's health
//! ([`health`]) also sorts and filters by it, so the dashboard's table and
//! its counts cannot disagree.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::api::auth::Permission;
use crate::api::caller::Authed;
use crate::api::problem::Problem;
use crate::api::state::{store_problem, ApiState, ApiStore};
use crate::api::types::Agent;
use crate::store::AgentRecord;

/// This resource's routes.
pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/fleet", get(list))
        .route("/fleet/summary", get(summary))
        .route("/agents/{id}", get(agent))
}

/// An agent with an open session is `stale` when the hub has stored nothing
/// from it for this long (`last_seen` moves with every stored batch, every
/// connection and every disconnection): its devices or its polling stopped.
pub const STALE_AFTER_NS: i64 = 5 * 60 * 1_000_000_000;

/// A certificate is `expiring` this long before its `not_after` (the agent
/// itself warns from the same day on; it renews at two thirds of its life).
pub const EXPIRING_NS: i64 = 30 * 24 * 3600 * 1_000_000_000;

/// The most agents one page holds.
pub const MAX_PAGE: usize = 1000;

/// An agent's health, judged by the hub from its registry row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    /// An operator revoked it: refused at the handshake.
    Revoked,
    /// No open session.
    Offline,
    /// A session is open, but nothing was stored from it for 5 minutes.
    Stale,
    /// A session is open and it stored something in the last 5 minutes.
    Connected,
}

impl Health {
    fn name(self) -> &'static str {
        match self {
            Health::Revoked => "revoked",
            Health::Offline => "offline",
            Health::Stale => "stale",
            Health::Connected => "connected",
        }
    }
}

/// `a`'s health at `now` (Unix ns): revoked, else offline, else stale, else
/// connected.
pub fn health(a: &AgentRecord, now: i64) -> Health {
    if a.revoked.is_some() {
        Health::Revoked
    } else if !a.connected() {
        Health::Offline
    } else if now.saturating_sub(a.last_seen.0) > STALE_AFTER_NS {
        Health::Stale
    } else {
        Health::Connected
    }
}

/// Whether `a`'s bound certificate expires within 30 days of `now` (or has).
pub fn cert_expiring(a: &AgentRecord, now: i64) -> bool {
    a.cert_not_after
        .is_some_and(|t| t.0.saturating_sub(now) < EXPIRING_NS)
}

/// One agent with the hub's judgement of it: the registry's document and
/// its health.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FleetAgent {
    /// The registry's document, as `fleet list --json` has it.
    #[serde(flatten)]
    pub agent: Agent,
    /// `connected`, `stale` (a session but nothing stored for 5 minutes),
    /// `offline` or `revoked`.
    pub health: Health,
    /// Whether its certificate expires within 30 days (or has expired).
    pub cert_expiring: bool,
}

impl FleetAgent {
    fn new(a: &AgentRecord, now: i64) -> FleetAgent {
        FleetAgent {
            agent: Agent::from(a),
            health: health(a, now),
            cert_expiring: cert_expiring(a, now),
        }
    }
}

/// The registry, on either store.
pub(crate) async fn fleet(state: &ApiState) -> Result<Vec<AgentRecord>, Problem> {
    match &state.store {
        ApiStore::Sqlite(_) => {
            state
                .read("the fleet", |r| r.fleet().map_err(store_problem))
                .await
        }
        ApiStore::JetStream(js) => js.fleet().await.map_err(store_problem),
    }
}

/// The list's filters, order and page; without any, every agent by id.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FleetParams {
    /// Labels every listed agent has, `name=value` pairs separated by
    /// commas (`site=north,line=3`); `name` alone: has the label at all.
    pub label: Option<String>,
    /// Only agents whose id contains this text.
    pub q: Option<String>,
    /// Only agents in this health: `connected`, `stale`, `offline`,
    /// `revoked`, or `cert-expiring`.
    pub health: Option<String>,
    /// The order: `id` (default), `health`, `last_seen`, `first_seen`,
    /// `backlog`, `policy_version`, `agent_version`, `cert_not_after`;
    /// `-` before it for descending. Ties go by id.
    pub sort: Option<String>,
    /// Agents per page, 1 to 1000 (default: all).
    pub limit: Option<usize>,
    /// How many agents of the order to skip (default 0).
    pub offset: Option<usize>,
}

/// A label filter's pairs: `(name, Some(value))` or `(name, None)`.
fn label_filter(text: &str) -> Result<Vec<(String, Option<String>)>, Problem> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((n, _)) if n.trim().is_empty() => Err(Problem::bad_request(format!(
                "label {p:?}: the name before '=' is empty"
            ))),
            Some((n, v)) => Ok((n.trim().to_owned(), Some(v.trim().to_owned()))),
            None => Ok((p.to_owned(), None)),
        })
        .collect()
}

type Order = fn(&FleetAgent, &FleetAgent) -> std::cmp::Ordering;

/// The comparison `sort` names, and whether it is descending.
fn order(sort: &str) -> Result<(Order, bool), Problem> {
    let (desc, key) = match sort.strip_prefix('-') {
        Some(k) => (true, k),
        None => (false, sort),
    };
    let f: Order = match key {
        "id" => |a, b| a.agent.agent_id.cmp(&b.agent.agent_id),
        "health" => |a, b| a.health.cmp(&b.health),
        "last_seen" => |a, b| a.agent.last_seen.cmp(&b.agent.last_seen),
        "first_seen" => |a, b| a.agent.first_seen.cmp(&b.agent.first_seen),
        "backlog" => |a, b| a.agent.backlog_events.cmp(&b.agent.backlog_events),
        "policy_version" => |a, b| a.agent.policy_version.cmp(&b.agent.policy_version),
        "agent_version" => |a, b| a.agent.agent_version.cmp(&b.agent.agent_version),
        "cert_not_after" => |a, b| a.agent.cert_not_after.cmp(&b.agent.cert_not_after),
        other => {
            return Err(Problem::bad_request(format!(
                "sort {other:?} is not one of id, health, last_seen, first_seen, backlog, \
                 policy_version, agent_version, cert_not_after (with '-' for descending)"
            )))
        }
    };
    Ok((f, desc))
}

/// The agents of `records` that `p` selects, in its order, and how many
/// matched before paging.
pub fn select(
    records: &[AgentRecord],
    p: &FleetParams,
    now: i64,
) -> Result<(Vec<FleetAgent>, usize), Problem> {
    let labels = label_filter(p.label.as_deref().unwrap_or(""))?;
    let health = match p.health.as_deref() {
        None | Some("") => None,
        Some(h @ ("connected" | "stale" | "offline" | "revoked" | "cert-expiring")) => Some(h),
        Some(h) => {
            return Err(Problem::bad_request(format!(
                "health {h:?} is not one of connected, stale, offline, revoked, cert-expiring"
            )))
        }
    };
    let (cmp, desc) = order(p.sort.as_deref().unwrap_or("id"))?;
    let limit = p.limit.unwrap_or(usize::MAX);
    if limit == 0 || (p.limit.is_some() && limit > MAX_PAGE) {
        return Err(Problem::bad_request(format!(
            "limit {limit} is not within 1 to {MAX_PAGE}"
        )));
    }
    let q = p.q.as_deref().unwrap_or("");
    let mut all: Vec<FleetAgent> = records
        .iter()
        .filter(|a| a.agent_id.as_str().contains(q))
        .filter(|a| {
            labels.iter().all(|(n, v)| match v {
                Some(v) => a.labels.get(n) == Some(v),
                None => a.labels.contains_key(n),
            })
        })
        .map(|a| FleetAgent::new(a, now))
        .filter(|a| match health {
            None => true,
            Some("cert-expiring") => a.cert_expiring,
            Some(h) => a.health.name() == h,
        })
        .collect();
    all.sort_by(|a, b| {
        let o = cmp(a, b);
        let o = if desc { o.reverse() } else { o };
        o.then_with(|| a.agent.agent_id.cmp(&b.agent.agent_id))
    });
    let total = all.len();
    let page = all
        .into_iter()
        .skip(p.offset.unwrap_or(0))
        .take(limit)
        .collect();
    Ok((page, total))
}

/// The header that carries how many agents matched before paging.
pub const TOTAL_HEADER: &str = "x-total-count";

/// Every agent the hub knows (by default ordered by id), with its health;
/// filtered, ordered and paged by the parameters.
#[utoipa::path(get, path = "/api/v1/fleet", tag = "fleet", params(FleetParams),
    responses(
        (status = 200, description = "The agents of the page", body = Vec<FleetAgent>,
            headers(("x-total-count" = u64, description = "How many agents matched before paging"))),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<ApiState>,
    caller: Authed,
    Query(p): Query<FleetParams>,
) -> Result<Response, Problem> {
    caller.require(Permission::Read).await?;
    let (page, total) = select(&fleet(&state).await?, &p, crate::clock::unix_now().0)?;
    Ok(([(TOTAL_HEADER, total.to_string())], Json(page)).into_response())
}

/// The fleet in numbers: how many agents in each health, and their backlog.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FleetSummary {
    /// Agents in the registry.
    pub agents: u64,
    /// Of them, connected (a session, something stored in 5 minutes).
    pub connected: u64,
    /// A session, but nothing stored for 5 minutes.
    pub stale: u64,
    /// No session.
    pub offline: u64,
    /// Revoked.
    pub revoked: u64,
    /// Certificates expiring within 30 days (or expired).
    pub cert_expiring: u64,
    /// Agents whose last policy push they refused (`policy_error`).
    pub policy_errors: u64,
    /// The outbox backlogs the agents last reported, summed, in events.
    pub backlog_events: u64,
    /// The same, in bytes.
    pub backlog_bytes: u64,
}

/// [`FleetSummary`] of `records` at `now`.
pub fn summarise(records: &[AgentRecord], now: i64) -> FleetSummary {
    let mut s = FleetSummary::default();
    for a in records {
        s.agents += 1;
        match health(a, now) {
            Health::Connected => s.connected += 1,
            Health::Stale => s.stale += 1,
            Health::Offline => s.offline += 1,
            Health::Revoked => s.revoked += 1,
        }
        s.cert_expiring += u64::from(cert_expiring(a, now));
        s.policy_errors += u64::from(a.policy_error.is_some());
        s.backlog_events = s
            .backlog_events
            .saturating_add(a.backlog_events.unwrap_or(0));
        s.backlog_bytes = s.backlog_bytes.saturating_add(a.backlog_bytes.unwrap_or(0));
    }
    s
}

/// How many agents are in each health, and their summed backlog.
#[utoipa::path(get, path = "/api/v1/fleet/summary", tag = "fleet",
    responses(
        (status = 200, description = "The counts", body = FleetSummary),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn summary(
    State(state): State<ApiState>,
    caller: Authed,
) -> Result<Json<FleetSummary>, Problem> {
    caller.require(Permission::Read).await?;
    Ok(Json(summarise(
        &fleet(&state).await?,
        crate::clock::unix_now().0,
    )))
}

/// One agent, with its health.
#[utoipa::path(get, path = "/api/v1/agents/{id}", tag = "fleet",
    params(("id" = String, Path, description = "The agent's id")),
    responses(
        (status = 200, description = "The agent", body = FleetAgent),
        (status = 404, description = "No such agent in the registry", body = Problem, content_type = "application/problem+json"),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn agent(
    State(state): State<ApiState>,
    caller: Authed,
    Path(id): Path<String>,
) -> Result<Json<FleetAgent>, Problem> {
    caller.require(Permission::Read).await?;
    let fleet = fleet(&state).await?;
    let now = crate::clock::unix_now().0;
    fleet
        .iter()
        .find(|a| a.agent_id.as_str() == id)
        .map(|a| Json(FleetAgent::new(a, now)))
        .ok_or_else(|| Problem::not_found(format!("no agent {id:?} in the registry")))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use outpost_protocols::event::{AgentId, Seq, Timestamp};

    use super::*;

    const NOW: i64 = 1_000 * 1_000_000_000;

    fn rec(id: &str, sessions: u64, last_seen: i64, backlog: u64) -> AgentRecord {
        AgentRecord {
            agent_id: AgentId::parse(id).expect("id"),
            labels: BTreeMap::from([(
                "site".into(),
                if backlog.is_multiple_of(2) { "a" } else { "b" }.into(),
            )]),
            labels_ignored: 0,
            revoked: None,
            first_seen: Timestamp(0),
            last_seen: Timestamp(last_seen),
            agent_version: None,
            protocol_version: None,
            watermark: Seq(0),
            backlog_events: Some(backlog),
            backlog_bytes: None,
            sessions,
            policy_version: None,
            policy_error: None,
            policy_dropped: 0,
            policy_modified: 0,
            cert_not_after: Some(Timestamp(NOW + EXPIRING_NS + 1)),
            cert_serial: None,
        }
    }

    #[test]
    fn health_is_revoked_then_offline_then_stale_then_connected() {
        let mut a = rec("gw-1", 1, NOW, 0);
        assert_eq!(health(&a, NOW), Health::Connected);
        assert_eq!(health(&a, NOW + STALE_AFTER_NS + 1), Health::Stale);
        a.sessions = 0;
        assert_eq!(health(&a, NOW), Health::Offline);
        a.revoked = Some(crate::store::Revocation {
            at: Timestamp(NOW),
            by: "x".into(),
            reason: String::new(),
        });
        assert_eq!(health(&a, NOW), Health::Revoked);
        assert!(!cert_expiring(&a, NOW));
        assert!(cert_expiring(&a, NOW + 2));
    }

    #[test]
    fn a_page_is_filtered_sorted_and_cut_after_counting() {
        let records: Vec<AgentRecord> = (0..1500)
            .map(|i| rec(&format!("gw-{i:04}"), i % 3, NOW, i * 7 % 1000))
            .collect();
        let p = FleetParams {
            label: Some("site=a".into()),
            health: Some("offline".into()),
            sort: Some("-backlog".into()),
            limit: Some(100),
            offset: Some(50),
            ..FleetParams::default()
        };
        let (page, total) = select(&records, &p, NOW).expect("valid");
        let want = records
            .iter()
            .filter(|r| r.sessions == 0 && r.labels["site"] == "a")
            .count();
        assert_eq!(total, want);
        assert_eq!(page.len(), 100);
        assert!(page
            .windows(2)
            .all(|w| w[0].agent.backlog_events >= w[1].agent.backlog_events));
        assert!(page.iter().all(|a| a.health == Health::Offline));
        let s = summarise(&records, NOW);
        assert_eq!((s.agents, s.offline, s.connected), (1500, 500, 1000));
        for bad in [
            FleetParams {
                sort: Some("colour".into()),
                ..FleetParams::default()
            },
            FleetParams {
                limit: Some(0),
                ..FleetParams::default()
            },
            FleetParams {
                limit: Some(MAX_PAGE + 1),
                ..FleetParams::default()
            },
            FleetParams {
                health: Some("sleepy".into()),
                ..FleetParams::default()
            },
            FleetParams {
                label: Some("=x".into()),
                ..FleetParams::default()
            },
        ] {
            assert!(select(&records, &bad, NOW).is_err(), "{bad:?}");
        }
    }
}
