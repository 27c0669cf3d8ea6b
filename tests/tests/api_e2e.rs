//! The hub's HTTP API against a real `outpost-hub run` on real sockets:
//! problem+json for every kind of error; events paged with cursors through
//! a store seeded with thousands of events; a policy dry run and a policy
//! applied through the API (and through `policy apply --api`) that reaches
//! a running agent; and the CLI with `--api` printing exactly what it
//! prints when it reads the store itself.
//!
//! Tokens are real static API tokens, made by `outpost-hub token create`
//! (the caller's subject is `token:<name>`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use outpost_hub::store::{Store, Synchronous};
use outpost_protocols::{AgentId, EventBody, Quality, Seq, StreamName, Timestamp, Value};
use outpost_tests::{bin, http, run_cli, wait_until, Agent, Hub, Pki};

const DEADLINE: Duration = Duration::from_secs(90);

/// A new static API token of `hub` named `name` with `role` (its caller's
/// subject is `token:<name>`).
fn token(hub: &Hub, role: &str, name: &str) -> Result<String> {
    let (code, out, err) = hub.cli(&["token", "create", "--name", name, "--role", role])?;
    ensure!(code == 0, "token create: {err}");
    Ok(out
        .lines()
        .next()
        .context("no token printed")?
        .trim()
        .to_owned())
}

/// [`token`] in a file, for `--token-file`.
fn token_file(hub: &Hub, dir: &Path, role: &str, name: &str) -> Result<String> {
    let p = dir.join(format!("{name}.token"));
    std::fs::write(&p, format!("{}\n", token(hub, role, name)?))?;
    Ok(p.display().to_string())
}

/// Seeds `dir/hub-data/hub.db` with `agents` agents (`gw-0`..), each with
/// `per_agent` events on streams `plant/<i % 3>/temp` at ts = seq * 1000.
fn seed(dir: &Path, agents: usize, per_agent: u64) -> Result<()> {
    let data = dir.join("hub-data");
    std::fs::create_dir_all(&data)?;
    // Signed with the key the hub started on this directory will use.
    let key = outpost_hub::audit::key::AuditKey::load_or_create(&data.join("audit.key"))?;
    let mut store = Store::open(&data.join("hub.db"), Synchronous::Normal, key)?;
    for a in 0..agents {
        let id = AgentId::parse(&format!("gw-{a}"))?;
        let labels = BTreeMap::from([("site".to_owned(), format!("site-{}", a % 2))]);
        store.agent_connected(&id, &labels, "0.1.0", 3, Timestamp(1_000))?;
        let events: Vec<(Seq, EventBody)> = (1..=per_agent)
            .map(|s| {
                Ok((
                    Seq(s),
                    EventBody {
                        stream: StreamName::parse(&format!("plant/{}/temp", s % 3))?,
                        ts: Timestamp(i64::try_from(s)? * 1000),
                        value: if s % 5 == 0 {
                            Value::Json(outpost_protocols::event::JsonText::parse(
                                r#"{"b": 2, "a": [1, 2.5]}"#,
                            )?)
                        } else {
                            Value::F64(s as f64 / 4.0)
                        },
                        quality: if s % 7 == 0 {
                            Quality::Bad(outpost_protocols::event::Reason::Timeout)
                        } else {
                            Quality::Good
                        },
                        attrs: BTreeMap::new(),
                    },
                ))
            })
            .collect::<Result<_>>()?;
        store.insert(Timestamp(2_000), &[(id.clone(), events)])?;
        store.agent_disconnected(&id, Timestamp(3_000))?;
    }
    Ok(())
}

/// Asserts `a` is a problem document with `status`.
fn problem(a: &outpost_tests::HttpAnswer, status: u16) -> Result<serde_json::Value> {
    ensure!(
        a.status == status,
        "wanted {status}, got {} {:?}",
        a.status,
        String::from_utf8_lossy(&a.body)
    );
    ensure!(
        a.header("content-type") == Some("application/problem+json"),
        "{status}: content-type {:?}",
        a.header("content-type")
    );
    let j = a.json()?;
    ensure!(
        j["status"] == status && j["type"].is_string() && j["title"].is_string(),
        "{status}: not a problem document: {j}"
    );
    Ok(j)
}

