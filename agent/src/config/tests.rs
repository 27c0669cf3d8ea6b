use super::*;

fn write(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("agent.toml");
    std::fs::write(&p, text).expect("write config");
    p
}

fn load_str(text: &str, env: &[(&str, &str)]) -> Result<AgentConfig, ConfigError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = write(dir.path(), text);
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    load(&p, env)?.validate(&p)
}

const GOOD: &str = r#"
[agent]
data_dir = "data"
labels = { site = "depot-17", region = "eu-west" }

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
order = "cdab"
[[modbus.devices.tags]]
name = "setpoint"
table = "holding"
address = 110
type = "u16"
writable = true

[[bridges]]
from = "modbus:plc1/temperature"
to = "mqtt:plant/{device}/{tag}"

[[bridges]]
from = "mqtt:plant/plc1/setpoint/set"
to = "modbus:plc1/setpoint"
allow_unauthenticated_writes = true
"#;

#[test]
fn the_design_example_validates() {
    let c = load_str(GOOD, &[]).expect("valid");
    assert_eq!(c.devices.len(), 1);
    assert_eq!(c.devices[0].tags[0].stream.as_str(), "plc1/temperature");
    assert_eq!(c.publish_bridges.len(), 1);
    assert_eq!(c.write_bridges.len(), 1);
    assert_eq!(c.labels["site"], "depot-17");
    assert!(c.data_dir.ends_with("data"));
    assert!(
        c.data_dir.is_absolute()
            || c.data_dir.starts_with("/")
            || c.data_dir.components().count() > 1
    );
}

#[test]
fn environment_overrides_keys() {
    let c = load_str(
        GOOD,
        &[
            ("OUTPOST_OUTBOX__SYNCHRONOUS", "normal"),
            ("OUTPOST_MQTT__BROKER", "10.0.0.1:1884"),
        ],
    )
    .expect("valid");
    assert_eq!(c.outbox.synchronous, Synchronous::Normal);
    assert_eq!(c.mqtt.expect("mqtt").port, 1884);
}

fn invalid(text: &str) -> String {
    match load_str(text, &[]) {
        Ok(_) => panic!("accepted invalid config"),
        Err(e) => e.to_string(),
    }
}

/// `log` takes a level and levels per module (what the docs promise), and a
/// level that is not one is an error naming the key.
#[test]
fn the_log_filter_takes_levels_per_module_and_names_a_bad_one() {
    let good = load_str(
        &format!("{GOOD}\n[observability]\nlog = \"warn,outpost_agent::sources::modbus=debug\"\n"),
        &[],
    );
    assert!(good.is_ok(), "{:?}", good.err());
    let e = invalid(&format!(
        "{GOOD}\n[observability]\nlog = \"info,outpost_agent=loud\"\n"
    ));
    assert!(e.contains("observability.log"), "{e}");
}

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    let e = invalid(&GOOD.replace("[mqtt]\n", "[mqtt]\nbrokr = \"x\"\n"));
    assert!(e.contains("brokr"), "{e}");
}

#[test]
fn a_wrong_type_is_an_error_naming_the_key() {
    let e = invalid(&GOOD.replace("address = 100", "address = \"hundred\""));
    assert!(e.contains("address"), "{e}");
}

#[test]
fn an_address_out_of_range_names_the_tag() {
    let e = invalid(&GOOD.replace("address = 100", "address = 70000"));
    assert!(e.contains("modbus.devices[0].tags[0].address"), "{e}");
}

#[test]
fn a_type_that_does_not_fit_the_table_is_refused() {
    let e = invalid(&GOOD.replace(
        "table = \"holding\"\naddress = 100",
        "table = \"coil\"\naddress = 100",
    ));
    assert!(e.contains("modbus.devices[0].tags[0]"), "{e}");
}

#[test]
fn duplicate_names_are_refused() {
    let e = invalid(&GOOD.replace("name = \"setpoint\"", "name = \"temperature\""));
    assert!(e.contains("duplicate tag name"), "{e}");
}

