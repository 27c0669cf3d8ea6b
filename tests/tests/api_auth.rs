//! Who may call the hub's API, against a real hub process and its real
//! HTTP port: the test plays the OIDC issuer (it signs JWTs with the keys
//! in `tests/fixtures/oidc/`, whose JWKS the hub reads from a file) and
//! makes static tokens with `outpost-hub token create`.
//!
//! - Authentication negatives (no token, an expired JWT, the wrong audience
//!   or issuer, `alg: none`, HS256 signed with the issuer's public key, a
//!   revoked or unknown static token) are 401 with `WWW-Authenticate:
//!   Bearer` and a problem document, and change nothing.
//! - A JWKS rotation: a token signed with a new key is accepted once the
//!   JWKS file holds it, and one signed with the retired key no longer.
//! - Role negatives (a viewer applying a policy, an author approving their
//!   own proposal) are 403 and audited as `api.refused` with the subject.
//! - Two-person approval end to end: proposed by one subject, approved by
//!   another, in force at a running agent within seconds.
//!
//! Every wait polls a condition until a deadline.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use base64::Engine as _;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use outpost_tests::{run_cli, wait_until, Agent, Hub, Pki};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(60);
const ISSUER: &str = "https://idp.e2e.example";
const AUDIENCE: &str = "outpost-e2e";

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/oidc");

const DENY: &str =
    "[[rules]]\nname = \"no debug\"\nstreams = [\"plant/+/debug\"]\naction = \"deny\"\n";

fn fixture(name: &str) -> Result<String> {
    std::fs::read_to_string(Path::new(FIXTURES).join(name)).with_context(|| name.to_owned())
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Claims of a valid token for `sub` acting as `role`.
fn claims(sub: &str, role: &str) -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": sub,
        "iat": now(),
        "exp": now() + 600,
        "roles": [role],
    })
}

fn sign(alg: Algorithm, kid: &str, key_file: &str, claims: &Value) -> Result<String> {
    let pem = fixture(key_file)?;
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(pem.as_bytes())?,
        _ => EncodingKey::from_rsa_pem(pem.as_bytes())?,
    };
    let mut h = Header::new(alg);
    h.kid = Some(kid.into());
    Ok(encode(&h, claims, &key)?)
}

fn jwt(sub: &str, role: &str) -> Result<String> {
    sign(Algorithm::RS256, "rsa-1", "rsa-1.key", &claims(sub, role))
}

/// An HTTP answer: status, head (lowercased names), body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body).with_context(|| format!("not JSON: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// One request to the hub's API on a connection of its own.
fn call(
    api: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<Answer> {
    let mut s = TcpStream::connect_timeout(&api, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").context("no HTTP head")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status")?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_owned()
    };
    Ok(Answer {
        status,
        head: head.to_owned(),
        body,
    })
}

fn dechunk(mut rest: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").context("chunk size")?;
        let n = usize::from_str_radix(size.trim(), 16)?;
        if n == 0 {
            return Ok(out);
        }
        out.push_str(after.get(..n).context("short chunk")?);
        rest = after.get(n + 2..).context("chunk end")?;
    }
}

fn api_addr(hub: &Hub) -> Result<SocketAddr> {
    Ok(hub
        .api_url()?
        .trim_start_matches("http://")
        .parse::<SocketAddr>()?)
}

/// A hub whose API trusts the test's issuer (JWKS file `dir/jwks.json`,
/// read again at most once a second) with `policy_approval`.
fn start_hub(dir: &Path, pki: &Pki, approval: &str) -> Result<Hub> {
    std::fs::write(dir.join("jwks.json"), fixture("jwks-1.json")?)?;
    Hub::start_with_tables(
        dir,
        pki,
        "",
        &format!(
            "policy_approval = \"{approval}\"\n\n[api.oidc]\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\njwks = \"jwks.json\"\njwks_refresh = \"1s\"\n"
        ),
    )
}