#[test]
fn every_error_is_a_problem_document() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let hub = Hub::start_with_tables(
        dir.path(),
        &pki,
        "",
        "[api]\nlisten = \"127.0.0.1:0\"\nrate = 1\nburst = 3\n",
    )?;
    let api = hub.api_url()?;
    let viewer = token(&hub, "viewer", "vic")?;
    // 401: no token, and a token nobody issued.
    let a = http(&api, "GET", "/api/v1/fleet", None, None)?;
    problem(&a, 401)?;
    ensure!(a
        .header("www-authenticate")
        .is_some_and(|v| v.starts_with("Bearer")));
    problem(
        &http(&api, "GET", "/api/v1/fleet", Some("nonsense"), None)?,
        401,
    )?;
    // 403: a viewer applying a policy; nothing is stored.
    let body = br#"{"text": "[[rules]]\nstreams = [\"a/#\"]\naction = \"deny\"\n"}"#;
    problem(
        &http(&api, "POST", "/api/v1/policy", Some(&viewer), Some(body))?,
        403,
    )?;
    let shown = http(
        &api,
        "GET",
        "/api/v1/policy",
        Some(&token(&hub, "viewer", "v2")?),
        None,
    )?;
    ensure!(shown.json()?["version"] == 0, "{:?}", shown.json());
    // 404: a path no route has, and an agent the registry does not know.
    let t = token(&hub, "viewer", "v3")?;
    problem(&http(&api, "GET", "/api/v1/nothing", Some(&t), None)?, 404)?;
    problem(&http(&api, "GET", "/nowhere", None, None)?, 404)?;
    problem(
        &http(&api, "GET", "/api/v1/agents/gw-404", Some(&t), None)?,
        404,
    )?;
    // 405, with the methods that are allowed.
    let a = http(&api, "DELETE", "/api/v1/fleet", Some(&t), None)?;
    problem(&a, 405)?;
    ensure!(
        a.header("allow").is_some_and(|v| v.contains("GET")),
        "{:?}",
        a.headers
    );
    // 400: a forged cursor, a limit out of range, an unknown parameter.
    let t = token(&hub, "viewer", "v4")?;
    problem(
        &http(&api, "GET", "/api/v1/events?cursor=zz", Some(&t), None)?,
        400,
    )?;
    problem(
        &http(&api, "GET", "/api/v1/events?limit=0", Some(&t), None)?,
        400,
    )?;
    problem(
        &http(&api, "GET", "/api/v1/events?colour=red", Some(&t), None)?,
        400,
    )?;
    // 422: a policy that does not parse is refused, and audited as refused.
    let author = token(&hub, "policy-author", "alice")?;
    let bad = br#"{"text": "[[rules]]\nstreams = [\"a/#\"]\naction = \"explode\"\n"}"#;
    let j = problem(
        &http(&api, "POST", "/api/v1/policy", Some(&author), Some(bad))?,
        422,
    )?;
    ensure!(j["type"] == "urn:outpost:problem:policy-refused", "{j}");
    // 413: a body over the limit.
    let big = vec![b' '; 3 * 1024 * 1024];
    problem(
        &http(
            &api,
            "POST",
            "/api/v1/policy/dry-run",
            Some(&token(&hub, "policy-author", "big")?),
            Some(&big),
        )?,
        413,
    )?;
    // 429: one caller over its burst, with Retry-After; another is served.
    let hammer = token(&hub, "viewer", "hammer")?;
    let mut limited = None;
    for _ in 0..10 {
        let a = http(&api, "GET", "/api/v1/sinks", Some(&hammer), None)?;
        if a.status == 429 {
            limited = Some(a);
            break;
        }
    }
    let a = limited.context("10 requests at rate 1/s with a burst of 3 were never limited")?;
    problem(&a, 429)?;
    ensure!(a.header("retry-after").is_some(), "{:?}", a.headers);
    ensure!(
        http(
            &api,
            "GET",
            "/api/v1/sinks",
            Some(&token(&hub, "viewer", "other")?),
            None
        )?
        .status
            == 200
    );
    // The audit log has the refusal, with the caller's subject.
    let audit = http(
        &api,
        "GET",
        "/api/v1/audit",
        Some(&token(&hub, "viewer", "auditor")?),
        None,
    )?
    .json()?;
    ensure!(
        audit["entries"]
            .as_array()
            .context("entries")?
            .iter()
            .any(|e| e["action"] == "policy.refused" && e["actor"] == "token:alice"),
        "{audit}"
    );
    Ok(())
}

