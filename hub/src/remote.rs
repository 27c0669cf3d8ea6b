//! The operator verbs as clients of a hub's HTTP API (`--api URL
//! --token-file FILE`), so an operator needs no shell on the hub's
//! machine and every change is audited under the token's subject.
//!
//! Each call is one HTTP/1.1 request on its own connection (a verb makes
//! one or two), on hyper's client with rustls and ring: no proxy variables,
//! no redirects followed, only the CA given with `--api-ca` trusted for
//! `https://`. The answers are the API's documents (`crate::api::types`),
//! turned back into the store's records so that the verbs print exactly
//! what they print when they read the store themselves.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::problem::Problem;

/// How long one request may take, connecting included.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// The largest answer read (an events page of 1000 large events fits).
const MAX_ANSWER: usize = 256 * 1024 * 1024;

/// `--api`, `--token-file`, `--api-ca`: where the hub's API is.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RemoteArgs {
    /// Call this hub's HTTP API (`https://hub.example.net:8443`) instead of
    /// reading the store; needs --token-file.
    #[arg(long, value_name = "URL", requires = "token_file")]
    pub api: Option<String>,
    /// The file holding the API token (its first line), with --api.
    #[arg(long, value_name = "FILE", requires = "api")]
    pub token_file: Option<PathBuf>,
    /// The CA that signed the API's certificate, for an https:// --api.
    #[arg(long, value_name = "FILE", requires = "api")]
    pub api_ca: Option<PathBuf>,
}

/// Where a verb that can work either way reads and writes: the hub's store
/// (`--config FILE`, the break-glass path) or the hub's API (`--api URL
/// --token-file F`), exactly one of them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StoreOrApi {
    /// The hub's TOML config file (to use its store directly).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "api",
        conflicts_with = "api"
    )]
    pub config: Option<PathBuf>,
    /// Or call a hub's API instead.
    #[command(flatten)]
    pub remote: RemoteArgs,
}

impl StoreOrApi {
    /// The API to call, or `None` for the store.
    pub fn api(&self) -> Result<Option<Remote>, RemoteError> {
        Remote::from_args(&self.remote)
    }
}

