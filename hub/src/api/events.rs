//! `/api/v1/events`: stored events by agent, stream pattern and time
//! range, a page at a time; the newest (`events tail`); per-agent counts
//! (`events stats`); and everything matching as JSON lines (`export`).
//!
//! Pagination: a page is at most `limit` events in store order (agent id,
//! then seq), and `next_cursor` says where the next one starts. The cursor
//! is opaque to clients (it encodes the last `(agent_id, seq)` of the page,
//! hex, so that no client is tempted to build one); pass it back unchanged
//! with the same filters.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::header::CONTENT_TYPE;
use outpost_protocols::event::{AgentId, Event, Seq};
use outpost_protocols::topic::TopicFilter;
use serde::Deserialize;
use serde_json::value::RawValue;
use utoipa::IntoParams;

use crate::api::auth::Permission;
use crate::api::caller::Authed;
use crate::api::problem::Problem;
use crate::api::state::{blocking, store_problem, ApiState};
use crate::api::types::{EventStats, EventsPage, EventsTail};
use crate::store::{EventQuery, StoreReader};

/// The page size when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 100;

/// The largest page (and `tail`).
pub const MAX_LIMIT: usize = 1000;

/// Events an export reads per store query.
const EXPORT_PAGE: usize = 1000;

/// The media type of the export.
pub const JSON_LINES: &str = "application/jsonl";

/// This resource's routes.
pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/events", get(page))
        .route("/events/tail", get(tail))
        .route("/events/stats", get(stats))
        .route("/events/export", get(export))
}

/// The filters of `GET /api/v1/events` and its export.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsParams {
    /// Only this agent's events.
    pub agent: Option<String>,
    /// Only streams matching this MQTT-style filter (`plc1/+`, `plant/#`).
    pub stream: Option<String>,
    /// Only events at or after this event time, Unix ns.
    pub from: Option<i64>,
    /// Only events before this event time, Unix ns.
    pub to: Option<i64>,
    /// Where to continue: the previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Events per page, 1 to 1000 (default 100); the export ignores it.
    pub limit: Option<usize>,
}

/// The filters of `tail`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TailParams {
    /// Only this agent's events.
    pub agent: Option<String>,
    /// Only streams matching this MQTT-style filter.
    pub stream: Option<String>,
    /// How many, 0 to 1000 (default 10).
    pub limit: Option<usize>,
}

/// The filter of `stats`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StatsParams {
    /// Only this agent.
    pub agent: Option<String>,
}

fn agent(a: Option<&str>) -> Result<Option<AgentId>, Problem> {
    a.map(|a| AgentId::parse(a).map_err(|e| Problem::bad_request(format!("agent: {e}"))))
        .transpose()
}

fn stream(p: Option<&str>) -> Result<Option<TopicFilter>, Problem> {
    p.map(|p| TopicFilter::parse(p).map_err(|e| Problem::bad_request(format!("stream {p:?}: {e}"))))
        .transpose()
}