#[test]
fn a_bridge_to_a_tag_not_marked_writable_is_refused() {
    let e = invalid(&GOOD.replace("writable = true", ""));
    assert!(e.contains("bridges[1].to"), "{e}");
}

#[test]
fn invalid_toml_is_an_error() {
    let e = invalid("[agent\ndata_dir = 1");
    assert!(e.contains("agent.toml"), "{e}");
}

#[test]
fn a_missing_file_names_the_path() {
    let e = load(Path::new("/nonexistent/agent.toml"), Vec::new()).expect_err("missing");
    assert!(e.to_string().contains("/nonexistent/agent.toml"), "{e}");
}

#[test]
fn hub_variables_in_a_shared_environment_are_ignored() {
    let c = load_str(
        GOOD,
        &[
            ("OUTPOST_HUB__LISTEN", "0.0.0.0:7443"),
            ("OUTPOST_OUTBOX__MAX_BYTES", "1GiB"),
        ],
    )
    .expect("valid");
    assert_eq!(c.outbox.max_bytes, 1 << 30);
}

#[test]
fn an_unknown_key_in_an_agent_section_from_the_environment_is_refused() {
    let e = load_str(GOOD, &[("OUTPOST_OUTBOX__MAX_BYTS", "1GiB")]).expect_err("unknown key");
    assert!(e.to_string().contains("max_byts"), "{e}");
}

#[test]
fn publish_options_on_a_write_bridge_are_refused() {
    let e = invalid(&GOOD.replace(
        "to = \"modbus:plc1/setpoint\"",
        "to = \"modbus:plc1/setpoint\"\nformat = \"raw\"",
    ));
    assert!(e.contains("bridges[1].format"), "{e}");
}

#[test]
fn backoff_bounds_must_be_ordered() {
    let e = invalid(&GOOD.replace(
        "address = \"127.0.0.1:502\"",
        "address = \"127.0.0.1:502\"\nbackoff = \"1m\"\nbackoff_max = \"1s\"",
    ));
    assert!(e.contains("modbus.devices[0].backoff"), "{e}");
}

const OPCUA: &str = r#"
[agent]
data_dir = "data"

[[opcua.servers]]
name = "press"
endpoint = "opc.tcp://10.0.0.5:4840"
security_policy = "Basic256Sha256"
security_mode = "SignAndEncrypt"
certificate = "pki/agent.der"
private_key = "pki/agent-key.pem"
trusted_server_certificates = ["pki/press.der"]
username = "operator"
password_file = "press.pass"
items_per_subscription = 2
[[opcua.servers.nodes]]
node_id = "ns=2;s=Temperature"
stream = "press/temperature"
deadband = 0.5
[[opcua.servers.nodes]]
node_id = "i=2258"
[[opcua.servers.nodes]]
node_id = "ns=3;i=7"
sampling_interval = "250ms"
queue_size = 50
"#;

#[cfg(feature = "opcua")]
#[test]
fn an_opcua_server_validates_with_its_paths_resolved() {
    let c = load_str(OPCUA, &[]).expect("valid");
    let s = &c.opcua_servers[0];
    assert_eq!(s.nodes.len(), 3);
    assert_eq!(s.subscriptions(), 2);
    assert_eq!(s.nodes[1].stream.as_str(), "press/i=2258");
    assert_eq!(
        s.nodes[2].sampling_interval,
        Some(Duration::from_millis(250))
    );
    assert!(s.trusted_server_certificates[0].is_absolute());
    assert!(matches!(
        &s.identity,
        crate::config::opcua::Identity::UserPassword { username, password_file }
            if username == "operator" && password_file.ends_with("press.pass")
    ));
}

