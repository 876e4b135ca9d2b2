//! Minimal SVG charts for docs/BENCHMARKS.md: a bar chart and a line chart, nothing more.

use std::fmt::Write as _;

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 320.0;
const LEFT: f64 = 70.0;
const BOTTOM: f64 = 50.0;
const TOP: f64 = 40.0;
const COLOURS: [&str; 4] = ["#d62728", "#1f77b4", "#ff7f0e", "#2ca02c"];

fn frame(title: &str, y_label: &str, max: f64) -> String {
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{title}</text>\n\
         <text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">{y_label}</text>\n",
        WIDTH / 2.0,
        HEIGHT / 2.0,
        HEIGHT / 2.0
    );
    let plot_h = HEIGHT - TOP - BOTTOM;
    for i in 0..=4 {
        let value = max * f64::from(i) / 4.0;
        let y = HEIGHT - BOTTOM - plot_h * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            WIDTH - 10.0,
            LEFT - 6.0,
            y + 4.0,
            compact(value)
        );
    }
    svg
}

fn compact(value: f64) -> String {
    if value >= 1e6 {
        format!("{:.1}M", value / 1e6)
    } else if value >= 1e3 {
        format!("{:.0}k", value / 1e3)
    } else {
        format!("{value:.0}")
    }
}

/// Bars, one per label.
pub fn bar_chart(title: &str, y_label: &str, bars: &[(String, f64)]) -> String {
    let max = bars.iter().map(|b| b.1).fold(1.0, f64::max) * 1.1;
    let mut svg = frame(title, y_label, max);
    let plot_w = WIDTH - LEFT - 10.0;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let slot = plot_w / bars.len().max(1) as f64;
    for (i, (label, value)) in bars.iter().enumerate() {
        let h = plot_h * value / max;
        let x = LEFT + slot * i as f64 + slot * 0.15;
        let _ = writeln!(
            svg,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>",
            HEIGHT - BOTTOM - h,
            slot * 0.7,
            COLOURS[i % COLOURS.len()],
            x + slot * 0.35,
            HEIGHT - BOTTOM - h - 4.0,
            compact(*value),
            x + slot * 0.35,
            HEIGHT - BOTTOM + 18.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Lines over x = 1, 2, 3, ..., one per series, with a legend.
pub fn line_chart(
    title: &str,
    y_label: &str,
    x_label: &str,
    series: &[(String, Vec<f64>)],
) -> String {
    let max = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .fold(1.0, f64::max)
        * 1.1;
    let points = series.iter().map(|s| s.1.len()).max().unwrap_or(1).max(2);
    let mut svg = frame(title, y_label, max);
    let plot_w = WIDTH - LEFT - 10.0;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x_of = |i: usize| LEFT + plot_w * i as f64 / (points - 1) as f64;
    for (n, (name, values)) in series.iter().enumerate() {
        let colour = COLOURS[n % COLOURS.len()];
        let path: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x_of(i), HEIGHT - BOTTOM - plot_h * v / max))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\
             <rect x=\"{:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{colour}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{name}</text>",
            path.join(" "),
            WIDTH - 150.0,
            TOP + 18.0 * n as f64,
            WIDTH - 133.0,
            TOP + 18.0 * n as f64 + 11.0
        );
    }
    for i in 0..points {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            x_of(i),
            HEIGHT - BOTTOM + 16.0,
            i + 1
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{x_label}</text></svg>",
        WIDTH / 2.0,
        HEIGHT - 12.0
    );
    svg
}
