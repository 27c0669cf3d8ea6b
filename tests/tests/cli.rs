//! Bad input on the command line: one clear line on stderr naming the file and
//! the key, exit status 2, never a panic.

use std::path::Path;

use anyhow::Result;
use outpost_tests::{bin, run_cli};

const GOOD: &str = r#"
[agent]
data_dir = "data"
labels = { site = "depot-17" }

[mqtt]
broker = "127.0.0.1:1883"
client_id = "outpost-depot-17"
[[mqtt.subscribe]]
filter = "plant/#"
qos = 1

[[modbus.devices]]
name = "plc1"
address = "127.0.0.1:502"
[[modbus.devices.tags]]
name = "temperature"
table = "holding"
address = 100
type = "f32"
"#;

fn check(dir: &Path, text: &str) -> Result<(i32, String, String)> {
    let p = dir.join("agent.toml");
    std::fs::write(&p, text)?;
    run_cli(
        &bin("outpost-agent")?,
        &["check", "--config", p.to_str().unwrap_or_default()],
    )
}

fn assert_bad(code: i32, stderr: &str, needles: &[&str]) {
    assert_eq!(code, 2, "exit status, stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{n:?} not in {stderr:?}");
    }
}

#[test]
fn a_good_config_checks_and_prints_the_poll_plan() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (code, out, err) = check(dir.path(), GOOD)?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("device plc1"), "{out}");
    assert!(out.contains("read holding 100..102"), "{out}");
    assert!(out.contains("subscribe plant/# qos 1"), "{out}");
    let p = dir.path().join("agent.toml");
    let (code, out, _) = run_cli(
        &bin("outpost-agent")?,
        &[
            "check",
            "--json",
            "--config",
            p.to_str().unwrap_or_default(),
        ],
    )?;
    assert_eq!(code, 0);
    let j: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(j["devices"][0]["reads_per_cycle"], 1);
    Ok(())
}

#[test]
fn a_missing_file_is_named() -> Result<()> {
    let (code, _, err) = run_cli(
        &bin("outpost-agent")?,
        &["check", "--config", "/nonexistent/agent.toml"],
    )?;
    assert_bad(code, &err, &["/nonexistent/agent.toml"]);
    Ok(())
}

#[test]
fn invalid_toml_names_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (code, _, err) = check(dir.path(), "[agent\ndata_dir = ")?;
    assert_bad(code, &err, &["agent.toml"]);
    Ok(())
}

#[test]
fn an_unknown_key_is_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (code, _, err) = check(
        dir.path(),
        &GOOD.replace("[mqtt]\n", "[mqtt]\nbrokr = \"x\"\n"),
    )?;
    assert_bad(code, &err, &["agent.toml", "brokr"]);
    Ok(())
}

#[test]
fn a_wrong_type_is_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (code, _, err) = check(
        dir.path(),
        &GOOD.replace("address = 100", "address = \"hundred\""),
    )?;
    assert_bad(code, &err, &["agent.toml", "address"]);
    Ok(())
}

#[test]
fn an_address_out_of_range_is_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (code, _, err) = check(
        dir.path(),
        &GOOD.replace("address = 100", "address = 65535"),
    )?;
    assert_bad(code, &err, &["agent.toml", "modbus.devices[0].tags[0]"]);
    let (code, _, err) = check(
        dir.path(),
        &GOOD.replace("address = 100", "address = 70000"),
    )?;
    assert_bad(
        code,
        &err,
        &["agent.toml", "modbus.devices[0].tags[0].address"],
    );
    Ok(())
}

#[test]
fn an_environment_override_is_checked_like_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("agent.toml");
    std::fs::write(&p, GOOD)?;
    let out = std::process::Command::new(bin("outpost-agent")?)
        .args(["check", "--config", p.to_str().unwrap_or_default()])
        .env("OUTPOST_OUTBOX__EVICTION", "keep-everything")
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_bad(out.status.code().unwrap_or(-1), &err, &["outbox.eviction"]);
    Ok(())
}

#[test]
fn a_bad_flag_exits_2() -> Result<()> {
    let (code, _, err) = run_cli(&bin("outpost-agent")?, &["run", "--confg", "x"])?;
    assert_eq!(code, 2, "{err}");
    assert!(!err.contains("panicked"));
    Ok(())
}

#[test]
fn outbox_verbs_on_a_missing_outbox_fail_without_panic() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("agent.toml");
    std::fs::write(&p, GOOD)?;
    let (code, _, err) = run_cli(
        &bin("outpost-agent")?,
        &[
            "outbox",
            "stats",
            "--config",
            p.to_str().unwrap_or_default(),
        ],
    )?;
    assert_ne!(code, 0);
    assert!(err.contains("outbox.db"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    Ok(())
}

#[test]
fn the_hub_checks_its_config_too() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("hub.toml");
    std::fs::write(
        &p,
        "[hub]\ndata_dir = \"d\"\nca = \"ca.pem\"\ncert = \"hub.pem\"\nkey = \"hub.key\"\n",
    )?;
    let hub = bin("outpost-hub")?;
    let (code, out, err) = run_cli(&hub, &["check", "--config", p.to_str().unwrap_or_default()])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok"));
    std::fs::write(&p, "[hub]\ndata_dir = \"d\"\nca = \"ca.pem\"\ncert = \"hub.pem\"\nkey = \"hub.key\"\nbogus = 1\n")?;
    let (code, _, err) = run_cli(&hub, &["check", "--config", p.to_str().unwrap_or_default()])?;
    assert_bad(code, &err, &["hub.toml", "bogus"]);
    let (code, out, _) = run_cli(&hub, &["--version"])?;
    assert_eq!(code, 0);
    assert!(out.starts_with("outpost-hub "));
    Ok(())
}
