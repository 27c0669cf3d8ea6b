//! The issuer's signing keys (a JWKS, RFC 7517): read from a file or an
//! `https://` URL, kept, and read again when a token names a key the hub
//! does not know (the issuer rotated its keys) — at most once per
//! `jwks_refresh`, so that tokens with made-up key ids cannot make the hub
//! hammer the issuer — and when the keys are older than `jwks_max_age`.
//!
//! Only keys that can verify what we accept are kept: RSA keys (RS256) and
//! P-256 EC keys (ES256), with `use` absent or `sig` and `alg` absent or
//! matching. Everything else in the set (encryption keys, other curves,
//! symmetric `oct` keys) is skipped, so no key of the set can be used with
//! an algorithm it was not published for.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::api::auth::settings::{JwksLocation, OidcConfig};
use crate::client_tls::{self, ClientTlsError};
use crate::clock;

/// The largest JWKS document read.
const MAX_JWKS: usize = 1 << 20;
/// How long a fetch of an `https://` JWKS may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// One usable key.
#[derive(Clone)]
pub struct Key {
    /// Its `kid`, if the set gives one.
    pub kid: Option<String>,
    /// The one algorithm it verifies.
    pub alg: Algorithm,
    /// The key.
    pub key: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// The usable keys of a JWKS.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: Vec<Key>,
}

