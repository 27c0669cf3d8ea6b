//! The API's OpenAPI 3.1 document, generated from the handlers' and the
//! documents' own annotations, served at `/api/v1/openapi.json` and
//! committed as `docs/api/openapi.json`.
//!
//! Why committed: clients and reviewers read the contract without running
//! a hub, and a change to it shows in the diff. The test below fails when
//! the committed file is not what the code generates.

use axum::response::IntoResponse;
use http::header::CONTENT_TYPE;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// The API's document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Outpost hub API",
        version = "1.0.0",
        description = "The operator API of the Outpost hub: the fleet, events, policy, sinks and the audit log. Every error is application/problem+json (RFC 9457). See docs/api.md."
    ),
    paths(
        crate::api::fleet::list,
        crate::api::fleet::agent,
        crate::api::events::page,
        crate::api::events::tail,
        crate::api::events::stats,
        crate::api::events::export,
        crate::api::policy::show,
        crate::api::policy::history,
        crate::api::policy::diff,
        crate::api::policy::apply,
        crate::api::policy::dry_run,
        crate::api::proposals::list,
        crate::api::proposals::one,
        crate::api::proposals::approve,
        crate::api::proposals::reject,
        crate::api::sinks::list,
        crate::api::audit::list,
        crate::api::audit::verify,
        crate::api::audit::anchor,
        crate::api::audit::key,
        crate::api::trust::labels,
        crate::api::trust::revoke,
        crate::api::trust::reinstate,
        crate::api::trust::enroll,
        crate::api::trust::enrollments,
        crate::api::trust::unenroll,
        crate::api::kpis::show,
        crate::api::fleet::summary,
        crate::api::whoami::whoami,
        crate::api::commands::send,
        crate::api::commands::list,
        crate::api::commands::one,
    ),
    modifiers(&Bearer),
    tags(
        (name = "fleet", description = "The fleet registry"),
        (name = "events", description = "Stored events"),
        (name = "policy", description = "The fleet policy's versions"),
        (name = "sinks", description = "The sinks' queues and counters"),
        (name = "audit", description = "The tamper-evident audit log"),
        (name = "kpis", description = "The delivery KPIs, as the metrics show them"),
        (name = "commands", description = "Commands to agents and their results"),
    )
)]
pub struct ApiDoc;

/// Adds the bearer scheme every path names.
struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An OIDC JWT or a static API token (`outpost-hub token create`)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document as the committed file holds it: pretty JSON and a newline.
pub fn document() -> String {
    let mut text = ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}

/// `GET /api/v1/openapi.json` (no authentication: it is the contract).
pub async fn serve() -> impl IntoResponse {
    ([(CONTENT_TYPE, "application/json")], document())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_committed_openapi_document_is_what_the_code_generates() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api/openapi.json");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == super::document(),
            "docs/api/openapi.json is stale: regenerate it with\n\n    cargo run -p outpost-hub -- api openapi > docs/api/openapi.json\n"
        );
    }

    #[test]
    fn the_document_is_openapi_3_1_with_every_resource() {
        let doc: serde_json::Value = serde_json::from_str(&super::document()).expect("JSON");
        assert!(
            doc["openapi"].as_str().unwrap_or("").starts_with("3.1"),
            "{}",
            doc["openapi"]
        );
        for p in [
            "/api/v1/fleet",
            "/api/v1/agents/{id}",
            "/api/v1/events",
            "/api/v1/events/export",
            "/api/v1/policy",
            "/api/v1/policy/history",
            "/api/v1/policy/diff",
            "/api/v1/policy/dry-run",
            "/api/v1/policy/proposals",
            "/api/v1/policy/proposals/{id}/approve",
            "/api/v1/sinks",
            "/api/v1/audit",
            "/api/v1/audit/verify",
            "/api/v1/fleet/summary",
            "/api/v1/whoami",
        ] {
            assert!(doc["paths"].get(p).is_some(), "missing {p}");
        }
    }
}
