//! The chart: for each closed-loop scenario, latency percentiles and
//! throughput against the number of clients, the service (solid) beside
//! its floor (dashed) and the single-row INSERT reference (dotted), drawn
//! with plotters' SVG backend.

use anyhow::{Result, anyhow};
use plotters::{
    coord::{Shift, ranged1d::SegmentValue},
    element::DashedPathElement,
    prelude::*,
};

use super::Results;
use crate::stats::Measurement;

const WIDTH: u32 = 1000;
/// Title, machine line and legend.
const TOP: u32 = 78;
/// One scenario: its latency and throughput panels side by side.
const ROW: u32 = 300;
/// Follow-ups and peak RSS.
const FOOT: u32 = 70;
const FONT: &str = "sans-serif";

const P50: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const P99: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const THROUGHPUT: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);
const REFERENCE: RGBColor = RGBColor(0x7f, 0x7f, 0x7f);
const INK: RGBColor = RGBColor(0x33, 0x33, 0x33);
const GRID: RGBColor = RGBColor(0xe5, 0xe5, 0xe5);

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// How a line is drawn.
#[derive(Clone, Copy)]
enum Stroke {
    Service,
    Floor,
    Reference,
}

impl Stroke {
    /// Dash length and gap, in pixels; None for a solid line.
    fn dash(self) -> Option<(u32, u32)> {
        match self {
            Stroke::Service => None,
            Stroke::Floor => Some((7, 4)),
            Stroke::Reference => Some((2, 3)),
        }
    }
}

struct Series {
    color: RGBColor,
    stroke: Stroke,
    /// (index of the client count, value); NaN and missing values skipped.
    values: Vec<(usize, f64)>,
}

/// A round number at or above `v`: 1, 2, 2.5 or 5 times a power of ten,
/// the top of a panel's value axis.
pub fn nice_ceiling(v: f64) -> f64 {
    if !(v.is_finite() && v > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&c| c >= v * 0.999_999)
        .unwrap_or(10.0 * magnitude)
}

fn label(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Plotters' errors borrow nothing but are not all `Send`: keep the text.
fn drawing<T, E: std::fmt::Display>(r: std::result::Result<T, E>) -> Result<T> {
    r.map_err(|e| anyhow!("drawing the chart: {e}"))
}

fn line(
    area: &Area,
    points: Vec<(i32, i32)>,
    color: RGBColor,
    stroke: Stroke,
    width: u32,
) -> Result<()> {
    let style = color.stroke_width(width);
    match stroke.dash() {
        None => drawing(area.draw(&PathElement::new(points, style))),
        Some((dash, gap)) => drawing(area.draw(&DashedPathElement::new(points, dash, gap, style))),
    }
}

fn text(area: &Area, text: &str, at: (i32, i32), size: u32, bold: bool) -> Result<()> {
    let font = (FONT, size).into_font();
    let font = if bold {
        font.style(FontStyle::Bold)
    } else {
        font
    };
    drawing(area.draw(&Text::new(text.to_owned(), at, font.color(&BLACK))))
}

fn panel(area: &Area, title: &str, clients: &[usize], series: &[Series]) -> Result<()> {
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().map(|v| v.1))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let top = nice_ceiling(max);
    let x_range = (0..clients.len().saturating_sub(1)).into_segmented();
    let mut chart = drawing(
        ChartBuilder::on(area)
            .caption(title, (FONT, 13).into_font().style(FontStyle::Bold))
            .margin_left(10)
            .margin_right(60)
            .margin_top(8)
            .margin_bottom(30)
            .x_label_area_size(36)
            .y_label_area_size(50)
            .build_cartesian_2d(x_range, 0.0..top),
    )?;
    let client_label = |v: &SegmentValue<usize>| match v {
        SegmentValue::CenterOf(i) => clients.get(*i).map(usize::to_string).unwrap_or_default(),
        _ => String::new(),
    };
    let value_label = |v: &f64| label(*v);
    drawing(
        chart
            .configure_mesh()
            .disable_x_mesh()
            .bold_line_style(GRID)
            .light_line_style(TRANSPARENT)
            .x_labels(clients.len())
            .x_label_formatter(&client_label)
            .y_labels(5)
            .y_label_formatter(&value_label)
            .x_desc("clients")
            .label_style((FONT, 10))
            .draw(),
    )?;
    for s in series {
        let points: Vec<(SegmentValue<usize>, f64)> = s
            .values
            .iter()
            .filter(|v| v.1.is_finite())
            .map(|&(i, v)| (SegmentValue::CenterOf(i), v))
            .collect();
        if points.is_empty() {
            continue;
        }
        let style = s.color.stroke_width(2);
        match s.stroke.dash() {
            None => drawing(chart.draw_series(LineSeries::new(points.clone(), style)))?,
            Some((dash, gap)) => {
                drawing(chart.draw_series(DashedLineSeries::new(points.clone(), dash, gap, style)))?
            }
        };
        drawing(
            chart.draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 2, s.color.filled())),
            ),
        )?;
    }
    Ok(())
}

fn legend(area: &Area) -> Result<()> {
    let items: [(RGBColor, &str, Stroke); 6] = [
        (P50, "p50", Stroke::Service),
        (P99, "p99", Stroke::Service),
        (THROUGHPUT, "throughput", Stroke::Service),
        (INK, "service (gRPC)", Stroke::Service),
        (INK, "floor: pgbench, same SQL", Stroke::Floor),
        (REFERENCE, "floor: 1-row INSERT", Stroke::Reference),
    ];
    let mut x = 80;
    for (color, name, stroke) in items {
        line(area, vec![(x, 52), (x + 24, 52)], color, stroke, 2)?;
        text(area, name, (x + 29, 46), 11, false)?;
        x += 34 + (6.5 * name.len() as f64) as i32;
    }
    Ok(())
}

