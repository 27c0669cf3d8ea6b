//! The HTTP webhook sink against a webhook served by hyper's own HTTP/1.1
//! server in this test, plain and over TLS with certificates made here with
//! rcgen: what arrives (one `POST` per batch, its headers and JSON body), how
//! its answers are sorted (2xx accepted, 503 and a hang worth a retry, 400 and
//! redirects refused), a webhook that is down at build time or goes away
//! between deliveries, TLS with the right CA, a wrong one and a client
//! certificate, settings that cannot work, and the stop token ending the
//! sink's connections.
//!
//! The sink is driven directly through `SinkConfig::build` and
//! `Sink::deliver`; every wait is bounded by a deadline, none is a fixed sleep
//! that correctness depends on.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use outpost_hub::sinks::{Sink, SinkConfig, SinkError, SinkEvent};
use outpost_protocols::{AgentId, Event, EventBody, Quality, Seq, StreamName, Timestamp, Value};
use outpost_tests::free_port;
use outpost_tests::test_ca::{Ca, CertFiles};
use rcgen::ExtendedKeyUsagePurpose;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long any one condition may take to come true.
const DEADLINE: Duration = Duration::from_secs(60);

/// How the webhook answers the next requests.
#[derive(Clone, Debug)]
enum Mode {
    /// `200 OK`.
    Accept,
    /// This status with this body (and `Retry-After: 3` for a 503, and a
    /// `Location` for a 3xx).
    Status(u16, &'static str),
    /// No answer until the server stops.
    Hang,
}

/// One request as the webhook received it.
#[derive(Clone, Debug)]
struct Received {
    method: String,
    path_and_query: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn events(&self) -> Result<Vec<serde_json::Value>> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).context("body is JSON")?;
        let obj = v.as_object().context("body is an object")?;
        ensure!(obj.len() == 1, "only `events` in the body: {v}");
        Ok(obj
            .get("events")
            .and_then(|e| e.as_array())
            .context("`events` is an array")?
            .clone())
    }
}

/// What the webhook shares with the test.
#[derive(Default)]
struct State {
    mode: Mutex<Option<Mode>>,
    received: Mutex<Vec<Received>>,
    /// Connections accepted and connections that have ended.
    opened: AtomicUsize,
    closed: AtomicUsize,
}

/// The far end: hyper's HTTP/1.1 server on 127.0.0.1, optionally over TLS,
/// recording every request; it stops when dropped.
struct Webhook {
    addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
}

impl Webhook {
    /// A webhook on a free port.
    async fn start(tls: Option<tokio_rustls::TlsAcceptor>) -> Result<Webhook> {
        Webhook::start_on(0, tls).await
    }

