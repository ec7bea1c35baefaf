//! The SVG chart: median IOPS by workload, one bar per column (a contender with a client
//! pattern; resubmit in a paler shade of the contender's colour) in each group, on a log
//! scale so that 128k streams and 4k QD32 fit on one axis; a legend on the right.

// Chart geometry: a few dozen bars and their figures.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_precision_loss
)]

use std::path::Path;

use plotters::coord::combinators::IntoLogRange;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::contenders::{Contender, Server};
use super::pattern::Pattern;
use super::report::Report;

/// Colour of a contender's bars: greys for the limit, blues and green for ours,
/// oranges and pink for qemu-storage-daemon.
fn colour(name: &str) -> RGBColor {
    match name {
        "limit" => RGBColor(110, 110, 110),
        "ours-io_uring" => RGBColor(31, 119, 180),
        "ours-native" => RGBColor(86, 180, 233),
        "ours-null" => RGBColor(0, 158, 115),
        "qsd-io_uring" => RGBColor(213, 94, 0),
        "qsd-native" => RGBColor(230, 159, 0),
        _ => RGBColor(204, 121, 167),
    }
}

/// The colour of a column: the contender's, paler for the resubmit pattern.
fn shade(name: &str, pattern: Pattern) -> RGBColor {
    let RGBColor(r, g, b) = colour(name);
    match pattern {
        Pattern::Batch => RGBColor(r, g, b),
        Pattern::Resubmit => {
            let pale = |c: u8| c + (255 - c) / 2;
            RGBColor(pale(r), pale(g), pale(b))
        }
    }
}

/// The legend's name of a column (`ours-null resubmit`; the limit only ever batches).
fn series_name(c: &Contender, pattern: Pattern) -> String {
    if c.server == Server::Host {
        c.name.to_string()
    } else {
        format!("{} {}", c.name, pattern.as_str())
    }
}

/// `123k`-style value labels (`1M`, not `1.0M`).
fn short(v: f64) -> String {
    let s = short_raw(v);
    s.replace(".0k", "k").replace(".0M", "M")
}

fn short_raw(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// Writes the chart of `report` to `path`.
pub fn write_svg(report: &Report, path: &Path) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("chart {}: {e}", path.display());
    // The bars: per workload with any result, per column with any result, in the order
    // the runner uses (pattern-major, the limit once).
    let workloads: Vec<_> = report
        .workloads
        .iter()
        .filter(|w| {
            report
                .cells
                .iter()
                .any(|c| c.workload.name == w.name && !c.runs.is_empty())
        })
        .collect();
    let mut contenders: Vec<(Contender, Pattern)> = Vec::new();
    for c in report.cells.iter().filter(|c| !c.runs.is_empty()) {
        if !contenders.contains(&(c.contender, c.pattern)) {
            contenders.push((c.contender, c.pattern));
        }
    }
    let order = |(c, p): &(Contender, Pattern)| {
        let by_pattern = report.settings.patterns.iter().position(|x| x == p);
        let by_contender = report.contenders.iter().position(|x| x == c);
        (c.server != Server::Host, by_pattern, by_contender)
    };
    contenders.sort_by_key(order);
    let iops = |w: &str, (k, p): &(Contender, Pattern)| {
        report
            .cells
            .iter()
            .find(|c| c.workload.name == w && c.contender == *k && c.pattern == *p)
            .and_then(|c| c.summary())
            .map(|s| s.iops)
            .filter(|v| *v > 0.0)
    };
    let values: Vec<f64> = workloads
        .iter()
        .flat_map(|w| contenders.iter().filter_map(|k| iops(w.name, k)))
        .collect();
    let max = values.iter().copied().fold(1.0f64, f64::max);
    let min = values.iter().copied().fold(max, f64::min);
    let lo = 10f64.powf((min / 2.0).max(1.0).log10().floor());
    let hi = max * 1.8;

    let groups = workloads.len().max(1);
    let bars = contenders.len().max(1);
    let legend_w = 220u32;
    let width = (140 + groups * bars * 28 + groups * 24).max(760) as u32 + legend_w;
    let root = SVGBackend::new(path, (width, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (plot, legend) = root.split_horizontally(width - legend_w);
    let title = format!(
        "IOPS by workload: median of {} run(s), {} s each, log scale ({} CPUs, {})",
        report.settings.repeat, report.settings.runtime_s, report.host.nproc, report.host.date
    );
    let mut chart = ChartBuilder::on(&plot)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..groups as f64, (lo..hi).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_label_formatter(&|y| short(*y))
        .y_desc("IOPS")
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| err(&e))?;
    let slot = 0.84 / bars as f64;
    for (i, w) in workloads.iter().enumerate() {
        for (j, k) in contenders.iter().enumerate() {
            let Some(v) = iops(w.name, k) else {
                continue;
            };
            let x0 = i as f64 + 0.08 + j as f64 * slot;
            let x1 = x0 + slot * 0.88;
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x0, lo), (x1, v)],
                    shade(k.0.name, k.1).filled(),
                )))
                .map_err(|e| err(&e))?;
            let style = TextStyle::from(("sans-serif", 10).into_font())
                .pos(Pos::new(HPos::Center, VPos::Bottom));
            chart
                .draw_series(std::iter::once(Text::new(
                    short(v),
                    ((x0 + x1) / 2.0, v * 1.04),
                    style,
                )))
                .map_err(|e| err(&e))?;
        }
    }
    // Workload names under their groups, in pixels (the x axis has no ticks).
    let under =
        TextStyle::from(("sans-serif", 13).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for (i, w) in workloads.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(i as f64 + 0.5, lo));
        root.draw(&Text::new(w.workload.label(), (x, y + 8), under.clone()))
            .map_err(|e| err(&e))?;
    }
    for (j, k) in contenders.iter().enumerate() {
        let y = 70 + j as i32 * 24;
        legend
            .draw(&Rectangle::new(
                [(8, y), (24, y + 14)],
                shade(k.0.name, k.1).filled(),
            ))
            .map_err(|e| err(&e))?;
        legend
            .draw(&Text::new(
                series_name(&k.0, k.1),
                (32, y + 1),
                ("sans-serif", 14).into_font(),
            ))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_labels() {
        assert_eq!(short(950.0), "950");
        assert_eq!(short(1000.0), "1k");
        assert_eq!(short(8_290.0), "8.3k");
        assert_eq!(short(71_230.0), "71k");
        assert_eq!(short(1_000_000.0), "1M");
        assert_eq!(short(1_250_000.0), "1.2M");
    }

    #[test]
    fn resubmit_is_a_paler_shade_and_named() {
        assert_eq!(shade("ours-null", Pattern::Batch), colour("ours-null"));
        assert_eq!(
            shade("ours-null", Pattern::Resubmit),
            RGBColor(127, 206, 185)
        );
        let ours = crate::bench::contenders::by_name("ours-null").unwrap();
        let limit = crate::bench::contenders::by_name("limit").unwrap();
        assert_eq!(series_name(&ours, Pattern::Resubmit), "ours-null resubmit");
        assert_eq!(series_name(&limit, Pattern::Batch), "limit");
    }
}