#[test]
fn events_page_through_a_seeded_store_and_the_cli_says_the_same_with_api() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    seed(dir.path(), 3, 1000)?;
    let hub = Hub::start(dir.path(), &pki)?;
    let api = hub.api_url()?;
    let t = token(&hub, "viewer", "pager")?;
    // Every event once, in store order, 100 a page.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/events?limit=100&cursor={c}"),
            None => "/api/v1/events?limit=100".into(),
        };
        let page = http(&api, "GET", &path, Some(&t), None)?.json()?;
        pages += 1;
        for e in page["events"].as_array().context("events")? {
            seen.push((
                e["agent_id"].as_str().context("agent")?.to_owned(),
                e["seq"].as_u64().context("seq")?,
            ));
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
        ensure!(pages < 100, "paging does not end");
    }
    ensure!(seen.len() == 3000, "{} events", seen.len());
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    ensure!(sorted == seen, "pages out of order or with duplicates");
    // Filters: one agent, a stream pattern, a time range.
    let path = "/api/v1/events?agent=gw-1&stream=plant/2/%2B&from=100000&to=200000&limit=1000";
    let page = http(&api, "GET", path, Some(&t), None)?.json()?;
    let events = page["events"].as_array().context("events")?;
    let want = (100..200u64).filter(|s| s % 3 == 2).count();
    ensure!(events.len() == want, "{} events, want {want}", events.len());
    ensure!(events.iter().all(|e| e["agent_id"] == "gw-1"
        && e["stream"] == "plant/2/temp"
        && (100_000..200_000).contains(&e["ts"].as_i64().unwrap_or(0))));
    ensure!(page.get("next_cursor").is_none(), "{page}");
    // The export: JSON lines, every matching event.
    let a = http(
        &api,
        "GET",
        "/api/v1/events/export?agent=gw-2",
        Some(&t),
        None,
    )?;
    ensure!(a.status == 200 && a.header("content-type") == Some("application/jsonl"));
    let lines: Vec<&[u8]> = a
        .body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    ensure!(lines.len() == 1000, "{} lines", lines.len());
    // The CLI with --api prints what it prints reading the store.
    let exe = bin("outpost-hub")?;
    let cfg = hub.config.display().to_string();
    let tf = token_file(&hub, dir.path(), "policy-author", "ops")?;
    // A policy or two, so that show, history, diff and the audit log have
    // something to print; applied directly (break-glass, local:) and
    // through the API.
    let p1 = dir.path().join("p1.toml");
    std::fs::write(
        &p1,
        "[[rules]]\nname = \"no debug\"\nstreams = [\"plant/+/debug\"]\naction = \"deny\"\n",
    )?;
    let p2 = dir.path().join("p2.toml");
    std::fs::write(
        &p2,
        "[[rules]]\nname = \"no debug\"\nstreams = [\"plant/#\"]\naction = \"deny\"\n",
    )?;
    let (code, out, err) = run_cli(
        &exe,
        &[
            "policy",
            "apply",
            p1.to_str().context("utf-8")?,
            "--config",
            &cfg,
        ],
    )?;
    ensure!(code == 0, "{out}{err}");
    let (code, out, err) = run_cli(
        &exe,
        &[
            "policy",
            "apply",
            p2.to_str().context("utf-8")?,
            "--api",
            &api,
            "--token-file",
            &tf,
        ],
    )?;
    ensure!(
        code == 0 && out.starts_with("policy version 2 applied"),
        "{out}{err}"
    );
    let verbs: &[&[&str]] = &[
        &["fleet", "list"],
        &["fleet", "list", "--json"],
        &["events", "tail", "--limit", "25"],
        &["events", "tail", "--limit", "25", "--json"],
        &[
            "events", "tail", "--agent", "gw-0", "--stream", "plant/#", "--limit", "7", "--json",
        ],
        &["events", "stats"],
        &["events", "stats", "--json", "--agent", "gw-2"],
        &["sinks", "status", "--json"],
        &["policy", "show"],
        &["policy", "show", "--json", "--version", "1"],
        &["policy", "history"],
        &["policy", "history", "--json"],
        &["policy", "diff", "1", "2"],
        &["audit", "list"],
        &["audit", "list", "--json", "--limit", "1"],
        &["audit", "verify", "--json"],
    ];
    for args in verbs {
        let mut direct = args.to_vec();
        direct.extend(["--config", &cfg]);
        let mut remote = args.to_vec();
        remote.extend(["--api", &api, "--token-file", &tf]);
        let (dc, dout, derr) = run_cli(&exe, &direct)?;
        let (rc, rout, rerr) = run_cli(&exe, &remote)?;
        ensure!(
            dc == 0 && rc == 0,
            "{args:?}: exit {dc} / {rc}: {derr} / {rerr}"
        );
        ensure!(!dout.is_empty(), "{args:?}: no output");
        ensure!(
            dout == rout,
            "{args:?} differs:\n--- direct\n{dout}\n--- --api\n{rout}"
        );
    }
    // Who applied what: the break-glass path as local:<login>, the API as
    // the token's subject.
    let (_, audit, _) = run_cli(
        &exe,
        &[
            "audit",
            "list",
            "--json",
            "--api",
            &api,
            "--token-file",
            &tf,
        ],
    )?;
    let audit: serde_json::Value = serde_json::from_str(&audit)?;
    let actors: Vec<&str> = audit["entries"]
        .as_array()
        .context("entries")?
        .iter()
        .filter(|e| e["action"] == "policy.applied")
        .filter_map(|e| e["actor"].as_str())
        .collect();
    ensure!(
        actors.len() == 2 && actors[0].starts_with("local:") && actors[1] == "token:ops",
        "{actors:?}"
    );
    // Errors through --api: the problem's detail on one line, exit 2.
    let (code, _, err) = run_cli(
        &exe,
        &[
            "policy",
            "diff",
            "1",
            "9",
            "--api",
            &api,
            "--token-file",
            &tf,
        ],
    )?;
    ensure!(
        code == 2 && err.contains("no policy version 9"),
        "{code} {err}"
    );
    let viewer_file = token_file(&hub, dir.path(), "viewer", "vera")?;
    let (code, _, err) = run_cli(
        &exe,
        &[
            "policy",
            "apply",
            p1.to_str().context("utf-8")?,
            "--api",
            &api,
            "--token-file",
            &viewer_file,
        ],
    )?;
    ensure!(code == 2 && err.contains("403"), "{code} {err}");
    Ok(())
}