/// `outpost-hub token create`: the token.
fn token(hub: &Hub, name: &str, role: &str) -> Result<String> {
    let (code, out, err) =
        hub.cli(&["token", "create", "--name", name, "--role", role, "--json"])?;
    ensure!(code == 0, "token create exited {code}: {err}");
    let j: Value = serde_json::from_str(&out)?;
    Ok(j["token"].as_str().context("no token")?.to_owned())
}

fn audit(hub: &Hub) -> Result<Vec<Value>> {
    let (code, out, err) = hub.cli(&["audit", "list", "--json"])?;
    ensure!(code == 0, "audit list exited {code}: {err}");
    let j: Value = serde_json::from_str(&out)?;
    Ok(j["entries"].as_array().cloned().unwrap_or_default())
}

fn policy_versions(hub: &Hub) -> Result<usize> {
    let (code, out, err) = hub.cli(&["policy", "history", "--json"])?;
    ensure!(code == 0, "policy history exited {code}: {err}");
    let j: Value = serde_json::from_str(&out)?;
    Ok(j.as_array().map_or(0, Vec::len))
}

fn apply_body() -> Value {
    json!({ "text": DENY, "source": "e2e" })
}

/// A 401 with the bearer challenge and a problem document.
fn ensure_401(a: &Answer, what: &str) -> Result<()> {
    ensure!(a.status == 401, "{what}: {} {}", a.status, a.body);
    ensure!(
        a.header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer")),
        "{what}: no bearer challenge in\n{}",
        a.head
    );
    ensure!(
        a.header("content-type") == Some("application/problem+json"),
        "{what}: {}",
        a.head
    );
    ensure!(a.json()?["status"] == 401, "{what}: {}", a.body);
    Ok(())
}

#[test]
fn requests_without_valid_credentials_are_401_and_change_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let hub = start_hub(dir.path(), &pki, "single")?;
    let api = api_addr(&hub)?;
    let revoked = token(&hub, "retired-ci", "policy-author")?;
    let (code, _, err) = hub.cli(&["token", "revoke", "retired-ci"])?;
    ensure!(code == 0, "token revoke: {err}");

    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let author = claims("alice", "policy-author");
    let mut expired = author.clone();
    expired["exp"] = json!(now() - 3600);
    expired["iat"] = json!(now() - 7200);
    let mut wrong_aud = author.clone();
    wrong_aud["aud"] = json!("someone-else");
    let mut wrong_iss = author.clone();
    wrong_iss["iss"] = json!("https://evil.example");
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": "rsa-1"})),
        b64(&author)
    );
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("rsa-1".into());
    let confused = encode(
        &hs,
        &author,
        &EncodingKey::from_secret(fixture("rsa-1.pub.pem")?.as_bytes()),
    )?;
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        (
            "an expired JWT",
            Some(sign(Algorithm::RS256, "rsa-1", "rsa-1.key", &expired)?),
        ),
        (
            "the wrong audience",
            Some(sign(Algorithm::RS256, "rsa-1", "rsa-1.key", &wrong_aud)?),
        ),
        (
            "the wrong issuer",
            Some(sign(Algorithm::ES256, "ec-1", "ec-1.key", &wrong_iss)?),
        ),
        ("alg none", Some(none)),
        ("HS256 signed with the public key", Some(confused)),
        ("a revoked static token", Some(revoked)),
        (
            "an unknown static token",
            Some(format!("opt_{}", "ab".repeat(32))),
        ),
        ("not a bearer token", Some("Basic YWxpY2U6c2VjcmV0".into())),
    ];
    for (what, credential) in &cases {
        let a = match credential.as_deref() {
            Some(c) if c.starts_with("Basic ") => {
                // A raw Authorization header of another scheme.
                let mut s = TcpStream::connect_timeout(&api, Duration::from_secs(5))?;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                let body = apply_body().to_string();
                write!(
                    s,
                    "POST /api/v1/policy HTTP/1.1\r\nHost: hub\r\nConnection: close\r\nAuthorization: {c}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )?;
                let mut raw = String::new();
                s.read_to_string(&mut raw)?;
                let (head, body) = raw.split_once("\r\n\r\n").context("no head")?;
                Answer {
                    status: head
                        .split_whitespace()
                        .nth(1)
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(0),
                    head: head.to_owned(),
                    body: body.to_owned(),
                }
            }
            c => call(api, "POST", "/api/v1/policy", c, Some(&apply_body()))?,
        };
        ensure_401(&a, what)?;
    }
    // Reads are refused the same way.
    ensure_401(
        &call(api, "GET", "/api/v1/fleet", None, None)?,
        "a read without a token",
    )?;
    ensure!(
        policy_versions(&hub)? == 0,
        "a refused request applied a policy"
    );
    let actions: Vec<String> = audit(&hub)?
        .iter()
        .filter_map(|e| e["action"].as_str().map(str::to_owned))
        .filter(|a| a != "hashing.key_created")
        .collect();
    ensure!(
        actions == ["token.created", "token.revoked"],
        "the audit log changed: {actions:?}"
    );

    // The same request with valid credentials goes through: the negatives
    // above failed for their credentials, not for the request.
    let ok = call(
        api,
        "POST",
        "/api/v1/policy",
        Some(&jwt("alice", "policy-author")?),
        Some(&apply_body()),
    )?;
    ensure!(ok.status == 200, "{} {}", ok.status, ok.body);
    ensure!(policy_versions(&hub)? == 1, "not applied");
    let last = audit(&hub)?.pop().context("empty audit log")?;
    ensure!(
        last["action"] == "policy.applied" && last["actor"] == "oidc:alice",
        "{last}"
    );
    Ok(())
}

