//! `/api/v1/kpis`: the delivery KPIs in one document, for a dashboard that
//! must show the same numbers as Prometheus. Every field is named after the
//! metric it equals at the same instant (docs/metrics.md): the store's
//! counters and queues as the metrics endpoint reads them, and the
//! counters and latency histograms this hub process keeps (`crate::kpis`).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::api::auth::Permission;
use crate::api::caller::Authed;
use crate::api::problem::Problem;
use crate::api::state::{store_problem, ApiState, ApiStore};
use crate::kpis::{KpiCounts, LatencySummary};
use crate::store::{AgentRecord, SinkStatus};

/// This resource's routes.
pub fn router() -> Router<ApiState> {
    Router::new().route("/kpis", get(show))
}

/// The hub's KPIs.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Kpis {
    /// The hub's time when this was read, Unix ns.
    pub now: i64,
    /// Seconds since this hub process started
    /// (`time() - outpost_hub_start_time_seconds`).
    pub uptime_seconds: i64,
    /// What this process counted: events stored and dropped, by agent, and
    /// the latency histograms' counts and quantiles.
    pub process: KpiCounts,
    /// The fleet registry's numbers.
    pub fleet: FleetKpis,
    /// Every sink's numbers, by id.
    pub sinks: BTreeMap<String, SinkKpis>,
}

/// The registry's numbers (`outpost_hub_agents*`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FleetKpis {
    /// `outpost_hub_agents{state="connected"}`.
    pub connected: u64,
    /// `outpost_hub_agents{state="disconnected"}`.
    pub disconnected: u64,
    /// `outpost_hub_agents_revoked`.
    pub revoked: u64,
    /// `outpost_hub_agents_backlog_events`.
    pub backlog_events: u64,
    /// The fleet's `policy_dropped` (what `fleet list` shows), summed: the
    /// hub's policy drops since each agent was first seen, kept in the store.
    pub policy_dropped_stored: u64,
}

/// One sink's numbers (`outpost_hub_sink_*{sink}`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SinkKpis {
    /// `outpost_hub_sink_delivered_events_total`.
    pub delivered_events: u64,
    /// `outpost_hub_sink_rejected_events_total`.
    pub rejected_events: u64,
    /// `outpost_hub_sink_residency_refused_events_total`.
    pub residency_refused_events: u64,
    /// `outpost_hub_sink_failures_total`.
    pub failures: u64,
    /// `outpost_hub_sink_pending_events`.
    pub pending_events: u64,
    /// `outpost_hub_sink_lag_seconds`.
    pub lag_seconds: i64,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// `outpost_hub_sink_latency_seconds` (this process).
    pub latency: Option<LatencySummary>,
}

/// The hub's KPIs: the same numbers as its Prometheus endpoint.
#[utoipa::path(get, path = "/api/v1/kpis", tag = "kpis",
    responses(
        (status = 200, description = "The hub's KPIs", body = Kpis),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn show(State(state): State<ApiState>, caller: Authed) -> Result<Json<Kpis>, Problem> {
    caller.require(Permission::Read).await?;
    let ids: Vec<String> = state.cfg.sinks.iter().map(|s| s.id.clone()).collect();
    let (sinks, fleet) = match &state.store {
        ApiStore::Sqlite(_) => {
            state
                .read("kpis", move |r| {
                    Ok((
                        r.sinks_status(&ids).map_err(store_problem)?,
                        r.fleet().map_err(store_problem)?,
                    ))
                })
                .await?
        }
        ApiStore::JetStream(js) => (
            js.sinks_status(&ids).await.map_err(store_problem)?,
            js.fleet().await.map_err(store_problem)?,
        ),
    };
    let now = crate::clock::unix_now().0;
    Ok(Json(kpis(&sinks, &fleet, state.kpis.summary(), now)))
}

/// The document, from what the store says and what this process counted.
pub fn kpis(sinks: &[SinkStatus], fleet: &[AgentRecord], process: KpiCounts, now: i64) -> Kpis {
    let connected = fleet.iter().filter(|a| a.connected()).count() as u64;
    let fleet_kpis = FleetKpis {
        connected,
        disconnected: fleet.len() as u64 - connected,
        revoked: fleet.iter().filter(|a| a.revoked.is_some()).count() as u64,
        backlog_events: fleet.iter().filter_map(|a| a.backlog_events).sum(),
        policy_dropped_stored: fleet.iter().map(|a| a.policy_dropped).sum(),
    };
    let sinks = sinks
        .iter()
        .map(|s| {
            (
                s.sink.clone(),
                SinkKpis {
                    delivered_events: s.delivered,
                    rejected_events: s.rejected,
                    residency_refused_events: s.refused,
                    failures: s.failures,
                    pending_events: s.pending,
                    lag_seconds: s
                        .oldest_queued_at
                        .map_or(0, |t| now.saturating_sub(t).max(0) / 1_000_000_000),
                    last_error: s.last_error.clone(),
                    latency: process.sink_latency.get(&s.sink).cloned(),
                },
            )
        })
        .collect();
    Kpis {
        now,
        uptime_seconds: (now / 1_000_000_000).saturating_sub(process.start_time_seconds),
        process,
        fleet: fleet_kpis,
        sinks,
    }
}
