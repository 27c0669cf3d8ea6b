//! `/api/v1/policy`: the version in force, the history, diffs, applying a
//! new version, and a dry run that says what a text would change.
//!
//! Applying calls the same library functions as `policy apply`
//! (`crate::policy::apply`, `rollback`, `apply_jetstream`), so a version
//! applied through the API is validated, stored and audited exactly as
//! one applied on the hub's machine; the audit entry's actor is the
//! caller's subject.

use outpost_protocols::policy::redact_keys;
use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::StatusCode;
use outpost_protocols::policy::{Catalog, Policy, PolicyError};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::api::auth::{Permission, PolicyApproval};
use crate::api::caller::Authed;
use crate::api::problem::Problem;
use crate::api::state::{blocking, store_problem, ApiState, ApiStore};
use crate::api::types::{
    AgentChange, PolicyApplied, PolicyApply, PolicyDiff, PolicyDryRun, PolicyDryRunRequest,
    PolicyVersionDoc, Residency, StreamChange,
};
use crate::policy::{self as versions, Applied, ApplyError, PolicyRecord};
use crate::store::{open_admin, StoreReader};

/// Streams per agent a dry run compares (the most recent names stored).
pub const DRY_RUN_STREAMS: usize = 1000;

/// This resource's routes.
pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/policy", get(show).post(apply))
        .route("/policy/history", get(history))
        .route("/policy/diff", get(diff))
        .route("/policy/dry-run", post(dry_run))
}

/// Every stored version, oldest first, on either store.
async fn all(state: &ApiState) -> Result<Vec<PolicyRecord>, Problem> {
    match &state.store {
        ApiStore::Sqlite(_) => {
            state
                .read("policy", |r| {
                    versions::history(r.connection(), r.path()).map_err(store_problem)
                })
                .await
        }
        ApiStore::JetStream(js) => js.policies().await.map_err(store_problem),
    }
}

fn apply_problem(e: ApplyError) -> Problem {
    match e {
        ApplyError::Refused { .. } => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "policy-refused",
            "Policy refused",
            e.to_string(),
        ),
        ApplyError::UnknownVersion(_) => Problem::not_found(e.to_string()),
        ApplyError::Read { .. } => Problem::bad_request(e.to_string()),
        ApplyError::Store(s) => store_problem(s),
    }
}

/// Which version to show.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ShowParams {
    /// This version instead of the one in force.
    pub version: Option<u64>,
}