#[test]
fn a_token_signed_with_a_rotated_key_is_accepted_once_the_jwks_holds_it() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let hub = start_hub(dir.path(), &pki, "single")?;
    let api = api_addr(&hub)?;
    let old = jwt("carol", "viewer")?;
    let new = sign(
        Algorithm::RS256,
        "rsa-2",
        "rsa-2.key",
        &claims("carol", "viewer"),
    )?;
    ensure!(
        call(api, "GET", "/api/v1/fleet", Some(&old), None)?.status == 200,
        "old key"
    );
    ensure_401(
        &call(api, "GET", "/api/v1/fleet", Some(&new), None)?,
        "a key not yet published",
    )?;

    // The issuer rotates: the JWKS now holds only the new key.
    let tmp = dir.path().join("jwks.json.new");
    std::fs::write(&tmp, fixture("jwks-2.json")?)?;
    std::fs::rename(&tmp, dir.path().join("jwks.json"))?;
    let mut last = 0;
    wait_until(
        DEADLINE,
        "the token with the new key to be accepted",
        || {
            last = call(api, "GET", "/api/v1/fleet", Some(&new), None).map_or(0, |a| a.status);
            last == 200
        },
    )
    .with_context(|| format!("last status {last}"))?;
    // The hub re-read the set: the retired key no longer verifies anything.
    ensure_401(
        &call(api, "GET", "/api/v1/fleet", Some(&old), None)?,
        "the retired key",
    )?;
    ensure!(
        hub.log().contains("Read the OIDC issuer's keys"),
        "the hub did not log the re-read"
    );
    Ok(())
}

/// The agent's `policy show --json`.
fn agent_policy(agent: &Agent) -> Result<Value> {
    let (code, out, err) = run_cli(
        &outpost_tests::bin("outpost-agent")?,
        &[
            "policy",
            "show",
            "--config",
            agent.config.to_str().context("not UTF-8")?,
            "--json",
        ],
    )?;
    ensure!(code == 0, "agent policy show exited {code}: {err}");
    Ok(serde_json::from_str(&out)?)
}

fn refused_entries(hub: &Hub, actor: &str) -> Result<Vec<Value>> {
    Ok(audit(hub)?
        .into_iter()
        .filter(|e| e["action"] == "api.refused" && e["actor"] == actor)
        .collect())
}

