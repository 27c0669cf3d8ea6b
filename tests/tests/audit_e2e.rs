//! The audit trail with real processes: the real `outpost-hub` (run under
//! umask 022) signs its entries with a key file only it reads; `audit verify`
//! finds an edited entry and an edited signature, and `--anchor` finds the
//! newest entries cut off with `meta` rewritten, which the chain alone cannot;
//! a policy version edited in `hub.db` is refused by the running hub (which
//! keeps the one in force) and at the next start (exit 2, one line); two
//! processes appending to the JetStream audit stream at once keep one chain
//! that verifies; and every secret file (the audit key, `reset.key`, the
//! agent's `policy.json`) is 0600 although the umask would allow 0644.
//!
//! Every wait polls a condition until a deadline.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use outpost_tests::{bin, free_udp_port, run_cli, wait_until, Agent, Hub, Nats, Pki, Proc};

/// How long any one condition may take on a loaded 2-core machine running
/// debug builds.
const DEADLINE: Duration = Duration::from_secs(90);

const DENY_DEBUG: &str = "[[rules]]\nstreams = [\"plant/+/debug\"]\naction = \"deny\"\n";
const DENY_ALL: &str = "[[rules]]\nstreams = [\"#\"]\naction = \"deny\"\n";
const ALLOW_ALL: &str = "[[rules]]\nstreams = [\"#\"]\naction = \"allow\"\n";

/// `cmd` with `args` as `sh` runs it after `umask 022`: what a file gets
/// from the umask alone would be 0644.
fn under_umask_022(exe: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("umask 022 && exec \"$0\" \"$@\"")
        .arg(exe)
        .args(args);
    c
}

/// Runs an `outpost-hub` verb under umask 022: (status, stdout, stderr).
fn hub_verb(args: &[&str]) -> Result<(i32, String, String)> {
    let out = under_umask_022(&bin("outpost-hub")?, args)
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn path(p: &Path) -> Result<&str> {
    p.to_str().context("not UTF-8")
}

fn mode(p: &Path) -> Result<u32> {
    Ok(std::fs::metadata(p)
        .with_context(|| format!("{}", p.display()))?
        .permissions()
        .mode()
        & 0o777)
}

/// The hub's config in `dir` (SQLite store in `dir/hub-data`).
fn hub_config(dir: &Path, pki: &Pki, addr: SocketAddr, store: &str) -> Result<PathBuf> {
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "[hub]\ndata_dir = \"hub-data\"\nlisten = \"{addr}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n{store}\n[observability]\nlog = \"info\"\nmetrics = \"\"\n",
            pki.hub_dir.join("ca.pem").display(),
            pki.hub_dir.join("hub.pem").display(),
            pki.hub_dir.join("hub.key").display(),
        ),
    )?;
    Ok(config)
}

/// Starts `outpost-hub run` on `config` under umask 022 and waits until it
/// listens; its log is `hub.log` beside the config.
fn start_hub(config: &Path, addr: SocketAddr) -> Result<Hub> {
    let log_path = config.with_file_name("hub.log");
    let listening = |p: &Path| {
        std::fs::read_to_string(p)
            .map(|s| s.matches("Hub listening").count())
            .unwrap_or(0)
    };
    let before = listening(&log_path);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let child = under_umask_022(&bin("outpost-hub")?, &["run", "--config", path(config)?])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let mut hub = Hub {
        proc: Proc {
            child,
            name: "outpost-hub".into(),
        },
        config: config.to_owned(),
        addr,
    };
    let mut exited = false;
    wait_until(DEADLINE, "the hub to listen", || {
        exited = !hub.proc.is_running();
        exited || listening(&log_path) > before
    })?;
    if exited {
        bail!("outpost-hub exited on start:\n{}", hub.log());
    }
    Ok(hub)
}

/// Runs `outpost-hub run` on `config` expecting it to refuse to start: its
/// exit status and stderr.
fn refused_start(config: &Path) -> Result<(i32, String)> {
    let mut child = under_umask_022(&bin("outpost-hub")?, &["run", "--config", path(config)?])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut status = None;
    wait_until(DEADLINE, "the hub to exit", || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    })
    .inspect_err(|_| {
        let _ = child.kill();
        let _ = child.wait();
    })?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut err)?;
    }
    Ok((status.and_then(|s| s.code()).unwrap_or(-1), err))
}

