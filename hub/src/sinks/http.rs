//! The HTTP webhook sink: each batch is one `POST` of JSON to a URL the
//! operator runs, accepted when the far end answers 2xx.
//!
//! Why one request per batch rather than per event: a webhook's cost is the
//! round trip, and the runner already sizes batches (`batch_max`); one
//! request means one answer that covers the whole batch, which is what
//! [`Sink::deliver`] has to report.
//!
//! Why an `Idempotency-Key` that hashes the batch's identities: the runner
//! delivers the same batch again after a timeout or a 5xx, and the far end
//! may have stored it already. A key taken from the first and last event
//! alone would collide for two different batches that share their ends (the
//! runner may interleave agents), so the key covers every `(agent_id, seq)`:
//! a far end that keeps keys can drop exact repeats, and one that dedups by
//! each event's `(agent_id, seq)` (in the body) needs no key at all.
//!
//! ```text
//! POST <url> HTTP/1.1
//! Content-Type: application/json
//! Idempotency-Key: <lowercase hex SHA-256 of "<agent_id>:<seq>\n" for each event, in order>
//! <auth_header>: <first line of auth_value_file>      (if configured)
//!
//! {"events":[{"agent_id":"gw-1","seq":1,"stream":"plc1/temp","ts":…,"value":…,"quality":…,"attrs":{…}},…]}
//! ```
//!
//! With `payload = "cloudevents"` the body is CloudEvents 1.0
//! (`super::cloudevents`): in `structured` and `binary` mode one request per
//! event (the HTTP binding carries one event per message; the key then
//! covers that event alone), in `batch` mode one per batch. A batch that
//! fails part-way is delivered again whole: the events before the failure
//! reach the far end twice, with the same CloudEvents `id`.
//!
//! Why the answers are sorted as they are: [`SinkError::Rejected`] makes the
//! runner give up on the events, so it is kept for answers that say this
//! request will never be taken (400, 413, 422, …); anything that waiting can
//! fix — 408, 425, 429, 5xx, a refused or reset connection, a TLS handshake
//! that fails, a timeout — is [`SinkError::Transient`]. Redirects are not
//! followed: a webhook that moved is a configuration to change, not a place
//! to send the fleet's data to on the far end's word.
//!
//! Why hyper's own client rather than a higher-level one: it follows no
//! redirects, reads no proxy variables from the environment, brings no URL or
//! IDNA stack, and its TLS is the hub's rustls with the `ring` provider.
//! Connections are opened on demand and kept alive in hyper's pool; every
//! task the pool spawns runs under the sink's stop token.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, LOCATION, RETRY_AFTER, USER_AGENT};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioTimer;
use rustls::pki_types::ServerName;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::cloudevents::{self, CloudEventsMode};
use super::config::{HttpSinkConfig, SinkConfig};
use super::format::{payload, PayloadFormat};
use super::sink::{Sink, SinkError, SinkEvent};
use crate::clock;

/// The header that carries [`idempotency_key`].
const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// How much of a refusal's body goes into the error message.
const BODY_IN_MESSAGE: usize = 200;

/// How much of an accepting answer's body is read so that its connection can
/// be used again; past this the connection is dropped instead.
const BODY_DRAINED: usize = 64 * 1024;

/// Headers the sink sets itself, which `auth_header` must not replace.
const RESERVED: [&str; 7] = [
    "host",
    "content-type",
    "content-length",
    "transfer-encoding",
    "connection",
    "idempotency-key",
    "user-agent",
];

/// What [`build`] checks of `c` (its `[sinks.http]` table `cfg`), without
/// connecting.
pub(super) fn check_files(
    c: &SinkConfig,
    cfg: &HttpSinkConfig,
    base: &Path,
) -> Result<(), SinkError> {
    Settings::read(&c.id, cfg, base).map(drop)
}

/// Builds the HTTP sink of `c` (its `[sinks.http]` table `cfg`). Files (the
/// auth value, the TLS CA and client certificate) are read here, once;
/// nothing is connected until the first delivery.
pub(super) async fn build(
    c: &SinkConfig,
    cfg: &HttpSinkConfig,
    base: &Path,
    stop: CancellationToken,
) -> Result<Arc<dyn Sink>, SinkError> {
    let settings = Settings::read(&c.id, cfg, base)?;
    let sink = HttpSink::new(c.id.clone(), settings, stop);
    tracing::debug!(sink = %sink.id, url = %sink.uri, "HTTP sink built.");
    Ok(Arc::new(sink))
}