fn agent_config(hub: &Hub, creds: &Path) -> String {
    format!(
        "[agent]\ndata_dir = \"data\"\nlabels = {{ site = \"depot-17\" }}\n\n[uplink]\nhub = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n\n[observability]\nmetrics = \"\"\n",
        hub.addr,
        creds.join("ca.pem").display(),
        creds.join("agent.pem").display(),
        creds.join("agent.key").display(),
    )
}

#[test]
fn a_policy_dry_run_then_applied_through_the_api_reaches_a_running_agent() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let hub = Hub::start_with(dir.path(), &pki, "region = \"eu-west\"")?;
    let api = hub.api_url()?;
    let creds = pki.issue_agent("gw-1")?;
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir)?;
    let _agent = Agent::start(&agent_dir, &agent_config(&hub, &creds))?;
    let viewer = token(&hub, "viewer", "watcher")?;
    let agent_policy = || -> Option<u64> {
        http(&api, "GET", "/api/v1/agents/gw-1", Some(&viewer), None)
            .ok()
            .filter(|a| a.status == 200)
            .and_then(|a| a.json().ok())
            .and_then(|j| j["policy_version"].as_u64())
    };
    wait_until(
        DEADLINE,
        "the agent to connect and report its policy",
        || agent_policy() == Some(0),
    )?;
    let author = token(&hub, "policy-author", "alice")?;
    let text = "[[rules]]\nname = \"depot debug\"\nagents = { site = \"depot-17\" }\nstreams = [\"plant/+/debug\"]\naction = \"deny\"\n";
    // Dry run: the agent is selected, nothing is stored.
    let req = serde_json::to_vec(&serde_json::json!({ "text": text }))?;
    let a = http(
        &api,
        "POST",
        "/api/v1/policy/dry-run",
        Some(&author),
        Some(&req),
    )?;
    let run = a.json()?;
    ensure!(
        a.status == 200 && run["valid"] == true && run["residency"]["verdict"] == "ok",
        "{run}"
    );
    ensure!(
        run["agents"][0]["agent_id"] == "gw-1" && run["agents"][0]["rules_after"] == 1,
        "{run}"
    );
    let shown = http(&api, "GET", "/api/v1/policy", Some(&viewer), None)?.json()?;
    ensure!(shown["version"] == 0, "a dry run stored something: {shown}");
    // A residency breach is reported by the dry run and refused by apply.
    let breach =
        "[[residency]]\nstreams = [\"hr/#\"]\nclassification = \"personal\"\nhome = \"us-east\"\n";
    let req2 = serde_json::to_vec(&serde_json::json!({ "text": breach }))?;
    let run = http(
        &api,
        "POST",
        "/api/v1/policy/dry-run",
        Some(&author),
        Some(&req2),
    )?
    .json()?;
    ensure!(
        run["valid"] == false && run["residency"]["verdict"] == "refused",
        "{run}"
    );
    problem(
        &http(&api, "POST", "/api/v1/policy", Some(&author), Some(&req2))?,
        422,
    )?;
    // Apply: in force at the agent within seconds.
    let applied = http(&api, "POST", "/api/v1/policy", Some(&author), Some(&req))?.json()?;
    ensure!(
        applied["outcome"] == "new" && applied["version"] == 1,
        "{applied}"
    );
    wait_until(DEADLINE, "the agent to run policy version 1", || {
        agent_policy() == Some(1)
    })?;
    let saved = std::fs::read_to_string(agent_dir.join("data").join("policy.json"))?;
    ensure!(saved.contains("depot debug"), "{saved}");
    Ok(())
}

