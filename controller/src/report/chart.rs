//! Inline SVG chart of the workload's external egress per flow-report
//! window, with the detector's threshold, the detection and the containment
//! marked. No scripts, no external resources.

use std::fmt::Write;

use super::{facts::Facts, html::escape};

const W: f64 = 720.0;
const H: f64 = 260.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 20.0;
const BOTTOM: f64 = 40.0;

/// The chart as an `<svg>` element.
pub fn svg(f: &Facts) -> String {
    let points: Vec<(u64, u64)> = f
        .egress
        .iter()
        .map(|p| (p.window_end_ms, p.external_bytes))
        .collect();
    let end_marker = f.contained_ms.or(f.closed_ms).unwrap_or(f.detected_ms);
    let t0 = points
        .first()
        .map_or(f.detected_ms, |p| p.0)
        .min(f.detected_ms)
        .saturating_sub(60_000);
    let t1 = points.last().map_or(end_marker, |p| p.0).max(end_marker) + 60_000;
    let threshold = f.threshold.map(|(bytes, _)| bytes);
    let ymax = points
        .iter()
        .map(|p| p.1)
        .chain(threshold)
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.1;
    let x = |ms: u64| LEFT + (ms.saturating_sub(t0)) as f64 / (t1 - t0) as f64 * (W - LEFT - RIGHT);
    let y = |v: u64| TOP + (1.0 - v as f64 / ymax) * (H - TOP - BOTTOM);
    let mut out = String::new();
    let _ = write!(
        out,
        r##"<svg id="egress-chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-labelledby="egress-chart-title"><title id="egress-chart-title">External egress of {} per flow-report window</title>"##,
        escape(&f.workload)
    );
    // Axes.
    let _ = write!(
        out,
        r##"<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{yb}" stroke="#333"/><line class="axis" x1="{LEFT}" y1="{yb}" x2="{xr}" y2="{yb}" stroke="#333"/>"##,
        yb = H - BOTTOM,
        xr = W - RIGHT
    );
    let _ = write!(
        out,
        r##"<text x="{LEFT}" y="{ty}" font-size="11">{}</text><text x="{xr}" y="{ty}" font-size="11" text-anchor="end">{}</text><text x="{lx}" y="{top}" font-size="11" text-anchor="end">{}</text><text x="{lx}" y="{yb}" font-size="11" text-anchor="end">0</text>"##,
        escape(&f.utc(t0)),
        escape(&f.utc(t1)),
        short_bytes(ymax as u64),
        ty = H - 12.0,
        xr = W - RIGHT,
        lx = LEFT - 6.0,
        top = TOP + 10.0,
        yb = H - BOTTOM,
    );
    if points.is_empty() {
        let _ = write!(
            out,
            r##"<text class="no-data" x="{}" y="{}" font-size="13" text-anchor="middle">No flow reports stored for this workload in this period</text>"##,
            W / 2.0,
            H / 2.0
        );
    } else {
        let coords: Vec<String> = points
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
            .collect();
        let _ = write!(
            out,
            r##"<polyline class="egress" fill="none" stroke="#1f77b4" stroke-width="2" points="{}"/>"##,
            coords.join(" ")
        );
    }
    if let Some(th) = threshold {
        let _ = write!(
            out,
            r##"<line class="threshold" x1="{LEFT}" y1="{yt:.1}" x2="{xr}" y2="{yt:.1}" stroke="#d62728" stroke-dasharray="6 4"/><text x="{xr}" y="{ly:.1}" font-size="11" text-anchor="end" fill="#d62728">threshold {}</text>"##,
            short_bytes(th),
            yt = y(th),
            ly = y(th) - 4.0,
            xr = W - RIGHT
        );
    }
    let mut marker = |class: &str, label: &str, ms: u64, color: &str| {
        let _ = write!(
            out,
            r##"<line class="{class}" x1="{xm:.1}" y1="{TOP}" x2="{xm:.1}" y2="{yb}" stroke="{color}" stroke-width="2"/><text x="{tx:.1}" y="{ty}" font-size="11" fill="{color}" text-anchor="{anchor}">{label} {}</text>"##,
            escape(&f.utc(ms)),
            xm = x(ms),
            // Labels of markers in the right half run leftwards, so they stay inside.
            tx = if x(ms) > W * 0.6 {
                x(ms) - 4.0
            } else {
                x(ms) + 4.0
            },
            anchor = if x(ms) > W * 0.6 { "end" } else { "start" },
            ty = TOP + if class == "detection" { 12.0 } else { 26.0 },
            yb = H - BOTTOM,
        );
    };
    marker("detection", "detection", f.detected_ms, "#ff7f0e");
    if let Some(at) = f.contained_ms {
        marker("containment", "containment", at, "#2ca02c");
    }
    out += "</svg>";
    out
}

/// `1.2 GB` without the exact count, for axis labels.
fn short_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}
