//! Small SVG charts for the bench: cumulative distributions of latency samples on a
//! logarithmic time axis (how `docs/BENCHMARKS.md` shows propagation against a bare hop), and
//! curves of a figure against a load (the scale curves: one panel per load).

use std::fmt::Write as _;

/// One distribution: its legend, its stroke colour and its samples (µs).
pub(crate) struct Series<'a> {
    pub(crate) label: &'a str,
    pub(crate) color: &'a str,
    pub(crate) samples: &'a [f64],
}

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 48.0;
const BOTTOM: f64 = 56.0;

/// Escapes text for an SVG text node.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The chart: one step line per series (fraction of samples at or below each latency), grid
/// lines at 1-2-5 steps of each decade, dashed guides at the median and the 99th percentile.
/// Series without positive samples are left out.
pub(crate) fn cdf_svg(title: &str, series: &[Series<'_>]) -> String {
    let positive = |s: &Series<'_>| -> Vec<f64> {
        let mut v: Vec<f64> = s.samples.iter().copied().filter(|x| *x > 0.0).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let sorted: Vec<(&Series<'_>, Vec<f64>)> =
        series.iter().map(|s| (s, positive(s))).filter(|(_, v)| !v.is_empty()).collect();
    let lo = sorted.iter().map(|(_, v)| v[0]).fold(f64::INFINITY, f64::min);
    let hi = sorted.iter().map(|(_, v)| v[v.len() - 1]).fold(0.0, f64::max);
    let (lo, hi) = if sorted.is_empty() { (1.0, 10.0) } else { (lo, hi.max(lo * 1.01)) };
    let (d0, d1) = (lo.log10().floor(), hi.log10().ceil());
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |us: f64| LEFT + (us.log10() - d0) / (d1 - d0) * plot_w;
    let y = |fraction: f64| TOP + (1.0 - fraction) * plot_h;

    let mut svg = svg_start(HEIGHT, title);
    // Grid: 1, 2, 5 × each decade.
    let mut decade = d0;
    while decade < d1 + 0.5 {
        for (step, major) in [(1.0, true), (2.0, false), (5.0, false)] {
            let us = step * 10f64.powf(decade);
            if us.log10() > d1 + 1e-9 {
                continue;
            }
            let gx = x(us);
            let stroke = if major { "#bbb" } else { "#e4e4e4" };
            let _ = writeln!(
                svg,
                r#"<line x1="{gx:.1}" y1="{TOP}" x2="{gx:.1}" y2="{:.1}" stroke="{stroke}"/>"#,
                TOP + plot_h
            );
            let label =
                if us >= 1000.0 { format!("{} ms", us / 1000.0) } else { format!("{us} µs") };
            let _ = writeln!(
                svg,
                r##"<text x="{gx:.1}" y="{:.1}" text-anchor="middle" fill="#555">{label}</text>"##,
                TOP + plot_h + 16.0
            );
        }
        decade += 1.0;
    }
    for (fraction, label) in [(0.0, "0"), (0.5, "p50"), (0.99, "p99"), (1.0, "1")] {
        let gy = y(fraction);
        let dash = if label.starts_with('p') { r#" stroke-dasharray="4 3""# } else { "" };
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{gy:.1}" x2="{:.1}" y2="{gy:.1}" stroke="#999"{dash}/>"##,
            LEFT + plot_w
        );
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">{label}</text>"##,
            LEFT - 6.0,
            gy + 4.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">latency (log scale)</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 14.0
    );
    let _ = writeln!(
        svg,
        r#"<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">fraction of samples at or below</text>"#,
        TOP + plot_h / 2.0
    );
    for (i, (s, values)) in sorted.iter().enumerate() {
        let n = values.len() as f64;
        let mut points = format!("{:.1},{:.1}", x(values[0]), y(0.0));
        for (k, v) in values.iter().enumerate() {
            let _ = write!(points, " {:.1},{:.1}", x(*v), y(k as f64 / n));
            let _ = write!(points, " {:.1},{:.1}", x(*v), y((k + 1) as f64 / n));
        }
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{points}"/>"#,
            s.color
        );
        let ly = TOP + 14.0 + 18.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="3"/>"#,
            LEFT + 12.0,
            LEFT + 36.0,
            s.color
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}">{} ({} samples)</text>"#,
            LEFT + 42.0,
            ly + 4.0,
            escape(s.label),
            values.len()
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// One curve of a panel: its legend, colour, whether it is dashed (a baseline), and its
/// points (load, value).
pub(crate) struct Curve<'a> {
    pub(crate) label: &'a str,
    pub(crate) color: &'a str,
    pub(crate) dashed: bool,
    pub(crate) points: Vec<(f64, f64)>,
}

/// One panel: a figure (y, linear from 0) against a load (x, logarithmic, ticked at every
/// load measured).
pub(crate) struct Panel<'a> {
    pub(crate) title: &'a str,
    pub(crate) x_label: &'a str,
    pub(crate) y_label: &'a str,
    pub(crate) curves: Vec<Curve<'a>>,
}