#[test]
fn two_person_approval_puts_a_policy_in_force_at_a_running_agent_and_refuses_the_author(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let creds = pki.issue_agent("gw-1")?;
    let hub = start_hub(dir.path(), &pki, "two-person")?;
    let api = api_addr(&hub)?;
    let agent_dir = dir.path().join("site");
    std::fs::create_dir_all(&agent_dir)?;
    let agent = Agent::start(
        &agent_dir,
        &format!(
            "[agent]\ndata_dir = \"data\"\nid = \"gw-1\"\nlabels = {{ site = \"depot-17\" }}\n\n[uplink]\nhub = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n\n[observability]\nmetrics = \"\"\n",
            hub.addr,
            creds.join("ca.pem").display(),
            creds.join("agent.pem").display(),
            creds.join("agent.key").display(),
        ),
    )?;
    wait_until(DEADLINE, "the agent to connect", || {
        hub.fleet().is_ok_and(|f| {
            f.iter()
                .any(|a| a["agent_id"] == "gw-1" && a["connected"] == true)
        })
    })?;
    let viewer = token(&hub, "dashboard", "viewer")?;
    let author = token(&hub, "policy-bot", "policy-author")?;

    // A viewer applying a policy: 403, audited with its subject.
    let a = call(
        api,
        "POST",
        "/api/v1/policy",
        Some(&viewer),
        Some(&apply_body()),
    )?;
    ensure!(a.status == 403, "viewer: {} {}", a.status, a.body);
    ensure!(
        a.header("content-type") == Some("application/problem+json"),
        "{}",
        a.head
    );
    let refused = refused_entries(&hub, "token:dashboard")?;
    ensure!(
        refused.len() == 1
            && refused[0]["target"] == "POST /api/v1/policy"
            && refused[0]["detail"]
                .as_str()
                .is_some_and(|d| d.contains("policy-author")),
        "{refused:?}"
    );

    // The author proposes: stored, not in force.
    let a = call(
        api,
        "POST",
        "/api/v1/policy",
        Some(&author),
        Some(&apply_body()),
    )?;
    ensure!(a.status == 202, "propose: {} {}", a.status, a.body);
    let proposal = a.json()?;
    let id = proposal["id"].as_u64().context("no id")?;
    ensure!(
        proposal["status"] == "pending" && proposal["proposed_by"] == "token:policy-bot",
        "{proposal}"
    );
    ensure!(policy_versions(&hub)? == 0, "applied without approval");

    // The author approving their own proposal: 403 (its role cannot
    // approve), audited.
    let approve = format!("/api/v1/policy/proposals/{id}/approve");
    let a = call(api, "POST", &approve, Some(&author), None)?;
    ensure!(a.status == 403, "author approving: {} {}", a.status, a.body);
    ensure!(
        refused_entries(&hub, "token:policy-bot")?
            .iter()
            .any(|e| e["target"] == "POST /api/v1/policy/proposals/{id}/approve"),
        "not audited: {:?}",
        audit(&hub)?
    );
    // A person whose role changed at the identity provider from author to
    // approver still cannot pass their own change.
    let a = call(
        api,
        "POST",
        "/api/v1/policy",
        Some(&jwt("dave", "policy-author")?),
        Some(&json!({"text": DENY, "source": "dave.toml"})),
    )?;
    ensure!(a.status == 202, "dave proposes: {} {}", a.status, a.body);
    let dave_id = a.json()?["id"].as_u64().context("no id")?;
    let a = call(
        api,
        "POST",
        &format!("/api/v1/policy/proposals/{dave_id}/approve"),
        Some(&jwt("dave", "approver")?),
        None,
    )?;
    ensure!(
        a.status == 403,
        "dave approving his own: {} {}",
        a.status,
        a.body
    );
    ensure!(
        refused_entries(&hub, "oidc:dave")?
            .iter()
            .any(|e| e["target"] == format!("proposal {dave_id}")),
        "not audited: {:?}",
        audit(&hub)?
    );
    ensure!(policy_versions(&hub)? == 0, "applied by its author");
    ensure!(
        agent_policy(&agent)?["version"] == 0,
        "the agent has a policy"
    );

    // Another subject with the approver role approves: in force at the
    // running agent within seconds.
    let a = call(api, "POST", &approve, Some(&jwt("bob", "approver")?), None)?;
    ensure!(a.status == 200, "bob approving: {} {}", a.status, a.body);
    let approved = a.json()?;
    ensure!(
        approved["proposal"]["status"] == "approved"
            && approved["proposal"]["decided_by"] == "oidc:bob"
            && approved["applied"]["version"] == 1,
        "{approved}"
    );
    let mut shown = Value::Null;
    wait_until(DEADLINE, "the agent to run policy version 1", || {
        shown = agent_policy(&agent).unwrap_or_default();
        shown["version"] == 1
    })
    .with_context(|| format!("the agent shows {shown}"))?;
    // The agent holds its own part of the policy (the rules that select
    // it), re-serialised by the hub: the rule, not the author's bytes.
    ensure!(
        shown["rules"] == 1
            && shown["text"]
                .as_str()
                .is_some_and(|t| t.contains("plant/+/debug") && t.contains("deny")),
        "{shown}"
    );
    // Dave's proposal (the same text) is rejected by bob.
    let a = call(
        api,
        "POST",
        &format!("/api/v1/policy/proposals/{dave_id}/reject"),
        Some(&jwt("bob", "approver")?),
        Some(&json!({"reason": "duplicate of the approved one"})),
    )?;
    ensure!(
        a.status == 200 && a.json()?["status"] == "rejected",
        "{} {}",
        a.status,
        a.body
    );
    let a = call(api, "POST", &approve, Some(&jwt("erin", "approver")?), None)?;
    ensure!(a.status == 409, "approving twice: {} {}", a.status, a.body);

    let trail: Vec<(String, String)> = audit(&hub)?
        .iter()
        .filter(|e| {
            e["action"]
                .as_str()
                .is_some_and(|a| a.starts_with("policy."))
        })
        .map(|e| {
            (
                e["actor"].as_str().unwrap_or("").to_owned(),
                e["action"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("token:policy-bot", "policy.proposed"),
        ("oidc:dave", "policy.proposed"),
        ("oidc:bob", "policy.applied"),
        ("oidc:bob", "policy.approved"),
        ("oidc:bob", "policy.rejected"),
    ]
    .iter()
    .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
    .collect();
    ensure!(trail == want, "{trail:?}");
    let (code, out, err) = hub.cli(&["audit", "verify"])?;
    if code != 0 {
        bail!("audit verify exited {code}: {out}{err}");
    }
    Ok(())
}

/// A replica's config on the JetStream store at `url`, in `dir`; every
/// replica signs the one audit chain with the same key, `dir/../audit.key`,
/// and shares the fleet's hashing key, `dir/../hashing.key`.
fn replica(dir: &Path, pki: &Pki, url: &str) -> Result<Hub> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("jwks.json"), fixture("jwks-1.json")?)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], outpost_tests::free_udp_port()?));
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "[hub]\ndata_dir = \"hub-data\"\nlisten = \"{addr}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[store]\nkind = \"jetstream\"\n\n[store.jetstream]\nurl = \"{url}\"\ntimeout = \"5s\"\n\n[observability]\nlog = \"info\"\nmetrics = \"\"\n\n[api]\nlisten = \"127.0.0.1:0\"\npolicy_approval = \"two-person\"\n\n[api.oidc]\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\njwks = \"jwks.json\"\n\n[audit]\nkey = \"{}\"\n\n[policy]\nhashing_key = \"{}\"\n",
            pki.hub_dir.join("ca.pem").display(),
            pki.hub_dir.join("hub.pem").display(),
            pki.hub_dir.join("hub.key").display(),
            dir.parent().unwrap_or(dir).join("audit.key").display(),
            dir.parent().unwrap_or(dir).join("hashing.key").display(),
        ),
    )?;
    Hub::start_file(&config, addr)
}

