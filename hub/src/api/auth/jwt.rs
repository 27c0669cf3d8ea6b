//! OIDC bearer tokens: a JWT signed by the configured issuer with one of its
//! published keys.
//!
//! What is checked, in this order, and why:
//!
//! 1. The header's `alg` is RS256 or ES256. `none` is refused (an unsigned
//!    token proves nothing), and so is every HMAC algorithm: with HS256 a
//!    verifier that takes "the key" for the secret would accept a token
//!    signed with the issuer's *public* key, which anyone has (the classic
//!    algorithm confusion). Our keys come from the JWKS as RSA or EC public
//!    keys only, each bound to the one algorithm it was published for.
//! 2. The key: the header's `kid` in the issuer's JWKS (read again on an
//!    unknown `kid`, see `jwks`).
//! 3. The signature, with that key and that algorithm only.
//! 4. The claims: `iss` equal to `[api.oidc] issuer`, `aud` containing
//!    `audience`, `exp` in the future and `nbf` (when present) in the past,
//!    each with [`LEEWAY`] for clocks that differ; `exp`, `iss`, `aud` and
//!    `sub` must be present (a token that never expires is refused).
//! 5. The role: the `role_claim` (a string or an array of strings), through
//!    `role_map`; a token that names none of our roles has no access.
//!
//! The caller's subject is `oidc:<sub>`: an OIDC `sub` is unique only per
//! issuer, and the prefix keeps it apart from a static token's
//! `token:<name>` and the break-glass `local:<login>`, so that no identity
//! provider can name a subject that the two-person rule or the audit log
//! would take for another kind of caller.

use jsonwebtoken::{decode, decode_header, Algorithm, Validation};

use crate::api::auth::jwks::KeySet;
use crate::api::auth::role::Role;
use crate::api::auth::settings::OidcConfig;

/// The clock difference tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY: u64 = 60;

/// The algorithms a token may be signed with.
pub const ACCEPTED: [Algorithm; 2] = [Algorithm::RS256, Algorithm::ES256];

/// Why a JWT was refused. Each becomes a 401 but [`JwtError::NoRole`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// Not three base64url parts with a JSON header, or an algorithm that
    /// is not even a JWS one (`none`).
    #[error("not a signed JWT: {0}")]
    Malformed(String),
    /// A JWS algorithm we do not accept (HS256 and the rest).
    #[error("algorithm {0} is refused: only RS256 and ES256 are accepted")]
    Algorithm(String),
    /// No key of the issuer's JWKS has that `kid` for that algorithm.
    #[error("signed with a key the issuer does not publish (kid {0:?})")]
    UnknownKey(Option<String>),
    /// The signature does not verify.
    #[error("the signature does not verify")]
    Signature,
    /// `exp` passed.
    #[error("expired")]
    Expired,
    /// `nbf` not reached.
    #[error("not valid yet (nbf)")]
    NotYet,
    /// `iss` is not the configured issuer.
    #[error("issued by another issuer (iss)")]
    Issuer,
    /// `aud` does not name the configured audience.
    #[error("meant for another audience (aud)")]
    Audience,
    /// A required claim is missing or of the wrong type.
    #[error("claim {0} is missing or invalid")]
    Claim(String),
    /// Valid, but the role claim names none of our roles.
    #[error("claim {claim} names none of the hub's roles")]
    NoRole {
        /// `role_claim`.
        claim: String,
    },
}

/// A verified token's subject (with its `oidc:` prefix) and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// `oidc:<sub>`.
    pub subject: String,
    /// The role it acts in.
    pub role: Role,
}

/// The header's `kid` and `alg`, checked to be an accepted algorithm (step
/// 1), so the caller can find the key before [`verify`].
pub fn key_id(token: &str) -> Result<(Option<String>, Algorithm), JwtError> {
    let header = match decode_header(token) {
        Ok(h) => h,
        Err(e) => {
            // `alg: none` is no algorithm jsonwebtoken knows, so it fails
            // here; say so plainly.
            return Err(match header_alg(token) {
                Some(alg) => JwtError::Algorithm(alg),
                None => JwtError::Malformed(e.to_string()),
            });
        }
    };
    if !ACCEPTED.contains(&header.alg) {
        return Err(JwtError::Algorithm(format!("{:?}", header.alg)));
    }
    Ok((header.kid, header.alg))
}

/// The raw `alg` of a header that jsonwebtoken refused, if it has one.
fn header_alg(token: &str) -> Option<String> {
    use base64::Engine as _;
    let head = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("alg")?.as_str().map(str::to_owned)
}

/// Steps 1 to 5 with the keys in `keys`.
pub fn verify(token: &str, keys: &KeySet, cfg: &OidcConfig) -> Result<Verified, JwtError> {
    let (kid, alg) = key_id(token)?;
    let key = keys
        .find(kid.as_deref(), alg)
        .ok_or_else(|| JwtError::UnknownKey(kid.clone()))?;
    verify_with(token, &key.key, alg, cfg)
}