/// Why a JWKS could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The document is not a JWKS.
    #[error("{from}: not a JWKS: {source}")]
    Parse {
        /// The file or URL.
        from: String,
        /// What is wrong.
        #[source]
        source: serde_json::Error,
    },
    /// The document holds no RSA or P-256 signing key.
    #[error("{from}: holds no RSA (RS256) or P-256 (ES256) signing key")]
    NoKeys {
        /// The file or URL.
        from: String,
    },
    /// `[api.oidc.tls]` is unusable.
    #[error("api.oidc.tls.{}: {source}", .source.key())]
    Tls {
        /// What is wrong.
        #[source]
        source: ClientTlsError,
    },
    /// The URL could not be fetched.
    #[error("{url}: {what}")]
    Fetch {
        /// The URL.
        url: String,
        /// What went wrong.
        what: String,
        /// The error, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

#[derive(Deserialize)]
struct RawSet {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawKey {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

impl KeySet {
    /// Parses a JWKS document; `from` names it in errors.
    pub fn parse(text: &[u8], from: &str) -> Result<KeySet, JwksError> {
        let raw: RawSet = serde_json::from_slice(text).map_err(|source| JwksError::Parse {
            from: from.to_owned(),
            source,
        })?;
        let keys: Vec<Key> = raw
            .keys
            .into_iter()
            .filter_map(|v| serde_json::from_value::<RawKey>(v).ok())
            .filter_map(usable)
            .collect();
        if keys.is_empty() {
            return Err(JwksError::NoKeys {
                from: from.to_owned(),
            });
        }
        Ok(KeySet { keys })
    }

    /// The key for a token whose header names `kid` (or none) and `alg`.
    /// Without a `kid`, only a set with exactly one key of that algorithm
    /// answers.
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<&Key> {
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid) && k.alg == alg),
            None => {
                let mut of_alg = self.keys.iter().filter(|k| k.alg == alg);
                match (of_alg.next(), of_alg.next()) {
                    (Some(k), None) => Some(k),
                    _ => None,
                }
            }
        }
    }

    /// Whether the set has a key with this id (of any algorithm).
    pub fn knows(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// How many usable keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A key we can use, or `None`.
fn usable(k: RawKey) -> Option<Key> {
    if k.use_.as_deref().is_some_and(|u| u != "sig") {
        return None;
    }
    let (alg, key) = match k.kty.as_str() {
        "RSA" => (
            Algorithm::RS256,
            DecodingKey::from_rsa_components(k.n.as_deref()?, k.e.as_deref()?).ok()?,
        ),
        "EC" if k.crv.as_deref() == Some("P-256") => {
            let (x, y) = (k.x.as_deref()?, k.y.as_deref()?);
            // 32-byte coordinates (base64url without padding: 43 chars), so a
            // malformed point is skipped here, not met at every token.
            if x.len() != 43 || y.len() != 43 {
                return None;
            }
            (
                Algorithm::ES256,
                DecodingKey::from_ec_components(x, y).ok()?,
            )
        }
        _ => return None,
    };
    let named = match k.alg.as_deref() {
        None => alg,
        Some("RS256") => Algorithm::RS256,
        Some("ES256") => Algorithm::ES256,
        Some(_) => return None,
    };
    (named == alg).then_some(Key {
        kid: k.kid,
        alg,
        key,
    })
}

/// Where the keys come from, ready to read.
enum Source {
    File(PathBuf),
    Https {
        uri: http::Uri,
        tls: Arc<rustls::ClientConfig>,
    },
}

struct Cache {
    keys: Arc<KeySet>,
    /// When the keys in `keys` were read.
    read_at: Option<Instant>,
    /// When the last read was tried, successful or not.
    tried_at: Option<Instant>,
}

/// The issuer's keys, read when needed (see the module's doc).
pub struct Jwks {
    source: Source,
    from: String,
    refresh: Duration,
    max_age: Duration,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl Jwks {
    /// Prepares the source of `cfg` (relative files from `base`); a file is
    /// read now, so that a wrong path stops the hub at start, while a URL is
    /// fetched at the first token (an issuer that is down does not).
    pub async fn open(cfg: &OidcConfig, base: &Path) -> Result<Jwks, JwksError> {
        let (source, from) = match &cfg.jwks {
            JwksLocation::File(p) => {
                let path = base.join(p);
                let from = path.display().to_string();
                (Source::File(path), from)
            }
            JwksLocation::Https(uri) => {
                let tls = client_tls::client_config(cfg.tls.as_ref(), base)
                    .map_err(|source| JwksError::Tls { source })?;
                (
                    Source::Https {
                        uri: uri.clone(),
                        tls: Arc::new(tls),
                    },
                    uri.to_string(),
                )
            }
        };
        let jwks = Jwks {
            source,
            from,
            refresh: cfg.jwks_refresh,
            max_age: cfg.jwks_max_age,
            cache: Mutex::new(Cache {
                keys: Arc::new(KeySet::default()),
                read_at: None,
                tried_at: None,
            }),
        };
        if let Source::File(_) = jwks.source {
            let keys = jwks.read().await?;
            let mut c = jwks.cache.lock().await;
            c.keys = Arc::new(keys);
            c.read_at = Some(clock::now());
            c.tried_at = c.read_at;
        }
        Ok(jwks)
    }

    /// The key for a token's `kid` and `alg`, reading the set again when it
    /// does not know the key or is old (see the module's doc). `None`: no
    /// such key, even after reading again, or none could be read.
    pub async fn key(&self, kid: Option<&str>, alg: Algorithm) -> Option<Key> {
        let mut c = self.cache.lock().await;
        let stale = c.read_at.is_none_or(|t| clock::elapsed(t) >= self.max_age);
        let found = c.keys.find(kid, alg).cloned();
        if found.is_some() && !stale {
            return found;
        }
        let may_read = c.tried_at.is_none_or(|t| clock::elapsed(t) >= self.refresh);
        if !may_read {
            return found;
        }
        c.tried_at = Some(clock::now());
        match self.read().await {
            Ok(keys) => {
                info!(from = %self.from, keys = keys.len(), "Read the OIDC issuer's keys.");
                c.keys = Arc::new(keys);
                c.read_at = c.tried_at;
            }
            Err(e) => {
                warn!(error = %e, "Cannot read the OIDC issuer's keys; keeping those read before.")
            }
        }
        c.keys.find(kid, alg).cloned()
    }

    async fn read(&self) -> Result<KeySet, JwksError> {
        let bytes = match &self.source {
            Source::File(path) => {
                tokio::fs::read(path)
                    .await
                    .map_err(|source| JwksError::Read {
                        path: path.clone(),
                        source,
                    })?
            }
            Source::Https { uri, tls } => {
                tokio::time::timeout(FETCH_TIMEOUT, fetch(uri, tls.clone()))
                    .await
                    .map_err(|_| JwksError::Fetch {
                        url: uri.to_string(),
                        what: format!("no answer within {FETCH_TIMEOUT:?}"),
                        source: None,
                    })??
            }
        };
        KeySet::parse(&bytes, &self.from)
    }
}

/// GET `uri` over TLS on a connection of its own, driven here (no task is
/// spawned), and its body if the answer is 200.
async fn fetch(uri: &http::Uri, tls: Arc<rustls::ClientConfig>) -> Result<Vec<u8>, JwksError> {
    let url = uri.to_string();
    let fail = |what: &str, e: Option<Box<dyn std::error::Error + Send + Sync>>| JwksError::Fetch {
        url: url.clone(),
        what: what.to_owned(),
        source: e,
    };
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    let port = uri.port_u16().unwrap_or(443);
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| fail("cannot connect", Some(Box::new(e))))?;
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| fail("not a server name", Some(Box::new(e))))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| fail("TLS handshake failed", Some(Box::new(e))))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| fail("HTTP handshake failed", Some(Box::new(e))))?;
    let authority = uri.authority().map_or(host.to_owned(), |a| a.to_string());
    let request = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, authority)
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail("cannot build the request", Some(Box::new(e))))?;
    let exchange = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| fail("request failed", Some(Box::new(e))))?;
        if response.status() != http::StatusCode::OK {
            return Err(fail(&format!("answered {}", response.status()), None));
        }
        let body = Limited::new(response.into_body(), MAX_JWKS)
            .collect()
            .await
            .map_err(|e| fail("cannot read the body (or over 1 MiB)", Some(e)))?;
        Ok(body.to_bytes().to_vec())
        // `sender` is dropped here, which lets `conn` finish.
    };
    let (body, _) = tokio::join!(exchange, conn);
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    const JWKS_1: &str = include_str!("../../../../tests/fixtures/oidc/jwks-1.json");

    #[test]
    fn rsa_and_p256_signing_keys_are_kept_and_the_rest_skipped() {
        let set = KeySet::parse(JWKS_1.as_bytes(), "jwks-1.json").expect("parses");
        assert_eq!(set.len(), 2);
        assert!(set.find(Some("rsa-1"), Algorithm::RS256).is_some());
        assert!(set.find(Some("ec-1"), Algorithm::ES256).is_some());
        // A key is found only for the algorithm it was published for.
        assert!(set.find(Some("rsa-1"), Algorithm::ES256).is_none());
        assert!(set.find(Some("rsa-1"), Algorithm::HS256).is_none());
        // Without a kid, one key per algorithm answers.
        assert!(set.find(None, Algorithm::RS256).is_some());

        let odd = r#"{"keys": [
            {"kty": "oct", "kid": "s", "k": "c2VjcmV0"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"},
            {"kty": "RSA", "kid": "ps", "alg": "PS256", "n": "AQAB", "e": "AQAB"},
            {"kty": "EC", "kid": "p384", "crv": "P-384", "x": "AA", "y": "AA"}
        ]}"#;
        assert!(matches!(
            KeySet::parse(odd.as_bytes(), "odd"),
            Err(JwksError::NoKeys { .. })
        ));
        assert!(matches!(
            KeySet::parse(b"[1, 2]", "list"),
            Err(JwksError::Parse { .. })
        ));
    }
}