#[test]
fn on_jetstream_a_token_and_a_proposal_hold_across_replicas() -> Result<()> {
    if !outpost_tests::have("nats-server") {
        bail!("nats-server is not installed (tests/run installs it)");
    }
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let nats = outpost_tests::Nats::start_with(
        dir.path(),
        outpost_tests::free_port()?,
        "max_payload: 8MB",
    )?;
    let a = replica(&dir.path().join("a"), &pki, &nats.url())?;
    let b = replica(&dir.path().join("b"), &pki, &nats.url())?;
    let (api_a, api_b) = (api_addr(&a)?, api_addr(&b)?);

    // Made through one replica's config, honoured by both.
    let author = token(&a, "policy-bot", "policy-author")?;
    for api in [api_a, api_b] {
        let r = call(api, "GET", "/api/v1/fleet", Some(&author), None)?;
        ensure!(r.status == 200, "{api}: {} {}", r.status, r.body);
    }
    let (code, out, err) = b.cli(&["token", "list", "--json"])?;
    ensure!(code == 0, "token list: {err}");
    let listed: Value = serde_json::from_str(&out)?;
    ensure!(
        listed[0]["name"] == "policy-bot"
            && listed[0]["state"] == "active"
            && !out.contains("opt_"),
        "{listed}"
    );

    // Proposed at one replica, approved at the other by another subject.
    let p = call(
        api_a,
        "POST",
        "/api/v1/policy",
        Some(&author),
        Some(&apply_body()),
    )?;
    ensure!(p.status == 202, "propose: {} {}", p.status, p.body);
    let id = p.json()?["id"].as_u64().context("no id")?;
    let approve = format!("/api/v1/policy/proposals/{id}/approve");
    let own = call(api_b, "POST", &approve, Some(&author), None)?;
    ensure!(
        own.status == 403,
        "author approving: {} {}",
        own.status,
        own.body
    );
    let ok = call(
        api_b,
        "POST",
        &approve,
        Some(&jwt("bob", "approver")?),
        None,
    )?;
    ensure!(ok.status == 200, "bob approving: {} {}", ok.status, ok.body);
    let (code, out, err) = a.cli(&["policy", "history", "--json"])?;
    ensure!(code == 0, "policy history: {err}");
    let history: Value = serde_json::from_str(&out)?;
    ensure!(
        history.as_array().map(Vec::len) == Some(1) && history[0]["actor"] == "oidc:bob",
        "{history}"
    );

    // Revoked through the other replica's config: refused by both at once.
    let (code, _, err) = b.cli(&["token", "revoke", "policy-bot"])?;
    ensure!(code == 0, "token revoke: {err}");
    for api in [api_a, api_b] {
        ensure_401(
            &call(api, "GET", "/api/v1/fleet", Some(&author), None)?,
            "revoked",
        )?;
    }

    // Every step is in the one signed chain both replicas append to.
    let (code, out, err) = a.cli(&["audit", "list", "--json"])?;
    ensure!(code == 0, "audit list: {err}");
    let trail: Vec<(String, String, String)> = serde_json::from_str::<Value>(&out)?["entries"]
        .as_array()
        .context("entries")?
        .iter()
        .filter(|e| e["action"] != "agent.first_seen" && e["action"] != "hashing.key_created")
        .map(|e| {
            // The break-glass verbs record `local:<login>`; the login is
            // whoever runs the tests.
            let actor = e["actor"].as_str().unwrap_or("");
            (
                if actor.starts_with("local:") {
                    "local:"
                } else {
                    actor
                }
                .to_owned(),
                e["action"].as_str().unwrap_or("").to_owned(),
                e["result"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let s = |a: &str, b: &str, c: &str| (a.to_owned(), b.to_owned(), c.to_owned());
    let local = "local:";
    let want = vec![
        s(local, "token.created", "ok"),
        s("token:policy-bot", "policy.proposed", "ok"),
        s("token:policy-bot", "api.refused", "refused"),
        s("oidc:bob", "policy.applied", "ok"),
        s("oidc:bob", "policy.approved", "ok"),
        s(local, "token.revoked", "ok"),
    ];
    ensure!(trail == want, "{trail:?}");
    for h in [&a, &b] {
        let (code, out, err) = h.cli(&["audit", "verify"])?;
        ensure!(
            code == 0 && out.contains("signed"),
            "audit verify: {out}{err}"
        );
    }
    Ok(())
}