/// The version in force (`{"version": 0}` when none was applied), or the
/// one asked for.
#[utoipa::path(get, path = "/api/v1/policy", tag = "policy", params(ShowParams),
    responses(
        (status = 200, description = "The version, with its text", body = PolicyVersionDoc),
        (status = 404, description = "No such version", body = Problem, content_type = "application/problem+json"),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn show(
    State(state): State<ApiState>,
    caller: Authed,
    Query(p): Query<ShowParams>,
) -> Result<Json<PolicyVersionDoc>, Problem> {
    caller.require(Permission::Read).await?;
    let all = all(&state).await?;
    if let Some(v) = p.version {
        return all
            .iter()
            .find(|r| r.version == v)
            .map(|r| Json(PolicyVersionDoc::new(r, true)))
            .ok_or_else(|| apply_problem(ApplyError::UnknownVersion(v)));
    }
    Ok(Json(match all.last() {
        Some(r) => PolicyVersionDoc::new(r, true),
        None => PolicyVersionDoc {
            version: 0,
            applied_at: None,
            actor: None,
            source: None,
            digest: None,
            text: None,
        },
    }))
}

/// Every version, oldest first, without the texts.
#[utoipa::path(get, path = "/api/v1/policy/history", tag = "policy",
    responses(
        (status = 200, description = "Every version, oldest first", body = Vec<PolicyVersionDoc>),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn history(
    State(state): State<ApiState>,
    caller: Authed,
) -> Result<Json<Vec<PolicyVersionDoc>>, Problem> {
    caller.require(Permission::Read).await?;
    Ok(Json(
        all(&state)
            .await?
            .iter()
            .map(|r| PolicyVersionDoc::new(r, false))
            .collect(),
    ))
}

/// The versions to compare.
#[derive(Debug, Clone, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DiffParams {
    /// The older version.
    pub from: u64,
    /// The newer version.
    pub to: u64,
}

/// What changed between two versions, as a unified diff.
#[utoipa::path(get, path = "/api/v1/policy/diff", tag = "policy", params(DiffParams),
    responses(
        (status = 200, description = "The unified diff", body = PolicyDiff),
        (status = 404, description = "No such version", body = Problem, content_type = "application/problem+json"),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn diff(
    State(state): State<ApiState>,
    caller: Authed,
    Query(p): Query<DiffParams>,
) -> Result<Json<PolicyDiff>, Problem> {
    caller.require(Permission::Read).await?;
    let all = all(&state).await?;
    let get = |v: u64| {
        all.iter()
            .find(|r| r.version == v)
            .ok_or_else(|| apply_problem(ApplyError::UnknownVersion(v)))
    };
    let (a, b) = (get(p.from)?, get(p.to)?);
    Ok(Json(PolicyDiff {
        from: a.version,
        to: b.version,
        diff: unified_diff(a, b),
    }))
}

/// `policy diff`'s output: a unified diff of two versions' texts.
pub fn unified_diff(a: &PolicyRecord, b: &PolicyRecord) -> String {
    // A version stored before the hashing key left the policy text may
    // still carry one: never shown.
    let (a_text, b_text) = (redact_keys(&a.text), redact_keys(&b.text));
    similar::TextDiff::from_lines(&a_text, &b_text)
        .unified_diff()
        .header(
            &format!("policy v{}", a.version),
            &format!("policy v{}", b.version),
        )
        .to_string()
}

/// Validates a text (or a stored version's) and makes it the version in
/// force; the audit log records the caller's subject.
#[utoipa::path(post, path = "/api/v1/policy", tag = "policy", request_body = PolicyApply,
    responses(
        (status = 200, description = "Applied, or unchanged (the text is in force already)", body = PolicyApplied),
        (status = 202, description = "Proposed: with [api] policy_approval = \"two-person\", an approver who is not the author applies it", body = crate::api::proposals::ProposalDoc),
        (status = 404, description = "No such version to apply again", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The policy was refused (audited)", body = Problem, content_type = "application/problem+json"),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn apply(
    State(state): State<ApiState>,
    caller: Authed,
    Json(req): Json<PolicyApply>,
) -> Result<axum::response::Response, Problem> {
    use axum::response::IntoResponse as _;
    let actor = caller
        .require(Permission::ProposePolicy)
        .await?
        .subject
        .clone();
    if state.auth.policy_approval() == PolicyApproval::TwoPerson {
        // Under the two-person rule the text (or the old version's, for a
        // rollback) becomes a proposal; an approver applies it.
        let (text, source) = match (req.text, req.version) {
            (Some(text), None) => (text, req.source.unwrap_or_else(|| "api".into())),
            (None, Some(v)) => {
                let old = all(&state)
                    .await?
                    .into_iter()
                    .find(|r| r.version == v)
                    .ok_or_else(|| apply_problem(ApplyError::UnknownVersion(v)))?;
                (old.text, format!("rollback to {v}"))
            }
            _ => {
                return Err(Problem::bad_request(
                    "give either `text` or `version`, not both",
                ))
            }
        };
        return Ok(crate::api::proposals::propose(&state, text, source, actor)
            .await?
            .into_response());
    }
    let (catalog, key) = (state.catalog.clone(), state.key.clone());
    let outcome = match (req.text, req.version) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(Problem::bad_request(
                "give either `text` or `version`, not both",
            ))
        }
        (Some(text), None) => {
            let source = req.source.unwrap_or_else(|| "api".into());
            match &state.store {
                ApiStore::Sqlite(path) => {
                    let path = path.clone();
                    blocking(move || {
                        let mut conn = open_admin(&path).map_err(store_problem)?;
                        versions::apply(&mut conn, &path, &key, &text, &source, &actor, &catalog)
                            .map_err(apply_problem)
                    })
                    .await?
                }
                ApiStore::JetStream(js) => {
                    versions::apply_jetstream(js, &state.key, &text, &source, &actor, &catalog)
                        .await
                        .map_err(apply_problem)?
                }
            }
        }
        (None, Some(v)) => match &state.store {
            ApiStore::Sqlite(path) => {
                let path = path.clone();
                blocking(move || {
                    let mut conn = open_admin(&path).map_err(store_problem)?;
                    versions::rollback(&mut conn, &path, &key, v, &actor, &catalog)
                        .map_err(apply_problem)
                })
                .await?
            }
            ApiStore::JetStream(js) => {
                let old = all(&state)
                    .await?
                    .into_iter()
                    .find(|r| r.version == v)
                    .ok_or_else(|| apply_problem(ApplyError::UnknownVersion(v)))?;
                versions::apply_jetstream(
                    js,
                    &state.key,
                    &old.text,
                    &format!("rollback to {v}"),
                    &actor,
                    &catalog,
                )
                .await
                .map_err(apply_problem)?
            }
        },
    };
    if let Applied::New { version, .. } = &outcome {
        tracing::info!(version, subject = %caller.0.subject, "Policy applied through the API.");
    }
    Ok(Json(PolicyApplied::from(&outcome)).into_response())
}

/// Which agents and streams a text would change, and its residency
/// verdict, without storing anything.
#[utoipa::path(post, path = "/api/v1/policy/dry-run", tag = "policy", request_body = PolicyDryRunRequest,
    responses(
        (status = 200, description = "What the text would change (also when it would be refused)", body = PolicyDryRun),
        (status = "4XX", description = "Refused", body = Problem, content_type = "application/problem+json"),
        (status = "5XX", description = "The hub failed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn dry_run(
    State(state): State<ApiState>,
    caller: Authed,
    Json(req): Json<PolicyDryRunRequest>,
) -> Result<Json<PolicyDryRun>, Problem> {
    caller.require(Permission::ProposePolicy).await?;
    let current = all(&state).await?.pop();
    let fleet = crate::api::fleet::fleet(&state).await?;
    let catalog = state.catalog.clone();
    let store = state.store.clone();
    blocking(move || {
        // The JetStream store keeps no per-agent stream index: only the
        // agent-level changes are reported there.
        let reader = match &store {
            ApiStore::Sqlite(path) => Some(StoreReader::open(path).map_err(store_problem)?),
            ApiStore::JetStream(_) => None,
        };
        let streams = |agent: &outpost_protocols::event::AgentId| -> Result<Vec<String>, Problem> {
            match &reader {
                Some(r) => r
                    .agent_streams(agent, DRY_RUN_STREAMS)
                    .map_err(store_problem),
                None => Ok(Vec::new()),
            }
        };
        let fleet: Vec<(String, BTreeMap<String, String>, Vec<String>)> = fleet
            .iter()
            .map(|a| {
                Ok((
                    a.agent_id.as_str().to_owned(),
                    a.labels.clone(),
                    streams(&a.agent_id)?,
                ))
            })
            .collect::<Result<_, Problem>>()?;
        Ok(Json(dry_run_of(
            &req.text,
            current.as_ref(),
            &catalog,
            &fleet,
        )))
    })
    .await
}

/// The dry run itself, without I/O: `text` against the version in force
/// `current`, for each `(agent, labels, streams)` of `fleet`.
pub fn dry_run_of(
    text: &str,
    current: Option<&PolicyRecord>,
    catalog: &Catalog,
    fleet: &[(String, BTreeMap<String, String>, Vec<String>)],
) -> PolicyDryRun {
    let (valid, error, residency) = match Policy::parse(text, catalog) {
        Ok(_) => (
            true,
            None,
            Residency {
                verdict: "ok".into(),
                detail: None,
            },
        ),
        Err(e @ PolicyError::Residency { .. }) => (
            false,
            Some(e.to_string()),
            Residency {
                verdict: "refused".into(),
                detail: Some(e.to_string()),
            },
        ),
        Err(e) => (
            false,
            Some(e.to_string()),
            Residency {
                verdict: "not checked".into(),
                detail: Some("the text does not parse".into()),
            },
        ),
    };
    let trusting = Catalog::trusting();
    let old = current
        // The version in force may be one from before the hashing key
        // moved to the hub, with a `[hashing]` table.
        .and_then(|r| Policy::parse_stored(&r.text, &trusting).ok())
        .unwrap_or_default();
    // Changes are worked out even for a text refused only for residency,
    // so the author sees what it would do once the route is fixed.
    let agents = match Policy::parse(text, &trusting) {
        Ok(new) => fleet
            .iter()
            .filter_map(|(id, labels, streams)| change(id, labels, streams, &old, &new))
            .collect(),
        Err(_) => Vec::new(),
    };
    PolicyDryRun {
        valid,
        error,
        residency,
        current_version: current.map_or(0, |r| r.version),
        digest: outpost_protocols::policy::digest(text),
        agents,
        agents_checked: fleet.len() as u64,
    }
}

/// What takes `stream` under `p` (compiled for the agent as `c`): the
/// rule's name, and a key that differs when its treatment does.
fn treatment(
    p: &Policy,
    c: &outpost_protocols::policy::Compiled,
    stream: &str,
) -> (String, String) {
    let residency = format!("{:?}", p.residency_of(stream).map(|r| &r.regions));
    match c
        .rule_for(stream)
        .and_then(|n| p.rules.iter().find(|r| r.name == n))
    {
        Some(rule) => {
            let mut unnamed = rule.clone();
            unnamed.name.clear();
            (rule.name.clone(), format!("{unnamed:?} {residency}"))
        }
        None => (
            "default".into(),
            format!("{:?} {:?} {residency}", p.default_action, p.default_sinks),
        ),
    }
}

fn change(
    id: &str,
    labels: &BTreeMap<String, String>,
    streams: &[String],
    old: &Policy,
    new: &Policy,
) -> Option<AgentChange> {
    let trusting = Catalog::trusting();
    let (co, cn) = (
        old.compile(labels, &trusting),
        new.compile(labels, &trusting),
    );
    let limits_changed = format!("{:?}{:?}", old.limits_for(labels), old.buffer_for(labels))
        != format!("{:?}{:?}", new.limits_for(labels), new.buffer_for(labels));
    let streams: Vec<StreamChange> = streams
        .iter()
        .filter_map(|s| {
            let (before, kb) = treatment(old, &co, s);
            let (after, ka) = treatment(new, &cn, s);
            (kb != ka).then(|| StreamChange {
                stream: s.clone(),
                before,
                after,
            })
        })
        .collect();
    let changed = limits_changed || !streams.is_empty() || co.rules() != cn.rules();
    changed.then(|| AgentChange {
        agent_id: id.to_owned(),
        rules_before: co.rules() as u64,
        rules_after: cn.rules() as u64,
        limits_changed,
        streams,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(text: &str) -> PolicyRecord {
        PolicyRecord {
            version: 3,
            applied_at: 0,
            actor: "ops".into(),
            source: "a.toml".into(),
            digest: outpost_protocols::policy::digest(text),
            text: text.into(),
        }
    }

    #[test]
    fn a_dry_run_names_the_agents_and_streams_a_rule_changes() {
        let old = record("");
        let new = "[[rules]]\nname = \"no-debug\"\nagents = { site = \"a\" }\nstreams = [\"plant/debug/#\"]\naction = \"deny\"\n";
        let fleet = vec![
            (
                "gw-a".to_owned(),
                BTreeMap::from([("site".to_owned(), "a".to_owned())]),
                vec!["plant/debug/x".to_owned(), "plant/temp".to_owned()],
            ),
            (
                "gw-b".to_owned(),
                BTreeMap::from([("site".to_owned(), "b".to_owned())]),
                vec!["plant/debug/x".to_owned()],
            ),
        ];
        let r = dry_run_of(new, Some(&old), &Catalog::hub(None), &fleet);
        assert!(r.valid, "{r:?}");
        assert_eq!(r.residency.verdict, "ok");
        assert_eq!(r.current_version, 3);
        assert_eq!(r.agents_checked, 2);
        assert_eq!(r.agents.len(), 1, "{r:?}");
        let a = &r.agents[0];
        assert_eq!(
            (a.agent_id.as_str(), a.rules_before, a.rules_after),
            ("gw-a", 0, 1)
        );
        assert_eq!(
            a.streams,
            vec![StreamChange {
                stream: "plant/debug/x".into(),
                before: "default".into(),
                after: "no-debug".into()
            }]
        );
    }

    #[test]
    fn a_route_out_of_its_region_is_refused_for_residency_but_still_compared() {
        let text = "[[residency]]\nstreams = [\"hr/#\"]\nclassification = \"personal\"\nhome = \"eu-west\"\n";
        let fleet = vec![(
            "gw-a".to_owned(),
            BTreeMap::new(),
            vec!["hr/badge".to_owned()],
        )];
        let r = dry_run_of(text, None, &Catalog::hub(Some("us-east")), &fleet);
        assert!(!r.valid);
        assert_eq!(r.residency.verdict, "refused", "{r:?}");
        assert!(
            r.error.as_deref().unwrap_or("").contains("residency"),
            "{r:?}"
        );
        assert_eq!(r.agents.len(), 1, "the residency changes hr/badge: {r:?}");
    }
}