/// The `Idempotency-Key` of a batch: the lowercase hex SHA-256 of
/// `"<agent_id>:<seq>\n"` for each event, in the batch's order. The same
/// batch always has the same key; two batches with different events never
/// share one.
pub fn idempotency_key(events: &[SinkEvent]) -> String {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    for e in events {
        h.update(e.event.agent_id.as_str().as_bytes());
        h.update(b":");
        h.update(e.event.seq.0.to_string().as_bytes());
        h.update(b"\n");
    }
    let digest = h.finish();
    let mut key = String::with_capacity(64);
    for b in digest.as_ref() {
        key.push_str(&format!("{b:02x}"));
    }
    key
}

/// The request body of a batch: `{"events":[…]}`, each element the event's
/// JSON object ([`PayloadFormat::Json`]), in the batch's order.
pub fn batch_body(events: &[SinkEvent]) -> Vec<u8> {
    let mut body = b"{\"events\":[".to_vec();
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&payload(e, PayloadFormat::Json));
    }
    body.extend_from_slice(b"]}");
    body
}

/// `[sinks.http]` read and checked: everything a delivery needs, with the
/// files already read.
struct Settings {
    uri: Uri,
    auth: Option<(HeaderName, HeaderValue)>,
    timeout: Duration,
    /// Whether the URL is `https://`; only then is `tls` used.
    https: bool,
    tls: rustls::ClientConfig,
    /// The name the certificate is checked against, if not the URL's host.
    server_name: Option<ServerName<'static>>,
    /// What a request carries.
    body: BodyFormat,
}

/// What a request carries: `http.payload` and `http.cloudevents_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFormat {
    /// `{"events":[…]}`, one request per batch.
    Json,
    /// CloudEvents in this mode.
    CloudEvents(CloudEventsMode),
}

impl Settings {
    fn read(id: &str, c: &HttpSinkConfig, base: &Path) -> Result<Settings, SinkError> {
        let bad = |key: &str, message: String| SinkError::Config {
            id: id.to_owned(),
            key: format!("http.{key}"),
            message,
        };
        let (uri, https) = parse_url(&c.url).map_err(|m| bad("url", m))?;
        if c.timeout.0.is_zero() {
            return Err(bad("timeout", "must be longer than zero".into()));
        }
        let auth = match (&c.auth_header, &c.auth_value_file) {
            (None, None) => None,
            (Some(_), None) => {
                return Err(bad(
                    "auth_value_file",
                    "auth_header is set: the file holding its value is needed too".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(bad(
                    "auth_header",
                    "auth_value_file is set: the header it is the value of is needed too".into(),
                ))
            }
            (Some(name), Some(file)) => {
                let name = HeaderName::try_from(name.as_str())
                    .map_err(|_| bad("auth_header", format!("{name:?} is not a header name")))?;
                if RESERVED.contains(&name.as_str()) || name.as_str().starts_with("ce-") {
                    return Err(bad(
                        "auth_header",
                        format!("{:?} is set by the sink itself", name.as_str()),
                    ));
                }
                let value =
                    read_first_line(&base.join(file)).map_err(|m| bad("auth_value_file", m))?;
                let mut value = HeaderValue::try_from(value).map_err(|_| {
                    bad(
                        "auth_value_file",
                        "its first line has characters a header value cannot hold".into(),
                    )
                })?;
                value.set_sensitive(true);
                Some((name, value))
            }
        };
        let (tls, server_name) = match (https, &c.tls) {
            (true, Some(t)) => {
                let config = super::tls::client_config(id, "http", Some(t), base)?;
                let name = match &t.server_name {
                    Some(n) => Some(
                        ServerName::try_from(n.clone())
                            .map_err(|e| bad("tls.server_name", format!("{n:?}: {e}")))?,
                    ),
                    None => None,
                };
                (config, name)
            }
            (true, None) => {
                return Err(bad(
                    "tls",
                    "an https:// URL needs [sinks.http.tls] with the CA (`ca`) that signs the webhook's certificate"
                        .into(),
                ))
            }
            (false, Some(_)) => {
                return Err(bad(
                    "tls",
                    "[sinks.http.tls] is set but the URL is http://: use https:// or remove the table"
                        .into(),
                ))
            }
            // The connector wants a TLS configuration even for http://,
            // which never reaches it.
            (false, None) => (super::tls::client_config(id, "http", None, base)?, None),
        };
        let body = match c.payload {
            PayloadFormat::CloudEvents => {
                BodyFormat::CloudEvents(c.cloudevents_mode.unwrap_or_default())
            }
            PayloadFormat::Json => BodyFormat::Json,
            PayloadFormat::Raw => {
                return Err(bad(
                    "payload",
                    "\"raw\" is not one of json, cloudevents".into(),
                ))
            }
        };
        Ok(Settings {
            uri,
            https,
            auth,
            timeout: c.timeout.0,
            tls,
            server_name,
            body,
        })
    }
}

/// Parses `http.url`; whether it is `https`.
fn parse_url(url: &str) -> Result<(Uri, bool), String> {
    const FORM: &str = "write it as http://host:port/path or https://host/path";
    let uri = Uri::try_from(url).map_err(|e| format!("{url:?} is not a URL ({e}); {FORM}"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(format!(
                "{url:?} must start with http:// or https://; {FORM}"
            ))
        }
    };
    let Some(authority) = uri.authority() else {
        return Err(format!("{url:?} has no host; {FORM}"));
    };
    if authority.as_str().contains('@') {
        return Err(format!(
            "{url:?} holds credentials: use auth_header and auth_value_file"
        ));
    }
    if authority.host().is_empty() {
        return Err(format!("{url:?} has no host; {FORM}"));
    }
    Ok((uri, https))
}

/// The first line of a file, without its line ending; an empty one is an
/// error, as a header with no value is a mistake, not a choice.
fn read_first_line(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if line.is_empty() {
        return Err(format!("{}: the first line is empty", path.display()));
    }
    Ok(line.to_owned())
}

/// Runs the tasks hyper's pool spawns (one per open connection, one that
/// closes idle ones) on tokio, each ending when the sink's stop token is
/// cancelled, so that no connection outlives the hub's shutdown.
#[derive(Clone)]
struct StopExecutor {
    stop: CancellationToken,
}

type BoxSendFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

impl hyper::rt::Executor<BoxSendFuture> for StopExecutor {
    fn execute(&self, fut: BoxSendFuture) {
        let stop = self.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = fut => {}
            }
        });
    }
}