const PANEL_HEIGHT: f64 = 300.0;
const LEGEND_WIDTH: f64 = 230.0;

/// A value as an axis label: `12k` for thousands, one decimal under 10.
fn short_number(value: f64) -> String {
    if value >= 1000.0 {
        let thousands = value / 1000.0;
        if thousands.fract().abs() < 1e-9 {
            format!("{thousands}k")
        } else {
            format!("{thousands:.1}k")
        }
    } else if value >= 10.0 || value.fract().abs() < 1e-9 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

/// A step of 1, 2 or 5 × a power of ten giving about five ticks up to `max`.
fn tick_step(max: f64) -> f64 {
    let rough = max / 5.0;
    let power = 10f64.powf(rough.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|step| *step >= rough)
        .unwrap_or(power)
}

/// An SVG document's opening: its size, a white background and the title.
fn svg_start(height: f64, title: &str) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    svg
}

/// The panels stacked under one title, each with its own axes and legend. Curves without
/// points are left out.
pub(crate) fn curves_svg(title: &str, panels: &[Panel<'_>]) -> String {
    let height = TOP + PANEL_HEIGHT * panels.len() as f64;
    let plot_w = WIDTH - LEFT - RIGHT - LEGEND_WIDTH;
    let mut svg = svg_start(height, title);
    for (index, panel) in panels.iter().enumerate() {
        let top = TOP + PANEL_HEIGHT * index as f64 + 24.0;
        let plot_h = PANEL_HEIGHT - 24.0 - BOTTOM;
        let curves: Vec<&Curve<'_>> =
            panel.curves.iter().filter(|c| !c.points.is_empty()).collect();
        let mut loads: Vec<f64> =
            curves.iter().flat_map(|c| c.points.iter().map(|p| p.0)).filter(|x| *x > 0.0).collect();
        loads.sort_by(f64::total_cmp);
        loads.dedup();
        let (x0, x1) = match (loads.first(), loads.last()) {
            (Some(lo), Some(hi)) if hi > lo => (lo.log10(), hi.log10()),
            (Some(lo), _) => (lo.log10() - 0.5, lo.log10() + 0.5),
            _ => (0.0, 1.0),
        };
        let y_max = curves.iter().flat_map(|c| c.points.iter().map(|p| p.1)).fold(0.0, f64::max);
        let step = tick_step(if y_max > 0.0 { y_max * 1.05 } else { 1.0 });
        let y_top = (y_max * 1.05 / step).ceil().max(1.0) * step;
        let x = |load: f64| LEFT + 12.0 + (load.log10() - x0) / (x1 - x0) * (plot_w - 24.0);
        let y = |value: f64| top + (1.0 - value / y_top) * plot_h;
        let _ = writeln!(
            svg,
            r#"<text x="{LEFT}" y="{:.1}" font-size="13">{}</text>"#,
            top - 8.0,
            escape(panel.title)
        );
        let mut tick = 0.0;
        while tick <= y_top + step * 1e-9 {
            let gy = y(tick);
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{gy:.1}" x2="{:.1}" y2="{gy:.1}" stroke="#e4e4e4"/>"##,
                LEFT + plot_w
            );
            let _ = writeln!(
                svg,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
                LEFT - 6.0,
                gy + 4.0,
                short_number(tick)
            );
            tick += step;
        }
        for load in &loads {
            let gx = x(*load);
            let _ = writeln!(
                svg,
                r##"<line x1="{gx:.1}" y1="{top:.1}" x2="{gx:.1}" y2="{:.1}" stroke="#e4e4e4"/>"##,
                top + plot_h
            );
            let _ = writeln!(
                svg,
                r##"<text x="{gx:.1}" y="{:.1}" text-anchor="middle" fill="#555">{}</text>"##,
                top + plot_h + 16.0,
                short_number(*load)
            );
        }
        let _ = writeln!(
            svg,
            r##"<rect x="{LEFT}" y="{top:.1}" width="{plot_w:.1}" height="{plot_h:.1}" fill="none" stroke="#999"/>"##
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + plot_w / 2.0,
            top + plot_h + 34.0,
            escape(panel.x_label)
        );
        let _ = writeln!(
            svg,
            r#"<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            top + plot_h / 2.0,
            escape(panel.y_label)
        );
        for (i, curve) in curves.iter().enumerate() {
            let dash = if curve.dashed { r#" stroke-dasharray="6 4""# } else { "" };
            let points: Vec<String> =
                curve.points.iter().map(|(l, v)| format!("{:.1},{:.1}", x(*l), y(*v))).collect();
            let _ = writeln!(
                svg,
                r#"<polyline fill="none" stroke="{}" stroke-width="2"{dash} points="{}"/>"#,
                curve.color,
                points.join(" ")
            );
            for (l, v) in &curve.points {
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"/>"#,
                    x(*l),
                    y(*v),
                    curve.color
                );
            }
            let lx = LEFT + plot_w + 16.0;
            let ly = top + 10.0 + 18.0 * i as f64;
            let _ = writeln!(
                svg,
                r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="3"{dash}/>"#,
                lx + 24.0,
                curve.color
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
                lx + 30.0,
                ly + 4.0,
                escape(curve.label)
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_is_well_formed_and_has_one_line_per_series() {
        let fast: Vec<f64> = (1..=100).map(|i| 100.0 + f64::from(i)).collect();
        let slow: Vec<f64> = (1..=50).map(|i| 1000.0 + 10.0 * f64::from(i)).collect();
        let svg = cdf_svg(
            "a <title>",
            &[
                Series { label: "fast", color: "#1f77b4", samples: &fast },
                Series { label: "slow & late", color: "#d62728", samples: &slow },
                Series { label: "empty", color: "#000", samples: &[] },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2, "the empty series is left out");
        assert!(svg.contains("a &lt;title&gt;") && svg.contains("slow &amp; late (50 samples)"));
        // Each step line has two points per sample plus its start.
        let first = svg.lines().find(|l| l.starts_with("<polyline")).expect("a line");
        assert_eq!(first.matches(',').count(), 2 * fast.len() + 1);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn the_curves_are_well_formed_with_one_line_per_curve() {
        let panels = [
            Panel {
                title: "latency <ms>",
                x_label: "listeners",
                y_label: "ms",
                curves: vec![
                    Curve {
                        label: "library",
                        color: "#d62728",
                        dashed: false,
                        points: vec![(1.0, 2.0), (10.0, 3.5), (50.0, 9.0)],
                    },
                    Curve {
                        label: "bare & floor",
                        color: "#1f77b4",
                        dashed: true,
                        points: vec![(1.0, 0.3), (10.0, 1.0), (50.0, 4.0)],
                    },
                ],
            },
            Panel {
                title: "rate",
                x_label: "tasks",
                y_label: "per second",
                curves: vec![
                    Curve {
                        label: "one",
                        color: "#000",
                        dashed: false,
                        points: vec![(1.0, 1200.0), (16.0, 5400.0)],
                    },
                    Curve { label: "empty", color: "#000", dashed: false, points: Vec::new() },
                ],
            },
        ];
        let svg = curves_svg("scale", &panels);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 3, "the empty curve is left out");
        assert_eq!(svg.matches("<circle").count(), 8);
        assert!(svg.contains("latency &lt;ms&gt;") && svg.contains("bare &amp; floor"));
        assert!(svg.contains(">5.4k<") || svg.contains(">6k<"), "thousands are shortened: {svg}");
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }
}
