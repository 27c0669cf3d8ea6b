//! The report: rows of the Markdown table, number formatting, and the facts
//! about the machine that make a result comparable.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Whether a row met its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The target was met.
    Pass,
    /// The target was missed (still a valid measurement).
    Fail,
    /// No target: reported for context.
    Info,
    /// The measurement could not be taken.
    Error,
}

impl Verdict {
    pub(crate) fn from_bool(ok: bool) -> Verdict {
        if ok {
            Verdict::Pass
        } else {
            Verdict::Fail
        }
    }

    /// The verdict's name in the JSON report.
    fn key(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Info => "info",
            Verdict::Error => "error",
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "**FAIL**",
            Verdict::Info => "info",
            Verdict::Error => "**ERROR**",
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) what: String,
    pub(crate) ours: String,
    pub(crate) baseline: String,
    pub(crate) ratio: String,
    pub(crate) target: String,
    pub(crate) verdict: Verdict,
}

impl Row {
    /// A row for a measurement that could not be taken.
    pub(crate) fn error(what: &str, error: &anyhow::Error) -> Row {
        // One line, and no pipe characters that would break the table.
        let msg = format!("{error:#}").replace(['\n', '|'], " ");
        Row {
            what: what.to_owned(),
            ours: format!("error: {msg}"),
            baseline: "-".into(),
            ratio: "-".into(),
            target: "-".into(),
            verdict: Verdict::Error,
        }
    }
}

/// The fewest rounds a ratio's verdict rests on (issue 24): fewer (a
/// `--quick` run) report the figures without a verdict.
pub(crate) const MIN_ROUNDS: usize = 3;

/// A goal from issue 24's table, which a row passes or fails.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Goal {
    /// The figure is at least this.
    AtLeast(f64),
    /// The figure is at most this.
    AtMost(f64),
}

impl Goal {
    /// Whether `v` meets the goal.
    pub(crate) fn met(self, v: f64) -> bool {
        match self {
            Goal::AtLeast(g) => v >= g,
            Goal::AtMost(g) => v <= g,
        }
    }

    /// The goal as the target column says it, with the gap of a miss
    /// (`v` printed by `fmt`).
    pub(crate) fn target(self, v: f64, fmt: impl Fn(f64) -> String) -> String {
        match self {
            Goal::AtLeast(g) if v < g => format!("≥ {}: short by {}", fmt(g), fmt(g - v)),
            Goal::AtMost(g) if v > g => format!("≤ {}: over by {}", fmt(g), fmt(v - g)),
            Goal::AtLeast(g) => format!("≥ {}", fmt(g)),
            Goal::AtMost(g) => format!("≤ {}", fmt(g)),
        }
    }
}

/// A row comparing ours with a baseline over rounds in which the two were
/// measured one after the other (`rounds`: each round's (ours, baseline)).
/// The ratio is the median of the rounds' ratios, and every round's ratio
/// is printed beside it; the verdict holds it to `goal`, and needs at least
/// [`MIN_ROUNDS`] rounds. `unit` follows each rate (`/s`).
pub(crate) fn ratio_row(what: String, unit: &str, rounds: &[(f64, f64)], goal: Goal) -> Row {
    let ours: Vec<f64> = rounds.iter().map(|r| r.0).collect();
    let base: Vec<f64> = rounds.iter().map(|r| r.1).collect();
    let ratios: Vec<f64> = rounds.iter().map(|(o, b)| o / b).collect();
    let r = median(&ratios);
    // Three digits: a ratio just under the goal must not print as the goal.
    let each: Vec<String> = ratios.iter().map(|x| format!("{x:.3}")).collect();
    let mut target = goal.target(r, |x| format!("{x:.3}"));
    let verdict = if rounds.len() < MIN_ROUNDS {
        target.push_str(&format!(
            " ({} round{}: no verdict, it takes {MIN_ROUNDS})",
            rounds.len(),
            if rounds.len() == 1 { "" } else { "s" }
        ));
        Verdict::Info
    } else {
        Verdict::from_bool(goal.met(r))
    };
    Row {
        what,
        ours: format!("{}{unit}", thousands(median(&ours))),
        baseline: format!("{}{unit}", thousands(median(&base))),
        ratio: format!("{r:.3} (rounds {})", each.join(" / ")),
        target,
        verdict,
    }
}

/// The Markdown table.
pub(crate) fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str("| what | ours | baseline | ratio | target | result |\n");
    s.push_str("| --- | ---: | ---: | ---: | --- | --- |\n");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            r.what,
            r.ours,
            r.baseline,
            r.ratio,
            r.target,
            r.verdict.as_str()
        );
    }
    s
}

/// What the JSON report says about the run besides its rows.
pub(crate) struct Meta<'a> {
    pub(crate) quick: bool,
    pub(crate) args: &'a [String],
    /// `machine()`'s Markdown lines.
    pub(crate) machine: &'a str,
    pub(crate) load_before: &'a str,
    pub(crate) load_after: &'a str,
    pub(crate) agent: &'a str,
    pub(crate) hub: &'a str,
    pub(crate) broker: &'a str,
    pub(crate) seconds: f64,
    /// The figures written beside the report.
    pub(crate) figures: &'a [String],
}