#[cfg(feature = "opcua")]
#[test]
fn opcua_mistakes_name_their_key() {
    for (from, to, key) in [
        (
            "opc.tcp://10.0.0.5:4840",
            "http://10.0.0.5",
            "opcua.servers[0].endpoint",
        ),
        (
            "\"Basic256Sha256\"",
            "\"Basic128Rsa15\"",
            "opcua.servers[0].security_policy",
        ),
        (
            "\"SignAndEncrypt\"",
            "\"None\"",
            "opcua.servers[0].security_mode",
        ),
        (
            "certificate = \"pki/agent.der\"\n",
            "",
            "opcua.servers[0].certificate",
        ),
        (
            "trusted_server_certificates = [\"pki/press.der\"]\n",
            "",
            "opcua.servers[0].trusted_server_certificates",
        ),
        (
            "pki/press.der",
            "pki/press.crt",
            "opcua.servers[0].trusted_server_certificates[0]",
        ),
        (
            "password_file = \"press.pass\"\n",
            "",
            "opcua.servers[0].password_file",
        ),
        (
            "ns=2;s=Temperature",
            "ns=2;x=Temperature",
            "opcua.servers[0].nodes[0].node_id",
        ),
        (
            "deadband = 0.5",
            "deadband = -1.0",
            "opcua.servers[0].nodes[0].deadband",
        ),
        (
            "queue_size = 50",
            "queue_size = 0",
            "opcua.servers[0].nodes[2].queue_size",
        ),
        (
            "stream = \"press/temperature\"",
            "stream = \"press/i=2258\"",
            "opcua.servers[0].nodes[1].stream",
        ),
        (
            "items_per_subscription = 2",
            "items_per_subscription = 0",
            "opcua.servers[0].items_per_subscription",
        ),
    ] {
        assert!(OPCUA.contains(from), "{from}");
        let e = invalid(&OPCUA.replacen(from, to, 1));
        assert!(e.contains(key), "{from} -> {to}: {e}");
    }
}

/// The packages ship the agent without OPC UA: a config that names a server
/// must say so, and which package has it, rather than run without the data.
#[cfg(not(feature = "opcua"))]
#[test]
fn an_opcua_server_is_refused_naming_the_package_with_opcua() {
    let e = invalid(OPCUA);
    assert!(e.contains("opcua.servers"), "{e}");
    assert!(e.contains("outpost-agent-opcua"), "{e}");
}

/// An empty `[opcua]` costs nothing and is accepted by both builds.
#[test]
fn no_opcua_server_is_accepted_by_every_build() {
    let c = load_str(&format!("{GOOD}\n[opcua]\n"), &[]).expect("valid");
    assert!(c.opcua_servers.is_empty());
}

#[test]
fn sparkplug_groups_become_filters_and_bad_ones_name_their_key() {
    let with = |entry: &str| {
        GOOD.replace(
            "[[modbus.devices]]",
            &format!("{entry}\n[[modbus.devices]]"),
        )
    };
    let c = load_str(
        &with(
            "[[mqtt.sparkplug]]\n[[mqtt.sparkplug]]\ngroup = \"plant1\"\nqos = 0\nrebirth = false",
        ),
        &[],
    )
    .expect("valid");
    let sp = c.mqtt.expect("mqtt").sparkplug;
    assert_eq!(sp[0].filter.as_str(), "spBv1.0/+/#");
    assert!(sp[0].rebirth);
    assert_eq!(sp[0].rebirth_interval, Duration::from_secs(5));
    assert_eq!(sp[1].filter.as_str(), "spBv1.0/plant1/#");
    assert_eq!(sp[1].qos, 0);
    assert!(!sp[1].rebirth);
    for (entry, key) in [
        ("group = \"a/b\"", "mqtt.sparkplug[0].group"),
        ("group = \"p#\"", "mqtt.sparkplug[0].group"),
        ("group = \"STATE\"", "mqtt.sparkplug[0].group"),
        ("group = \"\"", "mqtt.sparkplug[0].group"),
        ("qos = 2", "mqtt.sparkplug[0].qos"),
        (
            "rebirth_interval = \"0s\"",
            "mqtt.sparkplug[0].rebirth_interval",
        ),
        ("hostid = \"x\"", "hostid"),
    ] {
        let e = invalid(&with(&format!("[[mqtt.sparkplug]]\n{entry}")));
        assert!(e.contains(key), "{entry}: {e}");
    }
}

