//! The chart: for each closed-loop scenario, latency percentiles and
//! throughput against the number of clients, the service (solid) beside
//! its floor (dashed) and the single-row INSERT reference (dotted). Plain
//! SVG written by hand.

use std::fmt::Write;

use super::Results;

const WIDTH: f64 = 1000.0;
const ROW: f64 = 300.0;
const TOP: f64 = 78.0;
const FOOT: f64 = 70.0;
const PANEL_W: f64 = 400.0;
const PANEL_H: f64 = 200.0;
const LEFT: [f64; 2] = [80.0, 580.0];

const P50: &str = "#1f77b4";
const P99: &str = "#d62728";
const THROUGHPUT: &str = "#2ca02c";
const REFERENCE: &str = "#7f7f7f";

/// How a line is drawn.
#[derive(Clone, Copy)]
enum Stroke {
    Service,
    Floor,
    Reference,
}

impl Stroke {
    fn dash(self) -> &'static str {
        match self {
            Stroke::Service => "",
            Stroke::Floor => " stroke-dasharray=\"7 4\"",
            Stroke::Reference => " stroke-dasharray=\"2 3\"",
        }
    }
}

struct Series {
    color: &'static str,
    stroke: Stroke,
    /// (index of the client count, value); NaN and missing values skipped.
    values: Vec<(usize, f64)>,
}

pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A round number at or above `v`: 1, 2, 2.5 or 5 times a power of ten.
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

fn panel(out: &mut String, x0: f64, y0: f64, title: &str, clients: &[usize], series: &[Series]) {
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().map(|v| v.1))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let top = nice_ceiling(max);
    let n = clients.len().max(1) as f64;
    let x = |i: usize| x0 + (i as f64 + 0.5) * PANEL_W / n;
    let y = |v: f64| y0 + PANEL_H - (v / top).clamp(0.0, 1.05) * PANEL_H;
    let _ = writeln!(
        out,
        r#"<g><text x="{:.1}" y="{:.1}" font-size="13" font-weight="bold">{}</text>"#,
        x0,
        y0 - 10.0,
        escape(title)
    );
    let _ = writeln!(
        out,
        r##"<rect x="{x0:.1}" y="{y0:.1}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#999"/>"##
    );
    for step in 0..=4 {
        let v = top * f64::from(step) / 4.0;
        let _ = writeln!(
            out,
            r##"<line x1="{x0:.1}" y1="{yy:.1}" x2="{x2:.1}" y2="{yy:.1}" stroke="#e5e5e5"/><text x="{tx:.1}" y="{ty:.1}" font-size="10" text-anchor="end">{l}</text>"##,
            yy = y(v),
            x2 = x0 + PANEL_W,
            tx = x0 - 5.0,
            ty = y(v) + 3.0,
            l = label(v)
        );
    }
    for (i, c) in clients.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{c}</text>"#,
            x(i),
            y0 + PANEL_H + 14.0
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">clients</text>"#,
        x0 + PANEL_W / 2.0,
        y0 + PANEL_H + 28.0
    );
    for s in series {
        let points: Vec<(f64, f64)> = s
            .values
            .iter()
            .filter(|v| v.1.is_finite())
            .map(|&(i, v)| (x(i), y(v)))
            .collect();
        if points.is_empty() {
            continue;
        }
        let path: Vec<String> = points
            .iter()
            .map(|(a, b)| format!("{a:.1},{b:.1}"))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{}/>"#,
            path.join(" "),
            s.color,
            s.stroke.dash()
        );
        for (a, b) in points {
            let _ = writeln!(
                out,
                r#"<circle cx="{a:.1}" cy="{b:.1}" r="2.5" fill="{}"/>"#,
                s.color
            );
        }
    }
    let _ = writeln!(out, "</g>");
}

fn legend(out: &mut String) {
    let items: [(&str, &str, Stroke); 6] = [
        (P50, "p50", Stroke::Service),
        (P99, "p99", Stroke::Service),
        (THROUGHPUT, "throughput", Stroke::Service),
        ("#333", "service (gRPC)", Stroke::Service),
        ("#333", "floor: pgbench, same SQL", Stroke::Floor),
        (REFERENCE, "floor: 1-row INSERT", Stroke::Reference),
    ];
    let mut x = 80.0;
    for (color, text, stroke) in items {
        let _ = writeln!(
            out,
            r#"<line x1="{x:.1}" y1="52" x2="{:.1}" y2="52" stroke="{color}" stroke-width="2"{}/><text x="{:.1}" y="56" font-size="11">{}</text>"#,
            x + 24.0,
            stroke.dash(),
            x + 29.0,
            escape(text)
        );
        x += 34.0 + 6.5 * text.len() as f64;
    }
}