#[test]
fn the_api_serves_tls_with_its_own_certificate_and_the_cli_trusts_only_api_ca() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    seed(dir.path(), 2, 10)?;
    // The hub's certificate (valid for 127.0.0.1) serves the API here; a
    // deployment would give the API a certificate of its own.
    let tables = format!(
        "[api]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n",
        pki.hub_dir.join("hub.pem").display(),
        pki.hub_dir.join("hub.key").display()
    );
    let hub = Hub::start_with_tables(dir.path(), &pki, "", &tables)?;
    let api = hub.api_url()?.replace("http://", "https://");
    let exe = bin("outpost-hub")?;
    let tf = token_file(&hub, dir.path(), "viewer", "tls")?;
    let ca = pki.hub_dir.join("ca.pem").display().to_string();
    let cfg = hub.config.display().to_string();
    let (code, direct, err) = run_cli(&exe, &["fleet", "list", "--json", "--config", &cfg])?;
    ensure!(code == 0, "{err}");
    let (code, remote, err) = run_cli(
        &exe,
        &[
            "fleet",
            "list",
            "--json",
            "--api",
            &api,
            "--token-file",
            &tf,
            "--api-ca",
            &ca,
        ],
    )?;
    ensure!(
        code == 0 && remote == direct,
        "{code} {err}\n{remote}\n{direct}"
    );
    // Plain HTTP to the TLS port gets no answer it can use; a CA that did
    // not sign the certificate is refused.
    let plain = api.replace("https://", "http://");
    let (code, _, _) = run_cli(
        &exe,
        &["fleet", "list", "--api", &plain, "--token-file", &tf],
    )?;
    ensure!(code == 1, "plain HTTP to the TLS port: exit {code}");
    let other = Pki::new(&dir.path().join("other"))?;
    let wrong = other.hub_dir.join("ca.pem").display().to_string();
    let (code, _, err) = run_cli(
        &exe,
        &[
            "fleet",
            "list",
            "--api",
            &api,
            "--token-file",
            &tf,
            "--api-ca",
            &wrong,
        ],
    )?;
    ensure!(code == 1 && err.contains("TLS"), "{code} {err}");
    Ok(())
}