fn apply(config: &Path, file: &Path, text: &str) -> Result<u64> {
    std::fs::write(file, text)?;
    let (code, out, err) = hub_verb(&[
        "policy",
        "apply",
        path(file)?,
        "--config",
        path(config)?,
        "--actor",
        "e2e",
        "--json",
    ])?;
    ensure!(code == 0, "policy apply exited {code}: {err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v["version"].as_u64().context("version")
}

/// `audit verify` with `extra` flags: (status, stdout, stderr).
fn verify(config: &Path, extra: &[&str]) -> Result<(i32, String, String)> {
    let mut args = vec!["audit", "verify", "--config", path(config)?];
    args.extend(extra);
    hub_verb(&args)
}

fn anchor(config: &Path) -> Result<String> {
    let (code, out, err) = hub_verb(&["audit", "anchor", "--config", path(config)?])?;
    ensure!(code == 0, "audit anchor exited {code}: {err}");
    Ok(out.trim().to_owned())
}

fn db(dir: &Path) -> Result<rusqlite::Connection> {
    let db = rusqlite::Connection::open(dir.join("hub-data/hub.db"))?;
    db.busy_timeout(Duration::from_secs(10))?;
    Ok(db)
}

/// Asserts that `audit verify` fails (exit 1) with one line naming `id`
/// and `what`.
fn ensure_broken(out: (i32, String, String), id: u64, what: &str) -> Result<()> {
    let (code, stdout, err) = out;
    ensure!(code == 1, "verify exited {code}: {stdout} {err}");
    let line = err.trim_end();
    ensure!(
        !line.contains('\n')
            && line.starts_with(&format!("error: audit log broken at entry {id}:"))
            && line.contains(what),
        "verify should name entry {id} and {what:?}: {err:?}"
    );
    Ok(())
}

#[test]
fn edits_forged_signatures_and_a_tail_cut_with_meta_rewritten_are_caught() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    let config = hub_config(dir.path(), &pki, addr, "")?;
    let mut hub = start_hub(&config, addr)?;
    let data = dir.path().join("hub-data");
    for f in ["audit.key", "reset.key", "hashing.key"] {
        ensure!(mode(&data.join(f))? == 0o600, "{f} is not 0600");
    }

    for (i, text) in [DENY_DEBUG, DENY_ALL, ALLOW_ALL, DENY_DEBUG]
        .iter()
        .enumerate()
    {
        apply(&config, &dir.path().join(format!("p{i}.toml")), text)?;
    }
    // A policy is enforced: the hub keeps running and has checked each.
    wait_until(DEADLINE, "the hub to load version 4", || {
        hub.log().contains("version=4")
    })?;
    ensure!(hub.proc.is_running(), "{}", hub.log());
    ensure!(!hub.log().contains("TAMPERED"), "{}", hub.log());

    // The public key, kept elsewhere, and an anchor of the newest entry.
    let (code, pem, err) = hub_verb(&["audit", "key", "--config", path(&config)?])?;
    ensure!(
        code == 0 && pem.starts_with("-----BEGIN PUBLIC KEY-----"),
        "{err}"
    );
    let public = dir.path().join("kept-elsewhere.pem");
    std::fs::write(&public, &pem)?;
    let anchored = anchor(&config)?;
    let newest: u64 = anchored.split(':').next().unwrap_or("").parse()?;
    // The hub's first start made its hashing key (`hashing.key_created`),
    // then four policy.applied entries.
    ensure!(newest == 5, "five entries: {anchored}");
    let (code, out, err) = verify(
        &config,
        &["--anchor", &anchored, "--public-key", path(&public)?],
    )?;
    ensure!(
        code == 0 && out.contains("intact: 5 entries") && out.contains("all 5 signed"),
        "{out} {err}"
    );

    let db = db(dir.path())?;
    // An edited entry.
    let actor: String = db.query_row("SELECT actor FROM audit WHERE id = 2", [], |r| r.get(0))?;
    db.execute("UPDATE audit SET actor = 'mallory' WHERE id = 2", [])?;
    ensure_broken(verify(&config, &[])?, 2, "changed after it was written")?;
    db.execute("UPDATE audit SET actor = ?1 WHERE id = 2", [&actor])?;
    ensure!(verify(&config, &[])?.0 == 0, "restored");

    // An edited signature (one hex digit changed).
    let sig: String = db.query_row("SELECT sig FROM audit WHERE id = 3", [], |r| r.get(0))?;
    let mut forged = sig.clone().into_bytes();
    forged[5] = if forged[5] == b'0' { b'1' } else { b'0' };
    db.execute(
        "UPDATE audit SET sig = ?1 WHERE id = 3",
        [String::from_utf8(forged)?],
    )?;
    ensure_broken(verify(&config, &[])?, 3, "signature does not verify")?;
    // Another entry's signature copied over it is as wrong.
    db.execute(
        "UPDATE audit SET sig = (SELECT sig FROM audit WHERE id = 1) WHERE id = 3",
        [],
    )?;
    ensure_broken(
        verify(&config, &["--public-key", path(&public)?])?,
        3,
        "signature does not verify",
    )?;
    // A stripped signature after the first signed entry.
    db.execute("UPDATE audit SET sig = NULL WHERE id = 3", [])?;
    ensure_broken(verify(&config, &[])?, 3, "no signature")?;
    db.execute("UPDATE audit SET sig = ?1 WHERE id = 3", [&sig])?;
    ensure!(verify(&config, &[])?.0 == 0, "restored");

    // The newest three entries cut off and `meta` rewritten to match: the
    // chain alone holds, the anchor does not.
    db.execute_batch(
        "BEGIN IMMEDIATE;
         DELETE FROM audit WHERE id > 2;
         UPDATE meta SET value = '2' WHERE key = 'audit.count';
         UPDATE meta SET value = (SELECT hash FROM audit WHERE id = 2) WHERE key = 'audit.head';
         COMMIT;",
    )?;
    let (code, out, err) = verify(&config, &[])?;
    ensure!(
        code == 0 && out.contains("intact: 2 entries"),
        "without an anchor a cut tail verifies: {out} {err}"
    );
    ensure_broken(
        verify(&config, &["--anchor", &anchored])?,
        5,
        "the anchored entry 5 is missing",
    )?;
    let bad_anchor = hub_verb(&[
        "audit",
        "verify",
        "--config",
        path(&config)?,
        "--anchor",
        "4:nothex",
    ])?;
    ensure!(
        bad_anchor.0 == 2,
        "a malformed anchor is bad input: {bad_anchor:?}"
    );
    hub.proc.term(DEADLINE)?;
    Ok(())
}

