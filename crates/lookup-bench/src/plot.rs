//! A small SVG chart for the bench: cumulative distributions of latency samples on a
//! logarithmic time axis (how `docs/BENCHMARKS.md` shows propagation against a bare hop).

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

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
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
}