#[test]
fn the_audit_trail_through_the_api_is_signed_and_its_anchor_catches_a_cut_tail() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let hub = Hub::start_with(dir.path(), &pki, "")?;
    let api = hub.api_url()?;
    let exe = bin("outpost-hub")?;
    let cfg = hub.config.display().to_string();
    let author = token(&hub, "policy-author", "alice")?;
    for (i, text) in [
        "[[rules]]\nstreams = [\"plant/+/debug\"]\naction = \"deny\"\n",
        "[[rules]]\nstreams = [\"#\"]\naction = \"allow\"\n",
    ]
    .iter()
    .enumerate()
    {
        let req = serde_json::to_vec(
            &serde_json::json!({ "text": text, "source": format!("p{i}.toml") }),
        )?;
        let a = http(&api, "POST", "/api/v1/policy", Some(&author), Some(&req))?;
        ensure!(
            a.status == 200,
            "apply {i}: {} {}",
            a.status,
            String::from_utf8_lossy(&a.body)
        );
    }
    let viewer = token(&hub, "viewer", "auditor")?;
    let tf = token_file(&hub, dir.path(), "viewer", "auditor-cli")?;
    let remote = |args: &[&str]| -> Result<(i32, String, String)> {
        let mut all = args.to_vec();
        all.extend(["--api", &api, "--token-file", &tf]);
        run_cli(&exe, &all)
    };

    // The public key: the API's, the CLI's through the API and on the store
    // are one key.
    let key = http(&api, "GET", "/api/v1/audit/key", Some(&viewer), None)?.json()?;
    let (code, direct_pem, err) = run_cli(&exe, &["audit", "key", "--config", &cfg])?;
    ensure!(code == 0, "{err}");
    let (code, remote_pem, err) = remote(&["audit", "key"])?;
    ensure!(
        code == 0 && remote_pem == direct_pem && key["pem"] == direct_pem.as_str(),
        "{code} {err}\n{remote_pem}\n{direct_pem}\n{key}"
    );
    let kept = dir.path().join("kept-elsewhere.pem");
    std::fs::write(&kept, &direct_pem)?;
    let kept = kept.display().to_string();

    // Every entry the API wrote is signed; the anchor is the newest entry.
    let list = http(&api, "GET", "/api/v1/audit", Some(&viewer), None)?.json()?;
    let entries = list["entries"].as_array().context("entries")?;
    ensure!(
        entries.len() >= 4 && entries.iter().all(|e| e["sig"].is_string()),
        "{list}"
    );
    let anchor = http(&api, "GET", "/api/v1/audit/anchor", Some(&viewer), None)?.json()?;
    let anchored = anchor["anchor"].as_str().context("anchor")?.to_owned();
    ensure!(
        anchor["id"] == entries.len() as u64 && anchor["hash"] == list["head"],
        "{anchor} {list}"
    );
    let (code, out, err) = remote(&["audit", "anchor"])?;
    ensure!(code == 0 && out.trim() == anchored, "{code} {err} {out}");
    let verify_path = format!("/api/v1/audit/verify?anchor={anchored}");
    let v = http(&api, "GET", &verify_path, Some(&viewer), None)?.json()?;
    ensure!(v["status"] == "intact" && v["first_signed"] == 1, "{v}");
    let (code, out, err) = remote(&[
        "audit",
        "verify",
        "--anchor",
        &anchored,
        "--public-key",
        &kept,
    ])?;
    ensure!(code == 0 && out.contains("anchor"), "{code} {out} {err}");
    problem(
        &http(
            &api,
            "GET",
            "/api/v1/audit/verify?anchor=2:nothex",
            Some(&viewer),
            None,
        )?,
        400,
    )?;

    // The newest entries cut off with `meta` rewritten: the chain alone
    // holds, the anchor catches it, through the API and through the CLI
    // walking the API's entries itself.
    let db = rusqlite::Connection::open(dir.path().join("hub-data").join("hub.db"))?;
    db.execute_batch(
        "BEGIN IMMEDIATE;
         DELETE FROM audit WHERE id > 2;
         UPDATE meta SET value = '2' WHERE key = 'audit.count';
         UPDATE meta SET value = (SELECT hash FROM audit WHERE id = 2) WHERE key = 'audit.head';
         COMMIT;",
    )?;
    let v = http(&api, "GET", "/api/v1/audit/verify", Some(&viewer), None)?.json()?;
    ensure!(v["status"] == "intact" && v["entries"] == 2, "{v}");
    let v = http(&api, "GET", &verify_path, Some(&viewer), None)?.json()?;
    ensure!(v["status"] == "broken", "a cut tail passed the anchor: {v}");
    let (code, _, err) = remote(&["audit", "verify", "--anchor", &anchored])?;
    ensure!(code == 1 && err.contains("anchored"), "{code} {err}");

    // An edited entry is caught with the key kept elsewhere.
    db.execute("UPDATE audit SET actor = 'mallory' WHERE id = 2", [])?;
    let (code, _, err) = remote(&["audit", "verify", "--public-key", &kept])?;
    ensure!(code == 1 && err.contains("entry 2"), "{code} {err}");
    Ok(())
}