/// Appends `n` entries through each of two store connections (opened with
/// the two configs), all at once; the append function is the replicas'.
fn burst(configs: &[PathBuf], n: u64) -> Result<()> {
    use outpost_hub::audit::chain::Entry;
    use outpost_hub::store::jetstream::JetStreamStore;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut stores = Vec::new();
        for c in configs {
            let cfg = outpost_hub::config::load(c, Vec::new())?;
            let js = cfg.store.jetstream().context("jetstream")?.clone();
            let key = outpost_hub::audit::key::AuditKey::load(&cfg.audit_key_path(c))?;
            let base = c.parent().context("folder")?.to_owned();
            stores.push((JetStreamStore::open(&js, &base).await?, key));
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (r, (store, key)) in stores.iter().enumerate() {
            for i in 0..n {
                let (store, key) = (store.clone(), key.clone());
                tasks.spawn(async move {
                    let target = format!("replica {r} entry {i}");
                    store
                        .audit_append(
                            &key,
                            &Entry {
                                ts: outpost_protocols::Timestamp(i as i64),
                                actor: "e2e",
                                action: "test.burst",
                                target: &target,
                                result: "ok",
                                detail: "",
                            },
                        )
                        .await
                });
            }
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        for (s, _) in stores {
            s.close().await;
        }
        anyhow::Ok(())
    })
}

fn agent_config(hub: SocketAddr, creds: &Path) -> String {
    format!(
        "[agent]\ndata_dir = \"data\"\nid = \"gw-1\"\nlabels = {{ site = \"depot-17\" }}\n\n[uplink]\nhub = \"{hub}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n\n[observability]\nmetrics = \"\"\nlog = \"info\"\n",
        creds.join("ca.pem").display(),
        creds.join("agent.pem").display(),
        creds.join("agent.key").display(),
    )
}

/// The policy version `gw-1` reports running, from `fleet list`.
fn agent_policy(config: &Path) -> Result<Option<u64>> {
    let (code, out, err) = run_cli(
        &bin("outpost-hub")?,
        &["fleet", "list", "--config", path(config)?, "--json"],
    )?;
    ensure!(code == 0, "fleet list: {err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v.as_array()
        .and_then(|a| a.iter().find(|x| x["agent_id"] == "gw-1"))
        .and_then(|x| x["policy_version"].as_u64()))
}