/// The cursor after `e`: hex of `<agent_id> NUL <seq>`.
pub fn cursor_after(e: &Event) -> String {
    let raw = format!("{}\0{}", e.agent_id.as_str(), e.seq.0);
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Reads a cursor back.
pub fn parse_cursor(c: &str) -> Result<(AgentId, Seq), Problem> {
    let bad = || Problem::bad_request(format!("cursor {c:?} is not one this API gave out"));
    if !c.len().is_multiple_of(2) || c.len() > 1024 {
        return Err(bad());
    }
    let bytes = (0..c.len())
        .step_by(2)
        .map(|i| c.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (a, s) = text.split_once('\0').ok_or_else(bad)?;
    let agent = AgentId::parse(a).map_err(|_| bad())?;
    let seq = s.parse::<u64>().map_err(|_| bad())?;
    Ok((agent, Seq(seq)))
}

fn query(p: &EventsParams) -> Result<EventQuery, Problem> {
    if let (Some(f), Some(t)) = (p.from, p.to) {
        if f > t {
            return Err(Problem::bad_request(format!("from {f} is after to {t}")));
        }
    }
    Ok(EventQuery {
        agent: agent(p.agent.as_deref())?,
        stream: stream(p.stream.as_deref())?,
        from: p.from,
        to: p.to,
        after: p.cursor.as_deref().map(parse_cursor).transpose()?,
    })
}

fn raw(e: &Event) -> Result<Box<RawValue>, Problem> {
    RawValue::from_string(e.json_line())
        .map_err(|err| Problem::internal(format!("event {}:{}: {err}", e.agent_id, e.seq.0)))
}

/// A page of stored events.
#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(EventsParams),
    responses(
        (status = 200, description = "A page of events in store order", body = EventsPage),
        (status = 400, description = "A filter or cursor the API cannot use", body = Problem, content_type = "application/problem+json"),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn page(
    State(state): State<ApiState>,
    caller: Authed,
    Query(p): Query<EventsParams>,
) -> Result<Json<EventsPage>, Problem> {
    caller.require(Permission::Read).await?;
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(Problem::bad_request(format!(
            "limit {limit} is not between 1 and {MAX_LIMIT}"
        )));
    }
    let q = query(&p)?;
    let (events, more) = state
        .read("events", move |r| {
            r.events_page(&q, limit).map_err(store_problem)
        })
        .await?;
    let next_cursor = if more {
        events.last().map(cursor_after)
    } else {
        None
    };
    Ok(Json(EventsPage {
        events: events.iter().map(raw).collect::<Result<_, _>>()?,
        next_cursor,
    }))
}

/// The newest events, oldest first (`events tail`).
#[utoipa::path(get, path = "/api/v1/events/tail", tag = "events", params(TailParams),
    responses(
        (status = 200, description = "The newest events, oldest first", body = EventsTail),
        (status = 400, description = "A filter the API cannot use", body = Problem, content_type = "application/problem+json"),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn tail(
    State(state): State<ApiState>,
    caller: Authed,
    Query(p): Query<TailParams>,
) -> Result<Json<EventsTail>, Problem> {
    caller.require(Permission::Read).await?;
    let limit = p.limit.unwrap_or(10);
    if limit > MAX_LIMIT {
        return Err(Problem::bad_request(format!(
            "limit {limit} is over {MAX_LIMIT}"
        )));
    }
    let (a, s) = (agent(p.agent.as_deref())?, stream(p.stream.as_deref())?);
    let events = state
        .read("events", move |r| {
            r.events_tail(a.as_ref(), s.as_ref(), limit)
                .map_err(store_problem)
        })
        .await?;
    Ok(Json(EventsTail {
        events: events.iter().map(raw).collect::<Result<_, _>>()?,
    }))
}

/// Per agent: events stored, distinct seqs, lowest and highest seq.
#[utoipa::path(get, path = "/api/v1/events/stats", tag = "events", params(StatsParams),
    responses(
        (status = 200, description = "One entry per agent, ordered by id", body = Vec<EventStats>),
        (status = 400, description = "An agent id the API cannot use", body = Problem, content_type = "application/problem+json"),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn stats(
    State(state): State<ApiState>,
    caller: Authed,
    Query(p): Query<StatsParams>,
) -> Result<Json<Vec<EventStats>>, Problem> {
    caller.require(Permission::Read).await?;
    let a = agent(p.agent.as_deref())?;
    let stats = state
        .read("events", move |r| {
            r.events_stats(a.as_ref()).map_err(store_problem)
        })
        .await?;
    Ok(Json(stats.iter().map(EventStats::from).collect()))
}

/// Every matching event as JSON lines, in store order, streamed.
#[utoipa::path(get, path = "/api/v1/events/export", tag = "events", params(EventsParams),
    responses(
        (status = 200, description = "One event a line, as `events tail --json` prints them", content_type = "application/jsonl", body = String),
        (status = 400, description = "A filter or cursor the API cannot use", body = Problem, content_type = "application/problem+json"),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn export(
    State(state): State<ApiState>,
    caller: Authed,
    Query(p): Query<EventsParams>,
) -> Result<Response, Problem> {
    caller.require(Permission::Read).await?;
    let q = query(&p)?;
    let path = state.sqlite("events")?.to_owned();
    // The first page is read before answering, so a store that cannot be
    // read is a problem document rather than a cut-off body.
    let (path2, q2) = (path.clone(), q.clone());
    let first = blocking(move || {
        let r = StoreReader::open(&path2).map_err(store_problem)?;
        r.events_page(&q2, EXPORT_PAGE).map_err(store_problem)
    })
    .await?;
    let pages = futures::stream::unfold(Some((first, q)), move |next| {
        let path = path.clone();
        async move {
            let ((events, more), mut q) = next?;
            let mut chunk = Vec::with_capacity(events.len() * 160);
            for e in &events {
                e.write_json(&mut chunk);
                chunk.push(b'\n');
            }
            let following = match (more, events.last()) {
                (true, Some(last)) => {
                    q.after = Some((last.agent_id.clone(), last.seq));
                    let q2 = q.clone();
                    let read = tokio::task::spawn_blocking(move || {
                        StoreReader::open(&path)?.events_page(&q2, EXPORT_PAGE)
                    })
                    .await;
                    match read {
                        Ok(Ok(page)) => Some((page, q)),
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "Export cut short: the store failed.");
                            return Some((Err(std::io::Error::other(e.to_string())), None));
                        }
                        Err(e) => {
                            return Some((Err(std::io::Error::other(e.to_string())), None));
                        }
                    }
                }
                _ => None,
            };
            Some((
                Ok::<_, std::io::Error>(bytes::Bytes::from(chunk)),
                following,
            ))
        }
    });
    Ok(([(CONTENT_TYPE, JSON_LINES)], Body::from_stream(pages)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_reads_back_and_a_forged_one_is_a_bad_request() {
        let e = Event {
            agent_id: AgentId::parse("gw-1").expect("valid"),
            seq: Seq(42),
            body: outpost_protocols::event::EventBody {
                stream: outpost_protocols::event::StreamName::parse("a/b").expect("valid"),
                ts: outpost_protocols::event::Timestamp(1),
                value: outpost_protocols::event::Value::I64(1),
                quality: outpost_protocols::event::Quality::Good,
                attrs: Default::default(),
            },
        };
        let c = cursor_after(&e);
        let (a, s) = parse_cursor(&c).expect("reads back");
        assert_eq!((a.as_str(), s.0), ("gw-1", 42));
        for forged in ["zz", "abc", "", "6777"] {
            assert_eq!(parse_cursor(forged).expect_err(forged).status, 400);
        }
    }
}