struct HttpSink {
    id: String,
    uri: Uri,
    auth: Option<(HeaderName, HeaderValue)>,
    timeout: Duration,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    stop: CancellationToken,
    body: BodyFormat,
}

impl HttpSink {
    fn new(id: String, s: Settings, stop: CancellationToken) -> HttpSink {
        let mut http = HttpConnector::new();
        // The scheme is checked by the HTTPS connector below.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(s.timeout));
        let b = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(s.tls);
        let b = if s.https {
            b.https_only()
        } else {
            b.https_or_http()
        };
        let b = match s.server_name {
            Some(n) => b.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(n)),
            None => b,
        };
        let connector = b.enable_http1().wrap_connector(http);
        let client = Client::builder(StopExecutor { stop: stop.clone() })
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        HttpSink {
            id,
            uri: s.uri,
            auth: s.auth,
            timeout: s.timeout,
            client,
            stop,
            body: s.body,
        }
    }

    /// Delivers a batch as the body format says: one request for it, or
    /// one per event, in order, stopping at the first that fails.
    async fn post(&self, events: &[SinkEvent]) -> Result<(), SinkError> {
        match self.body {
            BodyFormat::Json => {
                self.post_one(events, "application/json", batch_body(events), &[])
                    .await
            }
            BodyFormat::CloudEvents(CloudEventsMode::Batch) => {
                self.post_one(
                    events,
                    cloudevents::BATCH_CONTENT_TYPE,
                    cloudevents::batch(events),
                    &[],
                )
                .await
            }
            BodyFormat::CloudEvents(CloudEventsMode::Structured) => {
                for e in events {
                    self.post_one(
                        std::slice::from_ref(e),
                        cloudevents::STRUCTURED_CONTENT_TYPE,
                        cloudevents::structured(e),
                        &[],
                    )
                    .await?;
                }
                Ok(())
            }
            BodyFormat::CloudEvents(CloudEventsMode::Binary) => {
                for e in events {
                    let mut data = Vec::with_capacity(64 + e.event.body.value.payload_len());
                    cloudevents::write_data(e, &mut data);
                    self.post_one(
                        std::slice::from_ref(e),
                        cloudevents::DATA_CONTENT_TYPE,
                        data,
                        &cloudevents::binary_headers(e),
                    )
                    .await?;
                }
                Ok(())
            }
        }
    }

    /// One request carrying `events` as `body`.
    async fn post_one(
        &self,
        events: &[SinkEvent],
        content_type: &'static str,
        body: Vec<u8>,
        headers: &[(&'static str, String)],
    ) -> Result<(), SinkError> {
        if self.stop.is_cancelled() {
            return Err(SinkError::Transient("the hub is stopping".into()));
        }
        let key = idempotency_key(events);
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(CONTENT_TYPE, content_type)
            .header(
                USER_AGENT,
                concat!("outpost-hub/", env!("CARGO_PKG_VERSION")),
            )
            .header(IDEMPOTENCY_KEY, key.as_str())
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| SinkError::Transient(format!("cannot make the request: {e}")))?;
        for (name, value) in headers {
            // The values are percent-encoded printable ASCII, which a header
            // always holds; one that did not would never go through.
            let value = HeaderValue::try_from(value.as_str()).map_err(|_| {
                SinkError::Rejected(format!("{name}: {value:?} cannot be a header value"))
            })?;
            req.headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
        if let Some((name, value)) = &self.auth {
            req.headers_mut().insert(name.clone(), value.clone());
        }
        let deadline = clock::tokio_now() + self.timeout;
        let outcome = tokio::select! {
            biased;
            () = self.stop.cancelled() => {
                return Err(SinkError::Transient("the hub is stopping".into()));
            }
            r = self.exchange(req, deadline) => r,
        };
        // Stopping ends the pool's connection tasks, which can fail the
        // request before the branch above is seen: say why.
        if outcome.is_err() && self.stop.is_cancelled() {
            return Err(SinkError::Transient("the hub is stopping".into()));
        }
        match &outcome {
            Ok(()) => tracing::debug!(
                events = events.len(),
                idempotency_key = %key,
                "Batch accepted."
            ),
            Err(e) => tracing::debug!(
                events = events.len(),
                idempotency_key = %key,
                error = %e,
                "Batch not accepted."
            ),
        }
        outcome
    }

    /// Sends one request and sorts the answer, all before `deadline`.
    async fn exchange(
        &self,
        req: Request<Full<Bytes>>,
        deadline: Instant,
    ) -> Result<(), SinkError> {
        let timeout = self.timeout;
        let timed_out = || {
            SinkError::Transient(format!(
                "no answer from {} within {}",
                self.uri,
                humantime::format_duration(timeout)
            ))
        };
        let response = match tokio::time::timeout_at(deadline, self.client.request(req)).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(e)) => {
                return Err(SinkError::Transient(format!(
                    "{} {}: {}",
                    if e.is_connect() {
                        "cannot connect to"
                    } else {
                        "request failed to"
                    },
                    self.uri,
                    error_chain(&e)
                )))
            }
            Ok(Ok(r)) => r,
        };
        let (parts, body) = response.into_parts();
        let limit = if parts.status.is_success() {
            BODY_DRAINED
        } else {
            BODY_IN_MESSAGE
        };
        // An accepting answer's body is read only so that the connection can
        // carry the next request; not reading it all changes nothing else.
        let body = tokio::time::timeout_at(deadline, read_prefix(body, limit))
            .await
            .unwrap_or_default();
        classify(
            parts.status,
            header_text(&parts.headers, &RETRY_AFTER),
            header_text(&parts.headers, &LOCATION),
            &body,
        )
    }
}