    /// A webhook on `port` (0: a free one).
    async fn start_on(port: u16, tls: Option<tokio_rustls::TlsAcceptor>) -> Result<Webhook> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        *lock(&state.mode) = Some(Mode::Accept);
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, tls, state.clone(), stop.clone()));
        Ok(Webhook { addr, state, stop })
    }

    fn set(&self, mode: Mode) {
        *lock(&self.state.mode) = Some(mode);
    }

    fn received(&self) -> Vec<Received> {
        lock(&self.state.received).clone()
    }

    fn url(&self, scheme: &str, path: &str) -> String {
        format!("{scheme}://{}{path}", self.addr)
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<State>,
    stop: CancellationToken,
) {
    loop {
        let (tcp, _) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => continue,
            },
        };
        let (state, stop, tls) = (state.clone(), stop.clone(), tls.clone());
        tokio::spawn(async move {
            state.opened.fetch_add(1, Ordering::SeqCst);
            let service = {
                let state = state.clone();
                let stop = stop.clone();
                service_fn(move |req| answer(req, state.clone(), stop.clone()))
            };
            let http = hyper::server::conn::http1::Builder::new();
            tokio::select! {
                () = stop.cancelled() => {}
                () = async {
                    match tls {
                        Some(acceptor) => {
                            // A client that fails the handshake is the
                            // client's business; the connection just ends.
                            if let Ok(s) = acceptor.accept(tcp).await {
                                let _ = http.serve_connection(TokioIo::new(s), service).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(tcp), service).await;
                        }
                    }
                } => {}
            }
            state.closed.fetch_add(1, Ordering::SeqCst);
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    state: Arc<State>,
    stop: CancellationToken,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    lock(&state.received).push(Received {
        method: parts.method.to_string(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: parts.headers,
        body,
    });
    let mode = lock(&state.mode).clone().unwrap_or(Mode::Accept);
    let response = |code: u16, body: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if code == 503 {
            r.headers_mut()
                .insert("retry-after", hyper::header::HeaderValue::from_static("3"));
        }
        if (300..400).contains(&code) {
            r.headers_mut().insert(
                "location",
                hyper::header::HeaderValue::from_static("https://moved.example/hook"),
            );
        }
        r
    };
    Ok(match mode {
        Mode::Accept => response(200, "{\"ok\":true}"),
        Mode::Status(code, body) => response(code, body),
        Mode::Hang => {
            stop.cancelled().await;
            response(503, "")
        }
    })
}

/// A sink config as `[[sinks]]` would read, with `http` as `[sinks.http]`.
fn config(http: serde_json::Value) -> Result<SinkConfig> {
    Ok(serde_json::from_value(serde_json::json!({
        "id": "hook",
        "kind": "http",
        "http": http,
    }))?)
}

async fn build(http: serde_json::Value, base: &Path) -> Result<(Arc<dyn Sink>, CancellationToken)> {
    let stop = CancellationToken::new();
    let sink = config(http)?
        .build(base, stop.clone())
        .await
        .map_err(|e| anyhow::anyhow!("build: {e}"))?;
    Ok((sink, stop))
}

/// The config error building `http` gives; fails if it builds.
async fn config_error(http: serde_json::Value, base: &Path) -> Result<(String, String)> {
    match config(http)?.build(base, CancellationToken::new()).await {
        Err(SinkError::Config { id, key, message }) => {
            ensure!(id == "hook", "the error names the sink: {id}");
            Ok((key, message))
        }
        Err(e) => bail!("not a config error: {e:?}"),
        Ok(_) => bail!("built"),
    }
}

fn event(agent: &str, seq: u64, stream: &str, value: Value) -> Result<SinkEvent> {
    Ok(SinkEvent {
        queued_at: 0,
        event: Event {
            agent_id: AgentId::parse(agent)?,
            seq: Seq(seq),
            body: EventBody {
                stream: StreamName::parse(stream)?,
                ts: Timestamp(1_700_000_000_000 + seq as i64),
                value,
                quality: Quality::Good,
                attrs: BTreeMap::new(),
            },
        },
        labels: Arc::new(BTreeMap::new()),
    })
}

/// Three events of two agents, with a number, a string and a JSON value.
fn batch() -> Result<Vec<SinkEvent>> {
    Ok(vec![
        event("gw-1", 1, "plc1/temp", Value::F64(21.5))?,
        event("gw-1", 2, "plc1/state", Value::String("running".into()))?,
        event(
            "gw-2",
            7,
            "mqtt/site/meter",
            Value::Json(outpost_protocols::JsonText::parse(r#"{"kwh":12}"#)?),
        )?,
    ])
}

/// `sha256sum` of `text`: the documented key, computed by another program.
fn sha256sum(text: &str) -> Result<String> {
    use std::io::Write as _;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("sha256sum (coreutils)")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "sha256sum failed");
    Ok(String::from_utf8(out.stdout)?
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

fn expect_transient(r: Result<(), SinkError>, what: &str) -> Result<String> {
    match r {
        Err(SinkError::Transient(m)) => Ok(m),
        other => bail!("{what}: expected Transient, got {other:?}"),
    }
}

fn expect_rejected(r: Result<(), SinkError>, what: &str) -> Result<String> {
    match r {
        Err(SinkError::Rejected(m)) => Ok(m),
        other => bail!("{what}: expected Rejected, got {other:?}"),
    }
}

/// Delivers with an outer deadline, so that a sink that hangs fails the
/// test instead of stalling it.
async fn deliver(sink: &Arc<dyn Sink>, events: &[SinkEvent]) -> Result<Result<(), SinkError>> {
    tokio::time::timeout(DEADLINE, sink.deliver(events))
        .await
        .context("deliver did not return")
}

/// Polls `cond` until it holds or [`DEADLINE`] passes, without blocking the
/// runtime.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        if cond() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("timed out waiting for {what}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_arrive_as_one_json_post_with_the_documented_headers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("token"), "Bearer s3cret\nsecond line\n")?;
    let hook = Webhook::start(None).await?;
    let (sink, _stop) = build(
        serde_json::json!({
            "url": hook.url("http", "/ingest/v1?src=outpost"),
            "auth_header": "Authorization",
            // Relative to the config's folder.
            "auth_value_file": "token",
        }),
        dir.path(),
    )
    .await?;
    let events = batch()?;
    deliver(&sink, &events).await??;

    let got = hook.received();
    ensure!(got.len() == 1, "one request for one delivery: {got:?}");
    let r = &got[0];
    ensure!(r.method == "POST", "{}", r.method);
    ensure!(
        r.path_and_query == "/ingest/v1?src=outpost",
        "{}",
        r.path_and_query
    );
    ensure!(
        r.header("content-type") == Some("application/json"),
        "{r:?}"
    );
    ensure!(r.header("authorization") == Some("Bearer s3cret"), "{r:?}");
    let key = sha256sum("gw-1:1\ngw-1:2\ngw-2:7\n")?;
    ensure!(key.len() == 64, "{key}");
    ensure!(
        r.header("idempotency-key") == Some(key.as_str()),
        "{r:?} vs {key}"
    );
    ensure!(
        outpost_hub::sinks::http::idempotency_key(&events) == key,
        "the public helper gives the documented key"
    );

    let body = r.events()?;
    ensure!(body.len() == 3, "{body:?}");
    for (got, sent) in body.iter().zip(&events) {
        ensure!(
            *got == sent.event.to_json(),
            "{got} != {}",
            sent.event.to_json()
        );
    }
    ensure!(
        body[0]["agent_id"] == "gw-1" && body[0]["seq"] == 1,
        "{}",
        body[0]
    );
    ensure!(
        body[0]["stream"] == "plc1/temp" && body[0]["value"] == 21.5,
        "{}",
        body[0]
    );
    ensure!(body[1]["value"] == "running", "{}", body[1]);
    ensure!(
        body[2]["agent_id"] == "gw-2" && body[2]["seq"] == 7,
        "{}",
        body[2]
    );
    ensure!(
        body[2]["value"]["kwh"] == 12,
        "a JSON value stays JSON: {}",
        body[2]
    );

    // The same batch again (as the runner retries) carries the same key; a
    // different batch another.
    deliver(&sink, &events).await??;
    deliver(&sink, &events[..2]).await??;
    let got = hook.received();
    ensure!(got.len() == 3, "{got:?}");
    ensure!(got[1].header("idempotency-key") == Some(key.as_str()));
    ensure!(
        got[1].body == got[0].body,
        "a repeat is byte for byte the same"
    );
    let other = sha256sum("gw-1:1\ngw-1:2\n")?;
    ensure!(got[2].header("idempotency-key") == Some(other.as_str()));
    ensure!(got[2].events()?.len() == 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_and_a_hang_are_transient_within_the_timeout_and_a_later_delivery_succeeds(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hook = Webhook::start(None).await?;
    let timeout = Duration::from_secs(1);
    let (sink, _stop) = build(
        serde_json::json!({ "url": hook.url("http", "/"), "timeout": "1s" }),
        dir.path(),
    )
    .await?;
    let events = batch()?;

    hook.set(Mode::Status(503, "overloaded"));
    let m = expect_transient(deliver(&sink, &events).await?, "503")?;
    ensure!(m.contains("503") && m.contains("overloaded"), "{m}");
    ensure!(m.contains("Retry-After"), "the far end's hint is kept: {m}");
    hook.set(Mode::Status(429, ""));
    expect_transient(deliver(&sink, &events).await?, "429")?;

    hook.set(Mode::Hang);
    let started = Instant::now();
    let m = expect_transient(deliver(&sink, &events).await?, "hang")?;
    let took = started.elapsed();
    ensure!(took >= timeout, "gave up before the timeout: {took:?}");
    // Generous: the machine is shared, but a hang must not last much past
    // the configured timeout.
    ensure!(took < timeout * 10, "a hang lasted {took:?}");
    ensure!(m.contains("within 1s"), "{m}");

    hook.set(Mode::Accept);
    deliver(&sink, &events).await??;
    let got = hook.received();
    ensure!(got.len() == 4, "{}", got.len());
    ensure!(
        got.iter()
            .all(|r| r.header("idempotency-key") == got[0].header("idempotency-key")),
        "every retry of the batch carries its key"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_is_rejected_and_a_redirect_or_a_401_held_with_what_the_webhook_said() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hook = Webhook::start(None).await?;
    let (sink, _stop) = build(
        serde_json::json!({ "url": hook.url("http", "/") }),
        dir.path(),
    )
    .await?;
    let events = batch()?;

    hook.set(Mode::Status(400, "field `value` is not allowed"));
    let m = expect_rejected(deliver(&sink, &events).await?, "400")?;
    ensure!(m.contains("400"), "{m}");
    ensure!(m.contains("field `value` is not allowed"), "{m}");

    // A moved webhook or a wrong token: the operator can fix it, so the
    // events wait instead of being skipped.
    hook.set(Mode::Status(308, ""));
    let m = expect_transient(deliver(&sink, &events).await?, "308")?;
    ensure!(m.contains("308") && m.contains("redirect"), "{m}");
    ensure!(m.contains("https://moved.example/hook"), "{m}");
    ensure!(
        hook.received().len() == 2,
        "the redirect was not followed: {:?}",
        hook.received()
    );
    hook.set(Mode::Status(401, "bad token"));
    let m = expect_transient(deliver(&sink, &events).await?, "401")?;
    ensure!(m.contains("401") && m.contains("auth header"), "{m}");

    // A refusal does not break the sink: the next batch goes through.
    hook.set(Mode::Accept);
    deliver(&sink, &events).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_down_at_build_time_or_between_deliveries_gives_transient_until_it_is_back(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let (sink, _stop) = build(
        serde_json::json!({ "url": format!("http://127.0.0.1:{port}/"), "timeout": "2s" }),
        dir.path(),
    )
    .await?;
    let events = batch()?;
    for _ in 0..2 {
        let started = Instant::now();
        let m = expect_transient(deliver(&sink, &events).await?, "nothing listening")?;
        ensure!(m.contains("connect"), "{m}");
        ensure!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }

    let hook = Webhook::start_on(port, None).await?;
    deliver(&sink, &events).await??;
    ensure!(hook.received().len() == 1, "once: {:?}", hook.received());

    // Gone again, with the sink's connection to it in its pool.
    drop(hook);
    let m = expect_transient(deliver(&sink, &events).await?, "webhook gone")?;
    ensure!(!m.is_empty());
    let hook = Webhook::start_on(port, None).await?;
    deliver(&sink, &events).await??;
    ensure!(hook.received().len() == 1, "{:?}", hook.received());
    Ok(())
}

fn pem_certs(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject as _;
    Ok(rustls::pki_types::CertificateDer::pem_file_iter(path)?.collect::<Result<Vec<_>, _>>()?)
}

/// A TLS acceptor with `server`'s certificate; with `clients`, it requires a
/// client certificate signed by that CA.
fn acceptor(server: &CertFiles, clients: Option<&Ca>) -> Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject as _;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match clients {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in pem_certs(&ca.cert)? {
                roots.add(c)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(
        pem_certs(&server.cert)?,
        rustls::pki_types::PrivateKeyDer::from_pem_file(&server.key)?,
    )?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_works_with_the_webhook_ca_and_a_wrong_ca_is_transient() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new(dir.path(), "hook-ca")?;
    let other = Ca::new(dir.path(), "other-ca")?;
    let server = ca.issue(
        dir.path(),
        "webhook",
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let hook = Webhook::start(Some(acceptor(&server, None)?)).await?;
    let events = batch()?;

    let (sink, _stop) = build(
        serde_json::json!({
            "url": hook.url("https", "/tls"),
            "tls": { "ca": ca.cert },
        }),
        dir.path(),
    )
    .await?;
    deliver(&sink, &events).await??;
    let got = hook.received();
    ensure!(got.len() == 1 && got[0].events()?.len() == 3, "{got:?}");

    // A CA that did not sign the webhook's certificate: the handshake fails
    // at delivery, which is Transient (the operator may be rotating either
    // side's certificates; the events wait).
    let (wrong, _stop2) = build(
        serde_json::json!({
            "url": hook.url("https", "/tls"),
            "tls": { "ca": other.cert },
        }),
        dir.path(),
    )
    .await?;
    let m = expect_transient(deliver(&wrong, &events).await?, "wrong CA")?;
    ensure!(
        m.to_lowercase().contains("certificate"),
        "the message says why: {m}"
    );

    // A name the certificate does not hold, then `server_name` naming one it
    // does.
    let named = ca.issue(
        dir.path(),
        "named",
        &["hook.test"],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let named_hook = Webhook::start(Some(acceptor(&named, None)?)).await?;
    let (by_ip, _stop3) = build(
        serde_json::json!({ "url": named_hook.url("https", "/"), "tls": { "ca": ca.cert } }),
        dir.path(),
    )
    .await?;
    expect_transient(deliver(&by_ip, &events).await?, "name mismatch")?;
    let (by_name, _stop4) = build(
        serde_json::json!({
            "url": named_hook.url("https", "/"),
            "tls": { "ca": ca.cert, "server_name": "hook.test" },
        }),
        dir.path(),
    )
    .await?;
    deliver(&by_name, &events).await??;
    ensure!(named_hook.received().len() == 1);
    ensure!(
        hook.received().len() == 1,
        "nothing arrived over a failed handshake"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_wants_a_client_certificate_takes_the_configured_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::new(dir.path(), "hook-ca")?;
    let server = ca.issue(
        dir.path(),
        "webhook",
        &["127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let client = ca.issue(dir.path(), "hub", &[], ExtendedKeyUsagePurpose::ClientAuth)?;
    let hook = Webhook::start(Some(acceptor(&server, Some(&ca))?)).await?;
    let events = batch()?;

    let (with_cert, _stop) = build(
        serde_json::json!({
            "url": hook.url("https", "/"),
            "tls": { "ca": ca.cert, "cert": client.cert, "key": client.key },
        }),
        dir.path(),
    )
    .await?;
    deliver(&with_cert, &events).await??;
    ensure!(hook.received().len() == 1);

    let (without, _stop2) = build(
        serde_json::json!({ "url": hook.url("https", "/"), "tls": { "ca": ca.cert } }),
        dir.path(),
    )
    .await?;
    expect_transient(deliver(&without, &events).await?, "no client certificate")?;
    ensure!(hook.received().len() == 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_cannot_work_are_config_errors_naming_the_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let base = dir.path();
    let ca = Ca::new(base, "hook-ca")?;
    let client = ca.issue(base, "hub", &[], ExtendedKeyUsagePurpose::ClientAuth)?;
    std::fs::write(base.join("garbage.pem"), "not a certificate\n")?;
    std::fs::write(base.join("empty"), "\n")?;
    std::fs::write(base.join("token"), "t0ken\n")?;

    let cases = [
        (
            serde_json::json!({ "url": "ftp://127.0.0.1/x" }),
            "http.url",
            "http://",
        ),
        (
            serde_json::json!({ "url": "not a url" }),
            "http.url",
            "not a url",
        ),
        (
            serde_json::json!({ "url": "127.0.0.1:8080/x" }),
            "http.url",
            "http",
        ),
        (
            serde_json::json!({ "url": "http://user:pw@127.0.0.1/x" }),
            "http.url",
            "credentials",
        ),
        (
            serde_json::json!({ "url": "https://127.0.0.1/" }),
            "http.tls",
            "ca",
        ),
        (
            serde_json::json!({ "url": "http://127.0.0.1/", "tls": { "ca": ca.cert } }),
            "http.tls",
            "https://",
        ),
        (
            serde_json::json!({ "url": "https://127.0.0.1/", "tls": { "ca": "missing.pem" } }),
            "http.tls.ca",
            "missing.pem",
        ),
        (
            serde_json::json!({ "url": "https://127.0.0.1/", "tls": { "ca": "garbage.pem" } }),
            "http.tls.ca",
            "no certificate",
        ),
        (
            serde_json::json!({
                "url": "https://127.0.0.1/",
                "tls": { "ca": ca.cert, "cert": client.cert },
            }),
            "http.tls.key",
            "key",
        ),
        (
            serde_json::json!({
                "url": "https://127.0.0.1/",
                "tls": { "ca": ca.cert, "cert": client.cert, "key": "garbage.pem" },
            }),
            "http.tls.key",
            "no private key",
        ),
        (
            serde_json::json!({
                "url": "https://127.0.0.1/",
                "tls": { "ca": ca.cert, "server_name": "not a name!" },
            }),
            "http.tls.server_name",
            "not a name!",
        ),
        (
            serde_json::json!({ "url": "http://127.0.0.1/", "auth_header": "Authorization" }),
            "http.auth_value_file",
            "auth_header",
        ),
        (
            serde_json::json!({ "url": "http://127.0.0.1/", "auth_value_file": "token" }),
            "http.auth_header",
            "auth_value_file",
        ),
        (
            serde_json::json!({
                "url": "http://127.0.0.1/",
                "auth_header": "Authorization",
                "auth_value_file": "missing-token",
            }),
            "http.auth_value_file",
            "missing-token",
        ),
        (
            serde_json::json!({
                "url": "http://127.0.0.1/",
                "auth_header": "Authorization",
                "auth_value_file": "empty",
            }),
            "http.auth_value_file",
            "empty",
        ),
        (
            serde_json::json!({
                "url": "http://127.0.0.1/",
                "auth_header": "bad header",
                "auth_value_file": "token",
            }),
            "http.auth_header",
            "bad header",
        ),
        (
            serde_json::json!({
                "url": "http://127.0.0.1/",
                "auth_header": "Idempotency-Key",
                "auth_value_file": "token",
            }),
            "http.auth_header",
            "sink itself",
        ),
        (
            serde_json::json!({ "url": "http://127.0.0.1/", "timeout": "0s" }),
            "http.timeout",
            "zero",
        ),
    ];
    for (http, key, hint) in cases {
        let (got_key, message) = config_error(http.clone(), base)
            .await
            .with_context(|| format!("{http}"))?;
        ensure!(
            got_key == key,
            "{http}: key {got_key}, expected {key} ({message})"
        );
        ensure!(
            message.contains(hint),
            "{http}: {message:?} does not mention {hint:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_stop_closes_the_sinks_connections_and_ends_deliveries() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let hook = Webhook::start(None).await?;
    let (sink, stop) = build(
        serde_json::json!({ "url": hook.url("http", "/") }),
        dir.path(),
    )
    .await?;
    let events = batch()?;
    // On a loaded machine a pooled connection can be lost between two
    // requests (a Transient the runner would retry): retry here too, and ask
    // only that a connection was used again.
    for _ in 0..2 {
        let mut tries = 0;
        while let Err(e) = deliver(&sink, &events).await? {
            tries += 1;
            ensure!(tries < 5, "delivery kept failing: {e}");
        }
    }
    let requests = hook.received().len();
    let opened = hook.state.opened.load(Ordering::SeqCst);
    ensure!(
        opened < requests,
        "the connection is kept and used again: {opened} connections for {requests} requests"
    );
    let closed_before = hook.state.closed.load(Ordering::SeqCst);

    stop.cancel();
    eventually("the sink's idle connection to close", || {
        hook.state.closed.load(Ordering::SeqCst) == opened.max(closed_before + 1)
    })
    .await?;
    let m = expect_transient(deliver(&sink, &events).await?, "after stop")?;
    ensure!(m.contains("stopping"), "{m}");
    ensure!(hook.received().len() == requests);

    // A delivery in flight when stop comes returns at once.
    let (sink, stop) = build(
        serde_json::json!({ "url": hook.url("http", "/"), "timeout": "1h" }),
        dir.path(),
    )
    .await?;
    hook.set(Mode::Hang);
    let canceller = {
        let stop = stop.clone();
        let state = hook.state.clone();
        tokio::spawn(async move {
            // Cancel once the webhook holds the request.
            while lock(&state.received).len() < requests + 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            stop.cancel();
        })
    };
    let m = expect_transient(deliver(&sink, &events).await?, "stopped in flight")?;
    ensure!(m.contains("stopping"), "{m}");
    canceller.await?;
    Ok(())
}
