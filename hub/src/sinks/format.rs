//! How an event leaves the hub: a topic or subject made from a template
//! (`{agent_id}`, `{stream}`, `{seq}`, `{label.<name>}`), and a payload in
//! the format a sink is configured for.

use outpost_protocols::Value;
use serde::Deserialize;

use super::cloudevents;
use super::sink::SinkEvent;

/// How a payload is written: the event as JSON, or the value's own bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// `{"agent_id", "seq", "stream", "ts", "quality", "value", ...}`.
    #[default]
    Json,
    /// The value as published (JSON text, a string's bytes, raw bytes);
    /// numbers and booleans as their JSON text.
    Raw,
    /// A CloudEvents 1.0 event in structured mode (`super::cloudevents`).
    CloudEvents,
}

/// Expands a topic or subject template for one event. `{label.x}` of a label
/// the agent does not have becomes `_`, so that a topic never has an empty
/// level.
pub fn expand(template: &str, event: &SinkEvent) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) => {
                let name = &after[..close];
                match name {
                    "agent_id" => out.push_str(event.event.agent_id.as_str()),
                    "stream" => out.push_str(event.event.body.stream.as_str()),
                    "seq" => out.push_str(&event.event.seq.0.to_string()),
                    _ => match name.strip_prefix("label.") {
                        Some(l) => out.push_str(
                            event
                                .labels
                                .get(l)
                                .map(String::as_str)
                                .filter(|v| !v.is_empty())
                                .unwrap_or("_"),
                        ),
                        None => {
                            out.push('{');
                            out.push_str(name);
                            out.push('}');
                        }
                    },
                }
                rest = &after[close + 1..];
            }
            None => {
                out.push_str(&rest[open..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Checks a template's placeholders; the message names the bad one.
pub fn check_template(template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("{template:?}: '{{' without '}}'"))?;
        let name = &after[..close];
        let ok = matches!(name, "agent_id" | "stream" | "seq")
            || name.strip_prefix("label.").is_some_and(|l| !l.is_empty());
        if !ok {
            return Err(format!(
                "{template:?}: unknown placeholder {{{name}}}; use {{agent_id}}, {{stream}}, {{seq}} or {{label.<name>}}"
            ));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

/// The payload of one event in `format`: `json` is the object `events tail`
/// prints (`agent_id`, `seq`, `stream`, `ts`, `value`, `quality`, `attrs`);
/// `cloudevents` is one structured CloudEvent.
pub fn payload(event: &SinkEvent, format: PayloadFormat) -> Vec<u8> {
    match format {
        PayloadFormat::Json => {
            let mut out = Vec::with_capacity(128 + event.event.body.value.payload_len());
            event.event.write_json(&mut out);
            out
        }
        PayloadFormat::Raw => match &event.event.body.value {
            Value::Json(j) => j.as_str().as_bytes().to_vec(),
            Value::String(s) => s.as_bytes().to_vec(),
            Value::Bytes(b) => b.clone(),
            other => {
                let mut out = Vec::new();
                other.write_json(&mut out);
                out
            }
        },
        PayloadFormat::CloudEvents => cloudevents::structured(event),
    }
}
