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

/// GOOD with a writable setpoint and an MQTT → Modbus bridge to it from
/// `from`, `bridge` more keys on the bridge, `mqtt` more keys in `[mqtt]`.
fn with_write_bridge(from: &str, bridge: &str, mqtt: &str) -> String {
    format!(
        "{}\n[[modbus.devices.tags]]\nname = \"setpoint\"\ntable = \"holding\"\naddress = 110\ntype = \"u16\"\nwritable = true\n\n[[bridges]]\nfrom = \"mqtt:{from}\"\nto = \"modbus:plc1/setpoint\"\n{bridge}\n",
        GOOD.replace("[[mqtt.subscribe]]", &format!("{mqtt}\n[[mqtt.subscribe]]")),
    )
}

#[test]
fn a_write_bridge_without_tls_and_login_exits_2_naming_the_bridge_in_check_and_run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let text = with_write_bridge("cmd/plc1/setpoint", "", "");
    let (code, _, err) = check(dir.path(), &text)?;
    let needles = [
        "agent.toml: bridges[0]: ",
        "\"mqtt:cmd/plc1/setpoint\"",
        "no TLS ([mqtt.tls]) and no login",
        "allow_unauthenticated_writes",
    ];
    assert_bad(code, &err, &needles);
    // `run` refuses it the same way, before it opens anything.
    let p = dir.path().join("agent.toml");
    let (code, _, err) = run_cli(
        &bin("outpost-agent")?,
        &["run", "--config", p.to_str().unwrap_or_default()],
    )?;
    assert_bad(code, &err, &needles);
    assert!(
        !dir.path().join("data").exists(),
        "run made its data folder"
    );
    // A login alone is not enough: the password would cross in clear.
    let (code, _, err) = check(
        dir.path(),
        &with_write_bridge(
            "cmd/plc1/setpoint",
            "",
            "username = \"agent\"\npassword = \"secret\"",
        ),
    )?;
    assert_bad(
        code,
        &err,
        &["bridges[0]: ", "[mqtt] has no TLS ([mqtt.tls]):"],
    );
    // TLS with a login passes without a warning.
    let (code, _, err) = check(
        dir.path(),
        &with_write_bridge(
            "cmd/plc1/setpoint",
            "",
            "username = \"agent\"\npassword = \"secret\"\ntls = { ca = \"ca.pem\" }",
        ),
    )?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(err, "", "no warning");
    Ok(())
}

#[test]
fn a_write_bridge_from_a_wildcard_topic_exits_2_naming_the_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for from in ["cmd/+/setpoint", "cmd/plc1/#"] {
        let (code, _, err) = check(
            dir.path(),
            &with_write_bridge(from, "allow_unauthenticated_writes = true", ""),
        )?;
        assert_bad(
            code,
            &err,
            &["agent.toml: bridges[0].from: ", from, "wildcards"],
        );
    }
    Ok(())
}

#[test]
fn allow_unauthenticated_writes_warns_on_stderr_and_exits_0() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let text = with_write_bridge(
        "cmd/plc1/setpoint",
        "allow_unauthenticated_writes = true",
        "",
    );
    let (code, out, err) = check(dir.path(), &text)?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("bridge mqtt:cmd/plc1/setpoint -> modbus:plc1/setpoint (write)"),
        "{out}"
    );
    assert_eq!(err.lines().count(), 1, "one warning: {err}");
    assert!(
        err.starts_with("warning: ")
            && err.contains("agent.toml: bridges[0].allow_unauthenticated_writes: "),
        "{err}"
    );
    assert!(err.contains("cmd/plc1/setpoint"), "{err}");
    assert!(!out.contains("warning"), "warnings go to stderr: {out}");
    // `--json` carries it too, and stdout stays one JSON document.
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
    assert_eq!(j["warnings"].as_array().map(Vec::len), Some(1), "{j}");
    Ok(())
}