pub fn render(r: &Results) -> String {
    let height = TOP + ROW * r.scenarios.len() as f64 + FOOT;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" viewBox="0 0 {WIDTH} {height:.0}" font-family="sans-serif">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let m = &r.machine;
    let _ = writeln!(
        out,
        r#"<text x="80" y="26" font-size="15" font-weight="bold">maitre: service vs floor{}</text><text x="80" y="42" font-size="11">{}</text>"#,
        if r.quick { " (quick run)" } else { "" },
        escape(&format!(
            "{} cores ({}), {:.0} GiB, {}, fsync={}; warm-up {:.0} s + {:.0} s per run",
            m.cpus,
            m.cpu_model,
            m.memory_gib,
            m.postgres.version.split(" on ").next().unwrap_or_default(),
            m.postgres.fsync,
            r.settings.warmup_s,
            r.settings.duration_s
        ))
    );
    legend(&mut out);
    let reference = |f: &dyn Fn(&crate::stats::Measurement) -> f64, clients: &[usize]| Series {
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
    for (row, s) in r.scenarios.iter().enumerate() {
        let clients: Vec<usize> = s.points.iter().map(|p| p.clients).collect();
        let y0 = TOP + 30.0 + ROW * row as f64;
        let pick =
            |floor: bool, f: &dyn Fn(&crate::stats::Measurement) -> f64| -> Vec<(usize, f64)> {
                s.points
                    .iter()
                    .enumerate()
                    .filter_map(|(i, p)| {
                        let m = if floor { p.floor.as_ref()? } else { &p.service };
                        Some((i, f(m)))
                    })
                    .collect()
            };
        let p50 = |m: &crate::stats::Measurement| m.latency.p50_ms;
        let p99 = |m: &crate::stats::Measurement| m.latency.p99_ms;
        let tput = |m: &crate::stats::Measurement| m.per_second;
        panel(
            &mut out,
            LEFT[0],
            y0,
            &format!("{}: latency (ms per {})", s.name, s.unit),
            &clients,
            &[
                Series {
                    color: P50,
                    stroke: Stroke::Service,
                    values: pick(false, &p50),
                },
                Series {
                    color: P99,
                    stroke: Stroke::Service,
                    values: pick(false, &p99),
                },
                Series {
                    color: P50,
                    stroke: Stroke::Floor,
                    values: pick(true, &p50),
                },
                Series {
                    color: P99,
                    stroke: Stroke::Floor,
                    values: pick(true, &p99),
                },
                reference(&p50, &clients),
            ],
        );
        panel(
            &mut out,
            LEFT[1],
            y0,
            &format!("{}: throughput ({}s per second)", s.name, s.unit),
            &clients,
            &[
                Series {
                    color: THROUGHPUT,
                    stroke: Stroke::Service,
                    values: pick(false, &tput),
                },
                Series {
                    color: THROUGHPUT,
                    stroke: Stroke::Floor,
                    values: pick(true, &tput),
                },
                reference(&tput, &clients),
            ],
        );
    }
    let foot = TOP + ROW * r.scenarios.len() as f64 + 20.0;
    if let Some(f) = &r.follow_ups {
        let _ = writeln!(
            out,
            r#"<text x="80" y="{foot:.0}" font-size="12">{}</text>"#,
            escape(&format!(
                "follow-ups: {} delivered in {:.2} s after coming due = {:.0}/s; plan job start on an idle queue: p50 {:.1} ms, p95 {:.1} ms",
                f.throughput.sent,
                f.throughput.seconds_due_to_last_sent,
                f.throughput.delivered_per_second,
                f.plan_start.from_created_ms.p50_ms,
                f.plan_start.from_created_ms.p95_ms
            ))
        );
    }
    let peaks: Vec<String> = r
        .services
        .iter()
        .map(|s| format!("{} {:.1} MiB", s.name, s.peak_rss_mib))
        .collect();
    let _ = writeln!(
        out,
        r#"<text x="80" y="{:.0}" font-size="12">{}</text>"#,
        foot + 18.0,
        escape(&format!("peak RSS: {}", peaks.join(", ")))
    );
    out.push_str("</svg>\n");
    out
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
    fn text_is_escaped() {
        assert_eq!(escape("a < b & \"c\""), "a &lt; b &amp; &quot;c&quot;");
    }

    #[test]
    fn chart_is_well_formed_xml() {
        let results = crate::report::sample::results();
        let svg = render(&results);
        let doc = roxmltree::Document::parse(&svg).expect("well-formed SVG");
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "svg");
        // Two panels per scenario, a line per series that has values.
        let polylines = root
            .descendants()
            .filter(|n| n.has_tag_name("polyline"))
            .count();
        assert_eq!(polylines, results.scenarios.len() * 8);
        assert!(svg.contains("Chef&amp;Co"), "text is escaped");
    }
}