/// Why a call to the API failed; its message is the one line printed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// `--api` is not an http(s) URL with a host.
    #[error("--api {url:?}: {why}")]
    Url {
        /// As given.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// The token file cannot be read or is empty.
    #[error("--token-file {}: {why}", .path.display())]
    Token {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// `--api-ca` is unusable, or missing for https.
    #[error("--api-ca: {0}")]
    Tls(String),
    /// The hub could not be reached or the exchange broke off.
    #[error("{url}: {why}")]
    Transport {
        /// The request's URL.
        url: String,
        /// What happened.
        why: String,
    },
    /// The API answered with a problem document.
    #[error("{url}: {problem}")]
    Problem {
        /// The request's URL.
        url: String,
        /// What the API said.
        problem: Box<Problem>,
    },
    /// The API answered something this client does not understand.
    #[error("{url}: unexpected answer: {why}")]
    Answer {
        /// The request's URL.
        url: String,
        /// What was wrong with it.
        why: String,
    },
}

impl RemoteError {
    /// The exit status: 2 for what the caller can fix by changing the
    /// command (a bad URL or token file, a 4xx), 1 for the hub or the
    /// network failing.
    pub fn exit_code(&self) -> u8 {
        match self {
            RemoteError::Url { .. } | RemoteError::Token { .. } | RemoteError::Tls(_) => 2,
            RemoteError::Problem { problem, .. } if (400..500).contains(&problem.status) => 2,
            _ => 1,
        }
    }
}

/// A hub's API, as the verbs call it.
pub struct Remote {
    scheme_https: bool,
    host: String,
    port: u16,
    base_path: String,
    token: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
pub fn encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A query string of the given pairs, without those that are `None`.
pub fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

impl Remote {
    /// The API `args` names, or `None` when the verb reads the store.
    pub fn from_args(args: &RemoteArgs) -> Result<Option<Remote>, RemoteError> {
        let Some(url) = &args.api else {
            return Ok(None);
        };
        let bad = |why: &str| RemoteError::Url {
            url: url.clone(),
            why: why.to_owned(),
        };
        let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("must start with http:// or https://")),
        };
        let host = uri.host().ok_or_else(|| bad("has no host"))?.to_owned();
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(bad("must not hold credentials; use --token-file"));
        }
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let base_path = uri.path().trim_end_matches('/').to_owned();
        let token_path = args.token_file.clone().unwrap_or_default();
        let token = read_token(&token_path)?;
        let tls = match (https, &args.api_ca) {
            (false, _) => None,
            (true, None) => {
                return Err(RemoteError::Tls(
                    "an https:// --api needs the CA of the API's certificate".into(),
                ))
            }
            (true, Some(ca)) => {
                let mut c = outpost_tls::client_config(outpost_tls::ClientFiles {
                    ca,
                    client: None,
                    server_name: None,
                })
                .map_err(|e| RemoteError::Tls(e.to_string()))?;
                c.alpn_protocols = vec![b"http/1.1".to_vec()];
                Some(Arc::new(c))
            }
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| RemoteError::Transport {
                url: url.clone(),
                why: format!("cannot start a runtime: {e}"),
            })?;
        Ok(Some(Remote {
            scheme_https: https,
            host,
            port,
            base_path,
            token,
            tls,
            rt,
        }))
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}://{}:{}{}{path}",
            if self.scheme_https { "https" } else { "http" },
            self.host,
            self.port,
            self.base_path
        )
    }

    /// `GET /api/v1<path>` as `T`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, RemoteError> {
        let body = self.call(Method::GET, path, None)?;
        self.decode(path, &body)
    }

    /// `POST /api/v1<path>` with `body` as JSON, the answer as `T`.
    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, RemoteError> {
        let json = serde_json::to_vec(body).map_err(|e| RemoteError::Answer {
            url: self.url(path),
            why: e.to_string(),
        })?;
        let answer = self.call(Method::POST, path, Some(json))?;
        self.decode(path, &answer)
    }

    fn decode<T: DeserializeOwned>(&self, path: &str, body: &[u8]) -> Result<T, RemoteError> {
        serde_json::from_slice(body).map_err(|e| RemoteError::Answer {
            url: self.url(&format!("/api/v1{path}")),
            why: e.to_string(),
        })
    }

    /// One request; the body of a 2xx answer, or the problem of another.
    fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, RemoteError> {
        let full = format!("{}/api/v1{path}", self.base_path);
        let url = self.url(&format!("/api/v1{path}"));
        let transport = |why: String| RemoteError::Transport {
            url: url.clone(),
            why,
        };
        let mut req = Request::builder()
            .method(method)
            .uri(&full)
            .header(HOST, format!("{}:{}", self.host, self.port))
            .header(AUTHORIZATION, format!("Bearer {}", self.token))
            .header(
                http::header::USER_AGENT,
                concat!("outpost-hub/", env!("CARGO_PKG_VERSION")),
            );
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| transport(e.to_string()))?;
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| transport(format!("cannot connect: {e}")))?;
            let _ = tcp.set_nodelay(true);
            match &self.tls {
                None => exchange(TokioIo::new(tcp), req).await,
                Some(tls) => {
                    let name = ServerName::try_from(self.host.clone())
                        .map_err(|e| transport(format!("not a server name: {e}")))?;
                    let stream = tokio_rustls::TlsConnector::from(tls.clone())
                        .connect(name, tcp)
                        .await
                        .map_err(|e| transport(format!("TLS: {e}")))?;
                    exchange(TokioIo::new(stream), req).await
                }
            }
            .map_err(transport)
        };
        let (status, bytes) = self
            .rt
            .block_on(async { tokio::time::timeout(TIMEOUT, exchange).await })
            .map_err(|_| transport(format!("no answer within {}s", TIMEOUT.as_secs())))??;
        if status.is_success() {
            return Ok(bytes);
        }
        let problem = crate::api::problem::parse(&bytes).unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&bytes);
            Problem::status(status, Some(text.chars().take(200).collect()))
        });
        Err(RemoteError::Problem {
            url,
            problem: Box::new(problem),
        })
    }
}

async fn exchange<I>(io: I, req: Request<Full<Bytes>>) -> Result<(StatusCode, Vec<u8>), String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    let request = async move {
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        drop(sender);
        Ok::<_, String>((status, body.to_vec()))
    };
    let (answer, _) = tokio::join!(request, conn);
    answer
}

fn read_token(path: &Path) -> Result<String, RemoteError> {
    let text = std::fs::read_to_string(path).map_err(|e| RemoteError::Token {
        path: path.to_owned(),
        why: e.to_string(),
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        return Err(RemoteError::Token {
            path: path.to_owned(),
            why: "is empty".into(),
        });
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(
            query(&[
                ("stream", Some("plant/#".into())),
                ("agent", None),
                ("limit", Some("5".into()))
            ]),
            "?stream=plant%2F%23&limit=5"
        );
        assert_eq!(query(&[("a", None)]), "");
    }

    #[test]
    fn a_bad_url_or_missing_token_file_is_exit_2() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("t");
        std::fs::write(&token, "tok\n").expect("writes");
        for (url, file) in [
            ("ftp://hub", token.clone()),
            ("http://", token.clone()),
            ("https://hub:8443", token.clone()),
            ("http://hub:8080", dir.path().join("missing")),
        ] {
            let args = RemoteArgs {
                api: Some(url.into()),
                token_file: Some(file),
                api_ca: None,
            };
            let e = Remote::from_args(&args).expect_err(url);
            assert_eq!(e.exit_code(), 2, "{e}");
        }
    }
}
