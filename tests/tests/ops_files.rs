//! The ops files in `packaging/`: the Grafana dashboard is JSON Grafana can
//! import, and every metric it and the Prometheus alerting rules name is
//! one docs/metrics.md documents (and so one the binaries expose, or the
//! audit textfile the rules' comment describes). `promtool check rules` and
//! `promtool test rules` run in tests/run.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{ensure, Context as _, Result};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `outpost_*` name in `text`, without a histogram's series suffix.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("outpost_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let name = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.insert(name.to_owned());
        rest = &tail[end..];
    }
    out
}

#[test]
fn the_dashboard_and_the_rules_name_only_documented_metrics() -> Result<()> {
    let dashboard =
        std::fs::read_to_string(root().join("packaging/grafana/outpost-dashboard.json"))?;
    let json: serde_json::Value =
        serde_json::from_str(&dashboard).context("the dashboard is not JSON")?;
    let panels = json["panels"].as_array().context("no panels")?;
    ensure!(!panels.is_empty() && json["title"].is_string() && json["uid"].is_string());
    let mut exprs = String::new();
    for p in panels {
        let targets = p["targets"].as_array().context("a panel without targets")?;
        ensure!(!targets.is_empty(), "{p}");
        for t in targets {
            exprs.push_str(t["expr"].as_str().context("a target without expr")?);
            exprs.push('\n');
        }
    }
    let rules = std::fs::read_to_string(root().join("packaging/prometheus/outpost-rules.yml"))?;
    let docs = std::fs::read_to_string(root().join("docs/metrics.md"))?;
    let documented = metric_names(&docs);
    let named: BTreeSet<String> = metric_names(&exprs)
        .into_iter()
        .chain(metric_names(&rules))
        .collect();
    ensure!(named.len() > 10, "{named:?}");
    let missing: Vec<&String> = named
        .iter()
        .filter(|n| !documented.contains(*n) && !documented.contains(&format!("{n}_total")))
        .collect();
    ensure!(
        missing.is_empty(),
        "named in packaging/ but not in docs/metrics.md: {missing:?}"
    );
    // Counters are named with their `_total` in queries.
    for n in &named {
        if documented.contains(&format!("{n}_total")) {
            anyhow::bail!("{n} is a counter: query it as {n}_total");
        }
    }
    Ok(())
}