#[test]
fn labels_revocation_and_enrollment_are_api_resources_with_roles() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    seed(dir.path(), 2, 1)?;
    let hub = Hub::start_with(dir.path(), &pki, "")?;
    let api = hub.api_url()?;
    let admin = token(&hub, "admin", "root")?;
    let operator = token(&hub, "operator", "ops")?;
    let viewer = token(&hub, "viewer", "watcher")?;
    let body = |v: serde_json::Value| serde_json::to_vec(&v).unwrap_or_default();
    let agent = |id: &str| -> Result<serde_json::Value> {
        http(
            &api,
            "GET",
            &format!("/api/v1/agents/{id}"),
            Some(&viewer),
            None,
        )?
        .json()
    };

    // Labels: an operator's; a viewer is refused and nothing changes.
    let edit = body(serde_json::json!({"set": {"line": "3"}, "remove": ["site"]}));
    problem(
        &http(
            &api,
            "POST",
            "/api/v1/agents/gw-0/labels",
            Some(&viewer),
            Some(&edit),
        )?,
        403,
    )?;
    ensure!(agent("gw-0")?["labels"] == serde_json::json!({"site": "site-0"}));
    let a = http(
        &api,
        "POST",
        "/api/v1/agents/gw-0/labels",
        Some(&operator),
        Some(&edit),
    )?;
    let changed = a.json()?;
    ensure!(
        a.status == 200
            && changed["changed"] == true
            && changed["new"] == serde_json::json!({"line": "3"}),
        "{changed}"
    );
    ensure!(agent("gw-0")?["labels"] == serde_json::json!({"line": "3"}));
    let bad = body(serde_json::json!({"set": {"a=b": "c"}}));
    problem(
        &http(
            &api,
            "POST",
            "/api/v1/agents/gw-0/labels",
            Some(&operator),
            Some(&bad),
        )?,
        400,
    )?;

    // Revocation: an administrator's; an operator is refused.
    let why = body(serde_json::json!({"reason": "stolen"}));
    problem(
        &http(
            &api,
            "POST",
            "/api/v1/agents/gw-1/revoke",
            Some(&operator),
            Some(&why),
        )?,
        403,
    )?;
    let r = http(
        &api,
        "POST",
        "/api/v1/agents/gw-1/revoke",
        Some(&admin),
        Some(&why),
    )?
    .json()?;
    ensure!(r["new"] == true && r["by"] == "token:root", "{r}");
    ensure!(agent("gw-1")?["revoked"]["reason"] == "stolen");
    let r = http(
        &api,
        "POST",
        "/api/v1/agents/gw-1/reinstate",
        Some(&admin),
        None,
    )?
    .json()?;
    ensure!(r["reinstated"] == true, "{r}");
    ensure!(agent("gw-1")?["revoked"].is_null());

    // Enrollment: made, listed without its secret, revoked.
    let req =
        body(serde_json::json!({"agent_id": "gw-9", "labels": {"site": "depot-9"}, "ttl": "10m"}));
    problem(
        &http(
            &api,
            "POST",
            "/api/v1/enrollments",
            Some(&operator),
            Some(&req),
        )?,
        403,
    )?;
    let made = http(
        &api,
        "POST",
        "/api/v1/enrollments",
        Some(&admin),
        Some(&req),
    )?;
    let doc = made.json()?;
    let secret = doc["token"].as_str().context("token")?.to_owned();
    ensure!(made.status == 201 && doc["agent_id"] == "gw-9", "{doc}");
    let listed = http(&api, "GET", "/api/v1/enrollments", Some(&admin), None)?;
    let text = String::from_utf8_lossy(&listed.body).into_owned();
    ensure!(
        text.contains("\"pending\"") && !text.contains(&secret),
        "{text}"
    );
    let gone = http(
        &api,
        "DELETE",
        "/api/v1/enrollments/gw-9",
        Some(&admin),
        None,
    )?
    .json()?;
    ensure!(gone[0]["state"] == "revoked", "{gone}");
    problem(
        &http(
            &api,
            "DELETE",
            "/api/v1/enrollments/gw-9",
            Some(&admin),
            None,
        )?,
        404,
    )?;
    let bad_ttl = body(serde_json::json!({"agent_id": "gw-9", "ttl": "90d"}));
    problem(
        &http(
            &api,
            "POST",
            "/api/v1/enrollments",
            Some(&admin),
            Some(&bad_ttl),
        )?,
        400,
    )?;

    // Every change is audited with the caller's subject.
    let (code, out, err) = hub.cli(&["audit", "list", "--json"])?;
    ensure!(code == 0, "{err}");
    let trail: Vec<(String, String)> = serde_json::from_str::<serde_json::Value>(&out)?["entries"]
        .as_array()
        .context("entries")?
        .iter()
        .filter(|e| e["actor"].as_str().is_some_and(|a| a.starts_with("token:")))
        .map(|e| {
            (
                e["actor"].as_str().unwrap_or("").to_owned(),
                e["action"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let s = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    ensure!(
        trail
            == vec![
                s("token:watcher", "api.refused"),
                s("token:ops", "agent.labels_changed"),
                s("token:ops", "api.refused"),
                s("token:root", "agent.revoked"),
                s("token:root", "agent.reinstated"),
                s("token:ops", "api.refused"),
                s("token:root", "enroll.created"),
                s("token:root", "enroll.revoked"),
            ],
        "{trail:?}"
    );
    Ok(())
}