impl Sink for HttpSink {
    fn deliver<'a>(&'a self, events: &'a [SinkEvent]) -> BoxFuture<'a, Result<(), SinkError>> {
        let span = tracing::debug_span!("sink", id = %self.id, kind = "http");
        Box::pin(self.post(events).instrument(span))
    }
}

/// Reads at most `limit` bytes of a body; what arrived before an error.
async fn read_prefix(mut body: hyper::body::Incoming, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < limit {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    let room = limit - out.len();
                    out.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            Some(Err(_)) | None => break,
        }
    }
    out
}

/// A header's value as text for a message: at most 200 characters, printable.
fn header_text(headers: &http::HeaderMap, name: &HeaderName) -> Option<String> {
    let v = headers.get(name)?;
    let text = String::from_utf8_lossy(v.as_bytes());
    Some(text.chars().take(BODY_IN_MESSAGE).collect::<String>())
}

/// Sorts an answer: accepted, worth a retry, or refused for good.
fn classify(
    status: StatusCode,
    retry_after: Option<String>,
    location: Option<String>,
    body: &[u8],
) -> Result<(), SinkError> {
    let code = status.as_u16();
    let body = String::from_utf8_lossy(&body[..body.len().min(BODY_IN_MESSAGE)]);
    let said = if body.is_empty() {
        String::new()
    } else {
        format!(": {body:?}")
    };
    match code {
        200..=299 => Ok(()),
        // RFC 9110 15.5.9 (408), RFC 8470 5.2 (425), RFC 6585 4 (429):
        // the far end asks to be asked again.
        408 | 425 | 429 | 500..=599 => {
            let after = retry_after
                .map(|a| format!(" (Retry-After: {a:?})"))
                .unwrap_or_default();
            Err(SinkError::Transient(format!("the webhook answered {status}{after}{said}")))
        }
        // A moved webhook, a wrong token or path: the operator can fix it,
        // and the events wait (held back, visible in `sinks status`) rather
        // than being skipped.
        300..=399 => Err(SinkError::Transient(format!(
            "the webhook answered {status}{}: redirects are not followed; set http.url to the webhook's new address{said}",
            location
                .map(|l| format!(" to {l:?}"))
                .unwrap_or_default()
        ))),
        401 | 403 | 404 | 407 => Err(SinkError::Transient(format!(
            "the webhook refused the batch with {status}{said}: check http.url and the auth header"
        ))),
        400..=499 => Err(SinkError::Rejected(format!(
            "the webhook refused the batch with {status}{said}"
        ))),
        // Nothing a webhook should answer (1xx as a final answer, 600 and
        // up): nothing says a retry cannot help, so the events are kept.
        _ => Err(SinkError::Transient(format!(
            "the webhook answered an unexpected {status}{said}"
        ))),
    }
}