/// The report as JSON, for whoever wants the figures without parsing the
/// table: each row as printed, plus its ratio as a number where it is one.
pub(crate) fn json(rows: &[Row], meta: &Meta<'_>) -> serde_json::Value {
    let rows: Vec<_> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "what": r.what,
                "ours": r.ours,
                "baseline": r.baseline,
                "ratio": r.ratio,
                "ratio_value": r.ratio.split(' ').next().and_then(|v| v.parse::<f64>().ok()).filter(|v| v.is_finite()),
                "target": r.target,
                "result": r.verdict.key(),
            })
        })
        .collect();
    let machine: Vec<&str> = meta
        .machine
        .lines()
        .map(|l| l.trim_start_matches("- "))
        .collect();
    serde_json::json!({
        "run": if meta.quick { "quick" } else { "full" },
        "args": meta.args,
        "machine": machine,
        "load_average": { "before": meta.load_before, "after": meta.load_after },
        "agent": meta.agent,
        "hub": meta.hub,
        "broker": meta.broker,
        "seconds": meta.seconds.round(),
        "figures": meta.figures,
        "rows": rows,
    })
}

/// `1234567.8` → `1,234,568`.
pub(crate) fn thousands(v: f64) -> String {
    let n = v.round().max(0.0) as u64;
    let digits = n.to_string();
    let (head, rest) = digits.split_at(digits.len() % 3);
    let mut groups: Vec<&str> = Vec::with_capacity(digits.len() / 3 + 1);
    if !head.is_empty() {
        groups.push(head);
    }
    groups.extend(
        rest.as_bytes()
            .chunks(3)
            .filter_map(|c| std::str::from_utf8(c).ok()),
    );
    groups.join(",")
}

/// Events per second.
pub(crate) fn per_sec(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// The median of some samples (the mean of the middle two for an even count).
pub(crate) fn median(samples: &[f64]) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Samples as `1,234/s, 1,300/s, 1,250/s` for the notes.
pub(crate) fn samples(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{}/s", thousands(*x)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The first line a command prints (stdout, else stderr), or `?`.
pub(crate) fn command_line(exe: &str, args: &[&str]) -> String {
    match Command::new(exe).args(args).output() {
        Ok(out) => {
            let text = if out.stdout.is_empty() {
                out.stderr
            } else {
                out.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("?")
                .trim()
                .to_owned()
        }
        Err(_) => "?".into(),
    }
}

/// The facts about the machine, as Markdown bullet lines.
pub(crate) fn machine(tmp: &Path) -> String {
    let cpus = command_line("nproc", &[]);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_else(|| "?".into());
    let kernel = command_line("uname", &["-sr"]);
    let fs = Command::new("df")
        .arg("--output=fstype")
        .arg(tmp)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .map(|l| l.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into());
    let mut s = String::new();
    let _ = writeln!(s, "- CPU: {model}, `nproc` = {cpus}");
    let _ = writeln!(s, "- Memory: {mem}; kernel: {kernel}");
    let _ = writeln!(
        s,
        "- Scratch directory: `{}` on {fs}{}",
        tmp.display(),
        if fs == "tmpfs" {
            " (**tmpfs: fsync is free here, durable-append numbers are meaningless**)"
        } else {
            ""
        }
    );
    s
}

/// `/proc/loadavg`'s first three fields.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits_by_three() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }

    #[test]
    fn json_carries_every_row_and_numeric_ratios() {
        let row = |ratio: &str, verdict| Row {
            what: "w".into(),
            ours: "1/s".into(),
            baseline: "2/s".into(),
            ratio: ratio.into(),
            target: "-".into(),
            verdict,
        };
        let rows = [row("0.50", Verdict::Pass), row("-", Verdict::Error)];
        let v = json(
            &rows,
            &Meta {
                quick: true,
                args: &[],
                machine: "- CPU: x\n- Memory: y\n",
                load_before: "0.1",
                load_after: "0.2",
                agent: "a",
                hub: "h",
                broker: "b",
                seconds: 1.4,
                figures: &[],
            },
        );
        assert_eq!(v["rows"][0]["ratio_value"], 0.5);
        assert_eq!(v["rows"][0]["result"], "pass");
        assert!(v["rows"][1]["ratio_value"].is_null());
        assert_eq!(v["rows"][1]["result"], "error");
        assert_eq!(v["machine"][1], "Memory: y");
        assert_eq!(v["run"], "quick");
    }

    #[test]
    fn a_ratio_row_takes_the_median_round_and_says_the_gap_of_a_miss() {
        let rounds = [(80.0, 100.0), (95.0, 100.0), (85.0, 100.0)];
        let r = ratio_row("x".into(), "/s", &rounds, Goal::AtLeast(0.9));
        assert_eq!(r.verdict, Verdict::Fail);
        assert_eq!(r.ratio, "0.850 (rounds 0.800 / 0.950 / 0.850)");
        assert_eq!(r.target, "≥ 0.900: short by 0.050");
        let r = ratio_row("x".into(), "/s", &rounds[1..2], Goal::AtLeast(0.9));
        assert_eq!(r.verdict, Verdict::Info, "one round gives no verdict");
        assert!(Goal::AtMost(50.0).met(50.0) && !Goal::AtMost(50.0).met(50.1));
    }

    #[test]
    fn median_takes_the_middle_sample() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
