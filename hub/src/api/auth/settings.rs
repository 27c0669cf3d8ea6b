//! `[api.oidc]` and `[api] policy_approval`: who may call the API and how
//! a policy change is approved.
//!
//! Validation is pure (no file read, no request made); the JWKS file or URL
//! is read when the hub builds its [`Authenticator`](super::Authenticator),
//! with relative paths taken from the config file's folder.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use outpost_settings::HumanDuration;
use serde::Deserialize;

use crate::api::auth::role::Role;
use crate::client_tls::ClientTls;

/// `[api] policy_approval`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyApproval {
    /// A policy author's `POST /api/v1/policy` applies the policy at once.
    #[default]
    Single,
    /// It stores a proposal, applied only when a different subject with
    /// the approver role approves it.
    TwoPerson,
}

/// `[api.oidc]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOidcConfig {
    /// The issuer (`iss`) every token must name, exactly.
    pub issuer: String,
    /// The audience (`aud`) every token must name (one of its values).
    pub audience: String,
    /// The issuer's signing keys (JWKS): a file (relative to the config
    /// file) or an `https://` URL.
    pub jwks: String,
    /// The claim that names the caller's role(s): a string or an array of
    /// strings (`roles`, `groups`).
    #[serde(default = "default_role_claim")]
    pub role_claim: String,
    /// The claim's values that name our roles (`"outpost-admins" =
    /// "admin"`); without it, a value must be a role's own name.
    #[serde(default)]
    pub role_map: BTreeMap<String, String>,
    /// The least time between two reads of the JWKS when a token names a
    /// key the hub does not know (a key rotation at the issuer).
    #[serde(default = "default_refresh")]
    pub jwks_refresh: HumanDuration,
    /// How long keys read from the JWKS are used before it is read again.
    #[serde(default = "default_max_age")]
    pub jwks_max_age: HumanDuration,
    /// TLS to an `https://` JWKS: the CA its certificate must chain to (no
    /// system roots are trusted).
    #[serde(default)]
    pub tls: Option<ClientTls>,
}

fn default_role_claim() -> String {
    "roles".into()
}
fn default_refresh() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_max_age() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}

/// Where the JWKS is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksLocation {
    /// A file, as written (relative to the config file's folder).
    File(PathBuf),
    /// An `https://` URL.
    Https(http::Uri),
}

/// `[api.oidc]`, validated.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    /// `issuer`.
    pub issuer: String,
    /// `audience`.
    pub audience: String,
    /// `jwks`.
    pub jwks: JwksLocation,
    /// `role_claim`.
    pub role_claim: String,
    /// `role_map`, each value one of our roles.
    pub role_map: BTreeMap<String, Role>,
    /// `jwks_refresh`.
    pub jwks_refresh: Duration,
    /// `jwks_max_age`.
    pub jwks_max_age: Duration,
    /// `tls`.
    pub tls: Option<ClientTls>,
}

impl RawOidcConfig {
    /// Checks every rule that needs no file and no server; the error names
    /// the key under `[api.oidc]`.
    pub fn validate(self) -> Result<OidcConfig, (String, String)> {
        let bad = |k: &str, m: String| (k.to_owned(), m);
        if self.issuer.trim().is_empty() {
            return Err(bad("issuer", "must not be empty".into()));
        }
        if self.audience.trim().is_empty() {
            return Err(bad("audience", "must not be empty".into()));
        }
        if self.role_claim.trim().is_empty() {
            return Err(bad("role_claim", "must not be empty".into()));
        }
        let jwks = if self.jwks.contains("://") {
            let uri: http::Uri = self
                .jwks
                .parse()
                .map_err(|e| bad("jwks", format!("{:?} is not a URL: {e}", self.jwks)))?;
            if uri.scheme_str() != Some("https") || uri.host().is_none() {
                return Err(bad(
                    "jwks",
                    format!(
                        "{:?}: a URL must be https://HOST/...; plain http would let anyone on the path swap the keys",
                        self.jwks
                    ),
                ));
            }
            if self.tls.is_none() {
                return Err(bad(
                    "tls",
                    "an https:// jwks needs [api.oidc.tls] with the CA of its server (no system roots are trusted)".into(),
                ));
            }
            JwksLocation::Https(uri)
        } else if self.jwks.trim().is_empty() {
            return Err(bad("jwks", "must not be empty".into()));
        } else {
            JwksLocation::File(PathBuf::from(&self.jwks))
        };
        let mut role_map = BTreeMap::new();
        for (value, role) in self.role_map {
            let r: Role = role
                .parse()
                .map_err(|e| bad(&format!("role_map.{value}"), format!("{e}")))?;
            role_map.insert(value, r);
        }
        if self.jwks_refresh.0.is_zero() {
            return Err(bad(
                "jwks_refresh",
                "must be more than 0: every token with an unknown key would fetch the JWKS".into(),
            ));
        }
        Ok(OidcConfig {
            issuer: self.issuer,
            audience: self.audience,
            jwks,
            role_claim: self.role_claim,
            role_map,
            jwks_refresh: self.jwks_refresh.0,
            jwks_max_age: self.jwks_max_age.0,
            tls: self.tls,
        })
    }
}

