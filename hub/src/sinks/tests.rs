use std::collections::BTreeMap;
use std::sync::Arc;

use outpost_protocols::{AgentId, Event, EventBody, Quality, Seq, StreamName, Timestamp, Value};

use super::*;

fn event(stream: &str, value: Value) -> SinkEvent {
    let mut labels = BTreeMap::new();
    labels.insert("site".to_owned(), "lyon".to_owned());
    SinkEvent {
        queued_at: 0,
        event: Event {
            agent_id: AgentId::parse("gw-1").expect("id"),
            seq: Seq(42),
            body: EventBody {
                stream: StreamName::parse(stream).expect("stream"),
                ts: Timestamp(7),
                value,
                quality: Quality::Good,
                attrs: BTreeMap::new(),
            },
        },
        labels: Arc::new(labels),
    }
}

#[test]
fn templates_expand_identity_stream_and_labels() {
    let e = event("plc1/temp", Value::F64(1.5));
    assert_eq!(
        expand("fleet/{label.site}/{agent_id}/{stream}#{seq}", &e),
        "fleet/lyon/gw-1/plc1/temp#42"
    );
    assert_eq!(expand("x/{label.missing}/y", &e), "x/_/y");
    assert_eq!(expand("no placeholders", &e), "no placeholders");
    assert_eq!(expand("open {brace", &e), "open {brace");
}

#[test]
fn templates_with_unknown_placeholders_are_refused() {
    assert!(check_template("a/{agent_id}/{stream}/{seq}/{label.x}").is_ok());
    let e = check_template("a/{agnet_id}").expect_err("typo");
    assert!(e.contains("{agnet_id}"), "{e}");
    assert!(check_template("a/{label.}").is_err());
    assert!(check_template("a/{stream").is_err());
}

#[test]
fn payloads_are_the_tail_object_or_the_raw_value() {
    let e = event("s", Value::String("hello".into()));
    let j: serde_json::Value =
        serde_json::from_slice(&payload(&e, PayloadFormat::Json)).expect("json");
    assert_eq!(j["agent_id"], "gw-1");
    assert_eq!(j["seq"], 42);
    assert_eq!(j["value"], "hello");
    assert_eq!(payload(&e, PayloadFormat::Raw), b"hello");
    let n = event("s", Value::I64(-3));
    assert_eq!(payload(&n, PayloadFormat::Raw), b"-3");
}

#[test]
fn a_sink_config_reads_its_kind_table() {
    let c: SinkConfig = toml::from_str(
        r#"
id = "cloud"
kind = "mqtt"
region = "eu-west"
[mqtt]
broker = "127.0.0.1:8883"
client_id = "hub-1"
"#,
    )
    .expect("config");
    assert_eq!(c.batch_max, 500);
    let SinkKind::Mqtt(m) = c.kind else {
        panic!("mqtt table");
    };
    assert_eq!(m.topic, "outpost/{agent_id}/{stream}");
    assert_eq!(m.payload, PayloadFormat::Json);
    let unknown = toml::from_str::<SinkConfig>("id = \"x\"\nkind = \"mqtt\"\nbogus = 1\n");
    assert!(unknown.is_err());
}
