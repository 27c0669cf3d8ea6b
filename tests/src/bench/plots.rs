//! The figures people would rather look at than read: a drain's throughput
//! and memory over time, and the bridge latency histograms, as SVG.
//!
//! plotters draws them; without a font feature its SVG backend writes text as
//! `<text>` elements the viewer renders, so no font library is linked into
//! the harness.

use std::path::Path;

use anyhow::{anyhow, ensure, Result};
use plotters::prelude::*;

use super::uplink::TracePoint;

/// One figure's size in pixels.
const SIZE: (u32, u32) = (900, 620);

/// The colours of the series, in order.
const COLOURS: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
];

/// plotters' errors borrow the backend's; the harness wants one message.
fn err<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> anyhow::Error {
    move |e| anyhow!("{what}: {e}")
}

/// Throughput (events/s over each interval between points) of a drain.
fn throughput(trace: &[TracePoint]) -> Vec<(f64, f64)> {
    trace
        .windows(2)
        .filter_map(|w| {
            let dt = w[1].at.saturating_sub(w[0].at).as_secs_f64();
            (dt > 0.0).then(|| {
                let events = w[1].stored.saturating_sub(w[0].stored) as f64;
                (w[1].at.as_secs_f64(), events / dt)
            })
        })
        .collect()
}

/// The drain's throughput (top) and both processes' VmRSS (bottom) over
/// time, into `path`.
pub(crate) fn drain(path: &Path, title: &str, trace: &[TracePoint]) -> Result<()> {
    ensure!(trace.len() >= 2, "a drain trace needs two points at least");
    let rates = throughput(trace);
    let end = trace.last().map_or(1.0, |p| p.at.as_secs_f64()).max(0.1);
    let top_rate = rates.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let mb = |kib: u64| kib as f64 * 1024.0 / 1e6;
    let top_rss = trace
        .iter()
        .map(|p| mb(p.agent_rss_kib.max(p.hub_rss_kib)))
        .fold(1.0, f64::max)
        * 1.1;

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err("plot"))?;
    let root = root
        .titled(title, ("sans-serif", 18))
        .map_err(err("plot"))?;
    let (upper, lower) = root.split_vertically(SIZE.1 / 2 - 10);

    let mut chart = ChartBuilder::on(&upper)
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..end, 0.0..top_rate)
        .map_err(err("plot"))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the agent started")
        .y_desc("events/s durable at the hub")
        .y_label_formatter(&|v| super::report::thousands(*v))
        .draw()
        .map_err(err("plot"))?;
    chart
        .draw_series(LineSeries::new(rates, COLOURS[0].stroke_width(2)))
        .map_err(err("plot"))?;

    let mut chart = ChartBuilder::on(&lower)
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..end, 0.0..top_rss)
        .map_err(err("plot"))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the agent started")
        .y_desc("VmRSS, MB")
        .draw()
        .map_err(err("plot"))?;
    type Field = fn(&TracePoint) -> u64;
    let series: [(&str, Field); 2] = [
        ("outpost-agent", |p| p.agent_rss_kib),
        ("outpost-hub", |p| p.hub_rss_kib),
    ];
    for (i, (name, field)) in series.into_iter().enumerate() {
        let colour = COLOURS[i + 1];
        chart
            .draw_series(LineSeries::new(
                trace.iter().map(|p| (p.at.as_secs_f64(), mb(field(p)))),
                colour.stroke_width(2),
            ))
            .map_err(err("plot"))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(err("plot"))?;
    root.present().map_err(err("write the plot"))?;
    Ok(())
}

/// How many histogram buckets span the range.
const BUCKETS: usize = 40;

/// Latency histograms of several tools on one set of axes, each as the share
/// of its own samples per bucket (so tools with different counts compare),
/// into `path`. The range ends at the largest p99, so one slow outlier does not
/// squash the rest; samples beyond it fall into the last bucket.
pub(crate) fn latency(path: &Path, title: &str, tools: &[(&str, &[f64])]) -> Result<()> {
    let tools: Vec<_> = tools.iter().filter(|(_, s)| !s.is_empty()).collect();
    ensure!(!tools.is_empty(), "no latency samples to plot");
    let p99 = |s: &[f64]| {
        let mut v = s.to_vec();
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * 0.99).round() as usize]
    };
    let end = tools.iter().map(|(_, s)| p99(s)).fold(1.0, f64::max) * 1.05;
    let width = end / BUCKETS as f64;
    let shares: Vec<Vec<f64>> = tools
        .iter()
        .map(|(_, s)| {
            let mut counts = vec![0u64; BUCKETS];
            for &v in s.iter() {
                let b = ((v.max(0.0) / width) as usize).min(BUCKETS - 1);
                counts[b] += 1;
            }
            counts
                .iter()
                .map(|&c| 100.0 * c as f64 / s.len() as f64)
                .collect()
        })
        .collect();
    let top = shares.iter().flatten().copied().fold(1.0, f64::max) * 1.1;

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err("plot"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..end, 0.0..top)
        .map_err(err("plot"))?;
    chart
        .configure_mesh()
        .x_desc("milliseconds from the register's change to the MQTT message")
        .y_desc("% of the tool's samples")
        .draw()
        .map_err(err("plot"))?;
    for (i, ((name, samples), share)) in tools.iter().zip(&shares).enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        // Bars side by side within each bucket, one slot per tool.
        let slot = width / tools.len() as f64;
        chart
            .draw_series(share.iter().enumerate().map(|(b, &pct)| {
                let x0 = b as f64 * width + i as f64 * slot;
                Rectangle::new(
                    [(x0, 0.0), (x0 + slot * 0.9, pct)],
                    colour.mix(0.8).filled(),
                )
            }))
            .map_err(err("plot"))?
            .label(format!("{name} ({} samples)", samples.len()))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err("plot"))?;
    root.present().map_err(err("write the plot"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn point(ms: u64, stored: u64) -> TracePoint {
        TracePoint {
            at: Duration::from_millis(ms),
            stored,
            agent_rss_kib: 10_000,
            hub_rss_kib: 20_000,
        }
    }

    #[test]
    fn throughput_is_the_rate_between_points() {
        let t = [point(0, 0), point(100, 1_000), point(300, 1_000)];
        assert_eq!(throughput(&t), vec![(0.1, 10_000.0), (0.3, 0.0)]);
    }

    #[test]
    fn both_figures_are_written_as_svg() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let d = dir.path().join("drain.svg");
        drain(
            &d,
            "drain",
            &[point(0, 0), point(100, 500), point(200, 900)],
        )?;
        let l = dir.path().join("latency.svg");
        latency(
            &l,
            "latency",
            &[("a", &[1.0, 2.0, 50.0][..]), ("b", &[3.0][..])],
        )?;
        for f in [d, l] {
            let svg = std::fs::read_to_string(&f)?;
            assert!(svg.starts_with("<svg"), "{}", f.display());
            assert!(svg.contains("<text"), "labels in {}", f.display());
        }
        Ok(())
    }
}