impl OidcConfig {
    /// The role a claim value names: through `role_map` when it has any
    /// entry, else the value is a role's own name.
    pub fn role_of(&self, value: &str) -> Option<Role> {
        if self.role_map.is_empty() {
            value.parse().ok()
        } else {
            self.role_map.get(value).copied()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(jwks: &str) -> RawOidcConfig {
        RawOidcConfig {
            issuer: "https://idp.example".into(),
            audience: "outpost".into(),
            jwks: jwks.into(),
            role_claim: default_role_claim(),
            role_map: BTreeMap::new(),
            jwks_refresh: default_refresh(),
            jwks_max_age: default_max_age(),
            tls: None,
        }
    }

    #[test]
    fn a_jwks_is_a_file_or_an_https_url_with_a_ca() {
        assert_eq!(
            raw("keys/jwks.json").validate().expect("valid").jwks,
            JwksLocation::File("keys/jwks.json".into())
        );
        let e = raw("http://idp.example/jwks").validate().expect_err("http");
        assert_eq!(e.0, "jwks");
        let e = raw("https://idp.example/jwks")
            .validate()
            .expect_err("no CA");
        assert_eq!(e.0, "tls");
    }

    #[test]
    fn a_role_map_names_our_roles_only() {
        let mut r = raw("jwks.json");
        r.role_map.insert("ops".into(), "operator".into());
        let c = r.clone().validate().expect("valid");
        assert_eq!(c.role_of("ops"), Some(Role::Operator));
        assert_eq!(c.role_of("operator"), None);
        r.role_map.insert("gods".into(), "root".into());
        assert_eq!(r.validate().expect_err("root").0, "role_map.gods");
        let plain = raw("jwks.json").validate().expect("valid");
        assert_eq!(plain.role_of("approver"), Some(Role::Approver));
    }

    #[test]
    fn the_hub_config_reads_the_oidc_table_and_names_its_keys_in_errors() {
        let text = |extra: &str| {
            format!(
                "[hub]\ndata_dir = \"d\"\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n[api]\npolicy_approval = \"two-person\"\n[api.oidc]\nissuer = \"https://idp\"\naudience = \"outpost\"\njwks = \"jwks.json\"\nrole_claim = \"groups\"\n{extra}"
            )
        };
        let path = std::path::Path::new("hub.toml");
        let cfg = crate::config::parse(
            &text("[api.oidc.role_map]\n\"Outpost-Admins\" = \"admin\"\n"),
            std::iter::empty(),
            path,
        )
        .expect("valid");
        assert_eq!(cfg.api.policy_approval, PolicyApproval::TwoPerson);
        let oidc = cfg.api.oidc.expect("validated");
        assert_eq!(oidc.role_of("Outpost-Admins"), Some(Role::Admin));
        let e = crate::config::parse(&text("jwks_refresh = \"0s\"\n"), std::iter::empty(), path)
            .expect_err("zero");
        assert!(e.to_string().contains("api.oidc.jwks_refresh"), "{e}");
        let e = crate::config::parse(&text("colour = \"red\"\n"), std::iter::empty(), path)
            .expect_err("unknown key");
        assert!(e.to_string().contains("colour"), "{e}");
    }
}