/// An error's causes, as one line (a TLS failure is three levels down); the
/// error itself only when it has none, as hyper's top level says only which
/// step failed ("client error (Connect)"), which the caller says better.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let (mut out, mut cause) = match e.source() {
        Some(first) => (first.to_string(), first.source()),
        None => (e.to_string(), None),
    };
    while let Some(c) = cause {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_sorted_into_accepted_retry_and_refused() {
        let c = |code: u16| StatusCode::from_u16(code).map(|s| classify(s, None, None, b"why"));
        assert!(matches!(c(200), Ok(Ok(()))));
        assert!(matches!(c(204), Ok(Ok(()))));
        for code in [
            401, 403, 404, 407, 408, 425, 429, 500, 502, 503, 504, 599, 301, 302, 307, 308,
        ] {
            assert!(
                matches!(c(code), Ok(Err(SinkError::Transient(_)))),
                "{code}"
            );
        }
        for code in [400, 413, 422, 499] {
            assert!(matches!(c(code), Ok(Err(SinkError::Rejected(_)))), "{code}");
        }
        assert!(matches!(c(600), Ok(Err(SinkError::Transient(_)))));
    }

    #[test]
    fn refusals_carry_the_status_the_body_start_and_the_hints() {
        let long = vec![b'x'; 1000];
        let e = classify(StatusCode::BAD_REQUEST, None, None, &long).expect_err("400");
        let m = e.to_string();
        assert!(m.contains("400 Bad Request"), "{m}");
        assert!(
            m.contains(&"x".repeat(200)) && !m.contains(&"x".repeat(201)),
            "{m}"
        );
        let e = classify(StatusCode::SERVICE_UNAVAILABLE, Some("7".into()), None, b"")
            .expect_err("503");
        assert!(e.to_string().contains("Retry-After: \"7\""), "{e}");
        let e = classify(
            StatusCode::PERMANENT_REDIRECT,
            None,
            Some("https://new/".into()),
            b"",
        )
        .expect_err("308");
        assert!(e.to_string().contains("https://new/"), "{e}");
        assert!(e.to_string().contains("redirects are not followed"), "{e}");
    }

    #[test]
    fn urls_must_be_http_or_https_with_a_host_and_no_credentials() {
        assert!(matches!(
            parse_url("http://127.0.0.1:8080/hook"),
            Ok((_, false))
        ));
        assert!(matches!(
            parse_url("https://hooks.example/x?y=1"),
            Ok((_, true))
        ));
        assert!(matches!(parse_url("http://[::1]:8080/"), Ok((_, false))));
        for bad in [
            "ftp://host/x",
            "host:80/x",
            "/just/a/path",
            "http://",
            "not a url",
            "http://user:pw@host/x",
            "",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