/// Steps 3 to 5 with `key` for `alg` (one of [`ACCEPTED`], from
/// [`key_id`]).
pub fn verify_with(
    token: &str,
    key: &jsonwebtoken::DecodingKey,
    alg: Algorithm,
    cfg: &OidcConfig,
) -> Result<Verified, JwtError> {
    if !ACCEPTED.contains(&alg) {
        return Err(JwtError::Algorithm(format!("{alg:?}")));
    }
    let mut v = Validation::new(alg);
    v.algorithms = vec![alg];
    v.leeway = LEEWAY;
    v.validate_exp = true;
    v.validate_nbf = true;
    v.set_issuer(&[&cfg.issuer]);
    v.set_audience(&[&cfg.audience]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    let data = decode::<serde_json::Value>(token, key, &v).map_err(from_library)?;
    let claims = data.claims;
    let sub = claims
        .get("sub")
        .and_then(serde_json::Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| JwtError::Claim("sub".into()))?;
    let values: Vec<&str> = match claims.get(&cfg.role_claim) {
        Some(serde_json::Value::String(s)) => vec![s.as_str()],
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect(),
        _ => Vec::new(),
    };
    let role =
        Role::acting(values.into_iter().filter_map(|v| cfg.role_of(v))).ok_or_else(|| {
            JwtError::NoRole {
                claim: cfg.role_claim.clone(),
            }
        })?;
    Ok(Verified {
        subject: format!("oidc:{sub}"),
        role,
    })
}

fn from_library(e: jsonwebtoken::errors::Error) -> JwtError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => JwtError::Signature,
        K::ExpiredSignature => JwtError::Expired,
        K::ImmatureSignature => JwtError::NotYet,
        K::InvalidIssuer => JwtError::Issuer,
        K::InvalidAudience => JwtError::Audience,
        K::MissingRequiredClaim(c) => JwtError::Claim(c.clone()),
        K::InvalidAlgorithm | K::InvalidAlgorithmName | K::MissingAlgorithm => {
            JwtError::Algorithm("of the header".into())
        }
        _ => JwtError::Malformed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Duration;

    use base64::Engine as _;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    use crate::api::auth::settings::JwksLocation;

    const RSA_1: &str = include_str!("../../../../tests/fixtures/oidc/rsa-1.key");
    const RSA_1_PUB: &str = include_str!("../../../../tests/fixtures/oidc/rsa-1.pub.pem");
    const RSA_2: &str = include_str!("../../../../tests/fixtures/oidc/rsa-2.key");
    const EC_1: &str = include_str!("../../../../tests/fixtures/oidc/ec-1.key");
    const JWKS_1: &str = include_str!("../../../../tests/fixtures/oidc/jwks-1.json");

    fn cfg() -> OidcConfig {
        OidcConfig {
            issuer: "https://idp.example".into(),
            audience: "outpost".into(),
            jwks: JwksLocation::File("jwks.json".into()),
            role_claim: "roles".into(),
            role_map: BTreeMap::new(),
            jwks_refresh: Duration::from_secs(60),
            jwks_max_age: Duration::from_secs(3600),
            tls: None,
        }
    }

    fn keys() -> KeySet {
        KeySet::parse(JWKS_1.as_bytes(), "jwks-1.json").expect("parses")
    }

    fn now() -> i64 {
        crate::clock::unix_now().0 / 1_000_000_000
    }

    fn claims() -> serde_json::Value {
        json!({
            "iss": "https://idp.example",
            "aud": "outpost",
            "sub": "alice",
            "exp": now() + 300,
            "iat": now(),
            "roles": ["viewer"],
        })
    }

    fn sign(alg: Algorithm, kid: &str, pem: &str, claims: &serde_json::Value) -> String {
        let key = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_pem(pem.as_bytes()),
            _ => EncodingKey::from_rsa_pem(pem.as_bytes()),
        }
        .expect("test key");
        let mut h = Header::new(alg);
        h.kid = Some(kid.into());
        encode(&h, claims, &key).expect("signs")
    }

    fn b64(v: &serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn rs256_and_es256_tokens_of_the_issuer_are_accepted() {
        let t = sign(Algorithm::RS256, "rsa-1", RSA_1, &claims());
        assert_eq!(
            verify(&t, &keys(), &cfg()),
            Ok(Verified {
                subject: "oidc:alice".into(),
                role: Role::Viewer
            })
        );
        let mut c = claims();
        c["roles"] = json!("approver");
        c["aud"] = json!(["other", "outpost"]);
        let t = sign(Algorithm::ES256, "ec-1", EC_1, &c);
        assert_eq!(
            verify(&t, &keys(), &cfg()).map(|v| v.role),
            Ok(Role::Approver)
        );
    }

    #[test]
    fn expired_early_and_foreign_tokens_are_refused() {
        let cases: [(&str, serde_json::Value, JwtError); 4] = [
            ("exp", json!(now() - LEEWAY as i64 - 10), JwtError::Expired),
            ("nbf", json!(now() + LEEWAY as i64 + 60), JwtError::NotYet),
            ("iss", json!("https://evil.example"), JwtError::Issuer),
            ("aud", json!("someone-else"), JwtError::Audience),
        ];
        for (claim, value, want) in cases {
            let mut c = claims();
            c[claim] = value.clone();
            let t = sign(Algorithm::RS256, "rsa-1", RSA_1, &c);
            assert_eq!(verify(&t, &keys(), &cfg()), Err(want), "{claim} = {value}");
        }
        // A mistyped time is refused, not skipped (GHSA-h395-gr6q-cpjc).
        for (claim, value) in [("nbf", json!("99999999999")), ("exp", json!("never"))] {
            let mut c = claims();
            c[claim] = value.clone();
            let t = sign(Algorithm::RS256, "rsa-1", RSA_1, &c);
            let got = verify(&t, &keys(), &cfg());
            assert!(got.is_err(), "{claim} = {value}: {got:?}");
        }
        // Within the leeway, a clock a little behind is forgiven.
        let mut c = claims();
        c["exp"] = json!(now() - 5);
        assert!(verify(&sign(Algorithm::RS256, "rsa-1", RSA_1, &c), &keys(), &cfg()).is_ok());
        for missing in ["exp", "iss", "aud", "sub"] {
            let mut c = claims();
            c.as_object_mut().expect("object").remove(missing);
            let t = sign(Algorithm::RS256, "rsa-1", RSA_1, &c);
            assert!(verify(&t, &keys(), &cfg()).is_err(), "without {missing}");
        }
    }

    #[test]
    fn alg_none_and_hs256_signed_with_the_public_key_are_refused() {
        // alg none: header and claims, an empty signature.
        let none = format!(
            "{}.{}.",
            b64(&json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"})),
            b64(&claims())
        );
        assert_eq!(
            verify(&none, &keys(), &cfg()),
            Err(JwtError::Algorithm("none".into()))
        );
        // HS256 with the issuer's public key (its PEM, as published) as the
        // secret: the confusion attack.
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("rsa-1".into());
        let forged = encode(
            &h,
            &claims(),
            &EncodingKey::from_secret(RSA_1_PUB.as_bytes()),
        )
        .expect("signs");
        assert_eq!(
            verify(&forged, &keys(), &cfg()),
            Err(JwtError::Algorithm("HS256".into()))
        );
        // Even handed the key directly, the HMAC path is not taken.
        let k = keys()
            .find(Some("rsa-1"), Algorithm::RS256)
            .expect("key")
            .key
            .clone();
        assert!(verify_with(&forged, &k, Algorithm::HS256, &cfg()).is_err());
        assert_eq!(
            verify_with(&forged, &k, Algorithm::RS256, &cfg()),
            Err(JwtError::Algorithm("of the header".into()))
        );
    }

    #[test]
    fn a_key_the_issuer_does_not_publish_or_a_changed_token_is_refused() {
        let t = sign(Algorithm::RS256, "rsa-2", RSA_2, &claims());
        assert_eq!(
            verify(&t, &keys(), &cfg()),
            Err(JwtError::UnknownKey(Some("rsa-2".into())))
        );
        // Signed by key 2 but claiming to be key 1.
        let t = sign(Algorithm::RS256, "rsa-1", RSA_2, &claims());
        assert_eq!(verify(&t, &keys(), &cfg()), Err(JwtError::Signature));
        // A claim changed after signing.
        let t = sign(Algorithm::RS256, "rsa-1", RSA_1, &claims());
        let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
        let mut c = claims();
        c["roles"] = json!(["admin"]);
        parts[1] = b64(&c);
        assert_eq!(
            verify(&parts.join("."), &keys(), &cfg()),
            Err(JwtError::Signature)
        );
        assert!(matches!(
            verify("not.a.jwt", &keys(), &cfg()),
            Err(JwtError::Malformed(_))
        ));
    }

    #[test]
    fn the_role_claim_is_mapped_and_a_token_without_a_role_has_none() {
        let mut cfg = cfg();
        cfg.role_claim = "groups".into();
        cfg.role_map.insert("outpost-ops".into(), Role::Operator);
        cfg.role_map
            .insert("outpost-authors".into(), Role::PolicyAuthor);
        let mut c = claims();
        c["groups"] = json!(["staff", "outpost-authors", "outpost-ops"]);
        let t = sign(Algorithm::RS256, "rsa-1", RSA_1, &c);
        assert_eq!(
            verify(&t, &keys(), &cfg).map(|v| v.role),
            Ok(Role::PolicyAuthor)
        );
        c["groups"] = json!(["staff", "admin"]);
        let t = sign(Algorithm::RS256, "rsa-1", RSA_1, &c);
        assert_eq!(
            verify(&t, &keys(), &cfg),
            Err(JwtError::NoRole {
                claim: "groups".into()
            })
        );
    }
}
