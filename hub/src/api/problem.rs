//! Every error the API answers is `application/problem+json` (RFC 9457):
//! `type`, `title`, `status`, `detail`.
//!
//! Why one middleware besides the handlers' own [`Problem`]s: axum and
//! tower-http answer some requests before or instead of a handler (an
//! unknown method: 405, a body over the limit: 413, a timeout: 408, a
//! query or JSON body that does not parse: 400 or 422) with a bare status
//! or plain text. [`problem_for_bare_errors`] turns each of those into a
//! problem document, so a client needs one error parser for the whole API.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::StatusCode;
use http_body_util::BodyExt as _;
use serde::{Deserialize, Serialize};

/// The media type of a problem document.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// How much of a bare error's text body is kept as the problem's detail.
const DETAIL_MAX: usize = 1024;

/// An RFC 9457 problem document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem: `urn:outpost:problem:<name>`, or
    /// `about:blank` when the status says it all.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind, the same for every occurrence.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong this time, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Extra response headers (`WWW-Authenticate`, `Retry-After`).
    #[serde(skip)]
    #[schema(ignore)]
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Problem {
    /// A problem of kind `urn:outpost:problem:<name>`.
    pub fn new(status: StatusCode, name: &str, title: &str, detail: impl Into<String>) -> Problem {
        Problem {
            kind: format!("urn:outpost:problem:{name}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: Some(detail.into()),
            headers: Vec::new(),
        }
    }

    /// A problem the status alone names (`about:blank`, RFC 9457 section 4.2.1).
    pub fn status(status: StatusCode, detail: Option<String>) -> Problem {
        Problem {
            kind: "about:blank".into(),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail,
            headers: Vec::new(),
        }
    }

    /// 400: a parameter or body the API cannot use.
    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "Bad request",
            detail,
        )
    }

    /// 404: no such resource.
    pub fn not_found(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    /// 401: no usable credentials; says how to authenticate.
    pub fn unauthorized(detail: impl Into<String>) -> Problem {
        let mut p = Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "Authentication required",
            detail,
        );
        p.headers.push((
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        ));
        p
    }

    /// 403: authenticated, not allowed.
    pub fn forbidden(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
    }

    /// 429: over the caller's rate; retry after `wait`.
    pub fn too_many(wait: std::time::Duration) -> Problem {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut p = Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many requests",
            format!("this caller's request rate is over [api] rate; retry in {secs} s"),
        );
        p.headers
            .push((http::header::RETRY_AFTER, HeaderValue::from(secs.max(1))));
        p
    }

    /// 500: the store or something else on the hub failed.
    pub fn internal(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            detail,
        )
    }

    /// 501: not on this hub's store kind.
    pub fn not_on_store(what: &str, kind: &str) -> Problem {
        Problem::new(
            StatusCode::NOT_IMPLEMENTED,
            "not-on-this-store",
            "Not available on this store",
            format!("{what} reads the sqlite store, and this hub stores in {kind}"),
        )
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.title)?;
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::warn!(status = self.status, detail = ?self.detail, "API request failed.");
        }
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut r = (status, body).into_response();
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        for (k, v) in self.headers {
            r.headers_mut().insert(k, v);
        }
        r
    }
}

/// The fallback for a path no route has: 404 as a problem.
pub async fn unknown_route(uri: http::Uri) -> Problem {
    Problem::not_found(format!("no resource at {}", uri.path()))
}

/// Turns every error response that is not a problem document yet into one,
/// keeping its status and, as the detail, the start of its text body.
pub async fn problem_for_bare_errors(req: Request, next: Next) -> Response {
    let r = next.run(req).await;
    let status = r.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return r;
    }
    let is_problem = r
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(PROBLEM_JSON));
    if is_problem {
        return r;
    }
    let (parts, body) = r.into_parts();
    let text = match http_body_util::Limited::new(body, DETAIL_MAX * 4)
        .collect()
        .await
    {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(_) => String::new(),
    };
    let detail = text.trim();
    let detail = (!detail.is_empty()).then(|| detail.chars().take(DETAIL_MAX).collect());
    let detail = detail.or_else(|| match status {
        StatusCode::REQUEST_TIMEOUT => Some("the request took longer than [api] timeout".into()),
        StatusCode::METHOD_NOT_ALLOWED => Some("this resource does not take that method".into()),
        StatusCode::PAYLOAD_TOO_LARGE => Some("the request body is over the API's limit".into()),
        _ => None,
    });
    let mut out = Problem::status(status, detail).into_response();
    // Keep what the status needs (`Allow` on a 405).
    for name in [http::header::ALLOW, http::header::RETRY_AFTER] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

/// A problem as a response body, for a client reading one back.
pub fn parse(body: &[u8]) -> Option<Problem> {
    serde_json::from_slice(body).ok()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::Body;
    use axum::routing::{get, post};
    use axum::Router;
    use http::{Request, StatusCode};
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    use super::*;

    /// The layers of `api::router` around routes that are slow, take a
    /// body, or exist only for GET.
    fn app() -> Router {
        Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "late"
                }),
            )
            .route(
                "/body",
                post(|b: axum::body::Bytes| async move { b.len().to_string() }),
            )
            .fallback(unknown_route)
            .layer(axum::extract::DefaultBodyLimit::max(16))
            .layer(tower_http::limit::RequestBodyLimitLayer::new(16))
            .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                StatusCode::REQUEST_TIMEOUT,
                Duration::from_millis(50),
            ))
            .layer(axum::middleware::from_fn(problem_for_bare_errors))
    }

    async fn call(
        method: &str,
        uri: &str,
        body: &'static str,
    ) -> (StatusCode, Option<String>, Problem) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::from(body))
            .expect("request");
        let r = app().oneshot(req).await.expect("infallible");
        let status = r.status();
        let ct = r
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = r.into_body().collect().await.expect("body").to_bytes();
        let p = parse(&bytes).unwrap_or_else(|| panic!("not a problem: {bytes:?}"));
        (status, ct, p)
    }

    #[tokio::test]
    async fn timeouts_wrong_methods_big_bodies_and_unknown_paths_are_problems() {
        for (method, uri, body, want) in [
            ("GET", "/slow", "", StatusCode::REQUEST_TIMEOUT),
            ("DELETE", "/body", "", StatusCode::METHOD_NOT_ALLOWED),
            (
                "POST",
                "/body",
                "more than sixteen bytes",
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
            ("GET", "/nowhere", "", StatusCode::NOT_FOUND),
        ] {
            let (status, ct, p) = call(method, uri, body).await;
            assert_eq!(status, want, "{method} {uri}");
            assert_eq!(ct.as_deref(), Some(PROBLEM_JSON), "{method} {uri}");
            assert_eq!(p.status, want.as_u16());
            assert!(p.detail.is_some(), "{method} {uri}: {p:?}");
        }
    }
}
