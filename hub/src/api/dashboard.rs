//! The web dashboard: a few static files built into the binary and served
//! on the API's address at `/dashboard/` (docs/dashboard.md).
//!
//! Why static files and plain JavaScript: plants are air-gapped, so nothing
//! may come from a CDN or need a toolchain at build time; the page is one
//! more client of `/api/v1/` (with the caller's bearer token, kept in the
//! tab's `sessionStorage`), so every permission is the API's to check and
//! the dashboard can show no more than the caller may read. The files carry
//! a strict Content-Security-Policy: scripts only from this origin, no
//! inline script, no framing.

use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};

use crate::api::state::ApiState;

/// The page every path of the dashboard answers with.
const INDEX: &str = include_str!("../../dashboard/index.html");
/// The application.
const APP_JS: &str = include_str!("../../dashboard/app.js");
/// Its style.
const APP_CSS: &str = include_str!("../../dashboard/app.css");

/// Scripts, styles and requests only to this origin; no plugins, no
/// framing, no form posts elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// The dashboard's routes (outside `/api/v1/`, without authentication:
/// the files hold no data; the data comes from the API with a token).
pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/dashboard/") }))
        .route("/dashboard", get(|| async { Redirect::to("/dashboard/") }))
        .route(
            "/dashboard/",
            get(|| async { file("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/dashboard/app.js",
            get(|| async { file("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/dashboard/app.css",
            get(|| async { file("text/css; charset=utf-8", APP_CSS) }),
        )
}

/// One file with the dashboard's headers. `no-cache`: a browser checks
/// again after a hub upgrade rather than running yesterday's script.
fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (CONTENT_TYPE, content_type),
            (CONTENT_SECURITY_POLICY, CSP),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (X_FRAME_OPTIONS, "DENY"),
            (REFERRER_POLICY, "no-referrer"),
            (CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