/// GOOD's write bridge without its waiver, and `mqtt` keys added to
/// `[mqtt]` (before its subscription).
fn write_bridge_with(mqtt: &str) -> String {
    GOOD.replace("allow_unauthenticated_writes = true\n", "")
        .replace("[[mqtt.subscribe]]", &format!("{mqtt}\n[[mqtt.subscribe]]"))
}

#[test]
fn a_write_bridge_without_tls_and_login_is_refused_naming_the_bridge_and_what_is_missing() {
    for (mqtt, missing) in [
        ("", "[mqtt] has no TLS ([mqtt.tls]) and no login"),
        (
            "username = \"agent\"\npassword = \"pw\"",
            "[mqtt] has no TLS ([mqtt.tls]):",
        ),
        ("[mqtt.tls]\nca = \"ca.pem\"", "no login"),
        (
            "username = \"agent\"\n[mqtt.tls]\nca = \"ca.pem\"",
            "no login",
        ),
    ] {
        let e = invalid(&write_bridge_with(mqtt));
        assert!(e.contains("agent.toml: bridges[1]: "), "{mqtt}: {e}");
        assert!(
            e.contains("\"mqtt:plant/plc1/setpoint/set\""),
            "{mqtt}: {e}"
        );
        assert!(e.contains(missing), "{mqtt}: {e}");
        assert!(e.contains("allow_unauthenticated_writes"), "{mqtt}: {e}");
    }
}

#[test]
fn a_write_bridge_over_tls_with_a_login_or_a_client_certificate_is_accepted_without_warning() {
    for mqtt in [
        "username = \"agent\"\npassword = \"pw\"\n[mqtt.tls]\nca = \"ca.pem\"",
        "[mqtt.tls]\nca = \"ca.pem\"\ncert = \"agent.pem\"\nkey = \"agent.key\"",
    ] {
        let c = load_str(&write_bridge_with(mqtt), &[]).expect("valid");
        assert_eq!(c.write_bridges.len(), 1);
        assert!(c.warnings.is_empty(), "{mqtt}: {:?}", c.warnings);
    }
}

#[test]
fn allow_unauthenticated_writes_is_accepted_with_a_warning_naming_the_bridge() {
    let c = load_str(GOOD, &[]).expect("valid");
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    let w = &c.warnings[0];
    assert!(
        w.contains("agent.toml: bridges[1].allow_unauthenticated_writes: "),
        "{w}"
    );
    assert!(w.contains("plant/plc1/setpoint/set"), "{w}");
    assert!(w.contains("no TLS ([mqtt.tls]) and no login"), "{w}");
    // `false` is no waiver.
    let e = invalid(&GOOD.replace(
        "allow_unauthenticated_writes = true",
        "allow_unauthenticated_writes = false",
    ));
    assert!(e.contains("bridges[1]: "), "{e}");
}

#[test]
fn a_write_bridge_from_a_wildcard_topic_is_refused() {
    for from in ["plant/+/setpoint/set", "plant/plc1/#", "#"] {
        let e = invalid(&GOOD.replace("plant/plc1/setpoint/set", from));
        assert!(e.contains("bridges[1].from: "), "{from}: {e}");
        assert!(e.contains("wildcards"), "{from}: {e}");
    }
}

#[test]
fn the_waiver_on_a_publish_bridge_is_refused() {
    let e = invalid(&GOOD.replace(
        "to = \"mqtt:plant/{device}/{tag}\"",
        "to = \"mqtt:plant/{device}/{tag}\"\nallow_unauthenticated_writes = true",
    ));
    assert!(e.contains("bridges[0].allow_unauthenticated_writes"), "{e}");
}

#[test]
fn a_subscription_to_the_reserved_namespace_is_refused() {
    for filter in ["$outpost/#", "$outpost/bridge/writes", "$outpost"] {
        let e = invalid(&GOOD.replace("filter = \"plant/#\"", &format!("filter = \"{filter}\"")));
        assert!(e.contains("mqtt.subscribe[0].filter"), "{filter}: {e}");
    }
    // `$SYS` and the like stay the site's business.
    load_str(
        &GOOD.replace("filter = \"plant/#\"", "filter = \"$SYS/#\""),
        &[],
    )
    .expect("valid");
}