#[test]
fn a_policy_row_edited_in_the_store_is_refused_while_running_and_at_the_next_start() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    let creds = pki.issue_agent("gw-1")?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    let config = hub_config(dir.path(), &pki, addr, "")?;
    let mut hub = start_hub(&config, addr)?;
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir)?;
    let agent_toml = agent_dir.join("agent.toml");
    std::fs::write(&agent_toml, agent_config(addr, &creds))?;
    let child = under_umask_022(
        &bin("outpost-agent")?,
        &["run", "--config", path(&agent_toml)?],
    )
    .stdout(Stdio::null())
    .stderr(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(agent_dir.join("agent.log"))?,
    )
    .spawn()?;
    let _agent = Agent {
        proc: Proc {
            child,
            name: "outpost-agent".into(),
        },
        config: agent_toml.clone(),
    };

    apply(&config, &dir.path().join("a.toml"), DENY_DEBUG)?;
    apply(&config, &dir.path().join("b.toml"), DENY_ALL)?;
    wait_until(DEADLINE, "the agent to run version 2", || {
        agent_policy(&config).ok().flatten() == Some(2)
    })?;
    let policy_json = agent_dir.join("data/policy.json");
    ensure!(mode(&policy_json)? == 0o600, "policy.json under umask 022");

    // While the hub runs: a version 3 written straight into the store, with
    // no policy.applied entry, is refused and audited; version 2 stays.
    {
        let db = db(dir.path())?;
        db.execute(
            "INSERT INTO policies (version, applied_at, actor, source, digest, text) VALUES (3, 1, 'e2e', 'x.toml', ?1, ?2)",
            [outpost_protocols::policy::digest(ALLOW_ALL), ALLOW_ALL.to_owned()],
        )?;
    }
    // The hub logs the refusal, then appends its entry: wait for the entry.
    let list = || hub_verb(&["audit", "list", "--config", path(&config)?, "--json"]);
    wait_until(DEADLINE, "the hub to refuse version 3, audited", || {
        hub.log().contains("POLICY TAMPERED")
            && list().is_ok_and(|(_, out, _)| out.contains("policy.tampered"))
    })?;
    let (code, out, err) = list()?;
    ensure!(code == 0, "{err}");
    let log: serde_json::Value = serde_json::from_str(&out)?;
    let tampered: Vec<&serde_json::Value> = log["entries"]
        .as_array()
        .context("entries")?
        .iter()
        .filter(|e| e["action"] == "policy.tampered")
        .collect();
    ensure!(
        tampered.len() == 1
            && tampered[0]["target"] == "policy v3"
            && tampered[0]["actor"] == "hub"
            && tampered[0]["result"] == "refused",
        "{tampered:?}\n{}",
        hub.log()
    );
    ensure!(
        verify(&config, &[])?.0 == 0,
        "the hub's own entry is signed"
    );
    ensure!(hub.proc.is_running(), "{}", hub.log());
    ensure!(
        agent_policy(&config)? == Some(2),
        "the agent keeps version 2"
    );

    // Stopped, version 3 removed again and the text of version 2 (the one in
    // force) edited together with its digest column: the next start refuses.
    hub.proc.term(DEADLINE)?;
    {
        let db = db(dir.path())?;
        db.execute("DELETE FROM policies WHERE version = 3", [])?;
        db.execute(
            "UPDATE policies SET text = ?1, digest = ?2 WHERE version = 2",
            [
                ALLOW_ALL.to_owned(),
                outpost_protocols::policy::digest(ALLOW_ALL),
            ],
        )?;
    }
    let (code, err) = refused_start(&config)?;
    ensure!(code == 2, "a tampered policy at start: exit {code}: {err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    ensure!(
        errors.len() == 1
            && errors[0].starts_with(
                "error: policy version 2 in the store is not the one that was applied:"
            )
            && errors[0].contains("audit entry"),
        "one clear line: {err:?}"
    );

    // A good policy applied again lets the hub start with it.
    let v = apply(&config, &dir.path().join("c.toml"), DENY_DEBUG)?;
    ensure!(v == 3, "the next version: {v}");
    let hub = start_hub(&config, addr)?;
    wait_until(DEADLINE, "the agent to run version 3", || {
        agent_policy(&config).ok().flatten() == Some(3)
    })?;
    let (code, out, err) = verify(&config, &[])?;
    ensure!(code == 0, "{out} {err}");
    drop(hub);
    Ok(())
}