pub fn render(r: &Results) -> Result<String> {
    let rows = u32::try_from(r.scenarios.len())?;
    let mut svg = String::new();
    {
        let root =
            SVGBackend::with_string(&mut svg, (WIDTH, TOP + ROW * rows + FOOT)).into_drawing_area();
        drawing(root.fill(&WHITE))?;
        let m = &r.machine;
        let title = format!(
            "maitre: service vs floor{}",
            if r.quick { " (quick run)" } else { "" }
        );
        text(&root, &title, (80, 12), 15, true)?;
        let machine = format!(
            "{} cores ({}), {:.0} GiB, {}, fsync={}; warm-up {:.0} s + {:.0} s per run",
            m.cpus,
            m.cpu_model,
            m.memory_gib,
            m.postgres.version.split(" on ").next().unwrap_or_default(),
            m.postgres.fsync,
            r.settings.warmup_s,
            r.settings.duration_s
        );
        text(&root, &machine, (80, 32), 11, false)?;
        legend(&root)?;
        let (_, body) = root.split_vertically(TOP);
        let (panels, foot) = body.split_vertically(ROW * rows);
        let cells = panels.split_evenly((r.scenarios.len().max(1), 2));
        let reference = |f: &dyn Fn(&Measurement) -> f64, clients: &[usize]| Series {
            color: REFERENCE,
            stroke: Stroke::Reference,
            values: r
                .single_write
                .iter()
                .filter_map(|p| {
                    clients
                        .iter()
                        .position(|&c| c == p.clients)
                        .map(|i| (i, f(&p.floor)))
                })
                .collect(),
        };
        for (s, cell) in r.scenarios.iter().zip(cells.chunks(2)) {
            let clients: Vec<usize> = s.points.iter().map(|p| p.clients).collect();
            let pick = |floor: bool, f: &dyn Fn(&Measurement) -> f64| -> Vec<(usize, f64)> {
                s.points
                    .iter()
                    .enumerate()
                    .filter_map(|(i, p)| {
                        let m = if floor { p.floor.as_ref()? } else { &p.service };
                        Some((i, f(m)))
                    })
                    .collect()
            };
            let p50 = |m: &Measurement| m.latency.p50_ms;
            let p99 = |m: &Measurement| m.latency.p99_ms;
            let tput = |m: &Measurement| m.per_second;
            let series = |color, stroke, values| Series {
                color,
                stroke,
                values,
            };
            panel(
                &cell[0],
                &format!("{}: latency (ms per {})", s.name, s.unit),
                &clients,
                &[
                    series(P50, Stroke::Service, pick(false, &p50)),
                    series(P99, Stroke::Service, pick(false, &p99)),
                    series(P50, Stroke::Floor, pick(true, &p50)),
                    series(P99, Stroke::Floor, pick(true, &p99)),
                    reference(&p50, &clients),
                ],
            )?;
            panel(
                &cell[1],
                &format!("{}: throughput ({}s per second)", s.name, s.unit),
                &clients,
                &[
                    series(THROUGHPUT, Stroke::Service, pick(false, &tput)),
                    series(THROUGHPUT, Stroke::Floor, pick(true, &tput)),
                    reference(&tput, &clients),
                ],
            )?;
        }
        if let Some(f) = &r.follow_ups {
            let line = format!(
                "follow-ups: {} delivered in {:.2} s after coming due = {:.0}/s; job start after due on an idle queue: p50 {:.1} ms, p95 {:.1} ms",
                f.throughput.sent,
                f.throughput.seconds_due_to_last_sent,
                f.throughput.delivered_per_second,
                f.plan_start.from_due_ms.p50_ms,
                f.plan_start.from_due_ms.p95_ms
            );
            text(&foot, &line, (80, 8), 12, false)?;
        }
        let peaks: Vec<String> = r
            .services
            .iter()
            .map(|s| format!("{} {:.1} MiB", s.name, s.peak_rss_mib))
            .collect();
        text(
            &foot,
            &format!("peak RSS: {}", peaks.join(", ")),
            (80, 26),
            12,
            false,
        )?;
        drawing(root.present())?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(0.7), 1.0);
        assert_eq!(nice_ceiling(1.3), 2.0);
        assert_eq!(nice_ceiling(2.2), 2.5);
        assert_eq!(nice_ceiling(2400.0), 2500.0);
        assert_eq!(nice_ceiling(5000.0), 5000.0);
        assert_eq!(nice_ceiling(7000.0), 10000.0);
    }

    #[test]
    fn chart_has_every_panel_and_series() {
        let results = crate::report::sample::results();
        let svg = render(&results).expect("chart");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for s in &results.scenarios {
            assert!(svg.contains(&format!("{}: latency (ms per {})", s.name, s.unit)));
            assert!(svg.contains(&format!("{}: throughput ({}s per second)", s.name, s.unit)));
        }
        for colour in ["#1F77B4", "#D62728", "#2CA02C", "#7F7F7F"] {
            assert!(svg.contains(colour), "no series drawn in {colour}");
        }
        assert!(svg.contains("Chef&amp;Co"), "text is escaped");
    }
}