#[test]
fn two_processes_appending_to_the_jetstream_audit_stream_at_once_keep_one_chain() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let nats = Nats::start_with(dir.path(), outpost_tests::free_port()?, "max_payload: 8MB")?;
    let pki = Pki::new(dir.path())?;
    let store = format!(
        "[store]\nkind = \"jetstream\"\n\n[store.jetstream]\nurl = \"{}\"\ntimeout = \"5s\"\n\n[audit]\nkey = \"../audit.key\"\n\n[policy]\nhashing_key = \"../hashing.key\"\n",
        nats.url()
    );
    // Two replicas' configs on two "machines", sharing the audit key file.
    let mut configs = Vec::new();
    let mut addrs = Vec::new();
    for r in ["r1", "r2"] {
        let d = dir.path().join(r);
        std::fs::create_dir_all(&d)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
        configs.push(hub_config(&d, &pki, addr, &store)?);
        addrs.push(addr);
    }
    let replica = start_hub(&configs[0], addrs[0])?;
    ensure!(mode(&dir.path().join("audit.key"))? == 0o600);

    // Each process applies a run of policies and records certificate
    // issues, at the same time as the other.
    const EACH: usize = 8;
    let workers: Vec<std::thread::JoinHandle<Result<()>>> = configs
        .iter()
        .enumerate()
        .map(|(w, config)| {
            let config = config.clone();
            let ca = pki.ca_dir.clone();
            let out = dir.path().join(format!("certs-{w}"));
            std::thread::spawn(move || -> Result<()> {
                for i in 0..EACH {
                    let text = format!(
                        "description = \"worker {w} round {i}\"\n[[rules]]\nstreams = [\"w{w}/r{i}/#\"]\naction = \"deny\"\n"
                    );
                    let file = config.with_file_name(format!("p{i}.toml"));
                    std::fs::write(&file, text)?;
                    let (code, _, err) = hub_verb(&[
                        "policy",
                        "apply",
                        path(&file)?,
                        "--config",
                        path(&config)?,
                    ])?;
                    ensure!(code == 0, "worker {w} apply {i}: {err}");
                    let (code, _, err) = hub_verb(&[
                        "ca",
                        "issue",
                        "--dir",
                        path(&ca)?,
                        "--agent",
                        &format!("w{w}-{i}"),
                        "--out",
                        path(&out)?,
                        "--config",
                        path(&config)?,
                    ])?;
                    ensure!(code == 0, "worker {w} issue {i}: {err}");
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("a worker panicked"))??;
    }

    // And two connections (as two replicas) appending 40 entries at once
    // each, in one process, where they surely collide.
    const BURST: u64 = 40;
    burst(&configs, BURST)?;

    // And the first replica's hashing.key_created.
    let total = 2 * 2 * EACH as u64 + 2 * BURST + 1;
    for config in &configs {
        let (code, out, err) = verify(config, &[])?;
        ensure!(
            code == 0 && out.contains(&format!("intact: {total} entries")),
            "one chain of {total}: {out} {err}"
        );
    }
    let (code, out, err) = hub_verb(&["audit", "list", "--config", path(&configs[1])?, "--json"])?;
    ensure!(code == 0, "{err}");
    let log: serde_json::Value = serde_json::from_str(&out)?;
    let entries = log["entries"].as_array().context("entries")?;
    let ids: Vec<u64> = entries.iter().filter_map(|e| e["id"].as_u64()).collect();
    ensure!(ids == (1..=total).collect::<Vec<_>>(), "{ids:?}");
    let applied: Vec<&str> = entries
        .iter()
        .filter(|e| e["action"] == "policy.applied")
        .filter_map(|e| e["target"].as_str())
        .collect();
    let want: Vec<String> = (1..=2 * EACH).map(|v| format!("policy v{v}")).collect();
    let mut got: Vec<String> = applied.iter().map(|s| (*s).to_owned()).collect();
    got.sort_by_key(|t| t[8..].parse::<u64>().unwrap_or(0));
    ensure!(got == want, "every version has its entry: {got:?}");

    // The replica loaded each version as it came, checked against its entry.
    let newest = 2 * EACH;
    wait_until(DEADLINE, "the replica to load the newest version", || {
        replica.log().contains(&format!("version={newest}"))
    })?;
    ensure!(!replica.log().contains("TAMPERED"), "{}", replica.log());

    // The anchor works on this store too; a second replica with another
    // audit key refuses to start.
    let anchored = anchor(&configs[1])?;
    ensure!(verify(&configs[0], &["--anchor", &anchored])?.0 == 0);
    let other = dir.path().join("r3");
    std::fs::create_dir_all(&other)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], free_udp_port()?));
    let config = hub_config(
        &other,
        &pki,
        addr,
        &store.replace("../audit.key", "own.key"),
    )?;
    let (code, err) = refused_start(&config)?;
    ensure!(
        code == 1 && err.contains("is not the fleet's"),
        "a replica with another key: exit {code}: {err}"
    );
    drop(replica);
    Ok(())
}
